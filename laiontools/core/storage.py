"""Where data lives: fsspec paths, atomic writes, sha256, completion markers.

Rules every stage follows: data is written under a temporary name and renamed into place; a unit of
work (a shard) is done only when its completion marker, written *last*, exists. Never decide a shard
is done because its data file exists: half-written files exist too.
"""

from __future__ import annotations

import hashlib
import json
import os
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any, BinaryIO

import fsspec
from fsspec.implementations.local import LocalFileSystem

DONE_SUFFIX = ".done"


def is_local(fs: fsspec.AbstractFileSystem) -> bool:
    return isinstance(fs, LocalFileSystem)


def url_to_fs(path: str) -> tuple[fsspec.AbstractFileSystem, str]:
    return fsspec.core.url_to_fs(path)


def join(base: str, *parts: str) -> str:
    """Join path parts with '/', keeping a URL scheme intact."""
    out = base.rstrip("/")
    for p in parts:
        out = out + "/" + p.strip("/")
    return out


def _tmp_name(path: str) -> str:
    head, _, tail = path.rpartition("/")
    return f"{head}/.{tail}.tmp-{uuid.uuid4().hex[:8]}" if head else f".{tail}.tmp-{uuid.uuid4().hex[:8]}"


@contextmanager
def atomic_open(path: str) -> Iterator[BinaryIO]:
    """Open `path` for binary writing; the data appears at `path` only if the block succeeds.

    Local files: write to a hidden temp file in the same folder, fsync, os.replace. Object stores:
    their single PUT is already atomic, so write through to a temp key and move it.
    """
    fs, p = url_to_fs(path)
    parent = p.rpartition("/")[0]
    if parent:
        fs.makedirs(parent, exist_ok=True)
    tmp = _tmp_name(p)
    try:
        with fs.open(tmp, "wb") as f:
            yield f
            if is_local(fs):
                f.flush()
                os.fsync(f.fileno())
        if is_local(fs):
            os.replace(tmp, p)
        else:
            fs.mv(tmp, p)
    except BaseException:
        try:
            if fs.exists(tmp):
                fs.rm(tmp)
        finally:
            raise


def atomic_write_bytes(path: str, data: bytes) -> None:
    with atomic_open(path) as f:
        f.write(data)


def canonical_json(obj: Any) -> bytes:
    """Deterministic JSON (sorted keys, fixed separators, trailing newline): byte-identical for equal data."""
    return (json.dumps(obj, sort_keys=True, indent=2, ensure_ascii=False, allow_nan=False) + "\n").encode()


def write_json(path: str, obj: Any) -> bytes:
    data = canonical_json(obj)
    atomic_write_bytes(path, data)
    return data


def read_json(path: str) -> Any:
    fs, p = url_to_fs(path)
    with fs.open(p, "rb") as f:
        return json.loads(f.read())


def sha256_bytes(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def sha256_file(path: str, chunk: int = 1 << 22) -> tuple[str, int]:
    """(sha256 hex, size in bytes) of a file, streamed."""
    fs, p = url_to_fs(path)
    h = hashlib.sha256()
    n = 0
    with fs.open(p, "rb") as f:
        while True:
            b = f.read(chunk)
            if not b:
                break
            h.update(b)
            n += len(b)
    return h.hexdigest(), n


def marker_path(path: str) -> str:
    return path + DONE_SUFFIX


def mark_done(path: str, info: dict[str, Any] | None = None) -> None:
    """Write the completion marker of `path` (a shard or output unit). Call it last."""
    write_json(marker_path(path), info or {})


def is_done(path: str) -> bool:
    fs, p = url_to_fs(marker_path(path))
    return fs.exists(p)


def read_marker(path: str) -> dict[str, Any] | None:
    return read_json(marker_path(path)) if is_done(path) else None


def ensure_output_dir(path: str) -> None:
    """Create `path` as a folder; raise a clear error if it exists as a file."""
    fs, p = url_to_fs(path)
    if fs.exists(p) and not fs.isdir(p):
        raise NotADirectoryError(f"output {path} exists and is a file; give a folder path (new or existing)")
    fs.makedirs(p, exist_ok=True)
