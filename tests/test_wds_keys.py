"""The one webdataset key rule and grouping function (laiontools.wds.keys / samples) against webdataset's own."""

from __future__ import annotations

import hashlib
import io
import tarfile

import pytest
from webdataset import tariterators as wds

from laiontools.wds.keys import DuplicateMemberError, base_plus_ext, group_by_keys
from laiontools.wds.samples import iter_members, iter_samples

NAMES = [
    "000123.jpg", "000123.txt", "dir/000123.json", "a.b/c.jpg", "x.seg.png", "README", "x.", "dir/.hidden.jpg",
    "._000123.jpg", "deep/er/k.tar.gz", "UP.JPG", "k", "é/ü.txt",
]


def _tar(members: list[tuple[str, bytes]], mode: str = "w") -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode=mode) as tf:
        for name, data in members:
            ti = tarfile.TarInfo(name)
            ti.size = len(data)
            tf.addfile(ti, io.BytesIO(data))
    return buf.getvalue()


def test_base_plus_ext_is_webdatasets_rule():
    for name in NAMES:
        assert base_plus_ext(name) == wds.base_plus_ext(name), name


def test_group_by_keys_matches_webdataset_on_a_plain_stream():
    members = [("a.jpg", b"1"), ("a.TXT", b"2"), ("b.jpg", b"3"), ("noext", b"4"), ("b.json", b"5"), ("c.jpg", b"6")]
    want = [
        {k: v for k, v in s.items() if not k.startswith("__")} | {"__key__": s["__key__"]}
        for s in wds.group_by_keys(iter([{"fname": n, "data": d, "__url__": "u"} for n, d in members]))
    ]
    got = [{**parts, "__key__": key} for key, parts in group_by_keys(members)]
    assert got == want
    assert got[0] == {"__key__": "a", "jpg": b"1", "txt": b"2"}


def test_group_by_keys_options():
    members = [("a.jpg", 1), ("b.jpg", 2), ("a.txt", 3), ("._a.jpg", 4), ("a.JPG", 5)]
    # adjacent (webdataset): "a" comes back after "b", so it is a second sample
    assert list(group_by_keys(members[:3])) == [("a", {"jpg": 1}), ("b", {"jpg": 2}), ("a", {"txt": 3})]
    # gathered: one sample per key, in order of first appearance; hidden members skipped
    assert list(group_by_keys(members[:4], adjacent=False)) == [("a", {"jpg": 1, "txt": 3}), ("b", {"jpg": 2})]
    assert list(group_by_keys(members[:4], adjacent=False, skip_hidden=False)) == [
        ("a", {"jpg": 1, "txt": 3}), ("b", {"jpg": 2})]  # "._a.jpg" has no key by webdataset's rule either
    # lcase: "a.JPG" is a second jpg of "a" unless the case is kept
    with pytest.raises(DuplicateMemberError, match="a.JPG"):
        list(group_by_keys(members, adjacent=False))
    assert dict(group_by_keys(members, adjacent=False, lcase=False))["a"] == {"jpg": 1, "txt": 3, "JPG": 5}
    assert dict(group_by_keys(members, adjacent=False, on_duplicate="last"))["a"] == {"jpg": 5, "txt": 3}
    # suffixes: other members are dropped, the sample still appears
    assert list(group_by_keys(members[:3], suffixes=("txt",))) == [("a", {}), ("b", {}), ("a", {"txt": 3})]


def test_iter_samples_from_bytes_file_and_gzip(tmp_path):
    members = [("s1.jpg", b"j" * 700), ("s1.json", b"{}"), ("d/s2.jpg", b"k"), ("d/s2.cls", b"3")]
    data = _tar(members)
    want = [("s1", {"jpg": b"j" * 700, "json": b"{}"}), ("d/s2", {"jpg": b"k", "cls": b"3"})]
    assert list(iter_samples(data)) == want
    p = tmp_path / "t.tar"
    p.write_bytes(data)
    with open(p, "rb") as f:
        assert list(iter_samples(f, len(data))) == want
    gz = _tar(members, "w:gz")
    with io.BytesIO(gz) as f:
        assert list(iter_samples(f, len(gz))) == want
    assert list(iter_samples(gz)) == want


