"""`laiontools study`: the grid (a real tiny one, killed and resumed), `study fit` on results tables, `study plan`.

The fit maths alone are tested against independent computations in test_scaling.py.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys

import pandas as pd
import pytest
import yaml

from laiontools.core.config import ConfigError
from laiontools.core.errors import UserError
from laiontools.core.storage import write_json
from laiontools.stages import study as study_stage
from laiontools.stages.study import StudyConfig, model_gmacs
from laiontools.testing.train_pool import write_color_evalset, write_resharded_subset


def _json(path: str) -> dict:
    with open(path) as f:
        return json.load(f)


def _text(path: str) -> str:
    with open(path) as f:
        return f.read()


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
    with pytest.raises(ConfigError, match="extra_seeds"):
        StudyConfig(output=str(tmp_path), scales={"a": "x"}, samples_seen=[32], models=["lt-tiny"], batch_size=16,
                    evalset=["e=x"], train={"seed": 3}, extra_seeds=[1, 3])  # fmt: skip


def test_study_config_given_sample_counts_as_scales_says_they_are_for_study_plan(tmp_path) -> None:
    """`study plan` takes counts or manifests; the study trains on resharded subsets: a count named as a
    missing manifest ("manifest 2B does not exist"); now one error saying what to give."""
    for scales in ({"80M": 80_000_000}, {"80M": "8e7"}, {"2B": "2B", "small": "/data/s/subset.manifest.json"}):
        with pytest.raises(ConfigError, match=r"give sample counts; .*subset.manifest.json .*`laiontools study plan`"):
            StudyConfig(output=str(tmp_path), scales=scales, samples_seen=[32], models=["lt-tiny"], batch_size=16,
                        evalset=["e=x"])
    StudyConfig(output=str(tmp_path), scales={"2B": "2B/subset.manifest.json", "80M": "s3://b/80M.manifest.json"},
                samples_seen=[32], models=["lt-tiny"], batch_size=16, evalset=["e=x"])


def test_study_config_refuses_repeated_grid_values(tmp_path) -> None:
    base = dict(output=str(tmp_path), scales={"a": "x"}, models=["lt-tiny"], batch_size=16, evalset=["e=x"])
    with pytest.raises(ConfigError, match=r"`samples_seen` lists \[32\] more than once"):
        StudyConfig(**{**base, "samples_seen": [32, "32", 64]})
    with pytest.raises(ConfigError, match=r"`models` lists \['lt-tiny'\] more than once"):
        StudyConfig(**{**base, "samples_seen": [32], "models": ["lt-tiny", "lt-small", "lt-tiny"]})
    assert StudyConfig(**{**base, "samples_seen": [32, 64]}).samples_seen == [32, 64]


def test_budgets_that_make_the_same_number_of_steps_are_refused_up_front(tmp_path) -> None:
    """train makes samples_seen // batch_size steps: 768 and 1000 at batch 256 are both 3 steps of 768 samples,
    one run trained twice under two names. `study` trained both and `study fit` then refused results.csv as
    repeated runs, after the training; `study plan` counted them as two runs, with ceil's 4 steps for 1000.
    Now the study, its plan and `study plan` refuse the grid, naming both budgets, the batch and the steps."""
    base = dict(output=str(tmp_path), scales={"a": "x.json", "b": "y.json"}, models=["lt-tiny"], evalset=["e=x"])
    want = (r"budgets 768 and 1000 both make 3 optimizer steps of global batch 256 .*Drop one of the two budgets, "
            r"or use a global batch of at most 232")
    with pytest.raises(ConfigError, match=r"^study: samples_seen " + want):
        StudyConfig(**base, samples_seen=[1000, 768], batch_size=256)
    with pytest.raises(ConfigError, match=r"^study plan: samples_seen " + want):
        study_stage.PlanConfig(scales={"a": 1000}, samples_seen=["1000", 768], models=["lt-tiny"], batch_size=256)
    path = tmp_path / "study.yaml"
    path.write_text(yaml.safe_dump({**base, "samples_seen": [768, 1000], "batch_size": 256}))
    with pytest.raises(ConfigError, match=want):
        study_stage.main(["plan", "--config", str(path)])
    with pytest.raises(ConfigError, match=want):
        study_stage.main(["--config", str(path)])
    assert sorted(os.listdir(tmp_path)) == ["study.yaml"]  # refused before anything was written
    # a budget under one batch: train refuses it, and the plan no longer counts it as a run of 1 step
    with pytest.raises(ConfigError, match=r"^study plan: samples seen 64 is smaller than one global batch \(256\)"):
        study_stage.PlanConfig(scales={"a": 1000}, samples_seen=[64], models=["lt-tiny"], batch_size=256)
    # two scale names for one subset: every run trained twice as two data scales (`study fit` keeps them apart
    # by scale name, so nothing refused them): refused before anything is written
    manifest = write_resharded_subset(str(tmp_path / "data"), n_shards=1, per_shard=16, name="s16")
    ev = write_color_evalset(str(tmp_path / "colors"), per_class=1)["path"]
    with pytest.raises(ConfigError, match=r"^study: scales 'a' and 'b' name the same subset"):
        study_stage.run(StudyConfig(**{**base, "output": str(tmp_path / "two"), "scales": {"a": manifest, "b": manifest},
                                       "evalset": [f"colors={ev}:wds"]}, samples_seen=[16], batch_size=8))
    assert not (tmp_path / "two" / "settings.json").exists()
    # a smaller batch tells them apart; extra seeds run at the largest budget under their own seeds (no pair)
    ok = StudyConfig(**base, samples_seen=[768, 1000], batch_size=232, extra_seeds=[1, 2])
    assert ok.samples_seen == [768, 1000]
    # the plan counts the steps train makes (floor, not ceil)
    from laiontools.stages.train import plan_schedule

    plan = study_stage.run_plan(study_stage.PlanConfig(scales={"a": 1000}, samples_seen=[1000], models=["lt-tiny"],
                                                       batch_size=256)).details  # fmt: skip
    assert plan["runs"][0]["steps"] == plan_schedule(1000, 256, 1, 1000, 0).steps == 3


def _fake_finished_point(cfg: StudyConfig, scale: str, samples_seen: int, seed: int | None = None) -> str:
    """The run and evaluation `study` leaves for one grid point (settings, result, eval.json + markers), without
    training; `seed`: a seed replicate's."""
    from laiontools.core.storage import mark_done, write_json
    from laiontools.stages import train
    from laiontools.stages.evaluate import EvaluateConfig

    base = os.path.join(cfg.output, "runs", f"{cfg.models[0]}__{scale}__{samples_seen}" + (f"__seed{seed}" if seed else ""))
    run_dir = os.path.join(base, "train")
    tcfg = train.TrainConfig(manifest=cfg.scales[scale], model=cfg.models[0], samples_seen=samples_seen,
                             batch_size=cfg.batch_size, nproc=cfg.nproc, output=run_dir,
                             **{**cfg.train, **({"seed": seed} if seed else {})})  # fmt: skip
    manifest = train.check_trainable_manifest(tcfg.manifest)
    plan = train.plan_schedule(samples_seen, cfg.batch_size, cfg.nproc, int(manifest["num_samples"]), tcfg.workers)
    settings = train.build_settings(tcfg, manifest, plan, "cpu", run_dir)
    from laiontools.contracts import layout

    write_json(os.path.join(run_dir, layout.OUTPUT_MARKER), {"stage": "train", "created": 0})
    write_json(os.path.join(run_dir, "settings.json"), settings)
    result = {"manifest_sha256": settings["manifest_sha256"], "samples_seen": samples_seen, "steps": plan.steps, "final_loss": 1.5}
    write_json(os.path.join(run_dir, "result.json"), result)
    mark_done(os.path.join(run_dir, "result.json"))
    eval_path = os.path.join(base, "eval.json")
    ev = EvaluateConfig(checkpoint=run_dir, evalset=list(cfg.evalset), evalsets_yaml=cfg.evalsets_yaml, output=eval_path, **cfg.evaluate)
    write_json(eval_path, {"settings": ev.to_dict(), "metrics": {"colors/zeroshot_top1": 0.25}})
    mark_done(eval_path)
    return base


