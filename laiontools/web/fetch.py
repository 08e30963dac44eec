"""The HTTP fetch img2dataset runs for us, with the safety limits a crawl of strangers' URLs needs.

img2dataset has no hook for a byte limit, a connect-time address check or backoff, so
:class:`PolicyDownloader` (a subclass of img2dataset's Downloader, pickled to executors like it)
installs :func:`fetch_with_retry` as img2dataset's fetch function inside each executor before a
shard runs. Everything else — threads, resizing, tar writing, per-shard stats — is img2dataset's.

What it adds:
- http/https only, on every redirect hop; private/loopback/link-local/reserved targets refused at
  connect time (after DNS, so a public name resolving to 127.0.0.1 is caught) unless allowed;
- a byte limit (Content-Length and actual bytes) and a pixel limit read from the image header
  before anything decodes it (a decompression bomb never reaches OpenCV);
- retries only for transient failures (timeout, connection reset, HTTP 429 and 5xx), with
  exponential backoff and a bounded Retry-After.
"""

from __future__ import annotations

import http.client
import io
import ipaddress
import random
import re
import socket
import time
import urllib.error
import urllib.request
from dataclasses import asdict, dataclass
from typing import Any
from urllib.parse import urlsplit

from img2dataset.downloader import Downloader, is_disallowed

from laiontools.stages.prepare import is_blocked_ip

USER_AGENT = "Mozilla/5.0 (X11; Linux x86_64; rv:72.0) Gecko/20100101 Firefox/72.0"

# Error messages that mark a failure as transient (worth a retry pass). Matched against the
# error_message img2dataset records, so they must match what fetch_one returns.
TRANSIENT_PATTERNS = (
    r"timed out", r"timeout", r"Connection reset", r"Connection aborted", r"Remote end closed",
    r"HTTP Error 429", r"HTTP Error 5\d\d", r"Temporary failure", r"IncompleteRead",
)
_TRANSIENT = re.compile("|".join(TRANSIENT_PATTERNS), re.IGNORECASE)


def is_transient(error_message: str | None) -> bool:
    return bool(error_message) and bool(_TRANSIENT.search(error_message or ""))


@dataclass(frozen=True)
class FetchPolicy:
    allow_private_network: bool = False
    allow_networks: tuple[str, ...] = ()
    max_bytes: int = 20 * 1024 * 1024
    max_image_pixels: int = 89_478_485  # PIL's default decompression-bomb limit
    backoff_base: float = 0.5
    max_retry_after: float = 10.0


class BlockedTarget(Exception):
    pass


def _check_target(url: str, policy: FetchPolicy) -> None:
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https"):
        raise BlockedTarget(f"blocked: scheme {parts.scheme}: is not http or https ({url[:100]})")
    if policy.allow_private_network:
        return
    host = parts.hostname or ""
    try:
        addrs = [ai[4][0] for ai in socket.getaddrinfo(host, parts.port or (443 if parts.scheme == "https" else 80))]
    except OSError as e:
        raise BlockedTarget(f"host {host} does not resolve ({e})") from e
    for a in addrs:
        if is_blocked_ip(ipaddress.ip_address(a.split("%")[0]), policy.allow_networks):
            raise BlockedTarget(f"blocked: host {host} resolves to private/loopback/link-local address {a}")


class _PolicyRedirect(urllib.request.HTTPRedirectHandler):
    def __init__(self, policy: FetchPolicy) -> None:
        self.policy = policy

    def redirect_request(self, req, fp, code, msg, headers, newurl):
        _check_target(newurl, self.policy)
        return super().redirect_request(req, fp, code, msg, headers, newurl)


def _image_pixels(data: bytes) -> tuple[int, int] | None:
    """(width, height) from the image header without decoding pixels; None if PIL can't tell."""
    from PIL import Image

    try:
        Image.MAX_IMAGE_PIXELS = None  # we apply our own limit below, on the header alone
        with Image.open(io.BytesIO(data)) as im:
            return im.size
    except Exception:  # noqa: BLE001 - undecodable data is the resizer's call, with its own error
        return None


def fetch_one(url: str, timeout: float, user_agent_token: str | None, disallowed: Any,
              policy: FetchPolicy) -> tuple[io.BytesIO | None, str | None, float | None]:
    """(bytes, error, retry_after) for one attempt."""
    ua = USER_AGENT + (f" (compatible; {user_agent_token}; +https://github.com/laion-ai/laiontools)" if user_agent_token else "")
    try:
        _check_target(url, policy)
        opener = urllib.request.build_opener(_PolicyRedirect(policy))
        req = urllib.request.Request(url, headers={"User-Agent": ua})
        with opener.open(req, timeout=timeout) as r:
            if disallowed and is_disallowed(r.headers, user_agent_token, disallowed):
                return None, "Use of image disallowed by X-Robots-Tag directive", None
            length = r.headers.get("Content-Length")
            if length and length.isdigit() and int(length) > policy.max_bytes:
                return None, f"response of {length} bytes is over the limit of {policy.max_bytes} bytes", None
            data = r.read(policy.max_bytes + 1)
            if len(data) > policy.max_bytes:
                return None, f"response is over the limit of {policy.max_bytes} bytes", None
        size = _image_pixels(data)
        if size is not None and size[0] * size[1] > policy.max_image_pixels:
            return None, f"image of {size[0]}x{size[1]} pixels is over the limit of {policy.max_image_pixels} pixels", None
        return io.BytesIO(data), None, None
    except BlockedTarget as e:
        return None, str(e), None
    except urllib.error.HTTPError as e:
        retry_after = None
        ra = e.headers.get("Retry-After") if e.headers else None
        if ra and ra.strip().isdigit():
            retry_after = float(ra.strip())
        return None, f"HTTP Error {e.code}: {e.reason}", retry_after
    except TimeoutError as e:
        return None, f"timed out ({e})", None
    except urllib.error.URLError as e:
        return None, f"URL error: {e.reason}", None
    except http.client.HTTPException as e:
        return None, f"{type(e).__name__}: {e}", None
    except (ConnectionError, OSError) as e:
        return None, f"{type(e).__name__}: {e}", None
    except Exception as e:  # noqa: BLE001 - a per-sample failure becomes a status row, never a crash
        return None, f"{type(e).__name__}: {e}", None


def fetch_with_retry(row: tuple[int, str], timeout: float, retries: int, user_agent_token: str | None,
                     disallowed_header_directives: Any, *, policy: FetchPolicy) -> tuple[int, io.BytesIO | None, str | None]:
    """img2dataset's download_image_with_retry contract: (key, stream or None, error or None)."""
    key, url = row
    err = None
    for attempt in range(retries + 1):
        stream, err, retry_after = fetch_one(url, timeout, user_agent_token, disallowed_header_directives, policy)
        if stream is not None:
            return key, stream, None
        if attempt == retries or not is_transient(err):
            break
        delay = policy.backoff_base * (2**attempt) * (0.5 + random.random())
        if retry_after is not None:
            delay = max(delay, min(retry_after, policy.max_retry_after))
        time.sleep(delay)
    return key, None, err


class PolicyDownloader(Downloader):
    """img2dataset's Downloader with :func:`fetch_with_retry` as its fetch function."""

    def __init__(self, *args: Any, policy: FetchPolicy, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.policy_dict = asdict(policy)

    def __call__(self, row):
        import functools

        import img2dataset.downloader as d

        pol = FetchPolicy(**{**self.policy_dict, "allow_networks": tuple(self.policy_dict["allow_networks"])})
        d.download_image_with_retry = functools.partial(fetch_with_retry, policy=pol)
        return super().__call__(row)
