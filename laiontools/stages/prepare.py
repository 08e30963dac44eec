"""prepare: source metadata -> normalized, uid-keyed, policy-checked download work units (Spark).

Every input row ends in exactly one place: ``prepared/accepted/part-NNNNN.parquet`` (rows img2dataset
will fetch, in input order, each file a whole number of download shards) or ``prepared/rejected/``
(catalog-shaped rows with ``status = rejected_<reason>``). The driver only lists files and reads
their footers/headers; rows are read, normalized and checked inside Spark tasks, so driver memory
does not grow with the input.
"""

from __future__ import annotations

import dataclasses
import ipaddress
import json
import logging
from collections.abc import Iterator
from typing import Any

from laiontools.contracts import layout
from laiontools.contracts import schema as C
from laiontools.contracts.profiles import (
    NUMERIC_FIELDS,
    SOURCE_HEIGHT,
    SOURCE_SHA256,
    SOURCE_WIDTH,
    parse_column_map,
    resolve_profile,
)
from laiontools.contracts.uids import compute_uid, normalize_caption, normalize_url
from laiontools.core.config import ConfigError
from laiontools.core.errors import InputError, TaskError, task_error, user_error_from
from laiontools.core.spark import shuffle_partitions
from laiontools.core.stage import SparkStageConfig, StageResult, stage_entry, stage_spark
from laiontools.core.storage import (
    is_done,
    join,
    mark_done,
    read_json,
    sha256_bytes,
    spark_write_parquet,
    url_to_fs,
    write_json,
)
from laiontools.web.blocklist import load_blocklist
from laiontools.web.policy import check_url

log = logging.getLogger(__name__)

FORMATS = {
    ".parquet": "parquet",
    ".csv": "csv", ".csv.gz": "csv",
    ".tsv": "tsv", ".tsv.gz": "tsv",
    ".jsonl": "jsonl", ".jsonl.gz": "jsonl", ".json": "jsonl", ".json.gz": "jsonl",
}
# Marker in exception text so that an input error raised inside a Spark task reaches the user as
# itself, not as a Java stack trace.

# Columns of the prepared rows, before extra source columns.
PREPARED_FIELDS: list[tuple[str, str]] = [
    ("file_idx", "int"), ("row_idx", "bigint"), (C.UID, "string"), (C.SOURCE_ID, "string"),
    (C.URL, "string"), (C.CAPTION, "string"), (C.SIMILARITY, "double"), (C.PUNSAFE, "double"),
    (C.PWATERMARK, "double"), (C.LICENSE, "string"), (C.NSFW, "string"), (SOURCE_WIDTH, "bigint"),
    (SOURCE_HEIGHT, "bigint"), (SOURCE_SHA256, "string"), (C.STATUS, "string"), (C.ERROR, "string"),
]


def prepared_type(name: str) -> str:
    """Spark type of a prepared column (extra source columns are text)."""
    return dict(PREPARED_FIELDS).get(name, "string")


# What img2dataset carries into each sample's json and its shard parquet (besides url and caption).
DOWNLOAD_COLUMNS = [C.UID, C.SOURCE_ID, C.SIMILARITY, C.PUNSAFE, C.PWATERMARK, C.LICENSE, C.NSFW,
                    SOURCE_WIDTH, SOURCE_HEIGHT, SOURCE_SHA256]


