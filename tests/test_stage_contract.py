"""The stage contract (core/stage.py): one output rule and one lock for every stage.

Every stage that writes a folder (or a file, for evaluate) refuses a non-empty folder that is not its
own output, before it touches anything; a second run into an output that a live run holds is refused
naming the first's host and pid; a lock left by a killed run is taken over; a re-run into a stage's own
output resumes. The configs are cheap: the rule applies before a stage reads its inputs or starts Spark.
"""

from __future__ import annotations

import datetime
import hashlib
import importlib
import json
import os
import signal
import socket
import subprocess
import sys
import textwrap
import time

import pytest

from laiontools.core.errors import UserError
from laiontools.core.stage import OutputLocked, OutputRefused, StageResult, output_paths

MISSING = "/nonexistent/laiontools-test-input"


def _cfg(stage: str, out: str):
    """A valid config for `stage` writing to `out`, with inputs that do not exist."""
    from laiontools.stages.dedup import DedupConfig
    from laiontools.stages.dedup_calibrate import CalibrateConfig
    from laiontools.stages.demo import DemoConfig
    from laiontools.stages.download import DownloadConfig
    from laiontools.stages.embed import EmbedConfig
    from laiontools.stages.evaluate import EvaluateConfig
    from laiontools.stages.prepare import PrepareConfig
    from laiontools.stages.reshard import ReshardConfig
    from laiontools.stages.semdedup import SemDedupConfig
    from laiontools.stages.study import StudyConfig
    from laiontools.stages.subsets import SubsetsConfig
    from laiontools.stages.takedown import TakedownConfig
    from laiontools.stages.train import TrainConfig

    ev = [f"x={MISSING}"]
    return {
        "prepare": lambda: PrepareConfig(input=MISSING, output=out),
        "download": lambda: DownloadConfig(input=MISSING, output=out),
        "embed": lambda: EmbedConfig(manifest=MISSING, output=out, model="lt-tiny"),
        "dedup": lambda: DedupConfig(embeddings=MISSING, evalset=ev, output=out),
        "dedup_calibrate": lambda: CalibrateConfig(embeddings=MISSING, evalset=ev, output=out),
        "semdedup": lambda: SemDedupConfig(embeddings=MISSING, output=out),
        "subsets": lambda: SubsetsConfig(pool=MISSING, output=out, scales="10", seed=1),
        "reshard": lambda: ReshardConfig(manifest=MISSING, output=out),
        "takedown": lambda: TakedownConfig(pool=MISSING, list_file=MISSING, reason="test", output=out),
        "train": lambda: TrainConfig(manifest=MISSING, model="lt-tiny", samples_seen=8, batch_size=8, output=out),
        "evaluate": lambda: EvaluateConfig(evalset=ev, output=out),
        "study": lambda: StudyConfig(output=out, scales={"s": MISSING}, samples_seen=[8], batch_size=8, models=["lt-tiny"],
                                     evalset=ev),
        "demo": lambda: DemoConfig(output=out, n=100),
    }[stage]()


FOLDER_STAGES = ["prepare", "download", "embed", "dedup", "dedup_calibrate", "semdedup", "subsets", "takedown", "reshard",
                 "train", "study", "demo"]


def test_every_stage_of_the_cli_is_covered_here():
    """A stage added to cli.STAGES (one module + one line) gets the output rule from its runner; this
    file must list it so that the rule is tested for it too."""
    from laiontools.cli import _ENTRY, STAGES

    stages = set()
    for name, (module, _) in STAGES.items():
        mod = importlib.import_module(module)
        if name not in _ENTRY and hasattr(mod, "run") and hasattr(mod, "CONFIG"):
            assert getattr(mod.run, "stage_name", None) == mod.STAGE, f"{module}.run is not wrapped by stage_entry"
            stages.add(module.rsplit(".", 1)[1])
    assert stages == set(FOLDER_STAGES) | {"evaluate"}


def _run(stage: str, cfg):
    return importlib.import_module(f"laiontools.stages.{stage}").run(cfg)


def _json(path: str):
    with open(path) as f:
        return json.load(f)


def _sha(path: str) -> str:
    with open(path, "rb") as f:
        return hashlib.sha256(f.read()).hexdigest()


def _snapshot(root) -> dict[str, str]:
    """Relative path -> sha256 of every file under root (hidden ones included)."""
    out = {}
    for dirpath, _, files in os.walk(root):
        for f in files:
            p = os.path.join(dirpath, f)
            out[os.path.relpath(p, root)] = _sha(p)
    return out


