"""Cluster behaviour: spark-submit's settings win over the job's, derived shuffle sizes, and (slow) a
real standalone master + 2 workers on 127.0.0.1 running the Spark stages through spark-submit.

Everything here runs the real ``bin/spark-submit`` that pyspark ships (SPARK_HOME = pyspark's install
folder) in a subprocess, exactly as a cluster user types it.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Self

import pandas as pd
import pyspark
import pytest

from laiontools.contracts import layout
from laiontools.core.spark import BYTES_PER_SHUFFLE_PARTITION, ROWS_PER_SHUFFLE_PARTITION, shuffle_partitions
from laiontools.synthetic import write_source
from laiontools.testing.net import free_port, wait_port

REPO = Path(__file__).resolve().parents[1]
SPARK_HOME = Path(pyspark.__file__).parent
SUBMIT_TIMEOUT = 600  # seconds; one small job on a shared 2-core machine takes ~30 s


def submit_env() -> dict[str, str]:
    """Environment for a spark-submit child: this venv's Python for driver and executors, repo importable."""
    env = dict(os.environ)
    env.update(SPARK_HOME=str(SPARK_HOME), PYSPARK_PYTHON=sys.executable, PYSPARK_DRIVER_PYTHON=sys.executable,
               NO_ALBUMENTATIONS_UPDATE="1", SPARK_LOCAL_IP="127.0.0.1",
               PYTHONPATH=os.pathsep.join([str(REPO), env.get("PYTHONPATH", "")]).rstrip(os.pathsep))
    # a test session's own gateway must not leak into the child (it would think it runs under spark-submit)
    env.pop("PYSPARK_GATEWAY_PORT", None)
    env.pop("PYSPARK_GATEWAY_SECRET", None)
    return env


def spark_submit(args: list[str], *, cwd: Path | str, timeout: int = SUBMIT_TIMEOUT) -> subprocess.CompletedProcess:
    """Run ``spark-submit <args>``; on failure the assertion shows the tail of its output."""
    cmd = [str(SPARK_HOME / "bin" / "spark-submit"), *args]
    res = subprocess.run(cmd, cwd=cwd, env=submit_env(), capture_output=True, text=True, timeout=timeout,
                         check=False)
    assert res.returncode == 0, f"{' '.join(cmd)} exited {res.returncode}:\n{res.stdout[-3000:]}\n{res.stderr[-6000:]}"
    return res


def _source(tmp_path: Path, n: int = 120) -> str:
    items = [{"id": i, "file": f"{i:07d}.jpg", "caption": f"a blue square on a dotted background, number {i}"} for i in range(n)]
    src = str(tmp_path / "src")
    write_source(src, "http://127.0.0.1:9", items, n_files=2)
    return src


def _prepare_args(src: str, out: str) -> list[str]:
    return ["--input", src, "--output", out, "--allow-networks", "127.0.0.0/8", "--number-sample-per-shard", "10",
            "--shards-per-file", "1"]


def _stats(out: str) -> dict:
    return json.loads(Path(out, layout.PREPARED_DIR, "stats.json").read_text())


def test_spark_submit_conf_wins_over_the_jobs_settings(tmp_path):
    """`--conf spark.sql.shuffle.partitions=37` is what the job used; without it the job derives its own."""
    src = _source(tmp_path)
    out_user = str(tmp_path / "user")
    spark_submit(["--master", "local[2]", "--conf", "spark.sql.shuffle.partitions=37",
                  "--conf", "spark.sql.adaptive.enabled=false",
                  str(REPO / "jobs" / "prepare.py"), *_prepare_args(src, out_user)], cwd=tmp_path)
    assert _stats(out_user)["spark"] == {"shuffle_partitions": 37}

    # AQE off, so the shuffle's real partition count shows in the written rejected parquet (one file per
    # non-empty shuffle partition): ~30 rejected rows hashed over 37 partitions land in more files than the
    # 8 partitions the job used to force, and never more than 37.
    rej = list(Path(out_user, layout.PREPARED_DIR, "rejected").glob("part-*.parquet"))
    assert 8 < len(rej) <= 37, len(rej)

    out_default = str(tmp_path / "default")
    spark_submit(["--master", "local[2]", str(REPO / "jobs" / "prepare.py"), *_prepare_args(src, out_default)],
                 cwd=tmp_path)
    # a few KB of input: the derived count is the cluster's default parallelism (local[2] -> 2)
    assert _stats(out_default)["spark"] == {"shuffle_partitions": 2}
    # the setting changes how the work is split, never the result
    for part in ("accepted", "rejected"):
        a = pd.read_parquet(Path(out_user, layout.PREPARED_DIR, part)).sort_values("uid").reset_index(drop=True)
        b = pd.read_parquet(Path(out_default, layout.PREPARED_DIR, part)).sort_values("uid").reset_index(drop=True)
        pd.testing.assert_frame_equal(a, b)


def test_shuffle_partitions_derived_from_input_size(spark):
    """Unset by the user (the shared test session sets no shuffle count): derived from rows or bytes."""
    par = spark.sparkContext.defaultParallelism
    assert shuffle_partitions(spark, rows=10) == par
    assert spark.conf.get("spark.sql.shuffle.partitions") == str(par)
    assert shuffle_partitions(spark, rows=2_000_000_000) == 2_000_000_000 // ROWS_PER_SHUFFLE_PARTITION
    assert shuffle_partitions(spark, nbytes=BYTES_PER_SHUFFLE_PARTITION * 50 + 1) == 51
    assert shuffle_partitions(spark, rows=ROWS_PER_SHUFFLE_PARTITION * 3, nbytes=1) == max(3, par)


