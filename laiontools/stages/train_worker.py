"""Per-rank entry point that torchrun starts: ``python -m laiontools.stages.train_worker <run_dir>``.

It is a thin shim around open_clip's own trainer (``open_clip_train.main.main``); it adds only what
laiontools needs in every rank, without copying the trainer:

* registers the tiny model configs shipped with laiontools, so ``lt-tiny`` resolves in each rank;
* reads open_clip's arguments from ``<run_dir>/settings.json`` (``open_clip_argv``) and the shard
  list and sampling weights from ``<run_dir>/shards.json`` (so thousands of shard URLs never hit the
  command-line length limit, and torchrun's own parser never sees them), passing the shards as
  ``--train-data`` and ``--train-data-upsampling-factors``;
* writes every rank's log to ``<run_dir>/logs/rank<R>.log``;
* makes every checkpoint open_clip_train writes atomic (:func:`_atomic_checkpoints`);
* seeds open_clip's sample shuffle buffer, and each loader process's random state, per virtual epoch from the
  data seeds, not the clock (:func:`_seed_sample_shuffle`): a run trains the same weights, uninterrupted or resumed;
* seeds the shard draws of a rank that reads its own data (``--workers 0``) by epoch, rank and the user's seed
  (:func:`_seed_shard_draws_in_the_rank`; open_clip's own ``--seed`` is that seed times the world size);
* names every sample the loader skips in the rank's log and counts it in ``<run_dir>/logs/skipped/``
  (:class:`SkipRecord`; the train stage sums them into result.json), and stops a loader that reads
  nothing that decodes (:func:`_stop_when_nothing_decodes`);
* stops every rank at the first non-finite loss, found at the next check (every --log-every-n-steps steps), and says at which step in
  ``<run_dir>/logs/rank<R>.diverged`` (:func:`_stop_on_divergence`; the train stage records the run as diverged);
* receives open_clip's per-step training logs through its experiment-tracker interface (the calls it
  makes on ``wandb`` when ``--report-to wandb`` is given) and writes them as JSON lines to
  ``<run_dir>/metrics.jsonl``. No tracker is contacted; the real ``wandb`` is never called.
"""

from __future__ import annotations

import json
import logging
import os
import sys
import time
from typing import Any

from laiontools.contracts import layout
from laiontools.core.images import error_text
from laiontools.core.logs import RateLimitedLogger

log = logging.getLogger(__name__)


class MetricsSink:
    """Stands in for the ``wandb`` module inside open_clip_train: ``log()`` appends JSON lines.

    open_clip calls ``wandb.log(log_data, step=step)`` on the master rank after each logged optimizer
    step, with ``step`` the 0-based index of the step just finished and keys ``train/loss``,
    ``train/samples_per_second``, ``train/samples_per_second_per_gpu``, ``train/lr``, ... . Each
    call becomes one record ``{step, samples_seen, loss, samples_per_s, samples_per_s_per_device, ...}``
    where ``step`` counts finished optimizer steps and ``samples_seen = step * global_batch``.
    """

    def __init__(self, path: str, global_batch: int) -> None:
        self.path = path
        self.global_batch = global_batch
        self.t0 = time.time()

    # -- the subset of the wandb interface open_clip_train uses --------------------------------
    def init(self, *args: Any, **kwargs: Any) -> None:
        return None

    def save(self, *args: Any, **kwargs: Any) -> None:
        return None

    def watch(self, *args: Any, **kwargs: Any) -> None:
        return None

    def finish(self, *args: Any, **kwargs: Any) -> None:
        return None

    def log(self, data: dict[str, Any], step: int | None = None, **kwargs: Any) -> None:
        if step is None or "train/loss" not in data:
            return  # evaluation logs (not used by laiontools train) carry no training step
        done = int(step) + 1
        rec: dict[str, Any] = {
            "step": done,
            "samples_seen": done * self.global_batch,
            "loss": float(data["train/loss"]),
            "samples_per_s": float(data.get("train/samples_per_second", float("nan"))),
            "samples_per_s_per_device": float(data.get("train/samples_per_second_per_gpu", float("nan"))),
            "lr": float(data.get("train/lr", float("nan"))),
            "logit_scale": float(data.get("train/scale", float("nan"))),
            "data_time": float(data.get("train/data_time", float("nan"))),
            "batch_time": float(data.get("train/batch_time", float("nan"))),
            "wall_s": round(time.time() - self.t0, 3),
        }
        for k, v in data.items():  # every loss term open_clip reports (contrastive_loss, ...)
            if k.startswith("train/") and k.endswith("_loss"):
                rec[k[len("train/") :]] = float(v)
        with open(self.path, "a") as f:
            f.write(json.dumps(rec) + "\n")
            f.flush()


