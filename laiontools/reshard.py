"""Reshard a subset into shuffled, evenly sized webdataset shards that a trainer reads.

Contract::

    laiontools reshard --manifest <subset.manifest.json> --output <dir> [--shard-size N] [--seed S]

writes::

    <dir>/shards/shard-00000.tar ...   webdataset tars: <key>.jpg/.txt/.json (every member of the source sample)
    <dir>/shards/shard-00000.tar.done  completion marker (written last): count, bytes, sha256, plan, sources
    <dir>/shards/sizes.json            {"shard-00000.tar": n, ...}, what open_clip's loader reads
    <dir>/uids.npy                     copy of the subset's uid file (the output folder stands on its own)
    <dir>/subset.manifest.json         kind=subset, same uids, shard list (num_samples, bytes, sha256),
                                       parent = the subset manifest
    <dir>/reshard.json                 the plan's settings; a rerun with other settings is refused

How it works (all in Spark; the driver sees only source shard ids and one small row per output shard):

1. Plan: the pool catalog's success rows (uid -> source shard, key) whose uid is in the subset's
   uid file. Each uid gets a seeded score ``blake2b(uid, key=seed, person=b"laiontools-shuf")``;
   sorting by (score, uid) gives every sample a global position, and positions are cut into
   ``ceil(N / shard_size)`` shards whose sizes differ by at most one.
2. Index: one task per *needed* source shard reads only its tar headers (seeking over the data)
   and emits (key, member, offset, size).
3. Write: one task per output shard reads exactly the byte ranges of its samples from the source
   shards they live in, writes them under new keys ``<shard:05d><position:06d>`` in shuffled order,
   renames the tar into place and writes its marker last. The json member keeps the uid and gains
   ``key`` (new), ``source_shard`` and ``source_key``.

Everything is a function of (subset uids, catalog, seed, shard size), so a run killed at any point
and started again skips the shards whose markers exist and rewrites the rest byte for byte.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
import math
import sys
import tarfile
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Any, BinaryIO

from laiontools import layout
from laiontools import schema as C
from laiontools.config import ConfigError, StageConfig, add_config_args, config_from_args
from laiontools.errors import InputError, UserError
from laiontools.manifest import manifest_sha256, new_manifest, read_manifest, resolve, write_manifest
from laiontools.report import emit, table
from laiontools.storage import (
    atomic_open,
    ensure_output_dir,
    is_done,
    join,
    mark_done,
    read_json,
    read_marker,
    sha256_file,
    url_to_fs,
    write_json,
)
from laiontools.subsets import (
    _member_series,
    _to_signed_order,
    abs_path,
    load_pool,
    parse_seed,
    selection_scores,
)

log = logging.getLogger(__name__)

SHUFFLE_PERSON = b"laiontools-shuf"
OUT_SHARDS_DIR = "shards"
SIZES_JSON = "sizes.json"
PLAN_JSON = "reshard.json"
OUT_MANIFEST = "subset.manifest.json"
OUT_UIDS = "uids.npy"
_USER_ERROR_TAG = "LAIONTOOLS-USER-ERROR: "
# Fixed tar header fields so a rewritten shard is byte-identical.
_TAR_MODE = 0o644


class ReshardError(UserError, ValueError):
    """The subset cannot be resharded as asked (source shard missing or damaged, output of another plan)."""


@dataclass
class ReshardConfig(StageConfig):
    manifest: str = field(default="", metadata={"help": "subset manifest written by `laiontools subsets`"})
    output: str = field(default="", metadata={"help": "output folder for the new shards and manifest"})
    shard_size: int = field(default=10_000, metadata={"help": "samples per output shard (sizes differ by at most 1)"})
    seed: int | None = field(default=None, metadata={"help": "shuffle seed (default: the subset's selection seed)"})

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


def new_key(j: int, i: int, width: int) -> str:
    """Unique webdataset key: shard number then index, fixed widths (no dots: webdataset splits on them)."""
    return f"{j:05d}{i:0{width}d}"


def _raise_user(msg: str) -> None:
    # Raised inside Spark tasks: the tag lets the driver turn the wrapped error back into a UserError.
    raise RuntimeError(_USER_ERROR_TAG + msg)


def _unwrap(e: BaseException) -> None:
    text = str(e)
    if _USER_ERROR_TAG in text:
        msg = text.split(_USER_ERROR_TAG, 1)[1].splitlines()[0]
        raise ReshardError(msg) from None


# ----------------------------------------------------------------------------------------------
# executor functions (module level: Spark pickles them by reference)


def index_source_shard(item: tuple[str, str]) -> list[tuple[str, str, str, int, int, int]]:
    """(source shard id, url) -> [(shard id, key, ext, data offset, size, mtime)] from the tar headers only."""
    sid, url = item
    fs, p = url_to_fs(url)
    out = []
    try:
        with fs.open(p, "rb") as f, tarfile.open(fileobj=f, mode="r:") as tf:
            for ti in tf:
                if not ti.isfile():
                    continue
                base = ti.name.rsplit("/", 1)[-1]
                if "." not in base:
                    continue
                key, ext = base.split(".", 1)
                out.append((sid, key, ext, int(ti.offset_data), int(ti.size), int(ti.mtime)))
    except (tarfile.TarError, OSError, EOFError) as e:
        _raise_user(f"source shard {url} is truncated or unreadable ({e}); run `laiontools verify` on the pool and re-download it")
    return out


class _HashingWriter:
    """Buffered write-through wrapper: collects pieces and hands them to the file and to sha256 in
    chunks of ~8 MB, so the per-call cost of hashing and writing is paid per chunk, not per member."""

    CHUNK = 8 << 20

    def __init__(self, f: BinaryIO) -> None:
        self.f, self.h, self.n = f, hashlib.sha256(), 0
        self.parts: list[bytes | memoryview] = []
        self.pending = 0

    def write(self, b: bytes | memoryview) -> None:
        self.parts.append(b)
        self.pending += len(b)
        self.n += len(b)
        if self.pending >= self.CHUNK:
            self.flush()

    def flush(self) -> None:
        if self.parts:
            chunk = b"".join(self.parts)
            self.h.update(chunk)
            self.f.write(chunk)
            self.parts, self.pending = [], 0


# A ustar header for a regular file with every field but name/size/mtime/checksum fixed (mode 0644,
# uid/gid 0, empty uname/gname/linkname/prefix): built once by tarfile, so the fast path below
# produces exactly the bytes tarfile's tobuf() would (tests compare them).
def _header_template() -> bytes:
    ti = tarfile.TarInfo("")
    ti.size, ti.mtime, ti.mode = 0, 0, _TAR_MODE
    ti.uname = ti.gname = ""
    return ti.tobuf(tarfile.USTAR_FORMAT, "utf-8", "surrogateescape")


_TMPL = _header_template()
_TMPL_MID = _TMPL[100:124]  # mode, uid, gid
_TMPL_TAIL = _TMPL[156:]  # type flag .. end of block
_SPACES8 = b" " * 8
_ZEROS = bytes(tarfile.RECORDSIZE)


def _tar_header(name: str, size: int, mtime: int) -> bytes:
    """ustar header block for a regular member; same bytes as TarInfo.tobuf(USTAR_FORMAT) with the
    fixed fields of :func:`_header_template`. Names over 100 bytes or numbers out of octal range go
    through tarfile itself (it splits the name into prefix / raises)."""
    nb = name.encode("utf-8", "surrogateescape")
    if len(nb) > 100 or not (0 <= size < 8**11) or not (0 <= mtime < 8**11):
        ti = tarfile.TarInfo(name)
        ti.size, ti.mtime, ti.mode = size, mtime, _TAR_MODE
        ti.uname = ti.gname = ""
        return ti.tobuf(tarfile.USTAR_FORMAT, "utf-8", "surrogateescape")
    head = nb + bytes(100 - len(nb)) + _TMPL_MID + b"%011o\0%011o\0" % (size, mtime)
    # Checksum: sum of all header bytes with the checksum field read as spaces; "%06o\0" then the
    # field's last space stays, as tarfile writes it.
    chk = sum(head) + 8 * 32 + sum(_TMPL_TAIL)
    return head + b"%06o\0 " % chk + _TMPL_TAIL


def _write_member(out: _HashingWriter, name: str, data: bytes | memoryview, mtime: int) -> None:
    """One ustar member: header, data, zero padding to 512 bytes."""
    out.write(_tar_header(name, len(data), mtime))
    out.write(data)
    pad = (-len(data)) % tarfile.BLOCKSIZE
    if pad:
        out.write(_ZEROS[:pad])


class _Sources:
    """A few open source shards per task (LRU), read with large buffers."""

    def __init__(self, urls: dict[str, str], max_open: int = 32) -> None:
        self.urls, self.max_open = urls, max_open
        self.open: OrderedDict[str, Any] = OrderedDict()

    def read(self, sid: str, offset: int, size: int) -> bytes:
        f = self.open.get(sid)
        if f is None:
            fs, p = url_to_fs(self.urls[sid])
            f = fs.open(p, "rb", block_size=1 << 22) if not _is_local(fs) else open(p, "rb", buffering=0)
            self.open[sid] = f
            if len(self.open) > self.max_open:
                self.open.popitem(last=False)[1].close()
        else:
            self.open.move_to_end(sid)
        f.seek(offset)
        data = f.read(size)
        if data is None or len(data) != size:
            # An unbuffered read may return short; finish it before calling the shard truncated.
            data = data or b""
            while len(data) < size:
                more = f.read(size - len(data))
                if not more:
                    _raise_user(f"source shard {self.urls[sid]} is truncated (member at offset {offset} needs {size} bytes); re-download it")
                data += more
        return data

    def close(self) -> None:
        for f in self.open.values():
            f.close()
        self.open.clear()


def _is_local(fs: Any) -> bool:
    from laiontools.storage import is_local

    return is_local(fs)


# Samples of one output shard are read in batches of about this many bytes, each batch in source
# (shard, offset) order, so reads move forward through every source tar instead of jumping around
# in shuffled order; memory per task stays bounded by the batch, not by the shard size.
READ_BATCH_BYTES = 64 << 20
# The members of a sample are adjacent in the source tar (header, data, padding); they are read as
# one range when it spans no more than the data plus this much per member (headers and padding).
_SPAN_SLACK = 3 * tarfile.BLOCKSIZE


def _read_batch(sources: _Sources, batch: list[tuple[int, str, list[tuple[str, int, int, int]]]]) -> dict[int, list[tuple[str, memoryview, int]]]:
    """{batch index: [(ext, data, mtime) in sorted member order]} for [(index, source shard, members)],
    reading in (source shard, offset) order and each sample's members as one range when adjacent."""
    order = sorted(range(len(batch)), key=lambda b: (batch[b][1], min(m[1] for m in batch[b][2]) if batch[b][2] else 0))
    got: dict[int, list[tuple[str, memoryview, int]]] = {}
    for b in order:
        _, sid, members = batch[b]
        members = sorted(members)
        if not members:
            got[b] = []
            continue
        lo = min(m[1] for m in members)
        hi = max(m[1] + m[2] for m in members)
        if hi - lo <= sum(m[2] for m in members) + _SPAN_SLACK * len(members):
            buf = memoryview(sources.read(sid, lo, hi - lo))
            got[b] = [(ext, buf[off - lo : off - lo + size], mtime) for ext, off, size, mtime in members]
        else:
            got[b] = [(ext, memoryview(sources.read(sid, off, size)), mtime) for ext, off, size, mtime in members]
    return got


