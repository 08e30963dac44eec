"""Reading an embeddings folder (what `laiontools embed` writes; names in :mod:`laiontools.contracts.layout`).

The stages that consume embeddings (dedup, dedup calibrate, subsets' score filter) read them through
this module, never through the embed stage: the folder's model.json (:func:`load_model_json`), which
shards are complete (:func:`done_shards`), the row-aligned arrays (:func:`read_embeddings`), and
whether two folders share one embedding space (:func:`check_compatible`), and the pool a folder embeds
(:func:`read_pool`: model, pool manifest, every pool shard embedded or an error naming the missing ones)
with its shards' image vectors (:func:`read_embedding_shard`, memory-mapped when local).

Integrity: embed records the sha256 of each shard's four files in the shard's completion marker
(``meta/<id>.parquet.done``, field :data:`MARKER_SHA256`, keyed by :func:`shard_files` paths). Every
reader here checks the bytes it reads against it and raises an error naming the file on a mismatch
(a bit flipped on disk would otherwise read back as another float and move similarities silently).
Cost: the bytes are hashed as they are read (``load_npy``, meta parquet); a memory-mapped image
array is hashed through the same mapping before the search pages it (one extra pass over the page
cache; sha256 runs at about 1.8 GB per CPU-second on this project's test machine (SHA-NI), so a
15 MB shard of 10k rows x 768 dims costs about 9 ms of CPU).
Folders written before the hashes were recorded have none: they are read unchecked (debug log).
"""

from __future__ import annotations

import dataclasses
import hashlib
import io
import logging
import os
from collections.abc import Iterator
from typing import Any

import numpy as np

from laiontools.contracts import layout
from laiontools.core.errors import UserError
from laiontools.core.storage import PARQUET_READ, join, read_json, url_to_fs

log = logging.getLogger(__name__)

# The completion marker's field holding {path relative to the embeddings folder: sha256} of a shard's files.
MARKER_SHA256 = "files_sha256"
# ... and {path: size in bytes}: what a resume compares (one listing per folder) before it trusts a marker.
MARKER_BYTES = "files_bytes"
STATUS_OK = "ok"
STATUS_FAILED_DECODE = "failed_decode"
META_COLUMNS = ("uid", "key", "clip_score", "embed_status", "embed_error")
SCORE_COLUMNS = ("uid", "clip_score")
# Fields that define an embedding space: two folders are compatible only if all of them match.
IDENTITY_FIELDS = ("model", "pretrained", "checkpoint_sha256", "random_init_seed", "embed_dim")
# Settings embed records in model.json that change the stored vectors without changing the embedding space
# (a dedup may embed its queries with other ones): a resumed folder must keep them, or its shards would mix.
# The value is what a folder written before the field was recorded was made with (the default then).
RUN_SETTING_FIELDS = {"precision": "auto", "jpeg_draft_decode": False}
# "auto" is a request, not a precision (amp_bf16 on a GPU, fp32 on the CPU): model.json also records the
# precision the vectors were computed in, and a resume compares that one when both runs know it.
PRECISION_USED = "precision_used"


class EmbedMismatchError(UserError, ValueError):
    """The output folder holds embeddings of another model, dimension or pool."""


def precision_used(settings: dict[str, Any]) -> str | None:
    """The precision vectors were (or will be) computed in: :data:`PRECISION_USED`, else the precision
    asked for unless it is "auto" (what that became depends on the device: a folder written before the
    field was recorded does not say), else None."""
    used = settings.get(PRECISION_USED)
    if isinstance(used, str):
        return used
    asked = settings.get("precision", RUN_SETTING_FIELDS["precision"])
    return None if asked == "auto" else asked


def _asked_used(asked: str, used: str) -> str:
    return repr(asked) if asked == used else f"{asked!r} (= {used})"


