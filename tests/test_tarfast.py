"""The compiled fast paths (laiontools/wds/tarfast.c) against the Python code they shadow.

Each compiled function takes only the plain form of its input and answers None / False for the rest;
the invariant checked here is that it never answers otherwise than the Python code: on valid spans
and members of every tar flavour the readers meet (tarfile's pax as webdataset and img2dataset write
it, ustar, GNU, laiontools' own writer), and on thousands of damaged, cut and odd ones. On the plain
forms it must answer (not hand back), or the fast path would be dead code that the test never notices.
"""

from __future__ import annotations

import io
import os
import shutil
import sysconfig
import tarfile

import numpy as np
import pytest

from laiontools.wds import native as native_mod
from laiontools.wds import writer
from laiontools.wds.keys import base_plus_ext
from laiontools.wds.tarscan import parse_span, sample_spans, tar_members

native = native_mod.native
needs_native = pytest.mark.skipif(native is None, reason="laiontools.wds.tarfast is not built (no C compiler at install, "
                                                          f"or {native_mod.PURE_PYTHON_ENV}=1)")


def test_the_extension_is_built_where_a_compiler_is():
    """`make` installs with a C compiler on this machine: the extension must be there, or every test of it
    below would be skipped and the stages would run the Python path without anyone noticing."""
    if os.environ.get(native_mod.PURE_PYTHON_ENV, "") not in ("", "0"):
        pytest.skip(f"{native_mod.PURE_PYTHON_ENV} is set")
    cc = (sysconfig.get_config_var("CC") or "cc").split()[0]
    if shutil.which(cc) is None:
        pytest.skip(f"no C compiler ({cc}) here")
    assert native is not None, "laiontools.wds.tarfast did not build: run `pip install -e .` and read its compiler output"


def python_members(span: bytes, skey: str):
    """What reshard._span_members takes from a span in Python: parse_span, then webdataset's key rule,
    every member named <skey>.<ext> (None where it refuses the span)."""
    members = parse_span(span)
    out = []
    for name, off, size, mtime in members or ():
        key, ext = base_plus_ext(name)
        if key != skey or not ext:
            return None
        out.append((ext, off, size, mtime))
    return out or None


def _tar(members, fmt, mtime=1_796_014_623.25) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=fmt) as tf:
        for name, data in members:
            ti = tarfile.TarInfo(name)
            ti.size, ti.mtime = len(data), mtime
            tf.addfile(ti, io.BytesIO(data))
    return buf.getvalue()


def _spans(data: bytes):
    """(key, span bytes) of every sample of a tar."""
    return [(key, data[off : off + n]) for key, (off, n) in sample_spans(tar_members(io.BytesIO(data), len(data))).items()]


def _flavours(rng) -> dict[str, bytes]:
    samples = [(f"{i:09d}", [(ext, rng.bytes(int(rng.integers(0, 5000)))) for ext in ("jpg", "json", "txt")]) for i in range(12)]
    samples.append(("000000999", [("seg.png", b"x" * 512), ("json", b"{}"), ("jpg", b"")]))  # a two-dot extension, sizes 512 and 0
    members = [(f"{k}.{ext}", d) for k, ms in samples for ext, d in ms]
    out = {
        "pax (float mtime: webdataset, img2dataset)": _tar(members, tarfile.PAX_FORMAT),
        "pax, integer mtime (no pax header)": _tar(members, tarfile.PAX_FORMAT, mtime=1_700_000_000),
        "ustar": _tar(members, tarfile.USTAR_FORMAT, mtime=1_700_000_000),
        "gnu": _tar(members, tarfile.GNU_FORMAT, mtime=1_700_000_000),
    }
    buf = io.BytesIO()
    w = writer.ShardWriter(buf, None, buffer=writer.WriteBuffer(64 << 10))
    for k, ms in samples:
        w.add_sample(k.encode(), [(b"." + ext.encode(), d, 1_700_000_000) for ext, d in ms])
    w.end_archive()
    w.hexdigest()
    w.close()
    out["laiontools' writer"] = buf.getvalue()
    return out


