"""Embed a pool: open_clip image + caption embeddings and the CLIP score of every sample, per shard.

``laiontools embed --manifest <pool.manifest.json> --output <emb> --model <name> [--pretrained <tag|ckpt>]``

Output (names in :mod:`laiontools.contracts.layout`), one set of files per pool shard id, row-aligned::

    <emb>/img_emb/<id>.npy    <emb>/text_emb/<id>.npy   float16, L2-normalized, shape (rows, dim)
    <emb>/meta/<id>.parquet   uid, key, clip_score, embed_status, embed_error
    <emb>/scores/<id>.parquet uid, clip_score           (what subset filters read)
    <emb>/meta/<id>.parquet.done                        completion marker, written LAST
    <emb>/model.json          model identity + preprocessing + the pool it embeds (manifest sha256, fingerprint)
    <emb>/embed_report.json   totals, failed shards;   <emb>/settings.json  effective settings

This is clip-retrieval's layout, so ``embedding_reader.EmbeddingReader(<emb>/img_emb)`` and autofaiss
read it directly.

Row alignment: every sample (key) of a shard's tar gets exactly one row, in tar order. A sample whose
image cannot be decoded keeps its row with a zero image vector, ``clip_score`` null,
``embed_status='failed_decode'`` and the reason in ``embed_error``; it is counted and logged (rate
limited), and the shard still finishes. Its caption is still embedded. A sample without a valid uid
(none, or not 32 lowercase hex chars) or whose uid repeats an earlier sample of the shard gets the
same failed row (status ``failed_decode``, uid null, the reason and the raw uid in ``embed_error``).

Bad shards (file missing, sha256 not the manifest's, unreadable tar) are reported by name and skipped;
the other shards finish, the run lists the failed shards in ``embed_report.json`` and
:func:`main` exits 1 so a scheduler notices. Re-running retries only what is not done.

Engines, one code path (:func:`_embed_tasks`) for all of them:

``auto`` (default) is ``spark`` under spark-submit or when a Spark master is named, else ``local``.

* ``local``: one process; a torch DataLoader whose workers read the tars, decode and
  preprocess, so the model never waits on JPEG decode. Each shard is fetched and sha256-checked once
  per process (:class:`ShardSpool` stages it locally for the workers), whatever the worker count. Workers apply open_clip's resize / crop and
  hand over uint8 batches; scaling + normalization run once per batch on the model's device, and
  captions skip their padding (:mod:`laiontools.models.encode`: exact equivalents of open_clip's calls). Under ``torchrun`` (``WORLD_SIZE`` > 1) each
  rank takes ``shards[rank::world]`` and its GPU ``cuda:LOCAL_RANK``; rank 0 writes the report.
* ``spark``: one Spark task per shard (clip-retrieval's layout of work). With GPU scheduling
  configured (``spark.executor.resource.gpu.amount``, ``spark.task.resource.gpu.amount=1`` and a
  discovery script) each task embeds on the GPU Spark assigned to it
  (``TaskContext.get().resources()['gpu']``, mapped to torch's ordinal through the executor's
  ``CUDA_VISIBLE_DEVICES``: :func:`spark_task_device`); without it, on the CPU. ``--device cpu`` is the
  CPU in every task, GPU assigned or not; ``--device cuda:N`` is refused under GPU scheduling (Spark
  picks each task's GPU) and pins every task to GPU N without it. One probe task first resolves
  ``--precision`` (auto: amp_bf16 / amp_fp16 on a GPU, fp32 on the CPU) where the tasks run; model.json
  records it as ``precision_used``, so a resume on another engine or device that would embed in another
  precision is refused, and a task whose executor resolves another one fails its shards rather than
  mix precisions in the folder.

What other stages use lives in library modules, not here: the model side in
:mod:`laiontools.models.embedder` (:class:`Embedder`, :func:`embedder_for`: dedup embeds the
evaluation sets with the pool's model), reading the folder back in :mod:`laiontools.contracts.embeddings`
(:func:`read_embeddings`, :func:`load_model_json`, :func:`done_shards`).
"""

from __future__ import annotations

import contextlib
import dataclasses
import fcntl
import io
import json
import logging
import math
import os
import tarfile
import time
from collections.abc import Iterator, Sequence
from typing import Any

import numpy as np

from laiontools.contracts import layout
from laiontools.contracts.embeddings import (
    MARKER_BYTES,
    MARKER_SHA256,
    PRECISION_USED,
    SCORE_COLUMNS,
    STATUS_FAILED_DECODE,
    STATUS_OK,
    EmbedMismatchError,
    check_compatible,
    check_same_run_settings,
    shard_files,
)
from laiontools.contracts.schema import ManifestError
from laiontools.contracts.uids import is_uid
from laiontools.core import failpoints
from laiontools.core.config import ConfigError
from laiontools.core.errors import UserError
from laiontools.core.images import error_text
from laiontools.core.logs import RateLimitedLogger
from laiontools.core.stage import SparkStageConfig, StageResult, stage_entry, stage_spark
from laiontools.core.storage import (
    PARQUET_CODEC,
    PARQUET_WRITE,
    atomic_open,
    canonical_json,
    ensure_output_dir,
    join,
    mark_done,
    marker_path,
    read_json,
    read_markers,
    rm_path,
    sha256_file,
    spark_parquet_codec,
    url_to_fs,
    write_json,
    write_record,
)
from laiontools.models.embedder import PRECISIONS, Embedder, embedding_info, resolve_device, resolve_precision
from laiontools.wds.samples import POOL_IMAGE_EXTS, meta_key

log = logging.getLogger(__name__)
_sample_log = RateLimitedLogger(log)

ENGINES = ("auto", "local", "torchrun", "spark")


class ShardError(UserError, IOError):
    """A shard is missing, does not match its manifest sha256, or is not a readable tar."""


# --------------------------------------------------------------------------------------------------
# Config


@dataclasses.dataclass
class EmbedConfig(SparkStageConfig):
    manifest: str = dataclasses.field(default="", metadata={"help": "pool.manifest.json written by download"})
    output: str = dataclasses.field(default="", metadata={"help": "embeddings folder (new, or one to resume)"})
    model: str = dataclasses.field(default="ViT-B-32", metadata={"help": "open_clip model name"})
    pretrained: str | None = dataclasses.field(
        default=None, metadata={"help": "open_clip pretrained tag or local checkpoint path; none = random init"}
    )
    device: str | None = dataclasses.field(
        default=None, metadata={"help": "cuda, cuda:N or cpu (default: cuda if present; on Spark: the GPU Spark assigns "
                                        "each task, else cpu; cpu there is the CPU in every task)"})
    batch_size: int = dataclasses.field(default=256, metadata={"help": "samples per forward pass"})
    num_workers: int = dataclasses.field(
        default=-1, metadata={"help": "DataLoader decode workers; -1 = auto (GPU: up to 8, CPU: 1), 0 = in-process"}
    )
    precision: str = dataclasses.field(default="auto", metadata={"help": f"one of {PRECISIONS}; auto = amp_bf16 on GPU, fp32 on CPU"})
    engine: str = dataclasses.field(
        default="auto",
        metadata={"help": "auto (spark under spark-submit or when a Spark master is named, else local) | local (one "
                          "process; one per GPU when started under torchrun) | torchrun (launch --nproc processes with "
                          "torch.distributed.run) | spark (one task per shard)"},
    )
    nproc: int = dataclasses.field(
        default=0, metadata={"help": "processes for --engine torchrun (0: one per visible GPU, at least 1)"}
    )
    verify_shards: bool = dataclasses.field(default=True, metadata={"help": "check each shard's sha256 against the manifest"})
    fast_decode: bool = dataclasses.field(
        default=False,
        metadata={"help": "decode JPEGs at reduced scale (libjpeg DCT scaling) when they are >= 2x the model's "
                  "input: much faster for small models, pixels differ slightly from open_clip's exact transform"},
    )

    def validate(self) -> None:
        if not self.manifest:
            raise ConfigError("--manifest is required (the pool.manifest.json written by download)")
        if not self.output:
            raise ConfigError("--output is required (a folder for the embeddings)")
        if self.batch_size < 1:
            raise ConfigError(f"batch_size must be >= 1, got {self.batch_size}")
        if self.num_workers < -1:
            raise ConfigError(f"num_workers must be -1 (auto), 0 or more, got {self.num_workers}")
        if self.precision not in PRECISIONS:
            raise ConfigError(f"precision {self.precision!r} is not one of {PRECISIONS}")
        if self.engine not in ENGINES:
            raise ConfigError(f"engine {self.engine!r} is not one of {ENGINES}")
        if self.nproc < 0:
            raise ConfigError(f"nproc must be >= 0 (0: one per GPU), got {self.nproc}")


# --------------------------------------------------------------------------------------------------
# Reading shards (runs in DataLoader workers)


def read_shard_samples(url: str, expected_sha256: str | None) -> list[tuple[str, dict[str, bytes]]]:
    """All samples of a webdataset tar in order: [(key, {ext: bytes})].

    Raises ShardError naming the shard if it is missing, its sha256 differs from `expected_sha256`
    (when given), or it is not a readable tar. (:func:`fetch_shard`, then :func:`parse_shard`.)
    """
    return parse_shard(url, fetch_shard(url, expected_sha256))


