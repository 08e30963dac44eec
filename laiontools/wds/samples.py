"""Samples of a webdataset tar: the tar scanner's members grouped by the one key rule.

Every stage that reads samples out of a tar (embed, dedup, the dedup gallery, the evaluation-set
reader, verify) goes through :func:`iter_samples`: members come from :mod:`laiontools.wds.tarscan`
(headers read directly, tarfile as the fallback, a damaged header an error rather than a silent
stop) and are grouped by :func:`laiontools.wds.keys.group_by_keys`, whose options are passed through.

A member over the byte limit (``max_member_bytes``, default
:data:`laiontools.core.images.MAX_FILE_BYTES`) is not held in memory: it comes out as an
:class:`laiontools.core.images.OversizeMember`, an empty stand-in whose ``reason`` the image decoders
raise, so it lands as a per-sample error (a 2 MB gzip tar can hold a 2 GiB member); its bytes are
streamed through sha256 and md5 as they pass, so hash entries (takedown, removal proofs) still meet it.
"""

from __future__ import annotations

import io
import lzma
import tarfile
import zlib
from collections.abc import Iterator
from typing import Any, BinaryIO

from laiontools.core.images import MAX_FILE_BYTES, OversizeMember
from laiontools.wds.keys import group_by_keys
from laiontools.wds.tarscan import tar_index, tar_payloads

# Magic numbers of the compressions tarfile's "r|*" opens; such tars are streamed through tarfile
# (the header scanner reads uncompressed tars only).
_COMPRESSED_MAGIC = (b"\x1f\x8b", b"BZh", b"\xfd7zXZ\x00")


# The image members of a pool sample (what download writes and embed, train, dedup's pHash, reshard,
# verify and takedown read), as extensions compared lower-cased.
POOL_IMAGE_EXTS = ("jpg", "jpeg", "png", "webp")


def meta_key(key: str) -> str:
    """The key embed stores for a sample in its meta (and dedup, the galleries look samples up by): the
    webdataset key's last path part, so ``sub/0000007`` (a member ``sub/0000007.jpg``) is ``0000007``."""
    return key.rpartition("/")[2]


def iter_members(f: BinaryIO, file_size: int, max_member_bytes: int | None = MAX_FILE_BYTES) -> Iterator[tuple[str, bytes]]:
    """(name, payload) of the regular files of a tar file, in tar order, one member in memory at a time.

    Uncompressed tars: the header index of :func:`laiontools.wds.tarscan.tar_index`, then one read per
    member. gzip / bzip2 / xz tars: tarfile's streaming reader. Raises ``tarfile.TarError`` for a damaged,
    truncated or non-tar file (also when a member's data is cut short). A member over `max_member_bytes`
    (None: no limit) is not held: its bytes are streamed through sha256 and md5, and it is yielded as an
    :class:`OversizeMember`.
    """
    f.seek(0)
    head = f.read(6)
    if head.startswith(_COMPRESSED_MAGIC):
        f.seek(0)
        try:
            with tarfile.open(fileobj=f, mode="r|*") as tf:
                yield from tarfile_members(tf, max_member_bytes)
        except (EOFError, OSError, OverflowError, zlib.error, lzma.LZMAError) as e:  # a cut or damaged compressed stream
            # (OverflowError: a header's base-256 size past 2**63, which tarfile reads by)
            raise tarfile.ReadError(f"compressed tar is truncated or damaged ({type(e).__name__}: {e})") from e
        return
    for name, off, size, _ in tar_index(f, file_size):
        if max_member_bytes is not None and size > max_member_bytes:
            f.seek(off)
            yield name, OversizeMember(name, size, max_member_bytes, f)
            continue
        f.seek(off)
        data = f.read(size)
        if len(data) != size:
            raise tarfile.ReadError(f"member {name} is cut short ({len(data)} of {size} bytes at offset {off})")
        yield name, data


def tarfile_members(tf: tarfile.TarFile, max_member_bytes: int | None = MAX_FILE_BYTES) -> Iterator[tuple[str, bytes]]:
    """(name, payload) of the regular files of an open ``tarfile.TarFile`` (stream modes included), in
    order. Raises ``tarfile.ReadError`` when a member's data is cut short (tarfile returns it short).
    A member over `max_member_bytes` (None: no limit) is not held (its bytes are streamed through sha256
    and md5) and is yielded as an :class:`OversizeMember`."""
    for m in tf:
        if m.size < 0:  # a pax size of "-1000", which tarfile takes as it is
            raise tarfile.ReadError(f"member {m.name}: negative size {m.size}")
        if not m.isfile():
            continue
        if max_member_bytes is not None and m.size > max_member_bytes:
            yield m.name, OversizeMember(m.name, m.size, max_member_bytes, tf.extractfile(m))  # hashed, never held
            continue
        fh = tf.extractfile(m)
        data = fh.read() if fh is not None else b""
        if len(data) != m.size:
            raise tarfile.ReadError(f"member {m.name} is cut short ({len(data)} of {m.size} bytes)")
        yield m.name, data


