"""Subset selection over synthetic catalogs: wall time and peak driver memory as the catalog grows,
on Spark and in process.

    .venv/bin/python bench/bench_subsets.py [--rows 1000000,10000000] [--engines spark,in-process] [--out bench-out]

For each size, a fresh process (so peak memory is its own) writes nothing but reads a synthetic
catalog (uid, status, shard, caption, sizes, punsafe, pwatermark; 1M rows per parquet file) and runs
`subsets.run` with punsafe < 0.5 and pwatermark < 0.8 filters and three nested scales (80M/400M/2B
times a factor proportional to the catalog, so output grows with the input too) on Spark local[2].

The in-process engine (the default below ``--spark-above`` catalog rows) runs the same
selection in the worker process with no JVM; its wall time is end to end (what a user waits for), and
the Spark engine's end to end is its session's start plus its selection. Both write the same files.

Reported per size and engine: wall time of the selection (Spark session start excluded, reported apart), peak
RSS (VmHWM) of the Python driver, and of the JVM. In local mode the JVM holds the executors too, so
its figure is driver + executors and is capped by spark.driver.memory; the Python driver's figure
is the one the design promises stays flat. Ratios are against the smallest size in the same run.
Figures go to bench-out/subsets.json.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import subprocess
import sys
import time
from typing import Any

from laiontools.testing import procs

ROWS_PER_FILE = 1_000_000
NUM_SHARDS = 100


def _hwm_kb(pid: int | str = "self") -> int:
    return procs.memory_kb(pid, "VmHWM")


def _java_children() -> list[int]:
    return [c for c in procs.children(os.getpid()) if procs.status(c).get("Name") == "java"]


def write_catalog(root: str, rows: int) -> str:
    """Synthetic pool: catalog/part-*.parquet with the columns subsets reads, and a pool manifest."""
    import numpy as np
    import pyarrow as pa
    import pyarrow.parquet as pq

    from laiontools.contracts import schema as C
    from laiontools.contracts.manifest import new_manifest, write_manifest
    from laiontools.core.storage import PARQUET_WRITE

    cat = os.path.join(root, "catalog")
    os.makedirs(cat, exist_ok=True)
    rng = np.random.default_rng(0)
    done = 0
    part = 0
    while done < rows:
        n = min(ROWS_PER_FILE, rows - done)
        uids = rng.integers(0, 2**63, size=(n, 2), dtype=np.int64).astype(">u8").tobytes().hex()
        uid_col = pa.array([uids[i * 32 : (i + 1) * 32] for i in range(n)])
        ok = rng.random(n) < 0.9
        status = pa.array(np.where(ok, C.STATUS_SUCCESS, C.STATUS_FAILED_DOWNLOAD))
        shard = pa.array([f"{s:05d}" for s in rng.integers(0, NUM_SHARDS, n)])
        caplen = rng.integers(5, 80, n)
        caption = pa.array(["c" * int(k) for k in caplen])
        w = rng.integers(64, 2048, n)
        h = rng.integers(64, 2048, n)
        t = pa.table(
            {
                C.UID: uid_col, C.STATUS: status, C.SHARD: shard, C.KEY: pa.array(np.arange(n).astype(str)),
                C.CAPTION: caption, C.WIDTH: pa.array(np.minimum(w, 256)), C.HEIGHT: pa.array(np.minimum(h, 256)),
                C.ORIGINAL_WIDTH: pa.array(w), C.ORIGINAL_HEIGHT: pa.array(h),
                C.PUNSAFE: pa.array(rng.random(n)), C.PWATERMARK: pa.array(rng.random(n)),
            }
        )
        pq.write_table(t, os.path.join(cat, f"part-{part:05d}.parquet"), **PARQUET_WRITE)  # as download writes it
        done += n
        part += 1
    shards = [{"path": f"shards/{s:05d}.tar", "num_samples": 0, "bytes": 0, "sha256": "0" * 64} for s in range(NUM_SHARDS)]
    m = new_manifest(
        name=f"synthetic-{rows}", kind="pool", num_samples=int(rows * 0.9), target_samples=None,
        uids={"path": "pool.uids.npy", "sha256": "0" * 64, "count": 0}, shards=shards,
        source_fingerprint=hashlib.sha256(str(rows).encode()).hexdigest(), catalog={"path": "catalog"}, command=["bench"],
    )
    path = os.path.join(root, "pool.manifest.json")
    write_manifest(path, m)
    return path


def worker(rows: int, work: str, engine: str = "spark") -> dict:
    """Run in a fresh process: start Spark (engine "spark") or not ("in-process"), time the selection of
    three nested scales."""
    import shutil

    from laiontools.core.logs import setup_logging

    setup_logging()
    from laiontools.core.spark import spark_session
    from laiontools.stages import subsets as subsets_stage
    from laiontools.stages.subsets import SubsetsConfig

    manifest = os.path.join(work, f"pool-{rows}", "pool.manifest.json")
    out = os.path.join(work, f"out-{rows}-{engine}")
    shutil.rmtree(out, ignore_errors=True)
    factor = 1.5e-4 * rows / 1_000_000  # 1M rows -> 12k / 60k / 300k; grows with the catalog
    cfg = SubsetsConfig(pool=manifest, output=out, scales="80M,400M,2B", scale_factor=factor, seed=0, max_punsafe=0.5,
                        max_pwatermark=0.8, spark_above=rows)  # in process at every size asked for
    hwm_before = _hwm_kb()
    jvm: list[int] = []
    t0 = time.time()
    if engine == "in-process":
        t1 = t0
        res = subsets_stage.run(cfg).details
        t2 = time.time()
    else:
        conf = {"spark.driver.memory": "2g", "spark.ui.showConsoleProgress": "false"}
        with spark_session("local[2]", app_name="bench-subsets", conf=conf) as spark:
            t1 = time.time()
            res = subsets_stage.run(cfg, spark).details
            t2 = time.time()
            jvm = [_hwm_kb(p) for p in _java_children()]
    digest = hashlib.sha256()
    for r in res:
        with open(r["manifest"].replace("manifest.json", "uids.npy"), "rb") as f:
            digest.update(f.read())
    return {
        "rows": rows,
        "engine": engine,
        "selected": {r["scale"]: r["obtained"] for r in res},
        "uid_files_sha256": digest.hexdigest(),
        "spark_start_s": round(t1 - t0, 2),
        "selection_s": round(t2 - t1, 2),
        "end_to_end_s": round(t2 - t0, 2),
        "driver_python_peak_mb": round(_hwm_kb() / 1024, 1),
        "driver_python_peak_before_spark_mb": round(hwm_before / 1024, 1),
        "jvm_peak_mb": round(max(jvm) / 1024, 1) if jvm else None,
    }


def engine_args(rows: str, name: str, worker: Any) -> tuple[argparse.Namespace, str]:
    """The command line of an engine bench (--rows, --out, --work, --engines) and its work folder; in a
    worker process (--worker SIZE --engine E) runs ``worker(size, work, engine)``, prints its JSON, exits."""
    ap = argparse.ArgumentParser()
    ap.add_argument("--rows", default=rows, help="comma-separated catalog sizes")
    ap.add_argument("--out", default="bench-out")
    ap.add_argument("--work", default=None, help=f"folder for the synthetic pools (default: <out>/{name}-work)")
    ap.add_argument("--engines", default="spark,in-process", help="comma-separated: spark, in-process")
    ap.add_argument("--worker", type=int, default=None, help=argparse.SUPPRESS)
    ap.add_argument("--engine", default="spark", help=argparse.SUPPRESS)
    a = ap.parse_args()
    work = a.work or os.path.join(a.out, f"{name}-work")
    os.makedirs(work, exist_ok=True)
    os.makedirs(a.out, exist_ok=True)
    if a.worker is not None:
        print(json.dumps(worker(a.worker, work, a.engine)))
        sys.exit(0)
    return a, work


def run_workers(script: str, sizes: list[int], engines: list[str], work: str, out: str, name: str,
                make_pool: Any) -> list[dict] | None:
    """``make_pool(<work>/pool-<size>, size)`` for each size without one (in this process, so that the timed
    workers start clean), then ``script --worker <size> --work <work> --engine <engine>`` in a fresh process
    for every size and engine (so each one's peak memory is its own, and no master named: the engine is the
    worker's choice); the JSON line each prints last, in order, or None after printing the first failure's
    log (each run's stderr is kept as <out>/<name>-<size>-<engine>.log)."""
    for n in sizes:
        root = os.path.join(work, f"pool-{n}")
        if not os.path.exists(os.path.join(root, "pool.manifest.json")):
            t = time.time()
            make_pool(root, n)
            print(f"wrote a {n:,}-row pool in {time.time() - t:.1f}s", flush=True)
    results = []
    for n in sizes:
        for engine in engines:
            env = {**os.environ, "LAIONTOOLS_SPARK_LOG_LEVEL": "ERROR", "PYTHONUNBUFFERED": "1"}
            env.pop("LAIONTOOLS_SPARK_MASTER", None)
            p = subprocess.run([sys.executable, script, "--worker", str(n), "--work", work, "--engine", engine],
                               capture_output=True, text=True, env=env, check=False)
            with open(os.path.join(out, f"{name}-{n}-{engine}.log"), "w") as f:
                f.write(p.stderr)
            if p.returncode != 0:
                print(p.stderr[-3000:], file=sys.stderr)
                return None
            r = json.loads(p.stdout.strip().splitlines()[-1])
            results.append(r)
            print(json.dumps(r), flush=True)
    return results


def main() -> int:
    a, work = engine_args("1000000,10000000", "subsets", worker)
    sizes, engines = [int(float(x)) for x in a.rows.split(",")], a.engines.split(",")
    results = run_workers(__file__, sizes, engines, work, a.out, "subsets", write_catalog)
    if results is None:
        return 1
    for engine in engines:
        mine = [r for r in results if r["engine"] == engine]
        for r in mine:
            r["rows_ratio"] = r["rows"] / mine[0]["rows"]
            r["time_ratio"] = round(r["selection_s"] / mine[0]["selection_s"], 2)
            r["driver_mem_ratio"] = round(r["driver_python_peak_mb"] / mine[0]["driver_python_peak_mb"], 2)
    for n in sizes:
        by = {r["engine"]: r for r in results if r["rows"] == n}
        if len(by) == 2:
            by["in-process"]["spark_end_to_end_over_in_process"] = round(by["spark"]["end_to_end_s"] / by["in-process"]["end_to_end_s"], 2)
            by["in-process"]["same_uid_files_as_spark"] = by["spark"]["uid_files_sha256"] == by["in-process"]["uid_files_sha256"]
    cmd = "python bench/bench_subsets.py --rows " + a.rows + " --engines " + a.engines
    out = {"benchmark": "subsets selection", "command": cmd, "machine": f"{os.cpu_count()} cpus, Spark local[2]", "results": results}
    os.makedirs(a.out, exist_ok=True)
    with open(os.path.join(a.out, "subsets.json"), "w") as f:
        json.dump(out, f, indent=2)
    print(f"\n{'rows':>12} {'engine':>10} {'end to end s':>12} {'select s':>9} {'x time':>7} {'py peak MB':>11} {'x mem':>6} "
          f"{'JVM peak MB':>12} {'same files':>10}")
    for r in results:
        print(f"{r['rows']:>12,} {r['engine']:>10} {r['end_to_end_s']:>12.1f} {r['selection_s']:>9.1f} {r['time_ratio']:>7.2f} "
              f"{r['driver_python_peak_mb']:>11.0f} {r['driver_mem_ratio']:>6.2f} {r['jvm_peak_mb']!s:>12} "
              f"{r.get('same_uid_files_as_spark', '')!s:>10}")
    print(f"\ncommand: {cmd}   (figures in {os.path.join(a.out, 'subsets.json')})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
