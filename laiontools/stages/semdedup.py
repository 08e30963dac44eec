"""`laiontools semdedup`: semantic near-duplicates inside a pool (SemDeDup, Abbas et al. 2023).

``laiontools semdedup --embeddings <embed out> --output <dir> [--clusters K] [--eps E ...] [--keep hard|easy|random] [--seed S]``

Steps, each resumable (a unit counts as done only when its completion marker, written last, holds
the same settings key):

1. **k-means** (one Spark task): spherical faiss k-means with K clusters, trained on a seeded sample
   of the valid image embeddings (``--train-sample``, default 256 per cluster, faiss's own cap), chosen
   per shard by a seeded key of each uid and taken in uid order, so that a pool holding the same
   samples in another order (a re-download) gets the same centroids;
   ``kmeans/centroids.npy`` + ``kmeans/kmeans.json`` (written last).
2. **assign** (Spark, one task per embedding shard): every valid vector goes to its nearest centroid.
   Per shard: ``assign/<shard>.parquet`` (row, uid, key, cluster, centroid_similarity; cluster -1 for
   samples embed could not process) and the shard's vectors re-ordered by cluster in
   ``bycluster/<shard>.vec.npy`` + ``.meta.npy`` (uid, row, centroid similarity) + ``.offsets.npy``
   (K+1 offsets), so a later task reads one contiguous range per shard for any run of clusters.
3. **groups** (Spark, one task per unit of consecutive whole clusters, at most ``--unit-rows`` rows
   unless one cluster is larger): the unit's rows are gathered from every shard into a local
   memory-mapped file; per cluster, pairs with cosine > 1 - eps link samples, linked samples form
   groups (connected components) and one member per group is kept by ``--keep``
   (:mod:`laiontools.neardup`). Memory per task: the cluster's vectors in float32 up to
   ``--memory-rows`` rows (larger clusters are read block by block from the file), two
   ``--block-rows`` blocks, and O(rows) metadata: bounded by the settings, not by the pool.
   ``report/<unit>.parquet``, one row per sample in a group of two or more, per eps: uid, shard, row,
   cluster, centroid_similarity, eps, group, group_size, removed, kept_uid, similarity (cosine to the
   kept member).
4. **outputs** (driver): per eps ``eps/<label>/exclude.uids.npy`` (sorted ``u8,u8`` uid file, merged
   from each unit's sorted run of removed uids, ``removed_runs/<eps>/<unit>.npy``, one uid range at a
   time: :func:`merge_runs`) + ``eps/<label>/dedup.json``; the first eps is
   also the top-level ``exclude.uids.npy`` + ``dedup.json``, so ``subsets --exclude <out>`` takes it
   directly (``--exclude <out>/eps/<label>`` another); ``summary.json``/``summary.txt`` (fraction
   removed per eps: the curve to choose from) and ``gallery.html`` (largest groups with captions).

The driver holds centroids and per-cluster counts, never vectors. Same inputs + seed give the same bytes.

Where the tasks run: on Spark when a master is named (``--master``, ``$LAIONTOOLS_SPARK_MASTER``),
under spark-submit, or above ``--spark-above`` embedded samples (default 2M); otherwise the same task
functions run in the CLI's process, a few at once on threads sharing the cores (faiss/BLAS), which
then holds what those tasks hold (one shard or one unit of clusters each), never the pool. Their files and markers are the same, so the bytes do
not depend on the engine and a run killed on one resumes on the other.
"""

from __future__ import annotations

import dataclasses
import functools
import heapq
import io
import logging
import math
import os
import time
from collections.abc import Iterable, Iterator
from typing import Any

import numpy as np

from laiontools.contracts.uids import UID_DTYPE, sort_uids, uids_to_array
from laiontools.core.config import ConfigError
from laiontools.core.errors import UserError, task_errors_as
from laiontools.core.logs import peak_rss_mb
from laiontools.core.stage import SparkStageConfig, StageResult, stage_entry, stage_tasks
from laiontools.core.storage import (
    PARQUET_CODEC,
    PARQUET_READ,
    PARQUET_WRITE,
    atomic_write_bytes,
    canonical_json,
    drop_stale_files,
    join,
    mark_done,
    read_json,
    read_marker,
    read_markers,
    scratch_dir,
    sha256_bytes,
    url_to_fs,
    write_json,
    write_record,
)
from laiontools.neardup import KEEP_POLICIES

log = logging.getLogger(__name__)

STAGE = "semdedup"
KMEANS_DIR = "kmeans"
ASSIGN_DIR = "assign"
BYCLUSTER_DIR = "bycluster"
REPORT_DIR = "report"
DONE_DIR = "done"
EPS_DIR = "eps"
EXCLUDE_UIDS = "exclude.uids.npy"
DEDUP_JSON = "dedup.json"
SUMMARY_JSON = "summary.json"
SUMMARY_TXT = "summary.txt"
GALLERY_HTML = "gallery.html"
RUNS_DIR = "removed_runs"
META_DTYPE = np.dtype([("hi", "<u8"), ("lo", "<u8"), ("row", "<i8"), ("csim", "<f4")])
_GALLERY_MEMBERS = 6
# Below this many embedded samples (and with no master named), the tasks run in the CLI's process:
# Spark's fixed cost (JVM, Python workers, three jobs) is seconds, more than the work it would spread
# (bench/bench_semdedup.py, BENCHMARKS.md).
SPARK_ABOVE_ROWS = 2_000_000


class SemDedupError(UserError, ValueError):
    """The embeddings cannot be clustered as asked (too few vectors for K, no valid vector)."""


