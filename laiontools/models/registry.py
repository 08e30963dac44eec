"""open_clip models for every stage: name + pretrained tag or checkpoint -> model, transforms, tokenizer.

The package ships tiny configs (``laiontools/model_configs/lt-*.json``) registered with open_clip, so
tests and the demo run on CPU with random init. Users pass any open_clip name with a pretrained tag
(``laion2b_s34b_b79k``) or a local checkpoint path. Embed, dedup, train and evaluate all load models
here, so the pool and the evaluation sets always get the same model and preprocessing.
"""

from __future__ import annotations

import dataclasses
import difflib
import logging
import os
from importlib import resources
from typing import Any

from laiontools.core.errors import UserError

log = logging.getLogger(__name__)

TINY_MODELS = ("lt-tiny", "lt-small")
RANDOM_INIT_SEED = 0
_registered = False


class ModelError(UserError, ValueError):
    """Unknown model name, unavailable pretrained weights, or a checkpoint of another model."""


def register_tiny_models() -> None:
    """Register the shipped configs with open_clip (idempotent)."""
    global _registered
    if _registered:
        return
    import open_clip

    cfg_dir = resources.files("laiontools").joinpath("model_configs")
    open_clip.add_model_config(str(cfg_dir))
    _registered = True


@dataclasses.dataclass
class ModelBundle:
    model: Any
    preprocess: Any  # eval transform: PIL image -> tensor
    preprocess_train: Any
    tokenizer: Any
    info: dict[str, Any]


def check_model_name(name: str) -> None:
    """Raise ModelError naming close matches if `name` is not an open_clip model config."""
    import open_clip

    known = open_clip.list_models()
    if name not in known:
        close = difflib.get_close_matches(name, known, n=5, cutoff=0.5)
        raise ModelError(
            f"unknown open_clip model {name!r}; close names: {close or 'none'}. "
            f"`python -c 'import open_clip; print(open_clip.list_models())'` lists all; tiny CPU models: {list(TINY_MODELS)}"
        )


def describe(name: str, pretrained: str | None) -> dict[str, Any]:
    """What identifies a model's embedding space: name + tag, or name + checkpoint sha256."""
    from laiontools.core.storage import sha256_file

    if pretrained and os.path.exists(pretrained):
        sha, _ = sha256_file(pretrained)
        return {"model": name, "pretrained": None, "checkpoint_sha256": sha}
    return {"model": name, "pretrained": pretrained or None, "checkpoint_sha256": None}


def load_model(name: str, pretrained: str | None = None, device: str = "cpu", precision: str = "fp32") -> ModelBundle:
    """Create an open_clip model with its own transforms and tokenizer.

    `pretrained`: None (random init), an open_clip tag, or a local checkpoint path (loaded by open_clip,
    weights only). Raises ModelError with close names for an unknown model, and with the way to pass
    a local checkpoint when a tag cannot be fetched (e.g. no internet).
    """
    import open_clip
    import torch

    register_tiny_models()
    check_model_name(name)
    if pretrained and not os.path.exists(pretrained):
        tags = open_clip.list_pretrained_tags_by_model(name)
        if pretrained not in tags:
            raise ModelError(
                f"{name!r} has no pretrained tag {pretrained!r} (known: {tags or 'none'}) and no file "
                f"{pretrained!r} exists; pass a tag from that list or a local checkpoint path"
            )
    shapes: dict[str, tuple[int, ...]] = {}
    if pretrained and os.path.exists(pretrained):
        # Refuse pickles: open_clip loads with torch.load; make sure only tensors are accepted.
        shapes = _assert_weights_only(pretrained)
    if not pretrained:
        # Random init must be the same weights in every process and stage (embed the pool, embed
        # the evaluation sets, train ranks): seed it, without disturbing the caller's RNG.
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(RANDOM_INIT_SEED)
            model, preprocess_train, preprocess = open_clip.create_model_and_transforms(
                name, pretrained=None, device=device, precision=precision
            )
    else:
        model, preprocess_train, preprocess = _create_pretrained(name, pretrained, device, precision)
        _check_not_resized(name, pretrained, shapes, model)
    model.eval()
    tokenizer = open_clip.get_tokenizer(name)
    cfg = open_clip.get_model_config(name) or {}
    info = describe(name, pretrained)
    info.update(
        {
            "random_init_seed": None if pretrained else RANDOM_INIT_SEED,
            "embed_dim": int(cfg.get("embed_dim", 0)) or None,
            "image_size": list(_image_size(preprocess)),
            "context_length": int(getattr(model, "context_length", cfg.get("text_cfg", {}).get("context_length", 77))),
            "preprocess": repr(preprocess),
            "open_clip_version": open_clip.__version__,
            "torch_version": torch.__version__,
        }
    )
    return ModelBundle(model, preprocess, preprocess_train, tokenizer, info)


