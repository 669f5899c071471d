"""Evaluation: tables written, figures equal an independent full-image evaluation, crop-back,
vocabulary checks, the CLI, and the whole chain on shards built from the synthetic dataset."""

from __future__ import annotations

import csv
import io
import json
import math
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch
from PIL import Image
from shardutil import colour_sample, make_vocabulary, reference_labels, write_shards

from embseg.cli import main
from embseg.errors import EmbsegError
from embseg.evaluate import evaluate
from embseg.models import build_model
from embseg.train import TrainConfig, train

C = 8


pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> tuple[Path, Path]:
    """(root with train/val/odd shards, checkpoint of a 12-step run)."""
    torch.set_num_threads(1)
    root = tmp_path_factory.mktemp("eval")
    write_shards(root / "train", [colour_sample(i, height=48, width=48, num_classes=C)
                                  for i in range(16)], num_classes=C, shard_size=8)
    write_shards(root / "val", [colour_sample(100 + i, height=48, width=48, num_classes=C)
                                for i in range(4)], num_classes=C, split="val")
    write_shards(root / "odd", [colour_sample(200 + i, height=40, width=44, num_classes=C)
                                for i in range(3)], num_classes=C, split="val")
    # k and T fixed here, not the trainer's defaults: this 12-step model must have no pixel
    # within the near-tie margin of two classes (the reference comparison below needs it),
    # and a change of defaults should not move that.
    result = train(TrainConfig(shards=root / "train", out=root / "run", steps=12, batch_size=4,
                               crop_size=32, lr=0.05, k=7, temperature=20.0, num_workers=0,
                               checkpoint_every=12, no_progress=True))
    return root, result.last_checkpoint


def _samples(directory: Path) -> list[tuple[np.ndarray, np.ndarray]]:
    """(RGB image, label ids) of every sample, read with tarfile + PIL (not embseg)."""
    import tarfile

    members: dict[str, dict[str, bytes]] = {}
    for shard in sorted(directory.glob("*-[0-9][0-9][0-9][0-9][0-9][0-9].tar")):
        with tarfile.open(shard) as tar:
            for member in tar.getmembers():
                key, part = member.name.split(".", 1)
                members.setdefault(key, {})[part] = tar.extractfile(member).read()
    return [(np.asarray(Image.open(io.BytesIO(parts["jpg"])).convert("RGB")),
             np.asarray(Image.open(io.BytesIO(parts["seg.png"]))).astype(np.int64))
            for _, parts in sorted(members.items())]


def _reference_confusion(checkpoint: Path, directory: Path) -> tuple[np.ndarray, int]:
    """(C, C) confusion matrix (ground truth x prediction) of full-image inference image by
    image, on the labelled pixels, and how many of those pixels are near-ties."""
    payload = torch.load(checkpoint, weights_only=True)
    model = build_model(**payload["model_config"])
    model.load_state_dict(payload["model"])
    model.eval()
    confusion = np.zeros((C, C), dtype=np.int64)
    near_ties = 0
    for image, label in _samples(directory):
        pred, tie = reference_labels(model, image)
        assert pred.shape == label.shape
        valid = label > 0
        np.add.at(confusion, (label[valid] - 1, pred[valid]), 1)
        near_ties += int((tie & valid).sum())
    return confusion, near_ties


def _reference_miou(checkpoint: Path, directory: Path) -> float:
    """A textbook confusion-matrix mIoU of :func:`_reference_confusion`."""
    confusion, near_ties = _reference_confusion(checkpoint, directory)
    assert near_ties == 0, "a near-tie pixel could go either way: compare counts instead"
    tp = np.diag(confusion)
    union = confusion.sum(0) + confusion.sum(1) - tp
    return float((tp[union > 0] / union[union > 0]).mean())


def test_figures_match_an_independent_evaluation(trained):
    root, checkpoint = trained
    report = evaluate(checkpoint, root / "val", num_workers=0)
    assert report.n_images == 4 and report.n_bad_samples == 0 and report.step == 12
    assert report.miou == pytest.approx(_reference_miou(checkpoint, root / "val"), abs=1e-9)
    assert 0.0 < report.miou <= 1.0


