"""Evaluation of a checkpoint on shards: mIoU and friends, per-class IoU with names, groups.

Full-image inference, no augmentation: each image is padded (with the mean colour) to a
multiple of the model's output stride, segmented, and the prediction cropped back to the
image. Metrics use O(C) state (:mod:`embseg.metrics`), so 100k classes are fine. The
checkpoint's class table must be the shards' (``DIR/classes.parquet``): a model is never
scored against labels that mean something else.
"""

from __future__ import annotations

import argparse
import csv
import json
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from embseg.checkpoint import checkpoint_vocabulary, load_checkpoint
from embseg.data import eval_loader
from embseg.errors import EmbsegError
from embseg.fileio import write_atomically, write_text_atomically
from embseg.metrics import MetricResult, SegmentationMetrics
from embseg.vocab import Vocabulary


def resolve_device(name: str) -> torch.device:
    """``torch.device`` for ``cpu``/``cuda``; EmbsegError when CUDA is asked for but absent."""
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise EmbsegError(f"--device {name}: CUDA is not available on this machine "
                          f"(torch {torch.__version__}, CUDA build: {torch.version.cuda})")
    if name != "cpu" and not name.startswith("cuda"):
        raise EmbsegError(f"--device {name}: must be cpu or cuda")
    return torch.device(name)


def segment(model: torch.nn.Module, images: torch.Tensor, *, device: torch.device) -> torch.Tensor:
    """Class indices (B, H, W) ``0..C-1`` of normalised images (B, 3, H, W), on the CPU.

    Pads bottom/right with 0 (the mean colour after normalisation) to a multiple of the
    output stride, runs the model (bf16 autocast on CUDA) and crops the prediction back.
    """
    stride = int(getattr(model, "config", {}).get("output_stride", 16))
    height, width = images.shape[-2:]
    pad_h, pad_w = (-height) % stride, (-width) % stride
    batch = images.to(device, non_blocking=True)
    if pad_h or pad_w:
        batch = F.pad(batch, (0, pad_w, 0, pad_h), value=0.0)
    with torch.no_grad(), torch.autocast(device_type=device.type, dtype=torch.bfloat16,
                                         enabled=device.type == "cuda"):
        output = model(batch)
    prediction = model.predict(output)
    return prediction[:, :height, :width].cpu()


def _group_of(vocab: Vocabulary) -> dict[int, str]:
    return {class_id: name for name, ids in vocab.groups().items() for class_id in ids}


def _finite(value: float) -> float | None:
    return None if value is None or math.isnan(value) else float(value)


