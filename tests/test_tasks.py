"""core.stage.Tasks in process: the engine semdedup and reshard use below --spark-above."""

from __future__ import annotations

import os

import pytest

from laiontools.core.errors import InputError, task_error, user_error_from
from laiontools.core.stage import Tasks, wants_spark
from laiontools.testing.procs import alive


def _squares(items):
    for x in items:
        yield (x, x * x, os.getpid())


def _fails_on_three(items):
    for x in items:
        if x == 3:
            raise task_error(f"shard {x}: damaged, run `laiontools verify`")
        yield x


@pytest.mark.parametrize("processes", [False, True])
@pytest.mark.parametrize("workers", [1, 2, 3])
def test_map_keeps_item_order_and_runs_every_item_once(processes, workers):
    got = Tasks(None, workers).map(_squares, list(range(7)), processes=processes)
    assert [(x, y) for x, y, _ in got] == [(x, x * x) for x in range(7)]
    pids = {p for _, _, p in got}
    if processes and workers > 1:
        assert os.getpid() not in pids  # forked task processes did the work
    else:
        assert pids == {os.getpid()}


@pytest.mark.parametrize("processes", [False, True])
def test_a_task_error_reaches_the_caller_as_the_same_user_error(processes):
    with pytest.raises(Exception) as e:
        Tasks(None, 2).map(_fails_on_three, list(range(6)), processes=processes)
    err = user_error_from(e.value, InputError)
    assert isinstance(err, InputError) and str(err) == "shard 3: damaged, run `laiontools verify`"


def _dies_on_two(items):
    import signal

    for x in items:
        if x == 2:
            os.kill(os.getpid(), signal.SIGKILL)  # what the kernel's OOM killer does
        yield x


def test_a_task_process_that_dies_gives_one_clear_error():
    from laiontools.core.errors import UserError

    with pytest.raises(UserError, match="died abruptly.*re-run the same command"):
        Tasks(None, 2).map(_dies_on_two, list(range(5)), processes=True, description="download")


def _stateful(items):
    # one call per worker in pull mode: the id of this call tags every item it draws
    call = os.urandom(8).hex()
    for x in items:
        yield (x, call, os.getpid())


@pytest.mark.parametrize("processes", [False, True])
@pytest.mark.parametrize("workers", [1, 2, 3])
def test_pull_runs_every_item_once_with_one_call_per_worker(processes, workers):
    got = Tasks(None, workers).map(_stateful, list(range(11)), processes=processes, pull=True)
    assert sorted(x for x, _, _ in got) == list(range(11))  # each item once, whatever the order
    calls = {c for _, c, _ in got}
    assert 1 <= len(calls) <= workers  # state (the call) lasts across the items a worker draws
    if processes and workers > 1:
        assert os.getpid() not in {p for _, _, p in got}


def _slow_first(done_dir, items):
    import time

    for x in items:
        if x == 0:
            # one long item: it ends once the other process has run the 8 others (bounded: a test that
            # waits in vain fails on its count rather than hanging)
            for _ in range(3000):
                if len(os.listdir(done_dir)) >= 8:
                    break
                time.sleep(0.01)
        else:
            open(os.path.join(done_dir, str(x)), "w").close()
        yield (x, os.getpid())


def test_pull_gives_the_items_to_whichever_process_is_free(tmp_path):
    import functools

    got = Tasks(None, 2).map(functools.partial(_slow_first, str(tmp_path)), list(range(9)), processes=True,
                             pull=True)
    by_pid: dict[int, list[int]] = {}
    for x, pid in got:
        by_pid.setdefault(pid, []).append(x)
    # the process held by item 0 ran nothing else: the other drew all 8 while it was busy (with a fixed
    # share each, it would have had every other item, 5)
    assert sorted(x for v in by_pid.values() for x in v) == list(range(9))
    assert sorted(sorted(v) for v in by_pid.values()) == [[0], list(range(1, 9))]


@pytest.mark.parametrize("pull", [False, True])
def test_a_task_error_in_a_forked_process_keeps_its_traceback(pull):
    from laiontools.core.forkmap import RemoteTraceback

    with pytest.raises(Exception) as e:
        Tasks(None, 2).map(_fails_on_three, list(range(6)), processes=True, pull=pull)
    assert str(user_error_from(e.value, InputError)) == "shard 3: damaged, run `laiontools verify`"
    assert isinstance(e.value.__cause__, RemoteTraceback) and "_fails_on_three" in str(e.value.__cause__)


def _unpicklable(items):
    import threading

    for x in items:
        yield threading.Lock() if x == 1 else x


