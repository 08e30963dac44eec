"""Credentials typed into a flag are used, and never recorded: settings files, manifests, logs, error lines
(core/redact.py). The end-to-end case (a download whose --blocklist needs a password) is in
test_web_download.py."""

from __future__ import annotations

import dataclasses
import importlib
import json
import logging
from pathlib import Path

import pytest

from laiontools.core.redact import redact, redact_text


@pytest.mark.parametrize(
    "text, recorded",
    [
        # userinfo: the password goes, the user name stays (as pip shows it); a lone token goes whole
        ("https://alice:hunter2@lists.example.org/bl.txt", "https://alice:***@lists.example.org/bl.txt"),
        ("https://ghp_abc123@github.com/org/repo", "https://***@github.com/org/repo"),
        ("see http://u:p%40ss@127.0.0.1:8080/x and s3://b/k", "see http://u:***@127.0.0.1:8080/x and s3://b/k"),
        # an '@' after the host is part of the path, not userinfo
        ("s3://bucket/icons/logo@2x.png", "s3://bucket/icons/logo@2x.png"),
        ("alice@example.org wrote it", "alice@example.org wrote it"),
        # signed URLs: the signature, credential and token parameters go, the others stay
        ("https://b.s3.amazonaws.com/k?X-Amz-Algorithm=AWS4&X-Amz-Credential=AKIA%2F2026&X-Amz-Signature=f00d&X-Amz-Expires=60",
         "https://b.s3.amazonaws.com/k?X-Amz-Algorithm=AWS4&X-Amz-Credential=***&X-Amz-Signature=***&X-Amz-Expires=60"),
        ("https://acct.blob.core.windows.net/c/list.txt?sv=2022-11-02&sig=abc%3D&se=2027",
         "https://acct.blob.core.windows.net/c/list.txt?sv=2022-11-02&sig=***&se=2027"),
        ("https://api.example.org/v1/list?key=AIzaSy00&page=2&access_token=tok", "https://api.example.org/v1/list?key=***&page=2&access_token=***"),
        # name=value text (a --conf on a command line), and names that only look alike
        ("--conf spark.hadoop.fs.s3a.secret.key=wJalr --conf spark.hadoop.fs.s3a.access.key=AKIA",
         "--conf spark.hadoop.fs.s3a.secret.key=*** --conf spark.hadoop.fs.s3a.access.key=AKIA"),
        ("password=hunter2 max_tokens=5 tokenizer=bpe session.token=t0k user_agent_token=laion", "password=*** max_tokens=5 tokenizer=bpe session.token=*** user_agent_token=laion"),
    ],
)
def test_redact_text(text, recorded):
    assert redact_text(text) == recorded
    assert redact_text(recorded) == recorded  # idempotent: a record compares with the redaction of new settings


def test_redact_mapping_by_name_and_value():
    settings = {
        "spark_conf": {"spark.hadoop.fs.s3a.secret.key": "wJalr", "spark.hadoop.fs.s3a.access.key": "AKIA",
                       "spark.authenticate.secret": "x", "spark.sql.shuffle.partitions": "37"},
        "blocklist": "https://alice:hunter2@h/bl.txt",
        "exclude": ["s3://b/dedup", "https://t@h/u.npy"],
        "password": None,
    }
    assert redact(settings) == {
        "spark_conf": {"spark.hadoop.fs.s3a.secret.key": "***", "spark.hadoop.fs.s3a.access.key": "AKIA",
                       "spark.authenticate.secret": "***", "spark.sql.shuffle.partitions": "37"},
        "blocklist": "https://alice:***@h/bl.txt",
        "exclude": ["s3://b/dedup", "https://***@h/u.npy"],
        "password": None,
    }
    assert settings["blocklist"] == "https://alice:hunter2@h/bl.txt"  # a copy: the run still uses what was typed


