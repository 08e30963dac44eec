"""`laiontools demo`: the whole pipeline on a synthetic LAION, on this machine, with nothing downloaded.

synthetic source -> local HTTP server -> download (Spark local) -> embed (tiny open_clip, random
init) -> dedup calibrate + dedup against a synthetic evaluation set with planted copies -> nested
subsets at three scales (80M/400M/2B scaled down) -> reshard -> train each scale with the same
samples-seen budgets -> evaluate -> scaling-law fit -> one HTML report.

Every step is a library call of the stage it names (the same code as ``laiontools <stage>``), so
the demo is also the end-to-end test of the contracts between stages. Each stage resumes, so a
killed demo re-run with the same command continues where it stopped.
"""

from __future__ import annotations

import dataclasses
import html
import json
import logging
import os
import time
from pathlib import Path
from typing import Any

from laiontools.contracts import layout
from laiontools.core.config import ConfigError
from laiontools.core.report import emit, table
from laiontools.core.stage import SparkStageConfig, StageResult, stage_entry, stage_spark
from laiontools.core.storage import PARQUET_WRITE, atomic_write_bytes, ensure_output_dir, read_json

log = logging.getLogger(__name__)


@dataclasses.dataclass
class DemoConfig(SparkStageConfig):
    output: str = dataclasses.field(default="demo-out", metadata={"help": "folder for everything the demo writes"})
    n: int = dataclasses.field(default=2000, metadata={"help": "synthetic pool images (about 25% of rows are broken on purpose)"})
    model: str = dataclasses.field(default="lt-tiny", metadata={"help": "open_clip model (tiny shipped config, random init)"})
    scales: str = dataclasses.field(default="80M,400M,2B", metadata={"help": "subset scales"})
    scale_factor: float = dataclasses.field(default=6.25e-7, metadata={"help": "shrinks the scales for a laptop (6.25e-7: 50 / 250 / 1250)"})
    samples_seen: list[int] = dataclasses.field(default_factory=lambda: [512, 1024, 2048, 4096, 8192], metadata={
        "help": "training budgets (samples seen), the same for every scale; 4+ give the frontier the points a fit with "
                "uncertainties needs (the defaults: 16 to 256 optimizer steps of 32)"})
    batch_size: int = dataclasses.field(default=32, metadata={"help": "global batch size"})
    nproc: int = dataclasses.field(default=2, metadata={"help": "training processes (gloo on CPU)"})
    seed: int = dataclasses.field(default=0, metadata={"help": "seed of the source, the selection and training"})
    seeds: int = dataclasses.field(default=2, metadata={
        "help": "training seeds per scale at the largest budget (seed, seed+1, ...): the report compares scales against "
                "the spread between seeds"})

    def validate(self) -> None:
        if self.n < 100:
            raise ConfigError("demo: --n must be >= 100 so that three nested scales fit in the pool")
        if self.seeds < 1:
            raise ConfigError(f"demo: --seeds must be >= 1, got {self.seeds}")


HELDOUT_ITEMS = 400  # R@5 chance 5/400; a zero-shot top-1 of 0.5 has a standard error of 0.025
HELDOUT_START = 5_000_000  # item ids far from the pool's (0..n) and the planted copies' (9,000,000+)


def write_heldout_evalset(out_dir: str, n: int, seed: int, geometry: Any = None) -> str:
    """A held-out evaluation set drawn like the pool but from items the pool never holds.

    `geometry` (a :class:`laiontools.web.resize.PoolGeometry`, PIL -> PIL) puts each image through the
    resize the pool's download applied (letterboxed to the pool's image size by default), so models
    trained on the pool are scored on images that look like its images, as dedup compares them.

    The glyph evaluation set is what the pool must be decontaminated against; this one measures what
    training learns: image<->text retrieval among the held-out captions, and zero-shot classification
    of each image by its background colour (12 classes, chance 1/12), with one prompt per background
    texture in the captions' own wording ("a noisy {c} background", ...), as ImageNet's prompts follow
    web alt-text. The background is the factor a 64 px model with 16 px patches learns from a few
    thousand samples; the shape is not (measured in BENCHMARKS.md, "Scaling signal of the demo's
    world": shape zero-shot stays at chance up to 16,384 samples seen), so a shape classifier would
    only measure noise. Written as parquet (image bytes, label, caption) + classnames.txt + templates.
    """
    import io

    import pyarrow as pa
    import pyarrow.parquet as pq

    from laiontools.synthetic import render_item
    from laiontools.synthetic.images import COLOURS, TEXTURE_PHRASES

    path = os.path.join(out_dir, "heldout.parquet")
    if os.path.exists(path):
        return path
    classes = list(COLOURS)
    rows: dict[str, list] = {"item_id": [], "image": [], "label": [], "caption": []}
    for i in range(HELDOUT_START, HELDOUT_START + n):
        im, caption, attrs = render_item(i, seed=seed)
        im = im.convert("RGB")
        if geometry is not None:
            im = geometry(im)
        buf = io.BytesIO()
        im.save(buf, format="JPEG", quality=90)
        rows["item_id"].append(f"heldout/{i}")
        rows["image"].append(buf.getvalue())
        rows["label"].append(classes.index(attrs["background"]))
        rows["caption"].append(caption)
    os.makedirs(out_dir, exist_ok=True)
    atomic_write_bytes(os.path.join(out_dir, "classnames.txt"), ("\n".join(classes) + "\n").encode())
    templates = [phrase.format(bg="{c}") for phrase in TEXTURE_PHRASES.values()]
    atomic_write_bytes(os.path.join(out_dir, "zeroshot_classification_templates.txt"), ("\n".join(templates) + "\n").encode())
    sink = pa.BufferOutputStream()
    pq.write_table(pa.table(rows), sink, **PARQUET_WRITE)
    atomic_write_bytes(path, sink.getvalue().to_pybytes())
    return path


