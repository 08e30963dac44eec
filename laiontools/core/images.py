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

Images of more than 8 bits per channel (16-bit PNG and TIFF, 32-bit integer or float TIFF) are brought
to 8 bits by one rule everywhere (:func:`to_8bit`, :func:`to_rgb`; the download's resizer in
:mod:`laiontools.web.resize` does the same on its arrays): the high byte of a 16-bit value, as PIL
already does for 16-bit RGB PNGs. PIL's own ``convert("RGB")`` clips a 16-bit grey value at 255, so
such an image came out white (99.6 % of pixels in a photo), and open_clip's loader converts the same way.
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
# Scans of a JPEG. libjpeg decodes every scan of a progressive JPEG over the whole coefficient buffer,
# and a scan of a flat image is a dozen bytes: a file that repeats one thousands of times costs
# scans x pixels (8000x8000: +2.5 s per thousand scans, ~30 minutes for a 20 MB file) with every size
# check passed. Real progressive JPEGs have ~10 scans; libjpeg-turbo offers the same guard
# (TJPARAM_SCANLIMIT, djpeg -maxscans), which neither OpenCV nor PIL sets.
MAX_JPEG_SCANS = 500

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


# The largest input side of the image models evaluation sets are embedded for (open_clip's ViT-H-14-378,
# EVA's 448, SigLIP's 512, DINOv2's 518): where the model is not known when an image is decoded, the
# resize check below assumes it (an image refused by it is over 333:1).
MAX_MODEL_INPUT_SIDE = 518


def check_resized_pixels(width: int, height: int, input_side: int = MAX_MODEL_INPUT_SIDE) -> None:
    """Raise :class:`ImageLimitError` when open_clip's eval Resize, which scales the *short* side to
    `input_side` before the center crop, would make a `width` x `height` image more than MAX_IMAGE_PIXELS.

    A thin strip passes the header's pixel limit (a 1 x 1,000,000 PNG is 1 Mpx and a few KB) but is
    upscaled to 64 x 64,000,000 (224: 224 x 224,000,000) RGB pixels, 12 GB (150 GB) in one process: the
    worker is killed, the run dies, and every resume dies on the same sample."""
    import math

    short, long = min(width, height), max(width, height)
    resized = input_side * math.ceil(long * input_side / max(1, short))
    if resized > MAX_IMAGE_PIXELS:
        raise ImageLimitError(
            f"image of {width}x{height} (aspect ratio {long / max(1, short):.0f}:1) would be resized to "
            f"{resized / 1e6:.0f} Mpx before a {input_side}px center crop, over the "
            f"{MAX_IMAGE_PIXELS / 1e6:.0f} Mpx limit; not decoded"
        )


# PIL modes of single-channel images wider than 8 bits (PIL opens 16-bit RGB PNGs as 8-bit RGB itself).
WIDE_MODES = frozenset({"I;16", "I;16L", "I;16B", "I;16N", "I", "F"})


def wide_to_uint8(a: Any) -> Any:
    """A uint8 array of an image array wider than 8 bits: a 16-bit value's high byte (``v >> 8``, as
    PIL reads 16-bit RGB PNGs). A 32-bit integer array is read as 16-bit when a value is over 255, as
    8-bit otherwise; a float array as 0..1 when no value is over 1, as 0..255 otherwise (clipped)."""
    import numpy as np

    a = np.asarray(a)
    if a.dtype == np.uint8:
        return a
    if a.dtype == np.uint16:  # the common case, without a wider copy
        return (a >> 8).astype(np.uint8)
    if a.dtype.kind == "f":
        a = np.nan_to_num(a.astype(np.float64), nan=0.0, posinf=255.0, neginf=0.0)
        if a.size and a.max() <= 1.0:
            a = a * 255.0
        return np.clip(np.rint(a), 0, 255).astype(np.uint8)
    if a.dtype.itemsize == 2 or (a.size and a.max() > 255):
        return (np.clip(a, 0, 65535).astype(np.uint32) >> 8).astype(np.uint8)
    return np.clip(a, 0, 255).astype(np.uint8)


def to_8bit(im: Any) -> Any:
    """`im` itself unless its mode is one of :data:`WIDE_MODES`; then an ``L`` image of its 8-bit values
    (:func:`wide_to_uint8`). Loads the image."""
    if im.mode not in WIDE_MODES:
        return im
    from PIL import Image

    return Image.fromarray(wide_to_uint8(im))  # 2-D uint8: mode L


# PIL modes with an alpha channel; a P, L or RGB image may carry a transparent colour in info instead.
ALPHA_MODES = frozenset({"RGBA", "LA", "PA", "RGBa", "La"})


