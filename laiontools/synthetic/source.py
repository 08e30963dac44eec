"""LAION-format source metadata pointing at the synthetic web, with a known share of broken rows.

Every row carries the route it was sent down and the catalog status it must end in, so download
tests can compare the catalog with ``<source>.expected.parquet`` row by row (join on
``expected_uid``, the uid laiontools.contracts.uids assigns to the row's URL + caption).
"""

from __future__ import annotations

import hashlib
import json
import math
import os
from collections.abc import Sequence
from typing import Any

import numpy as np

from laiontools.contracts import schema as S
from laiontools.contracts.uids import uid_of

# Route name -> the catalog status the route exists to produce: the row's own defect, as a download
# with img2dataset's defaults (retries=0, X-Robots-Tag opt-outs respected, timeout < SLOW_SECONDS)
# and a strict prepare policy (private hosts refused, host names resolved) reports it. What a row
# really ends in also depends on the policy the run uses: see expected_status().
ROUTES: dict[str, str] = {
    # HTTP routes served by SyntheticWebServer
    "ok": S.STATUS_SUCCESS,                    # /img/<file>
    "redirect": S.STATUS_SUCCESS,              # /redirect/<file> -> 302 -> /img/<file>
    "status_404": S.STATUS_FAILED_DOWNLOAD,    # /status/404/<file>
    "status_500": S.STATUS_FAILED_DOWNLOAD,    # /status/500/<file>
    "status_503": S.STATUS_FAILED_DOWNLOAD,    # /status/503/<file> (Retry-After: 1)
    "status_429": S.STATUS_FAILED_DOWNLOAD,    # /status/429/<file> (Retry-After: 1)
    "flaky": S.STATUS_FAILED_DOWNLOAD,         # /flaky/1/<file>: 503 once, then 200 -> success after a retry
    "slow": S.STATUS_FAILED_DOWNLOAD,          # /slow/<SLOW_SECONDS>/<file>: past any sane timeout
    "noai": S.STATUS_FAILED_DOWNLOAD,          # /noai/<file>: X-Robots-Tag: noai, refused by img2dataset
    "noimageai": S.STATUS_FAILED_DOWNLOAD,     # /noimageai/<file>: X-Robots-Tag: noimageai
    "html": S.STATUS_FAILED_DOWNLOAD,          # /html/<file>: 200 text/html: no image size in it, refused before any decoder (fails closed)
    "corrupt": S.STATUS_FAILED_DOWNLOAD,       # /corrupt/<file>: JPEG headers, an unknown marker, garbage: no size readable, refused before any decoder
    "truncated": S.STATUS_FAILED_RESIZE,       # /truncated/<file>: first 30% of a JPEG
    "huge": S.STATUS_FAILED_DOWNLOAD,          # /huge/<file>: PNG declaring 60000x60000 pixels, refused from its header by laiontools.web.fetch
    # Metadata-level breakage, refused by prepare before any request
    "null_url": S.rejected("null_url"),        # URL is null
    "empty_url": S.rejected("null_url"),       # URL is "" or whitespace
    "url_too_long": S.rejected("url_too_long"),  # > 2048 chars (a long query string)
    "bad_scheme": S.rejected("bad_scheme"),    # file:, ftp:, data:, javascript: (cycled)
    "invalid_url": S.rejected("invalid_url"),  # no host ("http:///x.jpg") or unparsable ("http://[::1/x.jpg")
    # 10.x, 192.168.x, 172.16-31.x, 169.254.x (cycled; port 9, and never the cloud metadata address,
    # because a run that allows private networks will really connect to them)
    "private_address": S.rejected("private_address"),
    "unresolvable_host": S.rejected("unresolvable_host"),  # <name>.invalid (RFC 2606: never resolves)
    "missing_caption": S.rejected("missing_caption"),  # caption null or "" (cycled)
    "caption_too_long": S.rejected("caption_too_long"),  # CAPTION_TOO_LONG_CHARS chars
    "duplicate": S.rejected("duplicate_uid"),  # same URL + caption as an earlier "ok" row (which keeps its status)
    "malformed_row": S.rejected("malformed_row"),  # jsonl only: a line that is not a JSON object
}
# Rows whose failure a retry pass should re-attempt (timeouts, 429, 5xx).
TRANSIENT_ROUTES = frozenset({"status_500", "status_503", "status_429", "flaky", "slow"})
HTTP_ROUTES = tuple(r for r in ROUTES if not ROUTES[r].startswith(S.REJECTED_PREFIX))
# Routes whose URL points at the synthetic server (base_url), so their fate also depends on whether
# the run allows base_url's host.
_AT_BASE = frozenset(HTTP_ROUTES) | {"url_too_long", "missing_caption", "caption_too_long", "duplicate"}
_TEXT_ONLY_ROUTES = frozenset({"malformed_row"})


