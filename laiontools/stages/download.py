"""download: source metadata -> webdataset pool + catalog + pool manifest + report (Spark + img2dataset).

``laiontools download --input <src> --output <pool>`` runs prepare (Spark), then img2dataset's own
Reader / Resizer / Downloader under its pyspark distributor (HTTP, decoding, resizing, tar
writing), then builds the catalog, the uid file, the manifest and the report from what
img2dataset wrote. ``spark-submit jobs/download.py ...`` runs the same function on a cluster.

Engines: a source of at most ``--spark-above`` rows (estimated from the files; default 1M) with no
master named and not under spark-submit runs without Spark: prepare and the catalog on Arrow in this
process, the download shards in forked processes (one per core, :func:`local_distributor`) with the
same downloader, politeness and limits. The files, their completion markers and so the resume points
are the same on both engines (tests/test_download.py compares them); only the report's ``engine``
field says which ran. Spark's fixed cost (JVM, Python workers, a dozen jobs) was 15-25 s a run,
longer than the whole download of 10,000 images on 2 cores (BENCHMARKS.md).

Resume: every step is restartable. prepare is done when its marker exists; a download shard is
done when img2dataset's ``<shard>_stats.json`` (written after the tar and parquet are closed) is
present and parses — anything else of a shard is deleted and redone; the catalog, uid file and
manifest are rebuilt from complete shards only, so a killed run re-run with the same command ends
with the same catalog and manifest as an uninterrupted one.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import math
import re
import sys
import time
from typing import Any

from laiontools.contracts import layout
from laiontools.contracts import schema as C
from laiontools.contracts.pool import CATALOG_ROWS_PER_FILE
from laiontools.core.config import ConfigError
from laiontools.core.errors import UserError
from laiontools.core.images import MAX_IMAGE_PIXELS
from laiontools.core.redact import redact
from laiontools.core.spark import shuffle_partitions
from laiontools.core.stage import RUNTIME_SETTINGS, StageResult, Tasks, stage_entry, stage_spark, wants_spark
from laiontools.core.storage import (
    PARQUET_CODEC,
    PARQUET_READ,
    PARQUET_WRITE,
    atomic_write_bytes,
    ensure_output_dir,
    glob_literal,
    is_done,
    is_local,
    join,
    map_reads,
    mark_done,
    marker_path,
    move_tree,
    path_key,
    read_json,
    read_marker,
    repair_swap,
    rm_path,
    scheme_of,
    sha256_file,
    spark_parquet_codec,
    spark_read_parquet,
    spark_write_parquet,
    still_missing,
    store_refusal,
    swap_in,
    swap_temp,
    url_to_fs,
    write_json,
    write_parquet_dir,
    write_record,
)
from laiontools.stages import prepare
from laiontools.stages.prepare import PrepareConfig, prepared_type

log = logging.getLogger(__name__)

IMG2DATASET_STATUS = {"success": C.STATUS_SUCCESS, "failed_to_download": C.STATUS_FAILED_DOWNLOAD,
                      "failed_to_resize": C.STATUS_FAILED_RESIZE}
# Settings that do not change the result: a re-run may differ in them.
_RUNTIME_ONLY = {"retry_failed", "thread_count", "subjob_size", "max_shard_retry", "blocklist_timeout", *RUNTIME_SETTINGS}


@dataclasses.dataclass
class DownloadConfig(PrepareConfig):
    name: str = dataclasses.field(default="pool", metadata={"help": "pool name written in the manifest"})
    image_size: int = dataclasses.field(default=256, metadata={"help": "img2dataset image_size"})
    resize_mode: str = dataclasses.field(default="border", metadata={"help": "no | border | keep_ratio | keep_ratio_largest | center_crop"})
    resize_only_if_bigger: bool = dataclasses.field(default=False, metadata={"help": "only downscale"})
    encode_format: str = dataclasses.field(default="jpg", metadata={"help": "jpg | png | webp"})
    encode_quality: int | None = dataclasses.field(default=None, metadata={"help": "encoder quality: jpg 0..100, webp 1..100 (default 95); png: zlib compression level 0..9 (default 6)"})
    skip_reencode: bool = dataclasses.field(default=False, metadata={"help": "keep original bytes when no resize is needed"})
    timeout: int = dataclasses.field(default=10, metadata={"help": "per-request timeout in seconds"})
    retries: int = dataclasses.field(default=2, metadata={"help": "retries for transient failures (timeout, reset, 429, 5xx), with backoff"})
    thread_count: int = dataclasses.field(default=64, metadata={"help": "download threads per Spark task"})
    subjob_size: int = dataclasses.field(default=1000, metadata={"help": "shards per Spark job"})
    max_shard_retry: int = dataclasses.field(default=1, metadata={"help": "times a failed shard is re-run"})
    extract_exif: bool = dataclasses.field(default=True, metadata={"help": "store EXIF in the metadata"})
    min_image_size: int = dataclasses.field(default=0, metadata={"help": "reject images with a smaller side"})
    max_aspect_ratio: float | None = dataclasses.field(default=None, metadata={"help": "reject images with a larger aspect ratio (default: no limit)"})
    max_image_pixels: int = dataclasses.field(default=MAX_IMAGE_PIXELS, metadata={"help": "reject images with more pixels (read from the header, before decoding)"})
    max_bytes: int = dataclasses.field(default=20 * 1024 * 1024, metadata={"help": "reject responses larger than this"})
    respect_optouts: bool = dataclasses.field(default=True, metadata={"help": "honour X-Robots-Tag noai/noimageai/noindex/noimageindex"})
    respect_tdm_reservation: bool = dataclasses.field(default=True, metadata={"help": "honour the TDM Reservation Protocol header tdm-reservation: 1"})
    user_agent_token: str | None = dataclasses.field(default=None, metadata={"help": "token in the User-Agent, matched by X-Robots-Tag"})
    respect_robots: bool = dataclasses.field(default=True, metadata={"help": "fetch each host's robots.txt once per executor (cached 1 h) and skip what it disallows for --user-agent-token (or *), keeping its Crawl-delay between requests to the host (the stricter of it and --max-host-rps); 4xx robots.txt: all allowed, 5xx/timeout: host skipped for now (retried by --retry-failed)"})
    max_crawl_delay: float = dataclasses.field(default=30.0, metadata={"help": "a host whose robots.txt asks a longer Crawl-delay (seconds) than this is skipped: its rows end failed_download naming the delay, with no request sent (0: keep any delay, however long)"})
    max_host_rps: float | None = dataclasses.field(default=None, metadata={"help": "requests per second per host, per executor (a 429/503 Retry-After pauses the host for the whole executor either way)"})
    max_host_concurrency: int | None = dataclasses.field(default=None, metadata={"help": "requests in flight per host, per executor"})
    request_deadline: float = dataclasses.field(default=60.0, metadata={"help": "seconds one request may take in all (redirects, headers and body); --timeout bounds each socket operation"})
    shard_deadline: float | None = dataclasses.field(default=1800.0, metadata={"help": "seconds a shard's fetches may take; rows not fetched by then end failed_download with reason 'deadline' (0: no limit)"})
    retry_failed: bool = dataclasses.field(default=False, metadata={"help": "retry pass: re-attempt only rows that failed with transient errors, into new shards"})
    fast_decode: bool = dataclasses.field(default=True, metadata={"help": "decode JPEGs at 1/2, 1/4 or 1/8 scale in libjpeg when still >= the output size (same output size, several times less decode+resize CPU, slightly different pixels); --no-fast-decode: img2dataset's full-size decode"})

    def validate(self) -> None:
        super().validate()
        if self.image_size < 8:
            raise ConfigError(f"image_size {self.image_size} is too small (>= 8)")
        if self.resize_mode not in ("no", "border", "keep_ratio", "keep_ratio_largest", "center_crop"):
            raise ConfigError(f"unknown resize_mode {self.resize_mode!r}")
        if self.encode_format not in ("jpg", "png", "webp"):
            raise ConfigError(f"unknown encode_format {self.encode_format!r}")
        # png's value is a compression level (img2dataset's resizer refuses anything outside 0..9, in every
        # task: with jpg's default of 95 a png download failed there); the default follows the format.
        if self.encode_quality is None:
            self.encode_quality = 6 if self.encode_format == "png" else 95
        lo, hi = {"jpg": (0, 100), "webp": (1, 100), "png": (0, 9)}[self.encode_format]
        if not lo <= self.encode_quality <= hi:
            what = " (the zlib compression level)" if self.encode_format == "png" else ""
            raise ConfigError(f"encode_quality {self.encode_quality} is out of range for {self.encode_format} ({lo}..{hi}){what}")
        if self.timeout < 1 or self.retries < 0 or self.thread_count < 1:
            raise ConfigError("timeout must be >= 1, retries >= 0, thread_count >= 1")
        if self.request_deadline <= 0 or (self.shard_deadline is not None and self.shard_deadline < 0):
            raise ConfigError("request_deadline must be > 0 and shard_deadline >= 0 (0: no shard deadline)")
        if not self.max_crawl_delay >= 0:
            raise ConfigError(f"max_crawl_delay must be >= 0 (0: no limit), got {self.max_crawl_delay}")
        if self.max_bytes < 1 or self.max_image_pixels < 1:  # 0 refused every image, as "over the limit"
            raise ConfigError(f"max_bytes and max_image_pixels must be >= 1, got {self.max_bytes} and {self.max_image_pixels}")
        if (self.max_host_rps is not None and self.max_host_rps <= 0) or (
                self.max_host_concurrency is not None and self.max_host_concurrency < 1):
            raise ConfigError("max_host_rps must be > 0 and max_host_concurrency >= 1 (leave them unset for no limit)")
        check_img2dataset_output(self.output)

    def semantic(self) -> dict[str, Any]:
        d = {k: v for k, v in self.to_dict().items() if k not in _RUNTIME_ONLY}
        d["output"] = None  # the same pool may be moved
        return json.loads(json.dumps(d, default=str))


# ----------------------------------------------------------------------------- output folder checks


def check_img2dataset_output(output: str) -> None:
    """Refuse a pool folder off the local file system whose path holds ``[``, ``*`` or ``?``.

    img2dataset's downloader ends each shard with ``fs.rm(<output>/shards/_tmp/<shard>.feather)``, and an
    object store's fsspec ``rm`` expands a path holding those characters as a pattern: under
    ``s3://b/run[1]/`` it would delete ``s3://b/run1/``'s file of that name (another run's pending shard
    input), or find none and fail the shard after its files were written. That call is inside
    img2dataset and cannot be given a literal path, so such a folder is refused before anything is
    written. Local folders are fine (their ``rm`` takes the path as written; the rest of the download
    lists and reads its files itself, see :func:`run_img2dataset`)."""
    if scheme_of(output) == "file":
        return
    ch = next((c for c in output if c in "[*?"), None)
    if ch is not None:
        raise ConfigError(f"--output {output}: `{ch}` in a pool folder on an object store is read as a pattern by "
                          "img2dataset's downloader (its removal of each shard's temporary input file would act "
                          "on other folders' files); rename the folder without [ * ?")


def check_output(cfg: DownloadConfig) -> None:
    """Refuse a pool made with other settings (a folder that is not a pool at all was already refused
    by the output rule of core/stage.py before this runs)."""
    ensure_output_dir(cfg.output)
    settings_path = join(cfg.output, layout.SETTINGS_JSON)
    if not url_to_fs(settings_path)[0].exists(url_to_fs(settings_path)[1]):
        return  # a run stopped before it wrote its settings: nothing to compare
    old = read_json(settings_path)
    old.setdefault("max_host_shards", 0)  # pools from before the setting: rows in input order, no host bound
    # Pools from before --max-crawl-delay are continued (or retried) under its default: it changes only how a
    # host asking a Crawl-delay over 30 s ends (at once, naming the delay; before: at the shard deadline).
    old.setdefault("max_crawl_delay", DownloadConfig.max_crawl_delay)
    if isinstance(old.get("allow_networks"), list):  # pools from before entries were canonical: 127.0.0.1/8 as typed
        with contextlib.suppress(ConfigError):
            old["allow_networks"] = prepare.canonical_networks(old["allow_networks"])
    new = redact(cfg.semantic())  # as recorded: without credentials
    diff = sorted(k for k in set(old) | set(new) if old.get(k) != new.get(k))
    if diff:
        detail = ", ".join(f"{k}: {old.get(k)!r} -> {new.get(k)!r}" for k in diff[:6])
        raise UserError(
            f"output folder {cfg.output} holds a pool made with other settings ({detail}); re-run with the same "
            f"settings to resume, or give a new folder (nothing in it was touched)"
        )


# ----------------------------------------------------------------------------- shards


def _attempt_dirs(cfg: DownloadConfig) -> list[tuple[int, str, str]]:
    """(attempt number, shard folder, prepared input folder) of the first pass and every retry pass."""
    shards = join(cfg.output, layout.SHARDS_DIR)
    prep = join(cfg.output, layout.PREPARED_DIR)
    out = [(0, shards, join(prep, "accepted"))]
    fs, p = url_to_fs(prep)
    if fs.exists(p):
        for d in sorted(fs.ls(p, detail=False)):
            m = re.search(r"retry-(\d+)$", d.rstrip("/"))
            if m:
                n = int(m.group(1))
                out.append((n, join(shards, f"retry{n:02d}"), join(prep, f"retry-{n:02d}")))
    return out


def _unfolded_passes(attempts: list[tuple[int, str, str]]) -> list[str]:
    """Shard folders of the retry passes that are complete but not yet in the catalog: their ``_pass``
    marker says ``folded: false`` until a finalize after them has finished (markers from before this
    field: folded)."""
    out = []
    for a, shard_dir, _ in attempts:
        if a > 0 and (read_marker(join(shard_dir, "_pass")) or {}).get("folded") is False:
            out.append(shard_dir)
    return out


def _clean_incomplete_shards(shard_dir: str) -> None:
    """Delete every shard file that lacks a valid ``_stats.json`` and stats that don't parse.

    img2dataset treats any ``*_stats.json`` as done; a kill while writing one leaves it truncated.

    One detailed listing of the folder gives every file's name and type: whether a shard's tar and
    parquet exist is read from it, not asked per shard. The stats files are parsed, up to
    MARKER_READS_AT_ONCE at once, only for shards without a completion marker (``<shard>.tar.done``):
    :func:`_shard_info_task` writes a marker only after it parsed that shard's stats (and hashed its
    tar), and a shard is never written again while its marker is there (this cleanup removes a
    broken shard's stats file first and its marker with its other files; a shard whose stats file
    exists is not handed to img2dataset again). Asked shard by shard (an exists for the tar and the
    parquet, a read of the stats, then an isfile per listed file), a 2B pool's ~230k shards made
    ~1.6M requests in turn at the start of every pass and resume: hours on an object store."""
    fs, p = url_to_fs(shard_dir)
    if not fs.exists(p):
        return
    files, names, sizes = {}, set(), {}  # the files: name -> path, in listing order; every entry's name
    for e in fs.ls(p, detail=True):
        name = e["name"].rstrip("/").rsplit("/", 1)[-1]
        names.add(name)  # a tar or parquet counts as there as fs.exists said: whatever its type
        if e.get("type") == "file":
            files[name], sizes[name] = e["name"], e.get("size")
    stats = sorted(n for n in files if n.endswith("_stats.json"))
    sids = [n.split("_")[0] for n in stats]
    to_parse = [(files[n], sizes[n]) for n, sid in zip(stats, sids) if marker_path(f"{sid}.tar") not in files]
    parsed = dict(zip((f for f, _ in to_parse), _stats_parse(fs, to_parse)))
    done, broken = set(), []
    for n, sid in zip(stats, sids):
        if parsed.get(files[n], True) and f"{sid}.tar" in names and f"{sid}.parquet" in names:
            done.add(sid)
            continue
        log.warning("shard %s/%s has a broken stats file; it will be downloaded again", shard_dir, sid)
        broken.append(n)
    if broken:
        rm_path(fs, [files.pop(n) for n in broken])  # the stats first: without them the shard is not done
    drop = []
    for name, f in files.items():
        sid = name.split(".")[0].split("_")[0]
        if sid.isdigit() and sid not in done:
            log.info("removing incomplete shard file %s", f)
            drop.append(f)
    if drop:
        rm_path(fs, drop)


def _stats_parse(fs: Any, files: list[tuple[str, int | None]]) -> list[bool]:
    """Whether each stats file (path, size from the listing) parses as JSON, in order, up to
    MARKER_READS_AT_ONCE read at once. Each is one GET of its listed bytes (``open``, or ``cat_file``
    without a range, first asks an object store for the object's size: two requests); an empty one
    (a kill as it was opened) is not read (a range read of no bytes is refused by S3)."""

    def ok(item: tuple[str, int | None]) -> bool:
        path, size = item
        try:
            json.loads(fs.cat_file(path, start=0, end=size) if size != 0 else b"")
            return True
        except ValueError:
            return False

    if is_local(fs):  # (a local read waits on no network: threads only add their cost)
        return [ok(q) for q in files]
    return map_reads(ok, files, "stats")


def host_shares(prep_stats: dict[str, Any], cfg: DownloadConfig, tasks_at_once: int) -> tuple[tuple[str, int], ...]:
    """(host, d) for the hosts whose rows prepare had to put in more than H = ``--max-host-shards``
    shards (m of them): up to min(m, tasks_at_once) download tasks fetch such a host at once, so each
    keeps 1/d of the per-executor limits, d = ceil(min(m, tasks_at_once) / H). Every host then sees at
    most H × ``--max-host-rps`` requests per second (and about H × ``--max-host-concurrency`` in
    flight: a task keeps at least one) across the cluster, as the hosts inside the bound do.
    `tasks_at_once`: Spark's default parallelism (the cores of the executors it knows now; with
    dynamic allocation, set ``spark.default.parallelism`` to the most it may run)."""
    over = (prep_stats.get("host_layout") or {}).get("hosts_over_bound") or {}
    h = max(1, int(cfg.max_host_shards or 1))
    out = []
    for host, m in sorted(over.items()):
        d = -(-min(int(m), max(1, int(tasks_at_once))) // h)
        if d > 1:
            out.append((host, d))
    return tuple(out)


def local_distributor(processes: int, downloader: Any, reader: Any, _subjob_size: int, max_shard_retry: int) -> None:
    """img2dataset's distributor contract, in this process's forked children: each download shard runs
    ``downloader`` in one of `processes` processes (forked, so nothing is imported again or pickled on
    the way in), as a Spark task would; failed shards are re-run up to `max_shard_retry` times.
    What a shard writes and when it counts as done are the downloader's, as on Spark."""

    def run(shards: list[Any]) -> list[Any]:
        results = Tasks(None, workers=processes).map(lambda it: [_shard_quietly(downloader, row) for row in it], shards,
                                                     processes=True, description="download")
        return [row for ok, row in results if ok is False]

    failed = run(list(reader))
    for i in range(max_shard_retry):
        if not failed:
            break
        log.info("retrying %d failed download shard(s), try %d", len(failed), i + 1)
        failed = run(failed)
    if failed:
        log.warning("%d download shard(s) still failed after %d retries; re-run the same command to retry them",
                    len(failed), max_shard_retry)


