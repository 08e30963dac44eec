"""Sample identity: the 128-bit uid of a normalized (URL, caption) pair, and sorted uid files.

A uid is 32 lowercase hex chars. As DataComp does, a set of uids is stored as a sorted ``.npy`` of
dtype ``u8,u8`` (high, low 64 bits), so it can be memory-mapped and membership is a searchsorted.
"""

from __future__ import annotations

import hashlib
import re
import unicodedata
from collections.abc import Iterable
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import numpy as np

UID_DTYPE = np.dtype([("hi", "<u8"), ("lo", "<u8")])
_WS = re.compile(r"\s+")
_DEFAULT_PORTS = {"http": 80, "https": 443}


def normalize_url(url: str | None) -> str | None:
    """Strip whitespace, lowercase scheme and host, drop the default port and the fragment.

    Path and query are kept as written: servers may treat them case-sensitively. Returns None for
    None/empty input; never raises on odd strings (the policy step decides what to reject).
    """
    if url is None:
        return None
    url = str(url).strip()
    if not url:
        return None
    try:
        parts = urlsplit(url)
        scheme = parts.scheme.lower()
        netloc = parts.netloc
        host = (parts.hostname or "").lower()
        if host and scheme in _DEFAULT_PORTS:
            port = parts.port
            userinfo = netloc.rsplit("@", 1)[0] + "@" if "@" in netloc else ""
            h = f"[{host}]" if ":" in host else host
            netloc = userinfo + h + (f":{port}" if port and port != _DEFAULT_PORTS[scheme] else "")
        return urlunsplit((scheme, netloc, parts.path or ("/" if host else ""), parts.query, ""))
    except ValueError:  # e.g. an invalid port; keep the text so the policy can reject it with a reason
        return url


def normalize_caption(caption: str | None) -> str | None:
    """NFC-normalize, collapse whitespace runs to one space, strip. None stays None."""
    if caption is None:
        return None
    return _WS.sub(" ", unicodedata.normalize("NFC", str(caption))).strip()


def compute_uid(url: str | None, caption: str | None) -> str:
    """uid of an already-normalized (url, caption): first 128 bits of sha256, as 32 hex chars."""
    h = hashlib.sha256()
    h.update((url or "").encode("utf-8", "surrogatepass"))
    h.update(b"\x00")
    h.update((caption or "").encode("utf-8", "surrogatepass"))
    return h.hexdigest()[:32]


def uid_of(url: str | None, caption: str | None) -> str:
    """uid of a raw (url, caption): normalizes both first."""
    return compute_uid(normalize_url(url), normalize_caption(caption))


def uids_to_array(uids: Iterable[str]) -> np.ndarray:
    """Hex uids -> structured ``u8,u8`` array (unsorted, same order)."""
    uids = list(uids)
    arr = np.empty(len(uids), dtype=UID_DTYPE)
    for i, u in enumerate(uids):
        if len(u) != 32:
            raise ValueError(f"uid {u!r} at position {i} is not 32 hex chars")
        arr[i] = (int(u[:16], 16), int(u[16:], 16))
    return arr


def array_to_uids(arr: np.ndarray) -> list[str]:
    return [f"{int(hi):016x}{int(lo):016x}" for hi, lo in zip(arr["hi"], arr["lo"])]


def sort_unique(arr: np.ndarray) -> np.ndarray:
    return np.unique(arr.astype(UID_DTYPE, copy=False))


