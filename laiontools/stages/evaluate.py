"""`laiontools evaluate`: zero-shot classification and image<->text retrieval of a model on evaluation sets.

Evaluation sets are declared exactly as for dedup (``name=path[:format]`` or a YAML list, read by
:mod:`laiontools.evalsets`), so the sets a model is scored on are the sets its training data was
decontaminated against. The model comes from :func:`laiontools.models.registry.load_model`: a finished
``laiontools train`` run directory (its ``model.pt`` and model name), a checkpoint file (weights
only), or an open_clip pretrained tag.

* Zero-shot classification: a classifier from the class names and prompt templates with open_clip's
  ``build_zero_shot_classifier``; top-1 / top-5 accuracy and mean per-class recall
  (:func:`classification_metrics`). Needs class names.
* Retrieval: image->text and text->image recall@1/5/10 over the items that have a caption (an item's
  caption text holds one caption per line, several for COCO/Flickr-style sets; items sharing a caption
  string count as matches of each other), see
  :func:`retrieval_metrics`.

Ties are counted against the query in both tasks, so a model that scores everything alike gets no
hit at any k below the number of candidates, rather than whatever the sort order gives.

An image with transparency is composited on white (:func:`laiontools.core.images.to_rgb`), as download
stored the pool images a model trained on; clip_benchmark's plain ``convert("RGB")`` keeps whatever
colour the transparent pixels hold (often black). The standard sets hold JPEGs, where the two agree.

Output: one JSON file (``--output``) with the settings, the model identity, per-set results and a
flat ``metrics`` map (``<set>/zeroshot_top1``, ``<set>/image_to_text_R@5``, ...); ``<output>.done``
is its completion marker.
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import os
import time
from typing import Any

from laiontools.contracts import layout
from laiontools.core.config import ConfigError, StageConfig, add_config_args
from laiontools.core.errors import UserError
from laiontools.core.logs import RateLimitedLogger
from laiontools.core.report import table
from laiontools.core.stage import StageResult, stage_entry
from laiontools.core.storage import mark_done, read_json, write_record
from laiontools.models.registry import ModelError

log = logging.getLogger(__name__)
_failures = RateLimitedLogger(log)

TASKS = ("zeroshot", "retrieval")


@dataclasses.dataclass
class EvaluateConfig(StageConfig):
    checkpoint: str | None = dataclasses.field(
        default=None,
        metadata={"help": "a finished `laiontools train` run dir, a checkpoint file, or an open_clip pretrained tag"},
    )
    model: str | None = dataclasses.field(default=None, metadata={"help": "open_clip model name (read from the run dir if omitted)"})
    evalset: list[str] = dataclasses.field(default_factory=list, metadata={"help": "evaluation set(s): name=path[:format]"})
    evalsets_yaml: str | None = dataclasses.field(default=None, metadata={"help": "YAML list of {name, path, format}"})
    output: str = dataclasses.field(default="", metadata={"help": "results JSON file"})
    tasks: list[str] = dataclasses.field(default_factory=lambda: list(TASKS), metadata={"help": "zeroshot and/or retrieval"})
    batch_size: int = dataclasses.field(default=64, metadata={"help": "images per forward pass"})
    device: str | None = dataclasses.field(default=None, metadata={"help": "cuda or cpu; default cuda when available"})

    def validate(self) -> None:
        if not self.output:
            raise ConfigError("evaluate: --output (a results .json file) is required")
        if not self.evalset and not self.evalsets_yaml:
            raise ConfigError("evaluate: give at least one --evalset name=path[:format] or --evalsets-yaml")
        bad = [t for t in self.tasks if t not in TASKS]
        if bad or not self.tasks:
            raise ConfigError(f"evaluate: unknown task(s) {bad or self.tasks}; choose from {list(TASKS)}")
        if self.batch_size <= 0:
            raise ConfigError(f"evaluate: --batch-size must be positive, got {self.batch_size}")


def resolve_checkpoint(checkpoint: str | None, model: str | None) -> tuple[str | None, str, str | None]:
    """(weights to load, model name, run dir or None) for a run dir, a checkpoint file or a tag.

    Raises ModelError when a run dir was trained with another model than ``model``, ConfigError when
    the model name cannot be known, and RunNotFinishedError when a run dir is not finished.
    """
    from laiontools.contracts.runs import read_result

    if checkpoint and os.path.isdir(checkpoint):
        if not os.path.exists(os.path.join(checkpoint, layout.TRAIN_SETTINGS_JSON)):
            raise ConfigError(f"evaluate: {checkpoint} is a folder but not a `laiontools train` run (no {layout.TRAIN_SETTINGS_JSON})")
        result = read_result(checkpoint)
        trained = result["model"]
        if model and model != trained:
            raise ModelError(
                f"checkpoint {checkpoint} was trained with model {trained!r}, not {model!r}; "
                f"pass --model {trained} (or omit --model)"
            )
        return os.path.join(checkpoint, layout.TRAIN_MODEL_FILE), trained, checkpoint
    if not model:
        raise ConfigError("evaluate: --model is required unless --checkpoint is a `laiontools train` run directory")
    if checkpoint and os.path.isfile(checkpoint):
        _check_run_of_checkpoint(checkpoint, model)
    return checkpoint, model, None


def _check_run_of_checkpoint(path: str, model: str) -> None:
    """A checkpoint file inside a laiontools run names its model in settings.json: compare before loading."""

    for d in (os.path.dirname(path), os.path.dirname(os.path.dirname(path))):
        s = os.path.join(d, layout.TRAIN_SETTINGS_JSON)
        if d and os.path.exists(s):
            trained = read_json(s).get("model")
            if trained and trained != model:
                raise ModelError(f"checkpoint {path} belongs to a run of model {trained!r}, not {model!r}; pass --model {trained}")
            return


def _device(device: str | None) -> str:
    import torch

    if device:
        if device.startswith("cuda"):
            # else load_model fails inside open_clip, and a checkpoint file is blamed for it ("does not fit model")
            n = torch.cuda.device_count() if torch.cuda.is_available() else 0
            ordinal = device.partition(":")[2]
            if n == 0 or (ordinal and not (ordinal.isdigit() and int(ordinal) < n)):
                raise ConfigError(f"evaluate: --device {device}: torch sees {n} CUDA device(s); "
                                  f"use --device cpu{'' if n == 0 else ' or cuda:0..' + str(n - 1)}")
        return device
    return "cuda" if torch.cuda.is_available() else "cpu"


def _encode_images(bundle: Any, images: list[Any], device: str, batch_size: int) -> Any:
    import torch

    feats = []
    with torch.no_grad():
        for i in range(0, len(images), batch_size):
            x = torch.stack([bundle.preprocess(im) for im in images[i : i + batch_size]]).to(device)
            feats.append(bundle.model.encode_image(x, normalize=True).float().cpu())
    return _finite(torch.cat(feats) if feats else torch.empty(0), "image")


def _encode_texts(bundle: Any, texts: list[str], device: str, batch_size: int) -> Any:
    import torch

    feats = []
    with torch.no_grad():
        for i in range(0, len(texts), batch_size):
            t = bundle.tokenizer(texts[i : i + batch_size]).to(device)
            feats.append(bundle.model.encode_text(t, normalize=True).float().cpu())
    return _finite(torch.cat(feats) if feats else torch.empty(0), "text")


class NonFiniteFeatures(ModelError):
    """The model's features hold NaN or infinity: damaged weights, or a training that diverged."""


