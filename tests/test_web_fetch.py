"""laiontools.web.fetch through real sockets, WITHOUT the 127.0.0.0/8 allow-list of the download tests.

Two synthetic web servers play two hosts: ``public`` on 127.0.0.2 stands for a public web host
(the policy allows exactly 127.0.0.2/32, as if it were global) and ``private`` on 127.0.0.1 stands
for what a crawl must never reach (loopback, not allowed). Every refusal test checks the recorded
reason and that the private server saw no request.
"""

from __future__ import annotations

import contextlib
import os
import socket
import ssl
import subprocess
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, Self

import pytest
from PIL import Image

from laiontools.synthetic import SyntheticWebServer
from laiontools.web.fetch import (
    DEADLINE_PREFIX,
    UNREADABLE_HEADER,
    DnsCache,
    FetchPolicy,
    fetch_one,
    fetch_with_retry,
)

PUBLIC = "127.0.0.2"


@pytest.fixture(scope="module")
def images(tmp_path_factory):
    d = tmp_path_factory.mktemp("web-images")
    Image.new("RGB", (320, 240), (200, 30, 30)).save(d / "a.jpg", quality=90)
    return str(d)


@pytest.fixture(scope="module")
def public(images):
    with SyntheticWebServer(images, host=PUBLIC) as s:
        yield s


@pytest.fixture(scope="module")
def private(images):
    with SyntheticWebServer(images, host="127.0.0.1") as s:
        yield s


def _policy(**kw) -> FetchPolicy:
    """The public host allowed, nothing else; robots.txt off unless a test is about it."""
    return FetchPolicy(**{"allow_networks": (f"{PUBLIC}/32",), "request_deadline": 10, "respect_robots": False, **kw})


def _port(server: SyntheticWebServer) -> str:
    return server.base_url.rsplit(":", 1)[1]


class Rebinding:
    """A resolver hook that answers a public address first and 127.0.0.1 on every later query."""

    def __init__(self, first: str) -> None:
        self.first, self.calls = first, 0

    def __call__(self, host: str, port: int) -> list[str]:
        self.calls += 1
        return [self.first] if self.calls == 1 else ["127.0.0.1"]


class RawServer:
    """A TCP server on a loopback address whose answers are written by hand, for what http.server
    never sends: odd header values, reason phrases, chunked bodies with a Content-Length, dripped TLS.

    `routes` maps a request path to the raw response bytes or to a function(conn) writing it;
    `on_accept(conn) -> conn | None` runs on each connection before its request is read (a TLS wrap,
    or a handshake that never ends: None, the connection is done). `paths` lists the request paths received, in order.
    """

    NOT_FOUND = b"HTTP/1.1 404 Not Found\r\nContent-Length: 0\r\n\r\n"

    def __init__(self, routes: dict[str, bytes | Callable[[socket.socket], None]], host: str = PUBLIC,
                 on_accept: Callable[[socket.socket], socket.socket | None] | None = None) -> None:
        self.routes, self.on_accept, self.paths = routes, on_accept, []
        self.sock = socket.create_server((host, 0))
        self.sock.settimeout(0.2)
        self.port = self.sock.getsockname()[1]
        self.stopping = threading.Event()
        threading.Thread(target=self._serve, daemon=True).start()

    def url(self, path: str, host: str = "h.example.org", scheme: str = "http") -> str:
        return f"{scheme}://{host}:{self.port}{path}"

    def _serve(self) -> None:
        while not self.stopping.is_set():
            try:
                conn, _ = self.sock.accept()
            except OSError:  # the accept timeout, or the listener closed
                continue
            threading.Thread(target=self._one, args=(conn,), daemon=True).start()

    def _one(self, conn: socket.socket) -> None:
        with contextlib.closing(conn), contextlib.suppress(OSError):
            conn.settimeout(10)
            if self.on_accept is not None:
                conn = self.on_accept(conn)
            if conn is None:
                return
            req = b""
            while b"\r\n\r\n" not in req:
                data = conn.recv(4096)
                if not data:
                    return
                req += data
            path = req.split(b" ", 2)[1].decode("latin-1")
            self.paths.append(path)
            answer = self.routes.get(path, self.NOT_FOUND)
            answer(conn) if callable(answer) else conn.sendall(answer)
            conn.close()

    def drip(self, first: bytes, rest: bytes, every: float = 0.1) -> Callable[[socket.socket], None]:
        """A route answer: `first` at once, then `rest` one byte per `every` seconds (until stopped)."""
        def answer(conn: socket.socket) -> None:
            conn.sendall(first)
            for i in range(len(rest)):
                if self.stopping.wait(every):
                    return
                conn.sendall(rest[i:i + 1])
        return answer

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stopping.set()
        self.sock.close()


def _bounded(fn: Callable[[], object], limit: float = 30.0) -> object:
    """fn() in a daemon thread, failing the test (instead of hanging the suite) if it runs past `limit`."""
    box: dict[str, object] = {}
    t = threading.Thread(target=lambda: box.setdefault("result", fn()), daemon=True)
    t.start()
    t.join(limit)
    assert not t.is_alive(), f"still running after {limit} s: no deadline ended it"
    return box["result"]


def test_a_plain_fetch_works_and_sends_the_host_name(public):
    public.log_requests()
    res = lambda host, port: [PUBLIC]
    data, err, _ = fetch_one(f"http://images.example.org:{_port(public)}/img/a.jpg", 3, None, None, _policy(), resolver=res)
    assert err is None and Image.open(data).size == (320, 240)
    assert public.request_log[-1][1] == f"images.example.org:{_port(public)}"  # Host header keeps the name


def test_dns_rebinding_never_reaches_loopback(private, public):
    """The name answers the (allowed) public address first, loopback after: the connection must go
    to the first, checked answer, with no second lookup for the rebinding answer to win."""
    before = private.requests_served
    hook = Rebinding(PUBLIC)
    # port of the private server: if a second resolution were used, 127.0.0.1:<port> would answer
    data, err, _ = fetch_one(f"http://rebind.example.org:{_port(private)}/img/a.jpg", 2, None, None, _policy(), resolver=hook)
    assert hook.calls == 1
    assert private.requests_served == before, "the loopback server was reached"
    assert data is None and ("refused" in err.lower() or "ConnectionRefused" in err), err
    # with robots.txt on, its fetch and the image's share the executor cache's one answer
    hook = Rebinding(PUBLIC)
    data, err, _ = fetch_one(f"http://rebind2.example.org:{_port(private)}/img/a.jpg", 2, None, None,
                             _policy(respect_robots=True), resolver=DnsCache(resolve=hook))
    assert hook.calls == 1 and data is None and private.requests_served == before
    # with a global first answer (unreachable offline), still one lookup and no loopback request
    hook = Rebinding("8.8.8.8")
    data, err, _ = fetch_one(f"http://rebind.example.org:{_port(private)}/img/a.jpg", 1, None, None,
                             FetchPolicy(request_deadline=3, respect_robots=False), resolver=hook)
    assert hook.calls == 1 and data is None and private.requests_served == before


def test_a_name_with_any_private_answer_is_refused(private):
    before = private.requests_served
    data, err, _ = fetch_one(f"http://mixed.example.org:{_port(private)}/img/a.jpg", 2, None, None, _policy(allow_networks=()),
                             resolver=lambda h, p: ["8.8.8.8", "127.0.0.1"])
    assert data is None and err.startswith("blocked:") and "127.0.0.1" in err
    assert private.requests_served == before


@pytest.mark.parametrize("target", [
    "http://127.0.0.1:{port}/img/a.jpg", "http://2130706433:{port}/img/a.jpg", "http://0x7f000001:{port}/img/a.jpg",
    "http://0177.0.0.1:{port}/img/a.jpg", "http://127.1:{port}/img/a.jpg", "http://[::ffff:127.0.0.1]:{port}/img/a.jpg",
    "http://localhost:{port}/img/a.jpg", "http://intranet.example.org:{port}/img/a.jpg", "http://100.64.0.1/a.jpg",
    "file:///etc/passwd",
])
def test_a_redirect_to_a_private_target_is_refused(public, private, target):
    before = private.requests_served
    from urllib.parse import quote

    loc = target.format(port=_port(private))
    resolver = DnsCache(resolve=lambda h, p: {"intranet.example.org": ["127.0.0.1"]}.get(h, [PUBLIC]))
    data, err, _ = fetch_one(f"{public.base_url}/redirect-to/{quote(loc, safe='')}", 2, None, None, _policy(), resolver=resolver)
    assert data is None and err.startswith("blocked:"), err
    assert private.requests_served == before


@pytest.mark.parametrize("spelling", ["2130706433", "0x7f000001", "0177.0.0.1", "127.1"])
def test_numeric_spellings_are_refused_at_connect_time_too(private, spelling):
    before = private.requests_served
    data, err, _ = fetch_one(f"http://{spelling}:{_port(private)}/img/a.jpg", 2, None, None, _policy(allow_networks=()))
    assert data is None and err.startswith("blocked:") and "127.0.0.1" in err, err
    assert private.requests_served == before


def test_body_over_max_bytes_is_refused(public):
    size = os.path.getsize(os.path.join(public.image_dir, "a.jpg"))
    pol = _policy(max_bytes=size - 1)
    _, err, _ = fetch_one(f"{public.base_url}/img/a.jpg", 3, None, None, pol)
    assert err == f"response of {size} bytes is over the limit of {size - 1} bytes"
    # no Content-Length: the limit holds on the bytes actually read
    _, err, _ = fetch_one(f"{public.base_url}/nolength/a.jpg", 3, None, None, pol)
    assert err == f"response is over the limit of {size - 1} bytes"
    data, err, _ = fetch_one(f"{public.base_url}/nolength/a.jpg", 3, None, None, _policy(max_bytes=size))
    assert err is None and len(data.getvalue()) == size


