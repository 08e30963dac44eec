"""The embedder: an open_clip model with its own preprocessing and tokenizer, as the embed stage runs it.

The pool's embed run and every later step that must share its embedding space (dedup's evaluation
sets, dedup calibrate's planted copies) build an :class:`Embedder` with the same arguments, or
:func:`embedder_for` an existing embeddings folder, so images go through the same transform and model.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Iterable
from typing import Any

import numpy as np

from laiontools.contracts.embeddings import check_compatible, load_model_json
from laiontools.core.config import ConfigError

log = logging.getLogger(__name__)

PRECISIONS = ("auto", "fp32", "amp_bf16", "amp_fp16", "bf16", "fp16")


def resolve_device(device: str | None) -> str:
    """`device` as given (refused if it names CUDA and torch sees none, or a cuda:N past the last one),
    else cuda:LOCAL_RANK when there is a GPU, else "cpu". A bare "cuda" in a rank a launcher started
    (LOCAL_RANK set: torchrun) is that rank's GPU too, not every rank's cuda:0."""
    import torch

    if device:
        if device.startswith("cuda"):
            n = torch.cuda.device_count() if torch.cuda.is_available() else 0
            ordinal = device.partition(":")[2]
            if n == 0 or (ordinal and not (ordinal.isdigit() and int(ordinal) < n)):
                raise ConfigError(f"device {device!r} asked for but torch sees {n} CUDA device(s); use --device cpu"
                                  + ("" if n == 0 else f" or cuda:0..{n - 1}"))
            if device == "cuda" and "LOCAL_RANK" in os.environ:
                return f"cuda:{int(os.environ['LOCAL_RANK']) % n}"
        return device
    if torch.cuda.is_available():
        local_rank = int(os.environ.get("LOCAL_RANK", "0"))
        return f"cuda:{local_rank % torch.cuda.device_count()}"
    return "cpu"


def resolve_precision(precision: str, device: str) -> str:
    """`precision` as given, or for "auto": amp_bf16 (amp_fp16 without bf16) on CUDA, fp32 on the CPU. The
    GPU asked is the one asked about (``cuda:1`` on a node of mixed GPUs; torch answers for the current one)."""
    import torch

    if precision != "auto":
        return precision
    if device.startswith("cuda"):
        with torch.cuda.device(torch.device(device)):  # (``cuda``: the current device, as before)
            return "amp_bf16" if torch.cuda.is_bf16_supported() else "amp_fp16"
    return "fp32"


def embedding_info(model_info: dict[str, Any], pretrained: str | None) -> dict[str, Any]:
    """The model part of an embeddings folder's model.json: `model_info` (:func:`load_model`'s) + how vectors
    are stored + the checkpoint's absolute path when `pretrained` is one (informative, the identity is its
    sha256; :func:`embedder_for` loads it from there when dedup is given no --pretrained). Every engine
    records this same document."""
    info = dict(model_info)
    if pretrained and os.path.exists(pretrained):
        info["checkpoint_path"] = os.path.abspath(pretrained)
    info["normalize"] = "l2"
    info["storage_dtype"] = "float16"
    return info


class Embedder:
    """An open_clip model with the preprocessing and tokenizer open_clip pairs with it.

    The pool run and every later stage that must share its embedding space (dedup's evaluation sets)
    build one of these with the same arguments, so images go through the same transform and model.
    Embeddings come back as float32, L2-normalized, one row per input.
    """

    def __init__(
        self,
        model: str,
        pretrained: str | None = None,
        device: str | None = None,
        batch_size: int = 256,
        precision: str = "auto",
    ) -> None:
        import torch

        from laiontools.models.registry import load_model

        if precision not in PRECISIONS:
            raise ConfigError(f"precision {precision!r} is not one of {PRECISIONS}")
        self.device = resolve_device(device)
        self.precision = resolve_precision(precision, self.device)
        self.batch_size = int(batch_size)
        # amp_* keep fp32 weights and autocast; bf16/fp16 cast the weights themselves.
        weights = self.precision if self.precision in ("bf16", "fp16") else "fp32"
        bundle = load_model(model, pretrained, device=self.device, precision=weights)
        self.model = bundle.model
        self.preprocess = bundle.preprocess
        self.tokenizer = bundle.tokenizer
        from laiontools.models.encode import BatchPreprocess, check_trimmed_text

        # open_clip's transform, with ToTensor + Normalize moved to one op per batch (bit-identical).
        self.batch_preprocess = BatchPreprocess(self.preprocess, tuple(bundle.info["image_size"]))
        # Captions skip their padding only if that reproduces open_clip's encode_text here.
        self.trim_text = check_trimmed_text(self.model, self.tokenizer, self.device)
        if not self.trim_text:
            log.info("text tower: using open_clip's encode_text over the full context for %s", model)
        self._input_dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(self.precision, torch.float32)
        self._autocast_dtype = {"amp_bf16": torch.bfloat16, "amp_fp16": torch.float16}.get(self.precision)
        self._info = embedding_info(bundle.info, pretrained)
        if self.device.startswith("cuda"):
            if torch.device(self.device).index is not None:
                # the current device too: what runs on "the" GPU without naming one (the DataLoader's
                # pin-memory thread, pinned buffers) otherwise opens a context on cuda:0 in every rank
                torch.cuda.set_device(torch.device(self.device))
            torch.backends.cuda.matmul.allow_tf32 = True
            torch.backends.cudnn.allow_tf32 = True

    @property
    def info(self) -> dict[str, Any]:
        """Model identity + preprocessing (the model part of model.json)."""
        return dict(self._info)

    @property
    def dim(self) -> int:
        return int(self._info["embed_dim"])

    def _autocast(self) -> Any:
        import contextlib

        import torch

        if self._autocast_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(device_type=self.device.split(":")[0], dtype=self._autocast_dtype)

    def encode(self, images: Any | None, tokens: Any | None) -> tuple[Any, Any]:
        """Forward one batch: image tensor and/or token tensor -> L2-normalized float32 tensors.

        `images` is either preprocessed float (N, 3, H, W) or, from :class:`BatchPreprocess`, uint8
        (N, 3, H, W) still to be scaled and normalized (done here, on the model's device). Tensors may
        live on the CPU (pinned); they are moved to the model's device here. Captions run through
        :func:`laiontools.models.encode.encode_text_trimmed` (same values, no work on padding).
        """
        import torch
        import torch.nn.functional as F

        from laiontools.models.encode import encode_text_trimmed

        img = txt = None
        with torch.inference_mode(), self._autocast():
            if images is not None:
                x = images.to(self.device, non_blocking=True)
                if x.dtype == torch.uint8:
                    x = self.batch_preprocess.normalize(x)
                img = F.normalize(self.model.encode_image(x.to(self._input_dtype)).float(), dim=-1)
            if tokens is not None:
                t = tokens.to(self.device, non_blocking=True)
                txt = F.normalize(encode_text_trimmed(self.model, t, enabled=self.trim_text).float(), dim=-1)
        return img, txt

    def image_input(self, im: Any) -> Any:
        """One PIL image -> what a batch slot holds: (3, H, W) uint8 when the transform splits, else float."""
        import torch

        if self.batch_preprocess.split:
            return torch.from_numpy(np.array(self.batch_preprocess.to_uint8(im))).permute(2, 0, 1)
        return self.preprocess(im)

    def embed_images(self, images: Iterable[Any]) -> np.ndarray:
        """PIL images -> (N, dim) float32 L2-normalized, with the model's own preprocessing."""
        import torch

        out: list[np.ndarray] = []
        batch: list[Any] = []

        def flush() -> None:
            img, _ = self.encode(torch.stack(batch), None)
            out.append(img.cpu().numpy())
            batch.clear()

        for im in images:
            batch.append(self.image_input(im))
            if len(batch) >= self.batch_size:
                flush()
        if batch:
            flush()
        return np.concatenate(out) if out else np.zeros((0, self.dim), np.float32)

    def embed_texts(self, texts: list[str]) -> np.ndarray:
        """Captions -> (N, dim) float32 L2-normalized, with the model's own tokenizer."""
        out = []
        for i in range(0, len(texts), self.batch_size):
            _, txt = self.encode(None, self.tokenizer(list(texts[i : i + self.batch_size])))
            out.append(txt.cpu().numpy())
        return np.concatenate(out) if out else np.zeros((0, self.dim), np.float32)


def embedder_for(emb_dir: str, device: str | None = None, pretrained: str | None = None, **kw: Any) -> Embedder:
    """An Embedder in the same embedding space as the folder `emb_dir` (reads its model.json).

    For a folder made from a local checkpoint, pass its path as `pretrained` (it is checked against the
    recorded sha256); by default the path recorded in model.json is used.
    """
    info = load_model_json(emb_dir)
    ckpt = (pretrained or info.get("checkpoint_path")) if info.get("checkpoint_sha256") else None
    emb = Embedder(info["model"], ckpt or info.get("pretrained"), device=device, **kw)
    check_compatible(info, emb.info, where=emb_dir)
    return emb