def _finite(feats: Any, what: str) -> Any:
    """`feats`, or NonFiniteFeatures when any value is NaN or infinite (no metric of such features means
    anything, and NaN scores would count as hits)."""
    import torch

    bad = ~torch.isfinite(feats)
    if bool(bad.any()):
        rows = int(bad.reshape(len(feats), -1).any(dim=1).sum()) if feats.ndim > 1 else int(bad.sum())
        raise NonFiniteFeatures(f"the model's {what} features are not finite for {rows} of {len(feats)} items: "
                                "its weights are damaged, or its training diverged")
    return feats


def _hit_ranks(scores: Any, correct: Any) -> Any:
    """0-based rank of each query's best correct candidate, ties counted against it.

    ``scores`` and ``correct`` are (queries x candidates); every query has at least one correct
    candidate. The rank is the number of *wrong* candidates scoring at least as high as the best
    correct one, so a tie with a wrong candidate costs a place (a model that scores everything alike
    gets no hits, not lucky ones from the sort order), and another correct candidate never does.
    """
    import numpy as np

    scores = np.asarray(scores, dtype=np.float64)
    # A NaN score compares false with everything, so a correct NaN candidate beat every wrong one: a
    # model whose features are NaN scored 100 %. As -inf it ties with everything and never hits.
    scores = np.where(np.isnan(scores), -np.inf, scores)
    best = np.where(correct, scores, -np.inf).max(axis=1)
    return ((scores >= best[:, None]) & ~correct).sum(axis=1)