def fetch_shard(url: str, expected_sha256: str | None) -> bytes:
    """The bytes of shard `url` (one read), checked against `expected_sha256` when given.

    Raises ShardError naming the shard if it is missing, not a regular file, a compressed tar, or its
    sha256 differs from `expected_sha256`.
    """
    import hashlib

    with _open_shard(url) as f:
        data = f.read()
    _check_shard(url, data[:6], hashlib.sha256(data).hexdigest() if expected_sha256 else None, expected_sha256)
    return data


def copy_shard(url: str, expected_sha256: str | None, dest: str, chunk: int = 8 << 20) -> None:
    """Shard `url` copied to the local file `dest` (under a temporary name, renamed when whole and checked),
    hashed as it streams: :func:`fetch_shard`'s checks and errors, without the shard in memory."""
    import hashlib

    h, head, tmp = hashlib.sha256() if expected_sha256 else None, b"", dest + ".part"  # (hashed only to be checked)
    try:
        with open(tmp, "wb") as out, _open_shard(url) as f:
            while b := f.read(chunk):
                if len(head) < 6:
                    head += b[: 6 - len(head)]
                if h is not None:
                    h.update(b)
                out.write(b)
        _check_shard(url, head, h.hexdigest() if h is not None else None, expected_sha256)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    os.replace(tmp, dest)


@contextlib.contextmanager
def _open_shard(url: str) -> Iterator[Any]:
    """Shard `url` open for reading; ShardError naming it when it is missing or not a regular file."""
    fs, p = url_to_fs(url)
    try:
        # A FIFO would block this read forever and /dev/zero fill memory: only a regular file is read
        # (one stat; verify refuses the same shards with the same words).
        if fs.info(p).get("type") != "file":
            raise ShardError(f"shard {url} is not a regular file; fix the manifest or restore the shard")
        with fs.open(p, "rb") as f:
            yield f
    except FileNotFoundError as e:
        raise ShardError(f"shard {url} is missing; re-run download (it resumes) or fix the manifest") from e


def _check_shard(url: str, head: bytes, got_sha256: str | None, expected_sha256: str | None) -> None:
    """ShardError naming shard `url` when its first bytes `head` are a compressed tar's or its sha256 is not
    the manifest's."""
    from laiontools.wds.samples import compressed_tar_problem

    reason = compressed_tar_problem(head)
    if reason is not None:  # one rule with verify and reshard, which cannot read such a shard
        raise ShardError(f"shard {url} {reason}")
    if expected_sha256 and got_sha256 != expected_sha256:
        raise ShardError(
            f"shard {url} has sha256 {got_sha256[:16]}… but the manifest says {expected_sha256[:16]}…; "
            f"the file changed or is truncated: re-download it or regenerate the manifest"
        )


def parse_shard(url: str, data: bytes) -> list[tuple[str, dict[str, bytes]]]:
    """The samples of shard `url` from its bytes `data`, in tar order; ShardError naming `url` if it is
    not a readable tar."""
    from laiontools.wds.samples import iter_samples

    try:
        # webdataset's key rule; a key's members are gathered wherever they are in the tar, so each
        # sample is one embedding row (hidden files such as macOS ._ resource forks are left out).
        return list(iter_samples(data, adjacent=False, on_duplicate="last"))
    except tarfile.TarError as e:
        raise ShardError(f"shard {url} is not a readable tar ({e}); re-download it") from e


# --------------------------------------------------------------------------------------------------
# The shard spool: each shard fetched and sha256-checked once per process, whatever the worker count
#
# Every decode worker needs every shard's sample count (batch slots are numbered across shards, see
# ShardBatches), so with W workers each shard used to be read, and hashed, W times: on an object store W
# times the GETs and bytes. With workers, the main process stages each shard once instead: a thread
# (ShardSpool) copies it (copy_shard: the sha256 check, streamed) into a private local folder, and the workers
# index that copy from its headers and read their own slots' members from it (IndexedShard, no second
# hash; a worker holds one batch, not the shard). Local shards are copied too: the workers then read
# exactly the bytes that were verified, even if the pool file is rewritten during the run.
#
# Files in the spool folder, for the shard at position i of the task list (names are positions, never
# shard paths): "<i>.tar" (the verified bytes) or "<i>.error" (the ShardError text), each written under a
# temporary name and renamed; "<i>.read.<w>" once worker w holds the shard open; "FATAL" (the stager's own
# failure, not a shard's). A shard's files go when every worker has it open (its bytes stay readable to
# them until they close it, one shard each at a time), and the stager stays at most SPOOL_AHEAD shards
# ahead of the slowest worker: the folder holds at most that many shards.
#
# Not chosen: giving each worker whole shards (no shared reads at all). A process with fewer shards than
# workers (a Spark task has one) would decode on one worker, and uneven shards would stall the in-order
# round robin; slots across every shard keep all workers busy, for a local copy read per worker.

SPOOL_AHEAD = 2
# The folder spools are made in; None: tempfile's ($TMPDIR, else /tmp).
SPOOL_PARENT: str | None = None
SPOOL_WAIT_S = 1800.0  # how long a worker waits for one shard before it names it and gives up
_SPOOL_POLL_S = 0.01
_SPOOL_FATAL = "FATAL"


_SPOOL_PREFIX = "laiontools-embed-spool-"
_SPOOL_LOCK = ".lock"
_SPOOL_SWEEP_AGE_S = 60.0  # a folder this long unchanged whose lock is free is a dead process's


def _sweep_dead_spools(parent: str, own: str) -> None:
    """Remove the spool folders in `parent` (other than `own`) of processes that died without removing them:
    their lock (held by a live :class:`ShardSpool`, in whatever process or container shares the folder) is
    free and nothing changed in them for _SPOOL_SWEEP_AGE_S. A folder without a lock file is left alone."""
    import glob
    import shutil

    for d in glob.glob(os.path.join(parent, _SPOOL_PREFIX + "*")):
        if d == own:
            continue
        try:
            if time.time() - os.stat(d).st_mtime < _SPOOL_SWEEP_AGE_S:
                continue  # maybe a spool being set up, its lock not taken yet
            fd = os.open(os.path.join(d, _SPOOL_LOCK), os.O_RDONLY)
        except OSError:
            continue
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            continue  # a live spool
        else:
            log.info("removing the shard spool folder %s of a run that ended without removing it", d)
            shutil.rmtree(d, ignore_errors=True)
        finally:
            os.close(fd)


def _spool_base(spool_dir: str, i: int) -> str:
    return os.path.join(spool_dir, f"{i:06d}")


def _spool_write(path: str, data: bytes) -> None:
    """`data` at `path`, complete or not at all (a reader polls for `path`)."""
    tmp = path + ".part"
    with open(tmp, "wb") as f:
        f.write(data)
    os.replace(tmp, path)


class ShardSpool:
    """Stages `tasks`' shards, in order, into a private temp folder for `readers` DataLoader workers.

    ``start()`` starts the stager thread, ``close()`` stops it and removes the folder (call it in a
    ``finally``). ``error`` is what stopped the stager when it is not a shard's own problem (a shard
    that is missing, changed or not a tar is an ``.error`` file its workers turn into its error slot).
    """

    def __init__(self, tasks: list[dict[str, Any]], verify: bool, readers: int, ahead: int = SPOOL_AHEAD) -> None:
        import tempfile
        import threading

        if readers < 1 or ahead < 1:
            raise ValueError(f"ShardSpool: readers ({readers}) and ahead ({ahead}) must be >= 1")
        self.tasks, self.verify, self.readers, self.ahead = tasks, verify, readers, ahead
        self.dir = tempfile.mkdtemp(prefix=_SPOOL_PREFIX, dir=SPOOL_PARENT)
        # Held while this spool lives (close() lets it go): a process killed without its finally (SIGTERM from
        # die_with_parent or a scheduler, SIGKILL, a cancelled Spark task) leaves its folder, up to `ahead`
        # whole shards, unlocked, and the next spool in this temp folder removes it (_sweep_dead_spools).
        self._lock = open(os.path.join(self.dir, _SPOOL_LOCK), "wb")  # noqa: SIM115 - closed in close()
        fcntl.flock(self._lock, fcntl.LOCK_EX)
        _sweep_dead_spools(os.path.dirname(self.dir), self.dir)
        self.error: BaseException | None = None
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="laiontools-embed-spool", daemon=True)

    def start(self) -> None:
        log.debug("staging %d shard(s) once in %s for %d workers", len(self.tasks), self.dir, self.readers)
        self._thread.start()

    def close(self) -> None:
        import shutil

        self._stop.set()
        if self._thread.is_alive():
            # (a fetch in progress cannot be interrupted: the thread is a daemon, and writes nothing once stopped)
            self._thread.join(timeout=30)
        # After a failed run the workers may still be alive for a moment and mark a shard read while the
        # folder is being removed (its rmdir then fails): once the folder is gone, nothing can write in it.
        try:
            for _ in range(5):
                shutil.rmtree(self.dir, ignore_errors=True)
                if not os.path.exists(self.dir):
                    return
            log.warning("could not remove the shard spool folder %s; remove it by hand", self.dir)
        finally:
            self._lock.close()

    def _read_by_all(self, i: int) -> bool:
        base = _spool_base(self.dir, i)
        return all(os.path.exists(f"{base}.read.{w}") for w in range(self.readers))

    def _drop(self, i: int) -> None:
        base = _spool_base(self.dir, i)
        for name in (f"{base}.tar", f"{base}.error", *(f"{base}.read.{w}" for w in range(self.readers))):
            with contextlib.suppress(FileNotFoundError):
                os.unlink(name)

    def _run(self) -> None:
        try:
            for i, task in enumerate(self.tasks):
                if i >= self.ahead:  # the window: shard i - ahead read by every worker, then dropped
                    while not self._read_by_all(i - self.ahead):
                        if self._stop.wait(_SPOOL_POLL_S):
                            return
                    self._drop(i - self.ahead)
                if self._stop.is_set():
                    return
                base = _spool_base(self.dir, i)
                try:  # streamed into the spool, hashed on the way: the stager holds a chunk, not the shard
                    copy_shard(task["url"], task["sha256"] if self.verify else None, f"{base}.tar")
                except ShardError as e:
                    _spool_write(f"{base}.error", str(e).encode("utf-8"))
                    continue
        except BaseException as e:  # noqa: BLE001 - handed to the workers (FATAL) and to the main loop (error)
            if self._stop.is_set():
                return  # the run is over (the folder may be gone): nothing waits for this thread
            self.error = e
            with contextlib.suppress(OSError):
                _spool_write(os.path.join(self.dir, _SPOOL_FATAL), f"{type(e).__name__}: {e}".encode())


