"""laiontools.testing.procs: the tests' reader of /proc/<pid>/stat, checked against what the kernel
tells a process of itself and its children through other calls."""

from __future__ import annotations

import os
import signal
import subprocess
import sys

import pytest

from laiontools.testing import procs

pytestmark = pytest.mark.skipif(not os.path.exists("/proc/self/stat"), reason="reads /proc (Linux)")


def test_state_parent_and_group_of_a_live_a_zombie_and_a_gone_process():
    # a child whose name holds ") " (comm is free text: the reader must split after its last ")")
    code = "import time\nopen('/proc/self/comm', 'w').write('a) b) c')\nprint(1, flush=True)\ntime.sleep(60)"
    child = subprocess.Popen([sys.executable, "-c", code],
                             stdout=subprocess.PIPE, start_new_session=True)
    try:
        assert child.stdout.readline() == b"1\n"
        s = procs.stat(child.pid)
        assert (s.ppid, s.pgrp) == (os.getpid(), os.getpgid(child.pid)) == (os.getpid(), child.pid)
        assert s.state in "RS" and procs.alive(child.pid) and procs.group_alive(child.pid)
        os.kill(child.pid, signal.SIGKILL)
        os.waitid(os.P_PID, child.pid, os.WEXITED | os.WNOWAIT)  # dead, not yet reaped: a zombie
        assert procs.stat(child.pid).state == "Z"
        assert not procs.alive(child.pid) and not procs.group_alive(child.pid)
    finally:
        child.kill()
        child.wait()
    assert procs.stat(child.pid) is None and not procs.alive(child.pid)
    me = procs.stat(os.getpid())
    assert (me.ppid, me.pgrp) == (os.getppid(), os.getpgrp())


def test_status_memory_and_descendants_of_a_process_tree():
    """A child that fills 200 MB and starts a grandchild: its status names it, its resident memory holds the
    200 MB (written byte by byte, so resident), children() lists the child alone and descendants() both;
    a gone process has no status and no memory."""
    grand = "import time; print(1, flush=True); time.sleep(60)"
    code = ("import subprocess, sys, time\nopen('/proc/self/comm', 'w').write('lt-procs-test')\nfill = b'x' * (200 << 20)\n"
            f"g = subprocess.Popen([sys.executable, '-c', {grand!r}], stdout=subprocess.PIPE)\ng.stdout.readline()\n"
            "print(g.pid, flush=True)\ntime.sleep(60)")
    child = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, start_new_session=True)
    try:
        grandchild = int(child.stdout.readline())
        assert procs.status(child.pid)["Name"] == "lt-procs-test"
        assert procs.memory_kb(child.pid, "VmRSS") >= 200 << 10
        assert procs.memory_kb(child.pid, "VmHWM") >= procs.memory_kb(child.pid, "VmRSS")
        assert procs.memory_kb(grandchild, "VmRSS") < 200 << 10
        assert child.pid in procs.children(os.getpid()) and grandchild not in procs.children(os.getpid())
        assert procs.children(child.pid) == [grandchild]
        assert {child.pid, grandchild} <= set(procs.descendants(os.getpid()))
        assert procs.descendants(child.pid) == [grandchild]
    finally:
        os.killpg(child.pid, signal.SIGKILL)
        child.wait()
    assert procs.status(child.pid) == {} and procs.memory_kb(child.pid) == 0
