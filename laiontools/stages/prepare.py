"""prepare: source metadata -> normalized, uid-keyed, policy-checked download units (Spark or in process).

Every input row ends in exactly one place: ``prepared/accepted/part-NNNNN.parquet`` (rows img2dataset
will fetch, each file a whole number of download shards; in input order when the pool has at most
``max_host_shards`` shards or the bound is off, else laid out by host, see :class:`HostLayout`) or
``prepared/rejected/`` (catalog-shaped rows with ``status = rejected_<reason>``). The driver only lists
files and reads their footers/headers; rows are read, normalized and checked inside Spark tasks, so
driver memory does not grow with the input, except for the host layout: one (host, count) entry per
host with more than ``max_host_shards`` rows.

Sources of at most ``spark_above`` rows (estimated, :func:`estimated_rows`) run the same tasks in this
process instead (:func:`_prepare_local`), when no master is named and not under spark-submit: the same
files and stats, without Spark's fixed cost (a JVM and ~8 jobs, ~7 s even for 100 rows). That engine
holds every row in memory: ~1.6 KB a row at peak (a 200k-row source: 0.5 GB, 7 s on one core).
"""

from __future__ import annotations

import bisect
import dataclasses
import ipaddress
import itertools
import json
import logging
import math
import re
import zlib
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
from laiontools.core import failpoints
from laiontools.core.config import ConfigError
from laiontools.core.errors import InputError, TaskError, UserError, task_error, user_error_from
from laiontools.core.redact import redact
from laiontools.core.spark import shuffle_partitions
from laiontools.core.stage import SparkStageConfig, StageResult, stage_entry, stage_spark, wants_spark
from laiontools.core.storage import (
    PARQUET_CODEC,
    PARQUET_READ,
    PARQUET_WRITE,
    is_done,
    join,
    mark_done,
    read_json,
    rm_path,
    sha256_bytes,
    spark_parquet_codec,
    spark_write_parquet,
    store_error,
    url_to_fs,
    write_json,
    write_parquet_dir,
)
from laiontools.web.blocklist import load_blocklist
from laiontools.web.policy import check_url, host_of

log = logging.getLogger(__name__)

FORMATS = {
    ".parquet": "parquet",
    ".csv": "csv", ".csv.gz": "csv",
    ".tsv": "tsv", ".tsv.gz": "tsv",
    ".jsonl": "jsonl", ".jsonl.gz": "jsonl", ".json": "jsonl", ".json.gz": "jsonl",
}
# Sources with more rows than this (estimated) run on Spark by default; below it the in-process engine
# holds every row (~1.6 KB each at peak: ~1.6 GB at the bound) and is faster than Spark's fixed cost.
SPARK_ABOVE_ROWS = 1_000_000
# Rows per byte of a text source, whose rows are not counted before it is read (parquet footers give
# exact counts): a LAION-like row (URL + caption + scores) is 150-300 bytes of text, so 100 bytes a row
# over-counts, erring toward Spark; gzip packs such text ~4x.
TEXT_BYTES_PER_ROW = 100
GZIP_TEXT_BYTES_PER_ROW = 25

# Columns of the prepared rows, before extra source columns.
PREPARED_FIELDS: list[tuple[str, str]] = [
    ("file_idx", "int"), ("row_idx", "bigint"), (C.UID, "string"), (C.SOURCE_ID, "string"),
    (C.URL, "string"), (C.CAPTION, "string"), (C.SIMILARITY, "double"), (C.PUNSAFE, "double"),
    (C.PWATERMARK, "double"), (C.LICENSE, "string"), (C.NSFW, "string"), (SOURCE_WIDTH, "bigint"),
    (SOURCE_HEIGHT, "bigint"), (SOURCE_SHA256, "string"), (C.STATUS, "string"), (C.ERROR, "string"),
]


# Helper columns prepare's and download's Spark plans (and the in-process catalog) add beside the source's
# columns: a source column of one of these names would be replaced by, or clash with, the helper.
INTERNAL_COLUMNS = frozenset({"_occ", "_attempt", "_r", "_f", "_fsid", "_fatt", "_sid", "_skey", "_tar", "_toff",
                              "_tlen", "_tsha"})


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
    blocklist_timeout: float = dataclasses.field(default=30.0, metadata={"help": "seconds to connect to, and to wait for each read from, the server of an http(s) --blocklist (each process reads it once; a download shard whose list read fails stops before fetching, is retried, and the stage then ends naming the list)"})
    resolve_hosts: bool = dataclasses.field(default=False, metadata={"help": "also resolve host names in prepare and reject those resolving to private addresses (download always re-checks at connect time)"})
    max_url_length: int = dataclasses.field(default=2048, metadata={"help": "longer URLs are rejected"})
    max_caption_length: int = dataclasses.field(default=2048, metadata={"help": "longer captions (characters) are rejected"})
    require_caption: bool = dataclasses.field(default=True, metadata={"help": "reject rows without a caption"})
    number_sample_per_shard: int = dataclasses.field(default=10000, metadata={"help": "rows per download shard"})
    shards_per_file: int = dataclasses.field(default=10, metadata={"help": "download shards per prepared input file"})
    max_host_shards: int = dataclasses.field(default=8, metadata={"help": "place each host's rows in at most this many download shards (a host with more than this × number_sample_per_shard rows: in the full shards it needs, plus up to this many), so that at most this many download tasks fetch from one host at once and the per-executor --max-host-* limits bound the host globally; 0: input order, no bound"})
    spark_above: int = dataclasses.field(default=SPARK_ABOVE_ROWS, metadata={"help": "sources with more rows than this (estimated: parquet footers, text at ~100 bytes a row, ~25 gzipped) run on Spark; smaller ones in this process (the same files), unless a master is named or under spark-submit (0: always Spark, -1: only then)"})

    def validate(self) -> None:
        if not self.input or not self.output:
            raise ConfigError("--input (source metadata) and --output (pool folder) are required")
        if self.number_sample_per_shard < 1 or self.shards_per_file < 1:
            raise ConfigError("number_sample_per_shard and shards_per_file must be >= 1")
        if self.max_host_shards < 0:
            raise ConfigError("max_host_shards must be >= 1, or 0 for no bound (input order)")
        self.allow_networks = canonical_networks(self.allow_networks)
        if self.max_url_length < 10 or self.max_caption_length < 1:
            raise ConfigError("max_url_length must be >= 10 and max_caption_length >= 1")
        if self.spark_above < -1:
            raise ConfigError("spark_above must be >= 0, or -1 for Spark only when a master is named")
        if not self.blocklist_timeout > 0:
            raise ConfigError(f"blocklist_timeout must be > 0 seconds, got {self.blocklist_timeout}")


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
        found, skipped = [], []
        for f in sorted(fs.find(p)):
            name = f.rsplit("/", 1)[-1]
            if name.startswith((".", "_")):
                continue
            try:
                fmt, comp = _fmt_of(f)
            except InputError:
                skipped.append(f[len(p.rstrip("/")) + 1:])
                continue
            found.append((proto + f if proto and not f.startswith(proto) else f, fmt, comp, int(fs.size(f))))
        if not found:
            raise InputError(f"input folder {path} holds no metadata files ({', '.join(sorted(FORMATS))})")
        if skipped:
            # named, not passed over in silence: a part saved as .jsonl.zst or .csv.bz2 beside the others is
            # rows that never reach the catalog
            log.warning("input folder %s: %d file(s) of no known metadata format are not read (%s%s); convert "
                        "them to one of %s if they hold rows", path, len(skipped), ", ".join(skipped[:5]),
                        ", ..." if len(skipped) > 5 else "", ", ".join(sorted(FORMATS)))
        files = found
    else:
        fmt, comp = _fmt_of(p)
        files = [(path, fmt, comp, int(fs.size(p)))]
    for f, _, _, size in files:
        if size == 0:
            raise InputError(f"input file {f} is empty (0 bytes); remove it or regenerate it")
    return files


