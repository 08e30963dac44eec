"""laiontools.models.encode: the embed step's cheaper paths must give what open_clip gives.

Real open_clip models (the shipped tiny config and ViT-B-32's config, random init) and their own
transforms and tokenizers; the reference is always open_clip's own call.
"""

from __future__ import annotations

import re

import numpy as np
import pytest
import torch
from PIL import Image

from laiontools.models.encode import BatchPreprocess, can_trim_text, encode_text_trimmed, length_groups
from laiontools.models.registry import load_model


@pytest.fixture(scope="module", params=["lt-tiny", "ViT-B-32"])
def bundle(request):
    return load_model(request.param)


def _images() -> list[Image.Image]:
    rng = np.random.default_rng(0)
    out = []
    for w, h, mode in ((256, 256, "RGB"), (300, 120, "RGB"), (97, 301, "L"), (64, 64, "RGBA"),
                       (10, 7, "RGB"), (500, 333, "P"), (224, 224, "CMYK"), (1, 1, "RGB")):
        arr = rng.integers(0, 256, size=(h, w, len(mode) if mode not in ("L", "P") else 1), dtype=np.uint8)
        im = Image.fromarray(arr.squeeze(-1) if arr.shape[-1] == 1 else arr,
                             mode={"L": "L", "P": "L", "RGBA": "RGBA", "CMYK": "CMYK"}.get(mode, "RGB"))
        out.append(im.convert("P") if mode == "P" else im)
    return out


def test_batch_preprocess_is_bit_identical(bundle):
    image_size = tuple(bundle.info["image_size"])
    bp = BatchPreprocess(bundle.preprocess, image_size)
    assert bp.split, f"open_clip's eval transform was not recognised: {bundle.preprocess}"
    ims = _images()
    ref = torch.stack([bundle.preprocess(im) for im in ims])
    u8 = torch.stack([torch.from_numpy(np.array(bp.to_uint8(im))).permute(2, 0, 1) for im in ims])
    assert u8.dtype == torch.uint8 and u8.shape == ref.shape
    assert torch.equal(bp.normalize(u8), ref)


def test_unrecognised_transform_is_not_split(bundle):
    from torchvision.transforms import Compose, Lambda

    image_size = tuple(bundle.info["image_size"])
    extra = Compose([*bundle.preprocess.transforms, Lambda(lambda x: x * 2)])
    assert not BatchPreprocess(extra, image_size).split
    no_rgb = Compose([t for t in bundle.preprocess.transforms if type(t).__name__ != "MaybeConvertMode"])
    assert not BatchPreprocess(no_rgb, image_size).split


def _captions(n: int, context: int) -> list[str]:
    rng = np.random.default_rng(1)
    words = ["a", "photo", "of", "the", "red", "blue", "dog", "cat", "house", "on", "in", "with", "large", "small", "tree", "river", "mountain"]
    caps = [" ".join(rng.choice(words, size=int(rng.integers(1, 20)))) for _ in range(n)]
    caps[3] = " ".join(rng.choice(words, size=context * 2))  # truncated at the context length
    caps[5] = ""
    return caps


def test_trimmed_text_equals_open_clip(bundle):
    model = bundle.model.eval()
    assert can_trim_text(model)
    tokens = bundle.tokenizer(_captions(37, model.context_length))
    with torch.inference_mode():
        ref = model.encode_text(tokens)
        got = encode_text_trimmed(model, tokens)
        # a batch whose every caption is short takes the single-group path
        short = tokens[[0, 1, 2]]
        got_short = encode_text_trimmed(model, short)
    assert got.shape == ref.shape
    assert torch.allclose(got, ref, atol=1e-5, rtol=1e-4)
    assert torch.allclose(got_short, ref[[0, 1, 2]], atol=1e-5, rtol=1e-4)


def test_length_groups_cover_every_row_once():
    rng = np.random.default_rng(2)
    for n in (1, 7, 64, 512):
        lengths = rng.integers(2, 78, size=n)
        lengths[rng.integers(0, n)] = 77
        groups = length_groups(lengths, context=77)
        idx = np.concatenate([g for g, _ in groups])
        assert sorted(idx.tolist()) == list(range(n))
        assert 1 <= len(groups) <= 4
        for g, L in groups:
            assert lengths[g].max() <= L <= 77
        padded = sum(len(g) * L for g, L in groups)
        assert padded <= n * 77
    # mostly short captions and one long one: the short ones must not pay for 77 positions
    lengths = np.array([10] * 63 + [77])
    groups = length_groups(lengths, context=77)
    assert sum(len(g) * L for g, L in groups) < 0.3 * 64 * 77


