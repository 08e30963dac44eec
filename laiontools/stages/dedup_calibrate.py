"""`laiontools dedup calibrate`: measure which similarity threshold separates copies from the rest.

Transformed copies of a sample of evaluation images (the transforms below) are embedded with the
pool's Embedder and searched against the evaluation index together with a sample of real pool
embeddings (the negatives). For a grid of thresholds it reports, per transform, recall (share of
copies flagged) and precision (flagged copies / (flagged copies + flagged negatives)), as a table
(``calibrate.txt``, ``calibrate.json``) and a plot (``calibrate.png``).

Recommendation rule (``calibrate.json`` -> ``recommendation``): take the interval of thresholds at
which the easy transforms (exact, re-encoded, resized) reach recall >= 0.95 while no sampled negative
is flagged (precision 1.0): from ``lowest_safe`` (just above the highest negative) to
``highest_for_recall``. Recommend its *midpoint*, rounded to 4 decimals. Both ends are optimistic
estimates: the pool's tail of unrelated-but-similar images reaches higher than a small negative
sample does, and copies in the wild are further from their source than the planted ones (a real
download adds resizing and re-encoding on top). The midpoint keeps an equal margin on both sides.
When the interval is empty there is no recommendation and the report says why (the model cannot
separate copies from the rest at that recall, as can happen with a random-init model).

Caveat: the negatives are real pool samples; if the pool already contains copies of evaluation
images they count as false positives. Pass ``--exclude-uids`` (e.g. a previous dedup's
exclude.uids.npy) to leave known copies out.
"""

from __future__ import annotations

import argparse
import dataclasses
import io
import logging
import math
import time
from typing import Any

import numpy as np

from laiontools.contracts import layout
from laiontools.core.config import ConfigError, StageConfig, add_config_args
from laiontools.core.errors import UserError
from laiontools.core.stage import StageResult, stage_entry
from laiontools.core.storage import (
    PARQUET_READ,
    atomic_write_bytes,
    ensure_output_dir,
    join,
    write_json,
    write_record,
)

log = logging.getLogger(__name__)

TRANSFORMS = ("exact", "reencode", "resize", "crop", "flip", "colorshift", "text")
EASY_TRANSFORMS = ("exact", "reencode", "resize")
RECALL_TARGET = 0.95


@dataclasses.dataclass
class CalibrateConfig(StageConfig):
    embeddings: str = dataclasses.field(default="", metadata={"help": "embed output folder of the pool"})
    evalset: list[str] = dataclasses.field(default_factory=list, metadata={"help": "name=path[:format], repeatable"})
    evalsets_yaml: str | None = dataclasses.field(default=None, metadata={"help": "YAML list of {name, path, format}"})
    output: str = dataclasses.field(default="", metadata={"help": "output folder (a dedup output folder reuses its index)"})
    plant_items: int = dataclasses.field(default=100, metadata={"help": "evaluation images copied per transform"})
    pool_sample: int = dataclasses.field(default=2000, metadata={"help": "pool embeddings sampled as negatives"})
    transforms: list[str] = dataclasses.field(default_factory=lambda: list(TRANSFORMS), metadata={"help": f"from {TRANSFORMS}"})
    exclude_uids: str | None = dataclasses.field(default=None, metadata={"help": "uid file of pool samples to leave out of the negatives"})
    seed: int = dataclasses.field(default=0, metadata={"help": "sampling and transform seed"})
    index: str = dataclasses.field(default="flat", metadata={"help": "flat or ivf (as for dedup)"})
    nlist: int | None = dataclasses.field(default=None, metadata={"help": "IVF lists"})
    nprobe: int = dataclasses.field(default=16, metadata={"help": "IVF lists probed"})
    pretrained: str | None = dataclasses.field(default=None, metadata={"help": "checkpoint path when model.json names one by sha256"})
    device: str = dataclasses.field(default="auto", metadata={"help": "auto, cpu, cuda"})
    batch_size: int = dataclasses.field(default=64, metadata={"help": "images per embedding batch"})
    eval_geometry: str = dataclasses.field(default="pool", metadata={"help": "pool: evaluation images, and the planted copies, go through the pool's download resize as a real download makes them (as for dedup); none: as read"})

    def validate(self) -> None:
        self.check_required()
        from laiontools.stages.dedup import EVAL_GEOMETRIES

        if self.eval_geometry not in EVAL_GEOMETRIES:
            raise ConfigError(f"eval_geometry must be one of {EVAL_GEOMETRIES}, got {self.eval_geometry!r}")
        bad = [t for t in self.transforms if t not in TRANSFORMS]
        if bad:
            raise ConfigError(f"unknown transform(s) {bad}; known: {TRANSFORMS}")
        if self.plant_items < 1 or self.pool_sample < 1:
            raise ConfigError("plant_items and pool_sample must be >= 1 (the threshold is chosen between the planted "
                              "copies and pool samples that are not copies: without pool samples any threshold flags none)")

    def check_required(self) -> None:
        """Required settings (called from validate, so a config without them cannot be built)."""
        if not self.embeddings or not self.output:
            raise ConfigError("dedup calibrate needs --embeddings and --output")
        if not self.evalset and not self.evalsets_yaml:
            raise ConfigError("dedup calibrate needs --evalset name=path[:format] or --evalsets-yaml FILE")


