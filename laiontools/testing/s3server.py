"""An S3 API server on 127.0.0.1 for the object-store tests and benchmarks: moto's server mode (the
same WSGI app as ``moto.server.ThreadedMotoServer``, as s3fs's own tests use), with a layer that counts
the GETs of keys under a prefix and the bytes their answers carried, where the bytes leave the store;
and a proxy in front of it that answers some requests as another store would (:class:`S3Proxy`).
"""

from __future__ import annotations

import threading
import time
from typing import Any

# What names the test S3 server and its credentials in the tests' environment (tests/conftest.py sets them).
# The two-worker cluster test starts its workers without them, as a cluster node has none of the submitting
# machine's settings, and hands them to the executors the way docs/scale.md says a user does.
S3_ENV = ("FSSPEC_S3_ENDPOINT_URL", "AWS_ENDPOINT_URL", "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_DEFAULT_REGION")


class _Counting:
    """WSGI layer over moto's app: GETs whose path holds `prefix`, and the bytes of their bodies."""

    def __init__(self, app: Any) -> None:
        self.app = app
        self.prefix = "\0"  # nothing until watch() names one
        self.first_byte_s = 0.0
        self.lock = threading.Lock()
        self.gets = 0
        self.bytes = 0

    def __call__(self, environ: dict, start_response: Any) -> Any:
        counted = environ.get("REQUEST_METHOD") == "GET" and self.prefix in environ.get("PATH_INFO", "")
        if counted and self.first_byte_s:
            time.sleep(self.first_byte_s)  # the server is threaded: concurrent GETs wait side by side
        body = self.app(environ, start_response)
        return self._count(body) if counted else body

    def _count(self, body: Any) -> Any:
        # Counted before each chunk leaves, so that a client that has its bytes reads counts that hold them.
        with self.lock:
            self.gets += 1
        try:
            for chunk in body:
                with self.lock:
                    self.bytes += len(chunk)
                yield chunk
        finally:
            if hasattr(body, "close"):
                body.close()


class S3Server:
    """``with S3Server() as s:`` an S3 API server on 127.0.0.1 (``s.endpoint``); ``s.watch(prefix)`` starts
    counting GETs of keys under ``/<bucket>/<prefix>``, ``s.gets`` / ``s.bytes`` read the counts.
    ``first_byte_s`` holds each counted GET that long before it is answered (a store's first-byte
    latency, which loopback lacks)."""

    def __init__(self, port: int = 0, first_byte_s: float = 0.0) -> None:
        self.port, self._first_byte_s = port, first_byte_s
        self._server: Any = None

    def __enter__(self) -> S3Server:  # noqa: PYI034 (a final class; typing.Self needs 3.11)
        from moto.moto_server.werkzeug_app import (
            DomainDispatcherApplication,
            MotoRequestHandler,
            create_backend_app,
        )
        from werkzeug.serving import make_server

        class Quiet(MotoRequestHandler):
            def log_request(self, *args: Any) -> None:  # a line per request would drown the output
                pass

        self._app = _Counting(DomainDispatcherApplication(create_backend_app))
        self._app.first_byte_s = self._first_byte_s
        self._server = make_server("127.0.0.1", self.port, self._app, threaded=True, request_handler=Quiet)
        self.port = self._server.server_address[1]
        threading.Thread(target=self._server.serve_forever, daemon=True).start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._server.shutdown()
        self._server.server_close()

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def watch(self, prefix: str) -> None:
        """Count from now on the GETs of keys whose path holds `prefix` (e.g. ``/bucket/pool/shards/``)."""
        with self._app.lock:
            self._app.prefix, self._app.gets, self._app.bytes = prefix, 0, 0

    @property
    def gets(self) -> int:
        return self._app.gets

    @property
    def bytes(self) -> int:
        return self._app.bytes


