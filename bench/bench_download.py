"""Benchmark: download samples/s per core — our pipeline vs plain img2dataset vs the CPU bound, same run.

A :class:`~laiontools.synthetic.SyntheticWebServer` on 127.0.0.1 serves ``--n`` realistic JPEGs
(512-800 px, ~40-120 KB, no broken rows) from this process. Then, one after the other, each in a
fresh subprocess so each pays its own start-up:

* ``ours_fast`` / ``ours_img2dataset_decode``: ``laiontools download`` (prepare + img2dataset under
  the pyspark distributor + catalog/manifest/report) on Spark ``local[2]``, ``--fast-decode`` on / off;
* ``img2dataset_pyspark`` / ``img2dataset_mp``: plain ``img2dataset.download`` on the same prepared
  input (the first run's ``prepared/accepted``), same image_size / resize_mode / encode / threads /
  shard size / extra columns; pyspark distributor on a ``local[2]`` session, and multiprocessing with
  2 processes;
* ``cpu_img2dataset`` / ``cpu_fast``: decode + resize + encode of the same image bytes held in memory,
  no network, no tar writing, img2dataset's Resizer and FastResizer, 2 processes.

Each pipeline gets two rates: **steady** = successes / download phase (min start .. max end over
img2dataset's per-shard ``*_stats.json``), and **end-to-end** = successes / subprocess wall time
(Python + JVM start, prepare, catalog, manifest). Per core = rate / 2 (every variant runs 2 workers;
the HTTP server's CPU is on the same 2 cores and is not counted). Ratios printed at the end:
ours / plain img2dataset (target >= 0.95) and ours / CPU bound (target >= 0.7).

    .venv/bin/python bench/bench_download.py            # 2000 URLs over 600 images (~15-20 min at load 12 on 2 cores)
    .venv/bin/python bench/bench_download.py --n 800    # quick run

Writes ``bench-out/download.json``; images are cached in ``bench-out/download-images-<n>/``.
"""

from __future__ import annotations

import argparse
import glob
import json
import os
import shlex
import shutil
import subprocess
import sys
import time
from pathlib import Path

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
WORKERS = 2  # Spark local[2] / 2 processes: the cores the pipeline is allowed


def loadavg() -> list[float]:
    with open("/proc/loadavg") as f:
        return [float(x) for x in f.read().split()[:3]]


def images(out_dir: str, n: int) -> tuple[str, list[dict]]:
    """Realistic JPEGs 0..n-1 (seed 0), cached with their item list (write_images is deterministic)."""
    from laiontools.synthetic import write_images

    d = os.path.join(out_dir, f"download-images-{n}")
    items_path = os.path.join(d, "items.json")
    if os.path.exists(items_path):
        with open(items_path) as f:
            return d, json.load(f)
    t = time.time()
    tmp = f"{d}.tmp-{os.getpid()}"
    items = write_images(tmp, n, seed=0, realistic=True, processes=WORKERS)
    with open(os.path.join(tmp, "items.json"), "w") as f:
        json.dump(items, f)
    shutil.rmtree(d, ignore_errors=True)
    os.replace(tmp, d)
    print(f"rendered {n} realistic images into {d} in {time.time() - t:.0f}s", flush=True)
    return d, items


def shard_stats(shard_dir: str) -> dict:
    """successes, count and download-phase seconds from img2dataset's per-shard stats files."""
    files = sorted(glob.glob(os.path.join(shard_dir, "*_stats.json")))
    stats = [json.loads(Path(f).read_text()) for f in files]
    if not stats:
        return {"shards": 0, "successes": 0, "count": 0, "download_seconds": None}
    start = min(s["start_time"] for s in stats)
    end = max(s["end_time"] for s in stats)
    status: dict[str, int] = {}
    for s in stats:
        for k, v in s.get("status_dict", {}).items():
            status[k] = status.get(k, 0) + v
    return {"shards": len(stats), "successes": sum(s["successes"] for s in stats),
            "count": sum(s["count"] for s in stats), "download_seconds": end - start, "status": status}


