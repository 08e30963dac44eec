"""A real threaded HTTP server on 127.0.0.1 that serves synthetic images and fails the ways the web fails.

Routes (``<file>`` is a bare file name inside the served folder; anything else is a 404):

=========================  ===================================================================
``/img/<file>``            200 image/jpeg, bytes cached in memory after the first read
``/status/<code>/<file>``  that status (4xx/5xx); 429 and 503 carry ``Retry-After: 1``
``/flaky/<k>/<file>``      the first k requests for this exact path get 503, later ones 200
``/slow/<s>/<file>``       sleeps s seconds (small steps, capped, aborted by stop()) then 200
``/redirect/<file>``       302 to ``/img/<file>``
``/html/<file>``           200 text/html page (not an image)
``/corrupt/<file>``        200 image/jpeg: the file's first 200 bytes then seeded garbage
``/truncated/<file>``      200 image/jpeg: the first 30% of the file
``/noai/<file>``           200 image with ``X-Robots-Tag: noai``
``/noimageai/<file>``      200 image with ``X-Robots-Tag: noimageai``
``/huge/<file>``           200 image/png whose IHDR declares 60000x60000 pixels (a ~100-byte file)
``/drip/<s>/<file>``       200 image with its full Content-Length, then one byte every s seconds
                           (a straggler: every recv succeeds, the response never ends in time)
``/tdm/<file>``            200 image with ``tdm-reservation: 1`` (TDM Reservation Protocol opt-out)
``/headerless/<file>``     200 image/jpeg: the file without its first 20 bytes (no header to read a size from)
``/redirect-to/<url>``     302 to the percent-decoded <url> (any host: a redirect off the allow-list)
``/nolength/<file>``       200 image with no Content-Length: the body ends when the connection closes
``/robots.txt``            the server's ``robots_txt`` (404 when None), counted in ``robots_requests``
=========================  ===================================================================

Files are read at request time, so the server may be started over an empty folder before the
images are written (URLs in the metadata need the port).
"""

from __future__ import annotations

import hashlib
import logging
import os
import struct
import sys
import threading
import time
import zlib
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any, Self

log = logging.getLogger(__name__)

HUGE_SIDE = 60_000
SLOW_MAX_SECONDS = 300.0  # a /slow/ request never holds a thread longer than this
_SLEEP_STEP = 0.05
TRUNCATE_FRACTION = 0.3


def _png_chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)


def huge_png(side: int = HUGE_SIDE) -> bytes:
    """A valid-looking PNG (signature, IHDR with correct CRC, tiny IDAT, IEND) declaring side x side RGB.

    The IDAT holds only the first scanline's worth of a compressed stream start, so the file is a
    few dozen bytes; a decoder that trusts the header would try to allocate side*side*3 bytes
    (10.8 GB for 60000) and must refuse instead.
    """
    ihdr = struct.pack(">IIBBBBB", side, side, 8, 2, 0, 0, 0)
    idat = zlib.compress(b"\x00" * 64)
    return b"\x89PNG\r\n\x1a\n" + _png_chunk(b"IHDR", ihdr) + _png_chunk(b"IDAT", idat) + _png_chunk(b"IEND", b"")


_HUGE_PNG = huge_png()
_HTML = (b"<!doctype html><html><head><title>Not an image</title></head>"
         b"<body><h1>Welcome</h1><p>This page is HTML, not an image.</p></body></html>\n")


def _jpeg_headers_before_tables(data: bytes) -> bytes | None:
    """The whole segments of a JPEG before its first Huffman table or scan (SOI, APPn, DQT, SOF),
    None if `data` does not start like a JPEG."""
    if not data.startswith(b"\xff\xd8"):
        return None
    pos = 2
    while pos + 4 <= len(data) and data[pos] == 0xFF and data[pos + 1] not in (0xC4, 0xDA):
        pos += 2 + int.from_bytes(data[pos + 2:pos + 4], "big")
    return data[:min(pos, len(data))]


