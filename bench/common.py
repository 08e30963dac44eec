"""What every bench script does at its end: write its figures as JSON into --out and print them."""

from __future__ import annotations

import json
import os
from typing import Any


def write_figures(out_dir: str, name: str, figures: dict[str, Any]) -> int:
    """Write `figures` to ``<out_dir>/<name>`` (indented JSON), print them; returns 0 (the exit code)."""
    os.makedirs(out_dir, exist_ok=True)
    with open(os.path.join(out_dir, name), "w") as f:
        json.dump(figures, f, indent=2)
    print(json.dumps(figures, indent=2))
    return 0
