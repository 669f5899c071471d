"""Segmentation metrics with O(C) state: per-class intersection, predicted and target counts.

A C x C confusion matrix would hold 10^10 counters at 100k classes; mIoU, pixel accuracy,
mean class accuracy and frequency-weighted IoU need only three length-C vectors:

- ``intersection[c]``: pixels of class c predicted as c,
- ``predicted[c]``: pixels predicted as c (among labelled pixels),
- ``target[c]``: labelled pixels of class c,

so that ``IoU[c] = intersection / (predicted + target - intersection)`` and
``accuracy[c] = intersection / target``. Classes absent from both the prediction and the
ground truth have no IoU and are left out of every mean (their IoU is NaN in the table);
a class absent from the ground truth has no accuracy.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np
import torch


def _nan_to_none(value: float) -> float | None:
    return None if math.isnan(value) else float(value)


@dataclass
class MetricResult:
    """Summary figures and per-class arrays (index i = class id i + 1)."""

    miou: float
    pixel_accuracy: float
    mean_class_accuracy: float
    fw_iou: float
    group_miou: dict[str, float]
    iou: np.ndarray
    accuracy: np.ndarray
    intersection: np.ndarray
    predicted: np.ndarray
    target: np.ndarray

    def summary(self) -> dict[str, float | None | dict[str, float | None]]:
        """The scalar figures as a JSON-friendly dict (NaN -> None)."""
        return {"miou": _nan_to_none(self.miou),
                "pixel_accuracy": _nan_to_none(self.pixel_accuracy),
                "mean_class_accuracy": _nan_to_none(self.mean_class_accuracy),
                "fw_iou": _nan_to_none(self.fw_iou),
                "group_miou": {k: _nan_to_none(v) for k, v in self.group_miou.items()}}


def _nanmean(values: np.ndarray) -> float:
    finite = values[~np.isnan(values)]
    return float(finite.mean()) if finite.size else math.nan


class SegmentationMetrics:
    """Accumulates per-class counts over batches; ``compute()`` gives a :class:`MetricResult`.

    Predictions and targets are class indices ``0..C-1``; target pixels equal to
    ``ignore_index`` (and predictions there) are not counted.
    """

    def __init__(self, num_classes: int, *, ignore_index: int = -1) -> None:
        if num_classes < 1:
            raise ValueError("num_classes must be at least 1")
        self.num_classes = num_classes
        self.ignore_index = ignore_index
        self.intersection = torch.zeros(num_classes, dtype=torch.int64)
        self.predicted = torch.zeros(num_classes, dtype=torch.int64)
        self.target = torch.zeros(num_classes, dtype=torch.int64)

    def update(self, prediction: torch.Tensor, target: torch.Tensor) -> None:
        """Add a batch: ``prediction`` and ``target`` of the same shape, integer class indices."""
        if prediction.shape != target.shape:
            raise ValueError(f"prediction {tuple(prediction.shape)} and target "
                             f"{tuple(target.shape)} differ in shape")
        valid = target != self.ignore_index
        pred = prediction[valid].reshape(-1).long()
        true = target[valid].reshape(-1).long()
        if true.numel() and (int(true.min()) < 0 or int(true.max()) >= self.num_classes):
            raise ValueError(f"target ids must be 0..{self.num_classes - 1} or the ignore index")
        if pred.numel() and (int(pred.min()) < 0 or int(pred.max()) >= self.num_classes):
            raise ValueError(f"predicted ids must be 0..{self.num_classes - 1}")
        hits = true[pred == true]
        c = self.num_classes
        self.intersection += torch.bincount(hits, minlength=c).cpu()
        self.predicted += torch.bincount(pred, minlength=c).cpu()
        self.target += torch.bincount(true, minlength=c).cpu()

    def merge(self, other: SegmentationMetrics) -> None:
        """Add another accumulator's counts (e.g. from another process)."""
        if other.num_classes != self.num_classes:
            raise ValueError("cannot merge metrics of different class counts")
        self.intersection += other.intersection
        self.predicted += other.predicted
        self.target += other.target

    def compute(self, groups: Mapping[str, Sequence[int]] | None = None) -> MetricResult:
        """The figures; ``groups`` maps a group name to class ids 1..C (Vocabulary.groups())."""
        inter = self.intersection.numpy().astype(np.float64)
        pred = self.predicted.numpy().astype(np.float64)
        true = self.target.numpy().astype(np.float64)
        union = pred + true - inter
        with np.errstate(divide="ignore", invalid="ignore"):
            iou = np.where(union > 0, inter / union, np.nan)
            accuracy = np.where(true > 0, inter / true, np.nan)
        total = true.sum()
        pixel_accuracy = float(inter.sum() / total) if total > 0 else math.nan
        fw_iou = float(np.nansum(true / total * iou)) if total > 0 else math.nan
        group_miou = {}
        for name, class_ids in (groups or {}).items():
            indices = np.asarray(list(class_ids), dtype=np.int64) - 1
            group_miou[name] = _nanmean(iou[indices]) if indices.size else math.nan
        return MetricResult(miou=_nanmean(iou), pixel_accuracy=pixel_accuracy,
                            mean_class_accuracy=_nanmean(accuracy), fw_iou=fw_iou,
                            group_miou=group_miou, iou=iou, accuracy=accuracy,
                            intersection=self.intersection.numpy().copy(),
                            predicted=self.predicted.numpy().copy(),
                            target=self.target.numpy().copy())