def check_same_run_settings(existing: dict[str, Any], new: dict[str, Any], where: str,
                            precision_pending: bool = False) -> None:
    """Raise EmbedMismatchError naming each differing :data:`RUN_SETTING_FIELDS` setting (existing vs new)
    if a run with `new` settings would add shards to the folder `where` made with `existing` ones. The
    precision compared is the one used (:func:`precision_used`) when both sides know it, else the one asked.
    `precision_pending`: what `new`'s "auto" becomes is resolved later and checked then (embed on Spark: a
    probe task, after this check of the folder): not compared here."""
    diff: dict[str, tuple[str, str]] = {}
    used_old, used_now = precision_used(existing), precision_used(new)
    for f, d in RUN_SETTING_FIELDS.items():
        old, now = existing.get(f, d), new.get(f, d)
        if f == "precision" and precision_pending and used_now is None:
            continue
        if f == "precision" and used_old is not None and used_now is not None:
            if used_old != used_now:
                diff[f] = (_asked_used(old, used_old), _asked_used(now, used_now))
        elif f == "precision" and used_old is not None and used_now is None:
            # "auto" where the device is not known here (Spark tasks pick theirs): it may become another
            # precision than the folder's; the folder's one must be asked for explicitly
            diff[f] = (_asked_used(old, used_old), f"{now!r} (device not known: pass --precision {used_old})")
        elif old != now:
            diff[f] = (repr(old), repr(now))
    if diff:
        shown = ", ".join(f"{f}: {old} there, {now} now" for f, (old, now) in diff.items())
        raise EmbedMismatchError(
            f"{where} was embedded with other settings ({shown}); resuming would mix shards embedded two ways: "
            f"re-run with the folder's settings, use another --output folder, or delete that one to re-embed"
        )


def check_compatible(existing: dict[str, Any], new: dict[str, Any], where: str) -> None:
    """Raise EmbedMismatchError naming both models if `existing` and `new` are different embedding spaces."""
    from laiontools.models.registry import model_signature

    diff = [f for f in IDENTITY_FIELDS if existing.get(f) != new.get(f)]
    if diff:
        raise EmbedMismatchError(
            f"{where} holds embeddings of {model_signature(existing)}, not {model_signature(new)} "
            f"(differs in {diff}); use another --output folder, or delete that one to re-embed"
        )


def load_model_json(emb_dir: str) -> dict[str, Any]:
    """The model.json of an embeddings folder; raise UserError if the folder has none."""
    path = join(emb_dir, layout.EMB_MODEL_JSON)
    fs, p = url_to_fs(path)
    if not fs.exists(p):
        raise UserError(f"{path} does not exist: {emb_dir} is not an embeddings folder written by `laiontools embed`")
    return read_json(path)


def shard_files(sid: str) -> dict[str, str]:
    """kind (img, text, meta, scores) -> the path of shard `sid`'s file relative to the embeddings folder."""
    return {
        "img": f"{layout.EMB_IMG_DIR}/{sid}.npy",
        "text": f"{layout.EMB_TEXT_DIR}/{sid}.npy",
        "meta": f"{layout.EMB_META_DIR}/{sid}.parquet",
        "scores": f"{layout.EMB_SCORES_DIR}/{sid}.parquet",
    }


def shard_marker(emb_dir: str, sid: str) -> dict[str, Any]:
    """Embedding shard `sid`'s completion marker ({} if it has none). A reader that needs both the shard's
    identity and its hashes reads it once and passes it on: both then describe the same embed run."""
    from laiontools.core.storage import read_marker

    return read_marker(join(emb_dir, shard_files(sid)["meta"])) or {}


def recorded_sha256(emb_dir: str, sid: str, marker: dict[str, Any] | None = None) -> dict[str, str]:
    """{relative path: sha256} embed recorded in shard `sid`'s completion marker (`marker`, read here if
    not given); {} for a folder written before hashes were recorded (its files are then read unchecked)."""
    got = (marker if marker is not None else shard_marker(emb_dir, sid)).get(MARKER_SHA256) or {}
    if not got:
        log.debug("%s: shard %s's marker records no file hashes (written by an older embed): not checked", emb_dir, sid)
    return got


def shard_identity(emb_dir: str, sid: str, marker: dict[str, Any] | None = None) -> str:
    """What a result computed from embedding shard `sid` is valid for: a short hash of the files' sha256
    that embed recorded in the shard's marker (`marker`, read here if not given; of the whole marker for a
    folder written before hashes were recorded). A shard embedded again (a takedown's rewritten shard,
    another pool in the same folder) gets another identity, so dedup's and semdedup's per-shard results
    made from the old one are redone; the same files copied elsewhere keep theirs."""
    from laiontools.core.storage import canonical_json, sha256_bytes

    marker = marker if marker is not None else shard_marker(emb_dir, sid)
    return sha256_bytes(canonical_json(marker.get(MARKER_SHA256) or marker))[:16]


def check_sha256(path: str, data: Any, want: str | None, sid: str) -> None:
    """Raise :func:`~laiontools.core.errors.task_error` naming `path` if sha256(`data`) is not `want`
    (no check when `want` is None). `data` is any buffer (bytes, an mmap)."""
    if not want:
        return
    got = hashlib.sha256(data).hexdigest()
    if got != want:
        from laiontools.core.errors import task_error

        raise task_error(
            f"{path} has sha256 {got[:16]}… but embed recorded {want[:16]}… when it wrote it (the file changed on "
            f"disk since: damaged or edited); delete {layout.EMB_META_DIR}/{sid}.parquet.done and re-run embed to rebuild it"
        )