# A UTF-8 byte-order mark (Notepad's and PowerShell's "UTF-8 with BOM"; one per file cat joined): dropped where
# it starts a JSONL line, as csv's header drops it, not read as a JSON error that made the row malformed.
UTF8_BOM = b"\xef\xbb\xbf"


def _open_text(path: str, compression: str | None):
    import fsspec

    return fsspec.open(path, "rb", compression=compression)


def _duplicate_names(path: str, names: list[str]) -> list[str]:
    """`names`, refused (InputError naming the file) if one repeats: the readers key columns by name,
    so a repeated one would silently lose all but one of its columns."""
    seen: set[str] = set()
    dups = list(dict.fromkeys(n for n in names if n in seen or seen.add(n)))
    if dups:
        raise InputError(f"{path}: column name(s) {', '.join(map(repr, dups))} appear more than once in its header; "
                         f"rename the repeats so that every column has its own name")
    return names


def _json_line(text: str) -> Any:
    """One JSONL line parsed, lone UTF-16 surrogates (a ``\\ud800`` escape with no pair: not text, so no
    UTF-8 can hold it) replaced by U+FFFD as invalid UTF-8 in other sources is (:func:`_to_str`), so
    the uid is computed from the text that is stored. An integer longer than Python's int() takes (4300
    digits) is kept as its digits (text), as in a csv source: its row is read, not refused. Raises
    JSONDecodeError, or RecursionError for a line nested deeper than the parser's recursion limit."""
    try:
        obj = json.loads(text)
    except json.JSONDecodeError:
        raise
    except ValueError:  # json gives int() the digits, which refuses over 4300 (a ValueError, not a JSONDecodeError)
        obj = json.loads(text, parse_int=str)
    return _fix_surrogates(obj) if _SURROGATE_ESCAPE.search(text) else obj


_SURROGATE_ESCAPE = re.compile(r"\\u[dD][89a-fA-F]")  # may also match an escaped backslash: then nothing changes
_SURROGATE = re.compile("[\ud800-\udfff]")


def _fix_surrogates(v: Any) -> Any:
    if isinstance(v, str):
        return _SURROGATE.sub("\ufffd", v)
    if isinstance(v, dict):
        return {_fix_surrogates(k): _fix_surrogates(x) for k, x in v.items()}
    if isinstance(v, list):
        return [_fix_surrogates(x) for x in v]
    return v


# A JSONL file's keys are learned from its lines up to this many bytes (the whole of a smaller file; at
# least JSONL_PROBE_MIN_LINES lines), and from no more than JSONL_PROBE_TOTAL_BYTES over the whole source
# (after that, the first JSONL_PROBE_MIN_LINES lines of each further file). Measured: ~27 MB/s (~80k
# LAION-like lines/s) on one core, so ~0.3 s a file and ~2.5 s a source at most on the driver. A key
# that first appears past the lines read (with a value) stops the task reading it, naming the file,
# the line and the key (:func:`_iter_raw`): never dropped silently.
JSONL_PROBE_BYTES = 8 << 20
JSONL_PROBE_TOTAL_BYTES = 64 << 20
JSONL_PROBE_MIN_LINES = 200


def probe_columns(path: str, fmt: str, compression: str | None,
                  max_bytes: int = JSONL_PROBE_BYTES) -> tuple[list[str], list[int] | None]:
    """Column names (and parquet row-group sizes) from the file's footer or header; a JSONL file's
    from its lines up to `max_bytes` of them (at least :data:`JSONL_PROBE_MIN_LINES` lines)."""
    import pyarrow.parquet as pq

    if fmt == "parquet":
        try:
            with _open_text(path, None) as f:
                md = pq.ParquetFile(f).metadata
                names = list(md.schema.to_arrow_schema().names)
                rgs = [md.row_group(i).num_rows for i in range(md.num_row_groups)]
        except Exception as e:
            raise InputError(f"{path}: cannot read as parquet ({type(e).__name__}: {e}); is the file truncated or another format?") from e
        return _duplicate_names(path, names), rgs
    with _open_text(path, compression) as f:
        try:
            if fmt in ("csv", "tsv"):
                import csv as _csv
                import io

                # Any line ending (\n, \r\n or a lone \r), and a UTF-8 byte-order mark (Excel writes one) dropped, as
                # Arrow's reader in the tasks (and Spark's) take them. Bytes that are not UTF-8 become lone surrogates:
                # refused below in the header, left to the tasks in the rows.
                text = io.TextIOWrapper(f, encoding="utf-8-sig", errors="surrogateescape", newline="")
                try:
                    head = next(_csv.reader(text, delimiter="\t" if fmt == "tsv" else ","), None)
                except _csv.Error as e:
                    raise InputError(f"{path}: cannot read its header line as {fmt} ({e})") from e
                finally:
                    text.detach()
                if not head or not any(c.strip() for c in head):
                    raise InputError(f"{path}: no header line; a {fmt} source needs a header row with column names")
                if any(_SURROGATE.search(c) for c in head):
                    raise InputError(f"{path}: its header line is not valid UTF-8; re-encode the file as UTF-8, "
                                     f"e.g. `iconv -f latin1 -t utf-8`")
                return _duplicate_names(path, head), None
            cols: dict[str, None] = {}
            seen = 0
            for i, raw in enumerate(f):
                if i >= JSONL_PROBE_MIN_LINES and seen >= max_bytes:
                    break
                seen += len(raw)
                raw = raw.strip().removeprefix(UTF8_BOM)
                if not raw:
                    continue
                try:
                    obj = _json_line(raw.decode("utf-8"))
                except (json.JSONDecodeError, RecursionError):
                    continue  # the task reading the file records this line as malformed
                if isinstance(obj, dict):
                    cols.update(dict.fromkeys(obj))
            if not cols:
                raise InputError(f"{path}: no JSON object found in its first lines; expected one JSON object per line")
            return list(cols), None
        except UnicodeDecodeError as e:
            raise InputError(f"{path}: text is not valid UTF-8 ({e}); re-encode it, e.g. `iconv -f latin1 -t utf-8`") from e
        except (EOFError, zlib.error) as e:  # a gzip stream cut short, or corrupt deflate data
            raise InputError(f"{path}: its {compression or 'compressed'} data is cut short or damaged ({type(e).__name__}: "
                             f"{e}); copy or regenerate the file") from e
        except OSError as e:
            refused = store_error(e, path)  # credentials, endpoint, throttling: not the file's format
            if refused is not None:
                raise refused from e
            raise InputError(f"{path}: cannot read ({e}); is it really {compression or 'uncompressed'}?") from e