@dataclasses.dataclass
class SemDedupConfig(SparkStageConfig):
    embeddings: str = dataclasses.field(default="", metadata={"help": "embed output folder (img_emb/, meta/, model.json)"})
    output: str = dataclasses.field(default="", metadata={"help": "output folder (resumable)"})
    clusters: int = dataclasses.field(default=0, metadata={"help": "k-means clusters (0: one per 1000 valid samples, at least 1, at most 100000)"})
    eps: list[float] = dataclasses.field(default_factory=lambda: [0.05], metadata={"help": "duplicates: cosine > 1 - eps; several values, one exclusion list each (the first is the top-level exclude.uids.npy)"})
    keep: str = dataclasses.field(default="hard", metadata={"help": "member kept per group: hard (farthest from the centroid, SemDeDup), easy (closest), random (seeded)"})
    seed: int = dataclasses.field(default=0, metadata={"help": "k-means and sampling seed (and the random policy's)"})
    train_sample: int = dataclasses.field(default=0, metadata={"help": "vectors k-means trains on (0: 256 per cluster)"})
    niter: int = dataclasses.field(default=20, metadata={"help": "k-means iterations"})
    unit_rows: int = dataclasses.field(default=200_000, metadata={"help": "rows per Spark task of the group step (whole clusters; a larger cluster is a unit alone)"})
    memory_rows: int = dataclasses.field(default=50_000, metadata={"help": "clusters up to this many rows are compared in memory; larger ones block by block from a local file"})
    block_rows: int = dataclasses.field(default=4096, metadata={"help": "rows per similarity block (memory ~ block_rows^2 x 4 bytes)"})
    threads: int = dataclasses.field(default=0, metadata={"help": "BLAS/faiss threads per Spark task (0: cores / concurrent tasks)"})
    partitions: int = dataclasses.field(default=0, metadata={"help": "Spark partitions (0: min(units, 4 x parallelism))"})
    spark_above: int = dataclasses.field(default=SPARK_ABOVE_ROWS, metadata={"help": "pools with more embedded samples than this run on Spark; smaller ones run the same tasks in this process (a few at once, on threads), unless a master is named or under spark-submit (0: always Spark, -1: only then)"})
    gallery_groups: int = dataclasses.field(default=24, metadata={"help": "duplicate groups shown in gallery.html (0: none)"})

    def validate(self) -> None:
        missing = [f"--{n}" for n in ("embeddings", "output") if not getattr(self, n)]
        if missing:
            raise ConfigError(f"semdedup needs {' and '.join(missing)}")
        if isinstance(self.eps, (int, float)):
            self.eps = [float(self.eps)]
        self.eps = [float(e) for e in self.eps]
        if not self.eps or any(not 0.0 < e < 1.0 for e in self.eps):
            raise ConfigError(f"eps values must be in (0, 1) (duplicates: cosine > 1 - eps), got {self.eps}")
        if len(set(self.eps)) != len(self.eps):
            raise ConfigError(f"eps values repeat: {self.eps}")
        if self.keep not in KEEP_POLICIES:
            raise ConfigError(f"keep must be one of {KEEP_POLICIES}, got {self.keep!r}")
        if not -(2**31) <= self.seed < 2**31:  # faiss's k-means takes a C int: a larger seed was an OverflowError traceback
            raise ConfigError(f"seed {self.seed} is out of range; give {-(2**31)} <= seed <= {2**31 - 1}")
        if self.clusters < 0 or self.train_sample < 0 or self.niter < 1:
            raise ConfigError("clusters and train_sample must be >= 0, niter >= 1")
        if self.unit_rows < 1 or self.memory_rows < 1 or self.block_rows < 16 or self.gallery_groups < 0:
            raise ConfigError("unit_rows and memory_rows must be >= 1, block_rows >= 16, gallery_groups >= 0")


CONFIG = SemDedupConfig


def eps_label(e: float) -> str:
    """Folder/column label of an eps value ('0.05')."""
    return format(e, "g")


# ---------------------------------------------------------------------------------------------
# small helpers shared by tasks


