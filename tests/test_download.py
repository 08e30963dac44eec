"""The download job end to end: synthetic web on 127.0.0.1 -> Spark local[2] + img2dataset -> pool.

The session-scoped `pool` fixture (conftest) is one real run; these tests check what it wrote, then
kill and resume a run through the CLI, run a retry pass, and run the job through spark-submit on a
standalone Spark cluster started on 127.0.0.1.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tarfile
import time
from pathlib import Path

import pandas as pd
import pytest

from laiontools.contracts import layout
from laiontools.contracts import schema as C
from laiontools.contracts.manifest import read_manifest, resolve
from laiontools.contracts.uids import array_to_uids, contains, load_uids, uids_to_array
from laiontools.core.storage import sha256_file
from laiontools.testing import TEST_DOWNLOAD_SETTINGS


def _catalog(pool_dir: str) -> pd.DataFrame:
    return pd.read_parquet(os.path.join(pool_dir, layout.CATALOG_DIR))


def _by_row(pool_dir: str, expected: pd.DataFrame) -> pd.DataFrame:
    cat = _catalog(pool_dir)
    exp = expected.assign(source_id=expected["SAMPLE_ID"].astype(str))
    return exp.merge(cat, on="source_id", how="left", validate="one_to_one")


def test_every_input_row_is_a_catalog_row_with_the_expected_status(pool):
    cat = _catalog(pool.dir)
    assert len(cat) == len(pool.expected), "every input row must land in the catalog exactly once"
    m = _by_row(pool.dir, pool.expected)
    bad = m[m["status"] != m["expected"]][["route", "URL", "expected", "status", "error_message"]]
    assert bad.empty, f"rows with unexpected status:\n{bad.to_string()}"
    # every rejected and failed row says why
    not_ok = m[m["status"] != "success"]
    assert not_ok["error_message"].notna().all()
    # uid is the hash of the normalized URL + caption, never of the source id
    assert (m["uid"] == m["expected_uid"]).all()
    # every rejection reason the synthetic source exercises is present
    reasons = {s for s in cat["status"] if s.startswith("rejected_")}
    assert {"rejected_null_url", "rejected_url_too_long", "rejected_bad_scheme", "rejected_invalid_url",
            "rejected_private_address", "rejected_unresolvable_host", "rejected_missing_caption",
            "rejected_caption_too_long", "rejected_duplicate_uid"} <= reasons


def test_manifest_lists_complete_shards_with_counts_and_hashes(pool):
    m = read_manifest(pool.manifest)
    cat = _catalog(pool.dir)
    ok = cat[cat["status"] == "success"]
    assert m["kind"] == "pool" and m["num_samples"] == len(ok) == m["uids"]["count"]
    assert sum(s["num_samples"] for s in m["shards"]) == len(ok)
    for s in m["shards"]:
        path = resolve(pool.manifest, s["path"])
        sha, n = sha256_file(path)
        assert (sha, n) == (s["sha256"], s["bytes"]), f"{path} does not match the manifest"
        with tarfile.open(path) as tf:
            keys = {mem.name.split(".")[0] for mem in tf.getmembers() if mem.name.endswith(".jpg")}
        assert len(keys) == s["num_samples"]
    uids = load_uids(resolve(pool.manifest, m["uids"]["path"]))
    assert len(uids) == len(ok)
    assert contains(uids, uids_to_array(ok["uid"])).all()
    as_hex = array_to_uids(uids)
    assert as_hex == sorted(set(as_hex)) == sorted(ok["uid"]), "uid file must be sorted, unique, and the successes"
    # requested vs obtained is recorded
    rep = json.loads(Path(pool.dir, layout.REPORT_JSON).read_text())
    assert rep["obtained"] == len(ok) and rep["requested"] > rep["obtained"]
    assert sum(rep["rejected"].values()) == int(cat["status"].str.startswith("rejected_").sum())
    assert rep["failures_by_kind"]


def test_samples_carry_uid_and_source_columns(pool):
    m = read_manifest(pool.manifest)
    cat = _catalog(pool.dir).set_index("uid")
    with tarfile.open(resolve(pool.manifest, m["shards"][0]["path"])) as tf:
        metas = [json.load(tf.extractfile(mem)) for mem in tf.getmembers() if mem.name.endswith(".json")]
    assert metas
    for meta in metas:
        if meta["status"] != "success":
            continue
        row = cat.loc[meta["uid"]]
        assert row["key"] == meta["key"] and row["similarity"] == pytest.approx(meta["similarity"])
        assert meta["source_id"] == row["source_id"]


def _cli(args: list[str]) -> list[str]:
    return [sys.executable, "-m", "laiontools", *args]


def _download_args(src: str, out: str) -> list[str]:
    s = TEST_DOWNLOAD_SETTINGS
    return ["download", "--input", src, "--output", out, "--allow-networks", *s["allow_networks"],
            "--number-sample-per-shard", str(s["number_sample_per_shard"]), "--shards-per-file", str(s["shards_per_file"]),
            "--timeout", str(s["timeout"]), "--retries", str(s["retries"]), "--image-size", str(s["image_size"]),
            "--thread-count", str(s["thread_count"]), "--master", "local[2]"]


def _comparable(pool_dir: str, skip_uids: set[str] = frozenset()) -> tuple[pd.DataFrame, dict]:
    cat = _catalog(pool_dir)[["uid", "source_id", "status", "shard", "key", "width", "height", "sha256"]]
    cat = cat[~cat["uid"].isin(skip_uids)].sort_values("source_id").reset_index(drop=True)
    m = json.loads(Path(pool_dir, layout.POOL_MANIFEST).read_text())
    keep = {k: m[k] for k in ("target_samples", "source", "catalog", "download", "kind", "name")}
    if not skip_uids:
        keep.update(num_samples=m["num_samples"], uids=m["uids"], shards=[(s["path"], s["num_samples"]) for s in m["shards"]])
    return cat, keep


def test_kill_9_then_rerun_gives_the_uninterrupted_result(pool, tmp_path):
    """Killed once a shard is done (the in-process engine: the CLI and its forked download processes),
    the same command finishes the pool: the Spark run's rows, statuses and manifest. (The Spark engine
    killed at three points: tests/faults/test_kill.py::test_download_survives_kills.)"""
    out = str(tmp_path / "pool")
    env = {k: v for k, v in os.environ.items() if k != "LAIONTOOLS_SPARK_MASTER"}
    env["LAIONTOOLS_SPARK_LOG_LEVEL"] = "ERROR"
    args = _download_args(pool.source, out)
    args = args[:args.index("--master")]
    proc = subprocess.Popen(_cli(args), env=env, start_new_session=True,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 300
    shard_dir = os.path.join(out, layout.SHARDS_DIR)
    try:
        while time.time() < deadline and proc.poll() is None:
            if os.path.isdir(shard_dir) and any(f.endswith("_stats.json") for f in os.listdir(shard_dir)):
                break
            time.sleep(0.2)
        assert proc.poll() is None, "the run finished before it could be killed; the test needs a larger source"
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=30)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    assert not os.path.exists(os.path.join(out, layout.POOL_MANIFEST)), "killed before the manifest"
    # what a finalize killed mid-swap leaves (its half-written catalog, the one it was replacing): the
    # re-run rebuilds the catalog and removes both
    for stale in (".catalog-tmp-0badc0de", "catalog.old-0badc0de"):
        os.makedirs(os.path.join(out, stale))
        with open(os.path.join(out, stale, "part-00000.parquet"), "wb") as f:
            f.write(b"half")
    done = subprocess.run(_cli(args), env=env, capture_output=True, text=True, timeout=600, check=False)
    assert done.returncode == 0, done.stderr[-3000:]
    assert json.loads(Path(out, layout.REPORT_JSON).read_text())["engine"] == "in-process"
    assert "obtained" in done.stdout
    # The session's server already served the "flaky" row's one failure to the first run, so that
    # row now succeeds: it is the server's state, not the pipeline's; compare everything else.
    flaky = set(pool.expected.loc[pool.expected["route"] == "flaky", "expected_uid"])
    got_cat, got_m = _comparable(out, flaky)
    want_cat, want_m = _comparable(pool.dir, flaky)
    pd.testing.assert_frame_equal(got_cat, want_cat)
    assert got_m == want_m
    m = read_manifest(os.path.join(out, layout.POOL_MANIFEST))
    assert m["num_samples"] == read_manifest(pool.manifest)["num_samples"] + len(flaky)
    # no half-written shard is listed, and no stray temp file is left among the shards
    listed = {s["path"] for s in m["shards"]}
    tars = {f"shards/{f}" for f in os.listdir(shard_dir) if f.endswith(".tar")}
    assert tars == listed
    assert not [f for f in os.listdir(out) if f.startswith((".catalog-tmp-", "catalog.old-"))], os.listdir(out)


def test_in_process_engine_gives_the_spark_pool(pool, tmp_path, monkeypatch):
    """A source under --spark-above rows with no master named: prepare, the download shards and
    finalize run in this process (Arrow, forked download processes), no Spark. The pool is the Spark
    run's: the same catalog rows (statuses, shards, keys, sizes, image hashes) and column types, the
    same manifest fields and report counts, and every span it records holds the bytes its sha256 names."""
    import hashlib

    import pyarrow.parquet as pq

    from laiontools.stages import download as download_stage
    from laiontools.stages.download import DownloadConfig

    monkeypatch.delenv("LAIONTOOLS_SPARK_MASTER", raising=False)
    out = str(tmp_path / "p")
    rep = download_stage.run(DownloadConfig(input=pool.source, output=out, **TEST_DOWNLOAD_SETTINGS)).details
    assert rep["engine"] == "in-process" and "spark" not in rep
    prep = json.loads(Path(out, layout.PREPARED_DIR, layout.PREPARED_STATS_JSON).read_text())
    assert prep["engine"] == "in-process"
    # the session server failed each "flaky" URL once, for the fixture's run: compare everything else
    flaky = set(pool.expected.loc[pool.expected["route"] == "flaky", "expected_uid"])
    got_cat, got_m = _comparable(out, flaky)
    want_cat, want_m = _comparable(pool.dir, flaky)
    pd.testing.assert_frame_equal(got_cat, want_cat)
    assert got_m == want_m

    def schema(d: str) -> list[tuple[str, str]]:
        files = sorted(f for f in os.listdir(os.path.join(d, layout.CATALOG_DIR)) if f.endswith(".parquet"))
        return [(f.name, str(f.type)) for f in pq.read_schema(os.path.join(d, layout.CATALOG_DIR, files[0]))]

    assert schema(out) == schema(pool.dir)
    # both engines write the catalog with zstd (core.storage.PARQUET_CODEC)
    for d in (out, pool.dir):
        folder = os.path.join(d, layout.CATALOG_DIR)
        meta = [pq.ParquetFile(os.path.join(folder, f)).metadata for f in os.listdir(folder) if f.endswith(".parquet")]
        assert {m.row_group(g).column(c).compression for m in meta for g in range(m.num_row_groups) for c in range(m.num_columns)} == {"ZSTD"}
    want_rep = json.loads(Path(pool.dir, layout.REPORT_JSON).read_text())
    assert rep["rejected"] == want_rep["rejected"] and rep["rows_in"] == want_rep["rows_in"]
    assert rep["hosts"]["watched"] == want_rep["hosts"]["watched"]
    # every success row's span, read straight from its tar, hashes to what the catalog says
    cat = _catalog(out)
    ok = cat[cat["status"] == "success"]
    assert len(ok) and ok["tar_offset"].notna().all()
    m = read_manifest(os.path.join(out, layout.POOL_MANIFEST))
    tars = {layout.shard_id(s["path"]): os.path.join(out, s["path"]) for s in m["shards"]}
    for r in ok.itertuples():
        with open(tars[r.shard], "rb") as f:
            f.seek(int(r.tar_offset))
            assert hashlib.sha256(f.read(int(r.tar_length))).hexdigest() == r.tar_sha256
    # the uid file holds exactly the successes
    assert sorted(array_to_uids(load_uids(os.path.join(out, layout.POOL_UIDS)))) == sorted(ok["uid"])


def test_a_stats_file_cut_short_is_a_clear_error_and_the_rerun_downloads_the_shard_again(pool, tmp_path, monkeypatch):
    """A shard's img2dataset stats cut short in the run that wrote it (a full disk) is refused with one
    clear error, not listed nor silently left out; the same command then downloads that shard again."""
    from laiontools.core.errors import UserError
    from laiontools.core.storage import marker_path
    from laiontools.stages import download as download_stage
    from laiontools.stages.download import DownloadConfig

    monkeypatch.delenv("LAIONTOOLS_SPARK_MASTER", raising=False)
    out = str(tmp_path / "p")
    shutil.copytree(pool.dir, out)
    stats = os.path.join(out, layout.SHARDS_DIR, "00001_stats.json")
    with open(stats, "rb") as f:
        data = f.read()
    with open(stats, "wb") as f:
        f.write(data[: len(data) // 2])
    os.remove(marker_path(os.path.join(out, layout.SHARDS_DIR, "00001.tar")))
    cfg = DownloadConfig(input=pool.source, output=out, **TEST_DOWNLOAD_SETTINGS)
    with pytest.raises(UserError, match="00001_stats.json: the shard's stats file is damaged.*re-run"):
        download_stage.complete_shards(cfg)
    rep = download_stage.run(cfg).details
    assert json.loads(Path(stats).read_text())["count"] == json.loads(data)["count"]  # downloaded again, whole
    m = read_manifest(rep["manifest"])
    assert "shards/00001.tar" in {s["path"] for s in m["shards"]}
    flaky = set(pool.expected.loc[pool.expected["route"] == "flaky", "expected_uid"])
    pd.testing.assert_frame_equal(_comparable(out, flaky)[0], _comparable(pool.dir, flaky)[0])


def test_a_shard_that_fails_every_retry_stops_the_run_and_the_rerun_completes_the_pool(pool, tmp_path, monkeypatch):
    """A download shard that fails every retry (here its tar's path is taken by a folder: img2dataset's
    writer cannot open it) was one printed line: the catalog was built without its rows and the run
    ended with exit 0, a pool short of a shard. It now stops with one error naming the shard; once the
    cause is gone, the same command downloads it and the pool is the uninterrupted run's."""
    from laiontools.core.errors import UserError
    from laiontools.core.storage import marker_path
    from laiontools.stages import download as download_stage
    from laiontools.stages.download import DownloadConfig

    monkeypatch.delenv("LAIONTOOLS_SPARK_MASTER", raising=False)
    out = str(tmp_path / "p")
    shutil.copytree(pool.dir, out)
    shards = os.path.join(out, layout.SHARDS_DIR)
    for name in os.listdir(shards):
        if name.startswith("00001"):
            os.remove(os.path.join(shards, name))
    assert not os.path.exists(marker_path(os.path.join(shards, "00001.tar")))
    os.mkdir(os.path.join(shards, "00001.tar"))
    cat_before = _catalog(out)
    cfg = DownloadConfig(input=pool.source, output=out, **TEST_DOWNLOAD_SETTINGS)
    with pytest.raises(UserError, match=r"^1 download shard\(s\) of .*shards failed after 1 retry \(ids 1;.*Re-run the same command"):
        download_stage.run(cfg)
    pd.testing.assert_frame_equal(_catalog(out), cat_before)  # no catalog written without shard 1's rows
    os.rmdir(os.path.join(shards, "00001.tar"))
    download_stage.run(cfg)
    flaky = set(pool.expected.loc[pool.expected["route"] == "flaky", "expected_uid"])
    pd.testing.assert_frame_equal(_comparable(out, flaky)[0], _comparable(pool.dir, flaky)[0])
    assert len(_catalog(out)) == len(pool.expected)


