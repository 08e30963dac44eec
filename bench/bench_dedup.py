"""Dedup search throughput: our Spark search vs bare faiss on the same index and vectors, same run.

Writes random L2-normalized float16 pool vectors in the embed layout (img_emb/<id>.npy, meta/<id>.parquet
+ marker, model.json), builds one exact inner-product index over random "evaluation" vectors, then:

* baseline: bare ``index.search`` over every shard in one process (reads the .npy files too, as ours does),
  with all cores to faiss;
* ours: :func:`laiontools.stages.dedup.run_search` (Spark local[N], one task per partition, index loaded once
  per worker), end to end (a new index in each worker, job scheduling, report parquet + markers
  written) and steady state (same job again with warm workers and cached index, markers cleared);
* ours in process (what the stage runs below ``--spark-above``): the same search on threads sharing one
  index, no JVM;
* peak worker memory (max RSS over the search tasks) with a pool 1x and 10x larger.

    .venv/bin/python bench/bench_dedup.py [--pool 1000000] [--eval 2000] [--dim 512] [--shard 50000]

Prints ratios (ours / bare) and writes bench-out/dedup.json.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import sys
import tempfile
import time

import numpy as np

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))


def _unit(rng: np.random.Generator, n: int, d: int) -> np.ndarray:
    x = rng.standard_normal((n, d), dtype=np.float32)
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    return x


def write_pool(emb_dir: str, n: int, d: int, shard: int, seed: int) -> list[str]:
    """Random pool embeddings in the embed stage's layout; returns shard ids."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from laiontools.contracts import layout
    from laiontools.core.storage import mark_done, write_json

    rng = np.random.default_rng(seed)
    os.makedirs(os.path.join(emb_dir, layout.EMB_IMG_DIR), exist_ok=True)
    os.makedirs(os.path.join(emb_dir, layout.EMB_META_DIR), exist_ok=True)
    ids = []
    for s, lo in enumerate(range(0, n, shard)):
        m = min(shard, n - lo)
        sid = f"{s:05d}"
        np.save(os.path.join(emb_dir, layout.EMB_IMG_DIR, sid + ".npy"), _unit(rng, m, d).astype(np.float16))
        uids = [f"{seed:08x}{lo + i:024x}" for i in range(m)]
        meta = pa.table({"uid": uids, "key": [f"{sid}{i:05d}" for i in range(m)], "embed_status": ["ok"] * m})
        path = os.path.join(emb_dir, layout.EMB_META_DIR, sid + ".parquet")
        pq.write_table(meta, path)
        mark_done(path, {"rows": m})
        ids.append(sid)
    write_json(os.path.join(emb_dir, layout.EMB_MODEL_JSON),
               {"model": "bench-random", "pretrained": None, "checkpoint_sha256": None, "random_init_seed": 0, "embed_dim": d})
    return ids


def write_index(out: str, n_eval: int, d: int, seed: int) -> dict:
    """An exact IP index over random evaluation vectors, saved as dedup writes it (index/, items, index.json)."""
    import io

    import pyarrow as pa
    import pyarrow.parquet as pq

    from laiontools import index as DI
    from laiontools.core.storage import atomic_write_bytes, sha256_bytes, write_json

    vec = _unit(np.random.default_rng(seed + 1), n_eval, d)
    index, params = DI.build_index(vec, "flat")
    data = DI.serialize(index)
    paths = DI.index_paths(out)
    atomic_write_bytes(paths["index"], data)
    buf = io.BytesIO()
    pq.write_table(pa.table({"row": np.arange(n_eval), "evalset": ["bench"] * n_eval,
                             "item_id": [str(i) for i in range(n_eval)], "label": pa.nulls(n_eval, pa.int64()),
                             "caption": pa.nulls(n_eval, pa.string()), "error": pa.nulls(n_eval, pa.string()),
                             "phash": pa.nulls(n_eval, pa.string())}), buf)
    atomic_write_bytes(paths["items"], buf.getvalue())
    desc = {"model": {"model": "bench-random", "pretrained": None, "checkpoint_sha256": None, "random_init_seed": 0,
                      "embed_dim": d}, **params, "ntotal": n_eval, "dim": d, "index_sha256": sha256_bytes(data),
            "items_sha256": sha256_bytes(buf.getvalue()), "evalsets": [{"name": "bench"}]}
    write_json(paths["json"], desc)
    return desc


