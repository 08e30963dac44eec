"""Nested subsets: filters, funnel, nesting, determinism, short subsets and bad inputs.

Filters need rows with known punsafe/size/caption values, so most tests use a small hand-built pool
(real webdataset tars + catalog + manifest, :func:`make_scratch_pool`); one test runs on the real
downloaded pool from conftest's ``pool`` fixture when it exists.
"""

from __future__ import annotations

import functools
import io
import json
import os
import tarfile
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from laiontools.contracts import layout
from laiontools.contracts import schema as C
from laiontools.contracts.manifest import new_manifest, read_manifest, write_manifest
from laiontools.contracts.schema import ManifestError
from laiontools.contracts.selection import parse_seed, reference_selection
from laiontools.contracts.uids import array_to_uids, load_uids, save_uids, uid_of
from laiontools.core.config import ConfigError
from laiontools.core.storage import sha256_file, write_json
from laiontools.stages import subsets as subsets_stage
from laiontools.stages.subsets import SubsetError, SubsetsConfig, parse_scales
from laiontools.stages.subsets import main as subsets_main


def _jpeg(i: int, w: int, h: int) -> bytes:
    from PIL import Image

    img = Image.new("RGB", (w, h), ((i * 37) % 256, (i * 91) % 256, (i * 53) % 256))
    buf = io.BytesIO()
    img.save(buf, format="JPEG", quality=80)
    return buf.getvalue()


def make_scratch_pool(root: str, n: int = 60, per_shard: int = 16, failures: int = 6, tag: str = "a", incomplete_shard: bool = False) -> str:
    """Write a pool in download's layout: shards/<id>.tar, catalog/part-0.parquet, pool.uids.npy, manifest.

    Sample i has punsafe = (i % 10) / 10, pwatermark = (i % 5) / 5, original size (64 + i, 64 + 2*(i % 4) * 16),
    caption of length 5 + i % 20. `failures` extra rows have status failed_download. With
    `incomplete_shard`, one more shard exists in the catalog but not in the manifest (a killed download).
    Returns the manifest path.
    """
    os.makedirs(os.path.join(root, layout.SHARDS_DIR), exist_ok=True)
    rows: list[dict] = []
    shards: list[dict] = []
    uids: list[str] = []
    nshards = (n + per_shard - 1) // per_shard
    for s in range(nshards + (1 if incomplete_shard else 0)):
        sid = f"{s:05d}"
        path = os.path.join(root, layout.SHARDS_DIR, sid + ".tar")
        idxs = range(s * per_shard, min(n, (s + 1) * per_shard)) if s < nshards else range(n, n + 3)
        with tarfile.open(path, "w", format=tarfile.USTAR_FORMAT) as tf:
            for j, i in enumerate(idxs):
                key = f"{s:05d}{j:04d}"
                caption = f"{tag} caption {i} " + "x" * (i % 20)
                url = f"http://127.0.0.1/{tag}/{i}.jpg"
                uid = uid_of(url, caption)
                w, h = 64 + i, 64 + (i % 4) * 32
                meta = {"uid": uid, "key": key, "caption": caption, "url": url, "punsafe": (i % 10) / 10, "pwatermark": (i % 5) / 5}
                for ext, data in (("jpg", _jpeg(i, 16, 16)), ("txt", caption.encode()), ("json", json.dumps(meta).encode())):
                    ti = tarfile.TarInfo(f"{key}.{ext}")
                    ti.size, ti.mtime = len(data), 1_700_000_000
                    tf.addfile(ti, io.BytesIO(data))
                rows.append(
                    {
                        C.UID: uid, C.SOURCE_ID: str(i), C.URL: url, C.CAPTION: caption, C.STATUS: C.STATUS_SUCCESS,
                        C.ERROR: None, C.SHARD: sid, C.KEY: key, C.WIDTH: 16, C.HEIGHT: 16,
                        C.ORIGINAL_WIDTH: w, C.ORIGINAL_HEIGHT: h, C.SHA256: None, C.SIMILARITY: 0.3,
                        C.PUNSAFE: (i % 10) / 10, C.PWATERMARK: (i % 5) / 5, C.LICENSE: None, C.NSFW: None,
                    }
                )
                if s < nshards:
                    uids.append(uid)
        if s < nshards:
            sha, size = sha256_file(path)
            shards.append({"path": f"{layout.SHARDS_DIR}/{sid}.tar", "num_samples": len(idxs), "bytes": size, "sha256": sha})
    for k in range(failures):
        url, cap = f"http://127.0.0.1/{tag}/missing{k}.jpg", f"{tag} failed {k}"
        rows.append({**{c: None for c in C.catalog_columns()}, C.UID: uid_of(url, cap), C.URL: url, C.CAPTION: cap, C.STATUS: C.STATUS_FAILED_DOWNLOAD, C.ERROR: "404"})
    os.makedirs(os.path.join(root, layout.CATALOG_DIR), exist_ok=True)
    pq.write_table(pa.Table.from_pylist(rows, schema=C.catalog_arrow_schema()), os.path.join(root, layout.CATALOG_DIR, "part-00000.parquet"))
    usha, ucount = save_uids(os.path.join(root, layout.POOL_UIDS), uids)
    import hashlib

    m = new_manifest(
        name=f"pool-{tag}", kind="pool", num_samples=len(uids), target_samples=None,
        uids={"path": layout.POOL_UIDS, "sha256": usha, "count": ucount}, shards=shards,
        source_fingerprint=hashlib.sha256(tag.encode()).hexdigest(), catalog={"path": layout.CATALOG_DIR}, command=["test"],
    )
    mpath = os.path.join(root, layout.POOL_MANIFEST)
    write_manifest(mpath, m)
    return mpath


def pool_samples(manifest_path: str) -> dict[str, dict]:
    """uid -> catalog row of every success row of a pool."""
    m = read_manifest(manifest_path)
    t = pq.read_table(os.path.join(os.path.dirname(manifest_path), m["catalog"]["path"])).to_pylist()
    return {r[C.UID]: r for r in t if r[C.STATUS] == C.STATUS_SUCCESS}


@pytest.fixture(scope="module")
def scratch(tmp_path_factory):
    root = tmp_path_factory.mktemp("pool_a")
    return make_scratch_pool(str(root), incomplete_shard=True)


def _cfg(pool: str, out, **kw) -> SubsetsConfig:
    return SubsetsConfig(pool=pool, output=str(out), seed=kw.pop("seed", 7), scales=kw.pop("scales", "10,20,40"), **kw)


def _uids(path: str) -> set[str]:
    return set(array_to_uids(load_uids(path)))


