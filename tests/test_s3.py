"""Object stores, against a real S3 API server (moto's server mode, as s3fs's own tests use) on 127.0.0.1.

conftest.py puts the endpoint (FSSPEC_S3_ENDPOINT_URL / AWS_ENDPOINT_URL) and fake credentials in the
environment before Spark starts; the stages get nothing but ``s3://`` paths. Also: one spelling of a
file's location (storage.path_key) for Spark's and fsspec's paths.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import io
import json
import os
import re
import subprocess
import sys
import uuid
from typing import Any

import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from laiontools.core.storage import (
    StorageError,
    check_store,
    ensure_output_dir,
    path_key,
    read_json,
    sha256_file,
    spark_read_parquet,
    spark_write_parquet,
    store_error,
    url_to_fs,
)
from laiontools.testing.stores import (
    bench_subset,
    catalog_rows,
    check_reshard_killed_resumes,
    check_same_embeddings,
    check_verify_names_a_flipped_byte,
    kill_when,
    members,
)

moto_server = pytest.importorskip("moto.server", reason="object-store tests need moto[server] (the test extra)")
s3fs = pytest.importorskip("s3fs", reason="object-store tests need s3fs (the test extra)")


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

    from laiontools.core.storage import spark_path_key

    paths = []
    for i, folder in enumerate(["plain", "with space", "pct%41sign", "eq=sign"]):
        d = tmp_path / folder
        d.mkdir()
        p = str(d / f"{i:05d}.parquet")
        pq.write_table(pa.table({"i": [i, i]}), p)
        paths.append(p)
    df = spark.read.parquet(*paths).withColumn("_k", spark_path_key(F.input_file_name()))
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


def reset_auth(count: bytes) -> None:
    """moto's IAM auth: b"0" makes the server check credentials on every call (ours are unknown to it:
    403), b"inf" turns the check off again."""
    import urllib.request

    url = os.environ["FSSPEC_S3_ENDPOINT_URL"] + "/moto-api/reset-auth"
    req = urllib.request.Request(url, data=count, method="POST", headers={"Content-Type": "text/plain"})
    urllib.request.urlopen(req, timeout=10).read()


def test_permission_error_is_one_clear_error_naming_the_path(s3, bucket):
    """The server starts checking credentials (moto's IAM auth): ours are unknown to it -> 403 on every call."""
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
    import socket

    import fsspec

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        dead = f"http://127.0.0.1:{sock.getsockname()[1]}"  # nothing listens there once closed
    monkeypatch.setenv("FSSPEC_S3_ENDPOINT_URL", dead)
    monkeypatch.setitem(fsspec.config.conf, "s3", {"endpoint_url": dead, "config_kwargs": {
        "connect_timeout": 1, "retries": {"max_attempts": 1}}})
    with pytest.raises(StorageError, match=r"s3://lt-any/pool.*cannot reach the object store at http://127.0.0.1"):
        check_store("s3://lt-any/pool")


def _one_error_line(err: str, stage: str) -> str:
    lines = [ln for ln in err.splitlines() if ln.startswith(f"laiontools {stage}:")]
    assert len(lines) == 1 and "Traceback" not in err, err[-3000:]
    return lines[0]


def test_an_unreachable_endpoint_for_an_input_is_one_line(monkeypatch, capsys, tmp_path):
    """Only the input on the store (the output is local, so no bucket check runs first): reading the
    manifest through a dead endpoint was ~145 lines of chained tracebacks, exit 1."""
    import socket

    import fsspec

    from laiontools.cli import main as cli_main

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        dead = f"http://127.0.0.1:{sock.getsockname()[1]}"
    monkeypatch.setenv("FSSPEC_S3_ENDPOINT_URL", dead)
    monkeypatch.setitem(fsspec.config.conf, "s3", {"endpoint_url": dead, "config_kwargs": {
        "connect_timeout": 1, "retries": {"max_attempts": 1}}})
    m = "s3://lt-any/pool/pool.manifest.json"
    for stage, argv in (("verify", [m]), ("inspect", [m]),
                        ("subsets", ["--pool", m, "--output", str(tmp_path / "sub"), "--scales", "4", "--seed", "0"])):
        assert cli_main([stage, *argv]) == 2
        line = _one_error_line(capsys.readouterr().err, stage)
        assert line.startswith(f"laiontools {stage}: error: {m}: cannot reach the object store at {dead}"), line


@contextlib.contextmanager
def silent_endpoint() -> Any:
    """(URL, accepted connections) of a server on 127.0.0.1 that accepts connections and never answers."""
    import socket
    import threading

    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen(16)
    server.settimeout(0.2)
    held: list[Any] = []
    stop = threading.Event()

    def accept_and_say_nothing() -> None:
        while not stop.is_set():
            try:
                held.append(server.accept()[0])
            except OSError:
                pass

    t = threading.Thread(target=accept_and_say_nothing, daemon=True)
    t.start()
    try:
        yield f"http://127.0.0.1:{server.getsockname()[1]}", held
    finally:
        stop.set()
        t.join(timeout=10)
        for c in held:
            c.close()
        server.close()


def test_an_endpoint_that_never_answers_is_one_line_not_a_hang(monkeypatch, capsys):
    """A store that accepts connections and never answers held `verify s3://...` silent for the 5 minutes
    a walk gave it (botocore's 60 s reads, several attempts, each call retried 5 times by s3fs). Every S3 client
    now has bounded timeouts (storage.S3_CLIENT_DEFAULTS, under the user's own fsspec settings, which
    win key by key); here the user's 1 s read timeout and single attempt keep the test short. One line names the endpoint."""
    import fsspec

    from laiontools.cli import main as cli_main
    from laiontools.core.storage import S3_CLIENT_DEFAULTS, bound_object_store_clients, url_to_fs

    assert S3_CLIENT_DEFAULTS == {"connect_timeout": 10, "read_timeout": 20, "retries": {"total_max_attempts": 2, "mode": "standard"}}
    for k, v in S3_CLIENT_DEFAULTS.items():  # in effect where the user set nothing
        assert url_to_fs("s3://lt-any/x")[0].config_kwargs[k] == v

    with silent_endpoint() as (silent, held):
        monkeypatch.setenv("FSSPEC_S3_ENDPOINT_URL", silent)
        mine = {"read_timeout": 1, "retries": {"total_max_attempts": 1}}
        monkeypatch.setitem(fsspec.config.conf, "s3", {"endpoint_url": silent, "config_kwargs": dict(mine)})
        bound_object_store_clients()  # as on import: the defaults fill in what the user left out
        assert fsspec.config.conf["s3"]["config_kwargs"] == {**S3_CLIENT_DEFAULTS, **mine}
        m = "s3://lt-any/pool/pool.manifest.json"
        assert cli_main(["verify", m]) == 2
        line = _one_error_line(capsys.readouterr().err, "verify")
        assert line.startswith(f"laiontools verify: error: {m}: the object store at {silent} accepted the connection "
                               "but did not answer in time (ReadTimeoutError)"), line
        assert held, "the client never connected"


def test_a_refusal_met_in_a_spark_task_says_so_and_reaches_the_driver_as_the_tasks_line(spark):
    """A cluster user's first mistake: credentials or endpoint on the driver only. Met inside a task the
    error says an executor met it, and the driver recovers that message, naming the object the task
    could not read (embed and reshard named the manifest the driver had read, with a cut traceback)."""
    from laiontools.core.errors import user_error_from

    def refuse(_):
        raise store_error(PermissionError("Forbidden"), "s3://lt-b/pool/catalog/part-00000.parquet")

    assert "executor" not in str(store_error(PermissionError("Forbidden"), "s3://lt-b/x"))  # on the driver
    with pytest.raises(Exception) as info:
        spark.sparkContext.parallelize([0], 1).map(refuse).collect()
    got = user_error_from(info.value)
    assert got is not None and "Traceback" not in str(got) and "\n" not in str(got)
    assert str(got).startswith("s3://lt-b/pool/catalog/part-00000.parquet: access denied by the object store (PermissionError: Forbidden)")
    assert str(got).endswith("[met on a Spark executor: executors need the driver's credentials and endpoint too, e.g. "
                             "--conf spark.executorEnv.AWS_ACCESS_KEY_ID=... (docs/scale.md)]")


def test_a_uid_file_read_by_tasks_from_a_bucket_gone_since_is_one_line(spark, s3, bucket):
    """Spark tasks read uid files: the joins above 16M uids in pieces (contracts.uids.uid_file_frame), the
    membership UDF below whole. A bucket removed after the driver read the file's header (as a node without
    the driver's access meets it) is, both ways, one StorageError naming the file, recovered by the driver
    as the tasks' line, not a worker traceback."""
    from pyspark.sql import functions as F

    from laiontools.contracts.uids import member_column, save_uids, uid_file_frame
    from laiontools.core.errors import user_error_from

    path = f"{bucket}/sub/uids.npy"
    save_uids(path, [f"{i:032x}" for i in range(10)])
    frame = uid_file_frame(spark, path, rows_per_task=4)
    assert frame.count() == 10
    # the same file tested by the membership UDF (below 16M uids), not run before: no worker holds its set
    rows = spark.createDataFrame([(f"{i:032x}",) for i in range(5, 15)], "uid string").repartition(1)
    member = rows.select(member_column(F.col("uid"), path).alias("m"))
    s3.rm(bucket.removeprefix("s3://"), recursive=True)
    s3.invalidate_cache()
    for query in (frame, member):
        with pytest.raises(Exception) as info:
            query.count() if query is frame else query.collect()
        got = user_error_from(info.value)
        assert got is not None and "\n" not in str(got), str(info.value)[-2000:]
        assert str(got).startswith(f"{path}: bucket {bucket.removeprefix('s3://')!r} does not exist"), got


def test_prepare_refused_by_the_store_blames_the_store_not_the_file(s3, bucket, tmp_path):
    """A source file the store refuses to a prepare task is an access error naming it, not "cannot read
    it as parquet ...; check the file"."""
    from laiontools.stages import prepare as prepare_stage
    from laiontools.stages.prepare import PrepareConfig
    from laiontools.synthetic import write_source

    write_source(str(tmp_path / "src"), "http://127.0.0.1:9", [{"id": 0, "file": "0.jpg", "caption": "c"}], broken={})
    s3.put(str(tmp_path / "src" / "part-00000.parquet"), f"{bucket.split('://')[1]}/src/part-00000.parquet")
    cfg = PrepareConfig(input=f"{bucket}/src", output=str(tmp_path / "out"))
    files, mapping, extras, _ = prepare_stage.discover(cfg)
    task = prepare_stage._tasks(files, mapping, extras, prepare_stage._row_policy(cfg))[0]
    reset_auth(b"0")
    try:
        s3.invalidate_cache()
        with pytest.raises(Exception, match=rf"{bucket}/src/part-00000.parquet: access denied by the object store") as info:
            list(prepare_stage.prepare_task(task))
        assert "cannot read it as parquet" not in str(info.value)
    finally:
        reset_auth(b"inf")
        s3.invalidate_cache()


def test_missing_credentials_are_one_line_naming_the_path(s3, bucket, monkeypatch, capsys, tmp_path):
    """No key, no profile, no instance role: botocore's NoCredentialsError was a 75-line traceback, exit
    1, in every stage (the output's bucket check, or the manifest read). Now one line naming the path
    and where credentials come from."""
    import fsspec

    from laiontools.cli import main as cli_main

    m = f"{bucket}/nc/pool.manifest.json"
    s3.pipe_file(m.split("://", 1)[1], b"{}")
    for k in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "AWS_PROFILE"):
        monkeypatch.delenv(k, raising=False)
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(tmp_path / "none"))
    monkeypatch.setenv("AWS_CONFIG_FILE", str(tmp_path / "none"))
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")  # no instance-role probe of 169.254.169.254
    monkeypatch.setitem(fsspec.config.conf, "s3", {**fsspec.config.conf.get("s3", {}), "skip_instance_cache": True})
    src = tmp_path / "src.jsonl"
    src.write_text('{"url": "http://example.org/a.jpg", "caption": "a"}\n')
    for stage, argv, path in (("verify", [m], m),  # an input on the store
                              ("download", ["--input", str(src), "--output", f"{bucket}/nc-pool"], f"{bucket}/nc-pool")):
        assert cli_main([stage, *argv]) == 2
        line = _one_error_line(capsys.readouterr().err, stage)
        assert line.startswith(f"laiontools {stage}: error: {path}: no credentials for the object store (NoCredentialsError)"), line