def _tar_bytes(members, fmt=None) -> bytes:
    import io
    import tarfile

    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=fmt or tarfile.USTAR_FORMAT) as tf:
        for name, data in members:
            ti = tarfile.TarInfo(name)
            if data is None:
                ti.type = tarfile.DIRTYPE
                tf.addfile(ti)
                continue
            ti.size = len(data)
            tf.addfile(ti, io.BytesIO(data))
    return buf.getvalue()


def test_plain_tar_parser_matches_tarfile():
    """The embed step's direct ustar parser gives tarfile's members, or steps aside (None)."""
    import tarfile

    from laiontools.wds.tarscan import plain_members as _plain_tar_members
    from laiontools.wds.tarscan import tarfile_payloads

    rng = np.random.default_rng(3)
    plain = [("000001.jpg", rng.bytes(1000)), ("000001.txt", b"a cat"), ("000001.json", b"{}"),
             ("dir", None), ("sub/000002.jpg", rng.bytes(512)), ("sub/000002.txt", b""),
             ("p" * 90 + "/" + "q" * 60 + ".txt", b"long name in the ustar prefix field")]
    for fmt, members in ((tarfile.USTAR_FORMAT, plain), (tarfile.GNU_FORMAT, plain[:-1])):
        data = _tar_bytes(members, fmt)
        got = _plain_tar_members(data)
        assert got is not None and got == tarfile_payloads(data)
        assert [n for n, _ in got][:2] == ["000001.jpg", "000001.txt"]
    # per-file pax headers (what img2dataset / webdataset write) are read here; GNU long names by tarfile
    pax = _tar_bytes([("é" * 120 + ".txt", b"x")], tarfile.PAX_FORMAT)
    assert _plain_tar_members(pax) == tarfile_payloads(pax) == [("é" * 120 + ".txt", b"x")]
    gnu_long = _tar_bytes([("g" * 150 + ".txt", b"y")], tarfile.GNU_FORMAT)
    assert _plain_tar_members(gnu_long) is None
    # damage: a flipped header byte, truncated data, an empty file -> not parsed here
    data = bytearray(_tar_bytes(plain))
    data[5] ^= 0xFF
    assert _plain_tar_members(bytes(data)) is None
    assert _plain_tar_members(_tar_bytes(plain)[:700]) is None
    assert _plain_tar_members(b"") is None


def test_damaged_later_header_is_an_error_not_fewer_samples(tmp_path):
    """tarfile alone stops silently at a bad header after the first and returns fewer members; the
    stages' tar reading (embed and reshard) must call the shard damaged instead."""
    import tarfile

    from laiontools.stages.embed import ShardError, read_shard_samples
    from laiontools.stages.reshard import index_source_shard
    from laiontools.wds.tarscan import tar_payloads

    members = [(f"{i:06d}.{ext}", b"x" * 700) for i in range(4) for ext in ("jpg", "txt")]
    data = bytearray(_tar_bytes(members))
    data[4 * 1536 + 5] ^= 0xFF  # 5th header (each member: 512 header + 1024 data): checksum breaks
    with tarfile.open(fileobj=__import__("io").BytesIO(bytes(data))) as tf:
        assert len(tf.getmembers()) == 4  # what tarfile does on its own: 4 of 8, no error
    with pytest.raises(tarfile.ReadError, match="offset 6144"):
        tar_payloads(bytes(data))
    p = tmp_path / "damaged.tar"
    p.write_bytes(bytes(data))
    with pytest.raises(ShardError, match="damaged.tar"):
        read_shard_samples(str(p), None)
    # inside a Spark task the user error travels as a marked RuntimeError (reshard unwraps it)
    with pytest.raises(RuntimeError, match="damaged.tar.*unreadable tar header at offset 6144"):
        index_source_shard(("00000", str(p)))


