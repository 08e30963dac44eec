"""Scaling-law analysis: compute per sample, the Pareto frontier, power-law fits, plots, reports, plans.

Used by ``laiontools study`` three ways: after its own grid run, on any results table
(``study fit``: ours or another study's, with a column mapping and row filters), and before a grid
is run (``study plan``: compute, GPU-hours, shards and disk of a planned grid).

Conventions (as in Cherti et al., CVPR 2023):

* compute C is in GMACs: GMACs per sample (one image + one text forward, counted by torch's
  ``FlopCounterMode``; MACs = FLOPs / 2) x samples seen;
* error E = 1 - accuracy (metric kind "accuracy") or the metric itself (kind "error");
* ``E = beta * C^alpha`` is fitted by least squares on ``log10 E = log10 beta + alpha log10 C`` over
  the Pareto frontier (runs with lower error than every run of less or equal compute; seed
  replicates of a run are one point, their mean), with standard errors from the fit's covariance.

This module is a library: it imports no stage.
"""

from __future__ import annotations

import html
import io
import logging
import math
import os
import re
from collections.abc import Sequence
from typing import Any

from laiontools.contracts import layout
from laiontools.core.config import ConfigError
from laiontools.core.errors import UserError
from laiontools.core.storage import atomic_write_bytes, write_json

log = logging.getLogger(__name__)

METRIC_KINDS = ("accuracy", "error")


# ---------------------------------------------------------------------------------------------
# compute


def model_gmacs(name: str) -> dict[str, float]:
    """GMACs of one sample's forward pass (image encoder + text encoder), counted by torch's FlopCounterMode.

    The model is built on torch's meta device (shapes, no weights, no memory), so any open_clip
    architecture is counted in well under a second on a CPU, ViT-L/14 included, and is kept in
    training mode: in eval mode under no_grad, nn.MultiheadAttention takes a fused fast path whose
    MACs FlopCounterMode does not see (the image tower's whole attention went uncounted that way).
    Tested against MACs counted by hand for lt-tiny and the paper's ViT-B/32, B/16 and L/14.
    Raises ModelError for an unknown model name.
    """
    import open_clip
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    from laiontools.models.registry import check_model_name, register_tiny_models

    register_tiny_models()
    check_model_name(name)
    cfg = open_clip.get_model_config(name) or {}
    size = cfg.get("vision_cfg", {}).get("image_size", 224)
    h, w = (size, size) if isinstance(size, int) else tuple(size)
    root = logging.getLogger()
    was_disabled, root.disabled = root.disabled, True  # open_clip's "no pretrained weights loaded" is expected here
    try:
        model = open_clip.create_model(name, pretrained=None, device="meta")
    finally:
        root.disabled = was_disabled
    model.train()  # no fused attention fast path (see above)
    image = torch.zeros(1, 3, h, w, device="meta")
    text = open_clip.get_tokenizer(name)(["a photo of a thing"]).to("meta")
    out: dict[str, float] = {}
    with torch.no_grad():
        for part, fn in (("image", lambda: model.encode_image(image)), ("text", lambda: model.encode_text(text))):
            counter = FlopCounterMode(display=False)
            with counter:
                fn()
            out[f"{part}_gmacs"] = counter.get_total_flops() / 2 / 1e9
    out["gmacs_per_sample"] = out["image_gmacs"] + out["text_gmacs"]
    return out


# ---------------------------------------------------------------------------------------------
# fitting


def pareto_frontier(compute: Sequence[float], error: Sequence[float]) -> list[int]:
    """Indices of the runs with lower error than every run of less or equal compute, by increasing compute."""
    order = sorted(range(len(compute)), key=lambda i: (compute[i], error[i]))
    best, keep = math.inf, []
    for i in order:
        if error[i] < best:
            keep.append(i)
            best = error[i]
    return keep


def fit_power_law(compute: Sequence[float], error: Sequence[float]) -> dict[str, Any]:
    """Least-squares fit of ``log10 E = log10 beta + alpha log10 C``; standard errors from the fit's covariance.

    Needs 2 points at different compute for a fit (else ValueError) and 3 for standard errors (with
    2, ``*_se`` are NaN: a line through two points has no residual to estimate them from).
    ``cov_log10`` is the covariance of (log10 beta, alpha): residual variance / (n - 2) x (A^T A)^-1.
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


def predict(fit: dict[str, Any], compute: float, kind: str = "accuracy") -> dict[str, float]:
    """E at ``compute`` with a +-1 standard error band (propagated in log space); ``metric`` in the table's kind."""
    x = math.log10(compute)
    ly = fit["log10_beta"] + fit["alpha"] * x
    c = fit["cov_log10"]
    var = c[0][0] + 2 * x * c[0][1] + x * x * c[1][1]
    se = math.sqrt(var) if math.isfinite(var) and var >= 0 else math.nan
    e = 10**ly
    return {
        "compute_gmacs": compute,
        "error": e,
        "error_lo": 10 ** (ly - se) if math.isfinite(se) else math.nan,
        "error_hi": 10 ** (ly + se) if math.isfinite(se) else math.nan,
        "metric": 1 - e if kind == "accuracy" else e,
    }


def to_error(value: float, kind: str) -> float:
    """The error of a metric value: 1 - value for an accuracy, the value itself for an error."""
    if kind not in METRIC_KINDS:
        raise ValueError(f"metric kind {kind!r}: use one of {METRIC_KINDS}")
    return 1 - value if kind == "accuracy" else value


