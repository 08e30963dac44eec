"""`laiontools semdedup` on a pool with planted near-duplicate groups of known size.

Real components: pools stored through the download's own resizer (:mod:`laiontools.testing.planted_pool`),
the embed stage with lt-tiny (random init, CPU), faiss k-means, Spark local[2]. Groups, keepers and
exclusion lists are checked against an independent brute-force computation from the embeddings.
The eps values are measured for this model, not guessed: lt-tiny puts every planted copy >= 0.9957
from its original and every unrelated pair <= 0.9945 (random-init embeddings crowd near 1).
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from laiontools import neardup
from laiontools.contracts.uids import load_uids
from laiontools.core.config import ConfigError
from laiontools.stages import semdedup
from laiontools.stages.semdedup import SemDedupConfig, SemDedupError

EPS_TIGHT, EPS_LOOSE = 0.005, 0.02
N_DISTINCT, N_WITH_COPIES = 60, 15  # photos 0..14 get 1, 2 or 3 copies (reencode, resize, crop)


def _uid_hex(arr: np.ndarray) -> list[str]:
    return [f"{int(h):016x}{int(lo):016x}" for h, lo in zip(arr["hi"], arr["lo"])]


@pytest.fixture(scope="module")
def planted(tmp_path_factory) -> dict:
    """90 samples in 4 shards: 60 distinct photos, 15 of them with 1-3 near-copies (30 copies in all)."""
    from laiontools.stages import embed as embed_stage
    from laiontools.testing.planted_pool import (
        COPY_KINDS,
        download_settings,
        jpeg,
        near_copy,
        photo,
        write_resized_pool,
    )

    base = tmp_path_factory.mktemp("semdedup_pool")
    rng = np.random.default_rng(0)
    samples, origin = [], []
    for i in range(N_DISTINCT):
        img = photo(i)
        samples.append({"bytes": jpeg(img), "caption": f"photo {i}", "url": f"http://127.0.0.2/{i}.jpg"})
        origin.append(i)
        if i < N_WITH_COPIES:
            for kind in COPY_KINDS[: 1 + i % 3]:
                samples.append({"bytes": near_copy(img, kind, rng), "caption": f"photo {i} ({kind})",
                                "url": f"http://127.0.0.3/{i}-{kind}.jpg"})
                origin.append(i)
    manifest, uids = write_resized_pool(str(base / "pool"), samples, download_settings("border", 64), per_shard=25)
    emb = str(base / "emb")
    embed_stage.run(embed_stage.EmbedConfig(manifest=manifest, output=emb, model="lt-tiny", num_workers=0, batch_size=32))
    return {"emb": emb, "origin": dict(zip(uids, origin)), "base": base, "manifest": manifest, "samples": samples}


def _cfg(emb: str, out: str, **kw) -> SemDedupConfig:
    # Small units / memory / blocks so the test crosses every path: several units, a cluster larger than
    # a unit, clusters compared from the memory-mapped file, similarities in several blocks.
    base = {"embeddings": emb, "output": out, "clusters": 4, "eps": [EPS_TIGHT, EPS_LOOSE], "keep": "hard", "seed": 0,
            "unit_rows": 30, "memory_rows": 20, "block_rows": 16, "gallery_groups": 6}
    base.update(kw)
    return SemDedupConfig(**base)


@pytest.fixture(scope="module")
def sd_run(planted, spark, tmp_path_factory) -> dict:
    out = str(tmp_path_factory.mktemp("semdedup_out"))
    res = semdedup.run(_cfg(planted["emb"], out), spark)
    return {"out": out, "result": res, "report": pd.read_parquet(os.path.join(out, "report"))}


def _pairs(groups: dict[str, list[str]]) -> set[tuple[str, str]]:
    out = set()
    for members in groups.values():
        ms = sorted(members)
        out |= {(a, b) for i, a in enumerate(ms) for b in ms[i + 1:]}
    return out


def test_precision_recall_on_planted_groups(planted, sd_run):
    rep, origin = sd_run["report"], planted["origin"]
    truth: dict[str, list[str]] = {}
    for u, o in origin.items():
        truth.setdefault(str(o), []).append(u)
    truth = {k: v for k, v in truth.items() if len(v) > 1}
    true_pairs = _pairs(truth)
    assert len(truth) == N_WITH_COPIES and len(true_pairs) == 5 * (1 + 3 + 6)
    found = {}
    for lab in (EPS_TIGHT, EPS_LOOSE):
        r = rep[rep["eps"] == lab]
        pred = _pairs(r.groupby("group")["uid"].apply(list).to_dict())
        tp = len(pred & true_pairs)
        found[lab] = {"precision": tp / max(1, len(pred)), "recall": tp / len(true_pairs), "removed": int(r["removed"].sum())}
    # At the measured eps every planted copy is grouped with its original and nothing else is.
    assert found[EPS_TIGHT] == {"precision": 1.0, "recall": 1.0, "removed": 30}, found
    # A looser eps links more (unrelated look-alikes of a random-init model): recall stays, precision drops.
    assert found[EPS_LOOSE]["recall"] == 1.0 and found[EPS_LOOSE]["removed"] >= 30
    # One member kept per planted group, whatever the group's size.
    r = rep[rep["eps"] == EPS_TIGHT]
    assert (r.groupby("group")["removed"].apply(lambda s: int((~s).sum())) == 1).all()
    assert sorted(r.groupby("group").size().tolist()) == sorted(len(v) for v in truth.values())


def test_groups_and_keepers_equal_brute_force(planted, sd_run):
    """Recompute everything from the embeddings, centroids and assignments: pairs > 1 - eps within a
    cluster, connected components by BFS, keeper = lowest cosine to the centroid (hard), ties by uid."""
    from laiontools.contracts.embeddings import read_embedding_shard, read_pool

    out, rep = sd_run["out"], sd_run["report"]
    pool = read_pool(planted["emb"])
    cents = np.load(os.path.join(out, "kmeans", "centroids.npy"))
    uids, vecs = [], []
    for sid in pool.shard_ids:
        emb, meta = read_embedding_shard(planted["emb"], sid)
        x = np.asarray(emb, dtype=np.float32)
        vecs.append((x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float16).astype(np.float32))
        uids += meta.column("uid").to_pylist()
    x = np.concatenate(vecs)
    cluster = np.argmax(x @ cents.T, axis=1)
    assign = pd.concat([pd.read_parquet(os.path.join(out, "assign", f"{s}.parquet")) for s in pool.shard_ids])
    assert (assign["cluster"].to_numpy() == cluster).all()
    csim = (x * cents[cluster]).sum(axis=1)
    for eps in (EPS_TIGHT, EPS_LOOSE):
        seen, groups = set(), []
        for s in range(len(uids)):
            if s in seen:
                continue
            comp, todo = [], [s]
            seen.add(s)
            while todo:
                a = todo.pop()
                comp.append(a)
                for b in range(len(uids)):
                    if b not in seen and cluster[b] == cluster[a] and float(x[a] @ x[b]) > 1 - eps:
                        seen.add(b)
                        todo.append(b)
            if len(comp) > 1:
                groups.append(comp)
        r = rep[rep["eps"] == eps].set_index("uid")
        assert len(r) == sum(len(g) for g in groups)
        for g in groups:
            members = [uids[i] for i in g]
            assert r.loc[members, "group"].nunique() == 1
            keep = min(g, key=lambda i: (float(csim[i]), uids[i]))
            assert set(r.loc[members, "kept_uid"]) == {uids[keep]}
            assert r.loc[uids[keep], "removed"] == False
            assert r.loc[members, "removed"].sum() == len(g) - 1
            sims = [float(x[i] @ x[keep]) for i in g]
            np.testing.assert_allclose(r.loc[members, "similarity"].to_numpy(), sims, atol=1e-5)


def test_exclusion_lists_summary_and_gallery(planted, sd_run):
    out, rep = sd_run["out"], sd_run["report"]
    s = sd_run["result"].details
    assert s["clusters"] == 4 and s["pool_samples"] == 90 and s["clustered"] == 90 and s["units"] >= 3
    for e in s["eps"]:
        lab = format(e["eps"], "g")
        got = _uid_hex(load_uids(os.path.join(out, "eps", lab, "exclude.uids.npy")))
        want = sorted(rep.loc[(rep["eps"] == e["eps"]) & rep["removed"], "uid"])
        assert got == want and e["removed"] == len(want)
        assert e["removed_fraction"] == pytest.approx(len(want) / 90, abs=1e-6)
        with open(os.path.join(out, "eps", lab, "dedup.json")) as f:
            dj = json.load(f)
        assert dj["kind"] == "semdedup" and dj["eps"] == e["eps"] and dj["exclude"]["count"] == len(want)
    # the first eps is the folder's own list (what `subsets --exclude <out>` reads)
    with open(os.path.join(out, "exclude.uids.npy"), "rb") as a, open(os.path.join(out, "eps", "0.005", "exclude.uids.npy"), "rb") as b:
        assert a.read() == b.read()
    with open(os.path.join(out, "dedup.json")) as f, open(planted["manifest"]) as m:
        assert json.load(f)["pool"]["fingerprint"] == json.load(m)["source"]["fingerprint"]
    with open(os.path.join(out, "gallery.html")) as f:
        html = f.read()
    assert html.count("data:image/jpeg;base64,") >= 2 * 6 and "image unavailable" not in html
    assert "photo " in html and "<b>kept</b>" in html
    with open(os.path.join(out, "summary.txt")) as f:
        txt = f.read()
    assert "eps/0.005/exclude.uids.npy" in txt and "0.02" in txt


def _files(out: str) -> dict[str, bytes]:
    keep = ("exclude.uids.npy", ".parquet", "centroids.npy", "dedup.json", ".vec.npy", ".meta.npy", ".offsets.npy")
    got = {}
    for root, _, names in os.walk(out):
        for n in names:
            if n.endswith(keep):
                p = os.path.join(root, n)
                with open(p, "rb") as f:
                    got[os.path.relpath(p, out)] = f.read()
    return got


def _scratch_leftovers() -> tuple[str, str, str]:
    """Scratch folders as storage.scratch_dir names them, in the temp dir: one of a process of this host
    that has exited, one of a live process (this one), one of another host sharing the temp dir."""
    import re
    import socket
    import subprocess
    import sys
    import tempfile

    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    host = re.sub(r"[^A-Za-z0-9.]", "_", socket.gethostname())[:64]  # as scratch_dir spells it
    base = tempfile.gettempdir()
    out = []
    for name in (f"laiontools-semdedup-{host}-{proc.pid}-abc_12", f"laiontools-semdedup-{host}-{os.getpid()}-def_34",
                 f"laiontools-semdedup-elsewhere-{proc.pid}-ghi_56"):
        os.makedirs(os.path.join(base, name))
        with open(os.path.join(base, name, "vec.npy"), "wb") as f:
            f.write(b"\0" * 1024)
        out.append(os.path.join(base, name))
    return out[0], out[1], out[2]


def test_deterministic_and_resumes_after_kill(planted, sd_run, spark, tmp_path):
    first = _files(sd_run["out"])
    assert any(k.startswith("report/") for k in first) and "kmeans/centroids.npy" in first
    again = str(tmp_path / "again")
    semdedup.run(_cfg(planted["emb"], again), spark)
    second = _files(again)
    assert second.keys() == first.keys()
    differ = [k for k in first if first[k] != second[k]]
    assert not differ, f"not byte-identical on a second run: {differ}"
    # "kill": a unit lost its marker with a half-written temp report, another unit and one shard never finished
    units = sorted(os.listdir(os.path.join(again, "done", "units")))
    assert len(units) >= 3
    for u in units[:2]:
        os.remove(os.path.join(again, "done", "units", u))
    uid0 = units[0][: -len(".done")]
    with open(os.path.join(again, "report", f".{uid0}.parquet.tmp-deadbeef"), "wb") as f:
        f.write(b"PAR1 half")
    os.remove(os.path.join(again, "report", f"{units[1][: -len('.done')]}.parquet"))
    shard_markers = sorted(os.listdir(os.path.join(again, "done", "assign")))
    os.remove(os.path.join(again, "done", "assign", shard_markers[0]))
    kept = os.path.join(again, "done", "units", units[2])
    kept_mtime = os.path.getmtime(kept)
    for f in ("exclude.uids.npy", "summary.json"):
        os.remove(os.path.join(again, f))
    shutil.copy(os.path.join(again, "report", units[2][: -len(".done")] + ".parquet"),
                os.path.join(again, "report", "9999990-9999999.parquet"))  # a unit of an earlier, other plan
    # the local scratch folder of a unit task that was killed (its process is gone; its `finally` never ran)
    dead, alive, other_host = _scratch_leftovers()
    semdedup.run(_cfg(planted["emb"], again), spark)
    assert not os.path.exists(os.path.join(again, "report", "9999990-9999999.parquet"))
    assert not os.path.exists(dead) and os.path.exists(alive) and os.path.exists(other_host)
    for d in (alive, other_host):
        shutil.rmtree(d)
    third = {k: v for k, v in _files(again).items() if not os.path.basename(k).startswith(".")}
    assert third == first
    assert os.path.getmtime(kept) == kept_mtime  # finished units are not redone


def test_in_process_engine_writes_the_same_bytes(planted, sd_run, tmp_path, monkeypatch):
    """Below --spark-above (and with no master named) the same tasks run in this process: same files,
    byte for byte, as the Spark run; a run left half done by Spark finishes in process."""
    monkeypatch.delenv("LAIONTOOLS_SPARK_MASTER", raising=False)
    first = _files(sd_run["out"])
    local = str(tmp_path / "local")
    res = semdedup.run(_cfg(planted["emb"], local))
    assert res.details["engine"] == "in-process"
    assert sd_run["result"].details["engine"].startswith("spark ")
    assert _files(local) == first
    # Spark's half: copy the Spark run's output, drop half the unit markers and one shard's
    mixed = str(tmp_path / "mixed")
    shutil.copytree(sd_run["out"], mixed)
    units = sorted(os.listdir(os.path.join(mixed, "done", "units")))
    for u in units[: len(units) // 2]:
        os.remove(os.path.join(mixed, "done", "units", u))
    os.remove(os.path.join(mixed, "done", "assign", min(os.listdir(os.path.join(mixed, "done", "assign")))))
    os.remove(os.path.join(mixed, "exclude.uids.npy"))
    kept = os.path.join(mixed, "done", "units", units[-1])
    kept_mtime = os.path.getmtime(kept)
    assert semdedup.run(_cfg(planted["emb"], mixed, spark_above=-1)).details["engine"] == "in-process"
    assert _files(mixed) == first
    assert os.path.getmtime(kept) == kept_mtime


def test_the_same_samples_in_another_order_give_the_same_exclusions(planted, tmp_path):
    """A re-download writes the same samples into the same shards in the order their fetches ended. The
    k-means sample was drawn by row position, so the centroids, and with them the groups and the
    exclusion list, changed with the order (a cluster walk: 41 vs 42 removed). Now the sample is chosen
    by uid: every shard's rows reversed, the same exclusion list byte for byte, and the same counts."""
    from laiontools.stages import embed as embed_stage
    from laiontools.testing.planted_pool import download_settings, write_resized_pool

    samples, per_shard = planted["samples"], 25
    flipped = [x for lo in range(0, len(samples), per_shard) for x in reversed(samples[lo:lo + per_shard])]
    outs = {}
    for name, pool in (("as-is", samples), ("reversed", flipped)):
        manifest, _ = write_resized_pool(str(tmp_path / name), pool, download_settings("border", 64), per_shard=per_shard)
        emb = str(tmp_path / f"{name}-emb")
        # one image per forward pass: a vector does not depend on its batch mates (fp16 storage would
        # otherwise move a value by one unit now and then)
        embed_stage.run(embed_stage.EmbedConfig(manifest=manifest, output=emb, model="lt-tiny", num_workers=0, batch_size=1))
        res = semdedup.run(_cfg(emb, str(tmp_path / f"{name}-sd"), spark_above=-1, train_sample=40))
        outs[name] = (Path(res.outputs["exclude"]).read_bytes(), res.counts)
    assert outs["as-is"][1]["removed"] > 0, outs["as-is"][1]
    assert outs["reversed"] == outs["as-is"]


