"""uid sets: the one hex -> array conversion, the one .npy header, the one Spark writer, the error tunnel."""

from __future__ import annotations

import hashlib
import io
import random
from pathlib import Path

import numpy as np
import pytest

from laiontools.contracts.uids import (
    UID_DTYPE,
    UidSet,
    array_to_uids,
    arrow_to_array,
    contains,
    load_uids,
    npy_header,
    save_uids,
    save_uids_spark,
    uids_to_array,
)
from laiontools.core.errors import InputError, TaskError, task_error, user_error_from


def _hex(rng: random.Random) -> str:
    return f"{rng.getrandbits(128):032x}"


def test_uids_to_array_is_the_integer_split():
    rng = random.Random(1)
    uids = [_hex(rng) for _ in range(500)] + ["0" * 32, "f" * 32, "00000000000000010000000000000000"]
    arr = uids_to_array(uids)
    assert arr.dtype == UID_DTYPE
    assert [(int(h), int(lo)) for h, lo in zip(arr["hi"], arr["lo"])] == [(int(u[:16], 16), int(u[16:], 16)) for u in uids]
    assert array_to_uids(arr) == uids
    assert len(uids_to_array([])) == 0
    for bad in (["ab"], [uids[0], "z" * 32], [uids[0], None], [uids[0] + "0"]):
        with pytest.raises(InputError, match="not 32 hex chars"):
            uids_to_array(bad)


def test_arrow_to_array_equals_the_python_split():
    import pyarrow as pa

    rng = random.Random(2)
    uids = [_hex(rng) for _ in range(300)] + ["0" * 32, "F" * 16 + "a" * 16]
    want = [(int(u[:16], 16), int(u[16:], 16)) for u in uids]
    for col in (pa.array(uids), pa.array(uids, pa.large_string()), pa.array(["x" * 32] + uids).slice(1)):
        arr = arrow_to_array(col)
        assert arr.dtype == UID_DTYPE and [(int(h), int(lo)) for h, lo in zip(arr["hi"], arr["lo"])] == want
    assert len(arrow_to_array(pa.array([], pa.string()))) == 0
    for bad in (["ab"], [uids[0], "z" * 32], [uids[0], None], [uids[0] + "0"]):
        with pytest.raises(InputError):
            arrow_to_array(pa.array(bad, pa.string()))


@pytest.mark.parametrize("case", ["hash", "shared-high-words", "over-hash-max", "empty"])
def test_uid_set_contains_is_set_membership(case, monkeypatch):
    # UidSet answers through a hash index over the high 64 bits, or by binary search where those are
    # not unique or the set is large; each answer must be plain set membership of the hex strings.
    rng = random.Random(3)
    members = [_hex(rng) for _ in range(2000)]
    if case == "shared-high-words":  # uids that differ only in their low word: the index cannot tell them apart
        members += [members[0][:16] + f"{k:016x}" for k in range(5)]
    if case == "over-hash-max":
        monkeypatch.setattr(UidSet, "HASH_MAX", 100)
    if case == "empty":
        members = []
    others = [_hex(rng) for _ in range(3000)]
    near = [u[:16] + f"{int(u[16:], 16) ^ 1:016x}" for u in members[:200]]  # same high word, another low word
    query = others + members[::3] + near + members[:1]
    rng.shuffle(query)
    s = UidSet(np.unique(uids_to_array(members)))
    assert (s.index is not None) == (case == "hash")
    got = s.contains(uids_to_array(query))
    want = set(members)
    assert got.tolist() == [u in want for u in query]
    assert got.tolist() == contains(s.arr, uids_to_array(query)).tolist()