def test_reshard_index_refuses_a_sample_with_a_member_twice(tmp_path):
    """webdataset refuses a sample holding one extension twice; reshard's index does too, naming the
    shard (before, both members were copied and the output sample held two .jpg)."""
    from laiontools.stages.reshard import index_source_shard

    ok = [("000000.jpg", b"a"), ("000000.json", b"{}"), ("dir/000001.jpg", b"b"), ("dir/000001.JPG", b"c")]
    p = tmp_path / "ok.tar"
    p.write_bytes(_tar_bytes(ok))
    rows = index_source_shard(("s", str(p)))
    # webdataset's key rule: the folder is part of the key, the extension keeps its case here
    assert [(k, e) for _, k, e, *_ in rows] == [
        ("000000", "jpg"), ("000000", "json"), ("dir/000001", "jpg"), ("dir/000001", "JPG")]
    p = tmp_path / "twice.tar"
    p.write_bytes(_tar_bytes([*ok, ("000002.jpg", b"x"), ("000002.txt", b"t"), ("000002.jpg", b"y")]))
    with pytest.raises(RuntimeError, match=r"twice.tar: 000002.jpg: a second .jpg member in one sample"):
        index_source_shard(("s", str(p)))


def test_header_scan_matches_tarfile(tmp_path):
    """reshard's header-only index (tarscan.scan_headers) gives tarfile's offsets, or steps aside."""
    import tarfile

    from laiontools.wds.tarscan import scan_headers

    rng = np.random.default_rng(4)
    members = [(f"{i:06d}.{ext}", rng.bytes(int(rng.integers(0, 3000)))) for i in range(20) for ext in ("jpg", "txt")]
    members.insert(3, ("adir", None))
    data = _tar_bytes(members)
    p = tmp_path / "a.tar"
    p.write_bytes(data)
    with open(p, "rb") as f:
        got = scan_headers(f, len(data))
    with tarfile.open(p) as tf:
        ref = [(ti.name, ti.offset_data, ti.size, ti.mtime) for ti in tf if ti.isfile()]
    assert got == ref and len(got) == 40
    for bad in (data[:1000], data[:-1024 * 10 - 1], b"x" * 2048):
        q = tmp_path / "b.tar"
        q.write_bytes(bad)
        with open(q, "rb") as f:
            assert scan_headers(f, len(bad)) is None, len(bad)


def test_pax_tars_scan_directly_with_spans(tmp_path):
    """img2dataset / webdataset write pax tars (a pax header with a float mtime before every member):
    tarscan reads them without tarfile, gives tarfile's offsets, each member's header start, one
    byte span per sample whose members are adjacent, and parses a span back into its members."""
    import io
    import tarfile

    from laiontools.wds.tarscan import _tarfile_members, parse_span, sample_spans, scan_headers, tar_members

    rng = np.random.default_rng(5)
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as tf:
        names = [f"{i:07d}.{ext}" for i in range(12) for ext in ("jpg", "json", "txt")]
        names[5] = "d/" + "x" * 120 + ".jpg"  # a path only a pax record can hold
        names[30], names[33] = names[33], names[30]  # two samples interleaved: no spans for them
        for k, name in enumerate(names):
            data = rng.bytes(int(rng.integers(0, 2000)))
            ti = tarfile.TarInfo(name)
            ti.size, ti.mtime = len(data), 1_796_014_623.25 + k
            tf.addfile(ti, io.BytesIO(data))
    data = buf.getvalue()
    assert data[156:157] == b"x"  # really pax
    ref = _tarfile_members(io.BytesIO(data), len(data))
    assert tar_members(io.BytesIO(data), len(data)) == ref
    assert scan_headers(io.BytesIO(data), len(data)) == [(n, off, size, mt) for n, _, off, size, mt in ref]
    spans = sample_spans(ref)
    def key_of(name):  # webdataset's own key rule (the folder is part of the key)
        from webdataset.tariterators import base_plus_ext

        return base_plus_ext(name)[0]
    # 0000011's jpg now comes first and its json/txt after all of 0000010's members: no span for it
    assert set(spans) == {key_of(n) for n, *_ in ref} - {"0000011"}
    for key, (off, n) in spans.items():
        got = parse_span(data[off : off + n])
        want = [(name, doff - off, size, mt) for name, _, doff, size, mt in ref if key_of(name) == key]
        assert got == want and got, key
    off, n = spans["0000002"]
    assert parse_span(data[off + 512 : off + n]) is None  # a span cut at the wrong place
    assert parse_span(data[off : off + n - 512]) is None
    assert parse_span(data[off : off + n + 1024]) is None  # runs into the next sample's bytes: ends mid-member or holds more