def default_metrics(columns: Sequence[str]) -> list[str]:
    """Every zero-shot top-1 and retrieval R@5 column (what the study's Figure 1 shows)."""
    return [c for c in columns if c.endswith(("/zeroshot_top1", "_R@5"))]


def _number(v: Any) -> float | None:
    try:
        f = float(v)
    except (TypeError, ValueError):
        return None
    return f if math.isfinite(f) else None


def _why_not_a_value(v: Any) -> str:
    """Why a metric cell is no finite number (for the runs a fit leaves out)."""
    try:
        f = float(v)
    except (TypeError, ValueError):
        return f"not a number ({v!r})"
    return "empty or NaN" if math.isnan(f) else f"not finite ({f})"


# A run's outcome in a results table: "ok", or why it has no numbers ("diverged": its training loss or weights
# became NaN / infinite). A table without the column (another study's) holds finished runs only.
RUN_OK = "ok"


def run_failure(row: dict[str, Any]) -> str | None:
    """Why a results row is no finished run (``"diverged: <reason>"``), or None for a finished one (status ``ok``,
    or no ``status`` in the row)."""
    status = row.get("status")
    if status is None or (isinstance(status, float) and math.isnan(status)) or str(status).strip() in ("", RUN_OK):
        return None
    reason = row.get("status_reason")
    reason = "" if reason is None or (isinstance(reason, float) and math.isnan(reason)) else str(reason).strip()
    return f"{status}: {reason}" if reason else str(status)


def _metric_value(row: dict[str, Any], m: str) -> float | None:
    """A row's finite value of metric ``m``; None when it has none or the row's run did not finish (:func:`run_failure`)."""
    return None if run_failure(row) is not None else _number(row.get(m))


def fit_all(rows: list[dict[str, Any]], metrics: Sequence[str], predict_at: Sequence[float] = (),
            kind: str = "accuracy") -> dict[str, Any]:
    """Frontier + power-law fit + predictions for each metric over all rows.

    Rows need ``compute_gmacs``, ``run_id`` and the metric columns; a row without a finite value for
    a metric, or of a run that did not finish (``status`` other than ``ok``, e.g. ``diverged``: :func:`run_failure`),
    is left out of that metric and listed, with the reason, in ``runs_excluded`` (logged as a warning; a metric
    left without a fit names them in ``why_no_fit``), and a row with zero error is listed in ``perfect_runs_excluded`` (log 0 is undefined). A metric whose frontier cannot be fitted gets
    ``fit: None`` and ``why_no_fit``. Predictions default to 10x and 100x the largest compute.

    Seed replicates (rows with a ``seed`` that agree in model, scale, samples seen and compute) are one
    point, their mean error: the frontier keeps the lowest error at a compute, and over replicates that
    is the luckiest seed, a budget run with more seeds pulled down by chance alone. ``frontier`` names a
    point by its first row's run id; ``seed_means`` lists, per such id, the runs averaged into it.
    """
    fits: dict[str, Any] = {}
    compute_all = [float(r["compute_gmacs"]) for r in rows]
    targets = list(predict_at) or ([10 * max(compute_all), 100 * max(compute_all)] if compute_all else [])
    for m in metrics:
        pts, excluded = [], []
        for i, r in enumerate(rows):
            v = _metric_value(r, m)
            if v is not None:
                pts.append((float(r["compute_gmacs"]), to_error(v, kind), r["run_id"], _replicate_key(r, i), i))
            else:
                excluded.append({"run_id": r["run_id"], "reason": run_failure(r) or _why_not_a_value(r.get(m))})
        if excluded:
            log.warning("%s: %d run(s) left out, no finite value: %s", m, len(excluded),
                        "; ".join(f"{x['run_id']} ({x['reason']})" for x in excluded))
        dropped = [p[2] for p in pts if p[1] <= 0]
        pts = [p for p in pts if p[1] > 0]
        entry: dict[str, Any] = {"metric": m, "kind": kind, "error": f"1 - {m}" if kind == "accuracy" else m,
                                 "n_runs": len(pts), "runs_excluded": excluded,
                                 "perfect_runs_excluded": dropped}
        seeds: dict[Any, list[str]] = {}
        for p in pts:
            seeds.setdefault(p[3], []).append(_id_part(rows[p[4]].get("seed")))
        # a seed twice under one key: rows of other things (one per downstream set, say), not replicates
        apart = {k for k, v in seeds.items() if len(set(v)) < len(v)}
        groups: dict[Any, list[tuple[float, float, Any, Any, int]]] = {}
        for p in pts:
            groups.setdefault(("row", p[4]) if p[3] in apart else p[3], []).append(p)
        pts = [(g[0][0], sum(p[1] for p in g) / len(g), g[0][2]) for g in groups.values()]
        entry["seed_means"] = {g[0][2]: [p[2] for p in g] for g in groups.values() if len(g) > 1}
        front = pareto_frontier([p[0] for p in pts], [p[1] for p in pts])
        entry["frontier"] = [pts[i][2] for i in front]
        try:
            fit = fit_power_law([pts[i][0] for i in front], [pts[i][1] for i in front])
        except ValueError as e:
            entry["fit"] = None
            # with the runs left out named: "got 1" of a 3-run grid whose 2 others diverged says why
            entry["why_no_fit"] = str(e) + (f" ({len(excluded)} run(s) left out: {', '.join(x['run_id'] for x in excluded)})"
                                            if excluded else "")
            log.warning("%s: no fit (%s)", m, e)
        else:
            entry["fit"] = fit
            entry["predictions"] = [predict(fit, c, kind) for c in targets]
        fits[m] = entry
    return fits