def test_nested_deterministic_and_matches_reference(spark, scratch, tmp_path):
    res1 = subsets_stage.run(_cfg(scratch, tmp_path / "r1"), spark).details
    res2 = subsets_stage.run(_cfg(scratch, tmp_path / "r2"), spark).details
    assert [r["scale"] for r in res1] == ["40", "20", "10"]
    for a, b in zip(res1, res2):
        with open(a["manifest"], "rb") as fa, open(b["manifest"], "rb") as fb:
            assert fa.read() == fb.read(), f"manifests differ between runs: {a['manifest']} {b['manifest']}"
        for suffix in ("uids.npy",):
            pa_, pb_ = a["manifest"].replace("manifest.json", suffix), b["manifest"].replace("manifest.json", suffix)
            assert Path(pa_).read_bytes() == Path(pb_).read_bytes()
    s40, s20, s10 = (_uids(str(tmp_path / "r1" / f"{k}.uids.npy")) for k in ("40", "20", "10"))
    assert (len(s10), len(s20), len(s40)) == (10, 20, 40)
    assert s10 < s20 < s40
    # Eligible = the 60 samples in complete shards; the 3 in the shard missing from the manifest are not.
    samples = pool_samples(scratch)
    pool_uids = _uids(os.path.join(os.path.dirname(scratch), layout.POOL_UIDS))
    assert s40 <= pool_uids
    eligible = sorted(u for u, r in samples.items() if r[C.SHARD] != "00004")
    assert len(eligible) == 60
    assert s20 == set(reference_selection(eligible, 7, 20))
    # The stored uid file is exactly what save_uids writes for that set.
    ref = tmp_path / "ref.npy"
    save_uids(str(ref), sorted(s20))
    assert Path(ref).read_bytes() == (tmp_path / "r1" / "20.uids.npy").read_bytes()
    # Manifest chain: 10 -> 20 -> 40 -> pool, sha256 of each parent file.
    m10, m20, m40 = (read_manifest(str(tmp_path / "r1" / f"{k}.manifest.json")) for k in ("10", "20", "40"))
    assert m10["parent"]["sha256"] == sha256_file(str(tmp_path / "r1" / "20.manifest.json"))[0]
    assert m20["parent"]["name"] == m40["name"]
    assert m40["parent"]["sha256"] == sha256_file(scratch)[0]
    assert m40["kind"] == "subset" and m40["num_samples"] == 40 and m40["target_samples"] == 40 and not m40["short"]
    funnel = {f["step"]: f for f in m40["selection"]["funnel"]}
    assert funnel["catalog rows"]["remaining"] == 69
    assert funnel["not a downloaded sample (status != success)"]["removed"] == 6
    assert funnel["shard not complete in the pool manifest"]["removed"] == 3
    assert funnel["eligible"]["remaining"] == 60
    # A different seed picks a different subset.
    res3 = subsets_stage.run(_cfg(scratch, tmp_path / "r3", seed=8, scales="20"), spark).details
    assert _uids(res3[0]["manifest"].replace("manifest.json", "uids.npy")) != s20


def test_each_filter_and_funnel(spark, scratch, tmp_path):
    samples = {u: r for u, r in pool_samples(scratch).items() if r[C.SHARD] != "00004"}
    cfg = _cfg(
        scratch, tmp_path, scales="3", max_punsafe=0.5, max_pwatermark=0.8, min_image_side=96,
        max_aspect_ratio=1.5, min_caption_length=16, max_caption_length=30,
    )
    res = subsets_stage.run(cfg, spark).details
    m = read_manifest(res[0]["manifest"])
    expect = []
    for u, r in samples.items():
        w, h = r[C.ORIGINAL_WIDTH], r[C.ORIGINAL_HEIGHT]
        if r[C.PUNSAFE] < 0.5 and r[C.PWATERMARK] < 0.8 and min(w, h) >= 96 and max(w, h) / min(w, h) <= 1.5 and 16 <= len(r[C.CAPTION]) <= 30:
            expect.append(u)
    assert m["selection"]["eligible"] == len(expect) > 3
    assert _uids(res[0]["manifest"].replace("manifest.json", "uids.npy")) == set(reference_selection(sorted(expect), 7, 3))
    steps = [f["step"] for f in m["selection"]["funnel"]]
    assert steps[3].startswith("punsafe") and steps[4].startswith("pwatermark")
    removed = {f["step"].split(" ")[0]: f["removed"] for f in m["selection"]["funnel"]}
    assert removed["punsafe"] == sum(1 for r in samples.values() if r[C.PUNSAFE] >= 0.5)
    assert m["selection"]["filters"]["max_punsafe"] == 0.5
    assert sum(f["removed"] for f in m["selection"]["funnel"]) == 69 - len(expect)


def test_an_image_with_one_side_unknown_does_not_pass_the_size_filters(spark, scratch, tmp_path):
    """A sample whose height is unknown (original and stored) is removed by --min-image-side and
    --max-aspect-ratio as the funnel says ('or unknown'), however large its width, on either engine:
    Spark's least() and greatest() skip a NULL and would take it for a square of its width."""
    import shutil

    pool_dir = tmp_path / "pool"
    shutil.copytree(os.path.dirname(scratch), pool_dir)
    cat_file = pool_dir / layout.CATALOG_DIR / "part-00000.parquet"
    rows = pq.read_table(cat_file).to_pylist()
    complete = [r for r in rows if r[C.STATUS] == C.STATUS_SUCCESS and r[C.SHARD] != "00004"]
    unknown = {complete[3][C.UID], complete[11][C.UID]}
    for r in rows:
        if r[C.UID] in unknown:
            r[C.ORIGINAL_HEIGHT] = r[C.HEIGHT] = None
            r[C.ORIGINAL_WIDTH] = 4000  # would pass any shorter-side bound if the unknown side were skipped
    pq.write_table(pa.Table.from_pylist(rows, schema=C.catalog_arrow_schema()), cat_file)
    pool = str(pool_dir / layout.POOL_MANIFEST)
    # Every known sample passes both bounds (shorter side >= 64 px, aspect ratio <= 100), so only the
    # unknown ones go, at the size step.
    cases = [(engine, label, kw) for engine in ("spark", "in-process")
             for label, kw in (("shorter image side", {"min_image_side": 64}), ("aspect ratio", {"max_aspect_ratio": 100.0}))]
    for engine, label, kw in cases:
        res = subsets_stage.run(_cfg(pool, tmp_path / engine / label.replace(" ", "-"), scales="3", **kw),
                                spark if engine == "spark" else None).details
        m = read_manifest(res[0]["manifest"])
        assert m["selection"]["eligible"] == len(complete) - 2, (engine, label)
        removed = {f["step"]: f["removed"] for f in m["selection"]["funnel"]}
        assert [n for step, n in removed.items() if step.startswith(label)] == [2], (engine, label)


