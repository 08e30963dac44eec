"""Corruption at every boundary: a truncated or bit-flipped input of each kind a stage reads.

Each case damages a copy of one real input (catalog parquet, manifest, uid file, embeddings .npy,
tar shard, model checkpoint, YAML config) and runs the stage that reads it through the CLI entry
point. Accepted outcomes: exit 2 with one ``laiontools <stage>: error:`` line naming the damaged
file and no traceback, or — where the stage can go on without the damaged unit — a per-unit status
recorded in its report that names it. A run that ends 0 with no such record is a silent wrong result
and fails the test.

Runs are in-process through ``laiontools.cli.main`` (the CLI's exit codes and stderr) on the
session's Spark.
"""

from __future__ import annotations

import glob
import json
import os
import shutil
from pathlib import Path

import pytest
from faultkit import has_traceback, load_json, record

pytestmark = pytest.mark.slow


def truncate(path: str, keep: float = 0.5) -> None:
    size = os.path.getsize(path)
    with open(path, "r+b") as f:
        f.truncate(max(1, int(size * keep)))


def flip(path: str, at: float = 0.6, bit: int = 2) -> None:
    """Flip one bit of the byte at fraction `at` of the file."""
    with open(path, "r+b") as f:
        f.seek(int(os.path.getsize(path) * at))
        b = f.read(1)
        f.seek(-1, 1)
        f.write(bytes([b[0] ^ (1 << bit)]))


def _refused(stage: str, args: list[str], damaged: str | tuple[str, ...], capfd, kind: str) -> str:
    """Run the stage; assert a clean refusal naming `damaged` (a path, or file names one of which must appear)."""
    from laiontools.cli import main

    capfd.readouterr()
    try:
        rc = main(args)
    except BaseException as e:  # a traceback: the failure this suite exists to find
        record({"kind": "corruption", "stage": stage, "input": kind, "outcome": f"crash {type(e).__name__}"})
        raise
    err = capfd.readouterr().err
    lines = [ln for ln in err.splitlines() if ln.startswith(f"laiontools {stage}: error:")]
    names = (os.path.basename(damaged),) if isinstance(damaged, str) else damaged
    ok = rc == 2 and not has_traceback(err) and len(lines) == 1 and any(n in lines[0] for n in names)
    record({"kind": "corruption", "stage": stage, "input": kind, "outcome": "refused" if ok else f"exit {rc}",
            "error": lines[:1]})
    assert rc == 2, f"{stage} with a damaged {kind} ({damaged}) exited {rc}\n{err[-3000:]}"
    assert not has_traceback(err), err[-4000:]
    assert len(lines) == 1, err[-4000:]
    assert any(n in lines[0] for n in names), f"the error does not name {names}: {lines[0]}"
    return lines[0]


@pytest.fixture
def pool_copy(chain, tmp_path) -> str:
    """A private copy of the pool (its manifest path): damage it freely."""
    dst = str(tmp_path / "pool")
    shutil.copytree(chain.pool_dir, dst)
    return os.path.join(dst, "pool.manifest.json")


@pytest.fixture
def emb_copy(chain, tmp_path) -> str:
    dst = str(tmp_path / "emb")
    shutil.copytree(chain.emb, dst)
    return dst


# ------------------------------------------------------------------------------------------ manifest


def flip_text(path: str, after: str, skip: int = 0, bit: int = 0) -> None:
    """Flip one bit of the byte `skip` bytes after the first occurrence of `after` in the file."""
    data = Path(path).read_bytes()
    i = data.index(after.encode()) + len(after) + skip
    flip(path, at=i / len(data) + 1e-9, bit=bit)


@pytest.mark.parametrize("damage", ["truncate", "flip-structure", "flip-uid-sha256"])
def test_manifest(pool_copy, tmp_path, capfd, damage):
    """A cut manifest, a flipped bit that breaks its JSON, and one in the uid file's recorded sha256
    (valid JSON, wrong content). A flip in a field no stage reads (e.g. ``download.profile``) is not
    detected: manifests carry no checksum of themselves (see RELIABILITY.md); the fields a consumer
    uses are pinned to the files they describe."""
    if damage == "truncate":
        truncate(pool_copy)
    elif damage == "flip-structure":
        flip_text(pool_copy, '"catalog"', skip=0, bit=1)  # the ':' after the key becomes '8'
    else:
        data = Path(pool_copy).read_text()
        i = data.index('"sha256": "', data.index('"uids": {')) + len('"sha256": "')
        with open(pool_copy, "r+") as f:  # one hex digit of the recorded hash changed to another hex digit
            f.seek(i)
            f.write("0" if data[i] != "0" else "1")
        # subsets selects from the catalog and never reads the pool's uid file; verify checks it.
        _verify_reports(pool_copy, "pool.uids.npy", capfd, f"manifest ({damage})")
        return
    _refused("subsets", ["subsets", "--pool", pool_copy, "--output", str(tmp_path / "o"), "--scales", "10", "--seed", "1"],
             pool_copy, capfd, f"manifest ({damage})")


