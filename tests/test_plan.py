"""`laiontools plan`: each data stage's engine, tasks, hours, bytes and cost for N rows, before running it.

The expected figures are computed here from the inputs by plain arithmetic (the rates as the plan's table
states them, the rules as docs/scale.md states them), not by the plan's code."""

from __future__ import annotations

import json
import math

import pytest

from laiontools.cli import main
from laiontools.stages import plan as P
from laiontools.stages import verify


def _plan(tmp_path, capsys, *args: str) -> tuple[dict, str]:
    out = tmp_path / "plan.json"
    assert main(["plan", *args, "--output", str(out)]) == 0
    text = capsys.readouterr().out
    return json.loads(out.read_text()), text


def _stage(plan: dict, name: str) -> dict:
    return next(s for s in plan["stages"] if s["stage"] == name)


def test_the_2b_plan_of_laion_2b_en(tmp_path, capsys):
    plan, text = _plan(tmp_path, capsys, "--rows", "2.32B", "--success", "0.6", "--scales", "80M,400M,1.2B", "--nodes", "32",
                       "--cores-per-node", "16", "--gpus", "8", "--model", "ViT-L-14", "--sample-kb", "20")
    rows, pool, cores = 2_320_000_000, 1_392_000_000, 512
    assert plan["pool_samples"] == pool
    assert plan["download_shards"] == 232_000  # 10,000 rows a download shard
    assert plan["catalog_shuffle_partitions"] == 9_280  # 250k rows a shuffle partition, above the cluster's 512 cores
    assert plan["catalog_files"] == 1_160  # 2M rows a catalog file
    for s in plan["stages"]:
        if s["stage"] != "embed":
            assert s["engine"].startswith("Spark"), s

    dl = _stage(plan, "download")
    assert dl["core_hours"][0] == pytest.approx(rows / 33.8 / 3600)  # 19,066 core-h at the measured 33.8 samples/s/core
    assert dl["wall_hours"][1] == pytest.approx(max(rows / 33.8 / 3600 / cores, rows / (1_000 * 32) / 3600))
    assert dl["write_bytes"][0] == pytest.approx(pool * 20e3)

    em = _stage(plan, "embed")
    assert em["write_bytes"][0] == pytest.approx(pool * (768 + 768) * 2)  # fp16 image + text, ~4.28 TB
    assert em["gpu_hours"] == pytest.approx([pool / 1_374 / 3600, pool / 312 / 3600])  # one H200 measured .. A100 anchor
    assert em["wall_hours"] == pytest.approx([pool / 1_374 / 3600 / 8, pool / 312 / 3600 / 8])

    dd = _stage(plan, "dedup")  # flat: every pool vector against 1.5M eval vectors, 2 FLOP a multiply-add
    flops = pool * 1_500_000 * 768 * 2
    assert dd["core_hours"] == pytest.approx([flops / 25e9 / 3600, flops / 22e9 / 3600])

    rs = _stage(plan, "reshard")
    assert rs["gets"] == 80_000_000 + 400_000_000 + 1_200_000_000  # one ranged GET a sample
    assert rs["tasks"] == 8_000 + 40_000 + 120_000
    # 80M and 400M are at most a quarter of the catalog (580M): planned from the spans subsets wrote; 1.2B from the
    # catalog by a join that shuffles 122 B a success row and 32.9 B a uid
    assert rs["shuffle_bytes"][0] == pytest.approx(pool * 122 + 1_200_000_000 * 32.9)
    sub = _stage(plan, "subsets")
    assert sub["shuffle_bytes"][0] == pytest.approx(pool * 122 + 400_000_000 * 32.9)  # the 400M scale's spans
    assert "spans written for 2 of 3 scale(s)" in sub["note"]

    vf = _stage(plan, "verify")
    assert vf["tasks"] == 232_000 + 168_000
    assert vf["read_bytes"][0] == pytest.approx((pool + 1_680_000_000) * 20e3)  # each shard read once
    assert plan["storage_bytes"]["uid_files"][0] == 16 * (pool + 1_680_000_000)
    assert plan["cost_usd"]["gets"] == 1_680_000_000 + 232_000 * math.ceil(20e3 * 10_000 / (50 << 20))
    # executors: a Python worker a core in memoryOverhead (download's 0.74 GB + 0.3 x a 200 MB shard, the largest of
    # the CPU stages, x 4 cores + 0.5 GB for the JVM); dedup's workers each hold the 1.5M x 768 x 4 B index, 2.3x of
    # it while loading from a store; spark.local.dir twice download's 1,120 B a catalog row over the 32 nodes
    ex = plan["executors"]
    assert ex["memory_overhead_gb"] == math.ceil(4 * (0.74 + 0.3 * 0.2) + 0.5) == 4
    assert ex["dedup"]["memory_overhead_gb"] == math.ceil(2 * (0.19 + 2.3 * 1_500_000 * 768 * 4 / 1e9) + 0.5) == 23
    assert ex["local_dir_gb_per_node"] == math.ceil(2 * 1120 * rows / 32 / 1e9) == 163
    assert dl["shuffle_bytes"][0] == 1120 * rows
    assert "--conf spark.executor.memoryOverhead=4g" in text
    assert "warning" not in text
    assert "download" in text and "(measured:" in text and "(estimate:" in text  # every rate says which it is