def test_study_refuses_to_reuse_a_point_made_with_other_settings(tmp_path) -> None:
    """Editing train.lr (or the evaluation) after a point finished must not mix old and new runs in results.csv."""
    manifest = write_resharded_subset(str(tmp_path / "data" / "s16"), n_shards=1, per_shard=16, name="s16")
    out = str(tmp_path / "study")
    cfg = dict(output=out, scales={"16": manifest}, samples_seen=[16], models=["lt-tiny"], batch_size=8,
               evalset=["colors=/nowhere:wds"], train={"workers": 0, "lr": 0.001, "device": "cpu"})  # fmt: skip
    base = _fake_finished_point(StudyConfig(**cfg), "16", 16)
    # the same settings: reused as it is, nothing trained or evaluated
    row = study_stage.run_point(StudyConfig(**cfg), "lt-tiny", "16", 16, 1.0)
    assert row["final_loss"] == 1.5 and row["colors/zeroshot_top1"] == 0.25 and row["run_id"] == "lt-tiny__16__16"
    assert not os.path.exists(os.path.join(base, "train", "launches.jsonl"))
    assert row["skipped_sample_events"] is None  # a result.json from before the count: unknown, not 0
    res_path = os.path.join(base, "train", "result.json")
    write_json(res_path, {**_json(res_path), "skipped_sample_events": 7})
    assert study_stage.run_point(StudyConfig(**cfg), "lt-tiny", "16", 16, 1.0)["skipped_sample_events"] == 7
    # another learning rate: refused, naming the run and the setting
    edited = {**cfg, "train": {**cfg["train"], "lr": 0.01}}
    with pytest.raises(ConfigError, match=r"run lt-tiny__16__16: .*lr: 0\.001 -> 0\.01"):
        study_stage.run_point(StudyConfig(**edited), "lt-tiny", "16", 16, 1.0)
    assert not os.path.exists(os.path.join(base, "train", "launches.jsonl"))
    # other evaluation tasks: the old eval.json is not reused
    edited = {**cfg, "evaluate": {"tasks": ["zeroshot"]}}
    with pytest.raises(ConfigError, match=r"run lt-tiny__16__16: .*eval\.json was evaluated with other settings: tasks"):
        study_stage.run_point(StudyConfig(**edited), "lt-tiny", "16", 16, 1.0)


def test_a_seed_replicate_trained_under_the_earlier_seeding_on_several_processes_is_not_reused(tmp_path) -> None:
    """A replicate (seed 1) trained on 2 processes before open_clip got seed x processes: its rank 1 drew the shards of
    rank 0 of seed 2, another replicate's. The study refuses to put it in results.csv beside runs trained since,
    naming the run and what to do; the grid's seed 0 run of the same time trained what it trains now: reused.
    Seeds whose last rank numpy cannot take are refused before the grid trains."""
    manifest = write_resharded_subset(str(tmp_path / "data" / "s16"), n_shards=1, per_shard=16, name="s16")
    cfg = StudyConfig(output=str(tmp_path / "study"), scales={"16": manifest}, samples_seen=[16], models=["lt-tiny"],
                      batch_size=8, nproc=2, evalset=["colors=/nowhere:wds"], train={"workers": 1, "device": "cpu"},
                      extra_seeds=[1])  # fmt: skip
    for seed in (None, 1):
        settings_path = os.path.join(_fake_finished_point(cfg, "16", 16, seed), "train", "settings.json")
        settings = _json(settings_path)
        settings.pop("open_clip_seed", None)  # as train recorded it then, open_clip's --seed the seed itself
        argv = settings["open_clip_argv"]
        argv[argv.index("--seed") + 1] = str(seed or 0)
        write_json(settings_path, settings)
    assert study_stage.run_point(cfg, "lt-tiny", "16", 16, 1.0)["final_loss"] == 1.5
    with pytest.raises(ConfigError, match=r"^study: run lt-tiny__16__16__seed1: train: .* was trained with seed 1 on "
                                          r"2 processes under the earlier seeding.*delete .* to train it again"):
        study_stage.run_point(cfg, "lt-tiny", "16", 16, 1.0, seed=1)
    base = dict(output=str(tmp_path / "s2"), scales={"16": manifest}, samples_seen=[16], models=["lt-tiny"],
                batch_size=8, evalset=["e=x"])  # fmt: skip
    with pytest.raises(ConfigError, match=r"^study: extra_seeds must be a whole number from 0 to 2147483647 with 2 "):
        StudyConfig(**base, nproc=2, extra_seeds=[1, 2**31])
    with pytest.raises(ConfigError, match=r"^study: train.seed must be a whole number from 0 to 4294967295 with 1 "):
        StudyConfig(**base, train={"seed": -1})
    StudyConfig(**base, nproc=1, extra_seeds=[2**31])  # fits one process