def test_bad_input(planted, spark, tmp_path):
    with pytest.raises(SemDedupError, match="--clusters 500 is more than the 90 embedded samples"):
        semdedup.run(_cfg(planted["emb"], str(tmp_path / "a"), clusters=500), spark)
    for bad in ([0.0], [1.5], [0.1, 0.1]):
        with pytest.raises(ConfigError, match="eps"):
            _cfg(planted["emb"], str(tmp_path / "b"), eps=bad)
    with pytest.raises(ConfigError, match="keep"):
        _cfg(planted["emb"], str(tmp_path / "b"), keep="median")
    from laiontools.core.errors import UserError

    with pytest.raises(UserError, match="does not exist"):
        semdedup.run(_cfg(str(tmp_path / "nope"), str(tmp_path / "c")), spark)
    # another stage's output folder is refused, untouched
    other = tmp_path / "other"
    other.mkdir()
    (other / "data.txt").write_text("x")
    with pytest.raises(UserError, match="not empty"):
        semdedup.run(_cfg(planted["emb"], str(other)), spark)
    assert sorted(os.listdir(other)) == ["data.txt"]


def test_cli(planted, spark, tmp_path, monkeypatch):
    from laiontools.cli import main

    monkeypatch.delenv("LAIONTOOLS_SPARK_MASTER", raising=False)

    out = str(tmp_path / "cli")
    rc = main(["semdedup", "--embeddings", planted["emb"], "--output", out, "--clusters", "3", "--eps", "0.005", "0.01",
               "--keep", "random", "--seed", "3", "--gallery-groups", "0"])
    assert rc == 0
    with open(os.path.join(out, "summary.json")) as f:
        s = json.load(f)
    assert [e["eps"] for e in s["eps"]] == [0.005, 0.01] and s["keep"] == "random" and s["clusters"] == 3
    assert s["engine"] == "in-process"  # 90 samples, no master named: no JVM started for them
    assert not os.path.exists(os.path.join(out, "gallery.html"))