@pytest.mark.parametrize("case", ["https endpoint of an http store", "endpoint without a scheme", "unknown AWS_PROFILE"])
def test_a_wrong_endpoint_scheme_or_profile_is_one_line_naming_the_path(s3_server, bucket, s3, tmp_path, case):
    """Three settings a user gets wrong on the way to a store, each a raw traceback of 70-120 lines, exit 1,
    in every stage (found by a new user's walk): an https:// endpoint for a store that speaks http (an SSL error),
    an endpoint without its scheme (botocore: "Invalid endpoint"), and AWS_PROFILE naming a profile the AWS
    files lack (ProfileNotFound). Now one line naming the path and the setting, exit 2, and no line of
    botocore's own ("Found credentials in environment variables", at INFO in every process)."""
    m = f"{bucket}/wrong/pool.manifest.json"
    s3.pipe_file(m.split("://", 1)[1], b"{}")
    host = s3_server.endpoint.split("://", 1)[1]
    env = {k: v for k, v in os.environ.items() if not k.startswith(("AWS_", "FSSPEC_S3"))}
    env.update(AWS_ACCESS_KEY_ID="laiontools-test", AWS_SECRET_ACCESS_KEY="laiontools-test", AWS_DEFAULT_REGION="us-east-1",
               AWS_EC2_METADATA_DISABLED="true", AWS_MAX_ATTEMPTS="1", AWS_ENDPOINT_URL=s3_server.endpoint)
    profiles = tmp_path / "credentials"
    profiles.write_text("[lt]\naws_access_key_id=laiontools-test\naws_secret_access_key=laiontools-test\n")
    if case == "https endpoint of an http store":
        env["AWS_ENDPOINT_URL"], said = f"https://{host}", "cannot make a TLS connection to the object store at https://"
    elif case == "endpoint without a scheme":
        env["AWS_ENDPOINT_URL"], said = host, f"the object store endpoint '{host}' is not a URL"
    else:
        for k in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"):
            del env[k]
        env.update(AWS_PROFILE="nosuch", AWS_SHARED_CREDENTIALS_FILE=str(profiles), AWS_CONFIG_FILE=str(tmp_path / "none"))
        said = "The config profile (nosuch) could not be found (AWS_PROFILE names a profile"
    r = subprocess.run([sys.executable, "-m", "laiontools", "verify", m], env=env, capture_output=True, text=True, timeout=300, check=False)
    assert r.returncode == 2, (r.returncode, r.stderr[-3000:])
    line = _one_error_line(r.stderr, "verify")
    assert line.startswith(f"laiontools verify: error: {m}: ") and said in line, line
    assert "botocore" not in r.stderr.replace(line, ""), r.stderr[-3000:]


def test_an_evaluation_set_on_s3_gives_its_own_classnames_and_templates(bucket, s3, tmp_path, monkeypatch):
    """classnames.txt and the templates file beside an evaluation set in a bucket were looked for at the bucket
    path without its s3:// (a path relative to the working folder): `evaluate --evalset s3://…` stopped with "No
    such file or directory", or read a local file that happened to sit there (the decoy here). Now the bucket's."""
    from laiontools import evalsets
    from laiontools.synthetic import write_evalset

    local = tmp_path / "evalset"
    write_evalset(str(local), seed=5)
    names = (local / evalsets.CLASSNAMES_FILE).read_text().split()
    (local / evalsets.TEMPLATES_FILE).write_text("a photo of {c}, in a bucket.\n{c} from s3.\n")
    where = f"{bucket}/ev"
    s3.put(str(local), where.split("://", 1)[1], recursive=True)
    monkeypatch.chdir(tmp_path)  # decoys where the protocol-less paths would point
    decoys = tmp_path / where.split("://", 1)[1]
    decoys.mkdir(parents=True)
    (decoys / evalsets.CLASSNAMES_FILE).write_text("\n".join(f"decoy{i}" for i in range(len(names))) + "\n")
    (decoys / evalsets.TEMPLATES_FILE).write_text("a decoy {c}\n")
    es = evalsets.parse_evalset_spec(f"s={where}:imagefolder")
    assert len(names) > 1 and evalsets.classnames(es) == names
    assert evalsets.templates(es) == ["a photo of {c}, in a bucket.", "{c} from s3."]
    (decoys / evalsets.CLASSNAMES_FILE).unlink()
    (decoys / evalsets.TEMPLATES_FILE).unlink()
    assert evalsets.classnames(es) == names  # (before: "No such file or directory")


def test_a_launched_child_shares_the_hold_of_an_s3_output(bucket):
    """embed --engine torchrun's ranks work on the output their launcher holds. The held locks travel in
    the environment; on s3 their paths hold ':' (the old os.pathsep separator split "s3://…" apart, and
    the ranks were refused as "in use by another run")."""
    import subprocess

    from laiontools.core.stage import output_lock

    out = f"{bucket}/held"
    child = ("from laiontools.core.stage import output_lock\n"
             f"with output_lock({out!r}, 'embed'):\n    print('child got it')\n")
    with output_lock(out, "embed"):
        res = subprocess.run([sys.executable, "-c", child], capture_output=True, text=True, timeout=120, check=False)
    assert res.returncode == 0 and "child got it" in res.stdout, res.stderr[-2000:]
    # released at the end of the block: a later run takes the output
    res = subprocess.run([sys.executable, "-c", child], capture_output=True, text=True, timeout=120, check=False)
    assert res.returncode == 0, res.stderr[-2000:]


@dataclasses.dataclass
class Pools:
    local: str
    s3: str
    source_s3: str
    s3_in_process: str  # the same download into s3:// by the in-process engine (no master named)


@pytest.fixture(scope="module")
def pools(spark, s3, tmp_path_factory) -> Pools:
    """One synthetic source (no route whose answer changes between requests), uploaded to a bucket and
    downloaded twice with the same settings: into a local folder and into s3://."""
    from laiontools.stages import download as download_stage
    from laiontools.stages.download import DownloadConfig
    from laiontools.synthetic import SyntheticWebServer, make_source
    from laiontools.testing import TEST_DOWNLOAD_SETTINGS

    work = tmp_path_factory.mktemp("s3web")
    name = f"lt-pools-{uuid.uuid4().hex[:8]}"
    s3.mkdir(name)
    with SyntheticWebServer(str(work / "images")) as web:
        src = make_source(str(work), 40, web.base_url, broken={"status_404": 0.1, "bad_scheme": 0.05, "corrupt": 0.05})
        source_s3 = f"s3://{name}/source"
        s3.put(src["source"], source_s3.split("://")[1], recursive=True)
        local = str(work / "pool")
        download_stage.run(DownloadConfig(input=src["source"], output=local, **TEST_DOWNLOAD_SETTINGS), spark)
        out = f"s3://{name}/pool"
        download_stage.run(DownloadConfig(input=source_s3, output=out, **TEST_DOWNLOAD_SETTINGS), spark)
        in_process = f"s3://{name}/pool-in-process"
        master = os.environ.pop("LAIONTOOLS_SPARK_MASTER", None)
        try:
            rep = download_stage.run(DownloadConfig(input=source_s3, output=in_process, **TEST_DOWNLOAD_SETTINGS)).details
        finally:
            if master is not None:
                os.environ["LAIONTOOLS_SPARK_MASTER"] = master
        assert rep["engine"] == "in-process"
    return Pools(local, out, source_s3, in_process)


@pytest.mark.slow
def test_download_from_and_to_s3_equals_the_local_run(spark, pools):
    """Input and output on s3://: the same manifest (uids, shards, hashes), catalog and settings as on disk."""
    from laiontools.contracts import layout
    from laiontools.contracts.manifest import read_manifest

    m_s3 = read_manifest(f"{pools.s3}/{layout.POOL_MANIFEST}")
    m_local = read_manifest(f"{pools.local}/{layout.POOL_MANIFEST}")
    assert m_s3["num_samples"] == m_local["num_samples"] > 0
    assert m_s3["uids"] == m_local["uids"]  # same uid file: path, count, sha256
    # same shards: names, counts, sizes, and every member's name and bytes (not the tar's sha256 or the
    # member order: img2dataset stamps members with the time they were written, in the order fetches end)
    key = ("path", "num_samples", "bytes")
    assert [tuple(s[k] for k in key) for s in m_s3["shards"]] == [tuple(s[k] for k in key) for s in m_local["shards"]]
    for sh in m_s3["shards"]:
        assert sorted(members(f"{pools.s3}/{sh['path']}")) == sorted(members(f"{pools.local}/{sh['path']}"))
        assert sha256_file(f"{pools.s3}/{sh['path']}")[0] == sh["sha256"]
    # every success row names its shard and byte span (the catalog's shard mapping works on s3 paths)
    s3_cat = catalog_rows(f"{pools.s3}/{layout.CATALOG_DIR}", spark)
    local_cat = catalog_rows(f"{pools.local}/{layout.CATALOG_DIR}", spark)
    ok = s3_cat[s3_cat["status"] == "success"]
    assert len(ok) == m_s3["num_samples"]
    assert ok["shard"].notna().all() and ok["tar_offset"].notna().all()
    span = ["tar_offset", "tar_length"]  # where a sample sits in its tar follows the fetch order
    pd.testing.assert_frame_equal(s3_cat.drop(columns=span), local_cat.drop(columns=span))
    # each span read back from the bucket holds exactly the sample's members (a tar of its own)
    import io
    import tarfile

    fs, _ = url_to_fs(pools.s3)
    for r in ok.itertuples():
        with fs.open(f"{pools.s3.split('://')[1]}/shards/{r.shard}.tar", "rb") as f:
            f.seek(int(r.tar_offset))
            span = f.read(int(r.tar_length))
        with tarfile.open(fileobj=io.BytesIO(span + b"\0" * 1024), mode="r:") as tf:
            names = {m.name.split(".", 1)[0] for m in tf if m.isfile()}
        assert names == {r.key}, (r.shard, r.key, names)
    assert m_s3["source"] == m_local["source"]  # same source fingerprint, read from the bucket
    # credentials come from the environment, never from the recorded settings or the manifest
    recorded = json.dumps(read_json(f"{pools.s3}/{layout.SETTINGS_JSON}")) + json.dumps(m_s3)
    for secret in (os.environ["AWS_ACCESS_KEY_ID"], os.environ["AWS_SECRET_ACCESS_KEY"]):
        assert secret not in recorded


@pytest.mark.slow
def test_download_in_process_on_s3_equals_the_spark_run(spark, pools):
    """The in-process engine reads the source from the bucket and writes the pool into it (its forked
    download processes each open their own s3fs client): the Spark run's uid file, shards, members and
    catalog rows, the catalog readable by Spark."""
    from laiontools.contracts import layout
    from laiontools.contracts.manifest import read_manifest

    got = read_manifest(f"{pools.s3_in_process}/{layout.POOL_MANIFEST}")
    want = read_manifest(f"{pools.s3}/{layout.POOL_MANIFEST}")
    assert got["uids"] == want["uids"] and got["num_samples"] == want["num_samples"] > 0
    key = ("path", "num_samples", "bytes")
    assert [tuple(s[k] for k in key) for s in got["shards"]] == [tuple(s[k] for k in key) for s in want["shards"]]
    for sh in got["shards"]:
        assert sorted(members(f"{pools.s3_in_process}/{sh['path']}")) == sorted(members(f"{pools.s3}/{sh['path']}"))
    span = ["tar_offset", "tar_length"]  # where a sample sits in its tar follows the fetch order
    pd.testing.assert_frame_equal(catalog_rows(f"{pools.s3_in_process}/{layout.CATALOG_DIR}", spark).drop(columns=span),
                                  catalog_rows(f"{pools.s3}/{layout.CATALOG_DIR}", spark).drop(columns=span))


@pytest.mark.slow
def test_verify_reads_an_s3_pool_on_both_paths(spark, pools, s3):
    """verify on s3://: OK as it is; a tampered shard is named, in this process and in Spark tasks."""
    from laiontools.contracts import layout
    from laiontools.stages.verify import verify_manifest

    m = f"{pools.s3}/{layout.POOL_MANIFEST}"
    assert verify_manifest(m).ok and verify_manifest(m, spark=spark).ok
    check_verify_names_a_flipped_byte(m, spark)


