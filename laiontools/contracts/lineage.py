"""Pool lineage after takedowns, and what `subsets --update` must prove about the subsets it re-derives.

A pool written by ``laiontools takedown`` names its parent pool (path + sha256) and carries a
``takedown`` record; its samples are the parent's minus the removed ones, its catalog the parent's rows
with ``removed_<reason>`` statuses. :func:`pool_chain` walks that chain; :func:`taken_down` gives the
uids removed between an ancestor and a descendant.

:func:`subset_diff` compares a subset before and after: with the seeded ranking of
:mod:`laiontools.contracts.selection` (a subset of size N is the N lowest (score, uid) of the eligible
uids), removing uids from the eligible set changes the subset of size N into the old one minus the
removed uids plus the next-ranked eligible uids, as many as were removed. The checks here prove that from
the uid files alone: removed == old ∩ taken-down, the added uids are not in the old subset and all rank
after its last uid (the old manifest's recorded ``selection.cut``), the size is kept (unless the pool ran
short), and, when the next larger new subset is given, the new subset is exactly its N lowest-ranked uids
(so the added ones are the *next* ones). Ranking happens in the driver (numpy, one blake2b per uid in
Python): above RANK_CHECK_MAX uids those two checks are reported as skipped, never as passed.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from laiontools.contracts.manifest import manifest_sha256, read_manifest_sha256, resolve
from laiontools.contracts.selection import selection_scores
from laiontools.contracts.uids import array_to_uids, load_uids, sort_uids

MAX_HOPS = 64


def pool_chain(path: str, manifest: dict[str, Any] | None = None,
               sha256: str | None = None) -> list[tuple[str, dict[str, Any], str]]:
    """[(path, manifest, sha256)] from the pool at `path` up through every parent pool (takedown lineage),
    nearest first. Stops at a pool without a parent or whose parent is not a pool. Raises ManifestError
    when a recorded parent cannot be read or no longer has the recorded sha256 (the lineage was changed).
    `manifest` and `sha256`: the pool's, when the caller read them (the file is then not read again).
    Each manifest is read once, parsed and hashed from the same bytes (a round trip each on an object store)."""
    from laiontools.contracts.schema import ManifestError

    if manifest is None:
        m, sha = read_manifest_sha256(path)
    else:
        m, sha = manifest, sha256 if sha256 is not None else manifest_sha256(path)
    out = [(path, m, sha)]
    while len(out) < MAX_HOPS:
        parent = m.get("parent") or {}
        if m.get("kind") != "pool" or not parent.get("path"):
            break
        pp = resolve(path, parent["path"])
        try:
            pm, sha = read_manifest_sha256(pp)
        except ManifestError as e:  # named as this pool's parent, not as the pool the user gave
            raise ManifestError(f"{path}: its parent pool {pp} (recorded by the takedown that made it) cannot be read: {e}. "
                                "A takedown pool references its parent's unchanged shards and lineage: keep the parent "
                                "where it was, or give the pool a takedown made before it was moved") from e
        if pm.get("kind") != "pool":
            break
        if sha != parent["sha256"]:
            raise ManifestError(f"{path}: its parent pool {pp} has sha256 {sha}, not the recorded {parent['sha256']}; "
                                "the parent changed after the takedown")
        out.append((pp, pm, sha))
        path, m = pp, pm
    return out


def lineage_root(path: str, manifest: dict[str, Any] | None = None, sha256: str | None = None) -> tuple[str, dict[str, Any]]:
    """The first pool up the chain that no takedown made (the download's pool): its samples include every
    sample of `path`'s, and those of every pool between (`manifest`, `sha256`: as :func:`pool_chain`)."""
    chain = pool_chain(path, manifest, sha256)
    for p, m, _ in chain:
        if "takedown" not in m:
            return p, m
    return chain[-1][0], chain[-1][1]


def taken_down(ancestor: tuple[str, dict[str, Any]], pool: tuple[str, dict[str, Any]]) -> np.ndarray:
    """Sorted uids that are samples of `ancestor` but not of `pool` (each a (path, manifest) pair), by a
    merge of the two uid files read in pieces (at 2B each is 32 GB; what a takedown removed is small)."""
    from laiontools.contracts.uids import compare_sorted

    (a, am), (p, pm) = ancestor, pool
    return compare_sorted(resolve(a, am["uids"]["path"]), resolve(p, pm["uids"]["path"])).a_only


# Above this many uids a subset is not ranked in the driver (one blake2b per uid in Python, ~1 us, and
# 40 bytes per uid): the checks that need a full ranking are reported as skipped, the set checks still run.
RANK_CHECK_MAX = 20_000_000


def _ranked(arr: np.ndarray, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """(uids in rank order, their scores): rank = (seeded score, uid), as subsets selects."""
    scores = selection_scores(array_to_uids(arr), seed)
    order = np.lexsort((arr["lo"], arr["hi"], scores))
    return arr[order], scores[order]


def _key(arr: np.ndarray, scores: np.ndarray, i: int) -> tuple[int, int, int]:
    return int(scores[i]), int(arr["hi"][i]), int(arr["lo"][i])


def _cut_key(cut: dict[str, str]) -> tuple[int, int, int]:
    """A recorded cut (:func:`cut_record`) as the rank key :func:`_key` gives."""
    return int(cut["score"], 16), int(cut["uid"][:16], 16), int(cut["uid"][16:], 16)


def cut_record(score: int, uid: str, *, signed: bool = False) -> dict[str, str]:
    """How a subset manifest records its last selected (score, uid): the uint64 score as 16 hex. `signed`:
    `score` is the Spark-sortable int64 of :func:`laiontools.contracts.selection.to_signed_order`."""
    if signed:
        score = (score % (1 << 64)) ^ (1 << 63)
    return {"score": f"{score:016x}", "uid": uid}


def signed_cut(cut: dict[str, str]) -> tuple[int, str]:
    """A recorded cut as (the Spark-sortable int64 score the selection ranks by, uid): the inverse of
    ``cut_record(..., signed=True)``."""
    h = int(cut["score"], 16) ^ (1 << 63)
    return (h - (1 << 64) if h >= 1 << 63 else h), cut["uid"]


def _count(x: np.ndarray | str) -> int:
    from laiontools.contracts.uids import uid_file_layout

    return uid_file_layout(x)[1] if isinstance(x, str) else len(x)


def _load(x: np.ndarray | str) -> np.ndarray:
    """A subset's uids, held: only for the rank checks, which RANK_CHECK_MAX bounds (a 2B subset's file is 32 GB)."""
    return np.asarray(load_uids(x)) if isinstance(x, str) else x


def subset_diff(old: np.ndarray | str, new: np.ndarray | str, removed_from_pool: np.ndarray, seed: int, *, target: int,
                eligible: int, larger_new: np.ndarray | str | None = None, old_cut: dict[str, str] | None = None,
                between_cuts: tuple[dict[str, str] | None, int | None] | None = None,
                rank_check_max: int = RANK_CHECK_MAX) -> dict[str, Any]:
    """What changed between subset uid sets `old` and `new` (each a sorted UID_DTYPE array or the path of
    its uid file: a file is read in pieces, in one merge of the two, never held whole but for the bounded
    rank checks) given the uids taken out of the pool, and the checks that nothing else moved. `target`
    and `eligible` (the new run's eligible count) give the size it must have; `larger_new`: the next larger new subset (None for
    the largest); `old_cut`: the old run's recorded last (score, uid) (:func:`cut_record`), else it is
    computed by ranking `old`. `between_cuts`, for the largest subset (the others are ranked in the next
    larger): (the new run's recorded last (score, uid), the run's count of eligible uids ranking after
    `old_cut` and up to it); the added uids must rank in that range and be as many, so none was skipped (a
    count of None: the run could not count it, reported as skipped).
    Returns counts, the removed and added uids (hex, in rank order), the cuts, ``checks`` (name ->
    True/False, or None when skipped because a subset to rank has more than `rank_check_max` uids) and
    ``ok`` = no check False.

    Only the changed uids are always scored; ranking `old` (when its cut is not recorded) and
    `larger_new` is bounded by `rank_check_max`.
    """
    from laiontools.contracts.uids import compare_sorted

    n_old, n_new = _count(old), _count(new)
    # One merge of the two (in pieces when they are files) gives every set the checks need.
    gone, came, hit, new_hit = compare_sorted(old, new, removed_from_pool)
    gone_r, _ = _ranked(gone, seed)
    came_r, came_s = _ranked(came, seed)
    cut: tuple[int, int, int] | None = None
    if old_cut is not None:
        cut = _cut_key(old_cut)
    elif 0 < n_old <= rank_check_max:
        old_r, old_scores = _ranked(_load(old), seed)
        cut = _key(old_r, old_scores, len(old_r) - 1)
        old_cut = cut_record(cut[0], array_to_uids(old_r[-1:])[0])
    checks: dict[str, bool | None] = {
        "removed_equals_old_and_taken_down": bool(len(gone) == len(hit) and (len(gone) == 0 or bool(np.all(gone == hit)))),
        "counts_add_up": bool(n_old - len(gone) + len(came) == n_new),
        "added_rank_after_old_cut": None if cut is None and n_old else bool(not len(came) or _key(came_r, came_s, 0) > (cut or (-1, 0, 0))),
        "size_is_target_or_all_eligible": bool(n_new == min(target, eligible)),
        "no_taken_down_uid_in_new": bool(not len(new_hit)),
    }
    if between_cuts is not None:
        new_cut, n_between = between_cuts
        top = _key(came_r, came_s, len(came_r) - 1) if len(came) else None
        in_range = top is None or (new_cut is not None and top <= _cut_key(new_cut))
        checks["added_are_every_eligible_between_cuts"] = None if n_between is None else bool(in_range and len(came) == n_between)
    if larger_new is not None:
        if _count(larger_new) <= rank_check_max:
            lower = sort_uids(_ranked(_load(larger_new), seed)[0][:n_new])
            checks["new_is_lowest_ranked_of_larger"] = bool(len(lower) == n_new and np.array_equal(lower, _load(new)))
        else:
            checks["new_is_lowest_ranked_of_larger"] = None
    return {
        "counts": {"old": n_old, "new": n_new, "removed": len(gone), "added": len(came),
                   "kept": n_old - len(gone), "target": int(target)},
        "removed": array_to_uids(gone_r),
        "added": array_to_uids(came_r),
        "old_cut": old_cut,
        "checks": checks,
        "skipped": [k for k, v in checks.items() if v is None],
        "ok": all(v is not False for v in checks.values()),
    }
