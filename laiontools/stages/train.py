"""`laiontools train`: DDP training of an open_clip model on a resharded subset, for a fixed samples-seen budget.

The trainer is open_clip's own (``open_clip_train``, the one the scaling-law study used). This module
turns a manifest and a budget into its arguments, launches one process per device with ``torchrun``
(NCCL on GPUs, gloo on CPU; each rank runs :mod:`laiontools.stages.train_worker`; a single process is
started directly), and checks the result.

Samples seen is the controlled variable. Shards are *resampled* (drawn with replacement, weighted by
their sample counts, ``--dataset-resampled``) so the data stream never runs dry, and the training is
cut into *virtual epochs* of a fixed number of optimizer steps. For a budget of N samples and a
global batch B the run makes exactly ``N // B`` optimizer steps and sees ``(N // B) * B`` samples,
whatever the subset's size: an 80M-style subset and a 2B-style one get the same count. A virtual
epoch is the checkpoint interval (default: one nominal pass over the subset, ``num_samples`` of the
manifest); its step count is chosen to divide the total so the count stays exact.

Run directory (``--output``, a local folder)::

    settings.json       effective settings: config, manifest path + sha256, the plan, open_clip's seed, open_clip argv
    environment.json    versions, devices, world size, backend (of the latest launch)
    launches.jsonl      one line per launch (start, resumed-from samples seen, exit code)
    shards.json         shard URLs and sampling weights given to the trainer
    metrics.jsonl       step, samples_seen, loss, samples_per_s, samples_per_s_per_device, lr, ...
    out.log, params.txt open_clip's log and parameter dump;  logs/rank<R>.log every rank's log
    logs/skipped/*.json the samples each data loader process skipped (they did not load: an image that does not decode, a missing member, an unreadable part of a tar), kept
                        over every launch; result.json sums them (skipped_sample_events, _examples)
    checkpoints/epoch_latest.pt   resume state (written atomically by open_clip at every virtual epoch)
    checkpoints/epoch_<E>.pt      the final training checkpoint (model + optimizer)
    model.pt            final model weights (plain state_dict, loadable with weights_only)
    result.json         summary; result.json.done is the completion marker (written last)
    diverged.json       instead of model.pt and result.json: a run whose loss was NaN or infinite (every rank stops
                        at the next check, every --log-every steps: train_worker._stop_on_divergence) or that reached its budget with
                        non-finite weights (reason, first non-finite step); the run's result, reported again by a
                        re-run (TrainDiverged), never trained again: delete the folder to train it again
"""

from __future__ import annotations

import argparse
import dataclasses
import glob
import json
import logging
import math
import os
import platform
import socket
import time
from typing import Any

from laiontools.contracts import layout
from laiontools.contracts.manifest import manifest_sha256, read_manifest, shard_urls
from laiontools.contracts.runs import is_finished, read_divergence, read_result
from laiontools.contracts.schema import ManifestError
from laiontools.core.config import ConfigError, StageConfig
from laiontools.core.errors import UserError, environment_error
from laiontools.core.stage import StageResult, config_parser, stage_entry
from laiontools.core.storage import mark_done, read_json, write_json, write_record
from laiontools.stages.train_worker import skipped_samples_of_run

log = logging.getLogger(__name__)

LATEST_CHECKPOINT = "epoch_latest.pt"  # open_clip_train.main.LATEST_CHECKPOINT_NAME

# Settings that define *what* is trained; a resumed run must match them exactly.
IDENTITY_KEYS = (
    "manifest_sha256",
    "model",
    "samples_seen",
    "batch_size",
    "epoch_steps",
    "epochs",
    "lr",
    "wd",
    "beta1",
    "beta2",
    "eps",
    "warmup",
    "seed",
    "precision",
    "open_clip_args",
)


def _run_logs(run_dir: str) -> dict[str, int]:
    """{path: size} of the launcher's and the ranks' logs (they are appended to, launch after launch)."""
    logs = os.path.join(run_dir, layout.TRAIN_LOGS_DIR)
    paths = [os.path.join(logs, "launcher.log"), *glob.glob(os.path.join(logs, "rank*.log"))]
    return {p: os.path.getsize(p) for p in paths if os.path.isfile(p)}


def _logged_environment_fault(run_dir: str, before: dict[str, int]) -> UserError | None:
    """A disk-full / quota / read-only fault that ended a rank, read from what this launch added to the
    launcher's and the ranks' logs (`before`: their sizes at its start; the rank's exception does not reach
    this process), as the one line the CLI gives any stage for it; None when they show none."""
    tails = []
    for path, size in sorted(_run_logs(run_dir).items()):
        start = max(before.get(path, 0), size - (64 << 10))
        with open(path, "rb") as f:
            f.seek(start)
            tails.append(f.read().decode("utf-8", "replace"))
    return environment_error(RuntimeError("\n".join(tails)), run_dir)


# open_clip_train flags that open_clip_argv (and the worker) set from the plan and the config: given again in
# open_clip_args, the last value wins in open_clip's parser, and the steps, the samples seen, the checkpoints
# or the recorded settings would not be the run's. --accum-freq makes an optimizer step of several batches.
PLANNED_FLAGS = (
    "--dataset-type", "--dataset-resampled", "--train-data", "--train-data-upsampling-factors", "--train-num-samples",
    "--batch-size", "--accum-freq", "--epochs", "--workers", "--model", "--precision", "--device", "--lr", "--wd",
    "--beta1", "--beta2", "--eps", "--warmup", "--seed", "--logs", "--name", "--save-frequency", "--save-most-recent",
    "--resume", "--report-to", "--log-every-n-steps",
)


