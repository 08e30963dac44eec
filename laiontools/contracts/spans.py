"""Where each sample of a subset lies in the pool's tars: the catalog scan, and the subset's own spans.

A reshard must know, for every uid of its subset, the source shard, key and byte span (offset, length,
sha256) the pool's catalog records. Found by scanning the catalog, that costs a read of every pool row
(~0.4 us each here): for a 2 % subset, 50 rows read for each row kept, and at 2B a 2.3e9-row scan for
each subset resharded. ``subsets`` scans the catalog once anyway, so it writes each subset's spans
beside its uid file (for subsets of at most :data:`SPANS_MAX_FRACTION` of the catalog; a larger one
keeps most rows a scan reads) and reshard reads only those rows::

    <subsets output>/<label>.spans/part-000000.parquet ...  uid, shard, key, tar_offset, tar_length,
                                                          tar_sha256: one row per subset uid, sorted by
                                                          uid (the uid file's order), the catalog's
                                                          columns and values
    <subsets output>/<label>.spans/spans.json             written last: the uid file's and the pool
                                                          manifest's sha256, the row count, each part's
                                                          name, rows and sha256

It is a cache of the catalog, not a contract of its own: reshard uses it only when the uid file's
sha256, the pool manifest's sha256, every part's sha256 and the uids themselves match (a subset taken
down since, a pool changed since, a part damaged or missing: the catalog is scanned as before, with a
warning naming why), and every span read is still checked against its sha256 before a byte is copied.
The rows are those the catalog scan gives (:func:`scan_catalog`, one per uid by the same rule), so a
reshard writes the same bytes either way (tests/test_reshard.py).
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import logging
import re
from typing import Any

from laiontools.contracts import schema as C
from laiontools.core.storage import PARQUET_CODEC, PARQUET_READ, PARQUET_WRITE, spark_parquet_codec, url_to_fs

log = logging.getLogger(__name__)

SPANS_JSON = "spans.json"
SPANS_VERSION = 1
# subsets writes the spans of a subset of at most this fraction of the pool's catalog rows: above it a
# reshard's scan keeps most rows it reads, and the spans would be a second copy of most of the catalog
SPANS_MAX_FRACTION = 0.25
# Rows of a spans part written on Spark (~100 MB of parquet at most; an 80M subset: 80 parts).
SPANS_PART_ROWS = 1 << 20
# The columns of a spans part, in this order (the catalog's names; the catalog's types).
SPAN_COLUMNS = (C.UID, C.SHARD, C.KEY, C.TAR_OFFSET, C.TAR_LENGTH, C.TAR_SHA256)
# Rows of a catalog batch a scan decodes at once (see scan_catalog).
PLAN_BATCH_ROWS = 1 << 16
# Whether a scan decodes the span sha256 column on a second thread (:func:`_batches_beside`).
SPLIT_SHA_DECODE = True
# Subsets up to this many uids are matched against the catalog by Arrow's is_in (see scan_catalog).
IS_IN_MAX_UIDS = 1 << 14


def spans_dir_of(uid_path: str) -> str | None:
    """The spans folder of the subset whose uid file is `uid_path` ("…/80M.uids.npy" -> "…/80M.spans");
    None for a uid file not named as subsets names them."""
    suffix = ".uids.npy"
    return uid_path[: -len(suffix)] + ".spans" if uid_path.endswith(suffix) else None


def catalog_shard_id(shard: str) -> str:
    """The pool's id of the shard the catalog's shard column names `shard` ("00012.tar" -> "00012",
    "a/b.tar" -> "a-b"); :func:`laiontools.contracts.layout.shard_id` gives it from a manifest path."""
    return shard.removesuffix(".tar").replace("/", "-")


def spark_shard_id(col: str = C.SHARD) -> Any:
    """:func:`catalog_shard_id` as a Spark Column, of the catalog's shard column `col`."""
    from pyspark.sql import functions as F

    return F.regexp_replace(F.regexp_replace(col, r"\.tar$", ""), "/", "-")


def arrow_catalog_shard_id(shards: Any) -> Any:
    """:func:`catalog_shard_id` of each value of an Arrow string array (a catalog's shard column)."""
    import pyarrow.compute as pc

    return pc.replace_substring(pc.replace_substring_regex(shards, r"\.tar$", ""), "/", "-")


