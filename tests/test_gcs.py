"""gs:// end to end, against a GCS JSON API server (gcp-storage-emulator) on 127.0.0.1.

conftest.py names the server in the environment (STORAGE_EMULATOR_HOST, as users of an emulator do)
before Spark starts; the stages get nothing but ``gs://`` paths, through gcsfs, the client users install.
The s3:// tests (test_s3.py) cover every stage and the store's faults; these show that the same layer
serves Google's protocol: download (source and pool in the bucket, the catalog mapped to its shards),
verify on both paths, subsets, reshard, embed and dedup, each equal to the same run on local disk, and
train reading the resharded shards from the bucket; and what gcsfs itself gets wrong against an emulator
or in a process that opened gs:// before laiontools was imported.
"""

from __future__ import annotations

import dataclasses
import hashlib
import os
import re
import sys
import uuid

import pandas as pd
import pytest

from laiontools.core.storage import read_json, sha256_file, url_to_fs, write_json
from laiontools.testing.stores import (
    catalog_rows,
    check_reshard_killed_resumes,
    check_same_embeddings,
    check_verify_names_a_flipped_byte,
    members,
)

pytest.importorskip("gcp_storage_emulator.server", reason="gs:// tests need gcp-storage-emulator (the test extra)")
pytest.importorskip("gcsfs", reason="gs:// tests need gcsfs (the test extra)")


@pytest.fixture(scope="module")
def gcs_server():
    """The GCS API server for this module (it counts the object reads it answers)."""
    from laiontools.testing.gcsserver import GCSServer

    port = os.environ["LAIONTOOLS_TEST_GCS_PORT"]  # reserved by conftest.py
    if os.environ.get("STORAGE_EMULATOR_HOST") != f"http://127.0.0.1:{port}":
        pytest.skip("STORAGE_EMULATOR_HOST was set outside the tests; not starting a test server there")
    with GCSServer(int(port)) as server:
        yield server


@pytest.fixture(scope="module")
def gcs(gcs_server):
    """The gcsfs client every stage gets for gs://."""
    return url_to_fs("gs://any")[0]


def test_a_shard_read_member_by_member_costs_a_get_per_block_not_per_read(gcs, gcs_server):
    """verify, embed and the trainer read a shard's tar member by member (a read per header and per
    body). gcsfs's default prefetcher (2026.x) sent a GET for each read: 324 GETs for a 160 KB shard.
    laiontools' gcsfs client reads ahead a block at a time, as s3fs does: the whole scan costs one GET per
    block of the file, counted by the server."""
    import io
    import math
    import tarfile

    from laiontools.stages.verify import scan_shard

    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as tf:
        for i in range(60):
            for ext, data in (("jpg", bytes([i]) * 700), ("txt", b"a caption"), ("json", b"{}")):
                info = tarfile.TarInfo(f"{i:09d}.{ext}")
                info.size = len(data)
                tf.addfile(info, io.BytesIO(data))
    bucket = f"lt-reads-{uuid.uuid4().hex[:8]}"
    gcs.mkdir(bucket)
    gcs.pipe(f"{bucket}/s.tar", buf.getvalue())
    before = gcs_server.media_gets
    keys, _uids, problems = scan_shard(f"gs://{bucket}/s.tar")
    assert keys == [f"{i:09d}" for i in range(60)] and not problems
    with gcs.open(f"{bucket}/s.tar", "rb") as f:
        blocks = math.ceil(len(buf.getvalue()) / f.blocksize)
    assert 0 < gcs_server.media_gets - before <= blocks + 1, (gcs_server.media_gets - before, blocks)


