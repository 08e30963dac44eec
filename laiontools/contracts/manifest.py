"""Manifests: build, validate, write, read.

A manifest is canonical JSON validated against ``schemas/manifest.schema.json`` on every write and
read. Same inputs give the same bytes: anything that changes from run to run (time, host, pid) goes
in the ``<manifest>.run.json`` sidecar, never in the manifest itself.
"""

from __future__ import annotations

import getpass
import json
import os
import platform
import socket
import sys
import time
from typing import Any

from laiontools import __version__
from laiontools.contracts.schema import MANIFEST_SCHEMA_VERSION, ManifestError, validate_manifest
from laiontools.core.storage import sha256_bytes, store_errors, url_to_fs, write_record

SIDECAR_SUFFIX = ".run.json"


def provenance(command: list[str] | None = None) -> dict[str, Any]:
    """Reproducible provenance: tool, version and the command (argv) that made the manifest."""
    return {"tool": "laiontools", "version": __version__, "command": list(command if command is not None else sys.argv)}


def new_manifest(
    *,
    name: str,
    kind: str,
    num_samples: int,
    target_samples: int | None,
    uids: dict[str, Any],
    shards: list[dict[str, Any]],
    source_fingerprint: str,
    parent: dict[str, Any] | None = None,
    selection: dict[str, Any] | None = None,
    command: list[str] | None = None,
    **extra: Any,
) -> dict[str, Any]:
    """Assemble a manifest dict with every field the schema requires (validated on write)."""
    m: dict[str, Any] = {
        "schema_version": MANIFEST_SCHEMA_VERSION,
        "name": name,
        "kind": kind,
        "num_samples": int(num_samples),
        "target_samples": None if target_samples is None else int(target_samples),
        "short": target_samples is not None and num_samples < target_samples,
        "uids": uids,
        "shards": shards,
        "parent": parent,
        "selection": selection,
        "source": {"fingerprint": source_fingerprint},
        "provenance": provenance(command),
    }
    m.update(extra)
    return m


def write_manifest(path: str, manifest: dict[str, Any], run: dict[str, Any] | None = None) -> str:
    """Validate, write atomically as canonical JSON, write the run sidecar. Returns the manifest sha256.

    `run`: more of what describes this run and not its result (the engine, the Spark settings it
    used), added to the sidecar."""
    validate_manifest(manifest, where=path)
    data = write_record(path, manifest)  # a manifest records the command and settings: without credentials
    write_record(
        path + SIDECAR_SUFFIX,
        {
            "time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            "host": socket.gethostname(),
            "user": getpass.getuser() if hasattr(os, "getuid") else None,
            "python": platform.python_version(),
            "pid": os.getpid(),
            **(run or {}),
        },
    )
    return sha256_bytes(data)


def read_manifest(path: str) -> dict[str, Any]:
    """Read and validate a manifest; raise ManifestError naming the file on any problem (StorageError
    when an object store refuses it: no credentials, access denied, an unreachable endpoint)."""
    return read_manifest_sha256(path)[0]


def read_manifest_sha256(path: str) -> tuple[dict[str, Any], str]:
    """:func:`read_manifest` and the sha256 of the bytes it read (:func:`manifest_sha256`), from one read
    of the file (on an object store, one round trip rather than two)."""
    with store_errors(path):
        return _read_manifest(path)


def _read_manifest(path: str) -> tuple[dict[str, Any], str]:
    fs, p = url_to_fs(path)
    if not fs.exists(p):
        raise ManifestError(f"manifest {path} does not exist; give the pool.manifest.json written by download or a subset manifest")
    folder = ManifestError(f"manifest {path} names a folder; give the manifest file itself (its pool.manifest.json or "
                           "<scale>.manifest.json), without a trailing '/'")
    # an object store drops a trailing '/' (the files the manifest names would then be looked for under
    # "<manifest>/"), and reads a prefix as an empty object: asked only when the bytes are no JSON
    if path.endswith("/"):
        raise folder
    try:
        with fs.open(p, "rb") as f:
            data = f.read()
        m = json.loads(data)
    except IsADirectoryError:
        raise folder from None
    except ValueError as e:
        if fs.isdir(p):
            raise folder from None
        raise ManifestError(f"manifest {path} is not valid JSON ({e}); it may be truncated: regenerate it") from e
    validate_manifest(m, where=path)
    return m, sha256_bytes(data)


def manifest_sha256(path: str) -> str:
    fs, p = url_to_fs(path)
    with fs.open(p, "rb") as f:
        return sha256_bytes(f.read())


def manifest_dir(path: str) -> str:
    return path.rpartition("/")[0] or "."


def resolve(manifest_path: str, rel: str) -> str:
    """Resolve a path stored in a manifest (relative to the manifest's folder, or an absolute URL/path)."""
    if "://" in rel or rel.startswith("/"):
        return rel
    return manifest_dir(manifest_path) + "/" + rel


def shard_urls(manifest_path: str, manifest: dict[str, Any] | None = None) -> list[str]:
    m = manifest if manifest is not None else read_manifest(manifest_path)
    return [resolve(manifest_path, s["path"]) for s in m["shards"]]


def download_settings(manifest_path: str, manifest: dict[str, Any] | None = None, max_hops: int = 8) -> dict[str, Any] | None:
    """The download settings (``DownloadConfig.semantic()``) of the pool a manifest comes from, or None.

    A pool manifest holds them under ``download.settings``; a subset or resharded subset inherits
    its pool's images, so its parent chain is followed (at most `max_hops` manifests, each parent
    path resolved against the manifest naming it). None when no manifest on the chain records them
    (a pool written by an older download or by other tools) or a parent is not readable.
    """
    path, m = manifest_path, manifest
    for _ in range(max_hops):
        if m is None:
            try:
                m = read_manifest(path)
            except (ManifestError, OSError, ValueError):
                return None
        settings = (m.get("download") or {}).get("settings")
        if isinstance(settings, dict):
            return settings
        parent_path = (m.get("parent") or {}).get("path")
        if not parent_path:
            return None
        path, m = resolve(path, parent_path), None
    return None
