"""Reshard: evenly sized shuffled shards, every sample once, open_clip's loader, resume after a kill."""

from __future__ import annotations

import argparse
import dataclasses
import filecmp
import glob
import json
import os
import shutil
import subprocess
import sys
import tarfile
from pathlib import Path

import pyarrow as pa
import pytest

from laiontools.contracts import layout
from laiontools.contracts import spans as spans_mod
from laiontools.contracts.manifest import read_manifest, resolve
from laiontools.contracts.uids import array_to_uids, load_uids
from laiontools.core.storage import read_json
from laiontools.stages import reshard as reshard_stage
from laiontools.stages import subsets as subsets_stage
from laiontools.stages.reshard import (
    ReshardConfig,
    ReshardError,
    position_to_slot,
    shard_layout,
)
from laiontools.stages.subsets import SubsetsConfig
from laiontools.stages.verify import verify_manifest
from laiontools.wds.writer import ShardWriter, WriteBuffer, tar_header

sys.path.insert(0, os.path.dirname(__file__))
from test_subsets import make_scratch_pool


def _pool_manifest(request, tmp_path_factory) -> str:
    """The real downloaded pool from conftest when it exists, else the hand-built one."""
    try:
        return request.getfixturevalue("pool").manifest
    except pytest.FixtureLookupError:
        return make_scratch_pool(str(tmp_path_factory.mktemp("pool")), n=50, per_shard=12)


@pytest.fixture(scope="module")
def subset(spark, request, tmp_path_factory) -> str:
    pool = _pool_manifest(request, tmp_path_factory)
    n = read_manifest(pool)["num_samples"]
    out = tmp_path_factory.mktemp("subsets")
    res = subsets_stage.run(SubsetsConfig(pool=pool, output=str(out), scales=f"{n - 3},{n // 2}", seed=5), spark).details
    return res[0]["manifest"]  # the larger one: almost every sample, so most source shards are needed


@pytest.fixture(scope="module")
def resharded(spark, subset, tmp_path_factory) -> str:
    out = tmp_path_factory.mktemp("reshard_a")
    reshard_stage.run(ReshardConfig(manifest=subset, output=str(out), shard_size=8), spark)
    return str(out)


def _source_samples(pool_manifest: str) -> dict[str, dict[str, bytes]]:
    """uid -> {ext: bytes} of every sample in the pool's shards."""
    out: dict[str, dict[str, bytes]] = {}
    m = read_manifest(pool_manifest)
    for s in m["shards"]:
        groups: dict[str, dict[str, bytes]] = {}
        with tarfile.open(resolve(pool_manifest, s["path"])) as tf:
            for ti in tf:
                key, _, ext = ti.name.partition(".")
                groups.setdefault(key, {})[ext] = tf.extractfile(ti).read()
        for members in groups.values():
            out[json.loads(members["json"])["uid"]] = members
    return out


def test_layout_math():
    assert shard_layout(50, 8) == (7, 7, 1)
    for n, size in ((50, 8), (7, 7), (1, 10), (1001, 100), (99, 1)):
        k, q, r = shard_layout(n, size)
        slots = [position_to_slot(p, q, r) for p in range(n)]
        assert len(set(slots)) == n and max(j for j, _ in slots) == k - 1
        counts = [sum(1 for j, _ in slots if j == x) for x in range(k)]
        assert max(counts) - min(counts) <= 1 and max(counts) <= size


def test_output_written_with_o_direct_unless_free_memory_holds_it_eight_times():
    wd = reshard_stage.write_direct
    assert wd(True, 1, 1 << 40) is True and wd(False, 1 << 40, 1) is False  # the user's --[no-]direct-io wins
    assert wd(None, 100, 800) is False and wd(None, 101, 800) is True  # DIRECT_IO_FREE_FACTOR = 8
    assert wd(None, 1, None) is True  # free memory unknown: O_DIRECT
    assert reshard_stage.DIRECT_IO_FREE_FACTOR == 8


def test_free_memory_is_the_kernels_free_pages():
    """/proc/meminfo's MemFree (within a cgroup v2 limit, where there is one) against the free pages
    the C library reports (sysconf), read around it: memory moves between the reads, by little."""
    before = os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    got = reshard_stage.free_memory()
    after = os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    assert got is not None and got > 0
    group = Path("/proc/self/cgroup").read_text().splitlines()
    v2 = next((ln.split(":", 2)[2] for ln in group if ln.startswith("0::")), None)
    limit = Path(f"/sys/fs/cgroup{v2.rstrip('/')}/memory.max") if v2 is not None else None
    if limit is not None and limit.exists() and limit.read_text().strip() != "max":
        assert got <= min(before, after) + (256 << 20)
    else:
        assert min(before, after) - (256 << 20) <= got <= max(before, after) + (256 << 20), (before, got, after)


def test_fast_tar_header_matches_tarfile():
    # The writer builds ustar headers itself (tarfile's tobuf is a large share of the per-member cost);
    # they must be the very bytes tarfile writes, or resharded output would change between versions.
    for name, size, mtime in (("000000000001.jpg", 0, 0), ("00012003456.json", 511, 1_700_000_000), ("k.txt", 8**11 - 1, 8**11 - 1),
                              ("x" * 100, 7, 1), ("d/" + "y" * 90 + "/" + "z" * 20 + ".jpg", 12345, 42), ("é.txt", 3, 3)):
        ti = tarfile.TarInfo(name)
        ti.size, ti.mtime, ti.mode = size, mtime, 0o644
        ti.uname = ti.gname = ""
        assert tar_header(name, size, mtime) == ti.tobuf(tarfile.USTAR_FORMAT, "utf-8", "surrogateescape"), name


def test_shard_writer_matches_tarfile(tmp_path):
    # The shard writer packs headers, small payloads and padding together, copies large payloads
    # into its aligned buffer, hashes each buffer and writes it (O_DIRECT, buffered, or as bytes to a
    # file object): the bytes must be tarfile's, and the digest their sha256, on every path.
    import hashlib
    import io

    rng = __import__("random").Random(3)
    samples = []
    for k in range(40):
        key = f"{k:011d}"
        members = [(".jpg", rng.randbytes(rng.choice([0, 1, 511, 512, 4095, 4096, 70_000, 300_000])), 1_700_000_000 + k),
                   (".json", b'{"uid": "%d"}' % k, 5), (".txt", f"légende {k}", 0)]
        if k == 7:  # a name over 100 bytes goes through tarfile's prefix split
            key = "q" * 60 + "/" + "p" * 40 + key
        samples.append((key, [(e, d.encode() if isinstance(d, str) else d, m) for e, d, m in members]))
    expect = io.BytesIO()
    with tarfile.open(fileobj=expect, mode="w", format=tarfile.USTAR_FORMAT) as tf:
        for key, members in samples:
            for ext, data, mtime in members:
                ti = tarfile.TarInfo(key + ext)
                ti.size, ti.mtime, ti.mode, ti.uname, ti.gname = len(data), mtime, 0o644, "", ""
                tf.addfile(ti, io.BytesIO(data))
    want = expect.getvalue()
    for mode in ("direct", "buffered", "stream"):
        path = tmp_path / f"out-{mode}.tar"
        with open(path, "wb") as f:
            # a small buffer: many fills, payloads larger than the buffer
            out = ShardWriter(f, None if mode == "stream" else f.fileno(), direct=mode == "direct", buffer=WriteBuffer(64 << 10))
            if mode == "direct":
                direct_used = out.direct  # False only where the file system refuses O_DIRECT (tmpfs)
            for key, members in samples:
                out.add_sample(key.encode(), [(e.encode(), memoryview(d), m) for e, d, m in members])
            out.end_archive()
            digest = out.hexdigest()
            out.close()
            f.flush()
            os.fsync(f.fileno())
        got = path.read_bytes()
        assert got == want, mode
        assert out.n == len(want) and digest == hashlib.sha256(want).hexdigest()
    fs_type = subprocess.run(["stat", "-f", "-c", "%T", str(tmp_path)], capture_output=True, text=True, check=True).stdout.strip()
    assert direct_used or fs_type == "tmpfs", fs_type


def test_shard_writer_raises_its_thread_error_and_the_buffer_serves_the_next_shard(tmp_path):
    # The buffers are hashed and written by a writer thread; a write that fails there (here: a descriptor
    # opened read-only, as a full disk fails a write) is raised in the caller, at a later hand-over or at
    # hexdigest, never lost; close() returns; the same buffer pair then writes a correct shard.
    import errno
    import hashlib
    import io

    buffer = WriteBuffer(64 << 10)
    payload = bytes(range(256)) * 1000  # 256 kB: several hand-overs per sample
    bad = tmp_path / "readonly.tar"
    bad.write_bytes(b"")
    with open(bad, "rb") as f:
        out = ShardWriter(f, f.fileno(), direct=False, buffer=buffer)
        with pytest.raises(OSError) as err:
            for k in range(3):
                out.add_sample(f"{k:06d}".encode(), [(b".bin", memoryview(payload), 0)])
            out.end_archive()
            out.hexdigest()
        out.close()
    assert err.value.errno == errno.EBADF
    good = tmp_path / "good.tar"
    with open(good, "wb") as f:
        out = ShardWriter(f, f.fileno(), direct=False, buffer=buffer)
        for k in range(3):
            out.add_sample(f"{k:06d}".encode(), [(b".bin", memoryview(payload), 0)])
        out.end_archive()
        digest = out.hexdigest()
        out.close()
    buffer.close()
    data = good.read_bytes()
    assert digest == hashlib.sha256(data).hexdigest()
    with tarfile.open(fileobj=io.BytesIO(data)) as tf:
        assert [(m.name, tf.extractfile(m).read() == payload) for m in tf] == [(f"{k:06d}.bin", True) for k in range(3)]


def test_write_output_shards_restores_the_switch_interval(tmp_path):
    # The write lowers the interpreter's switch interval for its writer thread, in whatever process runs
    # it (a reused Spark worker, the CLI itself for a one-shard reshard): it is restored after a run and
    # after a failed one (here: a source shard that does not exist).
    import sys

    from laiontools.stages.reshard import _Entry, write_output_shards

    before = sys.getswitchinterval()
    out = tmp_path / "shards"
    out.mkdir()
    assert [j for j, _ in write_output_shards(iter([(0, [])]), str(out), {}, "plan", 6, True)] == [0]
    assert (out / "shard-00000.tar").stat().st_size == tarfile.RECORDSIZE and sys.getswitchinterval() == before
    missing = [_Entry(0, "0" * 32, "00000", "k", None, 0, 1536, 1536, None)]
    with pytest.raises(Exception, match=r"source shard .*nope\.tar is missing .* run `laiontools verify`"):
        list(write_output_shards(iter([(1, missing)]), str(out), {"00000": str(tmp_path / "nope.tar")}, "plan", 6, True))
    assert sys.getswitchinterval() == before and not (out / "shard-00001.tar").exists()


def test_a_shard_is_reported_only_once_it_and_its_marker_are_in_place(tmp_path):
    # A shard's finish (fsync, rename, marker) runs on a thread of its own while the next shard is
    # packed; the caller (a task's results, the resume) must still hear of a shard only once it is
    # finished. At every shard yielded: its file is in place with the sha256 reported (hashed here from
    # the file), its marker holds what was reported, and no temp file of it is left.
    import hashlib

    from laiontools.core.storage import read_marker
    from laiontools.stages.reshard import _Entry, write_output_shards

    data = os.urandom(1 << 20)
    (tmp_path / "s.tar").write_bytes(data)
    shards = [(j, [_Entry(i, "0" * 32, "s", f"k{i}", [("bin", (j * 7 + i) * 9000, 9000, 0)], (j * 7 + i) * 9000,
                          (j * 7 + i + 1) * 9000, 9000) for i in range(7)]) for j in range(5)]
    out = tmp_path / "shards"
    out.mkdir()
    seen = []
    for j, info in write_output_shards(iter(shards), str(out), {"s": str(tmp_path / "s.tar")}, "plan", 6, True):
        path = out / f"shard-{j:05d}.tar"
        assert hashlib.sha256(path.read_bytes()).hexdigest() == info["sha256"] and path.stat().st_size == info["bytes"]
        assert read_marker(str(path)) == info and info["num_samples"] == 7
        assert not [p.name for p in out.iterdir() if p.name.startswith(".") and f"{j:05d}" in p.name]
        seen.append(j)
    assert seen == list(range(5))
    with tarfile.open(out / "shard-00003.tar") as tf:
        assert [tf.extractfile(m).read() for m in tf] == [data[(21 + i) * 9000 : (22 + i) * 9000] for i in range(7)]