def discover(cfg: PrepareConfig) -> tuple[list[SourceFile], dict[str, str], list[str], str]:
    """Files, the column mapping, extra columns and the profile name. All files must share a profile.

    The mapping is every file's together: a profile column that only some files have (a LAION part with
    punsafe/pwatermark beside one without) is read where it is and null elsewhere. A field that files
    take from different columns (one file's caption is `caption`, another's `text`) is refused."""
    overrides = parse_column_map(cfg.columns)
    files: list[SourceFile] = []
    mapping: dict[str, str] = {}
    mapped_in: dict[str, str] = {}  # canonical field -> the first file that maps it
    profile_name = None
    probe_left = JSONL_PROBE_TOTAL_BYTES
    for i, (path, fmt, comp, size) in enumerate(list_source_files(cfg.input)):
        probe = max(0, min(JSONL_PROBE_BYTES, probe_left))
        cols, rgs = probe_columns(path, fmt, comp, max_bytes=probe)
        if fmt == "jsonl":
            probe_left -= min(probe, size or 0) if comp is None else probe
        prof = resolve_profile(cols, cfg.profile, overrides, where=path)
        if profile_name is None:
            profile_name = prof.name
        elif prof.name != profile_name:
            raise InputError(f"{path}: detected profile {prof.name!r} but earlier files are {profile_name!r}; pass --profile")
        for field, col in prof.columns.items():
            if mapping.setdefault(field, col) != col:
                raise InputError(f"{path}: its {field} is column {col!r}, but {mapped_in[field]}'s is {mapping[field]!r}; "
                                 f"give every file the same column names")
            mapped_in.setdefault(field, path)
        files.append(SourceFile(i, path, fmt, comp, cols, size, rgs))
    assert files and profile_name is not None
    extras: dict[str, str] = {}  # extra column -> the first file that has it
    for f in files:
        for c in f.columns:
            if c not in mapping.values():
                extras.setdefault(c, f.path)
    # Spark (which runs big sources, and reads the prepared files downstream) tells column names apart
    # without case: an extra column named like a prepared/catalog one in any case is not carried, and
    # two extra columns that differ only in case are refused, on either engine.
    # (every catalog column: a pool's own catalog given back as a source carries tar_offset/tar_length/
    # tar_sha256, which the catalog then held twice; and the helper columns the engines add on the way)
    reserved = {n for n, _ in PREPARED_FIELDS} | set(C.catalog_columns()) | INTERNAL_COLUMNS | {
        "key", "status", "error_message", "width", "height", "original_width", "original_height", "exif", "sha256", "shard"}
    reserved_ci = {n.lower() for n in reserved}
    dropped = [c for c in extras if c.lower() in reserved_ci]
    if dropped:
        log.warning("prepare: source column(s) %s are named like prepared/catalog columns and are not carried",
                    ", ".join(map(repr, dropped)))
    extra_cols = [c for c in extras if c.lower() not in reserved_ci]
    by_case: dict[str, str] = {}
    for c in extra_cols:
        first = by_case.setdefault(c.lower(), c)
        if first != c:
            where = extras[c] if extras[c] == extras[first] else f"{extras[first]} and {extras[c]}"
            raise InputError(f"{where}: columns {first!r} and {c!r} differ only in case, which Spark does not tell "
                             f"apart; rename one of them")
    return files, mapping, extra_cols, profile_name


def estimated_rows(files: list[SourceFile]) -> int:
    """Rows of the source, for the choice of engine: exact for parquet (its footers' row groups), else
    the bytes on disk over :data:`TEXT_BYTES_PER_ROW` (:data:`GZIP_TEXT_BYTES_PER_ROW` when gzipped) —
    text rows are not counted before they are read, and the estimate errs high (toward Spark)."""
    total = 0
    for f in files:
        if f.fmt == "parquet":
            total += sum(f.row_groups or [])
        else:
            total += f.size // (GZIP_TEXT_BYTES_PER_ROW if f.compression == "gzip" else TEXT_BYTES_PER_ROW)
    return total


def wants_spark_for(cfg: PrepareConfig, files: list[SourceFile]) -> bool:
    """Whether prepare of `files` runs on Spark when no session is given (see ``core.stage.wants_spark``):
    a master is named, under spark-submit, or more than ``cfg.spark_above`` estimated rows."""
    return wants_spark(cfg.master, estimated_rows(files), cfg.spark_above)


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
    # the policy as recorded (a blocklist URL without its password): another password is the same list
    h.update(json.dumps({"profile": profile, "mapping": mapping, "policy": redact(policy)}, sort_keys=True).encode())
    return h.hexdigest()


# ----------------------------------------------------------------------------- row policy (executors)

def _to_num(v: Any, kind: str) -> Any:
    if v is None or v == "":
        return None
    try:
        x = float(v)
    except (TypeError, ValueError, OverflowError):  # OverflowError: an int past float's range (JSON's 1 and 400 zeros)
        return None
    if math.isnan(x):
        return None
    if kind == "bigint":
        return int(x) if abs(x) < 2**62 else None
    return x


def _to_str(v: Any) -> str | None:
    """A source value as text; None for a missing one: null, or a float NaN (what Python's json.dumps writes
    for pandas' missing values, and a NaN in a parquet float column), never the text "nan"."""
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return None
    if isinstance(v, bytes):
        return v.decode("utf-8", "replace")
    if isinstance(v, (dict, list)):
        return json.dumps(v, ensure_ascii=False, default=_json_default)
    return str(v)


def _json_default(v: Any) -> Any:
    """A nested value JSON has no type for (a parquet struct/list holding a timestamp, date, decimal or
    bytes): its text, as :func:`_to_str` gives for the same value at the top level."""
    return v.decode("utf-8", "replace") if isinstance(v, (bytes, bytearray)) else str(v)


