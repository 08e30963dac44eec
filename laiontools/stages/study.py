"""`laiontools study`: a scaling-law study over (subset scale x samples seen x model), as in Cherti et al. (CVPR 2023).

For every grid point the study trains (``laiontools train``) and evaluates (``laiontools evaluate``)
into ``<output>/runs/<model>__<scale>__<samples>/``; a point is skipped when its evaluation's
completion marker exists, and a half-trained point resumes from its checkpoint, so a killed study
picks up where it stopped. Then it:

* collects ``results.csv`` (one row per run: scale, model, samples seen, GMACs per sample, total
  compute in GMACs, final loss, every metric);
* measures each model's GMACs per sample (image + text encoder forward, one sample) with torch's
  FLOP counter (``torch.utils.flop_counter.FlopCounterMode``; MACs = FLOPs / 2);
* for each metric, fits ``E = beta * C^alpha`` (E = 1 - metric, C = compute in GMACs) by
  least squares in log-log space on the Pareto frontier (the runs with lower error than every run
  of less or equal compute), with standard errors from the fit's covariance;
* predicts E at larger compute, draws Figure-1-style log-log plots (PNG) and writes ``fits.json``
  and an HTML report.

Config (YAML, ``--config``)::

    output: study/
    scales: {80M: sub80/resharded/manifest.json, 400M: ..., 2B: ...}   # name -> resharded manifest
    samples_seen: [3000000000, 13000000000, 34000000000]
    models: [ViT-B-32, ViT-B-16]
    batch_size: 32768
    nproc: 8
    evalset: ["imagenet=/data/imagenet/val:imagefolder", "mscoco=/data/coco_wds:wds"]
    train: {lr: 0.001, warmup: 2000}          # any `laiontools train` setting
    evaluate: {batch_size: 256}               # any `laiontools evaluate` setting
    metrics: [imagenet/zeroshot_top1, mscoco/image_to_text_R@5]   # default: every top-1 / R@5
    predict_at: [1.0e+12]                     # GMACs; default 10x and 100x the largest run
"""

from __future__ import annotations

import argparse
import dataclasses
import html
import io
import logging
import math
import os
import re
from typing import Any

from laiontools.core.config import ConfigError, StageConfig, add_config_args, config_from_args
from laiontools.core.report import emit, table
from laiontools.core.storage import atomic_write_bytes, is_done, read_json, write_json

log = logging.getLogger(__name__)

RESULTS_CSV = "results.csv"
FITS_JSON = "fits.json"
REPORT_HTML = "report.html"
GMACS_JSON = "gmacs.json"
PLOTS_DIR = "plots"
RUNS_DIR = "runs"
EVAL_FILE = "eval.json"


