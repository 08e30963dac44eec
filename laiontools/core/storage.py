"""Where data lives: fsspec paths, atomic writes, sha256, completion markers.

Rules every stage follows: data is written under a temporary name and renamed into place; a unit of
work (a shard) is done only when its completion marker, written *last*, exists. Never decide a shard
is done because its data file exists: half-written files exist too.
"""

from __future__ import annotations

import hashlib
import json
import os
import posixpath
import re
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any, BinaryIO
from urllib.parse import unquote

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
    except BaseException as e:
        try:
            if fs.exists(tmp):
                fs.rm(tmp)
        finally:
            if isinstance(e, OSError) and e.errno is not None and not e.filename:
                # a failed write()/fsync (disk full, quota) names no file: name the one being written
                raise OSError(e.errno, e.strerror, path) from e
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


# Spellings of one object store that different clients use (Hadoop's s3a/s3n, gcsfs's gcs).
_SCHEME_ALIASES = {"s3a": "s3", "s3n": "s3", "gcs": "gs", "abfss": "abfs", "wasbs": "wasb"}
# File systems whose URLs carry a host (name node) that fsspec drops from its paths.
_HOST_SCHEMES = {"hdfs", "viewfs", "webhdfs"}
_SCHEME_RE = re.compile(r"^([A-Za-z][A-Za-z0-9+.-]+):(.*)$", re.S)


def path_key(path: str, *, uri_encoded: bool = False) -> str:
    """One spelling of a file's location, for matching paths that different systems wrote down.

    Spark (``input_file_name()``, percent-encoded URIs: pass ``uri_encoded=True``), Hadoop (``s3a://``,
    ``file:/x``), fsspec (``s3://``, or a protocol-less ``bucket/key`` once stripped — pass the full URL
    here, not the stripped path) and users spell one file differently. Keys: ``file:///abs/path`` for
    local files (relative paths resolved against the working folder), ``hdfs:///path`` for HDFS-like
    stores (the name node dropped, as fsspec does), ``<scheme>://bucket/key`` otherwise, with
    s3a/s3n -> s3 and gcs -> gs. Equal keys name the same file.
    """
    m = _SCHEME_RE.match(path)
    scheme, rest = (m.group(1).lower(), m.group(2)) if m else ("file", path)
    if uri_encoded:
        rest = unquote(rest)
    scheme = _SCHEME_ALIASES.get(scheme, scheme)
    if scheme in ("file", "local"):
        if rest.startswith("//"):  # file://host/path or file:///path; the host is this machine
            rest = "/" + rest[2:].partition("/")[2]
        return "file://" + os.path.abspath(rest)
    rest = rest[2:] if rest.startswith("//") else rest.lstrip("/")
    if scheme in _HOST_SCHEMES:
        return f"{scheme}:///" + posixpath.normpath("/" + rest.partition("/")[2]).lstrip("/")
    return f"{scheme}://" + posixpath.normpath(rest).lstrip("/")
