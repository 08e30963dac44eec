"""`laiontools study`: a scaling-law study over (subset scale x samples seen x model), as in Cherti et al. (CVPR 2023).

For every grid point the study trains (``laiontools train``) and evaluates (``laiontools evaluate``)
into ``<output>/runs/<model>__<scale>__<samples>/``; a point is skipped when its evaluation's
completion marker exists, and a half-trained point resumes from its checkpoint, so a killed study
picks up where it stopped. A point whose training diverged (its loss NaN or infinite, where train stops it at the
next check, every train.log_every steps, or its weights at the end of its budget: train's ``diverged.json``) is a result, not a failure of the study: it is recorded with
``status`` ``diverged`` and a ``status_reason``, the other points go on, every fit leaves it out and names it,
and a re-run reports it again without training it again (delete ``runs/<run>/`` to train it again). When
the runs left give no fit (or every run diverged), the study ends with an error naming them, after
``results.csv`` (and the report, when there is one) records them. Then it:

* collects ``results.csv`` (one row per run: scale, model, samples seen, GMACs per sample, total
  compute in GMACs, final loss, ``status`` (``ok`` / ``diverged``) and ``status_reason``, every metric);
* measures each model's GMACs per sample (image + text encoder forward, one sample) with torch's
  FLOP counter (``torch.utils.flop_counter.FlopCounterMode``; MACs = FLOPs / 2);
* for each metric, fits ``E = beta * C^alpha`` (E = 1 - metric, C = compute in GMACs) by
  least squares in log-log space on the Pareto frontier (the runs with lower error than every run
  of less or equal compute), with standard errors from the fit's covariance;
* predicts E at larger compute, draws Figure-1-style log-log plots (PNG) and writes ``fits.json``
  and an HTML report.

The analysis lives in :mod:`laiontools.scaling`; two sub-commands use it without training:

* ``laiontools study fit --results <csv> --output <dir>``: the same frontier, fits, plots and report
  from an existing results table: ours, or another study's with ``--columns ours=theirs,...``,
  ``--where column=value`` filters, ``--metric-kind accuracy|error`` and ``--metric-scale 100``;
* ``laiontools study plan --config study.yaml``: per run and in total, GMACs (the same counter),
  steps, epochs and GPU-hours (at stated ``images_per_second``, a stated ``gpu_tflops``, or
  ``--measure``d on this device), and per scale shards, disk and the runs that share its data.

Config (YAML, ``--config``)::

    output: study/
    scales: {80M: sub80/resharded/manifest.json, 400M: ..., 2B: ...}   # name -> resharded manifest
    samples_seen: [3000000000, 13000000000, 34000000000]   # each makes samples_seen // batch_size optimizer steps;
    models: [ViT-B-32, ViT-B-16]                           # two budgets of one step count are refused up front
    batch_size: 32768
    nproc: 8
    evalset: ["imagenet=/data/imagenet/val:imagefolder", "mscoco=/data/coco_wds:wds"]
    # evalsets_yaml: evalsets.yaml            # instead of evalset: a YAML list of {name, path, format}
    extra_seeds: [1, 2]                       # one more run per model and scale at the largest budget, per seed
    train: {lr: 0.001, warmup: 2000}          # any `laiontools train` setting
    evaluate: {batch_size: 256}               # any `laiontools evaluate` setting
    metrics: [imagenet/zeroshot_top1, mscoco/image_to_text_R@5]   # default: every top-1 / R@5
    predict_at: [1.0e+12]                     # GMACs; default 10x and 100x the largest run
    # read by `study plan` only (and ignored by `study`); scales may then also be counts (2B: 2B)
    images_per_second: {ViT-B-32: 2000}       # training images/s per GPU; or gpu_tflops: 300, or measure: true
    measure_batch_size: 32
    shard_size: 10000                         # samples per resharded shard
    bytes_per_sample: 0                       # 0: read from the manifests
"""

from __future__ import annotations

import dataclasses
import html
import io
import logging
import math
import os
import re
from typing import Any

from laiontools.contracts import layout
from laiontools.core import failpoints
from laiontools.core.config import ConfigError, StageConfig, changed_settings
from laiontools.core.errors import UserError
from laiontools.core.report import emit, table
from laiontools.core.stage import StageResult, stage_entry
from laiontools.core.storage import (
    atomic_write_bytes,
    is_done,
    read_json,
    sha256_file,
    write_json,
    write_record,
)
from laiontools.scaling import (  # noqa: F401  (fit maths also importable from here, as before)
    FIT_COLUMNS,
    METRIC_KINDS,
    RUN_OK,
    check_budget_steps,
    check_metric_values,
    default_metrics,
    fit_all,
    fit_and_report,
    fit_power_law,
    fit_rows,
    json_safe,
    load_results_table,
    measure_images_per_second,
    mixed_run_columns,
    model_gmacs,
    pareto_frontier,
    parse_count,
    plan_grid,
    predict,
    run_failure,
    slug,
)

log = logging.getLogger(__name__)



