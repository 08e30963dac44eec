"""laiontools.core.zygote: runs forked from a process that imported their modules once (a study's trainers).

Each run must behave as `python -m module args` in a fresh process would: its argv, its own output file,
its exit code (negative for a signal), the launcher's per-run variables; and die with its launcher."""

from __future__ import annotations

import logging
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from laiontools.core import zygote
from laiontools.testing.procs import alive, stat

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="fork and PR_SET_PDEATHSIG are Linux's")

_MODULES = {
    "lt_chatty.py": """
        print("a preloaded module says hello", flush=True)  # as a library printing a notice on import
    """,
    "lt_slow.py": """
        import time
        time.sleep(4)  # as the trainer's imports (torch, open_clip) take seconds
    """,
    "lt_preloaded.py": """
        import os
        LOADED_IN = os.getpid()
        def ready():
            global READY
            READY = "ready() ran"
    """,
    "lt_target.py": """
        import os, sys, time
        import lt_preloaded
        print("argv", sys.argv[1:], flush=True)
        print("preloaded in", "zygote" if lt_preloaded.LOADED_IN != os.getpid() else "child", getattr(lt_preloaded, "READY", None))
        print("var", os.environ.get("LAIONTOOLS_ZYGOTE_TEST"), flush=True)
        what = sys.argv[1]
        if what == "sleep":
            open(sys.argv[2], "w").write(str(os.getpid()))
            time.sleep(120)
        if what == "polite":  # answers SIGTERM with a line and leaves, as a trainer saving its state would
            import signal
            signal.signal(signal.SIGTERM, lambda *_: (print("got SIGTERM, leaving", flush=True), sys.exit(143)))
            open(sys.argv[2], "w").write(str(os.getpid()))
            time.sleep(120)
        if what == "stubborn":  # answers SIGTERM with a line and sleeps on
            import signal
            signal.signal(signal.SIGTERM, lambda *_: print("got SIGTERM, staying", flush=True))
            open(sys.argv[2], "w").write(str(os.getpid()))
            for _ in range(1200):
                time.sleep(0.1)
        if what == "raise":
            raise ValueError("the run's own failure")
        if what == "kill":
            os.kill(os.getpid(), 9)
        sys.exit(int(sys.argv[2]))
    """,
}


@pytest.fixture
def modules(tmp_path, monkeypatch):
    for name, text in _MODULES.items():
        (tmp_path / name).write_text(textwrap.dedent(text))
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join([str(tmp_path), os.environ.get("PYTHONPATH", "")]))
    monkeypatch.delenv("LAIONTOOLS_ZYGOTE_TEST", raising=False)
    return tmp_path


def test_runs_are_forked_with_their_argv_output_exit_code_and_own_variables(modules, monkeypatch, caplog):
    logs = modules / "logs"
    with zygote.forked_runs(["lt_preloaded:ready"]) as z:
        assert zygote.run_module("lt_target", ["exit", "3"], str(logs / "a.log"), dict(os.environ)) == 3
        monkeypatch.setenv("LAIONTOOLS_ZYGOTE_TEST", "per run")  # a variable of laiontools' own: set in the child
        assert zygote.run_module("lt_target", ["exit", "0"], str(logs / "b.log"), dict(os.environ)) == 0
        assert zygote.run_module("lt_target", ["raise"], str(logs / "c.log"), dict(os.environ)) == 1
        assert zygote.run_module("lt_target", ["kill"], str(logs / "d.log"), dict(os.environ)) == -signal.SIGKILL
        monkeypatch.setenv("OMP_NUM_THREADS", "1")  # another variable: not what the zygote imported under
        with caplog.at_level(logging.INFO, logger=zygote.__name__):
            assert zygote.run_module("lt_target", ["exit", "0"], str(logs / "e.log"), dict(os.environ)) is None
        assert "lt_target runs in a plain subprocess: the environment differs from the zygote's in OMP_NUM_THREADS" \
            in caplog.text, caplog.text
        assert not (logs / "e.log").exists()
        zygote_pid = z.proc.pid
    a = (logs / "a.log").read_text()
    assert "argv ['exit', '3']" in a and "preloaded in zygote ready() ran" in a and "var None" in a, a
    assert "var per run" in (logs / "b.log").read_text()
    c = (logs / "c.log").read_text()
    assert "Traceback" in c and "ValueError: the run's own failure" in c, c
    assert z.proc.returncode == 0  # it left when the block closed
    with pytest.raises(ProcessLookupError):
        os.kill(zygote_pid, 0)
    assert zygote.run_module("lt_target", ["exit", "0"], str(logs / "f.log"), dict(os.environ)) is None  # none active


def test_a_killed_launcher_takes_its_zygote_and_run_with_it(modules, tmp_path):
    """SIGKILL of the launcher alone (not its group): the zygote and the run it forked die too, so
    nothing goes on writing into an output a re-run resumes."""
    pidfile = tmp_path / "run.pid"
    launcher = subprocess.Popen([sys.executable, "-c", textwrap.dedent(f"""
        import os
        from laiontools.core import zygote
        with zygote.forked_runs(["lt_preloaded"]):
            zygote.run_module("lt_target", ["sleep", {str(pidfile)!r}], {str(tmp_path / 'g.log')!r}, dict(os.environ))
    """)], env=os.environ, start_new_session=True)
    try:
        deadline = time.monotonic() + 120
        while not (pidfile.exists() and pidfile.read_text()) and launcher.poll() is None and time.monotonic() < deadline:
            time.sleep(0.05)
        assert pidfile.exists(), (tmp_path / "g.log").read_text() if (tmp_path / "g.log").exists() else "no run"
        run_pid = int(pidfile.read_text())
        assert stat(stat(run_pid).ppid).ppid == launcher.pid  # run <- zygote <- launcher
        launcher.kill()
        launcher.wait(timeout=60)
        deadline = time.monotonic() + 60
        while alive(run_pid) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert not alive(run_pid)
    finally:
        _kill_group(launcher.pid)