@pytest.mark.slow
def test_study_grid_results_fits_and_a_rerun_skips_finished_points(tmp_path, caplog) -> None:
    """A 2-scale x 2-budget grid plus a second seed at the largest budget: results.csv, fits, report and
    plots; each point's trainer forked from the study's zygote (laiontools/core/zygote.py). A second run
    of the finished study trains and evaluates nothing again. (A study killed mid-grid resumes to the
    same grid: tests/faults/test_kill.py::test_study_survives_kills.)"""
    import logging

    caplog.set_level(logging.INFO, logger="laiontools.core.zygote")
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
        "extra_seeds": [1],  # a second seed of both scales at the largest budget (32)
    }

    study_stage.run(StudyConfig(**cfg))
    runs = os.path.join(out, "runs")
    evals = {rid: os.path.getmtime(os.path.join(runs, rid, "eval.json")) for rid in sorted(os.listdir(runs))}
    assert len(evals) == 6
    forked = [r.getMessage() for r in caplog.records if "(forked, pid" in r.getMessage()]
    assert len(forked) == 6 and len({m.split("pid ")[1] for m in forked}) == 6, forked  # 6 runs, 6 processes
    res = study_stage.run(StudyConfig(**cfg)).details
    for rid, mtime in evals.items():  # every finished point was skipped: trained once, evaluated once
        assert len(_text(os.path.join(runs, rid, "train", "launches.jsonl")).splitlines()) == 1, rid
        assert os.path.getmtime(os.path.join(runs, rid, "eval.json")) == mtime, rid

    df = pd.read_csv(os.path.join(out, "results.csv"))
    assert len(df) == 6 and set(df["scale"].astype(str)) == {"16", "32"}
    assert sorted(df["samples_seen"]) == [16, 16, 32, 32, 32, 32]
    seeded = df[df["seed"] == 1]
    assert sorted(seeded["run_id"]) == ["lt-tiny__16__32__seed1", "lt-tiny__32__32__seed1"]
    assert (seeded["samples_seen"] == 32).all() and (df[df["seed"] == 0]["run_id"].str.count("seed") == 0).all()
    assert (df["compute_gmacs"] == df["gmacs_per_sample"] * df["samples_seen"]).all()
    assert df["final_loss"].map(math.isfinite).all()
    assert (df["skipped_sample_events"] == 0).all()  # every sample of these subsets decodes
    # same budget -> same steps whatever the subset size
    assert df.groupby("samples_seen")["steps"].nunique().eq(1).all()
    assert "colors/zeroshot_top1" in df.columns and "colors/image_to_text_R@5" in df.columns

    effects = _json(os.path.join(out, "fits.json"))["data_scale_effect"]
    assert {e["metric"] for e in effects} == {"colors/zeroshot_top1", "colors/image_to_text_R@5", "colors/text_to_image_R@5"}
    for e in effects:  # both scales have 2 seeds at budget 32; the numbers are the csv's
        assert e["samples_seen"] == 32 and [s["n_runs"] for s in e["scales"]] == [2, 2]
        small = 1 - df[(df["scale"].astype(str) == "16") & (df["samples_seen"] == 32)][e["metric"]]
        assert e["scales"][0]["mean_error"] == pytest.approx(small.mean())
        assert e["signal"] == (e["gap"] > e["spread"])
    assert "Data scale at a fixed budget" in _text(res["report"])
    fits = _json(os.path.join(out, "fits.json"))["fits"]
    assert set(fits) == {"colors/zeroshot_top1", "colors/image_to_text_R@5", "colors/text_to_image_R@5"}
    for m, e in fits.items():
        # the frontier recomputed here from results.csv: a run's seeds are one point, their mean error; at
        # each compute the lowest, kept when it beats every lower compute's (compared as (compute, error)
        # pairs: runs may tie)
        runs = df.assign(err=1 - df[m]).groupby(["scale", "compute_gmacs"])["err"].mean()
        best_at = runs.groupby("compute_gmacs").min().sort_index()
        expected, best = [], math.inf
        for c, err in best_at.items():
            if err < best and err > 0:
                expected.append((c, err))
                best = err
        got = df.set_index("run_id").loc[e["frontier"]]
        flat = lambda pairs: [float(v) for pair in pairs for v in pair]
        got_pairs = [(c, runs[(sc, c)]) for sc, c in zip(got["scale"], got["compute_gmacs"])]
        assert flat(got_pairs) == pytest.approx(flat(expected))
        if len(expected) >= 2:  # two frontier points at different compute: a fit must be made
            assert e["fit"] is not None, f"{m}: no fit although the frontier has {len(expected)} points: {e.get('why_no_fit')}"
            (c0, e0), (c1, e1) = expected[0], expected[-1]
            if len(expected) == 2:  # the line through both points
                assert e["fit"]["alpha"] == pytest.approx(math.log10(e1 / e0) / math.log10(c1 / c0), rel=1e-9)
            assert e["predictions"]
        else:
            assert e["fit"] is None and "at least 2 points" in e["why_no_fit"]
    for rel in res["plots"].values():
        with open(os.path.join(out, rel), "rb") as f:
            assert f.read(8) == b"\x89PNG\r\n\x1a\n"
    page = _text(res["report"])
    assert "colors/zeroshot_top1" in page and "plots/" in page and "lt-tiny__32__32" in page