def _write_scores(emb: str, uid_scores: dict[str, float], model_json: dict | None) -> None:
    os.makedirs(os.path.join(emb, layout.EMB_SCORES_DIR), exist_ok=True)
    items = sorted(uid_scores.items())
    half = len(items) // 2
    for k, part in enumerate((items[:half], items[half:])):
        pq.write_table(pa.table({"uid": [u for u, _ in part], "clip_score": [s for _, s in part]}), os.path.join(emb, layout.EMB_SCORES_DIR, f"0000{k}.parquet"))
    if model_json is not None:
        write_json(os.path.join(emb, layout.EMB_MODEL_JSON), model_json)


def test_clip_score_filter_and_scores_from_another_pool(spark, scratch, tmp_path):
    samples = pool_samples(scratch)
    m = read_manifest(scratch)
    scores = {u: (int(u[:4], 16) % 100) / 100 for u in samples}
    emb = str(tmp_path / "emb")
    _write_scores(emb, scores, {"model": "lt-tiny", "source_fingerprint": m["source"]["fingerprint"]})
    res = subsets_stage.run(_cfg(scratch, tmp_path / "o", scales="3", scores=emb, min_clip_score=0.3), spark).details
    man = read_manifest(res[0]["manifest"])
    expect = [u for u, r in samples.items() if r[C.SHARD] != "00004" and scores[u] >= 0.3]
    assert man["selection"]["eligible"] == len(expect)
    assert man["selection"]["filters"]["clip_score_source"]["path"] == emb
    # model.json says another pool -> refused, naming the folder.
    bad = str(tmp_path / "emb_other_fp")
    _write_scores(bad, scores, {"model": "lt-tiny", "source_fingerprint": "0" * 64})
    with pytest.raises(SubsetError, match="emb_other_fp.*source fingerprint"):
        subsets_stage.run(_cfg(scratch, tmp_path / "o2", scales="3", scores=bad, min_clip_score=0.3), spark)
    # No model.json, uids of another pool -> refused by the uid check.
    other = make_scratch_pool(str(tmp_path / "pool_b"), n=20, failures=0, tag="b")
    alien = str(tmp_path / "emb_alien")
    _write_scores(alien, {u: 0.5 for u in pool_samples(other)}, None)
    with pytest.raises(SubsetError, match=r"20 of 20 scored uids are not samples of pool"):
        subsets_stage.run(_cfg(scratch, tmp_path / "o3", scales="3", scores=alien, min_clip_score=0.3), spark)


def _write_dedup(d: str, uids: list[str], fingerprint: str) -> None:
    os.makedirs(d, exist_ok=True)
    save_uids(os.path.join(d, "exclude.uids.npy"), uids)
    write_json(os.path.join(d, "dedup.json"), {"pool_source_fingerprint": fingerprint, "threshold": 0.9})


def test_dedup_exclusion_and_dedup_from_another_pool(spark, scratch, tmp_path):
    samples = sorted(u for u, r in pool_samples(scratch).items() if r[C.SHARD] != "00004")
    fp = read_manifest(scratch)["source"]["fingerprint"]
    excluded = samples[::4]
    d = str(tmp_path / "dedup")
    _write_dedup(d, excluded, fp)
    res = subsets_stage.run(_cfg(scratch, tmp_path / "o", scales=str(60 - len(excluded))), spark).details
    chosen = _uids(res[0]["manifest"].replace("manifest.json", "uids.npy"))
    assert not chosen.isdisjoint(excluded)  # without --exclude, all eligible are taken
    res = subsets_stage.run(_cfg(scratch, tmp_path / "o2", scales=str(60 - len(excluded)), exclude=[d]), spark).details
    chosen = _uids(res[0]["manifest"].replace("manifest.json", "uids.npy"))
    assert chosen == set(samples) - set(excluded)
    man = read_manifest(res[0]["manifest"])
    assert man["selection"]["exclusions"][0]["count"] == len(excluded)
    assert any(f["step"].startswith("excluded by dedup") and f["removed"] == len(excluded) for f in man["selection"]["funnel"])
    # A bare uid file not written by save_uids: the same uids shuffled, one of them twice (two lists
    # concatenated). Binary search on it missed most of them; it is taken as the set it holds.
    import random

    import numpy as np

    from laiontools.contracts.uids import uids_to_array

    shuffled = excluded[:]
    random.Random(3).shuffle(shuffled)
    loose = str(tmp_path / "loose.uids.npy")
    np.save(loose, uids_to_array(shuffled + shuffled[:1]))
    res = subsets_stage.run(_cfg(scratch, tmp_path / "o5", scales=str(60 - len(excluded)), exclude=[loose]), spark).details
    assert _uids(res[0]["manifest"].replace("manifest.json", "uids.npy")) == set(samples) - set(excluded)
    assert read_manifest(res[0]["manifest"])["selection"]["exclusions"][0]["count"] == len(excluded)
    # Fingerprint of another pool.
    d2 = str(tmp_path / "dedup_other")
    _write_dedup(d2, excluded, "f" * 64)
    with pytest.raises(SubsetError, match="dedup_other.*another pool|dedup_other.*source fingerprint"):
        subsets_stage.run(_cfg(scratch, tmp_path / "o3", scales="5", exclude=[d2]), spark)
    # Right fingerprint claim but uids of another pool.
    other = make_scratch_pool(str(tmp_path / "pool_c"), n=10, failures=0, tag="c")
    d3 = str(tmp_path / "dedup_alien")
    _write_dedup(d3, list(pool_samples(other)), fp)
    with pytest.raises(SubsetError, match="10 of 10 excluded uids are not samples"):
        subsets_stage.run(_cfg(scratch, tmp_path / "o4", scales="5", exclude=[d3]), spark)


