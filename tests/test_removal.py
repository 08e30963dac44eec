"""Removal lists (issue 14, part 2): the format, what an entry matches, and `verify --removal-list`."""

from __future__ import annotations

import hashlib
import io
import json
import os
import tarfile
from pathlib import Path

import pytest

from laiontools.contracts.removal import RemovalListError, parse_removal_list, read_removal_list


def test_parse_and_match_every_kind():
    uid = "0123456789abcdef0123456789abcdef"
    text = (
        "# takedown batch 7\n\n"
        "url HTTP://Example.COM:80/a.jpg#frag\n"
        "domain bad.example.org   # whole host\n"
        f"uid {uid.upper()}\n"
        f"sha256 {'ab' * 32}\n"
        f"md5 {uid}\n"  # same 32 hex as the uid: the kind keeps them apart
        "phash 00000000000000ff 2\n"
    )
    rl = parse_removal_list(text, "list.txt")
    assert rl.entries == 6 and rl.sha256 == hashlib.sha256(text.encode()).hexdigest()
    assert str(rl.match(url="http://example.com/a.jpg")) == "url http://example.com/a.jpg (line 3)"
    assert rl.match(url="http://example.com/b.jpg") is None
    assert rl.match(url="https://img.bad.example.org/x.png").line == 4  # subdomain
    assert rl.match(url="https://notbad.example.org/x.png") is None and rl.match(url="https://example.org/") is None
    assert rl.match(uid=uid).kind == "uid" and rl.match(md5=uid).kind == "md5" and rl.match(sha256=uid) is None
    assert rl.match(sha256="AB" * 32).line == 6
    assert rl.match(phash="00000000000000fc").kind == "phash"  # 2 bits away
    assert rl.match(phash="00000000000000f0") is None  # 4 bits away
    assert rl.needs_content and list(rl.uid_array()["hi"]) == [0x0123456789ABCDEF]


def test_every_line_a_sample_hits_and_repeated_values_point_at_their_first_line():
    """match() gives the first entry; match_all() every entry, so that a takedown can name the lines that
    matched nothing. A repeated value (in another spelling too) is the line that first gave it."""
    text = ("url http://a.example/x.jpg\n"
            "domain a.example\n"
            "domain example\n"
            "url HTTP://A.EXAMPLE:80/x.jpg   # the same URL again\n"
            "phash 00000000000000ff 2\n"
            "phash 00000000000000fe 0\n")
    rl = parse_removal_list(text)
    assert [(h.kind, h.line) for h in rl.match_all(url="http://a.example/x.jpg")] == [("url", 1), ("domain", 2), ("domain", 3)]
    assert rl.match(url="http://a.example/x.jpg").line == 1
    assert [h.line for h in rl.match_all(phash="00000000000000fe")] == [5, 6]
    assert rl.lines == {1: ("url http://a.example/x.jpg", 1), 2: ("domain a.example", 2), 3: ("domain example", 3),
                        4: ("url http://a.example/x.jpg", 1), 5: ("phash 00000000000000ff 2", 5), 6: ("phash 00000000000000fe 0", 6)}


@pytest.mark.parametrize("line, msg", [
    ("sha1 abcd", "unknown kind 'sha1'"),
    ("url ftp://x.org/a", "not an http"),
    ("url", "without a value"),
    ("domain https://example.com/", "not a host name"),
    ("uid 1234", "uid must be 32 hex"),
    ("sha256 " + "g" * 64, "sha256 must be 64 hex"),
    ("phash 00000000000000ff x", "max distance must be a whole number"),
    ("phash 00000000000000ff 40", r"in \[0, 32\]"),
    ("md5 " + "0" * 32 + " extra", "takes one value"),
])
def test_malformed_line_names_the_line(line, msg):
    with pytest.raises(RemovalListError, match=rf"list\.txt:3: .*{msg}"):
        parse_removal_list(f"# ok\nuid {'0' * 32}\n{line}\n", "list.txt")


def test_read_errors(tmp_path):
    with pytest.raises(RemovalListError, match="does not exist"):
        read_removal_list(str(tmp_path / "nope.txt"))
    p = tmp_path / "latin.txt"
    p.write_bytes(b"uid " + b"0" * 32 + b"\ndomain caf\xe9.com\n")
    with pytest.raises(RemovalListError, match=r"latin\.txt:2: not UTF-8"):
        read_removal_list(str(p))
    with pytest.raises(RemovalListError, match=r"is a folder; give the list's file"):
        read_removal_list(str(tmp_path))