@needs_native
def test_span_members_answers_as_python_on_every_flavour_and_is_used_on_the_plain_ones():
    rng = np.random.default_rng(5)
    for flavour, data in _flavours(rng).items():
        spans = _spans(data)
        assert len(spans) == 13, flavour
        for key, span in spans:
            want = python_members(span, key)
            assert want, (flavour, key)
            assert native.span_members(span, key) == want, (flavour, key)
            assert native.span_members(memoryview(span), key) == want
            assert native.span_members(span, key + "0") is None and native.span_members(span, key[:-1]) is None
            assert native.span_members(span, key + "\udcff") is None  # a key UTF-8 cannot encode: handed back


def _odd_pax_spans():
    """Spans whose pax records take forms the fast path hands back, or reads: (records, expect_native)."""
    cases = [
        ({"mtime": "1700000000.999999999999"}, True),  # rounds up in float(): int(float()) is 1700000001
        ({"mtime": "12"}, True),
        ({"mtime": "012.5"}, True),
        ({"mtime": "1e3"}, False), ({"mtime": " 12"}, False), ({"mtime": "1_0"}, False), ({"mtime": "+5"}, False),
        ({"mtime": "5."}, False), ({"mtime": ".5"}, False), ({"mtime": ""}, False),
        ({"size": "3"}, True), ({"size": "0003"}, True), ({"size": "+3"}, False), ({"size": "3 "}, False),
        ({"path": "k.jpg"}, True), ({"path": "k.seg.jpg"}, True), ({"path": "d/k.jpg"}, False), ({"path": "k.jpg\n"}, False),
        ({"path": "kö.jpg"}, False), ({"path": ".jpg"}, False), ({"path": "k."}, False), ({"path": "j.jpg"}, False),
        ({"comment": "anything = at all", "mtime": "7"}, True),
        ({"GNU.sparse.name": "k.jpg"}, False), ({"GNU.sparse.major": "1", "GNU.sparse.minor": "0"}, False),  # tarfile's sparse members
    ]
    for records, expect in cases:
        buf = io.BytesIO()
        with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as tf:
            for name, data, pax in (("k.jpg", b"abc", records), ("k.json", b"{}", {"mtime": "1.5"})):
                ti = tarfile.TarInfo(name)
                ti.size, ti.mtime, ti.pax_headers = len(data), 9, dict(pax)
                tf.addfile(ti, io.BytesIO(data))
        data = buf.getvalue()
        end = data.index(b"{}") + 512
        yield records, data[: end - (end % 512)], expect


@needs_native
def test_span_members_hands_back_what_python_reads_otherwise():
    n = 0
    for records, span, expect in _odd_pax_spans():
        want = python_members(span, "k")
        got = native.span_members(span, "k")
        assert got is None or got == want, (records, got, want)
        if expect:
            assert got is not None and got == want, records
        else:
            assert got is None, records
        n += 1
    assert n > 20


@needs_native
def test_span_members_never_answers_otherwise_than_python_on_damaged_spans():
    """Random byte flips, cuts, shifts and appended bytes over every flavour's spans: the compiled
    answer is Python's or None (hand back), never a third thing."""
    rng = np.random.default_rng(7)
    answered = handed_back = 0
    for flavour, data in _flavours(rng).items():
        for key, span in _spans(data):
            variants = [span[512:], span[:-512], span[:-1], span + b"\0" * 512, b"\0" * 512 + span, span[:511], b""]
            for _ in range(60):
                d = bytearray(span)
                for _ in range(int(rng.integers(1, 4))):
                    at = int(rng.integers(0, min(len(d), 2048)))  # mostly headers and pax records
                    d[at] = int(rng.choice([0, 0x20, 0x2E, 0x2F, 0x30, 0x37, 0x38, 0x0A, 0x3D, 0x78, 0x35, 0xFF, int(rng.integers(0, 256))]))
                variants.append(bytes(d))
            for v in variants:
                want, got = python_members(v, key), native.span_members(v, key)
                assert got is None or got == want, (flavour, key, got, want)
                if want is None:
                    assert got is None
                answered += got is not None
                handed_back += got is None
    assert answered > 200 and handed_back > 200, (answered, handed_back)