def test_scattered_local_reads_are_announced_to_the_kernel_ahead_of_them(tmp_path, monkeypatch):
    # A nested subset's samples are scattered over the source tars; read one by one from a cold disk each
    # pread waits for the device, so a shard with local sources is read in small batches (the samples stay
    # in the CPU's cache until packed) and each batch's ranges are told to the kernel (POSIX_FADV_WILLNEED)
    # while the batch before it is read. Recorded here on the real _Sources, writing a real shard from two
    # real files: every range is announced once, before it is read, with at least READ_AHEAD_MIN more
    # announced ahead of each read while any are left; the shard holds the files' bytes at those ranges.
    import random

    from laiontools.stages import reshard
    from laiontools.stages.reshard import LOCAL_READ_BATCH_BYTES, READ_AHEAD_MIN, _batches, _Entry, _Sources

    files = {}
    for sid in ("00000", "00001"):
        files[sid] = os.urandom(4 << 20)
        (tmp_path / f"{sid}.tar").write_bytes(files[sid])
    rng = random.Random(0)
    entries, size = [], 40_000
    for i in range(4 * READ_AHEAD_MIN + 5):
        sid = rng.choice(sorted(files))
        off = rng.randrange(0, (4 << 20) - size)
        entries.append(_Entry(i, "0" * 32, sid, f"k{i}", [("bin", off, size, 0)], off, off + size, size))

    logs = []

    class Recorded(_Sources):
        def __init__(self, urls, **kw):
            super().__init__(urls, **kw)
            self.log = []
            logs.append(self.log)

        def advise(self, reads):
            self.log.extend(("advise", r) for r in reads)
            super().advise(reads)

        def read(self, sid, offset, size):
            self.log.append(("read", (sid, offset, size)))
            return super().read(sid, offset, size)

    urls = {sid: str(tmp_path / f"{sid}.tar") for sid in files}
    batches = _batches(entries, _Sources(urls))
    assert len(batches) > 2 and [e for b in batches for e in b] == entries
    assert all(len(b) >= READ_AHEAD_MIN and sum(e.nbytes for e in b[:-1]) < LOCAL_READ_BATCH_BYTES for b in batches[:-1])
    monkeypatch.setattr(reshard, "_Sources", Recorded)
    out = tmp_path / "shards"
    out.mkdir()
    assert [j for j, _ in reshard.write_output_shards(iter([(0, entries)]), str(out), urls, "plan", 6, True)] == [0]
    with tarfile.open(out / "shard-00000.tar") as tf:
        assert [tf.extractfile(m).read() for m in tf] == [files[e.sid][e.lo : e.hi] for e in entries]
    (log,) = logs
    advised = [r for what, r in log if what == "advise"]
    reads = [r for what, r in log if what == "read"]
    assert sorted(advised) == sorted(reads) == sorted((e.sid, e.lo, size) for e in entries)
    done = 0
    for p, (what, r) in enumerate(log):
        if what == "read":
            ahead = sum(1 for w, _ in log[:p] if w == "advise") - done
            assert r in [x for w, x in log[:p] if w == "advise"]
            done += 1
            assert ahead - 1 >= min(READ_AHEAD_MIN, len(reads) - done), (p, ahead, done)


def test_a_member_ustar_cannot_hold_is_a_task_error_naming_the_sample(tmp_path):
    # A source member whose new name (key + its extension) is too long for a ustar header, which the
    # pax source could hold: a task error naming the source shard and sample, no shard left behind.
    import io

    from laiontools.stages.reshard import write_output_shards
    from laiontools.wds.tarscan import tar_index

    ext = "e" * 120
    src = tmp_path / "src.tar"
    with tarfile.open(src, "w", format=tarfile.PAX_FORMAT) as tf:
        ti = tarfile.TarInfo(f"k.{ext}")
        ti.size = 3
        tf.addfile(ti, io.BytesIO(b"abc"))
    with open(src, "rb") as f:
        ((_, off, size, mtime),) = tar_index(f, src.stat().st_size)
    out = tmp_path / "shards"
    out.mkdir()
    rows = iter([(0, [(0, "0" * 32, "s", "k", [(ext, off, size, mtime)])])])
    with pytest.raises(RuntimeError, match=rf"source shard {src}: sample k cannot be resharded: .*name is too long"):
        list(write_output_shards(rows, str(out), {"s": str(src)}, "plan", 6, True))
    assert list(out.iterdir()) == []


def test_reshard_output(subset, resharded):
    sm = read_manifest(subset)
    m = read_manifest(os.path.join(resharded, layout.RESHARD_MANIFEST))
    n = sm["num_samples"]
    assert m["kind"] == "subset" and m["num_samples"] == n and m["uids"]["sha256"] == sm["uids"]["sha256"]
    assert m["parent"]["path"] == subset
    # the subset's uid file is referenced by path + sha256, not copied (~32 GB at 2B)
    assert m["uids"]["path"] == resolve(subset, sm["uids"]["path"]) and os.path.isabs(m["uids"]["path"])
    assert not any(f.endswith(".npy") for f in os.listdir(resharded)), os.listdir(resharded)
    settings = read_json(os.path.join(resharded, layout.SETTINGS_JSON))  # the effective settings, as every stage saves them
    assert (settings["stage"], settings["manifest"], settings["shard_size"], settings["seed"]) == ("reshard", subset, 8, sm["selection"]["seed"])
    # every setting, not only the plan's (the point of the file: --direct-io, --spark-above, the master), and given
    # back with --config it is the same run
    assert {f.name for f in dataclasses.fields(ReshardConfig)} <= set(settings), settings
    from laiontools.core.config import config_from_args

    again = config_from_args(ReshardConfig, argparse.Namespace(config_file=os.path.join(resharded, layout.SETTINGS_JSON)))
    assert again == ReshardConfig(manifest=subset, output=resharded, shard_size=8, seed=sm["selection"]["seed"]), again
    sizes = read_json(os.path.join(resharded, "shards", "sizes.json"))
    assert sizes == {os.path.basename(s["path"]): s["num_samples"] for s in m["shards"]}
    assert sum(sizes.values()) == n and max(sizes.values()) - min(sizes.values()) <= 1 and max(sizes.values()) <= 8
    res = verify_manifest(os.path.join(resharded, layout.RESHARD_MANIFEST))
    assert res.ok, res.problems

    pool = sm["pool"]["path"]
    src = _source_samples(pool)
    pool_shard_of = {}
    for s in read_manifest(pool)["shards"]:
        with tarfile.open(resolve(pool, s["path"])) as tf:
            for ti in tf:
                if ti.name.endswith(".json"):
                    pool_shard_of[json.loads(tf.extractfile(ti).read())["uid"]] = layout.shard_id(s["path"])
    subset_uids = set(array_to_uids(load_uids(resolve(subset, sm["uids"]["path"]))))
    seen: dict[str, str] = {}
    keys: set[str] = set()
    positions = []
    for s in m["shards"]:
        path = os.path.join(resharded, s["path"])
        marker = read_json(path + ".done")
        groups: dict[str, dict[str, bytes]] = {}
        with tarfile.open(path) as tf:
            for ti in tf:
                key, _, ext = ti.name.partition(".")
                groups.setdefault(key, {})[ext] = tf.extractfile(ti).read()
        needed = set()
        for key, members in groups.items():
            assert key not in keys
            keys.add(key)
            meta = json.loads(members["json"])
            uid = meta["uid"]
            assert uid not in seen, f"{uid} twice"
            seen[uid] = key
            assert meta["key"] == key and meta["source_shard"] == pool_shard_of[uid]
            # jpg/txt byte-identical to the source sample; json = source json + new fields
            assert set(members) == set(src[uid])
            assert members["jpg"] == src[uid]["jpg"] and members["txt"] == src[uid]["txt"]
            assert {k: v for k, v in meta.items() if k not in ("key", "source_shard", "source_key")} == {
                k: v for k, v in json.loads(src[uid]["json"]).items() if k != "key"
            }
            needed.add(pool_shard_of[uid])
            positions.append(key)
        # each task read exactly the source shards its samples live in
        assert marker["sources"] == sorted(needed)
    assert set(seen) == subset_uids
    # shuffled: output order is not the source order
    src_order = [u for u in src if u in subset_uids]
    out_order = sorted(seen, key=lambda u: seen[u])
    assert out_order != src_order


def test_webdataset_and_open_clip_loader(resharded):
    import torch
    import webdataset as wds
    from open_clip_train.data import get_wds_dataset

    from laiontools.models.registry import load_model
    from laiontools.stages.train_worker import _no_shard_eof_marker

    # The same patch our trainer applies before open_clip reads shards (webdataset >= 0.2.96 emits an
    # end-of-shard marker that open_clip_train 3.3's reader trips on; see train_worker).
    _no_shard_eof_marker()

    m = read_manifest(os.path.join(resharded, layout.RESHARD_MANIFEST))
    urls = [resolve(os.path.join(resharded, layout.RESHARD_MANIFEST), s["path"]) for s in m["shards"]]
    expected = set(array_to_uids(load_uids(resolve(os.path.join(resharded, layout.RESHARD_MANIFEST), m["uids"]["path"]))))
    # webdataset itself
    got = [json.loads(s["json"])["uid"] for s in wds.WebDataset(urls, shardshuffle=False)]
    assert len(got) == len(expected) and set(got) == expected

    # open_clip's training loader, with its real image transform; the "tokenizer" maps each caption
    # to its index so we can tell which samples arrived.
    captions = sorted({wds_s["txt"].decode() for wds_s in wds.WebDataset(urls, shardshuffle=False)})
    assert len(captions) == len(expected)
    index = {c: i for i, c in enumerate(captions)}
    bundle = load_model("lt-tiny")
    n = m["num_samples"]
    batch = next(b for b in range(5, 0, -1) if n % b == 0)
    args = argparse.Namespace(
        train_data=os.path.join(resharded, "shards", f"shard-{{00000..{len(urls) - 1:05d}}}.tar"),
        val_data=None, dataset_resampled=False, train_num_samples=None, train_data_upsampling_factors=None,
        seed=0, batch_size=batch, workers=1, world_size=1,
    )
    info = get_wds_dataset(args, bundle.preprocess_train, is_train=True, epoch=0, tokenizer=lambda t: torch.tensor([[index[t]]]))
    assert info.dataloader.num_samples == n  # read from sizes.json
    arrived = []
    for images, texts in info.dataloader:
        assert images.ndim == 4 and images.shape[0] == texts.shape[0] == batch
        arrived += texts.flatten().tolist()
    assert sorted(arrived) == list(range(len(captions))), "open_clip's loader must deliver every sample exactly once"


def _pool_catalog(subset: str) -> tuple[str, str]:
    m = read_manifest(subset)
    pool_path = resolve(subset, m["pool"]["path"])
    return pool_path, resolve(pool_path, read_manifest(pool_path)["catalog"]["path"])


def _same_output(a: str, b: str) -> None:
    for s in read_manifest(os.path.join(a, layout.RESHARD_MANIFEST))["shards"]:
        assert filecmp.cmp(os.path.join(a, s["path"]), os.path.join(b, s["path"]), shallow=False), s["path"]
    assert filecmp.cmp(os.path.join(a, layout.RESHARD_MANIFEST), os.path.join(b, layout.RESHARD_MANIFEST), shallow=False)


def test_catalog_spans_and_the_tar_index_give_the_same_shards(spark, subset, resharded, tmp_path):
    """download records where each sample's bytes lie in its tar, so reshard indexes no tar; a pool
    without those columns (written before them) goes through the tar header index. Same bytes."""
    import pyarrow.compute as pc
    import pyarrow.parquet as pq

    from laiontools.contracts import schema as C
    from laiontools.wds.tarscan import parse_span

    pool_path, cat_dir = _pool_catalog(subset)
    cat = pq.read_table(cat_dir)
    ok = cat.filter(pc.equal(cat[C.STATUS], C.STATUS_SUCCESS)).to_pydict()
    # Every downloaded sample has a span, and the span holds exactly its members.
    assert ok[C.UID] and None not in ok[C.TAR_OFFSET] and None not in ok[C.TAR_LENGTH]
    shards = {layout.shard_id(s["path"]): resolve(pool_path, s["path"]) for s in read_manifest(pool_path)["shards"]}
    for sid, key, off, n in list(zip(ok[C.SHARD], ok[C.KEY], ok[C.TAR_OFFSET], ok[C.TAR_LENGTH]))[:20]:
        with open(shards[sid], "rb") as f:
            f.seek(off)
            members = parse_span(f.read(n))
        assert members and {m[0].split(".", 1)[0] for m in members} == {key}, (sid, key)

    a = reshard_stage.run(ReshardConfig(manifest=subset, output=str(tmp_path / "a"), shard_size=8), spark).details
    assert a["sample_spans"] == "catalog"
    _same_output(resharded, str(tmp_path / "a"))
    saved = cat_dir + ".saved"
    os.rename(cat_dir, saved)
    try:
        os.makedirs(cat_dir)
        pq.write_table(cat.drop([C.TAR_OFFSET, C.TAR_LENGTH]), os.path.join(cat_dir, "part-00000.parquet"))
        b = reshard_stage.run(ReshardConfig(manifest=subset, output=str(tmp_path / "b"), shard_size=8), spark).details
    finally:
        shutil.rmtree(cat_dir)
        os.rename(saved, cat_dir)
    assert b["sample_spans"] == "tar index"
    _same_output(resharded, str(tmp_path / "b"))


def test_a_subset_too_large_for_a_membership_udf_is_planned_by_a_join(spark, subset, resharded, tmp_path, monkeypatch):
    """Above MEMBER_UDF_MAX_UIDS reshard's Spark plan picks the subset's rows out of the catalog by a left
    semi join with the subset's uid file read by Spark tasks (4 uids each here), not by a UDF that loads
    the file into every worker (a 400M subset's is 6.4 GB): the same shards, byte for byte."""
    from laiontools.contracts import uids as uids_mod

    monkeypatch.setattr(uids_mod, "MEMBER_UDF_MAX_UIDS", 0)
    monkeypatch.setattr(uids_mod, "UID_ROWS_PER_TASK", 4)
    plans = []

    def keep_members(df, col, path):
        out = uids_mod.keep_members(df, col, path)
        plans.append(out._jdf.queryExecution().optimizedPlan().toString())
        return out

    monkeypatch.setattr(reshard_stage, "keep_members", keep_members)
    a = reshard_stage.run(ReshardConfig(manifest=subset, output=str(tmp_path / "a"), shard_size=8, spark_above=0), spark).details
    assert a["engine"].startswith("spark ") and len(plans) == 1
    assert "LeftSemi" in plans[0] and "member" not in plans[0], plans[0]
    _same_output(resharded, str(tmp_path / "a"))


