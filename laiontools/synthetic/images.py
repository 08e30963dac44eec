"""Deterministic synthetic pool images with captions that describe them.

Each item ``i`` is drawn from its own random generator seeded by ``(seed, i, realistic)``, so an
item never depends on which other items were drawn, and the same arguments give byte-identical
JPEGs (PIL's encoder is deterministic for equal pixels and settings).
"""

from __future__ import annotations

import math
import os
from typing import Any

import numpy as np
from PIL import Image, ImageDraw, ImageFilter

JPEG_QUALITY = 90

# Colour names a caption can use, with an RGB that a person would call by that name.
COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (210, 40, 40),
    "green": (40, 160, 60),
    "blue": (40, 80, 210),
    "yellow": (235, 210, 40),
    "orange": (240, 140, 30),
    "purple": (130, 50, 170),
    "pink": (240, 130, 180),
    "brown": (120, 75, 40),
    "black": (20, 20, 20),
    "white": (245, 245, 245),
    "grey": (130, 130, 130),
    "cyan": (40, 200, 210),
}
SHAPES = ("circle", "square", "triangle", "star", "stripes", "diamond", "hexagon", "ellipse")
TEXTURES = ("plain", "noise", "gradient", "checker")
WORDS = (
    "apple", "river", "cloud", "tiger", "piano", "rocket", "garden", "silver", "coffee", "winter",
    "ocean", "forest", "candle", "desert", "violin", "marble", "sunset", "planet", "lemon", "harbor",
)
TEXTURE_PHRASES = {
    "plain": "a plain {bg} background",
    "noise": "a noisy {bg} background",
    "gradient": "a {bg} gradient background",
    "checker": "a {bg} checkered background",
}
_CAPTION_TEMPLATES = (
    "a {size} {colour} {shape} on {texture}",
    "{colour} {shape} drawn on {texture}, with the word \"{word}\"",
    "photo of a {colour} {shape} and the text {word} on {texture}",
    "the word \"{word}\" next to a {size} {colour} {shape}, {texture}",
    "illustration: {colour} {shape}, {texture}",
)


def _rng(seed: int, i: int, realistic: bool, salt: int = 0) -> np.random.Generator:
    return np.random.default_rng([int(seed) & 0xFFFFFFFF, int(i), int(realistic), salt])


_NOISE_SIDE = 1024
_noise_tile: np.ndarray | None = None


def _noise(rng: np.random.Generator, h: int, w: int) -> np.ndarray:
    """(h, w, 3) float32 standard-normal noise: a window of one fixed tile at a seeded offset.

    Drawing fresh normals for every 800x800 image dominated render time; a window of a fixed tile
    is just as deterministic and looks the same to a decoder or a model.
    """
    global _noise_tile
    if _noise_tile is None:
        _noise_tile = np.random.default_rng(20230101).standard_normal((_NOISE_SIDE, _NOISE_SIDE, 3), dtype=np.float32)
    y0 = int(rng.integers(0, _NOISE_SIDE - h + 1))
    x0 = int(rng.integers(0, _NOISE_SIDE - w + 1))
    return _noise_tile[y0:y0 + h, x0:x0 + w]


