"""A pool written directly as webdataset tars + manifest, without download: embed's benchmark input.

Same layout and members as the download stage (img2dataset's webdataset writer): ``shards/<id>.tar``
with ``<key>.jpg``, ``<key>.txt``, ``<key>.json`` (holding ``uid``), and a ``pool.manifest.json``
that validates against the schema. Images come from :func:`laiontools.synthetic.images.render_item`
(``realistic=True``: photo-like) resized to ``image_size`` the way img2dataset's default ``border``
mode does, and stored as JPEG quality 95 (img2dataset's default), so decode cost is realistic.
"""

from __future__ import annotations

import io
import json
import os
import tarfile

from laiontools.contracts import layout


def _img2dataset_like(img, size: int):  # border resize: keep aspect, pad to size x size
    from PIL import Image

    img = img.convert("RGB")
    scale = size / max(img.size)
    w, h = max(1, round(img.width * scale)), max(1, round(img.height * scale))
    img = img.resize((w, h), Image.LANCZOS)
    canvas = Image.new("RGB", (size, size), (255, 255, 255))
    canvas.paste(img, ((size - w) // 2, (size - h) // 2))
    return canvas


def _add(tf: tarfile.TarFile, name: str, data: bytes) -> None:
    ti = tarfile.TarInfo(name)
    ti.size = len(data)
    # img2dataset writes through webdataset's TarWriter: pax format with a float mtime, so a pax
    # header precedes every member. A fixed float keeps the bytes deterministic.
    ti.mtime = 1_700_000_000.5
    tf.addfile(ti, io.BytesIO(data))


def write_pool(out_dir: str, n_shards: int, per_shard: int, *, image_size: int = 256, realistic: bool = True,
               seed: int = 0, corrupt: tuple[int, ...] = ()) -> str:
    """Write a pool of `n_shards` x `per_shard` samples; returns the manifest path.

    `corrupt`: global sample indices whose JPEG bytes are truncated garbage (undecodable samples).
    """
    from laiontools.contracts.manifest import new_manifest, write_manifest
    from laiontools.contracts.uids import compute_uid, save_uids
    from laiontools.core.storage import sha256_bytes, sha256_file
    from laiontools.synthetic.images import render_item

    os.makedirs(os.path.join(out_dir, layout.SHARDS_DIR), exist_ok=True)
    shards, uids = [], []
    for s in range(n_shards):
        rel = f"{layout.SHARDS_DIR}/{s:05d}.tar"
        path = os.path.join(out_dir, rel)
        with tarfile.open(path, "w", format=tarfile.PAX_FORMAT) as tf:
            for j in range(per_shard):
                i = s * per_shard + j
                img, caption, _ = render_item(i, seed=seed, realistic=realistic)
                buf = io.BytesIO()
                _img2dataset_like(img, image_size).save(buf, format="JPEG", quality=95)
                jpg = buf.getvalue()
                if i in corrupt:
                    jpg = jpg[:40] + b"\x00garbage"
                url = f"http://127.0.0.1/bench/{seed}/{i}.jpg"
                uid = compute_uid(url, caption)
                uids.append(uid)
                key = f"{s:05d}{j:04d}"
                _add(tf, f"{key}.jpg", jpg)
                _add(tf, f"{key}.txt", caption.encode())
                _add(tf, f"{key}.json", json.dumps({"uid": uid, "key": key, "url": url, "caption": caption,
                                                    "status": "success"}).encode())
        sha, size = sha256_file(path)
        shards.append({"path": rel, "num_samples": per_shard, "bytes": size, "sha256": sha})
    uid_path = os.path.join(out_dir, layout.POOL_UIDS)
    uid_sha, count = save_uids(uid_path, uids)
    manifest = new_manifest(
        name=f"embed-testpool-{seed}", kind="pool", num_samples=len(uids), target_samples=None,
        uids={"path": layout.POOL_UIDS, "sha256": uid_sha, "count": count}, shards=shards,
        source_fingerprint=sha256_bytes(f"embed-testpool:{seed}:{n_shards}:{per_shard}:{image_size}".encode()),
        command=["laiontools.testing.embed_pool.write_pool"], catalog=None,
    )
    mpath = os.path.join(out_dir, layout.POOL_MANIFEST)
    write_manifest(mpath, manifest)
    return mpath
