"""Benchmark: the download against a web that misbehaves — stragglers and per-host politeness.

Two measurements, each against a baseline measured in the same run:

``stragglers`` — wall time of ``laiontools download`` (Spark local[2], img2dataset, our fetch) over a
small pool from the synthetic web on 127.0.0.1, without and with ``--drip`` URLs that send their
headers and then one byte every second (each would hold a download thread for ~its size in
seconds). Printed: both wall times, the difference, and what the dripping rows would have cost
without a deadline (their byte count in seconds).

``politeness`` — many hosts on loopback (127.0.0.2 .. 127.0.0.<1+hosts>, one synthetic server per
address, each logging every request's arrival time) fetched through :func:`laiontools.web.fetch.fetch_one`
by a pool of threads (img2dataset's shape: ``--threads`` threads over rows in random host order),
first without per-host limits, then with ``max_host_rps`` / ``max_host_concurrency`` (threads taking
rows in input order, as img2dataset's pool does), then with the same limits through
:class:`laiontools.web.fetch.HostScheduler` (the download's shard loop: a thread takes the row of a host
that can start now). Printed: the highest request count any host saw in any 1-second window (must be
<= the rps limit) and the throughput ratios polite / unlimited (target >= 0.95 when hosts are many).

    .venv/bin/python bench/bench_web.py stragglers --n 200 --drip 4
    .venv/bin/python bench/bench_web.py politeness --hosts 32 --n 3000 --rps 20 --concurrency 4
    .venv/bin/python bench/bench_web.py politeness --hosts 32 --n 3000 --rps 20 --concurrency 4 --order grouped
    .venv/bin/python bench/bench_web.py host_shards --hosts 8 --rows-per-host 40 --shard 40 --max-host-shards 1

``host_shards`` — the global side of the per-host limits: ``laiontools download`` (Spark local[2], so
2 tasks at once, each its own executor Python worker with its own limits) of a pool whose hosts are
separate loopback servers answering after ``--delay`` s, once with prepare's ``--max-host-shards 0``
(input order, every host in every shard) and once with the bound. Printed per run: shards per host
(from the catalog), the most requests any host had in flight at once and its highest rates, as the
servers saw them (bound: min(H, 2 tasks) x the per-executor limits).

Writes ``bench-out/web-<mode>.json``.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))
os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")
os.environ.setdefault("PYSPARK_PYTHON", sys.executable)


def _images(d: str, n: int, side: int = 320) -> list[str]:
    from PIL import Image

    os.makedirs(d, exist_ok=True)
    names = []
    for i in range(n):
        name = f"{i:05d}.jpg"
        p = os.path.join(d, name)
        if not os.path.exists(p):
            img = Image.new("RGB", (side + i % 97, side), ((i * 37) % 255, (i * 11) % 255, 120))
            img.save(p, quality=85)
        names.append(name)
    return names


def stragglers(args: argparse.Namespace) -> dict:
    import pandas as pd

    from laiontools.core.spark import spark_session
    from laiontools.stages import download
    from laiontools.synthetic import SyntheticWebServer

    work = tempfile.mkdtemp(prefix="bench-web-")
    names = _images(os.path.join(work, "images"), args.n)
    out: dict = {"n": args.n, "drip": args.drip, "request_deadline": args.request_deadline}
    with SyntheticWebServer(os.path.join(work, "images")) as web, \
            spark_session("local[2]", app_name="bench-web", conf={"spark.driver.memory": "1g"}) as spark:
        b = web.base_url
        step = max(1, args.n // max(1, args.drip))
        for label, drip in (("warmup", 0), ("without_drip", 0), ("with_drip", args.drip),
                            ("without_drip_2", 0), ("with_drip_2", args.drip)):
            urls = [f"{b}/img/{n}" for n in names]
            for k in range(drip):
                urls[k * step] = f"{b}/drip/1/{names[k * step]}"
            src = os.path.join(work, f"src-{label}")
            os.makedirs(src)
            pd.DataFrame({"url": urls, "caption": [f"c {i}" for i in range(len(urls))]}).to_parquet(f"{src}/p.parquet")
            cfg = download.DownloadConfig(input=src, output=os.path.join(work, f"pool-{label}"), allow_networks=["127.0.0.0/8"],
                                          number_sample_per_shard=args.shard, timeout=10, retries=0, image_size=64,
                                          thread_count=16, request_deadline=args.request_deadline)
            t0 = time.perf_counter()
            rep = download.run(cfg, spark).details
            wall = time.perf_counter() - t0
            out[label] = {"wall_s": round(wall, 2), "obtained": rep["obtained"],
                          "deadline_rows": rep["failures_by_kind"].get("failed_download:deadline", 0)}
            print(f"{label:15s} wall {wall:6.1f} s  obtained {rep['obtained']}  deadline rows {out[label]['deadline_rows']}", flush=True)
        drip_bytes = [os.path.getsize(os.path.join(work, "images", names[k * step])) for k in range(args.drip)]
    w0 = (out["without_drip"]["wall_s"] + out["without_drip_2"]["wall_s"]) / 2
    w1 = (out["with_drip"]["wall_s"] + out["with_drip_2"]["wall_s"]) / 2
    out.update(mean_without=round(w0, 2), mean_with=round(w1, 2), extra_s=round(w1 - w0, 2), ratio=round(w1 / w0, 3),
               undeadlined_drip_seconds=max(drip_bytes) if drip_bytes else 0)
    print(f"\nwith {args.drip} dripping URLs: {w1:.1f} s vs {w0:.1f} s without (+{w1 - w0:.1f} s, ratio {w1 / w0:.2f}); "
          f"without a deadline the slowest dripping row alone would take ~{out['undeadlined_drip_seconds']} s")
    return out


def _max_window(times: list[float], window: float = 1.0) -> int:
    times = sorted(times)
    best, j = 0, 0
    for i, t in enumerate(times):
        while times[j] < t - window + 1e-9:
            j += 1
        best = max(best, i - j + 1)
    return best


def politeness(args: argparse.Namespace) -> dict:
    from laiontools.synthetic import SyntheticWebServer
    from laiontools.web.fetch import FetchPolicy, HostGate, HostScheduler, RobotsCache, fetch_one

    work = tempfile.mkdtemp(prefix="bench-web-")
    names = _images(os.path.join(work, "images"), 50, side=256)
    servers = [SyntheticWebServer(os.path.join(work, "images"), host=f"127.0.0.{2 + h}").start() for h in range(args.hosts)]
    try:
        rng = random.Random(0)
        rows = [f"{servers[rng.randrange(args.hosts)].base_url}/img/{rng.choice(names)}" for _ in range(args.n)]
        if args.order == "grouped":  # each host's rows together, as in a source sorted by URL
            rows.sort(key=lambda u: u.split("/img/")[0])
        base = {"allow_networks": ("127.0.0.0/8",), "request_deadline": 60.0, "respect_robots": True}
        variants = {"unlimited": FetchPolicy(**base),
                    "polite": FetchPolicy(**base, max_host_rps=args.rps, max_host_concurrency=args.concurrency)}
        variants["scheduled"] = variants["polite"]
        out: dict = {"hosts": args.hosts, "n": args.n, "threads": args.threads, "rps": args.rps, "concurrency": args.concurrency,
                     "order": args.order}
        # the order reverses every repeat (A B C, C B A, ...): drifting load does not favour one variant
        order = [v for r in range(args.repeats) for v in (("unlimited", "polite", "scheduled")[:: 1 if r % 2 == 0 else -1])]
        for i, name in enumerate(order):
            pol = variants[name]
            for s in servers:
                s.log_requests()
                s.reset_counters()
            gate, robots = HostGate(), RobotsCache()
            t0 = time.perf_counter()
            if name == "scheduled":
                # the download's shard loop: threads take the row of whichever host can start soonest
                sched = HostScheduler(list(enumerate(rows)), gate, pol.max_host_rps, pol.max_host_concurrency)

                def one(_ticket: int, pol=pol, gate=gate, robots=robots, sched=sched) -> str | None:
                    key, u = sched.take()
                    try:
                        return fetch_one(u, 10, None, None, pol, gate=gate, robots=robots)[1]
                    finally:
                        sched.done(key)

                with ThreadPoolExecutor(args.threads) as ex:
                    errs = list(ex.map(one, range(len(rows))))
            else:  # img2dataset's shape: each thread takes the next row in input order and waits for its host
                with ThreadPoolExecutor(args.threads) as ex:
                    errs = list(ex.map(lambda u, pol=pol, gate=gate, robots=robots:
                                       fetch_one(u, 10, None, None, pol, gate=gate, robots=robots)[1], rows))
            wall = time.perf_counter() - t0
            per_host = [[t for t, _, p in s.request_log if p.startswith("/img/")] for s in servers]
            rec = {"wall_s": round(wall, 3), "rows_per_s": round(len(rows) / wall, 1), "errors": sum(e is not None for e in errs),
                   "max_host_requests_in_1s": max(_max_window(t) for t in per_host if t),
                   "max_host_rate_5s": round(max(_max_window(t, 5.0) for t in per_host if t) / 5.0, 1),
                   "max_host_in_flight": max(s.max_in_flight for s in servers),
                   "robots_fetches": robots.fetches}
            out.setdefault(name, []).append(rec)
            print(f"{name:9s} run {i // 3 + 1}: {rec['rows_per_s']:7.1f} rows/s  max/host/1s {rec['max_host_requests_in_1s']:4d}  "
                  f"max/host/s over 5 s {rec['max_host_rate_5s']:5.1f}  "
                  f"max in flight/host {rec['max_host_in_flight']}  errors {rec['errors']}", flush=True)
    finally:
        for s in servers:
            s.stop()
    import statistics

    med = statistics.median  # of an even count: the mean of the middle two (not the larger one)
    r_un = med([r["rows_per_s"] for r in out["unlimited"]])
    r_po = med([r["rows_per_s"] for r in out["polite"]])
    r_sc = med([r["rows_per_s"] for r in out["scheduled"]])
    out["throughput_ratio"] = round(r_po / r_un, 3)
    out["scheduled_throughput_ratio"] = round(r_sc / r_un, 3)
    # What the limits allow: the run cannot end before its busiest host has had all its rows at the rate
    # limit (plus its robots.txt request), so n / (max rows per host + 1) x rps; and never more than the
    # unlimited run reached. (hosts x rps alone ignores that random rows do not spread evenly.)
    from collections import Counter
    from urllib.parse import urlsplit

    busiest = max(Counter(urlsplit(u).netloc for u in rows).values())
    allowed = min(r_un, len(rows) * args.rps / (busiest + 1))
    out["busiest_host_rows"] = busiest
    out["allowed_rows_per_s"] = round(allowed, 1)
    out["scheduled_vs_allowed"] = round(r_sc / allowed, 3)
    out["errors"] = {k: [r["errors"] for r in out[k]] for k in ("unlimited", "polite", "scheduled")}
    if len({e for v in out["errors"].values() for e in v}) > 1:
        print(f"WARNING: the variants failed different numbers of rows: {out['errors']}", flush=True)
    out["polite_max_host_requests_in_1s"] = max(r["max_host_requests_in_1s"] for r in out["polite"] + out["scheduled"])
    out["polite_max_host_rate_5s"] = max(r["max_host_rate_5s"] for r in out["polite"] + out["scheduled"])
    print(f"\npolite, threads in row order / unlimited (medians): {r_po:.1f} / {r_un:.1f} = {r_po / r_un:.3f}")
    print(f"polite, HostScheduler / unlimited (medians): {r_sc:.1f} / {r_un:.1f} = {r_sc / r_un:.3f}  (target >= 0.95); "
          f"vs what the limits allow (min(unlimited, n x rps / (busiest host's {busiest} rows + robots.txt)) = "
          f"{allowed:.0f}/s): scheduled {r_sc / allowed:.3f}, threads in row order {r_po / allowed:.3f}")
    print(f"highest per-host count in any 1 s window with politeness: {out['polite_max_host_requests_in_1s']} "
          f"(limit {args.rps:g}/s; a window can hold limit+1 starts at its two edges, more when client threads are "
          f"delayed between their start slot and the server), highest per-host rate over 5 s windows: "
          f"{out['polite_max_host_rate_5s']}/s")
    return out


def host_shards(args: argparse.Namespace) -> dict:
    """Download (Spark local[2]: 2 concurrent tasks) a pool whose hosts are separate loopback servers,
    with prepare's --max-host-shards 0 (input order: every host in every shard) and H, alternating,
    under the same per-executor limits; the servers see the global per-host concurrency and rate."""
    from urllib.parse import urlsplit

    import pandas as pd

    from laiontools.core.spark import spark_session
    from laiontools.stages import download
    from laiontools.synthetic import SyntheticWebServer

    work = tempfile.mkdtemp(prefix="bench-web-")
    names = _images(os.path.join(work, "images"), 50, side=256)
    servers = [SyntheticWebServer(os.path.join(work, "images"), host=f"127.0.0.{2 + h}").start() for h in range(args.hosts)]
    out: dict = {k: getattr(args, k) for k in ("hosts", "rows_per_host", "shard", "max_host_shards", "rps", "concurrency",
                                               "delay", "threads")}
    try:
        rng = random.Random(0)
        urls = [f"{s.base_url}/slow/{args.delay:g}/{rng.choice(names)}" for s in servers for _ in range(args.rows_per_host)]
        rng.shuffle(urls)
        src = os.path.join(work, "src")
        os.makedirs(src)
        pd.DataFrame({"url": urls, "caption": [f"c {i}" for i in range(len(urls))]}).to_parquet(f"{src}/p.parquet")
        with spark_session("local[2]", app_name="bench-web-hosts", conf={"spark.driver.memory": "1g"}) as spark:
            for i, h in enumerate([0, args.max_host_shards] * args.repeats):
                for s in servers:
                    s.log_requests()
                    s.reset_counters()
                cfg = download.DownloadConfig(
                    input=src, output=os.path.join(work, f"pool-{i}"), allow_networks=["127.0.0.0/8"],
                    number_sample_per_shard=args.shard, shards_per_file=1, timeout=10, retries=0, image_size=64,
                    thread_count=args.threads, max_host_rps=args.rps, max_host_concurrency=args.concurrency,
                    max_host_shards=h)
                t0 = time.perf_counter()
                rep = download.run(cfg, spark).details
                wall = time.perf_counter() - t0
                cat = pd.read_parquet(os.path.join(cfg.output, "catalog"), columns=["url", "shard"])
                shards_per_host = cat.assign(host=cat["url"].map(lambda u: urlsplit(u).hostname)).groupby("host")["shard"].nunique()
                per_host = [[t for t, _, p in s.request_log if p.startswith("/slow/")] for s in servers]
                rec = {"max_host_shards": h, "wall_s": round(wall, 1), "obtained": rep["obtained"],
                       "max_shards_per_host": int(shards_per_host.max()),
                       "max_host_in_flight": max(s.max_in_flight for s in servers),
                       "max_host_requests_in_1s": max(_max_window(t) for t in per_host if t),
                       "max_host_rate_5s": round(max(_max_window(t, 5.0) for t in per_host if t) / 5.0, 1)}
                out.setdefault(f"h{h}", []).append(rec)
                print(f"--max-host-shards {h}: wall {wall:5.1f} s  obtained {rep['obtained']}  shards/host (catalog) "
                      f"{rec['max_shards_per_host']}  max in flight/host {rec['max_host_in_flight']}  "
                      f"max/host/1s {rec['max_host_requests_in_1s']}  max/host/s over 5 s {rec['max_host_rate_5s']}", flush=True)
    finally:
        for s in servers:
            s.stop()
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    sub = p.add_subparsers(dest="mode", required=True)
    s = sub.add_parser("stragglers")
    s.add_argument("--n", type=int, default=200)
    s.add_argument("--drip", type=int, default=4)
    s.add_argument("--shard", type=int, default=50)
    s.add_argument("--request-deadline", type=float, default=5.0)
    q = sub.add_parser("politeness")
    q.add_argument("--hosts", type=int, default=32)
    q.add_argument("--n", type=int, default=3000)
    q.add_argument("--threads", type=int, default=64)
    q.add_argument("--rps", type=float, default=20.0)
    q.add_argument("--concurrency", type=int, default=4)
    q.add_argument("--repeats", type=int, default=2)
    q.add_argument("--order", choices=("random", "grouped"), default="random",
                   help="rows in random host order, or each host's rows together")
    g = sub.add_parser("host_shards")
    g.add_argument("--hosts", type=int, default=8)
    g.add_argument("--rows-per-host", type=int, default=40)
    g.add_argument("--shard", type=int, default=40)
    g.add_argument("--max-host-shards", type=int, default=1)
    g.add_argument("--threads", type=int, default=16)
    g.add_argument("--rps", type=float, default=10.0)
    g.add_argument("--concurrency", type=int, default=2)
    g.add_argument("--delay", type=float, default=0.2)
    g.add_argument("--repeats", type=int, default=1)
    args = p.parse_args()
    res = {"stragglers": stragglers, "politeness": politeness, "host_shards": host_shards}[args.mode](args)
    os.makedirs(os.path.join(os.path.dirname(HERE), "bench-out"), exist_ok=True)
    with open(os.path.join(os.path.dirname(HERE), "bench-out", f"web-{args.mode}.json"), "w") as f:
        json.dump(res, f, indent=2)


if __name__ == "__main__":
    main()