def test_trim_check_accepts_clip_and_refuses_others(bundle):
    """The embed step trims captions only after checking it reproduces encode_text on this open_clip."""
    from laiontools.models.embedder import Embedder
    from laiontools.models.encode import check_trimmed_text

    assert check_trimmed_text(bundle.model.eval(), bundle.tokenizer, "cpu")
    assert Embedder("lt-tiny", device="cpu").trim_text

    class Other(torch.nn.Module):  # not an open_clip CLIP: never trimmed
        def encode_text(self, t):
            return t.float()

    assert not check_trimmed_text(Other(), bundle.tokenizer, "cpu")


def test_download_shard_spans_skip_an_unreadable_tar(tmp_path):
    """download's span job: a tar it cannot index gives no spans (its catalog rows keep null spans,
    so reshard indexes that shard and names the damage) and does not stop the other shards."""
    import io
    import tarfile

    import pyarrow as pa

    from laiontools.stages.download import shard_spans

    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as tf:
        for name in ("k1.jpg", "k1.txt", "k2.jpg", "k2.txt"):
            ti = tarfile.TarInfo(name)
            ti.size, ti.mtime = 5, 1.5
            tf.addfile(ti, io.BytesIO(b"abcde"))
    good, bad = tmp_path / "good.tar", tmp_path / "bad.tar"
    good.write_bytes(buf.getvalue())
    bad.write_bytes(b"not a tar at all" * 100)
    batch = pa.RecordBatch.from_pydict({"_sid": ["bad", "good", "gone"], "_tar": [str(bad), str(good), str(tmp_path / "gone.tar")]})
    rows = pa.Table.from_batches(list(shard_spans([batch]))).to_pydict()
    assert rows["_sid"] == ["good", "good"] and rows["_skey"] == ["k1", "k2"]
    assert rows["_toff"] == [0, 4096] and rows["_tlen"] == [4096, 4096]  # 2 × (pax header + records + header + data)


def test_parse_span_gives_the_scanners_members_on_valid_and_damaged_spans():
    """parse_span (reshard's per-sample parser) against the general header scanner in span mode, on
    every sample span of a pax tar (img2dataset's format) and of a plain ustar one, and on the same spans
    cut, shifted, extended, with the magic, type flag or size of a header damaged: the same members,
    or None on both sides."""
    import io
    import tarfile

    from laiontools.wds.tarscan import _scan, parse_span, sample_spans, tar_members

    def reference(b: bytes):
        m = _scan(io.BytesIO(b), len(b), verify=False, span=True)
        return None if m is None else [(name, off, size, mt) for name, _, off, size, mt in m]

    rng = np.random.default_rng(11)
    checked = 0
    for fmt in (tarfile.PAX_FORMAT, tarfile.USTAR_FORMAT):
        buf = io.BytesIO()
        with tarfile.open(fileobj=buf, mode="w", format=fmt) as tf:
            for i in range(20):
                for ext in ("jpg", "json", "txt"):
                    data = rng.bytes(int(rng.integers(0, 3000)))
                    ti = tarfile.TarInfo(f"{i:07d}.{ext}")
                    # a float mtime is what makes tarfile (so webdataset) write a pax header per member
                    ti.size, ti.mtime = len(data), 1_796_014_623 + i + (0.25 if fmt == tarfile.PAX_FORMAT else 0)
                    tf.addfile(ti, io.BytesIO(data))
        data = buf.getvalue()
        assert (data[156:157] == b"x") == (fmt == tarfile.PAX_FORMAT)
        for off, n in sample_spans(tar_members(io.BytesIO(data), len(data))).values():
            span = data[off : off + n]
            assert parse_span(span) == reference(span) and parse_span(span)
            assert parse_span(memoryview(span)) == reference(span)
            variants = [span[512:], span[:-512], span + data[off + n : off + n + 1024], span[:-1], b"\0" * 512 + span]
            for at, val in ((257, b"x"), (156, b"7"), (124, b"9"), (130, b"\xff")):  # magic, flag, size digits
                for h in (0, 512, 1024):  # first header (pax or plain), the next ones
                    d = bytearray(span)
                    d[h + at : h + at + 1] = val
                    variants.append(bytes(d))
            for v in variants:
                assert parse_span(v) == reference(v), (fmt, off, len(v))
                checked += 1
    assert checked > 500