def _replicate_key(row: dict[str, Any], i: int) -> tuple[Any, ...]:
    """What a row's seed replicates share: model, scale, samples seen and compute, when the row has a seed;
    else the row alone (rows without seeds that agree there are other things, e.g. one per downstream set;
    :func:`fit_all` also keeps apart a group in which a seed repeats)."""
    if _number(row.get("seed")) is None:
        return ("row", i)
    return ("seeds", *(_id_part(row.get(c)) for c in RUN_KEY_COLUMNS if c != "seed"))


def scale_sizes(rows: list[dict[str, Any]], scales: Sequence[str]) -> dict[str, float | None]:
    """Each scale's dataset size, to order scales by: the smallest ``dataset_samples`` of its rows, else its
    name read as a sample count (``100``, ``80M``, ``2B``; never as text, where "100" < "20"), else None."""
    out: dict[str, float | None] = {}
    for s in scales:
        sizes = [n for r in rows if str(r.get("scale", "")) == s and (n := _number(r.get("dataset_samples"))) is not None]
        try:
            out[s] = min(sizes) if sizes else float(parse_count(s))
        except ValueError:
            out[s] = None
    return out


def data_scale_effect(rows: list[dict[str, Any]], metrics: Sequence[str], kind: str = "accuracy") -> list[dict[str, Any]]:
    """Does data scale matter at a fixed budget? Per metric and model, at the largest samples seen that 2+ scales share.

    Groups the runs at that budget by scale (ordered by :func:`scale_sizes`: ``dataset_samples``, else
    the scale's name as a count; raises UserError naming the scales that have neither) and
    reports each scale's mean, min and max error over its runs (seeds). ``gap`` = mean error of the
    smallest scale - mean error of the largest; ``spread`` = the larger of the two scales' max - min
    over seeds. ``signal`` is True when both scales have 2+ runs and gap > spread: the largest scale
    is better by more than seeds move either. Rows need ``scale`` and ``samples_seen``; without them,
    or with one scale, the list is empty.
    """
    out: list[dict[str, Any]] = []
    if not rows or not all("scale" in r and "samples_seen" in r for r in rows):
        return out
    for m in metrics:
        for model in sorted({str(r.get("model", "")) for r in rows}):
            mine = [r for r in rows if str(r.get("model", "")) == model and _metric_value(r, m) is not None]
            if not mine:
                continue
            budgets = sorted({float(r["samples_seen"]) for r in mine}, reverse=True)
            shared = [b for b in budgets if len({str(r["scale"]) for r in mine if float(r["samples_seen"]) == b}) >= 2]
            if not shared:
                continue
            top = shared[0]
            by_scale: dict[str, list[float]] = {}
            for r in mine:
                if float(r["samples_seen"]) == top:
                    by_scale.setdefault(str(r["scale"]), []).append(to_error(float(r[m]), kind))
            size = scale_sizes(rows, list(by_scale))
            unsized = sorted(s for s, n in size.items() if n is None)
            if unsized:
                raise UserError(f"scales {unsized} have no dataset_samples and their names are no sample counts (100, "
                                "80M, 2B): which is the smallest data scale is unknown; give a dataset_samples column "
                                "(--columns dataset_samples=<column>) or name the scales by their sizes")
            order = sorted(by_scale, key=lambda s: (size[s], s))
            scales = [{"scale": s, "dataset_samples": size[s], "n_runs": len(by_scale[s]),
                       "mean_error": sum(by_scale[s]) / len(by_scale[s]), "min_error": min(by_scale[s]),
                       "max_error": max(by_scale[s])} for s in order]
            small, large = scales[0], scales[-1]
            gap = small["mean_error"] - large["mean_error"]
            spread = max(small["max_error"] - small["min_error"], large["max_error"] - large["min_error"])
            # Scales of one size (a pool smaller than both targets: nested subsets of the same samples)
            # have no smaller and larger one: their gap is no effect of data scale.
            same = small["dataset_samples"] == large["dataset_samples"]
            out.append({
                "metric": m, "model": model, "samples_seen": top, "scales": scales,
                "smallest": small["scale"], "largest": large["scale"], "gap": gap, "spread": spread,
                "signal": not same and small["n_runs"] >= 2 and large["n_runs"] >= 2 and gap > spread,
                **({"note": f"every scale here has the same dataset size ({small['dataset_samples']:g} samples): "
                            "no data-scale effect to measure"} if same else {}),
            })  # fmt: skip
    return out


# ---------------------------------------------------------------------------------------------
# results tables (ours or another study's)


def _split_pairs(items: Sequence[str], what: str) -> list[tuple[str, str, str]]:
    """'a=b,c!=d' items (repeatable, comma-separated) -> [(a, '=', b), (c, '!=', d)]."""
    out = []
    for item in items:
        for part in (p.strip() for p in str(item).split(",")):
            if not part:
                continue
            m = re.fullmatch(r"([^=!]+?)\s*(!=|=)\s*(.*)", part)
            if not m or not m.group(1).strip():
                raise UserError(f"{what} {part!r}: expected name=value")
            out.append((m.group(1).strip(), m.group(2), m.group(3).strip()))
    return out


def _matches(v: Any, want: str) -> bool:
    """Cell == filter value: as numbers when both read as numbers (``1e9`` == ``1000000000``), else as text."""
    a, b = _number(v), _number(want)
    if a is not None and b is not None:
        return a == b
    return str(v) == want


