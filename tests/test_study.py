"""`laiontools study`: fit maths on exact data, and a real (tiny) grid killed and resumed."""

from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import sys
import time

import pandas as pd
import pytest
import yaml

from laiontools.core.config import ConfigError
from laiontools.core.storage import is_done
from laiontools.stages import study as study_stage
from laiontools.stages.study import (
    StudyConfig,
    fit_power_law,
    model_gmacs,
    pareto_frontier,
    predict,
)
from laiontools.testing.train_pool import write_color_evalset, write_resharded_subset


def test_frontier_and_fit_recover_a_power_law() -> None:
    alpha, beta = -0.3, 2.0
    cs = [1e3, 1e4, 1e5, 1e6]
    es = [beta * c**alpha for c in cs]
    # dominated runs (more compute, worse error) must not enter the fit
    compute = cs + [2e4, 3e5]
    error = es + [0.9, 0.5]
    front = pareto_frontier(compute, error)
    assert front == [0, 1, 2, 3]
    fit = fit_power_law([compute[i] for i in front], [error[i] for i in front])
    assert fit["alpha"] == pytest.approx(alpha, abs=1e-9) and fit["beta"] == pytest.approx(beta, rel=1e-9)
    assert fit["alpha_se"] < 1e-9 and fit["r2"] == pytest.approx(1.0)
    p = predict(fit, 1e8)
    assert p["error"] == pytest.approx(beta * 1e8**alpha, rel=1e-9)
    # with noise the standard error is positive and covers the truth
    noisy = [e * f for e, f in zip(es, (1.05, 0.96, 1.03, 0.98))]
    fit = fit_power_law(cs, noisy)
    assert fit["alpha_se"] > 0 and abs(fit["alpha"] - alpha) < 3 * fit["alpha_se"]
    assert fit["beta_se"] > 0
    p = predict(fit, 1e8)
    assert p["error_lo"] < p["error"] < p["error_hi"]
    # two points: a fit, but no standard error
    fit = fit_power_law(cs[:2], es[:2])
    assert math.isnan(fit["alpha_se"]) and fit["alpha"] == pytest.approx(alpha)
    with pytest.raises(ValueError):
        fit_power_law([1e3, 1e3], [0.5, 0.4])


def test_gmacs_counted() -> None:
    tiny, small = model_gmacs("lt-tiny"), model_gmacs("lt-small")
    assert tiny["image_gmacs"] > 0 and tiny["text_gmacs"] > 0
    assert small["gmacs_per_sample"] > 4 * tiny["gmacs_per_sample"]  # lt-small: 2x wider, 2x deeper, 4x the patches
    # lt-tiny image tower: the patch embedding alone is 16 patches x (16*16*3) x width 64 MACs
    assert tiny["image_gmacs"] > 16 * 768 * 64 / 1e9


def test_bad_study_config(tmp_path) -> None:
    with pytest.raises(ConfigError, match="smaller than one global batch"):
        StudyConfig(output=str(tmp_path), scales={"a": "x"}, samples_seen=[8], models=["lt-tiny"], batch_size=16, evalset=["e=x"])
    with pytest.raises(ConfigError, match="may not set"):
        StudyConfig(output=str(tmp_path), scales={"a": "x"}, samples_seen=[32], models=["lt-tiny"], batch_size=16,
                    evalset=["e=x"], train={"samples_seen": 5})  # fmt: skip
    with pytest.raises(ConfigError, match="unknown `train` setting"):
        StudyConfig(output=str(tmp_path), scales={"a": "x"}, samples_seen=[32], models=["lt-tiny"], batch_size=16,
                    evalset=["e=x"], train={"learning-rate": 0.1})  # fmt: skip
    cfg = StudyConfig(output=str(tmp_path), scales={"a": "x"}, samples_seen=["1e3"], models=["lt-tiny"], batch_size=16,
                      evalset=["e=x"], train={"log-every": 5})  # fmt: skip
    assert cfg.samples_seen == [1000] and cfg.train == {"log_every": 5}


@pytest.mark.slow
def test_study_grid_killed_and_resumed(tmp_path) -> None:
    data = tmp_path / "data"
    small = write_resharded_subset(str(data / "s16"), n_shards=1, per_shard=16, name="s16")
    large = write_resharded_subset(str(data / "s32"), n_shards=2, per_shard=16, seed=1, name="s32")
    ev = write_color_evalset(str(data / "colors"), per_class=2)["path"]
    out = str(tmp_path / "study")
    cfg = {
        "output": out,
        "scales": {"16": small, "32": large},
        "samples_seen": [16, 32],
        "models": ["lt-tiny"],
        "batch_size": 8,
        "nproc": 1,
        "evalset": [f"colors={ev}:wds"],
        "train": {"workers": 0, "log_every": 1, "lr": 0.001},
        "evaluate": {"batch_size": 16},
    }
    cfg_path = tmp_path / "study.yaml"
    cfg_path.write_text(yaml.safe_dump(cfg))

    first = os.path.join(out, "runs", "lt-tiny__16__16")
    proc = subprocess.Popen(
        [sys.executable, "-m", "laiontools", "study", "--config", str(cfg_path)],
        start_new_session=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )  # fmt: skip
    deadline = time.time() + 400
    try:
        while not is_done(os.path.join(first, "eval.json")):
            assert proc.poll() is None, f"study exited early with {proc.returncode}"
            assert time.time() < deadline, "first grid point not finished within 400 s"
            time.sleep(0.2)
    finally:
        os.killpg(proc.pid, signal.SIGKILL)  # kill the study we started (and its training, if any)
        proc.wait()
    eval_mtime = os.path.getmtime(os.path.join(first, "eval.json"))
    time.sleep(2)  # let ranks of a killed training exit (they die with their parent)

    res = study_stage.run(StudyConfig(**cfg)).details
    # the finished point was skipped: trained once, evaluated once
    assert len(open(os.path.join(first, "train", "launches.jsonl")).readlines()) == 1
    assert os.path.getmtime(os.path.join(first, "eval.json")) == eval_mtime

    df = pd.read_csv(os.path.join(out, "results.csv"))
    assert len(df) == 4 and set(df["scale"].astype(str)) == {"16", "32"}
    assert sorted(df["samples_seen"]) == [16, 16, 32, 32]
    assert (df["compute_gmacs"] == df["gmacs_per_sample"] * df["samples_seen"]).all()
    assert df["final_loss"].map(math.isfinite).all()
    # same budget -> same steps whatever the subset size
    assert df.groupby("samples_seen")["steps"].nunique().eq(1).all()
    assert "colors/zeroshot_top1" in df.columns and "colors/image_to_text_R@5" in df.columns

    fits = json.load(open(os.path.join(out, "fits.json")))["fits"]
    assert set(fits) == {"colors/zeroshot_top1", "colors/image_to_text_R@5", "colors/text_to_image_R@5"}
    for e in fits.values():
        assert e["frontier"], "a frontier has at least the best run at the smallest compute"
        assert (e["fit"] and math.isfinite(e["fit"]["alpha"]) and e["predictions"]) or e["why_no_fit"]
    for rel in res["plots"].values():
        with open(os.path.join(out, rel), "rb") as f:
            assert f.read(8) == b"\x89PNG\r\n\x1a\n"
    page = open(res["report"]).read()
    assert "colors/zeroshot_top1" in page and "plots/" in page and "lt-tiny__32__32" in page