def test_other_settings_into_the_same_folder_are_refused(pool, tmp_path):
    out = str(tmp_path / "p")
    shutil.copytree(pool.dir, out)
    args = _download_args(pool.source, out)
    args[args.index("--image-size") + 1] = "128"
    r = subprocess.run(_cli(args), capture_output=True, text=True, timeout=120, check=False)
    assert r.returncode == 2
    assert "other settings" in r.stderr and "image_size" in r.stderr
    assert _comparable(out)[0].equals(_comparable(pool.dir)[0]), "nothing may be touched"


def test_a_pool_from_before_max_crawl_delay_is_continued_under_its_default(pool, tmp_path):
    # settings.json of a pool written before the setting existed has no max_crawl_delay: a re-run (resume,
    # retry pass) with the defaults continues it; another value is refused naming the setting.
    from laiontools.core.errors import UserError
    from laiontools.stages import download as download_stage
    from laiontools.stages.download import DownloadConfig

    out = str(tmp_path / "p")
    shutil.copytree(pool.dir, out)
    path = os.path.join(out, layout.SETTINGS_JSON)
    with open(path) as f:
        saved = json.load(f)
    assert saved.pop("max_crawl_delay") == 30.0
    with open(path, "w") as f:
        json.dump(saved, f)
    download_stage.check_output(DownloadConfig(input=pool.source, output=out, **TEST_DOWNLOAD_SETTINGS))
    with pytest.raises(UserError, match=r"other settings \(max_crawl_delay: 30\.0 -> 5\.0\)"):
        download_stage.check_output(DownloadConfig(input=pool.source, output=out, max_crawl_delay=5.0, **TEST_DOWNLOAD_SETTINGS))