def one_per_uid(rows: Any) -> Any:
    """`rows` (a pandas frame of span columns and ``_sid``) with one row per uid even if the catalog lists
    a sample twice: the smallest (shard, key, span) wins, as Spark's min(struct) picks it. (Sorted only
    when some uid is listed twice: the sort by six columns, strings among them, was a third of a plan's
    time at 25k rows.)"""
    if rows[C.UID].duplicated().any():
        rows = rows.sort_values([C.UID, "_sid", C.KEY, C.TAR_OFFSET, C.TAR_LENGTH, C.TAR_SHA256], na_position="first", kind="stable")
        rows = rows.drop_duplicates(C.UID, keep="first")
    return rows


@contextlib.contextmanager
def _batches_beside(path: str, columns: list[str]) -> Any:
    """An iterator over the batches of `columns` of catalog file `path` (PLAN_BATCH_ROWS rows each, as the
    scan's own reader of the other columns makes them), decoded on a thread of its own at most two batches
    ahead: Arrow decodes without the interpreter lock, so the two columns sets are decoded on two cores.
    An error of the thread is raised where its batch is taken. Nothing to decode (no `columns`): an empty
    iterator, no thread."""
    import queue
    import threading

    import pyarrow.parquet as pq

    from laiontools.core.storage import parquet_read_errors

    if not columns:
        yield iter(())
        return
    q: Any = queue.Queue(maxsize=2)
    stop = threading.Event()
    done = object()

    def decode() -> None:
        try:
            fs, p = url_to_fs(path)
            with fs.open(p, "rb") as f, parquet_read_errors(path):
                for b in pq.ParquetFile(f, **PARQUET_READ).iter_batches(batch_size=PLAN_BATCH_ROWS, columns=columns):
                    while not stop.is_set():
                        try:
                            q.put(b, timeout=0.1)
                            break
                        except queue.Full:
                            continue
                    if stop.is_set():
                        return
            q.put(done)
        except BaseException as e:  # noqa: BLE001 - raised in the scan's thread, where the batch is taken
            q.put(e)

    def batches() -> Any:
        while True:
            b = q.get()
            if b is done:
                return
            if isinstance(b, BaseException):
                raise b
            yield b

    t = threading.Thread(target=decode, name="laiontools-plan-decode", daemon=True)
    t.start()
    try:
        yield batches()
    finally:
        stop.set()
        while t.is_alive():  # let it leave a full queue
            with contextlib.suppress(queue.Empty):
                q.get_nowait()
            t.join(timeout=0.01)


