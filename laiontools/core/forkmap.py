"""Tasks in forked processes: what :meth:`laiontools.core.stage.Tasks.map` runs in process for tasks whose
work is Python (parsing and writing tar members), which threads would serialize on one interpreter lock.

A few forked processes draw item numbers from one pipe as they go, so a process that finishes early
takes the next item instead of idling while another works through a fixed share. The function and the
items reach them by the fork; only results travel back, pickled, one pipe per process.

Against concurrent.futures' process pool (what this replaces): no manager thread, call queue or
per-process start-up handshake. A map of two trivial tasks took 25-31 ms with it and 13-16 ms here in a
process with pandas and pyarrow loaded, where a fork and an exit cost ~3 and ~6 ms (measured; the
reshard of a 2 % subset writes for ~0.3 s, so this was a tenth of it).
"""

from __future__ import annotations

import contextlib
import gc
import io
import os
import pickle
import select
import signal
import traceback
from collections.abc import Callable, Iterable, Iterator
from contextlib import AbstractContextManager
from typing import Any

# An item number in the work pipe: a fixed-size record. A read of one record by any of the processes
# is whole (the parent writes whole records, at most PIPE_BUF bytes a write, which the kernel keeps in one
# piece), so the processes never split or share one.
_REC = 4
_WRITE_MAX = 4096  # POSIX's least PIPE_BUF; a multiple of _REC

OK, ERR, DRAWN = "ok", "err", "drawn"


class TaskProcessDied(RuntimeError):
    """A task process ended without handing back its item's results (killed, out of memory)."""


def fork_map(fn: Callable[[Iterable[Any]], Iterable[Any]], items: list[Any], procs: int, pull: bool = False,
             meanwhile: Callable[[], AbstractContextManager[Any]] | None = None) -> list[Any]:
    """Run `fn` over `items` in `procs` forked processes; return the results.

    ``pull`` False: ``fn(iter([item]))`` for each item, the results in item order (as a map over the
    items). ``pull`` True: ``fn`` once per process, over an iterator that draws the next item when it is
    asked for one, so per-process state (open files, buffers, a thread finishing the last unit) lasts
    across items; the results come in the order the processes made them.

    Every item is run even when one fails (as a process pool's map): the error raised is the first
    item's error (in item order; ``pull``: the first one reported), after all processes ended. A
    process that died without reporting raises :class:`TaskProcessDied`; in ``pull`` mode, calls of
    ``fn`` that together left items undrawn raise :class:`NotAllDrawn`.

    ``meanwhile``: a context this process holds while the task processes run, entered once they are
    forked (a thread started before the forks would compete with them for the interpreter lock).
    """
    if not items:
        return []
    if len(items) >= 1 << (8 * _REC):
        raise ValueError(f"{len(items)} items are more than a forked map takes")
    parent = os.getpid()
    work_r, work_w = os.pipe()
    kids: dict[int, int] = {}  # read end of a process's result pipe -> its pid
    collected = False
    try:
        # The objects this process holds now, out of the collector's sight in the task processes (as
        # Python's gc docs advise before a fork without exec): a full collection there walked, and so
        # copied page by page, the whole inherited heap (0.5-22 ms a process in reshard; no difference in
        # its wall time in 17 alternated runs, but memory the processes no longer copy).
        gc.freeze()
        try:
            for _ in range(max(1, min(procs, len(items)))):
                res_r, res_w = os.pipe()
                pid = os.fork()
                if pid == 0:
                    _child(fn, items, pull, parent, work_r, res_w, [work_w, res_r, *kids])  # never returns
                os.close(res_w)
                kids[res_r] = pid
        finally:
            gc.unfreeze()
        os.close(work_r)
        work_r = -1
        with meanwhile() if meanwhile is not None else contextlib.nullcontext():
            got = _feed_and_collect(work_w, len(items), kids)
        work_w = -1  # (closed by _feed_and_collect)
        collected = True
    finally:
        for fd in (work_r, work_w):
            if fd >= 0:
                os.close(fd)
        for fd in kids:
            os.close(fd)
        # every process has closed its pipe (it is exiting) unless this process was interrupted: those are stopped
        died = _reap(list(kids.values()), stop=not collected)
    return _results(got, len(items), pull, died)