@pytest.mark.parametrize("engine", ["spark", "in-process"])
def test_retry_pass_reattempts_only_transient_failures(pool, spark, tmp_path, monkeypatch, engine):
    from laiontools.stages import download as download_stage
    from laiontools.stages.download import DownloadConfig

    monkeypatch.delenv("LAIONTOOLS_SPARK_MASTER", raising=False)
    out = str(tmp_path / "p")
    shutil.copytree(pool.dir, out)
    before = _by_row(out, pool.expected)
    cfg = DownloadConfig(input=pool.source, output=out, retry_failed=True, **TEST_DOWNLOAD_SETTINGS)
    # A run that dies as its retry input is put in place leaves no retry-NN folder (one would be taken
    # as a whole input by the next run): the input appears whole or not at all, on both engines.
    with monkeypatch.context() as m:
        def crash(src: str, dst: str) -> None:
            raise RuntimeError("killed while the retry input is moved into place")

        m.setattr(download_stage, "move_tree", crash)
        with pytest.raises(RuntimeError, match="killed while"):
            download_stage.run(cfg, spark if engine == "spark" else None)
    assert not [d for d in os.listdir(os.path.join(out, layout.PREPARED_DIR)) if d.startswith("retry-") and not d.endswith(".tmp")]
    # A run killed after its retry pass, while the catalog is rebuilt: the next run only finalizes that
    # pass (a new pass planned from the catalog without its results would fetch the same rows again).
    with monkeypatch.context() as m:
        def killed(*a: object, **k: object) -> None:
            raise RuntimeError("killed in finalize")

        m.setattr(download_stage, "finalize", killed)
        with pytest.raises(RuntimeError, match="killed in finalize"):
            download_stage.run(cfg, spark if engine == "spark" else None)
    assert os.path.exists(os.path.join(out, layout.SHARDS_DIR, "retry01", "_pass.done"))
    rep = download_stage.run(cfg, spark if engine == "spark" else None).details
    assert sorted(d for d in os.listdir(os.path.join(out, layout.PREPARED_DIR)) if d.startswith("retry")) == ["retry-01"]
    assert sorted(d for d in os.listdir(os.path.join(out, layout.SHARDS_DIR)) if d.startswith("retry")) == ["retry01"]
    assert rep["engine"].startswith("spark" if engine == "spark" else "in-process")
    after = _by_row(out, pool.expected)
    # the flaky route failed once (503) and succeeds when retried
    flaky = after[after["route"] == "flaky"]
    assert (flaky["status"] == "success").all() and flaky["shard"].str.startswith("retry01").all()
    # nothing else changed status, and permanent failures were not re-attempted
    retried_rows = pd.read_parquet(os.path.join(out, layout.PREPARED_DIR, "retry-01"))
    # the retry input is put in place whole, named alike on both engines, and nothing is left beside it
    assert sorted(os.listdir(os.path.join(out, layout.PREPARED_DIR, "retry-01"))) == ["part-00000.parquet"]
    assert not [d for d in os.listdir(os.path.join(out, layout.PREPARED_DIR)) if d.endswith(".tmp")]
    routes = set(before.set_index("uid").loc[retried_rows["uid"], "route"])
    assert routes <= {"flaky", "status_500", "status_503", "status_429", "slow"}
    assert "status_404" not in routes and "noai" not in routes
    others = after["route"] != "flaky"
    assert (after.loc[others, "status"].values == before.loc[others, "status"].values).all()
    m = read_manifest(rep["manifest"])
    assert any(s["path"].startswith("shards/retry01/") for s in m["shards"])
    assert m["num_samples"] == int((after["status"] == "success").sum()) == rep["obtained"]