def is_private_host(url: str) -> bool:
    """True if `url`'s host is a loopback/private/link-local address or a local name (the test server's)."""
    import ipaddress
    from urllib.parse import urlsplit

    host = (urlsplit(url).hostname or "").lower()
    if host in ("localhost",) or host.endswith((".localhost", ".local", ".internal")):
        return True
    try:
        ip = ipaddress.ip_address(host)
    except ValueError:
        return False
    return bool(ip.is_private or ip.is_loopback or ip.is_link_local or ip.is_reserved)


def expected_status(route: str, *, base_private: bool = True, base_allowed: bool = True,
                    allow_private_network: bool = False, retried: bool = False) -> str:
    """The catalog status a row sent down `route` ends in, given the run's policy.

    base_private: the server's host is private/loopback (always, for the test server on 127.0.0.1).
    base_allowed: the run allow-lists the server's network (``--allow-networks 127.0.0.0/8``, what
    tests and the demo use), so rows at the base URL are fetched while other private targets are
    still refused. allow_private_network: the run allows every private target (then the
    "private_address" rows are fetched and fail). "unresolvable_host" rows use the special-use
    ``.invalid`` TLD, which prepare refuses without a DNS query. retried: after one retry pass.
    """
    status = ROUTES[route]
    if route == "flaky" and retried:
        return S.STATUS_SUCCESS
    if route == "private_address" and allow_private_network:
        return S.STATUS_FAILED_DOWNLOAD
    if (route in _AT_BASE and route not in ("url_too_long", "duplicate") and base_private
            and not (base_allowed or allow_private_network)):
        return S.rejected("private_address")
    return status


SLOW_SECONDS = 30.0
URL_TOO_LONG_CHARS = 2600
CAPTION_TOO_LONG_CHARS = 20_000
FLAKY_FAILURES = 1

# ~25% of rows broken in all (redirect and flaky are in the mix, as the web has them).
DEFAULT_BROKEN: dict[str, float] = {
    "redirect": 0.02, "status_404": 0.03, "status_500": 0.01, "status_503": 0.01, "status_429": 0.01,
    "flaky": 0.01, "slow": 0.005, "noai": 0.01, "noimageai": 0.005, "html": 0.01, "corrupt": 0.01,
    "truncated": 0.01, "huge": 0.005, "null_url": 0.01, "empty_url": 0.005, "url_too_long": 0.005,
    "bad_scheme": 0.015, "invalid_url": 0.005, "private_address": 0.01, "unresolvable_host": 0.005,
    "missing_caption": 0.01, "caption_too_long": 0.005, "duplicate": 0.02, "malformed_row": 0.005,
}
MALFORMED_LINE = '{"URL": "http://broken.example/x.jpg", "TEXT": unquoted text'  # what a malformed_row row is