@dataclass
class EvalReport:
    """Evaluation figures, the per-class table and what was evaluated.

    ``group_miou`` holds the mIoU over each group of :meth:`Vocabulary.groups` (LVIS
    ``rare``/``common``/``frequent`` and ``stuff``; another dataset's own groups, e.g. the
    Cityscapes categories; none for a table without groups), NaN when no class of the group
    is present. ``per_class`` has one dict per class:
    id, name, group, iou (NaN when absent from prediction and ground truth), accuracy and the
    pixel counts.
    """

    miou: float
    pixel_accuracy: float
    mean_class_accuracy: float
    fw_iou: float
    group_miou: dict[str, float]
    per_class: list[dict[str, Any]]
    n_images: int
    n_bad_samples: int
    shards: str
    checkpoint: str | None = None
    step: int | None = None
    seconds: float = 0.0
    files: dict[str, str] = field(default_factory=dict)

    def summary(self) -> dict[str, Any]:
        """Scalar figures as JSON-friendly values (NaN -> None)."""
        return {"miou": _finite(self.miou), "pixel_accuracy": _finite(self.pixel_accuracy),
                "mean_class_accuracy": _finite(self.mean_class_accuracy),
                "fw_iou": _finite(self.fw_iou),
                "group_miou": {k: _finite(v) for k, v in self.group_miou.items()},
                "n_images": self.n_images, "n_bad_samples": self.n_bad_samples,
                "classes": len(self.per_class),
                "classes_present": len(self.present_classes()),
                "shards": self.shards, "checkpoint": self.checkpoint, "step": self.step,
                "seconds": round(self.seconds, 3)}

    def present_classes(self) -> list[dict[str, Any]]:
        """Classes with ground-truth pixels in the evaluated split.

        A class only predicted (no ground truth) has IoU 0 and counts in the mIoU, as in
        mmsegmentation, but it is not "present": ranking it as a worst class would name a
        class the split cannot show.
        """
        return [row for row in self.per_class if row["target_pixels"] > 0]

    def ranked_classes(self) -> list[dict[str, Any]]:
        """Classes present in the split (ground-truth pixels > 0), best IoU first."""
        return sorted(self.present_classes(), key=lambda row: (-row["iou"], row["id"]))

    def to_markdown(self, top: int = 5) -> str:
        """Overall figures, group mIoUs and the best/worst ``top`` classes as Markdown.

        Best and worst are ranked among the classes present in the split (ground-truth
        pixels > 0) and never overlap: with fewer than ``2 * top`` present, the worst table
        holds the rest.
        """
        def pct(value: float | None) -> str:
            return "-" if value is None or math.isnan(value) else f"{100 * value:.2f}"

        lines = ["| metric | value |", "| --- | --- |",
                 f"| mIoU | {pct(self.miou)} |", f"| pixel accuracy | {pct(self.pixel_accuracy)} |",
                 f"| mean class accuracy | {pct(self.mean_class_accuracy)} |",
                 f"| frequency-weighted IoU | {pct(self.fw_iou)} |",
                 f"| images | {self.n_images} |", f"| bad samples skipped | {self.n_bad_samples} |"]
        if self.group_miou:
            lines += ["", "| group | mIoU | classes present |", "| --- | --- | --- |"]
        present_by_group: dict[str, int] = {}
        for row in self.present_classes():
            if row["group"]:
                present_by_group[row["group"]] = present_by_group.get(row["group"], 0) + 1
        for name, miou in self.group_miou.items():
            lines.append(f"| {name} | {pct(miou)} | {present_by_group.get(name, 0)} |")
        ranked = self.ranked_classes()
        worst = ranked[::-1][:max(0, min(top, len(ranked) - top))]  # never a best one again
        lines += ["", f"Best and worst of the {len(ranked)} classes with ground-truth pixels "
                  f"in this split (of {len(self.per_class)}):"]
        for title, rows in (("best", ranked[:top]), ("worst", worst)):
            lines += ["", f"| {title} classes | id | IoU | ground-truth pixels |",
                      "| --- | --- | --- | --- |"]
            lines += [f"| {row['name']} | {row['id']} | {pct(row['iou'])} | "
                      f"{row['target_pixels']} |" for row in rows]
        return "\n".join(lines)

    def write(self, out: Path) -> dict[str, str]:
        """Write ``per_class.parquet``, ``per_class.csv`` and ``summary.json`` into ``out``."""
        import pyarrow as pa
        import pyarrow.parquet as pq

        out = Path(out)
        out.mkdir(parents=True, exist_ok=True)
        rows = [{**row, "iou": _finite(row["iou"]), "accuracy": _finite(row["accuracy"])}
                for row in self.per_class]
        paths = {"per_class_parquet": out / "per_class.parquet",
                 "per_class_csv": out / "per_class.csv", "summary": out / "summary.json"}
        write_atomically(paths["per_class_parquet"], lambda p: pq.write_table(pa.Table.from_pylist(rows), p))
        write_atomically(paths["per_class_csv"], lambda p: _write_csv(p, rows))
        self.files = {name: str(path) for name, path in paths.items()}
        summary = {**self.summary(), "files": self.files}
        write_text_atomically(paths["summary"], json.dumps(summary, indent=2) + "\n")
        return self.files


def _write_csv(path: Path, rows: list[dict[str, Any]]) -> None:
    with open(path, "w", newline="", encoding="utf-8") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)


def build_report(result: MetricResult, vocab: Vocabulary, **info: Any) -> EvalReport:
    """An :class:`EvalReport` of metric results, with class names and groups."""
    group_of = _group_of(vocab)
    per_class = [{"id": cls.id, "name": cls.name, "group": group_of.get(cls.id, ""),
                  "source": cls.source, "frequency": cls.frequency,
                  "iou": float(result.iou[i]), "accuracy": float(result.accuracy[i]),
                  "intersection_pixels": int(result.intersection[i]),
                  "predicted_pixels": int(result.predicted[i]),
                  "target_pixels": int(result.target[i])}
                 for i, cls in enumerate(vocab.classes)]
    return EvalReport(miou=result.miou, pixel_accuracy=result.pixel_accuracy,
                      mean_class_accuracy=result.mean_class_accuracy, fw_iou=result.fw_iou,
                      group_miou=dict(result.group_miou), per_class=per_class, **info)