def test_a_retry_pass_that_obtains_nothing_adds_no_shard(pool, tmp_path, monkeypatch):
    """A --retry-failed pass whose rows all fail again wrote a tar with no samples into the pool: listed
    in the manifest (num_samples 0) for embed and verify to read. Now such a shard stays beside its
    pass (its rows' statuses go into the catalog) but is not listed; the pass is done and the report
    says it obtained nothing. Two passes: the first obtains the flaky rows, the second nothing."""
    from laiontools.stages import download as download_stage
    from laiontools.stages.download import DownloadConfig

    monkeypatch.delenv("LAIONTOOLS_SPARK_MASTER", raising=False)
    out = str(tmp_path / "p")
    shutil.copytree(pool.dir, out)
    cfg = DownloadConfig(input=pool.source, output=out, retry_failed=True, **TEST_DOWNLOAD_SETTINGS)
    download_stage.run(cfg)
    first = _catalog(out).set_index("uid")
    rep = download_stage.run(cfg).details
    assert os.path.exists(os.path.join(out, layout.SHARDS_DIR, "retry02", "_pass.done"))
    retried = pd.read_parquet(os.path.join(out, layout.PREPARED_DIR, "retry-02"))["uid"]
    assert len(retried) > 0
    m = read_manifest(rep["manifest"])
    assert not [s["path"] for s in m["shards"] if s["path"].startswith("shards/retry02/")]
    assert all(s["num_samples"] > 0 for s in m["shards"] if s["path"].startswith("shards/retry"))
    assert rep["shards"] == len(m["shards"]) and rep["bytes"] == sum(s["bytes"] for s in m["shards"])
    assert rep["retry_passes"][-1] == {"pass": 2, "rows": len(retried), "obtained": 0, "shards": 0}
    assert f"retry pass 2: 0 of {len(retried)} row(s) obtained; no shard added" in rep["text"]
    # the retried rows carry this pass's outcome, with its error, and nothing else changed
    cat = _catalog(out).set_index("uid")
    assert (cat.loc[retried, "status"] == "failed_download").all() and cat.loc[retried, "error_message"].notna().all()
    assert cat.drop(columns=["error_message"]).equals(first.drop(columns=["error_message"]))
    # a re-run without --retry-failed repeats no pass and lists the same shards
    again = download_stage.run(DownloadConfig(input=pool.source, output=out, **TEST_DOWNLOAD_SETTINGS)).details
    assert read_manifest(again["manifest"])["shards"] == m["shards"]
    from laiontools.stages.verify import verify_manifest

    assert not verify_manifest(rep["manifest"]).problems


def test_a_catalog_swap_killed_midway_is_undone_before_a_retry_pass_reads_it(pool, tmp_path, monkeypatch):
    """A re-run of download killed midway through its catalog swap (old catalog moved aside, the new one
    not yet in place): readers refuse the pool, and the next run, a retry pass, first puts the old
    catalog back, so it plans the same retry pass as on the untouched pool."""
    from laiontools.contracts.pool import load_pool
    from laiontools.core import storage
    from laiontools.core.errors import InputError
    from laiontools.stages import download as download_stage
    from laiontools.stages.download import DownloadConfig

    monkeypatch.delenv("LAIONTOOLS_SPARK_MASTER", raising=False)
    killed, plain = str(tmp_path / "killed"), str(tmp_path / "plain")
    shutil.copytree(pool.dir, killed)
    shutil.copytree(pool.dir, plain)
    with monkeypatch.context() as m:
        def crash(path: str) -> None:
            raise RuntimeError("killed during the catalog swap")

        m.setattr(storage, "_drop_tree", crash)
        with pytest.raises(RuntimeError, match="killed during the catalog swap"):
            download_stage.run(DownloadConfig(input=pool.source, output=killed, **TEST_DOWNLOAD_SETTINGS))
    assert not os.path.exists(os.path.join(killed, layout.CATALOG_DIR))  # moved aside, the new one not in
    with pytest.raises(InputError, match="is being rebuilt, or a rebuild was killed midway"):
        load_pool(os.path.join(killed, layout.POOL_MANIFEST))
    for out in (killed, plain):
        download_stage.run(DownloadConfig(input=pool.source, output=out, retry_failed=True, **TEST_DOWNLOAD_SETTINGS))
    retried = [pd.read_parquet(os.path.join(out, layout.PREPARED_DIR, "retry-01")).sort_values("uid") for out in (killed, plain)]
    assert len(retried[0]) > 0 and retried[0]["uid"].tolist() == retried[1]["uid"].tolist()
    assert _comparable(killed)[0].equals(_comparable(plain)[0])
    assert not [n for n in os.listdir(killed) if "catalog" in n and n != layout.CATALOG_DIR]


def test_report_aggregate_local_counts_as_a_plain_loop():
    """The in-process report's table (Arrow counts; Python only for failed rows) equals a row-by-row
    count, null statuses, shards, errors and URLs included."""
    import random
    from collections import Counter

    import pyarrow as pa

    from laiontools.stages.download import FAILED_STATUSES, failure_kind, report_aggregate_local, report_host

    rng = random.Random(0)
    statuses = [C.STATUS_SUCCESS, C.STATUS_FAILED_DOWNLOAD, C.STATUS_FAILED_RESIZE, "rejected_duplicate", None]
    rows = [{C.STATUS: rng.choice(statuses), C.SHARD: rng.choice(["00000", "00001", None]),
             C.ERROR: rng.choice([None, "HTTP Error 404: Not Found", "timed out", "blocked: 10.0.0.1 is private", "?"]),
             C.URL: rng.choice([None, "http://a.example/x", "https://B.Example.org/y", "not a url"])} for _ in range(3000)]
    cat = pa.Table.from_pylist(rows, schema=pa.schema([(c, pa.string()) for c in (C.STATUS, C.SHARD, C.ERROR, C.URL)]))
    want: Counter = Counter()
    for r in rows:
        if r[C.STATUS] == C.STATUS_SUCCESS:
            want[(r[C.STATUS], r[C.SHARD], None, None)] += 1
        elif r[C.STATUS] in FAILED_STATUSES:
            want[(r[C.STATUS], None, failure_kind(r[C.ERROR]), report_host(r[C.URL]))] += 1
        else:
            want[(r[C.STATUS], None, None, None)] += 1
    got = report_aggregate_local(cat)
    assert len(got) == len({g[:4] for g in got})  # one row per group
    assert {g[:4]: g[4] for g in got} == dict(want)


@pytest.mark.parametrize("fmt, quality, ok", [("jpg", 95, True), ("jpg", 0, True), ("jpg", 200, False), ("jpg", -1, False),
                                              ("webp", 100, True), ("webp", 0, False), ("png", 9, True), ("png", 0, True),
                                              ("png", 95, False), ("png", 10, False), ("png", None, True), ("jpg", None, True)])
def test_encode_quality_out_of_range_is_refused(fmt, quality, ok):
    """`--encode-quality 200` was accepted and recorded (the encoder clamps it): a quality outside its
    format's range is refused naming both. png's value is a zlib compression level: `--encode-format png`
    with jpg's default of 95 was accepted, then img2dataset's resizer refused it in every task; the
    default now follows the format (95; png 6). What is accepted, img2dataset's own resizer takes."""
    from laiontools.core.config import ConfigError
    from laiontools.stages.download import DownloadConfig
    from laiontools.web.resize import make_resizer, resize_params

    if ok:
        cfg = DownloadConfig(input="in", output="out", encode_format=fmt, encode_quality=quality)
        assert cfg.encode_quality == (quality if quality is not None else 6 if fmt == "png" else 95)
        make_resizer(**{**resize_params(cfg.to_dict()), "fast_decode": False})  # img2dataset's own checks pass
    else:
        hi = 9 if fmt == "png" else 100
        with pytest.raises(ConfigError, match=rf"^encode_quality {quality} is out of range for {fmt} \(\d\.\.{hi}\)"):
            DownloadConfig(input="in", output="out", encode_format=fmt, encode_quality=quality)


