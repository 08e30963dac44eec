"""The optional compiled module (laiontools/wds/tarfast.c): reshard's per-sample parsing and packing.

`native` is the module, or None when it was not built (no C compiler at install) or when
``LAIONTOOLS_PURE_PYTHON=1`` turns it off (to compare, or to rule it out). Either way the output is
the same bytes: the compiled functions take only the plain form of their input and hand everything
else to the Python code they shadow, which stays the definition (tests/test_tarfast.py compares both).
"""

from __future__ import annotations

import os
from types import ModuleType

PURE_PYTHON_ENV = "LAIONTOOLS_PURE_PYTHON"


def _load() -> ModuleType | None:
    if os.environ.get(PURE_PYTHON_ENV, "") not in ("", "0"):
        return None
    try:
        from laiontools.wds import tarfast
    except ImportError:
        return None
    return tarfast


native = _load()
