"""A synthetic evaluation set, and planted (transformed) copies of its images in the pool.

Eval classes are glyphs that no pool image contains (heart, arrow, crescent, ...), drawn large
with per-item position, scale, rotation and colours, so a near-duplicate of an eval image in the
pool can only be a planted copy: that is what lets dedup tests count hits exactly.
"""

from __future__ import annotations

import io
import json
import math
import os
import tarfile
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
from PIL import Image, ImageDraw, ImageEnhance, ImageOps

from laiontools.core.storage import PARQUET_READ, PARQUET_WRITE, atomic_write_bytes, write_json
from laiontools.synthetic.images import COLOURS, encode_jpeg

EVAL_SIZE = 128
EVAL_FORMATS = ("imagefolder", "folder", "wds", "parquet")
PLANT_TRANSFORMS = ("exact", "reencode", "resize", "crop", "flip", "colorshift", "text")
# Planted pool items get ids from here up, far above any pool id a test or the demo writes.
PLANT_ID_BASE = 9_000_000
ZEROSHOT_TEMPLATES = ("a photo of a {c}.", "a drawing of a {c}.", "a {c} symbol.", "an icon of a {c}.")

Point = tuple[float, float]


def _rot(points: list[Point], cx: float, cy: float, a: float) -> list[Point]:
    ca, sa = math.cos(a), math.sin(a)
    return [(cx + (x - cx) * ca - (y - cy) * sa, cy + (x - cx) * sa + (y - cy) * ca) for x, y in points]


def _heart(d: ImageDraw.ImageDraw, cx: float, cy: float, r: float, a: float, fill: tuple) -> None:
    pts = []
    for k in range(64):
        t = 2 * math.pi * k / 64
        x = 16 * math.sin(t) ** 3
        y = 13 * math.cos(t) - 5 * math.cos(2 * t) - 2 * math.cos(3 * t) - math.cos(4 * t)
        pts.append((cx + x * r / 17, cy - y * r / 17))
    d.polygon(_rot(pts, cx, cy, a), fill=fill)


def _arrow(d: ImageDraw.ImageDraw, cx: float, cy: float, r: float, a: float, fill: tuple) -> None:
    s = r
    pts = [(cx - s, cy - s * 0.25), (cx + s * 0.2, cy - s * 0.25), (cx + s * 0.2, cy - s * 0.6), (cx + s, cy),
           (cx + s * 0.2, cy + s * 0.6), (cx + s * 0.2, cy + s * 0.25), (cx - s, cy + s * 0.25)]
    d.polygon(_rot(pts, cx, cy, a), fill=fill)


def _crescent(d: ImageDraw.ImageDraw, cx: float, cy: float, r: float, a: float, fill: tuple,
              bg: tuple = (0, 0, 0)) -> None:
    d.ellipse((cx - r, cy - r, cx + r, cy + r), fill=fill)
    ox, oy = cx + r * 0.45 * math.cos(a), cy + r * 0.45 * math.sin(a)
    d.ellipse((ox - r * 0.85, oy - r * 0.85, ox + r * 0.85, oy + r * 0.85), fill=bg)


def _cross(d: ImageDraw.ImageDraw, cx: float, cy: float, r: float, a: float, fill: tuple) -> None:
    w = r * 0.3
    pts = [(cx - w, cy - r), (cx + w, cy - r), (cx + w, cy - w), (cx + r, cy - w), (cx + r, cy + w), (cx + w, cy + w),
           (cx + w, cy + r), (cx - w, cy + r), (cx - w, cy + w), (cx - r, cy + w), (cx - r, cy - w), (cx - w, cy - w)]
    d.polygon(_rot(pts, cx, cy, a), fill=fill)


def _spiral(d: ImageDraw.ImageDraw, cx: float, cy: float, r: float, a: float, fill: tuple) -> None:
    pts = [(cx + r * t / 20 * math.cos(a + t), cy + r * t / 20 * math.sin(a + t)) for t in np.linspace(0, 20, 200)]
    d.line(pts, fill=fill, width=max(3, int(r / 7)))


def _bolt(d: ImageDraw.ImageDraw, cx: float, cy: float, r: float, a: float, fill: tuple) -> None:
    pts = [(cx + r * 0.2, cy - r), (cx - r * 0.5, cy + r * 0.1), (cx - r * 0.05, cy + r * 0.1),
           (cx - r * 0.3, cy + r), (cx + r * 0.5, cy - r * 0.15), (cx + r * 0.05, cy - r * 0.15)]
    d.polygon(_rot(pts, cx, cy, a * 0.3), fill=fill)


