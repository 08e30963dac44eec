"""What would a faster per-sample reshard path give at most? Upper bounds, measured by taking parts away.

    .venv/bin/python bench/reshard_upper_bounds.py [--shards 32] [--per-shard 1000] [--kb 16] [--fraction 0.2] [--rounds 5]

Reshards one nested subset of a synthetic pool (as bench_reshard.py builds it: pax tars, catalog spans
with their sha256) in this process and times the write phase (reshard's own log line) with the
whole per-sample path, then with one part of it made free:

* ``parse free``: the span parser's answer is looked up, not computed (what a compiled parser could
  reach at best);
* ``parse + pack free``: also no tar headers built: each member's bytes are copied as they are (what
  a compiled parse-and-pack path could reach at best; the output is then not a valid tar);
* ``no span check``: the span's sha256 against the catalog skipped (a contract check reshard keeps);
* ``floor``: only the work the contract requires: each span read and checked against its sha256, its
  bytes copied into the output buffer as they are (no parse, no json, no tar headers: the output is not a
  valid shard), the output hashed and written as reshard writes it (O_DIRECT from the writer thread, fsync).
  What no compiled per-sample path could beat, in the stage's own processes.

``--workers 2`` runs the write phase in 2 forked processes, as the CLI does on this machine. A plain copy of
the same bytes (as bench_reshard.py copies) runs beside each round: ``copy / write phase`` of the floor
bounds the write phase's ratio to a copy from above (the plan's time comes on top).

Each variant runs ``--rounds`` times in 1 worker, each run right after one of the full path; reported:
median write seconds, and the median of the variant's time over its paired full run's. Nothing here is a mode of
reshard: the parts are replaced in this process only, to size what is worth building. Figures go to
``<out>/reshard_upper_bounds.json``.
"""

from __future__ import annotations

import argparse
import logging
import os
import shutil
import sys
import tempfile
from contextlib import contextmanager

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import write_figures


class _WriteTimes(logging.Handler):
    def __init__(self) -> None:
        super().__init__()
        self.times: list[float] = []

    def emit(self, record: logging.LogRecord) -> None:
        if record.msg.startswith("reshard: wrote"):
            self.times.append(float(record.args[-1]))


_PARSED: dict[bytes, object] = {}


