"""`laiontools verify <manifest>` and `laiontools inspect <manifest>`.

verify re-checks every file a manifest names and exits non-zero naming what differs:

* the manifest itself against schemas/manifest.schema.json (unknown schema versions included);
* the uid file: present, sha256, count, dtype, sorted and unique, count == num_samples;
* every shard: present, a regular file, byte size, sha256, readable to the end as a tar (a truncated shard is named),
  number of samples (distinct keys), no repeated key, every sample's uid (from its .json) in the uid file
  and no uid twice; across shards, the uids found equal the uid file (none missing);
* a pool's catalog: present, its rows as many as the manifest's ``catalog.num_rows``, its success rows the samples;
* nesting: the parent manifest exists, its sha256 is the one recorded, its own uid file matches it,
  and this manifest's uids are a subset of the parent's; a parent pool's own lineage (the pools its
  takedowns came from) is each of its recorded sha256.

inspect prints a readable summary: counts, target vs obtained, recipe, funnel, shards.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import tarfile
from contextlib import ExitStack
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from laiontools.contracts import layout
from laiontools.contracts.manifest import read_manifest, resolve
from laiontools.contracts.uids import StreamedUids, is_uid, scan_uid_file
from laiontools.core import failpoints
from laiontools.core.report import emit, table
from laiontools.core.storage import PARQUET_READ, sha256_file, store_refusal, url_to_fs
from laiontools.wds.keys import group_by_keys
from laiontools.wds.samples import POOL_IMAGE_EXTS, compressed_tar_problem, tarfile_members

log = logging.getLogger(__name__)

# Above this many shards (~20M samples at 10k per shard) verify reads the shards on Spark by default: one
# process reads ~0.5-1 GB/s, so a 2B pool's ~200k shards (~50 TB) would take most of a day.
SPARK_ABOVE_SHARDS = 2000


@dataclass
class VerifyResult:
    manifest: str
    problems: list[str] = field(default_factory=list)
    checked: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.problems


def _exists(path: str) -> bool:
    fs, p = url_to_fs(path)
    return fs.exists(p)


def _kind(path: str) -> str:
    """"missing", "file" or "other" (a folder, a device such as /dev/zero that would be read forever),
    from one stat (one request on an object store, for each of a manifest's ~200k shards at 2B)."""
    fs, p = url_to_fs(path)
    try:
        info = fs.info(p)
    except FileNotFoundError:
        return "missing"
    return "file" if info.get("type") == "file" else "other"


_HOLD_ALL = 1 << 62  # scan_uid_file's hold_up_to for the in-process check: keep every uid it reads


def _check_uid_file(path: str, sha256: str, count: int | None, what: str, res: VerifyResult,
                    load: bool = True) -> np.ndarray | StreamedUids | None:
    """Present, sha256, count, sorted and unique, from one pass over the file. `load`: return the uids
    (in process); else stream the file once (sha256 and order in one pass; the Spark path, where a 2B pool's 32 GB file must not be
    held by the driver) and return a :class:`StreamedUids`, which holds the uids up to
    SPARK_JOIN_ABOVE_UIDS (the driver checks those itself) and none above (Spark tasks read them). A file whose header or
    length is off is named from its header and size on both paths, in the same words, never read whole for it
    (a cut 2B uid file is 32 GB)."""
    from laiontools.contracts.uids import is_sorted_unique, load_uids, uid_file_layout

    kind = _kind(path)
    if kind != "file":
        res.problems.append(f"{what} {path}: " + ("missing" if kind == "missing" else "not a regular file"))
        return None
    # One pass: sha256, order, and the uids themselves when they are held (every one in process).
    scanned = scan_uid_file(path, hold_up_to=_HOLD_ALL if load else SPARK_JOIN_ABOVE_UIDS)
    if scanned is not None:
        sha, ordered, streamed = scanned
        n, got = streamed.count, (streamed.held if load else streamed)
    else:
        sha, _ = sha256_file(path)
    if sha != sha256:
        res.problems.append(f"{what} {path}: sha256 {sha} differs from the manifest's {sha256} (file changed or damaged)")
    if scanned is None:  # its header or length is off (named from those), or it changed while it was read
        try:
            uid_file_layout(path)
            got = np.asarray(load_uids(path, mmap=False))
        except (ValueError, EOFError) as e:
            res.problems.append(f"{what} {path}: unreadable ({e})")
            return None
        n, ordered = len(got), len(got) <= 1 or is_sorted_unique(got)
    if count is not None and n != count:
        res.problems.append(f"{what} {path}: holds {n} uids, manifest says {count}")
    if not ordered:
        res.problems.append(f"{what} {path}: uids are not sorted and unique")
    res.checked.append(f"{what} {path}: {n} uids, sha256 ok" if sha == sha256 else f"{what} {path}")
    return got


class _ReadFailed(Exception):
    """The file's own read failed (an I/O error, a store's refusal): not a finding about the tar. Carries the
    OSError as its cause; not an OSError itself, so the tar reader's handlers let it pass."""


class _NotOnePass(Exception):
    """tarfile stepped back further than :class:`_HashedReads` keeps: read the shard a second time."""


class _HashedReads:
    """The file `f`, read front to back as tarfile reads it, every byte through sha256 once and in order: a
    seek forward reads (and hashes) what it passes; a seek back may land only in the last two reads
    (tarfile's end-of-archive check steps back one block), further raises :class:`_NotOnePass`. After
    the tar, :meth:`finish` reads the rest: (sha256, size) of the whole file."""

    CHUNK = 1 << 22

    def __init__(self, f: Any) -> None:
        import hashlib
        from collections import deque

        self._f, self._h, self._pos, self._end = f, hashlib.sha256(), 0, 0  # _end: bytes read from f, hashed
        self._recent: Any = deque(maxlen=2)  # (start, bytes) of the last two reads from f

    def _pull(self, n: int) -> bytes:
        try:
            b = self._f.read(n)
        except OSError as e:
            raise _ReadFailed() from e
        if b:
            self._recent.append((self._end, b))
            self._h.update(b)
            self._end += len(b)
        return b

    def _skip_to(self, target: int) -> None:
        while self._end < target and self._pull(min(self.CHUNK, target - self._end)):
            pass

    def read(self, n: int = -1) -> bytes:
        parts = []
        while self._pos < self._end and n != 0:  # after a step back: from the last reads first
            start, b = next(((s, b) for s, b in self._recent if s <= self._pos < s + len(b)), (None, b""))
            if start is None:
                raise _NotOnePass(f"a read at {self._pos}, before the last reads")
            piece = b[self._pos - start :] if n < 0 else b[self._pos - start : self._pos - start + n]
            parts.append(piece)
            self._pos += len(piece)
            n = n if n < 0 else n - len(piece)
        if self._pos == self._end and n != 0:  # (past the end after a seek there: nothing)
            while b := self._pull(self.CHUNK if n < 0 else n):
                parts.append(b)
                self._pos += len(b)
                if n > 0:
                    n -= len(b)
                    if n == 0:
                        break
        return parts[0] if len(parts) == 1 else b"".join(parts)

    def seek(self, offset: int, whence: int = 0) -> int:
        target = offset if whence == 0 else self._pos + offset if whence == 1 else None
        if target is None:
            raise _NotOnePass("a seek from the end")
        if target > self._end:
            self._skip_to(target)
        elif target < self._end and not any(s <= target for s, _ in self._recent):
            raise _NotOnePass(f"a seek back to {target}")
        self._pos = target
        return target

    def tell(self) -> int:
        return self._pos

    def finish(self) -> tuple[str, int]:
        while self._pull(self.CHUNK):
            pass
        return self._h.hexdigest(), self._end


def scan_shard(path: str) -> tuple[list[str], list[str], list[str]]:
    """Read a webdataset tar to the end: (sample keys in order, uid per key ('' if no json uid), problems)."""
    fs, p = url_to_fs(path)
    try:
        with fs.open(p, "rb") as f:
            return _scan_tar(f, path)
    except OSError as e:  # the open
        return [], [], _tar_problems(e, path)


def _tar_problems(e: BaseException, path: str) -> list[str]:
    """A tar reader's error as verify's finding; a store's refusal ("slow down", access denied: no damage of
    the shard) raised as one error for the store instead."""
    refused = store_refusal(e, path)
    if refused is not None:
        raise refused from e
    return [f"truncated or unreadable tar ({type(e).__name__}: {e})"]


def _scan_tar(f: Any, path: str) -> tuple[list[str], list[str], list[str]]:
    """:func:`scan_shard` of the open file `f` (read from its start; `path` names it in errors)."""
    keys: list[str] = []
    uids: dict[str, str] = {}
    problems: list[str] = []
    # A sample with one extension twice (two 000123.jpg): reshard refuses it and embed takes the last
    # copy, so it is a finding (every member is kept in the grouping, so that a repeat is seen).
    repeated: list[str] = []

    try:
        reason = compressed_tar_problem(f.read(6))
        if reason is not None:
            return keys, [], [reason]
        f.seek(0)
        with tarfile.open(fileobj=f, mode="r:") as tf:
            # Samples as webdataset (so the trainer) groups them: a key that comes back after another
            # key's members is a second sample, which is a problem here. tarfile reads every member to
            # its end (a cut-short one raises); the end-of-archive check follows.
            for key, parts in group_by_keys(tarfile_members(tf), on_duplicate=repeated.append):
                if key in uids:
                    problems.append(f"key {key} appears in two places")
                keys.append(key)
                uids[key] = ""
                if "json" in parts:
                    try:
                        meta = json.loads(parts["json"])
                    except ValueError:
                        problems.append(f"{key}.json is not valid JSON")
                        continue
                    if not isinstance(meta, dict):  # valid JSON, but a list / string / number / null
                        problems.append(f"{key}.json is not an object (a JSON {_json_type(meta)})")
                        continue
                    uids[key] = str(meta.get("uid") or "")
            # tarfile stops quietly at EOF on a header boundary; a complete tar ends with two zero blocks.
            f.seek(tf.offset)
            trailer = f.read(1024)
            if len(trailer) < 1024 or trailer.count(0) != 1024:
                raise tarfile.ReadError(f"no end-of-archive marker after the last member (offset {tf.offset})")
    except (tarfile.TarError, OSError, EOFError, OverflowError) as e:  # OverflowError: tarfile reading by a base-256 size past 2**63
        problems += _tar_problems(e, path)
    if repeated:
        problems.append(f"{len(repeated)} members repeat an extension within their sample (e.g. a second {repeated[0]}); "
                        "reshard refuses such a sample and embed reads only the last copy")
    return keys, [uids[k] for k in keys], problems


def read_shard(path: str) -> tuple[str, int, list[str], list[str], list[str]]:
    """(sha256, size, sample keys, their uids, problems) of the shard at `path`, from one read of its bytes:
    tarfile reads the tar through :class:`_HashedReads`, which hashes every byte as it passes, then the rest
    of the file. (It read the shard twice, once for the sha256 and once for the tar: at 2B, 35-70 TB more.)
    Where tarfile steps back further than the reader keeps, the shard is read a second time, as before.
    Raises OSError when the file's own read fails."""
    fs, p = url_to_fs(path)
    try:
        with fs.open(p, "rb") as f:
            r = _HashedReads(f)
            keys, uids, problems = _scan_tar(r, path)
            sha, size = r.finish()
        return sha, size, keys, uids, problems
    except _ReadFailed as e:
        failed = e.__cause__  # raised as it came (its own cause, a store's answer, kept), outside this handler
    except _NotOnePass as e:
        log.debug("verify: %s read twice (%s)", path, e)
        sha, size = sha256_file(path)
        return (sha, size, *scan_shard(path))
    raise failed  # type: ignore[misc]


def _json_type(value: Any) -> str:
    return {list: "array", str: "string", bool: "boolean", type(None): "null"}.get(type(value), "number")


def check_shard(sp: str, entry: dict) -> tuple[list[str] | None, int, list[str], int]:
    """The checks of one shard that need its bytes: (problems, or None when the shard is missing; number of
    samples; the uids its samples carry, those that are uids; size). Runs in the driver or in a Spark task: it
    needs nothing but the shard and its manifest entry, so both paths find the same problems."""
    try:
        kind = _kind(sp)
        if kind == "missing":
            return None, 0, [], 0
        if kind != "file":  # /dev/zero would be read forever, a folder cannot be read at all
            return ["not a regular file"], 0, [], 0
        sha, size, keys, uids, problems = read_shard(sp)
    except OSError as e:  # not readable by this user, an I/O error: a finding like a damaged tar, the rest is checked
        if "://" in sp and not sp.startswith("file://"):
            # an object store's refusal or an endpoint gone: one error for the store, naming the shard
            refused = store_refusal(e, sp)
            if refused is not None:
                raise refused from e
            raise
        return [f"unreadable ({type(e).__name__}: {e})"], 0, [], 0
    bad = []
    if size != entry["bytes"]:
        bad.append(f"{size} bytes, manifest says {entry['bytes']}")
    if sha != entry["sha256"]:
        bad.append(f"sha256 {sha} differs from the manifest's {entry['sha256']}")
    bad += problems
    if len(keys) != entry["num_samples"]:
        bad.append(f"{len(keys)} samples, manifest says {entry['num_samples']}")
    no_uid = [k for k, u in zip(keys, uids) if not u]
    if no_uid:
        bad.append(f"{len(no_uid)} samples without a uid in their .json (e.g. {no_uid[0]})")
    odd = [(k, u) for k, u in zip(keys, uids) if u and not is_uid(u)]
    if odd:
        bad.append(f"{len(odd)} samples whose .json uid is not a uid of 32 lowercase hex chars (e.g. {odd[0][0]}: {odd[0][1]!r})")
    failpoints.pause("verify.shard")
    return bad, len(keys), [u for u in uids if is_uid(u)], size


@dataclass
class _UidFindings:
    """The checks across shards against the uid file: per shard index, (how many of its uids the file
    lacks, the first of them); uids found in more than one sample; uid file rows found in no sample
    (how many, the first in file order)."""

    outside: dict[int, tuple[int, str]] = field(default_factory=dict)
    repeated: int = 0
    absent: tuple[int, str | None] = (0, None)


# Above this many uids in the uid file, verify on Spark checks the shards' uids against it by joins on
# the executors (the driver holds none of them); up to it, the tasks send each shard's uids to the driver
# packed (16 bytes each: 256 MB at this size) and the driver checks them as in process, which costs no
# Spark job (the joins' fixed cost is seconds, the whole verify of a small manifest's).
SPARK_JOIN_ABOVE_UIDS = 1 << 24


def _shard_checks(entries: list[tuple[str, dict]], spark: Any | None,
                  uids: np.ndarray | StreamedUids | None) -> tuple[list[tuple[list[str] | None, int, list[str], int]], _UidFindings | None]:
    """check_shard for every (path, entry), in order (the uids each found left out), and the uid checks
    across shards (None without a readable uid file): in this process, or with the shards read on
    Spark; there, above SPARK_JOIN_ABOVE_UIDS, the uid checks are joins of the shards' uids with the
    uid file read by tasks, so that no uid passes through the driver (a 2B pool's would be 32 GB as
    numbers, several times that as strings). The findings are the same every way."""
    from laiontools.contracts.uids import UID_DTYPE, uids_to_array

    if spark is None:
        checks = [check_shard(sp, e) for sp, e in entries]
        found = [uids_to_array(c[2]) for c in checks]
    else:
        from pyspark import StorageLevel

        n = max(1, min(len(entries), spark.sparkContext.defaultParallelism * 4))
        rdd = spark.sparkContext.parallelize(list(enumerate(entries)), n).map(lambda ie: (ie[0], check_shard(*ie[1])))
        if isinstance(uids, StreamedUids) and uids.count > SPARK_JOIN_ABOVE_UIDS:
            rdd = rdd.persist(StorageLevel.MEMORY_AND_DISK)  # each shard read once, for its findings and its uids
            try:
                out = dict(rdd.map(lambda r: (r[0], (r[1][0], r[1][1], [], r[1][3]))).collect())
                return [out[i] for i in range(len(entries))], _uid_findings_spark(spark, rdd, uids)
            finally:
                rdd.unpersist()
        out = dict(rdd.map(lambda r: (r[0], (r[1][0], r[1][1], uids_to_array(r[1][2]).tobytes(), r[1][3]))).collect())
        checks = [(b, k, [], size) for b, k, _, size in (out[i] for i in range(len(entries)))]
        found = [np.frombuffer(out[i][2], dtype=UID_DTYPE) for i in range(len(entries))]
    if uids is None:
        return checks, None
    arr = uids.uids() if isinstance(uids, StreamedUids) else uids
    return checks, _uid_findings_here(arr, [f if c[0] is not None else None for f, c in zip(found, checks)])


def _uid_findings_here(arr: np.ndarray, found: list[np.ndarray | None]) -> _UidFindings:
    """The checks across shards in this process: `arr` the uid file's uids, `found` each shard's (None:
    the shard is missing)."""
    from laiontools.contracts.uids import array_to_uids, as_sorted_set, contains, sort_unique

    res, seen = _UidFindings(), []
    members = as_sorted_set(arr)  # (a file that is not sorted is a finding of its own; membership stays exact)
    for i, ua in enumerate(found):
        if ua is None or not len(ua):
            continue
        outside = ~contains(members, ua)
        if outside.any():
            at = int(np.argmax(outside))
            res.outside[i] = (int(outside.sum()), array_to_uids(ua[at : at + 1])[0])
        seen.append(ua)
    found_all = np.concatenate(seen) if seen else arr[:0]
    uniq = sort_unique(found_all)
    res.repeated = len(found_all) - len(uniq)
    absent = ~contains(uniq, arr)
    if absent.any():
        at = int(np.argmax(absent))
        res.absent = (int(absent.sum()), array_to_uids(arr[at : at + 1])[0])
    return res


def _uid_findings_spark(spark: Any, rdd: Any, uids: StreamedUids) -> _UidFindings:
    """:func:`_uid_findings_here` as Spark joins: the shards' uids (one row each, with its shard and
    position) against the uid file's rows (:func:`uid_file_frame`)."""
    from pyspark import StorageLevel
    from pyspark.sql import functions as F

    from laiontools.contracts.uids import uid_file_frame
    from laiontools.core.spark import shuffle_partitions

    shuffle_partitions(spark, rows=uids.count)
    # One row per uid found, as its 16 big-endian bytes (half the shuffle of its hex), made on Arrow from
    # each shard's packed keys: (shard, position among the shard's uids, uid).
    keys = rdd.map(lambda r: (r[0], bytes.fromhex("".join(r[1][2]))))
    found = (spark.createDataFrame(keys, "shard int, keys binary").mapInArrow(_explode_keys, "shard int, pos int, uid binary")
             .persist(StorageLevel.MEMORY_AND_DISK))
    try:
        file_rows = uid_file_frame(spark, uids.path, binary=True)
        res = _UidFindings()
        for r in (found.join(file_rows.select("uid"), "uid", "left_anti").groupBy("shard")
                  .agg(F.count(F.lit(1)).alias("n"), F.min(F.struct("pos", "uid")).alias("first")).collect()):
            res.outside[int(r["shard"])] = (int(r["n"]), bytes(r["first"]["uid"]).hex())
        res.repeated = int(found.groupBy("uid").count().where("count > 1").agg(F.sum(F.col("count") - 1)).first()[0] or 0)
        a = file_rows.join(found.select("uid"), "uid", "left_anti").agg(
            F.count(F.lit(1)).alias("n"), F.min(F.struct("idx", "uid")).alias("first")).first()
        if a["n"]:
            res.absent = (int(a["n"]), bytes(a["first"]["uid"]).hex())
        return res
    finally:
        found.unpersist()


def _explode_keys(batches: Any) -> Any:
    """mapInArrow: rows (shard, its uids' packed 16-byte keys) -> one row per uid (shard, pos, uid)."""
    import pyarrow as pa

    from laiontools.contracts.uids import binary_arrow

    for b in batches:
        for shard, keys in zip(b.column("shard").to_pylist(), b.column("keys").to_pylist()):
            n = len(keys) // 16
            yield pa.RecordBatch.from_arrays([pa.array(np.full(n, shard, dtype=np.int32)), pa.array(np.arange(n, dtype=np.int32)),
                                              binary_arrow(keys)], ["shard", "pos", "uid"])


def verify_manifest(path: str, check_shards: bool = True, check_parent: bool = True, spark: Any | None = None) -> VerifyResult:
    """Check everything `path` names; problems are collected (never raised) so all are reported at once.

    `spark`: read the shards (sha256, tar scan) in Spark tasks; the driver streams the uid files once
    for their sha256 and order. Above SPARK_JOIN_ABOVE_UIDS the shards' uids are checked against the
    uid file (and it against its parent's) by Spark joins, and the driver holds none of them; below,
    the tasks send them packed and the driver checks them. The findings are the same as without
    Spark (one check_shard for both paths, the same checks across shards)."""
    from laiontools.contracts.schema import ManifestError

    res = VerifyResult(manifest=path)
    try:
        m = read_manifest(path)
    except ManifestError as e:
        res.problems.append(str(e))
        return res
    res.checked.append(f"manifest {path}: schema {m['schema_version']} ok")
    uid_path = resolve(path, m["uids"]["path"])
    arr = _check_uid_file(uid_path, m["uids"]["sha256"], m["uids"]["count"], "uid file", res, load=spark is None)
    # Fault tests (kill points of a read-only run, each too short to hit by watching): after the uid
    # file, after each shard (check_shard), before the parent's nesting check.
    failpoints.pause("verify.uid-file")
    if m["uids"]["count"] != m["num_samples"]:
        res.problems.append(f"manifest {path}: num_samples {m['num_samples']} but the uid file count is {m['uids']['count']}")
    if m["kind"] == "pool" and m.get("catalog"):
        _check_catalog(path, m, res)

    # A pool's uid file lists exactly the samples of its shards (download writes the success uids), so a
    # pool is checked even with no shard listed; a subset without shards (not resharded) has none to check.
    if check_shards and (m["shards"] or m["kind"] == "pool"):
        total = 0
        entries = [(resolve(path, s["path"]), s) for s in m["shards"]]
        checks, across = _shard_checks(entries, spark, arr) if entries else ([], None)
        if across is None and arr is not None:  # no shard listed: every uid of the file is absent
            across = _UidFindings(absent=(_uid_count(arr), _first_uid(arr)) if _uid_count(arr) else (0, None))
        for i, (sp, (bad, n_keys, _, size)) in enumerate(zip([e[0] for e in entries], checks)):
            if bad is None:
                res.problems.append(f"shard {sp}: missing")
                continue
            if across is not None and i in across.outside:
                n_out, first = across.outside[i]
                bad.append(f"{n_out} sample uids not in the uid file (e.g. {first})")
            total += n_keys
            if bad:
                res.problems.append(f"shard {sp}: " + "; ".join(bad))
            else:
                res.checked.append(f"shard {sp}: {n_keys} samples, {size} bytes, sha256 ok")
        if across is not None:
            if across.repeated:
                res.problems.append(f"{across.repeated} uids appear in more than one sample across the shards")
            if across.absent[0]:
                res.problems.append(f"{across.absent[0]} uids of the uid file {uid_path} are in no shard (e.g. {across.absent[1]})")
        if m["kind"] == "subset" and total != m["num_samples"]:
            res.problems.append(f"shards hold {total} samples, manifest num_samples is {m['num_samples']}")

    parent = m.get("parent")
    failpoints.pause("verify.parent")
    if check_parent and parent:
        if not parent.get("path"):
            res.problems.append(f"parent {parent['name']}: no path recorded, nesting cannot be checked")
        else:
            pp = resolve(path, parent["path"])
            if not _exists(pp):
                res.problems.append(f"parent manifest {pp}: missing")
            else:
                psha, _ = sha256_file(pp)
                if psha != parent["sha256"]:
                    res.problems.append(f"parent manifest {pp}: sha256 {psha} differs from the recorded {parent['sha256']} (parent changed)")
                else:
                    res.checked.append(f"parent manifest {pp}: sha256 ok")
                try:
                    pm = read_manifest(pp)
                except ManifestError as e:
                    res.problems.append(str(e))
                    pm = None
                if pm is not None and psha == parent["sha256"] and pm.get("kind") == "pool":
                    _check_pool_lineage(pp, pm, res)
                if pm is not None:
                    parr = _check_uid_file(resolve(pp, pm["uids"]["path"]), pm["uids"]["sha256"], pm["uids"]["count"],
                                           "parent uid file", res, load=spark is None)
                    if parr is not None and arr is not None:
                        n, outside = _not_nested(spark, arr, parr)
                        if outside:
                            res.problems.append(f"nesting: {outside} of {n} uids are not in parent {pp}")
                        else:
                            res.checked.append(f"nesting: all {n} uids are in parent {pp}")
    if m.get("takedown"):
        _check_takedown_audit(path, res)
    return res


def _uid_count(uids: np.ndarray | StreamedUids) -> int:
    return uids.count if isinstance(uids, StreamedUids) else len(uids)


def _first_uid(uids: np.ndarray | StreamedUids) -> str:
    """The uid file's first uid, as 32 hex chars (read alone from a streamed file)."""
    from laiontools.contracts.uids import array_to_uids

    return array_to_uids(uids.first() if isinstance(uids, StreamedUids) else uids[:1])[0]


def _not_nested(spark: Any, arr: np.ndarray | StreamedUids, parr: np.ndarray | StreamedUids) -> tuple[int, int]:
    """(uids in the child's file, how many of them its parent's file lacks): in this process, or, above
    SPARK_JOIN_ABOVE_UIDS, as a Spark join of the two files read by tasks (both were streamed)."""
    from laiontools.contracts.uids import as_sorted_set, contains, count_not_in

    if isinstance(arr, StreamedUids) and isinstance(parr, StreamedUids) and max(arr.count, parr.count) > SPARK_JOIN_ABOVE_UIDS:
        return arr.count, count_not_in(spark, arr.path, parr.path)
    a, pa_ = (x.uids() if isinstance(x, StreamedUids) else x for x in (arr, parr))
    return len(a), int((~contains(as_sorted_set(pa_), a)).sum())


def _check_pool_lineage(path: str, m: dict[str, Any], res: VerifyResult) -> None:
    """The takedown lineage above the parent pool at `path` (its parent, that one's, ...): every recorded
    parent readable and still of the recorded sha256, as :func:`laiontools.contracts.lineage.pool_chain`
    requires of it before ``subsets`` builds on the pool (checking the parent alone passed a pool whose
    grandparent had changed, which ``subsets`` then refused)."""
    from laiontools.contracts.lineage import pool_chain
    from laiontools.contracts.schema import ManifestError

    try:
        chain = pool_chain(path, m)
    except ManifestError as e:
        res.problems.append(f"lineage: {e}")
        return
    if len(chain) > 1:
        res.checked.append(f"lineage: {len(chain) - 1} pool(s) above parent {path}, each of its recorded sha256")


def _check_takedown_audit(path: str, res: VerifyResult) -> None:
    """A pool made by takedown must have its audit line: takedown writes it last, after the manifest, so a
    run killed in between leaves a pool that is complete but unaccounted for, and a later takedown on it
    would start the audit history over."""
    audit = layout.takedown_audit_of(path)
    sha, _ = sha256_file(path)
    entries: list[Any] = []
    if _exists(audit):
        fs, p = url_to_fs(audit)
        with fs.open(p, "rb") as f:
            for line in f.read().splitlines():
                try:
                    entries.append(json.loads(line))
                except ValueError:
                    entries.append(None)
    if any(isinstance(e, dict) and (e.get("pool") or {}).get("sha256") == sha for e in entries):
        res.checked.append(f"takedown audit log {audit}: holds this pool's entry")
        return
    res.problems.append(
        f"takedown pool {path}: its audit log {audit} {'holds no entry for it' if entries else 'is missing'} (the takedown "
        "run that made it stopped before its last step): run the same takedown command again to finish it"
    )


def _check_catalog(path: str, m: dict[str, Any], res: VerifyResult) -> None:
    """A pool's catalog: present, not left mid-swap by a killed rebuild, readable, and its success
    rows are the manifest's samples (one status column read; the rows themselves stay on disk)."""
    import pyarrow.compute as pc
    import pyarrow.dataset as ds

    from laiontools.contracts import schema as C
    from laiontools.core.storage import swap_pending

    cat = resolve(path, m["catalog"]["path"])
    if swap_pending(cat):
        res.problems.append(f"catalog {cat}: a rebuild of it is under way or was killed midway; re-run the command that "
                            "wrote it (download, or takedown) to finish it")
        return
    if not _exists(cat):
        res.problems.append(f"catalog {cat}: missing")
        return
    try:
        fs, p = url_to_fs(cat)
        fmt = ds.ParquetFileFormat(default_fragment_scan_options=ds.ParquetFragmentScanOptions(**PARQUET_READ))
        data = ds.dataset(p, filesystem=fs, format=fmt)
        ok = data.count_rows(filter=pc.field(C.STATUS) == C.STATUS_SUCCESS)
        rows = data.count_rows()  # from the footers alone
    except (OSError, ValueError, TypeError) as e:  # not parquet, no status column, unreadable
        res.problems.append(f"catalog {cat}: unreadable ({type(e).__name__}: {e})")
        return
    # the recorded row count chooses later stages' engines and output partitions (takedown, subsets, reshard)
    recorded = m["catalog"].get("num_rows")
    if recorded is not None and rows != recorded:
        res.problems.append(f"catalog {cat}: {rows} rows, the manifest says {recorded}")
    if ok != m["num_samples"]:
        res.problems.append(f"catalog {cat}: {ok} success rows, the manifest has {m['num_samples']} samples")
    else:
        res.checked.append(f"catalog {cat}: {ok} success rows, as the manifest")


def check_removal_list(path: str, rl: Any, res: VerifyResult) -> None:
    """Prove that no item of removal list `rl` remains in the manifest at `path`: its uid file, and every
    sample of every shard (uid and url from the sample's .json; sha256/md5 of the image bytes as stored, and
    the sha256 of the bytes as downloaded that the .json keeps, which is the catalog's and what published hash
    lists hold; pHash only when the list holds pHashes). Each sample still matching is a problem naming shard, key and list line.

    A subset that is not resharded has no shards of its own: its samples are those of its uid file in
    the pool's shards, and those are checked (url, domain and hash entries too, not only uids)."""
    from laiontools.contracts.removal import content_hashes
    from laiontools.contracts.schema import ManifestError
    from laiontools.contracts.uids import contains, is_uid, load_uids, uids_to_array

    try:
        m = read_manifest(path)
    except ManifestError as e:  # a finding (verify_manifest names it), never an error that stops the other manifests
        if str(e) not in res.problems:
            res.problems.append(str(e))
        return
    listed = rl.uid_array()
    upath = resolve(path, m["uids"]["path"])
    arr = None
    if len(listed) and _exists(upath):
        arr = load_uids(upath)
        hit = contains(np.asarray(arr), listed) if len(arr) else np.zeros(len(listed), bool)
        for i in np.flatnonzero(hit)[:50]:
            u = f"{int(listed[i]['hi']):016x}{int(listed[i]['lo']):016x}"
            res.problems.append(f"removal list {rl.path}: uid {u} (line {rl.uids[u]}) is in the uid file {upath}")
    found = 0
    shards, base, members, where = m["shards"], path, None, f"the {len(m['shards'])} shard(s)"
    if not shards and m.get("pool"):
        base = resolve(path, m["pool"]["path"])
        try:
            shards = read_manifest(base)["shards"]
        except ManifestError as e:
            res.problems.append(f"removal list check: the subset's pool manifest cannot be read ({e}); its samples could not be checked")
            shards = []
        if not _exists(upath):
            res.problems.append(f"removal list check: the subset's uid file {upath} is missing; its samples could not be checked")
            shards = []
        else:
            members = np.asarray(arr if arr is not None else load_uids(upath))
        where = f"the subset's samples in the pool's {len(shards)} shard(s)"
    for s in shards:
        shard_url = resolve(base, s["path"])
        name = s["path"] if base == path else shard_url
        kind = _kind(shard_url)
        if kind != "file":
            res.problems.append(f"removal list check: shard {shard_url} is {'missing' if kind == 'missing' else 'not a regular file'}, "
                                "its samples could not be checked")
            continue
        fs, p = url_to_fs(shard_url)
        undecodable: list[str] = []
        try:
            with fs.open(p, "rb") as f, tarfile.open(fileobj=f, mode="r:") as tf:
                for key, parts in group_by_keys(tarfile_members(tf), suffixes=("json", *POOL_IMAGE_EXTS), on_duplicate="last"):
                    meta = {}
                    if "json" in parts:
                        try:
                            meta = json.loads(parts["json"])
                        except ValueError:
                            meta = {}
                    if not isinstance(meta, dict):
                        meta = {}
                    uid, url = meta.get("uid"), meta.get("url")
                    if members is not None and isinstance(uid, str) and is_uid(uid) and not contains(
                            members, uids_to_array([uid]))[0]:
                        continue  # a pool sample the subset does not hold
                    if not isinstance(uid, str):  # a finding; the sample's url and bytes are still checked
                        res.problems.append(f"removal list check: shard {name} sample {key}: its .json uid is "
                                            f"{'null or missing' if uid is None else f'{uid!r} ({type(uid).__name__})'}, not a "
                                            "string; the sample does not follow the layout and no uid entry can be "
                                            "checked against it")
                        uid = None
                    img = next((parts[e] for e in POOL_IMAGE_EXTS if e in parts), None)
                    h = content_hashes(img, bool(rl.phashes)) if img is not None and rl.needs_content else {}
                    if img is not None and rl.phashes and h.get("phash") is None:
                        undecodable.append(key)  # its bytes met the sha256/md5 entries; no pHash to compare
                    hit = rl.match(url=url if isinstance(url, str) else None, uid=uid, sha256=h.get("sha256"),
                                   md5=h.get("md5"), phash=h.get("phash"))
                    downloaded = meta.get("sha256")  # of the bytes as downloaded (the catalog's sha256), kept in the .json
                    if hit is None and isinstance(downloaded, str):
                        hit = rl.match(sha256=downloaded)
                    if hit is not None:
                        found += 1
                        res.problems.append(f"removal list {rl.path}: shard {name} sample {key} matches {hit}")
        except (tarfile.TarError, OSError, EOFError, OverflowError) as e:  # a damaged shard: named, and the others still checked
            refused = store_refusal(e, shard_url)
            if refused is not None:
                raise refused from e
            res.problems.append(f"removal list check: shard {shard_url} could not be checked against the list: unreadable "
                                f"({type(e).__name__}: {e})")
        if undecodable:  # the proof does not reach these: a pHash entry could still be one of them
            res.problems.append(f"removal list check: shard {name}: {len(undecodable)} sample(s) whose image does not decode "
                                f"could not be compared with the list's pHash entries (e.g. {', '.join(undecodable[:5])})")
    if not found and not any("removal list" in p for p in res.problems):
        res.checked.append(f"removal list {rl.path} (sha256 {rl.sha256[:12]}..., {rl.entries} entries): no listed item "
                           f"in the uid file or in {where}")


def verify_main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="laiontools verify", description="Re-check every file a manifest names; exit 1 naming what differs.")
    p.add_argument("manifest", nargs="+", help="manifest(s) to check")
    p.add_argument("--no-shards", action="store_true", help="skip reading the shards (uid file and nesting only)")
    p.add_argument("--no-parent", action="store_true", help="skip the nesting check against the parent manifest")
    p.add_argument("-v", "--verbose", action="store_true", help="also list what was checked and found fine")
    p.add_argument("--removal-list", default=None, help="also prove that no item of this removal list (urls, domains, "
                   "uids, sha256/md5, pHashes; see laiontools.contracts.removal) remains in the manifest's shards")
    p.add_argument("--master", default=None, help="read the shards in Spark tasks on this master (local[4], "
                   "spark://host:7077); default: $LAIONTOOLS_SPARK_MASTER if set, else in this process, except under "
                   "spark-submit or above --spark-above shards")
    p.add_argument("--spark-above", type=int, default=SPARK_ABOVE_SHARDS, help="manifests with more shards than "
                   "this are read on Spark (local[*] unless --master); 0 = always, -1 = only when a master is named or "
                   "under spark-submit")
    args = p.parse_args(sys.argv[1:] if argv is None else argv)
    rl = None
    if args.removal_list:
        from laiontools.contracts.removal import read_removal_list

        rl = read_removal_list(args.removal_list)  # a malformed line stops here, naming the line
    failed = 0
    with ExitStack() as stack:
        session: list[Any] = []

        def spark_for(mp: str) -> Any | None:
            if args.no_shards or not _wants_spark(mp, args.master, args.spark_above):
                return None
            if not session:
                from laiontools.core.spark import spark_session

                session.append(stack.enter_context(spark_session(args.master, app_name="laiontools-verify")))
            return session[0]

        for mp in args.manifest:
            failed += _verify_one(mp, args, rl, spark_for(mp))
    return 1 if failed else 0