def _pack_python(kb: bytes, members) -> bytes:
    small = bytearray()
    for extb, data, mtime in members:
        small += writer.ustar_header(kb + extb, len(data), mtime)
        small += data
        small += writer.ZEROS[: (-len(data)) % 512]
    return bytes(small)


@needs_native
def test_pack_members_writes_the_python_bytes_and_hands_back_the_rest():
    rng = np.random.default_rng(3)
    for size in (0, 1, 511, 512, 513, 4095, 4096, 4097, 70_000):
        for mtime in (0, 1, 1_700_000_000, -5, 8**11 - 1, 8**11, 10**30, -(10**30), True):
            data = rng.bytes(size)
            members = [(b".jpg", data, mtime), (b".json", memoryview(b'{"a": 1}'), 7), (b".seg.png", bytearray(b"xy"), 3)]
            small = bytearray(b"before")
            assert native.pack_members(small, b"000123", members, writer._TMPL) is True
            assert bytes(small) == b"before" + _pack_python(b"000123", members), (size, mtime)
    # names of 100 bytes are packed; over 100 (tarfile's prefix split), other forms: handed back, untouched
    small = bytearray(b"x")
    assert native.pack_members(small, b"k" * 96, [(b".jpg", b"a", 1)], writer._TMPL) is True
    assert bytes(small) == b"x" + _pack_python(b"k" * 96, [(b".jpg", b"a", 1)])
    for members in ([(b".jpg", b"a", 1), (b".json", b"{}", 1)], [(b".jpgx", b"a", 1)]):
        before = bytes(small)
        assert native.pack_members(small, b"k" * 96 + (b"k" if len(members) == 2 else b""), members, writer._TMPL) is False
        assert bytes(small) == before
    for odd in ([(".jpg", b"a", 1)], [(b".jpg", b"a", 1.5)], [(b".jpg", b"a")], [(b".jpg", "str", 1)], ((b".jpg", b"a", 1),)):
        assert native.pack_members(small, b"k", odd, writer._TMPL) is False
        assert bytes(small) == before
    with pytest.raises(ValueError):
        native.pack_members(small, b"k", [(b".jpg", b"a", 1)], writer._TMPL[:100])


@needs_native
def test_shard_writer_bytes_are_the_same_with_and_without_the_extension(monkeypatch):
    """Whole shards through ShardWriter (members over and under 100-byte names, sizes around BIG and
    the small buffer's hand-over size) on every write path: identical bytes and sha256 with the
    compiled packing and without it, and tarfile reads them back."""
    rng = np.random.default_rng(9)
    samples = [((b"p" * 90 + b"/" if i == 3 else b"") + f"{i:06d}".encode(), [(b".jpg", rng.bytes(int(rng.integers(0, 9000))), i), (b".json", b'{"i": %d}' % i, i)])
               for i in range(40)]
    samples.append((b"big", [(b".jpg", rng.bytes(writer.ShardWriter.SMALL_PUT + 5), 0)]))

    def shard(mode: str, path: str) -> tuple[bytes, str]:
        with open(path, "wb") as f:
            w = writer.ShardWriter(f, None if mode == "stream" else f.fileno(), direct=mode == "direct", buffer=writer.WriteBuffer(64 << 10))
            for n, (kb, members) in enumerate(samples):
                w.add_sample(kb, members if n % 5 else tuple(members))  # any sequence, as the Python packing takes
            w.end_archive()
            digest = w.hexdigest()
            w.close()
        with open(path, "rb") as f:
            return f.read(), digest

    import tempfile

    with tempfile.TemporaryDirectory() as d:
        for mode in ("stream", "buffered", "direct"):
            fast = shard(mode, os.path.join(d, "a.tar"))
            monkeypatch.setattr(writer, "_pack_members", None)
            slow = shard(mode, os.path.join(d, "b.tar"))
            monkeypatch.undo()
            assert fast == slow, mode
            with tarfile.open(fileobj=io.BytesIO(fast[0])) as tf:
                names = tf.getnames()
            assert names == [(kb + ext).decode() for kb, ms in samples for ext, _, _ in ms]