class IndexedShard:
    """The samples of one shard, indexed from its tar headers; a slice reads its members' bytes.

    A decode worker needs every shard's sample count but decodes only its own slots: it holds the index
    and one batch of a spooled shard, not the shard. `f`: the spool's copy (its open file keeps it
    readable after the stager drops it) or the verified bytes in memory (``io.BytesIO``, no workers), of
    `size` bytes. Parsed whole, a shard was held twice over, its bytes and a copy of every payload, in
    every worker. ``close()`` when the shard is done. A slice gives what :func:`parse_shard` gives."""

    def __init__(self, url: str, f: Any, size: int) -> None:
        from laiontools.wds.samples import sample_index

        self.url, self._f = url, f
        try:
            self._index = sample_index(f, size, adjacent=False, on_duplicate="last")
        except tarfile.TarError as e:  # parse_shard's words
            raise ShardError(f"shard {url} is not a readable tar ({e}); re-download it") from e

    def __len__(self) -> int:
        return len(self._index)

    def __getitem__(self, s: slice) -> list[tuple[str, dict[str, bytes]]]:
        from laiontools.wds.samples import read_parts

        try:
            return [(key, read_parts(self._f, parts)) for key, parts in self._index[s]]
        except tarfile.TarError as e:
            raise ShardError(f"shard {self.url}: its copy is shorter than its index ({e})") from e

    def close(self) -> None:
        self._f.close()


def spooled_shard_samples(spool_dir: str, i: int, task: dict[str, Any], reader: int,
                          wait_s: float = SPOOL_WAIT_S) -> IndexedShard:
    """In DataLoader worker `reader`: the samples of the shard at position `i`, from the spool's copy
    (an :class:`IndexedShard`: its index, the bytes read per slice; close it when done).

    Waits (polling) for the stager's file; raises the shard's ShardError (its ``.error`` file: the text
    read_shard_samples gives) or the tar's (as :func:`parse_shard` words it); RuntimeError naming the shard
    when the stager stopped (FATAL), the spool folder is gone (the run ended), or nothing came in `wait_s`
    seconds.
    """
    base = _spool_base(spool_dir, i)
    deadline = time.monotonic() + wait_s
    while True:
        try:
            f = open(f"{base}.tar", "rb")  # noqa: SIM115 - handed to the IndexedShard, which closes it
        except FileNotFoundError:
            pass
        else:
            _spool_mark_read(base, reader)  # the open file keeps the copy readable once the stager drops it
            try:
                return IndexedShard(task["url"], f, os.fstat(f.fileno()).st_size)
            except BaseException:
                f.close()
                raise
        try:
            with open(f"{base}.error", encoding="utf-8") as f:
                error = f.read()
        except FileNotFoundError:
            pass
        else:
            _spool_mark_read(base, reader)
            raise ShardError(error)
        fatal = os.path.join(spool_dir, _SPOOL_FATAL)
        if os.path.exists(fatal):
            with open(fatal, encoding="utf-8", errors="replace") as f:
                why = f.read()
            raise RuntimeError(f"embed: shard {task['url']} was not staged: the shard stager stopped ({why})")
        if not os.path.isdir(spool_dir):
            raise RuntimeError(f"embed: shard {task['url']} was not staged: the spool folder {spool_dir} is gone "
                               f"(the run ended)")
        if time.monotonic() > deadline:
            raise RuntimeError(f"embed: shard {task['url']} was not staged in {wait_s:.0f}s (spool {spool_dir}); "
                               f"the shard stager is stuck: check the store's reachability and retry")
        time.sleep(_SPOOL_POLL_S)


def _spool_mark_read(base: str, reader: int) -> None:
    """Worker `reader` holds the shard (its bytes or its error): the stager may drop the shard's files
    once every worker has it."""
    _spool_write(f"{base}.read.{reader}", b"")


def load_image(data: bytes, preprocess: Any, draft_size: int | None = None, input_side: int | None = None) -> Any:
    """Encoded image bytes -> `preprocess(image)` (a tensor, or a uint8 array from BatchPreprocess).

    With `draft_size`, a JPEG at least twice that size is decoded at reduced scale by libjpeg (never
    below `draft_size` on its short side) before `preprocess`. An image over the pixel limit (read from
    its header) raises before it is decoded (:func:`laiontools.core.images.open_image`); with
    `input_side` (the model's input side), so does one that open_clip's Resize (short side ->
    `input_side`) would blow up past that limit (:func:`laiontools.core.images.check_resized_pixels`)."""
    from laiontools.core.images import check_resized_pixels, open_image, to_8bit

    with open_image(data) as im:
        if input_side:
            check_resized_pixels(*im.size, input_side)
        if draft_size and im.format == "JPEG":
            im.draft("RGB", (draft_size, draft_size))
        im.load()
        return preprocess(to_8bit(im))


def _decode(key: str, parts: dict[str, bytes], preprocess: Any, draft_size: int | None = None,
            input_side: int | None = None) -> tuple[Any, str | None, str, str | None]:
    """(image tensor or None, uid, caption, error) of one sample."""
    uid = None
    err = None
    meta_raw = parts.get("json")
    if meta_raw is not None:
        try:
            uid = json.loads(meta_raw).get("uid")
        except (ValueError, AttributeError) as e:
            err = f"unreadable {key}.json ({type(e).__name__})"
    if uid is None and err is None:
        err = f"no uid in {key}.json" if meta_raw is not None else f"no {key}.json member"
    elif err is None and not is_uid(uid):
        err, uid = f"uid {str(json.dumps(uid))[:80]} in {key}.json is not 32 lowercase hex chars", None
    caption = parts.get("txt", b"").decode("utf-8", errors="replace")
    img_bytes = next((parts[e] for e in POOL_IMAGE_EXTS if e in parts), None)
    if img_bytes is None:
        return None, uid, caption, err or f"no image member for {key} (looked for {POOL_IMAGE_EXTS})"
    try:
        tensor = load_image(img_bytes, preprocess, draft_size, input_side)
    except Exception as e:  # noqa: BLE001 - any decoder failure is a per-sample failure, not a crash
        # without the object addresses reprs carry (PIL: "cannot identify image file <_io.BytesIO object at
        # 0x7f...>"), which differ run to run: the meta file must be the same bytes after a resume
        return None, uid, caption, err or error_text(e)
    return (tensor if err is None else None), uid, caption, err