def _create_pretrained(name: str, pretrained: str, device: str, precision: str) -> tuple[Any, Any, Any]:
    import open_clip

    try:
        return open_clip.create_model_and_transforms(name, pretrained=pretrained, device=device, precision=precision)
    except (RuntimeError, AssertionError, KeyError) as e:
        # open_clip reports a checkpoint of another architecture as a size mismatch, missing /
        # unexpected keys, or a bare assertion while resizing position embeddings.
        if os.path.exists(pretrained) and (not isinstance(e, RuntimeError) or any(
                m in str(e) for m in ("size mismatch", "Missing key", "Unexpected key"))):
            raise ModelError(f"checkpoint {pretrained} does not fit model {name!r} ({type(e).__name__}: "
                             f"{str(e)[:300]}); pass the model name it was trained with") from e
        raise
    except Exception as e:  # network failures surface as many exception types from huggingface_hub
        if pretrained and not os.path.exists(pretrained):
            raise ModelError(
                f"could not fetch pretrained weights {name}/{pretrained} ({type(e).__name__}: {str(e)[:200]}). "
                f"Without internet, download the checkpoint elsewhere and pass its local path: "
                f"--pretrained /path/to/open_clip_pytorch_model.bin"
            ) from e
        raise


def _check_not_resized(name: str, path: str, shapes: dict[str, tuple[int, ...]], model: Any) -> None:
    """Raise ModelError when open_clip fitted checkpoint `path` to model `name` by interpolating its weights.

    open_clip loads strictly, except that it resizes the image grid's and the text's position embeddings
    to the model's (an INFO log line): a ViT-L-14-336 checkpoint given as ViT-L-14, or one trained with
    another context length, loads and embeds at another resolution than it was trained at, with no error.
    `shapes`: the checkpoint's tensor shapes (:func:`_assert_weights_only`)."""
    have = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    diff = {k: (shp, have[k]) for k, shp in shapes.items() if k in have and have[k] != shp}
    if diff:
        shown = ", ".join(f"{k} {list(a)} in the checkpoint, {list(b)} in the model" for k, (a, b) in sorted(diff.items()))
        raise ModelError(f"checkpoint {path} does not fit model {name!r} ({shown}): it was trained at another image "
                         f"size or context length; pass the model name it was trained with")


def _assert_weights_only(path: str) -> dict[str, tuple[int, ...]]:
    """Raise ModelError naming `path` unless it loads without unpickling objects (torch weights_only, or
    safetensors) into what open_clip takes: a non-empty {name: tensor} mapping, possibly under 'state_dict'.
    Returns each tensor's shape by parameter name (without a DDP 'module.' prefix, as open_clip strips it)."""
    import torch

    if path.endswith(".safetensors"):
        from safetensors.torch import load_file

        try:
            ckpt: Any = load_file(path, device="cpu")
        except Exception as e:  # SafetensorError, OSError: a damaged or cut file
            raise ModelError(f"checkpoint {path} is not a readable safetensors file ({type(e).__name__}: "
                             f"{str(e)[:200]}); re-save or re-download it") from e
    else:
        try:
            ckpt = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as e:
            raise ModelError(
                f"checkpoint {path} cannot be loaded with weights_only=True ({type(e).__name__}); "
                f"laiontools never unpickles arbitrary objects: re-save it as a plain state_dict or safetensors"
            ) from e
    sd = ckpt.get("state_dict") if isinstance(ckpt, dict) and "state_dict" in ckpt else ckpt
    if not (isinstance(sd, dict) and sd and all(isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in sd.items())):
        raise ModelError(
            f"checkpoint {path} is not a model state_dict (it holds {_describe_obj(sd)}, not a non-empty mapping of "
            f"parameter names to tensors); pass the weights file written by training (a plain state_dict or safetensors)"
        )
    ddp = next(iter(sd)).startswith("module.")  # open_clip's rule for a DDP-saved state_dict
    return {(k.removeprefix("module.") if ddp else k): tuple(v.shape) for k, v in sd.items()}


def _describe_obj(obj: Any) -> str:
    if isinstance(obj, dict):
        return "an empty dict" if not obj else f"a dict of {len(obj)} entries with non-tensor values or keys"
    return f"a {type(obj).__name__}"


def _image_size(preprocess: Any) -> tuple[int, int]:
    for t in getattr(preprocess, "transforms", []):
        size = getattr(t, "size", None)
        if size is not None:
            return (size, size) if isinstance(size, int) else tuple(size)[:2]  # type: ignore[return-value]
    return (224, 224)


def model_signature(info: dict[str, Any]) -> str:
    """Short human-readable identity of an embedding space, used in error messages."""
    ident = info.get("pretrained") or (info.get("checkpoint_sha256") or "random-init")[:12]
    return f"{info.get('model')}/{ident} (dim {info.get('embed_dim')})"
