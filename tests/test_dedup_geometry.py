"""Decontamination compares like with like: evaluation images go through the pool's own geometry.

A downloaded pool stores its images resized by img2dataset (``border`` letterboxes, ``center_crop`` cuts,
``keep_ratio`` rescales); pool copies of non-square evaluation images only match once the evaluation
images get the same resize. Pools here are written through the download's own resizer
(:mod:`laiontools.testing.planted_pool`), embedded by the embed stage (lt-tiny, random init), and the
threshold comes from `dedup calibrate`, never guessed. Spark local[2], faiss, real pHash.
"""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from laiontools.contracts.uids import save_uids
from laiontools.stages import dedup, dedup_calibrate
from laiontools.stages.dedup import DedupConfig
from laiontools.stages.dedup_calibrate import CalibrateConfig

EASY = ("exact", "reencode", "resize")


def _stem(item_id: str | None) -> str | None:
    """ImageFolder item id ("wide/e0.jpg") -> the name the test gave the image ("e0")."""
    return None if item_id is None else item_id.rsplit("/", 1)[-1].rsplit(".", 1)[0]


def _report(out: str) -> pd.DataFrame:
    import os

    return pd.read_parquet(os.path.join(out, "report"))


# ---------------------------------------------------------------------------------------------
# Like with like: non-square evaluation images against pool copies stored through the pool's resize

GEOMETRY_MODES = ("border", "center_crop", "keep_ratio", "no")
COPY_KINDS_GEO = ("reencode", "resize")
PHASH_D = 8  # measured: copies in the pool's geometry land 0-6 bits from their source, unrelated images 14+


@pytest.fixture(scope="module")
def nonsquare_evalset(tmp_path_factory) -> tuple[str, list]:
    """An ImageFolder of 8 photo-like images, half 96x48 and half 48x96 (two classes)."""
    from laiontools.testing.planted_pool import photo

    root = tmp_path_factory.mktemp("nonsquare")
    imgs = []
    for i in range(8):
        img = photo(100 + i, (96, 48) if i % 2 == 0 else (48, 96))
        cls = root / ("wide" if i % 2 == 0 else "tall")
        cls.mkdir(exist_ok=True)
        img.save(cls / f"e{i}.jpg", quality=95)
        imgs.append((f"e{i}", img))
    return str(root), imgs


@pytest.fixture(scope="module", params=GEOMETRY_MODES)
def geometry_pool(request, nonsquare_evalset, spark, tmp_path_factory) -> dict:
    """A pool in one resize mode (64 px) holding 40 unrelated photos and a re-encoded and a resized copy of
    every evaluation image, all stored through the download's own resizer; embedded, calibrated and deduped."""
    from laiontools.stages import embed as embed_stage
    from laiontools.stages.embed import EmbedConfig
    from laiontools.testing.planted_pool import download_settings, jpeg, near_copy, photo, write_resized_pool

    mode = request.param
    evdir, evals = nonsquare_evalset
    base = tmp_path_factory.mktemp(f"geo_{mode}")
    rng = np.random.default_rng(7)
    samples = [{"bytes": jpeg(photo(i)), "caption": f"photo {i}", "url": f"http://127.0.0.2/{i}.jpg"} for i in range(40)]
    copies = []
    for item, img in evals:
        for kind in COPY_KINDS_GEO:
            samples.append({"bytes": near_copy(img, kind, rng), "caption": f"{item} {kind}", "url": f"http://127.0.0.3/{item}-{kind}.jpg"})
            copies.append((item, kind))
    manifest, uids = write_resized_pool(str(base / "pool"), samples, download_settings(mode, 64), per_shard=30)
    emb = str(base / "emb")
    embed_stage.run(EmbedConfig(manifest=manifest, output=emb, model="lt-tiny", num_workers=0, batch_size=32))
    planted = pd.DataFrame({"uid": uids[40:], "eval_item": [c[0] for c in copies], "kind": [c[1] for c in copies]})
    known = str(base / "planted.uids.npy")
    save_uids(known, list(planted["uid"]))
    cal = dedup_calibrate.run(CalibrateConfig(embeddings=emb, evalset=[f"ns={evdir}"], output=str(base / "cal"), plant_items=8,
                                        pool_sample=40, exclude_uids=known, transforms=list(EASY))).details
    thr = cal["recommendation"]["threshold"]
    runs = {}
    for geo in ("pool", "none"):
        out = str(base / f"dedup_{geo}")
        summary = dedup.run(DedupConfig(embeddings=emb, evalset=[f"ns={evdir}"], output=out, threshold=thr if thr is not None else 1.0,
                                        phash=True, phash_max_distance=PHASH_D, k=1, eval_geometry=geo), spark).details
        runs[geo] = {"summary": summary, "report": _report(out).merge(planted, on="uid", how="left")}
    return {"mode": mode, "calibrate": cal, "threshold": thr, "runs": runs, "planted": planted}


