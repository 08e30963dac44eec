"""laiontools: LAION-scale image-text training sets with data scale as a controlled variable.

Stages (one module each): prepare, download, embed, dedup, subsets, reshard, train, evaluate, study.
Contracts between stages live in ``schemas/`` and are read through :mod:`laiontools.contracts.schema`.
"""

__version__ = "0.1.0"
