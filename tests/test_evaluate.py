"""`laiontools evaluate`: zero-shot + retrieval with real open_clip models on synthetic evaluation sets."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from laiontools.core.errors import UserError
from laiontools.core.storage import is_done
from laiontools.models.registry import ModelError, load_model
from laiontools.stages import evaluate as evaluate_stage
from laiontools.stages.evaluate import EvaluateConfig, main
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
    res = json.loads(Path(out).read_text())
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
        evaluate_stage.run(cfg)
    assert not os.path.exists(tmp_path / "e.json")


def test_evalset_without_classnames(sets: dict[str, str], tmp_path) -> None:
    spec = f"caps={sets['captions_only']}:folder"
    with pytest.raises(UserError, match="no class names.*--tasks retrieval"):
        evaluate_stage.run(EvaluateConfig(checkpoint=sets["ckpt"], model="lt-tiny", evalset=[spec], output=str(tmp_path / "a.json")))
    # retrieval is still possible on its captions
    res = evaluate_stage.run(
        EvaluateConfig(checkpoint=sets["ckpt"], model="lt-tiny", evalset=[spec], tasks=["retrieval"], output=str(tmp_path / "b.json"))
    ).details
    assert res["evalsets"]["caps"]["retrieval"]["n_items"] == 4
    assert "zeroshot" not in res["evalsets"]["caps"]
    assert res["evalsets"]["caps"]["retrieval"]["image_to_text_R@10"] == 1.0  # 4 candidates: top-10 always hits


def test_template_with_another_field_is_refused_naming_the_file(sets: dict[str, str], tmp_path) -> None:
    import shutil

    colors = tmp_path / "colors"
    shutil.copytree(sets["colors"], colors)
    (colors / "zeroshot_classification_templates.txt").write_text("a photo of a {c}.\na photo of a {c} in {place}.\n")
    cfg = EvaluateConfig(checkpoint=sets["ckpt"], model="lt-tiny", evalset=[f"c={colors}:wds"], output=str(tmp_path / "e.json"))
    with pytest.raises(UserError, match=r"zeroshot_classification_templates\.txt line 2: .*found place"):
        evaluate_stage.run(cfg)
    assert not os.path.exists(tmp_path / "e.json")


# ---------------------------------------------------------------------------------------------
# metrics on small fixed numbers; every expected value below is worked out by hand in the comments


def test_classification_metrics_by_hand() -> None:
    from laiontools.stages.evaluate import classification_metrics

    logits = [
        [0.9, 0.1, 0.0],  # label 0: nothing above 0.9 -> rank 0: top-1 hit
        [0.5, 0.4, 0.1],  # label 1: class 0 above -> rank 1: top-1 miss, top-2 hit
        [0.2, 0.7, 0.1],  # label 2: classes 0 and 1 above -> rank 2: miss at k=1 and k=2
        [0.3, 0.3, 0.3],  # label 0: both others tie with it; ties count against -> rank 2
        [0.1, 0.2, 0.6],  # label 2: rank 0: hit
    ]
    labels = [0, 1, 2, 0, 2]
    m = classification_metrics(logits, labels, k=2)
    assert m["top1"] == pytest.approx(2 / 5)  # items 0 and 4
    assert m["top5"] == pytest.approx(3 / 5) and m["top5_k"] == 2  # items 0, 1, 4
    # per class top-1 recall: class 0 -> 1/2 (item 0 yes, item 3 no), class 1 -> 0/1, class 2 -> 1/2
    assert m["mean_per_class_recall"] == pytest.approx((0.5 + 0.0 + 0.5) / 3)
    # k above the number of classes is capped: with k=3 every item is a hit
    m = classification_metrics(logits, labels, k=5)
    assert m["top5_k"] == 3 and m["top5"] == 1.0
    # a class without items does not enter the mean: only classes 0 and 2 here
    m = classification_metrics([[0.9, 0.0, 0.1], [0.0, 0.5, 0.9]], [0, 2], k=1)
    assert m["top1"] == 1.0 and m["mean_per_class_recall"] == 1.0


def test_zero_shot_logits_are_features_times_classifier() -> None:
    """The same metric through feature vectors: 2-D unit image features against 2 class directions."""
    import numpy as np

    from laiontools.stages.evaluate import classification_metrics

    s = 1 / np.sqrt(2)
    feats = np.array([[1.0, 0.0], [s, s], [0.0, 1.0], [0.6, 0.8]])
    classes = np.array([[1.0, 0.0], [0.0, 1.0]]).T  # columns: class 0 = x axis, class 1 = y axis
    # cosines: item0 (1, 0) -> class 0; item1 (0.707, 0.707) a tie -> miss whatever its label;
    # item2 (0, 1) -> class 1; item3 (0.6, 0.8) -> class 1
    m = classification_metrics(feats @ classes, [0, 0, 1, 0], k=1)
    assert m["top1"] == pytest.approx(2 / 4)  # items 0 and 2 right; 1 tied, 3 wrong
    assert m["mean_per_class_recall"] == pytest.approx((1 / 3 + 1 / 1) / 2)


def test_retrieval_metrics_by_hand() -> None:
    from laiontools.stages.evaluate import retrieval_metrics

    img = [[1.0, 0.0], [0.0, 1.0], [0.6, 0.8]]
    txt = [[0.8, 0.6], [0.0, 1.0], [1.0, 0.0]]
    # similarity S[i][t] = img_i . txt_t:
    #   i0: t0 0.80  t1 0.00  t2 1.00   -> own text t0; t2 above it      -> rank 1
    #   i1: t0 0.60  t1 1.00  t2 0.00   -> own text t1 on top            -> rank 0
    #   i2: t0 0.96  t1 0.80  t2 0.60   -> own text t2 below t0 and t1   -> rank 2
    # text -> image (columns):
    #   t0: i0 0.80  i1 0.60  i2 0.96   -> i2 above                      -> rank 1
    #   t1: i0 0.00  i1 1.00  i2 0.80   -> rank 0
    #   t2: i0 1.00  i1 0.00  i2 0.60   -> i0 above                      -> rank 1
    m = retrieval_metrics(img, txt, ks=(1, 2, 3))
    assert m["image_to_text_R@1"] == pytest.approx(1 / 3)
    assert m["image_to_text_R@2"] == pytest.approx(2 / 3)
    assert m["image_to_text_R@3"] == 1.0
    assert m["text_to_image_R@1"] == pytest.approx(1 / 3)
    assert m["text_to_image_R@2"] == 1.0
    assert m["image_to_text_mean_rank"] == pytest.approx((2 + 1 + 3) / 3)  # 1-based ranks 2, 1, 3
    assert m["image_to_text_median_rank"] == 2.0
    assert m["text_to_image_mean_rank"] == pytest.approx((2 + 1 + 2) / 3)

    # items 0 and 2 share a caption: either of their texts (images) is a right answer for both.
    #   i0: right {t0 0.80, t2 1.00} best 1.00, nothing wrong above -> 0; i2: best 0.96 vs wrong t1 0.80 -> 0
    #   t0: right {i0 0.80, i2 0.96} best 0.96 vs wrong i1 0.60 -> 0;   t2: best 1.00 -> 0
    m = retrieval_metrics(img, txt, captions=["a cat", "a dog", "a cat"], ks=(1,))
    assert m["image_to_text_R@1"] == 1.0 and m["text_to_image_R@1"] == 1.0

    # everything scored alike: no hit below k = number of candidates (ties count against the query)
    flat = [[1.0, 0.0]] * 4
    m = retrieval_metrics(flat, flat, ks=(1, 3, 4))
    assert m["image_to_text_R@1"] == 0.0 and m["image_to_text_R@3"] == 0.0 and m["image_to_text_R@4"] == 1.0
    assert m["text_to_image_mean_rank"] == 4.0

    with pytest.raises(ValueError, match="same"):
        retrieval_metrics(img, txt[:2])
    with pytest.raises(ValueError, match="captions"):
        retrieval_metrics(img, txt, captions=["a", "b"])


def test_duplicate_captions_are_not_decided_by_sort_order(sets: dict[str, str]) -> None:
    """Identical captions have identical text features; both count as the right answer, whichever sorts first."""
    import numpy as np

    from laiontools.stages.evaluate import retrieval

    bundle = load_model("lt-tiny", pretrained=sets["ckpt"])
    rng = np.random.default_rng(0)
    import torch

    feats = torch.nn.functional.normalize(torch.tensor(rng.normal(size=(6, bundle.model.visual.output_dim)), dtype=torch.float32), dim=1)
    caps = ["a photo of a red circle"] * 3 + ["a photo of a blue square"] * 3
    r = retrieval(bundle, feats, caps, "cpu", 4)
    assert r["n_distinct_captions"] == 2
    # text -> image: each caption's 3 right images are half the candidates, so R@5 is always 1 (at most 3 wrong ones);
    # image -> text: the best of a group's 3 identical texts ties with its twins, never with a wrong one
    assert r["text_to_image_R@5"] == 1.0 and r["image_to_text_R@5"] == 1.0
    # identical captions get the same features up to float rounding (which differs between batches),
    # so which twin sorts first is noise; grouping by caption string takes that out
    from laiontools.stages.evaluate import _encode_texts

    t = _encode_texts(bundle, caps, "cpu", 4)
    assert torch.allclose(t[0], t[2], atol=1e-5) and torch.allclose(t[3], t[5], atol=1e-5)
    # image -> text R@1 computed here directly: an image is right when the best of its own caption's 3
    # texts scores strictly above the best of the other caption's 3 texts
    sims = feats @ t.T  # (6 images, 6 texts)
    best_a, best_b = sims[:, :3].max(dim=1).values, sims[:, 3:].max(dim=1).values
    right = torch.cat([best_a[:3] > best_b[:3], best_b[3:] > best_a[3:]])
    assert r["image_to_text_R@1"] == pytest.approx(float(right.float().mean()))


def test_unfinished_run_folder_is_refused_naming_it(tmp_path) -> None:
    """evaluate reads a train run through contracts.runs: a run without its completion marker is refused."""
    import json

    from laiontools.contracts import layout
    from laiontools.contracts.runs import RunNotFinishedError, is_finished, read_result
    from laiontools.core.storage import mark_done
    from laiontools.stages.evaluate import resolve_checkpoint

    run = tmp_path / "run"
    run.mkdir()
    (run / layout.TRAIN_SETTINGS_JSON).write_text(json.dumps({"model": "lt-tiny"}))
    (run / layout.TRAIN_RESULT_JSON).write_text(json.dumps({"model": "lt-tiny"}))  # written, not yet marked
    assert not is_finished(str(run))
    with pytest.raises(RunNotFinishedError, match=f"{run} is not a finished training run"):
        resolve_checkpoint(str(run), None)
    mark_done(str(run / layout.TRAIN_RESULT_JSON), {})
    assert read_result(str(run)) == {"model": "lt-tiny"}
    assert resolve_checkpoint(str(run), None) == (str(run / layout.TRAIN_MODEL_FILE), "lt-tiny", str(run))


def test_weights_with_nan_are_refused_not_scored(sets, tmp_path) -> None:
    """A checkpoint with one NaN weight (a diverged run) gives NaN features: evaluate refuses it naming
    the file and writes nothing. (NaN scores compared false with everything, so every query ranked
    first: 100 % on every metric, exit 0.) The ranking itself treats a NaN score as the lowest."""
    import numpy as np
    import torch

    from laiontools.stages.evaluate import NonFiniteFeatures, _hit_ranks

    sd = load_model("lt-tiny").model.state_dict()
    sd["visual.class_embedding"] = sd["visual.class_embedding"].clone()
    sd["visual.class_embedding"][0] = float("nan")
    bad = str(tmp_path / "nan.pt")
    torch.save(sd, bad)
    out = tmp_path / "ev.json"
    with pytest.raises(NonFiniteFeatures, match=rf"{bad}: the model's image features are not finite for \d+ of \d+ items"):
        evaluate_stage.run(EvaluateConfig(checkpoint=bad, model="lt-tiny", evalset=[f"colors={sets['colors']}"], output=str(out)))
    assert not out.exists() and not is_done(str(out))
    correct = np.eye(3, dtype=bool)
    assert _hit_ranks(np.full((3, 3), np.nan), correct).tolist() == [2, 2, 2]  # no hit: ties with every wrong one
    assert _hit_ranks(np.array([[np.nan, 0.5, 0.1]]), correct[:1]).tolist() == [2]


def test_out_of_range_labels_are_named_not_counted_as_unlabeled(sets: dict[str, str], tmp_path) -> None:
    """.cls values 99 and -3 with two class names were only counted in n_unlabeled, together with a
    missing .cls (walk F20): they are named in error_items and counted apart."""
    import io
    import tarfile

    from PIL import Image

    from laiontools.evalsets import make_evalset
    from laiontools.stages.evaluate import evaluate_set

    root = tmp_path / "w"
    root.mkdir()
    (root / "classnames.txt").write_text("red\nblue\n")
    with tarfile.open(root / "0.tar", "w") as tf:
        for key, cls in (("a", b"0"), ("b", b"1"), ("c", b"99"), ("d", b"-3"), ("e", None)):
            buf = io.BytesIO()
            Image.new("RGB", (24, 24), (200, 20, 20)).save(buf, format="JPEG")
            for name, data in ((f"{key}.jpg", buf.getvalue()), (f"{key}.cls", cls)):
                if data is not None:
                    ti = tarfile.TarInfo(name)
                    ti.size = len(data)
                    tf.addfile(ti, io.BytesIO(data))
    res = evaluate_set(load_model("lt-tiny", pretrained=sets["ckpt"]), make_evalset("w", str(root), "wds"), ["zeroshot"], "cpu", 8)
    assert res["zeroshot"]["n_unlabeled"] == 1 and res["zeroshot"]["n_label_out_of_range"] == 2
    assert res["error_items"] == [
        {"item_id": "0/c", "error": "label 99 is out of range 0..1 (2 class names); left out of zero-shot"},
        {"item_id": "0/d", "error": "label -3 is out of range 0..1 (2 class names); left out of zero-shot"},
    ]


def _retrieval_by_hand(img, txt, owner):
    """Recall@1 both ways from raw similarities, written out: image i is found by a text of its own when
    its best own text scores strictly above every other image's text; text t when its own image scores
    strictly above every other image."""
    import numpy as np

    sims = np.asarray(img, dtype=np.float64) @ np.asarray(txt, dtype=np.float64).T  # (images, texts)
    owner = np.asarray(owner)
    i2t = [sims[i, owner == i].max() > sims[i, owner != i].max() for i in range(len(sims))]
    t2i = [sims[owner[t], t] > np.delete(sims[:, t], owner[t]).max() for t in range(sims.shape[1])]
    return float(np.mean(i2t)), float(np.mean(t2i))


def test_retrieval_with_several_captions_per_image_scores_each_caption(sets: dict[str, str], tmp_path) -> None:
    """clip_benchmark's retrieval tars (wds_mscoco_captions, wds_flickr30k) hold several captions per image
    in one .txt, one per line (its reader splits them with str.splitlines). They were scored as ONE caption,
    the lines joined (and cut at the context length): image->text and text->image recall were those of
    another task. Each line is a caption of its image: R@k is computed over all of them, as clip_benchmark does."""
    import io
    import tarfile

    import numpy as np
    import torch
    from PIL import Image

    from laiontools.evalsets import make_evalset
    from laiontools.stages.evaluate import evaluate_set

    caps = {
        (200, 30, 30): ["a red square", "a crimson block on white"],
        (30, 30, 200): ["a blue square", "navy tile"],
        (30, 200, 30): ["a green square", "an emerald patch", "grass coloured box"],
        (220, 220, 30): ["a yellow square", "a lemon coloured shape"],
    }
    root = tmp_path / "wds_retrieval"
    (root / "test").mkdir(parents=True)
    images = []
    with tarfile.open(root / "test" / "0.tar", "w") as tf:
        for k, (rgb, lines) in enumerate(caps.items()):
            im = Image.new("RGB", (48, 48), (250, 250, 250))
            im.paste(Image.new("RGB", (24 + 4 * k, 24), rgb), (8, 10 + k))
            buf = io.BytesIO()
            im.save(buf, format="PNG")
            images.append(im)
            for name, data in ((f"{k:04d}.png", buf.getvalue()), (f"{k:04d}.txt", "\n".join(lines).encode())):
                ti = tarfile.TarInfo(name)
                ti.size = len(data)
                tf.addfile(ti, io.BytesIO(data))
    bundle = load_model("lt-tiny", pretrained=sets["ckpt"])
    res = evaluate_set(bundle, make_evalset("r", str(root), "wds"), ["retrieval"], "cpu", 64)["retrieval"]
    # independently: every caption line encoded on its own, the images by the model's own transform
    texts = [t for lines in caps.values() for t in lines]
    owner = [i for i, lines in enumerate(caps.values()) for _ in lines]
    with torch.no_grad():
        img = bundle.model.encode_image(torch.stack([bundle.preprocess(im) for im in images]), normalize=True).numpy()
        txt = bundle.model.encode_text(bundle.tokenizer(texts), normalize=True).numpy()
    want_i2t, want_t2i = _retrieval_by_hand(img, txt, owner)
    assert res["text_to_image_R@1"] == pytest.approx(want_t2i, abs=1e-9)
    assert res["image_to_text_R@1"] == pytest.approx(want_i2t, abs=1e-9)
    assert res["n_items"] == 4 and res["n_texts"] == len(texts) == 9
    assert np.isclose(res["text_to_image_R@10"], 1.0)  # 4 images: always found within 10


def test_a_cuda_device_torch_cannot_see_is_named_not_blamed_on_the_checkpoint(sets: dict[str, str], tmp_path) -> None:
    """--device cuda on a node without a visible GPU (or cuda:N past the last one) failed inside load_model,
    and evaluate reported it as "checkpoint ... does not fit model 'lt-tiny' ... pass the model it was
    trained with": a wrong diagnosis of a good checkpoint. The device is checked first, as train does."""
    from laiontools.core.config import ConfigError

    out = tmp_path / "e.json"
    cfg = EvaluateConfig(checkpoint=sets["ckpt"], model="lt-tiny", evalset=[f"c={sets['colors']}"], output=str(out), device="cuda:99")
    with pytest.raises(ConfigError, match=r"--device cuda:99: torch sees \d+ CUDA device"):
        evaluate_stage.run(cfg)
    assert not out.exists()
