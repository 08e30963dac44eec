"""Decontamination on a real downloaded pool with planted copies of the synthetic evaluation set.

Real components throughout: the `pool` fixture (img2dataset download), the embed stage with the tiny
random-init `lt-tiny`, faiss, Spark local[2]. The threshold is not guessed: `dedup calibrate` picks it.
"""

from __future__ import annotations

import json
import os
import shutil
import tarfile
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from laiontools import index as DI
from laiontools.contracts.uids import array_to_uids, load_uids, save_uids
from laiontools.evalsets import EvalSetError
from laiontools.stages import dedup as dedup_stage
from laiontools.stages import dedup_calibrate
from laiontools.stages.dedup import DedupConfig, MissingEmbeddingsError
from laiontools.stages.dedup_calibrate import CalibrateConfig, recommend

EASY = ("exact", "reencode", "resize")


@pytest.fixture(scope="module")
def emb(pool, tmp_path_factory) -> str:
    """The pool embedded once by the embed stage (lt-tiny, random init, CPU)."""
    from laiontools.stages import embed as embed_stage
    from laiontools.stages.embed import EmbedConfig

    out = str(tmp_path_factory.mktemp("emb"))
    embed_stage.run(EmbedConfig(manifest=pool.manifest, output=out, model="lt-tiny", num_workers=0, batch_size=32))
    return out


@pytest.fixture(scope="module")
def calibrated(pool, emb, tmp_path_factory) -> dict:
    """`dedup calibrate` on the pool; the planted pool copies are left out of the negatives."""
    out = str(tmp_path_factory.mktemp("calibrate"))
    known = str(tmp_path_factory.mktemp("known") / "planted.uids.npy")
    save_uids(known, list(pool.planted["uid"]))
    res = dedup_calibrate.run(CalibrateConfig(embeddings=emb, evalset=[f"glyphs={pool.evalset_dir}"], output=out,
                                        plant_items=20, pool_sample=1000, exclude_uids=known)).details
    return {"out": out, "result": res}


@pytest.fixture(scope="module")
def dedup_run(pool, emb, calibrated, spark, tmp_path_factory) -> dict:
    thr = calibrated["result"]["recommendation"]["threshold"]
    out = str(tmp_path_factory.mktemp("dedup"))
    summary = dedup_stage.run(DedupConfig(embeddings=emb, evalset=[f"glyphs={pool.evalset_dir}"], output=out,
                                    threshold=thr, phash=True, k=3), spark).details
    return {"out": out, "summary": summary, "threshold": thr}


def _report(out: str) -> pd.DataFrame:
    return pd.read_parquet(os.path.join(out, "report"))


def test_calibrate_outputs_and_recommendation(calibrated):
    res, out = calibrated["result"], calibrated["out"]
    for f in ("calibrate.json", "calibrate.txt", "calibrate.png"):
        assert os.path.getsize(os.path.join(out, f)) > 0
    with open(os.path.join(out, "calibrate.png"), "rb") as f:
        assert f.read(8) == b"\x89PNG\r\n\x1a\n"
    rec = res["recommendation"]
    # lt-tiny is random-init, yet copies sit closer to their source than any unrelated pool image.
    assert rec["threshold"] is not None, rec
    assert rec["max_negative_similarity"] < rec["lowest_safe"] <= rec["threshold"] <= rec["highest_for_recall"]
    sims = res["similarity"]
    assert sims["exact"]["min"] >= rec["threshold"] and sims["negatives"]["max"] < rec["threshold"]
    assert {r["transform"] for r in res["grid"]} == set(res["transforms"])
    assert "recommended --threshold" in Path(out, "calibrate.txt").read_text()


def test_planted_copies_found_and_nothing_else(pool, dedup_run):
    rep = _report(dedup_run["out"])
    thr = dedup_run["threshold"]
    planted = pool.planted
    assert set(planted["transform"]) >= set(EASY)
    m = rep.merge(planted, on="uid", how="left")
    easy = m[m["transform"].isin(EASY)]
    assert len(easy) >= len(EASY)
    missed = easy[~easy["is_duplicate"]]
    assert missed.empty, f"easy planted copies missed at threshold {thr}:\n{missed[['transform', 'similarity']]}"
    # found, and attributed to the evaluation image they copy
    assert (easy["nearest_item_id"].str.replace(".jpg", "", regex=False) == easy["eval_item"]).all()
    unrelated = m[m["transform"].isna() & m["is_duplicate"]]
    assert unrelated.empty, f"unrelated pool images flagged:\n{unrelated[['uid', 'similarity', 'nearest_item_id']]}"
    # exclusion list = flagged samples (plus pHash-only matches), sorted uid file
    excl = {f"{int(h):016x}{int(lo):016x}" for h, lo in load_uids(os.path.join(dedup_run["out"], "exclude.uids.npy"))}
    assert set(rep.loc[rep["is_duplicate"], "uid"]) <= excl
    assert excl <= set(m.loc[m["transform"].notna(), "uid"])
    # pHash: the exact copy matches its source's hash exactly (img2dataset resized it, so others may not)
    exact = m[m["transform"] == "exact"]
    assert (exact["phash_item_id"].str.replace(".jpg", "", regex=False) == exact["eval_item"]).all()


def test_summary_dedup_json_and_gallery(pool, dedup_run):
    out, s = dedup_run["out"], dedup_run["summary"]
    assert s["threshold"] == dedup_run["threshold"] and s["index_type"] == "flat" and "lt-tiny" in s["model"]
    (g,) = s["evalsets"]
    assert g["items"] == 20 and g["unreadable_items"] == 0
    rep = _report(out)
    assert g["pool_samples_matched"] == int(rep["is_duplicate"].sum()) == s["pool_duplicates"]
    assert g["overlap_percent"] == pytest.approx(100.0 * g["eval_items_matched"] / 20)
    assert s["pool_samples"] == len(rep) == sum(1 for _ in rep["uid"])
    txt = Path(out, "summary.txt").read_text()
    assert "glyphs" in txt and str(dedup_run["threshold"]) in txt
    with open(os.path.join(out, "dedup.json")) as f:
        dj = json.load(f)
    with open(pool.manifest) as f:
        fp = json.load(f)["source"]["fingerprint"]
    assert dj["pool"]["fingerprint"] == fp and dj["threshold"] == dedup_run["threshold"]
    assert dj["exclude"]["count"] == len(load_uids(os.path.join(out, "exclude.uids.npy")))
    import pyarrow.parquet as pq

    meta = pq.read_schema(os.path.join(out, "report", min(os.listdir(os.path.join(out, "report"))))).metadata
    assert float(meta[b"laiontools.dedup.threshold"]) == dedup_run["threshold"]
    html = Path(out, "gallery.html").read_text()
    assert html.count("data:image/jpeg;base64,") >= 2 * min(s["pool_duplicates"], 24)
    assert "Just under the threshold" in html and "image unavailable" not in html


def test_the_in_process_search_writes_what_the_spark_search_writes(pool, emb, dedup_run, monkeypatch, tmp_path):
    """Below --spark-above, with no session given and no master named, the shards are searched on threads
    in this process (several at once, one index and one lookup table shared by them): the same report,
    exclusion list, dedup.json, summary and shard markers as the Spark run of `dedup_run`."""
    monkeypatch.delenv("LAIONTOOLS_SPARK_MASTER", raising=False)
    out = str(tmp_path / "local")
    shards = sorted(os.listdir(os.path.join(dedup_run["out"], "done")))
    assert len(shards) >= 3  # so that two threads search at once
    s = dedup_stage.run(DedupConfig(embeddings=emb, evalset=[f"glyphs={pool.evalset_dir}"], output=out,
                                    threshold=dedup_run["threshold"], phash=True, k=3)).details
    assert s["search_engine"] == "in-process"
    assert dedup_run["summary"]["search_engine"].startswith("spark ")
    assert Path(out, "exclude.uids.npy").read_bytes() == Path(dedup_run["out"], "exclude.uids.npy").read_bytes()
    pd.testing.assert_frame_equal(_report(out).sort_values("uid").reset_index(drop=True),
                                  _report(dedup_run["out"]).sort_values("uid").reset_index(drop=True))
    assert Path(out, "dedup.json").read_text() == Path(dedup_run["out"], "dedup.json").read_text()
    runtime = ("search_seconds", "search_engine", "worker_peak_rss_mb", "peak_rss_mb")
    same = lambda d: {k: v for k, v in d.items() if k not in runtime}
    assert same(s) == same(dedup_run["summary"])
    assert sorted(os.listdir(os.path.join(out, "done"))) == shards
    for name in shards:
        local, on_spark = (json.loads(Path(o, "done", name).read_text()) for o in (out, dedup_run["out"]))
        assert same(local) == same(on_spark), name