def _shard_batches_iterable():  # built lazily so torch is imported only when embedding
    import torch
    from torch.utils.data import IterableDataset, get_worker_info

    class ShardBatches(IterableDataset):
        """Batches of decoded, preprocessed samples of several shards, in a deterministic order.

        Batch slots are numbered across all shards (a shard with n samples has max(1, ceil(n/bs))
        slots; a bad shard has one error slot). Worker w of W produces the slots s with s % W == w;
        the DataLoader's in-order round robin over workers then yields slots in order, so the main
        process can assemble each shard row-aligned without reordering.

        `spool_dir` (with workers): the folder a :class:`ShardSpool` stages the shards in; each worker
        indexes every shard's verified copy there (it needs every shard's slot count) and reads the
        members of its own slots only (:class:`IndexedShard`), instead of fetching and hashing the
        shard itself. None (no workers): each shard is read here, once, and indexed in memory.
        """

        def __init__(self, tasks: list[dict[str, Any]], preprocess: Any, tokenizer: Any, batch_size: int,
                     image_size: tuple[int, int], verify: bool, fast_decode: bool = False,
                     spool_dir: str | None = None) -> None:
            # `preprocess`: a BatchPreprocess. When it splits, slots hold uint8 and the model side
            # normalizes the whole batch; otherwise open_clip's transform runs per image (float).
            self.tasks, self.tokenizer = tasks, tokenizer
            self.uint8 = preprocess.split
            self.preprocess = preprocess.to_uint8 if preprocess.split else preprocess.preprocess
            self.batch_size, self.image_size, self.verify = batch_size, image_size, verify
            self.draft_size = max(image_size) if fast_decode else None
            self.spool_dir = spool_dir

        def _samples(self, i: int, task: dict[str, Any], w: int) -> IndexedShard:
            if self.spool_dir is None:  # the shard's bytes in memory (its sha256 is checked on them), not a copy of each payload
                data = fetch_shard(task["url"], task["sha256"] if self.verify else None)
                return IndexedShard(task["url"], io.BytesIO(data), len(data))
            return spooled_shard_samples(self.spool_dir, i, task, w)

        def __iter__(self) -> Iterator[dict[str, Any]]:
            wi = get_worker_info()
            w, nw = (wi.id, wi.num_workers) if wi is not None else (0, 1)
            if wi is not None:
                torch.set_num_threads(1)  # decode workers must not fight the model for cores
            if (self.spool_dir is not None) != (wi is not None):
                raise RuntimeError("ShardBatches: a spool folder goes with DataLoader workers, and only with them")
            slot = 0
            for i, task in enumerate(self.tasks):
                try:
                    samples = self._samples(i, task, w)
                except ShardError as e:
                    if slot % nw == w:
                        yield {"shard": task["id"], "error": str(e), "batch": 0, "nbatches": 1}
                    slot += 1
                    continue
                try:
                    nb = max(1, math.ceil(len(samples) / self.batch_size))
                    for b in range(nb):
                        if slot % nw == w:
                            yield self._batch(task, samples[b * self.batch_size : (b + 1) * self.batch_size], b, nb)
                        slot += 1
                finally:
                    samples.close()

        def _batch(self, task: dict[str, Any], samples: list, b: int, nb: int) -> dict[str, Any]:
            n = len(samples)
            if self.uint8:  # HWC slots filled from PIL, one permute for the whole batch at the end
                images = np.zeros((n, *self.image_size, 3), dtype=np.uint8)
            else:
                images = torch.zeros((n, 3, *self.image_size), dtype=torch.float32)
            ok = torch.zeros(n, dtype=torch.bool)
            keys, uids, captions, errors = [], [], [], []
            for i, (key, parts) in enumerate(samples):
                tensor, uid, caption, err = _decode(key, parts, self.preprocess, self.draft_size,
                                                    max(self.image_size))
                if tensor is not None:
                    images[i] = tensor
                    ok[i] = True
                keys.append(meta_key(key))
                uids.append(uid)
                captions.append(caption)
                errors.append(err)
            tokens = self.tokenizer(captions) if n else None
            if self.uint8:
                images = torch.from_numpy(images).permute(0, 3, 1, 2).contiguous()
            return {"shard": task["id"], "error": None, "batch": b, "nbatches": nb, "keys": keys, "uids": uids,
                    "images": images, "tokens": tokens, "ok": ok, "errors": errors}

    return ShardBatches


# --------------------------------------------------------------------------------------------------
# Writing one shard


def _shard_paths(out: str, sid: str) -> dict[str, str]:
    return {kind: join(out, rel) for kind, rel in shard_files(sid).items()}


def _write_shard(out: str, sid: str, img: np.ndarray, txt: np.ndarray, meta: Any, marker: dict[str, Any],
                 codec: str = PARQUET_CODEC) -> None:
    """Write a shard's four files atomically (the parquet ones in `codec`: a Spark task's is the session's),
    then its completion marker (last), which records the sha256 of each file's bytes (readers in
    contracts/embeddings check them: a flipped bit is an error, not a silently moved similarity). Each file
    is serialized in memory once and hashed there: no re-read.

    The four are written whole (and fsync'd) under temporary names first, and only then renamed into place,
    the image embeddings and the metadata one right after the other: readers that pair the files of a
    folder by their position (clip-retrieval's embedding_reader, so autofaiss: ``parquet_npy``) and ignore
    markers never see the ``.npy`` of a shard without its ``.parquet``, where a run killed between writing
    the two (seconds, for a large shard) made them pair every later shard's embeddings with the metadata
    of the shard before (on an object store each file is uploaded as its rename comes, so the gap is one
    upload, not a rename)."""
    import hashlib

    if not (len(img) == len(txt) == len(meta)):  # never write a misaligned shard
        raise RuntimeError(f"shard {sid}: misaligned rows (img {len(img)}, text {len(txt)}, meta {len(meta)})")
    paths, rel = _shard_paths(out, sid), shard_files(sid)
    sha: dict[str, str] = {}
    size: dict[str, int] = {}
    with contextlib.ExitStack() as renames:  # exits (the renames) in the reverse order: img, meta, scores, text
        for kind, write in (
            ("text", lambda b: np.save(b, np.ascontiguousarray(txt.astype(np.float16)), allow_pickle=False)),
            ("scores", lambda b: meta[list(SCORE_COLUMNS)].to_parquet(b, index=False, **{**PARQUET_WRITE, "compression": codec})),
            ("meta", lambda b: meta.to_parquet(b, index=False, **{**PARQUET_WRITE, "compression": codec})),
            ("img", lambda b: np.save(b, np.ascontiguousarray(img.astype(np.float16)), allow_pickle=False)),
        ):
            buf = io.BytesIO()
            write(buf)
            view = buf.getbuffer()
            sha[rel[kind]] = hashlib.sha256(view).hexdigest()
            size[rel[kind]] = len(view)
            f = renames.enter_context(atomic_open(paths[kind]))
            f.write(view)
            if isinstance(f, io.IOBase):  # a local file: on the disk before any of the four is renamed
                f.flush()
                os.fsync(f.fileno())
            del view, buf
            # (kill tests: a shard's files written under their temporary names, none renamed yet)
            failpoints.pause("embed.shard-files")
    mark_done(paths["meta"], {**marker, MARKER_SHA256: sha, MARKER_BYTES: size})


def _assemble(sid: str, parts: list[dict[str, Any]], dim: int) -> tuple[np.ndarray, np.ndarray, Any, int]:
    import pandas as pd

    rows = sum(len(p["keys"]) for p in parts)
    img = np.concatenate([p["img"] for p in parts]) if rows else np.zeros((0, dim), np.float32)
    txt = np.concatenate([p["txt"] for p in parts]) if rows else np.zeros((0, dim), np.float32)
    ok = np.concatenate([p["ok"] for p in parts]) if rows else np.zeros(0, bool)
    keys = [k for p in parts for k in p["keys"]]
    uids = [u for p in parts for u in p["uids"]]
    errors = [e for p in parts for e in p["errors"]]
    first: dict[str, str] = {}
    for i, u in enumerate(uids):  # a uid names one sample: a repeat is a failed row, not a second "ok" one
        if u is None:
            continue
        if u in first:
            ok[i], uids[i] = False, None
            errors[i] = f"uid {u} repeats sample {first[u]} of this shard"
            _sample_log.warn(STATUS_FAILED_DECODE, "shard %s sample %s: %s", sid, keys[i], errors[i])
        else:
            first[u] = keys[i]
    score = np.where(ok, (img * txt).sum(axis=1), np.nan).astype(np.float32)
    img[~ok] = 0.0
    meta = pd.DataFrame(
        {
            "uid": pd.array(uids, dtype="string"),
            "key": pd.array(keys, dtype="string"),
            "clip_score": pd.array(score, dtype="Float32"),
            "embed_status": pd.array(np.where(ok, STATUS_OK, STATUS_FAILED_DECODE), dtype="string"),
            "embed_error": pd.array(errors, dtype="string"),
        }
    )
    return img, txt, meta, int((~ok).sum())


# --------------------------------------------------------------------------------------------------
# The work loop shared by every engine


def _auto_workers(num_workers: int, device: str) -> int:
    if num_workers >= 0:
        return num_workers
    cpus = os.cpu_count() or 1
    return min(8, cpus) if device.startswith("cuda") else 1


def _embed_tasks(tasks: list[dict[str, Any]], embedder: Embedder, cfg: EmbedConfig,
                 codec: str = PARQUET_CODEC) -> list[dict[str, Any]]:
    """Embed `tasks` (shard dicts: id, url, sha256, num_samples) into cfg.output; one stats dict per shard;
    its parquet files in `codec` (a Spark task's: the session's).

    A shard that cannot be read gives {'id', 'error'}; the others still finish.
    """
    from torch.utils.data import DataLoader

    if not tasks:
        return []
    workers = _auto_workers(cfg.num_workers, embedder.device)
    # With workers, each shard is fetched and sha256-checked once, by the spool, not once per worker
    # (see ShardSpool); without them the dataset runs here and reads each shard once already.
    spool = ShardSpool(tasks, cfg.verify_shards, workers) if workers else None
    try:
        dataset = _shard_batches_iterable()(
            tasks, embedder.batch_preprocess, embedder.tokenizer, cfg.batch_size,
            tuple(embedder.info["image_size"]), cfg.verify_shards, cfg.fast_decode,
            spool.dir if spool is not None else None,
        )
        loader = DataLoader(
            dataset,
            batch_size=None,
            num_workers=workers,
            pin_memory=embedder.device.startswith("cuda"),
            prefetch_factor=4 if workers else None,
            persistent_workers=False,
        )
        if spool is not None:
            spool.start()
        try:
            return _embed_loop(tasks, loader, embedder, cfg, codec)
        except Exception as e:
            if spool is not None and spool.error is not None:
                # a worker stopped because the stager did: the stager's own error says what happened
                raise spool.error from e
            raise
    finally:
        if spool is not None:
            spool.close()