def classification_metrics(logits: Any, labels: list[int] | Any, k: int = 5) -> dict[str, Any]:
    """Top-1 / top-k accuracy and mean per-class recall from (items x classes) logits.

    An item is a top-k hit when fewer than k other classes score at least as high as its label (ties
    count as misses). Mean per-class recall averages top-1 recall over the classes that have items.
    ``k`` is capped at the number of classes (reported as ``top5_k``).
    """
    import numpy as np

    logits = np.asarray(logits, dtype=np.float64)
    labels = np.asarray(labels, dtype=np.int64)
    n, n_classes = logits.shape
    if n == 0 or len(labels) != n:
        raise ValueError(f"classification_metrics: {n} rows of logits for {len(labels)} labels")
    correct = np.zeros_like(logits, dtype=bool)
    correct[np.arange(n), labels] = True
    rank = _hit_ranks(logits, correct)
    k = min(k, n_classes)
    hit1 = rank < 1
    recalls = [float(hit1[labels == c].mean()) for c in range(n_classes) if (labels == c).any()]
    return {
        "top1": float(hit1.mean()),
        "top5": float((rank < k).mean()),
        "top5_k": k,
        "mean_per_class_recall": float(np.mean(recalls)),
    }


def retrieval_metrics(image_features: Any, text_features: Any, captions: list[str] | None = None,
                      ks: tuple[int, ...] = (1, 5, 10), text_image: list[int] | None = None) -> dict[str, float]:
    """Image->text and text->image recall@k, mean and median rank (1-based) from paired features.

    Text row t is a caption of image ``text_image[t]`` (default: row i of image i, one caption per
    image); an image may have several (COCO, Flickr30k), and an image->text query is found when any
    of them ranks high enough, as in clip_benchmark. ``captions`` holds each text row's string. A
    caption string that several images share names all of them, so a query counts as found when any
    candidate with the same caption ranks high enough: identical captions have identical text
    features, and which of them the sort put first must not decide a hit (open_clip_train's
    ``get_clip_metrics`` recognises only the pair's own index and breaks such ties by sort order).
    Ties with wrong candidates count against the query. Features need not be normalised: ranking by
    dot product is what CLIP scores with.
    """
    import numpy as np

    img = np.asarray(image_features, dtype=np.float64)
    txt = np.asarray(text_features, dtype=np.float64)
    n = len(img)
    if text_image is None:
        if img.shape != txt.shape or img.ndim != 2 or n == 0:
            raise ValueError(f"retrieval_metrics: image features {img.shape} and text features {txt.shape} must be the same (n, d)")
        owner = np.arange(n)
    else:
        owner = np.asarray(text_image, dtype=np.int64)
        if img.ndim != 2 or txt.ndim != 2 or img.shape[1] != txt.shape[1] or n == 0 or len(owner) != len(txt):
            raise ValueError(f"retrieval_metrics: image features {img.shape}, text features {txt.shape} and "
                             f"{len(owner)} text owners do not fit")
        if len(owner) and (owner.min() < 0 or owner.max() >= n) or len(set(owner.tolist())) != n:
            raise ValueError("retrieval_metrics: every image needs at least one text and every text an image")
    if captions is None:
        same = owner[None, :] == np.arange(n)[:, None]
    else:
        if len(captions) != len(txt):
            raise ValueError(f"retrieval_metrics: {len(captions)} captions for {len(txt)} texts")
        codes = {c: j for j, c in enumerate(dict.fromkeys(captions))}
        ids = np.array([codes[c] for c in captions])
        has = np.zeros((n, len(codes)), dtype=bool)  # image i has a caption with code c
        has[owner, ids] = True
        same = has[:, ids]  # (images, texts): text t's string is one of image i's captions
    sims = img @ txt.T
    out: dict[str, float] = {}
    for name, scores, correct in (("image_to_text", sims, same), ("text_to_image", sims.T, same.T)):
        rank = _hit_ranks(scores, correct)
        out[f"{name}_mean_rank"] = float(rank.mean() + 1)
        out[f"{name}_median_rank"] = float(np.floor(np.median(rank)) + 1)
        for k in ks:
            out[f"{name}_R@{k}"] = float((rank < k).mean())
    return out