@dataclasses.dataclass
class PrepareConfig(SparkStageConfig):
    input: str = dataclasses.field(default="", metadata={"help": "source metadata: a file or folder (parquet/csv/tsv/jsonl, .gz ok), local or fsspec URL"})
    output: str = dataclasses.field(default="", metadata={"help": "pool output folder"})
    profile: str | None = dataclasses.field(default=None, metadata={"help": "laion400m | laion2b-en | datacomp | generic (default: detected)"})
    columns: str | None = dataclasses.field(default=None, metadata={"help": "column mapping overrides, e.g. url=MyUrl,caption=MyText"})
    allow_private_network: bool = dataclasses.field(default=False, metadata={"help": "allow every private/loopback/link-local target (intranet mirrors)"})
    allow_networks: list[str] = dataclasses.field(default_factory=list, metadata={"help": "allow only these private networks/hosts, e.g. 127.0.0.0/8 (tests and the demo serve on 127.0.0.1)"})
    blocklist: str | None = dataclasses.field(default=None, metadata={"help": "file of URLs, domains and sha256/md5 content hashes never to download (one per line; see laiontools.web.blocklist); every executor must be able to read it"})
    resolve_hosts: bool = dataclasses.field(default=False, metadata={"help": "also resolve host names in prepare and reject those resolving to private addresses (download always re-checks at connect time)"})
    max_url_length: int = dataclasses.field(default=2048, metadata={"help": "longer URLs are rejected"})
    max_caption_length: int = dataclasses.field(default=2048, metadata={"help": "longer captions (characters) are rejected"})
    require_caption: bool = dataclasses.field(default=True, metadata={"help": "reject rows without a caption"})
    number_sample_per_shard: int = dataclasses.field(default=10000, metadata={"help": "rows per download shard"})
    shards_per_file: int = dataclasses.field(default=10, metadata={"help": "download shards per prepared input file"})

    def validate(self) -> None:
        if not self.input or not self.output:
            raise ConfigError("--input (source metadata) and --output (pool folder) are required")
        if self.number_sample_per_shard < 1 or self.shards_per_file < 1:
            raise ConfigError("number_sample_per_shard and shards_per_file must be >= 1")
        for net in self.allow_networks:
            try:
                ipaddress.ip_network(net, strict=False)
            except ValueError as e:
                raise ConfigError(f"allow_networks entry {net!r} is not an IP network (e.g. 127.0.0.0/8): {e}") from e
        if self.max_url_length < 10 or self.max_caption_length < 1:
            raise ConfigError("max_url_length must be >= 10 and max_caption_length >= 1")


# ----------------------------------------------------------------------------- input discovery (driver)


@dataclasses.dataclass
class SourceFile:
    idx: int
    path: str
    fmt: str
    compression: str | None
    columns: list[str]
    size: int
    row_groups: list[int] | None  # parquet row-group sizes, for splitting work


def _fmt_of(path: str) -> tuple[str, str | None]:
    low = path.lower()
    for ext in sorted(FORMATS, key=len, reverse=True):
        if low.endswith(ext):
            return FORMATS[ext], ("gzip" if low.endswith(".gz") else None)
    raise InputError(f"{path}: unknown metadata format; expected one of {sorted(FORMATS)}")


def list_source_files(path: str) -> list[tuple[str, str, str | None, int]]:
    """(path, format, compression, size) of every metadata file at `path`, sorted. Raises InputError."""
    fs, p = url_to_fs(path)
    if not fs.exists(p):
        raise InputError(f"input {path} does not exist; give a metadata file or a folder of them")
    proto = path.split("://", 1)[0] + "://" if "://" in path else ""
    if fs.isdir(p):
        found = []
        for f in sorted(fs.find(p)):
            name = f.rsplit("/", 1)[-1]
            if name.startswith((".", "_")):
                continue
            try:
                fmt, comp = _fmt_of(f)
            except InputError:
                continue
            found.append((proto + f if proto and not f.startswith(proto) else f, fmt, comp, int(fs.size(f))))
        if not found:
            raise InputError(f"input folder {path} holds no metadata files ({', '.join(sorted(FORMATS))})")
        files = found
    else:
        fmt, comp = _fmt_of(p)
        files = [(path, fmt, comp, int(fs.size(p)))]
    for f, _, _, size in files:
        if size == 0:
            raise InputError(f"input file {f} is empty (0 bytes); remove it or regenerate it")
    return files


def _open_text(path: str, compression: str | None):
    import fsspec

    return fsspec.open(path, "rb", compression=compression)


def probe_columns(path: str, fmt: str, compression: str | None) -> tuple[list[str], list[int] | None]:
    """Column names (and parquet row-group sizes) from the file's footer or first lines."""
    import pyarrow.parquet as pq

    if fmt == "parquet":
        try:
            with _open_text(path, None) as f:
                md = pq.ParquetFile(f).metadata
                names = [md.schema.column(i).name for i in range(md.num_columns)]
                names = list(dict.fromkeys(md.schema.to_arrow_schema().names))
                return names, [md.row_group(i).num_rows for i in range(md.num_row_groups)]
        except Exception as e:
            raise InputError(f"{path}: cannot read as parquet ({type(e).__name__}: {e}); is the file truncated or another format?") from e
    with _open_text(path, compression) as f:
        try:
            if fmt in ("csv", "tsv"):
                head = f.readline()
                if not head.strip():
                    raise InputError(f"{path}: no header line; a {fmt} source needs a header row with column names")
                import csv as _csv

                line = head.decode("utf-8").rstrip("\r\n")
                return next(_csv.reader([line], delimiter="\t" if fmt == "tsv" else ",")), None
            cols: dict[str, None] = {}
            for i, raw in enumerate(f):
                if i >= 200:
                    break
                raw = raw.strip()
                if not raw:
                    continue
                try:
                    obj = json.loads(raw.decode("utf-8"))
                except json.JSONDecodeError:
                    continue
                if isinstance(obj, dict):
                    cols.update(dict.fromkeys(obj))
            if not cols:
                raise InputError(f"{path}: no JSON object found in its first lines; expected one JSON object per line")
            return list(cols), None
        except UnicodeDecodeError as e:
            raise InputError(f"{path}: text is not valid UTF-8 ({e}); re-encode it, e.g. `iconv -f latin1 -t utf-8`") from e
        except OSError as e:
            raise InputError(f"{path}: cannot read ({e}); is it really {compression or 'uncompressed'}?") from e


