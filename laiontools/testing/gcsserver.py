"""A GCS JSON API server on 127.0.0.1 for the gs:// tests: gcp-storage-emulator (pure Python, from PyPI),
in memory, started and stopped in the test's process as moto's server is for s3:// (``s3server``).
Clients find it through ``STORAGE_EMULATOR_HOST``, which gcsfs reads, as users of an emulator do.
It counts the object reads (GETs of an object's bytes) it answers, where the bytes leave the store.
"""

from __future__ import annotations

import logging
import threading
from typing import Any


class GCSServer:
    """``with GCSServer(port) as s:`` a GCS API server on 127.0.0.1 (``s.endpoint``), buckets in memory;
    ``s.media_gets`` is the number of object reads it has answered."""

    def __init__(self, port: int) -> None:
        self.port = port
        self.media_gets = 0
        self._lock = threading.Lock()
        self._server: Any = None
        self._handler: Any = None

    def __enter__(self) -> GCSServer:  # noqa: PYI034 (a final class; typing.Self needs 3.11)
        from gcp_storage_emulator import server as gse

        counts = self

        class Handler(gse.RequestHandler):
            def do_GET(self) -> None:
                if "alt=media" in self.path:
                    with counts._lock:
                        counts.media_gets += 1
                try:
                    super().do_GET()
                except (BrokenPipeError, ConnectionResetError):
                    pass  # the client went away mid-answer (gcsfs drops a read it no longer needs)

        logging.getLogger("gcp_storage_emulator").setLevel(logging.WARNING)  # a line per request otherwise
        # The server's thread looks the handler class up in its module when it starts.
        self._handler, gse.RequestHandler = gse.RequestHandler, Handler
        try:
            self._server = gse.create_server("127.0.0.1", self.port, in_memory=True)
            self._server.start()
        finally:
            gse.RequestHandler = self._handler
        return self

    def __exit__(self, *exc: object) -> None:
        if self._server is not None:
            self._server.stop()
            self._server = None

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self.port}"