def zero_shot(bundle: Any, image_features: Any, labels: list[int], names: list[str], templates: list[str], device: str) -> dict[str, Any]:
    """Top-1/top-5 accuracy and mean per-class recall with open_clip's zero-shot classifier."""
    import open_clip
    import torch

    # evalsets templates use "{c}"; open_clip formats strings positionally, so pass callables.
    fns = [lambda c, t=t: t.format(c=c) for t in templates]
    with torch.no_grad():
        classifier = open_clip.build_zero_shot_classifier(
            bundle.model, tokenizer=bundle.tokenizer, classnames=names, templates=fns, num_classes_per_batch=10, device=device
        ).float().cpu()
    out = classification_metrics((image_features @ _finite(classifier.T, "class text").T).numpy(), labels, k=5)
    out.update({"n_classes": len(names), "n_templates": len(templates), "n_items": len(labels), "chance_top1": 1.0 / len(names)})
    return out


def retrieval(bundle: Any, image_features: Any, captions: list[str], device: str, batch_size: int) -> dict[str, Any]:
    """Image->text and text->image recall@1/5/10 of the model's features (see :func:`retrieval_metrics`).

    ``captions[i]`` is image i's caption text: one caption per line (:func:`laiontools.evalsets.caption_lines`).
    """
    from laiontools.evalsets import caption_lines

    texts, owner = [], []
    for i, c in enumerate(captions):
        for line in caption_lines(c):
            texts.append(line)
            owner.append(i)
    text_features = _encode_texts(bundle, texts, device, batch_size)
    out: dict[str, Any] = retrieval_metrics(image_features.numpy(), text_features.numpy(), texts, text_image=owner)
    out["n_items"] = len(captions)
    out["n_texts"] = len(texts)
    out["n_distinct_captions"] = len(set(texts))
    return out


def require_classnames(es: Any) -> list[str]:
    """Class names of `es`; raises UserError (naming the set and the fix) when it has none."""
    from laiontools import evalsets

    names = evalsets.classnames(es)
    if not names:
        raise UserError(
            f"evaluation set {es.name!r} ({es.format} at {es.path}) has no class names, which zero-shot classification "
            f"needs: add a classnames.txt (one name per label, in label order) beside it, or evaluate it with "
            f"--tasks retrieval if its items have captions"
        )
    return names


def evaluate_set(bundle: Any, es: Any, tasks: list[str], device: str, batch_size: int) -> dict[str, Any]:
    """Run the requested tasks on one evaluation set. Raises UserError when a task cannot run on it."""
    from laiontools import evalsets

    names = require_classnames(es) if "zeroshot" in tasks else None
    # read (and check) the templates before the images are encoded, so a bad templates file fails fast
    prompts = evalsets.templates(es) if "zeroshot" in tasks else None
    images, labels, captions, ids = [], [], [], []
    n_errors, error_items = 0, []
    for item in evalsets.iter_items(es):
        if item.error or item.image is None:
            n_errors += 1
            if len(error_items) < 100:
                error_items.append({"item_id": item.item_id, "error": item.error})
            _failures.warn("unreadable_eval_image", "%s/%s: %s", es.name, item.item_id, item.error)
            continue
        images.append(item.image)
        labels.append(item.label)
        captions.append(item.caption)
        ids.append(item.item_id)
    res: dict[str, Any] = {"format": es.format, "path": es.path, "n_items": len(images) + n_errors, "n_errors": n_errors, "error_items": error_items}
    if not images:
        raise UserError(f"evaluation set {es.name!r}: none of its {n_errors} images could be read; see the log for item ids")
    feats = _encode_images(bundle, images, device, batch_size)
    if "zeroshot" in tasks:
        keep = [i for i, lab in enumerate(labels) if lab is not None and 0 <= lab < len(names)]
        if not keep:
            raise UserError(f"evaluation set {es.name!r} has class names but no item has a label in range 0..{len(names) - 1}")
        res["zeroshot"] = zero_shot(bundle, feats[keep], [labels[i] for i in keep], names, prompts, device)
        # a label outside the class names is a broken item, not a missing label: named in error_items
        bad = [i for i, lab in enumerate(labels) if lab is not None and not 0 <= lab < len(names)]
        for i in bad[: max(0, 100 - len(error_items))]:
            error_items.append({"item_id": ids[i], "error": f"label {labels[i]} is out of range 0..{len(names) - 1} "
                                                             f"({len(names)} class names); left out of zero-shot"})
        res["zeroshot"]["n_unlabeled"] = len(labels) - len(keep) - len(bad)
        res["zeroshot"]["n_label_out_of_range"] = len(bad)
    if "retrieval" in tasks:
        from laiontools.evalsets import caption_lines

        keep = [i for i, c in enumerate(captions) if caption_lines(c)]
        if not keep:
            if tasks == ["retrieval"]:
                raise UserError(f"evaluation set {es.name!r} has no captions, which retrieval needs (<key>.txt or a caption column)")
            res["retrieval"] = {"skipped": "no captions"}
            log.info("%s: no captions; retrieval skipped", es.name)
        else:
            res["retrieval"] = retrieval(bundle, feats[keep], [captions[i] for i in keep], device, batch_size)
    return res


