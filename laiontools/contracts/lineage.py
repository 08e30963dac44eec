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
after its last uid, the size is kept (unless the pool ran short), and, when the next larger new subset is
given, the new subset is exactly its N lowest-ranked uids (so the added ones are the *next* ones).
"""

from __future__ import annotations

from typing import Any

import numpy as np

from laiontools.contracts.manifest import manifest_sha256, read_manifest, resolve
from laiontools.contracts.selection import selection_scores
from laiontools.contracts.uids import array_to_uids, contains, load_uids

MAX_HOPS = 64


def pool_chain(path: str, manifest: dict[str, Any] | None = None) -> list[tuple[str, dict[str, Any], str]]:
    """[(path, manifest, sha256)] from the pool at `path` up through every parent pool (takedown lineage),
    nearest first. Stops at a pool without a parent or whose parent is not a pool. Raises ManifestError
    when a recorded parent cannot be read or no longer has the recorded sha256 (the lineage was changed)."""
    from laiontools.contracts.schema import ManifestError

    m = manifest if manifest is not None else read_manifest(path)
    out = [(path, m, manifest_sha256(path))]
    while len(out) < MAX_HOPS:
        parent = m.get("parent") or {}
        if m.get("kind") != "pool" or not parent.get("path"):
            break
        pp = resolve(path, parent["path"])
        pm = read_manifest(pp)
        if pm.get("kind") != "pool":
            break
        sha = manifest_sha256(pp)
        if sha != parent["sha256"]:
            raise ManifestError(f"{path}: its parent pool {pp} has sha256 {sha}, not the recorded {parent['sha256']}; "
                                "the parent changed after the takedown")
        out.append((pp, pm, sha))
        path, m = pp, pm
    return out


def lineage_root(path: str, manifest: dict[str, Any] | None = None) -> tuple[str, dict[str, Any]]:
    """The first pool up the chain that no takedown made (the download's pool): its samples include every
    sample of `path`'s, and those of every pool between."""
    chain = pool_chain(path, manifest)
    for p, m, _ in chain:
        if "takedown" not in m:
            return p, m
    return chain[-1][0], chain[-1][1]


def uid_file(path: str, manifest: dict[str, Any]) -> np.ndarray:
    return np.asarray(load_uids(resolve(path, manifest["uids"]["path"])))


def taken_down(ancestor: tuple[str, dict[str, Any]], pool: tuple[str, dict[str, Any]]) -> np.ndarray:
    """Sorted uids that are samples of `ancestor` but not of `pool` (each a (path, manifest) pair)."""
    old, new = uid_file(*ancestor), uid_file(*pool)
    return old[~contains(new, old)] if len(old) else old


def _rank(arr: np.ndarray, seed: int) -> list[tuple[int, str]]:
    hexes = array_to_uids(arr)
    return sorted(zip((int(s) for s in selection_scores(hexes, seed)), hexes))


def subset_diff(old: np.ndarray, new: np.ndarray, removed_from_pool: np.ndarray, seed: int, *, target: int,
                eligible: int, larger_new: np.ndarray | None = None) -> dict[str, Any]:
    """What changed between subset uid arrays `old` and `new` (sorted UID_DTYPE) given the uids taken out
    of the pool, and the checks that nothing else moved. `larger_new`: the next larger new subset (None for
    the largest); `target` and `eligible` (the new run's eligible count) give the size it must have. Returns counts, the removed and added uids (hex, ranked), the old and new cuts and
    ``checks`` (name -> bool) with ``ok`` = all of them.

    Holds the uids of the subsets in memory (16 bytes each) and scores the changed ones only, plus the
    smaller subset's uids when `larger_new` is given: meant for the diff sizes takedowns give.
    """
    gone = old[~contains(new, old)] if len(old) else old
    came = new[~contains(old, new)] if len(new) else new
    hit = old[contains(removed_from_pool, old)] if len(removed_from_pool) and len(old) else old[:0]
    old_rank, came_rank = _rank(old, seed), _rank(came, seed)
    old_cut = old_rank[-1] if old_rank else None
    new_rank = _rank(new, seed)
    checks = {
        "removed_equals_old_and_taken_down": bool(len(gone) == len(hit) and (len(gone) == 0 or bool(np.all(gone == hit)))),
        "added_not_in_old": bool(not len(came) or not contains(old, came).any()),
        "added_rank_after_old_cut": bool(old_cut is None or not came_rank or came_rank[0] > old_cut),
        "size_is_target_or_all_eligible": bool(len(new) == min(target, eligible)),
        "no_taken_down_uid_in_new": bool(not len(removed_from_pool) or not contains(removed_from_pool, new).any()),
    }
    if larger_new is not None:
        lower = _rank(larger_new, seed)[: len(new)]
        checks["new_is_lowest_ranked_of_larger"] = [u for _, u in lower] == [u for _, u in new_rank]
    return {
        "counts": {"old": len(old), "new": len(new), "removed": len(gone), "added": len(came),
                   "kept": int(len(old) - len(gone)), "target": int(target)},
        "removed": [u for _, u in _rank(gone, seed)],
        "added": [u for _, u in came_rank],
        "old_cut": None if old_cut is None else {"score": f"{old_cut[0]:016x}", "uid": old_cut[1]},
        "new_cut": None if not new_rank else {"score": f"{new_rank[-1][0]:016x}", "uid": new_rank[-1][1]},
        "checks": checks,
        "ok": all(checks.values()),
    }
