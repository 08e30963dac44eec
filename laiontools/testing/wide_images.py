"""16-bit test images and their 8-bit twins (tests of the one rule for images wider than 8 bits)."""

from __future__ import annotations

import os

# name of a 16-bit image -> name of the 8-bit PNG of its high bytes
TWINS = {"grey16.png": "grey8.png", "colour16.png": "colour8.png", "grey16.tif": "grey8b.png"}


def wide_and_narrow(folder: str | None = None, seed: int = 3) -> dict[str, bytes]:
    """Encoded bytes of three 16-bit images (grey PNG, colour PNG, grey TIFF) and of their 8-bit twins
    (:data:`TWINS`), written to `folder` when given. The low bytes are random, so only the high-byte rule
    (``v >> 8``) maps a 16-bit image exactly onto its twin (``round(v / 257)`` would not)."""
    import cv2
    import numpy as np

    rng = np.random.default_rng(seed)
    hi = rng.integers(0, 256, (90, 120, 3), dtype=np.uint8)
    wide = (hi.astype(np.uint16) << 8) | rng.integers(0, 256, hi.shape, dtype=np.uint16)
    arrays = {"grey16.png": wide[..., 0], "grey8.png": hi[..., 0], "colour16.png": wide, "colour8.png": hi,
              "grey16.tif": wide[..., 1], "grey8b.png": hi[..., 1]}
    out = {}
    for name, a in arrays.items():
        out[name] = cv2.imencode(os.path.splitext(name)[1], np.ascontiguousarray(a))[1].tobytes()
        if folder is not None:
            with open(os.path.join(folder, name), "wb") as f:
                f.write(out[name])
    return out
