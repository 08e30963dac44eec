"""Named pause points for fault-injection tests.

Some phases of a stage are too short to be hit by a test that watches the output folder and kills
the process group (train's final write is a `torch.save` of a small model and a JSON file: a few
milliseconds). A kill test that only polls would then pass or fail by luck of the scheduler. A
failpoint widens such a window on request, so that the test kills inside it every time, with the
real code on both sides of it.

    LAIONTOOLS_FAILPOINTS="train.final-write=5,reshard.before-manifest=2"

makes ``pause("train.final-write")`` sleep 5 seconds. Unset (every user's case) it costs one
environment lookup. Names are ``<stage>.<phase>``; each call site documents its phase.
"""

from __future__ import annotations

import logging
import os
import time

ENV = "LAIONTOOLS_FAILPOINTS"

log = logging.getLogger(__name__)


def _parse(spec: str) -> dict[str, float]:
    """``"a=1,b=2.5"`` → ``{"a": 1.0, "b": 2.5}``; a malformed entry is an error naming it."""
    out: dict[str, float] = {}
    for part in filter(None, (p.strip() for p in spec.split(","))):
        name, sep, value = part.partition("=")
        name = name.strip()  # "a = 1" names "a": a point never matched would pause nothing, silently
        try:
            seconds = float(value) if sep else float("nan")
        except ValueError:
            seconds = float("nan")
        if not name or not 0 <= seconds < float("inf"):
            raise ValueError(f"{ENV}: {part!r} is not <name>=<seconds ≥ 0>")
        out[name] = seconds
    return out


def pause(name: str) -> float:
    """Sleep as long as `name` is given in ``$LAIONTOOLS_FAILPOINTS`` (0 when unset); returns the seconds."""
    spec = os.environ.get(ENV)
    if not spec:
        return 0.0
    seconds = _parse(spec).get(name, 0.0)
    if seconds:
        log.warning("failpoint %s: pausing %.1f s (%s is set)", name, seconds, ENV)
        time.sleep(seconds)
    return seconds
