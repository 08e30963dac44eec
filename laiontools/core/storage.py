"""Where data lives: fsspec paths, atomic writes, sha256, completion markers.

Rules every stage follows: data is written under a temporary name and renamed into place; a unit of
work (a shard) is done only when its completion marker, written *last*, exists. Never decide a shard
is done because its data file exists: half-written files exist too.
"""

from __future__ import annotations

import contextlib
import copy
import datetime
import hashlib
import importlib.util
import json
import logging
import os
import posixpath
import re
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any, BinaryIO, TypeVar
from urllib.parse import unquote

import fsspec
from fsspec.implementations.local import LocalFileSystem

from laiontools.core.errors import InputError, UserError, task_error
from laiontools.core.redact import REDACTED, is_redacted, redact, redacted_path_error

log = logging.getLogger(__name__)

DONE_SUFFIX = ".done"

# Parquet page CRCs. Every parquet file this package writes through pyarrow carries a CRC32 per page (as
# Spark's writer, parquet-mr, does by default), and every read through pyarrow checks the CRCs a file has
# (a file without them reads as before): a flipped bit in a page is then an error naming the file, where
# it could read back as a wrong value (a sha256, an offset, a uid). Spark's own reader checks them
# through core.spark's parquet.page.verify-checksum.enabled.
#
# zstd, not Arrow's and Spark's default snappy: a catalog's uid and sha256 columns are random hex, which
# snappy leaves as it is (4 bits of information in every byte) and zstd's entropy coder halves, and its
# urls and captions shrink more too. Measured on the demo's catalog: 242 -> 149 bytes a row; the plan
# columns of a 128k-row catalog 14.6 -> 7.5 MB and read no slower (BENCHMARKS "catalog compression").
# At 2.3B rows that is ~200 GB less catalog to store and to read for each subsets, reshard and takedown
# scan. Spark's own writer gets the same codec as a session default (core.spark.RUNTIME_DEFAULTS); a
# user's spark.sql.parquet.compression.codec wins there and in every file Spark's tasks write through
# pyarrow (spark_write_parquet's, spans parts, embed's metadata, dedup's and semdedup's reports, takedown's
# rewritten shard parquet, prepare's and download's retry input: spark_parquet_codec). The in-process
# engine has no Spark conf: its files are PARQUET_CODEC.
PARQUET_CODEC = "zstd"
PARQUET_WRITE = {"write_page_checksum": True, "compression": PARQUET_CODEC}
PARQUET_READ = {"page_checksum_verification": True}


# An object store that accepts connections and never answers must not hold a stage: botocore's own
# defaults (60 s per read, 3 attempts in its standard mode, each call retried 5 times by s3fs) kept
# `verify s3://...` silent for over 5 minutes. These bound every S3 client in the process (ours,
# img2dataset's writer, the training reader, all through fsspec): 20 s per read, 2 attempts per request,
# so a store that never answers ends in one error naming the endpoint after ~3.5 minutes; a setting the
# user gives in fsspec's configuration (FSSPEC_S3 JSON's "config_kwargs") wins, key by key.
S3_CLIENT_DEFAULTS: dict[str, Any] = {"connect_timeout": 10, "read_timeout": 20,
                                      "retries": {"total_max_attempts": 2, "mode": "standard"}}


def bound_object_store_clients() -> None:
    """Put :data:`S3_CLIENT_DEFAULTS` under the user's fsspec configuration for s3. (s3fs serves s3a too
    and reads the s3 settings for both; settings under s3a, if any, replace them whole, as fsspec does.)
    Where gcsfs is installed, gs:// and gcs:// get :class:`laiontools.core.gcs.BoundedGCSFileSystem`
    (its :data:`~laiontools.core.gcs.GCS_REQUESTS_TIMEOUT` unless the user set a requests_timeout)."""
    conf = fsspec.config.conf.setdefault("s3", {})
    kwargs = conf.setdefault("config_kwargs", {})
    if isinstance(kwargs, dict):  # (a string from FSSPEC_S3_CONFIG_KWARGS: left as the user gave it)
        for k, v in S3_CLIENT_DEFAULTS.items():
            kwargs.setdefault(k, copy.deepcopy(v))  # (botocore rewrites a retries dict in place)
    if importlib.util.find_spec("gcsfs") is not None:  # by name: gcsfs and aiohttp load only when gs:// is used
        for scheme in ("gs", "gcs"):
            target: Any = "laiontools.core.gcs.BoundedGCSFileSystem"
            if scheme in fsspec.registry:
                # gs:// was opened in this process before laiontools was imported (img2dataset's writer in a
                # Spark task): fsspec keeps the class it imported then and ignores a name registered later
                from laiontools.core.gcs import BoundedGCSFileSystem as target
            fsspec.register_implementation(scheme, target, clobber=True)


bound_object_store_clients()


def is_local(fs: fsspec.AbstractFileSystem) -> bool:
    return isinstance(fs, LocalFileSystem)


# Object-store clients whose listings cache is turned off: Spark tasks in other processes write the
# files the driver then lists, and a cached listing would hide them (or show deleted temp keys).
_NO_LISTINGS_CACHE = ("s3", "s3a", "gs", "gcs", "az", "abfs")
# This process's local file system instance (by pid: a forked task process makes its own, as fsspec does).
_LOCAL_FS: dict[int, LocalFileSystem] = {}


def url_to_fs(path: str, **storage_options: Any) -> tuple[fsspec.AbstractFileSystem, str]:
    """(file system, protocol-less path) for `path`; credentials and endpoints come from the environment
    and fsspec's configuration, never from our settings. `storage_options` go to the file system's
    constructor (a caller's bound on one read, e.g. http's ``client_kwargs``); a local path takes none."""
    if isinstance(path, str) and "://" not in path and "::" not in path:
        # A plain local path: what fsspec answers (its local file system, the path made absolute and
        # posix), without its URL parsing and instance lookup (~33 us a call against ~4; reshard resolves
        # every source shard and output file, a few hundred times a run).
        fs = _LOCAL_FS.get(os.getpid())
        if fs is None:
            _LOCAL_FS.clear()
            fs = _LOCAL_FS[os.getpid()] = fsspec.filesystem("file")
        return fs, fs._strip_protocol(path)
    if REDACTED in path and is_redacted(path):
        raise StorageError(redacted_path_error(path))
    scheme = path.split("://", 1)[0].lower() if "://" in path else ""
    # URL schemes are case-insensitive (path_key reads "S3://" as s3); fsspec's registry is lowercase
    url = scheme + path[len(scheme):] if scheme else path
    try:
        if scheme in _NO_LISTINGS_CACHE:
            return fsspec.core.url_to_fs(url, use_listings_cache=False, **storage_options)
        return fsspec.core.url_to_fs(url, **storage_options)
    except ImportError as e:  # a known scheme whose client is not installed (fsspec: "Install adlfs to access ...")
        raise InputError(f"{path}: {e}") from e
    except ValueError as e:
        if "Protocol not known" not in str(e):
            raise
        raise InputError(f"{path}: unknown storage scheme {scheme + '://'!r}; give a local path or a URL fsspec "
                         "reaches (s3://, gs://, hdfs://, ...)") from e


