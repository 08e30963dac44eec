"""Thumbnails and pool images for the self-contained HTML galleries (dedup, semdedup).

Library code shared by the stages that show pool samples to a person: thumbnails are inlined as
base64 JPEG so one HTML file opens anywhere.
"""

from __future__ import annotations

import base64
import io
import logging
from typing import Any

from laiontools.core.storage import url_to_fs

log = logging.getLogger(__name__)
THUMB = 160
_GALLERY_EXTS = ("jpg", "jpeg", "png", "webp", "txt")


def thumbnail_b64(image: Any, size: int = THUMB) -> str:
    """data: URI of a JPEG thumbnail of a PIL image (longest side `size`)."""
    from laiontools.core.images import to_rgb

    im = to_rgb(image).copy()
    im.thumbnail((size, size))
    buf = io.BytesIO()
    im.save(buf, format="JPEG", quality=85)
    return "data:image/jpeg;base64," + base64.b64encode(buf.getvalue()).decode()


def pool_images(tar_url: str, keys: set[str]) -> dict[str, tuple[Any, str | None]]:
    """key -> (PIL image, caption) for the wanted keys of one pool tar (stops once all are found)."""
    from laiontools.core.images import error_text, open_image
    from laiontools.wds.samples import iter_samples, meta_key

    found: dict[str, dict[str, bytes]] = {}
    fs, p = url_to_fs(tar_url)
    with fs.open(p, "rb") as raw:
        for key, parts in iter_samples(raw, fs.size(p), suffixes=_GALLERY_EXTS, on_duplicate="last"):
            key = meta_key(key)  # the key as embed stored it, which `keys` come from
            if key not in keys:
                continue
            got = found.setdefault(key, {})
            for ext, data in parts.items():
                got["txt" if ext == "txt" else "img"] = data
            if len(found) == len(keys) and all(len(v) == 2 for v in found.values()):
                break
    out = {}
    for key, parts in found.items():
        try:
            im = open_image(parts["img"])
            im.load()
        except Exception as e:  # noqa: BLE001 - shown as missing in the gallery rather than failing the run
            log.warning("gallery: %s key %s unreadable: %s", tar_url, key, error_text(e))
            continue
        cap = parts.get("txt")
        out[key] = (im, cap.decode("utf-8", "replace") if cap is not None else None)
    return out