def _shard_quietly(downloader: Any, row: Any) -> tuple[bool, Any]:
    """``downloader(row)`` in a download process with its stderr (file descriptor 2: img2dataset's
    ``traceback.print_exc`` for every failed sample and shard, and the logs) kept in a temporary file,
    as a Spark executor keeps it in its own log: the CLI's stderr then holds one line per failed shard,
    and every failed row's reason is in the catalog anyway. The whole text goes to the DEBUG log."""
    import io
    import os
    import tempfile

    try:
        tmp = tempfile.TemporaryFile()  # noqa: SIM115 - the `with tmp:` below closes it
    except OSError:
        return downloader(row)
    with tmp:
        sys.stderr.flush()
        saved = os.dup(2)
        os.dup2(tmp.fileno(), 2)
        # Python-level writes too (sys.stderr need not be descriptor 2, e.g. under a capturing harness)
        text_err = io.TextIOWrapper(os.fdopen(os.dup(tmp.fileno()), "wb"), encoding="utf-8", errors="replace",
                                    line_buffering=True)
        try:
            with contextlib.redirect_stderr(text_err):
                ok, out = downloader(row)
        finally:
            try:
                text_err.flush()
                sys.stderr.flush()
            except OSError:
                pass
            text_err.close()
            os.dup2(saved, 2)
            os.close(saved)
        tmp.seek(0)
        text = tmp.read().decode("utf-8", "replace")
    lines = [ln for ln in text.splitlines() if ln.strip()]
    if ok is False:
        log.warning("download shard %s failed: %s", row[0], lines[-1] if lines else "no message")
    if lines:
        log.debug("img2dataset's output for download shard %s:\n%s", row[0], text)
    return ok, out


