"""laiontools.core.zygote: runs forked from a process that imported their modules once (a study's trainers).

Each run must behave as `python -m module args` in a fresh process would: its argv, its own output file,
its exit code (negative for a signal), the launcher's per-run variables; and die with its launcher."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time

import pytest

from laiontools.core import zygote

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="fork and PR_SET_PDEATHSIG are Linux's")

_MODULES = {
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


def test_runs_are_forked_with_their_argv_output_exit_code_and_own_variables(modules, monkeypatch):
    logs = modules / "logs"
    with zygote.forked_runs(["lt_preloaded:ready"]) as z:
        assert zygote.run_module("lt_target", ["exit", "3"], str(logs / "a.log"), dict(os.environ)) == 3
        monkeypatch.setenv("LAIONTOOLS_ZYGOTE_TEST", "per run")  # a variable of laiontools' own: set in the child
        assert zygote.run_module("lt_target", ["exit", "0"], str(logs / "b.log"), dict(os.environ)) == 0
        assert zygote.run_module("lt_target", ["raise"], str(logs / "c.log"), dict(os.environ)) == 1
        assert zygote.run_module("lt_target", ["kill"], str(logs / "d.log"), dict(os.environ)) == -signal.SIGKILL
        monkeypatch.setenv("OMP_NUM_THREADS", "1")  # another variable: not what the zygote imported under
        assert zygote.run_module("lt_target", ["exit", "0"], str(logs / "e.log"), dict(os.environ)) is None
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
        assert _ppid(_ppid(run_pid)) == launcher.pid  # run <- zygote <- launcher
        launcher.kill()
        launcher.wait(timeout=60)
        deadline = time.monotonic() + 60
        while _alive(run_pid) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert not _alive(run_pid)
    finally:
        try:
            os.killpg(launcher.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass


def _ppid(pid: int) -> int:
    with open(f"/proc/{pid}/stat", "rb") as f:
        return int(f.read().rsplit(b")", 1)[1].split()[1])


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            return f.read().rsplit(b")", 1)[1].split()[0] != b"Z"
    except FileNotFoundError:
        return False