def test_eval_writes_its_tables(trained, tmp_path):
    root, checkpoint = trained
    out = tmp_path / "eval"
    report = evaluate(checkpoint, root / "odd", out=out, num_workers=2)
    labelled = sum(int((label > 0).sum()) for _, label in _samples(root / "odd"))
    rows = pq.read_table(out / "per_class.parquet").to_pylist()
    assert [row["id"] for row in rows] == list(range(1, C + 1))
    assert [row["name"] for row in rows] == make_vocabulary(C).names
    assert [row["group"] for row in rows[:4]] == ["rare", "common", "frequent", "stuff"]
    # 40x44 images are padded for the model and cropped back: every labelled pixel is counted
    # once as ground truth and once as a prediction
    assert sum(row["target_pixels"] for row in rows) == labelled
    assert sum(row["predicted_pixels"] for row in rows) == labelled
    # and the prediction is the model's on the image padded bottom/right with the mean colour,
    # cropped back at the top-left corner: per-class counts equal the independent evaluation's
    # (up to the few near-tie pixels, which float32 batched and float64 single may split
    # differently; a wrong padding corner or crop moves dozens of pixels per class)
    confusion, near_ties = _reference_confusion(checkpoint, root / "odd")
    assert near_ties <= labelled // 200
    intersections = np.array([row["intersection_pixels"] for row in rows])
    predicted = np.array([row["predicted_pixels"] for row in rows])
    assert np.abs(intersections - np.diag(confusion)).sum() <= near_ties
    assert np.abs(predicted - confusion.sum(0)).sum() <= 2 * near_ties
    assert [row["target_pixels"] for row in rows] == confusion.sum(1).tolist()
    with open(out / "per_class.csv", newline="") as handle:
        csv_rows = list(csv.DictReader(handle))
    assert [r["name"] for r in csv_rows] == [r["name"] for r in rows]
    summary = json.loads((out / "summary.json").read_text())
    assert summary["miou"] == pytest.approx(report.miou) and summary["n_images"] == 3
    assert set(summary["group_miou"]) == {"rare", "common", "frequent", "stuff"}
    present = [r["iou"] for r in rows if r["iou"] is not None]
    assert report.miou == pytest.approx(sum(present) / len(present))
    absent = [r for r in report.per_class if r["target_pixels"] == r["predicted_pixels"] == 0]
    assert all(math.isnan(r["iou"]) for r in absent)
    markdown = report.to_markdown()
    assert "| mIoU |" in markdown and "| rare |" in markdown and "best classes" in markdown


def test_best_and_worst_classes_are_among_those_present_in_the_split():
    """A class with no ground-truth pixel (only predicted: IoU 0) is never "worst"."""
    from embseg.evaluate import build_report
    from embseg.metrics import SegmentationMetrics

    # Class ids 1..6 have 10 ground-truth pixels each, of which `correct[c]` are predicted
    # right and the rest as class 7, which has no ground truth; class 8 appears nowhere.
    correct = {1: 10, 2: 9, 3: 8, 4: 6, 5: 4, 6: 1}
    truth, prediction = [], []
    for class_id, right in correct.items():
        truth += [class_id] * 10
        prediction += [class_id] * right + [7] * (10 - right)
    metrics = SegmentationMetrics(C)  # targets are class id - 1
    metrics.update(torch.tensor([prediction]) - 1, torch.tensor([truth]) - 1)
    vocab = make_vocabulary(C)
    report = build_report(metrics.compute(vocab.groups()), vocab, n_images=1,
                          n_bad_samples=0, shards="memory")
    # independent: IoU = |P & T| / |P | T| per class, ranked over the ground-truth classes
    truth_ids, pred_ids = np.array(truth), np.array(prediction)
    iou = {c: ((truth_ids == c) & (pred_ids == c)).sum() / ((truth_ids == c) | (pred_ids == c)).sum()
           for c in sorted(set(truth))}
    ranked = sorted(iou, key=lambda c: (-iou[c], c))
    assert [row["id"] for row in report.ranked_classes()] == ranked == [1, 2, 3, 4, 5, 6]
    assert [row["iou"] for row in report.ranked_classes()] == pytest.approx([iou[c] for c in ranked])
    assert report.per_class[6]["iou"] == 0.0  # class 7: scored (in the mIoU), not present
    assert math.isnan(report.per_class[7]["iou"])
    assert report.summary()["classes_present"] == 6
    markdown = report.to_markdown(top=2)
    best = markdown.split("| best classes |")[1].split("| worst classes |")[0]
    worst = markdown.split("| worst classes |")[1]
    assert _listed_ids(best) == [1, 2] and _listed_ids(worst) == [6, 5]
    assert "class_7" not in markdown and "class_8" not in markdown
    assert "of the 6 classes with ground-truth pixels in this split (of 8)" in markdown
    # 6 present, top 5: the worst table holds only the class the best table left out
    assert _listed_ids(report.to_markdown(top=5).split("| worst classes |")[1]) == [6]