@pytest.fixture(scope="module")
def resharded(spark, pools, tmp_path_factory) -> dict[str, tuple[dict, dict, str]]:
    """subsets and reshard of the s3 pool into s3://, and of the local pool into a local folder:
    {"s3" | "local": (subset manifest, resharded manifest, resharded folder)}."""
    from laiontools.contracts import layout
    from laiontools.contracts.manifest import read_manifest
    from laiontools.stages import reshard as reshard_stage
    from laiontools.stages import subsets as subsets_stage
    from laiontools.stages.reshard import ReshardConfig
    from laiontools.stages.subsets import SubsetsConfig

    out = {}
    local_base = str(tmp_path_factory.mktemp("s3-local-chain"))
    for where, pool_dir, base in (("s3", pools.s3, pools.s3.rsplit("/", 1)[0]), ("local", pools.local, local_base)):
        n = read_manifest(f"{pool_dir}/{layout.POOL_MANIFEST}")["num_samples"]
        rows = subsets_stage.run(SubsetsConfig(pool=f"{pool_dir}/{layout.POOL_MANIFEST}", output=f"{base}/subsets",
                                               scales=f"{n - 2},{n // 2}", seed=3), spark).details
        big = rows[0]["manifest"]
        reshard_stage.run(ReshardConfig(manifest=big, output=f"{base}/resharded", shard_size=max(2, n // 4)), spark)
        out[where] = (read_manifest(big), read_manifest(f"{base}/resharded/{layout.RESHARD_MANIFEST}"), f"{base}/resharded")
        out[f"{where}_subset"] = big
        out[f"{where}_half"] = rows[1]["manifest"]
    return out


@pytest.mark.slow
def test_subsets_and_reshard_on_s3_equal_the_local_run(resharded, s3):
    """subsets and reshard of the s3 pool, into s3://: the same uid files and resharded samples as on disk."""
    (sub_s3, rs_s3, dir_s3), (sub_l, rs_l, dir_l) = resharded["s3"], resharded["local"]
    assert sub_s3["uids"] == sub_l["uids"] and sub_s3["num_samples"] == sub_l["num_samples"] > 0
    assert [(s["path"], s["num_samples"]) for s in rs_s3["shards"]] == [(s["path"], s["num_samples"]) for s in rs_l["shards"]]
    for sh in rs_s3["shards"]:
        assert sorted(members(f"{dir_s3}/{sh['path']}")) == sorted(members(f"{dir_l}/{sh['path']}"))
    # the resharded folder on s3 references the subset's uid file in the bucket (nothing copied)
    assert rs_s3["uids"]["path"].startswith("s3://") and rs_s3["uids"]["sha256"] == sub_s3["uids"]["sha256"]
    assert sha256_file(rs_s3["uids"]["path"])[0] == rs_s3["uids"]["sha256"]
    assert not s3.exists(f"{dir_s3.split('://')[1]}/uids.npy")


@pytest.mark.slow
def test_reshard_in_process_on_s3_writes_the_spark_runs_bytes(resharded, s3, monkeypatch):
    """Below --spark-above with no master named, reshard plans from the s3 catalog and writes into s3://
    from forked task processes (each opens its own s3fs client): the same shards, byte for byte (their
    sha256 in the manifest), as the Spark run."""
    from laiontools.contracts import layout
    from laiontools.contracts.manifest import read_manifest
    from laiontools.stages import reshard as reshard_stage
    from laiontools.stages.reshard import ReshardConfig

    monkeypatch.delenv("LAIONTOOLS_SPARK_MASTER", raising=False)
    _, rs_s3, dir_s3 = resharded["s3"]
    out = dir_s3 + "-in-process"
    res = reshard_stage.run(ReshardConfig(manifest=resharded["s3_subset"], output=out,
                                          shard_size=rs_s3["reshard"]["shard_size"])).details
    assert res["engine"] == "in-process" and res["sample_spans"] == "catalog"
    got = read_manifest(f"{out}/{layout.RESHARD_MANIFEST}")
    assert [(s["path"], s["num_samples"], s["sha256"]) for s in got["shards"]] == \
        [(s["path"], s["num_samples"], s["sha256"]) for s in rs_s3["shards"]]
    for sh in got["shards"]:
        assert sha256_file(f"{out}/{sh['path']}")[0] == sh["sha256"]


@pytest.mark.slow
def test_reshard_from_s3_asks_the_store_for_the_subsets_bytes_once(resharded, s3, s3_server, monkeypatch):
    """A subset's samples are scattered over the source tars, and every output shard reads from each of
    them. The store must send about the subset's bytes: each sample's span from the catalog, fetched
    together (neighbours merged when the gap is small: at most twice the bytes), one GET per sample at
    most. Before, a file object's 4 MB read-ahead fetched the rest of a source tar at every backward
    jump: 60-70x the subset's bytes on bench/bench_reshard_s3.py's pool. Counted by the server."""
    import pyarrow.dataset as ds

    from laiontools.contracts import layout
    from laiontools.contracts.manifest import read_manifest
    from laiontools.contracts.uids import array_to_uids, load_uids
    from laiontools.stages import reshard as reshard_stage
    from laiontools.stages.reshard import ReshardConfig

    monkeypatch.delenv("LAIONTOOLS_SPARK_MASTER", raising=False)
    half = resharded["s3_half"]
    sub = read_manifest(half)
    pool_dir = resharded["s3_subset"].rsplit("/", 2)[0] + "/pool"
    # the subset's span bytes, from the pool's catalog and the subset's uid file
    uids = set(array_to_uids(load_uids(f"{half.rsplit('/', 1)[0]}/{sub['uids']['path']}", mmap=False)))
    cat = ds.dataset(f"{pool_dir}/catalog".split("://")[1], filesystem=s3, format="parquet").to_table(
        columns=["uid", "status", "tar_length"]).to_pandas()
    rows = cat[(cat["status"] == "success") & cat["uid"].isin(uids)]
    assert len(rows) == sub["num_samples"] == len(uids) > 4
    span_bytes = int(rows["tar_length"].sum())

    s3_server.watch(f"/{pool_dir.split('://')[1]}/shards/")
    out = f"{pool_dir}-half-resharded"
    res = reshard_stage.run(ReshardConfig(manifest=half, output=out, shard_size=2)).details
    assert res["engine"] == "in-process" and res["sample_spans"] == "catalog" and res["num_shards"] >= 3
    assert span_bytes <= s3_server.bytes <= 2 * span_bytes, (s3_server.bytes, span_bytes)
    assert 1 <= s3_server.gets <= len(rows)
    got = read_manifest(f"{out}/{layout.RESHARD_MANIFEST}")
    assert sum(s["num_samples"] for s in got["shards"]) == len(rows)
    for sh in got["shards"]:
        assert sha256_file(f"{out}/{sh['path']}")[0] == sh["sha256"]


@pytest.mark.slow
@pytest.mark.parametrize("damage", ["missing", "truncated"])
def test_reshard_of_a_damaged_s3_source_shard_is_one_clear_error(resharded, s3, damage, tmp_path, monkeypatch):
    """A source shard gone from the bucket, or cut short, after the subset was cut: one error naming the
    shard's s3:// path, whether its ranges were fetched together or read one by one."""
    from laiontools.contracts.manifest import read_manifest
    from laiontools.stages import reshard as reshard_stage
    from laiontools.stages.reshard import ReshardConfig

    monkeypatch.delenv("LAIONTOOLS_SPARK_MASTER", raising=False)
    half = resharded["s3_half"]
    pool_dir = resharded["s3_subset"].rsplit("/", 2)[0] + "/pool"
    pool = read_manifest(f"{pool_dir}/pool.manifest.json")
    victim = f"{pool_dir}/{pool['shards'][0]['path']}"
    saved = s3.cat_file(victim.split("://")[1])
    try:
        if damage == "missing":
            s3.rm(victim.split("://")[1])
        else:
            s3.pipe_file(victim.split("://")[1], saved[: len(saved) // 3])
        s3.invalidate_cache()
        with pytest.raises(Exception) as err:
            reshard_stage.run(ReshardConfig(manifest=half, output=f"{pool_dir}-damaged-{damage}", shard_size=2))
        msg = str(err.value)
        assert victim.split("://")[1] in msg and "Traceback" not in msg, msg
        assert f"source shard {victim} is " + ("truncated" if damage == "truncated" else "missing") in msg, msg
        assert "laiontools verify" in msg or "re-download" in msg, msg
    finally:
        s3.pipe_file(victim.split("://")[1], saved)
        s3.invalidate_cache()


@pytest.mark.slow
def test_train_reads_resharded_shards_from_s3_like_local(resharded, tmp_path, monkeypatch):
    """`train --manifest s3://…/subset.manifest.json`: open_clip's webdataset reader streams the shards from
    the bucket (fsspec). The outcome matches the local run in what a trainer makes comparable (it is not
    bit-reproducible run to run: tests/faults/test_kill.py): the same plan, steps, samples seen and model
    structure. The credentials reach the trainer only through the environment: none of the run folder's
    files holds them."""
    import torch

    from laiontools.contracts import layout
    from laiontools.stages import train as train_stage
    from laiontools.stages.train import TrainConfig

    # A secret of this test alone (moto takes any credentials), so finding it anywhere is a leak.
    key_id, secret = f"LTKEY{uuid.uuid4().hex[:12].upper()}", f"lt-secret-{uuid.uuid4().hex}"
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", key_id)
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", secret)
    results, runs = {}, {}
    for where in ("s3", "local"):
        manifest = f"{resharded[where][2]}/{layout.RESHARD_MANIFEST}"
        runs[where] = str(tmp_path / where)
        results[where] = train_stage.run(TrainConfig(manifest=manifest, model="lt-tiny", samples_seen=32, batch_size=8, workers=1,
                                                     checkpoint_every=16, log_every=1, output=runs[where])).details
    a, b = results["s3"], results["local"]
    assert (a["samples_seen"], a["steps"], a["epochs"]) == (b["samples_seen"], b["steps"], b["epochs"]) == (32, 4, 2)
    shards = read_json(os.path.join(runs["s3"], layout.TRAIN_SHARDS_JSON))
    assert shards["urls"] and all(u.startswith("s3://") for u in shards["urls"])
    assert shards["weights"] == read_json(os.path.join(runs["local"], layout.TRAIN_SHARDS_JSON))["weights"]
    settings = read_json(os.path.join(runs["s3"], layout.TRAIN_SETTINGS_JSON))
    assert settings["manifest"].startswith("s3://")
    steps = {w: [json.loads(x)["step"] for x in open(os.path.join(runs[w], layout.TRAIN_METRICS_JSONL))] for w in runs}  # noqa: SIM115
    assert steps["s3"] == steps["local"] == [1, 2, 3, 4]
    ma = torch.load(os.path.join(runs["s3"], "model.pt"), weights_only=True)
    mb = torch.load(os.path.join(runs["local"], "model.pt"), weights_only=True)
    assert {k: v.shape for k, v in ma.items()} == {k: v.shape for k, v in mb.items()}
    assert all(torch.isfinite(v).all() for v in ma.values() if v.is_floating_point())
    # no file of the run folder (settings.json, params.txt, out.log, rank logs, checkpoints...) holds a credential
    files = [os.path.join(d, f) for d, _, fs in os.walk(runs["s3"]) for f in fs]
    assert any(f.endswith("params.txt") for f in files) and any(f.endswith("settings.json") for f in files)
    for f in files:
        with open(f, "rb") as fh:
            data = fh.read()
        assert secret.encode() not in data and key_id.encode() not in data, f"credential in {f}"


@pytest.mark.slow
def test_embed_and_dedup_on_s3_equal_the_local_run(spark, pools, s3, monkeypatch, tmp_path):
    """embed (tiny random-init model, one process) of the s3 pool into s3://: the same vectors as on disk."""
    monkeypatch.delenv("LAIONTOOLS_SPARK_MASTER", raising=False)
    from laiontools.contracts import layout
    from laiontools.contracts.manifest import read_manifest
    from laiontools.stages import embed as embed_stage
    from laiontools.stages.embed import EmbedConfig

    outs = {"s3": pools.s3.rsplit("/", 1)[0] + "/emb", "local": str(tmp_path / "emb")}
    for where, pool_dir in (("s3", pools.s3), ("local", pools.local)):
        embed_stage.run(EmbedConfig(manifest=f"{pool_dir}/{layout.POOL_MANIFEST}", output=outs[where], model="lt-tiny",
                                    batch_size=8, num_workers=0, device="cpu"))
    shards = [sh["path"].rsplit("/", 1)[-1].removesuffix(".tar") for sh in read_manifest(f"{pools.s3}/{layout.POOL_MANIFEST}")["shards"]]
    check_same_embeddings(outs["s3"], outs["local"], shards)

    # dedup of those embeddings (s3 in, s3 out) against a small local eval set: the same findings
    from laiontools.stages import dedup as dedup_stage
    from laiontools.stages.dedup import DedupConfig
    from laiontools.synthetic import write_evalset

    ev = str(tmp_path / "evalset")
    write_evalset(ev, seed=5)
    # On Spark (the session given) and in process (none given, no master named, a pool under --spark-above:
    # threads reading and writing the bucket through fsspec).
    counts, excluded = {}, {}
    for where, engine, session in (("s3", "spark", spark), ("s3", "in-process", None), ("local", "spark", spark)):
        res = dedup_stage.run(DedupConfig(embeddings=outs[where], evalset=[f"glyphs={ev}"], device="cpu", threshold=0.5,
                                          output=f"{outs[where]}-dedup-{engine}"), session)
        assert res.details["search_engine"].startswith(engine), res.details["search_engine"]
        assert res.outputs["exclude"].startswith("s3://") == (where == "s3")
        counts[where, engine] = res.counts
        excluded[where, engine] = sha256_file(res.outputs["exclude"])[0]
    assert counts["s3", "spark"] == counts["s3", "in-process"] == counts["local", "spark"], counts
    assert counts["s3", "spark"]["pool_samples"] > 0, counts
    assert excluded["s3", "spark"] == excluded["s3", "in-process"] == excluded["local", "spark"]

    # semdedup of the s3 embeddings into s3://, in process (threads, each task reading and writing the
    # bucket through fsspec) and on Spark: the same exclusion list and report, byte for byte
    from laiontools.stages import semdedup as semdedup_stage
    from laiontools.stages.semdedup import SemDedupConfig

    got = {}
    for engine, sp in (("in-process", None), ("spark", spark)):
        out = f"{outs['s3']}-semdedup-{engine}"
        res = semdedup_stage.run(SemDedupConfig(embeddings=outs["s3"], output=out, clusters=2, eps=[0.01, 0.05],
                                                gallery_groups=0, spark_above=-1 if sp is None else 0), sp)
        assert res.details["engine"].startswith(engine.split("-")[0] if sp is not None else "in-process")
        got[engine] = (sha256_file(res.outputs["exclude"])[0], res.counts,
                       sorted(s3.find(f"{out.split('://')[1]}/report")))
    assert got["in-process"][0] == got["spark"][0] and got["in-process"][1] == got["spark"][1], got
    assert [p.rsplit("/", 1)[-1] for p in got["in-process"][2]] == [p.rsplit("/", 1)[-1] for p in got["spark"][2]]


@pytest.mark.slow
def test_embed_spark_and_torchrun_engines_on_s3_equal_the_local_engine(spark, pools, s3, tmp_path):
    """embed's other engines on s3:// in and out: one Spark task per shard, and 2 CPU processes launched
    with torchrun, each write the vectors and metadata the local engine writes for the same pool."""
    import io

    import numpy as np

    from laiontools.contracts import layout
    from laiontools.contracts.manifest import read_manifest
    from laiontools.stages import embed as embed_stage
    from laiontools.stages.embed import EmbedConfig

    manifest = f"{pools.s3}/{layout.POOL_MANIFEST}"
    common = {"manifest": manifest, "model": "lt-tiny", "batch_size": 8, "device": "cpu"}
    ref = str(tmp_path / "local-engine")
    embed_stage.run(EmbedConfig(output=ref, num_workers=0, **common))
    base = pools.s3.rsplit("/", 1)[0]
    outs = {"spark": f"{base}/emb-spark", "torchrun": f"{base}/emb-torchrun"}
    res = embed_stage.run(EmbedConfig(output=outs["spark"], num_workers=0, engine="spark", **common), spark)
    assert res.ok, res.summary
    res = embed_stage.run(EmbedConfig(output=outs["torchrun"], num_workers=0, engine="torchrun", nproc=2, **common))
    assert res.ok and res.counts["processes"] == 2, res.summary
    shards = [layout.shard_id(sh["path"]) for sh in read_manifest(manifest)["shards"]]
    assert len(shards) >= 2  # both torchrun ranks had a shard
    for engine, out in outs.items():
        key = out.split("://")[1]
        for sid in shards:
            for emb_dir in (layout.EMB_IMG_DIR, layout.EMB_TEXT_DIR):
                got = np.load(io.BytesIO(s3.cat(f"{key}/{emb_dir}/{sid}.npy")))
                want = np.load(f"{ref}/{emb_dir}/{sid}.npy")
                assert got.shape == want.shape and got.shape[0] > 0, (engine, emb_dir, sid)
                # same rows in the same order (same source tars); fp16 vectors of other batch mates may move
                # a value by a unit in the last place
                np.testing.assert_allclose(got.astype(np.float32), want.astype(np.float32), rtol=0, atol=2e-3)
            got_meta = pd.read_parquet(io.BytesIO(s3.cat(f"{key}/{layout.EMB_META_DIR}/{sid}.parquet")))
            want_meta = pd.read_parquet(f"{ref}/{layout.EMB_META_DIR}/{sid}.parquet")
            assert list(got_meta["uid"]) == list(want_meta["uid"]), (engine, sid)


@pytest.mark.slow
def test_takedown_of_an_s3_pool_into_s3_equals_the_local_run(spark, pools, s3, monkeypatch, tmp_path):
    """takedown of the s3 pool into s3:// (on Spark, and in process: the catalog read from the bucket with
    pyarrow, the new one written into it) and of the local pool into a folder, with the same list (two
    uids in different shards and a url): the same removed samples, counts, and rewritten shards'
    members; untouched shards are referenced in the parent bucket; the audit log lands in the bucket."""
    from laiontools.contracts import layout
    from laiontools.contracts.manifest import read_manifest, resolve
    from laiontools.stages import takedown as takedown_stage
    from laiontools.stages.takedown import TakedownConfig
    from laiontools.testing.removal import removal_list_for

    monkeypatch.delenv("LAIONTOOLS_SPARK_MASTER", raising=False)
    listfile = tmp_path / "list.txt"
    removal_list_for(f"{pools.local}/catalog", 2, str(listfile))
    got = {}
    bucket = pools.s3.rsplit("/", 1)[0]
    for where, session, pool_dir, out in (("s3", spark, pools.s3, bucket + "/pool-takedown"),
                                          ("s3 in process", None, pools.s3, bucket + "/pool-takedown-in-process"),
                                          ("local", spark, pools.local, str(tmp_path / "pool-takedown"))):
        res = takedown_stage.run(TakedownConfig(pool=f"{pool_dir}/{layout.POOL_MANIFEST}", list_file=str(listfile),
                                                reason="court order 7", output=out), session)
        engine = read_json(f"{out}/{layout.POOL_MANIFEST}.run.json")["engine"]
        assert engine == "in-process" if session is None else engine.startswith("spark "), (where, engine)
        m = read_manifest(f"{out}/{layout.POOL_MANIFEST}")
        rewritten = [s for s in m["shards"] if "parent_sha256" in s]
        got[where] = {"removed": sorted(r["uid"] for r in res.details["removed"]), "counts": res.counts,
                      "num_samples": m["num_samples"],
                      "rewritten": [(s["path"], s["num_samples"], sorted(members(resolve(f"{out}/{layout.POOL_MANIFEST}", s["path"]))))
                                    for s in rewritten],
                      "referenced": [s["path"] for s in m["shards"] if "parent_sha256" not in s]}
        if where.startswith("s3"):
            assert all(p.startswith("s3://") for p in got[where]["referenced"])
            assert s3.exists(f"{out.split('://')[1]}/{layout.TAKEDOWN_AUDIT}")
    assert got["s3 in process"] == got["s3"]
    assert got["s3"]["removed"] == got["local"]["removed"] and len(got["s3"]["removed"]) == 3
    assert got["s3"]["counts"] == got["local"]["counts"] and got["s3"]["num_samples"] == got["local"]["num_samples"]
    assert [r[1:] for r in got["s3"]["rewritten"]] == [r[1:] for r in got["local"]["rewritten"]]
    assert len(got["s3"]["rewritten"]) == 2


class _Killed(Exception):
    pass


def _tree(root: str) -> dict[str, bytes]:
    fs, p = url_to_fs(root)
    p = p.rstrip("/")
    fs.invalidate_cache()
    return {f[len(p) + 1:]: fs.cat_file(f) for f in fs.find(p)} if fs.exists(p) else {}


@pytest.mark.parametrize("where", ["local", "s3"])
def test_catalog_swap_killed_at_any_step_comes_back_whole(where, tmp_path, request):
    """swap_in (download's and takedown's catalog swap) killed at every step, a move cut halfway on
    the object store (one key of several copied, or removed): readers refuse the folder while its
    journal is there, and the next rebuild's swap_temp leaves exactly the old folder (killed before the
    new one was whole in place) or the new one (after), and nothing beside it."""
    from laiontools.core import storage

    base = str(tmp_path) if where == "local" else request.getfixturevalue("bucket")
    fs, _ = url_to_fs(base + "/x")
    old = {"part-0.parquet": b"old 0", "part-1.parquet": b"old 1", "sub/part-2.parquet": b"old 2"}
    new = {"part-0.parquet": b"new 0", "part-9.parquet": b"new 9"}

    def setup(k: int) -> tuple[str, str]:
        final = f"{base}/pool{k}/catalog"
        for name, data in old.items():
            storage.atomic_write_bytes(f"{final}/{name}", data)
        tmp = storage.swap_temp(final)
        for name, data in new.items():
            storage.atomic_write_bytes(f"{tmp}/{name}", data)
        return final, tmp

    real = {name: getattr(storage, name) for name in ("write_json", "_put_tree", "_drop_tree")}
    steps: list[str] = []

    def cut(name: str, at: int):
        def step(*args):
            steps.append(name)
            if len(steps) - 1 != at:
                return real[name](*args)
            if name != "write_json" and where == "s3":  # a move cut halfway: one key of several
                sfs, sp = url_to_fs(args[0])
                files = sorted(sfs.find(sp.rstrip("/")))
                if name == "_put_tree":
                    _, dp = url_to_fs(args[1])
                    sfs.copy(files[:1], [dp.rstrip("/") + f[len(sp.rstrip("/")):] for f in files[:1]])
                elif files:
                    sfs.rm(files[:1])
            raise _Killed(f"killed at step {at} ({name})")
        return step

    outcomes, refused = [], 0
    for at in range(20):
        final, tmp = setup(at)
        steps.clear()
        patched = {name: cut(name, at) for name in real}
        for name, fn in patched.items():
            setattr(storage, name, fn)
        try:
            storage.swap_in(tmp, final)
            killed = False
        except _Killed:
            killed = True
        finally:
            for name, fn in real.items():
                setattr(storage, name, fn)
        if not killed:
            assert _tree(final) == new and not storage.swap_pending(final)
            break
        # readers refuse the folder while its journal is there; a folder they are not refused is whole
        pending = storage.swap_pending(final)
        refused += pending
        assert pending or _tree(final) in (old, new), at
        storage.swap_temp(final)
        got = _tree(final)
        assert got in (old, new), (at, sorted(got))
        assert sorted(fs.ls(url_to_fs(f"{base}/pool{at}")[1], detail=False)) == [url_to_fs(final)[1]], at
        assert not storage.swap_pending(final)
        outcomes.append("new" if got == new else "old")
    # every step was reached, and a kill goes back until the new folder is whole in place, forward after
    assert len(outcomes) >= 6 and outcomes == sorted(outcomes, key=lambda o: o == "new") and outcomes[0] == "old"
    assert "new" in outcomes and refused >= len(outcomes) - 2


def test_a_pool_whose_catalog_swap_was_interrupted_is_refused(tmp_path):
    from laiontools.contracts.pool import load_pool
    from laiontools.core import storage
    from laiontools.core.errors import InputError
    from laiontools.testing.embed_pool import write_pool

    manifest = write_pool(str(tmp_path / "pool"), n_shards=1, per_shard=2, image_size=32, realistic=False)
    storage.atomic_write_bytes(str(tmp_path / "pool" / "catalog" / "part-0.parquet"), b"rows")
    pool = load_pool(manifest)
    storage.write_json(storage._swap_journal(pool.catalog), {"phase": "old-whole", "old": None, "tmp": None})
    with pytest.raises(InputError, match="is being rebuilt, or a rebuild was killed midway; re-run"):
        load_pool(manifest)


@pytest.fixture()
def small_s3_pool(s3, bucket, tmp_path) -> str:
    """A 2-shard pool (20 samples each, sample spans in its catalog) written by the reshard benchmark's
    builder and uploaded to a fresh bucket; returns its s3:// folder."""

    sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(__file__)), "bench"))
    from bench_reshard import build_pool

    build_pool(str(tmp_path / "pool"), shards=2, per_shard=20, kb=2)
    s3.put(str(tmp_path / "pool") + "/", f"{bucket}/pool".split("://")[1], recursive=True)
    s3.invalidate_cache()
    return f"{bucket}/pool"


@pytest.mark.parametrize("engine,entry", [("spark", "uid"), ("in-process", "uid"), ("in-process", "sha256")])
@pytest.mark.parametrize("damage", ["missing", "empty"])
def test_takedown_of_a_damaged_s3_shard_is_one_clear_error(spark, s3, small_s3_pool, damage, engine, entry, monkeypatch,
                                                           tmp_path):
    """A shard gone from the bucket, or 0 bytes, when takedown rewrites it (a Spark task, or a thread in
    process) or scans it for a content entry (in process: a forked process): one TakedownError naming its
    s3:// path, as raised in the task (was py4j's traceback of the task)."""
    from laiontools.contracts.manifest import read_manifest
    from laiontools.stages import takedown as takedown_stage
    from laiontools.stages.takedown import TakedownConfig, TakedownError

    pool = read_manifest(f"{small_s3_pool}/pool.manifest.json")
    victim = f"{small_s3_pool}/{pool['shards'][0]['path']}"
    if damage == "missing":
        s3.rm(victim.split("://")[1])
    else:
        s3.pipe_file(victim.split("://")[1], b"")
    s3.invalidate_cache()
    monkeypatch.delenv("LAIONTOOLS_SPARK_MASTER", raising=False)
    uid = pd.read_parquet(str(tmp_path / "pool" / "catalog")).query("shard == '00000'")["uid"].iloc[0]
    # a content entry (any hash: every shard is read to look for it) or the uid of a sample in the shard
    value = hashlib.sha256(b"an image of no pool").hexdigest() if entry == "sha256" else uid
    (tmp_path / "list.txt").write_text(f"{entry} {value}\n")
    with pytest.raises(TakedownError) as err:
        takedown_stage.run(TakedownConfig(pool=f"{small_s3_pool}/pool.manifest.json", reason="test",
                                          output=f"{small_s3_pool}-td", list_file=str(tmp_path / "list.txt")),
                           spark if engine == "spark" else None)
    msg = str(err.value)
    assert msg.startswith(f"shard {victim} cannot be read") and "\n" not in msg, msg
    assert "laiontools verify" in msg, msg


@pytest.fixture()
def small_s3_subset(spark, small_s3_pool) -> str:
    """A 30-sample subset of `small_s3_pool`, written into the same bucket; returns its manifest's URL."""
    from laiontools.stages import subsets as subsets_stage
    from laiontools.stages.subsets import SubsetsConfig

    return subsets_stage.run(SubsetsConfig(pool=f"{small_s3_pool}/pool.manifest.json", output=f"{small_s3_pool}-subsets",
                                           scales="30", seed=1), spark).details[0]["manifest"]


def test_subsets_in_process_read_and_write_s3_like_spark(spark, s3, small_s3_pool):
    """subsets without a session (in process: the pool is far below --spark-above) reads the catalog from
    the bucket and writes its uid files and manifests there: the same bytes as the Spark engine's run."""
    from laiontools.stages import subsets as subsets_stage
    from laiontools.stages.subsets import SubsetsConfig

    files = {}
    for engine in ("spark", "in-process"):
        out = f"{small_s3_pool}-subsets-{engine}"
        res = subsets_stage.run(SubsetsConfig(pool=f"{small_s3_pool}/pool.manifest.json", output=out, scales="30,10", seed=1,
                                              min_caption_length=1), spark if engine == "spark" else None)
        assert [r["obtained"] for r in res.details] == [30, 10]
        s3.invalidate_cache()
        names = sorted(f.rsplit("/", 1)[1] for f in s3.ls(out.split("://")[1]) if f.endswith((".manifest.json", ".uids.npy")))
        files[engine] = {n: s3.cat(f"{out}/{n}") for n in names}
        run = json.loads(s3.cat(f"{out}/30.manifest.json.run.json"))
        assert run["engine"] == ("in-process" if engine == "in-process" else f"spark {spark.sparkContext.master}")
    assert len(files["spark"]) == 4 and files["in-process"] == files["spark"]
    # the 10-sample subset (a quarter of the 40 catalog rows) has its spans in the bucket, the same rows from
    # both engines (one part in process, a part per range partition on Spark); the 30 has none
    import pandas as pd

    from laiontools.contracts import spans

    got = {}
    for engine in ("spark", "in-process"):
        folder = f"{small_s3_pool}-subsets-{engine}/10.spans"
        record = json.loads(s3.cat(f"{folder}/{spans.SPANS_JSON}"))
        got[engine] = pd.concat([pd.read_parquet(io.BytesIO(s3.cat(f"{folder}/{p['path']}"))) for p in record["parts"]], ignore_index=True)
        assert record["count"] == 10 and not s3.exists(f"{small_s3_pool}-subsets-{engine}/30.spans".split("://")[1])
    pd.testing.assert_frame_equal(got["spark"], got["in-process"])


def test_reshard_in_process_reads_a_subsets_spans_from_s3(spark, s3, small_s3_pool, monkeypatch):
    """subsets writes a small subset's spans into the bucket; reshard in process reads them there instead of
    the pool's catalog (its scan would raise), and so does reshard on Spark (the parts hashed and read by
    tasks); both write the shards reshard writes from the catalog."""
    from laiontools.contracts import spans
    from laiontools.contracts.manifest import read_manifest
    from laiontools.stages import reshard as reshard_stage
    from laiontools.stages import subsets as subsets_stage
    from laiontools.stages.reshard import ReshardConfig
    from laiontools.stages.subsets import SubsetsConfig

    monkeypatch.delenv("LAIONTOOLS_SPARK_MASTER", raising=False)
    out = f"{small_s3_pool}-subsets-spans"
    sub = subsets_stage.run(SubsetsConfig(pool=f"{small_s3_pool}/pool.manifest.json", output=out, scales="8", seed=2)).details[0]["manifest"]
    scan = spans.scan_catalog

    def no_scan(*a, **k):
        raise AssertionError("the catalog was scanned although the subset's spans were there")

    monkeypatch.setattr(spans, "scan_catalog", no_scan)
    a = reshard_stage.run(ReshardConfig(manifest=sub, output=f"{out}-a", shard_size=3)).details
    assert a["engine"] == "in-process" and a["sample_spans"] == "subset spans"
    c = reshard_stage.run(ReshardConfig(manifest=sub, output=f"{out}-c", shard_size=3, spark_above=0), spark).details
    assert c["engine"].startswith("spark ") and c["sample_spans"] == "subset spans"
    monkeypatch.setattr(spans, "scan_catalog", scan)
    s3.rm(f"{out}/8.spans".split("://")[1], recursive=True)
    s3.invalidate_cache()
    b = reshard_stage.run(ReshardConfig(manifest=sub, output=f"{out}-b", shard_size=3)).details
    assert b["sample_spans"] == "catalog"
    shards = [read_manifest(f"{o}/subset.manifest.json")["shards"] for o in (f"{out}-a", f"{out}-b", f"{out}-c")]
    assert shards[0] == shards[1] == shards[2] and len(shards[0]) == 3


def _through_proxy(monkeypatch, proxy, env: bool = True) -> None:
    """This process's s3 clients talk to the store through `proxy` (an S3Proxy), asking botocore for one attempt a
    request rather than our two, to keep the tests short (s3fs's own 5 retries remain); `env`: the endpoint
    variables too, for the clients made from them (tasks, a run a test starts)."""
    import fsspec

    from laiontools.core.storage import S3_CLIENT_DEFAULTS

    if env:
        for var in ("FSSPEC_S3_ENDPOINT_URL", "AWS_ENDPOINT_URL"):
            monkeypatch.setenv(var, proxy.endpoint)
    monkeypatch.setitem(fsspec.config.conf, "s3", {**fsspec.config.conf.get("s3", {}), "endpoint_url": proxy.endpoint,
                                                   "config_kwargs": {**S3_CLIENT_DEFAULTS, "retries": {"total_max_attempts": 1}}})


def test_reshard_from_a_store_that_says_slow_down_waits_and_writes_the_same_shards(s3, s3_server, small_s3_pool, small_s3_subset,
                                                                                   monkeypatch):
    """S3 refuses requests past its rate on a key prefix ("503 SlowDown") until it spreads the prefix out, and
    reshard sends one GET a sample from every task of a cluster at once. s3fs asks again 5 times within ~2 s;
    past that, reshard failed. Now the ranges refused so are asked for again after a pause. Here a proxy in
    front of the test server refuses each ranged GET of the pool's shards more times than the client asks
    again itself: reshard waits, then writes the shards it writes from a store that never refused; with no
    time left to wait, it fails in one line naming the source shard and the store's answer (was a raw
    OSError naming the output shard)."""
    from laiontools.contracts.manifest import read_manifest
    from laiontools.stages import reshard as reshard_stage
    from laiontools.stages.reshard import ReshardConfig, ReshardError
    from laiontools.testing.s3server import S3Proxy

    monkeypatch.delenv("LAIONTOOLS_SPARK_MASTER", raising=False)
    out = small_s3_subset.rsplit("/", 2)[0]
    reshard_stage.run(ReshardConfig(manifest=small_s3_subset, output=f"{out}/rs-ref", shard_size=8))
    want = read_manifest(f"{out}/rs-ref/subset.manifest.json")["shards"]
    seen: dict[tuple[str, str], int] = {}
    REFUSALS = 6

    def slow_down(method: str, path: str, headers) -> tuple[int, str, str] | None:
        if method != "GET" or "/pool/shards/" not in path or "Range" not in headers:
            return None
        key = (path, headers["Range"])
        seen[key] = seen.get(key, 0) + 1
        return (503, "SlowDown", "Please reduce your request rate.") if seen[key] <= REFUSALS else None

    with S3Proxy(s3_server.endpoint, slow_down) as proxy:
        _through_proxy(monkeypatch, proxy)
        reshard_stage.run(ReshardConfig(manifest=small_s3_subset, output=f"{out}/rs-slow", shard_size=8))
        refused = sum(1 for m, p, _, st in proxy.requests if st == 503)
        assert refused >= REFUSALS * len(seen) and seen and max(seen.values()) == REFUSALS + 1, (refused, seen)  # refused, then served
        assert read_manifest(f"{out}/rs-slow/subset.manifest.json")["shards"] == want
        seen.clear()
        monkeypatch.setattr(reshard_stage, "THROTTLE_WAIT_S", 0.0)  # (no waiting left: the store's answer said)
        with pytest.raises(ReshardError, match=rf"^source shard {small_s3_pool}/shards/\S+: the object store refused its reads as "
                                               r"too many requests \(.*reduce your request rate.*\) after this task had waited 0 s"):
            reshard_stage.run(ReshardConfig(manifest=small_s3_subset, output=f"{out}/rs-none", shard_size=8))


def test_verify_reads_each_shard_once_and_a_store_that_says_slow_down_is_no_damage(s3, s3_server, small_s3_pool,
                                                                                    monkeypatch, capsys):
    """verify read each shard twice: once for its sha256, once through tarfile for its samples (at 2B, 35-70 TB
    more). It now reads each once, hashing as tarfile reads: the shards' bytes cross the wire once. A store
    that serves one shard and then refuses the next ("503 SlowDown") past its client's retries is one error for
    the store naming that shard, not a finding of damage ("truncated or unreadable tar", exit 1); it was, when
    the refusal met the second read."""
    from laiontools.cli import main
    from laiontools.contracts.manifest import read_manifest
    from laiontools.stages.verify import verify_manifest
    from laiontools.testing.s3server import S3Proxy

    mpath = f"{small_s3_pool}/pool.manifest.json"
    total = sum(s["bytes"] for s in read_manifest(mpath)["shards"])
    s3_server.watch(f"/{small_s3_pool.split('://')[1]}/shards/")
    assert verify_manifest(mpath).ok  # the pool is intact
    assert total <= s3_server.bytes < 1.05 * total, f"the shards' bytes crossed the wire {s3_server.bytes / total:.2f} times"
    reads: dict[str, int] = {}

    def second_shard_refused(method: str, path: str, headers) -> tuple[int, str, str] | None:
        if method != "GET" or "/pool/shards/" not in path or not path.endswith(".tar"):
            return None
        reads[path] = reads.get(path, 0) + 1
        return (503, "SlowDown", "Please reduce your request rate.") if path.endswith("00001.tar") else None

    with S3Proxy(s3_server.endpoint, second_shard_refused) as proxy:
        _through_proxy(monkeypatch, proxy)
        assert main(["verify", mpath]) == 2
        err = capsys.readouterr().err
        assert re.fullmatch(rf"laiontools verify: error: {small_s3_pool}/shards/00001.tar: the object store at {proxy.endpoint} is "
                            r"throttling requests or unavailable \(SlowDown: .*reduce your request rate.*\) after its client's retries; "
                            r"re-run the same command later .*\n", err), err
        assert sorted(p.rpartition("/")[2] for p in reads) == ["00000.tar", "00001.tar"]  # the first served, the second refused


def test_the_catalogs_spans_of_a_tar_the_store_refuses_are_an_error_not_left_out(s3, s3_server, small_s3_pool, monkeypatch):
    """download's catalog indexes each tar it wrote for its sample spans; a tar that cannot be indexed (damaged)
    keeps null spans, and reshard indexes it later. A store that refused the read ("503 SlowDown") gave the same
    null spans: a catalog other than an uninterrupted run's, silently. It is now the task's error, naming the tar;
    and reshard's own index of such a tar no longer calls the refusal damage ("re-download it")."""
    import pyarrow as pa

    from laiontools.core.errors import TaskError
    from laiontools.stages.download import shard_spans
    from laiontools.stages.reshard import index_source_shard
    from laiontools.testing.s3server import S3Proxy

    url = f"{small_s3_pool}/shards/00000.tar"
    batch = pa.RecordBatch.from_pydict({"_sid": ["00000"], "_tar": [url]})
    assert sum(b.num_rows for b in shard_spans([batch])) == 20  # served: a span a sample

    def refused(method: str, path: str, headers) -> tuple[int, str, str] | None:
        return (503, "SlowDown", "Please reduce your request rate.") if method == "GET" and path.endswith("/shards/00000.tar") else None

    with S3Proxy(s3_server.endpoint, refused) as proxy:
        _through_proxy(monkeypatch, proxy, env=False)
        with pytest.raises(TaskError, match=rf"{url}: the object store at .* is throttling requests or unavailable \(SlowDown: "):
            list(shard_spans([batch]))
        # reshard's index of a tar without spans said "truncated or unreadable ... re-download it" of the same refusal
        with pytest.raises(TaskError, match=rf"{url}: the object store at .* is throttling requests or unavailable \(SlowDown: "):
            index_source_shard(("00000", url))


def test_prepare_probing_a_source_the_store_refuses_says_so_not_that_the_file_is_of_another_kind(s3, s3_server, bucket, monkeypatch):
    """prepare reads a text source's first lines for its columns; a store's refusal of that read was "cannot read
    (...); is it really uncompressed?", a question about the file's format. It is the store's error now."""
    from laiontools.core.storage import StorageError
    from laiontools.stages.prepare import probe_columns
    from laiontools.testing.s3server import S3Proxy

    src = f"{bucket}/src/part-0.jsonl"
    s3.pipe_file(src.split("://")[1], b'{"url": "http://a.example/1.jpg", "caption": "a"}\n')
    s3.invalidate_cache()
    assert probe_columns(src, "jsonl", None)[0] == ["url", "caption"]

    def refused(method: str, path: str, headers) -> tuple[int, str, str] | None:
        return (503, "SlowDown", "Please reduce your request rate.") if method == "GET" and path.endswith(".jsonl") else None

    with S3Proxy(s3_server.endpoint, refused) as proxy:
        _through_proxy(monkeypatch, proxy, env=False)
        with pytest.raises(StorageError, match=rf"^{src}: the object store at .* is throttling requests or unavailable \(SlowDown: "):
            probe_columns(src, "jsonl", None)


def test_reshard_of_a_subset_whose_s3_uid_file_is_gone_names_it(s3, small_s3_subset, monkeypatch):
    """The subset's uid file deleted from the bucket: one ReshardError naming its s3:// URL and what to do
    (was a bare FileNotFoundError whose message was the key alone: "error: <bucket>/<key>")."""
    from laiontools.contracts.manifest import read_manifest, resolve
    from laiontools.stages import reshard as reshard_stage
    from laiontools.stages.reshard import ReshardConfig, ReshardError

    monkeypatch.delenv("LAIONTOOLS_SPARK_MASTER", raising=False)
    uid_file = resolve(small_s3_subset, read_manifest(small_s3_subset)["uids"]["path"])
    s3.rm(uid_file.split("://")[1])
    s3.invalidate_cache()
    with pytest.raises(ReshardError, match=rf"^{uid_file}: the subset's uid file is missing; restore it or re-run subsets$"):
        reshard_stage.run(ReshardConfig(manifest=small_s3_subset, output=small_s3_subset.rsplit("/", 2)[0] + "/rs", shard_size=8))


def test_verify_of_an_empty_s3_uid_file_is_a_finding_not_a_crash(s3, small_s3_subset):
    """A 0-byte uid file in the bucket: verify reports it unreadable, with the other findings (numpy's
    EOFError escaped verify before: a traceback)."""
    from laiontools.contracts.manifest import read_manifest, resolve
    from laiontools.stages.verify import verify_manifest

    uid_file = resolve(small_s3_subset, read_manifest(small_s3_subset)["uids"]["path"])
    s3.pipe_file(uid_file.split("://")[1], b"")
    s3.invalidate_cache()
    res = verify_manifest(small_s3_subset)
    assert not res.ok
    assert any(p.startswith(f"uid file {uid_file}: unreadable") and "empty" in p for p in res.problems), res.problems


@pytest.mark.slow
def test_reshard_killed_writing_into_s3_resumes_to_the_same_shards_and_no_temp_keys(spark, s3, bucket, tmp_path, monkeypatch):
    """`laiontools reshard` (in process, forked task processes) into s3:// killed with its process group
    once the first shard's marker is in the bucket, then the same command again: the shards of an
    uninterrupted run (sha256 in the manifest) and no temp key left. A kill between atomic_open's
    PUT of a temp key and the move's delete leaves that key whole (seen in 2 of 3 kills by hand); the
    re-run writes under new temp names, so it stayed for good: the output's claim now removes it."""
    monkeypatch.delenv("LAIONTOOLS_SPARK_MASTER", raising=False)  # in process, as the CLI the check kills
    check_reshard_killed_resumes(spark, s3, bucket, tmp_path)


def test_a_manifest_path_naming_an_s3_folder_is_refused_as_one(small_s3_pool):
    """s3fs reads a prefix (or a bucket) as an empty object and drops a trailing '/': such a manifest path
    was "not valid JSON ...; it may be truncated: regenerate it", and "<manifest>/" read the manifest and
    looked for every file it names under "<manifest>/" (verify: all of them missing)."""
    from laiontools.contracts.manifest import read_manifest
    from laiontools.contracts.schema import ManifestError

    bucket = small_s3_pool.rsplit("/", 1)[0]
    for path in (f"{small_s3_pool}/pool.manifest.json/", small_s3_pool, f"{small_s3_pool}/", bucket):
        with pytest.raises(ManifestError, match=rf"^manifest {path} names a folder; give the manifest file itself"):
            read_manifest(path)
    assert read_manifest(f"{small_s3_pool}/pool.manifest.json")["kind"] == "pool"


@pytest.mark.slow
def test_reshard_rerun_into_s3_aborts_the_multipart_upload_a_killed_write_left(spark, s3, bucket, tmp_path, monkeypatch):
    """s3fs uploads a file larger than its block size (50 MiB: a reshard shard) in parts as it is written;
    a SIGKILL leaves that multipart upload of the temp key open, its parts stored but in no listing (seen
    killing a reshard of 75 MB shards). The re-run of the same command aborts it (was: kept for good)."""
    from laiontools.contracts import layout
    from laiontools.contracts.manifest import read_manifest
    from laiontools.stages import reshard as reshard_stage
    from laiontools.stages.reshard import ReshardConfig

    b = bucket.split("://")[1]
    sub = bench_subset(spark, s3, bucket, tmp_path)
    monkeypatch.delenv("LAIONTOOLS_SPARK_MASTER", raising=False)
    out = f"{bucket}/out"
    reshard_stage.run(ReshardConfig(manifest=sub, output=out, shard_size=10))
    want = read_manifest(f"{out}/{layout.RESHARD_MANIFEST}")
    # what a run killed while writing shard 1 leaves: its marker not written, the upload of its temp key open
    s3.rm([f"{b}/out/shards/shard-00001.tar.done", f"{b}/out/{layout.RESHARD_MANIFEST}"])
    key = "out/shards/.shard-00001.tar.tmp-deadbeef"
    up = s3.call_s3("create_multipart_upload", Bucket=b, Key=key)["UploadId"]
    s3.call_s3("upload_part", Bucket=b, Key=key, UploadId=up, PartNumber=1, Body=b"x" * (5 << 20))
    assert s3.call_s3("list_multipart_uploads", Bucket=b).get("Uploads")

    reshard_stage.run(ReshardConfig(manifest=sub, output=out, shard_size=10))
    got = read_manifest(f"{out}/{layout.RESHARD_MANIFEST}")
    assert [(s["path"], s["sha256"]) for s in got["shards"]] == [(s["path"], s["sha256"]) for s in want["shards"]]
    assert not s3.call_s3("list_multipart_uploads", Bucket=b).get("Uploads")


@pytest.mark.parametrize("stage", ["subsets", "embed"])
def test_a_stage_into_a_missing_bucket_stops_and_creates_no_bucket(spark, s3, small_s3_pool, stage):
    """Every stage's output claim made the output folder (s3fs's makedirs creates a missing bucket) before
    any check of the bucket: a typo'd bucket was created and written into. Now one StorageError."""
    from laiontools.stages import embed as embed_stage
    from laiontools.stages import subsets as subsets_stage
    from laiontools.stages.embed import EmbedConfig
    from laiontools.stages.subsets import SubsetsConfig

    missing = f"lt-missing-{uuid.uuid4().hex[:8]}"
    manifest, out = f"{small_s3_pool}/pool.manifest.json", f"s3://{missing}/out"
    with pytest.raises(StorageError, match=rf"^{out}: bucket '{missing}' does not exist"):
        if stage == "subsets":
            subsets_stage.run(SubsetsConfig(pool=manifest, output=out, scales="10", seed=1), spark)
        else:
            embed_stage.run(EmbedConfig(manifest=manifest, output=out, model="lt-tiny", device="cpu", num_workers=0))
    s3.invalidate_cache()
    assert missing not in {b.rstrip("/") for b in s3.ls("")}, "a missing bucket must not be created"


@pytest.mark.slow
def test_embed_killed_writing_into_s3_resumes_to_the_same_bytes(s3, bucket, tmp_path):
    """`laiontools embed` (local engine, lt-tiny) into s3:// killed with its process group once the first
    shard's marker is in the bucket, then the same command: every file the same bytes as an uninterrupted
    run's, apart from the run-describing ones. The pool's images do not decode (the reshard benchmark's
    random bytes): a failed decode's error carried PIL's "<_io.BytesIO object at 0x7f...>", an address
    that differs run to run, so the meta files and markers of a resumed run differed."""

    from laiontools.cli import main as cli_main
    from laiontools.contracts import layout

    sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(__file__)), "bench"))
    from bench_reshard import build_pool

    b = bucket.split("://")[1]
    build_pool(str(tmp_path / "pool"), shards=3, per_shard=100, kb=2)
    s3.put(str(tmp_path / "pool") + "/", f"{b}/pool", recursive=True)
    args = ["embed", "--manifest", f"{bucket}/pool/{layout.POOL_MANIFEST}", "--model", "lt-tiny", "--device", "cpu",
            "--num-workers", "0", "--engine", "local", "--batch-size", "16"]
    assert cli_main(args + ["--output", f"{bucket}/clean"]) == 0
    kill_when([sys.executable, "-m", "laiontools", *args, "--output", f"{bucket}/killed"], s3, f"{b}/killed/meta/*.done")
    s3.invalidate_cache()
    assert s3.glob(f"{b}/killed/meta/*.done"), "the killed run never finished a shard"
    assert not s3.exists(f"{b}/killed/embed_report.json"), "the kill landed after the run had finished"
    assert cli_main(args + ["--output", f"{bucket}/killed"]) == 0
    s3.invalidate_cache()

    def files(d: str) -> dict[str, bytes]:  # without the run-describing files (RELIABILITY.md)
        root = f"{b}/{d}/"
        return {k[len(root):]: s3.cat_file(k) for k in s3.find(root)
                if k[len(root):] not in {"embed_report.json", "settings.json", layout.OUTPUT_MARKER}}

    def marker(data: bytes) -> dict:
        return {k: v for k, v in json.loads(data).items() if k != "seconds"}

    got, want = files("killed"), files("clean")
    assert sorted(got) == sorted(want)
    for k in want:
        if k.endswith(".done"):
            assert marker(got[k]) == marker(want[k]), k
        else:
            assert got[k] == want[k], k