def check_shard_files_spark(spark: Any, emb_dir: str, kind: str) -> int:
    """Check every finished shard's `kind` file (img, text, meta, scores) against embed's recorded sha256
    in Spark tasks, for readers that hand the files to Spark's own reader (subsets' ``--scores``): each
    task reads its shard's marker and file once more, in parallel (the small scores parquet: about
    30 bytes a row). Raises (through the task) an error naming the first changed file; returns how many
    files were checked (those of older embed outputs, without recorded hashes, are not)."""
    sids = done_shards(emb_dir)
    if not sids:
        return 0
    slices = max(1, min(len(sids), spark.sparkContext.defaultParallelism * 4))

    def check(sid: str) -> int:
        rel = shard_files(sid)[kind]
        want = recorded_sha256(emb_dir, sid).get(rel)
        if want:
            read_checked(join(emb_dir, rel), want, sid)
        return int(bool(want))

    return int(spark.sparkContext.parallelize(sids, slices).map(check).sum())


def _shard_id_of(path: str) -> str:
    return os.path.basename(path).split(".", 1)[0]


def done_shards(emb_dir: str) -> list[str]:
    """Ids of the shards whose completion marker exists, sorted."""
    fs, p = url_to_fs(join(emb_dir, layout.EMB_META_DIR))
    if not fs.exists(p):
        return []
    suffix = ".parquet.done"
    return sorted(os.path.basename(f)[: -len(suffix)] for f in fs.ls(p, detail=False) if f.endswith(suffix))


def read_embeddings(
    emb_dir: str, dtype: Any = np.float32
) -> Iterator[tuple[str, np.ndarray, np.ndarray, Any]]:
    """Yield (shard id, img_emb, text_emb, meta DataFrame) for every finished shard, in id order.

    Embeddings are stored float16; they come back as `dtype` (float32 by default, what faiss takes).
    Rows are aligned across the three; rows with ``embed_status != 'ok'`` have zero image vectors.
    Raises UserError if a shard's files disagree in length (a corrupted folder).
    """
    import pandas as pd

    for sid in done_shards(emb_dir):
        rel, sha = shard_files(sid), recorded_sha256(emb_dir, sid)
        img = load_npy(join(emb_dir, rel["img"]), sha.get(rel["img"]))
        txt = load_npy(join(emb_dir, rel["text"]), sha.get(rel["text"]))
        meta = pd.read_parquet(io.BytesIO(read_checked(join(emb_dir, rel["meta"]), sha.get(rel["meta"]), sid)), **PARQUET_READ)
        if not (len(img) == len(txt) == len(meta)):
            raise UserError(
                f"{emb_dir}: shard {sid} is not row-aligned (img {len(img)}, text {len(txt)}, meta {len(meta)} rows); "
                f"delete meta/{sid}.parquet.done and re-run embed to rebuild it"
            )
        yield sid, img.astype(dtype, copy=False), txt.astype(dtype, copy=False), meta


def shard_rows(emb_dir: str, shards: list[str]) -> list[int]:
    """Row count of every embedding shard from its parquet footer (no vectors read). A damaged footer or
    an object store's refusal: one error naming the file."""
    import pyarrow.parquet as pq

    from laiontools.core.storage import parquet_damaged, store_errors

    out = []
    for sid in shards:
        path = join(emb_dir, layout.EMB_META_DIR, f"{sid}.parquet")
        fs, p = url_to_fs(path)
        with store_errors(path), fs.open(p, "rb") as f:
            try:
                out.append(pq.ParquetFile(f).metadata.num_rows)
            except Exception as e:
                if not parquet_damaged(e):
                    raise
                raise UserError(f"{path} is damaged or truncated ({type(e).__name__}: {str(e)[:200]}); delete "
                                f"{layout.EMB_META_DIR}/{sid}.parquet.done and re-run embed to rebuild it") from None
    return out


def read_checked(path: str, sha256: str | None, sid: str) -> bytes:
    """The whole file at `path`, checked against `sha256` (embed's record; None: unchecked)."""
    fs, p = url_to_fs(path)
    with fs.open(p, "rb") as f:
        data = f.read()
    check_sha256(path, data, sha256, sid)
    return data


