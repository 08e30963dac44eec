"""What the object-store tests compare between a run on a store and the same run on local disk."""

from __future__ import annotations

from typing import Any

CATALOG_COLUMNS = ["uid", "status", "shard", "key", "width", "height", "sha256", "tar_offset", "tar_length"]


def catalog_rows(path: str, spark: Any) -> Any:
    """The catalog at `path` (local or a store's URL) as a pandas frame sorted by uid and status."""
    from laiontools.core.storage import spark_read_parquet

    df = spark_read_parquet(spark, path).select(*CATALOG_COLUMNS).toPandas()
    return df.sort_values(["uid", "status"]).reset_index(drop=True)


def members(path: str) -> list[tuple[str, bytes]]:
    """(member name, bytes) of the tar at `path` (local or a store's URL), in the tar's order."""
    from laiontools.core.storage import url_to_fs
    from laiontools.wds.tarscan import tarfile_payloads

    fs, p = url_to_fs(path)
    return tarfile_payloads(fs.cat_file(p))
