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


def test_train(chain, tmp_path, monkeypatch, capfd):
    """train reads the resharded manifest, its shards and (through the manifest) the subset's uid file."""
    _run_ro("train", ["train", "--manifest", chain.resharded, "--model", "lt-tiny", "--samples-seen", "16", "--batch-size", "8",
                      "--nproc", "1", "--workers", "0", "--output", str(tmp_path / "run")],
            [os.path.dirname(chain.resharded), chain.subsets, chain.pool_dir], monkeypatch, capfd)


def test_study(tmp_path, monkeypatch, capfd):
    """The smallest grid (one scale, one budget): its manifest, shards, eval set and the YAML config
    itself read-only; study trains and evaluates into its own folder."""
    import yaml

    from laiontools.testing.train_pool import write_color_evalset, write_resharded_subset

    data = tmp_path / "data"
    subset = write_resharded_subset(str(data / "s16"), n_shards=1, per_shard=16, name="s16")
    ev = write_color_evalset(str(data / "colors"), per_class=2)["path"]
    cfg = data / "study.yaml"
    cfg.write_text(yaml.safe_dump({
        "output": str(tmp_path / "study"), "scales": {"16": subset}, "samples_seen": [16], "models": ["lt-tiny"],
        "batch_size": 8, "nproc": 1, "evalset": [f"colors={ev}:wds"], "train": {"workers": 0, "log_every": 1},
        "evaluate": {"batch_size": 16}}))
    _run_ro("study", ["study", "--config", str(cfg)], [str(data)], monkeypatch, capfd)
    assert os.path.exists(tmp_path / "study" / "results.csv")


def test_download(pool, tmp_path, monkeypatch, capfd):
    """download reads the source metadata (prepare) and the web; nothing may be written next to the source."""
    c = pool.config
    _run_ro("download", ["download", "--input", pool.source, "--output", str(tmp_path / "pool"), "--allow-networks",
                         *c.allow_networks, "--number-sample-per-shard", str(c.number_sample_per_shard),
                         "--shards-per-file", str(c.shards_per_file), "--timeout", str(c.timeout), "--retries", str(c.retries),
                         "--image-size", str(c.image_size), "--thread-count", str(c.thread_count)],
            [os.path.dirname(pool.source)], monkeypatch, capfd)
    # the same pool as the session's (the synthetic web's "flaky" row left out: which download met its
    # one failure depends on the order the tests ran in)
    import pandas as pd
    from faultkit import download_comparable

    flaky = set(pool.expected.loc[pool.expected["route"] == "flaky", "expected_uid"])
    pd.testing.assert_frame_equal(download_comparable(str(tmp_path / "pool"), flaky)[0], download_comparable(pool.dir, flaky)[0])