def test_word_wise_sorts_and_membership_equal_python_sets():
    # sort_uids / sort_unique sort on the two 64-bit words and contains searches the high word first; uids
    # drawn from a few high and low words (so that many share a high word, at the ends of the set too)
    # must give Python's sorted set and set membership, on (hi, lo) tuples.
    from laiontools.contracts.uids import sort_uids, sort_unique

    rng = np.random.default_rng(5)
    for trial in range(300):
        n, m, k = int(rng.integers(0, 60)), int(rng.integers(0, 60)), int(rng.integers(1, 6))
        arr = np.empty(n, UID_DTYPE)
        arr["hi"], arr["lo"] = rng.integers(0, k, n), rng.integers(0, 8, n)
        query = np.empty(m, UID_DTYPE)
        query["hi"], query["lo"] = rng.integers(0, k + 1, m), rng.integers(0, 9, m)
        pairs = list(zip(arr["hi"].tolist(), arr["lo"].tolist()))
        assert list(zip(*(sort_uids(arr)[f].tolist() for f in ("hi", "lo")))) == sorted(pairs)
        uniq = sort_unique(arr)
        assert list(zip(uniq["hi"].tolist(), uniq["lo"].tolist())) == sorted(set(pairs)), trial
        want = set(pairs)
        assert contains(uniq, query).tolist() == [(h, lo) in want for h, lo in zip(query["hi"].tolist(), query["lo"].tolist())], trial


@pytest.mark.parametrize("arrow", [True, False])
def test_member_column_on_spark_is_set_membership(spark, tmp_path, arrow):
    """The Spark membership column (Arrow UDF on pyspark 4.1+, pandas UDF before) against plain set
    membership of the hex strings, over several Arrow batches and partitions."""
    from pyspark.sql import functions as F

    from laiontools.contracts.uids import member_column, save_uids

    if arrow and not hasattr(F, "arrow_udf"):
        pytest.skip("this pyspark has no Arrow UDFs")
    rng = random.Random(7)
    uids = [f"{rng.getrandbits(128):032x}" for _ in range(5000)]
    inside = set(rng.sample(uids, 1234))
    save_uids(str(tmp_path / "u.npy"), sorted(inside))
    df = spark.createDataFrame([(u,) for u in uids], "uid string").repartition(3)
    rows = df.select("uid", member_column(F.col("uid"), str(tmp_path / "u.npy"), arrow=arrow).alias("m")).collect()
    assert len(rows) == len(uids) and all(r.m == (r.uid in inside) for r in rows)
    assert sum(r.m for r in rows) == 1234


def test_a_uid_file_written_again_at_its_path_is_read_again_by_the_membership_udf(spark, tmp_path):
    """Spark's Python workers outlive a job: a uid file rewritten at the same path (subsets cut again into
    the same folder, then resharded in the same application) must not be answered from the set an earlier
    job cached, or reshard's plan takes the old subset's samples under the new file's sha256."""
    from laiontools.contracts.uids import keep_members

    uids = [hashlib.sha256(str(i).encode()).hexdigest()[:32] for i in range(40)]
    df = spark.createDataFrame([(u,) for u in uids], "uid string").coalesce(1)
    path = str(tmp_path / "80M.uids.npy")
    for picked in (uids[:10], uids[20:30]):
        save_uids(path, picked)
        assert sorted(r["uid"] for r in keep_members(df, "uid", path).collect()) == sorted(picked)


def test_npy_header_is_what_numpy_writes(tmp_path):
    for n in (0, 1, 7, 123_456_789):
        arr = np.zeros(min(n, 7), dtype=UID_DTYPE)
        buf = io.BytesIO()
        np.save(buf, np.zeros(n, dtype=UID_DTYPE) if n < 10 else arr, allow_pickle=False)
        if n < 10:
            assert buf.getvalue() == npy_header(n) + bytes(16 * n)
        else:  # a large count: compare the header numpy writes for that shape without the data
            from numpy.lib import format as npformat

            hb = io.BytesIO()
            npformat.write_array_header_1_0(hb, npformat.header_data_from_array_1_0(np.lib.stride_tricks.as_strided(arr, (n,), (0,))))
            assert hb.getvalue() == npy_header(n)
    rng = random.Random(2)
    uids = [_hex(rng) for _ in range(50)]
    sha, count = save_uids(str(tmp_path / "u.npy"), uids + uids[:5])
    data = (tmp_path / "u.npy").read_bytes()
    ref = io.BytesIO()
    np.save(ref, np.unique(uids_to_array(uids)), allow_pickle=False)
    assert data == ref.getvalue() and count == 50 and sha == hashlib.sha256(data).hexdigest()
    assert array_to_uids(load_uids(str(tmp_path / "u.npy"))) == sorted(uids)