@dataclasses.dataclass
class StudyConfig(StageConfig):
    output: str = dataclasses.field(default="", metadata={"help": "study folder"})
    scales: dict[str, str] = dataclasses.field(default_factory=dict, metadata={"help": "scale name -> resharded manifest (YAML)"})
    samples_seen: list[int] = dataclasses.field(default_factory=list, metadata={"help": "training budgets (samples seen)"})
    models: list[str] = dataclasses.field(default_factory=list, metadata={"help": "open_clip model names"})
    batch_size: int = dataclasses.field(default=256, metadata={"help": "global batch size of every run"})
    nproc: int = dataclasses.field(default=1, metadata={"help": "processes (devices) per run"})
    evalset: list[str] = dataclasses.field(default_factory=list, metadata={"help": "evaluation sets: name=path[:format]"})
    evalsets_yaml: str | None = dataclasses.field(default=None, metadata={"help": "YAML list of evaluation sets"})
    train: dict[str, Any] = dataclasses.field(default_factory=dict, metadata={"help": "extra train settings (YAML)"})
    evaluate: dict[str, Any] = dataclasses.field(default_factory=dict, metadata={"help": "extra evaluate settings (YAML)"})
    metrics: list[str] = dataclasses.field(default_factory=list, metadata={"help": "metrics to fit; default every zero-shot top-1 and R@5"})
    predict_at: list[float] = dataclasses.field(default_factory=list, metadata={"help": "compute (GMACs) to predict at"})

    def validate(self) -> None:
        if not self.output:
            raise ConfigError("study: `output` (the study folder) is required")
        try:  # YAML reads 1e9 as a string and 1.0e+9 as a float
            self.samples_seen = [int(float(n)) for n in self.samples_seen]
            self.predict_at = [float(c) for c in self.predict_at]
        except (TypeError, ValueError) as e:
            raise ConfigError(f"study: samples_seen / predict_at must be numbers ({e})") from e
        if not self.scales:
            raise ConfigError("study: `scales` (name -> resharded subset manifest) must list at least one scale")
        if not self.samples_seen or any(int(n) <= 0 for n in self.samples_seen):
            raise ConfigError(f"study: `samples_seen` must list positive budgets, got {self.samples_seen}")
        if not self.models:
            raise ConfigError("study: `models` must list at least one open_clip model")
        if not self.evalset and not self.evalsets_yaml:
            raise ConfigError("study: give `evalset` (name=path[:format] list) or `evalsets_yaml`")
        for n in self.samples_seen:
            if int(n) < self.batch_size:
                raise ConfigError(f"study: samples seen {n} is smaller than one global batch ({self.batch_size})")
        if self.batch_size % max(1, self.nproc):
            raise ConfigError(f"study: batch size {self.batch_size} is not divisible by nproc {self.nproc}")
        from laiontools.stages.evaluate import EvaluateConfig
        from laiontools.stages.train import TrainConfig

        # YAML may spell settings with dashes, as the flags are written
        self.train = {str(k).replace("-", "_"): v for k, v in self.train.items()}
        self.evaluate = {str(k).replace("-", "_"): v for k, v in self.evaluate.items()}
        for what, cls, given in (("train", TrainConfig, self.train), ("evaluate", EvaluateConfig, self.evaluate)):
            known = {f.name for f in dataclasses.fields(cls)}
            unknown = sorted(set(given) - known)
            if unknown:
                raise ConfigError(f"study: unknown `{what}` setting(s) {unknown}; known: {sorted(known)}")
        clash = {"manifest", "model", "samples_seen", "batch_size", "output", "nproc", "resume"} & set(self.train)
        if clash:
            raise ConfigError(f"study: `train` may not set {sorted(clash)}; the grid sets them")
        clash = {"checkpoint", "model", "evalset", "evalsets_yaml", "output"} & set(self.evaluate)
        if clash:
            raise ConfigError(f"study: `evaluate` may not set {sorted(clash)}; the study sets them")


# ---------------------------------------------------------------------------------------------
# compute


def model_gmacs(name: str) -> dict[str, float]:
    """GMACs of one sample's forward pass (image encoder + text encoder), counted by torch's FlopCounterMode."""
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    from laiontools.models.registry import load_model

    b = load_model(name)
    h, w = b.info["image_size"]
    image = torch.zeros(1, 3, h, w)
    text = b.tokenizer(["a photo of a thing"])
    out = {}
    with torch.no_grad():
        for part, fn in (("image", lambda: b.model.encode_image(image)), ("text", lambda: b.model.encode_text(text))):
            counter = FlopCounterMode(display=False)
            with counter:
                fn()
            out[f"{part}_gmacs"] = counter.get_total_flops() / 2 / 1e9
    out["gmacs_per_sample"] = out["image_gmacs"] + out["text_gmacs"]
    return out


def _gmacs_cached(study_dir: str, models: list[str]) -> dict[str, dict[str, float]]:
    path = os.path.join(study_dir, GMACS_JSON)
    cache = read_json(path) if os.path.exists(path) else {}
    missing = [m for m in models if m not in cache]
    for m in missing:
        cache[m] = model_gmacs(m)
        log.info("%s: %.6f GMACs per sample", m, cache[m]["gmacs_per_sample"])
    if missing:
        write_json(path, cache)
    return cache


# ---------------------------------------------------------------------------------------------
# fitting


def pareto_frontier(compute: list[float], error: list[float]) -> list[int]:
    """Indices of the runs with lower error than every run of less or equal compute, by increasing compute."""
    order = sorted(range(len(compute)), key=lambda i: (compute[i], error[i]))
    best, keep = math.inf, []
    for i in order:
        if error[i] < best:
            keep.append(i)
            best = error[i]
    return keep


