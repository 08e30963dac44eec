"""``laiontools plan``: what each data stage will take for a pool of N rows on a given cluster, before running it.

    laiontools plan --rows 2.32B --scales 80M,400M --nodes 32 --cores-per-node 16 --gpus 8 --model ViT-L-14

For each stage (prepare, download, embed, dedup, semdedup, subsets, reshard, verify): the engine it will
choose, its tasks, shards, shuffle partitions and files, core-hours or GPU-hours, wall hours on the
cluster given, the bytes it reads and writes, the object-store GETs; then the bytes stored and, at the
prices given, the cost before training (``laiontools study plan`` prints the training's GPU-hours).

Two kinds of figures go in, and the output says which is which:

* **the code's own rules**, imported from the stages rather than copied: the row, shard and sample counts
  above which a stage runs on Spark, the rows per shuffle partition and per catalog file, the subsets whose
  spans subsets writes for reshard, the uid counts above which membership is a join. Change one in a
  stage and the plan follows.
* **per-unit rates** (:data:`RATES`), each a (low, high) pair with its source: measured on this project's
  machines (BENCHMARKS.md names the run), or an estimate. Every rate can be overridden on the command line
  (``--rate download=40`` or ``--rate download=30:45``) by what a user measured on their own cluster.

docs/scale.md's 400M / 2B tables are this plan's figures with their derivation written out.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
from typing import Any

from laiontools.contracts.pool import CATALOG_ROWS_PER_FILE
from laiontools.contracts.spans import SPANS_MAX_FRACTION
from laiontools.contracts.uids import MEMBER_UDF_MAX_UIDS
from laiontools.core.config import ConfigError
from laiontools.core.report import emit, table
from laiontools.core.spark import derived_shuffle_partitions
from laiontools.core.storage import write_json
from laiontools.scaling import parse_count
from laiontools.stages import dedup, prepare, semdedup, subsets, takedown, verify
from laiontools.stages.reshard import ReshardConfig

STAGE = "plan"


@dataclasses.dataclass(frozen=True)
class Rate:
    """A per-unit figure as a (low, high) range, its unit and where it comes from."""

    lo: float
    hi: float
    unit: str
    source: str
    measured: bool


# Per-unit rates. "measured": on this project's machines (2-core x86 VMs unless said; BENCHMARKS.md
# section named); otherwise an estimate from outside figures. Rates per core are per core of such a VM.
RATES: dict[str, Rate] = {
    "prepare": Rate(2_100, 100_000, "rows/s/core", "prepare's own marginal rate, 1M-3M rows on Spark local[2] (BENCHMARKS "
                    "'Prepare: peak driver memory'); high: one scan of that kind, subsets' funnel, 10M rows in 48 s", True),
    "download": Rate(33.8, 33.8, "samples/s/core", "CPU-bound on a loopback server, fast decode (BENCHMARKS '1. Download throughput')", True),
    "download_node": Rate(1_000, 1_500, "samples/s/node", "network-bound 16-core node; img2dataset's README: ~100M URLs in "
                          "~20 h on one machine", False),
    "embed_cpu": Rate(7.0, 7.3, "images/s/core", "ViT-B-32 on CPU, 14.1-14.5 img/s on 2 cores (BENCHMARKS 'CPU: is the step data-bound?', re-run 2026-11-30)", True),
    "dedup_flops": Rate(22e9, 25e9, "FLOP/s/core", "bare faiss flat search, 21.3-24.2k vectors/s against 2,000 x 512 on 2 cores "
                        "(BENCHMARKS 'dedup and takedown in process too')", True),
    "semdedup": Rate(1e6 / 25.8, 1e6 / 25.8, "vectors/s/core", "1M 128-d vectors, clusters of ~2,000: 12.9 s on Spark local[2] "
                     "(BENCHMARKS 'Semantic dedup inside the pool'); grows with cluster size", True),
    "subsets": Rate(1e7 / 368, 1e7 / 368, "rows/s/core", "10M catalog rows in 184 s on 2 cores (BENCHMARKS 'Subset selection')", True),
    "catalog_scan": Rate(1e7 / 96, 1e7 / 96, "rows/s/core", "one pass over a catalog's columns: subsets' funnel, 10M rows in "
                         "48 s on 2 cores (BENCHMARKS 'Subset selection')", True),
    "reshard": Rate(1e6 / 160, 1e6 / 70, "samples/s/core", "70-160 us of CPU a sample in process, compiled path (BENCHMARKS "
                    "'Reshard's CPU per sample and its task processes')", True),
    "verify": Rate(1e6 / 175, 1e6 / 160, "samples/s/core", "1M samples in 100 shards on Spark local[2] in 80-88 s (BENCHMARKS "
                   "'verify at scale'); each shard read once since 2026-12-07 (was twice)", True),
    "catalog_bytes": Rate(100, 150, "B/row", "zstd parquet catalog, demo's and synthetic rows (BENCHMARKS 'The catalog's parquet "
                          "codec'); real captions and urls an estimate", False),
    "spans_bytes": Rate(60, 80, "B/row", "a subset's spans in zstd parquet, from the catalog's bytes a row", False),
    "plan_shuffle": Rate(122, 122, "B/catalog row", "reshard's plan join, lz4 shuffle (BENCHMARKS 'reshard's plan by a join')", True),
    "plan_shuffle_uid": Rate(32.9, 32.9, "B/uid", "the uid side of that join (BENCHMARKS 'reshard's plan by a join')", True),
}

# Embedding models: dims (image, text), GPU images/s: H200 measured (bench/gpu_embed.py, amp_bf16, 16 decode
# cores, BENCHMARKS 'GPU') and clip-retrieval's A100 anchors (outside estimates).
MODELS: dict[str, dict[str, Any]] = {
    "ViT-B-32": {"dim": 512, "gpu": Rate(2_500, 3_895, "images/s/GPU", "A100 clip-retrieval anchor (estimate) to one H200 "
                                          "(measured, decode-bound on 16 cores: BENCHMARKS 'GPU (`bench/gpu_embed.py`)')", True)},
    "ViT-L-14": {"dim": 768, "gpu": Rate(312, 1_374, "images/s/GPU", "A100 clip-retrieval anchor (estimate) to one H200 "
                                          "(measured, GPU-bound: BENCHMARKS 'GPU (`bench/gpu_embed.py`)')", True)},
}

IVF_WORK = 1 / 150  # an IVF index's search work against a flat one's (nprobe 16 of ~nlist 2,400; estimate)
# What a Python worker (one per core) holds, in GB, per stage: a base measured at small shards, plus a multiple of
# the bytes of one shard at the plan's shard size (measured: the growth from 5.7 to 21.6 and to 104 MB shards, 26 KB
# samples, rounded up; from 104 to 269 MB none grew by more than 0.18x; BENCHMARKS 'Executor memory and shuffle
# bytes per stage'). embed's is its task process without decode workers (the shard's bytes once; with workers the
# spool streams it and each worker holds a batch). dedup adds its index (held once a worker; while it loads 1.05x
# from a local file, ~2.3x from an object store); semdedup is bounded by its settings (~0.5 GB).
WORKER_MEMORY: dict[str, tuple[float, float]] = {
    "prepare": (0.74, 0.0), "download": (0.74, 0.3), "embed": (0.99, 0.6), "dedup": (0.19, 0.6), "semdedup": (0.5, 0.0),
    "subsets": (0.42, 0.0), "reshard": (0.3, 0.0), "verify": (0.09, 0.1), "takedown": (0.17, 0.5),
}
INDEX_LOAD_FROM_STORE = 2.3  # peak of an index's load from an object store, in index bytes (from a local file: 1.05)
JVM_OFF_HEAP_GB = 0.5  # an executor JVM's RSS above its heap (0.26-0.47 GB measured), for memoryOverhead
# Bytes a catalog row, every exchange of prepare + download (lz4): 1,018-1,058 measured over 11 exchanges (2026-12-07,
# 4k and 25k rows) with the downloaded rows shuffled for the spans join, which AQE then made a broadcast; at 2B the
# spans cannot be broadcast, so their own side is added: ~100 B a sample, ~0.6 a catalog row (estimate).
DOWNLOAD_SHUFFLE = 1_120
UID_BYTES = 16  # a uid in a uid file (two uint64)
EMB_BYTES = 2  # fp16 embeddings


@dataclasses.dataclass
class PlanInputs:
    rows: int  # source rows attempted
    success: float = 0.6  # downloaded / attempted
    scales: tuple[int, ...] = ()  # nested subset sizes, resharded
    sample_kb: tuple[float, float] = (15.0, 30.0)  # stored KB a sample (256 px JPEG q95 + caption + json)
    shard_size: int = 10_000  # rows per download shard, samples per resharded shard
    nodes: int = 1
    cores_per_node: int = 16
    gpus: int = 0
    model: str = "ViT-B-32"
    evalset_images: int = 1_500_000
    dedup_index: str = dedup.DedupConfig.index
    embed_dim: int = 0  # the model's embedding width (0: from MODELS)
    rates: dict[str, Rate] = dataclasses.field(default_factory=lambda: dict(RATES))
    core_hour_usd: tuple[float, float] = (0.01, 0.05)
    gpu_hour_usd: tuple[float, float] = (2.0, 4.0)
    tb_month_usd: float = 23.0
    get_usd_per_1k: float = 0.0004

    def validate(self) -> None:
        if not 0 < self.success <= 1:
            raise ConfigError(f"--success must be in (0, 1], got {self.success}")
        if self.nodes < 1 or self.cores_per_node < 1 or self.gpus < 0 or self.shard_size < 1 or self.evalset_images < 0:
            raise ConfigError("--nodes, --cores-per-node and --shard-size must be >= 1, --gpus and --evalset-images >= 0")
        if not 0 < self.sample_kb[0] <= self.sample_kb[1]:
            raise ConfigError(f"--sample-kb must be positive, low <= high, got {self.sample_kb}")
        if self.dedup_index not in ("flat", "ivf"):
            raise ConfigError(f"--dedup-index must be flat or ivf, got {self.dedup_index!r}")
        if self.model not in MODELS and not (self.embed_dim and "embed_gpu" in self.rates):
            raise ConfigError(f"--model {self.model!r} has no recorded rate ({', '.join(MODELS)} have): give its --embed-dim "
                              "and --rate embed_gpu=LOW[:HIGH] (images/s a GPU)")


def _r(lo: float, hi: float) -> tuple[float, float]:
    return (min(lo, hi), max(lo, hi))


def _hours(units: float, rate: Rate, per: float = 1.0) -> tuple[float, float]:
    """(low, high) hours of `units` at `rate` per unit per `per` (cores or GPUs)."""
    return _r(units / rate.hi / per / 3600, units / rate.lo / per / 3600)


def make_plan(p: PlanInputs) -> dict[str, Any]:
    """The plan as a dict: ``stages`` (one row each), ``storage``, ``cost``, ``inputs``, ``rates`` (with sources)."""
    p.validate()
    R = p.rates
    cores = p.nodes * p.cores_per_node
    attempted = p.rows
    pool = int(attempted * p.success)  # samples downloaded
    kb = p.sample_kb
    pool_bytes = _r(pool * kb[0] * 1e3, pool * kb[1] * 1e3)
    shards = math.ceil(attempted / p.shard_size)
    catalog_parts = derived_shuffle_partitions(rows=attempted, parallelism=cores)
    catalog_files = max(1, math.ceil(attempted / CATALOG_ROWS_PER_FILE))
    dim = p.embed_dim or MODELS[p.model]["dim"]
    stages: list[dict[str, Any]] = []

    def add(stage: str, engine: str, tasks: int | str, core_h: tuple[float, float] | None = None,
            gpu_h: tuple[float, float] | None = None, reads: tuple[float, float] = (0, 0), writes: tuple[float, float] = (0, 0),
            gets: float = 0, shuffle: tuple[float, float] = (0, 0), note: str = "", wall_h: tuple[float, float] | None = None) -> None:
        if wall_h is None:
            wall_h = (_r(core_h[0] / cores, core_h[1] / cores) if core_h else
                      _r(gpu_h[0] / max(p.gpus, 1), gpu_h[1] / max(p.gpus, 1)) if gpu_h and p.gpus else None)
        stages.append({"stage": stage, "engine": engine, "tasks": tasks, "core_hours": core_h, "gpu_hours": gpu_h,
                       "wall_hours": wall_h, "read_bytes": reads, "write_bytes": writes, "gets": gets,
                       "shuffle_bytes": shuffle, "note": note})

    def engine(n: int, above: int, what: str) -> str:
        return f"Spark ({what} {n:,} > {above:,})" if n > above else f"in process ({what} {n:,} <= {above:,}; or Spark given a master)"

    add("prepare", engine(attempted, prepare.SPARK_ABOVE_ROWS, "rows"), "by source bytes", _hours(attempted, R["prepare"]),
        note="source metadata to accepted rows; shuffle partitions from the source's compressed bytes (64 MB each)")

    # download: CPU at the measured rate, or the network (per node) when slower; the catalog sort's partitions
    # and files are download's own rules
    cpu_h = _hours(attempted, R["download"])
    net_wall = _r(attempted / (R["download_node"].hi * p.nodes) / 3600, attempted / (R["download_node"].lo * p.nodes) / 3600)
    wall = _r(max(cpu_h[0] / cores, net_wall[0]), max(cpu_h[1] / cores, net_wall[1]))
    add("download", engine(attempted, prepare.SPARK_ABOVE_ROWS, "rows"), shards, cpu_h, writes=pool_bytes, wall_h=wall,
        note=f"{shards:,} shards of {p.shard_size:,} rows; catalog: {catalog_parts:,} shuffle partitions, {catalog_files:,} files "
             f"of {CATALOG_ROWS_PER_FILE:,} rows; wall: the slower of CPU and the network ({R['download_node'].lo:g}-"
             f"{R['download_node'].hi:g} samples/s a node, estimate)")

    emb = pool * 2 * dim * EMB_BYTES
    gpu = R.get("embed_gpu") or MODELS[p.model]["gpu"]
    add("embed", f"{p.gpus} GPU(s), one task a GPU" if p.gpus else "CPU (no --gpus)", shards,
        core_h=None if p.gpus else _hours(pool, R["embed_cpu"]), gpu_h=_hours(pool, gpu) if p.gpus else None,
        reads=pool_bytes, writes=(emb, emb), gets=shards * math.ceil(kb[1] * p.shard_size * 1e3 / (50 << 20)),
        note=f"{p.model}: {dim}-d image + text embeddings, fp16; each shard read once (s3fs blocks of 50 MB)")

    flops = pool * p.evalset_images * dim * 2
    flat_h = _hours(flops, R["dedup_flops"])
    # IVF: ~IVF_WORK of the flat index's work, done 3-5x less efficiently than a GEMM (estimate)
    dedup_h = flat_h if p.dedup_index == "flat" else _r(flat_h[0] * IVF_WORK * 3, flat_h[1] * IVF_WORK * 5)
    add("dedup", engine(pool, dedup.SPARK_ABOVE_ROWS, "samples"), shards, dedup_h, reads=(emb / 2, emb / 2),
        note=f"{p.dedup_index} index against {p.evalset_images:,} eval images ({flops:.2g} FLOP exact"
             + (f"; ivf: ~{IVF_WORK:.2g} of that work at 3-5x lower efficiency, an estimate" if p.dedup_index == "ivf" else
                f"; --dedup-index ivf: ~{_span(_r(flat_h[0] * IVF_WORK * 3, flat_h[1] * IVF_WORK * 5))} core-h, an estimate")
             + f"); the index in each worker {p.evalset_images * dim * 4 / 1e9:.2g} GB")
    add("semdedup", engine(pool, semdedup.SPARK_ABOVE_ROWS, "samples"), shards, _hours(pool, R["semdedup"]),
        reads=(emb / 2, emb / 2), note="clusters of ~2,000; the pair step grows with the cluster size (x4.5 at ~9k a cluster)")

    spans_scales = [s for s in p.scales if s <= SPANS_MAX_FRACTION * attempted]
    spans_rows = sum(spans_scales)
    uid_bytes = UID_BYTES * (pool + sum(p.scales))
    # a join of the catalog's success rows (the plan's columns) with a subset's uids: the spans of the largest
    # subset that gets them (in subsets), and each larger subset's plan (in reshard)
    def join(uids: int) -> float:
        return pool * R["plan_shuffle"].hi + uids * R["plan_shuffle_uid"].hi

    sub_shuffle = join(max(spans_scales)) if spans_scales else 0.0
    add("subsets", engine(attempted, subsets.SubsetsConfig.spark_above, "catalog rows"), catalog_parts, _hours(attempted, R["subsets"]),
        reads=_r(attempted * R["catalog_bytes"].lo, attempted * R["catalog_bytes"].hi),
        writes=_r(uid_bytes + spans_rows * R["spans_bytes"].lo, uid_bytes + spans_rows * R["spans_bytes"].hi),
        shuffle=(sub_shuffle, sub_shuffle),
        note=f"uid files 16 B a uid; spans written for {len(spans_scales)} of {len(p.scales)} scale(s), those of at most "
             f"{SPANS_MAX_FRACTION:g} of the catalog, which reshard then reads instead of the catalog; a uid list above "
             f"{MEMBER_UDF_MAX_UIDS:,} uids is matched by a join, below by a lookup in each task")

    reshard_samples = sum(p.scales)
    big = [s for s in p.scales if s > SPANS_MAX_FRACTION * attempted]
    rs_shuffle = sum(join(s) for s in big)
    rs_bytes = _r(reshard_samples * kb[0] * 1e3, reshard_samples * kb[1] * 1e3)
    add("reshard", engine(attempted, ReshardConfig.spark_above, "catalog rows"), sum(math.ceil(s / p.shard_size) for s in p.scales),
        _hours(reshard_samples, R["reshard"]), reads=rs_bytes, writes=rs_bytes, gets=reshard_samples, shuffle=(rs_shuffle, rs_shuffle),
        note=f"{len(p.scales)} scale(s) of {p.shard_size:,}-sample shards, one ranged GET a sample; planned from their spans: "
             f"{len(p.scales) - len(big)}, from the catalog by a join: {len(big)}")

    total_shards = shards + sum(math.ceil(s / p.shard_size) for s in p.scales)
    verified = pool + reshard_samples
    vbytes = _r(pool_bytes[0] + rs_bytes[0], pool_bytes[1] + rs_bytes[1])  # each shard read once (hashed as its tar is read)
    add("verify", (f"Spark ({shards:,} shards > {verify.SPARK_ABOVE_SHARDS:,})" if shards > verify.SPARK_ABOVE_SHARDS else
                   f"one process ({shards:,} shards <= {verify.SPARK_ABOVE_SHARDS:,})"),
        total_shards, _hours(verified, R["verify"]), reads=vbytes,
        note=f"the pool and each resharded scale; checks across shards are joins above {verify.SPARK_JOIN_ABOVE_UIDS:,} uids")
    add("takedown", engine(attempted, takedown.SPARK_ABOVE_ROWS, "catalog rows"), catalog_files,
        _hours(attempted, R["catalog_scan"]), reads=_r(attempted * R["catalog_bytes"].lo, attempted * R["catalog_bytes"].hi),
        note="a uid / url / domain list: one pass over the catalog, then a rewrite of each shard that holds a listed sample")

    # memory: a Python worker per core, at this plan's shard size (the largest shard: sample_kb's high end)
    shard_gb = p.shard_size * kb[1] * 1e3 / 1e9
    index_gb = p.evalset_images * dim * 4 / 1e9
    for st in stages:
        base, per_shard = WORKER_MEMORY[st["stage"]]
        gb = base + per_shard * shard_gb
        if st["stage"] == "dedup":
            gb += index_gb * INDEX_LOAD_FROM_STORE  # (a load from a store; a local index file: 1.05x)
        st["worker_gb"] = round(gb, 2)
    per_core = max(st["worker_gb"] for st in stages if st["stage"] not in ("embed", "dedup"))
    shuffle_peak = max([DOWNLOAD_SHUFFLE * attempted, *(st["shuffle_bytes"][1] for st in stages)])
    _dl = next(st for st in stages if st["stage"] == "download")
    _dl["shuffle_bytes"] = (DOWNLOAD_SHUFFLE * attempted, DOWNLOAD_SHUFFLE * attempted)
    executors = {
        "executor_cores": 4, "executor_memory_gb": 4,
        "memory_overhead_gb": math.ceil(4 * per_core + JVM_OFF_HEAP_GB),
        "dedup": {"executor_cores": 2, "memory_overhead_gb": math.ceil(2 * (0.19 + index_gb * INDEX_LOAD_FROM_STORE) + JVM_OFF_HEAP_GB)},
        "local_dir_gb_per_node": math.ceil(2 * shuffle_peak / p.nodes / 1e9),
    }

    catalog = _r(attempted * R["catalog_bytes"].lo, attempted * R["catalog_bytes"].hi)
    stored = {"pool": pool_bytes, "embeddings": (emb, emb), "reshards": rs_bytes, "catalog": catalog,
              "uid_files": (uid_bytes, uid_bytes), "spans": _r(spans_rows * R["spans_bytes"].lo, spans_rows * R["spans_bytes"].hi)}
    total_tb = _r(sum(v[0] for v in stored.values()) / 1e12, sum(v[1] for v in stored.values()) / 1e12)
    core_h = _r(sum(s["core_hours"][0] for s in stages if s["core_hours"] and s["stage"] != "takedown"),
                sum(s["core_hours"][1] for s in stages if s["core_hours"] and s["stage"] != "takedown"))
    gpu_h = next((s["gpu_hours"] for s in stages if s["gpu_hours"]), (0.0, 0.0))
    gets = sum(s["gets"] for s in stages)
    once = _r(core_h[0] * p.core_hour_usd[0] + gpu_h[0] * p.gpu_hour_usd[0] + gets / 1e3 * p.get_usd_per_1k,
              core_h[1] * p.core_hour_usd[1] + gpu_h[1] * p.gpu_hour_usd[1] + gets / 1e3 * p.get_usd_per_1k)
    monthly = (total_tb[0] * p.tb_month_usd, total_tb[1] * p.tb_month_usd)
    short = [s for s in p.scales if s > pool]
    return {
        "inputs": {k: v for k, v in dataclasses.asdict(p).items() if k != "rates"},
        "pool_samples": pool, "download_shards": shards, "catalog_shuffle_partitions": catalog_parts, "catalog_files": catalog_files,
        "short_scales": short, "stages": stages, "executors": executors, "storage_bytes": stored, "storage_tb": total_tb,
        "cost_usd": {"once": once, "monthly": monthly, "core_hours": core_h, "gpu_hours": gpu_h, "gets": gets},
        "rates": {k: dataclasses.asdict(v) for k, v in R.items()} | {f"embed_gpu:{p.model}": dataclasses.asdict(gpu)},
    }


def _n(v: float) -> str:
    """A count or an amount in three significant figures, with k / M / B."""
    for div, suffix in ((1e9, "B"), (1e6, "M"), (1e3, "k")):
        if abs(v) >= div:
            return f"{v / div:.3g}{suffix}"
    return f"{v:.3g}"


def _span(v: tuple[float, float] | None, fmt: Any = _n) -> str:
    if v is None:
        return "-"
    lo, hi = fmt(v[0]), fmt(v[1])
    return lo if lo == hi else f"{lo}-{hi}"


def _bytes(v: float) -> str:
    for div, unit in ((1e15, "PB"), (1e12, "TB"), (1e9, "GB"), (1e6, "MB"), (1e3, "kB")):
        if abs(v) >= div:
            return f"{v / div:.3g} {unit}"
    return f"{v:.3g} B"


def summary(plan: dict[str, Any]) -> str:
    i = plan["inputs"]
    rows = [{"stage": s["stage"], "engine": s["engine"], "tasks": f"{s['tasks']:,}" if isinstance(s["tasks"], int) else s["tasks"],
             "core-h": _span(s["core_hours"]), "GPU-h": _span(s["gpu_hours"]), "wall h": _span(s["wall_hours"]),
             "reads": _span(s["read_bytes"], _bytes) if any(s["read_bytes"]) else "-",
             "writes": _span(s["write_bytes"], _bytes) if any(s["write_bytes"]) else "-",
             "GETs": _n(s["gets"]) if s["gets"] else "-", "shuffle": _span(s["shuffle_bytes"], _bytes) if any(s["shuffle_bytes"]) else "-",
             "GB/core": f"{s['worker_gb']:.2g}"}
            for s in plan["stages"]]
    c, e = plan["cost_usd"], plan["executors"]
    lines = [
        (f"plan: {i['rows']:,} rows attempted, {i['success']:g} downloaded => {plan['pool_samples']:,} samples; "
         f"{i['nodes']} node(s) x {i['cores_per_node']} cores, {i['gpus']} GPU(s); scales {', '.join(_n(s) for s in i['scales']) or 'none'}"),
        table(rows), "",
        "notes: " + "\n       ".join(f"{s['stage']}: {s['note']}" for s in plan["stages"] if s["note"]), "",
        (f"executors ({i['cores_per_node'] // e['executor_cores'] or 1} a node of {i['cores_per_node']} cores; the limits bind on YARN and Kubernetes): "
         f"--executor-cores {e['executor_cores']} --executor-memory {e['executor_memory_gb']}g "
         f"--conf spark.executor.memoryOverhead={e['memory_overhead_gb']}g (the Python workers live there, one a core; leave "
         f"spark.executor.pyspark.memory unset); dedup: --executor-cores {e['dedup']['executor_cores']} and memoryOverhead "
         f"{e['dedup']['memory_overhead_gb']}g (each worker holds the eval index); embed: an executor a GPU, memoryOverhead for "
         f"its decode workers; spark.local.dir: {e['local_dir_gb_per_node']} GB a node (twice the largest stage's shuffle, "
         "for spills and skew; docs/scale.md 'Executor settings')"),
        "stored: " + ", ".join(f"{k} {_span(v, _bytes)}" for k, v in plan["storage_bytes"].items())
        + f"; total {_span(plan['storage_tb'], lambda x: f'{x:.3g}')} TB",
        (f"cost before training (takedown not counted): {_span(c['core_hours'])} core-h, {_span(c['gpu_hours'])} GPU-h, "
         f"{_n(c['gets'])} GETs => ${_span(c['once'])} once, + ${_span(c['monthly'])} a month of storage"),
        "rates: " + "\n       ".join(f"{k}: {_span((v['lo'], v['hi']))} {v['unit']} ({'measured' if v['measured'] else 'estimate'}: {v['source']})"
                                      for k, v in plan["rates"].items()),
    ]
    if plan["short_scales"]:
        lines.insert(1, f"warning: scale(s) {', '.join(_n(s) for s in plan['short_scales'])} exceed the {plan['pool_samples']:,} samples "
                        "the pool would hold: subsets refuses them unless --allow-short (docs/scale.md, link rot)")
    return "\n".join(lines)


def _pair(text: str, what: str) -> tuple[float, float]:
    try:
        parts = [float(x) for x in str(text).split(":")]
    except ValueError:
        raise ConfigError(f"{what} {text!r} is not a number or low:high") from None
    if len(parts) not in (1, 2) or not all(math.isfinite(x) and x > 0 for x in parts):
        raise ConfigError(f"{what} {text!r} must be a positive number or low:high")
    return _r(parts[0], parts[-1])


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="laiontools plan", description=(__doc__ or "").strip().split("\n")[0])
    p.add_argument("--rows", required=True, help="source rows attempted: 2.32B (LAION-2B-en), 413M (LAION-400M), 1e7, ...")
    p.add_argument("--success", type=float, default=0.6, help="downloaded / attempted (link rot; 0.5-0.7 for LAION today, an estimate)")
    p.add_argument("--scales", default="", help="nested subset sizes that are resharded, comma-separated: 80M,400M")
    p.add_argument("--sample-kb", default="15:30", help="stored KB a sample, or low:high (256 px JPEG q95 + caption + json: 15-30)")
    p.add_argument("--shard-size", type=int, default=10_000, help="rows a download shard, samples a resharded one")
    p.add_argument("--nodes", type=int, default=1)
    p.add_argument("--cores-per-node", type=int, default=16)
    p.add_argument("--gpus", type=int, default=0, help="GPUs for embed (0: embed on the CPUs)")
    p.add_argument("--model", default="ViT-B-32", help=f"embedding model: {', '.join(MODELS)} (others: give --embed-dim and --rate embed_gpu=...)")
    p.add_argument("--embed-dim", type=int, default=0, help="the model's embedding width (default: the recorded model's)")
    p.add_argument("--evalset-images", default="1.5M", help="evaluation images dedup searches the pool against")
    p.add_argument("--dedup-index", default=dedup.DedupConfig.index, choices=("flat", "ivf"), help="dedup's --index")
    p.add_argument("--rate", action="append", default=[], metavar="NAME=LOW[:HIGH]",
                   help=f"override a per-unit rate with your own measurement (names: {', '.join(RATES)}, embed_gpu)")
    p.add_argument("--core-hour-usd", default="0.01:0.05")
    p.add_argument("--gpu-hour-usd", default="2:4")
    p.add_argument("--tb-month-usd", type=float, default=23.0)
    p.add_argument("--output", default=None, help="also write the plan as JSON to this file")
    return p


def inputs_from_args(a: argparse.Namespace) -> PlanInputs:
    try:
        rows = parse_count(a.rows)
        scales = tuple(sorted(parse_count(s) for s in a.scales.split(",") if s.strip()))
        evalset = parse_count(a.evalset_images)
    except ValueError as e:
        raise ConfigError(f"{e}") from None
    rates = dict(RATES)
    for item in a.rate:
        name, _, val = item.partition("=")
        if name not in RATES and name != "embed_gpu":
            raise ConfigError(f"--rate {item!r}: no rate named {name!r}; one of {', '.join(RATES)}, embed_gpu")
        lo, hi = _pair(val, f"--rate {name}")
        unit = RATES[name].unit if name in RATES else "images/s/GPU"
        rates[name] = Rate(lo, hi, unit, "given on the command line", True)
    return PlanInputs(rows=rows, success=a.success, scales=scales, sample_kb=_pair(a.sample_kb, "--sample-kb"),
                      shard_size=a.shard_size, nodes=a.nodes, cores_per_node=a.cores_per_node, gpus=a.gpus, model=a.model,
                      evalset_images=evalset, dedup_index=a.dedup_index, embed_dim=a.embed_dim, rates=rates, core_hour_usd=_pair(a.core_hour_usd, "--core-hour-usd"),
                      gpu_hour_usd=_pair(a.gpu_hour_usd, "--gpu-hour-usd"), tb_month_usd=a.tb_month_usd)


def main(argv: list[str] | None = None) -> int:
    a = build_parser().parse_args(argv)
    plan = make_plan(inputs_from_args(a))
    text = summary(plan)
    if a.output:
        write_json(a.output, json.loads(json.dumps(plan)))
        text += f"\nplan: {os.path.abspath(a.output)}"
    emit(text)
    return 0