def test_an_exclusion_list_too_large_for_a_membership_udf_is_joined(spark, scratch, tmp_path, monkeypatch):
    """Above MEMBER_UDF_MAX_UIDS an exclusion list is matched to the catalog by a join with the file read
    by Spark tasks (no worker loads it whole): the same subsets, funnel and manifest counts as the UDF
    path, for a list written by dedup and for a bare file listing a uid twice (one catalog row each)."""
    import numpy as np

    from laiontools.contracts import uids as uids_mod
    from laiontools.contracts.uids import uids_to_array

    samples = sorted(u for u, r in pool_samples(scratch).items() if r[C.SHARD] != "00004")
    excluded = samples[::4]
    d = str(tmp_path / "dedup")
    _write_dedup(d, excluded, read_manifest(scratch)["source"]["fingerprint"])
    loose = str(tmp_path / "loose.uids.npy")
    np.save(loose, uids_to_array(excluded[::-1] + excluded[:1]))
    runs = {}
    for how in ("udf", "join", "in_process"):
        if how == "join":
            monkeypatch.setattr(uids_mod, "MEMBER_UDF_MAX_UIDS", 0)
            monkeypatch.setattr(uids_mod, "UID_ROWS_PER_TASK", 4)
        for name, ex in (("dedup", d), ("loose", loose)):
            # in_process: `--spark-above -1` keeps a list over the limit in this process (no session to join on)
            res = subsets_stage.run(_cfg(scratch, tmp_path / f"{how}-{name}", scales=f"{60 - len(excluded)},10", exclude=[ex],
                                         **({"spark_above": -1} if how == "in_process" else {})),
                                    None if how == "in_process" else spark).details
            runs[how, name] = [(Path(r["manifest"].replace("manifest.json", "uids.npy")).read_bytes(),
                                read_manifest(r["manifest"])["selection"]["funnel"],
                                read_manifest(r["manifest"])["selection"]["exclusions"]) for r in res]
    for name in ("dedup", "loose"):
        assert runs["join", name] == runs["udf", name] == runs["in_process", name], name
        assert _uids_of_bytes(runs["join", name][0][0]) == set(samples) - set(excluded)
        assert runs["join", name][0][2][0]["count"] == len(excluded)  # the loose file's repeat counted once
    # A dedup output of another pool's uids: found by a join of the two uid files (neither loaded here).
    other = make_scratch_pool(str(tmp_path / "pool_c"), n=10, failures=0, tag="c")
    alien = str(tmp_path / "dedup_alien")
    _write_dedup(alien, list(pool_samples(other))[:6] + excluded[:2], read_manifest(scratch)["source"]["fingerprint"])
    with pytest.raises(SubsetError, match="6 of 8 excluded uids are not samples"):
        subsets_stage.run(_cfg(scratch, tmp_path / "alien", scales="5", exclude=[alien]), spark)
    with pytest.raises(SubsetError, match="6 of 8 excluded uids are not samples"):
        subsets_stage.run(_cfg(scratch, tmp_path / "alien_in_process", scales="5", exclude=[alien], spark_above=-1))


def _uids_of_bytes(raw: bytes) -> set[str]:
    import io

    import numpy as np

    return set(array_to_uids(np.load(io.BytesIO(raw))))


def test_short_subset_error_and_allow_short(spark, scratch, tmp_path):
    with pytest.raises(SubsetError, match=r"1000: requested 1,000, available 60"):
        subsets_stage.run(_cfg(scratch, tmp_path / "a", scales="10,1000"), spark)
    # the error says which filter took the samples (on a pool without a punsafe column, --max-punsafe takes them
    # all; the reason was shown only with --allow-short, in the funnel)
    with pytest.raises(SubsetError, match=r"requested 1,000, available 30 \(of 69 catalog rows, removed: .*status != success\) 6; .*; punsafe >= 0\.5 or missing 30\)"):
        subsets_stage.run(_cfg(scratch, tmp_path / "p", scales="1000", max_punsafe=0.5), spark)
    assert not (tmp_path / "a" / "10.manifest.json").exists()
    res = subsets_stage.run(_cfg(scratch, tmp_path / "b", scales="80M,400M", scale_factor=1e-6, allow_short=True), spark).details
    by = {r["scale"]: r for r in res}
    assert by["400M"]["target"] == 400 and by["400M"]["obtained"] == 60 and by["400M"]["short"]
    m = read_manifest(by["80M"]["manifest"])
    assert m["short"] is True and m["target_samples"] == 80 and m["num_samples"] == 60
    assert m["selection"]["scale_factor"] == 1e-6


def test_parse_scales_and_seed():
    assert parse_scales("80M,400M,2B", 1e-6) == [("2B", 2000), ("400M", 400), ("80M", 80)]
    assert parse_scales("1e3,10,1.5K") == [("1.5K", 1500), ("1e3", 1000), ("10", 10)]
    for bad, msg in (("80X", "not a count"), ("10,,20", "empty item"), ("10,10", "repeated"), ("0", "whole number"), ("-5", "not a count")):
        with pytest.raises(ConfigError, match=msg):
            parse_scales(bad)
    with pytest.raises(ConfigError, match="whole number"):
        parse_scales("80M", 1e-9)
    for bad, factor in (("1e400", 1.0), ("2B", 1e300)):  # inf samples: an OverflowError traceback before
        with pytest.raises(ConfigError, match="not a finite number of samples"):
            parse_scales(bad, factor)
    assert parse_seed("42") == 42
    for bad in ("abc", "1.5", "-1", "", str(2**64)):
        with pytest.raises(ConfigError):
            parse_seed(bad)


def test_cli_bad_inputs(spark, scratch, tmp_path, capsys):
    from laiontools.cli import main as cli

    assert cli(["subsets", "--pool", scratch, "--scales", "10", "--seed", "x1", "--output", str(tmp_path)]) == 2
    assert "seed 'x1' is not a whole number" in capsys.readouterr().err
    assert cli(["subsets", "--pool", scratch, "--scales", "10;20", "--seed", "1", "--output", str(tmp_path)]) == 2
    assert "scale '10;20' is not a count" in capsys.readouterr().err
    assert cli(["subsets", "--pool", scratch, "--scales", "10", "--output", str(tmp_path)]) == 2
    assert "give --seed" in capsys.readouterr().err
    # A manifest with a schema version we don't know.
    m = json.loads(Path(scratch).read_text())
    m["schema_version"] = "9.9"
    future = tmp_path / "future.manifest.json"
    future.write_text(json.dumps(m))
    with pytest.raises(ManifestError, match="schema_version '9.9'"):
        subsets_stage.run(_cfg(str(future), tmp_path / "f"), spark)
    # The CLI end to end prints the funnel and writes the manifests.
    assert subsets_main(["--pool", scratch, "--scales", "5,10", "--seed", "3", "--output", str(tmp_path / "cli")]) == 0
    out = capsys.readouterr().out
    assert "selection funnel" in out and "eligible" in out
    assert read_manifest(str(tmp_path / "cli" / "5.manifest.json"))["provenance"]["command"][:2] == ["laiontools", "subsets"]


def test_real_pool_if_available(spark, request, tmp_path):
    try:
        pool = request.getfixturevalue("pool")
    except pytest.FixtureLookupError:
        pytest.skip("conftest has no `pool` fixture yet")
    m = read_manifest(pool.manifest)
    res = subsets_stage.run(_cfg(pool.manifest, tmp_path, scales="5,10", seed=1, allow_short=True), spark).details
    s10, s5 = (_uids(r["manifest"].replace("manifest.json", "uids.npy")) for r in res)
    assert s5 <= s10 and len(s5) == min(5, m["num_samples"])
    assert s10 <= _uids(os.path.join(os.path.dirname(pool.manifest), m["uids"]["path"]))