def open_clip_seed(seed: int, world_size: int) -> int:
    """The ``--seed`` open_clip_train gets for the user's `seed` on `world_size` processes: ``seed * world_size``.

    open_clip_train seeds rank r with ``--seed + r`` (``random_seed(args.seed, args.rank)``: torch, numpy and
    ``random``); the rank's data loader workers take their seeds from that torch generator, and their resampled
    shard draws and augmentations from those. Given the seed as is, rank r of seed s was rank 0 of seed s + r:
    seed replicates drew the same shards. Here rank r of seed s is seeded ``s * world_size + r``, one number per
    (seed, rank). One process, or seed 0, gets the seed as before; the model's initial weights come from this
    number (``random_seed(args.seed, 0)``), so with several processes a seed starts from other weights than in one.
    """
    return seed * world_size


def check_seed(seed: Any, nproc: int, what: str) -> None:
    """Raise ConfigError unless `seed` is a whole number open_clip can seed every one of `nproc` ranks with:
    numpy takes seeds from 0 to 2**32 - 1, and the last rank's is ``seed * nproc + nproc - 1``."""
    top = 2**32 // max(1, nproc) - 1
    if isinstance(seed, bool) or not isinstance(seed, int) or not 0 <= seed <= top:
        raise ConfigError(f"{what} must be a whole number from 0 to {top} with {nproc} process(es), got {seed!r} "
                          f"(open_clip seeds numpy with seed x processes + rank, which must be below 2**32)")


class TrainError(UserError, RuntimeError):
    """Training failed or stopped early; the message says where the logs are and how to resume."""


class TrainDiverged(TrainError):
    """The run's loss was NaN / infinite (training stopped there), or its weights at the end of its budget. That is its result, recorded in
    ``diverged.json`` (``record``): a re-run reports it again, it does not train again."""

    def __init__(self, message: str, record: dict[str, Any]) -> None:
        super().__init__(message)
        self.record = record


def _diverged(run_dir: str, record: dict[str, Any]) -> TrainDiverged:
    return TrainDiverged(
        f"training in {run_dir} {record['reason']}: the run diverged; this is its result (recorded in "
        f"{layout.TRAIN_DIVERGED_JSON}, no model written, not trained again by a re-run): lower --lr, lengthen --warmup "
        f"or check the data, and train into a new --output (or delete {run_dir} to train it again)", record)


def _stopped_diverged(run_dir: str) -> int | None:
    """The first non-finite step at which the ranks of this launch stopped (their ``logs/rank<R>.diverged``,
    written by train_worker._stop_on_divergence), or None when none did. The files are removed: the run's
    record is diverged.json from here on."""
    paths = sorted(glob.glob(os.path.join(run_dir, layout.TRAIN_LOGS_DIR, "rank*.diverged")))
    steps = []
    for p in paths:
        try:
            with open(p) as f:
                steps.append(int(json.load(f)["first_nonfinite_step"]))
        except (OSError, ValueError, KeyError, TypeError):
            continue  # unreadable: the exit code and the logs say what happened
    for p in paths:
        os.remove(p)
    return min(steps) if steps else None


def _record_divergence(run_dir: str, plan: Plan, metrics: list[dict[str, Any]], final_loss: float,
                       bad_tensors: list[str], stopped_at: int | None = None) -> TrainDiverged:
    """Write ``diverged.json`` (atomically) for a run that ended with a non-finite loss or weights; return the error.
    `stopped_at`: the first non-finite step, where the ranks stopped training (before the end of the budget)."""
    if stopped_at is not None:
        # The ranks count a run of non-finite losses from their launch's first step: one that began before (a
        # checkpoint saved with NaN weights, then a kill and a resume) began where the metrics logged before it
        # turned non-finite and stayed so.
        began = None
        for r in metrics:
            if int(r["step"]) >= stopped_at:
                break
            began = None if math.isfinite(float(r["loss"])) else (began or int(r["step"]))
        first = min(stopped_at, began) if began is not None else stopped_at
        reason = (f"ended with a non-finite loss at step {first} of {plan.steps} (training stopped at its next "
                  "check, every --log-every steps, not at the end of its budget)")
    elif not math.isfinite(final_loss):
        first = next((int(r["step"]) for r in metrics if not math.isfinite(float(r["loss"]))), None)
        reason = f"ended with a non-finite loss ({final_loss}; not finite from step {first} of {plan.steps})"
    else:
        first = next((int(r["step"]) for r in metrics if not math.isfinite(float(r["loss"]))), None)
        reason = f"ended with non-finite weights ({len(bad_tensors)} tensors, e.g. {bad_tensors[0]})"
    record = {"reason": reason, "first_nonfinite_step": first, "final_loss": str(final_loss), "steps": plan.steps,
              "samples_seen": plan.samples_seen, "nonfinite_tensors": bad_tensors[:20],
              "stopped_at_step": stopped_at}
    write_json(os.path.join(run_dir, layout.TRAIN_DIVERGED_JSON), record)
    log.warning("training in %s %s", run_dir, reason)
    return _diverged(run_dir, record)