def run_img2dataset(cfg: DownloadConfig, input_dir: str, shard_dir: str, spark: Any) -> None:
    """Download the prepared rows in `input_dir` into `shard_dir` with img2dataset's components: its
    pyspark distributor on `spark`, or :func:`local_distributor` when `spark` is None."""
    import os

    os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")
    from img2dataset.distributor import pyspark_distributor
    from img2dataset.reader import Reader
    from img2dataset.writer import WebDatasetSampleWriter

    from laiontools.web.fetch import SHARD_ERROR_SUFFIX, FetchPolicy, PolicyDownloader
    from laiontools.web.resize import make_resizer, resize_params

    fs, sp = url_to_fs(shard_dir)
    fs.makedirs(sp, exist_ok=True)
    _clean_incomplete_shards(shard_dir)
    done_shards = {int(f.rsplit("/", 1)[-1].split("_")[0]) for f in fs.glob(glob_literal(sp) + "/*_stats.json")}
    fsi, ip = url_to_fs(input_dir)
    in_files: list[str] = []
    prep_stats = read_json(join(cfg.output, layout.PREPARED_DIR, layout.PREPARED_STATS_JSON))
    accepted = int(prep_stats.get("accepted", 0)) and input_dir.rstrip("/").endswith("/accepted")
    # the accepted files prepare wrote (a prepare before that count was recorded: at least one)
    expected = int(prep_stats.get("accepted_files") or 1) if accepted else 0

    def missing_now() -> list[str]:
        fsi.invalidate_cache(ip)  # (a listing cached before the tasks wrote would say none is there)
        in_files[:] = sorted(fsi.glob(glob_literal(ip) + "/*.parquet")) if fsi.exists(ip) else []
        return [input_dir] if len(in_files) < expected else []

    # (looked for again for a while, as reshard and embed look for their tasks' output: a shared file system's
    # client may answer from its caches)
    if missing_now() and still_missing(missing_now):
        # prepare's tasks wrote the rows they accepted (some, or all of them) where this process finds none:
        # executors writing the output path on their own disks (not a shared file system); was "nothing to
        # download", then a crash, or (some files seen) a pool silently without the other files' rows
        found = f"only {len(in_files)} of its {expected} files" if in_files else "no file"
        raise UserError(
            f"prepare accepted {int(prep_stats['accepted']):,} rows into {input_dir}, but the driver finds {found} there: "
            f"the executors wrote where the driver does not see; give an --output that every node sees (a shared "
            f"file system or an object store), or remove {cfg.output} and re-run"
        )
    if not in_files:
        log.info("nothing to download in %s", input_dir)
        return
    extra_cols = [c for c in prep_stats["download_columns"] if c not in (C.URL, C.CAPTION)]
    tmp_path = shard_dir.rstrip("/") + "/_tmp"
    fs.makedirs(url_to_fs(tmp_path)[1], exist_ok=True)
    for stale in fs.glob(glob_literal(url_to_fs(tmp_path)[1]) + "/*" + SHARD_ERROR_SUFFIX):  # a killed run's notes
        rm_path(fs, stale)
    tasks_at_once = spark.sparkContext.defaultParallelism if spark is not None else Tasks(None).workers
    # Given the folder, img2dataset's Reader globs "<folder>/*.parquet" with fsspec, which reads [ * ? in the
    # folder's path as a pattern: under a pool folder run[1]/ it read run1/'s prepared rows (another pool's)
    # into this pool's shards, or found no file. Given one file it takes the path as written; the files it
    # iterates (in shard-id order, as its own sorted glob gives them) are then the ones listed here.
    reader = Reader(join(input_dir, in_files[0].rsplit("/", 1)[-1]), "parquet", C.URL, C.CAPTION, None, None,
                    extra_cols, cfg.number_sample_per_shard, done_shards, tmp_path, 0)
    reader.input_files = in_files
    resizer = make_resizer(**resize_params(cfg.to_dict()))  # img2dataset's Resizer, or FastResizer with --fast-decode (default)
    policy = FetchPolicy(allow_private_network=cfg.allow_private_network, allow_networks=tuple(cfg.allow_networks),
                         max_bytes=cfg.max_bytes, max_image_pixels=cfg.max_image_pixels,
                         request_deadline=float(cfg.request_deadline), shard_deadline=cfg.shard_deadline or None,
                         respect_tdm=cfg.respect_tdm_reservation, respect_robots=cfg.respect_robots,
                         robots_user_agent=cfg.user_agent_token, max_crawl_delay=cfg.max_crawl_delay or None,
                         max_host_rps=cfg.max_host_rps,
                         max_host_concurrency=cfg.max_host_concurrency, blocklist=cfg.blocklist,
                         blocklist_timeout=cfg.blocklist_timeout,
                         host_shares=host_shares(prep_stats, cfg, tasks_at_once)
                         if (cfg.max_host_rps or cfg.max_host_concurrency) else ())
    directives = ["noai", "noimageai", "noindex", "noimageindex"] if cfg.respect_optouts else None
    downloader = PolicyDownloader(
        sample_writer_class=WebDatasetSampleWriter, resizer=resizer, thread_count=cfg.thread_count, save_caption=True,
        extract_exif=cfg.extract_exif, output_folder=shard_dir, column_list=reader.column_list, timeout=cfg.timeout,
        number_sample_per_shard=cfg.number_sample_per_shard, oom_shard_count=5, compute_hash="sha256",
        verify_hash_type=None, encode_format=cfg.encode_format, retries=cfg.retries,
        user_agent_token=cfg.user_agent_token, disallowed_header_directives=directives, policy=policy,
        error_folder=tmp_path,
    )
    n_todo = len(in_files)
    log.info("downloading from %s into %s (%d shard(s) already done)", input_dir, shard_dir, len(done_shards))
    t0 = time.time()
    distributor = pyspark_distributor if spark is not None else local_distributor
    # img2dataset prints its progress ("Sharding file number ...") to stdout, where the CLI prints
    # the pool's summary: send it to stderr with the logs (forked download processes inherit it)
    handed = _HandedOut(reader)
    with contextlib.redirect_stdout(sys.stderr):
        distributor(tasks_at_once, downloader, handed, cfg.subjob_size, cfg.max_shard_retry)
    log.info("img2dataset pass over %d input file(s) took %.1fs", n_todo, time.time() - t0)
    # img2dataset's distributors end with a shard that failed every retry as a printed line only, and the
    # catalog built next held none of its rows: a pool short of them, exit 0, every later stage building on
    # it. A shard is done when its stats file (written last) exists; one handed out without it stops here.
    done_now = {int(f.rsplit("/", 1)[-1].split("_")[0]) for f in fs.glob(glob_literal(sp) + "/*_stats.json")}
    failed = sorted(set(handed.ids) - done_now)
    causes = _shard_errors(tmp_path, failed, SHARD_ERROR_SUFFIX) if failed else []
    if fs.exists(url_to_fs(tmp_path)[1]):
        rm_path(fs, url_to_fs(tmp_path)[1], recursive=True)
    if failed:
        where = "the log above" if spark is None else "the Spark executors' logs"
        cause = f"; the cause: {'; '.join(causes)}" if causes else f"; the cause is in {where}"
        raise UserError(f"{len(failed)} download shard(s) of {shard_dir} failed after {cfg.max_shard_retry} "
                        f"retr{'y' if cfg.max_shard_retry == 1 else 'ies'} (ids {', '.join(map(str, failed[:10]))}"
                        f"{', ...' if len(failed) > 10 else ''}{cause}): no catalog or manifest is "
                        "written without their rows. Re-run the same command to retry them (finished shards are kept)")


def _shard_errors(tmp_path: str, failed: list[int], suffix: str, most: int = 3) -> list[str]:
    """The distinct messages (at most `most`) that the downloader noted for the `failed` shards
    (``PolicyDownloader._shard_failed``), each with the ids of the shards it stopped."""
    fs, tp = url_to_fs(tmp_path)
    by_msg: dict[str, list[int]] = {}
    try:
        noted = {f.rsplit("/", 1)[-1] for f in fs.glob(glob_literal(tp) + "/*" + suffix)}
    except OSError:
        return []
    for i in failed:
        name = f"{i}{suffix}"
        if name not in noted:
            continue
        try:
            with fs.open(f"{tp}/{name}", "rb") as f:
                msg = f.read(4000).decode("utf-8", "replace").strip()
        except OSError:
            continue
        if msg:
            by_msg.setdefault(msg, []).append(i)
    out = [f"shard(s) {', '.join(map(str, ids[:5]))}{', ...' if len(ids) > 5 else ''}: {msg}"
           for msg, ids in list(by_msg.items())[:most]]
    return out


class _HandedOut:
    """img2dataset's reader, noting the id of every shard it hands to the distributor (which yields
    them as it writes their inputs: the ids are known only as the pass goes)."""

    def __init__(self, reader: Any) -> None:
        self.reader, self.ids = reader, []

    def __iter__(self) -> Any:
        for row in self.reader:
            self.ids.append(int(row[0]))
            yield row