def _garbage(name: str, data: bytes) -> bytes:
    """A JPEG's headers up to its Huffman tables, a marker no reader knows (FF 02), then
    deterministic garbage, as long as the real file: no header parser can read a size from it (so
    the fetch's fail-closed pixel check refuses it) and no decoder can decode it. Non-JPEG files:
    the first 200 bytes of the file, then garbage."""
    head = _jpeg_headers_before_tables(data)
    keep = head + b"\xff\x02" if head is not None else data[: min(200, len(data) // 4)]
    out = bytearray(keep)
    h = hashlib.sha256(name.encode()).digest()
    while len(out) < len(data):
        h = hashlib.sha256(h).digest()
        out += h
    return bytes(out[: len(data)])


class _Server(ThreadingHTTPServer):
    daemon_threads = True  # a stuck client never keeps the process alive
    allow_reuse_address = True
    request_queue_size = 128  # benchmarks open many connections at once

    def __init__(self, addr: tuple[str, int], image_dir: str) -> None:
        super().__init__(addr, _Handler)
        self.image_dir = os.path.abspath(image_dir)
        self.stopping = threading.Event()
        self.cache: dict[str, bytes] = {}
        self.flaky_counts: dict[str, int] = {}
        self.lock = threading.Lock()
        self.requests = 0
        self.robots_txt: str | None = None  # what /robots.txt serves (None: 404)
        self.robots_status = 200
        self.robots_requests = 0
        self.request_log: list[tuple[float, str, str]] = []  # (time.monotonic(), Host header, path) when logging
        self.log_requests = False
        self.in_flight = 0
        self.max_in_flight = 0  # most requests handled at once since start (or reset_counters)

    def handle_error(self, request: Any, client_address: Any) -> None:
        # a client that drops the connection or rejects our test certificate is a normal event here
        # (socketserver calls this inside its except block: sys.exc_info() holds the error)
        log.debug("request from %s ended with an error", client_address, exc_info=sys.exc_info())

    def read_file(self, name: str) -> bytes | None:
        """Bytes of `name` in the served folder (cached), or None if it is not a plain file there."""
        data = self.cache.get(name)
        if data is not None:
            return data
        if not name or name in (".", "..") or "/" in name or "\\" in name or name.startswith("."):
            return None
        path = os.path.join(self.image_dir, name)
        try:
            with open(path, "rb") as f:
                data = f.read()
        except (FileNotFoundError, IsADirectoryError, NotADirectoryError, PermissionError):
            return None
        self.cache[name] = data  # dict assignment is atomic; a racing double read is harmless
        return data


class _Handler(BaseHTTPRequestHandler):
    server: _Server
    protocol_version = "HTTP/1.1"  # keep-alive for clients that reuse connections (benchmarks)
    disable_nagle_algorithm = True  # headers and body go out in two writes; Nagle would stall keep-alive 40 ms
    timeout = 30  # an idle keep-alive connection frees its thread after this
    server_version = "laiontools-synthetic/1.0"

    def log_message(self, format: str, *args: Any) -> None:
        # Quiet by default: a benchmark makes thousands of requests. Debug logging still shows them.
        if log.isEnabledFor(logging.DEBUG):
            log.debug("%s - %s", self.address_string(), format % args)

    def _answered(self) -> None:
        """The request stops counting as in flight (once): called before a response is written, so a
        client that has read the whole answer never finds its request still counted (this thread may be
        descheduled after writing; counting until then made max_in_flight over-count under load)."""
        if not getattr(self, "_counted_out", True):
            self._counted_out = True
            with self.server.lock:
                self.server.in_flight -= 1

    def _send(self, code: int, body: bytes, ctype: str = "image/jpeg", headers: dict[str, str] | None = None) -> None:
        self._answered()
        self.send_response(code)
        self.send_header("Content-Type", ctype)
        self.send_header("Content-Length", str(len(body)))
        for k, v in (headers or {}).items():
            self.send_header(k, v)
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)

    def _not_found(self) -> None:
        self._send(404, b"not found\n", "text/plain")

    def do_HEAD(self) -> None:
        self.do_GET()

    def do_GET(self) -> None:
        srv = self.server
        with srv.lock:
            srv.in_flight += 1
            srv.max_in_flight = max(srv.max_in_flight, srv.in_flight)
        self._counted_out = False
        try:
            self._get()
        finally:
            self._answered()

    def _get(self) -> None:
        srv = self.server
        srv.requests += 1  # approximate under races; only for reporting
        if srv.log_requests:
            with srv.lock:
                srv.request_log.append((time.monotonic(), self.headers.get("Host", ""), self.path))
        path = self.path.split("?", 1)[0].split("#", 1)[0]
        parts = [p for p in path.split("/") if p]
        if not parts:
            self._send(200, b"laiontools synthetic web\n", "text/plain")
            return
        route, args, name = parts[0], parts[1:-1], parts[-1] if len(parts) > 1 else ""
        if route == "robots.txt" and len(parts) == 1:
            with srv.lock:
                srv.robots_requests += 1
            if srv.robots_txt is None:
                self._not_found()
            else:
                self._send(srv.robots_status, srv.robots_txt.encode(), "text/plain")
            return
        if route == "redirect-to" and len(parts) > 1:
            from urllib.parse import unquote

            self._send(302, b"", "text/plain", {"Location": unquote(path.split("/redirect-to/", 1)[1])})
            return
        n_args = {"status": 1, "flaky": 1, "slow": 1, "drip": 1}.get(route, 0)
        if len(args) != n_args:
            self._not_found()
            return
        data = srv.read_file(name)
        if data is None:
            self._not_found()
            return
        try:
            if route == "img":
                self._send(200, data)
            elif route == "status":
                code = int(args[0])
                if not 400 <= code <= 599:
                    raise ValueError(code)
                phrase = HTTPStatus(code).phrase if code in HTTPStatus._value2member_map_ else "Error"
                extra = {"Retry-After": "1"} if code in (429, 503) else {}
                self._send(code, f"{code} {phrase}\n".encode(), "text/plain", extra)
            elif route == "flaky":
                k = int(args[0])
                with srv.lock:
                    seen = srv.flaky_counts.get(self.path, 0)
                    srv.flaky_counts[self.path] = seen + 1
                if seen < k:
                    self._send(503, b"503 Service Unavailable (flaky)\n", "text/plain", {"Retry-After": "1"})
                else:
                    self._send(200, data)
            elif route == "slow":
                deadline = time.monotonic() + min(max(float(args[0]), 0.0), SLOW_MAX_SECONDS)
                while time.monotonic() < deadline:
                    if srv.stopping.wait(_SLEEP_STEP):
                        self.close_connection = True
                        return
                self._send(200, data)
            elif route == "redirect":
                self._send(302, b"", "text/plain", {"Location": f"/img/{name}"})
            elif route == "html":
                self._send(200, _HTML, "text/html; charset=utf-8")
            elif route == "corrupt":
                self._send(200, _garbage(name, data))
            elif route == "truncated":
                self._send(200, data[: max(1, int(len(data) * TRUNCATE_FRACTION))])
            elif route in ("noai", "noimageai"):
                self._send(200, data, headers={"X-Robots-Tag": route})
            elif route == "drip":
                self._drip(data, min(max(float(args[0]), 0.01), SLOW_MAX_SECONDS))
            elif route == "nolength":
                self.send_response(200)
                self.send_header("Content-Type", "image/jpeg")
                self.send_header("Connection", "close")
                self.end_headers()
                self.wfile.write(data)
                self.close_connection = True
            elif route == "tdm":
                self._send(200, data, headers={"tdm-reservation": "1"})
            elif route == "headerless":
                self._send(200, data[20:])
            elif route == "huge":
                self._send(200, _HUGE_PNG, "image/png")
            else:
                self._not_found()
        except ValueError:
            self._not_found()
        except (BrokenPipeError, ConnectionResetError):  # the client gave up (e.g. its timeout): normal
            self.close_connection = True


    def _drip(self, data: bytes, every: float) -> None:
        """Headers (full Content-Length), then one byte per `every` seconds until done, stopped or gone."""
        srv = self.server
        self.send_response(200)
        self.send_header("Content-Type", "image/jpeg")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.flush()
        give_up = time.monotonic() + SLOW_MAX_SECONDS
        for i in range(len(data)):
            if srv.stopping.wait(every) or time.monotonic() > give_up:
                self.close_connection = True
                return
            self.wfile.write(data[i:i + 1])
            self.wfile.flush()


class SyntheticWebServer:
    """Threaded HTTP server on 127.0.0.1 serving files from `image_dir` under the routes above.

    Use as a context manager, or start()/stop(). ``base_url`` is ``http://127.0.0.1:PORT``.
    stop() returns promptly (well under a second) even while /slow/ requests are in flight: they
    see the stop flag and drop their connection. Counters (/flaky/) belong to one instance.
    """

    def __init__(self, image_dir: str, host: str = "127.0.0.1", port: int = 0,
                 tls: tuple[str, str] | None = None) -> None:
        self.image_dir = image_dir
        self.host, self.port = host, port
        self.tls = tls  # (certfile, keyfile): serve https; the SNI names clients sent go to sni_names
        self.sni_names: list[str | None] = []
        self._server: _Server | None = None
        self._thread: threading.Thread | None = None

    @property
    def base_url(self) -> str:
        if self._server is None:
            raise RuntimeError("SyntheticWebServer is not started; call start() or use it as a context manager")
        return f"{'https' if self.tls else 'http'}://{self.host}:{self._server.server_address[1]}"

    @property
    def requests_served(self) -> int:
        return self._server.requests if self._server else 0

    def _srv(self) -> _Server:
        if self._server is None:
            raise RuntimeError("SyntheticWebServer is not started; call start() or use it as a context manager")
        return self._server

    def set_robots(self, text: str | None, status: int = 200) -> None:
        """Serve `text` as /robots.txt with `status` (None: 404)."""
        srv = self._srv()
        srv.robots_txt, srv.robots_status = text, status

    @property
    def max_in_flight(self) -> int:
        return self._srv().max_in_flight

    def reset_counters(self) -> None:
        """Zero max_in_flight and clear the request log."""
        srv = self._srv()
        with srv.lock:
            srv.max_in_flight = srv.in_flight
            srv.request_log.clear()

    @property
    def robots_requests(self) -> int:
        return self._srv().robots_requests

    def log_requests(self, on: bool = True) -> None:
        """Record (time.monotonic(), Host header, path) of every request in :attr:`request_log`."""
        self._srv().log_requests = on

    @property
    def request_log(self) -> list[tuple[float, str, str]]:
        srv = self._srv()
        with srv.lock:
            return list(srv.request_log)

    def start(self) -> SyntheticWebServer:
        if self._server is not None:
            return self
        os.makedirs(self.image_dir, exist_ok=True)
        self._server = _Server((self.host, self.port), self.image_dir)
        if self.tls:
            import ssl

            ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
            ctx.load_cert_chain(*self.tls)
            ctx.sni_callback = lambda sslsock, name, _ctx: self.sni_names.append(name)
            # handshake in the handler thread, not in accept(): a client that never speaks TLS
            # must not stall the listener
            self._server.socket = ctx.wrap_socket(self._server.socket, server_side=True, do_handshake_on_connect=False)
        self._thread = threading.Thread(
            target=self._server.serve_forever, kwargs={"poll_interval": 0.05},
            name=f"synthetic-web-{self._server.server_address[1]}", daemon=True,
        )
        self._thread.start()
        log.info("synthetic web server on %s serving %s", self.base_url, self.image_dir)
        return self

    def stop(self) -> None:
        srv, self._server = self._server, None
        if srv is None:
            return
        srv.stopping.set()
        srv.shutdown()
        srv.server_close()
        if self._thread is not None:
            self._thread.join(timeout=2)
            self._thread = None

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
