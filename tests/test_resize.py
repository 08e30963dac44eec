"""FastResizer against img2dataset's Resizer on the same bytes: same sizes, same errors, close pixels.

Everything is real: synthetic realistic JPEGs (512-800 px), PIL-made PNG / grayscale / CMYK /
EXIF-rotated / damaged inputs, img2dataset's own Resizer as the reference.
"""

from __future__ import annotations

import io
import os
import pickle

import numpy as np
import pytest

os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")

import cv2
from img2dataset.resizer import Resizer
from PIL import Image

from laiontools.stages.download import DownloadConfig
from laiontools.synthetic import render_item
from laiontools.web.resize import (
    DepthSafeResizer,
    FastResizer,
    jpeg_header,
    make_resizer,
    reduction_factor,
    resize_params,
    resizer_kwargs,
    target_size,
)

MODES = ("border", "keep_ratio", "keep_ratio_largest", "center_crop")
# Mean |fast - img2dataset| over pixels (0..255), per output size. Measured on these images at
# ~1.3-2.6 (256 px, 1/2-scale decode) and ~3.8-8.5 (64 px, 1/8-scale decode): the realistic images
# carry sensor noise, which a DCT-domain reduction and an area filter average differently, and the
# re-encode at quality 95 adds its own error. Against a float Lanczos reference both resizers are
# within ~0.1 (256 px) to ~1 (64 px) of each other (see BENCHMARKS.md, "FastResizer").
MEAN_ABS_BOUND = {256: 3.5, 64: 10.0}


def _jpeg(im: Image.Image, **kw) -> bytes:
    b = io.BytesIO()
    im.save(b, "JPEG", quality=90, **kw)
    return b.getvalue()


@pytest.fixture(scope="module")
def realistic() -> list[bytes]:
    return [_jpeg(render_item(i, realistic=True)[0]) for i in range(6)]


def _both(data: bytes, *args, **kw) -> tuple[tuple, tuple]:
    return Resizer(*args, **kw)(io.BytesIO(data)), FastResizer(*args, **kw)(io.BytesIO(data))


def _pixels(b: bytes) -> np.ndarray:
    return cv2.imdecode(np.frombuffer(b, np.uint8), cv2.IMREAD_UNCHANGED).astype(np.int16)


@pytest.mark.parametrize("size", sorted(MEAN_ABS_BOUND))
@pytest.mark.parametrize("mode", MODES)
def test_same_sizes_close_pixels(realistic, mode, size):
    for data in realistic:
        ref, fast = _both(data, size, mode, False)
        assert ref[5] is None and fast[5] is None
        # width, height, original_width, original_height: exactly img2dataset's
        assert fast[1:5] == ref[1:5]
        w, h = Image.open(io.BytesIO(data)).size
        assert fast[3:5] == (w, h)  # the true size, not the reduced decode's
        assert reduction_factor(w, h, target_size(w, h, size, mode)) >= 2  # the fast path was taken...
        assert fast[0] != ref[0]  # ...and it is a different decode, not a pass-through
        diff = np.abs(_pixels(fast[0]) - _pixels(ref[0])).mean()
        assert diff < MEAN_ABS_BOUND[size], (mode, size, (w, h), diff)


def test_mode_no_and_small_images_are_img2datasets_bytes(realistic):
    data = realistic[0]
    assert _both(data, 256, "no", False)[0] == _both(data, 256, "no", False)[1]
    # 120 px images to 64 px: a 1/2 decode (60 px) would be too small, so img2dataset's path runs
    small = _jpeg(render_item(3)[0].resize((120, 100)))
    for mode in MODES:
        ref, fast = _both(small, 64, mode, False)
        assert fast == ref
    # resize_only_if_bigger with an image already small enough: no resize at all, as img2dataset
    ref, fast = _both(small, 256, "keep_ratio", True)
    assert fast == ref and fast[1:3] == (120, 100)


