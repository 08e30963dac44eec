"""Run every CPU benchmark in bench/ one after another (each writes bench-out/<name>.json).

    .venv/bin/python bench/run_all.py [--only download,embed]

GPU figures come from bench/gpu_embed.py, run by hand on a GPU machine.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time

BENCHES = ["download", "prepare_memory", "embed", "dedup", "subsets", "reshard", "reshard_s3", "gcs_reads", "train", "manifest", "verify_scale", "plan_join", "uid_merge", "reshard_urls"]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--only", default="", help="comma-separated subset of: " + ", ".join(BENCHES))
    args = p.parse_args(argv)
    names = [n for n in (args.only.split(",") if args.only else BENCHES) if n]
    here = os.path.dirname(os.path.abspath(__file__))
    failed = []
    for name in names:
        script = os.path.join(here, f"bench_{name}.py")
        print(f"== {name}: {sys.executable} {script}", flush=True)
        t0 = time.time()
        rc = subprocess.call([sys.executable, script])
        print(f"== {name}: exit {rc} in {time.time() - t0:.0f}s", flush=True)
        if rc:
            failed.append(name)
    if failed:
        print("failed: " + ", ".join(failed), file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
