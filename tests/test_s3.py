"""Object stores: one spelling of a file's location (storage.path_key) for Spark's and fsspec's paths."""

from __future__ import annotations

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from laiontools.core.storage import path_key


@pytest.mark.parametrize("spellings", [
    # Spark's input_file_name (percent-encoded URI) / Hadoop / fsspec / a user: one local file
    [("file:///data/pool/a%20b/00000.parquet", True), ("file:/data/pool/a b/00000.parquet", False),
     ("/data/pool/a b/00000.parquet", False), ("file://localhost/data/pool/a b/00000.parquet", False),
     ("/data//pool/./a b/00000.parquet", False)],
    # S3: Hadoop's s3a/s3n and fsspec's s3
    [("s3a://bucket/pool/00000.parquet", True), ("s3n://bucket/pool/00000.parquet", True),
     ("s3://bucket/pool/00000.parquet", False), ("S3://bucket/pool/00000.parquet", False)],
    # GCS: Hadoop's gs and gcsfs's gcs
    [("gs://bucket/pool/x%3Dy.parquet", True), ("gcs://bucket/pool/x=y.parquet", False)],
    # HDFS: Spark names the name node, fsspec drops it
    [("hdfs://namenode:8020/pool/00000.parquet", True), ("hdfs:///pool/00000.parquet", False)],
])
def test_path_key_spellings_of_one_file_meet(spellings):
    keys = {path_key(p, uri_encoded=enc) for p, enc in spellings}
    assert len(keys) == 1, keys


def test_path_key_keeps_different_files_apart():
    keys = [path_key(p) for p in ("s3://bucket/pool/00000.parquet", "gs://bucket/pool/00000.parquet",
                                  "s3://other/pool/00000.parquet", "/bucket/pool/00000.parquet",
                                  "hdfs:///bucket/pool/00000.parquet", "s3://bucket/pool/00001.parquet")]
    assert len(set(keys)) == len(keys)
    # the exact keys, so a change of spelling is a visible decision
    assert path_key("s3a://b/k/x.parquet") == "s3://b/k/x.parquet"
    assert path_key("hdfs://nn:9000/k/x.parquet") == "hdfs:///k/x.parquet"
    assert path_key("file:/k/x.parquet") == "file:///k/x.parquet"


def test_spark_input_file_name_meets_the_fsspec_path(spark, tmp_path):
    """Spark's own input_file_name() for files in awkward folders maps to the key of the path we wrote."""
    from pyspark.sql import functions as F

    from laiontools.stages.download import _spark_path_key

    paths = []
    for i, folder in enumerate(["plain", "with space", "pct%41sign", "eq=sign"]):
        d = tmp_path / folder
        d.mkdir()
        p = str(d / f"{i:05d}.parquet")
        pq.write_table(pa.table({"i": [i, i]}), p)
        paths.append(p)
    df = spark.read.parquet(*paths).withColumn("_k", _spark_path_key(F.input_file_name()))
    got = {(r["i"], r["_k"]) for r in df.collect()}
    assert got == {(i, path_key(p)) for i, p in enumerate(paths)}
