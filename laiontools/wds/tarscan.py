"""Direct parsing of tar headers: plain ustar/GNU, and the per-file pax headers that Python's tarfile
(so webdataset and img2dataset) writes before every member.

Python's tarfile spends ~0.1 ms of interpreter time per member header, which is more than decoding a
small JPEG (embed) and most of the time of indexing a pool's tars (reshard). These functions read the
same fields straight from the 512-byte header blocks. They handle regular files and directories with
octal numbers and valid checksums, optionally preceded by a per-file pax header (path, size, mtime);
at anything else (global pax headers, GNU long names, base-256 numbers, damage) :func:`scan_headers`
returns None and :func:`tar_index` / :func:`tar_members` / :func:`tar_payloads` (what the stages
call) use tarfile instead. Tests compare both.

tarfile stops *silently* at an invalid header after the first one and returns the members before it;
the tarfile path here raises ``tarfile.ReadError`` then, so a damaged tar is an error naming the
offset, never a shard with samples quietly missing.
"""

from __future__ import annotations

import tarfile
from typing import BinaryIO

from laiontools.wds.keys import base_plus_ext
from laiontools.wds.native import native

# :func:`parse_span` plus webdataset's key rule for the plain form of a span, compiled (None when the
# extension is not built or is turned off; see laiontools/wds/native.py).
span_members_native = getattr(native, "span_members", None)

BLOCK = tarfile.BLOCKSIZE
_ZERO_BLOCK = bytes(BLOCK)
_POSIX_MAGIC = b"ustar\x0000"
_FILE = object()
_DIR = object()


def _octal(field: bytes) -> int:
    """A header's octal number field: octal digits, padded with NULs or spaces. Anything else (a sign,
    an underscore, which Python's int() would take; base-256; garbage) is a ValueError: a negative
    size would not move the scan forward (it looped forever)."""
    digits = field.split(b"\0", 1)[0].strip()
    if not digits:
        return 0
    if not digits.isdigit():  # ASCII digits only; 8 and 9 are refused by int(, 8)
        raise ValueError(f"not an octal number field: {bytes(field)!r}")
    return int(digits, 8)


def _pax_size(value: str) -> int:
    """A pax "size" record: decimal digits only (not "-5", "+3" or "1_0", which int() takes)."""
    if not (value.isascii() and value.isdigit()):
        raise ValueError(f"pax size {value!r} is not a whole number of bytes")
    return int(value)


def _pax_not_plain(pax: dict[str, str], is_file: bool) -> bool:
    """A per-file pax header that tarfile (so webdataset) applies otherwise than its path/size/mtime: GNU
    sparse records (the member's name and bytes are elsewhere) or a file's path with a trailing slash
    (which tarfile strips)."""
    return (is_file and pax.get("path", "").endswith("/")) or any(k.startswith("GNU.sparse.") for k in pax)


def _fields(h: bytes) -> tuple[object, str, int, int, int] | None:
    """(kind, name, size, mtime, stored checksum) of a plain file/dir header, checksum not checked."""
    try:
        size, mtime, chk = _octal(h[124:136]), _octal(h[136:148]), _octal(h[148:156])
    except ValueError:  # base-256 numbers, garbage
        return None
    name = h[:100].split(b"\0", 1)[0]
    if h[257:265] == _POSIX_MAGIC and h[345] != 0:
        name = h[345:500].split(b"\0", 1)[0] + b"/" + name
    flag = h[156:157]
    if flag in (b"0", b"\0") and not name.endswith(b"/"):
        kind = _FILE
    elif flag == b"5":
        kind = _DIR
    else:
        return None
    return kind, name.decode("utf-8", "surrogateescape"), size, mtime, chk


def _checksums_ok(heads: bytes | bytearray, chks: list[int]) -> bool:
    """The header checksums of `heads` (len(chks) 512-byte headers, end to end) at once (summing 512 bytes
    in Python was a quarter of a header's cost)."""
    import numpy as np

    if not chks:
        return True
    # (summed as int64 without an int64 copy of the headers, which was 8x their bytes: 150 MB for a 10k-sample shard)
    a = np.frombuffer(heads, dtype=np.uint8).reshape(len(chks), BLOCK)
    sums = a.sum(axis=1, dtype=np.int64) - a[:, 148:156].sum(axis=1, dtype=np.int64) + 256
    return bool(np.array_equal(sums, np.asarray(chks, dtype=np.int64)))


