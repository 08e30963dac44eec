"""laiontools.scaling: known-answer tests of the frontier, the fit, the FLOP counter and the grid plan.

Every expected number here is computed independently of the code under test: by hand (in the
comments), by numpy.polyfit, or by closed-form least squares written out in the test.
"""

from __future__ import annotations

import math

import numpy as np
import pytest

from laiontools.core.errors import UserError
from laiontools.scaling import (
    fit_all,
    fit_power_law,
    load_results_table,
    model_gmacs,
    pareto_frontier,
    parse_count,
    plan_grid,
    predict,
)

ALPHA, BETA = -0.3, 2.0
CS = [1e3, 1e4, 1e5, 1e6, 1e7]
NOISE = [1.05, 0.96, 1.03, 0.98, 1.01]  # fixed multiplicative noise


def test_fit_recovers_the_generating_law_exactly() -> None:
    es = [BETA * c**ALPHA for c in CS]
    fit = fit_power_law(CS, es)
    assert fit["alpha"] == pytest.approx(ALPHA, abs=1e-12)
    assert fit["beta"] == pytest.approx(BETA, rel=1e-12)
    assert fit["alpha_se"] < 1e-12 and fit["r2"] == pytest.approx(1.0)
    assert predict(fit, 1e9)["error"] == pytest.approx(BETA * 1e9**ALPHA, rel=1e-12)
    assert predict(fit, 1e9)["metric"] == pytest.approx(1 - BETA * 1e9**ALPHA, rel=1e-12)
    assert predict(fit, 1e9, kind="error")["metric"] == pytest.approx(BETA * 1e9**ALPHA, rel=1e-12)


def test_fit_standard_errors_match_polyfit_and_closed_form_ols() -> None:
    es = [BETA * c**ALPHA * f for c, f in zip(CS, NOISE)]
    fit = fit_power_law(CS, es)
    x, y = np.log10(CS), np.log10(es)

    # 1. numpy.polyfit with cov=True scales the covariance by residual SS / (n - 2), as an OLS fit does
    (slope, intercept), cov = np.polyfit(x, y, 1, cov=True)
    assert fit["alpha"] == pytest.approx(slope, rel=1e-10)
    assert fit["log10_beta"] == pytest.approx(intercept, rel=1e-10)
    assert fit["alpha_se"] == pytest.approx(math.sqrt(cov[0, 0]), rel=1e-8)

    # 2. closed form: slope = Sxy / Sxx, s^2 = SSR / (n - 2), se(slope) = sqrt(s^2 / Sxx),
    #    se(intercept) = sqrt(s^2 (1/n + xbar^2 / Sxx)); beta = 10^intercept, se by the delta method
    n, xbar, ybar = len(x), x.mean(), y.mean()
    sxx, sxy = ((x - xbar) ** 2).sum(), ((x - xbar) * (y - ybar)).sum()
    b1 = sxy / sxx
    b0 = ybar - b1 * xbar
    s2 = ((y - b0 - b1 * x) ** 2).sum() / (n - 2)
    se_b1, se_b0 = math.sqrt(s2 / sxx), math.sqrt(s2 * (1 / n + xbar**2 / sxx))
    assert fit["alpha"] == pytest.approx(b1, rel=1e-10)
    assert fit["alpha_se"] == pytest.approx(se_b1, rel=1e-8)
    assert fit["beta"] == pytest.approx(10**b0, rel=1e-10)
    assert fit["beta_se"] == pytest.approx(10**b0 * math.log(10) * se_b0, rel=1e-8)
    # the truth is within 3 standard errors, and the fit is not exact
    assert 0 < fit["alpha_se"] and abs(fit["alpha"] - ALPHA) < 3 * fit["alpha_se"]

    # prediction band at x0: log10 E +- sqrt(s^2 (1/n + (x0 - xbar)^2 / Sxx))
    x0 = 9.0
    p = predict(fit, 10**x0)
    half = math.sqrt(s2 * (1 / n + (x0 - xbar) ** 2 / sxx))
    assert math.log10(p["error_hi"]) - math.log10(p["error"]) == pytest.approx(half, rel=1e-8)
    assert math.log10(p["error"]) - math.log10(p["error_lo"]) == pytest.approx(half, rel=1e-8)