def discover(cfg: PrepareConfig) -> tuple[list[SourceFile], dict[str, str], list[str], str]:
    """Files, the column mapping, extra columns and the profile name. All files must share a profile."""
    overrides = parse_column_map(cfg.columns)
    files: list[SourceFile] = []
    mapping: dict[str, str] | None = None
    profile_name = None
    extras: dict[str, None] = {}
    for i, (path, fmt, comp, size) in enumerate(list_source_files(cfg.input)):
        cols, rgs = probe_columns(path, fmt, comp)
        prof = resolve_profile(cols, cfg.profile, overrides, where=path)
        if mapping is None:
            mapping, profile_name = prof.columns, prof.name
        elif prof.name != profile_name:
            raise InputError(f"{path}: detected profile {prof.name!r} but earlier files are {profile_name!r}; pass --profile")
        extras.update(dict.fromkeys(c for c in cols if c not in prof.columns.values()))
        files.append(SourceFile(i, path, fmt, comp, cols, size, rgs))
    assert mapping is not None and profile_name is not None
    reserved = {n for n, _ in PREPARED_FIELDS} | {"key", "status", "error_message", "width", "height",
                                                  "original_width", "original_height", "exif", "sha256", "shard"}
    extra_cols = [c for c in extras if c not in reserved]
    return files, mapping, extra_cols, profile_name


def source_fingerprint(files: list[SourceFile], profile: str, mapping: dict[str, str], policy: dict[str, Any]) -> str:
    """sha256 over each file's name, size and first/last MiB, plus what decides the uid set."""
    import hashlib

    h = hashlib.sha256()
    for f in files:
        fs, p = url_to_fs(f.path)
        h.update(f"{p.rsplit('/', 1)[-1]}\0{f.size}\0".encode())
        with fs.open(p, "rb") as fh:
            h.update(fh.read(1 << 20))
            if f.size > (2 << 20):
                fh.seek(f.size - (1 << 20))
                h.update(fh.read(1 << 20))
    h.update(json.dumps({"profile": profile, "mapping": mapping, "policy": policy}, sort_keys=True).encode())
    return h.hexdigest()


# ----------------------------------------------------------------------------- row policy (executors)

def _to_num(v: Any, kind: str) -> Any:
    if v is None or v == "":
        return None
    try:
        x = float(v)
    except (TypeError, ValueError):
        return None
    if x != x:  # NaN
        return None
    if kind == "bigint":
        return int(x) if abs(x) < 2**62 else None
    return x


def _to_str(v: Any) -> str | None:
    if v is None:
        return None
    if isinstance(v, bytes):
        return v.decode("utf-8", "replace")
    if isinstance(v, (dict, list)):
        return json.dumps(v, ensure_ascii=False)
    return str(v)


