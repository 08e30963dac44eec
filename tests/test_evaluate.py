"""`laiontools evaluate`: zero-shot + retrieval with real open_clip models on synthetic evaluation sets."""

from __future__ import annotations

import json
import os

import pytest

from laiontools.core.errors import UserError
from laiontools.core.storage import is_done
from laiontools.models.registry import ModelError, load_model
from laiontools.stages.evaluate import EvaluateConfig, main, run_evaluate
from laiontools.testing.train_pool import write_color_evalset


@pytest.fixture(scope="module")
def sets(tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    from PIL import Image

    root = tmp_path_factory.mktemp("evalsets")
    colors = write_color_evalset(str(root / "colors"), per_class=3)["path"]
    # an ImageFolder set (classes, no captions) with one unreadable image
    for cls, rgb in (("cat", (200, 50, 50)), ("dog", (50, 50, 200))):
        d = root / "folder_cls" / cls
        d.mkdir(parents=True)
        for k in range(2):
            Image.new("RGB", (48, 48), rgb).save(d / f"{k}.jpg")
    (root / "folder_cls" / "dog" / "broken.jpg").write_bytes(b"not a jpeg")
    # a flat folder with captions and no classes
    flat = root / "captions_only"
    flat.mkdir()
    for k in range(4):
        Image.new("RGB", (48, 48), (60 * k, 100, 30)).save(flat / f"{k}.jpg")
        (flat / f"{k}.txt").write_text(f"a picture number {k}")
    from laiontools.synthetic import write_evalset  # the shared synthetic eval-set generator

    write_evalset(str(root / "syn"), n_classes=3, per_class=2, fmt="parquet")
    ckpt = root / "lt-tiny.pt"
    import torch

    torch.save(load_model("lt-tiny").model.state_dict(), ckpt)
    return {"syn": str(root / "syn"), "colors": colors, "imagefolder": str(root / "folder_cls"), "captions_only": str(flat), "ckpt": str(ckpt)}


def test_zeroshot_and_retrieval(sets: dict[str, str], tmp_path) -> None:
    out = str(tmp_path / "eval.json")
    rc = main([
        "--checkpoint", sets["ckpt"], "--model", "lt-tiny",
        "--evalset", f"colors={sets['colors']}:wds", "--evalset", f"pets={sets['imagefolder']}:imagefolder", f"syn={sets['syn']}:parquet",
        "--output", out, "--batch-size", "8",
    ])  # fmt: skip
    assert rc == 0 and is_done(out)
    res = json.load(open(out))
    colors, pets = res["evalsets"]["colors"], res["evalsets"]["pets"]
    assert colors["n_items"] == 18 and colors["n_errors"] == 0
    z = colors["zeroshot"]
    assert z["n_classes"] == 6 and z["n_items"] == 18 and z["n_templates"] >= 1
    assert 0.0 <= z["top1"] <= z["top5"] <= 1.0
    r = colors["retrieval"]
    for d in ("image_to_text", "text_to_image"):
        assert 0.0 <= r[f"{d}_R@1"] <= r[f"{d}_R@5"] <= r[f"{d}_R@10"] <= 1.0
    # a set without captions gets zero-shot only; its unreadable image is counted and named, not dropped silently
    assert pets["retrieval"] == {"skipped": "no captions"}
    assert pets["n_items"] == 5 and pets["n_errors"] == 1
    assert pets["error_items"][0]["item_id"].endswith("broken.jpg")
    assert pets["zeroshot"]["n_items"] == 4 and pets["zeroshot"]["top5_k"] == 2
    assert pets["zeroshot"]["top5"] == 1.0  # top-k over all (2) classes always hits
    m = res["metrics"]
    assert {"colors/zeroshot_top1", "colors/image_to_text_R@5", "pets/zeroshot_top1"} <= set(m)
    assert not any(k.startswith("pets/image_to_text") for k in m)
    assert res["evalsets"]["syn"]["zeroshot"]["n_classes"] == 3 and res["evalsets"]["syn"]["zeroshot"]["n_items"] == 6
    assert res["model"]["model"] == "lt-tiny" and res["model"]["checkpoint_sha256"]


def test_checkpoint_of_another_model(sets: dict[str, str], tmp_path) -> None:
    cfg = EvaluateConfig(checkpoint=sets["ckpt"], model="lt-small", evalset=[f"c={sets['colors']}"], output=str(tmp_path / "e.json"))
    with pytest.raises(ModelError, match="does not fit model 'lt-small'"):
        run_evaluate(cfg)
    assert not os.path.exists(tmp_path / "e.json")


def test_evalset_without_classnames(sets: dict[str, str], tmp_path) -> None:
    spec = f"caps={sets['captions_only']}:folder"
    with pytest.raises(UserError, match="no class names.*--tasks retrieval"):
        run_evaluate(EvaluateConfig(checkpoint=sets["ckpt"], model="lt-tiny", evalset=[spec], output=str(tmp_path / "a.json")))
    # retrieval is still possible on its captions
    res = run_evaluate(
        EvaluateConfig(checkpoint=sets["ckpt"], model="lt-tiny", evalset=[spec], tasks=["retrieval"], output=str(tmp_path / "b.json"))
    )
    assert res["evalsets"]["caps"]["retrieval"]["n_items"] == 4
    assert "zeroshot" not in res["evalsets"]["caps"]
    assert res["evalsets"]["caps"]["retrieval"]["image_to_text_R@10"] == 1.0  # 4 candidates: top-10 always hits
