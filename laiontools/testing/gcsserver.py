"""A GCS JSON API server on 127.0.0.1 for the gs:// tests: gcp-storage-emulator (pure Python, from PyPI),
in memory, started and stopped in the test's process as moto's server is for s3:// (``s3server``).
Clients find it through ``STORAGE_EMULATOR_HOST``, which gcsfs reads, as users of an emulator do.
"""

from __future__ import annotations

import logging


class GCSServer:
    """``with GCSServer(port) as s:`` a GCS API server on 127.0.0.1 (``s.endpoint``), buckets in memory."""

    def __init__(self, port: int) -> None:
        self.port = port
        self._server = None

    def __enter__(self) -> GCSServer:  # noqa: PYI034 (a final class; typing.Self needs 3.11)
        from gcp_storage_emulator.server import create_server

        logging.getLogger("gcp_storage_emulator").setLevel(logging.WARNING)  # a line per request otherwise
        self._server = create_server("127.0.0.1", self.port, in_memory=True)
        self._server.start()
        return self

    def __exit__(self, *exc: object) -> None:
        if self._server is not None:
            self._server.stop()
            self._server = None

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self.port}"
