"""A pool as the stages after download see it: its manifest, catalog and shard ids (read-only)."""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from laiontools.contracts import layout
from laiontools.contracts.manifest import read_manifest_sha256, resolve
from laiontools.core.errors import InputError
from laiontools.core.storage import swap_pending, url_to_fs


@dataclass
class PoolInfo:
    """A pool manifest read and checked: where it is, its content and sha256, its catalog, its shard ids."""

    path: str
    manifest: dict[str, Any]
    sha256: str
    catalog: str
    shard_ids: list[str]

    @property
    def fingerprint(self) -> str:
        return self.manifest["source"]["fingerprint"]


def abs_path(path: str) -> str:
    """Absolute path for local files (so manifests don't depend on the cwd); URLs unchanged."""
    return path if "://" in path else os.path.abspath(path)


def load_pool(path: str) -> PoolInfo:
    """Read the pool manifest at `path`. Raises ManifestError (missing / invalid) or InputError (not a
    pool manifest, or its catalog is missing)."""
    path = abs_path(path)
    m, sha = read_manifest_sha256(path)  # one read: the manifest may be on an object store
    if m["kind"] != "pool":
        raise InputError(f"{path} is a {m['kind']} manifest; --pool needs the pool.manifest.json written by download")
    cat = (m.get("catalog") or {}).get("path") or layout.CATALOG_DIR
    catalog = resolve(path, cat)
    fs, p = url_to_fs(catalog)
    if swap_pending(catalog):
        raise InputError(f"{path}: its catalog {catalog} is being rebuilt, or a rebuild was killed midway; re-run the "
                         "command that was writing it (download, or takedown for a takedown's output) to finish it")
    if not fs.exists(p):
        raise InputError(f"{path}: its catalog {catalog} does not exist; the pool folder is incomplete (re-run download)")
    shard_ids = [layout.shard_id(s["path"]) for s in m["shards"]]
    return PoolInfo(path=path, manifest=m, sha256=sha, catalog=catalog, shard_ids=shard_ids)


def catalog_footers(pool: PoolInfo) -> list[tuple[str, int, Any]]:
    """(file, rows, Arrow schema) of every parquet file of the pool's catalog, from their footers alone,
    read 16 at a time (a 2B-row catalog is ~1,200 files, each footer a round trip to an object store).
    An object store's refusal or a damaged file: one error naming the file."""
    from concurrent.futures import ThreadPoolExecutor

    import pyarrow.parquet as pq

    from laiontools.core.storage import list_data_files, parquet_read_errors, store_errors

    def footer(path: str) -> tuple[str, int, Any]:
        fs, p = url_to_fs(path)
        with store_errors(path), fs.open(p, "rb") as f, parquet_read_errors(path):
            meta = pq.ParquetFile(f).metadata
            return path, meta.num_rows, meta.schema.to_arrow_schema()

    with store_errors(pool.catalog):
        files = list_data_files(pool.catalog)
    with ThreadPoolExecutor(min(16, max(1, len(files))), thread_name_prefix="laiontools-footers") as ex:
        return list(ex.map(footer, files))


def catalog_rows(pool: PoolInfo, footers: Callable[[], list[tuple[str, int, Any]]] | None = None) -> int:
    """How many rows the pool's catalog holds: its manifest's count, else the parquet footers' (what a
    stage reads to choose its engine). `footers`: where the caller reads them (a cached
    :func:`catalog_footers`, so that a stage that needs them again does not read them twice)."""
    rows = (pool.manifest.get("catalog") or {}).get("num_rows")
    if rows is None:
        rows = sum(n for _, n, _ in (footers() if footers is not None else catalog_footers(pool)))
    return int(rows)


def refuse_lacking_columns(pool: PoolInfo, path: str, names: list[str], required: tuple[str, ...]) -> None:
    """Refuse (InputError naming the file) a catalog file `path` whose columns `names` lack a `required`
    one: a reader of several files (Spark's, or pyarrow's concat) would read that file's rows as nulls
    there, and a stage that matches on the column would silently pass them by."""
    missing = [c for c in required if c not in names]
    if missing:
        raise InputError(f"catalog {pool.catalog}: {path} lacks column(s) {missing}; it does not follow "
                         "schemas/catalog.schema.json")


def catalog_read_schema(pool: PoolInfo, footers: list[tuple[str, int, Any]]) -> Any:
    """The Arrow schema the catalog's files (`footers`: :func:`catalog_footers`) are read with as one table,
    as :func:`read_catalog` reads them: every column a file has, of the type their types promote to (a
    column all null in one file, stored with Arrow's null type, takes the other files' type; an int64 and a
    double column, a double); a column null-typed in every file takes the catalog schema's type, or
    int32 (Spark's reading of such a column) where the catalog schema does not name it. Files whose types
    cannot be promoted to one: InputError naming the catalog."""
    import pyarrow as pa

    from laiontools.contracts.schema import catalog_arrow_schema

    try:
        unified = pa.unify_schemas([s.remove_metadata() for _, _, s in footers], promote_options="permissive")
    except (pa.ArrowInvalid, pa.ArrowTypeError) as e:
        raise _disagreeing_files(pool, e) from None
    canon = catalog_arrow_schema()
    return pa.schema([fld.with_type(canon.field(fld.name).type if fld.name in canon.names else pa.int32())
                      if pa.types.is_null(fld.type) else fld for fld in unified])