@pytest.mark.parametrize("what", ["polite", "stubborn"])
def test_an_interrupted_launcher_stops_its_run_then_its_zygote(modules, tmp_path, what):
    """Ctrl-C (SIGINT to the launcher alone) while a forked run trains: the launcher sends the run SIGTERM,
    SIGKILL after its grace if the run stays (a "polite" run answers SIGTERM with a line and leaves; a
    "stubborn" one answers with a line and sleeps on),
    closes its zygote, and the interrupt reaches the caller; nothing of the three is left."""
    pidfile, console = tmp_path / "run.pid", tmp_path / "run.log"
    launcher = subprocess.Popen([sys.executable, "-c", textwrap.dedent(f"""
        import os, sys
        from laiontools.core import zygote
        zygote.Zygote.stop_grace = 1.0
        try:
            with zygote.forked_runs(["lt_preloaded"]):
                zygote.run_module("lt_target", [{what!r}, {str(pidfile)!r}], {str(console)!r}, dict(os.environ))
        except KeyboardInterrupt:
            print("interrupted", flush=True)
            sys.exit(5)
    """)], env=os.environ, start_new_session=True, stdout=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 120
        while not (pidfile.exists() and pidfile.read_text()) and launcher.poll() is None and time.monotonic() < deadline:
            time.sleep(0.05)
        assert pidfile.exists(), console.read_text() if console.exists() else "no run"
        run_pid = int(pidfile.read_text())
        zygote_pid = stat(run_pid).ppid
        assert stat(zygote_pid).ppid == launcher.pid
        os.kill(launcher.pid, signal.SIGINT)
        out, _ = launcher.communicate(timeout=60)
        assert launcher.returncode == 5 and out == "interrupted\n", (launcher.returncode, out)
        assert not alive(run_pid) and not alive(zygote_pid)
        said = console.read_text()
        assert ("got SIGTERM, leaving" in said) == (what == "polite"), said  # SIGTERM came first: the run left by itself
        assert ("got SIGTERM, staying" in said) == (what == "stubborn"), said
    finally:
        _kill_group(launcher.pid)


def test_an_interrupt_while_the_zygote_still_imports_stops_it_at_once(modules, tmp_path):
    """Ctrl-C in a study's first seconds, while its zygote still imports the trainer: the launcher had
    written the run's request and waited for the run's pid. The interrupt left the request in the pipe:
    the zygote forked the run after the Ctrl-C, and the launcher waited 30 s in close() for a zygote busy
    with that run, then killed both. The launcher must leave at once and start no run."""
    pidfile, console = tmp_path / "run.pid", tmp_path / "run.log"
    launcher = subprocess.Popen([sys.executable, "-c", textwrap.dedent(f"""
        import os, sys
        from laiontools.core import zygote
        try:
            with zygote.forked_runs(["lt_slow"]):
                zygote.run_module("lt_target", ["sleep", {str(pidfile)!r}], {str(console)!r}, dict(os.environ))
        except KeyboardInterrupt:
            print("interrupted", flush=True)
            sys.exit(5)
    """)], env=os.environ, start_new_session=True, stdout=subprocess.PIPE, text=True)
    try:
        from laiontools.testing.procs import children

        zygote_pid, deadline = None, time.monotonic() + 60
        while zygote_pid is None and launcher.poll() is None and time.monotonic() < deadline:
            for p in children(launcher.pid):
                try:
                    if b"laiontools.core.zygote" in Path(f"/proc/{p}/cmdline").read_bytes():
                        zygote_pid = p
                except OSError:
                    pass
            time.sleep(0.05)
        assert zygote_pid is not None
        time.sleep(0.5)  # the request is written; the zygote imports its preload for 4 s
        assert not pidfile.exists()
        os.kill(launcher.pid, signal.SIGINT)
        try:
            out, _ = launcher.communicate(timeout=10)
        except subprocess.TimeoutExpired:
            pytest.fail("the interrupted launcher was still running 10 s after Ctrl-C")
        assert launcher.returncode == 5 and out == "interrupted\n", (launcher.returncode, out)
        deadline = time.monotonic() + 10
        while alive(zygote_pid) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert not alive(zygote_pid)
        time.sleep(4)  # past the preload: a zygote left reading the request would fork the run now
        assert not (pidfile.exists() and alive(int(pidfile.read_text() or 0))), "a run started after the Ctrl-C"
    finally:
        _kill_group(launcher.pid)


def test_a_preloaded_module_that_prints_does_not_garble_the_zygotes_replies(modules, tmp_path):
    """The zygote answered on its stdout, which is also where a preloaded module's print (a library's
    notice on import) went: the launcher read that line as the run's pid (ValueError), where a fresh
    process would have run. The print goes to the run's stream, not into the replies."""
    with zygote.forked_runs(["lt_chatty"]):
        assert zygote.run_module("lt_target", ["exit", "3"], str(tmp_path / "a.log"), dict(os.environ)) == 3
        assert zygote.run_module("lt_target", ["exit", "0"], str(tmp_path / "b.log"), dict(os.environ)) == 0
    assert "argv ['exit', '3']" in (tmp_path / "a.log").read_text()


def _kill_group(pid: int) -> None:
    """SIGKILL a launcher's whole process group (its zygote and runs), if it is still there."""
    try:
        os.killpg(pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