# ---------------------------------------------------------------------------------------------
# `laiontools study fit`


ALPHA, BETA = -0.25, 3.0
COMPUTE = [2e3, 2e4, 2e5, 2e6, 2e7]


def _our_table(path: str) -> None:
    """A results.csv as `study` writes it: 5 frontier runs on E = 3 C^-0.25 (R@5 on E = 1.5 C^-0.1), 2 dominated runs."""
    rows = []
    for i, c in enumerate(COMPUTE + [3e4, 3e6]):
        frontier = i < len(COMPUTE)
        rows.append({
            "run_id": f"lt-tiny__s{i}__{int(c)}", "model": "lt-tiny", "scale": f"s{i % 3}", "dataset_samples": 100 * (i % 3 + 1),
            "samples_seen": int(c), "gmacs_per_sample": 1.0, "compute_gmacs": c, "final_loss": 1.0,
            "heldout/zeroshot_top1": 1 - BETA * c**ALPHA if frontier else 0.01,
            "heldout/image_to_text_R@5": 1 - 1.5 * c**-0.1 if frontier else 0.0,
        })  # fmt: skip
    pd.DataFrame(rows).to_csv(path, index=False)


def test_study_fit_on_our_results_table(tmp_path) -> None:
    csv = str(tmp_path / "results.csv")
    _our_table(csv)
    out = str(tmp_path / "fit")
    assert study_stage.main(["fit", "--results", csv, "--output", out, "--predict-at", "2e9"]) == 0
    fits = _json(os.path.join(out, "fits.json"))
    assert fits["kind"] == "accuracy" and set(fits["fits"]) == {"heldout/zeroshot_top1", "heldout/image_to_text_R@5"}
    z = fits["fits"]["heldout/zeroshot_top1"]
    assert z["frontier"] == [f"lt-tiny__s{i}__{int(c)}" for i, c in enumerate(COMPUTE)]  # the dominated runs are out
    assert z["fit"]["alpha"] == pytest.approx(ALPHA, abs=1e-9) and z["fit"]["beta"] == pytest.approx(BETA, rel=1e-9)
    assert z["predictions"][0]["metric"] == pytest.approx(1 - BETA * 2e9**ALPHA, rel=1e-9)
    r = fits["fits"]["heldout/image_to_text_R@5"]
    assert r["fit"]["alpha"] == pytest.approx(-0.1, abs=1e-9) and r["fit"]["beta"] == pytest.approx(1.5, rel=1e-9)
    pngs = sorted(os.listdir(os.path.join(out, "plots")))
    assert pngs == ["heldout_image_to_text_R_5.png", "heldout_zeroshot_top1.png"]
    for name in pngs:
        with open(os.path.join(out, "plots", name), "rb") as f:
            assert f.read(8) == b"\x89PNG\r\n\x1a\n"
    page = _text(os.path.join(out, "report.html"))
    assert "heldout/zeroshot_top1" in page and "-0.25" in page and "plots/heldout_zeroshot_top1.png" in page
    assert len(pd.read_csv(os.path.join(out, "fit_input.csv"))) == 7


def test_study_fit_on_another_studys_table(tmp_path) -> None:
    """A table shaped like a published study's: other column names, several downstream sets, accuracy in percent."""
    rows = []
    for c in COMPUTE:
        rows.append({"model_name": "ViT-B-32", "gmacs_total": c, "downstream_dataset": "imagenet1k", "acc1": 100 * (1 - BETA * c**ALPHA)})
        rows.append({"model_name": "ViT-B-32", "gmacs_total": c, "downstream_dataset": "cifar10", "acc1": 100 * (1 - 0.9 * c**-0.05)})
    csv = str(tmp_path / "theirs.csv")
    pd.DataFrame(rows).to_csv(csv, index=False)
    out = str(tmp_path / "fit")
    # through the installed command line, as a user would call it
    cmd = [sys.executable, "-m", "laiontools", "study", "fit", "--results", csv, "--output", out,
           "--columns", "compute_gmacs=gmacs_total,model=model_name", "--where", "downstream_dataset=imagenet1k",
           "--metrics", "acc1", "--metric-scale", "100"]  # fmt: skip
    p = subprocess.run(cmd, capture_output=True, text=True, timeout=300, check=False)
    assert p.returncode == 0, p.stderr
    assert "acc1" in p.stdout and "report" in p.stdout
    e = _json(os.path.join(out, "fits.json"))["fits"]["acc1"]
    assert e["n_runs"] == 5  # the cifar10 rows were filtered out (they would pull alpha towards -0.05)
    assert e["fit"]["alpha"] == pytest.approx(ALPHA, abs=1e-9) and e["fit"]["beta"] == pytest.approx(BETA, rel=1e-9)
    assert "warning" not in p.stdout and _json(os.path.join(out, "fits.json"))["warnings"] == []
    # without --where both downstream sets were fitted as one frontier, silently (alpha -0.18 for -0.1 and
    # -0.05): the fit now says which column mixes them and how to fit each apart
    mixed = study_stage.run_fit(study_stage.FitConfig(results=csv, output=str(tmp_path / "mixed"), metrics=["acc1"],
                                                      columns=["compute_gmacs=gmacs_total", "model=model_name"],
                                                      metric_scale=100))  # fmt: skip
    want = "rows of the same run differ in 'downstream_dataset' (downstream_dataset: cifar10, imagenet1k)"
    assert want in mixed.summary and "--where downstream_dataset=<value>" in mixed.summary
    assert _json(os.path.join(tmp_path, "mixed", "fits.json"))["warnings"] == [mixed.summary.splitlines()[1]]

    # the same law given as an error column
    pd.DataFrame({"gmacs_total": COMPUTE, "top1_error": [BETA * c**ALPHA for c in COMPUTE]}).to_csv(tmp_path / "err.csv", index=False)
    res = study_stage.run_fit(study_stage.FitConfig(results=str(tmp_path / "err.csv"), output=str(tmp_path / "fit_err"),
                                                    columns=["compute_gmacs=gmacs_total"], metrics=["top1_error"],
                                                    metric_kind="error"))  # fmt: skip
    f = res.details["fits"]["top1_error"]["fit"]
    assert f["alpha"] == pytest.approx(ALPHA, abs=1e-9) and res.counts["fitted"] == 1

    # percentages without --metric-scale, an unknown metric, a bad kind: errors that say what to do
    with pytest.raises(UserError, match="--metric-scale 100"):
        study_stage.main(["fit", "--results", csv, "--output", out, "--columns", "compute_gmacs=gmacs_total", "--metrics", "acc1"])
    with pytest.raises(UserError, match="no metric column 'acc5'"):
        study_stage.main(["fit", "--results", csv, "--output", out, "--columns", "compute_gmacs=gmacs_total", "--metrics", "acc5"])
    with pytest.raises(UserError, match="name them with --metrics"):
        study_stage.main(["fit", "--results", csv, "--output", out, "--columns", "compute_gmacs=gmacs_total"])
    with pytest.raises(ConfigError, match="metric-kind"):
        study_stage.main(["fit", "--results", csv, "--output", out, "--metric-kind", "loss"])


