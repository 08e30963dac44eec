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
- politeness per host and executor (:class:`HostGate`): concurrency and rate limits, robots.txt's
  Crawl-delay (the stricter of it and the rate limit), a 429/503 pause for every thread; and
  :class:`HostScheduler`, which hands a shard's rows to img2dataset's threads by host so that no
  thread sleeps on a busy host while another host's row could start.
"""

from __future__ import annotations

import contextlib
import functools
import heapq
import http.client
import io
import ipaddress
import itertools
import logging
import math
import os
import random
import re
import socket
import ssl
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass
from typing import Any
from urllib.parse import quote, urljoin, urlsplit

from img2dataset.downloader import Downloader
from img2dataset.logger import write_stats as _write_stats

from laiontools.core.errors import environment_error
from laiontools.core.images import MAX_IMAGE_PIXELS

# (imported with this module, before img2dataset's writer opens the output: storage bounds the store clients)
from laiontools.core.storage import url_to_fs
from laiontools.web.policy import (
    NEVER_RESOLVE,
    PRIVATE_NAMES,
    PRIVATE_SUFFIXES,
    host_ip,
    host_of,
    is_blocked_ip,
    resolve_all,
)

USER_AGENT = "Mozilla/5.0 (X11; Linux x86_64; rv:72.0) Gecko/20100101 Firefox/72.0"
REDIRECT_CODES = (301, 302, 303, 307, 308)

# Error messages that mark a failure as transient (worth a retry pass). Matched against the
# error_message img2dataset records, so they must match what fetch_one returns. An HTTP error
# ("HTTP Error <code>: <reason>") is judged by its status code alone (TRANSIENT_HTTP_CODES): its
# reason phrase is the server's free text and must not make a 404 "timed out".
TRANSIENT_PATTERNS = (
    r"timed out", r"timeout", r"Connection reset", r"Connection aborted", r"Remote end closed",
    r"Temporary failure", r"IncompleteRead", r"^deadline:", r"^host throttled:",
)
_TRANSIENT = re.compile("|".join(TRANSIENT_PATTERNS), re.IGNORECASE)
_HTTP_ERROR = re.compile(r"HTTP Error (\d{3})\b")
TRANSIENT_HTTP_CODES = frozenset({408, 429, *range(500, 600)})
MAX_REASON_CHARS = 200  # of a server's reason phrase kept in error_message
MAX_ERROR_CHARS = 500  # of any other failure's message
SERVER_SENT = ": the server sent "  # what follows in an error_message is the server's text (not read by is_transient)
_CONTROL = re.compile(r"[\x00-\x1f\x7f-\x9f]")
DEADLINE_PREFIX = "deadline:"
ROBOTS_DISALLOWS = "robots.txt disallows"
ROBOTS_UNAVAILABLE = "robots.txt unavailable"
ROBOTS_SKIPPED = "); the host is skipped for now"  # ends a ROBOTS_UNAVAILABLE message, after its cause
ROBOTS_CRAWL_DELAY = "robots.txt asks a Crawl-delay of"
HOST_THROTTLED = "host throttled:"
TOO_MANY_REDIRECTS = "too many redirects"
# Failures a retry inside the shard would only repeat (the cause is cached or the time is spent);
# they stay transient for a later --retry-failed pass.
_NO_RETRY_IN_SHARD = (DEADLINE_PREFIX, ROBOTS_UNAVAILABLE, HOST_THROTTLED)
UNREADABLE_HEADER = "image size cannot be read from its header"
# Refusals no retry changes; their messages quote the URL's path or host (is_transient must not read those)
_PERMANENT = (ROBOTS_DISALLOWS, ROBOTS_CRAWL_DELAY, "blocked:", "blocklisted:", "TLS certificate of ",
              "Use of image ", TOO_MANY_REDIRECTS, UNREADABLE_HEADER)
_DNS_CAUSE = " does not resolve ("


def is_transient(error_message: str | None) -> bool:
    """True for a failure worth another try: an HTTP 408, 429 or 5xx, or a transient network or
    deadline error (TRANSIENT_PATTERNS); every other HTTP error is permanent, whatever its reason says."""
    if not error_message:
        return False
    error_message = error_message.split(SERVER_SENT, 1)[0]  # not the server's own words
    if error_message.startswith(ROBOTS_UNAVAILABLE + " ("):
        # robots.txt could not be read: the host is skipped for now, and worth another pass when what
        # stopped the read is (a 5xx, a timeout), not when it would stop the image too (a TLS error, a
        # refused connection: as permanent here as for the image request itself)
        cause = error_message[len(ROBOTS_UNAVAILABLE) + 2 :].rsplit(ROBOTS_SKIPPED, 1)[0]
        return is_transient(cause)
    m = _HTTP_ERROR.match(error_message)
    if m:
        return int(m.group(1)) in TRANSIENT_HTTP_CODES
    if error_message.startswith(_PERMANENT):
        return False  # (they quote the URL's path or host, which may say "timeout")
    if error_message.startswith("DNS: host ") and _DNS_CAUSE in error_message:
        return bool(_TRANSIENT.search(error_message.split(_DNS_CAUSE, 1)[1]))  # the resolver's words, not the host name
    return bool(_TRANSIENT.search(error_message))


def _exception_message(e: BaseException) -> str:
    """``Type: message`` of a failed fetch for error_message, without control characters and capped.
    A protocol error that quotes the server's bytes (a status line that is not one, an unknown
    protocol: up to 64 KiB) shows them as a short repr after SERVER_SENT, where :func:`is_transient`
    stops reading: a server cannot make its failure look transient (retried in the shard and on every
    --retry-failed pass) by writing "timed out" there."""
    import http.client

    if isinstance(e, (http.client.BadStatusLine, http.client.UnknownProtocol)) and not isinstance(e, http.client.RemoteDisconnected):
        return f"{type(e).__name__}{SERVER_SENT}{_reason(str(e))!r}"
    return f"{type(e).__name__}: {_CONTROL.sub('', str(e))[:MAX_ERROR_CHARS]}"


def _reason(phrase: str | None) -> str:
    """A server's reason phrase fit for error_message: control characters dropped, at most
    MAX_REASON_CHARS characters."""
    return _CONTROL.sub("", phrase or "")[:MAX_REASON_CHARS]


@dataclass(frozen=True)
class FetchPolicy:
    """What a fetch may reach and how long it may take. Picklable; built from a DownloadConfig."""

    allow_private_network: bool = False
    allow_networks: tuple[str, ...] = ()
    max_bytes: int = 20 * 1024 * 1024
    max_image_pixels: int = MAX_IMAGE_PIXELS  # PIL's default decompression-bomb limit
    backoff_base: float = 0.5
    max_retry_after: float = 10.0
    request_deadline: float = 60.0  # seconds for a whole request: every hop, headers and body
    shard_deadline: float | None = None  # seconds for a whole shard's fetches (None: no limit)
    max_redirects: int = 5
    ca_file: str | None = None  # extra CA bundle for https (None: the system's)
    dns_ttl: float = 300.0  # seconds an answer stays in the executor's DNS cache
    respect_tdm: bool = True  # refuse responses with "tdm-reservation: 1"
    respect_robots: bool = True  # fetch each host's robots.txt once (per executor, TTL) and obey it
    robots_ttl: float = 3600.0  # seconds a host's robots.txt stays cached (an unreachable one: 60 s)
    robots_user_agent: str | None = None  # the token robots.txt groups are matched against (None: "*" only)
    max_host_rps: float | None = None  # requests per second per host, per executor (None: no limit)
    max_host_concurrency: int | None = None  # requests in flight per host, per executor (None: no limit)
    max_host_backoff: float = 60.0  # cap on how long a 429/503 (its Retry-After) pauses a host
    # a host's 429/503 pauses, added up over an episode (HostGate.PAUSE_EPISODE_GAP), past which its rows
    # end "host throttled" (transient) instead of waiting: a host answering 429 with Retry-After held a
    # shard ~60 s per row and attempt (~180 s for one row with 2 retries, minutes for a few dozen rows)
    max_host_pause: float = 120.0
    max_crawl_delay: float | None = 30.0  # a robots.txt Crawl-delay over this skips the host (None: kept, however long)
    host_shares: tuple[tuple[str, int], ...] = ()  # (host, d): this executor's limits at host are divided by d
    blocklist: str | None = None  # path of a --blocklist file (URLs, domains, content hashes)
    blocklist_timeout: float | None = None  # seconds to connect / per read of an http(s) blocklist (None: blocklist_timeout())


class FetchError(Exception):
    """A refused or failed request: `message` is the row's error_message; `retry_after` from 429/503;
    `hop`: for a URL refused before any request (scheme, address, DNS, blocklist), which one (0: the
    URL asked for, n: its n-th redirect)."""

    def __init__(self, message: str, retry_after: float | None = None) -> None:
        super().__init__(message)
        self.retry_after = retry_after
        self.hop = 0


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

    def fresh(self, host: str) -> bool:
        """Whether `host` has an unexpired answer (or failure) cached: a call returns at once."""
        with self._lock:
            hit = self._cache.get(host)
        return hit is not None and hit[0] >= time.monotonic()

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
            except UnicodeError as e:  # a label IDNA cannot encode (empty: "a..b", over 63 characters)
                res, expiry = OSError(f"not a valid host name ({e})"), now + min(self.ttl, self.NEGATIVE_TTL)
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

    The watchdog shuts down its own duplicate of the socket's descriptor: https wraps the watched
    socket in an SSLSocket, which takes over its descriptor and leaves the original object detached
    (fileno -1, shutdown fails with EBADF), while shutdown(2) on any descriptor of the connection
    ends it for all of them. Owning the duplicate (closed by whoever takes it off the watch list)
    also means a descriptor number the owner closed and the process reused is never shut down.
    """

    def __init__(self) -> None:
        self._cv = threading.Condition()
        self._heap: list[tuple[float, int]] = []
        self._socks: dict[int, socket.socket] = {}
        self._ids = itertools.count()
        self._thread: threading.Thread | None = None
        self._pid = 0

    def watch(self, sock: socket.socket, deadline: float) -> int:
        """Shut `sock`'s connection down at `deadline` (time.monotonic()) unless :meth:`unwatch`ed first."""
        dup = sock.dup()
        with self._cv:
            if self._thread is None or not self._thread.is_alive() or self._pid != os.getpid():
                # (re)start after a fork: Spark forks Python workers from a daemon process
                for inherited in self._socks.values():
                    inherited.close()
                self._heap, self._socks, self._pid = [], {}, os.getpid()
                self._thread = threading.Thread(target=self._run, name="laiontools-fetch-watchdog", daemon=True)
                self._thread.start()
            token = next(self._ids)
            self._socks[token] = dup
            heapq.heappush(self._heap, (deadline, token))
            self._cv.notify()
            return token

    def unwatch(self, token: int) -> None:
        with self._cv:
            dup = self._socks.pop(token, None)
        if dup is not None:
            dup.close()

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
                    pass  # the peer already closed the connection
                finally:
                    sock.close()


