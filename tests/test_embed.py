"""embed: layout, read-back (embedding-reader), row alignment, resume, bad input, torchrun and Spark modes.

Real components throughout: webdataset tars on disk, open_clip's tiny shipped model (random init),
a real torchrun launch of 2 CPU processes, Spark local[2].
"""

from __future__ import annotations

import dataclasses
import io
import json
import os
import shutil
import tarfile
import tempfile
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from laiontools.contracts import layout
from laiontools.contracts.embeddings import (
    STATUS_FAILED_DECODE,
    STATUS_OK,
    EmbedMismatchError,
    MissingEmbeddingsError,
    load_model_json,
    read_embeddings,
    read_pool,
)
from laiontools.contracts.schema import ManifestError
from laiontools.models.embedder import Embedder, embedder_for
from laiontools.models.registry import ModelError
from laiontools.stages import embed as embed_stage
from laiontools.stages.embed import EmbedConfig, main, read_shard_samples
from laiontools.testing.embed_pool import write_pool

MODEL = "lt-tiny"


@pytest.fixture(scope="module")
def small_pool(tmp_path_factory) -> str:
    """3 shards x 8 samples of JPEG tars in download's layout; sample 3 is a corrupt JPEG."""
    return write_pool(str(tmp_path_factory.mktemp("embpool")), n_shards=3, per_shard=8, image_size=96,
                      realistic=False, corrupt=(3,))


@pytest.fixture(scope="module")
def pool_manifest(request, small_pool) -> str:
    """The real downloaded pool from conftest (`pool` fixture) when it exists, else the small one."""
    try:
        return str(request.getfixturevalue("pool").manifest)
    except pytest.FixtureLookupError:
        return small_pool


def _run(manifest: str, out: str, *extra: str) -> int:
    return main(["--manifest", manifest, "--output", out, "--model", MODEL, "--batch-size", "5",
                 "--num-workers", "0", *extra])


def _tar_samples(manifest: str) -> dict[str, list]:
    from laiontools.contracts.manifest import read_manifest, resolve

    m = read_manifest(manifest)
    return {layout.shard_id(s["path"]): read_shard_samples(resolve(manifest, s["path"]), s["sha256"])
            for s in m["shards"]}


@pytest.fixture(scope="module")
def embedded(tmp_path_factory, pool_manifest) -> str:
    out = str(tmp_path_factory.mktemp("emb") / "emb")
    assert _run(pool_manifest, out, "--num-workers", "2") == 0
    return out


def test_layout_alignment_and_scores(embedded, pool_manifest):
    tars = _tar_samples(pool_manifest)
    shards = list(read_embeddings(embedded, dtype=np.float16))
    assert [s[0] for s in shards] == sorted(tars)
    info = load_model_json(embedded)
    assert info["model"] == MODEL and info["embed_dim"] == 64 and info["image_size"] == [64, 64]
    assert "Normalize" in info["preprocess"]
    from laiontools.contracts.manifest import manifest_sha256, read_manifest

    assert info["pool"]["manifest_sha256"] == manifest_sha256(pool_manifest)
    assert info["pool"]["source_fingerprint"] == read_manifest(pool_manifest)["source"]["fingerprint"]
    for sid, img, txt, meta in shards:
        samples = tars[sid]
        assert img.dtype == np.float16 and txt.dtype == np.float16 and img.shape[1] == 64
        assert len(img) == len(txt) == len(meta) == len(samples)
        # Row i is tar sample i (keys in tar order), uids from the sample's json.
        assert list(meta["key"]) == [k for k, _ in samples]
        assert list(meta.columns) == ["uid", "key", "clip_score", "embed_status", "embed_error"]
        ok = (meta["embed_status"] == STATUS_OK).to_numpy()
        assert np.allclose(np.linalg.norm(img[ok].astype(np.float32), axis=1), 1, atol=2e-3)
        assert np.allclose(np.linalg.norm(txt.astype(np.float32), axis=1), 1, atol=2e-3)
        assert not img[~ok].any()  # failed rows: zero image vector, row kept
        dots = (img.astype(np.float32) * txt.astype(np.float32)).sum(1)
        assert np.allclose(meta["clip_score"].to_numpy(dtype=np.float32, na_value=np.nan)[ok], dots[ok], atol=5e-3)
        assert meta["clip_score"][~ok].isna().all()
        scores = pd.read_parquet(os.path.join(embedded, layout.EMB_SCORES_DIR, sid + ".parquet"))
        assert list(scores.columns) == ["uid", "clip_score"] and list(scores["uid"]) == list(meta["uid"])


def test_embedding_reader_reads_output(embedded):
    """autofaiss reads embeddings with embedding-reader; it must see every row with its metadata."""
    from embedding_reader import EmbeddingReader

    total = sum(len(m) for _, _, _, m in read_embeddings(embedded))
    reader = EmbeddingReader(os.path.join(embedded, layout.EMB_IMG_DIR), file_format="parquet_npy",
                             metadata_folder=os.path.join(embedded, layout.EMB_META_DIR), meta_columns=["uid"])
    assert reader.count == total and reader.dimension == 64
    got_uids, got = [], []
    for emb, meta in reader(batch_size=7, show_progress=False):
        got.append(emb)
        got_uids += list(meta["uid"])
    mine = list(read_embeddings(embedded, dtype=np.float16))
    assert got_uids == [u for _, _, _, m in mine for u in m["uid"]]
    assert np.array_equal(np.concatenate(got), np.concatenate([i for _, i, _, _ in mine]))


def test_embedder_reproduces_pool_embeddings(embedded, pool_manifest):
    """Dedup embeds evaluation images with Embedder: it must land in the pool's space (same model + preprocessing)."""
    from PIL import Image

    sid, img, txt, meta = next(read_embeddings(embedded))
    samples = _tar_samples(pool_manifest)[sid]
    emb = embedder_for(embedded, device="cpu", batch_size=3)
    assert emb.info["model"] == MODEL and emb.dim == 64
    ok = [i for i in range(len(samples)) if meta["embed_status"][i] == STATUS_OK][:6]
    pil = [Image.open(io.BytesIO(samples[i][1]["jpg"])) for i in ok]
    mine = emb.embed_images(iter(pil))
    assert mine.dtype == np.float32 and np.allclose(np.linalg.norm(mine, axis=1), 1, atol=1e-5)
    assert np.allclose(mine, img[ok], atol=3e-3)
    texts = [samples[i][1]["txt"].decode() for i in ok]
    assert np.allclose(emb.embed_texts(texts), txt[ok], atol=3e-3)
    assert emb.embed_images([]).shape == (0, 64)


def test_corrupt_sample_keeps_row_and_is_counted(small_pool, tmp_path):
    out = str(tmp_path / "emb")
    assert _run(small_pool, out) == 0
    sid, img, txt, meta = next(read_embeddings(out))
    assert sid == "00000" and len(meta) == 8
    row = meta.iloc[3]
    assert row["embed_status"] == STATUS_FAILED_DECODE and row["embed_error"] and row["uid"]
    assert pd.isna(row["clip_score"]) and not img[3].any() and txt[3].any()
    assert (meta["embed_status"] == STATUS_OK).sum() == 7
    from laiontools.core.storage import read_json

    rep = read_json(os.path.join(out, "embed_report.json"))
    assert rep["totals"] == {"rows": 24, "failed_decode": 1, "shards_done": 3}


def test_resume_skips_done_and_redoes_interrupted(small_pool, tmp_path):
    out = str(tmp_path / "emb")
    assert _run(small_pool, out) == 0
    before = {sid: (i.copy(), m.copy()) for sid, i, _, m in read_embeddings(out)}
    marker = os.path.join(out, layout.EMB_META_DIR, "00001.parquet.done")
    done_mtime = os.path.getmtime(os.path.join(out, layout.EMB_META_DIR, "00000.parquet.done"))
    # A run killed while writing shard 00001: data files there or half there, no marker.
    os.remove(marker)
    os.remove(os.path.join(out, layout.EMB_TEXT_DIR, "00001.npy"))
    with open(os.path.join(out, layout.EMB_IMG_DIR, ".00001.npy.tmp-deadbeef"), "wb") as f:
        f.write(b"half")
    res = embed_stage.run(EmbedConfig(manifest=small_pool, output=out, model=MODEL, batch_size=5, num_workers=0)).details
    assert res.shards_embedded == ["00001"] and res.shards_skipped == ["00000", "00002"] and res.ok
    assert os.path.getmtime(os.path.join(out, layout.EMB_META_DIR, "00000.parquet.done")) == done_mtime
    after = {sid: (i, m) for sid, i, _, m in read_embeddings(out)}
    assert sorted(after) == sorted(before)
    for sid in before:
        assert np.array_equal(before[sid][0], after[sid][0])
        pd.testing.assert_frame_equal(before[sid][1], after[sid][1])


def test_resume_redoes_a_shard_whose_files_changed_after_its_marker(small_pool, tmp_path, caplog):
    """A shard file emptied (or otherwise resized) after its marker was written was trusted on resume:
    embed skipped the shard and only a later reader refused it. Resume now compares each done shard's
    file sizes with those its marker recorded (one listing per folder), embeds a changed shard again
    with one warning naming the file, and gives what an untouched run gave. A marker from before sizes
    were recorded has its files hashed once, then gets their sizes."""
    import json

    out = str(tmp_path / "emb")
    assert _run(small_pool, out) == 0
    before = {sid: (i.copy(), t.copy(), m.copy()) for sid, i, t, m in read_embeddings(out)}

    def same_as_before() -> None:
        after = {sid: (i, t, m) for sid, i, t, m in read_embeddings(out)}  # checks every file's sha256
        assert sorted(after) == sorted(before)
        for sid in before:
            assert np.array_equal(before[sid][0], after[sid][0]) and np.array_equal(before[sid][1], after[sid][1])
            pd.testing.assert_frame_equal(before[sid][2], after[sid][2])

    emptied = os.path.join(out, layout.EMB_IMG_DIR, "00001.npy")
    open(emptied, "wb").close()
    grown = os.path.join(out, layout.EMB_SCORES_DIR, "00002.parquet")
    with open(grown, "ab") as f:
        f.write(b"\0")
    with caplog.at_level("WARNING", logger="laiontools.stages.embed"):
        res = embed_stage.run(EmbedConfig(manifest=small_pool, output=out, model=MODEL, batch_size=5, num_workers=0)).details
    assert res.shards_embedded == ["00001", "00002"] and res.shards_skipped == ["00000"] and res.ok
    warned = [r.getMessage() for r in caplog.records if "embedding the shard again" in r.getMessage()]
    assert len(warned) == 2
    assert f"{emptied} is 0 bytes, its marker recorded" in warned[0] and f"{grown} is " in warned[1]
    same_as_before()

    # an older marker (sha256 only) of an intact shard: hashed, kept, and its sizes recorded
    from laiontools.contracts.embeddings import MARKER_BYTES

    old_marker = os.path.join(out, layout.EMB_META_DIR, "00000.parquet.done")
    with open(old_marker) as f:
        marker = json.load(f)
    sizes = marker.pop(MARKER_BYTES)
    with open(old_marker, "w") as f:
        json.dump(marker, f)
    res = embed_stage.run(EmbedConfig(manifest=small_pool, output=out, model=MODEL, batch_size=5, num_workers=0)).details
    assert res.shards_embedded == [] and res.shards_skipped == ["00000", "00001", "00002"]
    with open(old_marker) as f:
        assert json.load(f)[MARKER_BYTES] == sizes
    # ... and a changed file under an older marker is found by its sha256
    with open(old_marker, "w") as f:
        json.dump(marker, f)
    text = os.path.join(out, layout.EMB_TEXT_DIR, "00000.npy")
    with open(text, "r+b") as f:
        f.seek(-1, os.SEEK_END)
        last = f.read(1)[0]
        f.seek(-1, os.SEEK_END)
        f.write(bytes([last ^ 1]))
    caplog.clear()
    with caplog.at_level("WARNING", logger="laiontools.stages.embed"):
        res = embed_stage.run(EmbedConfig(manifest=small_pool, output=out, model=MODEL, batch_size=5, num_workers=0)).details
    assert res.shards_embedded == ["00000"]
    assert any(f"{text} has sha256" in r.getMessage() for r in caplog.records)
    same_as_before()


