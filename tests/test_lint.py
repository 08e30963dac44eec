"""`make lint` is part of the suite: ruff, at the version the test extra pins, finds nothing in the tree."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


def _pinned() -> str:
    m = re.search(r'"ruff==([0-9.]+)"', (REPO / "pyproject.toml").read_text())
    assert m, "pyproject.toml's test extra no longer pins ruff (its default rules change between versions)"
    return m.group(1)


def test_ruff_finds_nothing_at_the_pinned_version():
    pytest.importorskip("ruff", reason="ruff comes with the test extra (pip install -e '.[test]')")
    from importlib.metadata import version

    assert version("ruff") == _pinned(), f"ruff {version('ruff')} installed, the test extra pins {_pinned()}: reinstall it"
    res = subprocess.run([sys.executable, "-m", "ruff", "check", "--no-cache", "laiontools", "jobs", "tests", "bench"],
                         cwd=REPO, capture_output=True, text=True, timeout=300, check=False)
    assert res.returncode == 0, res.stdout[-6000:] + res.stderr[-2000:]
