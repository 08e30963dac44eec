"""Exact, cheaper equivalents of two open_clip steps the embed step runs for every sample.

Both return what open_clip returns (tests compare them element for element); they only avoid work.

* :class:`BatchPreprocess` splits open_clip's eval transform where it turns the PIL image into a
  tensor. Everything before that point (open_clip's own Resize / CenterCrop / RGB conversion objects)
  runs per image in the DataLoader workers and yields ``uint8`` HWC arrays; ``ToTensor`` and
  ``Normalize`` then run once per *batch* (``x.float().div(255).sub(mean).div(std)``, the same
  element-wise float32 operations torchvision applies per image, so the result is bit-identical).
  Per image, torchvision's ToTensor + Normalize cost more than decoding a small JPEG; as one batched
  op they are negligible, the batch crosses the worker -> main process pipe as uint8 (4x fewer
  bytes), and on a GPU the normalization runs on the device after a uint8 host->device copy.
  A transform of another shape (no ToTensor, an op after Normalize, no RGB conversion) is not split:
  the caller falls back to the whole transform per image.

* :func:`encode_text_trimmed` runs open_clip's text tower on token sequences cut after their last
  real token. CLIP's text transformer is causal and pools at the EOT token, so positions after it can
  never reach the pooled output: dropping them changes nothing but the work. Captions in a batch are
  grouped by length (a few groups, chosen to minimise padded positions), so one 77-token caption
  does not make every other caption pay for 77 positions. Models where this does not hold
  (bidirectional text encoders, 'last' pooling, non-CLIP text towers) use ``model.encode_text``.
"""

from __future__ import annotations

from typing import Any

import numpy as np


def _is_rgb_convert(t: Any) -> bool:
    name = type(t).__name__
    if name == "MaybeConvertMode":  # open_clip >= 2.24
        return getattr(t, "mode", None) == "RGB"
    return getattr(t, "__name__", "") == "_convert_to_rgb"  # older open_clip: a plain function


class BatchPreprocess:
    """open_clip's eval transform as (per-image PIL part -> uint8) + (per-batch ToTensor + Normalize).

    ``split`` is False when the transform does not have the expected shape; then use ``preprocess``.
    """

    def __init__(self, preprocess: Any, image_size: tuple[int, int]) -> None:
        from torchvision.transforms import Compose, Normalize, ToTensor

        self.preprocess = preprocess
        self.image_size = tuple(int(s) for s in image_size)
        self.split = False
        self._stats: dict[Any, tuple[Any, Any]] = {}  # device -> (mean, std) tensors
        ts = list(getattr(preprocess, "transforms", []) or [])
        at = next((i for i, t in enumerate(ts) if isinstance(t, ToTensor)), None)  # MaybeToTensor too
        if at is None or at == 0 or not _is_rgb_convert(ts[at - 1]):
            return
        rest = ts[at + 1 :]
        if len(rest) > 1 or (rest and not isinstance(rest[0], Normalize)) or (rest and rest[0].inplace):
            return
        self.pil = Compose(ts[:at])
        self.mean = tuple(float(m) for m in rest[0].mean) if rest else None
        self.std = tuple(float(s) for s in rest[0].std) if rest else None
        self.split = True

    def to_uint8(self, im: Any) -> np.ndarray:
        """PIL image -> (H, W, 3) uint8 array after open_clip's resize / crop / RGB conversion."""
        out = self.pil(im)
        arr = np.asarray(out)
        if arr.dtype != np.uint8 or arr.shape != (*self.image_size, 3):
            raise ValueError(f"preprocessed image is {arr.dtype} {arr.shape}, expected uint8 {(*self.image_size, 3)}")
        return arr

    def normalize(self, batch: Any) -> Any:
        """(N, 3, H, W) uint8 tensor (any device) -> float32, exactly as ToTensor + Normalize per image."""
        import torch

        x = batch.to(torch.float32).div(255)
        if self.mean is not None:
            stats = self._stats.get(x.device)
            if stats is None:  # once per device, not a host->device copy per batch
                stats = self._stats[x.device] = tuple(
                    torch.as_tensor(v, dtype=torch.float32, device=x.device).view(1, -1, 1, 1) for v in (self.mean, self.std))
            x.sub_(stats[0]).div_(stats[1])
        return x


# --------------------------------------------------------------------------------------------------
# Text


def can_trim_text(model: Any) -> bool:
    """True for open_clip CLIP models with a causal text transformer pooled at EOT / first token."""
    try:
        from open_clip.model import CLIP
    except ImportError:  # pragma: no cover - open_clip is a dependency
        return False
    return (
        type(model) is CLIP
        and getattr(model, "attn_mask", None) is not None
        and getattr(model, "text_pool_type", None) in ("argmax", "eos", "first")
    )


def needed_lengths(model: Any, tokens: Any) -> Any:
    """Per caption, how many leading positions determine its pooled feature (1 + the pooled index)."""
    import torch

    pool = model.text_pool_type
    if pool == "argmax":
        idx = tokens.argmax(dim=-1)
    elif pool == "eos":
        idx = (tokens == model.text_eos_id).int().argmax(dim=-1)
    else:  # first
        idx = torch.zeros(tokens.shape[0], dtype=torch.long, device=tokens.device)
    return idx + 1