def test_an_s3_output_with_an_empty_path_segment_is_refused_naming_it(s3, small_s3_pool):
    """"s3://b//out": a store keeps the empty segment in its keys. The claim wrote its lock under it, and
    s3fs then said the new output "exists and is a file". Now one StorageError saying what is wrong."""
    from laiontools.stages import embed as embed_stage
    from laiontools.stages.embed import EmbedConfig

    out = small_s3_pool.rsplit("/", 1)[0] + "//emb"
    with pytest.raises(StorageError, match=rf"^{out}: an empty path segment \('//'\).*remove the extra '/'$"):
        embed_stage.run(EmbedConfig(manifest=f"{small_s3_pool}/pool.manifest.json", output=out, model="lt-tiny",
                                    device="cpu", num_workers=0))


@pytest.mark.parametrize("part", ["part-00000", "part-00001"])
def test_a_0_byte_catalog_file_on_s3_is_one_line_naming_it(spark, s3, small_s3_pool, part, capsys):
    """A catalog parquet file of 0 bytes, read by pyarrow + fsspec (no Hadoop S3 connector): the first
    file (its schema, read in the driver) or another (read in a task) is named as damaged, in one line,
    exit 2, as Spark's own reader's failure is (was pyarrow's ArrowInvalid and its traceback)."""
    from laiontools.cli import main as cli_main

    s3.pipe_file(f"{small_s3_pool}/catalog/{part}.parquet".split("://")[1], b"")
    s3.invalidate_cache()
    rc = cli_main(["subsets", "--pool", f"{small_s3_pool}/pool.manifest.json", "--output", f"{small_s3_pool}-sub",
                   "--scales", "10", "--seed", "1"])
    err = capsys.readouterr().err
    assert rc == 2, err[-3000:]
    line = f"laiontools subsets: error: {small_s3_pool}/catalog/{part}.parquet is damaged or truncated ("
    assert line in err and "Traceback" not in err, err[-3000:]


