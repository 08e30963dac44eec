"""Inputs of the fault-injection suite, built once per session from the shared downloaded pool.

Each stage's input is the previous stage's real output, made in-process through the CLI entry point
(`laiontools.cli.main`) on the session's local[2] Spark: embeddings of the pool (lt-tiny, random
init), a nested pair of subsets, and the larger subset resharded. Tests that kill a stage run it as a
subprocess, through the console script, like a user would.
"""

from __future__ import annotations

import dataclasses
import json
import os
import sys

import pytest

sys.path.insert(0, os.path.dirname(__file__))


@dataclasses.dataclass
class Chain:
    pool: str  # pool.manifest.json
    pool_dir: str
    source: str  # the synthetic source metadata the pool was downloaded from
    evalset: str  # ImageFolder evaluation set (planted copies are in the pool)
    emb: str  # embed output folder
    subsets: str  # subsets output folder
    subset: str  # the larger subset's manifest
    resharded: str  # reshard output's manifest


@pytest.fixture(scope="session")
def chain(request, spark, tmp_path_factory) -> Chain:
    """The chain of real outputs; with ``LAIONTOOLS_FAULTS_REUSE=<dir>`` holding a ``chain.json`` (the
    fields of :class:`Chain`), one built earlier (saves minutes when iterating on one test)."""
    reuse = os.environ.get("LAIONTOOLS_FAULTS_REUSE")
    if reuse and os.path.exists(os.path.join(reuse, "chain.json")):
        with open(os.path.join(reuse, "chain.json")) as f:
            return Chain(**json.load(f))
    return build_chain(request.getfixturevalue("pool"), str(tmp_path_factory.mktemp("chain")))


def build_chain(pool, root: str) -> Chain:
    """embed, subsets and reshard of `pool` (the session's downloaded pool) under `root`."""
    from laiontools.cli import main

    emb, sub, rs = f"{root}/emb", f"{root}/subsets", f"{root}/reshard"
    assert main(["embed", "--manifest", pool.manifest, "--output", emb, "--model", "lt-tiny", "--batch-size", "8",
                 "--num-workers", "0", "--device", "cpu"]) == 0
    n = _num_samples(pool.manifest)
    assert main(["subsets", "--pool", pool.manifest, "--output", sub, "--scales", f"{n - 4},{n // 2}", "--seed", "7"]) == 0
    subset = _manifest_in(sub, n - 4)
    assert main(["reshard", "--manifest", subset, "--output", rs, "--shard-size", "6"]) == 0
    return Chain(pool.manifest, pool.dir, pool.source, pool.evalset_dir, emb, sub, subset,
                 os.path.join(rs, "subset.manifest.json"))


def _num_samples(manifest: str) -> int:
    from laiontools.contracts.manifest import read_manifest

    return int(read_manifest(manifest)["num_samples"])


def _manifest_in(folder: str, n: int) -> str:
    """The manifest in `folder` of the subset with `n` samples."""
    for root, _, names in os.walk(folder):
        for name in names:
            if name.endswith(".manifest.json"):
                path = os.path.join(root, name)
                if _num_samples(path) == n:
                    return path
    raise AssertionError(f"no subset of {n} samples in {folder}: {sorted(os.listdir(folder))}")