def test_study_fit_names_the_runs_it_leaves_out_and_refuses_repeated_runs(tmp_path) -> None:
    rows = [{"run_id": r, "model": "m", "compute_gmacs": c, "imagenet/zeroshot_top1": v}
            for r, c, v in (("a", 10, 0.2), ("b", 100, 0.3), ("c", 1000, "inf"), ("d", 10000, 0.5), ("e", 100000, "abc"))]
    csv = str(tmp_path / "nan.csv")
    pd.DataFrame(rows).to_csv(csv, index=False)
    out = str(tmp_path / "fit")
    res = study_stage.run_fit(study_stage.FitConfig(results=csv, output=out))
    e = _json(os.path.join(out, "fits.json"))["fits"]["imagenet/zeroshot_top1"]
    assert e["n_runs"] == 3 and [x["run_id"] for x in e["runs_excluded"]] == ["c", "e"]
    for text in (_text(res.details["report"]), res.summary):
        assert "c (not finite (inf))" in text and "e (not a number (&#x27;abc&#x27;))" in text.replace("'", "&#x27;")
    # each run listed twice: refused, not read as two seeds that agree exactly (spread 0, a false signal)
    dup = str(tmp_path / "dup.csv")
    pd.DataFrame([{"run_id": r, "model": "m", "scale": s, "dataset_samples": n, "samples_seen": 1000, "compute_gmacs": 10,
                   "imagenet/zeroshot_top1": v} for r, s, n, v in (("a", "small", 100, 0.2), ("b", "large", 1000, 0.21))
                  for _ in range(2)]).to_csv(dup, index=False)  # fmt: skip
    with pytest.raises(UserError, match=r"dup\.csv: rows 0 and 1 repeat the run \(run_id = a\)"):
        study_stage.main(["fit", "--results", dup, "--output", str(tmp_path / "fit_dup")])


def test_study_fit_orders_scales_without_dataset_samples_by_their_names_as_counts(tmp_path) -> None:
    # no dataset_samples column: scale "100" is the larger one, not the smaller ("100" < "20" as text)
    rows = [{"model": "m", "scale": s, "samples_seen": 1000, "seed": seed, "compute_gmacs": 10 * (seed + 1),
             "imagenet/zeroshot_top1": acc + 0.01 * seed} for s, acc in (("20", 0.2), ("100", 0.4)) for seed in (0, 1)]
    csv = str(tmp_path / "named.csv")
    pd.DataFrame(rows).to_csv(csv, index=False)
    res = study_stage.run_fit(study_stage.FitConfig(results=csv, output=str(tmp_path / "fit")))
    (e,) = res.details["data_scale_effect"]
    assert [s["scale"] for s in e["scales"]] == ["20", "100"] and e["smallest"] == "20" and e["largest"] == "100"
    assert e["gap"] == pytest.approx(0.2)  # the larger scale's error is the lower one
    # names that are no counts and no dataset_samples: which scale is smaller is unknown, and the error says so
    pd.DataFrame([{**r, "scale": {"20": "small", "100": "large"}[r["scale"]]} for r in rows]).to_csv(csv, index=False)
    with pytest.raises(UserError, match=r"scales \['large', 'small'\] have no dataset_samples"):
        study_stage.run_fit(study_stage.FitConfig(results=csv, output=str(tmp_path / "fit2")))


# ---------------------------------------------------------------------------------------------
# `laiontools study plan`


