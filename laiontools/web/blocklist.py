"""``--blocklist FILE``: URLs, domains and content hashes that must never enter a pool.

What Re-LAION-5B needed: lists of URLs and of image hashes (from child-safety and rights-holder
partners) removed from a dataset before anyone downloads it again. One text file, one entry per line
(``#`` starts a comment, blank lines are skipped); an entry's kind is read from its form:

- ``http://...`` / ``https://...``: a URL, compared after :func:`laiontools.contracts.uids.normalize_url`;
- 64 hex characters: the sha256 of the downloaded bytes; 32 hex characters: their md5;
  ``sha256:<hex>`` / ``md5:<hex>`` spell the kind out;
- anything else: a domain (``example.com`` blocks it and every subdomain; a leading ``*.`` or ``.``
  is accepted and means the same).

prepare refuses listed URLs and domains (``rejected_blocklisted``); the fetch refuses a redirect to
them and refuses bytes whose hash is listed before they are handed to img2dataset, so they are never
written to a shard. Executors read the file themselves (a path every executor can reach: local on
one machine, shared storage or an object store on a cluster), once per process.

Hosts are compared as the connection reaches them (:func:`laiontools.web.policy.canonical_host`), in
the entries and in the URLs: ``http://ｌｏｃａｌｈｏｓｔ/``, ``http://0x7f000001/`` and ``http://2130706433/``
are refused by the entries ``localhost`` and ``127.0.0.1``.
"""

from __future__ import annotations

import hashlib
import re
import threading
from dataclasses import dataclass, field
from urllib.parse import quote, urlsplit, urlunsplit

from laiontools.contracts.uids import normalize_url
from laiontools.core.errors import InputError, UserError
from laiontools.web.policy import canonical_host, host_ip

_HEX = re.compile(r"^[0-9a-f]+$")
_PCT = re.compile(r"%([0-9A-Fa-f]{2})")
_UNRESERVED = frozenset("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-._~")
_TARGET_SAFE = "/%:@!$&'()*+,;=-._~"  # what the fetch leaves unquoted in a request target (fetch._request_target)


@dataclass
class Blocklist:
    urls: set[str] = field(default_factory=set)
    domains: set[str] = field(default_factory=set)
    sha256: set[str] = field(default_factory=set)
    md5: set[str] = field(default_factory=set)
    file_sha256: str = ""  # sha256 of the file as read (prepare's fingerprint of the list)

    def __len__(self) -> int:
        return len(self.urls) + len(self.domains) + len(self.sha256) + len(self.md5)

    def url_reason(self, url: str | None) -> str | None:
        """Why `url` is blocklisted (its URL or a domain above its host), or None."""
        if not url or not (self.urls or self.domains):
            return None
        norm = canonical_url(url)
        if norm in self.urls:
            return "URL is on the blocklist"
        try:
            host = urlsplit(norm or "").hostname or ""
        except ValueError:
            return None
        ip = host_ip(host) if host else None  # canonical: an address parses, a name is no number
        if ip is not None:  # an address matches itself only (and the IPv4 it maps, which it reaches)
            mapped = getattr(ip, "ipv4_mapped", None)
            hits = [h for h in (host, mapped and str(mapped)) if h in self.domains]
            return f"domain {hits[0]} is on the blocklist" if hits else None
        labels = host.split(".")
        for i in range(len(labels)):
            d = ".".join(labels[i:])
            if d in self.domains:
                return f"domain {d} is on the blocklist"
        return None

    def content_reason(self, data: bytes) -> str | None:
        """Why these bytes are blocklisted (their sha256 or md5 is listed), or None."""
        if self.sha256:
            h = hashlib.sha256(data).hexdigest()
            if h in self.sha256:
                return f"content sha256 {h} is on the blocklist"
        if self.md5:
            h = hashlib.md5(data, usedforsecurity=False).hexdigest()
            if h in self.md5:
                return f"content md5 {h} is on the blocklist"
        return None


def _pct(m: re.Match[str]) -> str:
    c = chr(int(m.group(1), 16))
    return c if c in _UNRESERVED else "%" + m.group(1).upper()


def _remove_dot_segments(path: str) -> str:
    """RFC 3986 5.2.4 for an absolute path: what a server reads ``/a/./b/../c`` as (``/a/c``)."""
    segs = path.split("/")[1:]
    out: list[str] = []
    for s in segs:
        if s == "..":
            if out:
                out.pop()
        elif s != ".":
            out.append(s)
    res = "/" + "/".join(out)
    return res + "/" if segs and segs[-1] in (".", "..") and not res.endswith("/") else res


def request_target(path: str, query: str) -> tuple[str, str]:
    """(path, query) of a URL as a server reads the request the fetch sends for it: quoted as
    ``fetch._request_target`` quotes them, percent-encoded unreserved characters decoded, the other
    escapes upper-cased, dot segments removed (RFC 3986 6.2.2, 5.2.4). Two spellings that give the same
    pair name the same resource on the same host."""
    p = _remove_dot_segments(_PCT.sub(_pct, quote(path or "/", safe=_TARGET_SAFE)))
    return p, (_PCT.sub(_pct, quote(query, safe=_TARGET_SAFE + "?")) if query else "")


def canonical_url(url: str | None) -> str | None:
    """:func:`normalize_url`, with an http(s) URL as the connection reaches it: its host as
    :func:`canonical_host` spells it, no userinfo (a request never carries it), and its path and query as
    the request target the fetch sends, percent-encoded unreserved characters decoded and dot segments
    removed (RFC 3986 6.2.2, as a server reads them): the form URL entries and URLs are compared in."""
    norm = normalize_url(url)
    try:
        parts = urlsplit(norm or "")
        host, port = parts.hostname, parts.port
    except ValueError:
        return norm
    if not host or parts.scheme not in ("http", "https"):
        return norm
    h = canonical_host(host)
    netloc = (f"[{h}]" if ":" in h else h) + (f":{port}" if port else "")
    path, query = request_target(parts.path, parts.query)
    return urlunsplit(parts._replace(netloc=netloc, path=path, query=query))