def test_pixel_limit_fails_closed_and_leaves_pil_alone(public):
    limit_before = Image.MAX_IMAGE_PIXELS
    _, err, _ = fetch_one(f"{public.base_url}/headerless/a.jpg", 3, None, None, _policy())
    assert err.startswith(UNREADABLE_HEADER), err
    _, err, _ = fetch_one(f"{public.base_url}/html/a.jpg", 3, None, None, _policy())
    assert err.startswith(UNREADABLE_HEADER), err
    _, err, _ = fetch_one(f"{public.base_url}/huge/a.jpg", 3, None, None, _policy())
    assert err == "image of 3600000000 pixels is over the limit of 89478485 pixels"
    _, err, _ = fetch_one(f"{public.base_url}/img/a.jpg", 3, None, None, _policy(max_image_pixels=320 * 240 - 1))
    assert err == f"image of {320 * 240} pixels is over the limit of {320 * 240 - 1} pixels"
    assert Image.MAX_IMAGE_PIXELS == limit_before


def test_opt_out_headers(public):
    _, err, _ = fetch_one(f"{public.base_url}/noai/a.jpg", 3, None, {"noai", "noimageai"}, _policy())
    assert "X-Robots-Tag" in err
    _, err, _ = fetch_one(f"{public.base_url}/tdm/a.jpg", 3, None, None, _policy())
    assert "tdm-reservation" in err
    data, err, _ = fetch_one(f"{public.base_url}/tdm/a.jpg", 3, None, None, _policy(respect_tdm=False))
    assert err is None and data is not None


def test_a_dripping_response_ends_at_the_request_deadline(public):
    t0 = time.monotonic()
    # headers at once, then a byte every 0.2 s: no recv ever waits past the 2 s timeout
    _, err, _ = fetch_one(f"{public.base_url}/drip/0.2/a.jpg", 2, None, None, _policy(request_deadline=1.5))
    took = time.monotonic() - t0
    assert err.startswith(DEADLINE_PREFIX), err
    assert took < 10, f"the request deadline did not hold ({took:.1f} s)"


def test_shard_deadline_cuts_in_flight_requests_and_skips_the_rest(public):
    pol = _policy(request_deadline=60, shard_deadline=1.0)
    at = time.monotonic() + 1.0
    key, data, err = fetch_with_retry((0, f"{public.base_url}/drip/0.2/a.jpg"), 2, 2, None, None, policy=pol, shard_deadline_at=at)
    assert data is None and err.startswith(DEADLINE_PREFIX) and "request" in err, err
    served = public.requests_served
    key, data, err = fetch_with_retry((7, f"{public.base_url}/img/a.jpg"), 2, 2, None, None, policy=pol, shard_deadline_at=at)
    assert key == 7 and data is None and err.startswith(DEADLINE_PREFIX) and "before this row was fetched" in err
    assert public.requests_served == served  # not even tried


def test_dns_cache_resolves_each_host_once_and_counts_failures():
    calls = []

    def res(host, port):
        calls.append(host)
        if host == "gone.example.org":
            raise OSError("Name or service not known")
        return [PUBLIC]

    cache = DnsCache(resolve=res, ttl=60)
    for _ in range(5):
        assert cache("a.example.org", 80) == [PUBLIC]
        with pytest.raises(OSError):
            cache("gone.example.org", 80)
    assert calls == ["a.example.org", "gone.example.org"]
    assert (cache.lookups, cache.failures) == (2, 1)
    _, err, _ = fetch_one("http://gone.example.org/a.jpg", 2, None, None, _policy(), resolver=cache)
    assert err.startswith("DNS: host gone.example.org does not resolve"), err


def _self_signed(tmp_path, name: str) -> tuple[str, str]:
    cert, key = str(tmp_path / "cert.pem"), str(tmp_path / "key.pem")
    subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", key, "-out", cert, "-days", "2",
                    "-subj", f"/CN={name}", "-addext", f"subjectAltName=DNS:{name}"], check=True, capture_output=True)
    return cert, key


def test_https_connects_to_the_checked_address_with_sni_and_a_verified_certificate(images, tmp_path):
    import shutil

    if shutil.which("openssl") is None:
        pytest.skip("openssl is needed to make a test certificate")
    cert, key = _self_signed(tmp_path, "images.example.org")
    with SyntheticWebServer(images, host=PUBLIC, tls=(cert, key)) as tls:
        pol = _policy(ca_file=cert)
        hook = Rebinding(PUBLIC)
        url = f"https://images.example.org:{_port(tls)}/img/a.jpg"
        data, err, _ = fetch_one(url, 3, None, None, pol, resolver=hook)
        assert err is None and Image.open(data).size == (320, 240)
        assert hook.calls == 1 and tls.sni_names[-1] == "images.example.org"
        # the certificate is checked against the URL's host name, not the address connected to
        _, err, _ = fetch_one(f"https://other.example.org:{_port(tls)}/img/a.jpg", 3, None, None, pol, resolver=lambda h, p: [PUBLIC])
        assert err.startswith("TLS certificate of other.example.org rejected"), err
        # and without the test CA the system trust store refuses the self-signed certificate
        _, err, _ = fetch_one(url, 3, None, None, _policy(), resolver=lambda h, p: [PUBLIC])
        assert err.startswith("TLS certificate of images.example.org rejected"), err


def _png() -> bytes:
    import io

    buf = io.BytesIO()
    Image.new("RGB", (32, 32), (10, 200, 10)).save(buf, "PNG")
    return buf.getvalue()


def test_header_numbers_in_other_digits_are_read_as_absent():
    """Superscript digits (latin-1 on the wire) pass str.isdigit() but not int(): a Retry-After or a
    Content-Length spelled with them counts as absent, not as a ValueError; a robots.txt 503 with one
    is cached as unavailable like any other (it was re-fetched for every row)."""
    from laiontools.web.fetch import HostGate, RobotsCache

    png = _png()
    with RawServer({
        "/503.png": b"HTTP/1.1 503 Busy\r\nRetry-After: \xb2\r\nContent-Length: 0\r\n\r\n",
        "/429.png": b"HTTP/1.1 429 Slow down\r\nRetry-After: \xb9\xb2\r\nContent-Length: 0\r\n\r\n",
        "/cl.png": b"HTTP/1.1 200 OK\r\nContent-Length: \xb2\r\nConnection: close\r\n\r\n" + png,
        "/robots.txt": b"HTTP/1.1 503 Busy\r\nRetry-After: \xb2\r\nContent-Length: 0\r\n\r\n",
        "/img.png": b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n" % len(png) + png,
    }) as raw:
        res = lambda h, p: [PUBLIC]
        for path, code in (("/503.png", 503), ("/429.png", 429)):
            gate = HostGate()
            _, err, retry_after = fetch_one(raw.url(path), 2, None, None, _policy(), resolver=res, gate=gate)
            assert err.startswith(f"HTTP Error {code}") and retry_after is None, err
            assert gate.stats()["h.example.org"]["throttled"] == 1  # the host was paused (the default pause)
        data, err, _ = fetch_one(raw.url("/cl.png"), 2, None, None, _policy(), resolver=res, gate=HostGate())
        assert err is None and data.getvalue() == png
        robots = RobotsCache()
        for _ in range(3):
            _, err, _ = fetch_one(raw.url("/img.png", host="r.example.org"), 2, None, None, _policy(respect_robots=True),
                                  resolver=res, gate=HostGate(), robots=robots)
            assert err.startswith("robots.txt unavailable (HTTP Error 503"), err
        assert raw.paths.count("/robots.txt") == 1 and "/img.png" not in raw.paths


def test_a_chunked_body_is_judged_by_its_chunks_not_its_content_length():
    """Transfer-Encoding: chunked with a Content-Length too: the length is the chunks' (RFC 9112), so
    a complete body is neither an IncompleteRead nor over the limit; the limit still holds on the
    bytes read."""
    png = _png()
    chunked = b"%x\r\n" % len(png) + png + b"\r\n0\r\n\r\n"
    head = b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\nContent-Length: %d\r\n\r\n"
    with RawServer({"/small.png": head % 5000 + chunked, "/big.png": head % 99999999999 + chunked}) as raw:
        for path in ("/small.png", "/big.png"):
            data, err, _ = fetch_one(raw.url(path), 2, None, None, _policy(), resolver=lambda h, p: [PUBLIC])
            assert err is None and data.getvalue() == png, (path, err)
        _, err, _ = fetch_one(raw.url("/small.png"), 2, None, None, _policy(max_bytes=len(png) - 1),
                              resolver=lambda h, p: [PUBLIC])
        assert err == f"response is over the limit of {len(png) - 1} bytes"


