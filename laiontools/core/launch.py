"""Start worker processes: one place for torch.distributed.run launches (train --nproc, embed --engine torchrun).

A launched process tree dies with its launcher: every child asks Linux for SIGTERM when its parent
dies (torchrun starts each rank in its own session, so a rank would otherwise outlive a killed
launcher and go on writing into an output that a re-run is resuming).
"""

from __future__ import annotations

import functools
import logging
import os
import subprocess
import sys

log = logging.getLogger(__name__)


def die_with_parent(sig: int = 9) -> None:
    """Ask Linux to send `sig` to this process when its parent dies (no-op elsewhere)."""
    if not sys.platform.startswith("linux"):
        return
    try:
        import ctypes

        libc = ctypes.CDLL("libc.so.6", use_errno=True)
        libc.prctl(1, sig)  # PR_SET_PDEATHSIG
    except OSError:
        pass


def torchrun_command(nproc: int, module_args: list[str]) -> list[str]:
    """``python -m torch.distributed.run --standalone --nproc-per-node N <module_args>``; one process
    needs no rendezvous, so it runs ``python <module_args>`` (one less interpreter importing torch)."""
    if nproc == 1:
        return [sys.executable, *module_args]
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(nproc), *module_args]


def worker_env(nproc: int) -> dict[str, str]:
    """This process's environment, with each of `nproc` ranks given its share of the cores
    (torchrun would set OMP_NUM_THREADS=1 and warn) unless the user set OMP_NUM_THREADS."""
    env = dict(os.environ)
    if nproc > 1 and "OMP_NUM_THREADS" not in env:
        env["OMP_NUM_THREADS"] = str(max(1, (os.cpu_count() or 1) // nproc))
    return env


def run_logged(cmd: list[str], console: str, env: dict[str, str] | None = None) -> int:
    """Run `cmd` with stdout and stderr appended to the local file `console`; return its exit code.

    The child gets SIGTERM if this process dies; if this process is interrupted, the child is
    terminated (then killed after 30 s) before the interruption propagates.
    """
    os.makedirs(os.path.dirname(console) or ".", exist_ok=True)
    log.info("launching: %s ... (output in %s)", " ".join(cmd[:8]), console)
    with open(console, "ab") as out:
        proc = subprocess.Popen(cmd, env=env, stdout=out, stderr=subprocess.STDOUT,
                                preexec_fn=functools.partial(die_with_parent, 15))  # noqa: PLW1509 (only prctl)
    try:
        return proc.wait()
    except BaseException:
        proc.terminate()  # our own child: torchrun stops its workers
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
        raise