@dataclasses.dataclass
class StudyConfig(StageConfig):
    output: str = dataclasses.field(default="", metadata={"help": "study folder"})
    scales: dict[str, str] = dataclasses.field(default_factory=dict, metadata={
        "help": "scale name -> resharded manifest, as 80M=/data/80M/subset.manifest.json ... (or in the YAML)", "pairs": True})
    samples_seen: list[int] = dataclasses.field(default_factory=list, metadata={
        "help": "training budgets (samples seen): 3000000000, 3e9 or 3B", "count": True})
    models: list[str] = dataclasses.field(default_factory=list, metadata={"help": "open_clip model names"})
    batch_size: int = dataclasses.field(default=256, metadata={"help": "global batch size of every run"})
    nproc: int = dataclasses.field(default=1, metadata={"help": "processes (devices) per run"})
    evalset: list[str] = dataclasses.field(default_factory=list, metadata={"help": "evaluation sets: name=path[:format]"})
    evalsets_yaml: str | None = dataclasses.field(default=None, metadata={"help": "YAML list of evaluation sets"})
    train: dict[str, Any] = dataclasses.field(default_factory=dict, metadata={"help": "extra train settings (YAML)"})
    evaluate: dict[str, Any] = dataclasses.field(default_factory=dict, metadata={"help": "extra evaluate settings (YAML)"})
    metrics: list[str] = dataclasses.field(default_factory=list, metadata={"help": "metrics to fit; default every zero-shot top-1 and R@5"})
    predict_at: list[float] = dataclasses.field(default_factory=list, metadata={"help": "compute (GMACs) to predict at"})
    extra_seeds: list[int] = dataclasses.field(default_factory=list, metadata={
        "help": "more training seeds for every model and scale at the largest samples-seen budget (the grid's runs use "
                "train.seed): the report compares data scales at that budget against the spread between seeds"})

    def validate(self) -> None:
        if not self.output:
            raise ConfigError("study: `output` (the study folder) is required")
        from laiontools.stages.evaluate import EvaluateConfig
        from laiontools.stages.train import TrainConfig, check_seed

        # YAML may spell settings with dashes, as the flags are written; typed as train's own --config file is
        self.train = TrainConfig.typed({str(k).replace("-", "_"): v for k, v in self.train.items()}, "study: train")
        self.evaluate = EvaluateConfig.typed({str(k).replace("-", "_"): v for k, v in self.evaluate.items()}, "study: evaluate")
        base_seed = self.train.get("seed", 0)
        if not isinstance(base_seed, int):
            raise ConfigError(f"study: train.seed must be a whole number, got {base_seed!r}")
        if base_seed in [int(s) for s in self.extra_seeds] or len(set(self.extra_seeds)) != len(self.extra_seeds):
            raise ConfigError(f"study: extra_seeds {self.extra_seeds} must be distinct and differ from train.seed ({base_seed})")
        for what, seed in (("train.seed", base_seed), *(("extra_seeds", s) for s in self.extra_seeds)):
            check_seed(seed, self.nproc, f"study: {what}")  # before the grid trains, not at the run of that seed
        try:  # YAML reads 1e9 as a string and 1.0e+9 as a float; 3B as train and `study plan` take it
            self.samples_seen = [parse_count(n) for n in self.samples_seen]
            self.predict_at = [float(c) for c in self.predict_at]
        except (TypeError, ValueError, OverflowError) as e:  # OverflowError: 1e400 reads as inf
            raise ConfigError(f"study: samples_seen / predict_at must be numbers ({e})") from e
        if not all(math.isfinite(c) and c > 0 for c in self.predict_at):  # checked before the grid trains, not at its fit
            raise ConfigError(f"study: predict_at must be positive, finite compute (GMACs), got {self.predict_at}")
        if not self.scales:
            raise ConfigError("study: `scales` (name -> resharded subset manifest) must list at least one scale")
        counts = [f"{k}={v}" for k, v in self.scales.items() if _is_count(v)]
        if counts:  # what `study plan` takes, given to the study that trains
            raise ConfigError(f"study: scales {', '.join(counts)} give sample counts; the study trains on resharded "
                              "subsets: give each scale's subset.manifest.json (written by `laiontools reshard`). "
                              "Counts are for `laiontools study plan`")
        if not self.samples_seen or any(int(n) <= 0 for n in self.samples_seen):
            raise ConfigError(f"study: `samples_seen` must list positive budgets, got {self.samples_seen}")
        if not self.models:
            raise ConfigError("study: `models` must list at least one open_clip model")
        for what, values in (("samples_seen", self.samples_seen), ("models", self.models)):
            repeated = sorted({v for v in values if values.count(v) > 1}, key=str)
            if repeated:  # each would train (or reuse) the same run twice and list it twice in results.csv
                raise ConfigError(f"study: `{what}` lists {repeated} more than once; give each value once")
        if not self.evalset and not self.evalsets_yaml:
            raise ConfigError("study: give `evalset` (name=path[:format] list) or `evalsets_yaml`")
        if self.batch_size <= 0:
            raise ConfigError(f"study: batch_size must be positive, got {self.batch_size}")
        # two budgets train rounds to one step count are one run twice: refused here, not by `study fit` after
        # the training (the extra seeds run at the largest budget under their own seeds: no such pair)
        check_budget_steps(self.samples_seen, self.batch_size, "study")
        if self.batch_size % max(1, self.nproc):
            raise ConfigError(f"study: batch size {self.batch_size} is not divisible by nproc {self.nproc}")
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


def _gmacs_cached(study_dir: str, models: list[str]) -> dict[str, dict[str, float]]:
    path = os.path.join(study_dir, layout.STUDY_GMACS_JSON)
    cache = read_json(path) if os.path.exists(path) else {}
    missing = [m for m in models if m not in cache]
    for m in missing:
        cache[m] = model_gmacs(m)
        log.info("%s: %.6f GMACs per sample", m, cache[m]["gmacs_per_sample"])
    if missing:
        write_json(path, cache)
    return cache