def _with_data_args(run_dir: str, argv: list[str]) -> list[str]:
    with open(os.path.join(run_dir, layout.TRAIN_SHARDS_JSON)) as f:
        shards = json.load(f)
    urls, weights = shards["urls"], shards["weights"]
    return [
        "--train-data",
        "::".join(urls),
        "--train-data-upsampling-factors",
        "::".join(repr(float(w)) for w in weights),
        *argv,
    ]


def _global_batch(argv: list[str]) -> int:
    per_rank = int(argv[argv.index("--batch-size") + 1])
    return per_rank * int(os.environ.get("WORLD_SIZE", "1"))


def _allow_cpu_ddp() -> None:
    """Let open_clip_train wrap CPU models in DDP on current torch.

    open_clip_train 3.3 calls ``DistributedDataParallel(model, device_ids=[device])`` on every
    device; torch >= 2.5 rejects ``device_ids`` for CPU modules (they must be None there). A subclass
    that drops CPU ``device_ids`` keeps the trainer unmodified and ``isinstance`` checks intact. It is
    installed only in CPU worker processes started by laiontools.
    """
    import torch
    from torch.nn.parallel import DistributedDataParallel

    class _CpuDDP(DistributedDataParallel):
        def __init__(self, module: Any, device_ids: Any = None, **kwargs: Any) -> None:
            if device_ids and all(torch.device(d).type == "cpu" for d in device_ids):
                device_ids = None
            super().__init__(module, device_ids=device_ids, **kwargs)

    torch.nn.parallel.DistributedDataParallel = _CpuDDP  # type: ignore[misc]


def _no_shard_eof_marker() -> None:
    """Make open_clip_train's tar reader work with webdataset >= 0.2.96.

    Those webdataset versions yield an empty dict at the end of each shard (``eof_value={}``), which
    open_clip_train's ``group_by_keys_nothrow`` cannot handle (KeyError 'fname';
    webdataset/webdataset#384, mlfoundations/open_clip#935). The fix given there is
    ``eof_value=None``; open_clip_train.data looks ``tar_file_expander`` up at call time.
    """
    import functools

    import open_clip_train.data as oc_data
    from webdataset.tariterators import tar_file_expander

    if "eof_value" in tar_file_expander.__code__.co_varnames:
        oc_data.tar_file_expander = functools.partial(tar_file_expander, eof_value=None)  # type: ignore[attr-defined]


def _seed_shard_draws_in_the_rank(seed: int) -> None:
    """Draw each virtual epoch's shards afresh when the rank reads its own data (``--workers 0``).

    open_clip's resampled shard stream reseeds itself at every epoch from ``pytorch_worker_seed(epoch)``,
    which adds the epoch to a dataloader worker's seed but, outside a worker process, returns webdataset's
    ``rank * 1000``: the epoch and ``--seed`` were ignored, every virtual epoch drew the same shards in the
    same order, and a subset larger than what one epoch reads was never seen past the shards of the first.
    In the rank the seed is made from (the user's seed, rank, epoch); a dataloader worker's is open_clip's own
    (from the rank's torch generator, seeded ``seed * world_size + rank``: :func:`laiontools.stages.train.open_clip_seed`).
    open_clip_train.data looks the name up at each epoch.
    """
    import hashlib

    import open_clip_train.data as oc_data
    from torch.utils.data import get_worker_info

    worker_seed = oc_data.pytorch_worker_seed

    def seeded(increment: int = 0) -> int:
        if get_worker_info() is not None:
            return worker_seed(increment)
        rank = int(os.environ.get("RANK", "0"))
        return int.from_bytes(hashlib.sha256(f"{seed}/{rank}/{increment}".encode()).digest()[:8], "big")

    oc_data.pytorch_worker_seed = seeded  # type: ignore[attr-defined]


