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