def _wants_spark(mp: str, master: str | None, above: int) -> bool:
    """The rule every stage follows (``core.stage.wants_spark``), sized by the manifest's shards."""
    from laiontools.contracts.schema import ManifestError
    from laiontools.core.stage import wants_spark

    if wants_spark(master, 0, -1):  # a master named or under spark-submit: Spark, whatever the size
        return True
    try:
        shards = len(read_manifest(mp)["shards"])
    except (ManifestError, OSError, ValueError):
        shards = 0  # verify_manifest reports the manifest's own problem
    return wants_spark(master, shards, above)


def _verify_one(mp: str, args: argparse.Namespace, rl: Any, spark: Any | None) -> int:
    """Verify one manifest, print its findings; 1 if it failed."""
    res = verify_manifest(mp, check_shards=not args.no_shards, check_parent=not args.no_parent, spark=spark)
    if rl is not None:
        check_removal_list(mp, rl, res)
    lines = [f"{'OK  ' if res.ok else 'FAIL'} {mp}"]
    if args.verbose:
        lines += [f"  ok: {c}" for c in res.checked]
    lines += [f"  DIFFERS: {pr}" for pr in res.problems]
    emit("\n".join(lines))
    return int(not res.ok)


def _count(v: Any) -> str:
    """A count with thousands separators; anything else (an edited manifest's "5") as written."""
    return f"{v:,}" if isinstance(v, int) and not isinstance(v, bool) else str(v)


