"""Limits on images read after the download: bytes per file or tar member, pixels per image.

The download refuses responses over ``--max-bytes`` and images over ``--max-image-pixels`` (read from
the header, before decoding). Every later reader of stored images (embed, the evaluation-set reader,
dedup's pHash, the galleries, takedown's content hashes) applies the limits here, so a hostile file
in a pool shard or an evaluation set costs a recorded per-item error, not a hang or all the memory:

* :func:`open_image` opens encoded bytes lazily (PIL reads only the header) and refuses more than
  :data:`MAX_IMAGE_PIXELS` pixels before anything is decoded;
* :func:`read_regular_file` reads a file only when it is a regular file (after symlinks: a FIFO would
  block forever, ``/dev/zero`` never ends) and not over :data:`MAX_FILE_BYTES`;
* tar readers (:mod:`laiontools.wds.samples`) hand an over-limit member on as an :class:`OversizeMember`
  (no payload), which :func:`open_image` refuses with its reason.

Error messages carry no memory addresses (:func:`error_text`), so outputs that record them are the same
bytes from run to run.
"""

from __future__ import annotations

import os
import re
import stat
import warnings
from typing import Any, Self

# The download's --max-image-pixels default (PIL's own decompression-bomb warning limit).
MAX_IMAGE_PIXELS = 89_478_485
# Bytes per stored image file or tar member. Above the download's --max-bytes default (20 MiB), so
# everything the download wrote passes with room for other tools' shards and evaluation sets (a JPEG or
# PNG at the pixel limit can exceed 20 MiB); small enough that a decompression bomb in a gzip tar (2 MB
# holding 2 GiB) costs at most this much memory per reader.
MAX_FILE_BYTES = 64 * 1024 * 1024

_ADDRESS = re.compile(r" at 0x[0-9a-fA-F]+")


class ImageLimitError(ValueError):
    """An image (or the file or tar member holding it) is over a limit, or is not a regular file."""


class OversizeMember(bytes):
    """Stands in for a tar member over the byte limit: empty, never held in memory; `reason` says why.
    The tar readers stream its bytes through sha256 and md5 (`sha256`, `md5`), so a takedown or a removal
    proof still compares it with hash entries; nothing decodes it."""

    reason: str
    sha256: str | None
    md5: str | None

    def __new__(cls, name: str, size: int, limit: int, stream: Any = None) -> Self:
        """`stream`, when given, is read for the member's `size` bytes (in chunks) to fill the hashes; a
        short read leaves them None."""
        import hashlib

        obj = super().__new__(cls, b"")
        obj.reason = f"tar member {name.rpartition('/')[2]} of {size} bytes is over the {limit} byte limit; not read"
        obj.sha256 = obj.md5 = None
        if stream is not None:
            h, m, left = hashlib.sha256(), hashlib.md5(usedforsecurity=False), size
            while left > 0 and (b := stream.read(min(4 << 20, left))):
                h.update(b)
                m.update(b)
                left -= len(b)
            if left == 0:
                obj.sha256, obj.md5 = h.hexdigest(), m.hexdigest()
        return obj


def scrub_addresses(text: str) -> str:
    """`text` without the `` at 0x7f...`` object addresses that reprs carry (they differ run to run)."""
    return _ADDRESS.sub("", text)


def error_text(e: BaseException, limit: int = 200) -> str:
    """``"ExcType: message"`` of a per-item failure, address-free and at most `limit` characters of message."""
    return f"{type(e).__name__}: {scrub_addresses(str(e))[:limit]}"


def check_pixels(width: int, height: int, max_pixels: int | None = MAX_IMAGE_PIXELS) -> None:
    """Raise :class:`ImageLimitError` when ``width * height`` is over `max_pixels` (None: no limit)."""
    if max_pixels is not None and width * height > max_pixels:
        raise ImageLimitError(
            f"image of {width}x{height} = {width * height / 1e6:.0f} Mpx is over the "
            f"{max_pixels / 1e6:.0f} Mpx limit; not decoded"
        )


def open_image(data: bytes, max_pixels: int | None = MAX_IMAGE_PIXELS) -> Any:
    """A lazily opened PIL image of encoded bytes whose header size is within `max_pixels`.

    Nothing is decoded yet (call ``load()``, ``draft()`` first if wanted). Raises
    :class:`ImageLimitError` for an :class:`OversizeMember` or too many pixels, and PIL's errors for
    bytes that are not an image."""
    import io

    from PIL import Image

    if isinstance(data, OversizeMember):
        raise ImageLimitError(data.reason)
    with warnings.catch_warnings():  # PIL warns past its own limit; the check below decides instead
        warnings.simplefilter("ignore", Image.DecompressionBombWarning)
        im = Image.open(io.BytesIO(data))
    try:
        check_pixels(*im.size, max_pixels=max_pixels)
    except ImageLimitError:
        im.close()
        raise
    return im


def read_regular_file(fs: Any, path: str, max_bytes: int = MAX_FILE_BYTES) -> bytes:
    """The bytes of `path` on `fs`, read only if it is a regular file of at most `max_bytes`.

    A local path is checked with ``os.stat`` (symlinks followed): a FIFO, device or socket raises
    :class:`ImageLimitError` naming its kind before it is opened. The size is checked before reading
    and the read is bounded too (a file may grow)."""
    from laiontools.core.storage import is_local

    if is_local(fs):
        st = os.stat(path)
        if not stat.S_ISREG(st.st_mode):
            raise ImageLimitError(f"not a regular file ({_kind(st.st_mode)}); not read")
        size = st.st_size
    else:
        size = fs.info(path).get("size")
    if size is not None and size > max_bytes:
        raise ImageLimitError(f"file of {size} bytes is over the {max_bytes} byte limit; not read")
    with fs.open(path, "rb") as f:
        data = f.read(max_bytes + 1)
    if len(data) > max_bytes:
        raise ImageLimitError(f"file is over the {max_bytes} byte limit; not read")
    return data


def _kind(mode: int) -> str:
    for test, name in ((stat.S_ISFIFO, "a FIFO"), (stat.S_ISCHR, "a character device"), (stat.S_ISBLK, "a block device"),
                       (stat.S_ISSOCK, "a socket"), (stat.S_ISDIR, "a folder")):
        if test(mode):
            return name
    return "not a plain file"