def fit_power_law(compute: list[float], error: list[float]) -> dict[str, Any]:
    """Least-squares fit of ``log10 E = log10 beta + alpha log10 C``; standard errors from the fit's covariance.

    Needs 2 points for a fit and 3 for standard errors (with 2, ``*_se`` are NaN: a line through two
    points has no residual to estimate them from).
    """
    import numpy as np

    x, y = np.log10(np.asarray(compute, float)), np.log10(np.asarray(error, float))
    n = len(x)
    if n < 2 or np.ptp(x) == 0:
        raise ValueError(f"need at least 2 points at different compute to fit, got {n}")
    a = np.stack([np.ones(n), x], axis=1)
    coef, *_ = np.linalg.lstsq(a, y, rcond=None)
    resid = y - a @ coef
    dof = n - 2
    cov = (float(resid @ resid) / dof) * np.linalg.inv(a.T @ a) if dof > 0 else np.full((2, 2), np.nan)
    log_beta, alpha = float(coef[0]), float(coef[1])
    beta = 10**log_beta
    ss_tot = float(((y - y.mean()) ** 2).sum())
    return {
        "alpha": alpha,
        "alpha_se": float(math.sqrt(cov[1, 1])) if dof > 0 else math.nan,
        "beta": beta,
        "beta_se": float(beta * math.log(10) * math.sqrt(cov[0, 0])) if dof > 0 else math.nan,  # delta method
        "log10_beta": log_beta,
        "cov_log10": cov.tolist(),
        "n_points": n,
        "r2": 1 - float(resid @ resid) / ss_tot if ss_tot > 0 else math.nan,
    }


def predict(fit: dict[str, Any], compute: float) -> dict[str, float]:
    """E at ``compute`` with a +-1 standard error band (propagated in log space)."""
    x = math.log10(compute)
    ly = fit["log10_beta"] + fit["alpha"] * x
    c = fit["cov_log10"]
    var = c[0][0] + 2 * x * c[0][1] + x * x * c[1][1]
    se = math.sqrt(var) if var == var and var >= 0 else math.nan
    return {
        "compute_gmacs": compute,
        "error": 10**ly,
        "error_lo": 10 ** (ly - se) if se == se else math.nan,
        "error_hi": 10 ** (ly + se) if se == se else math.nan,
        "metric": 1 - 10**ly,
    }


def default_metrics(columns: list[str]) -> list[str]:
    """Every zero-shot top-1 and retrieval R@5 column (what the study's Figure 1 shows)."""
    return [c for c in columns if c.endswith("/zeroshot_top1") or c.endswith("_R@5")]


def fit_all(rows: list[dict[str, Any]], metrics: list[str], predict_at: list[float]) -> dict[str, Any]:
    """Frontier + power-law fit + predictions for each metric over all runs."""
    fits: dict[str, Any] = {}
    compute_all = [float(r["compute_gmacs"]) for r in rows]
    targets = predict_at or ([10 * max(compute_all), 100 * max(compute_all)] if compute_all else [])
    for m in metrics:
        pts = [(float(r["compute_gmacs"]), 1 - float(r[m]), r["run_id"]) for r in rows if r.get(m) is not None and r[m] == r[m]]
        dropped = [p[2] for p in pts if p[1] <= 0]
        pts = [p for p in pts if p[1] > 0]  # log of a zero error is undefined
        entry: dict[str, Any] = {"metric": m, "error": f"1 - {m}", "n_runs": len(pts), "perfect_runs_excluded": dropped}
        front = pareto_frontier([p[0] for p in pts], [p[1] for p in pts])
        entry["frontier"] = [pts[i][2] for i in front]
        try:
            fit = fit_power_law([pts[i][0] for i in front], [pts[i][1] for i in front])
        except ValueError as e:
            entry["fit"] = None
            entry["why_no_fit"] = str(e)
            log.warning("%s: no fit (%s)", m, e)
        else:
            entry["fit"] = fit
            entry["predictions"] = [predict(fit, c) for c in targets]
        fits[m] = entry
    return fits


# ---------------------------------------------------------------------------------------------
# plots and report


