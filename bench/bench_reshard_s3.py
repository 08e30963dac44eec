"""Reshard of nested subsets whose pool lives in an object store: bytes and requests it costs there.

    .venv/bin/python bench/bench_reshard_s3.py [--shards 16] [--per-shard 1000] [--kb 16] \
        [--subset-fractions 0.02,0.2] [--repeats 2] [--out bench-out]

Starts an S3 API server (moto's server, the one the object-store tests use) on 127.0.0.1 in this
process, with a WSGI layer that counts, server side, every GET of a source shard and the bytes it
returned: counted where the bytes leave the store, not by the code under test. Builds the synthetic
pool of bench_reshard.py (pax tars, catalog spans with their sha256), uploads it to a bucket, cuts
nested subsets on the s3 pool and reshards each into the bucket (in process, as the CLI runs below
--spark-above).

Reported per subset: the subset's sample bytes, the source-shard bytes the store sent (and that over
the subset's bytes: the read amplification), the GETs, reshard seconds, the CPU seconds of reshard's
task processes (the client: GETs, checks, packing, PUTs) and of this process (driver and server), and a plain copy of the same
number of bytes on the same store (whole source objects read in name order, written back as as many
objects as reshard writes). On a real store each GET also costs a first-byte latency (tens of ms) and
bytes cost time and, across regions, money; this server on loopback has neither (``--first-byte-ms``
holds each GET that long, to see whether the reads wait for GETs one after another), and it spends
milliseconds of Python on each request, so the seconds here are the least informative figure. Figures go to ``<out>/reshard_s3.json``.
"""

from __future__ import annotations

import argparse
import os
import resource
import shutil
import sys
import tempfile
import time
import uuid

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import write_figures