def _iter_raw(task: dict[str, Any]) -> Iterator[tuple[int, dict[str, Any] | str]]:
    """(row_idx, record) for a task's slice of one file; a str record is a malformed row's error."""
    path, fmt, comp = task["path"], task["fmt"], task["compression"]
    need = task["need"]
    if fmt == "parquet":
        import pyarrow.parquet as pq

        with _open_text(path, None) as f:
            pf = pq.ParquetFile(f)
            present = [c for c in need if c in pf.schema_arrow.names]
            row = task["row_offset"]
            for rg in range(task["rg_start"], task["rg_end"]):
                tbl = pf.read_row_group(rg, columns=present)
                cols = {c: tbl.column(c).to_pylist() for c in present}
                for i in range(tbl.num_rows):
                    yield row, {c: cols[c][i] for c in present}
                    row += 1
        return
    if fmt in ("csv", "tsv"):
        import pyarrow as pa
        import pyarrow.csv as pacsv

        with _open_text(path, comp) as f:
            reader = pacsv.open_csv(
                f,
                read_options=pacsv.ReadOptions(block_size=1 << 22),
                parse_options=pacsv.ParseOptions(delimiter="\t" if fmt == "tsv" else ",", newlines_in_values=True),
                convert_options=pacsv.ConvertOptions(column_types={c: pa.string() for c in task["columns"]},
                                                     include_columns=[c for c in need if c in task["columns"]]),
            )
            row = 0
            for batch in reader:
                cols = {name: batch.column(i).to_pylist() for i, name in enumerate(batch.schema.names)}
                for i in range(batch.num_rows):
                    yield row, {c: v[i] for c, v in cols.items()}
                    row += 1
        return
    with _open_text(path, comp) as f:
        for row, raw in enumerate(f):
            try:
                text = raw.decode("utf-8")
            except UnicodeDecodeError as e:
                raise task_error(f"{path}: line {row + 1} is not valid UTF-8 ({e}); re-encode the file as UTF-8") from e
            if not text.strip():
                yield row, "empty line"
                continue
            try:
                obj = json.loads(text)
            except json.JSONDecodeError as e:
                yield row, f"line {row + 1} is not valid JSON: {e.msg}"
                continue
            if not isinstance(obj, dict):
                yield row, f"line {row + 1} is a JSON {type(obj).__name__}, not an object"
                continue
            yield row, obj


def prepare_task(task: dict[str, Any]) -> Iterator[tuple]:
    """Spark task: read one file slice and emit prepared rows (PREPARED_FIELDS + extras)."""
    mapping, extras, policy = task["mapping"], task["extras"], task["policy"]
    dns_cache: dict[str, Any] = {}
    try:
        for row_idx, rec in _iter_raw(task):
            if isinstance(rec, str):
                uid = compute_uid(None, None)
                yield (task["file_idx"], row_idx, uid, None, None, None, None, None, None, None, None, None, None, None,
                       C.rejected("malformed_row"), f"{task['path']}: {rec}", *([None] * len(extras)))
                continue
            get = lambda field: rec.get(mapping[field]) if field in mapping else None
            url = normalize_url(_to_str(get(C.URL)))
            caption = normalize_caption(_to_str(get(C.CAPTION)))
            uid = compute_uid(url, caption)
            status = err = None
            bad = check_url(url, policy, dns_cache)
            if bad is None and policy.get("blocklist"):
                why = load_blocklist(policy["blocklist"]).url_reason(url)
                if why:
                    bad = ("blocklisted", why)
            if bad is None:
                if policy["require_caption"] and not caption:
                    bad = ("missing_caption", "caption is null or empty")
                elif caption and len(caption) > policy["max_caption_length"]:
                    bad = ("caption_too_long", f"caption has {len(caption)} characters, over the limit of {policy['max_caption_length']}")
            if bad is not None:
                status, err = C.rejected(bad[0]), bad[1]
            nums = {f: _to_num(get(f), k) for f, k in NUMERIC_FIELDS.items()}
            yield (
                task["file_idx"], row_idx, uid, _to_str(get(C.SOURCE_ID)), url, caption,
                nums[C.SIMILARITY], nums[C.PUNSAFE], nums[C.PWATERMARK], _to_str(get(C.LICENSE)), _to_str(get(C.NSFW)),
                nums[SOURCE_WIDTH], nums[SOURCE_HEIGHT], _to_str(get(SOURCE_SHA256)), status, err,
                *(_to_str(rec.get(c)) for c in extras),
            )
    except (InputError, TaskError):
        raise
    except Exception as e:
        msg = str(e)
        if "UTF8" in msg or "UTF-8" in msg or isinstance(e, UnicodeDecodeError):
            raise task_error(f"{task['path']}: text is not valid UTF-8 ({msg[:200]}); re-encode the file as UTF-8, e.g. `iconv -f latin1 -t utf-8`") from e
        raise task_error(f"{task['path']}: cannot read it as {task['fmt']} ({type(e).__name__}: {msg[:300]}); check the file") from e