def test_download_seconds_count_the_time_shards_ran_not_the_gaps_between_runs():
    """report.json's download phase over shards of several runs (a resumed kill, a --retry-failed pass
    10 minutes later) counted the gap between them: 577.77 s and 0.01 samples/s for a 2.3 s retry pass
    (a hostile-web walk). It is the time some shard was running: overlapping spans once, gaps not."""
    from laiontools.stages.download import busy_seconds

    assert busy_seconds([]) == 0.0
    assert busy_seconds([(100.0, 103.0), (0.0, 10.0), (5.0, 12.0), (11.0, 11.5)]) == 12.0 + 3.0
    assert busy_seconds([(0.0, 10.0), (10.0, 20.0)]) == 20.0


@pytest.mark.parametrize("field", ["max_bytes", "max_image_pixels"])
def test_a_zero_size_limit_is_refused_before_any_request(field):
    """--max-bytes 0 was accepted and then refused every image "over the limit" (a hostile-web walk);
    the other limits were checked. 1 is the least."""
    from laiontools.core.config import ConfigError
    from laiontools.stages.download import DownloadConfig

    with pytest.raises(ConfigError, match="^max_bytes and max_image_pixels must be >= 1"):
        DownloadConfig(input="in", output="out", **{field: 0})
    assert getattr(DownloadConfig(input="in", output="out", **{field: 1}), field) == 1


# Found by a review of the download engines: a source carrying the catalog's span columns.

@pytest.mark.parametrize("engine", ["spark", "in-process"])
def test_a_source_carrying_catalog_span_columns_is_downloaded(synthetic_web, spark, tmp_path, monkeypatch, engine):
    """A source that has columns named like the catalog's span columns (a pool's own catalog given back as
    the source, to fetch it again at another size: generic profile, its uid/status/... columns are
    reserved and dropped, but tar_offset, tar_length and tar_sha256 were carried as extra columns): the
    whole download ran, then finalize crashed building the catalog (a duplicate column: ArrowInvalid /
    KeyError in process, AnalysisException AMBIGUOUS_REFERENCE on Spark), with every shard already fetched."""
    from laiontools.stages import download as download_stage
    from laiontools.stages.download import DownloadConfig

    monkeypatch.delenv("LAIONTOOLS_SPARK_MASTER", raising=False)
    web, src = synthetic_web
    files = sorted(f for f in os.listdir(src["images"]) if f.endswith(".jpg"))[:6]
    old_catalog = pd.DataFrame({
        "uid": [f"{i:032x}" for i in range(len(files))], "url": [f"{web.base_url}/img/{f}" for f in files],
        "caption": [f"caption {i}" for i in range(len(files))], "status": "success",
        "tar_offset": pd.array([0, 1536, None, 4608, None, 7680], dtype="Int64"),
        "tar_length": pd.array([1536, 1536, None, 1536, None, 1536], dtype="Int64"),
        "tar_sha256": ["ab" * 32, "cd" * 32, None, "ef" * 32, None, "01" * 32],
    })
    os.makedirs(tmp_path / "src")
    old_catalog.to_parquet(tmp_path / "src" / "catalog.parquet")
    out = str(tmp_path / "p")
    cfg = DownloadConfig(input=str(tmp_path / "src"), output=out, **TEST_DOWNLOAD_SETTINGS)
    rep = download_stage.run(cfg, spark if engine == "spark" else None).details
    assert rep["rows_in"] == len(files)
    cat = _catalog(out)
    assert len(cat) == len(files) and list(cat.columns).count("tar_offset") == 1
    ok = cat[cat["status"] == "success"]
    assert len(ok) and ok["tar_offset"].notna().all()  # the new pool's spans, not the old catalog's


# Found by the review of paths holding [ * ? (RELIABILITY.md): img2dataset's reader and Spark's readers
# glob the paths they are given.

@pytest.mark.parametrize("engine", ["spark", "in-process"])
def test_a_pool_folder_named_with_glob_characters_downloads_its_own_rows_only(synthetic_web, tmp_path, monkeypatch,
                                                                                request, engine):
    """A pool folder ``run[1]`` beside ``run1`` (another pool, prepared from other rows): img2dataset's
    reader globbed ``run[1]/prepared/accepted/*.parquet``, which names ``run1``'s files, and downloaded
    that pool's rows into this one; Spark's reader read the catalog folder the same way. The pool now
    holds its own rows, and ``run1`` is left as it was."""
    from laiontools.stages import download as download_stage
    from laiontools.stages import prepare as prepare_stage
    from laiontools.stages.download import DownloadConfig
    from laiontools.stages.prepare import PrepareConfig

    monkeypatch.delenv("LAIONTOOLS_SPARK_MASTER", raising=False)
    spark = request.getfixturevalue("spark") if engine == "spark" else None
    web, src = synthetic_web
    files = sorted(f for f in os.listdir(src["images"]) if f.endswith(".jpg"))[:12]
    sources = {}
    for name, part in (("a", files[:6]), ("b", files[6:])):
        os.makedirs(tmp_path / f"src-{name}")
        urls = [f"{web.base_url}/img/{f}" for f in part]
        pd.DataFrame({"url": urls, "caption": [f"{name} {f}" for f in part]}).to_parquet(tmp_path / f"src-{name}" / "m.parquet")
        sources[name] = urls
    settings = {k: v for k, v in TEST_DOWNLOAD_SETTINGS.items() if k in {f.name for f in PrepareConfig.__dataclass_fields__.values()}}
    other = tmp_path / "run1"
    prepare_stage.run(PrepareConfig(input=str(tmp_path / "src-a"), output=str(other), **settings), None)
    before = {p: p.read_bytes() for p in other.rglob("*") if p.is_file()}
    out = str(tmp_path / "run[1]")
    download_stage.run(DownloadConfig(input=str(tmp_path / "src-b"), output=out, **TEST_DOWNLOAD_SETTINGS), spark)
    cat = _catalog(out)
    assert sorted(cat["url"]) == sorted(sources["b"])
    assert (cat["status"] == "success").sum() > 0
    with tarfile.open(os.path.join(out, layout.SHARDS_DIR, "00000.tar")) as tf:
        captions = {tf.extractfile(m).read().decode() for m in tf.getmembers() if m.name.endswith(".txt")}
    assert captions and all(c.startswith("b ") for c in captions)
    assert {p: p.read_bytes() for p in other.rglob("*") if p.is_file()} == before


def test_a_pool_folder_on_an_object_store_named_with_glob_characters_is_refused_up_front():
    """img2dataset's downloader removes each shard's temporary input file with fsspec's rm, which expands
    ``[ * ?`` in an object store's path (``s3://b/run[1]/`` would name ``run1/``'s file): such a pool
    folder is refused when the settings are read, naming the path and the character. prepare, which hands
    no path to img2dataset or Spark's readers, and a local folder of that name are accepted."""
    from laiontools.core.config import ConfigError
    from laiontools.stages.download import DownloadConfig
    from laiontools.stages.prepare import PrepareConfig

    for out, ch in (("s3://bucket/run[1]", "["), ("gs://bucket/a*b/pool", "*"), ("s3://bucket/x?/p", "?")):
        with pytest.raises(ConfigError, match=f"--output {re.escape(out)}: `{re.escape(ch)}` .*rename the folder"):
            DownloadConfig(input="s3://bucket/src", output=out)
    PrepareConfig(input="s3://bucket/src", output="s3://bucket/run[1]")
    DownloadConfig(input="s3://bucket/src", output="/data/run[1]")


