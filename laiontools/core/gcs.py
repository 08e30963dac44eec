"""gcsfs with a bounded wait: what fsspec hands out for ``gs://`` and ``gcs://`` once laiontools is imported.

gcsfs sets no timeout of its own: every request goes through aiohttp with its session default (300 s a
request), and each is tried 6 times, so ``verify gs://...`` against an endpoint that accepts connections
and never answers was still silent after 20 minutes. This subclass only fills in a ``requests_timeout``
(:data:`GCS_REQUESTS_TIMEOUT`: 10 s to connect, 20 s per socket read, not per
request, so a large object read whole takes as long as it takes while bytes arrive) where none is given:
a ``requests_timeout`` in the user's fsspec configuration (``FSSPEC_GS_REQUESTS_TIMEOUT``) wins.
:func:`laiontools.core.storage.bound_object_store_clients` registers it, by name, so this module, gcsfs
and aiohttp are imported only when a ``gs://`` path is used (by class where something in the process
opened ``gs://`` before laiontools was imported: fsspec keeps a class it imported and ignores a later name).

gcsfs (2025.x on) hands out its extended file system unless ``GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT=false``:
before most operations it asks the bucket's storage layout over gRPC (Storage Control API, 30 s a call,
retried for 60 s), and a failed answer is not kept, so it asks again on the next operation. An emulator
(``STORAGE_EMULATOR_HOST``, or an ``endpoint_url`` the user gives, not under googleapis.com) serves the JSON API only: against
one, a single ``exists`` took 130 s and each write ~2 minutes, every gs:// stage a near-hang. At an
emulator this file system answers that lookup itself (a flat bucket, what gcsfs falls back to anyway)
and moves an object by copy and delete (gcsfs tries the JSON API's moveTo first, which emulators lack,
6 times); against Google's endpoint gcsfs does as it would.

Files opened for reading get fsspec's read-ahead cache, as s3fs's do: gcsfs's default prefetcher sent a
GET per read call, so a shard read member by member cost a request for each header and body.
"""

from __future__ import annotations

import os
from typing import Any
from urllib.parse import urlsplit

import aiohttp
import gcsfs
from fsspec.asyn import sync_wrapper

# gcsfs sends every request through aiohttp with no timeout of its own (aiohttp's
# session default: 300 s a request) and tries each one 6 times: `verify gs://...` against an endpoint that
# accepts connections and never answers was still silent after 20 minutes. Bounded per socket read, not
# per request (a large object read whole takes as long as it takes while bytes arrive): one error naming
# the path after ~2.5 minutes (BoundedGCSFileSystem). A requests_timeout the user gives
# (FSSPEC_GS_REQUESTS_TIMEOUT, fsspec's configuration, under gs or gcs) wins.
GCS_REQUESTS_TIMEOUT: dict[str, float] = {"sock_connect": 10, "sock_read": 20}

# How a file opened for reading caches what it fetched, unless the caller says otherwise (see _open).
READ_CACHE_TYPE = "readahead"


class BoundedGCSFileSystem(gcsfs.GCSFileSystem):
    """gcsfs's file system (its extended one where gcsfs picks that) with a default per-read timeout."""

    def __init__(self, *args: Any, requests_timeout: Any = None, **kwargs: Any) -> None:
        if requests_timeout is None:
            requests_timeout = aiohttp.ClientTimeout(**GCS_REQUESTS_TIMEOUT)
        super().__init__(*args, requests_timeout=requests_timeout, **kwargs)

    def _open(self, path: str, mode: str = "rb", **kwargs: Any) -> Any:
        """A file of the bucket; read with fsspec's read-ahead cache (one ranged GET per block, as s3fs
        reads) unless the caller names a cache_type. gcsfs's own default (its "adaptive" prefetcher, 2026.x)
        sent one GET for every read call: a 160 KB shard read member by member through tarfile took 324
        GETs and 4.4 s at an emulator, against 1 GET and 0.01 s read ahead."""
        if "r" in mode and kwargs.get("cache_type") is None:
            kwargs["cache_type"] = READ_CACHE_TYPE
        return super()._open(path, mode, **kwargs)

    def at_emulator(self) -> bool:
        """True where this client talks to another endpoint than Google's: an ``endpoint_url`` given, or
        ``STORAGE_EMULATOR_HOST`` as gcsfs reads it ("default" or empty: Google), whose host is not under
        googleapis.com (nor the ``GOOGLE_CLOUD_UNIVERSE_DOMAIN`` gcsfs honours). An endpoint_url of Google's
        own (a Private Service Connect name, storage.googleapis.com itself) keeps gcsfs's lookup and moves."""
        where = getattr(self, "_endpoint", None)
        if not where:
            where = os.environ.get("STORAGE_EMULATOR_HOST", "")
            if where in ("", "default"):
                return False
        host = (urlsplit(where if "://" in where else f"http://{where}").hostname or "").lower()
        google = {"googleapis.com", os.environ.get("GOOGLE_CLOUD_UNIVERSE_DOMAIN", "googleapis.com").lower()}
        return not any(host == d or host.endswith("." + d) for d in google)

    async def _lookup_bucket_type(self, bucket: str) -> Any:
        """The bucket's layout, without a gRPC call where there is no Storage Control API to ask (an
        emulator): a flat bucket. Elsewhere gcsfs's own lookup (only its extended file system has one)."""
        if self.at_emulator():
            from gcsfs.extended_gcsfs import BucketType

            return BucketType.NON_HIERARCHICAL
        return await super()._lookup_bucket_type(bucket)

    _sync_lookup_bucket_type = sync_wrapper(_lookup_bucket_type)  # (gcsfs's own wraps its function, not ours)

    async def _mv_file(self, path1: str, path2: str, **kwargs: Any) -> None:
        """Move one object. gcsfs asks the JSON API's moveTo first, which emulators lack: their 501 is tried
        6 times with backoff (~40 s for every object a stage writes, since each is written to a temp key
        and moved) before gcsfs copies and deletes. At an emulator: copy and delete at once."""
        if self.at_emulator():
            await self._cp_file(path1, path2, **kwargs)
            await self._rm_file(path1)
            return
        await super()._mv_file(path1, path2, **kwargs)

    mv_file = sync_wrapper(_mv_file)
