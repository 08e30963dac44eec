"""Quicker start-up for the test suite's many short-lived Spark JVMs (tests only; users' runs never see this).

The suite starts ~40 Spark drivers (its session, the CLI subprocesses of the fault and kill tests) and,
in the cluster test, ~14 spark-submit drivers with two executors each. On 2 cores most of a small job's
time there is the JVM loading and verifying Spark's classes. Two standard JVM settings cut it:

- ``-XX:TieredStopAtLevel=1``: the quick compiler tier only (no optimising recompiles of start-up code);
- ``-XX:SharedArchiveFile``: an application class-data-sharing archive (JDK 13+) of the classes a Spark
  driver loads, made once by a small Spark run that ends with ``-XX:ArchiveClassesAtExit``. A JVM
  that finds the archive unusable (another JDK, another class path, a damaged file) ignores it
  silently and loads its classes as usual, so the archive can only change how fast a JVM starts.

Measured here: a local[2] session started in ~3.5 s instead of ~7.5 s, and its first jobs took
~3 s instead of ~6 s.
"""

from __future__ import annotations

import fcntl
import hashlib
import os
import shutil
import subprocess
import sys
import textwrap
import uuid
from pathlib import Path

import pyspark

from laiontools.testing.cluster import SPARK_HOME

QUICK_TIER = "-XX:TieredStopAtLevel=1"

# The run whose loaded classes are archived: a session, a DataFrame shuffle, a window, parquet written
# and read, a pandas/Arrow batch function and a Python RDD job, the kinds of work the stages do.
_ARCHIVE_RUN = textwrap.dedent("""
    import sys
    import pandas as pd
    from pyspark import SparkContext
    from pyspark.sql import SparkSession, Window, functions as F

    s = SparkSession.builder.master("local[2]").appName("laiontools-jvm-archive").getOrCreate()
    df = s.range(200).withColumn("k", F.col("id") % 7).withColumn("s", F.sha2(F.col("id").cast("string"), 256))
    df = df.withColumn("r", F.row_number().over(Window.partitionBy("k").orderBy("s")))
    df.repartition(3, "k").write.mode("overwrite").parquet(sys.argv[1])
    back = s.read.parquet(sys.argv[1])
    back.groupBy("k").agg(F.count("*"), F.max("r")).orderBy("k").collect()
    back.mapInPandas(lambda it: (b[["id"]] for b in it), "id long").agg(F.sum("id")).collect()
    s.sparkContext.parallelize(range(8), 2).map(lambda x: (x % 2, x)).reduceByKey(lambda a, b: a + b).collect()
    s.createDataFrame(pd.DataFrame({"a": [1, 2]})).toPandas()
    proc = SparkContext._gateway.proc
    s.stop()
    proc.stdin.close()  # the gateway JVM exits on EOF; the archive is written as it exits
    proc.wait(timeout=300)
""")


def _key() -> str:
    """What an archive is valid for: this pyspark's jars and the java that runs them."""
    java = os.path.join(os.environ["JAVA_HOME"], "bin", "java") if os.environ.get("JAVA_HOME") else shutil.which("java")
    h = hashlib.sha256(f"{pyspark.__version__}\0{os.path.realpath(java or '')}".encode())
    for jar in sorted((SPARK_HOME / "jars").glob("*.jar")):
        h.update(f"\0{jar.name}:{jar.stat().st_size}".encode())
    return h.hexdigest()[:16]


def archive_path(cache: Path) -> Path:
    """Where the class-data archive for this pyspark and java lives under `cache` (made by make_archive)."""
    return cache.absolute() / f"spark-{_key()}.jsa"


def make_archive(path: Path, python: str = sys.executable, timeout: float = 300, wait: bool = True) -> bool:
    """Make the archive at `path` unless it is there: one small Spark run (~45 s here). False if it
    cannot be made (JVMs given the path then start as they would without it).

    Test processes running side by side (pytest-xdist's workers) make it once: while one makes it, the
    others wait here, or with ``wait=False`` return False at once and go on without it (their JVMs
    started later find it made: a test process that would idle ~45 s to save its one session ~4 s
    of class loading goes on with its tests instead)."""
    if path.exists():
        return True
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path.parent / ".make.lock", "w") as lock:
        try:
            fcntl.flock(lock, fcntl.LOCK_EX if wait else fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:  # (only without wait) another process is making it now
            return False
        return path.exists() or _make_archive(path, python, timeout)


def _make_archive(path: Path, python: str, timeout: float) -> bool:
    tmp = path.parent / f".{path.name}.{uuid.uuid4().hex[:8]}"
    work = path.parent / f".work-{uuid.uuid4().hex[:8]}"
    env = {**os.environ, "PYSPARK_PYTHON": python, "PYSPARK_DRIVER_PYTHON": python,
           "PYSPARK_SUBMIT_ARGS": f"--driver-java-options '{QUICK_TIER} -XX:ArchiveClassesAtExit={tmp}' "
                                  "--conf spark.ui.enabled=false pyspark-shell"}
    try:
        res = subprocess.run([python, "-c", _ARCHIVE_RUN, str(work / "t.parquet")], env=env, capture_output=True,
                             timeout=timeout, check=False)
        if res.returncode != 0 or not tmp.exists() or tmp.stat().st_size == 0:
            return False
        os.replace(tmp, path)  # a JVM never maps a half-written archive
        return True
    except (OSError, subprocess.SubprocessError):
        return False
    finally:
        tmp.unlink(missing_ok=True)
        shutil.rmtree(work, ignore_errors=True)


def quick_java_options(archive: Path) -> str:
    """The JVM options for the suite's Spark JVMs (driver or executor): the quick tier and the archive
    (ignored by a JVM while it is not made yet, or not usable; left out where its path has a space,
    which Spark's option lists would split)."""
    return QUICK_TIER if any(c.isspace() for c in str(archive)) else f"{QUICK_TIER} -XX:SharedArchiveFile={archive}"
