"""The synthetic LAION source and its local web: determinism, every route over a real socket, every
profile x format, expected statuses that cover every rejection reason, planted copies, prompt stop."""

from __future__ import annotations

import gzip
import io
import json
import os
import struct
import tarfile
import threading
import time
import urllib.error
import urllib.request
import zlib
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from laiontools.contracts import schema as S
from laiontools.contracts.uids import uid_of
from laiontools.synthetic import (
    EXPECTED_COLUMNS,
    FORMATS,
    PLANT_TRANSFORMS,
    PROFILES,
    ROUTES,
    SyntheticWebServer,
    expected_path,
    main,
    make_source,
    plant_copies,
    render_item,
    write_evalset,
    write_images,
    write_source,
)
from laiontools.synthetic.source import HTTP_ROUTES


def _get(url: str, timeout: float = 5.0) -> tuple[int, dict[str, str], bytes]:
    """(status, headers, body) of a GET, HTTP errors included (urllib follows redirects itself)."""
    try:
        with urllib.request.urlopen(url, timeout=timeout) as r:
            return r.status, dict(r.headers), r.read()
    except urllib.error.HTTPError as e:
        return e.code, dict(e.headers), e.read()


@pytest.fixture(scope="module")
def web(tmp_path_factory):
    d = tmp_path_factory.mktemp("web")
    items = write_images(str(d / "images"), 6, seed=3)
    with SyntheticWebServer(str(d / "images")) as server:
        yield server, items, str(d / "images")


# -- images ---------------------------------------------------------------------------------------

def test_render_is_deterministic_and_varied(tmp_path):
    a = write_images(str(tmp_path / "a"), 12, seed=5)
    b = write_images(str(tmp_path / "b"), 12, seed=5)
    c = write_images(str(tmp_path / "c"), 12, seed=6)
    assert a == b
    for it in a:
        assert (tmp_path / "a" / it["file"]).read_bytes() == (tmp_path / "b" / it["file"]).read_bytes()
    assert [it["sha256"] for it in a] != [it["sha256"] for it in c]
    assert len({it["shape"] for it in a}) >= 3 and len({it["colour"] for it in a}) >= 3
    for it in a:
        assert it["colour"] in it["caption"] and it["shape"] in it["caption"]
        with Image.open(tmp_path / "a" / it["file"]) as im:
            assert im.format == "JPEG" and 96 <= im.width <= 160 and im.size == (it["width"], it["height"])
    # start= continues the same sequence: item 7 is item 7 whatever the range.
    d = write_images(str(tmp_path / "d"), 2, seed=5, start=7)
    assert d[0] == a[7] and d[0]["file"] == "0000007.jpg"


def test_realistic_images_are_photo_sized():
    img, caption, attrs = render_item(1, seed=0, realistic=True)
    assert 512 <= img.width <= 800 and 512 <= img.height <= 800 and attrs["realistic"]
    buf = io.BytesIO()
    img.save(buf, "JPEG", quality=90)
    assert 30_000 < len(buf.getvalue()) < 200_000
    assert attrs["shape"] in caption


# -- server ---------------------------------------------------------------------------------------

