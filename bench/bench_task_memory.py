"""Executor memory and shuffle bytes per Spark stage, at two shard sizes (issue 12: "memory per executor").

    .venv/bin/python bench/bench_task_memory.py [--pools 250x4 1000x4 250x16] [--out bench-out]

A pool is <samples per shard>x<shards attempted>: the default's 1000x4 and 250x16 are one pool in shards of
two sizes, 250x4 and 250x16 shards of one size in pools of two sizes, so a figure that follows the shard and
one that follows the pool tell apart. For each pool, one synthetic source (realistic photo-like images, 256 px JPEG q95 as LAION's, the
synthetic source's usual share of broken rows) is served from ``--hosts`` loopback servers (127.0.0.2, .3, ...;
its rows spread over them, so that no one host's politeness pauses skip most of them) and every Spark stage is run through
``spark-submit --master local[2] jobs/<stage>.py``, as bench/bench_cluster.py does on a standalone cluster:
download (source -> pool, catalog), verify, subsets (two nested scales), reshard (the larger), embed (lt-tiny,
random init, one task per shard on CPU), dedup against the planted eval set, semdedup, takedown (two uids and
a url). Each stage is its own application (a fresh JVM and fresh Python workers), so a peak is that stage's.

Measured, per stage:
  * every process of the application, polled from /proc every 50 ms (VmHWM: the kernel's peak RSS of the
    process, monotone, so the last reading before a process exits holds its peak up to that moment): the JVM
    (driver and executor in local mode), the Python driver, the pyspark daemon, each Python worker (the
    daemon's children, which run the tasks; reused across tasks, Spark's default) and any process a task forks;
    and the workers' peak virtual size (VmPeak: spark.executor.pyspark.memory limits that, not the RSS);
  * from Spark's event log: the JVM's peak heap (JVMHeapMemory) and the executor's process-tree Python RSS
    (ProcessTreePythonRSSMemory, the sum over the JVM's Python descendants, Spark's own reading; the
    cross-check of the /proc figures), and per Spark stage the records read and the shuffle bytes and records
    written (task metrics summed), with the largest task's peak execution memory.
Figures go to <out>/task_memory.json. Nothing here is a timing claim; wall seconds are printed for context.
"""

from __future__ import annotations

import argparse
import contextlib
import glob
import json
import os
import shutil
import subprocess
import sys
import threading
import time
from collections import defaultdict
from pathlib import Path
from typing import Any

from common import write_figures

POLL_S = 0.05
STAGES = ["download", "verify", "subsets", "reshard", "embed", "dedup", "semdedup", "takedown"]


def _status(pid: int) -> dict[str, int] | None:
    try:
        with open(f"/proc/{pid}/status") as f:
            out = {}
            for line in f:
                k, _, v = line.partition(":")
                if k in ("PPid", "VmHWM", "VmRSS", "VmPeak"):
                    out[k] = int(v.split()[0])
            return out
    except (FileNotFoundError, ProcessLookupError, PermissionError):
        return None


def _children(pid: int) -> list[int]:
    out: list[int] = []
    try:
        for tid in os.listdir(f"/proc/{pid}/task"):
            with open(f"/proc/{pid}/task/{tid}/children") as f:
                out += [int(c) for c in f.read().split()]
    except OSError:
        pass
    return out


def _cmdline(pid: int) -> str:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            return f.read().replace(b"\0", b" ").decode(errors="replace")
    except OSError:
        return ""