def _pool_with_two_bad_shards(small_pool: str, tmp_path) -> tuple[str, str]:
    """A copy of `small_pool` (folder, manifest) whose shard 00000 is missing and 00002 has a byte flipped
    (its sha256 is not the manifest's)."""
    pool = str(tmp_path / "pool")
    shutil.copytree(os.path.dirname(small_pool), pool)
    os.remove(os.path.join(pool, "shards", "00000.tar"))
    with open(os.path.join(pool, "shards", "00002.tar"), "r+b") as f:
        f.seek(600)
        b = f.read(1)
        f.seek(600)
        f.write(bytes([b[0] ^ 0xFF]))
    return pool, os.path.join(pool, layout.POOL_MANIFEST)


def test_bad_shards_reported_others_finish(small_pool, tmp_path):
    pool, manifest = _pool_with_two_bad_shards(small_pool, tmp_path)
    out = str(tmp_path / "emb")
    res = embed_stage.run(EmbedConfig(manifest=manifest, output=out, model=MODEL, batch_size=5, num_workers=2)).details
    assert not res.ok and res.shards_embedded == ["00001"]
    assert set(res.failed_shards) == {"00000", "00002"}
    assert "missing" in res.failed_shards["00000"] and "sha256" in res.failed_shards["00002"]
    assert [s for s, *_ in read_embeddings(out)] == ["00001"]
    assert _run(manifest, out) == 1  # the CLI exit code says shards are missing
    # Repair the pool: the next run embeds just the two failed shards.
    for s in ("00000", "00002"):
        shutil.copy(os.path.join(os.path.dirname(small_pool), "shards", s + ".tar"), os.path.join(pool, "shards"))
    res = embed_stage.run(EmbedConfig(manifest=manifest, output=out, model=MODEL, batch_size=5, num_workers=0)).details
    assert res.ok and res.shards_embedded == ["00000", "00002"] and res.shards_skipped == ["00001"]


def test_manifest_missing_or_invalid(tmp_path):
    with pytest.raises(ManifestError, match="does not exist"):
        _run(str(tmp_path / "nope.json"), str(tmp_path / "emb"))
    bad = tmp_path / "pool.manifest.json"
    bad.write_text('{"schema_version": "1.0", "name": "x"}')
    with pytest.raises(ManifestError, match="invalid manifest"):
        _run(str(bad), str(tmp_path / "emb"))
    from laiontools.cli import main as cli_main

    assert cli_main(["embed", "--manifest", str(bad), "--output", str(tmp_path / "emb"), "--model", MODEL]) == 2


def test_unknown_model_lists_close_names(small_pool, tmp_path):
    with pytest.raises(ModelError, match="lt-tiny"):
        main(["--manifest", small_pool, "--output", str(tmp_path / "e"), "--model", "lt-tinny"])
    assert not os.path.exists(tmp_path / "e" / layout.EMB_MODEL_JSON)


@pytest.mark.parametrize("kind", ["empty", "tensor", "safetensors"])
def test_pretrained_file_that_is_no_state_dict_exits_2_naming_it(small_pool, tmp_path, capsys, kind):
    import torch

    from laiontools.cli import main as cli_main

    path = tmp_path / ("w.safetensors" if kind == "safetensors" else "w.pt")
    if kind == "empty":
        torch.save({}, path)
    elif kind == "tensor":
        torch.save(torch.zeros(3), path)
    else:
        path.write_bytes(b"garbage not safetensors")
    out = tmp_path / "e"
    assert cli_main(["embed", "--manifest", small_pool, "--output", str(out), "--model", MODEL,
                     "--pretrained", str(path), "--num-workers", "0"]) == 2
    # the last line: the CLI's one-line error (earlier in-process CLI runs may leave log handlers on closed streams)
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert err.startswith("laiontools embed: error:") and str(path) in err
    assert not os.path.exists(out / layout.EMB_MODEL_JSON)


def test_other_model_refused_names_both(embedded, pool_manifest):
    with pytest.raises(EmbedMismatchError) as e:
        main(["--manifest", pool_manifest, "--output", embedded, "--model", "lt-small"])
    assert "lt-tiny" in str(e.value) and "lt-small" in str(e.value) and "dim 64" in str(e.value)


def test_other_model_refused_on_spark_before_spark_starts(embedded, pool_manifest, monkeypatch):
    """--engine spark into a folder of another model: the same refusal, before any Spark session (the
    session and its probe task come only after the folder's model and pool are checked)."""
    def no_spark(*a, **k):
        raise AssertionError("a Spark session was started")

    monkeypatch.setattr(embed_stage, "stage_spark", no_spark)
    with pytest.raises(EmbedMismatchError) as e:
        main(["--manifest", pool_manifest, "--output", embedded, "--model", "lt-small", "--engine", "spark"])
    assert "lt-tiny" in str(e.value) and "lt-small" in str(e.value)


def test_other_pool_refused(embedded, tmp_path):
    other = write_pool(str(tmp_path / "p2"), n_shards=1, per_shard=2, image_size=64, realistic=False, seed=7)
    with pytest.raises(EmbedMismatchError, match="pool"):
        _run(other, embedded)


def _assert_same_output(a: str, b: str) -> None:
    ra, rb = list(read_embeddings(a)), list(read_embeddings(b))
    assert [s for s, *_ in ra] == [s for s, *_ in rb]
    for (_, ia, ta, ma), (_, ib, tb, mb) in zip(ra, rb):
        assert np.allclose(ia, ib, atol=2e-3) and np.allclose(ta, tb, atol=2e-3)
        assert list(ma["uid"]) == list(mb["uid"]) and list(ma["embed_status"]) == list(mb["embed_status"])


def test_torchrun_two_processes(small_pool, tmp_path):
    """--engine torchrun launches the processes itself (here 2 CPU processes on gloo), each taking
    shards[rank::world], and they write the same embeddings as one local process."""
    local = str(tmp_path / "local")
    assert _run(small_pool, local) == 0
    out = str(tmp_path / "ddp")
    # a secret typed into a setting reaches the ranks' config but no file of the output (their settings
    # files are records: redacted), and the ranks' config file is gone after the launch
    secret = {"spark.hadoop.fs.s3a.secret.key": "wJalr-embed-s3cr3t"}
    tmp_before = set(os.listdir(tempfile.gettempdir()))
    res = embed_stage.run(EmbedConfig(manifest=small_pool, output=out, model=MODEL, batch_size=5, num_workers=0,
                                      engine="torchrun", nproc=2, spark_conf=secret))
    log = Path(out, "logs", "launcher.log").read_text()
    assert not [p for p in Path(out).rglob("*") if p.is_file() and b"wJalr-embed-s3cr3t" in p.read_bytes()]
    assert not [f for f in set(os.listdir(tempfile.gettempdir())) - tmp_before if f.startswith("laiontools-embed-") and f.endswith(".json")]
    assert res.ok and res.counts["processes"] == 2, log[-3000:]
    assert sorted(res.details.shards_embedded) == ["00000", "00001", "00002"] and res.details.rows == 24
    from laiontools.core.storage import read_json

    rep = read_json(os.path.join(out, "embed_report.json"))
    assert sorted(rep["this_run"]["shards_embedded"]) == ["00000", "00001", "00002"]
    # two ranks ran: rank 1 wrote its own settings with the group's size
    assert read_json(os.path.join(out, "settings.rank1.json"))["world_size"] == 2
    assert read_json(os.path.join(out, "settings.rank1.json"))["spark_conf"] == {"spark.hadoop.fs.s3a.secret.key": "***"}
    assert not os.path.exists(os.path.join(out, ".laiontools.lock"))  # the launcher released the output
    _assert_same_output(local, out)
    # through the CLI, a re-run of the finished output skips every shard
    assert _run(small_pool, out, "--engine", "torchrun", "--nproc", "2") == 0
    assert read_json(os.path.join(out, "embed_report.json"))["this_run"]["shards_skipped"] == ["00000", "00001", "00002"]