# Headers whose checksums are checked together: a scan holds at most this many (4 MB), not every header of the tar.
_CHECK_EVERY = 8192


def plain_members(data: bytes) -> list[tuple[str, bytes]] | None:
    """[(name, payload)] of the regular files of a whole tar in memory, or None."""
    import io

    members = scan_headers(io.BytesIO(data), len(data))
    return None if members is None else [(name, data[off : off + size]) for name, off, size, _ in members]


def tarfile_index(f: BinaryIO, file_size: int) -> list[tuple[str, int, int, int]]:
    """[(name, data offset, size, mtime)] of the regular files, by the tarfile module.

    Raises ``tarfile.TarError`` if it is not a tar, or if tarfile stopped before the end of the data at
    a header it could not read (which tarfile itself passes over silently).
    """
    return [(name, off, size, mtime) for name, _, off, size, mtime in _tarfile_members(f, file_size)]


def _tarfile_members(f: BinaryIO, file_size: int) -> list[tuple[str, int, int, int, int]]:
    """[(name, header offset, data offset, size, mtime)] by tarfile; errors as :func:`tarfile_index`."""
    f.seek(0)
    out = []
    try:
        with tarfile.open(fileobj=f, mode="r:") as tf:
            for ti in tf:
                # tarfile takes a pax size of "-1000" as it is, then steps back by it (yielding the same
                # header again, or seeking before the start): refused before it takes the next step
                if ti.size < 0:
                    raise tarfile.ReadError(f"member {ti.name} at offset {ti.offset}: negative size {ti.size}")
                if ti.isfile():
                    if ti.issparse():  # its bytes are pieces of the stored data, not size bytes at offset_data
                        raise tarfile.ReadError(f"member {ti.name} at offset {ti.offset} is a sparse file, which a webdataset "
                                                "shard cannot hold (its stored bytes are not its content)")
                    out.append((ti.name, int(ti.offset), int(ti.offset_data), int(ti.size), _whole_mtime(ti)))
            end = tf.offset
    except (ValueError, OverflowError) as e:  # tarfile's own arithmetic on a damaged header ("negative seek value";
        # a base-256 size past 2**63, which tarfile reads and then seeks or reads by)
        raise tarfile.ReadError(f"damaged tar header ({e})") from e
    if end < file_size:
        f.seek(end)
        rest = f.read(BLOCK)
        if rest.strip(b"\0"):
            raise tarfile.ReadError(f"unreadable tar header at offset {end} (of {file_size} bytes)")
    return out


def _whole_mtime(ti: tarfile.TarInfo) -> int:
    """A member's mtime as a whole number; a pax mtime of "inf" or "nan" (which tarfile takes as a
    float) is a ``tarfile.ReadError`` naming the member, not an OverflowError from deep inside a stage."""
    try:
        return int(ti.mtime)
    except (OverflowError, ValueError):
        raise tarfile.ReadError(f"member {ti.name} at offset {ti.offset}: mtime {ti.mtime!r} is not a finite number") from None


def tar_index(f: BinaryIO, file_size: int) -> list[tuple[str, int, int, int]]:
    """[(name, data offset, size, mtime)] of a tar's regular files: headers read directly when they
    are plain, else by tarfile. Raises ``tarfile.TarError`` for a damaged or non-tar file."""
    members = scan_headers(f, file_size)
    return members if members is not None else tarfile_index(f, file_size)


def tar_members(f: BinaryIO, file_size: int) -> list[tuple[str, int, int, int, int]]:
    """[(name, header offset, data offset, size, mtime)]: :func:`tar_index` with where each member's
    headers (pax header included) start. Raises ``tarfile.TarError`` for a damaged or non-tar file."""
    members = _scan(f, file_size)
    return members if members is not None else _tarfile_members(f, file_size)


def tarfile_payloads(data: bytes) -> list[tuple[str, bytes]]:
    """[(name, payload)] of a tar in memory by the tarfile module (see :func:`tarfile_index`)."""
    import io

    return [(name, data[off : off + size]) for name, off, size, _ in tarfile_index(io.BytesIO(data), len(data))]


def tar_payloads(data: bytes) -> list[tuple[str, bytes]]:
    """[(name, payload)] of a tar in memory: :func:`plain_members`, else :func:`tarfile_payloads`."""
    members = plain_members(data)
    return members if members is not None else tarfile_payloads(data)


