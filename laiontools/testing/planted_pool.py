"""Pools whose images went through the download's own resizer, with planted copies (tests, benches).

:func:`write_resized_pool` stores each source image the way ``laiontools download`` does: the
web bytes are handed to :func:`laiontools.web.resize.make_resizer` built from a download's settings
(image size, resize mode, codec), and the pool manifest records those settings under
``download.settings`` exactly as the download stage writes them. Layout and members are the
download's (img2dataset's webdataset writer): ``shards/<id>.tar`` with ``<key>.jpg``, ``.txt``,
``.json`` (holding ``uid``), a sorted uid file and a manifest that validates against the schema.

:func:`photo` and :func:`near_copy` make photo-like sources and the kinds of near-duplicates found
on the web (re-encodes, resizes, crops), so tests can plant copies of known origin among distinct
images and measure what a stage finds.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import tarfile
from collections.abc import Sequence
from typing import Any

import numpy as np

from laiontools.contracts import layout

COPY_KINDS = ("reencode", "resize", "crop")


def download_settings(resize_mode: str = "border", image_size: int = 64, **over: Any) -> dict[str, Any]:
    """The settings dict a download with these options records (``DownloadConfig.semantic()``)."""
    from laiontools.stages.download import DownloadConfig

    # input/output are required by the config but not part of a pool's geometry; semantic() drops output.
    over = {"input": "planted-pool", "output": "planted-pool", **over}
    return DownloadConfig(resize_mode=resize_mode, image_size=image_size, **over).semantic()


def photo(i: int, size: tuple[int, int] | None = None, seed: int = 0) -> Any:
    """A deterministic photo-like PIL image (synthetic ``realistic`` render), resized to `size` if given."""
    from PIL import Image

    from laiontools.synthetic.images import render_item

    img, _caption, _ = render_item(i, seed=seed, realistic=True)
    img = img.convert("RGB")
    return img.resize(size, Image.LANCZOS) if size else img


def jpeg(img: Any, quality: int = 90) -> bytes:
    buf = io.BytesIO()
    img.convert("RGB").save(buf, format="JPEG", quality=quality)
    return buf.getvalue()


def near_copy(img: Any, kind: str, rng: np.random.Generator) -> bytes:
    """JPEG bytes of a near-duplicate of `img` as it appears on the web.

    reencode: same pixels at JPEG quality 40-60; resize: scaled by 0.6-0.8 or 1.25-1.5 (quality 85);
    crop: 88-95 % of each side at a random offset (quality 90).
    """
    from PIL import Image

    w, h = img.size
    if kind == "reencode":
        return jpeg(img, int(rng.integers(40, 61)))
    if kind == "resize":
        f = float(rng.choice([rng.uniform(0.6, 0.8), rng.uniform(1.25, 1.5)]))
        return jpeg(img.resize((max(8, round(w * f)), max(8, round(h * f))), Image.LANCZOS), 85)
    if kind == "crop":
        f = float(rng.uniform(0.88, 0.95))
        cw, ch = max(8, round(w * f)), max(8, round(h * f))
        x0, y0 = int(rng.integers(0, w - cw + 1)), int(rng.integers(0, h - ch + 1))
        return jpeg(img.crop((x0, y0, x0 + cw, y0 + ch)), 90)
    raise ValueError(f"unknown copy kind {kind!r}; known: {COPY_KINDS}")


def _add(tf: tarfile.TarFile, name: str, data: bytes) -> None:
    ti = tarfile.TarInfo(name)
    ti.size = len(data)
    ti.mtime = 1_700_000_000.5  # pax float mtime as webdataset writes; fixed so bytes are deterministic
    tf.addfile(ti, io.BytesIO(data))


def write_resized_pool(out_dir: str, samples: Sequence[dict[str, Any]], settings: dict[str, Any], *,
                       per_shard: int = 50, name: str = "planted-pool") -> tuple[str, list[str]]:
    """Write `samples` (``{"bytes": web image bytes, "caption": str, "url": str}``) as a pool.

    Every image goes through the download's resizer built from `settings` (see :func:`download_settings`);
    an image the resizer rejects raises ValueError naming its URL (test inputs must all be storable).
    Returns (manifest path, uid per sample in input order).
    """
    from laiontools.contracts.manifest import new_manifest, write_manifest
    from laiontools.contracts.uids import compute_uid, save_uids
    from laiontools.core.storage import sha256_bytes, sha256_file
    from laiontools.web.resize import make_resizer, resize_params

    resizer = make_resizer(**resize_params(settings))
    os.makedirs(os.path.join(out_dir, layout.SHARDS_DIR), exist_ok=True)
    shards, uids = [], []
    for s, lo in enumerate(range(0, len(samples), per_shard)):
        rel = f"{layout.SHARDS_DIR}/{s:05d}.tar"
        path = os.path.join(out_dir, rel)
        with tarfile.open(path, "w", format=tarfile.PAX_FORMAT) as tf:
            chunk = samples[lo:lo + per_shard]
            for j, smp in enumerate(chunk):
                img, w, h, ow, oh, err = resizer(io.BytesIO(smp["bytes"]))
                if err is not None:
                    raise ValueError(f"{smp['url']}: the download's resizer rejected it: {err}")
                uid = compute_uid(smp["url"], smp["caption"])
                uids.append(uid)
                key = f"{s:05d}{j:04d}"
                _add(tf, f"{key}.jpg", img)
                _add(tf, f"{key}.txt", smp["caption"].encode())
                _add(tf, f"{key}.json", json.dumps({
                    "uid": uid, "key": key, "url": smp["url"], "caption": smp["caption"], "status": "success",
                    "width": w, "height": h, "original_width": ow, "original_height": oh,
                    "sha256": hashlib.sha256(smp["bytes"]).hexdigest()}).encode())  # of the bytes as downloaded, as img2dataset
        sha, size = sha256_file(path)
        shards.append({"path": rel, "num_samples": len(chunk), "bytes": size, "sha256": sha})
    uid_sha, count = save_uids(os.path.join(out_dir, layout.POOL_UIDS), uids)
    fp = sha256_bytes(json.dumps([name, [u for u in uids], settings], sort_keys=True, default=str).encode())
    manifest = new_manifest(
        name=name, kind="pool", num_samples=len(uids), target_samples=None,
        uids={"path": layout.POOL_UIDS, "sha256": uid_sha, "count": count}, shards=shards,
        source_fingerprint=fp, command=["laiontools.testing.planted_pool.write_resized_pool"], catalog=None,
        download={"profile": None, "settings": settings},
    )
    mpath = os.path.join(out_dir, layout.POOL_MANIFEST)
    write_manifest(mpath, manifest)
    return mpath, uids