def _tasks(files: list[SourceFile], mapping: dict[str, str], extras: list[str], policy: dict[str, Any]) -> list[dict[str, Any]]:
    need = list(dict.fromkeys([*mapping.values(), *extras]))
    tasks = []
    for f in files:
        base = {"file_idx": f.idx, "path": f.path, "fmt": f.fmt, "compression": f.compression, "columns": f.columns,
                "need": need, "mapping": mapping, "extras": extras, "policy": policy}
        if f.fmt == "parquet" and f.row_groups:
            # one task per ~1M rows of row groups, so a big parquet file is read in parallel
            start, offset, acc = 0, 0, 0
            for i, n in enumerate(f.row_groups):
                acc += n
                if acc >= 1_000_000 or i == len(f.row_groups) - 1:
                    tasks.append({**base, "rg_start": start, "rg_end": i + 1, "row_offset": offset})
                    offset += acc
                    start, acc = i + 1, 0
        elif f.fmt == "parquet":
            continue  # zero row groups: an empty table
        else:
            tasks.append(base)
    return tasks


# ----------------------------------------------------------------------------- the Spark job


def _write_accepted_partition(pid: int, rows: Iterator[tuple[int, tuple]], out_dir: str, names: list[str]) -> Iterator[int]:
    import pyarrow as pa
    import pyarrow.parquet as pq

    from laiontools.core.storage import atomic_open

    rows_sorted = sorted(rows, key=lambda r: r[0])
    if not rows_sorted:
        return iter([0])
    cols = list(zip(*(r[1] for r in rows_sorted)))
    # Explicit types: an all-null column must still be typed, or shard parquets disagree later.
    types = dict(PREPARED_FIELDS)
    arrow = {"string": pa.string(), "double": pa.float64(), "bigint": pa.int64(), "int": pa.int32()}
    schema = pa.schema([(n, arrow[types.get(n, "string")]) for n in names])
    table = pa.table({n: list(c) for n, c in zip(names, cols)}, schema=schema)
    with atomic_open(join(out_dir, f"part-{pid:05d}.parquet")) as f:
        pq.write_table(table, f)
    return iter([len(rows_sorted)])


STAGE = "prepare"


@stage_entry(STAGE, accepts=("download",))  # prepare also runs inside a download's pool
def run(cfg: PrepareConfig, spark: Any = None) -> StageResult:
    """Run prepare into ``<output>/prepared`` unless already complete; details = its stats.json.

    Raises InputError for missing/empty/unreadable inputs, unknown columns or non-UTF-8 text (checked
    before a Spark session is started).
    """
    from laiontools.core.storage import ensure_output_dir

    ensure_output_dir(cfg.output)
    prep_dir = join(cfg.output, layout.PREPARED_DIR)
    if is_done(prep_dir):
        log.info("prepare already complete in %s; reusing it", prep_dir)
        stats = read_json(join(prep_dir, layout.PREPARED_STATS_JSON))
    else:
        found = discover(cfg)  # bad input fails before Spark starts
        with stage_spark(cfg, spark, app_name="laiontools-prepare") as sp:
            stats = _prepare(cfg, sp, found)
    return StageResult(
        outputs={"prepared": prep_dir, "accepted": join(prep_dir, "accepted"), "rejected": join(prep_dir, "rejected")},
        counts={"rows_in": int(stats["rows_in"]), "accepted": int(stats["accepted"]),
                "rejected": int(sum(stats["rejected"].values()))},
        details=stats,
        summary=f"prepare: {stats['rows_in']} rows in, {stats['accepted']} accepted, rejected: {stats['rejected']}",
    )


