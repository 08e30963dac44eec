"""`laiontools demo` end to end, scaled down: every stage through the contracts between them."""

from __future__ import annotations

import os

import numpy as np
import pandas as pd
import pytest

from laiontools.contracts.manifest import read_manifest, resolve
from laiontools.contracts.uids import load_uids


@pytest.mark.slow
def test_demo_runs_every_stage_and_writes_one_report(tmp_path, capsys):
    from laiontools.stages.demo import main

    out = tmp_path / "demo"
    rc = main(["--output", str(out), "--n", "120", "--scale-factor", "2.5e-8", "--samples-seen", "32", "64",
               "--batch-size", "16", "--nproc", "1"])
    assert rc == 0
    printed = capsys.readouterr().out
    assert "REPORT" in printed and str(out / "report.html") in printed

    # nested subsets of exact sizes, each inside the next larger one
    sizes = {}
    uids = {}
    for scale in ("80M", "400M", "2B"):
        m_path = str(out / "subsets" / f"{scale}.manifest.json")
        m = read_manifest(m_path)
        sizes[scale] = m["num_samples"]
        uids[scale] = set(load_uids(resolve(m_path, m["uids"]["path"])).tolist())
    assert sizes == {"80M": 2, "400M": 10, "2B": 50}
    assert uids["80M"] <= uids["400M"] <= uids["2B"]
    # decontamination excluded something, and nothing excluded was selected
    excluded = set(load_uids(str(out / "dedup" / "exclude.uids.npy")).tolist())
    assert excluded and not (excluded & uids["2B"])

    # every scale trained for the same budgets; the fit and the report exist
    res = pd.read_csv(out / "study" / "results.csv")
    # 3 scales x 2 budgets, plus a second seed (the default --seeds 2) of each scale at the largest budget
    assert len(res) == 9 and set(res["scale"]) == {"80M", "400M", "2B"}
    assert sorted(res[res["seed"] == 1]["scale"]) == ["2B", "400M", "80M"] and (res[res["seed"] == 1]["samples_seen"] == 64).all()
    assert (res.groupby("samples_seen")["steps"].nunique() == 1).all()
    assert np.isfinite(res["final_loss"]).all()
    html = (out / "report.html").read_text()
    for section in ("1. Download", "2. Decontamination", "3. Nested subsets", "4. Training", "Data scale at a fixed budget",
                    "The synthetic world"):
        assert section in html
    assert os.path.exists(out / "dedup" / "gallery.html")


def test_heldout_set_is_labelled_by_background_and_in_the_pool_geometry(tmp_path):
    """The held-out set's labels are each item's background colour (drawn independently here from the
    world's renderer), its prompts are the captions' background phrases, and its images went through the
    pool's resize (border, 96 px: every image square at 96 px, whatever the rendered size)."""
    import io

    from PIL import Image

    from laiontools.stages.demo import HELDOUT_START, write_heldout_evalset
    from laiontools.synthetic import render_item
    from laiontools.synthetic.images import COLOURS
    from laiontools.web.resize import PoolGeometry

    geo = PoolGeometry({"image_size": 96, "resize_mode": "border"})
    path = write_heldout_evalset(str(tmp_path / "h"), 12, seed=7, geometry=geo)
    df = pd.read_parquet(path)
    want = [list(COLOURS).index(render_item(HELDOUT_START + k, seed=7)[2]["background"]) for k in range(12)]
    assert df["label"].tolist() == want
    assert (tmp_path / "h" / "classnames.txt").read_text().split() == list(COLOURS)
    templates = (tmp_path / "h" / "zeroshot_classification_templates.txt").read_text().splitlines()
    assert templates == ["a plain {c} background", "a noisy {c} background", "a {c} gradient background",
                         "a {c} checkered background"]
    sizes = {Image.open(io.BytesIO(b)).size for b in df["image"]}
    assert sizes == {(96, 96)}
    raw = {render_item(HELDOUT_START + k, seed=7)[0].size for k in range(12)}
    assert raw != {(96, 96)}  # the renderer's sizes vary (96-160 px): the resize really ran


def test_finding_1_verdict():
    from laiontools.stages.demo import finding_1

    assert finding_1(4, {"alpha": -0.24, "alpha_se": 0.085}) == "yes"  # -0.24 + 0.17 < 0
    assert finding_1(4, {"alpha": -0.24, "alpha_se": 0.13}) == "no"  # -0.24 + 0.26 > 0
    assert finding_1(3, {"alpha": -0.5, "alpha_se": 0.01}) == "no"  # too few frontier points
    assert finding_1(5, {"alpha": 0.1, "alpha_se": 0.01}) == "no"
    assert finding_1(5, {}) == "no fit"
