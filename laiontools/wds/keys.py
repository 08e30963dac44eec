"""The webdataset key rule and the one function that groups tar members into samples.

A webdataset sample is the run of tar members that share a key: ``000123.jpg``, ``000123.txt``,
``000123.json`` are the ``jpg``, ``txt`` and ``json`` parts of sample ``000123``. webdataset states
the rule once (``webdataset.tariterators.base_plus_ext``: the key is the path up to the first dot of
the base name, folders kept; the extension is everything after that dot) and feeds it to one
grouping function (``group_by_keys(keys=base_plus_ext, lcase=True, suffixes=None)``). Every reader
of tars in laiontools (tarscan's span index, embed, evalsets, dedup, the dedup gallery, verify,
reshard) splits names and groups members through this module, so a tar means the same samples to
all of them, and to webdataset / open_clip when they train on it.

The ways readers differ are options of :func:`group_by_keys`, not copies of it: whether extensions
are lower-cased (readers that look parts up by extension do; reshard, which copies members under
their own names, does not), which extensions are kept, whether a key's members must be adjacent
(webdataset's streaming rule) or are gathered from anywhere in the tar, and what a repeated member
does.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable, Iterator
from typing import Any, Literal, TypeVar

V = TypeVar("V")

# webdataset's regex, verbatim: (folders + base name up to its first dot) . (the rest, no slash).
KEY_PATTERN = r"^((?:.*/|)[^.]+)[.]([^/]*)$"
_KEY_RE = re.compile(KEY_PATTERN)

KeyRule = Callable[[str], "tuple[str, str] | tuple[None, None]"]


class DuplicateMemberError(ValueError):
    """A sample holds the same extension twice (two ``000123.jpg`` in one sample)."""


def base_plus_ext(path: str) -> tuple[str, str] | tuple[None, None]:
    """(key, extension) of a tar member name by webdataset's rule, or (None, None) for a name that
    has no extension (webdataset skips such members).

    ``"000123.jpg"`` -> ``("000123", "jpg")``; ``"dir/000123.seg.png"`` -> ``("dir/000123", "seg.png")``;
    ``"README"`` -> ``(None, None)``. The extension keeps its case (see ``lcase`` of :func:`group_by_keys`).
    """
    m = _KEY_RE.match(path)
    if not m:
        return None, None
    return m.group(1), m.group(2)


def is_hidden(path: str) -> bool:
    """True for a member whose base name starts with a dot (``._000123.jpg`` resource forks that
    macOS tar adds; ``.DS_Store``). webdataset's rule gives them odd keys; readers skip them."""
    return path.rpartition("/")[2].startswith(".")


def group_by_keys(
    members: Iterable[tuple[str, V]],
    *,
    keys: KeyRule = base_plus_ext,
    lcase: bool = True,
    suffixes: Iterable[str] | None = None,
    adjacent: bool = True,
    skip_hidden: bool = True,
    on_duplicate: Literal["error", "last"] | Callable[[str], object] = "error",
) -> Iterator[tuple[str, dict[str, V]]]:
    """Group ``(member name, value)`` pairs, in tar order, into ``(key, {extension: value})`` samples.

    The value is whatever the caller carries per member (its bytes, or an (offset, size) index entry).

    - `keys`: the name -> (key, extension) rule; members for which it gives None are skipped.
    - `lcase`: lower-case extensions (``JPG`` -> ``jpg``), as webdataset does by default.
    - `suffixes`: keep only these extensions (compared after `lcase`); a sample whose members are all
      dropped is still yielded, with no parts, so callers can see that it exists.
    - `adjacent`: True (webdataset's streaming rule) starts a new sample whenever the key changes, so
      a key that comes back later in the tar is a second sample with the same key; False gathers
      every member of a key into one sample, in order of each key's first member.
    - `skip_hidden`: leave out members whose base name starts with a dot (:func:`is_hidden`).
    - `on_duplicate`: a sample that gets the same extension twice raises :class:`DuplicateMemberError`
      ("error", webdataset's behaviour) or keeps the last value ("last"; a callable: called with the
      repeated member's name, then the last value is kept). Extensions left out by `suffixes` are not seen.
    """
    keep = None if suffixes is None else set(suffixes)
    if adjacent:
        cur_key: str | None = None
        cur: dict[str, V] = {}
        for name, value in members:
            key, ext = _split(name, keys, lcase, skip_hidden)
            if key is None:
                continue
            if key != cur_key:
                if cur_key is not None:
                    yield cur_key, cur
                cur_key, cur = key, {}
            _put(cur, name, ext, value, keep, on_duplicate)
        if cur_key is not None:
            yield cur_key, cur
        return
    gathered: dict[str, dict[str, V]] = {}
    for name, value in members:
        key, ext = _split(name, keys, lcase, skip_hidden)
        if key is None:
            continue
        _put(gathered.setdefault(key, {}), name, ext, value, keep, on_duplicate)
    yield from gathered.items()


def _split(name: str, keys: KeyRule, lcase: bool, skip_hidden: bool) -> tuple[str, str] | tuple[None, None]:
    if skip_hidden and is_hidden(name):
        return None, None
    key, ext = keys(name)
    if key is None or ext is None:
        return None, None
    return key, (ext.lower() if lcase else ext)


def _put(sample: dict[str, V], name: str, ext: str, value: V, keep: set[str] | None, on_duplicate: Any) -> None:
    if keep is not None and ext not in keep:
        return
    if ext in sample:
        if on_duplicate == "error":
            raise DuplicateMemberError(f"{name}: a second .{ext} member in one sample (members so far: {sorted(sample)})")
        if callable(on_duplicate):
            on_duplicate(name)
    sample[ext] = value
