"""`laiontools takedown`: remove what a removal list names from a pool, into a new pool that names the old one.

Contract::

    laiontools takedown --pool <pool.manifest.json> --list <removal list> --reason <text> --output <new pool>

writes a pool folder that every later stage reads like a download's (DESIGN.md "Manifest", "Catalog")::

    <new>/pool.manifest.json     kind=pool; parent = the old manifest (name, path, sha256); counts updated;
                                 ``takedown`` = list (path, sha256, entries), reason, status, counts
    <new>/pool.uids.npy          the old uid file minus the removed samples
    <new>/catalog/               every catalog row of the old pool; rows of removed samples (and catalog rows
                                 with no stored sample that the list names) get status ``removed_<reason>``
                                 and an error_message naming the list line (their tar_offset, tar_length and
                                 tar_sha256 become null); the byte spans of the samples kept in a rewritten
                                 shard are those of the new tar (same bytes, so the same tar_sha256);
                                 every other cell is unchanged (a row an earlier takedown removed keeps
                                 its status and message: it is not matched or counted again)
    <new>/shards/<id>.tar        only the shards holding a match, rewritten without the matched samples
    <new>/shards/<id>.tar.done   + <id>_stats.json + <id>.parquet, as download writes them (marker last)
    <new>/takedown.audit.jsonl   append-only: the parent's log (if any), then one line per run
    <new>/takedown.json|.txt     this run: per kind, per shard, and every removed uid with the line that hit it
    <new>/settings.json          pool sha256, list sha256, reason: a re-run with another list is refused

What is matched, and what it costs:

* ``uid``, ``url`` (after normalize_url) and ``domain`` (the host and its subdomains) entries are matched
  against the catalog alone: one pass over its uid/url/status/shard/key columns, no tar is read.
* ``sha256`` entries are matched against the catalog's sha256 column (img2dataset's hash of the bytes as
  downloaded, before resizing: what published hash lists hold) *and* the stored image bytes.
* ``sha256`` / ``md5`` / ``phash`` entries need the stored bytes: every shard of the pool is read once (one
  task per shard; sha256 + md5 of each image, ~1 GB/s per core) and, only when the list holds pHashes,
  every image is decoded and hashed too (~1-3 ms per image per core: about 1 core-hour per million images).
  A list of uids/urls/domains alone reads no shard at all except the ones it rewrites.

Shards: a shard with no match is *referenced*, not copied: the new manifest lists it at its absolute place
in the parent pool (same num_samples, bytes, sha256), and :func:`laiontools.contracts.layout.shard_id`
keeps its id, so the catalog's ``shard`` column and every per-shard output (embeddings) still apply. So the
parent pool's folder must stay where it is (``laiontools verify`` names a missing shard). A shard with a
match is rewritten into the new folder: its members other than the matched samples' are copied byte for
byte, header blocks included, in the same order, then the end-of-archive blocks; its per-shard parquet keeps
every row (removed ones with the new status), its stats count the samples left, its ``.done`` marker
(sha256, bytes, source shard and list) is written last. Cost: the bytes of the rewritten shards, once.

What reaches the driver: one small row per matched catalog row (uid, shard, key, list line: they go into
takedown.json and the audit log anyway) and one per sample kept in a rewritten shard (its new byte span,
joined back into the catalog); never the catalog or any image bytes. Every other step is a Spark job (the
catalog match, the content scan, one task per rewritten shard, the catalog write, the uid file).

Engines: pools of more than ``--spark-above`` catalog rows (1M), or any pool with a master named or under
spark-submit, run on Spark as above. Smaller ones run in this process (:class:`_LocalCatalog`): the catalog
read whole with pyarrow (every column; ~1.2 GB at 1M rows), the same match function over its slices and
the same content-scan task in forked processes, the shard rewrites as the same task function on threads,
the new catalog written as download's in-process engine writes one. The same pool either way
(tests/test_takedown.py compares them).

The reason is lowercased and every run of other characters than [a-z0-9_] becomes one ``_``
(``"DMCA #12"`` -> ``removed_dmca_12``; :func:`laiontools.contracts.schema.removed`), so the status stays
one token. A list that fails to parse stops the run before anything is written (the message names the
line). A list that matches nothing writes a new pool with the parent's data unchanged (same uid file
bytes, same catalog rows, every shard referenced), says so, and still appends an audit entry.

Re-running the same command gives the same pool (shards whose marker names the same source shard and
list are kept, the rest rewritten; catalog, uid file and manifest rebuilt identically); the audit log
grows by one line per completed run. Order of writes: shards (each marker last), catalog (written aside,
then swapped in; what a killed run left aside is removed), uid file, manifest, takedown.json/.txt, and the
audit line last: a run killed before it added no line, so its re-run adds one, as an uninterrupted run
does (tests/faults/test_kill.py). The audit records who (user@host), when (UTC), the list (path without
any user:password@ or query string, sha256), the reason, counts per kind and per shard, and the uids.
"""

from __future__ import annotations

import argparse
import functools
import getpass
import json
import logging
import math
import re
import socket
import time
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import urlsplit, urlunsplit

from laiontools import __version__
from laiontools.contracts import layout
from laiontools.contracts import schema as C
from laiontools.contracts.manifest import new_manifest, resolve, write_manifest
from laiontools.contracts.pool import (
    CATALOG_ROWS_PER_FILE,
    PoolInfo,
    abs_path,
    catalog_footers,
    catalog_rows,
    load_pool,
    refuse_lacking_columns,
    spark_read_catalog,
)
from laiontools.contracts.removal import RemovalList, content_hashes, read_removal_list
from laiontools.core import failpoints
from laiontools.core.config import ConfigError
from laiontools.core.errors import InputError, UserError, task_error, task_errors_as
from laiontools.core.redact import redact
from laiontools.core.report import table
from laiontools.core.spark import spark_run_record
from laiontools.core.stage import (
    SparkStageConfig,
    StageResult,
    Tasks,
    config_parser,
    stage_entry,
    stage_tasks,
)
from laiontools.core.storage import (
    PARQUET_CODEC,
    PARQUET_READ,
    PARQUET_WRITE,
    atomic_open,
    ensure_output_dir,
    join,
    mark_done,
    read_json,
    read_marker,
    sha256_file,
    spark_read_parquet,
    spark_write_parquet,
    store_refusal,
    swap_in,
    swap_temp,
    url_to_fs,
    write_json,
)

log = logging.getLogger(__name__)