class S3Proxy:
    """``with S3Proxy(upstream, answer) as p:`` a reverse proxy on 127.0.0.1 (``p.endpoint``) in front of an
    S3 API server (an :class:`S3Server`'s endpoint): a store that behaves as another one does for some
    requests. ``answer(method, path, headers)`` returns ``(status, code, message)`` for a request the proxy
    answers itself with an S3 error body (e.g. an older store's ``501 NotImplemented`` to a PUT carrying
    ``If-None-Match``), None for one it forwards to `upstream` as it came, answer included.
    ``p.requests`` lists (method, path, conditional header or "", status) of every request, in order.
    Every socket has a timeout, so a test cannot hang on it."""

    TIMEOUT_S = 10.0

    def __init__(self, upstream: str, answer: Any) -> None:
        self.upstream, self.answer = upstream, answer
        self.requests: list[tuple[str, str, str, int]] = []
        self._lock = threading.Lock()
        self._server: Any = None

    def __enter__(self) -> S3Proxy:  # noqa: PYI034 (a final class; typing.Self needs 3.11)
        import http.client
        from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
        from urllib.parse import urlsplit

        proxy = self
        up = urlsplit(self.upstream)

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"  # keep-alive, as the S3 clients expect (and 100-continue answered here)
            timeout = proxy.TIMEOUT_S  # an idle keep-alive connection ends its thread

            def log_message(self, *args: Any) -> None:  # a line per request would drown the output
                pass

            def _body(self) -> bytes:
                if "chunked" in self.headers.get("Transfer-Encoding", "").lower():
                    out = b""
                    while size := int(self.rfile.readline().split(b";")[0].strip() or b"0", 16):
                        out += self.rfile.read(size)
                        self.rfile.readline()
                    while self.rfile.readline().strip():  # trailers, then the blank line
                        pass
                    return out
                return self.rfile.read(int(self.headers.get("Content-Length") or 0))

            def _serve(self) -> None:
                body = self._body()  # read whole first, so that a keep-alive connection stays in step
                cond = next((f"{h}: {v}" for h, v in self.headers.items() if h.lower() in ("if-none-match", "if-match")), "")
                said = proxy.answer(self.command, self.path, self.headers)
                if said is not None:
                    status, code, message = said
                    err = (f'<?xml version="1.0" encoding="UTF-8"?>\n<Error><Code>{code}</Code><Message>{message}</Message>'
                           f"<Resource>{self.path}</Resource><RequestId>laiontools-proxy</RequestId></Error>").encode()
                    proxy._record(self.command, self.path, cond, status)
                    self.send_response_only(status)
                    self.send_header("Content-Type", "application/xml")
                    self.send_header("Content-Length", str(len(err)))
                    self.end_headers()
                    if self.command != "HEAD":
                        self.wfile.write(err)
                    return
                conn = http.client.HTTPConnection(up.hostname, up.port, timeout=proxy.TIMEOUT_S)
                try:
                    conn.putrequest(self.command, self.path, skip_host=True, skip_accept_encoding=True)
                    for h, v in self.headers.items():  # as they came (Host and the signature included)
                        if h.lower() not in ("expect", "transfer-encoding", "content-length", "connection"):
                            conn.putheader(h, v)
                    conn.putheader("Content-Length", str(len(body)))
                    conn.endheaders(body)
                    resp = conn.getresponse()
                    data = resp.read()  # (nothing for a HEAD: http.client knows the method)
                    headers = resp.getheaders()
                finally:
                    conn.close()
                proxy._record(self.command, self.path, cond, resp.status)
                self.send_response_only(resp.status, resp.reason)
                for h, v in headers:
                    if h.lower() not in ("transfer-encoding", "connection"):
                        self.send_header(h, v)
                if not any(h.lower() == "content-length" for h, _ in headers):
                    self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            do_GET = do_HEAD = do_PUT = do_POST = do_DELETE = _serve

        self._server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._server.daemon_threads = True
        threading.Thread(target=self._server.serve_forever, daemon=True).start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._server.shutdown()
        self._server.server_close()

    def _record(self, method: str, path: str, cond: str, status: int) -> None:
        with self._lock:
            self.requests.append((method, path, cond, status))

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self._server.server_address[1]}"
