"""The pool's shard url table in every reshard write task: ShardUrls against the dict it replaced.

    .venv/bin/python bench/bench_reshard_urls.py [--shards 232000] [--rounds 3] [--out bench-out]

Every write task of reshard reads from nearly every source shard (a nested subset's samples are scattered
over the pool), so each carries the pool's whole shard id -> url table and resolves each shard's file
system and path (fsspec's ``url_to_fs``). At 2B that is ~232k shards. Measured in this process, on one
table of ``--shards`` ids under ``s3://`` and under a local folder (no request is made: resolving a url
does not touch the store):

  * baseline: the dict of (id, url) as the tasks received it until 2026-12-07 (unpickled, as a Python
    worker holds it), each shard resolved once a task by ``url_to_fs`` and kept;
  * figure: ``reshard.ShardUrls`` (unpickled), resolved by ``reshard._Sources._where`` as the tasks do now.

For each: the pickled size (what the task closure carries), the memory the unpickled table holds and what
a task that resolves every shard once holds on top (tracemalloc), and the seconds of that first pass (the
two alternated ``--rounds`` times; the best of each). Both must give the same file system type and path for
every shard. Figures go to ``<out>/reshard_urls.json``.
"""

from __future__ import annotations

import argparse
import gc
import os
import pickle
import sys
import time
import tracemalloc

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import write_figures


def _held(make) -> tuple[object, int]:
    gc.collect()
    tracemalloc.start()
    try:
        obj = make()
        return obj, tracemalloc.get_traced_memory()[0]
    finally:
        tracemalloc.stop()


def _baseline(table: dict[str, str], sids: list[str]) -> dict[str, tuple]:
    """What a write task did until 2026-12-07 (reshard._Sources._where): url_to_fs once a shard, kept."""
    from laiontools.core.storage import is_local, url_to_fs

    where: dict[str, tuple] = {}
    for sid in sids:
        w = where.get(sid)
        if w is None:
            fs, p = url_to_fs(table[sid])
            w = where[sid] = (fs, p, is_local(fs))
    return where


def _figure(table: object, sids: list[str]) -> object:
    """What a write task does now: each shard resolved through reshard._Sources._where."""
    from laiontools.stages.reshard import _Sources

    s = _Sources(table)
    for sid in sids:
        s._where(sid)
    return s


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--shards", type=int, default=232_000)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--out", default="bench-out")
    a = ap.parse_args(argv)
    from laiontools.stages.reshard import ShardUrls, _Sources

    figures = {"benchmark": "reshard's shard url table in a write task", "shards": a.shards, "rounds": a.rounds, "bases": {}}
    for base in ("s3://bucket/laion2b/pool", "/data/laion2b/pool"):
        pairs = [(f"{i:06d}", f"{base}/shards/{i:06d}.tar") for i in range(a.shards)]
        sids = [p[0] for p in pairs]
        blobs = {"dict (before)": pickle.dumps(dict(pairs)), "ShardUrls": pickle.dumps(ShardUrls(pairs))}
        del pairs
        row = {}
        for name, blob in blobs.items():
            _, held = _held(lambda blob=blob: pickle.loads(blob))
            row[name] = {"pickled_mb": round(len(blob) / 1e6, 2), "table_mb": round(held / 1e6, 2), "first_pass_s": []}

        runs = {"dict (before)": _baseline, "ShardUrls": _figure}
        tables = {name: pickle.loads(blob) for name, blob in blobs.items()}
        for _ in range(a.rounds):
            for name, run in runs.items():
                gc.collect()
                t0 = time.perf_counter()
                run(tables[name], sids)
                row[name]["first_pass_s"].append(round(time.perf_counter() - t0, 3))
        for name, run in runs.items():
            _, held = _held(lambda t=tables[name], run=run, sids=sids: run(t, sids))
            row[name]["task_holds_mb"] = round(held / 1e6, 2)
        # the same answers: file system type and path of every shard
        old, new = _baseline(tables["dict (before)"], sids), _Sources(tables["ShardUrls"])
        for sid in sids:
            fs, p, local = new._where(sid)
            assert (type(fs), p, local) == (type(old[sid][0]), old[sid][1], old[sid][2]), sid
        best = {name: min(r["first_pass_s"]) for name, r in row.items()}
        row["first_pass_ratio_before_over_now"] = round(best["dict (before)"] / max(best["ShardUrls"], 1e-9), 1)
        row["memory_ratio_before_over_now"] = round(
            (row["dict (before)"]["table_mb"] + row["dict (before)"]["task_holds_mb"])
            / max(row["ShardUrls"]["table_mb"] + row["ShardUrls"]["task_holds_mb"], 1e-9), 1)
        figures["bases"][base.split("/")[0] or "local"] = row
    return write_figures(a.out, "reshard_urls.json", figures)


if __name__ == "__main__":
    sys.exit(main())