def length_groups(lengths: np.ndarray, max_groups: int = 4, group_cost: float = 0.1,
                  context: int | None = None, quantum: int = 8) -> list[tuple[np.ndarray, int]]:
    """Split a batch into groups of similar length, minimising padded positions.

    Returns (indices into ``lengths``, length to run the group at) pairs. Lengths are rounded up to a
    multiple of ``quantum`` (friendlier shapes, and at most context/quantum distinct values); a group
    costs (members x its length) positions plus ``group_cost`` x (batch x context) for each extra
    forward pass; an exact dynamic programme over the distinct rounded lengths picks the cut points.
    """
    n = len(lengths)
    if n == 0:
        return []
    context = int(context or lengths.max())
    rounded = np.minimum(-(-lengths // quantum) * quantum, context)
    order = np.argsort(rounded, kind="stable")
    srt = rounded[order]
    uniq = np.unique(srt)
    ends = np.searchsorted(srt, uniq, side="right")  # captions with rounded length <= uniq[j]
    m = len(uniq)
    overhead = group_cost * n * context
    inf = float("inf")
    # best[g][j]: min cost of the first ends[j] captions in g groups, the last one run at uniq[j]
    best = [[inf] * m for _ in range(max_groups + 1)]
    back = [[-1] * m for _ in range(max_groups + 1)]
    for j in range(m):
        best[1][j] = float(ends[j] * uniq[j])
    for g in range(2, max_groups + 1):
        for j in range(m):
            for i in range(j):
                c = best[g - 1][i] + float((ends[j] - ends[i]) * uniq[j]) + overhead
                if c < best[g][j]:
                    best[g][j], back[g][j] = c, i
    g = min(range(1, max_groups + 1), key=lambda k: best[k][m - 1])
    cut_idx, j = [m - 1], m - 1
    while g > 1:
        j, g = back[g][j], g - 1
        cut_idx.append(j)
    out, start = [], 0
    for j in sorted(cut_idx):
        out.append((order[start : ends[j]], int(uniq[j])))
        start = int(ends[j])
    return out


def _encode_text_prefix(model: Any, tokens: Any) -> Any:
    """open_clip ``CLIP.encode_text`` on tokens cut to their first L positions (a test compares it
    with ``model.encode_text`` on the installed open_clip)."""
    from open_clip.transformer import text_global_pool

    L = tokens.shape[1]
    cast_dtype = model.transformer.get_cast_dtype()
    x = model.token_embedding(tokens).to(cast_dtype)
    x = x + model.positional_embedding[:L].to(cast_dtype)
    x = model.transformer(x, attn_mask=model.attn_mask[:L, :L])
    x = model.ln_final(x)
    # 'eos' pooling (and its keyword) exists only in newer open_clip; older versions return (pooled, tokens).
    eos = {"eos_token_id": model.text_eos_id} if model.text_pool_type == "eos" else {}
    x = text_global_pool(x, tokens, model.text_pool_type, **eos)
    if isinstance(x, tuple):
        x = x[0]
    if model.text_projection is not None:
        from torch import nn

        x = model.text_projection(x) if isinstance(model.text_projection, nn.Linear) else x @ model.text_projection
    return x


def encode_text_trimmed(model: Any, tokens: Any, max_groups: int = 4, enabled: bool = True) -> Any:
    """``model.encode_text(tokens)`` with padding after each caption's pooled token skipped.

    Same values as ``model.encode_text`` (up to float summation order), rows in input order.
    """
    import torch

    if not enabled or not can_trim_text(model) or tokens.shape[0] == 0:
        return model.encode_text(tokens)
    lengths = needed_lengths(model, tokens).cpu().numpy()
    groups = length_groups(lengths, max_groups=max_groups, context=tokens.shape[1])
    if sum(len(g) * L for g, L in groups) > 0.8 * tokens.shape[0] * tokens.shape[1]:
        return model.encode_text(tokens)  # saves too little to pay for the extra forward passes
    out = None
    for idx, L in groups:
        sel = torch.as_tensor(idx, device=tokens.device)
        feats = _encode_text_prefix(model, tokens.index_select(0, sel)[:, :L])
        if out is None:
            out = feats.new_empty((tokens.shape[0], feats.shape[1]))
        out.index_copy_(0, sel, feats)
    return out


def check_trimmed_text(model: Any, tokenizer: Any, device: str) -> bool:
    """Whether :func:`encode_text_trimmed` reproduces ``model.encode_text`` for this model on the
    installed open_clip (one forward of three captions). The embed step runs this once per model
    and uses open_clip's own call if the answer is no, so a change inside open_clip can cost speed,
    never correctness."""
    import torch

    if not can_trim_text(model):
        return False
    tokens = tokenizer(["a photo of a cat", "", "a large red star on a striped blue background " * 3]).to(device)
    try:
        with torch.inference_mode():
            ref = model.encode_text(tokens).float()
            got = torch.cat([_encode_text_prefix(model, tokens[i : i + 1, : int(L)]).float()
                             for i, L in enumerate(needed_lengths(model, tokens).tolist())])
    except Exception:  # noqa: BLE001 - any incompatibility means: do not trim
        return False
    cos = torch.nn.functional.cosine_similarity(ref, got, dim=-1)
    return bool(cos.min() > 0.999)
