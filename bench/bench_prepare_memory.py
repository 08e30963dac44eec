"""Benchmark: peak driver memory of prepare at 1M and 10M input rows (it must not grow with the input).

For each size, synthetic LAION-400M-format parquet metadata (URLs on ``images.example.com``; prepare
touches no network) is written once (1M-row files, cached in ``bench-out/prepare-mem-input/`` and
hard-linked into one folder per size), then ``laiontools.stages.prepare.run`` runs in a fresh
process on Spark ``local[2]``. This process polls, every 0.25 s, ``/proc/<pid>/status`` of that
process and of its descendants and records:

* ``python_driver_hwm_mb``: the Python driver's peak RSS (VmHWM);
* ``jvm_driver_hwm_mb``: the JVM driver's peak RSS (VmHWM of the ``java`` child; in local mode it
  also runs the executors, so its heap is bounded by ``spark.driver.memory``, 2g by default);
* ``python_workers_max_rss_mb``: the largest RSS seen in a PySpark worker (executor side, for reference).

    .venv/bin/python bench/bench_prepare_memory.py                          # 1M and 10M rows
    .venv/bin/python bench/bench_prepare_memory.py --sizes 1000000,3000000  # what fits a busy 2-core box

Writes ``bench-out/prepare_memory.json``.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import shutil
import subprocess
import sys
import time
from pathlib import Path

from laiontools.testing import procs

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
FILE_ROWS = 1_000_000


def _write_file(path: str, start: int, rows: int) -> None:
    import numpy as np
    import pyarrow as pa
    import pyarrow.parquet as pq

    tmp = f"{path}.tmp-{os.getpid()}"
    rng = np.random.default_rng(start)
    words = np.array(["red", "river", "cat", "city", "night", "old", "blue", "tree", "car", "house", "dog", "sun"])
    with pq.ParquetWriter(tmp, pa.schema([
        ("SAMPLE_ID", pa.int64()), ("URL", pa.string()), ("TEXT", pa.string()), ("HEIGHT", pa.int64()),
        ("WIDTH", pa.int64()), ("LICENSE", pa.string()), ("NSFW", pa.string()), ("similarity", pa.float64()),
    ])) as w:
        for s in range(start, start + rows, 100_000):
            n = min(100_000, start + rows - s)
            ids = np.arange(s, s + n)
            picks = words[rng.integers(0, len(words), size=(n, 3))]
            w.write_table(pa.table({
                "SAMPLE_ID": ids,
                "URL": [f"http://images.example.com/{i % 997:03d}/{i:09d}.jpg" for i in ids],
                "TEXT": [f"a {a} {b} {c} photo number {i}" for (a, b, c), i in zip(picks, ids)],
                "HEIGHT": rng.integers(200, 1200, n), "WIDTH": rng.integers(200, 1200, n),
                "LICENSE": ["?"] * n, "NSFW": ["UNLIKELY"] * n, "similarity": rng.uniform(0.28, 0.45, n),
            }))
    os.replace(tmp, path)


def make_input(out_dir: str, rows: int) -> str:
    """A folder of `rows` rows: hard links to cached 1M-row files (the last one cut to size if needed)."""
    cache = os.path.join(out_dir, "prepare-mem-input")
    os.makedirs(cache, exist_ok=True)
    d = os.path.join(out_dir, f"prepare-mem-{rows}")
    shutil.rmtree(d, ignore_errors=True)
    os.makedirs(d)
    for k, start in enumerate(range(0, rows, FILE_ROWS)):
        n = min(FILE_ROWS, rows - start)
        f = os.path.join(cache, f"part-{k:05d}-{n}.parquet")
        if not os.path.exists(f):
            t = time.time()
            _write_file(f, start, n)
            print(f"  wrote {f} ({n} rows) in {time.time() - t:.0f}s", flush=True)
        os.link(f, os.path.join(d, f"part-{k:05d}.parquet"))
    return d


def measure(rows: int, input_dir: str, out_dir: str) -> dict:
    """Run prepare on `input_dir` in a fresh process; poll peak RSS of the driver, the JVM and the workers."""
    output = os.path.join(out_dir, f"prepare-mem-out-{rows}")
    shutil.rmtree(output, ignore_errors=True)
    cmd = [sys.executable, os.path.abspath(__file__), "--_run", input_dir, output]
    env = {**os.environ, "PYSPARK_PYTHON": sys.executable, "PYSPARK_DRIVER_PYTHON": sys.executable}
    log_path = os.path.join(out_dir, f"prepare-mem-{rows}.log")
    t = time.time()
    with open(log_path, "w") as log:
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env, cwd=ROOT)
        py_hwm = jvm_hwm = worker_rss = 0
        jvm_pid = None
        while proc.poll() is None:
            py_hwm = max(py_hwm, procs.memory_kb(proc.pid, "VmHWM"))
            for pid in procs.descendants(proc.pid):
                st = procs.status(pid)
                if st.get("Name") == "java":
                    jvm_pid = pid
                    jvm_hwm = max(jvm_hwm, procs.memory_kb(pid, "VmHWM"))
                elif st.get("Name", "").startswith("python"):
                    worker_rss = max(worker_rss, procs.memory_kb(pid, "VmRSS"))
            time.sleep(0.25)
    wall = time.time() - t
    if proc.returncode != 0:
        raise SystemExit(f"prepare on {rows} rows failed ({proc.returncode}); log {log_path}:\n"
                         + Path(log_path).read_text()[-3000:])
    with open(os.path.join(output, "prepared", "stats.json")) as f:
        stats = json.load(f)
    row = {"rows": rows, "rows_in": stats["rows_in"], "accepted": stats["accepted"], "rejected": stats["rejected"],
           "wall_seconds": round(wall, 1), "python_driver_hwm_mb": round(py_hwm / 1024, 1),
           "jvm_driver_hwm_mb": round(jvm_hwm / 1024, 1), "jvm_found": jvm_pid is not None,
           "python_workers_max_rss_mb": round(worker_rss / 1024, 1),
           "input_mb": round(sum(os.path.getsize(os.path.join(input_dir, f)) for f in os.listdir(input_dir)) / 1e6, 1)}
    print(f"[{rows} rows] {wall:.0f}s  python driver peak {row['python_driver_hwm_mb']} MB, JVM driver peak "
          f"{row['jvm_driver_hwm_mb']} MB, largest python worker {row['python_workers_max_rss_mb']} MB", flush=True)
    shutil.rmtree(output, ignore_errors=True)
    return row


def _run(input_dir: str, output: str) -> None:
    """Child: prepare only, on local[2], with the settings a download would use."""
    from laiontools.core.spark import spark_session
    from laiontools.stages import prepare as prepare_stage
    from laiontools.stages.prepare import PrepareConfig

    cfg = PrepareConfig(input=input_dir, output=output)
    with spark_session("local[2]", app_name="bench-prepare-memory") as spark:
        prepare_stage.run(cfg, spark)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--sizes", default="1000000,10000000", help="comma-separated input row counts")
    p.add_argument("--out", default=os.path.join(ROOT, "bench-out"))
    p.add_argument("--_run", dest="run", nargs=2, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.run:
        return _run(*args.run)
    sizes = [int(s) for s in args.sizes.split(",")]
    os.makedirs(args.out, exist_ok=True)
    res = {"sizes": sizes, "spark_master": "local[2]", "cpu_count": os.cpu_count(),
           "driver_memory": os.environ.get("LAIONTOOLS_DRIVER_MEMORY", "2g"), "runs": []}
    with open("/proc/loadavg") as f:
        res["loadavg_start"] = [float(x) for x in f.read().split()[:3]]
    for n in sizes:
        print(f"input of {n} rows", flush=True)
        res["runs"].append(measure(n, make_input(args.out, n), args.out))
    with open("/proc/loadavg") as f:
        res["loadavg_end"] = [float(x) for x in f.read().split()[:3]]
    first, last = res["runs"][0], res["runs"][-1]
    res["growth"] = {k: round(last[k] / first[k], 3) if first[k] else None
                     for k in ("python_driver_hwm_mb", "jvm_driver_hwm_mb")}
    res["command"] = " ".join(shlex.quote(a) for a in [".venv/bin/python", "bench/bench_prepare_memory.py", *sys.argv[1:]])
    with open(os.path.join(args.out, "prepare_memory.json"), "w") as f:
        json.dump(res, f, indent=2)

    from laiontools.core.report import table

    cols = ["rows", "wall_seconds", "input_mb", "python_driver_hwm_mb", "jvm_driver_hwm_mb", "python_workers_max_rss_mb"]
    print()
    print(table([{c: r[c] for c in cols} for r in res["runs"]], cols))
    print(f"\npeak growth {first['rows']} -> {last['rows']} rows: {res['growth']}")
    print(f"load average start {res['loadavg_start']} end {res['loadavg_end']}")
    print(f"wrote {os.path.join(args.out, 'prepare_memory.json')}\ncommand: {res['command']}")


if __name__ == "__main__":
    main()
