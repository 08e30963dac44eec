"""Removal lists (takedown requests, hash lists): the file format and what it matches (issue 14, part 2).

A removal list is a UTF-8 text file, one entry per line; blank lines and ``#`` comments are ignored::

    url https://example.com/a b.jpg        # a URL (the rest of the line: it may hold spaces), compared
                                           # after normalize_url (scheme/host case, ports)
    domain example.org                     # every URL on that host or any subdomain of it (by label);
                                           # an address (domain 10.0.0.2) matches that address only
    uid 0123456789abcdef0123456789abcdef   # a laiontools uid (32 hex)
    sha256 <64 hex>                        # content hash of the stored image bytes
    md5 <32 hex>                           # content hash of the stored image bytes
    phash <16 hex> [max_distance]          # perceptual hash (imagehash.phash), Hamming distance <= max (default 0)

Hosts (of domain entries, url entries and the catalog URLs matched) are compared in one spelling,
:func:`laiontools.web.policy.canonical_host` (IDNA, lower case, no trailing dot, numeric IPv4 as a dotted
quad): ``domain bücher.de`` and ``domain xn--bcher-kva.de`` are the same entry.

The kind comes first so a 32-hex md5 and a 32-hex uid are never confused. A malformed line raises
:class:`RemovalListError` naming the file and line number, and nothing is matched against a list that
failed to parse. :meth:`RemovalList.match` says which entry (kind + line) a sample hits, so every removal
can be traced to the line that asked for it; :meth:`RemovalList.match_all` says every entry it hits, so
that a run can name the lines that matched nothing (:attr:`RemovalList.lines`: every entry's line, a
repeated value pointing at its first line); :attr:`RemovalList.sha256` identifies the list in audit logs.
"""

from __future__ import annotations

import dataclasses
import functools
import re
from collections.abc import Iterator
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import numpy as np

from laiontools.contracts.uids import normalize_url, sort_uids, uids_to_array
from laiontools.core.errors import UserError
from laiontools.core.storage import is_local, sha256_bytes, url_to_fs
from laiontools.web.blocklist import request_target
from laiontools.web.policy import canonical_host, host_ip

KINDS = ("url", "domain", "uid", "sha256", "md5", "phash")
_HEX = {"uid": 32, "sha256": 64, "md5": 32, "phash": 16}
_HOST = re.compile(r"^(?=.{1,253}$)([a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?)(\.[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?)*$")
MAX_PHASH_DISTANCE = 32


def _canonical_url(url: str | None, as_requested: bool = True) -> tuple[str | None, str]:
    """(`url` normalized with its host in canonical_host spelling, that host) -- the one spelling both a
    list entry and a catalog URL are compared in (``ＥＸＡＭＰＬＥ.com`` and ``bücher.de`` meet
    ``example.com`` and ``xn--bcher-kva.de``). As the download's blocklist compares them
    (web.blocklist.canonical_url), an http(s) URL drops its userinfo (no request carries it) and its path
    and query are the request target a server reads (``/img/%61.jpg`` and ``/x/../img/a.jpg`` are
    ``/img/a.jpg``). A URL urlsplit cannot parse (``http://[::1/x``, which prepare keeps as
    rejected_invalid_url) keeps its normalized text and has no host: it matches no domain.
    `as_requested` False: the path and query as written (how an entry is shown in reports and messages)."""
    n = normalize_url(url)
    try:
        parts = urlsplit(n or "")
        host = parts.hostname or ""
    except ValueError:
        return n, ""
    if not host:
        return n, ""
    host = _canonical_host(host)
    try:
        port = parts.port
    except ValueError:  # a bad port: the host is still plain, the URL keeps its text
        return n, host
    netloc = (f"[{host}]" if ":" in host else host) + (f":{port}" if port is not None else "")
    path, query = (request_target(parts.path, parts.query) if as_requested and parts.scheme in ("http", "https")
                   else (parts.path, parts.query))
    return urlunsplit((parts.scheme, netloc, path, query, "")), host


# A catalog names each host many times (a LAION host: thousands of images): its canonical spelling (IDNA,
# address parsing: ~40 us) and the domains above it are worked out once per host, per process.
_canonical_host = functools.lru_cache(maxsize=1 << 16)(canonical_host)


@functools.lru_cache(maxsize=1 << 16)
def _domains_of(host: str) -> tuple[str, ...]:
    """The domain entries a canonical host falls under: a name and each domain above it, label by label
    (``img.example.com``, ``example.com``, ``com``); an address itself only (and the IPv4 an IPv4-mapped
    IPv6 reaches), never by suffix: ``domain 2`` is the address 0.0.0.2, not every host ending in ``.2``."""
    try:
        ip = host_ip(host)
    except ValueError:  # a numeric spelling of no address (img.10.0.0.2, 1.2.3.4.5): no name either
        return (host,)
    if ip is not None:
        mapped = getattr(ip, "ipv4_mapped", None)
        return (host, str(mapped)) if mapped else (host,)
    labels = host.split(".")
    return tuple(".".join(labels[i:]) for i in range(len(labels)))


