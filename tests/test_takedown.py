"""Removal lists through the whole lineage (issue 14, part 2): `takedown` -> new pool -> `subsets --update`
-> `reshard` -> `verify --removal-list`, on the session pool.

What must be removed is computed here independently of laiontools' matching: every stored sample's image
bytes are hashed with hashlib / imagehash straight from the tars (tarfile), and catalog rows are matched by
plain string comparison, so the expected removal set and the expected subsets do not come from the code
under test.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import re
import tarfile
from urllib.parse import urlsplit

import numpy as np
import pandas as pd
import pytest

from laiontools.contracts import layout
from laiontools.contracts.manifest import read_manifest, resolve
from laiontools.contracts.removal import RemovalListError
from laiontools.contracts.selection import reference_selection
from laiontools.contracts.uids import array_to_uids, load_uids
from laiontools.core.errors import user_error_from

REASON = "DMCA request #12"  # sanitized to removed_dmca_request_12
STATUS = "removed_dmca_request_12"
SEED = 5
SCALES = "10,30"


def _samples(tar_path: str) -> dict[str, dict]:
    """key -> {uid, url, sha256, md5, phash} of every sample of a tar, read with tarfile + hashlib + imagehash."""
    import imagehash
    from PIL import Image

    out: dict[str, dict] = {}
    with tarfile.open(tar_path) as tf:
        for ti in tf:
            key, _, ext = ti.name.partition(".")
            d = out.setdefault(key, {})
            data = tf.extractfile(ti).read()
            if ext == "json":
                meta = json.loads(data)
                d["uid"], d["url"] = meta["uid"], meta.get("url")
            elif ext == "jpg":
                d["sha256"], d["md5"] = hashlib.sha256(data).hexdigest(), hashlib.md5(data).hexdigest()
                d["phash"] = int(str(imagehash.phash(Image.open(io.BytesIO(data)).convert("RGB"))), 16)
    return out


def _uids(path: str) -> list[str]:
    return array_to_uids(np.asarray(load_uids(path, mmap=False)))


def _text(path: str) -> str:
    with open(path) as f:
        return f.read()


def _sha(path: str) -> str:
    with open(path, "rb") as f:
        return hashlib.sha256(f.read()).hexdigest()


@pytest.fixture(scope="module")
def lineage(pool, spark, tmp_path_factory):
    from laiontools.contracts.uids import save_uids
    from laiontools.stages import subsets as subsets_stage
    from laiontools.stages import takedown as takedown_stage
    from laiontools.stages.subsets import SubsetsConfig
    from laiontools.stages.takedown import TakedownConfig

    root = str(tmp_path_factory.mktemp("takedown"))
    m = read_manifest(pool.manifest)
    stored = {}  # uid -> (shard id, key, hashes)
    for s in m["shards"]:
        sid = s["path"].split("/")[-1].removesuffix(".tar")
        for key, d in _samples(resolve(pool.manifest, s["path"])).items():
            stored[d["uid"]] = (sid, key, d)
    cat = pd.read_parquet(f"{pool.dir}/catalog")
    succ = cat[cat["status"] == "success"].set_index("uid")
    shards = sorted({v[0] for v in stored.values()})
    assert len(shards) >= 4, "the session pool should have 4 shards"
    c = min(u for u in stored if stored[u][0] == shards[2])  # listed by the sha256 of its stored bytes

    # The old subsets exclude a dedup output holding c (which the takedown then removes) and one uid of the
    # shard that stays untouched: --update must still accept that exclusion (its uids are the lineage's).
    excl = f"{root}/dedup"
    os.makedirs(excl)
    excluded = {c, max(u for u in stored if stored[u][0] == shards[3])}
    save_uids(f"{excl}/exclude.uids.npy", sorted(excluded))
    old_sub = f"{root}/sub0"
    subsets_stage.run(SubsetsConfig(pool=pool.manifest, output=old_sub, scales=SCALES, seed=SEED, exclude=[excl]), spark)
    small, large = set(_uids(f"{old_sub}/10.uids.npy")), set(_uids(f"{old_sub}/30.uids.npy"))
    assert not (small | large) & excluded

    # Entries in shards other than the fourth (which stays untouched) and in both scales. Which samples the
    # session pool holds can vary with the machine's load (a 2 s timeout, no retries), and with it which shards
    # the 10 and 30 selections reach: the shards are picked from what is there, not assumed.
    def first_in(uids, avoid):
        for sh in shards:
            hits = [u for u in uids if stored[u][0] == sh]
            if sh not in avoid and hits:
                return min(hits)
        raise AssertionError(f"no shard outside {sorted(avoid)} holds one of {sorted(uids)}")

    a = first_in(small, {shards[3]})  # uid, in 10 and 30
    b = first_in(large - small, {shards[3], stored[a][0]})  # url, in 30 only
    ph = {u: v[2]["phash"] for u, v in stored.items()}

    def near(u, dist):
        return [w for w in ph if (ph[u] ^ ph[w]).bit_count() <= dist]

    # a pHash entry (max distance 1) for another sample of a's shard with no other image that close; not c,
    # which a shares a shard with when the 10 reach nothing of shards 0 and 1 (the sha256 entry would match it first)
    d = next(u for u in sorted(stored) if stored[u][0] == stored[a][0] and u not in (a, c) and near(u, 1) == [u])
    rejected = cat[cat["url"].fillna("").str.contains(".invalid/", regex=False)]
    host = urlsplit(rejected["url"].iloc[0]).hostname  # a catalog row without a stored sample
    url_b = succ.loc[b, "url"]
    u = urlsplit(url_b)
    listed_url = f"HTTP://{u.hostname.upper()}:{u.port}{u.path}"  # compared after normalize_url
    text = (f"# takedown batch 12\nuid {a}\nurl {listed_url}\nsha256 {stored[c][2]['sha256']}\n"
            f"phash {ph[d]:016x} 1\ndomain {host}\ndomain never-in-this-pool.example\n")
    listfile = f"{root}/list.txt"
    with open(listfile, "w") as f:
        f.write(text)

    # expected, independently: stored samples hit by any entry, catalog rows without a sample hit by url/domain/uid
    def hit_row(r_uid, r_url):
        h = (urlsplit(r_url).hostname or "") if isinstance(r_url, str) else ""
        return r_uid == a or (isinstance(r_url, str) and r_url == url_b) or h == host or h.endswith("." + host)

    expect_removed = {w for w, (_, _, hs) in stored.items()
                      if hit_row(w, succ.loc[w, "url"]) or hs["sha256"] == stored[c][2]["sha256"]
                      or (hs["phash"] ^ ph[d]).bit_count() <= 1}
    expect_rows_without = {(r.uid, r.status) for r in cat.itertuples() if r.status != "success" and hit_row(r.uid, r.url)}
    assert {a, b, c, d} <= expect_removed and expect_rows_without

    new = f"{root}/pool1"
    before = {s["path"]: _sha(resolve(pool.manifest, s["path"])) for s in m["shards"]}
    res = takedown_stage.run(TakedownConfig(pool=pool.manifest, list_file=listfile, reason=REASON, output=new), spark)
    return {"root": root, "old_sub": old_sub, "small": small, "large": large, "listfile": listfile, "new": new,
            "res": res, "expect_removed": expect_removed, "expect_rows_without": expect_rows_without, "stored": stored,
            "cat": cat, "shards": shards, "before": before, "a": a, "b": b, "c": c, "d": d, "excluded": excluded}


def test_takedown_removes_exactly_the_listed_samples(lineage, pool):
    L = lineage
    new_m = read_manifest(f"{L['new']}/pool.manifest.json")
    old_m = read_manifest(pool.manifest)
    assert new_m["parent"] == {"name": old_m["name"], "path": os.path.abspath(pool.manifest), "sha256": _sha(pool.manifest)}
    old_uids, new_uids = set(_uids(f"{pool.dir}/pool.uids.npy")), set(_uids(f"{L['new']}/pool.uids.npy"))
    assert old_uids - new_uids == L["expect_removed"] and new_uids <= old_uids
    assert new_m["num_samples"] == len(old_uids) - len(L["expect_removed"])
    assert L["res"].counts["removed"] == len(L["expect_removed"])
    # its uid file's distinct + sort ran on as many partitions as the pool's size asks (local[2], a small
    # pool: 2), not Spark's 200; the run sidecar says so
    with open(f"{L['new']}/pool.manifest.json.run.json") as f:
        assert json.load(f)["spark"] == {"shuffle_partitions": 2}
    tk = new_m["takedown"]
    assert tk["status"] == STATUS and tk["list"]["sha256"] == _sha(L["listfile"]) and tk["list"]["entries"] == 6
    assert set(tk["by_kind"]) >= {"uid", "url", "sha256", "phash", "domain"}
    # the one line that names nothing in the pool is named (line 7 of the list: line 1 is a comment)
    rep = json.loads(_text(f"{L['new']}/takedown.json"))
    assert rep["lines_matching_nothing"] == [{"line": 7, "entry": "domain never-in-this-pool.example"}]
    assert rep["counts"]["lines_matching_nothing"] == 1 and rep["lines_already_removed"] == []
    # inspect shows the takedown: list, counts, and the audit log beside the manifest
    from laiontools.stages.verify import inspect_text

    shown = inspect_text(f"{L['new']}/pool.manifest.json")
    n_log = len(_text(f"{L['new']}/takedown.audit.jsonl").splitlines())
    assert f"takedown: reason {REASON}, status {STATUS}" in shown and f"sha256 {_sha(L['listfile'])[:16]}" in shown, shown
    assert f"removed       {len(L['expect_removed'])} sample(s); {len(L['expect_rows_without'])} more catalog row(s)" in shown, shown
    assert f"({n_log} entr{'y' if n_log == 1 else 'ies'};" in shown and "MISSING" not in shown, shown
    assert "1 line(s) of the list matched nothing in this pool: line 7: domain never-in-this-pool.example" in _text(f"{L['new']}/takedown.txt")

    # catalog: same rows; removed ones get the status; nothing else changes but the spans of rewritten shards
    new_cat = pd.read_parquet(f"{L['new']}/catalog")
    old_cat = L["cat"]
    assert len(new_cat) == len(old_cat) and list(new_cat.columns) == list(old_cat.columns)
    changed = {(r.uid, r.status) for r in old_cat.itertuples()
               if r.uid in L["expect_removed"] and r.status == "success"} | L["expect_rows_without"]
    key = ["uid", "status"]
    o = old_cat.set_index(key).sort_index()
    marked = new_cat[new_cat["status"] == STATUS]
    assert len(marked) == len(changed)
    assert set(marked["uid"]) == {u for u, _ in changed}
    assert marked["error_message"].str.contains("line").all()
    span_cols = [c for c in ("tar_offset", "tar_length", "tar_sha256") if c in new_cat.columns]
    assert marked[span_cols].isna().all().all()  # removed: no bytes left to point at
    kept = new_cat[new_cat["status"] != STATUS].set_index(key).sort_index()
    ok = o.loc[kept.index]
    rewritten = {L["stored"][u][0] for u in L["expect_removed"]}
    same_cols = [c for c in old_cat.columns if c not in ("uid", "status", "tar_offset", "tar_length")]
    pd.testing.assert_frame_equal(kept[same_cols], ok[same_cols])
    untouched_rows = ~kept["shard"].isin(rewritten)
    pd.testing.assert_frame_equal(kept.loc[untouched_rows, ["tar_offset", "tar_length"]], ok.loc[untouched_rows, ["tar_offset", "tar_length"]])

    # shards: untouched ones referenced (same file, byte-identical); rewritten ones hold the rest in order
    for s_old, s_new in zip(old_m["shards"], new_m["shards"]):
        sid = s_old["path"].split("/")[-1].removesuffix(".tar")
        old_file, new_file = resolve(pool.manifest, s_old["path"]), resolve(f"{L['new']}/pool.manifest.json", s_new["path"])
        assert _sha(old_file) == L["before"][s_old["path"]]  # the parent pool is never written
        if sid not in rewritten:
            assert os.path.abspath(old_file) == new_file and s_new["sha256"] == s_old["sha256"]
            continue
        assert new_file.startswith(L["new"]) and _sha(new_file) == s_new["sha256"] and os.path.exists(new_file + ".done")
        assert os.path.exists(new_file.removesuffix(".tar") + "_stats.json")
        with tarfile.open(old_file) as a, tarfile.open(new_file) as b:
            gone = {k for u, (sh, k, _) in L["stored"].items() if sh == sid and u in L["expect_removed"]}
            want = [(ti.name, a.extractfile(ti).read()) for ti in a if ti.name.partition(".")[0] not in gone]
            got = [(ti.name, b.extractfile(ti).read()) for ti in b]
            assert got == want and s_new["num_samples"] == s_old["num_samples"] - len(gone)
        # spans in the catalog point at the right bytes of the new tar
        rows = kept[kept["shard"] == sid].reset_index()
        with open(new_file, "rb") as f:
            data = f.read()
        for r in rows[rows["status"] == "success"].itertuples():
            if "tar_sha256" in rows.columns:  # the span's bytes are the ones download hashed
                assert hashlib.sha256(data[int(r.tar_offset):int(r.tar_offset + r.tar_length)]).hexdigest() == r.tar_sha256
            span = data[int(r.tar_offset):int(r.tar_offset + r.tar_length)] + bytes(1024)
            with tarfile.open(fileobj=io.BytesIO(span)) as tf:
                assert [ti.name.partition(".")[0] for ti in tf] == [r.key] * 3
    assert len(rewritten) < len(old_m["shards"])  # at least one shard stayed untouched


def test_the_in_process_engine_writes_what_the_spark_engine_writes(lineage, pool, monkeypatch):
    """Below --spark-above catalog rows, with no session given and no master named, the takedown runs in this
    process (the catalog read whole with pyarrow, the content scan and the shard rewrites on threads): the
    same rows matched, the same new pool as the Spark run of `lineage` (uid file and rewritten shards byte
    for byte, the same catalog rows and manifest entries, the same report), and its run sidecar says so."""
    from laiontools.stages import takedown as takedown_stage
    from laiontools.stages.takedown import TakedownConfig

    monkeypatch.delenv("LAIONTOOLS_SPARK_MASTER", raising=False)
    L = lineage
    local = f"{L['root']}/pool1-in-process"
    res = takedown_stage.run(TakedownConfig(pool=pool.manifest, list_file=L["listfile"], reason=REASON, output=local))
    assert res.counts == L["res"].counts and res.counts["removed"] == len(L["expect_removed"])
    runs = {w: json.loads(_text(f"{d}/pool.manifest.json.run.json"))["engine"] for w, d in (("local", local), ("spark", L["new"]))}
    assert runs["local"] == "in-process" and runs["spark"].startswith("spark "), runs
    assert _sha(f"{local}/pool.uids.npy") == _sha(f"{L['new']}/pool.uids.npy")
    a, b = read_manifest(f"{local}/pool.manifest.json"), read_manifest(f"{L['new']}/pool.manifest.json")
    for k in ("num_samples", "uids", "shards", "parent", "catalog", "takedown", "source"):
        assert a[k] == b[k], k
    rewritten = [s["path"] for s in a["shards"] if s["path"].startswith("shards/")]
    assert rewritten and all(_sha(f"{local}/{p}") == _sha(f"{L['new']}/{p}") for p in rewritten)
    order = ["uid", "status", "shard", "key", "url"]
    cats = [pd.read_parquet(f"{d}/catalog").sort_values(order).reset_index(drop=True) for d in (local, L["new"])]
    pd.testing.assert_frame_equal(*cats)
    assert (cats[0]["status"] == STATUS).sum() == len(L["expect_removed"]) + len(L["expect_rows_without"])
    reports = [json.loads(_text(f"{d}/takedown.json")) for d in (local, L["new"])]
    for k in ("counts", "per_shard", "uids", "removed", "catalog_rows", "catalog_rows_without_sample",
              "lines_matching_nothing", "lines_already_removed", "not_content_checked"):
        assert reports[0][k] == reports[1][k], k


def test_audit_log_and_rerun_give_the_same_pool(lineage, pool, spark):
    from laiontools.stages import takedown as takedown_stage
    from laiontools.stages.takedown import TakedownConfig

    L = lineage
    log_path = f"{L['new']}/takedown.audit.jsonl"
    lines = _text(log_path).splitlines()
    assert len(lines) == 1
    e = json.loads(lines[0])
    assert e["who"].count("@") == 1 and e["time"].endswith("Z") and e["reason"] == REASON and e["status"] == STATUS
    assert e["list"] == {"path": os.path.abspath(L["listfile"]), "sha256": _sha(L["listfile"]), "entries": 6}
    assert set(e["uids"]) == L["expect_removed"] and sum(e["per_shard"].values()) == len(L["expect_removed"])
    assert e["pool"]["sha256"] == _sha(f"{L['new']}/pool.manifest.json")
    files = ["pool.manifest.json", "pool.uids.npy"] + [f"shards/{s}.tar" for s in e["per_shard"]]
    before = {f: _sha(f"{L['new']}/{f}") for f in files}
    cat_before = pd.read_parquet(f"{L['new']}/catalog").sort_values(["uid", "status"]).reset_index(drop=True)
    res = takedown_stage.run(TakedownConfig(pool=pool.manifest, list_file=L["listfile"], reason=REASON, output=L["new"]), spark)
    assert res.counts["removed"] == len(L["expect_removed"])
    assert {f: _sha(f"{L['new']}/{f}") for f in files} == before
    pd.testing.assert_frame_equal(pd.read_parquet(f"{L['new']}/catalog").sort_values(["uid", "status"]).reset_index(drop=True), cat_before)
    assert len(_text(log_path).splitlines()) == 2  # one entry per run

    # another list into the same folder is refused, nothing changed
    other = f"{L['root']}/other.txt"
    with open(other, "w") as f:
        f.write(f"uid {max(L['large'])}\n")
    from laiontools.stages.takedown import TakedownError

    with pytest.raises(TakedownError, match="holds a takedown with other list_sha256"):
        takedown_stage.run(TakedownConfig(pool=pool.manifest, list_file=other, reason=REASON, output=L["new"]), spark)
    assert len(_text(log_path).splitlines()) == 2


def test_malformed_list_names_the_line_and_writes_nothing(pool, tmp_path):
    from laiontools.cli import main

    bad = tmp_path / "bad.txt"
    bad.write_text(f"uid {'0' * 32}\nurl http://example.com/a.jpg\nsha256 1234\n")
    out = tmp_path / "new"
    with pytest.raises(RemovalListError, match=r"bad\.txt:3: sha256 must be 64 hex"):
        from laiontools.stages import takedown as takedown_stage
        from laiontools.stages.takedown import TakedownConfig

        takedown_stage.run(TakedownConfig(pool=pool.manifest, list_file=str(bad), reason="x", output=str(out)))
    assert not out.exists()
    assert main(["takedown", "--pool", pool.manifest, "--list", str(bad), "--reason", "x", "--output", str(out)]) == 2
    assert not out.exists()


def test_a_list_that_matches_nothing_changes_nothing(lineage, pool, spark, capsys):
    from laiontools.cli import main

    L = lineage
    nothing = f"{L['root']}/nothing.txt"
    with open(nothing, "w") as f:
        f.write(f"uid {'f' * 32}\ndomain never.example\nurl http://127.0.0.9/none.jpg\n")
    # on the new pool: the audit log of the parent is carried forward and grows by one
    out = f"{L['root']}/pool2"
    parent_log = _text(f"{L['new']}/takedown.audit.jsonl").splitlines()
    capsys.readouterr()
    # through the CLI (it finds the test's Spark session): exit 0 and a clear message
    assert main(["takedown", "--pool", f"{L['new']}/pool.manifest.json", "--list", nothing, "--reason", "none",
                 "--output", out]) == 0
    printed = capsys.readouterr().out
    assert "matched nothing" in printed and "3 line(s) of the list matched nothing in this pool" in printed, printed
    rep = json.loads(_text(f"{out}/takedown.json"))
    assert rep["lines_matching_nothing"] == [{"line": 1, "entry": f"uid {'f' * 32}"}, {"line": 2, "entry": "domain never.example"},
                                             {"line": 3, "entry": "url http://127.0.0.9/none.jpg"}]
    assert rep["counts"]["samples_removed"] == 0 and rep["counts"]["shards_rewritten"] == 0 and rep["removed"] == []
    m_old, m_new = read_manifest(f"{L['new']}/pool.manifest.json"), read_manifest(f"{out}/pool.manifest.json")
    assert _sha(f"{out}/pool.uids.npy") == _sha(f"{L['new']}/pool.uids.npy")
    assert [s["sha256"] for s in m_new["shards"]] == [s["sha256"] for s in m_old["shards"]]
    assert [resolve(f"{out}/pool.manifest.json", s["path"]) for s in m_new["shards"]] == \
        [resolve(f"{L['new']}/pool.manifest.json", s["path"]) for s in m_old["shards"]]
    a = pd.read_parquet(f"{L['new']}/catalog").sort_values(["uid", "status"]).reset_index(drop=True)
    b = pd.read_parquet(f"{out}/catalog").sort_values(["uid", "status"]).reset_index(drop=True)
    pd.testing.assert_frame_equal(a, b)
    log = _text(f"{out}/takedown.audit.jsonl").splitlines()
    assert log[:-1] == parent_log and json.loads(log[-1])["matched_nothing"] is True and json.loads(log[-1])["uids"] == []
    assert not os.path.exists(f"{out}/shards")


def test_a_second_takedown_keeps_the_first_ones_removal_stamps(lineage, spark):
    from laiontools.stages import takedown as takedown_stage
    from laiontools.stages.takedown import TakedownConfig

    # the same list on the pool it made: every row it names was removed (or marked) by the first run, so
    # the second removes nothing and re-stamps nothing; the rows keep the first run's status and message
    L = lineage
    out = f"{L['root']}/pool_again"
    res = takedown_stage.run(TakedownConfig(pool=f"{L['new']}/pool.manifest.json", list_file=L["listfile"], reason="second",
                                            output=out), spark)
    assert res.counts["removed"] == 0 and res.counts["catalog_rows_marked"] == 0
    a = pd.read_parquet(f"{L['new']}/catalog").sort_values(["uid", "status"]).reset_index(drop=True)
    b = pd.read_parquet(f"{out}/catalog").sort_values(["uid", "status"]).reset_index(drop=True)
    pd.testing.assert_frame_equal(a, b)
    assert not b["status"].eq("removed_second").any()
    last = json.loads(_text(f"{out}/takedown.audit.jsonl").splitlines()[-1])
    assert last["matched_nothing"] and last["uids"] == [] and last["catalog_rows_without_sample"] == []
    # the report says which lines named only what the first run removed (the pHash line too, though the
    # catalog holds no pHash: the removed row's message names its entry) and which named nothing at all
    assert [x["line"] for x in last["lines_already_removed"]] == [2, 3, 4, 5, 6]
    assert last["lines_matching_nothing"] == [{"line": 7, "entry": "domain never-in-this-pool.example"}]
    assert "5 line(s) of the list named only samples an earlier takedown removed" in _text(f"{out}/takedown.txt")


def test_subsets_update_reshard_and_verify(lineage, pool, spark, capsys):
    from laiontools.stages import reshard as reshard_stage
    from laiontools.stages import subsets as subsets_stage
    from laiontools.stages.reshard import ReshardConfig
    from laiontools.stages.subsets import SubsetsConfig
    from laiontools.stages.verify import verify_main

    L = lineage
    new_sub = f"{L['root']}/sub1"
    res = subsets_stage.run(SubsetsConfig(pool=f"{L['new']}/pool.manifest.json", output=new_sub, update=L["old_sub"]), spark)
    assert res.ok, res.summary

    # expected, independently: the old run's recipe (no filters) on the new pool = reference_selection over
    # its samples; and that equals old - removed + the next ones in the old ranking
    new_pool_uids = sorted(set(_uids(f"{L['new']}/pool.uids.npy")) - L["excluded"])  # eligible: all but the exclusion
    old_pool_uids = sorted(set(_uids(f"{pool.dir}/pool.uids.npy")) - L["excluded"])
    from laiontools.contracts.selection import selection_scores

    score = dict(zip(old_pool_uids, (int(x) for x in selection_scores(old_pool_uids, SEED))))
    order = sorted(old_pool_uids, key=lambda u: (score[u], u))  # the old ranking
    for label, n, old in (("10", 10, L["small"]), ("30", 30, L["large"])):
        got = set(_uids(f"{new_sub}/{label}.uids.npy"))
        assert got == set(reference_selection(new_pool_uids, SEED, n))
        gone = old & L["expect_removed"]
        nxt = [u for u in order if u not in old and u not in L["expect_removed"]][: len(gone)]
        assert got == (old - gone) | set(nxt)
        d = json.loads(_text(f"{new_sub}/{label}.diff.json"))
        assert set(d["removed"]) == gone and set(d["added"]) == set(nxt) and d["ok"] and not d["skipped"]
        # the largest: the added are every eligible uid between the cuts (counted by the run); the smaller: ranked in it
        assert ("added_are_every_eligible_between_cuts" in d["checks"]) == (label == "30") and \
            ("new_is_lowest_ranked_of_larger" in d["checks"]) == (label == "10")
        last = max(old, key=lambda u: (score[u], u))  # the old run's cut, recorded in its manifest and used
        assert d["old_cut"] == {"score": f"{score[last]:016x}", "uid": last}
        assert json.loads(_text(f"{L['old_sub']}/{label}.manifest.json"))["selection"]["cut"] == d["old_cut"]
        assert d["counts"]["new"] == n
    assert set(_uids(f"{new_sub}/10.uids.npy")) <= set(_uids(f"{new_sub}/30.uids.npy"))
    assert L["a"] in L["small"] and L["b"] in L["large"] - L["small"]  # the list hit both scales
    assert json.loads(_text(f"{new_sub}/update.json"))["ok"] is True

    # reshard the updated 30 and verify it, and the new pool, against the list; the old pool fails naming items
    rs = f"{L['root']}/rs30"
    reshard_stage.run(ReshardConfig(manifest=f"{new_sub}/30.manifest.json", output=rs, shard_size=8), spark)
    assert verify_main([f"{rs}/subset.manifest.json", "--removal-list", L["listfile"]]) == 0
    assert verify_main([f"{L['new']}/pool.manifest.json", "--removal-list", L["listfile"]]) == 0
    capsys.readouterr()
    assert verify_main([pool.manifest, "--removal-list", L["listfile"], "--no-parent"]) == 1
    err = capsys.readouterr()
    text = err.out + err.err
    assert f"uid {L['a']}" in text and "matches url" in text and "matches sha256" in text


def test_update_refuses_a_pool_not_descending_from_the_old_one(lineage, pool, tmp_path):
    from laiontools.stages import subsets as subsets_stage
    from laiontools.stages.subsets import SubsetError, SubsetsConfig

    # the old subsets' pool itself is its own lineage: fine; a pool from elsewhere is not
    other = tmp_path / "p"
    other.mkdir()
    m = read_manifest(pool.manifest)
    m["source"]["fingerprint"] = "0" * 64
    from laiontools.contracts.manifest import write_manifest

    write_manifest(str(other / "pool.manifest.json"), m)
    os.symlink(f"{pool.dir}/catalog", other / "catalog")
    with pytest.raises(SubsetError, match="does not descend from"):
        subsets_stage.run(SubsetsConfig(pool=str(other / "pool.manifest.json"), output=str(tmp_path / "o"), update=lineage["old_sub"]))

    # a takedown pool whose parent is gone: the error names the missing parent as its parent, not as the
    # --pool given (it said "give the pool.manifest.json written by download"), and the pool that records it
    from laiontools.contracts.schema import ManifestError

    orphan = tmp_path / "orphan"
    orphan.mkdir()
    m = read_manifest(f"{lineage['new']}/pool.manifest.json")
    gone = str(tmp_path / "moved" / "pool.manifest.json")
    m["parent"]["path"] = gone
    write_manifest(str(orphan / "pool.manifest.json"), m)
    for name in ("catalog", "pool.uids.npy"):
        os.symlink(f"{lineage['new']}/{name}", orphan / name)
    with pytest.raises(ManifestError, match=rf"orphan/pool\.manifest\.json: its parent pool {re.escape(gone)} \(recorded by the "
                                            r"takedown that made it\) cannot be read: manifest .* does not exist"):
        subsets_stage.run(SubsetsConfig(pool=str(orphan / "pool.manifest.json"), output=str(tmp_path / "o2"), update=lineage["old_sub"]))


# ---------------------------------------------------------------------------------------------- small parts, no Spark


def _tar(path, samples, fmt=tarfile.PAX_FORMAT):
    with tarfile.open(path, "w", format=fmt) as tf:
        for key in samples:
            for ext, data in (("jpg", os.urandom(700)), ("txt", key.encode()), ("json", json.dumps({"uid": key * 4}).encode())):
                ti = tarfile.TarInfo(f"{key}.{ext}")
                ti.size, ti.mtime = len(data), 1_700_000_000.5
                tf.addfile(ti, io.BytesIO(data))


@pytest.mark.parametrize("fmt", [tarfile.PAX_FORMAT, tarfile.USTAR_FORMAT])
def test_rewrite_shard_copies_the_other_members_byte_for_byte(tmp_path, fmt):
    from laiontools.stages.takedown import rewrite_shard

    src, dst = str(tmp_path / "a" / "00000.tar"), str(tmp_path / "b" / "00000.tar")
    os.makedirs(tmp_path / "a")
    _tar(src, ["k0", "k1", "k2", "k3"], fmt)
    note = {"source": src, "source_sha256": _sha(src), "source_bytes": os.path.getsize(src), "list_sha256": "0" * 64}
    info = rewrite_shard(src, dst, ["k1", "k3"], "removed_x", note)
    with tarfile.open(src) as a, tarfile.open(dst) as b:
        want = [(ti.name, ti.mtime, a.extractfile(ti).read()) for ti in a if ti.name[:2] not in ("k1", "k3")]
        got = [(ti.name, ti.mtime, b.extractfile(ti).read()) for ti in b]
    assert got == want and info["num_samples"] == 2 and info["sha256"] == _sha(dst)
    assert os.path.getsize(dst) % tarfile.RECORDSIZE == 0  # closed as tarfile closes a tar
    with open(dst + ".done") as f:
        assert json.load(f)["removed_keys"] == ["k1", "k3"]
    with open(dst, "rb") as f:
        data = f.read()
    for key, (off, n) in info["spans"].items():  # the spans the catalog gets: the sample's own members
        with tarfile.open(fileobj=io.BytesIO(data[off:off + n] + bytes(1024))) as tf:
            assert {ti.name for ti in tf} == {f"{key}.jpg", f"{key}.txt", f"{key}.json"}
    # the same call again: the marker says done, nothing rewritten
    mtime = os.stat(dst).st_mtime_ns
    assert rewrite_shard(src, dst, ["k1", "k3"], "removed_x", note)["sha256"] == info["sha256"]
    assert os.stat(dst).st_mtime_ns == mtime


def test_rewrite_shard_refuses_a_key_the_tar_lacks(tmp_path):
    from laiontools.stages.takedown import TakedownError, rewrite_shard

    src = str(tmp_path / "00000.tar")
    _tar(src, ["k0"])
    note = {"source": src, "source_sha256": "0" * 64, "source_bytes": 1, "list_sha256": "0" * 64}
    with pytest.raises(TakedownError, match=r"00000\.tar: the catalog lists samples \['zz'\].*disagree"):
        rewrite_shard(src, str(tmp_path / "out" / "00000.tar"), ["zz"], "removed_x", note)
    assert not (tmp_path / "out" / "00000.tar").exists()


def test_content_scan_takes_a_sample_whose_json_is_no_object(tmp_path):
    """A sample whose image matches a sha256 entry is found by its bytes, whatever its .json holds: a
    list, a number uid, or text that is not JSON give no uid, not a crash."""
    from laiontools.contracts.removal import parse_removal_list
    from laiontools.stages.takedown import scan_content

    path = str(tmp_path / "00000.tar")
    imgs = {k: os.urandom(500) for k in ("k0", "k1", "k2", "k3")}
    metas = {"k0": b"[1, 2]", "k1": b'{"uid": 7}', "k2": b"not json", "k3": json.dumps({"uid": "ab" * 16}).encode()}
    with tarfile.open(path, "w") as tf:
        for key, img in imgs.items():
            for ext, data in (("jpg", img), ("json", metas[key])):
                ti = tarfile.TarInfo(f"{key}.{ext}")
                ti.size = len(data)
                tf.addfile(ti, io.BytesIO(data))
    rl = parse_removal_list("".join(f"sha256 {hashlib.sha256(b).hexdigest()}\n" for b in imgs.values()))
    got = {key: uid for key, uid, kind, _, _, _ in scan_content(path, rl)}
    assert got == {"k0": "", "k1": "", "k2": "", "k3": "ab" * 16}



def test_a_content_scan_names_the_samples_it_could_not_check(tmp_path):
    """An image that does not decode cannot be compared with a pHash entry: the scan names such samples
    (walk F12: "matched nothing" said nothing of the hostile samples it had skipped), so that takedown.json
    counts them and the text says so. Its bytes still meet sha256/md5 entries; a sample without an image
    holds no listed image."""
    from PIL import Image

    from laiontools.contracts.removal import parse_removal_list
    from laiontools.stages.takedown import UNCHECKED_NO_PHASH, _text, scan_content

    png = io.BytesIO()
    Image.new("RGB", (32, 32), (200, 10, 10)).save(png, format="PNG")
    members = {"good": [("png", png.getvalue())], "noimg": [("txt", b"a caption")], "broken": [("jpg", b"not an image")]}
    path = str(tmp_path / "00000.tar")
    with tarfile.open(path, "w") as tf:
        for key, parts in members.items():
            for ext, data in parts + [("json", json.dumps({"uid": key.ljust(32, "0")}).encode())]:
                ti = tarfile.TarInfo(f"{key}.{ext}")
                ti.size = len(data)
                tf.addfile(ti, io.BytesIO(data))
    unchecked = lambda rl: {key: why for key, _, kind, why, _, _ in scan_content(path, rl) if kind == "unchecked"}
    assert unchecked(parse_removal_list(f"phash {'0' * 16}\n")) == {"broken": UNCHECKED_NO_PHASH}
    assert unchecked(parse_removal_list(f"sha256 {'0' * 64}\n")) == {}  # bytes are hashed without decoding
    entry = {"matched_nothing": True, "list": {"path": "l.txt", "entries": 1}, "per_shard": {},
             "not_content_checked": ["00000/broken: " + UNCHECKED_NO_PHASH, "00001/bad: " + UNCHECKED_NO_PHASH],
             "counts": {"samples_after": 3, "by_kind": {}, "samples_not_content_checked": {UNCHECKED_NO_PHASH: 2}}}
    text = _text(entry, type("P", (), {"path": "p/pool.manifest.json"})(), "o/pool.manifest.json", 1)
    assert "matched nothing" in text and "note: 2 sample(s) could not be checked against the list's content entries" in text, text
    assert "e.g. 00000/broken, 00001/bad" in text, text

def test_catalog_match_names_every_line_a_row_hits_and_folds_rows_removed_before():
    """The catalog scan gives each row the list names with its first entry and every line it hits; rows an
    earlier takedown removed are not matched again, and the lines naming them (by value, or by the entry the
    removal message names, as for a pHash the catalog does not hold) come back as one row per partition, not
    one per removed row (a repeated domain takedown would otherwise bring every removed row to the driver)."""
    from laiontools.contracts.removal import parse_removal_list
    from laiontools.stages.takedown import _catalog_match_fn

    ph = "00000000000000ff"
    rl = parse_removal_list(f"domain a.example\nurl http://a.example/1.jpg\nphash {ph}\ndomain b.example\n")
    rows = [("u1", "success", "http://a.example/1.jpg", None), ("u2", "success", "http://c.example/2.jpg", None)]
    rows += [(f"r{i}", "removed_x", "http://b.example/x.jpg", "removed by takedown list abc line 4 (domain b.example)") for i in range(50)]
    rows += [("r_ph", "removed_x", "http://c.example/3.jpg", f"removed by takedown list abc line 9 (phash {ph})")]
    df = pd.DataFrame({"uid": [r[0] for r in rows], "status": [r[1] for r in rows], "url": [r[2] for r in rows],
                       "shard": "00000", "key": "k", "sha256": None, "error_message": [r[3] for r in rows]})
    out = pd.concat(list(_catalog_match_fn(rl)(iter([df.iloc[:30], df.iloc[30:]]))), ignore_index=True)
    hits = out[out["kind"] != ""]
    assert hits[["uid", "kind", "line", "lines"]].values.tolist() == [["u1", "url", 2, "2,1"]]
    folded = out[out["kind"] == ""]
    assert folded["lines"].tolist() == ["3,4"] and len(out) == 2, out


def test_reason_status_shard_ids_and_safe_paths():
    from laiontools.contracts import layout
    from laiontools.contracts.schema import removed
    from laiontools.stages.takedown import _safe_path

    assert removed("DMCA request #12") == "removed_dmca_request_12" and removed("  csam--hash ") == "removed_csam_hash"
    with pytest.raises(ValueError, match="no letter or digit"):
        removed("#!")
    assert layout.shard_id("shards/retry01/00003.tar") == "retry01-00003"
    assert layout.shard_id("/data/pool/shards/retry01/00003.tar") == "retry01-00003"
    assert layout.shard_id("s3://b/shards/pool/shards/00003.tar") == "00003"
    assert _safe_path("s3://key:secret@bucket/l.txt?X-Amz-Signature=abc") == "s3://bucket/l.txt"


@pytest.mark.parametrize("given", ["arrays", "files"])
def test_subset_diff_proves_what_it_can_and_says_what_it_skipped(given, tmp_path, monkeypatch):
    """The same findings for subsets given as arrays and as uid files (what `subsets --update` passes: read in
    pieces, here of 3 uids, so that no 2B subset is held whole)."""
    from laiontools.contracts import uids as uids_mod
    from laiontools.contracts.lineage import subset_diff
    from laiontools.contracts.selection import selection_scores
    from laiontools.contracts.uids import save_uids, uids_to_array

    monkeypatch.setattr(uids_mod, "UID_SCAN_BYTES", 3 * 16)
    files = iter(range(10**6))

    def few(x):  # the uids taken down: an array either way
        return np.sort(uids_to_array(x))

    def arr(x):
        if given == "arrays":
            return few(x)
        path = str(tmp_path / f"{next(files)}.npy")
        save_uids(path, x)
        return path

    pool = [f"{i * 7919 + 13:032x}" for i in range(200)]
    s = dict(zip(pool, (int(x) for x in selection_scores(pool, 5))))
    ranked = sorted(pool, key=lambda u: (s[u], u))
    old, gone = ranked[:50], ranked[:10:2]  # 5 of the old subset taken down
    rest = [u for u in ranked if u not in gone]
    d = subset_diff(arr(old), arr(rest[:50]), few(gone), 5, target=50, eligible=195, larger_new=arr(rest[:100]))
    assert d["ok"] and d["added"] == ranked[50:55] and d["removed"] == gone and d["counts"]["kept"] == 45
    # a subset that took a later item instead of the next one: caught by the ranking against the larger subset
    wrong = arr(rest[:49] + [rest[60]])
    bad = subset_diff(arr(old), wrong, few(gone), 5, target=50, eligible=195, larger_new=arr(rest[:100]))
    assert not bad["ok"] and [k for k, v in bad["checks"].items() if v is False] == ["new_is_lowest_ranked_of_larger"]
    # one that kept a taken-down uid, or lost one that was not taken down
    assert subset_diff(arr(old), arr(old), few(gone), 5, target=50, eligible=195)["checks"]["no_taken_down_uid_in_new"] is False
    lost = subset_diff(arr(old), arr(old[1:] + [ranked[50]]), few([]), 5, target=50, eligible=200)
    assert lost["checks"]["removed_equals_old_and_taken_down"] is False and not lost["ok"]
    # above the ranking bound the rank checks are reported as skipped, not passed
    big = subset_diff(arr(old), arr(rest[:50]), few(gone), 5, target=50, eligible=195, larger_new=arr(rest[:100]),
                      rank_check_max=10)
    assert big["skipped"] == ["added_rank_after_old_cut", "new_is_lowest_ranked_of_larger"] and big["ok"]
    # the largest subset has no larger one to be ranked in: the run counts its eligible uids ranking after the
    # old cut and up to the new cut, and the added ones must be those (here every pool uid but the taken-down
    # is eligible, so the count is taken from the ranking above, not from the code under test)
    from laiontools.contracts.lineage import cut_record

    def cut(u):
        return cut_record(s[u], u)

    def between(lo, hi):  # eligible uids ranking after lo and up to hi
        return sum(1 for u in rest if (s[lo], lo) < (s[u], u) <= (s[hi], hi))

    new = rest[:50]
    d = subset_diff(arr(old), arr(new), few(gone), 5, target=50, eligible=195, old_cut=cut(old[-1]),
                    between_cuts=(cut(new[-1]), between(old[-1], new[-1])))
    assert d["checks"]["added_are_every_eligible_between_cuts"] is True and d["ok"] and between(old[-1], new[-1]) == 5
    # the largest subset took a later item instead of the next one: ranked after the old cut, the right size,
    # so only the count of eligible uids between the cuts catches it (this check did not exist: it passed)
    late = rest[:49] + [rest[60]]
    bad = subset_diff(arr(old), arr(late), few(gone), 5, target=50, eligible=195, old_cut=cut(old[-1]),
                      between_cuts=(cut(rest[60]), between(old[-1], rest[60])))
    assert [k for k, v in bad["checks"].items() if v is False] == ["added_are_every_eligible_between_cuts"] and not bad["ok"]
    # a count the run could not make is reported as skipped, not passed
    assert subset_diff(arr(old), arr(new), few(gone), 5, target=50, eligible=195, old_cut=cut(old[-1]),
                       between_cuts=(cut(new[-1]), None))["skipped"] == ["added_are_every_eligible_between_cuts"]


def test_a_takedown_pool_without_its_audit_line_is_a_verify_finding_and_not_built_on(lineage, spark, tmp_path, capsys):
    """(lineage walk) takedown writes its audit line last, after the manifest: a run killed in between left a
    pool that verify called OK, and a second takedown on it started the audit history over (one line: the
    earlier takedowns' entries gone). Now verify names the missing entry, and takedown refuses to build on it."""
    import shutil

    from laiontools.stages import takedown as takedown_stage
    from laiontools.stages.takedown import TakedownConfig, TakedownError
    from laiontools.stages.verify import verify_main

    L = lineage
    cut = str(tmp_path / "cut")
    shutil.copytree(L["new"], cut)
    assert verify_main([f"{cut}/pool.manifest.json", "--no-parent"]) == 0  # a copy with its log is whole
    capsys.readouterr()
    os.remove(os.path.join(cut, "takedown.audit.jsonl"))  # as a run killed before its last step leaves it
    assert verify_main([f"{cut}/pool.manifest.json", "--no-parent"]) == 1
    out = capsys.readouterr().out
    assert "takedown.audit.jsonl is missing" in out and "run the same takedown command again" in out
    from laiontools.stages.verify import inspect_text

    assert f"audit log     {cut}/takedown.audit.jsonl  ** MISSING **" in inspect_text(f"{cut}/pool.manifest.json")
    lst = tmp_path / "list.txt"
    lst.write_text("domain never-in-this-pool.example\n")
    with pytest.raises(TakedownError, match=r"was made by a takedown, but .*takedown\.audit\.jsonl is missing"):
        takedown_stage.run(TakedownConfig(pool=f"{cut}/pool.manifest.json", list_file=str(lst), reason=REASON,
                                          output=str(tmp_path / "next")), spark)


@pytest.mark.parametrize("kind", ["sha256", "phash"])
def test_a_content_entry_marks_every_catalog_row_of_the_sample_it_removes(pool, spark, tmp_path, kind):
    """A sha256 or pHash entry names a stored image, so it hits the sample's success row (sha256: through the
    catalog's image hash; pHash: through the content scan only); the uid's other catalog rows (a
    `rejected_duplicate_uid` row: the same URL + caption) are the same item and are marked with it, as a uid
    or url entry marks them. Expected rows come from the tars (hashlib / imagehash) and the old catalog by
    uid, not from the matching code."""
    from laiontools.stages import takedown as takedown_stage
    from laiontools.stages.takedown import TakedownConfig

    m = read_manifest(pool.manifest)
    stored = {}
    for s in m["shards"]:
        for d in _samples(resolve(pool.manifest, s["path"])).values():
            stored[d["uid"]] = d
    cat = pd.read_parquet(f"{pool.dir}/catalog")
    dup_uids = set(cat.loc[cat["status"] == "rejected_duplicate_uid", "uid"])
    assert dup_uids & set(stored), "the session pool should hold a sample that has a rejected_duplicate_uid row"
    u = min(dup_uids & set(stored))
    value = stored[u]["sha256"] if kind == "sha256" else f"{stored[u]['phash']:016x} 0"
    listfile = tmp_path / "list.txt"
    listfile.write_text(f"{kind} {value}\n")
    gone = {w for w, d in stored.items() if (d["sha256"] == stored[u]["sha256"] if kind == "sha256" else d["phash"] == stored[u]["phash"])}

    out = str(tmp_path / "pool1")
    res = takedown_stage.run(TakedownConfig(pool=pool.manifest, list_file=str(listfile), reason="content", output=out), spark)
    new_cat = pd.read_parquet(f"{out}/catalog")
    marked = new_cat[new_cat["status"] == "removed_content"]
    want = cat[cat["uid"].isin(gone)]
    assert len(want) > len(gone) and res.counts["removed"] == len(gone)
    assert sorted(marked["uid"]) == sorted(want["uid"]) and marked["error_message"].str.contains(f"line 1 ({kind} ", regex=False).all()
    assert res.counts["catalog_rows_marked"] == len(want)
    rep = json.loads(_text(f"{out}/takedown.json"))
    assert sorted((r["uid"], r["status"]) for r in rep["catalog_rows_without_sample"]) == \
        sorted((r.uid, r.status) for r in want.itertuples() if r.status != "success")
    assert rep["lines_matching_nothing"] == []
    # every other row is as it was
    rest = new_cat[~new_cat["uid"].isin(gone)].sort_values(["uid", "status"]).reset_index(drop=True)
    old_rest = cat[~cat["uid"].isin(gone)].sort_values(["uid", "status"]).reset_index(drop=True)
    same = [c for c in cat.columns if c not in ("tar_offset", "tar_length")]
    pd.testing.assert_frame_equal(rest[same], old_rest[same])
    from laiontools.stages.verify import verify_main

    assert verify_main([f"{out}/pool.manifest.json", "--removal-list", str(listfile)]) == 0


def test_the_in_process_catalog_is_sorted_again_only_when_a_new_status_breaks_the_order():
    """The in-process engine keeps the parent's row order when it still holds and sorts otherwise: its check
    against Python's own ordering of (uid, status) pairs, on orders that hold and orders that a new status
    breaks (a success row of a uid whose other row an earlier takedown stamped with a later reason)."""
    import random

    import pyarrow as pa

    from laiontools.stages.takedown import _in_uid_status_order

    rng = random.Random(0)
    statuses = ["failed_download", "rejected_duplicate_uid", "removed_aaa", "removed_zzz", "success"]
    cases = [[("u1", "removed_zzz"), ("u1", "removed_bbb")], [("u1", "success"), ("u2", "failed_download")], [("u1", "x")], []]
    for _ in range(200):
        rows = [(f"u{rng.randrange(6)}", rng.choice(statuses)) for _ in range(rng.randrange(2, 8))]
        cases.append(sorted(rows) if rng.random() < 0.5 else rows)
    for rows in cases:
        t = pa.table({"uid": pa.array([u for u, _ in rows], pa.string()), "status": pa.array([s for _, s in rows], pa.string())})
        assert _in_uid_status_order(t) == (rows == sorted(rows)), rows


def test_the_in_process_catalog_reader_merges_null_columns_and_names_disagreeing_files(tmp_path):
    """read_catalog (the in-process engines' whole-catalog read): a column all null in one file takes the
    other file's type; two files whose columns disagree are one InputError naming the catalog."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from laiontools.contracts.pool import PoolInfo, read_catalog
    from laiontools.core.errors import InputError

    cat = tmp_path / "catalog"
    cat.mkdir()
    pq.write_table(pa.table({"uid": ["a" * 32], "error_message": pa.array([None], pa.null())}), cat / "part-00000.parquet")
    pq.write_table(pa.table({"uid": ["b" * 32], "error_message": ["HTTP 404"]}), cat / "part-00001.parquet")
    info = PoolInfo(path=str(tmp_path / "pool.manifest.json"), manifest={}, sha256="0" * 64, catalog=str(cat), shard_ids=[])
    t = read_catalog(info)
    assert t.schema.field("error_message").type == pa.string() and t["error_message"].to_pylist() == [None, "HTTP 404"]
    pq.write_table(pa.table({"uid": ["c" * 32], "error_message": [7]}), cat / "part-00002.parquet")
    with pytest.raises(InputError, match=r"catalog .*catalog disagree on their columns"):
        read_catalog(info)


# ----------------------------------------------------------------------------------------------
# catalogs off the beaten path (found by a review of the in-process engine): small pools in download's
# layout (tests/test_subsets.py), each taken down on both engines


def _scratch_takedown(spark, engine: str, manifest: str, list_text: str, out, tmp_path):
    from laiontools.stages import takedown as takedown_stage
    from laiontools.stages.takedown import TakedownConfig

    lst = tmp_path / f"list-{engine}.txt"
    lst.write_text(list_text)
    return takedown_stage.run(TakedownConfig(pool=manifest, list_file=str(lst), reason="x", output=str(out)),
                              spark if engine == "spark" else None)


@pytest.fixture
def no_master(monkeypatch):
    monkeypatch.delenv("LAIONTOOLS_SPARK_MASTER", raising=False)


@pytest.mark.parametrize("engine", ["spark", "in-process"])
@pytest.mark.parametrize("lacking", [0, 1])
def test_a_catalog_file_without_a_match_column_is_refused_naming_it(spark, no_master, tmp_path, engine, lacking):
    """Two catalog files, one without `url`. Read as nulls there (Spark takes its columns from one file;
    pyarrow's concat fills a missing column), a url entry would silently pass that file's rows by: the listed
    sample kept, the line reported as matching nothing. Both engines refuse, naming the file."""
    import pyarrow.parquet as pq
    from test_subsets import make_scratch_pool

    from laiontools.core.errors import InputError

    m = make_scratch_pool(str(tmp_path / "pool"), n=40, per_shard=16, failures=0)
    f = tmp_path / "pool" / "catalog" / "part-00000.parquet"
    t = pq.read_table(f)
    parts = [t.slice(0, 20), t.slice(20)]
    parts[lacking] = parts[lacking].drop_columns(["url"])
    names = ["part-00000.parquet", "part-00001.parquet"]
    for part, name in zip(parts, names):
        pq.write_table(part, tmp_path / "pool" / "catalog" / name)
    target = t.slice(0 if lacking == 0 else 39, 1).to_pylist()[0]
    with pytest.raises(InputError, match=rf"{names[lacking]} lacks column\(s\) \['url'\]"):
        _scratch_takedown(spark, engine, m, f"url {target['url']}\n", tmp_path / "out", tmp_path)


@pytest.mark.parametrize("engine", ["spark", "in-process"])
def test_a_catalog_whose_message_column_is_all_null_takes_a_takedown(spark, no_master, tmp_path, engine):
    """A pool whose every row succeeded, its catalog rewritten by pandas (read_parquet + to_parquet): the
    all-None error_message column is stored with Arrow's null type (Spark reads it as integers). The
    takedown wrote the shards, then failed on the catalog (pyarrow's "Invalid null value"; Spark's
    CAST_INVALID_INPUT). Now the column takes the catalog's type and the removed row its message."""
    import pyarrow as pa
    import pyarrow.parquet as pq
    from test_subsets import make_scratch_pool, pool_samples

    m = make_scratch_pool(str(tmp_path / "pool"), n=40, per_shard=16, failures=0)
    f = tmp_path / "pool" / "catalog" / "part-00000.parquet"
    pd.read_parquet(f).to_parquet(f)
    assert pq.read_schema(f).field("error_message").type == pa.null()
    uid = min(pool_samples(m))
    res = _scratch_takedown(spark, engine, m, f"uid {uid}\n", tmp_path / "out", tmp_path)
    assert res.counts["removed"] == 1
    cat = pd.read_parquet(tmp_path / "out" / "catalog")
    row = cat[cat["uid"] == uid].iloc[0]
    assert row["status"] == "removed_x" and "line 1 (uid" in row["error_message"]
    assert cat["error_message"].notna().sum() == 1


def test_a_catalog_listing_a_sample_twice_is_refused_by_both_engines_in_the_same_words(spark, no_master, tmp_path):
    """The pool's new uid file is written from the catalog's success rows, one row a uid by construction
    (no hash shuffle to drop repeats). A catalog that lists a sample twice (a row copied by hand, two
    catalog files of one shard) is not a pool's: both engines refuse it naming the uid, in the same words,
    and no pool manifest is written (in process the repeat was dropped unnoticed, on Spark it was named)."""
    import pyarrow as pa
    import pyarrow.parquet as pq
    from test_subsets import make_scratch_pool, pool_samples

    m = make_scratch_pool(str(tmp_path / "pool"), n=40, per_shard=16, failures=0)
    f = tmp_path / "pool" / "catalog" / "part-00000.parquet"
    t = pq.read_table(f)
    uids = sorted(pool_samples(m))
    twice = uids[7]
    pq.write_table(pa.concat_tables([t, t.filter(pa.compute.equal(t["uid"], twice))]), f)
    said = {}
    for engine in ("spark", "in-process"):
        out = tmp_path / f"out-{engine}"
        with pytest.raises(Exception) as e:
            _scratch_takedown(spark, engine, m, f"uid {uids[0]}\n", out, tmp_path)
        said[engine] = str(user_error_from(e.value) or e.value)
        assert not (out / layout.POOL_MANIFEST).exists()
    assert said["spark"] == said["in-process"]
    assert said["spark"].startswith(f"uid {twice} is in more than one row, where each uid was to be in one")


@pytest.mark.parametrize("damage", ["empty", "not parquet", "cut short"])
def test_a_damaged_catalog_file_is_one_error_when_the_manifest_has_no_row_count(no_master, tmp_path, damage, capsys):
    """A pool manifest without catalog.num_rows (optional; pools from before it was written): takedown
    counts the catalog's rows from the parquet footers to choose its engine. A damaged file there was
    pyarrow's traceback; now one line naming the file, exit 2, as with the count in the manifest."""
    from test_subsets import make_scratch_pool

    from laiontools.cli import main

    m = make_scratch_pool(str(tmp_path / "pool"), n=40, per_shard=16, failures=0)
    assert "num_rows" not in read_manifest(m)["catalog"]
    f = tmp_path / "pool" / "catalog" / "part-00000.parquet"
    data = f.read_bytes()
    f.write_bytes({"empty": b"", "not parquet": b"uid,status\n", "cut short": data[: len(data) // 2]}[damage])
    lst = tmp_path / "list.txt"
    lst.write_text(f"uid {'0' * 32}\n")
    rc = main(["takedown", "--pool", m, "--list", str(lst), "--reason", "x", "--output", str(tmp_path / "out")])
    err = capsys.readouterr().err
    assert rc == 2 and "part-00000.parquet is damaged or truncated" in err and "Traceback" not in err


@pytest.mark.parametrize("engine", ["spark", "in-process"])
@pytest.mark.parametrize("entry", ["uid", "sha256"])
def test_catalog_rows_marked_counts_every_row_the_takedown_marks(spark, no_master, tmp_path, engine, entry):
    """A URL + caption three times in the source leaves one success row and two rejected_duplicate_uid rows
    of the same uid. A uid entry (or a content entry, through the sample's other rows) marks all three;
    the counts were of distinct (uid, status) pairs: 2 marked, "1 more catalog row without a stored sample"."""
    import pyarrow as pa
    import pyarrow.parquet as pq
    from test_subsets import make_scratch_pool

    from laiontools.contracts import schema as C

    m = make_scratch_pool(str(tmp_path / "pool"), n=40, per_shard=16, failures=0)
    f = tmp_path / "pool" / "catalog" / "part-00000.parquet"
    t = pq.read_table(f)
    rows = t.to_pylist()
    s = next(r for r in rows if r["status"] == C.STATUS_SUCCESS)
    dup = {**s, "status": "rejected_duplicate_uid", "shard": None, "key": None, "width": None, "height": None,
           "error_message": "duplicate of an earlier row (same URL and caption)"}
    rows = sorted(rows + [dup, dict(dup)], key=lambda r: (r["uid"], r["status"]))
    pq.write_table(pa.Table.from_pylist(rows, schema=t.schema), f)
    if entry == "uid":
        line = f"uid {s['uid']}\n"
    else:  # the stored image's sha256, as the shard holds it
        from laiontools.contracts import layout

        path = next(e["path"] for e in read_manifest(m)["shards"] if layout.shard_id(e["path"]) == s["shard"])
        line = f"sha256 {_samples(os.path.join(tmp_path / 'pool', path))[s['key']]['sha256']}\n"
    res = _scratch_takedown(spark, engine, m, line, tmp_path / "out", tmp_path)
    cat = pd.read_parquet(tmp_path / "out" / "catalog")
    marked = int((cat["status"] == "removed_x").sum())
    assert marked == 3 and res.counts["removed"] == 1
    assert res.counts["catalog_rows_marked"] == marked, res.summary
    assert res.details["counts"]["catalog_rows_without_sample"] == marked - 1
    assert "marked 2 more catalog row(s)" in res.summary


def _two_takedowns(tmp_path) -> list[str]:
    """A scratch pool and two takedowns in a row (one uid each): the three pool manifests, oldest first."""
    from test_subsets import make_scratch_pool, pool_samples

    from laiontools.stages import takedown as takedown_stage
    from laiontools.stages.takedown import TakedownConfig

    m = make_scratch_pool(str(tmp_path / "pool"), n=20, per_shard=10, failures=0)
    u = sorted(pool_samples(m))
    pools = [m]
    for i in range(2):
        lst = tmp_path / f"list{i}.txt"
        lst.write_text(f"uid {u[i]}\n")
        pools.append(takedown_stage.run(TakedownConfig(pool=pools[-1], list_file=str(lst), reason="x",
                                                       output=str(tmp_path / f"t{i}"))).outputs["manifest"])
    return pools


def test_verify_names_a_changed_pool_above_the_parent_as_subsets_does(no_master, tmp_path, capsys):
    """Two takedowns (pool -> t1 -> t2), then the first pool's manifest edited. verify t2 checked t2's
    parent (t1, unchanged) alone and passed, exit 0, while `subsets` on t2 (pool_chain, through
    lineage_root) refuses the lineage: "the parent changed after the takedown". verify names it too."""
    from laiontools.cli import main
    from laiontools.contracts.lineage import lineage_root
    from laiontools.contracts.manifest import manifest_sha256, write_manifest
    from laiontools.contracts.schema import ManifestError
    from laiontools.stages.verify import verify_manifest

    pools = _two_takedowns(tmp_path)
    m, t2 = pools[0], pools[-1]
    assert verify_manifest(t2).ok
    before = manifest_sha256(m)
    doc = read_manifest(m)
    doc["name"] += "-edited"
    write_manifest(m, doc)
    assert manifest_sha256(m) != before
    with pytest.raises(ManifestError, match="the parent changed after the takedown"):
        lineage_root(t2)
    res = verify_manifest(t2)
    assert [p for p in res.problems if p.startswith("lineage: ")] == [p for p in res.problems], res.problems
    assert len(res.problems) == 1 and m in res.problems[0] and before in res.problems[0]
    assert main(["verify", t2]) == 1 and "DIFFERS: lineage:" in capsys.readouterr().out
    assert verify_manifest(t2, check_parent=False).ok  # --no-parent: no lineage either


def test_the_spark_engine_reads_the_catalog_footers_once(spark, no_master, tmp_path, monkeypatch):
    """A pool manifest without catalog.num_rows, taken down on Spark that the stage chose by size: the
    parquet footers (one round trip per file on an object store, ~1,200 files at 2B rows) were read once to
    choose the engine and again for Spark's columns. Once now, and the rows counted from them."""
    from test_subsets import make_scratch_pool, pool_samples

    from laiontools.stages import takedown as takedown_stage
    from laiontools.stages.takedown import TakedownConfig

    m = make_scratch_pool(str(tmp_path / "pool"), n=20, per_shard=10, failures=3)
    assert "num_rows" not in read_manifest(m)["catalog"]
    from laiontools.contracts import pool as pool_contract

    reads = []  # every read of the footers, by whichever name: the real function, counted
    real = pool_contract.catalog_footers
    for module in (pool_contract, takedown_stage):
        monkeypatch.setattr(module, "catalog_footers", lambda pool: reads.append(pool.path) or real(pool))
    lst = tmp_path / "list.txt"
    lst.write_text(f"uid {min(pool_samples(m))}\n")
    res = takedown_stage.run(TakedownConfig(pool=m, list_file=str(lst), reason="x", output=str(tmp_path / "out"), spark_above=1))
    assert res.details["counts"]["samples_removed"] == 1 and res.counts["removed"] == 1
    assert len(reads) == 1, reads
    from laiontools.contracts.manifest import SIDECAR_SUFFIX

    with open(res.outputs["manifest"] + SIDECAR_SUFFIX) as f:
        assert json.load(f)["engine"].startswith("spark ")
    n_rows = len(pd.read_parquet(tmp_path / "pool" / "catalog"))
    assert n_rows == 23 and read_manifest(res.outputs["manifest"])["catalog"]["num_rows"] == n_rows


@pytest.mark.parametrize("engine", ["spark", "in-process"])
def test_a_catalog_file_storing_columns_as_null_type_beside_files_with_values_takes_a_takedown(spark, no_master, tmp_path, engine):
    """The failed rows of a pool in a catalog file of their own, written by pandas: their all-None shard,
    key, sha256 stored with Arrow's null type (Spark reads them as int), beside a file with values there.
    Spark took the first file's types and failed on the other (FAILED_READ_FILE.PARQUET_COLUMN_DATA_TYPE_MISMATCH,
    a Py4JJavaError traceback). Now both engines write the catalog the in-process engine reads, typed as the schema."""
    import pyarrow as pa
    import pyarrow.compute as pc
    import pyarrow.parquet as pq
    from test_subsets import make_scratch_pool, pool_samples

    from laiontools.contracts import schema as C

    m = make_scratch_pool(str(tmp_path / "pool"), n=40, per_shard=16, failures=3)
    uid = min(pool_samples(m))
    cat = tmp_path / "pool" / "catalog"
    t = pq.read_table(cat / "part-00000.parquet")
    t.filter(pc.not_equal(t[C.STATUS], C.STATUS_SUCCESS)).to_pandas().to_parquet(cat / "part-00000.parquet")
    pq.write_table(t.filter(pc.equal(t[C.STATUS], C.STATUS_SUCCESS)), cat / "part-00001.parquet")
    assert pq.read_schema(cat / "part-00000.parquet").field(C.SHARD).type == pa.null()
    res = _scratch_takedown(spark, engine, m, f"uid {uid}\n", tmp_path / "out", tmp_path)
    assert res.counts["removed"] == 1
    new = pq.read_table(tmp_path / "out" / "catalog")
    assert new.schema.field(C.SHARD).type == pa.string() and new.num_rows == t.num_rows
    got = new.select([C.UID, C.STATUS, C.SHARD, C.KEY]).sort_by([(C.UID, "ascending"), (C.STATUS, "ascending")]).to_pylist()
    want = t.select([C.UID, C.STATUS, C.SHARD, C.KEY]).sort_by([(C.UID, "ascending"), (C.STATUS, "ascending")]).to_pylist()
    assert got == [{**r, C.STATUS: "removed_x"} if r[C.UID] == uid else r for r in want]


def test_the_lineage_reads_each_pool_manifest_once(no_master, tmp_path, monkeypatch):
    """pool_chain (subsets' exclusion checks and engine choice, subsets --update, verify) read each pool
    manifest of a takedown lineage twice: once to parse it, once to hash it (and the pool's own manifest
    again when the caller had read it). Each is now read once, parsed and hashed from the same bytes, and
    not at all when the caller gives it (opens counted on the real local file system); the same chain."""
    from fsspec.implementations import local

    from laiontools.contracts.lineage import pool_chain
    from laiontools.contracts.manifest import manifest_sha256, read_manifest_sha256

    pools = _two_takedowns(tmp_path)
    t2 = pools[-1]
    opened: list[str] = []
    real_open = local.LocalFileSystem._open

    def counting_open(self, path, *a, **k):
        if str(path).endswith(".manifest.json"):
            opened.append(os.path.relpath(str(path), tmp_path))
        return real_open(self, path, *a, **k)

    monkeypatch.setattr(local.LocalFileSystem, "_open", counting_open)
    chain = pool_chain(t2)
    assert sorted(opened) == sorted(os.path.relpath(p, tmp_path) for p in pools), opened
    doc, sha = read_manifest_sha256(t2)
    opened.clear()
    assert pool_chain(t2, doc, sha) == chain
    assert sorted(opened) == sorted(os.path.relpath(p, tmp_path) for p in pools[:-1]), opened
    monkeypatch.setattr(local.LocalFileSystem, "_open", real_open)
    assert [(p, s) for p, _, s in chain] == [(p, manifest_sha256(p)) for p in reversed(pools)]


def test_on_spark_a_rewritten_shards_parquet_takes_the_sessions_codec(spark, tmp_path):
    """A shard's parquet beside its tar, rewritten by the Spark task that rewrites the shard, is compressed with
    the session's spark.sql.parquet.compression.codec, as the new catalog Spark writes is (it was zstd
    whatever the session said)."""
    import pyarrow.parquet as pq
    from test_subsets import make_scratch_pool

    from laiontools.contracts import schema as C
    from laiontools.stages import takedown as takedown_stage
    from laiontools.stages.takedown import TakedownConfig

    def codecs(files: list) -> set[str]:
        assert files
        return {pq.ParquetFile(f).metadata.row_group(0).column(c).compression
                for f in files for c in range(pq.ParquetFile(f).metadata.num_columns)}

    m = make_scratch_pool(str(tmp_path / "pool"), n=20, per_shard=10, failures=0)
    cat = pd.read_parquet(tmp_path / "pool" / "catalog")
    shard0 = cat[cat[C.SHARD] == "00000"]
    shard0[[C.KEY, C.STATUS, C.URL]].to_parquet(tmp_path / "pool" / "shards" / "00000.parquet", index=False)  # img2dataset's
    lst = tmp_path / "list.txt"
    lst.write_text(f"uid {min(shard0[C.UID])}\n")
    key = "spark.sql.parquet.compression.codec"
    before = spark.conf.get(key)
    spark.conf.set(key, "gzip")
    try:
        res = takedown_stage.run(TakedownConfig(pool=m, list_file=str(lst), reason="x", output=str(tmp_path / "out")), spark)
    finally:
        spark.conf.set(key, before)
    assert res.counts["removed"] == 1 and res.counts["shards_rewritten"] == 1
    side = pd.read_parquet(tmp_path / "out" / "shards" / "00000.parquet")
    assert len(side) == 10 and (side[C.STATUS] == "removed_x").sum() == 1
    assert codecs([tmp_path / "out" / "shards" / "00000.parquet"]) == {"GZIP"}
    assert codecs(sorted((tmp_path / "out" / "catalog").glob("*.parquet"))) == {"GZIP"}