def test_study_plan_of_the_papers_grid(tmp_path, capsys) -> None:
    cfg = {
        "output": str(tmp_path / "study"),
        "scales": {"80M": 80_000_000, "400M": "400M", "2B": None},  # a count, a count's name, or the scale name itself
        "samples_seen": ["3B", "13B", 34_000_000_000],
        "models": ["ViT-B-32", "ViT-B-16", "ViT-L-14"],
        "batch_size": 86_016,
        "nproc": 8,
        "images_per_second": {"ViT-B-32": 2000, "ViT-B-16": 800, "ViT-L-14": 250},
        "shard_size": 10_000,
        "bytes_per_sample": 25_000,
        "evalset": ["imagenet=/data/imagenet/val:imagefolder"],  # a study.yaml's own settings are accepted, unused
        "train": {"lr": 0.001},
    }
    path = tmp_path / "study.yaml"
    path.write_text(yaml.safe_dump(cfg, sort_keys=False))
    assert study_stage.main(["plan", "--config", str(path)]) == 0
    text = capsys.readouterr().out
    plan = _json(tmp_path / "study" / "plan.json")
    g = {m: model_gmacs(m)["gmacs_per_sample"] for m in cfg["models"]}  # the counter (checked by hand in test_scaling)
    t = plan["total"]
    assert t["runs"] == 27 and len(plan["runs"]) == 27
    # by hand: each model trains 3 scales x (3 + 13 + 34) = 150 B samples
    assert t["compute_gmacs"] == pytest.approx(150e9 * (g["ViT-B-32"] + g["ViT-B-16"] + g["ViT-L-14"]), rel=1e-12)
    # 150e9 / 2000 / 3600 = 20,833.3 + 150e9 / 800 / 3600 = 52,083.3 + 150e9 / 250 / 3600 = 166,666.7 GPU-hours
    assert t["gpu_hours"] == pytest.approx(20_833.333333 + 52_083.333333 + 166_666.666667, rel=1e-9)
    assert t["shards"] == 8_000 + 40_000 + 200_000 and t["disk_bytes"] == pytest.approx(62e12)
    assert [s["samples"] for s in plan["scales"]] == [80_000_000, 400_000_000, 2_000_000_000]
    assert [s["n_runs"] for s in plan["scales"]] == [9, 9, 9]
    l14 = next(r for r in plan["runs"] if r["run_id"] == "ViT-L-14__2B__13000000000")
    assert l14["epochs"] == pytest.approx(6.5) and l14["wall_hours"] == pytest.approx(13e9 / 250 / 3600 / 8)
    assert "27 runs" in text and "2.396e+05 GPU-hours" in text and "62 TB of resharded data" in text

    # scales given as resharded manifests: their sample counts (and bytes) are read
    small = write_resharded_subset(str(tmp_path / "m16"), n_shards=1, per_shard=16, name="s16")
    res = study_stage.run_plan(study_stage.PlanConfig(scales={"s16": small}, samples_seen=[64], models=["lt-tiny"],
                                                      batch_size=8, gpu_tflops=1.0))  # fmt: skip
    r = res.details["runs"][0]
    assert r["dataset_samples"] == 16 and r["epochs"] == 4 and r["steps"] == 8
    # the shards the manifest lists, not 16 samples / the 10,000 of --shard-size (1 shard, right by chance here)
    two = write_resharded_subset(str(tmp_path / "m32"), n_shards=2, per_shard=16, seed=1, name="s32")
    res2 = study_stage.run_plan(study_stage.PlanConfig(scales={"s32": two}, samples_seen=[64], models=["lt-tiny"], batch_size=8))
    assert res2.details["scales"][0]["shards"] == 2 and res2.details["total"]["shards"] == 2
    g_tiny = model_gmacs("lt-tiny")["gmacs_per_sample"]
    assert r["images_per_second"] == pytest.approx(1e12 / (6 * g_tiny * 1e9))  # 1 TFLOP/s / (6 x GMACs)
    # a mistyped manifest path is an error naming it, also under a scale name that reads as a count (it
    # planned 400M samples, 40,000 shards, 7 TB, exit 0)
    from laiontools.contracts.schema import ManifestError

    for name in ("big", "400M"):
        with pytest.raises(ManifestError, match=r"^manifest .*/nope/subset\.manifest\.json does not exist"):
            study_stage.run_plan(study_stage.PlanConfig(scales={name: str(tmp_path / "nope" / "subset.manifest.json")},
                                                        samples_seen=[64], models=["lt-tiny"], batch_size=8))
    with pytest.raises(ConfigError, match="neither an existing manifest nor a sample count"):
        study_stage.run_plan(study_stage.PlanConfig(scales={"big": "many"}, samples_seen=[64], models=["lt-tiny"], batch_size=8))


def test_study_plan_measures_images_per_second_here() -> None:
    """--measure: a real training step on this machine's device gives the rate; stated rates still win."""
    cfg = study_stage.PlanConfig(scales={"s": 1000}, samples_seen=[2000], models=["lt-tiny", "lt-small"], batch_size=4,
                                 measure=True, measure_batch_size=4, images_per_second={"lt-small": 10.0})  # fmt: skip
    plan = study_stage.run_plan(cfg).details
    tiny, small = plan["runs"]
    assert tiny["rate_source"].startswith("measured on cpu") and tiny["images_per_second"] > 0
    assert plan["measured"]["lt-tiny"]["images_per_second"] == tiny["images_per_second"]
    assert tiny["gpu_hours"] == pytest.approx(2000 / tiny["images_per_second"] / 3600)
    assert small["rate_source"] == "stated" and small["gpu_hours"] == pytest.approx(2000 / 10 / 3600)
    assert "lt-small" not in plan["measured"]  # a stated rate is not re-measured


def test_one_study_yaml_for_plan_then_study(tmp_path) -> None:
    """The README's order: `study plan --config study.yaml`, then `study --config study.yaml`, into the
    same folder. The plan wrote plan.json there and the study refused the folder as not its own; the
    study refused the plan's keys (images_per_second) in the shared YAML; and the plan left the
    extra seeds' runs out of its count."""
    from laiontools.cli import main as cli

    data = tmp_path / "data"
    subset = write_resharded_subset(str(data / "s16"), n_shards=1, per_shard=16, name="s16")
    ev = write_color_evalset(str(data / "colors"), per_class=2)["path"]
    out = tmp_path / "study"
    cfg = tmp_path / "study.yaml"
    cfg.write_text(yaml.safe_dump({
        "output": str(out), "scales": {"16": subset}, "samples_seen": [8, 16], "models": ["lt-tiny"], "batch_size": 8,
        "nproc": 1, "evalset": [f"colors={ev}:wds"], "train": {"workers": 0, "log_every": 1},
        "evaluate": {"batch_size": 16}, "extra_seeds": [1], "images_per_second": {"lt-tiny": 100}}))
    assert cli(["study", "plan", "--config", str(cfg)]) == 0
    plan = json.loads((out / "plan.json").read_text())
    # 1 model x 1 scale x 2 budgets, + 1 extra seed at the largest budget (16): 3 runs, 40 samples seen
    assert [r["run_id"] for r in plan["runs"]] == ["lt-tiny__16__8", "lt-tiny__16__16", "lt-tiny__16__16__seed1"]
    assert plan["total"]["samples_seen"] == 40 and plan["total"]["gpu_hours"] == pytest.approx(40 / 100 / 3600)
    assert cli(["study", "--config", str(cfg)]) == 0
    df = pd.read_csv(out / "results.csv")
    assert sorted(df["run_id"]) == sorted(r["run_id"] for r in plan["runs"])  # the plan counted the runs the study made
    assert (out / "plan.json").exists()
    # and a plan written into a folder that holds another stage's output is refused, as any stage's would be
    other = tmp_path / "other"
    other.mkdir()
    (other / "x.txt").write_text("not a study")
    assert cli(["study", "plan", "--config", str(cfg), "--output", str(other)]) == 2
    assert sorted(os.listdir(other)) == ["x.txt"]