@pytest.fixture
def user_folder(tmp_path):
    """A folder of the user's own files, as in the reshard report of #16: shards/shard-00000.tar and uids.npy."""
    d = tmp_path / "mine"
    (d / "shards").mkdir(parents=True)
    (d / "shards" / "shard-00000.tar").write_bytes(b"my own tar, not laiontools'" * 100)
    (d / "uids.npy").write_bytes(os.urandom(4096))
    return d


@pytest.mark.parametrize("stage", FOLDER_STAGES)
def test_every_stage_refuses_a_foreign_folder_and_touches_nothing(stage, user_folder):
    before = _snapshot(user_folder)
    with pytest.raises(OutputRefused, match=r"is not empty and holds no .*nothing in it was touched"):
        _run(stage, _cfg(stage, str(user_folder)))
    assert _snapshot(user_folder) == before  # same files, same bytes, no marker or lock left behind


@pytest.mark.parametrize("stage", ["reshard", "embed", "subsets"])
def test_output_of_another_stage_is_refused(stage, tmp_path):
    out = tmp_path / "emb"
    out.mkdir()
    (out / "model.json").write_text("{}")
    marker, _ = output_paths(str(out))
    with open(marker, "w") as f:
        json.dump({"stage": "dedup"}, f)
    before = _snapshot(out)
    with pytest.raises(OutputRefused, match=r"holds the output of `laiontools dedup`"):
        _run(stage, _cfg(stage, str(out)))
    assert _snapshot(out) == before


def test_evaluate_refuses_a_foreign_results_file(tmp_path):
    mine = tmp_path / "results.json"
    mine.write_text('{"mine": true}')
    with pytest.raises(OutputRefused, match="is not empty and holds no"):
        _run("evaluate", _cfg("evaluate", str(mine)))
    assert mine.read_text() == '{"mine": true}' and sorted(os.listdir(tmp_path)) == ["results.json"]
    with pytest.raises(OutputRefused, match="is a folder"):
        _run("evaluate", _cfg("evaluate", str(tmp_path)))


def test_output_that_is_a_file_is_refused(tmp_path):
    f = tmp_path / "file"
    f.write_bytes(b"x")
    with pytest.raises(NotADirectoryError, match="exists and is a file"):
        _run("reshard", _cfg("reshard", str(f)))
    assert f.read_bytes() == b"x"


def test_bad_input_into_a_new_folder_leaves_no_trace(tmp_path):
    """A run that fails on its input before writing anything leaves neither the folder it created nor a lock."""
    out = tmp_path / "new"
    with pytest.raises(UserError):
        _run("reshard", _cfg("reshard", str(out)))
    assert not out.exists()
    existing = tmp_path / "empty"
    existing.mkdir()
    with pytest.raises(UserError):
        _run("train", _cfg("train", str(existing)))
    assert existing.exists() and os.listdir(existing) == []


_HOLDER = textwrap.dedent("""
    import sys
    from laiontools.core.stage import output_lock
    with output_lock(sys.argv[1], "reshard"):
        print("locked", flush=True)
        sys.stdin.read()  # hold until the test closes stdin (or kills us)
""")