def _json_safe(obj: Any) -> Any:
    """NaN/inf (e.g. the standard error of a 2-point fit) -> None, since JSON has no NaN."""
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {k: _json_safe(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_json_safe(v) for v in obj]
    return obj


def _slug(s: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", s)


def plot_metric(rows: list[dict[str, Any]], entry: dict[str, Any], path: str) -> None:
    """Log-log compute vs error, runs coloured by scale and shaped by model, frontier + fitted law (Figure 1 style)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    m = entry["metric"]
    fig, ax = plt.subplots(figsize=(6, 4.2), dpi=110)
    scales = sorted({r["scale"] for r in rows}, key=lambda s: min(int(r["dataset_samples"]) for r in rows if r["scale"] == s))
    models = sorted({r["model"] for r in rows})
    colors = plt.get_cmap("viridis")(np.linspace(0.1, 0.85, max(1, len(scales))))
    markers = "osD^v<>p*h"
    front = set(entry.get("frontier", []))
    for r in rows:
        if r.get(m) is None or not (0 <= 1 - float(r[m])):
            continue
        e = 1 - float(r[m])
        if e <= 0:
            continue
        ax.scatter(
            float(r["compute_gmacs"]), e,
            color=colors[scales.index(r["scale"])], marker=markers[models.index(r["model"]) % len(markers)],
            edgecolors="black" if r["run_id"] in front else "none", linewidths=1.2, s=46, zorder=3,
        )  # fmt: skip
    for i, s in enumerate(scales):
        ax.scatter([], [], color=colors[i], label=f"data {s}")
    for j, mo in enumerate(models):
        ax.scatter([], [], color="gray", marker=markers[j % len(markers)], label=mo)
    fit = entry.get("fit")
    if fit:
        cs = [float(r["compute_gmacs"]) for r in rows]
        hi = max([cs and max(cs) or 1.0] + [p["compute_gmacs"] for p in entry.get("predictions", [])])
        xs = np.logspace(math.log10(min(cs)), math.log10(hi), 50)
        ax.plot(xs, fit["beta"] * xs ** fit["alpha"], "k--", lw=1,
                label=f"E = {fit['beta']:.3g} C^{fit['alpha']:.3f}")  # fmt: skip
        for p in entry.get("predictions", []):
            ax.scatter(p["compute_gmacs"], p["error"], marker="*", color="crimson", s=80, zorder=4)
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("total compute (GMACs)")
    ax.set_ylabel(f"error (1 - {m})")
    ax.set_title(m, fontsize=10)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=7, loc="best")
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    plt.close(fig)
    atomic_write_bytes(path, buf.getvalue())


def _fmt(v: Any, spec: str = ".4g") -> str:
    if isinstance(v, float):
        return "n/a" if v != v else format(v, spec)
    return str(v)


def fit_rows(fits: dict[str, Any]) -> list[dict[str, str]]:
    """One summary row per metric: alpha +- se, beta +- se, first prediction."""
    out = []
    for m, e in fits.items():
        f = e.get("fit")
        row = {"metric": m, "frontier_points": str(len(e.get("frontier", [])))}
        if f:
            row["alpha"] = f"{_fmt(f['alpha'])} ± {_fmt(f['alpha_se'])}"
            row["beta"] = f"{_fmt(f['beta'])} ± {_fmt(f['beta_se'])}"
            preds = e.get("predictions") or []
            row["prediction"] = "; ".join(
                f"C={p['compute_gmacs']:.3g}: {m.split('/')[-1]}={_fmt(p['metric'], '.3f')} (E {_fmt(p['error_lo'], '.3f')}..{_fmt(p['error_hi'], '.3f')})"
                for p in preds
            )
        else:
            row.update({"alpha": "n/a", "beta": "n/a", "prediction": e.get("why_no_fit", "")})
        out.append(row)
    return out


def write_report(path: str, cfg: StudyConfig, rows: list[dict[str, Any]], fits: dict[str, Any], plots: dict[str, str]) -> None:
    """One self-contained HTML page: grid, results table, fits with uncertainty, plots (relative PNG links)."""
    esc = html.escape
    cols = ["run_id", "model", "scale", "dataset_samples", "samples_seen", "gmacs_per_sample", "compute_gmacs", "final_loss"]
    mcols = sorted({k for r in rows for k in r if "/" in k})
    head = "".join(f"<th>{esc(c)}</th>" for c in cols + mcols)
    body = "".join(
        "<tr>" + "".join(f"<td>{esc(_fmt(r.get(c)))}</td>" for c in cols + mcols) + "</tr>" for r in rows
    )
    frows = fit_rows(fits)
    fhead = "".join(f"<th>{esc(c)}</th>" for c in ("metric", "frontier_points", "alpha", "beta", "prediction"))
    fbody = "".join(
        "<tr>" + "".join(f"<td>{esc(r.get(c, ''))}</td>" for c in ("metric", "frontier_points", "alpha", "beta", "prediction")) + "</tr>"
        for r in frows
    )
    imgs = "".join(f'<figure><img src="{esc(p)}" alt="{esc(m)}"><figcaption>{esc(m)}</figcaption></figure>' for m, p in plots.items())
    page = f"""<!doctype html>
<html><head><meta charset="utf-8"><title>laiontools scaling study</title>
<style>body{{font-family:sans-serif;margin:2em;max-width:1200px}}table{{border-collapse:collapse;font-size:12px}}
td,th{{border:1px solid #ccc;padding:3px 6px;text-align:right}}figure{{display:inline-block;margin:0 1em 1em 0}}
code{{background:#f4f4f4}}</style></head><body>
<h1>Scaling study</h1>
<p>Grid: scales {esc(", ".join(f"{k} ({v})" for k, v in cfg.scales.items()))}; samples seen {esc(str(cfg.samples_seen))};
models {esc(", ".join(cfg.models))}; global batch {cfg.batch_size}; {cfg.nproc} process(es) per run.</p>
<p>Compute C = GMACs per sample (image + text forward, torch FlopCounterMode / 2) &times; samples seen.
Error E = 1 &minus; metric. <code>E = &beta; C<sup>&alpha;</sup></code> is fitted by least squares in log-log space on the
Pareto frontier (runs with lower error than every run of less or equal compute; black-edged in the plots);
&plusmn; is one standard error from the fit's covariance (n/a with fewer than 3 frontier points). Red stars are predictions.</p>
<h2>Fits</h2><table><tr>{fhead}</tr>{fbody}</table>
<h2>Plots</h2>{imgs}
<h2>Runs</h2><table><tr>{head}</tr>{body}</table>
<p>Files: <code>{RESULTS_CSV}</code>, <code>{FITS_JSON}</code>, <code>{RUNS_DIR}/&lt;run&gt;/train</code> (run directories), <code>{RUNS_DIR}/&lt;run&gt;/{EVAL_FILE}</code>.</p>
</body></html>
"""
    atomic_write_bytes(path, page.encode())


# ---------------------------------------------------------------------------------------------
# the study


def run_id(model: str, scale: str, samples_seen: int) -> str:
    return _slug(f"{model}__{scale}__{samples_seen}")


def _write_results(path: str, rows: list[dict[str, Any]]) -> None:
    import pandas as pd

    buf = io.StringIO()
    pd.DataFrame(rows).to_csv(buf, index=False)
    atomic_write_bytes(path, buf.getvalue().encode())


def run_point(cfg: StudyConfig, model: str, scale: str, samples_seen: int, gmacs: float) -> dict[str, Any]:
    """Train (or resume, or skip) and evaluate (or skip) one grid point; return its results row."""
    from laiontools.stages.evaluate import EvaluateConfig, run_evaluate
    from laiontools.stages.train import SETTINGS_FILE, TrainConfig, is_finished, read_result, run_train

    rid = run_id(model, scale, samples_seen)
    base = os.path.join(cfg.output, RUNS_DIR, rid)
    run_dir = os.path.join(base, "train")
    eval_path = os.path.join(base, EVAL_FILE)
    if not is_finished(run_dir):
        log.info("study: training %s", rid)
        run_train(
            TrainConfig(
                manifest=cfg.scales[scale], model=model, samples_seen=int(samples_seen), batch_size=cfg.batch_size,
                nproc=cfg.nproc, output=run_dir, resume=os.path.exists(os.path.join(run_dir, SETTINGS_FILE)), **cfg.train,
            )
        )  # fmt: skip
    else:
        log.info("study: %s already trained", rid)
    if not is_done(eval_path):
        run_evaluate(
            EvaluateConfig(checkpoint=run_dir, evalset=list(cfg.evalset), evalsets_yaml=cfg.evalsets_yaml, output=eval_path, **cfg.evaluate)
        )
    result, ev = read_result(run_dir), read_json(eval_path)
    row: dict[str, Any] = {
        "run_id": rid,
        "model": model,
        "scale": scale,
        "manifest": cfg.scales[scale],
        "manifest_sha256": result["manifest_sha256"],
        "dataset_samples": read_json(os.path.join(run_dir, SETTINGS_FILE))["manifest_num_samples"],
        "samples_seen": result["samples_seen"],
        "steps": result["steps"],
        "gmacs_per_sample": gmacs,
        "compute_gmacs": gmacs * result["samples_seen"],
        "final_loss": result["final_loss"],
    }
    row.update(ev["metrics"])
    return row


def run_study(cfg: StudyConfig, spark: Any = None) -> dict[str, Any]:
    """Run the whole grid (skipping finished points), then collect, fit, plot and report.

    Returns ``{"rows", "fits", "results_csv", "report"}``. Safe to re-run after a kill: finished
    points are skipped, an interrupted training resumes from its checkpoint. ``spark`` is unused.
    """
    from laiontools import evalsets

    os.makedirs(cfg.output, exist_ok=True)
    write_json(os.path.join(cfg.output, "settings.json"), cfg.to_dict())
    evalsets.load_evalsets(cfg.evalset or None, cfg.evalsets_yaml)  # bad declarations fail before any training
    from laiontools.stages.train import check_trainable_manifest

    for scale, manifest in cfg.scales.items():
        check_trainable_manifest(manifest)  # a never-resharded manifest fails now, not hours in
    gm = _gmacs_cached(cfg.output, list(cfg.models))
    rows: list[dict[str, Any]] = []
    results_csv = os.path.join(cfg.output, RESULTS_CSV)
    for model in cfg.models:
        for scale in cfg.scales:
            for n in cfg.samples_seen:
                rows.append(run_point(cfg, model, scale, int(n), gm[model]["gmacs_per_sample"]))
                _write_results(results_csv, rows)  # partial results survive a kill
    metric_cols = sorted({k for r in rows for k in r if "/" in k})
    metrics = list(cfg.metrics) or default_metrics(metric_cols)
    unknown = [m for m in metrics if m not in metric_cols]
    if unknown:
        raise ConfigError(f"study: metric(s) {unknown} not produced by the evaluation; available: {metric_cols}")
    fits = fit_all(rows, metrics, [float(c) for c in cfg.predict_at])
    write_json(os.path.join(cfg.output, FITS_JSON), _json_safe({"gmacs": gm, "fits": fits}))
    os.makedirs(os.path.join(cfg.output, PLOTS_DIR), exist_ok=True)
    plots = {}
    for m, entry in fits.items():
        rel = f"{PLOTS_DIR}/{_slug(m)}.png"
        plot_metric(rows, entry, os.path.join(cfg.output, rel))
        plots[m] = rel
    report = os.path.join(cfg.output, REPORT_HTML)
    write_report(report, cfg, rows, fits, plots)
    emit(
        f"scaling study: {len(rows)} runs ({len(cfg.models)} model(s) x {len(cfg.scales)} scale(s) x {len(cfg.samples_seen)} budget(s))\n"
        f"{table(fit_rows(fits), ['metric', 'frontier_points', 'alpha', 'beta', 'prediction'])}\n"
        f"results: {results_csv}\nreport:  {report}"
    )
    return {"rows": rows, "fits": fits, "results_csv": results_csv, "report": report, "plots": plots}


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="laiontools study",
        description="Scaling-law study: train + evaluate a grid of scale x samples seen x model, fit E = beta C^alpha.",
    )
    add_config_args(p, StudyConfig)
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    run_study(config_from_args(StudyConfig, args))
    return 0
