"""A pool as the stages after download see it: its manifest, catalog and shard ids (read-only)."""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from laiontools.contracts import layout
from laiontools.contracts.manifest import manifest_sha256, read_manifest, resolve
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
    m = read_manifest(path)
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
    return PoolInfo(path=path, manifest=m, sha256=manifest_sha256(path), catalog=catalog, shard_ids=shard_ids)


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


def null_typed_everywhere(footers: list[tuple[str, int, Any]]) -> list[str]:
    """The catalog's canonical columns that every file stores with Arrow's null type (a column all None
    written by pandas): Spark reads them as integers, which a stage writing a string there cannot use."""
    import pyarrow as pa

    from laiontools.contracts.schema import catalog_arrow_schema

    schemas = [s for _, _, s in footers]
    return [c for c in catalog_arrow_schema().names
            if schemas and all(c in s.names and pa.types.is_null(s.field(c).type) for s in schemas)]


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
        raise InputError(f"{pool.path}: the parquet files of its catalog {pool.catalog} disagree on their columns "
                         f"({str(e).splitlines()[0]}); it does not follow schemas/catalog.schema.json") from None
    # ... and one null in every file (pandas writes a column all None so) takes the catalog's own type:
    # a stage that writes values there (takedown's messages) needs a column that can hold them
    from laiontools.contracts.schema import catalog_arrow_schema

    canon = catalog_arrow_schema()
    for i, fld in enumerate(t.schema):
        if pa.types.is_null(fld.type) and fld.name in canon.names:
            typ = canon.field(fld.name).type
            t = t.set_column(i, pa.field(fld.name, typ), t.column(i).cast(typ))
    return t