def test_in_process_engine_writes_the_same_shards(spark, subset, resharded, tmp_path, monkeypatch):
    """Below --spark-above with no master named, the plan and the write run in this process: the same
    shards and manifest, byte for byte, as on Spark, for the large subset and for a scattered half;
    a run whose first shards were written on Spark finishes in process with the same bytes."""
    monkeypatch.delenv("LAIONTOOLS_SPARK_MASTER", raising=False)
    a = reshard_stage.run(ReshardConfig(manifest=subset, output=str(tmp_path / "a"), shard_size=8)).details
    assert a["engine"] == "in-process" and a["sample_spans"] == "catalog"
    _same_output(resharded, str(tmp_path / "a"))
    # a few hundred KB: written through the page cache unless --direct-io is given; the same bytes
    # either way (the Spark run above, on a pool of any size, wrote with O_DIRECT)
    assert a["direct_io"] is False and reshard_stage.free_memory() > 8 * a["bytes"]
    d = reshard_stage.run(ReshardConfig(manifest=subset, output=str(tmp_path / "d"), shard_size=8, direct_io=True)).details
    assert d["direct_io"] is True and d["engine"] == "in-process"
    _same_output(resharded, str(tmp_path / "d"))
    # the catalog matched by the uid set's hash index (large subsets) instead of Arrow's is_in: the same
    monkeypatch.setattr(spans_mod, "IS_IN_MAX_UIDS", 0)
    reshard_stage.run(ReshardConfig(manifest=subset, output=str(tmp_path / "u"), shard_size=8))
    _same_output(resharded, str(tmp_path / "u"))
    monkeypatch.undo()
    monkeypatch.delenv("LAIONTOOLS_SPARK_MASTER", raising=False)
    half = os.path.dirname(subset)  # the subsets output: both scales
    small = min((os.path.join(r, f) for r, _, fs in os.walk(half) for f in fs if f.endswith(".manifest.json")),
                key=lambda p: read_manifest(p)["num_samples"])
    assert read_manifest(small)["num_samples"] < read_manifest(subset)["num_samples"]
    on_spark = reshard_stage.run(ReshardConfig(manifest=small, output=str(tmp_path / "s"), shard_size=5), spark).details
    assert on_spark["engine"].startswith("spark ")
    here = reshard_stage.run(ReshardConfig(manifest=small, output=str(tmp_path / "l"), shard_size=5)).details
    assert here["engine"] == "in-process"
    _same_output(str(tmp_path / "s"), str(tmp_path / "l"))
    # resume across engines: drop half the Spark run's shards (tar and marker), finish in process
    mixed = str(tmp_path / "m")
    shutil.copytree(str(tmp_path / "s"), mixed)
    tars = sorted(f for f in os.listdir(os.path.join(mixed, "shards")) if f.endswith(".tar"))
    for t in tars[: len(tars) // 2]:
        os.remove(os.path.join(mixed, "shards", t))
        os.remove(os.path.join(mixed, "shards", t + ".done"))
    os.remove(os.path.join(mixed, layout.RESHARD_MANIFEST))
    assert reshard_stage.run(ReshardConfig(manifest=small, output=mixed, shard_size=5)).details["engine"] == "in-process"
    _same_output(str(tmp_path / "s"), mixed)


def test_the_compiled_per_sample_path_and_the_python_one_write_the_same_shards(subset, resharded, tmp_path, monkeypatch):
    """In process, with laiontools.wds.tarfast (counted: it must answer for every sample, or this
    compares the Python path with itself) and with it turned off: both write, byte for byte, the
    shards and manifest of the fixture's Spark run."""
    from laiontools.wds import writer

    if reshard_stage._native_members is None:
        pytest.skip("laiontools.wds.tarfast is not built (tests/test_tarfast.py says why)")
    monkeypatch.delenv("LAIONTOOLS_SPARK_MASTER", raising=False)
    calls = str(tmp_path / "answered")
    native = reshard_stage._native_members

    def counted(raw, skey):  # the tasks run in forked processes: each answer is one byte appended to a file
        got = native(raw, skey)
        if got is not None:
            fd = os.open(calls, os.O_WRONLY | os.O_APPEND | os.O_CREAT)
            os.write(fd, b".")
            os.close(fd)
        return got

    monkeypatch.setattr(reshard_stage, "_native_members", counted)
    fast = reshard_stage.run(ReshardConfig(manifest=subset, output=str(tmp_path / "fast"), shard_size=8)).details
    assert fast["engine"] == "in-process" and os.path.getsize(calls) == fast["num_samples"] > 0
    _same_output(resharded, str(tmp_path / "fast"))
    monkeypatch.setattr(reshard_stage, "_native_members", None)
    monkeypatch.setattr(writer, "_pack_members", None)
    reshard_stage.run(ReshardConfig(manifest=subset, output=str(tmp_path / "python"), shard_size=8))
    _same_output(resharded, str(tmp_path / "python"))


def test_a_task_keeps_few_files_of_a_store_open(tmp_path):
    """Local source shards stay open by the hundred, but a file of another file system (an object store's
    holds a 4 MB block) is kept open only REMOTE_MAX_OPEN at a time. fsspec's memory file system stands
    for the store here: 40 of its files read in turn, every range right, never more than the cap open."""
    import fsspec

    from laiontools.stages.reshard import REMOTE_MAX_OPEN, _Sources

    mem = fsspec.filesystem("memory")
    datas = {f"{k:05d}": os.urandom(4096) for k in range(REMOTE_MAX_OPEN + 8)}
    for sid, data in datas.items():
        mem.pipe(f"/reshard-sources-{tmp_path.name}/{sid}.tar", data)
    src = _Sources({sid: f"memory:///reshard-sources-{tmp_path.name}/{sid}.tar" for sid in datas})
    assert src.max_open > REMOTE_MAX_OPEN
    try:
        for rnd in range(2):
            for sid, data in datas.items():
                assert src.read(sid, 100 + rnd, 1000) == data[100 + rnd : 1100 + rnd]
                assert len(src.open) <= REMOTE_MAX_OPEN
    finally:
        src.close()
        mem.rm(f"/reshard-sources-{tmp_path.name}", recursive=True)


def test_in_process_plan_takes_a_sample_listed_twice_once_and_breaks_score_ties_by_uid(subset, resharded, tmp_path, monkeypatch):
    """The in-process plan sorts by uid and drops repeats only when the catalog lists some sample twice,
    and orders by score alone only when no two scores are equal. Both other branches are reached here: a
    catalog that lists every subset sample twice reshards to the Spark run's bytes (`resharded`, from the
    catalog as downloaded); with every score equal and the catalog's rows in reverse order, positions
    follow the uids (the shards hold the subset's uids in sorted order)."""
    import pandas as pd
    import pyarrow as pa
    import pyarrow.parquet as pq

    from laiontools.core.storage import write_parquet_dir

    monkeypatch.delenv("LAIONTOOLS_SPARK_MASTER", raising=False)
    _, cat_dir = _pool_catalog(subset)
    cat = pq.read_table(cat_dir)

    def with_catalog(table, out, **patch):
        saved = cat_dir + ".saved"
        os.rename(cat_dir, saved)
        try:
            write_parquet_dir(table, cat_dir)
            with monkeypatch.context() as mp:
                for name, value in patch.items():
                    mp.setattr(reshard_stage, name, value)
                return reshard_stage.run(ReshardConfig(manifest=subset, output=str(out), shard_size=8)).details
        finally:
            shutil.rmtree(cat_dir, ignore_errors=True)
            os.rename(saved, cat_dir)

    assert with_catalog(pa.concat_tables([cat, cat]), tmp_path / "twice")["engine"] == "in-process"
    _same_output(resharded, str(tmp_path / "twice"))

    out = tmp_path / "ties"
    with_catalog(cat.take(pa.array(range(cat.num_rows - 1, -1, -1))), out,
                 score_series=lambda uids, seed, person=None: pd.Series(0, index=uids.index, dtype="int64"))
    got = []
    for sh in read_manifest(str(out / layout.RESHARD_MANIFEST))["shards"]:
        with tarfile.open(out / sh["path"]) as tf:
            got += [json.loads(tf.extractfile(ti).read())["uid"] for ti in tf if ti.name.endswith(".json")]
    assert got == sorted(_uids_of(resolve(subset, read_manifest(subset)["uids"]["path"])))


def test_a_task_opens_each_local_source_shard_once(tmp_path, monkeypatch):
    """A nested subset's output shard reads from every shard of its pool, in no order. A task kept 32
    source files open and reopened the others at each read (2 % of a 128-shard pool: ~4,300 opens for
    2,560 samples, each resolving the path through fsspec). Here 48 sources, read in random order by
    two output shards written in one task: each opened once, and the shards hold the sources' bytes."""
    import builtins
    import random

    from laiontools.stages.reshard import _Entry, _max_open_files

    assert 32 <= _max_open_files() <= 512
    rng = random.Random(1)
    files = {f"{k:05d}": os.urandom(64 << 10) for k in range(48)}
    for sid, data in files.items():
        (tmp_path / f"{sid}.tar").write_bytes(data)
    urls = {sid: str(tmp_path / f"{sid}.tar") for sid in files}
    shards = []
    for j in range(2):
        entries = []
        for i in range(150):
            sid, off = rng.choice(sorted(files)), rng.randrange(0, (64 << 10) - 1000)
            entries.append(_Entry(i, "0" * 32, sid, f"k{i}", [("bin", off, 1000, 0)], off, off + 1000, 1000))
        shards.append((j, entries))
    opened = []
    real_open = builtins.open

    def counting_open(path, *a, **kw):
        if str(path).startswith(str(tmp_path)) and str(path).endswith(".tar") and "shards" not in str(path):
            opened.append(path)
        return real_open(path, *a, **kw)

    monkeypatch.setattr(reshard_stage, "open", counting_open, raising=False)
    out = tmp_path / "shards"
    out.mkdir()
    assert [j for j, _ in reshard_stage.write_output_shards(iter(shards), str(out), urls, "plan", 6, True)] == [0, 1]
    assert sorted(opened) == sorted({urls[e.sid] for _, es in shards for e in es})
    for j, entries in shards:
        with tarfile.open(out / f"shard-{j:05d}.tar") as tf:
            assert [tf.extractfile(m).read() for m in tf] == [files[e.sid][e.lo : e.hi] for e in entries]


def test_the_shard_url_table_tasks_carry_is_the_pools_table_and_resolves_as_fsspec_does():
    """ShardUrls keeps urls of the form <prefix><id><suffix> as arrays of ids: what it answers is what the
    dict of the pool's (id, url) pairs answers, for ids in a frame, in a frame too small to keep, not in
    their url (a retry folder's) and given twice; every shard resolves to the file system and path that
    url_to_fs gives its url. Pickled (what every write task receives), it is a fraction of the dict."""
    import pickle

    from laiontools.core.storage import url_to_fs
    from laiontools.stages.reshard import ShardUrls, _Sources

    pairs = [(f"{i:05d}", f"/data/pool/shards/{i:05d}.tar") for i in range(40)]
    pairs += [(f"{i:05d}", f"s3://bucket/parent/shards/{i:05d}.tar") for i in range(40, 70)]  # a takedown's output
    pairs += [(f"retry01-{i:05d}", f"/data/pool/shards/retry01/{i:05d}.tar") for i in range(5)]  # id not in the url
    pairs += [(f"{i:05d}", f"gs://other/shards/{i:05d}.tar") for i in range(70, 73)]  # a frame of three
    pairs += [("00003", "/elsewhere/shards/00003.tar")]  # given twice: the last url, as in a dict
    want = dict(pairs)
    got = ShardUrls(pairs)
    assert len(got.frames) == 2
    assert len(got) == len(want) and set(got) == set(want) and dict(got.items()) == want
    assert all(got[sid] == url for sid, url in want.items())
    assert "00099" not in got and "0000" not in got
    with pytest.raises(KeyError):
        got["00099"]
    sources = _Sources(got)
    for sid in [*want, *want]:  # each twice: resolved, then kept
        fs, path, local = sources._where(sid)
        want_fs, want_path = url_to_fs(want[sid])
        assert (type(fs), path, local) == (type(want_fs), want_path, want[sid].startswith("/"))
    assert pickle.loads(pickle.dumps(got)).items() == got.items()
    big = [(f"{i:06d}", f"s3://bucket/laion2b/shards/{i:06d}.tar") for i in range(20_000)]
    assert len(pickle.dumps(ShardUrls(big))) < len(pickle.dumps(dict(big))) / 5


@pytest.mark.parametrize("engine", ["spark", "in-process"])
def test_a_bit_flip_in_a_catalog_page_is_named_not_read_as_a_wrong_value(spark, subset, tmp_path, monkeypatch, capsys, engine):
    """One flipped bit inside a catalog page that still decodes (a hex digit of a subset sample's span
    sha256) reads back as a wrong value unless the page's CRC is checked: the reshard then blamed the
    source shard, "changed since download". Catalogs written here carry page CRCs and every reader
    checks them, Spark's and pyarrow's (in process; inside tasks for object stores): one error line
    naming the catalog file, exit 2."""
    import io

    import pyarrow.parquet as pq

    from laiontools.cli import main as cli_main
    from laiontools.contracts import schema as C
    from laiontools.core.storage import write_parquet_dir

    monkeypatch.delenv("LAIONTOOLS_SPARK_MASTER", raising=False)
    _, cat_dir = _pool_catalog(subset)
    cat = pq.read_table(cat_dir)
    in_subset = set(array_to_uids(load_uids(resolve(subset, read_manifest(subset)["uids"]["path"]))))
    saved = cat_dir + ".saved"
    os.rename(cat_dir, saved)
    try:
        write_parquet_dir(cat, cat_dir)  # as the in-process download writes a catalog
        f = os.path.join(cat_dir, "part-00000.parquet")
        raw = bytearray(Path(f).read_bytes())
        md = pq.ParquetFile(f).metadata
        assert md.num_row_groups == 1
        col = md.row_group(0).column(md.schema.to_arrow_schema().names.index(C.TAR_SHA256))
        start = col.dictionary_page_offset or col.data_page_offset
        want, uids = cat.column(C.TAR_SHA256).to_pylist(), cat.column(C.UID).to_pylist()
        flipped = None
        for pos in range(start + col.total_compressed_size // 2, start + col.total_compressed_size):
            raw[pos] ^= 0x01
            try:  # read without the CRC check, as every pyarrow reader did before
                got = pq.read_table(io.BytesIO(bytes(raw)), columns=[C.TAR_SHA256]).column(0).to_pylist()
            except Exception:  # noqa: BLE001 - this flip broke the page's structure: try the next byte
                got = None
            changed = [i for i, (a, b) in enumerate(zip(want, got or want)) if a != b]
            if len(changed) == 1 and uids[changed[0]] in in_subset:
                flipped = pos
                break
            raw[pos] ^= 0x01
        assert flipped is not None, "no byte of the column's pages flips one subset sample's sha256"
        with open(f, "wb") as fh:
            fh.write(raw)
        rc = cli_main(["reshard", "--manifest", subset, "--output", str(tmp_path / "c"), "--shard-size", "8",
                       "--spark-above", "0" if engine == "spark" else "1000000000"])
        out = capsys.readouterr().err
        err = [ln for ln in out.splitlines() if ln.startswith("laiontools reshard:")]
        assert rc == 2, out[-3000:]
        assert len(err) == 1 and err[0].startswith("laiontools reshard: error: ") and "part-00000.parquet is damaged" in err[0], err
        assert "changed since download" not in out and "Traceback" not in out
    finally:
        shutil.rmtree(cat_dir)
        os.rename(saved, cat_dir)


@pytest.mark.parametrize("engine", ["spark", "in-process"])
def test_catalog_span_that_misses_its_sample_is_named(spark, subset, tmp_path, monkeypatch, engine):
    """A catalog span that does not hold its sample's members (a shard rewritten after download)
    stops the reshard with an error naming the shard and the sample, not a damaged output; raised in
    a Spark task or in a forked task process, it reaches the user as the same one-line error."""
    monkeypatch.delenv("LAIONTOOLS_SPARK_MASTER", raising=False)
    import pyarrow as pa
    import pyarrow.parquet as pq

    from laiontools.contracts import schema as C

    _, cat_dir = _pool_catalog(subset)
    cat = pq.read_table(cat_dir)
    # Every sample that does not start its tar gets a span 512 bytes early (which samples the
    # subset holds depends on the download, so all of them).
    off = [v - 512 if v else v for v in cat[C.TAR_OFFSET].to_pylist()]
    saved = cat_dir + ".saved"
    os.rename(cat_dir, saved)
    try:
        os.makedirs(cat_dir)
        pq.write_table(cat.set_column(cat.column_names.index(C.TAR_OFFSET), C.TAR_OFFSET, pa.array(off, pa.int64())),
                       os.path.join(cat_dir, "part-00000.parquet"))
        with pytest.raises(ReshardError, match=r"catalog gives for sample .* run `laiontools verify`"):
            reshard_stage.run(ReshardConfig(manifest=subset, output=str(tmp_path / "c"), shard_size=8),
                              spark if engine == "spark" else None)
    finally:
        shutil.rmtree(cat_dir)
        os.rename(saved, cat_dir)


def test_resume_after_partial_run_is_identical(spark, subset, resharded, tmp_path):
    b = str(tmp_path / "b")
    shutil.copytree(resharded, b)
    shards = sorted(glob.glob(os.path.join(b, "shards", "shard-*.tar")))
    os.remove(shards[1])
    os.remove(shards[1] + ".done")
    os.remove(shards[2] + ".done")  # data without a marker: not done, must be rewritten
    with open(shards[2], "r+b") as f:
        f.truncate(1000)
    Path(b, "shards", ".shard-00003.tar.tmp-deadbeef").write_bytes(b"half")  # a killed write
    os.remove(os.path.join(b, layout.RESHARD_MANIFEST))
    # The first run wrote with O_DIRECT (the default); the resume writes through the page cache.
    reshard_stage.run(ReshardConfig(manifest=subset, output=b, shard_size=8, direct_io=False), spark)
    for s in read_manifest(os.path.join(resharded, layout.RESHARD_MANIFEST))["shards"]:
        assert filecmp.cmp(os.path.join(resharded, s["path"]), os.path.join(b, s["path"]), shallow=False), s["path"]
    assert filecmp.cmp(os.path.join(resharded, layout.RESHARD_MANIFEST), os.path.join(b, layout.RESHARD_MANIFEST), shallow=False)
    assert filecmp.cmp(os.path.join(resharded, "shards", "sizes.json"), os.path.join(b, "shards", "sizes.json"), shallow=False)
    # Same folder, another plan: refused rather than mixed.
    with pytest.raises(ReshardError, match=r"another plan \(seed: 5 -> 99\)"):
        reshard_stage.run(ReshardConfig(manifest=subset, output=b, shard_size=8, seed=99), spark)


def test_bad_inputs(spark, subset, tmp_path):
    pool = read_manifest(subset)["pool"]["path"]
    from laiontools.core.errors import InputError

    with pytest.raises(InputError, match="pool manifest; reshard takes a subset"):
        reshard_stage.run(ReshardConfig(manifest=pool, output=str(tmp_path / "x")), spark)
    from laiontools.core.config import ConfigError

    with pytest.raises(ConfigError, match="shard-size"):
        ReshardConfig(manifest=subset, output=str(tmp_path / "x"), shard_size=0)
    from laiontools.cli import main as cli

    assert cli(["reshard", "--manifest", subset, "--output", str(tmp_path / "y"), "--seed", "1.5"]) == 2


def test_a_subset_of_no_samples_is_resharded_with_a_warning(spark, subset, tmp_path):
    """A short subset of 0 samples (every sample filtered out, --allow-short) reshards to no shard; the
    summary says so instead of a quiet exit 0 (a run of a study would then have nothing to train on)."""
    pool = resolve(subset, read_manifest(subset)["pool"]["path"])
    res = subsets_stage.run(SubsetsConfig(pool=pool, output=str(tmp_path / "s"), scales="5", seed=0, allow_short=True,
                                          min_caption_length=10**6), spark).details
    assert res[0]["obtained"] == 0
    out = reshard_stage.run(ReshardConfig(manifest=res[0]["manifest"], output=str(tmp_path / "r"), shard_size=8))
    assert out.counts["shards"] == 0 and read_manifest(out.outputs["manifest"])["num_samples"] == 0
    assert out.summary.splitlines()[-1] == (f"warning: {res[0]['manifest']} holds no samples (a short subset of 0): no "
                                            "shard was written, and training on this output has nothing to read")


@pytest.mark.parametrize("engine", ["spark", "in-process"])
def test_a_subset_uid_the_pool_never_downloaded_is_refused(spark, subset, tmp_path, monkeypatch, engine):
    """A subset whose uid file names a sample the pool's catalog has no download of (the pool changed
    since selection): refused before any shard is written, on either engine, naming what to do."""
    from laiontools.contracts.uids import save_uids
    from laiontools.core.storage import sha256_file

    monkeypatch.delenv("LAIONTOOLS_SPARK_MASTER", raising=False)
    m = read_manifest(subset)
    uids = _uids_of(resolve(subset, m["uids"]["path"]))
    forged = sorted(uids + ["f" * 32])
    save_uids(str(tmp_path / "forged.uids.npy"), forged)
    sha, _ = sha256_file(str(tmp_path / "forged.uids.npy"))
    m["uids"] = {"path": str(tmp_path / "forged.uids.npy"), "sha256": sha, "count": len(forged)}
    m["num_samples"] = len(forged)
    m["pool"]["path"] = resolve(subset, m["pool"]["path"])
    with open(tmp_path / "forged.manifest.json", "w") as f:
        json.dump(m, f)
    out = tmp_path / "out"
    with pytest.raises(ReshardError, match="cannot reshard: 1 subset uids are not downloaded samples"):
        reshard_stage.run(ReshardConfig(manifest=str(tmp_path / "forged.manifest.json"), output=str(out), shard_size=8),
                          spark if engine == "spark" else None)
    assert not glob.glob(str(out / "shards" / "*.tar"))


def _uids_of(path: str) -> list[str]:
    import numpy as np

    from laiontools.contracts.uids import array_to_uids, load_uids

    return array_to_uids(np.asarray(load_uids(path, mmap=False)))


def test_damaged_source_shard_is_named_before_writing(spark, tmp_path):
    # A source tar that lost a sample the catalog lists must stop the run before any shard is
    # written (the check runs on the joined plan, ahead of the write tasks).
    pool = make_scratch_pool(str(tmp_path / "pool"), n=20, per_shard=8)
    n = read_manifest(pool)["num_samples"]
    sub = subsets_stage.run(SubsetsConfig(pool=pool, output=str(tmp_path / "sub"), scales=str(n - 3), seed=1), spark).details[0]["manifest"]
    path = resolve(pool, read_manifest(pool)["shards"][0]["path"])
    with tarfile.open(path) as tf:
        members = [(ti, tf.extractfile(ti).read()) for ti in tf]
    assert len({ti.name.split(".")[0] for ti, _ in members}) > 3  # so some of them are in the subset of n - 3
    with tarfile.open(path, "w", format=tarfile.USTAR_FORMAT):
        pass  # an empty but valid tar: every sample of this shard is gone
    out = tmp_path / "out"
    with pytest.raises(ReshardError, match="lack samples the catalog lists"):
        reshard_stage.run(ReshardConfig(manifest=sub, output=str(out), shard_size=8), spark)
    assert not glob.glob(str(out / "shards" / "*.tar"))


def _span_source(path, samples: dict[str, list[tuple[str, bytes]]]) -> list:
    """Write a ustar source shard of `samples` (key -> [(ext, bytes)]) and return one catalog-span entry
    per sample (what the in-process plan hands write_output_shards), uid i as 32 hex chars."""
    import io

    from laiontools.stages.reshard import _Entry
    from laiontools.wds.tarscan import sample_spans, tar_members

    with tarfile.open(path, "w", format=tarfile.USTAR_FORMAT) as tf:
        for key, members in samples.items():
            for ext, data in members:
                ti = tarfile.TarInfo(f"{key}.{ext}")
                ti.size = len(data)
                tf.addfile(ti, io.BytesIO(data))
    with open(path, "rb") as f:
        spans = sample_spans(tar_members(f, os.path.getsize(path)))
    return [_Entry(i, f"{i:032x}", "s", key, None, lo, lo + n, n, None) for i, (key, (lo, n)) in enumerate(spans.items())]


def _write(tmp_path, src, entries):
    from laiontools.stages.reshard import write_output_shards

    out = tmp_path / "shards"
    out.mkdir(exist_ok=True)
    return list(write_output_shards(iter([(0, entries)]), str(out), {"s": str(src)}, "plan", 6, True))


@pytest.mark.parametrize("doc", [b"[1,2,3]", b'"s"', b"null", b"3"])
def test_a_source_json_that_is_not_an_object_is_the_one_line_of_invalid_json(tmp_path, doc):
    # (walk F2) valid JSON that is not an object crashed _rewrite_json with AttributeError on .get
    src = tmp_path / "src.tar"
    entries = _span_source(src, {"a": [("jpg", b"x"), ("json", doc)]})
    with pytest.raises(RuntimeError, match=rf"source shard {src}: a\.json is not valid JSON; the shard is damaged, re-download it"):
        _write(tmp_path, src, entries)
    assert not (tmp_path / "shards" / "shard-00000.tar").exists()


def test_a_source_json_in_any_encoding_json_reads_is_rewritten_as_json_dumps_writes_it(tmp_path):
    # the rewrite decodes UTF-8 itself and hands anything else (a BOM, UTF-16) to json.loads, and encodes
    # with the compiled encoder directly: the output must be what json.loads + json.dumps make of it
    meta = {"uid": f"{0:032x}", "caption": "caf\u00e9 \u2028 \"q\" \\ \n\t", "nested": {"z": [1, 2.5, None, True], "a": {}},
            "big": 10**30, "neg": -0.0, "exp": 1e-300, "tiny": 5e-324, "emoji": "\U0001f600"}
    text = json.dumps(meta, indent=1)  # another layout than the output's
    docs = {"a": text.encode(), "b": b"\xef\xbb\xbf" + text.encode(), "c": text.encode("utf-16"), "d": text.encode("utf-32-le")}
    src = tmp_path / "src.tar"
    entries = _span_source(src, {k: [("jpg", b"x"), ("json", d)] for k, d in docs.items()})
    for e in entries:
        e.uid = meta["uid"]
    _write(tmp_path, src, entries)
    with tarfile.open(tmp_path / "shards" / "shard-00000.tar") as tf:
        got = {m.name: tf.extractfile(m).read() for m in tf if m.name.endswith(".json")}
    assert len(got) == 4
    for (name, data), skey in zip(sorted(got.items()), sorted(docs)):
        key = name.removesuffix(".json")
        want = dict(meta, key=key, source_shard="s", source_key=skey)
        assert data == json.dumps(want, sort_keys=True, ensure_ascii=False).encode(), skey


@pytest.mark.parametrize("members, says", [
    ([("jpg", b"x"), ("txt", b"c")], r"sample b has no \.json member, so its uid cannot be checked against the catalog"),
    ([("json", json.dumps({"uid": f"{1:032x}"}).encode()), ("txt", b"c")], r"sample b has no image member \(jpg, jpeg, png, webp; it holds json, txt\)"),
])
def test_a_source_sample_without_json_or_image_is_refused(tmp_path, members, says):
    # (walk F14) reshard copied such a sample: one without a uid, or one train skips unnamed
    src = tmp_path / "src.tar"
    good = [("jpg", b"x"), ("json", json.dumps({"uid": f"{0:032x}"}).encode())]
    entries = _span_source(src, {"a": good, "b": members})
    with pytest.raises(RuntimeError, match=rf"source shard {src}: {says}; the shard is damaged: run `laiontools verify`"):
        _write(tmp_path, src, entries)
    assert not (tmp_path / "shards" / "shard-00000.tar").exists()
    # the tar-index plan (Spark engine) refuses it the same way, before a write task starts
    import pyarrow as pa

    from laiontools.contracts import schema as C
    from laiontools.stages.reshard import _plan_rows
    from laiontools.wds.tarscan import tar_index

    with open(src, "rb") as f:
        idx = tar_index(f, src.stat().st_size)
    b = [(off, size, mt) for name, off, size, mt in idx if name.startswith("b.")]
    batch = pa.RecordBatch.from_pydict({"j": [0], "i": [0], C.UID: [f"{1:032x}"], "_sid": ["s"], C.KEY: ["b"],
                                        "exts": [[ext for ext, _ in members]], "offs": [[x[0] for x in b]],
                                        "sizes": [[x[1] for x in b]], "mtimes": [[x[2] for x in b]]})
    with pytest.raises(RuntimeError, match=says):
        list(_plan_rows([batch], {"s": str(src)}))
    # a whole sample still goes through
    (tmp_path / "shards").rmdir()
    src2 = tmp_path / "src2.tar"
    assert [j for j, _ in _write(tmp_path, src2, _span_source(src2, {"a": good}))] == [0]


def test_a_gzip_source_shard_is_named_as_such_not_as_truncated(tmp_path):
    # (walk F17) a whole gzip tar under a .tar name was "truncated or unreadable ...; re-download it"
    import io

    from laiontools.stages.reshard import index_source_shard

    src = tmp_path / "00004.tar"
    with tarfile.open(src, "w:gz") as tf:
        ti = tarfile.TarInfo("a.jpg")
        ti.size = 1
        tf.addfile(ti, io.BytesIO(b"x"))
    with pytest.raises(RuntimeError) as ei:
        index_source_shard(("00004", str(src)))
    assert str(ei.value).endswith(f"source shard {src} is a gzip-compressed tar; webdataset pool shards must be plain tars (decompress it)")


def test_read_ahead_holds_few_files_and_skips_what_it_cannot_open(tmp_path, monkeypatch):
    # the parent's read-ahead (advice to the kernel while the task processes write) over more source
    # shards than it may hold open: it finishes, closes every file it opened, and a missing shard is
    # left to the task that reads it (which names it)
    srcs = {}
    for s_ in range(5):
        p = tmp_path / f"{s_}.tar"
        p.write_bytes(os.urandom(1 << 16))
        srcs[str(s_)] = str(p)
    srcs["gone"] = str(tmp_path / "gone.tar")
    opened: list[int] = []
    real_file = reshard_stage._Sources._file

    def counting(self, sid):
        f = real_file(self, sid)
        opened.append(len(self.open))
        return f

    monkeypatch.setattr(reshard_stage, "_max_open_files", lambda: 2)
    monkeypatch.setattr(reshard_stage._Sources, "_file", counting)
    fds_before = len(os.listdir("/proc/self/fd"))
    reads = [(sid, off, 4096) for off in (0, 8192, 32768) for sid in srcs]
    with reshard_stage._read_ahead(srcs, reads) as t:
        t.join(timeout=30)
        assert not t.is_alive()  # done by itself, before the block's end stopped it
    assert opened and max(opened) <= 2  # never more than the limit at once (the LRU closed the others)
    assert len(os.listdir("/proc/self/fd")) == fds_before


def test_reshard_of_a_subset_whose_pool_moved_names_the_pool_without_starting_spark(tmp_path, monkeypatch):
    """A subset whose pool was moved: the pool's size could not be counted, which chose Spark, so a JVM
    started (or failed to start, without Java) before the error named the pool. The pool is read first."""
    from laiontools.core import spark as spark_mod
    from laiontools.core.errors import UserError

    monkeypatch.delenv("LAIONTOOLS_SPARK_MASTER", raising=False)
    pool = make_scratch_pool(str(tmp_path / "pool"), n=20, per_shard=8, failures=0)
    res = subsets_stage.run(SubsetsConfig(pool=pool, output=str(tmp_path / "s"), scales="10", seed=1)).details
    shutil.move(str(tmp_path / "pool"), str(tmp_path / "pool_moved"))

    def no_spark(*a, **k):
        raise AssertionError("a Spark session was started for a subset whose pool cannot be read")

    monkeypatch.setattr(spark_mod, "spark_session", no_spark)
    with pytest.raises(UserError) as e:
        reshard_stage.run(ReshardConfig(manifest=res[0]["manifest"], output=str(tmp_path / "r"), shard_size=4))
    assert str(tmp_path / "pool") in str(e.value)


@pytest.mark.parametrize("twice", [("jpg", "jpg"), ("jpg", "JPG")])
def test_a_source_sample_with_an_extension_twice_is_refused_not_written_for_webdataset_to_reject(tmp_path, twice):
    # A sample holding two .jpg members (or .jpg and .JPG, which webdataset lower-cases to one) was
    # copied as it is: the output shard then made webdataset's group_by_keys raise "duplicate file
    # name" in training, and verify flag the shard reshard had just written.
    import pyarrow as pa

    from laiontools.contracts import schema as C
    from laiontools.stages.reshard import _plan_rows
    from laiontools.wds.tarscan import tar_index

    src = tmp_path / "src.tar"
    meta = json.dumps({"uid": f"{0:032x}"}).encode()
    entries = _span_source(src, {"a": [(twice[0], b"x"), (twice[1], b"y"), ("json", meta)]})
    says = rf"source shard {src}: sample a has two \.jpg members \(a\.(jpg|JPG) and a\.(jpg|JPG)\), which webdataset cannot read"
    with pytest.raises(RuntimeError, match=says):
        _write(tmp_path, src, entries)
    assert not (tmp_path / "shards" / "shard-00000.tar").exists()
    if twice[0] == twice[1]:
        return  # the tar index refuses an exact repeat itself (DuplicateMemberError)
    # the tar-index plan (Spark engine) refuses it the same way
    with open(src, "rb") as f:
        idx = tar_index(f, src.stat().st_size)
    batch = pa.RecordBatch.from_pydict({"j": [0], "i": [0], C.UID: [f"{0:032x}"], "_sid": ["s"], C.KEY: ["a"],
                                        "exts": [[n.split(".", 1)[1] for n, *_ in idx]], "offs": [[x[1] for x in idx]],
                                        "sizes": [[x[2] for x in idx]], "mtimes": [[x[3] for x in idx]]})
    with pytest.raises(RuntimeError, match=says):
        list(_plan_rows([batch], {"s": str(src)}))


def test_a_source_json_with_a_lone_surrogate_escape_is_rewritten_not_a_crash(tmp_path):
    # "\ud800" is valid JSON (json.loads and webdataset read it; a caption cut inside an emoji by a
    # UTF-16 tool holds one), but the rewrite encoded json.dumps(ensure_ascii=False) as UTF-8 and
    # crashed with an unnamed UnicodeEncodeError.
    src = tmp_path / "src.tar"
    doc = b'{"uid": "%032x", "caption": "cut \\ud83d here"}' % 0
    entries = _span_source(src, {"a": [("jpg", b"x"), ("json", doc)]})
    for e in entries:
        e.uid = f"{0:032x}"
    _write(tmp_path, src, entries)
    with tarfile.open(tmp_path / "shards" / "shard-00000.tar") as tf:
        got = json.loads(tf.extractfile("00000000000.json").read())
    assert got["caption"] == "cut \ud83d here" and got["source_key"] == "a"


def test_a_catalog_file_storing_columns_as_null_type_is_resharded_on_spark(spark, tmp_path):
    """A pool's catalog whose first file holds its failed rows alone, written by pandas: their all-None shard,
    key and sha256 are stored with Arrow's null type (Spark reads them as int), their widths as double. Spark
    took that file's types and failed on the next file's strings (FAILED_READ_FILE.PARQUET_COLUMN_DATA_TYPE_MISMATCH,
    a Py4JJavaError traceback). Now the same shards as from the catalog as written."""
    import pyarrow.compute as pc
    import pyarrow.parquet as pq

    from laiontools.contracts import schema as C

    pool = make_scratch_pool(str(tmp_path / "pool"), n=30, per_shard=12, failures=3, tag="nt")
    sub = subsets_stage.run(SubsetsConfig(pool=pool, output=str(tmp_path / "sub"), scales="20", seed=5)).details[0]["manifest"]
    reshard_stage.run(ReshardConfig(manifest=sub, output=str(tmp_path / "a"), shard_size=8), spark)
    cat = tmp_path / "pool" / layout.CATALOG_DIR
    t = pq.read_table(str(cat / "part-00000.parquet"))
    t.filter(pc.not_equal(t[C.STATUS], C.STATUS_SUCCESS)).to_pandas().to_parquet(str(cat / "part-00000.parquet"))
    pq.write_table(t.filter(pc.equal(t[C.STATUS], C.STATUS_SUCCESS)), str(cat / "part-00001.parquet"))
    assert pq.read_schema(str(cat / "part-00000.parquet")).field(C.SHARD).type == pa.null()
    reshard_stage.run(ReshardConfig(manifest=sub, output=str(tmp_path / "b"), shard_size=8), spark)
    _same_output(str(tmp_path / "a"), str(tmp_path / "b"))


def test_the_span_sha256_column_decoded_on_its_own_thread_gives_the_same_shards(subset, resharded, tmp_path, monkeypatch):
    """In process, the plan decodes the catalog's span sha256 column (half the bytes it decodes) on a second
    thread beside the other columns (BENCHMARKS.md: the plan 0.059 against 0.070 s at 2 %). Both ways write the
    same shards; the thread's batches are the plan reader's, an error of the thread is raised where its batch is
    taken, and the thread is gone when the plan leaves the file early."""
    import threading

    import pyarrow as pa
    import pyarrow.parquet as pq

    monkeypatch.delenv("LAIONTOOLS_SPARK_MASTER", raising=False)
    for split in (True, False):
        monkeypatch.setattr(spans_mod, "SPLIT_SHA_DECODE", split)
        out = str(tmp_path / f"split-{split}")
        assert reshard_stage.run(ReshardConfig(manifest=subset, output=out, shard_size=8)).details["engine"] == "in-process"
        _same_output(resharded, out)
    path = tmp_path / "c.parquet"
    pq.write_table(pa.table({"tar_sha256": [f"{i:064x}" for i in range(10)]}), path)
    monkeypatch.setattr(spans_mod, "PLAN_BATCH_ROWS", 4)

    def decoding() -> list:
        return [t for t in threading.enumerate() if t.name == "laiontools-plan-decode"]

    with spans_mod._batches_beside(str(path), ["tar_sha256"]) as it:
        got = list(it)
    assert [b.num_rows for b in got] == [4, 4, 2]
    assert [x for b in got for x in b.column(0).to_pylist()] == [f"{i:064x}" for i in range(10)]
    with spans_mod._batches_beside(str(path), ["tar_sha256"]) as it:
        next(it)  # left after one batch of three
    assert decoding() == []
    with pytest.raises(FileNotFoundError), spans_mod._batches_beside(str(tmp_path / "gone.parquet"), ["tar_sha256"]) as it:
        next(it)
    assert decoding() == []
    with spans_mod._batches_beside(str(path), []) as it:
        assert list(it) == [] and decoding() == []


# ---- the subset's own spans (laiontools.contracts.spans): written by subsets, read by reshard


@pytest.fixture(scope="module")
def small_subsets(pool, tmp_path_factory) -> dict:
    """The downloaded pool's subsets of half and an eighth of its samples, in process: only the eighth is at
    most SPANS_MAX_FRACTION of its catalog's rows. The eighth's reshard from the catalog (its spans folder set
    aside while it runs) is the reference."""
    root = tmp_path_factory.mktemp("small_subsets")
    n = read_manifest(pool.manifest)["num_samples"]
    big, small = str(n // 2), str(max(2, n // 8))
    res = subsets_stage.run(SubsetsConfig(pool=pool.manifest, output=str(root / "sub"), scales=f"{big},{small}", seed=3)).details
    by = {r["scale"]: r["manifest"] for r in res}
    spans_dir = root / "sub" / layout.subset_spans(small)
    shutil.move(str(spans_dir), str(root / "aside"))
    ref = reshard_stage.run(ReshardConfig(manifest=by[small], output=str(root / "ref"), shard_size=5)).details
    shutil.move(str(root / "aside"), str(spans_dir))
    assert ref["sample_spans"] == "catalog" and ref["engine"] == "in-process"
    return {"pool": pool.manifest, "sub": str(root / "sub"), "manifests": by, "ref": str(root / "ref"), "big": big, "small": small,
            "scales": f"{big},{small}"}


def test_subsets_writes_a_small_subsets_spans_and_reshard_reads_only_them_for_the_same_shards(small_subsets, tmp_path, monkeypatch):
    """The spans of the small subset are the catalog's (shard, key, span, sha256) of its uids, read here with
    pandas; the half has none. Reshard of the small one reads them and not the catalog (its scan would raise)
    and writes the bytes of the reshard from the catalog."""
    import pandas as pd

    from laiontools.contracts import schema as C

    sub, small = small_subsets["sub"], small_subsets["small"]
    assert not os.path.exists(os.path.join(sub, layout.subset_spans(small_subsets["big"])))
    record = read_json(os.path.join(sub, layout.subset_spans(small), spans_mod.SPANS_JSON))
    uids = array_to_uids(load_uids(os.path.join(sub, layout.subset_uids(small))))
    assert record["count"] == len(uids) == int(small)
    got = pd.read_parquet(os.path.join(sub, layout.subset_spans(small), record["parts"][0]["path"]))
    cat = pd.read_parquet(os.path.join(os.path.dirname(small_subsets["pool"]), layout.CATALOG_DIR))
    want = cat[(cat[C.STATUS] == C.STATUS_SUCCESS) & cat[C.UID].isin(uids)].sort_values(C.UID)
    cols = [C.UID, C.SHARD, C.KEY, C.TAR_OFFSET, C.TAR_LENGTH, C.TAR_SHA256]
    assert got[C.UID].tolist() == sorted(uids)
    assert got[cols].to_dict("records") == want[cols].astype({C.TAR_OFFSET: "int64", C.TAR_LENGTH: "int64"}).to_dict("records")

    def no_scan(*a, **k):
        raise AssertionError("the catalog was scanned although the subset's spans were there")

    monkeypatch.setattr(spans_mod, "scan_catalog", no_scan)
    res = reshard_stage.run(ReshardConfig(manifest=small_subsets["manifests"][small], output=str(tmp_path / "r"), shard_size=5)).details
    assert res["engine"] == "in-process" and res["sample_spans"] == "subset spans"
    _same_output(small_subsets["ref"], str(tmp_path / "r"))


def _rewrite_part(folder: str, change) -> None:
    """Rewrite the one part of spans folder `folder` through `change` (a pandas frame -> frame), its record's
    sha256 updated: only the checks of the content can find it."""
    import hashlib
    import io

    import pandas as pd
    import pyarrow.parquet as pq

    record = read_json(os.path.join(folder, spans_mod.SPANS_JSON))
    path = os.path.join(folder, record["parts"][0]["path"])
    buf = io.BytesIO()
    pq.write_table(pa.Table.from_pandas(change(pd.read_parquet(path)), preserve_index=False), buf)
    data = buf.getvalue()
    with open(path, "wb") as f:
        f.write(data)
    record["parts"][0]["sha256"] = hashlib.sha256(data).hexdigest()
    with open(os.path.join(folder, spans_mod.SPANS_JSON), "w") as f:
        json.dump(record, f)


def _edit_record(folder: str, **changes) -> None:
    record = read_json(os.path.join(folder, spans_mod.SPANS_JSON))
    with open(os.path.join(folder, spans_mod.SPANS_JSON), "w") as f:
        json.dump({**record, **changes}, f)


def _flip_byte(folder: str) -> None:
    path = os.path.join(folder, read_json(os.path.join(folder, spans_mod.SPANS_JSON))["parts"][0]["path"])
    data = bytearray(Path(path).read_bytes())
    data[len(data) // 2] ^= 0x01
    Path(path).write_bytes(bytes(data))


_BAD_SPANS = {
    "a damaged part": (_flip_byte, "sha256 differs"),
    "a missing part": (lambda d: os.remove(os.path.join(d, "part-000000.parquet")), "cannot be read"),
    "a record of another uid file": (lambda d: _edit_record(d, uids_sha256="0" * 64), "another uid file"),
    "a record of another state of the pool": (lambda d: _edit_record(d, pool_sha256="0" * 64), "another state of the pool"),
    "a record of another count": (lambda d: _edit_record(d, count=1), "lists 1 rows"),
    "a record that is not json": (lambda d: Path(d, spans_mod.SPANS_JSON).write_text("{"), "cannot be read"),
    "a record of another version": (lambda d: _edit_record(d, version=99), "not a spans record"),
    "another uid in a part": (lambda d: _rewrite_part(d, lambda df: df.assign(uid=["f" * 32] + df["uid"].tolist()[1:])),
                              "not the uid file's"),
    "a sample without its span": (lambda d: _rewrite_part(d, lambda df: df.assign(tar_offset=[None] + df["tar_offset"].tolist()[1:])),
                                  "without its shard or span"),
    "a part of other columns": (lambda d: _rewrite_part(d, lambda df: df.rename(columns={"key": "kee"}).assign(key=None)[["uid", "shard", "kee", "tar_offset", "tar_length", "tar_sha256"]]),
                                "cannot be read as a spans part"),
    # (review) a record of another shape, or naming a part outside its folder: not used, never a crash
    "a record of parts that are not objects": (lambda d: _edit_record(d, parts=["part-000000.parquet"]), "not a spans record"),
    "a record of a part without its rows": (lambda d: _edit_record(d, parts=[{**read_json(os.path.join(d, spans_mod.SPANS_JSON))["parts"][0], "rows": None}]),
                                            "not a spans record"),
    "a record naming a part outside its folder": (lambda d: _part_elsewhere(d), "not a spans record"),
    # (a new user's walk) values no catalog holds, and a record nested past the JSON parser's depth
    "a negative byte offset": (lambda d: _rewrite_part(d, lambda df: df.assign(tar_offset=[-512] + df["tar_offset"].tolist()[1:])),
                               "negative byte offset or an empty span"),
    "an empty span": (lambda d: _rewrite_part(d, lambda df: df.assign(tar_length=[0] + df["tar_length"].tolist()[1:])),
                      "negative byte offset or an empty span"),
    "a record nested past the parser's depth": (lambda d: Path(d, spans_mod.SPANS_JSON).write_text("[" * 100_000 + "]" * 100_000),
                                                "cannot be read"),
}


def _part_elsewhere(folder: str) -> None:
    """The part moved to a sibling folder and the record naming it there ("../elsewhere/part-000000.parquet")."""
    record = read_json(os.path.join(folder, spans_mod.SPANS_JSON))
    other = os.path.join(os.path.dirname(folder), "elsewhere")
    os.makedirs(other)
    shutil.move(os.path.join(folder, record["parts"][0]["path"]), os.path.join(other, record["parts"][0]["path"]))
    _edit_record(folder, parts=[{**record["parts"][0], "path": "../elsewhere/" + record["parts"][0]["path"]}])


@pytest.mark.parametrize("case", sorted(_BAD_SPANS))
def test_spans_that_do_not_match_the_subset_are_not_used_the_catalog_is_read_with_a_warning(small_subsets, tmp_path, case, caplog):
    """Spans are a cache of the catalog: spans damaged, missing, written for another uid file or pool state, or
    not the subset's uids are not used; the catalog is read (same shards as the reference) and a warning says why."""
    import logging

    sub = str(tmp_path / "sub")
    shutil.copytree(small_subsets["sub"], sub)
    spoil, words = _BAD_SPANS[case]
    spoil(os.path.join(sub, layout.subset_spans(small_subsets["small"])))
    with caplog.at_level(logging.WARNING, logger="laiontools.stages.reshard"):
        res = reshard_stage.run(ReshardConfig(manifest=os.path.join(sub, layout.subset_manifest(small_subsets["small"])), output=str(tmp_path / "r"),
                                              shard_size=5)).details
    assert res["sample_spans"] == "catalog"
    said = [r.getMessage() for r in caplog.records if "spans are not used" in r.getMessage()]
    assert len(said) == 1 and words in said[0], said
    # the same shards (the manifest names the copied subset's path: its shard list compared)
    ref = read_manifest(os.path.join(small_subsets["ref"], layout.RESHARD_MANIFEST))["shards"]
    assert read_manifest(os.path.join(tmp_path / "r", layout.RESHARD_MANIFEST))["shards"] == ref
    for s in ref:
        assert filecmp.cmp(os.path.join(small_subsets["ref"], s["path"]), os.path.join(tmp_path / "r", s["path"]), shallow=False)


def test_a_subsets_run_that_fails_writing_spans_leaves_no_record_naming_old_parts(small_subsets, tmp_path, monkeypatch):
    """subsets removes a spans record before it writes new parts, so a run stopped in between leaves parts without
    a record (reshard reads the catalog), never a record naming parts another run wrote. A new run writes it again."""
    sub = str(tmp_path / "sub")
    cfg = SubsetsConfig(pool=small_subsets["pool"], output=sub, scales=small_subsets["scales"], seed=3)
    assert subsets_stage.run(cfg).ok
    record = os.path.join(sub, layout.subset_spans(small_subsets["small"]), spans_mod.SPANS_JSON)
    before = Path(record).read_bytes()

    def stopped(rows):
        raise RuntimeError("stopped while writing a spans part")

    monkeypatch.setattr(spans_mod, "part_bytes", stopped)
    with pytest.raises(RuntimeError, match="stopped while"):
        subsets_stage.run(cfg)
    assert not os.path.exists(record)
    monkeypatch.undo()
    assert subsets_stage.run(cfg).ok
    assert Path(record).read_bytes() == before


def test_a_catalog_without_spans_gives_subsets_without_spans(tmp_path):
    """A pool downloaded before the catalog recorded byte spans (this hand-built one leaves them null): subsets
    writes no spans (reshard indexes the tars)."""
    pool = make_scratch_pool(str(tmp_path / "pool"), n=60, per_shard=12, failures=6, tag="ns")
    assert subsets_stage.run(SubsetsConfig(pool=pool, output=str(tmp_path / "sub"), scales="40,12", seed=3)).ok
    assert not glob.glob(str(tmp_path / "sub" / "*.spans"))
    assert os.path.exists(tmp_path / "sub" / layout.subset_uids("12"))


def test_spans_written_on_spark_are_the_in_process_ones_and_spark_reshard_reads_them(spark, small_subsets, tmp_path, caplog,
                                                                                   monkeypatch):
    """subsets on Spark writes the small subset's spans as parts written by tasks (one per range partition): the
    rows of the in-process run, in uid order; the half has none. Reshard on Spark of that subset reads them (not
    the catalog) and writes the reference shards; with a part damaged, or one part's rows of another uid file,
    it reads the catalog and says why: the same shards."""
    import logging

    import pandas as pd

    small = small_subsets["small"]
    sub = tmp_path / "sub"
    monkeypatch.setattr(spans_mod, "SPANS_PART_ROWS", 3)  # several parts (one per range partition of about 3 rows)
    assert subsets_stage.run(SubsetsConfig(pool=small_subsets["pool"], output=str(sub), scales=small_subsets["scales"], seed=3,
                                           spark_above=0), spark).ok
    for label in (small, small_subsets["big"]):  # the same selection as in process
        assert (sub / layout.subset_uids(label)).read_bytes() == Path(small_subsets["sub"], layout.subset_uids(label)).read_bytes()
    assert not os.path.exists(sub / layout.subset_spans(small_subsets["big"]))
    record = read_json(str(sub / layout.subset_spans(small) / spans_mod.SPANS_JSON))
    parts = [pd.read_parquet(sub / layout.subset_spans(small) / p["path"]) for p in record["parts"]]
    local = read_json(os.path.join(small_subsets["sub"], layout.subset_spans(small), spans_mod.SPANS_JSON))
    want = pd.read_parquet(os.path.join(small_subsets["sub"], layout.subset_spans(small), local["parts"][0]["path"]))
    assert len(parts) >= 2 and record["count"] == local["count"] == int(small)
    pd.testing.assert_frame_equal(pd.concat(parts, ignore_index=True), want)

    def same_as_ref(out) -> None:
        ref = read_manifest(os.path.join(small_subsets["ref"], layout.RESHARD_MANIFEST))["shards"]
        assert read_manifest(str(out / layout.RESHARD_MANIFEST))["shards"] == ref
        for s in ref:
            assert filecmp.cmp(os.path.join(small_subsets["ref"], s["path"]), str(out / s["path"]), shallow=False)

    manifest = str(sub / layout.subset_manifest(small))
    a = reshard_stage.run(ReshardConfig(manifest=manifest, output=str(tmp_path / "a"), shard_size=5, spark_above=0), spark).details
    assert a["engine"].startswith("spark ") and a["sample_spans"] == "subset spans"
    same_as_ref(tmp_path / "a")

    folder = str(sub / layout.subset_spans(small))
    for case, words in (("a damaged part", "sha256 differs"), ("another uid in a part", "not the uid file's")):
        saved = tmp_path / "saved"
        shutil.copytree(folder, saved)
        if case == "a damaged part":
            _flip_byte(folder)
        else:
            _rewrite_part(folder, lambda df: df.assign(uid=["f" * 32] + df["uid"].tolist()[1:]))
        out = tmp_path / case.replace(" ", "-")
        caplog.clear()
        with caplog.at_level(logging.WARNING, logger="laiontools.stages.reshard"):
            b = reshard_stage.run(ReshardConfig(manifest=manifest, output=str(out), shard_size=5, spark_above=0), spark).details
        assert b["sample_spans"] == "catalog"
        said = [r.getMessage() for r in caplog.records if "spans are not used" in r.getMessage()]
        assert len(said) == 1 and words in said[0], (case, said)
        same_as_ref(out)
        shutil.rmtree(folder)
        shutil.copytree(saved, folder)
        shutil.rmtree(saved)


# (review) what the in-process reader refuses, the Spark reader must refuse too
_BAD_SPANS_SPARK = {
    "a part without the key column": (_BAD_SPANS["a part of other columns"][0], "cannot be read"),
    "a uid twice, once in upper case, another missing": (
        lambda d: _rewrite_part(d, lambda df: df.assign(uid=[df["uid"][0], df["uid"][0].upper()] + df["uid"].tolist()[2:])),
        "not the uid file's"),
    "a negative byte offset": _BAD_SPANS["a negative byte offset"],
    "an empty span": _BAD_SPANS["an empty span"],
}


@pytest.mark.parametrize("case", sorted(_BAD_SPANS_SPARK))
def test_spark_reshard_refuses_the_spans_the_in_process_one_refuses(spark, small_subsets, tmp_path, case, caplog):
    import logging

    sub = str(tmp_path / "sub")
    shutil.copytree(small_subsets["sub"], sub)
    spoil, words = _BAD_SPANS_SPARK[case]
    spoil(os.path.join(sub, layout.subset_spans(small_subsets["small"])))
    manifest = os.path.join(sub, layout.subset_manifest(small_subsets["small"]))
    with caplog.at_level(logging.WARNING, logger="laiontools.stages.reshard"):
        res = reshard_stage.run(ReshardConfig(manifest=manifest, output=str(tmp_path / "r"), shard_size=5, spark_above=0), spark).details
    said = [r.getMessage() for r in caplog.records if "spans are not used" in r.getMessage()]
    assert res["engine"].startswith("spark ") and res["sample_spans"] == "catalog", (res["sample_spans"], said)
    assert len(said) == 1 and words in said[0], said
    ref = read_manifest(os.path.join(small_subsets["ref"], layout.RESHARD_MANIFEST))["shards"]
    assert read_manifest(os.path.join(tmp_path / "r", layout.RESHARD_MANIFEST))["shards"] == ref


def test_a_catalog_listing_each_sample_twice_gives_the_same_spans_on_both_engines_and_the_same_shards(spark, tmp_path):
    """Each sample listed a second time as a success row of a shard the pool does not list ("zzzzz"; the same key
    and span): subsets keeps one row per uid, the smallest (shard id, key, span) as reshard's plan picks it, in
    process (a pandas sort) and on Spark (min(struct)): the same rows, each of the real shard, and reshard from
    them writes the bytes it writes from the catalog (where the same rule picks the row) in process and on Spark."""
    import pandas as pd
    import pyarrow.compute as pc
    import pyarrow.parquet as pq

    from laiontools.contracts import schema as C

    sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(__file__)), "bench"))
    from bench_reshard import build_pool

    mp, _ = build_pool(str(tmp_path / "pool"), shards=2, per_shard=20, kb=2)
    cat = tmp_path / "pool" / layout.CATALOG_DIR
    t = pq.read_table(str(cat / "part-00000.parquet"))
    pq.write_table(t.set_column(t.schema.get_field_index(C.SHARD), C.SHARD, pc.cast(pa.array(["zzzzz"] * t.num_rows), t.schema.field(C.SHARD).type)),
                   str(cat / "part-00001.parquet"))
    rows = {}
    for engine in ("in-process", "spark"):
        sub = tmp_path / f"sub-{engine}"
        kw = {"spark_above": 0} if engine == "spark" else {}
        m = subsets_stage.run(SubsetsConfig(pool=mp, output=str(sub), scales="15,8", seed=4, **kw),
                              spark if engine == "spark" else None).details[1]["manifest"]
        record = read_json(str(sub / layout.subset_spans("8") / spans_mod.SPANS_JSON))
        rows[engine] = pd.concat([pd.read_parquet(sub / layout.subset_spans("8") / p["path"]) for p in record["parts"]], ignore_index=True)
        outs = {}
        for how in ("spans", "catalog"):
            if how == "catalog":
                shutil.rmtree(sub / layout.subset_spans("8"))
            out = tmp_path / f"r-{engine}-{how}"
            res = reshard_stage.run(ReshardConfig(manifest=m, output=str(out), shard_size=3, **kw), spark if engine == "spark" else None).details
            assert res["sample_spans"] == ("subset spans" if how == "spans" else "catalog"), (engine, how)
            outs[how] = read_manifest(str(out / layout.RESHARD_MANIFEST))["shards"]
        assert outs["spans"] == outs["catalog"] and len(outs["spans"]) == 3
    assert len(rows["in-process"]) == 8 and set(rows["in-process"][C.SHARD]) <= {"00000", "00001"}
    pd.testing.assert_frame_equal(rows["in-process"], rows["spark"])


def test_the_shard_id_rule_is_the_same_in_python_arrow_spark_and_the_manifest(spark):
    """A catalog's shard value names its shard by its path under shards/: the id reshard's plan, subsets' complete-
    shard test and Spark's min(struct) key use must be the pool's id of that shard (layout.shard_id of its
    manifest path), in each of the three forms the rule is written in."""
    values = ["00012.tar", "retry01/00003.tar", "x.tar.tar", "plain", "a/b/c.tar", "d.tarx"]
    want = ["00012", "retry01-00003", "x.tar", "plain", "a-b-c", "d.tarx"]  # written by hand
    assert [spans_mod.catalog_shard_id(v) for v in values] == want
    assert spans_mod.arrow_catalog_shard_id(pa.array(values + [None])).to_pylist() == want + [None]
    got = spark.createDataFrame([(v,) for v in values], "shard string").select(spans_mod.spark_shard_id().alias("id")).collect()
    assert [r["id"] for r in got] == want
    assert [layout.shard_id(f"{layout.SHARDS_DIR}/{v}") for v in values if v.endswith(".tar")] == [w for v, w in zip(values, want) if v.endswith(".tar")]


def test_a_scan_that_misses_a_subset_uid_writes_no_spans_and_reshard_reads_the_catalog(small_subsets, tmp_path, monkeypatch, caplog):
    """The spans must hold every uid of the subset: were the catalog scan to miss one (it cannot short of a bug:
    every selected uid is a success row of the catalog), subsets writes no record for that subset and says so,
    and its reshard reads the catalog and writes the reference shards."""
    import logging

    scan = spans_mod.scan_catalog
    monkeypatch.setattr(spans_mod, "scan_catalog", lambda pool, uids: scan(pool, uids).iloc[1:])
    sub = tmp_path / "sub"
    with caplog.at_level(logging.WARNING, logger="laiontools.stages.subsets"):
        res = subsets_stage.run(SubsetsConfig(pool=small_subsets["pool"], output=str(sub), scales=small_subsets["scales"], seed=3)).details
    small = small_subsets["small"]
    said = [r.getMessage() for r in caplog.records if "no spans written" in r.getMessage()]
    assert said == [f"subsets: {small}: {int(small) - 1} of {small} uids found in the catalog's spans; no spans written"]
    assert not os.path.exists(sub / layout.subset_spans(small) / spans_mod.SPANS_JSON)
    monkeypatch.undo()
    m = {r["scale"]: r["manifest"] for r in res}[small]
    out = reshard_stage.run(ReshardConfig(manifest=m, output=str(tmp_path / "r"), shard_size=5)).details
    assert out["sample_spans"] == "catalog"
    ref = read_manifest(os.path.join(small_subsets["ref"], layout.RESHARD_MANIFEST))["shards"]
    assert read_manifest(str(tmp_path / "r" / layout.RESHARD_MANIFEST))["shards"] == ref


def test_spark_spans_of_other_than_the_subsets_count_are_not_recorded(spark, tmp_path):
    """spark_write_spans writes a record only for a subset whose parts hold exactly its uid count: here the
    inner subset (tier >= 1) gets 3 rows where 2 were expected, so it gets parts but no record (reshard reads
    the catalog), and says why; the outer one (4 rows, 4 expected) gets its record."""
    from laiontools.contracts import schema as C

    uids = [f"{i:032x}" for i in (5, 1, 9, 3)]
    df = spark.createDataFrame([(u, f"{i:05d}.tar", f"k{i}", 512 * i, 100, "ab" * 32, t) for i, (u, t) in enumerate(zip(uids, (0, 1, 1, 1)))],
                               f"{C.UID} string, {C.SHARD} string, {C.KEY} string, {C.TAR_OFFSET} long, {C.TAR_LENGTH} long, "
                               f"{C.TAR_SHA256} string, tier int")
    folders = [str(tmp_path / "outer.spans"), str(tmp_path / "inner.spans")]
    why = spans_mod.spark_write_spans(df, folders, [0, 1], [4, 2], ["a" * 64, "b" * 64], "c" * 64)
    assert why == [None, "3 rows for a subset of 2 uids"]
    assert not os.path.exists(os.path.join(folders[1], spans_mod.SPANS_JSON)) and glob.glob(os.path.join(folders[1], "part-*.parquet"))
    record = read_json(os.path.join(folders[0], spans_mod.SPANS_JSON))
    assert record["count"] == 4 and record["uids_sha256"] == "a" * 64 and record["pool_sha256"] == "c" * 64
    import pandas as pd

    got = pd.concat([pd.read_parquet(os.path.join(folders[0], p["path"])) for p in record["parts"]], ignore_index=True)
    assert got[C.UID].tolist() == sorted(uids)


def _swap_spans(df):
    """Two samples of one shard with their spans (offset, length, sha256) swapped: each span still its bytes'
    sha256, inside its shard (two samples of different shards: the one of the smaller shard may get a span past
    its end, "truncated", as the pool's layout of a session has it)."""
    cols = ["tar_offset", "tar_length", "tar_sha256"]
    df = df.copy()
    shard = df["shard"].value_counts().index[0]
    a, b = df.index[df["shard"] == shard][:2]  # (more samples than the pool's shards: one holds two)
    df.loc[[a, b], cols] = df.loc[[b, a], cols].to_numpy()
    return df


@pytest.mark.parametrize("engine", ["in-process", "spark"])
def test_spans_that_pass_their_checks_but_not_the_pools_bytes_are_named_in_the_error(spark, small_subsets, tmp_path, engine):
    """Spans whose values were edited (two samples' spans swapped, each with the sha256 of its bytes, the part's
    sha256 in the record updated) pass every check of the folder: the copy then finds other samples' bytes. The
    error blamed the catalog and advised verifying and re-downloading the pool, which is intact; it now names the
    spans folder and says to remove it (or re-run subsets)."""
    sub = str(tmp_path / "sub")
    shutil.copytree(small_subsets["sub"], sub)
    folder = os.path.join(sub, layout.subset_spans(small_subsets["small"]))
    _rewrite_part(folder, _swap_spans)
    kw = {"spark_above": 0} if engine == "spark" else {}
    with pytest.raises(ReshardError) as e:
        reshard_stage.run(ReshardConfig(manifest=os.path.join(sub, layout.subset_manifest(small_subsets["small"])), output=str(tmp_path / "r"),
                                        shard_size=5, **kw), spark if engine == "spark" else None)
    said = str(e.value)
    assert f"that the subset's spans ({folder}) give" in said and f"remove {folder} and re-run" in said, said
    assert "the catalog gives" not in said and "; the shard changed since download" not in said, said
    assert verify_manifest(small_subsets["pool"]).ok  # the pool is intact
    shutil.rmtree(folder)  # as the error says: the catalog is read, the reference shards written
    res = reshard_stage.run(ReshardConfig(manifest=os.path.join(sub, layout.subset_manifest(small_subsets["small"])), output=str(tmp_path / "r"),
                                          shard_size=5, **kw), spark if engine == "spark" else None).details
    assert res["sample_spans"] == "catalog"
    ref = read_manifest(os.path.join(small_subsets["ref"], layout.RESHARD_MANIFEST))["shards"]
    assert read_manifest(os.path.join(tmp_path / "r", layout.RESHARD_MANIFEST))["shards"] == ref


def test_a_changed_pool_shard_read_through_the_spans_still_says_to_re_download(small_subsets, tmp_path):
    """(second reader) A pool shard whose bytes changed after download, read through the subset's (correct)
    spans: the error must still say what to do when `verify` finds the pool damaged (re-download), as the
    catalog's error does, not only to remove the spans."""
    import pandas as pd

    pool2 = tmp_path / "pool"
    shutil.copytree(os.path.dirname(small_subsets["pool"]), pool2)
    small = small_subsets["small"]
    res = subsets_stage.run(SubsetsConfig(pool=str(pool2 / layout.POOL_MANIFEST), output=str(tmp_path / "sub"),
                                          scales=small_subsets["scales"], seed=3)).details
    m = {r["scale"]: r["manifest"] for r in res}[small]
    folder = tmp_path / "sub" / layout.subset_spans(small)
    record = read_json(str(folder / spans_mod.SPANS_JSON))
    r0 = pd.read_parquet(folder / record["parts"][0]["path"]).iloc[0]
    shard = pool2 / layout.SHARDS_DIR / (r0["shard"] if r0["shard"].endswith(".tar") else r0["shard"] + ".tar")
    with open(shard, "r+b") as f:  # one byte inside the sample's span changed: the pool is damaged, the spans are right
        f.seek(int(r0["tar_offset"]) + int(r0["tar_length"]) // 2)
        b = f.read(1)
        f.seek(-1, 1)
        f.write(bytes([b[0] ^ 0xFF]))
    assert not verify_manifest(str(pool2 / layout.POOL_MANIFEST)).ok
    with pytest.raises(ReshardError) as e:
        reshard_stage.run(ReshardConfig(manifest=m, output=str(tmp_path / "r"), shard_size=5))
    said = str(e.value)
    assert "re-download" in said, said


def _swap_samples(df):
    """The first two rows' samples (shard, key, span, sha256) swapped, uids kept: each key and span still
    its bytes', but the .json of each names the other uid."""
    cols = ["shard", "key", "tar_offset", "tar_length", "tar_sha256"]
    df = df.copy()
    df.loc[[0, 1], cols] = df.loc[[1, 0], cols].to_numpy()
    return df


def test_spans_giving_a_uid_another_samples_bytes_name_the_spans_folder(small_subsets, tmp_path):
    """(second reader) The uid check of the copy (`.json has uid X but the catalog says Y`) reworded too."""
    sub = str(tmp_path / "sub")
    shutil.copytree(small_subsets["sub"], sub)
    folder = os.path.join(sub, layout.subset_spans(small_subsets["small"]))
    _rewrite_part(folder, _swap_samples)
    with pytest.raises(ReshardError) as e:
        reshard_stage.run(ReshardConfig(manifest=os.path.join(sub, layout.subset_manifest(small_subsets["small"])),
                                        output=str(tmp_path / "r"), shard_size=5))
    said = str(e.value)
    assert f"but the subset's spans ({folder}) say" in said and f"remove {folder} and re-run" in said, said
    assert "the catalog and shard disagree" not in said, said


def test_spans_of_text_offsets_do_not_end_the_run_in_a_type_error(small_subsets, tmp_path, caplog):
    """(second reader) A part whose tar_offset / tar_length columns hold text (another tool's writer) was read
    as numbers (as Spark's check reads them); the new range check ended the run in a TypeError. Fractional
    values are refused with the usual warning, the catalog read."""
    import logging

    sub = str(tmp_path / "sub")
    shutil.copytree(small_subsets["sub"], sub)
    folder = os.path.join(sub, layout.subset_spans(small_subsets["small"]))
    _rewrite_part(folder, lambda df: df.assign(tar_offset=df["tar_offset"].astype(str), tar_length=df["tar_length"].astype(str)))
    m = os.path.join(sub, layout.subset_manifest(small_subsets["small"]))
    res = reshard_stage.run(ReshardConfig(manifest=m, output=str(tmp_path / "r"), shard_size=5)).details
    assert res["sample_spans"] == "subset spans", res
    ref = read_manifest(os.path.join(small_subsets["ref"], layout.RESHARD_MANIFEST))["shards"]
    assert read_manifest(os.path.join(tmp_path / "r", layout.RESHARD_MANIFEST))["shards"] == ref
    _rewrite_part(folder, lambda df: df.assign(tar_length=df["tar_length"].astype(float) + 0.5))
    with caplog.at_level(logging.WARNING, logger="laiontools.stages.reshard"):
        res = reshard_stage.run(ReshardConfig(manifest=m, output=str(tmp_path / "r2"), shard_size=5)).details
    assert res["sample_spans"] == "catalog" and "not a whole number" in caplog.text, res


def test_output_shards_a_task_wrote_where_the_driver_does_not_see_are_an_error_not_a_manifest(small_subsets, tmp_path, monkeypatch):
    """Executors writing the output path on their own disks reported every shard written; the driver wrote a
    manifest naming shards its folder did not hold, exit 0, and verify then found 0 samples (a new user's cluster
    run). Simulated by taking one shard (and its marker) away after the tasks: one error naming the folder and no
    manifest; a re-run writes that shard and the reference manifest."""
    m = small_subsets["manifests"][small_subsets["small"]]
    out = tmp_path / "r"
    run_local = reshard_stage._run_local

    def elsewhere(*args, **kw):
        got = run_local(*args, **kw)
        for f in (out / layout.RESHARD_SHARDS_DIR).glob("shard-00001.tar*"):
            f.unlink()
        return got

    monkeypatch.setattr(reshard_stage, "_run_local", elsewhere)
    import re

    monkeypatch.setattr("laiontools.core.storage.VISIBILITY_WAIT_S", 0.0)  # (on a shared file system it looks again for a while)
    with pytest.raises(ReshardError, match=rf"1 of them are not in {re.escape(str(out / layout.RESHARD_SHARDS_DIR))} as the driver "
                                           r"sees it \(e.g. \['shard-00001.tar'\]\)"):
        reshard_stage.run(ReshardConfig(manifest=m, output=str(out), shard_size=5))
    assert not (out / layout.RESHARD_MANIFEST).exists()
    monkeypatch.undo()
    reshard_stage.run(ReshardConfig(manifest=m, output=str(out), shard_size=5))
    ref = read_manifest(os.path.join(small_subsets["ref"], layout.RESHARD_MANIFEST))["shards"]
    assert read_manifest(str(out / layout.RESHARD_MANIFEST))["shards"] == ref


def test_an_output_shard_removed_after_it_was_written_is_written_again_by_the_rerun(small_subsets, tmp_path):
    """A shard whose tar is gone but whose marker is there (removed by hand, or by a cleaner, after the run wrote
    it): the re-run skipped it by its marker, and the check of the folder then failed every re-run. Now that
    re-run says so and removes the marker; the next writes the shard, the reference manifest."""
    m = small_subsets["manifests"][small_subsets["small"]]
    out = tmp_path / "r"
    reshard_stage.run(ReshardConfig(manifest=m, output=str(out), shard_size=5))
    (out / layout.RESHARD_SHARDS_DIR / "shard-00001.tar").unlink()
    (out / layout.RESHARD_MANIFEST).unlink()
    with pytest.raises(ReshardError, match=r"1 output shards in .* were removed after they were written .*shard-00001.tar.*re-run"):
        reshard_stage.run(ReshardConfig(manifest=m, output=str(out), shard_size=5))
    assert not (out / layout.RESHARD_SHARDS_DIR / "shard-00001.tar.done").exists()
    reshard_stage.run(ReshardConfig(manifest=m, output=str(out), shard_size=5))
    ref = read_manifest(os.path.join(small_subsets["ref"], layout.RESHARD_MANIFEST))["shards"]
    assert read_manifest(str(out / layout.RESHARD_MANIFEST))["shards"] == ref


def test_spark_spans_parts_take_the_sessions_parquet_codec(spark, tmp_path):
    """The spans parts Spark's tasks write through pyarrow are compressed with the session's
    spark.sql.parquet.compression.codec (they were zstd whatever it said), as Spark's own writer's files are."""
    import pyarrow.parquet as pq

    from laiontools.contracts import schema as C

    df = spark.createDataFrame([(f"{i:032x}", f"{i % 2:05d}.tar", f"k{i}", 512 * i, 100, "ab" * 32, 0) for i in range(6)],
                               f"{C.UID} string, {C.SHARD} string, {C.KEY} string, {C.TAR_OFFSET} long, {C.TAR_LENGTH} long, "
                               f"{C.TAR_SHA256} string, tier int")
    key = "spark.sql.parquet.compression.codec"
    before = spark.conf.get(key)
    for codec, want in (("gzip", "GZIP"), (before, "ZSTD")):  # (the session default: ours)
        folder = str(tmp_path / codec)
        spark.conf.set(key, codec)
        try:
            assert spans_mod.spark_write_spans(df, [folder], [0], [6], ["a" * 64], "c" * 64) == [None]
        finally:
            spark.conf.set(key, before)
        files = glob.glob(os.path.join(folder, "part-*.parquet"))
        assert files and {pq.ParquetFile(f).metadata.row_group(0).column(c).compression
                          for f in files for c in range(len(spans_mod.SPAN_COLUMNS))} == {want}, codec


def _reshard_through_edited_spans(spark, small_subsets, tmp_path, engine: str, change) -> tuple[str, str]:
    """Reshard the small subset (a copy of it) whose spans folder was edited by `change` (frame, the path of a
    pool shard by its catalog name -> frame), on `engine`; the intact pool checked. Returns (the ReshardError's
    text, the spans folder)."""
    pool_dir = os.path.dirname(small_subsets["pool"])
    sub = str(tmp_path / "sub")
    shutil.copytree(small_subsets["sub"], sub)
    folder = os.path.join(sub, layout.subset_spans(small_subsets["small"]))

    def shard_path(shard: str) -> str:
        return os.path.join(pool_dir, layout.SHARDS_DIR, shard if shard.endswith(".tar") else shard + ".tar")

    _rewrite_part(folder, lambda df: change(df.copy(), shard_path))
    kw = {"spark_above": 0} if engine == "spark" else {}
    with pytest.raises(ReshardError) as e:
        reshard_stage.run(ReshardConfig(manifest=os.path.join(sub, layout.subset_manifest(small_subsets["small"])), output=str(tmp_path / "r"),
                                        shard_size=5, **kw), spark if engine == "spark" else None)
    assert verify_manifest(small_subsets["pool"]).ok  # the pool is intact
    return str(e.value), folder


@pytest.mark.parametrize("engine", ["in-process", "spark"])
def test_a_span_of_part_of_a_sample_is_named_in_the_error(spark, small_subsets, tmp_path, engine):
    """(second reader) An edited spans folder whose span holds only the first of a sample's members, with the
    sha256 of those bytes: the copy finds a sample without its other members, and the error said the (intact)
    shard is damaged. Where the spans came from the subset's spans folder, it names the folder, as the other
    span faults do."""
    import hashlib
    import tarfile

    def first_member_only(df, shard_path):
        path, key = shard_path(df.loc[0, "shard"]), df.loc[0, "key"]
        with tarfile.open(path) as t:
            first = next(m for m in t.getmembers() if m.name.split(".", 1)[0] == key)
        assert first.offset == df.loc[0, "tar_offset"]
        length = first.offset_data + -(-first.size // 512) * 512 - first.offset
        with open(path, "rb") as f:
            f.seek(first.offset)
            df.loc[0, "tar_sha256"] = hashlib.sha256(f.read(length)).hexdigest()
        df.loc[0, "tar_length"] = length
        return df

    said, folder = _reshard_through_edited_spans(spark, small_subsets, tmp_path, engine, first_member_only)
    assert f"that the subset's spans ({folder}) give" in said and "are not a whole sample" in said and f"remove {folder}" in said, said


@pytest.mark.parametrize("engine", ["in-process", "spark"])
def test_spans_that_point_past_a_shards_end_are_named_in_the_error(spark, small_subsets, tmp_path, engine):
    """(second reader) An edited spans folder whose span for a sample lies past its source shard's end passes
    the folder's checks (offsets >= 0, lengths >= 1); the copy then reads short, and the error said only that
    the (intact) source shard "is truncated; re-download it". Where the spans came from the subset's spans
    folder, it names the folder and says to remove it if verify finds the pool intact, as the other span faults do."""

    def past_the_end(df, shard_path):
        df.loc[0, "tar_offset"] = os.path.getsize(shard_path(df.loc[0, "shard"])) + 512
        return df

    said, folder = _reshard_through_edited_spans(spark, small_subsets, tmp_path, engine, past_the_end)
    assert f"that the subset's spans ({folder}) give" in said and f"remove {folder} and re-run" in said, said


def test_what_reshard_takes_for_a_store_asking_for_fewer_requests():
    """_throttled, on the errors the object-store clients raise (each made as its library makes it): S3's
    SlowDown and a bodiless 503 (botocore), a refusal as the cause of s3fs's OSError, gcsfs's 429, aiohttp's
    503; and not a missing key, a refused permission, another HTTP status, or an error met while handling
    a refusal (its context, not its cause)."""
    import errno

    import aiohttp
    from botocore.exceptions import ClientError
    from gcsfs.retry import HttpError

    from laiontools.stages.reshard import _throttled

    def client_error(code: str, message: str) -> ClientError:
        return ClientError({"Error": {"Code": code, "Message": message}, "ResponseMetadata": {"HTTPStatusCode": 503}}, "GetObject")

    def caused(outer: BaseException, cause: BaseException) -> BaseException:
        outer.__cause__ = cause
        return outer

    def in_context(outer: BaseException, context: BaseException) -> BaseException:
        outer.__context__ = context
        return outer

    info = aiohttp.RequestInfo(url=aiohttp.client.URL("http://127.0.0.1/x"), method="GET", headers={})  # type: ignore[call-arg]
    refusals = [client_error("SlowDown", "Please reduce your request rate."), client_error("503", "Service Unavailable"),
                caused(OSError(errno.EBUSY, "Service Unavailable"), client_error("503", "Service Unavailable")),
                HttpError({"code": 429, "message": "rateLimitExceeded"}), aiohttp.ClientResponseError(info, (), status=503)]
    others = [FileNotFoundError("s3://b/k"), PermissionError("403 Forbidden"), client_error("AccessDenied", "Access Denied"),
              HttpError({"code": 404, "message": "No such object"}), aiohttp.ClientResponseError(info, (), status=500),
              in_context(ValueError("bad"), client_error("SlowDown", "Please reduce your request rate."))]
    assert [_throttled(e) for e in refusals] == [True] * len(refusals)
    assert [_throttled(e) for e in others] == [False] * len(others)