def _seed_sample_shuffle() -> None:
    """Seed open_clip's sample shuffle buffer and each loader process's random state per virtual epoch.

    open_clip's pipeline shuffles samples through webdataset's ``shuffle`` stage, built without a seed, and
    webdataset then seeds it from the process id and the time (``filters._shuffle``): two runs of one command
    trained on other sample orders and ended with other weights. And a loader process's random state (the
    random crops) carried from one virtual epoch to the next, so a run resumed at epoch k (its loader
    processes started afresh) drew other crops than the uninterrupted run. Each epoch's pipeline in a loader
    process now seeds its shuffle buffer, and torch's, numpy's and ``random``'s state in that process, from the
    process's data seed (``pytorch_worker_seed()``: a loader worker's own, drawn from its rank's seeded torch
    generator; in a rank that reads its own data, (seed, rank): :func:`_seed_shard_draws_in_the_rank`) and the
    epoch its shard stream was drawn for (open_clip's ``ResampledShards2`` asks ``pytorch_worker_seed(epoch)``
    for it, before the first sample reaches the shuffle): the same command trains the same samples in the same
    order with the same crops, uninterrupted or killed and resumed. open_clip_train.data looks
    ``wds.shuffle`` and ``pytorch_worker_seed`` up when it builds and iterates the pipeline."""
    import hashlib
    import itertools
    import random

    import numpy as np
    import open_clip_train.data as oc_data
    import torch
    import webdataset.filters as wf

    process_seed = oc_data.pytorch_worker_seed
    drawn: dict[str, Any] = {"epoch": None, "starts": 0}

    def worker_seed(increment: int = 0) -> int:
        drawn["epoch"] = increment  # what the shard stream asks for: its epoch
        return process_seed(increment)

    def shuffle(data: Any, bufsize: int = 1000, initial: int = 100, rng: Any = None, seed: Any = None,
                handler: Any = None) -> Any:
        if rng is not None or seed is not None:
            yield from wf._shuffle(data, bufsize, initial, rng=rng, seed=seed, handler=handler)
            return
        it = iter(data)
        end = object()
        first = next(it, end)  # the shard stream starts here: its epoch is known from now
        if first is end:
            return
        drawn["starts"] += 1
        epoch = drawn["epoch"] if drawn["epoch"] is not None else f"start{drawn['starts']}"
        s = int.from_bytes(hashlib.sha256(f"{process_seed(0)}/{epoch}".encode()).digest()[:8], "big")
        torch.manual_seed(s)  # the crops of this epoch's samples (drawn after the shuffle)
        np.random.seed(s % (1 << 32))
        random.seed(s)
        yield from wf._shuffle(itertools.chain([first], it), bufsize, initial, seed=s, handler=handler)

    oc_data.pytorch_worker_seed = worker_seed  # type: ignore[attr-defined]
    oc_data.wds.shuffle = wf.pipelinefilter(shuffle)  # type: ignore[attr-defined]

class Diverged(RuntimeError):
    """The loss was not finite at optimizer step `step` (the count of steps finished once it is, as
    metrics.jsonl counts them) in some rank: every rank raises it at the same step."""

    def __init__(self, step: int) -> None:
        super().__init__(f"the loss was not finite at step {step}")
        self.step = step


