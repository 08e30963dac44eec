"""Reading a LAION-scale manifest: schema validation of its shard list, against the plain schema walk.

    .venv/bin/python bench/bench_manifest.py [--shards 200000] [--rounds 3] [--out bench-out]

Every stage reads the manifests it is given through ``contracts.manifest.read_manifest``, which checks
them against ``schemas/manifest.schema.json``. A 2B pool's manifest names ~200k shards. The baseline is
jsonschema's own walk of the whole document (what ``validate_manifest`` did for every entry); the
figure is ``validate_manifest`` as it is now (shard entries of the plain form checked by hand, the rest
by the schema). Same document, alternated ``--rounds`` times; both must accept it. Also timed: parsing
the document's JSON (what any reader pays). Figures go to ``<out>/manifest.json``.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import write_figures


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--shards", type=int, default=200_000)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--out", default="bench-out")
    a = ap.parse_args(argv)
    import jsonschema

    from laiontools.contracts.manifest import new_manifest
    from laiontools.contracts.schema import manifest_schema_doc, validate_manifest

    sha = hashlib.sha256(b"bench").hexdigest()
    shards = [{"path": f"shards/{i:06d}.tar", "num_samples": 10_000, "bytes": 4_300_000_000 + i,
               "sha256": hashlib.sha256(str(i).encode()).hexdigest()} for i in range(a.shards)]
    m = new_manifest(name="bench-2b", kind="pool", num_samples=10_000 * a.shards, target_samples=None,
                     uids={"path": "pool.uids.npy", "sha256": sha, "count": 10_000 * a.shards}, shards=shards,
                     source_fingerprint=sha, catalog={"path": "catalog"}, command=["bench"])
    text = json.dumps(m)
    schema_walk, ours, parse = [], [], []
    for _ in range(a.rounds):
        t = time.perf_counter()
        errors = list(jsonschema.Draft202012Validator(manifest_schema_doc()).iter_errors(m))
        schema_walk.append(time.perf_counter() - t)
        assert not errors, errors[:1]
        t = time.perf_counter()
        validate_manifest(m)
        ours.append(time.perf_counter() - t)
        t = time.perf_counter()
        json.loads(text)
        parse.append(time.perf_counter() - t)

    def med(xs: list[float]) -> float:
        return sorted(xs)[len(xs) // 2]

    return write_figures(a.out, "manifest.json", {
        "shards": a.shards, "document_mb": round(len(text) / 1e6, 1), "rounds": a.rounds,
        "schema_walk_s": [round(x, 3) for x in schema_walk], "validate_manifest_s": [round(x, 3) for x in ours],
        "json_parse_s": [round(x, 3) for x in parse],
        "speedup": round(med(schema_walk) / med(ours), 1),
        "loadavg": [round(x, 1) for x in os.getloadavg()],
    })


if __name__ == "__main__":
    sys.exit(main())