STAGE = "takedown"
# Below this many catalog rows a takedown runs in this process: it holds the whole catalog (every column:
# ~1.2 GB at 1M rows, BENCHMARKS.md) to rewrite it, where Spark's start and jobs cost more than the work
# (18 s against 0.8 s for a 2,000-row pool; 55 s against 10-12 s at 1M rows, with a 2.1 GB JVM).
SPARK_ABOVE_ROWS = 1_000_000
# Spans of the kept samples of rewritten shards come to the driver (one small row each); the uids and
# match lines of removed samples too (they go into takedown.json and the audit log).
# The catalog columns the match reads; every file of the catalog must hold them.
MATCH_COLUMNS = (C.UID, C.STATUS, C.URL, C.SHARD, C.KEY, C.SHA256, C.ERROR)
_MATCH_SCHEMA = "uid string, status string, shard string, key string, kind string, value string, line int, lines string"


class TakedownError(UserError, ValueError):
    """The pool and its shards disagree, or the output holds another takedown."""


def _in_task(fn: Any, *args: Any) -> Any:
    """`fn(*args)` inside a Spark task: a user error it raises (a shard that cannot be read, ...) is
    tagged, so that the driver turns it back into one line (``task_errors_as(TakedownError)``), not a py4j
    traceback. (In process the tagged error reaches the caller as it is, and is turned back the same way.)"""
    try:
        return fn(*args)
    except UserError as e:
        raise task_error(str(e).split("\n", 1)[0]) from e


@dataclass
class TakedownConfig(SparkStageConfig):
    pool: str = field(default="", metadata={"help": "pool.manifest.json of the pool to take items out of"})
    list_file: str = field(default="", metadata={"help": "removal list (url/domain/uid/sha256/md5/phash lines)"})
    reason: str = field(default="", metadata={"help": "why (e.g. dmca_2026_11); the catalog status becomes removed_<reason>"})
    output: str = field(default="", metadata={"help": "folder of the new pool"})
    spark_above: int = field(default=SPARK_ABOVE_ROWS, metadata={"help": "pools with more catalog rows than this run on Spark; smaller ones in this process (the catalog read whole with pyarrow, the match and content scan in forked processes, shard rewrites on threads; the same files), unless a master is named or under spark-submit (0: always Spark, -1: only then)"})

    def validate(self) -> None:
        if self.spark_above < -1:
            raise ConfigError("spark_above must be >= 0, or -1 for Spark only when a master is named")
        if not self.pool:
            raise ConfigError("give --pool <pool.manifest.json> (the pool to take items out of)")
        if not self.list_file:
            raise ConfigError("give --list <removal list file>")
        if not self.output:
            raise ConfigError("give --output <folder> for the new pool")
        try:
            C.removed(self.reason or "")
        except ValueError as e:
            raise ConfigError(f"--reason: {e}") from None


CONFIG = TakedownConfig


# ----------------------------------------------------------------------------------------------
# matching


def _catalog_match_fn(rl: RemovalList) -> Any:
    """mapInPandas body: catalog rows (uid, status, url, shard, key, sha256) -> the rows the list names,
    with the first entry each hits (kind, value, line) and every line it hits (`lines`, comma-separated).
    A row an earlier takedown removed (status ``removed_*``) is never matched: it keeps that takedown's
    status and message (the audit log names it there), and this run does not count it again; the lines
    naming such rows come back in one row per partition with an empty kind (reported as already removed)."""

    # an earlier removal's message names the entry that removed the row ("... (phash <hex>)"): a content
    # entry of this list is known to name that row even though the catalog holds no pHash or md5
    by_entry: dict[tuple[str, str], int] = {}
    for text, first in rl.lines.values():
        kind, rest = text.split(" ", 1)
        by_entry.setdefault((kind, rest if kind == "url" else rest.split(" ")[0]), first)

    def fn(frames: Any) -> Any:
        import pandas as pd

        cols = ["uid", "status", "shard", "key", "kind", "value", "line", "lines"]

        def frame(out: list[tuple[Any, ...]]) -> Any:
            return pd.DataFrame(out, columns=cols).astype({"line": "int32"}) if out else pd.DataFrame(
                {c: pd.Series([], dtype="int32" if c == "line" else "object") for c in cols})

        earlier: set[int] = set()  # lines naming rows removed before: one row per partition says them all
        for df in frames:
            out = []
            for uid, status, url, shard, key, sha, err in zip(df[C.UID], df[C.STATUS], df[C.URL], df[C.SHARD], df[C.KEY], df[C.SHA256],
                                                              df[C.ERROR]):
                hits = rl.match_all(uid=uid, url=url, sha256=sha if isinstance(sha, str) else None)
                if isinstance(status, str) and status.startswith(C.REMOVED_PREFIX):
                    earlier.update(h.line for h in hits)
                    m = _REMOVED_BY.match(err) if isinstance(err, str) else None
                    if m and m.groups() in by_entry:
                        earlier.add(by_entry[m.groups()])
                    continue
                if not hits:
                    continue
                lines = ",".join(str(h.line) for h in hits)
                out.append((uid, status, shard, key, hits[0].kind, hits[0].value, hits[0].line, lines))
            yield frame(out)
        if earlier:
            yield frame([(None, None, None, None, "", "", -1, ",".join(map(str, sorted(earlier))))])

    return fn


# the message a takedown writes on a row it removes (see _takedown: "removed by takedown list ... line N (kind value)")
_REMOVED_BY = re.compile(r"^removed by takedown list [0-9a-f]+ line \d+ \((\w+) (.*)\)$")


def _lines_of(lines: str) -> set[int]:
    return {int(x) for x in lines.split(",") if x}


# why a content scan could not check a sample (counted in takedown.json and named in the text). A sample
# without an image member is not one: no listed image can be in it.
UNCHECKED_NO_PHASH = "image not decodable: no pHash to compare"
NOT_CHECKED_LISTED = 20  # of them, named in takedown.json (all are counted)
LINES_LISTED = 1000  # list lines that matched nothing (or only rows removed before), named in takedown.json (all are counted)