def test_train_names_a_0_byte_s3_shard_as_not_a_tar(s3, bucket, tmp_path):
    """A resharded shard emptied in the bucket: train's check of every shard's first header block names
    it, as on a local disk (s3 refuses a range of an empty object: s3fs's OSError "range not
    satisfiable" and its traceback, before)."""
    from laiontools.contracts.schema import ManifestError
    from laiontools.stages.train import check_trainable_manifest
    from laiontools.testing.train_pool import write_resharded_subset

    write_resharded_subset(str(tmp_path / "rs"), n_shards=2, per_shard=4)
    s3.put(str(tmp_path / "rs") + "/", f"{bucket}/rs".split("://")[1], recursive=True)
    manifest = f"{bucket}/rs/subset.manifest.json"
    shard = f"{bucket}/rs/{read_json(manifest)['shards'][0]['path']}"
    s3.pipe_file(shard.split("://")[1], b"")
    s3.invalidate_cache()
    with pytest.raises(ManifestError, match=rf"shard file\(s\) \['{shard}'\] do not start with a tar header"):
        check_trainable_manifest(manifest)


def test_a_file_outputs_killed_temp_keys_go_and_its_neighbours_stay_on_s3(s3, bucket):
    """evaluate's output is one file: on an object store, the temp keys a killed run left of that file,
    of its completion marker and of its ownership marker (a move killed between its copy and its delete
    leaves them whole) are removed when the next run claims the output; other keys stay."""
    from laiontools.core.stage import claimed_output
    from laiontools.core.storage import write_json

    b = bucket.split("://")[1]
    mine = [".eval.json.tmp-0123abcd", ".eval.json.done.tmp-89abcdef", "..eval.json.laiontools-output.json.tmp-deadbeef"]
    others = [".eval.json2.tmp-0123abcd", ".other.json.tmp-0123abcd", ".eval.json.tmp-notahex1", "eval.json.tmp-0123abcd"]
    for name in mine + others:
        s3.pipe_file(f"{b}/runs/{name}", b"half")
    s3.invalidate_cache()
    with claimed_output(f"{bucket}/runs/eval.json", "evaluate", kind="file"):
        s3.invalidate_cache()
        assert sorted(k.rpartition("/")[2] for k in s3.ls(f"{b}/runs")) == \
            sorted(others + [".eval.json.laiontools-output.json", ".eval.json.laiontools.lock"])
        write_json(f"{bucket}/runs/eval.json", {"ok": 1})
    s3.invalidate_cache()
    assert sorted(k.rpartition("/")[2] for k in s3.ls(f"{b}/runs")) == \
        sorted(others + [".eval.json.laiontools-output.json", "eval.json"])