def _child(fn: Callable[[Iterable[Any]], Iterable[Any]], items: list[Any], pull: bool, parent: int, work_r: int,
           res_w: int, others: list[int]) -> None:
    """A task process: draw item numbers, run `fn`, send (item or None, status, value) records; exit."""
    code = 1
    try:
        for fd in others:
            os.close(fd)
        from laiontools.core.launch import die_with_parent

        # die with the stage's process: a `kill -9` of the CLI otherwise left its task processes writing
        # into the output and holding its lock (inherited), so the re-run to resume was refused "in use"
        die_with_parent(9)
        if os.getppid() != parent:  # the parent was killed between the fork and here
            os._exit(1)
        with open(res_w, "wb") as out:

            def send(rec: tuple[Any, str, Any]) -> None:
                try:
                    data = pickle.dumps(rec, protocol=pickle.HIGHEST_PROTOCOL)
                except Exception as e:  # noqa: BLE001 - a result that cannot be pickled is the item's error
                    data = pickle.dumps((rec[0], ERR, _portable(e)), protocol=pickle.HIGHEST_PROTOCOL)
                out.write(data)
                out.flush()

            count = [0]

            def drawn() -> Iterator[int]:
                while True:
                    b = os.read(work_r, _REC)
                    if len(b) != _REC:  # end of the pipe: no items left
                        return
                    count[0] += 1
                    yield int.from_bytes(b, "little")

            if pull:
                try:
                    for r in fn(items[k] for k in drawn()):
                        send((None, OK, r))
                except BaseException as e:  # noqa: BLE001 - handed to the caller
                    send((None, ERR, _portable(e)))
                # how many items this process took: a `fn` that returned before its iterator ended left
                # items in the pipe that no process ran, which the caller must hear of
                send((None, DRAWN, count[0]))
            else:
                for k in drawn():
                    try:
                        send((k, OK, list(fn(iter([items[k]])))))
                    except BaseException as e:  # noqa: BLE001 - handed to the caller
                        send((k, ERR, _portable(e)))
        code = 0
    finally:
        os._exit(code)


def _feed_and_collect(work_w: int, n: int, kids: dict[int, int]) -> dict[int, bytearray]:
    """Write the item numbers into the work pipe as the processes draw them (then close it: the end of the
    items), and read every result pipe (`kids`: read end -> pid) to its end, or, once its process has
    exited, to what it holds; the bytes each process sent."""
    fds = list(kids)
    todo = memoryview(b"".join(k.to_bytes(_REC, "little") for k in range(n)))
    os.set_blocking(work_w, False)
    got = {fd: bytearray() for fd in fds}
    # poll, not select: a stage may hold more than FD_SETSIZE (1024) files open, and the pipes then get
    # descriptor numbers select cannot take
    poller = select.poll()
    for fd in fds:
        poller.register(fd, select.POLLIN)
    live = set(fds)
    # A result pipe ends when every holder of its write end has closed it: the task process, and any
    # process it forked that lives on (a library's helper). So each task process's exit is watched too
    # (a pidfd, readable once it has exited): then all it sent is in the pipe, read without waiting.
    exits: dict[int, int] = {}  # pidfd -> the read end of its process's result pipe
    try:
        for fd, pid in kids.items():
            try:
                exits[os.pidfd_open(pid)] = fd
            except (AttributeError, OSError):  # (no pidfd: Linux before 5.3, other systems) the pipe's end alone
                pass
        for pfd in exits:
            poller.register(pfd, select.POLLIN)
        while live:
            if todo:
                try:
                    todo = todo[os.write(work_w, todo[:_WRITE_MAX]) :]
                except BlockingIOError:
                    pass  # full: the processes are busy
                except BrokenPipeError:  # every process is gone: what they did not take is reported lost
                    todo = todo[:0]
                if todo:
                    poller.register(work_w, select.POLLOUT)
                else:
                    os.close(work_w)
                    work_w = -1
            for fd, _ in poller.poll():
                if fd == work_w:
                    poller.unregister(work_w)  # writable again: the loop writes and registers it if needed
                    continue
                if fd in exits:  # the process exited: read what its pipe holds, without waiting for its end
                    rfd = exits.pop(fd)
                    poller.unregister(fd)
                    os.close(fd)
                    if rfd in live:
                        os.set_blocking(rfd, False)
                        with contextlib.suppress(BlockingIOError):
                            while chunk := os.read(rfd, 1 << 16):
                                got[rfd] += chunk
                        live.discard(rfd)
                        poller.unregister(rfd)
                    continue
                if fd not in live:
                    continue
                chunk = os.read(fd, 1 << 16)
                if chunk:
                    got[fd] += chunk
                else:
                    live.discard(fd)
                    poller.unregister(fd)
    finally:
        if work_w >= 0:
            os.close(work_w)
        for pfd in exits:
            os.close(pfd)
    return got