class TreePoller(threading.Thread):
    """Polls /proc for every descendant of `root`; keeps each process's peak VmHWM (kB), parent and command."""

    def __init__(self, root: int):
        super().__init__(daemon=True)
        self.root, self.stop_ev = root, threading.Event()
        self.procs: dict[int, dict[str, Any]] = {}
        self.sum_python_rss_peak_kb = 0  # largest sum of the JVM's Python descendants' VmRSS at one poll

    def run(self) -> None:
        while not self.stop_ev.is_set():
            stats: dict[int, dict[str, int]] = {}
            todo = [self.root]
            while todo:  # the tree from the root down, through each thread's children list (no scan of /proc)
                p = todo.pop()
                st = _status(p)
                if not st:
                    continue
                stats[p] = st
                todo.extend(_children(p))
            for p, st in stats.items():
                if "VmHWM" not in st:
                    continue
                rec = self.procs.setdefault(p, {"ppid": st["PPid"], "cmd": "", "hwm_kb": 0, "vm_kb": 0})
                cmd = _cmdline(p) or rec["cmd"]  # read each time: spark-submit's bash execs the JVM in its pid
                if cmd != rec["cmd"]:
                    # an exec: the new program's peak starts afresh (a child caught between fork and exec shows
                    # its parent's RSS, which is not the child's)
                    rec["cmd"], rec["hwm_kb"], rec["vm_kb"] = cmd, 0, 0
                rec["hwm_kb"] = max(rec["hwm_kb"], st["VmHWM"])
                rec["vm_kb"] = max(rec["vm_kb"], st.get("VmPeak", 0))  # virtual: what RLIMIT_AS limits
            jvm = [p for p in stats if self.procs.get(p, {}).get("cmd", "").split(" ")[0].endswith("java")]
            if jvm:
                py = [p for p in stats if "VmRSS" in stats[p] and _under(p, jvm[0], stats)
                      and "python" in self.procs.get(p, {}).get("cmd", "").split(" ")[0]]
                self.sum_python_rss_peak_kb = max(self.sum_python_rss_peak_kb, sum(stats[p]["VmRSS"] for p in py))
            time.sleep(POLL_S)

    def classify(self) -> dict[str, Any]:
        """Peak RSS (MB) by role: jvm, driver_python, daemon, workers (list), task_children (list)."""
        mb = {p: round(r["hwm_kb"] / 1024, 1) for p, r in self.procs.items()}
        jvm = [p for p, r in self.procs.items() if r["cmd"].split(" ")[0].endswith("java")
               and "launcher.Main" not in r["cmd"]]
        daemon = [p for p, r in self.procs.items() if "pyspark.daemon" in r["cmd"] and r["ppid"] in jvm]
        workers = [p for p, r in self.procs.items() if r["ppid"] in daemon]
        below: list[int] = []
        frontier = set(workers)
        while frontier:
            nxt = {p for p, r in self.procs.items() if r["ppid"] in frontier}
            below += sorted(nxt)
            frontier = nxt
        driver = [p for p, r in self.procs.items() if r["ppid"] in jvm and "jobs/" in r["cmd"]]
        return {"jvm_rss_mb": max((mb[p] for p in jvm), default=None),
                "driver_python_rss_mb": max((mb[p] for p in driver), default=None),
                "daemon_rss_mb": max((mb[p] for p in daemon), default=None),
                "worker_rss_mb": sorted((mb[p] for p in workers), reverse=True),
                "worker_vmpeak_mb": max((round(self.procs[p]["vm_kb"] / 1024, 1) for p in workers), default=None),
                "task_child_rss_mb": sorted((mb[p] for p in below), reverse=True),
                "task_child_cmds": sorted({self.procs[p]["cmd"][:80] for p in below}),
                "sum_jvm_python_rss_peak_mb": round(self.sum_python_rss_peak_kb / 1024, 1)}


def _under(pid: int, anc: int, stats: dict[int, dict[str, int]]) -> bool:
    while pid in stats and pid > 1:
        if stats[pid]["PPid"] == anc:
            return True
        pid = stats[pid]["PPid"]
    return False