def _smiley(d: ImageDraw.ImageDraw, cx: float, cy: float, r: float, a: float, fill: tuple,
            bg: tuple = (0, 0, 0)) -> None:
    d.ellipse((cx - r, cy - r, cx + r, cy + r), fill=fill)
    e = r * 0.15
    for sx in (-0.35, 0.35):
        d.ellipse((cx + sx * r - e, cy - 0.3 * r - e, cx + sx * r + e, cy - 0.3 * r + e), fill=bg)
    d.arc((cx - r * 0.55, cy - r * 0.4, cx + r * 0.55, cy + r * 0.6), 20, 160, fill=bg, width=max(2, int(r / 10)))


def _house(d: ImageDraw.ImageDraw, cx: float, cy: float, r: float, a: float, fill: tuple,
           bg: tuple = (0, 0, 0)) -> None:
    d.rectangle((cx - r * 0.7, cy - r * 0.1, cx + r * 0.7, cy + r), fill=fill)
    d.polygon([(cx - r, cy - r * 0.05), (cx, cy - r), (cx + r, cy - r * 0.05)], fill=fill)
    d.rectangle((cx - r * 0.15, cy + r * 0.4, cx + r * 0.15, cy + r), fill=bg)


def _tree(d: ImageDraw.ImageDraw, cx: float, cy: float, r: float, a: float, fill: tuple) -> None:
    d.rectangle((cx - r * 0.12, cy + r * 0.3, cx + r * 0.12, cy + r), fill=(110, 70, 35))
    for k, yy in enumerate((-0.9, -0.5, -0.1)):
        w = r * (0.5 + 0.25 * k)
        d.polygon([(cx, cy + yy * r), (cx - w, cy + (yy + 0.55) * r), (cx + w, cy + (yy + 0.55) * r)], fill=fill)


def _key(d: ImageDraw.ImageDraw, cx: float, cy: float, r: float, a: float, fill: tuple,
         bg: tuple = (0, 0, 0)) -> None:
    d.ellipse((cx - r, cy - r * 0.35, cx - r * 0.3, cy + r * 0.35), fill=fill)
    d.ellipse((cx - r * 0.8, cy - r * 0.15, cx - r * 0.5, cy + r * 0.15), fill=bg)
    d.rectangle((cx - r * 0.35, cy - r * 0.1, cx + r, cy + r * 0.1), fill=fill)
    for x in (0.55, 0.85):
        d.rectangle((cx + r * (x - 0.08), cy + r * 0.1, cx + r * (x + 0.08), cy + r * 0.35), fill=fill)


# class name -> glyph drawer; none of these appear in pool images (laiontools.synthetic.images.SHAPES).
GLYPHS: dict[str, Callable[..., None]] = {
    "heart": _heart, "arrow": _arrow, "crescent": _crescent, "cross": _cross, "spiral": _spiral,
    "lightning bolt": _bolt, "smiley face": _smiley, "house": _house, "tree": _tree, "key": _key,
}
_NEEDS_BG = {"crescent", "smiley face", "house", "key"}


def render_eval_item(label: int, k: int, seed: int = 1, size: int = EVAL_SIZE) -> Image.Image:
    """Eval image `k` of the class whose glyph is ``list(GLYPHS)[label]``: the glyph drawn large,
    position/colour/rotation varied. (:func:`write_evalset` numbers its classes by sorted folder name
    and passes each class's glyph index here.)"""
    name = list(GLYPHS)[label]
    rng = np.random.default_rng([int(seed) & 0xFFFFFFFF, 7919, label, k])
    names = list(COLOURS)
    bg_name, fg_name = rng.choice(len(names), size=2, replace=False)
    bg, fg = COLOURS[names[int(bg_name)]], COLOURS[names[int(fg_name)]]
    # A soft vertical gradient keeps the background from being flat, unlike pool textures.
    top = np.asarray(bg, dtype=np.float32)
    bottom = np.clip(top * 0.6 + 50, 0, 255)
    t = np.linspace(0, 1, size, dtype=np.float32)[:, None, None]
    arr = np.broadcast_to(top * (1 - t) + bottom * t, (size, size, 3))
    img = Image.fromarray(np.ascontiguousarray(arr).astype(np.uint8))
    d = ImageDraw.Draw(img)
    r = size * float(rng.uniform(0.30, 0.42))
    cx = float(rng.uniform(r, size - r))
    cy = float(rng.uniform(r, size - r))
    a = float(rng.uniform(0, 2 * math.pi))
    kw = {"bg": tuple(int(v) for v in bg)} if name in _NEEDS_BG else {}
    GLYPHS[name](d, cx, cy, r, a, fg, **kw)
    return img


def _folder_name(classname: str) -> str:
    return classname.replace(" ", "_")


