"""The one module that reads the contracts in ``schemas/`` (catalog columns, manifest JSON Schema).

Every other module takes column names, statuses and the manifest validator from here, never from
string literals of its own.
"""

from __future__ import annotations

import json
import re
from functools import cache
from importlib import resources
from typing import Any

from laiontools.core.errors import UserError

MANIFEST_SCHEMA_VERSION = "1.0"

# Canonical catalog column names (checked against schemas/catalog.schema.json at import of
# catalog_columns(); kept as constants so code reads `C.UID` rather than "uid").
UID = "uid"
SOURCE_ID = "source_id"
URL = "url"
CAPTION = "caption"
STATUS = "status"
ERROR = "error_message"
SHARD = "shard"
KEY = "key"
WIDTH = "width"
HEIGHT = "height"
ORIGINAL_WIDTH = "original_width"
ORIGINAL_HEIGHT = "original_height"
SHA256 = "sha256"
TAR_OFFSET = "tar_offset"
TAR_LENGTH = "tar_length"
TAR_SHA256 = "tar_sha256"
SIMILARITY = "similarity"
PUNSAFE = "punsafe"
PWATERMARK = "pwatermark"
LICENSE = "license"
NSFW = "nsfw"
SCORE_COLUMNS = (SIMILARITY, PUNSAFE, PWATERMARK, LICENSE, NSFW)

STATUS_SUCCESS = "success"
STATUS_FAILED_DOWNLOAD = "failed_download"
STATUS_FAILED_RESIZE = "failed_resize"
REJECTED_PREFIX = "rejected_"
REMOVED_PREFIX = "removed_"  # takedown: a sample taken out of a pool by a removal list (schemas/catalog.schema.json)


def rejected(reason: str) -> str:
    """Status string for a row refused by prepare; `reason` must be one the catalog schema lists."""
    if reason not in rejection_reasons():
        raise ValueError(f"unknown rejection reason {reason!r}; known: {rejection_reasons()}")
    return REJECTED_PREFIX + reason


def removed(reason: str) -> str:
    """Status of a catalog row whose sample `laiontools takedown` removed: ``removed_<reason>``, the reason
    lowercased and every run of characters outside [a-z0-9_] turned into one ``_`` (at most 64 chars), so
    the status stays one token whatever the user typed. Raises ValueError when nothing is left."""
    import re

    r = re.sub(r"[^a-z0-9_]+", "_", reason.strip().lower()).strip("_")[:64].strip("_")
    if not r:
        raise ValueError(f"reason {reason!r} has no letter or digit; give e.g. --reason dmca_2026_11")
    return REMOVED_PREFIX + r


def _load(name: str) -> dict[str, Any]:
    return json.loads(resources.files("laiontools").joinpath("schemas", name).read_text())


@cache
def catalog_schema_doc() -> dict[str, Any]:
    return _load("catalog.schema.json")


@cache
def manifest_schema_doc() -> dict[str, Any]:
    return _load("manifest.schema.json")


def catalog_columns() -> list[str]:
    return [c["name"] for c in catalog_schema_doc()["columns"]]


def rejection_reasons() -> list[str]:
    return list(catalog_schema_doc()["rejection_reasons"])


def all_statuses() -> list[str]:
    doc = catalog_schema_doc()
    return list(doc["statuses"]) + [REJECTED_PREFIX + r for r in doc["rejection_reasons"]]


_ARROW_TYPES = {"string": "string", "int64": "int64", "double": "float64"}


def catalog_arrow_schema():
    """pyarrow schema of the catalog's canonical columns (extra source columns may follow them)."""
    import pyarrow as pa

    fields = []
    for c in catalog_schema_doc()["columns"]:
        fields.append(pa.field(c["name"], pa.type_for_alias(_ARROW_TYPES[c["type"]]), nullable=c["nullable"]))
    return pa.schema(fields)


_SHA256_HEX = re.compile(r"[0-9a-f]{64}")


def _plain_shard_entry(e: Any) -> bool:
    """Whether a manifest's shard entry is valid by the schema's "shards" items in the plain way every
    writer writes it: a dict with a string path, non-negative int counts (not bools) and a lowercase hex
    sha256. False leaves the entry to the schema itself (which also takes, e.g., 3.0 as an integer, and
    names the offending field)."""
    if type(e) is not dict:
        return False
    n, b, h = e.get("num_samples"), e.get("bytes"), e.get("sha256")
    return (type(e.get("path")) is str and type(n) is int and n >= 0 and type(b) is int and b >= 0
            and type(h) is str and _SHA256_HEX.fullmatch(h) is not None)


class ManifestError(UserError, ValueError):
    """A manifest is missing, unreadable, or fails schemas/manifest.schema.json."""


def validate_manifest(obj: dict[str, Any], where: str = "<manifest>") -> None:
    """Raise ManifestError naming `where` and the first offending field if `obj` breaks the schema."""
    import jsonschema

    version = obj.get("schema_version") if isinstance(obj, dict) else None
    if isinstance(obj, dict) and version is not None and version != MANIFEST_SCHEMA_VERSION:
        raise ManifestError(
            f"{where}: manifest schema_version {version!r} is not one this laiontools "
            f"knows ({MANIFEST_SCHEMA_VERSION!r}); upgrade laiontools or regenerate the manifest"
        )
    validator = jsonschema.Draft202012Validator(manifest_schema_doc())
    shards = obj.get("shards") if isinstance(obj, dict) else None
    if isinstance(shards, list) and all(_plain_shard_entry(s) for s in shards):
        # Every shard entry is plainly valid (checked here, ~0.3 us each): the schema checks the rest. Its
        # own walk costs ~30 us an entry: 6 s for each read of a 2B pool's manifest (~200k shards).
        obj = {**obj, "shards": []}
    errors = sorted(validator.iter_errors(obj), key=lambda e: list(e.path))
    if errors:
        e = errors[0]
        loc = "/".join(str(p) for p in e.path) or "(top level)"
        raise ManifestError(f"{where}: invalid manifest at {loc}: {e.message} ({len(errors)} error(s) in all)")
