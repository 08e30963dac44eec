"""The HTTP fetch img2dataset runs for us, with the safety limits a crawl of strangers' URLs needs.

img2dataset has no hook for a byte limit, a connect-time address check, deadlines or backoff, so
:class:`PolicyDownloader` (a subclass of img2dataset's Downloader, pickled to executors like it)
installs :func:`fetch_with_retry` as img2dataset's fetch function inside each executor before a
shard runs. Everything else — threads, resizing, tar writing, per-shard stats — is img2dataset's.

What it adds:

- **connect to what was checked.** Each hop (the URL and every redirect) is resolved once, through
  an executor-wide DNS cache (:class:`DnsCache`), every address is checked with
  :func:`laiontools.web.policy.is_blocked_ip`, and the TCP connection goes to exactly a checked
  address (``http.client`` with its connect pinned to that address; for https the certificate is
  verified against the host name, which is also sent as SNI). There is no second resolution for a
  rebinding name to answer differently.
- **deadlines.** The per-operation ``timeout`` bounds each connect/recv; ``request_deadline``
  bounds a whole request (every hop, headers and body) and a shard deadline bounds a shard: a
  process-wide watchdog thread shuts the socket of a request past its deadline, so a server that
  drips one byte a second cannot hold a thread. Rows still unfetched when the shard deadline passes
  return at once with ``deadline: ...`` (status failed_download, retried by ``--retry-failed``).
- a byte limit (Content-Length and actual bytes) and a pixel limit read from the image header
  before anything decodes it. The limit fails closed: bytes whose size PIL cannot read from the
  header are refused, never handed to a decoder without a limit. PIL's global
  ``Image.MAX_IMAGE_PIXELS`` is left alone (Spark reuses Python workers across tasks).
- opt-out headers read before the body: ``X-Robots-Tag`` (img2dataset's rule) and the TDM
  Reservation Protocol's ``tdm-reservation: 1``.
- retries only for transient failures (timeout, connection reset, HTTP 429 and 5xx), with
  exponential backoff and a bounded Retry-After.
"""

from __future__ import annotations

import functools
import heapq
import http.client
import io
import ipaddress
import itertools
import os
import random
import re
import socket
import ssl
import threading
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from typing import Any
from urllib.parse import quote, urljoin, urlsplit

from img2dataset.downloader import Downloader, is_disallowed

from laiontools.web.policy import (
    NEVER_RESOLVE,
    PRIVATE_NAMES,
    PRIVATE_SUFFIXES,
    host_ip,
    is_blocked_ip,
    resolve_all,
)

USER_AGENT = "Mozilla/5.0 (X11; Linux x86_64; rv:72.0) Gecko/20100101 Firefox/72.0"
REDIRECT_CODES = (301, 302, 303, 307, 308)

# Error messages that mark a failure as transient (worth a retry pass). Matched against the
# error_message img2dataset records, so they must match what fetch_one returns.
TRANSIENT_PATTERNS = (
    r"timed out", r"timeout", r"Connection reset", r"Connection aborted", r"Remote end closed",
    r"HTTP Error 429", r"HTTP Error 5\d\d", r"Temporary failure", r"IncompleteRead", r"^deadline:",
)
_TRANSIENT = re.compile("|".join(TRANSIENT_PATTERNS), re.IGNORECASE)
DEADLINE_PREFIX = "deadline:"
UNREADABLE_HEADER = "image size cannot be read from its header"


def is_transient(error_message: str | None) -> bool:
    return bool(error_message) and bool(_TRANSIENT.search(error_message or ""))


@dataclass(frozen=True)
class FetchPolicy:
    """What a fetch may reach and how long it may take. Picklable; built from a DownloadConfig."""

    allow_private_network: bool = False
    allow_networks: tuple[str, ...] = ()
    max_bytes: int = 20 * 1024 * 1024
    max_image_pixels: int = 89_478_485  # PIL's default decompression-bomb limit
    backoff_base: float = 0.5
    max_retry_after: float = 10.0
    request_deadline: float = 60.0  # seconds for a whole request: every hop, headers and body
    shard_deadline: float | None = None  # seconds for a whole shard's fetches (None: no limit)
    max_redirects: int = 5
    ca_file: str | None = None  # extra CA bundle for https (None: the system's)
    dns_ttl: float = 300.0  # seconds an answer stays in the executor's DNS cache
    respect_tdm: bool = True  # refuse responses with "tdm-reservation: 1"


