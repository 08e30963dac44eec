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
        diverged = read_divergence(run_dir)
        if diverged is not None:  # "resume it" would only say the same again
            raise RunNotFinishedError(f"{run_dir} is a training run that diverged ({diverged.get('reason')}; "
                                      f"{layout.TRAIN_DIVERGED_JSON}): it has no model to read or evaluate")
        raise RunNotFinishedError(
            f"{run_dir} is not a finished training run (no {layout.TRAIN_RESULT_JSON}.done); run or resume `laiontools train`"
        )
    return read_json(os.path.join(run_dir, layout.TRAIN_RESULT_JSON))


def read_divergence(run_dir: str) -> dict[str, Any] | None:
    """The record of a run whose loss turned non-finite (it stopped there: ``stopped_at_step``), or that reached its
    budget with non-finite weights (``diverged.json``: ``reason``, ``first_nonfinite_step``, ``final_loss`` as text,
    ``steps``, ``samples_seen``, ``stopped_at_step``: None for the latter), or None when it did not diverge.
    Such a run has no model file and is not trained again (train raises TrainDiverged from this record)."""
    path = os.path.join(run_dir, layout.TRAIN_DIVERGED_JSON)
    return read_json(path) if os.path.exists(path) else None
