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
from typing import Any

from laiontools.contracts import layout
from laiontools.core.config import ConfigError
from laiontools.core.report import emit, table
from laiontools.core.stage import SparkStageConfig, StageResult, stage_entry, stage_spark
from laiontools.core.storage import atomic_write_bytes, ensure_output_dir, read_json

log = logging.getLogger(__name__)


@dataclasses.dataclass
class DemoConfig(SparkStageConfig):
    output: str = dataclasses.field(default="demo-out", metadata={"help": "folder for everything the demo writes"})
    n: int = dataclasses.field(default=600, metadata={"help": "synthetic pool images (about 25% of rows are broken on purpose)"})
    model: str = dataclasses.field(default="lt-tiny", metadata={"help": "open_clip model (tiny shipped config, random init)"})
    scales: str = dataclasses.field(default="80M,400M,2B", metadata={"help": "subset scales"})
    scale_factor: float = dataclasses.field(default=1e-7, metadata={"help": "shrinks the scales for a laptop (1e-7: 8 / 40 / 200)"})
    samples_seen: list[int] = dataclasses.field(default_factory=lambda: [256, 512, 1024], metadata={"help": "training budgets (samples seen), the same for every scale; 3+ give fit uncertainties"})
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


HELDOUT_START = 5_000_000  # item ids far from the pool's (0..n) and the planted copies' (9,000,000+)


def write_heldout_evalset(out_dir: str, n: int, seed: int) -> str:
    """A held-out evaluation set drawn like the pool (shape classes, captions) but from unseen items.

    The glyph evaluation set is what the pool must be decontaminated against; this one measures what
    training learns (zero-shot over shape names, image<->text retrieval with the captions), so the
    scaling fit has a signal. Written as parquet (image bytes, label, caption) + classnames.txt.
    """
    import io

    import pyarrow as pa
    import pyarrow.parquet as pq

    from laiontools.synthetic import SHAPES, render_item

    path = os.path.join(out_dir, "heldout.parquet")
    if os.path.exists(path):
        return path
    rows: dict[str, list] = {"item_id": [], "image": [], "label": [], "caption": []}
    for i in range(HELDOUT_START, HELDOUT_START + n):
        im, caption, attrs = render_item(i, seed=seed)
        buf = io.BytesIO()
        im.convert("RGB").save(buf, format="JPEG", quality=90)
        rows["item_id"].append(f"heldout/{i}")
        rows["image"].append(buf.getvalue())
        rows["label"].append(SHAPES.index(attrs["shape"]))
        rows["caption"].append(caption)
    os.makedirs(out_dir, exist_ok=True)
    atomic_write_bytes(os.path.join(out_dir, "classnames.txt"), ("\n".join(SHAPES) + "\n").encode())
    atomic_write_bytes(os.path.join(out_dir, "zeroshot_classification_templates.txt"),
                       b"a photo of a {c}.\nphoto of a {c}\na {c} on a background\n")
    sink = pa.BufferOutputStream()
    pq.write_table(pa.table(rows), sink)
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
        "laiontools demo finished in %.0fs" % res["timings"]["total"],
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
    heldout = f"heldout={write_heldout_evalset(p('web', 'heldout'), 200, cfg.seed + 7)}:parquet"
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
    from laiontools.synthetic.images import COLOURS, SHAPES, TEXTURES, WORDS

    esc = html.escape
    return (
        f"<p>The synthetic world: every pool image is one shape ({esc(', '.join(SHAPES))}) in one of {len(COLOURS)} colours, "
        f"small / medium / large, at a random position, on a background of another colour with a {esc(' / '.join(TEXTURES))} "
        f"texture, plus one of {len(WORDS)} rendered words; its caption names these factors in one of 5 templates. "
        f"Models are scored on <b>held-out</b> items drawn the same way but never in the pool: zero-shot top-1 over the "
        f"{len(SHAPES)} shape names (chance {1 / len(SHAPES):.3f}) and image&harr;text recall@5 among the held-out captions "
        f"(chance 5 / number of held-out items), and on the glyph set the pool was decontaminated against. Compute is the "
        f"model's GMACs per sample &times; samples seen; every scale gets the same budgets, and the largest budget is "
        f"trained with several seeds so that a difference between data scales can be compared with seed noise.</p>"
    )


def _json_block(obj: Any) -> str:
    return f"<pre>{html.escape(json.dumps(obj, indent=2, default=str))}</pre>"


def write_report(res: dict[str, Any], path: str) -> str:
    """One HTML page: download summary, dedup table + gallery, funnel, per-scale results, fitted curves."""
    out = res["output"]
    rel = lambda p: os.path.relpath(p, out)
    dl = res["download"]
    parts = ["<!doctype html><meta charset='utf-8'><title>laiontools demo</title>",
             "<style>body{font-family:sans-serif;max-width:1100px;margin:2em auto}table{border-collapse:collapse}"
             "td,th{border:1px solid #ccc;padding:3px 8px;text-align:right}pre{background:#f6f6f6;padding:8px;white-space:pre-wrap}</style>",
             "<h1>laiontools demo</h1>",
             f"<p>Synthetic LAION source served on 127.0.0.1, downloaded with Spark + img2dataset, embedded with "
             f"a tiny random-init open_clip model, decontaminated, cut into nested subsets and trained on. "
             f"Timings (s): {html.escape(json.dumps(res['timings']))}</p>",
             "<h2>1. Download</h2>", f"<pre>{html.escape(dl.get('text', ''))}</pre>",
             f"<p>Manifest: <code>{html.escape(rel(dl['manifest']))}</code></p>"]

    ded_dir = os.path.join(out, "dedup")
    parts.append("<h2>2. Decontamination</h2>")
    parts.append(f"<p>Method: {html.escape(res['dedup_method'])}. {res['planted']} transformed copies of evaluation "
                 f"images were planted in the source.</p>")
    summary_txt = os.path.join(ded_dir, layout.DEDUP_SUMMARY_TXT)
    if os.path.exists(summary_txt):
        parts.append(f"<pre>{html.escape(open(summary_txt).read())}</pre>")
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
            rows.append({"metric": metric, "frontier points": f.get("n_points", len(f.get("frontier", []))),
                         "alpha": fmt(fit.get("alpha"), fit.get("alpha_se")), "beta": fmt(fit.get("beta"), fit.get("beta_se")),
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