def test_a_list_given_through_a_pipe_is_read(tmp_path):
    """`--list <(grep ... list.txt)`: the shell gives a pipe (/dev/fd/N), which cannot seek; it was a
    traceback ("File or stream is not seekable", walk F21). Here a real FIFO with a writer thread."""
    import threading

    fifo = str(tmp_path / "list.fifo")
    os.mkfifo(fifo)
    text = f"uid {'0' * 32}\ndomain example.org\n"

    def write() -> None:
        with open(fifo, "w") as f:
            f.write(text)

    t = threading.Thread(target=write, daemon=True)
    t.start()
    rl = read_removal_list(fifo)
    t.join(timeout=10)
    assert rl.entries == 2 and rl.sha256 == hashlib.sha256(text.encode()).hexdigest()


@pytest.fixture(scope="module")
def small_pool(tmp_path_factory) -> dict:
    from laiontools.testing.planted_pool import download_settings, jpeg, photo, write_resized_pool

    base = tmp_path_factory.mktemp("removal_pool")
    samples = [{"bytes": jpeg(photo(i, (80, 60))), "caption": f"photo {i}", "url": f"http://127.0.0.{2 + i % 2}/p/{i}.jpg"}
               for i in range(12)]
    manifest, uids = write_resized_pool(str(base / "pool"), samples, download_settings("border", 64), per_shard=5)
    stored = {}  # url -> (shard path, key, stored image bytes)
    with open(manifest) as f:
        m = json.load(f)
    for s in m["shards"]:
        with tarfile.open(os.path.join(base, "pool", s["path"])) as tf:
            members = {mm.name: tf.extractfile(mm).read() for mm in tf.getmembers()}
        for name, data in members.items():
            if name.endswith(".json"):
                meta = json.loads(data)
                stored[meta["url"]] = (s["path"], meta["key"], members[f"{meta['key']}.jpg"])
    return {"manifest": manifest, "uids": uids, "stored": stored, "base": base}


def _verify(capsys, manifest: str, listfile: str) -> tuple[int, str]:
    from laiontools.stages.verify import verify_main

    rc = verify_main([manifest, "--removal-list", listfile, "-v"])
    return rc, capsys.readouterr().out


def test_verify_removal_list_names_every_remaining_item(small_pool, tmp_path, capsys):
    import imagehash
    from PIL import Image

    st = small_pool["stored"]
    _, key_sha, img_sha = st["http://127.0.0.3/p/5.jpg"]
    _, key_ph, img_ph = st["http://127.0.0.2/p/8.jpg"]
    ph = int(str(imagehash.phash(Image.open(io.BytesIO(img_ph)).convert("RGB"))), 16) ^ 0b11  # 2 bits off
    lst = tmp_path / "takedown.txt"
    lst.write_text(
        "url http://127.0.0.2/p/0.jpg\n"
        f"sha256 {hashlib.sha256(img_sha).hexdigest()}\n"
        f"phash {ph:016x} 2\n"
        f"uid {small_pool['uids'][11]}\n"
        "domain nowhere.example\n"
    )
    rc, out = _verify(capsys, small_pool["manifest"], str(lst))
    assert rc == 1 and "FAIL" in out
    assert f"sample {key_sha} matches sha256" in out and "(line 2)" in out
    assert f"sample {key_ph} matches phash" in out and "(line 3)" in out
    assert "matches url http://127.0.0.2/p/0.jpg (line 1)" in out
    assert f"uid {small_pool['uids'][11]} (line 4) is in the uid file" in out
    assert out.count("matches ") == 4  # url, sha256, phash, and the uid's own sample; nothing else

    clean = tmp_path / "none.txt"
    clean.write_text("url http://127.0.0.9/p/0.jpg\ndomain nowhere.example\nmd5 " + "0" * 32 + "\n")
    rc, out = _verify(capsys, small_pool["manifest"], str(clean))
    assert rc == 0 and "no listed item in the uid file or in the 3 shard(s)" in out


def test_verify_cli_refuses_a_malformed_list(small_pool, tmp_path, capsys):
    from laiontools.cli import main

    bad = tmp_path / "bad.txt"
    bad.write_text("url http://127.0.0.2/p/0.jpg\nsha256 nothex\n")
    assert main(["verify", small_pool["manifest"], "--removal-list", str(bad)]) == 2
    assert "bad.txt:2: sha256 must be 64 hex" in capsys.readouterr().err