def test_an_emulator_is_not_asked_for_its_bucket_layout_over_grpc_nor_to_move_by_moveto(gcs, caplog):
    """gcsfs's extended file system asks a bucket's layout over gRPC (Storage Control API, 60 s of
    retries) before most operations and keeps no failed answer: against an emulator, which serves the
    JSON API only, one `exists` took 130 s. laiontools' gcsfs client answers it at an emulator: a flat
    bucket, no gRPC client made. gcsfs also moves an object through the JSON API's moveTo, which
    emulators lack, tried 6 times before it copies and deletes: at an emulator it copies and deletes."""
    from gcsfs.extended_gcsfs import BucketType, ExtendedGcsFileSystem

    bucket = f"lt-layout-{uuid.uuid4().hex[:8]}"
    gcs.mkdir(bucket)
    write_json(f"gs://{bucket}/a/b.json", {"k": 1})  # a temp key, then moved: by copy and delete here
    assert read_json(f"gs://{bucket}/a/b.json") == {"k": 1} and gcs.ls(f"{bucket}/a") == [f"{bucket}/a/b.json"]
    assert "moveTo" not in caplog.text  # gcsfs logs its fall back from moveTo (6 tries, ~40 s) to copy and delete
    if isinstance(gcs, ExtendedGcsFileSystem):  # (not where the user turned it off: GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT)
        assert gcs._sync_lookup_bucket_type(bucket) is BucketType.NON_HIERARCHICAL
        assert gcs._storage_control_client is None and gcs._grpc_client is None


@dataclasses.dataclass
class Runs:
    gs: str  # gs://bucket
    local: str  # a local folder holding the same run
    subsets: dict  # {"gs" | "local": manifest path of the larger subset}
    small: dict  # {"gs" | "local": reshard's details of the smallest subset (its spans written by subsets)}
    small_label: str  # that subset's scale label


