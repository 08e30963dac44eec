"""`laiontools dedup`: find pool samples that are near-duplicates of evaluation images (decontamination).

Steps (each resumable):

1. Evaluation sets are read (:mod:`laiontools.evalsets`) and embedded with the embedding stage's
   :class:`laiontools.models.embedder.Embedder`, using the model named in the pool embeddings' ``model.json``,
   so pool and evaluation vectors live in one space. The index (:mod:`laiontools.index`) is
   saved in ``<out>/index/`` with that model's description and reused on a re-run.
2. Search tasks stream every pool embedding shard through the index: Spark tasks above
   ``--spark-above`` pool samples (or with a master named, or under spark-submit; the index loaded once
   per worker process), else a few threads in this process sharing one loaded index (no JVM started;
   the same task function, files and markers). Each shard's task writes ``<out>/report/<shard>.parquet``
   atomically, then its completion marker, whose content is the shard's statistics. A re-run skips shards whose marker
   holds the same settings key (index sha256, threshold, k, pHash). The driver only folds small
   per-shard statistics, so its memory does not grow with the pool.
3. Optionally (``--phash``) the study's own method runs beside it: perceptual-hash exact matches
   between pool images (read from the pool tars named by the pool manifest) and evaluation images.
4. Outputs: ``summary.json``/``summary.txt`` per evaluation set, ``exclude.uids.npy`` (what subsets
   removes), ``dedup.json`` (pool fingerprint, model, threshold, uid file sha256) and ``gallery.html``
   (top matches and pairs just under the threshold, side by side) for a person to check the threshold.

A pool sample is a duplicate when its cosine similarity to some evaluation image is >= threshold.
`laiontools dedup calibrate` (:mod:`laiontools.stages.dedup_calibrate`) measures which threshold fits a model.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import functools
import heapq
import io
import logging
import threading
import time
from collections.abc import Iterable, Iterator
from typing import Any

import numpy as np

from laiontools import index as DI
from laiontools.contracts import layout

# The pool side (model.json, manifest, embedding shards) is a contract every consumer of embeddings shares.
from laiontools.contracts.embeddings import (  # noqa: F401
    MissingEmbeddingsError,
    PoolInfo,
    read_embedding_shard,
    read_pool,
    shard_identity,
    shard_marker,
    shard_rows,
)
from laiontools.contracts.uids import uids_to_array
from laiontools.core import failpoints
from laiontools.core.config import ConfigError, add_config_args
from laiontools.core.errors import InputError, UserError, task_errors_as
from laiontools.core.logs import peak_rss_mb
from laiontools.core.stage import SparkStageConfig, StageResult, Tasks, stage_entry, stage_tasks, wants_spark
from laiontools.core.storage import (
    DONE_SUFFIX,
    PARQUET_CODEC,
    PARQUET_READ,
    PARQUET_WRITE,
    atomic_write_bytes,
    drop_stale_files,
    ensure_output_dir,
    join,
    mark_done,
    read_marker,
    read_markers,
    rm_path,
    sha256_bytes,
    url_to_fs,
    write_json,
    write_record,
)
from laiontools.neardup import float32_cutoff

log = logging.getLogger(__name__)

# A starting point for pretrained CLIP image embeddings (near-duplicates typically score >= 0.9);
# random-init and small models spread cosines differently: `laiontools dedup calibrate` says which fits.
DEFAULT_THRESHOLD = 0.9
STATUS_OK = "ok"
STATUS_NOT_EMBEDDED = "not_embedded"
EVAL_GEOMETRY_POOL = "pool"
EVAL_GEOMETRIES = (EVAL_GEOMETRY_POOL, "none")
# Below this many pool samples the search runs in this process: Spark's start and its Python workers
# (~20-40 s here) cost more than searching 2M vectors against an evaluation index on a few threads.
SPARK_ABOVE_ROWS = 2_000_000


@dataclasses.dataclass
class DedupConfig(SparkStageConfig):
    embeddings: str = dataclasses.field(default="", metadata={"help": "embed output folder (img_emb/, meta/, model.json)"})
    evalset: list[str] = dataclasses.field(default_factory=list, metadata={"help": "name=path[:format], repeatable"})
    evalsets_yaml: str | None = dataclasses.field(default=None, metadata={"help": "YAML list of {name, path, format}"})
    output: str = dataclasses.field(default="", metadata={"help": "output folder (resumable)"})
    threshold: float = dataclasses.field(default=DEFAULT_THRESHOLD, metadata={"help": "cosine similarity at or above which a pool sample is a duplicate"})
    k: int = dataclasses.field(default=5, metadata={"help": "neighbours kept per pool sample"})
    index: str = dataclasses.field(default="flat", metadata={"help": "flat (exact inner product) or ivf (large reference sets)"})
    nlist: int | None = dataclasses.field(default=None, metadata={"help": "IVF lists (default ~4*sqrt(n))"})
    nprobe: int = dataclasses.field(default=16, metadata={"help": "IVF lists probed per query"})
    phash: bool = dataclasses.field(default=False, metadata={"help": "also report perceptual-hash exact matches (the study's method)"})
    phash_max_distance: int = dataclasses.field(default=0, metadata={"help": "pHash Hamming distance counted as a match (0 = exact, as the study)"})
    pretrained: str | None = dataclasses.field(default=None, metadata={"help": "checkpoint path, when model.json names a checkpoint by sha256"})
    device: str = dataclasses.field(default="auto", metadata={"help": "device for embedding evaluation sets: auto, cpu, cuda"})
    batch_size: int = dataclasses.field(default=64, metadata={"help": "evaluation images per embedding batch"})
    gpu: bool = dataclasses.field(default=True, metadata={"help": "use faiss GPU indexes when faiss sees a GPU"})
    chunk_rows: int = dataclasses.field(default=65536, metadata={"help": "pool vectors per faiss search call (bounds task memory)"})
    search_threads: int = dataclasses.field(default=0, metadata={"help": "faiss threads per search task (0: cores / concurrent tasks)"})
    partitions: int = dataclasses.field(default=0, metadata={"help": "Spark partitions for the search (0: min(shards, 4 x parallelism))"})
    spark_above: int = dataclasses.field(default=SPARK_ABOVE_ROWS, metadata={"help": "pools with more samples than this (the manifest's count) are searched on Spark; smaller ones in this process (a few shards at once, on threads, one index loaded), unless a master is named or under spark-submit (0: always Spark, -1: only then)"})
    gallery_pairs: int = dataclasses.field(default=24, metadata={"help": "pairs shown per gallery section"})
    eval_geometry: str = dataclasses.field(default=EVAL_GEOMETRY_POOL, metadata={"help": "pool: evaluation images go through the pool's own download resize (image size + resize mode recorded in its manifest) before they are embedded and pHashed, as pool copies of them did; none: compared as read (unlike pool copies when the pool letterboxed or cropped them)"})

    def validate(self) -> None:
        missing = [f"--{n}" for n in ("embeddings", "output") if not getattr(self, n)]
        if missing:
            raise ConfigError(f"dedup needs {' and '.join(missing)}")
        if not self.evalset and not self.evalsets_yaml:
            raise ConfigError("dedup needs at least one --evalset name=path[:format] or --evalsets-yaml FILE")
        if self.eval_geometry not in EVAL_GEOMETRIES:
            raise ConfigError(f"eval_geometry must be one of {EVAL_GEOMETRIES}, got {self.eval_geometry!r}")
        if not -1.0 <= self.threshold <= 1.0:
            raise ConfigError(f"threshold {self.threshold} must be a cosine similarity in [-1, 1]")
        if self.k < 1:
            raise ConfigError(f"k must be >= 1, got {self.k}")
        if self.index not in ("flat", "ivf"):
            raise ConfigError(f"index must be flat or ivf, got {self.index!r}")
        if self.nprobe < 1 or (self.nlist is not None and self.nlist < 1):
            raise ConfigError("nlist and nprobe must be >= 1")
        if self.batch_size < 1 or self.chunk_rows < 1 or self.gallery_pairs < 0:
            raise ConfigError("batch_size and chunk_rows must be >= 1, gallery_pairs >= 0")
        if self.spark_above < -1:
            raise ConfigError("spark_above must be >= 0, or -1 for Spark only when a master is named")
        if not 0 <= self.phash_max_distance <= 32:
            raise ConfigError(f"phash_max_distance must be in [0, 32] bits of 64, got {self.phash_max_distance}")
        if self.phash_max_distance and not self.phash:
            raise ConfigError(f"--phash-max-distance {self.phash_max_distance} without --phash: no pHash is computed; "
                              "add --phash (or drop the distance)")
        if self.device not in ("auto", "cpu", "cuda") and not self.device.startswith("cuda:"):
            raise ConfigError(f"device must be auto, cpu or cuda[:N], got {self.device!r}")


# ---------------------------------------------------------------------------------------------
# the pool side: model.json, manifest, embedding shards


def eval_geometry(pool: PoolInfo, mode: str) -> tuple[Any, dict[str, Any]]:
    """(callable PIL -> PIL or None, description) putting evaluation images into the pool's geometry.

    A downloaded pool stores every image resized by img2dataset (``border`` letterboxes a non-square
    image onto a white square, ``center_crop`` cuts its long side, ``keep_ratio`` rescales it), so a
    pool copy of a non-square evaluation image only looks like it after the same resize: embeddings
    and pHashes of the unprocessed image miss it. With `mode` ``pool`` the download's own resizer
    (:class:`laiontools.web.resize.PoolGeometry`) is used with the settings the pool manifest records;
    when none are recorded (no manifest, older pool) the images are used as read and the
    description says why, and a warning is logged.
    """
    if mode != EVAL_GEOMETRY_POOL:
        return None, {"mode": "none", "reason": "--eval-geometry none"}
    settings = pool.download_settings()
    if settings is None:
        why = ("the embeddings name no pool manifest" if not pool.manifest_path
               else f"{pool.manifest_path} (and its parents) record no download settings")
        log.warning("evaluation images are compared as read, not in the pool's geometry: %s; copies the pool "
                    "letterboxed or cropped may be missed", why)
        return None, {"mode": "none", "reason": why}
    from laiontools.web.resize import PoolGeometry

    geo = PoolGeometry(settings)
    return geo, {"mode": "pool", "settings": geo.describe()}


# ---------------------------------------------------------------------------------------------
# evaluation side: embed the sets, build the index


def _phash_image(image: Any) -> str:
    import imagehash

    return str(imagehash.phash(image))


def make_embedder(emb_dir: str, pretrained: str | None, device: str, batch_size: int) -> Any:
    """The embed stage's Embedder in the pool embeddings' space (embed checks the checkpoint sha256)."""
    from laiontools.models.embedder import embedder_for

    return embedder_for(emb_dir, device=None if device == "auto" else device, pretrained=pretrained, batch_size=batch_size)


def embed_evalsets(
    sets: list[Any], embedder: Any, batch_size: int, phash: bool, geometry: Any = None,
) -> tuple[np.ndarray, list[dict[str, Any]], list[dict[str, Any]]]:
    """Embed every readable item of every set, after `geometry` (PIL -> PIL, see :func:`eval_geometry`).

    An item `geometry` cannot process counts as unreadable, with the resizer's message as its error.
    Returns (float32 L2-normalized vectors (n_readable, d), one row per item — readable or not —
    for items.parquet, per-set counts). Unreadable items are counted and listed by item id.
    """
    from laiontools.evalsets import iter_items

    vecs: list[np.ndarray] = []
    rows: list[dict[str, Any]] = []
    counts: list[dict[str, Any]] = []
    next_row = 0
    # images waiting to be embedded, and their rows (emptied by flush(), at the latest at each set's end)
    batch: list[Any] = []
    pending: list[dict[str, Any]] = []

    def flush() -> None:
        nonlocal next_row
        if not batch:
            return
        e = np.asarray(embedder.embed_images(batch), dtype=np.float32)
        if e.shape[0] != len(batch):
            raise RuntimeError(f"Embedder returned {e.shape[0]} vectors for {len(batch)} images")
        vecs.append(e)
        for r in pending:
            r["row"] = next_row
            next_row += 1
        batch.clear()
        pending.clear()

    for es in sets:
        n_items = n_bad = 0
        bad_ids: list[str] = []
        for item in iter_items(es):
            n_items += 1
            row = {"row": -1, "evalset": es.name, "item_id": item.item_id, "label": item.label,
                   "caption": item.caption, "error": item.error, "phash": None}
            rows.append(row)
            image = item.image
            if image is not None and geometry is not None:
                try:
                    image = geometry(image)
                except ValueError as e:
                    row["error"], image = str(e), None
            if image is None:
                n_bad += 1
                bad_ids.append(item.item_id)
                continue
            if phash:
                row["phash"] = _phash_image(image)
            batch.append(image)
            pending.append(row)
            if len(batch) >= batch_size:
                flush()
        flush()
        if n_items == n_bad:
            raise UserError(f"evaluation set {es.name!r} at {es.path}: none of its {n_items} images could be read (first: {bad_ids[:3]})")
        counts.append({"name": es.name, "path": es.path, "format": es.format, "items": n_items,
                       "unreadable": n_bad, "indexed": n_items - n_bad, "unreadable_ids": bad_ids[:1000]})
        log.info("evaluation set %s: %d items, %d unreadable", es.name, n_items, n_bad)
    return np.concatenate(vecs, axis=0), rows, counts


def _items_table(rows: list[dict[str, Any]]) -> Any:
    import pyarrow as pa

    return pa.Table.from_pylist(rows, schema=pa.schema([
        ("row", pa.int64()), ("evalset", pa.string()), ("item_id", pa.string()), ("label", pa.int64()),
        ("caption", pa.string()), ("error", pa.string()), ("phash", pa.string()),
    ]))


def _file_sha256(path: str) -> str | None:
    from laiontools.core.storage import sha256_file

    fs, p = url_to_fs(path)
    return sha256_file(path)[0] if fs.exists(p) else None


_STAMP_KEYS = ("mtime", "ETag", "etag", "md5Hash", "LastModified", "last_modified", "updated", "mtime_ns")


def evalset_fingerprint(es: Any) -> str:
    """sha256 over the listing of an evaluation set's files (relative name, size, modification stamp), so
    an index built from other files is not reused: files added, removed or replaced under the same path.
    Listing only (no file is read): cheap for a 50k-image folder, an over-eager rebuild after a plain copy."""
    import hashlib

    fs, p = url_to_fs(es.path)
    root = p.rstrip("/")
    if fs.isfile(p):
        found = {p: fs.info(p)}
    else:
        found = fs.find(root, detail=True, withdirs=False)
    h = hashlib.sha256(f"{es.format}\0".encode())
    for name in sorted(found):
        info = found[name]
        stamp = next((str(info[k]) for k in _STAMP_KEYS if info.get(k) is not None), "")
        rel = name[len(root) + 1:] if name.startswith(root + "/") else name.rsplit("/", 1)[-1]
        h.update(f"{rel}\0{info.get('size')}\0{stamp}\n".encode("utf-8", "surrogateescape"))
    return h.hexdigest()


def prepare_index(cfg: DedupConfig, pool: PoolInfo, sets: list[Any]) -> dict[str, Any]:
    """Build (or reuse) the evaluation index in ``<out>/index``; returns its index.json.

    Reused when index.json exists for the same evaluation sets, index settings and pHash setting; an
    index of another model is refused naming both models (its vectors cannot be compared).
    """
    return prepared_index(cfg, pool, sets).desc


@dataclasses.dataclass
class PreparedIndex:
    """What :func:`prepared_index` gives: index.json's content, the items file's bytes as built, or as read and
    checked against index.json's sha256 when reused, and the index itself when asked for and built by this call."""

    desc: dict[str, Any]
    items_bytes: bytes
    index: Any = None  # the faiss index just built (CPU), when asked for (keep_index) and built by this call