def test_a_small_pool_plans_the_in_process_engines(tmp_path, capsys):
    plan, _ = _plan(tmp_path, capsys, "--rows", "1M", "--scales", "100k", "--nodes", "1", "--cores-per-node", "2")
    assert _stage(plan, "prepare")["engine"].startswith("in process")  # 1M rows: not above prepare's 1,000,000
    assert _stage(plan, "dedup")["engine"].startswith("in process")  # 600k samples <= 2,000,000
    assert _stage(plan, "reshard")["engine"].startswith("in process")
    assert _stage(plan, "verify")["engine"].startswith("one process")  # 100 shards <= 2,000
    assert plan["catalog_shuffle_partitions"] == 4  # ceil(1M / 250k), above the 2 cores
    assert plan["catalog_files"] == 1


def test_the_plan_follows_the_stages_own_thresholds(tmp_path, capsys, monkeypatch):
    """The engine rule is the stage's constant, read when the plan is made: a stage that changes it changes the plan."""
    plan, _ = _plan(tmp_path, capsys, "--rows", "1M")
    assert _stage(plan, "verify")["engine"].startswith("one process")
    monkeypatch.setattr(verify, "SPARK_ABOVE_SHARDS", 50)
    plan, _ = _plan(tmp_path, capsys, "--rows", "1M")
    assert _stage(plan, "verify")["engine"] == "Spark (100 shards > 50)"


def test_a_scale_the_pool_cannot_hold_is_named(tmp_path, capsys):
    """LAION-2B-en at 0.6 holds ~1.39B samples: a "2B" scale cannot be cut from it (subsets refuses it)."""
    plan, text = _plan(tmp_path, capsys, "--rows", "2.32B", "--scales", "80M,400M,2B")
    assert plan["short_scales"] == [2_000_000_000]
    assert "warning: scale(s) 2B exceed the 1,392,000,000 samples" in text


def test_a_rate_measured_on_your_cluster_replaces_ours(tmp_path, capsys):
    base, _ = _plan(tmp_path, capsys, "--rows", "100M")
    mine, text = _plan(tmp_path, capsys, "--rows", "100M", "--rate", "download=67.6")
    assert _stage(mine, "download")["core_hours"][0] == pytest.approx(_stage(base, "download")["core_hours"][0] / 2)
    assert _stage(mine, "embed") == _stage(base, "embed")
    assert "download: 67.6 samples/s/core (measured: given on the command line)" in text
    ivf, _ = _plan(tmp_path, capsys, "--rows", "100M", "--dedup-index", "ivf")
    flat = _stage(base, "dedup")["core_hours"]
    assert _stage(ivf, "dedup")["core_hours"] == pytest.approx([flat[0] * 3 / 150, flat[1] * 5 / 150])


@pytest.mark.parametrize("args, said", [
    (["--rows", "2X"], "'2X' is not a sample count"),
    (["--rows", "1M", "--success", "0"], "--success must be in (0, 1]"),
    (["--rows", "1M", "--rate", "nope=3"], "no rate named 'nope'"),
    (["--rows", "1M", "--rate", "download=-1"], "--rate download '-1' must be a positive number"),
    (["--rows", "1M", "--model", "RN50"], "--model 'RN50' has no recorded rate"),
    (["--rows", "1M", "--sample-kb", "30:x"], "--sample-kb '30:x' is not a number"),
])
def test_bad_input_is_one_line(args, said, capsys):
    assert main(["plan", *args]) == 2
    err = capsys.readouterr().err
    assert err.startswith("laiontools plan: error: ") and said in err and err.count("\n") == 1


def test_a_model_without_a_recorded_rate_takes_the_users(tmp_path, capsys):
    plan, _ = _plan(tmp_path, capsys, "--rows", "10M", "--model", "RN50", "--embed-dim", "1024", "--rate", "embed_gpu=900",
                    "--gpus", "1")
    em = _stage(plan, "embed")
    assert em["gpu_hours"] == pytest.approx([6_000_000 / 900 / 3600] * 2)
    assert em["write_bytes"][0] == pytest.approx(6_000_000 * 2048 * 2)


def test_every_measured_rate_names_a_section_of_benchmarks_md():
    """A rate says where it was measured: a BENCHMARKS.md section that exists (a renamed section breaks this)."""
    import pathlib
    import re

    heads = [ln for ln in (pathlib.Path(__file__).resolve().parents[1] / "BENCHMARKS.md").read_text().splitlines() if ln.startswith("#")]
    named = 0
    for name, r in [*P.RATES.items(), *((m, v["gpu"]) for m, v in P.MODELS.items())]:
        assert 0 < r.lo <= r.hi and r.unit and r.source, name
        for section in re.findall(r"BENCHMARKS '(.+?)'(?=[);,]|$)", r.source):
            assert any(section in h for h in heads), (name, section)
            named += 1
        assert not r.measured or "BENCHMARKS" in r.source, name
    assert named >= 10