PROFILES: dict[str, tuple[str, ...]] = {
    "laion400m": ("SAMPLE_ID", "URL", "TEXT", "HEIGHT", "WIDTH", "LICENSE", "NSFW", "similarity"),
    "laion2b-en": ("URL", "TEXT", "WIDTH", "HEIGHT", "similarity", "hash", "punsafe", "pwatermark"),
    "datacomp": ("uid", "url", "text", "original_width", "original_height", "clip_b32_similarity_score",
                 "clip_l14_similarity_score", "face_bboxes", "sha256"),
    "generic": ("url", "caption"),
}
FORMATS = ("parquet", "csv", "tsv", "jsonl", "jsonl.gz", "csv.gz")
EXPECTED_SUFFIX = ".expected.parquet"
# Columns the expected table adds to the profile's columns.
EXPECTED_COLUMNS = ("row", "route", "expected", "expected_after_retry", "transient", "expected_uid", "item_id", "file",
                    "eval_item", "transform")


def _route_url(route: str, base_url: str, file: str, j: int) -> str | None:
    b = base_url.rstrip("/")
    if route == "ok":
        return f"{b}/img/{file}"
    if route.startswith("status_"):
        return f"{b}/status/{route.split('_', 1)[1]}/{file}"
    if route == "flaky":
        return f"{b}/flaky/{FLAKY_FAILURES}/{file}"
    if route == "slow":
        return f"{b}/slow/{SLOW_SECONDS:g}/{file}"
    if route in ("redirect", "html", "corrupt", "truncated", "noai", "noimageai", "huge"):
        return f"{b}/{route}/{file}"
    if route == "null_url":
        return None
    if route == "empty_url":
        return ("", "   ")[j % 2]
    if route == "url_too_long":
        u = f"{b}/img/{file}?ref="
        return u + "x" * (URL_TOO_LONG_CHARS - len(u))
    if route == "bad_scheme":
        return (f"file:///var/images/{file}", f"ftp://ftp.example.com/pub/{file}",
                "data:image/jpeg;base64,/9j/4AAQSkZJRg==", "javascript:alert(1)//" + file)[j % 4]
    if route == "invalid_url":
        return (f"http:///{file}", f"http://[::1/{file}")[j % 2]
    if route == "private_address":
        return (f"http://10.255.255.1:9/{file}", f"http://192.168.255.254:9/{file}",
                f"http://172.31.255.254:9/{file}", f"http://169.254.255.254:9/{file}")[j % 4]
    if route == "unresolvable_host":
        return f"http://img-{file.split('.')[0]}.invalid/{file}"
    if route in ("missing_caption", "caption_too_long"):
        return f"{b}/img/{file}"
    if route == "malformed_row":
        return None  # the line written is not JSON at all; see _write_frame
    raise ValueError(f"unknown route {route!r}; known: {sorted(ROUTES)}")