def test_every_route_answers_as_documented(web):
    server, items, image_dir = web
    base, f = server.base_url, items[0]["file"]
    raw = Path(image_dir, f).read_bytes()

    code, h, body = _get(f"{base}/img/{f}")
    assert (code, h["Content-Type"], body) == (200, "image/jpeg", raw)
    for status in (404, 500, 503, 429):
        code, h, _ = _get(f"{base}/status/{status}/{f}")
        assert code == status
        if status in (429, 503):
            assert h["Retry-After"] == "1"
    code, h, body = _get(f"{base}/redirect/{f}")
    assert code == 200 and body == raw  # urllib followed the 302
    req = urllib.request.Request(f"{base}/redirect/{f}")
    opener = urllib.request.build_opener(type("NoRedirect", (urllib.request.HTTPRedirectHandler,),
                                              {"redirect_request": lambda *a, **k: None}))
    with pytest.raises(urllib.error.HTTPError) as e:
        opener.open(req, timeout=5)
    assert e.value.code == 302 and e.value.headers["Location"] == f"/img/{f}"
    code, h, body = _get(f"{base}/html/{f}")
    assert code == 200 and h["Content-Type"].startswith("text/html") and body.startswith(b"<!doctype html>")
    code, h, body = _get(f"{base}/corrupt/{f}")
    assert code == 200 and h["Content-Type"] == "image/jpeg" and len(body) == len(raw) and body != raw
    with pytest.raises(Exception):  # noqa: B017 - PIL raises OSError, SyntaxError or ValueError, by where the bytes break
        Image.open(io.BytesIO(body)).load()
    code, _, body = _get(f"{base}/truncated/{f}")
    assert code == 200 and raw.startswith(body) and len(body) == int(len(raw) * 0.3)
    for tag in ("noai", "noimageai"):
        code, h, body = _get(f"{base}/{tag}/{f}")
        assert code == 200 and h["X-Robots-Tag"] == tag and body == raw
    code, _, _ = _get(f"{base}/img/missing.jpg")
    assert code == 404
    code, _, _ = _get(f"{base}/img/..%2f{f}")
    assert code == 404
    code, _, _ = _get(f"{base}/unknown/{f}")
    assert code == 404


def test_huge_png_declares_absurd_size_and_decoders_refuse(web):
    server, items, _ = web
    code, h, body = _get(f"{server.base_url}/huge/{items[0]['file']}")
    assert code == 200 and h["Content-Type"] == "image/png" and len(body) < 200
    assert body[:8] == b"\x89PNG\r\n\x1a\n"
    length, kind = struct.unpack(">I4s", body[8:16])
    ihdr = body[16:16 + length]
    assert kind == b"IHDR" and struct.unpack(">II", ihdr[:8]) == (60000, 60000)
    assert struct.unpack(">I", body[16 + length:20 + length])[0] == zlib.crc32(kind + ihdr)
    with pytest.raises(Image.DecompressionBombError):  # PIL refuses before allocating
        Image.open(io.BytesIO(body))
    import cv2  # what img2dataset decodes with

    try:  # OpenCV refuses by raising (CV_IO_MAX_IMAGE_PIXELS) or by returning None, by version
        decoded = cv2.imdecode(np.frombuffer(body, np.uint8), cv2.IMREAD_UNCHANGED)
    except cv2.error as e:
        assert "CV_IO_MAX_IMAGE_PIXELS" in str(e)
    else:
        assert decoded is None


def test_flaky_turns_good_after_k_per_path_and_instance(tmp_path):
    write_images(str(tmp_path), 2)
    with SyntheticWebServer(str(tmp_path)) as server:
        url = f"{server.base_url}/flaky/2/0000000.jpg"
        assert [_get(url)[0] for _ in range(4)] == [503, 503, 200, 200]
        assert _get(f"{server.base_url}/flaky/2/0000001.jpg")[0] == 503  # counted per exact path
    with SyntheticWebServer(str(tmp_path)) as server:  # a new instance starts from zero
        assert _get(f"{server.base_url}/flaky/2/0000000.jpg")[0] == 503


def test_slow_serves_late_and_stop_is_prompt_with_slow_requests_in_flight(tmp_path):
    write_images(str(tmp_path), 1)
    server = SyntheticWebServer(str(tmp_path)).start()
    base = server.base_url
    code, _, body = _get(f"{base}/slow/0.3/0000000.jpg")
    assert code == 200 and body.startswith(b"\xff\xd8")
    # A client with a short timeout gives up on a long /slow/ request.
    with pytest.raises(OSError):
        urllib.request.urlopen(f"{base}/slow/60/0000000.jpg", timeout=0.5).read()
    results: list[object] = []

    def client() -> None:
        try:
            results.append(_get(f"{base}/slow/120/0000000.jpg", timeout=60)[0])
        except Exception as e:  # noqa: BLE001 - the server drops the connection on stop
            results.append(e)

    threads = [threading.Thread(target=client, daemon=True) for _ in range(3)]
    for t in threads:
        t.start()
    time.sleep(0.3)
    t0 = time.monotonic()
    server.stop()
    stop_took = time.monotonic() - t0
    for t in threads:
        t.join(10)
    assert not any(t.is_alive() for t in threads), "slow requests must end when the server stops"
    assert all(not isinstance(r, int) or r != 200 for r in results)
    assert stop_took < 5  # generous bound: 'prompt' means not waiting for the 120 s sleeps
    with pytest.raises(OSError):
        urllib.request.urlopen(f"{base}/img/0000000.jpg", timeout=2)