def scan_content(url: str, rl: RemovalList) -> list[tuple[str, str, str, str, int, str]]:
    """(key, uid, kind, value, line, lines) of every sample of the tar at `url` whose stored image bytes
    match a sha256/md5/phash entry of `rl` (the first entry it hits, and every line it hits, comma-separated);
    and, as (key, "", "unchecked", reason, -1, ""), every sample whose image
    does not decode when the list has pHash entries (its bytes still meet the sha256/md5 entries). Raises
    TakedownError naming the shard when it cannot be read."""
    import tarfile

    from laiontools.wds.samples import POOL_IMAGE_EXTS, iter_samples

    fs, p = url_to_fs(url)
    out = []
    try:
        with fs.open(p, "rb") as f:
            for key, parts in iter_samples(f, fs.size(p), suffixes=("json", *POOL_IMAGE_EXTS), on_duplicate="last"):
                img = next((parts[e] for e in POOL_IMAGE_EXTS if e in parts), None)
                if img is None:
                    continue
                h = content_hashes(img, bool(rl.phashes))
                if rl.phashes and h["phash"] is None:
                    out.append((key, "", "unchecked", UNCHECKED_NO_PHASH, -1, ""))
                hits = rl.match_all(sha256=h["sha256"], md5=h["md5"], phash=h["phash"])
                if hits:
                    hit = hits[0]
                    try:
                        meta = json.loads(parts.get("json") or b"{}")
                    except ValueError:
                        meta = None
                    # a .json that is no object, or whose uid is no string, gives no uid (the key and the
                    # content hash still name the sample)
                    uid = meta.get("uid") if isinstance(meta, dict) else None
                    uid = uid if isinstance(uid, str) else ""
                    out.append((key, uid, hit.kind, hit.value, hit.line, ",".join(str(x.line) for x in hits)))
    except (tarfile.TarError, OSError, EOFError) as e:
        refused = store_refusal(e, url)  # a store's refusal is no damage of the shard
        if refused is not None:
            raise refused from e
        raise TakedownError(f"shard {url} cannot be read ({type(e).__name__}: {e}); run `laiontools verify` on the pool") from e
    return out


# ----------------------------------------------------------------------------------------------
# rewriting one shard


def _end_of_archive(size: int) -> bytes:
    """Two zero blocks, then zeros up to tarfile's 10240-byte record, as Python's tarfile closes a tar."""
    import tarfile

    end = size + 2 * tarfile.BLOCKSIZE
    return bytes(2 * tarfile.BLOCKSIZE + (-end) % tarfile.RECORDSIZE)