def test_subsets_exclude_consumes_semdedup(pool, spark, tmp_path):
    """A real downloaded pool: embed, semdedup, then `subsets --exclude <semdedup out>` leaves the removed uids out."""
    from laiontools.contracts.manifest import read_manifest
    from laiontools.stages import embed as embed_stage
    from laiontools.stages import subsets as subsets_stage

    emb = str(tmp_path / "emb")
    embed_stage.run(embed_stage.EmbedConfig(manifest=pool.manifest, output=emb, model="lt-tiny", num_workers=0, batch_size=32))
    out = str(tmp_path / "sd")
    res = semdedup.run(SemDedupConfig(embeddings=emb, output=out, clusters=2, eps=[0.01], gallery_groups=0), spark).details
    excluded = set(_uid_hex(load_uids(os.path.join(out, "exclude.uids.npy"))))
    assert len(excluded) == res["eps"][0]["removed"] > 0
    n = res["clustered"] - len(excluded)
    sub = subsets_stage.run(subsets_stage.SubsetsConfig(pool=pool.manifest, output=str(tmp_path / "sub"), scales=str(n), seed=0,
                                                        exclude=[out]), spark).details
    man = read_manifest(sub[0]["manifest"])
    chosen = set(_uid_hex(load_uids(sub[0]["manifest"].replace("manifest.json", "uids.npy"))))
    assert chosen and chosen.isdisjoint(excluded)
    assert man["selection"]["exclusions"][0]["count"] == len(excluded)