def _stop_on_divergence(every: int) -> None:
    """Stop training at the first check that finds a non-finite loss, instead of at the end of the budget.

    A NaN or infinite loss does not come back once AdamW has spread it into the weights, yet open_clip trains
    on to the end of the run: a study point that diverged early spent its whole budget (a large point: days
    of GPU time) to be recorded as diverged. Each optimizer step keeps, in a tensor on the loss's device (no
    wait for the device), the first step of the run of non-finite losses it is in; every `every` steps (the
    metrics interval) the ranks take the minimum of it (one all-reduce of one number) and, if the loss is
    still not finite there, all of them raise :class:`Diverged` at that same step, so none is left waiting
    in a collective. The step recorded is where the non-finite losses began, exact. A non-finite loss that
    is finite again by the check (fp16 mixed precision: the grad scaler skips that step and training goes
    on) does not stop the run; with a grad scaler neither does one that began after the check before (the
    run stops once its non-finite losses have lasted a whole interval, at least two steps). open_clip_train.train looks `backward` up at call time, and main
    `train_one_epoch` (its own name for it); the plan makes one optimizer step a batch (train refuses --accum-freq)."""
    import open_clip_train.main as oc_main
    import open_clip_train.train as oc_train
    import torch

    state: dict[str, Any] = {"base": 0, "i": 0, "since": None}
    one_epoch, backward = oc_train.train_one_epoch, oc_train.backward
    none = torch.iinfo(torch.int64).max

    def train_one_epoch(model: Any, data: Any, loss: Any, epoch: int, *a: Any, **k: Any) -> Any:
        state["base"], state["i"] = data["train"].dataloader.num_batches * epoch, 0
        if epoch > 0:  # (kill tests: the checkpoint of the epoch before is written)
            from laiontools.core import failpoints

            failpoints.pause("train.epoch-start")
        return one_epoch(model, data, loss, epoch, *a, **k)

    def checked_backward(total_loss: Any, scaler: Any) -> Any:
        state["i"] += 1
        step = state["base"] + state["i"]
        with torch.no_grad():
            if state["since"] is None:  # (made once: "none", the value of a finite step, on the loss's device)
                state["none"] = state["since"] = torch.full((), none, dtype=torch.int64, device=total_loss.device)
            # the first step of the run of non-finite losses that this step is in (none: this one is finite)
            since = torch.where(torch.isfinite(total_loss.detach()).all(), state["none"],
                                torch.clamp(state["since"], max=step))
            state["since"] = since
            if step % every == 0:
                import torch.distributed as dist

                first = since.clone()
                if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
                    dist.all_reduce(first, op=dist.ReduceOp.MIN)
                bad = int(first.item())
                # With a grad scaler a non-finite loss leaves the weights as they were (the scaler skips the
                # step), so a step that is not finite only at the check is no divergence: there the run stops
                # once its non-finite losses have lasted a whole interval (at least two steps). The scaler is
                # the same in every rank, and `bad` the all-reduced value: every rank decides alike.
                need = max(2, every) if scaler is not None else 1
                if bad != none and bad <= step - need + 1:
                    raise Diverged(bad)
        return backward(total_loss, scaler)

    oc_train.train_one_epoch = train_one_epoch  # type: ignore[attr-defined]
    oc_main.train_one_epoch = train_one_epoch  # type: ignore[attr-defined]  (main imported the name itself)
    oc_train.backward = checked_backward  # type: ignore[attr-defined]


def _atomic_checkpoints() -> None:
    """Make ``torch.save`` to a path in this process write a temp file in the same folder, fsync it
    and rename it over the path (:func:`laiontools.core.storage.atomic_open`).

    open_clip_train saves ``epoch_<N>.pt`` (``--save-frequency``, and the last epoch) straight to its
    path, so a kill or a full disk during the write left a truncated checkpoint under the final name,
    for a user, evaluate or a later ``--resume`` to pick up; its ``epoch_latest.pt`` goes through
    ``tmp.pt`` and a rename, but without an fsync. Wrapping the one function open_clip_train calls
    (it looks ``torch.save`` up at call time) covers both without copying its code. A file object
    destination is the caller's to manage and is written as before. The worker process runs
    nothing but the trainer, so the wrap is process-wide.
    """
    import torch

    save = torch.save
    if getattr(save, "laiontools_atomic", False):
        return

    def atomic_save(obj: Any, f: Any, *args: Any, **kwargs: Any) -> None:
        if not isinstance(f, (str, os.PathLike)):
            return save(obj, f, *args, **kwargs)
        from laiontools.core.storage import atomic_open

        with atomic_open(os.fspath(f)) as fh:
            save(obj, fh, *args, **kwargs)
        return None

    atomic_save.laiontools_atomic = True  # type: ignore[attr-defined]
    torch.save = atomic_save  # type: ignore[assignment]