def bare_faiss(emb_dir: str, ids: list[str], index_path: str, k: int, chunk: int) -> dict:
    """Baseline: read each shard and index.search it, one process, faiss on all cores."""
    import faiss

    from laiontools.contracts import layout
    from laiontools.index import deserialize, read_bytes

    t0 = time.time()
    index = deserialize(read_bytes(index_path), use_gpu=True)
    t_load = time.time() - t0
    n = 0
    t_search = 0.0
    t1 = time.time()
    for sid in ids:
        emb = np.load(os.path.join(emb_dir, layout.EMB_IMG_DIR, sid + ".npy"), mmap_mode="r")
        for lo in range(0, len(emb), chunk):
            x = np.ascontiguousarray(emb[lo : lo + chunk], dtype=np.float32)
            ts = time.time()
            index.search(x, k)
            t_search += time.time() - ts
            n += len(x)
    wall = time.time() - t1
    return {"vectors": n, "wall_s": wall, "search_only_s": t_search, "index_load_s": t_load,
            "vectors_per_s": n / wall, "threads": faiss.omp_get_max_threads()}


def spark_search(spark, emb_dir: str, ids: list[str], out: str, desc: dict, k: int, chunk: int, partitions: int) -> dict:
    """The stage's search on `spark`, or in this process (threads sharing one index) when `spark` is None."""
    from laiontools.contracts import layout
    from laiontools.core.stage import Tasks
    from laiontools.core.storage import read_marker
    from laiontools.stages import dedup

    cfg = dedup.DedupConfig(embeddings=emb_dir, output=out, evalset=["x=y"], threshold=0.5, k=k, chunk_rows=chunk,
                            gallery_pairs=0, partitions=partitions)
    tasks = Tasks(spark)
    ctx = dedup.search_context(cfg, desc)
    ctx["threads"] = tasks.threads(0, len(ids))
    shutil.rmtree(os.path.join(out, layout.DEDUP_DONE_DIR), ignore_errors=True)
    t0 = time.time()
    done = dedup.run_search(tasks, ctx, [(sid, None) for sid in ids], partitions)
    wall = time.time() - t0
    n = sum(r for _, r, _ in done)
    stats = [read_marker(dedup._done_path(out, sid)) for sid in ids]
    return {"vectors": n, "wall_s": wall, "vectors_per_s": n / wall, "threads_per_task": ctx["threads"],
            "task_seconds_sum": sum(s["search_seconds"] for s in stats),
            "worker_peak_rss_mb": max(s["peak_rss_mb"] for s in stats)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--pool", type=int, default=1_000_000, help="pool vectors for the throughput run (= the 10x pool)")
    ap.add_argument("--eval", type=int, default=2000, help="evaluation vectors in the index")
    ap.add_argument("--dim", type=int, default=512)
    ap.add_argument("--shard", type=int, default=50_000, help="vectors per embedding shard")
    ap.add_argument("--k", type=int, default=5)
    ap.add_argument("--chunk", type=int, default=65536)
    ap.add_argument("--master", default="local[2]")
    ap.add_argument("--workdir", default=None)
    args = ap.parse_args()
    os.environ.setdefault("LAIONTOOLS_SPARK_LOG_LEVEL", "ERROR")

    from laiontools.core.spark import spark_session

    work = args.workdir or tempfile.mkdtemp(prefix="bench-dedup-")
    big, small = os.path.join(work, "emb10x"), os.path.join(work, "emb1x")
    t0 = time.time()
    ids_big = write_pool(big, args.pool, args.dim, args.shard, seed=0)
    # same shard size as the 10x pool: per-task memory depends on the shard, the claim is about the pool
    ids_small = write_pool(small, args.pool // 10, args.dim, args.shard, seed=1)
    out = os.path.join(work, "out")
    desc = write_index(out, args.eval, args.dim, seed=2)
    print(f"data written in {time.time() - t0:.1f}s: pool {args.pool} x {args.dim} fp16 in {len(ids_big)} shards, "
          f"index {args.eval} vectors (flat IP), workdir {work}", flush=True)

    bare = bare_faiss(big, ids_big, os.path.join(out, "index", "evalsets.faiss"), args.k, args.chunk)
    print(f"bare faiss: {bare['vectors_per_s']:,.0f} vectors/s ({bare['wall_s']:.1f}s, {bare['threads']} threads)", flush=True)
    res: dict = {"bare": bare}
    with spark_session(args.master, app_name="bench-dedup") as spark:
        par = spark.sparkContext.defaultParallelism
        t_s = time.time()
        # 1x first, on fresh workers: peak RSS (ru_maxrss) only ever grows in a reused worker, so the
        # 10x runs after it show whether memory grows with the pool.
        out_small = os.path.join(work, "out1x")
        shutil.copytree(os.path.join(out, "index"), os.path.join(out_small, "index"))
        res["spark_1x"] = spark_search(spark, small, ids_small, out_small, desc, args.k, args.chunk, 0)
        res["spark_end_to_end"] = spark_search(spark, big, ids_big, out, desc, args.k, args.chunk, 0)
        print(f"spark end-to-end (workers started by the 1x run, index loaded per job): {res['spark_end_to_end']['vectors_per_s']:,.0f} vectors/s "
              f"({res['spark_end_to_end']['wall_s']:.1f}s)", flush=True)
        res["spark_steady"] = spark_search(spark, big, ids_big, out, desc, args.k, args.chunk, 0)
        print(f"spark steady state (warm workers): {res['spark_steady']['vectors_per_s']:,.0f} vectors/s "
              f"({res['spark_steady']['wall_s']:.1f}s)", flush=True)
        res["spark_session_plus_jobs_s"] = time.time() - t_s
    # In process (what the stage runs below --spark-above): threads sharing one index, no JVM.
    out_local = os.path.join(work, "out-local")
    shutil.copytree(os.path.join(out, "index"), os.path.join(out_local, "index"))
    res["in_process"] = spark_search(None, big, ids_big, out_local, desc, args.k, args.chunk, 0)
    print(f"in process (threads, one index): {res['in_process']['vectors_per_s']:,.0f} vectors/s "
          f"({res['in_process']['wall_s']:.1f}s)", flush=True)
    bare2 = bare_faiss(big, ids_big, os.path.join(out, "index", "evalsets.faiss"), args.k, args.chunk)
    res["bare_repeat"] = bare2
    base = (bare["vectors_per_s"] + bare2["vectors_per_s"]) / 2  # before and after: the machine is shared
    res["ratio_end_to_end"] = res["spark_end_to_end"]["vectors_per_s"] / base
    res["ratio_steady"] = res["spark_steady"]["vectors_per_s"] / base
    res["ratio_in_process"] = res["in_process"]["vectors_per_s"] / base
    res["peak_rss_mb_1x"] = res["spark_1x"]["worker_peak_rss_mb"]
    res["peak_rss_mb_10x"] = res["spark_steady"]["worker_peak_rss_mb"]
    res["params"] = {**vars(args), "parallelism": par, "cpus": os.cpu_count(), "python": platform.python_version()}
    res["command"] = "python " + " ".join(sys.argv)
    print(f"\nratio ours/bare faiss: Spark end-to-end {res['ratio_end_to_end']:.2f}, Spark steady state {res['ratio_steady']:.2f}, "
          f"in process {res['ratio_in_process']:.2f} "
          f"(bare {base:,.0f} vectors/s mean of before/after)")
    print(f"peak worker RSS: pool {args.pool // 10:,} -> {res['peak_rss_mb_1x']} MiB, pool {args.pool:,} -> {res['peak_rss_mb_10x']} MiB")
    os.makedirs("bench-out", exist_ok=True)
    with open("bench-out/dedup.json", "w") as f:
        json.dump(res, f, indent=2)
    print(f"written bench-out/dedup.json; command: {res['command']}")
    if not args.workdir:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
