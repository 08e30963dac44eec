"""Time reshard of one subset several times in this process: the write phase and the whole run.

    PYTHONPATH=<tree> .venv/bin/python bench/reshard_write_times.py --manifest <subset.manifest.json> [--runs 6]

For old-against-new comparisons without rebuilding a pool between them: run it alternately with the
library of two trees on ``PYTHONPATH`` (a worktree of the old commit, then this one) on the same subset
(e.g. the 20 % subset that ``bench_reshard.py --subset-fractions 0.2`` leaves in its work folder). The
write phase is the stage's own "reshard: wrote ... in N s" log line; the first run is dropped (imports,
page cache). Prints the medians and every run.
"""

from __future__ import annotations

import argparse
import logging
import shutil
import statistics
import sys
import tempfile
import time


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--manifest", required=True, help="a subset manifest (its pool's catalog records sample spans)")
    ap.add_argument("--runs", type=int, default=6)
    ap.add_argument("--shard-size", type=int, default=400)
    ap.add_argument("--label", default="", help="printed before the figures (e.g. old / new)")
    a = ap.parse_args()
    times: list[float] = []

    class _Wrote(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            if record.msg.startswith("reshard: wrote"):
                times.append(float(record.args[-1]))

    log = logging.getLogger("laiontools.stages.reshard")
    log.addHandler(_Wrote())
    log.setLevel(logging.INFO)
    from laiontools.stages import reshard

    out = tempfile.mkdtemp(prefix="laiontools-write-times-")
    total: list[float] = []
    try:
        for _ in range(a.runs):
            shutil.rmtree(out, ignore_errors=True)
            t = time.perf_counter()
            reshard.run(reshard.ReshardConfig(manifest=a.manifest, output=out, shard_size=a.shard_size))
            total.append(time.perf_counter() - t)
    finally:
        shutil.rmtree(out, ignore_errors=True)
    print(f"{a.label} write median {statistics.median(times[1:]):.3f} s, total median {statistics.median(total[1:]):.3f} s; "
          f"write {[round(x, 3) for x in times]}, total {[round(x, 3) for x in total]}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