def test_update_refuses_its_own_folder_and_an_edited_old_run_before_writing(spark, scratch, tmp_path, capsys):
    import shutil

    from laiontools.cli import main as cli

    old = tmp_path / "old"
    subsets_stage.run(_cfg(scratch, old, scales="5,10", seed=3), spark)
    before = {p.name: p.read_bytes() for p in old.iterdir() if p.is_file()}
    # --output the --update folder (spelled differently): the report would read what the run just overwrote
    assert cli(["subsets", "--pool", scratch, "--update", str(old), "--output", f"{tmp_path}/./old/"]) == 2
    assert "is the --update folder" in capsys.readouterr().err
    assert {p.name: p.read_bytes() for p in old.iterdir() if p.is_file()} == before
    # an old manifest edited: selection null, or no selection.eligible -> refused naming it, nothing written
    for i, edit in enumerate([lambda m: m.update(selection=None), lambda m: m["selection"].pop("eligible")]):
        ed = tmp_path / f"edited{i}"
        shutil.copytree(old, ed)
        m = json.loads((ed / "10.manifest.json").read_text())
        edit(m)
        (ed / "10.manifest.json").write_text(json.dumps(m))
        out = tmp_path / f"out{i}"
        assert cli(["subsets", "--pool", scratch, "--update", str(ed), "--output", str(out)]) == 2
        err = capsys.readouterr().err
        assert f"{ed}/10.manifest.json has no selection.eligible" in err and "Traceback" not in err, err
        assert not out.exists()


def test_update_refuses_an_old_uid_file_edited_after_its_run(spark, scratch, tmp_path):
    old = tmp_path / "old"
    subsets_stage.run(_cfg(scratch, old, scales="5,10", seed=3), spark)
    edited = sorted(_uids(str(old / "10.uids.npy")))[1:]  # one uid taken out by hand
    save_uids(str(old / "10.uids.npy"), edited)
    # the new subsets would be right: the old folder is what changed, and the error says so before writing
    out = tmp_path / "out"
    with pytest.raises(SubsetError, match=rf"uid file {old}/10\.uids\.npy changed after that run"):
        subsets_stage.run(SubsetsConfig(pool=scratch, output=str(out), update=str(old)), spark)
    assert not out.exists()


def test_update_refuses_selection_flags_and_an_exclusion_list_rewritten_since(spark, scratch, tmp_path):
    """(lineage walk) --update dropped the selection flags given with it (--seed 5 gave seed 3's subsets,
    --allow-short was ignored, so a scale a takedown left short had no way forward), and re-read --exclude by
    path: an exclusion list rewritten since (dedup run again into its folder) changed the selection while every
    check of the update report passed. Now a differing flag is refused naming the old value, --allow-short is
    honoured, and a changed exclusion list is refused naming both sha256."""
    from laiontools.core.config import ConfigError

    pool_uids = sorted(_uids(os.path.join(os.path.dirname(scratch), layout.POOL_UIDS)))
    excl = tmp_path / "excl.uids.npy"
    save_uids(str(excl), pool_uids[:2])
    old = tmp_path / "old"
    subsets_stage.run(_cfg(scratch, old, scales="5,10", seed=3, exclude=[str(excl)]), spark)
    for flags, msg in [({"seed": 5}, r"--seed 5 \(that run: 3\)"), ({"scales": "5,20"}, r"--scales '5,20' \(that run: '5,10'\)"),
                       ({"min_caption_length": 3}, r"--min-caption-length 3 \(that run: None\)")]:
        with pytest.raises(ConfigError, match=msg):
            subsets_stage.run(SubsetsConfig(pool=scratch, output=str(tmp_path / "x"), update=str(old), **flags), spark)
        assert not (tmp_path / "x").exists()
    # the old run's own values, and --allow-short, may be given
    subsets_stage.run(SubsetsConfig(pool=scratch, output=str(tmp_path / "same"), update=str(old), seed=3,
                                    allow_short=True), spark)
    assert json.loads((tmp_path / "same" / layout.SETTINGS_JSON).read_text())["allow_short"] is True
    assert (tmp_path / "same" / "10.uids.npy").read_bytes() == (old / "10.uids.npy").read_bytes()
    save_uids(str(excl), pool_uids[2:4])  # the list rewritten in place
    with pytest.raises(SubsetError, match=rf"exclusion list {excl} changed since that run"):
        subsets_stage.run(SubsetsConfig(pool=scratch, output=str(tmp_path / "y"), update=str(old)), spark)
    assert not (tmp_path / "y").exists()


def test_scores_leave_out_rows_without_uid_and_samples_embed_could_not_decode(spark, tmp_path):
    # (walk F4) a row embed recorded failed with a null uid made subsets refuse the scores as "from another
    # pool: run embed on this pool", which re-running embed cannot fix. (walk F13) with --scores but no score
    # filter, samples embed could not decode were selected; the funnel now leaves them out by name.
    import sys

    sys.path.insert(0, os.path.dirname(__file__))
    from test_semdedup import make_hostile_pool

    h = make_hostile_pool(str(tmp_path / "h"))
    res = subsets_stage.run(_cfg(h["manifest"], tmp_path / "o", scales="8,4", scores=h["emb"]), spark).details
    m = read_manifest(res[0]["manifest"])
    steps = {f["step"]: f["removed"] for f in m["selection"]["funnel"]}
    assert steps["undecodable at embed (failed_decode)"] == 1, m["selection"]["funnel"]
    assert m["selection"]["filters"]["clip_score_source"]["rows_without_uid"] == 1
    assert h["uids"][4] not in _uids(resolve_uids(res[0]["manifest"]))
    assert _uids(resolve_uids(res[1]["manifest"])) <= _uids(resolve_uids(res[0]["manifest"]))  # still nested


def resolve_uids(manifest: str) -> str:
    from laiontools.contracts.manifest import resolve

    return resolve(manifest, read_manifest(manifest)["uids"]["path"])


def test_a_folder_of_subsets_made_with_other_settings_is_refused(spark, scratch, tmp_path):
    """A re-run into a subsets folder with other scales or another seed rewrote only its own scales' files and
    left the others beside them (of another seed: no longer nested in the new ones), exit 0. Now it is refused
    naming what differs, before anything is written; the same settings (scales spelled otherwise, the pool by
    another path to the same file) re-run into it, and a folder whose run was refused as short is reused."""
    out = tmp_path / "s"
    subsets_stage.run(_cfg(scratch, out, scales="10,20"), spark)
    before = {p.name: p.read_bytes() for p in out.iterdir() if p.is_file()}
    with pytest.raises(SubsetError, match=r"holds subsets made with other settings \(scales: \[\['20', 20\], \['10', 10\]\] -> \[\['40', 40\], \['20', 20\]\]\)"):
        subsets_stage.run(_cfg(scratch, out, scales="20,40"), spark)
    with pytest.raises(SubsetError, match=r"other settings \(seed: 7 -> 8\)"):
        subsets_stage.run(_cfg(scratch, out, scales="10,20", seed=8), spark)
    assert {p.name: p.read_bytes() for p in out.iterdir() if p.is_file()} == before  # nothing written
    rel = os.path.relpath(scratch)  # the same pool by a relative path, the same scales spelled otherwise
    subsets_stage.run(_cfg(rel, out, scales=" 20 , 10"), spark)
    assert (out / "10.uids.npy").read_bytes() == before["10.uids.npy"]
    short = tmp_path / "short"
    with pytest.raises(SubsetError, match="available 60"):
        subsets_stage.run(_cfg(scratch, short, scales="1000"), spark)
    subsets_stage.run(_cfg(scratch, short, scales="1000", allow_short=True), spark)
    assert (short / "1000.uids.npy").exists()


