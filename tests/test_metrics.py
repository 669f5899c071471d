"""Metrics: a hand-computed example (absent classes, groups) and an independent implementation."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from embseg.metrics import SegmentationMetrics


def _hand_example() -> SegmentationMetrics:
    """Two batches over C = 5 classes (indices 0..4, ids 1..5); -1 is ignored.

    batch 1 (t, p) on valid pixels: (0,0) (0,1) (1,1) (0,0) (1,1) (1,0) (2,2); the prediction 3
    at the ignored pixel is not counted. batch 2: (2,3).
    Totals: class 0: I=2 P=3 T=3; class 1: I=2 P=3 T=3; class 2: I=1 P=1 T=2;
    class 3: I=0 P=1 T=0 (predicted only: IoU 0, no accuracy); class 4: absent everywhere.
    """
    metrics = SegmentationMetrics(5)
    target = torch.tensor([[[0, 0, 1, -1], [0, 1, 1, 2]]])
    prediction = torch.tensor([[[0, 1, 1, 3], [0, 1, 0, 2]]])
    metrics.update(prediction, target)
    metrics.update(torch.tensor([[[3]]]), torch.tensor([[[2]]]))
    return metrics


def test_hand_computed_example():
    groups = {"rare": [1], "common": [2], "frequent": [3], "stuff": [4, 5]}
    result = _hand_example().compute(groups)
    assert result.intersection.tolist() == [2, 2, 1, 0, 0]
    assert result.predicted.tolist() == [3, 3, 1, 1, 0]
    assert result.target.tolist() == [3, 3, 2, 0, 0]
    # IoU: 2/(3+3-2), 2/(3+3-2), 1/(1+2-1), 0/(1+0-0), absent
    assert result.iou[:4].tolist() == pytest.approx([0.5, 0.5, 0.5, 0.0])
    assert math.isnan(result.iou[4])
    assert result.miou == pytest.approx(0.375)  # (0.5 + 0.5 + 0.5 + 0) / 4, class 5 left out
    assert result.pixel_accuracy == pytest.approx(5 / 8)
    assert result.mean_class_accuracy == pytest.approx((2 / 3 + 2 / 3 + 1 / 2) / 3)
    assert result.fw_iou == pytest.approx(3 / 8 * 0.5 + 3 / 8 * 0.5 + 2 / 8 * 0.5)
    assert result.group_miou == pytest.approx({"rare": 0.5, "common": 0.5, "frequent": 0.5,
                                               "stuff": 0.0})
    only_absent = _hand_example().compute({"empty": [5], "none": []})
    assert math.isnan(only_absent.group_miou["empty"]) and math.isnan(
        only_absent.group_miou["none"])
    assert result.summary()["group_miou"]["stuff"] == 0.0
    assert only_absent.summary()["group_miou"]["empty"] is None


def _confusion_reference(pred: np.ndarray, true: np.ndarray, c: int) -> dict[str, float]:
    """Textbook figures from a full C x C confusion matrix (fine at test sizes)."""
    valid = true >= 0
    conf = np.zeros((c, c), dtype=np.int64)
    np.add.at(conf, (true[valid], pred[valid]), 1)
    tp = np.diag(conf).astype(float)
    rows, cols = conf.sum(1), conf.sum(0)
    union = rows + cols - tp
    present = union > 0
    iou = tp[present] / union[present]
    in_gt = rows > 0
    return {"miou": iou.mean(), "pixel_accuracy": tp.sum() / conf.sum(),
            "mean_class_accuracy": (tp[in_gt] / rows[in_gt]).mean(),
            "fw_iou": float((rows[present] / rows.sum() * iou).sum())}


def test_matches_a_confusion_matrix_reference():
    rng = np.random.default_rng(0)
    c = 30
    metrics = SegmentationMetrics(c)
    preds, trues = [], []
    for _ in range(3):
        true = rng.integers(-1, c - 5, size=(2, 17, 13))  # the last classes never in the truth
        pred = np.where(rng.random(true.shape) < 0.6, np.maximum(true, 0),
                        rng.integers(0, c - 2, size=true.shape))
        metrics.update(torch.from_numpy(pred), torch.from_numpy(true))
        preds.append(pred.ravel())
        trues.append(true.ravel())
    result = metrics.compute()
    expected = _confusion_reference(np.concatenate(preds), np.concatenate(trues), c)
    for name, value in expected.items():
        assert getattr(result, name) == pytest.approx(value), name


def test_state_is_linear_in_classes():
    metrics = SegmentationMetrics(100_000)
    target = torch.tensor([[[99_999, 5, -1]]])
    metrics.update(torch.tensor([[[99_999, 7, 3]]]), target)
    assert metrics.intersection.shape == metrics.predicted.shape == metrics.target.shape == (
        100_000,)
    result = metrics.compute()
    assert result.miou == pytest.approx((1 + 0 + 0) / 3)  # classes 99999, 5 and 7 present


def test_rejects_out_of_range_ids():
    metrics = SegmentationMetrics(3)
    with pytest.raises(ValueError):
        metrics.update(torch.tensor([[0]]), torch.tensor([[3]]))
    with pytest.raises(ValueError):
        metrics.update(torch.tensor([[5]]), torch.tensor([[0]]))
