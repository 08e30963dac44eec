"""gcsfs with a bounded wait: what fsspec hands out for ``gs://`` and ``gcs://`` once laiontools is imported.

gcsfs sets no timeout of its own: every request goes through aiohttp with its session default (300 s a
request), and each is tried 6 times, so ``verify gs://...`` against an endpoint that accepts connections
and never answers was still silent after 20 minutes. This subclass only fills in a ``requests_timeout``
(:data:`laiontools.core.storage.GCS_REQUESTS_TIMEOUT`: 10 s to connect, 20 s per socket read, not per
request, so a large object read whole takes as long as it takes while bytes arrive) where none is given:
a ``requests_timeout`` in the user's fsspec configuration (``FSSPEC_GS_REQUESTS_TIMEOUT``) wins.
:func:`laiontools.core.storage.bound_object_store_clients` registers it, by name, so this module, gcsfs
and aiohttp are imported only when a ``gs://`` path is used.
"""

from __future__ import annotations

from typing import Any

import aiohttp
import gcsfs

from laiontools.core.storage import GCS_REQUESTS_TIMEOUT


class BoundedGCSFileSystem(gcsfs.GCSFileSystem):
    """gcsfs's file system (its extended one where gcsfs picks that) with a default per-read timeout."""

    def __init__(self, *args: Any, requests_timeout: Any = None, **kwargs: Any) -> None:
        if requests_timeout is None:
            requests_timeout = aiohttp.ClientTimeout(**GCS_REQUESTS_TIMEOUT)
        super().__init__(*args, requests_timeout=requests_timeout, **kwargs)