# ----------------------------------------------------------------------------------------------
# The two engines: Spark (given a session, a master, or above --spark-above) and in process


def _engine_case(name: str, scratch: str, root: Path) -> dict:
    """Settings of one comparison case, with the inputs it needs written under `root`."""
    import random

    import numpy as np

    from laiontools.contracts.uids import uids_to_array

    samples = sorted(u for u, r in pool_samples(scratch).items() if r[C.SHARD] != "00004")
    fp = read_manifest(scratch)["source"]["fingerprint"]
    if name == "filters":
        return {"scales": "10,20,40", "max_punsafe": 0.8, "max_pwatermark": 0.9, "min_image_side": 70,
                "max_aspect_ratio": 1.8, "min_caption_length": 14, "max_caption_length": 34, "allow_short": True}
    if name == "scores":
        # Two files: a uid scored twice (its largest score counts), one with a NaN among its scores (Spark
        # ranks NaN above every number), samples embed could not decode (null score), a row without a uid.
        emb = root / "emb"
        (emb / layout.EMB_SCORES_DIR).mkdir(parents=True)
        write_json(str(emb / layout.EMB_MODEL_JSON), {"model": "lt-tiny", "source_fingerprint": fp})
        scores = {u: (int(u[:4], 16) % 100) / 100 for u in samples}
        a, b = samples[:30], samples[30:]
        low = next(u for i, u in enumerate(b) if i % 9 and scores[u] < 0.3)  # NaN and a low score: NaN is its max
        rows_a = [(u, scores[u]) for u in a] + [(None, 0.9), (b[0], 0.95), (low, float("nan"))]
        rows_b = [(u, None if i % 9 == 0 else scores[u]) for i, u in enumerate(b)]
        for k, rows in enumerate((rows_a, rows_b)):
            pq.write_table(pa.table({"uid": pa.array([u for u, _ in rows], pa.string()),
                                     "clip_score": pa.array([s for _, s in rows], pa.float32())}),
                           str(emb / layout.EMB_SCORES_DIR / f"0000{k}.parquet"))
        return {"scales": "12,5", "scores": str(emb), "min_clip_score": 0.3}
    if name == "scores-no-bound":
        out = _engine_case("scores", scratch, root)
        return {**out, "min_clip_score": None, "scales": "40"}
    if name == "exclusions":
        d = str(root / "dedup")
        _write_dedup(d, samples[::4], fp)
        shuffled = samples[1::5]
        random.Random(3).shuffle(shuffled)
        loose = str(root / "loose.uids.npy")
        np.save(loose, uids_to_array(shuffled + shuffled[:2]))  # unsorted, two uids twice
        return {"scales": "30,7", "exclude": [d, loose]}
    if name == "short":
        return {"scales": "100,60,3", "allow_short": True, "min_image_side": 65}
    if name == "update":
        old = root / "old"
        subsets_stage.run(_cfg(scratch, old, scales="25,9", seed=3, max_punsafe=0.7))
        return {"update": str(old)}
    raise AssertionError(name)


def _tree(folder: Path) -> dict[str, bytes]:
    """The files of a subsets output as bytes, the folder's own path written as OUT (the update report
    names it), without settings.json (it names the output and the engine's settings), the run sidecars and
    the hidden files that claim the folder (their time)."""
    return {p.name: p.read_bytes().replace(str(folder).encode(), b"OUT") for p in sorted(folder.iterdir())
            if p.is_file() and p.name != layout.SETTINGS_JSON and not p.name.endswith(".run.json") and not p.name.startswith(".")}


def _recorded(load, names: list[str], path, *a, **k):
    """`load` (contracts.uids.load_uids) that notes the name of each file it reads in `names`."""
    names.append(os.path.basename(str(path)))
    return load(path, *a, **k)


@pytest.mark.parametrize("case", ["filters", "scores", "scores-no-bound", "exclusions", "short", "update"])
def test_the_in_process_engine_writes_what_the_spark_engine_writes(spark, scratch, tmp_path, case, monkeypatch):
    """Each case run on the test's Spark session and in process (no session given, a pool far below
    --spark-above): the same manifests, uid files and update reports, byte for byte. The Spark engine's
    choices are checked against plain-Python references by the tests above. In process, an exclusion
    list is read once: the uids its check held (the bytes its recorded sha256 names) flag the catalog."""
    from laiontools.contracts import uids as uids_mod

    kw = _engine_case(case, scratch, tmp_path)
    seed = {} if "update" in kw else {"seed": 7}
    out = {}
    for engine in ("spark", "in-process"):
        folder = tmp_path / engine
        cfg = SubsetsConfig(pool=scratch, output=str(folder), **seed, **kw)
        if engine == "in-process":
            monkeypatch.setattr(uids_mod, "load_uids", functools.partial(_recorded, uids_mod.load_uids, loaded := []))
        res = subsets_stage.run(cfg, spark if engine == "spark" else None)
        assert res.ok
        if engine == "in-process":
            read_again = {os.path.basename(e) for e in kw.get("exclude", [])} | {layout.DEDUP_EXCLUDE_UIDS}
            assert not read_again & set(loaded), loaded
        out[engine] = _tree(folder)
        runs = {json.loads(p.read_text())["engine"] for p in folder.glob("*.manifest.json.run.json")}
        assert runs == ({"in-process"} if engine == "in-process" else {f"spark {spark.sparkContext.master}"})
    assert sorted(out["in-process"]) == sorted(out["spark"]) and len(out["spark"]) >= 2
    for name, data in out["spark"].items():
        assert out["in-process"][name] == data, name


@pytest.mark.parametrize("case", ["another pool's scores", "another pool's dedup", "too few eligible", "scores without a score column",
                                  "empty score files"])