def _npy_bytes(arr: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.save(buf, arr, allow_pickle=False)
    return buf.getvalue()


def _load_npy(path: str, mmap: bool = True) -> np.ndarray:
    from laiontools.core.storage import is_local

    fs, p = url_to_fs(path)
    if mmap and is_local(fs):
        return np.load(p, mmap_mode="r", allow_pickle=False)
    with fs.open(p, "rb") as f:
        return np.load(io.BytesIO(f.read()), allow_pickle=False)


def _read_npy_rows(path: str, lo: int, hi: int) -> np.ndarray:
    """Rows [lo, hi) of a 1-D/2-D .npy file with one ranged read (memory map when local)."""
    from numpy.lib import format as npformat

    from laiontools.core.storage import is_local

    fs, p = url_to_fs(path)
    if is_local(fs):
        return np.asarray(np.load(p, mmap_mode="r", allow_pickle=False)[lo:hi])
    with fs.open(p, "rb") as f:
        version = npformat.read_magic(f)
        # numpy's public header readers (1.0 and 2.0; 3.0 only adds utf-8 field names, which we never write)
        read_header = npformat.read_array_header_1_0 if version == (1, 0) else npformat.read_array_header_2_0
        shape, fortran, dtype = read_header(f)
        if fortran:
            raise UserError(f"{path} is Fortran-ordered; semdedup writes C order only (file replaced?)")
        row_bytes = int(np.prod(shape[1:], dtype=np.int64)) * dtype.itemsize
        f.seek(f.tell() + lo * row_bytes)
        data = f.read((hi - lo) * row_bytes)
    return np.frombuffer(data, dtype=dtype).reshape((hi - lo, *shape[1:]))


def _set_threads(n: int) -> None:
    if n > 0:
        import faiss

        faiss.omp_set_num_threads(n)


def _status_ok(meta: Any, lo: int, hi: int) -> np.ndarray:
    """Rows [lo, hi) whose embed status is ok (all rows when there is no status column) and that carry a
    uid. embed records a sample whose uid it could not read as failed with a null uid: such a row is not
    a sample of the pool by uid, so it is left out like any failed row (counted as not embedded)."""
    import pyarrow as pa
    import pyarrow.compute as pc

    has_uid = pc.is_valid(meta.column("uid").slice(lo, hi - lo)).to_numpy(zero_copy_only=False).astype(bool, copy=False)
    col = next((c for c in ("embed_status", "status") if c in meta.column_names), None)
    if col is None:
        return has_uid
    good = pc.fill_null(pc.is_in(meta.column(col).slice(lo, hi - lo), value_set=pa.array(["ok", "success"])), True)
    return good.to_numpy(zero_copy_only=False).astype(bool, copy=False) & has_uid


def _vector_ok(x: np.ndarray) -> np.ndarray:
    """float32 rows that are finite and not (near) zero."""
    return np.isfinite(x).all(axis=1) & (np.einsum("ij,ij->i", x, x) > 0.25)


def _valid_rows(meta: Any, lo: int, x: np.ndarray) -> np.ndarray:
    """Rows [lo, lo + len(x)) embed processed: status ok (or no status column) and a finite, non-zero
    vector (`x`: those rows in float32)."""
    return _status_ok(meta, lo, lo + len(x)) & _vector_ok(x)


def _uid_array(meta: Any) -> np.ndarray:
    """The uid column as UID_DTYPE; a null uid (a row embed recorded as failed, never valid) is all zeros."""
    import pyarrow.compute as pc

    from laiontools.contracts.uids import uids_to_array

    return uids_to_array(pc.fill_null(meta.column("uid"), "0" * 32).to_pylist())


# ---------------------------------------------------------------------------------------------
# step 1: k-means (one task)


def _train_task(ctx: dict[str, Any], _: Any) -> Iterator[bytes]:
    """Seeded sample of valid vectors from every shard -> spherical k-means -> centroids as .npy bytes."""
    from laiontools import neardup
    from laiontools.contracts.embeddings import read_embedding_shard

    _set_threads(ctx["threads"])
    total, want = ctx["total_rows"], ctx["train_rows"]
    parts = []
    for sid in ctx["shards"]:
        emb, meta = read_embedding_shard(ctx["emb_dir"], sid)
        # sample among the rows embed processed, then drop the few whose vector is unusable: only the
        # sample is converted and checked, not the shard
        cand = np.flatnonzero(_status_ok(meta, 0, emb.shape[0]))
        take = min(len(cand), math.ceil(want * emb.shape[0] / max(1, total)))
        if not take:
            continue
        # Chosen by a seeded key of each uid and taken in uid order: the sample and so the centroids
        # depend on which samples a shard holds, not on where they sit in it (a re-download writes the
        # same samples in the order their fetches ended).
        u = uids_to_array(meta.column("uid").take(cand).to_pylist())
        chosen = np.argsort(neardup.sample_key(u, ctx["seed"]), kind="stable")[:take]
        chosen = chosen[np.lexsort((u["lo"][chosen], u["hi"][chosen]))]
        pick = cand[chosen]
        rows = np.sort(pick)  # read in file order, then put in the sample's order
        x = np.asarray(emb[rows], dtype=np.float32)[np.searchsorted(rows, pick)]
        parts.append(neardup.normalize(x[_vector_ok(x)]))
    x = np.concatenate(parts) if parts else np.zeros((0, ctx["dim"]), np.float32)
    if x.shape[0] < ctx["k"]:
        raise SemDedupError(f"{ctx['emb_dir']}: {x.shape[0]} valid vectors sampled for k-means but --clusters is {ctx['k']}; "
                            f"lower --clusters or raise --train-sample")
    yield _npy_bytes(neardup.train_kmeans(x, ctx["k"], ctx["seed"], ctx["niter"], gpu=ctx.get("gpu", False)))


# ---------------------------------------------------------------------------------------------
# step 2: assign (one task per shard)


_CENTROIDS: dict[str, Any] = {}


def _centroid_index(path: str, sha: str) -> tuple[np.ndarray, Any]:
    """The centroids (float32) and a faiss inner-product index of them, loaded once per worker process."""
    hit = _CENTROIDS.get(sha)
    if hit is not None:
        return hit
    import faiss

    fs, p = url_to_fs(path)
    with fs.open(p, "rb") as f:
        data = f.read()
    if sha256_bytes(data) != sha:
        raise UserError(f"{path} changed since the job started (sha256 mismatch); re-run semdedup")
    c = np.ascontiguousarray(np.load(io.BytesIO(data), allow_pickle=False), dtype=np.float32)
    index = faiss.IndexFlatIP(c.shape[1])
    index.add(c)
    _CENTROIDS.clear()
    _CENTROIDS[sha] = (c, index)
    return c, index


def _assign_paths(out: str, sid: str) -> dict[str, str]:
    b = join(out, BYCLUSTER_DIR)
    return {"parquet": join(out, ASSIGN_DIR, f"{sid}.parquet"), "vec": join(b, f"{sid}.vec.npy"),
            "meta": join(b, f"{sid}.meta.npy"), "offsets": join(b, f"{sid}.offsets.npy"),
            "done": join(out, DONE_DIR, ASSIGN_DIR, sid)}


def assign_shard(ctx: dict[str, Any], sid: str) -> dict[str, Any]:
    """Assign one embedding shard's vectors to centroids; write its files, then its marker (last)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from laiontools import neardup
    from laiontools.contracts.embeddings import read_embedding_shard, shard_identity, shard_marker

    paths = _assign_paths(ctx["output"], sid)
    marker = read_marker(paths["done"])
    # done for these centroids AND these embeddings: k-means can give the same centroids after a shard
    # was embedded again (a takedown's rewritten shard), whose assignment must then be made again
    emb_marker = shard_marker(ctx["emb_dir"], sid)  # read once: the identity and the checked hashes are one embed run's
    emb_id = shard_identity(ctx["emb_dir"], sid, emb_marker)
    if marker is not None and marker.get("key") == ctx["assign_key"] and marker.get("embedding") == emb_id:
        return marker
    t0 = time.time()
    _set_threads(ctx["threads"])
    cents, index = _centroid_index(ctx["centroids_path"], ctx["centroids_sha"])
    emb, meta = read_embedding_shard(ctx["emb_dir"], sid, emb_marker)
    n = emb.shape[0]
    valid = np.zeros(n, dtype=bool)
    cluster = np.full(n, -1, dtype=np.int32)
    csim = np.full(n, np.nan, dtype=np.float32)
    # Everything downstream (centroid similarity, pairs) uses the vectors as stored here: unit norm,
    # rounded to float16, so a number in the report can be recomputed from the stored vectors.
    vec16 = np.zeros((n, emb.shape[1]), dtype=np.float16)
    for lo in range(0, n, 65536):  # each block converted to float32 once (validity, norm, search)
        x = np.asarray(emb[lo:lo + 65536], dtype=np.float32)
        ok = _valid_rows(meta, lo, x)
        valid[lo:lo + len(x)] = ok
        r = np.flatnonzero(ok)
        v16 = neardup.normalize(x[r]).astype(np.float16)
        vec16[lo + r] = v16
        cluster[lo + r], csim[lo + r] = neardup.assign(v16.astype(np.float32), cents, index)
    vrows = np.flatnonzero(valid)
    uids = _uid_array(meta)
    order = vrows[np.argsort(cluster[vrows], kind="stable")]  # by cluster, then row: contiguous per cluster
    vec = vec16[order]
    m = np.empty(len(order), dtype=META_DTYPE)
    m["hi"], m["lo"], m["row"], m["csim"] = uids["hi"][order], uids["lo"][order], order, csim[order]
    counts = np.bincount(cluster[vrows], minlength=ctx["k"]).astype(np.int64)
    offsets = np.concatenate([[0], np.cumsum(counts)]).astype(np.int64)
    key_col = meta.column("key").cast(pa.string()) if "key" in meta.column_names else pa.nulls(n, pa.string())
    table = pa.table({"row": pa.array(np.arange(n, dtype=np.int64)), "uid": meta.column("uid").cast(pa.string()),
                      "key": key_col, "cluster": pa.array(cluster), "centroid_similarity": pa.array(csim, mask=~valid)})
    buf = io.BytesIO()
    pq.write_table(table, buf, **{**PARQUET_WRITE, "compression": ctx.get("parquet_codec", PARQUET_CODEC)})
    atomic_write_bytes(paths["parquet"], buf.getvalue())
    atomic_write_bytes(paths["vec"], _npy_bytes(vec))
    atomic_write_bytes(paths["meta"], _npy_bytes(m))
    atomic_write_bytes(paths["offsets"], _npy_bytes(offsets))
    stats = {"key": ctx["assign_key"], "embedding": emb_id, "shard": sid, "rows": int(n), "valid": int(valid.sum()),
             "seconds": round(time.time() - t0, 3), "peak_rss_mb": peak_rss_mb()}
    mark_done(paths["done"], stats)  # last
    return stats


def _assign_partition(ctx: dict[str, Any], sids: Iterable[str]) -> Iterator[dict[str, Any]]:
    for sid in sids:
        yield assign_shard(ctx, sid)


# ---------------------------------------------------------------------------------------------
# step 3: groups (one task per unit of whole clusters)


def plan_units(counts: np.ndarray, unit_rows: int) -> list[tuple[int, int]]:
    """Runs [c0, c1) of consecutive clusters holding at most `unit_rows` rows each (a larger cluster alone).

    Empty clusters join their neighbours; deterministic for the same counts.
    """
    units, c0, rows = [], 0, 0
    for c, n in enumerate(counts.tolist()):
        if rows and rows + n > unit_rows:
            units.append((c0, c))
            c0, rows = c, 0
        rows += n
    if c0 < len(counts):
        units.append((c0, len(counts)))
    return units


def _unit_id(u: tuple[int, int]) -> str:
    return f"{u[0]:07d}-{u[1]:07d}"


def _gather(ctx: dict[str, Any], c0: int, c1: int, tmpdir: str) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """The unit's rows from every shard, grouped by cluster: (vectors memmap float16 (n, d) in a local
    file, META_DTYPE rows, shard index per row, cluster start offsets (c1 - c0 + 1))."""
    per_shard = []
    counts = np.zeros(c1 - c0, dtype=np.int64)
    for i, sid in enumerate(ctx["shards"]):
        off = _load_npy(_assign_paths(ctx["output"], sid)["offsets"])
        seg = np.asarray(off[c0:c1 + 1], dtype=np.int64)
        if seg[-1] > seg[0]:
            per_shard.append((i, sid, seg))
            counts += np.diff(seg)
    starts = np.concatenate([[0], np.cumsum(counts)]).astype(np.int64)
    n = int(starts[-1])
    vec = np.lib.format.open_memmap(os.path.join(tmpdir, "vec.npy"), mode="w+", dtype=np.float16, shape=(max(n, 1), ctx["dim"]))
    meta = np.empty(n, dtype=META_DTYPE)
    shard_of = np.empty(n, dtype=np.int32)
    cursor = starts[:-1].copy()
    for i, sid, seg in per_shard:  # shards in order, so rows within a cluster are in (shard, row) order
        p = _assign_paths(ctx["output"], sid)
        lo, hi = int(seg[0]), int(seg[-1])
        v = _read_npy_rows(p["vec"], lo, hi)
        m = _read_npy_rows(p["meta"], lo, hi)
        cnt = np.diff(seg)
        cl = np.repeat(np.arange(c1 - c0), cnt)
        dest = cursor[cl] + (np.arange(hi - lo) - (seg[:-1] - lo)[cl])
        vec[dest] = v
        meta[dest] = m
        shard_of[dest] = i
        cursor += cnt
    return vec, meta, shard_of, starts


def _report_schema() -> Any:
    import pyarrow as pa

    return pa.schema([
        ("uid", pa.string()), ("shard", pa.string()), ("row", pa.int64()), ("cluster", pa.int32()),
        ("centroid_similarity", pa.float32()), ("eps", pa.float64()), ("eps_label", pa.string()),
        ("group", pa.string()), ("group_size", pa.int32()), ("removed", pa.bool_()), ("kept_uid", pa.string()),
        ("similarity", pa.float32()),
    ])


def _hex(hi: np.ndarray, lo: np.ndarray) -> list[str]:
    return [f"{int(a):016x}{int(b):016x}" for a, b in zip(hi.tolist(), lo.tolist())]


def _first_of_each_uid(meta: np.ndarray, shard_of: np.ndarray) -> np.ndarray:
    """Mask of the unit's rows that stand for their uid: of rows sharing a uid, the one of the smallest
    (shard, row). The exclusion list is by uid while groups are of rows, so two rows of one uid could
    make the uid a group's kept member and, through its other row, a removed one; the report would say
    kept a sample the list excludes. (Rows of one uid with the same image share a cluster, so a unit.)"""
    keep = np.ones(len(meta), dtype=bool)
    if len(meta) > 1:
        order = np.lexsort((meta["row"], shard_of, meta["lo"], meta["hi"]))
        h, lo = meta["hi"][order], meta["lo"][order]
        same = (h[1:] == h[:-1]) & (lo[1:] == lo[:-1])
        keep[order[1:][same]] = False
    return keep


def group_unit(ctx: dict[str, Any], unit: tuple[int, int]) -> dict[str, Any]:
    """Find the duplicate groups of one unit of clusters; write its report, then its marker (last)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from laiontools import neardup

    uid_ = _unit_id(unit)
    out_path = join(ctx["output"], REPORT_DIR, f"{uid_}.parquet")
    done_path = join(ctx["output"], DONE_DIR, "units", uid_)
    marker = read_marker(done_path)
    # done for these settings, and with at least as many gallery candidates as this run shows (the
    # driver keeps the largest --gallery-groups of all units' candidates: more per unit give the same)
    if (marker is not None and marker.get("key") == ctx["unit_key"]
            and marker.get("gallery_groups", -1) >= ctx["gallery_groups"]):
        return marker
    t0 = time.time()
    _set_threads(ctx["threads"])
    eps = ctx["eps"]
    labels_ = [eps_label(e) for e in eps]
    cols: dict[str, list[Any]] = {f.name: [] for f in _report_schema()}
    stats: dict[str, Any] = {"key": ctx["unit_key"], "unit": uid_, "gallery_groups": ctx["gallery_groups"],
                             "rows": 0, "clusters": 0, "largest_cluster": 0,
                             "eps": {lab: {"removed": 0, "groups": 0, "in_groups": 0, "pairs": 0} for lab in labels_}}
    gallery: list[tuple] = []
    removed_runs: dict[str, list[np.ndarray]] = {lab: [] for lab in labels_}
    with scratch_dir("laiontools-semdedup") as tmpdir:
        vec, meta, shard_of, starts = _gather(ctx, unit[0], unit[1], tmpdir)
        first = _first_of_each_uid(meta, shard_of)
        stats["duplicate_uid_rows"] = int(len(first) - first.sum())
        for c in range(unit[0], unit[1]):
            s, e = int(starts[c - unit[0]]), int(starts[c - unit[0] + 1])
            if e == s:
                continue
            keep_rows = first[s:e]
            if keep_rows.all():
                # In memory up to memory_rows; a larger cluster stays in the memory-mapped file (read by blocks).
                x = np.asarray(vec[s:e], dtype=np.float32) if e - s <= ctx["memory_rows"] else vec[s:e]
                m, so = meta[s:e], shard_of[s:e]
            else:  # a uid on two rows (a pool holding one sample twice): one row stands for it (rare, so in memory)
                idx = s + np.flatnonzero(keep_rows)
                x, m, so = np.asarray(vec[idx], dtype=np.float32), meta[idx], shard_of[idx]
            n = len(m)
            stats["rows"] += n
            stats["clusters"] += 1
            stats["largest_cluster"] = max(stats["largest_cluster"], n)
            labels, pairs = neardup.cluster_groups(x, eps, ctx["block_rows"])
            for k, lab in enumerate(labels_):
                st = stats["eps"][lab]
                st["pairs"] += int(pairs[k])
                _, inv, sizes = np.unique(labels[k], return_inverse=True, return_counts=True)
                gsize = sizes[inv]
                members = np.flatnonzero(gsize > 1)
                if not len(members):
                    continue
                keeper = neardup.choose_keepers(labels[k], m["csim"], m, ctx["keep"], ctx["seed"])
                removed = keeper != np.arange(n)
                st["removed"] += int(removed.sum())
                removed_runs[lab].append(m[["hi", "lo"]][removed].astype(UID_DTYPE))
                st["groups"] += int((sizes > 1).sum())
                st["in_groups"] += len(members)
                xm = np.asarray(x[members], dtype=np.float32)
                xk = np.asarray(x[keeper[members]], dtype=np.float32)
                sim = np.einsum("ij,ij->i", xm, xk)
                uids = _hex(m["hi"][members], m["lo"][members])
                kept = _hex(m["hi"][keeper[members]], m["lo"][keeper[members]])
                cols["uid"] += uids
                cols["shard"] += [ctx["shards"][i] for i in so[members].tolist()]
                cols["row"] += m["row"][members].tolist()
                cols["cluster"] += [c] * len(members)
                cols["centroid_similarity"] += m["csim"][members].tolist()
                cols["eps"] += [eps[k]] * len(members)
                cols["eps_label"] += [lab] * len(members)
                cols["group"] += [f"{c}-{int(r)}" for r in labels[k][members].tolist()]
                cols["group_size"] += gsize[members].tolist()
                cols["removed"] += removed[members].tolist()
                cols["kept_uid"] += kept
                cols["similarity"] += sim.tolist()
                if k == 0 and ctx["gallery_groups"]:
                    _gallery_candidates(gallery, ctx, c, labels[0], members, keeper, removed, sim, uids, so, m, gsize)
    table = pa.Table.from_pydict(cols, schema=_report_schema())
    buf = io.BytesIO()
    pq.write_table(table, buf, **{**PARQUET_WRITE, "compression": ctx.get("parquet_codec", PARQUET_CODEC)})
    atomic_write_bytes(out_path, buf.getvalue())
    for lab, runs in removed_runs.items():  # sorted runs, merged by uid range on the driver (_merge_runs)
        run_ = sort_uids(np.concatenate(runs)) if runs else np.zeros(0, dtype=UID_DTYPE)
        atomic_write_bytes(_run_path(ctx["output"], lab, uid_), _npy_bytes(run_))
    stats.update({"gallery": [g[-1] for g in sorted(gallery, reverse=True)], "seconds": round(time.time() - t0, 3),
                  "peak_rss_mb": peak_rss_mb()})
    mark_done(done_path, stats)  # last: the unit counts as done only now
    return stats


