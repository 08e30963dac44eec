"""The download job against a web that misbehaves: stragglers, robots.txt, per-host limits (Spark local[2])."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pandas as pd
import pytest
from PIL import Image

from laiontools.contracts import layout
from laiontools.synthetic import SyntheticWebServer
from laiontools.testing import TEST_DOWNLOAD_SETTINGS


def _run_download(cfg, spark) -> dict:
    from laiontools.stages import download

    return download.run(cfg, spark).details


def _images(d, n: int) -> list[str]:
    os.makedirs(d, exist_ok=True)
    names = []
    for i in range(n):
        name = f"{i:04d}.jpg"
        Image.new("RGB", (96 + i, 80), (i * 5 % 255, 100, 150)).save(os.path.join(d, name), quality=90)
        names.append(name)
    return names


def _source(path: str, urls: list[str]) -> str:
    os.makedirs(path, exist_ok=True)
    pd.DataFrame({"url": urls, "caption": [f"image number {i}" for i in range(len(urls))]}).to_parquet(
        os.path.join(path, "part-00000.parquet"))
    return path


def _catalog(out: str) -> pd.DataFrame:
    return pd.read_parquet(os.path.join(out, layout.CATALOG_DIR))


@pytest.fixture(scope="module")
def web(tmp_path_factory):
    d = tmp_path_factory.mktemp("drip-web")
    names = _images(str(d / "images"), 40)
    with SyntheticWebServer(str(d / "images")) as s:
        yield s, names


def test_dripping_urls_cannot_hold_a_shard(spark, web, tmp_path):
    """Shard 0 starts with two URLs that send headers and then a byte every 0.5 s (~15 min for the
    whole body); with 2 threads both are stuck in them. The shard deadline (3 s) cuts them and
    records every row of shard 0 not fetched by then as failed_download 'deadline'; shard 1 is
    untouched, and the job ends."""
    from laiontools.stages.download import DownloadConfig

    server, names = web
    urls = [f"{server.base_url}/img/{n}" for n in names]
    urls[0] = f"{server.base_url}/drip/0.5/{names[0]}"
    urls[1] = f"{server.base_url}/drip/0.5/{names[1]}"
    src = _source(str(tmp_path / "src"), urls)
    out = str(tmp_path / "pool")
    settings = {**TEST_DOWNLOAD_SETTINGS, "thread_count": 2}
    cfg = DownloadConfig(input=src, output=out, shard_deadline=3.0, request_deadline=600.0, **settings)
    rep = _run_download(cfg, spark)
    cat = _catalog(out).set_index("url").loc[urls].reset_index()
    assert len(cat) == 40
    dripping, rest0, shard1 = cat.iloc[:2], cat.iloc[2:20], cat.iloc[20:]
    assert (dripping["status"] == "failed_download").all()
    assert dripping["error_message"].str.startswith("deadline: request took longer").all(), dripping["error_message"].tolist()
    assert (rest0["status"] == "failed_download").all()
    assert rest0["error_message"].str.contains("shard deadline of 3 s passed before this row was fetched").all()
    assert (shard1["status"] == "success").all(), shard1[["status", "error_message"]]
    assert rep["failures_by_kind"]["failed_download:deadline"] == 20
    # the report names the deadline hits
    with open(os.path.join(out, layout.REPORT_JSON)) as f:
        saved = json.load(f)
    assert saved["failures_by_kind"]["failed_download:deadline"] == 20


def test_a_request_deadline_alone_ends_dripping_rows(spark, web, tmp_path):
    from laiontools.stages.download import DownloadConfig

    server, names = web
    urls = [f"{server.base_url}/img/{n}" for n in names[:20]]
    for i in (3, 11, 17):
        urls[i] = f"{server.base_url}/drip/0.5/{names[i]}"
    out = str(tmp_path / "pool")
    cfg = DownloadConfig(input=_source(str(tmp_path / "src"), urls), output=out, request_deadline=2.0, shard_deadline=0,
                         **TEST_DOWNLOAD_SETTINGS)
    _run_download(cfg, spark)
    cat = _catalog(out).set_index("url").loc[urls].reset_index()
    drip = cat.iloc[[3, 11, 17]]
    assert (drip["status"] == "failed_download").all()
    assert drip["error_message"].str.startswith("deadline: request took longer").all()
    assert (cat.drop(index=[3, 11, 17])["status"] == "success").all()


def test_politeness_blocklist_and_numeric_hosts_in_one_pool(spark, web, tmp_path, request):
    """One real run with robots.txt, opt-out headers, a blocklist and numeric spellings of a private
    address, allowing only 127.0.0.1/32 (not the whole loopback network)."""
    import hashlib

    from laiontools.stages.download import DownloadConfig

    shared, names = web
    # a server of its own: Spark reuses Python workers, whose robots.txt cache already holds the
    # shared server's answer (404: all allowed) from the tests before
    server = SyntheticWebServer(shared.image_dir).start()
    request.addfinalizer(server.stop)
    b, port = server.base_url, server.base_url.rsplit(":", 1)[1]
    server.set_robots("User-agent: *\nDisallow: /redirect/\n")
    with open(os.path.join(server.image_dir, names[5]), "rb") as f:
        listed = f.read()
    bl = tmp_path / "blocklist.txt"
    bl.write_text(f"{hashlib.sha256(listed).hexdigest()}\nblocked.example.org\n{b}/img/{names[6]}\n")
    rows = {
        "ok": f"{b}/img/{names[0]}",
        "robots": f"{b}/redirect/{names[1]}",
        "tdm": f"{b}/tdm/{names[2]}",
        "noai": f"{b}/noai/{names[3]}",
        "hash_listed": f"{b}/img/{names[5]}",
        "url_listed": f"{b}/img/{names[6]}",
        "domain_listed": f"http://cdn.blocked.example.org/{names[7]}",
        "n_decimal": f"http://2130706434:{port}/img/{names[8]}",  # 127.0.0.2
        "n_hex": f"http://0x7f000002:{port}/img/{names[9]}",
        "n_octal": f"http://0177.0.0.2:{port}/img/{names[10]}",
        "n_short": f"http://127.2:{port}/img/{names[11]}",
        "n_zero": f"http://0:{port}/img/{names[12]}",
        "ok2": f"{b}/img/{names[13]}",
        "s429": f"{b}/status/429/{names[14]}",
    }
    out = str(tmp_path / "pool")
    settings = {**TEST_DOWNLOAD_SETTINGS, "allow_networks": ["127.0.0.1/32"]}
    cfg = DownloadConfig(input=_source(str(tmp_path / "src"), list(rows.values())), output=out, blocklist=str(bl), **settings)
    robots_before = server.robots_requests
    server.log_requests()
    rep = _run_download(cfg, spark)
    cat = _catalog(out).set_index("url")
    st = {k: (cat.loc[u, "status"], cat.loc[u, "error_message"]) for k, u in rows.items()}
    assert st["ok"][0] == st["ok2"][0] == "success"
    assert st["robots"] == ("failed_download", f"robots.txt disallows /redirect/{names[1]} for user-agent *")
    assert st["tdm"][0] == "failed_download" and "tdm-reservation" in st["tdm"][1]
    assert st["noai"][0] == "failed_download" and "X-Robots-Tag" in st["noai"][1]
    assert st["hash_listed"] == ("failed_download", f"blocklisted: content sha256 {hashlib.sha256(listed).hexdigest()} is on the blocklist")
    assert st["url_listed"] == ("rejected_blocklisted", "URL is on the blocklist")
    assert st["domain_listed"] == ("rejected_blocklisted", "domain blocked.example.org is on the blocklist")
    for k in ("n_decimal", "n_hex", "n_octal", "n_short", "n_zero"):
        assert st[k][0] == "rejected_private_address", (k, st[k])
    # robots.txt was fetched at most once per Spark worker process (2), not once per row
    assert 1 <= server.robots_requests - robots_before <= 2
    # the listed bytes never reached a shard
    import tarfile

    digests = set()
    for f in os.listdir(os.path.join(out, layout.SHARDS_DIR)):
        if f.endswith(".tar"):
            with tarfile.open(os.path.join(out, layout.SHARDS_DIR, f)) as tf:
                digests |= {hashlib.sha256(tf.extractfile(m).read()).hexdigest() for m in tf.getmembers() if m.isfile()}
    assert hashlib.sha256(listed).hexdigest() not in digests
    # the report's per-host view counts each refusal by kind, for the server's host
    w = rep["hosts"]["watched"]
    assert w["robots_txt"] == {"rows": 1, "hosts": 1}
    assert w["opted_out_tdm_reservation"] == {"rows": 1, "hosts": 1}
    assert w["opted_out_x_robots_tag"] == {"rows": 1, "hosts": 1}
    assert w["blocklisted"] == {"rows": 1, "hosts": 1}
    assert w["http_429"] == {"rows": 1, "hosts": 1}
    top = rep["hosts"]["most_failures"][0]
    assert top["host"] == "127.0.0.1" and top["failed"] == 5
    assert top["by_kind"] == {"robots_txt": 1, "opted_out_tdm_reservation": 1, "opted_out_x_robots_tag": 1,
                              "blocklisted": 1, "http_429": 1}
    # the executors' counters, summed from every shard's _web.json
    ex = rep["hosts"]["executors"]
    assert ex["shards_counted"] == len([f for f in os.listdir(os.path.join(out, layout.SHARDS_DIR)) if f.endswith(".tar")])
    # each shard's counters are written before its stats file (the marker): a kill between the two leaves
    # an unfinished shard, never a finished one without its counters
    sd = os.path.join(out, layout.SHARDS_DIR)
    for f in os.listdir(sd):
        if f.endswith("_stats.json"):
            web = os.path.join(sd, f.replace("_stats.json", "_web.json"))
            assert os.stat(web).st_mtime_ns <= os.stat(os.path.join(sd, f)).st_mtime_ns, f
    assert ex["robots_fetches"] == server.robots_requests - robots_before
    assert ex["dns_lookups"] == 0  # every host fetched was an address literal
    assert ex["throttle_pauses"] == 1 and ex["most_throttled"] == [{"host": "127.0.0.1", "pauses": 1}]
    # requests: the 6 fetched rows plus robots.txt, as the server counted them
    assert ex["requests"] == len(server.request_log) == 6 + ex["robots_fetches"]
    with open(os.path.join(out, layout.REPORT_TXT)) as f:
        text = f.read()
    assert "robots.txt refusals 1 (hosts 1)" in text and "hosts with the most failures" in text
    assert "429/503 pauses 1 on 1 host(s)" in text
    # the report came from one grouped table collected to the driver; the Spark groupings used above
    # REPORT_AGGREGATE_ROWS give the same figures on this catalog
    from laiontools.core.storage import spark_read_parquet
    from laiontools.stages.download import build_report, complete_shards, report_aggregate

    cat_df = spark_read_parquet(spark, os.path.join(out, layout.CATALOG_DIR))
    agg = report_aggregate(cat_df)
    assert agg is not None and report_aggregate(cat_df, cap=1) is None
    shards, prep = complete_shards(cfg), {"rows_in": rep["rows_in"]}
    small, big = (build_report(cfg, cat_df, shards, prep, 0.0, aggregate=a) for a in (agg, None))
    for k in ("by_status", "failures_by_kind", "hosts", "requested", "obtained", "rejected"):
        assert small[k] == big[k], k
    assert small["hosts"]["most_failures"] == rep["hosts"]["most_failures"]


def test_max_host_shards_keeps_each_host_in_one_task(spark, web, tmp_path):
    """8 hosts (one server per loopback address, answering after 0.2 s), 10 rows each in random order,
    10 rows per shard, --max-host-shards 1: the catalog puts every host's rows in one shard, so of
    local[2]'s 2 concurrent tasks only one fetches from a host and no server ever has more requests
    in flight than the per-executor --max-host-concurrency (2)."""
    import random
    from urllib.parse import urlsplit

    from laiontools.stages.download import DownloadConfig

    _, names = web
    servers = [SyntheticWebServer(web[0].image_dir, host=f"127.0.0.{2 + h}").start()
               for h in range(8)]
    try:
        rng = random.Random(7)
        urls = [f"{s.base_url}/slow/0.2/{rng.choice(names)}" for s in servers for _ in range(10)]
        rng.shuffle(urls)
        settings = {**TEST_DOWNLOAD_SETTINGS, "number_sample_per_shard": 10, "shards_per_file": 1}
        out = str(tmp_path / "pool")
        cfg = DownloadConfig(input=_source(str(tmp_path / "src"), urls), output=out, max_host_shards=1,
                             max_host_concurrency=2, **settings)
        rep = _run_download(cfg, spark)
        assert rep["obtained"] == 80
        cat = _catalog(out)
        shards = cat.assign(host=cat["url"].map(lambda u: urlsplit(u).hostname)).groupby("host")["shard"].nunique()
        assert len(shards) == 8 and (shards == 1).all(), shards.to_dict()
        assert cat["shard"].value_counts().tolist() == [10] * 8
        assert all(1 <= s.max_in_flight <= 2 for s in servers), [s.max_in_flight for s in servers]
        prep = json.loads(Path(out, layout.PREPARED_DIR, layout.PREPARED_STATS_JSON).read_text())
        assert prep["host_layout"]["bounded"] and prep["host_layout"]["max_shards_per_host_bound"] == 1
    finally:
        for s in servers:
            s.stop()


def test_16_bit_images_are_stored_as_their_8_bit_twins(spark, tmp_path):
    """img2dataset decodes with IMREAD_UNCHANGED and encodes the uint16 array as 8-bit: a 16-bit PNG was
    stored as a white JPEG with status success. Downloaded from a real server by the download stage, each
    16-bit image is now stored byte-identical to its 8-bit twin (same high bytes), and none is white."""
    import io
    import tarfile

    import numpy as np

    from laiontools.stages.download import DownloadConfig
    from laiontools.testing.wide_images import TWINS, wide_and_narrow

    d = str(tmp_path / "images")
    os.makedirs(d)
    names = sorted(wide_and_narrow(d))
    with SyntheticWebServer(d) as server:
        out = str(tmp_path / "pool")
        cfg = DownloadConfig(input=_source(str(tmp_path / "src"), [f"{server.base_url}/img/{n}" for n in names]),
                             output=out, **TEST_DOWNLOAD_SETTINGS)
        rep = _run_download(cfg, spark)
    assert rep["obtained"] == 6
    stored: dict[str, bytes] = {}
    for root, _, files in os.walk(out):
        for fn in files:
            if fn.endswith(".tar"):
                with tarfile.open(os.path.join(root, fn)) as tf:
                    members = {m.name: tf.extractfile(m).read() for m in tf if m.isfile()}
                for name, data in members.items():
                    if name.endswith(".json"):
                        url = json.loads(data)["url"]
                        stored[url.rsplit("/", 1)[1]] = members[name.removesuffix(".json") + ".jpg"]
    assert sorted(stored) == sorted(names)
    for wide, narrow in TWINS.items():
        assert stored[wide] == stored[narrow], wide
        assert np.asarray(Image.open(io.BytesIO(stored[wide]))).mean() < 200, wide  # not white


def test_a_password_in_a_flag_is_used_and_never_recorded(spark, web, tmp_path, capfd, monkeypatch):
    """`--blocklist http://user:password@host/...` behind HTTP basic auth: the run reads the list with the
    password (the listed URL is refused), and no record of the run holds it: settings.json, the manifest
    (its command and settings), the sidecar, the log lines, every file of the pool. A re-run
    of the same command compares the recorded settings with its own as recorded, and resumes."""
    import base64

    from laiontools.cli import main
    from laiontools.testing.net import answering

    server, names = web
    urls = [f"{server.base_url}/img/{n}" for n in names[:4]]
    secret = "hunter2-s3cr3t"
    want = "Basic " + base64.b64encode(f"alice:{secret}".encode()).decode()
    seen: list[str | None] = []

    def auth(path, headers):
        seen.append(headers.get("Authorization"))
        if headers.get("Authorization") != want:
            return 401, {"WWW-Authenticate": 'Basic realm="lists"'}, b""
        return 200, {}, f"{urls[2]}\n".encode()

    with answering(auth) as base:
        bl = base.replace("http://", f"http://alice:{secret}@") + "/blocklist.txt"
        out = str(tmp_path / "pool")
        conf = tmp_path / "download.yaml"
        conf.write_text(json.dumps(TEST_DOWNLOAD_SETTINGS))  # JSON is YAML
        argv = ["download", "--config", str(conf), "--input", _source(str(tmp_path / "src"), urls), "--output", out,
                "--blocklist", bl]
        monkeypatch.setattr("sys.argv", ["laiontools", *argv])
        rc = main(argv)
        console = capfd.readouterr()
        assert rc == 0, console.err[-3000:]
        assert want in seen  # the list was read with the password
        cat = _catalog(out).set_index("url")
        assert cat.loc[urls[2], "status"] == "rejected_blocklisted"
        assert (cat.drop(index=[urls[2]])["status"] == "success").all()
        settings = json.loads(Path(out, layout.SETTINGS_JSON).read_text())
        assert settings["blocklist"] == base.replace("http://", "http://alice:***@") + "/blocklist.txt"
        manifest = json.loads(Path(out, layout.POOL_MANIFEST).read_text())
        assert manifest["download"]["settings"]["blocklist"] == settings["blocklist"]
        assert settings["blocklist"] in manifest["provenance"]["command"]
        leaked = [str(p) for p in Path(out).rglob("*") if p.is_file() and secret.encode() in p.read_bytes()]
        leaked += [name for name, text in (("stdout", console.out), ("stderr", console.err)) if secret in text]
        assert not leaked, leaked
        # the same command again: the recorded settings are this run's, redacted the same way
        assert main(argv) == 0, capfd.readouterr().err[-3000:]


@pytest.mark.parametrize("fault", ["stall", "503"])
def test_a_blocklist_server_failing_after_prepare_fails_the_shards_naming_it(spark, web, tmp_path, fault):
    """The --blocklist server answers prepare (in this process: the driver reads the list and keeps it)
    and then, for the Spark executors' reads, accepts and never answers ("stall") or answers 503. Each
    download shard stops before fetching any row, within --blocklist-timeout (1 s here), and the stage
    ends with one error naming the list (its password removed) and the shards: no catalog, no row
    recorded failed or "blocklisted". Before, every row read the list again, serially, each waiting up to
    fsspec's 5 min, and ended failed_download with a non-transient message counted as blocklisted."""
    import threading
    import time

    from laiontools.core.errors import UserError
    from laiontools.stages import prepare
    from laiontools.stages.download import DownloadConfig
    from laiontools.testing.net import answering

    server, names = web
    urls = [f"{server.base_url}/img/{n}" for n in names[:6]]
    release = threading.Event()
    state = {"up": True, "refused": 0}

    def answer(path, headers):
        if state["up"]:
            return 200, {}, f"{urls[1]}\n".encode()
        state["refused"] += 1
        if fault == "stall":
            release.wait(60)  # accepted, never answered (until the test ends)
        return 503, {}, b"down for maintenance"

    with answering(answer) as base:
        bl = base.replace("http://", "http://alice:s3cr3t@") + "/list.txt"
        out = str(tmp_path / "pool")
        settings = {**TEST_DOWNLOAD_SETTINGS, "number_sample_per_shard": 2}
        cfg = DownloadConfig(input=_source(str(tmp_path / "src"), urls), output=out, blocklist=bl,
                             blocklist_timeout=1.0, **settings)
        cfg.validate()
        res = prepare.run(cfg)  # a small source: in this process, which now holds the list
        assert res.details["rejected"] == {"rejected_blocklisted": 1}, res.details["rejected"]
        state["up"] = False  # from here on, only the executors (separate Python workers) read it
        t0 = time.monotonic()
        try:
            with pytest.raises(UserError) as err:
                _run_download(cfg, spark)
        finally:
            release.set()
        took = time.monotonic() - t0
    msg = str(err.value)
    assert took < 40, took
    assert state["refused"] >= 1, msg  # the executors did ask, and were refused
    assert "failed after 1 retry" in msg and "ids 0, 1, 2" in msg, msg
    assert "the blocklist could not be read" in msg and "blocklist http://alice:***@127.0.0.1:" in msg, msg
    assert "s3cr3t" not in msg
    assert not os.path.exists(os.path.join(out, layout.CATALOG_DIR))