@pytest.mark.skipif(not os.path.exists("/proc/self/stat"), reason="reads /proc (Linux)")
def test_torchrun_ranks_die_with_a_killed_launcher(small_pool, tmp_path):
    """`kill -9` of an `--engine torchrun` run's process group (the CLI and torchrun together, as a kill
    test or `kill -9 -PGID` does) while rank 0 is about to write the report: torchrun starts every rank in
    a session of its own, so a rank that does not ask to die with its parent went on running, and wrote
    into an output whose lock had gone with the launcher (a re-run resuming it would be writing too)."""
    import signal
    import subprocess
    import sys
    import time

    from laiontools.testing.procs import alive, descendants

    out = str(tmp_path / "ddp")
    console = Path(out, "logs", "launcher.log")
    env = {**os.environ, "LAIONTOOLS_FAILPOINTS": "embed.final-write=60"}  # rank 0 waits before the report
    launcher = subprocess.Popen([sys.executable, "-m", "laiontools.cli", "embed", "--manifest", small_pool, "--output", out,
                                 "--model", MODEL, "--batch-size", "5", "--num-workers", "0", "--engine", "torchrun",
                                 "--nproc", "2"], env=env, start_new_session=True,
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    ranks: list[int] = []
    try:
        deadline = time.monotonic() + 150
        while launcher.poll() is None and time.monotonic() < deadline:
            if console.exists() and "failpoint embed.final-write" in console.read_text(errors="replace"):
                break
            time.sleep(0.1)
        tree = descendants(launcher.pid)
        ranks = [p for p in tree if b"--config" in Path(f"/proc/{p}/cmdline").read_bytes()]
        assert ranks, (launcher.poll(), console.read_text()[-2000:] if console.exists() else "no console")
        os.killpg(launcher.pid, signal.SIGKILL)
        launcher.wait(timeout=10)
        deadline = time.monotonic() + 10
        while any(alive(p) for p in ranks) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert [p for p in ranks if alive(p)] == [], "a rank outlived its killed launcher and torchrun"
    finally:
        for p in [launcher.pid, *ranks]:
            try:
                os.kill(p, signal.SIGKILL)
            except ProcessLookupError:
                pass
        launcher.wait(timeout=10)


def test_spark_one_task_per_shard(spark, small_pool, tmp_path):
    local = str(tmp_path / "local")
    assert _run(small_pool, local) == 0
    out = str(tmp_path / "spark")
    # One DataLoader decode worker inside each Spark task (a child of Spark's Python worker), as on a
    # GPU cluster; the local reference run above decodes in-process.
    res = embed_stage.run(EmbedConfig(manifest=small_pool, output=out, model=MODEL, batch_size=5, num_workers=1,
                                engine="spark"), spark=spark).details
    assert res.ok and res.shards_embedded == ["00000", "00001", "00002"] and res.failed_decode == 1
    _assert_same_output(local, out)


def test_auto_engine_is_spark_where_the_other_spark_stages_run(embedded, monkeypatch):
    """--engine auto (the default): spark under spark-submit or with a master named (flag or
    $LAIONTOOLS_SPARK_MASTER), as the Spark stages decide; local otherwise and in a torchrun rank."""
    import dataclasses

    from laiontools.core.storage import read_json
    from laiontools.stages.embed import resolve_engine

    # the module's run without --engine embedded in this process, and said so
    assert read_json(os.path.join(embedded, layout.SETTINGS_JSON))["engine"] == "local"
    monkeypatch.delenv("LAIONTOOLS_SPARK_MASTER", raising=False)
    monkeypatch.delenv("PYSPARK_GATEWAY_PORT", raising=False)
    cfg = EmbedConfig(manifest="m", output="o", model=MODEL)
    assert cfg.engine == "auto" and resolve_engine(cfg, 1) == "local"
    named = dataclasses.replace(cfg, master="spark://10.0.0.1:7077")
    assert resolve_engine(named, 1) == "spark"
    assert resolve_engine(named, 2) == "local"  # a rank torchrun started
    monkeypatch.setenv("LAIONTOOLS_SPARK_MASTER", "spark://10.0.0.1:7077")
    assert resolve_engine(cfg, 1) == "spark"
    monkeypatch.delenv("LAIONTOOLS_SPARK_MASTER")
    monkeypatch.setenv("PYSPARK_GATEWAY_PORT", "40000")  # what spark-submit hands its driver
    assert resolve_engine(cfg, 1) == "spark"


def test_worker_count_does_not_change_order(small_pool, tmp_path):
    """Decode workers interleave batches; the output must not depend on how many there are."""
    a, b = str(tmp_path / "w0"), str(tmp_path / "w3")
    assert _run(small_pool, a, "--num-workers", "0") == 0
    assert _run(small_pool, b, "--num-workers", "3") == 0
    _assert_same_output(a, b)


def test_unsplit_transform_path_gives_same_embeddings(small_pool, tmp_path):
    """A model whose transform BatchPreprocess cannot split runs open_clip's transform per image
    (float batches); both paths must embed the same."""
    from laiontools.contracts.manifest import read_manifest
    from laiontools.stages.embed import _embed_tasks, _shard_tasks

    tasks = _shard_tasks(small_pool, read_manifest(small_pool))
    emb = Embedder(MODEL, None, "cpu", 5, "auto")
    outs = []
    for split in (True, False):
        emb.batch_preprocess.split = split
        out = str(tmp_path / f"split-{split}")
        os.makedirs(out)
        cfg = EmbedConfig(manifest=small_pool, output=out, model=MODEL, batch_size=5, num_workers=0)
        stats = _embed_tasks(tasks, emb, cfg)
        assert sum(s["rows"] for s in stats) == 24
        outs.append(out)
    for (_, ia, ta, ma), (_, ib, tb, mb) in zip(read_embeddings(outs[0]), read_embeddings(outs[1])):
        assert np.array_equal(ia, ib) and np.array_equal(ta, tb)
        assert list(ma["embed_status"]) == list(mb["embed_status"])


def test_read_shard_rejects_non_tar(tmp_path):
    p = tmp_path / "x.tar"
    p.write_bytes(b"not a tar at all" * 100)
    from laiontools.stages.embed import ShardError

    with pytest.raises(ShardError, match="x.tar"):
        read_shard_samples(str(p), None)
    # a tar with a hidden file and a sample with no image: one row, no crash
    q = tmp_path / "y.tar"
    with tarfile.open(q, "w") as tf:
        for name, data in (("._junk", b"x"), ("k1.txt", b"hello"), ("k1.json", b'{"uid": "ab"}')):
            ti = tarfile.TarInfo(name)
            ti.size = len(data)
            tf.addfile(ti, io.BytesIO(data))
    assert [k for k, _ in read_shard_samples(str(q), None)] == ["k1"]


@pytest.mark.gpu
def test_auto_precision_asks_about_the_gpu_it_will_run_on():
    """'auto' is bf16 autocast on a GPU that has bf16 (compute capability 8.0 on), fp16 on one without, for each
    GPU by its own index: torch's is_bf16_supported answers for the current GPU, so on a node of mixed GPUs
    cuda:1 got cuda:0's answer."""
    torch = pytest.importorskip("torch")
    if not torch.cuda.is_available():
        pytest.skip("needs CUDA")
    from laiontools.models.embedder import resolve_precision

    for i in range(torch.cuda.device_count()):
        has_bf16 = torch.cuda.get_device_properties(i).major >= 8
        assert resolve_precision("auto", f"cuda:{i}") == ("amp_bf16" if has_bf16 else "amp_fp16"), i
        assert torch.cuda.current_device() == 0  # asked without moving the process's current GPU
    assert resolve_precision("auto", "cpu") == "fp32" and resolve_precision("fp32", "cuda:0") == "fp32"


@pytest.mark.gpu
def test_gpu_matches_cpu(small_pool, tmp_path):
    torch = pytest.importorskip("torch")
    if not torch.cuda.is_available():
        pytest.skip("needs CUDA")
    cpu, gpu = str(tmp_path / "cpu"), str(tmp_path / "gpu")
    assert _run(small_pool, cpu, "--device", "cpu") == 0
    assert _run(small_pool, gpu, "--device", "cuda", "--precision", "amp_bf16", "--num-workers", "2") == 0
    rows = 0
    for (_, ia, ta, ma), (_, ib, tb, mb) in zip(read_embeddings(cpu), read_embeddings(gpu), strict=True):
        # the corrupt JPEG (sample 3) fails to decode on both devices: its image row is zeros in both
        assert list(ma["embed_status"]) == list(mb["embed_status"])
        ok = (ma["embed_status"] == STATUS_OK).to_numpy()
        assert not ia[~ok].any() and not ib[~ok].any()
        assert (ia[ok] * ib[ok]).sum(1).min() > 0.98  # bf16 autocast on the GPU vs fp32 on the CPU
        assert (ta * tb).sum(1).min() > 0.98
        rows += len(ma)
    assert rows == 24


def test_device_cuda_in_a_torchrun_rank_is_that_ranks_gpu_and_a_missing_gpu_is_named(monkeypatch):
    """`--device cuda` under torchrun gave every rank plain "cuda" (cuda:0): all ranks' models on GPU 0,
    the others idle. It is the rank's GPU now (LOCAL_RANK, as the default device is); cuda:N past the
    last GPU is a ConfigError naming the count, not an error inside open_clip. (torch faked to see 4 GPUs.)"""
    import torch

    from laiontools.core.config import ConfigError
    from laiontools.models.embedder import resolve_device

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 4)
    monkeypatch.delenv("LOCAL_RANK", raising=False)
    assert resolve_device("cuda") == "cuda" and resolve_device(None) == "cuda:0"
    monkeypatch.setenv("LOCAL_RANK", "2")
    assert resolve_device("cuda") == resolve_device(None) == "cuda:2"
    assert resolve_device("cuda:1") == "cuda:1" and resolve_device("cpu") == "cpu"
    monkeypatch.setenv("LOCAL_RANK", "5")  # one GPU per rank made visible by the launcher: 5 % 4
    assert resolve_device("cuda") == "cuda:1"
    for bad in ("cuda:4", "cuda:x"):
        with pytest.raises(ConfigError, match=rf"device '{bad}' asked for but torch sees 4 CUDA device\(s\); use --device cpu or cuda:0..3"):
            resolve_device(bad)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 0)
    with pytest.raises(ConfigError, match=r"torch sees 0 CUDA device\(s\); use --device cpu$"):
        resolve_device("cuda")


@pytest.mark.gpu
def test_embedder_on_a_gpu_makes_it_the_current_device(monkeypatch):
    """An Embedder on cuda:N (a torchrun rank's GPU) makes cuda:N the current device: the DataLoader's
    pin-memory thread pins on the current device, which was cuda:0 in every rank (a context each there)."""
    torch = pytest.importorskip("torch")
    if not torch.cuda.is_available():
        pytest.skip("needs CUDA")
    last = torch.cuda.device_count() - 1
    monkeypatch.setenv("LOCAL_RANK", str(last))
    emb = Embedder(MODEL, device="cuda", batch_size=4, precision="fp32")
    assert emb.device == f"cuda:{last}" and torch.cuda.current_device() == last
    assert next(emb.model.parameters()).device == torch.device(emb.device)


def test_fast_decode_close_to_exact(tmp_path):
    """--fast-decode (JPEG DCT-scaled decode of images >= 2x the model input) stays in the same space."""
    manifest = write_pool(str(tmp_path / "p"), n_shards=1, per_shard=4, image_size=256, realistic=False)
    exact, fast = str(tmp_path / "exact"), str(tmp_path / "fast")
    assert _run(manifest, exact) == 0
    assert _run(manifest, fast, "--fast-decode") == 0
    assert load_model_json(fast)["jpeg_draft_decode"] is True and load_model_json(exact)["jpeg_draft_decode"] is False
    (_, ie, _, _), (_, if_, _, mf) = next(read_embeddings(exact)), next(read_embeddings(fast))
    assert (mf["embed_status"] == STATUS_OK).all()
    cos = (ie * if_).sum(1)
    assert cos.min() > 0.95 and not np.array_equal(ie, if_)  # draft decode really ran, and changed little


# ---------------------------------------------------------------------------------------------
# weights that give NaN, bad uids (pools edited in place: shard 00000 rewritten, manifest updated)


def _pool_with_shard0(small_pool: str, tmp_path, edit) -> str:
    """A copy of the pool whose shard 00000 holds edit([(key, {ext: bytes})]); returns its manifest."""
    pool = str(tmp_path / "pool_edit")
    shutil.copytree(os.path.dirname(small_pool), pool)
    manifest = os.path.join(pool, layout.POOL_MANIFEST)
    _rewrite_shard0_in_place(manifest, edit)
    return manifest


def _rewrite_shard0_in_place(manifest: str, edit) -> None:
    """Shard 00000 of the pool at `manifest` rewritten in place as edit([(key, {ext: bytes})]), the manifest
    updated in place (as a re-download of a damaged shard leaves the pool: same path, same source)."""
    import hashlib

    tar = os.path.join(os.path.dirname(manifest), "shards", "00000.tar")
    samples = edit(read_shard_samples(tar, None))
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as tf:
        for key, parts in samples:
            for ext, data in parts.items():
                info = tarfile.TarInfo(f"{key}.{ext}")
                info.size = len(data)
                tf.addfile(info, io.BytesIO(data))
    data = buf.getvalue()
    with open(tar, "wb") as f:
        f.write(data)
    with open(manifest) as f:
        m = json.load(f)
    m["shards"][0].update(sha256=hashlib.sha256(data).hexdigest(), bytes=len(data), num_samples=len(samples))
    with open(manifest, "w") as f:
        json.dump(m, f)


def test_nan_weights_refused_before_anything_is_written(small_pool, tmp_path, capsys):
    import torch

    from laiontools.cli import main as cli_main
    from laiontools.models.registry import load_model

    sd = load_model(MODEL).model.state_dict()
    sd["visual.proj"] = torch.full_like(sd["visual.proj"], float("nan"))
    ckpt = tmp_path / "nan.pt"
    torch.save(sd, ckpt)
    out = tmp_path / "e"
    assert cli_main(["embed", "--manifest", small_pool, "--output", str(out), "--model", MODEL,
                     "--pretrained", str(ckpt), "--num-workers", "0", "--batch-size", "5"]) == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert err.startswith("laiontools embed: error:") and str(ckpt) in err and "non-finite" in err
    assert not os.path.exists(out / layout.EMB_META_DIR) and not os.path.exists(out / layout.EMB_IMG_DIR)


def test_nan_after_the_first_batch_is_refused_before_the_shard_is_written(small_pool, tmp_path):
    """Weights NaN only for one token: the first batch is finite, a later row is NaN; the shard is not written."""
    import torch

    from laiontools.models.registry import load_model

    word = "qzxwvkj"

    def edit(samples):
        samples[6][1]["txt"] = f"a photo of {word}".encode()  # batch 2 of shard 00000 (batch size 5)
        return samples

    manifest = _pool_with_shard0(small_pool, tmp_path, edit)
    bundle = load_model(MODEL)
    others = {int(t) for k, p in read_shard_samples(os.path.join(os.path.dirname(manifest), "shards", "00000.tar"), None)
              if word not in p["txt"].decode() for t in bundle.tokenizer([p["txt"].decode()])[0]}
    only = [int(t) for t in bundle.tokenizer([f"a photo of {word}"])[0] if int(t) not in others]
    assert only
    sd = bundle.model.state_dict()
    sd["token_embedding.weight"][only[0]] = float("nan")
    ckpt = tmp_path / "tok_nan.pt"
    torch.save(sd, ckpt)
    out = str(tmp_path / "e")
    with pytest.raises(ModelError, match="non-finite.*shard 00000") as e:
        _run(manifest, out, "--pretrained", str(ckpt))
    assert str(ckpt) in str(e.value)
    assert not os.path.exists(os.path.join(out, layout.EMB_IMG_DIR, "00000.npy"))
    assert not os.path.exists(os.path.join(out, layout.EMB_META_DIR, "00000.parquet.done"))


def test_bad_and_repeated_uids_are_failed_rows_not_ok(small_pool, tmp_path):
    import json

    bad = [12345, "", ["x"], "hello world", "0123456789ABCDEF0123456789ABCDEF", "0123456789abcdef0123456789abcde"]

    def edit(samples):
        for (key, parts), uid in zip(samples, bad):
            parts["json"] = json.dumps({"uid": uid}).encode()
        samples[7][1]["json"] = samples[6][1]["json"]  # sample 7 repeats sample 6's (valid) uid
        return samples

    manifest = _pool_with_shard0(small_pool, tmp_path, edit)
    out = str(tmp_path / "e")
    assert _run(manifest, out) == 0
    sid, img, _, meta = next(read_embeddings(out))
    assert sid == "00000" and len(meta) == 8
    for i, uid in enumerate(bad):
        row = meta.iloc[i]
        assert row["embed_status"] == STATUS_FAILED_DECODE and pd.isna(row["uid"]), (i, uid)
        assert "not 32 lowercase hex" in row["embed_error"] and not img[i].any()
    first, rep = meta.iloc[6], meta.iloc[7]
    assert first["embed_status"] == STATUS_OK and len(first["uid"]) == 32
    assert rep["embed_status"] == STATUS_FAILED_DECODE and pd.isna(rep["uid"]) and not img[7].any()
    assert first["uid"] in rep["embed_error"] and "repeats" in rep["embed_error"] and first["key"] in rep["embed_error"]
    assert meta["uid"].dropna().is_unique