def _prepare(cfg: PrepareConfig, spark: Any, found: tuple[Any, ...]) -> dict[str, Any]:
    """The Spark job of prepare: `found` is what :func:`discover` returned for `cfg`."""
    from pyspark.sql import Window
    from pyspark.sql import functions as F
    from pyspark.sql.types import StructType

    prep_dir = join(cfg.output, layout.PREPARED_DIR)
    files, mapping, extras, profile = found
    policy = {"allow_private_network": cfg.allow_private_network, "allow_networks": list(cfg.allow_networks),
              "resolve_hosts": cfg.resolve_hosts,
              "max_url_length": cfg.max_url_length, "max_caption_length": cfg.max_caption_length,
              "require_caption": cfg.require_caption, "blocklist": cfg.blocklist}
    if cfg.blocklist:
        bl = load_blocklist(cfg.blocklist)  # a bad line fails here, naming the file, before any task runs
        fs_b, p_b = url_to_fs(cfg.blocklist)
        with fs_b.open(p_b, "rb") as f:
            policy["blocklist_sha256"] = sha256_bytes(f.read())  # the list decides the uid set: fingerprint it
        log.info("prepare: blocklist %s with %d entries", cfg.blocklist, len(bl))
    log.info("prepare: %d file(s), profile %s, %d extra column(s)", len(files), profile, len(extras))
    fingerprint = source_fingerprint(files, profile, mapping, policy)
    tasks = _tasks(files, mapping, extras, policy)
    ddl = ", ".join(f"`{n}` {t}" for n, t in PREPARED_FIELDS) + "".join(f", `{c}` string" for c in extras)
    schema = StructType.fromDDL(ddl)
    sc = spark.sparkContext
    # The uid window and the counts shuffle every row: size the shuffle from the input (or take the
    # user's spark.sql.shuffle.partitions), and record what was used with the stats.
    n_shuffle = shuffle_partitions(spark, nbytes=sum(f.size for f in files))
    try:
        rdd = sc.parallelize(tasks, max(1, len(tasks))).flatMap(prepare_task)
        df = spark.createDataFrame(rdd, schema)
        # Collapse repeats: the first occurrence (input order) of a uid is kept.
        w = Window.partitionBy(C.UID).orderBy("file_idx", "row_idx")
        df = df.withColumn("_occ", F.row_number().over(w))
        df = df.withColumn(C.STATUS, F.when(F.col(C.STATUS).isNull() & (F.col("_occ") > 1), F.lit(C.rejected("duplicate_uid")))
                           .otherwise(F.col(C.STATUS)))
        df = df.withColumn(C.ERROR, F.when((F.col(C.STATUS) == C.rejected("duplicate_uid")) & F.col(C.ERROR).isNull(),
                                           F.lit("same normalized URL and caption as an earlier row"))
                           .otherwise(F.col(C.ERROR))).drop("_occ")
        df = df.persist()

        counts = {r[C.STATUS] or "accepted": r["count"] for r in df.groupBy(C.STATUS).count().collect()}
        rows_per_file = {r["file_idx"]: r["count"] for r in df.groupBy("file_idx").count().collect()}

        rejected_dir = join(prep_dir, "rejected")
        rej = df.where(F.col(C.STATUS).isNotNull())
        spark_write_parquet(rej, rejected_dir)

        accepted_dir = join(prep_dir, "accepted")
        fs, p = url_to_fs(accepted_dir)
        if fs.exists(p):
            fs.rm(p, recursive=True)
        fs.makedirs(p, exist_ok=True)
        names = [C.URL, C.CAPTION, *DOWNLOAD_COLUMNS, *extras]
        acc = df.where(F.col(C.STATUS).isNull()).orderBy("file_idx", "row_idx").select(*names)
        n_acc = counts.get("accepted", 0)
        per_file = cfg.number_sample_per_shard * cfg.shards_per_file
        n_files = max(1, -(-n_acc // per_file))
        if n_acc:
            indexed = acc.rdd.map(tuple).zipWithIndex().map(lambda ri: (ri[1] // per_file, (ri[1], ri[0])))
            out = accepted_dir
            written = (indexed.partitionBy(n_files, lambda k: int(k))
                       .map(lambda kv: kv[1])
                       .mapPartitionsWithIndex(lambda pid, it: _write_accepted_partition(pid, it, out, names))
                       .sum())
            if written != n_acc:
                raise RuntimeError(f"prepare wrote {written} accepted rows but counted {n_acc}; re-run prepare")
        df.unpersist()
    except Exception as e:
        raise (user_error_from(e) or e) from e

    stats = {
        "profile": profile,
        "mapping": mapping,
        "extra_columns": extras,
        "source_fingerprint": fingerprint,
        "files": [{"path": f.path, "format": f.fmt, "bytes": f.size, "rows": rows_per_file.get(f.idx, 0)} for f in files],
        "rows_in": int(sum(rows_per_file.values())),
        "accepted": int(counts.get("accepted", 0)),
        "rejected": {k: int(v) for k, v in sorted(counts.items()) if k != "accepted"},
        "download_columns": names,
        "policy": policy,
        "spark": {"shuffle_partitions": n_shuffle},
    }
    write_json(join(prep_dir, layout.PREPARED_STATS_JSON), stats)
    mark_done(prep_dir, {"stats_sha256": sha256_bytes(json.dumps(stats, sort_keys=True).encode())})
    log.info("prepare: %d rows in, %d accepted, rejected %s", stats["rows_in"], stats["accepted"], stats["rejected"])
    return stats


CONFIG = PrepareConfig


def main(argv: list[str] | None = None) -> int:
    from laiontools.core.stage import stage_main

    return stage_main(__name__, argv)