def test_save_uids_spark_one_file_and_nested_files(spark, tmp_path):
    rng = random.Random(3)
    uids = [_hex(rng) for _ in range(3000)]
    # one file, with repeats and nulls as a catalog has them
    rows = [(u,) for u in uids] + [(u,) for u in uids[:40]] + [(None,)]
    df = spark.createDataFrame(rows, "uid string").repartition(5)
    [(sha, n)] = save_uids_spark(df, "uid", [str(tmp_path / "pool.npy")], num_partitions=4)
    sha_ref, n_ref = save_uids(str(tmp_path / "ref.npy"), uids)
    assert (sha, n) == (sha_ref, n_ref) == (hashlib.sha256((tmp_path / "ref.npy").read_bytes()).hexdigest(), 3000)
    assert (tmp_path / "pool.npy").read_bytes() == (tmp_path / "ref.npy").read_bytes()
    # nested: tier t puts a uid into files 0..t; file s holds the uids with tier >= s
    tiers = [rng.randrange(3) for _ in uids]
    df = spark.createDataFrame(list(zip(uids, tiers)), "uid string, tier int")
    paths = [str(tmp_path / f"s{s}.npy") for s in range(3)]
    want = [sorted(u for u, t in zip(uids, tiers) if t >= s) for s in range(3)]
    got = save_uids_spark(df, "uid", paths, tier_col="tier", expected=[len(w) for w in want], distinct=False, num_partitions=3)
    for s in range(3):
        ref = str(tmp_path / f"ref{s}.npy")
        assert got[s] == save_uids(ref, want[s])
        assert array_to_uids(load_uids(paths[s])) == want[s]
    # a count that does not match what was asked for is refused, naming the file
    with pytest.raises(RuntimeError, match=r"s0.npy: Spark wrote 3000 uids, expected 2999"):
        save_uids_spark(df, "uid", paths[:1], expected=[2999], num_partitions=2)
    # rows meant to be unique by uid (distinct=False: a catalog's success rows) that are not: the uid named, in
    # whichever partition and batch the repeat falls (it read "Spark's sort order was lost")
    twice = spark.createDataFrame([(u,) for u in uids] + [(uids[1234],)], "uid string").repartition(3)
    with pytest.raises(Exception, match=rf"uid {uids[1234]} is in more than one row, where each uid was to be in one") as e:
        save_uids_spark(twice, "uid", [str(tmp_path / "twice.npy")], distinct=False, num_partitions=2)
    assert user_error_from(e.value) is not None  # a damaged input: one line at the CLI, not the task's traceback
    # the in-process engine's writer answers the same rows in the same words, as a user error (it dropped the repeat)
    with pytest.raises(InputError) as e_local:
        save_uids(str(tmp_path / "twice_local.npy"), [*uids, uids[1234]], distinct=False)
    assert str(e_local.value) == user_error_from(e.value).args[0]
    assert not (tmp_path / "twice_local.npy").exists()
    assert save_uids(str(tmp_path / "once.npy"), [*uids, uids[1234]])[1] == len(set(uids))  # distinct=True: once
    # an empty frame still gives a valid, empty uid file
    empty = spark.createDataFrame([], "uid string")
    assert save_uids_spark(empty, "uid", [str(tmp_path / "e.npy")]) == [save_uids(str(tmp_path / "e_ref.npy"), [])]


def test_error_tunnel_out_of_spark_tasks(spark):
    e = task_error("bad file")
    assert isinstance(e, TaskError) and user_error_from(e).args == ("bad file",)
    assert user_error_from(ValueError("plain")) is None
    def fail_in_task(x: int) -> int:  # defined here so it is shipped by value (workers cannot import tests/)
        if x == 3:
            raise task_error(f"/data/file-{x}.csv: line 7 is not valid UTF-8; re-encode it")
        return x

    with pytest.raises(Exception) as info:
        spark.sparkContext.parallelize(range(6), 2).map(fail_in_task).collect()
    assert "Traceback" in str(info.value)  # what arrives on the driver: the worker's traceback as text
    err = user_error_from(info.value)
    assert isinstance(err, InputError) and str(err) == "/data/file-3.csv: line 7 is not valid UTF-8; re-encode it"

    class MyError(InputError):
        pass

    assert isinstance(user_error_from(info.value, MyError), MyError)