def _step(name: str, t0: float, timings: dict[str, float]) -> float:
    now = time.time()
    timings[name] = round(now - t0, 1)
    log.info("demo: %s done in %.1fs", name, now - t0)
    return now


STAGE = "demo"
CONFIG = DemoConfig


@stage_entry(STAGE)
def run(cfg: DemoConfig, spark: Any = None) -> StageResult:
    """Run every stage in order into cfg.output; outputs = the paths written, timings per stage.

    The data stages share one Spark session; one the demo started is stopped before training,
    which needs no Spark and gets the memory and cores back. details = every stage's details.
    """
    from laiontools.stages import study
    from laiontools.stages.study import StudyConfig

    with stage_spark(cfg, spark, app_name="laiontools-demo") as sp:
        res = _data_stages(cfg, sp)
    t = time.time()
    p = lambda *parts: os.path.join(res["output"], *parts)
    st = study.run(StudyConfig(output=p("study"), scales=res["resharded"], samples_seen=list(cfg.samples_seen),
                               models=[cfg.model], batch_size=cfg.batch_size, nproc=cfg.nproc,
                               evalset=res["evalsets"], train={"seed": cfg.seed, "workers": 1},
                               extra_seeds=[cfg.seed + k for k in range(1, cfg.seeds)]))
    emit(st.summary)
    res["study"] = st.details
    res["timings"]["train + evaluate + fit"] = round(time.time() - t, 1)
    res["timings"]["total"] = round(time.time() - res["t_start"], 1)
    res["report"] = write_report(res, p("report.html"))
    outputs = {
        "pool manifest": res["download"]["manifest"], "embeddings": p("embeddings"), "dedup report": p("dedup"),
        **{f"subset {r['scale']}": r["manifest"] for r in res["subsets"]},
        **{f"resharded {k}": v for k, v in res["resharded"].items()},
        "study": p("study"), "REPORT": res["report"],
    }
    summary = "\n".join([
        "",
        f"laiontools demo finished in {res['timings']['total']:.0f}s",
        "  " + "\n  ".join(f"{k:<24} {v:>7.1f}s" for k, v in res["timings"].items() if k != "total"),
        "",
        "written:",
        *[f"  {k:<18} {v}" for k, v in outputs.items()],
    ])
    return StageResult(outputs=outputs, timings=dict(res["timings"]), details=res, summary=summary)