def _id_part(v: Any) -> str:
    """A cell as part of a run id: whole numbers without a float's '.0' (3e9 -> 3000000000)."""
    f = _number(v)
    return str(int(f)) if f is not None and f == int(f) else str(v)


def _count_cell(path: str, col: str, v: Any) -> Any:
    """A count cell as an int (``3B`` -> 3000000000); an empty cell stays empty; anything else is refused."""
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return v
    try:
        return parse_count(v)
    except ValueError as e:
        raise UserError(f"results table {path}: column {col!r}: {e}") from e


# The columns that identify one training run in a results table (those of them a table has).
RUN_KEY_COLUMNS = ("model", "scale", "samples_seen", "seed", "compute_gmacs")


def _refuse_repeated_runs(path: str, df: Any) -> None:
    """Raise UserError when rows repeat a run: the same ``run_id``; with a ``seed`` column, the same model, scale,
    samples seen, seed and compute (those of them the table has); in a table with neither, two identical rows.
    Seed replicates are rows with distinct ``seed`` values (or run ids): a run counted twice would pass for two
    seeds that agree exactly. (Rows that differ elsewhere, e.g. one per downstream set, are no repeats.)"""
    keys = [c for c in RUN_KEY_COLUMNS if c in df.columns]
    if "run_id" in df.columns:
        checks = [("run_id", ["run_id"])] + ([(", ".join(keys), keys)] if "seed" in df.columns else [])
    else:
        checks = [(", ".join(keys), keys)] if "seed" in df.columns else [("every column", list(df.columns))]
    for what, cols in checks:
        seen: dict[tuple[str, ...], Any] = {}
        for i, r in zip(df.index, df[cols].itertuples(index=False)):
            key = tuple(_id_part(v) for v in r)
            if key in seen:
                raise UserError(
                    f"results table {path}: rows {seen[key]} and {i} repeat the run ({what} = {', '.join(key)}); list each "
                    f"run once (seed replicates need distinct values in a `seed` column)")
            seen[key] = i


def load_results_table(path: str, columns: Sequence[str] = (), where: Sequence[str] = ()) -> list[dict[str, Any]]:
    """Rows of a results table (CSV; TSV by suffix) in this module's column names.

    ``columns``: ``ours=theirs`` pairs (``compute_gmacs=gmacs_total``) copying a column of the
    table under our name. ``where``: ``column=value`` / ``column!=value`` row filters, all of which a
    row must pass (column names after mapping). ``compute_gmacs`` is taken from the table, else
    computed as ``gmacs_per_sample x samples_seen``. A ``run_id`` is made from model / scale /
    samples seen (or the row number) when the table has none. Raises UserError naming the file for
    a missing column, an empty result or a table without compute.
    """
    import pandas as pd

    if not os.path.exists(path):
        raise UserError(f"results table {path} does not exist")
    try:
        df = pd.read_csv(path, sep="\t" if path.endswith((".tsv", ".tsv.gz")) else ",")
    except (pd.errors.ParserError, pd.errors.EmptyDataError, UnicodeDecodeError) as e:
        raise UserError(f"results table {path} is not a readable CSV ({e})") from e
    have = list(df.columns)
    for ours, _, theirs in _split_pairs(columns, "--columns"):
        if theirs not in df.columns:
            raise UserError(f"results table {path}: --columns {ours}={theirs}: no column {theirs!r}; columns: {have}")
        df[ours] = df[theirs]
    for col in ("samples_seen", "dataset_samples"):  # counts may be written 3B, 13e9, 400M
        if col in df.columns:
            df[col] = df[col].map(lambda v, col=col: _count_cell(path, col, v))
    for col, op, value in _split_pairs(where, "--where"):
        if col not in df.columns:
            raise UserError(f"results table {path}: --where {col}{op}{value}: no column {col!r}; columns: {list(df.columns)}")
        hit = df[col].map(lambda v, value=value: _matches(v, value))
        df = df[hit if op == "=" else ~hit]
    if df.empty:
        raise UserError(f"results table {path}: no row passes --where {list(where)} (of its rows)")
    if "compute_gmacs" not in df.columns:
        if {"gmacs_per_sample", "samples_seen"} <= set(df.columns):
            df["compute_gmacs"] = df["gmacs_per_sample"].astype(float) * df["samples_seen"].astype(float)
        else:
            raise UserError(
                f"results table {path} has no compute column: map one with --columns compute_gmacs=<column> "
                f"(total GMACs of a run), or give gmacs_per_sample and samples_seen; columns: {have}"
            )
    bad = df["compute_gmacs"].map(lambda v: (_number(v) or 0) <= 0)
    if bad.any():
        raise UserError(f"results table {path}: compute_gmacs must be a positive number; rows {list(df.index[bad])[:10]} are not")
    _refuse_repeated_runs(path, df)
    rows = df.to_dict("records")
    if "run_id" not in df.columns:
        parts = [c for c in ("model", "scale", "samples_seen", "seed") if c in df.columns]
        for i, r in enumerate(rows):
            r["run_id"] = "__".join(_id_part(r[c]) for c in parts) if parts else f"row{i}"
    seen: dict[str, int] = {}
    for r in rows:  # frontiers name runs by id: make ids unique
        rid = str(r["run_id"])
        seen[rid] = seen.get(rid, 0) + 1
        r["run_id"] = rid if seen[rid] == 1 else f"{rid}#{seen[rid]}"
    return rows