# ---------------------------------------------------------------------------------------------
# the library: laiontools.neardup against brute force


def _components_brute(x: np.ndarray, thr: float) -> np.ndarray:
    n = len(x)
    lab = np.arange(n)
    s = x @ x.T
    changed = True
    while changed:
        changed = False
        for a in range(n):
            for b in range(a + 1, n):
                if s[a, b] > thr and lab[a] != lab[b]:
                    lo = min(lab[a], lab[b])
                    lab[lab == lab[a]] = lo
                    lab[lab == lab[b]] = lo
                    changed = True
    return lab


def test_cluster_groups_blocks_and_memmap_equal_brute_force(tmp_path):
    rng = np.random.default_rng(5)
    base = neardup.normalize(rng.standard_normal((40, 16)))
    # chains and groups: copies with small noise, so components need transitive links
    x = neardup.normalize(np.concatenate([base, base[:10] + 0.05 * rng.standard_normal((10, 16)),
                                          base[:5] + 0.1 * rng.standard_normal((5, 16))]))
    eps = [0.002, 0.01, 0.05]
    want = [_components_brute(x, 1 - e) for e in eps]
    for block in (16, 7, 1000):
        labels, pairs = neardup.cluster_groups(x, eps, block)
        for k in range(len(eps)):
            np.testing.assert_array_equal(labels[k], want[k])
        assert pairs[0] <= pairs[1] <= pairs[2]
    mm = np.lib.format.open_memmap(str(tmp_path / "x.npy"), mode="w+", dtype=np.float32, shape=x.shape)
    mm[:] = x
    np.testing.assert_array_equal(neardup.cluster_groups(mm, eps, 9)[0], np.stack(want))


def test_choose_keepers_policies():
    from laiontools.contracts.uids import uids_to_array

    labels = np.array([0, 0, 0, 3, 3, 5])
    csim = np.array([0.9, 0.7, 0.8, 0.6, 0.6, 0.99], dtype=np.float32)
    uids = uids_to_array([f"{i:032x}" for i in (9, 8, 7, 6, 2, 1)])
    np.testing.assert_array_equal(neardup.choose_keepers(labels, csim, uids, "hard"), [1, 1, 1, 4, 4, 5])  # tie 3/4: smaller uid
    np.testing.assert_array_equal(neardup.choose_keepers(labels, csim, uids, "easy"), [0, 0, 0, 4, 4, 5])
    r1 = neardup.choose_keepers(labels, csim, uids, "random", seed=1)
    assert (r1 == neardup.choose_keepers(labels, csim, uids, "random", seed=1)).all()
    assert set(r1[:3].tolist()) <= {0, 1, 2} and len(set(r1[:3].tolist())) == 1 and r1[5] == 5
    # the choice does not depend on input order
    perm = np.array([5, 2, 0, 4, 1, 3])
    rp = neardup.choose_keepers(labels[perm], csim[perm], uids[perm], "hard")
    assert _uid_hex(uids[perm][rp]) == _uid_hex(uids[neardup.choose_keepers(labels, csim, uids, "hard")][perm])