def load_npy(path: str, sha256: str | None = None) -> np.ndarray:
    """A .npy file at any fsspec path (read whole, never unpickled), checked against `sha256` when given
    (embed's record, :func:`recorded_sha256`); a cut, damaged or changed file raises
    :func:`~laiontools.core.errors.task_error` naming it (this runs in Spark tasks too)."""
    data = read_checked(path, sha256, _shard_id_of(path))
    try:
        return np.load(io.BytesIO(data), allow_pickle=False)
    except (ValueError, EOFError) as e:
        raise _damaged_npy(path, e) from e


def _damaged_npy(path: str, e: BaseException) -> Exception:
    from laiontools.core.errors import task_error

    return task_error(f"{path} is damaged or truncated ({e}); delete its shard's {layout.EMB_META_DIR}/<shard>.parquet.done "
                      f"and re-run embed to rebuild it")


# ---------------------------------------------------------------------------------------------
# the pool an embeddings folder describes (dedup, dedup calibrate, semdedup)


class MissingEmbeddingsError(UserError, ValueError):
    """Some pool shards have no (complete) embeddings."""


@dataclasses.dataclass
class PoolInfo:
    emb_dir: str
    model: dict[str, Any]  # model.json
    manifest_path: str | None
    manifest: dict[str, Any] | None
    shard_ids: list[str]  # embedding shards to search, sorted
    tar_by_shard: dict[str, str]  # shard id -> pool tar URL (empty without a manifest)

    @property
    def fingerprint(self) -> str | None:
        return (self.manifest or {}).get("source", {}).get("fingerprint")

    def download_settings(self) -> dict[str, Any] | None:
        """The pool's recorded download settings (through a subset's parents), or None."""
        from laiontools.contracts.manifest import download_settings

        return download_settings(self.manifest_path, self.manifest) if self.manifest_path else None


def _manifest_path_from_model(emb_dir: str, model: dict[str, Any]) -> str | None:
    """The pool manifest model.json records (``pool.manifest``), as written or relative to `emb_dir`."""
    v = (model.get("pool") or {}).get("manifest")
    if not isinstance(v, str) or not v:
        return None
    if "://" in v or v.startswith("/") or os.path.exists(v):
        return v
    return join(emb_dir, v)


def _stale_shards(emb_dir: str, model: dict[str, Any], manifest_sha: str, expected: dict[str, Any],
                  embedded: set[str]) -> list[str]:
    """Embedded pool shards whose completion marker records other shard bytes (``shard_sha256``) than the
    manifest's sha256 for them. Cheap when nothing changed: the markers are read only when the manifest
    (`manifest_sha`: the sha256 of the bytes read) is not the one model.json records, as after a shard
    was downloaded again. The markers are read several at once (on an object store, ~230k round trips
    at 2B for a folder that records no manifest sha256).

    A folder from before model.json recorded the manifest's sha256 has its markers read on every call:
    this is a reader (dedup, semdedup, calibrate may read a folder they may not write, while an embed
    run may be writing its model.json), so it does not record the sha256 itself; `laiontools embed` on
    the pool into the folder records it (prepare_output), and says so here."""
    from laiontools.core.storage import read_markers

    recorded = (model.get("pool") or {}).get("manifest_sha256")
    if recorded == manifest_sha:
        return []
    if recorded is None:
        log.info("%s/%s records no pool manifest sha256 (written by an older embed): every shard's completion "
                 "marker is read to check it was made from this pool's shard bytes; `laiontools embed` on the pool "
                 "into %s records it (its done shards are not embedded again)", emb_dir, layout.EMB_MODEL_JSON, emb_dir)
    sids = sorted(set(expected) & embedded)
    markers = read_markers([join(emb_dir, shard_files(sid)["meta"]) for sid in sids])
    stale = []
    for sid, marker in zip(sids, markers):
        got = (marker or {}).get("shard_sha256")
        if got and expected[sid].get("sha256") and got != expected[sid]["sha256"]:
            stale.append(sid)
    return stale