def write_evalset(out_dir: str, n_classes: int = 5, per_class: int = 4, seed: int = 1,
                  fmt: str = "imagefolder") -> dict[str, Any]:
    """Write a synthetic eval set in `fmt`; return ``{"classnames", "items", "format", "seed"}``.

    Formats: 'imagefolder' (``<out>/<class>/<k:04d>.jpg``), 'folder' (flat ``<out>/<class>_<k:04d>.jpg``
    + ``labels.csv``), 'wds' (clip_benchmark layout: ``test/0.tar`` with ``<key>.webp`` + ``<key>.cls``,
    ``test/nshards.txt``, ``zeroshot_classification_templates.txt``), 'parquet' (``eval.parquet``:
    image bytes, label, item_id). Always writes ``classnames.txt`` and ``evalset.json`` (the returned
    dict). Items: ``{item_id, label, classname}`` plus ``path`` (relative to out_dir) or ``key``.
    ``item_id`` is ``<class>/<k:04d>`` in every format. Deterministic for the arguments.
    """
    if fmt not in EVAL_FORMATS:
        raise ValueError(f"unknown eval set format {fmt!r}; use one of {EVAL_FORMATS}")
    if not 1 <= n_classes <= len(GLYPHS):
        raise ValueError(f"n_classes must be in [1, {len(GLYPHS)}], got {n_classes}")
    if per_class < 1:
        raise ValueError(f"per_class must be >= 1, got {per_class}")
    os.makedirs(out_dir, exist_ok=True)
    # Labels number the classes in the order of their folder names, sorted: what an ImageFolder reader
    # (torchvision's, ours) assigns, so classnames.txt, the labels and the folders agree in every format.
    # Each class keeps its glyph's drawing (render_eval_item takes the glyph's index).
    glyphs = list(GLYPHS)
    classnames = sorted(glyphs[:n_classes], key=_folder_name)
    items: list[dict[str, Any]] = []
    images: list[bytes] = []
    for label, cname in enumerate(classnames):
        for k in range(per_class):
            img = render_eval_item(glyphs.index(cname), k, seed=seed)
            item: dict[str, Any] = {"item_id": f"{_folder_name(cname)}/{k:04d}", "label": label, "classname": cname}
            if fmt == "wds":
                buf = io.BytesIO()
                img.save(buf, format="WEBP", quality=90, method=4)
                images.append(buf.getvalue())
                item["key"] = f"s{len(items):07d}"
            else:
                data = encode_jpeg(img)
                images.append(data)
                if fmt == "imagefolder":
                    item["path"] = f"{_folder_name(cname)}/{k:04d}.jpg"
                elif fmt == "folder":
                    item["path"] = f"{_folder_name(cname)}_{k:04d}.jpg"
                else:
                    item["key"] = f"s{len(items):07d}"
            items.append(item)

    if fmt in ("imagefolder", "folder"):
        for item, data in zip(items, images):
            atomic_write_bytes(os.path.join(out_dir, item["path"]), data)
        if fmt == "folder":
            lines = ["path,label,classname"] + [f"{it['path']},{it['label']},{it['classname']}" for it in items]
            atomic_write_bytes(os.path.join(out_dir, "labels.csv"), ("\n".join(lines) + "\n").encode())
    elif fmt == "wds":
        buf = io.BytesIO()
        with tarfile.open(fileobj=buf, mode="w", format=tarfile.USTAR_FORMAT) as tar:
            for item, data in zip(items, images):
                for ext, payload in (("webp", data), ("cls", str(item["label"]).encode())):
                    info = tarfile.TarInfo(f"{item['key']}.{ext}")
                    info.size, info.mtime, info.mode = len(payload), 0, 0o644
                    tar.addfile(info, io.BytesIO(payload))
        atomic_write_bytes(os.path.join(out_dir, "test", "0.tar"), buf.getvalue())
        atomic_write_bytes(os.path.join(out_dir, "test", "nshards.txt"), b"1\n")
        atomic_write_bytes(os.path.join(out_dir, "zeroshot_classification_templates.txt"),
                           ("\n".join(t.replace("{c}", "{c}") for t in ZEROSHOT_TEMPLATES) + "\n").encode())
    else:
        import pyarrow as pa
        import pyarrow.parquet as pq

        table = pa.table({
            "image": pa.array(images, type=pa.binary()),
            "label": pa.array([it["label"] for it in items], type=pa.int64()),
            "item_id": pa.array([it["item_id"] for it in items], type=pa.string()),
        })
        sink = io.BytesIO()
        pq.write_table(table, sink, **PARQUET_WRITE)
        atomic_write_bytes(os.path.join(out_dir, "eval.parquet"), sink.getvalue())

    atomic_write_bytes(os.path.join(out_dir, "classnames.txt"), ("\n".join(classnames) + "\n").encode())
    result = {"classnames": classnames, "items": items, "format": fmt, "seed": seed}
    write_json(os.path.join(out_dir, "evalset.json"), result)
    return result


