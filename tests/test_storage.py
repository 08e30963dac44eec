"""core.storage: url_to_fs's shortcut for plain local paths answers what fsspec answers; the parquet
codec of the files Spark writes, by its own writer or through pyarrow in its tasks."""

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


def _codecs(folder) -> set[str]:
    import pyarrow.parquet as pq

    files = [os.path.join(folder, f) for f in os.listdir(folder) if f.endswith(".parquet")]
    assert files
    return {pq.ParquetFile(f).metadata.row_group(0).column(c).compression
            for f in files for c in range(pq.ParquetFile(f).metadata.num_columns)}


@pytest.mark.parametrize("route", ["spark", "pyarrow"])
def test_spark_writes_parquet_with_zstd_unless_the_user_set_a_codec(spark, tmp_path, monkeypatch, route):
    """Both routes of spark_write_parquet (Spark's own writer; pyarrow in the tasks, as for an object
    store Spark cannot reach) write zstd by default, and a user's spark.sql.parquet.compression.codec
    instead; one pyarrow cannot write (lzo) falls back to zstd on the pyarrow route."""
    from laiontools.core import storage

    if route == "pyarrow":
        monkeypatch.setattr(storage, "spark_native", lambda path: False)
    df = spark.createDataFrame([(f"{i:032x}", i) for i in range(200)], "uid string, n long").repartition(2)
    key = "spark.sql.parquet.compression.codec"
    assert spark.conf.get(key) == "zstd"  # the session default (core.spark.RUNTIME_DEFAULTS)
    storage.spark_write_parquet(df, str(tmp_path / "default"))
    assert _codecs(tmp_path / "default") == {"ZSTD"}
    try:
        for codec, want in [("gzip", "GZIP"), ("uncompressed", "UNCOMPRESSED")] + ([("lzo", "ZSTD")] if route == "pyarrow" else []):
            spark.conf.set(key, codec)
            storage.spark_write_parquet(df, str(tmp_path / codec))
            assert _codecs(tmp_path / codec) == {want}, codec
            assert sorted(spark.read.parquet(str(tmp_path / codec)).collect()) == sorted(df.collect())
    finally:
        spark.conf.set(key, "zstd")


def test_spark_reads_a_folder_named_with_glob_characters_as_that_folder_only(spark, tmp_path):
    """Spark's own reader globs every path it is given (Hadoop's glob: * ? [..] {a,b}): handed
    ``run[1]/cat`` as it is, it read ``run1/cat``, a sibling the pattern names, and said nothing.
    spark_read_parquet hands it the path escaped: the folder, or a list of its files, reads that folder's
    rows, and the file column names its files."""
    from laiontools.core import storage

    for name, n in (("run1", 1), ("run[1]", 2), ("run{1,2}", 3)):  # braces: Hadoop's alternation
        storage.spark_write_parquet(spark.createDataFrame([(n,)], "n int").coalesce(1), str(tmp_path / name / "cat"))
    assert sorted(os.listdir(tmp_path)) == ["run1", "run[1]", "run{1,2}"]  # Spark's writer: the path as written
    for name, n in (("run[1]", 2), ("run{1,2}", 3)):
        folder = str(tmp_path / name / "cat")
        assert [r.n for r in storage.spark_read_parquet(spark, folder).collect()] == [n]
        files = storage.list_data_files(folder)
        rows = storage.spark_read_parquet(spark, files, file_column="_f").collect()
        assert [(r.n, r._f) for r in rows] == [(n, storage.path_key(files[0]))]


def test_a_folder_spark_cannot_make_is_one_line_naming_it(spark, tmp_path):
    """Spark's own parquet writer into a folder it cannot write (read-only here: a bind mount of the folder on
    itself, remounted read-only, as tests/faults does; on a cluster, an output path an executor sees read-only
    or may not write) fails in Hadoop's local file system with "Mkdirs failed to create file:…", no errno: that
    was a raw Py4J traceback, exit 1 (a new user's cluster run). Now the one-line fault of a read-only output."""
    import subprocess

    from laiontools.core.errors import EnvironmentFault, environment_error
    from laiontools.core.storage import spark_write_parquet

    ro = tmp_path / "ro"
    ro.mkdir()
    r = subprocess.run(["mount", "--bind", str(ro), str(ro)], capture_output=True, text=True, check=False)
    if r.returncode != 0:
        pytest.skip(f"cannot bind-mount {ro} ({r.stderr.strip()}); this test needs root or CAP_SYS_ADMIN")
    try:
        subprocess.run(["mount", "-o", "remount,ro,bind", str(ro)], check=True, capture_output=True)
        with pytest.raises(Exception) as e:
            spark_write_parquet(spark.range(3), str(ro / "out"))
    finally:
        subprocess.run(["umount", "-l", str(ro)], capture_output=True, check=False)
    fault = environment_error(e.value, output=str(ro / "out"))
    assert isinstance(fault, EnvironmentFault), str(e.value)[:2000]
    said = str(fault)
    assert said.startswith("cannot create a folder (a read-only file system, no permission, or a file where the folder goes) writing ") and str(ro / "out") in said, said
    assert "\n" not in said and "re-run the same command" in said, said


def test_hadoops_mkdirs_failure_names_the_output_folder_even_with_a_space():
    """The classifier of the test above without a mount (it needs root): Hadoop names its task attempt's folder,
    the message names the output; a path holding a space is kept whole; an OSError of errno -1 (a socket's
    EAI_BADFLAGS) is not taken for it."""
    import socket

    from laiontools.core.errors import EnvironmentFault, environment_error

    e = RuntimeError("An error occurred while calling o77.parquet.\n: org.apache.spark.SparkException: Job aborted ... "
                     "java.io.IOException: Mkdirs failed to create file:/data/my out/pool/_temporary/0/_temporary/attempt_1 "
                     "(exists=false, cwd=file:/home/u)\n\tat org.apache.hadoop.fs.ChecksumFileSystem.create(...)")
    fault = environment_error(e, output="/data/my out/pool")
    assert isinstance(fault, EnvironmentFault) and "writing /data/my out/pool;" in str(fault), fault
    assert environment_error(socket.gaierror(-1, "Bad value for ai_flags")) is None