def test_merge_runs_equals_one_sort(tmp_path):
    """Exclusion files are merged from per-unit sorted runs one uid range at a time: same bytes as save_uids."""
    from laiontools.contracts.uids import UID_DTYPE, save_uids

    rng = np.random.default_rng(2)
    allu = np.unique(rng.integers(0, 2**63, size=(5000, 2), dtype=np.int64).astype(np.uint64).view(UID_DTYPE).ravel())
    allu = allu[rng.permutation(len(allu))]
    paths = []
    for i, part in enumerate(np.array_split(allu, 7)):
        p = str(tmp_path / f"run{i}.npy")
        np.save(p, np.sort(part))
        paths.append(p)
    np.save(str(tmp_path / "empty.npy"), np.zeros(0, dtype=UID_DTYPE))
    want_sha, n = save_uids(str(tmp_path / "want.npy"), allu)
    for bucket_rows in (10**9, 333, 1):  # one bucket, ~15 buckets, one per uid
        sha, got_n = semdedup.merge_runs([*paths, str(tmp_path / "empty.npy")], str(tmp_path / f"got{bucket_rows}.npy"),
                                         len(allu), bucket_rows=min(bucket_rows, 10**9))
        assert (sha, got_n) == (want_sha, n)
    with pytest.raises(RuntimeError, match="hold 5000 uids, the unit markers say 4999"):
        semdedup.merge_runs(paths, str(tmp_path / "bad.npy"), 4999)


def make_hostile_pool(base: str) -> dict:
    """12 photos in 2 shards, embedded, with what a real pool can hold: sample 00000005's .json has no uid
    (embed records its row failed, uid null), 00000004's image does not decode (failed, uid kept), and
    sample 00000000 is in shard 00001 again under key 00019999 (one uid on two rows). Manifest entries
    are re-hashed so the shards are the manifest's."""
    import io
    import tarfile

    from laiontools.contracts.manifest import read_manifest, resolve, write_manifest
    from laiontools.core.storage import sha256_file
    from laiontools.stages import embed as embed_stage
    from laiontools.testing.planted_pool import download_settings, jpeg, photo, write_resized_pool

    samples = [{"bytes": jpeg(photo(i)), "caption": f"photo {i}", "url": f"http://127.0.0.2/{i}.jpg"} for i in range(12)]
    manifest, uids = write_resized_pool(os.path.join(base, "pool"), samples, download_settings("border", 64), per_shard=6)
    doc = read_manifest(manifest)
    paths = [resolve(manifest, s["path"]) for s in doc["shards"]]
    members = []
    for p in paths:
        with tarfile.open(p) as tf:
            members.append([(ti.name, tf.extractfile(ti).read()) for ti in tf])
    members[0] = [(n, b"not an image" if n == "000000004.jpg" else
                   json.dumps({"key": "000000005"}).encode() if n == "000000005.json" else d) for n, d in members[0]]
    members[1] += [(n.replace("000000000", "000019999"), d) for n, d in members[0] if n.startswith("000000000.")]
    for p, ms, entry in zip(paths, members, doc["shards"]):
        with tarfile.open(p, "w", format=tarfile.PAX_FORMAT) as tf:
            for n, d in ms:
                ti = tarfile.TarInfo(n)
                ti.size = len(d)
                tf.addfile(ti, io.BytesIO(d))
        entry["sha256"], entry["bytes"] = sha256_file(p)
        entry["num_samples"] = len({n.split(".")[0] for n, _ in ms})
    # a catalog as download writes it (subsets reads it): one success row per sample written
    import pyarrow as pa
    import pyarrow.parquet as pq

    from laiontools.contracts import layout
    from laiontools.contracts import schema as C

    rows = [{**{c: None for c in C.catalog_columns()}, C.UID: u, C.URL: smp["url"], C.CAPTION: smp["caption"],
             C.STATUS: C.STATUS_SUCCESS, C.SHARD: f"{i // 6:05d}", C.KEY: f"{i // 6:05d}{i % 6:04d}"}
            for i, (u, smp) in enumerate(zip(uids, samples))]
    os.makedirs(os.path.join(base, "pool", layout.CATALOG_DIR))
    pq.write_table(pa.Table.from_pylist(rows, schema=C.catalog_arrow_schema()),
                   os.path.join(base, "pool", layout.CATALOG_DIR, "part-00000.parquet"))
    doc["catalog"] = {"path": layout.CATALOG_DIR}
    write_manifest(manifest, doc)
    emb = os.path.join(base, "emb")
    embed_stage.run(embed_stage.EmbedConfig(manifest=manifest, output=emb, model="lt-tiny", num_workers=0, batch_size=16))
    return {"manifest": manifest, "emb": emb, "uids": uids}


@pytest.fixture(scope="module")
def hostile(tmp_path_factory) -> dict:
    return make_hostile_pool(str(tmp_path_factory.mktemp("hostile")))


def test_a_row_embed_recorded_without_uid_is_left_out_and_a_uid_on_two_rows_is_clustered_once(hostile, tmp_path):
    # (walk F4) a null uid (embed's failed row) stopped semdedup: "uid None ... the catalog or uid list is corrupt".
    # (walk F7) one uid on two rows: the report kept it through one row and the exclusion list (by uid) held it
    # through the other, so the sample the report says it kept was excluded from every subset.
    res = semdedup.run(_cfg(hostile["emb"], str(tmp_path / "sd"), clusters=2, eps=[0.001], spark_above=-1, gallery_groups=0))
    s = res.details
    assert (s["pool_samples"], s["not_embedded"], s["duplicate_uid_rows"], s["clustered"]) == (13, 2, 1, 10), s
    assert "WARNING: 1 embedding rows repeat a uid" in res.summary
    excluded = set(_uid_hex(load_uids(res.outputs["exclude"])))
    report = pd.read_parquet(res.outputs["report"])
    assert not excluded & set(report.loc[~report["removed"], "uid"]) and hostile["uids"][0] not in excluded


def test_a_rerun_with_more_gallery_groups_shows_them(planted, tmp_path, monkeypatch):
    """--gallery-groups decides which groups each unit task keeps for the gallery, but it is not in the
    unit's resume key: a re-run into the same output with more gallery groups reuses the units' markers
    (made with none) and writes an empty gallery.html, unlike a fresh run with the same settings."""
    monkeypatch.delenv("LAIONTOOLS_SPARK_MASTER", raising=False)
    fresh = str(tmp_path / "fresh")
    semdedup.run(_cfg(planted["emb"], fresh, spark_above=-1))
    again = str(tmp_path / "again")
    semdedup.run(_cfg(planted["emb"], again, spark_above=-1, gallery_groups=0))
    semdedup.run(_cfg(planted["emb"], again, spark_above=-1))
    fresh_html = Path(fresh, "gallery.html").read_text()
    assert fresh_html.count("<h3>group ") == 6
    assert Path(again, "gallery.html").read_text().count("<h3>group ") == fresh_html.count("<h3>group ")