def _disagreeing_files(pool: PoolInfo, e: BaseException) -> InputError:
    return InputError(f"{pool.path}: the parquet files of its catalog {pool.catalog} disagree on their columns "
                      f"({str(e).splitlines()[0]}); it does not follow schemas/catalog.schema.json")


def spark_read_catalog(spark: Any, pool: PoolInfo, footers: list[tuple[str, int, Any]]) -> Any:
    """The pool's catalog as a Spark DataFrame of :func:`catalog_read_schema` (`footers`: its files'
    :func:`catalog_footers`): the rows and types the in-process engines read (:func:`read_catalog`).

    Spark's reader takes the types of one file's columns and fails on a file that stores another type
    there (FAILED_READ_FILE.PARQUET_COLUMN_DATA_TYPE_MISMATCH, a Java traceback): a column all None that
    pandas wrote with Arrow's null type (Spark reads it as int32) beside files with values there, or the
    double pandas makes of an integer column with a null. So files are read in groups of one schema,
    each with its own types (a null-typed column not read: nulls of its type), then cast to one."""
    import functools

    import pyarrow as pa
    from pyspark.sql import functions as F
    from pyspark.sql.pandas.types import from_arrow_type

    from laiontools.core.storage import spark_read_parquet

    schema = catalog_read_schema(pool, footers)
    groups: dict[Any, list[str]] = {}  # a file's own (non-null) columns -> its files
    for path, _, s in footers:
        own = pa.schema([f.with_type(pa.string()) if pa.types.is_large_string(f.type) else f
                         for f in s.remove_metadata() if not pa.types.is_null(f.type)])
        groups.setdefault(own, []).append(path)
    if len(groups) == 1 and [(f.name, f.type) for f in next(iter(groups))] == [(f.name, f.type) for f in schema]:
        return spark_read_parquet(spark, pool.catalog, schema=schema)  # the usual catalog: Spark lists the folder

    def column(fld: Any, own: Any) -> Any:
        typ = from_arrow_type(fld.type)
        if fld.name not in own.names:
            return F.lit(None).cast(typ).alias(fld.name)
        col = F.col(f"`{fld.name}`")
        return (col if own.field(fld.name).type == fld.type else col.cast(typ)).alias(fld.name)

    parts = [spark_read_parquet(spark, files, schema=own).select(*[column(f, own) for f in schema]) for own, files in groups.items()]
    return functools.reduce(lambda a, b: a.unionByName(b), parts)


# A catalog is written as parquet files of ~2M rows (~0.5 GB) each, sorted by (uid, status) across them,
# uncapped: a 2B-row catalog is ~1000 range partitions, each sorted by one task, rather than a few that
# would each sort tens of millions of rows.
CATALOG_ROWS_PER_FILE = 2_000_000


def read_catalog(pool: PoolInfo, columns: list[str] | None = None, required: tuple[str, ...] = ()) -> Any:
    """The pool's catalog (or `columns` of it) as one Arrow table, every file of it read (for pools small
    enough to hold in memory: a stage's in-process engine). A file without one of the `required` columns,
    an object store's refusal, a damaged file, or files that disagree on their columns: one InputError
    (or StorageError) naming the catalog or the file."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from laiontools.core.storage import PARQUET_READ, list_data_files, parquet_read_errors, store_errors

    parts = []
    for path in list_data_files(pool.catalog):
        fs, p = url_to_fs(path)
        with store_errors(path), fs.open(p, "rb") as f, parquet_read_errors(path):
            pf = pq.ParquetFile(f, **PARQUET_READ)
            refuse_lacking_columns(pool, path, pf.schema_arrow.names, required)
            parts.append(pf.read(columns=columns))
    if not parts:
        raise InputError(f"catalog {pool.catalog} has no parquet files; the pool folder is incomplete (re-run download)")
    try:  # a column all null in one file (typed null there) takes the other files' type
        t = pa.concat_tables(parts, promote_options="permissive")
    except (pa.ArrowInvalid, pa.ArrowTypeError) as e:
        raise _disagreeing_files(pool, e) from None
    # ... and one null in every file (pandas writes a column all None so) takes the catalog's own type:
    # a stage that writes values there (takedown's messages) needs a column that can hold them
    from laiontools.contracts.schema import catalog_arrow_schema

    canon = catalog_arrow_schema()
    for i, fld in enumerate(t.schema):
        if pa.types.is_null(fld.type) and fld.name in canon.names:
            typ = canon.field(fld.name).type
            t = t.set_column(i, pa.field(fld.name, typ), t.column(i).cast(typ))
    return t
