"""File layout of every stage's output folder: the names other stages read. Change them only here.

Pool (download output)::

    <pool>/pool.manifest.json        manifest (kind=pool), shard list = complete shards only
    <pool>/pool.uids.npy             sorted u8,u8 uids of successful samples
    <pool>/catalog/part-*.parquet    catalog: one row per prepared input row (schemas/catalog.schema.json)
    <pool>/shards/<shard>.tar        webdataset: <key>.jpg, <key>.txt, <key>.json (json holds uid + source columns)
    <pool>/shards/<shard>.parquet    img2dataset per-shard metadata, <shard>_stats.json its completion marker
    <pool>/report.json|report.txt    download report;  <pool>/settings.json  effective settings

Embeddings (embed output), per pool shard id (see :func:`shard_id`)::

    <emb>/img_emb/<id>.npy  <emb>/text_emb/<id>.npy   float16, L2-normalized, row-aligned with meta
    <emb>/meta/<id>.parquet                            uid, key, clip_score, embed_status, embed_error
    <emb>/model.json                                   model name, pretrained/checkpoint sha256, dim, preprocessing
    <emb>/scores/<id>.parquet                          uid -> clip_score (what subset filters read)
"""

from __future__ import annotations

POOL_MANIFEST = "pool.manifest.json"
POOL_UIDS = "pool.uids.npy"
CATALOG_DIR = "catalog"
SHARDS_DIR = "shards"
PREPARED_DIR = "prepared"
REPORT_JSON = "report.json"
REPORT_TXT = "report.txt"
SETTINGS_JSON = "settings.json"

EMB_IMG_DIR = "img_emb"
EMB_TEXT_DIR = "text_emb"
EMB_META_DIR = "meta"
EMB_SCORES_DIR = "scores"
EMB_MODEL_JSON = "model.json"


def shard_id(shard_path: str) -> str:
    """Stable id of a pool shard from its manifest path: 'shards/retry01/00003.tar' -> 'retry01-00003'."""
    p = shard_path
    if p.startswith(SHARDS_DIR + "/"):
        p = p[len(SHARDS_DIR) + 1 :]
    p = p.removesuffix(".tar")
    return p.replace("/", "-")