def prepared_index(cfg: DedupConfig, pool: PoolInfo, sets: list[Any], keep_index: bool = False) -> PreparedIndex:
    """:func:`prepare_index`, with the items file's bytes (read once, checked, for the caller to read the
    items from rather than the file again), and with `keep_index` the index object when this call builds it
    (a search in this process then loads nothing). A reused index file is hashed as it streams by; no copy
    of its bytes is kept (a search loads it with index.read_checked, which holds none beside the index: the
    bytes kept and deserialized were three copies at once, ~14 GB for 1.5M evaluation images). The items
    file is small beside the index (a few columns per evaluation image) and the driver reads it whole for
    the summary anyway."""
    import pyarrow.parquet as pq


    paths = DI.index_paths(cfg.output)
    want_sets = [es.to_dict() for es in sets]
    # what the sets hold now: the same name and path with other files is another index
    fingerprints = [evalset_fingerprint(es) for es in sets]
    geometry, geometry_desc = eval_geometry(pool, cfg.eval_geometry)
    # The geometry is part of what the index holds: another pool resize means other vectors and hashes.
    want_params = {"index_type": cfg.index, "nlist": cfg.nlist, "nprobe": cfg.nprobe if cfg.index == "ivf" else None,
                   "eval_geometry": geometry_desc}
    existing = DI.read_index_json(cfg.output)
    if existing is not None:
        DI.check_model(pool.model, existing["model"], pool.emb_dir, paths["json"])
        same = (
            [{k: s[k] for k in ("name", "path", "format")} for s in existing["evalsets"]] == want_sets
            and [s.get("fingerprint") for s in existing["evalsets"]] == fingerprints
            and existing["request"] == want_params
            and (existing["phash"] or not cfg.phash)
        )
        intact = same and _file_sha256(paths["index"]) == existing["index_sha256"]
        items_bytes = None
        if intact:
            fs, p = url_to_fs(paths["items"])
            items_bytes = DI.read_bytes(paths["items"]) if fs.exists(p) else None
            intact = items_bytes is not None and sha256_bytes(items_bytes) == existing["items_sha256"]
        if intact and items_bytes is not None:
            log.info("reusing the evaluation index in %s (%d vectors)", paths["index"], existing["ntotal"])
            return PreparedIndex(existing, items_bytes)
        del items_bytes
        if same:
            log.warning("%s or %s is missing or differs from %s (damaged, or a run killed while it rebuilt them): "
                        "rebuilding the index", paths["index"], paths["items"], paths["json"])
        log.info("evaluation sets or index settings changed: rebuilding %s", paths["index"])

    embedder = make_embedder(pool.emb_dir, cfg.pretrained, cfg.device, cfg.batch_size)
    device = str(getattr(embedder, "device", cfg.device))
    # The evaluation vectors must come from the pool's embedding space: compare before building.
    DI.check_model(pool.model, embedder.info, pool.emb_dir, f"the Embedder built for {cfg.output}")
    t0 = time.time()
    vectors, rows, counts = embed_evalsets(sets, embedder, cfg.batch_size, cfg.phash, geometry)
    for c, fp in zip(counts, fingerprints):
        c["fingerprint"] = fp  # as listed before embedding: a change during it makes the next run rebuild
    t_embed = time.time() - t0
    if vectors.shape[1] != DI.model_identity(pool.model)["embed_dim"]:
        raise DI.ModelMismatchError(
            f"evaluation embeddings have dim {vectors.shape[1]} but the pool embeddings {pool.emb_dir} dim {DI.model_identity(pool.model)['embed_dim']}"
        )
    t0 = time.time()
    index, params = DI.build_index(vectors, cfg.index, cfg.nlist, cfg.nprobe)
    data = DI.serialize(index)
    buf = io.BytesIO()
    pq.write_table(_items_table(rows), buf, **PARQUET_WRITE)
    items_bytes = buf.getvalue()
    atomic_write_bytes(paths["index"], data)
    atomic_write_bytes(paths["items"], items_bytes)
    import faiss

    desc = {
        "model": DI.model_identity(pool.model),
        "metric": "inner_product (cosine on L2-normalized vectors)",
        **params,
        "request": want_params,
        "ntotal": int(index.ntotal),
        "dim": int(vectors.shape[1]),
        "phash": bool(cfg.phash),
        "eval_geometry": geometry_desc,
        "evalsets": counts,
        "index_sha256": sha256_bytes(data),
        "items_sha256": sha256_bytes(items_bytes),
        "faiss_version": faiss.__version__,
        "embed_seconds": round(t_embed, 3),
        "build_seconds": round(time.time() - t0, 3),
        "embedder_device": device,
    }
    write_json(paths["json"], desc)  # written last: its presence means the index is complete
    log.info("evaluation index: %d vectors of dim %d (%s) in %s", index.ntotal, vectors.shape[1], params["index_type"], paths["index"])
    return PreparedIndex(desc, items_bytes, index if keep_index else None)