def test_the_status_code_alone_makes_an_http_error_transient_and_the_reason_is_tamed():
    """A 404 whose reason phrase reads 'Connection reset by peer (timed out)' is permanent: fetched
    once, not retried (it was, 3 times, and again on every --retry-failed pass). A reason phrase goes
    into error_message without control characters and cut to MAX_REASON_CHARS."""
    from laiontools.web.fetch import MAX_REASON_CHARS, is_transient

    long_reason = b"\x1b[31mNot\x00 Found\x9b " + b"x" * 5000
    with RawServer({
        "/gone.jpg": b"HTTP/1.1 404 Connection reset by peer (timed out)\r\nContent-Length: 0\r\n\r\n",
        "/long.jpg": b"HTTP/1.1 404 " + long_reason + b"\r\nContent-Length: 0\r\n\r\n",
    }) as raw:
        pol = _policy(backoff_base=0.01)
        _, _, err = fetch_with_retry((0, raw.url("/gone.jpg")), 2, 3, None, None, policy=pol,
                                     resolver=lambda h, p: [PUBLIC])
        assert err == "HTTP Error 404: Connection reset by peer (timed out)" and not is_transient(err)
        assert raw.paths.count("/gone.jpg") == 1
        _, err, _ = fetch_one(raw.url("/long.jpg"), 2, None, None, pol, resolver=lambda h, p: [PUBLIC])
        assert err == "HTTP Error 404: " + ("[31mNot Found " + "x" * 5000)[:MAX_REASON_CHARS], err
    assert not any(is_transient(f"HTTP Error {c}: Service Unavailable (timed out)") for c in (400, 403, 404, 410, 451))
    assert all(is_transient(f"HTTP Error {c}: OK") for c in (408, 429, 500, 503, 599))
    assert is_transient("timed out (read)")
    # robots.txt unavailable: judged by what stopped the read, as an image request would be
    assert is_transient("robots.txt unavailable (HTTP Error 503: x); the host is skipped for now")
    assert is_transient("robots.txt unavailable (timed out (read)); the host is skipped for now")
    assert not is_transient("robots.txt unavailable (ConnectionRefusedError: [Errno 111] Connection refused); the host is skipped for now")


@pytest.fixture(scope="module")
def tls_cert(tmp_path_factory) -> tuple[str, str]:
    import shutil

    if shutil.which("openssl") is None:
        pytest.skip("openssl is needed to make a test certificate")
    return _self_signed(tmp_path_factory.mktemp("tls"), "images.example.org")


@pytest.mark.parametrize("stage", ["handshake", "headers", "body"])
def test_an_https_request_ends_at_its_deadline_wherever_the_server_drips(images, tls_cert, stage):
    """A server dripping a byte every 0.1 s for 100 s (no recv ever waits for the 2 s timeout) in the TLS
    handshake, in the headers or in the body: the request ends with the deadline, as over http.
    (The watchdog's socket is wrapped by ssl, which takes its descriptor over. The handshake is also
    bounded by ssl's own timeout over the whole handshake; the headers and the body are not.)"""
    server_ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    server_ctx.load_cert_chain(*tls_cert)
    with contextlib.ExitStack() as stack:
        if stage == "handshake":  # a TLS record header announcing 16 KiB, then its bytes one by one
            raw = stack.enter_context(RawServer({}))
            raw.on_accept = lambda c: raw.drip(b"\x16\x03\x03\x40\x00", bytes(1000))(c)
            url = raw.url("/a.jpg", host="images.example.org", scheme="https")
        elif stage == "headers":
            raw = stack.enter_context(RawServer({}, on_accept=lambda c: server_ctx.wrap_socket(c, server_side=True)))
            raw.routes["/a.jpg"] = raw.drip(b"HTTP/1.1 200 OK\r\n", b"X-Slow: " + b"a" * 1000 + b"\r\n\r\n")
            url = raw.url("/a.jpg", host="images.example.org", scheme="https")
        else:
            tls = stack.enter_context(SyntheticWebServer(images, host=PUBLIC, tls=tls_cert))
            url = f"https://images.example.org:{_port(tls)}/drip/0.1/a.jpg"
        pol = _policy(ca_file=tls_cert[0], request_deadline=1.0)
        data, err, _ = _bounded(lambda: fetch_one(url, 2, None, None, pol, resolver=lambda h, p: [PUBLIC]))
        assert data is None and err.startswith(DEADLINE_PREFIX), err
        if stage == "body":  # the shard deadline is the same watchdog's
            pol = _policy(ca_file=tls_cert[0], request_deadline=60, shard_deadline=1.0)
            _, data, err = _bounded(lambda: fetch_with_retry((0, url), 2, 2, None, None, policy=pol,
                                                              shard_deadline_at=time.monotonic() + 1.0,
                                                              resolver=lambda h, p: [PUBLIC]))
            assert data is None and err.startswith(DEADLINE_PREFIX) and "request" in err, err


# ----------------------------------------------------------------------------- robots.txt


@pytest.fixture
def fresh_host(images):
    """A server of its own on 127.0.0.3 (robots.txt is per server), allowed like the public one."""
    with SyntheticWebServer(images, host="127.0.0.3") as s:
        yield s


def _pol3(**kw) -> FetchPolicy:
    return FetchPolicy(**{"allow_networks": ("127.0.0.3/32",), "request_deadline": 10, **kw})


ROBOTS_TXT = """\
User-agent: *
Disallow: /redirect/

User-agent: laionbot
Disallow: /img/
"""


def test_robots_txt_is_fetched_once_and_obeyed_for_our_token(fresh_host):
    from laiontools.web.fetch import RobotsCache

    fresh_host.set_robots(ROBOTS_TXT)
    robots = RobotsCache()
    b = fresh_host.base_url
    for _ in range(3):
        _, err, _ = fetch_one(f"{b}/img/a.jpg", 3, None, None, _pol3(), robots=robots)
        assert err is None
    _, err, _ = fetch_one(f"{b}/redirect/a.jpg", 3, None, None, _pol3(), robots=robots)
    assert err == "robots.txt disallows /redirect/a.jpg for user-agent *"
    _, err, _ = fetch_one(f"{b}/img/a.jpg", 3, "laionbot", None, _pol3(robots_user_agent="laionbot"), robots=robots)
    assert err == "robots.txt disallows /img/a.jpg for user-agent laionbot"
    assert fresh_host.robots_requests == 1 and robots.fetches == 1
    # the refused request never reached the server: only /img/ requests and robots.txt did
    assert not any(p.startswith("/redirect/") for _, _, p in fresh_host.request_log)


def test_robots_txt_conventions_for_missing_and_unavailable(fresh_host):
    from laiontools.web.fetch import ROBOTS_UNAVAILABLE, RobotsCache, is_transient

    b = fresh_host.base_url
    fresh_host.set_robots(None)  # 404: everything allowed
    data, err, _ = fetch_one(f"{b}/img/a.jpg", 3, None, None, _pol3(), robots=RobotsCache())
    assert err is None and data is not None
    fresh_host.set_robots("User-agent: *\nDisallow: /\n", status=503)  # unavailable: skip for now
    robots = RobotsCache()
    served = fresh_host.requests_served
    _, data, err = fetch_with_retry((0, f"{b}/img/a.jpg"), 3, 3, None, None, policy=_pol3(), resolver=None)
    # (the module-level cache is used by fetch_with_retry: check it alone gives the same answer)
    _, err2, _ = fetch_one(f"{b}/img/a.jpg", 3, None, None, _pol3(), robots=robots)
    assert err.startswith(ROBOTS_UNAVAILABLE) and err2.startswith(ROBOTS_UNAVAILABLE), (err, err2)
    assert is_transient(err)  # a --retry-failed pass tries again
    # robots.txt was asked (once per cache), the image never, and the in-shard retries did not re-ask
    assert fresh_host.requests_served - served == 2