def complete_shards(cfg: DownloadConfig, tasks: Tasks | None = None) -> list[dict[str, Any]]:
    """Every complete shard of every attempt: attempt, shard id, paths, stats (sha256 cached in a marker).

    The driver lists each attempt's stats files (one listing); each shard's marker read, or its stats
    read and its tar hashed the first time, is a task on `tasks` (Spark executors; threads in process
    when None). Done in this process shard by shard, a 2B pool's first finalize read and hashed every tar
    (35-70 TB) through the driver, and every later one made two requests a shard (~230k shards) in turn."""
    items = []
    for attempt, shard_dir, _ in _attempt_dirs(cfg):
        fs, sp = url_to_fs(shard_dir)
        if not fs.exists(sp):
            continue
        for stats_file in sorted(fs.glob(glob_literal(sp) + "/*_stats.json")):
            num = stats_file.rsplit("/", 1)[-1].split("_")[0]
            items.append((attempt, shard_dir, num, cfg.output))
    if not items:
        return []
    out = (tasks or Tasks(None)).map(_shard_info_task, items, description="laiontools download: shard sha256 and stats")
    for s in out:
        if "error" in s:
            raise UserError(s["error"])
    return out


def _shard_info_task(items: Any) -> Any:
    """Tasks of :func:`complete_shards`: (attempt, shard folder, shard number, pool folder) -> the shard's
    entry, or {"error": message} for a damaged stats file."""
    for attempt, shard_dir, num, output in items:
        tar = join(shard_dir, f"{num}.tar")
        rel = tar[len(output.rstrip("/")) + 1:]
        info = read_marker(tar)
        if info is None:
            stats_file = join(shard_dir, f"{num}_stats.json")
            fs, sp = url_to_fs(stats_file)
            try:
                with fs.open(sp, "rb") as f:
                    stats = json.loads(f.read())
                int(stats["successes"]), int(stats["count"])
            except (ValueError, KeyError, TypeError) as e:
                # written in this run and cut short (a full disk): the next run's cleanup removes the
                # shard and downloads it again; listing it, or leaving it out, would be wrong now
                yield {"error": f"{sp}: the shard's stats file is damaged ({type(e).__name__}: {e}); "
                                f"re-run the same command: the shard will be downloaded again"}
                continue
            sha, nbytes = sha256_file(tar)
            info = {"sha256": sha, "bytes": nbytes, "num_samples": int(stats["successes"]), "count": int(stats["count"]),
                    "start_time": stats.get("start_time"), "end_time": stats.get("end_time"),
                    "status_dict": stats.get("status_dict", {})}
            mark_done(tar, info)
        yield {"attempt": attempt, "path": rel, "id": layout.shard_id(rel), "tar": tar,
               "parquet": join(shard_dir, f"{num}.parquet"), **info}


# ----------------------------------------------------------------------------- catalog, manifest, report


_SPANS_SCHEMA = "_sid string, _skey string, _toff long, _tlen long, _tsha string"


def shard_spans(batches: Any) -> Any:
    """mapInArrow: (shard id, tar url) rows -> (shard id, key, span offset, span length, span sha256) per
    sample whose members are adjacent (:func:`laiontools.wds.tarscan.sample_spans`). The sha256 of each
    span's bytes is what reshard checks every sample it copies against (a bit flipped in a stored
    payload is refused, not copied); it costs one sequential read of the tar just written (page cache)
    and sha256 of its bytes (about 1.8 GB per CPU-second measured here, SHA-NI). A tar that cannot be indexed yields no spans: its rows keep null spans
    and reshard indexes it (and names the damage). An object store's refusal is no damage: the task fails naming the
    tar and the store (re-run the same command), rather than leave spans out that an uninterrupted run has."""
    import hashlib
    import tarfile

    import pyarrow as pa

    from laiontools.wds.tarscan import sample_spans, tar_members

    schema = pa.schema([("_sid", pa.string()), ("_skey", pa.string()), ("_toff", pa.int64()), ("_tlen", pa.int64()),
                        ("_tsha", pa.string())])
    for batch in batches:
        d = batch.to_pydict()
        for sid, url in zip(d["_sid"], d["_tar"]):
            fs, p = url_to_fs(url)
            try:
                with fs.open(p, "rb") as f:
                    spans = sample_spans(tar_members(f, fs.size(p)))
                    keys = sorted(spans, key=lambda k: spans[k][0])  # file order: one forward pass
                    digests = []
                    for k in keys:
                        f.seek(spans[k][0])
                        data = f.read(spans[k][1])
                        if len(data) != spans[k][1]:
                            raise EOFError(f"{url}: sample {k} is cut short")
                        digests.append(hashlib.sha256(data).hexdigest())
            except (tarfile.TarError, OSError, EOFError) as e:
                refused = store_refusal(e, url)
                if refused is not None:  # not the tar's damage: its spans would be missing where a re-run has them
                    raise refused from e
                continue
            yield pa.RecordBatch.from_pydict(
                {"_sid": [sid] * len(keys), "_skey": keys, "_toff": [spans[k][0] for k in keys],
                 "_tlen": [spans[k][1] for k in keys], "_tsha": digests},
                schema=schema,
            )


def catalog_columns(cfg: DownloadConfig) -> list[tuple[str, str]]:
    """(name, Spark SQL type) of the pool's catalog: the catalog schema's columns, then the source's
    extra columns with their prepared types. Both engines write exactly these."""
    prep_stats = read_json(join(cfg.output, layout.PREPARED_DIR, layout.PREPARED_STATS_JSON))
    extras = [c for c in prep_stats["download_columns"] if c not in (C.URL, C.CAPTION, *C.SCORE_COLUMNS, C.UID, C.SOURCE_ID)]
    types = {c["name"]: {"string": "string", "int64": "bigint", "double": "double"}[c["type"]]
             for c in C.catalog_schema_doc()["columns"]}
    return [(c, types.get(c) or prepared_type(c)) for c in C.catalog_columns() + extras]


def build_catalog(cfg: DownloadConfig, shards: list[dict[str, Any]], spark: Any) -> Any:
    """Catalog DataFrame: prepared rejects + the latest attempt of every downloaded row."""
    from pyspark.sql import Window
    from pyspark.sql import functions as F

    columns = catalog_columns(cfg)

    def conform(df: Any) -> Any:
        cols = [(F.col(f"`{c}`") if c in df.columns else F.lit(None)).cast(t).alias(c) for c, t in columns]
        return df.select(*cols, "_attempt")

    parts = []
    rej_dir = join(cfg.output, layout.PREPARED_DIR, "rejected")
    rej = spark_read_parquet(spark, rej_dir).withColumn("_attempt", F.lit(-1))
    parts.append(conform(rej))
    if shards:
        # Which shard (and attempt) a row came from: Spark names the file a row was read from as a URI
        # (file:///..., s3a://..., hdfs://namenode/...), the shard list as fsspec URLs; both go through
        # storage.path_key so that every spelling of one file meets.
        # A small broadcast table rather than a map literal: a 2B pool has ~230k shard files, and a
        # literal with one entry each would bloat every query plan built on top of it.
        files = spark.createDataFrame([(path_key(s["parquet"]), s["id"], s["attempt"]) for s in shards],
                                      "_f string, _fsid string, _fatt int")
        dl = spark_read_parquet(spark, [s["parquet"] for s in shards], file_column="_f")
        dl = dl.join(F.broadcast(files), "_f", "left")
        dl = dl.withColumn(C.SHARD, F.col("_fsid")).withColumn("_attempt", F.col("_fatt"))
        status_map = F.create_map(*[x for k, v in IMG2DATASET_STATUS.items() for x in (F.lit(k), F.lit(v))])
        dl = dl.withColumn(C.STATUS, F.coalesce(status_map[F.col(C.STATUS)], F.col(C.STATUS)))
        dl = dl.withColumn(C.SHARD, F.when(F.col(C.STATUS) == C.STATUS_SUCCESS, F.col(C.SHARD)))
        dl = dl.withColumn(C.KEY, F.when(F.col(C.STATUS) == C.STATUS_SUCCESS, F.col(C.KEY)))
        # Where each sample's bytes lie in its tar (header of its first member .. end of its last),
        # read from the tar headers once here so reshard reads samples without indexing the tars.
        spans = (
            spark.createDataFrame([(s["id"], s["tar"]) for s in shards], "_sid string, _tar string")
            .repartition(max(1, min(len(shards), spark.sparkContext.defaultParallelism * 4)))
            .mapInArrow(shard_spans, _SPANS_SCHEMA)
        )
        dl = (dl.join(spans, (dl[C.SHARD] == spans["_sid"]) & (dl[C.KEY] == spans["_skey"]), "left")
              .withColumnRenamed("_toff", C.TAR_OFFSET).withColumnRenamed("_tlen", C.TAR_LENGTH)
              .withColumnRenamed("_tsha", C.TAR_SHA256))
        dl = conform(dl)
        w = Window.partitionBy(C.UID).orderBy(F.col("_attempt").desc())
        dl = dl.withColumn("_r", F.row_number().over(w)).where("_r = 1").drop("_r")
        parts.append(dl)
    cat = parts[0]
    for p in parts[1:]:
        cat = cat.unionByName(p)
    return cat.drop("_attempt")


def _catalog_tmp(cfg: DownloadConfig) -> str:
    """Where the catalog is written before :func:`_swap_catalog` (a killed finalize's leftovers removed:
    every finalize rebuilds the catalog whole)."""
    return swap_temp(join(cfg.output, layout.CATALOG_DIR))


def write_catalog(cat: Any, cfg: DownloadConfig) -> tuple[str, int]:
    """Write the catalog sorted by uid; swap it in atomically (old copy removed after)."""
    tmp = _catalog_tmp(cfg)
    n_rows = cat.count()
    n_parts = max(1, math.ceil(n_rows / CATALOG_ROWS_PER_FILE))
    spark_write_parquet(cat.repartitionByRange(n_parts, C.UID, C.STATUS).sortWithinPartitions(C.UID, C.STATUS), tmp)
    return _swap_catalog(cfg, tmp), n_rows