def _iter_raw(task: dict[str, Any]) -> Iterator[tuple[int, dict[str, Any] | str]]:
    """(row_idx, record) for a task's slice of one file; a str record is a malformed row's error."""
    path, fmt, comp = task["path"], task["fmt"], task["compression"]
    need = task["need"]
    if fmt == "parquet":
        import pyarrow.parquet as pq

        with _open_text(path, None) as f:
            pf = pq.ParquetFile(f, **PARQUET_READ)
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

        # A row with another number of fields than the header is a malformed row, as a bad JSONL line is
        # (it stopped the whole file). The parser reports it when it parses that row's block, which on
        # one thread is at most a block ahead of the rows handed out: such rows take the next row
        # numbers when seen, in the same order on every run and engine (the file's line is unknown).
        ragged: list[str] = []

        def skip_ragged(bad: Any) -> str:
            text = bad.text if len(bad.text) <= 200 else bad.text[:200] + "..."
            ragged.append(f"a row has {bad.actual_columns} fields, the header {bad.expected_columns}: {text!r}")
            return "skip"

        with _open_text(path, comp) as f:
            reader = pacsv.open_csv(
                f,
                read_options=pacsv.ReadOptions(block_size=1 << 22, use_threads=False),
                parse_options=pacsv.ParseOptions(delimiter="\t" if fmt == "tsv" else ",", newlines_in_values=True,
                                                 invalid_row_handler=skip_ragged),
                convert_options=pacsv.ConvertOptions(column_types={c: pa.string() for c in task["columns"]},
                                                     include_columns=[c for c in need if c in task["columns"]]),
            )
            row, last = 0, None
            for batch in itertools.chain(reader, [None]):  # None: the ragged rows of the last block
                for msg in ragged:
                    yield row, msg
                    row += 1
                ragged.clear()
                if batch is None:
                    break
                cols = {name: batch.column(i).to_pylist() for i, name in enumerate(batch.schema.names)}
                for i in range(batch.num_rows):
                    last = {c: v[i] for c, v in cols.items()}
                    yield row, last
                    row += 1
        # A quote that opens a field and never closes makes Arrow read every line after it, to the end of
        # the file, as that field's text (no error): the file's last row then holds line breaks. Only
        # then is the file parsed again, strictly, to tell a quoted multi-line caption from a stray quote.
        if last and any(isinstance(v, str) and ("\n" in v or "\r" in v) for v in last.values()):
            _check_quotes(path, comp, fmt)
        return
    # keys the task knows: every file's probed keys (the mapping and the extra columns) and this file's
    known = set(task["need"]) | set(task["columns"])
    with _open_text(path, comp) as f:
        for row, raw in enumerate(f):
            try:
                text = raw.removeprefix(UTF8_BOM).decode("utf-8")
            except UnicodeDecodeError as e:
                raise task_error(f"{path}: line {row + 1} is not valid UTF-8 ({e}); re-encode the file as UTF-8") from e
            if not text.strip():
                yield row, "empty line"
                continue
            try:
                obj = _json_line(text)
            except json.JSONDecodeError as e:
                yield row, f"line {row + 1} is not valid JSON: {e.msg}"
                continue
            except RecursionError:
                yield row, f"line {row + 1} nests JSON arrays/objects too deeply to parse"
                continue
            if not isinstance(obj, dict):
                yield row, f"line {row + 1} is a JSON {type(obj).__name__}, not an object"
                continue
            for k, v in obj.items():
                if k not in known and v is not None:
                    raise task_error(
                        f"{path}: line {row + 1} has the key {k!r}, which no line read to learn the source's columns "
                        f"has (each file's first {JSONL_PROBE_BYTES >> 20} MiB, and at least its first "
                        f"{JSONL_PROBE_MIN_LINES} lines); its values would be lost. Put a line holding every key "
                        f"first in the file, or convert the source to parquet (its columns are in the footer)")
            yield row, obj


# The longest quoted field _check_quotes reads (a caption is never this long): more is a quote left open.
QUOTED_FIELD_MAX_BYTES = 64 << 20


def _check_quotes(path: str, comp: str | None, fmt: str) -> None:
    """Raise a task error naming `path` and the line when a quoted field of the csv/tsv file never closes.

    Python's csv reader in Arrow's dialect (``"`` quotes, doubled inside a quoted field) and, like Arrow,
    lenient with a quirk such as ``"a"b`` (the field goes on unquoted), so a quirk earlier in the file does
    not stop the check. A line that cannot be data is read after the file's last line: at a row boundary it
    is a row of its own; inside a quoted field that never closed it becomes that field's text."""
    import csv
    import io
    import itertools

    end = "\x00laiontools: end of file\x00"
    with _open_text(path, comp) as f:
        lines = itertools.chain(io.TextIOWrapper(f, encoding="utf-8", errors="replace", newline=""), [end + "\n"])
        reader = csv.reader(lines, delimiter="\t" if fmt == "tsv" else ",", quotechar='"', doublequote=True, strict=False)
        # csv's limit is the process's: raised and left so (threads may check files at once), never lowered
        csv.field_size_limit(max(csv.field_size_limit(), QUOTED_FIELD_MAX_BYTES))
        start = 1
        try:
            for row in reader:
                if row == [end]:
                    return
                if row and end in row[-1]:
                    break
                start = reader.line_num + 1
        except csv.Error as e:  # a field longer than any caption: a quote left open this long is one that never closes
            raise task_error(f"{path}: line {start}: a quoted field in the row that starts on this line runs on for more "
                             f"than {csv.field_size_limit() >> 20} MB ({e}): a quote that never closes; close the quote (a "
                             "quote inside a quoted field is written \"\")") from None
        raise task_error(f"{path}: line {start}: unexpected end of data: a quoted field in the row that starts on this line "
                         "never closes, so every row after it would be read as its text; close the quote (a quote inside "
                         "a quoted field is written \"\")")


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
            get = lambda field, rec=rec: rec.get(mapping[field]) if field in mapping else None
            url = normalize_url(_to_str(get(C.URL)))
            caption = normalize_caption(_to_str(get(C.CAPTION)))
            uid = compute_uid(url, caption)
            status = err = None
            bad = check_url(url, policy, dns_cache)
            if bad is None and policy.get("blocklist"):
                why = load_blocklist(policy["blocklist"], timeout=task.get("blocklist_timeout")).url_reason(url)
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
        refused = store_error(e, task["path"])  # credentials, endpoint, permission: not the file's fault
        if refused is not None:
            raise task_error(str(refused)) from e
        msg = str(e)
        if "UTF8" in msg or "UTF-8" in msg or isinstance(e, UnicodeDecodeError):
            raise task_error(f"{task['path']}: text is not valid UTF-8 ({msg[:200]}); re-encode the file as UTF-8, e.g. `iconv -f latin1 -t utf-8`") from e
        raise task_error(f"{task['path']}: cannot read it as {task['fmt']} ({type(e).__name__}: {msg[:300]}); check the file") from e


def _tasks(files: list[SourceFile], mapping: dict[str, str], extras: list[str], policy: dict[str, Any],
           blocklist_timeout: float | None = None) -> list[dict[str, Any]]:
    need = list(dict.fromkeys([*mapping.values(), *extras]))
    tasks = []
    for f in files:
        # (the timeout is no part of the row policy, which the source fingerprint holds)
        base = {"file_idx": f.idx, "path": f.path, "fmt": f.fmt, "compression": f.compression, "columns": f.columns,
                "need": need, "mapping": mapping, "extras": extras, "policy": policy, "blocklist_timeout": blocklist_timeout}
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


# ----------------------------------------------------------------------------- host-bounded shard layout (driver plan, executor positions)


def _coprime_step(size: int) -> int:
    """A step coprime with `size` near 0.618 × size: slot -> slot × step mod size is a permutation that
    puts consecutive slots far apart (rows of one host, consecutive in a group, spread over the shard)."""
    a = max(1, int(size * 0.6180339887))
    while math.gcd(a, size) != 1:
        a += 1
    return a


