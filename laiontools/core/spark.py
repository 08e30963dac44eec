"""The one place that creates, finds and stops Spark sessions, and decides which settings they get.

`laiontools <stage>` creates an embedded ``local[*]`` session; `spark-submit jobs/<stage>.py` finds
the session spark-submit configured. Either way the stage function receives a SparkSession, and only
the code that created a session stops it.

Precedence of settings (highest first):

1. What the user set: spark-submit's ``--conf`` / ``--driver-memory``, ``spark-defaults.conf`` (read by an
   embedded session's JVM too; this module's defaults skip its keys), or the ``conf`` argument of
   :func:`spark_session`. Under spark-submit the job sets *nothing* the user could
   have set: spark-submit's JVM already holds the user's settings, and a builder ``.config`` would
   override them.
2. Values a job derives from its input (:func:`shuffle_partitions`), applied only when the user did
   not set that key.
3. This module's defaults for an embedded session (driver memory, Arrow, retries), which exist only
   because we start that JVM ourselves.
"""

from __future__ import annotations

import logging
import math
import os
import re
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from laiontools.core.fingerprint import DRIVER_CODE_ENV, code_fingerprint
from laiontools.core.fingerprint import fingerprint_probe as _fingerprint_probe

log = logging.getLogger(__name__)

DEFAULT_MASTER = "local[*]"
SHUFFLE_PARTITIONS = "spark.sql.shuffle.partitions"
# Rows per shuffle partition when a job derives the count from its input: LAION catalog rows are
# ~0.3-1 KB in Spark's shuffle format, so 250k rows is ~100-250 MB per partition, Spark's sweet spot
# (AQE coalesces partitions that come out small, never splits ones that come out big).
ROWS_PER_SHUFFLE_PARTITION = 250_000
# Bytes of (compressed) input per shuffle partition when only the input size is known.
BYTES_PER_SHUFFLE_PARTITION = 64 << 20


# SQL settings that can be changed on a running session; under spark-submit they are set only where
# the user did not set them (the stages' toPandas/createDataFrame calls are ~10x faster with Arrow;
# parquet written with zstd, as pyarrow writes ours: see core.storage.PARQUET_CODEC).
RUNTIME_DEFAULTS = {"spark.sql.execution.arrow.pyspark.enabled": "true", "spark.sql.parquet.compression.codec": "zstd"}


def under_spark_submit() -> bool:
    """True when this driver was launched by spark-submit (its JVM is already running and configured)."""
    return "PYSPARK_GATEWAY_PORT" in os.environ


def _python_env(local: bool = True) -> None:
    # Executors must run the driver's interpreter (same venv, same packages). PySpark reads
    # PYSPARK_PYTHON when the SparkContext is created, also under spark-submit (unless the user set
    # spark.pyspark.python, which wins).
    os.environ.setdefault("PYSPARK_PYTHON", sys.executable)
    os.environ.setdefault("PYSPARK_DRIVER_PYTHON", sys.executable)
    # img2dataset imports albumentations, which otherwise phones home at import time.
    os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")
    # An embedded local session stays on loopback unless told otherwise (no surprise binding to eth0). Not
    # a driver on a cluster master: its executors on other hosts must reach it at an address of this one.
    if local:
        os.environ.setdefault("SPARK_LOCAL_IP", "127.0.0.1")


def driver_on_loopback(master: str) -> bool:
    """Whether a session this process starts on `master` keeps its driver on 127.0.0.1: a local master
    only. A cluster's executors on other hosts must reach the driver at an address of this host (and
    under spark-submit its own launch already decided)."""
    return not under_spark_submit() and master.startswith("local")


def embedded_defaults(master: str) -> dict[str, str]:
    """Settings for a session this module starts itself (never applied under spark-submit)."""
    return {
        **RUNTIME_DEFAULTS,
        "spark.driver.memory": os.environ.get("LAIONTOOLS_DRIVER_MEMORY", "2g"),
        "spark.ui.showConsoleProgress": "true",
        "spark.executorEnv.PYSPARK_PYTHON": sys.executable,
        "spark.executorEnv.NO_ALBUMENTATIONS_UPDATE": "1",
        # local mode has no other executor to retry on: fail at once with the task's own error.
        "spark.task.maxFailures": "1" if master.startswith("local") else "4",
        "spark.python.worker.reuse": "true",
        # parquet-mr writes a CRC per page but checks none by default: a flipped bit in a catalog page
        # then reads back as a wrong value (a fault test found one in the sha256 column). CRC32 costs
        # far less than decompression; with it, the read fails naming the file (cli: FAILED_READ_FILE).
        "spark.hadoop.parquet.page.verify-checksum.enabled": "true",
    }


