"""img2dataset's Resizer with a cheaper JPEG decode: libjpeg decodes at 1/2, 1/4 or 1/8 scale.

img2dataset's :class:`~img2dataset.resizer.Resizer` decodes every image at full size
(``cv2.imdecode(..., IMREAD_UNCHANGED)``) and then downsizes it with an area filter. For the common
web case — a 500-800 px JPEG going to 256 px — most of that work is thrown away: the full-size IDCT
and colour conversion, then an area resize over all those pixels (INTER_AREA at a non-integer ratio
costs as much as the decode itself). libjpeg can instead scale in the DCT domain while decoding
(``cv2.IMREAD_REDUCED_COLOR_{2,4,8}``), which is several times cheaper and, because the reduced
image is still at least as large as the output, changes the result only by filtering differences
(measured in ``tests/test_resize.py``).

:class:`FastResizer` takes that path only when it is safe and otherwise hands the image to
img2dataset's own ``Resizer.__call__`` unchanged:

* the input starts with the JPEG SOI marker, PIL reads its header (size + mode, no pixel decode),
  and the mode is RGB or L (CMYK/YCCK and anything unusual go to img2dataset);
* the resize mode is not ``no``, no blurring boxes are given, re-encoding is not disabled;
* the image passes img2dataset's min_image_size / max_image_area / max_aspect_ratio checks on its
  TRUE size (a rejected image goes to img2dataset, so the error string is img2dataset's own);
* the image is big enough that a reduced decode is still >= the output size on both sides.

The output contract is img2dataset's: ``(img_bytes, width, height, original_width,
original_height, err)``, with ``original_*`` the true (header) size, not the reduced one, and
``width``/``height`` exactly what img2dataset would produce (computed from the true size with
albumentations' own rounding).
"""

from __future__ import annotations

import contextlib
import io
import os
from collections.abc import Mapping
from typing import Any

# A subclass needs its base at import time. Like laiontools.web.fetch, this module is imported only
# inside the download job (and tests/benches), never by the CLI's top level.
os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")
import albumentations as A
import cv2
import numpy as np
from albumentations.augmentations.geometric import functional as fgeometric
from img2dataset.resizer import ResizeMode, Resizer, SuppressStdoutStderr

from laiontools.core.images import (
    ALPHA_MODES,
    PNG_SIGNATURE,
    ImageLimitError,
    check_jpeg_scans,
    eight_bit_png,
    flatten_on_white,
    may_be_wide,
    to_rgb,
)

_JPEG_SOI = b"\xff\xd8\xff"
_REDUCTIONS = (8, 4, 2)  # largest first: the cheapest decode that is still big enough wins
# libjpeg DCT-domain scaled decode, per PIL mode and scale denominator; IGNORE_ORIENTATION because
# img2dataset's IMREAD_UNCHANGED ignores EXIF orientation too.
_REDUCED_FLAGS = {
    ("RGB", 2): cv2.IMREAD_REDUCED_COLOR_2, ("RGB", 4): cv2.IMREAD_REDUCED_COLOR_4,
    ("RGB", 8): cv2.IMREAD_REDUCED_COLOR_8, ("L", 2): cv2.IMREAD_REDUCED_GRAYSCALE_2,
    ("L", 4): cv2.IMREAD_REDUCED_GRAYSCALE_4, ("L", 8): cv2.IMREAD_REDUCED_GRAYSCALE_8,
}


# The parameters a resizer is built from (the download's settings of the same names), as img2dataset's
# Resizer(image_size=..., resize_mode=...) takes only its own: no stage config reaches this module.
RESIZE_PARAMS = ("image_size", "resize_mode", "resize_only_if_bigger", "encode_quality", "encode_format",
                 "skip_reencode", "min_image_size", "max_image_pixels", "max_aspect_ratio", "fast_decode")


def resize_params(settings: Mapping[str, Any]) -> dict[str, Any]:
    """The :data:`RESIZE_PARAMS` present in `settings` (a download's recorded settings, a config's
    ``to_dict()``): what :func:`make_resizer` takes, picked out of a larger dict."""
    return {k: settings[k] for k in RESIZE_PARAMS if k in settings}