def join(base: str, *parts: str) -> str:
    """Join path parts with '/', keeping a URL scheme intact."""
    out = base.rstrip("/")
    for p in parts:
        out = out + "/" + p.strip("/")
    return out


def _tmp_name(path: str) -> str:
    head, _, tail = path.rpartition("/")
    return f"{head}/.{tail}.tmp-{uuid.uuid4().hex[:8]}" if head else f".{tail}.tmp-{uuid.uuid4().hex[:8]}"


_TMP_RE = re.compile(r"^\..+\.tmp-[0-9a-f]{8}$")  # the names _tmp_name makes


def remove_stale_temps(root: str) -> int:
    """Delete the temp files :func:`atomic_open` leaves when its process is killed mid-write, anywhere
    under the folder `root`; returns how many. Call it only while holding the folder's output
    lock (no live writer then). Object stores too: a killed PUT leaves no object, but atomic_open's
    temp key is whole from its PUT until the move (a copy, then a delete) removes it, and a kill in
    between left it for good (a re-run writes under a new temp name); one listing of the output.
    S3: the unfinished multipart uploads of temp keys too (:func:`_abort_stale_uploads`)."""
    fs, p = url_to_fs(root)
    if not is_local(fs):
        with store_errors(root):
            n = _remove_keys(fs, fs.find(p), _TMP_RE)
        return n + _abort_stale_uploads(fs, p)
    if not os.path.isdir(p):
        return 0
    return _remove_files(os.path.join(d, name) for d, _, names in os.walk(p) for name in names if _TMP_RE.match(name))


def _abort_stale_uploads(fs: fsspec.AbstractFileSystem, p: str) -> int:
    """S3 (s3fs): abort the multipart uploads of temp keys under `p` (``bucket/prefix``); returns how many.
    s3fs uploads a file larger than its block size (50 MiB) in parts as it is written: a killed write
    (a reshard shard) leaves its upload open, its parts stored and billed but in no listing, for good.
    Best effort: a store that refuses the listing (no s3:ListBucketMultipartUploads) is logged, not fatal."""
    if not hasattr(fs, "call_s3"):
        return 0
    bucket, _, key = p.strip("/").partition("/")
    prefix, more, n = (key + "/" if key else ""), {}, 0
    try:
        while True:
            out = fs.call_s3("list_multipart_uploads", Bucket=bucket, Prefix=prefix, **more)
            for u in out.get("Uploads") or []:
                if _TMP_RE.match(u["Key"].rpartition("/")[2]):
                    fs.call_s3("abort_multipart_upload", Bucket=bucket, Key=u["Key"], UploadId=u["UploadId"])
                    n += 1
            if not out.get("IsTruncated"):
                return n
            more = {"KeyMarker": out["NextKeyMarker"], "UploadIdMarker": out["NextUploadIdMarker"]}
    except OSError as e:
        log.warning("s3://%s: could not abort the multipart uploads a killed run left (%s); they are kept", p, e)
        return n


def _remove_keys(fs: fsspec.AbstractFileSystem, keys: list[str], name: re.Pattern[str]) -> int:
    """Delete the object-store keys whose last segment matches `name` (one request); returns how many."""
    stale = [k for k in keys if name.match(k.rpartition("/")[2])]
    if stale:
        rm_path(fs, stale)
    return len(stale)


def _remove_files(paths: Iterator[str]) -> int:
    """Delete the local files; returns how many (one already gone is not counted)."""
    n = 0
    for path in paths:
        try:
            os.remove(path)
            n += 1
        except FileNotFoundError:
            pass
    return n


def remove_stale_file_temps(path: str) -> int:
    """:func:`remove_stale_temps` for a stage whose output is one file: the temps of that file, of its
    completion marker and of its hidden ownership marker, beside it (not the folder's other files,
    which may be other outputs with live writers); returns how many. On an object store, one listing
    of the file's prefix (a killed move between its copy and its delete leaves a whole temp key)."""
    from laiontools.contracts.layout import OUTPUT_MARKER

    fs, p = url_to_fs(path)
    local = is_local(fs)
    folder, _, name = (os.path.abspath(p) if local else p.rstrip("/")).rpartition("/")
    own = re.compile(rf"^\.(?:{re.escape(name)}(?:\.done)?|\.{re.escape(name + OUTPUT_MARKER)})\.tmp-[0-9a-f]{{8}}$")
    if not local:
        with store_errors(path):
            return _remove_keys(fs, fs.ls(folder, detail=False) if fs.isdir(folder) else [], own)
    entries = os.listdir(folder) if os.path.isdir(folder) else []
    return _remove_files(os.path.join(folder, e) for e in entries if own.match(e))


@contextmanager
def scratch_dir(prefix: str) -> Iterator[str]:
    """A local scratch folder for one task (memory-mapped arrays too large for memory), in the temp
    dir, removed after. Its name holds the host and the process id; the folders of processes on this
    host that no longer run (killed tasks: their ``finally`` never ran) are removed first, so a killed
    task's hundreds of MB do not stay on an executor's disk for good. A folder of a live process, or of
    another host sharing the temp dir, is never touched."""
    import shutil
    import socket
    import tempfile

    base = tempfile.gettempdir()
    host = re.sub(r"[^A-Za-z0-9.]", "_", socket.gethostname())[:64] or "host"
    mine = re.compile(rf"^{re.escape(prefix)}-{re.escape(host)}-(\d+)-[A-Za-z0-9_]+$")
    for name in os.listdir(base):
        m = mine.match(name)
        if m and not pid_alive(int(m.group(1))):
            shutil.rmtree(os.path.join(base, name), ignore_errors=True)
    path = tempfile.mkdtemp(prefix=f"{prefix}-{host}-{os.getpid()}-", dir=base)
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


# A process whose start is this many seconds after the time a lock or folder names as its owner's start
# is another process that was given the owner's pid again (a reboot, or pids wrapped around).
PID_REUSE_SLACK_S = 5.0


