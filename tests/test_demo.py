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