def test_fit_needs_two_compute_values() -> None:
    fit = fit_power_law(CS[:2], [BETA * c**ALPHA for c in CS[:2]])  # a line, but no residual for an se
    assert math.isnan(fit["alpha_se"]) and fit["alpha"] == pytest.approx(ALPHA)
    with pytest.raises(ValueError, match="2 points at different compute"):
        fit_power_law([1e3, 1e3], [0.5, 0.4])
    with pytest.raises(ValueError):
        fit_power_law([1e3], [0.5])


def test_frontier_on_a_hand_made_table() -> None:
    #        run:   0     1     2     3     4     5     6     7
    compute = [10, 10, 20, 30, 30, 40, 50, 60]
    error = [0.9, 0.8, 0.85, 0.7, 0.6, 0.6, 0.65, 0.5]
    # by increasing compute, keep a run when its error is below every run of less or equal compute:
    #  C=10: runs 1 (0.8) and 0 (0.9): 1 is kept (best so far 0.8), 0 is not
    #  C=20: run 2 (0.85) > 0.8: no;  C=30: run 4 (0.6) kept, run 3 (0.7) not (4 has the same compute, less error)
    #  C=40: run 5 (0.6) equals the best, not lower: no;  C=50: run 6 (0.65) no;  C=60: run 7 (0.5) kept
    assert pareto_frontier(compute, error) == [1, 4, 7]
    assert pareto_frontier([], []) == []


def test_fit_all_fits_the_frontier_only_and_fails_loudly() -> None:
    rows = [{"run_id": f"r{i}", "compute_gmacs": c, "acc": 1 - BETA * c**ALPHA} for i, c in enumerate(CS)]
    rows += [{"run_id": "dominated", "compute_gmacs": 2e6, "acc": 0.01},  # worse than r3 at more compute
             {"run_id": "missing", "compute_gmacs": 5e6, "acc": float("nan")},
             {"run_id": "perfect", "compute_gmacs": 1e8, "acc": 1.0}]
    e = fit_all(rows, ["acc"])["acc"]
    assert e["frontier"] == ["r0", "r1", "r2", "r3", "r4"]
    assert e["perfect_runs_excluded"] == ["perfect"] and e["n_runs"] == 6  # nan row left out, perfect row excluded
    assert e["fit"]["alpha"] == pytest.approx(ALPHA, abs=1e-9)
    assert [p["compute_gmacs"] for p in e["predictions"]] == [1e9, 1e10]  # 10x and 100x the largest compute (1e8)
    # error-kind values: the same law given as errors
    rows_e = [{"run_id": f"r{i}", "compute_gmacs": c, "err": BETA * c**ALPHA} for i, c in enumerate(CS)]
    assert fit_all(rows_e, ["err"], kind="error")["err"]["fit"]["beta"] == pytest.approx(BETA, rel=1e-9)
    # every run at one compute: no fit, and the reason is recorded
    e = fit_all([{"run_id": "a", "compute_gmacs": 5.0, "acc": 0.5}, {"run_id": "b", "compute_gmacs": 5.0, "acc": 0.4}], ["acc"])["acc"]
    assert e["fit"] is None and "different compute" in e["why_no_fit"] and e["frontier"] == ["a"]  # error 0.5 < 0.6