def test_hosts_meet_in_one_spelling_idna_fullwidth_and_case():
    # a punycode entry matches the Unicode host and back; fullwidth letters and a trailing dot fold too
    rl = parse_removal_list("domain xn--bcher-kva.example\ndomain example.com\ndomain BÜCHER2.example.\n"
                            "url http://ＥＸＡＭＰＬＥ.org:80/a.jpg\n", "list.txt")
    assert "xn--bcher2-3ya.example" in rl.domains
    assert str(rl.match(url="http://bücher.example/x.jpg")) == "domain xn--bcher-kva.example (line 1)"
    assert rl.match(url="http://ＥＸＡＭＰＬＥ.com/y.jpg").line == 2
    assert rl.match(url="http://img.xn--bcher2-3ya.example/z.jpg").line == 3
    assert rl.match(url="http://example.org/a.jpg").kind == "url"
    assert rl.match(url="http://example.org/A.jpg") is None  # the path stays case-sensitive


def test_an_unparsable_catalog_url_matches_no_domain():
    rl = parse_removal_list("domain example.com\n", "list.txt")
    assert rl.match(url="http://[::1/x.jpg") is None
    assert rl.match(url="http://example.com:abc/x").kind == "domain"  # a bad port still has a plain host
    assert rl.match(url="http://example.com/x").kind == "domain"
    with pytest.raises(RemovalListError, match="list.txt:1: .*not an http"):
        parse_removal_list("url http://[::1/x.jpg\n", "list.txt")


def test_a_url_entry_keeps_its_spaces():
    # LAION URLs hold literal spaces: the entry is the rest of the line (a " #" starts a comment)
    rl = parse_removal_list("url http://example.com/my photo 1.jpg\nurl http://example.com/b  c.jpg   # batch 3\n", "list.txt")
    assert str(rl.match(url="http://example.com/my photo 1.jpg")) == "url http://example.com/my photo 1.jpg (line 1)"
    assert rl.match(url="http://example.com/my") is None  # not a prefix of the listed URL
    assert rl.match(url="http://example.com/b  c.jpg").line == 2 and rl.match(url="http://example.com/b c.jpg") is None


def test_a_url_entry_matches_every_spelling_of_the_same_request():
    """As the download's blocklist compares URLs (web.blocklist.canonical_url): a catalog URL with userinfo
    (no request carries it), percent-encoded unreserved characters or dot segments is the same request to
    the same host, so the entry takes it down; the entry is shown as written, without credentials."""
    rl = parse_removal_list("url http://Example.com/img/my photo.jpg?a=1\n", "list.txt")
    for url in ("http://example.com/img/my photo.jpg?a=1", "http://user:pw@example.com/img/my photo.jpg?a=1",
                "http://example.com/img/%6Dy%20photo.jpg?a=1", "http://example.com/x/../img/./my photo.jpg?a=1",
                "HTTP://EXAMPLE.COM:80/img/my%20photo.jpg?a=1"):
        m = rl.match(url=url)
        assert m is not None and str(m) == "url http://example.com/img/my photo.jpg?a=1 (line 1)", url
    for url in ("http://example.com/img/my  photo.jpg?a=1", "http://example.com/img/my photo.jpg?a=2",
                "http://example.com/IMG/my photo.jpg?a=1", "http://other.com/img/my photo.jpg?a=1"):
        assert rl.match(url=url) is None, url
    creds = parse_removal_list("url http://u:secret@example.com/a.jpg\n", "list.txt")
    assert "secret" not in str(creds.match(url="http://example.com/a.jpg")) and "secret" not in creds.lines[1][0]


def test_a_domain_entry_matches_names_by_label_and_an_address_only_itself():
    rl = parse_removal_list("domain 10.0.0.2\ndomain example.com\n", "list.txt")
    assert rl.match(url="http://10.0.0.2:8080/a.jpg").line == 1 and rl.match(url="http://0xa000002/a.jpg").line == 1
    assert rl.match(url="http://[::ffff:10.0.0.2]/a.jpg").line == 1  # the same address
    assert rl.match(url="http://img.10.0.0.2/a.jpg") is None and rl.match(url="http://1.10.0.0.2/a.jpg") is None
    assert rl.match(url="http://img.example.com/a.jpg").line == 2 and rl.match(url="http://badexample.com/") is None
    two = parse_removal_list("domain 2\n", "list.txt")  # the address 0.0.0.2, not a suffix of every IPv4 host
    assert two.match(url="http://0.0.0.2/a.jpg").line == 1
    assert [two.match(url=f"http://{h}/a.jpg") for h in ("10.0.0.2", "192.168.1.2", "img.example.2", "2.2")] == [None] * 4


