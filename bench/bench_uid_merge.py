"""subsets --update's comparison of an old and a new subset's uid files, against a plain read of them.

    .venv/bin/python bench/bench_uid_merge.py [--uids 20000000] [--work /tmp/bum] [--out bench-out]

Two sorted uid files as a takedown and an update leave them: `new` is `old` less 1 % of its uids, plus
1 % of uids it did not hold; the takedown list names half of the removed ones. Times, alternating, median
of --repeats:

* merge:  ``uids.compare_sorted(old, new, taken_down)``: old - new, new - old, and both files' members
          of the list, in one merge of the files read 16 MB at a time (what subset_diff runs per scale);
* read:   the same two files read sequentially, 16 MB at a time, doing nothing with the bytes (the floor);
* record: the one merge with the membership test done as numpy's binary search on the (hi, lo)
          records, as ``uids.contains`` did before 2026-12-04 (one of its five passes, not all five).

Checks the merge's four results against numpy's own set operations on the whole arrays. Prints
read s / merge s (1.0: the merge costs no more than reading the files) and record s / merge s.
Figures go to <out>/uid_merge.json.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from laiontools.contracts import uids as U


def _files(work: str, n: int) -> tuple[str, str, np.ndarray, tuple[np.ndarray, ...]]:
    rng = np.random.default_rng(0)

    def draw(k: int) -> np.ndarray:
        a = np.empty(k, U.UID_DTYPE)
        a["hi"] = rng.integers(0, 2**63, k, dtype=np.uint64) * 2 + 1
        a["lo"] = rng.integers(0, 2**63, k, dtype=np.uint64)
        return a

    old = U.sort_unique(draw(n))
    drop = rng.random(n) < 0.01
    added = U.sort_unique(draw(n // 100))
    new = U.sort_unique(np.concatenate([old[~drop], added]))
    few = old[drop][::2]
    os.makedirs(work, exist_ok=True)
    a, b = os.path.join(work, "old.npy"), os.path.join(work, "new.npy")
    U.save_uids(a, old)
    U.save_uids(b, new)
    # the expected results, by numpy's set operations on the uids as 16-byte void values (sorted by bytes)
    def v(x: np.ndarray) -> np.ndarray:
        return np.ascontiguousarray(x).view(np.dtype((np.void, 16)))

    want = tuple(np.setdiff1d(v(x), v(y)) if y is not None else np.intersect1d(v(x), v(few))
                 for x, y in ((old, new), (new, old), (old, None), (new, None)))
    return a, b, few, want


def _read(a: str, b: str) -> int:
    n = 0
    for p in (a, b):
        with open(p, "rb") as f:
            while chunk := f.read(U.UID_SCAN_BYTES):
                n += len(chunk)
    return n


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--uids", type=int, default=20_000_000)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--work", default="/tmp/bench-uid-merge")
    ap.add_argument("--out", default="bench-out")
    a = ap.parse_args(argv)
    old, new, few, want = _files(a.work, a.uids)
    times: dict[str, list[float]] = {"merge": [], "read": [], "record": []}
    for r in range(a.repeats):
        t = time.perf_counter()
        got = U.compare_sorted(old, new, few)
        times["merge"].append(time.perf_counter() - t)
        if r == 0:
            for g, w in zip(got, want):
                assert U.is_sorted_unique(g) and np.array_equal(np.sort(np.ascontiguousarray(g).view(np.dtype((np.void, 16)))), w)
        t = time.perf_counter()
        _read(old, new)
        times["read"].append(time.perf_counter() - t)
        real = U.contains
        U.contains = U.contains_by_records  # the search contains did before
        try:
            t = time.perf_counter()
            U.compare_sorted(old, new, few)
            times["record"].append(time.perf_counter() - t)
        finally:
            U.contains = real
    med = {k: sorted(v)[len(v) // 2] for k, v in times.items()}
    mb = (os.path.getsize(old) + os.path.getsize(new)) / 1e6
    out = {"uids": a.uids, "mb": round(mb, 1), "removed": len(want[0]), "added": len(want[1]), "taken_down": len(few),
           "seconds": {k: [round(x, 3) for x in v] for k, v in times.items()},
           "merge_mb_s": round(mb / med["merge"], 1), "read_mb_s": round(mb / med["read"], 1),
           "read_over_merge": round(med["read"] / med["merge"], 3), "record_over_merge": round(med["record"] / med["merge"], 2)}
    os.makedirs(a.out, exist_ok=True)
    with open(os.path.join(a.out, "uid_merge.json"), "w") as f:
        json.dump(out, f, indent=2)
    print(json.dumps(out))
    print(f"\n{a.uids:,} uids a file, {mb:.0f} MB: merge {med['merge']:.2f} s ({out['merge_mb_s']} MB/s), plain read "
          f"{med['read']:.2f} s; read/merge {out['read_over_merge']}, record-compare merge/merge {out['record_over_merge']}")
    for p in (old, new):
        os.remove(p)
    return 0


if __name__ == "__main__":
    sys.exit(main())