@pytest.fixture(scope="module")
def runs(spark, gcs, tmp_path_factory) -> Runs:
    """One synthetic source uploaded to a bucket and taken through download, subsets and reshard twice
    with the same settings: from and into gs://, and from and into a local folder."""
    from laiontools.contracts import layout
    from laiontools.contracts.manifest import read_manifest
    from laiontools.stages import download as download_stage
    from laiontools.stages import reshard as reshard_stage
    from laiontools.stages import subsets as subsets_stage
    from laiontools.stages.download import DownloadConfig
    from laiontools.stages.reshard import ReshardConfig
    from laiontools.stages.subsets import SubsetsConfig
    from laiontools.synthetic import SyntheticWebServer, make_source
    from laiontools.testing import TEST_DOWNLOAD_SETTINGS

    work = tmp_path_factory.mktemp("gcsweb")
    bucket = f"lt-runs-{uuid.uuid4().hex[:8]}"
    gcs.mkdir(bucket)
    with SyntheticWebServer(str(work / "images")) as web:
        src = make_source(str(work), 30, web.base_url, broken={"status_404": 0.1, "bad_scheme": 0.05})
        gcs.put(src["source"], f"{bucket}/source", recursive=True)
        base = {"gs": f"gs://{bucket}", "local": str(work / "local")}
        inputs = {"gs": f"gs://{bucket}/source", "local": src["source"]}
        subsets, small = {}, {}
        for where, root in base.items():
            download_stage.run(DownloadConfig(input=inputs[where], output=f"{root}/pool", **TEST_DOWNLOAD_SETTINGS), spark)
            pool = f"{root}/pool/{layout.POOL_MANIFEST}"
            n = read_manifest(pool)["num_samples"]
            # the third scale is at most a quarter of the catalog's 30 rows: subsets' tasks write its spans
            rows = subsets_stage.run(SubsetsConfig(pool=pool, output=f"{root}/subsets", scales=f"{n - 2},{n // 2},{max(2, n // 8)}", seed=5),
                                     spark).details
            subsets[where] = rows[0]["manifest"]
            reshard_stage.run(ReshardConfig(manifest=subsets[where], output=f"{root}/resharded", shard_size=max(2, n // 4)), spark)
            small[where] = reshard_stage.run(ReshardConfig(manifest=rows[2]["manifest"], output=f"{root}/resharded-small", shard_size=2),
                                             spark).details
            small_label = rows[2]["scale"]
    return Runs(base["gs"], base["local"], subsets, small, small_label)


@pytest.mark.slow
def test_download_subsets_and_reshard_on_gcs_equal_the_local_run(spark, runs, gcs):
    """The pool, its catalog (every success row mapped to its shard in the bucket), the subsets' uid
    files and the resharded samples on gs:// are those of the local run."""
    from laiontools.contracts import layout
    from laiontools.contracts.manifest import read_manifest

    m_gs, m_local = (read_manifest(f"{r}/pool/{layout.POOL_MANIFEST}") for r in (runs.gs, runs.local))
    assert m_gs["uids"] == m_local["uids"] and m_gs["num_samples"] == m_local["num_samples"] > 0
    key = ("path", "num_samples", "bytes")
    assert [tuple(s[k] for k in key) for s in m_gs["shards"]] == [tuple(s[k] for k in key) for s in m_local["shards"]]
    for sh in m_gs["shards"]:
        assert sorted(members(f"{runs.gs}/pool/{sh['path']}")) == sorted(members(f"{runs.local}/pool/{sh['path']}"))
        assert sha256_file(f"{runs.gs}/pool/{sh['path']}")[0] == sh["sha256"]
    gs_cat, local_cat = (catalog_rows(f"{r}/pool/{layout.CATALOG_DIR}", spark) for r in (runs.gs, runs.local))
    ok = gs_cat[gs_cat["status"] == "success"]
    assert len(ok) == m_gs["num_samples"] and ok["shard"].notna().all() and ok["tar_offset"].notna().all()
    assert (gs_cat["status"] != "success").any()  # the broken rows are in the catalog with their reasons
    span = ["tar_offset", "tar_length"]  # where a sample sits in its tar follows the fetch order
    pd.testing.assert_frame_equal(gs_cat.drop(columns=span), local_cat.drop(columns=span))

    sub_gs, sub_local = read_manifest(runs.subsets["gs"]), read_manifest(runs.subsets["local"])
    assert sub_gs["uids"]["sha256"] == sub_local["uids"]["sha256"] and sub_gs["num_samples"] == sub_local["num_samples"] > 0
    rs_gs, rs_local = (read_manifest(f"{r}/resharded/{layout.RESHARD_MANIFEST}") for r in (runs.gs, runs.local))
    assert [(s["path"], s["num_samples"]) for s in rs_gs["shards"]] == [(s["path"], s["num_samples"]) for s in rs_local["shards"]]
    for sh in rs_gs["shards"]:
        assert sorted(members(f"{runs.gs}/resharded/{sh['path']}")) == sorted(members(f"{runs.local}/resharded/{sh['path']}"))
    # the resharded folder references the subset's uid file in the bucket, by its sha256
    assert rs_gs["uids"]["path"].startswith("gs://") and rs_gs["uids"]["sha256"] == sub_gs["uids"]["sha256"]
    assert sha256_file(rs_gs["uids"]["path"])[0] == rs_gs["uids"]["sha256"]

    # the smallest subset's spans, written into the bucket by Spark's tasks through gcsfs, hold the gs pool's
    # catalog rows of its uids; its reshard read them there (not the catalog) and wrote the local run's samples
    import pyarrow.parquet as pq

    small_sub = read_manifest(f"{runs.gs}/subsets/{layout.subset_manifest(runs.small_label)}")
    folder = f"{runs.gs}/subsets/{layout.subset_spans(runs.small_label)}"
    record = read_json(f"{folder}/spans.json")
    fs, _ = url_to_fs(runs.gs)
    parts = pd.concat([pq.read_table(url_to_fs(f"{folder}/{p['path']}")[1], filesystem=fs).to_pandas() for p in record["parts"]],
                      ignore_index=True)
    cols = ["uid", "shard", "key", "tar_offset", "tar_length"]
    want = ok[ok["uid"].isin(parts["uid"])].sort_values("uid")[cols]
    assert record["count"] == small_sub["num_samples"] == len(parts) > 0 and record["uids_sha256"] == small_sub["uids"]["sha256"]
    pd.testing.assert_frame_equal(parts[cols].reset_index(drop=True), want.reset_index(drop=True), check_dtype=False)
    for r in parts.itertuples():  # each span's sha256: that of the bytes at its place in the pool's shard in the bucket
        shard = f"{runs.gs}/pool/{layout.SHARDS_DIR}/{r.shard}" + ("" if r.shard.endswith(".tar") else ".tar")
        data = fs.cat_file(url_to_fs(shard)[1], start=r.tar_offset, end=r.tar_offset + r.tar_length)
        assert hashlib.sha256(data).hexdigest() == r.tar_sha256, r.uid
    assert runs.small["gs"]["sample_spans"] == runs.small["local"]["sample_spans"] == "subset spans"
    small_gs, small_local = (read_manifest(f"{r}/resharded-small/{layout.RESHARD_MANIFEST}") for r in (runs.gs, runs.local))
    assert [(s["path"], s["num_samples"]) for s in small_gs["shards"]] == [(s["path"], s["num_samples"]) for s in small_local["shards"]]
    for sh in small_gs["shards"]:
        assert sorted(members(f"{runs.gs}/resharded-small/{sh['path']}")) == sorted(members(f"{runs.local}/resharded-small/{sh['path']}"))


@pytest.mark.slow
def test_verify_reads_a_gcs_pool_and_its_resharded_folder_on_both_paths(spark, runs, gcs):
    """verify on gs://: OK as written, in this process and in Spark tasks; a tampered shard is named by both."""
    from laiontools.contracts import layout
    from laiontools.stages.verify import verify_manifest

    pool, resharded = f"{runs.gs}/pool/{layout.POOL_MANIFEST}", f"{runs.gs}/resharded/{layout.RESHARD_MANIFEST}"
    for m in (pool, resharded):
        assert verify_manifest(m).ok and verify_manifest(m, spark=spark).ok, m
    check_verify_names_a_flipped_byte(pool, spark)


@pytest.mark.slow
def test_train_reads_resharded_shards_from_gcs_like_local(runs, tmp_path):
    """`train --manifest gs://…`: open_clip's webdataset reader gets the gs:// shard URLs through fsspec
    (webdataset itself would hand them to a `gsutil` pipe). The same plan, steps and samples seen as the
    local run (a trainer is not bit-reproducible run to run)."""
    import json

    from laiontools.contracts import layout
    from laiontools.stages import train as train_stage
    from laiontools.stages.train import TrainConfig

    results, out = {}, {}
    for where, root in (("gs", runs.gs), ("local", runs.local)):
        out[where] = str(tmp_path / where)
        results[where] = train_stage.run(TrainConfig(manifest=f"{root}/resharded/{layout.RESHARD_MANIFEST}", model="lt-tiny",
                                                     samples_seen=16, batch_size=8, workers=1, checkpoint_every=16,
                                                     log_every=1, output=out[where])).details
    a, b = results["gs"], results["local"]
    assert (a["samples_seen"], a["steps"]) == (b["samples_seen"], b["steps"]) == (16, 2)
    shards = read_json(os.path.join(out["gs"], layout.TRAIN_SHARDS_JSON))
    assert shards["urls"] and all(u.startswith("gs://") for u in shards["urls"])
    assert shards["weights"] == read_json(os.path.join(out["local"], layout.TRAIN_SHARDS_JSON))["weights"]
    with open(os.path.join(out["gs"], layout.TRAIN_METRICS_JSONL)) as f:
        assert [json.loads(x)["step"] for x in f] == [1, 2]


def test_a_missing_gcs_bucket_is_one_clear_error_and_is_not_created(gcs):
    """A stage's output in a bucket that does not exist stops with one line naming the path and the
    bucket (gcsfs's own error said only "b/<bucket>/o"); no bucket is created (gcsfs's makedirs would)."""
    from laiontools.core.storage import StorageError, ensure_output_dir

    missing = f"lt-missing-{uuid.uuid4().hex[:8]}"
    with pytest.raises(StorageError, match=rf"^gs://{missing}/out: bucket '{missing}' does not exist"):
        ensure_output_dir(f"gs://{missing}/out")
    with pytest.raises(StorageError, match=rf"gs://{missing}/pool/x.json.*does not exist"):
        read_json(f"gs://{missing}/pool/x.json")
    gcs.invalidate_cache()
    assert missing not in {b.rstrip("/") for b in gcs.ls("")}, "a missing bucket must not be created"
    there = f"lt-there-{uuid.uuid4().hex[:8]}"
    gcs.mkdir(there)
    with pytest.raises(FileNotFoundError) as e:  # a missing object of a bucket that exists is no missing bucket
        read_json(f"gs://{there}/pool/x.json")
    assert not isinstance(e.value, StorageError)


@pytest.mark.slow
def test_embed_and_dedup_on_gcs_equal_the_local_run(spark, runs, tmp_path):
    """embed (tiny random-init model) of the gs:// pool into gs://, then dedup of those embeddings into
    gs:// against a local eval set: the same vectors, findings and exclusion list as the local run."""
    from laiontools.contracts import layout
    from laiontools.contracts.manifest import read_manifest
    from laiontools.stages import dedup as dedup_stage
    from laiontools.stages import embed as embed_stage
    from laiontools.stages.dedup import DedupConfig
    from laiontools.stages.embed import EmbedConfig
    from laiontools.synthetic import write_evalset

    ev = str(tmp_path / "evalset")
    write_evalset(ev, seed=5)
    outs, counts, excluded = {"gs": f"{runs.gs}/emb", "local": f"{runs.local}/emb"}, {}, {}
    for where, root in (("gs", runs.gs), ("local", runs.local)):
        embed_stage.run(EmbedConfig(manifest=f"{root}/pool/{layout.POOL_MANIFEST}", output=outs[where], model="lt-tiny",
                                    batch_size=8, num_workers=0, device="cpu"))
        res = dedup_stage.run(DedupConfig(embeddings=outs[where], evalset=[f"glyphs={ev}"], output=f"{root}/dedup",
                                          device="cpu", threshold=0.5), spark)
        counts[where], excluded[where] = res.counts, sha256_file(res.outputs["exclude"])[0]
        assert res.outputs["exclude"].startswith("gs://") == (where == "gs")
    pool = read_manifest(f"{runs.gs}/pool/{layout.POOL_MANIFEST}")
    check_same_embeddings(outs["gs"], outs["local"], [sh["path"].rsplit("/", 1)[-1].removesuffix(".tar") for sh in pool["shards"]])
    assert counts["gs"] == counts["local"] and counts["gs"]["pool_samples"] == pool["num_samples"] > 0, counts
    assert excluded["gs"] == excluded["local"]


def test_gs_opened_before_laiontools_was_imported_still_gets_its_bounded_client():
    """In a Spark task img2dataset's writer opens gs:// before laiontools' storage layer is imported:
    fsspec then keeps gcsfs's own class and ignored the name laiontools registered later, so the
    laiontools files written in that process (each shard's web counters) went through plain gcsfs: no
    bound on a silent endpoint, and moveTo tried 6 times at an emulator (45 s of a 30-row download).
    Both orders now give laiontools' client; in a child process, whose imports are its own."""
    import subprocess

    code = ("import fsspec; fsspec.get_filesystem_class('gs'); import gcsfs\n"
            "assert fsspec.get_filesystem_class('gs') is gcsfs.GCSFileSystem\n"  # what img2dataset got
            "from laiontools.core.gcs import BoundedGCSFileSystem\n"
            "from laiontools.core.storage import url_to_fs\n"
            "for url in ('gs://b/x', 'gcs://b/x'):\n"
            "    assert isinstance(url_to_fs(url)[0], BoundedGCSFileSystem), type(url_to_fs(url)[0])\n"
            "    assert fsspec.get_filesystem_class(url.split(':')[0]) is BoundedGCSFileSystem\n")
    env = {**os.environ, "FSSPEC_GS": '{"token": "anon"}'}
    r = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120, check=False)
    assert r.returncode == 0, r.stderr[-2000:]


def test_a_permission_error_is_one_clear_line_naming_the_path(gcs, gcs_server, tmp_path, capsys):
    """The emulator checks no credentials: the test server refuses one bucket (403 with the body Google's
    JSON API gives a caller without the permission). Reading from it, writing into it and a stage run on
    it each stop with one line naming the path and the access refusal (gcsfs's own error spans two lines
    and names only "b/<bucket>/o")."""
    from laiontools.cli import main
    from laiontools.core.storage import StorageError, ensure_output_dir

    bucket = f"lt-denied-{uuid.uuid4().hex[:8]}"
    gcs.mkdir(bucket)
    gcs.pipe(f"{bucket}/pool/pool.manifest.json", b"{}")
    gcs_server.denied.add(bucket)
    gcs.invalidate_cache()
    try:
        with pytest.raises(StorageError, match=rf"^gs://{bucket}/out: access denied by the object store \(.*Forbidden") as e:
            ensure_output_dir(f"gs://{bucket}/out")
        assert "\n" not in str(e.value) and "GOOGLE_APPLICATION_CREDENTIALS" in str(e.value)
        with pytest.raises(StorageError, match=rf"^gs://{bucket}/pool/pool.manifest.json: access denied"):
            read_json(f"gs://{bucket}/pool/pool.manifest.json")
        capsys.readouterr()
        assert main(["verify", f"gs://{bucket}/pool/pool.manifest.json"]) == 2
        err = capsys.readouterr().err.strip()
        assert err.startswith(f"laiontools verify: error: gs://{bucket}/pool/pool.manifest.json: access denied by the object store")
        assert "\n" not in err and "Traceback" not in err, err
        assert main(["subsets", "--pool", f"gs://{bucket}/pool/pool.manifest.json", "--output", f"gs://{bucket}/sub",
                     "--scales", "10", "--seed", "0"]) == 2
        err = capsys.readouterr().err.strip()
        assert re.match(rf"^laiontools subsets: error: gs://{bucket}/(sub|pool/pool.manifest.json): access denied by the object store", err), err
        assert "\n" not in err, err
    finally:
        gcs_server.denied.discard(bucket)
        gcs.invalidate_cache()
    assert read_json(f"gs://{bucket}/pool/pool.manifest.json") == {}  # refused by the server, not damaged


def test_an_emulator_named_by_endpoint_url_is_one_and_googles_own_endpoints_are_not(gcs_server, monkeypatch, caplog):
    """An emulator can be named by an ``endpoint_url`` (fsspec's configuration) instead of
    STORAGE_EMULATOR_HOST: that client too skips the gRPC layout lookup and moves by copy and delete,
    here against the test server with the variable unset. An endpoint_url of Google's own (a Private
    Service Connect name, storage.googleapis.com) and STORAGE_EMULATOR_HOST=default (gcsfs: Google) are
    Google: gcsfs's own lookup and moveTo stay (only checked by name: no Google here)."""
    from gcsfs.extended_gcsfs import BucketType, ExtendedGcsFileSystem

    from laiontools.core.gcs import BoundedGCSFileSystem

    monkeypatch.delenv("STORAGE_EMULATOR_HOST")

    def client(**kw):
        return BoundedGCSFileSystem(token="anon", skip_instance_cache=True, **kw)

    fs = client(endpoint_url=gcs_server.endpoint)
    assert fs.at_emulator()
    bucket = f"lt-endpoint-{uuid.uuid4().hex[:8]}"
    fs.mkdir(bucket)
    fs.pipe(f"{bucket}/a.tmp", b"x" * 10)
    fs.mv(f"{bucket}/a.tmp", f"{bucket}/a")
    assert fs.cat(f"{bucket}/a") == b"x" * 10 and not fs.exists(f"{bucket}/a.tmp")
    assert "moveTo" not in caplog.text
    if isinstance(fs, ExtendedGcsFileSystem):
        assert fs._sync_lookup_bucket_type(bucket) is BucketType.NON_HIERARCHICAL and fs._storage_control_client is None
    for google in ("https://storage.googleapis.com", "https://storage-lt1.p.googleapis.com", "https://STORAGE.googleapis.com:443"):
        assert not client(endpoint_url=google).at_emulator(), google
    assert not client().at_emulator()  # no endpoint, no emulator variable: Google
    monkeypatch.setenv("STORAGE_EMULATOR_HOST", "default")
    assert not client().at_emulator()
    monkeypatch.setenv("STORAGE_EMULATOR_HOST", gcs_server.endpoint.removeprefix("http://"))  # host:port, as gcsfs takes it
    assert client().at_emulator()
    monkeypatch.setenv("GOOGLE_CLOUD_UNIVERSE_DOMAIN", "sovereign.example")
    assert not client(endpoint_url="https://storage.sovereign.example").at_emulator()


@pytest.mark.slow
def test_reshard_killed_writing_into_gcs_resumes_to_the_same_shards_and_no_temp_keys(spark, gcs, tmp_path, monkeypatch):
    """`laiontools reshard` into gs:// killed with its process group once the first shard's marker is in
    the bucket, then the same command again: the shards of an uninterrupted run (sha256 in the manifest),
    the same keys, no temp key left. At an emulator every write is a temp object copied to its name and
    deleted, so a kill between the copy and the delete leaves the temp object whole (left here by hand,
    as the kill may not land there): the re-run's output claim removes it, as on s3://."""
    bucket = f"lt-kill-{uuid.uuid4().hex[:8]}"
    gcs.mkdir(bucket)
    monkeypatch.delenv("LAIONTOOLS_SPARK_MASTER", raising=False)  # in process, as the CLI the check kills
    check_reshard_killed_resumes(spark, gcs, f"gs://{bucket}", tmp_path)


def test_a_write_refused_to_read_only_credentials_is_one_clear_line_naming_the_file(gcs, gcs_server, capsys, tmp_path):
    """Read-only credentials on the output bucket: listing it passes the output check, and the first
    write is refused (403 to every write of that bucket, from the test server). In the library the write
    is one StorageError naming the file being written (it was gcsfs's two-line OSError naming its upload
    URL), and a stage from the CLI ends in one line; nothing is left in the bucket."""
    from laiontools.cli import main
    from laiontools.core.storage import StorageError, ensure_output_dir
    from laiontools.testing.cluster import REPO

    sys.path.insert(0, str(REPO / "bench"))
    from bench_reshard import build_pool

    build_pool(str(tmp_path / "pool"), shards=2, per_shard=10, kb=2)  # a local pool to cut subsets of
    bucket = f"lt-readonly-{uuid.uuid4().hex[:8]}"
    gcs.mkdir(bucket)
    gcs_server.read_only.add(bucket)
    gcs.invalidate_cache()
    try:
        ensure_output_dir(f"gs://{bucket}/out")  # listing is allowed
        with pytest.raises(StorageError, match=rf"^gs://{bucket}/out/x.json: access denied by the object store \(.*Forbidden") as e:
            write_json(f"gs://{bucket}/out/x.json", {"k": 1})
        assert "\n" not in str(e.value)
        capsys.readouterr()
        assert main(["subsets", "--pool", str(tmp_path / "pool" / "pool.manifest.json"), "--output", f"gs://{bucket}/sub",
                     "--scales", "10", "--seed", "0"]) == 2
        err = capsys.readouterr().err.strip()
        assert re.match(rf"^laiontools subsets: error: gs://{bucket}/sub\S*: access denied by the object store", err), err
        assert "\n" not in err, err
    finally:
        gcs_server.read_only.discard(bucket)
        gcs.invalidate_cache()
    assert gcs.find(bucket) == []


def test_a_large_write_refused_part_by_part_is_one_clear_error_naming_the_file(gcs, gcs_server):
    """A write larger than the store's block size uploads its first part inside the caller's block
    (gcsfs: 5 MiB), before the close: refused there (read-only credentials), it is the same one
    StorageError naming the file as a refusal at the close, and no key is left behind."""
    from laiontools.core.storage import StorageError, atomic_open

    bucket = f"lt-readonly-{uuid.uuid4().hex[:8]}"
    gcs.mkdir(bucket)
    gcs_server.read_only.add(bucket)
    gcs.invalidate_cache()
    written = []
    try:
        with pytest.raises(StorageError, match=rf"^gs://{bucket}/big.bin: access denied by the object store") as e, \
                atomic_open(f"gs://{bucket}/big.bin") as f:
            block = f.blocksize  # the store file's part size
            for _ in range(8):
                written.append(f.write(b"\0" * (1 << 20)))
    finally:
        gcs_server.read_only.discard(bucket)
        gcs.invalidate_cache()
    assert "\n" not in str(e.value)
    # refused by the write that filled the first block, not at the close after all 8 MiB
    assert len(written) == block // (1 << 20) - 1 < 8, (len(written), block)
    assert gcs.find(bucket) == []


def test_a_refused_read_inside_an_atomic_write_is_not_blamed_on_the_file_being_written(gcs, gcs_server):
    """atomic_open names its own file only for its own store calls (open, upload, move): a store's refusal
    met by the caller's block (reshard and takedown read source shards while they write) keeps naming
    what was read, not the output."""
    from laiontools.core.storage import atomic_open

    src, dst = f"lt-src-{uuid.uuid4().hex[:8]}", f"lt-dst-{uuid.uuid4().hex[:8]}"
    gcs.mkdir(src)
    gcs.mkdir(dst)
    gcs.pipe(f"{src}/in.json", b"{}")
    gcs_server.denied.add(src)
    gcs.invalidate_cache()
    try:
        with pytest.raises(Exception) as e, atomic_open(f"gs://{dst}/out.bin") as f:
            f.write(b"x")
            gcs.cat(f"{src}/in.json")  # a raw read, as reshard's and takedown's of their source shards
    finally:
        gcs_server.denied.discard(src)
        gcs.invalidate_cache()
    assert f"{dst}/out.bin" not in str(e.value), str(e.value)
    assert gcs.find(dst) == []  # the temp key removed, nothing written