class RemovalListError(UserError, ValueError):
    """A removal list line that cannot be read; the message names the file and the line."""


@dataclasses.dataclass
class Match:
    """Why a sample is on the list: the entry's kind, value and line number."""

    kind: str
    value: str
    line: int

    def __str__(self) -> str:
        return f"{self.kind} {self.value} (line {self.line})"


@dataclasses.dataclass
class RemovalList:
    path: str
    sha256: str  # of the file's bytes
    urls: dict[str, int]  # normalized URL (as requested: _canonical_url) -> line
    domains: dict[str, int]  # canonical_host -> line
    uids: dict[str, int]  # 32 hex -> line
    sha256s: dict[str, int]
    md5s: dict[str, int]
    phashes: list[tuple[int, int, int]]  # (hash as int, max distance, line)
    entries: int
    # every entry line -> (its entry as "kind value", the line whose entry it is: itself, or the first line
    # that gave the same value; a match of that line is a match of this one)
    lines: dict[int, tuple[str, int]] = dataclasses.field(default_factory=dict)
    # a URL entry's key -> the entry as reports and catalog messages show it (its path as written)
    url_shown: dict[str, str] = dataclasses.field(default_factory=dict)

    @property
    def needs_content(self) -> bool:
        """True when matching needs the image bytes (content hashes or perceptual hashes)."""
        return bool(self.sha256s or self.md5s or self.phashes)

    def uid_array(self) -> np.ndarray:
        """The listed uids as a sorted UID_DTYPE array (for searchsorted against uid files)."""
        return sort_uids(uids_to_array(self.uids))  # (the keys: 32 hex chars each, checked as the list was read)

    def match(self, *, url: str | None = None, uid: str | None = None, sha256: str | None = None,
              md5: str | None = None, phash: str | None = None) -> Match | None:
        """The first entry the sample hits (uid, url, domain, sha256, md5, phash order), or None."""
        return next(self._hits(url, uid, sha256, md5, phash), None)

    def match_all(self, *, url: str | None = None, uid: str | None = None, sha256: str | None = None,
                  md5: str | None = None, phash: str | None = None) -> list[Match]:
        """Every entry the sample hits, in :meth:`match`'s order."""
        return list(self._hits(url, uid, sha256, md5, phash))

    def _hits(self, url: str | None, uid: str | None, sha256: str | None, md5: str | None, phash: str | None) -> Iterator[Match]:
        if uid and uid.lower() in self.uids:
            yield Match("uid", uid.lower(), self.uids[uid.lower()])
        if url:
            n, host = _canonical_url(url)
            if n in self.urls:
                yield Match("url", self.url_shown.get(n, n), self.urls[n])
            if self.domains and host:
                for d in _domains_of(host):
                    if d in self.domains:
                        yield Match("domain", d, self.domains[d])
        if sha256 and sha256.lower() in self.sha256s:
            yield Match("sha256", sha256.lower(), self.sha256s[sha256.lower()])
        if md5 and md5.lower() in self.md5s:
            yield Match("md5", md5.lower(), self.md5s[md5.lower()])
        if phash and self.phashes:
            h = int(phash, 16)
            for v, d, line in self.phashes:
                if (h ^ v).bit_count() <= d:
                    yield Match("phash", f"{v:016x}", line)