# ---------------------------------------------------------------------------------------------
# the study


def run_id(model: str, scale: str, samples_seen: int) -> str:
    return slug(f"{model}__{scale}__{samples_seen}")


def _write_results(path: str, rows: list[dict[str, Any]]) -> None:
    import pandas as pd

    buf = io.StringIO()
    pd.DataFrame(rows).to_csv(buf, index=False)
    atomic_write_bytes(path, buf.getvalue().encode())


# What an evaluation's numbers depend on. Not `checkpoint`: a point's eval.json always scores the run beside it
# (<point>/train), and the recorded path is that folder as the study's --output spelled it (study, ./study,
# /abs/study): an equivalent spelling on a re-run is the same run, not "other settings".
_EVAL_IDENTITY_KEYS = ("model", "evalset", "evalsets_yaml", "tasks")


def run_point(cfg: StudyConfig, model: str, scale: str, samples_seen: int, gmacs: float,
              seed: int | None = None) -> dict[str, Any]:
    """Train (or resume, or skip) and evaluate (or skip) one grid point; return its results row.

    ``seed`` None is the grid's run (``train.seed``); another seed is a replicate, run id ``...__seed<N>``.
    """
    from laiontools.contracts.runs import is_finished, read_divergence, read_result
    from laiontools.stages import evaluate, train
    from laiontools.stages.evaluate import EvaluateConfig, NonFiniteFeatures
    from laiontools.stages.train import TrainConfig, TrainDiverged

    rid = run_id(model, scale, samples_seen) + (f"__seed{seed}" if seed is not None else "")
    train_settings = {**cfg.train, **({"seed": int(seed)} if seed is not None else {})}
    base = os.path.join(cfg.output, layout.STUDY_RUNS_DIR, rid)
    run_dir = os.path.join(base, "train")
    eval_path = os.path.join(base, layout.STUDY_EVAL_JSON)
    finished = is_finished(run_dir)
    log.info("study: %s %s", rid, "already trained; checking its settings" if finished else
             "diverged before; checking its settings" if read_divergence(run_dir) else "training")
    try:  # train.run refuses a run (finished or half-trained) whose identity settings differ, and skips a finished one
        res = train.run(
            TrainConfig(
                manifest=cfg.scales[scale], model=model, samples_seen=int(samples_seen), batch_size=cfg.batch_size,
                nproc=cfg.nproc, output=run_dir, resume=os.path.exists(os.path.join(run_dir, layout.TRAIN_SETTINGS_JSON)),
                **train_settings,
            )
        )  # fmt: skip
    except ConfigError as e:
        raise ConfigError(f"study: run {rid}: {e}") from e
    except TrainDiverged as e:  # a result of the grid, recorded as such: the other points go on
        log.warning("study: %s diverged: %s; recorded in %s and left out of the fits", rid, e.record["reason"],
                    layout.STUDY_RESULTS_CSV)
        settings = read_json(os.path.join(run_dir, layout.TRAIN_SETTINGS_JSON))
        return {
            "run_id": rid, "model": model, "scale": scale, "manifest": cfg.scales[scale],
            "manifest_sha256": settings["manifest_sha256"], "dataset_samples": settings["manifest_num_samples"],
            "samples_seen": int(e.record["samples_seen"]), "steps": int(e.record["steps"]), "gmacs_per_sample": gmacs,
            "compute_gmacs": gmacs * int(e.record["samples_seen"]), "final_loss": float(e.record["final_loss"]),
            "seed": int(train_settings.get("seed", 0)), "skipped_sample_events": None,
            "status": "diverged", "status_reason": f"training {e.record['reason']}",
        }  # fmt: skip
    if not finished:
        emit(res.summary)  # progress of a grid that runs for hours
    ev_cfg = EvaluateConfig(checkpoint=run_dir, evalset=list(cfg.evalset), evalsets_yaml=cfg.evalsets_yaml, output=eval_path, **cfg.evaluate)
    evaluated = is_done(eval_path)
    if evaluated:  # reuse an evaluation only of the same sets and tasks
        old = read_json(eval_path)
        diff = changed_settings(old.get("settings", {}), ev_cfg.to_dict(), _EVAL_IDENTITY_KEYS)
        if diff:
            raise ConfigError(f"study: run {rid}: {eval_path} was evaluated with other settings: {diff}; use the original "
                              "settings, or delete that file (and its .done marker) to evaluate again")
        # ... and of the model file the run holds now: a point whose train/ was deleted and trained again may
        # hold other weights, which the old numbers do not describe
        had = (old.get("model") or {}).get("checkpoint_sha256")
        weights = os.path.join(run_dir, layout.TRAIN_MODEL_FILE)
        if had and os.path.exists(weights) and sha256_file(weights)[0] != had:
            log.warning("study: %s: %s scored another model file than %s holds now (the run was trained again): "
                        "evaluating it again", rid, eval_path, weights)
            evaluated = False
    if not evaluated:
        try:
            res = evaluate.run(ev_cfg)
        except NonFiniteFeatures as e:  # a trained model that gives NaN / inf features: a result too, as a diverged run
            log.warning("study: %s: %s; recorded in %s and left out of the fits", rid, e, layout.STUDY_RESULTS_CSV)
            result = read_result(run_dir)
            return {**_row(rid, model, scale, cfg.scales[scale], result, run_dir, gmacs, train_settings),
                    "status": "diverged", "status_reason": f"evaluation: {e}"}
        emit(res.summary)
    result, ev = read_result(run_dir), read_json(eval_path)
    row = _row(rid, model, scale, cfg.scales[scale], result, run_dir, gmacs, train_settings)
    row.update(ev["metrics"])
    return row