def resizer_kwargs(
    image_size: int,
    resize_mode: str,
    resize_only_if_bigger: bool = False,
    encode_quality: int = 95,
    encode_format: str = "jpg",
    skip_reencode: bool = False,
    min_image_size: int = 0,
    max_image_pixels: float | None = None,
    max_aspect_ratio: float | None = None,
) -> dict[str, Any]:
    """img2dataset Resizer arguments (shared by both resizers and the bench). None for
    `max_image_pixels` / `max_aspect_ratio` means no limit."""
    return dict(
        image_size=image_size, resize_mode=resize_mode, resize_only_if_bigger=resize_only_if_bigger,
        upscale_interpolation="lanczos", downscale_interpolation="area", encode_quality=encode_quality,
        encode_format=encode_format, skip_reencode=skip_reencode, disable_all_reencoding=False,
        min_image_size=min_image_size, max_image_area=float("inf") if max_image_pixels is None else max_image_pixels,
        max_aspect_ratio=max_aspect_ratio or float("inf"), blurrer=None,
    )


def make_resizer(fast_decode: bool = True, **params: Any) -> Resizer:
    """The resizer a download uses: :class:`FastResizer` when `fast_decode`, else img2dataset's own
    (:class:`DepthSafeResizer`: with 16-bit images brought to 8 bits first); `params` are
    :func:`resizer_kwargs`' (``make_resizer(**resize_params(settings))``)."""
    cls = FastResizer if fast_decode else DepthSafeResizer
    return cls(**resizer_kwargs(**params))


def flattened_bmp(data: bytes) -> bytes | None:
    """A lossless BMP of an image with transparency composited on white, as img2dataset's resizer
    composites it, or None for an image without (PIL's header says which: mode and tRNS, no decode).

    img2dataset composites in float64 (~70 bytes per pixel: 6 GB for a transparent PNG at the pixel
    limit, a file of a few hundred kB); :func:`flatten_on_white` gives the same bytes in 16-bit bands.
    A grey PNG's transparent value, which OpenCV's libpng reading drops (it keeps an RGB or palette
    one), is composited too."""
    from PIL import Image

    if data.startswith(_JPEG_SOI):  # no alpha in a JPEG: not even a header read
        return None
    try:
        with Image.open(io.BytesIO(data)) as im:
            mode, trns = im.mode, im.info.get("transparency")
    except Exception:  # noqa: BLE001 - img2dataset's decoder reports its own error
        return None
    if mode not in ALPHA_MODES and trns is None:
        return None
    with SuppressStdoutStderr():  # decoder warnings, as img2dataset silences them
        img = cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_UNCHANGED)
    if img is None or img.dtype != np.uint8:
        return None
    if img.ndim == 3 and img.shape[2] == 4:
        flat = flatten_on_white(img)
    elif (img.ndim == 2 and mode == "L" and isinstance(trns, int) and data.startswith(PNG_SIGNATURE)
          and data[24:26] == b"\x08\x00"):  # an 8-bit grey PNG with a transparent value
        flat = cv2.cvtColor(np.where(img == trns, np.uint8(255), img), cv2.COLOR_GRAY2BGR)
    else:
        return None
    del img
    ok, buf = cv2.imencode(".bmp", flat)
    return buf.tobytes() if ok else None


class DepthSafeResizer(Resizer):
    """img2dataset's Resizer, given an 8-bit copy of a 16-bit PNG or TIFF
    (:func:`laiontools.core.images.eight_bit_png`): img2dataset alone stored such an image white;
    an image with transparency already composited on white (:func:`flattened_bmp`: the same pixels
    without img2dataset's float64 copies); and a JPEG of more scans than
    :data:`laiontools.core.images.MAX_JPEG_SCANS` refused before any decode.

    With all re-encoding disabled the bytes are stored as they came (the user's choice); the readers
    after the download bring them to 8 bits the same way (:func:`laiontools.core.images.to_8bit`)."""

    def __call__(self, img_stream: Any, blurring_bbox_list: Any = None) -> tuple:
        if not self.disable_all_reencoding:
            img_stream.seek(0)
            data = img_stream.read()
            try:
                check_jpeg_scans(data)
            except ImageLimitError as e:
                return None, None, None, None, None, str(e)
            if may_be_wide(data[:32]):
                with SuppressStdoutStderr():  # libpng/libtiff warnings, as img2dataset silences them
                    data = eight_bit_png(data) or data
            with contextlib.suppress(Exception):  # img2dataset's path below reports its own error
                data = flattened_bmp(data) or data
            img_stream = io.BytesIO(data)
        return super().__call__(img_stream, blurring_bbox_list)


