"""Start many short Python runs of one module from a process that has imported it once (a "zygote").

A study trains its grid points one after another, each in a fresh process (``python -m
laiontools.stages.train_worker <run_dir>``: a crash or a leak in one run cannot touch the next).
Importing the trainer (torch, torchvision, open_clip, open_clip_train) takes ~10 s of CPU per process
on a 2-core machine, as long as a small point's whole training. A zygote imports it once; each run is
then a ``fork()`` of it: a fresh process all the same, with its own memory, output file and exit code,
that starts with the modules already imported.

The zygote is a plain subprocess (``python -m laiontools.core.zygote <preload> ...``) that has run no
torch operation (no thread pool, no CUDA context: the child initialises its own device), and serves one
run at a time over its stdin/stdout: a JSON request in, the child's pid and then its exit code out.
It dies with the process that started it, and each child dies with it (``PR_SET_PDEATHSIG``), so
killing the launcher leaves no run writing into an output a re-run resumes; all of them stay in the
launcher's process group.

Where the zygote cannot serve a run as a fresh process would run (another working directory or
environment than it was started with, apart from laiontools' own variables, which the child sets; or
it has died), :meth:`Zygote.run` returns None and the caller starts a plain subprocess.
"""

from __future__ import annotations

import contextlib
import importlib
import json
import logging
import os
import select
import signal
import subprocess
import sys
from collections.abc import Iterator

log = logging.getLogger(__name__)

_ACTIVE: Zygote | None = None

# Variables a run may be given other values of than the zygote had (laiontools sets them per run, e.g.
# the locks the launcher holds); any other difference (PYTHONPATH, a library's settings read at import)
# makes the run a plain subprocess.
OWN_ENV = "LAIONTOOLS_"


class Zygote:
    """The launcher's side: ``run(module, args, console, env)`` = ``python -m module *args`` with stdout
    and stderr appended to `console`, forked from the zygote; its exit code (negative: killed by that
    signal, as subprocess reports it)."""

    stop_grace = 30.0  # seconds an interrupted launcher's run has between SIGTERM and SIGKILL

    def __init__(self, preload: list[str]):
        self.preload = list(preload)
        self.proc: subprocess.Popen | None = None  # started by the first run (a re-run of a finished grid starts none)

    def _start(self) -> None:
        from laiontools.core.launch import die_with_parent

        self.env, self.cwd = dict(os.environ), os.getcwd()
        self.proc = subprocess.Popen([sys.executable, "-m", "laiontools.core.zygote", *self.preload], stdin=subprocess.PIPE,
                                     stdout=subprocess.PIPE, preexec_fn=lambda: die_with_parent(signal.SIGKILL))  # noqa: PLW1509 (only prctl)

    def run(self, module: str, args: list[str], console: str, env: dict[str, str]) -> int | None:
        if self.proc is None:
            self._start()
        changed = {k for k in set(env) | set(self.env) if env.get(k) != self.env.get(k)}
        other = sorted(k for k in changed if not k.startswith(OWN_ENV))
        why = (f"the environment differs from the zygote's in {', '.join(other)}" if other  # (names only: no values)
               else "the working directory changed" if os.getcwd() != self.cwd
               else f"its zygote exited ({self.proc.returncode})" if self.proc.poll() is not None else None)
        if why:
            log.info("%s runs in a plain subprocess: %s", module, why)
            return None
        os.makedirs(os.path.dirname(console) or ".", exist_ok=True)
        try:
            req = {"module": module, "argv": args, "console": console, "env": {k: env.get(k) for k in sorted(changed)}}
            self.proc.stdin.write(json.dumps(req).encode() + b"\n")
            self.proc.stdin.flush()
            pid = self.proc.stdout.readline()
        except OSError:
            pid = b""
        except BaseException:
            # Interrupted before the zygote named the run (it may still be importing its preload): the
            # request is in its pipe, so it would fork the run after the interrupt and be busy with it
            # when close() asks it to leave. Stop it now (a run it forked meanwhile dies with it).
            self.proc.kill()
            self.proc.wait()
            self.close()
            raise
        if not pid.strip():  # the zygote is gone: started nothing
            log.info("%s runs in a plain subprocess: its zygote exited", module)
            return None
        pid = int(pid)
        log.info("launching: python -m %s %s ... (forked, pid %d; output in %s)", module, " ".join(args[:4]), pid, console)
        try:
            line = self.proc.stdout.readline()
        except BaseException:
            self._stop(pid)
            raise
        if not line.strip():  # the zygote died under its run: the run died with it
            log.error("the process that started %s (pid %d) died during the run", module, pid)
            return -signal.SIGKILL
        return int(line)

    def _stop(self, pid: int) -> None:
        """An interrupted launcher stops its run as it would a subprocess: SIGTERM, SIGKILL after
        `stop_grace` seconds."""
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGTERM)
        if not select.select([self.proc.stdout], [], [], self.stop_grace)[0]:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        self.close()  # its reply is not read: this zygote serves no other run

    def close(self) -> None:
        if self.proc is None:
            return
        if self.proc.poll() is None:
            with contextlib.suppress(OSError):
                self.proc.stdin.close()  # the zygote leaves on EOF
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        for f in (self.proc.stdin, self.proc.stdout):
            with contextlib.suppress(OSError):
                f.close()