def test_resume_with_other_precision_or_decode_settings_is_refused(small_pool, tmp_path):
    import json

    out = str(tmp_path / "e")
    assert _run(small_pool, out) == 0
    info = load_model_json(out)
    assert info["precision"] == "auto" and info["jpeg_draft_decode"] is False
    os.remove(os.path.join(out, layout.EMB_META_DIR, "00001.parquet.done"))  # one shard left to do
    with pytest.raises(EmbedMismatchError, match=r"precision: 'auto' \(= \w+\) there, 'bf16' now") as e:
        _run(small_pool, out, "--precision", "bf16")
    assert out in str(e.value)
    with pytest.raises(EmbedMismatchError, match="jpeg_draft_decode: False there, True now"):
        _run(small_pool, out, "--fast-decode")
    assert not os.path.exists(os.path.join(out, layout.EMB_META_DIR, "00001.parquet.done"))
    # A folder written before these settings were recorded: resumable with the defaults it was made with.
    path = os.path.join(out, layout.EMB_MODEL_JSON)
    with open(path) as f:
        doc = json.load(f)
    del doc["precision"], doc["jpeg_draft_decode"]
    with open(path, "w") as f:
        json.dump(doc, f)
    with pytest.raises(EmbedMismatchError, match="jpeg_draft_decode"):
        _run(small_pool, out, "--fast-decode")
    res = embed_stage.run(EmbedConfig(manifest=small_pool, output=out, model=MODEL, batch_size=5, num_workers=0)).details
    assert res.ok and res.shards_embedded == ["00001"]


def test_resume_compares_the_precision_used_not_the_one_asked(small_pool, tmp_path):
    out = str(tmp_path / "e")
    done = os.path.join(out, layout.EMB_META_DIR, "00001.parquet.done")
    assert _run(small_pool, out, "--device", "cpu") == 0
    os.remove(done)  # one shard left to do
    assert _run(small_pool, out, "--device", "cpu", "--precision", "fp32") == 0  # what auto is on the CPU
    assert os.path.exists(done)
    info = load_model_json(out)
    assert info["precision"] == "auto" and info["precision_used"] == "fp32"
    os.remove(done)
    with pytest.raises(EmbedMismatchError, match=r"precision: 'auto' \(= fp32\) there, 'bf16' now"):
        _run(small_pool, out, "--device", "cpu", "--precision", "bf16")  # a real change: still refused
    assert not os.path.exists(done)


def test_a_fifo_or_gzip_shard_is_a_shard_error_not_a_hang(tmp_path):
    # (walk F8) a FIFO shard hung embed (verify says "not a regular file"); (walk F17) a gzip tar under a
    # .tar name was read by embed while verify and reshard cannot read it: one rule across the stages.
    import gzip
    import io
    import tarfile

    from laiontools.stages.embed import ShardError, read_shard_samples

    fifo = tmp_path / "00000.tar"
    os.mkfifo(fifo)
    with pytest.raises(ShardError, match=r"shard .*00000\.tar is not a regular file"):
        read_shard_samples(str(fifo), None)
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tf:
        ti = tarfile.TarInfo("a.jpg")
        ti.size = 1
        tf.addfile(ti, io.BytesIO(b"x"))
    gz = tmp_path / "00001.tar"
    gz.write_bytes(gzip.compress(buf.getvalue()))
    with pytest.raises(ShardError, match=r"00001\.tar is a gzip-compressed tar; webdataset pool shards must be plain tars \(decompress it\)"):
        read_shard_samples(str(gz), None)


def test_load_image_refuses_an_image_over_the_pixel_limit_before_decoding():
    """A 100 Mpx PNG of a few KB was decoded whole after the download (walk F10); the header is
    checked against the download's --max-image-pixels default first, and _decode records it."""
    from PIL import Image

    from laiontools.core.images import ImageLimitError

    buf = io.BytesIO()
    Image.new("1", (10_000, 10_000)).save(buf, format="PNG")
    with pytest.raises(ImageLimitError, match="image of 10000x10000 = 100 Mpx is over the 89 Mpx limit"):
        embed_stage.load_image(buf.getvalue(), lambda im: im)

# ----------------------------------------------------------------------------------------------
# Found by a review of embed: a killed re-embed of a rewritten shard, a torchrun run refused by its ranks,
# a Spark resume whose precision cannot be known.


def _embedded_then_shard0_taken_down(tmp_path) -> tuple[str, str, dict[str, str]]:
    """A 2-shard pool embedded into <tmp>/e, then a copy of the pool whose shard 00000 lost its sample 2 (as a
    takedown rewrites it): (embeddings folder, new pool manifest, {"uid": the sample removed})."""
    pool = write_pool(str(tmp_path / "p"), n_shards=2, per_shard=4, image_size=64, realistic=False)
    out = str(tmp_path / "e")
    assert _run(pool, out) == 0
    removed = {}

    def edit(samples):
        removed["uid"] = json.loads(samples[2][1]["json"])["uid"]
        return samples[:2] + samples[3:]

    return out, _pool_with_shard0(pool, tmp_path, edit), removed


def _run_killed_in(monkeypatch, name: str, pool: str, out: str) -> None:
    """An embed run of `pool` into `out` killed (KeyboardInterrupt) when it calls embed's `name`."""
    def killed(*a, **k):
        raise KeyboardInterrupt

    monkeypatch.setattr(embed_stage, name, killed)
    with pytest.raises(KeyboardInterrupt):
        _run(pool, out)
    monkeypatch.undo()


def test_a_killed_reembed_of_a_rewritten_shard_leaves_no_stale_embeddings_that_readers_trust(tmp_path, monkeypatch):
    """Pool rewritten (takedown removed sample 2 of shard 00000); embed of the new pool into the same folder
    is killed before shard 00000 is written. The folder's model.json now names the new pool, and shard
    00000's OLD marker is still there: read_pool must not hand the old rows (the removed sample) to dedup."""
    out, pool2, removed = _embedded_then_shard0_taken_down(tmp_path)
    _run_killed_in(monkeypatch, "_write_shard", pool2, out)  # killed while embedding shard 00000
    try:
        info = read_pool(out)
    except MissingEmbeddingsError:
        return  # fine: the shard is reported as not embedded
    from laiontools.contracts.embeddings import read_embedding_shard

    assert info.manifest_path == pool2
    _, meta = read_embedding_shard(out, "00000")
    assert removed["uid"] not in meta.column("uid").to_pylist(), "taken-down sample still searchable"


def test_a_reembed_killed_before_it_checked_the_markers_leaves_no_manifest_sha_that_readers_trust(tmp_path, monkeypatch):
    """As above, killed earlier: after model.json was written for the new pool manifest and before the run
    dropped the old markers of the shards whose bytes changed (_todo). model.json recorded the new
    manifest's sha256 at once, so read_pool trusted the markers without reading them and handed the old
    rows of shard 00000 (the taken-down sample among them) to dedup. The sha is recorded only once the
    markers are checked: killed before, readers check every marker; the run's resume records it."""
    from laiontools.contracts.embeddings import read_embedding_shard
    from laiontools.contracts.manifest import manifest_sha256

    out, pool2, removed = _embedded_then_shard0_taken_down(tmp_path)
    _run_killed_in(monkeypatch, "_todo", pool2, out)  # after model.json was written, before any marker was checked
    try:
        info = read_pool(out)
    except MissingEmbeddingsError as e:
        assert "00000" in str(e)
    else:
        _, meta = read_embedding_shard(out, "00000")
        assert info.manifest_path != pool2 or removed["uid"] not in meta.column("uid").to_pylist(), (
            "read_pool trusted shard 00000's old marker: the taken-down sample is still searchable")
    assert _run(pool2, out) == 0  # the same command again: shard 00000 embedded anew, the sha recorded
    assert load_model_json(out)["pool"]["manifest_sha256"] == manifest_sha256(pool2)
    _, meta = read_embedding_shard(out, "00000")
    assert removed["uid"] not in meta.column("uid").to_pylist() and len(meta) == 3


def test_a_torchrun_resume_with_another_model_is_refused_not_reported_from_the_old_report(tmp_path):
    """A finished folder, then `--engine torchrun --nproc 2` with another model into it: the ranks refuse
    (EmbedMismatchError), torchrun exits 1, and the launcher must not read the earlier run's report."""
    from laiontools.core.errors import UserError

    pool = write_pool(str(tmp_path / "p"), n_shards=2, per_shard=3, image_size=64, realistic=False)
    out = str(tmp_path / "e")
    assert _run(pool, out) == 0
    with pytest.raises(UserError) as e:
        res = embed_stage.run(EmbedConfig(manifest=pool, output=out, model="lt-small", batch_size=5, num_workers=0,
                                          engine="torchrun", nproc=2))
        pytest.fail(f"torchrun run with another model returned ok={res.ok}: {res.summary!r}")
    assert "lt-small" in str(e.value) or "launcher.log" in str(e.value)


def test_a_spark_resume_of_a_gpu_auto_folder_is_refused_not_mixed(tmp_path):
    """A folder embedded on a GPU with --precision auto records precision_used amp_bf16. A resume that
    does not know the precision it will use (used_precision=None; Spark's run passed that before its probe
    task resolved it) fell back to comparing the asked precisions, 'auto' == 'auto': the remaining shards
    were embedded in fp32. (The Spark run itself: test_a_spark_run_records_the_precision_its_tasks_used...)"""
    from laiontools.contracts.manifest import read_manifest
    from laiontools.models.embedder import Embedder
    from laiontools.stages.embed import pool_identity, prepare_output

    pool = write_pool(str(tmp_path / "p"), n_shards=1, per_shard=2, image_size=64, realistic=False)
    out = str(tmp_path / "e")
    assert _run(pool, out) == 0
    path = os.path.join(out, layout.EMB_MODEL_JSON)
    with open(path) as f:
        doc = json.load(f)
    doc["precision_used"] = "amp_bf16"  # what the same run records on a GPU (resolve_precision('auto', 'cuda'))
    with open(path, "w") as f:
        json.dump(doc, f)
    cfg = EmbedConfig(manifest=pool, output=out, model=MODEL, engine="spark")
    info = Embedder(MODEL, None, "cpu").info
    with pytest.raises(EmbedMismatchError):
        prepare_output(cfg, info, pool_identity(pool, read_manifest(pool)), None)  # precision not known


# ---------------------------------------------------------------------------------------------
# Found by a review of the embeddings readers: a pool shard rewritten after embed read as embedded.


def test_a_pool_shard_rewritten_after_embed_is_not_read_as_embedded(tmp_path):
    """The pool's shard 00000 is downloaded again after embed ran (a damaged shard deleted and re-fetched: a
    sample that failed before now succeeds), and the manifest is rebuilt in place with the shard's new sha256.
    Embed was not re-run. read_pool (dedup, semdedup, dedup calibrate) must not hand the old shard's rows
    over as the pool's: the new sample has no embedding row, so dedup would never search it (a copy of an
    evaluation image left in, silently), and --phash would join the new tar's keys to the old rows' uids."""
    from laiontools.contracts.embeddings import read_embedding_shard

    pool = write_pool(str(tmp_path / "p"), n_shards=2, per_shard=4, image_size=64, realistic=False)
    out = str(tmp_path / "e")
    assert _run(pool, out) == 0
    new = {}

    def edit(samples):
        _, parts = samples[0]
        meta = json.loads(parts["json"])
        meta["uid"] = new["uid"] = "f" * 32
        return samples + [("00000009", {**parts, "json": json.dumps(meta).encode()})]

    _rewrite_shard0_in_place(pool, edit)
    try:
        info = read_pool(out)
    except MissingEmbeddingsError as e:
        assert "00000" in str(e)
        return
    assert "00000" in info.shard_ids
    _, meta = read_embedding_shard(out, "00000")
    assert new["uid"] in meta.column("uid").to_pylist(), (
        "read_pool accepted shard 00000 as embedded, but its rows are of the shard's old bytes: the pool's "
        f"sample {new['uid']} has no embedding row and would never be searched")


# ---------------------------------------------------------------------------------------------
# Found by a review of embed and the models layer: a thin strip of an image blown up by open_clip's Resize.


