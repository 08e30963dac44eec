"""A Spark standalone cluster on 127.0.0.1 and spark-submit, as a cluster user runs them (tests, benches).

Everything runs the real ``bin/spark-submit`` / ``bin/spark-class`` that pyspark ships (SPARK_HOME =
pyspark's install folder) in subprocesses.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path
from typing import Self

import pyspark

from laiontools.testing.net import free_port, wait_port

REPO = Path(__file__).resolve().parents[2]
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
    if res.returncode != 0:
        raise AssertionError(f"{' '.join(cmd)} exited {res.returncode}:\n{res.stdout[-3000:]}\n{res.stderr[-6000:]}")
    return res


class StandaloneCluster:
    """A Spark standalone master and `workers` workers (1 core, 1 GB each) on 127.0.0.1, stopped on exit
    (their whole process groups, also when the test fails).

    pin: worker i and the executors it starts run on CPU core i only (``taskset``), so that 1 vs 2
    workers compares one core of executors with two separate ones, not two sets of processes sharing
    whatever cores are free. The master and the driver are not pinned.

    drop_env: variables the master and workers (so their executors) are started without, as a cluster
    node lacks what was set on the machine that submits (object-store endpoint, credentials); a job
    then hands them to its executors itself (``--conf spark.executorEnv.NAME=value``)."""

    def __init__(self, root: Path, workers: int = 2, pin: bool = False, drop_env: tuple[str, ...] = ()):
        if pin and workers > len(os.sched_getaffinity(0)):
            raise ValueError(f"pin: {workers} workers need {workers} cores, this process may use {len(os.sched_getaffinity(0))}")
        self.root, self.n, self.procs, self.pin, self.drop_env = root, workers, [], pin, drop_env
        self.port = free_port()
        self.url = f"spark://127.0.0.1:{self.port}"

    def _start(self, args: list[str], log: str, core: int | None = None, env: dict[str, str] | None = None) -> None:
        env = {k: v for k, v in {**submit_env(), "SPARK_LOG_DIR": str(self.root / "logs"), **(env or {})}.items() if k not in self.drop_env}
        out = open(self.root / log, "wb")  # noqa: SIM115 - closed with the process in __exit__
        pin = [] if core is None else ["taskset", "-c", str(sorted(os.sched_getaffinity(0))[core])]
        self.procs.append((subprocess.Popen([*pin, str(SPARK_HOME / "bin" / "spark-class"), *args], env=env,
                                            start_new_session=True, stdout=out, stderr=subprocess.STDOUT), out))

    def __enter__(self) -> Self:
        import time

        try:
            self._start(["org.apache.spark.deploy.master.Master", "--host", "127.0.0.1", "--port", str(self.port),
                         "--webui-port", str(free_port())], "master.log")
            wait_port(self.port, time.time() + 120)
            for i in range(self.n):
                self._start_worker(i)
            self._registered(self.n)
        except BaseException:
            self.__exit__(None, None, None)
            raise
        return self

    def _start_worker(self, i: int, env: dict[str, str] | None = None) -> None:
        work = self.root / f"worker{i}"
        work.mkdir()
        self._start(["org.apache.spark.deploy.worker.Worker", self.url, "--cores", "1", "--memory", "1g",
                     "--host", "127.0.0.1", "--webui-port", str(free_port()), "--work-dir", str(work)],
                    f"worker{i}.log", core=i if self.pin else None, env=env)

    def _registered(self, n: int) -> None:
        import time

        deadline = time.time() + 120
        while time.time() < deadline:  # n workers registered with the master
            if (self.root / "master.log").read_text(errors="replace").count("Registering worker") >= n:
                return
            time.sleep(0.5)
        raise TimeoutError(f"workers did not register:\n{(self.root / 'master.log').read_text()[-3000:]}")

    def add_worker(self, env: dict[str, str] | None = None) -> int:
        """Start one more worker (its processes, so its executors, given `env` over the cluster's), as a node
        that joins a running cluster; returns its number once the master has registered it."""
        i = self.n
        self._start_worker(i, env)
        self.n += 1
        self._registered(self.n)
        return i

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

    def worker_cores(self) -> list[list[int] | None]:
        """The cores each worker process may run on now (None: it has exited)."""
        got = []
        for p, _ in self.procs[1:]:
            try:
                got.append(sorted(os.sched_getaffinity(p.pid)))
            except OSError:
                got.append(None)
        return got

    def tasks_per_worker(self) -> list[int]:
        """Tasks each worker's executors ran (their stderr logs 'Running task' per task)."""
        counts = []
        for i in range(self.n):
            logs = list((self.root / f"worker{i}").glob("app-*/*/stderr"))
            counts.append(sum(f.read_text(errors="replace").count("Running task") for f in logs))
        return counts