@dataclasses.dataclass
class TrainConfig(StageConfig):
    manifest: str = dataclasses.field(default="", metadata={"help": "resharded subset manifest (from `laiontools reshard`)"})
    model: str = dataclasses.field(default="", metadata={"help": "open_clip model name, e.g. ViT-B-32 or lt-tiny"})
    samples_seen: int = dataclasses.field(default=0, metadata={
        "help": "training budget in samples (the controlled variable): 3000000000, 3e9 or 3B", "count": True})
    batch_size: int = dataclasses.field(default=256, metadata={"help": "GLOBAL batch size (split evenly over --nproc processes)"})
    output: str = dataclasses.field(default="", metadata={"help": "run directory (local folder)"})
    nproc: int = dataclasses.field(default=1, metadata={"help": "processes (devices) on this node"})
    checkpoint_every: int | None = dataclasses.field(
        default=None,
        metadata={"help": "checkpoint interval in samples (= one virtual epoch); default: the manifest's num_samples"},
    )
    keep_checkpoints: bool = dataclasses.field(default=False, metadata={"help": "keep a checkpoint per virtual epoch, not just the latest"})
    lr: float = dataclasses.field(default=5e-4, metadata={"help": "peak learning rate (cosine schedule)"})
    wd: float = dataclasses.field(default=0.2, metadata={"help": "AdamW weight decay"})
    beta1: float = dataclasses.field(default=0.9, metadata={"help": "AdamW beta1"})
    beta2: float = dataclasses.field(default=0.98, metadata={"help": "AdamW beta2"})
    eps: float = dataclasses.field(default=1e-6, metadata={"help": "AdamW epsilon"})
    warmup: int | None = dataclasses.field(default=None, metadata={"help": "warmup steps; default 5%% of the steps, at most 10000"})
    workers: int = dataclasses.field(default=2, metadata={"help": "data loader worker processes per process"})
    precision: str | None = dataclasses.field(default=None, metadata={"help": "open_clip precision; default amp on GPU, fp32 on CPU"})
    device: str | None = dataclasses.field(default=None, metadata={"help": "cuda or cpu; default cuda when available"})
    seed: int = dataclasses.field(default=0, metadata={
        "help": "random seed: model init, and each process's and data loader's shard draws and sample shuffle "
                "(open_clip_train gets seed x nproc, so that process r is seeded seed x nproc + r, its own for every seed "
                "and process); two uninterrupted runs of one command on the CPU train the same weights (a resumed run, or "
                "GPU kernels, need not), so compare seeds by their spread, as study's extra_seeds does"})
    log_every: int = dataclasses.field(default=10, metadata={"help": "write a metrics line every N steps"})
    resume: bool = dataclasses.field(default=False, metadata={"help": "continue the run in --output from its latest checkpoint"})
    open_clip_args: list[str] = dataclasses.field(
        default_factory=list, metadata={"help": "extra open_clip_train arguments (YAML or library use)"}
    )

    def validate(self) -> None:
        if not self.manifest:
            raise ConfigError("train: --manifest is required (a resharded subset's manifest, from `laiontools reshard`)")
        if not self.output:
            raise ConfigError("train: --output (the run directory) is required")
        if not self.model:
            raise ConfigError("train: --model is required (an open_clip model name, e.g. ViT-B-32; lt-tiny for CPU tests)")
        from laiontools.scaling import parse_count

        try:
            self.samples_seen = parse_count(self.samples_seen)
        except ValueError as e:
            raise ConfigError(f"train: --samples-seen must be a positive number of samples: {e}") from None
        if self.batch_size <= 0 or self.nproc <= 0:
            raise ConfigError(f"train: --batch-size ({self.batch_size}) and --nproc ({self.nproc}) must be positive")
        if self.batch_size % self.nproc:
            raise ConfigError(
                f"train: global batch size {self.batch_size} is not divisible by the world size {self.nproc}; "
                f"every process must get the same batch: use a multiple of {self.nproc}"
            )
        if self.samples_seen < self.batch_size:
            raise ConfigError(
                f"train: samples seen {self.samples_seen} is smaller than one global batch ({self.batch_size}); "
                f"raise --samples-seen or lower --batch-size"
            )
        if self.checkpoint_every is not None and self.checkpoint_every <= 0:
            raise ConfigError(f"train: --checkpoint-every must be positive, got {self.checkpoint_every}")
        if self.workers < 0 or self.log_every <= 0:
            raise ConfigError("train: --workers must be >= 0 and --log-every >= 1")
        check_seed(self.seed, self.nproc, "train: --seed")
        if self.warmup is not None and self.warmup < 0:
            raise ConfigError(f"train: --warmup must be >= 0, got {self.warmup}")
        owned = sorted({f for a in self.open_clip_args if (g := str(a).split("=", 1)[0]).startswith("--") and len(g) > 2
                        for f in PLANNED_FLAGS if f.startswith(g)})
        if owned:
            raise ConfigError(
                f"train: open_clip_args {self.open_clip_args} set {owned}, which laiontools sets from the plan and this "
                "config (open_clip takes the last value given, abbreviations too): the samples-seen budget and the "
                "recorded settings would not be what ran; set them with train's own settings, or leave them out"
            )
        if self.output and "://" in self.output and not self.output.startswith("file://"):
            raise ConfigError(
                f"train: --output {self.output} must be a local folder (open_clip writes checkpoints with the OS); "
                f"copy the run directory to object storage afterwards"
            )


@dataclasses.dataclass(frozen=True)
class Plan:
    """The exact schedule: ``steps`` optimizer steps of ``global_batch`` samples in ``epochs`` virtual epochs."""

    samples_seen_requested: int
    samples_seen: int  # steps * global_batch: what the run will actually see
    global_batch: int
    per_device_batch: int
    world_size: int
    steps: int
    epoch_steps: int
    epochs: int
    workers: int

    @property
    def epoch_samples(self) -> int:
        return self.epoch_steps * self.global_batch

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["epoch_samples"] = self.epoch_samples
        return d


