"""verify names what differs (tampered/truncated shard, uid file, parent, nesting, schema); inspect summarizes."""

from __future__ import annotations

import json
import os
import shutil
import sys
from pathlib import Path

import pytest

from laiontools.cli import main as cli
from laiontools.contracts import layout
from laiontools.contracts.manifest import new_manifest, read_manifest, resolve, write_manifest
from laiontools.stages import reshard as reshard_stage
from laiontools.stages import subsets as subsets_stage
from laiontools.stages.reshard import ReshardConfig
from laiontools.stages.subsets import SubsetsConfig
from laiontools.stages.verify import inspect_text, verify_manifest

sys.path.insert(0, os.path.dirname(__file__))
from test_subsets import make_scratch_pool


@pytest.fixture(scope="module")
def chain(spark, request, tmp_path_factory) -> dict[str, str]:
    """Pool -> subsets (n-2 ⊃ n//2) -> resharded larger subset; returns their manifest paths."""
    try:
        pool = request.getfixturevalue("pool").manifest
    except pytest.FixtureLookupError:
        pool = make_scratch_pool(str(tmp_path_factory.mktemp("pool")), n=40, per_shard=10)
    n = read_manifest(pool)["num_samples"]
    out = tmp_path_factory.mktemp("subsets")
    big, small = subsets_stage.run(SubsetsConfig(pool=pool, output=str(out), scales=f"{n - 2},{n // 2}", seed=11), spark).details
    rs = tmp_path_factory.mktemp("resharded")
    reshard_stage.run(ReshardConfig(manifest=big["manifest"], output=str(rs), shard_size=max(2, n // 5)), spark)
    return {"pool": pool, "big": big["manifest"], "small": small["manifest"], "resharded": os.path.join(str(rs), layout.RESHARD_MANIFEST)}


def test_everything_verifies(chain, capsys):
    for name in ("pool", "big", "small", "resharded"):
        res = verify_manifest(chain[name])
        assert res.ok, (name, res.problems)
    assert any("nesting: all" in c for c in verify_manifest(chain["small"]).checked)
    assert cli(["verify", "-v", chain["resharded"], chain["small"]]) == 0
    out = capsys.readouterr().out
    assert out.count("OK ") == 2 and "sha256 ok" in out


def _copy_resharded(chain: dict[str, str], dst) -> str:
    src = os.path.dirname(chain["resharded"])
    shutil.copytree(src, dst)
    return os.path.join(str(dst), layout.RESHARD_MANIFEST)


def test_tampered_and_truncated_shards_are_named(chain, tmp_path, capsys):
    m = _copy_resharded(chain, tmp_path / "rs")
    shards = read_manifest(m)["shards"]
    s0 = os.path.join(str(tmp_path / "rs"), shards[0]["path"])
    s1 = os.path.join(str(tmp_path / "rs"), shards[1]["path"])
    with open(s0, "r+b") as f:  # flip one byte inside the first member's data (after its 512-byte header)
        f.seek(600)
        b = f.read(1)
        f.seek(600)
        f.write(bytes([b[0] ^ 0xFF]))
    with open(s1, "r+b") as f:
        f.truncate(os.path.getsize(s1) // 2)
    assert cli(["verify", m]) == 1
    out = capsys.readouterr().out
    lines = [ln for ln in out.splitlines() if "DIFFERS" in ln]
    assert any(shards[0]["path"] in ln and "sha256" in ln for ln in lines), out
    assert any(shards[1]["path"] in ln and "truncated" in ln and "bytes, manifest says" in ln for ln in lines), out
    assert not any(shards[2]["path"] in ln for ln in lines), "an intact shard must not be reported"


def _resharded_on_copied_subset(chain: dict[str, str], tmp_path) -> tuple[str, str]:
    """A copy of the resharded folder whose manifest references a copy of the subset's uid file (as a
    reshard of that copy would): (manifest, referenced uid file), both safe to damage."""
    m = _copy_resharded(chain, tmp_path / "rs")
    doc = read_manifest(m)
    uids = str(tmp_path / "subset.uids.npy")
    shutil.copyfile(doc["uids"]["path"], uids)
    doc["uids"]["path"] = uids
    write_manifest(m, doc)
    return m, uids


def test_resharded_manifest_references_the_subsets_uid_file_by_sha256(chain, tmp_path):
    """No copy of the uid file in the resharded folder: verify reads the subset's, checking its sha256."""
    doc = read_manifest(chain["resharded"])
    big = read_manifest(chain["big"])
    assert doc["uids"]["path"] == os.path.join(os.path.dirname(chain["big"]), big["uids"]["path"])
    assert doc["uids"]["sha256"] == big["uids"]["sha256"]
    assert not os.path.exists(os.path.join(os.path.dirname(chain["resharded"]), layout.RESHARD_UIDS))
    res = verify_manifest(chain["resharded"])
    assert res.ok and any(doc["uids"]["path"] in c and "sha256 ok" in c for c in res.checked), res.checked

    # the referenced file changed after the reshard (another subset written over it): named by verify
    m, uids = _resharded_on_copied_subset(chain, tmp_path)
    assert verify_manifest(m).ok
    small_uids = os.path.join(os.path.dirname(chain["small"]), read_manifest(chain["small"])["uids"]["path"])
    shutil.copyfile(small_uids, uids)
    probs = verify_manifest(m).problems
    assert any(uids in p and "sha256" in p for p in probs), probs
    # ... or is gone
    os.remove(uids)
    probs = verify_manifest(m).problems
    assert any(uids in p for p in probs), probs


def test_resharded_folder_with_a_copied_uid_file_stays_readable(chain, tmp_path):
    """Folders written before the reference kept a copy, <dir>/uids.npy, named relative to the manifest."""
    m = _copy_resharded(chain, tmp_path / "old")
    doc = read_manifest(m)
    shutil.copyfile(doc["uids"]["path"], str(tmp_path / "old" / layout.RESHARD_UIDS))
    doc["uids"]["path"] = layout.RESHARD_UIDS
    write_manifest(m, doc)
    res = verify_manifest(m)
    assert res.ok, res.problems
    assert any(str(tmp_path / "old" / layout.RESHARD_UIDS) in c and "sha256 ok" in c for c in res.checked), res.checked
    # a copy that differs from the recorded sha256 is named, as before
    small_uids = os.path.join(os.path.dirname(chain["small"]), read_manifest(chain["small"])["uids"]["path"])
    shutil.copyfile(small_uids, str(tmp_path / "old" / layout.RESHARD_UIDS))
    probs = verify_manifest(m).problems
    assert any("uid file" in p and "sha256" in p for p in probs)
    assert any("sample uids not in the uid file" in p for p in probs)


def test_uid_file_parent_and_nesting(chain, spark, tmp_path):
    # uid file swapped for another subset's: sha256 and count differ, and shard uids are missing from it
    m, uids = _resharded_on_copied_subset(chain, tmp_path)
    small_uids = os.path.join(os.path.dirname(chain["small"]), read_manifest(chain["small"])["uids"]["path"])
    shutil.copyfile(small_uids, uids)
    probs = verify_manifest(m).problems
    assert any("uid file" in p and "sha256" in p for p in probs)
    assert any("sample uids not in the uid file" in p for p in probs)

    # parent manifest changed after the child was written
    sub = tmp_path / "sub"
    shutil.copytree(os.path.dirname(chain["big"]), sub)
    small, big = str(sub / os.path.basename(chain["small"])), str(sub / os.path.basename(chain["big"]))
    doc = json.loads(Path(big).read_text())
    doc["selection"]["seed"] = 12345
    write_manifest(big, doc)
    assert any("parent manifest" in p and "differs from the recorded" in p for p in verify_manifest(small).problems)

    # a "child" whose uids are not all in its parent (big's uids, parent = small)
    sm = read_manifest(small)
    bm = read_manifest(big)
    from laiontools.contracts.manifest import manifest_sha256

    bad = new_manifest(
        name="not-nested", kind="subset", num_samples=bm["num_samples"], target_samples=bm["num_samples"],
        uids={**bm["uids"]}, shards=[], source_fingerprint=bm["source"]["fingerprint"],
        parent={"name": sm["name"], "sha256": manifest_sha256(small), "path": os.path.basename(small)}, command=["test"],
    )
    write_manifest(str(sub / "bad.manifest.json"), bad)
    n_out = bm["num_samples"] - sm["num_samples"]
    local = verify_manifest(str(sub / "bad.manifest.json"))
    assert any(f"nesting: {n_out} of {bm['num_samples']} uids are not in parent" in p for p in local.problems)
    # on Spark: the two uid files streamed for their checks, the nesting a join of the two read by tasks
    on_spark = verify_manifest(str(sub / "bad.manifest.json"), spark=spark)
    assert (on_spark.problems, on_spark.checked) == (local.problems, local.checked)
    assert verify_manifest(small, spark=spark).problems == verify_manifest(small).problems


def _shard_uids(path: str) -> list[str]:
    """The .json uid of every sample of a tar, in order, read with tarfile (not verify's reader)."""
    import tarfile

    with tarfile.open(path) as tf:
        return [json.loads(tf.extractfile(ti).read())["uid"] for ti in tf.getmembers() if ti.name.endswith(".json")]


@pytest.mark.parametrize("how", ["joins", "driver"])
def test_uid_checks_across_shards_find_the_same_on_spark(chain, spark, tmp_path, monkeypatch, how):
    """The checks of the shards' uids against the uid file (none outside it, none twice, none of it in no
    shard) and against the parent's, made in process and with the shards read on Spark: there, above
    SPARK_JOIN_ABOVE_UIDS (forced here), as Spark joins with the uid files read by tasks in pieces of 4
    uids; up to it, in the driver from the tasks' packed uids. Both stream the uid files (pieces of 4
    uids). The same findings every way, each the one planted (counts and first uids computed here from
    the tars, not by verify)."""
    from laiontools.contracts import uids as uids_mod
    from laiontools.contracts.uids import save_uids
    from laiontools.core.storage import sha256_file
    from laiontools.stages import verify as verify_mod

    monkeypatch.setattr(uids_mod, "UID_ROWS_PER_TASK", 4)
    monkeypatch.setattr(uids_mod, "UID_SCAN_BYTES", 64)
    if how == "joins":
        monkeypatch.setattr(verify_mod, "SPARK_JOIN_ABOVE_UIDS", 0)
    joins, frame = [], uids_mod.uid_file_frame
    monkeypatch.setattr(uids_mod, "uid_file_frame", lambda *a, **k: joins.append(a[1]) or frame(*a, **k))  # the files read by tasks
    m, uid_path = _resharded_on_copied_subset(chain, tmp_path)
    root = os.path.dirname(m)
    doc = read_manifest(m)
    per_shard = [_shard_uids(os.path.join(root, s["path"])) for s in doc["shards"]]
    assert len(per_shard) >= 3 and all(len(u) >= 2 for u in per_shard)
    dropped = [per_shard[1][0], per_shard[2][-1]]  # in the shards, not in the file: "not in the uid file"
    planted = [_uid(3), _uid(1), _uid(2)]  # in the file, in no shard (they sort first: the first is _uid(1))
    # a copy of shard 0 listed as one more shard: each of its uids in two samples
    shutil.copyfile(os.path.join(root, doc["shards"][0]["path"]), os.path.join(root, "shards", "copy.tar"))
    # a shard whose one .json uid is not lowercase hex, and one uid the file does not hold
    odd, outside = per_shard[0][0].upper(), "f" * 32
    _tar(os.path.join(root, "shards", "odd.tar"), [("a.jpg", b"x"), ("a.json", json.dumps({"uid": odd}).encode()),
                                                   ("b.jpg", b"x"), ("b.json", json.dumps({"uid": outside}).encode())])
    for name, n in (("copy.tar", len(per_shard[0])), ("odd.tar", 2)):
        sha, size = sha256_file(os.path.join(root, "shards", name))
        doc["shards"].append({"path": f"shards/{name}", "num_samples": n, "bytes": size, "sha256": sha})
    file_uids = sorted({u for s in per_shard for u in s} - set(dropped)) + planted
    sha, count = save_uids(uid_path, file_uids)
    doc["uids"].update(sha256=sha, count=count)
    write_manifest(m, doc)

    local, on_spark = verify_manifest(m), verify_manifest(m, spark=spark)
    assert (on_spark.problems, on_spark.checked) == (local.problems, local.checked)
    pp = resolve(m, doc["parent"]["path"])
    parent_uids = resolve(pp, read_manifest(pp)["uids"]["path"])
    assert joins == ([uid_path, uid_path, parent_uids] if how == "joins" else [])
    sp = [os.path.join(root, s["path"]) for s in doc["shards"]]
    want = [
        f"shard {sp[1]}: 1 sample uids not in the uid file (e.g. {dropped[0]})",
        f"shard {sp[2]}: 1 sample uids not in the uid file (e.g. {dropped[1]})",
        (f"shard {sp[-1]}: 1 samples whose .json uid is not a uid of 32 lowercase hex chars (e.g. a: {odd!r}); "
         f"1 sample uids not in the uid file (e.g. {outside})"),
        f"{len(per_shard[0])} uids appear in more than one sample across the shards",
        f"3 uids of the uid file {uid_path} are in no shard (e.g. {_uid(1)})",
    ]
    n = len(file_uids)
    assert local.problems == [f"manifest {m}: num_samples {doc['num_samples']} but the uid file count is {n}", *want,
                              (f"shards hold {doc['num_samples'] + len(per_shard[0]) + 2} samples, manifest num_samples is "
                               f"{doc['num_samples']}"),
                              # (the parent's uid file, read the same way, lacks the planted uids)
                              f"nesting: 3 of {n} uids are not in parent {resolve(m, doc['parent']['path'])}"], local.problems


def test_unknown_schema_version_and_missing_files(chain, tmp_path, capsys):
    doc = json.loads(Path(chain["small"]).read_text())
    doc["schema_version"] = "2.0"
    p = tmp_path / "future.manifest.json"
    p.write_text(json.dumps(doc))
    assert cli(["verify", str(p)]) == 1
    assert "schema_version '2.0' is not one this laiontools knows" in capsys.readouterr().out
    assert cli(["inspect", str(p)]) == 2
    assert "schema_version '2.0'" in capsys.readouterr().err
    m = _copy_resharded(chain, tmp_path / "rs")
    first = read_manifest(m)["shards"][0]["path"]
    os.remove(os.path.join(str(tmp_path / "rs"), first))
    assert any(first in x and "missing" in x for x in verify_manifest(m).problems)


def test_inspect(chain, capsys):
    assert cli(["inspect", chain["small"], chain["resharded"]]) == 0
    out = capsys.readouterr().out
    sm = read_manifest(chain["small"])
    assert f"{sm['num_samples']:,} of target {sm['target_samples']:,}" in out
    assert "funnel" in out and "eligible" in out and "seed 11" in out
    assert "shards: none (run `laiontools reshard`" in out
    rm = read_manifest(chain["resharded"])
    assert f"shards: {len(rm['shards'])}," in out and rm["shards"][0]["path"] in out
    assert inspect_text(chain["resharded"]).startswith(rm["name"])


def test_spark_path_finds_what_the_single_process_path_finds(chain, spark, tmp_path, capsys):
    """verify on Spark (--master, or above --spark-above shards): same findings, same exit codes."""
    m = _copy_resharded(chain, tmp_path / "rs")
    # intact: both paths OK, exit 0
    assert verify_manifest(m, spark=spark).ok and verify_manifest(m).ok
    assert cli(["verify", "--master", "local[2]", m]) == 0
    shards = read_manifest(m)["shards"]
    s0 = os.path.join(str(tmp_path / "rs"), shards[0]["path"])
    with open(s0, "r+b") as f:  # flip one byte of the first member's data
        f.seek(600)
        b = f.read(1)
        f.seek(600)
        f.write(bytes([b[0] ^ 0xFF]))
    os.remove(os.path.join(str(tmp_path / "rs"), shards[-1]["path"]))
    local, on_spark = verify_manifest(m), verify_manifest(m, spark=spark)
    assert on_spark.problems == local.problems and on_spark.checked == local.checked
    assert any(shards[0]["path"] in p and "sha256" in p for p in local.problems), local.problems
    assert any(shards[-1]["path"] in p and "missing" in p for p in local.problems), local.problems
    assert not any(shards[1]["path"] in p for p in local.problems)
    capsys.readouterr()
    assert cli(["verify", m]) == 1
    out_local = capsys.readouterr().out
    assert cli(["verify", "--spark-above", "0", m]) == 1  # every manifest on Spark (the session's)
    assert capsys.readouterr().out == out_local
    assert cli(["verify", "--master", "local[2]", m]) == 1
    assert capsys.readouterr().out == out_local


def test_a_pools_catalog_is_checked(chain, tmp_path):
    """verify on a pool also checks its catalog: present, not left mid-swap by a killed rebuild, and
    its success rows are the manifest's samples (counted here with pandas, independently)."""
    import shutil

    import pandas as pd

    from laiontools.contracts import schema as C
    from laiontools.core.storage import _swap_journal, write_json

    src = os.path.dirname(chain["pool"])
    pool = str(tmp_path / "pool")
    shutil.copytree(src, pool, ignore=shutil.ignore_patterns("*.tar"))
    mp = os.path.join(pool, os.path.basename(chain["pool"]))
    cat = os.path.join(pool, layout.CATALOG_DIR)
    n = int((pd.read_parquet(cat)[C.STATUS] == C.STATUS_SUCCESS).sum())
    assert n == read_manifest(mp)["num_samples"] > 0
    res = verify_manifest(mp, check_shards=False)
    assert res.ok and any(f"catalog {cat}: {n} success rows" in c for c in res.checked), res.problems
    # one success row fewer (a catalog from another run)
    df = pd.read_parquet(cat)
    first = df.index[df[C.STATUS] == C.STATUS_SUCCESS][0]
    df.loc[first, C.STATUS] = "failed_download"
    shutil.rmtree(cat)
    os.makedirs(cat)
    df.to_parquet(os.path.join(cat, "part-00000.parquet"))
    assert verify_manifest(mp, check_shards=False).problems == [f"catalog {cat}: {n - 1} success rows, the manifest has {n} samples"]
    write_json(_swap_journal(cat), {"phase": "old-whole", "old": None, "tmp": None})
    assert "a rebuild of it is under way or was killed midway" in verify_manifest(mp, check_shards=False).problems[0]
    os.remove(_swap_journal(cat))
    shutil.rmtree(cat)
    assert verify_manifest(mp, check_shards=False).problems == [f"catalog {cat}: missing"]


def _copy_pool(chain: dict[str, str], dest) -> str:
    """A copy of the pool folder (shards included), safe to damage; returns its manifest path."""
    shutil.copytree(os.path.dirname(chain["pool"]), str(dest))
    return os.path.join(str(dest), os.path.basename(chain["pool"]))


def test_a_pool_with_a_shard_dropped_from_its_list_is_named(chain, tmp_path):
    """A pool's uid file lists its samples (download writes the success uids): uids found in no shard are a problem."""
    from laiontools.contracts.uids import array_to_uids, load_uids

    mp = _copy_pool(chain, tmp_path / "pool")
    assert verify_manifest(mp, check_parent=False).ok
    doc = read_manifest(mp)
    dropped = doc["shards"].pop(0)
    write_manifest(mp, doc)
    res = verify_manifest(mp, check_parent=False)
    gone = [ln for ln in res.problems if "are in no shard" in ln]
    assert gone and gone[0].startswith(f"{dropped['num_samples']} uids of the uid file "), res.problems
    example = gone[0].split("(e.g. ")[1].rstrip(")")
    assert example in set(array_to_uids(load_uids(os.path.join(os.path.dirname(mp), doc["uids"]["path"]), mmap=False)))
    doc["shards"] = []  # no shard listed at all: every uid is missing
    write_manifest(mp, doc)
    assert any(ln.startswith(f"{doc['num_samples']} uids of the uid file") for ln in verify_manifest(mp, check_parent=False).problems)


def test_a_damaged_or_odd_shard_is_one_problem_and_the_rest_is_checked(chain, tmp_path):
    """A shard that is not a regular file (/dev/zero would hang, a folder aborted) or a damaged tar is named
    once; verify and --removal-list go on with the other shards."""
    from laiontools.contracts.removal import parse_removal_list
    from laiontools.stages.verify import check_removal_list

    mp = _copy_pool(chain, tmp_path / "pool")
    doc = read_manifest(mp)
    assert len(doc["shards"]) >= 3
    s2 = os.path.join(os.path.dirname(mp), doc["shards"][2]["path"])
    with open(s2, "wb") as f:
        f.write(b"hello" * 10)
    doc["shards"][0]["path"] = "/dev/zero"
    doc["shards"][1]["path"] = os.path.dirname(s2)  # a folder
    write_manifest(mp, doc)
    res = verify_manifest(mp, check_parent=False)
    shard_lines = [ln for ln in res.problems if ln.startswith("shard ")]
    assert shard_lines[:2] == ["shard /dev/zero: not a regular file", f"shard {os.path.dirname(s2)}: not a regular file"], res.problems
    assert any(ln.startswith(f"shard {s2}: ") and "unreadable" in ln for ln in shard_lines), res.problems
    assert len(shard_lines) == 3 and len(res.checked) > 1, res.problems  # the other shards were checked
    rl = parse_removal_list("md5 " + "0" * 32 + "\n", "list.txt")
    res = verify_manifest(mp, check_shards=False, check_parent=False)
    check_removal_list(mp, rl, res)
    lines = [ln for ln in res.problems if ln.startswith("removal list check")]
    assert len(lines) == 3 and "could not be checked against the list: unreadable" in lines[2], lines


def test_inspect_prints_odd_values_of_an_edited_manifest(chain, tmp_path):
    mp = str(tmp_path / "m.json")
    doc = read_manifest(chain["pool"])
    doc.update(selection={"seed": 1, "funnel": [{"step": "x", "removed": "5", "remaining": 3}], "exclusions": ["dedup/x"]},
               reshard=[1, 2])
    with open(mp, "w") as f:
        json.dump(doc, f)
    text = inspect_text(mp)
    assert "exclude             dedup/x" in text and "reshard: [1, 2]" in text
    assert any(ln.split()[:3] == ["x", "5", "3"] for ln in text.splitlines()), text


def test_shard_entries_checked_apart_from_the_schema_get_the_schemas_verdict():
    """Manifest shard entries are checked by hand (the schema's walk cost ~30 us an entry: seconds for a 2B
    pool's ~200k); an entry that check does not pass goes to the schema itself, so every entry gets the
    schema's verdict and message. jsonschema, called directly on the whole manifest, is the reference."""
    import copy
    import hashlib

    import jsonschema

    from laiontools.contracts.schema import ManifestError, manifest_schema_doc, validate_manifest

    sha = hashlib.sha256(b"x").hexdigest()
    good = new_manifest(name="p", kind="pool", num_samples=6, target_samples=None, uids={"path": "u.npy", "sha256": sha, "count": 6},
                        shards=[{"path": f"shards/{i:05d}.tar", "num_samples": 2, "bytes": 10240, "sha256": sha} for i in range(3)],
                        source_fingerprint=sha, catalog={"path": "catalog"}, command=["t"])
    variants = [{}, {"num_samples": -1}, {"num_samples": 3.0}, {"num_samples": 2.5}, {"bytes": True}, {"bytes": "10"},
                {"sha256": sha.upper()}, {"sha256": sha + "\n"}, {"sha256": sha[:-1]}, {"path": 7}, {"path": None}, {"extra": [1]}]
    removals = ["path", "num_samples", "bytes", "sha256"]
    validator = jsonschema.Draft202012Validator(manifest_schema_doc())
    for change in variants + [None] * len(removals):
        m = copy.deepcopy(good)
        if change is None:
            del m["shards"][1][removals.pop()]
        else:
            m["shards"][1].update(change)
        want = sorted(validator.iter_errors(m), key=lambda e: list(e.path))
        if not want:
            validate_manifest(m)
            continue
        with pytest.raises(ManifestError) as err:
            validate_manifest(m)
        loc = "/".join(str(p) for p in want[0].path)
        assert f"invalid manifest at {loc}: {want[0].message}" in str(err.value), (change, err.value)
    m = copy.deepcopy(good)
    m["shards"][2] = ["not", "an", "entry"]
    with pytest.raises(ManifestError, match=r"at shards/2: \['not', 'an', 'entry'\] is not of type 'object'"):
        validate_manifest(m)


def _tar(path, members: list[tuple[str, bytes]], gz: bool = False) -> str:
    """A tar (gzip-compressed with `gz`) holding `members` as written, in order."""
    import io
    import tarfile

    with tarfile.open(path, "w:gz" if gz else "w", format=tarfile.USTAR_FORMAT) as tf:
        for name, data in members:
            ti = tarfile.TarInfo(name)
            ti.size = len(data)
            tf.addfile(ti, io.BytesIO(data))
    return str(path)


def _uid(i: int) -> str:
    return f"{i:032x}"


@pytest.mark.parametrize("doc, kind", [(b"[1,2,3]", "array"), (b'"s"', "string"), (b"null", "null"), (b"3", "number")])
def test_a_json_that_is_not_an_object_is_a_finding_not_a_crash(tmp_path, doc, kind):
    # (walk F1) valid JSON that is not an object: verify crashed with AttributeError on .get
    from laiontools.stages.verify import scan_shard

    path = _tar(tmp_path / "00000.tar", [("a.jpg", b"x"), ("a.json", json.dumps({"uid": _uid(1)}).encode()),
                                         ("b.jpg", b"x"), ("b.json", doc)])
    keys, uids, problems = scan_shard(path)
    assert keys == ["a", "b"] and uids == [_uid(1), ""]
    assert problems == [f"b.json is not an object (a JSON {kind})"]


def test_a_sample_with_two_members_of_one_extension_is_a_finding(tmp_path):
    # (walk F18) reshard refuses a second 0000107.jpg in a sample and embed takes the last copy; verify said nothing
    from laiontools.stages.verify import scan_shard

    j = json.dumps({"uid": _uid(1)}).encode()
    path = _tar(tmp_path / "00000.tar", [("a.jpg", b"x"), ("a.JPG", b"y"), ("a.json", j)])
    keys, _, problems = scan_shard(path)
    assert keys == ["a"] and len(problems) == 1 and "a second a.JPG" in problems[0], problems
    ok = _tar(tmp_path / "00001.tar", [("a.jpg", b"x"), ("a.json", j), ("b.jpg", b"y"), ("b.json", json.dumps({"uid": _uid(2)}).encode())])
    assert scan_shard(ok)[2] == []


def test_a_gzip_compressed_shard_is_named_as_such_not_as_truncated(tmp_path):
    # (walk F17) a whole gzip tar under a .tar name was "truncated or unreadable tar (ReadError: invalid header)"
    from laiontools.stages.verify import scan_shard

    path = _tar(tmp_path / "00000.tar", [("a.jpg", b"x"), ("a.json", json.dumps({"uid": _uid(1)}).encode())], gz=True)
    assert scan_shard(path) == ([], [], ["is a gzip-compressed tar; webdataset pool shards must be plain tars (decompress it)"])


def test_a_cut_uid_file_is_named_from_its_header_not_read_whole(tmp_path, monkeypatch):
    # A uid file cut short (a copy that stopped) or emptied: both paths of the check (in process, and the
    # streamed one of the Spark path) name it in the same words, from the file's header and size; neither
    # reads it whole for that (a cut 2B uid file is 32 GB). Reads of whole uid files are counted on the real
    # load_uids.
    import re

    import numpy as np

    from laiontools.contracts import uids as uids_mod
    from laiontools.contracts.uids import save_uids, uids_to_array
    from laiontools.stages.verify import VerifyResult, _check_uid_file

    path = str(tmp_path / "cut.uids.npy")
    sha, _ = save_uids(path, np.sort(uids_to_array([f"{i * 7919:032x}" for i in range(22)])))
    with open(path, "r+b") as f:
        f.truncate(os.path.getsize(path) - 8)  # 21.5 uids left
    empty = str(tmp_path / "empty.uids.npy")
    open(empty, "wb").close()
    loads = []
    real = uids_mod.load_uids
    monkeypatch.setattr(uids_mod, "load_uids", lambda *a, **k: loads.append(a[0]) or real(*a, **k))
    for f, words in ((path, r"holds 344 bytes of uids, its header says 22 uids \(352 bytes\)"), (empty, "uid file is empty")):
        found = []
        for load in (True, False):
            res = VerifyResult(f)
            assert _check_uid_file(f, sha, 22, "uid file", res, load=load) is None
            found.append([p for p in res.problems if "unreadable" in p])
        assert found[0] == found[1] and len(found[0]) == 1 and re.search(words, found[0][0]), found
    assert loads == []


def test_a_shard_that_cannot_be_opened_is_one_problem_and_the_rest_is_checked(chain, tmp_path, monkeypatch, capsys):
    """A shard verify may not read (mode 0600, another owner, on a shared dataset; or EIO from a failing
    disk) is a finding like a damaged tar (scan_shard catches OSError), but check_shard's sha256_file
    comes first, outside any handler: verify_manifest raises, the other shards are never checked, and
    `laiontools verify` ends in a PermissionError traceback instead of exit 1 naming the shard."""
    import builtins
    import errno

    m = _copy_resharded(chain, tmp_path / "rs")
    shards = read_manifest(m)["shards"]
    bad = os.path.realpath(os.path.join(str(tmp_path / "rs"), shards[0]["path"]))
    real_open = builtins.open

    def guarded_open(file, *a, **kw):  # what open() does on a file this user may not read
        if isinstance(file, str) and os.path.realpath(file) == bad:
            raise PermissionError(errno.EACCES, "Permission denied", file)
        return real_open(file, *a, **kw)

    monkeypatch.setattr(builtins, "open", guarded_open)
    res = verify_manifest(m, check_parent=False)
    shard_lines = [p for p in res.problems if p.startswith("shard ")]
    assert len(shard_lines) == 1 and shards[0]["path"] in shard_lines[0], res.problems
    assert sum(c.startswith("shard ") for c in res.checked) == len(shards) - 1
    capsys.readouterr()
    assert cli(["verify", "--no-parent", m]) == 1
    assert shards[0]["path"] in capsys.readouterr().out


def test_a_sha256_with_a_trailing_newline_is_not_a_sha256():
    """The schema's sha256 is ^[0-9a-f]{64}$, and Python's $ (jsonschema matches with re.search) also
    matches before a final newline: a manifest whose uid file or parent sha256 ends in "\\n" passed
    validation, and verify then said the (sound) file "changed or damaged"."""
    import hashlib

    from laiontools.contracts.schema import ManifestError, validate_manifest

    sha = hashlib.sha256(b"x").hexdigest()
    m = new_manifest(name="p", kind="pool", num_samples=0, target_samples=None, uids={"path": "u.npy", "sha256": sha + "\n", "count": 0},
                     shards=[], source_fingerprint=sha, command=["t"])
    with pytest.raises(ManifestError, match="invalid manifest at uids/sha256"):
        validate_manifest(m)
    validate_manifest({**m, "uids": {**m["uids"], "sha256": sha}})
    with pytest.raises(ManifestError, match="invalid manifest at parent/sha256"):
        validate_manifest({**m, "uids": {**m["uids"], "sha256": sha}, "parent": {"name": "q", "sha256": sha + "\n"}})


def test_a_catalog_row_count_the_manifest_misstates_is_named(tmp_path):
    """catalog.num_rows chooses later stages' engines and catalog partitions (takedown, subsets): a manifest
    whose count lied passed verify. The rows are counted here with pandas, independently."""
    import pandas as pd
    from test_subsets import make_scratch_pool

    mp = make_scratch_pool(str(tmp_path / "pool"), n=20, per_shard=10, failures=3)
    cat = os.path.join(str(tmp_path / "pool"), layout.CATALOG_DIR)
    n = len(pd.read_parquet(cat))
    assert n == 23
    doc = read_manifest(mp)
    doc["catalog"]["num_rows"] = n
    write_manifest(mp, doc)
    assert verify_manifest(mp).ok, verify_manifest(mp).problems
    doc["catalog"]["num_rows"] = n + 1000
    write_manifest(mp, doc)
    assert verify_manifest(mp).problems == [f"catalog {cat}: {n} rows, the manifest says {n + 1000}"]


def test_a_removal_list_check_of_an_unreadable_manifest_is_a_finding_and_the_rest_is_checked(tmp_path, capsys):
    """verify --removal-list re-read each manifest without the guard verify_manifest has: an unreadable one
    was an error (exit 2) with no FAIL line, and the manifests after it were never checked."""
    from test_subsets import make_scratch_pool

    good = make_scratch_pool(str(tmp_path / "pool"), n=20, per_shard=10, failures=0)
    bad = tmp_path / "bad.manifest.json"
    bad.write_text("{not json")
    lst = tmp_path / "list.txt"
    lst.write_text(f"uid {'0' * 32}\n")
    assert cli(["verify", "--removal-list", str(lst), str(bad), good]) == 1
    out = capsys.readouterr().out
    assert f"FAIL {bad}" in out and "is not valid JSON" in out and f"OK   {good}" in out
    assert out.count("DIFFERS") == 1


def _tars_good_and_damaged() -> dict[str, bytes]:
    """Tars as verify meets them: intact (ustar, pax, a GNU long name, a folder member; bytes after the end of the
    archive, which tar readers pass over and the sha256 catches), and damaged (cut in a member, cut at a header,
    no end-of-archive marker, a garbled header, gzip, empty)."""
    import gzip
    import io
    import tarfile

    def tar(members: list[tuple[str, bytes]], fmt: int = tarfile.PAX_FORMAT, folder: bool = False) -> bytes:
        buf = io.BytesIO()
        with tarfile.open(fileobj=buf, mode="w", format=fmt) as tf:
            if folder:
                ti = tarfile.TarInfo("sub")
                ti.type = tarfile.DIRTYPE
                tf.addfile(ti)
            for name, data in members:
                ti = tarfile.TarInfo(name)
                ti.size, ti.mtime = len(data), 1_700_000_000.5  # a fractional mtime: a pax header each
                tf.addfile(ti, io.BytesIO(data))
        return buf.getvalue()

    rng = __import__("random").Random(0)
    members = [(f"{i:06d}.{ext}", rng.randbytes(rng.randrange(1, 3000)) if ext == "jpg" else
                json.dumps({"uid": f"{i:032x}"}).encode() if ext == "json" else b"a caption")
               for i in range(30) for ext in ("jpg", "json", "txt")]
    good = tar(members)
    with tarfile.open(fileobj=io.BytesIO(good)) as tf:
        at = tf.getmembers()[4].offset  # the fifth member's (pax) header
    long_name = tar([("x" * 120 + ".jpg", b"img"), ("x" * 120 + ".json", b'{"uid": "' + b"a" * 32 + b'"}')], tarfile.GNU_FORMAT)
    return {
        "pax": good, "ustar": tar(members, tarfile.USTAR_FORMAT, folder=True), "gnu long name": long_name,
        "cut in a member": good[: len(good) // 2 + 100], "cut at a header": good[:1536],
        "no end marker": good.rstrip(b"\0"),
        "bytes after the end": good + b"trailing junk" * 100, "garbled header": good[:at] + b"\x07" * 512 + good[at + 512 :],
        "gzip": gzip.compress(good, mtime=0), "empty": b"",
    }


def test_one_read_of_a_shard_finds_what_two_reads_found(tmp_path, monkeypatch):
    """verify reads each shard once, hashing the bytes as tarfile reads them (verify.read_shard). On every tar
    here, intact or damaged, it gives the sha256, size, samples, uids and problems that reading the shard twice
    gives (the whole file's sha256 by hashlib, then verify.scan_shard), without falling back to a second read; and
    where it must fall back (tarfile stepping back further than the reader keeps), the same again."""
    import hashlib

    from laiontools.stages import verify as V

    for name, data in _tars_good_and_damaged().items():
        p = tmp_path / f"{name.replace(' ', '-')}.tar"
        p.write_bytes(data)
        want = (hashlib.sha256(data).hexdigest(), len(data), *V.scan_shard(str(p)))
        got = V.read_shard(str(p))
        assert got == want, name
        if name in ("pax", "ustar", "gnu long name", "bytes after the end"):
            assert got[2] and got[4] == [], (name, got[4])  # the test's premise: the intact ones read clean
        else:
            assert got[4], name  # and the damaged ones are found
        with open(p, "rb") as f:  # no step back past the reader's memory on any of them
            r = V._HashedReads(f)
            V._scan_tar(r, str(p))
            assert r.finish() == want[:2], name
    # a reader that keeps nothing to step back into (as a tar tarfile reads backwards would find it): the shard is
    # read twice, as before, with the same answers
    from collections import deque

    real_init = V._HashedReads.__init__

    def forgetful(self, f):
        real_init(self, f)
        self._recent = deque(maxlen=0)

    monkeypatch.setattr(V._HashedReads, "__init__", forgetful)
    for name, data in _tars_good_and_damaged().items():
        p = tmp_path / f"{name.replace(' ', '-')}.tar"
        if name not in ("empty", "gzip"):  # the premise: this reader cannot take the scan's first step back
            # (to byte 0, after reading the magic; a gzip or empty shard is found before any step back)
            with pytest.raises(V._NotOnePass), open(p, "rb") as f:
                V._scan_tar(V._HashedReads(f), str(p))
        assert V.read_shard(str(p)) == (hashlib.sha256(data).hexdigest(), len(data), *V.scan_shard(str(p))), name
