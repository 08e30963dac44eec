"""The one stage contract: a typed config, ``run(cfg, spark=None) -> StageResult``, one CLI main.

Every stage module (``laiontools/stages/<name>.py``) declares::

    STAGE = "reshard"                      # the name in cli.STAGES
    CONFIG = ReshardConfig                 # a StageConfig dataclass; required settings and path checks in validate()

    @stage_entry(STAGE)
    def run(cfg: ReshardConfig, spark: Any = None) -> StageResult: ...

and optionally ``build_parser()`` when some flag needs more than :func:`~laiontools.core.config.add_config_args`
gives. :func:`stage_main` is the CLI of every stage (parse flags + ``--config`` YAML, ``run``, print the
summary), so adding a stage is one module plus one line in ``cli.STAGES``.

``stage_entry`` is the runner that every call goes through (CLI, ``jobs/`` under spark-submit, the demo,
the study, tests). It applies the one output rule and lock (:func:`claimed_output`), times the call and
stamps the result with the stage name. Spark stages take a
:class:`SparkStageConfig` (its ``master`` and ``spark_conf`` settings) and get their session from
:func:`stage_spark`: the session passed in, else spark-submit's or the active one, else a new embedded one
that is stopped when the stage returns.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import functools
import importlib
import json
import logging
import os
import socket
import time
import uuid
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager, nullcontext
from typing import Any, TypeVar

from laiontools.contracts import layout
from laiontools.core.config import StageConfig, add_config_args, config_from_args
from laiontools.core.errors import UserError, environment_error

log = logging.getLogger(__name__)

C = TypeVar("C", bound=StageConfig)


@dataclasses.dataclass
class StageResult:
    """What every stage's ``run`` returns.

    ``outputs``: name -> path of what the stage wrote (``manifest``, ``report``, ...); ``counts``: name ->
    number (rows, shards, duplicates, ...); ``timings``: name -> seconds (``total`` is set by the runner);
    ``details``: the stage's own result (the report dict, the subset rows, ...) for callers that need
    more; ``summary``: the text the CLI prints; ``ok``: False when the stage finished but left some work
    failed (listed in its report); the CLI then exits 1.
    """

    stage: str = ""
    outputs: dict[str, str] = dataclasses.field(default_factory=dict)
    counts: dict[str, int] = dataclasses.field(default_factory=dict)
    timings: dict[str, float] = dataclasses.field(default_factory=dict)
    details: Any = None
    summary: str = ""
    ok: bool = True

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


@dataclasses.dataclass
class SparkStageConfig(StageConfig):
    """Settings every Spark stage shares; the only place a Spark master is chosen.

    ``master`` is used only when this process has no session yet (not under spark-submit, whose
    ``--master`` wins); unset, ``LAIONTOOLS_SPARK_MASTER`` or ``local[*]`` applies (core/spark.py).
    """

    master: str | None = dataclasses.field(
        default=None, metadata={"help": "Spark master for a new embedded session (default: $LAIONTOOLS_SPARK_MASTER "
                                         "or local[*]; under spark-submit its --master applies)"})
    spark_conf: dict[str, str] = dataclasses.field(
        default_factory=dict, metadata={"help": "Spark settings for a new embedded session (YAML mapping)"})


# Settings that choose where a stage runs, not what it writes: never part of an output's identity.
RUNTIME_SETTINGS = frozenset({"master", "spark_conf", "spark_above"})


@contextmanager
def stage_spark(cfg: StageConfig, spark: Any = None, app_name: str = "laiontools") -> Iterator[Any]:
    """The SparkSession a stage runs on: ``spark`` if given, else one from :func:`core.spark.spark_session`
    (spark-submit's or the active one, left running; or a new one on ``cfg.master``, stopped on exit)."""
    if spark is not None:
        yield spark
        return
    from laiontools.core.spark import spark_session

    master = getattr(cfg, "master", None)
    conf = dict(getattr(cfg, "spark_conf", None) or {}) or None
    with spark_session(master, app_name=app_name, conf=conf) as s:
        yield s


class _Drawn:
    """An iterator over `items` that threads share: each item goes to one of them."""

    def __init__(self, items: list[Any]) -> None:
        import threading

        self.it, self.lock, self.n, self.drawn = iter(items), threading.Lock(), len(items), 0

    def __iter__(self) -> _Drawn:
        return self

    def __next__(self) -> Any:
        with self.lock:
            item = next(self.it)
            self.drawn += 1
            return item

    def check(self) -> None:
        """Every item was drawn (else the task function returned early and items were never run)."""
        from laiontools.core.forkmap import check_drawn

        check_drawn(self.drawn, self.n)


class Tasks:
    """Where a stage's tasks run: Spark (``mapPartitions`` over the items) or, with no session, in this
    process, a few at a time (threads, or forked processes for Python-bound tasks). The task functions are the same either way (they write their files and
    their completion markers themselves), so the outputs and the resume points do not depend on it."""

    def __init__(self, spark: Any = None, workers: int = 0) -> None:
        self.spark = spark
        self.workers = workers or max(1, os.cpu_count() or 1)  # in-process: tasks at once

    @property
    def local(self) -> bool:
        return self.spark is None

    def threads(self, requested: int = 0, items: int = 1) -> int:
        """BLAS/faiss threads per task: in process, the cores shared by the tasks that run at once (a
        map over `items`); on Spark, :func:`core.spark.threads_per_task`."""
        if requested > 0:
            return requested
        if self.spark is None:
            return max(1, (os.cpu_count() or 1) // max(1, min(self.workers, items)))
        from laiontools.core.spark import threads_per_task

        return threads_per_task(self.spark, 0)

    def parquet_codec(self) -> str:
        """The codec of the parquet files the tasks write through pyarrow: on Spark the session's
        (:func:`core.storage.spark_parquet_codec`, as Spark's own writer's), in process PARQUET_CODEC.
        A string, for the tasks' context: the session does not travel."""
        from laiontools.core.storage import PARQUET_CODEC, spark_parquet_codec

        return PARQUET_CODEC if self.spark is None else spark_parquet_codec(self.spark)

    def map(self, fn: Callable[[Iterable[Any]], Iterable[Any]], items: list[Any], partitions: int = 0,
            description: str | None = None, processes: bool = False, pull: bool = False,
            meanwhile: Callable[[], Any] | None = None) -> list[Any]:
        """``fn(items of one partition) -> results``, over every item; the results in a list.

        In process, `processes`: tasks whose work is mostly Python (parsing and writing tar members)
        run in forked worker processes (:mod:`laiontools.core.forkmap`), since threads would share one
        interpreter lock; `fn` and the items reach them by the fork, only results travel back. Otherwise
        threads. `pull`: in process, ``fn`` runs once per worker over the items it draws one at a time (state
        kept across items; results in the order they were made, not item order); on Spark, as without.
        `meanwhile`: in process, a context manager factory; this process holds its context while the
        tasks run (e.g. a thread reading ahead for them)."""
        if self.spark is None:
            if processes and hasattr(os, "fork") and len(items) >= 2 and self.workers >= 2:
                from laiontools.core.forkmap import TaskProcessDied, fork_map

                try:
                    return fork_map(fn, items, self.workers, pull=pull, meanwhile=meanwhile)
                except TaskProcessDied as e:
                    # a task process died without raising (killed, out of memory): what the finished tasks
                    # wrote is kept behind their markers, so a re-run resumes
                    raise UserError(f"a task process of {description or 'this stage'} died abruptly (killed, or out "
                                    f"of memory?); re-run the same command to resume, or give fewer tasks at once "
                                    f"or a Spark master") from e
            if len(items) < 2 or self.workers < 2:
                if not items:
                    return []
                with meanwhile() if meanwhile is not None else nullcontext():
                    one = _Drawn(items)
                    out = list(fn(one))
                    if pull:  # (a partition's function may ignore its items, as semdedup's k-means task does)
                        one.check()
                    return out
            # numpy, faiss, pyarrow and file I/O release the GIL: a few threads keep the cores busy
            # between one task's BLAS calls (each task writes its own files and marker, as on Spark)
            from concurrent.futures import ThreadPoolExecutor

            n = min(self.workers, len(items))
            with meanwhile() if meanwhile is not None else nullcontext(), \
                    ThreadPoolExecutor(n, thread_name_prefix="laiontools-task") as ex:
                if pull:
                    shared = _Drawn(items)
                    out = [r for part in ex.map(lambda _: list(fn(shared)), range(n)) for r in part]
                    shared.check()
                    return out
                return [r for part in ex.map(lambda it: list(fn(iter([it]))), items) for r in part]
        sc = self.spark.sparkContext
        if description:
            sc.setJobDescription(description)
        n = partitions or min(len(items), 4 * max(1, sc.defaultParallelism))
        return sc.parallelize(items, max(1, min(n, len(items)))).mapPartitions(fn).collect()


def wants_spark(master: str | None, size: int | Callable[[], int], above: int) -> bool:
    """Spark when a master is named (``--master``, ``$LAIONTOOLS_SPARK_MASTER``), under spark-submit, or
    when ``size`` is over ``above`` (``above`` 0: always; -1: only when a master is named). Below it,
    Spark's fixed cost (JVM, Python workers, a job per step: seconds) exceeds the work it spreads.
    ``size`` may be a function, called only when the answer depends on it (counting a pool's rows can
    mean reading parquet footers from an object store)."""
    from laiontools.core.spark import under_spark_submit

    if master or os.environ.get("LAIONTOOLS_SPARK_MASTER") or under_spark_submit():
        return True
    if above <= 0:
        return above == 0
    return (size() if callable(size) else size) > above


@contextmanager
def stage_tasks(cfg: StageConfig, spark: Any = None, app_name: str = "laiontools", size: int | Callable[[], int] = 0,
                spark_above: int = 0) -> Iterator[Tasks]:
    """:class:`Tasks` for a stage: on ``spark`` if given, else on :func:`stage_spark`'s session when
    :func:`wants_spark` says so, else in this process (no JVM started)."""
    if spark is None and not wants_spark(getattr(cfg, "master", None), size, spark_above):
        yield Tasks(None)
        return
    with stage_spark(cfg, spark, app_name=app_name) as sp:
        yield Tasks(sp)


def stage_entry(
    name: str, *, accepts: Iterable[str] = (), output: str | None = "output", output_kind: str = "dir",
) -> Callable[[Callable[..., StageResult]], Callable[..., StageResult]]:
    """Make ``fn(cfg, spark=None) -> StageResult`` a stage's ``run``: every call goes through here.

    ``output`` names the config field holding the stage's output (a folder, or a file when
    ``output_kind="file"``); the call runs inside :func:`claimed_output` for it. ``accepts``: other
    stages whose output this one may continue (prepare inside a download's pool, calibrate in a dedup folder).
    """
    owners = frozenset({name, *accepts})

    def wrap(fn: Callable[..., StageResult]) -> Callable[..., StageResult]:
        @functools.wraps(fn)
        def run(cfg: StageConfig, spark: Any = None) -> StageResult:
            t0 = time.time()
            path = getattr(cfg, output, None) if output else None
            with claimed_output(path, name, owners, output_kind) if path else nullcontext():
                try:
                    result = fn(cfg, spark)
                except UserError:
                    raise
                except Exception as e:
                    # A full disk / quota / read-only file system that surfaced without a file name (a
                    # child process's log, torch.save's writer) is named by this stage's output, which
                    # the CLI cannot know when it came from a --config file.
                    fault = environment_error(e, path) if path else None
                    if fault is None:
                        raise
                    raise fault from e
            result.stage = name
            result.timings.setdefault("total", round(time.time() - t0, 3))
            return result

        run.stage_name = name  # type: ignore[attr-defined]
        return run

    return wrap


# ----------------------------------------------------------------------------------------------
# The output rule and the output lock (issue #16): one place for every stage.


class OutputRefused(UserError):
    """The output exists and is not this stage's output: refused before anything in it was touched."""


class OutputLocked(UserError):
    """Another run holds the output's lock."""


# Lock files held by this process (path -> depth) and, through the environment, by an ancestor that
# launched this process to work on the same output (embed --engine torchrun's workers).
_HELD: dict[str, int] = {}
_HELD_ENV = "LAIONTOOLS_HELD_LOCKS"
# Lock paths in _HELD_ENV are separated by newlines: os.pathsep (":") is inside every URL ("s3://..."),
# and a newline is in no path or URL we write.
_HELD_SEP = "\n"
_HOST = socket.gethostname()


def _fs(path: str) -> tuple[Any, str]:
    from laiontools.core.storage import url_to_fs

    return url_to_fs(path)


def _is_local(fs: Any) -> bool:
    from laiontools.core.storage import is_local

    return is_local(fs)


def output_paths(path: str, kind: str = "dir") -> tuple[str, str]:
    """(ownership marker, lock file) of an output: inside a folder, or hidden beside a file output."""
    fs, p = _fs(path)
    if _is_local(fs):
        p = os.path.abspath(p)
    p = p.rstrip("/")
    proto = path.split("://", 1)[0] + "://" if "://" in path and not _is_local(fs) else ""
    if kind == "file":
        head, _, name = p.rpartition("/")
        return f"{proto}{head}/.{name}{layout.OUTPUT_MARKER}", f"{proto}{head}/.{name}{layout.OUTPUT_LOCK}"
    return f"{proto}{p}/{layout.OUTPUT_MARKER}", f"{proto}{p}/{layout.OUTPUT_LOCK}"


def _read_json_or_none(path: str) -> Any:
    fs, p = _fs(path)
    try:
        with fs.open(p, "rb") as f:
            return json.loads(f.read() or b"null")
    except (FileNotFoundError, ValueError, UnicodeDecodeError):
        return None


def check_output(path: str, stage: str, owners: Iterable[str] = (), kind: str = "dir") -> None:
    """The output rule. Go on for a new folder, an empty one, or one this stage (or a stage in `owners`)
    made; raise :class:`OutputRefused` for anything else. Reads only: nothing is created or changed.

    A folder's owner is recorded in its hidden ownership marker when a stage first claims it; hidden
    entries (the marker, the lock, ``.DS_Store``) do not make a folder non-empty. For a file output
    (``kind="file"``): a new path, or a file this stage wrote (marker beside it).
    """
    owners = frozenset({stage, *owners})
    fs, p = _fs(path)
    marker, _ = output_paths(path, kind)
    if not fs.exists(p):
        return
    if kind == "file":
        if fs.isdir(p):
            raise OutputRefused(f"output {path} is a folder; `laiontools {stage}` writes a file there: give a file path")
        entries = [p]
    else:
        if not fs.isdir(p):
            raise NotADirectoryError(f"output {path} exists and is a file; give a folder path (new or existing)")
        entries = [e for e in fs.ls(p, detail=False) if not e.rstrip("/").rsplit("/", 1)[-1].startswith(".")]
    if not entries:
        return
    owner = _read_json_or_none(marker)
    what = "file" if kind == "file" else "folder"
    if not isinstance(owner, dict) or "stage" not in owner:
        raise OutputRefused(
            f"output {what} {path} is not empty and holds no {layout.OUTPUT_MARKER}: it is not the output of "
            f"`laiontools {stage}`; give an empty or new {what} (nothing in it was touched)"
        )
    if owner["stage"] not in owners:
        raise OutputRefused(
            f"output {what} {path} holds the output of `laiontools {owner['stage']}`, not of `laiontools {stage}`; "
            f"give an empty or new {what} (nothing in it was touched)"
        )


def _lock_info(stage: str) -> dict[str, Any]:
    now = datetime.datetime.now(datetime.UTC)
    return {"host": _HOST, "pid": os.getpid(), "stage": stage, "started": now.isoformat(timespec="seconds"),
            "token": uuid.uuid4().hex}


def _locked_error(output: str, lock: str, info: dict[str, Any] | None) -> OutputLocked:
    info = info or {}
    return OutputLocked(
        f"output {output} is in use by another run: `laiontools {info.get('stage', '?')}` on host "
        f"{info.get('host', '?')}, pid {info.get('pid', '?')}, started {info.get('started', '?')} (lock {lock}); "
        f"wait for it to finish or stop it. If that run is gone (another host that was shut down), delete the lock file."
    )


def _stale(info: dict[str, Any] | None) -> bool:
    """A lock left by a dead process of this host (killed run; its pid now free, a zombie, or another
    process's): safe to take over."""
    from laiontools.core.storage import pid_alive

    return (bool(info) and info.get("host") == _HOST and isinstance(info.get("pid"), int)
            and not pid_alive(info["pid"], info.get("started") if isinstance(info.get("started"), str) else None))


@contextmanager
def _flock(lock: str, output: str, stage: str) -> Iterator[None]:
    """Local lock: an flock on the lock file, held while the stage runs (the kernel drops it when the
    process dies, so a killed run's lock is free); the file says who holds it, for the refusal message."""
    import fcntl

    for _ in range(5):  # retries only when another process replaced the file between open and flock
        fd = os.open(lock, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            raise _locked_error(output, lock, _read_json_or_none(lock)) from None
        except OSError:  # the file system has no flock (some FUSE/Lustre mounts): the pid protocol
            os.close(fd)
            with _content_lock(lock, output, stage):
                yield
            return
        try:
            same = os.stat(lock).st_ino == os.fstat(fd).st_ino
        except FileNotFoundError:
            same = False
        if same:
            break
        os.close(fd)  # the holder we waited on removed the file we opened: lock the new one
    else:  # pragma: no cover - needs five racing runs
        raise _locked_error(output, lock, _read_json_or_none(lock))
    try:
        old = _read_json_or_none(lock)
        if old:
            log.warning("%s: taking over the lock of a run that is gone (%s pid %s, started %s)",
                        output, old.get("host"), old.get("pid"), old.get("started"))
        info = json.dumps(_lock_info(stage)).encode()
        os.ftruncate(fd, 0)
        os.pwrite(fd, info, 0)
        os.fsync(fd)
        yield
    finally:
        try:
            if os.stat(lock).st_ino == os.fstat(fd).st_ino:
                os.unlink(lock)
        except FileNotFoundError:
            pass
        os.close(fd)  # releases the flock


@contextmanager
def _content_lock(lock: str, output: str, stage: str) -> Iterator[None]:
    """Object stores (and file systems without flock): a lock object naming host and pid. Best effort:
    create-if-absent is not atomic on every store, so the token is read back to detect a lost race."""
    fs, p = _fs(lock)
    seen = fs.info(p) if fs.exists(p) else None
    old = _read_json_or_none(lock) if seen is not None else None
    if old is not None:
        if not _stale(old):
            raise _locked_error(output, lock, old)
        log.warning("%s: taking over the lock of a run that is gone (%s pid %s, started %s)",
                    output, old.get("host"), old.get("pid"), old.get("started"))
    info = _lock_info(stage)
    if not _put_lock(fs, p, lock, json.dumps(info).encode(), seen):
        raise _locked_error(output, lock, _read_json_or_none(lock))  # another run wrote it since we looked
    now = _read_json_or_none(lock)
    if not now or now.get("token") != info["token"]:
        raise _locked_error(output, lock, now)
    try:
        yield
    finally:
        now = _read_json_or_none(lock)
        if now and now.get("token") == info["token"]:
            from laiontools.core.storage import rm_path

            rm_path(fs, p)


def _put_lock(fs: Any, p: str, lock: str, data: bytes, seen: dict[str, Any] | None) -> bool:
    """Write the lock object only if it is still as this run saw it: absent (a create that fails where the
    object exists: S3's If-None-Match, GCS's ifGenerationMatch=0), or, taking over a stale lock on S3, the
    same object (If-Match its ETag). False: another run wrote the lock in between. Where a store refuses
    the condition itself (:func:`_condition_refused`), a plain write (the token read back after catches some
    of those races). Any other refusal (access denied, a busy store, no endpoint) is one StorageError
    naming the lock, never a plain write instead."""
    from laiontools.core.storage import store_error, store_errors

    etag = (seen or {}).get("ETag")
    kwargs: dict[str, Any] = {"mode": "create"} if seen is None else ({"IfMatch": etag} if etag and hasattr(fs, "call_s3") else {})
    try:
        fs.pipe_file(p, data, **kwargs)
    except FileExistsError:  # If-None-Match / ifGenerationMatch=0: the object exists now
        return False
    except Exception as e:
        if kwargs and _precondition_failed(e):
            return False
        refused = _condition_refused(e) if kwargs else None
        if refused is None:
            err = store_error(e, lock)
            if err is None:
                raise
            raise err from e
        _note_no_condition(lock, refused)
        with store_errors(lock):
            fs.pipe_file(p, data)
    return True


def _store_answer(e: BaseException) -> tuple[int | None, str] | None:
    """(HTTP status, error code) of the first store answer (botocore's ClientError) in `e`'s chain."""
    err: BaseException | None = e
    while err is not None:
        resp = getattr(err, "response", None)
        if isinstance(resp, dict) and isinstance(resp.get("Error"), dict):
            return (resp.get("ResponseMetadata") or {}).get("HTTPStatusCode"), str(resp["Error"].get("Code"))
        err = err.__cause__ or err.__context__
    return None


def _precondition_failed(e: BaseException) -> bool:
    """Whether a store refused a conditional write because the object changed (412, or S3's 409 for a
    conditional write that raced another)."""
    said = _store_answer(e)
    return said is not None and said[1] in ("PreconditionFailed", "412", "ConditionalRequestConflict", "409")


# What a store without conditional writes answers a PUT carrying If-None-Match / If-Match: 501 (S3 before
# August 2024: NotImplemented, "A header you provided implies functionality that is not implemented"), or
# 400 with one of these codes (S3-compatible stores). Anything else (403, 404, a busy store) is no refusal
# of the condition: it would refuse the plain write as well, or, worse, let it through.
_NO_CONDITION_CODES = ("NotImplemented", "InvalidArgument", "InvalidRequest")
_NO_CONDITION_SAID: set[str] = set()  # stores (scheme://bucket) whose refusal was logged


def _condition_refused(e: BaseException) -> str | None:
    """What the store or client said when it refused the write's condition itself (e.g. "501 NotImplemented";
    a file system whose pipe_file takes no condition: TypeError / NotImplementedError); None otherwise."""
    said = _store_answer(e)
    if said is not None:
        status, code = said
        if status == 501 or (status == 400 and code in _NO_CONDITION_CODES):
            return f"{status} {code}"
        return None
    if isinstance(e, (TypeError, NotImplementedError)):
        return f"{type(e).__name__}: {e}"
    return None


def _note_no_condition(lock: str, said: str) -> None:
    """Say once per store (per process) that its locks are written without a condition; later, debug only."""
    store = "/".join(lock.split("/")[:3])
    if store in _NO_CONDITION_SAID:
        log.debug("conditional write of %s refused (%s); writing the lock without a condition", lock, said)
        return
    _NO_CONDITION_SAID.add(store)
    log.warning("%s: the store refused a conditional write (%s); output locks there are written without one: "
                "a run that starts while another holds the lock is still refused, but two runs starting at the "
                "same moment may both go on", store, said)


def _held_by_ancestor(lock: str) -> bool:
    return lock in os.environ.get(_HELD_ENV, "").split(_HELD_SEP)


@contextmanager
def output_lock(output: str, stage: str, kind: str = "dir") -> Iterator[None]:
    """Hold the output's lock while the block runs; released at the end, also on error.

    A second run into the same output is refused (:class:`OutputLocked`, naming the first's host and
    pid); a lock left by a killed run is taken over. Re-entrant within a process (download runs
    prepare on its own output) and for processes this one launched on the same output.
    """
    _, lock = output_paths(output, kind)
    if _HELD.get(lock) or _held_by_ancestor(lock):
        _HELD[lock] = _HELD.get(lock, 0) + 1
        try:
            yield
        finally:
            _HELD[lock] -= 1
        return
    fs, lp = _fs(lock)
    fs.makedirs(lp.rpartition("/")[0], exist_ok=True)
    ctx = _flock(lock, output, stage) if _is_local(fs) else _content_lock(lock, output, stage)
    prev_env = os.environ.get(_HELD_ENV)
    with ctx:
        _HELD[lock] = 1
        os.environ[_HELD_ENV] = _HELD_SEP.join(filter(None, [prev_env, lock]))
        try:
            yield
        finally:
            _HELD.pop(lock, None)
            if prev_env is None:
                os.environ.pop(_HELD_ENV, None)
            else:
                os.environ[_HELD_ENV] = prev_env


@contextmanager
def claimed_output(path: str, stage: str, owners: Iterable[str] = (), kind: str = "dir") -> Iterator[None]:
    """Check the output rule (nothing touched when refused), take the lock, record ownership, run.

    Processes of a torch.distributed group other than rank 0 skip it: rank 0 (or the launcher that
    started them) holds the output for the group.
    """
    if int(os.environ.get("RANK", "0") or 0) > 0:
        yield
        return
    marker, lock = output_paths(path, kind)
    if _HELD.get(lock) or _held_by_ancestor(lock):  # a nested stage on an output already claimed
        with output_lock(path, stage, kind):
            yield
        return
    from laiontools.core.storage import check_store

    check_store(path)  # a missing bucket is an error: the makedirs below (s3fs) would create it
    check_output(path, stage, owners, kind)
    fs, p = _fs(path)
    folder = p.rstrip("/").rpartition("/")[0] if kind == "file" else p
    created = bool(folder) and not fs.exists(folder)
    if folder:
        fs.makedirs(folder, exist_ok=True)
    wrote_marker = False
    try:
        with output_lock(path, stage, kind):
            check_output(path, stage, owners, kind)  # again under the lock: a run that finished meanwhile
            from laiontools.core.storage import remove_stale_file_temps, remove_stale_temps

            # a killed run's half-written temp files (never taken as output: they would only stay)
            if n := (remove_stale_temps(path) if kind == "dir" else remove_stale_file_temps(path)):
                log.info("%s: removed %d temp file(s) a killed run left", path, n)
            if _read_json_or_none(marker) is None:
                from laiontools.core.storage import write_json

                write_json(marker, {"stage": stage, "created": _lock_info(stage)["started"]})
                wrote_marker = True
            yield
    except BaseException:
        # A run refused for bad input before it wrote anything leaves no trace: drop the marker it
        # wrote and the folder it created, when they hold nothing else. (Never another run's marker.)
        _undo_claim(fs, folder if created else None, p, marker if wrote_marker else None, kind)
        raise


def _undo_claim(fs: Any, created_folder: str | None, p: str, marker: str | None, kind: str) -> None:
    from laiontools.core.storage import rm_path

    try:
        if marker is None:
            pass
        elif kind == "file":
            if not fs.exists(p):
                rm_path(fs, _fs(marker)[1])
        elif not [e for e in fs.ls(p, detail=False) if not e.rstrip("/").rsplit("/", 1)[-1].startswith(".")]:
            rm_path(fs, _fs(marker)[1])
        if created_folder and _is_local(fs) and not os.listdir(created_folder):
            os.rmdir(created_folder)
    except OSError as e:  # best effort: never hide the stage's own error
        log.debug("could not undo the claim of %s: %s", p, e)


def config_parser(cls: type[StageConfig], prog: str, description: str = "",
                  skip: tuple[str, ...] = ()) -> argparse.ArgumentParser:
    """An argparse parser with one flag per config field (see :func:`add_config_args`)."""
    p = argparse.ArgumentParser(prog=prog, description=description)
    add_config_args(p, cls, skip=skip)
    return p


def stage_main(module_name: str, argv: list[str] | None = None) -> int:
    """The CLI of every stage module: flags (+ ``--config`` YAML) -> config -> ``run`` -> printed summary.

    Exit code 0, or 1 when the stage finished with failed work listed in its report (``ok`` False).
    UserErrors propagate: the CLI (``cli.run_stage``) prints them as one line, tests assert on them.
    """
    import sys

    from laiontools.core.report import emit

    mod = importlib.import_module(module_name)
    if hasattr(mod, "build_parser"):
        parser = mod.build_parser()
    else:
        doc = (mod.__doc__ or "").strip().split("\n")[0]
        parser = config_parser(mod.CONFIG, prog=f"laiontools {mod.STAGE}", description=doc)
    args = parser.parse_args(sys.argv[1:] if argv is None else argv)
    cfg = config_from_args(mod.CONFIG, args)
    result = mod.run(cfg)
    if result.summary:
        emit(result.summary)
    return 0 if result.ok else 1
