"""The faiss index over evaluation-set embeddings, saved with the model that made it.

Files in ``<dedup out>/index/``::

    evalsets.faiss   faiss.write_index of the CPU index (inner product on L2-normalized float32 = cosine)
    items.parquet    one row per evaluation item: row (index row, -1 if unreadable), evalset, item_id,
                     label, caption, error, phash; index row i is the i-th readable item
    index.json       model description (model, pretrained, checkpoint_sha256, dim), index type, nlist,
                     nprobe, ntotal, evaluation sets with item counts, sha256 of the two files above

Pool embeddings are searched only against an index of the same embedding space: :func:`check_model`
refuses anything else, naming both.
"""

from __future__ import annotations

import logging
import math
import threading
from typing import Any

import numpy as np

from laiontools.contracts import layout
from laiontools.core.errors import UserError
from laiontools.core.storage import is_local, join, read_json, sha256_file, url_to_fs

log = logging.getLogger(__name__)

INDEX_TYPES = ("flat", "ivf")
# The fields that define an embedding space (the embed stage's IDENTITY_FIELDS).
MODEL_KEYS = ("model", "pretrained", "checkpoint_sha256", "random_init_seed", "embed_dim")


class ModelMismatchError(UserError, ValueError):
    """Pool embeddings and the evaluation index come from different models or dimensions."""


def model_identity(desc: dict[str, Any]) -> dict[str, Any]:
    """The fields that define an embedding space: model, pretrained tag / checkpoint sha256, seed, dim."""
    out = {k: desc.get(k) for k in MODEL_KEYS}
    if out["embed_dim"] is not None:
        out["embed_dim"] = int(out["embed_dim"])
    return out


def describe_model(desc: dict[str, Any]) -> str:
    ident = desc.get("pretrained") or (desc.get("checkpoint_sha256") or "random-init")[:12]
    return f"{desc.get('model')}/{ident} (dim {desc.get('embed_dim')})"


def check_model(pool_desc: dict[str, Any], index_desc: dict[str, Any], pool_where: str, index_where: str) -> None:
    """Raise ModelMismatchError, naming both, unless the two descriptions are the same embedding space."""
    a, b = model_identity(pool_desc), model_identity(index_desc)
    if a != b:
        diff = [k for k in a if a[k] != b[k]]
        raise ModelMismatchError(
            f"pool embeddings {pool_where} were made with {describe_model(a)} but the evaluation index "
            f"{index_where} with {describe_model(b)} (differs in: {', '.join(diff)}); embed both with the same "
            f"model, or give a new --output so the index is rebuilt with the pool's model"
        )