@contextlib.contextmanager
def forked_runs(preload: list[str]) -> Iterator[Zygote]:
    """Within the block, :func:`run_module` forks runs from one zygote that imported `preload`
    (``module`` or ``module:function``, the function called with no argument after the import)."""
    global _ACTIVE
    z, before = Zygote(preload), _ACTIVE
    _ACTIVE = z
    try:
        yield z
    finally:
        _ACTIVE = before
        z.close()


def run_module(module: str, args: list[str], console: str, env: dict[str, str]) -> int | None:
    """`python -m module *args` forked from the active zygote; None where there is none or it cannot."""
    return None if _ACTIVE is None else _ACTIVE.run(module, args, console, env)


# ------------------------------------------------------------------------------------- the zygote


def _child(req: dict, replies: int = -1) -> None:
    """In the forked child: output to the console file, then the module as ``__main__``; never returns."""
    import runpy
    import traceback

    code = 1
    try:
        if replies >= 0:
            os.close(replies)  # the zygote's channel to the launcher is not the run's
        from laiontools.core.launch import die_with_parent

        die_with_parent(signal.SIGKILL)
        signal.signal(signal.SIGINT, signal.default_int_handler)
        fd = os.open(req["console"], os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
        os.dup2(fd, 1)
        os.dup2(fd, 2)
        os.close(fd)
        null = os.open(os.devnull, os.O_RDONLY)
        os.dup2(null, 0)
        os.close(null)
        for k, v in req["env"].items():  # (only laiontools' own variables: see Zygote.run)
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
        sys.argv = [req["module"], *req["argv"]]
        runpy.run_module(req["module"], run_name="__main__", alter_sys=True)
        code = 0
    except SystemExit as e:
        code = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
    except BaseException:  # noqa: BLE001 - the child's own failure: its traceback goes to its console
        traceback.print_exc()
    finally:
        with contextlib.suppress(Exception):
            sys.stdout.flush()
            sys.stderr.flush()
        os._exit(code)


def serve(preload: list[str]) -> None:
    from laiontools.core.launch import die_with_parent

    die_with_parent(signal.SIGKILL)
    # A terminal's Ctrl-C reaches the whole process group: the launcher stops the run, not this process.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    # The replies go on a descriptor of their own; descriptor 1 (what print and libraries write to) goes
    # to stderr, so a preloaded module's output cannot be read by the launcher as a reply.
    sys.stdout.flush()
    replies = os.dup(1)
    os.dup2(2, 1)
    for name in preload:  # a failed import is the run's to report (the child imports it again)
        module, _, fn = name.partition(":")
        try:
            m = importlib.import_module(module)
            if fn:
                getattr(m, fn)()
        except Exception:  # noqa: BLE001, S110
            pass
    import gc

    sys.stdout.flush()  # (what the preload printed: once, to stderr, not again from every run's copy)
    gc.freeze()  # the imported objects stay shared with the children (not copied as the collector touches them)
    inp, out = sys.stdin.buffer, os.fdopen(replies, "wb")
    for line in inp:  # EOF: the launcher is done (or gone)
        if not line.strip():
            continue
        req = json.loads(line)
        pid = os.fork()
        if pid == 0:
            _child(req, replies)
        out.write(f"{pid}\n".encode())
        out.flush()
        _, status = os.waitpid(pid, 0)
        out.write(f"{os.waitstatus_to_exitcode(status)}\n".encode())
        out.flush()


if __name__ == "__main__":
    serve(sys.argv[1:])