# ---------------------------------------------------------------------------------------------
# the search (Spark tasks, or threads in this process)


def _settings_key(index_desc: dict[str, Any], cfg: DedupConfig) -> str:
    from laiontools.core.storage import canonical_json

    return sha256_bytes(canonical_json({
        "index": index_desc["index_sha256"], "items": index_desc["items_sha256"], "threshold": cfg.threshold,
        "k": cfg.k, "phash": cfg.phash, "phash_d": cfg.phash_max_distance, "v": 3,  # 2: pHash keys as embed stores them; 3: per-set counts beyond k and every pHash in reach
    }))[:16]


def _report_path(out: str, sid: str) -> str:
    return join(out, layout.DEDUP_REPORT_DIR, f"{sid}.parquet")


def _done_path(out: str, sid: str) -> str:
    """What a shard's marker is keyed on; kept out of report/ so `pd.read_parquet(report/)` reads only data."""
    return join(out, layout.DEDUP_DONE_DIR, sid)


def _pool_phashes(tar_url: str) -> dict[str, str]:
    """key -> pHash of every image in a pool tar (unreadable images are left out and logged). A tar
    that cannot be read raises ``tarfile.TarError``.

    Keys are as embed stores them in meta (:func:`laiontools.wds.samples.meta_key`: a member
    ``sub/0000007.jpg`` is key ``0000007``), so the search finds them. Two samples whose keys differ
    only in their folder are left out (logged): a pHash could not be told apart between them."""
    from laiontools.core.images import error_text, open_image, to_rgb
    from laiontools.core.logs import RateLimitedLogger
    from laiontools.wds.samples import POOL_IMAGE_EXTS, iter_samples, meta_key

    rl = RateLimitedLogger(log)
    out: dict[str, str] = {}
    full: dict[str, str] = {}  # meta key -> the webdataset key it came from
    ambiguous: set[str] = set()
    fs, p = url_to_fs(tar_url)
    with fs.open(p, "rb") as raw:
        # One sample's image members in memory at a time (webdataset's adjacent grouping).
        for wkey, parts in iter_samples(raw, fs.size(p), suffixes=POOL_IMAGE_EXTS, on_duplicate="last"):
            key = meta_key(wkey)
            if full.setdefault(key, wkey) != wkey:
                ambiguous.add(key)
            for ext, data in parts.items():
                try:
                    im = open_image(data)
                    im.load()
                    out[key] = _phash_image(to_rgb(im))
                except Exception as e:  # noqa: BLE001 - a decoder's failure: counted, no pHash for the sample
                    rl.warn("pool_phash", "%s: %s.%s unreadable for pHash: %s", tar_url, wkey, ext, error_text(e))
    for key in ambiguous:
        rl.warn("pool_phash_key", "%s: key %s names samples in two folders; no pHash for it", tar_url, key)
        out.pop(key, None)
    return out


