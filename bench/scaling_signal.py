"""Does the demo's synthetic world show a scaling signal? The demo's training, without the pipeline around it.

Trains an open_clip model (default lt-tiny, random init) with open_clip's CLIP loss and the train
stage's optimizer settings (AdamW, betas 0.9/0.98, eps 1e-6, wd 0.2, cosine schedule, 5% warmup) on
the first N items of the synthetic pool (nested, like `laiontools subsets`), for a fixed number of
samples seen, and scores it the way `laiontools evaluate` does on the demo's held-out set (items
the pool never holds): zero-shot top-1 over the 8 shape names, image->text R@5 over the captions.
Images are preprocessed once (the model's eval transform) so the loop measures learning, not JPEG
decoding. One JSON line per run, then a table.

    python bench/scaling_signal.py --scales 64,256,1024 --budgets 512,1024,2048,4096 --seeds 0,1 --threads 1 \
        --results-csv signal.csv && laiontools study fit --results signal.csv --output signal-fit

``--threads 1``: on a loaded machine two intra-op threads per process ran 7x slower than one.

This explores settings for the demo (which scales and budgets give a signal on 2 cores); the demo
itself runs every real stage.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time

os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")


def render(ids: list[int], seed: int, preprocess) -> tuple:
    import torch

    from laiontools.synthetic import SHAPES, render_item
    from laiontools.synthetic.images import COLOURS, TEXTURES

    ims, caps, labels = [], [], []
    for i in ids:
        im, cap, attrs = render_item(i, seed=seed)
        ims.append(preprocess(im.convert("RGB")))
        caps.append(cap)
        labels.append((SHAPES.index(attrs["shape"]), list(COLOURS).index(attrs["colour"]),
                       list(COLOURS).index(attrs["background"]), TEXTURES.index(attrs["texture"])))
    return torch.stack(ims), caps, labels


def evaluate(model, tokenizer, images, captions, labels) -> dict[str, float]:
    import torch

    from laiontools.stages.evaluate import classification_metrics, retrieval_metrics
    from laiontools.synthetic import SHAPES
    from laiontools.synthetic.images import COLOURS

    def classifier(names: list[str], templates: tuple[str, ...]):
        cls = []
        for c in names:
            e = model.encode_text(tokenizer([t.format(c=c) for t in templates]), normalize=True).mean(0)
            cls.append(e / e.norm())
        return torch.stack(cls, dim=1)

    model.eval()
    with torch.no_grad():
        img = model.encode_image(images, normalize=True)
        txt = model.encode_text(tokenizer(captions), normalize=True)
        shapes = classifier(list(SHAPES), ("a photo of a {c}.", "photo of a {c}", "a {c} on a background"))
        colours = classifier(list(COLOURS), ("a {c} shape.", "a photo of a {c} shape", "a {c} thing on a background"))
        # prompts in the captions' own phrasing (as the paper's ImageNet prompts follow web alt-text)
        shapes_cap = classifier(list(SHAPES), ("a medium {c} on a plain background", "illustration: {c}, a noisy background",
                                               "photo of a {c} and the text", "{c} drawn on a gradient background"))
        # prompt ensemble over the nuisance factors: each shape's classifier averages captions that name it with
        # every colour and background texture (the world's own caption templates), as ImageNet's 80 prompts do
        from laiontools.synthetic.images import _CAPTION_TEMPLATES, TEXTURE_PHRASES

        ens = []
        for c in SHAPES:
            texts = [t.format(size="medium", colour=col, shape=c, word="", texture=TEXTURE_PHRASES[tx].format(bg="grey"))
                     for t in _CAPTION_TEMPLATES for col in COLOURS for tx in TEXTURE_PHRASES]
            e = model.encode_text(tokenizer(texts), normalize=True).mean(0)
            ens.append(e / e.norm())
        shapes_ens = torch.stack(ens, dim=1)
        # background colour and texture: the largest areas of every image, named in every caption
        bg = classifier(list(COLOURS), tuple(ph.format(bg="{c}") for ph in TEXTURE_PHRASES.values()))
        from laiontools.synthetic.images import TEXTURES

        tex = classifier([TEXTURE_PHRASES[t].format(bg="").replace("  ", " ") for t in TEXTURES], ("{c}",))
    model.train()
    zb = classification_metrics((img @ bg).numpy(), [lab[2] for lab in labels], k=5)
    zt = classification_metrics((img @ tex).numpy(), [lab[3] for lab in labels], k=2)
    ze = classification_metrics((img @ shapes_ens).numpy(), [lab[0] for lab in labels], k=5)
    z = classification_metrics((img @ shapes).numpy(), [lab[0] for lab in labels], k=5)
    zc = classification_metrics((img @ colours).numpy(), [lab[1] for lab in labels], k=5)
    zs = classification_metrics((img @ shapes_cap).numpy(), [lab[0] for lab in labels], k=5)
    r = retrieval_metrics(img.numpy(), txt.numpy(), captions, ks=(1, 5))
    return {"top1": z["top1"], "top1_caption_prompts": zs["top1"], "top1_ensemble": ze["top1"], "colour_top1": zc["top1"], "bg_top1": zb["top1"], "texture_top1": zt["top1"], "R@5": r["image_to_text_R@5"], "t2i_R@5": r["text_to_image_R@5"]}


def train_one(model_name: str, pool: tuple, n: int, budget: int, batch: int, lr: float, seed: int, heldout: tuple) -> dict:
    import open_clip
    import torch

    from laiontools.models.registry import load_model

    torch.manual_seed(seed)
    b = load_model(model_name)
    model = b.model.train()
    images, captions = pool[0][:n], pool[1][:n]
    tokens = b.tokenizer(captions)
    steps = math.ceil(budget / batch)
    warm = max(1, int(0.05 * steps))
    decay = [p for nm, p in model.named_parameters() if p.ndim >= 2 and "embedding" not in nm]
    rest = [p for nm, p in model.named_parameters() if not (p.ndim >= 2 and "embedding" not in nm)]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": 0.2}, {"params": rest, "weight_decay": 0.0}],
                            lr=lr, betas=(0.9, 0.98), eps=1e-6)
    loss_fn = open_clip.ClipLoss()
    g = torch.Generator().manual_seed(seed)
    order = torch.empty(0, dtype=torch.long)
    t0 = time.perf_counter()
    for step in range(steps):
        cur = lr * (step + 1) / warm if step < warm else 0.5 * lr * (1 + math.cos(math.pi * (step - warm) / max(1, steps - warm)))
        for grp in opt.param_groups:
            grp["lr"] = cur
        if len(order) < batch:  # epochs over the subset, reshuffled each time
            order = torch.cat([order, torch.randperm(n, generator=g)])
        idx, order = order[:batch], order[batch:]
        out = model(images[idx], tokens[idx])
        if isinstance(out, dict):
            out = (out["image_features"], out["text_features"], out["logit_scale"])
        loss = loss_fn(*out[:3])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        with torch.no_grad():
            model.logit_scale.clamp_(0, math.log(100))
    dt = time.perf_counter() - t0
    res = {"n": n, "budget": budget, "seed": seed, "lr": lr, "batch": batch, "steps": steps, "epochs": budget / n,
           "final_loss": float(loss.detach()), "train_s": round(dt, 1), "samples_per_s": round(steps * batch / dt, 1)}
    res.update(evaluate(model, b.tokenizer, *heldout))
    return res


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", default="lt-tiny")
    p.add_argument("--scales", default="64,1024", help="pool sizes (nested: the first N items)")
    p.add_argument("--budgets", default="4096", help="samples seen")
    p.add_argument("--seeds", default="0")
    p.add_argument("--lr", type=float, default=5e-4)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--heldout", type=int, default=200)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--pool-seed", type=int, default=0)
    p.add_argument("--results-csv", default=None, help="also write the runs as a study results.csv (for `laiontools study fit`)")
    a = p.parse_args(argv)
    import torch

    from laiontools.models.registry import load_model

    torch.set_num_threads(a.threads)
    scales = [int(x) for x in a.scales.split(",")]
    budgets = [int(x) for x in a.budgets.split(",")]
    seeds = [int(x) for x in a.seeds.split(",")]
    pre = load_model(a.model).preprocess
    t = time.perf_counter()
    pool = render(list(range(max(scales))), a.pool_seed, pre)
    heldout = render(list(range(5_000_000, 5_000_000 + a.heldout)), a.pool_seed + 7, pre)
    print(f"# rendered {max(scales)} pool + {a.heldout} held-out items in {time.perf_counter() - t:.1f}s", file=sys.stderr)
    rows = []
    for budget in budgets:
        for n in scales:
            for seed in seeds:
                r = train_one(a.model, pool, n, budget, a.batch_size, a.lr, seed, heldout)
                print(json.dumps(r), flush=True)
                rows.append(r)
    if a.results_csv:
        import pandas as pd

        from laiontools.scaling import model_gmacs

        g = model_gmacs(a.model)["gmacs_per_sample"]
        pd.DataFrame([{
            "run_id": f"{a.model}__{r['n']}__{r['budget']}__seed{r['seed']}", "model": a.model, "scale": str(r["n"]),
            "dataset_samples": r["n"], "samples_seen": r["budget"], "seed": r["seed"], "gmacs_per_sample": g,
            "compute_gmacs": g * r["budget"], "final_loss": r["final_loss"], "heldout/zeroshot_top1": r["top1"], "heldout/bg_top1": r["bg_top1"],
            "heldout/image_to_text_R@5": r["R@5"], "heldout/text_to_image_R@5": r["t2i_R@5"],
        } for r in rows]).to_csv(a.results_csv, index=False)  # fmt: skip
    print(f"chance: shape top-1 {1 / 8:.3f}, colour top-1 {1 / 12:.3f}, R@5 {5 / a.heldout:.3f}")
    for r in rows:
        print(f"N={r['n']:>6} budget={r['budget']:>7} seed={r['seed']} epochs={r['epochs']:>7.1f} loss={r['final_loss']:.3f} "
              f"top1={r['top1']:.3f} top1_caption_prompts={r['top1_caption_prompts']:.3f} top1_ensemble={r['top1_ensemble']:.3f} colour_top1={r['colour_top1']:.3f} bg_top1={r['bg_top1']:.3f} texture_top1={r['texture_top1']:.3f} R@5={r['R@5']:.3f} t2i_R@5={r['t2i_R@5']:.3f} ({r['samples_per_s']} samples/s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
