"""Fault-injection helpers: run the real CLI, kill its process group at an observed point, compare trees.

A kill point is a *state of the output folder* (e.g. "the first completion marker exists"), not a
time: the harness looks at the folder whenever something in it changes (inotify; every few
milliseconds where there is none) and sends SIGKILL to the whole process group (the CLI, its Spark
JVM and Python workers, torchrun's children) as soon as the state holds.
What state the folder was really in when the kill landed is recorded (:class:`Kill`), so a test can
say which point it exercised; a run that finished before its point was reached is reported, never
counted as a survived kill.

Every run records one JSON line in ``$LAIONTOOLS_FAULTS_LOG`` when that is set (RELIABILITY.md's
figures are made from it).
"""

from __future__ import annotations

import ctypes
import dataclasses
import fnmatch
import hashlib
import json
import os
import re
import select
import signal
import struct
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterable

from laiontools.testing.procs import group_alive

# The venv's console script when present (what a user runs), else `python -m laiontools`.
_SCRIPT = os.path.join(os.path.dirname(sys.executable), "laiontools")
CLI = [_SCRIPT] if os.path.exists(_SCRIPT) else [sys.executable, "-m", "laiontools"]

# Every subprocess runs Spark on 2 local cores, quietly.
ENV = {**os.environ, "LAIONTOOLS_SPARK_MASTER": "local[2]", "LAIONTOOLS_SPARK_LOG_LEVEL": "ERROR",
       "NO_ALBUMENTATIONS_UPDATE": "1", "PYSPARK_PYTHON": sys.executable, "PYSPARK_DRIVER_PYTHON": sys.executable}

# Files that hold the time, host or pid of the run that wrote them: their bytes differ between two
# runs by design (the manifest keeps those in its `.run.json` sidecar so that it stays byte-stable;
# the output folder's ownership marker records when the folder was first claimed; the lock names
# the run holding it).
# A file output's lock (``.<name>.laiontools.lock``, e.g. evaluate's eval.json inside a study) killed
# with its run stays until a run writes that output again: study skips a finished point, so it stays.
RUN_VARYING = ("*.run.json", ".laiontools-output.json", ".laiontools.lock", ".*.laiontools.lock", "*/logs/*", "logs/*",
               "*.log")

# dedup records how long its steps took and the peak memory of its tasks, in each shard's marker,
# the index description and the summary: compared apart from those fields.
DEDUP_VARYING = ("done/*.done", "index/index.json", "summary.json")
DEDUP_JSON_EXCEPT = (("done/*.done", ("search_seconds", "peak_rss_mb")),
                     ("index/index.json", ("build_seconds", "embed_seconds")),
                     ("summary.json", ("search_seconds", "search_engine", "worker_peak_rss_mb")))



def load_json(path: str):
    with open(path) as f:
        return json.load(f)


def record(entry: dict) -> None:
    path = os.environ.get("LAIONTOOLS_FAULTS_LOG")
    if path:
        with open(path, "a") as f:
            f.write(json.dumps(entry, sort_keys=True) + "\n")


def run(args: list[str], cwd: str, timeout: float = 600, env: dict | None = None) -> subprocess.CompletedProcess:
    """Run `laiontools <args>` to the end in `cwd`; output captured as text."""
    return subprocess.run(CLI + args, cwd=cwd, env=env or ENV, capture_output=True, text=True, timeout=timeout, check=False)


def files(root: str, pattern: str = "*") -> list[str]:
    """Paths under `root` (relative, '/'-separated) whose relative path matches `pattern`."""
    out = []
    for d, _, names in os.walk(root):
        for n in names:
            rel = os.path.relpath(os.path.join(d, n), root).replace(os.sep, "/")
            if fnmatch.fnmatch(rel, pattern):
                out.append(rel)
    return sorted(out)


def count(root: str, pattern: str) -> int:
    return len(files(root, pattern)) if os.path.isdir(root) else 0


@dataclasses.dataclass
class Kill:
    """What happened to one killed run."""

    point: str  # the name of the kill point asked for
    killed: bool  # False: the run ended (with `returncode`) before the point was reached
    returncode: int | None
    seconds: float  # from start to kill (or to the end)
    state: list[str]  # the output folder's files at the kill, relative