@dataclasses.dataclass
class _Lookups:
    """Per-process tables from items.parquet: index row -> set/item, set codes, pHash -> item positions."""

    row_set: np.ndarray  # object array, index row -> evalset name
    row_item: np.ndarray  # object array, index row -> item id
    row_code: np.ndarray  # int32, index row -> position of its set in ctx["evalset_names"]
    set_arr: Any  # the same two as arrow arrays, for vectorized takes
    item_arr: Any
    pos_set: list[str]  # items.parquet position -> evalset name
    pos_item: list[str]
    phash: dict[str, list[int]]  # pHash -> items.parquet positions
    phash_index: Any = None  # faiss binary index over the pHashes, built when a Hamming distance is asked for
    phash_keys: list[str] | None = None


_SEARCH_LOCK = threading.Lock()  # in process with a GPU index: one search at a time
_LOOKUPS: dict[str, _Lookups] = {}
_LOOKUPS_LOCK = threading.Lock()  # in process, search tasks are threads: the lookups are built once


def _lookups(items_path: str, sha: str, set_names: list[str], data: bytes | None = None) -> _Lookups:
    """The lookups of the items file at `items_path` (checked against `sha`), built once per process.
    `data`: the file's bytes, already read and checked against `sha` by the caller (then the file is not
    read again)."""
    with _LOOKUPS_LOCK:
        hit = _LOOKUPS.get(sha)
        if hit is None:
            if data is None:
                data = DI.read_bytes(items_path)
                if sha256_bytes(data) != sha:
                    raise UserError(f"{items_path} changed since the job started (sha256 mismatch); re-run dedup")
            built = _build_lookups(data, set_names)
            _LOOKUPS.clear()  # one set per process: a new job's replaces the last
            hit = _LOOKUPS[sha] = built
        return hit


def _items_table_of(data: bytes, columns: list[str] | None = None) -> Any:
    """The items file's table from its bytes (read and checked once, by the caller)."""
    import pyarrow.parquet as pq

    return pq.read_table(io.BytesIO(data), columns=columns, **PARQUET_READ)


def _build_lookups(data: bytes, set_names: list[str]) -> _Lookups:
    t = _items_table_of(data, ["row", "evalset", "item_id", "phash"])
    rows = t.column("row").to_numpy()
    pos_set, pos_item, ph = (t.column(c).to_pylist() for c in ("evalset", "item_id", "phash"))
    readable = np.flatnonzero(rows >= 0)
    order = readable[np.argsort(rows[readable])]
    row_set = np.asarray(pos_set, dtype=object)[order]
    row_item = np.asarray(pos_item, dtype=object)[order]
    code = {n: i for i, n in enumerate(set_names)}
    row_code = np.fromiter((code[x] for x in row_set), dtype=np.int32, count=len(row_set))
    phash: dict[str, list[int]] = {}
    for pos, h in enumerate(ph):
        if h:
            phash.setdefault(h, []).append(pos)
    import pyarrow as pa

    return _Lookups(row_set, row_item, row_code, pa.array(row_set, pa.string()), pa.array(row_item, pa.string()),
                    pos_set, pos_item, phash)


