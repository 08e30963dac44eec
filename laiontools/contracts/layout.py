"""File layout of every stage's output folder: the names other stages read. Change them only here.

Pool (download output)::

    <pool>/pool.manifest.json        manifest (kind=pool), shard list = complete shards only
    <pool>/pool.uids.npy             sorted u8,u8 uids of successful samples
    <pool>/catalog/part-*.parquet    catalog: one row per prepared input row (schemas/catalog.schema.json)
    <pool>/shards/<shard>.tar        webdataset: <key>.jpg, <key>.txt, <key>.json (json holds uid + source columns)
    <pool>/shards/<shard>.parquet    img2dataset per-shard metadata, <shard>_stats.json its completion marker
    <pool>/report.json|report.txt    download report;  <pool>/settings.json  effective settings
    <pool>/takedown.audit.jsonl      takedown: one JSON line per run, carried forward from the parent pool
    <pool>/takedown.json|takedown.txt   takedown: what this run removed (per kind, per shard, uids)

Embeddings (embed output), per pool shard id (see :func:`shard_id`)::

    <emb>/img_emb/<id>.npy  <emb>/text_emb/<id>.npy   float16, L2-normalized, row-aligned with meta
    <emb>/meta/<id>.parquet                            uid, key, clip_score, embed_status, embed_error
    <emb>/model.json                                   model name, pretrained/checkpoint sha256, dim, preprocessing
    <emb>/scores/<id>.parquet                          uid -> clip_score (what subset filters read)
    <emb>/embed_report.json                            rows, failures, timings

Dedup (dedup output; calibrate may write into the same folder)::

    <dedup>/index/evalsets.faiss|items.parquet|index.json   the evaluation-set index (index.json written last)
    <dedup>/report/<id>.parquet   <dedup>/done/<id>          per pool shard: matches, and its completion marker
    <dedup>/exclude.uids.npy      <dedup>/dedup.json         uids to exclude + what made them (subsets reads both)
    <dedup>/summary.json|summary.txt   <dedup>/gallery.html  per-set overlap table; pairs to judge by eye
    <dedup>/calibrate.json|calibrate.txt|calibrate.png|calibrate.settings.json   dedup calibrate

Subsets (subsets output), per scale label L; reshard output; train output::

    <subsets>/<L>.manifest.json  <subsets>/<L>.uids.npy         (see :func:`subset_manifest`, :func:`subset_uids`)
    <subsets>/<L>.diff.json  <subsets>/update.json|update.txt  subsets --update: what changed per scale
    <reshard>/shards/shard-00000.tar(.done)  <reshard>/shards/sizes.json  (<reshard>/uids.npy: older runs only;
        the manifest now references the subset's uid file by path + sha256)
    <reshard>/subset.manifest.json  <reshard>/reshard.json
    <train>/settings.json environment.json launches.jsonl shards.json metrics.jsonl result.json model.pt
    <train>/checkpoints/  <train>/logs/
    <study>/results.csv fits.json report.html plots/ gmacs.json plan.json fit_input.csv settings.json
    <study>/runs/<run>/train/  <study>/runs/<run>/eval.json
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
TAKEDOWN_AUDIT = "takedown.audit.jsonl"
TAKEDOWN_JSON = "takedown.json"
TAKEDOWN_TXT = "takedown.txt"
SUBSETS_UPDATE_JSON = "update.json"
SUBSETS_UPDATE_TXT = "update.txt"
# In every stage's output (core/stage.py): which stage owns the folder (written when the stage first
# claims it), and the lock a running stage holds (host, pid, start time). Hidden: not part of the data.
OUTPUT_MARKER = ".laiontools-output.json"
OUTPUT_LOCK = ".laiontools.lock"

EMB_IMG_DIR = "img_emb"
EMB_TEXT_DIR = "text_emb"
EMB_META_DIR = "meta"
EMB_SCORES_DIR = "scores"
EMB_MODEL_JSON = "model.json"
EMB_REPORT_JSON = "embed_report.json"

# prepare's output inside a pool folder (download runs prepare first and reads its stats)
PREPARED_STATS_JSON = "stats.json"

# dedup
DEDUP_INDEX_DIR = "index"
DEDUP_INDEX_FILE = "evalsets.faiss"
DEDUP_ITEMS_FILE = "items.parquet"
DEDUP_INDEX_JSON = "index.json"
DEDUP_REPORT_DIR = "report"
DEDUP_DONE_DIR = "done"
DEDUP_SUMMARY_JSON = "summary.json"
DEDUP_SUMMARY_TXT = "summary.txt"
DEDUP_EXCLUDE_UIDS = "exclude.uids.npy"
DEDUP_JSON = "dedup.json"
DEDUP_GALLERY_HTML = "gallery.html"
CALIBRATE_JSON = "calibrate.json"
CALIBRATE_TXT = "calibrate.txt"
CALIBRATE_PNG = "calibrate.png"
CALIBRATE_SETTINGS_JSON = "calibrate.settings.json"  # not settings.json: a dedup output folder may hold both

# reshard
RESHARD_SHARDS_DIR = "shards"
RESHARD_SIZES_JSON = "sizes.json"
RESHARD_PLAN_JSON = "reshard.json"
RESHARD_MANIFEST = "subset.manifest.json"
RESHARD_UIDS = "uids.npy"  # copy of the subset's uid file in folders written before it was referenced

# train (the trainer's run folder; evaluate and study read it)
TRAIN_SETTINGS_JSON = "settings.json"
TRAIN_ENVIRONMENT_JSON = "environment.json"
TRAIN_LAUNCHES_JSONL = "launches.jsonl"
TRAIN_SHARDS_JSON = "shards.json"
TRAIN_METRICS_JSONL = "metrics.jsonl"
TRAIN_RESULT_JSON = "result.json"
TRAIN_DIVERGED_JSON = "diverged.json"  # a run with a NaN / infinite loss (stopped there) or weights: its result
TRAIN_MODEL_FILE = "model.pt"
TRAIN_CHECKPOINT_DIR = "checkpoints"
TRAIN_LOGS_DIR = "logs"
TRAIN_SKIPPED_DIR = "logs/skipped"  # one record per data loader process that skipped a sample

# study (the grid's folder; `study fit` / `study plan` write into theirs); scaling writes fits/report/plots
STUDY_RESULTS_CSV = "results.csv"
STUDY_FITS_JSON = "fits.json"
STUDY_REPORT_HTML = "report.html"
STUDY_PLOTS_DIR = "plots"
STUDY_GMACS_JSON = "gmacs.json"
STUDY_RUNS_DIR = "runs"
STUDY_EVAL_JSON = "eval.json"
STUDY_SETTINGS_JSON = "settings.json"
STUDY_FIT_INPUT_CSV = "fit_input.csv"
STUDY_PLAN_JSON = "plan.json"


def subset_manifest(label: str) -> str:
    """File name of the manifest of the subset with scale label `label` ("80M" -> "80M.manifest.json")."""
    return f"{label}.manifest.json"


def subset_uids(label: str) -> str:
    """File name of the uid file of the subset with scale label `label` ("80M" -> "80M.uids.npy")."""
    return f"{label}.uids.npy"


def subset_spans(label: str) -> str:
    """Folder of the sample spans of the subset with scale label `label` ("80M" -> "80M.spans"), written by
    subsets for reshard (laiontools.contracts.spans; its name follows the uid file's: spans_dir_of)."""
    return f"{label}.spans"


def subset_diff(label: str) -> str:
    """File name of the `subsets --update` diff report of scale `label` ("80M" -> "80M.diff.json")."""
    return f"{label}.diff.json"


def takedown_audit_of(pool_manifest: str) -> str:
    """The takedown audit log beside a pool manifest (its folder's `takedown.audit.jsonl`)."""
    folder, sep, _ = pool_manifest.rpartition("/")
    return f"{folder}/{TAKEDOWN_AUDIT}" if sep else TAKEDOWN_AUDIT


def shard_id(shard_path: str) -> str:
    """Stable id of a pool shard from its manifest path: 'shards/retry01/00003.tar' -> 'retry01-00003'.

    A pool made by ``takedown`` lists the shards it did not rewrite at their place in the parent pool
    (an absolute path or URL, '/data/pool/shards/00003.tar'): the id is what follows the last
    ``shards/`` folder, so a shard keeps its id (the catalog's ``shard`` column) down the lineage.
    """
    p = shard_path
    if p.startswith(SHARDS_DIR + "/"):
        p = p[len(SHARDS_DIR) + 1 :]
    elif "/" + SHARDS_DIR + "/" in p:
        p = p.rpartition("/" + SHARDS_DIR + "/")[2]
    p = p.removesuffix(".tar")
    return p.replace("/", "-")