def _as_u128(arr: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    return arr["hi"], arr["lo"]


def contains(sorted_set: np.ndarray, query: np.ndarray) -> np.ndarray:
    """Boolean mask: which `query` uids are in the sorted, unique `sorted_set` (both UID_DTYPE)."""
    if len(sorted_set) == 0:
        return np.zeros(len(query), dtype=bool)
    idx = np.searchsorted(sorted_set, query)
    idx_clipped = np.minimum(idx, len(sorted_set) - 1)
    return (idx < len(sorted_set)) & (sorted_set[idx_clipped] == query)


def save_uids(path: str, uids: Iterable[str] | np.ndarray) -> tuple[str, int]:
    """Write a sorted, unique uid file atomically. Returns (sha256 of the file, count)."""
    from laiontools.core.storage import atomic_write_bytes, sha256_bytes

    arr = uids if isinstance(uids, np.ndarray) else uids_to_array(uids)
    arr = sort_unique(arr)
    import io

    buf = io.BytesIO()
    np.save(buf, arr, allow_pickle=False)
    data = buf.getvalue()
    atomic_write_bytes(path, data)
    return sha256_bytes(data), len(arr)


def load_uids(path: str, mmap: bool = True) -> np.ndarray:
    """Read a uid file written by save_uids (memory-mapped when local). Never unpickles."""
    import fsspec

    fs, p = fsspec.core.url_to_fs(path)
    from laiontools.core.storage import is_local

    if mmap and is_local(fs):
        arr = np.load(p, mmap_mode="r", allow_pickle=False)
    else:
        import io

        with fs.open(p, "rb") as f:
            arr = np.load(io.BytesIO(f.read()), allow_pickle=False)
    if arr.dtype != UID_DTYPE:
        raise ValueError(f"{path}: uid file has dtype {arr.dtype}, expected {UID_DTYPE} (u8,u8)")
    return arr


def _write_uid_partition(pid: int, rows: Any, tmp_dir: str) -> Any:
    from laiontools.core.storage import atomic_open

    uids = [r[0] for r in rows]
    arr = uids_to_array(uids)  # already sorted within the partition by Spark
    with atomic_open(f"{tmp_dir}/part-{pid:06d}.bin") as f:
        f.write(arr.tobytes())
    yield (pid, len(arr))


def save_uids_spark(df: Any, uid_col: str, path: str, num_partitions: int | None = None) -> tuple[str, int]:
    """Write the sorted, unique uids of a Spark DataFrame column as a uid file, without collecting them.

    Spark range-partitions and sorts; each task writes its sorted run as raw ``u8,u8`` bytes; the
    driver streams the runs, in partition order, behind one ``.npy`` header. Driver memory stays flat
    however many uids there are. Returns (sha256 of the file, count).
    """
    import hashlib
    import uuid as _uuid

    from laiontools.core.storage import atomic_open, url_to_fs

    tmp_dir = f"{path}.parts-{_uuid.uuid4().hex[:8]}"
    sorted_df = df.select(uid_col).where(f"`{uid_col}` IS NOT NULL").distinct()
    n = num_partitions or max(1, sorted_df.rdd.getNumPartitions())
    sorted_df = sorted_df.repartitionByRange(n, uid_col).sortWithinPartitions(uid_col)
    counts = dict(sorted_df.rdd.mapPartitionsWithIndex(lambda pid, it: _write_uid_partition(pid, it, tmp_dir)).collect())
    total = int(sum(counts.values()))
    header = io_header(total)
    h = hashlib.sha256()
    fs, tmp_p = url_to_fs(tmp_dir)
    try:
        with atomic_open(path) as out:
            out.write(header)
            h.update(header)
            for pid in sorted(counts):
                with fs.open(f"{tmp_p}/part-{pid:06d}.bin", "rb") as f:
                    while chunk := f.read(1 << 22):
                        out.write(chunk)
                        h.update(chunk)
    finally:
        if fs.exists(tmp_p):
            fs.rm(tmp_p, recursive=True)
    return h.hexdigest(), total


def io_header(count: int) -> bytes:
    """The .npy header of a 1-D UID_DTYPE array of `count` items (what np.save would write)."""
    import io

    from numpy.lib import format as npformat

    buf = io.BytesIO()
    npformat.write_array_header_1_0(
        buf, {"descr": npformat.dtype_to_descr(UID_DTYPE), "fortran_order": False, "shape": (count,)}
    )
    return buf.getvalue()
