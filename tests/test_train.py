"""`laiontools train`: real open_clip_train under torchrun, 2 CPU processes on gloo, killed and resumed."""

from __future__ import annotations

import glob
import io
import json
import math
import os
import re
import signal
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import pytest

from laiontools.contracts.schema import ManifestError
from laiontools.core.config import ConfigError
from laiontools.stages import train as train_stage
from laiontools.stages.train import (
    TrainConfig,
    TrainError,
    check_trainable_manifest,
    checkpoint_epoch,
    main,
    plan_schedule,
    read_result,
)
from laiontools.testing.train_pool import write_resharded_subset

# One sample per shard of `subset` whose image does not decode: the loader skips it each time it is drawn.
SUBSET_UNDECODABLE = {"000000003", "000010007", "000020011"}


@pytest.fixture(scope="module")
def subset(tmp_path_factory: pytest.TempPathFactory) -> str:
    return write_resharded_subset(str(tmp_path_factory.mktemp("subset")), n_shards=3, per_shard=12,
                                  undecodable=SUBSET_UNDECODABLE)


def _rank_pids(run_dir: str) -> list[int]:
    """Live processes whose command line names this run directory (the ranks we started)."""
    pids = []
    for d in os.listdir("/proc"):
        if not d.isdigit():
            continue
        try:
            with open(f"/proc/{d}/cmdline", "rb") as f:
                cmd = f.read().decode(errors="replace")
        except OSError:
            continue
        if run_dir in cmd and "laiontools.stages.train_worker" in cmd:
            pids.append(int(d))
    return pids


def test_plan_exact_budget_for_any_subset_size() -> None:
    # Same budget and batch -> same steps and samples seen, whatever the virtual epoch size.
    for epoch_samples in (16, 80, 400, 2000, 10**6):
        p = plan_schedule(samples_seen=960, global_batch=32, world_size=2, epoch_samples=epoch_samples, workers=2)
        assert p.steps == 30 and p.samples_seen == 960
        assert p.epochs * p.epoch_steps == p.steps
        assert p.epoch_steps % p.workers == 0
        assert p.per_device_batch == 16
    # open_clip rounds an epoch up to a multiple of the loader workers; the plan keeps it exact.
    p = plan_schedule(samples_seen=7 * 32, global_batch=32, world_size=1, epoch_samples=64, workers=2)
    assert p.steps == 7 and p.epoch_steps * p.epochs == 7 and p.epoch_steps % p.workers == 0
    # a budget that is not a multiple of the batch: floor, and say what is actually seen
    p = plan_schedule(samples_seen=100, global_batch=32, world_size=1, epoch_samples=64, workers=1)
    assert (p.steps, p.samples_seen, p.samples_seen_requested) == (3, 96, 100)


def test_resume_drops_metric_lines_past_the_checkpoint_and_a_torn_line(tmp_path) -> None:
    """Before a resumed worker appends to metrics.jsonl: records past the checkpoint go (they are
    trained again), and so does a line cut short by a full disk, which would otherwise swallow the
    worker's first record; the records kept stay byte for byte."""
    from laiontools.stages.train import _read_metrics, _truncate_metrics

    p = tmp_path / "metrics.jsonl"
    lines = [b'{"step": %d, "loss": 1.5}\n' % s for s in (1, 2, 3, 4, 5)]
    p.write_bytes(b"".join(lines) + b'{"step": 6, "lo')  # step 6 torn mid-line
    assert _truncate_metrics(str(p), 4) == 1  # step 5; the torn line goes too
    assert p.read_bytes() == b"".join(lines[:4])
    p.write_bytes(b"".join(lines[:4]) + b'{"step": 5, "lo')  # torn right after the checkpoint
    assert _truncate_metrics(str(p), 4) == 0
    assert p.read_bytes() == b"".join(lines[:4])
    with open(p, "ab") as f:  # what the resumed worker appends
        f.write(b'{"step": 5, "loss": 1.4}\n{"step": 6, "loss": 1.3}\n')
    assert [r["step"] for r in _read_metrics(str(p))] == [1, 2, 3, 4, 5, 6]
    before = p.read_bytes()
    assert _truncate_metrics(str(p), 6) == 0 and p.read_bytes() == before  # nothing to drop: untouched
    assert _truncate_metrics(str(tmp_path / "none.jsonl"), 3) == 0


def test_bad_input_errors(subset: str, tmp_path) -> None:
    # no --manifest: said so (it was "manifest  names a folder", the empty path read as the current folder)
    with pytest.raises(ConfigError, match="--manifest is required"):
        TrainConfig(model="lt-tiny", samples_seen=64, batch_size=8, output=str(tmp_path / "r"))
    with pytest.raises(ConfigError, match="smaller than one global batch"):
        TrainConfig(manifest=subset, model="lt-tiny", samples_seen=8, batch_size=16, output=str(tmp_path / "r"))
    with pytest.raises(ConfigError, match="not divisible by the world size"):
        TrainConfig(manifest=subset, model="lt-tiny", samples_seen=64, batch_size=9, nproc=2, output=str(tmp_path / "r"))
    # a subset manifest that was never resharded: no shard list
    from laiontools.contracts.manifest import new_manifest, read_manifest, write_manifest

    m = read_manifest(subset)
    unresharded = new_manifest(
        name="not-resharded", kind="subset", num_samples=m["num_samples"], target_samples=m["num_samples"],
        uids=m["uids"], shards=[], source_fingerprint="0" * 64, command=["test"],
    )  # fmt: skip
    path = os.path.join(os.path.dirname(subset), "unresharded.manifest.json")
    write_manifest(path, unresharded)
    with pytest.raises(ManifestError, match="laiontools reshard"):
        train_stage.run(TrainConfig(manifest=path, model="lt-tiny", samples_seen=64, batch_size=8, output=str(tmp_path / "r")))
    assert not (tmp_path / "r").exists()  # nothing written for a refused input
    # the CLI prints the same as one clean line with exit code 2
    from laiontools.cli import main as cli_main

    rc = cli_main(["train", "--manifest", path, "--model", "lt-tiny", "--samples-seen", "64", "--batch-size", "8", "--output", str(tmp_path / "r")])
    assert rc == 2


