"""Source metadata profiles: how each known dataset's columns map to the catalog's canonical names.

A profile is detected from the columns present (or forced with ``--profile``); a user mapping
(``--columns url=MyUrl,caption=MyText``) overrides any entry. Columns a profile does not map are kept
as extra columns (as text) in the prepared input and the catalog.
"""

from __future__ import annotations

import dataclasses

from laiontools.contracts import schema as C
from laiontools.core.errors import InputError

# Canonical names used only inside prepare before the catalog exists: the source's own image size
# (kept apart from the downloaded image's original_width/original_height) and sha256.
SOURCE_WIDTH = "source_width"
SOURCE_HEIGHT = "source_height"
SOURCE_SHA256 = "source_sha256"

CANONICAL_SOURCE_FIELDS = (
    C.SOURCE_ID, C.URL, C.CAPTION, C.SIMILARITY, C.PUNSAFE, C.PWATERMARK, C.LICENSE, C.NSFW,
    SOURCE_WIDTH, SOURCE_HEIGHT, SOURCE_SHA256,
)
NUMERIC_FIELDS = {C.SIMILARITY: "double", C.PUNSAFE: "double", C.PWATERMARK: "double",
                  SOURCE_WIDTH: "bigint", SOURCE_HEIGHT: "bigint"}


@dataclasses.dataclass(frozen=True)
class Profile:
    name: str
    # canonical field -> source column
    columns: dict[str, str]
    # columns whose presence identifies the profile
    signature: frozenset[str]


PROFILES: dict[str, Profile] = {
    "laion400m": Profile(
        "laion400m",
        {C.SOURCE_ID: "SAMPLE_ID", C.URL: "URL", C.CAPTION: "TEXT", SOURCE_HEIGHT: "HEIGHT", SOURCE_WIDTH: "WIDTH",
         C.LICENSE: "LICENSE", C.NSFW: "NSFW", C.SIMILARITY: "similarity"},
        frozenset({"SAMPLE_ID", "URL", "TEXT"}),
    ),
    "laion2b-en": Profile(
        "laion2b-en",
        {C.URL: "URL", C.CAPTION: "TEXT", SOURCE_WIDTH: "WIDTH", SOURCE_HEIGHT: "HEIGHT", C.SIMILARITY: "similarity",
         C.SOURCE_ID: "hash", C.PUNSAFE: "punsafe", C.PWATERMARK: "pwatermark"},
        frozenset({"URL", "TEXT"}),
    ),
    "datacomp": Profile(
        "datacomp",
        {C.SOURCE_ID: "uid", C.URL: "url", C.CAPTION: "text", SOURCE_WIDTH: "original_width",
         SOURCE_HEIGHT: "original_height", C.SIMILARITY: "clip_b32_similarity_score", SOURCE_SHA256: "sha256"},
        frozenset({"uid", "url", "text"}),
    ),
    "generic": Profile("generic", {C.URL: "url", C.CAPTION: "caption"}, frozenset({"url"})),
}


def parse_column_map(spec: str | dict[str, str] | None) -> dict[str, str]:
    """'url=MyUrl,caption=MyText' (or a dict from YAML) -> {canonical: source column}."""
    if not spec:
        return {}
    if isinstance(spec, dict):
        pairs = spec.items()
    else:
        pairs = []
        for part in spec.split(","):
            if "=" not in part:
                raise InputError(f"--columns entry {part!r} is not canonical=source_column (e.g. url=MyUrl)")
            k, v = part.split("=", 1)
            pairs.append((k.strip(), v.strip()))
    out = {}
    for k, v in pairs:
        if k not in CANONICAL_SOURCE_FIELDS:
            raise InputError(f"--columns maps unknown field {k!r}; known fields: {list(CANONICAL_SOURCE_FIELDS)}")
        out[k] = v
    return out


def detect_profile(columns: list[str]) -> Profile:
    """Pick the profile whose signature columns are present (most specific first)."""
    present = set(columns)
    for name in ("laion400m", "datacomp", "laion2b-en"):
        if PROFILES[name].signature <= present:
            return PROFILES[name]
    if "url" in present and ("caption" in present or "text" in present):
        cols = {C.URL: "url", C.CAPTION: "caption" if "caption" in present else "text"}
        return Profile("generic", cols, frozenset({"url"}))
    if "url" in present:
        return PROFILES["generic"]
    raise InputError(
        f"no URL column found among the columns {sorted(present)}; known profiles: "
        + "; ".join(f"{p.name} ({', '.join(sorted(p.columns.values()))})" for p in PROFILES.values())
        + ". Pass --profile or --columns url=<your url column>,caption=<your caption column>"
    )


def resolve_profile(columns: list[str], name: str | None, overrides: dict[str, str], where: str) -> Profile:
    """The profile to use for a file with `columns`: forced by name or detected, plus user overrides."""
    if name:
        if name not in PROFILES:
            raise InputError(f"unknown profile {name!r}; known: {sorted(PROFILES)}")
        base = PROFILES[name]
    elif overrides.get(C.URL):
        base = PROFILES["generic"]
    else:
        base = detect_profile(columns)
    mapping = {k: v for k, v in base.columns.items() if v in columns}
    mapping.update(overrides)
    if C.URL not in mapping or mapping[C.URL] not in columns:
        raise InputError(
            f"{where}: profile {base.name!r} needs URL column {mapping.get(C.URL) or base.columns.get(C.URL)!r}, "
            f"which is not among the columns found {sorted(columns)}; pass --profile or --columns url=<column>"
        )
    missing = [v for v in overrides.values() if v not in columns]
    if missing:
        raise InputError(f"{where}: --columns names column(s) {missing} not found; columns: {sorted(columns)}")
    return Profile(base.name, mapping, base.signature)