def _embed_loop(tasks: list[dict[str, Any]], loader: Any, embedder: Embedder, cfg: EmbedConfig,
                codec: str = PARQUET_CODEC) -> list[dict[str, Any]]:
    """The main loop of :func:`_embed_tasks`: `loader`'s batches, in slot order, embedded and assembled
    into shards, each written once its last batch is in."""
    by_id = {t["id"]: t for t in tasks}
    pending: dict[str, list[dict[str, Any]]] = {}
    started: dict[str, float] = {}
    stats: list[dict[str, Any]] = []
    checked_first = False
    for batch in loader:
        sid = batch["shard"]
        started.setdefault(sid, time.time())
        if batch["error"]:
            log.error("shard %s skipped: %s", sid, batch["error"])
            stats.append({"id": sid, "error": batch["error"]})
            continue
        n = len(batch["keys"])
        part: dict[str, Any] = {k: batch[k] for k in ("keys", "uids", "errors")}
        part["ok"] = batch["ok"].numpy().astype(bool)
        if n:
            img, txt = embedder.encode(batch["images"], batch["tokens"])
            part["img"], part["txt"] = img.cpu().numpy(), txt.cpu().numpy()
            if not checked_first:  # cheap early refusal, before a whole shard is embedded
                _check_finite(cfg, embedder, sid, part["img"], part["txt"])
                checked_first = True
        for key, err in zip(batch["keys"], batch["errors"]):
            if err:
                _sample_log.warn(STATUS_FAILED_DECODE, "shard %s sample %s: %s", sid, key, err)
        pending.setdefault(sid, []).append(part)
        if batch["batch"] == batch["nbatches"] - 1:
            parts = pending.pop(sid)
            img, txt, meta, failed = _assemble(sid, parts, embedder.dim)
            task = by_id[sid]
            if task.get("num_samples") is not None and task["num_samples"] != len(meta):
                log.warning("shard %s: manifest says %d samples, tar holds %d (embedded all of them)",
                            sid, task["num_samples"], len(meta))
            st = {
                "id": sid,
                "rows": len(meta),
                "ok": len(meta) - failed,
                "failed_decode": failed,
                "shard_sha256": task["sha256"],
                "model": _signature(embedder.info),
                PRECISION_USED: embedder.precision,  # each shard says what it was computed in (every engine)
                "seconds": round(time.time() - started.pop(sid), 3),
            }
            _check_finite(cfg, embedder, sid, img, txt)  # never write a shard with NaN / inf
            _write_shard(cfg.output, sid, img, txt, meta, st, codec)
            log.info("shard %s: %d rows (%d failed decode) in %.1fs", sid, st["rows"], failed, st["seconds"])
            stats.append(st)
    # Every shard has its stats or its error: a loader that ended without some of a shard's batches (torch's
    # worker queue drops a batch it cannot send, and says so only on stderr: e.g. a $TMPDIR too long for the
    # socket it shares tensors through) is that shard's failure, not a run that embedded nothing and exited 0.
    reported = {s["id"] for s in stats}
    for task in tasks:
        if task["id"] not in reported:
            got = len(pending.get(task["id"], []))
            err = (f"the data loader ended with {got} of this shard's batches: a loader worker lost the others "
                   "(see the errors above; a $TMPDIR path too long for a socket is one cause); re-run embed")
            log.error("shard %s skipped: %s", task["id"], err)
            stats.append({"id": task["id"], "error": err})
    return stats


def _check_finite(cfg: EmbedConfig, embedder: Embedder, sid: str, img: np.ndarray, txt: np.ndarray) -> None:
    """Raise ModelError naming the weights if any embedding of shard `sid` is NaN or infinite."""
    if np.isfinite(img).all() and np.isfinite(txt).all():
        return
    from laiontools.models.registry import ModelError

    weights = cfg.pretrained or f"random init (seed {embedder.info.get('random_init_seed')})"
    raise ModelError(
        f"model {cfg.model!r} with weights {weights} produces non-finite embeddings (NaN/inf in shard {sid}, "
        f"precision {embedder.precision}): the weights are damaged or the training diverged; that shard was not written "
        f"(shards finished before it are valid)"
    )


def _signature(info: dict[str, Any]) -> str:
    from laiontools.models.registry import model_signature

    return model_signature(info)


# --------------------------------------------------------------------------------------------------
# Output folder identity


def pool_identity(manifest_path: str, manifest: dict[str, Any], sha256: str | None = None) -> dict[str, Any]:
    """What model.json records of the pool. A local manifest path is recorded absolute: readers (dedup,
    semdedup: contracts.embeddings.read_pool) run from other working directories, and a path as typed
    (``pool/pool.manifest.json``) would be looked up relative to theirs, or to the embeddings folder.
    `sha256`: the manifest's, of the bytes `manifest` was parsed from (else the file is read again)."""
    from laiontools.contracts.manifest import manifest_sha256

    return {
        "name": manifest["name"],
        "manifest": manifest_path if "://" in manifest_path else os.path.abspath(manifest_path),
        "manifest_sha256": sha256 if sha256 is not None else manifest_sha256(manifest_path),
        "source_fingerprint": manifest["source"]["fingerprint"],
    }


def prepare_output(cfg: EmbedConfig, model_info: dict[str, Any], pool: dict[str, Any],
                   used_precision: str | None = None, *, precision_pending: bool = False) -> dict[str, Any]:
    """Create the output folder and its model.json, or check an existing one; returns model.json content.

    `used_precision`: what cfg.precision resolved to on this run's device (on Spark, in a probe task; None:
    not known), recorded as ``precision_used``, also into an older folder that does not record it yet.
    Refuses (EmbedMismatchError) a folder of another model/dimension, other precision (the one used when
    both runs record it: "auto" and "fp32" are one precision on the CPU) / JPEG decode settings
    (RUN_SETTING_FIELDS; missing in older folders: their defaults) or another source pool. A newer
    manifest of the same pool (download resumed, more shards) updates the recorded manifest sha256.
    `precision_pending` (with `used_precision` None): the precision is resolved later (on Spark, by the probe
    task) and checked by a second call that knows it; this one checks the rest and does not compare it.
    """
    ensure_output_dir(cfg.output)
    path = join(cfg.output, layout.EMB_MODEL_JSON)
    settings = {"precision": cfg.precision, "jpeg_draft_decode": bool(cfg.fast_decode)}
    if used_precision is not None:
        settings[PRECISION_USED] = used_precision
    doc = {**model_info, "pool": pool, **settings, "layout": {"img": layout.EMB_IMG_DIR, "text": layout.EMB_TEXT_DIR,
                                                   "meta": layout.EMB_META_DIR, "scores": layout.EMB_SCORES_DIR}}
    fs, p = url_to_fs(path)
    if fs.exists(p):
        existing = read_json(path)
        check_compatible(existing, model_info, where=cfg.output)
        check_same_run_settings(existing, settings, where=cfg.output,
                                precision_pending=precision_pending and used_precision is None)
        old_pool = existing.get("pool") or {}
        if old_pool.get("source_fingerprint") != pool["source_fingerprint"]:
            raise EmbedMismatchError(
                f"{cfg.output} holds embeddings of pool {old_pool.get('name')!r} (source fingerprint "
                f"{str(old_pool.get('source_fingerprint'))[:12]}…), not of {pool['name']!r} "
                f"({pool['source_fingerprint'][:12]}…); use another --output folder"
            )
        adds = {PRECISION_USED: used_precision} if used_precision is not None and PRECISION_USED not in existing else {}
        # Another manifest of the pool (shards downloaded again, more shards): its sha256 is recorded only
        # by record_manifest_sha, once this run's _todo has dropped the markers of shards whose bytes
        # changed. Recorded here, a run killed before that left a folder whose readers (read_pool) trust
        # the recorded sha and skip the marker check: stale embeddings read as the new shards'. Until
        # then the folder records none, and readers check every marker against the manifest.
        if old_pool.get("manifest_sha256") != pool["manifest_sha256"]:
            pool = {**pool, "manifest_sha256": None}
        if old_pool == pool and not adds:
            return existing
        doc = {**existing, "pool": pool, **adds}
    write_json(path, doc)
    return doc


