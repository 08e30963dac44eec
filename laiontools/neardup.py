"""Near-duplicates inside one set of embeddings: spherical k-means, in-cluster pairs, groups, keepers.

The numerical core of SemDeDup (Abbas et al. 2023) as plain functions over numpy arrays, with no I/O,
so the ``semdedup`` stage can run them per Spark task and tests can check them against brute force:

* :func:`train_kmeans` / :func:`assign`: faiss spherical k-means (cosine), seeded;
* :func:`cluster_groups`: within one cluster, every pair with cosine > 1 - eps links two samples;
  linked samples form groups (connected components), one label array per eps. Pairs are found block
  by block (``block`` x ``block`` similarities at a time) and merged into the labels at once, so
  memory is O(n x eps count + block^2 + block x d) whatever the number of pairs, and the vectors may be
  a memory-mapped file larger than RAM;
* :func:`choose_keepers`: one member per group is kept by policy (``hard``: farthest from the cluster
  centroid, as in the paper; ``easy``: closest; ``random``: seeded), ties broken by uid so the choice
  never depends on input order.

Labels are the smallest member index of each group, so results are the same for the same inputs.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from typing import Any

import numpy as np

KEEP_POLICIES = ("hard", "easy", "random")


def normalize(x: np.ndarray) -> np.ndarray:
    """float32 copy of `x` with L2-normalized rows (zero rows stay zero)."""
    x = np.asarray(x, dtype=np.float32)
    n = np.linalg.norm(x, axis=1, keepdims=True)
    return np.divide(x, n, out=np.zeros_like(x), where=n > 0)


def train_kmeans(x: np.ndarray, k: int, seed: int, niter: int = 20, gpu: bool = False) -> np.ndarray:
    """(k, d) float32 unit-norm centroids of spherical k-means on the rows of `x` (float32, unit norm).

    faiss k-means with a fixed seed; faiss caps the points it trains on at 256 per centroid by
    default, which is also what makes a sample enough. Raises ValueError when `x` has fewer rows than `k`.
    """
    import faiss

    x = np.ascontiguousarray(x, dtype=np.float32)
    if x.shape[0] < k:
        raise ValueError(f"k-means with {k} clusters needs at least {k} training vectors, got {x.shape[0]}")
    km = faiss.Kmeans(x.shape[1], k, niter=niter, seed=seed, spherical=True, gpu=gpu, verbose=False)
    km.train(x)
    return normalize(km.centroids)


def assign(x: np.ndarray, centroids: np.ndarray, index: Any = None) -> tuple[np.ndarray, np.ndarray]:
    """(nearest centroid per row as int32, its cosine similarity as float32) for unit-norm rows of `x`.

    Each row's result is its own, whatever rows are searched with it: faiss's inner products come from
    BLAS, whose kernels (so the last bit of a row's value) depend on the batch's size, so two identical
    vectors searched in a small and a large shard could get different similarities (the keep policy's
    tie-break by uid lost) or, between two near-equal centroids, different clusters (never compared).
    faiss gives the two best candidates; each is scored again row by row in float64 (products of float32
    exact) and the better kept, the smaller centroid id on a tie. `index`: `centroids` as a faiss
    inner-product index, when the caller holds one.
    """
    import faiss

    c = np.ascontiguousarray(centroids, dtype=np.float32)
    if index is None:
        index = faiss.IndexFlatIP(c.shape[1])
        index.add(c)
    x = np.ascontiguousarray(x, dtype=np.float32)
    _, cand = index.search(x, min(2, c.shape[0]))
    cand = np.where(cand < 0, cand[:, :1], cand)  # (faiss pads with -1 only when there are fewer centroids)
    sims = np.empty(cand.shape, dtype=np.float64)
    for lo in range(0, len(x), 4096):  # float64 copies of 4096 rows at a time
        xs = x[lo:lo + 4096].astype(np.float64)
        for j in range(cand.shape[1]):
            sims[lo:lo + 4096, j] = (xs * c[cand[lo:lo + 4096, j]].astype(np.float64)).sum(axis=1)
    second = (sims[:, -1] > sims[:, 0]) | ((sims[:, -1] == sims[:, 0]) & (cand[:, -1] < cand[:, 0]))
    pick = second.astype(np.int64)
    rows = np.arange(len(x))
    return cand[rows, pick].astype(np.int32), sims[rows, pick].astype(np.float32)


def _roots(labels: np.ndarray, idx: np.ndarray) -> np.ndarray:
    r = idx
    while True:
        p = labels[r]
        if np.array_equal(p, r):
            return r
        r = p


def union(labels: np.ndarray, i: np.ndarray, j: np.ndarray) -> None:
    """Merge the groups of each pair (i[k], j[k]) in the union-find array `labels`, in place.

    Roots always point to a smaller index, so each group's root is its smallest member. Vectorized:
    all pairs are linked at once, repeated until every pair shares a root.
    """
    i, j = np.asarray(i, dtype=np.int64), np.asarray(j, dtype=np.int64)
    while len(i):
        ri, rj = _roots(labels, i), _roots(labels, j)
        m = ri != rj
        if not m.any():
            return
        i, j, ri, rj = i[m], j[m], ri[m], rj[m]
        lo, hi = np.minimum(ri, rj), np.maximum(ri, rj)
        np.minimum.at(labels, hi, lo)


def flatten(labels: np.ndarray) -> np.ndarray:
    """Every entry pointing straight at its root (the smallest member of its group)."""
    out = labels.copy()
    while True:
        nxt = out[out]
        if np.array_equal(nxt, out):
            return out
        out = nxt


# Thresholds for float32 similarities, exact in real numbers: numpy compares a float32 array with a Python
# float in float32, rounding the threshold first (either way). One helper per comparison: dedup's ``>=``,
# semdedup's ``>``.


def float32_floor(t: float) -> np.float32:
    """The largest float32 at or below `t`: for a float32 similarity s, ``s > floor`` exactly when ``s > t``
    in real numbers. float32(t) itself rounds up for some t (float32(1 - 0.005) = 0.99500000477), so a
    float32 cosine equal to it, over the threshold, was not ``> float32(t)``."""
    f = np.float32(t)
    return np.nextafter(f, np.float32(-np.inf)) if float(f) > t else f


def float32_cutoff(threshold: float) -> np.float32:
    """The smallest float32 at or above `threshold`: for a float32 similarity s, ``s >= cutoff`` exactly when
    ``s >= threshold`` in real numbers. Comparing float32 with the threshold itself rounds the threshold to
    float32 first (numpy compares a float32 array with a Python float in float32): float32(0.9) is
    0.8999999762, so a pool sample at that similarity was a duplicate at --threshold 0.9 while its reported
    similarity (and calibrate's float64 figures) are under 0.9."""
    cut = np.float32(threshold)
    if float(cut) < threshold:  # float(): np.float32 < float would compare in float32 again
        cut = np.nextafter(cut, np.float32(np.inf))
    return cut


def cluster_groups(x: np.ndarray, eps: Sequence[float], block: int = 4096) -> tuple[np.ndarray, np.ndarray]:
    """Groups of near-duplicates among the rows of `x` (one cluster's unit-norm vectors), per eps.

    Two rows are linked when their cosine similarity is > 1 - eps; groups are the connected
    components. Returns (labels (len(eps), n) int64 — the smallest row index of each row's group —,
    pair counts per eps (number of linked pairs, for the report)). `x` may be a memory map: it is read
    ``block`` rows at a time, float32 in memory only for two blocks; each pair of blocks is one faiss
    range search (exact inner products, so the same pairs as a brute-force comparison).
    """
    n = x.shape[0]
    thr = np.asarray([float32_floor(1.0 - float(e)) for e in eps], dtype=np.float32)
    labels = np.tile(np.arange(n, dtype=np.int64), (len(eps), 1))
    pairs = np.zeros(len(eps), dtype=np.int64)
    if n < 2:
        return labels, pairs
    import faiss

    low = float(thr.min())
    # Pairs are symmetric: only tiles on or above the diagonal are searched. Tiles of 1024 rows halve the
    # inner products of a large cluster at full BLAS speed; a cluster of up to 2048 rows is one tile.
    block = block if n <= 2048 else min(block, 1024)
    for a in range(0, n, block):
        xa = np.ascontiguousarray(x[a:a + block], dtype=np.float32)
        for b in range(a, n, block):
            xb = xa if b == a else np.ascontiguousarray(x[b:b + block], dtype=np.float32)
            # faiss's range search keeps the pairs above the threshold inside its (multi-threaded) BLAS
            # loop: no block^2 similarity matrix or boolean mask in Python, as bare faiss would do it
            index = faiss.IndexFlatIP(xb.shape[1])
            index.add(xb)
            lims, sv, jj = index.range_search(xa, low)
            ii = np.repeat(np.arange(len(xa), dtype=np.int64), np.diff(lims).astype(np.int64))
            jj = jj.astype(np.int64, copy=False)
            if b == a:  # each unordered pair once, no self pairs
                keep = jj > ii
                ii, jj, sv = ii[keep], jj[keep], sv[keep]
            if not len(ii):
                continue
            gi, gj = ii + a, jj + b
            for e, t in enumerate(thr):
                m = sv > t
                pairs[e] += int(m.sum())
                union(labels[e], gi[m], gj[m])
    for e in range(len(eps)):
        labels[e] = flatten(labels[e])
    return labels, pairs


def sample_key(uids: np.ndarray, seed: int) -> np.ndarray:
    """A seeded pseudo-random uint64 per uid (``UID_DTYPE``; splitmix64 over its two halves),
    vectorized and independent of order: semdedup's k-means sample. (The ``random`` keep policy's
    :func:`_random_key` is the same idea, one blake2b per group member; it stays, as its choices are
    recorded in existing reports.)"""

    def mix(z: np.ndarray) -> np.ndarray:
        z = z + np.uint64(0x9E3779B97F4A7C15)
        z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
        z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
        return z ^ (z >> np.uint64(31))

    salt = np.uint64((int(seed) * 0x9E3779B97F4A7C15) & 0xFFFFFFFFFFFFFFFF)
    with np.errstate(over="ignore"):
        return mix(mix(uids["hi"] ^ salt) ^ uids["lo"])


def _random_key(uids: np.ndarray, seed: int) -> np.ndarray:
    """A seeded pseudo-random uint64 per uid (u8,u8), independent of order."""
    out = np.empty(len(uids), dtype=np.uint64)
    salt = int(seed).to_bytes(8, "little", signed=True)
    for k, (hi, lo) in enumerate(zip(uids["hi"].tolist(), uids["lo"].tolist())):
        d = hashlib.blake2b(salt + int(hi).to_bytes(8, "little") + int(lo).to_bytes(8, "little"), digest_size=8).digest()
        out[k] = int.from_bytes(d, "little")
    return out


def choose_keepers(labels: np.ndarray, centroid_sim: np.ndarray, uids: np.ndarray, policy: str, seed: int = 0) -> np.ndarray:
    """The kept row of each row's group (int64, len n); a row is removed when it is not its own keeper.

    `labels`: group labels of one eps (from :func:`cluster_groups`); `centroid_sim`: each row's cosine
    to its cluster centroid; `uids`: UID_DTYPE array (tie-break, and the ``random`` policy's key).
    """
    if policy not in KEEP_POLICIES:
        raise ValueError(f"keep policy must be one of {KEEP_POLICIES}, got {policy!r}")
    n = len(labels)
    if policy == "hard":
        primary = centroid_sim.astype(np.float64)
    elif policy == "easy":
        primary = -centroid_sim.astype(np.float64)
    else:
        primary = _random_key(uids, seed)
    order = np.lexsort((uids["lo"], uids["hi"], primary))  # last key sorts first
    # Stable sort by group label: each group's first row in `order` is its keeper. The groups come out
    # in ascending label order, as np.unique(labels) lists them.
    by_group = order[np.argsort(labels[order], kind="stable")]
    lab_sorted = labels[by_group]
    starts = np.flatnonzero(np.r_[True, lab_sorted[1:] != lab_sorted[:-1]])
    _, inv = np.unique(labels, return_inverse=True)
    keeper = by_group[starts][inv].astype(np.int64, copy=False)
    assert len(keeper) == n
    return keeper