def test_finalize_hashes_the_shards_in_tasks_not_in_the_driver(spark, tmp_path, monkeypatch):
    """complete_shards read every shard's stats and hashed every tar in the driver, one after another:
    a 2B pool's first finalize read its 35-70 TB through the driver, and every later one made two
    requests a shard (~230k shards) in turn. On Spark the driver now only lists the stats files; the
    per-shard reads are tasks. Same entries as in process, the sha256 of each tar's bytes."""
    import types

    from fsspec.implementations import local

    from laiontools.core.stage import Tasks
    from laiontools.core.storage import marker_path
    from laiontools.stages import download as download_stage

    out = tmp_path / "pool"
    shards = out / layout.SHARDS_DIR
    shards.mkdir(parents=True)
    for i in range(6):
        (shards / f"{i:05d}.tar").write_bytes(os.urandom(1000 + i))
        (shards / f"{i:05d}.parquet").write_bytes(b"x")
        (shards / f"{i:05d}_stats.json").write_text(json.dumps({"successes": i, "count": 10, "start_time": 1.0, "end_time": 2.0}))
    cfg = types.SimpleNamespace(output=str(out))
    opened = []
    real_open = local.LocalFileSystem._open

    def counting_open(self, path, *a, **k):
        opened.append(path)  # this process only: Spark's Python workers are other processes
        return real_open(self, path, *a, **k)

    monkeypatch.setattr(local.LocalFileSystem, "_open", counting_open)
    for _ in range(2):  # first: hashed and marked; second: from the markers
        on_spark = download_stage.complete_shards(cfg, Tasks(spark))
        assert opened == []
    assert [(s["id"], s["num_samples"], s["count"]) for s in on_spark] == [(f"{i:05d}", i, 10) for i in range(6)]
    assert all((s["sha256"], s["bytes"]) == sha256_file(s["tar"]) for s in on_spark)
    for i in range(6):
        os.remove(marker_path(str(shards / f"{i:05d}.tar")))
    monkeypatch.setattr(local.LocalFileSystem, "_open", real_open)
    assert download_stage.complete_shards(cfg) == on_spark


def test_a_report_table_past_the_driver_cap_is_not_made_and_dropped(pool, spark, tmp_path, monkeypatch):
    """finalize's one grouped report table has a row per (status, shard of a success) at least, so a
    pool of more shards than REPORT_AGGREGATE_ROWS (a 2B pool: ~230k against 200k) always overflowed it:
    the table was computed whole, with a Python failure kind and host for every catalog row, then
    dropped. Such a pool now counts (status, shard) first and never makes it; the counts are the same."""
    from laiontools.stages import download as download_stage
    from laiontools.stages.download import DownloadConfig

    out = str(tmp_path / "p")
    shutil.copytree(pool.dir, out)
    cfg = DownloadConfig(input=pool.source, output=out, **TEST_DOWNLOAD_SETTINGS)
    shards = download_stage.complete_shards(cfg)
    prep = {"rows_in": len(pool.expected)}
    ref = download_stage._finalize_spark(cfg, spark, shards, prep)
    assert ref["aggregate"] is not None and len(shards) > 1
    calls = []
    real = download_stage.report_aggregate
    monkeypatch.setattr(download_stage, "report_aggregate", lambda *a, **k: calls.append(1) or real(*a, **k))
    monkeypatch.setattr(download_stage, "REPORT_AGGREGATE_ROWS", 1)
    fin = download_stage._finalize_spark(cfg, spark, shards, prep)
    assert calls == [] and fin["aggregate"] is None
    assert (fin["by_status"], fin["per_shard"], fin["uids_sha256"]) == (ref["by_status"], ref["per_shard"], ref["uids_sha256"])


_FS_CALLS: dict[str, int] = {}


class _CountingFS(__import__("fsspec").implementations.local.LocalFileSystem):
    """The local file system under ``countfile://``, counting the calls made to it from outside (its own
    calls inside a call, such as ls's info per entry, are not requests of the caller's)."""

    protocol = ("countfile",)
    calls = _FS_CALLS
    _depth = __import__("threading").local()

    def __getattribute__(self, name):
        attr = super().__getattribute__(name)
        if name not in ("ls", "exists", "isfile", "isdir", "info", "glob", "find", "_open", "open", "cat_file", "cat", "rm", "rm_file"):
            return attr

        def counted(*a, **k):
            d = getattr(_CountingFS._depth, "n", 0)
            if d == 0:
                _CountingFS.calls[name] = _CountingFS.calls.get(name, 0) + 1
            _CountingFS._depth.n = d + 1
            try:
                return attr(*a, **k)
            finally:
                _CountingFS._depth.n = d

        return counted


def _old_clean_incomplete_shards(shard_dir: str) -> None:
    """download._clean_incomplete_shards before it listed once (the reference for what it removes and says)."""
    from laiontools.core.storage import glob_literal, rm_path, url_to_fs
    from laiontools.stages.download import log

    fs, p = url_to_fs(shard_dir)
    if not fs.exists(p):
        return
    done = set()
    for f in fs.glob(glob_literal(p) + "/*_stats.json"):
        sid = f.rsplit("/", 1)[-1].split("_")[0]
        try:
            with fs.open(f, "rb") as fh:
                json.loads(fh.read())
            if fs.exists(f"{p}/{sid}.tar") and fs.exists(f"{p}/{sid}.parquet"):
                done.add(sid)
                continue
        except ValueError:
            pass
        log.warning("shard %s/%s has a broken stats file; it will be downloaded again", shard_dir, sid)
        rm_path(fs, f)
    for f in fs.ls(p, detail=False):
        name = f.rsplit("/", 1)[-1]
        sid = name.split(".")[0].split("_")[0]
        if fs.isfile(f) and sid.isdigit() and sid not in done:
            log.info("removing incomplete shard file %s", f)
            rm_path(fs, f)


def _shard_folder(d: Path, marked: int) -> None:
    """A download shard folder: `marked` finalized shards (tar, parquet, stats, web stats, marker), then
    one finished but not finalized, one with its stats cut short, one killed mid-tar, one marked whose
    parquet is gone, one whose tar path is a folder, one with an empty stats file, img2dataset's _tmp folder
    and a hidden temp file."""
    d.mkdir(parents=True)
    stats = json.dumps({"successes": 3, "count": 4, "start_time": 1.0, "end_time": 2.0})

    def shard(i: int, *, tar=True, parquet=True, st=stats, marker=False) -> None:
        if tar:
            (d / f"{i:05d}.tar").write_bytes(b"t" * 10)
        if parquet:
            (d / f"{i:05d}.parquet").write_bytes(b"p")
        if st is not None:
            (d / f"{i:05d}_stats.json").write_text(st)
            (d / f"{i:05d}_web.json").write_text("{}")
        if marker:
            (d / f"{i:05d}.tar.done").write_text("{}")

    for i in range(marked):
        shard(i, marker=True)
    shard(marked)  # done by img2dataset, not finalized yet: no marker
    shard(marked + 1, st=stats[:9])  # a kill while its stats were written
    shard(marked + 2, parquet=False, st=None)  # a kill mid-shard
    shard(marked + 3, parquet=False, marker=True)  # its parquet lost: downloaded again, as before
    shard(marked + 4, tar=False)
    (d / f"{marked + 4:05d}.tar").mkdir()  # exists (a folder): counts as there, as fs.exists said
    shard(marked + 5, st="")  # a kill as its stats file was opened
    (d / "_tmp").mkdir()
    (d / "_tmp" / f"{marked + 2}.feather").write_bytes(b"f")
    (d / f".{marked + 6:05d}.tar.tmp-0badc0de").write_bytes(b"x")


