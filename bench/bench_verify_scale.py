"""verify on Spark at scale: what the driver holds, old code against new, on the same pool (issue 12).

A LAION-2B pool's uid file is 32 GB. verify's Spark path used to collect every sample's uid string
into the driver for the checks across shards; it now streams the uid file and joins on the executors.
This bench builds a synthetic resharded-style manifest (N samples in S tars: a tiny jpg + a json
with the sample's uid each, a sorted uid file), then runs ``verify_manifest(m, spark=local[2])`` in a
fresh process per code tree (``--old-tree``: a checkout of the earlier code, put first on PYTHONPATH),
alternating (the new code twice: as it runs by default, and with its join path forced, which it takes
above 16M uids), and reports per run: wall seconds, and the growth of the driver's memory during the
verify: the driver Python process's RSS, sampled every 20 ms, peak minus before (and the same for the
JVM, which in local mode runs the executors' tasks as well as the driver: not a driver figure).
A warm-up verify of a 2-shard manifest runs first in each process (JVM, Python workers).

    git worktree add /tmp/wt-old <commit>
    .venv/bin/python bench/bench_verify_scale.py --samples 400000 --shards 40 --old-tree /tmp/wt-old --out bench-out
"""

from __future__ import annotations

import argparse
import io
import json
import os
import random
import subprocess
import sys
import tarfile
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import write_figures

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def build(root: str, samples: int, shards: int, seed: int = 0) -> str:
    """A manifest of `samples` samples in `shards` tars (uids random, the file sorted); returns its path."""
    sys.path.insert(0, ROOT)
    from laiontools.contracts.manifest import new_manifest, write_manifest
    from laiontools.contracts.uids import save_uids
    from laiontools.core.storage import sha256_file

    mpath = os.path.join(root, "bench.manifest.json")
    if os.path.exists(mpath):  # built by an earlier run with the same sizes (the manifest is written last)
        return mpath
    os.makedirs(os.path.join(root, "shards"), exist_ok=True)
    rng = random.Random(seed)
    uids = [f"{rng.getrandbits(128):032x}" for _ in range(samples)]
    per = -(-samples // shards)
    entries = []
    for s in range(shards):
        part = uids[s * per : (s + 1) * per]
        path = os.path.join(root, "shards", f"{s:05d}.tar")
        with tarfile.open(path, "w", format=tarfile.USTAR_FORMAT) as tf:
            for i, u in enumerate(part):
                for ext, data in (("jpg", b"\xff\xd8x"), ("json", json.dumps({"uid": u}).encode())):
                    ti = tarfile.TarInfo(f"{s:05d}{i:06d}.{ext}")
                    ti.size = len(data)
                    tf.addfile(ti, io.BytesIO(data))
        sha, size = sha256_file(path)
        entries.append({"path": f"shards/{s:05d}.tar", "num_samples": len(part), "bytes": size, "sha256": sha})
    usha, count = save_uids(os.path.join(root, "uids.npy"), uids)
    m = new_manifest(name=f"bench-{samples}", kind="subset", num_samples=samples, target_samples=samples,
                     uids={"path": "uids.npy", "sha256": usha, "count": count}, shards=entries,
                     source_fingerprint="0" * 64, command=["bench"])
    write_manifest(mpath, m)
    return mpath


_CHILD = r"""
import json, os, sys, time
from laiontools.core.logs import setup_logging
from laiontools.core.spark import spark_session
from laiontools.stages.verify import verify_manifest
from laiontools.testing import procs
import laiontools

setup_logging("WARNING")

def rss():
    return procs.memory_kb("self", "VmRSS") * 1024

def jvm_rss():
    # this process's java child: in local mode the driver JVM runs the executors' tasks too
    java = [c for c in procs.children(os.getpid()) if procs.status(c).get("Name") == "java"]
    return procs.memory_kb(java[0], "VmRSS") * 1024 if java else 0

class Peak:
    # samples the RSS of the driver (and of its JVM) every 20 ms while the verify runs
    def __init__(self):
        import threading
        self.py, self.jvm, self.stop = 0, 0, threading.Event()
        self.t = threading.Thread(target=self.run, daemon=True)
    def run(self):
        while not self.stop.wait(0.02):
            self.py, self.jvm = max(self.py, rss()), max(self.jvm, jvm_rss())

manifest, warm, join_above = sys.argv[1], sys.argv[2], sys.argv[3]
if join_above != "-":  # the new code's join path, forced (its default takes it above 16M uids)
    import laiontools.stages.verify as verify_mod
    verify_mod.SPARK_JOIN_ABOVE_UIDS = int(join_above)
with spark_session("local[2]", app_name="bench-verify", conf={"spark.ui.showConsoleProgress": "false", "spark.driver.memory": "4g"}) as spark:
    assert verify_manifest(warm, spark=spark).ok
    import gc
    gc.collect()
    before_py, before_jvm = rss(), jvm_rss()
    peak = Peak()
    peak.t.start()
    t = time.perf_counter()
    res = verify_manifest(manifest, spark=spark)
    wall = time.perf_counter() - t
    peak.stop.set()
    peak.t.join()
print(json.dumps({"code": os.path.dirname(os.path.dirname(laiontools.__file__)), "ok": res.ok, "problems": res.problems[:3],
                  "wall_s": round(wall, 2), "driver_python_peak_growth_mb": round((max(peak.py, rss()) - before_py) / 1e6, 1),
                  "local_jvm_peak_growth_mb": round((peak.jvm - before_jvm) / 1e6, 1)}))
"""


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--samples", type=int, default=400_000)
    ap.add_argument("--shards", type=int, default=40)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--old-tree", default=None, help="a checkout of the code to compare with (first on PYTHONPATH)")
    ap.add_argument("--work", default="/tmp/bench-verify-scale")
    ap.add_argument("--out", default="bench-out")
    a = ap.parse_args()
    t = time.perf_counter()
    # (absolute: each process runs in its code tree's folder, so that `python -c` imports that tree first)
    big = build(os.path.abspath(os.path.join(a.work, f"pool-{a.samples}")), a.samples, a.shards)
    warm = build(os.path.abspath(os.path.join(a.work, "warm")), 200, 2, seed=1)
    build_s = time.perf_counter() - t
    # new: the default (tasks send packed uids to the driver up to 16M uids); new-joins: the join path
    # that the default takes above 16M uids, forced; old: the code before (uid strings collected)
    trees = [("new", ROOT, "-"), ("new-joins", ROOT, "0")] + ([("old", os.path.abspath(a.old_tree), "-")] if a.old_tree else [])
    runs: list[dict] = []
    for r in range(a.repeats):
        for name, tree, join_above in trees:
            env = {**os.environ, "PYTHONPATH": tree, "PYSPARK_PYTHON": sys.executable, "NO_ALBUMENTATIONS_UPDATE": "1"}
            out = subprocess.run([sys.executable, "-c", _CHILD, big, warm, join_above], env=env, cwd=tree, capture_output=True, text=True, check=False)
            line = next((ln for ln in out.stdout.splitlines() if ln.startswith("{")), None)
            if line is None:
                print(out.stderr[-3000:], file=sys.stderr)
                return 1
            got = {"tree": name, "round": r, **json.loads(line)}
            print(json.dumps(got), flush=True)
            runs.append(got)
    fig = {"benchmark": "verify on Spark local[2]: driver memory growth and wall, per code tree",
           "samples": a.samples, "shards": a.shards, "build_s": round(build_s, 1), "runs": runs,
           "loadavg": [round(x, 1) for x in os.getloadavg()],
           "command": "python bench/bench_verify_scale.py " + " ".join(sys.argv[1:])}
    return write_figures(a.out, "verify_scale.json", fig)


if __name__ == "__main__":
    sys.exit(main())
