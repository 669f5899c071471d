"""Prediction: files per image, labels equal the model's nearest classes, fixed palette."""

from __future__ import annotations

import io
import json
import math
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from shardutil import (
    colour_sample,
    make_checkpoint,
    make_vocabulary,
    palette,
    reference_labels,
    write_shards,
)

from embseg.cli import main
from embseg.errors import EmbsegError
from embseg.models import build_model
from embseg.predict import palette as class_palette
from embseg.predict import predict_images, predict_shards

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
    assert "good_triptych.png" in capsys.readouterr().out
    assert main(["predict", "--checkpoint", str(checkpoint), "--out", str(tmp_path / "o")]) == 2
    error = capsys.readouterr().err
    assert error.count("\n") == 1 and "give image files, or --shards DIR" in error


def _tar_samples(directory: Path) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """key -> (RGB image, label ids) of every sample, read with tarfile + PIL (not embseg)."""
    parts: dict[str, dict[str, bytes]] = {}
    for shard in sorted(directory.glob("*.tar")):
        with tarfile.open(shard) as tar:
            for member in tar.getmembers():
                key, part = member.name.split(".", 1)
                parts.setdefault(key, {})[part] = tar.extractfile(member).read()
    return {key: (np.asarray(Image.open(io.BytesIO(p["jpg"])).convert("RGB")),
                  np.asarray(Image.open(io.BytesIO(p["seg.png"]))).astype(np.int64))
            for key, p in parts.items()}


def _blocks(array: np.ndarray, factor: int) -> np.ndarray:
    """Each pixel of (H, W, 3) as a factor x factor block (np.kron: the textbook way)."""
    return np.kron(array, np.ones((factor, factor, 1), dtype=array.dtype))


def _panel(picture: np.ndarray, box: list[int]) -> np.ndarray:
    x0, y0, x1, y1 = box
    return picture[y0:y1, x0:x1]


def _colour_count(region: np.ndarray, colour: np.ndarray) -> int:
    return int((region == colour).all(axis=-1).sum())


def test_triptych_layout_from_shards(checkpoint, tmp_path, capsys):
    """image | ground truth | prediction: panels side by side, enlarged by an integer factor
    to >= 512 px on the long side (none for a large image), each panel the exact block-wise
    enlargement of the image / the class colours of its label map; legend below."""
    torch.set_num_threads(1)
    samples = [colour_sample(i, height=24, width=40, num_classes=C) for i in range(3)]
    samples.append(colour_sample(3, height=16, width=520, num_classes=C))  # long enough
    write_shards(tmp_path / "val", samples, num_classes=C, split="val")
    expected = _tar_samples(tmp_path / "val")
    results = predict_shards(checkpoint, tmp_path / "val", tmp_path / "out", count=4)
    assert [r["key"] for r in results] == sorted(expected)
    for result in results:
        image, truth = expected[result["key"]]
        height, width = truth.shape
        factor = math.ceil(512 / max(height, width))
        assert result["scale"] == factor and max(height, width) * factor >= 512
        picture = np.asarray(Image.open(result["triptych"]).convert("RGB"))
        boxes = result["panels"]
        assert list(boxes) == ["image", "ground truth", "prediction"]
        row = list(boxes.values())
        assert all((x1 - x0, y1 - y0) == (width * factor, height * factor)
                   for x0, y0, x1, y1 in row)
        assert len({(y0, y1) for _, y0, _, y1 in row}) == 1  # one row, left to right
        assert all(left[2] < right[0] for left, right in zip(row[:-1], row[1:], strict=True))
        assert row[-1][2] <= picture.shape[1] and row[0][3] < picture.shape[0]
        predicted = np.asarray(Image.open(result["labels"])).astype(np.int64)
        assert predicted.shape == truth.shape
        np.testing.assert_array_equal(_panel(picture, boxes["image"]), _blocks(image, factor))
        np.testing.assert_array_equal(_panel(picture, boxes["ground truth"]),
                                      _blocks(class_palette(truth), factor))
        np.testing.assert_array_equal(_panel(picture, boxes["prediction"]),
                                      _blocks(class_palette(predicted), factor))
        # the legend below the panels has a patch of every class shown (unlabelled too)
        legend = picture[row[0][3]:]
        shown = set(np.unique(truth).tolist()) | set(np.unique(predicted).tolist())
        assert len(shown) <= 12
        for class_id in shown:
            assert _colour_count(legend, class_palette(np.array([class_id]))[0]) >= 100, class_id
        counts = np.bincount(truth.ravel(), minlength=C + 1)
        assert {c["id"]: c["pixels"] for c in result["truth_classes"]} == \
            {c: int(n) for c, n in enumerate(counts) if n}
    # the shard sample's prediction is the image file's: the same model input
    image, _ = expected[results[0]["key"]]
    Image.fromarray(image).save(tmp_path / "same.png")
    (from_file,) = predict_images(checkpoint, [tmp_path / "same.png"], tmp_path / "file")
    np.testing.assert_array_equal(np.asarray(Image.open(from_file["labels"])),
                                  np.asarray(Image.open(results[0]["labels"])))
    assert list(from_file["panels"]) == ["image", "prediction"]  # no ground truth for files
    assert main(["predict", "--checkpoint", str(checkpoint), "--shards", str(tmp_path / "val"),
                 "--count", "2", "--out", str(tmp_path / "cli")]) == 0
    printed = capsys.readouterr().out
    assert printed.count("_triptych.png") == 2
    assert len(json.loads((tmp_path / "cli" / "predictions.json").read_text())["predictions"]) == 2
