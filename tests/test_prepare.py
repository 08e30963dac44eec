"""prepare: profiles x formats, uid rules, URL policy, and every bad input the issue names."""

from __future__ import annotations

import gzip
import json
import os
from pathlib import Path

import pandas as pd
import pytest

from laiontools.contracts import layout
from laiontools.contracts.uids import normalize_caption, normalize_url, uid_of
from laiontools.core.config import ConfigError
from laiontools.core.errors import InputError, UserError
from laiontools.stages import prepare as prepare_stage
from laiontools.stages.prepare import PrepareConfig, check_url
from laiontools.synthetic import PROFILES, write_source

BASE = "http://127.0.0.1:9"


def _items(n: int) -> list[dict]:
    return [{"id": i, "file": f"{i:07d}.jpg", "caption": f"a red circle on a striped background, number {i}"} for i in range(n)]


@pytest.fixture(params=["spark", "in-process"])
def engine(request, monkeypatch):
    """What prepare runs on: the shared local[2] session, or None (small sources then run in this
    process: no master named, not under spark-submit)."""
    if request.param == "spark":
        return request.getfixturevalue("spark")
    monkeypatch.delenv("LAIONTOOLS_SPARK_MASTER", raising=False)
    return None


def _prepare(spark, src: str, out: str, **kw) -> dict:
    cfg = PrepareConfig(input=src, output=out, allow_networks=["127.0.0.0/8"], number_sample_per_shard=10,
                        shards_per_file=1, **kw)
    return prepare_stage.run(cfg, spark).details


def _all_rows(out: str) -> pd.DataFrame:
    acc = pd.read_parquet(os.path.join(out, layout.PREPARED_DIR, "accepted"))
    rej = pd.read_parquet(os.path.join(out, layout.PREPARED_DIR, "rejected"))
    return pd.concat([acc.assign(status="accepted"), rej], ignore_index=True)


@pytest.mark.parametrize("profile,fmt", [("laion400m", "parquet"), ("laion2b-en", "csv.gz"),
                                         ("datacomp", "jsonl.gz"), ("generic", "tsv"), ("laion400m", "jsonl")])
def test_profiles_and_formats_map_to_canonical_columns(engine, tmp_path, profile, fmt):
    exp = write_source(str(tmp_path / "src"), BASE, _items(30), profile=profile, fmt=fmt, n_files=2, seed=3)
    out = str(tmp_path / "out")
    stats = _prepare(engine, str(tmp_path / "src"), out)
    assert stats["profile"] == profile
    assert stats["rows_in"] == len(exp)
    rows = _all_rows(out)
    assert len(rows) == len(exp), "every input row is accepted or rejected, none dropped"
    by_reason = rows["status"].value_counts().to_dict()
    want = exp["expected"].where(~exp["expected"].isin(["success", "failed_download", "failed_resize"]), "accepted")
    assert by_reason == want.value_counts().to_dict()
    acc = rows[rows["status"] == "accepted"]
    assert set(acc["uid"]) <= set(exp["expected_uid"])
    assert acc["uid"].is_unique
    if profile != "generic":
        assert acc["similarity"].notna().all(), "the profile's score column must map to `similarity`"
    if profile == "laion2b-en":
        assert acc["punsafe"].notna().all() and acc["pwatermark"].notna().all()
    if profile in ("laion400m", "datacomp"):
        assert acc["source_id"].notna().all()
    # accepted rows keep input order and fill whole download shards (10 rows) per file
    files = sorted(os.listdir(os.path.join(out, layout.PREPARED_DIR, "accepted")))
    sizes = [len(pd.read_parquet(os.path.join(out, layout.PREPARED_DIR, "accepted", f))) for f in files]
    assert all(s == 10 for s in sizes[:-1]) and sum(sizes) == len(acc)


def test_unknown_columns_are_kept_and_user_mapping_overrides(spark, tmp_path):
    src = tmp_path / "src.parquet"
    pd.DataFrame({"link": [f"{BASE}/{i}.jpg" for i in range(5)], "alt": [f"cap {i}" for i in range(5)],
                  "camera": ["x"] * 5}).to_parquet(src)
    with pytest.raises(InputError, match="no URL column"):
        _prepare(spark, str(src), str(tmp_path / "o1"))
    stats = _prepare(spark, str(src), str(tmp_path / "o2"), columns="url=link,caption=alt")
    assert stats["accepted"] == 5 and "camera" in stats["extra_columns"]
    acc = pd.read_parquet(tmp_path / "o2" / layout.PREPARED_DIR / "accepted")
    assert list(acc["camera"]) == ["x"] * 5


def test_url_policy():
    pol = {"allow_private_network": False, "allow_networks": [], "resolve_hosts": False, "max_url_length": 100,
           "max_caption_length": 10, "require_caption": True}
    reason = lambda u: (check_url(normalize_url(u), pol) or (None,))[0]
    assert reason("https://example.com/a.jpg") is None
    assert reason(None) == "null_url" and reason("   ") == "null_url"
    assert reason("http://example.com/" + "a" * 200) == "url_too_long"
    for u in ("file:///etc/passwd", "ftp://example.com/a.jpg", "data:image/png;base64,AAAA", "javascript:alert(1)"):
        assert reason(u) == "bad_scheme", u
    for u in ("http://127.0.0.1/a.jpg", "http://10.1.2.3/a", "http://169.254.169.254/latest", "http://[::1]/a",
              "http://192.168.0.1/a", "http://localhost/a", "http://[::ffff:127.0.0.1]/a", "http://0.0.0.0/a"):
        assert reason(u) == "private_address", u
    assert reason("http://img.invalid/a.jpg") == "unresolvable_host"
    assert reason("http:///a.jpg") == "invalid_url" and reason("http://[::1/a") == "invalid_url"
    # the opt-in allows the listed network only
    pol_lo = {**pol, "allow_networks": ["127.0.0.0/8"]}
    assert check_url("http://127.0.0.1:8000/a.jpg", pol_lo) is None
    assert check_url("http://10.0.0.1/a.jpg", pol_lo)[0] == "private_address"


def test_uid_normalization():
    assert normalize_url(" HTTP://Example.COM:80/A.jpg#frag ") == "http://example.com/A.jpg"
    assert normalize_caption("  a\tred\n circle ") == "a red circle"
    assert uid_of("http://example.com/a.jpg", "a  cat") == uid_of("HTTP://example.com:80/a.jpg", "a cat")
    assert uid_of("http://example.com/a.jpg", "a cat") != uid_of("http://example.com/a.jpg", "a dog")
    u = uid_of("http://example.com/a.jpg", "a cat")
    assert len(u) == 32 and int(u, 16) >= 0 and u == u.lower()


# ----------------------------------------------------------------------------- bad input


def test_missing_and_empty_inputs(spark, tmp_path):
    with pytest.raises(InputError, match="does not exist"):
        _prepare(spark, str(tmp_path / "nope.parquet"), str(tmp_path / "o"))
    empty = tmp_path / "empty.csv"
    empty.write_bytes(b"")
    with pytest.raises(InputError, match="empty"):
        _prepare(spark, str(empty), str(tmp_path / "o"))
    (tmp_path / "dir").mkdir()
    (tmp_path / "dir" / "readme.md").write_text("hi")
    with pytest.raises(InputError, match="holds no metadata files"):
        _prepare(spark, str(tmp_path / "dir"), str(tmp_path / "o"))