def _reap(pids: list[int], stop: bool) -> bool:
    """Wait for the task processes to exit (`stop`: kill them first, after an error in this process);
    whether one was ended by a signal or exited with an error."""
    died = False
    for pid in pids:
        try:
            if stop:
                os.kill(pid, signal.SIGKILL)  # (a process that has exited stays until reaped: no error)
            _, status = os.waitpid(pid, 0)
            died |= not os.WIFEXITED(status) or os.WEXITSTATUS(status) != 0
        except ChildProcessError:
            pass
    return died


def _results(got: dict[int, bytearray], n: int, pull: bool, died: bool) -> list[Any]:
    by_item: list[Any] = [None] * n
    flat: list[Any] = []
    errors: list[tuple[int, BaseException]] = []
    drawn = 0
    for buf in got.values():
        f = io.BytesIO(buf)
        while f.tell() < len(buf):
            try:
                k, status, value = pickle.load(f)
            except Exception:  # noqa: BLE001 - a record cut short: its process died while sending it
                died = True
                break
            if status == DRAWN:
                drawn += value
            elif status == ERR:
                err, tb = value
                err.__cause__ = RemoteTraceback(tb)  # where it was raised, as a process pool gives it
                errors.append((k if k is not None else -1, err))
            elif pull:
                flat.append(value)
            else:
                by_item[k] = value
    if errors:
        raise min(errors, key=lambda e: e[0])[1]
    if died or (not pull and any(r is None for r in by_item)):
        raise TaskProcessDied("a task process died without finishing its items")
    if pull:
        check_drawn(drawn, n)
    return flat if pull else [r for rs in by_item for r in rs]


class NotAllDrawn(RuntimeError):
    """In pull mode, every call of the task function returned while items were left (a bug in it: the
    items it never drew would be silently missing from the results)."""


def check_drawn(drawn: int, n: int) -> None:
    """Raise :class:`NotAllDrawn` unless the pull-mode calls drew all `n` items (in processes or threads)."""
    if drawn != n:
        raise NotAllDrawn(f"the task function returned before drawing every item: {drawn} of {n} ran")


class RemoteTraceback(Exception):
    """The traceback of an error raised in a task process (the cause of the error raised here)."""

    def __init__(self, tb: str) -> None:
        super().__init__(tb)
        self.tb = tb

    def __str__(self) -> str:
        return self.tb


def _portable(e: BaseException) -> tuple[BaseException, str]:
    """(`e`, its traceback as text): `e` itself if it survives pickling (the caller gets the same
    exception), else a RuntimeError with its type and message."""
    tb = "".join(traceback.format_exception(e))
    try:
        pickle.loads(pickle.dumps(e))
    except Exception:  # noqa: BLE001 - an exception that cannot travel: its text does
        e = RuntimeError(f"{type(e).__name__}: {e}")
    return e, f'\n"""\n{tb}"""'