def _verify_reports(manifest: str, name: str, capfd, kind: str) -> None:
    """`laiontools verify` on `manifest` must exit 1 (a difference found) naming `name`, no traceback."""
    from laiontools.cli import main

    capfd.readouterr()
    rc = main(["verify", "--no-shards", manifest])
    cap = capfd.readouterr()
    text = cap.out + cap.err
    record({"kind": "corruption", "stage": "verify", "input": kind, "outcome": "reported" if rc == 1 and name in text else f"exit {rc}"})
    assert rc == 1, f"verify exited {rc} on a damaged {kind}\n{text[-3000:]}"
    assert not has_traceback(text) and name in text, text[-3000:]


# ------------------------------------------------------------------------------------------ uid file


@pytest.mark.parametrize("damage", ["truncate", "flip"])
def test_pool_uid_file(pool_copy, tmp_path, capfd, damage):
    """The pool's uid file is read by verify (subsets selects from the catalog, not from it)."""
    uids = os.path.join(os.path.dirname(pool_copy), "pool.uids.npy")
    truncate(uids, 0.7) if damage == "truncate" else flip(uids, at=0.7)
    _verify_reports(pool_copy, "pool.uids.npy", capfd, f"uid file ({damage})")


@pytest.mark.parametrize("damage", ["truncate", "flip"])
def test_subset_uid_file(chain, tmp_path, capfd, damage):
    sub = str(tmp_path / "sub")
    shutil.copytree(chain.subsets, sub)
    manifest = os.path.join(sub, os.path.basename(chain.subset))
    uids = manifest.replace(".manifest.json", ".uids.npy")
    truncate(uids, 0.7) if damage == "truncate" else flip(uids, at=0.7)
    _refused("reshard", ["reshard", "--manifest", manifest, "--output", str(tmp_path / "o"), "--shard-size", "6"],
             uids, capfd, f"subset uid file ({damage})")


# --------------------------------------------------------------------------------------- catalog


def flip_column(path: str, column: str) -> None:
    """Flip one bit in the middle of `column`'s data in the parquet file at `path` (first row group)."""
    import pyarrow.parquet as pq

    rg = pq.ParquetFile(path).metadata.row_group(0)
    cc = next(rg.column(j) for j in range(rg.num_columns) if rg.column(j).path_in_schema == column)
    start = cc.dictionary_page_offset or cc.data_page_offset
    at = start + cc.total_compressed_size // 2
    flip(path, at=(at + 0.5) / os.path.getsize(path))


@pytest.mark.parametrize("damage", ["truncate", "flip"])
def test_catalog_parquet(pool_copy, tmp_path, capfd, damage):
    """A cut catalog part, and a flipped bit inside the uid column (which subsets reads: a flip in a
    column no stage reads is not looked at, and changes no result)."""
    part = min(glob.glob(os.path.join(os.path.dirname(pool_copy), "catalog", "*.parquet")))
    truncate(part) if damage == "truncate" else flip_column(part, "uid")
    _refused("subsets", ["subsets", "--pool", pool_copy, "--output", str(tmp_path / "o"), "--scales", "10", "--seed", "1"],
             part, capfd, f"catalog parquet ({damage})")


# ---------------------------------------------------------------------------------------- tar shard


@pytest.mark.parametrize("damage", ["truncate", "flip"])
def test_tar_shard_in_embed(pool_copy, tmp_path, capfd, damage):
    """embed can go on without a damaged shard: it must record it as failed (and exit non-zero) or refuse."""
    from laiontools.cli import main

    tar = sorted(glob.glob(os.path.join(os.path.dirname(pool_copy), "shards", "*.tar")))[1]
    truncate(tar, 0.6) if damage == "truncate" else flip(tar, at=0.6)
    out = str(tmp_path / "emb")
    capfd.readouterr()
    rc = main(["embed", "--manifest", pool_copy, "--output", out, "--model", "lt-tiny", "--batch-size", "8",
               "--num-workers", "0", "--device", "cpu"])
    err = capfd.readouterr().err
    assert not has_traceback(err), err[-4000:]
    sid = os.path.basename(tar).removesuffix(".tar")
    if rc == 2:
        line = [ln for ln in err.splitlines() if ln.startswith("laiontools embed: error:")]
        assert len(line) == 1 and os.path.basename(tar) in line[0], err[-3000:]
        outcome = "refused"
    else:
        rep = load_json(os.path.join(out, "embed_report.json"))
        assert rc == 1, f"embed exited {rc} with a damaged shard {tar}"
        assert sid in rep["this_run"]["failed_shards"], rep
        assert not os.path.exists(os.path.join(out, "meta", f"{sid}.parquet.done")), "a damaged shard marked done"
        outcome = "per-shard status"
    record({"kind": "corruption", "stage": "embed", "input": f"tar shard ({damage})", "outcome": outcome})


