"""Reading an embeddings folder (what `laiontools embed` writes; names in :mod:`laiontools.contracts.layout`).

The stages that consume embeddings (dedup, dedup calibrate, subsets' score filter) read them through
this module, never through the embed stage: the folder's model.json (:func:`load_model_json`), which
shards are complete (:func:`done_shards`), the row-aligned arrays (:func:`read_embeddings`), and
whether two folders share one embedding space (:func:`check_compatible`).
"""

from __future__ import annotations

import io
import os
from collections.abc import Iterator
from typing import Any

import numpy as np

from laiontools.contracts import layout
from laiontools.core.errors import UserError
from laiontools.core.storage import join, read_json, url_to_fs

STATUS_OK = "ok"
STATUS_FAILED_DECODE = "failed_decode"
META_COLUMNS = ("uid", "key", "clip_score", "embed_status", "embed_error")
SCORE_COLUMNS = ("uid", "clip_score")
# Fields that define an embedding space: two folders are compatible only if all of them match.
IDENTITY_FIELDS = ("model", "pretrained", "checkpoint_sha256", "random_init_seed", "embed_dim")


class EmbedMismatchError(UserError, ValueError):
    """The output folder holds embeddings of another model, dimension or pool."""


def check_compatible(existing: dict[str, Any], new: dict[str, Any], where: str) -> None:
    """Raise EmbedMismatchError naming both models if `existing` and `new` are different embedding spaces."""
    from laiontools.models.registry import model_signature

    diff = [f for f in IDENTITY_FIELDS if existing.get(f) != new.get(f)]
    if diff:
        raise EmbedMismatchError(
            f"{where} holds embeddings of {model_signature(existing)}, not {model_signature(new)} "
            f"(differs in {diff}); use another --output folder, or delete that one to re-embed"
        )


def load_model_json(emb_dir: str) -> dict[str, Any]:
    """The model.json of an embeddings folder; raise UserError if the folder has none."""
    path = join(emb_dir, layout.EMB_MODEL_JSON)
    fs, p = url_to_fs(path)
    if not fs.exists(p):
        raise UserError(f"{path} does not exist: {emb_dir} is not an embeddings folder written by `laiontools embed`")
    return read_json(path)


def done_shards(emb_dir: str) -> list[str]:
    """Ids of the shards whose completion marker exists, sorted."""
    fs, p = url_to_fs(join(emb_dir, layout.EMB_META_DIR))
    if not fs.exists(p):
        return []
    suffix = ".parquet.done"
    return sorted(os.path.basename(f)[: -len(suffix)] for f in fs.ls(p, detail=False) if f.endswith(suffix))


def read_embeddings(
    emb_dir: str, dtype: Any = np.float32
) -> Iterator[tuple[str, np.ndarray, np.ndarray, Any]]:
    """Yield (shard id, img_emb, text_emb, meta DataFrame) for every finished shard, in id order.

    Embeddings are stored float16; they come back as `dtype` (float32 by default, what faiss takes).
    Rows are aligned across the three; rows with ``embed_status != 'ok'`` have zero image vectors.
    Raises UserError if a shard's files disagree in length (a corrupted folder).
    """
    import pandas as pd

    for sid in done_shards(emb_dir):
        img = load_npy(join(emb_dir, layout.EMB_IMG_DIR, sid + ".npy"))
        txt = load_npy(join(emb_dir, layout.EMB_TEXT_DIR, sid + ".npy"))
        fs, p = url_to_fs(join(emb_dir, layout.EMB_META_DIR, sid + ".parquet"))
        with fs.open(p, "rb") as f:
            meta = pd.read_parquet(f)
        if not (len(img) == len(txt) == len(meta)):
            raise UserError(
                f"{emb_dir}: shard {sid} is not row-aligned (img {len(img)}, text {len(txt)}, meta {len(meta)} rows); "
                f"delete meta/{sid}.parquet.done and re-run embed to rebuild it"
            )
        yield sid, img.astype(dtype, copy=False), txt.astype(dtype, copy=False), meta


def load_npy(path: str) -> np.ndarray:
    """A .npy file at any fsspec path (read whole, never unpickled)."""
    fs, p = url_to_fs(path)
    with fs.open(p, "rb") as f:
        return np.load(io.BytesIO(f.read()), allow_pickle=False)
