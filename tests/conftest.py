"""Shared fixtures: one local[2] SparkSession per test session, the synthetic web, and a real pool.

Everything is real: Spark local[2], an HTTP server on 127.0.0.1, img2dataset, open_clip with the
tiny shipped configs (random init). Nothing here reaches the internet.
"""

from __future__ import annotations

import dataclasses
import os
import sys
from pathlib import Path
from typing import TYPE_CHECKING

import pytest

from laiontools.testing.jvm import archive_path, make_archive, quick_java_options

if TYPE_CHECKING:
    import pandas

os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")
os.environ.setdefault("PYSPARK_PYTHON", sys.executable)
os.environ.setdefault("PYSPARK_DRIVER_PYTHON", sys.executable)
# The suite starts ~40 Spark drivers (its session, and the CLI subprocesses the fault and kill tests run
# like a user would). For them only: no web UI (no test reads it), the JVM's quick compiler tier and a
# class-data archive of Spark's classes (laiontools/testing/jvm.py; made by the `spark` fixture the first
# time, kept in .pytest_cache), which start a driver and run its first jobs in ~7 s instead of ~12 s with
# the quick tier alone (~14 s with neither) here. pyspark reads this variable when a Python process starts
# its own driver; users' runs never see it, and the cluster test passes the same options to its
# spark-submits (LAIONTOOLS_TEST_JAVA_OPTIONS).
JVM_ARCHIVE = archive_path(Path(__file__).resolve().parents[1] / ".pytest_cache" / "laiontools-jvm")
os.environ.setdefault("LAIONTOOLS_TEST_JAVA_OPTIONS", quick_java_options(JVM_ARCHIVE))
os.environ.setdefault("PYSPARK_SUBMIT_ARGS", f"--driver-java-options '{os.environ['LAIONTOOLS_TEST_JAVA_OPTIONS']}' "
                                             "--conf spark.ui.enabled=false pyspark-shell")


def _reserve_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _set_test_endpoint(port_var: str, port: int, urls: tuple[str, ...]) -> None:
    """Reserve `port` for a test server under `port_var` and name it in `urls`, unless the user set those
    already. Where this session's pytest was started by another that did it before (an xdist worker), the
    values it inherited are that one's, for that one's port: replaced, each worker running its own server."""
    inherited = os.environ.get(port_var)
    for var in urls:
        if inherited is not None and os.environ.get(var) == f"http://127.0.0.1:{inherited}":
            del os.environ[var]
        os.environ.setdefault(var, f"http://127.0.0.1:{port}")
    os.environ[port_var] = str(port)


# Object-store tests (test_s3.py) talk to an S3 API server (moto) on 127.0.0.1 at this port. Its endpoint
# and fake credentials go into the environment now, before the Spark JVM starts: Spark's Python workers
# inherit the JVM's environment, not later changes to this process's. No real bucket is reachable with them.
_set_test_endpoint("LAIONTOOLS_TEST_S3_PORT", _reserve_port(), ("FSSPEC_S3_ENDPOINT_URL", "AWS_ENDPOINT_URL"))
# The gs:// tests (test_gcs.py) talk to a GCS API server (gcp-storage-emulator) on 127.0.0.1 at this port,
# named the way users of an emulator name theirs (gcsfs reads STORAGE_EMULATOR_HOST), for the same reason.
_set_test_endpoint("LAIONTOOLS_TEST_GCS_PORT", _reserve_port(), ("STORAGE_EMULATOR_HOST",))
for _k, _v in {"AWS_ACCESS_KEY_ID": "laiontools-test", "AWS_SECRET_ACCESS_KEY": "laiontools-test",
               "AWS_DEFAULT_REGION": "us-east-1"}.items():
    os.environ.setdefault(_k, _v)


# `make test` runs the suite in 2 processes (pytest-xdist, --dist loadfile): a test file at a time each, so
# that a file's fixtures are made once. Two changes to that, for a suite whose time is a few long tests:
# - the fault-injection files are one unit of work, so one process makes their chain of inputs
#   (tests/faults/conftest.py, ~1.5 min) instead of both;
# - the longest units go first (xdist would order them by their number of tests): the cluster test
#   (~14 min alone on 2026-12-05), the fault files (~15 min together), the demo; the rest fills in behind them.
_FIRST = ("tests/test_cluster.py", "tests/faults/", "tests/test_demo.py")


def _unit(nodeid: str) -> str:
    path = nodeid.split("::", 1)[0]
    return "tests/faults/" if path.startswith("tests/faults/") else path