def _pool_copy(small_pool: dict, tmp_path) -> tuple[str, str, list]:
    """A copy of the small pool to damage: (its manifest, its first shard's tar, [(TarInfo, bytes)] of that tar)."""
    import shutil

    shutil.copytree(os.path.join(small_pool["base"], "pool"), tmp_path / "pool")
    manifest = str(tmp_path / "pool" / os.path.relpath(small_pool["manifest"], os.path.join(small_pool["base"], "pool")))
    with open(manifest) as f:
        tar = os.path.join(os.path.dirname(manifest), json.load(f)["shards"][0]["path"])
    with tarfile.open(tar) as tf:
        members = [(m, tf.extractfile(m).read()) for m in tf.getmembers()]
    return manifest, tar, members


def test_verify_removal_list_reports_a_sample_uid_that_is_no_string(small_pool, tmp_path, capsys):
    manifest, tar, members = _pool_copy(small_pool, tmp_path)
    names = [m.name for m, _ in members if m.name.endswith(".json")]
    odd = {names[0]: 123, names[1]: None}  # a number and a null where the uid string belongs
    with tarfile.open(tar, "w") as tf:
        for m, data in members:
            if m.name in odd:
                data = json.dumps({**json.loads(data), "uid": odd[m.name]}).encode()
                m.size = len(data)
            tf.addfile(m, io.BytesIO(data))
    lst = tmp_path / "list.txt"
    lst.write_text(f"uid {'f' * 32}\n")
    rc, out = _verify(capsys, manifest, str(lst))
    assert rc == 1, out
    k0, k1 = (n.removesuffix(".json") for n in names[:2])
    assert f"sample {k0}: its .json uid is 123 (int), not a string" in out
    assert f"sample {k1}: its .json uid is null or missing, not a string" in out


def test_verify_removal_list_names_images_it_could_not_compare_with_phash_entries(small_pool, tmp_path, capsys):
    """An image that does not decode has no pHash: a pHash entry cannot be proved absent from it, so the proof
    names those samples instead of passing them over (walk F12; takedown counts them the same way). Its bytes
    still meet sha256/md5 entries, so a list without pHashes does not mention them."""
    manifest, tar, members = _pool_copy(small_pool, tmp_path)
    broken = next(m.name for m, _ in members if m.name.endswith(".jpg"))
    with tarfile.open(tar, "w") as tf:
        for m, data in members:
            if m.name == broken:
                data = b"not an image at all"
                m.size = len(data)
            tf.addfile(m, io.BytesIO(data))
    key = broken.removesuffix(".jpg")
    lst = tmp_path / "list.txt"
    lst.write_text(f"phash {'0' * 16}\n")
    rc, out = _verify(capsys, manifest, str(lst))
    assert rc == 1 and f"1 sample(s) whose image does not decode could not be compared with the list's pHash entries (e.g. {key})" in out, out
    lst.write_text(f"sha256 {'0' * 64}\n")
    _, out = _verify(capsys, manifest, str(lst))
    assert "could not be compared" not in out, out