def spark_defaults_file() -> dict[str, str]:
    """The settings of the ``spark-defaults.conf`` a session started here reads (``$SPARK_CONF_DIR``, else
    ``$SPARK_HOME/conf``, else the Spark home pyspark launches from), as ``java.util.Properties`` reads it: a
    key ends at the first ``=``, ``:`` or whitespace; ``#`` and ``!`` start comments. {} when there is none or
    it cannot be read. (A builder's ``.config`` overrides that file: `laiontools <stage> --master ...` overrode
    a user's spark.task.maxFailures, codec and driver memory there, which spark-submit keeps.)"""
    folder = os.environ.get("SPARK_CONF_DIR")
    if not folder:
        home = os.environ.get("SPARK_HOME")
        if not home:
            try:
                from pyspark.find_spark_home import _find_spark_home  # what pyspark's gateway launches from

                home = _find_spark_home()
            except (ImportError, SystemExit, Exception):  # noqa: BLE001 - no Spark home: no file to honour
                return {}
        folder = os.path.join(home, "conf")
    out: dict[str, str] = {}
    try:
        with open(os.path.join(folder, "spark-defaults.conf"), encoding="utf-8") as f:
            for line in f:
                text = line.strip()
                if text and text[0] not in "#!":
                    m = re.match(r"([^\s=:]+)\s*[=:\s]?\s*(.*)", text)
                    if m:
                        out[m.group(1)] = m.group(2).strip()
    except (OSError, UnicodeDecodeError):
        return {}
    return out


def user_set(spark: Any, key: str) -> bool:
    """True when `key` is in the session's SparkConf: set by --conf, spark-defaults.conf or the creator."""
    return bool(spark.sparkContext.getConf().contains(key))


def derived_shuffle_partitions(*, rows: int | None = None, nbytes: int | None = None, parallelism: int = 1) -> int:
    """The shuffle partitions a job over `rows` rows (or `nbytes` input bytes) derives when the user set none:
    one per ROWS_PER_SHUFFLE_PARTITION rows (or BYTES_PER_SHUFFLE_PARTITION bytes), at least `parallelism`
    (the cluster's default parallelism). ``laiontools plan`` gives the same count for a planned cluster."""
    want = 1
    if rows is not None:
        want = max(want, math.ceil(rows / ROWS_PER_SHUFFLE_PARTITION))
    if nbytes is not None:
        want = max(want, math.ceil(nbytes / BYTES_PER_SHUFFLE_PARTITION))
    return max(want, parallelism)


def shuffle_partitions(spark: Any, *, rows: int | None = None, nbytes: int | None = None) -> int:
    """Return the shuffle partition count a job over `rows` rows (or `nbytes` input bytes) should use.

    The user's ``spark.sql.shuffle.partitions`` (``--conf``, spark-defaults.conf, session conf) wins
    and is returned unchanged. Otherwise the count is derived from the input — one partition per
    ROWS_PER_SHUFFLE_PARTITION rows (or BYTES_PER_SHUFFLE_PARTITION bytes), at least the cluster's
    default parallelism — and set on the session's runtime conf for the shuffles that follow.
    Stages record the returned value with their output so a run shows what it used.
    """
    if user_set(spark, SHUFFLE_PARTITIONS):
        n = int(spark.conf.get(SHUFFLE_PARTITIONS))
        log.info("shuffle partitions: %d (set by the user)", n)
        return n
    n = derived_shuffle_partitions(rows=rows, nbytes=nbytes, parallelism=int(spark.sparkContext.defaultParallelism))
    spark.conf.set(SHUFFLE_PARTITIONS, str(n))
    log.info("shuffle partitions: %d (derived from %s rows / %s bytes of input)", n, rows, nbytes)
    return n


def spark_run_record(spark: Any, rows: int) -> dict[str, Any]:
    """What a stage's manifest sidecar records of a Spark run over `rows` input rows: the engine, and the
    shuffle partitions it uses (:func:`shuffle_partitions`: derived, and set, unless the user set them)."""
    return {"engine": f"spark {spark.sparkContext.master}", "spark": {"shuffle_partitions": shuffle_partitions(spark, rows=rows)}}