def _row(rid: str, model: str, scale: str, manifest: str, result: dict[str, Any], run_dir: str, gmacs: float,
         train_settings: dict[str, Any]) -> dict[str, Any]:
    """The results row of a trained run (its ``result.json``: `result`), status ``ok``, before its metrics."""
    return {
        "run_id": rid,
        "model": model,
        "scale": scale,
        "manifest": manifest,
        "manifest_sha256": result["manifest_sha256"],
        "dataset_samples": read_json(os.path.join(run_dir, layout.TRAIN_SETTINGS_JSON))["manifest_num_samples"],
        "samples_seen": result["samples_seen"],
        "steps": result["steps"],
        "gmacs_per_sample": gmacs,
        "compute_gmacs": gmacs * result["samples_seen"],
        "final_loss": result["final_loss"],
        "seed": int(train_settings.get("seed", 0)),
        # times the run's loaders skipped a sample that did not decode (None: a run from before the count)
        "skipped_sample_events": result.get("skipped_sample_events"),
        "status": RUN_OK,
        "status_reason": "",
    }


RUN_COLUMNS = ["run_id", "model", "scale", "dataset_samples", "samples_seen", "seed", "gmacs_per_sample", "compute_gmacs",
               "final_loss", "status", "status_reason"]
_FILES_HTML = (f"<p>Files: <code>{layout.STUDY_RESULTS_CSV}</code>, <code>{layout.STUDY_FITS_JSON}</code>, <code>{layout.STUDY_RUNS_DIR}/&lt;run&gt;/train</code> "
               f"(run directories), <code>{layout.STUDY_RUNS_DIR}/&lt;run&gt;/{layout.STUDY_EVAL_JSON}</code>.</p>")


def _grid_html(cfg: StudyConfig) -> str:
    esc = html.escape
    return (
        f"<p>Grid: scales {esc(', '.join(f'{k} ({v})' for k, v in cfg.scales.items()))}; samples seen "
        f"{esc(str(cfg.samples_seen))}; models {esc(', '.join(cfg.models))}; global batch {cfg.batch_size}; "
        f"{cfg.nproc} process(es) per run"
        + (f"; seeds {esc(str(cfg.extra_seeds))} also at the largest budget" if cfg.extra_seeds else "")
        + ".</p>\n<p>Compute C = GMACs per sample (image + text forward, torch "
        "FlopCounterMode / 2) &times; samples seen.</p>"
    )


STAGE = "study"
PLAN_STAGE = "study plan"
CONFIG = StudyConfig