def record_manifest_sha(out: str, pool: dict[str, Any]) -> None:
    """Record the pool manifest's sha256 in model.json (see :func:`prepare_output`), after every shard's
    marker was checked against this manifest's shard bytes (:func:`_todo`, on every rank): readers then
    trust the markers without reading them. A no-op when it is recorded already."""
    path = join(out, layout.EMB_MODEL_JSON)
    doc = read_json(path)
    if (doc.get("pool") or {}).get("manifest_sha256") != pool["manifest_sha256"]:
        write_json(path, {**doc, "pool": {**(doc.get("pool") or {}), **pool}})


def _shard_tasks(manifest_path: str, manifest: dict[str, Any]) -> list[dict[str, Any]]:
    from laiontools.contracts.manifest import resolve

    return [
        {"id": layout.shard_id(s["path"]), "path": s["path"], "url": resolve(manifest_path, s["path"]),
         "sha256": s["sha256"], "num_samples": s["num_samples"]}
        for s in manifest["shards"]
    ]


def _no_shards(path: str, manifest: dict[str, Any]) -> str:
    """Why a manifest listing no shards cannot be embedded (it was "0 shard(s) embedded", exit 0)."""
    if manifest.get("kind") == "subset":
        from laiontools.contracts.manifest import resolve

        # (a resharded subset's parent is the subset it was resharded from: its pool is named in "pool")
        pool_path = (manifest.get("pool") or {}).get("path") or (manifest.get("parent") or {}).get("path")
        pool = resolve(path, pool_path) if pool_path else "the pool it was cut from"
        if manifest.get("reshard") is not None:  # reshard's output: it lists its shards, of which there are none
            return (f"{path} is a resharded subset of {manifest.get('num_samples', 0):,} samples and lists no shards: "
                    "nothing to embed (the subset it was resharded from holds no sample)")
        return (f"{path} is a subset's manifest: it names {manifest.get('num_samples', 0):,} samples by uid and lists no shards; "
                f"embed the pool ({pool}), whose embeddings serve every subset cut from it, or reshard the subset "
                "and embed the resharded folder's subset.manifest.json")
    return f"{path} lists no shards: nothing to embed (a pool whose download wrote no shard; see its catalog for why)"


def _todo(cfg: EmbedConfig, tasks: list[dict[str, Any]]) -> tuple[list[dict[str, Any]], list[str]]:
    """Split tasks into (to embed, already done). A shard is done only if its marker exists, was
    written for the same shard bytes (sha256) — a re-downloaded shard is embedded again — and its four
    files are still what the marker recorded (:func:`_changed_file`): a file emptied or replaced after
    its marker was written is embedded again, with one warning naming it, rather than left for a
    reader to refuse. The marker of such a shard is removed first, so the folder never claims it."""
    todo, skipped = [], []
    sizes: dict[str, int] | None = None
    metas = [join(cfg.output, layout.EMB_META_DIR, t["id"] + ".parquet") for t in tasks]
    for t, meta, marker in zip(tasks, metas, read_markers(metas)):
        if marker is not None and marker.get("shard_sha256") == t["sha256"]:
            if sizes is None:
                sizes = _listed_sizes(cfg.output)
            changed = _changed_file(cfg.output, t["id"], marker, sizes)
            if changed is None:
                skipped.append(t["id"])
                continue
            log.warning("shard %s: %s (changed after the shard was done); embedding the shard again", t["id"], changed)
            fs, p = url_to_fs(marker_path(meta))
            rm_path(fs, p)
        elif marker is not None:  # done for other shard bytes (re-downloaded, rewritten by a takedown): its marker
            # goes before any shard is embedded, so that a run killed on the way leaves the folder claiming no rows
            # of the old shard (readers such as dedup count a shard with a marker as embedded)
            fs, p = url_to_fs(marker_path(meta))
            rm_path(fs, p)
        todo.append(t)
    return todo, skipped


def _listed_sizes(out: str) -> dict[str, int]:
    """{path relative to `out`: size} of the files in the four shard folders: one listing per folder
    (on an object store, one request per thousand files rather than one per file)."""
    sizes: dict[str, int] = {}
    for d in (layout.EMB_IMG_DIR, layout.EMB_TEXT_DIR, layout.EMB_META_DIR, layout.EMB_SCORES_DIR):
        fs, p = url_to_fs(join(out, d))
        if not fs.exists(p):
            continue
        for e in fs.ls(p, detail=True):
            if e.get("type") == "file":
                sizes[f"{d}/{e['name'].rstrip('/').rsplit('/', 1)[-1]}"] = int(e["size"])
    return sizes


def _changed_file(out: str, sid: str, marker: dict[str, Any], sizes: dict[str, int]) -> str | None:
    """How one of shard `sid`'s files differs from what its completion marker recorded ("<out>/img_emb/x.npy
    is 0 bytes, ..."), or None when all four match. Sizes are compared (from `sizes`: no read);
    a marker written before sizes were recorded has its files hashed once against its sha256 and,
    when they match, gets their sizes added, so later resumes compare sizes only. A file of 0 bytes
    is never a shard file (npy and parquet both have headers), whatever the marker holds."""
    want_bytes = marker.get(MARKER_BYTES) or {}
    want_sha = marker.get(MARKER_SHA256) or {}
    for rel in shard_files(sid).values():
        got, path = sizes.get(rel), join(out, rel)
        if got is None:
            return f"{path} is missing"
        if rel in want_bytes:
            if got != want_bytes[rel]:
                return f"{path} is {got} bytes, its marker recorded {want_bytes[rel]}"
        elif got == 0:
            return f"{path} is 0 bytes"
        elif rel in want_sha:
            sha, _ = sha256_file(path)
            if sha != want_sha[rel]:
                return f"{path} has sha256 {sha[:16]}…, its marker recorded {want_sha[rel][:16]}…"
    if want_sha and not want_bytes:
        mark_done(join(out, shard_files(sid)["meta"]), {**marker, MARKER_BYTES: {rel: sizes[rel] for rel in want_sha}})
    return None


# --------------------------------------------------------------------------------------------------
# Engines


@dataclasses.dataclass
class EmbedResult:
    shards_embedded: list[str]
    shards_skipped: list[str]
    failed_shards: dict[str, str]  # id -> reason
    rows: int
    failed_decode: int
    seconds: float
    report_path: str

    @property
    def ok(self) -> bool:
        return not self.failed_shards


def _dist_env() -> tuple[int, int]:
    return int(os.environ.get("RANK", "0")), int(os.environ.get("WORLD_SIZE", "1"))


def spark_task_device(asked: str | None, gpu_addresses: Sequence[str], cuda_visible_devices: str | None,
                      visible_gpus: int) -> str:
    """The torch device of a Spark embed task (pure: the caller reads the task's resources and environment).

    `asked`: ``--device`` (None: not given); `gpu_addresses`: what Spark assigned this task
    (``TaskContext.resources()['gpu'].addresses``, empty without GPU scheduling); `cuda_visible_devices`:
    the executor's ``CUDA_VISIBLE_DEVICES`` (None: unset); `visible_gpus`: how many GPUs torch sees there.

    * ``cpu`` is the CPU, whatever Spark assigned (the user asked for it).
    * No GPU assigned: ``cuda`` / ``cuda:N`` as asked (every task of an executor then shares that GPU:
      one task per executor, or GPU scheduling), and the CPU when nothing was asked (tasks sharing an
      executor must not all take cuda:0).
    * A GPU assigned, ``--device`` unset or ``cuda``: that GPU, as torch numbers it. Spark's address is what
      the discovery script reported (usually the host's GPU index), torch's ordinal counts the GPUs
      ``CUDA_VISIBLE_DEVICES`` leaves: so the index of the address in that list when it is one of its
      entries; else ``cuda:0`` when torch sees exactly one GPU (a container given only its own GPU); else,
      with ``CUDA_VISIBLE_DEVICES`` unset, the address itself when it is an ordinal torch sees.
    * A GPU assigned and ``cuda:N`` asked: refused. One fixed GPU for every task would put tasks on GPUs
      Spark gave to others; on a cluster Spark chooses each task's GPU.

    Raises ConfigError (naming the address, ``CUDA_VISIBLE_DEVICES`` and the count) for an assigned GPU
    this executor cannot address, and for ``cuda:N`` under GPU scheduling.
    """
    if asked == "cpu":
        return "cpu"
    if not gpu_addresses:
        return asked or "cpu"
    addr = str(gpu_addresses[0]).strip()
    if asked not in (None, "cuda"):
        raise ConfigError(
            f"--device {asked} with Spark GPU scheduling: Spark gave this task GPU {addr!r}, and one fixed GPU for "
            f"every task would take GPUs Spark gave to other tasks; leave --device out (or pass cuda) to use the GPU "
            f"Spark assigns each task, or --device cpu"
        )
    visible = [e.strip() for e in (cuda_visible_devices or "").split(",") if e.strip()]
    if addr in visible:
        return f"cuda:{visible.index(addr)}"
    if visible_gpus == 1:
        return "cuda:0"
    if cuda_visible_devices is None and addr.isdigit() and int(addr) < visible_gpus:
        return f"cuda:{int(addr)}"
    raise ConfigError(
        f"Spark gave this task GPU {addr!r}, which this executor cannot address: CUDA_VISIBLE_DEVICES="
        f"{cuda_visible_devices if cuda_visible_devices is not None else '(unset)'} does not list it and torch sees "
        f"{visible_gpus} GPU(s); make the executors' GPU discovery script report the entries of CUDA_VISIBLE_DEVICES "
        f"(or the ordinals torch sees), or run with --device cpu"
    )


