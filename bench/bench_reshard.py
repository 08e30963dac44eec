"""Reshard throughput against a plain sequential copy of the same source tars, same disk, same run.

    .venv/bin/python bench/bench_reshard.py [--shards 8] [--per-shard 1000] [--kb 40] [--out bench-out]

Builds a synthetic pool (webdataset tars of incompressible ~KB-sized "jpg" members + txt + json, a
catalog and a manifest), selects a subset holding every sample, then times, alternating:

* copy:    read each source tar sequentially and write it to another folder on the same disk,
           fsync'd (reshard's atomic writes fsync too), one file after another (the baseline);
* direct copy: the same with O_DIRECT writes from an aligned buffer, as reshard writes by default
           (a stricter baseline: what part of the ratio is bypassing the page cache);
* reshard: `reshard.run` on Spark local[2] (session already started), which plans from the
           catalog, indexes the tars, and writes shuffled, evenly sized shards (nested mode:
           ``--engine default``, as the CLI runs it, in process for pools under 2M catalog rows).

MB/s = source bytes / seconds. The ratio reshard/copy is the figure (target >= 0.5). Spark's fixed
cost per run (planning jobs) weighs heavily on small inputs, so the run is repeated at two pool
sizes (--scale-up) and the marginal throughput (extra bytes / extra seconds) is reported as well.
Figures go to bench-out/reshard.json.

Nested subsets (``--subset-fractions 0.02,0.2``), reshard as users use it: one pool, subsets holding 2%
and 20% of it (selected by `laiontools subsets`, so their samples are scattered over every source tar),
each resharded and compared with a plain copy of the same number of bytes (sequential reads of the
source tars, written as as many fsync'd files as reshard writes shards, same disk, alternated).
Reported per subset: end to end ratio copy_s / reshard_s, and the write phase alone (the part that
does the scattered reads; the plan's cost follows the pool's catalog, not the subset). Figures go to
bench-out/reshard_nested.json.
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import io
import json
import os
import shutil
import statistics
import sys
import tarfile
import time


def build_pool(root: str, shards: int, per_shard: int, kb: int, tar_format: str = "pax", spans: bool = True) -> tuple[str, int]:
    """Write the synthetic pool; return (manifest path, total bytes of the tars).

    tar_format "pax" is what img2dataset writes (webdataset's TarWriter: a pax header with a float
    mtime before every member); "ustar" plain headers. spans: record each sample's byte span in the
    catalog, as download does (reshard then indexes no tar); without, reshard indexes the tars."""
    import numpy as np
    import pyarrow as pa
    import pyarrow.parquet as pq

    from laiontools.contracts import schema as C
    from laiontools.contracts.manifest import new_manifest, write_manifest
    from laiontools.contracts.uids import save_uids, uid_of
    from laiontools.core.storage import PARQUET_WRITE, sha256_file
    from laiontools.wds.tarscan import sample_spans, tar_members

    rng = np.random.default_rng(0)
    os.makedirs(os.path.join(root, "shards"), exist_ok=True)
    rows, entries, uids, total = [], [], [], 0
    for s in range(shards):
        sid = f"{s:05d}"
        path = os.path.join(root, "shards", sid + ".tar")
        fmt = tarfile.PAX_FORMAT if tar_format == "pax" else tarfile.USTAR_FORMAT
        first_row = len(rows)
        with tarfile.open(path, "w", format=fmt) as tf:
            for j in range(per_shard):
                i = s * per_shard + j
                key = f"{s:05d}{j:04d}"
                url, cap = f"http://bench/{i}.jpg", f"caption {i}"
                uid = uid_of(url, cap)
                size = int(rng.integers(kb * 512, kb * 1536))
                for ext, data in (("jpg", rng.bytes(size)), ("txt", cap.encode()), ("json", json.dumps({"uid": uid, "key": key}).encode())):
                    ti = tarfile.TarInfo(f"{key}.{ext}")
                    ti.size, ti.mtime = len(data), (1_700_000_000.25 + i) if tar_format == "pax" else 1_700_000_000
                    tf.addfile(ti, io.BytesIO(data))
                rows.append({C.UID: uid, C.STATUS: C.STATUS_SUCCESS, C.SHARD: sid, C.KEY: key, C.CAPTION: cap})
                uids.append(uid)
        if spans:  # as download records them: each sample's span and the span's sha256
            with open(path, "rb") as f:
                sp = sample_spans(tar_members(f, os.path.getsize(path)))
                for r in rows[first_row:]:
                    r[C.TAR_OFFSET], r[C.TAR_LENGTH] = sp[r[C.KEY]]
                    r[C.TAR_SHA256] = hashlib.sha256(os.pread(f.fileno(), r[C.TAR_LENGTH], r[C.TAR_OFFSET])).hexdigest()
        sha, nbytes = sha256_file(path)
        total += nbytes
        entries.append({"path": f"shards/{sid}.tar", "num_samples": per_shard, "bytes": nbytes, "sha256": sha})
    os.makedirs(os.path.join(root, "catalog"), exist_ok=True)
    full = [{**{c: None for c in C.catalog_columns()}, **r} for r in rows]
    pq.write_table(pa.Table.from_pylist(full, schema=C.catalog_arrow_schema()), os.path.join(root, "catalog", "part-00000.parquet"),
                   **PARQUET_WRITE)  # as download writes it
    usha, n = save_uids(os.path.join(root, "pool.uids.npy"), uids)
    m = new_manifest(
        name=f"bench-{shards}x{per_shard}", kind="pool", num_samples=n, target_samples=None,
        uids={"path": "pool.uids.npy", "sha256": usha, "count": n}, shards=entries,
        source_fingerprint=hashlib.sha256(root.encode()).hexdigest(), catalog={"path": "catalog"}, command=["bench"],
    )
    mp = os.path.join(root, "pool.manifest.json")
    write_manifest(mp, m)
    return mp, total


def sequential_copy(pool_root: str, dst: str, direct: bool = False) -> float:
    """Copy the pool's tars one after another (read + write + fsync); return seconds.

    direct=False is the plain copy (what `cp` does: writes through the page cache), the issue's
    baseline. direct=True writes with O_DIRECT from an aligned buffer, as reshard does by default: a
    stricter baseline that shows how much of the ratio comes from bypassing the page cache."""
    import mmap

    shutil.rmtree(dst, ignore_errors=True)
    os.makedirs(dst)
    srcs = sorted(os.listdir(os.path.join(pool_root, "shards")))
    buf = mmap.mmap(-1, 4 << 20)
    mv = memoryview(buf)
    t = time.perf_counter()
    for name in srcs:
        if not direct:
            with open(os.path.join(pool_root, "shards", name), "rb") as fi, open(os.path.join(dst, name), "wb") as fo:
                shutil.copyfileobj(fi, fo, 1 << 22)
                fo.flush()
                os.fsync(fo.fileno())
            continue
        fd = os.open(os.path.join(dst, name), os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_DIRECT)
        try:
            with open(os.path.join(pool_root, "shards", name), "rb", buffering=0) as fi:
                while n := fi.readinto(mv):
                    if n % 4096:  # the tail: clear O_DIRECT for the unaligned part
                        import fcntl

                        fcntl.fcntl(fd, fcntl.F_SETFL, fcntl.fcntl(fd, fcntl.F_GETFL) & ~os.O_DIRECT)
                    os.write(fd, mv[:n])
            os.fsync(fd)
        finally:
            os.close(fd)
    mv.release()
    buf.close()
    return time.perf_counter() - t


def copy_bytes(pool_root: str, dst: str, nbytes: int, files: int) -> float:
    """Plain copy of `nbytes` bytes: read the source tars sequentially (in name order) and write them
    as `files` fsync'd files of equal size through the page cache (as `cp` does); return seconds."""
    shutil.rmtree(dst, ignore_errors=True)
    os.makedirs(dst)
    srcs = sorted(os.path.join(pool_root, "shards", x) for x in os.listdir(os.path.join(pool_root, "shards")))
    per_file = -(-nbytes // max(1, files))
    t = time.perf_counter()
    left, k, out, in_file = nbytes, 0, None, 0
    # one output file open at a time, closed (after fsync) when full or at the end
    for src in srcs:
        with open(src, "rb", buffering=0) as fi:
            while left > 0:
                if out is None:
                    out, in_file = open(os.path.join(dst, f"copy-{k:05d}.tar"), "wb"), 0  # noqa: SIM115
                    k += 1
                chunk = fi.read(min(1 << 22, left, per_file - in_file))
                if not chunk:
                    break
                out.write(chunk)
                left -= len(chunk)
                in_file += len(chunk)
                if in_file >= per_file:
                    out.flush()
                    os.fsync(out.fileno())
                    out.close()
                    out = None
        if left <= 0:
            break
    if out is not None:
        out.flush()
        os.fsync(out.fileno())
        out.close()
    secs = time.perf_counter() - t
    if left > 0:
        raise ValueError(f"the pool holds fewer than {nbytes} bytes")
    return secs


def subset_spans(root: str, subset_manifest: str) -> list[tuple[str, int, int]]:
    """(source tar, offset, length) of each sample of a subset, in (tar, offset) order: the subset's spans
    written by subsets (``<scale>.spans/``), the pool's shards named ``<shard>.tar``."""
    import glob

    import pandas as pd

    folder = subset_manifest.removesuffix(".manifest.json") + ".spans"
    rows = pd.concat([pd.read_parquet(f, columns=["shard", "tar_offset", "tar_length"])
                      for f in sorted(glob.glob(os.path.join(folder, "part-*.parquet")))], ignore_index=True)
    rows = rows.sort_values(["shard", "tar_offset"], kind="stable")
    return [(os.path.join(root, "shards", f"{sh}.tar"), int(o), int(n))
            for sh, o, n in zip(rows["shard"], rows["tar_offset"], rows["tar_length"])]


def copy_spans(spans: list[tuple[str, int, int]], dst: str, files: int, ahead: bool = False) -> float:
    """Plain copy of the subset's very bytes: each sample's span read (pread, in tar and offset order: the
    best order for a copy) and written into `files` fsync'd files of about equal size through the page
    cache; return seconds. The other reading of the issue's "a plain copy of the same bytes" than
    :func:`copy_bytes` (the same number of bytes, read sequentially), which is the stricter baseline: this
    one reads what reshard reads, scattered as it is. `ahead`: a thread announces every span to the kernel
    first, in the same order (``POSIX_FADV_WILLNEED``, as reshard's parent does while its tasks write): the
    fastest plain copy of these bytes that reshard's own read path suggests; otherwise no read-ahead."""
    import threading

    shutil.rmtree(dst, ignore_errors=True)
    os.makedirs(dst)
    total = sum(n for _, _, n in spans)
    per_file = -(-total // max(1, files))
    t = time.perf_counter()
    fds: dict[str, int] = {}
    out, in_file, k = None, 0, 0
    advisor = None
    if ahead:
        ahead_fds = {path: os.open(path, os.O_RDONLY) for path in {sp[0] for sp in spans}}

        def advise() -> None:
            for path, off, n in spans:
                os.posix_fadvise(ahead_fds[path], off, n, os.POSIX_FADV_WILLNEED)

        advisor = threading.Thread(target=advise, daemon=True)
        advisor.start()
    try:
        for path, off, n in spans:
            fd = fds.get(path)
            if fd is None:
                fd = fds[path] = os.open(path, os.O_RDONLY)
            data = os.pread(fd, n, off)
            if len(data) != n:
                raise ValueError(f"{path}: short read at {off}")
            if out is None:
                out, in_file = open(os.path.join(dst, f"copy-{k:05d}.tar"), "wb"), 0  # noqa: SIM115
                k += 1
            out.write(data)
            in_file += n
            if in_file >= per_file:
                out.flush()
                os.fsync(out.fileno())
                out.close()
                out = None
        if out is not None:
            out.flush()
            os.fsync(out.fileno())
            out.close()
    finally:
        for fd in fds.values():
            os.close(fd)
        if advisor is not None:
            advisor.join()
            for fd in ahead_fds.values():
                os.close(fd)
    return time.perf_counter() - t


class _PhaseTimes:
    """Collects reshard's per-phase log lines ("planned ... in N s", "wrote ... in N s") of one run."""

    def __init__(self) -> None:
        import logging

        self.times: dict[str, float] = {}
        self.handler = logging.Handler()
        self.handler.emit = self._emit  # type: ignore[method-assign]

    def _emit(self, record) -> None:
        msg = record.msg
        if msg.startswith("reshard: planned"):
            self.times["plan_s"] = float(record.args[1])  # (samples, seconds[, where the spans came from])
        elif msg.startswith("reshard: wrote"):
            self.times["write_s"] = float(record.args[-1])
        elif msg.startswith(("reshard: sample byte spans", "reshard: indexed")):
            self.times["spans_s"] = float(record.args[-1])

    def __enter__(self) -> dict[str, float]:
        import logging

        logging.getLogger("laiontools.stages.reshard").addHandler(self.handler)
        return self.times

    def __exit__(self, *exc) -> None:
        import logging

        logging.getLogger("laiontools.stages.reshard").removeHandler(self.handler)


@contextlib.contextmanager
def _compiled_off(off: bool):
    """Reshard's per-sample parse and packing in Python (as without a C compiler) while `off`: the
    module attributes the stage reads, set before its task processes fork (Spark's workers, in other
    processes, keep the compiled path)."""
    from laiontools.stages import reshard as reshard_stage
    from laiontools.wds import writer

    saved = reshard_stage._native_members, writer._pack_members
    if off:
        reshard_stage._native_members = writer._pack_members = None
    try:
        yield
    finally:
        reshard_stage._native_members, writer._pack_members = saved


@contextlib.contextmanager
def _one_decode_thread(on: bool):
    """Reshard's catalog scan decoding every catalog column on one thread while `on` (spans.SPLIT_SHA_DECODE off)."""
    from laiontools.contracts import spans

    saved = spans.SPLIT_SHA_DECODE
    if on:
        spans.SPLIT_SHA_DECODE = False
    try:
        yield
    finally:
        spans.SPLIT_SHA_DECODE = saved


@contextlib.contextmanager
def _catalog_scan(on: bool):
    """Reshard planning from the pool's catalog (as before subsets wrote each subset's spans) while `on`: the
    subset's spans folder is not read (spans.read_spans finds none)."""
    from laiontools.contracts import spans

    saved = spans.read_spans
    if on:
        spans.read_spans = lambda *a, **k: (None, None)
    try:
        yield
    finally:
        spans.read_spans = saved


@contextlib.contextmanager
def _no_spans_written(on: bool):
    """subsets writing no subset's spans while `on` (spans.SPANS_MAX_FRACTION 0)."""
    from laiontools.contracts import spans

    saved = spans.SPANS_MAX_FRACTION
    if on:
        spans.SPANS_MAX_FRACTION = 0.0
    try:
        yield
    finally:
        spans.SPANS_MAX_FRACTION = saved


def evict(root: str) -> None:
    """Drop the pool's source tars and catalog from the page cache (fsync, then POSIX_FADV_DONTNEED: no
    root needed), so that the next run reads them from the disk, as a pool of LAION size is read."""
    for sub in ("shards", "catalog"):
        d = os.path.join(root, sub)
        for name in os.listdir(d):
            fd = os.open(os.path.join(d, name), os.O_RDONLY)
            try:
                os.fsync(fd)
                os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
            finally:
                os.close(fd)


def nested(spark, work: str, shards: int, per_shard: int, kb: int, fractions: list[float], repeats: int,
           engine: str = "default", cold: bool = False, compare: str | None = None) -> dict:
    """Reshard subsets holding `fractions` of one pool against a plain copy of the same bytes.
    `engine`: "default" runs reshard as the CLI does (in process below --spark-above catalog rows),
    "spark" on the bench's Spark session. `cold`: the pool is dropped from the page cache before every
    reshard and every copy (both read it from the disk); otherwise both read it from the page cache.
    `compare`: also reshard each subset another way, alternated with the default run, and report both:
    "python", with the compiled per-sample path off (laiontools.wds.tarfast); "direct-io", with the
    output written with O_DIRECT whatever its size (reshard --direct-io); "one-decode-thread", with the
    plan's catalog columns all decoded on one thread (spans.SPLIT_SHA_DECODE off; the catalog is read only
    where the subset has no spans); "catalog-scan", planned from the pool's catalog, not the subset's spans."""
    from laiontools.contracts.manifest import read_manifest
    from laiontools.stages import reshard as reshard_stage
    from laiontools.stages import subsets as subsets_stage
    from laiontools.stages.reshard import ReshardConfig
    from laiontools.stages.subsets import SubsetsConfig

    root = os.path.join(work, f"pool-nested-{shards}x{per_shard}x{kb}")
    shutil.rmtree(root, ignore_errors=True)
    t = time.perf_counter()
    mp, total = build_pool(root, shards, per_shard, kb)
    build_s = time.perf_counter() - t
    n = shards * per_shard
    targets = [max(1, round(f * n)) for f in fractions]
    # subsets, timed with and without writing the subsets' spans (what moved there from each reshard's plan),
    # alternated, on the engine the CLI picks (in process below --spark-above catalog rows) unless --engine
    # spark; the last run (with spans) is the one resharded
    subsets_s: dict[bool, list[float]] = {True: [], False: []}
    for r in range(5):
        for with_spans in ([False, True] if r % 2 == 0 else [True, False]) if r < 4 else [True]:
            shutil.rmtree(os.path.join(root, "subsets"), ignore_errors=True)
            if cold:
                evict(root)
            with _no_spans_written(not with_spans):
                t = time.perf_counter()
                rows = subsets_stage.run(SubsetsConfig(pool=mp, output=os.path.join(root, "subsets"), scales=",".join(map(str, targets)),
                                                       seed=0), spark if engine == "spark" else None).details
                subsets_s[with_spans].append(time.perf_counter() - t)
    by_n = {int(r["target"]): r["manifest"] for r in rows}
    out: dict = {"pool_samples": n, "pool_mb": round(total / 1e6, 1), "pool_shards": shards, "build_s": round(build_s, 1),
                 "page_cache": "cold (dropped before each run)" if cold else "warm", "subsets": [],
                 "subsets_s_writing_spans": [round(x, 3) for x in subsets_s[True]],
                 "subsets_s_without_spans": [round(x, 3) for x in subsets_s[False]]}
    print(json.dumps({k: out[k] for k in ("subsets_s_writing_spans", "subsets_s_without_spans")}), flush=True)
    for f, target in zip(fractions, targets):
        sub = by_n[target]
        m = read_manifest(sub)
        shard_size = max(100, target // 16)  # >= 16 output shards: both task slots busy
        copies, reshards, phases, touched, direct_used, spans_used = [], [], [], None, None, None
        pure_s, pure_phases, span_copies, ahead_copies = [], [], [], []
        spans = subset_spans(root, sub)
        res = None
        def timed_copy(copies: list[float], nbytes: int, files: int, span_copies: list[float] = span_copies,
                       spans: list[tuple[str, int, int]] = spans, ahead_copies: list[float] = ahead_copies) -> None:
            # the plain copy of as many bytes, read sequentially (the baseline), and of the subset's own spans
            # (the other reading), without and with the spans announced ahead, one after the other, each from a
            # cold page cache when `cold`
            if cold:
                evict(root)
            copies.append(copy_bytes(root, os.path.join(root, "copy"), nbytes, files))
            if cold:
                evict(root)
            span_copies.append(copy_spans(spans, os.path.join(root, "copy"), files))
            if cold:
                evict(root)
            ahead_copies.append(copy_spans(spans, os.path.join(root, "copy"), files, ahead=True))

        for r in range(repeats):
            dst = os.path.join(root, f"reshard-{target}")
            if r % 2 == 1:  # the copy before the reshard every other repeat: drift does not favour one side
                timed_copy(copies, res["bytes"], res["num_shards"])
            # --compare: the same reshard the other way, before or after the default one by turns (the
            # machine's speed drifts), the same output checked
            written = {}
            for pure in ([r % 2 == 0, r % 2 == 1] if compare else [False]):
                shutil.rmtree(dst, ignore_errors=True)
                if cold:
                    evict(root)
                with _PhaseTimes() as ph, _compiled_off(pure and compare == "python"), _one_decode_thread(pure and compare == "one-decode-thread"), \
                        _catalog_scan(pure and compare == "catalog-scan"):
                    t = time.perf_counter()
                    res = reshard_stage.run(ReshardConfig(manifest=sub, output=dst, shard_size=shard_size,
                                                          direct_io=True if pure and compare == "direct-io" else None),
                                            spark if engine == "spark" else None).details
                    (pure_s if pure else reshards).append(time.perf_counter() - t)
                (pure_phases if pure else phases).append(dict(ph))
                if not pure:
                    direct_used, spans_used = res.get("direct_io"), res.get("sample_spans")
                if res["num_samples"] != m["num_samples"]:
                    raise AssertionError(f"reshard wrote {res['num_samples']} samples of the subset's {m['num_samples']}")
                written[pure] = read_manifest(os.path.join(dst, "subset.manifest.json"))["shards"]  # names, sizes, sha256
            if len(set(map(json.dumps, written.values()))) > 1:
                raise AssertionError(f"the default run and the {compare} run wrote different shards")
            if touched is None:  # how scattered the reads are: source tars the subset's samples come from
                from laiontools.core.storage import read_marker

                touched = len({s for sh in range(res["num_shards"])
                               for s in (read_marker(os.path.join(dst, "shards", f"shard-{sh:05d}.tar")) or {}).get("sources", [])})
            shutil.rmtree(dst, ignore_errors=True)
            if r % 2 == 0:
                timed_copy(copies, res["bytes"], res["num_shards"])
        shutil.rmtree(os.path.join(root, "copy"), ignore_errors=True)

        med = statistics.median  # of an even count: the mean of the middle two

        copy_s, reshard_s = med(copies), med(reshards)
        write_s = med([p.get("write_s", float("nan")) for p in phases])
        mb = res["bytes"] / 1e6
        out["subsets"].append({
            "fraction": f, "engine": res["engine"], "samples": m["num_samples"], "mb": round(mb, 1), "output_shards": res["num_shards"],
            "source_tars_read": touched, "copy_s": [round(x, 3) for x in copies], "reshard_s": [round(x, 2) for x in reshards],
            "phases_s": phases, "copy_mb_s": round(mb / copy_s, 1), "reshard_mb_s": round(mb / reshard_s, 1),
            "ratio": round(copy_s / reshard_s, 3), "write_phase_mb_s": round(mb / write_s, 1) if write_s > 0 else None,
            "ratio_write_phase": round(copy_s / write_s, 3) if write_s > 0 else None,
            "output_written": "with O_DIRECT" if direct_used else "through the page cache", "sample_spans": spans_used,
            # against a plain copy of the subset's very spans (scattered reads, in tar and offset order)
            "span_copy_s": [round(x, 3) for x in span_copies], "ratio_vs_span_copy": round(med(span_copies) / reshard_s, 3),
            # ... and against the same copy with every span announced to the kernel ahead, as reshard does
            "span_copy_ahead_s": [round(x, 3) for x in ahead_copies],
            "ratio_vs_span_copy_ahead": round(med(ahead_copies) / reshard_s, 3),
        })
        if compare == "direct-io":
            d_s = med(pure_s)
            d_write = med([p.get("write_s", float("nan")) for p in pure_phases])
            out["subsets"][-1].update({"direct_io_reshard_s": [round(x, 2) for x in pure_s], "direct_io_phases_s": pure_phases,
                                       "direct_io_ratio": round(copy_s / d_s, 3), "direct_io_ratio_write_phase": round(copy_s / d_write, 3),
                                       "default_speedup_over_direct_io": round(d_s / reshard_s, 3)})
        if compare == "one-decode-thread":
            o_s = med(pure_s)
            o_plan = med([p.get("plan_s", float("nan")) for p in pure_phases])
            out["subsets"][-1].update({"one_thread_reshard_s": [round(x, 2) for x in pure_s], "one_thread_phases_s": pure_phases,
                                       "one_thread_ratio": round(copy_s / o_s, 3), "one_thread_plan_s": round(o_plan, 3),
                                       "plan_s": round(med([p.get("plan_s", float("nan")) for p in phases]), 3),
                                       "split_decode_speedup": round(o_s / reshard_s, 3)})
        if compare == "catalog-scan":
            c_s = med(pure_s)
            out["subsets"][-1].update({"catalog_scan_reshard_s": [round(x, 2) for x in pure_s], "catalog_scan_phases_s": pure_phases,
                                       "catalog_scan_ratio": round(copy_s / c_s, 3),
                                       "catalog_scan_plan_s": round(med([p.get("plan_s", float("nan")) for p in pure_phases]), 3),
                                       "plan_s": round(med([p.get("plan_s", float("nan")) for p in phases]), 3),
                                       "spans_speedup": round(c_s / reshard_s, 3)})
        if compare == "python":
            py_s = med(pure_s)
            py_write = med([p.get("write_s", float("nan")) for p in pure_phases])
            out["subsets"][-1].update({"python_reshard_s": [round(x, 2) for x in pure_s], "python_phases_s": pure_phases,
                                       "python_ratio": round(copy_s / py_s, 3), "python_ratio_write_phase": round(copy_s / py_write, 3),
                                       "compiled_speedup": round(py_s / reshard_s, 3), "compiled_speedup_write_phase": round(py_write / write_s, 3)})
        print(json.dumps(out["subsets"][-1]), flush=True)
    return out


def one_size(spark, work: str, shards: int, per_shard: int, kb: int, shard_size: int, repeats: int, tar_format: str = "pax", spans: bool = True) -> dict:
    from laiontools.stages import reshard as reshard_stage
    from laiontools.stages import subsets as subsets_stage
    from laiontools.stages.reshard import ReshardConfig
    from laiontools.stages.subsets import SubsetsConfig

    root = os.path.join(work, f"pool-{shards}x{per_shard}x{kb}-{tar_format}{'-spans' if spans else ''}")
    shutil.rmtree(root, ignore_errors=True)
    mp, total = build_pool(root, shards, per_shard, kb, tar_format, spans)
    n = shards * per_shard
    sub = subsets_stage.run(SubsetsConfig(pool=mp, output=os.path.join(root, "subsets"), scales=str(n), seed=0), spark).details[0]["manifest"]
    copies, direct_copies, reshards = [], [], []
    res = None

    def do_reshard(r: int) -> None:
        nonlocal res
        out = os.path.join(root, f"reshard-{r}")
        shutil.rmtree(out, ignore_errors=True)
        t = time.perf_counter()
        res = reshard_stage.run(ReshardConfig(manifest=sub, output=out, shard_size=shard_size), spark).details
        assert res["sample_spans"] == ("catalog" if spans else "tar index"), res["sample_spans"]
        reshards.append(time.perf_counter() - t)
        assert res["num_samples"] == n, (res["num_samples"], n)  # the whole subset written, not a fast partial one
        shutil.rmtree(out, ignore_errors=True)

    for r in range(repeats):
        # copy, O_DIRECT copy, reshard; reversed every other repeat (the machine's speed drifts), and as
        # many runs of each: the medians compare like counts
        steps = [lambda: copies.append(sequential_copy(root, os.path.join(root, "copy"))),
                 lambda: direct_copies.append(sequential_copy(root, os.path.join(root, "copy"), direct=True)),
                 lambda r=r: do_reshard(r)]
        for step in (steps if r % 2 == 0 else steps[::-1]):
            step()
    shutil.rmtree(os.path.join(root, "copy"), ignore_errors=True)
    copy_s = statistics.median(copies)
    dcopy_s = statistics.median(direct_copies)
    reshard_s = statistics.median(reshards)
    mb = total / 1e6
    return {
        "samples": n, "source_mb": round(mb, 1), "output_mb": round(res["bytes"] / 1e6, 1), "output_shards": res["num_shards"],
        "copy_s": [round(x, 2) for x in copies], "reshard_s": [round(x, 2) for x in reshards],
        "copy_mb_s": round(mb / copy_s, 1), "reshard_mb_s": round(mb / reshard_s, 1), "ratio": round(copy_s / reshard_s, 3),
        "direct_copy_s": [round(x, 2) for x in direct_copies], "direct_copy_mb_s": round(mb / dcopy_s, 1),
        "ratio_vs_direct_copy": round(dcopy_s / reshard_s, 3),
        "_copy_s": copy_s, "_reshard_s": reshard_s, "_dcopy_s": dcopy_s,
    }


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--shards", type=int, default=8)
    ap.add_argument("--per-shard", type=int, default=1000)
    ap.add_argument("--kb", type=int, default=40, help="mean size of the image member in KB")
    ap.add_argument("--shard-size", type=int, default=1000, help="output shard size")
    ap.add_argument("--scale-up", type=int, default=3, help="second run with this many times the shards (0: skip)")
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--tar-format", choices=["pax", "ustar"], default="pax", help="source tars as img2dataset writes them (pax) or plain ustar")
    ap.add_argument("--catalog-spans", action=argparse.BooleanOptionalAction, default=True,
                    help="record sample byte spans in the catalog as download does (--no-catalog-spans: reshard indexes the tars)")
    ap.add_argument("--subset-fractions", default=None,
                    help="nested mode: reshard subsets holding these fractions of one pool (e.g. 0.02,0.2) vs a copy of the same bytes")
    ap.add_argument("--engine", choices=["default", "spark"], default="default",
                    help="nested mode: reshard as the CLI runs it (default: in process below --spark-above catalog rows) or on Spark local[2]")
    ap.add_argument("--cold", action="store_true",
                    help="nested mode: drop the pool from the page cache before every reshard and copy (both read from disk)")
    ap.add_argument("--compare-python", dest="compare", action="store_const", const="python",
                    help="nested mode: also reshard with the compiled per-sample path off (as without a C compiler), alternated, and report both")
    ap.add_argument("--compare-direct-io", dest="compare", action="store_const", const="direct-io",
                    help="nested mode: also reshard with the output written with O_DIRECT whatever its size (--direct-io), alternated, and report both")
    ap.add_argument("--compare-one-decode-thread", dest="compare", action="store_const", const="one-decode-thread",
                    help="nested mode: also reshard with the plan's catalog columns decoded on one thread (the span sha256 "
                         "column not on a thread of its own), alternated, and report both")
    ap.add_argument("--compare-catalog-scan", dest="compare", action="store_const", const="catalog-scan",
                    help="nested mode: also reshard planning from the pool's catalog instead of the subset's spans (as before "
                         "subsets wrote them), alternated, and report both")
    ap.add_argument("--out", default="bench-out")
    ap.add_argument("--work", default=None, help="folder for the pools (default: <out>/reshard-work), on the disk to measure")
    a = ap.parse_args()
    from laiontools.core.logs import setup_logging
    from laiontools.core.spark import spark_session

    setup_logging("WARNING")
    import logging

    logging.getLogger("laiontools.stages.reshard").setLevel(logging.INFO)  # its per-stage timings
    work = a.work or os.path.join(a.out, "reshard-work")
    os.makedirs(work, exist_ok=True)
    sizes = [a.shards] + ([a.shards * a.scale_up] if a.scale_up else [])
    results = []
    load_before = [round(x, 1) for x in os.getloadavg()]
    if a.subset_fractions:
        return main_nested(a, work, load_before)
    with spark_session("local[2]", app_name="bench-reshard", conf={"spark.ui.showConsoleProgress": "false"}) as spark:
        one_size(spark, work, 1, 50, 4, 10, 1)  # warm-up (JVM JIT, Python workers): not reported
        for s in sizes:
            r = one_size(spark, work, s, a.per_shard, a.kb, a.shard_size, a.repeats, a.tar_format, a.catalog_spans)
            results.append(r)
            print(json.dumps({k: v for k, v in r.items() if not k.startswith("_")}), flush=True)
    # The machine may be shared: the load average says how much the absolute figures are inflated.
    out = {"benchmark": "reshard vs sequential copy", "machine": f"{os.cpu_count()} cpus, Spark local[2]",
           "source_tars": a.tar_format, "sample_spans_in_catalog": a.catalog_spans,
           "loadavg_1_5_15": {"before": load_before, "after": [round(x, 1) for x in os.getloadavg()]}, "results": []}
    for r in results:
        out["results"].append({k: v for k, v in r.items() if not k.startswith("_")})
    if len(results) == 2:
        a_, b_ = results
        dmb = b_["source_mb"] - a_["source_mb"]
        dcopy, dreshard = b_["_copy_s"] - a_["_copy_s"], b_["_reshard_s"] - a_["_reshard_s"]
        if dcopy <= 0 or dreshard <= 0:
            # The larger input did not take longer: run-to-run noise (a loaded machine, fixed Spark
            # costs) is bigger than the marginal cost, so no marginal figure can be read from this run.
            out["marginal"] = {"copy_mb_s": None, "reshard_mb_s": None, "ratio": None, "reshard_fixed_s": None,
                               "note": f"not measurable: extra seconds copy {dcopy:.2f}, reshard {dreshard:.2f}"}
        else:
            marg_copy, marg_reshard = dmb / dcopy, dmb / dreshard
            ddirect = b_["_dcopy_s"] - a_["_dcopy_s"]
            marg_direct = dmb / ddirect if ddirect > 0 else None
            out["marginal"] = {
                "copy_mb_s": round(marg_copy, 1), "reshard_mb_s": round(marg_reshard, 1), "ratio": round(marg_reshard / marg_copy, 3),
                "direct_copy_mb_s": round(marg_direct, 1) if marg_direct else None,
                "ratio_vs_direct_copy": round(marg_reshard / marg_direct, 3) if marg_direct else None,
                "reshard_fixed_s": round(a_["_reshard_s"] - a_["source_mb"] / marg_reshard, 1),
            }
    # What the output's sha256 alone allows: every output byte is hashed (the manifest needs it), one
    # stream per task, on at most Spark's 2 task slots; hashing alone caps reshard at this MB/s.
    blob = os.urandom(64 << 20)
    t = time.perf_counter()
    hashlib.sha256(blob).hexdigest()
    sha_mb_s = len(blob) / 1e6 / (time.perf_counter() - t)
    copy_ref = out.get("marginal", {}).get("copy_mb_s") or results[-1]["copy_mb_s"]
    out["sha256_ceiling"] = {"sha256_mb_s_one_core": round(sha_mb_s, 1), "task_slots": 2,
                             "hash_only_reshard_mb_s": round(2 * sha_mb_s, 1),
                             "hash_only_ratio_vs_copy": round(2 * sha_mb_s / copy_ref, 3)}
    cmd = "python bench/bench_reshard.py " + " ".join(sys.argv[1:])
    out["command"] = cmd.strip()
    os.makedirs(a.out, exist_ok=True)
    with open(os.path.join(a.out, "reshard.json"), "w") as f:
        json.dump(out, f, indent=2)
    print(f"\n{'source MB':>10} {'copy MB/s':>10} {'reshard MB/s':>13} {'ratio':>6} {'direct copy MB/s':>17} {'ratio':>6}")
    for r in out["results"]:
        print(f"{r['source_mb']:>10.1f} {r['copy_mb_s']:>10.1f} {r['reshard_mb_s']:>13.1f} {r['ratio']:>6.3f} "
              f"{r['direct_copy_mb_s']:>17.1f} {r['ratio_vs_direct_copy']:>6.3f}")
    if "marginal" in out and out["marginal"]["ratio"] is None:
        print(f"marginal: {out['marginal']['note']}")
    elif "marginal" in out:
        mg = out["marginal"]
        print(f"marginal (extra MB / extra s): copy {mg['copy_mb_s']} MB/s, reshard {mg['reshard_mb_s']} MB/s, ratio {mg['ratio']}; "
              f"O_DIRECT copy {mg['direct_copy_mb_s']} MB/s, ratio {mg['ratio_vs_direct_copy']}; reshard fixed cost ~{mg['reshard_fixed_s']} s")
    sc = out["sha256_ceiling"]
    print(f"sha256 on one core {sc['sha256_mb_s_one_core']} MB/s: hashing alone caps reshard on 2 task slots at "
          f"{sc['hash_only_reshard_mb_s']} MB/s = {sc['hash_only_ratio_vs_copy']} of copy")
    print(f"\ncommand: {out['command']}   (figures in {os.path.join(a.out, 'reshard.json')})")
    return 0


def main_nested(a: argparse.Namespace, work: str, load_before: list[float]) -> int:
    from laiontools.core.spark import spark_session

    fractions = [float(x) for x in a.subset_fractions.split(",")]
    with spark_session("local[2]", app_name="bench-reshard", conf={"spark.ui.showConsoleProgress": "false"}) as spark:
        one_size(spark, work, 1, 50, 4, 10, 1)  # warm-up (JVM JIT, Python workers): not reported
        out = nested(spark, work, a.shards, a.per_shard, a.kb, fractions, a.repeats, a.engine, a.cold, a.compare)
        if a.scale_up:
            # The same fractions of a pool scale_up times larger: the extra bytes over the extra seconds
            # is the throughput with Spark's fixed cost per run (plan jobs, task start) taken out.
            big = nested(spark, work, a.shards * a.scale_up, a.per_shard, a.kb, fractions, a.repeats, a.engine, a.cold, a.compare)
            out["larger_pool"] = big
            out["marginal"] = []
            for s1, s2 in zip(out["subsets"], big["subsets"]):
                dmb = s2["mb"] - s1["mb"]
                dcopy = s2["mb"] / s2["copy_mb_s"] - s1["mb"] / s1["copy_mb_s"]
                dres = s2["mb"] / s2["reshard_mb_s"] - s1["mb"] / s1["reshard_mb_s"]
                ok = dcopy > 0 and dres > 0
                out["marginal"].append({"fraction": s1["fraction"], "extra_mb": round(dmb, 1),
                                        "copy_mb_s": round(dmb / dcopy, 1) if ok else None,
                                        "reshard_mb_s": round(dmb / dres, 1) if ok else None,
                                        "ratio": round(dcopy / dres, 3) if ok else None,
                                        "note": "" if ok else f"not measurable: extra seconds copy {dcopy:.2f}, reshard {dres:.2f}"})
    out.update({"benchmark": "reshard of nested subsets vs a plain copy of the same bytes", "machine": f"{os.cpu_count()} cpus, Spark local[2]",
                "loadavg_1_5_15": {"before": load_before, "after": [round(x, 1) for x in os.getloadavg()]},
                "command": ("python bench/bench_reshard.py " + " ".join(sys.argv[1:])).strip()})
    os.makedirs(a.out, exist_ok=True)
    with open(os.path.join(a.out, "reshard_nested.json"), "w") as f:
        json.dump(out, f, indent=2)
    print(f"\nengine {out['subsets'][0]['engine'] if out['subsets'] else '?'}; page cache {out['page_cache']}; pool {out['pool_samples']} samples, {out['pool_mb']} MB in {out['pool_shards']} tars")
    print(f"{'fraction':>8} {'samples':>8} {'MB':>7} {'tars read':>9} {'copy MB/s':>10} {'reshard MB/s':>13} {'ratio':>6} {'write-phase ratio':>18}")
    for r in out["subsets"]:
        print(f"{r['fraction']:>8} {r['samples']:>8} {r['mb']:>7.1f} {r['source_tars_read']:>9} {r['copy_mb_s']:>10.1f} "
              f"{r['reshard_mb_s']:>13.1f} {r['ratio']:>6.3f} {r['ratio_write_phase'] or float('nan'):>18.3f}")
        for key, what in (("span_copy", "against a plain copy of the subset's own spans (scattered reads, in tar order)"),
                          ("span_copy_ahead", "... with every span announced to the kernel ahead (WILLNEED, as reshard does)")):
            if f"ratio_vs_{key}" in r:
                print(f"{'':>8} {what}: ratio {r[f'ratio_vs_{key}']:.3f} (copy {min(r[f'{key}_s']):.3f}-{max(r[f'{key}_s']):.3f} s)")
        if "compiled_speedup" in r:
            print(f"{'':>8} Python per-sample path (compiled off): ratio {r['python_ratio']:.3f}, write phase {r['python_ratio_write_phase']:.3f}; "
                  f"compiled {r['compiled_speedup']:.2f}x faster end to end, {r['compiled_speedup_write_phase']:.2f}x in the write phase")
        if "direct_io_ratio" in r:
            print(f"{'':>8} output {r['output_written']}; with O_DIRECT (--direct-io): ratio {r['direct_io_ratio']:.3f}, write phase "
                  f"{r['direct_io_ratio_write_phase']:.3f}; the default {r['default_speedup_over_direct_io']:.2f}x faster end to end")
    for r in out.get("larger_pool", {}).get("subsets", []):
        print(f"{r['fraction']:>8} {r['samples']:>8} {r['mb']:>7.1f} {r['source_tars_read']:>9} {r['copy_mb_s']:>10.1f} "
              f"{r['reshard_mb_s']:>13.1f} {r['ratio']:>6.3f} {r['ratio_write_phase'] or float('nan'):>18.3f}")
    for mg in out.get("marginal", []):
        print(f"marginal at {mg['fraction']}: +{mg['extra_mb']} MB: copy {mg['copy_mb_s']} MB/s, reshard {mg['reshard_mb_s']} MB/s, "
              f"ratio {mg['ratio']} {mg['note']}")
    print(f"\ncommand: {out['command']}   (figures in {os.path.join(a.out, 'reshard_nested.json')})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