@contextmanager
def spark_session(
    master: str | None = None, app_name: str = "laiontools", conf: dict[str, Any] | None = None
) -> Iterator[Any]:
    """Yield a SparkSession: the active one if there is one, else a new one on `master`.

    A session created here is stopped on exit; one that already existed (spark-submit, a test
    fixture, a notebook) is left running. Under spark-submit its ``--master`` and ``--conf``
    configure the session (`master` and `conf` are ignored with a warning) and only RUNTIME_DEFAULTS
    the user left unset are added. Otherwise `conf` overrides :func:`embedded_defaults`.
    """
    where = master or os.environ.get("LAIONTOOLS_SPARK_MASTER") or DEFAULT_MASTER
    _python_env(local=driver_on_loopback(where))
    try:
        from pyspark.sql import SparkSession
    except ImportError as e:  # pragma: no cover - dependency of the package
        raise ImportError("pyspark is required for this stage: pip install 'pyspark>=3.5'") from e

    active = SparkSession.getActiveSession()
    if active is not None:
        check_executors(active)
        yield active
        return
    builder = SparkSession.builder
    if under_spark_submit():  # (no appName either: spark-submit's --name / spark.app.name, or its default, stays)
        if master or conf:
            log.warning("under spark-submit: ignoring master=%s / conf=%s; spark-submit's settings apply",
                        master, sorted(conf or {}))
        where = "(spark-submit)"
    else:
        builder = builder.appName(app_name).master(where)
        # the user's spark-defaults.conf, which this JVM reads too, wins over this module's defaults
        users = spark_defaults_file()
        mine = {k: v for k, v in embedded_defaults(where).items() if k not in users}
        for k, v in {**mine, **(conf or {})}.items():
            builder = builder.config(k, v)
    log.info("starting Spark session on %s", where)
    spark = builder.getOrCreate()
    spark.sparkContext.setLogLevel(os.environ.get("LAIONTOOLS_SPARK_LOG_LEVEL", "WARN"))
    if where == "(spark-submit)":
        # Runtime SQL settings can still be given a default after start, where the user left them unset.
        for k, v in RUNTIME_DEFAULTS.items():
            if not user_set(spark, k):
                spark.conf.set(k, v)
    try:
        check_executors(spark)
        yield spark
    finally:
        # Release Python-side handles to JVM objects while the gateway is still up; otherwise their
        # finalizers run later (e.g. at the next fork) against a closed gateway and print tracebacks.
        import gc

        gc.collect()
        spark.stop()


# Spark applications whose executors were found to run this driver's laiontools (checked once each).
_CHECKED_APPS: set[str] = set()


def check_executors(spark: Any) -> None:
    """Refuse to run a stage on executors that import other laiontools code than this driver, or none:
    a task function pickled here and run there against other code fails in the middle of a stage with a
    bare TypeError (an unexpected keyword argument) or, worse, writes what the other version writes.

    Runs once per Spark application, one small job over the executors there are (not for local
    masters, whose workers are this machine's Python). Raises UserError naming each host's version,
    code sha256 and folder, or the error that stopped the import there. ``LAIONTOOLS_EXECUTOR_CHECK=0``
    turns it off (e.g. executors that carry a deliberate patch).

    Once they pass, the driver's fingerprint goes into the environment of the Python workers of every task
    function made after (``sc.environment``, which each task function carries): an executor that registers
    later refuses to import other code (:func:`refuse_other_driver_code`)."""
    sc = spark.sparkContext
    if sc.master.startswith("local") or os.environ.get("LAIONTOOLS_EXECUTOR_CHECK", "1") == "0":
        return
    if sc.applicationId in _CHECKED_APPS:
        return
    from laiontools.core.errors import UserError

    mine = code_fingerprint()
    n = max(2, sc.defaultParallelism)
    sc.setJobDescription("laiontools: do the executors run this driver's code?")
    try:
        seen = sorted(set(sc.parallelize(range(n), n).mapPartitions(_fingerprint_probe()).collect()))
    finally:
        sc.setJobDescription(None)
    fix = (f"install laiontools {mine['version']} (this driver's, from {mine['path']}, code sha256 {mine['sha256'][:12]}) in the "
           "Python environment every executor runs (spark.pyspark.python / PYSPARK_PYTHON): docs/scale.md, 'What a cluster run needs'")
    broken = [s for s in seen if not s[2]]
    if broken:
        hosts = "; ".join(f"{host}: {err}" for host, _, _, err in broken[:5])
        raise UserError(f"the executors cannot import laiontools ({hosts}): {fix}")
    other = [s for s in seen if s[2] != mine["sha256"]]
    if other:
        hosts = "; ".join(f"{host}: laiontools {ver}, code sha256 {sha[:12]}, from {path}" for host, ver, sha, path in other[:5])
        raise UserError(f"the executors run other laiontools code than this driver ({hosts}). Every node must run the same code: "
                        f"{fix}; LAIONTOOLS_EXECUTOR_CHECK=0 skips this check")
    log.info("executors run this driver's laiontools (%s, code sha256 %s) on %d host(s)", mine["version"], mine["sha256"][:12],
             len({s[0] for s in seen}))
    import json

    sc.environment[DRIVER_CODE_ENV] = json.dumps(mine)
    _CHECKED_APPS.add(sc.applicationId)


def threads_per_task(spark: Any, requested: int) -> int:
    """OpenMP threads (faiss) per Spark task: ``requested`` if > 0, else the cores shared among the tasks
    that run at once (local mode) or ``spark.task.cpus`` (a cluster), so tasks don't oversubscribe cores."""
    if requested > 0:
        return requested
    sc = spark.sparkContext
    if sc.master.startswith("local"):
        return max(1, (os.cpu_count() or 1) // max(1, sc.defaultParallelism))
    return max(1, int(sc.getConf().get("spark.task.cpus", "1")))