class NothingDecodes(RuntimeError):
    """The first samples a loader read all failed to load: the shards hold nothing to train on.

    ``str()`` is the message whatever webdataset appends to ``args`` on the way up (its tar expander
    adds the stream and the URL to an exception that passes through it)."""

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message

    def __str__(self) -> str:
        return self.message


# A loader process gives up when this many samples failed to load before any loaded.
UNDECODABLE_LIMIT = 1000
# Sample names a skip record keeps (the result keeps as many, over all records).
SKIPPED_EXAMPLES = 20


class SkipRecord:
    """This process's skipped samples, kept in ``<run_dir>/logs/skipped/<t>-rank<R>-pid<P>.json``.

    The loader's handler runs in dataloader worker processes (forked from each rank, or the rank itself
    with ``--workers 0``), which share nothing with the train stage: each process writes its own record
    ``{"rank", "pid", "events", "examples"}`` (``events``: the skips so far; ``examples``: the first
    :data:`SKIPPED_EXAMPLES` names, the text of the log line) and rewrites it whole at every skip, through
    a temp file and a rename, so the file always holds a complete count. ``<t>`` (nanoseconds at the
    process's first skip, zero-padded) orders the records by time. A process started by fork gets a
    record of its own: the parent's state it inherits is dropped at its first skip. No fsync: a killed
    process's last rename is in the page cache, and a whole bad shard can skip thousands of samples.
    """

    def __init__(self, folder: str) -> None:
        self.folder = folder
        self.pid: int | None = None
        self.path = ""
        self.events = 0
        self.examples: list[str] = []

    def add(self, what: str) -> None:
        """Count one skipped sample named `what` and rewrite this process's record. Raises OSError when
        the record cannot be written (the count would be wrong; a full disk ends the run anyway)."""
        pid = os.getpid()
        if self.pid != pid:  # first skip in this process
            self.pid, self.events, self.examples = pid, 0, []
            rank = int(os.environ.get("RANK", "0"))
            self.path = os.path.join(self.folder, f"{time.time_ns():020d}-rank{rank}-pid{pid}.json")
            os.makedirs(self.folder, exist_ok=True)
        self.events += 1
        if len(self.examples) < SKIPPED_EXAMPLES:
            self.examples.append(what)
        rec = {"rank": int(os.environ.get("RANK", "0")), "pid": pid, "events": self.events,
               "examples": self.examples}  # fmt: skip
        tmp = self.path + ".tmp"
        with open(tmp, "w") as f:
            f.write(json.dumps(rec) + "\n")
        os.replace(tmp, self.path)


def skipped_samples_of_run(run_dir: str) -> tuple[int, list[str]]:
    """(skip events, the first :data:`SKIPPED_EXAMPLES` sample names) summed over every record in
    ``<run_dir>/logs/skipped``: every loader process of every rank of every launch of the run (a killed
    launch's records stay). Records are read in name order (by the time of their first skip), so the
    result depends only on the files. Raises ValueError naming a record that is not one."""
    folder = os.path.join(run_dir, layout.TRAIN_SKIPPED_DIR)
    names = sorted(n for n in os.listdir(folder) if n.endswith(".json")) if os.path.isdir(folder) else []
    events = 0
    examples: list[str] = []
    for name in names:
        path = os.path.join(folder, name)
        try:
            with open(path) as f:
                rec = json.load(f)
            n, ex = int(rec["events"]), [str(e) for e in rec["examples"]]
        except (ValueError, KeyError, TypeError) as e:
            raise ValueError(f"{path} is not a skipped-sample record ({type(e).__name__}: {e})") from None
        events += n
        examples.extend(ex[: SKIPPED_EXAMPLES - len(examples)])
    return events, examples


