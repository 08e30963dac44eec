"""What the object-store tests compare between a run on a store and the same run on local disk."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from typing import Any

CATALOG_COLUMNS = ["uid", "status", "shard", "key", "width", "height", "sha256", "tar_offset", "tar_length"]


def catalog_rows(path: str, spark: Any) -> Any:
    """The catalog at `path` (local or a store's URL) as a pandas frame sorted by uid and status."""
    from laiontools.core.storage import spark_read_parquet

    df = spark_read_parquet(spark, path).select(*CATALOG_COLUMNS).toPandas()
    return df.sort_values(["uid", "status"]).reset_index(drop=True)


def members(path: str) -> list[tuple[str, bytes]]:
    """(member name, bytes) of the tar at `path` (local or a store's URL), in the tar's order."""
    from laiontools.core.storage import url_to_fs
    from laiontools.wds.tarscan import tarfile_payloads

    fs, p = url_to_fs(path)
    return tarfile_payloads(fs.cat_file(p))


def check_verify_names_a_flipped_byte(manifest: str, spark: Any) -> None:
    """verify, in this process and in Spark tasks, finds the same problems once a byte of the manifest's
    first shard is flipped in the store, and names that shard's sha256; the byte is put back after."""
    from laiontools.contracts.manifest import read_manifest
    from laiontools.core.storage import url_to_fs
    from laiontools.stages.verify import verify_manifest

    first = read_manifest(manifest)["shards"][0]["path"]
    fs, key = url_to_fs(f"{manifest.rsplit('/', 1)[0]}/{first}")
    data = bytearray(fs.cat(key))
    data[600] ^= 0xFF
    fs.pipe(key, bytes(data))
    try:
        local, on_spark = verify_manifest(manifest), verify_manifest(manifest, spark=spark)
        assert local.problems == on_spark.problems
        assert any(first in p and "sha256" in p for p in local.problems), local.problems
    finally:
        data[600] ^= 0xFF
        fs.pipe(key, bytes(data))


def check_same_embeddings(got: str, want: str, shard_ids: list[str]) -> None:
    """The embeddings folders `got` and `want` (local or a store's URL) hold the same vectors for each of
    `shard_ids`. Rows follow each tar's sample order, which follows the order the fetches ended: aligned
    by uid. Other batches around a sample can move its fp16 vector by one unit in the last place."""
    import io

    import numpy as np
    import pandas as pd

    from laiontools.contracts import layout
    from laiontools.core.storage import url_to_fs

    def read(root: str, sid: str) -> tuple[Any, Any]:
        fs, p = url_to_fs(root)
        vecs = np.load(io.BytesIO(fs.cat_file(f"{p}/{layout.EMB_IMG_DIR}/{sid}.npy")))
        uids = pd.read_parquet(io.BytesIO(fs.cat_file(f"{p}/{layout.EMB_META_DIR}/{sid}.parquet")))["uid"].to_numpy()
        return vecs, uids

    assert shard_ids
    for sid in shard_ids:
        (a, ua), (b, ub) = read(got, sid), read(want, sid)
        assert a.shape == b.shape and a.shape[0] > 0, (sid, a.shape, b.shape)
        assert sorted(ua) == sorted(ub), sid
        np.testing.assert_allclose(a[np.argsort(ua)], b[np.argsort(ub)], rtol=0, atol=1e-4)


def bench_subset(spark: Any, fs: Any, root: str, tmp_path: Any) -> str:
    """A 2-shard pool (60 samples of ~40 KB each, spans in its catalog: reshard runs in process) by the
    reshard benchmark's builder, uploaded under `root` (``s3://bucket`` or ``gs://bucket``) through the
    file system `fs`, and a subset of 100 of its samples: its manifest's URL."""
    from laiontools.contracts import layout
    from laiontools.stages import subsets as subsets_stage
    from laiontools.stages.subsets import SubsetsConfig
    from laiontools.testing.cluster import REPO

    if str(REPO / "bench") not in sys.path:
        sys.path.insert(0, str(REPO / "bench"))
    from bench_reshard import build_pool

    build_pool(str(tmp_path / "pool"), shards=2, per_shard=60, kb=40)
    fs.put(str(tmp_path / "pool") + "/", f"{root.split('://')[1]}/pool", recursive=True)
    return subsets_stage.run(SubsetsConfig(pool=f"{root}/pool/{layout.POOL_MANIFEST}", output=f"{root}/subsets",
                                           scales="100", seed=0), spark).details[0]["manifest"]


def kill_when(cmd: list[str], fs: Any, pattern: str) -> None:
    """Run `cmd` in a process group of its own and SIGKILL the whole group (the CLI and its task
    processes) once a key matches `pattern` in the store `fs`, or when the run ends first; ~2 min at most."""
    proc = subprocess.Popen(cmd, start_new_session=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        for _ in range(20000):  # the run takes seconds
            if proc.poll() is not None:
                break
            fs.invalidate_cache()
            if fs.glob(pattern):
                break
            time.sleep(0.003)
    finally:
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:  # the group had ended
            pass
        proc.wait()


def check_reshard_killed_resumes(spark: Any, fs: Any, root: str, tmp_path: Any) -> None:
    """`laiontools reshard` of :func:`bench_subset`'s subset into `root` (``s3://bucket`` / ``gs://bucket``,
    reached through `fs`) killed with its process group once the first shard's marker is in the store,
    then the same command again: the shards of an uninterrupted run into the same store (sha256 in the
    manifest), the same keys, and no temp key left. A kill between a write's temp key and its move leaves
    that key whole; whether this kill lands there is chance, so one is left by hand."""
    from laiontools.contracts import layout
    from laiontools.contracts.manifest import read_manifest
    from laiontools.core.storage import sha256_file
    from laiontools.stages import reshard as reshard_stage
    from laiontools.stages.reshard import ReshardConfig

    b = root.split("://")[1]
    sub = bench_subset(spark, fs, root, tmp_path)
    reshard_stage.run(ReshardConfig(manifest=sub, output=f"{root}/clean", shard_size=10))
    killed = f"{root}/killed"
    kill_when([sys.executable, "-m", "laiontools", "reshard", "--manifest", sub, "--output", killed, "--shard-size", "10"],
              fs, f"{b}/killed/shards/*.tar.done")
    fs.invalidate_cache()
    assert fs.glob(f"{b}/killed/shards/*.tar.done"), "the killed run never finished a shard"
    assert not fs.exists(f"{b}/killed/{layout.RESHARD_MANIFEST}"), "the kill landed after the run had finished"
    fs.pipe(f"{b}/killed/shards/.shard-00001.tar.done.tmp-deadbeef", b"{}\n")

    reshard_stage.run(ReshardConfig(manifest=sub, output=killed, shard_size=10))
    got, want = (read_manifest(f"{d}/{layout.RESHARD_MANIFEST}") for d in (killed, f"{root}/clean"))
    assert [(s["path"], s["sha256"]) for s in got["shards"]] == [(s["path"], s["sha256"]) for s in want["shards"]]
    for sh in got["shards"]:
        assert sha256_file(f"{killed}/{sh['path']}")[0] == sh["sha256"]
    fs.invalidate_cache()
    assert [k for k in fs.find(f"{b}/killed") if ".tmp-" in k] == []
    assert fs.find(f"{b}/killed") == [k.replace("/clean/", "/killed/") for k in fs.find(f"{b}/clean")]