class FetchError(Exception):
    """A refused or failed request: `message` is the row's error_message; `retry_after` from 429/503."""

    def __init__(self, message: str, retry_after: float | None = None) -> None:
        super().__init__(message)
        self.retry_after = retry_after


# ----------------------------------------------------------------------------- DNS cache


Resolver = Callable[[str, int], list[str]]


class DnsCache:
    """Executor-wide getaddrinfo cache with a TTL; failures are cached for a shorter time.

    One instance per Python worker (module level), shared by all download threads: a shard of
    10,000 rows from a few thousand hosts resolves each host once instead of once per row.
    """

    NEGATIVE_TTL = 60.0

    def __init__(self, resolve: Resolver | None = None, ttl: float = 300.0) -> None:
        self._resolve = resolve or (lambda host, port: resolve_all(host, port))
        self.ttl = ttl
        self._cache: dict[str, tuple[float, list[str] | OSError]] = {}
        self._lock = threading.Lock()
        self.lookups = 0
        self.failures = 0

    def __call__(self, host: str, port: int) -> list[str]:
        now = time.monotonic()
        with self._lock:
            hit = self._cache.get(host)
        if hit is None or hit[0] < now:
            try:
                res: list[str] | OSError = list(dict.fromkeys(self._resolve(host, port)))
                expiry = now + self.ttl
            except OSError as e:
                res, expiry = e, now + min(self.ttl, self.NEGATIVE_TTL)
            with self._lock:
                self.lookups += 1
                self.failures += isinstance(res, OSError)
                self._cache[host] = (expiry, res)
        else:
            res = hit[1]
        if isinstance(res, OSError):
            raise res
        return res


DNS = DnsCache()


# ----------------------------------------------------------------------------- deadlines


class _Watchdog:
    """One daemon thread per process that shuts down sockets whose request deadline has passed.

    A socket timeout bounds one recv, not a response: a server sending a byte every few seconds
    never trips it. Shutting the socket down wakes the blocked reader (it sees EOF), and the
    fetch reports the deadline.
    """

    def __init__(self) -> None:
        self._cv = threading.Condition()
        self._heap: list[tuple[float, int]] = []
        self._socks: dict[int, socket.socket] = {}
        self._ids = itertools.count()
        self._thread: threading.Thread | None = None
        self._pid = 0

    def watch(self, sock: socket.socket, deadline: float) -> int:
        with self._cv:
            if self._thread is None or not self._thread.is_alive() or self._pid != os.getpid():
                # (re)start after a fork: Spark forks Python workers from a daemon process
                self._heap, self._socks, self._pid = [], {}, os.getpid()
                self._thread = threading.Thread(target=self._run, name="laiontools-fetch-watchdog", daemon=True)
                self._thread.start()
            token = next(self._ids)
            self._socks[token] = sock
            heapq.heappush(self._heap, (deadline, token))
            self._cv.notify()
            return token

    def unwatch(self, token: int) -> None:
        with self._cv:
            self._socks.pop(token, None)

    def _run(self) -> None:
        while True:
            with self._cv:
                while not self._heap:
                    self._cv.wait()
                deadline, token = self._heap[0]
                wait = deadline - time.monotonic()
                if wait > 0:
                    self._cv.wait(wait)
                    continue
                heapq.heappop(self._heap)
                sock = self._socks.pop(token, None)
            if sock is not None:
                try:
                    sock.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass  # already closed by its owner


_WATCHDOG = _Watchdog()


# ----------------------------------------------------------------------------- one safe GET


@dataclass
class Response:
    status: int
    headers: http.client.HTTPMessage
    body: bytes
    url: str  # after redirects


@functools.lru_cache(maxsize=8)
def _ssl_context(ca_file: str | None) -> ssl.SSLContext:
    ctx = ssl.create_default_context()  # CERT_REQUIRED + check_hostname: verified against the URL's host
    if ca_file:
        ctx.load_verify_locations(ca_file)
    return ctx