def test_an_s3_output_with_three_slashes_is_refused_naming_it(s3, small_s3_pool):
    """"s3:///b/emb": s3fs reads it as bucket b, so the run worked, but every manifest and report then
    recorded "s3:///b/..." as typed. Now one StorageError before anything is written."""
    from laiontools.stages import embed as embed_stage
    from laiontools.stages.embed import EmbedConfig

    out = "s3:///" + small_s3_pool.split("://", 1)[1].rsplit("/", 1)[0] + "/emb3"
    with pytest.raises(StorageError, match=rf"^{out}: no bucket after 's3://' \(three slashes\); write s3://<bucket>/\.\.\.$"):
        embed_stage.run(EmbedConfig(manifest=f"{small_s3_pool}/pool.manifest.json", output=out, model="lt-tiny",
                                    device="cpu", num_workers=0))
    assert not s3.exists(out.split(":///", 1)[1]), "the refused output was written"


def test_the_clis_last_resort_names_the_url_the_store_error_names():
    # An object store's refusal that no stage turned into an error naming its path is named by the CLI's
    # last resort: the URL on the command line whose key or bucket the error chain names (s3fs names the
    # key in FileNotFoundError / PermissionError; botocore the bucket), else the first URL given.
    from laiontools.core.storage import failing_url

    def _failed_url(e, argv):  # what the CLI passes: the URLs on its command line
        return failing_url(e, [a.split("=", 1)[-1] for a in argv if "://" in a])

    argv = ["subsets", "--pool", "s3://in-bkt/p/pool.manifest.json", "--output=s3://out-bkt/o"]
    try:
        try:
            raise FileNotFoundError("The specified bucket does not exist: out-bkt")
        except FileNotFoundError as inner:
            raise RuntimeError("task failed") from inner
    except RuntimeError as e:
        assert _failed_url(e, argv) == "s3://out-bkt/o"
    assert _failed_url(PermissionError("in-bkt/p/pool.manifest.json"), argv) == "s3://in-bkt/p/pool.manifest.json"
    # another bucket whose name starts with this one's is not this one: the first URL given
    assert _failed_url(PermissionError("in-bkt-2/x"), ["verify", "s3://out-bkt/m.json", "s3://in-bkt/n.json"]) == "s3://out-bkt/m.json"
    assert _failed_url(ValueError("no path here"), argv) == "s3://in-bkt/p/pool.manifest.json"
    assert _failed_url(ValueError("x"), ["verify", "local.json"]) == "an object-store path"


