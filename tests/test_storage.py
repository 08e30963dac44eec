"""core.storage.url_to_fs: its shortcut for plain local paths answers what fsspec answers."""

from __future__ import annotations

import os

import fsspec
import pytest

from laiontools.core.storage import url_to_fs


@pytest.mark.parametrize("path", ["/abs/a.tar", "rel/x.tar", "./x/../y", "dir/", "~/foo", "a b/c d", "//double//slash",
                                  "", ".", "caf\u00e9/\u00fc.tar", "file:///abs/a.tar", "memory://bucket/a"])
def test_url_to_fs_answers_what_fsspec_answers(path, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    fs, p = url_to_fs(path)
    want_fs, want_p = fsspec.core.url_to_fs(path)
    assert p == want_p and type(fs) is type(want_fs)


def test_url_to_fs_gives_a_forked_process_its_own_local_file_system():
    fs, _ = url_to_fs("/x")
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: a file system instance of its own, as fsspec makes one per process
        os.close(r)
        child_fs, _ = url_to_fs("/x")
        os.write(w, b"1" if child_fs is not fs and child_fs is url_to_fs("/y")[0] else b"0")
        os._exit(0)
    os.close(w)
    try:
        assert os.read(r, 1) == b"1"
    finally:
        os.close(r)
        os.waitpid(pid, 0)