def _data_stages(cfg: DemoConfig, spark: Any) -> dict[str, Any]:
    """synthetic source -> download -> embed -> calibrate + dedup -> subsets -> reshard (Spark stages)."""
    from laiontools.stages import dedup, dedup_calibrate, download, embed, reshard, subsets
    from laiontools.stages.dedup import DedupConfig
    from laiontools.stages.dedup_calibrate import CalibrateConfig
    from laiontools.stages.download import DownloadConfig
    from laiontools.stages.embed import EmbedConfig
    from laiontools.stages.reshard import ReshardConfig
    from laiontools.stages.subsets import SubsetsConfig
    from laiontools.synthetic import SyntheticWebServer, make_source

    out = os.path.abspath(cfg.output)
    ensure_output_dir(out)
    p = lambda *parts: os.path.join(out, *parts)
    timings: dict[str, float] = {}
    t = t_start = time.time()

    with SyntheticWebServer(p("web", "images")) as web:
        marker = p("web", "source.json")
        if os.path.exists(marker):
            src = read_json(marker)
            src_info = {"source": src["source"], "evalset": src["evalset"], "planted": src["planted"]}
            # the URLs hold the port of the server that wrote them: serve again on that port
            web.stop()
            web = SyntheticWebServer(p("web", "images"), port=src["port"]).start()
        else:
            s = make_source(p("web"), cfg.n, web.base_url, seed=cfg.seed, evalset=True, profile="laion2b-en")
            src_info = {"source": s["source"], "evalset": s["evalset"], "planted": len(s["planted"])}
            atomic_write_bytes(marker, json.dumps({**src_info, "port": int(web.base_url.rsplit(":", 1)[1])}).encode())
        t = _step("synthetic source", t, timings)
        try:
            dl = download.run(DownloadConfig(input=src_info["source"], output=p("pool"), allow_networks=["127.0.0.0/8"],
                                             number_sample_per_shard=100, shards_per_file=2, timeout=3, retries=1,
                                             image_size=96, thread_count=32), spark).details
        finally:
            web.stop()
    t = _step("download", t, timings)

    emb_res = embed.run(EmbedConfig(manifest=dl["manifest"], output=p("embeddings"), model=cfg.model, batch_size=64,
                                    num_workers=0), spark)
    emit(emb_res.summary)
    emb = emb_res.details
    if not emb.ok:
        raise RuntimeError(f"demo: embedding failed for shards {emb.failed_shards}")
    t = _step("embed", t, timings)

    evalset = f"synthetic={src_info['evalset']}:imagefolder"
    from laiontools.contracts.manifest import download_settings
    from laiontools.web.resize import PoolGeometry

    settings = download_settings(dl["manifest"])  # the demo's own download records them
    geometry = PoolGeometry(settings) if settings else None
    heldout = f"heldout={write_heldout_evalset(p('web', 'heldout'), HELDOUT_ITEMS, cfg.seed + 7, geometry)}:parquet"
    # 1. the paper's method first: perceptual-hash matches (within 8 of 64 bits) are surely copies;
    # 2. calibrate the embedding threshold with those known copies left out of the negatives (a pool
    #    sample that already holds copies would otherwise make every threshold look unsafe);
    # 3. dedup with the recommended embedding threshold, pHash beside it.
    phash = {"phash": True, "phash_max_distance": 8}
    emit(dedup.run(DedupConfig(embeddings=p("embeddings"), evalset=[evalset], output=p("dedup-phash"), threshold=1.0,
                               **phash), spark).summary)
    cal_res = dedup_calibrate.run(CalibrateConfig(embeddings=p("embeddings"), evalset=[evalset], output=p("dedup-calibrate"),
                                                  exclude_uids=p("dedup-phash", layout.DEDUP_EXCLUDE_UIDS)))
    emit(cal_res.summary)
    cal = cal_res.details
    rec = cal.get("recommendation") or {}
    threshold = rec.get("threshold")
    t = _step("dedup calibrate", t, timings)
    dcfg: dict[str, Any] = {"embeddings": p("embeddings"), "evalset": [evalset], "output": p("dedup"), **phash}
    if threshold is not None:
        dcfg["threshold"] = float(threshold)
        method = (f"embedding cosine >= {threshold:.5f} (recommended by dedup calibrate, with the pHash matches left out "
                  f"of its negatives) plus pHash within Hamming distance 8")
    else:
        # A random-init model may not separate copies from unrelated images at all (calibrate says
        # why); then only the pHash matches are trustworthy.
        dcfg["threshold"] = 1.0
        method = "pHash within Hamming distance 8 (dedup calibrate found no safe embedding threshold: " + str(rec.get("reason", "")) + ")"
    log.info("demo: decontamination by %s", method)
    ded_res = dedup.run(DedupConfig(**dcfg), spark)
    emit(ded_res.summary)
    ded = ded_res.details
    t = _step("dedup", t, timings)

    subset_rows = subsets.run(SubsetsConfig(pool=dl["manifest"], output=p("subsets"), scales=cfg.scales, seed=cfg.seed,
                                        scale_factor=cfg.scale_factor, scores=p("embeddings"), exclude=[p("dedup")],
                                        max_punsafe=0.5, max_pwatermark=0.8), spark).details
    t = _step("subsets", t, timings)

    resharded: dict[str, str] = {}
    for row in subset_rows:
        r = reshard.run(ReshardConfig(manifest=row["manifest"], output=p("resharded", row["scale"]), shard_size=64,
                                      seed=cfg.seed), spark)
        resharded[row["scale"]] = r.outputs["manifest"]
    t = _step("reshard", t, timings)

    return {"download": dl, "embed": dataclasses.asdict(emb), "calibrate": cal, "dedup": ded, "subsets": subset_rows,
            "resharded": resharded, "evalsets": [heldout, evalset], "timings": timings, "threshold": threshold,
            "dedup_method": method, "planted": src_info["planted"], "output": out, "t_start": t_start}