def test_resume_after_kill_gives_same_result(pool, emb, dedup_run, spark, tmp_path):
    out = str(tmp_path / "dd")
    shutil.copytree(dedup_run["out"], out)
    done = sorted(os.listdir(os.path.join(out, "done")))
    assert len(done) >= 2
    # "kill": one shard lost its marker mid-way (report half-written as a temp file), another never started
    victim = done[0][: -len(".done")]
    os.remove(os.path.join(out, "done", done[0]))
    with open(os.path.join(out, "report", f".{victim}.parquet.tmp-deadbeef"), "wb") as f:
        f.write(b"PAR1 half")
    other = done[1][: -len(".done")]
    os.remove(os.path.join(out, "done", done[1]))
    os.remove(os.path.join(out, "report", f"{other}.parquet"))
    kept = os.path.join(out, "done", done[2]) if len(done) > 2 else None
    kept_mtime = os.path.getmtime(kept) if kept else None
    before = Path(dedup_run["out"], "exclude.uids.npy").read_bytes()
    dedup_stage.run(DedupConfig(embeddings=emb, evalset=[f"glyphs={pool.evalset_dir}"], output=out,
                          threshold=dedup_run["threshold"], phash=True, k=3), spark)
    assert Path(out, "exclude.uids.npy").read_bytes() == before
    pd.testing.assert_frame_equal(_report(out).sort_values("uid").reset_index(drop=True),
                                  _report(dedup_run["out"]).sort_values("uid").reset_index(drop=True))
    if kept:
        assert os.path.getmtime(kept) == kept_mtime  # finished shards are not redone


def test_bad_input(pool, emb, dedup_run, spark, tmp_path):
    base = dict(evalset=[f"glyphs={pool.evalset_dir}"], threshold=0.99)
    with pytest.raises(EvalSetError, match="does not exist"):
        dedup_stage.run(DedupConfig(embeddings=emb, output=str(tmp_path / "a"), evalset=[f"x={tmp_path / 'nope'}"]), spark)
    (tmp_path / "empty").mkdir()
    with pytest.raises(EvalSetError, match="found no images"):
        dedup_stage.run(DedupConfig(embeddings=emb, output=str(tmp_path / "a"), evalset=[f"x={tmp_path / 'empty'}"]), spark)
    with pytest.raises(EvalSetError, match="declared twice, as 'glyphs' and 'again'"):
        dedup_stage.run(DedupConfig(embeddings=emb, output=str(tmp_path / "a"),
                              evalset=[f"glyphs={pool.evalset_dir}", f"again={pool.evalset_dir}/"]), spark)
    # pool shards without embeddings are listed, not skipped
    partial = str(tmp_path / "emb_partial")
    shutil.copytree(emb, partial)
    markers = sorted(f for f in os.listdir(os.path.join(partial, "meta")) if f.endswith(".done"))
    os.remove(os.path.join(partial, "meta", markers[0]))
    missing = markers[0][: -len(".parquet.done")]
    with pytest.raises(MissingEmbeddingsError, match=rf"1 shard\(s\) with no complete embeddings.*{missing}"):
        dedup_stage.run(DedupConfig(embeddings=partial, output=str(tmp_path / "b"), **base), spark)
    # embeddings of another model than the index already in the output folder: refused, naming both
    other = str(tmp_path / "emb_other")
    shutil.copytree(emb, other)
    with open(os.path.join(other, "model.json")) as f:
        mj = json.load(f)
    mj.update(model="lt-small", embed_dim=64)
    with open(os.path.join(other, "model.json"), "w") as f:
        json.dump(mj, f)
    reuse = str(tmp_path / "c")
    shutil.copytree(dedup_run["out"], reuse)
    with pytest.raises(DI.ModelMismatchError, match=r"lt-small.*lt-tiny"):
        dedup_stage.run(DedupConfig(embeddings=other, output=reuse, **base), spark)


def test_cli_ivf_and_repeated_evalset(pool, emb, spark, tmp_path):
    from laiontools.cli import main

    flat = tmp_path / "flat"
    flat.mkdir()
    for i, name in enumerate(sorted(os.listdir(pool.evalset_dir))[:1]):
        src = os.path.join(pool.evalset_dir, name)
        if os.path.isdir(src):
            for f in sorted(os.listdir(src))[:2]:
                shutil.copy(os.path.join(src, f), flat / f"{i}_{f}")
    out = str(tmp_path / "ivf")
    rc = main(["dedup", "--embeddings", emb, "--evalset", f"glyphs={pool.evalset_dir}:imagefolder",
               "--evalset", f"few={flat}", "--output", out, "--index", "ivf", "--nlist", "2", "--nprobe", "2",
               "--threshold", "0.999", "--no-phash", "--gallery-pairs", "4"])
    assert rc == 0
    with open(os.path.join(out, "index", "index.json")) as f:
        idx = json.load(f)
    assert idx["index_type"] == "ivf" and idx["nlist"] == 2 and idx["ntotal"] == 22
    assert [e["name"] for e in idx["evalsets"]] == ["glyphs", "few"]
    with open(os.path.join(out, "summary.json")) as f:
        assert [e["evalset"] for e in json.load(f)["evalsets"]] == ["glyphs", "few"]
    assert main(["dedup", "--embeddings", emb, "--output", out]) == 2  # no evaluation set: clean error


def test_recommend_rule():
    pos = {"exact": np.array([1.0, 1.0, 0.999]), "reencode": np.array([0.998, 0.997]), "crop": np.array([0.9, 0.95])}
    rec = recommend(pos, np.array([0.96, 0.97]))
    # 5 easy copies and recall 0.95 needs all 5: the interval is (0.97, 0.997]; its midpoint is recommended
    assert rec["highest_for_recall"] == pytest.approx(0.997) and rec["lowest_safe"] == pytest.approx(0.9701)
    assert rec["threshold"] == pytest.approx((0.9701 + 0.997) / 2, abs=1e-4)
    # negatives above the easy copies: a few among many are more likely copies already in the pool
    # than a weak model (the reason says which); many mean the model does not separate them
    few = recommend(pos, np.array([0.998, *np.linspace(0.5, 0.9, 39)]))
    assert few["threshold"] is None and few["negatives_at_recall"] == 1
    assert "only 1 of 40 pool negatives reach it" in few["reason"] and "--exclude-uids" in few["reason"]
    many = recommend(pos, np.array([0.998, 0.999, *np.linspace(0.5, 0.9, 18)]))
    assert many["threshold"] is None and many["negatives_at_recall"] == 2
    assert many["reason"].endswith("this model does not separate copies from unrelated images")


def _unit_rows(n: int, d: int) -> np.ndarray:
    """n seeded random L2-normalized float32 vectors of dimension d."""
    x = np.random.default_rng(0).standard_normal((n, d)).astype(np.float32)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


@pytest.mark.gpu
def test_gpu_index_search_matches_cpu():
    import faiss

    if DI.gpu_count() == 0:
        pytest.skip("faiss sees no GPU (faiss-cpu build or no device)")
    x = _unit_rows(1000, 64)
    index, _ = DI.build_index(x[:200])
    gpu = DI.deserialize(DI.serialize(index), use_gpu=True)
    assert not isinstance(gpu, faiss.IndexFlatIP)
    np.testing.assert_array_equal(index.search(x, 1)[1], gpu.search(x, 1)[1])


class _FakeGpuIndex:
    """What faiss's GPU cloner gives, as far as the limits go: a search of more than GPU_MAX_K neighbours,
    or an IVF probing more lists, raises (faiss: "GPU index only supports min/max-K selection up to 2048")."""

    def __init__(self, cpu):
        self.cpu, self.ntotal = cpu, cpu.ntotal

    def search(self, x, k):
        if k > DI.GPU_MAX_K or getattr(self.cpu, "nprobe", 0) > DI.GPU_MAX_K:
            raise RuntimeError(f"GPU index only supports min/max-K selection up to {DI.GPU_MAX_K} (requested {k})")
        return self.cpu.search(x, k)


def _fake_gpu_faiss(monkeypatch):
    import faiss

    monkeypatch.setattr(faiss, "get_num_gpus", lambda: 1, raising=False)
    monkeypatch.setattr(faiss, "index_cpu_to_all_gpus", _FakeGpuIndex, raising=False)

    class _Params:
        def set_index_parameter(self, index, name, val):
            setattr(index.cpu, name, val)

    monkeypatch.setattr(faiss, "GpuParameterSpace", _Params, raising=False)


def test_a_k_or_nprobe_past_the_faiss_gpu_limit_is_searched_on_the_cpu(monkeypatch):
    """A faiss GPU index answers at most 2048 neighbours and probes at most 2048 IVF lists: --k 3000 over a
    large evaluation set, or --nprobe 3000, was put on the GPU and every search task raised there (the
    CPU run worked). Such searches stay on the CPU now. (faiss's GPU cloner faked, with its limits.)"""
    import faiss

    _fake_gpu_faiss(monkeypatch)
    x = _unit_rows(DI.GPU_MAX_K + 100, 16)
    flat, _ = DI.build_index(x)
    desc = {"index_sha256": "0" * 64, "items_sha256": "1" * 64, "ntotal": len(x), "dim": 16, "index_type": "flat",
            "model": {"model": "lt-tiny", "embed_dim": 16}, "evalsets": [{"name": "s"}]}
    for k, on_gpu in ((5, True), (DI.GPU_MAX_K, True), (3000, False)):
        ctx = dedup_stage.search_context(DedupConfig(embeddings="e", evalset=["s=x"], output="o", k=k), desc)
        assert ctx["gpu"] is on_gpu
        index = DI.deserialize(DI.serialize(flat), use_gpu=ctx["gpu"])
        assert isinstance(index, _FakeGpuIndex) is on_gpu
        kk = min(k, len(x))
        np.testing.assert_array_equal(index.search(x[:3], kk)[1], flat.search(x[:3], kk)[1])
    assert dedup_stage.search_context(DedupConfig(embeddings="e", evalset=["s=x"], output="o", k=3000, gpu=False), desc)["gpu"] is False
    # an IVF index probing more lists than a GPU one can stays on the CPU, nprobe kept; fewer: the GPU
    quantizer = faiss.IndexFlatIP(16)
    ivf = faiss.IndexIVFFlat(quantizer, 16, DI.GPU_MAX_K + 50, faiss.METRIC_INNER_PRODUCT)
    ivf.nprobe = DI.GPU_MAX_K + 50
    cpu = DI.deserialize(DI.serialize(ivf), use_gpu=True)
    assert isinstance(cpu, faiss.IndexIVFFlat) and cpu.nprobe == DI.GPU_MAX_K + 50
    ivf.nprobe = 16
    gpu = DI.deserialize(DI.serialize(ivf), use_gpu=True)
    assert isinstance(gpu, _FakeGpuIndex) and gpu.cpu.nprobe == 16