def _pax_tar(members) -> bytes:
    """A pax tar of (name, data, pax records) members, as webdataset writes them."""
    import io
    import tarfile

    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as tf:
        for name, data, pax in members:
            ti = tarfile.TarInfo(name)
            ti.size, ti.mtime, ti.pax_headers = len(data), 1_700_000_000.5, pax
            tf.addfile(ti, io.BytesIO(data))
    return buf.getvalue()


@pytest.mark.parametrize("mtime", ["inf", "-inf", "1e400", "nan"])
def test_a_pax_mtime_that_is_no_finite_number_is_a_read_error(tmp_path, mtime):
    """A pax header's mtime is a decimal that Python's float() reads as infinity or NaN: every reader
    (the header index, the sample reader, reshard's tar index and its span parser) names the member in
    a tarfile.ReadError or a task error; none fails with an OverflowError from int()."""
    import io
    import tarfile

    from laiontools.stages.reshard import index_source_shard
    from laiontools.wds.samples import iter_samples
    from laiontools.wds.tarscan import parse_span, tar_index

    data = _pax_tar([("k1.jpg", b"abc", {}), ("k1.txt", b"t", {}), ("k2.jpg", b"xyz", {"mtime": mtime}), ("k2.txt", b"u", {})])
    with pytest.raises(tarfile.ReadError, match=r"member k2.jpg at offset \d+: mtime .* is not a finite number"):
        tar_index(io.BytesIO(data), len(data))
    with pytest.raises(tarfile.ReadError, match="k2.jpg"):
        list(iter_samples(io.BytesIO(data), len(data)))
    with pytest.raises(tarfile.ReadError, match="k2.jpg"):
        list(iter_samples(data))
    p = tmp_path / "s.tar"
    p.write_bytes(data)
    with pytest.raises(RuntimeError, match=r"s.tar is truncated or unreadable \(member k2.jpg .* not a finite number"):
        index_source_shard(("s", str(p)))
    # the span parser steps aside (None: reshard then names the span as not the sample's members);
    # a sample alone in a tar is its span: 2 members x (pax header, its records, header, data) blocks
    alone = _pax_tar([("k2.jpg", b"xyz", {"mtime": mtime}), ("k2.txt", b"u", {})])
    fine = _pax_tar([("k2.jpg", b"xyz", {"mtime": "12.5"}), ("k2.txt", b"u", {})])
    assert parse_span(fine[:4096]) == [("k2.jpg", 1536, 3, 12), ("k2.txt", 3584, 1, 1_700_000_000)]
    assert parse_span(alone[:4096]) is None


def test_ustar_header_clamps_an_mtime_it_cannot_hold_and_refuses_a_size():
    """reshard writes ustar headers: an mtime before 1970 or from 2242 on (a pax or GNU header can carry
    one) is clamped into ustar's range, as tarfile reads the result back; a size of 8 GiB or more is a
    ValueError naming the member, not tarfile's bare "overflow in number field"."""
    import io
    import tarfile

    from laiontools.wds.writer import ustar_header

    for mtime, want in ((-5, 0), (8**11 + 7, 8**11 - 1), (1_700_000_000, 1_700_000_000)):
        block = ustar_header(b"k.jpg", 3, mtime) + b"abc".ljust(512, b"\0") + bytes(1024)
        with tarfile.open(fileobj=io.BytesIO(block)) as tf:
            (ti,) = tf.getmembers()
        assert (ti.name, ti.size, ti.mtime) == ("k.jpg", 3, want)
    with pytest.raises(ValueError, match=r"member k.jpg has 8589934592 bytes, which a ustar header cannot hold"):
        ustar_header(b"k.jpg", 8**11, 0)


