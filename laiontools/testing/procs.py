"""What /proc says of a process (Linux): the tests' and benchmarks' one reader of ``/proc/<pid>/stat``
and ``/proc/<pid>/status`` (state, parent, group, children, memory).

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
    return any(s.pgrp == pgid and s.state != "Z" for s in _all_stats().values())


def status(pid: int | str = "self") -> dict[str, str]:
    """The fields of ``/proc/<pid>/status`` as text ("Name" -> "java", "VmRSS" -> "1234 kB"); {} when
    there is no such process."""
    try:
        with open(f"/proc/{pid}/status", "rb") as f:
            lines = f.read().decode("utf-8", "replace").splitlines()
    except (FileNotFoundError, ProcessLookupError):
        return {}
    return {k: v.strip() for k, _, v in (line.partition(":") for line in lines)}


def memory_kb(pid: int | str = "self", field: str = "VmRSS") -> int:
    """A memory field of ``/proc/<pid>/status`` in kB (VmRSS: resident now, VmHWM: its peak); 0 when
    the process is gone or has no such field (a zombie has none)."""
    v = status(pid).get(field)
    return int(v.split()[0]) if v else 0


def reset_peak() -> int:
    """Set this process's peak resident memory (VmHWM) to what it holds now (Linux 4.0+: ``/proc/self/clear_refs``),
    and return that, in bytes: :func:`peak_above` of it later is what the work in between added at its peak."""
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")
    return memory_kb("self", "VmRSS") * 1024


def peak_above(before: int) -> int:
    """This process's peak resident memory since :func:`reset_peak`, above `before` (its answer), in bytes."""
    return memory_kb("self", "VmHWM") * 1024 - before


def children(pid: int) -> list[int]:
    """The processes whose parent is `pid`, in pid order."""
    return sorted(c for c, s in _all_stats().items() if s.ppid == pid)


def descendants(pid: int) -> list[int]:
    """Every process below `pid` (children, their children, ...), from one pass over /proc."""
    below: dict[int, list[int]] = {}
    for c, s in _all_stats().items():
        below.setdefault(s.ppid, []).append(c)
    out, todo = [], [pid]
    while todo:
        for c in below.get(todo.pop(), []):
            out.append(c)
            todo.append(c)
    return sorted(out)


def _all_stats() -> dict[int, Stat]:
    out = {}
    for name in os.listdir("/proc"):
        if name.isdigit():
            s = stat(int(name))
            if s is not None:
                out[int(name)] = s
    return out