def test_the_driver_writes_the_top_level_exclusion_list_without_holding_it(tmp_path, monkeypatch):
    """merge_runs writes each exclusion list holding one bucket of uids (the runs memory-mapped), but the
    top-level copy of the first eps's list is then read whole into the driver (`_read_bytes`): at a 2B
    pool with a third removed, ~10 GB. Here: 1M removed uids (16 MB), buckets of 50k (0.8 MB)."""
    import functools
    import tracemalloc

    from laiontools import index as DI
    from laiontools.contracts.embeddings import PoolInfo
    from laiontools.core.storage import mark_done

    out = str(tmp_path / "out")
    n = 1_000_000
    rng = np.random.default_rng(0)
    run_ = np.zeros(n, dtype=semdedup.UID_DTYPE)
    run_["hi"], run_["lo"] = rng.integers(0, 2**63, n, dtype=np.uint64), rng.integers(0, 2**63, n, dtype=np.uint64)
    run_ = semdedup.sort_uids(run_)
    unit = (0, 4)
    uid_ = semdedup._unit_id(unit)
    os.makedirs(os.path.join(out, "removed_runs", "0.05"))
    np.save(os.path.join(out, "removed_runs", "0.05", f"{uid_}.npy"), run_)
    mark_done(os.path.join(out, "done", "units", uid_),
              {"key": "K", "unit": uid_, "largest_cluster": n + 1, "gallery": [], "peak_rss_mb": 0,
               "eps": {"0.05": {"removed": n, "groups": 1, "in_groups": n + 1, "pairs": n}}})
    del run_
    monkeypatch.setattr(DI, "model_identity", lambda m: {"name": "x"})
    monkeypatch.setattr(DI, "describe_model", lambda m: "x")
    monkeypatch.setattr(semdedup, "merge_runs", functools.partial(semdedup.merge_runs, bucket_rows=50_000))
    pool = PoolInfo(emb_dir=str(tmp_path / "emb"), model={}, manifest_path=None, manifest=None, shard_ids=["00000"],
                    tar_by_shard={})
    cfg = SemDedupConfig(embeddings=str(tmp_path / "emb"), output=out, clusters=4, eps=[0.05], gallery_groups=0)
    tracemalloc.start()
    try:
        semdedup._write_outputs(cfg, pool, 4, {"train_rows": 1024}, np.array([n + 1, 0, 0, 0]), [unit],
                                [{"rows": n + 1}], {"unit_key": "K", "engine": "in-process"}, {})
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert len(load_uids(os.path.join(out, "exclude.uids.npy"))) == n
    assert peak < 8 * 2**20, f"driver peak {peak / 2**20:.1f} MiB for a {16 * n / 2**20:.1f} MiB exclusion list"


def test_merge_runs_from_an_object_store_holds_one_bucket(tmp_path):
    """merge_runs promises "Memory: one bucket, whatever the total", but runs on an object store are not
    memory-mapped: `_load_npy` reads every unit's run whole, all at once, so the driver holds the whole
    exclusion list (memory:// stands for s3:// here: not a local file system either)."""
    import tracemalloc

    import fsspec

    n, parts = 1_000_000, 4
    rng = np.random.default_rng(1)
    allu = np.zeros(n, dtype=semdedup.UID_DTYPE)
    allu["hi"], allu["lo"] = rng.integers(0, 2**63, n, dtype=np.uint64), rng.integers(0, 2**63, n, dtype=np.uint64)
    fs = fsspec.filesystem("memory")
    paths = []
    for i in range(parts):
        p = f"memory://rv-merge/{i}.npy"
        with fs.open(p, "wb") as f:
            np.save(f, semdedup.sort_uids(allu[i::parts]))
        paths.append(p)
    want = semdedup.sort_uids(allu)
    del allu
    tracemalloc.start()
    try:
        _, got_n = semdedup.merge_runs(paths, str(tmp_path / "ex.npy"), n, bucket_rows=50_000)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
        fs.rm("memory://rv-merge", recursive=True)
    assert got_n == n and np.array_equal(np.load(tmp_path / "ex.npy"), want)
    assert peak < 8 * 2**20, f"merge peak {peak / 2**20:.1f} MiB for {16 * n / 2**20:.1f} MiB of runs, buckets of 0.8 MiB"


def test_a_rerun_on_another_pool_leaves_no_assignment_of_the_old_one(planted, hostile, tmp_path, monkeypatch):
    """Reports and runs of an earlier plan are removed (`_drop_stale_units`), but the per-shard outputs are
    not: after a run on a 4-shard pool, a run on a 2-shard pool into the same output leaves assign/00002,
    00003 (the old pool's uids and clusters, read with the new ones by whoever reads assign/ as one dataset)
    and bycluster/00002, 00003 (a float16 copy of the old pool's vectors) in place."""
    monkeypatch.delenv("LAIONTOOLS_SPARK_MASTER", raising=False)
    out = str(tmp_path / "out")
    semdedup.run(_cfg(planted["emb"], out, spark_above=-1, gallery_groups=0))
    assert sorted(os.listdir(os.path.join(out, "assign"))) == [f"0000{i}.parquet" for i in range(4)]
    semdedup.run(_cfg(hostile["emb"], out, clusters=2, eps=[0.001], spark_above=-1, gallery_groups=0))
    assert sorted(os.listdir(os.path.join(out, "assign"))) == ["00000.parquet", "00001.parquet"]
    assert len(pd.read_parquet(os.path.join(out, "assign"))) == 13  # the new pool's rows only
    assert not [n for n in os.listdir(os.path.join(out, "bycluster")) if n.startswith(("00002", "00003"))]


