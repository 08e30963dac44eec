"""Reshard a subset into shuffled, evenly sized webdataset shards that a trainer reads.

Contract::

    laiontools reshard --manifest <subset.manifest.json> --output <dir> [--shard-size N] [--seed S]

writes::

    <dir>/shards/shard-00000.tar ...   webdataset tars: <key>.jpg/.txt/.json (every member of the source sample)
    <dir>/shards/shard-00000.tar.done  completion marker (written last): count, bytes, sha256, plan, sources
    <dir>/shards/sizes.json            {"shard-00000.tar": n, ...}, what open_clip's loader reads
    <dir>/subset.manifest.json         kind=subset, shard list (num_samples, bytes, sha256), parent = the
                                       subset manifest; uids = the subset's own uid file by absolute path or
                                       URL + sha256 (not copied: ~32 GB at 2B; readers check the sha256).
                                       Folders written before this kept a copy, <dir>/uids.npy, named
                                       relative to the manifest: they stay readable.
    <dir>/reshard.json                 the plan's settings; a rerun with other settings is refused

Where it runs: on Spark when a master is named (``--master``, ``$LAIONTOOLS_SPARK_MASTER``), under
spark-submit, when the pool's catalog has more than ``--spark-above`` rows (default 2M), or when some
sample has no byte span in the catalog (the tar index below is a Spark job). Otherwise the same plan is
computed in this process from the catalog, read one batch at a time and cut to the subset's rows, and
the same :func:`write_output_shards` writes the shards in a few forked processes: the same bytes, without
Spark's seconds of jobs (a nested 2% subset of a small pool took 5-7 s, nearly all of it fixed).
The process then holds the subset's plan rows, ~350 bytes each (measured: +11 MB for 31k rows), so at most
~0.7 GB at the default bound.

How it works on Spark (the driver sees only source shard ids and one small row per output shard):

1. Plan: the pool catalog's success rows (uid -> source shard, key) whose uid is in the subset's
   uid file. Each uid gets a seeded score ``blake2b(uid, key=seed, person=b"laiontools-shuf")``;
   sorting by (score, uid) gives every sample a global position, and positions are cut into
   ``ceil(N / shard_size)`` shards whose sizes differ by at most one. Positions are computed in
   the JVM (sorted partition + row id + per-partition offsets): no plan row passes through Python.
2. Index: pools from `laiontools download` record each sample's byte span in its tar (catalog
   columns tar_offset / tar_length, and tar_sha256: every span read is checked against it before a
   byte is copied): then nothing is indexed, the plan rows carry the spans. For
   older pools (or samples without a span), tasks over the *needed* source shards read only their
   tar headers (seeking over the data) and emit one row per sample with its members' (ext, offset,
   size, mtime) as Arrow arrays, joined to the plan. Both give the same bytes (tested).
3. Write: tasks over contiguous ranges of output shards get their plan rows as Arrow batches in
   (shard, index) order, read the byte ranges of each sample (its adjacent members as one range,
   in batches sorted by source offset), and write them under new keys ``<shard:05d><position:06d>``
   in shuffled order with hand-built ustar headers through a pair of aligned 2 MB buffers, each full
   buffer hashed and written by a writer thread (O_DIRECT where the file system takes it) while the
   other is filled; then fsync, rename the tar
   into place and write its marker last. The json member keeps the uid and gains ``key`` (new),
   ``source_shard`` and ``source_key``. Bytes never travel through Spark.

Where the plan finds the subset's rows: in the subset's own spans (``<label>.spans/`` beside its uid
file, written by subsets for subsets of at most a quarter of the catalog: only the subset's rows are
read) when they match the uid file and the pool (laiontools.contracts.spans); otherwise in the pool's
catalog, every row of it read (a 2 % subset: 50 rows read for each kept). Same rows, same bytes.

Everything is a function of (subset uids, catalog, seed, shard size), so a run killed at any point
and started again skips the shards whose markers exist and rewrites the rest byte for byte.
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import io
import json
import logging
import math
import os
import sys
import tarfile
import time
from collections import OrderedDict, deque
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from laiontools.contracts import layout
from laiontools.contracts import schema as C
from laiontools.contracts.manifest import (
    manifest_sha256,
    new_manifest,
    read_manifest,
    resolve,
    write_manifest,
)
from laiontools.contracts.pool import abs_path, catalog_footers, catalog_rows, load_pool, spark_read_catalog
from laiontools.contracts.selection import parse_seed, score_series
from laiontools.contracts.uids import keep_members
from laiontools.core import failpoints
from laiontools.core.config import ConfigError
from laiontools.core.errors import InputError, TaskError, UserError, task_error, task_errors_as
from laiontools.core.report import table
from laiontools.core.spark import spark_run_record
from laiontools.core.stage import (
    SparkStageConfig,
    StageResult,
    config_parser,
    stage_entry,
    stage_spark,
    stage_tasks,
)
from laiontools.core.storage import (
    atomic_open,
    ensure_output_dir,
    is_done,
    join,
    mark_done,
    read_json,
    read_marker,
    sha256_file,
    store_refusal,
    url_to_fs,
    write_json,
    write_record,
)
from laiontools.wds.keys import base_plus_ext
from laiontools.wds.samples import POOL_IMAGE_EXTS
from laiontools.wds.tarscan import parse_span, span_members_native
from laiontools.wds.writer import ShardWriter, WriteBuffer

log = logging.getLogger(__name__)

SHUFFLE_PERSON = b"laiontools-shuf"


class ReshardError(UserError, ValueError):
    """The subset cannot be resharded as asked (source shard missing or damaged, output of another plan)."""


@dataclass
class ReshardConfig(SparkStageConfig):
    manifest: str = field(default="", metadata={"help": "subset manifest written by `laiontools subsets`"})
    output: str = field(default="", metadata={"help": "output folder for the new shards and manifest"})
    shard_size: int = field(default=10_000, metadata={"help": "samples per output shard (sizes differ by at most 1)"})
    seed: int | None = field(default=None, metadata={"help": "shuffle seed (default: the subset's selection seed)"})
    spark_above: int = field(
        default=2_000_000,
        metadata={"help": "pools whose catalog has more rows than this are planned and written on Spark; smaller ones "
                          "in this process (same bytes), unless a master is named or under spark-submit (0: always "
                          "Spark, -1: only then)"},
    )
    direct_io: bool | None = field(
        default=None,
        metadata={"help": "write local output shards with O_DIRECT where the file system allows it (--direct-io: no "
                          "page-cache churn) or through the page cache (--no-direct-io); unset: O_DIRECT unless the "
                          "machine's free memory holds the output 8 times over (the bytes are the same either way)"},
    )

    def validate(self) -> None:
        if not self.manifest:
            raise ConfigError("give --manifest <subset.manifest.json> (written by `laiontools subsets`)")
        if not self.output:
            raise ConfigError("give --output <folder> for the resharded subset")
        if isinstance(self.shard_size, bool) or not isinstance(self.shard_size, int) or self.shard_size < 1:
            raise ConfigError(f"--shard-size {self.shard_size!r} must be a whole number >= 1")
        if self.seed is not None:
            self.seed = parse_seed(self.seed)


# ----------------------------------------------------------------------------------------------
# pure helpers (tested directly)


def shard_layout(n: int, shard_size: int) -> tuple[int, int, int]:
    """(num_shards, base size q, number of shards r that get q+1) for n samples: sizes differ by <= 1."""
    if n == 0:
        return 0, 0, 0
    k = math.ceil(n / shard_size)
    q, r = divmod(n, k)
    return k, q, r


def position_to_slot(p: int, q: int, r: int) -> tuple[int, int]:
    """Global position -> (output shard, index inside it) for the layout of :func:`shard_layout`."""
    big = r * (q + 1)
    if p < big:
        return p // (q + 1), p % (q + 1)
    p -= big
    return r + p // q, p % q


def shard_name(j: int) -> str:
    return f"shard-{j:05d}.tar"


def key_format(j: int, width: int) -> tuple[str, str]:
    """(prefix, format spec) of output shard j's sample keys: ``prefix + format(i, spec)`` is sample i's
    unique webdataset key, the shard number then the index, fixed widths (no dots: webdataset splits on
    them). Made once a shard: a call and a nested format per sample were ~1.5 % of the write."""
    return f"{j:05d}", f"0{width}d"


# ----------------------------------------------------------------------------------------------
# executor functions (module level: Spark pickles them by reference)


def index_source_shard(item: tuple[str, str]) -> list[tuple[str, str, str, int, int, int]]:
    """(source shard id, url) -> [(shard id, key, ext, data offset, size, mtime)] from the tar headers only.

    ustar and per-file pax headers are read directly (:mod:`laiontools.wds.tarscan`); anything else by tarfile.
    Members are grouped by webdataset's key rule (:mod:`laiontools.wds.keys`), extensions kept as written
    (they become the output members' names); a sample's members come out together, in tar order."""
    from laiontools.wds.keys import DuplicateMemberError, group_by_keys
    from laiontools.wds.samples import compressed_tar_problem
    from laiontools.wds.tarscan import tar_index

    sid, url = item
    fs, p = url_to_fs(url)
    out = []
    try:
        with fs.open(p, "rb") as f:
            reason = compressed_tar_problem(f.read(6))
            if reason is not None:  # whole, not damaged: "re-download it" would not help
                raise task_error(f"source shard {url} {reason}")
            f.seek(0)
            members = tar_index(f, fs.size(p))
        entries = ((name, (off, size, mtime)) for name, off, size, mtime in members)
        for key, parts in group_by_keys(entries, lcase=False, adjacent=False):
            out.extend((sid, key, ext, off, size, mtime) for ext, (off, size, mtime) in parts.items() if ext)
    except DuplicateMemberError as e:
        raise task_error(f"source shard {url}: {e}; the shard is damaged, re-download it")
    except (tarfile.TarError, OSError, EOFError) as e:
        refused = store_refusal(e, url)  # a store's refusal is no damage: "re-download it" would be wrong advice
        if refused is not None:
            raise refused from e
        raise task_error(f"source shard {url} is truncated or unreadable ({e}); run `laiontools verify` on the pool and re-download it") from e
    return out


class ShardUrls(Mapping[str, str]):
    """The pool's shard id -> tar url table as reshard's tasks carry it, and where each tar is read.

    Every write task reads from nearly every source shard (a subset's samples are scattered over the pool),
    so each carries the whole table. As a dict, and with each shard's file system and path resolved once a
    task, that was ~84 MB a Python worker and ~5.3 s of fsspec's url_to_fs a task at 2B (232k shards on S3;
    bench/bench_reshard_urls.py). Here the urls that read <prefix><id><suffix> (all of a downloaded pool's;
    a takedown's output has two such frames) are kept as one sorted array of ids per frame, and a frame's
    file system is resolved once a task (:meth:`_Sources._where`): ~1.8 MB and ~0.4 s, a string join a
    shard. Other urls (a retry folder's shards, whose ids are not in their paths) stay in a dict."""

    MIN_FRAME = 16  # ids a frame needs to be kept as an array; fewer stay in the dict

    def __init__(self, pairs: Any) -> None:
        import numpy as np

        groups: dict[tuple[str, str], list[str]] = {}
        self.other: dict[str, str] = {}
        for sid, url in dict(pairs).items():  # (a dict first: an id given twice is its last url, as in a dict)
            i = url.rfind(sid) if sid else -1
            if i < 0:
                self.other[sid] = url
            else:
                groups.setdefault((url[:i], url[i + len(sid):]), []).append(sid)
        self.frames: list[tuple[str, str, Any]] = []  # (prefix, suffix, sorted ids as utf-8 bytes)
        for (pre, suf), ids in groups.items():
            if len(ids) < self.MIN_FRAME:
                self.other.update((s, pre + s + suf) for s in ids)
            else:
                self.frames.append((pre, suf, np.array(sorted(s.encode() for s in ids), dtype=bytes)))

    def frame(self, sid: str) -> int:
        """The index of the frame that holds `sid` (-1: in the dict, or unknown)."""
        if self.frames and sid not in self.other:
            b = sid.encode()
            for n, (_, _, ids) in enumerate(self.frames):
                j = int(ids.searchsorted(b))
                if j < len(ids) and ids[j] == b:
                    return n
        return -1

    def __getitem__(self, sid: str) -> str:
        url = self.other.get(sid)
        if url is not None:
            return url
        n = self.frame(sid)
        if n < 0:
            raise KeyError(sid)
        pre, suf, _ = self.frames[n]
        return pre + sid + suf

    def __iter__(self) -> Any:
        yield from self.other
        for _, _, ids in self.frames:
            yield from (b.decode() for b in ids.tolist())

    def __len__(self) -> int:
        return len(self.other) + sum(len(ids) for _, _, ids in self.frames)


class _Sources:
    """A few open source shards per task (LRU); local files are read with os.pread (one call per range).

    Shards on an object store (an async fsspec file system: s3fs, gcsfs) are read through
    :meth:`prefetch`: a batch's ranges are asked for at once (concurrent ranged GETs), each range
    exactly, or merged with its neighbour when the gap between them is small.
    A file object's read-ahead would fetch a 4 MB block at every range that is not in the last one:
    with a subset's samples scattered over every source tar, and each output shard reading from all
    of them, that was 60-70x the subset's bytes sent by the store (bench/bench_reshard_s3.py)."""

    WHERE_CACHE = 4096  # source shards whose (file system, path) a task keeps resolved

    def __init__(self, urls: Mapping[str, str], max_open: int | None = None, spans: str | None = None) -> None:
        self.urls = urls if isinstance(urls, ShardUrls) else ShardUrls(urls)
        self.max_open = max_open or _max_open_files()
        self.spans = spans  # the subset's spans folder the byte spans came from (None: the pool's catalog), for errors
        self.throttle_left = THROTTLE_WAIT_S  # seconds this task may still wait on a store that says "slow down"
        self.open: OrderedDict[str, Any] = OrderedDict()
        self.fetched: dict[tuple[str, int, int], bytes] = {}
        self.where: dict[str, tuple[Any, str, bool]] = {}
        self.frame_where: dict[int, tuple[Any, str | None, bool]] = {}

    def _where(self, sid: str) -> tuple[Any, str, bool]:
        """(file system, path, local) of source shard `sid`. fsspec's url_to_fs costs ~30 us a call (~150
        on S3), and a subset drawn from more source shards than stay open reopens them often (2 % of a
        128-shard pool: ~4,300 opens for 2,560 samples, a third of the write phase): a frame of the url
        table (:class:`ShardUrls`) is resolved once, its shards' paths joined from it; other shards are
        shard is then kept resolved, up to :attr:`WHERE_CACHE` of them (a sample asks 3-4 times)."""
        w = self.where.get(sid)
        if w is not None:
            return w
        n = self.urls.frame(sid)
        fw = None
        if n >= 0:
            pre, suf, _ = self.urls.frames[n]
            fw = self.frame_where.get(n)
            if fw is None:
                fs, p = url_to_fs(pre + sid + suf)
                tail = sid + suf
                # (a file system whose path is not the url's tail: each shard resolved on its own)
                fw = self.frame_where[n] = (fs, p[: len(p) - len(tail)] if p.endswith(tail) else None, _is_local(fs))
        if fw is not None and fw[1] is not None:
            w = (fw[0], fw[1] + sid + suf, fw[2])
        else:
            fs, p = url_to_fs(self.urls[sid])
            w = (fs, p, _is_local(fs))
        if len(self.where) >= self.WHERE_CACHE:
            self.where.clear()
        self.where[sid] = w
        return w

    def is_remote(self, sid: str) -> bool:
        """Whether `sid` lives on an async fsspec file system (s3fs, gcsfs, adlfs, http): those are read
        through :meth:`prefetch`. Others (local disk; HDFS through pyarrow, whose streams read exact
        ranges) keep one open file per shard."""
        fs, _, local = self._where(sid)
        return not local and bool(getattr(fs, "async_impl", False))

    def prefetch(self, reads: list[tuple[str, int, int]]) -> None:
        """Fetch these (source shard, offset, size) ranges of remote shards now, together; :meth:`read`
        then returns them from memory. A range that fails here (a missing shard, a short read, a network
        error) is not kept: read() asks for it again on its own and says what is wrong with it. Ranges the
        store refused as too many requests (:func:`_throttled`) are asked for again after a pause that
        doubles, while this task has waited less than :data:`THROTTLE_WAIT_S` in all."""
        wanted = sorted({r for r in reads if self.is_remote(r[0]) and r not in self.fetched})
        if not wanted:
            return
        # Merge a range into the previous one of its shard when the gap is small: at most
        # PREFETCH_MAX_GAP, and no larger than the range itself (so that merging at most doubles the bytes).
        merged: list[list[Any]] = []  # [sid, lo, hi, [ranges]]
        for sid, off, size in wanted:
            last = merged[-1] if merged else None
            if last is not None and last[0] == sid and off - last[2] <= min(PREFETCH_MAX_GAP, size):
                last[2] = max(last[2], off + size)
                last[3].append((off, size))
            else:
                merged.append([sid, off, off + size, [(off, size)]])
        pause = THROTTLE_FIRST_PAUSE_S
        while merged:
            by_fs: dict[int, tuple[Any, list[list[Any]], list[str]]] = {}
            for m in merged:
                fs, path, _ = self._where(m[0])
                by_fs.setdefault(id(fs), (fs, [], []))[1].append(m)
                by_fs[id(fs)][2].append(path)
            again: list[list[Any]] = []
            for fs, ms, paths in by_fs.values():
                got = fs.cat_ranges(paths, [m[1] for m in ms], [m[2] for m in ms], on_error="return")
                for m, data in zip(ms, got):
                    if isinstance(data, BaseException):
                        if _throttled(data):
                            again.append(m)
                        continue
                    if len(data) != m[2] - m[1]:
                        continue
                    for off, size in m[3]:
                        self.fetched[(m[0], off, size)] = data if len(m[3]) == 1 else data[off - m[1] : off - m[1] + size]
            if not again or self.throttle_left <= 0:
                return  # (a range still refused: read() asks once more and says what the store answered)
            wait = min(pause, self.throttle_left)
            if self.throttle_left == THROTTLE_WAIT_S:
                log.warning("the store asks for fewer requests (%d ranges refused, e.g. %s): reshard waits and asks again, for up "
                            "to %.0f s in all per task", len(again), self.urls[again[0][0]], THROTTLE_WAIT_S)
            time.sleep(wait)
            self.throttle_left -= wait
            pause = min(2 * pause, THROTTLE_MAX_PAUSE_S)
            merged = again

    def advise(self, reads: list[tuple[str, int, int]]) -> None:
        """Tell the kernel that these (source shard, offset, size) ranges of local shards are read next
        (``POSIX_FADV_WILLNEED``): it starts reading them from the device at once, without waiting, so
        that the preads that follow find them in the page cache. A nested subset's samples are scattered
        over the source tars; read one at a time from a cold disk, each pread waits for the device
        (measured: 6,400 scattered 22 KB spans took 0.65 s one by one, 0.24 s with 8 or more asked for
        ahead; a warm page cache: no difference). Advice only: a range it cannot give is left to read()."""
        if not hasattr(os, "posix_fadvise"):
            return
        for sid, off, size in reads:
            if self.is_remote(sid):
                continue
            try:
                f = self.open.get(sid) or self._file(sid)
                if isinstance(f, io.FileIO):
                    os.posix_fadvise(f.fileno(), off, size, os.POSIX_FADV_WILLNEED)
            except (OSError, TaskError):
                pass  # a missing or odd file: read() says what is wrong with it

    def read(self, sid: str, offset: int, size: int) -> bytes:
        data = self.fetched.pop((sid, offset, size), None)
        if data is not None:
            return data
        data = b""
        try:  # (opening an object-store file asks for its size first: a HEAD, refused as a GET is)
            f = self._file(sid)
            while len(data) < size:  # a read may return short; finish it before calling the shard truncated
                more = _read_at(f, offset + len(data), size - len(data))
                if not more:
                    if self.spans is not None:  # (a span past the shard's end: the shard cut short, or the spans edited)
                        raise _span_error(self.urls[sid], f"bytes {offset}..{offset + size} that {{source}} {{gives}} lie past the "
                                          "shard's end", self.spans)
                    raise task_error(f"source shard {self.urls[sid]} is truncated (member at offset {offset} needs {size} bytes); "
                                     "re-download it")
                data = more if not data else data + more
        except Exception as e:
            if not _throttled(e):
                raise
            raise task_error(
                f"source shard {self.urls[sid]}: the object store refused its reads as too many requests ({e}) after this "
                f"task had waited {THROTTLE_WAIT_S - self.throttle_left:.0f} s for it; re-run the same command (the shards "
                "written are kept), with fewer tasks at once (spark.cores.max) if the store keeps refusing"
            ) from None
        return data

    def _file(self, sid: str) -> Any:
        """The open file of source shard `sid` (opened now if it is not)."""
        f = self.open.get(sid)
        if f is None:
            fs, p, local = self._where(sid)
            try:
                f = fs.open(p, "rb", block_size=1 << 22) if not local else open(p, "rb", buffering=0)  # noqa: SIM115 - closed in close()
            except FileNotFoundError:
                raise task_error(f"source shard {self.urls[sid]} is missing (the pool's manifest lists it); run "
                                 "`laiontools verify` on the pool and re-download the shards it names") from None
            self.open[sid] = f
            if len(self.open) > self.max_open:
                self.open.popitem(last=False)[1].close()
            elif not local:  # an object-store file holds a 4 MB block: at most REMOTE_MAX_OPEN of those
                remote = [s for s in self.open if not self._where(s)[2]]
                if len(remote) > REMOTE_MAX_OPEN:
                    self.open.pop(remote[0]).close()
        else:
            self.open.move_to_end(sid)
        return f

    def close(self) -> None:
        for f in self.open.values():
            f.close()
        self.open.clear()
        self.fetched.clear()


# An object store refuses requests past its rate ("503 SlowDown" from S3 past ~5,500 GETs a second on a key
# prefix, until it spreads the prefix over more partitions, which it does under sustained load within
# minutes; 429 elsewhere). s3fs asks again 5 times within ~2 s; reshard's one GET a sample from every task
# of a cluster at once can be refused for longer. The ranges refused so are asked for again after a pause
# (1 s, doubling up to 30 s), for at most THROTTLE_WAIT_S of waiting per task; then the task fails naming the
# store's answer (Spark retries it, spark.task.maxFailures).
THROTTLE_WAIT_S = 300.0
THROTTLE_FIRST_PAUSE_S = 1.0
THROTTLE_MAX_PAUSE_S = 30.0
_THROTTLE_WORDS = ("SlowDown", "reduce your request rate", "Throttl", "TooManyRequests", "Too Many Requests", "RequestLimitExceeded")


def _throttled(e: BaseException) -> bool:
    """Whether `e` is an object store's refusal of a request as one too many (S3's 503 SlowDown, a 429, a
    throttling code), as s3fs / botocore / gcsfs raise it after their own attempts. The error's causes are
    read too: s3fs raises a refused HEAD (no body, so no SlowDown code or words: botocore's code is "503")
    as ``OSError(EBUSY, "Service Unavailable")``, from the ClientError that names the 503."""
    seen: set[int] = set()
    err: BaseException | None = e
    while err is not None and id(err) not in seen:
        seen.add(id(err))
        text = f"{type(err).__name__}: {err}"
        if any(w in text for w in _THROTTLE_WORDS) or any(code in text for code in ("(503)", "(429)")):  # (botocore's "(503)")
            return True
        # (gcsfs's HttpError and aiohttp's ClientResponseError carry the HTTP status as a number)
        if any(getattr(err, a, None) in (429, 503) for a in ("code", "status")):
            return True
        err = err.__cause__  # (not __context__: an error met while handling a refusal is not one)
    return False


# Object-store files a task keeps open (each with a 4 MB read-ahead block; they serve only the ranges a
# prefetch could not fetch, see _Sources.prefetch).
REMOTE_MAX_OPEN = 32


# Output shards go through the page cache only when free memory holds the whole output this many times
# over (see write_direct).
DIRECT_IO_FREE_FACTOR = 8


def free_memory() -> int | None:
    """Bytes of memory no one uses now, page cache included (``MemFree``), within this process's cgroup
    limit if it has one (cgroup v2 ``memory.max`` - ``memory.current``); None where neither can be read."""
    free = None
    try:
        with open("/proc/meminfo", "rb") as f:
            for line in f:
                if line.startswith(b"MemFree:"):
                    free = int(line.split()[1]) * 1024
                    break
    except (OSError, ValueError, IndexError):
        pass
    try:
        with open("/proc/self/cgroup", "rb") as f:
            group = next((ln.split(b":", 2)[2].strip().decode() for ln in f if ln.startswith(b"0::")), None)
        if group is not None:
            base = "/sys/fs/cgroup" + group.rstrip("/")
            with open(base + "/memory.max", "rb") as f:
                limit = f.read().strip()
            if limit != b"max":
                with open(base + "/memory.current", "rb") as f:
                    room = max(0, int(limit) - int(f.read().strip()))
                free = room if free is None else min(free, room)
    except (OSError, ValueError, IndexError, UnicodeDecodeError):
        pass
    return free


def write_direct(choice: bool | None, out_bytes: int, free: int | None) -> bool:
    """Whether a reshard writing `out_bytes` writes its local output shards with O_DIRECT: the user's
    `choice` (--direct-io / --no-direct-io), else O_DIRECT unless `free` memory (:func:`free_memory`)
    holds the output DIRECT_IO_FREE_FACTOR times over.

    Through the page cache a write returns once its bytes are copied and the disk catches up behind the
    stage, as for `cp`; that was faster here for a subset the free memory holds (2 %: 0.57 vs 0.70 s, 20 %:
    4.17 vs 4.58 s, BENCHMARKS.md). Where the output does not fit in free memory, each page written
    first evicts another (0.3-2.5 CPU-s of reclaim per GB here, 0.07 with O_DIRECT): a LAION-scale
    reshard, terabytes on nodes whose page cache is full, writes with O_DIRECT."""
    if choice is not None:
        return bool(choice)
    return free is None or out_bytes * DIRECT_IO_FREE_FACTOR > free


def _max_open_files() -> int:
    """Source shards a task keeps open: a subset's samples come from every shard of its pool, so each
    output shard reads from as many as it can hold. A sixteenth of the files this process may open (an
    executor runs several tasks at once, each with its own), within [32, 512]."""
    try:
        import resource

        soft = resource.getrlimit(resource.RLIMIT_NOFILE)[0]
    except (ImportError, OSError, ValueError):
        return 32
    if soft == resource.RLIM_INFINITY:
        return 512
    return max(32, min(512, soft // 16))


def _read_at(f: Any, offset: int, size: int) -> bytes:
    """Up to `size` bytes at `offset`: one pread for a local file, seek + read otherwise."""
    if isinstance(f, io.FileIO):
        return os.pread(f.fileno(), size, offset)
    f.seek(offset)
    return f.read(size) or b""


@contextlib.contextmanager
def _read_ahead(urls: Mapping[str, str], reads: list[tuple[str, int, int]]) -> Any:
    """While the block runs, a thread announces these (source shard, offset, size) reads of local shards
    to the kernel in this order (``POSIX_FADV_WILLNEED``: it reads them from the device without waiting);
    the block gets the thread, or None where there is nothing to announce, and the thread is stopped at
    its end if not done. Advice only: a range it cannot give is read as usual. It holds as many source
    shards open as a task does (:func:`_max_open_files`; the task processes need descriptors of their own)."""
    import threading

    if not hasattr(os, "posix_fadvise") or not reads:
        yield None
        return
    stop = threading.Event()

    def advise() -> None:
        sources = _Sources(urls)
        try:
            for r in reads:
                if stop.is_set():
                    break
                sources.advise([r])
        except Exception as e:  # noqa: BLE001 - advice only: the tasks read every range and say what is wrong
            log.debug("reshard: read-ahead stopped: %s", e)
        finally:
            sources.close()

    t = threading.Thread(target=advise, name="laiontools-advise", daemon=True)
    t.start()
    try:
        yield t
    finally:
        stop.set()
        t.join()


def _is_local(fs: Any) -> bool:
    from laiontools.core.storage import is_local

    return is_local(fs)


# Samples of one output shard are read in batches of about this many bytes, each batch in source
# (shard, offset) order, so reads move forward through every source tar instead of jumping around
# in shuffled order; memory per task stays bounded by the batch, not by the shard size. Shards on an
# object store are fetched a batch at a time (concurrent ranged GETs): the batch is large.
READ_BATCH_BYTES = 64 << 20
# A shard whose sources are all local is read in small batches instead (and at least READ_AHEAD_MIN
# samples), each announced to the kernel while the one before it is read (see _Sources.advise): the
# samples are still in the CPU's cache when they are packed (measured, 20% subset in one process:
# 64 MB batches 0.61 s, 4 MB 0.54, 1 MB 0.49, 256 KB 0.48), and a cold disk has the next batch's
# reads in flight (8 to 512 ranges ahead read a cold 20% subset equally fast here).
LOCAL_READ_BATCH_BYTES = 1 << 20
READ_AHEAD_MIN = 16
# Ranges of a remote source shard closer than this are fetched as one (see _Sources.prefetch).
PREFETCH_MAX_GAP = 64 << 10
# The members of a sample are adjacent in the source tar (header, data, padding); they are read as
# one range when it spans no more than the data plus this much per member (headers and padding).
_SPAN_SLACK = 3 * tarfile.BLOCKSIZE


@dataclass(slots=True)
class _Entry:
    """One sample of an output shard: index i in it, uid, source shard + key, members sorted by ext
    as (ext, offset, size, mtime), and the source byte range [lo, hi) they span with `nbytes` of data.
    members None: [lo, hi) is the sample's span from the catalog (headers included); the members
    are parsed from those bytes when they are read, after checking them against `sha` (the span's
    sha256 from the catalog; None for pools that predate it)."""

    i: int
    uid: str
    sid: str
    skey: str
    members: list[tuple[str, int, int, int]] | None
    lo: int = 0
    hi: int = 0
    nbytes: int = 0
    sha: str | None = None


def _entry(i: int, uid: str, sid: str, skey: str, members: list[tuple[str, int, int, int]]) -> _Entry:
    members = sorted(members)
    if not members:
        return _Entry(i, uid, sid, skey, members)
    return _Entry(i, uid, sid, skey, members, min(m[1] for m in members), max(m[1] + m[2] for m in members), sum(m[2] for m in members))


def _reads(e: _Entry) -> list[tuple[str, int, int]]:
    """The (source shard, offset, size) ranges that reading entry `e` asks for: its span from the
    catalog, or its members as one range when they are adjacent, or each member apart."""
    if e.members is None:
        return [(e.sid, e.lo, e.hi - e.lo)]
    if e.hi - e.lo <= e.nbytes + _SPAN_SLACK * len(e.members):
        return [(e.sid, e.lo, e.hi - e.lo)] if e.members else []
    return [(e.sid, off, size) for _, off, size, _ in e.members]


def _read_batch(sources: _Sources, batch: list[_Entry]) -> list[list[tuple[str, memoryview, int]]]:
    """[(ext, data, mtime) in the entry's member order] per entry, reading in (source shard, offset)
    order and each sample's members as one range when they are adjacent; the ranges of remote
    shards are fetched together first."""
    got: list[list[tuple[str, memoryview, int]]] = [[] for _ in batch]
    order = sorted(range(len(batch)), key=lambda b: (batch[b].sid, batch[b].lo))
    if any(sources.is_remote(sid) for sid in {e.sid for e in batch}):
        sources.prefetch([r for b in order for r in _reads(batch[b])])
    for b in order:
        e = batch[b]
        if e.members is None:
            got[b] = _span_members(sources, e)
            continue
        ranges = _reads(e)
        if len(ranges) == 1:
            _, lo, span = ranges[0]
            buf = memoryview(sources.read(e.sid, lo, span))
            got[b] = [(ext, buf[off - lo : off - lo + size], mtime) for ext, off, size, mtime in e.members]
        else:
            got[b] = [(ext, memoryview(sources.read(e.sid, off, size)), mtime) for ext, off, size, mtime in e.members]
    return got


# tarscan's compiled span parse (None: not built or turned off); a name here so tests can compare both.
_native_members = span_members_native


def _span_error(url: str, fault: str, spans: str | None) -> TaskError:
    """The error of a sample whose bytes in source shard `url` are not what the plan's spans say (`fault`, with
    {source}, {gives}, {says} and {recorded} to fill), naming where the spans came from: the pool's catalog (`spans` None: the
    shard changed since download), or the subset's spans folder `spans`, which passed its checks (edited, or
    written by another tool) unless the shard changed: the two cannot be told apart here, so both are said."""
    advice = "run `laiontools verify` on the pool and re-download the shards it names"
    if spans is None:
        text = fault.format(source="the catalog", gives="gives", says="says", recorded="the catalog recorded at download")
        return task_error(f"source shard {url}: {text}; the shard changed since download: {advice}")
    text = fault.format(source=f"the subset's spans ({spans})", gives="give", says="say", recorded="they record")
    return task_error(
        f"source shard {url}: {text}; either the pool's shard changed since download ({advice}) or, if verify finds the "
        f"pool intact, the spans are not those of the pool: remove {spans} and re-run (reshard then reads the pool's "
        "catalog), or re-run subsets to write them again"
    )


def _span_members(sources: _Sources, e: _Entry) -> list[tuple[str, memoryview, int]]:
    """Read a sample's span (from the catalog) and return its members sorted by ext, checking that
    the bytes are that sample's tar members and nothing else."""
    raw = sources.read(e.sid, e.lo, e.hi - e.lo)
    if e.sha is not None and hashlib.sha256(raw).hexdigest() != e.sha:
        raise _span_error(sources.urls[e.sid], f"bytes {e.lo}..{e.hi} that {{source}} {{gives}} for sample {e.skey} have another "
                          "sha256 than {recorded}", sources.spans)
    # The compiled parse takes the plain form of a span (what download, webdataset and img2dataset write)
    # and answers None for anything else, which the Python code below then reads or refuses.
    out = _native_members(raw, e.skey) if _native_members is not None else None
    if out is None:
        members = parse_span(raw)  # bytes, not a view: parse_span would copy a view
        out = []
        for name, off, size, mtime in members or ():
            key, ext = base_plus_ext(name)
            if key != e.skey or not ext:
                members = None
                break
            out.append((ext, off, size, mtime))
        if not members:
            raise _span_error(sources.urls[e.sid], f"bytes {e.lo}..{e.hi} that {{source}} {{gives}} for sample {e.skey} are not its tar members",
                              sources.spans)
    out.sort()
    exts = tuple([m[0] for m in out])
    if exts not in _CHECKED_EXTS:  # the check depends on the exts alone: once per combination a process meets
        try:
            _check_members(exts, e.skey, sources.urls[e.sid])
        except TaskError:
            if sources.spans is None:
                raise
            # (a span of the subset's spans folder that holds only some of the sample's members: the folder
            # edited, or the shard changed; said as the other span faults are)
            raise _span_error(sources.urls[e.sid], f"bytes {e.lo}..{e.hi} that {{source}} {{gives}} for sample {e.skey} are not a "
                              f"whole sample (members {', '.join('.' + x for x in exts)})", sources.spans) from None
        if len(_CHECKED_EXTS) < 256:
            _CHECKED_EXTS.add(exts)
    buf = memoryview(raw)
    return [(ext, buf[off : off + size], mtime) for ext, off, size, mtime in out]


# Member ext combinations (sorted) that passed _check_members in this process.
_CHECKED_EXTS: set[tuple[str, ...]] = set()


def _batches(entries: list[_Entry], sources: _Sources) -> list[list[_Entry]]:
    """An output shard's entries (in index order) cut into read batches by source bytes: small ones
    when every source is local, large ones when some are on an object store (see READ_BATCH_BYTES)."""
    local = not any(sources.is_remote(sid) for sid in {e.sid for e in entries})
    limit, least = (LOCAL_READ_BATCH_BYTES, READ_AHEAD_MIN) if local else (READ_BATCH_BYTES, 1)
    out, start = [], 0
    while start < len(entries):
        stop, nbytes = start, 0
        while stop < len(entries) and (stop - start < least or nbytes < limit):
            nbytes += entries[stop].nbytes
            stop += 1
        out.append(entries[start:stop])
        start = stop
    return out


def write_output_shards(rows: Any, out_dir: str, urls: Mapping[str, str], plan_id: str, width: int, direct: bool,
                        spans: str | None = None) -> Any:
    """Spark partition -> write each output shard it holds; yield (shard number, marker info).

    A row is (j, [_Entry or (i, uid, source shard, source key, [(ext, offset, size, mtime), ...]), ...]).
    `direct`: O_DIRECT writes where the file system takes them (see :class:`laiontools.wds.writer.ShardWriter`).
    `spans`: the subset's spans folder the rows' byte spans came from (None: the pool's catalog), named in errors.
    A shard whose marker exists for this plan is skipped (resume); otherwise it is written whole
    under a temporary name, renamed, and marked. The output bytes depend only on the rows (members
    in (ext, ...) order, samples in index order), not on how the reads are batched.
    """
    from concurrent.futures import ThreadPoolExecutor

    sources = _Sources(urls, spans=spans)
    buffer = WriteBuffer()
    # A shard's finish (fsync, rename, then its marker: written, fsync'd, renamed) runs on this thread
    # while the next shard is read and packed: each fsync waits for the device (~5 ms here, two a
    # shard), time in which this process would otherwise do nothing. One thread keeps the shards'
    # finishes in order; a shard is yielded (reported done) only once its marker is written.
    finisher = ThreadPoolExecutor(1, thread_name_prefix="laiontools-finish")
    pending: deque[tuple[int, dict[str, Any], Any]] = deque()
    # The shard writer's thread hashes and writes each full buffer while this one packs the next: it
    # needs the interpreter lock for a moment before and after each, and this thread, busy in Python,
    # gives it up only every switch interval (5 ms by default, longer than packing a 2 MB buffer takes).
    switch = sys.getswitchinterval()
    sys.setswitchinterval(min(switch, 0.0005))
    try:
        for j, entries in rows:
            while pending and pending[0][2].done():
                jj, info, done = pending.popleft()
                done.result()
                yield jj, info
            path = join(out_dir, shard_name(j))
            if is_done(path):
                info = read_marker(path) or {}
                if info.get("plan") == plan_id:
                    yield j, info
                    continue
            entries = sorted((e if isinstance(e, _Entry) else _entry(*e) for e in entries), key=lambda e: e.i)
            used: set[str] = set()
            dots: dict[str, bytes] = {}
            prefix, ifmt = key_format(j, width)
            fs, _ = url_to_fs(path)
            local = _is_local(fs)
            with contextlib.ExitStack() as stack:
                raw = stack.enter_context(atomic_open(path))
                out = ShardWriter(raw, raw.fileno() if local else None, direct=direct, buffer=buffer)
                try:
                    batches = _batches(entries, sources)
                    for k, batch in enumerate(batches):
                        # local ranges are announced to the kernel a batch ahead of their reads
                        for ahead in (batches[:2] if k == 0 else batches[k + 1 : k + 2]):
                            sources.advise(sorted(r for e in ahead for r in _reads(e)))
                        for e, data in zip(batch, _read_batch(sources, batch)):
                            used.add(e.sid)
                            key = prefix + format(e.i, ifmt)
                            members = []
                            for ext, blob, mtime in data:
                                if ext == "json":
                                    blob = _rewrite_json(blob, e.uid, key, e.sid, e.skey, sources.urls, sources.spans)
                                extb = dots.get(ext)
                                if extb is None:
                                    extb = dots[ext] = ("." + ext).encode("utf-8", "surrogateescape")
                                members.append((extb, blob, mtime))
                            try:
                                out.add_sample(key.encode(), members)
                            except ValueError as err:  # a member ustar cannot hold (a name or size too long)
                                raise task_error(f"source shard {urls[e.sid]}: sample {e.skey} cannot be resharded: {err}") from None
                    out.end_archive()
                    digest = out.hexdigest()
                finally:
                    out.close()
                info = {"num_samples": len(entries), "bytes": out.n, "sha256": digest, "plan": plan_id, "sources": sorted(used)}
                # From here the open temp file (atomic_open's fsync and rename) and the marker are the
                # finisher's; an error before this line leaves the stack to remove the temp file.
                pending.append((j, info, finisher.submit(_finish_shard, stack.pop_all(), path, info)))
        while pending:
            jj, info, done = pending.popleft()
            done.result()
            yield jj, info
    finally:
        finisher.shutdown(wait=True)  # a shard's finish is never left half done behind an error
        sys.setswitchinterval(switch)
        sources.close()
        buffer.close()


def _finish_shard(stack: contextlib.ExitStack, path: str, info: dict[str, Any]) -> None:
    """Close an output shard's atomic write (fsync, rename), then write its marker."""
    stack.close()
    mark_done(path, info)


def _check_members(exts: Any, skey: str, url: str) -> None:
    """Refuse a source sample that cannot be a training sample: without a .json its uid can be checked
    against the catalog's and the output sample would carry none (verify then fails the resharded
    manifest); without an image member train would skip it unnamed. Both mean the pool shard differs
    from what download wrote, so the answer is the same as for a damaged .json. Checked where a sample's
    members become known: the catalog span as it is read (:func:`_span_members`), or the tar index as
    the plan is made (:func:`_plan_rows`), so no output shard is written with such a sample.

    `exts`: every member's extension, repeats included: an extension that comes twice, also in another case
    (``jpg`` and ``JPG``: webdataset lower-cases them), would be two members that webdataset refuses to group
    ("duplicate file name") when it trains on the output."""
    seen: dict[str, str] = {}
    for ext in exts:
        if ext.lower() in seen:
            raise task_error(f"source shard {url}: sample {skey} has two .{ext.lower()} members ({skey}.{seen[ext.lower()]} and "
                             f"{skey}.{ext}), which webdataset cannot read as one sample; the shard is damaged: run "
                             "`laiontools verify` on the pool and re-download it")
        seen[ext.lower()] = ext
    exts = set(exts)
    if "json" not in exts:
        raise task_error(f"source shard {url}: sample {skey} has no .json member, so its uid cannot be checked against "
                         "the catalog; the shard is damaged: run `laiontools verify` on the pool and re-download it")
    if not any(ext.lower() in POOL_IMAGE_EXTS for ext in exts):
        raise task_error(f"source shard {url}: sample {skey} has no image member ({', '.join(POOL_IMAGE_EXTS)}; it holds "
                         f"{', '.join(sorted(exts))}); the shard is damaged: run `laiontools verify` on the pool and re-download it")


def _rewrite_json(data: bytes | memoryview, uid: str, key: str, sid: str, skey: str, urls: Mapping[str, str],
                  spans: str | None = None) -> bytes:
    """The sample's .json with its new key and its source (shard id, key) added; `urls` names the source
    shard in an error (looked up then: a sample's ~20 us would pay ~2 us for :class:`ShardUrls`' lookup)."""
    try:
        # UTF-8 (what every writer of a pool uses) decoded here; anything else (a BOM, UTF-16/32) fails
        # this and is read as json.loads reads bytes
        meta = _JSON_IN.decode(str(data, "utf-8"))
    except ValueError:
        try:
            meta = json.loads(bytes(data))
        except ValueError:
            meta = None
    if not isinstance(meta, dict):  # invalid JSON, or valid JSON that is not an object ([1,2,3], "s", null, 3)
        raise task_error(f"source shard {urls[sid]}: {skey}.json is not valid JSON; the shard is damaged, re-download it")
    if meta.get("uid", uid) != uid:
        raise _span_error(urls[sid], f"{skey}.json has uid {meta.get('uid')} but {{source}} {{says}} {uid}", spans)
    meta.update({"uid": uid, "key": key, "source_shard": sid, "source_key": skey})
    text = "".join(_JSON_C(meta, 0)) if _JSON_C is not None else _JSON_OUT.encode(meta)
    try:
        return text.encode()
    except UnicodeEncodeError:  # a lone surrogate, which JSON holds as an escape ("\ud800") and UTF-8 cannot
        return json.dumps(meta, sort_keys=True).encode()  # kept as that escape


# What json.dumps(meta, sort_keys=True, ensure_ascii=False) builds on every call (~3 us of a sample's
# ~20 us json rewrite), made once: the same bytes. _JSON_C: its compiled encoder itself (JSONEncoder.encode
# makes a new one at every call), without the check for cycles, which a value json.loads made cannot have.
_JSON_OUT = json.JSONEncoder(sort_keys=True, ensure_ascii=False)
_JSON_IN = json.JSONDecoder()


def _json_c() -> Any:
    try:
        enc = json.encoder.c_make_encoder(None, _JSON_OUT.default, json.encoder.encode_basestring, None, ": ", ", ", True, False, True)
        probe = {"b": [1.5, None, True, {"y": 1, "x": -0.0}], "a": "\u00e9\"\n", "c": 10**20}
        return enc if "".join(enc(probe, 0)) == _JSON_OUT.encode(probe) else None
    except (AttributeError, TypeError):  # no compiled json, or another signature in this Python
        return None


_JSON_C = _json_c()


_INDEX_SCHEMA = "_sid string, key string, exts array<string>, offs array<long>, sizes array<long>, mtimes array<long>"
_RESULT_SCHEMA = "j int, num_samples long, bytes long, sha256 string"


def _index_batches(batches: Any) -> Any:
    """mapInArrow: batches of (source shard id, url) -> one row per sample: key and its members'
    (ext, data offset, size, mtime) as parallel arrays, from the tar headers only."""
    import pyarrow as pa

    for batch in batches:
        d = batch.to_pydict()
        for sid, url in zip(d["_sid"], d["url"]):
            samples: dict[str, list[list[Any]]] = {}
            for _, key, ext, off, size, mtime in index_source_shard((sid, url)):
                m = samples.setdefault(key, [[], [], [], []])
                m[0].append(ext), m[1].append(off), m[2].append(size), m[3].append(mtime)
            keys = list(samples)
            cols = list(zip(*samples.values())) if keys else [[], [], [], []]
            yield pa.RecordBatch.from_pydict(
                {"_sid": [sid] * len(keys), "key": keys, "exts": list(cols[0]), "offs": list(cols[1]), "sizes": list(cols[2]), "mtimes": list(cols[3])},
                schema=pa.schema([("_sid", pa.string()), ("key", pa.string()), ("exts", pa.list_(pa.string())), ("offs", pa.list_(pa.int64())),
                                  ("sizes", pa.list_(pa.int64())), ("mtimes", pa.list_(pa.int64()))]),
            )


def _plan_rows(batches: Any, urls: Mapping[str, str]) -> Any:
    """Arrow batches of plan rows sorted by (j, i) -> (j, entries) per output shard for
    :func:`write_output_shards`; a shard's rows may span batches. A sample of the tar index without a
    .json or an image member is refused here (:func:`_check_members`)."""
    cur, entries = None, []
    for batch in batches:
        d = batch.to_pydict()
        if "_toff" in d:  # byte spans from the catalog; members are parsed from the span when read
            shas = d.get("_tsha") or [None] * len(d["i"])
            made = (_Entry(i, uid, sid, key, None, off, off + n, n, sha)
                    for i, uid, sid, key, off, n, sha in zip(d["i"], d[C.UID], d["_sid"], d[C.KEY], d["_toff"], d["_tlen"], shas))
        else:  # members from the tar header index
            made = (_entry(i, uid, sid, key, list(zip(exts, offs, sizes, mtimes)))
                    for i, uid, sid, key, exts, offs, sizes, mtimes in zip(d["i"], d[C.UID], d["_sid"], d[C.KEY], d["exts"], d["offs"], d["sizes"], d["mtimes"]))
        for j, e in zip(d["j"], made):
            if e.members is not None:
                _check_members([m[0] for m in e.members], e.skey, urls[e.sid])
            if j != cur:
                if cur is not None:
                    yield cur, entries
                cur, entries = j, []
            entries.append(e)
    if cur is not None:
        yield cur, entries


def _write_batches(batches: Any, out_dir: str, urls: Mapping[str, str], plan_id: str, width: int, direct: bool,
                   spans: str | None = None) -> Any:
    """mapInArrow: plan rows -> written shards, one result row (j, num_samples, bytes, sha256) each."""
    import pyarrow as pa

    schema = pa.schema([("j", pa.int32()), ("num_samples", pa.int64()), ("bytes", pa.int64()), ("sha256", pa.string())])
    for j, info in write_output_shards(_plan_rows(batches, urls), out_dir, urls, plan_id, width, direct, spans):
        yield pa.RecordBatch.from_pydict({"j": [j], "num_samples": [info["num_samples"]], "bytes": [info["bytes"]], "sha256": [info["sha256"]]}, schema=schema)


# ----------------------------------------------------------------------------------------------
# the stage


def _find_pool(subset_path: str, m: dict[str, Any]) -> str:
    """The pool manifest a subset was cut from: its `pool` field, else the end of its parent chain."""
    if m.get("pool", {}).get("path"):
        return resolve(subset_path, m["pool"]["path"])
    seen = 0
    path, cur = subset_path, m
    while cur["kind"] != "pool":
        if not cur.get("parent") or not cur["parent"].get("path") or seen > 32:
            raise InputError(f"{subset_path}: cannot find the pool it was selected from (no pool/parent path); re-run subsets")
        path = resolve(path, cur["parent"]["path"])
        cur = read_manifest(path)
        seen += 1
    return path


STAGE = "reshard"
CONFIG = ReshardConfig


@stage_entry(STAGE)
def run(cfg: ReshardConfig, spark: Any = None) -> StageResult:
    """Reshard `cfg.manifest` into `cfg.output`; outputs name the new manifest, details = a summary
    (manifest path and sha256, shards, samples, bytes, where sample spans came from).

    Raises ReshardError/InputError/ManifestError naming the file at fault (subset without uids,
    uid file changed since selection, source shard missing from the pool, output of another plan).
    """
    m = read_manifest(abs_path(cfg.manifest))  # a missing or invalid manifest fails before Spark starts
    pool, size = _pool_and_rows(abs_path(cfg.manifest), m)
    if pool is None and m.get("kind") == "subset":
        load_pool(_find_pool(abs_path(cfg.manifest), m))  # names the missing or unreadable pool before any JVM starts
    with stage_tasks(cfg, spark, app_name="laiontools-reshard", size=size, spark_above=cfg.spark_above) as tasks:
        res = _reshard(cfg, tasks, m, pool)
    return StageResult(
        outputs={"manifest": res["manifest"], "shards": join(abs_path(cfg.output), layout.RESHARD_SHARDS_DIR)},
        counts={"shards": int(res["num_shards"]), "samples": int(res["num_samples"]), "bytes": int(res["bytes"])},
        details=res,
        summary=table([{"manifest": res["manifest"], "shards": res["num_shards"], "samples": f"{res['num_samples']:,}",
                        "MB": f"{res['bytes'] / 1e6:.1f}"}])
        + ("" if res["num_samples"] else f"\nwarning: {cfg.manifest} holds no samples (a short subset of 0): no shard "
           "was written, and training on this output has nothing to read"),
    )


def _pool_and_rows(mpath: str, m: dict[str, Any]) -> tuple[Any, int]:
    """The subset's pool (None if it cannot be loaded: :func:`_reshard` then names what is wrong) and
    the rows of its catalog a plan scans (the engine's size; unknown: as large as can be)."""
    pool = None
    try:
        pool = load_pool(_find_pool(mpath, m))
        return pool, catalog_rows(pool)
    except (UserError, OSError, KeyError, TypeError, ValueError):
        return pool, 1 << 62  # _reshard reports what is wrong with the pool; the engine choice does not matter then


def _reshard(cfg: ReshardConfig, tasks: Any, m: dict[str, Any], pool: Any = None) -> dict[str, Any]:
    """`m`: the subset manifest at ``cfg.manifest``, read once by :func:`run`; `pool`: its pool, if
    :func:`_pool_and_rows` could load it (else loaded here, to raise the error that names the fault)."""
    mpath = abs_path(cfg.manifest)
    if m["kind"] != "subset":
        raise InputError(f"{mpath} is a {m['kind']} manifest; reshard takes a subset manifest from `laiontools subsets`")
    uid_path = resolve(mpath, m["uids"]["path"])
    try:
        sha, _ = sha256_file(uid_path)
    except FileNotFoundError as e:  # on an object store its message is the bare key
        raise ReshardError(f"{uid_path}: the subset's uid file is missing; restore it or re-run subsets") from e
    if sha != m["uids"]["sha256"]:
        raise ReshardError(f"{uid_path}: sha256 {sha} differs from the manifest's {m['uids']['sha256']}; the uid file changed, re-run subsets")
    n = int(m["uids"]["count"])
    seed = cfg.seed if cfg.seed is not None else int((m.get("selection") or {}).get("seed", 0))
    pool = pool or load_pool(_find_pool(mpath, m))
    urls = ShardUrls((sid, resolve(pool.path, s["path"])) for sid, s in zip(pool.shard_ids, pool.manifest["shards"]))
    k, q, r = shard_layout(n, cfg.shard_size)
    width = max(6, len(str(q + 1)))
    output = abs_path(cfg.output)
    out_dir = join(output, layout.RESHARD_SHARDS_DIR)
    ensure_output_dir(out_dir)
    plan = {
        "subset_manifest": mpath,
        "subset_manifest_sha256": manifest_sha256(mpath),
        "uids_sha256": m["uids"]["sha256"],
        "pool_manifest_sha256": pool.sha256,
        "seed": seed,
        "shard_size": cfg.shard_size,
        "num_shards": k,
        "key_format": f"<shard:05d><index:0{width}d>",
        "shuffle": "positions by (blake2b(uid, key=seed, person=b'laiontools-shuf'), uid)",
    }
    plan_id = hashlib.sha256(json.dumps(plan, sort_keys=True).encode()).hexdigest()[:16]
    plan_path = join(output, layout.RESHARD_PLAN_JSON)
    fs, pp = url_to_fs(plan_path)
    if fs.exists(pp):
        old = read_json(plan_path)
        if old.get("plan_id") != plan_id:
            from laiontools.core.config import changed_settings

            # what differs, where the command is the same: the subset manifest (or its uids, its pool) changed
            diff = changed_settings(old, plan, [k for k in plan if k not in ("key_format", "shuffle")])
            raise ReshardError(
                f"{output} already holds a reshard of another plan ({diff or 'its plan file differs'}); give a new "
                "--output folder"
            )
    write_json(plan_path, {**plan, "plan_id": plan_id})
    # every setting of the run, as each stage saves them beside its outputs (the plan above holds those that
    # decide the bytes; this one also --direct-io, --spark-above, the master, ...)
    write_record(join(output, layout.SETTINGS_JSON), {"stage": "reshard", **cfg.to_dict(), "seed": seed})

    results: dict[int, dict[str, Any]] = {}
    spans_from = None
    # On Spark (pools above --spark-above, hence LAION-scale outputs) unset means O_DIRECT; in process it
    # is chosen from the output's size (write_direct)
    direct = cfg.direct_io if cfg.direct_io is not None else True
    run_record: dict[str, Any] = {"engine": "in-process"}
    if n:
        with task_errors_as(ReshardError):
            local = None
            if tasks.local:  # pools without every span in the catalog are indexed on Spark
                local = _run_local(tasks, pool, uid_path, m["uids"]["sha256"], urls, n, seed, q, r, k, out_dir, plan_id, width, cfg.direct_io)
            if local is not None:
                results, spans_from, direct = local
            else:
                with stage_spark(cfg, tasks.spark, app_name="laiontools-reshard") as spark:
                    # The plan's shuffles (one row per uid, the sort by position, the index join) move the
                    # subset's rows: their partition count follows n unless the user set it (Spark's 200
                    # was ~200 tasks per shuffle for a subset of 1,000 samples, and 10M rows each at 2B).
                    run_record = spark_run_record(spark, n)
                    results, spans_from = _run_spark(spark, pool, uid_path, m["uids"]["sha256"], urls, n, seed, q, r, k, out_dir, plan_id, width,
                                                     direct)
    if n:
        _check_visible(out_dir, k)
    sizes = {shard_name(j): results[j]["num_samples"] for j in range(k)}
    # The final-write phase: every output shard's marker is there, the manifest is not (kill tests widen it).
    failpoints.pause("reshard.final-write")
    write_json(join(out_dir, layout.RESHARD_SIZES_JSON), sizes)
    total = sum(sizes.values())
    if total != n:
        raise ReshardError(f"wrote {total} samples but the subset has {n}; the pool catalog and shards disagree (run verify on the pool)")

    # The subset's uid file is referenced, not copied (it is ~32 GB at 2B): the manifest names it by
    # its absolute path or URL and sha256, and every reader (verify, lineage) checks the sha256.
    shards = [
        {"path": f"{layout.RESHARD_SHARDS_DIR}/{shard_name(j)}", "num_samples": results[j]["num_samples"], "bytes": results[j]["bytes"], "sha256": results[j]["sha256"]}
        for j in range(k)
    ]
    out_m = new_manifest(
        name=m["name"],
        kind="subset",
        num_samples=n,
        target_samples=m["target_samples"],
        uids={"path": uid_path, "sha256": m["uids"]["sha256"], "count": n},
        shards=shards,
        source_fingerprint=m["source"]["fingerprint"],
        parent={"name": m["name"], "sha256": plan["subset_manifest_sha256"], "path": mpath},
        selection=m.get("selection"),
        command=["laiontools", "reshard", "--manifest", mpath, "--shard-size", str(cfg.shard_size), "--seed", str(seed)],
        pool=m.get("pool") or {"name": pool.manifest["name"], "sha256": pool.sha256, "path": pool.path},
        reshard={k_: plan[k_] for k_ in ("seed", "shard_size", "num_shards", "key_format", "shuffle")},
    )
    out_path = join(output, layout.RESHARD_MANIFEST)
    msha = write_manifest(out_path, out_m, run=run_record)
    return {"manifest": out_path, "sha256": msha, "num_shards": k, "num_samples": n, "bytes": sum(s["bytes"] for s in shards),
            "sample_spans": spans_from, "engine": run_record["engine"], "direct_io": direct}


def _check_visible(out_dir: str, k: int) -> None:
    """Every output shard the tasks reported written is in `out_dir` as this process sees it (one listing,
    again for a while if some are not: storage.still_missing). Executors on other nodes that see another
    folder at the output path (a local disk of each node, not a shared file system) reported their shards
    written where the driver finds none: the manifest would list shards that are not there (found by a new
    user's cluster run: exit 0, and verify then found 0 samples). A shard whose marker is there and tar is not
    was removed after it was written: its marker goes, so that the re-run writes it again."""
    from laiontools.core.storage import DONE_SUFFIX, rm_path, still_missing

    fs, p = url_to_fs(out_dir)
    there: set[str] = set()

    def missing_now() -> list[str]:
        fs.invalidate_cache(p)  # (a listing cached before the tasks wrote would say none is there)
        try:
            there.clear()
            there.update(x.rstrip("/").rsplit("/", 1)[-1] for x in fs.ls(p, detail=False))
        except FileNotFoundError:
            pass
        return [shard_name(j) for j in range(k) if shard_name(j) not in there]

    missing = missing_now()
    # (a marker is written after its shard: a shard missing beside its marker was removed since, no cache's doing)
    stale = [x for x in missing if x + DONE_SUFFIX in there]
    if stale:
        for x in stale:
            rm_path(fs, p.rstrip("/") + "/" + x + DONE_SUFFIX)
        raise ReshardError(f"{len(stale)} output shards in {out_dir} were removed after they were written (e.g. {stale[:3]}); "
                           "their markers are removed too: re-run the same command to write them again")
    missing = still_missing(missing_now) if missing else missing
    if missing:
        raise ReshardError(
            f"the tasks reported {k} output shards written, but {len(missing)} of them are not in {out_dir} as the driver sees it "
            f"(e.g. {missing[:3]}): the executors wrote where the driver does not see; give an --output that every node sees "
            "(a shared file system or an object store) and re-run"
        )


def _not_in_catalog(missing: int) -> ReshardError:
    return ReshardError(f"cannot reshard: {missing} subset uids are not downloaded samples in the pool catalog; "
                        "the pool changed since selection: re-run subsets on it")


def _incomplete_shards(pool: Any, unknown: list[str]) -> ReshardError:
    return ReshardError(f"cannot reshard: samples in shards not listed as complete in {pool.path}: {unknown[:5]}; "
                        "the pool changed since selection: re-run subsets on it")


def _run_local(
    tasks: Any, pool: Any, uid_path: str, uids_sha256: str, urls: Mapping[str, str], n: int, seed: int, q: int, r: int, k: int,
    out_dir: str, plan_id: str, width: int, direct: bool | None,
) -> tuple[dict[int, dict[str, Any]], str, bool] | None:
    """:func:`_run_spark`'s plan and write in this process, for pools whose catalog records every
    sample's byte span (None otherwise: the caller indexes the tars on Spark); returns (results, where
    the spans came from, whether the shards were written with O_DIRECT). `direct` None: chosen by
    :func:`write_direct` from the subset's bytes and the free memory. The same rows in the same
    order reach :func:`write_output_shards`, so the shards are the same bytes (tests/test_reshard.py).
    The spans come from the subset's spans folder when subsets wrote one that matches (where the spans
    came from: "subset spans"), else from the catalog, read one batch at a time, only the subset's rows
    kept (laiontools.contracts.spans)."""
    import numpy as np

    from laiontools.contracts import spans
    from laiontools.contracts.uids import load_uids

    t0 = time.perf_counter()
    # The subset's uids (read here, not from a per-process cache: the file may have been rewritten since
    # an earlier run in this process).
    uids = np.asarray(load_uids(uid_path, mmap=False))
    # The subset's own spans, written by subsets (n rows read); else the catalog's scan (every pool row).
    rows, why = spans.read_spans(uid_path, uids, uids_sha256, pool.sha256)
    spans_from = "subset spans" if rows is not None else "catalog"
    if why:
        log.warning("reshard: the subset's spans are not used: %s; the pool's catalog is read instead", why)
    if rows is None:
        rows = spans.scan_catalog(pool, uids)
        if rows is None:
            return None  # some sample has no span: the tar index (Spark) serves them
    if len(rows) != n:
        raise _not_in_catalog(n - len(rows))
    unknown = sorted(set(rows["_sid"]) - set(urls))
    if unknown:
        raise _incomplete_shards(pool, unknown)
    # Positions by (score, uid): the scores alone when no two are equal (64-bit; the uid breaks a tie).
    h = score_series(rows[C.UID].reset_index(drop=True), seed, person=SHUFFLE_PERSON).to_numpy()
    order = np.argsort(h, kind="stable")
    if n > 1 and bool((h[order][1:] == h[order][:-1]).any()):
        rows["h"] = h
        rows = rows.sort_values(["h", C.UID], kind="stable").reset_index(drop=True)
    else:
        rows = rows.iloc[order].reset_index(drop=True)
    pos = np.arange(n, dtype=np.int64)
    big = r * (q + 1)
    j = np.where(pos < big, pos // (q + 1), r + (pos - big) // max(q, 1)).astype(np.int64)
    i = np.where(pos < big, pos % (q + 1), (pos - big) % max(q, 1)).astype(np.int64)
    log.info("reshard: planned %d samples in %.3f s (in process; spans from the %s)", n, time.perf_counter() - t0, spans_from)
    out_bytes = int(rows[C.TAR_LENGTH].sum())
    free = free_memory()
    fits = free is not None and out_bytes * DIRECT_IO_FREE_FACTOR <= free
    direct = write_direct(direct, out_bytes, free)
    log.info("reshard: %.1f MB to write %s", out_bytes / 1e6, "with O_DIRECT" if direct else
             "through the page cache" + (f" ({free / 1e9:.1f} GB of memory free)" if free is not None else ""))
    cols_ = (i.tolist(), rows[C.UID].tolist(), rows["_sid"].tolist(), rows[C.KEY].tolist(), rows[C.TAR_OFFSET].astype("int64").tolist(),
             rows[C.TAR_LENGTH].astype("int64").tolist(), rows[C.TAR_SHA256].where(rows[C.TAR_SHA256].notna(), None).tolist())
    # Positions are in shard order (j does not decrease), so shard jj is rows bounds[jj]:bounds[jj + 1];
    # each task process makes the entries of its own shards.
    bounds = np.searchsorted(j, np.arange(k + 1)).tolist()

    def entries(jj: int) -> list[_Entry]:
        return [_Entry(ii, uid, sid, key, None, off, off + ln, ln, sha)
                for ii, uid, sid, key, off, ln, sha in zip(*(c[bounds[jj]:bounds[jj + 1]] for c in cols_))]

    t1 = time.perf_counter()
    # In forked processes: parsing and writing tar members is Python, which threads would serialize
    # (measured: 1.4-1.7x faster on 2 cores than 2 threads). Each process draws the next output shard when
    # it is done with one (a fixed share of every workers-th shard left one process idle for 5-80 ms at the
    # end, of ~0.3 s), and writes them all through one buffer pair and one set of open source files: a
    # task per shard opened them again for every shard (20% subset, 16 shards, 2 processes: 0.35-0.39 s
    # a task per shard, 0.33-0.34 s a task per worker).
    # While the task processes work, this one (idle until they are done) asks the kernel for every
    # sample's bytes in the order they will be written, when the free memory holds them: the processes
    # find more of them read, and the disk has more reads queued (measured, 2 % subset, cold: write phase
    # 0.301 s against 0.322 s without, 15 alternated runs each).
    reads = list(zip(cols_[2], cols_[4], cols_[5])) if fits else []
    spans_dir = str(spans.spans_dir_of(uid_path)) if spans_from == "subset spans" else None  # (named in the tasks' errors)
    out = tasks.map(lambda part: write_output_shards(((jj, entries(jj)) for jj in part), out_dir, urls, plan_id, width, direct, spans_dir),
                    list(range(k)), processes=True, pull=True, meanwhile=lambda: _read_ahead(urls, reads))
    log.info("reshard: wrote %d output shards in %.3f s", len(out), time.perf_counter() - t1)
    results = {int(jj): {"num_samples": int(info["num_samples"]), "bytes": int(info["bytes"]), "sha256": info["sha256"]}
               for jj, info in out}
    if sorted(results) != list(range(k)):
        raise ReshardError(f"output shards {sorted(set(range(k)) - set(results))[:5]} were not written; re-run reshard to resume")
    return results, spans_from, direct


def _run_spark(
    spark: Any, pool: Any, uid_path: str, uids_sha256: str, urls: Mapping[str, str], n: int, seed: int, q: int, r: int, k: int, out_dir: str, plan_id: str, width: int,
    direct: bool,
) -> tuple[dict[int, dict[str, Any]], str]:
    """Plan, index (unless the catalog has every sample's byte span) and write; return the written
    shards' info and where the sample byte ranges came from ("subset spans", "catalog" or "tar index")."""
    from pyspark.sql import functions as F
    from pyspark.sql import types as T

    from laiontools.contracts import spans as subset_spans

    shuffle = F.pandas_udf(lambda s: score_series(s, seed, person=SHUFFLE_PERSON), T.LongType())
    sid = subset_spans.spark_shard_id()
    # The subset's own spans, written by subsets (its rows only); else the pool's catalog (every row).
    own, why = subset_spans.spark_read_spans(spark, uid_path, n, uids_sha256, pool.sha256)
    if why:
        log.warning("reshard: the subset's spans are not used: %s; the pool's catalog is read instead", why)
    if own is not None:
        has_spans = has_sha = True
        span_cols = [F.col(C.TAR_OFFSET).alias("_toff"), F.col(C.TAR_LENGTH).alias("_tlen"), F.col(C.TAR_SHA256).alias("_tsha")]
        rows = own.select(C.UID, sid.alias("_sid"), C.KEY, *span_cols).withColumn("h", shuffle(F.col(C.UID)))
    else:
        # (a catalog file that stores a column all null with Arrow's null type: read as nulls of its type)
        cat = spark_read_catalog(spark, pool, catalog_footers(pool))
        # Pools downloaded by this version record each sample's byte span in its tar: then no tar is
        # indexed at all. Older pools (or samples without a span) go through the tar header index.
        spans = [c for c in (C.TAR_OFFSET, C.TAR_LENGTH) if c in cat.columns]
        has_spans = len(spans) == 2
        # ... and the sha256 of each span, checked for every sample copied (pools that predate it: unchecked).
        has_sha = has_spans and C.TAR_SHA256 in cat.columns
        spans += [C.TAR_SHA256] if has_sha else []
        cat = cat.select(C.UID, C.STATUS, C.SHARD, C.KEY, *(spans if has_spans else []))
        span_cols = [F.col(C.TAR_OFFSET).alias("_toff"), F.col(C.TAR_LENGTH).alias("_tlen")] if has_spans else []
        span_cols += [F.col(C.TAR_SHA256).alias("_tsha")] if has_sha else []
        rows = (
            keep_members(cat.filter(F.col(C.STATUS) == C.STATUS_SUCCESS), C.UID, uid_path)
            .withColumn("_sid", sid)
            # One row per uid even if the catalog lists a sample twice: the smallest (shard, key) wins.
            .groupBy(C.UID)
            .agg(F.min(F.struct("_sid", C.KEY, *span_cols)).alias("s"))
            .select(C.UID, F.col("s._sid").alias("_sid"), F.col(f"s.{C.KEY}").alias(C.KEY),
                    *[F.col(f"s.{c}") for c in ("_toff", "_tlen", "_tsha")[: len(span_cols)]])
            .withColumn("h", shuffle(F.col(C.UID)))
        )
    # Global positions without taking rows through Python: after the sort, monotonically_increasing_id
    # is (partition << 33) + row number inside the partition, in sorted order, and partitions hold
    # increasing ranges; one count per partition (a handful of rows) turns it into the position.
    # Persisted so the ids the counts were taken from are the ids the plan uses.
    span_names = ["_toff", "_tlen", "_tsha"][: len(span_cols)]
    ordered = rows.orderBy("h", C.UID).select(C.UID, "_sid", C.KEY, *span_names, F.monotonically_increasing_id().alias("_mid")).persist()
    joined = None
    t0 = time.perf_counter()
    try:
        nulls = F.sum(F.when(F.col("_toff").isNull() | F.col("_tlen").isNull(), 1).otherwise(0)) if has_spans else F.lit(0)
        per_part = ordered.groupBy(F.shiftright("_mid", 33).alias("pid")).agg(F.count(F.lit(1)).alias("count"), nulls.alias("nulls")).collect()
        counts = sorted((int(x["pid"]), int(x["count"])) for x in per_part)
        use_spans = has_spans and sum(int(x["nulls"] or 0) for x in per_part) == 0
        got = sum(c for _, c in counts)
        log.info("reshard: planned %d samples in %.3f s", got, time.perf_counter() - t0)
        if got != n:
            raise _not_in_catalog(n - got)
        offsets, acc = [], 0
        for pid, c in counts:
            offsets.append((pid, acc))
            acc += c
        offs = spark.createDataFrame(offsets, "pid long, _off long")
        big = r * (q + 1)
        pos = "(_off + (_mid & 8589934591))"  # 2**33 - 1: the row number inside the partition
        plan = (
            ordered.withColumn("pid", F.shiftright("_mid", 33))
            .join(F.broadcast(offs), "pid")
            .select(
                C.UID, "_sid", C.KEY, *span_names,
                F.expr(f"CAST(CASE WHEN {pos} < {big} THEN {pos} div {q + 1} ELSE {r} + ({pos} - {big}) div {q} END AS INT)").alias("j"),
                F.expr(f"CAST(CASE WHEN {pos} < {big} THEN {pos} % {q + 1} ELSE ({pos} - {big}) % {q} END AS INT)").alias("i"),
            )
        )
        sc = spark.sparkContext
        t1 = time.perf_counter()
        known = spark.createDataFrame(sorted(urls.items()), "_sid string, url string")
        if use_spans:
            # Every sample's byte span is in the catalog: nothing to index. Samples in shards the pool
            # does not list as complete are still refused.
            unknown = [x["_sid"] for x in plan.join(F.broadcast(known), "_sid", "left_anti").select("_sid").distinct().limit(5).collect()]
            if unknown:
                raise _incomplete_shards(pool, sorted(unknown))
            joined, cols = plan, ["j", "i", C.UID, "_sid", C.KEY, *span_names]
            log.info("reshard: sample byte spans come from the catalog (no tar indexed): %.3f s", time.perf_counter() - t1)
        else:
            # Source tar headers -> one row per sample with its members as parallel arrays, built as Arrow
            # batches in the tasks (no per-member Python rows). Only the needed shards that the pool lists
            # as complete are indexed; samples of any other shard come out of the left join without
            # members and are reported below. The joined plan is persisted: the check, the range
            # partitioning and the write all read it.
            index = (
                ordered.select("_sid").distinct().join(F.broadcast(known), "_sid")
                .repartition(max(1, min(len(urls), sc.defaultParallelism * 4)))
                .mapInArrow(_index_batches, _INDEX_SCHEMA)
            )
            joined = plan.join(index, on=["_sid", C.KEY], how="left").persist()
            missing = joined.filter(F.col("exts").isNull()).select("_sid", C.KEY).limit(5).collect()
            if missing:
                unknown = sorted({x["_sid"] for x in missing if x["_sid"] not in urls})
                if unknown:
                    raise _incomplete_shards(pool, unknown)
                raise ReshardError(
                    f"source shards lack samples the catalog lists, e.g. {[(x['_sid'], x[C.KEY]) for x in missing]}; "
                    "the pool is damaged: run `laiontools verify` on it"
                )
            ordered.unpersist()
            cols = ["j", "i", C.UID, "_sid", C.KEY, "exts", "offs", "sizes", "mtimes"]
            log.info("reshard: indexed the source shards and joined in %.3f s", time.perf_counter() - t1)
        t1 = time.perf_counter()
        # Contiguous ranges of output shards per task, rows in (shard, index) order, handed to Python
        # as Arrow batches; each task reads the source byte ranges and writes its shards itself.
        nparts = max(1, min(k, sc.defaultParallelism * 4))
        spans_dir = str(subset_spans.spans_dir_of(uid_path)) if own is not None else None  # (named in the tasks' errors)
        out = (
            joined.select(*cols)
            .repartitionByRange(nparts, "j")
            .sortWithinPartitions("j", "i")
            .mapInArrow(lambda it: _write_batches(it, out_dir, urls, plan_id, width, direct, spans_dir), _RESULT_SCHEMA)
            .collect()
        )
        log.info("reshard: wrote %d output shards in %.3f s", len(out), time.perf_counter() - t1)
    finally:
        ordered.unpersist()
        if joined is not None:
            joined.unpersist()
        if own is not None:  # (spark_read_spans persisted the rows it checked)
            own.unpersist()
    results = {int(x["j"]): {"num_samples": int(x["num_samples"]), "bytes": int(x["bytes"]), "sha256": x["sha256"]} for x in out}
    if sorted(results) != list(range(k)):
        raise ReshardError(f"output shards {sorted(set(range(k)) - set(results))[:5]} were not written; re-run reshard to resume")
    return results, ("subset spans" if own is not None else "catalog" if use_spans else "tar index")


def build_parser() -> argparse.ArgumentParser:
    p = config_parser(ReshardConfig, prog="laiontools reshard", skip=("seed",),
                      description="Write a subset into shuffled, evenly sized webdataset shards (Spark).")
    # Parsed by the config (parse_seed), so a bad value gets the same clear message as from YAML.
    p.add_argument("--seed", dest="seed", default=argparse.SUPPRESS, help="shuffle seed (default: the subset's selection seed)")
    return p


def main(argv: list[str] | None = None) -> int:
    from laiontools.core.stage import stage_main

    return stage_main(__name__, argv)