def pid_alive(pid: int, started: str | None = None) -> bool:
    """Whether process `pid` of this host is alive and, when `started` (an ISO time, as our locks record)
    is given, could be the process that started then. A process killed but not yet reaped (a zombie:
    its parent died with it and init reaps orphans only every second or two) is not alive: it holds no
    file and no lock. Without /proc (not Linux) only the first test is made."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process
        pass
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            fields = f.read().rsplit(b")", 1)[1].split()  # after the command name, which may hold spaces or ")"
    except (OSError, IndexError):
        return True
    if fields[0] in (b"Z", b"X"):
        return False
    if started:
        try:
            since = datetime.datetime.fromisoformat(started).timestamp()
            with open("/proc/stat", "rb") as f:
                boot = next(int(line.split()[1]) for line in f if line.startswith(b"btime "))
            began = boot + int(fields[19]) / os.sysconf("SC_CLK_TCK")
        except (ValueError, TypeError, OSError, StopIteration, IndexError):
            return True
        if began > since + PID_REUSE_SLACK_S:
            return False
    return True


@contextmanager
def atomic_open(path: str) -> Iterator[BinaryIO]:
    """Open `path` for binary writing; the data appears at `path` only if the block succeeds.

    Local files: write to a hidden temp file in the same folder, fsync, os.replace. Object stores:
    their single PUT is already atomic, so write through to a temp key and move it; a refusal of the
    store's met by this function's own calls (the open, the parts a large write uploads as it goes, the
    upload at close, the move: a write denied to read-only credentials, a missing bucket) is one
    StorageError naming `path`. The rest of the caller's block is not wrapped: it may read other objects
    (reshard and takedown read source shards), whose refusals must not be blamed on `path`.
    """
    fs, p = url_to_fs(path)
    local = is_local(fs)

    def own() -> contextlib.AbstractContextManager:
        return contextlib.nullcontext() if local else store_errors(path)

    parent = p.rpartition("/")[0]
    with own():
        if parent:
            fs.makedirs(parent, exist_ok=True)
    tmp = _tmp_name(p)
    try:
        with own():
            f = fs.open(tmp, "wb")
        with f:
            yield f if local else _OwnWrites(f, own)
            if local:
                f.flush()
                os.fsync(f.fileno())
            else:
                with own():
                    f.close()
        with own():
            if local:
                os.replace(tmp, p)
            else:
                _move_file(fs, tmp, p)
    except BaseException as e:  # noqa: BLE001 - the temporary file removed, then re-raised
        try:
            if fs.exists(tmp):
                fs.rm_file(tmp)
        finally:
            if isinstance(e, OSError) and e.errno is not None and not e.filename:
                # a failed write()/fsync (disk full, quota) names no file: name the one being written
                raise OSError(e.errno, e.strerror, path) from e
            raise


# Characters fsspec reads as a glob pattern in a path it is given (glob, and rm / mv on object stores; a
# copy given a list of sources and a list of destinations takes them as written).
_GLOB_MAGIC = re.compile(r"([*?\[])")


def glob_literal(path: str) -> str:
    """`path` spelled so that an fsspec glob pattern matches it as written: ``*``, ``?`` and ``[`` as
    themselves (``[*]``, ``[?]``, ``[[]``). The same text for a path without them. Use for the literal
    part of a pattern: ``fs.glob(glob_literal(folder) + "/*.parquet")``."""
    return _GLOB_MAGIC.sub(r"[\1]", path)


def _literal(fs: fsspec.AbstractFileSystem, paths: Any) -> Any:
    """What an object store's rm / mv take as these exact paths: they expand what they are given as
    glob patterns (``s3://b/run[1]/x`` would name ``run1/x``, and a delete would remove that other
    object). Local file systems take paths as written."""
    if is_local(fs):
        return paths
    return glob_literal(paths) if isinstance(paths, str) else [glob_literal(q) for q in paths]


def rm_path(fs: fsspec.AbstractFileSystem, paths: Any, recursive: bool = False) -> None:
    """``fs.rm`` of exactly `paths` (a path or a list), whatever characters they hold (:func:`_literal`)."""
    fs.rm(_literal(fs, paths), recursive=recursive)


def mv_path(fs: fsspec.AbstractFileSystem, src: str, dst: str) -> None:
    """``fs.mv`` of exactly the file `src` to `dst`, whatever characters it holds (:func:`_literal`)."""
    fs.mv(_literal(fs, src), dst)


def _move_file(fs: fsspec.AbstractFileSystem, src: str, dst: str) -> None:
    """Move the one object `src` to `dst` on an object store. Not ``fs.mv``: fsspec reads a path holding
    ``[``, ``*`` or ``?`` as a glob there, so a key such as ``run[1]/.x.tmp-…`` matched nothing (the write
    failed naming its temp key) and ``a*b/.x.tmp-…`` made ``dst`` a folder (the object landed at
    ``dst/.x.tmp-…``, and the write said nothing). A store's own single-object move where it has one
    (gcsfs), else a copy and a delete of that key."""
    move = getattr(fs, "mv_file", None)
    if move is not None:
        move(src, dst)
    else:
        fs.cp_file(src, dst)
        fs.rm_file(src)


class _OwnWrites:
    """A store file whose write() and flush() (where a large write uploads its parts) run under `own`,
    so that a refusal names the file being written; everything else is the file's own."""

    def __init__(self, f: Any, own: Callable[[], contextlib.AbstractContextManager]) -> None:
        self._f, self._own = f, own

    def write(self, data: Any) -> int:
        with self._own():
            return self._f.write(data)

    def flush(self) -> None:
        with self._own():
            self._f.flush()

    def __getattr__(self, name: str) -> Any:
        return getattr(self._f, name)


def atomic_write_bytes(path: str, data: bytes) -> None:
    with atomic_open(path) as f:
        f.write(data)


def canonical_json(obj: Any) -> bytes:
    """Deterministic JSON (sorted keys, fixed separators, trailing newline): byte-identical for equal data."""
    return (json.dumps(obj, sort_keys=True, indent=2, ensure_ascii=False, allow_nan=False) + "\n").encode()


def write_json(path: str, obj: Any) -> bytes:
    data = canonical_json(obj)
    atomic_write_bytes(path, data)
    return data


def write_record(path: str, obj: Any) -> bytes:
    """Write a record of a run (settings.json, a manifest and its sidecar, a result naming the settings
    and paths it used) without the credentials a flag may carry (:func:`laiontools.core.redact.redact`)."""
    return write_json(path, redact(obj))


def read_json(path: str) -> Any:
    fs, p = url_to_fs(path)
    with store_errors(path), fs.open(p, "rb") as f:
        return json.loads(f.read())


def sha256_bytes(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def sha256_file(path: str, chunk: int = 1 << 22) -> tuple[str, int]:
    """(sha256 hex, size in bytes) of a file, streamed."""
    fs, p = url_to_fs(path)
    h = hashlib.sha256()
    n = 0
    with fs.open(p, "rb") as f:
        while True:
            b = f.read(chunk)
            if not b:
                break
            h.update(b)
            n += len(b)
    return h.hexdigest(), n


# How long the driver looks again for output that a task reported written before it calls that output not
# visible (written where the driver does not see): a shared file system's client may answer a while from its
# caches (NFS: lookup and attribute caches, 30-60 s by default). Only a failure waits.
VISIBILITY_WAIT_S = 60.0


def still_missing(missing_now: Any, wait_s: float | None = None) -> list[Any]:
    """`missing_now()` (what is not there yet), asked again every few seconds until it is empty or `wait_s`
    (VISIBILITY_WAIT_S) passed; its last answer."""
    import time

    wait = VISIBILITY_WAIT_S if wait_s is None else wait_s
    missing = missing_now()
    deadline = time.monotonic() + wait
    while missing and time.monotonic() < deadline:
        time.sleep(min(5.0, max(0.0, deadline - time.monotonic())))
        missing = missing_now()
    return missing


def marker_path(path: str) -> str:
    return path + DONE_SUFFIX


def mark_done(path: str, info: dict[str, Any] | None = None) -> None:
    """Write the completion marker of `path` (a shard or output unit). Call it last."""
    write_json(marker_path(path), info or {})


def is_done(path: str) -> bool:
    fs, p = url_to_fs(marker_path(path))
    return fs.exists(p)


def read_marker(path: str) -> dict[str, Any] | None:
    return read_json(marker_path(path)) if is_done(path) else None


# Markers read at once by read_markers: a driver that reads one marker per shard in turn waits a round
# trip each (two requests: exists, then the read), ~230k shards of a 2B pool: 460k round trips, 1-4 h
# at 10-30 ms on an object store; 32 at once make it minutes (the threads wait on the network, not the GIL).
MARKER_READS_AT_ONCE = 32
T = TypeVar("T")
R = TypeVar("R")


def map_reads(read: Callable[[T], R], items: list[T], name: str = "reads") -> list[R]:
    """``[read(x) for x in items]``, up to MARKER_READS_AT_ONCE at once on threads (small reads that
    wait on the network, not the GIL: markers, stats files)."""
    if len(items) < 2:
        return [read(x) for x in items]
    from concurrent.futures import ThreadPoolExecutor

    with ThreadPoolExecutor(min(MARKER_READS_AT_ONCE, len(items)), thread_name_prefix=f"laiontools-{name}") as ex:
        return list(ex.map(read, items))


def read_markers(paths: list[str]) -> list[dict[str, Any] | None]:
    """:func:`read_marker` of each path, in order, up to MARKER_READS_AT_ONCE at once."""
    return map_reads(read_marker, paths, "markers")


def drop_stale_files(folder: str, suffix: str, current: set[str], why: str, folders: bool = False) -> None:
    """Remove the files ``<name><suffix>`` in `folder` whose name is not in `current` (hidden entries and
    other suffixes are left alone; with `folders`, the sub-folders instead, whole): a stage's per-unit
    outputs that an earlier run into the same output planned and this run does not (other shards, other
    units, other eps), so that whoever reads the folder as one dataset sees only this run's. `why` ends the
    log line (e.g. "a shard no longer in the pool")."""
    fs, p = url_to_fs(folder)
    if not fs.exists(p):
        return
    for entry in fs.ls(p, detail=True):
        f = entry["name"]
        name = f.rstrip("/").rsplit("/", 1)[-1]
        if (name.startswith(".") or not name.endswith(suffix) or name[: len(name) - len(suffix)] in current
                or (entry.get("type") == "directory") != folders):
            continue
        log.info("removing %s: %s", f, why)
        rm_path(fs, f, recursive=folders)


def ensure_output_dir(path: str) -> None:
    """Create `path` as a folder; raise a clear error if it exists as a file."""
    check_store(path)
    fs, p = url_to_fs(path)
    with store_errors(path):
        if fs.exists(p) and not fs.isdir(p):
            raise NotADirectoryError(f"output {path} exists and is a file; give a folder path (new or existing)")
        fs.makedirs(p, exist_ok=True)


# Spellings of one object store that different clients use (Hadoop's s3a/s3n, gcsfs's gcs).
_SCHEME_ALIASES = {"s3a": "s3", "s3n": "s3", "gcs": "gs", "abfss": "abfs", "wasbs": "wasb"}
# File systems whose URLs carry a host (name node) that fsspec drops from its paths.
_HOST_SCHEMES = {"hdfs", "viewfs", "webhdfs"}
_SCHEME_RE = re.compile(r"^([A-Za-z][A-Za-z0-9+.-]+):(.*)$", re.DOTALL)


def path_key(path: str, *, uri_encoded: bool = False) -> str:
    """One spelling of a file's location, for matching paths that different systems wrote down.

    Spark (``input_file_name()``, percent-encoded URIs: pass ``uri_encoded=True``), Hadoop (``s3a://``,
    ``file:/x``), fsspec (``s3://``, or a protocol-less ``bucket/key`` once stripped — pass the full URL
    here, not the stripped path) and users spell one file differently. Keys: ``file:///abs/path`` for
    local files (relative paths resolved against the working folder), ``hdfs:///path`` for HDFS-like
    stores (the name node dropped, as fsspec does), ``<scheme>://bucket/key`` otherwise, with
    s3a/s3n -> s3 and gcs -> gs. Equal keys name the same file.
    """
    m = _SCHEME_RE.match(path)
    scheme, rest = (m.group(1).lower(), m.group(2)) if m else ("file", path)
    if uri_encoded:
        rest = unquote(rest)
    scheme = _SCHEME_ALIASES.get(scheme, scheme)
    if scheme in ("file", "local"):
        if rest.startswith("//"):  # file://host/path or file:///path; the host is this machine
            rest = "/" + rest[2:].partition("/")[2]
        return "file://" + os.path.abspath(rest)
    rest = rest[2:] if rest.startswith("//") else rest.lstrip("/")
    if scheme in _HOST_SCHEMES:
        return f"{scheme}:///" + posixpath.normpath("/" + rest.partition("/")[2]).lstrip("/")
    return f"{scheme}://" + posixpath.normpath(rest).lstrip("/")


# ---------------------------------------------------------------------------------------------------
# Object stores: clear errors, and Spark reads/writes where Spark has no Hadoop connector for them.

class StorageError(UserError):
    """An object store refused or could not be reached: the message names the path and what to do."""


# Schemes Spark's own (Hadoop) readers and writers reach. Anything else (s3://, gs://, ... on a machine
# without the hadoop-aws / gcs connector jars) is read and written by pyarrow + fsspec inside Spark
# tasks. A cluster that has the connectors can name them here (LAIONTOOLS_SPARK_NATIVE_SCHEMES=s3,gs)
# to use Spark's own readers (s3:// is then handed to Spark as s3a://).
_SPARK_NATIVE_DEFAULT = "file,hdfs,viewfs"
_HADOOP_SCHEME = {"s3": "s3a"}


def _spark_native_schemes() -> set[str]:
    raw = os.environ.get("LAIONTOOLS_SPARK_NATIVE_SCHEMES", "")
    return set(_SPARK_NATIVE_DEFAULT.split(",")) | {s.strip().lower() for s in raw.split(",") if s.strip()}


def scheme_of(path: str) -> str:
    """The canonical scheme of `path` (``file`` for local paths; s3a/s3n -> s3, gcs -> gs)."""
    return path_key(path).split("://", 1)[0]


def spark_native(path: str) -> bool:
    """True when Spark's own readers/writers reach `path` here (see LAIONTOOLS_SPARK_NATIVE_SCHEMES)."""
    return scheme_of(path) in _spark_native_schemes()


def _hadoop_path(path: str) -> str:
    scheme = scheme_of(path)
    if scheme in _HADOOP_SCHEME and "://" in path:
        return _HADOOP_SCHEME[scheme] + "://" + path.split("://", 1)[1]
    return path


# Characters Hadoop's glob (which Spark's readers apply to every path they are given) reads as a pattern:
# * ? [...] {a,b}, and the backslash that escapes them. More than fsspec's (no braces, no escape there).
_HADOOP_MAGIC = re.compile(r"([\\*?\[\]{}])")


def hadoop_literal(path: str) -> str:
    """`path` spelled so that Hadoop's glob matches it as written: each of ``\\ * ? [ ] { }`` escaped with a
    backslash (``run[1]`` -> ``run\\[1\\]``). The same text for a path without them. For paths given to Spark's
    readers (``spark.read.parquet``): given ``/data/run[1]/catalog`` as it is, Spark read ``/data/run1/catalog``
    (another pool's catalog, without a word) or said the path does not exist. Not for writers: Spark's
    writers take their path as written (an escaped path would name a folder holding backslashes)."""
    return _HADOOP_MAGIC.sub(r"\\\1", path)


def _on_executor() -> str:
    """A note for errors met inside a Spark task: the executors' environment is not the driver's."""
    import sys

    if "pyspark" not in sys.modules:
        return ""
    try:
        from pyspark import TaskContext

        if TaskContext.get() is None:
            return ""
    except Exception:  # noqa: BLE001 (no usable pyspark: not in a task)
        return ""
    return (" [met on a Spark executor: executors need the driver's credentials and endpoint too, e.g. "
            "--conf spark.executorEnv.AWS_ACCESS_KEY_ID=... (docs/scale.md)]")


def store_error(e: BaseException, path: str) -> StorageError | None:
    """`e` as a StorageError naming `path` when it is an object store's refusal or an unreachable
    endpoint (missing bucket, access denied, connection failure); None for anything else. Inside a
    Spark task the message also says that an executor met it (its credentials, endpoint)."""
    err = _store_error(e, path)
    if err is not None and (note := _on_executor()) and not isinstance(e, StorageError):
        err = StorageError(str(err) + note)
    return err


def store_refusal(e: BaseException, path: str) -> Exception | None:
    """What a reader of `path` raises instead of recording `e` as damage of what it read, when `e` is an object
    store's refusal or an unreachable endpoint (throttling, a server fault, access denied, a connection lost:
    :func:`store_error`): a task error naming `path` and the store, so that a Spark task's reaches the CLI in
    one line too. None otherwise, and always for a local path (an I/O error there is the file's own).

    For the readers that turn a read error into a finding or a recorded status (verify's "unreadable tar", the
    catalog's spans of a shard that cannot be indexed): a store that says "slow down" between two reads must not
    make an intact file damaged, or a run's output differ from an uninterrupted run's."""
    if "://" not in path or path.startswith("file://"):
        return None
    refused = store_error(e, path)
    return task_error(str(refused)) if refused is not None else None


# The environment variables that name an endpoint other than the default, per store (for the error messages)
_GCS_SETTINGS = ("STORAGE_EMULATOR_HOST", "FSSPEC_GS_ENDPOINT_URL")
_S3_SETTINGS = ("FSSPEC_S3_ENDPOINT_URL", "AWS_ENDPOINT_URL_S3", "AWS_ENDPOINT_URL")


def _is_gcs(path: str) -> bool:
    return scheme_of(path) == "gs"


def _endpoint(path: str = "") -> str:
    names = _GCS_SETTINGS if _is_gcs(path) else _S3_SETTINGS
    return next((os.environ[n] for n in names if os.environ.get(n)), "the default endpoint")


def _endpoint_settings(path: str) -> str:
    return " / ".join(_GCS_SETTINGS if _is_gcs(path) else _S3_SETTINGS)


def _store_error(e: BaseException, path: str) -> StorageError | None:
    names = {type(x).__name__ for x in _chain(e)}
    text = " ".join(str(x) for x in _chain(e))
    where = path.split("://", 1)
    bucket = where[1].split("/", 1)[0] if len(where) == 2 else None
    if names & {"SSLError", "SSLCertVerificationError", "ClientConnectorSSLError", "ClientConnectorCertificateError",
                "ClientSSLError"}:
        if scheme_of(path) in ("http", "https"):  # a web server's (an input, a list), not an object store's endpoint
            return StorageError(f"{path}: cannot make a TLS connection to its server ({type(e).__name__}: "
                                f"{' '.join(str(e).split())[:200]}); check the URL's scheme and the server's certificate")
        return StorageError(f"{path}: cannot make a TLS connection to the object store at {_endpoint(path)} ({type(e).__name__}); "
                            f"check the endpoint's scheme (http:// or https://) and its certificate ({_endpoint_settings(path)}"
                            + ("" if _is_gcs(path) else ", AWS_CA_BUNDLE") + ")")
    bad = re.search(r"Invalid endpoint: (\S+)", text) if "ValueError" in names else None
    if bad:  # botocore: an endpoint setting without http(s)://, from the environment or the AWS config file
        return StorageError(f"{path}: the object store endpoint {bad.group(1)!r} is not a URL; give it as "
                            f"http(s)://host[:port] ({_endpoint_settings(path)}, or endpoint_url in the AWS config file)")
    if names & {"EndpointConnectionError", "ConnectTimeoutError", "ClientConnectorError", "ConnectionError",
                "ConnectionRefusedError", "ServerDisconnectedError"} or "Could not connect to the endpoint" in text:
        return StorageError(f"{path}: cannot reach the object store at {_endpoint(path)} ({type(e).__name__}); check "
                            f"the endpoint setting ({_endpoint_settings(path)}) and the network")
    if names & {"ReadTimeoutError", "FSTimeoutError", "SocketTimeoutError"} or "Read timeout on endpoint" in text:
        return StorageError(f"{path}: the object store at {_endpoint(path)} accepted the connection but did not answer in "
                            f"time ({type(e).__name__}); check the endpoint setting ({_endpoint_settings(path)}) and "
                            "the store's health")
    busy = _busy_answer(e)
    if busy:
        return StorageError(f"{path}: the object store at {_endpoint(path)} is throttling requests or unavailable ({busy}) "
                            "after its client's retries; re-run the same command later (finished work is kept), or "
                            "with fewer tasks at once")
    if "ProfileNotFound" in names:
        return StorageError(f"{path}: {' '.join(str(e).split())[:200]} (AWS_PROFILE names a profile that is not in the AWS config "
                            "files); fix AWS_PROFILE or ~/.aws/config and ~/.aws/credentials, on the driver and every executor")
    if names & {"NoCredentialsError", "PartialCredentialsError", "DefaultCredentialsError"} or "Unable to locate credentials" in text:
        creds = ("GOOGLE_APPLICATION_CREDENTIALS), `gcloud auth application-default login`, the machine's service "
                 "account" if _is_gcs(path) else
                 "AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY, or AWS_PROFILE), an instance role")
        return StorageError(f"{path}: no credentials for the object store ({type(e).__name__}); set them in the "
                            f"environment ({creds}, or fsspec's configuration, on the driver and every executor")
    # (gcsfs says only "b/<bucket>/o" for a missing bucket, the path of the bucket's listing it asked for)
    if "NoSuchBucket" in text or (isinstance(e, FileNotFoundError) and bucket and
                                  ("bucket" in text.lower() or f"b/{bucket}/o" in {str(x) for x in _chain(e)})):
        return StorageError(f"{path}: bucket {bucket!r} does not exist (or is not visible with these "
                            f"credentials); create it or fix the path")
    if isinstance(e, PermissionError) or names & {"AccessDenied"} or "AccessDenied" in text or "Forbidden" in text \
            or "InvalidAccessKeyId" in text or "SignatureDoesNotMatch" in text:
        creds = "GOOGLE_APPLICATION_CREDENTIALS / fsspec config" if _is_gcs(path) else "AWS_ACCESS_KEY_ID / AWS_PROFILE / fsspec config"
        said = " ".join(str(e).split())  # gcsfs's message spans lines ("Forbidden: <path>\n<Google's message>")
        return StorageError(f"{path}: access denied by the object store ({type(e).__name__}: {said[:200]}); "
                            f"check the credentials ({creds}) and the bucket policy")
    return None


# A store's answers that say "not now" (throttling, an overloaded or failing server) rather than "no":
# botocore's error codes and HTTP statuses, and gcsfs's HttpError codes, once the clients gave up retrying.
_BUSY_CODES = {"SlowDown", "ServiceUnavailable", "InternalError", "RequestLimitExceeded", "Throttling",
               "ThrottlingException", "TooManyRequests", "TooManyRequestsException", "RequestThrottled", "BandwidthLimitExceeded"}
_BUSY_STATUS = {429, 500, 502, 503, 504}


def _busy_answer(e: BaseException) -> str | None:
    """What a store said when its error in `e`'s chain is throttling or a server fault (e.g.
    "SlowDown: Please reduce your request rate.", "503: Service Unavailable"); None otherwise."""
    for x in _chain(e):
        resp = getattr(x, "response", None)
        if isinstance(resp, dict) and isinstance(resp.get("Error"), dict):  # botocore's ClientError
            code = str(resp["Error"].get("Code", ""))
            status = (resp.get("ResponseMetadata") or {}).get("HTTPStatusCode")
            if code in _BUSY_CODES or (code.isdigit() and int(code) in _BUSY_STATUS) or status in _BUSY_STATUS:
                said = resp["Error"].get("Message") or ""
                return f"{code}: {' '.join(str(said).split())[:200]}" if said else code
        if type(x).__name__ == "HttpError" and getattr(x, "code", None) in _BUSY_STATUS:  # gcsfs
            return f"HTTP {x.code}: {' '.join(str(x).split())[:200]}"
    return None


def failing_url(e: BaseException, urls: list[str]) -> str:
    """Of `urls` (those given on a command line), the one an object store's error names: the longest
    whose path (bucket/key) or, failing that, whose exact bucket name appears in the error chain's text;
    else the first URL."""
    import re

    text = " ".join(str(x) for x in _chain(e))

    def named(url: str) -> int:
        path = url.split("://", 1)[-1].rstrip("/")
        bucket = path.split("/", 1)[0]
        if path in text:
            return 2
        return 1 if bucket and re.search(rf"(?<![\w.-]){re.escape(bucket)}(?![\w.-])", text) else 0

    best = max(urls, key=lambda u: (named(u), len(u)), default=None)
    if best is not None and named(best):
        return best
    return urls[0] if urls else "an object-store path"


def _chain(e: BaseException) -> list[BaseException]:
    out: list[BaseException] = []
    err: BaseException | None = e
    while err is not None and err not in out:
        out.append(err)
        err = err.__cause__ or err.__context__
    return out


@contextmanager
def store_errors(path: str) -> Iterator[None]:
    """Turn an object store's refusal inside the block into one StorageError naming `path`."""
    try:
        yield
    except StorageError:
        raise
    except Exception as e:
        err = store_error(e, path)
        if err is None:
            raise
        raise err from e


def check_store(path: str) -> None:
    """For an object-store path: the bucket exists and these credentials may list it; else StorageError.

    Local paths pass. Called before a stage writes anything, so that a missing bucket is an error
    instead of a bucket that s3fs would quietly create.
    """
    if scheme_of(path) in ("file", "hdfs", "viewfs", "memory"):
        return
    if path.split("://", 1)[-1].startswith("/"):
        # "s3:///b/x": s3fs reads it as bucket "b", but every manifest would record the path as typed
        scheme = path.split("://", 1)[0]
        raise StorageError(f"{path}: no bucket after '{scheme}://' (three slashes); write {scheme}://<bucket>/...")
    if "//" in path.split("://", 1)[-1].rstrip("/"):
        # a local disk reads "a//b" as "a/b"; a store keeps the empty segment in the key, and s3fs then
        # answers "is a file" for a prefix it just wrote under
        raise StorageError(f"{path}: an empty path segment ('//'), which an object store keeps in its keys; "
                           "remove the extra '/'")
    fs, p = url_to_fs(path)
    bucket = p.split("/", 1)[0]
    with store_errors(path):
        fs.invalidate_cache()
        if not fs.exists(bucket):
            # exists() says False for both "no such bucket" and "not allowed": ask for the real answer
            fs.ls(bucket)
            raise StorageError(f"{path}: bucket {bucket!r} does not exist; create it or fix the path")


def swap_temp(final: str) -> str:
    """A new temp folder name next to the folder `final` (``<parent>/.<name>-tmp-<8 hex>``), for a
    rebuild of it that :func:`swap_in` puts in place. First finishes or undoes a swap a kill
    interrupted (:func:`repair_swap`), then removes what a killed rebuild left (its temp folders, a
    copy of `final` it was replacing): callers rebuild `final` whole, so neither is needed."""
    fs, fp = url_to_fs(final)
    repair_swap(final)
    parent, _, name = fp.rstrip("/").rpartition("/")
    for stale in fs.glob(f"{glob_literal(parent)}/.{glob_literal(name)}-tmp-*") + fs.glob(f"{glob_literal(fp.rstrip('/'))}.old-*"):
        rm_path(fs, stale, recursive=True)
    head = final.rstrip("/").rpartition("/")[0]
    return f"{head}/.{name}-tmp-{uuid.uuid4().hex[:8]}"


def _swap_journal(final: str) -> str:
    head, _, name = final.rstrip("/").rpartition("/")
    return f"{head}/.{name}.swap.json"


def swap_pending(final: str) -> bool:
    """Whether a :func:`swap_in` of the folder `final` is under way or was interrupted: `final` may
    then be missing or half moved, and readers refuse it (the next rebuild repairs it)."""
    fs, p = url_to_fs(_swap_journal(final))
    return fs.exists(p)


def _put_tree(src: str, dst: str) -> None:
    """The first half of :func:`move_tree`: local, the rename (all of it); object stores, the copy of
    every key (`src` is removed by :func:`_drop_tree` after the journal records the copy whole)."""
    fs, sp = url_to_fs(src)
    if is_local(fs):
        move_tree(src, dst)
        return
    _, dp = url_to_fs(dst)
    with store_errors(src):
        sp = sp.rstrip("/")
        files = fs.find(sp)
        if not files:
            raise FileNotFoundError(f"{src}: nothing to move")
        fs.copy(files, [dp.rstrip("/") + f[len(sp):] for f in files])  # (lists: taken as written, no glob)


def _drop_tree(path: str) -> None:
    fs, p = url_to_fs(path)
    if fs.exists(p):
        with store_errors(path):
            rm_path(fs, p, recursive=True)


def swap_in(tmp: str, final: str) -> str:
    """Put the folder written at `tmp` in place of `final`; returns `final`.

    A journal beside `final` (``.<name>.swap.json``) says how far the swap got, so that a kill at any
    point leaves a state that the next rebuild (:func:`swap_temp`, :func:`repair_swap`) takes back to
    the old folder while the new one is not whole in place, or forward to the new one after. On local
    disks each move is one rename; on object stores a move copies every key and then removes the
    source, so the journal records each copy whole before its source goes (a kill mid-removal left a
    half-deleted catalog and its whole copy aside, and the next run deleted the copy)."""
    fs, fp = url_to_fs(final)
    journal = _swap_journal(final)
    old = final.rstrip("/") + f".old-{uuid.uuid4().hex[:8]}"
    rec: dict[str, Any] = {"tmp": tmp, "old": None}
    if fs.exists(fp):
        rec["old"] = old
        write_json(journal, {**rec, "phase": "aside"})  # `final` whole; `old` being copied
        _put_tree(final, old)
        write_json(journal, {**rec, "phase": "old-whole"})  # `old` whole; `final` being removed, then replaced
        _drop_tree(final)
    else:
        write_json(journal, {**rec, "phase": "old-whole"})
    _put_tree(tmp, final)
    write_json(journal, {**rec, "phase": "new-whole"})  # `final` is the new folder; the rest is cleanup
    _drop_tree(tmp)
    if rec["old"]:
        _drop_tree(old)
    _drop_tree(journal)
    return final


def repair_swap(final: str) -> str | None:
    """Finish or undo an interrupted :func:`swap_in` of `final` from its journal; returns what was done
    ("kept", "restored" or "completed"; None: no swap was pending). Only a writer holding the output
    calls it (every rebuild does, through :func:`swap_temp`)."""
    journal = _swap_journal(final)
    fs, jp = url_to_fs(journal)
    if not fs.exists(jp):
        return None
    j = read_json(journal)
    phase, old, tmp = j.get("phase"), j.get("old"), j.get("tmp")
    if phase == "aside" and fs.exists(url_to_fs(final)[1]):
        done = "kept"  # killed while `final` was copied aside: `final` is whole, its copy is not
    elif phase in ("aside", "old-whole"):
        # `final` half removed, missing, or partly (even wholly) new; `old` is whole (a local "aside"
        # without `final`: the rename to `old` was done): back to `old`
        _drop_tree(final)
        if old:
            _put_tree(old, final)
            write_json(journal, {**j, "phase": "restored"})
        done = "restored"
    elif phase in ("restored", "new-whole"):  # `final` is whole; only cleanup was left
        done = "restored" if phase == "restored" else "completed"
    else:
        raise InputError(f"{journal}: unknown swap phase {phase!r}; move `{final}` aside by hand and re-run")
    if old:
        _drop_tree(old)
    if tmp:
        _drop_tree(tmp)
    _drop_tree(journal)
    log.warning("%s: a swap interrupted by a kill was %s", final, {"kept": "undone (old folder kept)",
                "restored": "undone (old folder put back)", "completed": "completed"}[done])
    return done


def move_tree(src: str, dst: str) -> None:
    """Move the folder `src` to `dst` (which must not exist). Local: one rename. Object stores have no
    folders (s3fs's recursive mv trips over the prefix itself): every key is copied, then `src` removed,
    so a crash leaves `src` complete and `dst` partial — callers swap in behind a marker written after."""
    fs, sp = url_to_fs(src)
    _, dp = url_to_fs(dst)
    with store_errors(src):
        if is_local(fs):
            fs.mv(sp, dp, recursive=True)
            return
        sp = sp.rstrip("/")
        files = fs.find(sp)
        if not files:
            raise FileNotFoundError(f"{src}: nothing to move")
        fs.copy(files, [dp.rstrip("/") + f[len(sp):] for f in files])  # (lists: taken as written, no glob)
        rm_path(fs, files)


def list_data_files(path: str, suffix: str = ".parquet") -> list[str]:
    """Full URLs of the data files of a dataset folder (or the file itself), sorted; hidden and
    ``_``-prefixed files (``_SUCCESS``, temp files) skipped, as Spark's readers do."""
    fs, p = url_to_fs(path)
    proto = path.split("://", 1)[0] + "://" if "://" in path else ""
    with store_errors(path):
        if not fs.isdir(p):
            if not fs.exists(p):
                raise FileNotFoundError(f"{path}: no such file or folder")
            return [path]
        files = sorted(f for f in fs.find(p) if f.endswith(suffix)
                       and not any(part.startswith(("_", ".")) for part in f[len(p.rstrip("/")) + 1:].split("/")))
    return [proto + f if proto and not f.startswith(proto) else f for f in files]


def spark_path_key(col: Any) -> Any:
    """Column of :func:`path_key` over a column of Spark file URIs (one call per distinct file per batch)."""
    import pandas as pd
    from pyspark.sql.functions import pandas_udf

    def key(uris):  # annotated below
        keys = {u: path_key(u, uri_encoded=True) for u in uris.unique()}
        return uris.map(keys)

    # Real classes, not the strings `from __future__ import annotations` would leave, for pandas_udf.
    key.__annotations__ = {"uris": pd.Series, "return": pd.Series}
    return pandas_udf(key, "string")(col)


def spark_read_parquet(spark: Any, paths: str | list[str], *, file_column: str | None = None, schema: Any = None) -> Any:
    """A DataFrame of the parquet files or dataset folders at `paths`, on any store fsspec reaches.

    Spark's own reader where it reaches the store (:func:`spark_native`); otherwise every file is read
    by pyarrow + fsspec inside a Spark task (one task per file), with the first file's schema.
    `file_column`: add a column holding :func:`path_key` of the file each row came from.
    `schema`: the Arrow schema every file is read with, instead of one file's (Spark's reader then reads a
    column of a file by this type, or as nulls where the file lacks it).
    """
    from pyspark.sql import functions as F
    from pyspark.sql.pandas.types import from_arrow_schema

    paths = [paths] if isinstance(paths, str) else list(paths)
    if not paths:
        raise ValueError("spark_read_parquet: no paths")
    if schema is not None:
        schema = _spark_arrow_schema(schema)
    if all(spark_native(p) for p in paths):
        reader = spark.read if schema is None else spark.read.schema(from_arrow_schema(schema))
        df = reader.parquet(*[hadoop_literal(_hadoop_path(p)) for p in paths])  # names, not patterns
        return df.withColumn(file_column, spark_path_key(F.input_file_name())) if file_column else df
    import pyarrow as pa
    import pyarrow.parquet as pq

    files = [f for p in paths for f in list_data_files(p)]
    if not files:
        raise FileNotFoundError(f"{paths[0]}: no parquet files to read")
    if schema is None:
        fs0, p0 = url_to_fs(files[0])
        with store_errors(files[0]), fs0.open(p0, "rb") as f, parquet_read_errors(files[0]):
            schema = _spark_arrow_schema(pq.read_schema(f))
    if file_column:
        schema = schema.append(pa.field(file_column, pa.string()))
    spark_schema = from_arrow_schema(schema)
    n = max(1, min(len(files), spark.sparkContext.defaultParallelism * 4))
    listing = spark.createDataFrame([(f,) for f in files], "_file string").repartition(n, "_file")
    return listing.mapInArrow(_parquet_reader(schema, file_column), spark_schema)


def _spark_arrow_schema(schema: Any) -> Any:
    """`schema` with the Arrow types Spark has no type for made ones it has (large_string: string)."""
    import pyarrow as pa

    return pa.schema([fld.with_type(pa.string()) if pa.types.is_large_string(fld.type) else fld for fld in schema])


def parquet_damaged(e: BaseException) -> bool:
    """Whether pyarrow's read error says the file's bytes are bad: an Arrow error (not parquet, a bad
    footer), or the plain OSError without errno that it raises for a page whose CRC or compressed data
    does not check out. A store's or the OS's I/O error (a subclass, or with an errno) is not one."""
    import pyarrow as pa

    return isinstance(e, pa.ArrowException) or (type(e) is OSError and e.errno is None)


@contextmanager
def parquet_read_errors(path: str, task: bool = False) -> Iterator[None]:
    """Turn pyarrow's error on a damaged parquet file into one error naming `path` (InputError; with
    `task`, a task error that reaches the user as the same line from a Spark task or a forked process)."""
    try:
        yield
    except Exception as e:
        if not parquet_damaged(e):
            raise
        raise (task_error if task else InputError)(_damaged_parquet(path, e)) from e


def _damaged_parquet(path: str, e: BaseException) -> str:
    """What Spark's own reader says of such a file (errors.damaged_input_error), for pyarrow's reader."""
    return (f"{path} is damaged or truncated ({type(e).__name__}: {str(e)[:200]}); regenerate it by re-running "
            "the stage that wrote it")


def _parquet_reader(schema: Any, file_column: str | None) -> Any:
    def read(batches: Iterator[Any]) -> Iterator[Any]:
        import pyarrow as pa
        import pyarrow.parquet as pq

        data_schema = pa.schema([f for f in schema if f.name != file_column]) if file_column else schema
        for b in batches:
            for path in b.column("_file").to_pylist():
                fs, p = url_to_fs(path)
                with store_errors(path), fs.open(p, "rb") as f, parquet_read_errors(path, task=True):
                    t = pq.read_table(f, **PARQUET_READ)
                # a column the file lacks is read as nulls, as Spark's own reader does
                t = pa.table({fld.name: t.column(fld.name) if fld.name in t.column_names else pa.nulls(t.num_rows, fld.type)
                              for fld in data_schema}).cast(data_schema)
                if file_column:
                    t = t.append_column(file_column, pa.array([path_key(path)] * t.num_rows, pa.string()))
                yield from t.to_batches()

    return read


def spark_write_parquet(df: Any, path: str) -> None:
    """Write `df` as a parquet dataset folder at `path` (replacing it), on any store fsspec reaches.

    Spark's own writer where it reaches the store; otherwise each partition is written by its task as
    ``part-<partition:05d>.parquet`` through pyarrow + fsspec (atomic per file), then ``_SUCCESS`` last.
    Row order within a partition and the partition order are kept, as with Spark's writer.
    """
    if spark_native(path):
        df.write.mode("overwrite").parquet(_hadoop_path(path))
        return
    from pyspark.sql.pandas.types import to_arrow_schema

    fs, p = url_to_fs(path)
    with store_errors(path):
        if fs.exists(p):
            rm_path(fs, p, recursive=True)
    arrow_schema = to_arrow_schema(df.schema)
    written = df.mapInArrow(_parquet_writer(path, arrow_schema, spark_parquet_codec(df.sparkSession)), "rows long").collect()
    if sum(r["rows"] for r in written) == 0 or not written:
        write_parquet_dir(arrow_schema.empty_table(), path)  # no task wrote a file: one typed empty file
        return
    atomic_write_bytes(join(path, "_SUCCESS"), b"")


def write_parquet_dir(table: Any, path: str, rows_per_file: int | None = None) -> None:
    """Write the Arrow `table` as a parquet dataset folder at `path` (replacing it): ``part-00000.parquet``
    and on, each of at most `rows_per_file` rows (None: one file) and written atomically, then ``_SUCCESS``.
    The in-process counterpart of :func:`spark_write_parquet`, read back the same way (an empty table
    still leaves a typed file); a table sorted across its rows stays sorted across the files, as Spark's
    range-partitioned writes are."""
    import math

    import pyarrow.parquet as pq

    fs, p = url_to_fs(path)
    with store_errors(path):
        if fs.exists(p):
            rm_path(fs, p, recursive=True)
    step = rows_per_file or max(1, table.num_rows)
    for i in range(max(1, math.ceil(table.num_rows / step))):
        out = join(path, f"part-{i:05d}.parquet")
        with store_errors(out), atomic_open(out) as f:
            pq.write_table(table.slice(i * step, step), f, **PARQUET_WRITE)
    atomic_write_bytes(join(path, "_SUCCESS"), b"")


# Spark's parquet codec names -> pyarrow's (Spark's "lz4" is the Hadoop framing, which pyarrow writes as "lz4").
_SPARK_CODECS = {"none": "none", "uncompressed": "none", "snappy": "snappy", "gzip": "gzip", "zstd": "zstd", "lz4": "lz4",
                 "lz4_raw": "lz4", "brotli": "brotli"}


def spark_parquet_codec(spark: Any) -> str:
    """The session's parquet codec (the user's spark.sql.parquet.compression.codec, else ours) as pyarrow
    names it; one pyarrow cannot write (lzo) gives our default, with a warning. Computed on the driver and
    handed to the tasks as a string (the session does not travel): every parquet file a Spark task writes
    through pyarrow takes it, ``{**PARQUET_WRITE, "compression": codec}``."""
    name = str(spark.conf.get("spark.sql.parquet.compression.codec", PARQUET_CODEC)).lower()
    if name not in _SPARK_CODECS:
        log.warning("parquet codec %s cannot be written through pyarrow; the files written by tasks use %s", name, PARQUET_CODEC)
    return _SPARK_CODECS.get(name, PARQUET_CODEC)


def _parquet_writer(path: str, schema: Any, codec: str = PARQUET_CODEC) -> Any:
    def write(batches: Iterator[Any]) -> Iterator[Any]:
        import pyarrow as pa
        import pyarrow.parquet as pq
        from pyspark import TaskContext

        pid = TaskContext.get().partitionId()
        bs = [b for b in batches if b.num_rows]
        rows = sum(b.num_rows for b in bs)
        if rows:
            out = join(path, f"part-{pid:05d}.parquet")
            with store_errors(out), atomic_open(out) as f:
                # the batches' own schema (nullability as Spark sends it)
                pq.write_table(pa.Table.from_batches(bs), f, **{**PARQUET_WRITE, "compression": codec})
        yield pa.RecordBatch.from_pydict({"rows": [rows]}, schema=pa.schema([("rows", pa.int64())]))

    return write