def _check_host(host: str, policy: FetchPolicy) -> None:
    """Refuse a literal non-global address or a local name before any DNS query."""
    if policy.allow_private_network:
        return
    try:
        ip = host_ip(host)
    except ValueError as e:
        raise FetchError(f"blocked: malformed numeric host {host} ({e})") from e
    if ip is not None:
        if is_blocked_ip(ip, policy.allow_networks):
            raise FetchError(f"blocked: host {host} is a non-global address ({ip})")
        return
    name = host.rstrip(".")
    if name in PRIVATE_NAMES or name.endswith(PRIVATE_SUFFIXES):
        raise FetchError(f"blocked: host {host} names a local or internal machine")
    if name.endswith(NEVER_RESOLVE):
        raise FetchError(f"DNS: host {host} does not resolve (special-use name, RFC 6761)")


def _checked_addresses(host: str, port: int, policy: FetchPolicy, resolver: Resolver) -> list[str]:
    """The addresses to connect to for `host`: resolved once, every one checked. Raises FetchError."""
    _check_host(host, policy)
    try:
        ip = host_ip(host)
    except ValueError:
        ip = None
    if ip is not None:
        return [str(ip)]
    try:
        addrs = resolver(host, port)
    except OSError as e:
        raise FetchError(f"DNS: host {host} does not resolve ({e})") from e
    if not addrs:
        raise FetchError(f"DNS: host {host} resolves to no address")
    if not policy.allow_private_network:
        for a in addrs:
            if is_blocked_ip(ipaddress.ip_address(a), policy.allow_networks):
                # one bad answer is enough to refuse the name: a resolver that mixes answers is hostile
                raise FetchError(f"blocked: host {host} resolves to non-global address {a}")
    return addrs


def _request_target(parts: Any) -> str:
    # Quote what a browser would (spaces, non-ASCII); keep existing escapes and reserved characters.
    path = quote(parts.path or "/", safe="/%:@!$&'()*+,;=-._~")
    query = quote(parts.query, safe="/%:@!$&'()*+,;=-._~?") if parts.query else ""
    return path + ("?" + query if query else "")


def safe_get(url: str, *, user_agent: str, policy: FetchPolicy, timeout: float, deadline: float,
             max_bytes: int, resolver: Resolver | None = None,
             check_headers: Callable[[http.client.HTTPResponse], str | None] | None = None) -> Response:
    """GET `url` following redirects, connecting only to checked addresses, before `deadline`.

    `deadline` is a time.monotonic() value covering every hop, headers and body. Returns the final
    response (any status; 4xx/5xx bodies are not read). Raises FetchError with the row's message:
    ``blocked: ...`` (scheme/address policy), ``DNS: ...``, ``deadline: ...``, ``timed out ...``,
    a size-limit message, or whatever `check_headers` returns (checked before the body is read).
    """
    resolver = resolver or DNS
    for _hop in range(policy.max_redirects + 1):
        try:
            parts = urlsplit(url)
            port = parts.port or (443 if parts.scheme == "https" else 80)
        except ValueError as e:
            raise FetchError(f"blocked: URL cannot be parsed ({e})") from e
        if parts.scheme not in ("http", "https"):
            raise FetchError(f"blocked: scheme {parts.scheme}: is not http or https ({url[:100]})")
        host = (parts.hostname or "").lower()
        if not host:
            raise FetchError(f"blocked: URL has no host ({url[:100]})")
        addrs = _checked_addresses(host, port, policy, resolver)
        resp = _one_hop(parts, host, port, addrs, user_agent=user_agent, policy=policy, timeout=timeout,
                        deadline=deadline, max_bytes=max_bytes, check_headers=check_headers)
        if isinstance(resp, str):  # a redirect: its Location, resolved against this URL
            url = urljoin(url, resp).split("#", 1)[0]
            continue
        resp.url = url
        return resp
    raise FetchError(f"too many redirects (more than {policy.max_redirects})")