def test_a_seed_faiss_cannot_take_is_refused_before_anything_is_written(tmp_path, capsys, monkeypatch):
    """`--seed 2147483648` (any seed past a C int) passed validate(), wrote settings.json, then faiss's k-means
    raised "OverflowError: in method 'ClusteringParameters_seed_set', argument 2 of type 'int'" as a
    traceback. It is one line naming the setting now (exit 2), and the new folder is left as it was."""
    from laiontools.cli import main
    from laiontools.stages import embed as embed_stage
    from laiontools.testing.planted_pool import download_settings, jpeg, photo, write_resized_pool

    monkeypatch.delenv("LAIONTOOLS_SPARK_MASTER", raising=False)
    samples = [{"bytes": jpeg(photo(i)), "caption": f"photo {i}", "url": f"http://127.0.0.2/{i}.jpg"} for i in range(8)]
    manifest, _ = write_resized_pool(str(tmp_path / "pool"), samples, download_settings("border", 64), per_shard=8)
    emb = str(tmp_path / "emb")
    embed_stage.run(embed_stage.EmbedConfig(manifest=manifest, output=emb, model="lt-tiny", num_workers=0, batch_size=8))
    out = tmp_path / "sd"
    assert main(["semdedup", "--embeddings", emb, "--output", str(out), "--clusters", "2", "--seed", str(2**31)]) == 2
    err = capsys.readouterr().err
    # (not "Traceback": a log handler an earlier test bound to its own, closed, stderr may print "Logging error")
    assert "seed 2147483648 is out of range" in err and "OverflowError" not in err and not out.exists()
    assert main(["semdedup", "--embeddings", emb, "--output", str(out), "--clusters", "2", "--seed", str(2**31 - 1)]) == 0


# ---------------------------------------------------------------------------------------------
# Found by a review of the embeddings readers: an error the user must fix, raised in a Spark task.


def test_an_error_raised_in_a_spark_task_is_one_clear_error_as_in_process(planted, spark, tmp_path, monkeypatch, capsys):
    """--train-sample below --clusters: k-means samples fewer valid vectors than clusters and raises
    SemDedupError. In process that is one line and exit 2; in a Spark task (the k-means task, and as well
    read_embedding_shard's refusal of a misaligned shard in an assign task) it was raised untagged, so it
    reached the driver as a py4j error carrying the worker's traceback, and the CLI printed a traceback
    (exit 1). The same bad input must give the same clear error on either engine (dedup tags its tasks')."""
    from laiontools.cli import main

    monkeypatch.delenv("LAIONTOOLS_SPARK_MASTER", raising=False)
    for engine, extra in (("in-process", ["--spark-above", "-1"]), ("spark", ["--spark-above", "0"])):
        rc = main(["semdedup", "--embeddings", planted["emb"], "--output", str(tmp_path / engine), "--clusters", "8",
                   "--train-sample", "4", *extra])
        err = capsys.readouterr().err
        assert rc == 2 and "Traceback" not in err and "--clusters is 8" in err, (engine, rc, err[-1500:])


# ---------------------------------------------------------------------------------------------
# Found by a review of semdedup, neardup and the galleries (thirty-sixth session).


def test_a_pair_just_over_the_threshold_in_real_numbers_is_linked():
    """"cosine > 1 - eps" was compared in float32 against float32(1 - eps), which rounds up for eps
    0.005, 0.01, 0.02: a pair whose float32 cosine is float32(0.995) = 0.99500000477 (> 0.995) was not
    linked at eps 0.005. At eps 0.05 float32(0.95) rounds down: a cosine of exactly that value is under
    0.95 and stays unlinked."""
    for eps in (0.005, 0.01, 0.02, 0.05, 0.1):
        c = np.float32(1.0 - eps)
        x = np.array([[1.0, 0.0], [c, np.sqrt(1.0 - np.float64(c) ** 2)]], dtype=np.float32)
        assert x[0] @ x[1] == c
        labels, pairs = neardup.cluster_groups(x, [eps])
        linked = float(c) > 1.0 - eps
        assert (labels[0].tolist() == [0, 0]) == linked and pairs[0] == int(linked), (eps, float(c), labels, pairs)
    # and the next float32 down from a value over the threshold is not linked when it is under it
    c = np.nextafter(np.float32(0.995), np.float32(0))
    x = np.array([[1.0, 0.0], [c, np.sqrt(1.0 - np.float64(c) ** 2)]], dtype=np.float32)
    assert neardup.cluster_groups(x, [0.005])[0][0].tolist() == [0, 1]


def test_a_vectors_cluster_and_centroid_similarity_do_not_depend_on_its_batch():
    """assign took faiss's inner products, whose value for a row depends on the batch it is searched
    with (BLAS picks its kernels by the batch's size: at d=512 a row alone or among < 256 differs by an
    ulp from the same row among 300 for ~3 rows in 4). assign_shard searches each shard's valid rows
    together, so two identical images (the commonest duplicate) in a small and a large shard got
    different centroid similarities, and --keep hard kept the one BLAS rounded lower instead of the
    smaller uid; with two near-equal centroids (k-means splitting a cluster of identical vectors) they
    could even land in different clusters, never compared. The similarity is now each row's own."""
    rng = np.random.default_rng(3)
    d = 512
    cents = neardup.normalize(rng.standard_normal((64, d)))
    cents[1] = neardup.normalize(cents[:1] + 3e-7 * rng.standard_normal((1, d)))[0]  # a near-tie of two centroids
    x = neardup.normalize(rng.standard_normal((300, d))).astype(np.float16).astype(np.float32)
    x[:20] = neardup.normalize(cents[0] + 0.02 * rng.standard_normal((20, d))).astype(np.float16)
    cl, sim = neardup.assign(x, cents)
    for i in range(0, 300, 3):
        one = neardup.assign(x[i:i + 1], cents)
        assert (one[0][0], one[1][0]) == (cl[i], sim[i]), i
    best = np.argmax(x.astype(np.float64) @ cents.T.astype(np.float64), axis=1)
    assert (cl == best).all()
    np.testing.assert_allclose(sim, np.einsum("ij,ij->i", x, cents[cl]), atol=1e-6)


