"""Images wider than 8 bits per channel read the same in every reader (laiontools/core/images.py's rule).

PIL's ``convert("RGB")`` clips a 16-bit grey value at 255, so before the rule a 16-bit grey PNG embedded,
pHashed, matched against a takedown list and trained as a white image. Each reader is given a 16-bit
image and its 8-bit twin (the same high bytes, random low bytes: ``laiontools.testing.wide_images``) and
must see the same pixels.
"""

from __future__ import annotations

import io
import tarfile

import numpy as np
import pytest
from PIL import Image

from laiontools.core.images import to_rgb, wide_to_uint8
from laiontools.testing.wide_images import TWINS, wide_and_narrow

IMAGES = wide_and_narrow()
PAIRS = [pytest.param(w, n, id=w) for w, n in TWINS.items()]


def test_the_twins_differ_as_bytes_and_a_plain_convert_whitens_the_grey_one():
    """The fixture is what the tests below need: different bytes, and PIL alone gets the grey one wrong."""
    assert all(IMAGES[w] != IMAGES[n] for w, n in TWINS.items())
    with Image.open(io.BytesIO(IMAGES["grey16.png"])) as im:
        assert im.mode == "I;16" and np.asarray(im.convert("RGB")).mean() > 250


@pytest.mark.parametrize("wide,narrow", PAIRS)
def test_eval_set_decode_embed_load_and_to_rgb_see_the_8_bit_twin(wide, narrow):
    from laiontools.evalsets import decode_image
    from laiontools.models.embedder import Embedder
    from laiontools.stages.embed import load_image

    want = np.asarray(Image.open(io.BytesIO(IMAGES[narrow])).convert("RGB"))
    assert np.array_equal(np.asarray(decode_image(IMAGES[wide])), want)
    with Image.open(io.BytesIO(IMAGES[wide])) as im:
        assert np.array_equal(np.asarray(to_rgb(im)), want)
    pre = Embedder("lt-tiny", device="cpu").preprocess  # open_clip's own transform: converts to RGB itself
    assert np.array_equal(load_image(IMAGES[wide], pre).numpy(), load_image(IMAGES[narrow], pre).numpy())


@pytest.mark.parametrize("wide,narrow", PAIRS)
def test_phash_readers_and_gallery_see_the_8_bit_twin(wide, narrow, tmp_path):
    from laiontools.contracts.removal import content_hashes
    from laiontools.gallery import thumbnail_b64
    from laiontools.stages.dedup import _pool_phashes

    assert content_hashes(IMAGES[wide], True)["phash"] == content_hashes(IMAGES[narrow], True)["phash"]
    tar = str(tmp_path / "pool.tar")
    with tarfile.open(tar, "w") as tf:
        for key, name in (("0000000", wide), ("0000001", narrow)):
            data = IMAGES[name]
            ti = tarfile.TarInfo(f"{key}.{name.rsplit('.', 1)[1].replace('tif', 'png')}")
            ti.size = len(data)
            tf.addfile(ti, io.BytesIO(data))
    ph = _pool_phashes(tar)
    assert set(ph) == {"0000000", "0000001"} and ph["0000000"] == ph["0000001"]
    with Image.open(io.BytesIO(IMAGES[wide])) as a, Image.open(io.BytesIO(IMAGES[narrow])) as b:
        assert thumbnail_b64(a) == thumbnail_b64(b)


@pytest.mark.parametrize("wide,narrow", PAIRS)
def test_train_loader_decodes_the_8_bit_twin(wide, narrow, monkeypatch):
    """open_clip's loader decodes with webdataset's "pilrgb" handler; the train worker's patch hands it
    the 8-bit copy (restored after the test: the patch is process-wide)."""
    from webdataset import autodecode

    from laiontools.stages.train_worker import _decode_wide_images

    monkeypatch.setattr(autodecode.ImageHandler, "__call__", autodecode.ImageHandler.__call__)
    _decode_wide_images()
    handler = autodecode.ImageHandler("pilrgb")
    got = np.asarray(handler("x.png", IMAGES[wide]))
    assert np.array_equal(got, np.asarray(handler("x.png", IMAGES[narrow])))
    assert got.mean() < 200


