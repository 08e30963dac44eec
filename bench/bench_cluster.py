"""Stages' wall time on a Spark standalone cluster of 1 worker vs 2 workers, both on 127.0.0.1.

    .venv/bin/python bench/bench_cluster.py [--samples 400] [--per-shard 50] [--repeats 1] [--out bench-out]

One synthetic source served by the synthetic web server on 127.0.0.1; for each cluster size (a master
and 1 or 2 workers of 1 core each, started fresh) the stages run through ``spark-submit jobs/<stage>.py``
exactly as a cluster user types it: download (source -> pool), subsets (two nested scales) and reshard
(the larger subset), verify, embed (lt-tiny, random init, one Spark task per shard on CPU), dedup
against the source's eval set (planted in the pool), semdedup and takedown (two uids and a url).
Reported: each stage's wall time (spark-submit start to exit,
JVM and Python start included), the speed-up 1 -> 2 workers, the machine's cores and load average.

Caveat: both workers run on this machine. Where it has 2 cores shared with other work (as where this
bench was written) a second worker adds no CPU, so the figure bounds the overhead of spreading a stage
over workers rather than showing cluster scaling. Figures go to bench-out/cluster.json.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import time
from pathlib import Path

STAGES = ["download", "subsets", "reshard", "verify", "embed", "dedup", "semdedup", "takedown"]


def run_stages(cluster_url: str, src: str, evalset: str, work: Path, settings: dict) -> dict[str, float]:
    """spark-submit every Spark stage (STAGES) on `cluster_url`; return seconds per stage."""
    from laiontools.contracts import layout
    from laiontools.testing.cluster import REPO, spark_submit

    conf = ["--master", cluster_url, "--executor-cores", "1", "--conf", "spark.executor.memory=512m", "--driver-memory", "1g"]
    s = settings
    pool = work / "pool"
    times: dict[str, float] = {}

    def timed(stage: str, args: list[str]) -> None:
        t = time.perf_counter()
        spark_submit([*conf, str(REPO / "jobs" / f"{stage}.py"), *args], cwd=work)
        times[stage] = round(time.perf_counter() - t, 2)

    timed("download", ["--input", src, "--output", str(pool), "--allow-networks", *s["allow_networks"],
                       "--number-sample-per-shard", str(s["number_sample_per_shard"]), "--shards-per-file", "1",
                       "--timeout", str(s["timeout"]), "--retries", str(s["retries"]), "--image-size", str(s["image_size"]),
                       "--thread-count", str(s["thread_count"])])
    from laiontools.contracts.manifest import read_manifest

    got = read_manifest(str(pool / layout.POOL_MANIFEST))["num_samples"]
    timed("subsets", ["--pool", str(pool / layout.POOL_MANIFEST), "--output", str(work / "subsets"),
                      "--scales", f"{got - 2},{got // 2}", "--seed", "0"])
    big = max((work / "subsets").glob("*.manifest.json"), key=lambda m: read_manifest(str(m))["num_samples"])
    timed("reshard", ["--manifest", str(big), "--output", str(work / "resharded"), "--shard-size", str(max(10, got // 8))])
    timed("verify", [str(pool / layout.POOL_MANIFEST)])  # under spark-submit verify runs on the cluster
    emb = str(work / "emb")
    timed("embed", ["--manifest", str(pool / layout.POOL_MANIFEST), "--output", emb, "--model", "lt-tiny",
                    "--batch-size", "32", "--num-workers", "0"])  # the Spark engine: the default under spark-submit
    timed("dedup", ["--embeddings", emb, "--evalset", f"glyphs={evalset}", "--output", str(work / "dedup"),
                    "--device", "cpu", "--threshold", "0.5"])
    timed("semdedup", ["--embeddings", emb, "--output", str(work / "semdedup"), "--clusters", "4", "--eps", "0.01",
                       "--gallery-groups", "0"])
    from laiontools.testing.removal import removal_list_for

    removal_list_for(str(pool / layout.CATALOG_DIR), 2, str(work / "takedown.txt"))
    timed("takedown", ["--pool", str(pool / layout.POOL_MANIFEST), "--list", str(work / "takedown.txt"),
                       "--reason", "bench", "--output", str(work / "takedown")])
    return times


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--samples", type=int, default=400)
    ap.add_argument("--per-shard", type=int, default=50)
    ap.add_argument("--repeats", type=int, default=1)
    ap.add_argument("--out", default="bench-out")
    ap.add_argument("--pin-cores", action="store_true",
                    help="worker i and its executors on core i only (taskset): 2 workers = 2 separate cores")
    ap.add_argument("--work", default=None, help="scratch folder (default: <out>/cluster-work)")
    a = ap.parse_args()
    from laiontools.synthetic import SyntheticWebServer, make_source
    from laiontools.testing import TEST_DOWNLOAD_SETTINGS
    from laiontools.testing.cluster import StandaloneCluster

    work = Path(a.work or os.path.join(a.out, "cluster-work")).resolve()
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    settings = {**TEST_DOWNLOAD_SETTINGS, "number_sample_per_shard": a.per_shard}
    load_before = [round(x, 1) for x in os.getloadavg()]
    results: dict[int, list[dict[str, float]]] = {1: [], 2: []}
    with SyntheticWebServer(str(work / "web" / "images")) as web:
        made = make_source(str(work / "web"), a.samples, web.base_url, evalset=True)
        src = made["source"]
        for r in range(a.repeats):
            for workers in (1, 2):  # alternated, so a change of load hits both sizes alike
                root = work / f"run{r}-w{workers}"
                root.mkdir()
                with StandaloneCluster(root, workers=workers, pin=a.pin_cores) as cluster:
                    t = run_stages(cluster.url, src, made["evalset"], root, settings)
                    t["tasks_per_worker"] = cluster.tasks_per_worker()
                    t["worker_cores"] = cluster.worker_cores()
                results[workers].append(t)
                print(json.dumps({"workers": workers, "repeat": r, **t}), flush=True)
                shutil.rmtree(root / "pool" / "shards", ignore_errors=True)
    stages = STAGES

    def med(xs: list[float]) -> float:
        return sorted(xs)[len(xs) // 2]

    table = {st: {"1_worker_s": med([x[st] for x in results[1]]), "2_workers_s": med([x[st] for x in results[2]])} for st in stages}
    for st in stages:
        table[st]["speedup"] = round(table[st]["1_worker_s"] / table[st]["2_workers_s"], 3)
    out = {"benchmark": "stages on a standalone cluster: 1 vs 2 workers (1 core each) on 127.0.0.1",
           "machine": f"{os.cpu_count()} cpus", "samples": a.samples, "per_shard": a.per_shard,
           "pinned": a.pin_cores,
           "loadavg_1_5_15": {"before": load_before, "after": [round(x, 1) for x in os.getloadavg()]},
           "runs": results, "stages": table,
           "command": ("python bench/bench_cluster.py " + " ".join(sys.argv[1:])).strip()}
    figures = Path(a.out, "cluster.json")
    figures.parent.mkdir(parents=True, exist_ok=True)
    figures.write_text(json.dumps(out, indent=2))
    lines = ["", f"{'stage':>9} {'1 worker s':>11} {'2 workers s':>12} {'speed-up':>9}"]
    lines += [f"{st:>9} {t['1_worker_s']:>11.1f} {t['2_workers_s']:>12.1f} {t['speedup']:>9.2f}" for st, t in table.items()]
    lines += [f"load average before {load_before}, after {out['loadavg_1_5_15']['after']} on {os.cpu_count()} cpus",
              "", f"command: {out['command']}   (figures in {figures})"]
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