@pytest.mark.gpu
def test_gpu_search_past_the_faiss_gpu_k_limit_matches_cpu():
    """On a real faiss GPU build: --k 3000 and an IVF --nprobe 3000 search (on the CPU) instead of raising."""
    import faiss

    if DI.gpu_count() == 0:
        pytest.skip("faiss sees no GPU (faiss-cpu build or no device)")
    x = _unit_rows(3000, 32)
    flat, _ = DI.build_index(x)
    desc = {"index_sha256": "0" * 64, "items_sha256": "1" * 64, "ntotal": len(x), "dim": 32, "index_type": "flat",
            "model": {"model": "lt-tiny", "embed_dim": 32}, "evalsets": [{"name": "s"}]}
    ctx = dedup_stage.search_context(DedupConfig(embeddings="e", evalset=["s=x"], output="o", k=3000), desc)
    index = DI.deserialize(DI.serialize(flat), use_gpu=ctx["gpu"])
    np.testing.assert_array_equal(index.search(x[:4], 3000)[1], flat.search(x[:4], 3000)[1])
    ivf, _ = DI.build_index(x, "ivf", nlist=2500, nprobe=2500)
    got = DI.deserialize(DI.serialize(ivf), use_gpu=True)
    assert isinstance(got, faiss.IndexIVFFlat)
    np.testing.assert_array_equal(got.search(x[:4], 5)[1], ivf.search(x[:4], 5)[1])


def test_calibrate_refuses_an_exclude_uids_that_is_no_uid_file_before_embedding(pool, emb, tmp_path):
    """dedup calibrate --exclude-uids: a .npy of another dtype, of pickled objects, or a text file is
    refused naming the file, before the planted copies are embedded (it crashed after them)."""
    from pathlib import Path

    from laiontools.core.errors import InputError

    bad = {"f64.npy": lambda p: np.save(p, np.zeros(3)), "obj.npy": lambda p: np.save(p, np.array([{"a": 1}], dtype=object)),
           "text.npy": lambda p: Path(p).write_text("0123abcd\n")}
    for name, write in bad.items():
        path = str(tmp_path / name)
        write(path)
        out = tmp_path / f"out-{name}"
        with pytest.raises(InputError, match=rf"--exclude-uids {path}: not a uid file"):
            dedup_calibrate.run(CalibrateConfig(embeddings=emb, evalset=[f"glyphs={pool.evalset_dir}"], output=str(out),
                                                plant_items=5, pool_sample=50, exclude_uids=path))
        assert not out.exists()


def test_calibrate_refuses_to_recommend_without_pool_negatives(pool, emb, tmp_path):
    """--pool-sample 0 gave no negatives and recommended --threshold 0.0 ("no negative flagged"), a
    threshold that flags nearly the whole pool; now refused. So is a run whose exclusions leave no pool
    sample to compare with."""
    from laiontools.core.config import ConfigError
    from laiontools.core.errors import InputError

    with pytest.raises(ConfigError, match="pool_sample must be >= 1"):
        CalibrateConfig(embeddings=emb, evalset=[f"glyphs={pool.evalset_dir}"], output=str(tmp_path / "a"), pool_sample=0)
    every = str(tmp_path / "every.uids.npy")
    save_uids(every, pd.read_parquet(os.path.join(pool.dir, "catalog"), columns=["uid"])["uid"].dropna().tolist())
    with pytest.raises(InputError, match="no pool sample is left to calibrate against"):
        dedup_calibrate.run(CalibrateConfig(embeddings=emb, evalset=[f"glyphs={pool.evalset_dir}"], output=str(tmp_path / "b"),
                                            plant_items=5, pool_sample=50, exclude_uids=every))


def test_a_threshold_that_excludes_most_of_the_pool_is_called_out(pool, emb, dedup_run, spark, tmp_path):
    """The calibrated threshold excludes the planted copies and no warning is given; -1 (every pair
    similar enough) excludes the whole pool, which dedup now says in its summary and summary.json
    instead of a quiet 100 %. --phash-max-distance without --phash was ignored: refused."""
    from laiontools.core.config import ConfigError

    assert dedup_run["summary"]["warnings"] == []
    assert dedup_run["summary"]["excluded"] < dedup_stage.FLAGGED_SHARE_WARNING * dedup_run["summary"]["pool_samples"]
    res = dedup_stage.run(DedupConfig(embeddings=emb, evalset=[f"glyphs={pool.evalset_dir}"], output=str(tmp_path / "loose"),
                                      threshold=-1.0), spark)
    n = res.counts["pool_samples"]
    assert res.counts["excluded"] == n > 0
    want = f"warning: {n} of {n} pool samples (100%) are excluded: threshold -1.0 is too loose"
    assert want in res.summary and res.details["warnings"][0].startswith(want)
    with open(os.path.join(str(tmp_path / "loose"), "summary.json")) as f:
        assert json.load(f)["warnings"] == res.details["warnings"]
    with pytest.raises(ConfigError, match="--phash-max-distance 4 without --phash"):
        DedupConfig(embeddings=emb, evalset=[f"glyphs={pool.evalset_dir}"], output=str(tmp_path / "p"), phash_max_distance=4)


def test_calibrate_on_a_pool_holding_copies_points_at_them_not_at_the_model(pool, emb, tmp_path):
    """Without --exclude-uids the pool's planted copies of the eval set are among the negatives, as
    close to it as the planted ones: no threshold, and the report says the negatives may be copies in
    the pool (naming them), not that the model cannot separate copies."""
    res = dedup_calibrate.run(CalibrateConfig(embeddings=emb, evalset=[f"glyphs={pool.evalset_dir}"],
                                              output=str(tmp_path / "cal"), plant_items=20, pool_sample=1000)).details
    rec = res["recommendation"]
    assert rec["threshold"] is None and 0 < rec["negatives_at_recall"] <= len(pool.planted)
    assert "may be copies of the evaluation set already in the pool" in rec["reason"]
    top = {h["uid"] for h in res["highest_negatives"][: rec["negatives_at_recall"]]}
    assert top <= set(pool.planted["uid"])  # the negatives it points at are the planted copies
    assert "may be copies of the evaluation set" in (tmp_path / "cal" / "calibrate.txt").read_text()


def _rewrite_tar(path: str, change) -> dict[str, bytes]:
    """Rewrite a tar's members through `change(name, data) -> (name, data) | None`; returns the old payloads."""
    import io
    import tarfile

    with tarfile.open(path) as tf:
        old = {m.name: tf.extractfile(m).read() for m in tf if m.isfile()}
    with tarfile.open(path, "w", format=tarfile.PAX_FORMAT) as tf:
        for name, data in old.items():
            new = change(name, data)
            if new is None:
                continue
            ti = tarfile.TarInfo(new[0])
            ti.size = len(new[1])
            tf.addfile(ti, io.BytesIO(new[1]))
    return old


def test_phash_keys_agree_with_embed_for_folder_prefixed_members(tmp_path):
    """Members ``sub/0000007.jpg`` (a valid webdataset key) were pHashed under ``sub/0000007`` while embed
    stores ``0000007``: the search found none of the shard and called them unreadable (walk F6)."""
    from laiontools.gallery import pool_images
    from laiontools.testing.embed_pool import write_pool

    shard = os.path.join(os.path.dirname(write_pool(str(tmp_path / "p"), 1, 2, image_size=32)), "shards", "00000.tar")
    _rewrite_tar(shard, lambda name, data: ("sub/" + name, data))
    assert sorted(dedup_stage._pool_phashes(shard)) == ["000000000", "000000001"]
    assert sorted(pool_images(shard, {"000000000", "000000001"})) == ["000000000", "000000001"]


def test_phash_match_on_a_pool_row_without_uid_is_skipped_and_counted(spark, tmp_path):
    """A pool sample whose .json is unreadable is embedded as failed with a null uid; when its image was a
    pHash copy of an evaluation item, dedup --phash crashed sorting the exclusion list (walk F3)."""
    from laiontools.stages import embed as embed_stage
    from laiontools.stages.embed import EmbedConfig
    from laiontools.testing.embed_pool import write_pool

    manifest = write_pool(str(tmp_path / "p"), 1, 4, image_size=32)
    shard = os.path.join(os.path.dirname(manifest), "shards", "00000.tar")
    old = _rewrite_tar(shard, lambda name, data: (name, b"[1, 2, 3]" if name == "000000001.json" else data))
    ev = tmp_path / "ev" / "c0"
    ev.mkdir(parents=True)
    (ev / "copy.jpg").write_bytes(old["000000001.jpg"])  # the uid-less sample's image, byte for byte
    emb = str(tmp_path / "emb")
    embed_stage.run(EmbedConfig(manifest=manifest, output=emb, model="lt-tiny", num_workers=0, verify_shards=False))
    summary = dedup_stage.run(DedupConfig(embeddings=emb, evalset=[f"ev={tmp_path / 'ev'}:imagefolder"],
                                          output=str(tmp_path / "d"), threshold=0.999, phash=True, k=1), spark).details
    assert summary["phash_skipped_rows_without_uid"] == 1
    assert summary["phash_pool_matches"] == 0 and summary["phash_unreadable_pool_images"] == 0