# The download settings that decide what a stored pool image looks like (size, padding, crop, codec).
GEOMETRY_KEYS = ("image_size", "resize_mode", "resize_only_if_bigger", "encode_format", "encode_quality",
                 "skip_reencode", "fast_decode")


class PoolGeometry:
    """Puts an image through the resize a pool's download applied, so it can be compared with pool images.

    Built from the download settings a pool records (see :func:`resizer_kwargs`); only the keys in
    :data:`GEOMETRY_KEYS` count. The download's own size filters (min_image_size, max_image_pixels,
    max_aspect_ratio) are NOT applied: an evaluation image is never rejected, only reshaped.
    Calling it encodes the PIL image losslessly (PNG), runs it through the download's resizer
    (:func:`make_resizer`: same image size, resize mode, interpolation, padding colour, codec and
    quality) and decodes the result. Raises ValueError with img2dataset's message when the resizer
    fails. Picklable.
    """

    def __init__(self, settings: Mapping[str, Any]) -> None:
        missing = [k for k in ("image_size", "resize_mode") if settings.get(k) is None]
        if missing:
            raise ValueError(f"download settings lack {missing}: cannot reproduce the pool's geometry")
        defaults = {"resize_only_if_bigger": False, "encode_format": "jpg", "encode_quality": 95,
                    "skip_reencode": False, "fast_decode": True}
        self.settings = {k: settings.get(k, defaults.get(k)) for k in GEOMETRY_KEYS}
        self._resizer: Resizer | None = None

    def describe(self) -> dict[str, Any]:
        """The settings that define the geometry (recorded beside what it produced)."""
        return dict(self.settings)

    def __call__(self, image: Any) -> Any:
        from PIL import Image

        if self._resizer is None:
            # no size filters: an evaluation image is reshaped, never rejected
            self._resizer = make_resizer(**resize_params(self.settings))
        buf = io.BytesIO()
        to_rgb(image).save(buf, format="PNG", compress_level=1)
        buf.seek(0)
        out, _w, _h, _ow, _oh, err = self._resizer(buf)
        if err is not None or out is None:
            raise ValueError(f"the pool's resize ({self.settings['resize_mode']}, {self.settings['image_size']} px) failed: {err}")
        with Image.open(io.BytesIO(out)) as im:
            return im.convert("RGB")

    def __getstate__(self) -> dict[str, Any]:
        return {"settings": self.settings, "_resizer": None}


def jpeg_header(data: bytes) -> tuple[int, int, str] | None:
    """(width, height, PIL mode) of a JPEG from its header alone; None if `data` is not a readable JPEG.

    PIL's ``Image.open`` parses markers up to the frame header and decodes no pixels (~50 us).
    The size is the stored one, before any EXIF orientation — what ``IMREAD_UNCHANGED`` returns.
    """
    if not data.startswith(_JPEG_SOI):
        return None
    from PIL import Image

    try:
        with Image.open(io.BytesIO(data), formats=("JPEG",)) as im:
            return im.size[0], im.size[1], im.mode
    except Exception:  # noqa: BLE001 - anything PIL can't parse is img2dataset's to judge
        return None


def target_size(width: int, height: int, image_size: int, mode: str) -> tuple[int, int] | None:
    """(width, height) that img2dataset's albumentations resize gives a `width` x `height` image.

    keep_ratio / center_crop scale the short side to `image_size` (SmallestMaxSize), border /
    keep_ratio_largest the long side (LongestMaxSize); both round with Python's ``round`` and keep
    at least 1 px, as albumentations' ``MaxSizeTransform.apply`` does. None for mode ``no``.
    """
    if mode in ("keep_ratio", "center_crop"):
        scale = image_size / min(width, height)
    elif mode in ("border", "keep_ratio_largest"):
        scale = image_size / max(width, height)
    else:
        return None
    return max(1, round(width * scale)), max(1, round(height * scale))