def _texture(rng: np.random.Generator, kind: str, w: int, h: int, bg: tuple[int, int, int]) -> np.ndarray:
    """A (h, w, 3) uint8 background of the given texture kind around colour `bg`."""
    bgv = np.asarray(bg, dtype=np.float32)
    if kind == "noise":
        base = bgv + _noise(rng, h, w) * np.float32(28.0)
    elif kind == "gradient":
        other = np.asarray(rng.integers(0, 256, size=3), dtype=np.float32)
        angle = rng.uniform(0, 2 * math.pi)
        t = (np.arange(w, dtype=np.float32)[None, :] * np.float32(math.cos(angle))
             + np.arange(h, dtype=np.float32)[:, None] * np.float32(math.sin(angle)))
        t = (t - t.min()) / max(float(t.max() - t.min()), 1.0)
        base = bgv + (other - bgv) * t[..., None]
    elif kind == "checker":
        cell = int(rng.integers(max(4, min(w, h) // 16), max(6, min(w, h) // 5)))
        mask = ((np.arange(h)[:, None] // cell + np.arange(w)[None, :] // cell) % 2).astype(bool)
        base = np.empty((h, w, 3), dtype=np.float32)
        base[:] = bgv
        base[mask] = np.clip(bgv * 0.55 + 40, 0, 255)
    else:
        base = np.broadcast_to(bgv, (h, w, 3))
    return np.clip(base, 0, 255).astype(np.uint8)


def _star(cx: float, cy: float, r: float, points: int = 5, rot: float = 0.0) -> list[tuple[float, float]]:
    out = []
    for k in range(points * 2):
        rr = r if k % 2 == 0 else r * 0.45
        a = rot + math.pi * k / points - math.pi / 2
        out.append((cx + rr * math.cos(a), cy + rr * math.sin(a)))
    return out


def _regular(cx: float, cy: float, r: float, n: int, rot: float = 0.0) -> list[tuple[float, float]]:
    return [(cx + r * math.cos(rot + 2 * math.pi * k / n), cy + r * math.sin(rot + 2 * math.pi * k / n)) for k in range(n)]


def draw_shape(draw: ImageDraw.ImageDraw, shape: str, cx: float, cy: float, r: float,
               fill: tuple[int, int, int], rng: np.random.Generator) -> None:
    """Draw one pool shape of radius `r` centred at (cx, cy)."""
    rot = float(rng.uniform(0, 2 * math.pi))
    if shape == "circle":
        draw.ellipse((cx - r, cy - r, cx + r, cy + r), fill=fill)
    elif shape == "square":
        draw.polygon(_regular(cx, cy, r * 1.2, 4, rot), fill=fill)
    elif shape == "triangle":
        draw.polygon(_regular(cx, cy, r * 1.2, 3, rot), fill=fill)
    elif shape == "star":
        draw.polygon(_star(cx, cy, r * 1.3, 5, rot), fill=fill)
    elif shape == "diamond":
        draw.polygon([(cx, cy - r * 1.3), (cx + r * 0.8, cy), (cx, cy + r * 1.3), (cx - r * 0.8, cy)], fill=fill)
    elif shape == "hexagon":
        draw.polygon(_regular(cx, cy, r * 1.1, 6, rot), fill=fill)
    elif shape == "ellipse":
        draw.ellipse((cx - r * 1.4, cy - r * 0.7, cx + r * 1.4, cy + r * 0.7), fill=fill)
    elif shape == "stripes":
        width = max(2, int(r / 3))
        for k in range(-3, 4):
            x = cx + k * width * 2
            draw.rectangle((x - width / 2, cy - r, x + width / 2, cy + r), fill=fill)
    else:  # pragma: no cover - SHAPES is closed
        raise ValueError(f"unknown shape {shape!r}")


def _contrasting(rng: np.random.Generator, avoid: str) -> str:
    names = [c for c in COLOURS if c != avoid]
    return names[int(rng.integers(len(names)))]


def render_item(i: int, seed: int = 0, realistic: bool = False) -> tuple[Image.Image, str, dict[str, Any]]:
    """Deterministic image, a caption that describes it, and its attributes.

    Small mode: 96-160 px, one shape of a named colour on a textured background, plus a rendered
    word. ``realistic=True``: 512-800 px photo-like images (smooth gradient, sensor noise, many
    blurred shapes, the main shape and word on top) that weigh ~40-120 KB as JPEG at quality 90, for
    benchmarks. attrs: shape, colour, background, texture, word, size, width, height, realistic.
    """
    rng = _rng(seed, i, realistic)
    shape = SHAPES[int(rng.integers(len(SHAPES)))]
    colour = list(COLOURS)[int(rng.integers(len(COLOURS)))]
    background = _contrasting(rng, colour)
    texture = TEXTURES[int(rng.integers(len(TEXTURES)))]
    word = WORDS[int(rng.integers(len(WORDS)))]
    if realistic:
        w, h = (int(v) for v in rng.integers(512, 801, size=2))
    else:
        w, h = (int(v) for v in rng.integers(96, 161, size=2))
    size_frac = float(rng.uniform(0.15, 0.38))
    size = "small" if size_frac < 0.22 else ("large" if size_frac > 0.31 else "medium")

    if realistic:
        # Photo-like: a gradient "sky", many soft background objects, then noise like a sensor's.
        arr = _texture(rng, "gradient", w, h, COLOURS[background])
        img = Image.fromarray(arr)
        draw = ImageDraw.Draw(img)
        for _ in range(int(rng.integers(25, 60))):
            c = tuple(int(v) for v in rng.integers(0, 256, size=3))
            s = SHAPES[int(rng.integers(len(SHAPES)))]
            draw_shape(draw, s, float(rng.uniform(0, w)), float(rng.uniform(0, h)),
                       float(rng.uniform(8, min(w, h) / 6)), c, rng)  # type: ignore[arg-type]
        img = img.filter(ImageFilter.GaussianBlur(radius=float(rng.uniform(1.0, 2.5))))
        if texture != "plain":
            over = _texture(rng, texture, w, h, COLOURS[background]).astype(np.float32)
            arr = np.asarray(img).astype(np.float32)
            img = Image.fromarray(np.clip(arr * np.float32(0.8) + over * np.float32(0.2), 0, 255).astype(np.uint8))
        draw = ImageDraw.Draw(img)
    else:
        img = Image.fromarray(_texture(rng, texture, w, h, COLOURS[background]))
        draw = ImageDraw.Draw(img)

    r = size_frac * min(w, h)
    cx = float(rng.uniform(r, w - r))
    cy = float(rng.uniform(r, h - r))
    draw_shape(draw, shape, cx, cy, r, COLOURS[colour], rng)
    text_colour = COLOURS[_contrasting(rng, background)]
    font_size = max(10, min(w, h) // (10 if realistic else 8))
    try:
        from PIL import ImageFont

        font = ImageFont.load_default(size=font_size)
    except TypeError:  # Pillow < 10.1 has no sized default font
        from PIL import ImageFont

        font = ImageFont.load_default()
    tx = float(rng.uniform(2, max(3, w * 0.4)))
    ty = float(rng.uniform(2, max(3, h - font_size - 2)))
    draw.text((tx, ty), word, fill=text_colour, font=font)

    if realistic:
        arr = np.asarray(img).astype(np.float32)
        arr += _noise(rng, h, w) * np.float32(3.0)
        img = Image.fromarray(np.clip(arr, 0, 255).astype(np.uint8))

    attrs = {
        "shape": shape, "colour": colour, "background": background, "texture": texture, "word": word,
        "size": size, "width": w, "height": h, "realistic": bool(realistic),
    }
    template = _CAPTION_TEMPLATES[int(rng.integers(len(_CAPTION_TEMPLATES)))]
    caption = template.format(
        size=size, colour=colour, shape=shape, word=word,
        texture=TEXTURE_PHRASES[texture].format(bg=background),
    )
    return img, caption, attrs


def encode_jpeg(img: Image.Image, quality: int = JPEG_QUALITY) -> bytes:
    """JPEG bytes of `img` (RGB), with fixed settings so equal pixels give equal bytes."""
    import io

    buf = io.BytesIO()
    img.convert("RGB").save(buf, format="JPEG", quality=quality, optimize=False)
    return buf.getvalue()


def image_file_name(i: int) -> str:
    return f"{int(i):07d}.jpg"


def _write_one(args: tuple[str, int, int, bool]) -> dict[str, Any]:
    image_dir, i, seed, realistic = args
    from laiontools.core.storage import atomic_write_bytes, sha256_bytes

    img, caption, attrs = render_item(i, seed=seed, realistic=realistic)
    data = encode_jpeg(img)
    name = image_file_name(i)
    atomic_write_bytes(os.path.join(image_dir, name), data)
    return {"id": int(i), "file": name, "caption": caption, "bytes": len(data), "sha256": sha256_bytes(data), **attrs}


def write_images(image_dir: str, n: int, seed: int = 0, realistic: bool = False, start: int = 0,
                 processes: int = 1) -> list[dict[str, Any]]:
    """Write ``<image_dir>/<i:07d>.jpg`` for i in [start, start+n); return one item dict per image.

    Items: ``{id, file, caption, bytes, sha256, shape, colour, background, texture, word, size,
    width, height, realistic}``, in id order. Deterministic for (n, seed, realistic, start); files
    are written atomically, so a reader (the web server) never sees half an image. ``processes > 1``
    renders in a process pool (worth it only for many realistic images).
    """
    if n < 0:
        raise ValueError(f"n must be >= 0, got {n}")
    os.makedirs(image_dir, exist_ok=True)
    jobs = [(image_dir, i, seed, realistic) for i in range(start, start + n)]
    if processes > 1 and n > 32:
        import multiprocessing as mp

        with mp.get_context("spawn").Pool(processes) as pool:
            return list(pool.imap(_write_one, jobs, chunksize=16))
    return [_write_one(j) for j in jobs]
