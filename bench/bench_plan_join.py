"""What reshard's plan shuffles when it picks a subset's rows out of a pool's catalog on Spark.

Above 16M uids (``contracts.uids.MEMBER_UDF_MAX_UIDS``: every 400M / 2B subset) the plan is a sort-merge
join of the catalog's success rows with the subset's uid file read by tasks (``keep_members``); below, a
UDF that holds the file in every Python worker filters the rows with no shuffle. This benchmark runs the
front of the plan both ways on the same synthetic catalog (LAION-like columns: 32-hex uid, status, shard
"00012/00345", 9-digit key, span offset/length, span sha256) and a subset of a given fraction, and reports
from Spark's own stage figures (its REST API) the shuffle bytes per catalog row and per subset uid, the
hash exchanges of the plan (two, one per side of the join: the group-by uid after it reuses its partitioning), and the wall time of the
join against the UDF measured in the same run (the baseline). Those per-row bytes are what docs/scale.md
multiplies out for 2B rows.

    .venv/bin/python bench/bench_plan_join.py --rows 2000000 --fraction 0.2 --out bench-out
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
import urllib.request

FILE_ROWS = 1_000_000


def write_catalog(root: str, rows: int, fraction: float) -> tuple[str, str, int]:
    """catalog/part-*.parquet of `rows` rows (90% success) and a uid file of `fraction` of the success uids."""
    import numpy as np
    import pyarrow as pa
    import pyarrow.parquet as pq

    from laiontools.contracts import schema as C
    from laiontools.contracts.uids import save_uids, uids_to_array
    from laiontools.core.storage import PARQUET_WRITE

    cat = os.path.join(root, "catalog")
    os.makedirs(cat, exist_ok=True)
    rng = np.random.default_rng(0)
    chosen = []
    for part, start in enumerate(range(0, rows, FILE_ROWS)):
        n = min(FILE_ROWS, rows - start)
        raw = rng.integers(0, 2**63, size=(n, 2), dtype=np.int64).astype(">u8").tobytes().hex()
        uids = [raw[i * 32 : (i + 1) * 32] for i in range(n)]
        sha = rng.integers(0, 2**63, size=(n, 4), dtype=np.int64).astype(">u8").tobytes().hex()
        ok = rng.random(n) < 0.9
        shard_no = (start + np.arange(n)) // 10_000
        t = pa.table({
            C.UID: pa.array(uids), C.STATUS: pa.array(np.where(ok, C.STATUS_SUCCESS, C.STATUS_FAILED_DOWNLOAD)),
            C.SHARD: pa.array([f"{s // 1000:05d}/{s:05d}" for s in shard_no]),
            C.KEY: pa.array([f"{k:09d}" for k in start + np.arange(n)]),
            C.TAR_OFFSET: pa.array(rng.integers(0, 1 << 30, n)), C.TAR_LENGTH: pa.array(rng.integers(20_000, 60_000, n)),
            C.TAR_SHA256: pa.array([sha[i * 64 : (i + 1) * 64] for i in range(n)]),
        })
        pq.write_table(t, os.path.join(cat, f"part-{part:05d}.parquet"), **PARQUET_WRITE)  # as download writes it
        pick = ok & (rng.random(n) < fraction / 0.9)
        chosen.append(uids_to_array([u for u, p in zip(uids, pick) if p]))
    uid_path = os.path.join(root, "subset.uids.npy")
    _, count = save_uids(uid_path, np.concatenate(chosen))
    return cat, uid_path, count


def stage_figures(spark, since: int) -> list[dict]:
    url = f"{spark.sparkContext.uiWebUrl}/api/v1/applications/{spark.sparkContext.applicationId}/stages"
    with urllib.request.urlopen(url) as r:
        stages = json.load(r)
    return [s for s in stages if s["stageId"] >= since and s["status"] == "COMPLETE"]


def run(spark, cat: str, uid_path: str, how: str) -> dict:
    """The front of reshard's Spark plan (laiontools/stages/reshard.py, _run_spark): the catalog's success
    rows with the plan's columns, the subset's by keep_members, one row per uid by min(struct)."""
    from pyspark.sql import functions as F

    from laiontools.contracts import schema as C
    from laiontools.contracts import uids as uids_mod

    uids_mod.MEMBER_UDF_MAX_UIDS = 0 if how == "join" else 1 << 40
    before = max([s["stageId"] for s in stage_figures(spark, 0)] or [-1]) + 1
    df = spark.read.parquet(cat).select(C.UID, C.STATUS, C.SHARD, C.KEY, C.TAR_OFFSET, C.TAR_LENGTH, C.TAR_SHA256)
    rows = (uids_mod.keep_members(df.filter(F.col(C.STATUS) == C.STATUS_SUCCESS), C.UID, uid_path)
            .groupBy(C.UID).agg(F.min(F.struct(C.SHARD, C.KEY, C.TAR_OFFSET, C.TAR_LENGTH, C.TAR_SHA256)).alias("s")))
    plan = rows._jdf.queryExecution().executedPlan().toString()
    t = time.perf_counter()
    rows.write.format("noop").mode("overwrite").save()
    wall = time.perf_counter() - t
    time.sleep(1.0)  # the status store records the last stage a moment after the job
    stages = stage_figures(spark, before)
    return {"how": how, "wall_s": round(wall, 2), "broadcast": "Broadcast" in plan, "sort_merge_join": "SortMergeJoin" in plan,
            "hash_exchanges": plan.count("Exchange hashpartitioning"),
            "stages": [{"id": s["stageId"], "shuffle_write_bytes": s["shuffleWriteBytes"], "shuffle_write_records": s["shuffleWriteRecords"],
                        "input_records": s["inputRecords"]} for s in sorted(stages, key=lambda s: s["stageId"])]}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rows", type=int, default=2_000_000)
    ap.add_argument("--fraction", type=float, default=0.2)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--out", default="bench-out")
    ap.add_argument("--work", default=None)
    a = ap.parse_args()
    from pyspark.sql import SparkSession

    from laiontools.contracts import schema as C

    work = a.work or os.path.join(a.out, "plan-join-work")
    os.makedirs(a.out, exist_ok=True)
    t = time.perf_counter()
    cat, uid_path, count = write_catalog(os.path.join(work, f"cat-{a.rows}"), a.rows, a.fraction)
    build_s = time.perf_counter() - t
    os.environ.setdefault("PYSPARK_PYTHON", sys.executable)
    spark = (SparkSession.builder.master("local[2]").appName("bench-plan-join").config("spark.ui.enabled", "true")
             .config("spark.ui.port", "0").config("spark.ui.showConsoleProgress", "false")
             .config("spark.sql.adaptive.enabled", "false").getOrCreate())
    spark.sparkContext.setLogLevel("ERROR")
    success = spark.read.parquet(cat).filter(f"{C.STATUS} = '{C.STATUS_SUCCESS}'").count()
    for how in ("udf", "join"):  # warm-up, not recorded: the JVM's compiler, the Python workers
        run(spark, cat, uid_path, how)
    runs = []
    for r in range(a.repeats):
        for how in ("udf", "join"):  # alternated: the machine is shared
            runs.append({"round": r, **run(spark, cat, uid_path, how)})
            print(json.dumps(runs[-1]), flush=True)
    spark.stop()

    def med(xs: list[float]) -> float:
        return sorted(xs)[len(xs) // 2]

    join = [x for x in runs if x["how"] == "join"]
    by_records = {}
    for st in join[-1]["stages"]:
        by_records[st["shuffle_write_records"]] = st["shuffle_write_bytes"]
    cat_bytes, uid_bytes = by_records.get(success), by_records.get(count)
    out = {
        "benchmark": "reshard plan: subset rows by a join with the uid file vs the membership UDF", "rows": a.rows,
        "success_rows": success, "subset_uids": count, "build_s": round(build_s, 1), "runs": runs,
        "shuffle_bytes_per_catalog_row": round(cat_bytes / success, 1) if cat_bytes else None,
        "shuffle_bytes_per_subset_uid": round(uid_bytes / count, 1) if uid_bytes else None,
        # the UDF path shuffles too: the subset's rows, for the group-by uid
        "udf_shuffle_bytes_per_subset_row": round(max(st["shuffle_write_bytes"] for st in runs[0]["stages"]) / count, 1),
        "join_hash_exchanges": join[-1]["hash_exchanges"],  # 2: one per side of the join, none after it
        "join_wall_over_udf_wall": round(med([x["wall_s"] for x in join]) / med([x["wall_s"] for x in runs if x["how"] == "udf"]), 2),
        "loadavg": list(os.getloadavg()),
        "command": "python " + " ".join(sys.argv),
    }
    path = os.path.join(a.out, "plan_join.json")
    with open(path, "w") as f:
        json.dump(out, f, indent=2)
    print(json.dumps({k: v for k, v in out.items() if k != "runs"}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