def _allocate(n: int, broken: dict[str, float], rng: np.random.Generator, n_protected: int) -> list[str]:
    """Route per row (unordered): counts from fractions, each named route at least once when that fits."""
    unknown = sorted(set(broken) - set(ROUTES))
    if unknown:
        raise ValueError(f"unknown route(s) in broken: {unknown}; known: {sorted(ROUTES)}")
    bad = {k: v for k, v in broken.items() if not (0 <= v <= 1)}
    if bad:
        raise ValueError(f"broken fractions must be in [0, 1]: {bad}")
    avail = n - n_protected
    names = [r for r in sorted(broken) if broken[r] > 0 and r != "ok"]
    counts = {r: math.floor(broken[r] * n) for r in names}
    if sum(max(1, c) for c in counts.values()) <= avail // 2:
        # Small sources still exercise every requested route, while half the rows stay good.
        counts = {r: max(1, c) for r, c in counts.items()}
    else:
        # Too small for one row per route: keep the requested share of broken rows, handing the
        # rounding leftovers to the largest remainders (seeded tie-break), capped at half the rows.
        target = min(avail // 2, round(sum(broken[r] for r in names) * n))
        rema = sorted(names, key=lambda r: (-(broken[r] * n - counts[r]), float(rng.random())))
        for r in rema[: max(0, target - sum(counts.values()))]:
            counts[r] += 1
    total = sum(counts.values())
    if total > avail:
        raise ValueError(f"broken routes ask for {total} rows but only {avail} of {n} can be broken")
    routes = [r for r in names for _ in range(counts[r])]
    return routes + ["ok"] * (avail - len(routes))


def _scores(rng: np.random.Generator, n: int) -> dict[str, np.ndarray]:
    sim = np.clip(rng.normal(0.32, 0.04, n), 0.0, 1.0)
    punsafe = np.clip(rng.beta(0.6, 12.0, n), 0, 1)
    unsafe = rng.random(n) < 0.06
    punsafe[unsafe] = rng.uniform(0.5, 1.0, int(unsafe.sum()))
    pwm = np.clip(rng.beta(1.2, 6.0, n), 0, 1)
    wm = rng.random(n) < 0.08
    pwm[wm] = rng.uniform(0.8, 1.0, int(wm.sum()))
    return {"similarity": sim, "punsafe": punsafe, "pwatermark": pwm, "l14": np.clip(sim + rng.normal(0, 0.02, n), 0, 1)}


def _profile_frame(profile: str, rows: list[dict[str, Any]], rng: np.random.Generator, seed: int) -> Any:
    import pandas as pd

    n = len(rows)
    sc = _scores(rng, n)
    url = [r["url"] for r in rows]
    text = [r["caption"] for r in rows]
    w = pd.array([r.get("width") for r in rows], dtype="Int64")
    h = pd.array([r.get("height") for r in rows], dtype="Int64")
    if profile == "laion400m":
        nsfw = np.where(sc["punsafe"] > 0.5, np.where(sc["punsafe"] > 0.8, "NSFW", "UNSURE"), "UNLIKELY")
        lic = np.where(rng.random(n) < 0.1, "https://creativecommons.org/licenses/by/2.0/", "?")
        return pd.DataFrame({
            "SAMPLE_ID": pd.array([r["sample_id"] for r in rows], dtype="Int64"), "URL": url, "TEXT": text,
            "HEIGHT": h, "WIDTH": w, "LICENSE": lic, "NSFW": nsfw, "similarity": sc["similarity"],
        })
    if profile == "laion2b-en":
        hashes = [int.from_bytes(hashlib.sha256(f"{seed}/{r['sample_id']}".encode()).digest()[:8], "little", signed=True)
                  for r in rows]
        return pd.DataFrame({
            "URL": url, "TEXT": text, "WIDTH": w, "HEIGHT": h, "similarity": sc["similarity"],
            "hash": pd.array(hashes, dtype="Int64"), "punsafe": sc["punsafe"], "pwatermark": sc["pwatermark"],
        })
    if profile == "datacomp":
        faces = []
        for _ in range(n):
            k = int(rng.choice([0, 0, 0, 1, 2]))
            faces.append([[round(float(v), 4) for v in sorted(rng.random(4))] for _ in range(k)])
        return pd.DataFrame({
            "uid": [hashlib.md5(f"{seed}/{r['sample_id']}".encode()).hexdigest() for r in rows],
            "url": url, "text": text, "original_width": w, "original_height": h,
            "clip_b32_similarity_score": sc["similarity"], "clip_l14_similarity_score": sc["l14"],
            "face_bboxes": faces, "sha256": [r.get("sha256") for r in rows],
        })
    if profile == "generic":
        return pd.DataFrame({"url": url, "caption": text})
    raise ValueError(f"unknown profile {profile!r}; known: {sorted(PROFILES)}")


def _write_frame(df: Any, path: str, fmt: str, malformed: Sequence[bool] | None = None) -> None:
    """Write one metadata file atomically in `fmt`; jsonl rows flagged `malformed` become MALFORMED_LINE."""
    import io

    from laiontools.core.storage import PARQUET_WRITE, atomic_write_bytes

    if fmt == "parquet":
        import pyarrow as pa
        import pyarrow.parquet as pq

        buf = io.BytesIO()
        pq.write_table(pa.Table.from_pandas(df, preserve_index=False), buf, **PARQUET_WRITE)
        atomic_write_bytes(path, buf.getvalue())
        return
    out = df.copy()
    if "face_bboxes" in out.columns and not fmt.startswith("jsonl"):
        out["face_bboxes"] = [json.dumps(v) for v in out["face_bboxes"]]  # text formats hold it as JSON
    if fmt.startswith("jsonl"):
        text = out.to_json(orient="records", lines=True, force_ascii=False)
        if malformed is not None and any(malformed):
            lines = text.splitlines()
            text = "\n".join(MALFORMED_LINE if bad else line for line, bad in zip(lines, malformed)) + "\n"
    else:
        text = out.to_csv(index=False, sep="\t" if fmt == "tsv" else ",")
    data = text.encode("utf-8")
    if fmt.endswith(".gz"):
        import gzip

        data = gzip.compress(data, mtime=0)  # mtime=0: same rows, same bytes
    atomic_write_bytes(path, data)


def expected_path(out_path: str) -> str:
    """Where write_source puts the expected table: beside the source, never inside its folder."""
    return out_path.rstrip("/") + EXPECTED_SUFFIX


def write_source(out_path: str, base_url: str, items: Sequence[dict[str, Any]], *, profile: str = "laion400m",
                 fmt: str = "parquet", n_files: int = 1, broken: dict[str, float] | None = None,
                 seed: int = 0, allow_private_network: bool = False, base_allowed: bool = True) -> Any:
    """Write LAION-format metadata for `items`, one row per item, some sent down broken routes.

    out_path: a file (its name ends in ``.<fmt>``; n_files must be 1) or a folder that receives
    ``part-<k:05d>.<fmt>`` files (rows split in order). profile: one of PROFILES (its columns, in
    order). broken: route -> fraction of rows (default DEFAULT_BROKEN, ~25%); every route with a
    positive fraction gets at least one row as long as that leaves half the rows good. Items that
    carry ``eval_item`` (planted copies) always go down "ok". Row order is shuffled (seeded).
    "malformed_row" exists only in jsonl formats (the default mix drops it for the others).

    allow_private_network / base_allowed: the policy the rows will meet, which decides the expected
    status (see expected_status). The defaults are what tests and the demo use: the server's
    loopback network allow-listed (``--allow-networks 127.0.0.0/8``), every other private target
    refused, so every rejection reason occurs.

    Returns the rows written (profile columns) plus EXPECTED_COLUMNS — row (0-based position over
    all files, in file order), route, expected status, expected_after_retry (after one retry pass),
    transient, expected_uid (laiontools.contracts.uids.uid_of(url, caption)), item_id, file, eval_item,
    transform — and writes the same table to ``<out_path>.expected.parquet``. Deterministic for
    the arguments.
    """
    import pandas as pd

    if profile not in PROFILES:
        raise ValueError(f"unknown profile {profile!r}; known: {sorted(PROFILES)}")
    if fmt not in FORMATS:
        raise ValueError(f"unknown format {fmt!r}; known: {FORMATS}")
    if n_files < 1:
        raise ValueError(f"n_files must be >= 1, got {n_files}")
    single = out_path.endswith("." + fmt)
    if single and n_files != 1:
        raise ValueError(f"{out_path} names one file; give a folder to split into n_files={n_files} files")
    text_only = sorted(r for r in _TEXT_ONLY_ROUTES if (broken or {}).get(r, 0) > 0)
    if text_only and not fmt.startswith("jsonl"):
        raise ValueError(f"route(s) {text_only} can only be written in jsonl formats, not {fmt}")
    if broken is None:
        broken = {r: f for r, f in DEFAULT_BROKEN.items() if fmt.startswith("jsonl") or r not in _TEXT_ONLY_ROUTES}
    rng = np.random.default_rng([int(seed) & 0xFFFFFFFF, 31337])
    items = list(items)
    n = len(items)
    protected = [k for k, it in enumerate(items) if it.get("eval_item") is not None]
    free = [k for k in range(n) if items[k].get("eval_item") is None]
    routes_free = _allocate(n, broken, rng, len(protected))
    order = rng.permutation(len(free))
    route_of = {k: "ok" for k in protected}
    for pos, k in zip(order, free):
        route_of[k] = routes_free[pos]

    rows: list[dict[str, Any]] = []
    counters: dict[str, int] = {}
    for k, it in enumerate(items):
        route = route_of[k]
        j = counters.get(route, 0)
        counters[route] = j + 1
        caption = it["caption"]
        if route == "malformed_row":
            caption = None
        elif route == "missing_caption":
            caption = (None, "")[j % 2]
        elif route == "caption_too_long":
            caption = (caption + " ") * (CAPTION_TOO_LONG_CHARS // (len(caption) + 1) + 1)
            caption = caption[:CAPTION_TOO_LONG_CHARS]
        has_file = route not in ("null_url", "empty_url", "bad_scheme", "invalid_url", "private_address",
                                 "unresolvable_host", "malformed_row")
        row = {
            "sample_id": int(it["id"]), "url": None if route == "duplicate" else _route_url(route, base_url, it["file"], j),
            "caption": caption, "width": it.get("width") if has_file else None,
            "height": it.get("height") if has_file else None, "sha256": it.get("sha256") if has_file else None,
            "route": route, "item_id": int(it["id"]), "file": it["file"],
            "eval_item": it.get("eval_item"), "transform": it.get("transform"),
        }
        rows.append(row)
    # Shuffle so broken rows are spread over files and partitions. Each duplicate then copies URL +
    # caption of a good row placed *before* it, so "the earlier uid wins" is well defined.
    perm = rng.permutation(n)
    rows = [rows[p] for p in perm]
    ok_pos = [i for i, r in enumerate(rows) if r["route"] == "ok" and r["eval_item"] is None]
    if any(r["route"] == "duplicate" for r in rows):
        if not ok_pos:
            raise ValueError("the 'duplicate' route needs at least one 'ok' row to copy; lower broken['duplicate']")
        rows.insert(0, rows.pop(ok_pos[0]))  # a good row first, so every duplicate has one before it
        ok_pos = [i for i, r in enumerate(rows) if r["route"] == "ok" and r["eval_item"] is None]
        for i, r in enumerate(rows):
            if r["route"] == "duplicate":
                before = [p for p in ok_pos if p < i]
                src = rows[before[int(rng.integers(len(before)))]]
                r.update(url=src["url"], caption=src["caption"], width=src["width"], height=src["height"],
                         sha256=src["sha256"], file=src["file"])

    df = _profile_frame(profile, rows, rng, seed)
    df["row"] = np.arange(n, dtype=np.int64)
    df["route"] = [r["route"] for r in rows]
    policy = {"base_private": is_private_host(base_url), "allow_private_network": allow_private_network,
              "base_allowed": base_allowed}
    df["expected"] = [expected_status(r["route"], **policy) for r in rows]
    df["expected_after_retry"] = [expected_status(r["route"], retried=True, **policy) for r in rows]
    df["transient"] = [r["route"] in TRANSIENT_ROUTES for r in rows]
    df["expected_uid"] = [uid_of(r["url"], r["caption"]) for r in rows]
    df["item_id"] = pd.array([r["item_id"] for r in rows], dtype="Int64")
    df["file"] = [r["file"] for r in rows]
    df["eval_item"] = pd.array([r["eval_item"] for r in rows], dtype="string")
    df["transform"] = pd.array([r["transform"] for r in rows], dtype="string")

    meta = df[list(PROFILES[profile])]
    malformed = [r["route"] == "malformed_row" for r in rows]
    if single:
        os.makedirs(os.path.dirname(os.path.abspath(out_path)), exist_ok=True)
        _write_frame(meta, out_path, fmt, malformed)
    else:
        os.makedirs(out_path, exist_ok=True)
        bounds = np.linspace(0, n, n_files + 1).astype(int)
        for f in range(n_files):
            part = meta.iloc[bounds[f]:bounds[f + 1]]
            _write_frame(part, os.path.join(out_path, f"part-{f:05d}.{fmt}"), fmt,
                         malformed[bounds[f]:bounds[f + 1]])
    _write_frame(df, expected_path(out_path), "parquet")
    return df