def _stop_when_nothing_decodes(record_dir: str, limit: int = UNDECODABLE_LIMIT) -> None:
    """Make open_clip's loader count every sample it skips, and stop, not spin, when none decodes.

    open_clip skips a sample whose image fails to decode (``log_and_continue``) and draws the next from
    resampled shards, which never end: with shards whose images all fail, it never yields a batch and
    the run waits for good. Counting per loader process (dataloader workers are forked after this, each
    with its own count): a sample that reaches the image transform loaded; when the first `limit`
    samples all failed, the handler raises :class:`NothingDecodes`. A sample that loads ends the watch.
    Every skip is logged by name (rate-limited) and counted in a :class:`SkipRecord` under `record_dir`,
    the failure that stops the loader too. open_clip_train.data looks both names up when it builds the
    pipeline.
    """
    import open_clip_train.data as oc_data

    state = {"loaded": 0, "failed": 0}
    handler, get_wds_dataset = oc_data.log_and_continue, oc_data.get_wds_dataset
    tarfile_to_samples, keep_sample = oc_data.tarfile_to_samples_nothrow, oc_data.filter_no_caption_or_no_image
    skipped = RateLimitedLogger(log)
    record = SkipRecord(record_dir)

    def count_failure(what: str, exn: BaseException | None) -> None:
        state["failed"] += 1
        record.add(what)
        if not state["loaded"] and state["failed"] >= limit:
            raise NothingDecodes(
                f"{LOADER_STOP_TAG}the first {limit} samples this data loader read all failed to load (the last: "
                f"{what}); the shards hold no image that decodes: check them with `laiontools verify` on the manifest"
            ) from exn

    def counted_handler(exn: BaseException) -> bool:
        if isinstance(exn, NothingDecodes):  # the stop, passing through webdataset's tar expander: not a new failure
            raise exn
        what = skipped_sample(exn)
        count_failure(what or f"{type(exn).__name__}: {str(exn)[:200]}", exn)
        if what is None:
            return handler(exn)
        # open_clip's own line says "Handling webdataset error (DecodingError()). Ignoring.": no sample, no cause
        skipped.warn("skipped", "skipped a sample that does not load: %s", what)
        return True

    def counted_tarfile_to_samples(src: Any, handler: Any = counted_handler) -> Any:
        # open_clip binds its log_and_continue as this function's default when the module is defined: a shard
        # that cannot be read (cut short, damaged) went to that handler, uncounted, and shards that all fail so
        # looped forever
        return tarfile_to_samples(src, handler=handler)

    def counted_filter(sample: dict[str, Any]) -> bool:
        # open_clip drops a sample without a caption or an image without a word: shards of such samples only
        # never yielded a batch, and the run waited forever
        if keep_sample(sample):
            return True
        missing = "caption (.txt)" if "txt" not in sample else "image (.jpg/.jpeg/.png/.webp)"
        what = f"{sample.get('__key__')} of {sample.get('__url__')}: no {missing} member"
        count_failure(what, None)
        skipped.warn("skipped", "skipped a sample that does not load: %s", what)
        return False

    def counted_get_wds_dataset(args: Any, preprocess_img: Any, *a: Any, **k: Any) -> Any:
        def loaded(image: Any) -> Any:
            state["loaded"] += 1
            return preprocess_img(image)

        return get_wds_dataset(args, loaded, *a, **k)

    oc_data.log_and_continue = counted_handler  # type: ignore[attr-defined]
    oc_data.get_wds_dataset = counted_get_wds_dataset  # type: ignore[attr-defined]
    oc_data.tarfile_to_samples_nothrow = counted_tarfile_to_samples  # type: ignore[attr-defined]
    oc_data.filter_no_caption_or_no_image = counted_filter  # type: ignore[attr-defined]