def test_a_gcs_endpoint_that_never_answers_is_one_line_not_a_hang(tmp_path, monkeypatch):
    """gs:// goes through gcsfs, which sends each request through aiohttp with no timeout of its own
    (aiohttp's session default: 300 s) and tries it 6 times: `verify gs://...` against an endpoint that
    accepts connections and never answers was still silent after 20 minutes (measured by hand). Every
    gcsfs client is now bounded per socket read (gcs.GCS_REQUESTS_TIMEOUT, unless the user sets a
    requests_timeout); here the user's own (1 s a request, which gcsfs does not try again) keeps it short.
    In a child process, with gcsfs's extended file system as gcsfs picks it at import: its bucket-layout
    lookup (gRPC, 60 s of retries before each operation) is not made at an emulator (laiontools.core.gcs)."""
    import aiohttp
    import fsspec

    from laiontools.core.gcs import GCS_REQUESTS_TIMEOUT
    from laiontools.core.storage import url_to_fs

    # where the user set nothing (no credentials looked up: anonymous, as below)
    monkeypatch.setitem(fsspec.config.conf.setdefault("gs", {}), "token", "anon")
    assert url_to_fs("gs://lt-any/x")[0].requests_timeout == aiohttp.ClientTimeout(**GCS_REQUESTS_TIMEOUT)
    with silent_endpoint() as (silent, held):
        env = {**os.environ, "STORAGE_EMULATOR_HOST": silent,
               "FSSPEC_GS": json.dumps({"requests_timeout": 1, "token": "anon"}), "NO_ALBUMENTATIONS_UPDATE": "1"}
        m = "gs://lt-any/pool/pool.manifest.json"
        r = subprocess.run([sys.executable, "-m", "laiontools", "verify", m], env=env, capture_output=True, text=True, check=False,
                           timeout=300, cwd=str(tmp_path))
        assert r.returncode == 2, (r.returncode, r.stdout[-2000:], r.stderr[-2000:])
        line = _one_error_line(r.stderr, "verify")
        assert line.startswith(f"laiontools verify: error: {m}: the object store at {silent} accepted the connection "
                               "but did not answer in time"), line
        assert "STORAGE_EMULATOR_HOST" in line and "AWS" not in line, line
        assert "Traceback" not in r.stderr, r.stderr[-3000:]  # gcsfs's own give-up log keeps to its line
        assert held, "the client never connected"


def test_an_object_store_clients_give_up_log_keeps_to_its_line(capsys):
    """gcsfs logs its last failed try with logger.exception: 20 lines of aiohttp frames on stderr before the
    stage's own one line for an endpoint that never answers (seen by hand against a silent gs:// endpoint).
    A client's error keeps its message line; laiontools' own loggers keep their tracebacks."""
    import logging

    from laiontools.core.logs import setup_logging

    setup_logging("INFO")
    for name in ("gcsfs", "s3fs", "laiontools.stages.verify"):
        try:
            raise TimeoutError("Timeout on reading data from socket")
        except TimeoutError:
            logging.getLogger(name).exception("_request out of retries on exception: Timeout on reading data from socket")
        err = capsys.readouterr().err
        assert f"ERROR {name}: _request out of retries on exception" in err, err
        assert ("Traceback" in err) == name.startswith("laiontools"), (name, err)


@contextlib.contextmanager
def busy_endpoint(status: str = "503 Slow Down", code: str = "SlowDown", message: str = "Please reduce your request rate.") -> Any:
    """URL of an S3 API server on 127.0.0.1 that answers every request as a throttling (or failing) S3
    does: `status` with S3's XML error body (none for a HEAD, as S3 sends none)."""
    from laiontools.testing.net import answering

    body = (f'<?xml version="1.0" encoding="UTF-8"?>\n<Error><Code>{code}</Code><Message>{message}</Message>'
            "<RequestId>lt</RequestId></Error>").encode()
    with answering(lambda path, headers: (int(status.split()[0]), {"Content-Type": "application/xml"}, body)) as url:
        yield url


@pytest.mark.parametrize("status, code, message", [("503 Slow Down", "SlowDown", "Please reduce your request rate."),
                                                   ("500 Internal Server Error", "InternalError", "We encountered an internal error.")])
def test_a_throttling_or_failing_store_is_one_line_naming_the_path(monkeypatch, capsys, tmp_path, status, code, message):
    """S3 answers a burst of requests with 503 SlowDown (and, now and then, 500 InternalError): after
    botocore's and s3fs's retries, s3fs raises OSError(EBUSY / EREMOTEIO), which no check recognised: a
    50-line traceback, exit 1, for reading a manifest (verify) or checking an output's bucket (subsets).
    Now one line naming the path, saying the store is busy and that a re-run resumes."""
    import fsspec

    from laiontools.cli import main as cli_main

    with busy_endpoint(status, code, message) as busy:
        monkeypatch.setenv("FSSPEC_S3_ENDPOINT_URL", busy)
        monkeypatch.setitem(fsspec.config.conf, "s3", {"endpoint_url": busy, "config_kwargs": {
            "connect_timeout": 2, "read_timeout": 2, "retries": {"total_max_attempts": 1}}})
        m = "s3://lt-any/pool/pool.manifest.json"
        for stage, argv, path in (("verify", [m], m),  # a HEAD (no body: botocore names the status)
                                  ("subsets", ["--pool", str(tmp_path / "p.json"), "--output", "s3://lt-any/sub",
                                               "--scales", "4", "--seed", "0"], "s3://lt-any/sub")):  # a listing (the code)
            assert cli_main([stage, *argv]) == 2
            line = _one_error_line(capsys.readouterr().err, stage)
            assert line.startswith(f"laiontools {stage}: error: {path}: the object store at {busy} is throttling requests "
                                   "or unavailable ("), line
            assert "re-run the same command later" in line, line


@pytest.mark.parametrize("folder", ["run[1]", "pool-a*b", "why?"])
def test_an_atomic_write_into_an_s3_folder_with_glob_characters_lands_under_its_name(s3, bucket, folder):
    """atomic_open moved its temp key into place with fsspec's mv, which reads '[', '*' and '?' in a path as a
    glob: under `run[1]` every write failed naming its temp key (and left it), and under `pool-a*b` the write
    said nothing while the object landed at `<name>/.<name>.tmp-…`, the final name missing. A local folder of
    the same name takes the same write."""
    from laiontools.core.storage import write_json

    path = f"{bucket}/{folder}/x.json"
    write_json(path, {"a": 1})
    key = path.split("://", 1)[1]
    s3.invalidate_cache()
    assert s3.find(key.rpartition("/")[0]) == [key], "the object is not under its name, or a temp key stayed"
    assert read_json(path) == {"a": 1}


def test_removals_and_moves_under_an_s3_folder_with_glob_characters_touch_only_that_folder(s3, bucket):
    """fsspec expands the paths an object store's rm, copy and mv are given as glob patterns: a folder
    `run[1]` named `run1` to them. Replacing a dataset folder under `run[1]` (write_parquet_dir), moving it
    (move_tree) or removing a killed run's temp keys (remove_stale_temps) acted on `run1`, another run's
    folder: its files deleted. Each acts on its own folder only now."""
    import pyarrow as pa

    from laiontools.core.storage import move_tree, remove_stale_temps, write_parquet_dir

    root = bucket.split("://", 1)[1]
    other = {f"{root}/run1/cat/part-00000.parquet": b"theirs", f"{root}/run1/.x.json.tmp-deadbeef": b"theirs"}
    for k, v in other.items():
        s3.pipe(k, v)
    t = pa.table({"a": [1, 2, 3]})
    write_parquet_dir(t, f"{bucket}/run[1]/cat")
    write_parquet_dir(t, f"{bucket}/run[1]/cat")  # replaces its own folder (a recursive rm of it first)
    s3.pipe(f"{root}/run[1]/.x.json.tmp-deadbeef", b"ours")
    assert remove_stale_temps(f"{bucket}/run[1]") == 1
    move_tree(f"{bucket}/run[1]/cat", f"{bucket}/run[1]/moved")
    s3.invalidate_cache()
    assert {k: s3.cat(k) for k in other if s3.exists(k)} == other, "another folder's files were removed"
    assert sorted(s3.find(f"{root}/run[1]")) == [f"{root}/run[1]/moved/_SUCCESS", f"{root}/run[1]/moved/part-00000.parquet"]


_LOCK_HOLDER = """
import sys
from laiontools.core.stage import output_lock
with output_lock(sys.argv[1], "reshard"):
    print("locked", flush=True)
    sys.stdin.read()  # hold until the test closes stdin (or kills us)
"""