@pytest.mark.parametrize("mmap", [True, False])
def test_a_file_that_is_no_npy_is_refused_as_no_uid_file(tmp_path, mmap):
    # e.g. a text list of uids given to `subsets --exclude`: numpy called it "pickled (object) data"
    from laiontools.contracts.uids import load_uids

    p = tmp_path / "uids.txt"
    p.write_text("0123456789abcdef0123456789abcdef\n")
    with pytest.raises(ValueError, match=r"uids\.txt: not a uid file \(a \.npy array of 16-byte uids.*starts with b'0123"):
        load_uids(str(p), mmap=mmap)


@pytest.mark.parametrize("how", ["udf", "join"])
def test_membership_by_udf_and_by_join_match_the_same_rows(spark, tmp_path, monkeypatch, how):
    """keep_members and with_member_flag (reshard's plan, subsets' exclusions) by the UDF and, above
    MEMBER_UDF_MAX_UIDS, by a join with the file read by tasks: the rows Python's own set membership
    picks, rows listed twice included. The join keeps the rows partitioned by uid, so a group-by uid after
    it (reshard's plan) shuffles nothing more: one exchange per side of the join, none after."""
    from pyspark.sql import functions as F

    from laiontools.contracts import uids as uids_mod

    if how == "join":
        monkeypatch.setattr(uids_mod, "MEMBER_UDF_MAX_UIDS", 0)
        monkeypatch.setattr(uids_mod, "UID_ROWS_PER_TASK", 5)
    rng = random.Random(11)
    uids = [_hex(rng) for _ in range(60)]
    inside = set(rng.sample(uids, 25))
    path = str(tmp_path / "u.npy")
    save_uids(path, sorted(inside))
    column = [*uids, uids[1], uids[2]]
    df = spark.createDataFrame(spark.sparkContext.parallelize(list(enumerate(column)), 3), "row int, uid string")
    kept = uids_mod.keep_members(df, "uid", path)
    assert sorted(r["row"] for r in kept.collect()) == [i for i, u in enumerate(column) if u in inside]
    flagged = uids_mod.with_member_flag(df, "uid", path, "m")
    assert sorted(flagged.columns) == ["m", "row", "uid"]
    assert sorted((r["row"], r["m"]) for r in flagged.collect()) == [(i, u in inside) for i, u in enumerate(column)]
    if how == "join":
        # Sort-merge joins, never a broadcast of the file (Spark sizes the frame by its task range: a few
        # bytes), and the rows stay partitioned by uid: one exchange per side of the join, none after it.
        grouped = kept.groupBy("uid").agg(F.min("row"))
        for plan in (grouped._jdf.queryExecution().executedPlan().toString(),
                     flagged._jdf.queryExecution().executedPlan().toString()):
            assert "SortMergeJoin" in plan and "Broadcast" not in plan, plan
        assert grouped._jdf.queryExecution().executedPlan().toString().count("Exchange hashpartitioning") == 2
        assert sorted(r[1] for r in grouped.collect()) == sorted(column.index(u) for u in inside)


