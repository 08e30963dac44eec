"""Takedown of a catalog-only list over synthetic pools: wall time and peak memory on Spark and in process.

    .venv/bin/python bench/bench_takedown_engines.py [--rows 100000,1000000] [--engines spark,in-process] [--out bench-out]

For each size a synthetic pool is written once: a catalog with every column of
``schemas/catalog.schema.json`` (URLs, captions, hashes and spans of realistic lengths; 90 % success
rows, 1M rows per parquet file), its pool manifest and uid file. The removal list names what a
takedown request names most often and what needs no image read: 1,000 uids and one domain, all of
catalog rows without a stored sample (failed downloads), so no shard is rewritten and what is timed is
the catalog's part: read, match, the new catalog written sorted by (uid, status), its uid file.

Each (size, engine) runs in a fresh process, so its peak memory is its own: ``in-process`` (the default
below ``--spark-above`` catalog rows: the catalog read whole with pyarrow, no JVM) and ``spark``
(local[2]; its end to end is the session's start plus the takedown). Both new pools are compared: the
uid files byte for byte, the catalogs row for row. Figures go to <out>/takedown_engines.json.
"""

from __future__ import annotations

import hashlib
import json
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from bench_subsets import _hwm_kb, _java_children, engine_args, run_workers

ROWS_PER_FILE = 1_000_000
NUM_SHARDS = 100
LISTED_UIDS = 1000


def write_pool(root: str, rows: int) -> None:
    """A pool folder without tars: catalog/, pool.uids.npy, pool.manifest.json, and list.txt."""
    import numpy as np
    import pyarrow as pa
    import pyarrow.parquet as pq

    from laiontools.contracts import schema as C
    from laiontools.contracts.manifest import new_manifest, write_manifest
    from laiontools.contracts.uids import arrow_to_array, save_uids
    from laiontools.core.storage import PARQUET_WRITE

    cat = os.path.join(root, "catalog")
    os.makedirs(cat, exist_ok=True)
    rng = np.random.default_rng(0)
    uid_hex = rng.integers(0, 2**63, size=(rows, 2), dtype=np.int64).astype(">u8").tobytes().hex()
    uids = np.array([uid_hex[i * 32:(i + 1) * 32] for i in range(rows)])
    uids.sort()
    hosts = np.array([f"img{h}.example{h % 97}.com" for h in range(500)])
    host = hosts[rng.integers(0, len(hosts), rows)]
    listed_host = "img7.example7.com"  # a host none of whose images downloaded: the domain entry names its rows
    ok = (rng.random(rows) < 0.9) & (host != listed_host)
    hexes = rng.integers(0, 2**63, size=(rows, 4), dtype=np.int64).astype(">u8").tobytes().hex()
    sha = np.array([hexes[i * 64:(i + 1) * 64] for i in range(rows)])
    shard = rng.integers(0, NUM_SHARDS, rows)
    n_ok = int(ok.sum())
    success_uids = []
    for part, lo in enumerate(range(0, rows, ROWS_PER_FILE)):
        hi = min(rows, lo + ROWS_PER_FILE)
        o = ok[lo:hi]
        n = hi - lo
        idx = np.arange(lo, hi)
        t = pa.table({
            C.UID: pa.array(uids[lo:hi]), C.SOURCE_ID: pa.array(idx.astype(str)),
            C.URL: pa.array([f"https://{h}/images/{i:09d}/photo-{i % 977}.jpg" for h, i in zip(host[lo:hi], idx)]),
            C.CAPTION: pa.array(["a photo of " + "x" * int(k) for k in rng.integers(10, 80, n)]),
            C.STATUS: pa.array(np.where(o, C.STATUS_SUCCESS, C.STATUS_FAILED_DOWNLOAD)),
            C.ERROR: pa.array([None if v else "HTTP Error 404: Not Found" for v in o], pa.string()),
            C.SHARD: pa.array([f"{s:05d}" if v else None for s, v in zip(shard[lo:hi], o)], pa.string()),
            C.KEY: pa.array([f"{s:05d}{i % 10000:04d}" if v else None for s, i, v in zip(shard[lo:hi], idx, o)], pa.string()),
            C.WIDTH: pa.array(np.where(o, 256, None).tolist(), pa.int64()),
            C.HEIGHT: pa.array(np.where(o, 256, None).tolist(), pa.int64()),
            C.ORIGINAL_WIDTH: pa.array(np.where(o, rng.integers(64, 2048, n), None).tolist(), pa.int64()),
            C.ORIGINAL_HEIGHT: pa.array(np.where(o, rng.integers(64, 2048, n), None).tolist(), pa.int64()),
            C.SHA256: pa.array([s if v else None for s, v in zip(sha[lo:hi], o)], pa.string()),
            C.TAR_OFFSET: pa.array(np.where(o, idx * 20480, None).tolist(), pa.int64()),
            C.TAR_LENGTH: pa.array(np.where(o, 20480, None).tolist(), pa.int64()),
            C.TAR_SHA256: pa.array([s[::-1] if v else None for s, v in zip(sha[lo:hi], o)], pa.string()),
            "similarity": pa.array(rng.random(n)), C.PUNSAFE: pa.array(rng.random(n)), C.PWATERMARK: pa.array(rng.random(n)),
            "license": pa.array([None] * n, pa.string()), "nsfw": pa.array(["UNLIKELY"] * n),
        })
        pq.write_table(t, os.path.join(cat, f"part-{part:05d}.parquet"), **PARQUET_WRITE)  # as download writes it
        success_uids.append(arrow_to_array(t.filter(pa.array(o))[C.UID].combine_chunks()))
    usha, count = save_uids(os.path.join(root, "pool.uids.npy"), np.concatenate(success_uids))
    assert count == n_ok
    shards = [{"path": f"shards/{s:05d}.tar", "num_samples": 0, "bytes": 0, "sha256": "0" * 64} for s in range(NUM_SHARDS)]
    m = new_manifest(
        name=f"synthetic-{rows}", kind="pool", num_samples=n_ok, target_samples=None,
        uids={"path": "pool.uids.npy", "sha256": usha, "count": n_ok}, shards=shards,
        source_fingerprint=hashlib.sha256(str(rows).encode()).hexdigest(), catalog={"path": "catalog", "num_rows": rows},
        command=["bench"],
    )
    write_manifest(os.path.join(root, "pool.manifest.json"), m)
    failed = np.flatnonzero(~ok & (host != listed_host))
    listed = rng.choice(failed, size=min(LISTED_UIDS, len(failed)), replace=False)
    with open(os.path.join(root, "list.txt"), "w") as f:
        f.write("".join(f"uid {uids[i]}\n" for i in sorted(listed)) + f"domain {listed_host}\n")