def test_a_pool_tar_that_cannot_be_read_leaves_its_images_out_of_the_gallery(planted, tmp_path, monkeypatch, caplog):
    """semdedup reads only embeddings, but its gallery reads pool tars: one missing (the pool moved, a
    shard deleted after embed) failed the finished run with "No such file or directory", a damaged one
    with a tarfile traceback (exit 1), and so did every re-run. dedup's gallery shows such images as
    unavailable and logs why; semdedup's does now, and its results are those of a readable pool."""
    import logging

    from laiontools.contracts.manifest import read_manifest, resolve

    monkeypatch.delenv("LAIONTOOLS_SPARK_MASTER", raising=False)
    shutil.copytree(os.path.dirname(planted["manifest"]), tmp_path / "pool")
    shutil.copytree(planted["emb"], tmp_path / "emb")
    manifest = str(tmp_path / "pool" / os.path.basename(planted["manifest"]))
    model = json.loads((tmp_path / "emb" / "model.json").read_text())
    model["pool"]["manifest"] = manifest  # the copied embeddings are of the copied pool
    (tmp_path / "emb" / "model.json").write_text(json.dumps(model))
    tars = [resolve(manifest, s["path"]) for s in read_manifest(manifest)["shards"]]
    assert all(t.startswith(str(tmp_path)) for t in tars)
    fresh = semdedup.run(_cfg(str(tmp_path / "emb"), str(tmp_path / "fresh"), spark_above=-1))
    assert "image unavailable" not in Path(fresh.outputs["gallery"]).read_text()
    os.remove(tars[1])
    with open(tars[0], "r+b") as f:
        f.truncate(5000)  # cut inside a member
    caplog.set_level(logging.WARNING, logger="laiontools")
    res = semdedup.run(_cfg(str(tmp_path / "emb"), str(tmp_path / "sd"), spark_above=-1))
    html = Path(res.outputs["gallery"]).read_text()
    # the planted groups are all in shards 0 and 1: every member shown, none with an image
    assert html.count("image unavailable") == html.count("<figure") > 0 and "data:image/jpeg;base64," not in html
    assert Path(res.outputs["exclude"]).read_bytes() == Path(fresh.outputs["exclude"]).read_bytes()
    warned = " ".join(r.getMessage() for r in caplog.records)
    assert tars[0] in warned and tars[1] in warned


def test_gallery_candidates_cost_the_members_not_groups_times_rows():
    """Each unit's gallery candidates counted every group's size over the whole cluster (`labels == root`
    per group): 3.5-7.6 s for a cluster of 80k rows in 20k pairs, 4x per doubling (a cluster of 1M rows:
    minutes of a task for 24 groups; measured by hand, not asserted here: no timed assertions). The sizes the
    task already has are used now: the same candidates as the sizes counted here by np.unique give."""
    n, n_pairs = 20_000, 5_000
    labels = np.arange(n)
    labels[1:2 * n_pairs:2] = np.arange(0, 2 * n_pairs, 2)
    labels[10_001:10_005] = 10_000  # one group of 5
    _, inv, sizes = np.unique(labels, return_inverse=True, return_counts=True)
    gsize = sizes[inv]
    members = np.flatnonzero(gsize > 1)
    removed = labels != np.arange(n)
    m = np.zeros(n, dtype=semdedup.META_DTYPE)
    m["row"] = np.arange(n)
    sim = np.linspace(1.0, 0.99, len(members)).astype(np.float32)
    heap: list = []
    semdedup._gallery_candidates(heap, {"gallery_groups": 24, "shards": ["00000"]}, 7, labels, members, labels, removed,
                                 sim, [f"{i:032x}" for i in members], np.zeros(n, np.int32), m, gsize)
    got = [g[-1] for g in sorted(heap, reverse=True)]
    assert [g["group"] for g in got] == ["7-10000"] + [f"7-{r}" for r in range(0, 46, 2)]
    assert got[0]["size"] == 5 and [x["row"] for x in got[0]["members"]] == [10_000, 10_001, 10_002, 10_003, 10_004]
    assert [x["removed"] for x in got[0]["members"]] == [False] + [True] * 4 and got[1]["size"] == 2


def test_on_spark_the_parquet_tasks_write_takes_the_sessions_codec(planted, spark, tmp_path):
    """The parquet files Spark tasks write through pyarrow (embed's metadata and scores, semdedup's
    assignments and reports) are compressed with the session's spark.sql.parquet.compression.codec, as
    Spark's own writer's files are; they were zstd whatever it said."""
    import pyarrow.parquet as pq

    from laiontools.stages import embed as embed_stage

    def codecs(folder: str) -> set[str]:
        files = sorted(Path(folder).glob("*.parquet"))
        assert files, folder
        return {pq.ParquetFile(f).metadata.row_group(0).column(c).compression
                for f in files for c in range(pq.ParquetFile(f).metadata.num_columns)}

    key = "spark.sql.parquet.compression.codec"
    before = spark.conf.get(key)
    spark.conf.set(key, "snappy")
    try:
        emb = str(tmp_path / "emb")
        assert embed_stage.run(embed_stage.EmbedConfig(manifest=planted["manifest"], output=emb, model="lt-tiny", num_workers=0,
                                                       batch_size=32, engine="spark"), spark).ok
        out = str(tmp_path / "sd")
        assert semdedup.run(_cfg(emb, out, gallery_groups=0), spark).details["engine"].startswith("spark ")
    finally:
        spark.conf.set(key, before)
    for folder in (f"{emb}/meta", f"{emb}/scores", f"{out}/assign", f"{out}/report"):
        assert codecs(folder) == {"SNAPPY"}, folder
