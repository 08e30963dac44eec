"""Read-only inputs: no stage writes next to what it reads.

Each stage's input folders are made read-only *in place* for the run (a bind mount of the folder on
itself, remounted read-only: root ignores permission bits, a read-only mount it cannot), so paths
recorded in manifests still resolve. The stage must finish (exit 0) writing only into its output;
a write next to an input would fail with EROFS and end the run with exit 2. Skipped, with the
reason, where bind mounts are not permitted.
"""

from __future__ import annotations

import os
import subprocess
import sys
from contextlib import ExitStack, contextmanager

import pytest
from faultkit import CLI, digests, load_json, record

pytestmark = pytest.mark.slow


@contextmanager
def read_only(path: str):
    """`path` (a folder) read-only in place until the block ends."""
    r = subprocess.run(["mount", "--bind", path, path], capture_output=True, text=True, check=False)
    if r.returncode != 0:
        pytest.skip(f"cannot bind-mount {path} ({r.stderr.strip()}); the read-only tests need root or CAP_SYS_ADMIN")
    try:
        subprocess.run(["mount", "-o", "remount,ro,bind", path], check=True, capture_output=True)
        assert not os.access(path, os.W_OK) or _write_fails(path), f"{path} is still writable"
        yield path
    finally:
        subprocess.run(["umount", "-l", path], capture_output=True, check=False)


def _write_fails(path: str) -> bool:
    try:
        with open(os.path.join(path, ".probe"), "wb"):
            pass
    except OSError:
        return True
    os.remove(os.path.join(path, ".probe"))
    return False


def _run_ro(stage: str, args: list[str], inputs: list[str], monkeypatch, capfd) -> None:
    from laiontools.cli import main

    before = {p: digests(p, ()) for p in inputs}
    with ExitStack() as stack:
        for p in inputs:
            stack.enter_context(read_only(p))
        monkeypatch.setattr(sys, "argv", [CLI[-1], *args])
        capfd.readouterr()
        rc = main(list(args))
        monkeypatch.undo()
        err = capfd.readouterr().err
    record({"kind": "read_only", "stage": stage, "inputs": len(inputs), "exit": rc})
    assert rc == 0, f"{stage} with read-only inputs exited {rc}:\n{err[-4000:]}"
    assert {p: digests(p, ()) for p in inputs} == before


def test_prepare(chain, tmp_path, monkeypatch, capfd):
    src = os.path.dirname(chain.source)
    _run_ro("prepare", ["prepare", "--input", chain.source, "--output", str(tmp_path / "o"),
                        "--allow-networks", "127.0.0.0/8"], [src], monkeypatch, capfd)


def test_embed(chain, tmp_path, monkeypatch, capfd):
    _run_ro("embed", ["embed", "--manifest", chain.pool, "--output", str(tmp_path / "o"), "--model", "lt-tiny",
                      "--batch-size", "8", "--num-workers", "0", "--device", "cpu"], [chain.pool_dir], monkeypatch, capfd)


def test_dedup(chain, tmp_path, monkeypatch, capfd):
    _run_ro("dedup", ["dedup", "--embeddings", chain.emb, "--evalset", f"glyphs={chain.evalset}:imagefolder",
                      "--output", str(tmp_path / "o")], [chain.emb, chain.evalset], monkeypatch, capfd)


def test_subsets(chain, tmp_path, monkeypatch, capfd):
    n = load_json(chain.pool)["num_samples"]
    _run_ro("subsets", ["subsets", "--pool", chain.pool, "--output", str(tmp_path / "o"), "--scales", f"{n // 2}",
                        "--seed", "2", "--scores", chain.emb], [chain.pool_dir, chain.emb], monkeypatch, capfd)


def test_reshard(chain, tmp_path, monkeypatch, capfd):
    _run_ro("reshard", ["reshard", "--manifest", chain.subset, "--output", str(tmp_path / "o"), "--shard-size", "6"],
            [chain.pool_dir, chain.subsets], monkeypatch, capfd)


def test_verify(chain, tmp_path, monkeypatch, capfd):
    _run_ro("verify", ["verify", chain.resharded], [chain.pool_dir, chain.subsets, os.path.dirname(chain.resharded)],
            monkeypatch, capfd)
