"""The seeded score behind every selection and shuffle (DESIGN.md "Scale presets").

Each uid gets ``blake2b(16 raw uid bytes, digest_size=8, key=seed as 8-byte big-endian, person=...)``
read as a big-endian uint64: stable across machines and Python versions (unlike ``hash()``). Subsets
takes the N lowest (score, uid) with ``person=b"laiontools-sub"``; reshard orders samples by the
same score with its own ``person``, so the two never correlate.
"""

from __future__ import annotations

import hashlib
import re
from typing import Any

import numpy as np

from laiontools.core.config import ConfigError

SELECTION_PERSON = b"laiontools-sub"
SEED_MAX = 2**63 - 1
HASH_SPEC = (
    "score = uint64 big-endian of blake2b(16 raw uid bytes, digest_size=8, key=seed as 8-byte big-endian, "
    "person=b'laiontools-sub'); subset of size N = the N lowest (score, uid)"
)


def parse_seed(text: str | int) -> int:
    """A seed is a whole number 0 <= seed <= 2**63-1; anything else raises ConfigError."""
    if isinstance(text, bool):
        raise ConfigError(f"seed {text!r} is not an integer; give a whole number such as --seed 0")
    if isinstance(text, int):
        value = text
    else:
        s = str(text).strip()
        if not re.fullmatch(r"[0-9]+", s):
            raise ConfigError(f"seed {text!r} is not a whole number; give e.g. --seed 0 (0 <= seed <= {SEED_MAX})")
        value = int(s)
    if not 0 <= value <= SEED_MAX:
        raise ConfigError(f"seed {value} is out of range; give 0 <= seed <= {SEED_MAX}")
    return value


def _seed_key(seed: int) -> bytes:
    return int(seed).to_bytes(8, "big")


def selection_scores(uids: Any, seed: int, person: bytes = SELECTION_PERSON) -> np.ndarray:
    """uint64 seeded score of each hex uid (see the module docstring for the exact definition)."""
    seq = list(uids)
    if not seq:
        return np.zeros(0, dtype=np.uint64)
    raw = bytes.fromhex("".join(seq))
    if len(raw) != 16 * len(seq):  # fromhex skips whitespace: scores of shifted bytes would be wrong silently
        raise ValueError(f"{len(seq)} uids hold {len(raw)} bytes, not 16 each: a uid is not 32 hex chars")
    key = _seed_key(seed)
    b2 = hashlib.blake2b
    digests = b"".join(b2(raw[i : i + 16], digest_size=8, key=key, person=person).digest() for i in range(0, len(raw), 16))
    return np.frombuffer(digests, dtype=">u8").astype(np.uint64)


def to_signed_order(u: np.ndarray) -> np.ndarray:
    """uint64 -> int64 with the same ordering (flip the top bit), since Spark longs are signed."""
    return (u ^ np.uint64(1 << 63)).view(np.int64)


def score_series(uids: Any, seed: int, person: bytes = SELECTION_PERSON) -> Any:
    """pandas Series of hex uids -> the Spark-sortable (signed) scores, same index: a pandas_udf body."""
    import pandas as pd

    return pd.Series(to_signed_order(selection_scores(uids, seed, person=person)), index=uids.index)


def reference_selection(uids: list[str], seed: int, n: int) -> list[str]:
    """The N selected uids computed in plain Python (for tests and audits): N lowest (score, uid)."""
    s = selection_scores(uids, seed)
    order = sorted(range(len(uids)), key=lambda i: (int(s[i]), uids[i]))
    return sorted(uids[i] for i in order[:n])