def test_cleaning_a_shard_folder_lists_it_once_and_reads_only_unmarked_stats(tmp_path, caplog):
    """At the start of every download pass and resume the driver checked each shard in turn: the stats
    file read, an exists for its tar and its parquet, then an isfile per listed file: ~1.6M requests in
    turn for a 2B pool's ~230k shards (hours on an object store). Now one detailed listing answers
    which files exist and what they are, and only stats files of shards without a completion marker are
    read (a marker is written only after its stats parsed). What is removed and logged is unchanged."""
    import logging

    import fsspec

    from laiontools.stages import download as download_stage

    fsspec.register_implementation("countfile", _CountingFS, clobber=True)
    marked = 40
    ref, new = tmp_path / "ref" / "shards", tmp_path / "new" / "shards"
    _shard_folder(ref, marked)
    _shard_folder(new, marked)

    def run(clean, folder: str) -> tuple[list[str], list[str]]:
        caplog.clear()
        with caplog.at_level(logging.INFO, logger=download_stage.log.name):
            clean(folder)
        said = [r.getMessage().replace(str(ref), "D").replace(str(new), "D").replace("countfile://", "")
                for r in caplog.records if r.name == download_stage.log.name]
        return sorted(said), said

    want_sorted, want = run(_old_clean_incomplete_shards, str(ref))
    _CountingFS.calls.clear()
    got_sorted, got = run(download_stage._clean_incomplete_shards, f"countfile://{new}")
    calls = dict(_CountingFS.calls)
    assert got_sorted == want_sorted
    # the warnings, in shard order, as before
    assert [m for m in got if "broken" in m] == [m for m in want if "broken" in m] == [
        f"shard D/{i:05d} has a broken stats file; it will be downloaded again" for i in (marked + 1, marked + 3, marked + 5)]

    def left(d: Path) -> list[str]:
        return sorted(str(f.relative_to(d)) for f in d.rglob("*"))

    assert left(new) == left(ref)
    assert f"{marked:05d}.tar" in left(new) and f"{marked + 1:05d}.tar" not in left(new) and "_tmp/42.feather" in left(new)
    # O(1) requests: the folder's existence, one listing, the three non-empty stats files of unmarked shards read,
    # a removal of the broken stats then one of the other files; nothing asked per shard
    assert calls.get("ls") == 1 and calls.get("exists", 0) <= 1, calls
    assert calls.get("isfile", 0) + calls.get("isdir", 0) + calls.get("info", 0) + calls.get("glob", 0) + calls.get("find", 0) == 0, calls
    assert calls.get("_open", 0) + calls.get("open", 0) + calls.get("cat_file", 0) + calls.get("cat", 0) == 3, calls
    assert calls.get("rm", 0) + calls.get("rm_file", 0) <= 2, calls


def _failed_pool(out: Path, n_transient: int) -> list[str]:
    """A finished pool's files that prepare_retry reads (prepare's marker and stats, a manifest, a catalog
    in two files), whose catalog holds `n_transient` transient failures among successes and permanent
    failures, in no order; returns the transient rows' uids."""
    import random

    import pyarrow as pa
    import pyarrow.parquet as pq

    from laiontools.core.storage import mark_done
    from laiontools.stages.prepare import DOWNLOAD_COLUMNS

    rnd = random.Random(7)
    prep = out / layout.PREPARED_DIR
    prep.mkdir(parents=True)
    (prep / layout.PREPARED_STATS_JSON).write_text(json.dumps({"download_columns": [C.URL, C.CAPTION, *DOWNLOAD_COLUMNS, "extra"]}))
    mark_done(str(prep))
    (out / layout.POOL_MANIFEST).write_text("{}")
    rows = []
    for i in range(n_transient + 60):
        kind = "transient" if i < n_transient else ("permanent" if i % 2 else "success")
        rows.append({
            C.UID: f"{rnd.getrandbits(128):032x}", C.URL: f"http://h{i % 7}.test/{i}.jpg", C.CAPTION: f"c {i}",
            C.STATUS: C.STATUS_SUCCESS if kind == "success" else C.STATUS_FAILED_DOWNLOAD,
            C.ERROR: {"transient": ["HTTP Error 503: Service Unavailable", "timeout: timed out"][i % 2],
                      "permanent": "HTTP Error 404: Not Found", "success": None}[kind],
            C.SIMILARITY: 0.25 + i / 1000 if i % 3 else None, C.SOURCE_ID: str(i), "extra": f"e{i}" if i % 4 else None,
        })
    rnd.shuffle(rows)
    cat = out / layout.CATALOG_DIR
    cat.mkdir()
    for k in range(2):
        pq.write_table(pa.Table.from_pylist(rows[k::2]), str(cat / f"part-{k:05d}.parquet"))
    return [r[C.UID] for r in rows if r[C.STATUS] == C.STATUS_FAILED_DOWNLOAD and "404" not in r[C.ERROR]]