def read_pool(emb_dir: str) -> PoolInfo:
    """Model, manifest and searchable shards of an embedding output.

    Raises MissingEmbeddingsError listing every pool shard (from the pool manifest) that has no
    complete embeddings: a dedup that silently skipped them would leave contamination in.
    """
    from laiontools.contracts.manifest import read_manifest_sha256, resolve

    fs, p = url_to_fs(emb_dir)
    if not fs.exists(p):
        raise UserError(f"embeddings folder {emb_dir} does not exist; give the output folder of `laiontools embed`")
    model = load_model_json(emb_dir)
    embedded = set(done_shards(emb_dir))  # a shard counts only once embed's completion marker exists
    mpath = _manifest_path_from_model(emb_dir, model)
    manifest = None
    tar_by_shard: dict[str, str] = {}
    if mpath is not None:
        manifest, manifest_sha = read_manifest_sha256(mpath)  # one read: the manifest may be on an object store
        want_fp = (model.get("pool") or {}).get("source_fingerprint")
        if want_fp and manifest["source"]["fingerprint"] != want_fp:
            raise UserError(
                f"{emb_dir}/model.json says it embeds a pool with source fingerprint {want_fp[:12]}..., but {mpath} "
                f"has {manifest['source']['fingerprint'][:12]}...; the manifest was replaced: re-run embed"
            )
        expected = {}
        for s in manifest["shards"]:
            sid = layout.shard_id(s["path"])
            expected[sid] = s
            tar_by_shard[sid] = resolve(mpath, s["path"])
        missing = sorted(sid for sid, s in expected.items() if sid not in embedded and int(s.get("num_samples", 1)) > 0)
        stale = _stale_shards(emb_dir, model, manifest_sha, expected, embedded)
        if stale:
            shown = ", ".join(stale[:20]) + (f" ... ({len(stale)} in all)" if len(stale) > 20 else "")
            raise MissingEmbeddingsError(
                f"pool {mpath} has {len(stale)} shard(s) whose embeddings in {emb_dir} were made from other bytes of "
                f"the shard (downloaded or rewritten again since embed ran): {shown}; run `laiontools embed` on this "
                f"pool into {emb_dir} to embed them again (their rows are not this pool's samples)"
            )
        if missing:
            shown = ", ".join(missing[:20]) + (f" ... ({len(missing)} in all)" if len(missing) > 20 else "")
            raise MissingEmbeddingsError(
                f"pool {mpath} has {len(missing)} shard(s) with no complete embeddings in {emb_dir}: {shown}; "
                f"run `laiontools embed` to finish them (dedup and semdedup never skip shards silently)"
            )
        shard_ids = sorted(sid for sid in expected if sid in embedded)
    else:
        log.warning("%s names no pool manifest: using the %d embedded shards found; pool images (pHash, galleries) unavailable", emb_dir, len(embedded))
        shard_ids = sorted(embedded)
    if not shard_ids:
        raise MissingEmbeddingsError(f"{emb_dir} holds no embedding shards ({layout.EMB_IMG_DIR}/*.npy + {layout.EMB_META_DIR}/*.parquet)")
    return PoolInfo(emb_dir, model, mpath, manifest, shard_ids, tar_by_shard)


def _check_mapped(path: str, local: str, sha256: str | None, sid: str) -> None:
    """Check a local file against `sha256` through a read-only memory map: the pages it touches stay in
    the page cache for the memory-mapped search that follows (no copy of the file in this process)."""
    import mmap

    if not sha256:
        return
    with open(local, "rb") as f:
        if os.fstat(f.fileno()).st_size == 0:
            check_sha256(path, b"", sha256, sid)
            return
        with mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as m:
            check_sha256(path, m, sha256, sid)


def read_embedding_shard(emb_dir: str, sid: str, marker: dict[str, Any] | None = None) -> tuple[np.ndarray, Any]:
    """(float16/32 image embeddings (n, d), meta table) of one shard, checked against the sha256 its marker
    records (`marker`, :func:`shard_marker`, read here if not given); raises if they are not row-aligned."""
    import pyarrow.parquet as pq

    from laiontools.core.storage import is_local

    rel, sha = shard_files(sid), recorded_sha256(emb_dir, sid, marker)
    npy = join(emb_dir, rel["img"])
    fs, p = url_to_fs(npy)
    if is_local(fs):
        _check_mapped(npy, p, sha.get(rel["img"]), sid)
        try:
            emb = np.load(p, mmap_mode="r", allow_pickle=False)  # paged in chunk by chunk by the search loop
        except (ValueError, EOFError) as e:  # cut file: shorter than its header says
            raise _damaged_npy(npy, e) from e
    else:
        emb = load_npy(npy, sha.get(rel["img"]))
    meta = pq.read_table(io.BytesIO(read_checked(join(emb_dir, rel["meta"]), sha.get(rel["meta"]), sid)), **PARQUET_READ)
    if emb.ndim != 2 or emb.shape[0] != meta.num_rows:
        raise UserError(
            f"embedding shard {sid} in {emb_dir}: {layout.EMB_IMG_DIR}/{sid}.npy has shape {emb.shape} but "
            f"{layout.EMB_META_DIR}/{sid}.parquet has {meta.num_rows} rows; re-run embed for this shard"
        )
    return emb, meta
