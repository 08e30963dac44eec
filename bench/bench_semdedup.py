"""Benchmark `laiontools semdedup` against bare faiss on the same vectors, at 1x and 10x pool size.

    .venv/bin/python bench/bench_semdedup.py [--rows 100000] [--dim 128] [--per-cluster 500] [--scales 1,10] [--repeats 3] [--no-spark]

Input: an embeddings folder in the layout `laiontools embed` writes (``img_emb/<shard>.npy`` float16,
``meta/<shard>.parquet`` + completion marker, ``model.json``), filled with clustered unit vectors in
which 10% of the samples get 1-3 near-copies (cosine ~0.99) — written directly so the benchmark
measures semdedup, not the model.

Per scale (rows x scale vectors, clusters = rows x scale / per-cluster so clusters keep their size):

* **stage**: ``semdedup.run`` as ``laiontools semdedup`` runs it with its defaults (in process below
  ``--spark-above``, 2M samples: k-means task, assign tasks, group tasks, exclusion lists), alternating
  with the baseline ``--repeats`` times (median of the pairs' ratios; the stage first in even pairs); then once on Spark local[2] (``spark_above=0``,
  session started and warmed before timing) for the engine's own figure;
* **baseline**: the same work as bare faiss in one process with the vectors in memory: faiss
  spherical k-means on the same sample (same seed, same size), assignment of every vector with
  ``IndexFlatIP.search``, and, per cluster, ``IndexFlatIP.range_search`` at the tightest eps plus
  scipy-free connected components (the pairs a SemDeDup run needs). It reads the ``.npy`` files inside
  its timed region (as the stage does) and then holds every vector in memory; no Spark, no report.

Printed: seconds of each and their ratio (baseline / stage: the share of bare-faiss throughput the
stage keeps; target >= 0.8), and the stage's peak resident memory (in process: the process's, which
runs two tasks at once on 2 cores; on Spark: the largest Python worker's, from the markers) at each
scale: flat from 1x to 10x means memory is bounded by the settings, not by the pool. Each scale runs
in a fresh Python process, the first stage run before any baseline, so peaks don't carry over.
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


def _stage(emb: str, out: str, k: int, eps: float, spark: object = None, spark_above: int | None = None) -> tuple[float, dict]:
    from laiontools.stages import semdedup

    kw = {} if spark_above is None else {"spark_above": spark_above}
    t0 = time.time()
    res = semdedup.run(semdedup.SemDedupConfig(embeddings=emb, output=out, clusters=k, eps=[eps], gallery_groups=0, **kw), spark)
    return time.time() - t0, res.details


def one_scale(rows: int, dim: int, per_cluster: int, eps: float, work: str, repeats: int, spark_engine: bool) -> dict:
    emb = os.path.join(work, "emb")
    t0 = time.time()
    write_embeddings(emb, rows, dim, per_shard=20_000)
    t_write = time.time() - t0
    k = max(1, rows // per_cluster)
    train_rows = min(rows, 256 * k)
    # as users run it (`laiontools semdedup`, defaults: in process below --spark-above), alternating with
    # the baseline; every repeat writes a fresh output folder
    # The stage runs first: its peak memory (ru_maxrss of this process, recorded by its tasks) is then
    # its own, not the baseline's, which holds every vector in float32.
    stage_s, base_s, d, peak = [], [], {}, None
    # After the first pair the order alternates (baseline first on odd repeats): drift does not always
    # fall on the same side. The peak is the first stage run's, before any baseline ran in this process.
    for r in range(repeats):
        if r % 2 == 1:
            t_base, removed_base = baseline(emb, k, train_rows, eps, 0)
            base_s.append(t_base)
        t, d = _stage(emb, os.path.join(work, f"out{r}"), k, eps)
        stage_s.append(t)
        peak = d["worker_peak_rss_mb"] if peak is None else peak
        if r % 2 == 0:
            t_base, removed_base = baseline(emb, k, train_rows, eps, 0)
            base_s.append(t_base)
    out = {"rows": rows, "dim": dim, "clusters": k, "write_s": round(t_write, 1), "engine": d["engine"],
           "stage_s": [round(v, 2) for v in stage_s], "baseline_s": [round(v, 2) for v in base_s],
           "ratio": round(float(np.median(np.array(base_s) / np.array(stage_s))), 3),
           "removed": d["eps"][0]["removed"], "removed_baseline": int(removed_base),
           "peak_rss_mb_per_task": peak, "largest_cluster": d["cluster_size"]["max"], "timings": d["timings"]}
    if spark_engine:  # the same on Spark local[2] (session started and warmed before timing)
        from laiontools.core.spark import spark_session

        with spark_session("local[2]", app_name="bench-semdedup", conf={"spark.driver.memory": "2g"}) as sp:
            sp.sparkContext.parallelize(range(4), 2).map(lambda v: v).collect()
            t, ds = _stage(emb, os.path.join(work, "out-spark"), k, eps, sp, spark_above=0)
        out.update({"spark_stage_s": round(t, 2), "spark_ratio": round(float(np.median(base_s)) / t, 3),
                    "spark_peak_rss_mb_per_task": ds["worker_peak_rss_mb"], "spark_timings": ds["timings"],
                    "spark_removed": ds["eps"][0]["removed"]})
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rows", type=int, default=100_000)
    ap.add_argument("--dim", type=int, default=128)
    ap.add_argument("--per-cluster", type=int, default=500)
    ap.add_argument("--eps", type=float, default=0.02)
    ap.add_argument("--scales", default="1,10")
    ap.add_argument("--repeats", type=int, default=3, help="stage/baseline pairs per scale, alternating (median ratio)")
    ap.add_argument("--no-spark", action="store_true", help="skip the Spark local[2] engine's run")
    ap.add_argument("--one", type=int, default=0, help=argparse.SUPPRESS)  # child process: run one scale
    a = ap.parse_args()
    if a.one:
        with tempfile.TemporaryDirectory(prefix="bench-semdedup-") as work:
            print(json.dumps(one_scale(a.one, a.dim, a.per_cluster, a.eps, work, a.repeats, not a.no_spark)))
        return
    results = []
    for sc in [int(v) for v in a.scales.split(",")]:
        out = subprocess.run([sys.executable, __file__, "--one", str(a.rows * sc), "--dim", str(a.dim),
                              "--per-cluster", str(a.per_cluster), "--eps", str(a.eps), "--repeats", str(a.repeats)]
                             + (["--no-spark"] if a.no_spark else []), capture_output=True, text=True, check=True)
        r = json.loads(out.stdout.strip().splitlines()[-1])
        r["scale"] = sc
        results.append(r)
        print(json.dumps(r), flush=True)
    print(f"\nload average {os.getloadavg()[0]:.1f}")
    print("scale  rows      clusters  engine      stage s (each)        bare faiss s (each)   ratio  removed (bare)  peak RSS MB"
          "  | Spark local[2]: s  ratio  peak RSS/task MB")
    for r in results:
        print(f"{r['scale']:>4}x  {r['rows']:>8}  {r['clusters']:>8}  {r['engine']:<10}  {r['stage_s']!s:<20}  "
              f"{r['baseline_s']!s:<20}  {r['ratio']:>5}  {r['removed']:>7} ({r['removed_baseline']})  {r['peak_rss_mb_per_task']:>8}"
              + (f"  | {r['spark_stage_s']:>6}  {r['spark_ratio']:>5}  {r['spark_peak_rss_mb_per_task']:>8}" if "spark_stage_s" in r else ""))


if __name__ == "__main__":
    main()