@pytest.mark.parametrize("damage", ["truncate", "flip"])
def test_tar_shard_in_reshard(chain, tmp_path, capfd, damage):
    """A cut source shard, and one bit flipped in the middle of a sample the subset holds (its tar
    headers still parse): reshard checks each sample's bytes against the span sha256 the catalog
    recorded at download (``tar_sha256``) before copying them, and refuses naming the shard."""
    pool = str(tmp_path / "pool")
    shutil.copytree(chain.pool_dir, pool)
    sub = str(tmp_path / "sub")
    shutil.copytree(chain.subsets, sub)
    manifest = os.path.join(sub, os.path.basename(chain.subset))
    m = load_json(manifest)
    _repoint(manifest, m, chain.pool, os.path.join(pool, "pool.manifest.json"))
    tar = sorted(glob.glob(os.path.join(pool, "shards", "*.tar")))[1]
    if damage == "truncate":
        truncate(tar, 0.6)
    else:
        off, n = _span_in_subset(pool, manifest, os.path.basename(tar).removesuffix(".tar"))
        flip(tar, at=(off + n // 2 + 0.5) / os.path.getsize(tar))
    line = _refused("reshard", ["reshard", "--manifest", manifest, "--output", str(tmp_path / "o"), "--shard-size", "6"],
                    tar, capfd, f"tar shard ({damage})")
    if damage == "flip":
        assert "sha256" in line, line


def _span_in_subset(pool: str, manifest: str, shard: str) -> tuple[int, int]:
    """(tar_offset, tar_length) of a sample of `shard` that the subset at `manifest` holds."""
    import pandas as pd

    from laiontools.contracts.uids import array_to_uids, load_uids

    cat = pd.read_parquet(os.path.join(pool, "catalog"), columns=["uid", "status", "shard", "key", "tar_offset", "tar_length",
                                                                  "tar_sha256"])
    cat = cat[(cat["status"] == "success") & (cat["shard"] == shard)].sort_values("key")
    assert cat["tar_sha256"].notna().all(), "download recorded no span sha256"
    subset = set(array_to_uids(load_uids(manifest.replace(".manifest.json", ".uids.npy"))))
    row = cat[cat["uid"].isin(subset)].iloc[len(cat) // 2]
    return int(row["tar_offset"]), int(row["tar_length"])


def _repoint(manifest: str, m: dict, old_pool: str, new_pool: str) -> None:
    """Make a copied subset manifest name the copied pool (the path is the only change)."""
    text = Path(manifest).read_text().replace(os.path.dirname(old_pool), os.path.dirname(new_pool))
    with open(manifest, "w") as f:
        f.write(text)


# ---------------------------------------------------------------------------------------- embeddings


@pytest.mark.parametrize("damage", ["truncate", "flip"])
def test_embeddings_npy(chain, emb_copy, tmp_path, capfd, damage):
    """A cut file, and one flipped bit in a float16 value (valid .npy, another number): both refused
    naming the file, the flip by the sha256 embed recorded in the shard's completion marker."""
    npy = sorted(glob.glob(os.path.join(emb_copy, "img_emb", "*.npy")))[1]
    truncate(npy, 0.6) if damage == "truncate" else flip(npy, at=0.6)
    _refused("dedup", ["dedup", "--embeddings", emb_copy, "--evalset", f"glyphs={chain.evalset}:imagefolder",
                       "--output", str(tmp_path / "o")], npy, capfd, f"embeddings npy ({damage})")


@pytest.mark.parametrize("kind", ["text_emb", "meta"])
def test_embeddings_other_files_flipped(emb_copy, kind):
    """The text vectors and the meta table are checked too, by every reader of the folder (here
    read_embeddings, which returns all three): an error naming the file, before any row is returned."""
    from laiontools.contracts.embeddings import read_embeddings
    from laiontools.core.errors import TaskError

    path = min(glob.glob(os.path.join(emb_copy, kind, "*")))
    flip(path, at=0.7)
    with pytest.raises(TaskError, match=os.path.basename(path)) as e:
        list(read_embeddings(emb_copy))
    assert "sha256" in str(e.value) and f"{kind}/" in str(e.value)
    record({"kind": "corruption", "stage": "embeddings readers", "input": f"{kind} (flip)", "outcome": "refused"})


def test_embeddings_scores_flipped_in_subsets(chain, emb_copy, tmp_path, capfd):
    """subsets --scores hands scores/*.parquet to Spark's reader, which would decode a flipped bit in a
    plain page as another score: the files are checked against embed's record first."""
    sc = sorted(glob.glob(os.path.join(emb_copy, "scores", "*.parquet")))[1]
    flip(sc, at=0.5)
    line = _refused("subsets", ["subsets", "--pool", chain.pool, "--output", str(tmp_path / "o"), "--scales", "10",
                                "--seed", "1", "--scores", emb_copy], sc, capfd, "embeddings scores parquet (flip)")
    assert "sha256" in line, line  # caught by the recorded hash, not by luck of the page decoder


def test_embeddings_without_recorded_hashes_still_read(emb_copy, chain):
    """A folder written by an embed that recorded no hashes (markers without ``files_sha256``) is read
    as before, unchecked: the same arrays and tables as the folder with hashes."""
    import numpy as np

    from laiontools.contracts.embeddings import MARKER_SHA256, read_embedding_shard, read_embeddings

    for marker in glob.glob(os.path.join(emb_copy, "meta", "*.parquet.done")):
        m = load_json(marker)
        assert m.pop(MARKER_SHA256), marker  # this embed records them: the test strips them
        Path(marker).write_text(json.dumps(m))
    old, new = list(read_embeddings(emb_copy)), list(read_embeddings(chain.emb))
    assert [s for s, *_ in old] == [s for s, *_ in new] and len(old) >= 3
    for (_, a_img, a_txt, a_meta), (_, b_img, b_txt, b_meta) in zip(old, new):
        assert np.array_equal(a_img, b_img) and np.array_equal(a_txt, b_txt) and a_meta.equals(b_meta)
    sid = old[1][0]
    assert np.array_equal(read_embedding_shard(emb_copy, sid)[0], read_embedding_shard(chain.emb, sid)[0])


# ---------------------------------------------------------------------------------------- checkpoint


def test_model_checkpoint_truncated(chain, tmp_path, capfd):
    import torch

    from laiontools.models.registry import load_model

    ckpt = str(tmp_path / "model.pt")
    torch.save(load_model("lt-tiny").model.state_dict(), ckpt)
    truncate(ckpt, 0.6)
    _refused("embed", ["embed", "--manifest", chain.pool, "--output", str(tmp_path / "o"), "--model", "lt-tiny",
                       "--pretrained", ckpt, "--device", "cpu", "--num-workers", "0"], ckpt, capfd, "model checkpoint (truncate)")


def test_model_checkpoint_flipped_is_recorded(chain, tmp_path, capfd):
    """A user's checkpoint has no reference to check a flipped weight against (torch.load reads zip
    entries without their CRC): the run cannot refuse it, but it must record exactly which bytes it
    used, so the result is traceable to the damaged file and differs from the intact one's record."""
    import hashlib

    import torch

    from laiontools.cli import main
    from laiontools.models.registry import load_model

    ckpt = str(tmp_path / "model.pt")
    torch.save(load_model("lt-tiny").model.state_dict(), ckpt)
    intact = hashlib.sha256(Path(ckpt).read_bytes()).hexdigest()
    flip(ckpt, at=0.6)
    damaged = hashlib.sha256(Path(ckpt).read_bytes()).hexdigest()
    out = str(tmp_path / "o")
    rc = main(["embed", "--manifest", chain.pool, "--output", out, "--model", "lt-tiny", "--pretrained", ckpt,
               "--device", "cpu", "--num-workers", "0"])
    err = capfd.readouterr().err
    assert not has_traceback(err), err[-3000:]
    if rc == 2:
        outcome = "refused"
    else:
        assert rc == 0, err[-3000:]
        info = load_json(os.path.join(out, "model.json"))
        assert info["checkpoint_sha256"] == damaged != intact, info
        outcome = "recorded (checkpoint_sha256 in model.json)"
    record({"kind": "corruption", "stage": "embed", "input": "model checkpoint (flip)", "outcome": outcome})


# ---------------------------------------------------------------------------------------- YAML config


@pytest.mark.parametrize("damage", ["truncate", "flip"])
def test_yaml_config(chain, tmp_path, capfd, damage):
    cfg = str(tmp_path / "subsets.yaml")
    text = f"pool: {chain.pool}\nseed: 4\nmin_caption_length: 2\nscales: [10, 20]\n"
    with open(cfg, "w") as f:
        f.write(text)
    if damage == "truncate":  # cut inside "[10, 20]": a flow sequence that never ends
        truncate(cfg, (text.index("[10") + 3) / len(text))
    else:
        with open(cfg, "r+b") as f:  # a byte that is not UTF-8 in the middle
            f.seek(os.path.getsize(cfg) // 2)
            f.write(b"\xff")
    _refused("subsets", ["subsets", "--config", cfg, "--output", str(tmp_path / "o")], cfg, capfd, f"YAML config ({damage})")