def mixed_run_columns(rows: list[dict[str, Any]], metrics: Sequence[str]) -> dict[str, list[str]]:
    """Text columns whose value differs between rows of the same run (same model, scale, samples seen,
    seed and compute, those of them the rows have): {column: its values there, sorted}. Such rows are
    usually one table holding several things to fit apart (one row per downstream dataset, or per
    training set when no ``scale`` is mapped); fitted together they make one frontier of unlike rows."""
    keys = [c for c in RUN_KEY_COLUMNS if any(c in r for r in rows)]
    skip = {"run_id", *keys, *metrics}
    groups: dict[tuple[str, ...], list[dict[str, Any]]] = {}
    for r in rows:
        groups.setdefault(tuple(_id_part(r.get(c)) for c in keys), []).append(r)
    mixed: dict[str, set[str]] = {}
    for group in groups.values():
        if len(group) < 2:
            continue
        for col in {k for r in group for k in r} - skip:
            vals = {v for r in group if isinstance(v := r.get(col), str)}
            if len(vals) > 1:
                mixed.setdefault(col, set()).update(vals)
    return {c: sorted(v) for c, v in sorted(mixed.items())}


def check_metric_values(rows: list[dict[str, Any]], metrics: Sequence[str], kind: str, where: str) -> None:
    """Raise UserError when a metric column is missing or holds values outside [0, 1] (e.g. percentages)."""
    cols = sorted({k for r in rows for k in r})
    for m in metrics:
        if not any(m in r for r in rows):
            raise UserError(f"{where}: no metric column {m!r}; columns: {cols}")
        vals = [v for r in rows if (v := _number(r.get(m))) is not None]
        if not vals:
            raise UserError(f"{where}: metric {m!r} has no numeric value in any row")
        if min(vals) < 0 or max(vals) > 1:
            raise UserError(
                f"{where}: metric {m!r} ranges {min(vals):g}..{max(vals):g}; {kind} values must lie in [0, 1] "
                f"(for percentages give --metric-scale 100)"
            )


# ---------------------------------------------------------------------------------------------
# plots and report