def inspect_text(path: str) -> str:
    """A readable summary of a manifest (raises ManifestError if it is invalid)."""
    m = read_manifest(path)
    target = m["target_samples"]
    lines = [
        f"{m['name']}  ({m['kind']}, schema {m['schema_version']})",
        f"  manifest      {path}",
        f"  samples       {m['num_samples']:,}" + (f" of target {target:,}" if target is not None else "") + ("  ** SHORT **" if m.get("short") else ""),
        f"  uid file      {m['uids']['path']}  ({m['uids']['count']:,} uids, sha256 {m['uids']['sha256'][:16]}...)",
        f"  source        fingerprint {m['source']['fingerprint'][:16]}...",
    ]
    if m.get("parent"):
        lines.append(f"  parent        {m['parent']['name']}  ({m['parent'].get('path', '?')}, sha256 {m['parent']['sha256'][:16]}...)")
    prov = m["provenance"]
    lines.append(f"  made by       {prov['tool']} {prov['version']}: {' '.join(prov.get('command', []))}")
    sel = m.get("selection") or {}
    if isinstance(sel, dict) and sel:
        lines.append("")
        lines.append(f"recipe: scale {sel.get('scale')}, seed {sel.get('seed')}, scale factor {sel.get('scale_factor')}")
        filters = sel.get("filters") if isinstance(sel.get("filters"), dict) else {}
        for k, v in filters.items():
            if v is not None:
                lines.append(f"  {k:20s}{v if not isinstance(v, dict) else json.dumps(v, sort_keys=True)}")
        for e in sel.get("exclusions") or []:
            lines.append(f"  exclude             {e.get('kind')} {e.get('given')} ({e.get('count')} uids)" if isinstance(e, dict)
                         else f"  exclude             {e}")
        if sel.get("funnel"):
            lines.append("")
            lines.append("funnel")
            steps = [f if isinstance(f, dict) else {"step": f} for f in sel["funnel"]] if isinstance(sel["funnel"], list) else [{"step": sel["funnel"]}]
            lines.append(table([{"step": f.get("step"), "removed": _count(f.get("removed")), "remaining": _count(f.get("remaining"))} for f in steps]))
    tk = m.get("takedown")
    if isinstance(tk, dict):
        lines.append("")
        lines.extend(_takedown_lines(path, tk))
    if m.get("reshard"):
        lines.append("")
        r = m["reshard"]
        lines.append("reshard: " + (", ".join(f"{k} {v}" for k, v in sorted(r.items(), key=str)) if isinstance(r, dict) else str(r)))
    shards = m["shards"]
    lines.append("")
    if shards:
        nb = sum(s["bytes"] for s in shards)
        ns = [s["num_samples"] for s in shards]
        lines.append(f"shards: {len(shards)}, {nb / 1e6:,.1f} MB, samples per shard {min(ns)}..{max(ns)}")
        show = shards if len(shards) <= 8 else shards[:4] + shards[-2:]
        lines.append(table([{"path": s["path"], "samples": s["num_samples"], "bytes": s["bytes"], "sha256": s["sha256"][:16]} for s in show]))
        if len(shards) > 8:
            lines.append(f"({len(shards) - 6} more)")
    else:
        lines.append("shards: none (run `laiontools reshard` to write training shards)")
    return "\n".join(lines)