def test_iter_members_names_a_damaged_tar():
    data = bytearray(_tar([(f"{i}.jpg", b"x" * 600) for i in range(3)]))
    data[2 * 1536 + 3] ^= 0xFF  # the third header's name: its checksum no longer holds
    with pytest.raises(tarfile.ReadError, match="offset 3072"):
        list(iter_members(io.BytesIO(bytes(data)), len(data)))
    cut = _tar([("0.jpg", b"x" * 6000)])[:3000]
    with pytest.raises(tarfile.TarError):
        list(iter_members(io.BytesIO(cut), len(cut)))
    gz = _tar([(f"{i}.jpg", bytes(range(256)) * 40) for i in range(3)], "w:gz")
    for bad in (gz[: len(gz) // 2], gz[:12] + bytes(64) + gz[76:]):  # cut short; damaged deflate data
        with pytest.raises(tarfile.TarError):
            list(iter_members(io.BytesIO(bad), len(bad)))


def test_members_over_the_byte_limit_are_not_read_on_every_path(tmp_path):
    """tarfile_members read any member whole (a 2 MB gzip tar held 2 GiB; walk F9). Over the limit, a
    member comes out unread as an OversizeMember whose reason the image decoders raise; the limit
    holds alike for a tar in memory, a plain tar file and a gzip tar, so readers judge it the same."""
    from laiontools.contracts.removal import content_hashes
    from laiontools.core.images import ImageLimitError, OversizeMember, open_image

    members = [("s1.jpg", b"j" * 700), ("s1.txt", b"ok"), ("s2.jpg", b"k")]
    plain, gz = _tar(members), _tar(members, "w:gz")
    results = [list(iter_samples(plain, max_member_bytes=100))]
    for data in (plain, gz):
        with io.BytesIO(data) as f:
            results.append(list(iter_samples(f, len(data), max_member_bytes=100)))
    for got in results:
        assert [k for k, _ in got] == ["s1", "s2"]
        big = got[0][1]["jpg"]
        assert isinstance(big, OversizeMember) and big == b""
        assert got[0][1]["txt"] == b"ok" and got[1][1]["jpg"] == b"k"
        with pytest.raises(ImageLimitError, match="tar member s1.jpg of 700 bytes is over the 100 byte limit"):
            open_image(big)
        # streamed through its hashes, so a takedown's or a removal proof's hash entries still meet it
        assert (big.sha256, big.md5) == (hashlib.sha256(b"j" * 700).hexdigest(), hashlib.md5(b"j" * 700).hexdigest())
        assert content_hashes(big, True) == {"sha256": big.sha256, "md5": big.md5, "phash": None}


def _ustar_header(name: str, size: int, typ: bytes = tarfile.REGTYPE) -> bytes:
    ti = tarfile.TarInfo(name)
    ti.size, ti.type, ti.mtime = size, typ, 1
    return ti.tobuf(tarfile.USTAR_FORMAT)


def _padded(b: bytes) -> bytes:
    return b + bytes(-len(b) % 512)


def _pax_tar(members: list[tuple[str, bytes, dict[str, str]]]) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as tf:
        for name, data, pax in members:
            ti = tarfile.TarInfo(name)
            ti.size, ti.mtime, ti.pax_headers = len(data), 1, dict(pax)
            tf.addfile(ti, io.BytesIO(data))
    return buf.getvalue()


_ODD_HEADER_TARS = {
    # a directory whose size field is not 0: tarfile and GNU tar read the next block as the next header
    # (a directory has no data); the scanner skipped 1024 bytes as its data, a.jpg with them
    "directory with a size": _ustar_header("d/", 1024, tarfile.DIRTYPE) + _ustar_header("a.jpg", 3) + _padded(b"abc")
    + _ustar_header("a.json", 2) + _padded(b"{}") + bytes(1024),
    # pax records that tarfile applies otherwise than the scanner: GNU.sparse.name names the member,
    # and a file's path loses its trailing slash
    "pax GNU.sparse.name": _pax_tar([("a.jpg", b"abc", {"GNU.sparse.name": "b.jpg"}), ("b.json", b"{}", {})]),
    "pax path with a trailing slash": _pax_tar([("a.jpg", b"abc", {"path": "a.jpg/"}), ("a.json", b"{}", {})]),
}


@pytest.mark.parametrize("case", sorted(_ODD_HEADER_TARS))
def test_the_header_scanner_sees_the_samples_webdataset_sees(tmp_path, case):
    """iter_samples (embed, dedup, the galleries, evalsets: the header scanner, tarfile as its fallback)
    must group a tar into the samples webdataset's own reader (tarfile's stream) finds in it, not a
    member fewer or under another name."""
    data = _ODD_HEADER_TARS[case]
    p = tmp_path / "t.tar"
    p.write_bytes(data)
    with open(p, "rb") as f:
        want = [(s["__key__"], {k: v for k, v in s.items() if not k.startswith("__")})
                for s in wds.group_by_keys(wds.tar_file_expander([{"stream": f, "url": str(p)}]))]
    assert want and all(parts for _, parts in want)
    assert list(iter_samples(data)) == want
    with open(p, "rb") as f:
        assert list(iter_samples(f, len(data))) == want


def _gnu_sparse_tar() -> tuple[bytes, bytes]:
    """A tar whose a.jpg is an old-GNU sparse member ('S', as `tar --sparse` writes it): 9216 bytes of which
    two 512-byte pieces are stored (at 0 and at 8704), then a 10000-byte a.json. (tar bytes, a.jpg's content)"""
    ti = tarfile.TarInfo("a.jpg")
    ti.size, ti.type, ti.mtime = 1024, tarfile.GNUTYPE_SPARSE, 1
    h = bytearray(ti.tobuf(tarfile.GNU_FORMAT))
    for i, (off, n) in enumerate([(0, 512), (8704, 512)]):  # the sparse map
        h[386 + 24 * i : 410 + 24 * i] = b"%011o\0%011o\0" % (off, n)
    h[483:495] = b"%011o\0" % 9216  # the real size
    h[148:156] = b" " * 8
    h[148:156] = b"%06o\0 " % sum(h)
    json_ti = tarfile.TarInfo("a.json")
    json_ti.size, json_ti.mtime = 10000, 1
    data = bytes(h) + b"A" * 512 + b"B" * 512 + json_ti.tobuf(tarfile.GNU_FORMAT) + _padded(b" " * 9998 + b"{}") + bytes(10240)
    return data, b"A" * 512 + bytes(8192) + b"B" * 512


def test_a_sparse_member_is_refused_not_read_as_the_bytes_after_its_header(tmp_path):
    """The tarfile fallback indexed a sparse member by (offset of its stored pieces, real size) and the
    readers took that many bytes from there: a.jpg came out as its pieces, a.json's header and part of
    its data, with no error (iter_samples; reshard copied them). A reader gives the content tarfile
    extracts or refuses the tar, naming the member."""
    from laiontools.stages.reshard import index_source_shard

    data, content = _gnu_sparse_tar()
    with tarfile.open(fileobj=io.BytesIO(data)) as tf:  # the tar is what it says: tarfile extracts the content
        assert tf.getnames() == ["a.jpg", "a.json"] and tf.extractfile("a.jpg").read() == content
    p = tmp_path / "t.tar"
    p.write_bytes(data)
    with open(p, "rb") as f:
        for src in (data, f):
            try:
                got = dict(iter_samples(src, len(data)))
            except tarfile.ReadError as e:
                assert "a.jpg" in str(e) and "sparse" in str(e)
            else:
                assert got["a"]["jpg"] == content
    try:
        index = index_source_shard(("s", str(p)))
    except RuntimeError as e:
        assert str(p) in str(e) and "sparse" in str(e)
    else:
        ((_, off, size),) = [(ext, off, size) for _, _, ext, off, size, _ in index if ext == "jpg"]
        assert data[off : off + size] == content


def _base256_size_tar(flag: bytes, field: bytes) -> bytes:
    """a.json, then a header of type `flag` whose 12-byte size field is `field` (valid checksum), then the end."""
    ti = tarfile.TarInfo("a.json")
    ti.size, ti.mtime = 2, 1
    bad = tarfile.TarInfo("a.jpg")
    bad.mtime, bad.type = 1, flag
    h = bytearray(bad.tobuf(tarfile.USTAR_FORMAT))
    h[124:136] = field
    h[148:156] = b" " * 8
    h[148:156] = b"%06o\0 " % sum(h)
    return ti.tobuf(tarfile.USTAR_FORMAT) + _padded(b"{}") + bytes(h) + bytes(10240)


@pytest.mark.parametrize("flag, field", [
    (tarfile.XHDTYPE, b"\x80" + b"\xff" * 11),  # a pax header of 2**88 bytes (base-256, as GNU writes sizes over 8 GiB)
    (tarfile.XHDTYPE, b"\xff" + b"\x00" * 11),  # a pax header of -2**88 bytes
    (tarfile.REGTYPE, b"\x80" + b"\x00" * 2 + b"\xff" * 9),  # a member of 2**72 bytes
], ids=["pax-2**88", "pax--2**88", "member-2**72"])
def test_a_size_past_2_63_is_a_tar_error_on_every_reader_not_an_overflow_error(tmp_path, flag, field):
    """tarfile reads (or seeks by) a base-256 size as it is, and Python's I/O raises OverflowError for one
    past 2**63: that escaped every reader as a traceback (embed, dedup and evalsets through iter_samples,
    reshard's tar index, and verify, the command that should name the damaged shard)."""
    from laiontools.core.errors import TaskError
    from laiontools.stages.reshard import index_source_shard
    from laiontools.stages.verify import scan_shard

    data = _base256_size_tar(flag, field)
    p = tmp_path / "t.tar"
    p.write_bytes(data)
    with pytest.raises(tarfile.TarError):
        list(iter_samples(data))
    with open(p, "rb") as f, pytest.raises(tarfile.TarError):
        list(iter_samples(f, len(data)))
    with pytest.raises(TaskError, match=rf"source shard {p} is truncated or unreadable"):
        index_source_shard(("s", str(p)))
    _, _, problems = scan_shard(str(p))
    assert len(problems) == 1 and problems[0].startswith("truncated or unreadable tar"), problems
