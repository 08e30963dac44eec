"""The one place that creates, finds and stops Spark sessions.

`laiontools <stage>` creates an embedded ``local[*]`` session; `spark-submit jobs/<stage>.py` finds
the session spark-submit configured. Either way the stage function receives a SparkSession, and only
the code that created a session stops it.
"""

from __future__ import annotations

import logging
import os
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

log = logging.getLogger(__name__)

DEFAULT_MASTER = "local[*]"


def _python_env() -> None:
    # Executors must run the driver's interpreter (same venv, same packages).
    os.environ.setdefault("PYSPARK_PYTHON", sys.executable)
    os.environ.setdefault("PYSPARK_DRIVER_PYTHON", sys.executable)
    # img2dataset imports albumentations, which otherwise phones home at import time.
    os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")
    # An embedded session stays on loopback unless told otherwise (no surprise binding to eth0).
    os.environ.setdefault("SPARK_LOCAL_IP", "127.0.0.1")


@contextmanager
def spark_session(
    master: str | None = None, app_name: str = "laiontools", conf: dict[str, Any] | None = None
) -> Iterator[Any]:
    """Yield a SparkSession: the active one if there is one, else a new one on `master`.

    A session created here is stopped on exit; one that already existed (spark-submit, a test
    fixture, a notebook) is left running.
    """
    _python_env()
    try:
        from pyspark.sql import SparkSession
    except ImportError as e:  # pragma: no cover - dependency of the package
        raise ImportError("pyspark is required for this stage: pip install 'pyspark>=3.5'") from e

    active = SparkSession.getActiveSession()
    if active is not None:
        yield active
        return
    builder = SparkSession.builder.appName(app_name)
    if master is None and "PYSPARK_GATEWAY_PORT" in os.environ:
        # Launched by spark-submit: its --master and --conf already configure the JVM; don't override.
        master = "(spark-submit)"
    else:
        master = master or os.environ.get("LAIONTOOLS_SPARK_MASTER") or DEFAULT_MASTER
        builder = builder.master(master)
    defaults = {
        "spark.driver.memory": os.environ.get("LAIONTOOLS_DRIVER_MEMORY", "2g"),
        "spark.sql.execution.arrow.pyspark.enabled": "true",
        "spark.ui.showConsoleProgress": "true",
        "spark.sql.shuffle.partitions": "8",
        "spark.executorEnv.PYSPARK_PYTHON": sys.executable,
        "spark.executorEnv.NO_ALBUMENTATIONS_UPDATE": "1",
        "spark.task.maxFailures": "4" if not master.startswith("local") else "1",
        "spark.python.worker.reuse": "true",
    }
    for k, v in {**defaults, **(conf or {})}.items():
        builder = builder.config(k, v)
    if master == "(spark-submit)":
        defaults = {k: v for k, v in defaults.items() if k not in ("spark.driver.memory", "spark.task.maxFailures")}
    log.info("starting Spark session on %s", master)
    spark = builder.getOrCreate()
    spark.sparkContext.setLogLevel(os.environ.get("LAIONTOOLS_SPARK_LOG_LEVEL", "WARN"))
    try:
        yield spark
    finally:
        # Release Python-side handles to JVM objects while the gateway is still up; otherwise their
        # finalizers run later (e.g. at the next fork) against a closed gateway and print tracebacks.
        import gc

        gc.collect()
        spark.stop()