class _Changes:
    """Wakes its caller when something under a folder changes: a file made, written, closed, renamed or
    removed (Linux inotify, a watch on every directory of the tree and on the folder's nearest existing
    parent until it exists). Waiting costs no CPU, where polling a folder of a few hundred files every
    3 ms kept ~19 % of a core busy for the whole of a killed run (JVM start, imports: mostly nothing
    changes). Without inotify, `wait` only sleeps its interval, which is polling as before."""

    _MASK = 0x2 | 0x8 | 0x40 | 0x80 | 0x100 | 0x200 | 0x4 | 0x400 | 0x800
    # IN_MODIFY IN_CLOSE_WRITE IN_MOVED_FROM IN_MOVED_TO IN_CREATE IN_DELETE IN_ATTRIB IN_DELETE_SELF IN_MOVE_SELF

    def __init__(self, root: str):
        self.root = os.path.abspath(root)
        self.fd = -1
        self.watched: set[str] = set()
        try:
            self.libc = ctypes.CDLL(None, use_errno=True)
            self.fd = self.libc.inotify_init1(os.O_NONBLOCK | os.O_CLOEXEC)
        except (OSError, AttributeError):
            self.fd = -1
        self._watch_tree()

    def _add(self, path: str) -> None:
        if path not in self.watched and self.libc.inotify_add_watch(self.fd, os.fsencode(path), self._MASK) >= 0:
            self.watched.add(path)

    def _watch_tree(self) -> None:
        if self.fd < 0:
            return
        if not os.path.isdir(self.root):  # not made yet: watch the parent that exists, to see it made
            parent = os.path.dirname(self.root)
            while parent != os.path.dirname(parent) and not os.path.isdir(parent):
                parent = os.path.dirname(parent)
            self._add(parent)
            return
        for d, _, _ in os.walk(self.root):
            self._add(d)

    def wait(self, interval: float, idle: float = 0.05) -> None:
        """Return after `interval` once something changed, else after at most `idle` seconds (what the
        watches miss, e.g. a file outside the folder that a kill point reads, is seen that late)."""
        if self.fd < 0:
            time.sleep(interval)
            return
        t0 = time.monotonic()
        if select.select([self.fd], [], [], idle)[0]:
            new_dir = False
            try:
                while buf := os.read(self.fd, 65536):
                    at = 0
                    while at + 16 <= len(buf):  # struct inotify_event: int wd; u32 mask, cookie, len; name
                        _, mask, _, n = struct.unpack_from("iIII", buf, at)
                        new_dir |= bool(mask & 0x40000000)  # IN_ISDIR: a directory made or moved in
                        at += 16 + n
            except BlockingIOError:
                pass
            if new_dir or self.root not in self.watched:
                self._watch_tree()  # watch what was made since (already watched ones are skipped)
            rest = interval - (time.monotonic() - t0)
            if rest > 0:  # not more often than every `interval`: a writer's bursts of events are one look
                time.sleep(rest)

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1


def run_and_kill(args: list[str], cwd: str, out: str, point: str, when: Callable[[], bool],
                 timeout: float = 600, env: dict | None = None, poll: float = 0.003, stderr: str | None = None,
                 failpoint: str | None = None) -> Kill:
    """Start `laiontools <args>` in its own process group; SIGKILL the group as soon as `when()` holds.

    `when` is evaluated whenever something under `out` changed (at most every `poll` seconds) and at
    least every 50 ms; a false positive cannot happen (it reads the folder), a miss can (a state that
    lasts less than one evaluation), which is why the state at the kill is returned.
    `failpoint`: a phase too short to be hit by polling (laiontools.core.failpoints), held open for 30 s
    in this run; the kill then also waits for the run's own line saying it is paused there, so a
    failpoint that no code reaches lets the run end unkilled (killed False) instead of passing by luck.
    `stderr`: a file the run's stderr goes to (with a failpoint: a temporary file if not given), else discarded.
    """
    t0 = time.monotonic()
    tmp_err = None
    if failpoint:
        from laiontools.core import failpoints

        env = {**(env or ENV), failpoints.ENV: f"{failpoint}=30"}
        if not stderr:
            fd, stderr = tempfile.mkstemp(prefix="faultkit-", suffix=".stderr")
            os.close(fd)
            tmp_err = stderr
        folder_state = when

        def when() -> bool:
            return folder_state() and failpoint_reached(stderr, failpoint)
    changes = _Changes(out)
    err = open(stderr, "wb") if stderr else subprocess.DEVNULL  # noqa: SIM115 (closed below)
    try:
        proc = subprocess.Popen(CLI + args, cwd=cwd, env=env or ENV, start_new_session=True,
                                stdout=subprocess.DEVNULL, stderr=err)
    finally:
        if stderr:
            err.close()
    try:
        while proc.poll() is None and time.monotonic() - t0 < timeout:
            try:
                hit = when()
            except OSError:  # a file vanished between listing and reading: not a state to act on
                hit = False
            if hit:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait(timeout=60)
                state = files(out) if os.path.isdir(out) else []
                k = Kill(point, True, None, round(time.monotonic() - t0, 2), state)
                break
            changes.wait(poll)
        else:
            k = Kill(point, False, proc.poll(), round(time.monotonic() - t0, 2), files(out) if os.path.isdir(out) else [])
    finally:
        changes.close()
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(timeout=60)
        _reap_group(proc.pid)
        _wait_gone(out)
        if tmp_err:
            os.remove(tmp_err)
    return k


