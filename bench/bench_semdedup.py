"""Benchmark `laiontools semdedup` against bare faiss on the same vectors, at 1x and 10x pool size.

    .venv/bin/python bench/bench_semdedup.py [--rows 100000] [--dim 128] [--per-cluster 500] [--scales 1,10]

Input: an embeddings folder in the layout `laiontools embed` writes (``img_emb/<shard>.npy`` float16,
``meta/<shard>.parquet`` + completion marker, ``model.json``), filled with clustered unit vectors in
which 10% of the samples get 1-3 near-copies (cosine ~0.99) — written directly so the benchmark
measures semdedup, not the model.

Per scale (rows x scale vectors, clusters = rows x scale / per-cluster so clusters keep their size):

* **stage**: ``semdedup.run`` on Spark local[2] (k-means task, assign job, group job, exclusion lists);
* **baseline**: the same work as bare faiss in one process with the vectors in memory: faiss
  spherical k-means on the same sample (same seed, same size), assignment of every vector with
  ``IndexFlatIP.search``, and, per cluster, ``IndexFlatIP.range_search`` at the tightest eps plus
  scipy-free connected components (the pairs a SemDeDup run needs). No I/O, no Spark, no report.

Printed: seconds of each and their ratio (baseline / stage: the share of bare-faiss throughput the
stage keeps; target >= 0.8), and the stage's peak resident memory per Spark task (max over tasks,
from the markers) at each scale: flat from 1x to 10x means memory per task is bounded by the
settings, not by the pool. Each scale runs in a fresh Python process so peaks don't carry over.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time

import numpy as np

os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")
os.environ.setdefault("PYSPARK_PYTHON", sys.executable)


def write_embeddings(out: str, rows: int, dim: int, per_shard: int, seed: int = 0) -> None:
    """Clustered unit vectors with planted near-copies, as an embed output folder."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from laiontools.contracts import layout
    from laiontools.core.storage import mark_done, write_json

    rng = np.random.default_rng(seed)
    n_topics = max(1, rows // 2000)
    topics = rng.standard_normal((n_topics, dim)).astype(np.float32)
    os.makedirs(os.path.join(out, layout.EMB_IMG_DIR), exist_ok=True)
    os.makedirs(os.path.join(out, layout.EMB_META_DIR), exist_ok=True)
    done = 0
    s = 0
    while done < rows:
        n = min(per_shard, rows - done)
        t = rng.integers(0, n_topics, n)
        x = topics[t] * 0.6 + rng.standard_normal((n, dim)).astype(np.float32)
        # 10% of samples are near-copies of the sample before them (same shard): cosine ~0.99
        cp = np.flatnonzero(rng.random(n) < 0.1)
        cp = cp[cp > 0]
        x[cp] = x[cp - 1] + 0.1 * rng.standard_normal((len(cp), dim)).astype(np.float32)
        x /= np.linalg.norm(x, axis=1, keepdims=True)
        sid = f"{s:05d}"
        np.save(os.path.join(out, layout.EMB_IMG_DIR, f"{sid}.npy"), x.astype(np.float16))
        uids = [f"{s:016x}{i:016x}" for i in range(n)]
        pq.write_table(pa.table({"uid": uids, "key": [f"{s:05d}{i:05d}" for i in range(n)], "embed_status": ["ok"] * n}),
                       os.path.join(out, layout.EMB_META_DIR, f"{sid}.parquet"))
        mark_done(os.path.join(out, layout.EMB_META_DIR, f"{sid}.parquet"), {"rows": n})
        done += n
        s += 1
    write_json(os.path.join(out, layout.EMB_MODEL_JSON), {"model": "bench-synthetic", "pretrained": None,
                                                         "checkpoint_sha256": None, "random_init_seed": seed, "embed_dim": dim})


def baseline(emb: str, k: int, train_rows: int, eps: float, seed: int) -> tuple[float, int]:
    """Bare faiss: k-means on the same sample, assign all, range search per cluster, components."""
    import faiss

    from laiontools import neardup
    from laiontools.contracts import layout

    files = sorted(os.listdir(os.path.join(emb, layout.EMB_IMG_DIR)))
    t0 = time.time()
    x = np.concatenate([np.load(os.path.join(emb, layout.EMB_IMG_DIR, f)) for f in files]).astype(np.float32)
    rng = np.random.default_rng(seed)
    sample = x[np.sort(rng.choice(len(x), size=min(train_rows, len(x)), replace=False))]
    km = faiss.Kmeans(x.shape[1], k, niter=20, seed=seed, spherical=True, verbose=False)
    km.train(sample)
    index = faiss.IndexFlatIP(x.shape[1])
    index.add(km.centroids)
    _, assign = index.search(x, 1)
    assign = assign[:, 0]
    order = np.argsort(assign, kind="stable")
    bounds = np.concatenate([[0], np.cumsum(np.bincount(assign, minlength=k))])
    removed = 0
    for c in range(k):
        rows = order[bounds[c]:bounds[c + 1]]
        if len(rows) < 2:
            continue
        xc = np.ascontiguousarray(x[rows])
        ci = faiss.IndexFlatIP(x.shape[1])
        ci.add(xc)
        lims, _, ids = ci.range_search(xc, 1.0 - eps)
        src = np.repeat(np.arange(len(rows)), np.diff(lims).astype(np.int64))
        labels = np.arange(len(rows), dtype=np.int64)
        neardup.union(labels, src, ids)
        removed += len(rows) - len(np.unique(neardup.flatten(labels)))
    return time.time() - t0, removed


def one_scale(rows: int, dim: int, per_cluster: int, eps: float, work: str) -> dict:
    from laiontools.core.spark import spark_session
    from laiontools.stages import semdedup

    emb = os.path.join(work, "emb")
    t0 = time.time()
    write_embeddings(emb, rows, dim, per_shard=20_000)
    t_write = time.time() - t0
    k = max(1, rows // per_cluster)
    train_rows = min(rows, 256 * k)
    with spark_session("local[2]", app_name="bench-semdedup", conf={"spark.driver.memory": "2g"}) as sp:
        # warm the session (JVM + Python workers) so the stage timing is the stage's own
        sp.sparkContext.parallelize(range(4), 2).map(lambda v: v).collect()
        t0 = time.time()
        res = semdedup.run(semdedup.SemDedupConfig(embeddings=emb, output=os.path.join(work, "out"), clusters=k, eps=[eps],
                                                   gallery_groups=0), sp)
        t_stage = time.time() - t0
    t_base, removed_base = baseline(emb, k, train_rows, eps, 0)
    d = res.details
    return {"rows": rows, "dim": dim, "clusters": k, "write_s": round(t_write, 1), "stage_s": round(t_stage, 2),
            "baseline_s": round(t_base, 2), "ratio": round(t_base / t_stage, 3), "removed": d["eps"][0]["removed"],
            "removed_baseline": int(removed_base), "peak_rss_mb_per_task": d["worker_peak_rss_mb"],
            "largest_cluster": d["cluster_size"]["max"], "timings": d["timings"]}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rows", type=int, default=100_000)
    ap.add_argument("--dim", type=int, default=128)
    ap.add_argument("--per-cluster", type=int, default=500)
    ap.add_argument("--eps", type=float, default=0.02)
    ap.add_argument("--scales", default="1,10")
    ap.add_argument("--one", type=int, default=0, help=argparse.SUPPRESS)  # child process: run one scale
    a = ap.parse_args()
    if a.one:
        with tempfile.TemporaryDirectory(prefix="bench-semdedup-") as work:
            print(json.dumps(one_scale(a.one, a.dim, a.per_cluster, a.eps, work)))
        return
    results = []
    for sc in [int(v) for v in a.scales.split(",")]:
        out = subprocess.run([sys.executable, __file__, "--one", str(a.rows * sc), "--dim", str(a.dim),
                              "--per-cluster", str(a.per_cluster), "--eps", str(a.eps)],
                             capture_output=True, text=True, check=True)
        r = json.loads(out.stdout.strip().splitlines()[-1])
        r["scale"] = sc
        results.append(r)
        print(json.dumps(r), flush=True)
    print("\nscale  rows      clusters  stage s  bare faiss s  ratio  removed (bare)  peak RSS/task MB")
    for r in results:
        print(f"{r['scale']:>4}x  {r['rows']:>8}  {r['clusters']:>8}  {r['stage_s']:>7}  {r['baseline_s']:>12}  {r['ratio']:>5}  "
              f"{r['removed']:>7} ({r['removed_baseline']})  {r['peak_rss_mb_per_task']:>8}")


if __name__ == "__main__":
    main()