def to_rgb(im: Any) -> Any:
    """An RGB image of `im`, 16-bit and wider images brought to 8 bits first (:func:`to_8bit`), and an
    image with transparency composited on white (:func:`flatten_on_white`), as the download stored its
    pool copy: PIL's ``convert("RGB")`` drops the alpha, so a transparent background came out black
    (or whatever colour the transparent pixels hold) and an evaluation image no longer met its pool copy."""
    im = to_8bit(im)
    if im.mode in ALPHA_MODES or "transparency" in im.info:
        import numpy as np
        from PIL import Image

        return Image.fromarray(flatten_on_white(np.asarray(im.convert("RGBA"))), "RGB")
    return im.convert("RGB")


# Encoded images that may be wider than 8 bits: PNG (bit depth in its header) and TIFF (decoded to tell).
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
TIFF_SIGNATURES = (b"II*\x00", b"MM\x00*")


def may_be_wide(head: bytes) -> bool:
    """Whether encoded bytes starting with `head` (32 bytes are enough) can be an image wider than 8 bits."""
    return head.startswith((PNG_SIGNATURE, *TIFF_SIGNATURES))


def eight_bit_png(data: bytes) -> bytes | None:
    """A lossless 8-bit PNG of a 16-bit PNG or of a TIFF wider than 8 bits; None for anything else.

    For decoders that take bytes and would get such an image wrong: img2dataset's resizer (``cv2.imdecode``
    with ``IMREAD_UNCHANGED``, then the uint16 array encoded as if it were 8-bit: white) and webdataset's
    ``pilrgb`` in open_clip's loader (``convert("RGB")``, which clips 16-bit grey at 255). Values by the one
    rule (:func:`wide_to_uint8`); alpha is kept. Only a PNG whose header says 16 bits, or a TIFF, is decoded."""
    if data.startswith(PNG_SIGNATURE):
        if data[12:16] != b"IHDR" or len(data) < 25 or data[24] != 16:
            return None
    elif not data.startswith(TIFF_SIGNATURES):
        return None
    import cv2
    import numpy as np

    img = cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_UNCHANGED)
    if img is None or img.dtype == np.uint8:
        return None  # the caller's decoder reads it as it is, or reports its own error
    ok, buf = cv2.imencode(".png", wide_to_uint8(img), [cv2.IMWRITE_PNG_COMPRESSION, 1])
    return buf.tobytes() if ok else None


_JPEG_MARKER = re.compile(rb"\xff+([^\x00\xff])")  # FF 00 is a stuffed data byte, FF FF fill before a marker


def jpeg_scan_count(data: bytes, stop_above: int | None = None) -> int:
    """Scans (SOS markers) of JPEG bytes as libjpeg reads them: segments skipped by their lengths (an EXIF
    thumbnail's scans are not counted), entropy-coded data to its next marker, up to EOI (a motion photo's
    video or an MPO's second image after it are not read). Stops counting above `stop_above`."""
    if stop_above is not None and data.count(b"\xff\xda") <= stop_above:
        return data.count(b"\xff\xda")  # an upper bound already within the limit: no walk needed
    i, n = 2, 0
    while stop_above is None or n <= stop_above:
        m = _JPEG_MARKER.search(data, i)
        if m is None:
            break
        code, j = m.group(1)[0], m.end()
        if code == 0xD9:  # EOI
            break
        if 0xD0 <= code <= 0xD8 or code == 0x01:  # RSTn, SOI, TEM: no length
            i = j
            continue
        if j + 2 > len(data):
            break
        n += code == 0xDA
        i = j + max(2, int.from_bytes(data[j:j + 2], "big"))
    return n


def check_jpeg_scans(data: bytes, max_scans: int = MAX_JPEG_SCANS) -> None:
    """Raise :class:`ImageLimitError` when `data` is a JPEG of more than `max_scans` scans."""
    if data[:2] == b"\xff\xd8":
        n = jpeg_scan_count(data, stop_above=max_scans)
        if n > max_scans:
            raise ImageLimitError(f"JPEG of more than {max_scans} scans (a decoding-time bomb); not decoded")


def flatten_on_white(a: Any) -> Any:
    """A uint8 H x W x 3 array of a uint8 H x W x 4 one (alpha last), composited on white exactly as
    img2dataset's resizer does (``rint(alpha / 255 * c + 255 - alpha)``), in 16-bit integers a band of
    rows at a time: img2dataset's float64 temporaries cost ~70 bytes per pixel (6 GB for an image at the
    pixel limit, from a PNG of a few hundred kB)."""
    import numpy as np

    out = np.empty(a.shape[:2] + (3,), np.uint8)
    step = max(1, (1 << 20) // max(1, a.shape[1]))
    for y in range(0, a.shape[0], step):
        band = a[y:y + step]
        alpha = band[..., 3:].astype(np.uint16)
        # <= 255 * 255 + 127: fits; (v + 127) // 255 is rint's result (v / 255 is never exactly .5 off)
        out[y:y + step] = (band[..., :3] * alpha + (255 - alpha) * 255 + 127) // 255
    return out


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
        if im.format in ("JPEG", "MPO"):
            check_jpeg_scans(data)
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