def iter_samples(src: bytes | BinaryIO, file_size: int | None = None, max_member_bytes: int | None = MAX_FILE_BYTES,
                 **group: Any) -> Iterator[tuple[str, dict[str, bytes]]]:
    """``(key, {extension: payload})`` of every sample of a tar, in tar order.

    `src`: the whole tar in memory (bytes), or a seekable binary file with its `file_size`. `group`:
    options of :func:`laiontools.wds.keys.group_by_keys` (``lcase``, ``suffixes``, ``adjacent``,
    ``skip_hidden``, ``on_duplicate``); the defaults are webdataset's. Raises ``tarfile.TarError``
    for a tar that cannot be read and :class:`laiontools.wds.keys.DuplicateMemberError` for a repeated
    member when ``on_duplicate="error"``.
    """
    if isinstance(src, (bytes, bytearray, memoryview)):
        data = bytes(src)
        if data.startswith(_COMPRESSED_MAGIC):
            members: Any = iter_members(io.BytesIO(data), len(data), max_member_bytes)
        else:  # already in memory: the limit still applies, so every reader judges a member alike
            members = ((n, OversizeMember(n, len(d), max_member_bytes, io.BytesIO(d))
                        if max_member_bytes is not None and len(d) > max_member_bytes else d)
                       for n, d in tar_payloads(data))
    else:
        if file_size is None:
            raise TypeError("iter_samples: give file_size with a file object")
        members = iter_members(src, file_size, max_member_bytes)
    yield from group_by_keys(members, **group)


def sample_index(f: BinaryIO, file_size: int, **group: Any) -> list[tuple[str, dict[str, tuple[int, int, str]]]]:
    """``(key, {extension: (data offset, size, member name)})`` of every sample of an uncompressed tar file,
    in tar order, from its headers alone: :func:`iter_samples`'s samples, their payloads left in the file
    (read them with :func:`read_parts`). `group`: as :func:`iter_samples`. Raises ``tarfile.TarError`` for
    a tar that cannot be read, a compressed one included (it has no offsets to index)."""
    f.seek(0)
    if f.read(6).startswith(_COMPRESSED_MAGIC):
        raise tarfile.ReadError("a compressed tar has no member offsets to index")
    members = tar_index(f, file_size)
    for name, off, size, _ in members:  # the scanner checks this; tarfile's fallback does not
        if off + size > file_size:
            raise tarfile.ReadError(f"member {name} is cut short ({size} bytes at offset {off}, of {file_size})")
    return list(group_by_keys(((name, (off, size, name)) for name, off, size, _ in members), **group))


def read_parts(f: BinaryIO, parts: dict[str, tuple[int, int, str]],
               max_member_bytes: int | None = MAX_FILE_BYTES) -> dict[str, bytes]:
    """The payloads of one sample of :func:`sample_index` read from `f`, as :func:`iter_samples` gives them
    (a member over `max_member_bytes` as an :class:`OversizeMember`, hashed as it is read, never held).
    Raises ``tarfile.ReadError`` when the file is shorter than its index."""
    out: dict[str, bytes] = {}
    for ext, (off, size, name) in parts.items():
        f.seek(off)
        if max_member_bytes is not None and size > max_member_bytes:
            out[ext] = OversizeMember(name, size, max_member_bytes, f)
            continue
        data = f.read(size)
        if len(data) != size:
            raise tarfile.ReadError(f"member {name} is cut short ({len(data)} of {size} bytes at offset {off})")
        out[ext] = data
    return out


def compressed_tar_problem(head: bytes) -> str | None:
    """Why a pool shard whose first bytes are `head` cannot be a pool shard, or None.

    A pool shard (download's output, what verify, embed and reshard read) is a plain tar: reshard
    copies members by their byte offsets and verify checks the end-of-archive marker, neither of which
    exists inside a compressed stream. A gzip / bzip2 / xz tar under a ``.tar`` name is whole, not
    damaged, so it gets this reason instead of "truncated or unreadable" (and "re-download it").
    The evaluation-set reader still opens compressed tars (:func:`iter_members`)."""
    for magic, name in zip(_COMPRESSED_MAGIC, ("gzip", "bzip2", "xz")):
        if head.startswith(magic):
            return f"is a {name}-compressed tar; webdataset pool shards must be plain tars (decompress it)"
    return None