def _divisors(n: int) -> list[int]:
    small = [d for d in range(1, math.isqrt(n) + 1) if n % d == 0]
    return sorted(set(small + [n // d for d in small]))


def plan_schedule(samples_seen: int, global_batch: int, world_size: int, epoch_samples: int, workers: int) -> Plan:
    """Steps and virtual epochs for a budget, so the run sees exactly ``(samples_seen // global_batch) * global_batch``.

    open_clip makes ``train_num_samples / global_batch`` steps per epoch, rounded up to a multiple of
    the loader workers, so the epoch's step count must divide the total and be a multiple of the
    workers. Picks the largest such count not above ``epoch_samples / global_batch`` (lowering the
    worker count only if no count fits). Raises ConfigError for a budget below one global batch or a
    batch not divisible by the world size.
    """
    if global_batch % world_size:
        raise ConfigError(f"global batch size {global_batch} is not divisible by the world size {world_size}")
    if samples_seen < global_batch:
        raise ConfigError(f"samples seen {samples_seen} is smaller than one global batch ({global_batch})")
    from laiontools.scaling import optimizer_steps

    steps = optimizer_steps(samples_seen, global_batch)  # the one rounding rule (`study plan` counts steps with it)
    target = max(1, min(steps, round(epoch_samples / global_batch)))
    divs = _divisors(steps)
    for w in range(max(workers, 1), 0, -1):
        fits = [d for d in divs if d % w == 0]
        if not fits:
            continue
        below = [d for d in fits if d <= target]
        epoch_steps = max(below) if below else min(fits)
        return Plan(
            samples_seen_requested=samples_seen,
            samples_seen=steps * global_batch,
            global_batch=global_batch,
            per_device_batch=global_batch // world_size,
            world_size=world_size,
            steps=steps,
            epoch_steps=epoch_steps,
            epochs=steps // epoch_steps,
            workers=w if workers > 0 else 0,
            )
    raise AssertionError("unreachable: 1 divides every step count")


def check_trainable_manifest(path: str) -> dict[str, Any]:
    """Read a manifest and make sure it lists shards the trainer can stream. Raises ManifestError."""
    m = read_manifest(path)
    if not m["shards"]:
        raise ManifestError(
            f"manifest {path} ({m['kind']} {m['name']!r}, {m['num_samples']} samples) lists no shards: it was never "
            f"resharded. Run `laiontools reshard --manifest {path} --output <dir>` and train on the manifest it writes"
        )
    if m["kind"] != "subset":
        raise ManifestError(
            f"manifest {path} is a {m['kind']} manifest; train on a subset: `laiontools subsets` then `laiontools reshard`"
        )
    empty = [s["path"] for s in m["shards"] if int(s["num_samples"]) <= 0]
    if empty:
        raise ManifestError(f"manifest {path}: shard(s) {empty[:5]} have num_samples 0; re-run `laiontools reshard`")
    from laiontools.core.storage import url_to_fs

    # Every shard's first header block (one 512-byte read each, as cheap as the existence check it
    # replaces): open_clip's loader skips any tar it cannot read, with a warning, and draws again, so a
    # subset whose shards are not tars made it loop forever, its log growing by the second.
    # And every shard's size against the manifest's `bytes` (a stat; on an object store one listing per folder,
    # which fills the file system's cache that the size is then read from): a shard cut short by a copy or a
    # download that stopped starts with a good header, and trained with its tail skipped, found out after the run.
    missing, not_tars, wrong_size = [], [], []
    listed: set[tuple[int, str]] = set()
    for shard, url in zip(m["shards"], shard_urls(path, m)):
        fs, p = url_to_fs(url)
        try:
            head: bytes | None = fs.cat_file(p, start=0, end=512)
        except FileNotFoundError:
            head = None
        except OSError:  # s3fs: an object store refuses any range of an empty object (InvalidRange)
            if fs.size(p):
                raise
            head = b""
        if head is None:
            missing.append(url)
        elif len(head) < 512 or head[257:262] != b"ustar":
            not_tars.append(url)
        elif shard.get("bytes") is not None:
            parent = p.rsplit("/", 1)[0]
            if "file" not in fs.protocol and (id(fs), parent) not in listed:
                listed.add((id(fs), parent))
                fs.ls(parent, detail=True)
            size = fs.size(p)
            if size != int(shard["bytes"]):
                wrong_size.append(f"{url} ({size} bytes, the manifest says {int(shard['bytes'])})")
        if len(missing) + len(not_tars) + len(wrong_size) >= 5:
            break
    if missing:
        raise ManifestError(f"manifest {path}: shard file(s) missing: {missing}; run `laiontools verify {path}`")
    if not_tars:
        raise ManifestError(f"manifest {path}: shard file(s) {not_tars} do not start with a tar header; they are damaged "
                            f"or not webdataset shards: run `laiontools verify {path}` and reshard again")
    if wrong_size:
        raise ManifestError(f"manifest {path}: shard file(s) {wrong_size} are not the size the manifest records: cut short "
                            f"or changed since reshard wrote them; run `laiontools verify {path}` and copy or reshard again")
    return m


def _device(cfg: TrainConfig) -> str:
    import torch

    if cfg.device:
        if cfg.device.startswith("cuda") and not torch.cuda.is_available():
            raise ConfigError("train: --device cuda was given but torch sees no CUDA device; use --device cpu")
        ordinal = cfg.device.partition(":")[2] if cfg.device.startswith("cuda") else ""
        if ordinal and not (ordinal.isdigit() and int(ordinal) < torch.cuda.device_count()):
            # else every rank fails inside open_clip ("invalid device ordinal") after the launch
            raise ConfigError(f"train: --device {cfg.device}: torch sees {torch.cuda.device_count()} CUDA device(s); "
                              f"use cuda:0..{torch.cuda.device_count() - 1} or cuda")
        device = cfg.device
    else:
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if device.startswith("cuda") and cfg.nproc > torch.cuda.device_count():
        raise ConfigError(
            f"train: --nproc {cfg.nproc} processes but only {torch.cuda.device_count()} CUDA device(s) on this node; "
            f"use at most one process per GPU"
        )
    return device


def environment(device: str, world_size: int) -> dict[str, Any]:
    """Versions, devices and world size of this launch (recorded in the run directory)."""
    import numpy
    import open_clip
    import torch
    import webdataset

    from laiontools import __version__

    env: dict[str, Any] = {
        "host": socket.gethostname(),
        "platform": platform.platform(),
        "python": platform.python_version(),
        "laiontools": __version__,
        "torch": torch.__version__,
        "open_clip": open_clip.__version__,
        "webdataset": getattr(webdataset, "__version__", "unknown"),
        "numpy": numpy.__version__,
        "cuda": torch.version.cuda,
        "device_type": device.split(":")[0],
        "world_size": world_size,
        "backend": "nccl" if device.startswith("cuda") else "gloo",
        "cpu_count": os.cpu_count(),
        "omp_num_threads": os.environ.get("OMP_NUM_THREADS"),
    }
    if device.startswith("cuda"):
        env["devices"] = [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]
    else:
        env["devices"] = [f"cpu x{world_size} processes"]
    return env


def build_settings(cfg: TrainConfig, manifest: dict[str, Any], plan: Plan, device: str, run_dir: str) -> dict[str, Any]:
    """The full effective settings: what is trained (identity keys) and how it is launched."""
    precision = cfg.precision or ("amp" if device.startswith("cuda") else "fp32")
    warmup = cfg.warmup if cfg.warmup is not None else min(10000, plan.steps // 20)
    s: dict[str, Any] = {
        "manifest": os.path.abspath(cfg.manifest) if "://" not in cfg.manifest else cfg.manifest,
        "manifest_sha256": manifest_sha256(cfg.manifest),
        "manifest_name": manifest["name"],
        "manifest_num_samples": manifest["num_samples"],
        "manifest_num_shards": len(manifest["shards"]),
        "model": cfg.model,
        "samples_seen": plan.samples_seen,
        "samples_seen_requested": plan.samples_seen_requested,
        "batch_size": plan.global_batch,
        "epoch_steps": plan.epoch_steps,
        "epochs": plan.epochs,
        "lr": cfg.lr,
        "wd": cfg.wd,
        "beta1": cfg.beta1,
        "beta2": cfg.beta2,
        "eps": cfg.eps,
        "warmup": warmup,
        "seed": cfg.seed,
        # what open_clip_train gets as --seed (open_clip_seed); its absence marks a run from before that mapping
        "open_clip_seed": open_clip_seed(cfg.seed, plan.world_size),
        "precision": precision,
        "device": device,
        "open_clip_args": list(cfg.open_clip_args),
        "plan": plan.to_dict(),
        "config": cfg.to_dict(),
    }
    s["open_clip_argv"] = open_clip_argv(s, plan, run_dir, cfg)
    return s


def open_clip_argv(s: dict[str, Any], plan: Plan, run_dir: str, cfg: TrainConfig) -> list[str]:
    """Arguments for ``open_clip_train.main`` (the shard list is added by the worker from shards.json)."""
    run_dir = os.path.abspath(run_dir)
    argv = [
        "--dataset-type", "webdataset",
        "--dataset-resampled",
        "--train-num-samples", str(plan.epoch_samples),
        "--batch-size", str(plan.per_device_batch),
        "--epochs", str(plan.epochs),
        "--workers", str(plan.workers),
        "--model", s["model"],
        "--precision", s["precision"],
        "--device", s["device"],
        "--lr", repr(s["lr"]),
        "--wd", repr(s["wd"]),
        "--beta1", repr(s["beta1"]),
        "--beta2", repr(s["beta2"]),
        "--eps", repr(s["eps"]),
        "--warmup", str(s["warmup"]),
        "--lr-scheduler", "cosine",
        "--seed", str(s["open_clip_seed"]),
        # log_base_path = logs/name = the run directory itself
        "--logs", os.path.dirname(run_dir),
        "--name", os.path.basename(run_dir),
        "--save-frequency", "1" if cfg.keep_checkpoints else "0",
        # epoch_latest.pt is written to a temp file and renamed: a kill never leaves a torn resume point
        "--save-most-recent",
        "--resume", "latest",
        "--report-to", "wandb",  # routed to metrics.jsonl by laiontools.stages.train_worker
        "--log-every-n-steps", str(cfg.log_every),
    ]  # fmt: skip
    return argv + list(s["open_clip_args"])


def checkpoint_epoch(path: str) -> int:
    """Completed virtual epochs stored in an open_clip training checkpoint (loaded weights-only).
    Raises TrainError naming the file when it is not one (cut short by a kill or a full disk)."""
    import pickle

    import torch

    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
        return int(ckpt["epoch"])
    except (RuntimeError, EOFError, pickle.UnpicklingError, KeyError, TypeError, ValueError) as e:
        raise TrainError(
            f"{path} is not a readable training checkpoint ({type(e).__name__}: {str(e)[:200]}); it is damaged: remove it "
            "to train that run from the start, or give a new --output"
        ) from None


def _read_metrics(path: str) -> list[dict[str, Any]]:
    if not os.path.exists(path):
        return []
    out = []
    with open(path) as f:
        for line in f:
            line = line.strip()
            if line:
                try:
                    out.append(json.loads(line))
                except ValueError:
                    log.warning("%s: skipping a torn line (the run was killed while writing it)", path)
    return out


def _truncate_metrics(path: str, last_step: int) -> int:
    """Drop metric lines past the checkpoint being resumed from (they will be trained again), and a
    torn line (a write cut short by a full disk): the resumed worker appends after what is left, so a
    fragment left in place would swallow its first record. Returns the records dropped."""
    from laiontools.core.storage import atomic_write_bytes

    if not os.path.exists(path):
        return 0
    with open(path, "rb") as f:
        raw = f.read()
    keep, dropped = [], 0
    for line in raw.splitlines():
        try:
            rec = json.loads(line) if line.strip() else None
        except ValueError:
            rec = None
            log.warning("%s: dropping a torn line (the run was killed while writing it)", path)
        if rec is not None and int(rec["step"]) <= last_step:
            keep.append(line + b"\n")
        elif rec is not None:
            dropped += 1
    text = b"".join(keep)
    if text != raw:
        atomic_write_bytes(path, text)
    return dropped


def _check_same_run(run_dir: str, settings: dict[str, Any]) -> None:
    """Raise ConfigError if the run in `run_dir` trains something else than `settings` (identity keys), or
    trained under the seeding from before :func:`open_clip_seed` where that seeding differs."""
    from laiontools.core.config import changed_settings

    old = read_json(os.path.join(run_dir, layout.TRAIN_SETTINGS_JSON))
    diff = changed_settings(old, settings, IDENTITY_KEYS)
    if diff:
        raise ConfigError(f"train: {run_dir} holds a run with other settings: {diff}; use the original settings to resume "
                          "or reuse it, or give a new --output")
    sizes = _world_sizes_seeded_otherwise(run_dir, old)
    if sizes:
        s = int(old["seed"])
        raise ConfigError(
            f"train: {run_dir} was trained with seed {s} on {'/'.join(map(str, sizes))} processes under the earlier "
            f"seeding, where open_clip seeded rank r with {s} + r, the seed of rank 0 of seed {s} + r: its ranks drew the "
            f"shards of runs of other seeds, and seed replicates were not independent. It is not resumed or reused: delete "
            f"{run_dir} to train it again (rank r is now seeded {s} x processes + r), or give a new --output")


def _world_sizes_seeded_otherwise(run_dir: str, old: dict[str, Any]) -> list[int]:
    """The process counts (> 1) the run in `run_dir` trained with under the seeding from before
    :func:`open_clip_seed` (its settings, `old`, record no ``open_clip_seed``; open_clip got ``--seed seed``), when
    its seed is not 0: there that seeding and today's differ. [] for a run recorded since, one process, or seed 0:
    what it trained is what the same settings train today. The counts are the latest launch's (settings.json) and
    every ended launch's (launches.jsonl)."""
    if "open_clip_seed" in old or not int(old.get("seed", 0)):
        return []
    sizes = {int((old.get("plan") or {}).get("world_size", 1))}
    path = os.path.join(run_dir, layout.TRAIN_LAUNCHES_JSONL)
    if os.path.exists(path):
        with open(path) as f:
            for line in f:
                try:
                    sizes.add(int(json.loads(line).get("world_size", 1)))
                except (ValueError, TypeError, AttributeError):
                    continue  # a torn line of a killed launcher; the latest launch is in settings.json
    return sorted(n for n in sizes if n > 1)


def _prepare_run_dir(cfg: TrainConfig, settings: dict[str, Any], plan: Plan) -> int:
    """Write or check settings.json; return the samples already seen (from the resume checkpoint)."""
    run_dir = cfg.output
    settings_path = os.path.join(run_dir, layout.TRAIN_SETTINGS_JSON)
    if os.path.exists(settings_path):
        if not cfg.resume:
            raise ConfigError(
                f"train: {run_dir} already holds a run ({layout.TRAIN_SETTINGS_JSON} exists); pass --resume to continue it, "
                f"or give a new --output"
            )
        _check_same_run(run_dir, settings)
    write_record(settings_path, settings)
    ckpt = os.path.join(run_dir, layout.TRAIN_CHECKPOINT_DIR, LATEST_CHECKPOINT)
    done_steps = 0
    if os.path.exists(ckpt):
        epoch = checkpoint_epoch(ckpt)
        if epoch > plan.epochs:
            raise TrainError(f"{ckpt} is at virtual epoch {epoch}, past the planned {plan.epochs}; start a new --output")
        done_steps = epoch * plan.epoch_steps
    dropped = _truncate_metrics(os.path.join(run_dir, layout.TRAIN_METRICS_JSONL), done_steps)
    if cfg.resume:
        log.info(
            "resuming %s at samples seen %d of %d (step %d of %d)%s",
            run_dir,
            done_steps * plan.global_batch,
            plan.samples_seen,
            done_steps,
            plan.steps,
            f"; dropped {dropped} metric lines past the checkpoint" if dropped else "",
        )
    return done_steps * plan.global_batch


def _launch(cfg: TrainConfig, settings: dict[str, Any], plan: Plan) -> int:
    """Start torchrun with one laiontools.stages.train_worker per process; return its exit code."""
    from laiontools.core.launch import run_logged, torchrun_command, worker_env

    worker = ["-m", "laiontools.stages.train_worker", os.path.abspath(cfg.output)]  # reads open_clip_argv from settings.json
    # The trainer's own console output (its settings, the model, per-step lines) goes to a file: the
    # console gets our one-line summary, metrics.jsonl the numbers.
    console = os.path.join(cfg.output, "logs", "launcher.log")
    if plan.world_size == 1:  # a study's point: forked from a process that imported the trainer (core/zygote.py)
        from laiontools.core.zygote import run_module

        rc = run_module(worker[1], worker[2:], console, worker_env(1))
        if rc is not None:
            return rc
    return run_logged(torchrun_command(plan.world_size, worker), console, worker_env(plan.world_size))


def _finalize(cfg: TrainConfig, settings: dict[str, Any], plan: Plan, wall_s: float) -> dict[str, Any]:
    """Check the run reached its budget, write model.pt and result.json, then the completion marker."""
    import torch

    from laiontools.core import failpoints
    from laiontools.core.storage import atomic_open

    run_dir = cfg.output
    ckpt = os.path.join(run_dir, layout.TRAIN_CHECKPOINT_DIR, LATEST_CHECKPOINT)
    epoch = checkpoint_epoch(ckpt) if os.path.exists(ckpt) else 0
    if epoch != plan.epochs:
        raise TrainError(
            f"training in {run_dir} stopped at virtual epoch {epoch} of {plan.epochs} "
            f"(samples seen {epoch * plan.epoch_samples} of {plan.samples_seen}); see {run_dir}/out.log and "
            f"{run_dir}/logs/, then re-run with --resume"
        )
    metrics = _read_metrics(os.path.join(run_dir, layout.TRAIN_METRICS_JSONL))
    last = metrics[-1] if metrics else None
    if last is None or int(last["step"]) != plan.steps or int(last["samples_seen"]) != plan.samples_seen:
        raise TrainError(
            f"{run_dir}/metrics.jsonl ends at {last and last['step']} steps / {last and last['samples_seen']} samples, "
            f"expected {plan.steps} / {plan.samples_seen}: the metrics and the checkpoint disagree"
        )
    steps_logged = [int(r["step"]) for r in metrics]
    if steps_logged != sorted(set(steps_logged)):
        raise TrainError(f"{run_dir}/metrics.jsonl has repeated or unordered steps: {steps_logged[:20]}")
    final_loss = float(last["loss"])
    if not math.isfinite(final_loss):  # before model.pt is written: a diverged run leaves no model to evaluate
        raise _record_divergence(run_dir, plan, metrics, final_loss, [])
    ckpt_data = torch.load(ckpt, map_location="cpu", weights_only=True)
    sd = {(k.removeprefix("module.")): v for k, v in ckpt_data["state_dict"].items()}
    bad = [k for k, v in sd.items() if v.is_floating_point() and not bool(torch.isfinite(v).all())]
    if bad:
        raise _record_divergence(run_dir, plan, metrics, final_loss, bad)
    with atomic_open(os.path.join(run_dir, layout.TRAIN_MODEL_FILE)) as f:
        torch.save(sd, f)
    # The final-write phase: model.pt is there, result.json and its marker are not (kill tests widen it).
    failpoints.pause("train.final-write")
    sps = [r["samples_per_s"] for r in metrics[1:] if math.isfinite(r.get("samples_per_s", math.nan))]
    try:
        skip_events, skip_examples = skipped_samples_of_run(run_dir)
    except ValueError as e:
        raise TrainError(f"{e}; it is damaged: remove it (its skips go uncounted) and re-run with --resume") \
            from None
    result = {
        "run_dir": os.path.abspath(run_dir),
        "model": settings["model"],
        "manifest": settings["manifest"],
        "manifest_sha256": settings["manifest_sha256"],
        "samples_seen": plan.samples_seen,
        "samples_seen_requested": plan.samples_seen_requested,
        "steps": plan.steps,
        "global_batch": plan.global_batch,
        "epochs": plan.epochs,
        "world_size": plan.world_size,
        "final_loss": final_loss,
        "loss_finite": math.isfinite(final_loss),
        "median_samples_per_s": sorted(sps)[len(sps) // 2] if sps else None,
        "last_launch_wall_s": round(wall_s, 3),
        "skipped_sample_events": skip_events,
        "skipped_sample_events_note": SKIPPED_NOTE,
        "skipped_sample_examples": skip_examples,
        "checkpoint": layout.TRAIN_MODEL_FILE,
        "training_checkpoint": f"{layout.TRAIN_CHECKPOINT_DIR}/{LATEST_CHECKPOINT}",
    }
    result_path = os.path.join(run_dir, layout.TRAIN_RESULT_JSON)
    write_json(result_path, result)
    mark_done(result_path, {"samples_seen": plan.samples_seen, "steps": plan.steps})
    return result


# What result.json's skipped_sample_events counts (it goes into the result beside the count).
SKIPPED_NOTE = (
    "times the data loaders skipped a sample that did not load (its image did not decode, a member was missing, its tar could not be read), over every launch of this run "
    "(a killed launch's too, and samples read ahead for batches that were never trained); a sample drawn "
    "again and skipped again counts each time; the examples are the first names, by the time of each "
    "loader's first skip"
)

STAGE = "train"
CONFIG = TrainConfig


@stage_entry(STAGE)
def run(cfg: TrainConfig, spark: Any = None) -> StageResult:
    """Train ``cfg.model`` on ``cfg.manifest`` for exactly ``samples_seen // batch_size`` steps.

    details = the run's result dict (also in ``<output>/result.json``). A finished run is not trained
    again (its result is returned). With ``cfg.resume`` an interrupted run continues from its latest
    checkpoint with the exact samples-seen count. Raises ManifestError for a manifest without shards,
    ConfigError for inconsistent settings, TrainError when training fails or stops short, TrainDiverged (a
    TrainError) when its loss turned non-finite (it stops at the next check, every --log-every steps) or it reached its budget with
    non-finite weights, or did so before (``diverged.json``).
    ``spark`` is unused (training runs on torch.distributed); it is accepted for a uniform stage API.
    """
    if cfg.output.startswith("file://"):
        cfg = dataclasses.replace(cfg, output=cfg.output[len("file://") :])
    manifest = check_trainable_manifest(cfg.manifest)
    device = _device(cfg)
    epoch_samples = cfg.checkpoint_every or int(manifest["num_samples"])
    plan = plan_schedule(cfg.samples_seen, cfg.batch_size, cfg.nproc, epoch_samples, cfg.workers)
    if plan.samples_seen != cfg.samples_seen:
        log.warning(
            "samples seen %d is not a multiple of the global batch %d: the run makes %d steps and sees %d samples",
            cfg.samples_seen, plan.global_batch, plan.steps, plan.samples_seen,
        )  # fmt: skip
    if plan.epoch_samples * 2 < min(epoch_samples, plan.samples_seen) or plan.workers != cfg.workers:
        log.warning(
            "checkpoint interval %d samples (%d steps, %d loader workers) was the closest fit to %d samples that keeps "
            "the step count exact; a samples-seen budget with more divisors gives more freedom",
            plan.epoch_samples, plan.epoch_steps, plan.workers, epoch_samples,
        )  # fmt: skip
    settings = build_settings(cfg, manifest, plan, device, cfg.output)
    if is_finished(cfg.output):
        _check_same_run(cfg.output, settings)
        log.info("%s is already finished; not training again", cfg.output)
        return _result(cfg, read_result(cfg.output), f"{cfg.output} is already finished; not trained again")
    diverged = read_divergence(cfg.output)
    if diverged is not None:  # a result too: the same command again reports it, as the run that diverged did
        _check_same_run(cfg.output, settings)
        raise _diverged(cfg.output, diverged)
    os.makedirs(cfg.output, exist_ok=True)
    resumed_from = _prepare_run_dir(cfg, settings, plan)
    urls = shard_urls(cfg.manifest, manifest)
    # Weight shards by their sample counts so resampling draws every sample with equal probability.
    write_json(os.path.join(cfg.output, layout.TRAIN_SHARDS_JSON), {"urls": urls, "weights": [int(s["num_samples"]) for s in manifest["shards"]]})
    write_json(os.path.join(cfg.output, layout.TRAIN_ENVIRONMENT_JSON), environment(device, plan.world_size))
    for p in glob.glob(os.path.join(cfg.output, layout.TRAIN_LOGS_DIR, "rank*.stop")) + \
            glob.glob(os.path.join(cfg.output, layout.TRAIN_LOGS_DIR, "rank*.diverged")):  # a killed run's
        os.remove(p)
    t0 = time.time()
    logs_before = _run_logs(cfg.output)
    rc = _launch(cfg, settings, plan)
    wall = time.time() - t0
    with open(os.path.join(cfg.output, layout.TRAIN_LAUNCHES_JSONL), "a") as f:
        f.write(json.dumps({"start": t0, "wall_s": round(wall, 3), "resumed_from_samples": resumed_from, "exit_code": rc, "world_size": plan.world_size}) + "\n")
    stopped = _stopped_diverged(cfg.output)
    if stopped is not None:  # every rank stopped at a non-finite loss (train_worker._stop_on_divergence)
        raise _record_divergence(cfg.output, plan, _read_metrics(os.path.join(cfg.output, layout.TRAIN_METRICS_JSONL)),
                                 math.nan, [], stopped_at=stopped)
    if rc != 0:
        stops = sorted(glob.glob(os.path.join(cfg.output, layout.TRAIN_LOGS_DIR, "rank*.stop")))
        if stops:  # a rank said why (train_worker: no sample decodes)
            with open(stops[0]) as f:
                reason = f.read().strip()
            for p in stops:  # a re-run after the shards are fixed starts without it
                os.remove(p)
            raise TrainError(f"training in {cfg.output} stopped: {reason}")
        fault = _logged_environment_fault(cfg.output, logs_before)
        if fault is not None:  # a full disk met inside a rank (a checkpoint it saved): one line naming it
            raise fault
        raise TrainError(
            f"training exited with code {rc}; see {cfg.output}/logs/launcher.log, {cfg.output}/out.log and "
            f"{cfg.output}/logs/rank*.log, "
            f"then re-run with --resume to continue from the latest checkpoint"
        )
    result = _finalize(cfg, settings, plan, wall)
    return _result(cfg, result, (
        f"trained {cfg.model} on {manifest['name']} ({manifest['num_samples']} samples): {plan.samples_seen} samples seen, "
        f"{plan.steps} steps of {plan.global_batch}, final loss {result['final_loss']:.4f}\n"
        + (f"the data loaders skipped a sample that did not load "
           f"{result['skipped_sample_events']} times (result.json: skipped_sample_events, "
           f"skipped_sample_examples; logs/rank*.log names them)\n" if result["skipped_sample_events"] else "")
        + f"run directory: {os.path.abspath(cfg.output)}  (model: {layout.TRAIN_MODEL_FILE}, metrics: metrics.jsonl)"
    ))


def _result(cfg: TrainConfig, result: dict[str, Any], summary: str) -> StageResult:
    out = os.path.abspath(cfg.output)
    return StageResult(
        outputs={"run": out, "model": os.path.join(out, layout.TRAIN_MODEL_FILE), "result": os.path.join(out, layout.TRAIN_RESULT_JSON)},
        counts={k: int(result[k]) for k in ("samples_seen", "steps", "skipped_sample_events")
                if isinstance(result.get(k), int)},
        details=result, summary=summary,
    )


def build_parser() -> argparse.ArgumentParser:
    return config_parser(
        TrainConfig, prog="laiontools train", skip=("open_clip_args",),
        description="Train an open_clip model on a resharded subset manifest for a fixed number of samples seen "
        "(open_clip_train under torchrun; NCCL on GPUs, gloo on CPU).",
    )


def main(argv: list[str] | None = None) -> int:
    from laiontools.core.stage import stage_main

    return stage_main(__name__, argv)
