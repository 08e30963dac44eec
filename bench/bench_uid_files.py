"""uid files out of Spark: contracts.uids.save_uids_spark against the two writers it replaced.

    .venv/bin/python bench/bench_uid_files.py [--rows 2000000] [--out bench-out]

Rows are generated inside Spark (uid = first 32 hex chars of sha2(id), tier = pmod(hash(id), 3)), so
the driver holds nothing but what each writer itself pulls in. Two cases, each run old then new,
twice, alternating (the machine is shared; the median of the two is reported):

* nested (subsets): three files, file s holds the uids of tier >= s. Baseline = subsets' former way:
  ``orderBy(uid)`` written as parquet, then the driver streams the sorted parts into the files.
* pool (download): one file of the distinct uids. Baseline = the former ``save_uids_spark``: range
  partition + sort, tasks convert Row objects one uid at a time and write raw runs, the driver
  concatenates them.

Both must produce byte-identical files (checked by sha256); ratios are old / new wall time (> 1: the
new writer is faster). Figures go to bench-out/uid_files.json.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import sys
import tempfile
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from laiontools.contracts.uids import (
    UID_DTYPE,
    hex_column_to_keys,
    keys_to_file_bytes,
    npy_header,
    save_uids_spark,
)


def _sha(path: str) -> str:
    with open(path, "rb") as f:
        return hashlib.sha256(f.read()).hexdigest()


def old_nested(df, paths: list[str], tmp: str) -> list[tuple[str, int]]:
    """subsets' former writer: Spark writes the uid-sorted rows as parquet, the driver streams them."""
    import pyarrow.parquet as pq

    (df.orderBy("uid").write.mode("overwrite").option("maxRecordsPerFile", 1_000_000)
       .option("parquet.block.size", 8 << 20).parquet(tmp))
    parts = sorted(os.path.join(tmp, f) for f in os.listdir(tmp)
                   if f.startswith("part-") and f.endswith(".parquet"))
    chunks: list[list[bytes]] = [[] for _ in paths]
    for part in parts:
        for batch in pq.ParquetFile(part).iter_batches(batch_size=65_536, columns=["uid", "tier"]):
            keys = hex_column_to_keys(batch.column(0))
            tier = batch.column(1).to_numpy(zero_copy_only=False)
            for s in range(len(paths)):
                sel = keys[tier >= s]
                if len(sel):
                    chunks[s].append(keys_to_file_bytes(sel))
    out = []
    for s, path in enumerate(paths):
        body = b"".join(chunks[s])
        data = npy_header(len(body) // 16) + body
        with open(path, "wb") as f:
            f.write(data)
        out.append((hashlib.sha256(data).hexdigest(), len(body) // 16))
    return out


def _old_partition(pid, rows, tmp_dir):
    # the former per-uid loop (contracts.uids.uids_to_array before the vectorized version)
    uids = [r[0] for r in rows]
    arr = np.empty(len(uids), dtype=UID_DTYPE)
    for i, u in enumerate(uids):
        arr[i] = (int(u[:16], 16), int(u[16:], 16))
    with open(f"{tmp_dir}/part-{pid:06d}.bin", "wb") as f:
        f.write(arr.tobytes())
    yield (pid, len(arr))


def old_pool(df, path: str, tmp: str) -> tuple[str, int]:
    """download's former writer: Row objects converted one uid at a time in the tasks."""
    os.makedirs(tmp, exist_ok=True)
    d = df.select("uid").where("uid IS NOT NULL").distinct()
    n = max(1, d.rdd.getNumPartitions())
    d = d.repartitionByRange(n, "uid").sortWithinPartitions("uid")
    counts = dict(d.rdd.mapPartitionsWithIndex(lambda pid, it: _old_partition(pid, it, tmp)).collect())
    total = sum(counts.values())
    h = hashlib.sha256()
    with open(path, "wb") as out:
        head = npy_header(total)
        out.write(head)
        h.update(head)
        for pid in sorted(counts):
            with open(f"{tmp}/part-{pid:06d}.bin", "rb") as f:
                b = f.read()
            out.write(b)
            h.update(b)
    return h.hexdigest(), total


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rows", type=int, default=2_000_000)
    ap.add_argument("--out", default="bench-out")
    a = ap.parse_args()
    from pyspark.sql import functions as F

    from laiontools.core.spark import spark_session

    work = tempfile.mkdtemp(prefix="bench-uids-")
    res: dict[str, dict[str, list[float]]] = {c: {"old": [], "new": []} for c in ("nested", "pool")}
    shas: dict[str, set[str]] = {"nested": set(), "pool": set()}
    try:
        with spark_session(master="local[2]", app_name="bench-uid-files") as spark:
            base = spark.range(a.rows, numPartitions=8).select(
                F.substring(F.sha2(F.col("id").cast("string"), 256), 1, 32).alias("uid"),
                F.pmod(F.hash("id"), F.lit(3)).cast("int").alias("tier"))
            base = base.persist()
            print(f"{base.count():,} rows generated", flush=True)
            for rep in range(2):
                for which in ("old", "new"):
                    d = os.path.join(work, f"{which}{rep}")
                    os.makedirs(d)
                    paths = [os.path.join(d, f"s{s}.npy") for s in range(3)]
                    t0 = time.perf_counter()
                    if which == "old":
                        got = old_nested(base, paths, os.path.join(d, "tmp"))
                    else:
                        got = save_uids_spark(base, "uid", paths, tier_col="tier", distinct=False)
                    res["nested"][which].append(time.perf_counter() - t0)
                    shas["nested"].add(tuple(sha for sha, _ in got))
                    took = res["nested"][which][-1]
                    print(f"nested {which}: {took:.1f} s, counts {[c for _, c in got]}", flush=True)
                    t0 = time.perf_counter()
                    pool_path = os.path.join(d, "pool.npy")
                    if which == "old":
                        got1 = old_pool(base, pool_path, os.path.join(d, "ptmp"))
                    else:
                        got1 = save_uids_spark(base, "uid", [pool_path])[0]
                    res["pool"][which].append(time.perf_counter() - t0)
                    shas["pool"].add(got1[0])
                    assert got1[0] == _sha(pool_path)
                    print(f"pool {which}: {res['pool'][which][-1]:.1f} s, {got1[1]:,} uids", flush=True)
                    shutil.rmtree(d)
            base.unpersist()
    finally:
        shutil.rmtree(work, ignore_errors=True)
    assert len(shas["nested"]) == 1 and len(shas["pool"]) == 1, f"outputs differ between writers: {shas}"
    summary = {}
    for case, r in res.items():
        old, new = float(np.median(r["old"])), float(np.median(r["new"]))
        summary[case] = {"old_s": r["old"], "new_s": r["new"], "ratio_old_over_new": old / new}
        print(f"{case}: old {old:.1f} s, new {new:.1f} s, old/new {old / new:.2f} (same bytes)")
    os.makedirs(a.out, exist_ok=True)
    with open(os.path.join(a.out, "uid_files.json"), "w") as f:
        json.dump({"rows": a.rows, "command": "python bench/bench_uid_files.py " + " ".join(sys.argv[1:]),
                   "load_avg": os.getloadavg(), **summary}, f, indent=1)


if __name__ == "__main__":
    main()