def _pax_records(data: bytes) -> dict[str, str] | None:
    """The records of a pax extended header ("<len> <key>=<value>\\n" ...), or None if malformed."""
    out: dict[str, str] = {}
    pos, n = 0, len(data)
    while pos < n:
        sp = data.find(b" ", pos, pos + 20)
        if sp < 0:
            return None
        try:
            length = int(data[pos:sp])
        except ValueError:
            return None
        end = pos + length
        if length <= 0 or end > n or data[end - 1 : end] != b"\n":
            return None
        k, eq, v = data[sp + 1 : end - 1].partition(b"=")
        if not eq:
            return None
        out[k.decode("utf-8", "surrogateescape")] = v.decode("utf-8", "surrogateescape")
        pos = end
    return out


def _scan(f: BinaryIO, file_size: int, verify: bool = True, span: bool = False) -> list[tuple[str, int, int, int, int]] | None:
    """[(name, header offset, data offset, size, mtime)] of the regular files, or None.

    Handles plain ustar/GNU headers and the per-file pax extended headers ("x") that Python's
    tarfile (and so webdataset and img2dataset) writes by default: their path, size and mtime
    override the header's, and the member's header offset is that of its pax header. Anything else
    (global pax headers, GNU long names, base-256 numbers, damage) gives None. `verify`: check every
    header checksum (_CHECK_EVERY headers at once). `span`: the bytes are one sample's members, so the
    end of the data must be the end of the last member (no end-of-archive blocks)."""
    out: list[tuple[str, int, int, int, int]] = []
    heads = bytearray()  # the headers not yet checked (verify), end to end, and their checksum fields
    chks: list[int] = []
    pos = 0
    pax: dict[str, str] | None = None
    start_of: int | None = None
    if file_size == 0:
        return None
    while pos + BLOCK <= file_size:
        f.seek(pos)
        window = f.read(3 * BLOCK)  # the header, and for a pax header its records and the next header
        h = window[:BLOCK]
        if len(h) != BLOCK:
            return None
        if h == _ZERO_BLOCK:
            if span or pax is not None:
                return None
            return out if not verify or _checksums_ok(heads, chks) else None
        if span and h[257:262] != b"ustar":
            return None  # every header tarfile / webdataset / img2dataset write carries the magic
        if h[156:157] == b"x":
            try:
                size, chk = _octal(h[124:136]), _octal(h[148:156])
            except ValueError:
                return None
            if pax is not None or pos + BLOCK + size > file_size:
                return None
            if size <= 2 * BLOCK:
                data = window[BLOCK : BLOCK + size]
            else:
                f.seek(pos + BLOCK)
                data = f.read(size)
            pax = _pax_records(data)
            if pax is None:
                return None
            if verify:
                heads += h
                chks.append(chk)
            start_of = pos
            pos += BLOCK + -(-size // BLOCK) * BLOCK
            continue
        parsed = _fields(h)
        if parsed is None:
            return None
        kind, name, size, mtime, chk = parsed
        if verify:
            heads += h
            chks.append(chk)
            if len(chks) >= _CHECK_EVERY:
                if not _checksums_ok(heads, chks):
                    return None
                heads.clear()
                chks.clear()
        header_at = pos if start_of is None else start_of
        if pax is not None:
            if _pax_not_plain(pax, kind is _FILE):
                return None  # a sparse member, or a path tarfile rewrites: tarfile decides
            try:
                name = pax.get("path", name)
                size = _pax_size(pax["size"]) if "size" in pax else size
                mtime = int(float(pax["mtime"])) if "mtime" in pax else mtime
            except (ValueError, OverflowError):  # not a number, or "inf" / "1e400": tarfile decides
                return None
            pax, start_of = None, None
        start = pos + BLOCK
        if kind is _FILE:
            if start + size > file_size:
                return None
            out.append((name, header_at, start, size, mtime))
            pos = start + -(-size // BLOCK) * BLOCK
        else:  # a directory has no data, whatever its size field says: tarfile and GNU tar read the next block as a header
            pos = start
    if pos != file_size or pax is not None:
        return None
    return out if not verify or _checksums_ok(heads, chks) else None


def scan_headers(f: BinaryIO, file_size: int) -> list[tuple[str, int, int, int]] | None:
    """[(name, data offset, size, mtime)] of the regular files of a tar file, reading only the header
    blocks (a seek over each member's data), or None (see :func:`_scan`; a header that parses but
    fails its checksum makes the whole result None, and tarfile then decides)."""
    members = _scan(f, file_size)
    return None if members is None else [(name, off, size, mtime) for name, _, off, size, mtime in members]


def sample_spans(members: list[tuple[str, int, int, int, int]]) -> dict[str, tuple[int, int]]:
    """{key: (offset of its first member's headers, length to the end of its last member's padding)}
    for the samples (keys by :func:`laiontools.wds.keys.base_plus_ext`) of :func:`tar_members` whose
    members are adjacent, as webdataset writers lay them out. A sample with another sample's member
    between its own gets no span: a reader has to index the tar for it."""
    first: dict[str, int] = {}
    end: dict[str, int] = {}
    used: dict[str, int] = {}
    for name, head, off, size, _ in members:
        key = base_plus_ext(name)[0]
        if key is None:  # no extension: not part of any sample (webdataset skips it too)
            continue
        stop = off + -(-size // BLOCK) * BLOCK
        if key in first:
            first[key], end[key] = min(first[key], head), max(end[key], stop)
        else:
            first[key], end[key] = head, stop
        used[key] = used.get(key, 0) + stop - head
    # Adjacent iff the span holds exactly the sample's own headers and padded payloads.
    return {k: (first[k], end[k] - first[k]) for k in first if end[k] - first[k] == used[k]}


def parse_span(buf: bytes | memoryview) -> list[tuple[str, int, int, int]] | None:
    """[(name, data offset in buf, size, mtime)] of the members in `buf`, the bytes of one sample's
    span (:func:`sample_spans`), or None if they are not tar headers and payloads that exactly fill it.

    Header checksums are not summed here (this runs for every sample a reshard writes; the pool's
    per-shard sha256 is what `laiontools verify` checks). Instead every header must carry the ustar
    magic, parse and name a regular file, and the members must end exactly at the end of the span,
    which misplaced bytes (a pax record block, payload) do not.

    The same members as ``_scan(..., verify=False, span=True)`` (tests compare them on valid spans and
    on spans cut, shifted, extended or with a damaged header), read straight from the bytes: no file
    object, and a number field that a pax record overrides (size, mtime) or that is not used (the
    checksum) is not parsed. That scan was a third of reshard's CPU time per sample. A span whose
    sha256 the catalog recorded is checked against it before it gets here."""
    b = bytes(buf) if not isinstance(buf, bytes) else buf
    n = len(b)
    if n == 0:
        return None
    out: list[tuple[str, int, int, int]] = []
    pos = 0
    pax: dict[str, str] | None = None
    try:
        while pos < n:
            if pos + BLOCK > n or b[pos + 257 : pos + 262] != b"ustar":
                return None  # cut short, or not a header (a zero block, payload): every writer sets the magic
            flag = b[pos + 156]
            if flag == 0x78:  # "x": a per-file pax header, its records, then the member's own header
                size = _octal(b[pos + 124 : pos + 136])
                if pax is not None or pos + BLOCK + size > n:
                    return None
                pax = _pax_records(b[pos + BLOCK : pos + BLOCK + size])
                if pax is None:
                    return None
                pos += BLOCK + -(-size // BLOCK) * BLOCK
                continue
            name = b[pos : pos + 100].split(b"\0", 1)[0]
            if b[pos + 257 : pos + 265] == _POSIX_MAGIC and b[pos + 345] != 0:
                name = b[pos + 345 : pos + 500].split(b"\0", 1)[0] + b"/" + name
            if flag in (0x30, 0) and not name.endswith(b"/"):
                is_file = True
            elif flag == 0x35:  # "5": a directory, skipped as tarfile's isfile() does
                is_file = False
            else:
                return None
            text = name.decode("utf-8", "surrogateescape")
            if pax is None:
                size, mtime = _octal(b[pos + 124 : pos + 136]), _octal(b[pos + 136 : pos + 148])
            else:
                if _pax_not_plain(pax, is_file):
                    return None
                text = pax.get("path", text)
                size = _pax_size(pax["size"]) if "size" in pax else _octal(b[pos + 124 : pos + 136])
                mtime = int(float(pax["mtime"])) if "mtime" in pax else _octal(b[pos + 136 : pos + 148])
                pax = None
            start = pos + BLOCK
            if is_file:
                if start + size > n:
                    return None
                out.append((text, start, size, mtime))
                pos = start + -(-size // BLOCK) * BLOCK
            else:  # a directory has no data (tarfile, GNU tar)
                pos = start
    except (ValueError, OverflowError):  # a number field that is not octal (base-256, garbage), a bad pax number
        return None  # ("nan": ValueError; "inf", "1e400": OverflowError)
    if pos != n or pax is not None:
        return None
    return out
