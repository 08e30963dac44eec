"""A GCS JSON API server on 127.0.0.1 for the gs:// tests: gcp-storage-emulator (pure Python, from PyPI),
in memory, started and stopped in the test's process as moto's server is for s3:// (``s3server``).
Clients find it through ``STORAGE_EMULATOR_HOST``, which gcsfs reads, as users of an emulator do.
It counts the object reads (GETs of an object's bytes) it answers, where the bytes leave the store.
The emulator checks no credentials; buckets named in ``denied`` answer every request 403 with the body
Google's JSON API gives a caller without the permission, and those in ``read_only`` every write (POST,
PUT, PATCH, DELETE: read-only credentials), so the permission paths are reached.
"""

from __future__ import annotations

import json
import logging
import re
import threading
from typing import Any

# the bucket a JSON API request names: /storage/v1/b/<bucket>..., /upload/storage/v1/b/<bucket>..., /download/...
_BUCKET = re.compile(r"^/(?:upload/|download/)?storage/v1/b/([^/?]+)")


class GCSServer:
    """``with GCSServer(port) as s:`` a GCS API server on 127.0.0.1 (``s.endpoint``), buckets in memory;
    ``s.media_gets`` is the number of object reads it has answered; ``s.denied`` the buckets it refuses
    (403) to every caller, ``s.read_only`` those it refuses writes to."""

    def __init__(self, port: int) -> None:
        self.port = port
        self.media_gets = 0
        self.denied: set[str] = set()
        self.read_only: set[str] = set()
        self._lock = threading.Lock()
        self._server: Any = None
        self._handler: Any = None

    def __enter__(self) -> GCSServer:  # noqa: PYI034 (a final class; typing.Self needs 3.11)
        from gcp_storage_emulator import server as gse

        counts = self

        class Handler(gse.RequestHandler):
            def _refused(self, write: bool = True) -> bool:
                m = _BUCKET.match(self.path)
                if not m or not (m.group(1) in counts.denied or (write and m.group(1) in counts.read_only)):
                    return False
                perm = "storage.objects.create" if write else "storage.objects.list"
                msg = (f"caller does not have {perm} access to the Google Cloud Storage bucket. "
                       f"Permission '{perm}' denied on resource (or it may not exist).")
                body = json.dumps({"error": {"code": 403, "message": msg,
                                             "errors": [{"message": msg, "domain": "global", "reason": "forbidden"}]}}).encode()
                length = int(self.headers.get("Content-Length") or 0)
                if length:
                    self.rfile.read(length)  # the request's body, so the connection stays in step
                self.send_response(403)
                self.send_header("Content-Type", "application/json; charset=UTF-8")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)
                return True

            def do_POST(self) -> None:
                if not self._refused():
                    super().do_POST()

            def do_PUT(self) -> None:
                if not self._refused():
                    super().do_PUT()

            def do_DELETE(self) -> None:
                if not self._refused():
                    super().do_DELETE()

            def do_PATCH(self) -> None:
                if not self._refused():
                    super().do_PATCH()

            def do_GET(self) -> None:
                if self._refused(write=False):
                    return
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