def _run_path(out: str, lab: str, unit_id: str) -> str:
    return join(out, RUNS_DIR, lab, f"{unit_id}.npy")


def merge_runs(paths: list[str], out_path: str, total: int, bucket_rows: int = 4_000_000) -> tuple[str, int]:
    """Write the sorted union of disjoint sorted uid runs (.npy, UID_DTYPE) as one uid file.

    uids are uniform hashes, so splitting the 64-bit ``hi`` range into ceil(total / bucket_rows) equal
    buckets gives buckets of ~bucket_rows; each bucket is cut from every run by binary search (runs are
    memory-mapped when local), sorted and appended. Memory: one bucket, whatever the total. Returns
    (sha256 of the file, count); raises RuntimeError if the runs hold another count than `total`.
    """
    import contextlib

    with contextlib.ExitStack() as stack:
        return _merge_runs(paths, out_path, total, bucket_rows, stack)


def _merge_runs(paths: list[str], out_path: str, total: int, bucket_rows: int, stack: Any) -> tuple[str, int]:
    import hashlib

    from laiontools.contracts.uids import npy_header
    from laiontools.core.storage import atomic_open, is_local

    local_dir: str | None = None
    runs = []
    for p in paths:
        fs, fp = url_to_fs(p)
        if not is_local(fs):  # an object store's run is copied to local scratch and memory-mapped, never held
            if local_dir is None:
                local_dir = stack.enter_context(scratch_dir("laiontools-semdedup-merge"))
            dest = os.path.join(local_dir, f"{len(runs)}.npy")
            fs.get(fp, dest)
            p = dest
        runs.append(_load_npy(p))
    n = int(sum(len(r) for r in runs))
    if n != total:
        raise RuntimeError(f"{out_path}: the unit runs hold {n} uids, the unit markers say {total}")
    nb = max(1, math.ceil(n / bucket_rows))
    edges = [(b << 64) // nb for b in range(nb)] + [1 << 64]
    h = hashlib.sha256()
    with atomic_open(out_path) as f:
        head = npy_header(n)
        f.write(head)
        h.update(head)
        for b in range(nb):
            parts = []
            for r in runs:
                lo = int(np.searchsorted(r["hi"], np.uint64(edges[b]))) if b else 0
                hi = int(np.searchsorted(r["hi"], np.uint64(edges[b + 1]))) if b + 1 < nb else len(r)
                if hi > lo:
                    parts.append(np.asarray(r[lo:hi]))
            if parts:
                data = sort_uids(np.concatenate(parts)).tobytes()
                f.write(data)
                h.update(data)
    return h.hexdigest(), n


def _gallery_candidates(heap: list[tuple], ctx: dict[str, Any], cluster: int, labels: np.ndarray, members: np.ndarray,
                        keeper: np.ndarray, removed: np.ndarray, sim: np.ndarray, uids: list[str], shard_of: np.ndarray,
                        m: np.ndarray, gsize: np.ndarray) -> None:
    """Keep the unit's largest groups (by size, then cluster/label for a fixed order) for the gallery.

    `gsize`: each row's group size. O(members): a group's size was counted over the whole cluster per
    group (O(groups x rows): 8 s for a cluster of 80k rows in 20k pairs, quadratic beyond)."""
    pos = {int(r): i for i, r in enumerate(members.tolist())}
    groups: dict[int, list[int]] = {}
    for r in members.tolist():
        groups.setdefault(int(labels[r]), []).append(r)
    for root, rows in groups.items():
        size = int(gsize[rows[0]])
        if len(heap) >= ctx["gallery_groups"] and (size, -cluster, -root) <= heap[0][:3]:
            continue  # would not enter the heap: not built
        rows = sorted(rows, key=lambda r: (removed[r], -float(sim[pos[r]])))[:_GALLERY_MEMBERS]  # keeper first
        entry = {"cluster": cluster, "group": f"{cluster}-{root}", "size": size,
                 "members": [{"uid": uids[pos[r]], "shard": ctx["shards"][int(shard_of[r])], "row": int(m["row"][r]),
                              "removed": bool(removed[r]), "similarity": round(float(sim[pos[r]]), 5)} for r in rows]}
        item = (size, -cluster, -root, entry)
        if len(heap) < ctx["gallery_groups"]:
            heapq.heappush(heap, item)
        else:
            heapq.heapreplace(heap, item)


def _group_partition(ctx: dict[str, Any], units: Iterable[tuple[int, int]]) -> Iterator[tuple[str, int]]:
    for u in units:
        st = group_unit(ctx, u)
        yield st["unit"], st["rows"]


def _tagged(fn: Any, ctx: dict[str, Any], items: Iterable[Any]) -> Iterator[Any]:
    """`fn(ctx, items)`, its UserError (too few vectors for k-means, a misaligned embedding shard, ...)
    tagged with task_error so that it reaches the driver from a Spark task as one line, as in process
    (the driver turns it back into a SemDedupError with :func:`task_errors_as`)."""
    from laiontools.core.errors import task_error

    try:
        yield from fn(ctx, items)
    except UserError as e:
        raise task_error(str(e).split("\n", 1)[0]) from e


# ---------------------------------------------------------------------------------------------
# driver


def _key(obj: Any) -> str:
    return sha256_bytes(canonical_json(obj))[:16]


@stage_entry(STAGE)
def run(cfg: SemDedupConfig, spark: Any = None) -> StageResult:
    """Semantic dedup of a pool's image embeddings; details = summary.json's content.

    Raises UserError subclasses for bad input: embeddings missing or incomplete for the pool
    manifest, fewer valid vectors than clusters.
    """
    from laiontools import index as DI
    from laiontools.contracts.embeddings import read_pool, shard_rows

    pool = read_pool(cfg.embeddings)
    shards = pool.shard_ids
    rows = shard_rows(cfg.embeddings, shards)
    total = int(sum(rows))
    k = cfg.clusters or max(1, min(100_000, total // 1000))
    if k > total:
        raise SemDedupError(f"--clusters {k} is more than the {total} embedded samples in {cfg.embeddings}")
    train_rows = min(total, cfg.train_sample or 256 * k)
    ident = DI.model_identity(pool.model)
    write_record(join(cfg.output, "settings.json"), {"stage": STAGE, **cfg.to_dict(), "clusters_used": k})
    base = {"model": ident, "pool": pool.fingerprint, "shards": shards, "rows": rows, "emb": os.path.abspath(cfg.embeddings)
            if "://" not in cfg.embeddings else cfg.embeddings}
    kmeans_key = _key({**base, "k": k, "seed": cfg.seed, "train_rows": train_rows, "niter": cfg.niter, "v": 2})
    timings: dict[str, float] = {}
    with stage_tasks(cfg, spark, app_name="laiontools-semdedup", size=total, spark_above=cfg.spark_above) as tasks:
        threads = tasks.threads(cfg.threads)
        ctx: dict[str, Any] = {"output": cfg.output, "emb_dir": cfg.embeddings, "shards": shards, "k": k, "seed": cfg.seed,
                               "dim": int(ident["embed_dim"]), "threads": threads, "niter": cfg.niter,
                               "total_rows": total, "train_rows": train_rows,
                               # the assignment and report parquet: on Spark the session's codec, as Spark's writer's
                               "parquet_codec": tasks.parquet_codec(),
                               "engine": "in-process" if tasks.local else f"spark {tasks.spark.sparkContext.master}"}
        # 1. k-means
        t0 = time.time()
        kjson = join(cfg.output, KMEANS_DIR, "kmeans.json")
        cpath = join(cfg.output, KMEANS_DIR, "centroids.npy")
        kfs, kp = url_to_fs(kjson)
        km = read_json(kjson) if kfs.exists(kp) else None
        if km is None or km.get("key") != kmeans_key:
            with task_errors_as(SemDedupError):
                (data,) = tasks.map(functools.partial(_tagged, _train_task, ctx), [0], 1,
                                    f"laiontools semdedup: k-means, {k} clusters on {train_rows} vectors")
            atomic_write_bytes(cpath, data)
            km = {"key": kmeans_key, "clusters": k, "train_rows": train_rows, "niter": cfg.niter, "seed": cfg.seed,
                  "dim": ctx["dim"], "centroids_sha256": sha256_bytes(data), "spherical": True}
            write_json(kjson, km)  # last: its presence means the centroids are complete
        timings["kmeans"] = round(time.time() - t0, 3)
        ctx.update(centroids_path=cpath, centroids_sha=km["centroids_sha256"], assign_key=_key({"c": km["centroids_sha256"], "v": 2}))  # 2: assign and pair rule of the 36th session
        # 2. assign
        t0 = time.time()
        ctx["threads"] = tasks.threads(cfg.threads, len(shards))
        with task_errors_as(SemDedupError):
            assigned = tasks.map(functools.partial(_tagged, _assign_partition, ctx), shards, cfg.partitions,
                                 f"laiontools semdedup: assign {len(shards)} shard(s) to {k} clusters")
        timings["assign"] = round(time.time() - t0, 3)
        _drop_stale_shards(cfg.output, set(shards))
        counts = np.zeros(k, dtype=np.int64)
        for sid in shards:  # one offsets file at a time: the driver holds K counts, never vectors
            counts += np.diff(_load_npy(_assign_paths(cfg.output, sid)["offsets"], mmap=False))
        valid = int(counts.sum())
        if valid == 0:
            raise SemDedupError(f"{cfg.embeddings}: no valid embedding (every sample failed embed)")
        # 3. groups
        units = plan_units(counts, cfg.unit_rows)
        ctx.update(eps=cfg.eps, keep=cfg.keep, memory_rows=cfg.memory_rows, block_rows=cfg.block_rows,
                   gallery_groups=cfg.gallery_groups,
                   unit_key=_key({"a": ctx["assign_key"], "eps": cfg.eps, "keep": cfg.keep, "seed": cfg.seed,
                                  "units": units, "v": 4,  # 4: and the embeddings each shard's assignment is of
                                  "emb": _key(sorted((a["shard"], a.get("embedding")) for a in assigned))}))
        t0 = time.time()
        big_first = sorted(units, key=lambda u: -int(counts[u[0]:u[1]].sum()))  # long tasks start first
        ctx["threads"] = tasks.threads(cfg.threads, len(units))
        with task_errors_as(SemDedupError):
            tasks.map(functools.partial(_tagged, _group_partition, ctx), big_first, cfg.partitions,
                      f"laiontools semdedup: duplicate groups in {len(units)} unit(s) of clusters")
        timings["groups"] = round(time.time() - t0, 3)
        _drop_stale_units(cfg.output, {_unit_id(u) for u in units}, [eps_label(e) for e in cfg.eps])
        # 4. outputs
        t0 = time.time()
        summary = _write_outputs(cfg, pool, k, km, counts, units, assigned, ctx, timings)
        timings["outputs"] = round(time.time() - t0, 3)
    text = summary.pop("_text")
    return StageResult(
        outputs={"exclude": join(cfg.output, EXCLUDE_UIDS), "dedup": join(cfg.output, DEDUP_JSON),
                 "summary": join(cfg.output, SUMMARY_TXT), "report": join(cfg.output, REPORT_DIR),
                 **({"gallery": join(cfg.output, GALLERY_HTML)} if cfg.gallery_groups else {})},
        counts={"pool_samples": summary["pool_samples"], "clustered": summary["clustered"], "clusters": k,
                "removed": summary["eps"][0]["removed"]},
        timings=timings, details=summary, summary=text,
    )


def _write_outputs(cfg: SemDedupConfig, pool: Any, k: int, km: dict[str, Any], counts: np.ndarray,
                   units: list[tuple[int, int]], assigned: list[dict[str, Any]], ctx: dict[str, Any],
                   timings: dict[str, float]) -> dict[str, Any]:
    from laiontools import index as DI
    from laiontools.core.report import table

    agg = {eps_label(e): {"removed": 0, "groups": 0, "in_groups": 0, "pairs": 0} for e in cfg.eps}
    peak = max([float(a.get("peak_rss_mb", 0)) for a in assigned] or [0.0])
    gallery: list[tuple] = []
    largest = 0
    dup_rows = 0
    for u, st in zip(units, read_markers([join(cfg.output, DONE_DIR, "units", _unit_id(u)) for u in units])):
        if st is None or st.get("key") != ctx["unit_key"]:
            raise RuntimeError(f"unit {_unit_id(u)} reported done but its marker is missing or stale")  # a bug
        for lab, v in st["eps"].items():
            for f in agg[lab]:
                agg[lab][f] += v[f]
        peak = max(peak, float(st.get("peak_rss_mb", 0)))
        largest = max(largest, st["largest_cluster"])
        dup_rows += int(st.get("duplicate_uid_rows", 0))
        for g in st["gallery"]:
            item = (g["size"], -g["cluster"], g["group"], g)
            if len(gallery) < cfg.gallery_groups:
                heapq.heappush(gallery, item)
            elif item[:3] > gallery[0][:3]:
                heapq.heapreplace(gallery, item)
    pool_rows = int(sum(a["rows"] for a in assigned))
    valid = int(counts.sum())
    pool_info = {"manifest": pool.manifest_path, "fingerprint": pool.fingerprint, "embeddings": pool.emb_dir,
                 "name": (pool.manifest or {}).get("name")}
    per_eps = []
    for i, e in enumerate(cfg.eps):
        lab = eps_label(e)
        folder = join(cfg.output, EPS_DIR, lab)
        sha, n_ex = merge_runs([_run_path(cfg.output, lab, _unit_id(u)) for u in units], join(folder, EXCLUDE_UIDS),
                               agg[lab]["removed"])
        info = {"kind": "semdedup", "eps": e, "threshold": 1.0 - e, "keep": cfg.keep, "seed": cfg.seed, "clusters": k,
                "model": DI.model_identity(pool.model), "pool": pool_info,
                "exclude": {"path": EXCLUDE_UIDS, "sha256": sha, "count": n_ex,
                            "rule": f"in a group of samples linked by cosine > {1.0 - e:g} within a k-means cluster, not the member kept ({cfg.keep})"}}
        write_record(join(folder, DEDUP_JSON), info)
        if i == 0:  # the first eps is the output folder's own exclusion list: `subsets --exclude <out>`
            _copy_file(join(folder, EXCLUDE_UIDS), join(cfg.output, EXCLUDE_UIDS))
            write_record(join(cfg.output, DEDUP_JSON), {**info, "exclude": {**info["exclude"], "eps_folder": f"{EPS_DIR}/{lab}"},
                                                     "summary": SUMMARY_JSON, "report": REPORT_DIR})
        per_eps.append({"eps": e, "threshold": round(1.0 - e, 10), "removed": n_ex,
                        "removed_fraction": round(n_ex / max(1, valid), 6), "groups": agg[lab]["groups"],
                        "samples_in_groups": agg[lab]["in_groups"], "pairs": agg[lab]["pairs"],
                        "exclude": f"{EPS_DIR}/{lab}/{EXCLUDE_UIDS}", "exclude_sha256": sha})
    nz = counts[counts > 0]
    summary = {
        "pool_samples": pool_rows, "clustered": valid - dup_rows, "not_embedded": pool_rows - valid,
        "duplicate_uid_rows": dup_rows, "clusters": k,
        "clusters_empty": int((counts == 0).sum()), "cluster_size": {"min": int(nz.min()), "median": float(np.median(nz)),
                                                                      "max": int(nz.max())},
        "keep": cfg.keep, "seed": cfg.seed, "train_rows": km["train_rows"], "units": len(units),
        "model": DI.describe_model(pool.model), "eps": per_eps, "worker_peak_rss_mb": peak, "engine": ctx["engine"], "timings": dict(timings),
        "pool": pool_info,
    }
    write_json(join(cfg.output, SUMMARY_JSON), summary)
    dup_line = ""
    if dup_rows:
        dup_line = (f"WARNING: {dup_rows} embedding rows repeat a uid of another row (the pool holds those samples twice: "
                    f"`laiontools verify` names them); each uid was clustered once, from its row of the smallest (shard, row)\n")
        log.warning(dup_line.strip())
    txt = (dup_line + f"semdedup of {pool_rows} pool samples ({valid} embedded) in {k} clusters "
           f"(sizes {summary['cluster_size']['min']}-{summary['cluster_size']['max']}), keep {cfg.keep}, seed {cfg.seed}\n"
           f"model {summary['model']}\n\n"
           + table([{"eps": p["eps"], "cosine >": p["threshold"], "groups": p["groups"], "removed": p["removed"],
                     "removed %": round(100 * p["removed_fraction"], 3), "exclusion list": p["exclude"]} for p in per_eps])
           + f"\n\nsubsets --exclude {cfg.output} removes the eps {eps_label(cfg.eps[0])} list; "
           f"--exclude {join(cfg.output, EPS_DIR, '<eps>')} another\n")
    atomic_write_bytes(join(cfg.output, SUMMARY_TXT), txt.encode())
    if cfg.gallery_groups:
        _write_gallery(join(cfg.output, GALLERY_HTML), cfg, pool, [g[-1] for g in sorted(gallery, reverse=True)])
    summary["_text"] = txt + f"outputs in {cfg.output}: {SUMMARY_TXT}, {EXCLUDE_UIDS}, {EPS_DIR}/, {REPORT_DIR}/, {GALLERY_HTML}"
    return summary


def _drop_stale_units(out: str, current: set[str], labels: list[str]) -> None:
    """Remove reports and runs of units a previous run planned differently (other counts, --unit-rows,
    --eps), and the eps/ folders of eps values this run does not have: whoever reads ``report/`` as one
    dataset, or gives ``--exclude <out>/eps/<eps>``, must see only this run's outputs."""
    for folder, suffix in [(join(out, REPORT_DIR), ".parquet"), *[(join(out, RUNS_DIR, lab), ".npy") for lab in labels]]:
        drop_stale_files(folder, suffix, current, "a unit of an earlier run's plan")
    for parent in (EPS_DIR, RUNS_DIR):
        drop_stale_files(join(out, parent), "", set(labels), "the outputs of an eps this run does not have", folders=True)


def _drop_stale_shards(out: str, current: set[str]) -> None:
    """Remove the per-shard outputs (assignment, vectors by cluster, marker) of shards an earlier run into
    this output had and this run's pool does not: whoever reads ``assign/`` as one dataset must see only
    this pool's rows, and ``bycluster/`` is a copy of every vector."""
    from laiontools.core.storage import DONE_SUFFIX

    why = "a shard of an earlier run's pool, not in this one"
    drop_stale_files(join(out, ASSIGN_DIR), ".parquet", current, why)
    for suffix in (".vec.npy", ".meta.npy", ".offsets.npy"):
        drop_stale_files(join(out, BYCLUSTER_DIR), suffix, current, why)
    drop_stale_files(join(out, DONE_DIR, ASSIGN_DIR), DONE_SUFFIX, current, why)


def _copy_file(src: str, dst: str, chunk: int = 1 << 20) -> None:
    """Copy `src` to `dst` (atomically) through a buffer of `chunk` bytes: an exclusion list can be
    gigabytes, which the driver must not hold."""
    from laiontools.core.storage import atomic_open

    fs, p = url_to_fs(src)
    with fs.open(p, "rb") as f, atomic_open(dst) as g:
        while True:
            b = f.read(chunk)
            if not b:
                break
            g.write(b)


def _write_gallery(path: str, cfg: SemDedupConfig, pool: Any, groups: list[dict[str, Any]]) -> None:
    """gallery.html: the largest duplicate groups of the first eps, kept member first, with captions.
    A pool tar that cannot be read (moved, deleted, damaged since embed) leaves its images out, logged."""
    import html
    import tarfile

    import pyarrow.parquet as pq

    from laiontools.gallery import pool_images, thumbnail_b64

    want: dict[str, dict[int, str]] = {}  # shard -> row -> key
    for g in groups:
        for mem in g["members"]:
            want.setdefault(mem["shard"], {})[mem["row"]] = ""
    for sid, rows in want.items():
        fs, p = url_to_fs(_assign_paths(cfg.output, sid)["parquet"])
        with fs.open(p, "rb") as f:
            t = pq.read_table(f, columns=["row", "key"], **PARQUET_READ).to_pydict()
        for r, key in zip(t["row"], t["key"]):
            if r in rows:
                rows[r] = key or ""
    images: dict[tuple[str, str], tuple[Any, str | None]] = {}
    for sid, rows in want.items():
        tar = pool.tar_by_shard.get(sid)
        keys = {k for k in rows.values() if k}
        if tar and keys:
            try:
                found = pool_images(tar, keys)
            except (OSError, tarfile.TarError) as e:  # semdedup needs no tar but here: shown as unavailable
                log.warning("gallery: cannot read pool tar %s (its images are shown as unavailable): %s", tar, e)
                continue
            for key, v in found.items():
                images[(sid, key)] = v
    parts = [(f"<html><head><meta charset='utf-8'><title>semdedup groups</title></head><body>"
              f"<h1>Largest duplicate groups (eps {eps_label(cfg.eps[0])}, cosine &gt; {1 - cfg.eps[0]:g}, keep {cfg.keep})</h1>")]
    for g in groups:
        parts.append(f"<h3>group {html.escape(g['group'])}: {g['size']} samples</h3><div style='display:flex;gap:8px;flex-wrap:wrap'>")
        for mem in g["members"]:
            key = want[mem["shard"]].get(mem["row"], "")
            img, cap = images.get((mem["shard"], key), (None, None))
            src = f"<img src='{thumbnail_b64(img)}'>" if img is not None else "<div>image unavailable</div>"
            tag = "removed" if mem["removed"] else "<b>kept</b>"
            parts.append(f"<figure style='width:170px'>{src}<figcaption>{tag} (cos {mem['similarity']:.4f} to kept)<br>"
                         f"{html.escape(cap or '')}<br><small>{mem['uid']}</small></figcaption></figure>")
        parts.append("</div>")
    parts.append("</body></html>")
    atomic_write_bytes(path, "\n".join(parts).encode())


def build_parser() -> Any:
    import argparse

    from laiontools.core.config import add_config_args

    p = argparse.ArgumentParser(prog="laiontools semdedup", description=(__doc__ or "").strip().split("\n")[0])
    add_config_args(p, SemDedupConfig, skip=("eps",))
    p.add_argument("--eps", dest="eps", type=float, nargs="+", action="extend", default=argparse.SUPPRESS,
                   help="duplicates: cosine > 1 - eps; several values, one exclusion list each (default 0.05)")
    return p


def main(argv: list[str] | None = None) -> int:
    from laiontools.core.stage import stage_main

    return stage_main(__name__, argv)


if __name__ == "__main__":
    import sys

    sys.exit(main())