def test_a_thin_strip_image_is_a_failed_row_not_a_resize_to_gigabytes(tmp_path):
    """A 1 x 22,000 PNG (22 Kpx, under the header's 89 Mpx limit, a few hundred bytes) is resized by open_clip's
    eval transform short side -> 64 (lt-tiny), i.e. to 64 x 1,408,000 = 90 Mpx before the center crop
    (224 models: 224 x 4.9M for the same strip; a 1 x 1,000,000 strip: 12 GB at 64, 150 GB at 224, in one
    decode worker, killed, and the run with it on every resume). It must be a failed row with the reason,
    the shard's other rows as open_clip embeds their images alone."""
    from PIL import Image

    pool = write_pool(str(tmp_path / "p"), n_shards=1, per_shard=4, image_size=64, realistic=False)
    strip = io.BytesIO()
    Image.new("RGB", (1, 22_000), (200, 30, 30)).save(strip, format="PNG")

    def edit(samples):
        samples[1][1]["jpg"] = strip.getvalue()
        return samples

    pool2 = _pool_with_shard0(pool, tmp_path, edit)
    out = str(tmp_path / "e")
    assert _run(pool2, out) == 0
    [(_, img, _, meta)] = list(read_embeddings(out))
    assert meta["embed_status"].tolist() == [STATUS_OK, STATUS_FAILED_DECODE, STATUS_OK, STATUS_OK]
    assert "1x22000" in meta["embed_error"][1] and "aspect ratio 22000:1" in meta["embed_error"][1]
    assert not img[1].any() and pd.isna(meta["clip_score"][1])
    samples = _tar_samples(pool2)["00000"]
    ref = Embedder(MODEL, None, "cpu", 8, "fp32").embed_images(
        [Image.open(io.BytesIO(samples[i][1]["jpg"])) for i in (0, 2, 3)])
    np.testing.assert_allclose(img[[0, 2, 3]], ref, atol=2e-3)


def test_a_spark_run_from_a_checkpoint_is_reopened_by_dedup_as_a_local_run_is(spark, tmp_path):
    """model.json of a Spark run from a checkpoint path lacked the checkpoint_path a local run records, so
    embedder_for (dedup, dedup calibrate without --pretrained) built a random-init model and refused the
    folder as 'embeddings of another model ... delete that one to re-embed'."""
    import open_clip
    import torch
    from PIL import Image

    from laiontools.models.registry import register_tiny_models

    register_tiny_models()
    torch.manual_seed(7)  # weights of this test's own, not the shipped random init
    ckpt = str(tmp_path / "ckpt.pt")
    torch.save(open_clip.create_model(MODEL).state_dict(), ckpt)
    pool = write_pool(str(tmp_path / "p"), n_shards=1, per_shard=3, image_size=64, realistic=False)
    out = str(tmp_path / "spark")
    res = embed_stage.run(EmbedConfig(manifest=pool, output=out, model=MODEL, pretrained=ckpt, batch_size=5,
                                      num_workers=0, engine="spark"), spark=spark)
    assert res.ok
    emb = embedder_for(out, device="cpu", precision="fp32")
    [(_, img, _, _)] = list(read_embeddings(out))
    samples = _tar_samples(pool)["00000"]
    got = emb.embed_images([Image.open(io.BytesIO(parts["jpg"])) for _, parts in samples])
    np.testing.assert_allclose(got, img, atol=2e-3)
    random_init = Embedder(MODEL, None, "cpu", 8, "fp32").embed_images([Image.open(io.BytesIO(samples[0][1]["jpg"]))])
    assert np.abs(random_init[0] - img[0]).max() > 0.05  # the folder's vectors are the checkpoint's


def test_a_relative_manifest_path_is_found_by_readers_run_from_elsewhere(tmp_path, monkeypatch):
    """`laiontools embed --manifest pool/pool.manifest.json --output emb` recorded the path as typed; read_pool
    (dedup, semdedup, dedup calibrate) looked it up under the embeddings folder or the reader's own working
    directory: 'manifest <emb>/pool/pool.manifest.json does not exist' from anywhere but the embed's cwd."""
    work, elsewhere = tmp_path / "work", tmp_path / "elsewhere"
    elsewhere.mkdir()
    pool = write_pool(str(work / "pool"), n_shards=2, per_shard=2, image_size=64, realistic=False)
    monkeypatch.chdir(work)
    assert _run(os.path.join("pool", layout.POOL_MANIFEST), "emb") == 0
    monkeypatch.chdir(elsewhere)
    info = read_pool(str(work / "emb"))
    assert os.path.samefile(info.manifest_path, pool)
    assert info.shard_ids == ["00000", "00001"]
    assert {k: os.path.realpath(v) for k, v in info.tar_by_shard.items()} == {
        f"0000{i}": os.path.realpath(str(work / "pool" / "shards" / f"0000{i}.tar")) for i in (0, 1)}


def test_the_resume_check_reads_the_shard_markers_concurrently(tmp_path, monkeypatch):
    """embed's resume check read each shard's marker in turn (an exists, then the read), as did its report
    and dedup's and semdedup's summaries: ~230k shards of a 2B pool are 460k-690k round trips one after
    another, hours against an object store. They are now read several at once; same answer."""
    import threading
    import time
    import types

    import fsspec
    from fsspec.implementations.local import LocalFileSystem

    from laiontools.stages import embed as embed_stage

    state = {"now": 0, "most": 0}
    lock = threading.Lock()

    class SlowFS(LocalFileSystem):  # a store: each request takes a while
        protocol = ("lt-slow-test",)

        @classmethod
        def _strip_protocol(cls, path):
            return super()._strip_protocol(path.split("://", 1)[-1] if path.startswith("lt-slow-test://") else path)

        def _open(self, *a, **k):
            with lock:
                state["now"] += 1
                state["most"] = max(state["most"], state["now"])
            time.sleep(0.02)
            with lock:
                state["now"] -= 1
            return super()._open(*a, **k)

    fsspec.register_implementation("lt-slow-test", SlowFS, clobber=True)
    meta = tmp_path / layout.EMB_META_DIR
    meta.mkdir()
    for i in range(0, 16, 2):  # every other shard done, for these shard bytes or others
        (meta / f"{i:05d}.parquet.done").write_text(json.dumps({"shard_sha256": "other" if i % 4 else "x"}))
    tasks = [{"id": f"{i:05d}", "sha256": "x"} for i in range(16)]
    cfg = types.SimpleNamespace(output="lt-slow-test://" + str(tmp_path))
    monkeypatch.setattr(embed_stage, "_changed_file", lambda out, sid, marker, sizes: None)  # files unchanged
    todo, skipped = embed_stage._todo(cfg, tasks)
    assert skipped == ["00000", "00004", "00008", "00012"]
    assert [t["id"] for t in todo] == [f"{i:05d}" for i in range(16) if i % 4]
    assert state["most"] > 1


def test_read_pool_and_load_pool_read_the_pool_manifest_once(tmp_path, monkeypatch):
    """read_pool (dedup, semdedup, calibrate) read the pool manifest to check it, then again to hash it
    against model.json's record; load_pool (every stage after download) read it, then hashed it again.
    On an object store each read is a round trip: now one read each, the same manifest and sha256."""
    from fsspec.implementations import local

    from laiontools.contracts.manifest import manifest_sha256
    from laiontools.contracts.pool import load_pool

    pool = write_pool(str(tmp_path / "p"), n_shards=1, per_shard=2, image_size=64, realistic=False)
    out = str(tmp_path / "e")
    assert _run(pool, out) == 0
    opened = []
    real_open = local.LocalFileSystem._open

    def counting_open(self, path, *a, **k):  # the real local file system, its opens of the manifest counted
        if os.path.basename(str(path)) == layout.POOL_MANIFEST:
            opened.append(path)
        return real_open(self, path, *a, **k)

    monkeypatch.setattr(local.LocalFileSystem, "_open", counting_open)
    info = read_pool(out)
    assert len(opened) == 1, opened
    assert info.manifest_path and os.path.samefile(info.manifest_path, pool) and info.shard_ids == ["00000"]
    opened.clear()
    os.makedirs(os.path.join(os.path.dirname(pool), layout.CATALOG_DIR), exist_ok=True)  # load_pool asks that it exists
    p = load_pool(pool)
    assert len(opened) == 1, opened
    monkeypatch.setattr(local.LocalFileSystem, "_open", real_open)
    assert p.sha256 == manifest_sha256(pool)


# ---------------------------------------------------------------------------------------------
# Found by a review of embed's Spark path: --device cpu under GPU scheduling, GPU addresses, the precision
# Spark tasks used.


@pytest.mark.parametrize(("asked", "addresses", "cvd", "visible", "want"), [
    # --device cpu is the CPU, whatever Spark assigned
    ("cpu", ["3"], None, 8, "cpu"),
    ("cpu", [], None, 0, "cpu"),
    # no GPU scheduling: the CPU unless a GPU was asked for
    (None, [], None, 8, "cpu"),
    ("cuda", [], None, 8, "cuda"),
    ("cuda:1", [], None, 8, "cuda:1"),
    # the assigned GPU, as torch numbers it
    (None, ["3"], None, 8, "cuda:3"),  # nothing hidden: the address is torch's ordinal
    ("cuda", ["3"], None, 8, "cuda:3"),
    (None, ["3"], "2,3", 2, "cuda:1"),  # the executor sees GPUs 2 and 3 as cuda:0, cuda:1
    (None, ["3"], " 6, 3 ", 2, "cuda:1"),
    (None, ["GPU-5e1f"], "GPU-aa01,GPU-5e1f", 2, "cuda:1"),  # discovery reporting UUIDs, as CUDA_VISIBLE_DEVICES lists them
    (None, ["3"], "3", 1, "cuda:0"),
    (None, ["3"], None, 1, "cuda:0"),  # a container given its own GPU only (host index 3)
    (None, ["3"], "7", 1, "cuda:0"),  # ... whatever CUDA_VISIBLE_DEVICES says there
    (None, ["1", "2"], None, 4, "cuda:1"),  # two GPUs a task: the first
    # the clear errors
    (None, ["3"], "0,1", 2, "CUDA_VISIBLE_DEVICES=0,1 does not list it and torch sees 2 GPU"),
    (None, ["3"], None, 2, r"CUDA_VISIBLE_DEVICES=\(unset\) does not list it and torch sees 2 GPU"),
    (None, ["3"], None, 0, "torch sees 0 GPU"),
    (None, ["3"], "", 0, "torch sees 0 GPU"),
    ("cuda:0", ["3"], None, 8, "--device cuda:0 with Spark GPU scheduling: Spark gave this task GPU '3'"),
])
def test_a_spark_task_device_is_the_gpu_spark_assigned_as_torch_numbers_it(asked, addresses, cvd, visible, want):
    """A Spark task took the GPU Spark assigned even under --device cpu, and addressed it as
    cuda:<Spark's address>: wrong where CUDA_VISIBLE_DEVICES renumbers the executor's GPUs."""
    from laiontools.core.config import ConfigError
    from laiontools.stages.embed import spark_task_device

    if want.startswith(("cpu", "cuda")) and " " not in want:
        assert spark_task_device(asked, addresses, cvd, visible) == want
    else:
        with pytest.raises(ConfigError, match=want):
            spark_task_device(asked, addresses, cvd, visible)


_GPU_CLUSTER = r"""
import json, sys
from laiontools.core.spark import spark_session
from laiontools.stages import embed

pool, out, script = sys.argv[1:4]
conf = {"spark.task.resource.gpu.amount": "1", "spark.executor.resource.gpu.amount": "1",
        "spark.worker.resource.gpu.amount": "1", "spark.executor.resource.gpu.discoveryScript": script,
        "spark.worker.resource.gpu.discoveryScript": script, "spark.driver.memory": "1g"}
res = {}
# one worker with one core and one (discovered) GPU, as a GPU node; its executor is a process of its own
with spark_session("local-cluster[1,1,1024]", conf=conf) as s:
    res["assigned"] = s.sparkContext.parallelize([0], 1).map(
        lambda _: __import__("pyspark").TaskContext.get().resources()["gpu"].addresses).collect()[0]
    cfg = embed.EmbedConfig(manifest=pool, output=out, model="lt-tiny", batch_size=5, num_workers=0, engine="spark")
    try:
        embed.run(cfg)
        res["default"] = "ran"
    except Exception as e:
        res["default"] = f"{type(e).__name__}: {e}"
    r = embed.run(embed.EmbedConfig(**{**cfg.to_dict(), "device": "cpu"}))
    res["cpu"] = {"ok": r.ok, "embedded": r.details.shards_embedded}
print("RESULT " + json.dumps(res))
"""