def _one_hop(parts: Any, host: str, port: int, addrs: list[str], *, user_agent: str, policy: FetchPolicy,
             timeout: float, deadline: float, max_bytes: int,
             check_headers: Callable[[http.client.HTTPResponse], str | None] | None) -> Response | str:
    """One request to `host` through the first checked address that accepts a connection."""
    remaining = deadline - time.monotonic()
    if remaining <= 0:
        raise FetchError(f"{DEADLINE_PREFIX} request deadline passed before connecting to {host}")
    tokens: list[int] = []

    def pinned_connection(_address: Any, conn_timeout: float | None = None, source_address: Any = None) -> socket.socket:
        # http.client asks for (host, port); connect to the checked address instead. The host name
        # stays the connection's host, so the Host header, SNI and certificate check use it.
        last: OSError | None = None
        for a in addrs[:3]:
            left = deadline - time.monotonic()
            if left <= 0:
                break
            try:
                sock = socket.create_connection((a, port), min(conn_timeout or timeout, left), source_address)
            except OSError as e:
                last = e
                continue
            tokens.append(_WATCHDOG.watch(sock, deadline))
            return sock
        raise last or TimeoutError("request deadline passed while connecting")

    cls = http.client.HTTPSConnection if parts.scheme == "https" else http.client.HTTPConnection
    kwargs = {"context": _ssl_context(policy.ca_file)} if parts.scheme == "https" else {}
    conn = cls(host, port, timeout=min(timeout, remaining), **kwargs)
    conn._create_connection = pinned_connection  # type: ignore[attr-defined]  # http.client's own hook
    try:
        try:
            conn.request("GET", _request_target(parts), headers={
                "User-Agent": user_agent, "Accept": "image/*,*/*;q=0.8", "Connection": "close"})
            r = conn.getresponse()
            if r.status in REDIRECT_CODES and r.getheader("Location"):
                return r.getheader("Location")
            if r.status >= 400:
                ra = (r.getheader("Retry-After") or "").strip()
                raise FetchError(f"HTTP Error {r.status}: {r.reason}", float(ra) if ra.isdigit() else None)
            if check_headers is not None:
                refusal = check_headers(r)
                if refusal:
                    raise FetchError(refusal)
            length = r.getheader("Content-Length")
            if length and length.strip().isdigit() and int(length) > max_bytes:
                raise FetchError(f"response of {length.strip()} bytes is over the limit of {max_bytes} bytes")
            chunks, total = [], 0
            while True:
                chunk = r.read1(65536)
                if not chunk:
                    break
                total += len(chunk)
                if total > max_bytes:
                    raise FetchError(f"response is over the limit of {max_bytes} bytes")
                chunks.append(chunk)
            if time.monotonic() >= deadline:
                raise FetchError(f"{DEADLINE_PREFIX} request took longer than its deadline ({host}, {total} bytes read)")
            if length and length.strip().isdigit() and total < int(length):
                raise FetchError(f"IncompleteRead: {total} of {length.strip()} bytes")
            return Response(r.status, r.headers, b"".join(chunks), "")
        except FetchError:
            raise
        except ssl.SSLCertVerificationError as e:
            raise FetchError(f"TLS certificate of {host} rejected: {e.verify_message}") from e
        except (OSError, http.client.HTTPException) as e:
            if time.monotonic() >= deadline:
                raise FetchError(f"{DEADLINE_PREFIX} request took longer than its deadline ({host})") from e
            if isinstance(e, TimeoutError | socket.timeout):
                raise FetchError(f"timed out ({e})") from e
            raise FetchError(f"{type(e).__name__}: {e}") from e
    finally:
        for t in tokens:
            _WATCHDOG.unwatch(t)
        conn.close()


# ----------------------------------------------------------------------------- images


_BOMB_PIXELS = re.compile(r"\((\d+) pixels\)")


def image_pixels(data: bytes) -> int | None:
    """Pixel count from the image header without decoding pixels; None if PIL can't read the header.

    PIL's own decompression-bomb check (``Image.MAX_IMAGE_PIXELS``, left as it is) raises for very
    large headers; its message carries the pixel count, which is what we need.
    """
    from PIL import Image

    try:
        with Image.open(io.BytesIO(data)) as im:
            return im.size[0] * im.size[1]
    except Image.DecompressionBombError as e:
        m = _BOMB_PIXELS.search(str(e))
        return int(m.group(1)) if m else 2**63  # unknown but certainly huge: over any limit
    except Exception:  # noqa: BLE001 - not an image PIL can parse: the caller refuses it
        return None


def tdm_reserved(headers: Any) -> bool:
    """True if the TDM Reservation Protocol header reserves text-and-data-mining rights."""
    return any(v.strip() == "1" for v in headers.get_all("tdm-reservation", []) or [])


def user_agent_for(token: str | None) -> str:
    return USER_AGENT + (f" (compatible; {token}; +https://github.com/laion-ai/laiontools)" if token else "")