def read_event_log(path: str) -> dict[str, Any]:
    """The JVM's and the process tree's peak metrics, and per Spark stage its task metrics summed."""
    peaks: dict[str, int] = defaultdict(int)
    stages: dict[int, dict[str, Any]] = {}
    with open(path) as f:
        for line in f:
            ev = json.loads(line)
            kind = ev.get("Event")
            if kind in ("SparkListenerStageExecutorMetrics", "SparkListenerExecutorMetricsUpdate"):
                mets = [ev.get("Executor Metrics", {})]
                mets += [u.get("Executor Metrics", {}) for u in ev.get("Executor Metrics Updated", [])]
                for m in mets:
                    for k in ("JVMHeapMemory", "JVMOffHeapMemory", "ProcessTreeJVMRSSMemory",
                              "ProcessTreePythonRSSMemory", "ProcessTreeOtherRSSMemory"):
                        peaks[k] = max(peaks[k], int(m.get(k, 0) or 0))
            elif kind == "SparkListenerTaskEnd":
                m = ev.get("Task Metrics") or {}
                sid = ev["Stage ID"]
                s = stages.setdefault(sid, {"tasks": 0, "input_records": 0, "shuffle_read_records": 0,
                                            "shuffle_write_bytes": 0, "shuffle_write_records": 0,
                                            "max_task_peak_execution_memory": 0})
                s["tasks"] += 1
                s["input_records"] += (m.get("Input Metrics") or {}).get("Records Read", 0)
                s["shuffle_read_records"] += (m.get("Shuffle Read Metrics") or {}).get("Total Records Read", 0)
                w = m.get("Shuffle Write Metrics") or {}
                s["shuffle_write_bytes"] += w.get("Shuffle Bytes Written", 0)
                s["shuffle_write_records"] += w.get("Shuffle Records Written", 0)
                s["max_task_peak_execution_memory"] = max(s["max_task_peak_execution_memory"],
                                                          m.get("Peak Execution Memory", 0))
            elif kind == "SparkListenerStageSubmitted":
                info = ev["Stage Info"]
                stages.setdefault(info["Stage ID"], {"tasks": 0, "input_records": 0, "shuffle_read_records": 0,
                                                     "shuffle_write_bytes": 0, "shuffle_write_records": 0,
                                                     "max_task_peak_execution_memory": 0})
                stages[info["Stage ID"]]["name"] = info["Stage Name"]
    shuffles = {sid: s for sid, s in sorted(stages.items()) if s["shuffle_write_bytes"]}
    return {"peaks_mb": {k: round(v / 2**20, 1) for k, v in peaks.items()},
            "max_task_peak_execution_memory_mb": round(max((s["max_task_peak_execution_memory"] for s in stages.values()),
                                                           default=0) / 2**20, 1),
            "shuffles": list(shuffles.values()), "spark_stages": len(stages)}


def submit(stage: str, args: list[str], work: Path, events: Path) -> dict[str, Any]:
    """spark-submit one stage on local[2] with its executor metrics logged; return its memory figures."""
    from laiontools.testing.cluster import REPO, SPARK_HOME, submit_env

    events.mkdir(parents=True, exist_ok=True)
    before = set(os.listdir(events))
    conf = {"spark.eventLog.enabled": "true", "spark.eventLog.dir": f"file://{events}",
            "spark.eventLog.logStageExecutorMetrics": "true", "spark.executor.processTreeMetrics.enabled": "true",
            "spark.executor.metrics.pollingInterval": "100ms", "spark.ui.enabled": "false",
            "spark.eventLog.rolling.enabled": "false", "spark.eventLog.compress": "false"}
    cmd = [str(SPARK_HOME / "bin" / "spark-submit"), "--master", "local[2]", "--driver-memory", "1g"]
    for k, v in conf.items():
        cmd += ["--conf", f"{k}={v}"]
    cmd += [str(REPO / "jobs" / f"{stage}.py"), *args]
    t = time.perf_counter()
    with open(work / f"{stage}.log", "wb") as log:
        proc = subprocess.Popen(cmd, cwd=work, env=submit_env(), stdout=log, stderr=subprocess.STDOUT)
        poller = TreePoller(proc.pid)
        poller.start()
        rc = proc.wait(timeout=1800)
        poller.stop_ev.set()
        poller.join()
    if rc != 0:
        raise SystemExit(f"{stage} exited {rc}; see {work / (stage + '.log')}")
    new = sorted(set(os.listdir(events)) - before)
    return {"wall_s": round(time.perf_counter() - t, 1), **poller.classify(),
            "event_log": read_event_log(str(events / new[-1])) if new else None}


