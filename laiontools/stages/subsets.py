"""Nested subsets of a pool: filters, dedup exclusions and a seeded selection, one manifest per scale.

Contract (DESIGN.md "Manifest", "Scale presets")::

    laiontools subsets --pool <pool.manifest.json> [--scores <embed out>] [--exclude <dedup out> ...]
                       --scales 80M,400M,2B [--scale-factor F] --seed S --output <dir> [filters]

writes, per scale label L (``80M``, ``400M``, an explicit count ``1000`` ...)::

    <output>/<L>.manifest.json   kind=subset, target vs obtained, uid file + sha256, parent, recipe, funnel
    <output>/<L>.uids.npy        sorted u8,u8 uid file (laiontools.contracts.uids layout)
    <output>/settings.json       effective settings

How the choice is made, and why it nests: every eligible uid gets a score
``blake2b(uid bytes, digest_size=8, key=seed, person=b"laiontools-sub")`` read as a big-endian
uint64 (:func:`laiontools.contracts.selection.selection_scores`; stable across machines and Python
versions, unlike ``hash()``).
A subset of size N is the N lowest (score, uid) pairs. So every smaller subset is inside every
larger one, adding a scale never changes another, and the choice depends only on the eligible uid
set and the seed.

On Spark the catalog never comes to the driver. The driver sees a 65,536-bucket histogram of the
scores, the few rows of the bucket where each cut falls, and then concatenates the sorted uid runs that
Spark tasks wrote for every scale into the ``.npy`` files
(:func:`laiontools.contracts.uids.save_uids_spark`, the pool's uid file's writer too), so driver
memory does not grow with the pool or the subset. Pools whose catalog has at most ``--spark-above``
rows (2M) are selected in this process instead, with no JVM (:class:`_LocalSelection`: the catalog's
few columns read with pyarrow, the same steps on its arrays), unless a master is named or under
spark-submit; both engines write the same bytes (tests/test_subsets.py).

Same inputs and seed give byte-identical manifests and uid files: paths of inputs are recorded as
absolute paths, the provenance command is rebuilt from the settings (without the output folder),
and time/host go to the ``.run.json`` sidecar written by :func:`laiontools.contracts.manifest.write_manifest`.
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import logging
import math
import re
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from laiontools.contracts import layout
from laiontools.contracts import schema as C
from laiontools.contracts.embeddings import check_shard_files_spark
from laiontools.contracts.lineage import cut_record, lineage_root, signed_cut
from laiontools.contracts.manifest import (
    new_manifest,
    read_manifest,
    resolve,
    write_manifest,
)
from laiontools.contracts.pool import (
    PoolInfo,
    abs_path,
    catalog_footers,
    catalog_rows,
    load_pool,
    refuse_lacking_columns,
    spark_read_catalog,
)
from laiontools.contracts.selection import HASH_SPEC, parse_seed, score_series
from laiontools.contracts.spans import arrow_catalog_shard_id, spark_shard_id
from laiontools.contracts.uids import UID_DTYPE, save_uids_spark, with_member_flag
from laiontools.core import failpoints
from laiontools.core.config import ConfigError, changed_settings
from laiontools.core.errors import InputError, UserError, task_errors_as
from laiontools.core.report import table
from laiontools.core.spark import spark_run_record
from laiontools.core.stage import (
    SparkStageConfig,
    StageResult,
    config_parser,
    stage_entry,
    stage_spark,
    wants_spark,
)
from laiontools.core.storage import (
    atomic_write_bytes,
    ensure_output_dir,
    glob_literal,
    join,
    read_json,
    sha256_file,
    spark_read_parquet,
    url_to_fs,
    write_json,
    write_record,
)

log = logging.getLogger(__name__)

SCALE_PRESETS: dict[str, int] = {"80M": 80_000_000, "400M": 400_000_000, "2B": 2_000_000_000}
_SUFFIX = {"": 1, "K": 1_000, "M": 1_000_000, "B": 1_000_000_000}
_SCALE_RE = re.compile(r"^(?P<num>[0-9]+(?:\.[0-9]*)?(?:[eE][+]?[0-9]+)?)(?P<suffix>[kKmMbB]?)$")
# The score histogram uses the top 16 bits: 65,536 buckets, ~76k rows each for a 5B-row pool.
_BUCKET_SHIFT = 48


class SubsetError(UserError, ValueError):
    """Selection cannot be made as asked (too few eligible samples, inputs from another pool ...)."""


# ----------------------------------------------------------------------------------------------
# parsing


def parse_scales(text: str, scale_factor: float = 1.0) -> list[tuple[str, int]]:
    """``"80M,400M,2B"`` -> ``[("80M", 80e6), ...]`` scaled by `scale_factor`, largest first.

    Accepts presets (80M, 400M, 2B), plain counts (``1000``), scientific notation (``1e6``) and
    K/M/B suffixes (``1.5M``). Each scaled target must be a whole number >= 1, and targets must be
    distinct. Raises ConfigError naming the bad item.
    """
    if not isinstance(text, str) or not text.strip():
        raise ConfigError("--scales is empty; give e.g. --scales 80M,400M,2B or --scales 100,1000")
    if not (isinstance(scale_factor, (int, float)) and not isinstance(scale_factor, bool)) or not (
        math.isfinite(scale_factor) and scale_factor > 0
    ):
        raise ConfigError(f"--scale-factor {scale_factor!r} must be a positive number, e.g. 1e-6")
    out: list[tuple[str, int]] = []
    for item in text.split(","):
        label = item.strip()
        if not label:
            raise ConfigError(f"--scales {text!r} has an empty item; separate counts with single commas")
        upper = label.upper()
        if upper in SCALE_PRESETS:
            base = float(SCALE_PRESETS[upper])
            label = upper
        else:
            m = _SCALE_RE.match(label)
            if not m:
                raise ConfigError(
                    f"scale {label!r} is not a count; give a preset (80M, 400M, 2B), a whole number (1000), "
                    "scientific notation (1e6) or a K/M/B suffix (1.5M)"
                )
            base = float(m.group("num")) * _SUFFIX[m.group("suffix").upper()]
        target_f = base * float(scale_factor)
        if not math.isfinite(target_f):  # 1e400, or 2B x 1e300
            raise ConfigError(f"scale {label!r} x scale factor {scale_factor:g} is not a finite number of samples")
        target = round(target_f)
        if target < 1 or abs(target_f - target) > 1e-6 * max(1.0, target_f):
            raise ConfigError(
                f"scale {label!r} x scale factor {scale_factor:g} = {target_f:g} is not a whole number of samples >= 1; "
                "pick counts/factors that give whole numbers (e.g. 80M with 1e-6 -> 80)"
            )
        out.append((label, target))
    targets = [t for _, t in out]
    if len(set(targets)) != len(targets) or len({lab for lab, _ in out}) != len(out):
        raise ConfigError(f"--scales {text!r} gives repeated targets {targets}; each scale must be a different size")
    return sorted(out, key=lambda lt: -lt[1])


# ----------------------------------------------------------------------------------------------
# config


@dataclass
class SubsetsConfig(SparkStageConfig):
    pool: str = field(default="", metadata={"help": "pool.manifest.json written by download"})
    output: str = field(default="", metadata={"help": "output folder for the subset manifests and uid files"})
    scales: str = field(default="80M,400M,2B", metadata={"help": "comma-separated presets (80M,400M,2B) or counts (1000, 1e6, 1.5M)"})
    seed: int | None = field(default=None, metadata={"help": "selection seed (whole number); same seed -> same subsets"})
    scale_factor: float = field(default=1.0, metadata={"help": "multiply every scale, e.g. 1e-6 turns 80M,400M,2B into 80,400,2000"})
    allow_short: bool = field(default=False, metadata={"help": "write a subset smaller than its target (recorded as short) instead of failing"})
    scores: str | None = field(default=None, metadata={"help": "embed output folder; its scores/*.parquet give clip_score"})
    exclude: list[str] = field(default_factory=list, metadata={"help": "dedup output folder(s) (exclude.uids.npy + dedup.json) or uid .npy file(s) to exclude"})
    min_clip_score: float | None = field(default=None, metadata={"help": "keep clip_score >= this (LAION: 0.3 for 400M, 0.28 for 2B-en with ViT-B/32); needs --scores"})
    max_punsafe: float | None = field(default=None, metadata={"help": "keep punsafe < this (LAION-5B tags unsafe at 0.5); missing punsafe is removed"})
    max_pwatermark: float | None = field(default=None, metadata={"help": "keep pwatermark < this (e.g. 0.8); missing pwatermark is removed"})
    min_image_side: int | None = field(default=None, metadata={"help": "keep images whose shorter original side >= this many pixels"})
    max_aspect_ratio: float | None = field(default=None, metadata={"help": "keep images with long side / short side <= this"})
    min_caption_length: int | None = field(default=None, metadata={"help": "keep captions with at least this many characters"})
    max_caption_length: int | None = field(default=None, metadata={"help": "keep captions with at most this many characters"})
    update: str | None = field(default=None, metadata={"help": "an earlier subsets output: re-derive its subsets with its own settings "
                                                       "(seed, scales, filters, exclusions) on --pool, a pool made from its pool by "
                                                       "takedown, and write a diff report per scale"})
    spark_above: int = field(default=2_000_000, metadata={
        "help": "pools whose catalog has more rows than this are selected on Spark; smaller ones in this process, with the "
                "same result, unless a master is named or under spark-submit (0: always Spark)"})

    def validate(self) -> None:
        if not self.pool:
            raise ConfigError("give --pool <pool.manifest.json> (the download output's manifest)")
        if not self.output:
            raise ConfigError("give --output <folder> for the subset manifests")
        if self.seed is None and self.update:
            return  # every selection setting comes from the old run's settings.json (run -> updated_config)
        if self.seed is None:
            raise ConfigError("give --seed <whole number>; the seed fixes which samples each subset holds")
        self.seed = parse_seed(self.seed)
        if isinstance(self.scale_factor, str):  # a flag, parsed here so it gets the same message as from YAML
            self.scale_factor = _parse_factor(self.scale_factor)
        parse_scales(self.scales, self.scale_factor)
        if self.min_clip_score is not None and not self.scores:
            raise ConfigError("--min-clip-score needs --scores <embed output folder> (the clip_score comes from there)")
        for name in ("max_punsafe", "max_pwatermark"):
            v = getattr(self, name)
            if v is not None and not (0.0 < v <= 1.0):
                raise ConfigError(f"--{name.replace('_', '-')} {v} must be in (0, 1]")
        for name in ("min_image_side", "min_caption_length", "max_caption_length"):
            v = getattr(self, name)
            if v is not None and (isinstance(v, bool) or not isinstance(v, int) or v < 0):
                raise ConfigError(f"--{name.replace('_', '-')} {v!r} must be a whole number >= 0")
        if self.max_aspect_ratio is not None and not self.max_aspect_ratio >= 1.0:
            raise ConfigError(f"--max-aspect-ratio {self.max_aspect_ratio} must be >= 1 (long side / short side)")
        if (
            self.min_caption_length is not None
            and self.max_caption_length is not None
            and self.min_caption_length > self.max_caption_length
        ):
            raise ConfigError("--min-caption-length is larger than --max-caption-length; no caption could pass")
        if isinstance(self.exclude, str):
            self.exclude = [self.exclude]

    def targets(self) -> list[tuple[str, int]]:
        return parse_scales(self.scales, self.scale_factor)

    def filters(self) -> dict[str, Any]:
        """The filters as recorded in the manifest (None = not applied)."""
        return {
            "min_clip_score": self.min_clip_score,
            "max_punsafe": self.max_punsafe,
            "max_pwatermark": self.max_pwatermark,
            "min_image_side": self.min_image_side,
            "max_aspect_ratio": self.max_aspect_ratio,
            "min_caption_length": self.min_caption_length,
            "max_caption_length": self.max_caption_length,
        }


# ----------------------------------------------------------------------------------------------
# inputs: pool, scores, exclusions


def _find(d: dict[str, Any], names: tuple[str, ...]) -> Any:
    """First of `names` in `d` or in one of its dict values (files written by other stages vary)."""
    for n in names:
        if n in d:
            return d[n]
    for v in d.values():
        if isinstance(v, dict):
            for n in names:
                if n in v:
                    return v[n]
    return None


_FP_KEYS = ("source_fingerprint", "pool_source_fingerprint", "pool_fingerprint", "fingerprint")
_SHA_KEYS = ("pool_manifest_sha256", "manifest_sha256")


def check_provenance(info: dict[str, Any], pool: PoolInfo, what: str, fix: str) -> dict[str, Any]:
    """Refuse `info` (model.json / dedup.json) recorded for another pool; return what was checked."""
    fp = _find(info, _FP_KEYS)
    sha = _find(info, _SHA_KEYS)
    if fp is not None and fp != pool.fingerprint:
        raise SubsetError(
            f"{what} was made from a pool with source fingerprint {fp}, not {pool.path} ({pool.fingerprint}); {fix}"
        )
    if sha is not None and sha != pool.sha256:
        if fp is None:
            raise SubsetError(f"{what} was made from pool manifest sha256 {sha}, not {pool.path} ({pool.sha256}); {fix}")
        # which of the two is newer is not known here (a retry pass adds samples, a takedown removes some)
        log.warning("%s was made from another version of %s (same source; manifest sha256 %s, this one %s: before or "
                    "after a --retry-failed pass or a takedown); samples only this pool holds have no entry there",
                    what, pool.path, sha[:12], pool.sha256[:12])
    return {"source_fingerprint": fp, "pool_manifest_sha256": sha}


@dataclass
class Exclusion:
    path: str  # the uid file
    given: str  # what the user passed
    kind: str  # "dedup" or "uids"
    sha256: str
    count: int
    # The uids as load_exclusion read them (the bytes `sha256` names), when it held them (up to
    # MEMBER_UDF_MAX_UIDS): the in-process selection flags the catalog with these instead of reading
    # the file a second time. Not part of the subsets' record.
    held: Any = field(default=None, repr=False, compare=False)

    def record(self) -> dict[str, Any]:
        return {"path": self.path, "given": self.given, "kind": self.kind, "sha256": self.sha256, "count": self.count}


def load_exclusion(given: str, pool: PoolInfo, spark: Any) -> Exclusion:
    """A dedup output folder (exclude.uids.npy + dedup.json) or a bare uid .npy file; checked against the pool.

    The file is read once, in pieces (its sha256, count and order); this process holds its uids only up to
    MEMBER_UDF_MAX_UIDS, and the pool's only when both are that small. Above, the check that a dedup
    output's uids are samples of the pool is a Spark join of the two files read by tasks (`spark`): at 2B
    the pool's file is 32 GB, and a semantic dedup's list can be hundreds of millions of uids."""
    from laiontools.contracts import uids as uids_mod
    from laiontools.contracts.uids import (
        as_sorted_set,
        contains,
        count_not_in,
        load_uids,
        scan_uid_file,
        uid_file_frame,
        uid_file_layout,
    )

    given = abs_path(given)
    fs, p = url_to_fs(given)
    if not fs.exists(p):
        raise InputError(f"--exclude {given} does not exist; give a dedup output folder or a uid .npy file")
    if fs.isdir(p):
        uid_file = join(given, layout.DEDUP_EXCLUDE_UIDS)
        meta_file = join(given, layout.DEDUP_JSON)
        if not fs.exists(url_to_fs(uid_file)[1]):
            raise InputError(f"--exclude {given}: no exclude.uids.npy inside; is it a dedup output folder? (re-run dedup)")
        kind = "dedup"
        if fs.exists(url_to_fs(meta_file)[1]):
            check_provenance(
                read_json(meta_file), pool, f"dedup output {given}", "run dedup on this pool's embeddings, or drop this --exclude"
            )
        else:
            log.warning("%s has no dedup.json; checking only that its uids are samples of the pool", given)
    else:
        uid_file, kind = given, "uids"
    limit = uids_mod.MEMBER_UDF_MAX_UIDS
    # With no Spark session (in process, which `--spark-above -1` keeps to whatever the size) the list is
    # held whole: the in-process selection flags the catalog with it anyway, and nothing here could join.
    scanned = scan_uid_file(uid_file, hold_up_to=limit if spark is not None else 1 << 62)
    if scanned is None:  # its header or length is off (or it changed while read): name what, from the
        try:              # header and the file's size (a 2B list is 32 GB: not read whole to say it is cut)
            uid_file_layout(uid_file)
        except (ValueError, EOFError) as e:
            raise InputError(f"--exclude {uid_file}: {e}") from e
        raise InputError(f"--exclude {uid_file}: the file changed while it was read; give it again once it is written")
    sha, ordered, ex = scanned
    arr, count = ex.held, ex.count
    if not ordered:  # not written by save_uids (two lists concatenated): a set all the same
        if arr is not None:
            arr = as_sorted_set(arr)
            count = len(arr)
        else:
            count = int(uid_file_frame(spark, uid_file, binary=True).select("uid").distinct().count())
        log.warning("--exclude %s: its uids are not sorted and unique; taken as the set of its %d distinct uids", uid_file, count)
    if kind == "dedup" and count:
        # After a takedown the dedup output of the original pool still applies: its uids are samples of the
        # pool the takedowns started from (an excluded uid that was taken down is simply gone).
        root, root_m = lineage_root(pool.path, pool.manifest, pool.sha256)
        pool_file = resolve(root, root_m["uids"]["path"])
        try:  # a pool uid file cut short or not a uid file: one line naming it, not numpy's mmap error
            uid_file_layout(pool_file)
        except (ValueError, EOFError, OSError) as e:
            raise InputError(f"--exclude {given} is checked against the pool's uid file, which cannot be read: {e}; "
                             f"run `laiontools verify` on {root}") from e
        if arr is not None and (spark is None or int(root_m["uids"]["count"]) <= limit):
            missing = int((~contains(load_uids(pool_file), np.asarray(arr))).sum())
        else:
            missing = count_not_in(spark, uid_file, pool_file, distinct=not ordered)
        if missing:
            raise SubsetError(
                f"dedup output {given}: {missing} of {count} excluded uids are not samples of pool {pool.path}; "
                "it was made from another pool: run dedup on this pool's embeddings"
            )
    return Exclusion(path=uid_file, given=given, kind=kind, sha256=sha, count=count, held=arr)


# ----------------------------------------------------------------------------------------------
# Spark plan


# The catalog columns a selection reads.
_CATALOG_COLUMNS = (C.UID, C.STATUS, C.SHARD, C.CAPTION, C.WIDTH, C.HEIGHT, C.ORIGINAL_WIDTH, C.ORIGINAL_HEIGHT, C.PUNSAFE,
                    C.PWATERMARK)


def _missing_columns(pool: PoolInfo, have: Any) -> None:
    missing = [c for c in _CATALOG_COLUMNS if c not in have]
    if missing:
        raise InputError(f"catalog {pool.catalog} lacks column(s) {missing}; it does not follow schemas/catalog.schema.json")


def _catalog_df(spark: Any, pool: PoolInfo, footers: list[tuple[str, int, Any]] | None = None) -> Any:
    """The catalog's selection columns on Spark. `footers`: the pool's :func:`catalog_footers`, when the
    run read them already (to choose its engine); else read here."""

    # Spark's reader takes the schema of one file and reads a column another file lacks as nulls: a
    # --max-punsafe would then drop every row of that file as "punsafe missing", silently. Every file's
    # footer is checked first, as the in-process engine's reader checks each file (the same error). A
    # column a file stores all null with Arrow's null type is read as nulls of its type (spark_read_catalog).
    if footers is None:
        footers = catalog_footers(pool)
    for path, _, schema in footers:
        refuse_lacking_columns(pool, path, schema.names, _CATALOG_COLUMNS)
    df = spark_read_catalog(spark, pool, footers)
    _missing_columns(pool, df.columns)
    return df.select(*_CATALOG_COLUMNS).withColumn("_shard_id", spark_shard_id())


def _score_files(scores_dir: str, pool: PoolInfo) -> tuple[list[str], dict[str, Any]]:
    """<embed out>/scores/*.parquet after checking model.json's pool: (their URLs, the manifest's record of
    where the scores come from, without the counts the reader adds)."""
    scores_dir = abs_path(scores_dir)
    fs, p = url_to_fs(scores_dir)
    if not fs.isdir(p):
        raise InputError(f"--scores {scores_dir} is not a folder; give the embed output folder")
    files = sorted(fs.glob(join(glob_literal(p), layout.EMB_SCORES_DIR, "*.parquet")))
    if not files:
        raise InputError(f"--scores {scores_dir}: no {layout.EMB_SCORES_DIR}/*.parquet inside; is it an embed output? (re-run embed)")
    model_json = join(scores_dir, layout.EMB_MODEL_JSON)
    model_info: dict[str, Any] = {}
    checked: dict[str, Any] = {}
    if fs.exists(url_to_fs(model_json)[1]):
        model_info = read_json(model_json)
        checked = check_provenance(model_info, pool, f"embed output {scores_dir}", "run embed on this pool, or give its embed output")
    else:
        log.warning("%s has no model.json; checking only that its uids are samples of the pool", scores_dir)
    urls = [join(scores_dir, layout.EMB_SCORES_DIR, f.rsplit("/", 1)[-1]) for f in files]
    from laiontools.contracts.embeddings import done_shards

    done = set(done_shards(scores_dir))
    if done:  # an embed output: a shard is done only once its marker exists (a killed run, a shard being re-embedded)
        unfinished = [u for u in urls if u.rsplit("/", 1)[-1][: -len(".parquet")] not in done]
        if unfinished:
            log.warning("--scores %s: %d score file(s) of shards embed has not finished (no %s/<shard>.parquet.done) are "
                        "not read, their samples count as unscored: %s; finish embed to score them", scores_dir,
                        len(unfinished), layout.EMB_META_DIR, ", ".join(u.rsplit("/", 1)[-1] for u in unfinished[:20]))
            urls = [u for u in urls if u not in set(unfinished)]
        if not urls:
            raise InputError(f"--scores {scores_dir}: no shard is finished (no {layout.EMB_META_DIR}/*.parquet.done); "
                             f"finish embed first")
    record = {
        "path": scores_dir,
        "files": len(urls),
        "model": {k: model_info.get(k) for k in ("model", "name", "pretrained", "checkpoint_sha256") if k in model_info},
        **{k: v for k, v in checked.items() if v is not None},
    }
    return urls, record


def _log_rows_without_uid(scores_dir: str, no_uid: int) -> None:
    if no_uid:
        log.warning("--scores %s: %d rows without a uid (samples whose uid embed could not read; it recorded them "
                    "failed) are left out; `laiontools verify` on the pool names those samples", scores_dir, no_uid)


def _scores_df(spark: Any, scores_dir: str, pool: PoolInfo) -> tuple[Any, dict[str, Any]]:
    """Read <embed out>/scores/*.parquet (uid, clip_score), after checking model.json's pool."""
    from pyspark.sql import functions as F

    scores_dir = abs_path(scores_dir)
    urls, record = _score_files(scores_dir, pool)
    # Spark's parquet reader would decode a flipped bit in a plain page as another score: check each
    # file against the sha256 embed recorded in its shard's marker first (an error naming the file).
    check_shard_files_spark(spark, scores_dir, "scores")
    sdf = spark_read_parquet(spark, urls)
    _check_score_columns(scores_dir, sdf.columns)
    # A row embed recorded as failed because it could not read the sample's uid has a null uid: it is not
    # a sample of the pool by uid (nor a foreign one), so it is left out and counted, not taken for
    # another pool's score (walk F4).
    no_uid = sdf.filter(F.col(C.UID).isNull()).count()
    _log_rows_without_uid(scores_dir, no_uid)
    # One score per uid (max is deterministic if a uid were embedded twice). `_scored`: the uid has a row,
    # so a null score there means embed could not decode the sample (failed_decode), not "not embedded".
    sdf = (sdf.filter(F.col(C.UID).isNotNull()).groupBy(C.UID)
           .agg(F.max("clip_score").alias("clip_score")).withColumn("_scored", F.lit(True)))
    return sdf, {**record, "rows_without_uid": int(no_uid)}


def _check_score_uids(cat: Any, sdf: Any, scores_dir: str, pool: PoolInfo) -> int:
    """Refuse scores whose uids are not samples of this pool (another pool's embed output)."""
    from pyspark.sql import functions as F

    # rows a takedown removed were samples when embed ran: their scores are from this pool's lineage
    samples = cat.filter((F.col(C.STATUS) == C.STATUS_SUCCESS) | F.col(C.STATUS).startswith(C.REMOVED_PREFIX)).select(C.UID)
    row = sdf.join(samples, on=C.UID, how="left_anti").agg(F.count(F.lit(1)).alias("n")).collect()[0]
    return _scored_uids(scores_dir, pool, int(row["n"]), sdf.count())


def _scored_uids(scores_dir: str, pool: PoolInfo, foreign: int, total: int) -> int:
    """`total` distinct scored uids, `foreign` of them not samples of `pool`: refused unless none is and
    there are some (both engines); returns `total`."""
    if total == 0:
        raise InputError(f"--scores {scores_dir}: the score files are empty; re-run embed")
    if foreign:
        raise SubsetError(
            f"--scores {scores_dir}: {foreign} of {total} scored uids are not samples of pool {pool.path}; "
            "these scores come from another pool (or an older download): run embed on this pool"
        )
    return total


def _check_score_columns(scores_dir: str, have: Any) -> None:
    for c in (C.UID, "clip_score"):
        if c not in have:
            raise InputError(f"--scores {scores_dir}: {layout.EMB_SCORES_DIR}/*.parquet lack column {c!r}")


def _filter_steps(cfg: SubsetsConfig, have_scores: bool, exclusions: list[Exclusion]) -> list[tuple[str, str, Any]]:
    """(step name, test, its argument) in funnel order; each engine evaluates the tests
    (:meth:`_SparkSelection.passes`, :meth:`_LocalSelection.passes`). A row passes a step only when its
    test is true: an unknown value (NULL) does not pass."""
    steps: list[tuple[str, str, Any]] = [
        ("not a downloaded sample (status != success)", "success", None),
        ("shard not complete in the pool manifest", "complete", None),
    ]
    for i, ex in enumerate(exclusions):
        steps.append((f"excluded by {ex.kind} {ex.given}", "not_excluded", i))
    if have_scores:
        # A sample embed could not decode is not trainable (train skips it): with its status at hand, a
        # subset's size means samples train can use. A sample with no score row is left to the score filter.
        steps.append(("undecodable at embed (failed_decode)", "decodable", None))
    if cfg.min_clip_score is not None and have_scores:
        steps.append((f"clip_score < {cfg.min_clip_score:g} or missing", "at_least", ("clip_score", cfg.min_clip_score)))
    if cfg.max_punsafe is not None:
        steps.append((f"punsafe >= {cfg.max_punsafe:g} or missing", "below", (C.PUNSAFE, cfg.max_punsafe)))
    if cfg.max_pwatermark is not None:
        steps.append((f"pwatermark >= {cfg.max_pwatermark:g} or missing", "below", (C.PWATERMARK, cfg.max_pwatermark)))
    # Size filters look at the image as published (original_*), else the stored size; both sides known.
    if cfg.min_image_side is not None:
        steps.append((f"shorter image side < {cfg.min_image_side} px or unknown", "min_side", cfg.min_image_side))
    if cfg.max_aspect_ratio is not None:
        steps.append((f"aspect ratio > {cfg.max_aspect_ratio:g} or unknown", "max_aspect", cfg.max_aspect_ratio))
    if cfg.min_caption_length is not None:
        steps.append((f"caption shorter than {cfg.min_caption_length} chars", "min_caption", cfg.min_caption_length))
    if cfg.max_caption_length is not None:
        steps.append((f"caption longer than {cfg.max_caption_length} chars", "max_caption", cfg.max_caption_length))
    return steps


def _old_cut(cfg: SubsetsConfig, label: str) -> tuple[int, str] | bool | None:
    """(subsets --update) The old run's largest subset's recorded cut (score, uid); True when that subset
    was empty (every eligible uid ranks after it); None when a non-empty one records no cut."""
    old = read_manifest(join(abs_path(cfg.update or ""), layout.subset_manifest(label)))
    cut = (old.get("selection") or {}).get("cut")
    if not cut:
        return None if int(old.get("num_samples") or 0) > 0 else True
    return signed_cut(cut)


class _SparkSelection:
    """The selection's steps on Spark: the catalog read by Spark's reader, the eligible uids scored by a
    pandas UDF and persisted, the cuts from a histogram, the uid files written by tasks."""

    def __init__(self, cfg: SubsetsConfig, spark: Any, pool: PoolInfo, exclusions: list[Exclusion],
                 footers: list[tuple[str, int, Any]] | None = None) -> None:
        from pyspark.sql import functions as F

        self.cfg, self.spark, self.elig, self.sel, self.rows = cfg, spark, None, None, 0
        # The shuffles below (scores per uid, distinct eligible uids) split the pool's rows: their partition
        # count follows the pool's size unless the user set spark.sql.shuffle.partitions (Spark's 200 was
        # ~200 tasks per shuffle for a pool of 1,000 samples, and 10M rows per task at 2B).
        self.run_record = spark_run_record(spark, int(pool.manifest["num_samples"]))
        self.footers = footers or catalog_footers(pool)
        cat = _catalog_df(spark, pool, self.footers)
        shards = spark.createDataFrame([(s,) for s in pool.shard_ids], "_shard_id string").withColumn("_complete", F.lit(True))
        cat = cat.join(F.broadcast(shards), on="_shard_id", how="left")
        self.scores_record: dict[str, Any] | None = None
        if cfg.scores:
            sdf, self.scores_record = _scores_df(spark, cfg.scores, pool)
            self.scores_record["scored_uids"] = _check_score_uids(cat, sdf, cfg.scores, pool)
            cat = cat.join(sdf, on=C.UID, how="left")
        for i, ex in enumerate(exclusions):
            cat = with_member_flag(cat, C.UID, ex.path, f"_excluded_{i}")
        self.cat = cat

    @staticmethod
    def passes(test: str, arg: Any) -> Any:
        """The Column that is True where a row passes the step (:func:`_filter_steps`)."""
        from pyspark.sql import functions as F

        w = F.coalesce(F.col(C.ORIGINAL_WIDTH), F.col(C.WIDTH))
        h = F.coalesce(F.col(C.ORIGINAL_HEIGHT), F.col(C.HEIGHT))
        # Spark's least/greatest skip a NULL argument: with one side unknown they would return the other,
        # and a 1000 x unknown image would pass as 1000 px on its shorter side and of aspect ratio 1.
        known = w.isNotNull() & h.isNotNull()
        short, long_ = F.when(known, F.least(w, h)), F.when(known, F.greatest(w, h))
        clen = F.length(F.coalesce(F.col(C.CAPTION), F.lit("")))
        if test == "success":
            expr = F.col(C.STATUS) == C.STATUS_SUCCESS
        elif test == "complete":
            expr = F.col("_complete")
        elif test == "not_excluded":
            expr = ~F.col(f"_excluded_{arg}")
        elif test == "decodable":
            expr = ~(F.coalesce(F.col("_scored"), F.lit(False)) & F.col("clip_score").isNull())
        elif test == "at_least":
            expr = F.col(arg[0]) >= F.lit(arg[1])
        elif test == "below":
            expr = F.col(arg[0]) < F.lit(arg[1])
        elif test == "min_side":
            expr = short >= F.lit(arg)
        elif test == "max_aspect":
            expr = (short > 0) & (long_.cast("double") / short.cast("double") <= F.lit(arg))
        elif test == "min_caption":
            expr = clen >= F.lit(arg)
        elif test == "max_caption":
            expr = clen <= F.lit(arg)
        else:  # pragma: no cover - _filter_steps names no other
            raise ValueError(test)
        return F.coalesce(expr, F.lit(False))

    def funnel(self, steps: list[tuple[str, str, Any]]) -> tuple[int, list[int], int]:
        """(catalog rows, rows each step removed, eligible uids): the funnel in one pass (removed by step k
        = passed steps 1..k-1 and failed step k), then the distinct eligible uids scored and persisted."""
        from pyspark import StorageLevel
        from pyspark.sql import functions as F
        from pyspark.sql import types as T

        aggs = [F.count(F.lit(1)).alias("rows")]
        passed = F.lit(True)
        for k, (_, test, arg) in enumerate(steps):
            ok = self.passes(test, arg)
            aggs.append(F.sum(F.when(passed & ~ok, 1).otherwise(0)).alias(f"r{k}"))
            passed = passed & ok
        t0 = time.monotonic()
        counts = self.cat.agg(*aggs).collect()[0]
        self.rows = int(counts["rows"])
        log.info("subsets: funnel over %d catalog rows in %.1fs", counts["rows"], time.monotonic() - t0)
        seed = self.cfg.seed
        score_udf = F.pandas_udf(lambda s: score_series(s, seed), T.LongType())
        self.elig = (self.cat.filter(passed).select(C.UID).distinct().withColumn("h", score_udf(F.col(C.UID)))
                     .persist(StorageLevel.MEMORY_AND_DISK))
        t0 = time.monotonic()
        n_elig = self.elig.count()
        log.info("subsets: %d eligible uids scored in %.1fs", n_elig, time.monotonic() - t0)
        return int(counts["rows"]), [int(counts[f"r{k}"] or 0) for k in range(len(steps))], int(n_elig)

    def cuts(self, targets: list[int]) -> dict[int, tuple[int, str]]:
        """Exact (score, uid) of the N-th lowest eligible row for each N, without collecting the rows.

        A histogram over the top 16 bits of the score finds the bucket each cut falls in; only those
        buckets' rows come to the driver and are sorted there.
        """
        from pyspark.sql import functions as F

        elig = self.elig
        hist = sorted((int(r["b"]), int(r["n"])) for r in elig.groupBy(F.shiftright("h", _BUCKET_SHIFT).alias("b")).agg(F.count(F.lit(1)).alias("n")).collect())
        where: dict[int, tuple[int, int]] = {}  # N -> (bucket, rank within bucket, 1-based)
        cum = 0
        pending = sorted(targets)
        ti = 0
        for b, n in hist:
            while ti < len(pending) and pending[ti] <= cum + n:
                where[pending[ti]] = (b, pending[ti] - cum)
                ti += 1
            cum += n
        buckets = sorted({b for b, _ in where.values()})
        if not buckets:
            return {}
        rows = elig.filter(F.shiftright("h", _BUCKET_SHIFT).isin(buckets)).select("h", C.UID).collect()
        by_bucket: dict[int, list[tuple[int, str]]] = {}
        for r in rows:
            by_bucket.setdefault(int(r["h"]) >> _BUCKET_SHIFT, []).append((int(r["h"]), r[C.UID]))
        for v in by_bucket.values():
            v.sort()
        return {n: by_bucket[b][k - 1] for n, (b, k) in where.items()}

    @staticmethod
    def _up_to(cut: tuple[int, str]) -> Any:
        from pyspark.sql import functions as F

        hc, uc = cut
        return (F.col("h") < F.lit(hc)) | ((F.col("h") == F.lit(hc)) & (F.col(C.UID) <= F.lit(uc)))

    def write_uids(self, paths: list[str], cuts: list[tuple[int, str]], expected: list[int]) -> list[tuple[str, int]]:
        """The uid file of each nested subset (largest first; `cuts` its last (score, uid)), in one sort:
        each selected row carries the index of the smallest subset it is in. [(sha256, count)]."""
        from pyspark.sql import functions as F

        tier = F.lit(0)  # position in `paths` of the smallest subset holding the row
        for pos, cut in enumerate(cuts[1:], start=1):
            tier = F.when(self._up_to(cut), F.lit(pos)).otherwise(tier)
        sel = self.elig.filter(self._up_to(cuts[0])).select(C.UID, tier.cast("int").alias("tier"))
        self.sel = sel
        return save_uids_spark(sel, C.UID, paths, tier_col="tier", expected=expected, distinct=False)

    def between(self, old: tuple[int, str] | bool, new: tuple[int, str]) -> int:
        """How many eligible uids rank after the `old` cut (True: all) and up to the `new` one."""
        from pyspark.sql import functions as F

        if old is True:
            after = F.lit(True)
        else:
            h, uid = old
            after = (F.col("h") > F.lit(h)) | ((F.col("h") == F.lit(h)) & (F.col(C.UID) > F.lit(uid)))
        return int(self.elig.filter(after & self._up_to(new)).count())

    def write_spans(self, output: str, labels: list[str], written: dict[str, tuple[str, int]], pool: PoolInfo) -> None:
        """:meth:`_LocalSelection.write_spans` on Spark: the catalog's success rows of the largest such subset
        (a join with the selection :meth:`write_uids` wrote), one per uid by min(struct), as reshard's Spark
        plan picks it; written by tasks (laiontools.contracts.spans.spark_write_spans)."""
        from pyspark.sql import functions as F

        from laiontools.contracts import spans

        want = [i for i, lab in enumerate(labels) if 0 < written[lab][1] <= spans.SPANS_MAX_FRACTION * self.rows]
        for lab in labels:
            spans.clear(join(output, layout.subset_spans(lab)))
        if not want or self.sel is None:
            return
        cat = spark_read_catalog(self.spark, pool, self.footers)
        if not {C.TAR_OFFSET, C.TAR_LENGTH} <= set(cat.columns):
            log.info("subsets: the catalog records no byte spans: no spans written for reshard")
            return
        sha = F.col(C.TAR_SHA256).cast("string") if C.TAR_SHA256 in cat.columns else F.lit(None).cast("string")
        rows = (cat.filter(F.col(C.STATUS) == C.STATUS_SUCCESS)
                .select(C.UID, C.SHARD, C.KEY, F.col(C.TAR_OFFSET).cast("long").alias(C.TAR_OFFSET),
                        F.col(C.TAR_LENGTH).cast("long").alias(C.TAR_LENGTH), sha.alias(C.TAR_SHA256))
                .join(self.sel.filter(F.col("tier") >= F.lit(want[0])), C.UID)
                .persist())
        try:
            if rows.filter(F.col(C.TAR_OFFSET).isNull() | F.col(C.TAR_LENGTH).isNull()).limit(1).count():
                log.info("subsets: the catalog lacks some selected sample's byte span: no spans written for reshard")
                return
            # One row per uid: the smallest (shard id, key, span), as reshard's plan picks it.
            one = (rows.withColumn("_sid", spans.spark_shard_id()).groupBy(C.UID, "tier")
                   .agg(F.min(F.struct("_sid", C.KEY, C.TAR_OFFSET, C.TAR_LENGTH, C.TAR_SHA256, C.SHARD)).alias("s"))
                   .select(C.UID, "tier", *[F.col(f"s.{c}").alias(c) for c in (C.SHARD, C.KEY, C.TAR_OFFSET, C.TAR_LENGTH, C.TAR_SHA256)]))
            why = spans.spark_write_spans(one, [join(output, layout.subset_spans(labels[i])) for i in want], want,
                                          [written[labels[i]][1] for i in want], [written[labels[i]][0] for i in want], pool.sha256)
        finally:
            rows.unpersist()
        for i, w in zip(want, why):
            if w:  # (eligible uids are success rows of the catalog: never)
                log.warning("subsets: %s: no spans written for reshard: %s", labels[i], w)

    def close(self) -> None:
        if self.elig is not None:
            self.elig.unpersist()


class _LocalSelection:
    """The selection's steps in this process, for pools of up to ``--spark-above`` catalog rows: the
    catalog's few columns read with pyarrow (pages checked against their CRC, as Spark's reader is
    set to), each step's test on its arrays with Spark's meaning (a NULL does not pass; a NaN score
    ranks above every number, as Spark orders it), the cuts and uid files from one sort of the eligible
    uids by (score, uid). The same funnel, cuts and files as :class:`_SparkSelection` (tests)."""

    def __init__(self, cfg: SubsetsConfig, pool: PoolInfo, exclusions: list[Exclusion]) -> None:
        import pyarrow as pa
        import pyarrow.compute as pc

        from laiontools.contracts.pool import read_catalog
        from laiontools.contracts.uids import UidSet, arrow_to_array, load_uids

        self.cfg = cfg
        self.run_record: dict[str, Any] = {"engine": "in-process"}
        cat = read_catalog(pool, list(_CATALOG_COLUMNS), required=_CATALOG_COLUMNS)
        self.n = cat.num_rows
        self.cols: dict[str, Any] = {c: cat.column(c).combine_chunks() for c in _CATALOG_COLUMNS}
        uid = self.cols[C.UID]
        self.cols["_complete"] = pc.is_in(arrow_catalog_shard_id(self.cols[C.SHARD]), value_set=pa.array(pool.shard_ids, pa.string()))
        self.scores_record: dict[str, Any] | None = None
        if cfg.scores:
            score_uids, score_max, self.scores_record = _local_scores(cfg.scores, pool)
            samples = pc.or_(pc.equal(self.cols[C.STATUS], C.STATUS_SUCCESS),
                             pc.starts_with(self.cols[C.STATUS], C.REMOVED_PREFIX))
            sample_uids = pc.filter(uid, pc.fill_null(samples, False))
            foreign = int((~pc.is_in(score_uids, value_set=sample_uids).to_numpy(zero_copy_only=False)).sum())
            self.scores_record["scored_uids"] = _scored_uids(cfg.scores, pool, foreign, len(score_uids))
            at = pc.index_in(uid, value_set=score_uids)
            self.cols["_scored"] = pc.is_valid(at)
            self.cols["clip_score"] = pc.take(score_max, at)
        if exclusions and self.n:
            # Membership tests take the uid strings as 16-byte keys; a row without a uid (off the contract)
            # is no member of anything.
            valid = pc.is_valid(uid).to_numpy(zero_copy_only=False)
            keys = arrow_to_array(pc.fill_null(uid, "0" * 32))
        for i, ex in enumerate(exclusions):
            held = ex.held if ex.held is not None else load_uids(ex.path, mmap=False)
            flag = UidSet(np.asarray(held)).contains(keys) & valid if self.n else np.zeros(0, bool)
            self.cols[f"_excluded_{i}"] = pa.array(flag)
        self.order: np.ndarray | None = None

    def passes(self, test: str, arg: Any) -> np.ndarray:
        """Where a row passes the step (:func:`_filter_steps`), as Spark's Column for it decides."""
        import pyarrow as pa
        import pyarrow.compute as pc

        col = self.cols
        if test == "success":
            got = pc.equal(col[C.STATUS], C.STATUS_SUCCESS)
        elif test == "complete":
            got = col["_complete"]
        elif test == "not_excluded":
            got = pc.invert(col[f"_excluded_{arg}"])
        elif test == "decodable":
            got = pc.invert(pc.and_(col["_scored"], pc.is_null(col["clip_score"])))
        elif test in ("at_least", "below"):
            values = pc.cast(col[arg[0]], pa.float64())
            if test == "at_least":  # Spark ranks NaN above every number: NaN >= x holds there
                got = pc.or_(pc.greater_equal(values, arg[1]), pc.is_nan(values))
            else:  # ... and NaN < x does not
                got = pc.and_(pc.less(values, arg[1]), pc.invert(pc.is_nan(values)))
        elif test in ("min_side", "max_aspect"):
            def side(original: str, stored: str) -> Any:
                return pc.coalesce(pc.cast(col[original], pa.float64()), pc.cast(col[stored], pa.float64()))

            w, h = side(C.ORIGINAL_WIDTH, C.WIDTH), side(C.ORIGINAL_HEIGHT, C.HEIGHT)
            short, long_ = pc.min_element_wise(w, h, skip_nulls=False), pc.max_element_wise(w, h, skip_nulls=False)
            if test == "min_side":
                got = pc.greater_equal(short, float(arg))
            else:
                got = pc.and_(pc.greater(short, 0.0), pc.less_equal(pc.divide(long_, short), float(arg)))
        elif test in ("min_caption", "max_caption"):
            clen = pc.utf8_length(pc.coalesce(col[C.CAPTION], ""))
            got = pc.greater_equal(clen, arg) if test == "min_caption" else pc.less_equal(clen, arg)
        else:  # pragma: no cover - _filter_steps names no other
            raise ValueError(test)
        return pc.fill_null(got, False).to_numpy(zero_copy_only=False).astype(bool)

    def funnel(self, steps: list[tuple[str, str, Any]]) -> tuple[int, list[int], int]:
        """:meth:`_SparkSelection.funnel` on the arrays; the eligible uids, scored, kept sorted by (score, uid)."""
        import pyarrow as pa
        import pyarrow.compute as pc

        from laiontools.contracts.selection import selection_scores, to_signed_order

        passed = np.ones(self.n, dtype=bool)
        removed = []
        for _, test, arg in steps:
            ok = self.passes(test, arg)
            removed.append(int((passed & ~ok).sum()))
            passed &= ok
        uids = pc.unique(pc.filter(self.cols[C.UID], pa.array(passed))).to_pylist()
        h = to_signed_order(selection_scores(uids, self.cfg.seed))
        # By (score, uid), as the Spark engine orders them: the scores alone when no two are equal.
        order = np.argsort(h, kind="stable")
        if len(h) > 1 and bool((h[order][1:] == h[order][:-1]).any()):
            order = np.array(sorted(range(len(uids)), key=lambda i: (int(h[i]), uids[i])), dtype=np.int64)
        self.uids, self.h, self.order = uids, h, order
        return self.n, removed, len(uids)

    def cuts(self, targets: list[int]) -> dict[int, tuple[int, str]]:
        return {n: (int(self.h[self.order[n - 1]]), self.uids[self.order[n - 1]]) for n in targets}

    def write_uids(self, paths: list[str], cuts: list[tuple[int, str]], expected: list[int]) -> list[tuple[str, int]]:
        from laiontools.contracts.uids import save_uids

        # (`cuts` is the Spark engine's way to the same rows: here the first n of the sorted order.) Only
        # the largest subset's uids are listed, not every eligible one's.
        ranked = [self.uids[i] for i in self.order[:max(expected, default=0)]]
        return [save_uids(path, ranked[:n]) for path, n in zip(paths, expected)]

    def write_spans(self, output: str, labels: list[str], written: dict[str, tuple[str, int]], pool: PoolInfo) -> None:
        """The sample spans of each subset of `labels` (largest first) with at most SPANS_MAX_FRACTION of
        the catalog's rows, for reshard (laiontools.contracts.spans): one catalog scan for the largest of
        them, each one's rows cut from it. A catalog without every span writes none (a stale record of
        an earlier run is removed either way)."""
        from laiontools.contracts import spans
        from laiontools.contracts.uids import hex_arrow, load_uids

        want = [lab for lab in labels if 0 < written[lab][1] <= spans.SPANS_MAX_FRACTION * self.n]
        for lab in labels:
            spans.clear(join(output, layout.subset_spans(lab)))
        if not want:
            return
        uid_files = {lab: np.asarray(load_uids(join(output, layout.subset_uids(lab)), mmap=False)) for lab in want}
        rows = spans.scan_catalog(pool, uid_files[want[0]])
        if rows is None:
            log.info("subsets: the catalog lacks some selected sample's byte span: no spans written for reshard")
            return
        rows = rows.sort_values(C.UID, kind="stable")
        for lab in want:
            hexes = hex_arrow(uid_files[lab]).to_numpy(zero_copy_only=False)
            part = rows[rows[C.UID].isin(hexes)] if lab != want[0] else rows
            if len(part) != written[lab][1]:  # (eligible uids are success rows of the catalog: never)
                log.warning("subsets: %s: %d of %d uids found in the catalog's spans; no spans written", lab, len(part), written[lab][1])
                continue
            spans.write_spans(join(output, layout.subset_spans(lab)), part, written[lab][0], pool.sha256)

    def _rank(self, cut: tuple[int, str]) -> int:
        """How many eligible uids rank at or before (score, uid) `cut`."""
        hs = self.h[self.order]
        lo, hi = np.searchsorted(hs, cut[0], "left"), np.searchsorted(hs, cut[0], "right")
        return int(lo) + sum(1 for i in self.order[lo:hi] if self.uids[i] <= cut[1])

    def between(self, old: tuple[int, str] | bool, new: tuple[int, str]) -> int:
        upto = self._rank(new)
        return upto if old is True else max(0, upto - self._rank(old))

    def close(self) -> None:
        pass


def _local_scores(scores_dir: str, pool: PoolInfo) -> tuple[Any, Any, dict[str, Any]]:
    """:func:`_scores_df` in this process: (distinct scored uids, each one's largest score, the record). Each file embed recorded a sha256 for is
    checked against it as it is read (a flipped bit in a plain page would read as another score)."""
    import io

    import pyarrow as pa
    import pyarrow.compute as pc
    import pyarrow.parquet as pq

    from laiontools.contracts.embeddings import done_shards, read_checked, recorded_sha256, shard_files
    from laiontools.core.storage import PARQUET_READ, parquet_read_errors

    scores_dir = abs_path(scores_dir)
    urls, record = _score_files(scores_dir, pool)
    want = {}
    for sid in done_shards(scores_dir):
        rel = shard_files(sid)["scores"]
        want[join(scores_dir, rel)] = (sid, recorded_sha256(scores_dir, sid).get(rel))
    parts = []
    for url in urls:
        sid, sha = want.get(url, (url.rsplit("/", 1)[-1].split(".", 1)[0], None))
        with task_errors_as(InputError):
            data = read_checked(url, sha, sid)
        with parquet_read_errors(url):
            t = pq.read_table(io.BytesIO(data), **PARQUET_READ)
        _check_score_columns(scores_dir, t.column_names)
        parts.append(t.select([C.UID, "clip_score"]).cast(pa.schema([(C.UID, pa.string()), ("clip_score", pa.float64())])))
    t = pa.concat_tables(parts)
    no_uid = int(t.column(C.UID).null_count)
    _log_rows_without_uid(scores_dir, no_uid)
    t = t.filter(pc.is_valid(t.column(C.UID)))
    score = t.column("clip_score")
    nan = pc.fill_null(pc.is_nan(score), False)
    # Spark's max ranks NaN above every number; as +inf it does here, and the steps that read the score
    # (>= a bound; null or not) take +inf and NaN alike.
    t = t.set_column(1, "clip_score", pc.if_else(nan, float("inf"), score))
    g = t.group_by(C.UID).aggregate([("clip_score", "max")])
    return g.column(C.UID).combine_chunks(), g.column("clip_score_max").combine_chunks(), {**record, "rows_without_uid": no_uid}


# ----------------------------------------------------------------------------------------------
# the stage


def canonical_command(cfg: SubsetsConfig) -> list[str]:
    """The recipe as a command line, rebuilt from the settings (absolute inputs, no output folder).

    The manifest records this instead of sys.argv so two runs of the same recipe into different
    folders give byte-identical manifests.
    """
    cmd = ["laiontools", "subsets", "--pool", abs_path(cfg.pool)]
    if cfg.scores:
        cmd += ["--scores", abs_path(cfg.scores)]
    for e in cfg.exclude:
        cmd += ["--exclude", abs_path(e)]
    cmd += ["--scales", cfg.scales, "--scale-factor", repr(float(cfg.scale_factor)), "--seed", str(cfg.seed)]
    if cfg.allow_short:
        cmd.append("--allow-short")
    for k, v in cfg.filters().items():
        if v is not None:
            cmd += ["--" + k.replace("_", "-"), str(v)]
    return cmd


STAGE = "subsets"
CONFIG = SubsetsConfig


@stage_entry(STAGE)
def run(cfg: SubsetsConfig, spark: Any = None) -> StageResult:
    """Select the nested subsets and write their manifests; details = one summary row per scale
    (scale, target, obtained, short, manifest, sha256), largest first.

    Raises SubsetError when a target exceeds the eligible pool (unless allow_short) or an input
    comes from another pool; InputError/ManifestError for unreadable inputs.
    """
    pool = load_pool(cfg.pool)  # a missing or invalid pool manifest fails before Spark starts
    if cfg.update:
        cfg = updated_config(cfg)
    # The catalog's parquet footers (a round trip each on an object store, ~1,150 files at 2B rows) are read
    # at most once: to choose the engine (a manifest without catalog.num_rows), then for Spark's columns.
    footers = functools.cache(functools.partial(catalog_footers, pool))
    if spark is None and not wants_spark(cfg.master, lambda: _engine_size(cfg, pool, footers), cfg.spark_above):
        results = _select(cfg, None, pool)
    else:
        with stage_spark(cfg, spark, app_name="laiontools-subsets") as sp:
            results = _select(cfg, sp, pool, footers)
    funnel = read_manifest(results[-1]["manifest"])["selection"]["funnel"] if results else []
    summary, ok = summary_text(results, funnel), True
    if cfg.update:
        update = write_update_report(cfg, results)
        summary, ok = summary + "\n\n" + update["text"], update["ok"]
        for r in results:
            r.pop("eligible_between_cuts", None)
    return StageResult(
        outputs={r["scale"]: r["manifest"] for r in results},
        counts={r["scale"]: int(r["obtained"]) for r in results},
        details=results, summary=summary, ok=ok,
    )


def _engine_size(cfg: SubsetsConfig, pool: PoolInfo, footers: Callable[[], list[tuple[str, int, Any]]] | None = None) -> int:
    """What chooses the engine (:func:`~laiontools.core.stage.wants_spark`): the catalog's rows, or as
    many as can be when an input needs Spark's joins (an exclusion list, or the first pool of the
    lineage its dedup outputs are checked against, of more than MEMBER_UDF_MAX_UIDS uids). `footers`:
    where the catalog's footers are read when the manifest has no row count (a cached :func:`catalog_footers`)."""
    from laiontools.contracts.uids import MEMBER_UDF_MAX_UIDS, uid_file_layout

    try:
        rows = catalog_rows(pool, footers)
        counts = []
        for given in map(abs_path, cfg.exclude):
            fs, p = url_to_fs(given)
            counts.append(uid_file_layout(join(given, layout.DEDUP_EXCLUDE_UIDS) if fs.isdir(p) else given)[1])
        if cfg.exclude:
            counts.append(int(lineage_root(pool.path, pool.manifest, pool.sha256)[1]["uids"]["count"]))
    except (UserError, OSError, KeyError, TypeError, ValueError, EOFError):
        return 0  # an input that cannot be read: the in-process run names it, with no JVM started first
    return rows if all(c <= MEMBER_UDF_MAX_UIDS for c in counts) else 1 << 62


# ----------------------------------------------------------------------------------------------
# subsets --update: the same recipe on a pool that a takedown made


def updated_config(cfg: SubsetsConfig) -> SubsetsConfig:
    """The old run's settings (its settings.json) with this call's --pool, --output and runtime settings.
    Raises SubsetError when the old folder is not a subsets output or --pool does not descend from its pool."""
    from laiontools.contracts.lineage import pool_chain

    old_dir = abs_path(cfg.update)
    if _same_dir(old_dir, abs_path(cfg.output)):
        # the report compares against the old run's settings.json and uid files: writing over them first
        # would report 0 taken down and check nothing
        raise InputError(f"--output {cfg.output} is the --update folder {old_dir}; write the updated subsets to a new folder")
    path = join(old_dir, layout.SETTINGS_JSON)
    fs, p = url_to_fs(path)
    if not fs.exists(p):
        raise InputError(f"--update {old_dir}: no {layout.SETTINGS_JSON} inside; give the output folder of an earlier `laiontools subsets`")
    old = read_json(path)
    if old.get("stage") != "subsets":
        raise SubsetError(f"--update {old_dir}: its settings.json is not that of a subsets run; give a `laiontools subsets` output folder")
    settings = {k: v for k, v in old.items() if k in {f.name for f in dataclasses.fields(SubsetsConfig)}}
    _refuse_selection_flags(cfg, old, old_dir)
    settings.update(pool=abs_path(cfg.pool), output=cfg.output, update=old_dir, master=cfg.master, spark_conf=cfg.spark_conf,
                    spark_above=cfg.spark_above)
    if cfg.allow_short:  # a takedown can leave a scale short of its target; the report then shows its size
        settings["allow_short"] = True
    new = SubsetsConfig.from_dict(settings, where=path)
    old_pool = load_pool(old["pool"])
    if old_pool.sha256 not in [sha for _, _, sha in pool_chain(new.pool)]:
        raise SubsetError(f"--pool {new.pool} does not descend from {old['pool']} (the pool --update's subsets were cut from, "
                          f"sha256 {old_pool.sha256}); give the pool that `laiontools takedown` made from it")
    for label, _ in new.targets():  # what write_update_report reads of the old run, checked before anything is written
        mpath = join(old_dir, layout.subset_manifest(label))
        old_m = read_manifest(mpath)
        sel = old_m.get("selection")
        if not isinstance(sel, dict) or isinstance(sel.get("eligible"), bool) or not isinstance(sel.get("eligible"), int):
            raise SubsetError(f"--update {old_dir}: {mpath} has no selection.eligible count (edited, or not written by "
                              "`laiontools subsets`); give an unedited subsets output folder")
        upath = join(old_dir, layout.subset_uids(label))
        fs, p = url_to_fs(upath)
        if not fs.exists(p):
            raise InputError(f"--update {old_dir}: its uid file {upath} is missing; give an unedited subsets output folder")
        # an exclusion list rewritten since (dedup run again into its folder) would change the selection while
        # every check still passes: the new subsets must exclude what the old ones did
        for ex in sel.get("exclusions") or []:
            if not isinstance(ex, dict) or not ex.get("path") or not ex.get("sha256"):
                continue
            efs, ep = url_to_fs(ex["path"])
            now = sha256_file(ex["path"])[0] if efs.exists(ep) else None
            if now != ex["sha256"]:
                raise SubsetError(
                    f"--update {old_dir}: the exclusion list {ex['path']} {'is gone' if now is None else 'changed'} since "
                    f"that run ({mpath} records sha256 {ex['sha256']}{'' if now is None else f', it is now {now}'}); "
                    "the old selection cannot be re-derived with it: restore it, or cut new subsets without --update"
                )
        # an old uid file changed by hand would fail the report's checks, which then blame the new subsets
        recorded = (old_m.get("uids") or {}).get("sha256")
        sha, _ = sha256_file(upath)
        if sha != recorded:
            raise SubsetError(f"--update {old_dir}: its uid file {upath} changed after that run (sha256 {sha}, {mpath} "
                              f"records {recorded}); the old subsets cannot be compared against: give an unedited subsets "
                              "output folder")
    return new


def _refuse_selection_flags(cfg: SubsetsConfig, old: dict[str, Any], old_dir: str) -> None:
    """--update re-derives the old run's selection: a selection flag given with it that differs from the old
    run's value would be dropped (a --seed 5 gave seed 0's subsets, exit 0). --allow-short is honoured."""
    defaults = {f.name: (f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default)
                for f in dataclasses.fields(SubsetsConfig)}

    def same(a: Any, b: Any) -> bool:
        return a == b or str(a) == str(b)

    flags = ("scales", "seed", "scale_factor", "scores", "exclude", *_FILTER_KEYS)
    given = [n for n in flags if not same(getattr(cfg, n), defaults[n]) and not same(getattr(cfg, n), old.get(n))]
    if given:
        raise ConfigError(
            f"--update re-derives {old_dir}'s subsets with that run's own selection; "
            + ", ".join(f"--{n.replace('_', '-')} {getattr(cfg, n)!r} (that run: {old.get(n)!r})" for n in given)
            + " cannot be given with it: leave them out (--allow-short may be), or cut new subsets without --update"
        )


def _same_dir(a: str, b: str) -> bool:
    """True when two absolute paths (or URLs) name the same folder: normalized, symlinks resolved for local ones."""
    import os

    if "://" in a or "://" in b:
        return a.rstrip("/") == b.rstrip("/")
    return os.path.realpath(a) == os.path.realpath(b)


def write_update_report(cfg: SubsetsConfig, results: list[dict[str, Any]]) -> dict[str, Any]:
    """<output>/<L>.diff.json per scale and update.json / update.txt: what changed against the old run and
    the checks of :func:`laiontools.contracts.lineage.subset_diff`; ``ok`` is False when one fails."""
    from laiontools.contracts.lineage import subset_diff, taken_down

    old_dir, out = abs_path(cfg.update or ""), abs_path(cfg.output)
    old_settings = read_json(join(old_dir, layout.SETTINGS_JSON))
    old_pool, new_pool = load_pool(old_settings["pool"]), load_pool(cfg.pool)
    gone = taken_down((old_pool.path, old_pool.manifest), (new_pool.path, new_pool.manifest))
    rows, larger = [], None
    for r in results:  # largest first
        label = r["scale"]
        old_m = read_manifest(join(old_dir, layout.subset_manifest(label)))
        new_m = read_manifest(r["manifest"])
        # (the uid files by path: read in pieces, not held, but for the rank checks RANK_CHECK_MAX bounds)
        old_u, new_u = join(old_dir, layout.subset_uids(label)), join(out, layout.subset_uids(label))
        d = subset_diff(old_u, new_u, gone, int(cfg.seed or 0), target=int(r["target"]),
                        eligible=int(new_m["selection"]["eligible"]), larger_new=larger,
                        old_cut=old_m["selection"].get("cut"),
                        between_cuts=(new_m["selection"].get("cut"), r.get("eligible_between_cuts")) if larger is None else None)
        larger = new_u
        d = {"scale": label, "old": {"manifest": join(old_dir, layout.subset_manifest(label)), "sha256": old_m["uids"]["sha256"],
                                     "eligible": old_m["selection"]["eligible"]},
             "new": {"manifest": r["manifest"], "sha256": new_m["uids"]["sha256"], "eligible": new_m["selection"]["eligible"]}, **d}
        write_json(join(out, layout.subset_diff(label)), d)
        rows.append(d)
    report = {"old": old_dir, "old_pool": {"path": old_pool.path, "sha256": old_pool.sha256},
              "new_pool": {"path": new_pool.path, "sha256": new_pool.sha256}, "taken_down": len(gone),
              "scales": [{"scale": d["scale"], **d["counts"], "ok": d["ok"],
                          "failed_checks": [k for k, v in d["checks"].items() if not v]} for d in rows],
              "ok": all(d["ok"] for d in rows)}
    lines = [f"subsets --update: {len(gone):,} sample(s) taken down between {old_pool.path} and {new_pool.path}",
             table([{"scale": s["scale"], "old": f"{s['old']:,}", "new": f"{s['new']:,}", "removed": f"{s['removed']:,}",
                     "added (next in rank)": f"{s['added']:,}", "checks": "ok" if s["ok"] else "FAILED " + ",".join(s["failed_checks"])}
                    for s in report["scales"]])]
    report["text"] = "\n".join(lines)
    write_json(join(out, layout.SUBSETS_UPDATE_JSON), report)
    atomic_write_bytes(join(out, layout.SUBSETS_UPDATE_TXT), (report["text"] + "\n").encode())
    return report


# The settings that decide what a subsets folder holds (not how it is computed: master, partitions, ...).
_FILTER_KEYS = ("min_clip_score", "max_punsafe", "max_pwatermark", "min_image_side", "max_aspect_ratio",
                "min_caption_length", "max_caption_length")


def _selection_identity(d: dict[str, Any]) -> dict[str, Any]:
    """The selection a subsets settings dict (settings.json, or a config's ``to_dict()``) asks for: paths
    made absolute, scales as the (label, count) targets they give."""
    def path(v: Any) -> Any:
        return abs_path(v) if isinstance(v, str) and v else v

    try:
        targets: Any = [list(t) for t in parse_scales(d.get("scales") or "", float(d.get("scale_factor") or 1.0))]
    except (ConfigError, TypeError, ValueError):
        targets = d.get("scales")
    exclude = d.get("exclude") or []
    return {"pool": path(d.get("pool")), "scales": targets, "seed": d.get("seed"), "allow_short": bool(d.get("allow_short")),
            "scores": path(d.get("scores")), "exclude": [path(e) for e in ([exclude] if isinstance(exclude, str) else exclude)],
            "update": path(d.get("update")), **{k: d.get(k) for k in _FILTER_KEYS}}


def _check_same_selection(cfg: SubsetsConfig, output: str) -> None:
    """Refuse an output folder that holds subsets (manifests or uid files) made with other selection settings:
    this run would rewrite only its own scales' files, leaving the others (of another seed: no longer nested
    in the new ones) beside them, under a settings.json that describes only the new run. A folder whose
    earlier run stopped before writing any subset (e.g. refused as short) is reused."""
    prev_path = join(output, layout.SETTINGS_JSON)
    fs, p = url_to_fs(prev_path)
    if not fs.exists(p):
        return
    held = [f for f in fs.ls(url_to_fs(output)[1], detail=False) if f.endswith((".manifest.json", ".uids.npy"))]
    if not held:
        return
    prev = read_json(prev_path)
    old, new = _selection_identity(prev), _selection_identity(cfg.to_dict())
    diff = changed_settings(old, new, list(new))
    if prev.get("stage") == "subsets" and diff:
        raise SubsetError(
            f"{output} holds subsets made with other settings ({diff}); a run into it would leave them beside "
            "the new ones: give a new --output (or delete the folder to replace them; `subsets --update` re-derives "
            "old subsets on a new pool)"
        )


def _select(cfg: SubsetsConfig, spark: Any, pool: PoolInfo,
            footers: Callable[[], list[tuple[str, int, Any]]] | None = None) -> list[dict[str, Any]]:
    """The subsets of `pool` (:func:`load_pool` of ``cfg.pool``, read by the caller), on `spark`
    (:class:`_SparkSelection`, its catalog footers from `footers` when given) or, when None, in this
    process (:class:`_LocalSelection`); one summary row per scale, largest first."""
    targets = cfg.targets()
    output = abs_path(cfg.output)
    ensure_output_dir(output)
    _check_same_selection(cfg, output)
    write_record(join(output, layout.SETTINGS_JSON), {"stage": "subsets", **cfg.to_dict()})
    exclusions = [load_exclusion(e, pool, spark) for e in cfg.exclude]
    eng: Any = (_SparkSelection(cfg, spark, pool, exclusions, footers() if footers is not None else None) if spark is not None
                else _LocalSelection(cfg, pool, exclusions))
    for ex in exclusions:
        ex.held = None  # flagged (in process) or read by Spark's tasks: not held for the rest of the run
    try:
        scores_record = eng.scores_record
        if cfg.scores and cfg.min_clip_score is None:
            log.warning("--scores given without --min-clip-score: scores used only to leave out samples embed could not decode")
        steps = _filter_steps(cfg, scores_record is not None, exclusions)
        rows, removed_by_step, n_elig = eng.funnel(steps)
        funnel: list[dict[str, Any]] = [{"step": "catalog rows", "removed": 0, "remaining": rows}]
        remaining = rows
        for (name, _, _), removed in zip(steps, removed_by_step):
            remaining -= removed
            funnel.append({"step": name, "removed": removed, "remaining": remaining})
        if remaining != n_elig:
            funnel.append({"step": "duplicate uid", "removed": remaining - n_elig, "remaining": n_elig})
        funnel.append({"step": "eligible", "removed": 0, "remaining": n_elig})

        short = [(lab, t) for lab, t in targets if t > n_elig]
        if short and not cfg.allow_short:
            lines = ", ".join(f"{lab}: requested {t:,}, available {n_elig:,}" for lab, t in short)
            # which filter took the samples (e.g. --max-punsafe on a pool whose profile has no punsafe column)
            took = "; ".join(f"{f['step']} {f['removed']:,}" for f in funnel if f["removed"])
            raise SubsetError(
                f"not enough eligible samples in {pool.path} for {lines} (of {rows:,} catalog rows, "
                f"removed: {took or 'none'}). Lower the scale (--scale-factor), relax the "
                "filters, or pass --allow-short to write short subsets (recorded as short in their manifests)"
            )
        obtained = {lab: min(t, n_elig) for lab, t in targets}
        t0 = time.monotonic()
        cuts = eng.cuts(sorted({n for n in obtained.values() if n > 0}))
        log.info("subsets: cuts found in %.1fs", time.monotonic() - t0)

        selection_base = {
            "seed": cfg.seed,
            "scale_factor": float(cfg.scale_factor),
            "method": HASH_SPEC,
            "filters": {**cfg.filters(), "clip_score_source": scores_record},
            "funnel": funnel,
            "exclusions": [e.record() for e in exclusions],
            "eligible": n_elig,
        }
        results: list[dict[str, Any]] = []
        parent: dict[str, Any] = {"name": pool.manifest["name"], "sha256": pool.sha256, "path": pool.path}
        live = [lab for lab, _ in targets if obtained[lab] > 0]
        between: int | None = None  # (subsets --update) eligible uids ranking after the old largest cut, up to the new one
        sha_count: dict[str, tuple[str, int]] = {}
        if live:
            if cfg.update and live[0] == targets[0][0]:
                old = _old_cut(cfg, live[0])
                between = None if old is None else eng.between(old, cuts[obtained[live[0]]])
            t0 = time.monotonic()
            written = eng.write_uids([join(output, layout.subset_uids(lab)) for lab in live],
                                     [cuts[obtained[lab]] for lab in live], [obtained[lab] for lab in live])
            sha_count = dict(zip(live, written))
            log.info("subsets: %d selected uids sorted and written in %.1fs", obtained[live[0]], time.monotonic() - t0)
            t0 = time.monotonic()
            eng.write_spans(output, live, sha_count, pool)
            log.info("subsets: the subsets' sample spans written in %.1fs", time.monotonic() - t0)
        for label, target in targets:  # largest first: each smaller one's parent is the one before it
            uid_name = layout.subset_uids(label)
            if label in sha_count:
                sha, count = sha_count[label]
            else:
                from laiontools.contracts.uids import save_uids

                sha, count = save_uids(join(output, uid_name), np.zeros(0, dtype=UID_DTYPE))
            m = new_manifest(
                name=f"{pool.manifest['name']}.{label}",
                kind="subset",
                num_samples=count,
                target_samples=target,
                uids={"path": uid_name, "sha256": sha, "count": count},
                shards=[],
                source_fingerprint=pool.fingerprint,
                parent=parent,
                selection={**selection_base, "scale": label,
                           # the last selected (score, uid): `subsets --update` checks the new picks rank after it
                           "cut": cut_record(*cuts[obtained[label]], signed=True) if count else None},
                command=canonical_command(cfg),
                pool={"name": pool.manifest["name"], "sha256": pool.sha256, "path": pool.path},
            )
            mpath = join(output, layout.subset_manifest(label))
            msha = write_manifest(mpath, m, run=eng.run_record)
            # After each scale's manifest: this one written, the next scale's (if any) not yet (kill tests widen it).
            failpoints.pause("subsets.manifest")
            parent = {"name": m["name"], "sha256": msha, "path": layout.subset_manifest(label)}
            results.append(
                {"scale": label, "target": target, "obtained": count, "short": count < target, "manifest": mpath, "sha256": msha}
            )
            if cfg.update and label == targets[0][0]:
                results[-1]["eligible_between_cuts"] = between
    finally:
        eng.close()
    return results


def summary_text(results: list[dict[str, Any]], funnel: list[dict[str, Any]]) -> str:
    rows = [{"step": f["step"], "removed": f"{f['removed']:,}", "remaining": f"{f['remaining']:,}"} for f in funnel]
    srows = [
        {
            "scale": r["scale"],
            "target": f"{r['target']:,}",
            "obtained": f"{r['obtained']:,}",
            "short": "SHORT" if r["short"] else "",
            "manifest": r["manifest"],
        }
        for r in results
    ]
    return "selection funnel\n" + table(rows) + "\n\nsubsets (nested, largest first)\n" + table(srows)


def build_parser() -> argparse.ArgumentParser:
    p = config_parser(
        SubsetsConfig, prog="laiontools subsets", skip=("seed", "scale_factor"),
        description="Filters + dedup exclusions + seeded nested subsets (80M ⊂ 400M ⊂ 2B) with manifests (Spark; in "
                    "this process for catalogs of up to --spark-above rows).",
    )
    # Parsed by the config, not argparse, so a bad value gets the same clear message as from YAML.
    p.add_argument("--seed", dest="seed", default=argparse.SUPPRESS, help="selection seed, a whole number (required)")
    p.add_argument("--scale-factor", dest="scale_factor", default=argparse.SUPPRESS, help="multiply every scale (e.g. 1e-6)")
    return p


def _parse_factor(text: str) -> float:
    try:
        return float(text)
    except ValueError:
        raise ConfigError(f"--scale-factor {text!r} is not a number; give e.g. --scale-factor 1e-6") from None


def main(argv: list[str] | None = None) -> int:
    from laiontools.core.stage import stage_main

    return stage_main(__name__, argv)