def _spark_task_setup(cfg: EmbedConfig) -> tuple[str, str]:
    """In a Spark task: (device, precision) this task embeds with (:func:`spark_task_device`, then what
    cfg.precision resolves to there). Raises ConfigError where the device cannot be used."""
    from pyspark import TaskContext

    ctx = TaskContext.get()
    gpus = ctx.resources().get("gpu") if ctx is not None else None
    addresses = list(gpus.addresses) if gpus is not None else []
    visible = 0
    if addresses and cfg.device != "cpu":  # torch asked about CUDA only where a GPU would be used
        import torch

        visible = torch.cuda.device_count()
    device = spark_task_device(cfg.device, addresses, os.environ.get("CUDA_VISIBLE_DEVICES"), visible)
    if addresses and device == "cpu":
        log.info("Spark gave this task GPU %s; --device cpu: embedding on the CPU", addresses[0])
    return device, resolve_precision(cfg.precision, device)


def _spark_probe(cfg_json: str) -> str:
    """Spark task (one, before the shards): the device and precision an embed task gets on this cluster,
    as JSON {"device", "precision"} or {"error"}. No model is loaded."""
    try:
        device, precision = _spark_task_setup(EmbedConfig(**json.loads(cfg_json)))
    except ConfigError as e:
        return json.dumps({"error": str(e)})
    return json.dumps({"device": device, "precision": precision})


def _spark_embed_partition(rows: Iterator[str], cfg_json: str, precision: str, codec: str = PARQUET_CODEC) -> Iterator[str]:
    """Spark task: embed the shards of one partition (one shard per task by default), model loaded once.

    Device: :func:`spark_task_device` (the GPU Spark assigned, unless ``--device cpu``). `precision`: the
    folder's (what the driver's probe task resolved, recorded in model.json); a task whose own resolution
    differs (executors with other GPUs, or without one) embeds nothing and fails its shards naming both,
    so that one folder never mixes precisions. `codec`: the session's parquet codec (the driver's
    :func:`~laiontools.core.storage.spark_parquet_codec`), for the metadata files.
    """
    tasks = [json.loads(r) for r in rows]
    if not tasks:
        return iter(())
    cfg = EmbedConfig(**json.loads(cfg_json))
    try:
        device, used = _spark_task_setup(cfg)
    except ConfigError as e:
        return iter([json.dumps({"id": t["id"], "error": str(e)}) for t in tasks])
    if used != precision:
        err = (f"this task's executor resolves --precision {cfg.precision} to {used} on {device}, but the folder's "
               f"shards are {precision}: executors differ (GPU model, GPU scheduling); pass --precision {precision} "
               f"or run on executors alike")
        return iter([json.dumps({"id": t["id"], "error": err}) for t in tasks])
    embedder = Embedder(cfg.model, cfg.pretrained, device, cfg.batch_size, used)
    return iter([json.dumps(s) for s in _embed_tasks(tasks, embedder, cfg, codec)])


def _spark_precision(cfg: EmbedConfig, spark: Any) -> str:
    """What cfg.precision resolves to in a Spark task of this cluster: one probe task, which gets the
    task resources an embed task gets. Raises ConfigError with the task's reason where its device
    cannot be used, before anything is written."""
    cfg_json = json.dumps(cfg.to_dict())
    [got] = spark.sparkContext.parallelize([0], 1).map(lambda _: _spark_probe(cfg_json)).collect()
    got = json.loads(got)
    if "error" in got:
        raise ConfigError(f"embed on Spark: {got['error']}")
    log.info("Spark tasks embed on %s in %s (--device %s, --precision %s)", got["device"], got["precision"],
             cfg.device or "(default)", cfg.precision)
    return got["precision"]


def _run_spark(cfg: EmbedConfig, todo: list[dict[str, Any]], spark: Any, precision: str) -> list[dict[str, Any]]:
    """Embed the shards `todo` (what :func:`_todo` left), one Spark task each, in `precision`; their stats dicts."""
    if not todo:
        return []
    cfg_json = json.dumps(cfg.to_dict())
    codec = spark_parquet_codec(spark)  # the metadata's, as Spark's own writer's
    sc = spark.sparkContext
    rdd = sc.parallelize([json.dumps(t) for t in todo], numSlices=len(todo))
    out = rdd.mapPartitions(lambda it: _spark_embed_partition(it, cfg_json, precision, codec)).collect()
    return [json.loads(s) for s in out]


STAGE = "embed"
CONFIG = EmbedConfig


@stage_entry(STAGE)
def run(cfg: EmbedConfig, spark: Any = None) -> StageResult:
    """Embed every shard of cfg.manifest into cfg.output (see module docstring for layout and engines).

    details = :class:`EmbedResult`; ``ok`` is False when some shards could not be read (the CLI exits 1).

    Raises ManifestError (manifest missing/invalid), ModelError (unknown model / unfetchable weights),
    EmbedMismatchError (output of another model/pool). Bad shards do not raise: they are listed in
    the result and the report, the others are embedded.
    """
    from laiontools.contracts.manifest import read_manifest_sha256

    t0 = time.time()
    manifest, manifest_sha = read_manifest_sha256(cfg.manifest)  # one read: the manifest may be on an object store
    tasks = _shard_tasks(cfg.manifest, manifest)
    if not tasks:
        raise ManifestError(_no_shards(cfg.manifest, manifest))
    rank, world = _dist_env()
    if cfg.engine == "auto":
        cfg = dataclasses.replace(cfg, engine=resolve_engine(cfg, world))
    if cfg.engine == "torchrun" and world == 1:
        return _launch_torchrun(cfg, len(tasks))
    distributed = world > 1 and cfg.engine in ("local", "torchrun")
    if distributed:
        from laiontools.core.launch import die_with_parent

        # torchrun starts each rank in a session of its own: a rank must ask to die with it (as
        # train_worker's do), else a `kill -9` of the launcher's group left it writing into the output
        die_with_parent()
        _init_dist()

    with contextlib.ExitStack() as stack:
        # On Spark, the session once the folder's model and pool are checked (another model is refused
        # without starting one): a probe task then tells what precision the tasks will embed in.
        start = ((lambda: stack.enter_context(stage_spark(cfg, spark, app_name="laiontools-embed")))
                 if cfg.engine == "spark" else None)
        stats, skipped, pool = _prepare_and_embed(cfg, manifest, tasks, rank, world, distributed, start, manifest_sha)
    if distributed:
        stats, skipped = _gather(stats, skipped)  # (every rank's _todo is done)
    if rank == 0:
        record_manifest_sha(cfg.output, pool)
    result, text = _finish(cfg, tasks, stats, skipped, time.time() - t0, rank)
    return StageResult(
        outputs={"embeddings": cfg.output, "report": result.report_path},
        counts={"shards_embedded": len(result.shards_embedded), "shards_skipped": len(result.shards_skipped),
                "shards_failed": len(result.failed_shards), "rows": result.rows, "failed_decode": result.failed_decode},
        timings={"embed": result.seconds}, details=result, summary=text, ok=result.ok,
    )


def _prepare_and_embed(cfg: EmbedConfig, manifest: dict[str, Any], tasks: list[dict[str, Any]], rank: int,
                       world: int, distributed: bool, start_spark: Any,
                       manifest_sha: str | None = None) -> tuple[list[dict[str, Any]], list[str], dict[str, Any]]:
    """Check (or create) the output folder for this run's model, pool and precision, then embed what is not
    done: this rank's share, or every shard as Spark tasks on the session `start_spark()` returns (None:
    not on Spark). Returns (stats, skipped ids, what model.json records of the pool)."""
    from laiontools.models.registry import load_model, register_tiny_models

    # Identity of the embedding space, checked against the folder before any shard is touched.
    register_tiny_models()
    pool = pool_identity(cfg.manifest, manifest, manifest_sha)
    session = None
    if start_spark is None:
        probe = Embedder(cfg.model, cfg.pretrained, resolve_device(cfg.device), cfg.batch_size, cfg.precision)
        model_info, used = probe.info, probe.precision
    else:
        probe = None
        bundle = load_model(cfg.model, cfg.pretrained, device="cpu")
        model_info = embedding_info(bundle.info, cfg.pretrained)  # what a local run's Embedder records
        del bundle
        # another model or pool: refused before Spark starts (the precision: once the probe task resolved it;
        # compared here, "auto" against a folder that records what it became refused every Spark resume)
        prepare_output(cfg, model_info, pool, None, precision_pending=True)
        session = start_spark()
        # what "auto" is depends on the tasks' device: one task resolves it, the folder records it (as a
        # local run does), and every task embeds in it or fails its shards
        used = _spark_precision(cfg, session)
    if rank == 0:
        prepare_output(cfg, model_info, pool, used)
    if distributed:
        _barrier()
        if rank != 0:
            prepare_output(cfg, model_info, pool, used)  # re-check what rank 0 wrote (and raise the same way)
    write_record(join(cfg.output, f"settings.rank{rank}.json" if distributed and rank else layout.SETTINGS_JSON),
                 {**cfg.to_dict(), "world_size": world})
    todo, skipped = _todo(cfg, tasks[rank::world] if distributed else tasks)
    if session is not None:
        return _run_spark(cfg, todo, session, used), skipped, pool
    stats = _embed_tasks(todo, probe, cfg) if todo else []
    del probe
    return stats, skipped, pool