def run_timed(name: str, cmd: list[str], log_path: str) -> float:
    print(f"[{name}] {' '.join(shlex.quote(c) for c in cmd)}", flush=True)
    env = {**os.environ, "NO_ALBUMENTATIONS_UPDATE": "1", "PYSPARK_PYTHON": sys.executable,
           "PYSPARK_DRIVER_PYTHON": sys.executable}
    t = time.perf_counter()
    with open(log_path, "w") as log:
        rc = subprocess.call(cmd, stdout=log, stderr=subprocess.STDOUT, env=env, cwd=ROOT)
    wall = time.perf_counter() - t
    if rc != 0:
        tail = Path(log_path).read_text()[-3000:]
        raise SystemExit(f"[{name}] failed with exit code {rc}; log {log_path}:\n{tail}")
    return wall


def rates(name: str, st: dict, wall: float | None, load_before: list[float]) -> dict:
    """Steady (download phase) and end-to-end (wall) samples/s, total and per core; `wall` None: no e2e."""
    steady = st["successes"] / st["download_seconds"] if st["download_seconds"] else 0.0
    e2e = st["successes"] / wall if wall else None
    row = {"variant": name, "successes": st["successes"], "count": st["count"], "shards": st["shards"],
           "download_seconds": round(st["download_seconds"] or 0, 2), "wall_seconds": round(wall, 2) if wall else None,
           "steady_sps": round(steady, 2), "steady_sps_per_core": round(steady / WORKERS, 2),
           "e2e_sps": round(e2e, 2) if e2e else None, "e2e_sps_per_core": round(e2e / WORKERS, 2) if e2e else None,
           "status": st.get("status", {}), "loadavg_before": load_before, "loadavg_after": loadavg()}
    cpu = st.get("cpu_seconds")
    # CPU bound only: samples per CPU-second of the timed loop, a load-independent cost per image.
    # (Not for pipelines: Spark's Python workers are killed, not reaped, so RUSAGE_CHILDREN misses them.)
    row["cpu_seconds"] = round(cpu, 1) if cpu else None
    row["samples_per_cpu_second"] = round(st["successes"] / cpu, 2) if cpu else None
    e2e_txt = f", end-to-end {e2e:.1f}/s (wall {wall:.0f}s)" if e2e else ""
    print(f"[{name}] {st['successes']}/{st['count']} ok, steady {steady:.1f}/s{e2e_txt}, "
          f"load {row['loadavg_after'][0]:.1f}", flush=True)
    return row


# ----------------------------------------------------------------------------- subprocess entries

def _plain_img2dataset(args: argparse.Namespace) -> None:
    """Plain img2dataset.download on our prepared input (run as a subprocess by the bench)."""
    settings = json.loads(args.settings)
    import img2dataset

    if settings["distributor"] == "pyspark":
        from laiontools.core.spark import spark_session

        with spark_session(f"local[{WORKERS}]", app_name="bench-img2dataset"):
            img2dataset.download(**settings)
    else:
        img2dataset.download(**settings)


def _cpu_worker(files: list[str], resizer_name: str, kwargs: dict, barrier, q) -> None:
    import io

    from img2dataset.resizer import Resizer

    from laiontools.web.resize import FastResizer

    datas = [Path(f).read_bytes() for f in files]
    r = (FastResizer if resizer_name == "fast" else Resizer)(**kwargs)
    ok = 0
    barrier.wait()  # both processes start timing with their bytes already in memory
    t0, c0 = time.time(), time.process_time()
    for d in datas:
        ok += r(io.BytesIO(d))[5] is None
    q.put((t0, time.time(), ok, len(datas), time.process_time() - c0))


def cpu_bound(files: list[str], resizer_name: str, kwargs: dict) -> dict:
    """decode+resize+encode of `files` in WORKERS spawned processes; rate over the slowest one."""
    import multiprocessing as mp

    ctx = mp.get_context("spawn")
    barrier, q = ctx.Barrier(WORKERS), ctx.Queue()
    procs = [ctx.Process(target=_cpu_worker, args=(files[i::WORKERS], resizer_name, kwargs, barrier, q))
             for i in range(WORKERS)]
    for p in procs:
        p.start()
    res = [q.get(timeout=1800) for _ in procs]
    for p in procs:
        p.join()
    start, end = min(r[0] for r in res), max(r[1] for r in res)
    return {"shards": WORKERS, "successes": sum(r[2] for r in res), "count": sum(r[3] for r in res),
            "download_seconds": end - start, "cpu_seconds": sum(r[4] for r in res)}