def _decode_wide_images() -> None:
    """Give webdataset's image decoder an 8-bit copy of a 16-bit grey PNG or TIFF.

    open_clip decodes with ``wds.decode("pilrgb")``, whose ``convert("RGB")`` clips a 16-bit value at
    255: such an image trains as a white one. The copy's values follow the rule every other reader
    uses (:func:`laiontools.core.images.eight_bit_png`); other images go through untouched (only PNG
    and TIFF headers are looked at)."""
    from webdataset import autodecode

    from laiontools.core.images import eight_bit_png

    decode = autodecode.ImageHandler.__call__
    if getattr(decode, "_laiontools_wide", False):
        return

    def call(self: Any, key: str, data: bytes) -> Any:
        try:
            eight = eight_bit_png(data)
        except Exception:  # noqa: BLE001 - the decoder below raises its own error for these bytes
            eight = None
        return decode(self, key, data if eight is None else eight)

    call._laiontools_wide = True  # type: ignore[attr-defined]
    autodecode.ImageHandler.__call__ = call  # type: ignore[method-assign]


def skipped_sample(exn: BaseException) -> str | None:
    """``<key> (<member>) of <shard>: <cause>`` for webdataset's DecodingError (it carries the sample's key,
    member and shard, and the decoder's error as its cause), None for any other error."""
    key, url = getattr(exn, "key", None), getattr(exn, "url", None)
    if key is None or url is None:
        return None
    cause = exn.__cause__ or exn.__context__
    why = error_text(cause) if cause is not None else type(exn).__name__
    return f"{key} ({getattr(exn, 'k', None) or '?'}) of {url}: {why}"


# The message of a loader stop starts with this; the train stage puts that line in its error.
LOADER_STOP_TAG = "laiontools train: "


def _stop_reason(e: BaseException) -> str | None:
    """The loader stop's own line in `e` (torch re-raises a worker's error with its traceback as text)."""
    for line in str(e).splitlines():
        i = line.find(LOADER_STOP_TAG)
        if i >= 0:
            return line[i + len(LOADER_STOP_TAG) :]
    return None


# URL schemes whose shards open_clip's webdataset reader gets through fsspec (the same layer every other
# stage reads object stores with): webdataset itself has no s3 reader and sends gs:// to a `gsutil` pipe.
FSSPEC_SCHEMES = ("s3", "s3a", "gs", "gcs", "hdfs", "abfs", "az")


def _object_store_shards() -> None:
    """Let webdataset open ``s3://`` (and other object-store) shard URLs through fsspec.

    Credentials and endpoints come from the environment or fsspec's configuration in the worker
    process (as in every stage), never from the shard list or open_clip's arguments, so they do not
    reach settings.json, params.txt or the logs. The table is module state: dataloader workers forked
    after this call inherit it.
    """
    import importlib

    wds_gopen = importlib.import_module("webdataset.gopen")  # the module: `webdataset.gopen` is also a function name

    def gopen_fsspec(url: str, mode: str = "rb", bufsize: int = 8192, **_kw: Any) -> Any:
        from laiontools.core.storage import url_to_fs

        fs, p = url_to_fs(url)
        return fs.open(p, mode, block_size=max(bufsize, 1 << 22))

    for scheme in FSSPEC_SCHEMES:
        wds_gopen.gopen_schemes[scheme] = gopen_fsspec


# The exit code of a rank that stopped on a non-finite loss (:func:`_stop_on_divergence`).
DIVERGED_EXIT = 3


def preload() -> None:
    """Import what a rank imports before it trains (a study's zygote runs this once: core/zygote.py)."""
    # open_clip_train imports wandb if installed (slow, and never used: MetricsSink replaces it).
    sys.modules.setdefault("wandb", None)  # type: ignore[arg-type]
    import open_clip_train.main
    import open_clip_train.train  # noqa: F401