@dataclasses.dataclass
class HostLayout:
    """Where each accepted row goes so that a host's rows land in few download shards.

    The accepted rows (``n``) fill shards of ``shard_size`` rows in order (the last may be short). First
    come the *exclusive* shards: a host with more than H × shard_size rows (H = ``max_host_shards``)
    gets floor(rows / shard_size) full shards of its own. The rest are cut into *groups* of H consecutive
    shards; every other host with more than H rows is placed whole in one group (best-fit decreasing:
    the group with the least room that holds it), and hosts with ≤ H rows (never collected: they cannot touch more
    than H shards whatever happens) fill what is left, in input order. Inside a group, element e goes
    to shard e mod K (K the group's shards) so a host's consecutive elements touch min(rows, K) ≤ H
    shards and every shard mixes many hosts. A host whose rows fit no group whole (rare: the groups'
    room is fragmented) is split over groups; ``split_hosts`` counts them.

    A host with r rows therefore lands in ≤ min(r, H) shards if r ≤ H × shard_size (unless split), and
    in ≤ floor(r / shard_size) + min(H, r mod shard_size) shards otherwise.

    ``pieces[host]`` lists (rank_start, count, group or -1 for exclusive, element/position start) in
    the host's rank order (its rows sorted by file_idx, row_idx); ``host_start[host]`` is the host's first
    index in the planned-rows sequence (hosts sorted by name); fillers follow all planned rows.
    """

    n: int
    shard_size: int
    max_host_shards: int
    groups: list[tuple[int, int]]  # (first position, rows) per group
    pieces: dict[str, list[tuple[int, int, int, int]]]
    host_start: dict[str, int]
    n_planned: int
    filler_pieces: list[tuple[int, int, int, int]]  # (rank_start, count, group, element start)
    exclusive_hosts: int = 0
    split_hosts: int = 0
    _filler_starts: list[int] | None = None

    def position(self, host: str | None, rank: int) -> int:
        """Global position (0..n-1) of a planned host's rank-th row, or (host None) of the rank-th filler."""
        if host is None:
            pcs = self.filler_pieces
            if self._filler_starts is None:
                self._filler_starts = [p[0] for p in pcs]
            i = bisect.bisect_right(self._filler_starts, rank) - 1
        else:
            pcs = self.pieces[host]
            i = bisect.bisect_right([p[0] for p in pcs], rank) - 1
        r0, cnt, g, start = pcs[i]
        if not 0 <= rank - r0 < cnt:
            raise RuntimeError(f"prepare host layout: rank {rank} of {host!r} outside its pieces (re-run prepare)")
        if g < 0:
            return start + rank - r0
        return self._group_position(g, start + rank - r0)

    def _group_position(self, g: int, e: int) -> int:
        first, rows = self.groups[g]
        s = self.shard_size
        k = -(-rows // s)
        tail = rows - (k - 1) * s  # rows of the group's last shard (s unless it is the pool's last shard)
        if e < k * tail:
            shard, slot = e % k, e // k
        else:  # the last shard is full: stripe the rest over the others
            e2 = e - k * tail
            shard, slot = e2 % (k - 1), tail + e2 // (k - 1)
        size = tail if shard == k - 1 else s
        return first + shard * s + (slot * _coprime_step(size)) % size

    def host_shards_bound(self, host: str) -> int:
        """Upper bound, from the plan, of the shards a planned host's rows land in."""
        tot = 0
        for _, cnt, g, _start in self.pieces[host]:
            if g < 0:
                tot += -(-cnt // self.shard_size)
            else:
                tot += min(cnt, -(-self.groups[g][1] // self.shard_size))
        return tot

    def max_shards_bound(self) -> int:
        """Upper bound, from the plan, of the shards any planned host touches (fillers: ≤ H)."""
        return max([self.max_host_shards, *(self.host_shards_bound(h) for h in self.pieces)])

    def hosts_over_bound(self) -> dict[str, int]:
        """{host: shards} for the hosts whose rows land in more than H shards (those with more than
        H × shard_size rows, and split ones): the download divides their per-executor limits so that
        the tasks fetching them at once stay within H × the limits together (download.host_shares)."""
        out = {h: self.host_shards_bound(h) for h in sorted(self.pieces)}
        return {h: m for h, m in out.items() if m > self.max_host_shards}

    def summary(self) -> dict[str, Any]:
        return {"max_host_shards": self.max_host_shards, "groups": len(self.groups), "planned_hosts": len(self.pieces),
                "exclusive_hosts": self.exclusive_hosts, "split_hosts": self.split_hosts,
                "max_shards_per_host_bound": self.max_shards_bound(), "hosts_over_bound": self.hosts_over_bound()}


def plan_host_layout(big_hosts: list[tuple[str, int]], n: int, shard_size: int, max_host_shards: int) -> HostLayout:
    """Plan the layout of `n` accepted rows given the hosts with more than `max_host_shards` rows.

    Deterministic: the same counts give the same plan (ties broken by host name).
    """
    s, h = shard_size, max_host_shards
    cap = h * s
    counts = dict(big_hosts)
    n_planned = sum(counts.values())
    if n_planned > n:
        raise RuntimeError(f"prepare host layout: {n_planned} planned rows but {n} accepted (re-run prepare)")
    host_start, acc = {}, 0
    for host in sorted(counts):
        host_start[host] = acc
        acc += counts[host]
    pieces: dict[str, list[tuple[int, int, int, int]]] = {}
    pos = 0
    items: list[tuple[int, str, int]] = []  # (rows, host, rank_start) left to place in groups
    n_excl = 0
    for host in sorted(counts, key=lambda x: (-counts[x], x)):
        r = counts[host]
        if r > cap:
            full = (r // s) * s
            pieces[host] = [(0, full, -1, pos)]
            pos += full
            n_excl += 1
            if r - full:
                items.append((r - full, host, full))
        else:
            items.append((r, host, 0))
    rest = n - pos
    n_shards = -(-rest // s)
    n_groups = -(-n_shards // h)
    groups = [(pos + g * cap, min(cap, rest - g * cap)) for g in range(n_groups)]
    free = [rows for _, rows in groups]
    used = [0] * n_groups
    room = sorted((f, g) for g, f in enumerate(free))  # best fit: the group with the least room that holds the host
    split = 0
    for r, host, r0 in sorted(items, key=lambda t: (-t[0], t[1])):
        parts = 0
        while r:
            i = bisect.bisect_left(room, (r, -1))
            f, g = room.pop(i if i < len(room) else len(room) - 1)  # none holds it whole: the most room
            take = min(r, f)
            pieces.setdefault(host, []).append((r0, take, g, used[g]))
            used[g] += take
            free[g] -= take
            r0 += take
            r -= take
            parts += 1
            if free[g]:
                bisect.insort(room, (free[g], g))
        split += parts > 1
    fillers, f0 = [], 0
    for g in range(n_groups):
        if free[g]:
            fillers.append((f0, free[g], g, used[g]))
            f0 += free[g]
    for pcs in pieces.values():
        pcs.sort()
    return HostLayout(n=n, shard_size=s, max_host_shards=h, groups=groups, pieces=pieces, host_start=host_start,
                      n_planned=n_planned, filler_pieces=fillers, exclusive_hosts=n_excl, split_hosts=split)


# ----------------------------------------------------------------------------- the job: shared by both engines

# The error of a row that repeats an earlier row's uid (its own error, if it had one, is kept).
DUPLICATE_ERROR = "same normalized URL and caption as an earlier row"


def arrow_type(sql_type: str) -> Any:
    """The Arrow type Spark writes for a column of Spark SQL type `sql_type` (string, double, bigint, int)."""
    import pyarrow as pa

    return {"string": pa.string(), "double": pa.float64(), "bigint": pa.int64(), "int": pa.int32()}[sql_type]


def _arrow_schema(names: list[str]) -> Any:
    """Arrow schema of the prepared columns `names` (types from PREPARED_FIELDS, extras text): the types
    Spark writes for them, given explicitly so that an all-null column is still typed and every file agrees."""
    import pyarrow as pa

    return pa.schema([(n, arrow_type(prepared_type(n))) for n in names])


def _arrow_table(names: list[str], rows: list[tuple]) -> Any:
    """Rows (tuples in the order of `names`) as an Arrow table of :func:`_arrow_schema`."""
    import pyarrow as pa

    cols = list(zip(*rows)) if rows else [()] * len(names)
    return pa.table({n: list(c) for n, c in zip(names, cols)}, schema=_arrow_schema(names))


def _write_accepted_partition(pid: int, rows: Iterator[tuple[int, tuple]], out_dir: str, names: list[str],
                              per_file: int, codec: str = PARQUET_CODEC) -> Iterator[int]:
    """Write file `pid` (in `codec`: a Spark task's is the session's): rows keyed by their global position,
    which must be exactly pid × per_file, pid × per_file + 1, ... (a gap or a repeat would shift every later
    row's shard)."""
    import pyarrow.parquet as pq

    from laiontools.core.storage import atomic_open

    rows_sorted = sorted(rows, key=lambda r: r[0])
    if not rows_sorted:
        return iter([0])
    first = pid * per_file
    if rows_sorted[0][0] != first or rows_sorted[-1][0] != first + len(rows_sorted) - 1 or \
            len({r[0] for r in rows_sorted}) != len(rows_sorted):
        raise RuntimeError(f"prepare: accepted file {pid} got positions {rows_sorted[0][0]}..{rows_sorted[-1][0]} "
                           f"for {len(rows_sorted)} rows, not {first}.. without gaps; re-run prepare")
    table = _arrow_table(names, [r[1] for r in rows_sorted])
    with atomic_open(join(out_dir, f"part-{pid:05d}.parquet")) as f:
        pq.write_table(table, f, **{**PARQUET_WRITE, "compression": codec})
    # Fault tests: hold this task after its file is in place, mid-write of the accepted folder (a few
    # small files are written in milliseconds: too short a phase to kill in by watching the folder).
    failpoints.pause("prepare.accepted-part")
    return iter([len(rows_sorted)])


def _accepted_names(extras: list[str]) -> list[str]:
    """Columns of the accepted files: what img2dataset reads (url, caption) and carries along."""
    return [C.URL, C.CAPTION, *DOWNLOAD_COLUMNS, *extras]


def _host_bounded(cfg: PrepareConfig, n_acc: int) -> bool:
    """Whether the `n_acc` accepted rows are laid out by host (:class:`HostLayout`): the bound is on and
    they fill more download shards than it; else they stay in input order."""
    return bool(n_acc and cfg.max_host_shards and -(-n_acc // cfg.number_sample_per_shard) > cfg.max_host_shards)


def _layout_key(row: tuple, host_start: dict[str, int]) -> tuple:
    """Sort key of an accepted row ``(file_idx, row_idx, url, ...)`` in the host layout: the planned
    hosts' rows first, by (host, file_idx, row_idx), so that a row's index in key order minus
    ``host_start[host]`` is its rank in its host; then every other row (the fillers) in input order."""
    host = host_of(row[2])
    return (0, host, row[0], row[1]) if host in host_start else (1, "", row[0], row[1])


def _layout_position(key: tuple, index: int, plan: HostLayout) -> int:
    """Global position of the row with layout key `key`, the `index`-th row in key order."""
    if key[0] == 0:
        return plan.position(key[1], index - plan.host_start[key[1]])
    return plan.position(None, index - plan.n_planned)


def _unbounded_layout(cfg: PrepareConfig) -> dict[str, Any]:
    """The stats' ``host_layout`` of accepted rows left in input order."""
    return {"max_host_shards": cfg.max_host_shards, "bounded": False}


def _fresh_dir(path: str) -> None:
    """An empty folder at `path` (a killed run's files in it are removed)."""
    fs, p = url_to_fs(path)
    if fs.exists(p):
        rm_path(fs, p, recursive=True)
    fs.makedirs(p, exist_ok=True)


def _check_written(written: int, n_acc: int) -> None:
    """Refuse accepted files that do not hold exactly the counted rows (their shards would be wrong)."""
    if written != n_acc:
        raise RuntimeError(f"prepare wrote {written} accepted rows but counted {n_acc}; re-run prepare")


def _begin(cfg: PrepareConfig, found: tuple[Any, ...]) -> tuple[dict[str, Any], str, list[dict[str, Any]]]:
    """The row policy, the source fingerprint and the tasks of a prepare of `found` (:func:`discover`).

    The policy decides the uid set, so it is part of the fingerprint; a blocklist is loaded here (a
    bad line fails now, naming the file, before any task runs) and fingerprinted by its content.
    """
    files, mapping, extras, profile = found
    policy = _row_policy(cfg)
    log.info("prepare: %d file(s), profile %s, %d extra column(s)", len(files), profile, len(extras))
    return (policy, source_fingerprint(files, profile, mapping, policy),
            _tasks(files, mapping, extras, policy, blocklist_timeout=cfg.blocklist_timeout))


def _row_policy(cfg: PrepareConfig) -> dict[str, Any]:
    """The settings that decide which rows are accepted (and so the uid set); a blocklist by its content."""
    policy = {"allow_private_network": cfg.allow_private_network, "allow_networks": list(cfg.allow_networks),
              "resolve_hosts": cfg.resolve_hosts,
              "max_url_length": cfg.max_url_length, "max_caption_length": cfg.max_caption_length,
              "require_caption": cfg.require_caption, "blocklist": cfg.blocklist}
    if cfg.blocklist:
        bl = load_blocklist(cfg.blocklist, timeout=cfg.blocklist_timeout)
        policy["blocklist_sha256"] = bl.file_sha256  # (the file as read once: a second read was not bounded)
        log.info("prepare: blocklist %s with %d entries", cfg.blocklist, len(bl))
    return policy


def _finish(cfg: PrepareConfig, found: tuple[Any, ...], policy: dict[str, Any], fingerprint: str,
            counts: dict[str, int], rows_per_file: dict[int, int], host_layout: dict[str, Any], engine: str,
            shuffle: int | None, accepted_files: int) -> dict[str, Any]:
    """Write stats.json, then the completion marker (last: a prepare is done only once both exist);
    return the stats. `counts`: rows per status ("accepted" for null); `engine` and the Spark shuffle
    partitions (None in process) say where it ran; `accepted_files`: the accepted files written (download
    checks that it sees them all: executors that wrote some where the driver does not see)."""
    files, mapping, extras, profile = found
    prep_dir = join(cfg.output, layout.PREPARED_DIR)
    stats = {
        "profile": profile,
        "mapping": mapping,
        "extra_columns": extras,
        "source_fingerprint": fingerprint,
        "files": [{"path": f.path, "format": f.fmt, "bytes": f.size, "rows": rows_per_file.get(f.idx, 0)} for f in files],
        "rows_in": int(sum(rows_per_file.values())),
        "accepted": int(counts.get("accepted", 0)),
        "accepted_files": int(accepted_files),
        "rejected": {k: int(v) for k, v in sorted(counts.items()) if k != "accepted"},
        "download_columns": _accepted_names(extras),
        "policy": policy,
        # what decides which rows share a download shard (a resumed download must see the same)
        "layout": {"number_sample_per_shard": cfg.number_sample_per_shard, "shards_per_file": cfg.shards_per_file,
                   "max_host_shards": cfg.max_host_shards},
        "host_layout": host_layout,
        "engine": engine,
        "spark": {"shuffle_partitions": shuffle},
    }
    stats = redact(stats)  # a record: the policy's blocklist URL without its password
    write_json(join(prep_dir, layout.PREPARED_STATS_JSON), stats)
    failpoints.pause("prepare.final-write")  # fault tests: stats written, marker not yet
    mark_done(prep_dir, {"stats_sha256": sha256_bytes(json.dumps(stats, sort_keys=True).encode())})
    log.info("prepare: %d rows in, %d accepted, rejected %s (%s)", stats["rows_in"], stats["accepted"],
             stats["rejected"], engine)
    return stats


STAGE = "prepare"


def _check_layout(stats: dict[str, Any], cfg: PrepareConfig, prep_dir: str) -> None:
    """Refuse to reuse prepared rows laid out with other shard settings (their shards would differ).

    Stats written before the layout was recorded have no ``layout``: those were input order, i.e.
    ``max_host_shards`` 0.
    """
    old = stats.get("layout")
    if old is None:
        if cfg.max_host_shards == 0:
            return
        old = {"max_host_shards": 0}
    new = {"number_sample_per_shard": cfg.number_sample_per_shard, "shards_per_file": cfg.shards_per_file,
           "max_host_shards": cfg.max_host_shards}
    diff = [k for k in new if k in old and old[k] != new[k]]
    if diff:
        detail = ", ".join(f"{k}: {old[k]!r} -> {new[k]!r}" for k in diff)
        raise UserError(f"{prep_dir} was prepared with other shard settings ({detail}); re-run with the same "
                        f"settings to reuse it, or give a new output folder")


def canonical_networks(nets: Any) -> list[str]:
    """--allow-networks entries as the networks they name, each once, in the order given: ``127.0.0.1/8``
    is ``127.0.0.0/8`` and ``10.1.2.3`` is ``10.1.2.3/32``, so one network spelled two ways is one
    setting (a resume compares them). ConfigError naming an entry that is no IP network."""
    out: list[str] = []
    for net in nets:
        try:
            canon = str(ipaddress.ip_network(str(net).strip(), strict=False))
        except ValueError as e:
            raise ConfigError(f"allow_networks entry {net!r} is not an IP network (e.g. 127.0.0.0/8): {e}") from e
        if canon not in out:
            out.append(canon)
    return out


def _check_source(stats: dict[str, Any], cfg: PrepareConfig, prep_dir: str, found: tuple[Any, ...]) -> None:
    """Refuse to reuse prepared rows of another source or row policy: a re-run (a resumed download, or
    a download after `laiontools prepare`) with other --allow-networks, limits, blocklist or input
    files would otherwise download the old run's rows under the new run's settings."""
    files, mapping, _extras, profile = found
    policy = _row_policy(cfg)
    if stats.get("source_fingerprint") == source_fingerprint(files, profile, mapping, policy):
        return
    old, policy = stats.get("policy", {}), redact(policy)  # compared as recorded
    old_nets = old.get("allow_networks")
    if isinstance(old_nets, list) and old_nets != policy["allow_networks"]:
        # prepared before the entries were canonical (as typed: 127.0.0.1/8): the same networks are the same policy
        try:
            same = canonical_networks(old_nets) == policy["allow_networks"]
        except ConfigError:
            same = False
        if same and stats.get("source_fingerprint") == source_fingerprint(files, profile, mapping, {**policy, "allow_networks": old_nets}):
            return
    diff = [f"{k}: {old.get(k)!r} -> {policy.get(k)!r}" for k in sorted(set(old) | set(policy)) if old.get(k) != policy.get(k)]
    if stats.get("profile") != profile or stats.get("mapping") != mapping:
        diff.append("the source's columns")
    what = ", ".join(diff) if diff else f"the source files ({cfg.input}) differ"
    raise UserError(f"{prep_dir} was prepared from other input or with other row settings ({what}); re-run "
                    f"with the same input and settings to reuse it, or give a new output folder")


@stage_entry(STAGE, accepts=("download",))  # prepare also runs inside a download's pool
def run(cfg: PrepareConfig, spark: Any = None) -> StageResult:
    """Run prepare into ``<output>/prepared`` unless already complete; details = its stats.json.

    On `spark` when given; else in this process when :func:`wants_spark_for` says the source is small
    (same files), else on :func:`~laiontools.core.stage.stage_spark`'s session. Raises InputError for
    missing/empty/unreadable inputs, unknown columns or non-UTF-8 text (the first checked before a
    Spark session is started), the same on either engine.
    """
    stats = prepare_stats(cfg, spark)
    prep_dir = join(cfg.output, layout.PREPARED_DIR)
    return StageResult(
        outputs={"prepared": prep_dir, "accepted": join(prep_dir, "accepted"), "rejected": join(prep_dir, "rejected")},
        counts={"rows_in": int(stats["rows_in"]), "accepted": int(stats["accepted"]),
                "rejected": int(sum(stats["rejected"].values()))},
        details=stats,
        summary=f"prepare: {stats['rows_in']} rows in, {stats['accepted']} accepted, rejected: {stats['rejected']}",
    )


def prepare_stats(cfg: PrepareConfig, spark: Any = None, found: tuple[Any, ...] | None = None) -> dict[str, Any]:
    """:func:`run`'s work, for a caller that holds the output already (download): the prepared
    folder's stats.json, written now unless complete. `found`: :func:`discover`'s answer for `cfg`
    if the caller has it (the source's files are then listed and probed once)."""
    from laiontools.core.storage import ensure_output_dir

    ensure_output_dir(cfg.output)
    prep_dir = join(cfg.output, layout.PREPARED_DIR)
    if found is None:
        found = discover(cfg)  # bad input fails before Spark starts
    if is_done(prep_dir):
        log.info("prepare already complete in %s; reusing it", prep_dir)
        stats = read_json(join(prep_dir, layout.PREPARED_STATS_JSON))
        _check_layout(stats, cfg, prep_dir)
        _check_source(stats, cfg, prep_dir, found)
        return stats
    if spark is None and not wants_spark_for(cfg, found[0]):
        return _prepare_local(cfg, found)
    with stage_spark(cfg, spark, app_name="laiontools-prepare") as sp:
        return _prepare(cfg, sp, found)


def _prepare(cfg: PrepareConfig, spark: Any, found: tuple[Any, ...]) -> dict[str, Any]:
    """The Spark job of prepare: `found` is what :func:`discover` returned for `cfg`."""
    from pyspark.sql import Window
    from pyspark.sql import functions as F
    from pyspark.sql.types import DoubleType, IntegerType, LongType, StringType, StructField, StructType

    prep_dir = join(cfg.output, layout.PREPARED_DIR)
    files, _mapping, extras, _profile = found
    policy, fingerprint, tasks = _begin(cfg, found)
    # built field by field, not parsed from DDL: a source column's name may hold any character
    types = {"string": StringType(), "double": DoubleType(), "bigint": LongType(), "int": IntegerType()}
    schema = StructType([StructField(n, types[prepared_type(n)]) for n in [*(n for n, _ in PREPARED_FIELDS), *extras]])
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
                                           F.lit(DUPLICATE_ERROR))
                           .otherwise(F.col(C.ERROR))).drop("_occ")
        df = df.persist()

        # one job for both tallies (statuses x files rows reach the driver: a few per source file)
        counts: dict[str, int] = {}
        rows_per_file: dict[int, int] = {}
        for r in df.groupBy(C.STATUS, "file_idx").count().collect():
            k = r[C.STATUS] or "accepted"
            counts[k] = counts.get(k, 0) + r["count"]
            rows_per_file[r["file_idx"]] = rows_per_file.get(r["file_idx"], 0) + r["count"]

        rejected_dir = join(prep_dir, "rejected")
        rej = df.where(F.col(C.STATUS).isNotNull())
        spark_write_parquet(rej, rejected_dir)

        accepted_dir = join(prep_dir, "accepted")
        _fresh_dir(accepted_dir)
        n_written_files = 0
        names = _accepted_names(extras)
        cols = [F.col("`" + n.replace("`", "``") + "`") for n in names]  # quoted: a source's name may hold . or `
        n_acc = counts.get("accepted", 0)
        per_file = cfg.number_sample_per_shard * cfg.shards_per_file
        n_files = max(1, -(-n_acc // per_file))
        h_max, shard_size = cfg.max_host_shards, cfg.number_sample_per_shard
        host_layout = _unbounded_layout(cfg)
        if _host_bounded(cfg, n_acc):
            # More shards than the bound: place rows by host (see HostLayout). Only hosts with more
            # than H rows reach the driver; the others cannot touch more than H shards anyway.
            acc = df.where(F.col(C.STATUS).isNull()).select("file_idx", "row_idx", *cols).rdd.map(tuple)
            big = (acc.map(lambda t: (host_of(t[2]), 1)).reduceByKey(lambda a, b: a + b, n_shuffle)
                   .filter(lambda kv: kv[1] > h_max).collect())
            plan = plan_host_layout(big, n_acc, shard_size, h_max)
            host_layout = {**plan.summary(), "bounded": True}
            bplan = sc.broadcast(plan)

            def place(kr: tuple[tuple[tuple, tuple], int]) -> tuple[int, tuple[int, tuple]]:
                (key, row), i = kr
                pos = _layout_position(key, i, bplan.value)
                return pos // per_file, (pos, row)

            indexed = (acc.map(lambda t: (_layout_key(t, bplan.value.host_start), t[2:]))
                       .sortByKey(numPartitions=n_shuffle).zipWithIndex().map(place))
        elif n_acc:
            acc = df.where(F.col(C.STATUS).isNull()).orderBy("file_idx", "row_idx").select(*cols)
            indexed = acc.rdd.map(tuple).zipWithIndex().map(lambda ri: (ri[1] // per_file, (ri[1], ri[0])))
        if n_acc:
            out, codec = accepted_dir, spark_parquet_codec(spark)  # the session's codec, as Spark's writer's
            per_part = (indexed.partitionBy(n_files, lambda k: int(k))
                        .map(lambda kv: kv[1])
                        .mapPartitionsWithIndex(lambda pid, it: _write_accepted_partition(pid, it, out, names, per_file, codec))
                        .collect())
            _check_written(sum(per_part), n_acc)
            n_written_files = sum(1 for n in per_part if n)  # (a partition without rows writes no file)
        df.unpersist()
    except Exception as e:
        raise (user_error_from(e) or e) from e
    return _finish(cfg, found, policy, fingerprint, counts, rows_per_file, host_layout,
                   f"spark {sc.master}", n_shuffle, n_written_files)


def _prepare_local(cfg: PrepareConfig, found: tuple[Any, ...]) -> dict[str, Any]:
    """prepare in this process, for small sources (see :func:`wants_spark_for`): the tasks of
    :func:`_prepare` run here one after another, and the same duplicate rule, counts and layout give
    the same files (accepted ones byte for byte with the session's default codec; the rejected rows in one
    file, in input order). Every row is held in memory (~1.6 KB each at peak)."""
    from collections import Counter, defaultdict

    prep_dir = join(cfg.output, layout.PREPARED_DIR)
    _files, _mapping, extras, _profile = found
    policy, fingerprint, tasks = _begin(cfg, found)
    try:
        rows = [row for task in tasks for row in prepare_task(task)]
    except TaskError as e:  # tagged for the trip through Spark; here it is already the user's error
        raise (user_error_from(e) or e) from e
    fields = [n for n, _ in PREPARED_FIELDS] + extras
    at = {n: i for i, n in enumerate(fields)}
    i_uid, i_status, i_err = at[C.UID], at[C.STATUS], at[C.ERROR]

    # Collapse repeats as Spark's uid window does: the first occurrence in (file_idx, row_idx) order
    # keeps its status; a later one still accepted becomes a duplicate.
    rows.sort(key=lambda r: (r[0], r[1]))
    dup = C.rejected("duplicate_uid")
    seen: set[str] = set()
    for j, r in enumerate(rows):
        if r[i_uid] not in seen:
            seen.add(r[i_uid])
        elif r[i_status] is None:
            row = list(r)
            row[i_status] = dup
            row[i_err] = DUPLICATE_ERROR if row[i_err] is None else row[i_err]
            rows[j] = tuple(row)
    counts = Counter(r[i_status] or "accepted" for r in rows)
    rows_per_file = Counter(r[0] for r in rows)

    write_parquet_dir(_arrow_table(fields, [r for r in rows if r[i_status] is not None]), join(prep_dir, "rejected"))

    accepted_dir = join(prep_dir, "accepted")
    _fresh_dir(accepted_dir)
    names = _accepted_names(extras)
    pick = [at[n] for n in names]
    acc = [(r[0], r[1], *(r[k] for k in pick)) for r in rows if r[i_status] is None]  # as Spark's acc rows
    del rows
    per_file = cfg.number_sample_per_shard * cfg.shards_per_file
    host_layout = _unbounded_layout(cfg)
    if _host_bounded(cfg, len(acc)):
        hosts = Counter(host_of(t[2]) for t in acc)
        plan = plan_host_layout([(h, c) for h, c in hosts.items() if c > cfg.max_host_shards], len(acc),
                                cfg.number_sample_per_shard, cfg.max_host_shards)
        host_layout = {**plan.summary(), "bounded": True}
        keyed = sorted(((_layout_key(t, plan.host_start), t[2:]) for t in acc), key=lambda kr: kr[0])
        placed = [(_layout_position(key, i, plan), row) for i, (key, row) in enumerate(keyed)]
    else:
        placed = [(i, t[2:]) for i, t in enumerate(acc)]
    by_file: dict[int, list[tuple[int, tuple]]] = defaultdict(list)
    for pos, row in placed:
        by_file[pos // per_file].append((pos, row))
    written = sum(n for pid in sorted(by_file)
                  for n in _write_accepted_partition(pid, iter(by_file[pid]), accepted_dir, names, per_file))
    _check_written(written, len(acc))
    return _finish(cfg, found, policy, fingerprint, counts, rows_per_file, host_layout, "in-process", None, len(by_file))


CONFIG = PrepareConfig


def main(argv: list[str] | None = None) -> int:
    from laiontools.core.stage import stage_main

    return stage_main(__name__, argv)