@pytest.mark.parametrize("where", ["ustar", "pax"])
@pytest.mark.parametrize("size", ["-1", "-512", "-1000", "-2048", "1_0", "+5"])
def test_a_size_that_is_no_plain_number_is_a_read_error_not_a_hang(where, size):
    """A member size field that Python's int() takes but a tar cannot mean: a negative size (octal
    "-0000001750" in a ustar header, or a pax record) made the header scanner step back onto the same
    header forever, and tarfile yield the member again or seek before the start. Every reader raises
    tarfile.ReadError naming the member (or, for "+5" / "1_0" in a pax record, reads what tarfile
    reads); the span parser steps aside. Bounded by an alarm: the old code never returned."""
    import gzip
    import io
    import signal
    import tarfile

    from laiontools.wds.samples import iter_samples
    from laiontools.wds.tarscan import parse_span, tar_index

    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT if where == "pax" else tarfile.USTAR_FORMAT) as tf:
        for k in ("000000", "000001"):
            ti = tarfile.TarInfo(f"{k}.txt")
            ti.size = 5
            if where == "pax" and k == "000000":
                ti.pax_headers = {"size": size}
            tf.addfile(ti, io.BytesIO(b"hello"))
    data = bytearray(buf.getvalue())
    if where == "ustar":  # the first header's size field, in octal, checksum made valid again
        field = size if not size.lstrip("-").isdigit() else ("-" if size[0] == "-" else "") + f"{abs(int(size)):o}"
        data[124:136] = field.encode().rjust(11, b" ") + b"\0"
        data[148:156] = b" " * 8
        data[148:156] = b"%06o\0 " % sum(data[:512])
    data = bytes(data)

    def timeout(*_: object) -> None:
        raise TimeoutError("the tar reader did not return")

    old = signal.signal(signal.SIGALRM, timeout)
    signal.alarm(20)
    try:
        if size in ("+5", "1_0"):  # tarfile's int() reads them (5, and 10 or octal 8 bytes): so does tar_index
            got = tar_index(io.BytesIO(data), len(data))
            assert [(n, s) for n, _, s, _ in got] == [("000000.txt", int(size, 8 if where == "ustar" else 10)), ("000001.txt", 5)]
        else:
            for read in (lambda: tar_index(io.BytesIO(data), len(data)), lambda: list(iter_samples(data)),
                         lambda: list(iter_samples(io.BytesIO(data), len(data))),
                         lambda: list(iter_samples(gzip.compress(data)))):
                with pytest.raises(tarfile.ReadError, match=r"000000\.txt|offset 0"):
                    read()
        assert parse_span(data[: 2048 if where == "pax" else 1024]) is None
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, old)


# ---------------------------------------------------------------------------------------------
# registry: checkpoints that are not a model's weights are refused by name, never a traceback


def _save_weird(path, kind: str) -> None:
    if kind == "empty_dict":
        torch.save({}, path)
    elif kind == "tensor":
        torch.save(torch.zeros(3), path)
    elif kind == "list":
        torch.save([1, 2], path)
    elif kind == "non_tensor_values":
        torch.save({"epoch": 3, "lr": 0.1}, path)
    elif kind == "garbage_safetensors":
        path.write_bytes(b"garbage not safetensors")
    elif kind == "cut_safetensors":
        from safetensors.torch import save_file

        save_file(load_model("lt-tiny").model.state_dict(), str(path))
        path.write_bytes(path.read_bytes()[:200])


@pytest.mark.parametrize("kind,name", [("empty_dict", "w.pt"), ("tensor", "w.pt"), ("list", "w.pt"),
                                       ("non_tensor_values", "w.pt"), ("garbage_safetensors", "w.safetensors"),
                                       ("cut_safetensors", "w.safetensors")])
def test_checkpoint_that_is_no_state_dict_is_a_model_error_naming_it(tmp_path, kind, name):
    from laiontools.models.registry import ModelError

    path = tmp_path / name
    _save_weird(path, kind)
    with pytest.raises(ModelError, match=str(path)):
        load_model("lt-tiny", str(path))


def test_real_state_dict_and_safetensors_still_load(tmp_path):
    from safetensors.torch import save_file

    sd = {k: v.clone() for k, v in load_model("lt-tiny").model.state_dict().items()}
    with torch.no_grad():
        next(iter(sd.values())).add_(1.0)
    torch.save(sd, tmp_path / "w.pt")
    torch.save({"state_dict": sd, "epoch": 1}, tmp_path / "wrapped.pt")
    save_file(sd, str(tmp_path / "w.safetensors"))
    for f in ("w.pt", "wrapped.pt", "w.safetensors"):
        got = load_model("lt-tiny", str(tmp_path / f)).model.state_dict()
        k = next(iter(sd))
        assert torch.equal(got[k], sd[k]), f