def test_files_of_no_known_format_beside_the_metadata_are_named_not_skipped_in_silence(tmp_path, caplog):
    """A folder of csv parts with one saved as .csv.bz2 (and a part in a sub-folder as .jsonl.zst): those
    rows never reach the catalog, and nothing said so. The files are read as before and the others
    named in one warning; hidden and _-prefixed files (markers, checksums) are not named."""
    import logging

    from laiontools.stages.prepare import list_source_files

    (tmp_path / "in" / "sub").mkdir(parents=True)
    (tmp_path / "in" / "a.csv").write_text("url,caption\nhttp://example.org/a.jpg,a\n")
    (tmp_path / "in" / "b.csv.bz2").write_bytes(b"BZh9 not read")
    (tmp_path / "in" / "sub" / "c.jsonl.zst").write_bytes(b"\x28\xb5\x2f\xfd not read")
    (tmp_path / "in" / "_SUCCESS").write_text("")
    (tmp_path / "in" / ".a.csv.crc").write_text("x")
    with caplog.at_level(logging.WARNING, logger="laiontools.stages.prepare"):
        files = list_source_files(str(tmp_path / "in"))
    assert [f[0].rsplit("/", 1)[-1] for f in files] == ["a.csv"]
    [msg] = [r.getMessage() for r in caplog.records if "no known metadata format" in r.getMessage()]
    assert "2 file(s)" in msg and "b.csv.bz2" in msg and "sub/c.jsonl.zst" in msg and "_SUCCESS" not in msg and ".crc" not in msg


def test_unreadable_parquet_names_the_file(engine, tmp_path):
    bad = tmp_path / "bad.parquet"
    bad.write_bytes(b"PAR1 this is not parquet at all")
    with pytest.raises(InputError, match="bad.parquet.*cannot read as parquet"):
        _prepare(engine, str(bad), str(tmp_path / "o"))


def test_no_url_column_lists_columns_and_profiles(spark, tmp_path):
    src = tmp_path / "x.csv"
    src.write_text("link,words\nhttp://a/b.jpg,hello\n")
    with pytest.raises(InputError) as e:
        _prepare(spark, str(src), str(tmp_path / "o"))
    msg = str(e.value)
    assert "link" in msg and "words" in msg and "laion400m" in msg and "datacomp" in msg and "--columns" in msg


def test_non_utf8_text_names_the_file(engine, tmp_path, monkeypatch):
    """Found inside a task (the header is valid UTF-8): the same InputError from either engine."""
    src = tmp_path / "latin1.csv"
    src.write_bytes(b"url,caption\n" + f"{BASE}/a.jpg,caf\xe9 au lait\n".encode("latin-1"))
    with pytest.raises(InputError, match="latin1.csv.*UTF-8") as e:
        _prepare(engine, str(src), str(tmp_path / "o"))
    assert "LAIONTOOLS-USER-ERROR" not in str(e.value) and "Traceback" not in str(e.value)
    src2 = tmp_path / "latin1.jsonl.gz"
    with gzip.open(src2, "wb") as f:
        f.write(json.dumps({"url": f"{BASE}/a.jpg", "caption": "ok"}).encode() + b"\n")
        f.write(b'{"url": "http://127.0.0.1:9/b.jpg", "caption": "caf\xe9"}\n')
    with pytest.raises(InputError, match="latin1.jsonl.gz.*UTF-8"):
        _prepare(engine, str(src2), str(tmp_path / "o2"))
    # line 251: within the lines read for the columns (the whole of a small file), found there
    src3 = tmp_path / "late.jsonl"
    src3.write_bytes(b"".join(json.dumps({"url": f"{BASE}/{i}.jpg", "caption": "ok"}).encode() + b"\n"
                              for i in range(250)) + b'{"url": "http://127.0.0.1:9/b.jpg", "caption": "caf\xe9"}\n')
    with pytest.raises(InputError, match="late.jsonl: text is not valid UTF-8"):
        _prepare(engine, str(src3), str(tmp_path / "o3"))
    # past them (the probe cut to its 200-line minimum): found by the task reading the file, naming the line
    monkeypatch.setattr(prepare_stage, "JSONL_PROBE_BYTES", 0)
    with pytest.raises(InputError, match="late.jsonl: line 251 is not valid UTF-8"):
        _prepare(engine, str(src3), str(tmp_path / "o4"))


def test_wrong_types_become_nulls_not_crashes(engine, tmp_path):
    src = tmp_path / "types.jsonl"
    rows = [{"url": f"{BASE}/{i}.jpg", "caption": f"c {i}", "similarity": v, "punsafe": [1]}
            for i, v in enumerate([0.3, "high", None, {"a": 1}])]
    rows.append({"url": 12345, "caption": 7})  # a number where a URL belongs: rejected with a reason
    src.write_text("\n".join(json.dumps(r) for r in rows) + "\nnot json\n")
    stats = _prepare(engine, str(src), str(tmp_path / "o"), columns="similarity=similarity,punsafe=punsafe")
    rows_out = _all_rows(str(tmp_path / "o"))
    assert stats["rows_in"] == 6 and len(rows_out) == 6
    acc = rows_out[rows_out["status"] == "accepted"].sort_values("url")
    assert acc["similarity"].tolist()[0] == pytest.approx(0.3) and acc["similarity"].isna().sum() == 3
    statuses = set(rows_out["status"])
    assert "rejected_malformed_row" in statuses and "rejected_bad_scheme" in statuses


def test_output_folder_that_is_a_file(tmp_path):
    from laiontools.stages import download
    from laiontools.stages.download import DownloadConfig

    f = tmp_path / "file"
    f.write_text("precious")
    with pytest.raises(NotADirectoryError, match="is a file"):
        download.run(DownloadConfig(input="x", output=str(f)))
    assert f.read_text() == "precious"
    d = tmp_path / "notapool"
    d.mkdir()
    (d / "precious.txt").write_text("keep")
    with pytest.raises(UserError, match="is not empty and holds no .*nothing in it was touched"):
        download.run(DownloadConfig(input="x", output=str(d)))
    assert (d / "precious.txt").read_text() == "keep" and os.listdir(d) == ["precious.txt"]


def test_cli_reports_bad_input_cleanly(tmp_path, capsys):
    from laiontools.cli import main

    rc = main(["download", "--input", str(tmp_path / "missing.parquet"), "--output", str(tmp_path / "o")])
    assert rc == 2
    err = capsys.readouterr().err
    assert "missing.parquet does not exist" in err and "Traceback" not in err


@pytest.mark.parametrize("name", sorted(PROFILES))
def test_synthetic_profiles_are_detected(name, tmp_path):
    from laiontools.stages.prepare import PrepareConfig, discover

    write_source(str(tmp_path / "s"), BASE, _items(8), profile=name, fmt="parquet", seed=1)
    _, mapping, _, detected = discover(PrepareConfig(input=str(tmp_path / "s"), output=str(tmp_path / "o")))
    assert detected == name and "url" in mapping


def _host_source(path, seed: int = 5) -> pd.DataFrame:
    """One host with many rows, a few mid-sized hosts and many small ones, shuffled (seeded)."""
    import random

    rng = random.Random(seed)
    hosts = [("big.imgs.org", 300), ("mid.imgs.org", 45)] + [(f"m{i}.imgs.org", 12) for i in range(20)] + \
        [(f"s{i}.imgs.org", rng.randint(1, 4)) for i in range(60)]
    urls = [f"http://{h}/img/{j}.jpg" for h, r in hosts for j in range(r)]
    rng.shuffle(urls)
    df = pd.DataFrame({"url": urls, "caption": [f"caption {i}" for i in range(len(urls))]})
    os.makedirs(path, exist_ok=True)
    df.to_parquet(os.path.join(path, "part-00000.parquet"))
    return df