def _swap_catalog(cfg: DownloadConfig, tmp: str) -> str:
    """Put the catalog written at `tmp` in place (the old one moved aside first, removed after)."""
    return swap_in(tmp, join(cfg.output, layout.CATALOG_DIR))


# ----------------------------------------------------------------------------- catalog in this process


def _read_table(path: str) -> Any:
    import pyarrow.parquet as pq

    from laiontools.core.storage import parquet_read_errors

    fs, p = url_to_fs(path)
    with fs.open(p, "rb") as f, parquet_read_errors(path):
        return pq.read_table(f, **PARQUET_READ)


def _conform_table(t: Any, columns: list[tuple[str, str]], attempt: int | None = None) -> Any:
    """`t` with exactly `columns` (name, Spark SQL type) in that order and type, absent ones null, plus
    ``_attempt`` unless None: what :func:`build_catalog`'s ``conform`` does in Spark."""
    import pyarrow as pa

    arrays = []
    for name, typ in columns:
        at = prepare.arrow_type(typ)
        arrays.append(t.column(name).cast(at) if name in t.column_names else pa.nulls(t.num_rows, at))
    names = [c for c, _ in columns]
    if attempt is not None:
        arrays.append(pa.array([attempt] * t.num_rows, pa.int32()))
        names.append("_attempt")
    return pa.table(arrays, names=names)


def _spans_task(items: Any) -> Any:
    """Tasks.map function: (shard id, tar url) items -> :func:`shard_spans` record batches."""
    import pyarrow as pa

    for sid, tar in items:
        yield from shard_spans(iter([pa.RecordBatch.from_pydict({"_sid": [sid], "_tar": [tar]})]))


def build_catalog_local(cfg: DownloadConfig, shards: list[dict[str, Any]], tasks: Any) -> Any:
    """The catalog as one Arrow table sorted by (uid, status): :func:`build_catalog`'s rows, computed in
    this process (prepared rejects + the latest attempt of every downloaded row, spans from the tars,
    read by `tasks` a few shards at once). For pools small enough to skip Spark (``--spark-above``)."""
    import numpy as np
    import pyarrow as pa
    import pyarrow.compute as pc

    from laiontools.core.storage import list_data_files

    columns = catalog_columns(cfg)
    rej_dir = join(cfg.output, layout.PREPARED_DIR, "rejected")
    rej_files = list_data_files(rej_dir) if url_to_fs(rej_dir)[0].exists(url_to_fs(rej_dir)[1]) else []
    parts = [_conform_table(_read_table(f), columns, -1) for f in rej_files]
    if shards:
        dl_parts = []
        for s in shards:
            t = _read_table(s["parquet"])
            status = pa.array([IMG2DATASET_STATUS.get(x, x) for x in t.column(C.STATUS).to_pylist()], pa.string())
            ok = pc.equal(status, C.STATUS_SUCCESS)
            t = t.set_column(t.column_names.index(C.STATUS), C.STATUS, status)
            t = t.set_column(t.column_names.index(C.KEY), C.KEY, pc.if_else(ok, t.column(C.KEY), pa.scalar(None, pa.string())))
            t = t.append_column(C.SHARD, pc.if_else(ok, pa.scalar(s["id"]), pa.scalar(None, pa.string())))
            dl_parts.append(_conform_table(t, columns, s["attempt"]))
        dl = pa.concat_tables(dl_parts)
        span_batches = tasks.map(_spans_task, [(s["id"], s["tar"]) for s in shards])
        span_schema = pa.schema([("_sid", pa.string()), ("_skey", pa.string()), (C.TAR_OFFSET, pa.int64()),
                                 (C.TAR_LENGTH, pa.int64()), (C.TAR_SHA256, pa.string())])
        spans = pa.Table.from_batches([b.rename_columns(span_schema.names) for b in span_batches], schema=span_schema)
        dl = dl.drop_columns([C.TAR_OFFSET, C.TAR_LENGTH, C.TAR_SHA256]).join(
            spans, keys=[C.SHARD, C.KEY], right_keys=["_sid", "_skey"], join_type="left outer")
        dl = dl.select([c for c, _ in columns] + ["_attempt"])
        # the latest attempt of each uid (prepare made uids unique within an attempt)
        dl = dl.sort_by([(C.UID, "ascending"), ("_attempt", "descending")])
        uids = dl.column(C.UID).to_numpy(zero_copy_only=False)
        first = np.ones(len(uids), dtype=bool)
        first[1:] = uids[1:] != uids[:-1]
        parts.append(dl.filter(pa.array(first)))
    if not parts:
        parts.append(_conform_table(pa.table({}), columns, -1))
    cat = pa.concat_tables(parts).drop_columns(["_attempt"])
    return cat.sort_by([(C.UID, "ascending"), (C.STATUS, "ascending")])


def write_catalog_local(cat: Any, cfg: DownloadConfig) -> tuple[str, int]:
    """:func:`write_catalog` for an Arrow table already sorted: the same file split, swapped in the same way."""
    tmp = _catalog_tmp(cfg)
    write_parquet_dir(cat, tmp, rows_per_file=CATALOG_ROWS_PER_FILE)
    return _swap_catalog(cfg, tmp), cat.num_rows


def report_aggregate_local(cat: Any) -> list[tuple[str, str | None, str | None, str | None, int]]:
    """:func:`report_aggregate`'s table from an Arrow catalog (every size: it is already in memory).
    Successes and other statuses are counted on Arrow; only failed rows pass through Python, for
    their failure kind (one call per distinct message) and host."""
    from collections import Counter

    import pyarrow as pa
    import pyarrow.compute as pc

    status = cat.column(C.STATUS)
    ok = pc.fill_null(pc.equal(status, C.STATUS_SUCCESS), False)
    failed = pc.fill_null(pc.is_in(status, value_set=pa.array(FAILED_STATUSES, pa.string())), False)
    out: list[tuple[str, str | None, str | None, str | None, int]] = [
        (C.STATUS_SUCCESS, vc["values"], None, None, int(vc["counts"]))
        for vc in pc.value_counts(cat.filter(ok).column(C.SHARD)).to_pylist()
    ]
    bad = cat.filter(failed)
    errors = bad.column(C.ERROR).to_pylist()
    kind_of = {m: failure_kind(m) for m in set(errors)}
    counts = Counter(zip(bad.column(C.STATUS).to_pylist(), (kind_of[m] for m in errors),
                         map(report_host, bad.column(C.URL).to_pylist())))
    out += [(st, None, kind, host, n) for (st, kind, host), n in counts.items()]
    rest = cat.filter(pc.invert(pc.or_(ok, failed)))
    out += [(vc["values"], None, None, None, int(vc["counts"])) for vc in pc.value_counts(rest.column(C.STATUS)).to_pylist()]
    return out


def failure_kind(msg: str | None) -> str:
    """Bucket an error message for the report (HTTP code, timeout, opt-out, decode, limit, ...)."""
    if not msg:
        return "unknown"
    if msg.startswith("robots.txt unavailable"):  # whatever stopped the robots.txt read: no image request was sent
        return "robots_unavailable"
    if msg.startswith("TLS certificate of "):  # (names the host: "images.example.org" is not an image error)
        return "tls_rejected"
    m = re.search(r"HTTP Error (\d{3})", msg)
    if m:
        return f"http_{m.group(1)}"
    low = msg.lower()
    for needle, kind in (("deadline:", "deadline"), ("robots.txt disallows", "robots_txt"),
                         ("robots.txt asks a crawl-delay", "robots_crawl_delay"),
                         ("x-robots-tag", "opted_out_x_robots_tag"), ("tdm-reservation", "opted_out_tdm_reservation"),
                         ("timed out", "timeout"), ("blocked:", "blocked_target"), ("blocklist", "blocklisted"),
                         ("over the limit", "size_limit"), ("cannot be read from its header", "unreadable_header"),
                         ("dns:", "dns"), ("does not resolve", "dns"), ("connection reset", "connection_reset"),
                         ("connection refused", "connection_refused"), ("decode", "undecodable"), ("image", "image_error"),
                         ("host throttled:", "host_throttled")):
        if needle in low:
            return kind
    return "other"


def _failed_kind_host(cat: Any) -> tuple[Any, Any, Any]:
    """Column expressions: is the row a failed download/resize, its failure kind, its host."""
    from pyspark.sql import functions as F

    kind_of = F.udf(lambda msg: failure_kind(msg), "string")
    host = F.udf(lambda url: report_host(url), "string")
    failed = F.col(C.STATUS).isin(*FAILED_STATUSES)
    return failed, kind_of(F.col(C.ERROR)), host(F.col(C.URL))


FAILED_STATUSES = (C.STATUS_FAILED_DOWNLOAD, C.STATUS_FAILED_RESIZE)


def report_host(url: str | None) -> str:
    """The host a failed row is counted under in the report: the key of the per-host limits
    (lower-cased host name), or "(no host)". One Python function for both engines, so their reports agree."""
    return prepare.host_of(url) or "(no host)"


# The report's counts come from one grouped table (status, shard of successes, failure kind and host of
# failures) collected to the driver when it has at most this many rows: one Spark job instead of a
# dozen. Larger (a cluster-scale pool with many failing hosts): grouped in Spark as before.
REPORT_AGGREGATE_ROWS = 200_000


def report_aggregate(cat: Any, cap: int = REPORT_AGGREGATE_ROWS) -> list[tuple[str, str | None, str | None, str | None, int]] | None:
    """[(status, shard (successes), kind (failures), host (failures), rows)] of the catalog, or None when
    that table has more than `cap` rows."""
    from pyspark.sql import functions as F

    if cap <= 0:
        return None
    failed, kind, host = _failed_kind_host(cat)
    agg = (cat.select(F.col(C.STATUS).alias("_s"),
                      F.when(F.col(C.STATUS) == C.STATUS_SUCCESS, F.col(C.SHARD)).alias("_sh"),
                      F.when(failed, kind).alias("_kind"), F.when(failed, host).alias("_host"))
           .groupBy("_s", "_sh", "_kind", "_host").count().limit(cap + 1).collect())
    if len(agg) > cap:
        return None
    return [(r["_s"], r["_sh"], r["_kind"], r["_host"], int(r["count"])) for r in agg]