def apply_transform(image: Any, transform: str, rng: np.random.Generator) -> Any:
    """A transformed copy of a PIL image, as near-duplicates occur on the web."""
    from PIL import Image, ImageDraw, ImageEnhance, ImageOps

    from laiontools.core.images import to_rgb

    img = to_rgb(image)
    w, h = img.size
    if transform == "exact":
        return img
    if transform == "reencode":  # a low-quality JPEG re-save
        buf = io.BytesIO()
        img.save(buf, format="JPEG", quality=int(rng.integers(30, 60)))
        return Image.open(io.BytesIO(buf.getvalue())).convert("RGB")
    if transform == "resize":  # downscaled and saved as JPEG, as a downloader (img2dataset) stores it
        f = float(rng.choice([0.5, 0.75]))
        small = img.resize((max(8, int(w * f)), max(8, int(h * f))), Image.LANCZOS)
        buf = io.BytesIO()
        small.save(buf, format="JPEG", quality=95)
        return Image.open(io.BytesIO(buf.getvalue())).convert("RGB")
    if transform == "crop":  # 70-90% of each side, random position
        f = float(rng.uniform(0.7, 0.9))
        cw, ch = max(1, int(w * f)), max(1, int(h * f))
        x0, y0 = int(rng.integers(0, w - cw + 1)), int(rng.integers(0, h - ch + 1))
        return img.crop((x0, y0, x0 + cw, y0 + ch))
    if transform == "flip":
        return ImageOps.mirror(img)
    if transform == "colorshift":
        out = ImageEnhance.Brightness(img).enhance(float(rng.uniform(0.75, 1.25)))
        out = ImageEnhance.Color(out).enhance(float(rng.uniform(0.5, 1.5)))
        return ImageEnhance.Contrast(out).enhance(float(rng.uniform(0.8, 1.2)))
    if transform == "text":  # a caption banner, as memes and stock watermarks add
        out = img.copy()
        d = ImageDraw.Draw(out)
        band = max(8, h // 6)
        d.rectangle((0, h - band, w, h), fill=(255, 255, 255))
        d.text((3, h - band + 1), "BUY NOW 50% OFF", fill=(200, 0, 0))
        return out
    raise ValueError(f"unknown transform {transform!r}")


def _sample_negatives(emb_dir: str, n: int, seed: int, exclude: np.ndarray | None) -> tuple[np.ndarray, list[str]]:
    """Up to `n` valid pool embeddings (float32) + uids, sampled evenly over shards (seeded)."""
    from laiontools.contracts.embeddings import done_shards
    from laiontools.contracts.uids import contains, uids_to_array
    from laiontools.stages.dedup import read_embedding_shard

    shards = done_shards(emb_dir)
    if not shards:
        raise UserError(f"{emb_dir} holds no finished embedding shards")
    rng = np.random.default_rng(seed)
    per = max(1, math.ceil(n / len(shards)))
    vecs, uids = [], []
    for sid in (rng.permutation(shards) if n else []):
        emb, meta = read_embedding_shard(emb_dir, sid)
        u = meta.column("uid").to_pylist()
        st = meta.column("embed_status").to_pylist() if "embed_status" in meta.column_names else ["ok"] * len(u)
        ok = np.array([s in (None, "ok", "success") for s in st], dtype=bool)
        if exclude is not None and len(exclude):
            # a row embed recorded as failed may have no uid (unreadable .json, a uid repeated in the shard):
            # it is no negative anyway, and has no uid to look up
            has = np.flatnonzero(ok & np.array([x is not None for x in u], dtype=bool))
            ok[has] &= ~contains(exclude, uids_to_array([u[i] for i in has]))
        idx = np.flatnonzero(ok)
        pick = np.sort(rng.choice(idx, size=min(per, len(idx)), replace=False)) if len(idx) else idx
        vecs.append(np.asarray(emb[pick], dtype=np.float32))
        uids += [u[i] for i in pick]
        if len(uids) >= n:
            break
    if not vecs:
        return np.zeros((0, 1), np.float32), []
    v = np.concatenate(vecs)[:n]
    return v, uids[:n]


def _rates(pos: dict[str, np.ndarray], neg: np.ndarray, t: float) -> dict[str, dict[str, float]]:
    fp = int((neg >= t).sum())
    out = {}
    for name, s in pos.items():
        tp = int((s >= t).sum())
        out[name] = {"recall": tp / max(1, len(s)), "precision": (tp / (tp + fp)) if tp + fp else 1.0, "tp": tp, "fp": fp}
    return out


# No recommendation, and at most 1 in this many pool negatives as close as the planted copies: the
# report says they may be copies already in the pool, not that the model cannot separate copies.
COPIES_IN_POOL_SHARE = 20


def recommend(pos: dict[str, np.ndarray], neg: np.ndarray, easy: tuple[str, ...] = EASY_TRANSFORMS) -> dict[str, Any]:
    """Apply the rule in the module docstring; exact, not limited to the reported grid."""
    easy_s = np.concatenate([pos[t] for t in easy if t in pos]) if any(t in pos for t in easy) else np.zeros(0)
    max_neg = float(neg.max()) if len(neg) else -1.0
    if not len(easy_s):
        return {"threshold": None, "reason": f"no easy transform ({', '.join(easy)}) among the planted copies"}
    need = math.ceil(RECALL_TARGET * len(easy_s))
    t_rec = float(np.sort(easy_s)[::-1][need - 1])  # highest t with >= need easy copies at or above it
    out: dict[str, Any] = {"max_negative_similarity": max_neg, "highest_for_recall": t_rec,
                           "rule": f"midpoint of the thresholds with recall >= {RECALL_TARGET} on {list(easy)} and no negative flagged"}
    if t_rec <= max_neg:
        close = int((neg >= t_rec).sum())
        why = "this model does not separate copies from unrelated images"
        if close <= max(1, len(neg) // COPIES_IN_POOL_SHARE):
            # A few negatives as close as the planted copies: more likely copies of the eval set already in
            # the pool (what dedup is for) than a model that cannot tell images apart.
            why = (f"only {close} of {len(neg)} pool negatives reach it: they may be copies of the evaluation set "
                   "already in the pool (calibrate.json's highest_negatives names them) rather than a weak model; "
                   "leave known copies out with --exclude-uids (e.g. a strict dedup run's exclude.uids.npy) and "
                   "calibrate again")
        out.update({"threshold": None, "lowest_safe": None, "negatives_at_recall": close, "reason": (
            f"no threshold reaches recall {RECALL_TARGET} on the easy transforms (needs <= {t_rec:.5f}) without flagging "
            f"pool negatives (highest negative {max_neg:.5f}): {why}")})
        return out
    # Smallest 4-decimal threshold strictly above the highest negative (flagging is similarity >= threshold).
    safe_r = math.ceil(max_neg * 1e4) / 1e4
    if safe_r <= max_neg:
        safe_r = round(safe_r + 1e-4, 4)
    out["lowest_safe"] = safe_r if safe_r <= t_rec else float(np.nextafter(max_neg, 2.0))
    mid = round((out["lowest_safe"] + t_rec) / 2, 4)
    out["threshold"] = mid if out["lowest_safe"] <= mid <= t_rec else (out["lowest_safe"] + t_rec) / 2
    return out


STAGE = "dedup calibrate"
CONFIG = CalibrateConfig


@stage_entry(STAGE, accepts=("dedup",))  # "a dedup output folder reuses its index"
def run(cfg: CalibrateConfig, spark: Any = None) -> StageResult:
    """Run the calibration; writes calibrate.{json,txt,png} into cfg.output; details = the json content.

    ``spark`` is unused (the calibration runs in this process); it is accepted for the one stage API.
    """
    from laiontools import index as DI
    from laiontools.contracts.uids import load_uids
    from laiontools.evalsets import iter_items, load_evalsets
    from laiontools.stages.dedup import DedupConfig, eval_geometry, make_embedder, prepared_index, read_pool

    # the uid file is read (and refused if it is not one) before any image is embedded
    excl = None
    if cfg.exclude_uids:
        from laiontools.contracts.uids import as_sorted_set
        from laiontools.core.errors import InputError

        try:
            excl = as_sorted_set(np.asarray(load_uids(cfg.exclude_uids, mmap=False)))
        except (ValueError, OSError) as e:  # another dtype, pickled objects, not a .npy, a folder
            raise InputError(f"--exclude-uids {cfg.exclude_uids}: not a uid file ({e}); give a .npy written by "
                             "laiontools (dedup's exclude.uids.npy, a subset's uid file)") from None
    ensure_output_dir(cfg.output)
    write_record(join(cfg.output, layout.CALIBRATE_SETTINGS_JSON), {"stage": STAGE, **cfg.to_dict()})
    sets = load_evalsets(cfg.evalset, cfg.evalsets_yaml)
    pool = read_pool(cfg.embeddings)
    dcfg = DedupConfig(embeddings=cfg.embeddings, evalset=cfg.evalset, evalsets_yaml=cfg.evalsets_yaml, output=cfg.output,
                       index=cfg.index, nlist=cfg.nlist, nprobe=cfg.nprobe, pretrained=cfg.pretrained, device=cfg.device,
                       batch_size=cfg.batch_size, gpu=True, eval_geometry=cfg.eval_geometry)
    # the index as built, or loaded from its file checked against index.json (index.read_checked: no copy of its
    # bytes held beside it, where the bytes kept and deserialized were three copies at once); the items' bytes as
    # built or checked
    prepared = prepared_index(dcfg, pool, sets, keep_index=True)
    index_desc, items_bytes = prepared.desc, prepared.items_bytes
    index = (DI.on_device(prepared.index) if prepared.index is not None else
             DI.read_checked(DI.index_paths(cfg.output)["index"], index_desc["index_sha256"]))
    del prepared
    embedder = make_embedder(cfg.embeddings, cfg.pretrained, cfg.device, cfg.batch_size)
    DI.check_model(pool.model, embedder.info, cfg.embeddings, "the calibration Embedder")

    # Seeded choice of readable evaluation items over all sets (reservoir: one pass, bounded memory).
    rng = np.random.default_rng(cfg.seed)
    chosen: list[tuple[str, str, Any]] = []
    seen = 0
    for es in sets:
        for item in iter_items(es):
            if item.image is None:
                continue
            seen += 1
            if len(chosen) < cfg.plant_items:
                chosen.append((es.name, item.item_id, item.image))
            else:
                j = int(rng.integers(0, seen))
                if j < cfg.plant_items:
                    chosen[j] = (es.name, item.item_id, item.image)
    # A copy on the web reaches the pool through the download's resize: plant it the same way, or the
    # calibration measures copies that look unlike the ones dedup must find (letterboxed, cropped).
    geometry, geometry_desc = eval_geometry(pool, cfg.eval_geometry)
    t0 = time.time()
    pos: dict[str, np.ndarray] = {}
    attributed: dict[str, float] = {}
    # Which evaluation item each index row is, as this run's index holds it (read once per run: a cache
    # across runs kept a rebuilt index's old rows).
    row_item = _row_items(items_bytes)
    for tname in cfg.transforms:
        trng = np.random.default_rng([cfg.seed, TRANSFORMS.index(tname)])
        imgs = [apply_transform(im, tname, trng) for _, _, im in chosen]
        if geometry is not None:
            imgs = [geometry(im) for im in imgs]
        q = np.asarray(embedder.embed_images(imgs), dtype=np.float32)
        D, _I = index.search(q, 1)
        pos[tname] = D[:, 0].astype(np.float64)
        # Which evaluation item the copy lands on: flagged-but-misattributed copies still get removed.
        attributed[tname] = float(np.mean([row_item.get(int(i)) == (s, it) for (s, it, _), i in zip(chosen, _I[:, 0])]))
    embed_s = time.time() - t0
    negv, neg_uids = _sample_negatives(cfg.embeddings, cfg.pool_sample, cfg.seed, excl)
    if not len(negv):
        from laiontools.core.errors import InputError

        raise InputError(f"{cfg.embeddings}: no pool sample is left to calibrate against (every one excluded, or none "
                         "embedded); a threshold chosen without negatives would flag the whole pool")
    neg = index.search(negv, 1)[0][:, 0].astype(np.float64) if len(negv) else np.zeros(0)

    all_s = np.concatenate([*pos.values(), neg])
    lo = math.floor(float(all_s.min()) * 100) / 100
    grid = sorted(set(np.round(np.linspace(max(-1.0, lo), 1.0, 101), 5).tolist()))
    rows = []
    for t in grid:
        for tname, r in _rates(pos, neg, t).items():
            rows.append({"threshold": t, "transform": tname, **{k: (round(v, 4) if isinstance(v, float) else v) for k, v in r.items()}})
    rec = recommend(pos, neg)
    top_neg = np.argsort(-neg)[:10] if len(neg) else []
    result = {
        "model": DI.describe_model(index_desc["model"]), "model_identity": index_desc["model"],
        "index_type": index_desc["index_type"], "evalsets": [es.to_dict() for es in sets],
        "planted_items": len(chosen), "transforms": list(cfg.transforms), "easy_transforms": list(EASY_TRANSFORMS),
        "negatives": len(neg), "seed": cfg.seed, "recommendation": rec, "eval_geometry": geometry_desc,
        "similarity": {t: _quantiles(s) for t, s in {**pos, "negatives": neg}.items()},
        "top1_attributed_to_source": attributed,
        "highest_negatives": [{"uid": neg_uids[i], "similarity": float(neg[i])} for i in top_neg],
        "grid": rows, "embed_seconds": round(embed_s, 3),
    }
    write_json(join(cfg.output, layout.CALIBRATE_JSON), result)
    txt = _text_report(result, pos, neg)
    atomic_write_bytes(join(cfg.output, layout.CALIBRATE_TXT), txt.encode())
    _plot(join(cfg.output, layout.CALIBRATE_PNG), pos, neg, grid, rec, result["model"])
    return StageResult(
        outputs={"calibrate": join(cfg.output, layout.CALIBRATE_JSON), "text": join(cfg.output, layout.CALIBRATE_TXT),
                 "plot": join(cfg.output, layout.CALIBRATE_PNG)},
        counts={"planted_items": int(result["planted_items"]), "negatives": int(result["negatives"])},
        timings={"embed": float(result["embed_seconds"])}, details=result,
        summary=txt + f"\nwritten: {join(cfg.output, layout.CALIBRATE_TXT)}, {layout.CALIBRATE_JSON}, {layout.CALIBRATE_PNG}",
    )


def _row_items(items_bytes: bytes) -> dict[int, tuple[str, str]]:
    """index row -> (evaluation set, item id), from the items file's bytes (read and checked once)."""
    import pyarrow.parquet as pq

    t = pq.read_table(io.BytesIO(items_bytes), columns=["row", "evalset", "item_id"], **PARQUET_READ).to_pydict()
    return {r: (s, i) for r, s, i in zip(t["row"], t["evalset"], t["item_id"]) if r >= 0}


def _quantiles(s: np.ndarray) -> dict[str, float] | None:
    if not len(s):
        return None
    q = np.quantile(s, [0.0, 0.05, 0.5, 0.95, 1.0])
    return {k: round(float(v), 5) for k, v in zip(("min", "p05", "median", "p95", "max"), q)}


def _text_report(result: dict[str, Any], pos: dict[str, np.ndarray], neg: np.ndarray) -> str:
    from laiontools.core.report import table

    rec = result["recommendation"]
    ts = sorted({t for t in [rec.get("threshold"), rec.get("lowest_safe")] if t is not None})
    # A readable subset of the grid: ten evenly spaced thresholds plus the recommended ones.
    grid = sorted({r["threshold"] for r in result["grid"]})
    show = sorted(set(grid[:: max(1, len(grid) // 10)]) | set(ts))
    rows = []
    for t in show:
        r = _rates(pos, neg, t)
        row: dict[str, Any] = {"threshold": f"{t:.4f}", "negatives_flagged": next(iter(r.values()))["fp"] if r else 0}
        for tname, v in r.items():
            row[tname] = f"{v['recall']:.2f}/{v['precision']:.2f}"
        rows.append(row)
    head = (
        f"dedup calibrate: model {result['model']}, {result['planted_items']} planted evaluation images x "
        f"{len(result['transforms'])} transforms, {result['negatives']} pool negatives\n"
        f"cells: recall/precision per transform\n\n"
    )
    sims = table([{"set": k, **(v or {})} for k, v in result["similarity"].items()])
    if rec.get("threshold") is not None:
        tail = (f"recommended --threshold {rec['threshold']} (rule: {rec['rule']}); "
                f"lowest threshold with no negative flagged: {rec['lowest_safe']}")
    else:
        tail = f"no recommendation: {rec.get('reason')}"
    return head + table(rows) + "\n\ncosine similarity to the nearest evaluation image:\n" + sims + "\n\n" + tail + "\n"


def _plot(path: str, pos: dict[str, np.ndarray], neg: np.ndarray, grid: list[float], rec: dict[str, Any], model: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(12, 4.5))
    g = np.asarray(grid)
    for tname, s in pos.items():
        ax1.plot(g, [(s >= t).mean() for t in g], label=tname)
    if len(neg):
        ax1.plot(g, [(neg >= t).mean() for t in g], "k--", label="negatives flagged (rate)")
    for key, style in (("threshold", "r-"), ("lowest_safe", "r:")):
        if rec.get(key) is not None:
            ax1.axvline(rec[key], color="r", linestyle=style[1:], label=f"{key} {rec[key]}")
    ax1.set_xlabel("threshold (cosine)")
    ax1.set_ylabel("recall (share flagged)")
    ax1.set_title(f"recall per transform - {model}", fontsize=9)
    ax1.legend(fontsize=7)
    bins = np.linspace(float(g.min()), 1.0, 60)
    for tname, s in pos.items():
        ax2.hist(s, bins=bins, histtype="step", label=tname)
    if len(neg):
        ax2.hist(neg, bins=bins, histtype="stepfilled", alpha=0.3, color="k", label="pool negatives")
    ax2.set_xlabel("similarity to nearest evaluation image")
    ax2.set_ylabel("count")
    ax2.legend(fontsize=7)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100)
    plt.close(fig)
    atomic_write_bytes(path, buf.getvalue())


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="laiontools dedup calibrate",
        description="Plant transformed copies of evaluation images among pool samples, report precision/recall "
        "per transform over thresholds, and recommend a --threshold for `laiontools dedup`.",
    )
    add_config_args(p, CalibrateConfig, skip=("evalset",))
    p.add_argument("--evalset", dest="evalset", action="extend", nargs="+", default=argparse.SUPPRESS,
                   help="name=path[:format]; repeatable")
    return p


def main(argv: list[str] | None = None) -> int:
    from laiontools.core.stage import stage_main

    return stage_main(__name__, argv)