@stage_entry(STAGE, accepts=(PLAN_STAGE,))  # a folder `study plan` wrote plan.json into is the study's to run
def run(cfg: StudyConfig, spark: Any = None) -> StageResult:
    """Run the whole grid (skipping finished points), then collect, fit, plot and report.

    details = ``{"rows", "fits", "results_csv", "report", "plots"}``. Safe to re-run after a kill: finished
    points are skipped, an interrupted training resumes from its checkpoint. ``spark`` is unused.
    """
    import contextlib

    from laiontools import evalsets
    from laiontools.contracts.manifest import manifest_sha256
    from laiontools.core.zygote import forked_runs
    from laiontools.stages import train_worker
    from laiontools.stages.train import check_trainable_manifest

    evalsets.load_evalsets(cfg.evalset or None, cfg.evalsets_yaml)  # bad declarations fail before any training
    by_sha: dict[str, str] = {}
    for scale, manifest in cfg.scales.items():
        check_trainable_manifest(manifest)  # a never-resharded manifest fails now, not hours in
        sha = manifest_sha256(manifest)
        if sha in by_sha:  # every run of one would be a run of the other, under another scale's name
            raise ConfigError(f"study: scales {by_sha[sha]!r} and {scale!r} name the same subset ({manifest}, manifest sha256 "
                              f"{sha[:12]}...): each of their runs would be trained twice as two data scales; give each "
                              "scale its own resharded subset, or drop one")
        by_sha[sha] = scale
    os.makedirs(cfg.output, exist_ok=True)  # (settings recorded once the inputs are known good)
    write_record(os.path.join(cfg.output, layout.STUDY_SETTINGS_JSON), cfg.to_dict())
    gm = _gmacs_cached(cfg.output, list(cfg.models))
    rows: list[dict[str, Any]] = []
    results_csv = os.path.join(cfg.output, layout.STUDY_RESULTS_CSV)
    # One process per device (nproc 1): each point's trainer is forked from one that imported it once
    # (~10 s of CPU per point on 2 cores, the whole training of a small point), a fresh process all the same.
    with forked_runs([f"{train_worker.__name__}:preload"]) if cfg.nproc == 1 else contextlib.nullcontext():
        for model in cfg.models:
            for scale in cfg.scales:
                for n in cfg.samples_seen:
                    rows.append(run_point(cfg, model, scale, int(n), gm[model]["gmacs_per_sample"]))
                    _write_results(results_csv, rows)  # partial results survive a kill
        for model in cfg.models:  # seed replicates at the largest budget: is a scale's lead bigger than seed noise?
            for scale in cfg.scales:
                for seed in cfg.extra_seeds:
                    rows.append(run_point(cfg, model, scale, max(int(n) for n in cfg.samples_seen), gm[model]["gmacs_per_sample"],
                                          seed))
                    _write_results(results_csv, rows)
    # Fault tests: every point is done and results.csv complete; fits, plots and report not yet written.
    failpoints.pause("study.final-write")
    failed = [(r["run_id"], why) for r in rows if (why := run_failure(r)) is not None]
    failed_text = "; ".join(f"{rid} ({why})" for rid, why in failed[:5]) + ("; ..." if len(failed) > 5 else "")
    every_run_failed = len(failed) == len(rows)
    metric_cols = sorted({k for r in rows for k in r if "/" in k})
    # every run diverged: no metric to fit, but the report still lists the runs and why (then the error below)
    metrics = [] if every_run_failed else list(cfg.metrics) or default_metrics(metric_cols)
    unknown = [m for m in metrics if m not in metric_cols]
    if unknown:
        raise ConfigError(f"study: metric(s) {unknown} not produced by the evaluation; available: {metric_cols}")
    out = fit_and_report(
        rows, metrics, cfg.output, kind="accuracy", predict_at=[float(c) for c in cfg.predict_at],
        title="Scaling study", intro_html=_grid_html(cfg), columns=RUN_COLUMNS, footer_html=_FILES_HTML,
        extra_json={"gmacs": gm},
    )  # fmt: skip
    fits, plots, report = out["fits"], out["plots"], out["report"]
    if failed and not any(e.get("fit") for e in fits.values()):
        # the grid is too small without them: a report with no law in it is no study result
        what = ("every run of the grid diverged" if every_run_failed else f"{len(failed)} run(s) diverged and were left out")
        left = ("nothing to fit" if every_run_failed else
                f"the {len(rows) - len(failed)} left give no fit ({next(iter(fits.values()), {}).get('why_no_fit', 'no metric')})")
        raise UserError(f"study: {what} ({failed_text}); {left}. {results_csv} and {report} record them: lower train.lr "
                        "or lengthen train.warmup, into a new output folder")
    skipping = [r["run_id"] for r in rows if r.get("skipped_sample_events")]
    skip_line = ""
    if skipping:  # a scale whose samples do not all decode trains on fewer distinct samples than it names
        skip_line = (f"WARNING: {len(skipping)} run(s) skipped samples that did not load "
                     f"({', '.join(skipping[:5])}{', ...' if len(skipping) > 5 else ''}; results.csv: "
                     "skipped_sample_events): `laiontools verify` their subsets' manifests\n")
        log.warning(skip_line.strip())
    failed_line = ""
    if failed:  # recorded, left out of every fit, and said
        failed_line = (f"WARNING: {len(failed)} run(s) diverged and are left out of the fits: {failed_text} "
                       f"({layout.STUDY_RESULTS_CSV}: status, status_reason)\n")
        log.warning(failed_line.strip())
    summary = failed_line + skip_line + (
        f"scaling study: {len(rows)} runs ({len(cfg.models)} model(s) x {len(cfg.scales)} scale(s) x {len(cfg.samples_seen)} budget(s))\n"
        f"{table(fit_rows(fits), FIT_COLUMNS)}\n"
        f"results: {results_csv}\nreport:  {report}"
    )
    return StageResult(
        outputs={"results": results_csv, "report": report, "fits": os.path.join(cfg.output, layout.STUDY_FITS_JSON)},
        counts={"runs": len(rows), "diverged": len(failed)},
        details={"rows": rows, "fits": fits, "results_csv": results_csv, "report": report, "plots": plots},
        summary=summary,
    )




# ---------------------------------------------------------------------------------------------
# `laiontools study fit`: the analysis alone, on any results table


@dataclasses.dataclass
class FitConfig(StageConfig):
    results: str = dataclasses.field(default="", metadata={"help": "results table (CSV, or .tsv): a study's results.csv or another's"})
    output: str = dataclasses.field(default="", metadata={"help": "folder for fits.json, plots/ and report.html"})
    columns: list[str] = dataclasses.field(default_factory=list, metadata={
        "help": "ours=theirs column mapping, e.g. compute_gmacs=gmacs_total,model=model_name (comma-separated or repeated)"})
    where: list[str] = dataclasses.field(default_factory=list, metadata={
        "help": "row filters column=value or column!=value, all must hold (e.g. downstream_dataset=imagenet1k)"})
    metrics: list[str] = dataclasses.field(default_factory=list, metadata={
        "help": "metric columns to fit (default: every */zeroshot_top1 and *_R@5 column)"})
    metric_kind: str = dataclasses.field(default="accuracy", metadata={"help": "accuracy (error = 1 - value) or error"})
    metric_scale: float = dataclasses.field(default=1.0, metadata={"help": "divide metric values by this (100 for percentages)"})
    predict_at: list[float] = dataclasses.field(default_factory=list, metadata={"help": "compute (GMACs) to predict at"})

    def validate(self) -> None:
        if not self.results or not self.output:
            raise ConfigError("study fit: --results (a results table) and --output (a folder) are required")
        if self.metric_kind not in METRIC_KINDS:
            raise ConfigError(f"study fit: --metric-kind must be one of {list(METRIC_KINDS)}, got {self.metric_kind!r}")
        if not self.metric_scale > 0:
            raise ConfigError(f"study fit: --metric-scale must be positive, got {self.metric_scale}")
        self.predict_at = [float(c) for c in self.predict_at]
        if not all(math.isfinite(c) and c > 0 for c in self.predict_at):  # nan/inf predicted nonsense (inf: accuracy 1.0)
            raise ConfigError(f"study fit: --predict-at must be positive, finite compute (GMACs), got {self.predict_at}")


