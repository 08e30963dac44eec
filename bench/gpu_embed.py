"""GPU benchmark of the embed step: images/s per GPU for ViT-B-32 and ViT-L-14 (bf16), with anchors.

Ready to run on a machine with one CUDA GPU (random init weights: throughput does not depend on them):

    .venv/bin/python bench/gpu_embed.py                                  # 16 shards x 512 realistic JPEGs
    .venv/bin/python bench/gpu_embed.py --models ViT-B-32 --shards 8 --batch-size 512 --num-workers 12

For each model it reports, in the same run:
* ``bare``: encode_image + encode_text on tensors already on the GPU (the model's ceiling), and
  ``bare_image_only``: encode_image alone (the issue's baseline);
* ``step``: the embed step's work loop (tar read -> JPEG decode + preprocess in DataLoader workers ->
  pinned host memory -> autocast bf16 forward of images and captions -> float16 npy/parquet writes);
and, beside them, clip-retrieval's published per-GPU figures (A100: ~2,500 img/s ViT-B/32, ~312 img/s
ViT-L/14) and our goal on an H100 (>= 2x those). Writes bench-out/gpu_embed.json.

``--device cpu --shards 1 --per-shard 16 --models lt-tiny`` is a smoke test of this script on a CPU.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import shutil
import sys
import time
from concurrent.futures import ProcessPoolExecutor

ANCHORS = {  # clip-retrieval README, per A100, whole inference step
    "ViT-B-32": 2500.0,
    "ViT-L-14": 312.0,
}
GOAL_FACTOR = 2.0


def _write_shard(args: tuple[str, int, int, int]) -> dict:
    from laiontools.testing.embed_pool import write_pool

    d, s, per_shard, size = args
    sub = os.path.join(d, f"part{s:05d}")
    m = write_pool(sub, 1, per_shard, image_size=size, realistic=True, seed=s)
    from laiontools.core.storage import read_json

    return read_json(m)["shards"][0] | {"_dir": sub}


def build_pool(out_dir: str, shards: int, per_shard: int, size: int) -> str:
    """A pool of `shards` x `per_shard` realistic JPEGs, shards rendered in parallel; cached."""
    from laiontools.contracts.manifest import new_manifest, write_manifest
    from laiontools.core.storage import sha256_bytes

    d = os.path.join(out_dir, f"gpu-embed-pool-{shards}x{per_shard}-{size}")
    manifest = os.path.join(d, "pool.manifest.json")
    if os.path.exists(manifest):
        return manifest
    shutil.rmtree(d, ignore_errors=True)
    os.makedirs(os.path.join(d, "shards"))
    t = time.time()
    with ProcessPoolExecutor(max_workers=os.cpu_count()) as ex:
        parts = list(ex.map(_write_shard, [(d, s, per_shard, size) for s in range(shards)]))
    entries = []
    for s, p in enumerate(parts):
        rel = f"shards/{s:05d}.tar"
        os.replace(os.path.join(p.pop("_dir"), p["path"]), os.path.join(d, rel))
        entries.append({**p, "path": rel})
    n = shards * per_shard
    manifest_doc = new_manifest(
        name="gpu-embed-bench", kind="pool", num_samples=n, target_samples=None,
        uids={"path": "pool.uids.npy", "sha256": "0" * 64, "count": n}, shards=entries,
        source_fingerprint=sha256_bytes(f"gpu-embed-bench:{shards}:{per_shard}:{size}".encode()),
        command=["bench/gpu_embed.py"],
    )
    write_manifest(manifest, manifest_doc)
    print(f"built {n} images in {time.time() - t:.0f}s -> {d}", flush=True)
    return manifest


def _data_only(tasks: list[dict], emb, cfg) -> float:
    """img/s of the step's data path alone: the same DataLoader (tar read, decode, preprocess, pinning),
    no model. The step's ceiling on this machine's CPUs."""
    from torch.utils.data import DataLoader

    from laiontools.stages.embed import ShardSpool, _auto_workers, _shard_batches_iterable

    workers = _auto_workers(cfg.num_workers, emb.device)
    # as the step does: with workers, each shard fetched and checked once into a spool the workers read
    spool = ShardSpool(tasks, cfg.verify_shards, workers) if workers else None
    try:
        ds = _shard_batches_iterable()(tasks, emb.batch_preprocess, emb.tokenizer, cfg.batch_size,
                                       tuple(emb.info["image_size"]), cfg.verify_shards, cfg.fast_decode,
                                       spool.dir if spool is not None else None)
        loader = DataLoader(ds, batch_size=None, num_workers=workers, pin_memory=emb.device.startswith("cuda"),
                            prefetch_factor=4 if workers else None)
        t, n = time.perf_counter(), 0
        if spool is not None:
            spool.start()
        for b in loader:
            n += len(b.get("keys", ()))
        return n / (time.perf_counter() - t)
    finally:
        if spool is not None:
            spool.close()


def bench(model: str, manifest: str, batch: int, workers: int, device: str, precision: str, out_dir: str,
          repeat: int = 1) -> dict:
    import torch

    from laiontools.contracts.manifest import read_manifest
    from laiontools.models.embedder import Embedder
    from laiontools.stages.embed import EmbedConfig, _embed_tasks, _shard_tasks

    pool_tasks = _shard_tasks(manifest, read_manifest(manifest))
    # The timed run reads every shard `repeat` times under distinct shard ids, so that each DataLoader
    # worker has many batches (with one batch per worker the figure is worker start-up, not throughput).
    tasks = [dict(t, id=f"{t['id']}-r{r}") for r in range(repeat) for t in pool_tasks]
    n = sum(t["num_samples"] for t in tasks)
    emb = Embedder(model, None, device, batch, precision)
    cuda = emb.device.startswith("cuda")

    # Bare model: random inputs already on the device, same batch size and precision.
    size = emb.info["image_size"]
    x = torch.randn(batch, 3, *size, device=emb.device)
    tok = emb.tokenizer(["a photo of a large red star on a striped blue background"] * batch).to(emb.device)
    iters = max(3, min(50, n // batch))

    def rate(images, tokens) -> float:
        for _ in range(3):
            emb.encode(images, tokens)
        if cuda:
            torch.cuda.synchronize()
        t = time.perf_counter()
        for _ in range(iters):
            emb.encode(images, tokens)
        if cuda:
            torch.cuda.synchronize()
        return iters * batch / (time.perf_counter() - t)

    bare = rate(x, tok)
    bare_image = rate(x, None)  # the baseline: encode_image alone

    out = os.path.join(out_dir, f"gpu-embed-out-{model}")
    cfg = EmbedConfig(manifest=manifest, output=out, model=model, batch_size=batch, num_workers=workers,
                      device=emb.device, precision=precision)
    runs = []
    for run_tasks in (pool_tasks, tasks):  # a first pass over the pool warms page cache and cudnn; report the second
        shutil.rmtree(out, ignore_errors=True)
        os.makedirs(out)
        m = sum(t["num_samples"] for t in run_tasks)
        t = time.perf_counter()
        stats = _embed_tasks(run_tasks, emb, cfg)
        if cuda:
            torch.cuda.synchronize()
        runs.append(m / (time.perf_counter() - t))
        assert sum(s["rows"] for s in stats) == m
    shutil.rmtree(out, ignore_errors=True)
    step = runs[-1]
    data_only = _data_only(tasks, emb, cfg)
    anchor = ANCHORS.get(model)
    return {
        "model": model, "device": emb.device,
        "device_name": torch.cuda.get_device_name(emb.device) if cuda else "cpu",
        "precision": emb.precision, "batch_size": batch, "num_workers": workers, "images": n,
        "bare_img_s": round(bare, 1), "bare_image_only_img_s": round(bare_image, 1),
        "repeat": repeat, "data_only_img_s": round(data_only, 1),
        "step_img_s": round(step, 1), "step_runs": [round(r, 1) for r in runs],
        "step_vs_data_only": round(step / data_only, 3),
        "step_vs_bare": round(step / bare, 3), "step_vs_bare_image_only": round(step / bare_image, 3),
        "anchor_clip_retrieval_a100_img_s": anchor,
        "goal_img_s": anchor * GOAL_FACTOR if anchor else None,
        "step_vs_anchor": round(step / anchor, 2) if anchor else None,
    }


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--models", nargs="+", default=["ViT-B-32", "ViT-L-14"])
    ap.add_argument("--shards", type=int, default=16)
    ap.add_argument("--per-shard", type=int, default=512)
    ap.add_argument("--image-size", type=int, default=256, help="stored JPEG size (img2dataset default 256)")
    ap.add_argument("--batch-size", type=int, default=512)
    ap.add_argument("--num-workers", type=int, default=-1, help="-1: min(cpu count, 16)")
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--precision", default="amp_bf16")
    ap.add_argument("--repeat", type=int, default=4, help="timed runs read every shard this many times")
    ap.add_argument("--out", default="bench-out")
    args = ap.parse_args(argv)
    os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")
    import logging

    import torch

    logging.basicConfig(level=logging.WARNING)
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        print("no CUDA device: this benchmark needs a GPU (use --device cpu for a smoke test)", file=sys.stderr)
        return 2
    workers = args.num_workers if args.num_workers >= 0 else min(os.cpu_count() or 1, 16)
    os.makedirs(args.out, exist_ok=True)
    manifest = build_pool(args.out, args.shards, args.per_shard, args.image_size)
    results = []
    for model in args.models:
        r = bench(model, manifest, args.batch_size, workers, args.device, args.precision, args.out, args.repeat)
        results.append(r)
        anchor = (f" | clip-retrieval A100 {r['anchor_clip_retrieval_a100_img_s']:.0f}, goal >= {r['goal_img_s']:.0f}"
                  f" -> {r['step_vs_anchor']:.2f}x anchor") if r["anchor_clip_retrieval_a100_img_s"] else ""
        print(f"{model:9s} on {r['device_name']}: bare model {r['bare_img_s']:8.1f} img/s | bare encode_image "
              f"{r['bare_image_only_img_s']:8.1f} | step {r['step_img_s']:8.1f} img/s ({r['step_vs_bare']:.2f} of bare, "
              f"{r['step_vs_bare_image_only']:.2f} of encode_image) | data path alone {r['data_only_img_s']:8.1f}"
              f"{anchor}", flush=True)
    command = "python " + " ".join(shlex.quote(a) for a in [sys.argv[0], *(argv if argv is not None else sys.argv[1:])])
    path = os.path.join(args.out, "gpu_embed.json")
    with open(path, "w") as f:
        json.dump({"bench": "gpu_embed", "command": command, "cpu_count": os.cpu_count(), "results": results}, f, indent=2)
    print(f"wrote {path}\ncommand: {command}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
