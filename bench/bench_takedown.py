"""Takedown wall time against a plain copy of the pool's shards, same disk, same run.

    .venv/bin/python bench/bench_takedown.py [--shards 8] [--scale-up 4] [--per-shard 250] [--kb 40] [--hit-shards 2] [--out bench-out]

Builds the synthetic pool of bench_reshard.py (webdataset tars of incompressible ~KB "jpg" members + txt +
json, a catalog with byte spans, a manifest), then times, alternating, on Spark local[2] (session started
before timing):

* copy:          every shard read and written to another folder, fsync'd, one after another: what a
                 takedown that copied the pool (instead of referencing untouched shards) would cost at least;
* takedown uid:  `takedown.run` with a list of uids, one sample in each of --hit-shards shards: matched on
                 the catalog alone, only those shards rewritten, the rest referenced;
* takedown sha256: a list of stored-content sha256 hitting the same samples: every shard is read and
                 hashed (content entries need the bytes), the same shards rewritten.

Reported per pool size (--shards, then --scale-up times more): seconds, takedown's own phases (catalog
match + rewrite, content scan, shard rewrite) and the ratio takedown_s / copy_s per case (lower is better;
< 1: the takedown costs less than copying the pool's shards); and what the larger pool costs more in each
case. Figures go to <out>/takedown.json.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import sys
import tarfile
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))


def run_size(spark, root: str, shards: int, per_shard: int, kb: int, hit_shards: int, repeats: int) -> dict:
    """Build a pool of `shards` shards under `root` and time copy / takedown uid / takedown sha256 on it."""
    from bench_reshard import build_pool, sequential_copy

    from laiontools.stages import takedown
    from laiontools.stages.takedown import TakedownConfig

    shutil.rmtree(root, ignore_errors=True)
    os.makedirs(root)
    pool_root = os.path.join(root, "pool")
    manifest, total = build_pool(pool_root, shards, per_shard, kb)
    uids, shas = [], []
    step = max(1, shards // max(1, hit_shards))
    for s in range(0, shards, step)[:hit_shards]:
        with tarfile.open(os.path.join(pool_root, "shards", f"{s:05d}.tar")) as tf:
            members = {ti.name: tf.extractfile(ti).read() for ti in tf}
        key = f"{s:05d}{0:04d}"
        uids.append(json.loads(members[f"{key}.json"])["uid"])
        shas.append(hashlib.sha256(members[f"{key}.jpg"]).hexdigest())
    lists = {"uid": "".join(f"uid {u}\n" for u in uids), "sha256": "".join(f"sha256 {h}\n" for h in shas)}
    for kind, text in lists.items():
        with open(os.path.join(root, f"{kind}.txt"), "w") as f:
            f.write(text)
    res: dict[str, list[float]] = {"copy": [], "uid": [], "sha256": []}
    phases: dict[str, dict] = {}
    for r in range(repeats):
        res["copy"].append(sequential_copy(pool_root, os.path.join(root, "copy")))
        for kind in lists:
            out = os.path.join(root, f"new-{kind}-{r}")
            t = time.perf_counter()
            out_res = takedown.run(TakedownConfig(pool=manifest, list_file=os.path.join(root, f"{kind}.txt"), reason="bench",
                                                  output=out), spark)
            res[kind].append(time.perf_counter() - t)
            assert out_res.counts["removed"] == hit_shards and out_res.counts["shards_rewritten"] == hit_shards
            phases[kind] = out_res.details["timings"]
            shutil.rmtree(out)
    shutil.rmtree(os.path.join(root, "copy"), ignore_errors=True)
    best = {k: min(v) for k, v in res.items()}
    return {"shards": shards, "samples": shards * per_shard, "bytes": total, "seconds": res, "best": best,
            "phases_last_run": phases, "ratio_vs_copy": {k: round(best[k] / best["copy"], 2) for k in ("uid", "sha256")},
            "copy_mb_s": round(total / 1e6 / best["copy"], 1)}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--shards", type=int, default=8)
    ap.add_argument("--scale-up", type=int, default=4, help="also run a pool this many times larger (1: one size)")
    ap.add_argument("--per-shard", type=int, default=250)
    ap.add_argument("--kb", type=int, default=40)
    ap.add_argument("--hit-shards", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--out", default="bench-out")
    args = ap.parse_args()

    from laiontools.core.spark import spark_session

    sizes = [args.shards] + ([args.shards * args.scale_up] if args.scale_up > 1 else [])
    runs = []
    with spark_session("local[2]", app_name="bench-takedown") as spark:
        for n in sizes:
            runs.append(run_size(spark, os.path.abspath(os.path.join(args.out, "takedown")), n, args.per_shard, args.kb,
                                 args.hit_shards, args.repeats))
    report = {"hit_shards": args.hit_shards, "runs": runs, "load_average": os.getloadavg()}
    if len(runs) == 2:  # what the larger pool costs more: copy grows with the bytes, takedown with the catalog
        a, b = runs
        report["extra_seconds"] = {k: round(b["best"][k] - a["best"][k], 2) for k in ("copy", "uid", "sha256")}
    shutil.rmtree(os.path.join(args.out, "takedown"), ignore_errors=True)
    with open(os.path.join(args.out, "takedown.json"), "w") as f:
        json.dump(report, f, indent=2)
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