def shard_vocabulary(shards: Path) -> Vocabulary:
    """The vocabulary beside the shards (``DIR/classes.parquet``); EmbsegError when missing."""
    path = Path(shards) / "classes.parquet"
    if not path.is_file():
        raise EmbsegError(f"{path}: the shards have no vocabulary file, so their labels cannot "
                          f"be checked against the model's classes")
    return Vocabulary.read_parquet(path)


def evaluate_model(model: torch.nn.Module, shards: Path, *, vocab: Vocabulary,
                   device: torch.device | str = "cpu", batch_size: int = 4, num_workers: int = 0,
                   on_bad_sample: str = "fail") -> EvalReport:
    """Evaluate an in-memory model (e.g. during training) on the shards in ``shards``."""
    device = torch.device(device)
    start = time.perf_counter()
    was_training = model.training
    model.eval()
    metrics = SegmentationMetrics(vocab.num_classes)
    batches = eval_loader(shards, num_classes=vocab.num_classes, batch_size=batch_size,
                          num_workers=num_workers, on_bad_sample=on_bad_sample)
    try:
        for batch in batches:
            metrics.update(segment(model, batch.image, device=device), batch.label)
    finally:
        model.train(was_training)
    if batches.images == 0:
        raise EmbsegError(f"{shards}: no image could be evaluated "
                          f"({batches.bad_samples} bad samples skipped)")
    return build_report(metrics.compute(vocab.groups()), vocab, n_images=batches.images,
                        n_bad_samples=batches.bad_samples, shards=str(shards),
                        seconds=time.perf_counter() - start)


def load_model(checkpoint: Path, *, device: torch.device) -> tuple[torch.nn.Module, dict, Vocabulary]:
    """Model (eval mode, on ``device``), checkpoint payload and vocabulary of a checkpoint."""
    from embseg.models import build_model

    payload = load_checkpoint(checkpoint, map_location="cpu")
    vocab = checkpoint_vocabulary(payload)
    model = build_model(**payload["model_config"])
    model.load_state_dict(payload["model"])
    return model.to(device).eval(), payload, vocab


def evaluate(checkpoint: Path, shards: Path, *, out: Path | None = None, device: str = "cpu",
             batch_size: int = 4, on_bad_sample: str = "fail", num_workers: int = 2) -> EvalReport:
    """mIoU etc. of ``checkpoint`` on the shards in ``shards``; tables written into ``out``.

    EmbsegError when the checkpoint's class table differs from the shards' vocabulary, when a
    sample is bad (``on_bad_sample="fail"``, the default) or when nothing could be evaluated.
    """
    torch_device = resolve_device(device)
    shards = Path(shards)
    shard_vocab = shard_vocabulary(shards)
    model, payload, vocab = load_model(Path(checkpoint), device=torch_device)
    if vocab.content_hash() != shard_vocab.content_hash():
        raise EmbsegError(f"{payload['path']}: trained on class table {vocab.content_hash()} but "
                          f"{shards / 'classes.parquet'} is {shard_vocab.content_hash()}: "
                          f"evaluate on shards built with the same vocabulary")
    report = evaluate_model(model, shards, vocab=vocab, device=torch_device,
                            batch_size=batch_size, num_workers=num_workers,
                            on_bad_sample=on_bad_sample)
    report.checkpoint = payload["path"]
    report.step = payload.get("step")
    if out is not None:
        report.write(Path(out))
    return report


def cli_eval(args: argparse.Namespace) -> int:
    """``embseg eval``: print the summary table; with ``--out`` write the tables."""
    report = evaluate(args.checkpoint, args.shards, out=args.out, device=args.device,
                      batch_size=args.batch_size, on_bad_sample=args.on_bad_sample)
    print(f"checkpoint {report.checkpoint} (step {report.step}) on {report.shards}")
    print(report.to_markdown())
    for name, path in report.files.items():
        print(f"{name}: {path}")
    return 0