def read_eval_image_bytes(evalset: dict[str, Any], evalset_dir: str, item: dict[str, Any]) -> bytes:
    """The stored bytes of one eval item, whatever the eval set's format."""
    if "path" in item:
        with open(os.path.join(evalset_dir, item["path"]), "rb") as f:
            return f.read()
    fmt = evalset.get("format")
    if fmt == "wds":
        with tarfile.open(os.path.join(evalset_dir, "test", "0.tar")) as tar:
            member = tar.extractfile(f"{item['key']}.webp")
            assert member is not None
            return member.read()
    if fmt == "parquet":
        import pyarrow.parquet as pq

        t = pq.read_table(os.path.join(evalset_dir, "eval.parquet"), **PARQUET_READ).to_pydict()
        return t["image"][t["item_id"].index(item["item_id"])]
    raise ValueError(f"eval item {item.get('item_id')!r} has neither path nor a key in a known format ({fmt!r})")


def _transform(img: Image.Image, transform: str, rng: np.random.Generator) -> Image.Image:
    w, h = img.size
    if transform == "resize":
        f = float(rng.choice([0.6, 0.75, 1.5]))
        return img.resize((max(8, int(w * f)), max(8, int(h * f))), Image.BICUBIC)
    if transform == "crop":
        f = float(rng.uniform(0.8, 0.9))
        cw, ch = int(w * f), int(h * f)
        x0, y0 = int(rng.integers(0, w - cw + 1)), int(rng.integers(0, h - ch + 1))
        return img.crop((x0, y0, x0 + cw, y0 + ch))
    if transform == "flip":
        return ImageOps.mirror(img)
    if transform == "colorshift":
        out = ImageEnhance.Brightness(img).enhance(float(rng.uniform(0.8, 1.2)))
        return ImageEnhance.Color(out).enhance(float(rng.uniform(0.6, 1.4)))
    if transform == "text":
        out = img.copy()
        d = ImageDraw.Draw(out)
        d.rectangle((0, h - 18, w, h), fill=(255, 255, 255))
        d.text((3, h - 16), "SALE 50% OFF", fill=(200, 0, 0))
        return out
    return img  # reencode: same pixels, new JPEG quality


def plant_copies(evalset: dict[str, Any], evalset_dir: str, image_dir: str,
                 transforms: Sequence[str] = PLANT_TRANSFORMS, per_transform: int = 1,
                 seed: int = 0) -> list[dict[str, Any]]:
    """Write transformed copies of eval images into `image_dir` as pool images.

    For each transform, `per_transform` distinct eval items are picked (seeded). 'exact' copies the
    stored bytes; 'reencode' re-saves at JPEG quality 60; the others change pixels (resize, crop
    80-90%, horizontal flip, brightness/saturation shift, a text banner) and save at quality 90.
    Returns items ``{id, file, caption, eval_item, transform, sha256}`` (ids from PLANT_ID_BASE),
    to be listed in the source like any pool item. Deterministic for the arguments.
    """
    from laiontools.core.storage import sha256_bytes

    unknown = [t for t in transforms if t not in PLANT_TRANSFORMS]
    if unknown:
        raise ValueError(f"unknown plant transform(s) {unknown}; known: {PLANT_TRANSFORMS}")
    eval_items = evalset["items"]
    if per_transform > len(eval_items):
        raise ValueError(f"per_transform={per_transform} exceeds the {len(eval_items)} eval items")
    rng = np.random.default_rng([int(seed) & 0xFFFFFFFF, 104729])
    os.makedirs(image_dir, exist_ok=True)
    out: list[dict[str, Any]] = []
    for transform in transforms:
        for idx in rng.choice(len(eval_items), size=per_transform, replace=False):
            item = eval_items[int(idx)]
            raw = read_eval_image_bytes(evalset, evalset_dir, item)
            if transform == "exact":
                data = raw
            else:
                img = Image.open(io.BytesIO(raw)).convert("RGB")
                data = encode_jpeg(_transform(img, transform, rng), quality=60 if transform == "reencode" else 90)
            pid = PLANT_ID_BASE + len(out)
            name = f"{pid:07d}.jpg"
            atomic_write_bytes(os.path.join(image_dir, name), data)
            cname = item.get("classname") or evalset["classnames"][item["label"]]
            out.append({
                "id": pid, "file": name, "caption": f"a picture of a {cname} ({transform})",
                "eval_item": item["item_id"], "transform": transform, "sha256": sha256_bytes(data),
            })
    return out


def load_evalset(evalset_dir: str) -> dict[str, Any]:
    """The dict write_evalset returned, read back from ``evalset.json``."""
    with open(os.path.join(evalset_dir, "evalset.json")) as f:
        return json.load(f)