def flat_metrics(results: dict[str, dict[str, Any]]) -> dict[str, float]:
    """``{"<set>/zeroshot_top1": v, "<set>/image_to_text_R@5": v, ...}``: higher-is-better scores in [0, 1]."""
    out: dict[str, float] = {}
    for name, r in results.items():
        z = r.get("zeroshot")
        if z:
            out[f"{name}/zeroshot_top1"] = z["top1"]
            out[f"{name}/zeroshot_top5"] = z["top5"]
            out[f"{name}/zeroshot_mean_per_class_recall"] = z["mean_per_class_recall"]
        rt = r.get("retrieval")
        if rt and "skipped" not in rt:
            for k, v in rt.items():
                if "_R@" in k:
                    out[f"{name}/{k}"] = v
    return out


STAGE = "evaluate"
CONFIG = EvaluateConfig


@stage_entry(STAGE, output_kind="file")  # the output is one results JSON
def run(cfg: EvaluateConfig, spark: Any = None) -> StageResult:
    """Evaluate a model on every declared set; write the results JSON (cfg.output); details = its content.

    Raises ModelError for a checkpoint of another model, UserError for a set that cannot serve a
    requested task (zero-shot without class names, retrieval-only without captions).
    ``spark`` is unused (evaluation sets are small); accepted for a uniform stage API.
    """
    from laiontools import evalsets
    from laiontools.models.registry import load_model

    sets = evalsets.load_evalsets(cfg.evalset or None, cfg.evalsets_yaml)
    weights, model_name, run_dir = resolve_checkpoint(cfg.checkpoint, cfg.model)
    if "zeroshot" in cfg.tasks:  # cheap check before loading anything
        for es in sets:
            require_classnames(es)
    device = _device(cfg.device)
    if not weights:
        log.warning("evaluate: no --checkpoint: scoring a randomly initialised %s (a chance-level baseline)", model_name)
    try:
        bundle = load_model(model_name, pretrained=weights, device=device)
    except (AssertionError, KeyError, RuntimeError) as e:
        # open_clip rejects some foreign checkpoints with an assert (e.g. a resized text
        # position embedding) before load_model can turn its size mismatch into a ModelError.
        if weights and os.path.isfile(weights):
            raise ModelError(
                f"checkpoint {weights} does not fit model {model_name!r} ({type(e).__name__}: {str(e)[:200]}); "
                f"pass the model it was trained with (a run's settings.json names it)"
            ) from e
        raise
    t0 = time.time()
    try:
        results = {es.name: evaluate_set(bundle, es, cfg.tasks, device, cfg.batch_size) for es in sets}
    except NonFiniteFeatures as e:
        raise NonFiniteFeatures(f"{weights or model_name + ' (random init)'}: {e}; nothing was written") from None
    out = {
        "settings": cfg.to_dict(),
        "model": {k: v for k, v in bundle.info.items() if k != "preprocess"},
        "checkpoint": weights,
        "run_dir": os.path.abspath(run_dir) if run_dir else None,
        "evalsets": results,
        "metrics": flat_metrics(results),
        "wall_s": round(time.time() - t0, 3),
    }
    write_record(cfg.output, out)
    mark_done(cfg.output, {"metrics": len(out["metrics"])})
    rows = [{"metric": k, "value": f"{v:.4f}"} for k, v in out["metrics"].items()]
    return StageResult(
        outputs={"results": cfg.output}, counts={"evalsets": len(results), "metrics": len(out["metrics"])},
        timings={"evaluate": out["wall_s"]}, details=out,
        summary=f"evaluated {model_name} ({weights or 'random init'}) on {', '.join(results)}\n{table(rows)}\nresults: {cfg.output}",
    )


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="laiontools evaluate",
        description="Zero-shot classification (top-1/top-5) and image<->text retrieval (recall@1/5/10) on evaluation sets.",
    )
    add_config_args(p, EvaluateConfig, skip=("evalset",))
    # repeatable: --evalset a=... --evalset b=...  (or several after one flag)
    p.add_argument("--evalset", dest="evalset", action="extend", nargs="+", default=argparse.SUPPRESS,
                   help="evaluation set(s): name=path[:format] (imagefolder|folder|wds|parquet); repeatable")
    return p


def main(argv: list[str] | None = None) -> int:
    from laiontools.core.stage import stage_main

    return stage_main(__name__, argv)