def _world_html() -> str:
    """What the synthetic world varies, and how the figures below are measured."""
    from laiontools.synthetic.images import COLOURS, SHAPES, TEXTURE_PHRASES, TEXTURES, WORDS

    esc = html.escape
    prompts = ", ".join(f"&ldquo;{esc(p.format(bg='{c}'))}&rdquo;" for p in TEXTURE_PHRASES.values())
    return (
        f"<p><b>The synthetic world.</b> Every pool image is one shape ({esc(', '.join(SHAPES))}) in one of {len(COLOURS)} "
        f"colours, small / medium / large, at a random position, on a background of another colour with a "
        f"{esc(' / '.join(TEXTURES))} texture, plus one of {len(WORDS)} rendered words; its caption names these factors in "
        f"one of 5 templates. {len(SHAPES)} &times; {len(COLOURS)} &times; {len(COLOURS) - 1} &times; {len(TEXTURES)} "
        f"&times; 3 &times; {len(WORDS)} combinations and a random position: a small pool is memorised (its training loss "
        f"goes to ~0 while held-out scores stop rising), a larger one generalises.</p>"
        f"<p><b>What is measured.</b> Every model is scored on <b>held-out</b> items drawn the same way but never in the pool "
        f"(and on the glyph set the pool was decontaminated against): "
        f"<i>zero-shot top-1</i> classifies each held-out image by its background colour among the {len(COLOURS)} colour names "
        f"(chance {1 / len(COLOURS):.3f}), each class's text embedding the mean of the prompts {prompts} (the captions' own "
        f"wording); <i>image&rarr;text and text&rarr;image recall@5</i> retrieve each item's caption among all held-out "
        f"captions (chance {5 / HELDOUT_ITEMS:.4f}). Error = 1 &minus; metric. The background is the factor that lt-tiny "
        f"(64 px, 16 px patches) learns from a few thousand samples; its shape is not learned at this scale (zero-shot over "
        f"shape names stays at chance up to 16,384 samples seen, BENCHMARKS.md), so a shape classifier would measure noise. "
        f"Compute = the model's GMACs per sample &times; samples seen; every scale gets the same budgets, and the largest "
        f"budget is trained with several seeds so that a difference between data scales can be compared with seed noise.</p>"
        f"<p><b>How to read it.</b> Finding 1 (the paper's Pareto frontier): the best error reached at each compute falls as "
        f"a power law E = &beta;&middot;C<sup>&alpha;</sup>, &alpha; &lt; 0 with &alpha; + 2&middot;se &lt; 0. Finding 2: at "
        f"the largest budget, the largest scale's error is below the smallest scale's by more than the spread between "
        f"seeds, i.e. at a fixed number of samples seen, more distinct data is better.</p>"
    )


def finding_1(n_points: int, fit: dict[str, Any]) -> str:
    """'yes' when the frontier has 4+ points and its fitted exponent is below 0 by more than 2 standard errors."""
    alpha, se = fit.get("alpha"), fit.get("alpha_se")
    if alpha is None or se is None:
        return "no fit"
    return "yes" if n_points >= 4 and alpha < 0 and alpha + 2 * se < 0 else "no"


def _json_block(obj: Any) -> str:
    return f"<pre>{html.escape(json.dumps(obj, indent=2, default=str))}</pre>"