def test_nonsquare_copies_found_in_pool_geometry(geometry_pool):
    """Every copy of a non-square evaluation image is found, by embedding and by pHash, under every resize mode."""
    g = geometry_pool
    cal = g["calibrate"]
    assert cal["eval_geometry"]["mode"] == "pool" and cal["eval_geometry"]["settings"]["resize_mode"] == g["mode"]
    assert g["threshold"] is not None, cal["recommendation"]
    run = g["runs"]["pool"]
    assert run["summary"]["eval_geometry"]["settings"]["image_size"] == 64
    rep = run["report"]
    copies, others = rep[rep["kind"].notna()], rep[rep["kind"].isna()]
    assert len(copies) == 16 and len(others) == 40
    missed = copies[~copies["is_duplicate"]]
    assert missed.empty, f"{g['mode']}: copies missed at threshold {g['threshold']}:\n{missed[['eval_item', 'kind', 'similarity']]}"
    assert (copies["nearest_item_id"].map(_stem) == copies["eval_item"]).all()
    assert (copies["phash_item_id"].map(_stem) == copies["eval_item"]).all(), copies[["eval_item", "kind", "phash_item_id"]]
    assert not others["is_duplicate"].any() and others["phash_item_id"].isna().all()


def test_nonsquare_copies_missed_without_pool_geometry(geometry_pool):
    """The defect the geometry fixes, reproduced: letterboxed copies escape the embedding search and
    letterboxed or cropped copies escape pHash when evaluation images are compared as read."""
    g = geometry_pool
    rep = g["runs"]["none"]["report"]
    assert g["runs"]["none"]["summary"]["eval_geometry"] == {"mode": "none", "reason": "--eval-geometry none"}
    copies = rep[rep["kind"].notna()]
    if g["mode"] == "border":
        assert not copies["is_duplicate"].all(), "border copies were all found without the pool geometry"
    if g["mode"] in ("border", "center_crop"):
        assert copies["phash_item_id"].isna().all()  # 14+ bits away as measured


def test_eval_geometry_follows_subset_parents(tmp_path):
    """A subset manifest has no download settings of its own: they come from its pool through `parent.path`."""
    from laiontools.contracts.manifest import download_settings, new_manifest, write_manifest
    from laiontools.testing.planted_pool import download_settings as settings_for

    pool_dir = tmp_path / "pool"
    pool_dir.mkdir()
    fp = "0" * 64
    uids = {"path": "u.npy", "sha256": fp, "count": 0}
    s = settings_for("center_crop", 96)
    write_manifest(str(pool_dir / "pool.manifest.json"), new_manifest(
        name="p", kind="pool", num_samples=0, target_samples=None, uids=uids, shards=[], source_fingerprint=fp,
        download={"settings": s}))
    sub = tmp_path / "subsets"
    sub.mkdir()
    write_manifest(str(sub / "a.manifest.json"), new_manifest(
        name="a", kind="subset", num_samples=0, target_samples=0, uids=uids, shards=[], source_fingerprint=fp,
        parent={"name": "p", "sha256": fp, "path": "../pool/pool.manifest.json"}))
    write_manifest(str(sub / "b.manifest.json"), new_manifest(
        name="b", kind="subset", num_samples=0, target_samples=0, uids=uids, shards=[], source_fingerprint=fp,
        parent={"name": "a", "sha256": fp, "path": "a.manifest.json"}))
    assert download_settings(str(sub / "b.manifest.json")) == s
    write_manifest(str(sub / "c.manifest.json"), new_manifest(
        name="c", kind="subset", num_samples=0, target_samples=0, uids=uids, shards=[], source_fingerprint=fp,
        parent={"name": "x", "sha256": fp, "path": "missing.manifest.json"}))
    assert download_settings(str(sub / "c.manifest.json")) is None


def test_pool_geometry_is_the_download_resize():
    """PoolGeometry gives exactly the pixels the download's resizer stores for the same image."""
    import io

    from PIL import Image

    from laiontools.testing.planted_pool import download_settings, photo
    from laiontools.web.resize import PoolGeometry, make_resizer, resize_params

    img = photo(3, (96, 48))
    for mode, size in (("border", (64, 64)), ("center_crop", (64, 64)), ("keep_ratio", (128, 64)), ("no", (96, 48))):
        s = download_settings(mode, 64)
        buf = io.BytesIO()
        img.save(buf, format="PNG")
        buf.seek(0)
        want = np.asarray(Image.open(io.BytesIO(make_resizer(**resize_params(s))(buf)[0])).convert("RGB"))
        got = PoolGeometry(s)(img)
        assert got.size == size and np.array_equal(np.asarray(got), want), mode
    with pytest.raises(ValueError, match="lack"):
        PoolGeometry({"image_size": 64})
