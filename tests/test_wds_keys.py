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