def _spread_over_hosts(source: str, base_url: str, bases: list[str]) -> None:
    """Point the source's rows at several servers (one loopback address each), a url's host chosen by its
    path (a repeated url stays one url): one host answers the synthetic source's share of 429s and 503s
    with pauses, and past the pause budget download skips the host's rows (`host_throttled`), as it would
    a real host; at 20,000 rows on one host that left 21-41 % of them downloaded and the shards small."""
    import zlib

    import pyarrow as pa
    import pyarrow.parquet as pq

    for f in sorted(glob.glob(os.path.join(source, "*.parquet"))):
        t = pq.read_table(f)
        urls = [u if u is None or not u.startswith(base_url) else
                bases[zlib.crc32(u[len(base_url):].encode()) % len(bases)] + u[len(base_url):] for u in t.column("URL").to_pylist()]
        pq.write_table(t.set_column(t.schema.get_field_index("URL"), "URL", pa.array(urls, pa.string())), f)


def run_size(per_shard: int, shards: int, work: Path, stages: list[str] | None = None,
             embed_workers: int = 0, hosts: int = 8) -> dict[str, Any]:
    """Every stage of `stages` (None: all; download always, the others read its pool) on one pool."""
    from laiontools.contracts import layout
    from laiontools.contracts.manifest import read_manifest
    from laiontools.synthetic import SyntheticWebServer, make_source
    from laiontools.testing import TEST_DOWNLOAD_SETTINGS
    from laiontools.testing.removal import removal_list_for

    s = {**TEST_DOWNLOAD_SETTINGS, "number_sample_per_shard": per_shard, "image_size": 256}
    pool, events, out = work / "pool", work / "events", {}
    with contextlib.ExitStack() as stack:
        webs = [stack.enter_context(SyntheticWebServer(str(work / "web" / "images"), host=f"127.0.0.{2 + h}")) for h in range(hosts)]
        made = make_source(str(work / "web"), per_shard * shards, webs[0].base_url, evalset=True, realistic=True,
                           processes=os.cpu_count() or 1)
        _spread_over_hosts(made["source"], webs[0].base_url, [w.base_url for w in webs])
        out["download"] = submit("download", [
            "--input", made["source"], "--output", str(pool), "--allow-networks", *s["allow_networks"],
            "--number-sample-per-shard", str(per_shard), "--shards-per-file", "1", "--timeout", str(s["timeout"]),
            "--retries", str(s["retries"]), "--image-size", "256", "--thread-count", str(s["thread_count"])],
            work, events)
    man = read_manifest(str(pool / layout.POOL_MANIFEST))
    got = man["num_samples"]
    tars = glob.glob(str(pool / "shards" / "**" / "*.tar"), recursive=True)
    rows = sum(1 for _ in _catalog_rows(pool / layout.CATALOG_DIR))
    info = {"per_shard": per_shard, "shards_attempted": shards, "rows": rows, "samples": got,
            "tars": len(tars), "bytes_per_sample": round(sum(os.path.getsize(t) for t in tars) / max(got, 1)),
            "largest_tar_mb": round(max(os.path.getsize(t) for t in tars) / 2**20, 2)}
    pm = str(pool / layout.POOL_MANIFEST)
    want = set(stages or STAGES)
    if "verify" in want:
        out["verify"] = submit("verify", [pm], work, events)
    if want & {"subsets", "reshard"}:
        out["subsets"] = submit("subsets", ["--pool", pm, "--output", str(work / "subsets"),
                                            "--scales", f"{got // 5},{got - 2}", "--seed", "0"], work, events)
    if "reshard" in want:
        big = max((work / "subsets").glob("*.manifest.json"), key=lambda m: read_manifest(str(m))["num_samples"])
        out["reshard"] = submit("reshard", ["--manifest", str(big), "--output", str(work / "resharded"),
                                            "--shard-size", str(per_shard)], work, events)
    emb = str(work / "emb")
    if want & {"embed", "dedup", "semdedup"}:
        out["embed"] = submit("embed", ["--manifest", pm, "--output", emb, "--model", "lt-tiny", "--batch-size", "32",
                                        "--num-workers", str(embed_workers)], work, events)
    if "dedup" in want:
        out["dedup"] = submit("dedup", ["--embeddings", emb, "--evalset", f"glyphs={made['evalset']}",
                                        "--output", str(work / "dedup"), "--device", "cpu", "--threshold", "0.5"], work, events)
    if "semdedup" in want:
        out["semdedup"] = submit("semdedup", ["--embeddings", emb, "--output", str(work / "semdedup"), "--clusters", "4",
                                              "--eps", "0.01", "--gallery-groups", "0"], work, events)
    if "takedown" in want:
        removal_list_for(str(pool / layout.CATALOG_DIR), 2, str(work / "takedown.txt"))
        out["takedown"] = submit("takedown", ["--pool", pm, "--list", str(work / "takedown.txt"), "--reason", "bench",
                                              "--output", str(work / "takedown")], work, events)
    return {"pool": info, "stages": out}


