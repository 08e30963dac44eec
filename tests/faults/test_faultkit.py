"""The fault harness's own watch on an output folder (faultkit._Changes): a kill point is looked at when
something in the folder changes, so the watch must see a folder made after it started and files deep in it."""

from __future__ import annotations

import select
import sys

import pytest
from faultkit import _Changes


def _pending(fd: int) -> bool:
    return bool(select.select([fd], [], [], 0)[0])


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="inotify is Linux's")
def test_the_watch_sees_a_folder_made_later_and_a_file_deep_in_it(tmp_path):
    root = tmp_path / "out"
    changes = _Changes(str(root))
    try:
        assert changes.fd >= 0
        assert not _pending(changes.fd)
        (root / "a" / "b").mkdir(parents=True)  # the run makes its output folder: its parent's watch sees it
        assert _pending(changes.fd)
        changes.wait(0, idle=0)
        assert {str(root), str(root / "a"), str(root / "a" / "b")} <= changes.watched
        assert not _pending(changes.fd)
        (root / "a" / "b" / "00000.tar.done").write_bytes(b"")  # two levels down, in a folder made unwatched
        assert _pending(changes.fd)
        changes.wait(0, idle=0)
        assert not _pending(changes.fd)
        (root / "a" / "c").mkdir()  # a folder made while watched is watched from the next wake
        changes.wait(0, idle=0)
        assert str(root / "a" / "c") in changes.watched
        (root / "a" / "c" / "x.tmp").write_bytes(b"1")
        (root / "a" / "c" / "x.tmp").rename(root / "a" / "c" / "x")
        assert _pending(changes.fd)
    finally:
        changes.close()



def test_a_kill_at_a_failpoint_no_code_reaches_does_not_happen(tmp_path):
    """run_and_kill with a failpoint kills only once the run says it is paused there: a run that never
    reaches it (here `laiontools --help`) ends by itself, unkilled, though the folder state (always true
    here) holds from the start; without the failpoint the same state kills it."""
    from faultkit import run_and_kill

    out = str(tmp_path / "out")
    k = run_and_kill(["--help"], str(tmp_path), out, "never", lambda: True, failpoint="nowhere.never")
    assert not k.killed and k.returncode == 0, k
    assert [p.name for p in tmp_path.iterdir()] == []  # its stderr went to a temporary file, removed after
    k = run_and_kill(["--help"], str(tmp_path), out, "at once", lambda: True)
    assert k.killed, k