def search_shard(ctx: dict[str, Any], sid: str, tar_url: str | None = None) -> dict[str, Any]:
    """Search one pool shard, write its report parquet then its marker; return the shard's statistics.

    Module-level and driven by the small picklable `ctx`, so Spark can ship it. The index is taken
    from the per-process cache (:func:`laiontools.index.load_cached`).
    """
    import faiss
    import pyarrow as pa
    import pyarrow.compute as pc
    import pyarrow.parquet as pq


    out_path = _report_path(ctx["output"], sid)
    done_path = _done_path(ctx["output"], sid)
    marker = read_marker(done_path)
    # done for these settings AND these embeddings: a shard embedded again since (a takedown's rewritten
    # shard, another pool's embeddings in the same --embeddings folder) is searched again
    emb_marker = shard_marker(ctx["emb_dir"], sid)  # read once: the identity and the checked hashes are one embed run's
    emb_id = shard_identity(ctx["emb_dir"], sid, emb_marker)
    if (marker is not None and marker.get("settings_key") == ctx["settings_key"] and marker.get("embedding") == emb_id
            and marker.get("gallery_pairs", -1) >= ctx["gallery_pairs"]):
        return marker
    t_start = time.time()
    if ctx.get("threads", 0) > 0:
        faiss.omp_set_num_threads(ctx["threads"])
    index = DI.load_cached(ctx["index_path"], ctx["index_sha256"], ctx["gpu"])
    set_names: list[str] = ctx["evalset_names"]
    lk = _lookups(ctx["items_path"], ctx["items_sha256"], set_names)
    row_set, row_item, codes = lk.row_set, lk.row_item, lk.row_code
    emb, meta = read_embedding_shard(ctx["emb_dir"], sid, emb_marker)
    n, d = emb.shape
    if d != ctx["dim"]:
        raise DI.ModelMismatchError(f"embedding shard {sid} has dim {d} but the evaluation index has dim {ctx['dim']} ({ctx['model_desc']})")
    ntotal = int(index.ntotal)
    k = min(ctx["k"], ntotal)
    # for samples with more than k evaluation rows at or above the threshold (searched deeper, up to DEEP_K
    # neighbours: a GPU index answers at most 2048, and a low --threshold must not make every sample a
    # search of the whole index): O(shard rows x sets + evaluation rows) of memory, whatever the threshold
    deep_sets = np.zeros((n, len(ctx["evalset_names"])), dtype=bool)  # sample -> sets it duplicates, beyond k
    deep_rows = np.zeros(ntotal, dtype=bool)  # evaluation rows duplicated, found beyond k
    deep_cap = min(DEEP_K, ntotal)
    thr = float(ctx["threshold"])
    cut = float32_cutoff(thr)  # every comparison below: float32 similarities against it
    sims = np.full((n, k), np.nan, dtype=np.float32)
    ids = np.full((n, k), -1, dtype=np.int64)
    valid = np.ones(n, dtype=bool)
    status_col = next((c for c in ("embed_status", "status") if c in meta.column_names), None)
    if status_col is not None:
        st = meta.column(status_col)
        ok_status = pc.fill_null(pc.is_in(st, value_set=pa.array(["ok", "success"])), True)
        valid &= ok_status.to_numpy(zero_copy_only=False) | pc.is_null(st).to_numpy(zero_copy_only=False)
    for lo in range(0, n, ctx["chunk_rows"]):
        hi = min(n, lo + ctx["chunk_rows"])
        x = np.ascontiguousarray(emb[lo:hi], dtype=np.float32)
        # Zero or non-finite rows are samples embed could not process: never call them duplicates.
        ok = np.isfinite(x).all(axis=1) & (np.einsum("ij,ij->i", x, x) > 0.25)
        valid[lo:hi] &= ok
        x[~ok] = 0
        with _SEARCH_LOCK if ctx.get("serialize_search") else contextlib.nullcontext():
            D, I = index.search(x, k)
        sims[lo:hi], ids[lo:hi] = D, I
        # A sample whose k-th neighbour is still at or above the threshold may duplicate more evaluation
        # items than k (an image held twice by a set, or by two sets): searched deeper, so that every
        # item and set it duplicates is counted (the report's top-k columns keep k).
        deep = np.flatnonzero(valid[lo:hi] & (I[:, -1] >= 0) & (D[:, -1] >= cut))
        if len(deep) and k < ntotal:
            _search_deeper(index, x, deep, lo, k, cut, deep_cap, deep_sets, deep_rows, codes, ctx, sid)
    sims[~valid] = np.nan
    ids[~valid] = -1
    hit = (ids >= 0) & (sims >= cut)
    is_dup = hit.any(axis=1)
    nearest = np.where(valid, ids[:, 0], -1)
    top_sim = sims[:, 0] if k else np.full(n, np.nan, np.float32)

    # Columns built with vectorized arrow takes: a Python loop per row would cost more than the search.
    def take(table: Any, rows: np.ndarray) -> Any:
        return pc.take(table, pa.array(rows, pa.int64(), mask=rows < 0))

    flat = ids[ids >= 0]
    offsets = pa.array(np.concatenate([[0], np.cumsum((ids >= 0).sum(axis=1))]).astype(np.int32))
    uid_col = meta.column("uid").combine_chunks()
    key_col = meta.column("key").combine_chunks() if "key" in meta.column_names else pa.nulls(n, pa.string())
    cols: dict[str, Any] = {
        "uid": uid_col.cast(pa.string()),
        "key": key_col.cast(pa.string()),
        "shard": pa.array(np.full(n, sid, dtype=object), pa.string()),
        "status": pc.if_else(pa.array(valid), STATUS_OK, STATUS_NOT_EMBEDDED),
        "nearest_evalset": take(lk.set_arr, nearest),
        "nearest_item_id": take(lk.item_arr, nearest),
        "similarity": pa.array(top_sim, pa.float32(), mask=~valid),
        "is_duplicate": pa.array(is_dup, pa.bool_()),
        "topk_evalset": pa.ListArray.from_arrays(offsets, pc.take(lk.set_arr, pa.array(flat))),
        "topk_item_id": pa.ListArray.from_arrays(offsets, pc.take(lk.item_arr, pa.array(flat))),
        "topk_similarity": pa.ListArray.from_arrays(offsets, pa.array(sims[ids >= 0], pa.float32())),
    }
    dup_idx = np.flatnonzero(is_dup)
    g = ctx["gallery_pairs"]
    stats: dict[str, Any] = {
        "settings_key": ctx["settings_key"], "embedding": emb_id, "shard": sid, "rows": int(n), "gallery_pairs": g,
        "not_embedded": int((~valid).sum()),
        "duplicates": int(is_dup.sum()),
        "matched_by_set": {name: int(((hit & (codes[np.maximum(ids, 0)] == j)).any(axis=1) | deep_sets[:, j]).sum())
                           for j, name in enumerate(set_names)},
        "matched_rows": np.union1d(ids[hit], np.flatnonzero(deep_rows)).astype(int).tolist(),
        "dup_uids": uid_col.take(pa.array(dup_idx, pa.int64())).to_pylist(),
    }
    # Gallery candidates: the best duplicates and the closest pairs under the threshold.
    score = np.where(valid, top_sim, -np.inf)
    above = np.flatnonzero(valid & (score >= cut))
    below = np.flatnonzero(valid & (score < cut))
    above = above[np.argsort(-score[above], kind="stable")][:g]
    below = below[np.argsort(-score[below], kind="stable")][:g]
    stats["gallery"] = {
        name: [{"similarity": float(top_sim[i]), "uid": uid_col[int(i)].as_py(), "key": key_col[int(i)].as_py(), "shard": sid,
                "evalset": row_set[nearest[i]], "item_id": row_item[nearest[i]]} for i in sel]
        for name, sel in (("above", above), ("below", below))
    }
    if ctx["phash"]:
        tar = tar_url
        pool_ph = _pool_phashes(tar) if tar else {}
        keys = key_col.to_pylist()
        uids = uid_col.to_pylist()
        item_set, item_id = lk.pos_set, lk.pos_item
        ph_set: list[str | None] = []
        ph_item: list[str | None] = []
        ph_by_set = dict.fromkeys(set_names, 0)
        ph_pos: set[int] = set()
        # A row without a uid (embed recorded it failed: its .json was unreadable) cannot be excluded by
        # uid: it is left out of the pHash pass and counted.
        no_uid = [u is None for u in uids]
        ph_list = [None if nu else pool_ph.get(key) for key, nu in zip(keys, no_uid)]
        for pos in _phash_matches(lk, ph_list, int(ctx.get("phash_max_distance", 0))):
            ph_set.append(item_set[pos[0]] if pos else None)
            ph_item.append(item_id[pos[0]] if pos else None)
            for s in {item_set[q] for q in pos}:
                ph_by_set[s] += 1
            ph_pos.update(pos)
        cols["phash"] = pa.array(ph_list, pa.string())
        cols["phash_evalset"] = pa.array(ph_set, pa.string())
        cols["phash_item_id"] = pa.array(ph_item, pa.string())
        ph_match = np.array([s is not None for s in ph_set], dtype=bool)
        stats["phash_missing_images"] = int(sum(1 for kk, nu in zip(keys, no_uid) if kk not in pool_ph and not nu)) if tar else n
        stats["phash_no_uid_rows"] = int(sum(no_uid))
        stats["phash_matched_by_set"] = ph_by_set
        stats["phash_matched_pos"] = sorted(ph_pos)
        stats["phash_only_uids"] = [uids[i] for i in np.flatnonzero(ph_match & ~is_dup)]
        stats["phash_matches"] = int(ph_match.sum())
    stats["peak_rss_mb"] = peak_rss_mb()
    stats["search_seconds"] = round(time.time() - t_start, 4)
    table = pa.table(cols).replace_schema_metadata({
        "laiontools.dedup.threshold": str(thr), "laiontools.dedup.model": ctx["model_desc"],
        "laiontools.dedup.index_type": ctx["index_type"], "laiontools.dedup.index_sha256": ctx["index_sha256"],
    })
    buf = io.BytesIO()
    pq.write_table(table, buf, **{**PARQUET_WRITE, "compression": ctx.get("parquet_codec", PARQUET_CODEC)})
    atomic_write_bytes(out_path, buf.getvalue())
    mark_done(done_path, stats)  # last: the shard counts as done only now
    failpoints.pause("dedup.shard")  # fault tests: a shard searched (marker written), others maybe not yet
    return stats


# The most evaluation neighbours a pool sample's per-set counts look at (faiss's GPU k limit): a sample
# that duplicates more evaluation items than this is counted for its DEEP_K nearest, with a warning.
DEEP_K = DI.GPU_MAX_K