def test_uid_file_frame_reads_the_file_in_pieces_on_spark(spark, tmp_path):
    """uid_file_frame: Spark tasks read a uid file in ranges of rows (3 here: 7 tasks, the last short);
    its rows are the file's uids as hex strings (made here with Python's own formatting) at their
    positions. uid_file_layout reads the header alone and refuses a file whose length disagrees with it."""
    from laiontools.contracts.uids import hex_arrow, uid_file_frame, uid_file_layout

    rng = random.Random(5)
    want = sorted({f"{rng.getrandbits(128):032x}" for _ in range(20)} | {"f" * 32, "0" * 32})
    path = str(tmp_path / "u.npy")
    save_uids(path, want)
    raw = Path(path).read_bytes()
    offset, count = uid_file_layout(path)
    assert count == len(want) and len(raw) - offset == 16 * count and raw[offset:] == load_uids(path).tobytes()
    assert hex_arrow(load_uids(path)).to_pylist() == want
    df = uid_file_frame(spark, path, rows_per_task=3)
    assert df.rdd.getNumPartitions() == -(-len(want) // 3)
    assert [(r["idx"], r["uid"]) for r in df.orderBy("idx").collect()] == list(enumerate(want))
    keys = uid_file_frame(spark, path, rows_per_task=3, binary=True)  # the same uids as 16 big-endian bytes
    assert [(r["idx"], bytes(r["uid"])) for r in keys.orderBy("idx").collect()] == [(i, bytes.fromhex(u)) for i, u in enumerate(want)]
    Path(path).write_bytes(raw[:-8])  # a uid cut in half
    with pytest.raises(ValueError, match=r"holds 344 bytes of uids, its header says 22 uids \(352 bytes\)"):
        uid_file_layout(path)


def test_count_not_in_is_set_difference_of_two_files_read_by_tasks(spark, tmp_path):
    """count_not_in: the uids of one file that another lacks, by a join of the two files read by Spark
    tasks, against Python's set difference; a file listing a uid twice (not written by save_uids) counts
    it twice, or once with `distinct`."""
    from laiontools.contracts.uids import count_not_in

    rng = random.Random(8)
    pool = sorted({_hex(rng) for _ in range(300)})
    child = rng.sample(pool, 40) + [_hex(rng) for _ in range(7)]
    save_uids(str(tmp_path / "pool.npy"), pool)
    np.save(str(tmp_path / "child.npy"), uids_to_array(child + child[-2:]))  # unsorted, 2 outsiders twice
    assert count_not_in(spark, str(tmp_path / "child.npy"), str(tmp_path / "pool.npy")) == 9
    assert count_not_in(spark, str(tmp_path / "child.npy"), str(tmp_path / "pool.npy"), distinct=True) == len(set(child) - set(pool)) == 7
    assert count_not_in(spark, str(tmp_path / "pool.npy"), str(tmp_path / "child.npy")) == len(set(pool) - set(child)) == 260


@pytest.mark.parametrize("piece", [1, 3, 64])
def test_compare_sorted_merges_two_sorted_files_in_pieces(tmp_path, piece):
    """compare_sorted (subsets --update: what a takedown removed from a pool, and what changed between an
    old and a new subset, in one merge) against Python's sets, reading pieces of 1, 3 and 64 uids, with the
    inputs as files, as arrays and one of each: overlapping inputs, one far denser than the other, one wholly
    below or above the other, empty ones; a file that is not sorted is refused, not merged wrongly."""
    from laiontools.contracts.uids import compare_sorted, load_uids

    rng = random.Random(piece)
    pool = sorted({_hex(rng) for _ in range(200)})
    few = sorted(rng.sample(pool, 30) + [_hex(rng) for _ in range(5)])  # some in neither input
    cases = {
        "takedown": (pool, [u for u in pool if rng.random() > 0.05]),
        "denser other": (pool[::10], pool),
        "sparser other": (pool, pool[::10]),
        "other below": (pool[100:], pool[:100]),
        "other above": (pool[:100], pool[100:]),
        "empty other": (pool, []),
        "empty": ([], pool),
        "both empty": ([], []),
        "disjoint interleaved": (pool[::2], pool[1::2]),
        "shifted": (pool[:150], pool[50:]),
    }
    for name, (a, b) in cases.items():
        save_uids(str(tmp_path / "a.npy"), a)
        save_uids(str(tmp_path / "b.npy"), b)
        files = (str(tmp_path / "a.npy"), str(tmp_path / "b.npy"))
        arrays = tuple(np.asarray(load_uids(f)) for f in files)
        want = (sorted(set(a) - set(b)), sorted(set(b) - set(a)), sorted(set(a) & set(few)), sorted(set(b) & set(few)))
        for given in (files, arrays, (files[0], arrays[1]), (arrays[0], files[1])):
            got = compare_sorted(*given, few=np.sort(uids_to_array(few)), uids_per_piece=piece)
            assert tuple(array_to_uids(x) for x in got) == want, (name, [type(g).__name__ for g in given])
        assert array_to_uids(compare_sorted(*files, uids_per_piece=piece).a_in_few) == []
    unsorted = uids_to_array(pool[:50] + pool[40:60])  # a run that goes back: two lists concatenated
    np.save(str(tmp_path / "c.npy"), unsorted)
    for args in ((str(tmp_path / "c.npy"), str(tmp_path / "b.npy")), (str(tmp_path / "b.npy"), str(tmp_path / "c.npy"))):
        with pytest.raises(ValueError, match="not sorted and unique"):
            compare_sorted(*args, uids_per_piece=piece)


def test_a_streamed_uid_file_check_finds_what_the_loaded_one_finds(tmp_path, monkeypatch):
    """verify's uid file check on the Spark path streams the file (pieces of 2 uids here) instead of
    loading it: the same findings for a sound file, one out of order exactly across two pieces, one out
    of order inside a piece, and a file cut short (which it hands to the loading reader to name)."""
    from laiontools.contracts import uids as uids_mod
    from laiontools.contracts.uids import StreamedUids, scan_uid_file
    from laiontools.stages.verify import VerifyResult, _check_uid_file

    monkeypatch.setattr(uids_mod, "UID_SCAN_BYTES", 32)
    ordered = [f"{i:032x}" for i in range(1, 8)]
    cases = {"sound": ordered, "across pieces": ordered[:2] + [ordered[0]] + ordered[3:],
             "inside a piece": [ordered[1], ordered[0]] + ordered[2:]}
    for name, uids in cases.items():
        path = str(tmp_path / f"{name}.npy")
        arr = np.zeros(len(uids), dtype=UID_DTYPE)
        arr["lo"] = [int(u, 16) for u in uids]
        Path(path).write_bytes(npy_header(len(arr)) + arr.tobytes())  # as written, not sorted by save_uids
        sha = hashlib.sha256(Path(path).read_bytes()).hexdigest()
        for s in (sha, "0" * 64):
            loaded, streamed = VerifyResult(manifest="m"), VerifyResult(manifest="m")
            got = _check_uid_file(path, s, len(uids), "uid file", loaded)
            ref = _check_uid_file(path, s, len(uids), "uid file", streamed, load=False)
            assert isinstance(got, np.ndarray) and isinstance(ref, StreamedUids) and ref.count == len(uids)
            assert ref.held is not None and ref.held.tobytes() == got.tobytes()  # kept from the scan: few uids
            # a file above what may be held: the same sha256 and order, no uid kept, the first read alone
            big_sha, big_ordered, big = scan_uid_file(path, hold_up_to=len(uids) - 1)
            assert (big_sha, big_ordered) == (sha, name == "sound") and big.held is None and big.count == len(uids)
            assert big.first().tobytes() == got[:1].tobytes() and big.uids().tobytes() == got.tobytes()
            assert (streamed.problems, streamed.checked) == (loaded.problems, loaded.checked), name
            assert any("not sorted and unique" in p for p in loaded.problems) == (name != "sound"), (name, loaded.problems)
    cut = str(tmp_path / "cut.npy")
    Path(cut).write_bytes((tmp_path / "sound.npy").read_bytes()[:-8])
    loaded, streamed = VerifyResult(manifest="m"), VerifyResult(manifest="m")
    assert _check_uid_file(cut, "0" * 64, 7, "uid file", loaded) is None
    assert _check_uid_file(cut, "0" * 64, 7, "uid file", streamed, load=False) is None
    assert streamed.problems == loaded.problems and "unreadable" in loaded.problems[-1], loaded.problems


def test_uid_is_one_to_one_on_pairs_whose_url_holds_a_nul():
    """The uid hashes url + NUL + caption: a URL holding a NUL made two different (url, caption) pairs one
    uid, so prepare marked the second, a sound row, duplicate_uid (check_url accepts a NUL in a path)."""
    from laiontools.contracts.uids import compute_uid, uid_of

    a, b = ("http://example.com/a.jpg\x00b", "c"), ("http://example.com/a.jpg", "b\x00c")
    assert uid_of(*a) != uid_of(*b)
    assert len({compute_uid("x\x00", "y"), compute_uid("x", "\x00y"), compute_uid("x\x00y", ""), compute_uid("", "x\x00y"),
                compute_uid("x\x00\x00", "y"), compute_uid("x\x00", "\x00y")}) == 6
    # a URL without a NUL keeps the uid every pool downloaded so far holds
    assert uid_of(*b) == hashlib.sha256(b"http://example.com/a.jpg\x00b\x00c").hexdigest()[:32]
    assert compute_uid(None, None) == hashlib.sha256(b"\x00").hexdigest()[:32]


def test_uids_holding_whitespace_are_refused_not_read_shifted():
    """bytes.fromhex skips ASCII whitespace: 16 "uids" of 2 spaces + 30 hex digits (32 chars each) read as
    15 wrong uids, with no error, and were written as a uid file so; one of them was a bare ValueError."""
    import pyarrow as pa

    from laiontools.contracts.selection import selection_scores

    bad = ["  " + f"{i:030x}" for i in range(16)]
    with pytest.raises(InputError, match="at position 0 is not 32 hex chars"):
        uids_to_array(bad)
    with pytest.raises(InputError, match="at position 1 is not 32 hex chars"):
        uids_to_array(["0" * 32, "0" * 30 + "  "])
    with pytest.raises(InputError, match="not 32 hex chars"):
        arrow_to_array(pa.array(bad))
    with pytest.raises(ValueError):
        selection_scores(bad, 0)
    assert array_to_uids(uids_to_array(["0" * 31 + "1", "A" * 32])) == ["0" * 31 + "1", "a" * 32]  # either case, as before


def test_normalize_url_is_idempotent_so_a_catalog_row_gives_back_its_uid():
    """The catalog holds the normalized URL; normalizing it again must change nothing, or the uid of a
    catalog row recomputed from its own url and caption is another uid. A literal space before a dropped
    fragment (or an empty query) ended the URL in a space that the next pass stripped."""
    from laiontools.contracts.uids import normalize_url, uid_of

    for raw in ("https://example.com/photo #1", "https://example.com/a b ?", "https://example.com/x\u3000#f",
                "HTTP://Example.COM:80/A.jpg#frag", "http://example.com/a b.jpg", "http:/a.com/x", "http://[::1/x "):
        url = normalize_url(raw)
        assert normalize_url(url) == url, (raw, url)
        assert uid_of(url, "a cat") == uid_of(raw, "a cat"), raw
    # what a well-formed URL normalizes to is unchanged
    assert normalize_url(" HTTP://Example.COM:80/A.jpg#frag ") == "http://example.com/A.jpg"
    assert normalize_url("http://example.com/a b.jpg?q=1 2") == "http://example.com/a b.jpg?q=1 2"


def test_save_uids_of_an_array_of_hex_strings_writes_those_uids(tmp_path):
    """save_uids takes "Iterable[str] | np.ndarray": an ndarray of hex strings (a catalog column's
    .to_numpy()) went to the record-array path, whose cast parsed each string as a *decimal* integer and
    put it in both words: '000...05' was written as 0000000000000005 0000000000000005, without an error."""
    uids = ["0" * 31 + "5", "0" * 31 + "1", "0" * 30 + "10"]
    for arr in (np.array(uids), np.array(uids, dtype=object)):
        path = str(tmp_path / "u.npy")
        _, n = save_uids(path, arr)
        assert (n, array_to_uids(load_uids(path))) == (3, sorted(uids))
    rng = random.Random(2)
    with pytest.raises(InputError, match="at position 1 is not 32 hex chars"):
        save_uids(str(tmp_path / "v.npy"), np.array([_hex(rng), "z" * 32]))