@pytest.mark.slow
def test_spark_tasks_given_a_gpu_embed_on_the_cpu_under_device_cpu(tmp_path):
    """Spark GPU scheduling for real (a local-cluster whose worker's discovery script reports GPU 3, on this
    machine without one): `--device cpu` took the GPU Spark assigned (cuda:3: every task failed); it is the
    CPU in every task, and the folder equals a local CPU run's. Without --device, the address this executor
    cannot use is refused by the probe task before anything is written, naming it."""
    import subprocess
    import sys

    pool = write_pool(str(tmp_path / "p"), n_shards=2, per_shard=3, image_size=64, realistic=False)
    script = tmp_path / "gpus.sh"
    script.write_text('#!/bin/sh\necho \'{"name": "gpu", "addresses": ["3"]}\'\n')
    script.chmod(0o755)
    out = str(tmp_path / "spark")
    repo = str(Path(__file__).resolve().parents[1])
    env = {k: v for k, v in os.environ.items() if k != "CUDA_VISIBLE_DEVICES"}
    env["PYTHONPATH"] = os.pathsep.join([repo, env.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    proc = subprocess.run([sys.executable, "-c", _GPU_CLUSTER, pool, out, str(script)], check=False, env=env,
                          cwd=tmp_path, capture_output=True, text=True, timeout=600)
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")]
    assert proc.returncode == 0 and lines, proc.stderr[-3000:]
    res = json.loads(lines[-1][len("RESULT "):])
    assert res["assigned"] == ["3"]
    assert res["default"].startswith("ConfigError: embed on Spark: Spark gave this task GPU '3', which this "
                                     "executor cannot address"), res["default"]
    assert res["cpu"] == {"ok": True, "embedded": ["00000", "00001"]}
    local = str(tmp_path / "local")
    assert _run(pool, local, "--device", "cpu") == 0
    _assert_same_output(local, out)
    assert load_model_json(out)["precision_used"] == "fp32"


def test_a_spark_run_records_the_precision_its_tasks_used_and_a_resume_must_match_it(spark, tmp_path):
    """A Spark run with --precision auto recorded no precision_used (the driver did not know the tasks'
    device): a later local resume on a GPU (auto = amp_bf16) passed the check ('auto' == 'auto') and mixed
    amp_bf16 shards into a folder of fp32 ones. The probe task resolves it where the tasks run; model.json and
    each shard's marker record it; a resume on either engine that resolves another one is refused."""
    from laiontools.contracts.manifest import read_manifest
    from laiontools.stages.embed import pool_identity, prepare_output

    pool = write_pool(str(tmp_path / "p"), n_shards=2, per_shard=3, image_size=64, realistic=False)
    out = str(tmp_path / "e")
    model_json = os.path.join(out, layout.EMB_MODEL_JSON)
    done = os.path.join(out, layout.EMB_META_DIR, "00001.parquet.done")
    cfg = EmbedConfig(manifest=pool, output=out, model=MODEL, batch_size=5, num_workers=0, engine="spark")
    assert embed_stage.run(cfg, spark=spark).ok
    info = load_model_json(out)
    assert info["precision"] == "auto" and info["precision_used"] == "fp32"  # local[2]: tasks on the CPU
    with open(done) as f:
        assert json.load(f)["precision_used"] == "fp32"
    # a local resume that resolves the same precision agrees and embeds what is left
    os.remove(done)
    assert _run(pool, out, "--device", "cpu") == 0 and os.path.exists(done)
    # ... one on a GPU (what run() passes there: the Embedder's amp_bf16) is refused
    ident = pool_identity(pool, read_manifest(pool))
    local_cfg = dataclasses.replace(cfg, engine="local")
    with pytest.raises(EmbedMismatchError, match=r"precision: 'auto' \(= fp32\) there, 'auto' \(= amp_bf16\) now"):
        prepare_output(local_cfg, info, ident, "amp_bf16")
    # a folder a GPU run made (precision_used amp_bf16): a Spark resume whose tasks resolve fp32 is refused
    # before any shard is embedded, with the words a local run's refusal has
    with open(model_json) as f:
        doc = json.load(f)
    with open(model_json, "w") as f:
        json.dump({**doc, "precision_used": "amp_bf16"}, f)
    os.remove(done)
    with pytest.raises(EmbedMismatchError, match=r"precision: 'auto' \(= amp_bf16\) there, 'auto' \(= fp32\) now"):
        embed_stage.run(cfg, spark=spark)
    with pytest.raises(EmbedMismatchError, match=r"precision: 'auto' \(= amp_bf16\) there, 'auto' \(= fp32\) now"):
        _run(pool, out, "--device", "cpu")
    assert not os.path.exists(done)
    # a task whose executor resolves another precision than the folder's fails its shards, writing nothing
    [task] = [t for t in embed_stage._shard_tasks(pool, read_manifest(pool)) if t["id"] == "00001"]
    [st] = embed_stage._run_spark(cfg, [task], spark, "amp_bf16")
    assert st["id"] == "00001" and "resolves --precision auto to fp32 on cpu, but the folder's shards are amp_bf16" in st["error"]
    assert not os.path.exists(done)


def test_a_spark_resume_with_precision_auto_of_a_spark_folder_embeds_what_is_left(spark, tmp_path):
    """Kill then re-run the same `embed --engine spark` (--precision auto): the folder records what auto became
    (precision_used fp32) and the check made before the Spark session started compared it with 'auto' of a
    device not yet known, refusing every Spark resume ("device not known"). The re-run embeds the shard left."""
    pool = write_pool(str(tmp_path / "p"), n_shards=2, per_shard=3, image_size=64, realistic=False)
    out = str(tmp_path / "e")
    done = os.path.join(out, layout.EMB_META_DIR, "00001.parquet.done")
    cfg = EmbedConfig(manifest=pool, output=out, model=MODEL, batch_size=5, num_workers=0, engine="spark")
    assert embed_stage.run(cfg, spark=spark).ok
    assert load_model_json(out)["precision_used"] == "fp32"
    os.remove(done)  # what a run killed before this shard's marker leaves
    res = embed_stage.run(cfg, spark=spark)
    assert res.ok and res.counts["shards_embedded"] == 1 and os.path.exists(done)
    with open(done) as f:
        assert json.load(f)["precision_used"] == "fp32"


@pytest.mark.gpu
def test_a_local_gpu_resume_of_a_spark_cpu_folder_is_refused(spark, tmp_path):
    """The GPU half of the case above, for real: a Spark run on the CPU (fp32), then a local resume on a GPU
    with --precision auto (amp_bf16 / amp_fp16) is refused, and embeds nothing."""
    torch = pytest.importorskip("torch")
    if not torch.cuda.is_available():
        pytest.skip("needs CUDA")
    pool = write_pool(str(tmp_path / "p"), n_shards=2, per_shard=3, image_size=64, realistic=False)
    out = str(tmp_path / "e")
    done = os.path.join(out, layout.EMB_META_DIR, "00001.parquet.done")
    assert embed_stage.run(EmbedConfig(manifest=pool, output=out, model=MODEL, batch_size=5, num_workers=0,
                                       engine="spark", device="cpu"), spark=spark).ok
    os.remove(done)
    with pytest.raises(EmbedMismatchError, match=r"precision: 'auto' \(= fp32\) there, 'auto' \(= amp_(bf|fp)16\) now"):
        _run(pool, out, "--device", "cuda")
    assert not os.path.exists(done)


# ---------------------------------------------------------------------------------------------
# Found by a review of repeated reads (each a round trip on an object store).


def test_a_folder_recording_no_manifest_sha_has_its_markers_read_at_once_until_embed_records_it(tmp_path, monkeypatch, caplog):
    """An embeddings folder from before model.json recorded the pool manifest's sha256: read_pool (dedup,
    semdedup, calibrate) read every shard's completion marker one after another on every call (~230k round
    trips in turn at 2B). read_pool does not write into the folder (a reader: it may not own it, an embed run
    may be writing model.json); it reads the markers several at once and says that `embed` records the sha256,
    which embed's next run into the folder does (nothing embedded again); read_pool then reads no marker."""
    import logging
    import threading
    import time

    from fsspec.implementations import local

    from laiontools.contracts.manifest import manifest_sha256

    pool = write_pool(str(tmp_path / "p"), n_shards=6, per_shard=1, image_size=64, realistic=False)
    out = tmp_path / "e"
    assert _run(pool, str(out)) == 0
    model_json = out / layout.EMB_MODEL_JSON
    doc = json.loads(model_json.read_text())
    doc["pool"].pop("manifest_sha256")  # as an older embed wrote it
    model_json.write_text(json.dumps(doc))
    state = {"now": 0, "most": 0, "opened": 0}
    lock = threading.Lock()
    real_open = local.LocalFileSystem._open

    def slow_marker_open(self, path, *a, **k):  # a store: each marker read takes a while
        if str(path).endswith(".done"):
            with lock:
                state["now"] += 1
                state["opened"] += 1
                state["most"] = max(state["most"], state["now"])
            time.sleep(0.02)
            with lock:
                state["now"] -= 1
        return real_open(self, path, *a, **k)

    monkeypatch.setattr(local.LocalFileSystem, "_open", slow_marker_open)
    with caplog.at_level(logging.INFO, logger="laiontools.contracts.embeddings"):
        info = read_pool(str(out))
    assert info.shard_ids == [f"{i:05d}" for i in range(6)]
    assert state["opened"] == 6 and state["most"] > 1, state
    assert "records no pool manifest sha256" in caplog.text and "`laiontools embed`" in caplog.text
    assert json.loads(model_json.read_text()) == doc  # nothing written by the reader
    monkeypatch.setattr(local.LocalFileSystem, "_open", real_open)
    embedded = {p.name: p.read_bytes() for p in (out / layout.EMB_IMG_DIR).iterdir()}
    assert _run(pool, str(out)) == 0
    assert {p.name: p.read_bytes() for p in (out / layout.EMB_IMG_DIR).iterdir()} == embedded
    assert json.loads(model_json.read_text())["pool"]["manifest_sha256"] == manifest_sha256(pool)
    monkeypatch.setattr(local.LocalFileSystem, "_open", slow_marker_open)
    state["opened"] = 0
    assert read_pool(str(out)).shard_ids == info.shard_ids
    assert state["opened"] == 0


def test_an_embed_run_reads_the_pool_manifest_once(tmp_path, monkeypatch):
    """embed read the pool manifest to parse it, then again to hash it for model.json's record (a round trip
    each on an object store). Now once, parsed and hashed from the same bytes; the same sha256 recorded."""
    from fsspec.implementations import local

    from laiontools.contracts.manifest import manifest_sha256

    pool = write_pool(str(tmp_path / "p"), n_shards=1, per_shard=2, image_size=64, realistic=False)
    opened = []
    real_open = local.LocalFileSystem._open

    def counting_open(self, path, *a, **k):
        if os.path.basename(str(path)) == layout.POOL_MANIFEST:
            opened.append(path)
        return real_open(self, path, *a, **k)

    monkeypatch.setattr(local.LocalFileSystem, "_open", counting_open)
    assert _run(pool, str(tmp_path / "e")) == 0
    assert len(opened) == 1, opened
    monkeypatch.setattr(local.LocalFileSystem, "_open", real_open)
    assert load_model_json(str(tmp_path / "e"))["pool"]["manifest_sha256"] == manifest_sha256(pool)


def test_a_run_killed_while_it_writes_a_shard_leaves_no_unpaired_file_for_embedding_reader(small_pool, tmp_path):
    """clip-retrieval's embedding_reader (autofaiss reads with it) pairs a folder's .npy and .parquet files by
    their position and reads no marker. A run killed after writing a shard's image embeddings and before its
    metadata left an .npy without its .parquet, and every later shard's embeddings were paired with the
    metadata of the shard before. A shard's files are now renamed into place only once all four are written:
    killed in between, none of them is there; resumed, the folder reads whole and aligned."""
    import signal
    import subprocess
    import sys
    import time

    from embedding_reader import EmbeddingReader

    out = tmp_path / "emb"
    err = tmp_path / "stderr.txt"
    env = {**os.environ, "LAIONTOOLS_FAILPOINTS": "embed.shard-files=60"}  # paused while a shard's files are written
    with open(err, "wb") as ef:
        proc = subprocess.Popen([sys.executable, "-m", "laiontools.cli", "embed", "--manifest", small_pool, "--output", str(out),
                                 "--model", MODEL, "--batch-size", "5", "--num-workers", "0", "--engine", "local"],
                                env=env, start_new_session=True, stdout=subprocess.DEVNULL, stderr=ef)
    try:
        deadline = time.monotonic() + 150
        while proc.poll() is None and time.monotonic() < deadline and "failpoint embed.shard-files" not in err.read_text(errors="replace"):
            time.sleep(0.05)
        assert proc.poll() is None, err.read_text()[-2000:]
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=10)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(timeout=10)
    npy = sorted(p.stem for p in (out / layout.EMB_IMG_DIR).glob("*.npy"))
    meta = sorted(p.stem for p in (out / layout.EMB_META_DIR).glob("*.parquet"))
    assert npy == meta, (npy, meta)  # what embedding_reader zips: the same shards on both sides
    assert _run(small_pool, str(out)) == 0  # resumed
    reader = EmbeddingReader(str(out / layout.EMB_IMG_DIR), file_format="parquet_npy",
                             metadata_folder=str(out / layout.EMB_META_DIR), meta_columns=["uid", "key"])
    keys = [k for _, m in reader(batch_size=100, show_progress=False) for k in m["key"]]
    assert reader.count == 24 and keys == sorted(keys) and len(set(keys)) == 24


# --------------------------------------------------------------------------------------------------
# Each shard fetched and sha256-checked once per process, whatever the number of decode workers


def _shard_file_hashes(out: str) -> dict[str, str]:
    """{relative path: sha256} of the shard data files (vectors, meta, scores; not the markers, which
    record timings, nor model.json, which records the manifest's path)."""
    import hashlib

    got = {}
    for d in (layout.EMB_IMG_DIR, layout.EMB_TEXT_DIR, layout.EMB_META_DIR, layout.EMB_SCORES_DIR):
        for name in sorted(os.listdir(os.path.join(out, d))):
            if name.endswith((".npy", ".parquet")):
                with open(os.path.join(out, d, name), "rb") as f:
                    got[f"{d}/{name}"] = hashlib.sha256(f.read()).hexdigest()
    return got


def _spool_dirs(tmp: Path) -> list[str]:
    return sorted(p.name for p in tmp.iterdir() if p.name.startswith("laiontools-embed-spool-"))


def test_decode_workers_fetch_and_hash_each_s3_shard_once(small_pool, s3, s3_server, tmp_path, monkeypatch):
    """With W decode workers every worker read and sha256-hashed every shard (W times the GETs and bytes
    on an object store, and the hashing): now the main process stages each shard once and the workers
    read its verified local copy. Counted where the bytes leave the S3 server (its GETs and body bytes)
    and where shard bytes are hashed (in every process: the workers are forked); the output is the same
    bytes as the in-process run's (workers=0, which reads each shard itself, as before)."""
    import hashlib
    import uuid

    from laiontools.contracts.manifest import read_manifest

    monkeypatch.delenv("LAIONTOOLS_SPARK_MASTER", raising=False)
    bucket = f"lt-{uuid.uuid4().hex[:10]}"
    s3.mkdir(bucket)
    s3.put(os.path.dirname(small_pool) + "/", f"{bucket}/pool", recursive=True)
    s3.invalidate_cache()
    manifest = f"s3://{bucket}/pool/{os.path.basename(small_pool)}"
    shards = read_manifest(small_pool)["shards"]
    shas = {s["sha256"] for s in shards}
    total = sum(os.path.getsize(os.path.join(os.path.dirname(small_pool), s["path"])) for s in shards)

    hashed = tmp_path / "hashed.log"
    real_sha256 = hashlib.sha256

    class spy_sha256:  # stands in for hashlib.sha256: the real hash; a line for each hash of a whole shard's bytes
        def __init__(self, data=b"", **kw) -> None:
            self._h = real_sha256(data, **kw)

        def __getattr__(self, name):  # update, digest, copy, ...
            return getattr(self._h, name)

        def hexdigest(self) -> str:  # (streamed hashes are read once they are whole)
            d = self._h.hexdigest()
            if d in shas:
                with open(hashed, "a") as f:
                    f.write(f"{os.getpid()} {d}\n")
            return d

    monkeypatch.setattr(hashlib, "sha256", spy_sha256)
    s3_server.watch(f"/{bucket}/pool/shards/")
    out2 = str(tmp_path / "w2")
    res = embed_stage.run(EmbedConfig(manifest=manifest, output=out2, model=MODEL, batch_size=5, num_workers=2,
                                      device="cpu")).details
    gets, got_bytes = s3_server.gets, s3_server.bytes
    monkeypatch.setattr(hashlib, "sha256", real_sha256)
    assert res.ok and res.shards_embedded == ["00000", "00001", "00002"], res
    assert got_bytes == total, f"the shards' bytes crossed the wire {got_bytes / total:.2f} times"
    assert gets == len(shards), f"{gets} GETs for {len(shards)} shards"
    lines = hashed.read_text().split()
    assert sorted(lines[1::2]) == sorted(shas), f"shard hashes (pid, sha256): {lines}"

    out0 = str(tmp_path / "w0")
    assert _run(small_pool, out0, "--num-workers", "0") == 0
    assert _shard_file_hashes(out2) == _shard_file_hashes(out0)


def test_decode_workers_give_the_same_bytes_and_leave_no_spool(small_pool, tmp_path, monkeypatch, caplog):
    """The shard files are the same bytes with 0 and 2 decode workers (1 and 4 shards per batch slot
    layout alike), and the spool folder the workers read from is gone after the run, also after a run
    that fails (non-finite weights, raised in the main loop while the workers are busy)."""
    import torch

    from laiontools.models.registry import load_model

    tmp = tmp_path / "tmp"
    tmp.mkdir()
    # (the spool's folder only: tempfile's is also where torch makes the socket its workers share tensors
    # through, and a pytest path under xdist is too long for one: see the test below)
    monkeypatch.setattr(embed_stage, "SPOOL_PARENT", str(tmp))
    outs = {}
    for w in (0, 2):
        outs[w] = str(tmp_path / f"w{w}")
        with caplog.at_level("DEBUG", logger="laiontools.stages.embed"):
            assert _run(small_pool, outs[w], "--num-workers", str(w)) == 0
        assert _spool_dirs(tmp) == []
    assert _shard_file_hashes(outs[0]) == _shard_file_hashes(outs[2])
    staged = [r.getMessage() for r in caplog.records if "staging 3 shard(s) once in" in r.getMessage()]
    assert len(staged) == 1 and str(tmp) in staged[0], staged  # the workers=2 run used a spool, under tmp

    sd = load_model(MODEL).model.state_dict()
    sd["visual.proj"] = torch.full_like(sd["visual.proj"], float("nan"))
    ckpt = tmp_path / "nan.pt"
    torch.save(sd, ckpt)
    with pytest.raises(ModelError, match="non-finite"):
        _run(small_pool, str(tmp_path / "nan"), "--num-workers", "2", "--pretrained", str(ckpt))
    assert _spool_dirs(tmp) == []


def test_bad_shards_with_decode_workers_give_one_error_each_with_the_in_process_words(small_pool, tmp_path):
    """A missing shard and one whose sha256 is not the manifest's, with 2 decode workers reading the
    spool: exactly one stats entry each, {'id', 'error'} with the words read_shard_samples gives, and the
    other shard written as the in-process run writes it."""
    from laiontools.contracts.manifest import read_manifest
    from laiontools.stages.embed import ShardError, _embed_tasks, _shard_tasks

    _, manifest = _pool_with_two_bad_shards(small_pool, tmp_path)
    tasks = _shard_tasks(manifest, read_manifest(manifest))
    want = {}
    for t in tasks:
        try:
            read_shard_samples(t["url"], t["sha256"])
        except ShardError as e:
            want[t["id"]] = str(e)
    assert sorted(want) == ["00000", "00002"]
    emb = Embedder(MODEL, None, "cpu", 5, "auto")
    outs = {}
    for w in (2, 0):
        outs[w] = str(tmp_path / f"w{w}")
        os.makedirs(outs[w])
        stats = _embed_tasks(tasks, emb, EmbedConfig(manifest=manifest, output=outs[w], model=MODEL, batch_size=5,
                                                     num_workers=w))
        errors = [s for s in stats if "error" in s]
        assert sorted(errors, key=lambda s: s["id"]) == [{"id": k, "error": v} for k, v in sorted(want.items())], w
        assert [s["id"] for s in stats if "error" not in s] == ["00001"]
    assert [s for s, *_ in read_embeddings(outs[2])] == ["00001"]
    assert _shard_file_hashes(outs[2]) == _shard_file_hashes(outs[0])


def test_a_decode_worker_never_waits_forever_for_a_shard(tmp_path):
    """A worker waiting for a shard the stager will not stage (it stopped, the run ended, or nothing came
    in time) raises an error naming the shard instead of waiting."""
    from laiontools.stages.embed import ShardError, spooled_shard_samples

    spool = tmp_path / "spool"
    spool.mkdir()
    task = {"id": "00007", "url": "s3://b/pool/shards/00007.tar"}
    with pytest.raises(RuntimeError, match=r"shard s3://b/pool/shards/00007\.tar was not staged in 0s"):
        spooled_shard_samples(str(spool), 0, task, 0, wait_s=0)
    (spool / "FATAL").write_text("ConnectionError: the store went away")
    with pytest.raises(RuntimeError, match=r"00007\.tar was not staged: the shard stager stopped \(ConnectionError"):
        spooled_shard_samples(str(spool), 0, task, 0)
    with pytest.raises(RuntimeError, match=r"00007\.tar was not staged: the spool folder .* is gone"):
        spooled_shard_samples(str(tmp_path / "gone"), 0, task, 0)
    (spool / "000000.error").write_text("shard s3://b/pool/shards/00007.tar is missing; re-run download")
    with pytest.raises(ShardError, match="^shard s3://b/pool/shards/00007.tar is missing; re-run download$"):
        spooled_shard_samples(str(spool), 0, task, 1)
    assert (spool / "000000.read.1").exists()  # the stager may now drop it (once every worker has it)


def test_a_loader_that_loses_batches_fails_those_shards_instead_of_exiting_0(small_pool, tmp_path, monkeypatch):
    """torch's DataLoader workers send batches through a socket made in tempfile's folder; where that path is
    too long for a socket (a long $TMPDIR; a pytest folder under xdist), each worker's queue drops every batch
    it cannot send, says so on stderr only, and the loader ends as if done. embed then reported 0 shards
    embedded, 0 failed, and exited 0, with nothing written. Each shard without its batches is now a failed shard
    naming the cause, and the CLI exits 1."""
    import tempfile

    long_tmp = tmp_path / ("t" * 120)
    long_tmp.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(long_tmp))  # what $TMPDIR sets
    out = str(tmp_path / "emb")
    res = embed_stage.run(EmbedConfig(manifest=small_pool, output=out, model=MODEL, batch_size=5, num_workers=2)).details
    assert not res.ok and res.shards_embedded == []
    assert set(res.failed_shards) == {"00000", "00001", "00002"}
    assert all("the data loader ended with 0 of this shard's batches" in e for e in res.failed_shards.values())
    assert _run(small_pool, out, "--num-workers", "2") == 1