def _views_from_aggregate(agg: list[tuple[str, str | None, str | None, str | None, int]]) -> tuple[
        dict[str, int], dict[str, int], dict[str, int], dict[str, Any]]:
    """(rows per status, successes per shard, failures per status:kind, host view) from
    :func:`report_aggregate`'s table: the same figures :func:`build_report`'s Spark path computes."""
    by_status: dict[str, int] = {}
    per_shard: dict[str, int] = {}
    kinds: dict[str, int] = {}
    per_host: dict[str, dict[str, int]] = {}
    watched_rows: dict[str, int] = {}
    watched_hosts: dict[str, set[str]] = {}
    for status, shard, kind, host, n in agg:
        by_status[status] = by_status.get(status, 0) + n
        if status == C.STATUS_SUCCESS and shard is not None:
            per_shard[shard] = per_shard.get(shard, 0) + n
        if kind is not None:  # a failed row
            kinds[f"{status}:{kind}"] = kinds.get(f"{status}:{kind}", 0) + n
            per_host.setdefault(host, {})[kind] = per_host.get(host, {}).get(kind, 0) + n
            if kind in HOST_WATCH_KINDS:
                watched_rows[kind] = watched_rows.get(kind, 0) + n
                watched_hosts.setdefault(kind, set()).add(host)
    totals = sorted(((h, sum(k.values())) for h, k in per_host.items()), key=lambda hn: (-hn[1], hn[0]))[:TOP_HOSTS]
    hosts = {
        "most_failures": [{"host": h, "failed": n, "by_kind": dict(sorted(per_host[h].items(), key=lambda kv: (-kv[1], kv[0])))}
                          for h, n in totals],
        "watched": {k: {"rows": watched_rows.get(k, 0), "hosts": len(watched_hosts.get(k, ()))} for k in HOST_WATCH_KINDS},
    }
    return by_status, per_shard, kinds, hosts


def busy_seconds(spans: list[tuple[float, float]]) -> float:
    """Seconds during which at least one of these (start, end) spans ran: the download phase of shards
    written by several runs (a resumed kill, --retry-failed passes) without the hours between them."""
    total, end = 0.0, None
    for a, b in sorted(spans):
        if end is None or a > end:
            total += b - a
            end = b
        elif b > end:
            total += b - end
            end = b
    return total


def build_report(cfg: DownloadConfig, cat: Any, shards: list[dict[str, Any]], prep: dict[str, Any], wall: float,
                 by_status: dict[str, int] | None = None,
                 aggregate: list[tuple[str, str | None, str | None, str | None, int]] | None = None) -> dict[str, Any]:
    """report.json's content from the catalog `cat`; `by_status` (rows per status) if already counted;
    `aggregate` (:func:`report_aggregate`) when it fitted in the driver: then no Spark job runs here."""
    if aggregate is not None:
        by_status, _, kinds, hosts = _views_from_aggregate(aggregate)
    else:
        if by_status is None:
            by_status = {r[C.STATUS]: int(r["count"]) for r in cat.groupBy(C.STATUS).count().collect()}
        # Failed rows with their kind and host, grouped in Spark (error messages are nearly unique, so
        # grouping by them would ship every failed row's text to the driver at scale).
        failed, kind, host = _failed_kind_host(cat)
        fails = cat.where(failed).select(C.STATUS, kind.alias("_kind"), host.alias("_host")).persist()
        kinds = {}
        for r in fails.groupBy(C.STATUS, "_kind").count().collect():
            kinds[f"{r[C.STATUS]}:{r['_kind']}"] = int(r["count"])
        hosts = host_view(fails)
        fails.unpersist()
    hosts["executors"] = executor_view(shards)
    success = by_status.get(C.STATUS_SUCCESS, 0)
    attempted = success + by_status.get(C.STATUS_FAILED_DOWNLOAD, 0) + by_status.get(C.STATUS_FAILED_RESIZE, 0)
    dl_time = busy_seconds([(s["start_time"], s["end_time"]) for s in shards if s.get("start_time")])
    listed = pool_shards(shards)
    return {
        "rows_in": prep["rows_in"],
        "rejected": {k: v for k, v in sorted(by_status.items()) if k.startswith(C.REJECTED_PREFIX)},
        "requested": attempted,
        "obtained": success,
        "success_rate": round(success / attempted, 4) if attempted else 0.0,
        "by_status": dict(sorted(by_status.items())),
        "failures_by_kind": dict(sorted(kinds.items(), key=lambda kv: (-kv[1], kv[0]))),
        "hosts": hosts,
        "shards": len(listed),
        "bytes": int(sum(s["bytes"] for s in listed)),
        "retry_passes": retry_pass_view(shards),
        "download_seconds": round(dl_time, 2),
        "samples_per_second": round(success / dl_time, 2) if dl_time > 0 else None,
        "wall_seconds_this_run": round(wall, 2),
    }


# Failure kinds the per-host view counts separately: what a crawl operator watches.
HOST_WATCH_KINDS = {"robots_txt": "robots.txt refusals", "opted_out_x_robots_tag": "X-Robots-Tag opt-outs",
                    "opted_out_tdm_reservation": "tdm-reservation opt-outs", "http_429": "HTTP 429",
                    "deadline": "deadline hits", "dns": "DNS failures", "blocklisted": "blocklisted"}
TOP_HOSTS = 20


def host_view(fails: Any) -> dict[str, Any]:
    """Per-host report from failed rows (columns _host, _kind): the hosts with most failures and,
    for each watched kind (robots, opt-outs, 429, deadline, DNS, blocklist), rows and hosts."""
    from pyspark.sql import functions as F

    top = [(r["_host"], int(r["count"])) for r in
           fails.groupBy("_host").count().orderBy(F.desc("count"), "_host").limit(TOP_HOSTS).collect()]
    per: dict[str, dict[str, int]] = {h: {} for h, _ in top}
    if top:
        for r in fails.where(F.col("_host").isin([h for h, _ in top])).groupBy("_host", "_kind").count().collect():
            per[r["_host"]][r["_kind"]] = int(r["count"])
    watched = {r["_kind"]: (int(r["rows"]), int(r["hosts"])) for r in
               fails.where(F.col("_kind").isin(list(HOST_WATCH_KINDS)))
               .groupBy("_kind").agg(F.count("*").alias("rows"), F.countDistinct("_host").alias("hosts")).collect()}
    return {
        "most_failures": [{"host": h, "failed": n, "by_kind": dict(sorted(per[h].items(), key=lambda kv: (-kv[1], kv[0])))}
                          for h, n in top],
        "watched": {k: {"rows": watched.get(k, (0, 0))[0], "hosts": watched.get(k, (0, 0))[1]} for k in HOST_WATCH_KINDS},
    }


def executor_view(shards: list[dict[str, Any]]) -> dict[str, Any]:
    """Sum of the shards' ``<shard>_web.json`` counters (DNS lookups and failures, robots.txt
    fetches, requests, 429/503 pauses per host). A shard without one (killed between its stats and
    its counters, or made by an older version) counts as zero; ``shards_counted`` says how many had one."""
    from laiontools.web.fetch import WEB_STATS_SUFFIX

    tot = {"dns_lookups": 0, "dns_failures": 0, "robots_fetches": 0, "requests": 0}
    paused: dict[str, int] = {}
    counted = 0
    for s in shards:
        path = s["tar"][: -len(".tar")] + WEB_STATS_SUFFIX
        fs, p = url_to_fs(path)
        if not fs.exists(p):
            continue
        d = read_json(path)
        counted += 1
        for k in tot:
            tot[k] += int(d.get(k, 0))
        for h, n in (d.get("throttled_hosts") or {}).items():
            paused[h] = paused.get(h, 0) + int(n)
    top = sorted(paused.items(), key=lambda kv: (-kv[1], kv[0]))[:TOP_HOSTS]
    return {**tot, "shards_counted": counted, "throttle_pauses": int(sum(paused.values())),
            "throttled_hosts": len(paused), "most_throttled": [{"host": h, "pauses": n} for h, n in top]}


def report_text(rep: dict[str, Any], cfg: DownloadConfig) -> str:
    from laiontools.core.report import table

    lines = [
        f"laiontools download — pool {cfg.name!r} in {cfg.output}",
        f"  rows in:       {rep['rows_in']}",
        f"  rejected:      {sum(rep['rejected'].values())}  " + ", ".join(f"{k[len(C.REJECTED_PREFIX):]}={v}" for k, v in rep["rejected"].items()),
        f"  requested:     {rep['requested']} (rows sent to download)",
        f"  obtained:      {rep['obtained']} samples ({100 * rep['success_rate']:.1f}% success) in {rep['shards']} shard(s), {rep['bytes'] / 1e6:.1f} MB",
        "  speed:         " + (f"{rep['samples_per_second']} samples/s over the download phase"
                                 if rep["samples_per_second"] is not None else "- (nothing was downloaded)"),
        f"  engine:        {rep.get('engine', 'spark')}",
    ]
    for p in rep.get("retry_passes") or []:
        lines.append(f"  retry pass {p['pass']}: {p['obtained']} of {p['rows']} row(s) obtained"
                     + (f" in {p['shards']} shard(s)" if p["shards"] else "; no shard added"))
    private = rep["rejected"].get(C.REJECTED_PREFIX + "private_address", 0)
    if private:  # a loopback or LAN source (a local mirror, a test server) is refused unless allowed
        lines.append(f"  note: {private} row(s) point to non-global addresses, refused by the network policy; allow a "
                     "network with --allow-networks 10.0.0.0/8 (or --allow-private-network) if they are yours")
    if rep["failures_by_kind"]:
        lines += ["  failures by kind:", "    " + table([{"kind": k, "rows": v} for k, v in rep["failures_by_kind"].items()]).replace("\n", "\n    ")]
    hosts = rep.get("hosts") or {}
    if hosts.get("most_failures"):
        w = hosts["watched"]
        lines.append("  politeness and stragglers: " + ", ".join(
            f"{label} {w[k]['rows']} (hosts {w[k]['hosts']})" for k, label in HOST_WATCH_KINDS.items()))
        rows = [{"host": h["host"], "failed": h["failed"],
                 "kinds": ", ".join(f"{k}={v}" for k, v in list(h["by_kind"].items())[:4])} for h in hosts["most_failures"][:10]]
        lines += ["  hosts with the most failures:", "    " + table(rows).replace("\n", "\n    ")]
    ex = hosts.get("executors")
    if ex and ex.get("shards_counted"):
        lines.append(f"  fetch counters: {ex['requests']} requests, DNS lookups {ex['dns_lookups']} "
                     f"(failed {ex['dns_failures']}), robots.txt fetches {ex['robots_fetches']}, "
                     f"429/503 pauses {ex['throttle_pauses']} on {ex['throttled_hosts']} host(s)")
    return "\n".join(lines)