class StandaloneCluster:
    """A Spark standalone master and `workers` workers (1 core, 1 GB each) on 127.0.0.1, stopped on exit
    (their whole process groups, also when the test fails)."""

    def __init__(self, root: Path, workers: int = 2):
        self.root, self.n, self.procs = root, workers, []
        self.port = free_port()
        self.url = f"spark://127.0.0.1:{self.port}"

    def _start(self, args: list[str], log: str) -> None:
        env = {**submit_env(), "SPARK_LOG_DIR": str(self.root / "logs")}
        out = open(self.root / log, "wb")  # noqa: SIM115 - closed with the process in __exit__
        self.procs.append((subprocess.Popen([str(SPARK_HOME / "bin" / "spark-class"), *args], env=env,
                                            start_new_session=True, stdout=out, stderr=subprocess.STDOUT), out))

    def __enter__(self) -> Self:
        import time

        try:
            self._start(["org.apache.spark.deploy.master.Master", "--host", "127.0.0.1", "--port", str(self.port),
                         "--webui-port", str(free_port())], "master.log")
            wait_port(self.port, time.time() + 120)
            for i in range(self.n):
                work = self.root / f"worker{i}"
                work.mkdir()
                self._start(["org.apache.spark.deploy.worker.Worker", self.url, "--cores", "1", "--memory", "1g",
                             "--host", "127.0.0.1", "--webui-port", str(free_port()), "--work-dir", str(work)],
                            f"worker{i}.log")
            deadline = time.time() + 120
            while time.time() < deadline:  # both workers registered with the master
                if (self.root / "master.log").read_text(errors="replace").count("Registering worker") >= self.n:
                    break
                time.sleep(0.5)
            else:
                raise TimeoutError(f"workers did not register:\n{(self.root / 'master.log').read_text()[-3000:]}")
        except BaseException:
            self.__exit__(None, None, None)
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        import signal

        for p, out in reversed(self.procs):
            if p.poll() is None:
                os.killpg(p.pid, signal.SIGTERM)
                try:
                    p.wait(timeout=30)
                except subprocess.TimeoutExpired:
                    os.killpg(p.pid, signal.SIGKILL)
                    p.wait(timeout=30)
            out.close()

    def tasks_per_worker(self) -> list[int]:
        """Tasks each worker's executors ran (their stderr logs 'Running task' per task)."""
        counts = []
        for i in range(self.n):
            logs = list((self.root / f"worker{i}").glob("app-*/*/stderr"))
            counts.append(sum(f.read_text(errors="replace").count("Running task") for f in logs))
        return counts


@pytest.mark.slow
def test_standalone_cluster_of_two_workers_runs_the_stages_like_local(spark, tmp_path):
    """spark-submit jobs/download.py and jobs/verify.py on a master + 2 workers: tasks run on both
    workers, and the pool equals the same download run in a local session."""
    from laiontools.contracts.manifest import read_manifest
    from laiontools.stages import download as download_stage
    from laiontools.stages.download import DownloadConfig
    from laiontools.synthetic import SyntheticWebServer, make_source
    from laiontools.testing import TEST_DOWNLOAD_SETTINGS

    s = TEST_DOWNLOAD_SETTINGS
    with SyntheticWebServer(str(tmp_path / "web/images")) as web:
        src = make_source(str(tmp_path / "web"), 40, web.base_url, broken={"status_404": 0.1, "bad_scheme": 0.05})
        local = str(tmp_path / "local")
        download_stage.run(DownloadConfig(input=src["source"], output=local, **s), spark)
        out = str(tmp_path / "cluster")
        args = ["--input", src["source"], "--output", out, "--allow-networks", *s["allow_networks"],
                "--number-sample-per-shard", str(s["number_sample_per_shard"]), "--shards-per-file",
                str(s["shards_per_file"]), "--timeout", str(s["timeout"]), "--retries", str(s["retries"]),
                "--image-size", str(s["image_size"]), "--thread-count", str(s["thread_count"])]
        root = tmp_path / "spark"
        root.mkdir()
        with StandaloneCluster(root, workers=2) as cluster:
            conf = ["--master", cluster.url, "--total-executor-cores", "2", "--executor-cores", "1",
                    "--conf", "spark.executor.memory=512m", "--driver-memory", "1g"]
            spark_submit([*conf, str(REPO / "jobs" / "download.py"), *args], cwd=tmp_path)
            ran = cluster.tasks_per_worker()
            assert all(n > 0 for n in ran), f"tasks per worker {ran}: a worker ran nothing"
            res = spark_submit([*conf, str(REPO / "jobs" / "verify.py"), f"{out}/{layout.POOL_MANIFEST}"], cwd=tmp_path)
            assert f"OK   {out}/{layout.POOL_MANIFEST}" in res.stdout
    m_c = read_manifest(f"{out}/{layout.POOL_MANIFEST}")
    m_l = read_manifest(f"{local}/{layout.POOL_MANIFEST}")
    assert m_c["num_samples"] == m_l["num_samples"] > 0
    assert m_c["uids"] == m_l["uids"]
    key = ("path", "num_samples", "bytes")
    assert [tuple(x[k] for k in key) for x in m_c["shards"]] == [tuple(x[k] for k in key) for x in m_l["shards"]]
    cols = ["uid", "status", "shard", "key", "width", "height", "sha256"]
    a = pd.read_parquet(f"{out}/{layout.CATALOG_DIR}", columns=cols).sort_values(["uid", "status"]).reset_index(drop=True)
    b = pd.read_parquet(f"{local}/{layout.CATALOG_DIR}", columns=cols).sort_values(["uid", "status"]).reset_index(drop=True)
    pd.testing.assert_frame_equal(a, b)
