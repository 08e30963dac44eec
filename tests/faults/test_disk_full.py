"""Disk full: each stage writing into a size-limited tmpfs fails with one line naming the path, leaves
nothing a later run would take as complete, and completes after space is freed and the command re-run.

The output lives on a tmpfs the test mounts (root here; skipped with the reason where mounting is not
allowed). The uninterrupted run writes into it first (large mount) and is moved aside; the mount is
then shrunk below that run's size, the same command fails, the mount is grown back (``remount``: the
failed run's files stay), and the same command re-runs. Its output must equal the uninterrupted
run's byte for byte: a file that a full disk left torn but marked complete would be skipped by the
re-run and show up as a difference.

Runs are in-process through ``laiontools.cli.main`` (the CLI's own error handling, exit codes and
stderr) on the session's Spark, with the argv a subprocess would get.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from contextlib import contextmanager

import pytest
from faultkit import (
    CLI,
    DEDUP_JSON_EXCEPT,
    DEDUP_VARYING,
    RUN_VARYING,
    digests,
    files,
    has_traceback,
    json_equal_except,
    load_json,
    record,
    tree_diff,
)

pytestmark = pytest.mark.slow

PAGE = 4096


@contextmanager
def tmpfs(path: str, kb: int):
    os.makedirs(path, exist_ok=True)
    r = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={kb}k", "tmpfs", path], capture_output=True, text=True, check=False)
    if r.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs at {path} ({r.stderr.strip()}); the disk-full tests need root or CAP_SYS_ADMIN")
    try:
        yield path
    finally:
        subprocess.run(["umount", "-l", path], capture_output=True, check=False)


def _resize(path: str, kb: int) -> None:
    subprocess.run(["mount", "-o", f"remount,size={kb}k", path], check=True, capture_output=True)


def _pages(root: str) -> int:
    """Bytes `root` takes on a tmpfs: every file rounded up to whole pages."""
    return sum(-(-os.path.getsize(os.path.join(root, f)) // PAGE) * PAGE for f in files(root))


def _cli(monkeypatch, args: list[str]) -> int:
    from laiontools.cli import main

    monkeypatch.setattr(sys, "argv", [CLI[-1], *args] if len(CLI) == 1 else [*CLI[1:], *args])
    try:
        return main(list(args))
    finally:
        monkeypatch.undo()


def _disk_full(stage: str, make_args, tmp_path, monkeypatch, capfd, varying: tuple[str, ...] = (), fraction: float = 0.5,
               json_except: tuple[tuple[str, tuple[str, ...]], ...] = (), compare=None):
    """`compare(out, keep)`, when given, replaces the byte comparison (for stages whose two uninterrupted
    runs already differ in some bytes: download's tar mtimes, train's weights); it asserts what must hold."""
    mnt = str(tmp_path / "mnt")
    out = os.path.join(mnt, "out")
    args = make_args(out)
    keep = str(tmp_path / "uninterrupted")
    with tmpfs(mnt, 256 * 1024):
        assert _cli(monkeypatch, args) == 0
        need = _pages(out)
        shutil.copytree(out, keep)
        shutil.rmtree(out)
        small = max(PAGE, int(need * fraction) // PAGE * PAGE)
        _resize(mnt, small // 1024)
        capfd.readouterr()
        rc = _cli(monkeypatch, args)
        err = capfd.readouterr().err
        record({"kind": "disk_full", "stage": stage, "fs_bytes": small, "output_bytes": need, "exit": rc,
                "error": [ln for ln in err.splitlines() if ln.startswith(f"laiontools {stage}: error:")]})
        assert rc == 2, f"{stage} on a full disk: exit {rc}\n{err[-4000:]}"
        assert not has_traceback(err), err[-4000:]
        lines = [ln for ln in err.splitlines() if ln.startswith(f"laiontools {stage}: error:")]
        assert len(lines) == 1, err[-4000:]
        assert "no space left on device" in lines[0] and mnt in lines[0], lines[0]
        left = files(out) if os.path.isdir(out) else []
        _resize(mnt, 256 * 1024)
        assert _cli(monkeypatch, args) == 0, capfd.readouterr().err[-4000:]
        if compare is not None:
            compare(out, keep)
            record({"kind": "disk_full_resume", "stage": stage, "files_left_by_failure": len(left), "identical": "content"})
            return
        ignore = RUN_VARYING + varying
        diff = tree_diff(digests(out, ignore), digests(keep, ignore))
        record({"kind": "disk_full_resume", "stage": stage, "files_left_by_failure": len(left), "identical": not diff})
        assert not diff, f"{stage}: output after a full disk and a re-run differs from the uninterrupted run:\n{diff}"
        for pattern, keys in json_except:
            json_equal_except(out, keep, pattern, keys)


def test_reshard_disk_full(chain, tmp_path, monkeypatch, capfd):
    _disk_full("reshard", lambda out: ["reshard", "--manifest", chain.subset, "--output", out, "--shard-size", "6"],
               tmp_path, monkeypatch, capfd)


def test_embed_disk_full(chain, tmp_path, monkeypatch, capfd):
    _disk_full("embed", lambda out: ["embed", "--manifest", chain.pool, "--output", out, "--model", "lt-tiny",
                                     "--batch-size", "8", "--num-workers", "0", "--device", "cpu"],
               tmp_path, monkeypatch, capfd, varying=("embed_report.json", "meta/*.parquet.done"),  # see test_kill
               json_except=(("meta/*.parquet.done", ("seconds",)),))


def test_subsets_disk_full(chain, tmp_path, monkeypatch, capfd):
    n = int(load_json(chain.pool)["num_samples"])
    _disk_full("subsets", lambda out: ["subsets", "--pool", chain.pool, "--output", out, "--scales", f"{n - 4},{n // 2}",
                                       "--seed", "3"], tmp_path, monkeypatch, capfd)


def test_dedup_disk_full(chain, tmp_path, monkeypatch, capfd):
    _disk_full("dedup", lambda out: ["dedup", "--embeddings", chain.emb, "--evalset", f"glyphs={chain.evalset}:imagefolder",
                                     "--output", out], tmp_path, monkeypatch, capfd,
               varying=DEDUP_VARYING, json_except=DEDUP_JSON_EXCEPT)


def test_download_disk_full(pool, tmp_path, monkeypatch, capfd):
    """The whole download (prepare, img2dataset's shards, the catalog, the manifest) on a full disk;
    compared by content after the re-run (re-fetched shards carry new tar mtimes: see test_kill)."""
    from faultkit import download_comparable

    c = pool.config
    flaky = set(pool.expected.loc[pool.expected["route"] == "flaky", "expected_uid"])

    def same_pool(out: str, keep: str) -> None:
        import pandas as pd

        got, want = download_comparable(out, flaky), download_comparable(keep, flaky)
        pd.testing.assert_frame_equal(got[0], want[0])
        assert got[1] == want[1] and got[2] == want[2]

    _disk_full("download", lambda out: ["download", "--input", pool.source, "--output", out, "--allow-networks",
                                        *c.allow_networks, "--number-sample-per-shard", str(c.number_sample_per_shard),
                                        "--shards-per-file", str(c.shards_per_file), "--timeout", str(c.timeout),
                                        "--retries", str(c.retries), "--image-size", str(c.image_size),
                                        "--thread-count", str(c.thread_count)],
               tmp_path, monkeypatch, capfd, compare=same_pool)


def test_train_disk_full(chain, tmp_path, monkeypatch, capfd):
    """train (torchrun, one CPU process) writing its checkpoints onto a full disk; compared by what
    a fault must not change (weights differ between two uninterrupted runs: see test_kill)."""

    def same_run(out: str, keep: str) -> None:
        assert sorted(digests(out, RUN_VARYING)) == sorted(digests(keep, RUN_VARYING))
        got, want = load_json(os.path.join(out, "result.json")), load_json(os.path.join(keep, "result.json"))
        assert (got["samples_seen"], got["steps"]) == (want["samples_seen"], want["steps"]) == (32, 4)
        with open(os.path.join(out, "metrics.jsonl")) as f:
            import json

            assert [json.loads(x)["step"] for x in f] == [1, 2, 3, 4]

    _disk_full("train", lambda out: ["train", "--manifest", chain.resharded, "--model", "lt-tiny", "--samples-seen", "32",
                                     "--batch-size", "8", "--nproc", "1", "--workers", "0", "--checkpoint-every", "16",
                                     "--log-every", "1", "--resume", "--output", out],
               tmp_path, monkeypatch, capfd, compare=same_run)


def test_prepare_disk_full(chain, tmp_path, monkeypatch, capfd):
    """prepare's Spark writes (rejected rows, accepted shard files, stats, the folder's marker) on a full
    disk; compared as in the kill test (faultkit.assert_same_prepared)."""
    from faultkit import assert_same_prepared, prepare_args

    _disk_full("prepare", lambda out: prepare_args(chain.source, out), tmp_path, monkeypatch, capfd,
               compare=assert_same_prepared)


def test_study_disk_full(tmp_path, monkeypatch, capfd):
    """study (two trainings, their evaluations, results, fits, plots, report) on a full disk; compared
    by what a fault must not change (weights differ between two uninterrupted runs: see test_kill)."""
    from faultkit import assert_same_study, study_args

    _disk_full("study", lambda out: study_args(str(tmp_path), out), tmp_path, monkeypatch, capfd,
               compare=assert_same_study)