def main(argv: list[str] | None = None) -> int:
    """Run open_clip's trainer for one rank. Returns 0 on success, 1 if open_clip reported an error."""
    argv = list(sys.argv[1:] if argv is None else argv)
    run_dir = argv[0]
    with open(os.path.join(run_dir, layout.TRAIN_SETTINGS_JSON)) as f:
        settings = json.load(f)
    oc_argv = list(settings["open_clip_argv"]) + argv[1:]
    from laiontools.core.launch import die_with_parent

    die_with_parent()
    rank = int(os.environ.get("RANK", "0"))
    os.makedirs(os.path.join(run_dir, layout.TRAIN_LOGS_DIR), exist_ok=True)
    # open_clip's setup_logging adds its own handlers to the root logger and keeps ours.
    fh = logging.FileHandler(os.path.join(run_dir, layout.TRAIN_LOGS_DIR, f"rank{rank}.log"))
    fh.setFormatter(logging.Formatter(f"%(asctime)s [r{rank}] %(levelname)s %(name)s: %(message)s"))
    logging.root.addHandler(fh)

    preload()
    from laiontools.models.registry import register_tiny_models

    register_tiny_models()
    import open_clip_train.main as oc_main
    import open_clip_train.train as oc_train

    _no_shard_eof_marker()
    _object_store_shards()
    _atomic_checkpoints()
    _stop_when_nothing_decodes(os.path.join(run_dir, layout.TRAIN_SKIPPED_DIR))
    _decode_wide_images()
    # the user's seed (open_clip's --seed is seed x world size: train.open_clip_seed); (seed, rank) hashed is
    # already one stream per seed and rank
    _seed_shard_draws_in_the_rank(int(settings["seed"]))
    _seed_sample_shuffle()
    _stop_on_divergence(int(oc_argv[oc_argv.index("--log-every-n-steps") + 1]) if "--log-every-n-steps" in oc_argv else 1)
    if oc_argv[oc_argv.index("--device") + 1].startswith("cpu"):
        _allow_cpu_ddp()
    sink = MetricsSink(os.path.join(run_dir, layout.TRAIN_METRICS_JSONL), _global_batch(oc_argv))
    # open_clip looks up the module-level name `wandb` at call time; this routes its tracker
    # calls to the metrics file.
    oc_main.wandb = sink  # type: ignore[attr-defined]
    oc_train.wandb = sink  # type: ignore[attr-defined]
    try:
        rc = oc_main.main(_with_data_args(run_dir, oc_argv))
    except Diverged as e:  # the train stage records the run as diverged (diverged.json) from this file
        log.warning("stopping: %s", e)
        write_stop = os.path.join(run_dir, layout.TRAIN_LOGS_DIR, f"rank{rank}.diverged")
        with open(write_stop + ".tmp", "w") as f:
            json.dump({"first_nonfinite_step": e.step}, f)
        os.replace(write_stop + ".tmp", write_stop)
        return DIVERGED_EXIT
    except Exception as e:
        reason = _stop_reason(e)
        if reason is None:
            raise
        # for the train stage's error line; the traceback goes to this rank's output as usual
        with open(os.path.join(run_dir, layout.TRAIN_LOGS_DIR, f"rank{rank}.stop"), "w") as f:
            f.write(reason + "\n")
        raise
    # open_clip's setup_logging set every logger to INFO, torch's too; keep torch's exit-time
    # compile statistics out of the console.
    for name in list(logging.root.manager.loggerDict):
        if name.startswith("torch"):
            logging.getLogger(name).setLevel(logging.WARNING)
    # open_clip returns -1 (and prints) for refused set-ups instead of raising.
    return 0 if rc in (None, 0) else 1


if __name__ == "__main__":
    code = main()
    # Everything this rank writes is written and closed by now (checkpoints atomically, metrics line by
    # line; the log handlers flushed here). The interpreter's own teardown of torch, open_clip and the
    # run's objects took ~2.3 s of CPU per rank here (a 2-step run: 9.5 s of CPU in all, 7.2 s without
    # it), which every point of a study grid paid: the rank leaves without it.
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)