def worker(rows: int, work: str, engine: str) -> dict:
    """In a fresh process: start Spark (engine "spark") or not ("in-process"), time the takedown."""
    import shutil

    from laiontools.core.logs import setup_logging

    setup_logging()
    from laiontools.core.spark import spark_session
    from laiontools.stages import takedown as takedown_stage
    from laiontools.stages.takedown import TakedownConfig

    root = os.path.join(work, f"pool-{rows}")
    out = os.path.join(work, f"out-{rows}-{engine}")
    shutil.rmtree(out, ignore_errors=True)
    cfg = TakedownConfig(pool=os.path.join(root, "pool.manifest.json"), list_file=os.path.join(root, "list.txt"),
                         reason="bench", output=out, spark_above=rows)  # in process at every size asked for
    jvm: list[int] = []
    t0 = time.time()
    if engine == "in-process":
        t1 = t0
        res = takedown_stage.run(cfg)
        t2 = time.time()
    else:
        conf = {"spark.driver.memory": "2g", "spark.ui.showConsoleProgress": "false"}
        with spark_session("local[2]", app_name="bench-takedown", conf=conf) as spark:
            t1 = time.time()
            res = takedown_stage.run(cfg, spark)
            t2 = time.time()
            jvm = [_hwm_kb(p) for p in _java_children()]
    with open(os.path.join(out, "pool.uids.npy"), "rb") as f:
        uid_sha = hashlib.sha256(f.read()).hexdigest()
    return {
        "rows": rows, "engine": engine, "catalog_rows_marked": res.counts["catalog_rows_marked"],
        "shards_rewritten": res.counts["shards_rewritten"], "uid_file_sha256": uid_sha,
        "spark_start_s": round(t1 - t0, 2), "takedown_s": round(t2 - t1, 2), "end_to_end_s": round(t2 - t0, 2),
        "python_peak_mb": round(_hwm_kb() / 1024, 1), "jvm_peak_mb": round(max(jvm) / 1024, 1) if jvm else None,
    }


def same_catalogs(a: str, b: str) -> bool:
    import pyarrow.parquet as pq

    order = [("uid", "ascending"), ("status", "ascending")]
    return pq.read_table(a).sort_by(order).equals(pq.read_table(b).sort_by(order))


def main() -> int:
    a, work = engine_args("100000,1000000", "takedown", worker)
    sizes, engines = [int(float(x)) for x in a.rows.split(",")], a.engines.split(",")
    results = run_workers(__file__, sizes, engines, work, a.out, "takedown-engines", write_pool)
    if results is None:
        return 1
    for n in sizes:
        by = {r["engine"]: r for r in results if r["rows"] == n}
        if len(by) == 2:
            by["in-process"]["spark_end_to_end_over_in_process"] = round(by["spark"]["end_to_end_s"] / by["in-process"]["end_to_end_s"], 2)
            by["in-process"]["same_uid_file_as_spark"] = by["spark"]["uid_file_sha256"] == by["in-process"]["uid_file_sha256"]
            by["in-process"]["same_catalog_as_spark"] = same_catalogs(
                os.path.join(work, f"out-{n}-spark", "catalog"), os.path.join(work, f"out-{n}-in-process", "catalog"))
    cmd = "python bench/bench_takedown_engines.py --rows " + a.rows + " --engines " + a.engines
    with open(os.path.join(a.out, "takedown_engines.json"), "w") as f:
        json.dump({"benchmark": "takedown, catalog-only list", "command": cmd, "machine": f"{os.cpu_count()} cpus, Spark local[2]",
                   "results": results}, f, indent=2)
    print(f"\n{'rows':>10} {'engine':>10} {'end to end s':>12} {'spark start s':>13} {'py peak MB':>10} {'JVM peak MB':>11} "
          f"{'rows marked':>11} {'Spark / in process':>18} {'same files':>10}")
    for r in results:
        same = r.get("same_uid_file_as_spark", "") and r.get("same_catalog_as_spark", "")
        print(f"{r['rows']:>10,} {r['engine']:>10} {r['end_to_end_s']:>12.2f} {r['spark_start_s']:>13.2f} {r['python_peak_mb']:>10.0f} "
              f"{r['jvm_peak_mb']!s:>11} {r['catalog_rows_marked']:>11} {r.get('spark_end_to_end_over_in_process', '')!s:>18} {same!s:>10}")
    print(f"\ncommand: {cmd}   (figures in {os.path.join(a.out, 'takedown_engines.json')})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