def copy_on_store(fs, pool: str, dst: str, nbytes: int, files: int) -> float:
    """Plain copy of `nbytes` bytes on the store: source tars read whole in name order, written back as
    `files` objects of equal size; returns seconds."""
    srcs = sorted(fs.ls(f"{pool}/shards"))
    per_file = -(-nbytes // max(1, files))
    t = time.perf_counter()
    buf, left, k = b"", nbytes, 0
    for src in srcs:
        if left <= 0:
            break
        take = min(fs.size(src), left)
        buf += fs.cat_file(src, start=0, end=take)
        left -= take
        while len(buf) >= per_file or (left <= 0 and buf):
            fs.pipe_file(f"{dst}/copy-{k:05d}.tar", buf[:per_file])
            buf, k = buf[per_file:], k + 1
    return time.perf_counter() - t


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--shards", type=int, default=16)
    p.add_argument("--per-shard", type=int, default=1000)
    p.add_argument("--kb", type=int, default=16)
    p.add_argument("--subset-fractions", default="0.02,0.2")
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--first-byte-ms", type=float, default=0.0,
                   help="hold each GET of a source shard this long before the server answers it (a store's first-byte "
                        "latency, which loopback lacks; concurrent GETs wait side by side)")
    p.add_argument("--out", default="bench-out")
    a = p.parse_args()

    from laiontools.testing.s3server import S3Server

    bucket = f"bench-{uuid.uuid4().hex[:8]}"
    server = S3Server(first_byte_s=a.first_byte_ms / 1e3).__enter__()
    endpoint = server.endpoint
    # before fsspec is imported: the task processes reshard forks inherit these
    os.environ["FSSPEC_S3_ENDPOINT_URL"] = os.environ["AWS_ENDPOINT_URL"] = endpoint
    for k, v in {"AWS_ACCESS_KEY_ID": "bench", "AWS_SECRET_ACCESS_KEY": "bench", "AWS_DEFAULT_REGION": "us-east-1"}.items():
        os.environ[k] = v
    import fsspec
    import s3fs
    from bench_reshard import build_pool

    from laiontools.contracts.manifest import read_manifest
    from laiontools.stages import reshard as reshard_stage
    from laiontools.stages import subsets as subsets_stage

    fsspec.config.conf.setdefault("s3", {})["endpoint_url"] = endpoint
    fs = s3fs.S3FileSystem(endpoint_url=endpoint)
    fs.mkdir(bucket)
    work = tempfile.mkdtemp(prefix="laiontools-bench-")
    try:
        local = os.path.join(work, "pool")
        _, total = build_pool(local, a.shards, a.per_shard, a.kb)
        t = time.perf_counter()
        fs.put(local + "/", f"{bucket}/pool", recursive=True)
        upload_s = time.perf_counter() - t
        shutil.rmtree(local)
        pool = f"s3://{bucket}/pool"
        n = a.shards * a.per_shard
        fractions = [float(x) for x in a.subset_fractions.split(",")]
        targets = [max(1, round(f * n)) for f in fractions]
        rows = subsets_stage.run(subsets_stage.SubsetsConfig(pool=f"{pool}/pool.manifest.json", output=f"s3://{bucket}/subsets",
                                                             scales=",".join(map(str, targets)), seed=0), None).details
        by_n = {int(r["target"]): r["manifest"] for r in rows}
        results = []
        for f, target in zip(fractions, targets):
            sub = by_n[target]
            shard_size = max(100, target // 16)
            runs = []
            for r in range(a.repeats):
                dst = f"s3://{bucket}/reshard-{target}-{r}"
                server.watch(f"/{bucket}/pool/shards/")
                c0, s0 = resource.getrusage(resource.RUSAGE_CHILDREN), resource.getrusage(resource.RUSAGE_SELF)
                t = time.perf_counter()
                res = reshard_stage.run(reshard_stage.ReshardConfig(manifest=sub, output=dst, shard_size=shard_size), None).details
                secs = time.perf_counter() - t
                c1, s1 = resource.getrusage(resource.RUSAGE_CHILDREN), resource.getrusage(resource.RUSAGE_SELF)
                # the task processes reshard forks are this process's children: their CPU is the client's
                # (GETs, checks, packing, PUTs); this process's own is the driver's and the server's
                runs.append({"s": round(secs, 2), "gets": server.gets, "bytes_sent": server.bytes,
                             "tasks_cpu_s": round(c1.ru_utime + c1.ru_stime - c0.ru_utime - c0.ru_stime, 2),
                             "driver_and_server_cpu_s": round(s1.ru_utime + s1.ru_stime - s0.ru_utime - s0.ru_stime, 2)})
                fs.rm(dst.split("://")[1], recursive=True)
            m = read_manifest(sub)
            sample_bytes = res["bytes"]
            copies = []
            for r in range(a.repeats):
                copies.append(copy_on_store(fs, f"{bucket}/pool", f"{bucket}/copy", sample_bytes, res["num_shards"]))
                fs.rm(f"{bucket}/copy", recursive=True)
            med = sorted(x["s"] for x in runs)[len(runs) // 2]
            copy_s = sorted(copies)[len(copies) // 2]
            sent = runs[-1]["bytes_sent"]
            results.append({
                "fraction": f, "samples": m["num_samples"], "resharded_mb": round(sample_bytes / 1e6, 1),
                "reshard_runs": runs, "reshard_s": med, "store_mb_sent": round(sent / 1e6, 1),
                "read_amplification": round(sent / sample_bytes, 2), "gets": runs[-1]["gets"],
                "copy_s": [round(x, 2) for x in copies], "ratio_vs_copy": round(copy_s / med, 3),
            })
            print(results[-1], flush=True)
    finally:
        shutil.rmtree(work, ignore_errors=True)
        server.__exit__(None, None, None)
    out = {
        "benchmark": "reshard of nested subsets from an S3 pool (moto server on 127.0.0.1): bytes and GETs the store served",
        "pool": {"shards": a.shards, "per_shard": a.per_shard, "kb": a.kb, "mb": round(total / 1e6, 1), "upload_s": round(upload_s, 1)},
        "first_byte_ms": a.first_byte_ms,
        "subsets": results, "machine": f"{os.cpu_count()} cpus", "loadavg_1": round(os.getloadavg()[0], 1),
        "command": ("python bench/bench_reshard_s3.py " + " ".join(sys.argv[1:])).strip(),
    }
    return write_figures(a.out, "reshard_s3.json", out)


if __name__ == "__main__":
    sys.exit(main())