def test_a_retry_input_is_files_of_whole_shards_written_alike_by_both_engines(spark, tmp_path):
    """prepare_retry wrote every row to retry as one file from one Spark task (coalesce(1): ~100M rows
    at 2B, then read whole into the driver by img2dataset's Reader). It now writes prepare's layout:
    the rows by uid, F = --shards-per-file whole shards of n rows in each file but the last, one task a
    file. img2dataset's Reader cuts each file into shards with ids continuing across files, so the
    pass's shards are those of one file of all the rows; both engines write the same bytes."""
    import pyarrow as pa
    import pyarrow.parquet as pq
    from img2dataset.reader import Reader

    from laiontools.stages import download as download_stage
    from laiontools.stages.download import DownloadConfig

    n, f = TEST_DOWNLOAD_SETTINGS["number_sample_per_shard"], TEST_DOWNLOAD_SETTINGS["shards_per_file"]
    n_rows = 3 * n * f + n + 7  # three full files, then one of a full shard and a short one
    folders = {}
    for engine in ("spark", "in-process"):
        out = tmp_path / engine
        uids = _failed_pool(out, n_rows)
        # a killed run's half-written temp folder is replaced
        (out / layout.PREPARED_DIR / "retry-01.tmp").mkdir()
        (out / layout.PREPARED_DIR / "retry-01.tmp" / "part-00009.parquet").write_bytes(b"half")
        cfg = DownloadConfig(input=str(tmp_path / "src"), output=str(out), **TEST_DOWNLOAD_SETTINGS)
        got = download_stage.prepare_retry(cfg, spark if engine == "spark" else None)
        assert got == str(out / layout.PREPARED_DIR / "retry-01")
        folders[engine] = Path(got)
        assert not (out / layout.PREPARED_DIR / "retry-01.tmp").exists()
    names = sorted(os.listdir(folders["spark"]))
    assert names == sorted(os.listdir(folders["in-process"])) == [f"part-{i:05d}.parquet" for i in range(4)]
    for name in names:
        assert (folders["spark"] / name).read_bytes() == (folders["in-process"] / name).read_bytes(), name
    tables = [pq.read_table(str(folders["spark"] / name)) for name in names]
    assert [t.num_rows for t in tables] == [n * f] * 3 + [n + 7]
    whole = pa.concat_tables(tables)
    assert whole.column(C.UID).to_pylist() == sorted(uids)
    assert whole.schema.field(C.SIMILARITY).type == pa.float64() and whole.column("extra").null_count > 0

    def shards(files: list[str], tmp: Path) -> dict[int, list[str]]:
        tmp.mkdir()
        r = Reader(files[0], "parquet", C.URL, C.CAPTION, None, None, [C.UID], n, set(), str(tmp), 0)
        r.input_files = files
        return {int(sid): pa.ipc.open_file(str(path)).read_all().column(C.UID).to_pylist() for sid, path in r}

    one = tmp_path / "one.parquet"
    pq.write_table(whole, str(one))  # the old layout: every row in one file
    got = shards([str(folders["spark"] / name) for name in names], tmp_path / "r-files")
    assert got == shards([str(one)], tmp_path / "r-one")
    assert sorted(got) == list(range(-(-n_rows // n))) and got[3 * f] == sorted(uids)[3 * f * n:(3 * f + 1) * n]


def test_on_spark_a_retry_input_takes_the_sessions_parquet_codec(spark, tmp_path):
    """The retry input's files, written by Spark tasks through pyarrow, are compressed with the session's
    spark.sql.parquet.compression.codec (they were zstd whatever the session said, as prepare's were)."""
    import pyarrow.parquet as pq

    from laiontools.stages import download as download_stage
    from laiontools.stages.download import DownloadConfig

    out = tmp_path / "pool"
    _failed_pool(out, 2 * TEST_DOWNLOAD_SETTINGS["number_sample_per_shard"] + 3)
    key = "spark.sql.parquet.compression.codec"
    before = spark.conf.get(key)
    spark.conf.set(key, "gzip")
    try:
        got = download_stage.prepare_retry(DownloadConfig(input=str(tmp_path / "src"), output=str(out), **TEST_DOWNLOAD_SETTINGS), spark)
    finally:
        spark.conf.set(key, before)
    files = sorted(Path(got).glob("*.parquet"))
    assert files and {pq.ParquetFile(f).metadata.row_group(0).column(c).compression
                      for f in files for c in range(pq.ParquetFile(f).metadata.num_columns)} == {"GZIP"}


def test_a_retry_pass_gives_the_same_input_and_pool_on_both_engines(pool, spark, tmp_path, monkeypatch):
    """A --retry-failed pass from the same pool on Spark and in process: the same retry input files, byte
    for byte, and then the same catalog rows (statuses, shards, keys) and manifest shard list."""
    from laiontools.stages import download as download_stage
    from laiontools.stages.download import DownloadConfig

    monkeypatch.delenv("LAIONTOOLS_SPARK_MASTER", raising=False)
    outs = {}
    for engine in ("spark", "in-process"):
        out = outs[engine] = str(tmp_path / engine)
        shutil.copytree(pool.dir, out)
        cfg = DownloadConfig(input=pool.source, output=out, retry_failed=True, **TEST_DOWNLOAD_SETTINGS)
        rep = download_stage.run(cfg, spark if engine == "spark" else None).details
        assert rep["engine"].startswith(engine)
    inputs = [Path(outs[e], layout.PREPARED_DIR, "retry-01") for e in ("spark", "in-process")]
    names = sorted(os.listdir(inputs[0]))
    assert names and names == sorted(os.listdir(inputs[1]))
    assert [(inputs[0] / n).read_bytes() for n in names] == [(inputs[1] / n).read_bytes() for n in names]
    got, want = _comparable(outs["in-process"]), _comparable(outs["spark"])
    pd.testing.assert_frame_equal(got[0], want[0])
    assert got[1] == want[1]
    assert any(s.startswith("shards/retry01/") for s, _ in got[1]["shards"])


def test_prepared_rows_the_driver_cannot_see_are_an_error_not_nothing_to_download(pool, tmp_path, monkeypatch):
    """On a cluster whose executors write the output path on their own disks, prepare's tasks wrote the accepted
    rows where the driver finds none: download said "nothing to download", then crashed with a raw traceback
    (a new user's cluster run). Simulated by taking the accepted files away once prepare is done: one error
    naming the rows and the folder; the same when only some of the files are seen. Files that show up a moment later (a shared file system's client answering
    from its caches for a while) are looked for again and downloaded, as the pool's own run downloads them."""
    import threading

    from laiontools.core.errors import UserError
    from laiontools.stages import download as download_stage
    from laiontools.stages import prepare
    from laiontools.stages.download import DownloadConfig

    monkeypatch.delenv("LAIONTOOLS_SPARK_MASTER", raising=False)
    out, aside = tmp_path / "p", tmp_path / "aside"
    stats = prepare.prepare_stats
    back: list[threading.Timer] = []

    hide = ["*.parquet"]  # which accepted files the driver does not see

    def elsewhere(*args, **kw):
        got = stats(*args, **kw)
        aside.mkdir(exist_ok=True)
        moved = [(f, aside / f.name) for f in (out / layout.PREPARED_DIR / "accepted").glob(hide[0])]
        for f, g in moved:
            f.rename(g)
        if back:  # put back a moment later (the driver's first look finds none)
            back[0] = threading.Timer(1.0, lambda: [g.rename(f) for f, g in moved])
            back[0].start()
        return got

    monkeypatch.setattr(prepare, "prepare_stats", elsewhere)
    monkeypatch.setattr("laiontools.core.storage.VISIBILITY_WAIT_S", 0.0)
    cfg = DownloadConfig(input=pool.source, output=str(out), **TEST_DOWNLOAD_SETTINGS)
    accepted = json.loads((Path(pool.dir) / layout.PREPARED_DIR / layout.PREPARED_STATS_JSON).read_text())["accepted"]
    with pytest.raises(UserError, match=rf"prepare accepted {accepted:,} rows into .*accepted, but the driver finds no file there"):
        download_stage.run(cfg)
    # some of the files seen, not all (executors of the driver's node and of others): was a pool without the
    # hidden files' rows, and no word of them
    shutil.rmtree(out)
    shutil.rmtree(aside)
    hide[0] = "part-00001.parquet"
    with pytest.raises(UserError, match=rf"prepare accepted {accepted:,} rows into .*accepted, but the driver finds only 1 of its 2 files"):
        download_stage.run(cfg)
    assert json.loads((out / layout.PREPARED_DIR / layout.PREPARED_STATS_JSON).read_text())["accepted_files"] == 2
    shutil.rmtree(out)
    shutil.rmtree(aside)
    hide[0] = "*.parquet"
    back.append(None)
    monkeypatch.setattr("laiontools.core.storage.VISIBILITY_WAIT_S", 60.0)
    download_stage.run(cfg)
    back[0].join()
    assert not list(aside.iterdir())  # (the run read the files put back, not none)
    monkeypatch.undo()
    flaky = set(pool.expected.loc[pool.expected["route"] == "flaky", "expected_uid"])  # (may differ run to run)
    pd.testing.assert_frame_equal(_comparable(str(out), flaky)[0], _comparable(pool.dir, flaky)[0])