def pool_shards(shards: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The shards the pool lists, of :func:`complete_shards`: all but a retry pass's shards whose tar
    holds no sample (every row it retried failed again). Such a shard stays in its pass's folder, as
    img2dataset's record that the pass is done and of its rows' statuses (the catalog takes them from
    its parquet), but is not part of the pool: a pass that obtains nothing adds no shard for embed,
    verify or a takedown to read."""
    return [s for s in shards if s["attempt"] == 0 or int(s["num_samples"]) > 0]


def retry_pass_view(shards: list[dict[str, Any]]) -> list[dict[str, int]]:
    """Per retry pass, from its shards' stats: rows it attempted, samples obtained, shards the pool lists."""
    out: dict[int, dict[str, int]] = {}
    for s in shards:
        if s["attempt"] > 0:
            p = out.setdefault(s["attempt"], {"pass": s["attempt"], "rows": 0, "obtained": 0, "shards": 0})
            p["rows"] += int(s.get("count") or 0)
            p["obtained"] += int(s["num_samples"])
            p["shards"] += int(int(s["num_samples"]) > 0)
    return [out[a] for a in sorted(out)]


def finalize(cfg: DownloadConfig, spark: Any, prep: dict[str, Any], wall: float) -> dict[str, Any]:
    """Catalog, uid file, manifest, report from the complete shards. Idempotent. ``spark`` None: in
    this process (a pool under ``--spark-above`` rows), with the same files as a result."""
    from laiontools.contracts.manifest import new_manifest, write_manifest

    shards = complete_shards(cfg, Tasks(spark))
    fin = _finalize_local(cfg, shards) if spark is None else _finalize_spark(cfg, spark, shards, prep)
    per_shard = fin["per_shard"]
    listed = []
    for s in pool_shards(shards):
        # a shard entirely superseded by a retry pass still lists its samples that were not retried
        n = per_shard.get(s["id"], 0)
        listed.append({"path": s["path"], "num_samples": n, "bytes": s["bytes"], "sha256": s["sha256"],
                       "tar_samples": s["num_samples"]})
    rep = build_report(cfg, fin["catalog"], shards, prep, wall, fin["by_status"], aggregate=fin["aggregate"])
    rep.update(fin["engine"])
    manifest = new_manifest(
        name=cfg.name, kind="pool", num_samples=fin["uids"], target_samples=rep["requested"],
        uids={"path": layout.POOL_UIDS, "sha256": fin["uids_sha256"], "count": fin["uids"]},
        shards=listed, source_fingerprint=prep["source_fingerprint"],
        catalog={"path": layout.CATALOG_DIR, "num_rows": fin["rows"]},
        download={"profile": prep["profile"], "settings": cfg.semantic()},
    )
    manifest["short"] = False  # link rot is the norm for a pool; requested vs obtained is in the report
    m_path = join(cfg.output, layout.POOL_MANIFEST)
    write_manifest(m_path, manifest)
    write_json(join(cfg.output, layout.REPORT_JSON), rep)
    text = report_text(rep, cfg)
    atomic_write_bytes(join(cfg.output, layout.REPORT_TXT), (text + "\n").encode())
    rep["text"] = text
    rep["manifest"] = m_path
    return rep


def _finalize_local(cfg: DownloadConfig, shards: list[dict[str, Any]]) -> dict[str, Any]:
    """finalize's catalog and uid file in this process; what :func:`_finalize_spark` returns."""
    import pyarrow.compute as pc

    from laiontools.contracts.uids import save_uids

    cat = build_catalog_local(cfg, shards, Tasks(None))
    _, n_rows = write_catalog_local(cat, cfg)
    succ = cat.filter(pc.equal(cat.column(C.STATUS), C.STATUS_SUCCESS)).column(C.UID).to_pylist()
    uid_sha, n_uids = save_uids(join(cfg.output, layout.POOL_UIDS), succ, distinct=False)
    agg = report_aggregate_local(cat)
    by_status, per_shard, _, _ = _views_from_aggregate(agg)
    return {"rows": n_rows, "uids_sha256": uid_sha, "uids": n_uids, "aggregate": agg, "by_status": by_status,
            "per_shard": per_shard, "catalog": None, "engine": {"engine": "in-process"}}


def _finalize_spark(cfg: DownloadConfig, spark: Any, shards: list[dict[str, Any]], prep: dict[str, Any]) -> dict[str, Any]:
    """finalize's catalog and uid file on Spark: {rows, uids_sha256, uids, aggregate (None when too big
    for the driver), by_status, per_shard, catalog (the written one, for the report's Spark groupings),
    engine (the report's engine fields)}."""
    from pyspark.sql import functions as F

    from laiontools.contracts.uids import save_uids_spark

    # the catalog's latest-attempt window and the counts shuffle every row: sized from the row count
    # unless the user set spark.sql.shuffle.partitions
    n_shuffle = shuffle_partitions(spark, rows=int(prep["rows_in"]))
    # Persisted for the write: its row count, the range partitioner's sample and the write itself would
    # each run the whole plan again (every shard parquet and every tar read, every span hashed), i.e.
    # three passes over the pool's bytes; persisted, the write took 0.44-0.64x as long at 2,000 rows (BENCHMARKS.md).
    cat = build_catalog(cfg, shards, spark).persist()
    try:
        cat_dir, n_rows = write_catalog(cat, cfg)
    finally:
        cat.unpersist()
    cat = spark_read_parquet(spark, cat_dir)
    succ = cat.where(F.col(C.STATUS) == C.STATUS_SUCCESS)
    # (one row a uid: the latest attempt of each downloaded uid, and prepare made uids unique, so no distinct, whose
    # shuffle at 2B is ~1.4e9 uids hashed and written twice; a repeat would raise, naming the uid)
    [(uid_sha, n_uids)] = save_uids_spark(succ, C.UID, [join(cfg.output, layout.POOL_UIDS)], distinct=False)
    # rows per status, successes per shard and the report's failure counts: one grouped table when it
    # fits the driver, else rows per status and successes per shard in one job (a shard is set on
    # success rows only) and the report's groupings in Spark
    # That table has a row per (status, shard of a success) at least: above REPORT_AGGREGATE_ROWS shards
    # (a 2B pool has ~230k) those counts come first, without the failure kind and host that the table
    # asks of every catalog row in Python, and the table is made only if they leave it room. (It was
    # made whole first and then dropped: a wasted pass, 19 s of local[2] per 2M rows against 1.1 s.)
    counts = None
    if len(shards) > REPORT_AGGREGATE_ROWS:
        counts = cat.groupBy(C.STATUS, C.SHARD).count().collect()
    agg = report_aggregate(cat, cap=REPORT_AGGREGATE_ROWS) if counts is None or len(counts) <= REPORT_AGGREGATE_ROWS else None
    by_status: dict[str, int] = {}
    per_shard: dict[str, int] = {}
    if agg is not None:
        by_status, per_shard, _, _ = _views_from_aggregate(agg)
    else:
        for r in counts if counts is not None else cat.groupBy(C.STATUS, C.SHARD).count().collect():
            by_status[r[C.STATUS]] = by_status.get(r[C.STATUS], 0) + int(r["count"])
            if r[C.STATUS] == C.STATUS_SUCCESS:
                per_shard[r[C.SHARD]] = int(r["count"])
    return {"rows": n_rows, "uids_sha256": uid_sha, "uids": n_uids, "aggregate": agg, "by_status": by_status,
            "per_shard": per_shard, "catalog": cat,
            "engine": {"engine": f"spark {spark.sparkContext.master}", "spark": {"shuffle_partitions": n_shuffle}}}


def prepare_retry(cfg: DownloadConfig, spark: Any) -> str | None:
    """Write the rows that failed with transient errors as a new prepared input; None if there are none.

    The input is laid out as prepare lays out the first pass's (:func:`retry_input_files`): the rows
    sorted by uid, file i holding rows [i × F × n, (i + 1) × F × n) (n = ``--number-sample-per-shard``,
    F = ``--shards-per-file``), so every file but the last holds F whole shards and img2dataset's Reader,
    which cuts each file into shards of n rows with ids continuing across files, gives the shards that
    one file of all the rows gave: shard j holds rows [j × n, (j + 1) × n) whatever the number of files.
    On Spark each file is written by its own task (it was one file from one task, ``coalesce(1)``: ~100M
    rows at 2B, and img2dataset's Reader then read that one file whole into the driver); both engines
    write the same files, byte for byte (with the session's default codec: on Spark they take the session's
    spark.sql.parquet.compression.codec)."""
    from pyspark.sql import functions as F
    from pyspark.sql.types import BooleanType

    from laiontools.web.fetch import is_transient

    n = max(a for a, _, _ in _attempt_dirs(cfg)) + 1
    if not is_done(join(cfg.output, layout.PREPARED_DIR)) or not url_to_fs(join(cfg.output, layout.POOL_MANIFEST))[0].exists(
            url_to_fs(join(cfg.output, layout.POOL_MANIFEST))[1]):
        raise UserError(f"{cfg.output}: no finished pool to retry; run the download without --retry-failed first")
    prep_stats = read_json(join(cfg.output, layout.PREPARED_DIR, layout.PREPARED_STATS_JSON))
    names = prep_stats["download_columns"]
    out = join(cfg.output, layout.PREPARED_DIR, f"retry-{n:02d}")
    per_file = cfg.number_sample_per_shard * cfg.shards_per_file
    if spark is None:
        return _prepare_retry_local(cfg, names, out, per_file)
    transient = F.udf(lambda msg: is_transient(msg), BooleanType())
    cat = spark_read_parquet(spark, join(cfg.output, layout.CATALOG_DIR))
    # persisted: counted, then indexed (zipWithIndex counts each partition first) and written, which
    # would each read the catalog and call the Python UDF again
    todo = cat.where((F.col(C.STATUS) == C.STATUS_FAILED_DOWNLOAD) & transient(F.col(C.ERROR))).persist()
    try:
        count = todo.count()
        if count == 0:
            return None
        log.info("retry pass %d: %d row(s) failed with transient errors", n, count)
        # same column types as the first pass's prepared input, so all shard parquets share one schema
        cols = [(F.col(c) if c in cat.columns else F.lit(None)).cast(prepared_type(c)).alias(c) for c in names]
        tmp = _fresh_retry_tmp(out)
        codec = spark_parquet_codec(spark)  # the session's, as Spark's own writer's
        # rows by uid (unique in the catalog: a total order, the same on every run and engine), numbered,
        # each sent to the task of its file
        indexed = (todo.orderBy(C.UID).select(*cols).rdd.map(tuple).zipWithIndex()
                   .map(lambda ri: (ri[1] // per_file, (ri[1], ri[0]))))
        written = (indexed.partitionBy(retry_input_files(count, per_file), lambda k: int(k))
                   .map(lambda kv: kv[1])
                   .mapPartitionsWithIndex(lambda pid, it: _write_retry_file(pid, it, tmp, names, per_file, codec))
                   .sum())
    finally:
        todo.unpersist()
    if written != count:
        raise RuntimeError(f"retry pass {n}: wrote {written} rows but counted {count}; re-run the same command")
    # Put in place whole: a folder named retry-NN is a whole retry input (see _attempt_dirs), even if
    # this run is killed here.
    move_tree(tmp, out)
    return out


def retry_input_files(rows: int, per_file: int) -> int:
    """Files of a retry input of `rows` rows, `per_file` (F whole shards of n rows) in each but the last."""
    return max(1, -(-rows // per_file))


def _fresh_retry_tmp(out: str) -> str:
    """The empty folder a retry input is written in before it is moved to `out` (a killed run's removed)."""
    tmp = out.rstrip("/") + ".tmp"
    fs, tp = url_to_fs(tmp)
    if fs.exists(tp):
        rm_path(fs, tp, recursive=True)
    fs.makedirs(tp, exist_ok=True)
    return tmp


def _write_retry_file(pid: int, rows: Any, out_dir: str, names: list[str], per_file: int, codec: str = PARQUET_CODEC) -> Any:
    """Write ``part-<pid>.parquet`` of a retry input: rows (position, values in the order of `names`)
    whose positions must be exactly pid × per_file, pid × per_file + 1, ... (a gap or a repeat would
    shift every later row's shard). Yields the rows written. Both engines write each file here (in
    `codec`: on Spark the session's, in process PARQUET_CODEC)."""
    import pyarrow.parquet as pq

    from laiontools.core.storage import atomic_open

    rows = sorted(rows, key=lambda r: r[0])
    if not rows:
        return iter([0])
    first = pid * per_file
    if rows[0][0] != first or rows[-1][0] != first + len(rows) - 1 or len({r[0] for r in rows}) != len(rows):
        raise RuntimeError(f"retry input file {pid} got positions {rows[0][0]}..{rows[-1][0]} for {len(rows)} rows, "
                           f"not {first}.. without gaps; re-run the same command")
    table = prepare._arrow_table(names, [r[1] for r in rows])
    with atomic_open(join(out_dir, f"part-{pid:05d}.parquet")) as f:
        pq.write_table(table, f, **{**PARQUET_WRITE, "compression": codec})
    return iter([len(rows)])


def _prepare_retry_local(cfg: DownloadConfig, names: list[str], out: str, per_file: int) -> str | None:
    """:func:`prepare_retry` in this process: the same rows (failed downloads with a transient error,
    by uid), columns and types, in the same files."""
    import pyarrow as pa
    import pyarrow.compute as pc

    from laiontools.core.storage import list_data_files
    from laiontools.web.fetch import is_transient

    cat = pa.concat_tables([_read_table(f) for f in list_data_files(join(cfg.output, layout.CATALOG_DIR))])
    cat = cat.filter(pc.equal(cat.column(C.STATUS), C.STATUS_FAILED_DOWNLOAD))
    cat = cat.filter(pa.array([is_transient(m) for m in cat.column(C.ERROR).to_pylist()], pa.bool_()))
    if cat.num_rows == 0:
        return None
    log.info("retry pass into %s: %d row(s) failed with transient errors", out, cat.num_rows)
    todo = _conform_table(cat.sort_by(C.UID), [(c, prepared_type(c)) for c in names])
    # written aside, then moved: a folder named retry-NN is a whole retry input (see _attempt_dirs)
    tmp = _fresh_retry_tmp(out)
    for i in range(retry_input_files(todo.num_rows, per_file)):
        part = todo.slice(i * per_file, per_file)
        rows = zip(*(part.column(c).to_pylist() for c in names))
        for _ in _write_retry_file(i, zip(range(i * per_file, i * per_file + part.num_rows), rows), tmp, names, per_file):
            pass
    move_tree(tmp, out)
    return out


STAGE = "download"
CONFIG = DownloadConfig


@stage_entry(STAGE, accepts=("prepare",))  # a pool whose prepare ran on its own (`laiontools prepare`)
def run(cfg: DownloadConfig, spark: Any = None) -> StageResult:
    """prepare + img2dataset + catalog, uid file, manifest and report into cfg.output.

    details = the report (report.json's content plus ``text``); outputs name the manifest, catalog,
    shards and report. Bad input and a folder that is not this pool's fail before Spark starts.
    """
    t0 = time.time()
    check_output(cfg)
    # a catalog swap a kill interrupted is finished or undone before anything reads the catalog (a retry
    # pass is planned from it)
    repair_swap(join(cfg.output, layout.CATALOG_DIR))
    prep_dir = join(cfg.output, layout.PREPARED_DIR)
    found = None
    if not is_done(prep_dir):
        # cheap checks before Spark starts (tens of seconds): bad input fails at once
        found = prepare.discover(cfg)
        rows = prepare.estimated_rows(found[0])
    else:
        rows = int(read_json(join(prep_dir, layout.PREPARED_STATS_JSON))["rows_in"])
    write_record(join(cfg.output, layout.SETTINGS_JSON), cfg.semantic())
    # A source under --spark-above rows (and no master named, not under spark-submit) runs every step in
    # this process: prepare and finalize on Arrow, the download shards in forked processes. Spark's
    # fixed cost (JVM, Python workers, a dozen jobs: 15-25 s) would otherwise outweigh the work.
    on_spark = spark is not None or wants_spark(cfg.master, rows, cfg.spark_above)
    with stage_spark(cfg, spark, app_name="laiontools-download") if on_spark else contextlib.nullcontext() as sp:
        prep = prepare.prepare_stats(cfg, sp, found)  # the source's files listed and probed once
        if cfg.retry_failed:
            # A retry pass whose shards were interrupted is finished first, before a new one is planned;
            # so is one whose shards are done but that no finalize has folded into the catalog yet (a
            # kill during finalize): a new pass planned from a catalog without its results would fetch
            # the same rows again, a pass an uninterrupted run never makes.
            attempts = _attempt_dirs(cfg)
            pending = [(a, s, i) for a, s, i in attempts if a > 0 and not is_done(join(s, "_pass"))]
            if not pending and not _unfolded_passes(attempts):
                new_input = prepare_retry(cfg, sp)
                if new_input is None:
                    log.info("retry pass: no row failed with a transient error; nothing to do")
                attempts = _attempt_dirs(cfg)
                pending = [(a, s, i) for a, s, i in attempts if a > 0 and not is_done(join(s, "_pass"))]
            for _, shard_dir, input_dir in pending:
                run_img2dataset(cfg, input_dir, shard_dir, sp)
                mark_done(join(shard_dir, "_pass"), {"folded": False})
        else:
            for attempt, shard_dir, input_dir in _attempt_dirs(cfg):
                run_img2dataset(cfg, input_dir, shard_dir, sp)
        rep = finalize(cfg, sp, prep, time.time() - t0)
        for shard_dir in _unfolded_passes(_attempt_dirs(cfg)):  # in the catalog now: the next retry plans anew
            mark_done(join(shard_dir, "_pass"), {"folded": True})
    outputs = {"manifest": rep["manifest"], "catalog": join(cfg.output, layout.CATALOG_DIR),
               "shards": join(cfg.output, layout.SHARDS_DIR), "report": join(cfg.output, layout.REPORT_TXT)}
    summary = rep["text"] + "\n\nwritten:\n" + "\n".join(f"  {k:<9} {v}" for k, v in outputs.items())
    return StageResult(
        outputs=outputs,
        counts={k: int(rep[k]) for k in ("rows_in", "requested", "obtained", "shards", "bytes")},
        timings={"download": float(rep["download_seconds"])},
        details=rep, summary=summary,
    )


def main(argv: list[str] | None = None) -> int:
    from laiontools.core.stage import stage_main

    return stage_main(__name__, argv)


if __name__ == "__main__":
    sys.exit(main())