def test_wide_to_uint8_rules_for_32_bit_and_float_arrays():
    """16-bit values give their high byte; a 32-bit integer image with no value over 255 is read as 8-bit;
    a float image as 0..1 when no value is over 1 (NaN as 0), else as 0..255, clipped."""
    assert wide_to_uint8(np.array([[0, 255, 256, 65535, 70000]], np.int32)).tolist() == [[0, 0, 1, 255, 255]]
    assert wide_to_uint8(np.array([[0, 7, 255]], np.int32)).tolist() == [[0, 7, 255]]
    assert wide_to_uint8(np.array([[0.0, 0.5, 1.0, np.nan]], np.float32)).tolist() == [[0, 128, 255, 0]]
    assert wide_to_uint8(np.array([[-3.0, 2.0, 300.0]], np.float32)).tolist() == [[0, 2, 255]]
    assert wide_to_uint8(np.array([[0x1234, 0xFF00]], np.uint16)).tolist() == [[0x12, 0xFF]]


def _transparent(mode: str) -> bytes:
    """A red square on a transparent background whose hidden colour is black (as most encoders leave it);
    the palette image also has an opaque black square."""
    a = np.zeros((120, 160, 4), np.uint8)
    a[30:90, 40:120] = (200, 30, 30, 255)
    a[30:90, 20:40, 3] = 100  # half transparent too
    im = Image.fromarray(a, "RGBA")
    if mode == "LA":
        im = im.convert("LA")
    elif mode == "P":  # index 0: transparent black; 1: opaque black (a black square); 2: the red
        idx = np.zeros((120, 160), np.uint8)
        idx[30:90, 40:120] = 2
        idx[100:110, 10:30] = 1
        im = Image.fromarray(idx, "P")
        im.putpalette([0, 0, 0, 0, 0, 0, 200, 30, 30])
        im.info["transparency"] = 0
    b = io.BytesIO()
    im.save(b, "PNG", **({"transparency": im.info["transparency"]} if mode == "P" else {}))
    return b.getvalue()


@pytest.mark.parametrize("mode", ["RGBA", "LA", "P"])
@pytest.mark.parametrize("resize_mode", ["border", "center_crop"])
def test_a_transparent_eval_image_in_the_pools_geometry_is_its_pool_copy(mode, resize_mode):
    """Dedup puts evaluation images through the pool's resize "as pool copies of them did". The download
    composites transparency on white (img2dataset's rule); the evaluation reader dropped the alpha (PIL's
    convert("RGB")), so the transparent background was black and the eval image never met its pool copy; a
    palette image kept its transparent colour as an RGB tRNS, so PoolGeometry's PNG turned every opaque
    black pixel white as well."""
    from laiontools.evalsets import decode_image
    from laiontools.web.resize import PoolGeometry, make_resizer

    data = _transparent(mode)
    settings = {"image_size": 64, "resize_mode": resize_mode}
    out = make_resizer(**settings)(io.BytesIO(data))
    pool = np.asarray(Image.open(io.BytesIO(out[0])).convert("RGB")).astype(int)
    ev = np.asarray(PoolGeometry(settings)(decode_image(data))).astype(int)
    assert np.abs(pool - ev).max() == 0, f"max diff {np.abs(pool - ev).max()}, mean {np.abs(pool - ev).mean():.1f}"


def test_readers_refuse_a_jpeg_of_thousands_of_scans():
    """The evaluation reader, embed and every other reader (open_image) decode with PIL's libjpeg, which
    decodes every scan: refused before decoding like the download's resizer refuses it."""
    from laiontools.core.images import ImageLimitError
    from laiontools.evalsets import decode_image
    from tests.test_resize import _many_scans

    with pytest.raises(ImageLimitError, match="scans"):
        decode_image(_many_scans(1024, 3000))
    assert decode_image(_many_scans(1024, 0)).size == (1024, 1024)