def resolve_engine(cfg: EmbedConfig, world: int) -> str:
    """What ``--engine auto`` means: spark when this process runs under spark-submit or a Spark master
    is named (``--master``, ``$LAIONTOOLS_SPARK_MASTER``), as the other Spark stages decide; local
    otherwise (a session handed in by a caller, as the demo's, does not count), and always in a rank
    that torchrun started."""
    from laiontools.core.stage import wants_spark

    if world > 1:
        return "local"
    return "spark" if wants_spark(cfg.master, 0, -1) else "local"


def _launch_torchrun(cfg: EmbedConfig, n_shards: int) -> StageResult:
    """--engine torchrun: start ``nproc`` processes of this stage with torch.distributed.run (as ``train
    --nproc`` does), each taking ``shards[rank::world]``; wait, then report from what rank 0 wrote.

    The ranks run ``laiontools embed`` with ``--engine local`` on a copy of this config; they inherit
    this process's hold of the output (core.stage lock), and their console output goes to
    ``<output>/logs/launcher.log``.
    """
    import tempfile

    import torch

    nproc = cfg.nproc or max(1, torch.cuda.device_count())
    nproc = min(nproc, max(1, n_shards))  # a rank without a shard would only wait at the barrier
    # The ranks' settings, credentials included where a flag carried them: so not a record in the output
    # (settings.json is written redacted) but a file only this user can read, removed after the launch.
    fd, cfg_path = tempfile.mkstemp(prefix="laiontools-embed-", suffix=".json")
    with os.fdopen(fd, "wb") as f:
        f.write(canonical_json({**cfg.to_dict(), "engine": "local", "nproc": 0}))
    try:
        return _run_torchrun(cfg, cfg_path, nproc, n_shards)
    finally:
        os.unlink(cfg_path)


def _run_torchrun(cfg: EmbedConfig, cfg_path: str, nproc: int, n_shards: int) -> StageResult:
    import tempfile

    from laiontools.core.launch import run_logged, torchrun_command, worker_env

    # the launcher's console log is a local file, also when the output is on an object store
    logs = os.path.join(cfg.output, "logs") if "://" not in cfg.output else tempfile.mkdtemp(prefix="laiontools-embed-")
    console = os.path.join(logs, "launcher.log")
    t0 = time.time()
    report_path = join(cfg.output, layout.EMB_REPORT_JSON)
    rfs, rp = url_to_fs(report_path)
    if rfs.exists(rp):  # an earlier run's report must never be read as this run's
        rm_path(rfs, rp)
    cmd = torchrun_command(nproc, ["-m", "laiontools.cli", "embed", "--config", cfg_path])
    rc = run_logged(cmd, console, worker_env(nproc))
    # 1: the ranks finished with failed shards, listed in the report; but torchrun also exits 1 when a
    # rank stopped on an error (exit 2), and then no report was written by this run.
    if rc not in (0, 1) or not rfs.exists(rp):
        raise UserError(_rank_error(console) or f"embed: torchrun exited with code {rc}; see {console}")
    rep = read_json(report_path)
    run = rep["this_run"]
    result = EmbedResult(run["shards_embedded"], run["shards_skipped"], run["failed_shards"], run["rows"],
                         run["failed_decode"], round(time.time() - t0, 3), report_path)
    text = (f"embed: {len(result.shards_embedded)} shard(s) embedded by {nproc} processes (torchrun), "
            f"{len(result.shards_skipped)} already done, {len(result.failed_shards)} failed (of {n_shards}) -> {cfg.output}"
            + "".join(f"\n  FAILED shard {k}: {v}" for k, v in sorted(result.failed_shards.items())))
    return StageResult(
        outputs={"embeddings": cfg.output, "report": report_path, "log": console},
        counts={"shards_embedded": len(result.shards_embedded), "shards_skipped": len(result.shards_skipped),
                "shards_failed": len(result.failed_shards), "rows": result.rows, "failed_decode": result.failed_decode,
                "processes": nproc},
        timings={"embed": result.seconds}, details=result, summary=text, ok=result.ok,
    )


def _rank_error(console: str) -> str | None:
    """The last one-line error a rank printed ("laiontools embed: error: ...") in the launcher's log."""
    try:
        with open(console, encoding="utf-8", errors="replace") as f:
            lines = [ln.strip() for ln in f if "laiontools embed: error:" in ln]
    except OSError:
        return None
    return lines[-1].split("laiontools embed: error:", 1)[1].strip() if lines else None


def _init_dist() -> None:
    import torch.distributed as dist

    if not dist.is_initialized():
        # gloo: a barrier and a gather of small stats, on CPU and GPU alike.
        dist.init_process_group("gloo")


def _barrier() -> None:
    import torch.distributed as dist

    dist.barrier()


def _gather(stats: list[dict[str, Any]], skipped: list[str]) -> tuple[list[dict[str, Any]], list[str]]:
    import torch.distributed as dist

    everything: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(everything, (stats, skipped))
    return [s for st, _ in everything for s in st], [k for _, sk in everything for k in sk]


def _finish(cfg: EmbedConfig, tasks: list[dict[str, Any]], stats: list[dict[str, Any]], skipped: list[str],
            seconds: float, rank: int) -> tuple[EmbedResult, str]:
    """Write the report (rank 0) and return the result with its summary text ("" on other ranks)."""
    failed = {s["id"]: s["error"] for s in stats if "error" in s}
    embedded = sorted(s["id"] for s in stats if "error" not in s)
    # Totals over the whole folder (this run + earlier runs), from the markers.
    totals = {"rows": 0, "failed_decode": 0, "shards_done": 0}
    seen: set[str] = set()

    def unseen_now() -> list[str]:
        todo = [t for t in tasks if t["id"] not in seen]
        for t, m in zip(todo, read_markers([join(cfg.output, layout.EMB_META_DIR, t["id"] + ".parquet") for t in todo])):
            if m and m.get("shard_sha256") == t["sha256"]:
                totals["rows"] += m["rows"]
                totals["failed_decode"] += m["failed_decode"]
                totals["shards_done"] += 1
                seen.add(t["id"])
        return [x for x in embedded if x not in seen]

    # A shard a task embedded whose marker this process cannot see (after a while: storage.still_missing): the
    # task wrote where this process does not look (an executor's own disk at the output path, not a shared file
    # system). A failure, not "embedded" (exit 1), and not in this run's counts.
    from laiontools.core.storage import still_missing

    for sid in still_missing(unseen_now):
        failed[sid] = (f"embedded by its task, but its files are not in {cfg.output} as this process sees it: the executors "
                       "wrote where the driver does not see; give an --output that every node sees (a shared file system "
                       "or an object store) and re-run")
    embedded = [x for x in embedded if x in seen]
    rows = sum(s["rows"] for s in stats if "error" not in s and s["id"] in seen)
    fdec = sum(s["failed_decode"] for s in stats if "error" not in s and s["id"] in seen)
    report_path = join(cfg.output, layout.EMB_REPORT_JSON)
    result = EmbedResult(embedded, sorted(skipped), failed, rows, fdec, round(seconds, 3), report_path)
    if rank == 0:
        # The final-write phase: every shard's marker is there, the report is not (kill tests widen it).
        failpoints.pause("embed.final-write")
        write_json(report_path, {
            "manifest": cfg.manifest,
            "model": cfg.model,
            "pretrained": cfg.pretrained,
            "shards_total": len(tasks),
            "totals": totals,
            "this_run": {"shards_embedded": embedded, "shards_skipped": sorted(skipped), "failed_shards": failed,
                         "rows": rows, "failed_decode": fdec, "seconds": round(seconds, 3),
                         "rows_per_second": round(rows / seconds, 2) if seconds > 0 else None},
        })
        lines = [
            (f"embed: {len(embedded)} shard(s) embedded, {len(skipped)} already done, {len(failed)} failed "
             f"(of {len(tasks)}) -> {cfg.output}"),
            f"  this run: {rows} rows, {fdec} failed decode, {seconds:.1f}s"
            + (f" ({rows / seconds:.1f} samples/s)" if seconds > 0 and rows else ""),
            (f"  folder: {totals['shards_done']}/{len(tasks)} shards, {totals['rows']} rows, "
             f"{totals['failed_decode']} failed decode"),
        ]
        lines += [f"  FAILED shard {k}: {v}" for k, v in sorted(failed.items())]
        return result, "\n".join(lines)
    return result, ""


# --------------------------------------------------------------------------------------------------
# CLI


def main(argv: list[str] | None = None) -> int:
    """Exit 0 when every shard is embedded, 1 when some shards could not be read (listed), 2 on bad input."""
    from laiontools.core.stage import stage_main

    return stage_main(__name__, argv)