def json_safe(obj: Any) -> Any:
    """NaN/inf (e.g. the standard error of a 2-point fit) -> None, since JSON has no NaN."""
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {k: json_safe(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [json_safe(v) for v in obj]
    return obj


def slug(s: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", s)


def plot_metric(rows: list[dict[str, Any]], entry: dict[str, Any], path: str) -> None:
    """Log-log compute vs error, runs coloured by scale and shaped by model, frontier + fitted law (Figure 1 style).

    ``scale`` and ``model`` columns are optional (one colour / marker without them).
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    m, kind = entry["metric"], entry.get("kind", "accuracy")
    pts = [(r, to_error(v, kind)) for r in rows if (v := _metric_value(r, m)) is not None]
    pts = [(r, e) for r, e in pts if e > 0]
    size = scale_sizes(rows, sorted({str(r.get("scale", "")) for r, _ in pts}))
    scales = sorted(size, key=lambda s: (math.inf if size[s] is None else size[s], s))  # colours only: unsized last
    models = sorted({str(r.get("model", "")) for r, _ in pts})
    fig, ax = plt.subplots(figsize=(6, 4.2), dpi=110)
    colors = plt.get_cmap("viridis")(np.linspace(0.1, 0.85, max(1, len(scales))))
    markers = "osD^v<>p*h"
    means = entry.get("seed_means", {})
    front = {rid for f in entry.get("frontier", []) for rid in means.get(f, [f])}
    for r, e in pts:
        ax.scatter(
            float(r["compute_gmacs"]), e,
            color=colors[scales.index(str(r.get("scale", "")))],
            marker=markers[models.index(str(r.get("model", ""))) % len(markers)],
            edgecolors="black" if r["run_id"] in front else "none", linewidths=1.2, s=46, zorder=3,
        )  # fmt: skip
    if scales != [""]:
        for i, s in enumerate(scales):
            ax.scatter([], [], color=colors[i], label=f"data {s}")
    if models != [""]:
        for j, mo in enumerate(models):
            ax.scatter([], [], color="gray", marker=markers[j % len(markers)], label=mo)
    fit = entry.get("fit")
    if fit and pts:
        cs = [float(r["compute_gmacs"]) for r, _ in pts]
        hi = max([max(cs)] + [p["compute_gmacs"] for p in entry.get("predictions", [])])
        xs = np.logspace(math.log10(min(cs)), math.log10(hi), 50)
        ax.plot(xs, fit["beta"] * xs ** fit["alpha"], "k--", lw=1, label=f"E = {fit['beta']:.3g} C^{fit['alpha']:.3f}")
        for p in entry.get("predictions", []):
            ax.scatter(p["compute_gmacs"], p["error"], marker="*", color="crimson", s=80, zorder=4)
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("total compute (GMACs)")
    ax.set_ylabel(f"error ({entry.get('error', m)})")
    ax.set_title(m, fontsize=10)
    ax.grid(True, which="both", alpha=0.3)
    if ax.get_legend_handles_labels()[0]:
        ax.legend(fontsize=7, loc="best")
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    plt.close(fig)
    atomic_write_bytes(path, buf.getvalue())


def fmt(v: Any, spec: str = ".4g") -> str:
    if isinstance(v, float):
        return "n/a" if math.isnan(v) else format(v, spec)
    return "n/a" if v is None else str(v)


def fit_rows(fits: dict[str, Any]) -> list[dict[str, str]]:
    """One summary row per metric: alpha +- se, beta +- se, predictions."""
    out = []
    for m, e in fits.items():
        f = e.get("fit")
        row = {"metric": m, "frontier_points": str(len(e.get("frontier", []))),
               "runs_left_out": "; ".join(f"{x['run_id']} ({x['reason']})" for x in e.get("runs_excluded", []))
               + ("; " if e.get("runs_excluded") and e.get("perfect_runs_excluded") else "")
               + "; ".join(f"{r} (zero error)" for r in e.get("perfect_runs_excluded", []))}
        if f:
            row["alpha"] = f"{fmt(f['alpha'])} ± {fmt(f['alpha_se'])}"
            row["beta"] = f"{fmt(f['beta'])} ± {fmt(f['beta_se'])}"
            preds = e.get("predictions") or []
            row["prediction"] = "; ".join(
                f"C={p['compute_gmacs']:.3g}: {m.split('/')[-1]}={fmt(p['metric'], '.3f')} "
                f"(E {fmt(p['error_lo'], '.3f')}..{fmt(p['error_hi'], '.3f')})"
                for p in preds
            )
        else:
            row.update({"alpha": "n/a", "beta": "n/a", "prediction": e.get("why_no_fit", "")})
        out.append(row)
    return out


FIT_COLUMNS = ["metric", "frontier_points", "alpha", "beta", "prediction", "runs_left_out"]


def effect_html(effects: Sequence[dict[str, Any]]) -> str:
    """The data-scale-at-fixed-budget table: error per scale (mean, min..max over seeds), gap vs spread."""
    if not effects:
        return ""
    esc = html.escape
    trs = []
    for e in effects:
        per = "; ".join(f"{s['scale']}: {s['mean_error']:.3f} ({s['min_error']:.3f}..{s['max_error']:.3f}, {s['n_runs']} run(s))"
                        for s in e["scales"])
        verdict = ("n/a: same size" if e.get("note") else "yes" if e["signal"]
                   else "no" if min(s["n_runs"] for s in (e["scales"][0], e["scales"][-1])) >= 2 else "needs 2+ seeds per scale")
        trs.append(f"<tr><td>{esc(e['metric'])}</td><td>{esc(e['model'])}</td><td>{e['samples_seen']:.4g}</td><td>{esc(per)}</td>"
                   f"<td>{e['gap']:.3f}</td><td>{e['spread']:.3f}</td><td>{verdict}</td></tr>")
    return ("<h2>Data scale at a fixed budget</h2><p>At the largest samples seen that 2+ scales share: error per scale, mean "
            "(min..max over runs, i.e. seeds). Gap = smallest scale's mean error &minus; largest scale's; spread = the larger "
            "of the two scales' max &minus; min. The largest scale wins beyond seed noise when gap &gt; spread.</p>"
            "<table><tr><th>metric</th><th>model</th><th>samples seen</th><th>error by scale</th><th>gap</th><th>spread</th>"
            "<th>gap &gt; spread</th></tr>" + "".join(trs) + "</table>")


def write_report(path: str, title: str, intro_html: str, rows: list[dict[str, Any]], fits: dict[str, Any],
                 plots: dict[str, str], columns: Sequence[str] | None = None, footer_html: str = "",
                 effects: Sequence[dict[str, Any]] = ()) -> None:
    """One self-contained HTML page: intro, fits with uncertainty, data scale at a fixed budget, plots, the runs table."""
    esc = html.escape
    metric_cols = list(fits)
    cols = [c for c in (columns or []) if any(c in r for r in rows)]
    cols += [c for c in metric_cols if c not in cols]
    if not columns:
        cols = [c for c in ("run_id", "model", "scale", "samples_seen", "compute_gmacs") if any(c in r for r in rows)] + metric_cols
    head = "".join(f"<th>{esc(c)}</th>" for c in cols)
    body = "".join("<tr>" + "".join(f"<td>{esc(fmt(r.get(c)))}</td>" for c in cols) + "</tr>" for r in rows)
    fhead = "".join(f"<th>{esc(c)}</th>" for c in FIT_COLUMNS)
    fbody = "".join("<tr>" + "".join(f"<td>{esc(r.get(c, ''))}</td>" for c in FIT_COLUMNS) + "</tr>" for r in fit_rows(fits))
    imgs = "".join(f'<figure><img src="{esc(p)}" alt="{esc(m)}"><figcaption>{esc(m)}</figcaption></figure>' for m, p in plots.items())
    page = f"""<!doctype html>
<html><head><meta charset="utf-8"><title>{esc(title)}</title>
<style>body{{font-family:sans-serif;margin:2em;max-width:1200px}}table{{border-collapse:collapse;font-size:12px}}
td,th{{border:1px solid #ccc;padding:3px 6px;text-align:right}}figure{{display:inline-block;margin:0 1em 1em 0}}
code{{background:#f4f4f4}}</style></head><body>
<h1>{esc(title)}</h1>
{intro_html}
<p>Error E = 1 &minus; metric for accuracies, the metric itself for errors. <code>E = &beta; C<sup>&alpha;</sup></code>
is fitted by least squares in log-log space on the Pareto frontier (runs with lower error than every run of less or
equal compute; black-edged in the plots; seed replicates of one run count as one point, their mean error); &plusmn; is one standard error from the fit's covariance (n/a with fewer than
3 frontier points). Red stars are predictions.</p>
<h2>Fits</h2><table><tr>{fhead}</tr>{fbody}</table>
{effect_html(effects)}
<h2>Plots</h2>{imgs}
<h2>Runs</h2><table><tr>{head}</tr>{body}</table>
{footer_html}
</body></html>
"""
    atomic_write_bytes(path, page.encode())


def fit_and_report(rows: list[dict[str, Any]], metrics: Sequence[str], output: str, *, kind: str = "accuracy",
                   predict_at: Sequence[float] = (), title: str = "Scaling fit", intro_html: str = "",
                   columns: Sequence[str] | None = None, footer_html: str = "",
                   extra_json: dict[str, Any] | None = None) -> dict[str, Any]:
    """Fit every metric, write ``fits.json``, one PNG per metric under ``plots/`` and ``report.html`` into ``output``.

    Also reports :func:`data_scale_effect` (in ``fits.json`` and the report). Returns ``{"fits",
    "data_scale_effect", "plots" (metric -> path relative to output), "fits_json", "report"}``.
    """
    fits = fit_all(rows, metrics, predict_at, kind)
    effects = data_scale_effect(rows, metrics, kind)
    os.makedirs(os.path.join(output, layout.STUDY_PLOTS_DIR), exist_ok=True)
    fits_json = os.path.join(output, layout.STUDY_FITS_JSON)
    write_json(fits_json, json_safe({**(extra_json or {}), "kind": kind, "fits": fits, "data_scale_effect": effects}))
    plots = {}
    for m, entry in fits.items():
        rel = f"{layout.STUDY_PLOTS_DIR}/{slug(m)}.png"
        plot_metric(rows, entry, os.path.join(output, rel))
        plots[m] = rel
    report = os.path.join(output, layout.STUDY_REPORT_HTML)
    write_report(report, title, intro_html, rows, fits, plots, columns, footer_html, effects)
    return {"fits": fits, "data_scale_effect": effects, "plots": plots, "fits_json": fits_json, "report": report}


# ---------------------------------------------------------------------------------------------
# planning a grid before running it

_SUFFIX = {"k": 1e3, "m": 1e6, "b": 1e9, "g": 1e9, "t": 1e12}


def parse_count(v: Any) -> int:
    """A sample count from a number or a name like ``80M``, ``400M``, ``2B``, ``12.8k``, ``1e9``. Raises ValueError."""
    if isinstance(v, (int, float)) and not isinstance(v, bool):
        n = float(v)
    else:
        m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+(?:[eE][+-]?[0-9]+)?)\s*([kKmMbBgGtT]?)\s*", str(v))
        if not m:
            raise ValueError(f"{v!r} is not a sample count (a number, or a number with k / M / B / T)")
        n = float(m.group(1)) * _SUFFIX.get(m.group(2).lower(), 1)
    if not math.isfinite(n) or n <= 0 or n != int(n):
        raise ValueError(f"{v!r} is not a positive whole number of samples")
    return int(n)


def optimizer_steps(samples_seen: int, batch_size: int) -> int:
    """The optimizer steps a run of budget ``samples_seen`` at global batch ``batch_size`` makes: ``samples_seen //
    batch_size`` (``laiontools train`` makes exactly these and sees ``steps x batch_size`` samples)."""
    return int(samples_seen) // int(batch_size)


def check_budget_steps(samples_seen: Sequence[int], batch_size: int, what: str) -> None:
    """Raise ConfigError when a budget is under one global batch, or when two budgets make the same number of
    optimizer steps (:func:`optimizer_steps`): their runs would be one run trained twice under two names (and
    ``study fit`` refuses the pair as a repeated run, after the training). Names both budgets, the batch, the
    step count and what to do."""
    by_steps: dict[int, int] = {}
    for n in sorted(int(b) for b in samples_seen):
        steps = optimizer_steps(n, batch_size)
        if steps < 1:
            raise ConfigError(f"{what}: samples seen {n} is smaller than one global batch ({batch_size})")
        if steps in by_steps:
            a = by_steps[steps]
            if a == n:
                raise ConfigError(f"{what}: `samples_seen` lists {n} more than once; give each value once")
            raise ConfigError(
                f"{what}: samples_seen budgets {a} and {n} both make {steps} optimizer steps of global batch {batch_size} "
                f"(steps = samples seen // batch size; each run would see {steps * batch_size} samples): one run trained "
                f"twice, which `study fit` refuses as a repeated run. Drop one of the two budgets, or use a global batch "
                f"of at most {n - a} (budgets that far apart then differ in steps)")
        by_steps[steps] = n


# Training costs about 3 forward passes (the backward pass is about twice the forward's work) and a MAC is 2 FLOPs.
TRAIN_FLOPS_PER_FORWARD_MAC = 6


def plan_grid(models: Sequence[str], scales: dict[str, int], samples_seen: Sequence[int], gmacs: dict[str, float], *,
              batch_size: int, images_per_second: dict[str, float] | None = None, gpu_tflops: float | None = None,
              shard_size: int = 10_000, bytes_per_sample: float = 0.0, extra_seeds: Sequence[int] = (),
              shards: dict[str, int] | None = None) -> dict[str, Any]:
    """Per run and in total: compute, steps, epochs, GPU-hours; per scale: shards, disk, the runs that share it.

    ``shards``: a scale's shard count where known (a resharded manifest lists them), else derived from
    ``shard_size``. ``extra_seeds``: as the study's, one more run of every model and scale at the largest budget per
    seed (run id ``<model>__<scale>__<budget>__seed<k>``).

    ``steps`` are the optimizer steps train makes (:func:`optimizer_steps`, rounded down).
    ``gmacs``: GMACs per sample of each model (:func:`model_gmacs`). GPU-hours of a run = samples seen
    / images per second per GPU / 3600 (a GPU-hour is one GPU busy one hour, whatever the number of
    GPUs); the rate is ``images_per_second[model]`` when stated, else derived from ``gpu_tflops``
    (sustained) as ``gpu_tflops * 1e12 / (6 * GMACs per sample * 1e9)``, else unknown (None).
    Disk of a scale = samples x ``bytes_per_sample`` (one resharded copy); shards = ceil(samples /
    ``shard_size``). Every run of a scale reads the same shards; nested subsets make every smaller
    scale's samples part of the larger ones'.
    """
    rate_of: dict[str, tuple[float | None, str]] = {}
    for m in models:
        if images_per_second and m in images_per_second:
            rate_of[m] = (float(images_per_second[m]), "stated")
        elif gpu_tflops:
            rate_of[m] = (gpu_tflops * 1e12 / (TRAIN_FLOPS_PER_FORWARD_MAC * gmacs[m] * 1e9),
                          f"{gpu_tflops:g} TFLOP/s / (6 x GMACs)")
        else:
            rate_of[m] = (None, "unknown: state images_per_second or gpu_tflops")
    runs = []
    top = max(samples_seen, default=0)
    for m in models:
        for s, n in scales.items():
            for seen, seed in [*((b, None) for b in samples_seen), *((top, k) for k in extra_seeds)]:
                rate, how = rate_of[m]
                runs.append({
                    "run_id": slug(f"{m}__{s}__{seen}") + (f"__seed{seed}" if seed is not None else ""), "model": m, "scale": s,
                    "dataset_samples": n,
                    "samples_seen": int(seen), "epochs": seen / n, "steps": optimizer_steps(seen, batch_size),
                    "gmacs_per_sample": gmacs[m], "compute_gmacs": gmacs[m] * seen,
                    "images_per_second": rate, "rate_source": how,
                    "gpu_hours": seen / rate / 3600 if rate else None,
                })  # fmt: skip
    per_scale = []
    for s, n in scales.items():
        mine = [r for r in runs if r["scale"] == s]
        hours = [r["gpu_hours"] for r in mine]
        per_scale.append({
            "scale": s, "samples": n, "shards": (shards or {}).get(s, math.ceil(n / shard_size)), "disk_bytes": n * bytes_per_sample,
            "runs_sharing": [r["run_id"] for r in mine], "n_runs": len(mine),
            "compute_gmacs": sum(r["compute_gmacs"] for r in mine),
            "gpu_hours": sum(hours) if all(h is not None for h in hours) else None,
        })  # fmt: skip
    hours = [r["gpu_hours"] for r in runs]
    total = {
        "runs": len(runs),
        "compute_gmacs": sum(r["compute_gmacs"] for r in runs),
        "samples_seen": sum(r["samples_seen"] for r in runs),
        "gpu_hours": sum(hours) if all(h is not None for h in hours) else None,
        "shards": sum(p["shards"] for p in per_scale),
        "disk_bytes": sum(p["disk_bytes"] for p in per_scale),
        "largest_scale_disk_bytes": max((p["disk_bytes"] for p in per_scale), default=0),
    }
    return {"runs": runs, "scales": per_scale, "total": total,
            "assumptions": {"batch_size": batch_size, "shard_size": shard_size, "bytes_per_sample": bytes_per_sample,
                            "gpu_tflops": gpu_tflops, "images_per_second": dict(images_per_second or {}),
                            "train_flops_per_forward_mac": TRAIN_FLOPS_PER_FORWARD_MAC}}


def measure_images_per_second(name: str, batch_size: int = 32, steps: int = 3, device: str | None = None) -> dict[str, Any]:
    """Training images/s of one device for ``name`` (random init): forward + CLIP loss + backward + AdamW step.

    One warm-up step, then ``steps`` timed steps on random images and captions of the model's sizes
    (fp16 autocast on CUDA, as train's default ``--precision amp`` runs there; fp32 on CPU). Returns ``{images_per_second,
    device, batch_size, steps, seconds}``. A measured rate is for this device and this batch size only.
    """
    import time

    import open_clip
    import torch

    from laiontools.models.registry import load_model

    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    b = load_model(name, device=device)
    model = b.model.train()
    h, w = b.info["image_size"]
    images = torch.randn(batch_size, 3, h, w, device=device)
    texts = torch.randint(1, 1000, (batch_size, int(b.info["context_length"])), device=device)
    loss_fn = open_clip.ClipLoss()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    use_amp = device.startswith("cuda")

    def step() -> None:
        # float16 as open_clip's "amp" (train's default on a GPU): bf16 is emulated, and far slower, on pre-Ampere GPUs
        with torch.autocast(device_type="cuda", dtype=torch.float16, enabled=use_amp):
            out = model(images, texts)
            if isinstance(out, dict):
                out = (out["image_features"], out["text_features"], out["logit_scale"])
            loss = loss_fn(*out[:3])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    step()  # warm-up: allocator, kernels
    if use_amp:
        torch.cuda.synchronize(device)  # the device the steps ran on (cuda:1 is not the current one)
    t0 = time.perf_counter()
    for _ in range(steps):
        step()
    if use_amp:
        torch.cuda.synchronize(device)
    dt = time.perf_counter() - t0
    return {"images_per_second": batch_size * steps / dt, "device": device, "batch_size": batch_size, "steps": steps, "seconds": dt}
