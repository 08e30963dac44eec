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

import pandas as pd
import pyspark

from laiontools.contracts import layout
from laiontools.core.spark import BYTES_PER_SHUFFLE_PARTITION, ROWS_PER_SHUFFLE_PARTITION, shuffle_partitions
from laiontools.synthetic import write_source

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