@pytest.mark.slow
def test_train_kill_resume_two_cpu_processes(subset: str, tmp_path) -> None:
    run_dir = str(tmp_path / "run")
    budget, batch = 96, 8  # 12 steps of 8; virtual epochs of 2 steps -> 6 checkpoints
    argv = [
        "--manifest", subset, "--model", "lt-tiny", "--samples-seen", str(budget), "--batch-size", str(batch),
        "--nproc", "2", "--workers", "1", "--checkpoint-every", "16", "--log-every", "1", "--lr", "1e-3",
        "--output", run_dir,
    ]  # fmt: skip
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    proc = subprocess.Popen(
        [sys.executable, "-m", "laiontools", "train", *argv],
        env=env,
        start_new_session=True,  # its own process group, so the kill reaches launcher + torchrun only
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    ckpt = os.path.join(run_dir, "checkpoints", "epoch_latest.pt")
    deadline = time.time() + 300
    try:
        while not os.path.exists(ckpt):
            assert proc.poll() is None, f"training exited early with {proc.returncode}; see {run_dir}/out.log"
            assert time.time() < deadline, "no checkpoint within 300 s"
            time.sleep(0.1)
    finally:
        os.killpg(proc.pid, signal.SIGKILL)  # simulated preemption of the job we started
        proc.wait()
    # The ranks die with their launcher (PR_SET_PDEATHSIG); wait for them before resuming.
    deadline = time.time() + 60
    while _rank_pids(run_dir):
        assert time.time() < deadline, "ranks outlived the killed launcher"
        time.sleep(0.2)
    killed_at_epoch = checkpoint_epoch(ckpt)
    assert 1 <= killed_at_epoch < 6, "the kill must land between the first checkpoint and the end"
    assert not os.path.exists(os.path.join(run_dir, "result.json.done"))

    # Without --resume the run directory is refused (nothing overwritten).
    with pytest.raises(ConfigError, match="--resume"):
        main(argv)

    result = train_stage.run(TrainConfig(**{**_cfg_from_argv(argv), "resume": True})).details
    assert result["samples_seen"] == budget and result["steps"] == budget // batch
    assert result["world_size"] == 2
    assert math.isfinite(result["final_loss"])
    assert read_result(run_dir) == result
    assert checkpoint_epoch(ckpt) == 6
    # The planted samples that did not decode, each time a loader of either launch drew one, read back from
    # the rank logs: each loader process (one per rank and launch here, one after another) numbers its skips
    # from 1 ("[skipped #n] skipped a sample ...") and logs its first 10, so a 1 starts the next process.
    lines = []
    for p in sorted(glob.glob(os.path.join(run_dir, "logs", "rank*.log"))):
        with open(p) as f:
            lines += f.readlines()
    logged = [re.fullmatch(r".*\[skipped #(\d+)\] skipped a sample that does not load: (.*)\n", line).groups()
              for line in lines if "skipped a sample that does not load: " in line]
    per_process = [int(n) for i, (n, _) in enumerate(logged) if i + 1 == len(logged) or logged[i + 1][0] == "1"]
    if all(n < 10 for n in per_process):  # no process reached the log's limit: the logs hold every skip
        assert result["skipped_sample_events"] == sum(per_process) == len(logged)
        assert Counter(result["skipped_sample_examples"]) <= Counter(name for _, name in logged)
    else:
        assert result["skipped_sample_events"] >= sum(per_process)
    assert {name.split(" ")[0] for _, name in logged} <= SUBSET_UNDECODABLE
    assert {name.split(" ")[0] for name in result["skipped_sample_examples"]} <= SUBSET_UNDECODABLE
    assert len(result["skipped_sample_examples"]) == min(20, result["skipped_sample_events"])
    assert "every launch of this run" in result["skipped_sample_events_note"]

    metrics = [json.loads(line) for line in Path(run_dir, "metrics.jsonl").read_text().splitlines()]
    # every step logged exactly once across the kill and the resume; samples seen add up to the budget
    assert [m["step"] for m in metrics] == list(range(1, 13))
    assert [m["samples_seen"] for m in metrics] == [batch * s for s in range(1, 13)]
    assert all(math.isfinite(m["loss"]) and m["samples_per_s"] > 0 for m in metrics)
    assert all(abs(m["samples_per_s_per_device"] * 2 - m["samples_per_s"]) < 1e-6 * m["samples_per_s"] for m in metrics)

    launches = [json.loads(line) for line in Path(run_dir, "launches.jsonl").read_text().splitlines()]
    assert launches[-1]["resumed_from_samples"] == killed_at_epoch * 16
    settings = json.loads(Path(run_dir, "settings.json").read_text())
    env_info = json.loads(Path(run_dir, "environment.json").read_text())
    from laiontools.contracts.manifest import manifest_sha256

    assert settings["manifest_sha256"] == manifest_sha256(subset)
    assert settings["plan"]["steps"] == 12 and settings["plan"]["epochs"] == 6
    assert env_info["world_size"] == 2 and env_info["backend"] == "gloo" and env_info["torch"]
    assert os.path.exists(os.path.join(run_dir, "logs", "rank1.log"))

    # The final weights load as a plain open_clip checkpoint.
    from laiontools.models.registry import load_model

    bundle = load_model("lt-tiny", pretrained=os.path.join(run_dir, "model.pt"))
    assert bundle.info["checkpoint_sha256"]
    # A finished run is not trained again; asking it for another budget is refused.
    assert train_stage.run(TrainConfig(**{**_cfg_from_argv(argv), "resume": True})).details == result
    with pytest.raises(ConfigError, match="samples_seen: 96 -> 192"):
        train_stage.run(TrainConfig(**{**_cfg_from_argv(argv), "samples_seen": 192}))

    # The same command run without a kill, on 2 processes too: the loss of every step and the final weights are
    # the killed-and-resumed run's (each rank's loader state and shard draw carried over the resume).
    import torch

    whole = tmp_path / "whole"
    assert train_stage.run(TrainConfig(**{**_cfg_from_argv(argv), "output": str(whole)})).details["world_size"] == 2
    whole_metrics = [json.loads(line) for line in (whole / "metrics.jsonl").read_text().splitlines()]
    assert [m["loss"] for m in whole_metrics] == [m["loss"] for m in metrics]
    w = torch.load(whole / "model.pt", map_location="cpu", weights_only=True)
    k = torch.load(os.path.join(run_dir, "model.pt"), map_location="cpu", weights_only=True)
    assert w.keys() == k.keys() and all(torch.equal(w[n], k[n]) for n in w)


def _cfg_from_argv(argv: list[str]) -> dict:
    out = {}
    for flag, val in zip(argv[::2], argv[1::2]):
        key = flag[2:].replace("-", "_")
        out[key] = val
    for k in ("samples_seen", "batch_size", "nproc", "workers", "checkpoint_every", "log_every"):
        out[k] = int(out[k])
    out["lr"] = float(out["lr"])
    return out


@pytest.mark.slow
def test_pool_to_subset_to_reshard_to_train_to_evaluate(pool, spark, tmp_path) -> None:
    """The real chain: a downloaded pool -> subsets -> reshard -> train -> evaluate on the pool's eval set."""
    from laiontools.stages import evaluate as evaluate_stage
    from laiontools.stages import reshard as reshard_stage
    from laiontools.stages import subsets as subsets_stage
    from laiontools.stages.evaluate import EvaluateConfig
    from laiontools.stages.reshard import ReshardConfig
    from laiontools.stages.subsets import SubsetsConfig

    rows = subsets_stage.run(SubsetsConfig(pool=pool.manifest, output=str(tmp_path / "subsets"), scales="24", seed=1, allow_short=True), spark).details
    subset = rows[0]["manifest"]
    # the subset as `subsets` writes it has no shard list yet
    with pytest.raises(ManifestError, match="never resharded"):
        train_stage.run(TrainConfig(manifest=subset, model="lt-tiny", samples_seen=32, batch_size=8, output=str(tmp_path / "x")))
    resharded = reshard_stage.run(ReshardConfig(manifest=subset, output=str(tmp_path / "resharded"), shard_size=8), spark).details["manifest"]
    run_dir = str(tmp_path / "run")
    result = train_stage.run(
        TrainConfig(manifest=resharded, model="lt-tiny", samples_seen=32, batch_size=8, workers=1, checkpoint_every=16, log_every=1, output=run_dir)
    ).details
    assert (result["samples_seen"], result["steps"], result["epochs"]) == (32, 4, 2)
    assert math.isfinite(result["final_loss"])
    assert (result["skipped_sample_events"], result["skipped_sample_examples"]) == (0, [])  # every image decodes
    ev = evaluate_stage.run(EvaluateConfig(checkpoint=run_dir, evalset=[f"synth={pool.evalset_dir}"], output=str(tmp_path / "eval.json"))).details
    z = ev["evalsets"]["synth"]["zeroshot"]
    assert z["n_classes"] == 5 and z["n_items"] == 20 and 0 <= z["top1"] <= z["top5"] <= 1
    assert ev["run_dir"] == os.path.abspath(run_dir)


def test_shards_that_are_not_tars_are_refused_before_training(subset: str, tmp_path) -> None:
    """open_clip's loader skips a tar it cannot read and draws again: with shards that are not tars it
    looped forever, its log growing by the second. Each shard's first header block is checked first."""
    import shutil

    bad = tmp_path / "sub"
    shutil.copytree(os.path.dirname(subset), bad)
    mp = str(bad / os.path.basename(subset))
    shards = sorted(p for p in bad.rglob("*.tar"))
    assert shards and check_trainable_manifest(mp)["shards"]
    shards[0].write_bytes(os.urandom(20_000))
    with pytest.raises(ManifestError, match=rf"shard file\(s\) \['{shards[0]}'\] do not start with a tar header"):
        check_trainable_manifest(mp)


def test_a_damaged_checkpoint_and_non_finite_weights_are_train_errors(tmp_path) -> None:
    """A resume checkpoint cut short is a TrainError naming it (a torch RuntimeError traceback before);
    a run whose last checkpoint holds NaN weights is refused before model.pt is written (it was written,
    then refused for its loss, and evaluate scored the NaN model)."""
    import types

    import torch

    from laiontools.contracts import layout
    from laiontools.stages.train import TrainError, _finalize, checkpoint_epoch, plan_schedule

    plan = plan_schedule(16, 8, 1, 16, 0)
    run = tmp_path / "run"
    (run / layout.TRAIN_CHECKPOINT_DIR).mkdir(parents=True)
    ckpt = run / layout.TRAIN_CHECKPOINT_DIR / "epoch_latest.pt"
    torch.save({"epoch": plan.epochs, "state_dict": {"module.w": torch.tensor([1.0, float("nan")])}}, ckpt)
    assert checkpoint_epoch(str(ckpt)) == plan.epochs
    with open(run / layout.TRAIN_METRICS_JSONL, "w") as f:
        f.writelines(json.dumps({"step": s, "samples_seen": s * plan.global_batch, "loss": 1.0, "samples_per_s": 5.0}) + "\n"
                     for s in range(1, plan.steps + 1))
    with pytest.raises(TrainError, match=r"ended with non-finite weights \(1 tensors, e.g. w\)"):
        _finalize(types.SimpleNamespace(output=str(run)), {"model": "lt-tiny"}, plan, 1.0)
    assert not (run / layout.TRAIN_MODEL_FILE).exists()
    data = ckpt.read_bytes()
    ckpt.write_bytes(data[: len(data) // 2])
    with pytest.raises(TrainError, match=rf"{ckpt} is not a readable training checkpoint"):
        checkpoint_epoch(str(ckpt))


def test_open_clip_train_checkpoints_are_written_whole_or_not_at_all(tmp_path, monkeypatch) -> None:
    """open_clip_train wrote epoch_<N>.pt with torch.save straight to its path: a write that failed
    midway (a kill, a full disk) left a truncated checkpoint under the final name. In the worker,
    torch.save to a path (the name open_clip_train looks up) now writes a temp file, fsyncs and renames
    it: a failed save leaves the previous file or none, and a normal one loads with weights_only."""
    import open_clip
    import open_clip_train.main as oc_main
    import torch

    from laiontools.models.registry import register_tiny_models
    from laiontools.stages.train_worker import _atomic_checkpoints

    monkeypatch.setattr(torch, "save", torch.save)  # the wrap is process-wide: undone after the test
    _atomic_checkpoints()
    register_tiny_models()
    model = open_clip.create_model("lt-tiny")
    ckpt = tmp_path / "checkpoints" / "epoch_1.pt"
    ckpt.parent.mkdir()
    state = {"epoch": 1, "name": "r", "state_dict": model.state_dict(),
             "optimizer": torch.optim.AdamW(model.parameters()).state_dict()}
    oc_main.torch.save(state, str(ckpt))
    loaded = torch.load(ckpt, weights_only=True)
    assert loaded["epoch"] == 1 and loaded["state_dict"].keys() == state["state_dict"].keys()
    assert all(torch.equal(loaded["state_dict"][k], v) for k, v in state["state_dict"].items())
    good = ckpt.read_bytes()

    class FailsToPickle:
        def __reduce__(self) -> tuple:
            raise RuntimeError("pickling failed partway")

    for path in (ckpt, ckpt.with_name("epoch_2.pt")):  # over a checkpoint, and a new one
        with pytest.raises(RuntimeError, match="pickling failed partway"):
            oc_main.torch.save({**state, "epoch": 2, "extra": FailsToPickle()}, path)
    assert ckpt.read_bytes() == good and sorted(os.listdir(ckpt.parent)) == ["epoch_1.pt"]

    # the bytes themselves fail midway (the file size limit: EFBIG after 64 kB, as a full disk would)
    script = (
        "import resource, signal, sys, torch\n"
        "import open_clip_train.main as oc_main\n"
        "from laiontools.stages.train_worker import _atomic_checkpoints\n"
        "_atomic_checkpoints()\n"
        "signal.signal(signal.SIGXFSZ, signal.SIG_IGN)\n"
        "resource.setrlimit(resource.RLIMIT_FSIZE, (1 << 16, resource.RLIM_INFINITY))\n"
        "try:\n"
        "    oc_main.torch.save({'state_dict': {'w': torch.arange(1 << 20, dtype=torch.float32)}}, sys.argv[1])\n"
        "except Exception as e:\n"
        "    sys.exit(f'save failed: {type(e).__name__}: {e}')\n"
    )
    for name in ("epoch_1.pt", "epoch_3.pt"):
        r = subprocess.run([sys.executable, "-c", script, str(ckpt.parent / name)], check=False,
                           capture_output=True, text=True, timeout=120)
        assert r.returncode == 1 and "save failed" in r.stderr, r.stderr[-2000:]
    assert ckpt.read_bytes() == good and sorted(os.listdir(ckpt.parent)) == ["epoch_1.pt"]


@pytest.mark.slow
def test_shards_whose_images_never_decode_stop_the_training(tmp_path) -> None:
    """open_clip's loader skips a sample it cannot decode and draws again from resampled shards: with
    no image that decodes it never yielded a batch and the run waited for good. Now the loader stops
    after 1,000 failures without a success, and the stage says why in one line."""
    mp = write_resharded_subset(str(tmp_path / "sub"), n_shards=2, per_shard=8, undecodable=True)
    run_dir = str(tmp_path / "r")
    with pytest.raises(TrainError, match=r"stopped: the first 1000 samples this data loader read all failed to load "
                                         r"\(the last: .*\); the shards hold no image that decodes"):
        train_stage.run(TrainConfig(manifest=mp, model="lt-tiny", samples_seen=64, batch_size=8, output=run_dir))
    assert not glob.glob(os.path.join(run_dir, "logs", "rank*.stop"))  # said once, not left for a re-run
    # the loader that stopped counted its 1000 skips, the last too; they stay for a resume's result
    from laiontools.stages.train_worker import skipped_samples_of_run

    assert skipped_samples_of_run(run_dir)[0] >= 1000


def test_a_sample_the_loader_skips_is_named(monkeypatch, caplog, tmp_path) -> None:
    """open_clip's loader skips a sample that does not load with "Handling webdataset error
    (DecodingError()). Ignoring.": no sample, shard or cause (walk F14). The worker's handler names the
    sample's key, member and shard and the decoder's error, for webdataset's own DecodingError, and
    counts it for result.json (the failure that stops the loader too)."""
    import logging

    import open_clip_train.data as oc_data
    from PIL import Image, UnidentifiedImageError
    from webdataset.autodecode import DecodingError

    from laiontools.contracts import layout
    from laiontools.stages import train_worker

    monkeypatch.setattr(oc_data, "log_and_continue", oc_data.log_and_continue)  # restored after the test
    monkeypatch.setattr(oc_data, "get_wds_dataset", oc_data.get_wds_dataset)
    monkeypatch.setattr(oc_data, "tarfile_to_samples_nothrow", oc_data.tarfile_to_samples_nothrow)
    monkeypatch.setattr(oc_data, "filter_no_caption_or_no_image", oc_data.filter_no_caption_or_no_image)
    train_worker._stop_when_nothing_decodes(str(tmp_path / layout.TRAIN_SKIPPED_DIR), limit=3)
    try:
        try:
            Image.open(io.BytesIO(b"not an image"))
        except UnidentifiedImageError as cause:
            raise DecodingError(url="/data/train/shards/shard-00001.tar", key="00001000042", k="jpg") from cause
    except DecodingError as e:
        exn = e
    with caplog.at_level(logging.WARNING):
        assert oc_data.log_and_continue(exn) is True
    line = next(r.getMessage() for r in caplog.records if "skipped a sample" in r.getMessage())
    assert "00001000042 (jpg) of /data/train/shards/shard-00001.tar: UnidentifiedImageError: cannot identify image file" in line
    assert " at 0x" not in line, line
    oc_data.log_and_continue(exn)
    with pytest.raises(train_worker.NothingDecodes, match=r"\(the last: 00001000042 \(jpg\) of .*shard-00001.tar: Unidentified"):
        oc_data.log_and_continue(exn)  # the third failure with nothing loaded: the loader stops, naming the sample
    named = line[line.index("00001000042"):]
    assert train_worker.skipped_samples_of_run(str(tmp_path)) == (3, [named] * 3)


def _skip_bad_samples_in_a_child(shard: str, rank: int, die: bool) -> None:
    """A forked data loader process: decode every sample of `shard` through open_clip's handler name (the
    one the worker replaced), as its pipeline does; `die`: then SIGKILL itself (a launch killed mid-run)."""
    import open_clip_train.data as oc_data
    import webdataset as wds

    os.environ["RANK"] = str(rank)
    for _ in wds.WebDataset(shard, shardshuffle=False).decode("pilrgb", handler=oc_data.log_and_continue):
        pass
    if die:
        os.kill(os.getpid(), signal.SIGKILL)


def test_skipped_samples_are_counted_over_loader_processes_and_launches(monkeypatch, tmp_path) -> None:
    """result.json counts the samples the loaders skipped: the handler runs in dataloader worker processes
    forked from each rank, and a run can be killed and resumed, so each process keeps its own record in
    the run folder and the train stage sums every record there. Three forked loaders (two ranks, one of
    them killed the way a preempted launch is) each read a shard with planted undecodable samples once."""
    import multiprocessing

    import open_clip_train.data as oc_data

    from laiontools.contracts import layout
    from laiontools.stages import train_worker

    planted = {"000000002", "000000005", "000000009"}
    mp = write_resharded_subset(str(tmp_path / "sub"), n_shards=1, per_shard=12, undecodable=planted)
    shard = os.path.join(os.path.dirname(mp), "shards", "00000.tar")
    run_dir = str(tmp_path / "run")
    assert train_worker.skipped_samples_of_run(run_dir) == (0, [])  # no record: nothing skipped
    monkeypatch.setattr(oc_data, "log_and_continue", oc_data.log_and_continue)  # restored after the test
    monkeypatch.setattr(oc_data, "get_wds_dataset", oc_data.get_wds_dataset)
    monkeypatch.setattr(oc_data, "tarfile_to_samples_nothrow", oc_data.tarfile_to_samples_nothrow)
    monkeypatch.setattr(oc_data, "filter_no_caption_or_no_image", oc_data.filter_no_caption_or_no_image)
    train_worker._stop_when_nothing_decodes(os.path.join(run_dir, layout.TRAIN_SKIPPED_DIR))
    fork = multiprocessing.get_context("fork")  # as torch's DataLoader starts its workers on Linux
    for rank, die in ((0, True), (0, False), (1, False)):  # launch 1 killed; launch 2's loaders of ranks 0 and 1
        child = fork.Process(target=_skip_bad_samples_in_a_child, args=(shard, rank, die))
        child.start()
        child.join(120)
        assert child.exitcode == (-signal.SIGKILL if die else 0)
    events, examples = train_worker.skipped_samples_of_run(run_dir)
    assert events == 3 * len(planted)
    assert len(examples) == 3 * len(planted) and {e.split(" ")[0] for e in examples} == planted
    assert all(f" (jpg) of {shard}: UnidentifiedImageError" in e for e in examples), examples
    assert len(os.listdir(os.path.join(run_dir, layout.TRAIN_SKIPPED_DIR))) == 3  # one record per process
    monkeypatch.setattr(train_worker, "SKIPPED_EXAMPLES", 5)
    assert train_worker.skipped_samples_of_run(run_dir) == (events, examples[:5])  # the first names only

# ----------------------------------------------------------------------------------------------
def test_a_shard_cut_short_after_its_header_is_refused_before_training(subset: str, tmp_path) -> None:
    """A shard whose copy stopped part-way starts with a good tar header, so the header check passed and the
    run trained, skipping the shard's lost tail at every draw, and said so only in its result. Its size
    is not the manifest's `bytes`: refused before training, nothing written."""
    import shutil

    bad = tmp_path / "sub"
    shutil.copytree(os.path.dirname(subset), bad)
    mp = str(bad / os.path.basename(subset))
    shard = sorted(bad.rglob("*.tar"))[1]
    whole = shard.stat().st_size
    shard.write_bytes(shard.read_bytes()[: whole // 2])
    want = rf"shard file\(s\) \['{shard} \({whole // 2} bytes, the manifest says {whole}\)'\] are not the size"
    with pytest.raises(ManifestError, match=want):
        check_trainable_manifest(mp)
    run_dir = tmp_path / "r"
    with pytest.raises(ManifestError, match=want):
        train_stage.run(TrainConfig(manifest=mp, model="lt-tiny", samples_seen=16, batch_size=8, workers=0,
                                    output=str(run_dir)))
    assert not run_dir.exists()


def _record_shard_sizes(manifest: str) -> None:
    """Write the shards' sizes now on disk into `manifest` (a test that damages shards on purpose, to reach
    what the trainer does with them, past the size check)."""
    from laiontools.contracts.manifest import read_manifest, write_manifest

    m = read_manifest(manifest)
    for s in m["shards"]:
        s["bytes"] = os.path.getsize(os.path.join(os.path.dirname(manifest), s["path"]))
    write_manifest(manifest, m)


# Found by a review of train: shards that open_clip's reader cannot read, or samples its filter drops,
# never reached laiontools' counting handler, so a run on such shards waited (or logged) forever.


@pytest.mark.slow
def test_train_on_truncated_shards_stops_with_an_error_not_a_hang(tmp_path) -> None:
    """Every shard starts with a valid tar header (check_trainable_manifest passes) but is cut short in
    its first member's data. open_clip's tar reader hands that error to the *original* log_and_continue
    (bound as a default argument of tarfile_to_samples_nothrow), not to laiontools' counting handler,
    so no sample is ever read, the NothingDecodes stop never fires, and the run loops forever."""
    mp = write_resharded_subset(str(tmp_path / "sub"), n_shards=2, per_shard=8)
    for name in ("00000.tar", "00001.tar"):
        p = tmp_path / "sub" / "shards" / name
        p.write_bytes(p.read_bytes()[:1024])  # header block + half of the first .jpg
    _record_shard_sizes(mp)
    run_dir = str(tmp_path / "r")
    cmd = [sys.executable, "-m", "laiontools.cli", "train", "--manifest", mp, "--model", "lt-tiny",
           "--samples-seen", "16", "--batch-size", "8", "--workers", "0", "--output", run_dir]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True)
    try:
        out, _ = proc.communicate(timeout=240)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.communicate()
        log = os.path.join(run_dir, "logs", "rank0.log")
        size = os.path.getsize(log) if os.path.exists(log) else 0
        pytest.fail(f"train did not end within 240 s on truncated shards (hang); rank0.log is {size} bytes")
    assert proc.returncode != 0, out[-2000:]
    assert "Traceback" not in out, out[-2000:]


def _run_train_cli(mp: str, run_dir: str, timeout: int) -> tuple[int | None, str]:
    cmd = [sys.executable, "-m", "laiontools.cli", "train", "--manifest", mp, "--model", "lt-tiny",
           "--samples-seen", "16", "--batch-size", "8", "--workers", "0", "--output", run_dir]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True)
    try:
        out, _ = proc.communicate(timeout=timeout)
        return proc.returncode, out
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.communicate()
        return None, ""


@pytest.mark.slow
def test_train_on_samples_without_a_caption_stops_with_an_error_not_a_hang(tmp_path) -> None:
    """Samples with an image and a .json but no .txt (embed takes them: caption ""): open_clip's
    filter_no_caption_or_no_image drops every one silently (no handler is called, nothing is logged or
    counted), the resampled stream never yields a batch, and the run waits forever."""
    import io
    import tarfile

    mp = write_resharded_subset(str(tmp_path / "sub"), n_shards=2, per_shard=8)
    for name in ("00000.tar", "00001.tar"):
        p = tmp_path / "sub" / "shards" / name
        buf = io.BytesIO()
        with tarfile.open(fileobj=io.BytesIO(p.read_bytes())) as src, tarfile.open(fileobj=buf, mode="w") as dst:
            for m in src.getmembers():
                if not m.name.endswith(".txt"):
                    dst.addfile(m, src.extractfile(m))
        p.write_bytes(buf.getvalue())
    _record_shard_sizes(mp)
    rc, out = _run_train_cli(mp, str(tmp_path / "r"), timeout=150)
    assert rc is not None, "train did not end within 150 s on samples without .txt (silent hang)"
    assert rc != 0 and "Traceback" not in out, out[-2000:]


def _shards_opened(run_dir: str) -> list[str]:
    """The shards the loaders opened, in order: webdataset's own GOPEN_VERBOSE lines in the launcher's log."""
    with open(os.path.join(run_dir, "logs", "launcher.log")) as f:
        return [os.path.basename(line.split()[1]) for line in f if line.startswith("GOPEN ")]


@pytest.mark.slow
def test_each_virtual_epoch_draws_other_shards_when_the_rank_reads_its_own_data(tmp_path, monkeypatch) -> None:
    """`--workers 0`: open_clip reseeds its resampled shard stream at each epoch with webdataset's
    `rank * 1000` outside a dataloader worker (no epoch, no --seed), so every virtual epoch opened the
    same shards in the same order and the rest of the subset was never trained on. Here each epoch reads
    about 1000 samples (open_clip's shuffle buffer fills first) = 4 of 12 shards of 300; over 4 epochs
    16 draws with replacement from 12 shards reach 12 * (1 - (11/12)**16) = 9.8 of them on average."""
    mp = write_resharded_subset(str(tmp_path / "sub"), n_shards=12, per_shard=300, image_size=16)
    monkeypatch.setenv("GOPEN_VERBOSE", "1")  # webdataset prints every URL it opens
    run_dir = str(tmp_path / "r")
    train_stage.run(TrainConfig(manifest=mp, model="lt-tiny", samples_seen=64, batch_size=8, workers=0,
                                checkpoint_every=16, lr=1e-3, output=run_dir))  # 4 virtual epochs of 2 steps
    opened = _shards_opened(run_dir)
    assert len(opened) >= 16, opened  # >= 1000 samples an epoch: 4 shards of 300 or more
    per_epoch = len(opened) // 4
    epochs = [opened[k * per_epoch : (k + 1) * per_epoch] for k in range(4)]
    assert all(e != epochs[0] for e in epochs[1:]), opened
    # the later epochs reach shards the first did not open (with the same draws every epoch, none)
    assert set(opened) > set(epochs[0]), opened


def test_open_clip_args_may_not_set_what_the_plan_sets(subset: str, tmp_path) -> None:
    """open_clip_args (YAML, a study's `train`) reach open_clip's parser after the plan's flags, and the last
    value wins, abbreviations included: `--accum-freq 2` halved the optimizer steps (metrics said 16 samples
    seen per step of 32), `--epochs`/`--train-num-samples` moved the budget, `--seed` trained another seed
    than settings.json and the study's results.csv record. Each trained to the end and then failed, or
    passed with wrong records; refused now before anything is written."""
    run_dir = tmp_path / "r"
    for extra in (["--accum-freq", "2"], ["--epochs=3"], ["--train-num", "64"], ["--seed", "7"]):
        with pytest.raises(ConfigError, match=r"open_clip_args .* set \['--"):
            train_stage.run(TrainConfig(manifest=subset, model="lt-tiny", samples_seen=32, batch_size=8, workers=0,
                                        open_clip_args=extra, output=str(run_dir)))
    assert not run_dir.exists()
    # what the plan leaves to open_clip passes
    TrainConfig(manifest=subset, model="lt-tiny", samples_seen=32, batch_size=8, output=str(run_dir),
                open_clip_args=["--lr-scheduler", "const-cooldown", "--epochs-cooldown", "1", "--grad-clip-norm", "1.0"])


def test_a_cuda_ordinal_past_the_last_gpu_is_refused_before_the_launch(monkeypatch, tmp_path) -> None:
    """--device cuda:N with N past the last GPU was launched, and every rank failed inside open_clip
    ("invalid device ordinal"); it is refused at once, naming the GPUs there are. (torch faked to see 2.)"""
    import torch

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)

    def device(dev: str) -> str:
        return train_stage._device(TrainConfig(manifest="m.json", model="lt-tiny", samples_seen=64, batch_size=8,
                                               output=str(tmp_path / "r"), device=dev))

    assert device("cuda:1") == "cuda:1" and device("cuda") == "cuda" and device("cpu") == "cpu"
    for bad in ("cuda:2", "cuda:x"):
        with pytest.raises(ConfigError, match=rf"--device {bad}: torch sees 2 CUDA device\(s\); use cuda:0..1 or cuda"):
            device(bad)


@pytest.mark.parametrize("nproc", [1, 2])
def test_a_diverging_run_stops_at_the_next_metrics_step_not_at_the_end_of_its_budget(subset: str, tmp_path, nproc: int) -> None:
    """lt-tiny at lr 1e10 has a NaN loss from its 2nd step (tests/test_study.py trains it too). The run trained
    on to the end of its budget (here 24 steps; a study point: its whole GPU budget) before it was recorded as
    diverged. Now every rank stops at its next check (every --log-every steps: 4 here): the 4th, in both ranks of a
    2-process run at once (none is left waiting in a collective: the launch ends), and diverged.json names
    the first non-finite step (2), exactly."""
    from laiontools.contracts import layout
    from laiontools.stages.train import TrainDiverged, TrainError

    run_dir = tmp_path / "run"
    cfg = TrainConfig(manifest=subset, model="lt-tiny", samples_seen=24 * 8, batch_size=8, nproc=nproc, workers=0,
                      checkpoint_every=12 * 8, log_every=4, lr=1e10, device="cpu", output=str(run_dir))
    with pytest.raises(TrainDiverged, match=r"ended with a non-finite loss at step 2 of 24 \(training stopped at its next check, "
                                            r"every --log-every steps, not at the end of its budget\)"):
        train_stage.run(cfg)
    record = json.loads((run_dir / layout.TRAIN_DIVERGED_JSON).read_text())
    assert record["first_nonfinite_step"] == 2 and record["stopped_at_step"] == 2 and record["steps"] == 24
    # it stopped at step 4: no metrics line past it, no checkpoint (the first is at step 12), no model
    steps = [json.loads(line)["step"] for line in (run_dir / layout.TRAIN_METRICS_JSONL).read_text().splitlines()]
    assert steps and max(steps) < 4, steps
    assert not (run_dir / layout.TRAIN_CHECKPOINT_DIR / "epoch_latest.pt").exists()
    assert not (run_dir / layout.TRAIN_MODEL_FILE).exists()
    assert not list((run_dir / layout.TRAIN_LOGS_DIR).glob("rank*.diverged"))  # read into diverged.json
    launches = [json.loads(x) for x in (run_dir / layout.TRAIN_LAUNCHES_JSONL).read_text().splitlines()]
    assert len(launches) == 1 and launches[0]["exit_code"] != 0
    # the same command again reports it without training
    with pytest.raises(TrainError, match="the run diverged"):
        train_stage.run(cfg)
    assert len((run_dir / layout.TRAIN_LAUNCHES_JSONL).read_text().splitlines()) == 1


def test_a_loss_that_is_finite_again_by_the_check_does_not_stop_the_run(monkeypatch) -> None:
    """With fp16 mixed precision a non-finite loss can be a passing one (the grad scaler skips the step and
    training goes on): the run stops only where the loss is still not finite at the check, and names the
    step the non-finite losses began at. Through open_clip_train's own `backward`, as the worker patches it."""
    import open_clip_train.main as oc_main
    import open_clip_train.train as oc_train
    import torch

    from laiontools.stages.train_worker import Diverged, _stop_on_divergence

    # the patch is undone after the test
    monkeypatch.setattr(oc_train, "backward", oc_train.backward)
    monkeypatch.setattr(oc_train, "train_one_epoch", oc_train.train_one_epoch)
    monkeypatch.setattr(oc_main, "train_one_epoch", oc_main.train_one_epoch)
    _stop_on_divergence(4)

    def steps(losses):
        for x in losses:
            oc_train.backward(torch.tensor(x, requires_grad=True) * 1.0, None)

    nan, inf = float("nan"), float("inf")
    steps([1.0, nan, inf, 2.0, 1.0, 1.0, 1.0, 1.0])  # non-finite at steps 2-3, finite at the checks (4 and 8)
    with pytest.raises(Diverged) as e:
        steps([1.0, 1.0, 1.0, 1.0, 1.0, inf, nan, nan])  # steps 9-16: not finite from step 14 to the check at 16
    assert e.value.step == 14


def test_a_single_skipped_fp16_step_at_a_check_does_not_stop_the_run(monkeypatch) -> None:
    """With a grad scaler (fp16 mixed precision, train's default on a GPU) a non-finite loss leaves the weights as
    they were (the scaler skips that step): one such step is a passing one wherever it falls. Before, the same
    single skipped step stopped the run for good (diverged.json: never trained again) when it fell on a check
    step (here 4, 8, ...) and not on any other; a loss that stays non-finite still stops the run, at the step
    its non-finite losses began."""
    import open_clip_train.main as oc_main
    import open_clip_train.train as oc_train
    import torch

    from laiontools.stages.train_worker import Diverged, _stop_on_divergence

    monkeypatch.setattr(oc_train, "backward", oc_train.backward)
    monkeypatch.setattr(oc_train, "train_one_epoch", oc_train.train_one_epoch)
    monkeypatch.setattr(oc_main, "train_one_epoch", oc_main.train_one_epoch)
    _stop_on_divergence(4)

    class Scaler:  # what open_clip_train's backward asks of torch's GradScaler
        def scale(self, loss):
            return loss

    def steps(losses):
        for x in losses:
            oc_train.backward(torch.tensor(x, requires_grad=True) * 1.0, Scaler())

    nan = float("nan")
    steps([1.0, 1.0, 1.0, nan, 1.0, 1.0, 1.0, nan, 1.0, 1.0, 1.0, 1.0])  # skipped steps 4 and 8, on the checks
    with pytest.raises(Diverged) as e:
        steps([1.0, 1.0, nan, nan, nan, nan, nan, nan])  # steps 13-20: not finite from step 15 on
    assert e.value.step == 15


@pytest.fixture
def rank_rngs():
    """Restore this process's torch, numpy and `random` generators after a test seeds them as a rank does."""
    import random

    import numpy as np
    import torch

    states = torch.get_rng_state(), np.random.get_state(), random.getstate()
    yield
    torch.set_rng_state(states[0])
    np.random.set_state(states[1])
    random.setstate(states[2])


def _open_clip_seed(subset: str, seed: int, nproc: int, run_dir: str) -> int:
    """The --seed open_clip_train gets in the settings train writes for `seed` on `nproc` processes."""
    cfg = TrainConfig(manifest=subset, model="lt-tiny", samples_seen=64, batch_size=8, nproc=nproc, workers=1,
                      seed=seed, output=run_dir)  # fmt: skip
    manifest = check_trainable_manifest(subset)
    plan = plan_schedule(64, 8, nproc, int(manifest["num_samples"]), 1)
    argv = train_stage.build_settings(cfg, manifest, plan, "cpu", run_dir)["open_clip_argv"]
    assert argv.count("--seed") == 1
    return int(argv[argv.index("--seed") + 1])


def _shard_draws(monkeypatch, seed: int, oc_seed: int, rank: int, workers: int) -> list[str]:
    """The shards rank `rank`'s data loader draws first (6 per loader process, in the order batches would
    come), seeded as a rank of train_worker is: its shard draws in the rank seeded by the user's `seed`, then
    open_clip's own `random_seed(--seed, rank)` (main.py), then open_clip's resampled shard stream
    (ResampledShards2, reseeded at the epoch from `pytorch_worker_seed`) read through webdataset's loader with
    `workers` processes, as `get_wds_dataset` builds them."""
    import open_clip_train.data as oc_data
    import open_clip_train.main as oc_main
    import webdataset as wds

    from laiontools.stages.train_worker import _seed_shard_draws_in_the_rank

    monkeypatch.setenv("RANK", str(rank))
    monkeypatch.setattr(oc_data, "pytorch_worker_seed", oc_data.pytorch_worker_seed)  # undone after the test
    _seed_shard_draws_in_the_rank(seed)
    oc_main.random_seed(oc_seed, rank)
    urls = "::".join(f"shard{i:03d}.tar" for i in range(200))
    stream = oc_data.ResampledShards2(urls, deterministic=True, epoch=oc_data.SharedEpoch(0), nshards=6)
    loader = wds.WebLoader(stream, batch_size=None, shuffle=False, num_workers=workers, persistent_workers=workers > 0)
    return [d["url"] for d in loader]


def test_seed_replicates_on_several_processes_draw_their_own_shards(subset: str, tmp_path, monkeypatch,
                                                                    rank_rngs) -> None:
    """open_clip_train seeds rank r with --seed + r, and a rank's loader workers draw their shards from that
    seed: given the user's seed as is, rank 1 of seed 0 drew exactly the shards of rank 0 of seed 1 (and rank 1
    of seed 1 those of rank 0 of seed 2): seed replicates of a study shared half their data on 2 processes.
    open_clip gets seed x processes now, so every (seed, rank) draws its own; one process keeps the seed as it
    was (its runs drew their own already: a loader worker's seed is a 64-bit draw from the seeded generator)."""
    run_dir = str(tmp_path / "r")
    for workers in (1, 2, 0):  # 0: the rank reads its own data (its draws hashed from seed and rank)
        draws = {(s, r): _shard_draws(monkeypatch, s, _open_clip_seed(subset, s, 2, run_dir), r, workers)
                 for s in (0, 1, 2) for r in (0, 1)}  # fmt: skip
        assert len({tuple(d) for d in draws.values()}) == 6, (workers, draws)
        assert draws[(0, 1)] != draws[(1, 0)] and draws[(1, 1)] != draws[(2, 0)]
    # one process: open_clip gets the seed as before, and neighbouring seeds draw their own shards
    assert [_open_clip_seed(subset, s, 1, run_dir) for s in (0, 1, 2, 41)] == [0, 1, 2, 41]
    for workers in (0, 1, 2):
        draws1 = [_shard_draws(monkeypatch, s, s, 0, workers) for s in (0, 1, 2)]
        assert len({tuple(d) for d in draws1}) == 3, (workers, draws1)
    # seed 0 on several processes too (its ranks were seeded 0 + r, and are)
    assert _open_clip_seed(subset, 0, 2, run_dir) == 0
    assert [_open_clip_seed(subset, 3, n, run_dir) for n in (2, 8)] == [6, 24]
    # numpy takes seeds below 2**32: the last rank's seed must fit, checked before anything is written
    TrainConfig(manifest=subset, model="lt-tiny", samples_seen=64, batch_size=8, nproc=2, seed=2**31 - 1, output=run_dir)
    for seed, nproc in ((2**31, 2), (-1, 1), (2**32, 1)):
        with pytest.raises(ConfigError, match=r"--seed must be a whole number from 0 to \d+ with \d process"):
            TrainConfig(manifest=subset, model="lt-tiny", samples_seen=64, batch_size=8, nproc=nproc, seed=seed,
                        output=run_dir)  # fmt: skip


def _old_run_record(subset: str, run_dir: str, seed: int, nproc: int, finished: bool = True) -> TrainConfig:
    """A run directory as train wrote it before open_clip got seed x processes (settings.json without
    ``open_clip_seed``, open_clip's --seed the user's seed), finished or not; the config that trained it."""
    from laiontools.contracts import layout
    from laiontools.core.storage import mark_done, write_json

    cfg = TrainConfig(manifest=subset, model="lt-tiny", samples_seen=64, batch_size=8, nproc=nproc, workers=1,
                      seed=seed, output=run_dir)  # fmt: skip
    manifest = check_trainable_manifest(subset)
    plan = plan_schedule(64, 8, nproc, int(manifest["num_samples"]), 1)
    settings = train_stage.build_settings(cfg, manifest, plan, "cpu", run_dir)
    settings.pop("open_clip_seed", None)
    argv = settings["open_clip_argv"]
    argv[argv.index("--seed") + 1] = str(seed)
    write_json(os.path.join(run_dir, layout.OUTPUT_MARKER), {"stage": "train", "created": 0})
    write_json(os.path.join(run_dir, "settings.json"), settings)
    if finished:
        write_json(os.path.join(run_dir, "result.json"), {"manifest_sha256": settings["manifest_sha256"],
                                                          "samples_seen": 64, "steps": 8, "final_loss": 1.5})
        mark_done(os.path.join(run_dir, "result.json"))
    return cfg


def test_a_run_trained_under_the_earlier_seeding_is_reused_only_where_that_seeding_is_todays(subset: str,
                                                                                             tmp_path) -> None:
    """A run trained before open_clip got seed x processes: one process, or seed 0, trained what the same
    settings train now, and is reused as it is; seed 3 on 2 processes drew the shards of seeds 4 (rank 1 = rank
    0 of seed 4), so its result is not reused and it is not resumed: refused, saying why and what to do."""
    for seed, nproc in ((3, 1), (0, 2)):
        run_dir = str(tmp_path / f"ok{seed}-{nproc}")
        cfg = _old_run_record(subset, run_dir, seed, nproc)
        assert train_stage.run(cfg).details["final_loss"] == 1.5
        assert not os.path.exists(os.path.join(run_dir, "launches.jsonl"))  # not trained again
    want = (r"trained with seed 3 on 2 processes under the earlier seeding, where open_clip seeded rank r with 3 \+ r.*"
            r"seed replicates were not independent.*delete .* to train it again")
    for finished in (True, False):
        run_dir = str(tmp_path / f"old-{finished}")
        cfg = _old_run_record(subset, run_dir, 3, 2, finished)
        with pytest.raises(ConfigError, match=want):
            train_stage.run(TrainConfig(**{**cfg.to_dict(), "resume": True}))
        assert not os.path.exists(os.path.join(run_dir, "launches.jsonl"))  # nothing launched
    # one process now, but a launch of the run had 2 (it was resumed with another --nproc)
    run_dir = str(tmp_path / "mixed")
    cfg = _old_run_record(subset, run_dir, 3, 1)
    with open(os.path.join(run_dir, "launches.jsonl"), "w") as f:
        f.write(json.dumps({"start": 0, "wall_s": 1.0, "resumed_from_samples": 0, "exit_code": -9, "world_size": 2})
                + "\n" + '{"start": 1, "wall_')  # and a torn line of a killed launcher
    with pytest.raises(ConfigError, match=r"seed 3 on 2 processes under the earlier seeding"):
        train_stage.run(cfg)
    # the same run recorded since (open_clip_seed in settings.json): reused
    run_dir = str(tmp_path / "new")
    cfg = _old_run_record(subset, run_dir, 3, 2)
    settings_path = os.path.join(run_dir, "settings.json")
    settings = json.loads(Path(settings_path).read_text())
    Path(settings_path).write_text(json.dumps({**settings, "open_clip_seed": 6}))
    assert train_stage.run(cfg).details["final_loss"] == 1.5


@pytest.mark.slow
def test_a_seed_on_two_cpu_processes_reaches_open_clip_as_seed_times_processes(subset: str, tmp_path) -> None:
    """The real thing, 2 processes on gloo: open_clip's own record of its arguments (params.txt) holds seed 1 x 2,
    so its ranks are seeded 2 and 3 (seed 2's are 4 and 5); settings.json keeps the user's seed beside it, and the
    finished run is recognised as such by the same command."""
    run_dir = str(tmp_path / "r")
    cfg = TrainConfig(manifest=subset, model="lt-tiny", samples_seen=32, batch_size=8, nproc=2, workers=1, seed=1,
                      checkpoint_every=16, log_every=1, lr=1e-3, output=run_dir)  # fmt: skip
    result = train_stage.run(cfg).details
    assert result["world_size"] == 2 and result["steps"] == 4 and math.isfinite(result["final_loss"])
    params = Path(run_dir, "params.txt").read_text().splitlines()
    assert "seed: 2" in params, params
    settings = json.loads(Path(run_dir, "settings.json").read_text())
    assert (settings["seed"], settings["open_clip_seed"]) == (1, 2)
    assert train_stage.run(TrainConfig(**{**cfg.to_dict(), "resume": True})).details == result  # not trained again


@pytest.mark.parametrize("workers", [1, 0])
def test_two_runs_of_one_command_train_the_same_weights(subset: str, tmp_path, workers: int) -> None:
    """open_clip's sample shuffle buffer was seeded from the process id and the clock (webdataset's
    `_shuffle`), so two runs of one command on one machine trained on other sample orders and ended with other
    weights: a study point could not be trained again to check it. Seeded from the data seeds now (with a loader
    worker, and in a rank that reads its own data): the same losses at every step and the same weights, and
    another seed trains others."""
    import torch

    from laiontools.contracts import layout

    def train(name: str, seed: int) -> tuple[list, dict]:
        run_dir = tmp_path / name
        train_stage.run(TrainConfig(manifest=subset, model="lt-tiny", samples_seen=48, batch_size=8, workers=workers,
                                    checkpoint_every=24, log_every=1, lr=1e-3, device="cpu", seed=seed, output=str(run_dir)))
        losses = [json.loads(x)["loss"] for x in (run_dir / layout.TRAIN_METRICS_JSONL).read_text().splitlines()]
        return losses, torch.load(run_dir / layout.TRAIN_MODEL_FILE, map_location="cpu", weights_only=True)

    (la, a), (lb, b), (lc, c) = train("a", 5), train("b", 5), train("c", 6)
    assert len(la) == 6 and la == lb, (la, lb)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert la != lc and not all(torch.equal(a[k], c[k]) for k in a)


def test_a_run_killed_and_resumed_trains_the_weights_of_an_uninterrupted_one(subset: str, tmp_path) -> None:
    """Kill a run after its first virtual epoch's checkpoint and re-run the command: the weights (and the loss
    of every step after the checkpoint) are those of an uninterrupted run. Before, the resumed run's loader
    process started with a fresh random state and shuffle count, where the uninterrupted one carried them on
    from the epochs before: other crops, other sample orders, other weights."""
    import signal

    import torch

    from laiontools.contracts import layout

    argv = ["--manifest", subset, "--model", "lt-tiny", "--samples-seen", "48", "--batch-size", "8", "--workers", "1",
            "--checkpoint-every", "16", "--log-every", "1", "--lr", "1e-3", "--device", "cpu", "--seed", "3"]

    def weights(run_dir: Path) -> tuple[list, dict]:
        losses = {json.loads(x)["step"]: json.loads(x)["loss"] for x in (run_dir / layout.TRAIN_METRICS_JSONL).read_text().splitlines()}
        return [losses[s] for s in sorted(losses)], torch.load(run_dir / layout.TRAIN_MODEL_FILE, map_location="cpu", weights_only=True)

    cfg = dict(manifest=subset, model="lt-tiny", samples_seen=48, batch_size=8, workers=1, checkpoint_every=16, log_every=1,
               lr=1e-3, device="cpu", seed=3)  # as argv says
    whole = tmp_path / "whole"
    train_stage.run(TrainConfig(**cfg, output=str(whole)))
    killed = tmp_path / "killed"
    env = dict(os.environ, LAIONTOOLS_FAILPOINTS="train.epoch-start=120")  # waits at the start of its 2nd epoch
    proc = subprocess.Popen([sys.executable, "-m", "laiontools", "train", *argv, "--output", str(killed)], env=env,
                            start_new_session=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    log0 = killed / layout.TRAIN_LOGS_DIR / "rank0.log"
    deadline = time.time() + 300
    try:
        while not (log0.exists() and "failpoint train.epoch-start" in log0.read_text(errors="replace")):
            assert proc.poll() is None, f"training exited early with {proc.returncode}"
            assert time.time() < deadline, "the run did not reach its second epoch within 300 s"
            time.sleep(0.1)
        assert (killed / layout.TRAIN_CHECKPOINT_DIR / "epoch_latest.pt").exists()
    finally:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=30)
    train_stage.run(TrainConfig(**cfg, output=str(killed), resume=True))
    launches = [json.loads(x) for x in (killed / layout.TRAIN_LAUNCHES_JSONL).read_text().splitlines()]
    assert [x["resumed_from_samples"] for x in launches][-1] == 16  # resumed after the first epoch
    (lw, w), (lk, k) = weights(whole), weights(killed)
    assert lw == lk, (lw, lk)
    assert all(torch.equal(w[n], k[n]) for n in w)


def test_a_run_of_non_finite_losses_that_began_before_a_resume_is_dated_from_the_metrics(tmp_path) -> None:
    """The ranks count a run of non-finite losses from their own launch's first step. One that began before a
    kill (its checkpoint saved with NaN weights) was recorded as beginning at the resumed launch's first step;
    the metrics logged before it say where it began. A finite loss logged after a non-finite one (fp16: a
    skipped step) ends that earlier run: the recorded step is then the ranks' own."""
    from laiontools.contracts import layout
    from laiontools.stages.train import _record_divergence, plan_schedule

    plan = plan_schedule(96, 8, 1, 32, 0)  # 12 steps
    nan = float("nan")

    def record(losses: dict, stopped_at: int) -> dict:
        metrics = [{"step": s, "loss": x} for s, x in sorted(losses.items())]
        _record_divergence(str(tmp_path), plan, metrics, nan, [], stopped_at=stopped_at)
        return json.loads((tmp_path / layout.TRAIN_DIVERGED_JSON).read_text())

    # NaN from step 3 (logged at 3 and 4), resumed at the checkpoint of step 4: the ranks stop at 8, counting from 5
    rec = record({1: 2.0, 2: 2.0, 3: nan, 4: nan}, stopped_at=5)
    assert rec["first_nonfinite_step"] == 3 and rec["stopped_at_step"] == 5
    assert rec["reason"].startswith("ended with a non-finite loss at step 3 of 12 ")
    # a NaN at 2, finite again at 3 (a skipped step), then NaN in this launch from step 6
    assert record({1: 2.0, 2: nan, 3: 1.9, 4: 1.8}, stopped_at=6)["first_nonfinite_step"] == 6
    # nothing logged before: the ranks' step
    assert record({}, stopped_at=2)["first_nonfinite_step"] == 2