def test_no_setting_of_any_stage_is_named_like_a_secret():
    """Redaction replaces a mapping entry whole by its name: no stage's own setting may be one of them,
    or its value would never be recorded (and a resume would compare '***' with '***')."""
    from laiontools.cli import STAGES
    from laiontools.core.redact import _SECRET_KEY

    seen = 0
    for module, _ in set(STAGES.values()):
        cfg = getattr(importlib.import_module(module), "CONFIG", None)
        if cfg is None:
            continue
        for f in dataclasses.fields(cfg):
            seen += 1
            assert not _SECRET_KEY.match(f.name), (module, f.name)
    assert seen > 100


def test_log_lines_and_tracebacks_are_recorded_without_credentials(tmp_path):
    from laiontools.core.logs import setup_logging

    log_file = tmp_path / "run.log"
    setup_logging(log_file=str(log_file))
    try:
        log = logging.getLogger("laiontools.test")
        log.info("reading blocklist %s", "https://alice:hunter2@lists.example.org/bl.txt")
        try:
            raise OSError("GET https://b.example.org/k?X-Amz-Signature=f00dcafe failed")
        except OSError:
            log.exception("fetch failed")
    finally:
        for h in logging.root.handlers:
            h.flush()
        setup_logging()
    text = log_file.read_text()
    assert "https://alice:***@lists.example.org/bl.txt" in text
    assert "X-Amz-Signature=***" in text and "OSError" in text  # the traceback kept, redacted
    assert "hunter2" not in text and "f00dcafe" not in text


def test_cli_error_line_names_the_url_without_its_password(capfd):
    """A stage that fails on a URL carrying a password says so in one line, without the password."""
    from laiontools.cli import main

    rc = main(["inspect", "http://alice:hunter2@127.0.0.1:9/pool.manifest.json"])
    err = capfd.readouterr().err
    assert rc == 2, err
    assert "alice:***@127.0.0.1:9" in err and "hunter2" not in err, err


def test_a_path_read_back_redacted_is_refused_with_why(capfd):
    """A record holds `user:***@`: a stage that reads such a path back (subsets --update, a manifest's parent)
    cannot open it, and says where credentials go instead of failing on the server's 401."""
    from laiontools.cli import main
    from laiontools.core.errors import UserError
    from laiontools.core.storage import url_to_fs

    with pytest.raises(UserError, match=r"was read back from a record .* fsspec's configuration"):
        url_to_fs("https://alice:***@lists.example.org/bl.txt")
    with pytest.raises(UserError, match=r"was read back from a record"):
        url_to_fs("https://b.example.org/k?X-Amz-Signature=***&X-Amz-Expires=60")
    url_to_fs("memory://bucket/a***@b/c=***d")  # *** elsewhere in a key is a name like any other
    rc = main(["inspect", "http://alice:***@127.0.0.1:9/pool.manifest.json"])
    err = capfd.readouterr().err
    assert rc == 2 and "was read back from a record" in err, err


def test_manifest_and_sidecar_are_written_redacted(tmp_path):
    from laiontools.contracts.manifest import SIDECAR_SUFFIX, new_manifest, write_manifest

    m = new_manifest(name="p", kind="pool", num_samples=0, target_samples=None, uids={"path": "u.npy", "sha256": "0" * 64, "count": 0},
                     shards=[], source_fingerprint="f" * 64,
                     command=["laiontools", "download", "--blocklist", "https://alice:hunter2@h/bl.txt",
                              "--conf", "spark.hadoop.fs.s3a.secret.key=wJalr"],
                     download={"settings": {"blocklist": "https://alice:hunter2@h/bl.txt"}})
    path = str(tmp_path / "pool.manifest.json")
    write_manifest(path, m, run={"spark": {"spark.hadoop.fs.s3a.secret.key": "wJalr"}})
    data = Path(path).read_text() + Path(path + SIDECAR_SUFFIX).read_text()
    assert "hunter2" not in data and "wJalr" not in data
    saved = json.loads(Path(path).read_text())
    assert saved["provenance"]["command"][3] == "https://alice:***@h/bl.txt"
    assert saved["provenance"]["command"][5] == "spark.hadoop.fs.s3a.secret.key=***"
    assert saved["download"]["settings"]["blocklist"] == "https://alice:***@h/bl.txt"