def failpoint_reached(stderr: str, name: str) -> bool:
    """The run whose stderr goes to `stderr` logged that it is paused at failpoint `name` (it is in
    that phase now: laiontools.core.failpoints logs before it sleeps)."""
    try:
        with open(stderr, encoding="utf-8", errors="replace") as f:
            return f"failpoint {name}: pausing" in f.read()
    except FileNotFoundError:
        return False


def _wait_gone(out: str, timeout: float = 60) -> None:
    """Wait until no process names `out` on its command line (torchrun's ranks die with their
    launcher through PR_SET_PDEATHSIG, a moment after it): a re-run must not race a dying rank."""
    needle = os.path.abspath(out).encode()
    t0 = time.monotonic()
    while time.monotonic() - t0 < timeout:
        alive = False
        for pid in os.listdir("/proc"):
            if pid.isdigit() and int(pid) != os.getpid():
                try:
                    with open(f"/proc/{pid}/cmdline", "rb") as f:
                        if needle in f.read():
                            alive = True
                            break
                except OSError:
                    continue
        if not alive:
            return
        time.sleep(0.1)


def _reap_group(pgid: int, timeout: float = 60) -> None:
    """SIGKILL whatever is left of the group (a JVM or worker the kill raced with) and wait until none of
    it is alive (a study's trainer forked from its zygote names no output on its command line)."""
    try:
        os.killpg(pgid, signal.SIGKILL)
    except ProcessLookupError:
        return
    t0 = time.monotonic()
    while time.monotonic() - t0 < timeout and group_alive(pgid):
        time.sleep(0.05)


def digests(root: str, ignore: Iterable[str] = RUN_VARYING) -> dict[str, str]:
    """relative path -> sha256 of every file under `root`, except those matching `ignore`."""
    ignore = tuple(ignore)
    out = {}
    for rel in files(root):
        if any(fnmatch.fnmatch(rel, pat) or fnmatch.fnmatch(os.path.basename(rel), pat) for pat in ignore):
            continue
        with open(os.path.join(root, rel), "rb") as f:
            out[rel] = hashlib.sha256(f.read()).hexdigest()
    return out


def tree_diff(got: dict[str, str], want: dict[str, str]) -> str:
    """A readable difference between two digest maps ('' when equal)."""
    lines = [f"missing: {p}" for p in sorted(set(want) - set(got))]
    lines += [f"extra:   {p}" for p in sorted(set(got) - set(want))]
    lines += [f"differs: {p}" for p in sorted(set(got) & set(want)) if got[p] != want[p]]
    return "\n".join(lines)


def one_line_error(r: subprocess.CompletedProcess, stage: str) -> str:
    """Assert `r` is a clean refusal (exit 2, one `laiontools <stage>: error:` line, no traceback)."""
    err = r.stderr
    assert r.returncode == 2, f"exit {r.returncode}, want 2\nstdout: {r.stdout[-2000:]}\nstderr: {err[-4000:]}"
    assert "Traceback" not in err, err[-4000:]
    lines = [ln for ln in err.splitlines() if ln.startswith(f"laiontools {stage}: error:")]
    assert len(lines) == 1, err[-4000:]
    return lines[0]


def json_equal_except(got_root: str, want_root: str, pattern: str, keys: tuple[str, ...]) -> None:
    """Assert the JSON files matching `pattern` are the same in both trees apart from top-level `keys`
    (a duration or a rate that describes the run which wrote the file, not the data)."""
    got, want = files(got_root, pattern), files(want_root, pattern)
    assert got == want, (got, want)
    for rel in want:
        with open(os.path.join(got_root, rel)) as f:
            a = json.load(f)
        with open(os.path.join(want_root, rel)) as f:
            b = json.load(f)
        for k in keys:
            a.pop(k, None)
            b.pop(k, None)
        assert a == b, f"{rel}: {a} != {b}"


_LOGGING_ERROR = re.compile(r"--- Logging error ---\n.*?\nArguments: [^\n]*\n?", re.DOTALL)


def has_traceback(err: str) -> bool:
    """A Python traceback in `err`, apart from logging's own "--- Logging error ---" reports: in-process
    runs under pytest's fd capture can leave a library's handler on a stream an earlier test's capture
    closed; that is the harness, not the stage (a subprocess run never shows it)."""
    return "Traceback" in _LOGGING_ERROR.sub("", err)