def test_verify_removal_list_on_a_subset_checks_its_samples_in_the_pool(spark, pool, tmp_path, capsys):
    """A subset that is not resharded has no shards of its own. Its url, domain and hash entries were not
    checked at all: "OK" with a listed sample in the subset. Now its samples (its uid file's) are read from
    the pool's shards: a listed sample in the subset is named; one the subset does not hold is not."""
    from laiontools.contracts.uids import array_to_uids, load_uids
    from laiontools.stages import subsets as subsets_stage
    from laiontools.stages.subsets import SubsetsConfig

    pm = json.loads(Path(pool.manifest).read_text())
    res = subsets_stage.run(SubsetsConfig(pool=pool.manifest, output=str(tmp_path / "sub"), scales=str(pm["num_samples"] // 2),
                                          seed=0), spark).details
    sub = res[0]["manifest"]
    sm = json.loads(Path(sub).read_text())
    assert sm["shards"] == []
    held = set(array_to_uids(load_uids(str(tmp_path / "sub" / sm["uids"]["path"]))))
    samples = {}  # uid -> (url, key, image bytes), read from the pool's shards here
    for s in pm["shards"]:
        with tarfile.open(os.path.join(os.path.dirname(pool.manifest), s["path"])) as tf:
            members = {mm.name: tf.extractfile(mm).read() for mm in tf.getmembers() if mm.isfile()}
        for name, data in members.items():
            if name.endswith(".json"):
                meta = json.loads(data)
                samples[meta["uid"]] = (meta["url"], name[: -len(".json")], members[name[: -len(".json")] + ".jpg"])
    inside = [samples[u] for u in sorted(held)]
    outside = [v for u, v in sorted(samples.items()) if u not in held]
    assert len(inside) >= 2 and len(outside) >= 2
    lst = tmp_path / "takedown.txt"
    lst.write_text(f"url {inside[0][0]}\nsha256 {hashlib.sha256(inside[1][2]).hexdigest()}\nurl {outside[0][0]}\n")
    rc, out = _verify(capsys, sub, str(lst))
    assert rc == 1 and "FAIL" in out
    assert f"sample {inside[0][1]} matches url {inside[0][0]} (line 1)" in out
    assert f"sample {inside[1][1]} matches sha256" in out and "(line 2)" in out
    assert out.count("matches ") == 2 and "(line 3)" not in out

    clean = tmp_path / "outside.txt"
    clean.write_text(f"url {outside[0][0]}\nsha256 {hashlib.sha256(outside[1][2]).hexdigest()}\n")
    rc, out = _verify(capsys, sub, str(clean))
    assert rc == 0, out
    assert f"no listed item in the uid file or in the subset's samples in the pool's {len(pm['shards'])} shard(s)" in out


def test_content_hashes_pixel_limit_and_unread_member():
    """An image over the pixel limit gets no pHash, checked from its header before decoding (walk F10);
    a tar member over the byte limit whose bytes were not streamed through (a short read) gets no hash of
    empty bytes either (the readers' streamed hashes: tests/test_wds_keys.py)."""
    from PIL import Image

    from laiontools.contracts.removal import content_hashes
    from laiontools.core.images import OversizeMember

    buf = io.BytesIO()
    Image.new("1", (10_000, 10_000)).save(buf, format="PNG")
    h = content_hashes(buf.getvalue(), want_phash=True)
    assert h["phash"] is None and h["sha256"] == hashlib.sha256(buf.getvalue()).hexdigest()
    assert content_hashes(OversizeMember("k.jpg", 10, 5), want_phash=True) == {"sha256": None, "md5": None, "phash": None}


def test_verify_removal_list_matches_the_sha256_of_the_bytes_as_downloaded(small_pool, tmp_path, capsys):
    """A sha256 entry from a published hash list hashes the image as downloaded (the catalog's sha256, kept in
    the sample's .json), not the resized bytes the shard stores. takedown matched it through the catalog;
    verify compared only the stored bytes and said OK of a pool or resharded subset still holding the image."""
    from laiontools.testing.planted_pool import jpeg, photo

    original = jpeg(photo(7, (80, 60)))  # sample 7 as the server sent it (the fixture's own recipe)
    _, key, stored = small_pool["stored"]["http://127.0.0.3/p/7.jpg"]
    assert hashlib.sha256(original).digest() != hashlib.sha256(stored).digest()
    lst = tmp_path / "hashes.txt"
    lst.write_text(f"# a published list\nsha256 {hashlib.sha256(original).hexdigest()}\n")
    rc, out = _verify(capsys, small_pool["manifest"], str(lst))
    assert rc == 1 and f"sample {key} matches sha256" in out and "(line 2)" in out
    assert out.count("matches ") == 1


def test_a_byte_order_mark_and_tabs_are_read_and_a_list_of_comments_only_is_refused():
    """(lineage walk) a list saved with a UTF-8 BOM failed as "unknown kind '\\ufeffuid'", `uid<TAB>hex` was an
    unknown kind while `url<TAB>...` passed, and a file of comments only parsed to 0 entries (a takedown would
    go ahead and change nothing)."""
    u = "0123456789abcdef" * 2
    rl = parse_removal_list(f"\ufeffuid {u}\nsha256\t{'a' * 64}\ndomain\texample.com\n", "l.txt")
    assert rl.uids == {u: 1} and rl.sha256s == {"a" * 64: 2} and rl.domains == {"example.com": 3} and rl.entries == 3
    for text in ("", "# takedown batch 7\n\n   # nothing yet\n"):
        with pytest.raises(RemovalListError, match=r"l\.txt: no entry \(only blank lines and comments\)"):
            parse_removal_list(text, "l.txt")


def test_a_domain_line_with_a_second_host_is_refused_not_cut_to_its_first():
    """Every other kind refuses a second value on its line; a domain line kept its first host and dropped
    the rest without a word, so a takedown asked to remove b.example.org left all its images in."""
    text = "domain a.example.com\ndomain b.example.org c.example.net\n"
    with pytest.raises(RemovalListError, match=r"list\.txt:2: domain takes one value"):
        parse_removal_list(text, "list.txt")
    # one host and a comment stay one entry
    rl = parse_removal_list("domain b.example.org   # whole host\n", "list.txt")
    assert set(rl.domains) == {"b.example.org"}