def scan_catalog(pool: Any, uids: Any) -> Any:
    """The span rows (:data:`SPAN_COLUMNS` and ``_sid``) of the catalog's success rows whose uid is in
    `uids` (a uid array), one per uid (:func:`one_per_uid`); None when the catalog has no files, lacks the
    span columns, or some such row has no span (older pools: reshard indexes their tars on Spark).

    The catalog is read one batch at a time and each batch cut to the subset's rows on Arrow before any
    Python object is made, so the scan costs ~0.1 us a pool row, not one per column."""
    import numpy as np
    import pandas as pd
    import pyarrow as pa
    import pyarrow.compute as pc
    import pyarrow.parquet as pq

    from laiontools.contracts.uids import UidSet, arrow_to_array, hex_arrow
    from laiontools.core.errors import InputError
    from laiontools.core.storage import list_data_files, parquet_read_errors

    files = list_data_files(pool.catalog)
    if not files:
        return None
    fs0, p0 = url_to_fs(files[0])
    with fs0.open(p0, "rb") as f, parquet_read_errors(files[0]):
        names = set(pq.ParquetFile(f).schema_arrow.names)
    if not {C.TAR_OFFSET, C.TAR_LENGTH} <= names:
        return None
    cols = [C.UID, C.STATUS, C.SHARD, C.KEY, C.TAR_OFFSET, C.TAR_LENGTH] + ([C.TAR_SHA256] if C.TAR_SHA256 in names else [])
    uids = np.asarray(uids)
    # Up to IS_IN_MAX_UIDS, the subset's uids as the catalog writes them (32 lowercase hex chars, the
    # contract) and each batch's uid strings looked up in a hash of those by Arrow: for a 2 % subset of a
    # 128k-row pool 3.8 ms against 11.4 ms decoding every row's hex and probing the uid set; a larger set
    # costs more to hash for every batch than it saves (25,600 uids: 10-12 ms either way).
    subset = UidSet(uids) if len(uids) > IS_IN_MAX_UIDS else None
    lookup = pc.SetLookupOptions(value_set=hex_arrow(uids)) if subset is None else None

    def members(col: Any) -> np.ndarray:
        if subset is not None:
            return subset.contains(arrow_to_array(col))
        return pc.fill_null(pc.is_in(col, options=lookup), False).to_numpy(zero_copy_only=False)

    # Batches of 64k rows: a 256k-row batch (~30 MB of Arrow buffers) took 0.07-0.42 s instead of 0.024 s
    # in one read of 8 over a 128k-row catalog (fresh memory for every batch; 64k rows: 0.023-0.030 s).
    parts = []
    # The span sha256 column (64 hex chars a row: half the bytes the scan decodes) is decoded on a thread of
    # its own, batch by batch beside the other columns, when SPLIT_SHA_DECODE (see _batches_beside).
    split = SPLIT_SHA_DECODE and C.TAR_SHA256 in cols
    main_cols = [c for c in cols if c != C.TAR_SHA256] if split else cols
    for path in files:
        fs, p = url_to_fs(path)
        with fs.open(p, "rb") as f, parquet_read_errors(path), \
                _batches_beside(path, [C.TAR_SHA256] if split else []) as shas:
            # (A row group decoded whole, its columns on threads, was no faster: 0.097 s against 0.101 s a
            # plan with 128k-row groups, 13 alternated runs; 0.47-0.86 s against 0.47-0.64 s for a 1M-row
            # group, as download writes them, holding ~8x the memory.)
            for batch in pq.ParquetFile(f, **PARQUET_READ).iter_batches(batch_size=PLAN_BATCH_ROWS, columns=main_cols):
                sha = next(shas, None) if split else None
                # One filter of the batch, by (success and in the subset): filtering by status first copied
                # every column of nearly every row (~110 bytes each) only to drop 80-98 % of them next.
                ok = pc.fill_null(pc.equal(batch.column(C.STATUS), C.STATUS_SUCCESS), False).to_numpy(zero_copy_only=False)
                keep = np.zeros(batch.num_rows, dtype=bool)
                if ok.all():
                    keep = members(batch.column(C.UID))
                elif ok.any():  # failed rows' uids are not read (they may be null)
                    keep[ok] = members(pc.filter(batch.column(C.UID), pa.array(ok)))
                if keep.any():
                    mask = pa.array(keep)
                    df = batch.filter(mask).to_pandas()
                    if split:
                        if sha is None or sha.num_rows != batch.num_rows:  # (batches of one file, one size: never)
                            raise InputError(f"{path}: two readers of the catalog file disagree on its rows")
                        df[C.TAR_SHA256] = sha.column(0).filter(mask).to_pandas()
                    parts.append(df)
    rows = pd.concat(parts, ignore_index=True) if parts else pd.DataFrame(columns=cols)
    if C.TAR_SHA256 not in rows.columns:
        rows[C.TAR_SHA256] = None
    if rows[C.TAR_OFFSET].isna().any() or rows[C.TAR_LENGTH].isna().any():
        return None
    rows = rows.drop(columns=[C.STATUS])
    # The shard id of each of the pool's few shard paths, not of every row.
    sids = {sh: catalog_shard_id(sh) for sh in rows[C.SHARD].unique() if isinstance(sh, str)}
    rows["_sid"] = rows[C.SHARD].map(sids)
    return one_per_uid(rows)


def _part_table(rows: Any) -> Any:
    import pyarrow as pa

    schema = pa.schema([(C.UID, pa.string()), (C.SHARD, pa.string()), (C.KEY, pa.string()), (C.TAR_OFFSET, pa.int64()),
                        (C.TAR_LENGTH, pa.int64()), (C.TAR_SHA256, pa.string())])
    return pa.Table.from_pandas(rows[list(SPAN_COLUMNS)], schema=schema, preserve_index=False)


