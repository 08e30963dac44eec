"""Cluster behaviour: spark-submit's settings win over the job's, derived shuffle sizes, and (slow) a
real standalone master + 2 workers on 127.0.0.1 running the Spark stages through spark-submit.

Everything here runs the real ``bin/spark-submit`` that pyspark ships (SPARK_HOME = pyspark's install
folder) in a subprocess, exactly as a cluster user types it.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pandas as pd
import pyarrow.parquet as pq
import pytest

from laiontools.contracts import layout
from laiontools.core.spark import BYTES_PER_SHUFFLE_PARTITION, ROWS_PER_SHUFFLE_PARTITION, shuffle_partitions
from laiontools.testing.cluster import REPO, SPARK_HOME, StandaloneCluster, spark_submit, submit_env
from laiontools.testing.s3server import S3_ENV

# The test submits ~14 applications, each starting a driver and two executors: for them only, the JVM
# options the suite gives its own drivers (conftest.py: the quick compiler tier and the class-data
# archive) and no web UI, which make a small job's spark-submit here ~12 s instead of ~20 s. A user's
# runs keep the JVM's defaults; these are settings any user may pass the same way.
QUICK_JVMS = ["--driver-java-options", os.environ["LAIONTOOLS_TEST_JAVA_OPTIONS"],
              "--conf", f"spark.executor.extraJavaOptions={os.environ['LAIONTOOLS_TEST_JAVA_OPTIONS']}",
              "--conf", "spark.ui.enabled=false"]

# The refusals (executors that run other code, or lack the store's settings) stop at an executor's first
# task: one executor shows them (spark-submit's last --total-executor-cores wins), one JVM fewer each.
ONE_EXECUTOR = ["--total-executor-cores", "1"]


def _changed_copy(folder: Path, missing_dependency: bool = False) -> Path:
    """A copy of the laiontools package under `folder` with one line added to one file, or (`missing_dependency`)
    whose import fails as in an environment that lacks one of its dependencies."""
    shutil.copytree(REPO / "laiontools", folder / "laiontools", ignore=shutil.ignore_patterns("__pycache__"))
    if missing_dependency:
        init = folder / "laiontools" / "__init__.py"
        init.write_text("import laiontools_dependency_not_installed  # noqa: F401\n" + init.read_text())
    else:
        with open(folder / "laiontools" / "core" / "stage.py", "a") as f:
            f.write("\n# another version of this file\n")
    return folder


def test_the_executor_probe_names_a_dependency_the_executor_lacks(monkeypatch):
    """The executors' check imported only laiontools/__init__ (the version string): an executor Python without
    numpy passed it, then every task failed on a raw ModuleNotFoundError, exit 1 (a new user's cluster run).
    The probe now imports what every stage's tasks import; here numpy cannot be imported (None in sys.modules,
    as Python's import system reads it), and the probe reports that instead of a fingerprint."""
    import sys

    from laiontools.core.spark import _fingerprint_probe

    monkeypatch.setitem(sys.modules, "numpy", None)
    _, version, sha, err = next(_fingerprint_probe()(None))
    assert (version, sha) == ("", "") and "numpy" in err, err
    monkeypatch.undo()
    _, version, sha, root = next(_fingerprint_probe()(None))
    assert version and len(sha) == 64 and root.endswith("laiontools")


def test_code_fingerprint_is_the_same_for_the_same_code_and_differs_for_changed_code(tmp_path):
    """What check_executors compares: equal for a copy of the package imported from elsewhere, different
    once one file of it changes (each computed in a fresh interpreter that imports that copy)."""
    from laiontools.core.spark import code_fingerprint

    def of(folder: Path) -> dict:
        code = "import json; from laiontools.core.spark import code_fingerprint as f; print(json.dumps(f()))"
        res = subprocess.run([sys.executable, "-c", code], env={**os.environ, "PYTHONPATH": str(folder)}, cwd=tmp_path,
                             capture_output=True, text=True, check=True)
        return json.loads(res.stdout)

    mine = code_fingerprint()
    same = tmp_path / "same"
    shutil.copytree(REPO / "laiontools", same / "laiontools", ignore=shutil.ignore_patterns("__pycache__"))
    a, b = of(same), of(_changed_copy(tmp_path / "changed"))
    assert a["path"] == str(same / "laiontools") and b["path"] == str(tmp_path / "changed" / "laiontools")
    assert a["sha256"] == mine["sha256"] and a["version"] == mine["version"]
    assert b["sha256"] != mine["sha256"]
    c_changed = tmp_path / "c_changed"  # the compiled module's source counts too (a wheel installs it)
    shutil.copytree(REPO / "laiontools", c_changed / "laiontools", ignore=shutil.ignore_patterns("__pycache__"))
    with open(c_changed / "laiontools" / "wds" / "tarfast.c", "a") as f:
        f.write("\n/* another version of this file */\n")
    assert of(c_changed)["sha256"] != mine["sha256"]


def test_a_python_worker_given_another_drivers_code_imports_no_laiontools(spark):
    """An executor that registers after the executors' check was never probed: with other laiontools code it ran
    the stage's tasks, exit 0. The driver's fingerprint now travels with each task function (sc.environment) and
    laiontools refuses to import in a worker whose code differs. Reached here through a real PySpark worker of
    the local session, given another driver's fingerprint: the task fails with one line naming both codes; given
    this driver's own, the same task runs (a cluster whose executor joins late: test_standalone_cluster_...)."""
    from laiontools.core.errors import user_error_from
    from laiontools.core.spark import DRIVER_CODE_ENV, code_fingerprint
    from laiontools.stages.reshard import shard_name

    sc = spark.sparkContext
    other = {"version": "9.9.9", "sha256": "0" * 64, "path": "/elsewhere/laiontools"}
    try:
        sc.environment[DRIVER_CODE_ENV] = json.dumps(other)
        with pytest.raises(Exception) as e:  # (whatever py4j wraps it in: its text is checked below)
            sc.parallelize([3], 1).map(lambda j: shard_name(j)).collect()
        err = user_error_from(e.value)
        assert err is not None, str(e.value)[-3000:]
        said = str(err)
        mine = code_fingerprint()
        assert "does not run this driver's laiontools" in said and "9.9.9" in said and "/elsewhere/laiontools" in said, said
        assert f"code sha256 {mine['sha256'][:12]}, from {mine['path']}" in said, said  # (the worker's own: this checkout)
        sc.environment[DRIVER_CODE_ENV] = json.dumps(mine)
        assert sc.parallelize([3], 1).map(lambda j: shard_name(j)).collect() == [shard_name(3)]
    finally:
        sc.environment.pop(DRIVER_CODE_ENV, None)


def test_a_task_that_cannot_import_a_module_on_its_executor_is_one_line(spark, tmp_path, monkeypatch):
    """A node whose Python lacks laiontools (or one of its dependencies) and was never probed (it joined after the
    check, or the check was off) fails each task on a ModuleNotFoundError, which reached the user as py4j's
    traceback. The CLI now says it in one line naming the module and what to do. Reached with a real Spark
    task whose function lives in a module the driver imports and the task's Python cannot (a folder on the
    driver's sys.path only)."""
    from laiontools.core.errors import executor_import_error

    (tmp_path / "lt_driver_only_module.py").write_text("def twice(x):\n    return 2 * x\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    import lt_driver_only_module

    assert lt_driver_only_module.twice(3) == 6  # (the driver imports it)
    with pytest.raises(Exception) as e:  # (whatever py4j wraps it in: its text is checked below)
        spark.sparkContext.parallelize([3], 1).map(lt_driver_only_module.twice).collect()
    err = executor_import_error(e.value)
    assert err is not None, str(e.value)[-3000:]
    said = str(err)
    assert "\n" not in said and "No module named 'lt_driver_only_module'" in said and "spark.pyspark.python" in said, said
    assert executor_import_error(ModuleNotFoundError("No module named 'x'")) is None  # (the driver's own: not an executor's)


def _stats(out: str) -> dict:
    from laiontools.core.storage import url_to_fs

    fs, p = url_to_fs(f"{out}/{layout.PREPARED_DIR}/{layout.PREPARED_STATS_JSON}")
    return json.loads(fs.cat_file(p))


def test_shuffle_partitions_derived_from_input_size(spark):
    """Unset by the user (the shared test session sets no shuffle count): derived from rows or bytes."""
    par = spark.sparkContext.defaultParallelism
    assert shuffle_partitions(spark, rows=10) == par
    assert spark.conf.get("spark.sql.shuffle.partitions") == str(par)
    assert shuffle_partitions(spark, rows=2_000_000_000) == 2_000_000_000 // ROWS_PER_SHUFFLE_PARTITION
    assert shuffle_partitions(spark, nbytes=BYTES_PER_SHUFFLE_PARTITION * 50 + 1) == 51
    assert shuffle_partitions(spark, rows=ROWS_PER_SHUFFLE_PARTITION * 3, nbytes=1) == max(3, par)


@pytest.mark.slow
def test_standalone_cluster_of_two_workers_runs_the_stages_like_local(spark, s3, tmp_path):
    """spark-submit jobs/<stage>.py of every Spark stage (download with its prepare, verify, subsets,
    reshard, embed, dedup, semdedup, takedown, and prepare on its own) on a master + 2 workers: tasks run
    on both workers and on the cluster for every stage, and each output equals the same stage run in the
    test's process. The workers know nothing of the test's S3 server, as a node knows nothing of the
    submitting machine's settings. The download writes into a bucket, its executors given the server's
    settings as docs/scale.md has a user pass them (spark.executorEnv.*); it is killed mid-run (the whole
    spark-submit process group) and the same command submitted again resumes to the local run's pool,
    which verify on the cluster, reading the bucket, passes. A reshard of the pool copied into a bucket
    reads and writes s3:// on the executors with those settings, and without them stops with one line.
    The download given `--conf spark.sql.shuffle.partitions=37` and a gzip parquet codec, subsets and reshard
    given 5 partitions, used them (a user's setting wins over the job's); the prepare on its own, given none,
    derived its own."""
    from laiontools.stages import download as download_stage
    from laiontools.stages.download import DownloadConfig
    from laiontools.synthetic import SyntheticWebServer, make_source
    from laiontools.testing import TEST_DOWNLOAD_SETTINGS

    def listed(pattern: str) -> list[str]:
        s3.invalidate_cache()
        return s3.glob(pattern)

    s = TEST_DOWNLOAD_SETTINGS
    with SyntheticWebServer(str(tmp_path / "web/images")) as web:
        # rows prepare rejects (bad scheme, no URL): enough to show how many shuffle partitions it used
        # (+ copies of an eval set planted in the pool, for dedup to find)
        src = make_source(str(tmp_path / "web"), 60, web.base_url, broken={"status_404": 0.1, "bad_scheme": 0.2, "null_url": 0.1},
                          evalset=True)
        local = str(tmp_path / "local")
        download_stage.run(DownloadConfig(input=src["source"], output=local, **s), spark)
        rows = ["--input", src["source"], "--allow-networks", *s["allow_networks"], "--number-sample-per-shard",
                str(s["number_sample_per_shard"]), "--shards-per-file", str(s["shards_per_file"])]
        fetch = ["--timeout", str(s["timeout"]), "--retries", str(s["retries"]), "--image-size", str(s["image_size"]),
                 "--thread-count", str(s["thread_count"])]
        bucket = f"lt-cluster-pool-{uuid.uuid4().hex[:8]}"
        s3.mkdir(bucket)
        out = f"s3://{bucket}/pool"
        root = tmp_path / "spark"
        root.mkdir()
        with StandaloneCluster(root, workers=2, drop_env=S3_ENV) as cluster:
            conf = ["--master", cluster.url, "--total-executor-cores", "2", "--executor-cores", "1",
                    "--conf", "spark.executor.memory=512m", "--driver-memory", "1g", *QUICK_JVMS]
            # A user's --conf wins over the job's settings: prepare's shuffle used the 37 partitions given
            # (AQE off, so the real count shows in the written rejected parquet, one file per non-empty
            # shuffle partition: the few rejected rows hashed over 37 land in more files than the 8 the job
            # used to force, never more than 37). The download is killed once its first shard is in the
            # bucket (its prepare done), before its manifest; the same command again resumes it.
            # ... and so does a parquet codec other than the job's default (zstd): gzip, in the catalog the
            # tasks write into the bucket through pyarrow.
            download = [*conf, *_store_conf(), "--conf", "spark.sql.shuffle.partitions=37", "--conf",
                        "spark.sql.adaptive.enabled=false", "--conf", "spark.sql.parquet.compression.codec=gzip",
                        str(REPO / "jobs" / "download.py"), *rows, *fetch, "--output", out]
            phase = _kill_submit(download, cwd=tmp_path, ready=lambda: len(listed(f"{bucket}/pool/shards/*_stats.json")) >= 1,
                                 done=lambda: bool(listed(f"{bucket}/pool/{layout.POOL_MANIFEST}")))
            assert phase["killed_before_manifest"], phase
            lock = f"{bucket}/pool/{layout.OUTPUT_LOCK}"
            assert listed(lock), "the killed driver left no lock (an object naming its host and pid)"
            spark_submit(download, cwd=tmp_path)
            assert not listed(lock), "the resumed run did not take the killed run's lock over and release it"
            assert not [k for k in s3.find(f"{bucket}/pool") if ".tmp-" in k or "-tmp-" in k], s3.find(f"{bucket}/pool")
            assert _stats(out)["spark"] == {"shuffle_partitions": 37}
            rejected = listed(f"{bucket}/pool/{layout.PREPARED_DIR}/rejected/part-*.parquet")
            assert 8 < len(rejected) <= 37, len(rejected)
            codecs = set()
            for key in listed(f"{bucket}/pool/{layout.CATALOG_DIR}/part-*.parquet") + rejected:
                with s3.open(key, "rb") as f:
                    meta = pq.ParquetFile(f).metadata
                codecs |= {meta.row_group(g).column(c).compression for g in range(meta.num_row_groups) for c in range(meta.num_columns)}
            assert codecs == {"GZIP"}, codecs
            ran = cluster.tasks_per_worker()
            assert all(n > 0 for n in ran), f"tasks per worker {ran}: a worker ran nothing"
            # verify of the resumed pool on the cluster: its tasks read every shard from the bucket
            res = spark_submit([*conf, *_store_conf(), str(REPO / "jobs" / "verify.py"), f"{out}/{layout.POOL_MANIFEST}"],
                               cwd=tmp_path)
            assert f"OK   {out}/{layout.POOL_MANIFEST}" in res.stdout, res.stdout[-3000:]
            assert sum(cluster.tasks_per_worker()) > sum(ran), "verify ran no task on the cluster's workers"
            # Executors that import other laiontools code than the driver (first on their PYTHONPATH: a copy
            # with one changed line), or cannot import it (a copy whose import fails), are refused before any of
            # the stage's tasks, in one line naming where they import from / what failed there.
            changed, broken = _changed_copy(tmp_path / "other-code"), _changed_copy(tmp_path / "broken", missing_dependency=True)
            for other, says in ((changed, ["the executors run other laiontools code than this driver", f"from {changed / 'laiontools'})"]),
                                (broken, ["the executors cannot import laiontools (", "No module named 'laiontools_dependency_not_installed'"])):
                res = subprocess.run([str(SPARK_HOME / "bin" / "spark-submit"), *conf, *ONE_EXECUTOR,
                                      "--conf", f"spark.executorEnv.PYTHONPATH={other}",
                                      str(REPO / "jobs" / "verify.py"), f"{local}/{layout.POOL_MANIFEST}"],
                                     cwd=tmp_path, env=submit_env(), capture_output=True, text=True, timeout=300, check=False)
                said = res.stdout + res.stderr  # (spark-submit passes the driver's stderr to its stdout)
                err = [ln for ln in said.splitlines() if ln.startswith("laiontools verify: error: ")]
                assert res.returncode == 2 and len(err) == 1, said[-3000:]
                assert all(x in err[0] for x in says), err
                assert "Traceback" not in said, said[-3000:]
            scales = _subsets_and_reshard_like_local(spark, cluster, conf, f"{local}/{layout.POOL_MANIFEST}", tmp_path)
            _reshard_on_s3_like_local(spark, s3, cluster, conf, local, scales, tmp_path)
            _embed_dedup_semdedup_takedown_like_local(spark, cluster, conf, local, src["evalset"], tmp_path)

            # jobs/prepare.py on its own (as a user does to look at the rejects first; a download into its
            # folder then takes its rows: tests/test_prepare.py), given no shuffle setting: it derives its
            # own from a few KB of input, the cluster's default parallelism (2 executor cores)
            prepared = str(tmp_path / "prepared")
            before = sum(cluster.tasks_per_worker())
            spark_submit([*conf, str(REPO / "jobs" / "prepare.py"), *rows, "--output", prepared], cwd=tmp_path)
            assert sum(cluster.tasks_per_worker()) > before, "prepare ran no task on the cluster's workers"
            assert _stats(prepared)["spark"] == {"shuffle_partitions": 2}
            assert _stats(prepared)["rejected"] == _stats(out)["rejected"]
            _a_late_executor_with_other_code_runs_no_task(cluster, conf, changed, tmp_path)
    _assert_same_pool(out, local, spark)


# A driver that starts its session (the executors' check passes on the executors there are), says so, waits
# for one executor more, then runs tasks of laiontools code on every executor (spark.task.maxFailures=1: the
# first refusal ends the job, where retries on the other executors could let it pass).
_LATE_DRIVER = """
import sys, time
from pathlib import Path
from laiontools.core.errors import user_error_from
from laiontools.core.spark import spark_session
from laiontools.stages.reshard import shard_name

with spark_session() as spark:
    sc = spark.sparkContext
    def executors():
        return sc._jsc.sc().getExecutorMemoryStatus().size() - 1  # (the driver's block manager counted too)
    have = executors()
    Path(sys.argv[1]).write_text(str(have))
    deadline = time.monotonic() + 120
    while executors() <= have and time.monotonic() < deadline:
        time.sleep(0.5)
    print("executors", executors(), flush=True)
    try:
        got = sc.parallelize(range(24), 24).map(lambda j: (time.sleep(0.2), shard_name(j))[1]).collect()
        print("ran", len(got))
    except Exception as e:
        print("refused:", user_error_from(e))
"""


def _a_late_executor_with_other_code_runs_no_task(cluster: StandaloneCluster, conf: list[str], changed: Path, tmp_path: Path) -> None:
    """An executor that registers after the executors' check (a node joining while a stage runs), whose Python
    imports other laiontools code, was never probed: it ran the stage's tasks, exit 0. Now it refuses each of
    them at its first import of laiontools, and the driver says so in one line naming that code."""
    script, ready = tmp_path / "late_driver.py", tmp_path / "late.ready"
    script.write_text(_LATE_DRIVER)
    cmd = [str(SPARK_HOME / "bin" / "spark-submit"), *conf, "--total-executor-cores", "3", "--conf", "spark.task.maxFailures=1",
           str(script), str(ready)]
    with subprocess.Popen(cmd, cwd=tmp_path, env=submit_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                          start_new_session=True) as p:
        try:
            deadline = time.monotonic() + 180
            while not ready.exists() and p.poll() is None and time.monotonic() < deadline:
                time.sleep(0.2)
            assert ready.exists(), p.communicate(timeout=60)[0][-3000:]
            late = cluster.add_worker({"PYTHONPATH": os.pathsep.join([str(changed), str(REPO)])})
            said = p.communicate(timeout=300)[0]
        finally:
            if p.poll() is None:
                os.killpg(p.pid, signal.SIGKILL)
    assert ready.read_text() == "2" and "executors 3" in said, said[-3000:]
    refused = [ln for ln in said.splitlines() if ln.startswith("refused: ")]
    assert len(refused) == 1, said[-3000:]
    assert "an executor that joined after the executors' check" in refused[0], refused
    assert f"from {changed / 'laiontools'}" in refused[0] and "does not run this driver's laiontools" in refused[0], refused
    assert cluster.tasks_per_worker()[late] > 0, "the late executor was given no task"


def _subsets_and_reshard_like_local(spark, cluster: StandaloneCluster, conf: list[str], pool: str, tmp_path: Path) -> str:
    """subsets and reshard of the same pool in the test's session and through spark-submit on the cluster.

    Both shuffle rows (the pool's, the subset's). In the session, which sets no shuffle count, they derive
    one from the input (local[2], a small pool: 2; Spark's default of 200 gave ~200 tasks per shuffle);
    on the cluster they are given `--conf spark.sql.shuffle.partitions=5` and use 5 (the download showed 37
    used; few partitions here keep each submit short). Each manifest's run sidecar records it. The uid
    files, the resharded manifest and every shard are the same bytes, and the cluster's executors ran
    each stage's tasks. Returns the scales cut."""
    import filecmp

    from laiontools.contracts.manifest import SIDECAR_SUFFIX, read_manifest
    from laiontools.stages import reshard as reshard_stage
    from laiontools.stages import subsets as subsets_stage
    from laiontools.stages.reshard import ReshardConfig
    from laiontools.stages.subsets import SubsetsConfig

    def sidecar(manifest: str | Path) -> dict:
        return json.loads(Path(str(manifest) + SIDECAR_SUFFIX).read_text())

    n = read_manifest(pool)["num_samples"]
    small = str(max(2, n // 8))  # at most a quarter of the catalog: its spans are written (by the executors on the cluster)
    scales = f"{n - 3},{n // 2},{small}"
    here = subsets_stage.run(SubsetsConfig(pool=pool, output=str(tmp_path / "sub"), scales=scales, seed=3), spark).details
    big = here[0]["manifest"]
    assert sidecar(big)["spark"] == {"shuffle_partitions": spark.sparkContext.defaultParallelism} == {"shuffle_partitions": 2}
    reshard_stage.run(ReshardConfig(manifest=big, output=str(tmp_path / "rs"), shard_size=8, spark_above=0), spark)
    assert sidecar(tmp_path / "rs" / layout.RESHARD_MANIFEST)["spark"] == {"shuffle_partitions": 2}

    c5 = [*conf, "--conf", "spark.sql.shuffle.partitions=5"]
    before = sum(cluster.tasks_per_worker())
    spark_submit([*c5, str(REPO / "jobs" / "subsets.py"), "--pool", pool, "--output", str(tmp_path / "sub5"),
                  "--scales", scales, "--seed", "3"], cwd=tmp_path)
    after_subsets = sum(cluster.tasks_per_worker())
    assert after_subsets > before, "subsets ran no task on the cluster's workers"
    spark_submit([*c5, str(REPO / "jobs" / "reshard.py"), "--manifest", big, "--output", str(tmp_path / "rs5"),
                  "--shard-size", "8"], cwd=tmp_path)
    assert sum(cluster.tasks_per_worker()) > after_subsets, "reshard ran no task on the cluster's workers"
    for row in here:
        other = tmp_path / "sub5" / Path(row["manifest"]).name
        assert sidecar(other)["spark"] == {"shuffle_partitions": 5}
        uids = read_manifest(row["manifest"])["uids"]["path"]
        assert filecmp.cmp(tmp_path / "sub" / uids, tmp_path / "sub5" / uids, shallow=False), uids
    # the small subset's spans: the same rows whether written by the session's tasks or the cluster's executors
    # (5 range partitions there, each part written by the executor that sorted it)
    import pandas as pd

    from laiontools.contracts import spans

    def span_rows(folder: Path) -> pd.DataFrame:
        record = json.loads((folder / spans.SPANS_JSON).read_text())
        assert record["count"] == int(small)
        return pd.concat([pd.read_parquet(folder / p["path"]) for p in record["parts"]], ignore_index=True)

    pd.testing.assert_frame_equal(span_rows(tmp_path / "sub5" / layout.subset_spans(small)),
                                  span_rows(tmp_path / "sub" / layout.subset_spans(small)))
    rs5 = tmp_path / "rs5" / layout.RESHARD_MANIFEST
    assert sidecar(rs5)["spark"] == {"shuffle_partitions": 5}
    assert sidecar(rs5)["engine"] == f"spark {cluster.url}"
    assert rs5.read_bytes() == (tmp_path / "rs" / layout.RESHARD_MANIFEST).read_bytes()
    for s in read_manifest(str(rs5))["shards"]:
        assert filecmp.cmp(tmp_path / "rs" / s["path"], tmp_path / "rs5" / s["path"], shallow=False), s["path"]
    return scales


def _store_conf() -> list[str]:
    """The test S3 server's endpoint and credentials handed to the executors, as docs/scale.md has a user
    pass them (``--conf spark.executorEnv.*``): the cluster's workers were started without them."""
    return [x for k in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_DEFAULT_REGION", "AWS_ENDPOINT_URL")
            for x in ("--conf", f"spark.executorEnv.{k}={os.environ[k]}")]


def _reshard_on_s3_like_local(spark, s3, cluster: StandaloneCluster, conf: list[str], local: str, scales: str, tmp_path: Path) -> None:
    """The local pool copied into a bucket of the test's S3 server, its subsets cut there (in the test's
    session), and the larger resharded from s3:// into s3:// through spark-submit. The cluster's workers
    were started without the server's endpoint and credentials (a node has none of the submitting
    machine's settings): given them as docs/scale.md says (spark.executorEnv.AWS_*), the executors read
    and write the bucket and the shards are the local reshard's bytes; without them the run stops with
    one line naming the path and the executors' settings, no traceback."""
    from laiontools.contracts.manifest import read_manifest
    from laiontools.stages import subsets as subsets_stage
    from laiontools.stages.subsets import SubsetsConfig

    bucket = f"lt-cluster-{uuid.uuid4().hex[:8]}"
    s3.mkdir(bucket)
    s3.put(f"{local}/", f"{bucket}/pool", recursive=True)
    s3.invalidate_cache()
    sub = subsets_stage.run(SubsetsConfig(pool=f"s3://{bucket}/pool/{layout.POOL_MANIFEST}", output=f"s3://{bucket}/sub",
                                          scales=scales, seed=3), spark).details
    big = sub[0]["manifest"]
    assert s3.cat(f"{bucket}/sub/{read_manifest(big)['uids']['path']}") == \
        (tmp_path / "sub" / read_manifest(big)["uids"]["path"]).read_bytes()
    before = sum(cluster.tasks_per_worker())
    spark_submit([*conf, *_store_conf(), str(REPO / "jobs" / "reshard.py"), "--manifest", big, "--output", f"s3://{bucket}/rs",
                  "--shard-size", "8", "--spark-above", "0"], cwd=tmp_path)
    assert sum(cluster.tasks_per_worker()) > before, "the s3:// reshard ran no task on the cluster's workers"
    got, want = read_manifest(f"s3://{bucket}/rs/{layout.RESHARD_MANIFEST}"), read_manifest(str(tmp_path / "rs" / layout.RESHARD_MANIFEST))
    assert [(x["path"], x["sha256"], x["num_samples"]) for x in got["shards"]] == \
        [(x["path"], x["sha256"], x["num_samples"]) for x in want["shards"]]
    for x in got["shards"]:
        assert s3.cat(f"{bucket}/rs/{x['path']}") == (tmp_path / "rs" / x["path"]).read_bytes(), x["path"]

    _joins_on_the_cluster(spark, s3, cluster, conf, bucket, big, tmp_path)

    res = subprocess.run([str(SPARK_HOME / "bin" / "spark-submit"), *conf, *ONE_EXECUTOR, "--conf", "spark.task.maxFailures=1",
                          str(REPO / "jobs" / "reshard.py"), "--manifest", big, "--output", f"s3://{bucket}/rs-bare",
                          "--shard-size", "8", "--spark-above", "0"],
                         cwd=tmp_path, env=submit_env(), capture_output=True, text=True, timeout=300, check=False)
    said = res.stdout + res.stderr
    err = [ln for ln in said.splitlines() if ln.startswith("laiontools reshard: error: ")]
    assert res.returncode == 2 and len(err) == 1, said[-3000:]
    assert f"s3://{bucket}/" in err[0] and "met on a Spark executor" in err[0] and "spark.executorEnv" in err[0], err[0]
    # (the executor's traceback shows only in Spark's own record of the lost task, a WARN line of its scheduler)
    assert all("WARN TaskSetManager: Lost task" in ln for ln in said.splitlines() if "Traceback" in ln), said[-3000:]


# A spark-submit entry that runs a job of jobs/ with the uid checks and membership tests on their joins, as
# above 16M uids (verify.SPARK_JOIN_ABOVE_UIDS, uids.MEMBER_UDF_MAX_UIDS), uid files read by tasks in pieces
# of 4 uids; it prints a line for each uid file read that way.
_FORCED_JOINS = """
import runpy, sys
from laiontools.contracts import uids
from laiontools.stages import verify
verify.SPARK_JOIN_ABOVE_UIDS = uids.MEMBER_UDF_MAX_UIDS = 0
uids.UID_ROWS_PER_TASK = 4
frame = uids.uid_file_frame
def read_by_tasks(spark, path, *a, **k):
    print("uid file read by tasks:", path, flush=True)
    return frame(spark, path, *a, **k)
uids.uid_file_frame = read_by_tasks
job = sys.argv.pop(1)
sys.argv[0] = job
runpy.run_path(job, run_name="__main__")
"""


def _joins_on_the_cluster(spark, s3, cluster: StandaloneCluster, conf: list[str], bucket: str, big: str, tmp_path: Path) -> None:
    """The paths that a 400M-2B run takes, on the cluster's executors reading the bucket: reshard's plan
    picks the subset's rows by a join with its uid file (the same shards as the local reshard), and
    verify checks the uids across shards and the nesting by joins. With a shard deleted from the bucket,
    verify on the cluster finds what verify in the test's session finds by its in-driver checks."""
    from laiontools.contracts.manifest import read_manifest, resolve
    from laiontools.stages.verify import verify_manifest

    entry = tmp_path / "forced_joins.py"
    entry.write_text(_FORCED_JOINS)
    before = sum(cluster.tasks_per_worker())
    res = spark_submit([*conf, *_store_conf(), str(entry), str(REPO / "jobs" / "reshard.py"), "--manifest", big,
                        "--output", f"s3://{bucket}/rs-joins", "--shard-size", "8", "--spark-above", "0"], cwd=tmp_path)
    sub_uids = resolve(big, read_manifest(big)["uids"]["path"])
    assert f"uid file read by tasks: {sub_uids}" in res.stdout, res.stdout[-3000:]
    assert sum(cluster.tasks_per_worker()) > before, "the joined reshard ran no task on the cluster's workers"
    m = f"s3://{bucket}/rs-joins/{layout.RESHARD_MANIFEST}"
    got = read_manifest(m)
    assert [(x["path"], x["sha256"]) for x in got["shards"]] == \
        [(x["path"], x["sha256"]) for x in read_manifest(str(tmp_path / "rs" / layout.RESHARD_MANIFEST))["shards"]]
    for x in got["shards"]:
        assert s3.cat(f"{bucket}/rs-joins/{x['path']}") == (tmp_path / "rs" / x["path"]).read_bytes(), x["path"]
    s3.rm(f"{bucket}/rs-joins/{got['shards'][1]['path']}")
    s3.invalidate_cache()
    here = verify_manifest(m, spark=spark)  # few uids: checked in the driver
    uid_path, parent = resolve(m, got["uids"]["path"]), resolve(m, got["parent"]["path"])
    assert any(f"uids of the uid file {uid_path} are in no shard" in p for p in here.problems), here.problems
    res = subprocess.run([str(SPARK_HOME / "bin" / "spark-submit"), *conf, *_store_conf(), str(entry), str(REPO / "jobs" / "verify.py"), m],
                         cwd=tmp_path, env=submit_env(), capture_output=True, text=True, timeout=300, check=False)
    assert res.returncode == 1, res.stdout[-3000:] + res.stderr[-3000:]
    read = [ln.split(": ", 1)[1] for ln in res.stdout.splitlines() if ln.startswith("uid file read by tasks: ")]
    assert read == [uid_path, uid_path, resolve(parent, read_manifest(parent)["uids"]["path"])], read
    assert [ln.removeprefix("  DIFFERS: ") for ln in res.stdout.splitlines() if ln.startswith("  DIFFERS: ")] == here.problems


def _embed_dedup_semdedup_takedown_like_local(spark, cluster: StandaloneCluster, conf: list[str], pool_dir: str,
                                              evalset: str, tmp_path: Path) -> None:
    """embed, dedup, semdedup and takedown through spark-submit on the cluster, each on the same input as
    the same stage run in this process (embed's local engine, dedup in the test's session, semdedup's
    in-process tasks, takedown in the test's session): the same outputs, and every stage ran tasks on
    the cluster's executors.

    embed is given no --engine: under spark-submit it runs one Spark task per shard (settings.json
    records the engine it resolved to). Its vectors equal the local engine's up to one fp16 unit (other
    batch mates); dedup and semdedup of the one set of embeddings must then write the same bytes."""
    import numpy as np

    from laiontools.contracts.manifest import read_manifest, resolve
    from laiontools.stages import dedup as dedup_stage
    from laiontools.stages import embed as embed_stage
    from laiontools.stages import semdedup as semdedup_stage
    from laiontools.stages import takedown as takedown_stage
    from laiontools.stages.dedup import DedupConfig
    from laiontools.stages.embed import EmbedConfig
    from laiontools.stages.semdedup import SemDedupConfig
    from laiontools.stages.takedown import TakedownConfig
    from laiontools.testing.removal import removal_list_for

    jobs = REPO / "jobs"
    pool = f"{pool_dir}/{layout.POOL_MANIFEST}"
    ran = [sum(cluster.tasks_per_worker())]

    def submit(stage: str, *args: str) -> None:
        spark_submit([*conf, str(jobs / f"{stage}.py"), *args], cwd=tmp_path)
        ran.append(sum(cluster.tasks_per_worker()))
        assert ran[-1] > ran[-2], f"{stage} ran no task on the cluster's workers"

    emb, emb_c = str(tmp_path / "emb"), str(tmp_path / "emb-cluster")
    embed_stage.run(EmbedConfig(manifest=pool, output=emb, model="lt-tiny", batch_size=8, num_workers=0, device="cpu"))
    submit("embed", "--manifest", pool, "--output", emb_c, "--model", "lt-tiny", "--batch-size", "8", "--num-workers", "0")
    assert json.loads(Path(emb, layout.SETTINGS_JSON).read_text())["engine"] == "local"
    assert json.loads(Path(emb_c, layout.SETTINGS_JSON).read_text())["engine"] == "spark"
    shards = [layout.shard_id(sh["path"]) for sh in read_manifest(pool)["shards"]]
    assert len(shards) >= 2
    for sid in shards:
        for d in (layout.EMB_IMG_DIR, layout.EMB_TEXT_DIR):
            got, want = np.load(f"{emb_c}/{d}/{sid}.npy"), np.load(f"{emb}/{d}/{sid}.npy")
            assert got.shape == want.shape and got.shape[0] > 0, (d, sid)
            np.testing.assert_allclose(got.astype(np.float32), want.astype(np.float32), rtol=0, atol=2e-3)
        got_meta = pd.read_parquet(f"{emb_c}/{layout.EMB_META_DIR}/{sid}.parquet")
        want_meta = pd.read_parquet(f"{emb}/{layout.EMB_META_DIR}/{sid}.parquet")
        pd.testing.assert_frame_equal(got_meta.drop(columns="clip_score"), want_meta.drop(columns="clip_score"))

    def report(out: str, folder: str) -> pd.DataFrame:
        df = pd.read_parquet(Path(out, folder))
        return df.sort_values(list(df.columns[:2])).reset_index(drop=True)

    # dedup of the planted eval-set copies
    dd, dd_c = str(tmp_path / "dedup"), str(tmp_path / "dedup-cluster")
    res = dedup_stage.run(DedupConfig(embeddings=emb, evalset=[f"glyphs={evalset}"], output=dd, device="cpu",
                                      threshold=0.5), spark)
    assert res.counts["pool_duplicates"] > 0, res.summary
    submit("dedup", "--embeddings", emb, "--evalset", f"glyphs={evalset}", "--output", dd_c, "--device", "cpu",
           "--threshold", "0.5")
    assert Path(dd_c, layout.DEDUP_EXCLUDE_UIDS).read_bytes() == Path(dd, layout.DEDUP_EXCLUDE_UIDS).read_bytes()
    pd.testing.assert_frame_equal(report(dd_c, layout.DEDUP_REPORT_DIR), report(dd, layout.DEDUP_REPORT_DIR))

    sd, sd_c = str(tmp_path / "semdedup"), str(tmp_path / "semdedup-cluster")
    res = semdedup_stage.run(SemDedupConfig(embeddings=emb, output=sd, clusters=2, eps=[0.01, 0.05], gallery_groups=0,
                                            spark_above=-1))
    assert res.details["engine"] == "in-process"
    submit("semdedup", "--embeddings", emb, "--output", sd_c, "--clusters", "2", "--eps", "0.01", "0.05",
           "--gallery-groups", "0")
    summary_c = json.loads(Path(sd_c, "summary.json").read_text())
    assert summary_c["engine"] == f"spark {cluster.url}"
    assert Path(sd_c, "exclude.uids.npy").read_bytes() == Path(sd, "exclude.uids.npy").read_bytes()
    pd.testing.assert_frame_equal(report(sd_c, "report"), report(sd, "report"))

    listfile = str(tmp_path / "takedown.txt")
    removal_list_for(f"{pool_dir}/{layout.CATALOG_DIR}", 2, listfile)
    td, td_c = str(tmp_path / "takedown"), str(tmp_path / "takedown-cluster")
    takedown_stage.run(TakedownConfig(pool=pool, list_file=listfile, reason="court order 7", output=td), spark)
    submit("takedown", "--pool", pool, "--list", listfile, "--reason", "court order 7", "--output", td_c)
    got = {}
    for out in (td, td_c):
        m = read_manifest(f"{out}/{layout.POOL_MANIFEST}")
        rewritten = [s for s in m["shards"] if "parent_sha256" in s]
        # a rewritten shard by its members (name, bytes), a referenced one (the parent's) by path and sha256
        got[out] = {"num_samples": m["num_samples"], "uids": m["uids"]["sha256"],
                    "shards": [(s["path"], s["num_samples"], _members(resolve(f"{out}/{layout.POOL_MANIFEST}", s["path"]))
                                if "parent_sha256" in s else s["sha256"]) for s in m["shards"]],
                    "removed": json.loads(Path(out, layout.TAKEDOWN_JSON).read_text())["counts"]}
        assert len(rewritten) == 2, [s["path"] for s in rewritten]
    assert got[td_c] == got[td] and got[td]["removed"]["samples_removed"] == 3, got


def _members(path: str) -> list[tuple[str, bytes]]:
    from laiontools.wds.tarscan import tarfile_payloads

    return sorted(tarfile_payloads(Path(path).read_bytes()))


def _kill_submit(args: list[str], *, cwd: Path, ready, done, deadline_s: float = 600) -> dict:
    """Start ``spark-submit <args>``, SIGKILL its process group as soon as `ready()` holds, and say
    whether `done()` (the stage's final output is there) was still false then (the kill fell mid-run)."""
    cmd = [str(SPARK_HOME / "bin" / "spark-submit"), *args]
    with open(cwd / "killed-submit.log", "wb") as log:
        proc = subprocess.Popen(cmd, cwd=cwd, env=submit_env(), stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        try:
            deadline = time.time() + deadline_s
            while not ready():
                if proc.poll() is not None:
                    raise AssertionError(f"spark-submit ended ({proc.returncode}) before the kill point:\n"
                                         f"{(cwd / 'killed-submit.log').read_text(errors='replace')[-3000:]}")
                if time.time() > deadline:
                    raise TimeoutError("the kill point was never reached")
                time.sleep(0.05)
            before = not done()
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(timeout=60)
        finally:
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait(timeout=60)
    return {"killed_before_manifest": before, "returncode": proc.returncode}


def _assert_same_pool(pool: str, local: str, spark) -> None:
    """The pool (local or a store's URL) equals the local run's: uids, shard names/counts/sizes,
    and catalog rows."""
    from laiontools.contracts.manifest import read_manifest
    from laiontools.core.storage import spark_read_parquet

    m_c = read_manifest(f"{pool}/{layout.POOL_MANIFEST}")
    m_l = read_manifest(f"{local}/{layout.POOL_MANIFEST}")
    assert m_c["num_samples"] == m_l["num_samples"] > 0
    assert m_c["uids"] == m_l["uids"]
    key = ("path", "num_samples", "bytes")
    assert [tuple(x[k] for k in key) for x in m_c["shards"]] == [tuple(x[k] for k in key) for x in m_l["shards"]]
    cols = ["uid", "status", "shard", "key", "width", "height", "sha256"]  # (spans follow the order fetches ended)

    def rows(p: str) -> pd.DataFrame:
        return spark_read_parquet(spark, f"{p}/{layout.CATALOG_DIR}").select(*cols).toPandas() \
            .sort_values(["uid", "status"]).reset_index(drop=True)

    pd.testing.assert_frame_equal(rows(pool), rows(local))


_SESSION_PROBE = """
from laiontools.core.spark import spark_session
with spark_session(app_name="laiontools-probe") as s:
    c = s.sparkContext.getConf()
    print("PROBE", s.sparkContext.appName, c.get("spark.driver.host"), flush=True)
"""


def test_under_spark_submit_the_users_app_name_wins(tmp_path):
    """`spark-submit --name nightly-dedup jobs/dedup.py`: the job set its own app name on the builder, which
    overrides what spark-submit's JVM holds, so the run showed as "laiontools" in the master's, YARN's and
    the history server's lists (DESIGN: under spark-submit the user's --conf wins over anything the job sets)."""
    (tmp_path / "probe.py").write_text(_SESSION_PROBE)
    res = spark_submit(["--master", "local[1]", "--name", "nightly-dedup", *QUICK_JVMS, str(tmp_path / "probe.py")], cwd=tmp_path,
                       timeout=300)
    line = next(ln for ln in res.stdout.splitlines() if ln.startswith("PROBE "))
    assert line.split()[1] == "nightly-dedup", line


def test_a_users_spark_defaults_conf_wins_over_the_embedded_defaults(tmp_path):
    """`laiontools <stage> --master …` starts its own session: its defaults (retries, the parquet codec, driver
    memory, worker reuse) went on the builder, which overrides the user's spark-defaults.conf that the same JVM
    reads, where spark-submit keeps it (a new user's cluster run; the precedence in laiontools/core/spark.py puts
    that file first). Now each key the file sets is left to it; the others keep the embedded default."""
    conf = tmp_path / "conf"
    conf.mkdir()
    # (as java.util.Properties reads it, as Spark does: a key ends at whitespace, '=' or ':'; '#' and '!' comment)
    (conf / "spark-defaults.conf").write_text("# the user's\n! also a comment\nspark.task.maxFailures=3\nspark.python.worker.reuse: false\n"
                                              "spark.ui.showConsoleProgress   false\n")
    code = ("from laiontools.core.spark import spark_session\n"
            "with spark_session('local[1]') as s:\n"
            "    c = s.sparkContext.getConf()\n"
            "    print('PROBE', c.get('spark.task.maxFailures'), c.get('spark.python.worker.reuse'),"
            " c.get('spark.ui.showConsoleProgress'), s.conf.get('spark.sql.parquet.compression.codec'), flush=True)\n")
    env = {k: v for k, v in os.environ.items() if k not in ("PYSPARK_SUBMIT_ARGS", "SPARK_CONF_DIR")}
    env.update(SPARK_CONF_DIR=str(conf), LAIONTOOLS_SPARK_LOG_LEVEL="ERROR")
    res = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300, check=False)
    line = next((ln for ln in res.stdout.splitlines() if ln.startswith("PROBE ")), None)
    assert line is not None, res.stderr[-3000:]
    assert line.split()[1:] == ["3", "false", "false", "zstd"], line  # the file's three keys; the codec no file sets: ours


def test_only_a_local_master_keeps_the_driver_on_loopback(monkeypatch):
    """`laiontools download --master spark://head:7077` (README: naming a master runs the stage on Spark) started
    its driver with SPARK_LOCAL_IP=127.0.0.1, meant for the embedded local[*] session: the driver told the
    master it listens on 127.0.0.1, which on any other host is that host, so no executor could reach it and
    the job waited for resources for good. Only a local master keeps the driver on loopback; a user's own
    SPARK_LOCAL_IP is kept either way. (The environment a session is started with is checked here: a
    driver on this machine's other addresses would break the tests' rule of talking to 127.0.0.0/8 only.)"""
    from laiontools.core import spark as S

    for master, want in (("local[2]", "127.0.0.1"), ("local", "127.0.0.1"), ("spark://head:7077", None), ("yarn", None),
                         ("k8s://https://api:6443", None)):
        monkeypatch.delenv("SPARK_LOCAL_IP", raising=False)
        S._python_env(local=S.driver_on_loopback(master))
        assert os.environ.get("SPARK_LOCAL_IP") == want, master
    monkeypatch.setenv("SPARK_LOCAL_IP", "10.1.2.3")
    S._python_env(local=S.driver_on_loopback("local[2]"))
    assert os.environ["SPARK_LOCAL_IP"] == "10.1.2.3"
    monkeypatch.setenv("PYSPARK_GATEWAY_PORT", "1")  # under spark-submit: its own launch decided
    monkeypatch.delenv("SPARK_LOCAL_IP")
    assert not S.driver_on_loopback("local[2]")