def _bytes(path: str) -> bytes:
    with open(path, "rb") as f:
        return f.read()


def _json_file(path: str) -> dict:
    with open(path) as f:
        return json.load(f)


@pytest.fixture(scope="module")
def reembedded(pool, emb, dedup_run, spark, tmp_path_factory) -> dict:
    """The pool with one sample dedup flagged taken down, and `emb` copied and then updated by embed for
    the new pool (embed embeds the rewritten shard again, nothing else): the user's way to a new pool."""
    from laiontools.stages import embed as embed_stage
    from laiontools.stages import takedown as takedown_stage
    from laiontools.stages.embed import EmbedConfig
    from laiontools.stages.takedown import TakedownConfig

    root = tmp_path_factory.mktemp("reembedded")
    victim = min(array_to_uids(load_uids(os.path.join(dedup_run["out"], "exclude.uids.npy"))))
    listfile = str(root / "list.txt")
    with open(listfile, "w") as f:
        f.write(f"uid {victim}\n")
    new_pool = str(root / "pool")
    takedown_stage.run(TakedownConfig(pool=pool.manifest, list_file=listfile, reason="test", output=new_pool), spark)
    before = str(root / "emb-before")
    shutil.copytree(emb, before)
    after = str(root / "emb-after")
    shutil.copytree(emb, after)
    manifest = os.path.join(new_pool, "pool.manifest.json")
    embed_stage.run(EmbedConfig(manifest=manifest, output=after, model="lt-tiny", num_workers=0, batch_size=32))
    return {"victim": victim, "manifest": manifest, "before": before, "after": after, "root": root}


def test_dedup_into_an_old_output_searches_shards_embedded_again(pool, dedup_run, reembedded, spark, tmp_path):
    """dedup's shard markers were keyed on its settings only: after a takedown and embed into the same
    folder, a re-run into the old output reused the rewritten shard's result (the taken-down sample still
    excluded, pool_samples one too many), exit 0. Now a shard's result is for its embeddings (the sha256
    embed recorded): the re-run equals a fresh run, and only the rewritten shard is searched again."""
    from laiontools.contracts.manifest import read_manifest

    cfg = {"evalset": [f"glyphs={pool.evalset_dir}"], "threshold": dedup_run["threshold"], "phash": True, "k": 3}
    stale = str(tmp_path / "stale")
    shutil.copytree(dedup_run["out"], stale)
    old_done = {n: os.path.getmtime(os.path.join(stale, "done", n)) for n in os.listdir(os.path.join(stale, "done"))}
    res = dedup_stage.run(DedupConfig(embeddings=reembedded["after"], output=stale, **cfg), spark).details
    fresh = str(tmp_path / "fresh")
    dedup_stage.run(DedupConfig(embeddings=reembedded["after"], output=fresh, **cfg), spark)
    assert reembedded["victim"] not in set(array_to_uids(load_uids(os.path.join(stale, "exclude.uids.npy"))))
    assert res["pool_samples"] == read_manifest(reembedded["manifest"])["num_samples"]
    assert _bytes(os.path.join(stale, "exclude.uids.npy")) == _bytes(os.path.join(fresh, "exclude.uids.npy"))
    pd.testing.assert_frame_equal(_report(stale).sort_values("uid").reset_index(drop=True),
                                  _report(fresh).sort_values("uid").reset_index(drop=True))
    redone = sorted(n for n, t in old_done.items() if os.path.getmtime(os.path.join(stale, "done", n)) != t)
    assert len(redone) == 1, redone  # the one rewritten shard; the others are reused


def test_a_shard_is_read_and_identified_by_one_reading_of_its_marker(reembedded):
    """dedup and semdedup read an embedding shard's marker once and take both its identity and the hashes
    its files are checked against from it (they read it twice: an embed run between the two reads gave a
    result recorded for other embeddings than it was made of). With the marker of the shard before embed
    ran again, the current files are refused, naming the file; with its own, they are read."""
    from laiontools.contracts.embeddings import read_embedding_shard, shard_identity, shard_marker
    from laiontools.core.errors import TaskError

    after, before = reembedded["after"], reembedded["before"]
    sids = sorted(n.removesuffix(".parquet") for n in os.listdir(os.path.join(after, "meta")) if n.endswith(".parquet"))
    changed = [sid for sid in sids if shard_marker(after, sid) != shard_marker(before, sid)]
    assert len(changed) == 1, changed  # the shard the takedown rewrote, embedded again
    sid = changed[0]
    now, old = shard_marker(after, sid), shard_marker(before, sid)
    assert shard_identity(after, sid, now) == shard_identity(after, sid) != shard_identity(after, sid, old)
    emb, meta = read_embedding_shard(after, sid, now)
    assert emb.shape[0] == meta.num_rows == read_embedding_shard(after, sid)[1].num_rows
    with pytest.raises(TaskError, match=rf"{sid}\.(npy|parquet)"):
        read_embedding_shard(after, sid, old)


def test_semdedup_into_an_old_output_assigns_shards_embedded_again(reembedded, tmp_path):
    """semdedup's assignments were keyed on the centroids only, and k-means may give the same centroids
    after one sample is taken down: the rewritten shard's old assignment was reused (the taken-down sample
    kept as a group's representative, exit 0). A re-run into the old output, with other --eps too, equals a
    fresh run: every assignment is of its shard's current embeddings, no eps folder of the old run is left."""
    from laiontools.contracts.embeddings import shard_identity
    from laiontools.stages import semdedup

    def run(emb_dir, out, eps):
        return semdedup.run(semdedup.SemDedupConfig(embeddings=emb_dir, output=out, clusters=2, train_sample=40,
                                                    eps=eps, gallery_groups=0)).details

    emb_dir = str(tmp_path / "emb")
    shutil.copytree(reembedded["before"], emb_dir)
    stale, fresh = str(tmp_path / "stale"), str(tmp_path / "fresh")
    run(emb_dir, stale, [0.3, 0.5])
    shutil.rmtree(emb_dir)
    shutil.copytree(reembedded["after"], emb_dir)  # the same folder, updated by embed for the new pool
    # The assign step with the old run's centroids (as when k-means gives them again): each shard's
    # marker is reused only for the embeddings it was made of; the rewritten shard is assigned again.
    km = _json_file(os.path.join(stale, semdedup.KMEANS_DIR, "kmeans.json"))
    done = os.path.join(stale, semdedup.DONE_DIR, semdedup.ASSIGN_DIR)
    sids = sorted(n.removesuffix(".done") for n in os.listdir(done))
    ctx = {"output": stale, "emb_dir": emb_dir, "centroids_path": os.path.join(stale, semdedup.KMEANS_DIR, "centroids.npy"),
           "centroids_sha": km["centroids_sha256"], "k": km["clusters"], "threads": 1,
           "assign_key": _json_file(os.path.join(done, sids[0] + ".done"))["key"]}
    old = {sid: _json_file(os.path.join(done, sid + ".done")) for sid in sids}
    new = {sid: semdedup.assign_shard(ctx, sid) for sid in sids}
    assert all(new[sid]["embedding"] == shard_identity(emb_dir, sid) for sid in sids)
    again = [sid for sid in sids if new[sid] != old[sid]]
    assert len(again) == 1 and new[again[0]]["rows"] == old[again[0]]["rows"] - 1, again  # the taken-down sample's shard
    got, want = run(emb_dir, stale, [0.4]), run(emb_dir, fresh, [0.4])
    assert sorted(os.listdir(os.path.join(stale, "eps"))) == sorted(os.listdir(os.path.join(fresh, "eps"))) == ["0.4"]
    for name in ("exclude.uids.npy", os.path.join("eps", "0.4", "exclude.uids.npy")):
        assert _bytes(os.path.join(stale, name)) == _bytes(os.path.join(fresh, name)), name
    assert got["pool_samples"] == want["pool_samples"] and got["eps"] == want["eps"]
    pd.testing.assert_frame_equal(pd.read_parquet(os.path.join(stale, "report")).sort_values(["uid", "eps"]).reset_index(drop=True),
                                  pd.read_parquet(os.path.join(fresh, "report")).sort_values(["uid", "eps"]).reset_index(drop=True))

# ----------------------------------------------------------------------------------------------
# Found by a review of the in-process search: a damaged index reused for ever, errors from a Spark
# task printed as tracebacks, a damaged footer met while choosing the engine, a gallery that did not
# follow --gallery-pairs on a re-run, and a GPU run that put its pHash pass on one thread.


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> dict:
    """For the review's cases below: a 3-shard pool written without download, embedded in process (lt-tiny), and an evaluation set of
    two of its images."""
    from laiontools.stages import embed as embed_stage
    from laiontools.stages.embed import EmbedConfig
    from laiontools.testing.embed_pool import write_pool

    root = tmp_path_factory.mktemp("dedup-tiny")
    manifest = write_pool(str(root / "p"), 3, 6, image_size=32)
    emb = str(root / "emb")
    embed_stage.run(EmbedConfig(manifest=manifest, output=emb, model="lt-tiny", num_workers=0))
    ev = root / "ev" / "c0"
    ev.mkdir(parents=True)
    with tarfile.open(os.path.join(root, "p", "shards", "00000.tar")) as tf:
        for m in [m for m in tf if m.name.endswith(".jpg")][:2]:
            (ev / m.name).write_bytes(tf.extractfile(m).read())
    return {"root": root, "manifest": manifest, "emb": emb, "evalset": f"ev={root / 'ev'}:imagefolder"}