def part_bytes(rows: Any, codec: str = PARQUET_CODEC) -> bytes:
    """A spans part of `rows` (sorted by uid) as parquet bytes, compressed with `codec` (a Spark task's:
    the session's, :func:`~laiontools.core.storage.spark_parquet_codec`)."""
    import pyarrow.parquet as pq

    buf = io.BytesIO()
    pq.write_table(_part_table(rows), buf, **{**PARQUET_WRITE, "compression": codec})
    return buf.getvalue()


def part_name(i: int) -> str:
    return f"part-{i:06d}.parquet"


def clear(folder: str) -> None:
    """Remove the spans folder `folder` (its record first: a run stopped in between leaves parts without a
    record, which nothing reads, never a record naming parts that are gone)."""
    from laiontools.core.storage import join, rm_path

    fs, p = url_to_fs(folder)
    rp = url_to_fs(join(folder, SPANS_JSON))[1]
    if fs.exists(rp):
        rm_path(fs, rp)
    if fs.exists(p):
        rm_path(fs, p, recursive=True)


def _makedirs(folder: str) -> None:
    fs, p = url_to_fs(folder)
    fs.makedirs(p, exist_ok=True)


def write_record(folder: str, parts: list[tuple[str, int, str]], uids_sha256: str, pool_sha256: str) -> dict[str, Any]:
    """Write `folder`'s record (last, after its `parts`: (name, rows, sha256) in uid order)."""
    from laiontools.core.storage import join, write_json

    record = {"version": SPANS_VERSION, "uids_sha256": uids_sha256, "pool_sha256": pool_sha256,
              "count": sum(rows for _, rows, _ in parts),
              "parts": [{"path": name, "rows": rows, "sha256": sha} for name, rows, sha in parts]}
    write_json(join(folder, SPANS_JSON), record)
    return record


def write_spans(folder: str, rows: Any, uids_sha256: str, pool_sha256: str) -> dict[str, Any]:
    """Write the spans of a subset (`rows`: :func:`scan_catalog`'s rows of exactly its uids, sorted by
    uid) into `folder`, which the caller emptied (:func:`clear`), as one part; the record last. Returns
    the record."""
    from laiontools.core.storage import atomic_write_bytes, join

    _makedirs(folder)
    data = part_bytes(rows)
    atomic_write_bytes(join(folder, part_name(0)), data)
    return write_record(folder, [(part_name(0), len(rows), hashlib.sha256(data).hexdigest())], uids_sha256, pool_sha256)