def parse_blocklist(text: str, where: str = "blocklist") -> Blocklist:
    """Parse the file format above. Raises InputError naming the line for an entry of no known kind."""
    bl = Blocklist()
    for n, raw in enumerate(text.splitlines(), 1):
        line = raw.split("#", 1)[0].strip()
        if not line:
            continue
        low = line.lower()
        if low.startswith(("http://", "https://")):
            bl.urls.add(canonical_url(line))
            continue
        kind, _, value = low.partition(":")
        if value and kind in ("sha256", "md5"):
            low = value.strip()
        if _HEX.match(low) and len(low) in (32, 64):
            (bl.sha256 if len(low) == 64 else bl.md5).add(low)
            continue
        if value and kind in ("sha256", "md5"):
            raise InputError(f"{where}: line {n}: {line!r} is not a {kind} hex digest")
        dom = low.removeprefix("*.").strip(".")
        if not dom or "/" in dom or " " in dom:
            raise InputError(f"{where}: line {n}: {line!r} is neither a URL, a sha256/md5 hex digest nor a domain")
        bl.domains.add(canonical_host(dom))
    return bl


_CACHE: dict[str, Blocklist] = {}
_FAILED: dict[str, tuple[float, BaseException]] = {}  # path -> (time.monotonic() of the failure, the error)
_LOCK = threading.Lock()

# Seconds to connect to, and to wait for each read from, the server of an http(s) --blocklist (aiohttp's
# sock_connect / sock_read; the whole read is not capped: a big list over a slow link still arrives).
# Without them fsspec's http client waited up to 5 min per try. ``--blocklist-timeout`` sets it for a
# run; the environment variable, the default of a call that names none.
BLOCKLIST_TIMEOUT_ENV = "LAIONTOOLS_BLOCKLIST_TIMEOUT"
DEFAULT_BLOCKLIST_TIMEOUT = 30.0
# A read that failed is not tried again in this process for this long (seconds): the shards an executor
# runs next fail at once with the same message instead of each waiting for the same server again.
FAILED_READ_TTL = 60.0


def blocklist_timeout(timeout: float | None = None) -> float:
    """`timeout`, else ``$LAIONTOOLS_BLOCKLIST_TIMEOUT``, else :data:`DEFAULT_BLOCKLIST_TIMEOUT` (seconds)."""
    if timeout is not None:
        return float(timeout)
    import os

    env = os.environ.get(BLOCKLIST_TIMEOUT_ENV, "").strip()
    try:
        return float(env) if env and float(env) > 0 else DEFAULT_BLOCKLIST_TIMEOUT
    except ValueError:
        return DEFAULT_BLOCKLIST_TIMEOUT


def _storage_options(path: str, timeout: float) -> dict:
    """fsspec options bounding an http(s) read of the list in time (other stores keep their own bounds)."""
    scheme = path.split("://", 1)[0].lower() if "://" in path else ""
    if scheme not in ("http", "https"):
        return {}
    import aiohttp

    return {"client_kwargs": {"timeout": aiohttp.ClientTimeout(total=None, sock_connect=timeout, sock_read=timeout)}}


def load_blocklist(path: str | None, timeout: float | None = None) -> Blocklist | None:
    """The blocklist at `path` (any fsspec URL), read once per process; None when `path` is None.

    Raises InputError when the file is missing, cannot be read or has a line of no known kind. Its
    messages name `path` without the credentials a URL may carry (``https://user:token@host/list.txt``):
    an executor's download shard fails with the message, and Spark prints it.
    `timeout` (:func:`blocklist_timeout`) bounds the connect and each read of an http(s) list; a failed
    read is raised again, without a new try, for :data:`FAILED_READ_TTL` seconds.
    """
    if not path:
        return None
    import time

    with _LOCK:
        if path in _CACHE:
            return _CACHE[path]
        failed = _FAILED.get(path)
        if failed is not None and time.monotonic() - failed[0] < FAILED_READ_TTL:
            raise failed[1]
        try:
            bl = _read(path, blocklist_timeout(timeout))
        except Exception as e:
            _FAILED[path] = (time.monotonic(), e)
            raise
        _FAILED.pop(path, None)
        _CACHE[path] = bl
        return bl


def _read(path: str, timeout: float) -> Blocklist:
    from laiontools.core.redact import redact_text
    from laiontools.core.storage import url_to_fs

    shown = redact_text(path)
    try:
        fs, p = url_to_fs(path, **_storage_options(path, timeout))
        if not fs.exists(p):
            raise InputError(f"blocklist {shown} does not exist or cannot be read within {timeout:g} s (every "
                             "executor must be able to read it)")
        with fs.open(p, "rb") as f:
            raw = f.read()
    except UserError:  # (with its own message: a missing optional dependency, a redacted path read back)
        raise
    except Exception as e:  # the store's own message may quote the URL with its credentials
        if redact_text(str(e)) == str(e) and not isinstance(e, TimeoutError):
            raise  # (nothing to hide: the error as the store gave it, a local path's OSError)
        why = f"no answer within {timeout:g} s" if isinstance(e, TimeoutError) else redact_text(f"{type(e).__name__}: {e}")
        raise InputError(f"blocklist {shown} cannot be read ({why}); every executor must be able to read it") from None
    bl = parse_blocklist(raw.decode("utf-8", "replace"), where=shown)
    bl.file_sha256 = hashlib.sha256(raw).hexdigest()
    return bl