def _tiny_cfg(tiny, out, **kw) -> DedupConfig:
    return DedupConfig(embeddings=tiny["emb"], evalset=[tiny["evalset"]], output=str(out), threshold=0.99, k=2, **kw)


def _new_process_and_unfinished_shards(out) -> None:
    """As a new process sees a run killed during its search: no index loaded yet, shards left to search."""
    from laiontools import index as DI

    DI._CACHE.clear()
    dedup_stage._LOOKUPS.clear()
    shutil.rmtree(out / "done")


def test_a_damaged_index_file_is_rebuilt_by_the_re_run_its_error_asks_for(tiny, tmp_path, monkeypatch):
    """The index file changed after index.json recorded its sha256 (a bit flip, a partial copy, an edit):
    the search refuses it saying "re-run dedup", but a re-run reuses index.json as it is (prepare_index never
    checks the files it describes) and fails the same way, forever."""
    from laiontools import index as DI
    from laiontools.core.errors import UserError

    monkeypatch.delenv("LAIONTOOLS_SPARK_MASTER", raising=False)
    out = tmp_path / "d"
    first = dedup_stage.run(_tiny_cfg(tiny, out)).details
    idx = out / "index" / "evalsets.faiss"
    data = bytearray(idx.read_bytes())
    data[-1] ^= 0xFF  # one flipped bit in the last vector
    idx.write_bytes(bytes(data))
    _new_process_and_unfinished_shards(out)
    try:
        dedup_stage.run(_tiny_cfg(tiny, out))
    except UserError as e:
        assert "re-run dedup" in str(e)
        DI._CACHE.clear()  # the user re-runs dedup as told (a new process)
    again = dedup_stage.run(_tiny_cfg(tiny, out)).details
    assert again["pool_duplicates"] == first["pool_duplicates"]


def test_a_missing_index_file_is_one_clear_error_or_rebuilt(tiny, tmp_path, monkeypatch):
    """evalsets.faiss gone (deleted to save space, a partial copy of the output folder) while index.json
    stays: every re-run fails with a bare FileNotFoundError from a search thread."""
    monkeypatch.delenv("LAIONTOOLS_SPARK_MASTER", raising=False)
    out = tmp_path / "d"
    first = dedup_stage.run(_tiny_cfg(tiny, out)).details
    os.remove(out / "index" / "evalsets.faiss")
    _new_process_and_unfinished_shards(out)
    again = dedup_stage.run(_tiny_cfg(tiny, out)).details
    assert again["pool_duplicates"] == first["pool_duplicates"]


def _no_manifest_copy(tiny, dst) -> str:
    """The embeddings folder as embed writes it for a folder of tars with no pool manifest recorded in model.json
    (pool.manifest absent): the engine is chosen from the shards' parquet footers."""
    emb = str(dst)
    shutil.copytree(tiny["emb"], emb)
    with open(os.path.join(emb, "model.json")) as f:
        mj = json.load(f)
    mj.pop("pool", None)
    with open(os.path.join(emb, "model.json"), "w") as f:
        json.dump(mj, f)
    return emb