# ----------------------------------------------------------------------------- main

def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--n", type=int, default=2000, help="images served and downloaded by every variant")
    p.add_argument("--distinct", type=int, default=600,
                   help="distinct images rendered; the n URLs cycle over them (?r=<k>), so rendering stays cheap")
    p.add_argument("--image-size", type=int, default=256)
    p.add_argument("--resize-mode", default="border")
    p.add_argument("--threads", type=int, default=32, help="download threads per worker (all variants)")
    p.add_argument("--out", default=os.path.join(ROOT, "bench-out"))
    p.add_argument("--skip-mp", action="store_true", help="skip the img2dataset multiprocessing baseline")
    p.add_argument("--_plain", dest="plain", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--_settings", dest="settings", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.plain:
        return _plain_img2dataset(args)

    os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")
    from laiontools.contracts import layout
    from laiontools.stages.download import DownloadConfig
    from laiontools.synthetic import SyntheticWebServer, write_source
    from laiontools.web.resize import resize_params, resizer_kwargs

    os.makedirs(args.out, exist_ok=True)
    work = os.path.join(args.out, "download-work")
    shutil.rmtree(work, ignore_errors=True)
    os.makedirs(work)
    img_dir, uniq = images(args.out, min(args.n, args.distinct))
    # Row k fetches image k % distinct as /img/<file>?r=<k>: a distinct URL (so a distinct uid) whose bytes
    # are decoded, resized and encoded like any other; the server ignores the query string.
    items = [{**uniq[k % len(uniq)], "id": k, "file": f"{uniq[k % len(uniq)]['file']}?r={k}"} for k in range(args.n)]
    per_shard = max(50, args.n // 12)  # ~12 shards: both workers stay busy to the end
    t_start = time.time()
    results: dict = {"n": args.n, "image_size": args.image_size, "resize_mode": args.resize_mode,
                     "threads_per_worker": args.threads, "workers": WORKERS, "number_sample_per_shard": per_shard,
                     "cpu_count": os.cpu_count(), "loadavg_start": loadavg(), "variants": []}
    common = ["--image-size", str(args.image_size), "--resize-mode", args.resize_mode, "--thread-count",
              str(args.threads), "--number-sample-per-shard", str(per_shard), "--allow-networks", "127.0.0.0/8",
              "--retries", "0", "--master", f"local[{WORKERS}]"]
    cfg = DownloadConfig(input="-", output="-", image_size=args.image_size, resize_mode=args.resize_mode)

    with SyntheticWebServer(img_dir) as web:
        source = os.path.join(work, "source")
        write_source(source, web.base_url, items, broken={})  # item "file" is the bare name the server serves

        def ours(name: str, fast: bool) -> dict:
            pool = os.path.join(work, name)
            cmd = [sys.executable, "-m", "laiontools", "download", "--input", source, "--output", pool,
                   *common, "--fast-decode" if fast else "--no-fast-decode"]
            lb = loadavg()
            wall = run_timed(name, cmd, os.path.join(work, f"{name}.log"))
            row = rates(name, shard_stats(os.path.join(pool, layout.SHARDS_DIR)), wall, lb)
            row["command"] = " ".join(shlex.quote(c) for c in cmd)
            results["variants"].append(row)
            return row

        def plain(name: str, distributor: str, prepared: str, extra_cols: list[str]) -> dict:
            out = os.path.join(work, name)
            settings = dict(url_list=prepared, input_format="parquet", url_col="url", caption_col="caption",
                            save_additional_columns=extra_cols, output_folder=out, output_format="webdataset",
                            processes_count=WORKERS, thread_count=args.threads, distributor=distributor,
                            number_sample_per_shard=per_shard, timeout=cfg.timeout, retries=0,
                            image_size=args.image_size, resize_mode=args.resize_mode,
                            encode_quality=cfg.encode_quality, encode_format=cfg.encode_format,
                            extract_exif=cfg.extract_exif, compute_hash="sha256",
                            disallowed_header_directives=["noai", "noimageai", "noindex", "noimageindex"])
            cmd = [sys.executable, os.path.abspath(__file__), "--_plain", "--_settings", json.dumps(settings)]
            lb = loadavg()
            wall = run_timed(name, cmd, os.path.join(work, f"{name}.log"))
            row = rates(name, shard_stats(out), wall, lb)
            row["command"] = f"img2dataset.download(**{settings})"
            results["variants"].append(row)
            return row

        ours("ours_fast", True)
        prep_dir = os.path.join(work, "ours_fast", layout.PREPARED_DIR)
        with open(os.path.join(prep_dir, "stats.json")) as f:
            extra = [c for c in json.load(f)["download_columns"] if c not in ("url", "caption")]
        plain("img2dataset_pyspark", "pyspark", os.path.join(prep_dir, "accepted"), extra)
        ours("ours_img2dataset_decode", False)
        if not args.skip_mp:
            plain("img2dataset_mp", "multiprocessing", os.path.join(prep_dir, "accepted"), extra)

    files = [os.path.join(img_dir, it["file"].split("?")[0]) for it in items]  # the same n payloads
    params = resize_params(cfg.to_dict())
    params.pop("fast_decode", None)  # which resizer is the benchmark's choice here
    kw = resizer_kwargs(**params)
    for name, which in (("cpu_img2dataset", "i2d"), ("cpu_fast", "fast")):
        lb = loadavg()
        print(f"[{name}] decode+resize+encode of {len(files)} images in memory, {WORKERS} processes", flush=True)
        row = rates(name, cpu_bound(files, which, kw), None, lb)  # no start-up to speak of: steady only
        results["variants"].append(row)

    v = {r["variant"]: r for r in results["variants"]}

    def ratio(a: str, b: str, key: str = "steady_sps") -> float | None:
        if a in v and b in v and v[b][key]:
            return round(v[a][key] / v[b][key], 3)
        return None

    results["ratios"] = {
        "ours_fast / img2dataset_pyspark (steady)": ratio("ours_fast", "img2dataset_pyspark"),
        "ours_fast / img2dataset_pyspark (end-to-end)": ratio("ours_fast", "img2dataset_pyspark", "e2e_sps"),
        "ours_img2dataset_decode / img2dataset_pyspark (steady, same resizer: pure overhead)":
            ratio("ours_img2dataset_decode", "img2dataset_pyspark"),
        "ours_img2dataset_decode / img2dataset_pyspark (end-to-end)":
            ratio("ours_img2dataset_decode", "img2dataset_pyspark", "e2e_sps"),
        "ours_fast / img2dataset_mp (steady)": ratio("ours_fast", "img2dataset_mp"),
        "ours_fast / img2dataset_mp (end-to-end)": ratio("ours_fast", "img2dataset_mp", "e2e_sps"),
        "ours_fast / cpu_fast (steady)": ratio("ours_fast", "cpu_fast"),
        "ours_img2dataset_decode / cpu_img2dataset (steady)": ratio("ours_img2dataset_decode", "cpu_img2dataset"),
        "img2dataset_pyspark / cpu_img2dataset (steady)": ratio("img2dataset_pyspark", "cpu_img2dataset"),
        "cpu_fast / cpu_img2dataset": ratio("cpu_fast", "cpu_img2dataset"),
    }
    results["loadavg_end"] = loadavg()
    results["bench_seconds"] = round(time.time() - t_start, 1)
    results["command"] = " ".join(shlex.quote(a) for a in [".venv/bin/python", "bench/bench_download.py", *sys.argv[1:]])
    with open(os.path.join(args.out, "download.json"), "w") as f:
        json.dump(results, f, indent=2)

    from laiontools.core.report import table

    cols = ["variant", "successes", "download_seconds", "wall_seconds", "steady_sps", "steady_sps_per_core",
            "e2e_sps", "e2e_sps_per_core", "samples_per_cpu_second"]
    print()
    print(table([{c: r.get(c) for c in cols} for r in results["variants"]], cols))
    print()
    for k, r in results["ratios"].items():
        print(f"  {k:<85} {r}")
    print(f"\nload average start {results['loadavg_start']} end {results['loadavg_end']} on {os.cpu_count()} cores; "
          f"{results['bench_seconds']:.0f}s in all")
    print(f"wrote {os.path.join(args.out, 'download.json')}\ncommand: {results['command']}")


if __name__ == "__main__":
    main()