@contextmanager
def _variant(name: str):
    """Make one part of the per-sample path free, in this process, for the block."""
    from laiontools.stages import reshard
    from laiontools.wds import tarscan, writer

    saved = []

    def patch(obj, attr, value):
        saved.append((obj, attr, getattr(obj, attr)))
        setattr(obj, attr, value)

    if name in ("parse free", "parse + pack free"):
        real, answers = tarscan.parse_span, _PARSED  # kept across runs: filled by the first one

        def looked_up(raw):
            key = bytes(raw[:1536])  # the first member's headers name the sample: unique per span
            got = answers.get(key)
            if got is None:
                got = answers[key] = real(raw)
            return got

        patch(tarscan, "parse_span", looked_up)
    if name == "parse + pack free":
        def copy_only(self, kb, members):
            small = self.small  # add_sample without the headers and the padding
            for _, data, _ in members:
                if len(data) >= self.BIG:
                    if small:
                        self._put(small)
                        small.clear()
                    self._put(data)
                else:
                    small += data

        patch(writer.ShardWriter, "add_sample", copy_only)
    if name == "floor":
        import hashlib

        def span_as_is(sources, e):  # read and check the span; no parse: its bytes are one "member"
            raw = sources.read(e.sid, e.lo, e.hi - e.lo)
            if e.sha is not None and hashlib.sha256(raw).hexdigest() != e.sha:
                raise ValueError(f"span of {e.skey} does not match its sha256")
            return [("bin", memoryview(raw), 0)]

        def put_only(self, kb, members):  # no headers, no padding, no json: the bytes into the buffer
            for _, data, _ in members:
                self._put(data)

        patch(reshard, "_span_members", span_as_is)
        patch(writer.ShardWriter, "add_sample", put_only)
    if name == "no span check":
        real_members = reshard._span_members

        def unchecked(sources, e):
            e.sha = None
            return real_members(sources, e)

        patch(reshard, "_span_members", unchecked)
    try:
        yield
    finally:
        for obj, attr, value in reversed(saved):
            setattr(obj, attr, value)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--shards", type=int, default=32)
    p.add_argument("--per-shard", type=int, default=1000)
    p.add_argument("--kb", type=int, default=16)
    p.add_argument("--fraction", type=float, default=0.2)
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--workers", type=int, default=1, help="write-phase processes (the CLI uses 2 on this machine)")
    p.add_argument("--variants", default="parse free,parse + pack free,no span check,floor")
    p.add_argument("--out", default="bench-out")
    p.add_argument("--work", default=None, help="scratch folder (default: a temp folder, removed after)")
    a = p.parse_args()

    from bench_reshard import build_pool, copy_bytes

    from laiontools.contracts.manifest import read_manifest
    from laiontools.core.stage import Tasks
    from laiontools.stages import reshard as reshard_stage
    from laiontools.stages import subsets as subsets_stage

    work = a.work or tempfile.mkdtemp(prefix="laiontools-bench-")
    handler = _WriteTimes()
    log = logging.getLogger("laiontools.stages.reshard")
    log.addHandler(handler)
    log.setLevel(logging.INFO)
    try:
        root = os.path.join(work, "pool")
        shutil.rmtree(root, ignore_errors=True)
        mp, _ = build_pool(root, a.shards, a.per_shard, a.kb)
        target = max(1, round(a.fraction * a.shards * a.per_shard))
        rows = subsets_stage.run(subsets_stage.SubsetsConfig(pool=mp, output=os.path.join(root, "subsets"),
                                                             scales=str(target), seed=0), None).details
        sub = rows[0]["manifest"]
        m = read_manifest(sub)
        shard_size = max(100, target // 16)

        def one(name: str) -> float:
            dst = os.path.join(work, "out")
            shutil.rmtree(dst, ignore_errors=True)
            with _variant(name):
                res = reshard_stage._reshard(reshard_stage.ReshardConfig(manifest=sub, output=dst, shard_size=shard_size),
                                       Tasks(None, workers=a.workers), m)
            if name == "full":
                out_bytes[0] = res["bytes"]
            return handler.times[-1]

        out_bytes = [0]

        one("full")  # warm-up: page cache, imports
        variants = [v.strip() for v in a.variants.split(",") if v.strip()]
        if "parse free" in variants or "parse + pack free" in variants:
            one("parse free")  # fills the looked-up answers
        times: dict[str, list[float]] = {"full": [], **{v: [] for v in variants}, "copy": []}
        ratios: dict[str, list[float]] = {v: [] for v in variants}
        for _ in range(a.rounds):
            for v in variants:  # each variant against the full path run just before it (the machine drifts)
                times["full"].append(one("full"))
                times[v].append(one(v))
                ratios[v].append(times[v][-1] / times["full"][-1])
            times["copy"].append(copy_bytes(root, os.path.join(work, "copy"), out_bytes[0], -(-target // shard_size)))
    finally:
        log.removeHandler(handler)
        if a.work is None:
            shutil.rmtree(work, ignore_errors=True)
    med = {k: sorted(v)[len(v) // 2] for k, v in times.items()}
    out = {
        "benchmark": f"reshard write phase, {a.workers} worker(s): the full per-sample path against it with one part made free",
        "copy_over_write_phase": {k: round(med["copy"] / med[k], 3) for k in ["full", *variants]},
        "samples": target, "seconds": {k: [round(x, 3) for x in v] for k, v in times.items()},
        "median_s": {k: round(v, 3) for k, v in med.items()},
        "fraction_of_full": {k: round(sorted(r)[len(r) // 2], 3) for k, r in ratios.items()},  # median of paired ratios
        "machine": f"{os.cpu_count()} cpus", "loadavg_1": round(os.getloadavg()[0], 1),
        "command": ("python bench/reshard_upper_bounds.py " + " ".join(sys.argv[1:])).strip(),
    }
    return write_figures(a.out, "reshard_upper_bounds.json", out)


if __name__ == "__main__":
    sys.exit(main())