def write_report(res: dict[str, Any], path: str) -> str:
    """One HTML page: download summary, dedup table + gallery, funnel, per-scale results, fitted curves."""
    out = res["output"]
    rel = lambda p: os.path.relpath(p, out)
    dl = res["download"]
    parts = ["<!doctype html><meta charset='utf-8'><title>laiontools demo</title>",
             ("<style>body{font-family:sans-serif;max-width:1100px;margin:2em auto}table{border-collapse:collapse}"
              "td,th{border:1px solid #ccc;padding:3px 8px;text-align:right}pre{background:#f6f6f6;padding:8px;white-space:pre-wrap}</style>"),
             "<h1>laiontools demo</h1>",
             ("<p>Synthetic LAION source served on 127.0.0.1, downloaded with Spark + img2dataset, embedded with "
              "a tiny random-init open_clip model, decontaminated, cut into nested subsets and trained on. "
              f"Timings (s): {html.escape(json.dumps(res['timings']))}</p>"),
             "<h2>1. Download</h2>", f"<pre>{html.escape(dl.get('text', ''))}</pre>",
             f"<p>Manifest: <code>{html.escape(rel(dl['manifest']))}</code></p>"]

    ded_dir = os.path.join(out, "dedup")
    parts.append("<h2>2. Decontamination</h2>")
    parts.append(f"<p>Method: {html.escape(res['dedup_method'])}. {res['planted']} transformed copies of evaluation "
                 f"images were planted in the source.</p>")
    summary_txt = os.path.join(ded_dir, layout.DEDUP_SUMMARY_TXT)
    if os.path.exists(summary_txt):
        parts.append(f"<pre>{html.escape(Path(summary_txt).read_text())}</pre>")
    for name in (layout.DEDUP_GALLERY_HTML,):
        if os.path.exists(os.path.join(ded_dir, name)):
            parts.append(f"<p><a href='dedup/{name}'>Top matches, side by side</a></p>")
    cal_png = os.path.join(out, "dedup-calibrate", "calibrate.png")
    if os.path.exists(cal_png):
        parts.append("<p><img src='dedup-calibrate/calibrate.png' width='700'></p>")

    parts.append("<h2>3. Nested subsets</h2>")
    rows = [{k: r.get(k) for k in ("scale", "target", "obtained", "short")} for r in res["subsets"]]
    parts.append(f"<pre>{html.escape(table(rows))}</pre>")
    if res["subsets"]:
        m = read_json(res["subsets"][-1]["manifest"])
        funnel = (m.get("selection") or {}).get("funnel")
        if funnel:
            parts.append("<p>Funnel (largest scale):</p>" + f"<pre>{html.escape(table(funnel))}</pre>")

    parts.append("<h2>4. Training, evaluation and the scaling fit</h2>")
    parts.append(_world_html())
    study_dir = os.path.join(out, "study")
    csv = os.path.join(study_dir, layout.STUDY_RESULTS_CSV)
    if os.path.exists(csv):
        import pandas as pd

        df = pd.read_csv(csv)
        metric_cols = [c for c in df.columns if c.endswith(("zeroshot_top1", "_R@5"))]
        keep = [c for c in ("scale", "dataset_samples", "samples_seen", "steps", "compute_gmacs", "final_loss") if c in df]
        parts.append("<p>Every scale is trained for the same samples seen; compute = GMACs per sample x samples seen.</p>")
        parts.append(df[keep + metric_cols].to_html(index=False, float_format=lambda x: f"{x:.4g}"))
    fits_path = os.path.join(study_dir, layout.STUDY_FITS_JSON)
    if os.path.exists(fits_path):
        rows = []
        for metric, f in read_json(fits_path).get("fits", {}).items():
            fit = f.get("fit") or {}
            fmt = lambda v, e: "n/a" if v is None else (f"{v:.4g}" + (f" ± {e:.2g}" if e is not None else ""))
            preds = "; ".join(f"C={p['compute_gmacs']:.3g}: {p['metric']:.3f}" for p in f.get("predictions", []))
            n_points = f.get("n_points", len(f.get("frontier", [])))
            rows.append({"metric": metric, "frontier points": n_points,
                         "alpha": fmt(fit.get("alpha"), fit.get("alpha_se")), "beta": fmt(fit.get("beta"), fit.get("beta_se")),
                         "finding 1 (4+ points, α + 2·se < 0)": finding_1(n_points, fit),
                         "r2": fmt(fit.get("r2"), None), "predicted metric at larger compute": preds or f.get("why_no_fit", "")})
        if rows:
            import pandas as pd

            parts.append("<p>E = 1 - metric fitted as E = &beta;&middot;C<sup>&alpha;</sup> on the Pareto frontier "
                         "(log-log least squares, standard errors from the fit):</p>")
            parts.append(pd.DataFrame(rows).to_html(index=False))
        from laiontools.scaling import effect_html

        parts.append(effect_html(read_json(fits_path).get("data_scale_effect") or []))
    plots = os.path.join(study_dir, "plots")
    if os.path.isdir(plots):
        for f in sorted(os.listdir(plots)):
            if f.endswith(".png"):
                parts.append(f"<p><img src='study/plots/{html.escape(f)}' width='600'></p>")
    if os.path.exists(os.path.join(study_dir, layout.STUDY_REPORT_HTML)):
        parts.append("<p><a href='study/report.html'>Full study report</a></p>")
    atomic_write_bytes(path, "\n".join(parts).encode())
    return path


def main(argv: list[str] | None = None) -> int:
    from laiontools.core.stage import stage_main

    return stage_main(__name__, argv)
