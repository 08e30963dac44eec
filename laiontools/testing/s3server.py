"""An S3 API server on 127.0.0.1 for the object-store tests and benchmarks: moto's server mode (the
same WSGI app as ``moto.server.ThreadedMotoServer``, as s3fs's own tests use), with a layer that counts
the GETs of keys under a prefix and the bytes their answers carried, where the bytes leave the store.
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