def _listed_ids(table: str) -> list[int]:
    """Class ids of the ``| class_N | N | ...`` rows of a markdown fragment."""
    return [int(line.split(" | ")[1]) for line in table.splitlines() if line.startswith("| class_")]


def test_eval_refuses_another_vocabulary(trained, tmp_path):
    _, checkpoint = trained
    other = tmp_path / "other"
    write_shards(other, [colour_sample(1, height=16, width=16, num_classes=C + 2)],
                 num_classes=C + 2)
    with pytest.raises(EmbsegError) as error:
        evaluate(checkpoint, other)
    assert make_vocabulary(C).content_hash() in str(error.value)
    assert make_vocabulary(C + 2).content_hash() in str(error.value)


def test_cli_eval_prints_the_table_and_reports_bad_shards(trained, tmp_path, capsys):
    root, checkpoint = trained
    assert main(["eval", "--checkpoint", str(checkpoint), "--shards", str(root / "val"),
                 "--out", str(tmp_path / "out")]) == 0
    printed = capsys.readouterr().out
    assert "| mIoU |" in printed and "per_class_csv" in printed
    bad = tmp_path / "bad"
    samples = [colour_sample(i, height=16, width=16, num_classes=C) for i in range(2)]
    samples[1]["jpg"] = b"broken"
    write_shards(bad, samples, num_classes=C, split="val")
    assert main(["eval", "--checkpoint", str(checkpoint), "--shards", str(bad)]) == 2
    error = capsys.readouterr().err.strip()
    assert error.count("\n") == 0
    assert error.startswith("embseg: error: shard ") and "val-000000.tar, key 000000000001" in error
    assert main(["eval", "--checkpoint", str(checkpoint), "--shards", str(bad),
                 "--on-bad-sample", "skip"]) == 0
    assert "| bad samples skipped | 1 |" in capsys.readouterr().out


def test_end_to_end_on_built_synthetic_shards(ray_local, tmp_path):
    """synth -> build (Ray) -> train with val -> eval -> predict, on the real formats."""
    from embseg.build import build_shards
    from embseg.predict import predict_images
    from embseg.synth import generate_synthetic

    data = generate_synthetic(tmp_path / "synth", images=16, val_images=4, lvis_classes=12,
                              size=48, seed=0)
    for split, lvis, stuff in (("train", data.lvis_train, data.stuff_train),
                               ("val", data.lvis_val, data.stuff_val)):
        report = build_shards(lvis=lvis, coco_stuff=[stuff], images=data.images_root,
                              out=tmp_path / "shards" / split, split=split, shard_size=6,
                              progress=False)
        assert report.n_failed == 0
    result = train(TrainConfig(shards=tmp_path / "shards" / "train",
                               val_shards=tmp_path / "shards" / "val", out=tmp_path / "run",
                               steps=4, batch_size=2, crop_size=32, num_workers=2,
                               checkpoint_every=2, no_progress=True))
    assert result.best_checkpoint is not None and result.metrics["val_miou"] is not None
    report = evaluate(result.best_checkpoint, tmp_path / "shards" / "val", out=tmp_path / "eval")
    assert report.n_images == 4 and (tmp_path / "eval" / "per_class.parquet").exists()
    vocab_size = len(report.per_class)
    assert vocab_size > 12  # LVIS classes plus COCO-Stuff stuff classes
    image = next((data.images_root / "val2017").glob("*.jpg"))
    (prediction,) = predict_images(result.best_checkpoint, [image], tmp_path / "pred")
    assert Path(prediction["legend"]).exists()