def run_fit(cfg: FitConfig) -> StageResult:
    """Frontier, power-law fits with standard errors, predictions, plots and report from an existing results table.

    Writes into cfg.output: ``fits.json``, ``plots/*.png``, ``report.html``, ``fit_input.csv`` (the rows
    fitted, after mapping, filters and scaling) and ``settings.json``. Raises UserError (naming the
    table) for a missing column, an empty filter result or metric values outside [0, 1].
    """
    rows = load_results_table(cfg.results, cfg.columns, cfg.where)
    cols = list(dict.fromkeys(k for r in rows for k in r))
    metrics = list(dict.fromkeys(cfg.metrics)) or default_metrics(cols)
    if not metrics:
        raise UserError(f"results table {cfg.results}: no */zeroshot_top1 or *_R@5 column to fit; name them with --metrics "
                        f"(columns: {cols})")
    if cfg.metric_scale != 1:
        for r in rows:
            for m in metrics:
                v = r.get(m)
                if isinstance(v, (int, float)):
                    r[m] = v / cfg.metric_scale
    check_metric_values(rows, metrics, cfg.metric_kind, f"results table {cfg.results}")
    mixed = mixed_run_columns(rows, metrics)
    warning = ""
    if mixed:
        col, vals = next(iter(mixed.items()))
        warning = (f"warning: rows of the same run differ in {', '.join(repr(c) for c in mixed)} ({col}: "
                   f"{', '.join(vals[:5])}{', ...' if len(vals) > 5 else ''}): they are fitted as one frontier; fit "
                   f"each apart with --where {col}=<value>")
        log.warning("study fit: %s", warning)
    os.makedirs(cfg.output, exist_ok=True)
    write_record(os.path.join(cfg.output, layout.STUDY_SETTINGS_JSON), cfg.to_dict())
    _write_results(os.path.join(cfg.output, layout.STUDY_FIT_INPUT_CSV), rows)
    esc = html.escape
    intro = (f"<p>Results table <code>{esc(os.path.abspath(cfg.results))}</code>: {len(rows)} row(s)"
             + (f" passing {esc(' and '.join(cfg.where))}" if cfg.where else "")
             + (f"; columns mapped {esc(', '.join(cfg.columns))}" if cfg.columns else "")
             + f"; metrics read as {esc(cfg.metric_kind)}" + (f" / {cfg.metric_scale:g}" if cfg.metric_scale != 1 else "")
             + ". Compute C = <code>compute_gmacs</code> (GMACs per run).</p>"
             + (f"<p><b>{esc(warning)}</b></p>" if warning else ""))
    out = fit_and_report(rows, metrics, cfg.output, kind=cfg.metric_kind, predict_at=cfg.predict_at,
                         title="Scaling fit", intro_html=intro, columns=["run_id", "model", "scale", "samples_seen", "compute_gmacs"],
                         extra_json={"results": os.path.abspath(cfg.results), "n_rows": len(rows), "warnings": [warning] if warning else []})
    summary = (f"study fit: {len(rows)} row(s) of {cfg.results}, {len(metrics)} metric(s)\n" + (f"{warning}\n" if warning else "") +
               f"{table(fit_rows(out['fits']), FIT_COLUMNS)}\nfits:   {out['fits_json']}\nreport: {out['report']}")
    return StageResult(stage="study fit", outputs={"fits": out["fits_json"], "report": out["report"]},
                       counts={"rows": len(rows), "metrics": len(metrics),
                               "fitted": sum(1 for e in out["fits"].values() if e.get("fit"))},
                       details=out, summary=summary)


# ---------------------------------------------------------------------------------------------
# `laiontools study plan`: what a grid costs, before spending a cluster on it