def _search_deeper(index: Any, x: np.ndarray, rows: np.ndarray, lo: int, k: int, thr: np.float32, cap: int,
                   deep_sets: np.ndarray, deep_rows: np.ndarray, codes: np.ndarray, ctx: dict[str, Any], sid: str) -> None:
    """Every evaluation row at or above `thr` for the chunk rows `rows` of `x` (whose k nearest all are):
    k grows fourfold until the last neighbour is under the threshold, in batches of at most 4M results;
    the sets each sample duplicates go to `deep_sets` (row ``lo + r``), the evaluation rows to `deep_rows`."""
    ntotal = int(index.ntotal)
    kk = k
    while len(rows) and kk < min(ntotal, cap):
        kk = min(4 * kk, ntotal, cap)
        step = max(1, (1 << 22) // kk)
        left = []
        for b in range(0, len(rows), step):
            r = rows[b:b + step]
            with _SEARCH_LOCK if ctx.get("serialize_search") else contextlib.nullcontext():
                D, I = index.search(np.ascontiguousarray(x[r]), kk)
            m = (I >= 0) & (D >= thr)
            deep_rows[I[m]] = True
            for j in range(deep_sets.shape[1]):
                deep_sets[lo + r, j] |= (m & (codes[np.maximum(I, 0)] == j)).any(axis=1)
            left.append(r[m[:, -1]])
        rows = np.concatenate(left)
    if len(rows) and kk < ntotal:
        log.warning("shard %s: %d sample(s) duplicate more than %d evaluation items; the per-set counts hold "
                    "their %d nearest", sid, len(rows), kk, kk)


def _phash_matches(lk: _Lookups, hashes: list[str | None], max_distance: int) -> list[list[int]]:
    """items.parquet positions each pool hash matches: exact lookup, or every evaluation hash within
    `max_distance` bits (faiss binary range search, Hamming distance), nearest first."""
    if max_distance == 0:
        return [lk.phash.get(h, []) if h else [] for h in hashes]
    import faiss

    out: list[list[int]] = [[] for _ in hashes]
    have = [i for i, h in enumerate(hashes) if h]
    if not have or not lk.phash:
        return out
    with _LOOKUPS_LOCK:  # built once, whole, before any thread's search uses it
        if lk.phash_index is None:
            keys = list(lk.phash)
            index = faiss.IndexBinaryFlat(64)
            index.add(np.frombuffer(b"".join(bytes.fromhex(k) for k in keys), dtype=np.uint8).reshape(-1, 8))
            lk.phash_keys, lk.phash_index = keys, index
    q = np.frombuffer(b"".join(bytes.fromhex(hashes[i]) for i in have), dtype=np.uint8).reshape(-1, 8)
    lims, D, I = lk.phash_index.range_search(q, max_distance + 1)  # distances < radius
    for j, i in enumerate(have):
        a, b = int(lims[j]), int(lims[j + 1])
        order = np.lexsort((I[a:b], D[a:b]))  # nearest first, then index order: the same on every run
        out[i] = [pos for t in order for pos in lk.phash[lk.phash_keys[int(I[a + t])]]]
    return out


def _search_partition(ctx: dict[str, Any], units: Iterable[tuple[str, str | None]]) -> Iterator[tuple[str, int, int]]:
    # Only (shard, rows, duplicates) travel back: the full statistics are in each shard's marker.
    from laiontools.core.errors import task_error

    for sid, tar_url in units:
        try:
            st = search_shard(ctx, sid, tar_url)
        except UserError as e:  # tagged, so that it reaches the driver from a Spark task as one line too
            raise task_error(str(e).split("\n", 1)[0]) from e
        yield sid, st["rows"], st["duplicates"]


def search_context(cfg: DedupConfig, index_desc: dict[str, Any]) -> dict[str, Any]:
    """The small, picklable settings every search task receives (paths, not data)."""

    paths = DI.index_paths(cfg.output)
    return {
        "output": cfg.output, "emb_dir": cfg.embeddings, "index_path": paths["index"], "items_path": paths["items"],
        "index_sha256": index_desc["index_sha256"], "settings_key": _settings_key(index_desc, cfg),
        "threshold": cfg.threshold, "k": cfg.k, "chunk_rows": cfg.chunk_rows,
        # a faiss GPU index answers at most GPU_MAX_K neighbours: a larger k is searched on the CPU
        "gpu": cfg.gpu and min(cfg.k, int(index_desc["ntotal"])) <= DI.GPU_MAX_K,
        "dim": index_desc["dim"], "model_desc": DI.describe_model(index_desc["model"]),
        "index_type": index_desc["index_type"], "evalset_names": [e["name"] for e in index_desc["evalsets"]],
        "items_sha256": index_desc["items_sha256"], "gallery_pairs": cfg.gallery_pairs, "phash": cfg.phash,
        "phash_max_distance": cfg.phash_max_distance,
    }


def run_search(tasks: Tasks, ctx: dict[str, Any], units: list[tuple[str, str | None]], partitions: int = 0) -> list[tuple[str, int, int]]:
    """Run the search over (shard id, pool tar URL or None) units: on Spark, all partitions in parallel; in
    process (:class:`Tasks` without a session), a few shards at once on threads (faiss and arrow release the
    interpreter lock), sharing one loaded index.

    Returns (shard, rows, duplicates) per shard, a few bytes each; the driver then folds the shard
    markers one at a time (:class:`_Aggregate`), so its memory does not grow with the pool.
    """
    return tasks.map(functools.partial(_search_partition, ctx), units, partitions,
                     f"laiontools dedup: search {len(units)} shard(s)")


def _every_shard_marked(output: str, shard_ids: list[str]) -> bool:
    """Whether each of `shard_ids` has a search marker in `output` (one listing of its done/ folder); the
    marker's settings are not read (search_shard decides whether it still holds)."""
    fs, p = url_to_fs(join(output, layout.DEDUP_DONE_DIR))
    if not fs.isdir(p):
        return not shard_ids
    names = {str(f).rstrip("/").rpartition("/")[2] for f in fs.ls(p, detail=False)}
    return all(sid + DONE_SUFFIX in names for sid in shard_ids)


def embedded_rows(pool: PoolInfo, above: int | None = None) -> int:
    """The pool's size for choosing an engine: the manifest's sample count, else the embedding shards'
    parquet footers (no vectors read), read only until the count passes `above`."""
    n = (pool.manifest or {}).get("num_samples")
    if isinstance(n, int) and n >= 0:
        return n
    total = 0
    for sid in pool.shard_ids:
        total += shard_rows(pool.emb_dir, [sid])[0]
        if above is not None and total > above:
            break
    return total


# ---------------------------------------------------------------------------------------------
# the whole stage


STAGE = "dedup"
CONFIG = DedupConfig


@stage_entry(STAGE, accepts=("dedup calibrate",))  # reuses calibrate's index
def run(cfg: DedupConfig, spark: Any = None) -> StageResult:
    """Decontaminate a pool's embeddings against evaluation sets; details = summary.json's content.

    Raises UserError subclasses for bad input: missing/empty evaluation sets, a set declared twice,
    pool shards without embeddings, embeddings of another model than an existing index.
    """
    from laiontools.evalsets import load_evalsets

    ensure_output_dir(cfg.output)
    sets = load_evalsets(cfg.evalset, cfg.evalsets_yaml)
    pool = read_pool(cfg.embeddings)
    if cfg.phash and not pool.tar_by_shard:
        raise UserError(f"--phash reads pool images from the pool tars, but {cfg.embeddings}/model.json names no pool manifest")
    size = functools.cache(lambda: embedded_rows(pool, cfg.spark_above))
    in_process = spark is None and not wants_spark(getattr(cfg, "master", None), size, cfg.spark_above)  # as stage_tasks chooses
    # a re-run whose shards are all marked searches none of them (unless a marker is stale, when the search
    # loads the file itself): no index bytes held and no index loaded for it, the file's check streamed
    keep = in_process and not _every_shard_marked(cfg.output, pool.shard_ids)
    # The index's bytes are not kept for the search here: the index just built is, or else the search loads the
    # file once (index.read_checked, about the index's size), where bytes kept and deserialized held three copies
    # at once (14 GB at 1.5M x 768); a reused index costs one more sha256 pass over its file (~3 s at that size).
    prepared = prepared_index(cfg, pool, sets, keep_index=keep)
    index_desc = prepared.desc

    write_record(join(cfg.output, layout.SETTINGS_JSON), {"stage": "dedup", **cfg.to_dict()})
    items = _read_items(prepared.items_bytes)  # the items file's bytes as built or checked: not read again
    ctx = search_context(cfg, index_desc)
    if prepared.index is not None:  # built here: the search takes it, no file read
        DI.put_cached(ctx["index_sha256"], ctx["gpu"], prepared.index)
        prepared.index = None
    if keep:  # the search runs here: the items' lookups from the bytes just built or checked
        _lookups(ctx["items_path"], ctx["items_sha256"], ctx["evalset_names"], data=prepared.items_bytes)
    del prepared
    if cfg.gpu and not ctx["gpu"] and DI.gpu_count() > 0:
        log.warning("--k %d is more neighbours than a faiss GPU index answers (%d): searching on the CPU", cfg.k, DI.GPU_MAX_K)
    units = [(sid, pool.tar_by_shard.get(sid) if cfg.phash else None) for sid in pool.shard_ids]
    t0 = time.time()
    with stage_tasks(cfg, spark, app_name="laiontools-dedup", size=size, spark_above=cfg.spark_above) as tasks:
        # a faiss GPU index is not to be searched from two threads at once: only its search is serialized
        ctx["serialize_search"] = tasks.local and ctx["gpu"] and DI.gpu_count() > 0
        ctx["threads"] = tasks.threads(cfg.search_threads, len(units))
        ctx["parquet_codec"] = tasks.parquet_codec()  # the reports': on Spark the session's, as Spark's writer's
        engine = "in-process" if tasks.local else f"spark {tasks.spark.sparkContext.master}"
        with task_errors_as(InputError):
            done = run_search(tasks, ctx, units, cfg.partitions)
    search_s = time.time() - t0
    # report/ is read as one dataset: no file of a shard an earlier run into this folder had and this pool has not
    current = set(pool.shard_ids)
    drop_stale_files(join(cfg.output, layout.DEDUP_REPORT_DIR), ".parquet", current, "a shard not in this run's pool")
    drop_stale_files(join(cfg.output, layout.DEDUP_DONE_DIR), DONE_SUFFIX, current, "a shard not in this run's pool")
    agg = _Aggregate(sets, index_desc, items, cfg)
    for (sid, _, _), stats in zip(done, read_markers([_done_path(cfg.output, sid) for sid, _, _ in done])):
        if stats is None or stats.get("settings_key") != ctx["settings_key"]:
            raise RuntimeError(f"shard {sid} reported done but its marker is missing or stale")  # a bug, not bad input
        agg.add(stats)
    # The final-write phase: every shard's marker is there, dedup.json and the summary are not (kill tests widen it).
    failpoints.pause("dedup.final-write")
    summary, text = _write_outputs(cfg, pool, sets, index_desc, items, agg, search_s, engine)
    return StageResult(
        outputs={"exclude": join(cfg.output, layout.DEDUP_EXCLUDE_UIDS), "dedup": join(cfg.output, layout.DEDUP_JSON),
                 "summary": join(cfg.output, layout.DEDUP_SUMMARY_TXT), "report": join(cfg.output, layout.DEDUP_REPORT_DIR),
                 **({"gallery": join(cfg.output, layout.DEDUP_GALLERY_HTML)} if cfg.gallery_pairs else {})},
        counts={"pool_samples": int(summary["pool_samples"]), "pool_duplicates": int(summary["pool_duplicates"]),
                "excluded": int(summary["excluded"]), "not_embedded": int(summary["not_embedded"])},
        timings={"search": float(summary["search_seconds"])}, details=summary, summary=text,
    )


FLAGGED_SHARE_WARNING = 0.5  # dedup warns when it excludes more than this share of the pool


def _read_items(data: bytes) -> dict[str, list[Any]]:
    """The items file's columns as lists, from its bytes (:attr:`PreparedIndex.items_bytes`)."""
    t = _items_table_of(data)
    return {c: t.column(c).to_pylist() for c in t.column_names}


class _Aggregate:
    """Folds per-shard statistics; memory is O(evaluation items + duplicates), not O(pool)."""

    def __init__(self, sets: list[Any], index_desc: dict[str, Any], items: dict[str, list[Any]], cfg: DedupConfig) -> None:
        self.names = [es.name for es in sets]
        self.rows = self.not_embedded = self.duplicates = self.shards = self.phash_matches = self.phash_missing = 0
        self.phash_no_uid = 0
        self.matched_by_set = dict.fromkeys(self.names, 0)
        self.phash_by_set = dict.fromkeys(self.names, 0)
        self.matched_rows = np.zeros(index_desc["ntotal"], dtype=bool)
        self.phash_pos = np.zeros(len(items["row"]), dtype=bool)
        self.peak_rss_mb = 0.0
        # per shard, as UID_DTYPE arrays: 16 B a uid held, 65 B at the peak of the final sort, against 153 B
        # for the list of strings, its set and its sorted copy (measured; 1% of a 2B pool is 20M duplicates)
        self.dup_uids: list[np.ndarray] = []
        self.phash_only_uids: list[np.ndarray] = []
        self.g = cfg.gallery_pairs
        self.above: list[tuple] = []  # min-heaps of (similarity, tiebreak, pair)
        self.below: list[tuple] = []

    def add(self, s: dict[str, Any]) -> None:
        self.shards += 1
        self.rows += s["rows"]
        self.not_embedded += s["not_embedded"]
        self.duplicates += s["duplicates"]
        for k, v in s["matched_by_set"].items():
            self.matched_by_set[k] += v
        self.matched_rows[np.asarray(s["matched_rows"], dtype=np.int64)] = True
        self.dup_uids.append(uids_to_array(s["dup_uids"]))
        self.peak_rss_mb = max(self.peak_rss_mb, float(s.get("peak_rss_mb", 0.0)))
        if "phash_matches" in s:
            self.phash_matches += s["phash_matches"]
            self.phash_missing += s["phash_missing_images"]
            self.phash_no_uid += s.get("phash_no_uid_rows", 0)
            for k, v in s["phash_matched_by_set"].items():
                self.phash_by_set[k] += v
            self.phash_pos[np.asarray(s["phash_matched_pos"], dtype=np.int64)] = True
            self.phash_only_uids.append(uids_to_array(s["phash_only_uids"]))
        for name, heap in (("above", self.above), ("below", self.below)):
            for pair in s["gallery"][name]:
                entry = (pair["similarity"], pair["uid"], pair)
                if len(heap) < self.g:
                    heapq.heappush(heap, entry)
                elif self.g and entry[:2] > heap[0][:2]:
                    heapq.heapreplace(heap, entry)


def _write_outputs(
    cfg: DedupConfig, pool: PoolInfo, sets: list[Any], index_desc: dict[str, Any], items: dict[str, list[Any]],
    agg: _Aggregate, search_s: float, engine: str,
) -> tuple[dict[str, Any], str]:
    """Write summary, exclusion uids, dedup.json and gallery; return (summary.json's content, summary text)."""
    from laiontools.contracts.uids import empty_uids, save_uids, sort_unique
    from laiontools.core.report import table

    row_set = {}  # index row -> set name, for eval items matched
    for r, s in zip(items["row"], items["evalset"]):
        if r >= 0:
            row_set[r] = s
    matched_items_by_set = dict.fromkeys(agg.names, 0)
    for r in np.flatnonzero(agg.matched_rows):
        matched_items_by_set[row_set[int(r)]] += 1
    phash_items_by_set = dict.fromkeys(agg.names, 0)
    for pos in np.flatnonzero(agg.phash_pos):
        phash_items_by_set[items["evalset"][pos]] += 1
    model_desc = DI.describe_model(index_desc["model"])
    per_set = []
    for c in index_desc["evalsets"]:
        name = c["name"]
        entry = {
            "evalset": name, "path": c["path"], "format": c["format"], "items": c["items"], "unreadable_items": c["unreadable"],
            "unreadable_ids": c["unreadable_ids"], "indexed_items": c["indexed"],
            "pool_samples_matched": agg.matched_by_set[name],
            "eval_items_matched": matched_items_by_set[name],
            # The study's overlap figure: share of the evaluation set with a duplicate in the pool.
            "overlap_percent": round(100.0 * matched_items_by_set[name] / max(1, c["indexed"]), 4),
            "pool_percent": round(100.0 * agg.matched_by_set[name] / max(1, agg.rows), 6),
            "threshold": cfg.threshold, "model": model_desc, "index_type": index_desc["index_type"],
        }
        if cfg.phash:
            entry["phash_pool_samples_matched"] = agg.phash_by_set[name]
            entry["phash_eval_items_matched"] = phash_items_by_set[name]
            entry["phash_overlap_percent"] = round(100.0 * phash_items_by_set[name] / max(1, c["indexed"]), 4)
            entry["phash_max_distance"] = cfg.phash_max_distance
        per_set.append(entry)

    sha, n_ex = save_uids(join(cfg.output, layout.DEDUP_EXCLUDE_UIDS), np.concatenate([empty_uids(), *agg.dup_uids, *agg.phash_only_uids]))
    phash_only = len(sort_unique(np.concatenate([empty_uids(), *agg.phash_only_uids])))
    summary = {
        "threshold": cfg.threshold, "k": cfg.k, "model": model_desc, "model_identity": index_desc["model"],
        "index_type": index_desc["index_type"], "nlist": index_desc.get("nlist"), "nprobe": index_desc.get("nprobe"),
        "eval_geometry": index_desc.get("eval_geometry"), "pool_samples": agg.rows, "pool_shards": agg.shards, "not_embedded": agg.not_embedded,
        "pool_duplicates": agg.duplicates, "excluded": n_ex, "phash": cfg.phash, "evalsets": per_set,
        "search_seconds": round(search_s, 3), "search_engine": engine, "worker_peak_rss_mb": agg.peak_rss_mb,
    }
    # Copies of evaluation sets are a small share of any pool (a few per thousand in LAION): most of it
    # flagged means a threshold too loose for this model (a random-init one makes everything similar).
    warnings = []
    if agg.rows and n_ex > FLAGGED_SHARE_WARNING * agg.rows:
        warnings.append(f"warning: {n_ex} of {agg.rows} pool samples ({100 * n_ex / agg.rows:.0f}%) are excluded: threshold "
                        f"{cfg.threshold} is too loose for this model, which finds the pool, not copies of the evaluation "
                        "sets; choose one with `laiontools dedup calibrate`")
    summary["warnings"] = warnings
    if cfg.phash:
        summary.update({"phash_pool_matches": agg.phash_matches, "phash_only_matches": phash_only,
                        "phash_unreadable_pool_images": agg.phash_missing, "phash_skipped_rows_without_uid": agg.phash_no_uid})
    write_json(join(cfg.output, layout.DEDUP_SUMMARY_JSON), summary)
    cols = ["evalset", "items", "unreadable_items", "pool_samples_matched", "eval_items_matched", "overlap_percent"]
    if cfg.phash:
        cols += ["phash_pool_samples_matched", "phash_eval_items_matched", "phash_overlap_percent"]
    txt = (
        f"dedup of {agg.rows} pool samples ({agg.shards} shards) against {len(sets)} evaluation set(s)\n"
        f"model {model_desc}, index {index_desc['index_type']}, threshold {cfg.threshold} (cosine), k {cfg.k}\n"
        f"duplicates: {agg.duplicates} pool samples; excluded uids: {n_ex}"
        + (f" (incl. {phash_only} pHash-only)" if cfg.phash else "")
        + (f"; {agg.not_embedded} pool samples had no embedding" if agg.not_embedded else "")
        + (f"; {agg.phash_no_uid} pool samples without a uid were not pHash-checked" if cfg.phash and agg.phash_no_uid else "")
        + "".join(f"\n{w}" for w in warnings)
        + "\n\n" + table(per_set, cols) + "\n"
    )
    atomic_write_bytes(join(cfg.output, layout.DEDUP_SUMMARY_TXT), txt.encode())
    write_record(join(cfg.output, layout.DEDUP_JSON), {
        "kind": "dedup", "threshold": cfg.threshold, "k": cfg.k, "model": index_desc["model"],
        "index_type": index_desc["index_type"], "index_sha256": index_desc["index_sha256"],
        "pool": {"manifest": pool.manifest_path, "fingerprint": pool.fingerprint, "embeddings": pool.emb_dir,
                 "name": (pool.manifest or {}).get("name")},
        "evalsets": [es.to_dict() for es in sets],
        "exclude": {"path": layout.DEDUP_EXCLUDE_UIDS, "sha256": sha, "count": n_ex,
                    "rule": "similarity >= threshold" + (" or pHash exact match" if cfg.phash else "")},
        "summary": layout.DEDUP_SUMMARY_JSON, "report": layout.DEDUP_REPORT_DIR,
    })
    gallery = join(cfg.output, layout.DEDUP_GALLERY_HTML)
    if cfg.gallery_pairs:
        from laiontools.stages.dedup_gallery import write_gallery

        write_gallery(gallery, pool, sets, cfg.threshold, model_desc,
                      sorted(agg.above, reverse=True), sorted(agg.below, reverse=True))
    else:
        # --gallery-pairs 0 into an earlier run's output: its gallery shows another threshold's pairs
        fs, gp = url_to_fs(gallery)
        if fs.exists(gp):
            rm_path(fs, gp)
    return summary, txt + f"outputs in {cfg.output}: {layout.DEDUP_SUMMARY_TXT}, {layout.DEDUP_EXCLUDE_UIDS}, {layout.DEDUP_REPORT_DIR}/" + (
        f", {layout.DEDUP_GALLERY_HTML}" if cfg.gallery_pairs else "")


# ---------------------------------------------------------------------------------------------
# CLI


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="laiontools dedup",
        description="Find pool samples that are near-duplicates of evaluation images. "
        "`laiontools dedup calibrate --help` measures which threshold fits your model.",
    )
    add_config_args(p, DedupConfig, skip=("evalset",))
    p.add_argument("--evalset", dest="evalset", action="extend", nargs="+", default=argparse.SUPPRESS,
                   help="name=path[:format] (imagefolder, folder, wds, parquet); repeatable")
    return p


def main(argv: list[str] | None = None) -> int:
    from laiontools.core.stage import stage_main

    return stage_main(__name__, argv)