def test_the_in_process_engine_refuses_what_the_spark_engine_refuses(spark, scratch, tmp_path, case):
    from laiontools.core.errors import UserError

    if case in ("scores without a score column", "empty score files"):
        emb = tmp_path / "emb"
        (emb / layout.EMB_SCORES_DIR).mkdir(parents=True)
        uids = [] if case == "empty score files" else sorted(pool_samples(scratch))[:5]
        cols = {"uid": pa.array(uids, pa.string())}
        if case == "empty score files":
            cols["clip_score"] = pa.array([], pa.float32())
        pq.write_table(pa.table(cols), str(emb / layout.EMB_SCORES_DIR / "00000.parquet"))
        kw = {"scores": str(emb)}
    elif case == "another pool's scores":
        other = make_scratch_pool(str(tmp_path / "pool_b"), n=20, failures=0, tag="b")
        alien = str(tmp_path / "emb_alien")
        _write_scores(alien, {u: 0.5 for u in pool_samples(other)}, None)
        kw = {"scores": alien, "min_clip_score": 0.3}
    elif case == "another pool's dedup":
        other = make_scratch_pool(str(tmp_path / "pool_c"), n=10, failures=0, tag="c")
        d = str(tmp_path / "dedup_alien")
        _write_dedup(d, list(pool_samples(other)), read_manifest(scratch)["source"]["fingerprint"])
        kw = {"exclude": [d]}
    else:
        kw = {"scales": "61", "min_caption_length": 10}
    errors = []
    for engine in ("spark", "in-process"):
        cfg = _cfg(scratch, tmp_path / engine, **{"scales": "5", **kw})
        with pytest.raises(UserError) as e:
            subsets_stage.run(cfg, spark if engine == "spark" else None)
        errors.append((type(e.value), str(e.value)))
    assert errors[0] == errors[1]
    want = {"scores without a score column": "lack column 'clip_score'", "empty score files": "the score files are empty",
            "another pool's scores": "scored uids are not samples", "another pool's dedup": "excluded uids are not samples",
            "too few eligible": "not enough eligible samples"}[case]
    assert want in errors[0][1], errors[0]


def test_a_catalog_file_without_a_filter_column_is_refused_by_both_engines(spark, tmp_path):
    """A catalog of two files, the second without punsafe: Spark's reader (the schema of one file) read
    that file's punsafe as null, and --max-punsafe dropped its rows as "punsafe missing" with exit 0,
    a subset drawn from half the pool; the in-process engine refuses the file by name. Both refuse it."""
    from laiontools.core.errors import InputError

    pool = make_scratch_pool(str(tmp_path / "pool"), n=40, failures=0, tag="m")
    cat = tmp_path / "pool" / layout.CATALOG_DIR
    t = pq.read_table(str(cat / "part-00000.parquet"))
    pq.write_table(t.slice(0, 20), str(cat / "part-00000.parquet"))
    pq.write_table(t.slice(20).drop_columns([C.PUNSAFE]), str(cat / "part-00001.parquet"))
    errors = []
    for engine in ("spark", "in-process"):
        with pytest.raises(InputError) as e:
            subsets_stage.run(_cfg(pool, tmp_path / engine, scales="5", max_punsafe=0.55), spark if engine == "spark" else None)
        errors.append(str(e.value))
    assert errors[0] == errors[1]
    assert "part-00001.parquet lacks column(s) ['punsafe']" in errors[0], errors[0]


def test_the_engines_rank_and_count_between_cuts_alike(spark, scratch):
    """The engines' parts that --update and the cuts use, compared directly on cuts at several ranks."""
    from laiontools.stages.subsets import _filter_steps, _LocalSelection, _SparkSelection

    cfg = _cfg(scratch, "/unused", max_punsafe=0.9)
    pool = subsets_stage.load_pool(scratch)
    steps = _filter_steps(cfg, False, [])
    sp, lo = _SparkSelection(cfg, spark, pool, []), _LocalSelection(cfg, pool, [])
    try:
        assert sp.funnel(steps) == lo.funnel(steps)
        ranks = [1, 2, 17, 33, 54]
        cuts = lo.cuts(ranks)
        assert sp.cuts(ranks) == cuts
        for old in (True, cuts[1], cuts[17], cuts[54]):
            for new in (cuts[2], cuts[33], cuts[54]):
                assert sp.between(old, new) == lo.between(old, new), (old, new)
        assert lo.between(cuts[17], cuts[33]) == 16 and lo.between(True, cuts[33]) == 33
    finally:
        sp.close()


def test_a_cut_pool_uid_file_is_one_line_naming_it_when_a_dedup_list_is_checked(tmp_path, capsys, monkeypatch):
    """A dedup output's uids are checked against the pool's uid file: one cut short (a partial copy) was
    numpy's "mmap length is greater than file size" traceback, naming no file."""
    from laiontools.cli import main as cli

    monkeypatch.delenv("LAIONTOOLS_SPARK_MASTER", raising=False)
    pool = make_scratch_pool(str(tmp_path / "pool"), n=20, per_shard=8, failures=0)
    d = str(tmp_path / "dedup")
    _write_dedup(d, sorted(pool_samples(pool))[:3], read_manifest(pool)["source"]["fingerprint"])
    uf = tmp_path / "pool" / layout.POOL_UIDS
    uf.write_bytes(uf.read_bytes()[:-16])  # the pool's uid file loses its last uid
    rc = cli(["subsets", "--pool", pool, "--exclude", d, "--scales", "5", "--seed", "1", "--output", str(tmp_path / "o")])
    err = capsys.readouterr().err
    assert rc == 2 and "Traceback" not in err and str(uf) in err, err[-1500:]


# ----------------------------------------------------------------------------------------------
# Found by a review of the embeddings readers: scores read from a shard embed had not finished.