def write_output_shards(rows: Any, out_dir: str, urls: dict[str, str], plan_id: str, width: int) -> Any:
    """Spark partition -> write each output shard it holds; yield (shard number, marker info).

    A row is (j, [(i, uid, source shard, source key, [(ext, offset, size, mtime), ...]), ...]).
    A shard whose marker exists for this plan is skipped (resume); otherwise it is written whole
    under a temporary name, renamed, and marked. The output bytes depend only on the rows (members
    in (ext, ...) order, samples in index order), not on how the reads are batched.
    """
    sources = _Sources(urls)
    try:
        for j, entries in rows:
            path = join(out_dir, shard_name(j))
            if is_done(path):
                info = read_marker(path) or {}
                if info.get("plan") == plan_id:
                    yield j, info
                    continue
            entries = sorted(entries, key=lambda e: e[0])
            used: set[str] = set()
            with atomic_open(path) as raw:
                hw = _HashingWriter(raw)
                start = 0
                while start < len(entries):
                    # Cut the next batch by source bytes, then read it in source order.
                    stop, nbytes = start, 0
                    while stop < len(entries) and (stop == start or nbytes < READ_BATCH_BYTES):
                        nbytes += sum(m[2] for m in entries[stop][4])
                        stop += 1
                    batch = entries[start:stop]
                    data = _read_batch(sources, [(b, e[2], e[4]) for b, e in enumerate(batch)])
                    for b, (i, uid, sid, skey, _) in enumerate(batch):
                        used.add(sid)
                        key = new_key(j, i, width)
                        for ext, blob, mtime in data[b]:
                            if ext == "json":
                                blob = _rewrite_json(blob, uid, key, sid, skey, urls[sid])
                            _write_member(hw, f"{key}.{ext}", blob, mtime)
                    del data
                    start = stop
                # End of archive: two zero blocks, padded to a whole record as tarfile does.
                end = hw.n + 2 * tarfile.BLOCKSIZE
                hw.write(_ZEROS[: 2 * tarfile.BLOCKSIZE + (-end) % tarfile.RECORDSIZE])
                hw.flush()
            info = {"num_samples": len(entries), "bytes": hw.n, "sha256": hw.h.hexdigest(), "plan": plan_id, "sources": sorted(used)}
            mark_done(path, info)
            yield j, info
    finally:
        sources.close()


