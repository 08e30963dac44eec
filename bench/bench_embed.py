"""Benchmark: is the embed step data-bound? Whole step vs a bare model loop, same model, batch and run.

For each model: build (once, cached in bench-out/) a pool of realistic 256 px JPEG webdataset tars,
then measure in the same process:

* ``bare_image``: ``model.encode_image`` over pre-decoded, pre-preprocessed tensors (the issue's baseline);
* ``bare_model``: ``encode_image`` + open_clip's ``encode_text`` (full 77-token context) on pre-decoded
  tensors and pre-tokenized captions, i.e. what plain open_clip would spend on the same samples;
* ``step``: the embed step's work loop (read tar -> decode -> preprocess -> tokenize -> model -> write
  npy/parquet/markers), DataLoader decode workers as configured, model already loaded;
* ``step_cli``: ``embed.run`` end to end (manifest, model load, report) for reference;
* ``text_tower``: open_clip's ``encode_text`` vs the step's trimmed text encode, for the pool's
  captions and two longer caption-length mixes (the step's advantage depends on caption length).

The step reads the pool's tars ``--repeat`` times (default 16 for lt-tiny) so a fast model runs long
enough for DataLoader start-up not to dominate.
The baselines run before and after the step and are averaged (the machine is shared and noisy).
Ratios: step / bare_image (target >= 0.85 in the issue) and step / bare_model.

    .venv/bin/python bench/bench_embed.py                      # lt-tiny 512 images x16, ViT-B-32 256 images
    .venv/bin/python bench/bench_embed.py --models lt-tiny --images 512
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import shlex
import shutil
import sys
import time

DEFAULT_IMAGES = {"lt-tiny": 512, "lt-small": 512, "ViT-B-32": 256}
# The step reads the pool's tars this many times (as distinct shard ids) so a fast model runs long
# enough for DataLoader start-up not to dominate; baselines loop over the same images as often.
DEFAULT_REPEAT = {"lt-tiny": 16, "lt-small": 8, "ViT-B-32": 1}


def _pool(out_dir: str, n: int, per_shard: int) -> str:
    from laiontools.testing.embed_pool import write_pool

    n_shards = max(1, n // per_shard)
    d = os.path.join(out_dir, f"embed-pool-{n_shards}x{per_shard}")
    manifest = os.path.join(d, "pool.manifest.json")
    if not os.path.exists(manifest):
        t = time.time()
        # Build beside, then rename: a concurrent or killed build never leaves a half pool under `d`.
        tmp = f"{d}.tmp-{os.getpid()}"
        write_pool(tmp, n_shards, per_shard, image_size=256, realistic=True)
        shutil.rmtree(d, ignore_errors=True)
        os.replace(tmp, d)
        print(f"built bench pool {d} ({n_shards * per_shard} images) in {time.time() - t:.0f}s", flush=True)
    return manifest


def _bare(embedder, images, tokens, batch: int, with_text: bool) -> float:
    """Plain open_clip calls on pre-decoded float tensors / pre-tokenized captions: model.encode_image
    (+ model.encode_text over the full padded context, as open_clip runs it)."""
    import torch
    import torch.nn.functional as F

    model = embedder.model
    t = time.perf_counter()
    with torch.inference_mode():
        for i in range(0, len(images), batch):
            F.normalize(model.encode_image(images[i : i + batch]), dim=-1)
            if with_text:
                F.normalize(model.encode_text(tokens[i : i + batch]), dim=-1)
    return len(images) / (time.perf_counter() - t)


def bench_text(emb, caps: list[str], batch: int) -> dict:
    """Text tower alone: open_clip's encode_text (full padded context) vs the step's trimmed encode,
    for the pool's captions and for two longer caption-length mixes (LAION captions run from a few
    tokens to the 77-token cap): every caption repeated to a length drawn uniformly up to the
    context, and every caption at the cap."""
    import numpy as np
    import torch

    from laiontools.models.encode import encode_text_trimmed

    rng = np.random.default_rng(0)
    ctx = int(emb.tokenizer(["x"]).shape[1])
    n = min(len(caps), 4 * batch)
    mixes = {
        "pool captions": caps[:n],
        "uniform up to the cap": [" ".join([c] * int(rng.integers(1, 2 + ctx // 8))) for c in caps[:n]],
        "all at the cap": [" ".join([c] * ctx) for c in caps[:n]],
    }
    out = {}
    for name, mix in mixes.items():
        tok = emb.tokenizer(mix)
        lengths = (tok.argmax(dim=-1) + 1).float()
        rates = {}
        with torch.inference_mode():
            for label, fn in (("full", emb.model.encode_text), ("trimmed", lambda t: encode_text_trimmed(emb.model, t))):
                fn(tok[:batch])  # warm-up
                t = time.perf_counter()
                for i in range(0, n, batch):
                    fn(tok[i : i + batch])
                rates[label] = n / (time.perf_counter() - t)
        out[name] = {"tokens_mean": round(float(lengths.mean()), 1), "captions_s_full": round(rates["full"], 1),
                     "captions_s_trimmed": round(rates["trimmed"], 1), "speedup": round(rates["trimmed"] / rates["full"], 2)}
    return out


def bench_model(model: str, n: int, batch: int, workers: int, out_dir: str, per_shard: int, repeat: int = 1) -> dict:
    import torch
    from PIL import Image

    from laiontools.contracts.manifest import read_manifest
    from laiontools.models.embedder import Embedder
    from laiontools.stages import embed as embed_stage
    from laiontools.stages.embed import (
        EmbedConfig,
        _embed_tasks,
        _shard_tasks,
        read_shard_samples,
    )

    manifest = _pool(out_dir, n, per_shard)
    m = read_manifest(manifest)
    base_tasks = _shard_tasks(manifest, m)
    tasks = [dict(t, id=f"{t['id']}-r{k}") for k in range(repeat) for t in base_tasks]
    n = sum(t["num_samples"] for t in tasks)
    emb = Embedder(model, None, "cpu", batch, "auto")

    # Pre-decoded inputs for the baselines: the same images, decoded and preprocessed up front.
    import io

    imgs, caps = [], []
    for t in base_tasks:
        for _, parts in read_shard_samples(t["url"], None):
            with Image.open(io.BytesIO(parts["jpg"])) as im:
                imgs.append(emb.preprocess(im))
            caps.append(parts["txt"].decode())
    images = torch.stack(imgs * repeat)
    tokens = emb.tokenizer(caps * repeat)
    lengths = (tokens.argmax(dim=-1) + 1).float()
    _bare(emb, images[:batch], tokens[:batch], batch, True)  # warm-up (allocator, kernels)

    res: dict = {"model": model, "images": n, "batch_size": batch, "num_workers": workers,
                 "torch_threads": torch.get_num_threads(), "device": "cpu", "precision": emb.precision,
                 "repeat": repeat, "caption_tokens_mean": round(float(lengths.mean()), 1),
                 "caption_tokens_max": int(lengths.max()), "context_length": int(tokens.shape[1])}
    b_img = [_bare(emb, images, tokens, batch, False)]
    b_mod = [_bare(emb, images, tokens, batch, True)]

    cfg_out = os.path.join(out_dir, f"embed-out-{model}")
    shutil.rmtree(cfg_out, ignore_errors=True)
    cfg = EmbedConfig(manifest=manifest, output=cfg_out, model=model, batch_size=batch, num_workers=workers,
                      device="cpu")
    os.makedirs(cfg_out, exist_ok=True)
    t = time.perf_counter()
    stats = _embed_tasks(tasks, emb, cfg)
    step = n / (time.perf_counter() - t)
    assert sum(s["rows"] for s in stats) == n
    # Same, with --fast-decode (JPEG DCT-scaled decode; only differs when images are >= 2x the model input).
    shutil.rmtree(cfg_out, ignore_errors=True)
    fast_cfg = dataclasses.replace(cfg, fast_decode=True)
    t = time.perf_counter()
    _embed_tasks(tasks, emb, fast_cfg)
    step_fast = n / (time.perf_counter() - t)

    b_img.append(_bare(emb, images, tokens, batch, False))
    b_mod.append(_bare(emb, images, tokens, batch, True))

    shutil.rmtree(cfg_out, ignore_errors=True)
    t = time.perf_counter()
    embed_stage.run(cfg)
    step_cli = len(imgs) / (time.perf_counter() - t)  # the CLI embeds the pool once
    shutil.rmtree(cfg_out, ignore_errors=True)
    res["text_tower"] = bench_text(emb, caps, batch)

    bare_image = sum(b_img) / len(b_img)
    bare_model = sum(b_mod) / len(b_mod)
    res.update({
        "bare_image_img_s": round(bare_image, 2), "bare_image_runs": [round(x, 2) for x in b_img],
        "bare_model_img_s": round(bare_model, 2), "bare_model_runs": [round(x, 2) for x in b_mod],
        "step_img_s": round(step, 2), "step_fast_decode_img_s": round(step_fast, 2),
        "step_cli_img_s": round(step_cli, 2),
        "ratio_fast_decode_vs_bare_image": round(step_fast / bare_image, 3),
        "ratio_fast_decode_vs_bare_model": round(step_fast / bare_model, 3),
        "ratio_step_vs_bare_image": round(step / bare_image, 3),
        "ratio_step_vs_bare_model": round(step / bare_model, 3),
    })
    return res


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--models", nargs="+", default=["lt-tiny", "ViT-B-32"])
    ap.add_argument("--images", type=int, default=None, help="images per model (default: per-model, see DEFAULT_IMAGES)")
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--num-workers", type=int, default=1)
    ap.add_argument("--per-shard", type=int, default=128)
    ap.add_argument("--repeat", type=int, default=None, help="passes over the pool (default: per-model, see DEFAULT_REPEAT)")
    ap.add_argument("--out", default="bench-out")
    args = ap.parse_args(argv)
    os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")
    import logging

    logging.basicConfig(level=logging.WARNING)
    os.makedirs(args.out, exist_ok=True)
    results = []
    for model in args.models:
        n = args.images or DEFAULT_IMAGES.get(model, 256)
        r = bench_model(model, n, args.batch_size, args.num_workers, args.out, args.per_shard,
                        args.repeat or DEFAULT_REPEAT.get(model, 1))
        results.append(r)
        print(f"{model:10s} captions {r['caption_tokens_mean']} tokens on average, max {r['caption_tokens_max']}"
              f" of {r['context_length']}", flush=True)
        print(f"{model:10s} n={r['images']:5d} bs={r['batch_size']:4d} | bare encode_image {r['bare_image_img_s']:8.1f} img/s"
              f" | bare image+text {r['bare_model_img_s']:8.1f} | step {r['step_img_s']:8.1f}"
              f" | step/bare_image {r['ratio_step_vs_bare_image']:.2f} | step/bare_model {r['ratio_step_vs_bare_model']:.2f}"
              f" | end-to-end CLI {r['step_cli_img_s']:.1f}", flush=True)
        for mix, tr in r["text_tower"].items():
            print(f"{'':10s} text tower, {mix:22s} ({tr['tokens_mean']:5.1f} tokens): open_clip {tr['captions_s_full']:8.1f}"
                  f" captions/s, trimmed {tr['captions_s_trimmed']:8.1f} ({tr['speedup']:.2f}x)", flush=True)
        print(f"{'':10s} --fast-decode: step {r['step_fast_decode_img_s']:8.1f} img/s | vs bare_image "
              f"{r['ratio_fast_decode_vs_bare_image']:.2f} | vs bare_model {r['ratio_fast_decode_vs_bare_model']:.2f}",
              flush=True)
    command = "python " + " ".join(shlex.quote(a) for a in [sys.argv[0], *(argv if argv is not None else sys.argv[1:])])
    doc = {"bench": "embed", "command": command, "cpu_count": os.cpu_count(), "results": results}
    path = os.path.join(args.out, "embed.json")
    with open(path, "w") as f:
        json.dump(doc, f, indent=2)
    print(f"wrote {path}\ncommand: {command}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