def reduction_factor(width: int, height: int, target: tuple[int, int]) -> int:
    """Largest libjpeg scale denominator (8, 4, 2) whose decode is >= `target` on both sides; 1 if none.

    libjpeg's scaled output is ceil(side / f); requiring the reduced image to be at least the output
    size means the final step is always a downscale, never an upscale of a too-small decode.
    """
    for f in _REDUCTIONS:
        if -(-width // f) >= target[0] and -(-height // f) >= target[1]:
            return f
    return 1


class FastResizer(DepthSafeResizer):
    """img2dataset's Resizer; JPEGs larger than needed are decoded at reduced scale (see module doc),
    16-bit PNGs and TIFFs brought to 8 bits first (:class:`DepthSafeResizer`).

    Same constructor, same call contract, same error strings (every rejection and every failure
    is produced by img2dataset's own ``__call__``). Picklable like its parent (Spark ships it).
    """

    def __call__(self, img_stream: Any, blurring_bbox_list: Any = None) -> tuple:
        if (self.disable_all_reencoding or blurring_bbox_list is not None
                or self.resize_mode not in (ResizeMode.keep_ratio, ResizeMode.center_crop,
                                            ResizeMode.border, ResizeMode.keep_ratio_largest)):
            return super().__call__(img_stream, blurring_bbox_list)
        try:
            out = self._reduced(img_stream)
        except Exception:  # noqa: BLE001 - img2dataset's path below reports its own error (and the
            out = None  # parent's scan check refuses a JPEG of too many scans, which _reduced raised for)
        if out is None:
            img_stream.seek(0)
            return super().__call__(img_stream, blurring_bbox_list)
        return out

    def _reduced(self, img_stream: Any) -> tuple | None:
        """The reduced-decode result, or None when img2dataset's own path must handle the image."""
        img_stream.seek(0)
        data = img_stream.read()
        head = jpeg_header(data)
        if head is None or head[2] not in ("RGB", "L"):
            return None
        check_jpeg_scans(data)  # before any decode (ImageLimitError: the parent's path refuses it by name)
        ow, oh, mode = head
        # img2dataset's checks, on the true size; a failing image goes to img2dataset for its error.
        if (min(ow, oh) < self.min_image_size or ow * oh > self.max_image_area
                or max(ow, oh) / min(ow, oh) > self.max_aspect_ratio):
            return None
        target = target_size(ow, oh, self.image_size, self.resize_mode.name)
        if target is None:
            return None
        f = reduction_factor(ow, oh, target)
        if f == 1:  # not bigger than 2x the output: nothing to save
            return None
        with SuppressStdoutStderr():  # libjpeg warnings on damaged data, as img2dataset silences them
            cv2.setNumThreads(1)
            img = cv2.imdecode(np.frombuffer(data, np.uint8), _REDUCED_FLAGS[(mode, f)] | cv2.IMREAD_IGNORE_ORIENTATION)
        if img is None or img.shape[1] < target[0] or img.shape[0] < target[1]:
            return None
        # From here on this is img2dataset's own resize -> crop/pad -> encode, with two changes:
        # the output size comes from the TRUE size (not the reduced one, whose rounding could differ
        # by a pixel), and the albumentations transforms are built once instead of per image
        # (their pydantic validation cost ~5 ms per image). Copied because img2dataset's __call__
        # is one function with the decode inline: there is no hook to hand it a decoded array.
        img = fgeometric.resize(img, (target[1], target[0]), interpolation=self.downscale_interpolation)
        if self.resize_mode == ResizeMode.center_crop:
            img = self._album("crop")(image=img)["image"]
        elif self.resize_mode == ResizeMode.border:
            img = self._album("pad")(image=img)["image"]
        height, width = img.shape[:2]
        img_str = cv2.imencode(f".{self.encode_format}", img, params=self.encode_params)[1].tobytes()
        return img_str, width, height, ow, oh, None

    def _album(self, which: str) -> Any:
        """img2dataset's CenterCrop / PadIfNeeded with its exact arguments, built once per resizer.

        Cached in a plain dict attribute: albumentations transforms pickle, so the resizer still ships
        to Spark executors as img2dataset's does."""
        cache = self.__dict__.setdefault("_album_cache", {})
        if which not in cache:
            if which == "crop":
                cache[which] = A.CenterCrop(height=self.image_size, width=self.image_size)
            else:
                cache[which] = A.PadIfNeeded(min_height=self.image_size, min_width=self.image_size,
                                             border_mode=cv2.BORDER_CONSTANT, value=[255, 255, 255], p=1.0)
        return cache[which]