def default_nlist(n: int) -> int:
    """IVF list count: ~4*sqrt(n), at most n/39 so every list gets faiss's minimum of training points."""
    return max(1, min(int(4 * math.sqrt(n)), n // 39))


def build_index(vectors: np.ndarray, index_type: str = "flat", nlist: int | None = None, nprobe: int = 16) -> tuple[Any, dict[str, Any]]:
    """Build a CPU inner-product index over float32 L2-normalized `vectors` (n, d).

    flat: exact (IndexFlatIP). ivf: IndexIVFFlat(IP) trained on the vectors themselves, for
    reference sets too large for exact search. Returns (index, {index_type, nlist, nprobe}).
    """
    import faiss

    vectors = np.ascontiguousarray(vectors, dtype=np.float32)
    n, d = vectors.shape
    if index_type == "flat":
        index = faiss.IndexFlatIP(d)
        params: dict[str, Any] = {"index_type": "flat", "nlist": None, "nprobe": None}
    elif index_type == "ivf":
        nlist = nlist or default_nlist(n)
        if n < nlist:
            raise UserError(f"--index ivf with nlist={nlist} needs at least {nlist} evaluation vectors, got {n}; lower --nlist or use --index flat")
        quantizer = faiss.IndexFlatIP(d)
        index = faiss.IndexIVFFlat(quantizer, d, nlist, faiss.METRIC_INNER_PRODUCT)
        index.train(vectors)
        index.nprobe = min(nprobe, nlist)
        params = {"index_type": "ivf", "nlist": int(nlist), "nprobe": int(index.nprobe)}
    else:
        raise UserError(f"unknown index type {index_type!r}; known: {', '.join(INDEX_TYPES)}")
    index.add(vectors)
    return index, params


def serialize(index: Any) -> bytes:
    import faiss

    return faiss.serialize_index(index).tobytes()


# faiss GPU indexes answer at most this many neighbours per query and probe at most this many IVF lists
# (GPU_MAX_SELECTION_K); asked for more, their search raises where the CPU index's answers.
GPU_MAX_K = 2048


def deserialize(data: bytes, use_gpu: bool = True) -> Any:
    """Index from bytes; moved to all GPUs when faiss sees any (and `use_gpu`), IVF nprobe kept. An IVF
    index probing more than :data:`GPU_MAX_K` lists stays on the CPU (a GPU one could not search)."""
    import faiss

    return on_device(faiss.deserialize_index(np.frombuffer(data, dtype=np.uint8)), use_gpu)


# Bytes of an index file read (and hashed) at a time by :func:`read_checked`.
READ_CHUNK = 8 << 20


def read_checked(path: str, sha: str, use_gpu: bool = True) -> Any:
    """The index in file `path`, whose sha256 must be `sha` (UserError naming the file if not), moved as
    :func:`deserialize` moves it. Without the file's bytes held beside the index: a local file is hashed, then
    read by faiss straight into the index (peak ~1x the file); a store's is read into faiss's own reader
    buffer, hashed on the way, then the index built from it (~2x). Reading the bytes whole and deserializing
    them held three copies at once (bytes, faiss's copy of them, the index): ~14 GB in every search worker for
    a 1.5M x 768 evaluation index (BENCHMARKS "Executor memory and shuffle bytes per stage")."""
    import hashlib

    import faiss

    changed = f"{path} changed since the job started (sha256 mismatch); re-run dedup"
    fs, p = url_to_fs(path)
    if is_local(fs):
        if sha256_file(p)[0] != sha:
            raise UserError(changed)
        return on_device(faiss.read_index(p), use_gpu)
    size = int(fs.size(p))
    reader = faiss.VectorIOReader()
    reader.data.resize(size)
    h, pos = hashlib.sha256(), 0
    if size:
        view = memoryview(faiss.rev_swig_ptr(reader.data.data(), size))  # the reader's buffer, no copy
        # (no read-ahead cache: s3fs's and gcsfs's default keeps a 50 MB block, and the whole of a smaller file,
        # beside the buffer it is read into)
        with fs.open(p, "rb", block_size=READ_CHUNK, cache_type="none") as f:
            while pos < size:
                got = f.readinto(view[pos : pos + READ_CHUNK])
                if not got:
                    break
                h.update(view[pos : pos + got])
                pos += got
        del view
    if pos != size or h.hexdigest() != sha:
        raise UserError(changed)
    index = faiss.read_index(reader)
    del reader
    return on_device(index, use_gpu)


def on_device(index: Any, use_gpu: bool = True) -> Any:
    """`index` (a CPU index) moved to all GPUs when faiss sees any and `use_gpu`, IVF nprobe kept; an IVF index
    probing more than :data:`GPU_MAX_K` lists stays on the CPU (a GPU one could not search)."""
    import faiss

    if use_gpu and (getattr(index, "nprobe", 0) or 0) > GPU_MAX_K:
        log.warning("IVF nprobe %d is more than a faiss GPU index probes (%d): searching on the CPU", index.nprobe, GPU_MAX_K)
        use_gpu = False
    if use_gpu and hasattr(faiss, "get_num_gpus") and faiss.get_num_gpus() > 0:
        nprobe = getattr(index, "nprobe", None)
        index = faiss.index_cpu_to_all_gpus(index)
        if nprobe is not None:
            faiss.GpuParameterSpace().set_index_parameter(index, "nprobe", nprobe)
    return index


def gpu_count() -> int:
    import faiss

    return int(faiss.get_num_gpus()) if hasattr(faiss, "get_num_gpus") else 0


def index_paths(out_dir: str) -> dict[str, str]:
    base = join(out_dir, layout.DEDUP_INDEX_DIR)
    return {"index": join(base, layout.DEDUP_INDEX_FILE), "items": join(base, layout.DEDUP_ITEMS_FILE), "json": join(base, layout.DEDUP_INDEX_JSON)}


def read_index_json(index_dir_or_out: str) -> dict[str, Any] | None:
    """index.json of a dedup output (or of an index folder), or None if there is none."""
    for p in (join(index_dir_or_out, layout.DEDUP_INDEX_DIR, layout.DEDUP_INDEX_JSON), join(index_dir_or_out, layout.DEDUP_INDEX_JSON)):
        fs, q = url_to_fs(p)
        if fs.exists(q):
            return read_json(p)
    return None


def read_bytes(path: str) -> bytes:
    fs, p = url_to_fs(path)
    with fs.open(p, "rb") as f:
        return f.read()


# Loaded once per Python worker process (Spark reuses workers): every task of a job and every
# shard of a task share one index, keyed by the index file's sha256 and whether it was put on a GPU
# (a run with --no-gpu after one with a GPU, in one process, must not get the GPU index: its search
# is serialized only when the run asked for the GPU).
_CACHE: dict[tuple[str, bool], Any] = {}
_CACHE_LOCK = threading.Lock()


def put_cached(sha: str, use_gpu: bool, index: Any) -> Any:
    """Make `index` (a CPU index, whose file's sha256 is `sha`) the one :func:`load_cached` gives for `sha`,
    moved as :func:`deserialize` moves it: an index built in this process is searched without reading its file."""
    with _CACHE_LOCK:
        _CACHE.clear()
        hit = _CACHE[(sha, bool(use_gpu))] = on_device(index, use_gpu)
        return hit


def load_cached(index_path: str, sha: str, use_gpu: bool = True, data: bytes | None = None) -> Any:
    """The index at `index_path` (checked against `sha`), loaded once per process. `data`: the file's
    bytes, already read and checked against `sha` by the caller (then the file is not read again)."""
    key = (sha, bool(use_gpu))
    with _CACHE_LOCK:  # in process, search tasks are threads: one of them loads it, the others wait
        hit = _CACHE.get(key)
        if hit is not None:
            return hit
        _CACHE.clear()  # one index per process: a new job's index replaces the last (freed before the next loads)
        hit = _CACHE[key] = read_checked(index_path, sha, use_gpu) if data is None else deserialize(data, use_gpu=use_gpu)
        return hit