def _rewrite_json(data: bytes | memoryview, uid: str, key: str, sid: str, skey: str, url: str) -> bytes:
    try:
        meta = json.loads(bytes(data))
    except ValueError:
        _raise_user(f"source shard {url}: {skey}.json is not valid JSON; the shard is damaged, re-download it")
    if meta.get("uid", uid) != uid:
        _raise_user(f"source shard {url}: {skey}.json has uid {meta.get('uid')} but the catalog says {uid}; the catalog and shard disagree")
    meta.update({"uid": uid, "key": key, "source_shard": sid, "source_key": skey})
    return json.dumps(meta, sort_keys=True, ensure_ascii=False).encode()


def _shuffle_series(uids: Any, seed: int) -> Any:
    import pandas as pd

    return pd.Series(_to_signed_order(selection_scores(uids, seed, person=SHUFFLE_PERSON)), index=uids.index)


def _assign(pair: tuple[Any, int], q: int, r: int) -> tuple[int, int, str, str, str]:
    row, p = pair
    j, i = position_to_slot(p, q, r)
    return j, i, row[C.UID], row["_sid"], row[C.KEY]


def _group_entry(row: Any) -> tuple[int, list[tuple[int, str, str, str, list[tuple[str, int, int, int]]]]]:
    return int(row["j"]), [
        (int(e["i"]), e[C.UID], e["_sid"], e[C.KEY], [(m["ext"], int(m["offset"]), int(m["size"]), int(m["mtime"])) for m in e["members"]])
        for e in row["entries"]
    ]


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