_FUZZ = r"""
import os, random, sys
sys.path.insert(0, sys.argv[1])
import laiontools.wds.tarfast as t
import test_tarfast as T
print(t.__file__)
T.test_span_members_answers_as_python_on_every_flavour_and_is_used_on_the_plain_ones()
T.test_span_members_hands_back_what_python_reads_otherwise()
T.test_span_members_never_answers_otherwise_than_python_on_damaged_spans()
T.test_pack_members_writes_the_python_bytes_and_hands_back_the_rest()
rng = random.Random(1)
for i in range(20000):  # header scaffolds over random bytes, whole blocks and a cut last one
    n = rng.choice([0, 1, 511, 512, 513, 1024, 1536, 2048, rng.randrange(0, 3073)])
    b = bytearray(rng.randbytes(n))
    for h in range(0, n, 512):
        if rng.random() < 0.8 and h + 262 <= n:
            b[h + 257 : h + 262] = b"ustar"
            b[h + 156] = rng.choice(b"x0\x005")
            b[h + 124 : h + 136] = rng.choice([b"00000000000\0", b"%011o\0" % rng.randrange(0, 4000), b"77777777777\0", b"1\0"])
            if b[h + 156] == 0x78 and h + 1024 <= n and rng.random() < 0.5:
                rec = rng.choice([b"30 mtime=1700000000.000000001\n", b"12 path=k.jpg\n", b"9 size=5\n", b"99 path=x\n"])
                b[h + 512 : h + 512 + len(rec)] = rec
    t.span_members(bytes(b), rng.choice(["k", "", "000001"]))
print("fuzzed")
"""


def test_the_parser_reads_no_byte_outside_its_input_under_address_sanitizer(tmp_path):
    """The compiled parser reads tar bytes from any pool: built here with AddressSanitizer and UBSan, it
    runs the comparisons above and 20k random header scaffolds with no out-of-bounds access or undefined
    behaviour (either aborts the process)."""
    import subprocess
    import sys

    cc = (sysconfig.get_config_var("CC") or "cc").split()[0]
    if shutil.which(cc) is None:
        pytest.skip(f"no C compiler ({cc}) here")
    libs = [subprocess.run([cc, f"-print-file-name={lib}"], capture_output=True, text=True, check=False).stdout.strip() for lib in ("libasan.so", "libubsan.so")]
    if not all(os.path.isabs(p) and os.path.exists(p) for p in libs):
        pytest.skip(f"{cc} has no AddressSanitizer / UBSan runtime here")
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    shutil.copytree(os.path.join(root, "laiontools"), tmp_path / "laiontools", ignore=shutil.ignore_patterns("__pycache__", "*.so"))
    so = tmp_path / "laiontools" / "wds" / ("tarfast" + sysconfig.get_config_var("EXT_SUFFIX"))
    subprocess.run([cc, "-O1", "-g", "-fsanitize=address,undefined", "-fno-sanitize-recover=undefined", "-fno-omit-frame-pointer",
                    "-fPIC", "-shared", f"-I{sysconfig.get_paths()['include']}", str(tmp_path / "laiontools" / "wds" / "tarfast.c"),
                    "-o", str(so)], check=True, capture_output=True)
    # PYTHONMALLOC=malloc: every bytes object its own allocation, with ASan's red zones around it
    env = {**os.environ, "PYTHONPATH": str(tmp_path), "LD_PRELOAD": ":".join(libs), "ASAN_OPTIONS": "detect_leaks=0", "PYTHONMALLOC": "malloc",
           "UBSAN_OPTIONS": "print_stacktrace=1"}
    env.pop(native_mod.PURE_PYTHON_ENV, None)
    res = subprocess.run([sys.executable, "-c", _FUZZ, os.path.join(root, "tests")], env=env, cwd=tmp_path, capture_output=True,
                         text=True, timeout=600, check=False)
    assert res.returncode == 0 and res.stdout.split() == [str(so), "fuzzed"], (res.stdout[-2000:], res.stderr[-4000:])