def test_a_redirect_status_without_a_location_is_a_failure_not_the_image():
    """A 3xx answer with no Location (or an empty one), and 300/304 (never asked for), is not the image,
    whatever its body holds: it was stored as a success, the body in the shard (a hostile-web walk).
    Now an HTTP error, permanent, asked once. A robots.txt host that refuses the connection (or a TLS
    error) leaves its rows robots.txt unavailable, no longer retried by every --retry-failed pass."""
    from laiontools.web.fetch import ROBOTS_UNAVAILABLE, HostGate, RobotsCache, is_transient

    png = _png()
    routes = {f"/{code}-{k}.png": (f"HTTP/1.1 {code} Moved\r\n{how}Content-Length: {len(png)}\r\n\r\n".encode() + png)
              for k, (code, how) in enumerate(((302, ""), (301, "Location: \r\n"), (300, ""), (304, ""), (307, "")))}
    with RawServer({**routes, "/ok.png": b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n" % len(png) + png}) as raw:
        _, err, _ = fetch_one(raw.url("/ok.png"), 2, None, None, _policy(), resolver=lambda h, p: [PUBLIC])
        assert err is None  # the control: the same body with a 200 is the image
        for path in routes:
            data, err, _ = fetch_one(raw.url(path), 2, None, None, _policy(), resolver=lambda h, p: [PUBLIC])
            code = path[1:4]
            assert data is None and err.startswith(f"HTTP Error {code}: ") and "no Location to follow" in err, (path, err)
            assert not is_transient(err) and raw.paths.count(path) == 1
    # robots.txt on a port where nothing listens: the connection is refused, permanently
    with socket.socket() as closed:
        closed.bind((PUBLIC, 0))
        port = closed.getsockname()[1]
        _, err, _ = fetch_one(f"http://h.example.org:{port}/a.png", 2, None, None, _policy(respect_robots=True),
                              resolver=lambda h, p: [PUBLIC], gate=HostGate(), robots=RobotsCache())
    assert err.startswith(ROBOTS_UNAVAILABLE + " (") and "refused" in err.lower() and not is_transient(err), err


def test_a_host_that_keeps_answering_429_gets_its_rows_skipped_not_waited_for(monkeypatch):
    """Each 429/503 pauses its host (its Retry-After, at most max_host_backoff). A host that answered 429
    to every request held a shard ~60 s per row and attempt (a hostile-web walk: 12 rows, 4 threads, 184 s).
    Its pauses now add up per episode; once they reach max_host_pause, a request that would wait for
    the host gets "host throttled" at once (transient: --retry-failed tries it later; no request sent).
    When the pause is over the host is asked again; an episode ends after PAUSE_EPISODE_GAP quiet seconds."""
    from laiontools.stages.download import failure_kind
    from laiontools.web.fetch import HOST_THROTTLED, HostGate, is_transient

    png = _png()
    slow = b"HTTP/1.1 429 Too Many Requests\r\nRetry-After: 99999\r\nContent-Length: 0\r\n\r\n"
    pol = _policy(max_host_backoff=1.0, max_host_pause=1.5)
    gate = HostGate()
    with RawServer({**{f"/t{k}.png": slow for k in range(4)},
                    "/ok.png": b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n" % len(png) + png}) as raw:
        def get(path):
            return fetch_one(raw.url(path), 2, None, None, pol, resolver=lambda h, p: [PUBLIC], gate=gate)[1]

        assert get("/t0.png").startswith("HTTP Error 429")  # paused 1 s (Retry-After capped)
        assert get("/t1.png").startswith("HTTP Error 429")  # waited for the pause, then asked: 2 s in all
        err = get("/t2.png")  # the host is paused again and its pauses reached 1.5 s: no wait, no request
        assert err.startswith(f"{HOST_THROTTLED} h.example.org answered 429/503 2 times") and is_transient(err), err
        assert failure_kind(err) == "host_throttled"  # its own line in the download report
        assert raw.paths == ["/t0.png", "/t1.png"]
        time.sleep(1.05)  # the pause is over: the host is asked again
        assert get("/ok.png") is None and raw.paths[-1] == "/ok.png"
        monkeypatch.setattr(HostGate, "PAUSE_EPISODE_GAP", 0.0)
        assert get("/t3.png").startswith("HTTP Error 429")  # a new episode: 1 s of pause counted
        assert get("/ok.png") is None  # under the limit: waited for the pause, then fetched
    assert raw.paths[-2:] == ["/t3.png", "/ok.png"]


def test_the_shard_scheduler_hands_out_a_throttled_hosts_rows_instead_of_waiting_for_it():
    """The download's HostScheduler waits for a paused host's pause to end before handing out its next
    row (so that no thread blocks on it); the throttle in HostGate.slot was then never reached, and the
    hostile-web walk's 12 rows of a 429 host still took 184 s (now 64 s, the same command). A host whose
    pauses reached max_pause is not waited for: its row is handed out while the host is still paused."""
    from laiontools.web.fetch import HostGate, HostScheduler

    gate = HostGate()
    gate.pause("t.example.org", 30.0)
    gate.pause("t.example.org", 31.0)  # 31 s of pauses in this episode
    sched = HostScheduler([(0, "http://t.example.org/a.jpg"), (1, "http://t.example.org/b.jpg")], gate, None, None,
                          deadline=time.monotonic() + 60, max_pause=30.0)
    assert sched.take() == (0, "http://t.example.org/a.jpg")
    assert gate.not_before("t.example.org") > time.monotonic() + 20  # handed out while the host is paused
    short = HostGate()
    short.pause("s.example.org", 0.2)  # under the limit: waited for
    sched = HostScheduler([(0, "http://s.example.org/a.jpg")], short, None, None, deadline=time.monotonic() + 60, max_pause=30.0)
    assert sched.take() == (0, "http://s.example.org/a.jpg") and time.monotonic() >= short.not_before("s.example.org")


def test_an_empty_or_content_encoded_body_says_so():
    """A 204 (or a 200 with no body) and a JPEG sent gzip-encoded (never asked for: no Accept-Encoding is
    sent, and it is not decoded) were refused as "not an image"; the message now names why. Same
    refusal, same failure kind in the report."""
    import gzip

    from laiontools.stages.download import failure_kind

    png = _png()
    packed = gzip.compress(png)
    with RawServer({"/204.png": b"HTTP/1.1 204 No Content\r\n\r\n",
                    "/0.png": b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n",
                    "/gz.png": b"HTTP/1.1 200 OK\r\nContent-Encoding: gzip\r\nContent-Length: %d\r\n\r\n" % len(packed) + packed,
                    "/junk.png": b"HTTP/1.1 200 OK\r\nContent-Length: 4\r\n\r\njunk"}) as raw:
        errs = {p: fetch_one(raw.url(p), 2, None, None, _policy(), resolver=lambda h, q: [PUBLIC])[1]
                for p in ("/204.png", "/0.png", "/gz.png", "/junk.png")}
    assert "(an empty body, HTTP 204)" in errs["/204.png"] and "(an empty body, HTTP 200)" in errs["/0.png"], errs
    assert "(the body is Content-Encoding: gzip, never asked for nor decoded)" in errs["/gz.png"], errs
    assert "(not an image, or a format PIL cannot parse)" in errs["/junk.png"], errs
    assert {failure_kind(e) for e in errs.values()} == {"unreadable_header"}


def test_port_zero_is_an_invalid_url_not_the_default_port():
    """http://host:0/x named port 0: normalizing dropped it, so the uid and the request were of
    http://host/x, on port 80 (a hostile-web walk). prepare now rejects it as invalid_url, and a redirect
    to port 0 is refused rather than followed to the default port."""
    from laiontools.contracts.uids import normalize_url
    from laiontools.web.policy import check_url

    pol = {"max_url_length": 2048, "allow_private_network": False, "allow_networks": [f"{PUBLIC}/32"]}
    for url in ("http://example.org:0/x", "https://example.org:0/x"):
        assert normalize_url(url) == url
        reason, msg = check_url(normalize_url(url), pol)
        assert reason == "invalid_url" and "port 0" in msg, msg
    assert normalize_url("http://example.org:80/x") == "http://example.org/x"  # the default port still goes
    png = _png()
    with RawServer({"/r.png": b"HTTP/1.1 302 Found\r\nLocation: http://h.example.org:0/ok.png\r\nContent-Length: 0\r\n\r\n",
                    "/ok.png": b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n" % len(png) + png}) as raw:
        _, err, _ = fetch_one(raw.url("/r.png"), 2, None, None, _policy(), resolver=lambda h, p: [PUBLIC])
        assert err.startswith("blocked: URL names port 0"), err
        assert raw.paths == ["/r.png"]


def test_a_refused_robots_txt_redirect_makes_robots_txt_unavailable_not_the_rows_blocked():
    """robots.txt redirecting to a non-global address, to another scheme or to a name that does not
    resolve: robots.txt is unavailable (cached briefly), not every row of the host 'blocked:' for
    robots_ttl (the image URL itself is allowed). Not transient: the next --retry-failed pass would
    meet the same refusal (it was retried on every pass). A refusal of the robots.txt URL itself — the
    image's own host — still carries the refusal."""
    from laiontools.web.fetch import ROBOTS_UNAVAILABLE, FetchError, HostGate, RobotsCache, is_transient

    def resolver(host: str, port: int) -> list[str]:
        if host == "gone.example.org":
            raise OSError("Name or service not known")
        return [PUBLIC]

    png = _png()
    for loc in (b"http://127.0.0.1/robots.txt", b"ftp://files.example.org/robots.txt", b"http://gone.example.org/r.txt"):
        with RawServer({"/robots.txt": b"HTTP/1.1 301 Moved\r\nLocation: " + loc + b"\r\nContent-Length: 0\r\n\r\n",
                        "/img.png": b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n" % len(png) + png}) as raw:
            _, err, _ = fetch_one(raw.url("/img.png"), 2, None, None, _policy(respect_robots=True), resolver=resolver,
                                  gate=HostGate(), robots=RobotsCache())
            assert err.startswith(ROBOTS_UNAVAILABLE) and not is_transient(err), (loc, err)
            assert raw.paths == ["/robots.txt"]
    robots = RobotsCache()
    with pytest.raises(FetchError, match="^blocked: host 127.0.0.1 is a non-global address"):
        robots.check("http://127.0.0.1:9/img.png", policy=_policy(respect_robots=True), timeout=2,
                     deadline=time.monotonic() + 5, resolver=resolver, gate=None)


def test_a_robots_txt_redirect_loop_allows_the_host_as_no_robots_txt():
    """robots.txt that redirects to itself for ever: no robots.txt is reached within five redirects, which
    RFC 9309 2.3.1.2 lets a crawler take as unavailable, hence (2.3.1.3, as a 4xx) everything allowed, as
    Google does. It failed every row of the host as 'robots.txt unavailable (too many redirects ...)',
    which --retry-failed never retried. The loop is followed max_redirects times, then cached."""
    from laiontools.web.fetch import HostGate, RobotsCache

    png = _png()
    with RawServer({"/robots.txt": b"HTTP/1.1 302 Found\r\nLocation: /robots.txt\r\nContent-Length: 0\r\n\r\n",
                    "/img.png": b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n" % len(png) + png}) as raw:
        robots, pol = RobotsCache(), _policy(respect_robots=True)
        for _ in range(2):
            _, err, _ = fetch_one(raw.url("/img.png"), 2, None, None, pol, resolver=lambda h, p: [PUBLIC],
                                  gate=HostGate(), robots=robots)
            assert err is None
        # one robots.txt request and max_redirects more, once for both images; each image fetched
        assert raw.paths == ["/robots.txt"] * (pol.max_redirects + 1) + ["/img.png"] * 2


# ----------------------------------------------------------------------------- per-host limits


def _parallel(urls: list[str], policy: FetchPolicy, gate) -> list[str | None]:
    from concurrent.futures import ThreadPoolExecutor

    with ThreadPoolExecutor(len(urls)) as ex:
        return [r[1] for r in ex.map(lambda u: fetch_one(u, 5, None, None, policy, gate=gate), urls)]


def test_max_host_concurrency_caps_requests_in_flight(fresh_host):
    from laiontools.web.fetch import HostGate

    urls = [f"{fresh_host.base_url}/slow/0.3/a.jpg?{i}" for i in range(8)]
    fresh_host.reset_counters()
    assert _parallel(urls, _pol3(respect_robots=False, max_host_concurrency=2), HostGate()) == [None] * 8
    assert fresh_host.max_in_flight == 2
    fresh_host.reset_counters()  # the same load without the cap does overlap more (the test can fail)
    assert _parallel(urls, _pol3(respect_robots=False), HostGate()) == [None] * 8
    assert fresh_host.max_in_flight > 2


def test_max_host_rps_spaces_request_starts(fresh_host):
    from laiontools.web.fetch import HostGate

    fresh_host.log_requests()
    fresh_host.reset_counters()
    t0 = time.monotonic()
    errs = _parallel([f"{fresh_host.base_url}/img/a.jpg?{i}" for i in range(8)],
                     _pol3(respect_robots=False, max_host_rps=10.0), HostGate())
    assert errs == [None] * 8
    times = sorted(t for t, _, _ in fresh_host.request_log)
    # start slots are reserved 0.1 s apart from t0 on; a request arrives at or after its slot (a slow
    # thread only arrives later), so the i-th arrival is no earlier than t0 + i * 0.1
    assert len(times) == 8
    assert all(t >= t0 + i * 0.1 - 1e-3 for i, t in enumerate(times)), [round(t - t0, 3) for t in times]


def test_a_429_pauses_the_host_for_every_thread(fresh_host):
    from laiontools.web.fetch import HostGate

    gate = HostGate()
    fresh_host.log_requests()
    fresh_host.reset_counters()
    pol = _pol3(respect_robots=False)
    _, err, ra = fetch_one(f"{fresh_host.base_url}/status/429/a.jpg", 3, None, None, pol, gate=gate)
    assert err.startswith("HTTP Error 429") and ra == 1.0
    # another caller (another thread of the executor) now waits for the Retry-After
    _, err, _ = fetch_one(f"{fresh_host.base_url}/img/a.jpg", 3, None, None, pol, gate=gate)
    assert err is None
    (t429, _, _), (t_ok, _, _) = fresh_host.request_log
    assert t_ok - t429 >= 0.95
    assert gate.stats()[fresh_host.host]["throttled"] == 1


# ----------------------------------------------------------------------------- blocklist


def test_blocklist_refuses_listed_content_and_redirect_targets(public, tmp_path):
    import hashlib

    from laiontools.web.blocklist import parse_blocklist

    body = Path(public.image_dir, "a.jpg").read_bytes()
    bl = tmp_path / "blocklist.txt"
    bl.write_text(f"# partners' list\n{hashlib.sha256(body).hexdigest()}\nbad.example.org\n")
    pol = _policy(blocklist=str(bl))
    _, err, _ = fetch_one(f"{public.base_url}/img/a.jpg", 3, None, None, pol)
    assert err == f"blocklisted: content sha256 {hashlib.sha256(body).hexdigest()} is on the blocklist"
    bl2 = tmp_path / "md5.txt"
    bl2.write_text(f"md5:{hashlib.md5(body).hexdigest()}\n")
    _, err, _ = fetch_one(f"{public.base_url}/img/a.jpg", 3, None, None, _policy(blocklist=str(bl2)))
    assert err.startswith("blocklisted: content md5")
    from urllib.parse import quote

    to = quote(f"http://cdn.bad.example.org:{_port(public)}/img/a.jpg", safe="")
    _, err, _ = fetch_one(f"{public.base_url}/redirect-to/{to}", 3, None, None, pol, resolver=lambda h, p: [PUBLIC])
    assert err == "blocklisted: domain bad.example.org is on the blocklist"
    b = parse_blocklist("https://Example.COM:443/x.jpg\n*.evil.net\n" + "a" * 64 + "\n" + "b" * 32)
    assert (len(b.urls), b.domains, len(b.sha256), len(b.md5)) == (1, {"evil.net"}, 1, 1)
    assert b.url_reason("https://example.com/x.jpg") == "URL is on the blocklist"
    assert b.url_reason("http://img.evil.net/a.jpg") == "domain evil.net is on the blocklist"
    assert b.url_reason("http://notevil.net/a.jpg") is None
    from laiontools.core.errors import InputError

    with pytest.raises(InputError, match="line 2"):
        parse_blocklist("ok.example.org\nnot a valid entry/at all\n", where="bl.txt")


def test_a_blocklist_that_cannot_be_read_is_named_without_its_password():
    """`--blocklist http://user:password@host/...` that an executor cannot read (the list server answers
    503, or fails the read after answering the existence check) or that holds a bad line: each row
    fails closed (no image request is sent), and its error_message, recorded in the catalog and the
    shard's stats, names the list without the password (it held the URL as typed)."""
    from laiontools.core.errors import InputError
    from laiontools.testing.net import answering
    from laiontools.web.blocklist import load_blocklist

    secret = "hunter2-s3cr3t"

    asked: list[str] = []

    def lists(path, headers):
        asked.append(path)
        body = (b"not a valid entry/at all\n" if path == "/bad.txt"
                else b"ok.example.org\n" if (path, asked.count(path)) == ("/flaky.txt", 1) else b"")
        return (200 if body else 404 if path == "/flaky.txt" else 503), {}, body

    png = _png()
    with answering(lists) as url:
        base = url.replace("http://", f"http://alice:{secret}@")
        with RawServer({"/a.png": b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n" % len(png) + png}) as raw:
            _, err, _ = _bounded(lambda: fetch_one(raw.url("/a.png"), 2, None, None, _policy(blocklist=f"{base}/down.txt"),
                                                   resolver=lambda h, p: [PUBLIC]))
            assert raw.paths == []  # failed closed: no image request without the list
        assert err.startswith("InputError: blocklist http://alice:***@127.0.0.1:"), err
        assert secret not in err
        with pytest.raises(InputError, match="line 1") as info:
            load_blocklist(f"{base}/bad.txt")
        assert secret not in str(info.value) and "alice:***@" in str(info.value)
        # there, then failing its read: the store's own error quoted the URL as typed
        with pytest.raises(InputError, match="cannot be read") as info:
            load_blocklist(f"{base}/flaky.txt")
        assert secret not in str(info.value) and "alice:***@" in str(info.value)


def test_blocklist_compares_hosts_as_the_connection_reaches_them(public, private, tmp_path):
    """Entries 'localhost' and '127.0.0.1' (and a URL entry spelled with fullwidth letters) refuse the
    fullwidth, numeric, IDNA and trailing-dot spellings of those hosts, in a row and on a redirect
    hop; the private server sees no request. Without the blocklist the same URLs do reach it."""
    from urllib.parse import quote

    from laiontools.web.blocklist import parse_blocklist

    p = _port(private)
    bl = tmp_path / "blocklist.txt"
    bl.write_text(f"LOCALHOST\n0x7f000001\nhttp://ｉｍａｇｅｓ.example.org:{p}/img/a.jpg\n")
    allow_lo = (f"{PUBLIC}/32", "127.0.0.1/32")  # only the blocklist stands between the rows and loopback
    resolver = lambda h, port: ["127.0.0.1"]
    spellings = [f"http://ｌｏｃａｌｈｏｓｔ:{p}/img/a.jpg", f"http://localhost.:{p}/img/a.jpg",
                 f"http://0x7f000001:{p}/img/a.jpg", f"http://2130706433:{p}/img/a.jpg", f"http://127.1:{p}/img/a.jpg",
                 f"http://[::ffff:127.0.0.1]:{p}/img/a.jpg"]
    before = private.requests_served
    for url in spellings:
        _, err, _ = fetch_one(url, 2, None, None, _policy(allow_networks=allow_lo, blocklist=str(bl)), resolver=resolver)
        assert err is not None and err.startswith("blocklisted: domain "), (url, err)
        if not url.isascii():
            continue  # a Location header is latin-1: a redirect spells its host in ASCII
        _, err, _ = fetch_one(f"{public.base_url}/redirect-to/{quote(url, safe='')}", 2, None, None,
                              _policy(allow_networks=allow_lo, blocklist=str(bl)), resolver=resolver)
        assert err is not None and err.startswith("blocklisted: domain "), (url, err)
    _, err, _ = fetch_one(f"http://images.example.org:{p}/img/a.jpg", 2, None, None,
                          _policy(allow_networks=allow_lo, blocklist=str(bl)), resolver=resolver)
    assert err == "blocklisted: URL is on the blocklist"
    assert private.requests_served == before
    _, err, _ = fetch_one(spellings[2], 2, None, None, _policy(allow_networks=allow_lo), resolver=resolver)
    assert err is None and private.requests_served == before + 1  # the control: reachable without the list
    b = parse_blocklist("Bücher.de\n")
    assert b.url_reason("http://XN--BCHER-KVA.DE./a.jpg") == "domain xn--bcher-kva.de is on the blocklist"
    assert b.url_reason("http://img.ｂüｃｈｅｒ.de/a.jpg") == "domain xn--bcher-kva.de is on the blocklist"


def test_waiting_for_a_host_slot_does_not_spend_the_request_deadline(fresh_host):
    """6 requests at 2 per second take ~2.5 s of waiting; each request's own 1 s deadline starts
    when its slot comes, so none fails. Only the shard deadline bounds the wait."""
    from laiontools.web.fetch import HostGate

    pol = _pol3(respect_robots=False, max_host_rps=2.0, request_deadline=1.0)
    assert _parallel([f"{fresh_host.base_url}/img/a.jpg?w{i}" for i in range(6)], pol, HostGate()) == [None] * 6
    # with a shard deadline 1 s away, the rows whose slots come later end 'deadline' without a request
    from concurrent.futures import ThreadPoolExecutor

    at = time.monotonic() + 1.0  # fetch_with_retry uses the executor gate (HOSTS), as in a shard
    fresh_host.log_requests()
    fresh_host.reset_counters()
    with ThreadPoolExecutor(6) as ex:
        errs = list(ex.map(lambda i: fetch_with_retry((i, f"{fresh_host.base_url}/img/a.jpg?s{i}"), 3, 0, None, None,
                                                      policy=pol, shard_deadline_at=at)[2], range(6)))
    ok = [e for e in errs if e is None]
    late = [e for e in errs if e is not None]
    assert 1 <= len(ok) <= 3 and len(ok) + len(late) == 6, errs
    assert all(e.startswith("deadline: shard deadline passed waiting for a slot") for e in late), late
    assert len(fresh_host.request_log) == len(ok)


# ----------------------------------------------------------------------------- Crawl-delay


def test_crawl_delay_parser_takes_the_group_of_our_token_and_decimals():
    from laiontools.web.fetch import crawl_delay

    lines = ["User-agent: *", "Crawl-delay: 0.25", "Disallow: /x", "", "User-agent: LaionBot",
             "User-agent: other", "Crawl-delay: 3  # ours", "", "User-agent: bad", "Crawl-delay: soon"]
    assert crawl_delay(lines, "*") == 0.25
    assert crawl_delay(lines, "laionbot") == 3.0
    assert crawl_delay(lines, "somebot") == 0.25  # no group of its own: the * group
    assert crawl_delay(lines, "bad") is None  # its group has an unreadable value: no delay, not the * one
    assert crawl_delay(["User-agent: *", "Disallow: /"], "*") is None


def test_crawl_delay_spaces_every_request_to_the_host(fresh_host):
    """robots.txt asks for 0.3 s between requests; the user's limit (10 rps = 0.1 s) is looser, so
    the crawl delay wins: although 5 threads ask at once, the server sees the i-th request (robots.txt
    is the 0th) no earlier than t0 + i * 0.3. (Start slots are reserved 0.3 s apart from the robots.txt
    request on and a request reaches the server at or after its slot; gaps between *arrivals* can be
    shorter when one request is delayed on its way, so they are not what is asserted. With the 10 rps
    limit alone the 5th image could arrive at t0 + 0.5.)"""
    from laiontools.web.fetch import HostGate, RobotsCache

    fresh_host.set_robots("User-agent: *\nCrawl-delay: 0.3\nDisallow: /private/\n")
    fresh_host.log_requests()
    fresh_host.reset_counters()
    gate, robots = HostGate(), RobotsCache()
    pol = _pol3(max_host_rps=10.0)
    from concurrent.futures import ThreadPoolExecutor

    t0 = time.monotonic()
    with ThreadPoolExecutor(5) as ex:
        errs = list(ex.map(lambda i: fetch_one(f"{fresh_host.base_url}/img/a.jpg?c{i}", 5, None, None, pol,
                                               gate=gate, robots=robots)[1], range(5)))
    assert errs == [None] * 5
    times = sorted(t for t, _, _ in fresh_host.request_log)
    assert len(times) == 6  # robots.txt once, then the 5 images
    assert all(t >= t0 + i * 0.3 - 1e-3 for i, t in enumerate(times)), [round(t - t0, 3) for t in times]
    assert gate.interval(fresh_host.host, 10.0) == 0.3
    assert gate.interval(fresh_host.host, 1.0) == 1.0  # a stricter user limit wins over the crawl delay


def test_a_crawl_delay_over_the_limit_skips_the_host_without_a_request(fresh_host):
    """A robots.txt asking `Crawl-delay: 99999` held the shard until its deadline (30 min by default) for
    one image per delay, and every --retry-failed pass again (found by a hostile-web walk). Over
    max_crawl_delay the host's rows now fail at once, naming the delay, permanent, and the server sees the
    robots.txt request only; with no limit (None) the delay is kept, as asked."""
    from laiontools.web.fetch import HostGate, RobotsCache, is_transient

    fresh_host.set_robots("User-agent: *\nCrawl-delay: 99999\n")
    fresh_host.log_requests()
    fresh_host.reset_counters()
    gate, robots = HostGate(), RobotsCache()
    pol = _pol3(max_crawl_delay=30.0)
    errs = [fetch_one(f"{fresh_host.base_url}/img/a.jpg?c{i}", 5, None, None, pol, gate=gate, robots=robots)[1]
            for i in range(3)]
    want = ("robots.txt asks a Crawl-delay of 99999 s between requests, over --max-crawl-delay 30 s; the host "
            "is skipped (raise --max-crawl-delay to wait for it)")
    assert errs == [want] * 3 and not is_transient(want)
    from laiontools.stages.download import failure_kind

    assert failure_kind(want) == "robots_crawl_delay"  # its own line in the download report
    assert [p for _, _, p in fresh_host.request_log] == ["/robots.txt"]
    assert gate.interval(fresh_host.host, None) == 0.0  # no delay was set for the host
    # no limit: the delay is the host's interval (checked on the gate, without waiting for it)
    robots.check(f"{fresh_host.base_url}/img/a.jpg", policy=_pol3(max_crawl_delay=None), timeout=5, deadline=10,
                 resolver=None, gate=gate)
    assert gate.interval(fresh_host.host, None) == 99999.0


# ----------------------------------------------------------------------------- the shard's row scheduler


def test_scheduler_starts_an_idle_hosts_rows_instead_of_waiting_on_a_busy_one(images):
    """4 rows of host A, then 4 of host B, 2 threads, 1 request per second per host. Threads taking
    rows in order would both wait on A; the scheduler gives the second thread B's first row, so B is
    served while A waits for its next slot — and each host still gets one request start a second at most."""
    from concurrent.futures import ThreadPoolExecutor

    from laiontools.web.fetch import HostGate, HostScheduler

    with SyntheticWebServer(images, host="127.0.0.3") as a, SyntheticWebServer(images, host="127.0.0.4") as b:
        for s in (a, b):
            s.log_requests()
        rows = [(k, f"{a.base_url}/img/a.jpg?k={k}") for k in range(4)] + \
               [(k, f"{b.base_url}/img/a.jpg?k={k}") for k in range(4, 8)]
        pol = FetchPolicy(allow_networks=("127.0.0.3/32", "127.0.0.4/32"), request_deadline=10, respect_robots=False,
                          max_host_rps=1.0)
        gate = HostGate()
        sched = HostScheduler(rows, gate, pol.max_host_rps, pol.max_host_concurrency)
        t0 = time.monotonic()
        with ThreadPoolExecutor(2) as ex:
            res = list(ex.map(lambda _t: fetch_with_retry((-1, "ticket"), 5, 0, None, None, policy=pol,
                                                          scheduler=sched), range(8)))
        assert sorted(k for k, _, _ in res) == list(range(8)) and all(e is None for _, _, e in res)
        with pytest.raises(LookupError):
            sched.take()  # every row was handed out once
        la = [(t, p) for t, _, p in a.request_log]
        lb = [(t, p) for t, _, p in b.request_log]
    # every row fetched exactly once, under its own key
    assert sorted(p for _, p in la + lb) == sorted(f"/img/a.jpg?k={k}" for k in range(8))
    assert lb[0][0] < la[1][0]  # B's first row did not wait behind A's rate slots
    for log in (la, lb):  # the i-th request to a host arrives no earlier than its slot, t0 + i s (1 rps)
        assert all(t >= t0 + i * 1.0 - 1e-3 for i, (t, _) in enumerate(log)), [round(t - t0, 3) for t, _ in log]


def test_host_shares_divide_one_executors_limits_at_that_host_only():
    """download.host_shares: a host fetched by d times more tasks than the bound allows keeps 1/d of
    the per-executor limits, in the gate (rate spacing, concurrency) and in the scheduler (rows in
    flight); other hosts keep theirs; the next shard's shares replace the last ones."""
    from laiontools.web.fetch import HostGate, HostScheduler

    gate = HostGate()
    gate.set_shares({"big.example.org": 3, "one.example.org": 1})
    assert gate.limits("big.example.org", 12.0, 6) == (4.0, 2)
    assert gate.limits("big.example.org", 12.0, 2) == (4.0, 1)  # a task keeps one request in flight
    assert gate.limits("small.example.org", 12.0, 6) == (12.0, 6)
    assert gate.limits("one.example.org", 12.0, 6) == (12.0, 6)
    assert gate.interval("big.example.org", 12.0) == pytest.approx(0.25)
    assert gate.interval("small.example.org", 12.0) == pytest.approx(1 / 12)
    rows = [(k, f"http://big.example.org/{k}.jpg") for k in range(6)] + [(k, f"http://small.example.org/{k}.jpg")
                                                                        for k in range(6, 12)]
    sched = HostScheduler(rows, gate, None, 6)  # concurrency only: no waiting for rate slots
    taken = [sched.take()[1].split("/")[2] for _ in range(8)]  # none done: big stops at 6 // 3 = 2 in flight
    assert taken.count("big.example.org") == 2 and taken.count("small.example.org") == 6
    sched.done(0)
    assert sched.take()[1].split("/")[2] == "big.example.org"  # a freed slot: the next big row
    gate.set_shares({})
    assert gate.limits("big.example.org", 12.0, 6) == (12.0, 6)


def test_download_host_shares_arithmetic(tmp_path):
    from laiontools.stages.download import DownloadConfig, host_shares

    cfg = DownloadConfig(input="x", output=str(tmp_path), max_host_shards=4)
    stats = {"host_layout": {"hosts_over_bound": {"a.org": 40, "b.org": 6, "c.org": 5}}}
    # d = ceil(min(m, tasks at once) / H)
    assert host_shares(stats, cfg, 100) == (("a.org", 10), ("b.org", 2), ("c.org", 2))
    assert host_shares(stats, cfg, 8) == (("a.org", 2), ("b.org", 2), ("c.org", 2))
    assert host_shares(stats, cfg, 4) == ()  # 4 tasks at once never exceed the bound of 4
    assert host_shares({"host_layout": {"bounded": False}}, cfg, 100) == ()


def test_scheduler_hands_out_the_rest_at_once_after_the_shard_deadline():
    from laiontools.web.fetch import HostGate, HostScheduler

    rows = [(k, f"http://h{k % 2}.example.org/{k}.jpg") for k in range(6)]
    sched = HostScheduler(rows, HostGate(), 0.001, 1, deadline=time.monotonic() - 1)  # one start per 1000 s
    assert sorted(sched.take()[0] for _ in range(6)) == list(range(6))  # no wait for the hosts' slots
    # before the deadline the same limits allow only the first row of each host without waiting
    sched = HostScheduler(rows, HostGate(), 0.001, 1, deadline=time.monotonic() + 60)
    first = {sched.take()[1].split("/")[2] for _ in range(2)}
    assert first == {"h0.example.org", "h1.example.org"}
    # with the deadline passed on the shard, fetch_with_retry ends the row 'deadline:' without a request
    past = time.monotonic() - 1
    sched = HostScheduler(rows[:1], HostGate(), None, None, deadline=past)
    key, data, err = fetch_with_retry((-1, "ticket"), 3, 0, None, None, policy=_policy(shard_deadline=1.0),
                                      shard_deadline_at=past, scheduler=sched)
    assert (key, data) == (0, None) and err.startswith(DEADLINE_PREFIX)


def test_a_status_line_that_is_not_one_is_shown_short_and_cannot_claim_to_be_transient():
    """http.client quotes a bad status line (server bytes, up to 64 KiB) in its exception: it goes into
    error_message as a short repr after SERVER_SENT, without control characters, and what it says
    ("timed out") does not make the failure transient; http.client's own RemoteDisconnected still is."""
    from laiontools.web.fetch import MAX_REASON_CHARS, SERVER_SENT, _exception_message, is_transient

    line = b"SPAM timed out, Connection reset \x1b[31m" + b"y" * 20000 + b"\r\n\r\n"
    with RawServer({"/bad.jpg": line}) as raw:
        pol = _policy(backoff_base=0.01)
        _, _, err = fetch_with_retry((0, raw.url("/bad.jpg")), 2, 3, None, None, policy=pol, resolver=lambda h, p: [PUBLIC])
        assert err.startswith("BadStatusLine" + SERVER_SENT + "'SPAM timed out, Connection reset [31myyy"), err
        assert len(err) < MAX_REASON_CHARS + 60 and "\x1b" not in err
        assert not is_transient(err) and raw.paths.count("/bad.jpg") == 1  # not retried
    import http.client

    gone = _exception_message(http.client.RemoteDisconnected("Remote end closed connection without response"))
    assert is_transient(gone) and SERVER_SENT not in gone
    assert len(_exception_message(ValueError("z" * 100_000))) < 520


def test_a_host_name_idna_cannot_encode_is_a_cached_dns_failure():
    """A label that is empty ("a..b") or over 63 characters: getaddrinfo raises UnicodeError (IDNA),
    not OSError. It is a `DNS:` failure of the row, counted and cached like any failed lookup (it was
    a bare UnicodeError, looked up again for every row of the host). No name server is asked."""
    from laiontools.web.fetch import DnsCache

    dns = DnsCache(resolve=lambda h, p: [ai[4][0] for ai in socket.getaddrinfo(h, p)])
    pol = _policy()
    for host in ("a..example.org", "x" * 70 + ".example.org"):
        for _ in range(2):
            _, err, _ = fetch_one(f"http://{host}/img.jpg", 2, None, None, pol, resolver=dns)
            assert err.startswith(f"DNS: host {host} does not resolve (not a valid host name"), err
    assert dns.lookups == 2 and dns.failures == 2


def test_a_full_disk_writing_a_sample_stops_the_shard_instead_of_failing_the_sample():
    """img2dataset catches every Exception around a sample's write and records the sample as failed to
    download: on a full disk a shard ended with its rows "failed" ([Errno 28]) and the stage with exit 0
    (tests/faults/test_disk_full.py::test_download_disk_full, when the disk filled during a sample's
    write). The download's writer lets a fault of the machine pass that catch; any other error of one
    sample stays that sample's."""
    import errno as errno_

    from laiontools.web.fetch import _machine_faults_pass, _MachineFault

    def writer(err: OSError) -> Any:
        class W:
            def write(self, *args: Any) -> None:
                raise err

        return _machine_faults_pass(W)()

    for code in (errno_.ENOSPC, errno_.EDQUOT, errno_.EROFS):
        per_sample = []
        with pytest.raises(_MachineFault) as fault:
            try:  # img2dataset's per-sample catch
                writer(OSError(code, os.strerror(code))).write("img", "key")
            except Exception as e:  # noqa: BLE001
                per_sample.append(e)
        assert not per_sample and fault.value.error.errno == code
    per_sample = []
    try:
        writer(OSError(errno_.EIO, "I/O error")).write("img", "key")
    except Exception as e:  # noqa: BLE001
        per_sample.append(e)
    assert [getattr(e, "errno", None) for e in per_sample] == [errno_.EIO]


def test_a_blocklisted_url_is_refused_however_its_userinfo_or_path_is_spelled(public, tmp_path):
    """A URL entry must refuse every spelling that sends the listed request: http.client never sends
    userinfo (user@ reaches the same Host and path), and a server reads /img/%61.jpg and /img/./a.jpg as
    /img/a.jpg (RFC 3986 6.2.2: percent-encoded unreserved characters and dot segments). Checked in a row,
    on a redirect hop, and as prepare checks a row."""
    from urllib.parse import quote

    from laiontools.web.blocklist import parse_blocklist

    p = _port(public)
    listed = f"http://images.example.org:{p}/img/a.jpg"
    bl = tmp_path / "blocklist.txt"
    bl.write_text(listed + "\n")
    pol, res = _policy(blocklist=str(bl)), (lambda h, port: [PUBLIC])
    _, err, _ = fetch_one(listed, 3, None, None, pol, resolver=res)
    assert err == "blocklisted: URL is on the blocklist"
    public.log_requests()
    n = len(public.request_log)
    for url in (f"http://anyone@images.example.org:{p}/img/a.jpg", f"http://u:pw@images.example.org:{p}/img/a.jpg"):
        data, err, _ = fetch_one(url, 3, None, None, pol, resolver=res)
        assert data is None and err == "blocklisted: URL is on the blocklist", (url, err)
        data, err, _ = fetch_one(f"{public.base_url}/redirect-to/{quote(url, safe='')}", 3, None, None, pol, resolver=res)
        assert data is None and err == "blocklisted: URL is on the blocklist", (url, err)
    assert [(h, path) for _, h, path in public.request_log[n:] if path == "/img/a.jpg"] == []
    b = parse_blocklist(listed + "\n")
    for url in (f"http://x@images.example.org:{p}/img/a.jpg", f"http://images.example.org:{p}/img/%61.jpg",
                f"http://images.example.org:{p}/img/./a.jpg", f"http://images.example.org:{p}/x/../img/a.jpg"):
        assert b.url_reason(url) == "URL is on the blocklist", url


def test_a_slow_name_server_cannot_hold_a_request_past_its_deadline():
    """getaddrinfo has no timeout of ours: a host's name server that answers late (or only after the
    system resolver's retries, 5 s x 2 attempts x each nameserver by default) held the row that long,
    past its request deadline and past the shard deadline, where the watchdog cannot reach (no socket).
    The resolver hook stands for getaddrinfo meeting such a name server."""
    def slow(host: str, port: int) -> list[str]:
        time.sleep(4.0)
        return [PUBLIC]

    t0 = time.monotonic()
    _, err, _ = _bounded(lambda: fetch_one("http://slow-ns.example.org/img/a.jpg", 2, None, None,
                                           _policy(request_deadline=1.0), resolver=slow))
    took = time.monotonic() - t0
    assert err is not None and err.startswith(DEADLINE_PREFIX), err
    assert took < 2.5, f"the request took {took:.1f} s against a 1 s deadline: DNS is outside the deadline"


# ----------------------------------------------------------------------------- review: robots.txt, opt-outs, error rows


def _robots_host(robots_txt: bytes, paths: list[str]) -> RawServer:
    """A RawServer serving `robots_txt` (200) and a PNG at each of `paths`."""
    png = _png()
    ok = b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n" % len(png) + png
    return RawServer({"/robots.txt": b"HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\nContent-Length: %d\r\n\r\n"
                      % len(robots_txt) + robots_txt, **dict.fromkeys(paths, ok)})


@pytest.mark.parametrize(("robots_txt", "allowed", "disallowed"), [
    # RFC 9309 2.2.2: the most specific (longest) matching rule wins, whatever the order; Allow wins a tie
    (b"User-agent: *\nDisallow: /\nAllow: /img/\n", ["/img/a.png"], ["/other/a.png"]),
    (b"User-agent: *\nDisallow: /img/\nAllow: /img/public/\n", ["/img/public/a.png"], ["/img/a.png"]),
    # RFC 9309 2.2.3: "*" matches any characters, "$" the end of the path
    (b"User-agent: *\nDisallow: /*.png$\n", ["/a.png?x=1"], ["/a.png", "/deep/er/b.png"]),
    (b"User-agent: *\nDisallow: /private*/\n", ["/public/a.png"], ["/private1/a.png"]),
    # a UTF-8 byte order mark (as Windows editors save the file) does not hide the first group
    (b"\xef\xbb\xbfUser-agent: *\nDisallow: /\n", [], ["/a.png"]),
    # RFC 9309 2.2.1: groups naming the same agent are combined
    (b"User-agent: *\nDisallow: /a/\n\nUser-agent: *\nDisallow: /b/\n", ["/c/x.png"], ["/a/x.png", "/b/x.png"]),
])
def test_robots_txt_rules_are_matched_as_rfc_9309_says(robots_txt, allowed, disallowed):
    """robots.txt was parsed by urllib.robotparser, which predates RFC 9309: the first matching rule won
    (an Allow exception after a broader Disallow was never seen), "*" and "$" were matched literally (a
    site's "Disallow: /*.png$" let every PNG through), a byte order mark hid the first group (all
    allowed) and only the first "*" group counted."""
    from laiontools.web.fetch import ROBOTS_DISALLOWS, HostGate, RobotsCache

    with _robots_host(robots_txt, allowed + disallowed) as raw:
        robots = RobotsCache()
        for path in allowed + disallowed:
            _, err, _ = fetch_one(raw.url(path), 2, None, None, _policy(respect_robots=True), resolver=lambda h, p: [PUBLIC],
                                  gate=HostGate(), robots=robots)
            if path in allowed:
                assert err is None, (path, err)
            else:
                assert err is not None and err.startswith(ROBOTS_DISALLOWS), (path, err)
        assert robots.fetches == 1 and not set(disallowed) & set(raw.paths)


def test_robots_txt_cut_at_its_size_limit_does_not_keep_a_cut_rule():
    """robots.txt is read up to 512 KiB (RFC 9309's 500 KiB); the rest is ignored. The cut fell inside a
    line and the line's head was kept as a rule: "Disallow: /private/..." cut after "Disallow: /" became
    a Disallow of the whole site."""
    from laiontools.web.fetch import HostGate, RobotsCache

    head = b"User-agent: *\nDisallow: /private/\n"
    pad = b"# " + b"x" * 1000 + b"\n"
    cut_at = RobotsCache.MAX_BYTES - len(b"Disallow: /")  # where the last line starts: the cut falls after "Disallow: /"
    body = head + pad * ((cut_at - len(head)) // len(pad) - 1)
    body += b"#" * (cut_at - len(body) - 1) + b"\n"
    body += b"Disallow: /private/cut/here/\n" + pad * 10
    assert body[:RobotsCache.MAX_BYTES].endswith(b"\nDisallow: /")
    with _robots_host(body, ["/img/a.png"]) as raw:
        _, err, _ = fetch_one(raw.url("/img/a.png"), 2, None, None, _policy(respect_robots=True),
                              resolver=lambda h, p: [PUBLIC], gate=HostGate(), robots=RobotsCache())
    assert err is None, err


def test_a_url_or_host_naming_a_timeout_does_not_make_a_permanent_refusal_transient():
    """is_transient read the whole error message, and a permanent refusal quotes the URL's path or host:
    a robots.txt refusal of /img/timeout.png (or a host timeout.example.org that does not resolve) was
    "transient", retried with backoff in the shard and again by every --retry-failed pass."""
    from laiontools.web.fetch import ROBOTS_DISALLOWS, is_transient

    with _robots_host(b"User-agent: *\nDisallow: /img/\n", []) as raw:
        t0 = time.monotonic()
        _, data, err = fetch_with_retry((0, raw.url("/img/timeout.png")), 2, 2, None, None,
                                        policy=_policy(respect_robots=True), resolver=lambda h, p: [PUBLIC])
        took = time.monotonic() - t0
    assert data is None and err.startswith(ROBOTS_DISALLOWS), err
    assert not is_transient(err), err
    assert took < 0.5, f"a permanent refusal was retried in the shard ({took:.1f} s of backoff)"

    def nxdomain(host: str, port: int) -> list[str]:
        raise socket.gaierror(-2, "Name or service not known")

    _, err, _ = fetch_one("http://timeout.example.org/a.png", 2, None, None, _policy(), resolver=nxdomain)
    assert err.startswith("DNS: host timeout.example.org does not resolve") and not is_transient(err), err

    def tempfail(host: str, port: int) -> list[str]:
        raise socket.gaierror(-3, "Temporary failure in name resolution")

    _, err, _ = fetch_one("http://a.example.org/a.png", 2, None, None, _policy(), resolver=tempfail)
    assert is_transient(err), err  # (the cause itself still decides)


def test_the_report_counts_robots_txt_and_tls_failures_under_their_own_kind(fresh_host, images, tls_cert):
    """failure_kind matched "HTTP Error <code>" anywhere and "image" in any message: a host whose
    robots.txt answered 503 (no image request was sent) had its rows counted as http_503, one whose
    robots.txt answered 429 in the report's "HTTP 429" watch, and a TLS rejection of images.example.org
    as an image_error."""
    from laiontools.stages.download import failure_kind
    from laiontools.web.fetch import HostGate, RobotsCache

    b = fresh_host.base_url
    for status in (503, 429):
        fresh_host.set_robots("User-agent: *\nDisallow:\n", status=status)
        _, err, _ = fetch_one(f"{b}/img/a.jpg", 3, None, None, _pol3(), robots=RobotsCache(), gate=HostGate())
        assert failure_kind(err) == "robots_unavailable", (failure_kind(err), err)
    cert, key = tls_cert
    with SyntheticWebServer(images, host=PUBLIC, tls=(cert, key)) as tls:
        _, err, _ = fetch_one(f"https://images.example.org:{_port(tls)}/img/a.jpg", 3, None, None, _policy(),
                              resolver=lambda h, p: [PUBLIC])
    assert err.startswith("TLS certificate of images.example.org rejected"), err
    assert failure_kind(err) == "tls_rejected", (failure_kind(err), err)


@pytest.mark.parametrize("header", [
    b"noindex, max-snippet:-1",  # a directive with a value after an opt-out (Google's documented syntax)
    b"max-image-preview:large, noimageai",
    b"noai, unavailable_after: 2030-01-01",
    b"none",  # "none" is noindex, nofollow
])
def test_x_robots_tag_opt_outs_are_read_whatever_else_the_header_holds(header):
    """The X-Robots-Tag check (img2dataset's is_disallowed) took everything before the header's first
    ":" as a user-agent token: "noindex, max-snippet:-1" was read as directives for a robot named
    "noindex, max-snippet", and the opt-out was ignored; "none" (noindex + nofollow) was not an opt-out."""
    png = _png()
    route = b"HTTP/1.1 200 OK\r\nX-Robots-Tag: " + header + b"\r\nContent-Length: %d\r\n\r\n" % len(png) + png
    directives = {"noai", "noimageai", "noindex", "noimageindex"}
    with RawServer({"/a.png": route}) as raw:
        data, err, _ = fetch_one(raw.url("/a.png"), 2, "laionbot", directives, _policy(), resolver=lambda h, p: [PUBLIC])
    assert data is None and err == "Use of image disallowed by X-Robots-Tag directive", (header, err)
    # and a header for another robot, or without an opt-out, is not one
    for other in (b"otherbot: noai", b"max-image-preview:large, max-snippet:-1", b"nofollow"):
        route = b"HTTP/1.1 200 OK\r\nX-Robots-Tag: " + other + b"\r\nContent-Length: %d\r\n\r\n" % len(png) + png
        with RawServer({"/a.png": route}) as raw:
            _, err, _ = fetch_one(raw.url("/a.png"), 2, "laionbot", directives, _policy(), resolver=lambda h, p: [PUBLIC])
        assert err is None, (other, err)


def test_the_per_host_request_count_leaves_out_rows_that_sent_no_request():
    """The executor counters (the report's hosts.executors.requests) counted a request for each row that
    took a host slot: with no per-host limit set (the default) a row refused "host throttled" (no request
    sent) was counted as one, so the report's requests to a throttled host grew with its skipped rows."""
    from laiontools.web.fetch import HostGate

    slow = b"HTTP/1.1 429 Too Many Requests\r\nRetry-After: 99999\r\nContent-Length: 0\r\n\r\n"
    for limits in ({}, {"max_host_concurrency": 4}):
        gate = HostGate()
        pol = _policy(max_host_backoff=1.0, max_host_pause=1.5, **limits)
        with RawServer({f"/t{k}.png": slow for k in range(4)}) as raw:
            errs = [fetch_one(raw.url(f"/t{k}.png"), 2, None, None, pol, resolver=lambda h, p: [PUBLIC], gate=gate)[1]
                    for k in range(4)]
        assert [e.split(":")[0] for e in errs] == ["HTTP Error 429"] * 2 + ["host throttled"] * 2, errs
        assert gate.stats()["h.example.org"] == {"requests": len(raw.paths), "throttled": 2}, (limits, raw.paths)