def parse_removal_list(text: str, path: str = "<list>") -> RemovalList:
    """Parse removal-list text (see the module docstring); raises RemovalListError naming `path`:line."""
    urls: dict[str, int] = {}
    domains: dict[str, int] = {}
    hexes: dict[str, dict[str, int]] = {"uid": {}, "sha256": {}, "md5": {}}
    phashes: list[tuple[int, int, int]] = []
    lines: dict[int, tuple[str, int]] = {}
    url_shown: dict[str, str] = {}
    n = 0
    # a byte-order mark (lists saved by Windows tools) is no part of the first line's kind
    for lineno, raw in enumerate(text.removeprefix("\ufeff").splitlines(), start=1):
        line = raw.split("#", 1)[0].strip() if not raw.lstrip().startswith(("url ", "url\t")) else raw.strip()
        if not line or line.startswith("#"):
            continue
        kind, rest = (line.split(None, 1) + [""])[:2]  # a tab separates kind and value as a space does
        kind, rest = kind.lower(), rest.strip()
        where = f"{path}:{lineno}"
        if kind not in KINDS:
            raise RemovalListError(f"{where}: unknown kind {kind!r} in {raw.strip()!r}; a line is '<kind> <value>' with kind one of {', '.join(KINDS)}")
        if not rest:
            raise RemovalListError(f"{where}: {kind} without a value")
        if kind == "url":
            # the rest of the line, inner spaces kept (LAION URLs hold literal spaces, and the entry must
            # meet the catalog's URL as written); a " #" starts a comment: a '#' in a URL begins its
            # fragment, which the comparison drops anyway
            value = re.split(r"\s#", rest, maxsplit=1)[0].strip()
            u, host = _canonical_url(value)
            if not host or urlsplit(u or "").scheme not in ("http", "https"):
                raise RemovalListError(f"{where}: {value!r} is not an http(s) URL")
            shown = url_shown.setdefault(u, _canonical_url(value, as_requested=False)[0] or value)
            lines[lineno] = (f"url {shown}", urls.setdefault(u, lineno))
        elif kind == "domain":
            if len(rest.split()) > 1:  # as the hash kinds: one value a line, never the first of several kept alone
                raise RemovalListError(f"{where}: domain takes one value, got {rest!r}; give each host on its own line")
            host = canonical_host(rest)
            if not _HOST.match(host):
                raise RemovalListError(f"{where}: {rest!r} is not a host name (give e.g. 'domain example.com', no scheme or path)")
            lines[lineno] = (f"domain {host}", domains.setdefault(host, lineno))
        else:
            fields = rest.split()
            value = fields[0].lower()
            if len(value) != _HEX[kind] or not all(c in "0123456789abcdef" for c in value):
                raise RemovalListError(f"{where}: {kind} must be {_HEX[kind]} hex characters, got {fields[0]!r}")
            if kind == "phash":
                d = 0
                if len(fields) > 1:
                    try:
                        d = int(fields[1])
                    except ValueError:
                        d = -1
                    if not 0 <= d <= MAX_PHASH_DISTANCE:
                        raise RemovalListError(f"{where}: phash max distance must be a whole number in [0, {MAX_PHASH_DISTANCE}], got {fields[1]!r}")
                if len(fields) > 2:
                    raise RemovalListError(f"{where}: phash takes '<16 hex> [max_distance]', got {rest!r}")
                phashes.append((int(value, 16), d, lineno))
                lines[lineno] = (f"phash {value} {d}", lineno)
            else:
                if len(fields) > 1:
                    raise RemovalListError(f"{where}: {kind} takes one value, got {rest!r}")
                lines[lineno] = (f"{kind} {value}", hexes[kind].setdefault(value, lineno))
        n += 1
    if not n:  # comments only, or an empty file: most likely the wrong file; a takedown would change nothing
        raise RemovalListError(f"{path}: no entry (only blank lines and comments); give the list that names what to remove")
    return RemovalList(path=path, sha256=sha256_bytes(text.encode()), urls=urls, domains=domains, uids=hexes["uid"],
                       sha256s=hexes["sha256"], md5s=hexes["md5"], phashes=phashes, entries=n, lines=lines,
                       url_shown=url_shown)


def read_removal_list(path: str) -> RemovalList:
    """Read and parse a removal-list file; raises RemovalListError (missing file, not UTF-8, bad line)."""
    fs, p = url_to_fs(path)
    if not fs.exists(p):
        raise RemovalListError(f"removal list {path} does not exist")
    if fs.isdir(p):
        raise RemovalListError(f"removal list {path} is a folder; give the list's file")
    if is_local(fs):
        # read as a stream, not through fsspec's local file (which seeks): a pipe or a shell's process
        # substitution (`--list <(grep ... list.txt)`) is a list too (walk F21: "File or stream is not seekable")
        with open(p, "rb") as f:
            data = f.read()
    else:
        with fs.open(p, "rb") as f:
            data = f.read()
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as e:
        line = data[: e.start].count(b"\n") + 1
        raise RemovalListError(f"{path}:{line}: not UTF-8 text ({e.reason})") from e
    rl = parse_removal_list(text, path)
    rl.sha256 = sha256_bytes(data)
    return rl


def content_hashes(data: bytes, want_phash: bool) -> dict[str, Any]:
    """sha256 / md5 of stored image bytes, and its pHash when `want_phash` (None if undecodable)."""
    import hashlib

    from laiontools.core.images import OversizeMember

    if isinstance(data, OversizeMember):  # over the byte limit: hashed as it streamed by, never decoded
        return {"sha256": data.sha256, "md5": data.md5, "phash": None}
    out: dict[str, Any] = {"sha256": hashlib.sha256(data).hexdigest(), "md5": hashlib.md5(data, usedforsecurity=False).hexdigest(),
                           "phash": None}
    if want_phash:
        import imagehash

        from laiontools.core.images import open_image, to_rgb

        try:  # over the pixel limit (from the header): no pHash, as for an undecodable image
            with open_image(data) as im:
                out["phash"] = str(imagehash.phash(to_rgb(im)))
        except Exception:  # noqa: BLE001 - an undecodable image has no pHash; the hashes above still apply
            out["phash"] = None
    return out