def fetch_one(url: str, timeout: float, user_agent_token: str | None, disallowed: Any, policy: FetchPolicy, *,
              resolver: Resolver | None = None, deadline: float | None = None) -> tuple[io.BytesIO | None, str | None, float | None]:
    """(bytes, error, retry_after) for one attempt at an image. Never raises.

    `deadline` (time.monotonic()) caps the request further than ``policy.request_deadline``
    (the shard deadline). `resolver` replaces the executor's DNS cache (tests).
    """
    req_deadline = time.monotonic() + policy.request_deadline
    if deadline is not None:
        req_deadline = min(req_deadline, deadline)

    def check_headers(r: http.client.HTTPResponse) -> str | None:
        if disallowed and is_disallowed(r.headers, user_agent_token, disallowed):
            return "Use of image disallowed by X-Robots-Tag directive"
        if policy.respect_tdm and tdm_reserved(r.headers):
            return "Use of image reserved by tdm-reservation header (TDM Reservation Protocol)"
        return None

    try:
        resp = safe_get(url, user_agent=user_agent_for(user_agent_token), policy=policy, timeout=timeout,
                        deadline=req_deadline, max_bytes=policy.max_bytes, resolver=resolver, check_headers=check_headers)
        pixels = image_pixels(resp.body)
        if pixels is None:
            return None, f"{UNREADABLE_HEADER} (not an image, or a format PIL cannot parse); refused rather than decoded without a pixel limit", None
        if pixels > policy.max_image_pixels:
            return None, f"image of {pixels} pixels is over the limit of {policy.max_image_pixels} pixels", None
        return io.BytesIO(resp.body), None, None
    except FetchError as e:
        return None, str(e), e.retry_after
    except Exception as e:  # noqa: BLE001 - a per-sample failure becomes a status row, never a crash
        return None, f"{type(e).__name__}: {e}", None


def fetch_with_retry(row: tuple[int, str], timeout: float, retries: int, user_agent_token: str | None,
                     disallowed_header_directives: Any, *, policy: FetchPolicy, shard_deadline_at: float | None = None,
                     resolver: Resolver | None = None) -> tuple[int, io.BytesIO | None, str | None]:
    """img2dataset's download_image_with_retry contract: (key, stream or None, error or None).

    `shard_deadline_at` (time.monotonic()): rows reached after it are not fetched and end with a
    ``deadline:`` error; requests in flight are cut at it.
    """
    key, url = row
    err = None
    for attempt in range(retries + 1):
        if shard_deadline_at is not None and time.monotonic() >= shard_deadline_at:
            return key, None, f"{DEADLINE_PREFIX} shard deadline of {policy.shard_deadline:g} s passed before this row was fetched"
        stream, err, retry_after = fetch_one(url, timeout, user_agent_token, disallowed_header_directives, policy,
                                             resolver=resolver, deadline=shard_deadline_at)
        if stream is not None:
            return key, stream, None
        if attempt == retries or not is_transient(err) or (err or "").startswith(DEADLINE_PREFIX):
            break  # a deadline hit is not retried in the shard: it would only spend the deadline again
        delay = policy.backoff_base * (2**attempt) * (0.5 + random.random())
        if retry_after is not None:
            delay = max(delay, min(retry_after, policy.max_retry_after))
        if shard_deadline_at is not None:
            delay = min(delay, max(0.0, shard_deadline_at - time.monotonic()))
        time.sleep(delay)
    return key, None, err


class PolicyDownloader(Downloader):
    """img2dataset's Downloader with :func:`fetch_with_retry` as its fetch function."""

    def __init__(self, *args: Any, policy: FetchPolicy, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.policy_dict = asdict(policy)

    def __call__(self, row):
        import img2dataset.downloader as d

        pol = FetchPolicy(**{**self.policy_dict, "allow_networks": tuple(self.policy_dict["allow_networks"])})
        DNS.ttl = pol.dns_ttl
        at = time.monotonic() + pol.shard_deadline if pol.shard_deadline else None
        # img2dataset calls the module-level name inside download_shard; a Spark Python worker runs
        # one task at a time, so setting it per shard is safe.
        d.download_image_with_retry = functools.partial(fetch_with_retry, policy=pol, shard_deadline_at=at)
        return super().__call__(row)