def run_reshard(cfg: ReshardConfig, spark: Any = None) -> dict[str, Any]:
    """Reshard `cfg.manifest` into `cfg.output`; return a summary (manifest path, shards, samples).

    Raises ReshardError/InputError/ManifestError naming the file at fault (subset without uids,
    uid file changed since selection, source shard missing from the pool, output of another plan).
    """
    if spark is None:
        from laiontools.spark import spark_session

        with spark_session(app_name="laiontools-reshard") as s:
            return run_reshard(cfg, s)

    from pyspark.sql import functions as F
    from pyspark.sql import types as T

    mpath = abs_path(cfg.manifest)
    m = read_manifest(mpath)
    if m["kind"] != "subset":
        raise InputError(f"{mpath} is a {m['kind']} manifest; reshard takes a subset manifest from `laiontools subsets`")
    uid_path = resolve(mpath, m["uids"]["path"])
    sha, _ = sha256_file(uid_path)
    if sha != m["uids"]["sha256"]:
        raise ReshardError(f"{uid_path}: sha256 {sha} differs from the manifest's {m['uids']['sha256']}; the uid file changed, re-run subsets")
    n = int(m["uids"]["count"])
    seed = cfg.seed if cfg.seed is not None else int((m.get("selection") or {}).get("seed", 0))
    pool = load_pool(_find_pool(mpath, m))
    urls = {sid: resolve(pool.path, s["path"]) for sid, s in zip(pool.shard_ids, pool.manifest["shards"])}
    k, q, r = shard_layout(n, cfg.shard_size)
    width = max(6, len(str(q + 1)))
    output = abs_path(cfg.output)
    out_dir = join(output, OUT_SHARDS_DIR)
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
    plan_path = join(output, PLAN_JSON)
    fs, pp = url_to_fs(plan_path)
    if fs.exists(pp):
        old = read_json(plan_path)
        if old.get("plan_id") != plan_id:
            raise ReshardError(
                f"{output} already holds a reshard of another plan ({old.get('subset_manifest')}, seed {old.get('seed')}, "
                f"shard size {old.get('shard_size')}); give a new --output folder"
            )
    write_json(plan_path, {**plan, "plan_id": plan_id})

    results: dict[int, dict[str, Any]] = {}
    if n:
        try:
            results = _run_spark(spark, pool, uid_path, urls, n, seed, q, r, k, out_dir, plan_id, width)
        except UserError:
            raise
        except Exception as e:  # errors raised inside tasks arrive wrapped by py4j
            _unwrap(e)
            raise
    sizes = {shard_name(j): results[j]["num_samples"] for j in range(k)}
    write_json(join(out_dir, SIZES_JSON), sizes)
    total = sum(sizes.values())
    if total != n:
        raise ReshardError(f"wrote {total} samples but the subset has {n}; the pool catalog and shards disagree (run verify on the pool)")

    # Copy the uid file so the output folder stands on its own.
    out_uids = join(output, OUT_UIDS)
    with url_to_fs(uid_path)[0].open(url_to_fs(uid_path)[1], "rb") as src, atomic_open(out_uids) as dst:
        while chunk := src.read(1 << 22):
            dst.write(chunk)
    shards = [
        {"path": f"{OUT_SHARDS_DIR}/{shard_name(j)}", "num_samples": results[j]["num_samples"], "bytes": results[j]["bytes"], "sha256": results[j]["sha256"]}
        for j in range(k)
    ]
    out_m = new_manifest(
        name=m["name"],
        kind="subset",
        num_samples=n,
        target_samples=m["target_samples"],
        uids={"path": OUT_UIDS, "sha256": m["uids"]["sha256"], "count": n},
        shards=shards,
        source_fingerprint=m["source"]["fingerprint"],
        parent={"name": m["name"], "sha256": plan["subset_manifest_sha256"], "path": mpath},
        selection=m.get("selection"),
        command=["laiontools", "reshard", "--manifest", mpath, "--shard-size", str(cfg.shard_size), "--seed", str(seed)],
        pool=m.get("pool") or {"name": pool.manifest["name"], "sha256": pool.sha256, "path": pool.path},
        reshard={k_: plan[k_] for k_ in ("seed", "shard_size", "num_shards", "key_format", "shuffle")},
    )
    out_path = join(output, OUT_MANIFEST)
    msha = write_manifest(out_path, out_m)
    return {"manifest": out_path, "sha256": msha, "num_shards": k, "num_samples": n, "bytes": sum(s["bytes"] for s in shards)}