def test_target_size_matches_albumentations():
    import albumentations as A

    for w, h in ((800, 512), (513, 799), (777, 777), (1000, 3), (3, 1000)):
        img = np.zeros((h, w, 3), np.uint8)
        for mode, tr in (("keep_ratio", A.SmallestMaxSize), ("border", A.LongestMaxSize)):
            out = tr(max_size=256, interpolation=cv2.INTER_AREA, p=1.0)(image=img)["image"]
            assert target_size(w, h, 256, mode) == (out.shape[1], out.shape[0])
    assert target_size(800, 600, 256, "no") is None


def test_grayscale_jpeg(realistic):
    gray = _jpeg(Image.open(io.BytesIO(realistic[1])).convert("L"))
    assert jpeg_header(gray)[2] == "L"
    for mode in MODES:
        ref, fast = _both(gray, 256, mode, False)
        assert fast[1:] == ref[1:]
        assert _pixels(fast[0]).ndim == 2 and _pixels(ref[0]).ndim == 2


def test_exif_orientation_is_ignored_like_img2dataset(realistic):
    im = Image.open(io.BytesIO(realistic[2]))
    assert im.size[0] != im.size[1]
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90: IMREAD_UNCHANGED ignores it, so must we
    data = _jpeg(im, exif=exif.tobytes())
    ref, fast = _both(data, 128, "keep_ratio", False)
    assert fast[1:] == ref[1:] and fast[3:5] == im.size


def test_non_jpeg_alpha_cmyk_go_through_img2dataset(realistic):
    im = Image.open(io.BytesIO(realistic[0]))
    inputs = {}
    b = io.BytesIO()
    im.save(b, "PNG")
    inputs["png"] = b.getvalue()
    rgba = im.convert("RGBA")
    rgba.putalpha(128)
    b = io.BytesIO()
    rgba.save(b, "PNG")
    inputs["png_alpha"] = b.getvalue()
    inputs["cmyk_jpeg"] = _jpeg(im.convert("CMYK"))
    b = io.BytesIO()
    im.save(b, "WEBP", quality=80)
    inputs["webp"] = b.getvalue()
    assert jpeg_header(inputs["cmyk_jpeg"])[2] == "CMYK"
    for name, data in inputs.items():
        for mode in MODES:
            ref, fast = _both(data, 256, mode, False)
            assert fast == ref, (name, mode)
            assert ref[5] is None