def rewrite_shard(src: str, dst: str, remove: list[str], status: str, note: dict[str, Any],
                  codec: str = PARQUET_CODEC) -> dict[str, Any]:
    """Write `dst` = the tar `src` without the members of the samples keyed `remove`; its per-shard parquet
    (in `codec`: a Spark task's is the session's) and stats beside it; its ``.done`` marker last. Returns the
    marker info plus ``spans``: {key: (offset, length)} of the kept samples in `dst`. A marker naming the
    same source sha256 and list means done: the tar is kept and only its headers are read. Raises
    TakedownError when a key is not in the shard."""
    import tarfile

    from laiontools.wds.keys import base_plus_ext
    from laiontools.wds.tarscan import sample_spans, tar_members

    src_sha, src_bytes = note["source_sha256"], note["source_bytes"]
    done = read_marker(dst)
    if not (done and done.get("source_sha256") == src_sha and done.get("list_sha256") == note["list_sha256"]
            and done.get("removed_keys") == sorted(remove)):
        drop = set(remove)
        fs, p = url_to_fs(src)
        try:
            with fs.open(p, "rb") as f:
                members = tar_members(f, fs.size(p))
                found = {base_plus_ext(m[0])[0] for m in members} & drop
                if found != drop:
                    raise TakedownError(f"shard {src}: the catalog lists samples {sorted(drop - found)[:5]} in it but the tar "
                                        "has no such key; the catalog and shards disagree (run `laiontools verify` on the pool)")
                with atomic_open(dst) as out:
                    written = 0
                    for name, head, off, size, _ in members:
                        if base_plus_ext(name)[0] in drop:
                            continue
                        f.seek(head)
                        n = off + -(-size // tarfile.BLOCKSIZE) * tarfile.BLOCKSIZE - head
                        data = f.read(n)
                        if len(data) != n:
                            raise TakedownError(f"shard {src}: member {name} is cut short; run `laiontools verify` on the pool")
                        out.write(data)
                        written += n
                    out.write(_end_of_archive(written))
        except (tarfile.TarError, OSError, EOFError) as e:
            refused = store_refusal(e, src)
            if refused is not None:
                raise refused from e
            raise TakedownError(f"shard {src} cannot be read ({type(e).__name__}: {e}); run `laiontools verify` on the pool") from e
        kept_keys = {base_plus_ext(m[0])[0] for m in members} - drop - {None}
        kept = len(kept_keys)
        stats = _rewrite_sidecars(src, dst, drop, status, kept, codec)
        sha, nbytes = sha256_file(dst)
        done = {"sha256": sha, "bytes": nbytes, "num_samples": kept, "count": int(stats.get("count", kept)),
                "start_time": stats.get("start_time"), "end_time": stats.get("end_time"),
                "status_dict": stats.get("status_dict", {}), "source": note["source"], "source_sha256": src_sha,
                "source_bytes": src_bytes, "list_sha256": note["list_sha256"], "removed_keys": sorted(remove)}
        mark_done(dst, done)
        failpoints.pause("takedown.shard")  # fault tests: a shard rewritten (marker written), others not yet
    fs, p = url_to_fs(dst)
    with fs.open(p, "rb") as f:
        spans = sample_spans(tar_members(f, fs.size(p)))
    return {**done, "spans": spans}


def _sidecar(tar: str, suffix: str) -> str:
    return tar.removesuffix(".tar") + suffix


def _rewrite_sidecars(src: str, dst: str, drop: set[str], status: str, kept: int, codec: str = PARQUET_CODEC) -> dict[str, Any]:
    """img2dataset's per-shard parquet (every row kept; removed ones get `status`) and stats (successes =
    samples left, plus a takedown note) beside `dst`; returns the new stats. Missing sidecars are skipped."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    fs, _ = url_to_fs(src)
    sp = _sidecar(src, ".parquet")
    if fs.exists(url_to_fs(sp)[1]):
        with fs.open(url_to_fs(sp)[1], "rb") as f:
            t = pq.read_table(f, **PARQUET_READ)
        if "key" in t.column_names and "status" in t.column_names:
            keys = t.column("key").to_pylist()
            st = [status if k in drop else s for k, s in zip(keys, t.column("status").to_pylist())]
            t = t.set_column(t.column_names.index("status"), "status", pa.array(st, pa.string()))
        with atomic_open(_sidecar(dst, ".parquet")) as f:
            pq.write_table(t, f, **{**PARQUET_WRITE, "compression": codec})
    stats: dict[str, Any] = {}
    ss = _sidecar(src, "_stats.json")
    if fs.exists(url_to_fs(ss)[1]):
        stats = read_json(ss)
    stats = {**stats, "successes": kept, "takedown": {"removed": len(drop), "status": status}}
    write_json(_sidecar(dst, "_stats.json"), stats)
    return stats


# ----------------------------------------------------------------------------------------------
# the stage


def _safe_path(path: str) -> str:
    """`path` for the audit log: no user:password@ and no query string (signed URLs carry keys there)."""
    if "://" not in path:
        return abs_path(path)
    s = urlsplit(path)
    host = s.hostname or ""
    netloc = host + (f":{s.port}" if s.port else "")
    return urlunsplit((s.scheme, netloc, s.path, "", ""))


def _who() -> str:
    try:
        user = getpass.getuser()
    except (KeyError, OSError):  # no passwd entry (containers)
        user = "unknown"
    return f"{user}@{socket.gethostname()}"


def canonical_command(cfg: TakedownConfig) -> list[str]:
    """The recipe as a command line (absolute paths): the manifest records this, not sys.argv."""
    return ["laiontools", "takedown", "--pool", abs_path(cfg.pool), "--list", _safe_path(cfg.list_file),
            "--reason", cfg.reason, "--output", abs_path(cfg.output)]


def _check_settings(cfg: TakedownConfig, pool: PoolInfo, rl: RemovalList, status: str) -> None:
    """Refuse an output that holds the takedown of another pool, list or reason; record ours."""
    path = join(abs_path(cfg.output), layout.SETTINGS_JSON)
    ours = redact({"stage": STAGE, "pool": pool.path, "pool_sha256": pool.sha256, "list_sha256": rl.sha256, "status": status})
    fs, p = url_to_fs(path)
    if fs.exists(p):
        old = read_json(path)
        diff = sorted(k for k in ours if old.get(k) != ours[k])
        if diff:
            raise TakedownError(f"{cfg.output} holds a takedown with other {', '.join(diff)} ({[old.get(k) for k in diff]}); "
                                "give a new --output (each takedown is a new pool)")
    write_json(path, ours)


@stage_entry(STAGE)
def run(cfg: TakedownConfig, spark: Any = None) -> StageResult:
    """Take the listed items out of the pool into a new pool (see the module docstring).

    details = takedown.json's content. Raises RemovalListError (a malformed line, named; nothing written),
    ManifestError/InputError for an unreadable pool, TakedownError when the catalog and shards disagree.
    """
    rl = read_removal_list(cfg.list_file)  # before anything is written: a bad line leaves no trace
    pool = load_pool(cfg.pool)
    status = C.removed(cfg.reason)
    out = abs_path(cfg.output)
    if out.rstrip("/") == pool.path.rpartition("/")[0].rstrip("/"):
        raise TakedownError(f"--output {out} is the pool's own folder; a takedown writes a new pool next to the old one")
    ensure_output_dir(out)
    _check_settings(cfg, pool, rl, status)
    # read once: to choose the engine (a manifest without catalog.num_rows), then for Spark's columns
    footers = functools.cache(functools.partial(catalog_footers, pool))
    with stage_tasks(cfg, spark, app_name="laiontools-takedown", size=lambda: catalog_rows(pool, footers),
                     spark_above=cfg.spark_above) as tasks:
        eng = _LocalCatalog(pool) if tasks.local else _SparkCatalog(tasks, pool, footers())
        rep = _takedown(cfg, eng, pool, rl, status, out)
    return StageResult(
        outputs={"manifest": rep["pool"]["path"], "audit": join(out, layout.TAKEDOWN_AUDIT)},
        counts={"removed": rep["counts"]["samples_removed"], "catalog_rows_marked": rep["counts"]["catalog_rows_marked"],
                "shards_rewritten": rep["counts"]["shards_rewritten"], "shards_referenced": rep["counts"]["shards_referenced"]},
        details=rep, summary=rep["text"],
    )


def _takedown(cfg: TakedownConfig, eng: _SparkCatalog | _LocalCatalog, pool: PoolInfo, rl: RemovalList, status: str,
              out: str) -> dict[str, Any]:
    t0 = time.monotonic()
    cols = list(MATCH_COLUMNS)
    missing = [c for c in cols if c not in eng.columns]
    if missing:
        raise InputError(f"catalog {pool.catalog} lacks column(s) {missing}; it does not follow schemas/catalog.schema.json")
    rows = eng.match(rl, cols)
    # one match per (uid, status) row: the first entry the row hits; every line hit is kept, to name the
    # lines that matched nothing (and those that named only rows an earlier takedown removed)
    matched: dict[tuple[str, str], dict[str, Any]] = {}
    # catalog rows per matched (uid, status): a URL + caption repeated in the source leaves one success
    # row and a rejected_duplicate_uid row for each repeat, all of them marked by the catalog's rewrite
    rows_of: dict[tuple[str, str], int] = {}
    lines_hit: set[int] = set()
    lines_earlier: set[int] = set()
    for r in rows:
        if not r["kind"]:
            lines_earlier |= _lines_of(r["lines"])
            continue
        lines_hit |= _lines_of(r["lines"])
        rows_of[(r["uid"], r["status"])] = rows_of.get((r["uid"], r["status"]), 0) + 1
        matched.setdefault((r["uid"], r["status"]), {"uid": r["uid"], "status": r["status"], "shard": r["shard"], "key": r["key"],
                                                     "kind": r["kind"], "value": r["value"], "line": int(r["line"])})
    t_catalog = time.monotonic() - t0

    entries = {layout.shard_id(s["path"]): s for s in pool.manifest["shards"]}
    t1 = time.monotonic()
    content_scanned = 0
    unchecked: list[tuple[str, str, str]] = []  # (shard, key, reason): samples the content entries could not be checked on
    if rl.sha256s or rl.md5s or rl.phashes:
        ids = sorted(entries)
        urls = [resolve(pool.path, entries[i]["path"]) for i in ids]
        with task_errors_as(TakedownError):
            hits = eng.tasks.map(functools.partial(_scan_partition, rl), list(zip(ids, urls)), processes=True,
                                 description=f"laiontools takedown: scan {len(ids)} shard(s) for content entries")
        content_scanned = len(ids)
        # which catalog row a stored sample is: its success row by uid (the sample's json) and shard/key
        by_sample = {(m["shard"], m["key"]) for m in matched.values() if m["status"] == C.STATUS_SUCCESS}
        for sid, key, uid, kind, value, line, lines in hits:
            if kind == "unchecked":
                unchecked.append((sid, key, value))
                continue
            lines_hit |= _lines_of(lines)
            if (sid, key) in by_sample:
                continue
            if not uid:
                raise TakedownError(f"shard {resolve(pool.path, entries[sid]['path'])}: sample {key} matches {kind} {value} "
                                    f"(line {line}) but has no uid in its .json; the pool does not follow the layout")
            matched.setdefault((uid, C.STATUS_SUCCESS), {"uid": uid, "status": C.STATUS_SUCCESS, "shard": sid, "key": key,
                                                         "kind": kind, "value": value, "line": int(line)})
    _mark_rows_of_content_matches(eng, matched, rows_of)
    t_content = time.monotonic() - t1
    # the list's lines that matched no row of this pool (a repeated value counts as its first line)
    unmatched = [(ln, text) for ln, (text, first) in sorted(rl.lines.items()) if first not in lines_hit]
    already = [(ln, text) for ln, text in unmatched if rl.lines[ln][1] in lines_earlier]
    unmatched = [(ln, text) for ln, text in unmatched if rl.lines[ln][1] not in lines_earlier]

    removed = sorted((m for m in matched.values() if m["status"] == C.STATUS_SUCCESS), key=lambda m: m["uid"])
    other = sorted((m for m in matched.values() if m["status"] != C.STATUS_SUCCESS), key=lambda m: (m["uid"], m["status"]))
    by_shard: dict[str, list[str]] = {}
    for m in removed:
        if m["shard"] not in entries:
            raise TakedownError(f"catalog {pool.catalog}: sample {m['uid']} is in shard {m['shard']}, which pool {pool.path} "
                                "does not list; the catalog and manifest disagree (run `laiontools verify`)")
        by_shard.setdefault(m["shard"], []).append(m["key"])

    # 1. rewrite the shards holding a match (one Spark task each), reference the others
    t2 = time.monotonic()
    jobs = []
    for sid in sorted(by_shard):
        e = entries[sid]
        src = resolve(pool.path, e["path"])
        jobs.append((sid, src, join(out, layout.SHARDS_DIR, _tail(e["path"])),
                     sorted(by_shard[sid]), {"source": abs_path(src), "source_sha256": e["sha256"], "source_bytes": e["bytes"],
                                             "list_sha256": rl.sha256}))
    rewritten: dict[str, dict[str, Any]] = {}
    if jobs:
        with task_errors_as(TakedownError):
            rewritten = dict(eng.tasks.map(functools.partial(_rewrite_partition, status, eng.tasks.parquet_codec()), jobs,
                                           description=f"laiontools takedown: rewrite {len(jobs)} shard(s)"))
    t_shards = time.monotonic() - t2

    # 2. catalog: statuses of matched rows, spans of rewritten shards, everything else as it was
    t3 = time.monotonic()
    note = {(m["uid"], m["status"]): f"removed by takedown list {rl.sha256[:12]} line {m['line']} ({m['kind']} {m['value']})"
            for m in matched.values()}
    spans = {(sid, k): (int(o), int(n_)) for sid, info in rewritten.items() for k, (o, n_) in info["spans"].items()}
    n_rows = pool.manifest.get("catalog", {}).get("num_rows") or eng.count()
    final = join(out, layout.CATALOG_DIR)
    # a killed run's half-written catalog and the one it was replacing are removed: the catalog is
    # rebuilt from the parent's whole
    tmp = swap_temp(final)
    eng.write_catalog(tmp, note, spans, status, n_rows)
    failpoints.pause("takedown.catalog")  # fault tests: the new catalog written aside, not swapped in
    swap_in(tmp, final)
    uid_sha, n_uids = eng.save_uids(final, join(out, layout.POOL_UIDS))
    t_catalog += time.monotonic() - t3
    expected = pool.manifest["num_samples"] - len(removed)
    if n_uids != expected:
        raise TakedownError(f"new pool has {n_uids} samples, expected {pool.manifest['num_samples']} - {len(removed)} = {expected}; "
                            f"the catalog of {pool.path} and its uid file disagree (run `laiontools verify`)")

    # 3. manifest: parent = the old one; untouched shards referenced where they are
    listed = []
    per_shard_removed = {sid: len(keys) for sid, keys in by_shard.items()}
    for s in pool.manifest["shards"]:
        sid = layout.shard_id(s["path"])
        if sid in rewritten:
            info = rewritten[sid]
            ent = {**s, "path": layout.SHARDS_DIR + "/" + _tail(s["path"]), "num_samples": s["num_samples"] - per_shard_removed[sid],
                   "bytes": info["bytes"], "sha256": info["sha256"], "parent_sha256": s["sha256"]}
            if "tar_samples" in s:
                ent["tar_samples"] = info["num_samples"]
            listed.append(ent)
        else:
            listed.append({**s, "path": abs_path(resolve(pool.path, s["path"]))})
    counts = {
        "samples_removed": len(removed), "catalog_rows_marked": sum(rows_of.get((m["uid"], m["status"]), 1) for m in matched.values()),
        "catalog_rows_without_sample": sum(rows_of.get((m["uid"], m["status"]), 1) for m in other), "shards_rewritten": len(rewritten),
        "shards_referenced": len(listed) - len(rewritten), "shards_content_scanned": content_scanned,
        "by_kind": {k: sum(1 for m in matched.values() if m["kind"] == k) for k in sorted({m["kind"] for m in matched.values()})},
        "samples_before": pool.manifest["num_samples"], "samples_after": n_uids,
        "samples_not_content_checked": {r: sum(1 for u in unchecked if u[2] == r) for r in sorted({u[2] for u in unchecked})},
        "lines_matching_nothing": len(unmatched), "lines_already_removed": len(already),
    }
    listing = {"path": _safe_path(cfg.list_file), "sha256": rl.sha256, "entries": rl.entries}
    m = new_manifest(
        name=pool.manifest["name"], kind="pool", num_samples=n_uids, target_samples=pool.manifest.get("target_samples"),
        uids={"path": layout.POOL_UIDS, "sha256": uid_sha, "count": n_uids}, shards=listed,
        source_fingerprint=pool.fingerprint, parent={"name": pool.manifest["name"], "sha256": pool.sha256, "path": pool.path},
        command=canonical_command(cfg), catalog={"path": layout.CATALOG_DIR, "num_rows": int(n_rows)},
        takedown={"list": listing, "reason": cfg.reason, "status": status,
                  **{k: v for k, v in counts.items() if k not in ("shards_content_scanned", "samples_not_content_checked", "lines_matching_nothing",
                                                                  "lines_already_removed")}},
    )
    m["short"] = pool.manifest.get("short", False)
    for k in ("download",):  # the images are the parent's: its download settings still describe them
        if k in pool.manifest:
            m[k] = pool.manifest[k]
    m_path = join(out, layout.POOL_MANIFEST)
    m_sha = write_manifest(m_path, m, run=eng.run_record)
    failpoints.pause("takedown.final-write")  # fault tests: manifest written, report and audit line not yet

    # 4. this run's report, then the audit line, last (after the manifest it describes): a run killed
    # before it left no line, so its re-run adds exactly one, as an uninterrupted run does
    entry = {
        "time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "who": _who(), "tool": f"laiontools {__version__}",
        "parent": {"name": pool.manifest["name"], "path": pool.path, "sha256": pool.sha256},
        "pool": {"path": m_path, "sha256": m_sha}, "list": listing, "reason": cfg.reason, "status": status,
        "counts": counts, "per_shard": dict(sorted(per_shard_removed.items())), "uids": [r["uid"] for r in removed],
        "catalog_rows_without_sample": [{"uid": r["uid"], "status": r["status"]} for r in other],
        "matched_nothing": not matched,
        # a line that named nothing here: the pool never held it (or a content entry met no stored image)
        "lines_matching_nothing": [{"line": ln, "entry": text} for ln, text in unmatched[:LINES_LISTED]],
        "lines_already_removed": [{"line": ln, "entry": text} for ln, text in already[:LINES_LISTED]],
        "not_content_checked": [f"{sid}/{key}: {why}" for sid, key, why in sorted(unchecked)[:NOT_CHECKED_LISTED]],
    }
    old_audit = _read_audit(out, pool)
    n_audit = old_audit.count(b"\n") + 1
    text = _text(entry, pool, m_path, n_audit)
    rep = {**entry, "removed": removed, "catalog_rows": other, "audit_entries": n_audit,
           "timings": {"catalog": round(t_catalog, 3), "content": round(t_content, 3), "shards": round(t_shards, 3)}}
    write_json(join(out, layout.TAKEDOWN_JSON), rep)
    with atomic_open(join(out, layout.TAKEDOWN_TXT)) as f:
        f.write((text + "\n").encode())
    _write_audit(out, old_audit, entry)
    rep["text"] = text
    return rep


_CONTENT_KINDS = ("sha256", "md5", "phash")


def _mark_rows_of_content_matches(eng: _SparkCatalog | _LocalCatalog, matched: dict[tuple[str, str], dict[str, Any]],
                                  rows_of: dict[tuple[str, str], int]) -> None:
    """Add to `matched` the other catalog rows of every uid whose stored sample a content entry
    (sha256 / md5 / pHash) removed, with that sample's entry and line, counting them in `rows_of`
    (rows per (uid, status)) unless the catalog match had already counted that (uid, status).

    A content entry names a stored image, so it hits the sample's success row only; the uid's other
    rows (a `rejected_duplicate_uid` row: the same URL + caption) hold no image to compare. A uid or
    url entry marks them (they share both), so without this a takedown by content left the same item
    unmarked in the catalog that the same takedown by uid marks. Rows an earlier takedown removed
    keep their stamp, as in the catalog match."""
    by_uid = {m["uid"]: m for m in matched.values() if m["status"] == C.STATUS_SUCCESS and m["kind"] in _CONTENT_KINDS}
    if not by_uid:
        return
    known = set(matched)
    for uid, st, shard, key in eng.other_rows(sorted(by_uid)):
        m = by_uid[uid]
        if (uid, st) not in known:
            rows_of[(uid, st)] = rows_of.get((uid, st), 0) + 1
        matched.setdefault((uid, st), {"uid": uid, "status": st, "shard": shard, "key": key,
                                       "kind": m["kind"], "value": m["value"], "line": m["line"]})


def _scan_partition(rl: RemovalList, items: Any) -> Any:
    """Task function: (shard id, tar url) items -> (shard id, *a :func:`scan_content` hit) rows."""
    for sid, url in items:
        for h in _in_task(scan_content, url, rl):
            yield (sid, *h)


def _rewrite_partition(status: str, codec: str, items: Any) -> Any:
    """Task function: rewrite jobs (shard id, source, destination, keys removed, note) -> (shard id, info)."""
    for sid, src, dst, keys, note in items:
        yield sid, _in_task(rewrite_shard, src, dst, keys, status, note, codec)


# ----------------------------------------------------------------------------------------------
# the catalog: on Spark, or read whole in this process (pools under --spark-above catalog rows)


class _SparkCatalog:
    """The catalog steps of a takedown as Spark jobs: the match (``mapInPandas``), the other rows of
    content-matched uids (a broadcast join), the new catalog (two broadcast joins, range-partitioned
    and sorted by (uid, status)) and its uid file."""

    def __init__(self, tasks: Tasks, pool: PoolInfo, footers: list[tuple[str, int, Any]]) -> None:
        """`footers`: :func:`catalog_footers` of the pool, read by the caller (once per run)."""
        self.tasks, self.spark = tasks, tasks.spark
        # The new pool's uid file is a distinct + range sort of its success rows: partitions follow the
        # pool's size unless the user set spark.sql.shuffle.partitions (Spark's 200 otherwise).
        self.run_record = spark_run_record(self.spark, int(pool.manifest["num_samples"]))
        # Every file holds the columns the match reads (Spark takes its columns from one file and reads
        # another's missing column as nulls: a url entry would silently pass that file's rows by), and a
        # column a file stores with Arrow's null type is read as nulls of the catalog's type (spark_read_catalog).
        self.rows = sum(n for _, n, _ in footers)  # the catalog's rows (count() reads them here, not by a job)
        for path, _, schema in footers:
            refuse_lacking_columns(pool, path, schema.names, MATCH_COLUMNS)
        self.cat = spark_read_catalog(self.spark, pool, footers)
        self.columns = list(self.cat.columns)

    def match(self, rl: RemovalList, cols: list[str]) -> list[Any]:
        return self.cat.select(*cols).mapInPandas(_catalog_match_fn(rl), _MATCH_SCHEMA).collect()

    def count(self) -> int:
        return int(self.rows)

    def other_rows(self, uids: list[str]) -> list[tuple[str, str, str | None, str | None]]:
        """(uid, status, shard, key) of every row of `uids` that is neither a success nor removed before."""
        from pyspark.sql import functions as F

        u_df = self.spark.createDataFrame([(u,) for u in uids], "_cuid string")
        return [tuple(r) for r in (
            self.cat.select(C.UID, C.STATUS, C.SHARD, C.KEY).join(F.broadcast(u_df), F.col(C.UID) == u_df["_cuid"])
            .where((F.col(C.STATUS) != C.STATUS_SUCCESS) & ~F.col(C.STATUS).startswith(C.REMOVED_PREFIX))
            .select(C.UID, C.STATUS, C.SHARD, C.KEY).collect())]

    def write_catalog(self, folder: str, note: dict[tuple[str, str], str], spans: dict[tuple[str, str], tuple[int, int]],
                      status: str, n_rows: int) -> None:
        """The parent's catalog with the matched rows' status and message, and the rewritten shards' spans,
        written into `folder` sorted by (uid, status), as download writes it."""
        from pyspark.sql import functions as F

        spark = self.spark
        rm_df = spark.createDataFrame([(u, st, msg) for (u, st), msg in sorted(note.items())] or [("", "", "")], "_ruid string, _rstatus string, _rmsg string")
        sp_df = spark.createDataFrame([(sid, k, o, n) for (sid, k), (o, n) in spans.items()] or [("", "", 0, 0)],
                                      "_ssid string, _skey string, _soff long, _slen long")
        full = self.cat
        order = full.columns
        j = (full.join(F.broadcast(rm_df), (full[C.UID] == rm_df["_ruid"]) & (full[C.STATUS] == rm_df["_rstatus"]), "left")
             .join(F.broadcast(sp_df), (F.col(C.SHARD) == sp_df["_ssid"]) & (F.col(C.KEY) == sp_df["_skey"]), "left"))
        hit = F.col("_ruid").isNotNull()
        repl = {
            C.STATUS: F.when(hit, F.lit(status)).otherwise(F.col(C.STATUS)),
            C.ERROR: F.when(hit, F.col("_rmsg")).otherwise(F.col(C.ERROR)),
        }
        if C.TAR_OFFSET in order and C.TAR_LENGTH in order:
            moved = F.col("_ssid").isNotNull()
            repl[C.TAR_OFFSET] = F.when(hit, F.lit(None)).when(moved, F.col("_soff")).otherwise(F.col(C.TAR_OFFSET))
            repl[C.TAR_LENGTH] = F.when(hit, F.lit(None)).when(moved, F.col("_slen")).otherwise(F.col(C.TAR_LENGTH))
        if C.TAR_SHA256 in order:
            # a kept sample's span holds the same bytes in the rewritten tar (members copied verbatim): same hash;
            # a removed one has no span any more, so no span hash (the schema: null where tar_offset is)
            repl[C.TAR_SHA256] = F.when(hit, F.lit(None)).otherwise(F.col(C.TAR_SHA256))
        types = dict(full.dtypes)
        newcat = j.select(*[(repl[c].cast(types[c]) if c in repl else F.col(f"`{c}`")).alias(c) for c in order])
        n_parts = max(1, math.ceil(n_rows / CATALOG_ROWS_PER_FILE))
        spark_write_parquet(newcat.repartitionByRange(n_parts, C.UID, C.STATUS).sortWithinPartitions(C.UID, C.STATUS), folder)

    def save_uids(self, catalog: str, path: str) -> tuple[str, int]:
        """The uid file of the success rows of the catalog at `catalog`: (sha256, count)."""
        from pyspark.sql import functions as F

        from laiontools.contracts.uids import save_uids_spark

        newcat = spark_read_parquet(self.spark, catalog)
        # (the new catalog's rows are the old one's, one a uid: no distinct; a repeat would raise, naming the uid)
        [(sha, n)] = save_uids_spark(newcat.where(F.col(C.STATUS) == C.STATUS_SUCCESS), C.UID, [path], distinct=False)
        return sha, n


def _in_uid_status_order(t: Any) -> bool:
    """Whether the rows of `t` are in (uid, status) order (both columns hold no null: the catalog schema)."""
    import pyarrow.compute as pc

    if t.num_rows < 2:
        return True
    uid, st = t[C.UID].combine_chunks(), t[C.STATUS].combine_chunks()
    u0, u1, s0, s1 = uid.slice(0, len(uid) - 1), uid.slice(1), st.slice(0, len(st) - 1), st.slice(1)
    ok = pc.or_(pc.less(u0, u1), pc.and_(pc.equal(u0, u1), pc.less_equal(s0, s1)))
    return bool(pc.all(ok).as_py())


class _LocalCatalog:
    """:class:`_SparkCatalog`'s steps on the catalog read whole with pyarrow (pools under --spark-above
    catalog rows): the same rows matched, the same new catalog and uid file. The match and the content
    scan (Python per row, per image) run in forked processes, the shard rewrites on threads."""

    def __init__(self, pool: PoolInfo) -> None:
        from laiontools.contracts.pool import read_catalog

        self.tasks = Tasks(None)
        self.run_record: dict[str, Any] = {"engine": "in-process"}
        self.cat = read_catalog(pool, required=MATCH_COLUMNS)
        self.columns = list(self.cat.column_names)
        self.new: Any = None  # the catalog written, kept for its uid file

    def match(self, rl: RemovalList, cols: list[str]) -> list[dict[str, Any]]:
        """The match function over slices of the catalog, in forked processes (one per core: it is
        Python per row, URL parsing mostly), as Spark runs it over partitions."""
        t, step, fn = self.cat.select(cols), 65_536, _catalog_match_fn(rl)

        def part(starts: Any) -> Any:
            for lo in starts:
                for df in fn(iter([t.slice(lo, step).to_pandas()])):
                    yield from df.to_dict("records")

        return self.tasks.map(part, list(range(0, max(1, t.num_rows), step)), processes=True,
                              description="laiontools takedown: match the catalog")

    def count(self) -> int:
        return int(self.cat.num_rows)

    def other_rows(self, uids: list[str]) -> list[tuple[str, str, str | None, str | None]]:
        import pyarrow as pa
        import pyarrow.compute as pc

        t = self.cat.select([C.UID, C.STATUS, C.SHARD, C.KEY])
        t = t.filter(pc.is_in(t[C.UID], value_set=pa.array(uids, pa.string())))
        st = t[C.STATUS]
        t = t.filter(pc.and_(pc.not_equal(st, C.STATUS_SUCCESS), pc.invert(pc.starts_with(st, C.REMOVED_PREFIX))))
        return list(zip(*(t[c].to_pylist() for c in (C.UID, C.STATUS, C.SHARD, C.KEY))))

    def write_catalog(self, folder: str, note: dict[tuple[str, str], str], spans: dict[tuple[str, str], tuple[int, int]],
                      status: str, n_rows: int) -> None:
        import numpy as np
        import pyarrow as pa
        import pyarrow.compute as pc

        from laiontools.core.storage import write_parquet_dir

        cat = self.cat

        def rows_in(col: str, values: set[str]) -> np.ndarray:
            return np.flatnonzero(pc.fill_null(pc.is_in(cat[col], value_set=pa.array(sorted(values), pa.string())),
                                               False).to_numpy(zero_copy_only=False))

        def keyed(col_a: str, col_b: str, wanted: dict[tuple[str, str], Any]) -> dict[int, Any]:
            """row -> wanted[(a, b)] for the rows whose (a, b) is wanted: looked for among the few rows whose
            `col_a` is named at all (the left joins of :meth:`_SparkCatalog.write_catalog`)."""
            rows = rows_in(col_a, {a for a, _ in wanted})
            pairs = zip(cat[col_a].take(rows).to_pylist(), cat[col_b].take(rows).to_pylist())
            return {int(i): wanted[k] for i, k in zip(rows, pairs) if k in wanted}

        hit = keyed(C.UID, C.STATUS, note)
        moved = {i: v for i, v in keyed(C.SHARD, C.KEY, spans).items() if i not in hit}

        def replaced(col: str, values: dict[int, Any]) -> Any:
            rows = sorted(values)
            mask = np.zeros(cat.num_rows, dtype=bool)
            mask[rows] = True
            return pc.replace_with_mask(cat[col].combine_chunks(), pa.array(mask),
                                        pa.array([values[i] for i in rows], cat.schema.field(col).type))

        repl = {C.STATUS: dict.fromkeys(hit, status), C.ERROR: hit}
        if C.TAR_OFFSET in self.columns and C.TAR_LENGTH in self.columns:
            repl[C.TAR_OFFSET] = {**dict.fromkeys(hit), **{i: v[0] for i, v in moved.items()}}
            repl[C.TAR_LENGTH] = {**dict.fromkeys(hit), **{i: v[1] for i, v in moved.items()}}
        if C.TAR_SHA256 in self.columns:
            repl[C.TAR_SHA256] = dict.fromkeys(hit)  # the kept samples' bytes are the same in the new tar
        new = cat
        for col, values in repl.items():
            if values:
                new = new.set_column(self.columns.index(col), cat.schema.field(col), replaced(col, values))
        self.cat = None  # (its columns are shared with `new`; nothing else needs it)
        # The parent's catalog is sorted by (uid, status) and a new status seldom moves a row among its uid's
        # rows: sorted again (a copy of every column) only when the order no longer holds.
        self.new = new if _in_uid_status_order(new) else new.sort_by([(C.UID, "ascending"), (C.STATUS, "ascending")])
        write_parquet_dir(self.new, folder, rows_per_file=CATALOG_ROWS_PER_FILE)

    def save_uids(self, catalog: str, path: str) -> tuple[str, int]:
        import pyarrow.compute as pc

        from laiontools.contracts.uids import arrow_to_array, save_uids

        ok = self.new.filter(pc.equal(self.new[C.STATUS], C.STATUS_SUCCESS))[C.UID].combine_chunks()
        return save_uids(path, arrow_to_array(ok), distinct=False)


def _tail(shard_path: str) -> str:
    """A shard's path under shards/ (kept by its rewritten copy, so its id stays): '.../shards/retry01/3.tar' -> 'retry01/3.tar'."""
    sid_path = shard_path.removeprefix(layout.SHARDS_DIR + "/")
    return sid_path.rpartition("/" + layout.SHARDS_DIR + "/")[2] if "/" + layout.SHARDS_DIR + "/" in sid_path else sid_path