def _run_spark(
    spark: Any, pool: Any, uid_path: str, urls: dict[str, str], n: int, seed: int, q: int, r: int, k: int, out_dir: str, plan_id: str, width: int
) -> dict[int, dict[str, Any]]:
    from pyspark.sql import functions as F
    from pyspark.sql import types as T

    cat = spark.read.parquet(pool.catalog).select(C.UID, C.STATUS, C.SHARD, C.KEY)
    member = F.pandas_udf(lambda s: _member_series(s, uid_path), T.BooleanType())
    shuffle = F.pandas_udf(lambda s: _shuffle_series(s, seed), T.LongType())
    rows = (
        cat.filter(F.col(C.STATUS) == C.STATUS_SUCCESS)
        .withColumn("_sid", F.regexp_replace(F.regexp_replace(C.SHARD, r"\.tar$", ""), "/", "-"))
        .filter(member(F.col(C.UID)))
        # One row per uid even if the catalog lists a sample twice: the smallest (shard, key) wins.
        .groupBy(C.UID)
        .agg(F.min(F.struct("_sid", C.KEY)).alias("s"))
        .select(C.UID, F.col("s._sid").alias("_sid"), F.col(f"s.{C.KEY}").alias(C.KEY))
        .withColumn("h", shuffle(F.col(C.UID)))
    )
    # Global positions: sort by (score, uid), number the rows without collecting them.
    ordered = rows.orderBy("h", C.UID).select(C.UID, "_sid", C.KEY)
    plan_schema = T.StructType(
        [T.StructField("j", T.IntegerType()), T.StructField("i", T.IntegerType()), T.StructField(C.UID, T.StringType()),
         T.StructField("_sid", T.StringType()), T.StructField(C.KEY, T.StringType())]
    )
    plan = spark.createDataFrame(ordered.rdd.zipWithIndex().map(lambda pr: _assign(pr, q, r)), plan_schema).persist()
    try:
        got = plan.count()
        needed = sorted(x["_sid"] for x in plan.select("_sid").distinct().collect())
        unknown = [s for s in needed if s not in urls]
        if got != n or unknown:
            detail = f"{n - got} subset uids are not downloaded samples in the pool catalog" if got != n else ""
            if unknown:
                detail += ("; " if detail else "") + f"samples in shards not listed as complete in {pool.path}: {unknown[:5]}"
            raise ReshardError(f"cannot reshard: {detail}; the pool changed since selection: re-run subsets on it")
        sc = spark.sparkContext
        idx_schema = "_sid string, key string, ext string, offset long, size long, mtime long"
        index = spark.createDataFrame(
            sc.parallelize([(s, urls[s]) for s in needed], max(1, min(len(needed), sc.defaultParallelism * 4))).flatMap(index_source_shard),
            idx_schema,
        )
        members = index.groupBy("_sid", C.KEY).agg(F.collect_list(F.struct("ext", "offset", "size", "mtime")).alias("members"))
        joined = plan.join(members, on=["_sid", C.KEY], how="left")
        missing = joined.filter(F.col("members").isNull()).select("_sid", C.KEY).limit(5).collect()
        if missing:
            raise ReshardError(
                f"source shards lack samples the catalog lists, e.g. {[(x['_sid'], x[C.KEY]) for x in missing]}; "
                "the pool is damaged: run `laiontools verify` on it"
            )
        grouped = joined.groupBy("j").agg(F.collect_list(F.struct("i", C.UID, "_sid", C.KEY, "members")).alias("entries"))
        nparts = max(1, min(k, sc.defaultParallelism * 2))
        out = (
            grouped.repartition(nparts, "j")
            .rdd.map(_group_entry)
            .mapPartitions(lambda it: write_output_shards(it, out_dir, urls, plan_id, width))
            .collect()
        )
    finally:
        plan.unpersist()
    results = dict(out)
    if sorted(results) != list(range(k)):
        raise ReshardError(f"output shards {sorted(set(range(k)) - set(results))[:5]} were not written; re-run reshard to resume")
    return results


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="laiontools reshard", description="Write a subset into shuffled, evenly sized webdataset shards (Spark).")
    add_config_args(p, ReshardConfig, skip=("seed",))
    p.add_argument("--seed", dest="seed", default=argparse.SUPPRESS, help="shuffle seed (default: the subset's selection seed)")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(sys.argv[1:] if argv is None else argv)
    if hasattr(args, "seed"):
        args.seed = parse_seed(args.seed)
    cfg = config_from_args(ReshardConfig, args)
    res = run_reshard(cfg)
    emit(
        table([{"manifest": res["manifest"], "shards": res["num_shards"], "samples": f"{res['num_samples']:,}", "MB": f"{res['bytes'] / 1e6:.1f}"}])
    )
    return 0