def test_damaged_inputs_same_errors(realistic):
    data = realistic[0]
    header_only = data[:600]  # SOI + tables + frame header: PIL reads a size, libjpeg has no scans
    body_garbled = data[:600] + bytes(np.random.default_rng(0).integers(0, 256, 5000, dtype=np.uint8))
    cases = {"garbage": b"not an image at all", "empty": b"", "soi_only": b"\xff\xd8\xff",
             "header_only": header_only, "body_garbled": body_garbled, "truncated": data[: len(data) // 2]}
    for name, bad in cases.items():
        ref, fast = _both(bad, 256, "border", False)
        assert fast[5] == ref[5], name  # same error string (or both None)
        assert fast[1:5] == ref[1:5], name
    assert _both(b"garbage", 256, "border", False)[1][5] == "Image decoding error"


def test_limits_use_true_size(realistic):
    data = realistic[0]
    w, h = Image.open(io.BytesIO(data)).size
    # 1/8 decode at 64 px is ~w/8 on a side: a check on the reduced size would wrongly reject these
    ok = FastResizer(64, "border", False, min_image_size=min(w, h), max_image_area=w * h)(io.BytesIO(data))
    assert ok[5] is None and ok[3:5] == (w, h)
    for kw, err in (({"min_image_size": min(w, h) + 1}, "image too small"),
                    ({"max_image_area": w * h - 1}, "image area too large"),
                    ({"max_aspect_ratio": max(w, h) / min(w, h) * 0.999}, "aspect ratio too large")):
        ref, fast = _both(data, 64, "border", False, **kw)
        assert fast == ref and fast[5] == err


def test_pickles_and_make_resizer(realistic):
    cfg = DownloadConfig(input="in", output="out", image_size=64, resize_mode="center_crop")
    r = make_resizer(**resize_params(cfg.to_dict()))
    assert type(r) is FastResizer and r.image_size == 64
    before = r(io.BytesIO(realistic[0]))
    shipped = pickle.loads(pickle.dumps(r))  # as Spark ships it inside the Downloader
    assert shipped(io.BytesIO(realistic[0])) == before
    cfg.fast_decode = False  # img2dataset's own decode, only 16-bit images handed over as 8-bit
    assert type(make_resizer(**resize_params(cfg.to_dict()))) is DepthSafeResizer
    # built from its own parameters only: a whole config is not accepted
    with pytest.raises(TypeError):
        make_resizer(cfg)


@pytest.mark.parametrize("fast_decode", [True, False])
def test_16_bit_images_resize_as_their_8_bit_twins(fast_decode):
    """Both resizers store a 16-bit PNG or TIFF as its 8-bit twin (img2dataset alone made it white); with
    all re-encoding disabled the bytes stay as they came."""
    from laiontools.testing.wide_images import TWINS, wide_and_narrow

    images = wide_and_narrow()
    r = make_resizer(fast_decode=fast_decode, image_size=48, resize_mode="border")
    for wide, narrow in TWINS.items():
        got, want = r(io.BytesIO(images[wide])), r(io.BytesIO(images[narrow]))
        assert got[-1] is None and got == want, wide
    raw = DepthSafeResizer(**{**resizer_kwargs(image_size=48, resize_mode="border"), "disable_all_reencoding": True})
    assert raw(io.BytesIO(images["grey16.png"]))[0] == images["grey16.png"]


def _jpeg_segments(data: bytes) -> list[tuple[int, int, int]]:
    """(marker, start, end) of each segment of a JPEG, a scan with its entropy-coded data (test's own parser)."""
    out, i = [], 2
    while data[i + 1] != 0xD9:
        j = i + 2 + int.from_bytes(data[i + 2:i + 4], "big")
        if data[i + 1] == 0xDA:
            while data[j] != 0xFF or data[j + 1] == 0 or 0xD0 <= data[j + 1] <= 0xD7:
                j += 1
        out.append((data[i + 1], i, j))
        i = j
    return out


def _many_scans(side: int, extra: int) -> bytes:
    """A progressive JPEG of a flat `side` px image with its smallest scan (a dozen bytes: one EOB run
    over every block) repeated `extra` times before EOI. libjpeg warns and decodes every one of them."""
    b = io.BytesIO()
    Image.new("RGB", (side, side), (120, 60, 200)).save(b, "JPEG", progressive=True, quality=90)
    data = b.getvalue()
    _, s, e = min((x for x in _jpeg_segments(data) if x[0] == 0xDA), key=lambda x: x[2] - x[1])
    return data[:-2] + data[s:e] * extra + b"\xff\xd9"


@pytest.mark.parametrize("fast_decode", [True, False])
def test_a_jpeg_of_thousands_of_scans_is_refused_before_decoding(fast_decode):
    """Decoding time is scans x pixels and no limit bounded the scans: 8000x8000 with 1000 repeated
    12-byte scans (+31 kB) took +2.5 s here, so a 20 MB file (under --max-bytes, under the pixel limit)
    held a download thread for ~30 minutes, past every fetch deadline. Refused as a failed resize."""
    r = make_resizer(fast_decode=fast_decode, image_size=256, resize_mode="border")
    bomb = _many_scans(1024, 3000)
    assert len(bomb) < 100_000
    out = r(io.BytesIO(bomb))
    assert out[0] is None and "scans" in (out[5] or ""), out[1:]
    ok = r(io.BytesIO(_many_scans(1024, 0)))  # the same image as its encoder wrote it (10 scans)
    assert ok[5] is None and ok[1:5] == (256, 256, 1024, 1024)


def test_jpeg_scan_count_reads_the_file_as_libjpeg_does():
    """An EXIF thumbnail's scans (inside APP1) and what follows EOI (a motion photo's video, an MPO's next
    image) are not the image's; an FF D9 inside a COM segment between scans does not hide later scans."""
    from laiontools.core.images import jpeg_scan_count

    base = _many_scans(64, 0)
    assert jpeg_scan_count(base) == 10
    thumb = _many_scans(16, 600)
    im = Image.open(io.BytesIO(base))
    with_thumb = io.BytesIO()
    exif = Image.Exif()
    exif[0x010F] = "x"
    im.save(with_thumb, "JPEG", progressive=True, exif=exif.tobytes() + thumb[:60000])
    assert jpeg_scan_count(with_thumb.getvalue(), stop_above=500) < 20
    assert jpeg_scan_count(base + thumb, stop_above=500) == 10
    segs = _jpeg_segments(base)
    first_scan_end = next(e for m, _, e in segs if m == 0xDA)
    com = b"\xff\xfe\x00\x04\xff\xd9"
    hidden = base[:first_scan_end] + com + base[first_scan_end:-2] + _many_scans(64, 600)[len(base) - 2:]
    assert jpeg_scan_count(hidden, stop_above=500) > 500


@pytest.mark.parametrize("fast_decode", [True, False])
def test_a_transparent_png_is_composited_without_float64_copies(fast_decode):
    """img2dataset composites alpha on white in float64: ~76 bytes per pixel (4 for the decoded image),
    so a transparent PNG at the 89 Mpx limit (a few hundred kB) took ~6 GB per download thread. The
    same output bytes as img2dataset's own Resizer, at a fraction of the memory."""
    import tracemalloc

    h, w = 1500, 2000
    y, x = np.mgrid[0:h, 0:w]
    rgba = np.stack([x % 256, y % 256, (x + y) % 256, (x * y) % 256], -1).astype(np.uint8)
    b = io.BytesIO()
    Image.fromarray(rgba, "RGBA").save(b, "PNG", compress_level=1)
    kw = resizer_kwargs(image_size=256, resize_mode="border")
    want = Resizer(**kw)(io.BytesIO(b.getvalue()))
    r = make_resizer(fast_decode=fast_decode, image_size=256, resize_mode="border")
    tracemalloc.start()
    try:
        got = r(io.BytesIO(b.getvalue()))
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert got[5] is None and got == want
    assert peak / (h * w) < 20, f"{peak / (h * w):.1f} bytes per pixel"


@pytest.mark.parametrize("fast_decode", [True, False])
def test_a_grey_png_with_a_transparent_value_is_composited_on_white(fast_decode):
    """img2dataset composites an RGB or palette PNG's tRNS colour on white, but OpenCV's reading drops a
    grey PNG's tRNS value: those pixels were stored as their grey value instead of white."""
    _, x = np.mgrid[0:40, 0:50]
    grey = ((x * 5) % 256).astype(np.uint8)
    b = io.BytesIO()
    Image.fromarray(grey, "L").save(b, "PNG", transparency=25)
    with Image.open(io.BytesIO(b.getvalue())) as im:  # PIL's own reading of the tRNS value, plainly
        a = np.asarray(im.convert("RGBA")).astype(np.float64)
    want = np.rint(a[..., :3] * a[..., 3:] / 255 + 255 - a[..., 3:]).astype(np.uint8)
    assert (want == 255).all(-1).sum() >= 40  # the x == 5 column (and nothing of it is 255 by itself)
    r = make_resizer(fast_decode=fast_decode, image_size=64, resize_mode="no", encode_format="png", encode_quality=1)
    out = r(io.BytesIO(b.getvalue()))
    got = np.asarray(Image.open(io.BytesIO(out[0])).convert("RGB"))
    assert np.abs(got.astype(int) - want).max() == 0, f"max diff {np.abs(got.astype(int) - want).max()}"
