"""Loopback helpers for tests that start servers (Spark standalone master/workers, S3 API servers)."""

from __future__ import annotations

import contextlib
import socket
import threading
import time
from collections.abc import Callable, Iterator, Mapping


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_port(port: int, deadline: float) -> None:
    """Return once something listens on 127.0.0.1:`port`; TimeoutError at `deadline` (time.time())."""
    while time.time() < deadline:
        with socket.socket() as s:
            if s.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.5)
    raise TimeoutError(f"nothing listens on 127.0.0.1:{port}")


@contextlib.contextmanager
def answering(answer: Callable[[str, Mapping[str, str]], tuple[int, Mapping[str, str], bytes]]) -> Iterator[str]:
    """A threaded HTTP server on 127.0.0.1 that answers each request ``answer(path, request headers)`` =
    (status, response headers, body): GET, PUT, POST and DELETE (their bodies read and dropped) with the
    body, HEAD without it; yields its base URL (``http://127.0.0.1:<port>``) and is shut down after."""
    import http.server

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            status, headers, body = answer(self.path, self.headers)
            self.send_response(status)
            for k, v in headers.items():
                self.send_header(k, v)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            if self.command != "HEAD":
                self.wfile.write(body)

        def do_PUT(self) -> None:
            self.rfile.read(int(self.headers.get("Content-Length") or 0))
            self.do_GET()

        do_HEAD = do_GET
        do_POST = do_DELETE = do_PUT

        def log_message(self, *args: object) -> None:
            pass

    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    try:
        yield f"http://127.0.0.1:{httpd.server_address[1]}"
    finally:
        httpd.shutdown()
        httpd.server_close()