def _takedown_lines(path: str, tk: dict[str, Any]) -> list[str]:
    """inspect's takedown section: what the run that made this pool removed, and the audit log's length."""
    lst = tk.get("list") if isinstance(tk.get("list"), dict) else {}
    out = [
        f"takedown: reason {tk.get('reason')}, status {tk.get('status')}",
        f"  list          {lst.get('path')}  ({lst.get('entries')} entries, sha256 {str(lst.get('sha256'))[:16]}...)",
        (f"  removed       {_count(tk.get('samples_removed'))} sample(s); {_count(tk.get('catalog_rows_without_sample'))} more "
         "catalog row(s) marked without a stored sample"),
        f"  shards        {_count(tk.get('shards_rewritten'))} rewritten, {_count(tk.get('shards_referenced'))} referenced in the parent",
    ]
    by_kind = tk.get("by_kind") if isinstance(tk.get("by_kind"), dict) else {}
    if by_kind:
        out.append("  by kind       " + ", ".join(f"{k} {_count(v)}" for k, v in sorted(by_kind.items())))
    audit = layout.takedown_audit_of(path)
    try:
        fs, p = url_to_fs(audit)
        with fs.open(p, "rb") as f:
            n = f.read().count(b"\n")
        out.append(f"  audit log     {audit}  ({n} entr{'y' if n == 1 else 'ies'}; `laiontools verify` checks this run's)")
    except FileNotFoundError:
        out.append(f"  audit log     {audit}  ** MISSING ** (run `laiontools verify`)")
    return out


def inspect_main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="laiontools inspect", description="Print a readable summary of a manifest.")
    p.add_argument("manifest", nargs="+")
    args = p.parse_args(sys.argv[1:] if argv is None else argv)
    emit("\n\n".join(inspect_text(mp) for mp in args.manifest))
    return 0


def main(argv: list[str] | None = None) -> int:
    return verify_main(argv)