def _read_audit(out: str, pool: PoolInfo) -> bytes:
    """The audit log this run appends to: <out>/takedown.audit.jsonl, or the parent pool's log when this
    folder has none yet (b"" when neither exists); refused when it does not end with a newline."""
    path = join(out, layout.TAKEDOWN_AUDIT)
    fs, p = url_to_fs(path)
    if fs.exists(p):
        with fs.open(p, "rb") as f:
            old = f.read()
    else:
        parent = layout.takedown_audit_of(pool.path)
        pfs, pp = url_to_fs(parent)
        old = b""
        if pfs.exists(pp):
            with pfs.open(pp, "rb") as f:
                old = f.read()
        elif pool.manifest.get("takedown"):
            # a takedown pool without its log: its run stopped before the audit line; going on would start the
            # pool's audit history over with this run's line alone
            raise TakedownError(
                f"the pool {pool.path} was made by a takedown, but {parent} is missing (that takedown run stopped "
                "before its last step): run that takedown command again to finish it, then this one"
            )
    if old and not old.endswith(b"\n"):
        raise TakedownError(f"audit log {path} does not end with a newline (cut short?); it was not changed: repair it by hand")
    return old


def _write_audit(out: str, old: bytes, entry: dict[str, Any]) -> None:
    """<out>/takedown.audit.jsonl = `old` + `entry` as one line, rewritten whole through atomic_open
    (object stores have no append): the log is only ever added to."""
    line = json.dumps(entry, sort_keys=True, ensure_ascii=False) + "\n"
    with atomic_open(join(out, layout.TAKEDOWN_AUDIT)) as f:
        f.write(old + line.encode())