def test_seed_replicates_are_one_frontier_point_at_their_mean_error() -> None:
    """A study's extra seeds at its largest budget (the same model, scale, samples seen and compute): the
    frontier kept the lowest error there, the luckier seed, so adding a replicate to measure noise made the
    law steeper by chance. Every run's mean error here lies on E = BETA C^ALPHA: the fit is that law."""
    def row(c: float, seed: int, factor: float = 1.0) -> dict:
        return {"run_id": f"m__s__{int(c)}" + (f"__seed{seed}" if seed else ""), "model": "m", "scale": "s",
                "samples_seen": int(c), "seed": seed, "compute_gmacs": c, "acc": 1 - factor * BETA * c**ALPHA}

    rows = [row(c, 0) for c in CS[:2]] + [row(CS[2], 0, 1.1), row(CS[2], 1, 0.9)]
    e = fit_all(rows, ["acc"])["acc"]
    assert e["frontier"] == ["m__s__1000", "m__s__10000", "m__s__100000"]
    assert e["seed_means"] == {"m__s__100000": ["m__s__100000", "m__s__100000__seed1"]}
    assert e["fit"]["alpha"] == pytest.approx(ALPHA, abs=1e-9) and e["fit"]["beta"] == pytest.approx(BETA, rel=1e-9)
    # rows without a seed column are no replicates, whatever they share (one per downstream set, say), nor
    # are rows under one seed twice
    plain = [{k: v for k, v in r.items() if k != "seed"} for r in rows]
    assert fit_all(plain, ["acc"])["acc"]["frontier"] == ["m__s__1000", "m__s__10000", "m__s__100000__seed1"]
    twice = rows[:3] + [{**rows[3], "seed": 0}]
    assert fit_all(twice, ["acc"])["acc"]["frontier"] == ["m__s__1000", "m__s__10000", "m__s__100000__seed1"]


def test_load_results_table_mapping_and_filters(tmp_path) -> None:
    import pandas as pd

    df = pd.DataFrame({
        "model_name": ["B32", "B32", "B16", "B16", "B32"],
        "gmacs_total": [1e3, 1e4, 1e5, 1e6, 1e7],
        "downstream_dataset": ["imagenet1k", "imagenet1k", "imagenet1k", "cifar10", "imagenet1k"],
        "samples_seen": ["3e9", "1.3e10", 3e9, 3e9, 34000000000],
        "acc1": [50.0, 60.0, 70.0, 99.0, 80.0],
    })  # fmt: skip
    path = str(tmp_path / "theirs.csv")
    df.to_csv(path, index=False)
    rows = load_results_table(path, ["compute_gmacs=gmacs_total,model=model_name"], ["downstream_dataset=imagenet1k"])
    assert [r["compute_gmacs"] for r in rows] == [1e3, 1e4, 1e5, 1e7]
    assert [r["model"] for r in rows] == ["B32", "B32", "B16", "B32"]
    assert rows[0]["run_id"] == "B32__3000000000"  # made from model / samples_seen
    # numbers compare as numbers: 3e9 == 3000000000; != keeps the rest
    rows = load_results_table(path, ["compute_gmacs=gmacs_total"], ["samples_seen=3000000000", "model_name!=B16"])
    assert [r["acc1"] for r in rows] == [50.0]
    with pytest.raises(UserError, match="no column 'gmacs'"):
        load_results_table(path, ["compute_gmacs=gmacs"])
    with pytest.raises(UserError, match="no column 'dataset'"):
        load_results_table(path, ["compute_gmacs=gmacs_total"], ["dataset=imagenet1k"])
    with pytest.raises(UserError, match="no row passes"):
        load_results_table(path, ["compute_gmacs=gmacs_total"], ["downstream_dataset=mnist"])
    with pytest.raises(UserError, match="no compute column"):
        load_results_table(path)
    with pytest.raises(UserError, match="does not exist"):
        load_results_table(str(tmp_path / "nope.csv"))
    with pytest.raises(UserError, match="expected name=value"):
        load_results_table(path, ["compute_gmacs"])


def test_parse_count() -> None:
    assert parse_count("80M") == 80_000_000 and parse_count("2B") == 2_000_000_000 and parse_count("12.8k") == 12_800
    assert parse_count("3e9") == 3_000_000_000 and parse_count(400) == 400 and parse_count("34B") == 34 * 10**9
    for bad in ("lots", "0", "-5M", "1.5", "1e400", float("inf"), float("nan")):  # 1e400: inf, an OverflowError before
        with pytest.raises(ValueError):
            parse_count(bad)


# ---------------------------------------------------------------------------------------------
# the FLOP counter against MACs counted by hand


def vit_macs(tokens: int, width: int, layers: int, mlp: int) -> int:
    """MACs of a pre-norm transformer's matmuls: q/k/v, attention scores and mixing, out projection, 2-layer MLP."""
    per_layer = tokens * width * 3 * width + 2 * tokens * tokens * width + tokens * width * width + 2 * tokens * width * mlp
    return layers * per_layer


