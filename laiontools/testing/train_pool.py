"""Small synthetic data for training/evaluation tests and benchmarks: a resharded-style subset and an eval set.

Images are coloured shapes on a plain background and captions name colour and shape ("a photo of a
red circle"), so a tiny model trained for a few hundred steps can learn a little and zero-shot
classification over the same colours has signal. Everything is written with PIL and ``tarfile``
in the layout the reshard stage produces (webdataset tars of ``<key>.jpg/.txt/.json`` + ``sizes.json``)
and the manifest contract (kind subset, uid file, shard list with counts and sha256).
"""

from __future__ import annotations

import io
import json
import os
import random
import tarfile
from collections.abc import Collection
from typing import Any

COLORS = {
    "red": (220, 30, 30),
    "green": (30, 180, 40),
    "blue": (30, 60, 220),
    "yellow": (235, 220, 40),
    "purple": (140, 40, 170),
    "orange": (245, 140, 20),
}
SHAPES = ("circle", "square", "triangle")


def _image(color: str, shape: str, rng: random.Random, size: int) -> bytes:
    from PIL import Image, ImageDraw

    bg = tuple(rng.randint(200, 255) for _ in range(3))
    im = Image.new("RGB", (size, size), bg)
    d = ImageDraw.Draw(im)
    r = rng.randint(size // 5, size // 3)
    cx, cy = rng.randint(r, size - r), rng.randint(r, size - r)
    fill = tuple(min(255, max(0, c + rng.randint(-20, 20))) for c in COLORS[color])
    if shape == "circle":
        d.ellipse([cx - r, cy - r, cx + r, cy + r], fill=fill)
    elif shape == "square":
        d.rectangle([cx - r, cy - r, cx + r, cy + r], fill=fill)
    else:
        d.polygon([(cx, cy - r), (cx - r, cy + r), (cx + r, cy + r)], fill=fill)
    buf = io.BytesIO()
    im.save(buf, format="JPEG", quality=90)
    return buf.getvalue()


def _add(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    info.mtime = 0
    tar.addfile(info, io.BytesIO(data))


def write_resharded_subset(
    out_dir: str, n_shards: int = 2, per_shard: int = 16, seed: int = 0, image_size: int = 64, name: str = "synthetic",
    undecodable: bool | Collection[str] = False,
) -> str:
    """Write ``n_shards`` webdataset tars of ``per_shard`` samples and a kind=subset manifest. Returns its path.
    Sample ``i`` of shard ``s`` has the key ``f"{s:05d}{i:04d}"``. `undecodable`: True: every ``.jpg`` is
    random bytes that no image decoder reads; a collection of keys: those samples' ``.jpg`` only."""
    from laiontools.contracts.manifest import new_manifest, write_manifest
    from laiontools.contracts.uids import save_uids, uid_of
    from laiontools.core.storage import sha256_file, write_json

    rng = random.Random(seed)
    os.makedirs(os.path.join(out_dir, "shards"), exist_ok=True)
    shards, uids, sizes = [], [], {}
    for s in range(n_shards):
        rel = f"shards/{s:05d}.tar"
        path = os.path.join(out_dir, rel)
        with tarfile.open(path, "w") as tar:
            for i in range(per_shard):
                color, shape = rng.choice(list(COLORS)), rng.choice(SHAPES)
                caption = f"a photo of a {color} {shape}"
                url = f"http://127.0.0.1/{name}/{s}/{i}.jpg"
                uid = uid_of(url, caption)
                uids.append(uid)
                key = f"{s:05d}{i:04d}"
                bad = undecodable is True or (not isinstance(undecodable, bool) and key in undecodable)
                _add(tar, f"{key}.jpg", rng.randbytes(600) if bad else _image(color, shape, rng, image_size))
                _add(tar, f"{key}.txt", caption.encode())
                _add(tar, f"{key}.json", json.dumps({"uid": uid, "url": url, "caption": caption, "key": key}).encode())
        sha, nbytes = sha256_file(path)
        shards.append({"path": rel, "num_samples": per_shard, "bytes": nbytes, "sha256": sha})
        sizes[os.path.basename(rel)] = per_shard
    write_json(os.path.join(out_dir, "shards", "sizes.json"), sizes)
    usha, ucount = save_uids(os.path.join(out_dir, "subset.uids.npy"), uids)
    m = new_manifest(
        name=name,
        kind="subset",
        num_samples=n_shards * per_shard,
        target_samples=n_shards * per_shard,
        uids={"path": "subset.uids.npy", "sha256": usha, "count": ucount},
        shards=shards,
        source_fingerprint="0" * 64,
        command=["train_fixtures.write_resharded_subset"],
    )
    path = os.path.join(out_dir, "subset.manifest.json")
    write_manifest(path, m)
    return path


def write_color_evalset(out_dir: str, per_class: int = 4, seed: int = 1, image_size: int = 64) -> dict[str, Any]:
    """A clip_benchmark-style webdataset eval set: class = colour, with captions (zero-shot AND retrieval).

    Writes ``<out_dir>/test/0.tar`` (``<key>.jpg``, ``<key>.cls``, ``<key>.txt``) and
    ``<out_dir>/classnames.txt``. Returns ``{"path", "classnames", "n_items"}``.
    """
    rng = random.Random(seed)
    classes = list(COLORS)
    os.makedirs(os.path.join(out_dir, "test"), exist_ok=True)
    n = 0
    with tarfile.open(os.path.join(out_dir, "test", "0.tar"), "w") as tar:
        for label, color in enumerate(classes):
            for k in range(per_class):
                shape = SHAPES[k % len(SHAPES)]
                key = f"{n:06d}"
                _add(tar, f"{key}.jpg", _image(color, shape, rng, image_size))
                _add(tar, f"{key}.cls", str(label).encode())
                _add(tar, f"{key}.txt", f"a photo of a {color} {shape}".encode())
                n += 1
    with open(os.path.join(out_dir, "classnames.txt"), "w") as f:
        f.write("\n".join(classes) + "\n")
    return {"path": out_dir, "classnames": classes, "n_items": n}