@pytest.mark.parametrize("engine", ["in-process", "spark"])
def test_scores_of_a_shard_without_its_embed_marker_are_not_read(tmp_path, monkeypatch, engine, request):
    """A pool shard is downloaded again in place (sample 0's URL now serves another image; same uid), and embed
    is re-run into its folder and killed before that shard is written: embed removed the shard's completion
    marker first, so the folder claims no rows of the old shard, but the old scores/00000.parquet (scores of
    the old images) is still there. A shard is done only when its marker exists (DESIGN): --scores must not
    give those samples the old images' clip scores."""
    from laiontools.stages import embed as embed_stage
    from laiontools.stages.embed import EmbedConfig

    pool = make_scratch_pool(str(tmp_path / "p"), n=16, per_shard=8, failures=0, tag="m")
    emb = str(tmp_path / "emb")
    cfg = EmbedConfig(manifest=pool, output=emb, model="lt-tiny", num_workers=0)
    assert embed_stage.run(cfg).ok
    tar = os.path.join(tmp_path / "p", layout.SHARDS_DIR, "00000.tar")
    with tarfile.open(tar) as tf:
        members = [(m, tf.extractfile(m).read()) for m in tf.getmembers()]
    with tarfile.open(tar, "w", format=tarfile.USTAR_FORMAT) as tf:
        for m, data in members:
            if m.name == "000000000.jpg":
                data = _jpeg(99, 16, 16)
                m.size = len(data)
            tf.addfile(m, io.BytesIO(data))
    m = read_manifest(pool)
    m["shards"][0]["sha256"], m["shards"][0]["bytes"] = sha256_file(tar)
    write_manifest(pool, m)

    def killed(*a, **k):
        raise KeyboardInterrupt  # the re-embed is killed while it embeds shard 00000

    monkeypatch.setattr(embed_stage, "_write_shard", killed)
    with pytest.raises(KeyboardInterrupt):
        embed_stage.run(cfg)
    monkeypatch.undo()
    assert not os.path.exists(os.path.join(emb, layout.EMB_META_DIR, "00000.parquet.done"))
    assert os.path.exists(os.path.join(emb, layout.EMB_SCORES_DIR, "00000.parquet"))  # the old shard's scores

    spark = request.getfixturevalue("spark") if engine == "spark" else None
    shard0 = {u for u, r in pool_samples(pool).items() if r[C.SHARD] == "00000"}
    try:
        res = subsets_stage.run(_cfg(pool, tmp_path / "o", scales="4", scores=emb, min_clip_score=-1.0,
                                     allow_short=True), spark).details
    except (SubsetError, subsets_stage.InputError) as e:  # refused: as good
        assert "00000" in str(e)
        return
    picked = _uids(resolve_uids(res[0]["manifest"]))
    funnel = {f["step"]: f["removed"] for f in read_manifest(res[0]["manifest"])["selection"]["funnel"]}
    assert funnel.get("clip_score < -1 or missing") == len(shard0) and not picked & shard0, (
        f"samples of shard 00000 were scored from its old scores file (no marker): funnel {funnel}")


def _null_typed_catalog(pool_dir: Path) -> None:
    """Rewrite a scratch pool's one catalog file as three: its failed rows alone through pandas (every
    all-None column then stored with Arrow's null type, an integer column with a null as double), 16
    success rows with punsafe all null (null type: a part whose score was never computed), the rest as written."""
    import pyarrow.compute as pc

    cat = pool_dir / layout.CATALOG_DIR
    t = pq.read_table(str(cat / "part-00000.parquet"))
    ok = t.filter(pc.equal(t[C.STATUS], C.STATUS_SUCCESS))
    t.filter(pc.not_equal(t[C.STATUS], C.STATUS_SUCCESS)).to_pandas().to_parquet(str(cat / "part-00000.parquet"))
    head = ok.slice(0, 16)
    i = head.schema.get_field_index(C.PUNSAFE)
    pq.write_table(head.set_column(i, pa.field(C.PUNSAFE, pa.null()), pa.nulls(head.num_rows)), str(cat / "part-00001.parquet"))
    pq.write_table(ok.slice(16), str(cat / "part-00002.parquet"))
    assert pq.read_schema(str(cat / "part-00000.parquet")).field(C.SHARD).type == pa.null()


def test_a_catalog_file_storing_a_filter_column_as_null_type_gives_the_in_process_engines_subsets(spark, tmp_path):
    """A catalog file whose punsafe is all null, stored with Arrow's null type (Spark reads it as int), and one
    of failed rows alone written by pandas (shard, key... null-typed): Spark took one file's types and failed
    on another's (FAILED_READ_FILE.PARQUET_COLUMN_DATA_TYPE_MISMATCH, a Py4JJavaError traceback) while the
    in-process engine read the catalog. Now both write the same files; the null punsafe fails --max-punsafe."""
    pool = make_scratch_pool(str(tmp_path / "pool"), n=40, failures=4, tag="z")
    _null_typed_catalog(tmp_path / "pool")
    out = {}
    for engine in ("spark", "in-process"):
        res = subsets_stage.run(_cfg(pool, tmp_path / engine, scales="5,12", max_punsafe=0.55, allow_short=True),
                                spark if engine == "spark" else None)
        assert res.ok
        out[engine] = _tree(tmp_path / engine)
        funnel = {s["step"]: s["removed"] for s in read_manifest(str(tmp_path / engine / layout.subset_manifest("12")))["selection"]["funnel"]}
        assert funnel["punsafe >= 0.55 or missing"] == 16 + sum(1 for i in range(16, 40) if i % 10 >= 6), funnel
    assert sorted(out["spark"]) == sorted(out["in-process"]) and len(out["spark"]) >= 2
    for name, data in out["spark"].items():
        assert out["in-process"][name] == data, name


# ----------------------------------------------------------------------------------------------
# Found by a review of repeated reads (each a round trip on an object store).


def test_a_run_on_spark_chosen_by_size_reads_each_catalog_footer_and_the_pool_manifest_once(spark, tmp_path, monkeypatch):
    """A pool manifest without catalog.num_rows, Spark chosen by the catalog's size (no session given): every
    catalog file's footer was read to count the rows, then again for Spark's columns (~1,150 round trips
    each at 2B rows), and the pool manifest read once to check it, again to select. Now each once (opens
    by this process counted on the real local file system; Spark's own reader is not this process's), and
    the same files as a run on the session given."""
    from fsspec.implementations import local

    monkeypatch.delenv("LAIONTOOLS_SPARK_MASTER", raising=False)
    pool = make_scratch_pool(str(tmp_path / "pool"), n=40, failures=4, tag="r")
    _null_typed_catalog(tmp_path / "pool")  # three catalog files
    assert "num_rows" not in read_manifest(pool)["catalog"]
    kw = {"scales": "5,12", "max_punsafe": 0.55, "allow_short": True}
    subsets_stage.run(_cfg(pool, tmp_path / "given", **kw), spark)
    cat = str(tmp_path / "pool" / layout.CATALOG_DIR)
    opened: list[str] = []
    real_open = local.LocalFileSystem._open

    def counting_open(self, path, *a, **k):
        if str(path).startswith(cat) or os.path.basename(str(path)) == os.path.basename(pool):
            opened.append(os.path.relpath(str(path), tmp_path / "pool"))
        return real_open(self, path, *a, **k)

    monkeypatch.setattr(local.LocalFileSystem, "_open", counting_open)
    res = subsets_stage.run(_cfg(pool, tmp_path / "chosen", spark_above=1, **kw))
    monkeypatch.setattr(local.LocalFileSystem, "_open", real_open)
    assert res.ok
    runs = {json.loads(p.read_text())["engine"] for p in (tmp_path / "chosen").glob("*.manifest.json.run.json")}
    assert runs == {f"spark {spark.sparkContext.master}"}
    files = sorted(os.listdir(cat))
    assert len(files) == 3 and sorted(opened) == sorted([os.path.basename(pool)] + [f"{layout.CATALOG_DIR}/{f}" for f in files]), opened
    assert _tree(tmp_path / "chosen") == _tree(tmp_path / "given")