def _hold_lock(path: str) -> subprocess.Popen:
    p = subprocess.Popen([sys.executable, "-c", _HOLDER, path], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    assert p.stdout.readline().strip() == "locked"
    return p


def test_live_lock_refuses_and_a_killed_runs_lock_is_taken_over(tmp_path):
    out = str(tmp_path / "out")
    holder = _hold_lock(out)
    try:
        with pytest.raises(OutputLocked) as e:
            _run("reshard", _cfg("reshard", out))
        msg = str(e.value)
        assert f"pid {holder.pid}" in msg and f"host {socket.gethostname()}" in msg and "laiontools reshard" in msg
        _, lock = output_paths(out)
        assert _json(lock)["pid"] == holder.pid  # the refused run did not touch the holder's lock
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait(timeout=60)
    # The killed run's lock file is still there, naming a dead pid: the next run takes it over and,
    # past the lock, fails on its (missing) input; the lock is released on that error.
    assert os.path.exists(lock) and _json(lock)["pid"] == holder.pid
    with pytest.raises(UserError) as e:
        _run("reshard", _cfg("reshard", out))
    assert not isinstance(e.value, OutputLocked) and MISSING in str(e.value)
    assert not os.path.exists(lock)


def _dead_pid() -> int:
    p = subprocess.Popen([sys.executable, "-c", "pass"])
    p.wait(timeout=60)
    return p.pid


def test_object_store_lock_object(tmp_path):
    """Outputs on object stores get a lock object (no flock there): live one refused, stale one taken over."""
    import fsspec

    out = f"memory://lt-{os.getpid()}/out"
    fs = fsspec.filesystem("memory")
    _, lock = output_paths(out)
    live = subprocess.Popen([sys.executable, "-c", "import sys; sys.stdin.read()"], stdin=subprocess.PIPE)
    now = datetime.datetime.now(datetime.UTC)

    def lock_of(pid: int, started: datetime.datetime | None) -> bytes:
        return json.dumps({"host": socket.gethostname(), "pid": pid, "stage": "reshard",
                           **({"started": started.isoformat(timespec="seconds")} if started else {})}).encode()

    def taken_over() -> None:
        with pytest.raises(UserError) as e:
            _run("reshard", _cfg("reshard", out))
        assert not isinstance(e.value, OutputLocked) and not fs.exists(lock)

    try:
        for started in (now, None):  # the lock's owner, as far as this host can tell
            fs.pipe(lock, lock_of(live.pid, started))
            with pytest.raises(OutputLocked, match=f"pid {live.pid}"):
                _run("reshard", _cfg("reshard", out))
            assert fs.exists(lock)
        # the same pid, but a process started an hour after the lock was taken: the owner is gone and its
        # pid was given again (a reboot, pids wrapped around)
        fs.pipe(lock, lock_of(live.pid, now - datetime.timedelta(hours=1)))
        taken_over()
    finally:
        live.kill()
        live.wait(timeout=60)
    fs.pipe(lock, lock_of(_dead_pid(), now))
    taken_over()
    # killed but not yet reaped (its parent died with it; init reaps orphans only every second or two)
    zombie = subprocess.Popen([sys.executable, "-c", "pass"])
    try:
        for _ in range(600):
            with open(f"/proc/{zombie.pid}/stat", "rb") as f:
                if f.read().rsplit(b")", 1)[1].split()[0] == b"Z":
                    break
            time.sleep(0.05)
        else:
            raise AssertionError("the child never exited")
        fs.pipe(lock, lock_of(zombie.pid, now))
        taken_over()
    finally:
        zombie.wait(timeout=60)
    # another host's lock cannot be checked from here: refused, with the way out in the message
    fs.pipe(lock, json.dumps({"host": "some-other-host", "pid": 1, "stage": "embed"}).encode())
    with pytest.raises(OutputLocked, match="some-other-host.*delete the lock file"):
        _run("reshard", _cfg("reshard", out))


def test_rerun_into_own_output_resumes(tmp_path):
    """The second run into a stage's own (non-empty) output is accepted and resumes (embed: all shards skipped)."""
    from laiontools.stages import embed
    from laiontools.testing.embed_pool import write_pool

    manifest = write_pool(str(tmp_path / "pool"), n_shards=2, per_shard=3, image_size=64, realistic=False)
    out = str(tmp_path / "emb")
    cfg = _cfg("embed", out)
    cfg = type(cfg)(manifest=manifest, output=out, model="lt-tiny", batch_size=4, num_workers=0)
    first = embed.run(cfg)
    assert isinstance(first, StageResult) and first.stage == "embed" and first.counts["shards_embedded"] == 2
    marker, lock = output_paths(out)
    assert _json(marker)["stage"] == "embed" and not os.path.exists(lock)
    second = embed.run(cfg)
    assert second.ok and second.counts == {**first.counts, "shards_embedded": 0, "shards_skipped": 2, "rows": 0}
    assert "total" in second.timings and second.outputs["embeddings"] == out
    # the pool folder download-shaped by write_pool belongs to no stage: embedding into it is refused
    with pytest.raises(OutputRefused):
        embed.run(type(cfg)(manifest=manifest, output=str(tmp_path / "pool"), model="lt-tiny"))


def test_every_command_prints_its_help(capsys):
    """`laiontools <stage> --help` works for every entry of the CLI table (argparse %-formats help text)."""
    from laiontools.cli import STAGES, main

    for name in STAGES:
        with pytest.raises(SystemExit) as e:
            main([*name.split(), "--help"])
        assert e.value.code == 0, name
        assert f"laiontools {name}" in capsys.readouterr().out, name


def test_a_file_outputs_killed_temps_go_and_its_neighbours_stay(tmp_path):
    """A stage whose output is one file (evaluate): the temps a killed run left of that file, of its
    completion marker and of its ownership marker are removed when the next run claims the output;
    the temps of other files in the folder (other outputs, maybe with live writers) are not."""
    from laiontools.core.stage import claimed_output
    from laiontools.core.storage import write_json

    out = tmp_path / "eval.json"
    mine = [".eval.json.tmp-0123abcd", ".eval.json.done.tmp-89abcdef", "..eval.json.laiontools-output.json.tmp-deadbeef"]
    others = [".eval.json2.tmp-0123abcd", ".other.json.tmp-0123abcd", ".eval.json.tmp-notahex1", "eval.json.tmp-0123abcd"]
    for name in mine + others:
        (tmp_path / name).write_bytes(b"half")
    with claimed_output(str(out), "evaluate", kind="file"):
        assert sorted(os.listdir(tmp_path)) == sorted(others + [".eval.json.laiontools-output.json", ".eval.json.laiontools.lock"])
        write_json(str(out), {"ok": 1})
    assert sorted(os.listdir(tmp_path)) == sorted(others + [".eval.json.laiontools-output.json", "eval.json"])


@pytest.mark.parametrize("text, says", [
    ('allow_private_network: "false"\n', "allow_private_network must be true or false (unquoted), got 'false'"),
    ("require_caption: 'no'\n", "require_caption must be true or false (unquoted), got 'no'"),
    ("shards_per_file: true\n", "shards_per_file must be a whole number, got True"),
    ("number_sample_per_shard: 2.5\n", "number_sample_per_shard must be a whole number, got 2.5"),
    ("max_caption_length: .nan\n", "max_caption_length must be a whole number, got nan"),
    ("allow_networks: 10.0.0.0/8\n", "allow_networks must be a list of text, got '10.0.0.0/8'"),
    ("spark_conf: abc\n", "spark_conf must be a mapping of text to text, got 'abc'"),
    ("number_sample_per_shard: ten\n", "number_sample_per_shard must be a whole number, got 'ten' (str)"),
    ("1: 2\n", "setting names must be text, got 1"),
    ("on: true\n", "setting names must be text, got True"),
    # a setting written twice: the parser kept the last one, silently (here: the loopback row allowed)
    ("allow_private_network: false\nallow-private-network: true\n", "setting 'allow-private-network' is given twice (line 2)"),
    # a file that holds no mapping was taken as no settings at all
    ("[]\n", "expected a mapping of setting: value, got list"),
    ("false\n", "expected a mapping of setting: value, got bool"),
])
def test_a_config_file_value_of_the_wrong_type_is_refused(tmp_path, capsys, text, says):
    """--config YAML is not typed by argparse: a quoted "false" is a non-empty string, which made
    allow_private_network (the SSRF guard's opt-out) true. Every value of the wrong type is refused
    by name, before anything is written; the CLI prints one line and exits 2."""
    from laiontools.cli import main as cli_main

    src = tmp_path / "src.jsonl"
    src.write_text('{"url": "http://127.0.0.1/a.jpg", "caption": "a"}\n')
    conf = tmp_path / "c.yaml"
    conf.write_text(text)
    out = tmp_path / "out"
    assert cli_main(["prepare", "--input", str(src), "--output", str(out), "--config", str(conf)]) == 2
    err = capsys.readouterr().err
    assert says in err and "Traceback" not in err and not out.exists()


def test_a_config_file_with_typed_values_and_numbers_as_text_is_taken(tmp_path):
    """The same settings written with their types are taken (allow_private_network false: the loopback
    row is refused), and a number given as text is left to the stage to parse (study: "3e9", which YAML
    reads as text)."""
    import pandas as pd

    from laiontools.cli import main as cli_main
    from laiontools.stages.study import StudyConfig

    src = tmp_path / "src.jsonl"
    src.write_text('{"url": "http://127.0.0.1/a.jpg", "caption": "a"}\n{"url": "http://example.org/b.jpg", "caption": "b"}\n')
    conf = tmp_path / "c.yaml"
    conf.write_text("allow_private_network: false\nrequire_caption: true\nallow_networks: []\n")
    out = tmp_path / "out"
    assert cli_main(["prepare", "--input", str(src), "--output", str(out), "--config", str(conf)]) == 0
    rejected = pd.read_parquet(out / "prepared" / "rejected")
    assert rejected["url"].tolist() == ["http://127.0.0.1/a.jpg"] and rejected["status"].tolist() == ["rejected_private_address"]
    assert len(pd.read_parquet(out / "prepared" / "accepted")) == 1
    StudyConfig.check_types({"samples_seen": ["3e9", 13_000_000_000, 3.4e10], "train": {"lr": 0.001}}, "study.yaml")


def test_a_list_flag_given_twice_keeps_both(tmp_path):
    """`--exclude a --exclude b` (as the README writes it) is both lists, as `--exclude a b` is; argparse's
    default kept only the last, so the eval-set dedup of the README's example was silently dropped."""
    from laiontools.core.config import config_from_args
    from laiontools.core.stage import config_parser
    from laiontools.stages.subsets import SubsetsConfig

    p = config_parser(SubsetsConfig, "subsets")
    base = ["--pool", "p.json", "--output", str(tmp_path / "o"), "--scales", "10", "--seed", "0"]
    for argv in (["--exclude", "/d/dedup", "--exclude", "/d/semdedup/eps/0.05"], ["--exclude", "/d/dedup", "/d/semdedup/eps/0.05"]):
        assert config_from_args(SubsetsConfig, p.parse_args(base + argv)).exclude == ["/d/dedup", "/d/semdedup/eps/0.05"]
    assert config_from_args(SubsetsConfig, p.parse_args(base)).exclude == []


def test_a_studys_scales_are_given_as_name_value_flags(tmp_path, capsys):
    """`study` and `study plan` took their scales (and the plan its images/s per model) only from a YAML
    file; `--scales 80M=a.json 400M=b.json` now gives the same mapping, a flag replaces the YAML's, and an
    item without `=`, a name given twice or a rate that is not a number is refused naming the flag."""
    from laiontools.cli import main as cli_main
    from laiontools.core.config import ConfigError, config_from_args
    from laiontools.core.stage import config_parser
    from laiontools.stages.study import PlanConfig

    p = config_parser(PlanConfig, "study plan")
    base = ["--samples-seen", "3e9", "--models", "ViT-B-32"]
    cfg = config_from_args(PlanConfig, p.parse_args(
        base + ["--scales", "80M=/d/80M/subset.manifest.json", "--scales", "2B=2B", "--images-per-second", "ViT-B-32=2400"]))
    assert cfg.scales == {"80M": "/d/80M/subset.manifest.json", "2B": "2B"} and cfg.images_per_second == {"ViT-B-32": 2400.0}
    yml = tmp_path / "study.yaml"
    yml.write_text("scales: {1M: 1M}\nsamples_seen: [1e6]\nmodels: [RN50]\n")
    assert config_from_args(PlanConfig, p.parse_args(["--config", str(yml)])).scales == {"1M": "1M"}
    assert config_from_args(PlanConfig, p.parse_args(["--config", str(yml), "--scales", "5M=5M"])).scales == {"5M": "5M"}
    with pytest.raises(ConfigError, match=r"^--scales: 80M given twice$"):
        config_from_args(PlanConfig, p.parse_args(base + ["--scales", "80M=1", "80M=2"]))
    for bad, msg in ((["--scales", "80M"], "argument --scales: expected NAME=VALUE, got '80M'"),
                     (["--scales", "8=8", "--images-per-second", "ViT-B-32=fast"], "'fast' is not a float")):
        with pytest.raises(SystemExit) as exited:  # argparse's usage error
            cli_main(["study", "plan", *base, *bad])
        assert exited.value.code == 2 and msg in capsys.readouterr().err
    # the whole CLI: a plan of two scales given as flags, its counts from the names
    assert cli_main(["study", "plan", *base, "--scales", "80M=80M", "400M=400M", "--images-per-second", "ViT-B-32=2400"]) == 0
    out = capsys.readouterr().out
    assert "ViT-B-32__80M__3000000000" in out and "400M   400000000  40000" in out


def test_a_stages_saved_settings_are_taken_back_with_config(tmp_path):
    """settings.json beside an output, given back with --config and a new --output, reruns the same
    settings: its `output: null` (download) is what --output overrides, and what it records
    about the run (`stage`, `clusters_used`, `world_size`) is ignored. Was: "output must be text, got
    None" and "unknown setting(s) ['stage']"."""
    import pandas as pd

    from laiontools.cli import main as cli_main
    from laiontools.core.config import config_from_args
    from laiontools.core.stage import config_parser
    from laiontools.stages.semdedup import SemDedupConfig

    src = tmp_path / "src.jsonl"  # loopback URLs, refused by the default network policy: nothing is fetched
    src.write_text("".join(f'{{"url": "http://127.0.0.1/{i}.jpg", "caption": "c{i}"}}\n' for i in range(3)))
    assert cli_main(["download", "--input", str(src), "--output", str(tmp_path / "a"), "--number-sample-per-shard", "7"]) == 0
    saved = json.loads((tmp_path / "a" / "settings.json").read_text())
    assert saved["output"] is None and saved["number_sample_per_shard"] == 7
    # (and its report says why nothing was fetched, and how to allow a network of one's own)
    report = (tmp_path / "a" / "report.txt").read_text()
    assert "note: 3 row(s) point to non-global addresses" in report and "--allow-networks" in report
    assert "speed:         - (nothing was downloaded)" in report
    assert cli_main(["download", "--config", str(tmp_path / "a" / "settings.json"), "--output", str(tmp_path / "b")]) == 0
    assert json.loads((tmp_path / "b" / "settings.json").read_text()) == saved  # the saved settings held
    pd.testing.assert_frame_equal(pd.read_parquet(tmp_path / "a" / "catalog"), pd.read_parquet(tmp_path / "b" / "catalog"))

    saved = tmp_path / "sd.json"  # as semdedup writes it
    saved.write_text(json.dumps({"stage": "semdedup", "embeddings": "/e", "output": "/o", "clusters": 8, "clusters_used": 5,
                                 "eps": [0.05]}))
    cfg = config_from_args(SemDedupConfig, config_parser(SemDedupConfig, "semdedup").parse_args(
        ["--config", str(saved), "--output", str(tmp_path / "sd")]))
    assert (cfg.clusters, cfg.eps, cfg.output) == (8, [0.05], str(tmp_path / "sd"))


@pytest.mark.parametrize("given, want", [("3e9", 3_000_000_000), ("3B", 3_000_000_000), ("12.8k", 12_800), ("4096", 4096),
                                         ("3x", None), ("0", None), ("2.5", None)])
def test_train_samples_seen_takes_a_count_as_other_stages_do(tmp_path, given, want):
    """`train --samples-seen 3e9` (or 3B) as `subsets --scales` and `study` take counts; was argparse's
    "invalid int value: '3e9'" with the usage block."""
    from laiontools.core.config import ConfigError, config_from_args
    from laiontools.core.stage import config_parser
    from laiontools.stages.train import TrainConfig

    args = config_parser(TrainConfig, "train").parse_args(
        ["--manifest", "m.json", "--model", "lt-tiny", "--output", str(tmp_path / "r"), "--samples-seen", given])
    if want is None:
        with pytest.raises(ConfigError, match=r"^train: --samples-seen must be a positive number of samples: "):
            config_from_args(TrainConfig, args)
    else:
        assert config_from_args(TrainConfig, args).samples_seen == want


def test_a_folder_given_where_a_file_is_read_is_one_line(tmp_path, capsys):
    """--config, --blocklist (and a manifest path) naming a folder: IsADirectoryError, printed as one line."""
    from laiontools.cli import main as cli_main

    src = tmp_path / "src.jsonl"
    src.write_text('{"url": "http://example.org/a.jpg", "caption": "a"}\n')
    for flag in ("--config", "--blocklist"):
        assert cli_main(["prepare", "--input", str(src), "--output", str(tmp_path / "out"), flag, str(tmp_path)]) == 2
        err = capsys.readouterr().err
        assert f"laiontools prepare: error: [Errno 21] Is a directory: '{tmp_path}'" in err and "Traceback" not in err


def test_a_config_file_number_with_an_exponent_is_a_number(tmp_path):
    """YAML 1.1 reads `lr: 5e-4` (an exponent without a dot) as the string "5e-4". A number field took the
    text as it was: train recorded "lr": "5e-4" and handed open_clip_train `--lr '5e-4'` (repr of a str),
    which refused it in the rank's log after the run had started ("invalid float value: \"'5e-4'\"");
    `spark_above: 1e7` was "a setting has the wrong type ('<' not supported ...)", naming no setting.
    Now such text is the number it spells, recorded and passed on as a number; text that is no number is
    refused naming its setting."""
    from laiontools.cli import main as cli_main
    from laiontools.contracts.manifest import read_manifest
    from laiontools.core.config import ConfigError, config_from_args
    from laiontools.core.stage import config_parser
    from laiontools.stages.train import TrainConfig, build_settings, plan_schedule
    from laiontools.testing.train_pool import write_resharded_subset

    mp = write_resharded_subset(str(tmp_path / "sub"), n_shards=1, per_shard=8)
    conf = tmp_path / "train.yaml"
    conf.write_text("lr: 5e-4\nwd: 1e-1\neps: 1e-8\nseed: 400_000\n")
    run_dir = str(tmp_path / "run")
    p = config_parser(TrainConfig, "train")

    def cfg_of(text: str) -> TrainConfig:
        conf.write_text(text)
        return config_from_args(TrainConfig, p.parse_args(["--manifest", mp, "--model", "lt-tiny", "--samples-seen", "16",
                                                           "--batch-size", "8", "--output", run_dir, "--config", str(conf)]))

    cfg = cfg_of("lr: 5e-4\nwd: 1e-1\neps: 1e-8\nseed: 400_000\n")
    assert (cfg.lr, cfg.wd, cfg.eps, cfg.seed) == (5e-4, 0.1, 1e-8, 400_000)
    plan = plan_schedule(samples_seen=16, global_batch=8, world_size=1, epoch_samples=8, workers=0)
    argv = build_settings(cfg, read_manifest(mp), plan, "cpu", run_dir)["open_clip_argv"]
    assert argv[argv.index("--lr") + 1] == "0.0005" and argv[argv.index("--eps") + 1] == "1e-08"
    assert cfg_of("checkpoint_every: 8e0\n").checkpoint_every == 8  # was "a setting has the wrong type ('<=' ...)"
    with pytest.raises(ConfigError, match=r"train.yaml: seed must be a whole number, got 'one' \(str\)$"):
        cfg_of("seed: one\n")  # was taken, and open_clip_train refused `--seed one` in the rank's log
    # the whole CLI: a source of one row into a new folder, Spark's threshold and the shard size written as 1e7 and 1e3
    src = tmp_path / "src.jsonl"
    src.write_text('{"url": "http://example.org/a.jpg", "caption": "a"}\n')
    conf.write_text("spark_above: 1e7\nnumber_sample_per_shard: 1e3\n")
    out = tmp_path / "prep"
    assert cli_main(["prepare", "--input", str(src), "--output", str(out), "--config", str(conf)]) == 0
    assert json.loads((out / "prepared" / "stats.json").read_text())["layout"]["number_sample_per_shard"] == 1000


@pytest.mark.parametrize("stage, text, says", [
    # was: AttributeError: 'int' object has no attribute 'startswith' (a traceback)
    ("dedup", "device: 0\n", "device must be auto, cpu or cuda[:N], got '0'"),
    # was: AttributeError: 'int' object has no attribute 'strip' (a traceback)
    ("takedown", "reason: 2026\n", "removal list /nonexistent/laiontools-test-input does not exist"),
    # was: "--scales is empty; give e.g. --scales 80M,400M,2B" for a scale that is given
    ("subsets", "scales: 1000\nseed: 1\n", "manifest /nonexistent/laiontools-test-input does not exist"),
])
def test_a_config_file_number_where_text_belongs_is_that_text(tmp_path, capsys, stage, text, says):
    """A YAML number in a text setting (`device: 0`, `reason: 2026`, `scales: 1000`) passed the type check
    (text may be written as a number) but stayed a number: validate() or the run then called str methods
    on it. It is the text now, as the flag `--device 0` gives: the setting is judged, then the input."""
    from laiontools.cli import main as cli_main

    conf = tmp_path / "c.yaml"
    conf.write_text(text)
    argv = {"dedup": ["--embeddings", MISSING, "--evalset", f"x={MISSING}"],
            "takedown": ["--pool", MISSING, "--list", MISSING],
            "subsets": ["--pool", MISSING]}[stage]
    assert cli_main([stage, *argv, "--output", str(tmp_path / "out"), "--config", str(conf)]) == 2
    err = capsys.readouterr().err
    assert says in err and "Traceback" not in err


def test_a_pool_named_by_a_yaml_number_is_downloaded_and_recorded_as_text(tmp_path):
    """download with `name: 2024` in its --config ran the whole download, then failed writing the manifest
    ("invalid manifest at name: 2024 is not of type 'string'"), leaving a pool without a manifest."""
    from laiontools.cli import main as cli_main

    src = tmp_path / "src.jsonl"  # a loopback URL, refused by the default network policy: nothing is fetched
    src.write_text('{"url": "http://127.0.0.1/a.jpg", "caption": "a"}\n')
    conf = tmp_path / "c.yaml"
    conf.write_text("name: 2024\n")
    out = tmp_path / "pool"
    assert cli_main(["download", "--input", str(src), "--output", str(out), "--config", str(conf)]) == 0
    assert json.loads((out / "settings.json").read_text())["name"] == "2024"
    assert json.loads((out / "pool.manifest.json").read_text())["name"] == "2024"


def test_study_takes_sample_counts_as_train_and_study_plan_do(tmp_path, capsys):
    """One study.yaml serves `study plan` and `study` (README). `samples_seen: [3B, 13B]` planned, then
    the study refused the same file ("could not convert string to float: '3B'"), and `study --samples-seen
    3e9` was argparse's "invalid int value: '3e9'", where `train --samples-seen 3e9` (or 3B) is taken. The
    settings under `train:` were not typed as train's own --config is: `seed: one` was a ValueError
    traceback, `lr: 1e-3` reached open_clip_train as `--lr '1e-3'`."""
    from laiontools.cli import main as cli_main
    from laiontools.core.config import config_from_args
    from laiontools.core.stage import config_parser
    from laiontools.stages.study import StudyConfig

    p = config_parser(StudyConfig, "study")
    base = ["--output", str(tmp_path / "st"), "--scales", "80M=/d/80M/subset.manifest.json", "--models", "ViT-B-32",
            "--evalset", f"x={MISSING}"]
    assert config_from_args(StudyConfig, p.parse_args([*base, "--samples-seen", "3e9", "13B"])).samples_seen == [
        3_000_000_000, 13_000_000_000]
    yml = tmp_path / "study.yaml"
    yml.write_text("samples_seen: [3B, 1.3e+10]\ntrain: {lr: 1e-3, warmup: 1e3}\n")
    cfg = config_from_args(StudyConfig, p.parse_args([*base, "--config", str(yml)]))
    assert cfg.samples_seen == [3_000_000_000, 13_000_000_000] and cfg.train == {"lr": 0.001, "warmup": 1000}
    yml.write_text("samples_seen: [3e9]\ntrain: {seed: one}\n")
    assert cli_main(["study", *base, "--config", str(yml)]) == 2
    err = capsys.readouterr().err
    assert "study: train: seed must be a whole number, got 'one' (str)" in err and "Traceback" not in err


def test_a_spark_conf_after_the_job_file_is_named_as_such(capsys):
    """`spark-submit jobs/subsets.py ... --conf spark.sql.shuffle.partitions=5`: the flag after the job file is
    the job's, and argparse took --conf for an abbreviation of --config: "config file spark.sql... does not
    exist" (a new user's cluster run). Now the error says where a spark-submit flag goes."""
    from laiontools.cli import main as cli_main

    assert cli_main(["subsets", "--pool", "p.json", "--output", "o", "--scales", "4", "--conf", "spark.sql.shuffle.partitions=5"]) == 2
    err = capsys.readouterr().err
    assert "--conf spark.sql.shuffle.partitions=5 is a spark-submit flag: give it before the job file" in err, err


def test_a_python_without_laiontools_dependencies_is_one_line_naming_it():
    """`spark-submit --conf spark.pyspark.python=/usr/bin/python3 jobs/verify.py ...` runs the driver on a Python
    that finds laiontools on its path but not numpy: a raw ModuleNotFoundError traceback, exit 1 (a new user's
    cluster run). Now one line naming the Python and the module, exit 2. (numpy made unimportable the way
    Python's import system reads it: None in sys.modules.)"""
    import subprocess
    import sys

    code = "import sys; sys.modules['numpy'] = None\nfrom laiontools.cli import main\nsys.exit(main(['verify', 'x.json']))\n"
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=False)
    assert r.returncode == 2, r.stderr[-3000:]
    lines = [ln for ln in r.stderr.splitlines() if ln.startswith("laiontools verify: error:")]
    assert len(lines) == 1 and "Traceback" not in r.stderr, r.stderr[-3000:]
    assert f"this Python ({sys.executable}) cannot import 'numpy'" in lines[0], lines[0]
