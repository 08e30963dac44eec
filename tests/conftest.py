"""Shared fixtures: one local[2] SparkSession per test session, the synthetic web, and a real pool.

Everything is real: Spark local[2], an HTTP server on 127.0.0.1, img2dataset, open_clip with the
tiny shipped configs (random init). Nothing here reaches the internet.
"""

from __future__ import annotations

import os
import sys

import pytest

os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")
os.environ.setdefault("PYSPARK_PYTHON", sys.executable)
os.environ.setdefault("PYSPARK_DRIVER_PYTHON", sys.executable)


@pytest.fixture(scope="session")
def spark():
    """A local[2] SparkSession shared by the whole test session (stage code finds it as the active one)."""
    from laiontools.spark import spark_session

    with spark_session("local[2]", app_name="laiontools-tests", conf={"spark.driver.memory": "1g"}) as s:
        yield s