@dataclasses.dataclass
class PlanConfig(StageConfig):
    """A study.yaml (its evaluation and training settings are ignored here) plus the plan's own assumptions."""

    output: str = dataclasses.field(default="", metadata={"help": "study folder; the plan is written to <output>/plan.json when given"})
    scales: dict[str, Any] = dataclasses.field(default_factory=dict, metadata={
        "help": "scale name -> resharded manifest (its num_samples is read) or a sample count, as 80M=/data/80M/subset.manifest.json "
                "2B=2B ... (or in the YAML)", "pairs": True})
    samples_seen: list[str] = dataclasses.field(default_factory=list, metadata={"help": "training budgets (3e9, 13B, ...)"})
    models: list[str] = dataclasses.field(default_factory=list, metadata={"help": "open_clip model names"})
    batch_size: int = dataclasses.field(default=256, metadata={"help": "global batch size of every run (for steps)"})
    nproc: int = dataclasses.field(default=1, metadata={"help": "GPUs per run (wall-clock hours = GPU-hours / nproc)"})
    images_per_second: dict[str, float] = dataclasses.field(default_factory=dict, metadata={
        "help": "model -> training images/s per GPU, as ViT-B-32=2400 ... (or in the YAML); stated rates win over gpu_tflops and --measure",
        "pairs": True})
    gpu_tflops: float | None = dataclasses.field(default=None, metadata={
        "help": "sustained TFLOP/s per GPU, to derive images/s as TFLOP/s / (6 x GMACs per sample)"})
    measure: bool = dataclasses.field(default=False, metadata={
        "help": "measure training images/s of each model without a stated rate on this machine's device"})
    measure_batch_size: int = dataclasses.field(default=32, metadata={"help": "batch size of --measure"})
    shard_size: int = dataclasses.field(default=10_000, metadata={"help": "samples per resharded shard"})
    bytes_per_sample: float = dataclasses.field(default=0.0, metadata={
        "help": "mean stored bytes per sample (image + caption + json) for disk sizes; 0 = read from manifests"})
    extra_seeds: list[int] = dataclasses.field(default_factory=list, metadata={
        "help": "the study's extra seeds: one more run of every model and scale at the largest budget per seed, counted"})

    def validate(self) -> None:
        if not self.scales or not self.samples_seen or not self.models:
            raise ConfigError("study plan: `scales`, `samples_seen` and `models` must each list at least one entry")
        try:
            self.samples_seen = [parse_count(n) for n in self.samples_seen]  # type: ignore[misc]
        except ValueError as e:
            raise ConfigError(f"study plan: samples_seen: {e}") from e
        if self.batch_size <= 0 or self.nproc <= 0 or self.shard_size <= 0 or self.bytes_per_sample < 0:
            raise ConfigError("study plan: batch_size, nproc and shard_size must be positive, bytes_per_sample >= 0")
        check_budget_steps(self.samples_seen, self.batch_size, "study plan")  # as `study` refuses the grid
        bad = {m: v for m, v in self.images_per_second.items() if not float(v) > 0}
        if bad or (self.gpu_tflops is not None and not self.gpu_tflops > 0):
            raise ConfigError(f"study plan: images_per_second and gpu_tflops must be positive ({bad or self.gpu_tflops})")


# One study.yaml serves `study` and `study plan` (README): each ignores the other's settings in it.
_STUDY_FIELDS = {f.name for f in dataclasses.fields(StudyConfig)}
_PLAN_FIELDS = {f.name for f in dataclasses.fields(PlanConfig)}
StudyConfig.SHARED_FILE_KEYS = frozenset(_PLAN_FIELDS - _STUDY_FIELDS)
PlanConfig.SHARED_FILE_KEYS = frozenset(_STUDY_FIELDS - _PLAN_FIELDS)


def _is_count(v: Any) -> bool:
    """A scale given as a number (80000000, 8e7, 80M) rather than a manifest path."""
    if isinstance(v, int | float):
        return True
    return isinstance(v, str) and bool(re.fullmatch(r"\s*[0-9][0-9_.,]*(e[0-9]+)?\s*[kKmMbB]?\s*", v))


def _scale_sizes(scales: dict[str, Any]) -> tuple[dict[str, int], dict[str, float], dict[str, int]]:
    """(samples, stored bytes per sample or 0, shards) per scale: from a manifest file (shards: those it
    lists, when resharded), else the value or the name as a count (no shards: the plan derives them)."""
    from laiontools.contracts.manifest import read_manifest

    sizes, bps, shards = {}, {}, {}
    for name, v in scales.items():
        if isinstance(v, str) and (v.endswith(".json") or "/" in v):
            # a manifest path (local or a store's URL): a mistyped one is read_manifest's error naming it, not
            # the scale's name taken as its count
            m = read_manifest(v)
            sizes[name] = int(m["num_samples"])
            nbytes = sum(int(s.get("bytes") or s.get("size") or 0) for s in m.get("shards", []))
            bps[name] = nbytes / sizes[name] if nbytes and sizes[name] else 0.0
            if m.get("shards"):
                shards[name] = len(m["shards"])
            continue
        try:
            sizes[name] = parse_count(v if v not in (None, "") else name)
        except ValueError:
            try:
                sizes[name] = parse_count(name)
            except ValueError as e:
                raise ConfigError(f"study plan: scale {name!r}: {v!r} is neither an existing manifest nor a sample count, "
                                  f"and the name is no count either ({e})") from e
        bps[name] = 0.0
    return sizes, bps, shards


def _human_bytes(n: float) -> str:
    for unit in ("B", "kB", "MB", "GB", "TB", "PB"):
        if abs(n) < 1000 or unit == "PB":
            return f"{n:.3g} {unit}"
        n /= 1000
    return f"{n:.3g} PB"


