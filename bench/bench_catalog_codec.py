"""The catalog's parquet codec: bytes a row and read time, snappy (Arrow's and Spark's default) against
zstd (what laiontools writes, core.storage.PARQUET_CODEC), same rows, same run, alternated.

    .venv/bin/python bench/bench_catalog_codec.py [--rows 2000000] [--repeats 5] [--demo-catalog DIR]

The synthetic catalog holds the columns whose content does not depend on the web: uids and sha256s
(random hex, as in every real catalog), statuses, shard paths, keys, sizes, byte spans. URLs and
captions are left out (null), since synthetic text would say nothing about how real ones compress;
--demo-catalog adds a catalog that has them (e.g. the demo pool's: `make demo`, then
demo-out/pool/catalog), written again both ways. Reads: the columns reshard's plan and subsets'
membership scan read (uid, status, shard, key, tar_offset, tar_length, tar_sha256), and every column;
each from the page cache, with page CRCs checked as the stages read them. Figures go to
<out>/catalog_codec.json.
"""

from __future__ import annotations

import argparse
import glob
import io
import json
import os
import sys
import time

PLAN_COLUMNS = ["uid", "status", "shard", "key", "tar_offset", "tar_length", "tar_sha256"]


def synthetic_catalog(rows: int, seed: int = 0):
    import numpy as np
    import pyarrow as pa

    from laiontools.contracts import schema as C

    rng = np.random.default_rng(seed)

    def hexes(nbytes: int) -> pa.Array:
        raw = rng.integers(0, 256, size=(rows, nbytes), dtype=np.uint8)
        return pa.array(np.char.decode(np.frombuffer(raw.tobytes().hex().encode(), dtype=f"S{2 * nbytes}"), "ascii"))

    ok = rng.random(rows) < 0.9
    per_shard = 10_000
    shard = np.arange(rows) // per_shard
    length = rng.integers(8_000, 60_000, size=rows)
    offset = np.zeros(rows, dtype=np.int64)
    for s in np.unique(shard):  # spans follow one another in their tar
        m = shard == s
        offset[m] = np.concatenate([[0], np.cumsum(length[m] + 1536)[:-1]])
    status = np.where(ok, C.STATUS_SUCCESS, C.STATUS_FAILED_DOWNLOAD)
    cols = {
        C.UID: hexes(16),
        C.STATUS: pa.array(status),
        C.SHARD: pa.array([f"shards/{s:05d}.tar" if o else None for s, o in zip(shard.tolist(), ok.tolist())]),
        C.KEY: pa.array([f"{i // per_shard:05d}{i % per_shard:04d}" if o else None for i, o in enumerate(ok.tolist())]),
        C.WIDTH: pa.array(np.where(ok, rng.integers(64, 512, rows), None), pa.int64()),
        C.HEIGHT: pa.array(np.where(ok, rng.integers(64, 512, rows), None), pa.int64()),
        C.SHA256: hexes(32),
        C.TAR_OFFSET: pa.array(np.where(ok, offset, None), pa.int64()),
        C.TAR_LENGTH: pa.array(np.where(ok, length, None), pa.int64()),
        C.TAR_SHA256: hexes(32),
    }
    return pa.table(cols)


def measure(table, codec: str) -> dict:
    import pyarrow.parquet as pq

    from laiontools.core.storage import PARQUET_READ, PARQUET_WRITE

    buf = io.BytesIO()
    t = time.perf_counter()
    pq.write_table(table, buf, **{**PARQUET_WRITE, "compression": codec})
    write_s = time.perf_counter() - t
    data = buf.getvalue()
    cols = [c for c in PLAN_COLUMNS if c in table.column_names]
    t = time.perf_counter()
    pq.ParquetFile(io.BytesIO(data), **PARQUET_READ).read(columns=cols)
    plan_s = time.perf_counter() - t
    t = time.perf_counter()
    pq.ParquetFile(io.BytesIO(data), **PARQUET_READ).read()
    all_s = time.perf_counter() - t
    return {"bytes": len(data), "write_s": write_s, "plan_columns_s": plan_s, "all_columns_s": all_s}


def compare(table, repeats: int) -> dict:
    runs: dict[str, list[dict]] = {"snappy": [], "zstd": []}
    for r in range(repeats):
        for codec in (["snappy", "zstd"] if r % 2 == 0 else ["zstd", "snappy"]):
            runs[codec].append(measure(table, codec))

    def med(codec: str, k: str) -> float:
        xs = sorted(x[k] for x in runs[codec])
        return xs[len(xs) // 2]

    out = {"rows": table.num_rows}
    for codec in runs:
        out[codec] = {"bytes_per_row": round(med(codec, "bytes") / table.num_rows, 1),
                      **{k: round(med(codec, k), 4) for k in ("write_s", "plan_columns_s", "all_columns_s")}}
    out["zstd_bytes_over_snappy"] = round(out["zstd"]["bytes_per_row"] / out["snappy"]["bytes_per_row"], 3)
    out["zstd_plan_read_over_snappy"] = round(out["zstd"]["plan_columns_s"] / out["snappy"]["plan_columns_s"], 3)
    out["zstd_all_read_over_snappy"] = round(out["zstd"]["all_columns_s"] / out["snappy"]["all_columns_s"], 3)
    return out


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rows", type=int, default=2_000_000)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--demo-catalog", default=None, help="a catalog folder with urls and captions (e.g. demo-out/pool/catalog)")
    ap.add_argument("--out", default="bench-out")
    a = ap.parse_args()
    import pyarrow as pa
    import pyarrow.parquet as pq

    res = {"synthetic": compare(synthetic_catalog(a.rows), a.repeats)}
    if a.demo_catalog:
        files = sorted(glob.glob(os.path.join(a.demo_catalog, "*.parquet")))
        res["demo"] = compare(pa.concat_tables([pq.read_table(f) for f in files]), a.repeats)
    print(f"{'catalog':10s} {'rows':>9s} {'codec':7s} {'B/row':>7s} {'write s':>8s} {'plan cols s':>12s} {'all cols s':>11s}")
    for name, r in res.items():
        for codec in ("snappy", "zstd"):
            c = r[codec]
            print(f"{name:10s} {r['rows']:9d} {codec:7s} {c['bytes_per_row']:7.1f} {c['write_s']:8.3f} {c['plan_columns_s']:12.4f} {c['all_columns_s']:11.4f}")
        print(f"{'':10s} zstd/snappy: bytes {r['zstd_bytes_over_snappy']}, plan columns read {r['zstd_plan_read_over_snappy']}, "
              f"all columns read {r['zstd_all_read_over_snappy']}")
    os.makedirs(a.out, exist_ok=True)
    with open(os.path.join(a.out, "catalog_codec.json"), "w") as f:
        json.dump({"command": " ".join(["python", *sys.argv]), **res}, f, indent=1)
    print(f"\ncommand: python {' '.join(sys.argv)}   (figures in {a.out}/catalog_codec.json)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
