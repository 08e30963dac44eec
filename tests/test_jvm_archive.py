"""The test suite's class-data archive (laiontools/testing/jvm.py) can only change how fast a JVM starts:
a JVM given a damaged or missing archive starts all the same, and a failed attempt to make one leaves
nothing behind."""

from __future__ import annotations

import concurrent.futures
import shutil
import subprocess

import pytest

from laiontools.testing.jvm import QUICK_TIER, archive_path, make_archive, quick_java_options


@pytest.mark.parametrize("content", [None, b"not a class-data archive\n"], ids=["missing", "damaged"])
def test_a_jvm_given_a_missing_or_damaged_archive_starts_without_it(tmp_path, content):
    java = shutil.which("java")
    if java is None:
        pytest.skip("no java on PATH")
    archive = tmp_path / "spark.jsa"
    if content is not None:
        archive.write_bytes(content)
    res = subprocess.run([java, *quick_java_options(archive).split(), "-version"], capture_output=True, text=True,
                         timeout=60, check=False)
    assert res.returncode == 0, res.stderr
    assert "version" in res.stderr and "cds" not in (res.stdout + res.stderr).lower(), res.stdout + res.stderr


def test_a_failed_archive_run_makes_nothing(tmp_path):
    path = archive_path(tmp_path / "cache")
    assert path.is_absolute() and path == archive_path(tmp_path / "cache")
    assert make_archive(path, python="/bin/false") is False
    left = [p.name for p in (tmp_path / "cache").iterdir()]
    assert left == [".make.lock"]  # no archive, temp file or work folder left (the lock file is empty)


def test_processes_side_by_side_make_the_archive_once(tmp_path):
    """Two makers at once (as pytest-xdist's workers start): one archive run, both given the archive.
    The "python" here is a script that does what the archive run's JVM does at exit: writes the file
    named by -XX:ArchiveClassesAtExit (after a pause, so the two would overlap without the lock)."""
    runs = tmp_path / "runs.log"
    fake = tmp_path / "fake-python"
    fake.write_text("#!/bin/sh\n"
                    f"echo run >> {runs}\n"
                    "sleep 1\n"
                    'out=$(printf %s "$PYSPARK_SUBMIT_ARGS" | sed -n "s/.*ArchiveClassesAtExit=\\([^ \']*\\).*/\\1/p")\n'
                    'printf archive > "$out"\n')
    fake.chmod(0o755)
    path = archive_path(tmp_path / "cache")
    with concurrent.futures.ThreadPoolExecutor(2) as pool:
        made = list(pool.map(lambda _: make_archive(path, python=str(fake)), range(2)))
    assert made == [True, True]
    assert runs.read_text().splitlines() == ["run"]
    assert path.read_bytes() == b"archive"


def test_a_process_that_does_not_wait_goes_on_without_the_archive_another_is_making(tmp_path):
    """make_archive(wait=False) while another process holds the maker's lock: False at once, no run of
    its own; once the other is done, the archive is there for everyone (and for it)."""
    import fcntl

    runs = tmp_path / "runs.log"
    fake = tmp_path / "fake-python"
    fake.write_text(f"#!/bin/sh\necho run >> {runs}\nexit 1\n")
    fake.chmod(0o755)
    path = archive_path(tmp_path / "cache")
    path.parent.mkdir(parents=True)
    with open(path.parent / ".make.lock", "w") as held:
        fcntl.flock(held, fcntl.LOCK_EX)  # another maker at work
        assert make_archive(path, python=str(fake), wait=False) is False
        assert not runs.exists()  # it did not start a run of its own
        path.write_bytes(b"archive")  # the other maker is done
    assert make_archive(path, python=str(fake), wait=False) is True
    assert not runs.exists()


def test_an_archive_path_with_a_space_is_left_out_of_the_options(tmp_path):
    assert quick_java_options(tmp_path / "a b" / "x.jsa") == QUICK_TIER
    assert quick_java_options(tmp_path / "x.jsa").split() == [QUICK_TIER, f"-XX:SharedArchiveFile={tmp_path / 'x.jsa'}"]