@stage_entry(PLAN_STAGE, accepts=(STAGE,))
def run_plan(cfg: PlanConfig, spark: Any = None) -> StageResult:
    """Compute (the study's FLOP counter), steps, epochs, GPU-hours, shards, disk and shared data of a planned grid.

    Nothing is trained. GMACs per sample come from :func:`laiontools.scaling.model_gmacs` (meta device,
    no weights), the same counter ``study`` uses. details = the plan dict (also ``<output>/plan.json``).
    """
    sizes, manifest_bps, manifest_shards = _scale_sizes(cfg.scales)
    gm = {m: model_gmacs(m)["gmacs_per_sample"] for m in cfg.models}
    rates = {m: float(v) for m, v in cfg.images_per_second.items()}
    measured = {}
    if cfg.measure:
        for m in cfg.models:
            if m not in rates:
                measured[m] = measure_images_per_second(m, batch_size=cfg.measure_batch_size)
                rates[m] = measured[m]["images_per_second"]
    bps = cfg.bytes_per_sample or max(manifest_bps.values(), default=0.0)
    plan = plan_grid(cfg.models, sizes, list(cfg.samples_seen), gm, batch_size=cfg.batch_size, images_per_second=rates,
                     gpu_tflops=cfg.gpu_tflops, shard_size=cfg.shard_size, bytes_per_sample=bps,
                     extra_seeds=[int(k) for k in cfg.extra_seeds], shards=manifest_shards)
    for r in plan["runs"]:
        if r["model"] in measured:
            r["rate_source"] = f"measured on {measured[r['model']]['device']} (batch {cfg.measure_batch_size})"
        r["wall_hours"] = r["gpu_hours"] / cfg.nproc if r["gpu_hours"] is not None else None
    plan["assumptions"].update({"nproc": cfg.nproc, "bytes_per_sample_source": "stated" if cfg.bytes_per_sample else
                                ("manifests" if bps else "unknown: state bytes_per_sample")})
    plan["measured"] = measured
    g = lambda v, spec=".4g": "n/a" if v is None else format(v, spec)
    run_rows = [{"run": r["run_id"], "GMACs/sample": g(r["gmacs_per_sample"]), "samples seen": g(r["samples_seen"], ".3g"),
                 "epochs": g(r["epochs"], ".3g"), "steps": r["steps"], "compute (GMACs)": g(r["compute_gmacs"]),
                 "img/s/GPU": g(r["images_per_second"]), "GPU-hours": g(r["gpu_hours"])} for r in plan["runs"]]
    scale_rows = [{"scale": s["scale"], "samples": s["samples"], "shards": s["shards"],
                   "disk": _human_bytes(s["disk_bytes"]) if bps else "n/a", "runs sharing its shards": f"{s['n_runs']} ({', '.join(cfg.models)} x {len(cfg.samples_seen)} budgets)",
                   "compute (GMACs)": g(s["compute_gmacs"]), "GPU-hours": g(s["gpu_hours"])} for s in plan["scales"]]
    t = plan["total"]
    sources = sorted({r["rate_source"] for r in plan["runs"]})
    summary = "\n".join([
        f"study plan: {t['runs']} runs ({len(cfg.models)} model(s) x {len(sizes)} scale(s) x {len(cfg.samples_seen)} budget(s)"
        + (f", + {len(cfg.extra_seeds)} extra seed(s) of each model and scale at the largest budget" if cfg.extra_seeds else "") + ")",
        table(run_rows), "", table(scale_rows), "",
        (f"total: {g(t['compute_gmacs'])} GMACs, {g(t['samples_seen'], '.4g')} samples seen, {g(t['gpu_hours'])} GPU-hours "
         f"({g(t['gpu_hours'] / cfg.nproc if t['gpu_hours'] is not None else None)} h wall-clock at {cfg.nproc} GPU(s) per run, "
         f"runs in sequence), {t['shards']} shards, {_human_bytes(t['disk_bytes']) if bps else 'n/a'} of resharded data "
         f"(largest scale alone {_human_bytes(t['largest_scale_disk_bytes']) if bps else 'n/a'}; the subsets are nested)"),
        f"images/s per GPU: {'; '.join(sources)}",
        (f"bytes per sample: {g(bps) if bps else 'unknown (state bytes_per_sample)'}; shard size {cfg.shard_size}; "
         f"GMACs per sample from torch FlopCounterMode / 2 (image + text forward)"),
    ])
    outputs = {}
    if cfg.output:
        path = os.path.join(cfg.output, layout.STUDY_PLAN_JSON)
        write_json(path, json_safe(plan))
        outputs["plan"] = path
        summary += f"\nplan: {path}"
    return StageResult(stage="study plan", outputs=outputs, counts={"runs": t["runs"]}, details=plan, summary=summary)


def _sub_main(cls: type[StageConfig], fn: Any, prog: str, description: str, argv: list[str]) -> int:
    from laiontools.core.config import config_from_args
    from laiontools.core.stage import config_parser

    args = config_parser(cls, prog=prog, description=description).parse_args(argv)
    result = fn(config_from_args(cls, args))
    emit(result.summary)
    return 0 if result.ok else 1


def fit_main(argv: list[str]) -> int:
    return _sub_main(FitConfig, run_fit, "laiontools study fit",
                     "Pareto frontier, power-law fit with standard errors, predictions, plots and HTML report from a results table.",
                     argv)


def plan_main(argv: list[str]) -> int:
    return _sub_main(PlanConfig, run_plan, "laiontools study plan",
                     "Per run and in total: GMACs, steps, epochs, GPU-hours, shards and disk of a study grid, before running it.",
                     argv)


SUBCOMMANDS = {"fit": fit_main, "plan": plan_main}


def build_parser() -> Any:
    from laiontools.core.stage import config_parser

    p = config_parser(StudyConfig, prog="laiontools study",
                      description="Scaling-law study: train + evaluate a grid of scale x samples seen x model, fit E = beta C^alpha.")
    p.epilog = ("sub-commands: `laiontools study fit --results <csv> --output <dir>` (the fit alone, on any results table); "
                "`laiontools study plan --config study.yaml` (compute, GPU-hours and disk of the grid, nothing run)")
    return p


def main(argv: list[str] | None = None) -> int:
    """``study fit ...`` / ``study plan ...`` run a sub-command; anything else runs the grid (:func:`run`)."""
    import sys

    from laiontools.core.stage import stage_main

    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] in SUBCOMMANDS:
        return SUBCOMMANDS[argv[0]](argv[1:])
    return stage_main(__name__, argv)