def spark_write_spans(rows: Any, folders: list[str], tiers: list[int], counts: list[int], uids_sha256: list[str],
                      pool_sha256: str) -> list[str | None]:
    """The spans of nested subsets on Spark, without collecting them: `rows` (a DataFrame of uid, tier and
    the other :data:`SPAN_COLUMNS`, one row per uid of the largest subset) is range-partitioned and
    sorted by uid into parts of about SPANS_PART_ROWS rows; each task writes its run as one part per subset ``k`` (the rows of tier >=
    ``tiers[k]``) into ``folders[k]``, and the driver writes each record, parts in partition order (uid
    order). The caller emptied the folders (:func:`clear`). Per subset: None when written, else why not
    (a row count other than ``counts[k]``: the folder is left without a record)."""
    from pyspark.sql import functions as F

    for folder in folders:
        _makedirs(folder)
    n = max(1, -(-max(counts, default=0) // SPANS_PART_ROWS))
    out = (rows.select(*SPAN_COLUMNS, "tier").repartitionByRange(n, C.UID).sortWithinPartitions(C.UID)
           .withColumn("_pid", F.spark_partition_id())
           .mapInArrow(_part_writer(folders, tiers, spark_parquet_codec(rows.sparkSession)),
                       "pid int, out int, rows long, sha256 string").collect())
    why: list[str | None] = []
    for k, folder in enumerate(folders):
        parts = sorted((int(r["pid"]), int(r["rows"]), r["sha256"]) for r in out if r["out"] == k and r["rows"])
        got = sum(p[1] for p in parts)
        if got != counts[k]:
            why.append(f"{got} rows for a subset of {counts[k]} uids")
            continue
        write_record(folder, [(part_name(pid), rows_, sha) for pid, rows_, sha in parts], uids_sha256[k], pool_sha256)
        why.append(None)
    return why


def _part_writer(folders: list[str], tiers: list[int], codec: str = PARQUET_CODEC) -> Any:
    """mapInArrow function: one range partition of (SPAN_COLUMNS, tier, _pid) rows sorted by uid -> one
    part per folder ``k`` holding its rows of tier >= ``tiers[k]`` (parquet in `codec`); one row each (pid,
    out, rows, sha256)."""

    def write(batches: Any) -> Any:
        import pyarrow as pa
        import pyarrow.compute as pc

        from laiontools.core.storage import atomic_write_bytes, join

        got = [b for b in batches if b.num_rows]
        if not got:
            return
        t = pa.Table.from_batches(got)
        pid = int(t.column("_pid")[0].as_py())
        uid = t.column(C.UID).combine_chunks()
        if len(uid) > 1 and not pc.all(pc.less(uid[:-1], uid[1:])).as_py():
            raise RuntimeError(f"spans partition {pid}: uids are not strictly increasing; Spark's sort order was lost")
        tier = t.column("tier")
        for k, folder in enumerate(folders):
            part = t.filter(pc.greater_equal(tier, tiers[k])).select(list(SPAN_COLUMNS)).to_pandas()
            if not len(part):
                continue
            data = part_bytes(part, codec)
            atomic_write_bytes(join(folder, part_name(pid)), data)
            yield pa.RecordBatch.from_pydict({"pid": [pid], "out": [k], "rows": [len(part)], "sha256": [hashlib.sha256(data).hexdigest()]},
                                             schema=pa.schema([("pid", pa.int32()), ("out", pa.int32()), ("rows", pa.int64()),
                                                               ("sha256", pa.string())]))

    return write


_PART_NAME = re.compile(r"^part-[0-9]{6}\.parquet$")


def _well_formed(rec: dict[str, Any]) -> bool:
    """Whether `rec` has the shape write_record gives: an int count, and parts of a plain part name (never a
    path out of the folder), int rows and a sha256 string, each name once."""
    parts = rec.get("parts")
    if type(rec.get("count")) is not int or not isinstance(parts, list):
        return False
    if not all(isinstance(p, dict) and isinstance(p.get("path"), str) and _PART_NAME.match(p["path"])
               and type(p.get("rows")) is int and p["rows"] >= 0 and isinstance(p.get("sha256"), str) for p in parts):
        return False
    return len({p["path"] for p in parts}) == len(parts)


def _record(uid_path: str, count: int, uids_sha256: str, pool_sha256: str) -> tuple[dict[str, Any] | None, str | None]:
    """(the spans record of the subset whose uid file is `uid_path`, None) when it is there and names this
    uid file, this state of the pool and `count` rows; (None, why) otherwise (no record: why is None)."""
    from laiontools.core.storage import join, read_json

    folder = spans_dir_of(uid_path)
    if folder is None:
        return None, None
    record_path = join(folder, SPANS_JSON)
    fs, rp = url_to_fs(record_path)
    try:
        if not fs.exists(rp):
            return None, None
        rec = read_json(record_path)
    except (OSError, ValueError, RecursionError) as e:  # (RecursionError: JSON nested past the parser's depth)
        return None, f"{record_path} cannot be read ({e})"
    if not isinstance(rec, dict) or rec.get("version") != SPANS_VERSION or not _well_formed(rec):
        return None, f"{record_path} is not a spans record of version {SPANS_VERSION}"
    if rec.get("uids_sha256") != uids_sha256:
        return None, f"{record_path} was written for another uid file (sha256 {rec.get('uids_sha256')})"
    if rec.get("pool_sha256") != pool_sha256:
        return None, f"{record_path} was written for another state of the pool (manifest sha256 {rec.get('pool_sha256')})"
    if rec.get("count") != count or not isinstance(rec.get("parts"), list) or sum(int(p.get("rows", 0)) for p in rec["parts"]) != count:
        return None, f"{record_path} lists {rec.get('count')} rows, the uid file {count}"
    return rec, None


# Why spans are not used, where read_spans and spark_read_spans find the same fault.
_WHY = {"uids": "the uids in {} are not the uid file's", "no_span": "{} lists a sample without its shard or span",
        "bad_span": "{} lists a sample of a negative byte offset or an empty span"}


def read_spans(uid_path: str, uids: Any, uids_sha256: str, pool_sha256: str) -> tuple[Any, str | None]:
    """(rows, None): the subset's span rows (as :func:`scan_catalog` gives them, in uid order) from its
    spans folder, every check passed; (None, why) when there is none to use (no folder: why is None)."""
    import numpy as np
    import pandas as pd
    import pyarrow as pa
    import pyarrow.compute as pc
    import pyarrow.parquet as pq

    from laiontools.contracts.uids import hex_arrow
    from laiontools.core.storage import join, store_errors

    uids = np.asarray(uids)
    rec, why = _record(uid_path, len(uids), uids_sha256, pool_sha256)
    if rec is None:
        return None, why
    folder = str(spans_dir_of(uid_path))
    tables = []
    for part in rec["parts"]:
        path = join(folder, str(part.get("path", "")))
        try:
            fs_, pp = url_to_fs(path)
            with store_errors(path), fs_.open(pp, "rb") as f:
                data = f.read()
        except (OSError, ValueError) as e:
            return None, f"{path} cannot be read ({e})"
        if hashlib.sha256(data).hexdigest() != part.get("sha256"):
            return None, f"{path}: sha256 differs from the one {join(folder, SPANS_JSON)} records"
        try:
            tables.append(pq.read_table(pa.BufferReader(data), columns=list(SPAN_COLUMNS), **PARQUET_READ))
        except (OSError, ValueError, pa.ArrowException) as e:
            return None, f"{path} cannot be read as a spans part ({e})"
        sch = tables[-1].schema  # (a shard or key of numbers would fail the plan)
        if not all(pa.types.is_string(sch.field(c).type) or (c == C.TAR_SHA256 and pa.types.is_null(sch.field(c).type))
                   for c in (C.SHARD, C.KEY, C.TAR_SHA256)):
            return None, f"{path} cannot be read as a spans part (its shard, key or sha256 column is not of strings)"
    try:
        t = pa.concat_tables(tables) if tables else _part_table(pd.DataFrame(columns=list(SPAN_COLUMNS)))
    except (pa.ArrowInvalid, pa.ArrowTypeError) as e:
        return None, f"the parts in {folder} disagree on their columns ({e})"
    if not t.column(C.UID).combine_chunks().equals(hex_arrow(uids)):
        return None, _WHY["uids"].format(folder)
    if t.column(C.TAR_OFFSET).null_count or t.column(C.TAR_LENGTH).null_count or t.column(C.SHARD).null_count:
        return None, _WHY["no_span"].format(folder)
    try:  # (as the plan reads them: whole numbers, also when another writer stored them as text, as Spark's check does)
        offs, lens = (pc.cast(t.column(c), pa.int64()) for c in (C.TAR_OFFSET, C.TAR_LENGTH))
    except (pa.ArrowInvalid, pa.ArrowTypeError, pa.ArrowNotImplementedError) as e:
        return None, f"{folder} lists a byte offset or span length that is not a whole number ({e})"
    if t.num_rows and (pc.min(offs).as_py() < 0 or pc.min(lens).as_py() < 1):
        return None, _WHY["bad_span"].format(folder)
    rows = t.to_pandas()
    sids = {sh: catalog_shard_id(sh) for sh in rows[C.SHARD].unique()}
    rows["_sid"] = rows[C.SHARD].map(sids)
    return rows, None


def spark_read_spans(spark: Any, uid_path: str, count: int, uids_sha256: str, pool_sha256: str) -> tuple[Any, str | None]:
    """:func:`read_spans` on Spark: (a DataFrame with :data:`SPAN_COLUMNS`, None) or (None, why). Each part
    is fetched once by a task, which checks its sha256 and its columns and parses those very bytes (at 2B
    an 80M subset's parts are GBs: never on the driver, and never read again between the check and the
    plan); the rows are persisted: the caller unpersists the DataFrame. They must be exactly the uid file's
    uids (lowercase hex, counted against a join with the file, read by tasks), each with its shard and span."""
    from pyspark import StorageLevel
    from pyspark.sql import functions as F
    from pyspark.sql.pandas.types import from_arrow_schema

    from laiontools.contracts.uids import keep_members
    from laiontools.core.storage import join

    rec, why = _record(uid_path, count, uids_sha256, pool_sha256)
    if rec is None:
        return None, why
    folder = str(spans_dir_of(uid_path))
    want = sorted((join(folder, p["path"]), p["sha256"]) for p in rec["parts"])
    if not want:
        return None, f"{join(folder, SPANS_JSON)} names no part"
    n = max(1, min(len(want), spark.sparkContext.defaultParallelism * 4))
    schema = _part_table(_empty()).schema.append(_error_field())
    df = (spark.createDataFrame(want, "path string, want string").repartition(n, "path")
          .mapInArrow(_part_reader(join(folder, SPANS_JSON)), from_arrow_schema(schema))
          .persist(StorageLevel.MEMORY_AND_DISK))
    ok = False
    try:
        err = df.filter(F.col("_error").isNotNull()).select("_error").limit(1).collect()
        if err:
            return None, err[0]["_error"]
        bad = F.col(C.TAR_OFFSET).isNull() | F.col(C.TAR_LENGTH).isNull() | F.col(C.SHARD).isNull()
        bad_span = (F.col(C.TAR_OFFSET) < 0) | (F.col(C.TAR_LENGTH) < 1)
        # (the uid strings as the uid file's hex gives them: member_column parses either case, so "AB.." and
        # "ab.." would be two distinct members of one uid)
        odd = F.col(C.UID).isNull() | ~F.col(C.UID).rlike("^[0-9a-f]{32}$")
        total = df.agg(F.count(F.lit(1)).alias("n"), F.sum(F.when(bad, 1).otherwise(0)).alias("bad"),
                       F.sum(F.when(odd, 1).otherwise(0)).alias("odd"), F.sum(F.when(bad_span, 1).otherwise(0)).alias("bad_span")).collect()[0]
        members = keep_members(df, C.UID, uid_path).agg(F.countDistinct(C.UID).alias("n")).collect()[0]
        if int(total["n"]) != count or int(members["n"]) != count or int(total["odd"] or 0):
            return None, _WHY["uids"].format(folder)
        if int(total["bad"] or 0):
            return None, _WHY["no_span"].format(folder)
        if int(total["bad_span"] or 0):
            return None, _WHY["bad_span"].format(folder)
        ok = True
        return df, None
    finally:
        if not ok:
            df.unpersist()


def _error_field() -> Any:
    import pyarrow as pa

    return pa.field("_error", pa.string())


def _empty() -> Any:
    import pandas as pd

    return pd.DataFrame({c: pd.Series([], dtype="int64" if c in (C.TAR_OFFSET, C.TAR_LENGTH) else "object") for c in SPAN_COLUMNS})


def _part_reader(record_path: str) -> Any:
    """mapInArrow function: (path, want) rows of spans parts -> each part's rows (SPAN_COLUMNS, ``_error``
    null), read from the bytes whose sha256 and columns were checked; a part that fails: one row naming
    why in ``_error`` (`record_path`: the record the sha256 is compared with)."""

    def read(batches: Any) -> Any:
        import pyarrow as pa
        import pyarrow.parquet as pq

        schema = _part_table(_empty()).schema
        out = schema.append(_error_field())
        for b in batches:
            for path, sha in zip(b.column("path").to_pylist(), b.column("want").to_pylist()):
                why = None
                try:
                    fs, p = url_to_fs(path)
                    with fs.open(p, "rb") as f:
                        data = f.read()
                    if hashlib.sha256(data).hexdigest() != sha:
                        why = f"{path}: sha256 differs from the one {record_path} records"
                    else:
                        t = pq.read_table(pa.BufferReader(data), **PARQUET_READ)
                        # a part lacking a column, or holding one of another type: not the spans (a reader given
                        # the spans' schema would read the first as nulls)
                        if [(x.name, x.type) for x in t.schema if x.name in SPAN_COLUMNS] != [(x.name, x.type) for x in schema]:
                            why = f"{path} cannot be read as a spans part (its columns are {t.schema.names})"
                except (OSError, ValueError, pa.ArrowException) as e:
                    why = f"{path} cannot be read ({e})"
                if why is not None:
                    yield pa.RecordBatch.from_pydict({**{f.name: [None] for f in schema}, "_error": [why]}, schema=out)
                    continue
                t = t.select(list(SPAN_COLUMNS)).append_column(_error_field(), pa.nulls(t.num_rows, pa.string()))
                yield from t.to_batches()

    return read