def test_server_starts_over_an_empty_folder_and_serves_files_written_later(tmp_path):
    with SyntheticWebServer(str(tmp_path / "later")) as server:
        assert _get(f"{server.base_url}/img/0000000.jpg")[0] == 404
        write_images(str(tmp_path / "later"), 1)
        assert _get(f"{server.base_url}/img/0000000.jpg")[0] == 200


def test_server_handles_concurrent_clients(web):
    server, items, _ = web
    codes: list[int] = []

    def worker() -> None:
        for k in range(25):
            codes.append(_get(f"{server.base_url}/img/{items[k % len(items)]['file']}")[0])

    threads = [threading.Thread(target=worker) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    assert codes == [200] * 200


# -- source metadata ------------------------------------------------------------------------------

def _jsonl_records(path: str) -> list[dict | None]:
    """Records of a jsonl(.gz) file; None for a line that is not JSON (a malformed_row row)."""
    opener = gzip.open if path.endswith(".gz") else open
    out: list[dict | None] = []
    with opener(path, "rt", encoding="utf-8") as f:
        for line in f:
            try:
                out.append(json.loads(line))
            except json.JSONDecodeError:
                out.append(None)
    return out


def _read(path: str, fmt: str) -> pd.DataFrame:
    if fmt == "parquet":
        import pyarrow.parquet as pq

        return pq.read_table(path).to_pandas()
    if fmt.startswith("jsonl"):
        return pd.DataFrame(_jsonl_records(path))
    return pd.read_csv(path, sep="\t" if fmt == "tsv" else ",", compression="gzip" if fmt.endswith(".gz") else None,
                       keep_default_na=True)


def _fake_items(n: int) -> list[dict]:
    """Items as write_images returns them, without the images: write_source never opens files."""
    return [{"id": i, "file": f"{i:07d}.jpg", "caption": f"a red circle number {i}", "width": 100, "height": 120,
             "sha256": f"{i:064x}"} for i in range(n)]


@pytest.mark.parametrize("profile", sorted(PROFILES))
@pytest.mark.parametrize("fmt", FORMATS)
def test_every_profile_and_format_reads_back(tmp_path, profile, fmt):
    items = _fake_items(56)  # enough rows for every route once
    out = str(tmp_path / "src")
    df = write_source(out, "http://127.0.0.1:9", items, profile=profile, fmt=fmt, n_files=2, seed=1)
    files = sorted(os.listdir(out))
    assert files == [f"part-00000.{fmt}", f"part-00001.{fmt}"]
    if fmt.startswith("jsonl"):
        recs = [r for f in files for r in _jsonl_records(os.path.join(out, f))]
        assert len(recs) == 56
        assert [r is None for r in recs] == (df["route"] == "malformed_row").tolist()
        assert (df["route"] == "malformed_row").any()
        back = pd.DataFrame([r for r in recs if r is not None])
        good = df[df["route"] != "malformed_row"].reset_index(drop=True)
    else:
        assert "malformed_row" not in set(df["route"])
        back = pd.concat([_read(os.path.join(out, f), fmt) for f in files], ignore_index=True)
        assert len(back) == len(df) == 56
        good = df
    assert list(back.columns) == list(PROFILES[profile])
    url_col = {"laion400m": "URL", "laion2b-en": "URL", "datacomp": "url", "generic": "url"}[profile]
    ok = good["route"] == "ok"
    assert list(back.loc[ok.values, url_col]) == list(good.loc[ok, url_col])
    assert df["row"].is_monotonic_increasing
    # The expected table lies beside the source folder, not inside it.
    exp = pd.read_parquet(expected_path(out))
    assert not expected_path(out).startswith(out + "/")
    assert list(exp.columns) == list(PROFILES[profile]) + list(EXPECTED_COLUMNS)
    assert exp["expected"].tolist() == df["expected"].tolist()


def test_single_file_output_and_scores(tmp_path):
    items = _fake_items(300)
    out = str(tmp_path / "laion.parquet")
    df = write_source(out, "http://127.0.0.1:9", items, profile="laion2b-en", seed=2)
    assert os.path.isfile(out) and os.path.isfile(out + ".expected.parquet")
    sim = df["similarity"]
    assert 0.29 < sim.mean() < 0.35 and 0.02 < sim.std() < 0.06 and sim.between(0, 1).all()
    assert (df["punsafe"] < 0.2).mean() > 0.7 and (df["punsafe"] > 0.5).any()
    assert (df["pwatermark"] > 0.8).any()
    broken = (df["route"] != "ok").mean()
    assert 0.15 < broken < 0.35
    small = write_source(str(tmp_path / "small"), "http://127.0.0.1:9", items[:20], seed=2)
    assert 3 <= (small["route"] != "ok").sum() <= 10  # too few rows for every route, still ~25% broken
    with pytest.raises(ValueError):
        write_source(str(tmp_path / "x.parquet"), "http://127.0.0.1:9", items, n_files=2)
    with pytest.raises(ValueError):
        write_source(str(tmp_path / "y"), "http://127.0.0.1:9", items, broken={"nope": 0.1})


def test_expected_covers_every_rejection_reason_and_route(tmp_path):
    """A strict policy with a public-looking base URL: every route and every rejection reason appear."""
    items = _fake_items(90)
    base = "http://images.example.com"
    df = write_source(str(tmp_path / "src"), base, items, seed=4, fmt="jsonl")
    assert set(df["route"]) == set(ROUTES)
    # (blocklisted needs a --blocklist file; tests/test_web_download.py covers it)
    assert {S.rejected(r) for r in S.rejection_reasons() if r != "blocklisted"} <= set(df["expected"])
    assert (df["expected"] == [ROUTES[r] for r in df["route"]]).all()
    assert set(df["expected"]) <= set(S.all_statuses())
    by = df.set_index("route", drop=False)
    # Each route's row is what it says.
    assert by.loc[by["route"] == "null_url", "URL"].isna().all()
    assert (by.loc[by["route"] == "url_too_long", "URL"].str.len() > 2048).all()
    assert by.loc[by["route"] == "bad_scheme", "URL"].str.match(r"^(file|ftp|data|javascript):").all()
    assert by.loc[by["route"] == "caption_too_long", "TEXT"].str.len().min() >= 10_000
    assert by.loc[by["route"] == "missing_caption", "TEXT"].fillna("").eq("").all()
    assert by.loc[by["route"] == "unresolvable_host", "URL"].str.contains(r"\.invalid/").all()
    for route in HTTP_ROUTES:
        assert by.loc[by["route"] == route, "URL"].str.startswith(base + "/").all(), route
    # Duplicates repeat an earlier good row's URL + caption, so they share its uid.
    uids = df["expected_uid"].tolist()
    for i in np.flatnonzero(df["route"] == "duplicate"):
        first = uids.index(uids[i])
        assert first < i and df["route"].iloc[first] == "ok"
        assert (df["URL"].iloc[first], df["TEXT"].iloc[first]) == (df["URL"].iloc[i], df["TEXT"].iloc[i])
    assert not by.loc[by["route"] == "private_address", "URL"].str.contains("169.254.169.254").any()
    non_dup = df[~df["route"].isin(["duplicate", "malformed_row"])]
    assert non_dup["expected_uid"].is_unique
    assert all(u == uid_of(url, cap) for u, url, cap in zip(df["expected_uid"], df["URL"], df["TEXT"]))
    # Flaky rows fail on the first pass and succeed after one retry; only transient routes change or retry.
    assert (df.loc[df["route"] == "flaky", "expected_after_retry"] == "success").all()
    assert (df.loc[df["route"] != "flaky", "expected_after_retry"] == df.loc[df["route"] != "flaky", "expected"]).all()
    assert set(df.loc[df["transient"], "route"]) == {"status_500", "status_503", "status_429", "flaky", "slow"}


def test_expected_follows_the_policy_of_a_loopback_run(tmp_path):
    """Tests and the demo allow-list the server's loopback network only: other private targets are
    still rejected; allowing every private network makes them fetched (and fail); allowing none
    rejects every row aimed at the server."""
    items = _fake_items(60)
    default = write_source(str(tmp_path / "a"), "http://127.0.0.1:9", items, seed=5)
    assert (default.loc[default["route"] == "private_address", "expected"] == S.rejected("private_address")).all()
    assert (default.loc[default["route"] == "unresolvable_host", "expected"] == S.rejected("unresolvable_host")).all()
    assert (default.loc[default["route"] == "ok", "expected"] == "success").all()
    lenient = write_source(str(tmp_path / "b"), "http://127.0.0.1:9", items, seed=5, allow_private_network=True)
    assert set(lenient.loc[lenient["route"] == "private_address", "expected"]) == {"failed_download"}
    strict = write_source(str(tmp_path / "c"), "http://127.0.0.1:9", items, seed=5, base_allowed=False)
    assert (strict.loc[strict["route"].isin(["ok", "status_404", "missing_caption"]), "expected"]
            == S.rejected("private_address")).all()
    assert (strict.loc[strict["route"] == "url_too_long", "expected"] == S.rejected("url_too_long")).all()
    with pytest.raises(ValueError):
        write_source(str(tmp_path / "d"), "http://127.0.0.1:9", items, fmt="csv", broken={"malformed_row": 0.1})


def test_source_rows_hit_the_server_as_expected(tmp_path):
    """Each HTTP route's URL, fetched for real, gives the failure its expected status promises."""
    work = str(tmp_path)
    with SyntheticWebServer(os.path.join(work, "images")) as server:
        src = make_source(work, 60, server.base_url, seed=9)
        df = src["expected"]
        for route in HTTP_ROUTES:
            if route == "slow":
                continue  # covered by the slow test; a 30 s wait here buys nothing
            url = df.loc[df["route"] == route, "URL"].iloc[0]
            code, headers, body = _get(url)
            if route in ("ok", "redirect", "html", "corrupt", "truncated", "huge", "noai", "noimageai"):
                assert code == 200, route
            else:
                assert code >= 400, route
            decodable = True
            try:
                Image.open(io.BytesIO(body)).load()
            except Exception:  # noqa: BLE001 - any decoder failure: not decodable
                decodable = False
            expected = ROUTES[route]
            if expected == "failed_resize":
                assert code == 200 and not decodable, route
            elif route.startswith("no"):
                assert "X-Robots-Tag" in headers
            elif expected == "success":
                assert decodable, route


# -- eval set and planted copies ------------------------------------------------------------------

@pytest.mark.parametrize("fmt", ["imagefolder", "folder", "wds", "parquet"])
def test_evalset_formats_and_planted_copies(tmp_path, fmt):
    ev_dir = str(tmp_path / "ev")
    ev = write_evalset(ev_dir, n_classes=3, per_class=2, fmt=fmt)
    assert ev["classnames"] == Path(ev_dir, "classnames.txt").read_text().split("\n")[:3]
    assert len(ev["items"]) == 6 and {it["label"] for it in ev["items"]} == {0, 1, 2}
    if fmt == "imagefolder":
        for it in ev["items"]:
            assert os.path.isfile(os.path.join(ev_dir, it["path"]))
            assert it["path"].split("/")[0] == ev["classnames"][it["label"]].replace(" ", "_")
    elif fmt == "wds":
        with tarfile.open(os.path.join(ev_dir, "test", "0.tar")) as tar:
            names = tar.getnames()
            assert tar.extractfile(f"{ev['items'][3]['key']}.cls").read() == b"1"
        assert len(names) == 12 and os.path.isfile(os.path.join(ev_dir, "zeroshot_classification_templates.txt"))
    elif fmt == "parquet":
        t = pd.read_parquet(os.path.join(ev_dir, "eval.parquet"))
        assert list(t.columns) == ["image", "label", "item_id"] and len(t) == 6
    again = write_evalset(str(tmp_path / "ev2"), n_classes=3, per_class=2, fmt=fmt)
    assert again["items"] == ev["items"]

    pool = str(tmp_path / "pool")
    planted = plant_copies(ev, ev_dir, pool, per_transform=1, seed=0)
    assert [p["transform"] for p in planted] == list(PLANT_TRANSFORMS)
    item_ids = {it["item_id"] for it in ev["items"]}
    for p in planted:
        assert os.path.isfile(os.path.join(pool, p["file"])) and p["eval_item"] in item_ids
        Image.open(os.path.join(pool, p["file"])).load()
    exact = planted[0]
    src_item = next(it for it in ev["items"] if it["item_id"] == exact["eval_item"])
    from laiontools.synthetic.evalset import read_eval_image_bytes

    assert Path(pool, exact["file"]).read_bytes() == read_eval_image_bytes(ev, ev_dir, src_item)


def test_make_source_with_evalset_keeps_planted_rows_good(tmp_path):
    src = make_source(str(tmp_path), 50, "http://127.0.0.1:9", evalset=True, n_files=2, profile="datacomp")
    planted, exp = src["planted"], src["expected"]
    assert sorted(planted["transform"]) == sorted(PLANT_TRANSFORMS)
    assert (exp.loc[exp["eval_item"].notna(), "expected"] == "success").all()
    assert set(planted["expected_uid"]) <= set(exp["expected_uid"])
    assert os.path.isdir(src["evalset"]) and os.path.isfile(os.path.join(src["evalset"], "classnames.txt"))
    assert len(os.listdir(src["source"])) == 2
    assert os.path.isfile(os.path.join(str(tmp_path), "source.expected.parquet"))
    # Same arguments, same files.
    again = make_source(str(tmp_path / "again"), 50, "http://127.0.0.1:9", evalset=True, n_files=2, profile="datacomp")
    pd.testing.assert_frame_equal(exp, again["expected"])
    for name in os.listdir(src["source"]):
        assert Path(src["source"], name).read_bytes() == Path(again["source"], name).read_bytes()


# -- CLI ------------------------------------------------------------------------------------------

def test_cli_writes_and_serves(tmp_path, capsys):
    out = str(tmp_path / "synth")
    assert main(["--output", out, "--n", "20", "--format", "jsonl.gz", "--serve", "--serve-seconds", "0.2",
                 "--evalset"]) == 0
    printed = capsys.readouterr().out
    assert "serving" in printed and "http://127.0.0.1:" in printed
    settings = json.loads(Path(out, "synth.settings.json").read_text())
    assert settings["base_url"].startswith("http://127.0.0.1:") and settings["n"] == 20
    rows = _jsonl_records(os.path.join(out, "source", "part-00000.jsonl.gz"))
    assert len(rows) == 20 + len(PLANT_TRANSFORMS)
    assert set(next(r for r in rows if r is not None)) == set(PROFILES["laion400m"])
    from laiontools.cli import main as cli_main

    assert cli_main(["synth", "--output", str(tmp_path / "bad"), "--n", "5", "--profile", "nope"]) == 2


@pytest.mark.parametrize("fmt", ["imagefolder", "folder", "wds", "parquet"])
def test_evalset_read_back_names_every_item_its_own_class(tmp_path, fmt):
    """Read through laiontools.evalsets (as evaluate and dedup read it), every item of the synthetic eval
    set gets the class name it was drawn as. ImageFolder numbers classes by sorted folder name; the
    set once listed classnames.txt in glyph order, so 4 of 5 classes were named wrong for imagefolder
    (zero-shot figures of the demo's glyph set silently wrong)."""
    from laiontools import evalsets as E

    ev_dir = str(tmp_path / "ev")
    ev = write_evalset(ev_dir, n_classes=5, per_class=2, fmt=fmt)
    es = E.parse_evalset_spec(f"glyphs={ev_dir}:{fmt}")
    names = E.classnames(es)
    got = [names[it.label] for it in E.iter_items(es)]
    # the drawn class of each item in the order written (every reader keeps it): evalset.json's record
    assert sorted(got) == sorted(it["classname"] for it in ev["items"])
    assert got == [it["classname"] for it in ev["items"]], (fmt, got)
    if fmt == "imagefolder":
        assert [it.item_id.split("/")[0] for it in E.iter_items(es)] == [n.replace(" ", "_") for n in got]
