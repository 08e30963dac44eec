"""A webdataset shard read member by member from gs:// (as verify, embed and the trainer read it), with
laiontools' gcsfs client (read-ahead by block) against gcsfs's own default cache (its "adaptive"
prefetcher, 2026.x), same server, same shard, same run.

    .venv/bin/python bench/bench_gcs_reads.py [--samples 1000] [--kb 16] [--repeats 3] [--out bench-out]

The server is the tests' GCS API server on 127.0.0.1 (gcp-storage-emulator, laiontools.testing.gcsserver),
which counts the object reads (GETs) it answers. Loopback has no first-byte latency: against a real
store each GET also costs a round trip (tens of ms), so the GET count is the figure that carries over.
Figures: seconds and GETs per scan, and the ratio default / laiontools (higher: laiontools faster).
"""

from __future__ import annotations

import argparse
import io
import os
import socket
import sys
import tarfile
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import write_figures


def make_shard(samples: int, kb: int) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as tf:
        for i in range(samples):
            for ext, data in (("jpg", os.urandom(kb * 1024)), ("txt", b"a caption"), ("json", b'{"uid": "%d"}' % i)):
                info = tarfile.TarInfo(f"{i:09d}.{ext}")
                info.size = len(data)
                tf.addfile(info, io.BytesIO(data))
    return buf.getvalue()


def scan(fs, path: str, cache_type: str | None) -> int:
    """Read every member of the tar at `path` to its end; the number of members."""
    kw = {} if cache_type is None else {"cache_type": cache_type}
    n = 0
    with fs.open(path, "rb", **kw) as f, tarfile.open(fileobj=f, mode="r:") as tf:
        for m in tf:
            if m.isfile():
                tf.extractfile(m).read()
                n += 1
    return n


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--samples", type=int, default=1000)
    p.add_argument("--kb", type=int, default=16)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--out", default="bench-out")
    args = p.parse_args()

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    os.environ.setdefault("STORAGE_EMULATOR_HOST", f"http://127.0.0.1:{port}")
    from laiontools.core.storage import url_to_fs
    from laiontools.testing.gcsserver import GCSServer

    shard = make_shard(args.samples, args.kb)
    results: dict[str, dict] = {}
    with GCSServer(port) as server:
        fs, _ = url_to_fs("gs://lt-bench")
        fs.mkdir("lt-bench")
        fs.pipe("lt-bench/s.tar", shard)
        # alternated, so that drift of a shared machine falls on both
        for _ in range(args.repeats):
            for name, cache in (("gcsfs_default_adaptive", "adaptive"), ("laiontools_readahead", None)):
                before, t0 = server.media_gets, time.perf_counter()
                members = scan(fs, "lt-bench/s.tar", cache)
                r = results.setdefault(name, {"s": [], "gets": []})
                r["s"].append(round(time.perf_counter() - t0, 3))
                r["gets"].append(server.media_gets - before)
                assert members == 3 * args.samples, members
    med = {k: sorted(v["s"])[len(v["s"]) // 2] for k, v in results.items()}
    figures = {
        "benchmark": "gs:// shard read member by member: laiontools' gcsfs client vs gcsfs's default cache",
        "shard_mb": round(len(shard) / 2**20, 1), "samples": args.samples, "members": 3 * args.samples,
        "results": results,
        "ratio_default_over_laiontools_s": round(med["gcsfs_default_adaptive"] / med["laiontools_readahead"], 1),
    }
    return write_figures(args.out, "gcs_reads.json", figures)


if __name__ == "__main__":
    sys.exit(main())