@pytest.mark.parametrize("grown", ["image_size", "context_length"])
def test_checkpoint_of_another_image_size_or_context_length_is_refused_not_interpolated(tmp_path, grown):
    """open_clip loads strictly but resizes position embeddings to the model's: a checkpoint trained at 96 px
    (or with 77 tokens) given as lt-tiny (64 px, 32 tokens) -- a ViT-L-14-336 checkpoint given as ViT-L-14 --
    loaded and embedded at a resolution it never saw, with an INFO line only. Also DDP-saved ('module.')."""
    import open_clip

    from laiontools.models.registry import ModelError, register_tiny_models

    register_tiny_models()
    force = {"image_size": {"force_image_size": 96}, "context_length": {"force_context_length": 77}}[grown]
    sd = open_clip.create_model("lt-tiny", **force).state_dict()
    key = {"image_size": "visual.positional_embedding", "context_length": "positional_embedding"}[grown]
    want = {"image_size": [(96 // 16) ** 2 + 1, 64], "context_length": [77, 64]}[grown]
    assert list(sd[key].shape) == want
    for name, obj in (("w.pt", sd), ("ddp.pt", {"state_dict": {f"module.{k}": v for k, v in sd.items()}})):
        torch.save(obj, tmp_path / name)
        with pytest.raises(ModelError, match=re.escape(f"{tmp_path / name} does not fit model 'lt-tiny' ({key} {want}")):
            load_model("lt-tiny", str(tmp_path / name))


# In a fresh process: the peak of the resident memory above what it held before, in bytes, while tarscan indexes
# the tar at argv[1] (what embed, dedup, takedown and reshard do to a whole shard); then the member count.
_INDEX_PEAK = """
import os, sys
from laiontools.testing import procs
from laiontools.wds import tarscan
import numpy

before = procs.reset_peak()
with open(sys.argv[1], "rb") as f:
    members = tarscan.tar_members(f, os.path.getsize(sys.argv[1]))
print(procs.peak_above(before), len(members))
"""


def test_the_header_scan_checks_checksums_in_batches_and_holds_no_copy_of_the_headers(tmp_path):
    """tarscan checked every header's checksum at the end, from a list of every header joined and copied to int64:
    ~4x a tar of small members at peak (395 MB for a 92 MB tar of 36k members). It checks them 8,192 at a time
    now: a bad checksum in any batch, the first, a middle one or the last, still sends the tar to tarfile
    (which then names the header), and the scan's peak is a small part of the tar (a fresh process)."""
    import os
    import subprocess
    import sys
    import tarfile

    from laiontools.wds import tarscan

    members = [(f"{i:06d}.{ext}", b"x" * 3) for i in range(9000) for ext in ("jpg", "txt")]  # 18,000 headers
    data = _tar_bytes(members)
    p = tmp_path / "t.tar"
    p.write_bytes(data)
    with open(p, "rb") as f:
        got = tarscan.scan_headers(f, len(data))
        assert got is not None and got == tarscan.tarfile_index(f, len(data))  # the scan's own answer, checked by tarfile
    for k in (3, 9000, 17_999):  # a header in the first, the second and the last (partial) batch
        bad = bytearray(data)
        bad[k * 1024 + 148] ^= 0x01  # its stored checksum (each member: a header and one data block)
        with open(p, "wb") as f:
            f.write(bad)
        with open(p, "rb") as f:
            assert tarscan.scan_headers(f, len(bad)) is None, k
            with pytest.raises(tarfile.ReadError):
                tarscan.tar_index(f, len(bad))
    big = [(f"{i:06d}.{ext}", b"y" * 2000) for i in range(12_000) for ext in ("jpg", "json", "txt")]
    p.write_bytes(_tar_bytes(big, tarfile.PAX_FORMAT))
    out = subprocess.run([sys.executable, "-c", _INDEX_PEAK, str(p)], capture_output=True, text=True, check=True,
                         env={**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)})
    peak, n = map(int, out.stdout.split())
    assert n == 36_000
    assert peak < 0.25 * p.stat().st_size, (peak, p.stat().st_size)  # ~0.14 here; was ~4.3
