"""uid-file membership on Spark: the Arrow UDF against the pandas UDF it replaced, same rows, same run.

    .venv/bin/python bench/bench_membership.py [--rows 4000000] [--rounds 3] [--out bench-out]

Subsets' exclusions and reshard's plan ask, for every catalog row (2B at LAION-2B), whether its uid
is in a uid file: ``contracts.uids.member_column``. On pyspark 4.1+ that is an Arrow UDF reading the
uid strings straight from the Arrow buffer; before, a pandas UDF (a Python string per row). This
bench counts ``catalog.filter(member)`` with each, alternated ``--rounds`` times on the same rows
(uids made in the JVM: ``md5(id)``, 32 hex characters; the uid file holds a fifth of them), and
checks both counts against the number of uids written to the file. Reported: median seconds of each,
their ratio, and the per-row cost of the UDF bodies alone (no Spark) on one 256k-row Arrow batch.
Figures go to ``<out>/membership.json``.
"""

from __future__ import annotations

import argparse
import hashlib
import os
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import write_figures


def bodies(rows: int = 1 << 18) -> dict[str, float]:
    """ns per uid of the two UDF bodies on one Arrow batch (median of 5)."""
    import numpy as np
    import pyarrow as pa

    from laiontools.contracts.uids import member_arrow, member_series, save_uids

    uids = [hashlib.md5(str(i).encode()).hexdigest() for i in range(rows)]
    with tempfile.TemporaryDirectory() as d:
        path = os.path.join(d, "u.npy")
        save_uids(path, uids[::5])
        col = pa.array(uids)
        out: dict[str, list[float]] = {"pandas": [], "arrow": []}
        for _ in range(5):
            t = time.perf_counter()
            a = member_series(col.to_pandas(), path).to_numpy()
            out["pandas"].append(time.perf_counter() - t)
            t = time.perf_counter()
            b = np.asarray(member_arrow(col, path))
            out["arrow"].append(time.perf_counter() - t)
            if not (a == b).all() or int(a.sum()) != len(uids[::5]):
                raise SystemExit("the two bodies disagree")
    return {k: round(sorted(v)[2] / rows * 1e9, 1) for k, v in out.items()}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--rows", type=int, default=4_000_000)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--out", default="bench-out")
    a = p.parse_args()

    from pyspark.sql import functions as F

    from laiontools.contracts.uids import member_column, save_uids
    from laiontools.core.spark import spark_session

    load_before = [round(x, 1) for x in os.getloadavg()]
    body_ns = bodies()
    inside = [hashlib.md5(str(i).encode()).hexdigest() for i in range(0, a.rows, 5)]
    with tempfile.TemporaryDirectory() as d, spark_session("local[2]", app_name="bench-membership",
                                                           conf={"spark.ui.showConsoleProgress": "false"}) as spark:
        path = os.path.join(d, "u.npy")
        save_uids(path, inside)
        cat = spark.range(0, a.rows, numPartitions=8).select(F.md5(F.col("id").cast("string")).alias("uid")).cache()
        cat.count()  # made once, in memory: the runs below time the filter alone
        times: dict[str, list[float]] = {"pandas": [], "arrow": []}
        for _ in range(a.rounds):
            for name in ("pandas", "arrow"):
                t = time.perf_counter()
                n = cat.filter(member_column(F.col("uid"), path, arrow=name == "arrow")).count()
                times[name].append(time.perf_counter() - t)
                if n != len(inside):
                    raise SystemExit(f"{name}: {n} members, the uid file holds {len(inside)}")
    med = {k: sorted(v)[len(v) // 2] for k, v in times.items()}
    out = {
        "benchmark": "uid-file membership over a catalog on Spark: Arrow UDF vs pandas UDF",
        "rows": a.rows, "members": len(inside), "seconds": {k: [round(x, 2) for x in v] for k, v in times.items()},
        "median_s": {k: round(v, 2) for k, v in med.items()}, "pandas_over_arrow": round(med["pandas"] / med["arrow"], 2),
        "udf_body_ns_per_uid": body_ns, "machine": f"{os.cpu_count()} cpus, Spark local[2]",
        "loadavg_1_5_15": {"before": load_before, "after": [round(x, 1) for x in os.getloadavg()]},
        "command": ("python bench/bench_membership.py " + " ".join(sys.argv[1:])).strip(),
    }
    return write_figures(a.out, "membership.json", out)


if __name__ == "__main__":
    sys.exit(main())