_WATCHDOG = _Watchdog()


# ----------------------------------------------------------------------------- per-host politeness


class _Host:
    __slots__ = ("active", "crawl_delay", "last_start", "next_slot", "paused_total", "paused_until", "requests", "throttled")

    def __init__(self) -> None:
        self.active = 0
        self.crawl_delay = 0.0  # seconds between request starts asked by the host's robots.txt
        self.last_start = -1e18  # time.monotonic() of the last request start
        self.next_slot = 0.0
        self.paused_until = 0.0
        self.paused_total = 0.0  # seconds of 429/503 pauses in the current episode
        self.requests = 0
        self.throttled = 0


class HostGate:
    """Per-host request limits shared by every download thread of an executor (one per process).

    ``slot(host, ...)`` waits until the host has a free concurrency slot (``max_concurrency``), its
    next request-rate slot has come (:meth:`interval` apart — ``1 / max_rps`` or the host's robots.txt
    Crawl-delay, whichever is longer — reserved in arrival order) and no 429/503 pause is running
    (:meth:`pause`), then holds the slot for one request. A wait that would pass the request's
    deadline ends with a ``deadline:`` error instead. Limits are per executor: see the README for the
    bound this gives across a cluster.
    """

    def __init__(self) -> None:
        self._cv = threading.Condition()
        self._hosts: dict[str, _Host] = {}
        self._shares: dict[str, int] = {}

    def _host(self, host: str) -> _Host:
        h = self._hosts.get(host)
        if h is None:
            h = self._hosts[host] = _Host()
        return h

    # A host not paused for this long starts a new episode: its pauses are counted from zero again.
    PAUSE_EPISODE_GAP = 600.0

    def pause(self, host: str, seconds: float) -> None:
        """No request to `host` starts in the next `seconds` (a 429/503 said so), from any thread. The
        pause's added length counts toward the host's `max_pause` (see :meth:`slot`)."""
        with self._cv:
            h = self._host(host)
            now = time.monotonic()
            if now > h.paused_until + self.PAUSE_EPISODE_GAP:
                h.paused_total = 0.0
            until = max(h.paused_until, now + seconds)
            h.paused_total += until - max(h.paused_until, now)
            h.paused_until = until
            h.throttled += 1

    @staticmethod
    def _over_budget(h: _Host, now: float, max_pause: float | None) -> bool:
        """Whether `h` is paused and its pauses this episode reach `max_pause` (then nothing waits for it)."""
        return max_pause is not None and h.paused_until > now and h.paused_total >= max_pause

    def _throttled(self, h: _Host, host: str, now: float, max_pause: float | None) -> None:
        """A paused host whose pauses this episode reach `max_pause`: its request does not wait."""
        if self._over_budget(h, now, max_pause):
            raise FetchError(f"{HOST_THROTTLED} {host} answered 429/503 {h.throttled} times, pausing its requests for "
                             f"{h.paused_total:.0f} s in all (the limit is {max_pause:g} s); skipped for now, "
                             "for a --retry-failed pass")

    def set_crawl_delay(self, host: str, seconds: float) -> None:
        """The host's robots.txt asked for `seconds` between requests: from now on its requests start at
        least that far apart (combined with ``max_rps``: the longer interval wins)."""
        with self._cv:
            h = self._host(host)
            if seconds != h.crawl_delay:
                # the robots.txt request itself was a request: the next one keeps the distance from it
                h.next_slot = max(h.next_slot, h.last_start + seconds)
            h.crawl_delay = max(0.0, seconds)

    def set_shares(self, shares: dict[str, int]) -> None:
        """From now on, divide the per-executor limits of these hosts by their share, and no other
        host's (download.host_shares: a host whose rows lie in many shards is fetched by many tasks at
        once; each keeps its share). Replaces the shares set before (a Python worker serves many jobs)."""
        with self._cv:
            self._shares = {h: max(1, int(d)) for h, d in shares.items() if int(d) > 1}

    def limits(self, host: str, max_rps: float | None, max_concurrency: int | None) -> tuple[float | None, int | None]:
        """This executor's limits at `host`: the user's, divided by the host's share (concurrency at
        least 1)."""
        d = self._shares.get(host, 1)  # replaced whole, never mutated: read without the lock
        if d == 1:
            return max_rps, max_concurrency
        return (max_rps / d if max_rps else max_rps), (max(1, max_concurrency // d) if max_concurrency else max_concurrency)

    def interval(self, host: str, max_rps: float | None) -> float:
        """Minimum seconds between two request starts at `host`: the stricter of the user's rate limit
        (divided by the host's share) and the host's Crawl-delay (0: no spacing)."""
        max_rps = self.limits(host, max_rps, None)[0]
        with self._cv:
            h = self._hosts.get(host)
            delay = h.crawl_delay if h is not None else 0.0
        return max(1.0 / max_rps if max_rps else 0.0, delay)

    def not_before(self, host: str, max_pause: float | None = None) -> float:
        """time.monotonic() before which no request to `host` may start (its 429/503 pause and its next
        rate slot); what :class:`HostScheduler` waits for instead of blocking a thread on the host. A
        host whose pauses reached `max_pause`: 0, its rows are handed out to end "host throttled"."""
        with self._cv:
            h = self._hosts.get(host)
            if h is None or self._over_budget(h, time.monotonic(), max_pause):
                return 0.0
            return max(h.paused_until, h.next_slot)

    def stats(self) -> dict[str, dict[str, int]]:
        with self._cv:
            return {k: {"requests": v.requests, "throttled": v.throttled} for k, v in self._hosts.items()}

    @contextlib.contextmanager
    def slot(self, host: str, max_rps: float | None, max_concurrency: int | None,
             wait_deadline: float | None = None, max_pause: float | None = None) -> Iterator[float]:
        """Hold one request slot at `host`; yields the seconds spent waiting for it.

        Waiting for politeness is not the request's time: the caller's request deadline starts
        after the wait. Only `wait_deadline` (time.monotonic(); the shard deadline, None: none)
        bounds the wait, past which a ``deadline:`` FetchError is raised. A host that is paused and
        whose 429/503 pauses of this episode add up to `max_pause` seconds gets no wait: a
        ``host throttled:`` FetchError (transient) instead.
        """
        t0 = time.monotonic()
        max_rps, max_concurrency = self.limits(host, max_rps, max_concurrency)
        with self._cv:
            spaced = bool(max_rps) or self._host(host).crawl_delay > 0
        if not spaced and not max_concurrency:
            with self._cv:
                h = self._host(host)
                until = h.paused_until
                self._throttled(h, host, time.monotonic(), max_pause)
            if until > time.monotonic():
                _sleep_until(until, wait_deadline, host)
            with self._cv:
                h.requests += 1  # (counted once it starts: not a row refused "host throttled" or at the deadline)
                h.last_start = time.monotonic()
            yield time.monotonic() - t0
            return
        with self._cv:
            h = self._host(host)
            while True:
                now = time.monotonic()
                if wait_deadline is not None and now >= wait_deadline:
                    raise FetchError(f"{DEADLINE_PREFIX} shard deadline passed waiting for a slot at host {host}")
                free = not max_concurrency or h.active < max_concurrency
                if free and now >= h.paused_until:
                    break
                self._throttled(h, host, now, max_pause)
                # a full host waits for a release (notify); a paused one for the pause's end; both at
                # most until the wait deadline
                ends = [t for t in ((h.paused_until if free else None), wait_deadline) if t is not None]
                self._cv.wait(min(ends) - now if ends else None)
            h.active += 1
            start = now
            if spaced:
                start = max(now, h.next_slot)
                h.next_slot = start + max(1.0 / max_rps if max_rps else 0.0, h.crawl_delay)
            h.last_start = start
        try:
            if start > time.monotonic():
                _sleep_until(start, wait_deadline, host)
            with self._cv:
                h.requests += 1
            yield time.monotonic() - t0
        finally:
            with self._cv:
                h.active -= 1
                self._cv.notify_all()


def _sleep_until(t: float, wait_deadline: float | None, host: str) -> None:
    if wait_deadline is not None and t > wait_deadline:
        time.sleep(max(0.0, wait_deadline - time.monotonic()))
        raise FetchError(f"{DEADLINE_PREFIX} shard deadline passed waiting for a slot at host {host}")
    time.sleep(max(0.0, t - time.monotonic()))


HOSTS = HostGate()


class HostScheduler:
    """Hands a shard's rows to download threads so that no thread waits on a busy host while another
    host's row could start.

    img2dataset's pool gives each thread the next row in input order; under a binding per-host limit
    that thread then sleeps in :meth:`HostGate.slot` although rows of idle hosts are waiting, and a
    polite download ran at 0.53–0.59 of what the limits allow (BENCHMARKS.md, issue 15). Here rows
    wait in one queue per host (input order within a host) and :meth:`take` returns the row of the
    host that can start soonest — at once when any can — reserving its start for the caller: the
    host's rows in flight (from :meth:`take` to :meth:`done`, retries included) stay under
    ``max_concurrency`` and its starts are :meth:`HostGate.interval` apart (rate limit or
    Crawl-delay), after any 429/503 pause. The gate still enforces every limit for each request
    (robots.txt, redirects to other hosts, retries); the scheduler only keeps threads from queueing
    on it. Which row a thread gets depends on timing; the rows and their keys do not (a shard's
    written samples are keyed by row index, and img2dataset writes them in completion order anyway).

    Once `deadline` (time.monotonic(), the shard deadline) has passed, :meth:`take` returns the
    remaining rows at once, in any order, so they end ``deadline:`` without waiting for a host.
    """

    def __init__(self, rows: list[tuple[int, str]], gate: HostGate, max_rps: float | None,
                 max_concurrency: int | None, deadline: float | None = None, max_pause: float | None = None) -> None:
        from collections import deque

        self._gate, self._rps, self._conc, self._deadline = gate, max_rps, max_concurrency, deadline
        self._max_pause = max_pause  # a host throttled past it is not waited for (HostGate.slot refuses its rows)
        self._queues: dict[str, Any] = {}
        for key, url in rows:
            self._queues.setdefault(host_of(url), deque()).append((key, url))
        self._host_of_key = {key: h for h, q in self._queues.items() for key, _ in q}
        self._left = len(rows)
        self._inflight: dict[str, int] = dict.fromkeys(self._queues, 0)
        self._next: dict[str, float] = dict.fromkeys(self._queues, 0.0)  # reserved next start per host
        # hosts that may start a row (not at their concurrency cap), by (earliest start, first row's key)
        self._heap: list[tuple[float, int, str]] = [(0.0, q[0][0], h) for h, q in self._queues.items()]
        heapq.heapify(self._heap)
        self._in_heap = set(self._queues)
        self._cv = threading.Condition()
        self.waited = 0.0  # seconds threads spent in take() waiting for any host (all busy)

    def __len__(self) -> int:
        return self._left

    def take(self) -> tuple[int, str]:
        """The next row to fetch; blocks only while every host with rows left is busy. Raises
        LookupError when every row has been taken (a caller asking more often than there are rows)."""
        with self._cv:
            t0 = time.monotonic()
            try:
                while True:
                    if self._left == 0:
                        raise LookupError("every row of the shard has already been taken")
                    now = time.monotonic()
                    if self._deadline is not None and now >= self._deadline:
                        return self._pop(next(h for h, q in self._queues.items() if q), now)
                    if not self._heap:  # every host with rows left is at its concurrency cap
                        self._cv.wait(None if self._deadline is None else self._deadline - now)
                        continue
                    ready, first, host = self._heap[0]
                    actual = max(ready, self._gate.not_before(host, self._max_pause))
                    if actual > ready + 1e-6:  # paused by a 429/503, or slots taken outside the scheduler
                        heapq.heapreplace(self._heap, (actual, first, host))
                        continue
                    if ready <= now:
                        heapq.heappop(self._heap)
                        self._in_heap.discard(host)
                        return self._pop(host, now)
                    until = ready if self._deadline is None else min(ready, self._deadline)
                    self._cv.wait(until - now)  # a done() may free an earlier host meanwhile
            finally:
                self.waited += time.monotonic() - t0

    def _pop(self, host: str, now: float) -> tuple[int, str]:
        q = self._queues[host]
        row = q.popleft()
        self._left -= 1
        self._inflight[host] += 1
        self._next[host] = max(now, self._next[host]) + self._gate.interval(host, self._rps)
        if q and self._below_cap(host):
            self._push(host)
        return row

    def _below_cap(self, host: str) -> bool:
        conc = self._gate.limits(host, None, self._conc)[1]
        return not conc or self._inflight[host] < conc

    def _push(self, host: str) -> None:
        if host not in self._in_heap:
            self._in_heap.add(host)
            heapq.heappush(self._heap, (self._next[host], self._queues[host][0][0], host))

    def done(self, key: int) -> None:
        """The row `key` (from :meth:`take`) is finished: its host's slot is free for its next row."""
        with self._cv:
            host = self._host_of_key[key]
            self._inflight[host] -= 1
            q = self._queues[host]
            if q and self._below_cap(host):  # was capped: back in the heap
                self._push(host)
            self._cv.notify_all()


# ----------------------------------------------------------------------------- robots.txt


class RobotsCache:
    """Each host's robots.txt, fetched once per executor through :func:`safe_get`, kept ``ttl`` seconds.

    Conventions (those of Google's robots.txt specification, RFC 9309):
    - 2xx: the rules apply, for the group naming our token (``robots_user_agent``) or else ``*``;
    - 4xx other than 429 (no robots.txt, or forbidden): everything is allowed; so is a robots.txt not
      reached within ``max_redirects`` redirects (a loop: RFC 9309 2.3.1.2 lets it count as unavailable);
    - 429, 5xx, a timeout or a connection failure: the host is treated as fully disallowed *for now*:
      its rows end failed_download ``robots.txt unavailable (<cause>)``, which ``--retry-failed``
      retries when the cause is transient for an image request too (:func:`is_transient`: a 429 or
      5xx, a timeout; not a refused connection or a TLS error), and the answer is cached for only
      ``UNAVAILABLE_TTL`` seconds;
    - a robots.txt host that does not resolve or is blocked by the address policy: the rows carry
      that error (``DNS: ...`` / ``blocked: ...``), the same the image request would get. A refused
      *redirect* of robots.txt (to a non-global address, another scheme, a name that does not
      resolve) says nothing about the image URL: robots.txt is unavailable, as for any other failure.
    Concurrent threads asking for the same new host wait for one fetch.
    """

    UNAVAILABLE_TTL = 60.0
    MAX_BYTES = 512 * 1024  # RFC 9309: crawlers may ignore content past 500 KiB

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._entries: dict[str, tuple[float, Any]] = {}
        self._pending: dict[str, threading.Event] = {}
        self.fetches = 0

    def check(self, url: str, *, policy: FetchPolicy, timeout: float, deadline: float, resolver: Resolver | None,
              gate: HostGate | None, hard_deadline: float | None = None) -> None:
        """Raise FetchError if robots.txt of `url`'s host disallows it for our token (or is unavailable).

        `deadline` bounds the robots.txt request itself once it has a host slot; waiting (for a slot,
        or for another thread's fetch of the same robots.txt) is bounded by `hard_deadline` only.
        """
        parts = urlsplit(url)
        origin = f"{parts.scheme}://{parts.netloc.rsplit('@', 1)[-1].lower()}"
        entry = self._entry(origin, policy=policy, timeout=timeout, deadline=deadline, resolver=resolver, gate=gate,
                            hard_deadline=hard_deadline)
        if isinstance(entry, FetchError):
            raise FetchError(str(entry))
        if entry is None:
            return
        token = policy.robots_user_agent or "*"
        delays = getattr(entry, "laiontools_crawl_delay", {})
        delay = delays[token.lower()] if token.lower() in delays else delays.get("*")
        if delay and policy.max_crawl_delay is not None and delay > policy.max_crawl_delay:
            # Kept, a Crawl-delay of hours held the shard until its deadline for one image per delay, and
            # every --retry-failed pass again (as Nutch's fetcher.max.crawl.delay: the host is skipped).
            raise FetchError(f"{ROBOTS_CRAWL_DELAY} {delay:g} s between requests, over --max-crawl-delay "
                             f"{policy.max_crawl_delay:g} s; the host is skipped (raise --max-crawl-delay to wait for it)")
        if delay and gate is not None:
            gate.set_crawl_delay((parts.hostname or "").lower(), delay)
        path = parts.path or "/"
        if parts.query:
            path += "?" + parts.query
        if not entry.can_fetch(token, origin + path):
            raise FetchError(f"{ROBOTS_DISALLOWS} {path[:200]} for user-agent {token}")

    def _entry(self, origin: str, **kw: Any) -> Any:
        while True:
            now = time.monotonic()
            with self._lock:
                hit = self._entries.get(origin)
                if hit is not None and hit[0] > now:
                    return hit[1]
                ev = self._pending.get(origin)
                if ev is None:
                    ev = self._pending[origin] = threading.Event()
                    mine = True
                else:
                    mine = False
            if not mine:
                hard = kw["hard_deadline"]
                if not ev.wait(None if hard is None else max(0.0, hard - time.monotonic())):
                    return FetchError(f"{DEADLINE_PREFIX} shard deadline passed waiting for robots.txt of {origin}")
                continue
            try:
                value, ttl = self._fetch(origin, **kw)
                with self._lock:
                    self._entries[origin] = (time.monotonic() + ttl, value)
                    self.fetches += 1
                return value
            finally:
                with self._lock:
                    self._pending.pop(origin, None)
                ev.set()

    def _fetch(self, origin: str, *, policy: FetchPolicy, timeout: float, deadline: float, resolver: Resolver | None,
               gate: HostGate | None, hard_deadline: float | None) -> tuple[Any, float]:
        try:
            resp = safe_get(origin + "/robots.txt", user_agent=user_agent_for(policy.robots_user_agent), policy=policy,
                            timeout=timeout, deadline=deadline, max_bytes=self.MAX_BYTES, resolver=resolver,
                            gate=gate, robots=None, truncate=True, hard_deadline=hard_deadline)
        except FetchError as e:
            msg = str(e)
            if msg.startswith(("DNS:", "blocked:")) and e.hop == 0:  # the image's own host and scheme
                return FetchError(msg), policy.robots_ttl
            m = re.match(r"HTTP Error (\d{3})", msg)
            if m and 400 <= int(m.group(1)) < 500 and m.group(1) != "429":
                return None, policy.robots_ttl  # no robots.txt: everything allowed
            if msg.startswith(TOO_MANY_REDIRECTS):
                # RFC 9309 2.3.1.2: no robots.txt reached within five redirects MAY be taken as unavailable
                # (2.3.1.3: as a 4xx, everything allowed), as Google does. Kept "unavailable for now", a
                # robots.txt that redirects to itself failed every row of the host, and --retry-failed
                # never retried them ("too many redirects" is permanent): a host lost for a server quirk.
                return None, policy.robots_ttl
            return FetchError(f"{ROBOTS_UNAVAILABLE} ({msg}{ROBOTS_SKIPPED}"), self.UNAVAILABLE_TTL
        body = resp.body
        if len(body) >= self.MAX_BYTES:  # cut at the limit: a cut last line is not a rule ("Disallow: /" of "/private/")
            body = body[: max(body.rfind(b"\n"), body.rfind(b"\r")) + 1]
        lines = body.decode("utf-8-sig", "replace").splitlines()  # (-sig: a byte order mark does not hide line 1)
        rp = RobotsRules(lines)
        token = (policy.robots_user_agent or "*").lower()
        rp.laiontools_crawl_delay = {"*": crawl_delay(lines, "*"), token: crawl_delay(lines, token)}
        return rp, policy.robots_ttl


ROBOTS = RobotsCache()


_ROBOTS_SAFE = "/:@!$&'()*+,;=-._~?"


def _robots_norm(path: str) -> str:
    """A path (or a rule's pattern) with its percent-encoding normalized, so that /a%2Eb and /a.b compare equal."""
    from urllib.parse import unquote

    return quote(unquote(path), safe=_ROBOTS_SAFE)


def _robots_match(path: str, pattern: str) -> bool:
    """Whether `pattern` (RFC 9309 2.2.3: ``*`` any characters, a final ``$`` the end) matches the start of
    `path`. Leftmost matching of each piece: linear in the path, whatever the number of ``*``."""
    anchored = pattern.endswith("$")
    pieces = (pattern[:-1] if anchored else pattern).split("*")
    if not path.startswith(pieces[0]):
        return False
    pos = len(pieces[0])
    if len(pieces) == 1:
        return pos == len(path) if anchored else True
    for piece in pieces[1:-1]:
        i = path.find(piece, pos)
        if i < 0:
            return False
        pos = i + len(piece)
    last = pieces[-1]
    if anchored:
        return len(path) - len(last) >= pos and path.endswith(last)
    return path.find(last, pos) >= 0


def _robots_groups(lines: list[str]) -> list[tuple[list[str], list[tuple[str, str]]]]:
    """robots.txt's groups: (user-agent names lower-cased, [(field lower-cased, value), ...] of the lines
    after them), comments dropped; a user-agent line after a group's other lines starts a new group."""
    groups: list[tuple[list[str], list[tuple[str, str]]]] = []
    agents: list[str] = []
    fields: list[tuple[str, str]] = []
    for raw in lines:
        line = raw.split("#", 1)[0].strip()
        if ":" not in line:
            continue
        field, value = (x.strip() for x in line.split(":", 1))
        field = field.lower()
        if field == "user-agent":
            if fields:
                groups.append((agents, fields))
                agents, fields = [], []
            agents.append(value.lower())
        elif agents:
            fields.append((field, value))
    if agents:
        groups.append((agents, fields))
    return groups


class RobotsRules:
    """One robots.txt's rules, matched as RFC 9309 says (urllib.robotparser predates it: first match,
    no wildcards, only the first ``*`` group).

    - groups: the groups naming an agent contained in our token (as urllib.robotparser and
      :func:`crawl_delay` match them) are combined, else every ``*`` group;
    - the most specific rule wins: the longest matching pattern; an Allow wins a tie; no match: allowed;
    - ``*`` in a pattern matches any characters, a final ``$`` the end of the path; an empty Disallow is no rule.
    """

    def __init__(self, lines: list[str]) -> None:
        self.groups: list[tuple[list[str], list[tuple[bool, str]]]] = [
            (agents, [(field == "allow", _robots_norm(value)) for field, value in fields if field in ("allow", "disallow") and value])
            for agents, fields in _robots_groups(lines)
        ]

    def rules_for(self, token: str) -> list[tuple[bool, str]]:
        token = token.split("/")[0].lower()
        named = [rules for names, rules in self.groups if token != "*" and any(a != "*" and a in token for a in names)]
        chosen = named or [rules for names, rules in self.groups if "*" in names]
        return [r for rules in chosen for r in rules]

    def can_fetch(self, token: str, url: str) -> bool:
        parts = urlsplit(url)
        path = _robots_norm((parts.path or "/") + ("?" + parts.query if parts.query else ""))
        best: tuple[int, bool] | None = None  # (pattern length, allow): longest wins, Allow on a tie
        for allow, pattern in self.rules_for(token):
            if _robots_match(path, pattern):
                cand = (len(pattern), allow)
                if best is None or cand > best:
                    best = cand
        return best is None or best[1]


def crawl_delay(lines: list[str], token: str) -> float | None:
    """The ``Crawl-delay`` (seconds, fractions allowed) of the robots.txt group that applies to `token`.

    Groups are matched as urllib.robotparser matches them for ``can_fetch`` (the first group naming
    an agent contained in `token`, else the ``*`` group), but the value may be a decimal (the standard
    library reads integers only). A missing, negative or unreadable value gives None (no delay).
    """
    token = token.split("/")[0].lower()
    groups: list[tuple[list[str], float | None]] = []
    for agents, fields in _robots_groups(lines):
        delay: float | None = None
        for field, value in fields:
            if field == "crawl-delay":
                try:
                    d = float(value)
                except ValueError:
                    continue
                if math.isfinite(d) and d >= 0:
                    delay = d
        groups.append((agents, delay))
    star = None
    for names, d in groups:
        if "*" in names:
            star = d if star is None else star
        elif token != "*" and any(a in token for a in names):
            return d
    return star


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


def _resolve_by(resolver: Resolver, host: str, port: int, deadline: float | None) -> list[str]:
    """resolver(host, port), waited for until `deadline` at most: getaddrinfo has no timeout of ours and
    cannot be interrupted, so an uncached lookup runs in a daemon thread that a late answer ends by itself
    (it still fills the executor's DNS cache); the row ends ``deadline:`` instead of waiting for it."""
    if deadline is None or (isinstance(resolver, DnsCache) and resolver.fresh(host)):
        return resolver(host, port)
    box: dict[str, Any] = {}
    done = threading.Event()

    def run() -> None:
        try:
            box["ok"] = resolver(host, port)
        except BaseException as e:  # noqa: BLE001 - handed to the waiting request
            box["err"] = e
        finally:
            done.set()

    threading.Thread(target=run, name="laiontools-dns", daemon=True).start()
    if not done.wait(max(0.0, deadline - time.monotonic())):
        raise FetchError(f"{DEADLINE_PREFIX} request deadline passed resolving {host}")
    if "err" in box:
        raise box["err"]
    return box["ok"]


def _checked_addresses(host: str, port: int, policy: FetchPolicy, resolver: Resolver,
                       deadline: float | None = None) -> list[str]:
    """The addresses to connect to for `host`: resolved once (before `deadline`), every one checked.
    Raises FetchError."""
    _check_host(host, policy)
    try:
        ip = host_ip(host)
    except ValueError:
        ip = None
    if ip is not None:
        return [str(ip)]
    try:
        addrs = _resolve_by(resolver, host, port, deadline)
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


_DIGITS = re.compile(r"[0-9]+")


def _header_int(value: str | None) -> int | None:
    """A header's non-negative integer (Content-Length, Retry-After seconds), None when absent or
    unreadable. ASCII digits only: str.isdigit() also passes superscripts ('²', latin-1 from the
    wire) that int() refuses."""
    v = (value or "").strip()
    return int(v) if _DIGITS.fullmatch(v) else None


def _request_target(parts: Any) -> str:
    # Quote what a browser would (spaces, non-ASCII); keep existing escapes and reserved characters.
    path = quote(parts.path or "/", safe="/%:@!$&'()*+,;=-._~")
    query = quote(parts.query, safe="/%:@!$&'()*+,;=-._~?") if parts.query else ""
    return path + ("?" + query if query else "")


def safe_get(url: str, *, user_agent: str, policy: FetchPolicy, timeout: float, deadline: float,
             max_bytes: int, resolver: Resolver | None = None,
             check_headers: Callable[[http.client.HTTPResponse], str | None] | None = None,
             gate: HostGate | None = None, robots: RobotsCache | None = None, truncate: bool = False,
             hard_deadline: float | None = None) -> Response:
    """GET `url` following redirects, connecting only to checked addresses, before `deadline`.

    `deadline` is a time.monotonic() value covering every hop, headers and body. Every hop passes
    the blocklist (``policy.blocklist``), `robots` (when given) and the per-host `gate`. Returns the
    final 2xx/3xx response; raises FetchError with the row's message: ``blocked: ...`` (scheme /
    address policy), ``DNS: ...``, ``deadline: ...``, ``timed out ...``, ``HTTP Error <code>``,
    ``robots.txt ...``, ``blocklisted: ...``, a size-limit message, or whatever `check_headers`
    returns (checked before the body is read). A 429/503 pauses the host in `gate`; time spent
    waiting for a host slot extends `deadline`, up to `hard_deadline` (the shard's). `truncate`:
    keep the first `max_bytes` instead of refusing a longer body (robots.txt).
    """
    from laiontools.web.blocklist import load_blocklist

    resolver = resolver or DNS
    blocklist = load_blocklist(policy.blocklist, timeout=policy.blocklist_timeout)
    for hop in range(policy.max_redirects + 1):
        try:
            parts, host, port, addrs = _checked_url(url, policy, blocklist, resolver, deadline)
        except FetchError as e:
            e.hop = hop
            raise
        if robots is not None:
            robots.check(url, policy=policy, timeout=timeout, deadline=deadline, resolver=resolver, gate=gate,
                         hard_deadline=hard_deadline)
        hop_kw: dict[str, Any] = {"user_agent": user_agent, "policy": policy, "timeout": timeout, "deadline": deadline,
                                  "max_bytes": max_bytes, "check_headers": check_headers, "truncate": truncate}
        try:
            if gate is None:
                resp = _one_hop(parts, host, port, addrs, **hop_kw)
            else:
                with gate.slot(host, policy.max_host_rps, policy.max_host_concurrency, hard_deadline,
                               policy.max_host_pause) as waited:
                    if waited > 0:  # the request's own time starts now, within the shard deadline
                        deadline = deadline + waited if hard_deadline is None else min(deadline + waited, hard_deadline)
                        hop_kw["deadline"] = deadline
                    resp = _one_hop(parts, host, port, addrs, **hop_kw)
        except FetchError as e:
            if gate is not None and str(e).startswith(("HTTP Error 429", "HTTP Error 503")):
                # the host asked everyone to slow down: every thread of this executor waits
                gate.pause(host, min(e.retry_after if e.retry_after is not None else 5.0, policy.max_host_backoff))
            raise
        if isinstance(resp, str):  # a redirect: its Location, resolved against this URL
            url = urljoin(url, resp).split("#", 1)[0]
            continue
        resp.url = url
        return resp
    raise FetchError(f"{TOO_MANY_REDIRECTS} (more than {policy.max_redirects})")


def _checked_url(url: str, policy: FetchPolicy, blocklist: Any, resolver: Resolver,
                 deadline: float | None = None) -> tuple[Any, str, int, list[str]]:
    """(parts, host, port, addresses) of one hop's URL once its scheme, blocklist entry and addresses
    have passed; raises FetchError (``blocked: ...``, ``blocklisted: ...``, ``DNS: ...``) otherwise."""
    try:
        parts = urlsplit(url)
        port = parts.port
    except ValueError as e:
        raise FetchError(f"blocked: URL cannot be parsed ({e})") from e
    if port == 0:  # (not "no port": the default one would be reached instead of the URL's)
        raise FetchError(f"blocked: URL names port 0, where no server listens ({url[:100]})")
    port = port or (443 if parts.scheme == "https" else 80)
    if parts.scheme not in ("http", "https"):
        raise FetchError(f"blocked: scheme {parts.scheme}: is not http or https ({url[:100]})")
    host = (parts.hostname or "").lower()
    if not host:
        raise FetchError(f"blocked: URL has no host ({url[:100]})")
    if blocklist is not None:
        why = blocklist.url_reason(url)
        if why:
            raise FetchError(f"blocklisted: {why}")
    return parts, host, port, _checked_addresses(host, port, policy, resolver, deadline)


def _one_hop(parts: Any, host: str, port: int, addrs: list[str], *, user_agent: str, policy: FetchPolicy,
             timeout: float, deadline: float, max_bytes: int,
             check_headers: Callable[[http.client.HTTPResponse], str | None] | None, truncate: bool = False) -> Response | str:
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
            try:
                tokens.append(_WATCHDOG.watch(sock, deadline))
            except OSError:  # no descriptor left for the watchdog's duplicate: no unbounded request
                sock.close()
                raise
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
            if 300 <= r.status < 400:  # a redirect to nowhere (no or an empty Location), 300, 304, 305: not the image
                raise FetchError(f"HTTP Error {r.status}: {_reason(r.reason)} (no Location to follow)")
            if r.status >= 400:
                ra = _header_int(r.getheader("Retry-After"))
                raise FetchError(f"HTTP Error {r.status}: {_reason(r.reason)}", None if ra is None else float(ra))
            if check_headers is not None:
                refusal = check_headers(r)
                if refusal:
                    raise FetchError(refusal)
            # a chunked body's length is its chunks': Content-Length beside it is ignored (RFC 9112 6.3),
            # as http.client reads it; the byte limit still holds on the bytes read
            length = None if r.chunked else _header_int(r.getheader("Content-Length"))
            if length is not None and length > max_bytes and not truncate:
                raise FetchError(f"response of {length} bytes is over the limit of {max_bytes} bytes")
            chunks, total = [], 0
            while True:
                chunk = r.read1(65536)
                if not chunk:
                    break
                total += len(chunk)
                if total > max_bytes:
                    if truncate:
                        chunks.append(chunk[: max_bytes - (total - len(chunk))])
                        return Response(r.status, r.headers, b"".join(chunks), "")
                    raise FetchError(f"response is over the limit of {max_bytes} bytes")
                chunks.append(chunk)
            if time.monotonic() >= deadline:
                raise FetchError(f"{DEADLINE_PREFIX} request took longer than its deadline ({host}, {total} bytes read)")
            if length is not None and total < length:
                raise FetchError(f"IncompleteRead: {total} of {length} bytes")
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
            raise FetchError(_exception_message(e)) from e
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


# X-Robots-Tag directives written "name: value": the name before the colon is not a user-agent token
_VALUED_DIRECTIVES = frozenset({"max-snippet", "max-image-preview", "max-video-preview", "unavailable_after"})
_DIRECTIVE_MEANS = {"none": ("noindex", "nofollow")}


def x_robots_disallowed(headers: Any, user_agent_token: str | None, disallowed: Any) -> bool:
    """True if an X-Robots-Tag header for every robot or for `user_agent_token` holds one of the `disallowed`
    directives (``none`` counts as ``noindex, nofollow``). A header's value is ``[token:] directive, ...``;
    a colon inside a directive ("max-snippet: -1", "unavailable_after: <date>") does not make what
    precedes it a token (img2dataset's is_disallowed read "noindex, max-snippet:-1" as rules for a robot
    named "noindex, max-snippet", and ignored the opt-out)."""
    mine = (user_agent_token or "").strip().lower()
    for value in headers.get_all("X-Robots-Tag", []) or []:
        value = str(value)
        head, sep, rest = value.partition(":")
        if sep and "," not in head and head.strip().lower() not in _VALUED_DIRECTIVES:
            if head.strip().lower() != mine:
                continue  # for another robot
            value = rest
        for directive in value.split(","):
            name = directive.split(":", 1)[0].strip().lower()
            if name in disallowed or any(x in disallowed for x in _DIRECTIVE_MEANS.get(name, ())):
                return True
    return False


def tdm_reserved(headers: Any) -> bool:
    """True if the TDM Reservation Protocol header reserves text-and-data-mining rights."""
    return any(v.strip() == "1" for v in headers.get_all("tdm-reservation", []) or [])


def user_agent_for(token: str | None) -> str:
    return USER_AGENT + (f" (compatible; {token}; +https://github.com/laion-ai/laiontools)" if token else "")


def fetch_one(url: str, timeout: float, user_agent_token: str | None, disallowed: Any, policy: FetchPolicy, *,
              resolver: Resolver | None = None, deadline: float | None = None, gate: HostGate | None = None,
              robots: RobotsCache | None = None) -> tuple[io.BytesIO | None, str | None, float | None]:
    """(bytes, error, retry_after) for one attempt at an image. Never raises.

    `deadline` (time.monotonic()) caps the request further than ``policy.request_deadline``
    (the shard deadline). `resolver`, `gate` and `robots` replace the executor's DNS cache, host
    gate and robots.txt cache (tests); robots.txt is consulted when ``policy.respect_robots``.
    """
    from laiontools.web.blocklist import load_blocklist

    gate = gate or HOSTS
    robots = (robots or ROBOTS) if policy.respect_robots else None
    req_deadline = time.monotonic() + policy.request_deadline
    if deadline is not None:
        req_deadline = min(req_deadline, deadline)

    def check_headers(r: http.client.HTTPResponse) -> str | None:
        if disallowed and x_robots_disallowed(r.headers, user_agent_token, disallowed):
            return "Use of image disallowed by X-Robots-Tag directive"
        if policy.respect_tdm and tdm_reserved(r.headers):
            return "Use of image reserved by tdm-reservation header (TDM Reservation Protocol)"
        return None

    try:
        resp = safe_get(url, user_agent=user_agent_for(user_agent_token), policy=policy, timeout=timeout,
                        deadline=req_deadline, max_bytes=policy.max_bytes, resolver=resolver, check_headers=check_headers,
                        gate=gate, robots=robots, hard_deadline=deadline)
        blocklist = load_blocklist(policy.blocklist, timeout=policy.blocklist_timeout)
        if blocklist is not None:
            why = blocklist.content_reason(resp.body)
            if why:  # refused here, so the bytes never reach img2dataset's writer
                return None, f"blocklisted: {why}", None
        pixels = image_pixels(resp.body)
        if pixels is None:
            enc = (resp.headers.get("Content-Encoding") or "").strip().lower()
            why = (f"an empty body, HTTP {resp.status}" if not resp.body
                   else f"the body is Content-Encoding: {_reason(enc)[:40]}, never asked for nor decoded" if enc not in ("", "identity")
                   else "not an image, or a format PIL cannot parse")
            return None, f"{UNREADABLE_HEADER} ({why}); refused rather than decoded without a pixel limit", None
        if pixels > policy.max_image_pixels:
            return None, f"image of {pixels} pixels is over the limit of {policy.max_image_pixels} pixels", None
        return io.BytesIO(resp.body), None, None
    except FetchError as e:
        return None, str(e), e.retry_after
    except Exception as e:  # noqa: BLE001 - a per-sample failure becomes a status row, never a crash
        return None, _exception_message(e), None


def fetch_with_retry(row: tuple[int, str], timeout: float, retries: int, user_agent_token: str | None,
                     disallowed_header_directives: Any, *, policy: FetchPolicy, shard_deadline_at: float | None = None,
                     resolver: Resolver | None = None,
                     scheduler: HostScheduler | None = None) -> tuple[int, io.BytesIO | None, str | None]:
    """img2dataset's download_image_with_retry contract: (key, stream or None, error or None).

    `shard_deadline_at` (time.monotonic()): rows reached after it are not fetched and end with a
    ``deadline:`` error; requests in flight are cut at it. With a `scheduler` holding the shard's
    rows, `row` is only a ticket: the row fetched is the scheduler's next (:meth:`HostScheduler.take`),
    and the key returned is that row's, so img2dataset files the result under the right row.
    """
    if scheduler is None:
        return _fetch_row(row, timeout, retries, user_agent_token, disallowed_header_directives, policy,
                          shard_deadline_at, resolver)
    key, url = scheduler.take()
    try:
        return _fetch_row((key, url), timeout, retries, user_agent_token, disallowed_header_directives, policy,
                          shard_deadline_at, resolver)
    finally:
        scheduler.done(key)


def _fetch_row(row: tuple[int, str], timeout: float, retries: int, user_agent_token: str | None,
               disallowed_header_directives: Any, policy: FetchPolicy, shard_deadline_at: float | None,
               resolver: Resolver | None) -> tuple[int, io.BytesIO | None, str | None]:
    key, url = row
    err = None
    for attempt in range(retries + 1):
        if shard_deadline_at is not None and time.monotonic() >= shard_deadline_at:
            return key, None, f"{DEADLINE_PREFIX} shard deadline of {policy.shard_deadline:g} s passed before this row was fetched"
        stream, err, retry_after = fetch_one(url, timeout, user_agent_token, disallowed_header_directives, policy,
                                             resolver=resolver, deadline=shard_deadline_at)
        if stream is not None:
            return key, stream, None
        if attempt == retries or not is_transient(err) or (err or "").startswith(_NO_RETRY_IN_SHARD):
            break  # a deadline hit or a cached robots.txt failure would only repeat inside the shard
        delay = policy.backoff_base * (2**attempt) * (0.5 + random.random())
        if retry_after is not None:
            delay = max(delay, min(retry_after, policy.max_retry_after))
        if shard_deadline_at is not None:
            delay = min(delay, max(0.0, shard_deadline_at - time.monotonic()))
        time.sleep(delay)
    return key, None, err


def executor_counters() -> dict[str, Any]:
    """This process's DNS, robots.txt and per-host counters (they only grow)."""
    return {"dns_lookups": DNS.lookups, "dns_failures": DNS.failures, "robots_fetches": ROBOTS.fetches,
            "hosts": HOSTS.stats()}


def counters_delta(before: dict[str, Any], after: dict[str, Any]) -> dict[str, Any]:
    """What happened between two :func:`executor_counters` snapshots: totals, and the hosts that a
    429/503 paused (with their pause count); hosts without a pause are only counted."""
    hosts_b = before["hosts"]
    throttled, requests = {}, 0
    for h, v in after["hosts"].items():
        b = hosts_b.get(h, {"requests": 0, "throttled": 0})
        requests += v["requests"] - b["requests"]
        if v["throttled"] > b["throttled"]:
            throttled[h] = v["throttled"] - b["throttled"]
    return {"dns_lookups": after["dns_lookups"] - before["dns_lookups"],
            "dns_failures": after["dns_failures"] - before["dns_failures"],
            "robots_fetches": after["robots_fetches"] - before["robots_fetches"],
            "requests": requests, "throttled_hosts": throttled}


WEB_STATS_SUFFIX = "_web.json"
SHARD_ERROR_SUFFIX = ".error.txt"  # PolicyDownloader's note of why a shard failed, in its error_folder


class PolicyDownloader(Downloader):
    """img2dataset's Downloader with :func:`fetch_with_retry` as its fetch function.

    At the end of a shard it writes ``<shard>_web.json`` beside img2dataset's ``<shard>_stats.json``:
    the executor counters of that shard (:func:`counters_delta`; a Python worker runs one shard at a
    time, so the difference is the shard's). The download report sums them. It is written just
    before the stats file, the shard's completion marker: a kill between the two leaves a shard that
    is not done, whose files the next run removes and downloads again, never a done shard without
    its counters.

    The ``--blocklist`` is read before any row is fetched (once per process, bounded by
    ``policy.blocklist_timeout``): a list that cannot be read fails the shard, not its rows one by one
    (each waiting for the list's server, then recorded failed as if blocklisted). The message, credentials
    removed, is printed and written to ``<error_folder>/<shard id>.error.txt`` (when `error_folder` is
    given), where the driver reads it for the error naming the shards that failed every retry.
    """

    def __init__(self, *args: Any, policy: FetchPolicy, error_folder: str | None = None, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.policy_dict = asdict(policy)
        self.error_folder = error_folder

    def _shard_failed(self, row: Any, message: str) -> tuple[bool, Any]:
        """img2dataset's answer for a failed shard, after noting why (see the class doc) for the driver."""
        shard_id = row[0]
        logging.getLogger(__name__).warning("shard %s failed with error %s", shard_id, message)
        if self.error_folder:
            try:
                from laiontools.core.storage import join

                fs, p = url_to_fs(join(self.error_folder, f"{shard_id}{SHARD_ERROR_SUFFIX}"))
                with fs.open(p, "wb") as f:
                    f.write(message.encode("utf-8"))
            except Exception as e:  # noqa: BLE001 - the shard fails either way; the note is the message's way out
                logging.getLogger(__name__).warning("could not note why shard %s failed: %s: %s", shard_id,
                                                    type(e).__name__, e)
        return False, row

    @staticmethod
    def _shard_rows(shard_file: str) -> list[tuple[int, str]]:
        """(key, url) of every row of img2dataset's shard input file, keyed as download_shard keys them
        (the row's index in the file)."""
        import pyarrow as pa

        fs, path = url_to_fs(shard_file)
        with fs.open(path, "rb") as f:
            urls = pa.ipc.open_file(f).read_all().column("url").to_pylist()
        return list(enumerate(urls))

    def __call__(self, row):
        import img2dataset.downloader as d

        from laiontools.core.errors import UserError
        from laiontools.core.redact import redact_text
        from laiontools.web.blocklist import load_blocklist

        pol = FetchPolicy(**{**self.policy_dict, "allow_networks": tuple(self.policy_dict["allow_networks"])})
        try:  # before any row: the fetch checks every row against it (a cache hit from here on)
            load_blocklist(pol.blocklist, timeout=pol.blocklist_timeout)
        except Exception as e:  # noqa: BLE001 - the shard fails, loudly, and is retried; never its rows one by one
            why = str(e) if isinstance(e, UserError) else redact_text(f"{type(e).__name__}: {e}")
            return self._shard_failed(row, f"the blocklist could not be read, so no row was fetched: {why}")
        DNS.ttl = pol.dns_ttl
        HOSTS.set_shares({h: int(d) for h, d in pol.host_shares})
        at = time.monotonic() + pol.shard_deadline if pol.shard_deadline else None
        # The shard's rows go to a HostScheduler; img2dataset's pool still calls the fetch once per row
        # (its row is only a ticket), so its writer, keys, stats and memory bound stay as they are.
        try:
            sched: HostScheduler | None = HostScheduler(self._shard_rows(row[1]), HOSTS, pol.max_host_rps,
                                                        pol.max_host_concurrency, at, pol.max_host_pause)
        except Exception:  # an unreadable shard file: img2dataset's own read fails next and marks the shard failed
            logging.getLogger(__name__).warning("shard %s: rows not readable for the host scheduler", row[0], exc_info=True)
            sched = None
        # img2dataset calls the module-level name inside download_shard; a Spark Python worker runs
        # one task at a time, so setting it per shard is safe.
        d.download_image_with_retry = functools.partial(fetch_with_retry, policy=pol, shard_deadline_at=at,
                                                        scheduler=sched)
        before = executor_counters()

        def counters_then_stats(output_folder: str, shard_id: int, *args: Any) -> None:
            try:
                from laiontools.core.storage import join, write_json

                name = f"{shard_id:0{self.oom_shard_count}d}{WEB_STATS_SUFFIX}"
                write_json(join(output_folder, name), counters_delta(before, executor_counters()))
            except Exception as e:  # noqa: BLE001 - counters are a report's extra; never fail a shard for them
                logging.getLogger(__name__).warning("could not write the web counters of shard %s: %s: %s", shard_id,
                                                    type(e).__name__, e)
            _write_stats(output_folder, shard_id, *args)

        # download_shard calls the module-level name to write the stats file; set per shard, as above
        d.write_stats = counters_then_stats
        writer_class = self.sample_writer_class
        self.sample_writer_class = _machine_faults_pass(writer_class)
        try:
            return super().__call__(row)
        except _MachineFault as fault:  # a full disk stops the shard and the stage, not just one sample
            raise fault.error from None
        finally:
            self.sample_writer_class = writer_class


class _MachineFault(BaseException):
    """A fault of the machine (disk full, quota, read-only file system) met writing a sample. img2dataset
    catches every Exception around a sample's write and records the sample as failed to download: on a
    full disk a shard then ended with its rows "failed" ([Errno 28]) and the stage with exit 0. As a
    BaseException it passes that loop; :meth:`PolicyDownloader.__call__` raises the OSError again."""

    def __init__(self, error: OSError) -> None:
        super().__init__(str(error))
        self.error = error


def _machine_faults_pass(writer_class: Any) -> Any:
    """`writer_class` whose write() lets a fault of the machine out of img2dataset's per-sample catch."""

    class Writer(writer_class):  # type: ignore[misc, valid-type]
        def write(self, *args: Any, **kwargs: Any) -> Any:
            try:
                return super().write(*args, **kwargs)
            except OSError as e:
                if environment_error(e) is not None:  # the machine's faults, as every stage judges them
                    raise _MachineFault(e) from e
                raise

    return Writer