def test_a_result_that_cannot_travel_back_is_that_items_error():
    with pytest.raises(Exception, match="pickle"):
        Tasks(None, 2).map(_unpicklable, list(range(4)), processes=True)


@pytest.mark.parametrize("pull", [False, True])
def test_a_task_process_that_dies_gives_one_clear_error_also_when_pulling(pull):
    from laiontools.core.errors import UserError

    with pytest.raises(UserError, match="died abruptly"):
        Tasks(None, 2).map(_dies_on_two, list(range(5)), processes=True, pull=pull, description="reshard")


def test_threads_share_the_cores_among_tasks_at_once():
    cores = os.cpu_count() or 1
    t = Tasks(None, 2)
    assert t.threads(0, items=1) == cores
    assert t.threads(0, items=10) == max(1, cores // 2)
    assert t.threads(5, items=10) == 5
    assert Tasks(None, 1).map(_squares, []) == []


def test_wants_spark(monkeypatch):
    monkeypatch.delenv("LAIONTOOLS_SPARK_MASTER", raising=False)
    monkeypatch.delenv("PYSPARK_GATEWAY_PORT", raising=False)
    assert not wants_spark(None, 100, 1000)
    assert wants_spark(None, 1001, 1000)
    assert wants_spark(None, 1, 0) and wants_spark(None, 0, 0)  # 0: always, even for nothing
    assert not wants_spark(None, 10**12, -1)  # -1: only when a master is named
    assert wants_spark("local[2]", 1, -1)
    monkeypatch.setenv("LAIONTOOLS_SPARK_MASTER", "spark://h:7077")
    assert wants_spark(None, 1, -1)
    monkeypatch.delenv("LAIONTOOLS_SPARK_MASTER")
    monkeypatch.setenv("PYSPARK_GATEWAY_PORT", "1")  # under spark-submit
    assert wants_spark(None, 1, -1)


def test_wants_spark_counts_a_pool_only_when_the_answer_depends_on_it(monkeypatch):
    """A size given as a function (dedup and takedown count a pool's rows, maybe from parquet footers in an
    object store) is called only when no master decides and the bound is a size."""
    monkeypatch.delenv("LAIONTOOLS_SPARK_MASTER", raising=False)
    monkeypatch.delenv("PYSPARK_GATEWAY_PORT", raising=False)
    calls = []

    def size(n):
        return lambda: calls.append(n) or n

    assert wants_spark("local[2]", size(10**9), 1000) and wants_spark(None, size(10**9), 0)
    assert not wants_spark(None, size(10**9), -1)
    assert calls == []
    assert not wants_spark(None, size(999), 1000) and wants_spark(None, size(1001), 1000)
    assert calls == [999, 1001]


_CHILD = """
import os, sys, time
from laiontools.core.stage import Tasks

def slow(items):
    for x in items:
        open(os.path.join(sys.argv[1], f"task-{x}.pid"), "w").write(str(os.getpid()))
        for _ in range(600):  # bounded: 60 s at most, far beyond the test's wait
            time.sleep(0.1)
        yield x

Tasks(None, 2).map(slow, [0, 1], processes=True)
"""


@pytest.mark.skipif(not os.path.exists("/proc/self/stat"), reason="reads /proc (Linux)")
def test_forked_task_processes_die_with_a_killed_stage(tmp_path):
    # `kill -9` of the CLI left its forked task processes running: they went on writing into the output and
    # held its lock (inherited), so the re-run to resume was refused as "in use" by the killed pid. Here a
    # real process maps two slow tasks onto forked processes and is killed with SIGKILL once both started.
    import signal
    import subprocess
    import sys
    import time

    child = subprocess.Popen([sys.executable, "-c", _CHILD, str(tmp_path)])
    try:
        pids = []
        for _ in range(300):  # up to 30 s for both tasks to start
            pids = [int(p.read_text()) for p in tmp_path.glob("task-*.pid") if p.read_text()]
            if len(pids) == 2:
                break
            time.sleep(0.1)
        assert len(pids) == 2 and child.pid not in pids and all(alive(p) for p in pids)
        child.send_signal(signal.SIGKILL)
        child.wait(timeout=10)
        for _ in range(100):  # up to 10 s
            if not any(alive(p) for p in pids):
                break
            time.sleep(0.1)
        assert [p for p in pids if alive(p)] == []
    finally:
        child.kill()
        child.wait(timeout=10)
        for p in tmp_path.glob("task-*.pid"):
            try:
                os.kill(int(p.read_text()), signal.SIGKILL)
            except (ProcessLookupError, ValueError):
                pass


_CHILD_WITH_HELPER = """
import os, signal, sys, time
from laiontools.core.stage import Tasks

def task(items):
    for x in items:
        if x == 1:
            if os.fork() == 0:  # a helper process the task started (a library's own, forked without exec)
                open(os.path.join(sys.argv[1], "helper.pid"), "w").write(str(os.getpid()))
                time.sleep(60)  # outlives the task process: bounded, far beyond the test's wait
                os._exit(0)
            os.kill(os.getpid(), signal.SIGKILL)  # the task process is killed (the OOM killer)
        yield x

try:
    Tasks(None, 2).map(task, list(range(4)), processes=True, description="download")
except Exception as e:
    print(type(e).__name__, e, flush=True)
"""


def test_a_task_process_that_dies_leaving_a_child_of_its_own_is_reported_not_waited_on(tmp_path):
    # The map read each task process's result pipe to its end; a process the task had forked (a
    # library's helper) holds that pipe's write end too, so when the task process was killed the pipe
    # never ended while the helper lived, and the stage waited for the helper instead of reporting.
    import signal
    import subprocess
    import sys

    out = tmp_path / "out.txt"
    try:
        with open(out, "w") as f:  # (a file, not a pipe: the helper holds this process's output too)
            r = subprocess.run([sys.executable, "-c", _CHILD_WITH_HELPER, str(tmp_path)], stdout=f, stderr=subprocess.STDOUT,
                               timeout=20, start_new_session=True, check=False)
    except subprocess.TimeoutExpired:
        r = None
    finally:
        helper = tmp_path / "helper.pid"
        if helper.exists() and helper.read_text():
            try:
                os.kill(int(helper.read_text()), signal.SIGKILL)
            except ProcessLookupError:
                pass
    assert r is not None, "the map waited for the dead task process's helper (still waiting after 20 s)"
    assert "died abruptly" in out.read_text(), out.read_text()[-3000:]


def test_forked_tasks_run_while_the_stage_holds_more_than_1024_files():
    # select() cannot take a descriptor numbered 1024 or above: the pipes to the task processes get such
    # numbers when a stage already holds many files open (reshard's read-ahead over a large pool)
    import resource

    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < 1200:
        if hard != resource.RLIM_INFINITY and hard < 1200:
            pytest.skip(f"this process may open only {hard} files")
        resource.setrlimit(resource.RLIMIT_NOFILE, (1200, hard))
    held = [os.open(os.devnull, os.O_RDONLY) for _ in range(1100)]
    try:
        assert max(held) >= 1024
        got = Tasks(None, 2).map(_squares, list(range(5)), processes=True)
        assert [(x, y) for x, y, _ in got] == [(x, x * x) for x in range(5)]
    finally:
        for fd in held:
            os.close(fd)
        if soft < 1200:
            resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))


