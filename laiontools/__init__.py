"""laiontools: LAION-scale image-text training sets with data scale as a controlled variable.

Stages (one module each): prepare, download, embed, dedup, subsets, reshard, train, evaluate, study.
Contracts between stages live in ``schemas/`` and are read through :mod:`laiontools.contracts.schema`.
"""

__version__ = "0.1.0"

import os as _os

if _os.environ.get("LAIONTOOLS_DRIVER_CODE"):  # a Spark executor's Python worker: the driver's code, or none of it
    from laiontools.core.fingerprint import refuse_other_driver_code as _refuse

    _refuse(_os.environ["LAIONTOOLS_DRIVER_CODE"])