def test_the_spool_folder_of_a_killed_run_is_removed_by_the_next_one(tmp_path, monkeypatch):
    """A run killed without its finally (SIGTERM from die_with_parent or a scheduler, SIGKILL, a cancelled
    Spark task) left its spool folder, with up to SPOOL_AHEAD whole shards, in the temp folder for good: every
    killed run (each rank, each task) added its own. The next spool there removes it; a live one's it leaves."""
    import signal
    import subprocess
    import sys
    import time

    from laiontools.stages.embed import ShardSpool

    tmp = tmp_path / "tmp"
    tmp.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(tmp))
    code = ("import sys, tempfile, time; tempfile.tempdir = sys.argv[1]\n"
            "from laiontools.stages.embed import ShardSpool\n"
            "s = ShardSpool([{'url': 'x.tar', 'sha256': None}], False, 2)\n"
            "open(s.dir + '/000000.tar', 'wb').write(b'x' * 1000)\n"
            "print(s.dir, flush=True); time.sleep(120)\n")
    proc = subprocess.Popen([sys.executable, "-c", code, str(tmp)], stdout=subprocess.PIPE, text=True)
    dead = proc.stdout.readline().strip()
    proc.send_signal(signal.SIGTERM)
    proc.wait(timeout=30)
    assert os.path.isdir(dead)  # what the killed run left
    live = ShardSpool([{"url": "y.tar", "sha256": None}], False, 1)
    try:
        assert os.path.isdir(dead)  # just left: not judged yet (a spool being set up looks the same)
        old = time.time() - 3600
        os.utime(dead, (old, old))
        os.utime(live.dir, (old, old))
        again = ShardSpool([{"url": "z.tar", "sha256": None}], False, 1)
        again.close()
        assert not os.path.exists(dead)
        assert os.path.isdir(live.dir)  # its lock is held: a live spool is never removed
    finally:
        live.close()
    assert _spool_dirs(tmp) == []


