"""Like with like: can dedup find pool copies of non-square evaluation images, with and without the pool's geometry?

    .venv/bin/python bench/bench_dedup_geometry.py [border center_crop keep_ratio no]

Per resize mode: 8 photo-like evaluation images (96x48 and 48x96), a pool of 40 unrelated photos plus a
re-encoded and a resized copy of every evaluation image, stored through the download's own resizer at
64 px (:mod:`laiontools.testing.planted_pool`), embedded by the embed stage with lt-tiny. For evaluation
images as read (``none``) and through the pool's geometry (``pool``, :class:`laiontools.web.resize.PoolGeometry`),
prints: the highest cosine of any unrelated pool image to any evaluation image, the lowest cosine of a copy
to its source, how many of the 16 copies are above that highest negative (what any threshold needs), and
the pHash Hamming distance of each copy to its source. Baseline and fix are measured in the same run.
"""

from __future__ import annotations

import io
import os
import tarfile
import tempfile

import numpy as np

os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")


def main(modes: list[str]) -> None:
    import imagehash
    from PIL import Image

    from laiontools.contracts.embeddings import read_embedding_shard, read_pool
    from laiontools.models.embedder import embedder_for
    from laiontools.stages import embed as embed_stage
    from laiontools.stages.dedup import _phash_image, eval_geometry
    from laiontools.testing.planted_pool import download_settings, jpeg, near_copy, photo, write_resized_pool

    evals = [photo(100 + i, (96, 48) if i % 2 == 0 else (48, 96)) for i in range(8)]
    print("mode         geometry  max_negative  min_copy  copies_above_negatives  phash_distances")
    for mode in modes:
        rng = np.random.default_rng(7)
        with tempfile.TemporaryDirectory(prefix="bench-geo-") as d:
            samples = [{"bytes": jpeg(photo(i)), "caption": f"photo {i}", "url": f"http://127.0.0.2/{i}.jpg"} for i in range(40)]
            for e, img in enumerate(evals):
                for k in ("reencode", "resize"):
                    samples.append({"bytes": near_copy(img, k, rng), "caption": f"copy {e} {k}", "url": f"http://127.0.0.3/{e}{k}.jpg"})
            m, _ = write_resized_pool(f"{d}/pool", samples, download_settings(mode, 64), per_shard=30)
            embed_stage.run(embed_stage.EmbedConfig(manifest=m, output=f"{d}/emb", model="lt-tiny", num_workers=0, batch_size=32))
            pool = read_pool(f"{d}/emb")
            geo, _ = eval_geometry(pool, "pool")
            embedder = embedder_for(f"{d}/emb", device="cpu")
            v = np.concatenate([read_embedding_shard(f"{d}/emb", s)[0] for s in pool.shard_ids]).astype(np.float32)
            pool_imgs = []
            for s in pool.shard_ids:
                with tarfile.open(pool.tar_by_shard[s]) as tf:
                    for mm in sorted(tf.getmembers(), key=lambda m: m.name):
                        if mm.name.endswith(".jpg"):
                            pool_imgs.append(Image.open(io.BytesIO(tf.extractfile(mm).read())).convert("RGB"))
            for name, g in (("none", None), ("pool", geo)):
                imgs = [g(x) if g else x for x in evals]
                e = np.asarray(embedder.embed_images(imgs), dtype=np.float32)
                sims = v @ e.T
                neg = float(sims[:40].max())
                cop = [float(sims[40 + 2 * i + j, i]) for i in range(8) for j in range(2)]
                ph = [imagehash.hex_to_hash(_phash_image(x)) for x in imgs]
                dist = [int(imagehash.hex_to_hash(_phash_image(pool_imgs[40 + 2 * i + j])) - ph[i]) for i in range(8) for j in range(2)]
                print(f"{mode:<12} {name:<8}  {neg:.4f}        {min(cop):.4f}    {sum(c > neg for c in cop):>2} / 16               "
                      f"{min(dist)}-{max(dist)}", flush=True)


if __name__ == "__main__":
    import argparse

    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("modes", nargs="*", default=["border", "center_crop", "keep_ratio", "no"],
                    choices=["border", "center_crop", "keep_ratio", "keep_ratio_largest", "no"],
                    help="download resize modes to measure (default: border center_crop keep_ratio no)")
    main(ap.parse_args().modes)