def test_a_damaged_meta_footer_is_one_clear_error_when_the_pool_is_counted(tiny, tmp_path, monkeypatch):
    """With no manifest count, the engine choice reads every meta/<shard>.parquet footer (shard_rows) before
    any shard is checked against embed's recorded sha256: a cut meta file escapes as pyarrow's ArrowInvalid
    traceback from the CLI (exit 1), instead of the one line naming the file that the search's own read gives."""
    from laiontools.cli import main

    monkeypatch.delenv("LAIONTOOLS_SPARK_MASTER", raising=False)
    emb = _no_manifest_copy(tiny, tmp_path / "emb")
    meta = os.path.join(emb, "meta", "00001.parquet")
    with open(meta, "rb") as f:
        data = f.read()
    with open(meta, "wb") as f:
        f.write(data[: len(data) // 2])  # cut: no footer
    rc = main(["dedup", "--embeddings", emb, "--evalset", tiny["evalset"], "--output", str(tmp_path / "d"),
               "--threshold", "0.99"])
    assert rc == 2


def _shard_of_another_dim(tiny, dst) -> str:
    """The embeddings folder with shard 00001 replaced by one of a 32-dim model, its marker recording the new
    file's sha256 (as when a shard's files and marker are copied in from another embed run)."""
    import hashlib

    emb = str(dst)
    shutil.copytree(tiny["emb"], emb)
    rel = "img_emb/00001.npy"
    x = np.random.default_rng(0).standard_normal((6, 32)).astype(np.float32)
    np.save(os.path.join(emb, rel), (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float16))
    mpath = os.path.join(emb, "meta", "00001.parquet.done")
    with open(mpath) as f:
        marker = json.load(f)
    with open(os.path.join(emb, rel), "rb") as f:
        data = f.read()
    marker["files_sha256"][rel] = hashlib.sha256(data).hexdigest()
    marker["files_bytes"][rel] = len(data)
    with open(mpath, "w") as f:
        json.dump(marker, f)
    return emb


@pytest.mark.parametrize("engine", ["in-process", "spark"])
def test_a_shard_of_another_dimension_is_one_clear_error_on_either_engine(tiny, tmp_path, monkeypatch, engine, request):
    """search_shard raises ModelMismatchError (a UserError: one line, exit 2) for a shard whose vectors have
    another dimension than the index. In process it arrives as such; in a Spark task it is not tagged with
    task_error, so it reaches the driver as a py4j error with the worker's traceback and the CLI prints a
    traceback (exit 1). The same bad input must give the same clear error on both engines."""
    from laiontools.cli import main

    monkeypatch.delenv("LAIONTOOLS_SPARK_MASTER", raising=False)
    emb = _shard_of_another_dim(tiny, tmp_path / "emb")
    argv = ["dedup", "--embeddings", emb, "--evalset", tiny["evalset"], "--output", str(tmp_path / "d"),
            "--threshold", "0.99"]
    if engine == "spark":
        request.getfixturevalue("spark")  # the session's local[2] SparkSession, found as the active one
        argv += ["--spark-above", "0"]
    assert main(argv) == 2


def test_a_re_run_with_more_gallery_pairs_shows_what_a_fresh_run_shows(tiny, tmp_path, monkeypatch):
    """Each shard's marker holds its best `gallery_pairs` candidates, but gallery_pairs is not in the
    settings key: a re-run into the same output with a larger --gallery-pairs reuses every shard and
    its gallery keeps the first run's few pairs (a fresh run shows more)."""
    import re

    monkeypatch.delenv("LAIONTOOLS_SPARK_MASTER", raising=False)
    stale, fresh = tmp_path / "stale", tmp_path / "fresh"
    dedup_stage.run(_tiny_cfg(tiny, stale, gallery_pairs=1))
    dedup_stage.run(_tiny_cfg(tiny, stale, gallery_pairs=6))
    dedup_stage.run(_tiny_cfg(tiny, fresh, gallery_pairs=6))
    pairs = lambda out: len(re.findall(r"data:image/jpeg;base64,|image unavailable", (out / "gallery.html").read_text()))
    assert pairs(stale) == pairs(fresh)


def test_with_a_gpu_the_in_process_phash_pass_still_uses_the_cores(tiny, tmp_path, monkeypatch):
    """With a GPU (faiss-gpu) the in-process run sets tasks.workers = 1 so that the GPU index is never
    searched from two threads. That serializes the whole shard task, including the pHash pass, which
    decodes every pool image on the CPU (~4 ms an image here: a 2M-sample pool is ~2 h on one core instead of
    minutes on 16). Only index.search needs serializing. (faiss-cpu here: gpu_count is faked; the index stays
    a CPU one.)"""
    import threading
    import time

    from laiontools import index as DI

    monkeypatch.delenv("LAIONTOOLS_SPARK_MASTER", raising=False)
    monkeypatch.setattr(DI, "gpu_count", lambda: 1)
    real = dedup_stage._pool_phashes
    lock, now, peak = threading.Lock(), [0], [0]

    def counted(tar):
        with lock:
            now[0] += 1
            peak[0] = max(peak[0], now[0])
        try:
            time.sleep(0.5)  # a shard's decoding takes a while: overlapping shards would show
            return real(tar)
        finally:
            with lock:
                now[0] -= 1

    monkeypatch.setattr(dedup_stage, "_pool_phashes", counted)
    dedup_stage.run(_tiny_cfg(tiny, tmp_path / "d", phash=True))
    assert peak[0] >= 2, f"pHash of 3 shards on {os.cpu_count()} cores: at most {peak[0]} at once"


def test_the_index_cache_keeps_a_gpu_load_apart_from_a_cpu_one(tmp_path):
    """One process, two runs on one index: --no-gpu after a GPU run must not get the GPU index back (its
    search would then go unserialized, from several threads). The cache's key holds the GPU flag: the same
    flag gives the loaded index again, the other loads it anew. (faiss-cpu here: both loads are CPU indexes,
    the key is what is checked.)"""
    import hashlib

    x = np.random.default_rng(0).standard_normal((20, 8)).astype(np.float32)
    index, _ = DI.build_index(x / np.linalg.norm(x, axis=1, keepdims=True))
    path = tmp_path / "i.faiss"
    path.write_bytes(DI.serialize(index))
    sha = hashlib.sha256(path.read_bytes()).hexdigest()
    DI._CACHE.clear()
    cpu = DI.load_cached(str(path), sha, use_gpu=False)
    assert DI.load_cached(str(path), sha, use_gpu=False) is cpu
    gpu = DI.load_cached(str(path), sha, use_gpu=True)
    assert gpu is not cpu and DI.load_cached(str(path), sha, use_gpu=True) is gpu
    assert DI.load_cached(str(path), sha, use_gpu=False) is not cpu  # one index per process: the last load replaced it
    DI._CACHE.clear()


# Run in a fresh process: an index file's load (what every search worker does once), the peak of its resident
# memory above what it held before, in bytes (the peak is reset first: procs.reset_peak). argv: path, sha256.
_INDEX_LOAD_PEAK = """
import sys
from laiontools import index as DI
from laiontools.testing import procs
import faiss

path, sha = sys.argv[1], sys.argv[2]
from laiontools.core.storage import url_to_fs
fs, p = url_to_fs(path)
fs.size(p)  # the store's client made and its libraries imported before: what the load itself holds is measured
before = procs.reset_peak()
DI.load_cached(path, sha, use_gpu=False)
print(procs.peak_above(before))
"""


def index_load_peak(path: str, sha: str) -> float:
    """Peak memory of one worker's load of the index at `path` (a local path or an s3:// URL), over the file's size."""
    import subprocess
    import sys

    from laiontools.core.storage import url_to_fs

    fs, p = url_to_fs(path)
    out = subprocess.run([sys.executable, "-c", _INDEX_LOAD_PEAK, path, sha], capture_output=True, text=True, check=True,
                         env={**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)})
    return int(out.stdout.strip().splitlines()[-1]) / fs.size(p)


def test_a_search_worker_loads_the_index_without_holding_its_bytes_beside_it(tmp_path):
    """Every search worker loads the evaluation index once. It read the file's bytes whole, and faiss's
    deserialize copied them before building the index: three copies at once, ~14 GB in every worker for a
    1.5M x 768 index. A local file is now hashed, then read by faiss into the index: the peak is about the
    index (measured in a fresh process). The index searches as the one written; a changed file is refused."""
    import hashlib

    import faiss

    from laiontools.core.errors import UserError

    x = np.random.default_rng(1).standard_normal((60_000, 256)).astype(np.float32)  # a 61 MB flat index
    index = faiss.IndexFlatIP(256)
    index.add(x)
    path = tmp_path / "i.faiss"
    faiss.write_index(index, str(path))
    sha = hashlib.sha256(path.read_bytes()).hexdigest()
    got = DI.read_checked(str(path), sha, use_gpu=False)
    q = x[:5] + 0.01
    assert np.array_equal(got.search(q, 3)[1], index.search(q, 3)[1]) and got.ntotal == 60_000
    assert index_load_peak(str(path), sha) < 1.5  # 1.01 here; was 3.0 (BENCHMARKS "Executor memory and shuffle bytes per stage")
    data = bytearray(path.read_bytes())
    data[-1] ^= 1
    path.write_bytes(bytes(data))
    with pytest.raises(UserError, match=rf"^{path} changed since the job started \(sha256 mismatch\); re-run dedup$"):
        DI.read_checked(str(path), sha, use_gpu=False)


def test_a_search_worker_loads_an_index_on_s3_at_twice_its_bytes_not_three_times(s3, tmp_path):
    """The same load from an object store: the file is read into faiss's own reader buffer, hashed on the way,
    then the index built from it (was 3x: the bytes, faiss's copy of them, the index). A changed object is refused."""
    import hashlib
    import uuid

    import faiss

    from laiontools.core.errors import UserError

    x = np.random.default_rng(2).standard_normal((60_000, 256)).astype(np.float32)  # 61 MB
    index = faiss.IndexFlatIP(256)
    index.add(x)
    local = tmp_path / "i.faiss"
    faiss.write_index(index, str(local))
    sha = hashlib.sha256(local.read_bytes()).hexdigest()
    bucket = f"lt-{uuid.uuid4().hex[:10]}"
    s3.mkdir(bucket)
    s3.put(str(local), f"{bucket}/dedup/i.faiss")
    url = f"s3://{bucket}/dedup/i.faiss"
    got = DI.read_checked(url, sha, use_gpu=False)
    q = x[:5] + 0.01
    assert np.array_equal(got.search(q, 3)[1], index.search(q, 3)[1]) and got.ntotal == 60_000
    assert index_load_peak(url, sha) < 2.6  # 2.3 here (the reader's buffer, the index, a chunk in flight); was 3.0 and more
    s3.pipe_file(f"{bucket}/dedup/i.faiss", local.read_bytes()[:-1])
    with pytest.raises(UserError, match=rf"^{url} changed since the job started"):
        DI.read_checked(url, sha, use_gpu=False)


def test_calibrate_again_after_the_index_was_rebuilt_attributes_copies_to_the_new_items(tiny, tmp_path):
    """top1_attributed_to_source read the index's row -> item table through a per-process cache keyed by
    its path: a second calibration into the same folder, after the evaluation sets changed and the index was
    rebuilt, matched the copies against the first run's items (0 % attributed for exact copies)."""
    ev2 = tmp_path / "ev2" / "renamed"
    shutil.copytree(tiny["root"] / "ev" / "c0", ev2)
    out = tmp_path / "cal"
    kw = {"embeddings": tiny["emb"], "output": str(out), "plant_items": 2, "pool_sample": 10, "transforms": ["exact"]}
    first = dedup_calibrate.run(CalibrateConfig(evalset=[tiny["evalset"]], **kw)).details
    assert first["top1_attributed_to_source"] == {"exact": 1.0}
    second = dedup_calibrate.run(CalibrateConfig(evalset=[f"ev2={tmp_path / 'ev2'}:imagefolder"], **kw)).details
    items = pd.read_parquet(os.path.join(str(out), "index", "items.parquet"))
    assert set(items["evalset"]) == {"ev2"}  # the index was rebuilt for the new set
    # an exact copy's nearest evaluation image is its source, as in the first run
    assert second["top1_attributed_to_source"] == {"exact": 1.0}

# ----------------------------------------------------------------------------------------------
# Found by a review of the index, the search rule and the gallery.


def test_a_re_run_after_the_evaluation_set_changed_searches_its_new_items(tiny, tmp_path, monkeypatch):
    """The index was reused when index.json named the same evaluation sets by name, path and format, whatever
    the files now there: an image added to the set (a set first copied in half, completed, dedup run again
    into its output) was never embedded, its pool copy never excluded, and the summary still counted the old
    items. A re-run must give what a fresh run gives."""
    monkeypatch.delenv("LAIONTOOLS_SPARK_MASTER", raising=False)
    ev = tmp_path / "ev"
    shutil.copytree(tiny["root"] / "ev", ev)
    spec = [f"ev={ev}:imagefolder"]
    cfg = lambda out: DedupConfig(embeddings=tiny["emb"], evalset=spec, output=str(out), threshold=0.99, k=2)
    stale, fresh = tmp_path / "stale", tmp_path / "fresh"
    first = dedup_stage.run(cfg(stale)).details
    assert first["evalsets"][0]["items"] == 2
    with tarfile.open(os.path.join(tiny["root"], "p", "shards", "00001.tar")) as tf:
        m = next(m for m in tf if m.name.endswith(".jpg"))
        (ev / "c0" / f"added-{m.name}").write_bytes(tf.extractfile(m).read())  # a pool image, now in the set
    want = dedup_stage.run(cfg(fresh)).details
    assert want["evalsets"][0]["items"] == 3 and want["pool_duplicates"] > first["pool_duplicates"]
    got = dedup_stage.run(cfg(stale)).details
    assert got["evalsets"][0]["items"] == 3, got["evalsets"][0]
    assert got["pool_duplicates"] == want["pool_duplicates"]
    assert Path(stale, "exclude.uids.npy").read_bytes() == Path(fresh, "exclude.uids.npy").read_bytes()


def _brute_force_matches(out, emb_dir, thr) -> dict:
    """Per evaluation set, from the index's own vectors and the pool's .npy files with numpy: the pool rows at
    or above `thr` to some item of the set, and the set's items with such a pool row (the summary's figures)."""
    import faiss

    index = faiss.read_index(os.path.join(out, "index", "evalsets.faiss"))
    ev = index.reconstruct_n(0, index.ntotal).astype(np.float64)
    items = pd.read_parquet(os.path.join(out, "index", "items.parquet"))
    items = items[items["row"] >= 0].sort_values("row")
    pool = np.concatenate([np.load(os.path.join(emb_dir, "img_emb", f)).astype(np.float64)
                           for f in sorted(os.listdir(os.path.join(emb_dir, "img_emb"))) if f.endswith(".npy")])
    sims = pool @ ev.T
    assert not (np.abs(sims - thr) < 1e-4).any(), "a similarity too close to the threshold to compare"
    got = {}
    for name in items["evalset"].unique():
        cols = (items["evalset"] == name).to_numpy()
        hit = sims[:, cols] >= thr
        got[name] = {"pool_samples_matched": int(hit.any(axis=1).sum()), "eval_items_matched": int(hit.any(axis=0).sum())}
    return got


def test_a_pool_copy_counts_for_every_evaluation_item_and_set_it_duplicates_beyond_k(tiny, tmp_path, monkeypatch):
    """The per-set figures (pool_samples_matched, eval_items_matched, overlap_percent: the paper's overlap
    table) were counted from the k nearest evaluation items of each pool sample only. A pool image with more
    than k copies among the evaluation items (an image in two sets, a set holding it several times, as
    ImageNet val and CIFAR do) credited only k of them: the other items were counted as not found in the
    pool, and a second set holding the image got 0 % overlap. Compared with numpy brute force."""
    import io

    from PIL import Image

    monkeypatch.delenv("LAIONTOOLS_SPARK_MASTER", raising=False)
    with tarfile.open(os.path.join(tiny["root"], "p", "shards", "00002.tar")) as tf:
        jpg = tf.extractfile(next(m for m in tf if m.name.endswith(".jpg"))).read()
    for i in range(3):  # the pool image three times in set a
        (tmp_path / "a" / "c0").mkdir(parents=True, exist_ok=True)
        (tmp_path / "a" / "c0" / f"copy{i}.jpg").write_bytes(jpg)
    buf = io.BytesIO()
    Image.open(io.BytesIO(jpg)).convert("RGB").save(buf, format="PNG")  # and once in set b, as a PNG
    (tmp_path / "b" / "c0").mkdir(parents=True)
    (tmp_path / "b" / "c0" / "same.png").write_bytes(buf.getvalue())
    out = tmp_path / "d"
    thr = 0.99
    s = dedup_stage.run(DedupConfig(embeddings=tiny["emb"], output=str(out), threshold=thr, k=2,
                                    evalset=[f"a={tmp_path / 'a'}:imagefolder", f"b={tmp_path / 'b'}:imagefolder"])).details
    want = _brute_force_matches(str(out), tiny["emb"], thr)
    assert want["a"]["eval_items_matched"] == 3 and want["b"]["eval_items_matched"] == 1  # the case is as built
    got = {e["evalset"]: {k: e[k] for k in ("pool_samples_matched", "eval_items_matched")} for e in s["evalsets"]}
    assert got == want


def test_a_phash_match_within_the_distance_counts_for_every_item_and_set_in_reach(tiny, tmp_path, monkeypatch):
    """--phash-max-distance: each pool hash was matched to its one nearest evaluation hash only, so an item of
    another set within the distance (the same photo, recompressed, in a second set) was never counted: its
    set's phash_overlap_percent said 0. Compared with imagehash Hamming distances computed here."""
    import io

    import imagehash
    from PIL import Image

    monkeypatch.delenv("LAIONTOOLS_SPARK_MASTER", raising=False)
    d = 4
    with tarfile.open(os.path.join(tiny["root"], "p", "shards", "00002.tar")) as tf:
        pool_imgs = {m.name: tf.extractfile(m).read() for m in tf if m.name.endswith(".jpg")}
    jpg = pool_imgs[min(pool_imgs)]
    (tmp_path / "a" / "c0").mkdir(parents=True)
    (tmp_path / "a" / "c0" / "copy.jpg").write_bytes(jpg)  # the pool image, byte for byte
    src = Image.open(io.BytesIO(jpg)).convert("RGB")
    near = None
    for q in range(90, 4, -5):  # the same image recompressed until its pHash is a few bits off
        buf = io.BytesIO()
        src.save(buf, format="JPEG", quality=q)
        if 1 <= imagehash.phash(Image.open(io.BytesIO(buf.getvalue()))) - imagehash.phash(src) <= d:
            near = buf.getvalue()
            break
    assert near is not None
    (tmp_path / "b" / "c0").mkdir(parents=True)
    (tmp_path / "b" / "c0" / "recompressed.jpg").write_bytes(near)
    s = dedup_stage.run(DedupConfig(embeddings=tiny["emb"], output=str(tmp_path / "d"), threshold=0.999, k=2, phash=True,
                                    phash_max_distance=d, eval_geometry="none", gallery_pairs=0,
                                    evalset=[f"a={tmp_path / 'a'}:imagefolder", f"b={tmp_path / 'b'}:imagefolder"])).details
    pool_h = []
    for tar in sorted(os.listdir(os.path.join(tiny["root"], "p", "shards"))):
        with tarfile.open(os.path.join(tiny["root"], "p", "shards", tar)) as tf:
            pool_h += [imagehash.phash(Image.open(tf.extractfile(m)).convert("RGB")) for m in tf if m.name.endswith(".jpg")]
    want = {}
    for name in ("a", "b"):
        ev_h = [imagehash.phash(Image.open(p).convert("RGB")) for p in sorted((tmp_path / name / "c0").iterdir())]
        within = np.array([[ph - eh <= d for eh in ev_h] for ph in pool_h])
        want[name] = {"phash_pool_samples_matched": int(within.any(axis=1).sum()), "phash_eval_items_matched": int(within.any(axis=0).sum())}
    assert want["a"]["phash_eval_items_matched"] == want["b"]["phash_eval_items_matched"] == 1  # the case is as built
    got = {e["evalset"]: {k: e[k] for k in ("phash_pool_samples_matched", "phash_eval_items_matched")} for e in s["evalsets"]}
    assert got == want

# ----------------------------------------------------------------------------------------------
# Found by a review of what dedup reports and how a user picks its threshold.


def test_is_duplicate_is_similarity_at_or_above_the_threshold_as_the_report_stores_it(tiny, tmp_path, monkeypatch):
    """Similarities are float32 and were compared with the threshold in float32: a threshold is rounded to
    the nearest float32 first (float32(0.9) = 0.8999999762 < 0.9), so a pool sample whose similarity is that
    rounded value was is_duplicate (counted, excluded) though the report's similarity is under the threshold,
    and calibrate (float64) counted the same negative as not flagged. Checked from the report parquet."""
    monkeypatch.delenv("LAIONTOOLS_SPARK_MASTER", raising=False)
    out = tmp_path / "d"
    dedup_stage.run(_tiny_cfg(tiny, out, gallery_pairs=0))
    sims = np.sort(pd.read_parquet(out / "report")["similarity"].to_numpy(np.float32))
    gaps = np.minimum(np.diff(sims, prepend=-2), np.diff(sims, append=2))
    s32 = sims[np.argmax(gaps)]  # a similarity well apart from the others
    thr = float(s32) + float(np.spacing(s32)) / 4  # just above it, yet the same float32
    assert np.float32(thr) == s32 and thr > float(s32)
    s = dedup_stage.run(DedupConfig(embeddings=tiny["emb"], evalset=[tiny["evalset"]], output=str(out), threshold=thr, k=2,
                                    gallery_pairs=0)).details
    rep = pd.read_parquet(out / "report")
    want = rep["similarity"].astype("float64") >= thr
    assert (rep["similarity"] == s32).sum() == 1  # the case is as built: one sample sits just under the threshold
    assert (rep["is_duplicate"] == want).all(), rep.loc[rep["is_duplicate"] != want, ["uid", "similarity", "is_duplicate"]]
    assert s["pool_duplicates"] == int(want.sum()) == s["evalsets"][0]["pool_samples_matched"]
    assert s["excluded"] == len(load_uids(str(out / "exclude.uids.npy"))) == int(want.sum())


def test_calibrate_excluding_known_copies_on_a_pool_with_a_uid_less_row(tmp_path):
    """--exclude-uids looked up the uid of every row of a sampled shard, failed rows included: a pool sample
    whose .json is unreadable (embed keeps it as a failed row with a null uid) made calibrate fail, after
    embedding every planted copy, with "uid None ... is not 32 hex chars; the catalog or uid list is corrupt"."""
    from laiontools.stages import embed as embed_stage
    from laiontools.stages.embed import EmbedConfig
    from laiontools.testing.embed_pool import write_pool

    manifest = write_pool(str(tmp_path / "p"), 1, 6, image_size=32)
    shard = os.path.join(os.path.dirname(manifest), "shards", "00000.tar")
    old = _rewrite_tar(shard, lambda name, data: (name, b"[1, 2, 3]" if name == "000000001.json" else data))
    (tmp_path / "ev" / "c0").mkdir(parents=True)
    (tmp_path / "ev" / "c0" / "copy.jpg").write_bytes(old["000000002.jpg"])  # a pool image is in the evaluation set
    emb = str(tmp_path / "emb")
    embed_stage.run(EmbedConfig(manifest=manifest, output=emb, model="lt-tiny", num_workers=0, verify_shards=False))
    copy_uid = json.loads(old["000000002.json"])["uid"]
    known = str(tmp_path / "known.uids.npy")
    save_uids(known, [copy_uid])
    res = dedup_calibrate.run(CalibrateConfig(embeddings=emb, evalset=[f"ev={tmp_path / 'ev'}:imagefolder"],
                                              output=str(tmp_path / "cal"), plant_items=1, pool_sample=10,
                                              transforms=["exact"], exclude_uids=known)).details
    meta = pd.read_parquet(os.path.join(emb, "meta", "00000.parquet"))
    assert meta["uid"].isna().sum() == 1  # the case is as built
    want = set(meta.loc[(meta["embed_status"] == "ok") & (meta["uid"] != copy_uid), "uid"])
    assert res["negatives"] == len(want) == 4
    assert {h["uid"] for h in res["highest_negatives"]} == want


def test_a_re_run_without_a_gallery_leaves_no_gallery_of_another_threshold(tiny, tmp_path, monkeypatch):
    """A re-run into the same output with --gallery-pairs 0 kept the earlier run's gallery.html: the file a person
    opens to judge the threshold showed another threshold's pairs beside a summary of the new one."""
    monkeypatch.delenv("LAIONTOOLS_SPARK_MASTER", raising=False)
    out = tmp_path / "d"
    dedup_stage.run(_tiny_cfg(tiny, out, gallery_pairs=4))
    assert (out / "gallery.html").exists()
    res = dedup_stage.run(DedupConfig(embeddings=tiny["emb"], evalset=[tiny["evalset"]], output=str(out), threshold=0.95,
                                      k=2, gallery_pairs=0))
    assert not (out / "gallery.html").exists()
    assert "gallery" not in res.outputs and "gallery.html" not in res.summary


def test_a_dedup_run_in_process_reads_and_hashes_its_index_file_at_most_twice(tiny, tmp_path, monkeypatch):
    """The evaluation index was hashed when built or checked (prepare_index), then the search read the file
    again and hashed it again to load it (~3 s a pass for 1.5M evaluation images). Counted on the real local
    file system, the bytes of evalsets.faiss read: none by a run that builds it (the search takes the index
    built). A run that reuses it reads it twice: its check, then the load's (index.read_checked), which holds no
    copy of the bytes beside the index. Keeping the checked bytes for the load saved that pass, and held three
    copies at once (test_a_search_worker_loads_the_index_without_holding_its_bytes_beside_it)."""
    from fsspec.implementations import local

    from laiontools import index as DI

    monkeypatch.delenv("LAIONTOOLS_SPARK_MASTER", raising=False)
    monkeypatch.setattr(DI, "_CACHE", {})  # as a new process: no index loaded
    read = {"bytes": 0}
    real_read = local.LocalFileOpener.read

    def counting_read(self, *a, **k):
        data = real_read(self, *a, **k)
        if os.path.basename(str(self.path)) == "evalsets.faiss":
            read["bytes"] += len(data)
        return data

    monkeypatch.setattr(local.LocalFileOpener, "read", counting_read)
    out = tmp_path / "d"
    first = dedup_stage.run(_tiny_cfg(tiny, out)).details
    size = os.path.getsize(out / "index" / "evalsets.faiss")
    assert read["bytes"] == 0
    _new_process_and_unfinished_shards(out)
    again = dedup_stage.run(_tiny_cfg(tiny, out)).details
    assert read["bytes"] == 2 * size > 0
    assert again["pool_duplicates"] == first["pool_duplicates"]


def test_a_re_run_whose_shards_are_all_searched_loads_no_index(tiny, tmp_path, monkeypatch):
    """In process, dedup loaded the index it had just checked before its search, whether or not a shard was
    left to search: a re-run of a finished dedup (every shard marked) read the whole index file into memory
    and loaded it (a GPU index onto the GPU), where the search of no shard loads none. Now it loads none; a
    run with shards left still loads the index once."""
    from laiontools import index as DI

    monkeypatch.delenv("LAIONTOOLS_SPARK_MASTER", raising=False)
    monkeypatch.setattr(DI, "_CACHE", {})
    out = tmp_path / "d"
    first = dedup_stage.run(_tiny_cfg(tiny, out)).details
    DI._CACHE.clear()  # as a new process
    dedup_stage._LOOKUPS.clear()
    again = dedup_stage.run(_tiny_cfg(tiny, out)).details
    assert not DI._CACHE, "a run with no shard to search loaded the index"
    assert again["pool_duplicates"] == first["pool_duplicates"]
    _new_process_and_unfinished_shards(out)
    dedup_stage.run(_tiny_cfg(tiny, out))
    assert len(DI._CACHE) == 1


# ----------------------------------------------------------------------------------------------
# Found by a review of repeated reads (each a round trip on an object store).


def _count_opens(monkeypatch, names: tuple[str, ...]) -> dict[str, int]:
    """Opens of the files named `names` by this process, counted on the real local file system."""
    from fsspec.implementations import local

    opened = dict.fromkeys(names, 0)
    real_open = local.LocalFileSystem._open

    def counting_open(self, path, *a, **k):
        name = os.path.basename(str(path))
        if name in opened:
            opened[name] += 1
        return real_open(self, path, *a, **k)

    monkeypatch.setattr(local.LocalFileSystem, "_open", counting_open)
    return opened


def test_a_dedup_run_in_process_reads_its_items_file_once(tiny, tmp_path, monkeypatch):
    """The evaluation items file (index/items.parquet) was hashed when checked against index.json, read again
    for the search's lookups, and a third time for the summary. Now a run that builds the index reads none
    of it (its bytes are at hand), one that reuses it reads it once (checked, then parsed from those bytes);
    the same outputs."""
    monkeypatch.delenv("LAIONTOOLS_SPARK_MASTER", raising=False)
    monkeypatch.setattr(DI, "_CACHE", {})
    monkeypatch.setattr(dedup_stage, "_LOOKUPS", {})  # as a new process: nothing loaded
    opened = _count_opens(monkeypatch, ("items.parquet",))
    out = tmp_path / "d"
    first = dedup_stage.run(_tiny_cfg(tiny, out)).details
    assert opened["items.parquet"] == 0
    excluded = (out / "exclude.uids.npy").read_bytes()
    _new_process_and_unfinished_shards(out)
    again = dedup_stage.run(_tiny_cfg(tiny, out)).details
    assert opened["items.parquet"] == 1
    assert (out / "exclude.uids.npy").read_bytes() == excluded

    def kept(d: dict) -> dict:  # without timings and memory
        return {k: v for k, v in d.items() if not k.endswith(("seconds", "rss_mb"))}

    assert kept(again) == kept(first) and first["evalsets"]


def test_a_changed_items_file_is_refused_by_a_search_that_reads_it(tiny, tmp_path, monkeypatch):
    """A search that reads the items file itself (a Spark worker) checks it against index.json's sha256, as it
    checks the index file: the lookups were built from whatever bytes were there."""
    from laiontools.core.errors import UserError

    monkeypatch.delenv("LAIONTOOLS_SPARK_MASTER", raising=False)
    out = tmp_path / "d"
    dedup_stage.run(_tiny_cfg(tiny, out))
    idx = DI.read_index_json(str(out))
    items = out / "index" / "items.parquet"
    dedup_stage._LOOKUPS.clear()
    lk = dedup_stage._lookups(str(items), idx["items_sha256"], [e["name"] for e in idx["evalsets"]])
    assert len(lk.row_set) == idx["ntotal"]
    t = pd.read_parquet(items)
    t["item_id"] = t["item_id"].iloc[::-1].to_numpy()  # a valid items file of other items: used silently before
    t.to_parquet(items)
    dedup_stage._LOOKUPS.clear()
    with pytest.raises(UserError, match="items.parquet changed since the job started"):
        dedup_stage._lookups(str(items), idx["items_sha256"], [e["name"] for e in idx["evalsets"]])
    dedup_stage._LOOKUPS.clear()


def test_calibrate_reads_its_index_and_items_files_at_most_twice(tiny, tmp_path, monkeypatch):
    """dedup calibrate hashed the index and items files when it built or checked them, then read both again,
    unchecked, to search and to attribute copies. Now it uses what it built: none read by a run that builds
    them. A run that reuses them reads the items once (their checked bytes) and the index twice: its check,
    then the load's (index.read_checked), which holds no copy of the bytes beside the index; the same result."""
    opened = _count_opens(monkeypatch, ("evalsets.faiss", "items.parquet"))
    kw = {"embeddings": tiny["emb"], "output": str(tmp_path / "cal"), "plant_items": 2, "pool_sample": 10, "transforms": ["exact"]}
    first = dedup_calibrate.run(CalibrateConfig(evalset=[tiny["evalset"]], **kw)).details
    assert opened == {"evalsets.faiss": 0, "items.parquet": 0}
    again = dedup_calibrate.run(CalibrateConfig(evalset=[tiny["evalset"]], **kw)).details
    assert opened == {"evalsets.faiss": 2, "items.parquet": 1}
    assert again["top1_attributed_to_source"] == first["top1_attributed_to_source"] == {"exact": 1.0}


def test_on_spark_the_reports_take_the_sessions_parquet_codec(tiny, spark, tmp_path):
    """The per-shard reports the Spark search tasks write through pyarrow are compressed with the session's
    spark.sql.parquet.compression.codec, as Spark's own writer's files are (they were zstd whatever it said)."""
    import pyarrow.parquet as pq

    from laiontools.contracts import layout

    key = "spark.sql.parquet.compression.codec"
    before = spark.conf.get(key)
    spark.conf.set(key, "snappy")
    try:
        res = dedup_stage.run(_tiny_cfg(tiny, tmp_path / "d"), spark)
    finally:
        spark.conf.set(key, before)
    assert res.details["search_engine"].startswith("spark ")
    files = sorted((tmp_path / "d" / layout.DEDUP_REPORT_DIR).glob("*.parquet"))
    assert len(files) == 3 and {pq.ParquetFile(f).metadata.row_group(0).column(c).compression
                                for f in files for c in range(pq.ParquetFile(f).metadata.num_columns)} == {"SNAPPY"}