def clip_macs(image: int, patch: int, v_width: int, v_layers: int, v_mlp: int, t_width: int, t_layers: int, embed: int) -> tuple[int, int]:
    """(image, text) MACs of an open_clip ViT CLIP: patch embedding + tower + projection; text: 77 tokens, 4x MLP."""
    patches = (image // patch) ** 2
    img = patches * 3 * patch * patch * v_width + vit_macs(patches + 1, v_width, v_layers, v_mlp) + v_width * embed
    txt = vit_macs(77, t_width, t_layers, 4 * t_width) + t_width * embed  # projection of the one pooled (EOT) token
    return img, txt


PAPER_MODELS = {  # open_clip configs: image, patch, vision width/layers/mlp, text width/layers, embed dim
    "ViT-B-32": clip_macs(224, 32, 768, 12, 3072, 512, 12, 512),
    "ViT-B-16": clip_macs(224, 16, 768, 12, 3072, 512, 12, 512),
    "ViT-L-14": clip_macs(224, 14, 1024, 24, 4096, 768, 12, 768),
}


@pytest.mark.parametrize("name", list(PAPER_MODELS))
def test_gmacs_of_the_papers_models_match_a_hand_count(name: str) -> None:
    img, txt = PAPER_MODELS[name]
    g = model_gmacs(name)  # meta device: no weights, no download
    # the counter sees matmuls and convolutions only; norms, softmax and GELU are not MACs
    assert g["image_gmacs"] == pytest.approx(img / 1e9, rel=1e-9)
    assert g["text_gmacs"] == pytest.approx(txt / 1e9, rel=1e-9)
    assert g["gmacs_per_sample"] == pytest.approx((img + txt) / 1e9, rel=1e-9)


def test_gmacs_of_lt_tiny_count_attention() -> None:
    """lt-tiny (64 px, patch 16, width 64, 2 layers; text 32 tokens, width 64, 2 layers; embed 64), by hand.

    Counting a weighted model in eval mode under no_grad misses the image tower's attention: torch's
    nn.MultiheadAttention then takes a fused fast path that FlopCounterMode does not see (the study's
    counter did that before: 0.00190464 image GMACs, all q/k/v, score and out-projection MACs gone).
    """
    img = 16 * 3 * 16 * 16 * 64 + vit_macs(17, 64, 2, 256) + 64 * 64  # 786,432 + 1,745,152 + 4,096
    txt = vit_macs(32, 64, 2, 256) + 64 * 64
    assert img == 2_535_680
    g = model_gmacs("lt-tiny")
    assert g["image_gmacs"] == pytest.approx(img / 1e9, rel=1e-12)
    assert g["text_gmacs"] == pytest.approx(txt / 1e9, rel=1e-12)


# ---------------------------------------------------------------------------------------------
# the plan of the paper's grid


def test_plan_of_the_papers_grid_by_hand() -> None:
    models = list(PAPER_MODELS)
    scales = {"80M": 80_000_000, "400M": 400_000_000, "2B": 2_000_000_000}
    seen = [3 * 10**9, 13 * 10**9, 34 * 10**9]
    gm = {m: (i + t) / 1e9 for m, (i, t) in PAPER_MODELS.items()}
    ips = {"ViT-B-32": 2000.0, "ViT-B-16": 800.0}  # stated; L/14 from a stated 100 TFLOP/s
    plan = plan_grid(models, scales, seen, gm, batch_size=86_016, images_per_second=ips, gpu_tflops=100.0,
                     shard_size=10_000, bytes_per_sample=25_000)
    t = plan["total"]
    assert t["runs"] == 27
    # compute: every model runs 3 scales x (3 + 13 + 34) B samples
    assert t["compute_gmacs"] == pytest.approx(3 * 50e9 * sum(gm.values()), rel=1e-12)
    # GPU-hours: samples / (images/s) / 3600; L/14's rate = 100e12 / (6 * its GMACs * 1e9)
    l14_rate = 100e12 / (6 * gm["ViT-L-14"] * 1e9)
    assert t["gpu_hours"] == pytest.approx(3 * 50e9 * (1 / 2000 + 1 / 800 + 1 / l14_rate) / 3600, rel=1e-12)
    # e.g. ViT-B/32 at 34B samples: 34e9 / 2000 / 3600 = 4722.2 GPU-hours
    b32 = next(r for r in plan["runs"] if r["run_id"] == "ViT-B-32__80M__34000000000")
    assert b32["gpu_hours"] == pytest.approx(4722.222222, rel=1e-9)
    assert b32["epochs"] == pytest.approx(425.0) and b32["steps"] == 395_275  # 34e9 // 86016, the steps train makes
    # shards: 80M / 10k = 8,000, 400M -> 40,000, 2B -> 200,000; disk at 25 kB per sample
    assert [s["shards"] for s in plan["scales"]] == [8_000, 40_000, 200_000] and t["shards"] == 248_000
    assert [s["disk_bytes"] for s in plan["scales"]] == [2e12, 10e12, 50e12]
    assert t["disk_bytes"] == 62e12 and t["largest_scale_disk_bytes"] == 50e12
    # which runs share data: the 9 runs of a scale (3 models x 3 budgets) read the same shards
    assert all(s["n_runs"] == 9 and all(f"__{s['scale']}__" in r for r in s["runs_sharing"]) for s in plan["scales"])
    # no rate known: GPU-hours unknown, not zero
    plan = plan_grid(models[:1], {"80M": 80_000_000}, seen, gm, batch_size=1024)
    assert plan["total"]["gpu_hours"] is None and "unknown" in plan["runs"][0]["rate_source"]


def test_data_scale_effect_on_a_hand_made_table() -> None:
    from laiontools.scaling import data_scale_effect

    def row(scale: str, n: int, seen: int, seed: int, acc: float) -> dict:
        return {"run_id": f"{scale}_{seen}_{seed}", "model": "m", "scale": scale, "dataset_samples": n,
                "samples_seen": seen, "acc": acc}

    rows = [row("small", 10, 100, 0, 0.9),  # a smaller budget: ignored
            row("small", 10, 400, 0, 0.30), row("small", 10, 400, 1, 0.20),   # errors 0.70, 0.80: mean 0.75, spread 0.10
            row("mid", 50, 400, 0, 0.40),
            row("large", 100, 400, 0, 0.55), row("large", 100, 400, 1, 0.45),  # errors 0.45, 0.55: mean 0.50, spread 0.10
            row("large", 100, 800, 0, 0.99)]  # a larger budget that only one scale has: ignored too
    (e,) = data_scale_effect(rows, ["acc"])
    assert e["samples_seen"] == 400 and e["smallest"] == "small" and e["largest"] == "large"
    assert [s["scale"] for s in e["scales"]] == ["small", "mid", "large"]  # ordered by dataset size
    assert e["scales"][0]["mean_error"] == pytest.approx(0.75) and e["scales"][2]["mean_error"] == pytest.approx(0.50)
    assert e["gap"] == pytest.approx(0.25) and e["spread"] == pytest.approx(0.10) and e["signal"] is True
    # wider seed spreads, still a signal
    rows[2]["acc"] = 0.50  # small errors 0.70, 0.50: mean 0.60, spread 0.20
    rows[5]["acc"] = 0.70  # large errors 0.45, 0.30: mean 0.375, spread 0.15 -> gap 0.225 > spread 0.20
    (e,) = data_scale_effect(rows, ["acc"])
    assert e["gap"] == pytest.approx(0.225) and e["spread"] == pytest.approx(0.20) and e["signal"] is True
    # seeds that move the error more than the scales do: no signal
    rows[1]["acc"] = 0.65  # small errors 0.35, 0.50: mean 0.425, spread 0.15 -> gap 0.05 < spread 0.15
    (e,) = data_scale_effect(rows, ["acc"])
    assert e["gap"] == pytest.approx(0.05) and e["signal"] is False
    # one seed per scale: never a signal, whatever the gap
    (e,) = data_scale_effect([row("small", 10, 400, 0, 0.1), row("large", 100, 400, 0, 0.9)], ["acc"])
    assert e["gap"] == pytest.approx(0.8) and e["spread"] == 0 and e["signal"] is False
    assert data_scale_effect([{"run_id": "x", "compute_gmacs": 1, "acc": 0.5}], ["acc"]) == []  # no scale column


def test_load_results_table_refuses_repeated_runs_and_keeps_seed_replicates(tmp_path) -> None:
    import pandas as pd

    def table(name: str, **cols) -> str:
        path = str(tmp_path / name)
        pd.DataFrame(cols).to_csv(path, index=False)
        return path

    base = {"model": ["m", "m"], "scale": ["s", "s"], "samples_seen": [1000, 1000], "compute_gmacs": [10, 10], "acc": [0.2, 0.2]}
    # a run listed twice under its id (it would count as two seeds that agree exactly)
    with pytest.raises(UserError, match=r"dup_id\.csv: rows 0 and 1 repeat the run \(run_id = a\)"):
        load_results_table(table("dup_id.csv", run_id=["a", "a"], **base))
    # the same model, scale, budget and seed under two ids
    with pytest.raises(UserError, match=r"dup_seed\.csv: rows 0 and 1 repeat the run \(model, scale, samples_seen, seed, compute_gmacs = m, s, 1000, 0, 10\)"):
        load_results_table(table("dup_seed.csv", run_id=["a", "b"], seed=[0, 0], **base))
    # no id and no seed: identical rows are the same run (3e9 and 3B are one budget) ...
    with pytest.raises(UserError, match=r"dup_row\.csv: rows 0 and 1 repeat the run \(every column = m, s, 3000000000, 10"):
        load_results_table(table("dup_row.csv", **{**base, "samples_seen": ["3e9", "3B"]}))
    # ... while rows that differ elsewhere (one per downstream set) are not
    assert len(load_results_table(table("long.csv", dataset=["in1k", "cifar"], **base))) == 2
    # seed replicates: distinct seeds (ids made with the seed), or distinct run ids, stay
    rows = load_results_table(table("seeds.csv", seed=[0, 1], **base))
    assert [r["run_id"] for r in rows] == ["m__s__1000__0", "m__s__1000__1"]
    assert len(load_results_table(table("ids.csv", run_id=["a__seed0", "a__seed1"], **base))) == 2


def test_load_results_table_reads_counts_with_suffixes(tmp_path) -> None:
    import pandas as pd

    path = str(tmp_path / "b.csv")
    pd.DataFrame({"model": ["m", "m"], "gmacs_per_sample": [4.0, 4.0], "samples_seen": ["3B", "13e9"],
                  "dataset_samples": ["400M", 80_000_000], "acc": [0.2, 0.3]}).to_csv(path, index=False)
    rows = load_results_table(path)
    assert [r["samples_seen"] for r in rows] == [3 * 10**9, 13 * 10**9]
    assert [r["compute_gmacs"] for r in rows] == [12e9, 52e9] and [r["dataset_samples"] for r in rows] == [4 * 10**8, 8 * 10**7]
    assert rows[0]["run_id"] == "m__3000000000"
    rows = load_results_table(path, where=["samples_seen=3e9"])  # a filter compares with the parsed count
    assert len(rows) == 1
    pd.DataFrame({"model": ["m"], "compute_gmacs": [1.0], "samples_seen": ["lots"], "acc": [0.2]}).to_csv(path, index=False)
    with pytest.raises(UserError, match=r"b\.csv: column 'samples_seen': 'lots' is not a sample count"):
        load_results_table(path)


def test_fit_all_lists_the_runs_it_leaves_out(caplog) -> None:
    rows = [{"run_id": f"r{i}", "compute_gmacs": c, "acc": 1 - BETA * c**ALPHA} for i, c in enumerate(CS)]
    rows += [{"run_id": "inf", "compute_gmacs": 2e7, "acc": float("inf")},
             {"run_id": "text", "compute_gmacs": 3e7, "acc": "abc"},
             {"run_id": "empty", "compute_gmacs": 4e7, "acc": float("nan")}]
    with caplog.at_level("WARNING", logger="laiontools.scaling"):
        e = fit_all(rows, ["acc"])["acc"]
    assert e["n_runs"] == 5 and e["fit"]["alpha"] == pytest.approx(ALPHA, abs=1e-9)
    assert e["runs_excluded"] == [{"run_id": "inf", "reason": "not finite (inf)"},
                                  {"run_id": "text", "reason": "not a number ('abc')"},
                                  {"run_id": "empty", "reason": "empty or NaN"}]
    assert "3 run(s) left out" in caplog.text and "text (not a number ('abc'))" in caplog.text


@pytest.mark.parametrize("bad", [0, -1e12, "nan", "inf"])
def test_predict_at_must_be_positive_finite_compute_before_anything_runs(tmp_path, bad) -> None:
    """`study` took predict_at: [0] (or a negative) without a word, trained the whole grid, then died in
    the fit with a bare `ValueError: math domain error` (log10 of it) and no fits.json or report. And
    `study fit --predict-at inf` predicted accuracy 1.0 (error 10^-inf = 0). Refused when the settings are read."""
    from laiontools.core.config import ConfigError
    from laiontools.stages.study import FitConfig, StudyConfig

    rows = [{"run_id": str(i), "compute_gmacs": c, "m": a} for i, (c, a) in enumerate([(1e3, 0.1), (1e4, 0.2), (1e5, 0.3)])]
    assert fit_all(rows, ["m"])["m"]["fit"] is not None  # the fit itself is fine; only the prediction point is bad
    with pytest.raises(ConfigError, match="predict_at must be positive, finite"):
        StudyConfig(output=str(tmp_path), scales={"a": "x"}, samples_seen=[32], models=["lt-tiny"], batch_size=16,
                    evalset=["e=x"], predict_at=[1e12, bad])
    with pytest.raises(ConfigError, match="--predict-at must be positive, finite"):
        FitConfig(results=str(tmp_path / "r.csv"), output=str(tmp_path / "o"), predict_at=[bad])


def test_data_scale_effect_of_scales_of_the_same_size_is_no_signal() -> None:
    """Link rot makes a pool smaller than its targets: subsets "400" and "2000" of a 350-sample pool both hold
    the same 350 samples (nested selection). data_scale_effect ordered them by name, called "2000" the
    smallest and "400" the largest, and reported a data-scale signal ("the largest scale wins beyond seed
    noise") between two datasets of one size. Same size: no data-scale comparison, and it says so."""
    from laiontools.scaling import data_scale_effect, effect_html

    def row(scale: str, seed: int, acc: float) -> dict:
        return {"run_id": f"{scale}_{seed}", "model": "m", "scale": scale, "dataset_samples": 350,
                "samples_seen": 1000, "acc": acc}

    # errors: "2000" 0.70, 0.72 (mean 0.71); "400" 0.50, 0.52 (mean 0.51): gap 0.20 > spread 0.02
    (e,) = data_scale_effect([row("2000", 0, 0.30), row("2000", 1, 0.28), row("400", 0, 0.50), row("400", 1, 0.48)], ["acc"])
    assert [s["dataset_samples"] for s in e["scales"]] == [350, 350]
    assert e["signal"] is False
    assert "same dataset size" in e["note"] and "same size" in effect_html([e])


@pytest.mark.gpu
def test_measured_rate_waits_for_the_gpu_it_ran_on_in_trains_amp_dtype(monkeypatch) -> None:
    """measure_images_per_second on cuda:N synchronized the current device (cuda:0), so the clock stopped
    before cuda:N's steps finished; and it timed bf16 autocast where train's default ``amp`` runs fp16."""
    torch = pytest.importorskip("torch")
    if not torch.cuda.is_available():
        pytest.skip("needs CUDA")
    from laiontools.scaling import measure_images_per_second

    synced, dtypes = [], []
    real_sync, real_autocast = torch.cuda.synchronize, torch.autocast

    def sync(device=None):
        synced.append(None if device is None else torch.device(device))
        real_sync(device)

    def autocast(*a, **kw):
        dtypes.append(kw.get("dtype"))
        return real_autocast(*a, **kw)

    monkeypatch.setattr(torch.cuda, "synchronize", sync)
    monkeypatch.setattr(torch, "autocast", autocast)
    dev = f"cuda:{torch.cuda.device_count() - 1}"
    got = measure_images_per_second("lt-tiny", batch_size=4, steps=1, device=dev)
    assert got["images_per_second"] > 0 and got["device"] == dev
    assert synced and all(d == torch.device(dev) for d in synced)
    assert dtypes and set(dtypes) == {torch.float16}
