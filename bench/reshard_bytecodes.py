"""Count the bytecodes reshard's write runs per sample, by function: a measure of its per-sample work that
does not move with the machine's load (a timed run here moves by more than most changes to it).

    .venv/bin/python bench/reshard_bytecodes.py --manifest <subset.manifest.json> [--shard-size 160]

Reshards the subset once in this process (one task: ``os.cpu_count`` is made 1, so no task process is
forked) with opcode tracing (``sys.settrace`` with ``f_trace_opcodes``) switched on
only inside ``write_output_shards``: the plan, the manifest and everything else the stage does once are
not counted. Prints the total per sample and the functions that run the most, each with its own bytecodes
(not those of what it calls) and its calls per sample. A bytecode costs what an empty loop iteration
costs, roughly; the script prints that too. C work (sha256, json's scanner, reads) is not counted.
(BENCHMARKS "nested subsets", twelfth run: the 2 % subset of ``bench_reshard.py --shards 128``.)
"""

from __future__ import annotations

import argparse
import collections
import os
import shutil
import sys
import tempfile
import timeit
from typing import Any


def count(manifest: str, shard_size: int) -> tuple[int, collections.Counter, collections.Counter]:
    """(samples, bytecodes by (file, function), calls by (file, function)) of one in-process reshard."""
    from laiontools.contracts.manifest import read_manifest
    from laiontools.stages import reshard

    ops: collections.Counter = collections.Counter()
    calls: collections.Counter = collections.Counter()

    def name(code: Any) -> tuple[str, str]:
        return os.path.basename(code.co_filename), code.co_name

    def on_op(frame: Any, event: str, arg: Any) -> Any:
        if event == "opcode":
            ops[name(frame.f_code)] += 1
        return on_op

    def on_call(frame: Any, event: str, arg: Any) -> Any:
        frame.f_trace_opcodes = True
        calls[name(frame.f_code)] += 1
        return on_op

    write = reshard.write_output_shards

    def traced(*a: Any, **k: Any) -> Any:
        it = write(*a, **k)
        while True:  # traced only while the generator runs, not while the stage handles what it yields
            sys.settrace(on_call)
            try:
                item = next(it)
            except StopIteration:
                return
            finally:
                sys.settrace(None)
            yield item

    work = tempfile.mkdtemp(prefix="laiontools-bytecodes-")
    cpus = os.cpu_count
    reshard.write_output_shards, os.cpu_count = traced, lambda: 1  # type: ignore[assignment]
    try:
        reshard.run(reshard.ReshardConfig(manifest=manifest, output=os.path.join(work, "out"), shard_size=shard_size))
    finally:
        reshard.write_output_shards, os.cpu_count = write, cpus  # type: ignore[assignment]
        shutil.rmtree(work, ignore_errors=True)
    return int(read_manifest(manifest)["num_samples"]), ops, calls


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--manifest", required=True, help="a subset manifest whose pool's catalog records sample spans")
    ap.add_argument("--shard-size", type=int, default=160)
    ap.add_argument("--top", type=int, default=25)
    a = ap.parse_args()
    n, ops, calls = count(a.manifest, a.shard_size)
    total = sum(ops.values())
    loop_ns = min(timeit.repeat("for _ in r: pass", setup="r = range(100_000)", number=10, repeat=5)) / 1e6 * 1e9
    print(f"{n} samples: {total / n:,.0f} bytecodes a sample in write_output_shards and below "
          f"(an empty loop iteration takes {loop_ns:.0f} ns here)")
    for (path, fn), v in ops.most_common(a.top):
        print(f"{v / n:9.1f} a sample  {v / total * 100:5.1f} %  calls a sample {calls[(path, fn)] / n:6.2f}  {path}:{fn}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
