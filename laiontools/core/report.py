"""Console output meant for a person (summaries, tables, paths written). Library code logs instead."""

from __future__ import annotations

import os
import sys


def emit(text: str) -> None:
    """Print a human-readable block on stdout, from rank 0 only."""
    if int(os.environ.get("RANK", "0")) == 0:
        print(text, file=sys.stdout, flush=True)


def table(rows: list[dict], columns: list[str] | None = None) -> str:
    """Render rows as a fixed-width text table."""
    if not rows:
        return "(empty)"
    columns = columns or list(rows[0])
    cells = [[str(r.get(c, "")) for c in columns] for r in rows]
    widths = [max(len(c), *(len(row[i]) for row in cells)) for i, c in enumerate(columns)]
    head = "  ".join(c.ljust(w) for c, w in zip(columns, widths))
    sep = "  ".join("-" * w for w in widths)
    body = ["  ".join(v.ljust(w) for v, w in zip(row, widths)) for row in cells]
    return "\n".join([head, sep, *body])
