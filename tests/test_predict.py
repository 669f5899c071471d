"""Prediction: files per image, labels equal the model's nearest classes, fixed palette."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from shardutil import make_checkpoint, make_vocabulary, palette, reference_labels

from embseg.cli import main
from embseg.errors import EmbsegError
from embseg.models import build_model
from embseg.predict import palette as class_palette
from embseg.predict import predict_images

C = 6


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    return make_checkpoint(tmp_path_factory.mktemp("ckpt") / "model.pt", C)


def _model_labels(checkpoint, image: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Class ids 1..C of the checkpoint's model by the independent reference rule (pad
    bottom/right, crop back), and its near-tie pixels."""
    payload = torch.load(checkpoint, weights_only=True)
    model = build_model(**payload["model_config"])
    model.load_state_dict(payload["model"])
    model.eval()
    labels, near_tie = reference_labels(model, image)
    return labels + 1, near_tie


def _assert_labels_match(path: Path, reference: tuple[np.ndarray, np.ndarray]) -> None:
    """The written label map equals the reference, except where the best two classes are a
    near-tie (float32 here, float64 in the reference: such a pixel may go either way)."""
    labels, near_tie = reference
    got = np.asarray(Image.open(path))
    assert got.shape == labels.shape and near_tie.mean() < 0.01
    np.testing.assert_array_equal(got[~near_tie], labels[~near_tie])


def test_predict_writes_maps_overlay_and_legend(checkpoint, tmp_path):
    torch.set_num_threads(1)
    rng = np.random.default_rng(0)
    colour = palette(C)[rng.integers(0, C + 1, size=(32, 48))]
    Image.fromarray(colour).save(tmp_path / "a.png")
    gray = rng.integers(0, 256, size=(21, 35), dtype=np.uint8)
    (tmp_path / "sub").mkdir()
    Image.fromarray(gray).save(tmp_path / "sub" / "a.jpg")  # same stem, grayscale, odd size
    out = tmp_path / "out"
    results = predict_images(checkpoint, [tmp_path / "a.png", tmp_path / "sub" / "a.jpg"], out)
    assert [r["image"] for r in results] == [str(tmp_path / "a.png"), str(tmp_path / "sub/a.jpg")]
    assert results[1]["color"].endswith("a-2_color.png")  # repeated stems do not overwrite
    for result, size in zip(results, [(48, 32), (35, 21)], strict=True):
        labels = np.asarray(Image.open(result["labels"]))
        assert Image.open(result["labels"]).mode == "I;16" and labels.shape == size[::-1]
        assert labels.min() >= 1 and labels.max() <= C
        colour_map = np.asarray(Image.open(result["color"]).convert("RGB"))
        np.testing.assert_array_equal(colour_map, class_palette(labels))
        assert Image.open(result["overlay"]).size == size
        assert Image.open(result["legend"]).size[0] > 50
        shares = result["classes"]
        assert sum(s["fraction"] for s in shares) == pytest.approx(1.0)
        assert [s["pixels"] for s in shares] == sorted((s["pixels"] for s in shares), reverse=True)
        names = make_vocabulary(C).names
        assert all(s["name"] == names[s["id"] - 1] for s in shares)
        counts = np.bincount(labels.ravel())
        assert shares[0]["pixels"] == counts.max()
    _assert_labels_match(results[0]["labels"], _model_labels(checkpoint, colour))
    # 21x35 is padded to 32x48 for the model and cropped back: the labels are the reference's
    decoded = np.asarray(Image.open(tmp_path / "sub" / "a.jpg").convert("RGB"))
    _assert_labels_match(results[1]["labels"], _model_labels(checkpoint, decoded))
    overlay = np.asarray(Image.open(results[0]["overlay"]).convert("RGB")).astype(float)
    expected = 0.5 * colour + 0.5 * class_palette(np.asarray(Image.open(results[0]["labels"])))
    np.testing.assert_allclose(overlay, expected, atol=1.0)
    index = json.loads((out / "predictions.json").read_text())
    assert [p["legend"] for p in index["predictions"]] == [r["legend"] for r in results]


def test_palette_is_fixed_per_class_id():
    ids = np.arange(0, 2000)
    colours = class_palette(ids)
    np.testing.assert_array_equal(colours, class_palette(ids))
    np.testing.assert_array_equal(class_palette(np.array([1234])), colours[1234:1235])
    assert (colours[0] == 0).all() and (colours[1:] >= 48).all()
    assert len({tuple(c) for c in colours[1:]}) > 1990  # nearly all distinct
    # pinned: maps written by earlier versions keep their colours (a change must be deliberate)
    assert class_palette(np.array([1, 2, 183, 1284])).tolist() == [
        [230, 91, 153], [74, 130, 160], [67, 251, 94], [80, 61, 117]]


def test_predict_checks_every_input_first(checkpoint, tmp_path, capsys):
    good = tmp_path / "good.png"
    Image.fromarray(np.zeros((16, 16, 3), np.uint8)).save(good)
    (tmp_path / "bad.jpg").write_bytes(b"not an image")
    with pytest.raises(EmbsegError, match="missing.jpg: image file not found"):
        predict_images(checkpoint, [good, tmp_path / "missing.jpg"], tmp_path / "out")
    assert not (tmp_path / "out").exists()
    code = main(["predict", "--checkpoint", str(checkpoint), str(good), str(tmp_path / "bad.jpg"),
                 "--out", str(tmp_path / "out")])
    assert code == 2 and "bad.jpg: not a readable image" in capsys.readouterr().err
    assert main(["predict", "--checkpoint", str(checkpoint), str(good), "--out",
                 str(tmp_path / "out")]) == 0
    assert "good_legend.png" in capsys.readouterr().out