def test_a_manifest_without_shards_is_refused_not_embedded_as_nothing(tmp_path, capsys):
    """A subset's manifest (uids, no shards) given to embed was "0 shard(s) embedded", exit 0, and an empty
    embeddings folder: a user who meant to embed the subset got nothing and no word why. Now exit 2, before the
    output is made, naming the pool to embed (or the reshard to do first); a pool that lists no shard, the same."""
    import sys

    from laiontools.cli import main as cli_main
    from laiontools.stages import subsets as subsets_stage
    from laiontools.stages.subsets import SubsetsConfig

    sys.path.insert(0, os.path.dirname(__file__))
    from test_subsets import make_scratch_pool

    pool = make_scratch_pool(str(tmp_path / "pool"), n=30, per_shard=10, failures=0, tag="ns")
    sub = subsets_stage.run(SubsetsConfig(pool=pool, output=str(tmp_path / "sub"), scales="12", seed=1)).details[0]["manifest"]
    out = tmp_path / "emb"
    assert cli_main(["embed", "--manifest", sub, "--output", str(out), "--model", "lt-tiny", "--device", "cpu"]) == 2
    err = capsys.readouterr().err
    assert f"{sub} is a subset's manifest: it names 12 samples by uid and lists no shards; embed the pool ({pool})" in err, err[-2000:]
    assert not out.exists()
    with open(pool) as f:
        empty = {**json.load(f), "shards": []}
    Path(tmp_path / "empty.manifest.json").write_text(json.dumps(empty))
    with pytest.raises(ManifestError, match="lists no shards: nothing to embed"):
        embed_stage.run(EmbedConfig(manifest=str(tmp_path / "empty.manifest.json"), output=str(out), model="lt-tiny", device="cpu"))


def test_an_empty_resharded_subset_is_refused_naming_what_it_is(tmp_path, capsys):
    """(second reader) A resharded subset of 0 samples lists no shards: the refusal must not call the subset
    it was resharded from "the pool", nor advise to reshard what was resharded."""
    import sys

    from laiontools.cli import main as cli_main
    from laiontools.stages import reshard as reshard_stage
    from laiontools.stages import subsets as subsets_stage
    from laiontools.stages.reshard import ReshardConfig
    from laiontools.stages.subsets import SubsetsConfig

    sys.path.insert(0, os.path.dirname(__file__))
    from test_subsets import make_scratch_pool

    pool = make_scratch_pool(str(tmp_path / "pool"), n=30, per_shard=10, failures=0, tag="ns")
    sub = subsets_stage.run(SubsetsConfig(pool=pool, output=str(tmp_path / "sub"), scales="12", seed=1, min_caption_length=100_000,
                                          allow_short=True)).details[0]["manifest"]
    resharded = reshard_stage.run(ReshardConfig(manifest=sub, output=str(tmp_path / "r"), shard_size=5)).details["manifest"]
    assert cli_main(["embed", "--manifest", resharded, "--output", str(tmp_path / "emb"), "--model", "lt-tiny", "--device", "cpu"]) == 2
    err = capsys.readouterr().err
    assert f"{resharded} is a resharded subset of 0 samples and lists no shards: nothing to embed" in err, err[-2000:]
    assert f"embed the pool ({sub})" not in err


def test_shards_a_task_wrote_where_the_driver_does_not_see_are_failures_not_embedded(small_pool, tmp_path, monkeypatch):
    """On a cluster whose executors write the output path on their own disks (not a shared file system), every
    task reported its shard embedded, the folder the driver reads held none, and embed exited 0 ("folder: 0/1
    shards"; a new user's cluster run). Simulated here by taking one shard's files away before the driver reads
    the markers: that shard is failed, naming why, and the run is not ok (exit 1); a re-run embeds it."""
    out = tmp_path / "emb"
    finish = embed_stage._finish

    def elsewhere(cfg, tasks, stats, skipped, seconds, rank):
        for d in (layout.EMB_META_DIR, layout.EMB_IMG_DIR, layout.EMB_TEXT_DIR):
            for f in (out / d).glob("00001.*"):
                f.unlink()
        return finish(cfg, tasks, stats, skipped, seconds, rank)

    monkeypatch.setattr(embed_stage, "_finish", elsewhere)
    monkeypatch.setattr("laiontools.core.storage.VISIBILITY_WAIT_S", 0.0)  # (on a shared file system it looks again for a while)
    res = embed_stage.run(EmbedConfig(manifest=small_pool, output=str(out), model=MODEL, batch_size=5, num_workers=0))
    assert not res.ok and res.details.shards_embedded == ["00000", "00002"]
    assert "not in " + str(out) + " as this process sees it" in res.details.failed_shards["00001"]
    assert "folder: 2/3 shards" in res.summary
    assert res.details.rows == 2 * 8  # this run's rows: those of the two shards it embedded (a corrupt sample keeps its row)
    monkeypatch.undo()
    again = embed_stage.run(EmbedConfig(manifest=small_pool, output=str(out), model=MODEL, batch_size=5, num_workers=0))
    assert again.ok and again.details.shards_embedded == ["00001"]


def _tar_bytes(members: list[tuple[str, bytes]]) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as tf:
        for name, data in members:
            ti = tarfile.TarInfo(name)
            ti.size, ti.mtime = len(data), 1_700_000_000
            tf.addfile(ti, io.BytesIO(data))
    return buf.getvalue()


def test_a_spooled_shard_gives_the_samples_parse_shard_gives(tmp_path):
    """A decode worker indexes a spooled shard from its headers and reads a slice's members only. Its
    samples are parse_shard's, slice for slice, on a tar where a key's members are apart, one is
    hidden, one extension is repeated (the last kept) and one name is upper-case; they still read after
    the stager drops the file; a member over the byte limit is the same stand-in; a damaged tar gets
    parse_shard's words."""
    from laiontools.core.images import OversizeMember
    from laiontools.stages.embed import IndexedShard, ShardError, parse_shard, spooled_shard_samples
    from laiontools.wds.samples import iter_samples, read_parts, sample_index

    members = [("a.jpg", b"A1"), ("b.JPG", b"B1"), ("a.json", b'{"uid": 1}'), ("._a.jpg", b"fork"),
               ("b.txt", b"bee"), ("a.jpg", b"A2"), ("c.txt", b"see"), ("sub/d.png", b"D" * 700)]
    data = _tar_bytes(members)
    url = "s3://b/pool/shards/00003.tar"
    want = parse_shard(url, data)
    assert [k for k, _ in want] == ["a", "b", "c", "sub/d"] and want[0][1]["jpg"] == b"A2"  # the test's premise
    spool = tmp_path / "spool"
    spool.mkdir()
    (spool / "000000.tar").write_bytes(data)
    shard = spooled_shard_samples(str(spool), 0, {"id": "00003", "url": url}, 0)
    try:
        assert isinstance(shard, IndexedShard) and len(shard) == len(want)
        assert (spool / "000000.read.0").exists()
        (spool / "000000.tar").unlink()  # the stager drops it once every worker has it open
        assert shard[0:4] == want and shard[1:3] == want[1:3] and shard[3:10] == want[3:]
    finally:
        shard.close()
    # over the byte limit: the stand-in iter_samples gives, hashed as read, never held
    with open(tmp_path / "x.tar", "wb") as f:
        f.write(data)
    with open(tmp_path / "x.tar", "rb") as f:
        index = sample_index(f, len(data), adjacent=False, on_duplicate="last")
        got = read_parts(f, index[3][1], max_member_bytes=500)
    ref = dict(iter_samples(data, max_member_bytes=500, adjacent=False, on_duplicate="last"))["sub/d"]
    assert isinstance(got["png"], OversizeMember) and isinstance(ref["png"], OversizeMember)
    assert (got["png"].reason, got["png"].sha256) == (ref["png"].reason, ref["png"].sha256) != (ref["png"].reason, None)
    # damaged: a header overwritten (the second member's), and a tar cut inside a member
    for bad in (data[:1024] + b"\x07" * 512 + data[1536:], data[:1200]):
        with pytest.raises(ShardError) as e_parse:
            parse_shard(url, bad)
        (spool / "000001.tar").write_bytes(bad)
        with pytest.raises(ShardError) as e_spool:
            spooled_shard_samples(str(spool), 1, {"id": "00003", "url": url}, 0)
        assert str(e_spool.value) == str(e_parse.value)


# In a fresh process: a decode worker's pass over its slots (worker 0 of 4, batches of 32) of a spooled shard;
# the peak of its resident memory above what it held before, in bytes. argv: spool folder.
_WORKER_PASS_PEAK = """
import sys
from laiontools.stages.embed import spooled_shard_samples
from laiontools.testing import procs
import laiontools.wds.samples  # what it imports is loaded once a process, not held a shard

before = procs.reset_peak()
shard = spooled_shard_samples(sys.argv[1], 0, {"id": "00000", "url": "s3://b/00000.tar"}, 0)
n = 0
for b in range(0, -(-len(shard) // 32), 4):
    n += sum(len(p["jpg"]) for _, p in shard[b * 32 : (b + 1) * 32])
shard.close()
print(n, procs.peak_above(before))
"""


def test_a_decode_worker_holds_a_batch_not_the_shard(tmp_path):
    """Each decode worker read every spooled shard whole and parsed it into a copy of every payload, ~2-3x the
    shard in every worker (BENCHMARKS "Executor memory and shuffle bytes per stage"). It now holds the index
    and one batch: measured in a fresh process, its peak over a 48 MB shard is a small part of the shard."""
    import subprocess
    import sys

    rng = np.random.default_rng(0)
    members = []
    for i in range(1500):
        members += [(f"{i:06d}.jpg", rng.bytes(32 * 1024)), (f"{i:06d}.txt", b"caption")]
    data = _tar_bytes(members)
    (tmp_path / "000000.tar").write_bytes(data)
    out = subprocess.run([sys.executable, "-c", _WORKER_PASS_PEAK, str(tmp_path)], capture_output=True, text=True,
                         check=True, env={**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)})
    n, peak = map(int, out.stdout.split())
    assert n == 32 * 1024 * sum(min(32, 1500 - b * 32) for b in range(0, 47, 4))  # worker 0's slots, read
    assert peak < 0.2 * len(data), (peak, len(data))  # was > 2x


def test_the_spool_copies_a_shard_streamed_with_fetch_shards_checks(tmp_path):
    """The spool's stager copies each shard in chunks, hashed on the way (it held the whole shard): the copy
    is the shard's bytes; a sha256 that is not the manifest's, a compressed tar and a missing shard are the
    ShardErrors fetch_shard gives, in its words, and leave nothing in the spool."""
    import gzip
    import hashlib

    from laiontools.stages.embed import ShardError, copy_shard, fetch_shard

    data = _tar_bytes([(f"{i:06d}.jpg", bytes([i]) * 5000) for i in range(40)])
    src = tmp_path / "00000.tar"
    src.write_bytes(data)
    spool = tmp_path / "spool"
    spool.mkdir()
    copy_shard(str(src), hashlib.sha256(data).hexdigest(), str(spool / "0.tar"), chunk=4096)
    assert (spool / "0.tar").read_bytes() == data
    (tmp_path / "gz.tar").write_bytes(gzip.compress(data))
    for url, sha in ((str(src), "0" * 64), (str(tmp_path / "gz.tar"), None), (str(tmp_path / "gone.tar"), None)):
        with pytest.raises(ShardError) as want:
            fetch_shard(url, sha)
        with pytest.raises(ShardError) as got:
            copy_shard(url, sha, str(spool / "1.tar"), chunk=4096)
        assert str(got.value) == str(want.value)
        assert sorted(os.listdir(spool)) == ["0.tar"]