@pytest.mark.parametrize("processes", [False, True])
@pytest.mark.parametrize("workers", [1, 2])
@pytest.mark.parametrize("fails", [False, True])
def test_meanwhile_is_held_once_while_the_tasks_run(processes, workers, fails):
    import contextlib

    log: list[str] = []

    @contextlib.contextmanager
    def held():
        log.append("enter")
        try:
            yield
        finally:
            log.append("exit")

    fn = _fails_on_three if fails else _squares
    if fails:
        with pytest.raises(Exception, match="shard 3"):
            Tasks(None, workers).map(fn, list(range(5)), processes=processes, meanwhile=held)
    else:
        assert len(Tasks(None, workers).map(fn, list(range(5)), processes=processes, meanwhile=held)) == 5
    assert log == ["enter", "exit"]


def _stops_after_one(items):
    for x in items:
        yield x
        return  # a bug: the items this call did not draw would never run


@pytest.mark.parametrize("processes", [False, True])
@pytest.mark.parametrize("workers", [1, 2])
def test_a_task_function_that_returns_early_in_pull_mode_is_an_error_not_a_silent_drop(processes, workers):
    from laiontools.core.forkmap import NotAllDrawn

    with pytest.raises(NotAllDrawn, match=f"{workers} of 6 ran"):
        Tasks(None, workers).map(_stops_after_one, list(range(6)), processes=processes, pull=True)
    # a function that stops early but leaves nothing behind is fine: the other calls drew the rest
    assert sorted(Tasks(None, 2).map(_stops_after_one, [7, 8], processes=processes, pull=True)) == [7, 8]
    # without pull, a task's function may ignore its items (semdedup's k-means task takes one dummy item)
    assert Tasks(None, workers).map(lambda _: iter(["k-means"]), [0], processes=processes) == ["k-means"]
