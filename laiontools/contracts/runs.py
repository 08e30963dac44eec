"""Reading a training run folder (what `laiontools train` writes; names in :mod:`laiontools.contracts.layout`).

evaluate and study read finished runs through this module, not through the train stage.
"""

from __future__ import annotations

import os
from typing import Any

from laiontools.contracts import layout
from laiontools.core.errors import UserError
from laiontools.core.storage import is_done, read_json


class RunNotFinishedError(UserError, RuntimeError):
    """A training run folder holds no finished result (training still running, stopped, or never run)."""


def is_finished(run_dir: str) -> bool:
    """True when the run's completion marker exists (training reached its budget and was checked)."""
    return is_done(os.path.join(run_dir, layout.TRAIN_RESULT_JSON))


def read_result(run_dir: str) -> dict[str, Any]:
    """result.json of a finished run; raises RunNotFinishedError if the run is not finished."""
    if not is_finished(run_dir):
        raise RunNotFinishedError(
            f"{run_dir} is not a finished training run (no {layout.TRAIN_RESULT_JSON}.done); run or resume `laiontools train`"
        )
    return read_json(os.path.join(run_dir, layout.TRAIN_RESULT_JSON))
