"""Benchmark: end to end, ``laiontools download`` (every safety and politeness feature on) vs plain img2dataset.

Issue 15's yardstick: whole-process wall time of ``laiontools download`` against plain
``img2dataset.download`` (pyspark distributor on ``local[2]``) on the same source, same threads,
image size, resize mode, encoding and shard size, runs alternating (the order reversed every repeat), ratio = median plain wall /
median ours wall (target >= 1.3 at 10,000 samples). The fixed cost of a run (a 100-row source) is
measured the same way and reported separately. ``--kinds`` (all four by default, in this order each
repeat): ``ours`` (default engine: in process below ``--spark-above`` rows), ``ours-spark``
(``--master local[2]``: everything on Spark), ``plain`` (pyspark distributor) and ``plain-mp``
(img2dataset's multiprocessing distributor: like for like with an engine that skips Spark).

The source: ``--n`` realistic JPEGs (cycled over ``--distinct`` rendered images, 512-800 px) served by
``--hosts`` synthetic servers on 127.0.0.2 .. 127.0.0.<1+hosts> (one host per address, rows spread over
them in random order), each serving a robots.txt that allows the images. Ours runs with its defaults
(address policy, connect-to-checked-address, request and shard deadlines, byte and pixel limits,
robots.txt, X-Robots-Tag and tdm-reservation opt-outs, DNS cache, prepare's host layout) plus a
blocklist (URLs, a domain and content hashes that match nothing here, so every row is checked and none
refused) and per-host limits set above what a host is asked for (``--max-host-rps``,
``--max-host-concurrency``), so that politeness runs but does not throttle.

    .venv/bin/python bench/bench_download_e2e.py --n 10000 --repeats 2
    .venv/bin/python bench/bench_download_e2e.py --n 3000 --repeats 2      # quicker

Writes ``bench-out/download-e2e.json``; images are cached in ``bench-out/download-images-<distinct>/``.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shlex
import shutil
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path.insert(0, ROOT)
sys.path.insert(0, HERE)

from bench_download import WORKERS, images, loadavg, run_timed, shard_stats


def uptime() -> str:
    return subprocess.run(["uptime"], check=False, capture_output=True, text=True).stdout.strip()


def write_src(path: str, urls: list[str]) -> None:
    import pandas as pd

    os.makedirs(path, exist_ok=True)
    pd.DataFrame({"url": urls, "caption": [f"a photo, number {i}" for i in range(len(urls))]}).to_parquet(
        os.path.join(path, "part-00000.parquet"))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--n", type=int, default=10000)
    p.add_argument("--fixed-n", type=int, default=100, help="rows of the fixed-cost source")
    p.add_argument("--distinct", type=int, default=600)
    p.add_argument("--hosts", type=int, default=16)
    p.add_argument("--threads", type=int, default=32)
    p.add_argument("--image-size", type=int, default=256)
    p.add_argument("--resize-mode", default="border")
    p.add_argument("--shard", type=int, default=0, help="rows per shard (0: n // 12, at least 50)")
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--fixed-repeats", type=int, default=1)
    p.add_argument("--max-host-rps", type=float, default=200.0)
    p.add_argument("--max-host-concurrency", type=int, default=16)
    p.add_argument("--kinds", default="ours,ours-spark,plain,plain-mp",
                   help="runs per repeat, alternating: ours (default engine: in process below --spark-above rows), "
                        "ours-spark (--master local[2]: prepare, download and finalize on Spark), plain (img2dataset, "
                        "pyspark distributor: the issue's yardstick), plain-mp (img2dataset, multiprocessing distributor)")
    p.add_argument("--out", default=os.path.join(ROOT, "bench-out"))
    args = p.parse_args()
    os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")
    from laiontools.stages.download import DownloadConfig
    from laiontools.synthetic import SyntheticWebServer

    os.makedirs(args.out, exist_ok=True)
    work = os.path.join(args.out, "download-e2e-work")
    shutil.rmtree(work, ignore_errors=True)
    os.makedirs(work)
    img_dir, uniq = images(args.out, args.distinct)
    cfg = DownloadConfig(input="-", output="-")
    results: dict = {"n": args.n, "fixed_n": args.fixed_n, "hosts": args.hosts, "threads": args.threads,
                     "image_size": args.image_size, "resize_mode": args.resize_mode, "uptime_start": uptime(),
                     "runs": []}
    t_start = time.time()
    servers = [SyntheticWebServer(img_dir, host=f"127.0.0.{2 + h}").start() for h in range(args.hosts)]
    try:
        for s in servers:
            s.set_robots("User-agent: *\nDisallow: /private/\n")
        rng = random.Random(0)

        def source(name: str, n: int) -> str:
            urls = [f"{servers[rng.randrange(args.hosts)].base_url}/img/{uniq[k % len(uniq)]['file']}?r={k}"
                    for k in range(n)]
            d = os.path.join(work, name)
            write_src(d, urls)
            return d

        blocklist = os.path.join(work, "blocklist.txt")
        with open(blocklist, "w") as f:
            f.write("# matches nothing served here; every row and every body is checked against it\n"
                    "blocked.example.org\nhttp://127.0.0.2:1/never.jpg\n" + "0" * 64 + "\n" + "md5:" + "0" * 32 + "\n")

        def run(kind: str, src: str, n: int, label: str) -> dict:
            per_shard = args.shard or max(50, n // 12)
            out = os.path.join(work, f"{kind}-{label}")
            if kind.startswith("ours"):
                cmd = [sys.executable, "-m", "laiontools", "download", "--input", src, "--output", out,
                       "--image-size", str(args.image_size), "--resize-mode", args.resize_mode,
                       "--thread-count", str(args.threads), "--number-sample-per-shard", str(per_shard),
                       "--allow-networks", "127.0.0.0/8", "--retries", "0",
                       "--blocklist", blocklist, "--max-host-rps", str(args.max_host_rps),
                       "--max-host-concurrency", str(args.max_host_concurrency)]
                if kind == "ours-spark":
                    cmd += ["--master", f"local[{WORKERS}]"]
                shard_dir = os.path.join(out, "shards")
            else:
                settings = {"url_list": src, "input_format": "parquet", "url_col": "url", "caption_col": "caption",
                                "output_folder": out, "output_format": "webdataset", "processes_count": WORKERS,
                                "thread_count": args.threads,
                                "distributor": "multiprocessing" if kind == "plain-mp" else "pyspark",
                                "number_sample_per_shard": per_shard,
                                "timeout": cfg.timeout, "retries": 0, "image_size": args.image_size,
                                "resize_mode": args.resize_mode, "encode_quality": cfg.encode_quality,
                                "encode_format": cfg.encode_format, "extract_exif": cfg.extract_exif,
                                "compute_hash": "sha256",
                                "disallowed_header_directives": ["noai", "noimageai", "noindex", "noimageindex"]}
                cmd = [sys.executable, os.path.join(HERE, "bench_download.py"), "--_plain", "--_settings",
                       json.dumps(settings)]
                shard_dir = out
            lb = loadavg()
            wall = run_timed(f"{kind}-{label}", cmd, os.path.join(work, f"{kind}-{label}.log"))
            st = shard_stats(shard_dir)
            row = {"kind": kind, "label": label, "n": n, "wall_s": round(wall, 2), "successes": st["successes"],
                   "download_s": round(st["download_seconds"] or 0, 2), "e2e_sps": round(st["successes"] / wall, 1),
                   "outside_download_s": round(wall - (st["download_seconds"] or 0), 2),
                   "load_before": lb, "load_after": loadavg()}
            if kind.startswith("ours"):
                with open(os.path.join(out, "report.json")) as f:
                    rep = json.load(f)
                row["report_failures"] = rep.get("failures_by_kind", {})
                row["engine"] = rep.get("engine")
            print(f"[{kind}-{label}] wall {wall:6.1f} s  ok {st['successes']}/{n}  download phase "
                  f"{row['download_s']:.1f} s  outside it {row['outside_download_s']:.1f} s  "
                  f"load {row['load_after'][0]:.1f}", flush=True)
            results["runs"].append(row)
            return row

        small = source("src-fixed", args.fixed_n)
        big = source("src-big", args.n)
        kinds = [k.strip() for k in args.kinds.split(",") if k.strip()]
        # the order reverses every repeat (A B C D, D C B A, ...): drifting load and a cold first run
        # do not fall on the same kind every time
        for r in range(args.fixed_repeats):
            for kind in (kinds if r % 2 == 0 else kinds[::-1]):
                run(kind, small, args.fixed_n, f"fixed{r}")
        for r in range(args.repeats):
            for kind in (kinds if r % 2 == 0 else kinds[::-1]):
                run(kind, big, args.n, f"big{r}")
    finally:
        for s in servers:
            s.stop()

    def med(xs: list[float]) -> float:
        xs = sorted(xs)
        return (xs[(len(xs) - 1) // 2] + xs[len(xs) // 2]) / 2

    def walls(kind: str, tag: str) -> list[float]:
        return [r["wall_s"] for r in results["runs"] if r["kind"] == kind and r["label"].startswith(tag)]

    meds = {k: med(walls(k, "big")) for k in kinds if walls(k, "big")}
    fixed = {k: med(walls(k, "fixed")) for k in kinds if walls(k, "fixed")}
    ratios = {f"{p}/{o}": round(meds[p] / meds[o], 3) for o in kinds if o.startswith("ours") and o in meds
              for p in kinds if p.startswith("plain") and p in meds}
    # a wall ratio means something only if every kind obtained the same samples
    got = {k: sorted({r["successes"] for r in results["runs"] if r["kind"] == k and r["label"].startswith("big")}) for k in meds}
    same = len({tuple(v) for v in got.values()}) == 1
    if not same:
        print(f"WARNING: kinds obtained different sample counts, wall ratios compare different work: {got}", flush=True)
    results.update(successes_by_kind=got, same_successes=same, wall_medians=meds, fixed_medians=fixed, ratios_plain_over_ours=ratios,
                   uptime_end=uptime(), bench_seconds=round(time.time() - t_start, 1),
                   command=" ".join(shlex.quote(a) for a in [".venv/bin/python", "bench/bench_download_e2e.py",
                                                             *sys.argv[1:]]))
    with open(os.path.join(args.out, "download-e2e.json"), "w") as f:
        json.dump(results, f, indent=2)
    print(f"\n{args.n} samples, {args.hosts} hosts, walls: " + "; ".join(f"{k} {walls(k, 'big')} s" for k in kinds))
    print("end to end, plain / ours (medians; target: plain / ours >= 1.3): "
          + ", ".join(f"{k} = {v:.3f}" for k, v in ratios.items()))
    print(f"fixed cost ({args.fixed_n} rows): " + ", ".join(f"{k} {walls(k, 'fixed')} s" for k in kinds))
    print(f"uptime at start: {results['uptime_start']}\nuptime at end:   {results['uptime_end']}\n"
          f"{results['bench_seconds']:.0f} s in all; wrote {os.path.join(args.out, 'download-e2e.json')}")


if __name__ == "__main__":
    main()