def test_a_finished_point_is_reused_when_the_output_is_given_as_an_absolute_path(tmp_path, monkeypatch) -> None:
    """A study killed after `--output study` and run again with `--output $PWD/study` is the same study: its
    finished evaluation is reused (the checkpoint path it records, the run folder as --output spelled it, is
    no part of its identity), not refused as made with other settings."""
    manifest = write_resharded_subset(str(tmp_path / "data" / "s16"), n_shards=1, per_shard=16, name="s16")
    monkeypatch.chdir(tmp_path)
    cfg = dict(output="study", scales={"16": manifest}, samples_seen=[16], models=["lt-tiny"], batch_size=8,
               evalset=["colors=/nowhere:wds"], train={"workers": 0, "lr": 0.001, "device": "cpu"})
    _fake_finished_point(StudyConfig(**cfg), "16", 16)
    again = {**cfg, "output": str(tmp_path / "study")}  # the same folder
    row = study_stage.run_point(StudyConfig(**again), "lt-tiny", "16", 16, 1.0)
    assert row["colors/zeroshot_top1"] == 0.25


def test_a_finished_point_is_evaluated_again_when_its_model_file_changed(tmp_path) -> None:
    """eval.json records the sha256 of the model file it scored. A point whose train/ was deleted and trained
    again may hold other weights: its old numbers are not reused for them, the point is evaluated again. The
    evaluation of the file the run holds is reused as it is."""
    import torch

    from laiontools.core.storage import sha256_file, write_json
    from laiontools.models.registry import load_model

    data = tmp_path / "data"
    manifest = write_resharded_subset(str(data / "s16"), n_shards=1, per_shard=16, name="s16")
    ev = write_color_evalset(str(data / "colors"), per_class=2)["path"]
    cfg = dict(output=str(tmp_path / "study"), scales={"16": manifest}, samples_seen=[16], models=["lt-tiny"], batch_size=8,
               evalset=[f"colors={ev}:wds"], train={"workers": 0, "lr": 0.001, "device": "cpu"})
    base = _fake_finished_point(StudyConfig(**cfg), "16", 16)
    run_dir, eval_path = os.path.join(base, "train"), os.path.join(base, "eval.json")
    res_path = os.path.join(run_dir, "result.json")
    write_json(res_path, {**_json(res_path), "model": "lt-tiny"})
    weights = os.path.join(run_dir, "model.pt")
    torch.save(load_model("lt-tiny").model.state_dict(), weights)
    sha = sha256_file(weights)[0]

    def scored(model_sha: str) -> None:  # an evaluation of the model file with this sha256
        write_json(eval_path, {**_json(eval_path), "model": {"checkpoint_sha256": model_sha}, "metrics": {"colors/zeroshot_top1": 0.99}})

    from laiontools.core.stage import output_paths

    write_json(output_paths(eval_path, "file")[0], {"stage": "evaluate", "created": 0})  # as evaluate claims its file
    scored(sha)
    assert study_stage.run_point(StudyConfig(**cfg), "lt-tiny", "16", 16, 1.0)["colors/zeroshot_top1"] == 0.99
    assert "wall_s" not in _json(eval_path)  # reused, not evaluated
    scored("0" * 64)
    row = study_stage.run_point(StudyConfig(**cfg), "lt-tiny", "16", 16, 1.0)
    got = _json(eval_path)
    assert got["model"]["checkpoint_sha256"] == sha and "wall_s" in got
    assert row["colors/zeroshot_top1"] == got["metrics"]["colors/zeroshot_top1"]


def test_a_study_with_a_missing_evaluation_set_records_no_settings(tmp_path) -> None:
    """study wrote its settings.json before it checked its evaluation sets and manifests: a refused study
    left a new output folder holding settings of a study that never ran. Inputs are checked first now."""
    manifest = write_resharded_subset(str(tmp_path / "data" / "s16"), n_shards=1, per_shard=16, name="s16")
    out = tmp_path / "study"
    cfg = StudyConfig(output=str(out), scales={"s16": manifest}, samples_seen=[32], models=["lt-tiny"], batch_size=8,
                      evalset=[f"c={tmp_path / 'no-such-set'}:imagefolder"])
    with pytest.raises(UserError):
        study_stage.run(cfg)
    assert not (out / "settings.json").exists()


