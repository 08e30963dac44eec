"""What /proc says of a process (Linux): the tests' one reader of ``/proc/<pid>/stat``.

A killed process whose parent died stays a zombie until a reaper (a container's init may be slow) waits
for it: it is gone for every purpose of a test, so ``alive`` counts it as dead."""

from __future__ import annotations

import os
from typing import NamedTuple


class Stat(NamedTuple):
    state: str  # R, S, D, Z, ...
    ppid: int
    pgrp: int


def stat(pid: int) -> Stat | None:
    """`pid`'s state, parent and process group; None when there is no such process."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            raw = f.read()
    except (FileNotFoundError, ProcessLookupError):
        return None
    # "pid (comm) state ppid pgrp ...": comm may hold spaces and parentheses, so split after its last ")"
    fields = raw.rsplit(b")", 1)[1].split()
    return Stat(fields[0].decode(), int(fields[1]), int(fields[2]))


def alive(pid: int) -> bool:
    """The process exists and is not a zombie."""
    s = stat(pid)
    return s is not None and s.state != "Z"


def group_alive(pgid: int) -> bool:
    """A process of group `pgid` exists that is not a zombie."""
    for name in os.listdir("/proc"):
        if name.isdigit():
            s = stat(int(name))
            if s is not None and s.pgrp == pgid and s.state != "Z":
                return True
    return False