def _shards_by_host(out: str, shard_size: int) -> tuple[dict[str, set[int]], list[int], list[str]]:
    """(host -> shards, file sizes, uids in layout order) read back from the prepared files: the
    download reads the files in name order and cuts each into shards of `shard_size` rows."""
    from urllib.parse import urlsplit

    d = os.path.join(out, layout.PREPARED_DIR, "accepted")
    files = sorted(os.listdir(d))
    tables = [pd.read_parquet(os.path.join(d, f)) for f in files]
    acc = pd.concat(tables, ignore_index=True)
    by_host: dict[str, set[int]] = {}
    for i, url in enumerate(acc["url"]):
        by_host.setdefault(urlsplit(url).hostname, set()).add(i // shard_size)
    return by_host, [len(t) for t in tables], list(acc["uid"])


def test_rows_of_a_host_land_in_a_bounded_number_of_shards(spark, tmp_path):
    """--max-host-shards H: a host with r <= H x shard_size rows is in at most min(r, H) shards, a
    bigger one in floor(r / shard_size) + min(H, r mod shard_size); files stay whole shards; the same
    input and settings give the same layout; H = 0 keeps input order (and then hosts spread widely)."""
    src = str(tmp_path / "src")
    df = _host_source(src)
    counts = df["url"].map(lambda u: u.split("/")[2]).value_counts().to_dict()
    n, size, h = len(df), 10, 4

    def run(name: str, max_host_shards: int) -> dict:
        cfg = PrepareConfig(input=src, output=str(tmp_path / name), number_sample_per_shard=size, shards_per_file=3,
                            max_host_shards=max_host_shards)
        return prepare_stage.run(cfg, spark).details

    stats = run("a", h)
    assert stats["accepted"] == n and stats["host_layout"]["bounded"]
    assert stats["host_layout"]["split_hosts"] == 0
    by_host, sizes, uids = _shards_by_host(str(tmp_path / "a"), size)
    assert sizes[:-1] == [30] * (len(sizes) - 1) and 0 < sizes[-1] <= 30 and sum(sizes) == n
    assert set(by_host) == set(counts)
    for host, shards in by_host.items():
        r = counts[host]
        bound = min(r, h) if r <= h * size else r // size + min(h, r % size)
        assert len(shards) <= bound, (host, r, sorted(shards))
    assert len(by_host["big.imgs.org"]) == 300 // size  # its own full shards, nothing else
    assert max(len(by_host[f"m{i}.imgs.org"]) for i in range(20)) <= h
    assert stats["host_layout"]["max_shards_per_host_bound"] >= max(len(s) for s in by_host.values())

    # hosts over H x shard_size rows (big: 300, mid: 45) get full shards of their own; every other
    # shard mixes hosts (a group's rows are striped over its shards)
    shard_hosts: dict[int, set[str]] = {}
    for host, shards in by_host.items():
        for s in shards:
            shard_hosts.setdefault(s, set()).add(host)
    last = (n - 1) // size  # the short last shard (731 rows: 1 row) is left out
    own = [s for s, hs in shard_hosts.items() if len(hs) == 1 and s != last]
    assert len(own) == 300 // size + 45 // size
    assert min(len(hs) for s, hs in shard_hosts.items() if s not in own and s != last) >= 3

    # determinism: a second run lays out the same uids in the same places
    run("b", h)
    assert _shards_by_host(str(tmp_path / "b"), size)[2] == uids

    # without the bound: input order, the same uids, and hosts spread over many more shards
    assert run("c", 0)["host_layout"] == {"max_host_shards": 0, "bounded": False}
    by_host0, _, uids0 = _shards_by_host(str(tmp_path / "c"), size)
    assert sorted(uids0) == sorted(uids) and uids0 != uids
    assert len(by_host0["big.imgs.org"]) > 300 // size + h
    assert max(len(by_host0[f"m{i}.imgs.org"]) for i in range(20)) > h

    # reusing a prepared folder with another bound is refused, naming the setting
    with pytest.raises(UserError, match="max_host_shards: 4 -> 2"):
        run("a", 2)
    assert run("a", h)["accepted"] == n


def _check_plan(host_rows: list[tuple[str, int]], size: int, h: int, seed: int) -> tuple[dict, dict[str, int]]:
    """Lay out shuffled rows with plan_host_layout as prepare does (planned hosts by rank in input
    order, the rest as fillers), check that positions are exactly 0..n-1, and return the plan's summary
    and the shards each host touched, counted row by row."""
    import collections
    import random

    from laiontools.stages.prepare import plan_host_layout

    rows = [host for host, r in host_rows for _ in range(r)]
    random.Random(seed).shuffle(rows)
    counts = collections.Counter(rows)
    plan = plan_host_layout(sorted((k, c) for k, c in counts.items() if c > h), len(rows), size, h)
    seen: collections.Counter = collections.Counter()
    positions, fillers = [], 0
    for host in rows:
        if host in plan.host_start:
            positions.append((host, plan.position(host, seen[host])))
            seen[host] += 1
        else:
            positions.append((host, plan.position(None, fillers)))
            fillers += 1
    assert sorted(p for _, p in positions) == list(range(len(rows))), "positions must be a bijection onto 0..n-1"
    shards: dict[str, set[int]] = collections.defaultdict(set)
    for host, p in positions:
        shards[host].add(p // size)
    return plan.summary(), {host: len(s) for host, s in shards.items()}


def test_host_layout_plan_bounds_and_reports_what_it_could_not_bound():
    """The plan alone (no Spark): a heavy-tailed source is laid out with no split host and every host
    within its bound; a source with no small hosts (no slack to pack with) has to split some, and the
    plan's reported bound still covers every host."""
    import numpy as np

    zipf = np.minimum(np.random.default_rng(0).zipf(1.6, 3000), 3000)
    host_rows = [(f"z{i}", int(c)) for i, c in enumerate(zipf)]
    summary, touched = _check_plan(host_rows, 50, 8, seed=1)
    assert summary["split_hosts"] == 0 and summary["exclusive_hosts"] > 0
    for host, r in host_rows:
        assert touched[host] <= (min(r, 8) if r <= 8 * 50 else r // 50 + min(8, r % 50)), (host, r, touched[host])
    assert max(touched.values()) <= summary["max_shards_per_host_bound"]
    # the hosts the download must share out: every host that touched more than H shards is listed, with
    # a count at least what it touched (counted row by row above), and no host within the bound
    over = summary["hosts_over_bound"]
    assert over and {h for h, t in touched.items() if t > 8} <= set(over)
    assert all(touched[h] <= m and m > 8 for h, m in over.items())

    tight = [(f"t{i}", 399) for i in range(30)] + [("x", 7)]  # groups of 400 rows, 30 hosts of 399
    summary, touched = _check_plan(tight, 50, 8, seed=2)
    assert summary["split_hosts"] >= 1
    assert max(touched.values()) > 8 and max(touched.values()) <= summary["max_shards_per_host_bound"]


def test_max_host_shards_must_not_be_negative(tmp_path):
    from laiontools.core.config import ConfigError

    with pytest.raises(ConfigError, match="max_host_shards"):
        PrepareConfig(input="x", output=str(tmp_path), max_host_shards=-1).validate()


# ----------------------------------------------------------------------------- the in-process engine


def _mixed_source(path) -> str:
    """One laion400m source in three files (parquet, csv, jsonl.gz): repeats within and across files
    (some re-spelled to the same uid, some of rejected rows), rejects of several reasons (bad scheme,
    private address, missing caption, blocklisted, malformed lines), extra columns only some files have,
    numbers as text and nulls. Returns the blocklist's path."""
    import random

    rng = random.Random(11)
    rows = []
    for i in range(300):
        url, cap = f"http://h{i % 23}.example.com/img/{i}.jpg", f"a photo, number {i}"
        kind = rng.random()
        if kind < 0.05:
            url = f"ftp://h1.example.com/{i}.jpg"
        elif kind < 0.1:
            url = f"http://10.0.{i % 250}.1/{i}.jpg"
        elif kind < 0.15:
            cap = ""
        elif kind < 0.2:
            url = f"http://cdn.blocked.example.net/{i}.jpg"
        rows.append({"SAMPLE_ID": str(i), "URL": url, "TEXT": cap, "WIDTH": rng.choice([None, 640, 1024]),
                     "HEIGHT": 480, "LICENSE": rng.choice([None, "cc-by"]), "NSFW": rng.choice(["UNLIKELY", None]),
                     "similarity": rng.choice([None, round(rng.random(), 3)])})
    for j in rng.sample(range(300), 40):  # repeats anywhere: a later copy or an earlier one
        copy = {**rows[j], "SAMPLE_ID": f"copy-{j}"}
        if j % 2:
            copy["URL"] = copy["URL"].replace("http://", "HTTP://").replace(".com/", ".com:80/")
        rows.insert(rng.randrange(len(rows) + 1), copy)
    os.makedirs(path, exist_ok=True)
    pq_part = pd.DataFrame(rows[:130]).assign(camera=[f"cam{i % 3}" for i in range(130)])
    pq_part.to_parquet(os.path.join(path, "a.parquet"), row_group_size=50)
    pd.DataFrame(rows[130:250]).assign(lens="50mm").to_csv(os.path.join(path, "b.csv"), index=False)
    with gzip.open(os.path.join(path, "c.jsonl.gz"), "wt", encoding="utf-8") as f:
        for k, r in enumerate(rows[250:]):
            f.write(json.dumps({**r, **({"camera": "jsoncam"} if k % 4 == 0 else {})}) + "\n")
            if k == 10:
                f.write("not json\n[1, 2]\n\n")
    blocklist = os.path.join(os.path.dirname(path), "blocklist.txt")
    with open(blocklist, "w") as f:
        f.write("# test list\nblocked.example.net\nhttp://h3.example.com/img/3.jpg\n")
    return blocklist


def _prepared(out: str, part: str):
    import pyarrow.parquet as pq

    return pq.read_table(os.path.join(out, layout.PREPARED_DIR, part))


def _assert_same_prepared(a: str, b: str) -> tuple[dict, dict]:
    """The prepared folders `a` (Spark) and `b` (in process) hold the same rows: accepted files equal
    file by file (rows, order, schema; the very bytes), rejected rows equal as a set with the same
    schema, stats equal but for where they ran. Returns both stats."""
    import pyarrow.parquet as pq

    from laiontools.core.storage import read_json

    acc_a, acc_b = (os.path.join(o, layout.PREPARED_DIR, "accepted") for o in (a, b))
    assert sorted(os.listdir(acc_a)) == sorted(os.listdir(acc_b))
    for name in sorted(os.listdir(acc_a)):
        ta, tb = pq.read_table(os.path.join(acc_a, name)), pq.read_table(os.path.join(acc_b, name))
        assert ta.schema.equals(tb.schema, check_metadata=True), name
        assert ta.equals(tb), name
        with open(os.path.join(acc_a, name), "rb") as fa, open(os.path.join(acc_b, name), "rb") as fb:
            assert fa.read() == fb.read(), name
    ra, rb = _prepared(a, "rejected"), _prepared(b, "rejected")
    assert ra.schema.equals(rb.schema), (ra.schema, rb.schema)  # Spark's own metadata aside
    key = lambda r: (r["file_idx"], r["row_idx"])
    assert sorted(ra.to_pylist(), key=key) == sorted(rb.to_pylist(), key=key)
    # the in-process engine writes them in input order, as one file
    assert [key(r) for r in rb.to_pylist()] == sorted(key(r) for r in rb.to_pylist())
    rej_b = os.path.join(b, layout.PREPARED_DIR, "rejected")
    assert sorted(os.listdir(rej_b)) == ["_SUCCESS", "part-00000.parquet"]
    sa, sb = (read_json(os.path.join(o, layout.PREPARED_DIR, layout.PREPARED_STATS_JSON)) for o in (a, b))
    assert sa["engine"].startswith("spark ") and sa["spark"]["shuffle_partitions"] >= 1
    assert sb["engine"] == "in-process" and sb["spark"] == {"shuffle_partitions": None}
    drop = lambda s: {k: v for k, v in s.items() if k not in ("engine", "spark")}
    assert drop(sa) == drop(sb)
    return sa, sb


@pytest.mark.parametrize("max_host_shards", [0, 3])
def test_in_process_engine_writes_what_spark_writes(spark, tmp_path, monkeypatch, max_host_shards):
    """A mixed source (three formats, repeats, rejects of every kind, extra columns, a blocklist) gives
    the same prepared folder on Spark and in process, in input order and in the host layout; the
    in-process run replaces what a killed run left (here: all of Spark's files but the marker)."""
    import shutil

    from laiontools.core.storage import marker_path

    monkeypatch.delenv("LAIONTOOLS_SPARK_MASTER", raising=False)
    src = str(tmp_path / "src")
    blocklist = _mixed_source(src)

    def cfg(out: str) -> PrepareConfig:
        return PrepareConfig(input=src, output=str(tmp_path / out), profile="laion400m", blocklist=blocklist,
                             number_sample_per_shard=10, shards_per_file=3, max_host_shards=max_host_shards)

    on_spark = prepare_stage.run(cfg("a"), spark).details
    shutil.copytree(tmp_path / "a", tmp_path / "b")
    os.remove(marker_path(str(tmp_path / "b" / layout.PREPARED_DIR)))
    here = prepare_stage.run(cfg("b")).details
    _assert_same_prepared(str(tmp_path / "a"), str(tmp_path / "b"))
    assert here["host_layout"]["bounded"] == (max_host_shards > 0)
    assert set(here["rejected"]) == {f"rejected_{r}" for r in ("bad_scheme", "private_address", "missing_caption",
                                                               "blocklisted", "malformed_row", "duplicate_uid")}
    assert set(here["extra_columns"]) == {"camera", "lens"}
    assert on_spark["rows_in"] == here["rows_in"] == 343
    # which copy of a repeated row is kept is decided by input order, the same on both engines
    acc = _prepared(str(tmp_path / "b"), "accepted").to_pandas()
    assert acc["uid"].is_unique and acc["source_id"].str.startswith("copy-").any()


def test_in_process_engine_bounded_host_layout(spark, tmp_path, monkeypatch):
    """Many rows of a few hosts, small shards and a tight bound (exclusive shards, groups, fillers):
    the same layout, file by file, on Spark and in process."""
    monkeypatch.delenv("LAIONTOOLS_SPARK_MASTER", raising=False)
    src = str(tmp_path / "src")
    _host_source(src, seed=7)
    cfg = lambda out: PrepareConfig(input=src, output=str(tmp_path / out), number_sample_per_shard=7,
                                    shards_per_file=2, max_host_shards=2)
    prepare_stage.run(cfg("a"), spark)
    prepare_stage.run(cfg("b"))
    sa, _ = _assert_same_prepared(str(tmp_path / "a"), str(tmp_path / "b"))
    assert sa["host_layout"]["bounded"] and sa["host_layout"]["exclusive_hosts"] >= 2


def test_engine_choice_from_the_estimated_rows(tmp_path, monkeypatch):
    """Parquet rows are counted from the footers, text rows estimated from bytes; --spark-above picks the
    engine (0: always Spark, -1: only with a master), a named master always means Spark; spark_above
    is where it runs, not what it writes: never part of a pool's settings."""
    from laiontools.stages.download import DownloadConfig
    from laiontools.stages.prepare import SourceFile, estimated_rows, wants_spark_for

    monkeypatch.delenv("LAIONTOOLS_SPARK_MASTER", raising=False)
    files = [SourceFile(0, "a.parquet", "parquet", None, ["url"], 5_000, [300, 200]),
             SourceFile(1, "b.csv", "csv", None, ["url"], 10_000, None),
             SourceFile(2, "c.jsonl.gz", "jsonl", "gzip", ["url"], 10_000, None)]
    assert estimated_rows(files) == 500 + 100 + 400
    assert estimated_rows(files[:1]) == 500
    cfg = lambda **kw: PrepareConfig(input="x", output=str(tmp_path), **kw)
    assert not wants_spark_for(cfg(), files)  # default bound: 1M rows
    assert not wants_spark_for(cfg(spark_above=1000), files) and wants_spark_for(cfg(spark_above=999), files)
    assert wants_spark_for(cfg(spark_above=0), files) and not wants_spark_for(cfg(spark_above=-1), files)
    assert wants_spark_for(cfg(spark_above=-1, master="local[1]"), files)
    monkeypatch.setenv("LAIONTOOLS_SPARK_MASTER", "local[1]")
    assert wants_spark_for(cfg(spark_above=10**9), files)
    from laiontools.core.config import ConfigError

    with pytest.raises(ConfigError, match="spark_above"):
        cfg(spark_above=-2)
    assert "spark_above" not in DownloadConfig(input="x", output=str(tmp_path), spark_above=5).semantic()


# ----------------------------------------------------------------------------- odd text and column names


def _both_engines(spark, tmp_path, monkeypatch, src: str) -> tuple[dict, dict]:
    """prepare `src` on Spark (into a) and in process (into b); assert they wrote the same; their stats."""
    monkeypatch.delenv("LAIONTOOLS_SPARK_MASTER", raising=False)
    cfg = lambda out: PrepareConfig(input=src, output=str(tmp_path / out), allow_networks=["127.0.0.0/8"],
                                    number_sample_per_shard=10, shards_per_file=1)
    prepare_stage.run(cfg("a"), spark)
    prepare_stage.run(cfg("b"))
    return _assert_same_prepared(str(tmp_path / "a"), str(tmp_path / "b"))


def test_lone_surrogates_in_jsonl_are_replaced_before_the_uid(spark, tmp_path, monkeypatch):
    """A JSON escape of half a surrogate pair is no text UTF-8 can hold: it becomes U+FFFD (as bytes that
    are not UTF-8 in a parquet column do) before the uid is computed, so uid and caption agree, the same
    on both engines (the in-process engine crashed writing it; Spark stored U+FFFD but hashed the
    surrogate)."""
    src = tmp_path / "sur.jsonl"
    lines = [json.dumps({"url": f"http://h.example.com/{i}.jpg", "caption": f"c {i}", "note": "n"}) for i in range(3)]
    lines += ['{"url": "http://h.example.com/x.jpg", "caption": "bad \\ud800 here", "note": "n"}',
              '{"url": "http://h.example.com/\\udc80.jpg", "caption": "c", "note": "\\ud83d"}',
              '{"url": "http://h.example.com/p.jpg", "caption": "pair \\ud83d\\ude00 ok", "note": "\\\\ud800"}',
              '{"url": "ftp://h.example.com/r.jpg", "caption": "rejected \\udfff"}']
    src.write_text("\n".join(lines) + "\n")
    sa, _ = _both_engines(spark, tmp_path, monkeypatch, str(src))
    assert sa["rows_in"] == 7 and sa["accepted"] == 6
    rows = {r["url"]: r for r in _all_rows(str(tmp_path / "b")).to_dict("records")}
    bad = rows["http://h.example.com/x.jpg"]
    assert bad["caption"] == "bad \ufffd here" and bad["uid"] == uid_of(bad["url"], "bad \ufffd here")
    assert rows["http://h.example.com/\ufffd.jpg"]["note"] == "\ufffd"
    ok = rows["http://h.example.com/p.jpg"]  # a whole pair, and an escaped backslash, are left alone
    assert ok["caption"] == "pair \U0001F600 ok" and ok["note"] == "\\ud800"
    assert rows["ftp://h.example.com/r.jpg"]["caption"] == "rejected \ufffd"


def test_jsonl_line_nested_too_deeply_is_a_malformed_row(engine, tmp_path):
    """A line nested past the parser's recursion limit, among the lines read for the column names:
    that row is rejected as malformed with the reason (it crashed the column probe with RecursionError)."""
    src = tmp_path / "deep.jsonl"
    good = [json.dumps({"url": f"{BASE}/{i}.jpg", "caption": f"c {i}"}) for i in range(2)]
    deep = '{"url": "http://127.0.0.1:9/d.jpg", "caption": "c", "x": ' + "[" * 100_000 + "]" * 100_000 + "}"
    src.write_text("\n".join([good[0], deep, good[1]]) + "\n")
    stats = _prepare(engine, str(src), str(tmp_path / "o"))
    assert stats["rows_in"] == 3 and stats["accepted"] == 2 and stats["rejected"] == {"rejected_malformed_row": 1}
    rej = _prepared(str(tmp_path / "o"), "rejected").to_pylist()
    assert len(rej) == 1 and rej[0]["row_idx"] == 1
    assert "deep.jsonl: line 2 nests JSON arrays/objects too deeply" in rej[0]["error_message"]


def test_csv_with_cr_line_endings_is_read(engine, tmp_path):
    """Old Mac line endings (a lone CR) are line ends to the rows' reader: the header is read the same
    way (the column probe crashed with `_csv.Error: new-line character seen in unquoted field`)."""
    src = tmp_path / "cr.csv"
    src.write_bytes(b'url,caption,note\r' + f'{BASE}/1.jpg,a,x\r{BASE}/2.jpg,"two\rlines",y\r'.encode())
    stats = _prepare(engine, str(src), str(tmp_path / "o"))
    assert stats["rows_in"] == 2 and stats["accepted"] == 2 and stats["extra_columns"] == ["note"]
    acc = _prepared(str(tmp_path / "o"), "accepted").to_pylist()
    assert [(r["caption"], r["note"]) for r in acc] == [("a", "x"), ("two lines", "y")]


def test_csv_rows_with_another_number_of_fields_are_malformed_rows(engine, tmp_path):
    """A row with more or fewer fields than the header is rejected as malformed_row, its text in the
    reason, and the file's other rows are prepared (one such row stopped the whole file). The reader's
    blocks are 4 MB: the rows sit in three, so some ragged rows are found a block ahead of the rows
    handed out, and every row still gets one row number."""
    sep = ","
    src = tmp_path / "ragged.csv"
    n, caption = 3000, "a long caption " * 250  # ~3.8 KB a row: ~11 MB, three reader blocks
    lines, bad = [], {}
    for i in range(n):
        if i % 211 == 5:  # 15 ragged rows, spread over the blocks: too many fields, then too few
            bad[i] = f"{BASE}/{i}.jpg{sep}c{sep}extra" if len(bad) % 2 == 0 else f"{BASE}/{i}.jpg"
            lines.append(bad[i])
        else:
            lines.append(f"{BASE}/{i}.jpg{sep}{caption}{i}")
    src.write_text(f"url{sep}caption\n" + "\n".join(lines) + "\n")
    stats = _prepare(engine, str(src), str(tmp_path / "o"), max_caption_length=10_000)
    assert len(bad) == 15 and stats["rows_in"] == n and stats["accepted"] == n - len(bad)
    assert stats["rejected"] == {"rejected_malformed_row": len(bad)}
    rej = _prepared(str(tmp_path / "o"), "rejected").to_pylist()
    want = sorted(f"{src}: a row has {3 if t.count(sep) == 2 else 1} fields, the header 2: {t!r}" for t in bad.values())
    assert sorted(r["error_message"] for r in rej) == want
    assert len({r["row_idx"] for r in rej}) == len(bad) and all(0 <= r["row_idx"] < n for r in rej)
    acc = _prepared(str(tmp_path / "o"), "accepted").to_pylist()
    assert sorted(int(r["url"].rsplit("/", 1)[1][:-4]) for r in acc) == [i for i in range(n) if i not in bad]


def test_extra_column_names_spark_would_parse(spark, tmp_path, monkeypatch):
    """Source column names with a backtick, a dot, a space or a comma are carried as they are on both
    engines (Spark failed parsing them as DDL / attribute names); one named like a prepared column in
    another case (`Status`) is not carried, on either engine."""
    src = tmp_path / "names.csv"
    src.write_text('url,caption,we`ird,a.b,"x, y",Status\n'
                   + "".join(f"{BASE}/{i}.jpg,c {i},w{i},d{i},s{i},st\n" for i in range(3)) + "ftp://x/y.jpg,c,w,d,s,st\n")
    sa, _ = _both_engines(spark, tmp_path, monkeypatch, str(src))
    assert sa["extra_columns"] == ["we`ird", "a.b", "x, y"] and sa["accepted"] == 3
    acc = _prepared(str(tmp_path / "a"), "accepted").to_pylist()
    assert [(r["we`ird"], r["a.b"], r["x, y"]) for r in acc] == [(f"w{i}", f"d{i}", f"s{i}") for i in range(3)]
    assert "Status" not in acc[0]


def test_extra_columns_differing_only_in_case_are_refused(engine, tmp_path):
    """`Foo` and `foo` (in one file or across two): a clear error naming the file(s) on both engines
    (Spark failed with COLUMN_ALREADY_EXISTS; the in-process engine wrote both, which Spark cannot read)."""
    src = tmp_path / "case.csv"
    src.write_text(f"url,caption,Foo,foo\n{BASE}/1.jpg,a,x,y\n")
    with pytest.raises(InputError, match=r"case.csv: columns 'Foo' and 'foo' differ only in case"):
        _prepare(engine, str(src), str(tmp_path / "o"))
    d = tmp_path / "two"
    d.mkdir()
    (d / "a.csv").write_text(f"url,caption,Foo\n{BASE}/1.jpg,a,x\n")
    (d / "b.jsonl").write_text(json.dumps({"url": f"{BASE}/2.jpg", "caption": "b", "FOO": "y"}) + "\n")
    with pytest.raises(InputError, match=r"a.csv and .*b.jsonl: columns 'Foo' and 'FOO' differ only in case"):
        _prepare(engine, str(d), str(tmp_path / "o2"))
    assert not os.path.exists(tmp_path / "o2" / layout.PREPARED_DIR / "accepted")


def test_repeated_column_names_are_refused(engine, tmp_path):
    """A header that names a column twice (csv, or a parquet schema): a clear error naming the file and
    the column (the csv reader kept one of them silently)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    src = tmp_path / "dup.csv"
    src.write_text(f"url,caption,caption\n{BASE}/1.jpg,a,b\n")
    with pytest.raises(InputError, match=r"dup.csv: column name\(s\) 'caption' appear more than once"):
        _prepare(engine, str(src), str(tmp_path / "o"))
    pq_src = tmp_path / "dup.parquet"
    pq.write_table(pa.table([pa.array([f"{BASE}/1.jpg"]), pa.array(["a"]), pa.array(["x"]), pa.array(["y"])],
                            names=["url", "caption", "note", "note"]), pq_src)
    with pytest.raises(InputError, match=r"dup.parquet: column name\(s\) 'note' appear more than once"):
        _prepare(engine, str(pq_src), str(tmp_path / "o2"))


def test_csv_with_a_byte_order_mark_is_read(engine, tmp_path):
    """A CSV saved by Excel starts with a UTF-8 byte-order mark: the header's first column is `url`, as
    Arrow's and Spark's readers read it (the probe saw '\\ufeffurl' and found no URL column)."""
    src = tmp_path / "bom.csv"
    src.write_bytes(b"\xef\xbb\xbfurl,caption\n" + f"{BASE}/1.jpg,a\n{BASE}/2.jpg,b\n".encode())
    stats = _prepare(engine, str(src), str(tmp_path / "o"))
    assert stats["rows_in"] == 2 and stats["accepted"] == 2 and stats["extra_columns"] == []
    acc = _prepared(str(tmp_path / "o"), "accepted").to_pylist()
    assert [(r["url"], r["caption"]) for r in acc] == [(f"{BASE}/1.jpg", "a"), (f"{BASE}/2.jpg", "b")]


def test_a_prepared_folder_is_reused_only_for_the_same_input_and_row_settings(tmp_path, monkeypatch):
    """A done prepared/ is reused by a re-run and by a download into the same folder (`laiontools
    prepare` first, to look at the rejects, then `download`), but only for the same source and row
    policy: other settings would otherwise download the old run's rows under the new run's flags."""
    from laiontools.stages import download as download_stage
    from laiontools.stages.download import DownloadConfig

    monkeypatch.delenv("LAIONTOOLS_SPARK_MASTER", raising=False)
    src, out = str(tmp_path / "src"), str(tmp_path / "pool")
    write_source(src, BASE, _items(12), broken={})
    first = _prepare(None, src, out)
    stats_file = os.path.join(out, layout.PREPARED_DIR, layout.PREPARED_STATS_JSON)
    before = Path(stats_file).read_bytes()
    assert _prepare(None, src, out) == first  # the same settings: reused
    with pytest.raises(UserError, match=r"other row settings \(max_url_length: 2048 -> 100\).*give a new output folder"):
        _prepare(None, src, out, max_url_length=100)
    with pytest.raises(UserError, match=r"allow_networks: \['127.0.0.0/8'\] -> \[\]"):
        prepare_stage.run(PrepareConfig(input=src, output=out, number_sample_per_shard=10, shards_per_file=1))
    # download into the folder prepare made: it takes the prepared rows as they are (port 9 refuses
    # every connection, so each accepted row is a failed download in the catalog)
    dl = DownloadConfig(input=src, output=out, allow_networks=["127.0.0.0/8"], number_sample_per_shard=10,
                        shards_per_file=1, timeout=1, retries=0)
    rep = download_stage.run(dl).details
    assert Path(stats_file).read_bytes() == before
    cat = pd.read_parquet(os.path.join(out, layout.CATALOG_DIR))
    assert len(cat) == first["rows_in"] == 12 and (cat["status"] == "failed_download").sum() == first["accepted"] > 0, rep
    # the same items under other captions: another source, refused by name
    write_source(src, BASE, [{**it, "caption": it["caption"] + " (edited)"} for it in _items(12)], broken={})
    with pytest.raises(UserError, match=r"other input .*the source files \(.*src\) differ"):
        download_stage.run(dl)


def test_one_network_spelled_two_ways_is_one_setting(tmp_path, monkeypatch):
    """`--allow-networks 127.0.0.1/8` names the network 127.0.0.0/8: a resume that spells it the other way
    (or as a duplicate) reuses the prepared rows and continues the pool instead of refusing them as
    other settings; a pool whose settings were saved as typed (before entries were canonical) too."""
    from laiontools.core.storage import write_json
    from laiontools.stages.download import DownloadConfig, check_output
    from laiontools.stages.prepare import canonical_networks

    monkeypatch.delenv("LAIONTOOLS_SPARK_MASTER", raising=False)
    assert canonical_networks(["127.0.0.1/8", "10.1.2.3", " 127.0.0.0/8", "::1"]) == ["127.0.0.0/8", "10.1.2.3/32", "::1/128"]
    with pytest.raises(ConfigError, match=r"allow_networks entry '127.0.0.300/8' is not an IP network"):
        canonical_networks(["127.0.0.300/8"])
    src, out = str(tmp_path / "src"), str(tmp_path / "pool")
    write_source(src, BASE, _items(12), broken={})
    first = prepare_stage.run(PrepareConfig(input=src, output=out, allow_networks=["127.0.0.1/8"], number_sample_per_shard=10,
                                            shards_per_file=1)).details
    assert first["policy"]["allow_networks"] == ["127.0.0.0/8"]
    stats_file = os.path.join(out, layout.PREPARED_DIR, layout.PREPARED_STATS_JSON)
    before = Path(stats_file).read_bytes()
    assert _prepare(None, src, out) == first  # 127.0.0.0/8: the same network, reused
    assert Path(stats_file).read_bytes() == before
    # A pool's settings.json saved with the entry as typed: the same network is the same setting ...
    dl = DownloadConfig(input=src, output=out, allow_networks=["127.0.0.0/8"], number_sample_per_shard=10, shards_per_file=1)
    write_json(os.path.join(out, layout.SETTINGS_JSON), {**dl.semantic(), "allow_networks": ["127.0.0.1/8"]})
    check_output(dl)
    # ... and another network is still another setting
    with pytest.raises(UserError, match=r"other settings \(allow_networks: \['127.0.0.0/8'\] -> \['10.0.0.0/8'\]\)"):
        check_output(DownloadConfig(input=src, output=out, allow_networks=["10.0.0.0/8"], number_sample_per_shard=10, shards_per_file=1))


# Found by a review of the download engines: hostile source files (a damaged gzip, nested values JSON has
# no type for, a quote that never closes, a column named like a helper column).

def _gz_jsonl_cut_in_half() -> bytes:
    data = gzip.compress(b"".join(json.dumps({"url": f"{BASE}/{i}.jpg", "caption": f"c {i}"}).encode() + b"\n"
                                  for i in range(50)))
    return data[: len(data) // 2]


def _gz_csv_cut_after_its_header() -> bytes:
    return gzip.compress(b"url,caption\n" + b"".join(f"{BASE}/{i}.jpg,c {i}\n".encode() for i in range(50)))[:12]


def _gz_jsonl_bit_flipped() -> bytes:
    data = bytearray(gzip.compress(b"".join(json.dumps({"url": f"{BASE}/{i}.jpg", "caption": f"c {i}"}).encode()
                                            + b"\n" for i in range(50))))
    data[20] ^= 0xFF  # corrupt deflate data: zlib.error
    return bytes(data)


@pytest.mark.parametrize("name, make", [("cut.jsonl.gz", _gz_jsonl_cut_in_half), ("cut.csv.gz", _gz_csv_cut_after_its_header),
                                        ("flipped.jsonl.gz", _gz_jsonl_bit_flipped)])
def test_a_damaged_gzip_source_is_one_input_error_naming_it(engine, tmp_path, name, make):
    """A .gz source cut short (a partial copy) or with corrupt deflate data, damaged within the lines the
    column probe reads: one InputError naming the file, as a parquet file cut short is, not EOFError /
    zlib.error with a traceback (the same file damaged further in already gives the InputError)."""
    src = tmp_path / name
    src.write_bytes(make())
    with pytest.raises(InputError, match=name.replace(".", r"\.")):
        _prepare(engine, str(src), str(tmp_path / "o"))


def test_a_parquet_extra_column_holding_nested_dates_or_bytes_is_carried(engine, tmp_path):
    """An extra parquet column whose values nest a timestamp, a decimal or bytes (a struct or a list of
    them) is carried as JSON text, as nested strings and numbers are: the valid file was refused whole
    as 'cannot read it as parquet (TypeError: Object of type datetime is not JSON serializable)'."""
    import datetime
    import decimal

    import pyarrow as pa
    import pyarrow.parquet as pq

    src = tmp_path / "nested.parquet"
    pq.write_table(pa.table({
        "url": [f"{BASE}/1.jpg", f"{BASE}/2.jpg"], "caption": ["a", "b"],
        "meta": pa.array([{"fetched": datetime.datetime(2020, 1, 1), "score": decimal.Decimal("0.50")}, None],
                         pa.struct([("fetched", pa.timestamp("us")), ("score", pa.decimal128(5, 2))])),
        "tags": pa.array([[b"x"], None], pa.list_(pa.binary())),
    }), src)
    stats = _prepare(engine, str(src), str(tmp_path / "o"))
    assert stats["rows_in"] == 2 and stats["accepted"] == 2
    acc = _prepared(str(tmp_path / "o"), "accepted").to_pylist()
    assert acc[0]["meta"] is not None and "2020-01-01" in acc[0]["meta"] and acc[1]["meta"] is None


@pytest.mark.parametrize("ext", ["csv", "tsv"])
def test_a_quoted_multi_line_caption_in_the_last_row_is_read_as_it_is(engine, tmp_path, ext):
    """The check for a quote that never closes runs when the file's last row holds a line break; a
    well-quoted multi-line caption there (and a quote doubled inside it) is no such quote: read as written."""
    sep = "\t" if ext == "tsv" else ","
    src = tmp_path / f"multi.{ext}"
    src.write_text(f'url{sep}caption\n{BASE}/1.jpg{sep}one\n{BASE}/2.jpg{sep}"two\nlines, a ""quote"""\n')
    stats = _prepare(engine, str(src), str(tmp_path / "o"))
    assert stats["rows_in"] == 2 and stats["accepted"] == 2
    caps = sorted(r["caption"] for r in _prepared(str(tmp_path / "o"), "accepted").to_pylist())
    assert caps == ["one", 'two lines, a "quote"']  # (prepare writes a caption's line breaks as spaces)


def test_an_unterminated_quote_does_not_swallow_the_rows_after_it(engine, tmp_path):
    """A caption that opens a quote and never closes it (a stray `"` in a LAION/CC-style text export): the
    rows after it were read as that caption's text, silently: rows_in 1 for a file of 3 rows, no rejected
    row, and the swallowed rows never reach the catalog (pandas: 'EOF inside string', Python's csv with
    strict=True: 'unexpected end of data'). Either a clear error naming the file or every line a row."""
    src = tmp_path / "stray.csv"
    src.write_text(f'url,caption\n{BASE}/1.jpg,"a stray quote\n{BASE}/2.jpg,two\n{BASE}/3.jpg,three\n')
    with pytest.raises(InputError, match=r"stray\.csv: line 2: unexpected end of data: a quoted field .*never closes"):
        _prepare(engine, str(src), str(tmp_path / "o"))


@pytest.mark.parametrize("case", ["large", "after_a_quirk"])
def test_an_unterminated_quote_is_found_in_a_large_file_and_after_a_quirk(engine, tmp_path, case):
    """The check above stopped at the first thing Python's strict csv reader refused that was not the end
    of the data, with only a warning, and the rows after the stray quote were silently swallowed as before:
    a field over csv's 128 KB limit (every file with more than ~128 KB after the stray quote: any real
    export), and a quirk Arrow reads leniently (`"a"b`) earlier in the file. Both are now the error, naming
    the line where the unclosed field's row starts."""
    src = tmp_path / f"{case}.csv"
    head = f'{BASE}/0.jpg,"a"b quirk\n' if case == "after_a_quirk" else ""
    tail = "".join(f"{BASE}/{i}.jpg,caption number {i} of a long export\n" for i in range(2, 6000 if case == "large" else 4))
    src.write_text(f'url,caption\n{head}{BASE}/1.jpg,"a stray quote\n{tail}')
    line = 3 if case == "after_a_quirk" else 2
    with pytest.raises(InputError, match=rf"{case}\.csv: line {line}: .*a quote that never closes|{case}\.csv: line {line}: unexpected end of data"):
        _prepare(engine, str(src), str(tmp_path / "o"))


def test_a_source_column_named_like_a_helper_column_is_prepared_alike_on_both_engines(engine, tmp_path):
    """A source column named `_occ` (the helper column of Spark's duplicate window): the in-process engine
    carried it, Spark's plan replaced it with the helper and then failed to find it (AnalysisException
    UNRESOLVED_COLUMN, a traceback): the same input must give the same result on either engine."""
    src = tmp_path / "helper.parquet"
    pd.DataFrame({"url": [f"{BASE}/1.jpg", f"{BASE}/2.jpg"], "caption": ["a", "b"], "_occ": ["x", "y"]}).to_parquet(src)
    stats = _prepare(engine, str(src), str(tmp_path / "o"))
    assert stats["rows_in"] == 2 and stats["accepted"] == 2


def test_a_nan_from_json_dumps_is_a_missing_value_not_the_text_nan(tmp_path, monkeypatch):
    """Python's json.dumps writes a missing (float NaN) value as NaN, which json reads back as a float: a
    NaN caption was the caption "nan" (accepted, downloaded, trained on), a NaN URL "nan" (rejected as a
    bad scheme), a NaN extra column the text "nan". Each is a missing value, as null is."""
    monkeypatch.delenv("LAIONTOOLS_SPARK_MASTER", raising=False)
    nan = float("nan")
    rows = [{"url": f"{BASE}/0.jpg", "caption": nan, "note": "a"},
            {"url": nan, "caption": "a cat", "note": "b"},
            {"url": f"{BASE}/2.jpg", "caption": "a dog", "note": nan}]
    src = tmp_path / "nan.jsonl"
    src.write_text("".join(json.dumps(r) + "\n" for r in rows))
    assert "NaN" in src.read_text()
    stats = _prepare(None, str(src), str(tmp_path / "o"))
    assert stats["rows_in"] == 3 and stats["accepted"] == 1
    assert stats["rejected"] == {"rejected_missing_caption": 1, "rejected_null_url": 1}
    out = _all_rows(str(tmp_path / "o")).set_index("note", drop=False)
    assert out.loc["a", "caption"] is None and out.loc["b", "url"] is None
    acc = out[out["status"] == "accepted"]
    assert acc["caption"].tolist() == ["a dog"] and acc["note"].tolist() == [None]


def test_a_jsonl_integer_too_long_for_float_or_int_is_a_null_number_not_a_failed_prepare(tmp_path, monkeypatch):
    """An integer of 401 digits in a score column (float() overflows) and one of 5,000 digits anywhere
    (json's int() refuses over 4,300 digits with a plain ValueError, which escaped the source probe as a
    traceback) stopped the whole prepare. They are numbers no column holds: null, the row kept."""
    monkeypatch.delenv("LAIONTOOLS_SPARK_MASTER", raising=False)
    src = tmp_path / "big.jsonl"
    lines = [f'{{"url": "{BASE}/0.jpg", "caption": "c0", "width": {"9" * 401}, "n": 1}}',
             f'{{"url": "{BASE}/1.jpg", "caption": "c1", "width": 64, "n": {"7" * 5000}}}',
             f'{{"url": "{BASE}/2.jpg", "caption": "c2", "width": 32, "n": 3}}']
    src.write_text("\n".join(lines) + "\n")
    stats = _prepare(None, str(src), str(tmp_path / "o"), columns="source_width=width")
    assert stats["rows_in"] == 3 and stats["accepted"] == 3 and stats["rejected"] == {}
    acc = pd.read_parquet(tmp_path / "o" / layout.PREPARED_DIR / "accepted").set_index("caption")
    assert pd.isna(acc.loc["c0", "source_width"]) and acc.loc["c1", "source_width"] == 64
    assert acc.loc["c1", "n"] == "7" * 5000 and acc.loc["c2", "n"] == "3"


def test_a_profile_column_only_some_files_have_is_read_where_it_is(tmp_path, monkeypatch):
    """The column mapping was the first file's: a LAION-2B part with punsafe/pwatermark after one without
    lost its scores (neither mapped nor carried), and a generic file with a caption after one with none
    had every row rejected as missing its caption. A field two files take from different columns is refused."""
    monkeypatch.delenv("LAIONTOOLS_SPARK_MASTER", raising=False)
    src = tmp_path / "src"
    src.mkdir()
    pd.DataFrame({"URL": [f"{BASE}/0.jpg"], "TEXT": ["zero"], "similarity": [0.31]}).to_parquet(src / "a.parquet")
    pd.DataFrame({"URL": [f"{BASE}/1.jpg"], "TEXT": ["one"], "similarity": [0.32], "punsafe": [0.9],
                  "pwatermark": [0.8]}).to_parquet(src / "b.parquet")
    stats = _prepare(None, str(src), str(tmp_path / "o"))
    assert stats["profile"] == "laion2b-en" and stats["accepted"] == 2
    acc = pd.read_parquet(tmp_path / "o" / layout.PREPARED_DIR / "accepted").set_index("caption")
    assert acc.loc["one", "punsafe"] == 0.9 and acc.loc["one", "pwatermark"] == 0.8
    assert pd.isna(acc.loc["zero", "punsafe"]) and acc["similarity"].tolist() == [0.31, 0.32]

    gen = tmp_path / "gen"
    gen.mkdir()
    (gen / "a.csv").write_text(f"url\n{BASE}/0.jpg\n")
    (gen / "b.csv").write_text(f"url,caption\n{BASE}/1.jpg,one\n")
    stats = _prepare(None, str(gen), str(tmp_path / "o2"))
    assert stats["accepted"] == 1 and stats["rejected"] == {"rejected_missing_caption": 1}
    assert pd.read_parquet(tmp_path / "o2" / layout.PREPARED_DIR / "accepted")["caption"].tolist() == ["one"]

    (gen / "c.csv").write_text(f"url,text\n{BASE}/2.jpg,two\n")
    with pytest.raises(InputError, match=r"c\.csv: its caption is column 'text', but .*b\.csv's is 'caption'"):
        _prepare(None, str(gen), str(tmp_path / "o3"))


def test_jsonl_with_a_byte_order_mark_keeps_its_first_row(tmp_path, monkeypatch):
    """A JSONL file saved as "UTF-8 with BOM" (Notepad, PowerShell), gzipped or not, and files joined by cat
    (a mark at each one's first line): each such line was a malformed row ("Unexpected UTF-8 BOM"), its
    sample lost. The mark is dropped, as a csv header's is."""
    monkeypatch.delenv("LAIONTOOLS_SPARK_MASTER", raising=False)
    src = tmp_path / "src"
    src.mkdir()
    lines = [json.dumps({"url": f"{BASE}/{i}.jpg", "caption": f"c{i}"}) for i in range(4)]
    bom = "\ufeff"
    (src / "a.jsonl").write_bytes((bom + lines[0] + "\r\n" + lines[1] + "\r\n" + bom + lines[2] + "\n").encode())
    (src / "b.jsonl.gz").write_bytes(gzip.compress((bom + lines[3] + "\n").encode()))
    stats = _prepare(None, str(src), str(tmp_path / "o"))
    assert stats["rows_in"] == 4 and stats["accepted"] == 4 and stats["rejected"] == {}
    acc = pd.read_parquet(tmp_path / "o" / layout.PREPARED_DIR / "accepted")
    assert acc["caption"].tolist() == ["c0", "c1", "c2", "c3"]


def _late_key_jsonl(path, n: int = 400, first: int = 300) -> str:
    """A laion2b-en JSONL source whose `punsafe` key (a profile column, which subsets filter on) first
    appears on line `first` (1-based), past the 200 lines the column probe used to read."""
    lines = [{"URL": f"{BASE}/{i}.jpg", "TEXT": f"c {i}", **({"punsafe": 0.25} if i >= first - 1 else {})}
             for i in range(n)]
    path.write_text("".join(json.dumps(r) + "\n" for r in lines))
    return str(path)


def test_jsonl_key_first_seen_on_line_300_is_read(engine, tmp_path):
    """A small JSONL file is probed whole: a key first seen on line 300 is a column (it was dropped for the
    whole file, silently: every row's punsafe null), the same on both engines."""
    src = _late_key_jsonl(tmp_path / "late.jsonl")
    stats = _prepare(engine, src, str(tmp_path / "o"))
    assert stats["rows_in"] == 400 and stats["accepted"] == 400
    rows = _all_rows(str(tmp_path / "o")).sort_values("row_idx")
    assert rows["punsafe"].iloc[:299].isna().all() and (rows["punsafe"].iloc[299:] == 0.25).all()


def test_jsonl_key_past_the_probe_stops_the_task_naming_line_and_key(engine, tmp_path, monkeypatch):
    """Past the probe's budget (here: its 200-line minimum only), a key with a value that the probe did not
    see stops prepare with an error naming the file, the line and the key, never dropped silently; a key
    seen only with null values loses nothing and passes."""
    monkeypatch.setattr(prepare_stage, "JSONL_PROBE_BYTES", 0)
    src = _late_key_jsonl(tmp_path / "late.jsonl")
    with pytest.raises(InputError, match=r"late.jsonl: line 300 has the key 'punsafe'.*would be lost"):
        _prepare(engine, src, str(tmp_path / "o"))
    nulls = tmp_path / "nulls.jsonl"
    nulls.write_text("".join(json.dumps({"url": f"{BASE}/{i}.jpg", "caption": f"c {i}",
                                         **({"extra": None} if i >= 299 else {})}) + "\n" for i in range(400)))
    assert _prepare(engine, str(nulls), str(tmp_path / "o2"))["accepted"] == 400


def test_on_spark_the_accepted_files_take_the_sessions_parquet_codec(spark, tmp_path):
    """prepare's accepted files, written by its Spark tasks through pyarrow, are compressed with the session's
    spark.sql.parquet.compression.codec, as the rejected rows Spark's writer writes are (they were zstd
    whatever the session said)."""
    import pyarrow.parquet as pq

    write_source(str(tmp_path / "src"), BASE, _items(30), profile="laion400m", fmt="parquet", n_files=2, seed=3)
    key = "spark.sql.parquet.compression.codec"
    before = spark.conf.get(key)
    spark.conf.set(key, "snappy")
    try:
        assert _prepare(spark, str(tmp_path / "src"), str(tmp_path / "out"))["engine"].startswith("spark ")
    finally:
        spark.conf.set(key, before)
    files = sorted((tmp_path / "out" / layout.PREPARED_DIR / "accepted").glob("*.parquet"))
    assert files and {pq.ParquetFile(f).metadata.row_group(0).column(c).compression
                      for f in files for c in range(pq.ParquetFile(f).metadata.num_columns)} == {"SNAPPY"}