def test_a_diverged_run_is_recorded_left_out_of_the_fit_and_not_trained_again(tmp_path) -> None:
    """A NaN loss in one run (a real one: lt-tiny at lr 1e10 gives NaN from its 2nd step) stopped the whole
    study with a TrainError, and every re-run stopped at it again. Now it is a row of results.csv with status
    `diverged` and the reason, the other points go on, each fit leaves it out and names it, a grid too small
    without it is refused naming it, and a re-run reports it again without training it again."""
    data = tmp_path / "data"
    manifest = write_resharded_subset(str(data / "s16"), n_shards=1, per_shard=16, name="s16")
    ev = write_color_evalset(str(data / "colors"), per_class=1)["path"]
    out = tmp_path / "study"
    cfg = dict(output=str(out), scales={"16": manifest}, samples_seen=[8, 16], models=["lt-tiny"], batch_size=8,
               evalset=[f"colors={ev}:wds"], train={"workers": 0, "lr": 1e10, "device": "cpu", "log_every": 1})
    from laiontools.contracts import layout

    write_json(str(out / layout.OUTPUT_MARKER), {"stage": "study", "created": 0})  # a study folder holding its points
    for n, acc in ((8, 0.25), (24, 0.5)):  # two finished points around the one that trains (and diverges)
        eval_path = os.path.join(_fake_finished_point(StudyConfig(**{**cfg, "samples_seen": [8, 16, 24]}), "16", n), "eval.json")
        write_json(eval_path, {**_json(eval_path), "metrics": {"colors/zeroshot_top1": acc}})
    # 8 and 16 (diverged): one point left, no fit: refused naming the run, after results.csv records it
    with pytest.raises(UserError, match=r"^study: 1 run\(s\) diverged and were left out \(lt-tiny__16__16 \(diverged: "
                                        r"training ended with a non-finite loss at step 2 of 2 \(training stopped at its next check, "
                                        r"every --log-every steps, not at the end of its budget\)\)\)"):
        study_stage.run(StudyConfig(**cfg))
    run_dir = out / "runs" / "lt-tiny__16__16" / "train"
    assert json.loads((run_dir / "diverged.json").read_text())["first_nonfinite_step"] == 2
    assert not (run_dir / "model.pt").exists() and not (run_dir.parent / "eval.json").exists()
    df = pd.read_csv(out / "results.csv")
    assert list(df["status"]) == ["ok", "diverged"] and math.isnan(df["final_loss"][1])
    # 8, 16, 24: the diverged point is reported again, not trained again, and the points after it go on
    res = study_stage.run(StudyConfig(**{**cfg, "samples_seen": [8, 16, 24]}))
    assert len((run_dir / "launches.jsonl").read_text().splitlines()) == 1
    assert res.counts == {"runs": 3, "diverged": 1}
    assert "WARNING: 1 run(s) diverged and are left out of the fits: lt-tiny__16__16 (diverged: " in res.summary
    df = pd.read_csv(out / "results.csv")
    assert list(df["status"]) == ["ok", "diverged", "ok"] and list(df["samples_seen"]) == [8, 16, 24]
    assert "non-finite loss" in df["status_reason"][1] and df["status_reason"].isna()[[0, 2]].all()
    fit = res.details["fits"]["colors/zeroshot_top1"]
    assert fit["frontier"] == ["lt-tiny__16__8", "lt-tiny__16__24"] and fit["fit"] is not None
    (left,) = fit["runs_excluded"]
    assert left["run_id"] == "lt-tiny__16__16" and left["reason"].startswith("diverged: training ended with a non-finite loss")
    assert "lt-tiny__16__16 (diverged: training ended" in _text(res.details["report"])
    # `study fit` on the study's table leaves it out the same way
    again = study_stage.run_fit(study_stage.FitConfig(results=str(out / "results.csv"), output=str(tmp_path / "refit")))
    assert again.details["fits"]["colors/zeroshot_top1"]["runs_excluded"] == [left]
    # evaluate (a reader of the run) says it diverged, rather than "run or resume `laiontools train`"
    from laiontools.contracts.runs import RunNotFinishedError, read_result

    with pytest.raises(RunNotFinishedError, match=r"is a training run that diverged \(ended with a non-finite loss"):
        read_result(str(run_dir))
    # a grid of the diverged point alone: refused as such, naming it
    with pytest.raises(UserError, match=r"^study: every run of the grid diverged \(lt-tiny__16__16 \(diverged: .*nothing to fit"):
        study_stage.run(StudyConfig(**{**cfg, "samples_seen": [16]}))
    assert len((run_dir / "launches.jsonl").read_text().splitlines()) == 1
    assert _json(out / "fits.json")["fits"] == {} and "lt-tiny__16__8" not in _text(out / "report.html")  # not the last grid's


def test_a_trained_model_whose_features_are_not_finite_is_a_diverged_row(tmp_path) -> None:
    """A run that finished with finite weights whose model still gives NaN / infinite features (here weights
    scaled up to overflow float32 in the forward pass, as an fp16 evaluation of a model near its range does):
    evaluate refuses it (NonFiniteFeatures), which stopped the study at that point on every re-run. Now it is
    a row with status `diverged` and the evaluation's reason, left out of the fits, and no eval.json."""
    import torch

    from laiontools.contracts import layout
    from laiontools.core.storage import is_done
    from laiontools.models.registry import load_model
    from laiontools.scaling import run_failure

    data = tmp_path / "data"
    manifest = write_resharded_subset(str(data / "s16"), n_shards=1, per_shard=16, name="s16")
    ev = write_color_evalset(str(data / "colors"), per_class=1)["path"]
    cfg = StudyConfig(output=str(tmp_path / "study"), scales={"16": manifest}, samples_seen=[16], models=["lt-tiny"], batch_size=8,
                      evalset=[f"colors={ev}:wds"], train={"workers": 0, "device": "cpu"})
    base = _fake_finished_point(cfg, "16", 16)
    eval_path = os.path.join(base, layout.STUDY_EVAL_JSON)
    for p in (eval_path, eval_path + ".done"):
        os.remove(p)
    res_path = os.path.join(base, "train", "result.json")
    write_json(res_path, {**_json(res_path), "model": "lt-tiny"})  # what evaluate reads of a run (train writes it)
    sd = load_model("lt-tiny", None, device="cpu").model.state_dict()
    sd = {k: v * 1e30 if v.is_floating_point() and v.ndim >= 2 else v for k, v in sd.items()}
    assert all(bool(torch.isfinite(v).all()) for v in sd.values() if v.is_floating_point())  # finite weights
    torch.save(sd, os.path.join(base, "train", layout.TRAIN_MODEL_FILE))
    row = study_stage.run_point(cfg, "lt-tiny", "16", 16, 1.0)
    assert row["status"] == "diverged" and row["final_loss"] == 1.5 and row["run_id"] == "lt-tiny__16__16"
    assert row["status_reason"].startswith("evaluation: ") and "the model's image features are not finite for 6 of 6 items" in row["status_reason"]
    assert run_failure(row).startswith("diverged: evaluation: ")
    assert "colors/zeroshot_top1" not in row and not is_done(eval_path)