@pytest.mark.parametrize("before", ["no lock", "a killed run's lock"])
def test_two_runs_starting_together_into_an_s3_output_do_not_both_hold_it(s3, bucket, monkeypatch, before):
    """The lock object on a store was read, then written, then read back for its token: a run that found the
    output free (or its lock stale) and wrote its lock after another run had taken it overwrote that run's
    lock, read back its own token and went on, as did the other: two runs writing one output. The window is
    widened here by starting the other run (a real process) between this run's look and its write."""
    import datetime
    import socket

    from laiontools.core import stage
    from laiontools.core.stage import OutputLocked, output_paths

    out = f"{bucket}/race"
    _, lock = output_paths(out)
    if before != "no lock":
        p = subprocess.Popen([sys.executable, "-c", "pass"])
        p.wait(timeout=60)
        s3.pipe(lock.split("://", 1)[1], json.dumps({
            "host": socket.gethostname(), "pid": p.pid, "stage": "reshard", "token": "dead",
            "started": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds")}).encode())
    other: list[subprocess.Popen] = []
    real = stage._lock_info

    def the_other_run_takes_it_meanwhile(name: str) -> dict:
        if not other:  # this run has looked at the lock and is about to write its own
            other.append(subprocess.Popen([sys.executable, "-c", _LOCK_HOLDER, out], stdin=subprocess.PIPE,
                                          stdout=subprocess.PIPE, text=True))
            assert other[0].stdout.readline().strip() == "locked"
        return real(name)

    monkeypatch.setattr(stage, "_lock_info", the_other_run_takes_it_meanwhile)
    try:
        with pytest.raises(OutputLocked, match=r"pid \d+"), stage.output_lock(out, "reshard"):
            pass
        assert json.loads(s3.cat(lock.split("://", 1)[1]))["pid"] == other[0].pid, "the other run's lock was overwritten"
    finally:
        for p in other:
            p.kill()
            p.wait(timeout=60)


def test_a_url_whose_scheme_is_upper_case_or_unknown_is_read_or_one_line(s3, bucket, capsys):
    """"S3://b/k" (a scheme typed in upper case, which URLs allow and path_key already reads as s3) and a
    mistyped scheme ("s4://") each ended in fsspec's ValueError("Protocol not known: ...") as a traceback,
    exit 1, from every stage. The first is the same object; the second one line naming the path."""
    from laiontools.cli import main as cli_main

    key = f"{bucket}/up/x.json".split("://", 1)[1]
    s3.pipe(key, b'{"a": 1}')
    assert read_json(f"S3://{key}") == {"a": 1}
    m = f"s4://{key}"
    assert cli_main(["verify", m]) == 2
    line = _one_error_line(capsys.readouterr().err, "verify")
    assert line.startswith(f"laiontools verify: error: {m}: unknown storage scheme 's4://'"), line


# What S3-compatible stores without conditional writes answer a PUT carrying If-None-Match (or If-Match):
# S3 itself before August 2024 and others 501 NotImplemented; some 400 with one of these codes.
_NO_CONDITION_ANSWERS = {
    "501 NotImplemented": (501, "NotImplemented", "A header you provided implies functionality that is not implemented"),
    "400 InvalidArgument": (400, "InvalidArgument", "Unsupported header 'If-None-Match' received for this API call."),
    "400 InvalidRequest": (400, "InvalidRequest", "Conditional writes are not supported."),
    "400 NotImplemented": (400, "NotImplemented", "If-None-Match is not implemented."),
}


@contextlib.contextmanager
def conditional_puts_answered(s3_server: Any, monkeypatch: Any, answer: tuple[int, str, str]) -> Any:
    """The stages' object store is now an S3Proxy in front of the test server that answers every PUT carrying
    If-None-Match or If-Match with `answer` and forwards everything else, named the way the tests name the
    server (endpoint variables and fsspec's configuration). Yields the proxy (its log of requests)."""
    import fsspec

    from laiontools.core import stage
    from laiontools.testing.s3server import S3Proxy

    def refuse_conditions(method: str, path: str, headers: Any) -> tuple[int, str, str] | None:
        return answer if method == "PUT" and ("If-None-Match" in headers or "If-Match" in headers) else None

    with S3Proxy(s3_server.endpoint, refuse_conditions) as proxy:
        for var in ("FSSPEC_S3_ENDPOINT_URL", "AWS_ENDPOINT_URL"):  # (also for a run this test starts)
            monkeypatch.setenv(var, proxy.endpoint)
        monkeypatch.setitem(fsspec.config.conf, "s3", {**fsspec.config.conf.get("s3", {}), "endpoint_url": proxy.endpoint,
                                                       "config_kwargs": {"connect_timeout": 2, "read_timeout": 5,
                                                                         "retries": {"total_max_attempts": 1}}})
        monkeypatch.setattr(stage, "_NO_CONDITION_SAID", set(), raising=False)  # this store's refusal not said yet
        yield proxy


def _plan(output: str, monkeypatch: Any) -> Any:
    """A cheap real stage into `output`: `study plan` (no data read; the plan written to <output>/plan.json),
    its FLOP counter (torch and open_clip imported: seconds, and not what these tests are about) stated."""
    from laiontools.stages import study
    from laiontools.stages.study import PlanConfig, run_plan

    monkeypatch.setattr(study, "model_gmacs", lambda name: {"gmacs_per_sample": 4.1})
    return run_plan(PlanConfig(output=output, scales={"1M": "1000000"}, samples_seen=["1e6"], models=["RN50"],
                               images_per_second={"RN50": 100.0}))


def _lock_puts(proxy: Any, lock: str) -> list[tuple[str, int]]:
    """(conditional header or "", status) of the writes of `lock` through the proxy."""
    key = "/" + lock.split("://", 1)[1]
    return [(c.split(":")[0], st) for m, path, c, st in proxy.requests if m == "PUT" and path.split("?")[0] == key]


@pytest.mark.parametrize("style", list(_NO_CONDITION_ANSWERS))
def test_a_store_that_refuses_conditional_writes_still_locks_a_stage_output(s3, s3_server, bucket, monkeypatch, caplog, style):
    """The lock object is created with If-None-Match; a store without conditional writes refuses the header
    (501, or 400 and a code). The stage then writes its lock without the condition, runs, and removes the
    lock; the store's refusal is said once, not at every lock."""
    from laiontools.core.stage import output_paths

    out = f"{bucket}/plan"
    _, lock = output_paths(out)
    status = _NO_CONDITION_ANSWERS[style][0]
    with conditional_puts_answered(s3_server, monkeypatch, _NO_CONDITION_ANSWERS[style]) as proxy, \
            caplog.at_level("WARNING", logger="laiontools.core.stage"):
        for run in (1, 2):  # a second run into its own output: the same fallback, said once
            assert _plan(out, monkeypatch).counts == {"runs": 1}
            # the conditional write refused, the plain one taken; the lock removed at the end
            assert _lock_puts(proxy, lock) == [("If-None-Match", status), ("", 200)] * run
            s3.invalidate_cache()
            assert not s3.exists(lock.split("://", 1)[1]), "the lock stayed"
            assert s3.exists(f"{out}/plan.json".split("://", 1)[1])
    said = [r.getMessage() for r in caplog.records if "refused a conditional write" in r.getMessage()]
    assert len(said) == 1 and said[0].startswith(f"{bucket}: the store refused a conditional write ({status} "), said


def test_through_a_lock_written_without_a_condition_a_held_output_is_refused(s3, s3_server, bucket, monkeypatch):
    """Without the condition the lock is still read before it is written: a run into an output whose lock
    another live run took (through the same refusing store) is refused naming that run, and goes on once
    that run has finished."""
    from laiontools.core.stage import OutputLocked, output_paths

    out = f"{bucket}/held"
    _, lock = output_paths(out)
    with conditional_puts_answered(s3_server, monkeypatch, _NO_CONDITION_ANSWERS["501 NotImplemented"]) as proxy:
        holder = subprocess.Popen([sys.executable, "-c", _LOCK_HOLDER, out], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                  text=True)
        try:
            assert holder.stdout.readline().strip() == "locked"
            assert _lock_puts(proxy, lock) == [("If-None-Match", 501), ("", 200)], "not taken through the fallback"
            with pytest.raises(OutputLocked, match=rf"output {out} is in use by another run: .* pid {holder.pid}, "):
                _plan(out, monkeypatch)
            assert json.loads(s3.cat(lock.split("://", 1)[1]))["pid"] == holder.pid, "the holder's lock was overwritten"
            holder.stdin.close()
            assert holder.wait(timeout=60) == 0
        finally:
            holder.kill()
            holder.wait(timeout=60)
        assert _plan(out, monkeypatch).counts == {"runs": 1}
    s3.invalidate_cache()
    assert not s3.exists(lock.split("://", 1)[1])


def test_through_a_lock_written_without_a_condition_a_killed_runs_lock_is_taken_over(s3, s3_server, bucket, monkeypatch, caplog):
    """A killed run's lock (its pid gone on this host) is replaced If-Match its ETag; a store without
    conditional writes refuses that too, and the lock is then taken over by a plain write."""
    import datetime
    import socket

    from laiontools.core.stage import output_paths

    out = f"{bucket}/stale"
    _, lock = output_paths(out)
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait(timeout=60)
    s3.pipe(lock.split("://", 1)[1], json.dumps({
        "host": socket.gethostname(), "pid": dead.pid, "stage": "study plan", "token": "dead",
        "started": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds")}).encode())
    with conditional_puts_answered(s3_server, monkeypatch, _NO_CONDITION_ANSWERS["400 InvalidArgument"]) as proxy, \
            caplog.at_level("WARNING", logger="laiontools.core.stage"):
        assert _plan(out, monkeypatch).counts == {"runs": 1}
        assert _lock_puts(proxy, lock) == [("If-Match", 400), ("", 200)]
    assert any(f"taking over the lock of a run that is gone ({socket.gethostname()} pid {dead.pid}" in r.getMessage()
               for r in caplog.records)
    s3.invalidate_cache()
    assert not s3.exists(lock.split("://", 1)[1])


@pytest.mark.parametrize("answer, said", [
    ((403, "AccessDenied", "Access Denied"), "access denied by the object store"),
    ((503, "SlowDown", "Please reduce your request rate."), "is throttling requests or unavailable"),
], ids=["403 AccessDenied", "503 SlowDown"])
def test_a_conditional_lock_write_refused_for_another_reason_is_one_error_naming_the_lock(s3, s3_server, bucket, monkeypatch,
                                                                                        answer, said):
    """Only a refusal of the condition itself (501, or 400 and a code) lets the lock be written without it.
    Access denied (a policy on conditional writes, or on the key) or a busy store were taken for one, and
    the lock written by a plain PUT that went through: the stage ran. Now one StorageError naming the
    lock; nothing was written, and the stage did not run."""
    from laiontools.core.stage import output_paths

    out = f"{bucket}/denied"
    _, lock = output_paths(out)
    with conditional_puts_answered(s3_server, monkeypatch, answer) as proxy:
        with pytest.raises(StorageError, match=rf"^{lock}: .*{said}"):
            _plan(out, monkeypatch)
        puts = _lock_puts(proxy, lock)  # (the client's retries of a busy store's answer included)
        assert puts and puts == [("If-None-Match", answer[0])] * len(puts), f"the lock was written without its condition: {puts}"
    s3.invalidate_cache()
    assert not s3.exists(lock.split("://", 1)[1]) and not s3.exists(f"{out}/plan.json".split("://", 1)[1])


def test_download_cleanup_of_a_shard_folder_on_s3_lists_it_once(bucket, tmp_path, caplog):
    """download's clean-up of incomplete shards on s3://: the same keys removed and the same warnings as
    the per-shard checks it replaced (run on a local copy), in O(1) requests: the folder's existence,
    one listing (a page per 1000 keys), a GET of each stats file of a shard without a marker, and one
    bulk delete for the broken shards' stats and one for their other files; nothing asked per shard
    (before: a HEAD of each shard's tar and parquet, a GET of every stats file, a HEAD per key)."""
    import logging

    from test_download import _old_clean_incomplete_shards, _shard_folder

    from laiontools.stages import download as download_stage

    marked = 40
    ref, up = tmp_path / "ref", tmp_path / "up"
    _shard_folder(ref, marked)
    _shard_folder(up, marked)
    fs, root = url_to_fs(bucket)
    for f in sorted(up.rglob("*")):
        if f.is_file():
            fs.put_file(str(f), f"{root}/pool/shards/{f.relative_to(up)}")
    (ref / f"{marked + 4:05d}.tar").rmdir()  # an object store has no empty folder: no such tar there
    caplog.set_level(logging.INFO, logger=download_stage.log.name)
    _old_clean_incomplete_shards(str(ref))
    want = sorted(r.getMessage().replace(str(ref), "D") for r in caplog.records if r.name == download_stage.log.name)
    caplog.clear()
    fs.connect()
    requests: list[str] = []

    def count(model: Any, **_: Any) -> None:
        requests.append(model.name)

    fs.s3.meta.events.register("before-call.s3", count)
    try:
        download_stage._clean_incomplete_shards(f"{bucket}/pool/shards")
    finally:
        fs.s3.meta.events.unregister("before-call.s3", count)
    got = sorted(r.getMessage().replace(f"{bucket}/pool/shards", "D").replace(f"{root}/pool/shards", "D")
                 for r in caplog.records if r.name == download_stage.log.name)
    assert got == want
    left = sorted(k[len(f"{root}/pool/shards/"):] for k in fs.find(f"{root}/pool/shards"))
    assert left == sorted(str(f.relative_to(ref)) for f in ref.rglob("*") if f.is_file())
    assert f"{marked + 1:05d}.tar" not in left and f"{marked + 5:05d}.tar" not in left and f"{marked:05d}.tar" in left
    # unmarked stats read: the finished-but-not-finalized shard, the cut one, the one without a tar
    assert requests.count("GetObject") == 3, requests
    assert requests.count("ListObjectsV2") <= 2 and requests.count("DeleteObjects") <= 2, requests
    assert len(requests) <= 2 + 1 + 3 + 2, requests  # exists (HEAD, LIST), the listing, the GETs, the deletes


@pytest.mark.parametrize("how", ["AWS_ENDPOINT_URL_S3", "AWS config file"])
def test_an_endpoint_without_scheme_set_elsewhere_is_named(s3_server, bucket, s3, tmp_path, how):
    """(second reader) botocore also reads the endpoint from AWS_ENDPOINT_URL_S3 and from the AWS config
    file's endpoint_url: the one-line error must not call the default endpoint 'not a URL'."""
    m = f"{bucket}/wrong/pool.manifest.json"
    s3.pipe_file(m.split("://", 1)[1], b"{}")
    host = s3_server.endpoint.split("://", 1)[1]
    env = {k: v for k, v in os.environ.items() if not k.startswith(("AWS_", "FSSPEC_S3"))}
    env.update(AWS_ACCESS_KEY_ID="laiontools-test", AWS_SECRET_ACCESS_KEY="laiontools-test", AWS_DEFAULT_REGION="us-east-1",
               AWS_EC2_METADATA_DISABLED="true", AWS_MAX_ATTEMPTS="1")
    if how == "AWS_ENDPOINT_URL_S3":
        env["AWS_ENDPOINT_URL_S3"] = host
    else:
        (tmp_path / "config").write_text(f"[default]\nendpoint_url = {host}\n")
        env["AWS_CONFIG_FILE"] = str(tmp_path / "config")
    r = subprocess.run([sys.executable, "-m", "laiontools", "verify", m], env=env, capture_output=True, text=True, timeout=300, check=False)
    line = _one_error_line(r.stderr, "verify")
    print(r.returncode, line)
    assert r.returncode == 2 and f"the object store endpoint '{host}' is not a URL" in line, line


def test_a_tls_error_of_an_https_url_does_not_name_the_s3_settings():
    """(second reader) An https:// input or list whose server's certificate fails is not an object store's endpoint."""
    import ssl

    from laiontools.core.storage import store_error

    e = ssl.SSLCertVerificationError(1, "[SSL: CERTIFICATE_VERIFY_FAILED] certificate verify failed: certificate has expired")
    said = str(store_error(e, "https://data.example.org/meta/part-0.parquet"))
    assert said.startswith("https://data.example.org/meta/part-0.parquet: cannot make a TLS connection to its server"), said
    assert "AWS_ENDPOINT_URL" not in said and "object store" not in said, said


def test_reshard_from_a_store_that_says_slow_down_to_heads_too_fails_in_one_line(s3, s3_server, small_s3_pool, small_s3_subset,
                                                                                  monkeypatch):
    """S3 refuses every request past its rate on a key prefix, HEADs as well as GETs, and a refused HEAD has no
    body: botocore reads its code as "503" and s3fs raises OSError(EBUSY, "Service Unavailable"), without the
    words of a GET's SlowDown. Once a task has no time left to wait, read() opens the source shard (a HEAD) and
    that refusal surfaced raw (no one-line error naming the source shard, no hint of throttling)."""
    from laiontools.stages import reshard as reshard_stage
    from laiontools.stages.reshard import ReshardConfig, ReshardError
    from laiontools.testing.s3server import S3Proxy

    monkeypatch.delenv("LAIONTOOLS_SPARK_MASTER", raising=False)
    out = small_s3_subset.rsplit("/", 2)[0]

    def slow_down(method: str, path: str, headers) -> tuple[int, str, str] | None:
        if "/pool/shards/" in path and path.endswith(".tar") and (method == "HEAD" or (method == "GET" and "Range" in headers)):
            return 503, "SlowDown", "Please reduce your request rate."
        return None

    with S3Proxy(s3_server.endpoint, slow_down) as proxy:
        _through_proxy(monkeypatch, proxy)
        monkeypatch.setattr(reshard_stage, "THROTTLE_WAIT_S", 0.0)
        with pytest.raises(ReshardError, match=rf"^source shard {small_s3_pool}/shards/\S+: the object store refused its reads as "
                                               r"too many requests \(.*\) after this task had waited 0 s"):
            reshard_stage.run(ReshardConfig(manifest=small_s3_subset, output=f"{out}/rs-none", shard_size=8))
        assert any(m == "HEAD" and st == 503 for m, _, _, st in proxy.requests), proxy.requests[-10:]