_INDEX_LOAD = """
import json, resource, sys
import numpy as np
from laiontools import index as DI
from laiontools.core.storage import sha256_bytes
path, n, d = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
if sys.argv[4] == "build":
    idx, _ = DI.build_index(np.random.default_rng(0).standard_normal((n, d), dtype=np.float32), "flat")
    with open(path, "wb") as f:
        f.write(DI.serialize(idx))
    sys.exit(0)
def rss():
    for line in open("/proc/self/status"):
        if line.startswith(("VmRSS", "VmHWM")):
            yield line.split(":")[0], int(line.split()[1]) / 1024
before = dict(rss())
data = open(path, "rb").read()
sha = sha256_bytes(data)
del data
DI.load_cached(path, sha, use_gpu=False)
after = dict(rss())
print(json.dumps({"rss_before_mb": round(before["VmRSS"], 1), "hwm_after_mb": round(after["VmHWM"], 1),
                  "rss_after_mb": round(after["VmRSS"], 1)}))
"""


def index_load(work: Path, n: int, d: int) -> dict[str, Any]:
    """dedup's per-worker index load (index.load_cached, as a search task calls it), in a fresh process:
    its peak RSS against the index file's size (a flat index of n random d-dim vectors)."""
    path = str(work / "index.faiss")
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    subprocess.run([sys.executable, "-c", _INDEX_LOAD, path, str(n), str(d), "build"], check=True, env=env)
    got = json.loads(subprocess.run([sys.executable, "-c", _INDEX_LOAD, path, str(n), str(d), "load"], check=True,
                                    env=env, capture_output=True, text=True).stdout.strip().splitlines()[-1])
    size = os.path.getsize(path) / 2**20
    os.remove(path)
    return {"rows": n, "dim": d, "index_mb": round(size, 1), **got,
            "peak_over_index": round((got["hwm_after_mb"] - got["rss_before_mb"]) / size, 2),
            "held_over_index": round((got["rss_after_mb"] - got["rss_before_mb"]) / size, 2)}


def _catalog_rows(cat: Path):
    import pyarrow.parquet as pq

    for f in sorted(cat.rglob("*.parquet")):
        yield from range(pq.ParquetFile(f).metadata.num_rows)