def download_comparable(pool_dir: str, skip_uids: set[str]) -> tuple[object, dict, dict]:
    """(catalog rows, manifest fields, tar members) with run-describing fields left out: download
    re-fetches the images of unfinished shards, so shard bytes carry new tar mtimes and the report
    new speeds; rows, statuses, sizes, image hashes and member payloads must not change."""
    import tarfile

    import pandas as pd

    cat = pd.read_parquet(os.path.join(pool_dir, "catalog"))
    cat = cat[["uid", "source_id", "status", "shard", "key", "width", "height", "sha256"]]
    cat = cat[~cat["uid"].isin(skip_uids)].sort_values("source_id").reset_index(drop=True)
    m = load_json(os.path.join(pool_dir, "pool.manifest.json"))
    keep = {k: m[k] for k in ("target_samples", "source", "catalog", "kind", "name")}
    members = {}
    for s in m["shards"]:
        with tarfile.open(os.path.join(pool_dir, s["path"])) as tf:
            for ti in tf:
                data = tf.extractfile(ti).read()
                if ti.name.endswith(".json"):  # the sample's metadata, minus the download's own status text
                    data = {k: v for k, v in json.loads(data).items() if k not in ("error_message",)}
                members[(s["path"], ti.name)] = data
    return cat, keep, members


# ------------------------------------------------------------------------------ study (kill, disk full)

STUDY_RUNS = (("lt-tiny__16__16", 2), ("lt-tiny__16__96", 12))  # run id, optimizer steps


def study_args(root: str, out: str) -> list[str]:
    """The smallest study grid with two runs (one scale of 16 samples; budgets 16 and 96 samples seen,
    batch 8: 2 and 12 steps), its inputs written under `root`; the CLI argv writing into `out`."""
    import yaml

    from laiontools.testing.train_pool import write_color_evalset, write_resharded_subset

    data = os.path.join(root, "data")
    subset = write_resharded_subset(os.path.join(data, "s16"), n_shards=1, per_shard=16, name="s16")
    ev = write_color_evalset(os.path.join(data, "colors"), per_class=2)["path"]
    cfg = os.path.join(root, "study.yaml")
    with open(cfg, "w") as f:
        yaml.safe_dump({
            "output": out, "scales": {"16": subset}, "samples_seen": [16, 96], "models": ["lt-tiny"], "batch_size": 8,
            "nproc": 1, "evalset": [f"colors={ev}:wds"], "train": {"workers": 0, "log_every": 1},
            "evaluate": {"batch_size": 16}}, f)
    return ["study", "--config", cfg]


def assert_same_study(out: str, keep: str) -> None:
    """A study that was killed or ran out of space, then re-run, against an uninterrupted one.

    The weights (hence losses and metrics) of two uninterrupted runs already differ (see the train kill
    test), so the study is compared by what a fault must not change: the same files, the same grid rows
    with the same steps, samples and compute, every step of every run trained and logged once, the
    settings and compute cache byte for byte."""
    import pandas as pd

    got_files, want_files = digests(out, RUN_VARYING), digests(keep, RUN_VARYING)
    assert sorted(got_files) == sorted(want_files), tree_diff(got_files, want_files)
    for rel in ("settings.json", "gmacs.json"):
        assert got_files[rel] == want_files[rel], rel
    fixed = ["run_id", "model", "scale", "samples_seen", "steps", "dataset_samples", "gmacs_per_sample", "compute_gmacs"]
    got, want = pd.read_csv(os.path.join(out, "results.csv"))[fixed], pd.read_csv(os.path.join(keep, "results.csv"))[fixed]
    pd.testing.assert_frame_equal(got, want)
    assert list(got["steps"]) == [steps for _, steps in STUDY_RUNS]
    for rid, steps in STUDY_RUNS:
        with open(os.path.join(out, "runs", rid, "train", "metrics.jsonl")) as f:
            assert [json.loads(x)["step"] for x in f] == list(range(1, steps + 1)), rid
    assert set(load_json(os.path.join(out, "fits.json"))["fits"]) == set(load_json(os.path.join(keep, "fits.json"))["fits"])


# --------------------------------------------------------------------------- prepare (kill, disk full)


def prepare_args(source: str, out: str) -> list[str]:
    """prepare of the session's synthetic source with small shards (4 rows: ~20 accepted files)."""
    return ["prepare", "--input", source, "--output", out, "--allow-networks", "127.0.0.0/8",
            "--number-sample-per-shard", "4", "--shards-per-file", "1"]


def assert_same_prepared(out: str, keep: str) -> None:
    """Spark names the rejected rows' part files after its write job (a random uuid per run), so that
    folder is compared by its rows; every other file byte for byte."""
    import pandas as pd

    ignore = RUN_VARYING + ("prepared/rejected/*",)
    diff = tree_diff(digests(out, ignore), digests(keep, ignore))
    assert not diff, f"prepare: output differs from the uninterrupted run:\n{diff}"
    rows = [pd.read_parquet(os.path.join(d, "prepared", "rejected")).sort_values("uid").reset_index(drop=True)
            for d in (out, keep)]
    assert len(rows[1]) > 0
    pd.testing.assert_frame_equal(rows[0], rows[1])