def pytest_collection_modifyitems(config, items):
    def rank(item) -> int:
        unit = _unit(item.nodeid)
        return _FIRST.index(unit) if unit in _FIRST else len(_FIRST)

    items.sort(key=rank)  # stable: each file's tests keep their order


@pytest.hookimpl(optionalhook=True)
def pytest_xdist_make_scheduler(config, log):
    if config.getoption("dist") != "loadfile":
        return None
    from xdist.scheduler import LoadScopeScheduling

    class LongestFirst(LoadScopeScheduling):
        def _split_scope(self, nodeid: str) -> str:
            return _unit(nodeid)

    config.option.loadscopereorder = False  # keep the collection's order (above)
    return LongestFirst(config, log)


@pytest.fixture(scope="session")
def s3_server():
    """A real S3 API server (moto's server mode) on 127.0.0.1 for the session, which counts the GETs
    under a prefix it is told to watch (laiontools.testing.s3server)."""
    pytest.importorskip("moto.server", reason="object-store tests need moto[server] (the test extra)")
    import fsspec

    from laiontools.testing.s3server import S3Server

    port = os.environ["LAIONTOOLS_TEST_S3_PORT"]  # reserved above
    endpoint = os.environ["FSSPEC_S3_ENDPOINT_URL"]
    if endpoint != f"http://127.0.0.1:{port}":
        pytest.skip(f"FSSPEC_S3_ENDPOINT_URL was set outside the tests ({endpoint}); not starting a test server there")
    # fsspec reads FSSPEC_* variables when it is imported; make sure this process uses them too.
    fsspec.config.conf.setdefault("s3", {}).setdefault("endpoint_url", endpoint)
    with S3Server(port=int(port)) as server:
        yield server


@pytest.fixture(scope="session")
def s3(s3_server):
    """An s3fs file system talking to the test server."""
    s3fs = pytest.importorskip("s3fs", reason="object-store tests need s3fs (the test extra)")
    return s3fs.S3FileSystem(endpoint_url=s3_server.endpoint)


@pytest.fixture(scope="session")
def spark():
    """A local[2] SparkSession shared by the whole test session (stage code finds it as the active one).
    Its JVM, and every later one of the suite's, starts from the class-data archive, made first if
    there is none yet (~45 s, once per checkout and pyspark/java); where another xdist worker is making
    it now, this session starts without it rather than wait."""
    from laiontools.core.spark import spark_session

    make_archive(JVM_ARCHIVE, wait=False)

    with spark_session("local[2]", app_name="laiontools-tests", conf={"spark.driver.memory": "1g"}) as s:
        yield s


@dataclasses.dataclass
class Pool:
    """A real pool downloaded from the synthetic web by the real download job."""

    manifest: str  # path to pool.manifest.json
    dir: str
    source: str  # source metadata folder
    expected: pandas.DataFrame  # per input row: route, expected status, expected_uid, ...
    evalset_dir: str  # synthetic ImageFolder eval set (5 classes x 4)
    planted: pandas.DataFrame  # uid, eval_item, transform of pool samples that copy eval images
    base_url: str
    config: object  # the DownloadConfig used
    server: object


from laiontools.testing import TEST_DOWNLOAD_SETTINGS


@pytest.fixture(scope="session")
def synthetic_web(tmp_path_factory):
    """The synthetic source (80 images + planted copies of an eval set) served on 127.0.0.1 for the session."""
    from laiontools.synthetic import SyntheticWebServer, make_source

    work = str(tmp_path_factory.mktemp("synthetic"))
    with SyntheticWebServer(f"{work}/images") as web:
        src = make_source(work, 80, web.base_url, evalset=True, seed=0)
        yield web, src


@pytest.fixture(scope="session")
def pool(spark, synthetic_web, tmp_path_factory) -> Pool:
    """A pool downloaded by `laiontools.stages.download.run` (Spark local[2] + img2dataset)."""
    import pandas as pd

    from laiontools.stages import download as download_stage
    from laiontools.stages.download import DownloadConfig

    web, src = synthetic_web
    out = str(tmp_path_factory.mktemp("pool"))
    cfg = DownloadConfig(input=src["source"], output=out, **TEST_DOWNLOAD_SETTINGS)
    rep = download_stage.run(cfg, spark).details
    planted = src["planted"].rename(columns={"expected_uid": "uid"})[["uid", "eval_item", "transform"]]
    cat = pd.read_parquet(f"{out}/catalog", columns=["uid", "status"])
    planted = planted[planted["uid"].isin(cat[cat["status"] == "success"]["uid"])].reset_index(drop=True)
    return Pool(rep["manifest"], out, src["source"], src["expected"], src["evalset"], planted, web.base_url, cfg, web)