def table(figures: dict[str, Any]) -> str:
    """The figures as three tables: peak RSS per process role, shuffle writes, shuffle totals per catalog row."""
    sizes, probe = figures["sizes"], figures.get("dedup_index_load")
    lines = ["", ("peak RSS, MB (/proc VmHWM; worker: the largest Python worker, n: how many; child: the largest process "
             "a task forked; py-tree: Spark's ProcessTreePythonRSSMemory; /proc sum: the same sum from /proc)"),
             (f"{'stage':>9} {'pool':>7} {'worker':>7} {'n':>2} {'child':>6} {'driver':>7} {'JVM':>6} {'heap':>6} "
              f"{'py-tree':>8} {'/proc sum':>9} {'wall s':>7}")]
    shuffle_lines = ["", "shuffle writes (task metrics summed per Spark stage)",
                     f"{'stage':>9} {'pool':>7} {'records':>9} {'bytes':>10} {'B/rec':>6} {'B/cat row':>9}  spark stage"]
    total_lines = ["", "shuffle written per catalog row, all of a stage's exchanges (largest one)",
                   f"{'stage':>9} {'pool':>7} {'cat rows':>9} {'exchanges':>9} {'B/cat row':>9} {'largest':>8}"]
    for st in STAGES:
        for n, r in sizes.items():
            f = r["stages"].get(st)
            if not f:
                continue
            ev = f["event_log"] or {"peaks_mb": {}, "shuffles": []}
            w = f["worker_rss_mb"]
            lines.append(f"{st:>9} {n:>7} {max(w, default=0):>7} {len(w):>2} {max(f['task_child_rss_mb'], default=0):>6} "
                         f"{f['driver_python_rss_mb']!s:>7} {f['jvm_rss_mb']!s:>6} {ev['peaks_mb'].get('JVMHeapMemory', '-')!s:>6} "
                         f"{ev['peaks_mb'].get('ProcessTreePythonRSSMemory', '-')!s:>8} "
                         f"{f['sum_jvm_python_rss_peak_mb']!s:>9} {f['wall_s']:>7}")
            rows = r["pool"]["rows"]
            for x in ev["shuffles"]:
                b, rec = x["shuffle_write_bytes"], x["shuffle_write_records"]
                shuffle_lines.append(f"{st:>9} {n:>7} {rec:>9} {b:>10} {b / max(rec, 1):>6.0f} {b / rows:>9.0f}  {x.get('name', '?')[:60]}")
            if ev["shuffles"]:
                tot = sum(x["shuffle_write_bytes"] for x in ev["shuffles"])
                big = max(x["shuffle_write_bytes"] for x in ev["shuffles"])
                total_lines.append(f"{st:>9} {n:>7} {rows:>9} {len(ev['shuffles']):>9} {tot / rows:>9.0f} {big / rows:>8.0f}")
    lines += shuffle_lines + total_lines
    if probe:
        lines += ["", f"dedup index load (a fresh process): {probe}"]
    lines += ["", f"command: {figures['command']}   load average {figures['loadavg_1_5_15']}"]
    return "\n".join(lines)


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--pools", nargs="+", default=["250x4", "1000x4", "250x16"],
                    help="<samples per shard>x<shards attempted>, one pool each")
    ap.add_argument("--stages", nargs="+", default=STAGES, choices=STAGES,
                    help="stages to measure (download always runs; embed too for dedup and semdedup, subsets for reshard)")
    ap.add_argument("--embed-workers", type=int, default=0,
                    help="embed's --num-workers: 0 decodes in the task's process, N > 0 in N DataLoader workers "
                         "reading the task's shard spool (a GPU's default is 8)")
    ap.add_argument("--hosts", type=int, default=8,
                    help="synthetic servers on 127.0.0.2 .. 127.0.0.<1+hosts>, the rows spread over them (one host's "
                         "politeness pauses skip its rows past their budget)")
    ap.add_argument("--index-rows", type=int, default=250_000, help="dedup index-load probe: rows of a flat index (0: skip)")
    ap.add_argument("--index-dim", type=int, default=512)
    ap.add_argument("--out", default="bench-out")
    ap.add_argument("--work", default=None, help="scratch folder (default: <out>/task-memory-work)")
    ap.add_argument("--show", default=None, metavar="JSON", help="print the tables of a task_memory.json and exit")
    a = ap.parse_args()
    if a.show:
        with open(a.show) as f:
            print(table(json.load(f)))
        return 0
    work = Path(a.work or os.path.join(a.out, "task-memory-work")).resolve()
    load_before = [round(x, 1) for x in os.getloadavg()]
    sizes = {}
    for n in a.pools:
        per_shard, shards = (int(x) for x in n.split("x"))
        w = work / f"pool-{n}"
        shutil.rmtree(w, ignore_errors=True)
        w.mkdir(parents=True)
        sizes[n] = run_size(per_shard, shards, w, a.stages, a.embed_workers, a.hosts)
        shutil.rmtree(w / "web", ignore_errors=True)
    probe = index_load(work, a.index_rows, a.index_dim) if a.index_rows else None
    figures = {"benchmark": "executor memory and shuffle bytes per stage, Spark local[2] (issue 12)",
               "machine": f"{os.cpu_count()} cpus",
               "loadavg_1_5_15": {"before": load_before, "after": [round(x, 1) for x in os.getloadavg()]},
               "sizes": sizes, "dedup_index_load": probe, "command": ("python bench/bench_task_memory.py " + " ".join(sys.argv[1:])).strip()}
    rc = write_figures(a.out, "task_memory.json", figures)
    print(table(figures))
    return rc


if __name__ == "__main__":
    sys.exit(main())