def _text(entry: dict[str, Any], pool: PoolInfo, m_path: str, n_audit: int) -> str:
    c = entry["counts"]
    if entry["matched_nothing"]:
        head = (f"takedown: the list {entry['list']['path']} ({entry['list']['entries']} entries) matched nothing in {pool.path}: "
                f"no sample removed, no shard rewritten; the new pool {m_path} holds the parent's data unchanged "
                f"({c['samples_after']:,} samples)")
    else:
        head = (f"takedown: removed {c['samples_removed']:,} sample(s) ({c['samples_before']:,} -> {c['samples_after']:,}), "
                f"marked {c['catalog_rows_without_sample']:,} more catalog row(s) without a stored sample; rewrote "
                f"{c['shards_rewritten']} shard(s), referenced {c['shards_referenced']} unchanged; status {entry['status']}")
    rows = [{"kind": k, "matched": f"{v:,}"} for k, v in c["by_kind"].items()]
    shards = [{"shard": s, "removed": n} for s, n in entry["per_shard"].items()]
    parts = [head]
    missed = c.get("samples_not_content_checked") or {}
    if missed:  # a "matched nothing" says nothing about the samples the content entries could not be compared with
        parts.append(f"note: {sum(missed.values()):,} sample(s) could not be checked against the list's content entries ("
                     + "; ".join(f"{why}: {n:,}" for why, n in missed.items()) + "), e.g. "
                     + ", ".join(x.split(":", 1)[0] for x in entry["not_content_checked"][:5])
                     + f"; up to {NOT_CHECKED_LISTED} listed in {layout.TAKEDOWN_JSON}")
    for what, key in (("matched nothing in this pool", "lines_matching_nothing"),
                      ("named only samples an earlier takedown removed (see the audit log)", "lines_already_removed")):
        n = c.get(key) or 0
        if n:
            named = entry[key]
            parts.append(f"note: {n:,} line(s) of the list {what}: "
                         + "; ".join(f"line {x['line']}: {x['entry']}" for x in named[:5]) + ("; ..." if n > 5 else "")
                         + f" (up to {LINES_LISTED} named in {layout.TAKEDOWN_JSON})")
    if rows:
        parts.append("by kind\n" + table(rows))
    if shards:
        parts.append("by shard\n" + table(shards))
    parts.append(f"new pool: {m_path}\naudit log: {n_audit} entr{'y' if n_audit == 1 else 'ies'} "
                 f"({layout.takedown_audit_of(m_path)})")
    return "\n\n".join(parts)


def build_parser() -> argparse.ArgumentParser:
    p = config_parser(TakedownConfig, prog="laiontools takedown", skip=("list_file",),
                      description="Remove what a removal list names from a pool into a new pool (parent recorded, audit log).")
    p.add_argument("--list", dest="list_file", default=argparse.SUPPRESS,
                   help="removal list: one 'url|domain|uid|sha256|md5|phash <value>' per line (laiontools.contracts.removal)")
    return p


def main(argv: list[str] | None = None) -> int:
    from laiontools.core.stage import stage_main

    return stage_main(__name__, argv)

