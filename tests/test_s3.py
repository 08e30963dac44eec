"""Object stores, against a real S3 API server (moto's server mode, as s3fs's own tests use) on 127.0.0.1.

conftest.py puts the endpoint (FSSPEC_S3_ENDPOINT_URL / AWS_ENDPOINT_URL) and fake credentials in the
environment before Spark starts; the stages get nothing but ``s3://`` paths. Also: one spelling of a
file's location (storage.path_key) for Spark's and fsspec's paths.
"""

from __future__ import annotations

import os
import uuid

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from laiontools.core.storage import (
    StorageError,
    check_store,
    ensure_output_dir,
    path_key,
    read_json,
    spark_read_parquet,
    spark_write_parquet,
)

moto_server = pytest.importorskip("moto.server", reason="object-store tests need moto[server] (the test extra)")
s3fs = pytest.importorskip("s3fs", reason="object-store tests need s3fs (the test extra)")


@pytest.fixture(scope="session")
def s3():
    """A real S3 API server on 127.0.0.1 for the session; yields an s3fs file system talking to it."""
    import fsspec

    port = os.environ["LAIONTOOLS_TEST_S3_PORT"]  # reserved by conftest.py
    endpoint = os.environ["FSSPEC_S3_ENDPOINT_URL"]
    if endpoint != f"http://127.0.0.1:{port}":
        pytest.skip(f"FSSPEC_S3_ENDPOINT_URL was set outside the tests ({endpoint}); not starting a test server there")
    # fsspec reads FSSPEC_* variables when it is imported; make sure this process uses them too.
    fsspec.config.conf.setdefault("s3", {}).setdefault("endpoint_url", endpoint)
    server = moto_server.ThreadedMotoServer(ip_address="127.0.0.1", port=int(port), verbose=False)
    server.start()
    try:
        fs = s3fs.S3FileSystem(endpoint_url=endpoint)
        yield fs
    finally:
        server.stop()


@pytest.fixture()
def bucket(s3):
    """A fresh bucket name, created; s3:// URL without trailing slash."""
    name = f"lt-{uuid.uuid4().hex[:10]}"
    s3.mkdir(name)
    s3.invalidate_cache()
    return f"s3://{name}"


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


def test_spark_reads_and_writes_parquet_on_s3_through_the_storage_layer(spark, bucket, tmp_path):
    """No Hadoop S3 connector here: Spark-side parquet on s3:// goes through pyarrow + fsspec in tasks."""
    df = spark.createDataFrame([(i, f"row {i}", float(i) / 3) for i in range(50)], "i long, s string, x double")
    out = f"{bucket}/ds"
    spark_write_parquet(df.repartition(3), out)
    back = spark_read_parquet(spark, out, file_column="_f").toPandas().sort_values("i").reset_index(drop=True)
    assert back["i"].tolist() == list(range(50))
    assert back["s"].tolist() == [f"row {i}" for i in range(50)]
    assert back["x"].tolist() == [i / 3 for i in range(50)]
    # every row names the s3 file it came from, in path_key's spelling
    assert back["_f"].str.startswith(f"{bucket}/ds/part-").all()
    # the same calls on a local folder give the same rows
    spark_write_parquet(df.repartition(3), str(tmp_path / "ds"))
    local = spark_read_parquet(spark, str(tmp_path / "ds")).toPandas().sort_values("i").reset_index(drop=True)
    assert local.equals(back.drop(columns="_f"))
    # rewriting replaces; an empty frame leaves a readable empty dataset
    spark_write_parquet(df.where("i < 0"), out)
    assert spark_read_parquet(spark, out).count() == 0


def test_missing_bucket_is_one_clear_error_naming_the_path(s3):
    path = f"s3://lt-missing-{uuid.uuid4().hex[:8]}/pool"
    with pytest.raises(StorageError, match=r"lt-missing-.*/pool.*bucket .* does not exist"):
        ensure_output_dir(path)
    assert not s3.exists(path.split("://")[1].split("/")[0]), "a missing bucket must not be created"
    with pytest.raises(StorageError, match=r"lt-missing-.*/pool/x.json.*does not exist"):
        read_json(f"{path}/x.json")


def test_permission_error_is_one_clear_error_naming_the_path(s3, bucket):
    """The server starts checking credentials (moto's IAM auth): ours are unknown to it -> 403 on every call."""
    import urllib.request

    def reset_auth(count: bytes) -> None:
        url = os.environ["FSSPEC_S3_ENDPOINT_URL"] + "/moto-api/reset-auth"
        req = urllib.request.Request(url, data=count, method="POST", headers={"Content-Type": "text/plain"})
        urllib.request.urlopen(req, timeout=10).read()

    reset_auth(b"0")
    try:
        s3.invalidate_cache()
        with pytest.raises(StorageError, match=rf"{bucket}/pool: access denied by the object store"):
            ensure_output_dir(f"{bucket}/pool")
        with pytest.raises(StorageError, match=rf"{bucket}/pool/pool.manifest.json: access denied"):
            read_json(f"{bucket}/pool/pool.manifest.json")
    finally:
        reset_auth(b"inf")
        s3.invalidate_cache()


def test_unreachable_endpoint_is_one_clear_error_naming_the_path(monkeypatch):
    import fsspec

    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        dead = f"http://127.0.0.1:{sock.getsockname()[1]}"  # nothing listens there once closed
    monkeypatch.setenv("FSSPEC_S3_ENDPOINT_URL", dead)
    monkeypatch.setitem(fsspec.config.conf, "s3", {"endpoint_url": dead, "config_kwargs": {
        "connect_timeout": 1, "retries": {"max_attempts": 1}}})
    with pytest.raises(StorageError, match=r"s3://lt-any/pool.*cannot reach the object store at http://127.0.0.1"):
        check_store("s3://lt-any/pool")
