"""Training DeepLabV3+ with the embedding (ESS) or softmax head on WebDataset shards.

One readable loop (nanoGPT style), configured by one dataclass, :class:`TrainConfig`:
SGD (momentum 0.9, weight decay 1e-4), poly learning rate (power 0.9) over ``steps``, the
backbone at ``backbone_lr_mult`` (0.1) x the learning rate and the class table of the
embedding head at ``class_lr_mult`` x it, bf16 autocast on CUDA only, the paper's augmentation.

Run directory ``RUN`` (``--out``):

- ``last.pt`` every ``checkpoint_every`` steps and at the end (the one it replaces is kept as
  ``last.prev.pt``), ``best.pt`` by val mIoU when val shards are given;
- ``metrics.jsonl``: one row per step (``kind: train``: step, loss and its parts, lr,
  images/s, bad samples skipped so far) and one per evaluation (``kind: eval``: val mIoU,
  pixel accuracy, ..., group mIoUs);
- ``curves.png``: loss and val mIoU against step (:mod:`embseg.curves`), redrawn from
  ``metrics.jsonl`` at each evaluation and at the end.

Progress: a tqdm bar on the terminal, and ``train(config, progress=hook)`` calls ``hook`` with
a :class:`TrainProgress` when the run starts, after every step and evaluation, and at the
end, so that a caller (the Prefect flow) can show it elsewhere; the library itself stays
free of any orchestrator.

``resume`` continues from ``last.pt``: model, optimizer, scheduler, step, RNG states and the
loader position, so that on CPU with a fixed seed the losses after the resume equal those of
an uninterrupted run. ``metrics.jsonl`` is cut back to the checkpoint's step first, so it reads
as one uninterrupted run.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import random
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
from tqdm import tqdm

from embseg.checkpoint import (
    load_checkpoint,
    new_payload,
    previous_path,
    rng_state,
    save_checkpoint,
    set_rng_state,
    vocabulary_record,
)
from embseg.curves import write_curves
from embseg.data import (
    BAD_SAMPLE_POLICIES,
    LoaderState,
    TrainBatches,
    shard_location,
    shard_source,
    train_loader,
)
from embseg.data.sources import CLASSES_FILE
from embseg.errors import EmbsegError
from embseg.evaluate import EvalReport, evaluate_model, resolve_device, shard_vocabulary
from embseg.fileio import write_text_atomically
from embseg.vocab import Vocabulary

log = logging.getLogger(__name__)

MOMENTUM = 0.9
WEIGHT_DECAY = 1e-4
POLY_POWER = 0.9

RUN_DEFINING_FIELDS = ("head", "backbone", "output_stride", "embed_dim", "k", "temperature",
                       "margin", "batch_size", "crop_size", "lr", "num_workers", "seed",
                       "shuffle_buffer", "embed_bn", "dropout", "backbone_lr_mult",
                       "class_lr_mult", "repeat_threshold")
"""Settings a resumed run must share with the checkpoint (they shape the model or the data)."""

SETTINGS_BEFORE_THEY_WERE_OPTIONS = {"embed_bn": False, "dropout": 0.5,
                                     "backbone_lr_mult": 0.1, "class_lr_mult": 1.0,
                                     "repeat_threshold": None}
"""What runs whose checkpoints predate these options did (a resume compares against it)."""


@dataclass
class TrainConfig:
    """Every setting of a training run; the fields mirror the ``embseg train`` options."""

    shards: str | Path  # a folder, brace pattern, URL or pipe: command (embseg.data.sources)
    out: Path
    val_shards: str | Path | None = None
    head: str = "embedding"
    backbone: str = "tiny"
    backbone_weights: Path | None = None
    output_stride: int = 16
    embed_dim: int = 32
    k: int = 25  # embseg study's tuning (benchmarks/results/2026-12-02-study-cpu/tuning.md)
    temperature: float = 5.0  # embseg study's tuning: T = 20 (the release's) learnt slower
    margin: float = 0.2
    embed_bn: bool = True  # parameter-free BN on the embedding head's last conv
    dropout: float = 0.5  # of the ASPP projection (torchvision's); short runs learn faster at 0
    backbone_lr_mult: float = 0.1  # 1.0 suits a backbone trained from scratch (tiny)
    class_lr_mult: float = 300.0  # the L2-normalised class table turns slowly at the base lr
    steps: int = 1000
    batch_size: int = 8
    crop_size: int = 256
    lr: float = 0.01
    num_workers: int = 2
    checkpoint_every: int = 100
    eval_every: int | None = None
    seed: int = 0
    device: str = "cpu"
    resume: bool = False
    on_bad_sample: str = "skip"
    no_progress: bool = False
    shuffle_buffer: int = 256
    repeat_threshold: float | None = None  # repeat-factor sampling's t (embseg.sampling); off
    eval_batch_size: int = 4
    init_checkpoint: Path | None = None  # fine-tuning: a new run starts from these weights

    def __post_init__(self) -> None:
        # local shard locations as paths (as before URLs were allowed); URLs and pipe: stay text
        self.shards = shard_location(self.shards)
        if self.val_shards is not None:
            self.val_shards = shard_location(self.val_shards)

    def to_record(self) -> dict[str, Any]:
        """Plain values (paths as strings) for checkpoints and logs."""
        return {k: str(v) if isinstance(v, Path) else v for k, v in asdict(self).items()}

    def check(self) -> None:
        """EmbsegError naming the option when a setting is out of range."""
        rules = {"steps": self.steps >= 1, "batch_size": self.batch_size >= 1,
                 "crop_size": self.crop_size >= 8, "lr": self.lr > 0,
                 "backbone_lr_mult": self.backbone_lr_mult >= 0,
                 "class_lr_mult": self.class_lr_mult >= 0,
                 "num_workers": self.num_workers >= 0, "checkpoint_every": self.checkpoint_every >= 1,
                 "eval_every": self.eval_every is None or self.eval_every >= 1,
                 "on_bad_sample": self.on_bad_sample in BAD_SAMPLE_POLICIES,
                 "shuffle_buffer": self.shuffle_buffer >= 0,
                 "repeat_threshold": self.repeat_threshold is None or self.repeat_threshold > 0}
        for name, ok in rules.items():
            if not ok:
                raise EmbsegError(f"train setting {name}={getattr(self, name)!r} is out of range")


@dataclass
class TrainResult:
    """Where a finished run left its files, and its last figures."""

    run_dir: Path
    last_checkpoint: Path
    best_checkpoint: Path | None
    step: int
    metrics: dict[str, Any]
    curves: Path | None = None


@dataclass(frozen=True)
class TrainProgress:
    """Where a run stands, as passed to the ``progress`` hook of :func:`train`.

    ``event``: ``start`` (before the first step; ``step`` > 0 when resuming), ``step`` (after
    each training step), ``eval`` (after each validation) or ``end``. ``loss`` is the last
    step's, ``val_miou`` the last evaluation's (None before the first one).
    """

    event: Literal["start", "step", "eval", "end"]
    step: int
    steps: int
    loss: float | None
    val_miou: float | None
    best_val_miou: float | None
    run_dir: Path

    @property
    def fraction(self) -> float:
        """Share of the run's steps done, 0..1."""
        return min(1.0, self.step / self.steps) if self.steps else 1.0


ProgressHook = Callable[[TrainProgress], None]
"""Called by :func:`train` with each :class:`TrainProgress`; it must return quickly."""


class MetricsLog:
    """``RUN/metrics.jsonl``: appended row by row, cut back to a step on resume."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def rows(self) -> list[dict[str, Any]]:
        if not self.path.exists():
            return []
        rows = []
        for line in self.path.read_text().splitlines():
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError:  # a line cut by a kill: drop it
                continue
        return rows

    def truncate(self, step: int) -> None:
        """Keep rows up to ``step`` (rewritten atomically); rows after it will be redone."""
        kept = [row for row in self.rows() if row.get("step", 0) <= step]
        write_text_atomically(self.path, "".join(json.dumps(row) + "\n" for row in kept))

    def append(self, row: dict[str, Any]) -> None:
        with open(self.path, "a", encoding="utf-8") as handle:
            handle.write(json.dumps(row) + "\n")


def poly_factor(step: int, steps: int, power: float = POLY_POWER) -> float:
    """Poly learning-rate multiplier after ``step`` of ``steps`` steps: (1 - step/steps)^power."""
    return max(0.0, 1.0 - step / steps) ** power


def seed_everything(seed: int) -> None:
    """Seed python, numpy and torch (model initialisation, dropout)."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def _classes_file(shards: str | Path) -> str | None:
    """Where the vocabulary of ``shards`` is (named in errors)."""
    return shard_source(shards).beside_file(CLASSES_FILE)


def _load_vocabularies(config: TrainConfig) -> Vocabulary:
    vocab = shard_vocabulary(config.shards)
    if config.val_shards is not None:
        val_vocab = shard_vocabulary(config.val_shards)
        if val_vocab.content_hash() != vocab.content_hash():
            raise EmbsegError(f"{_classes_file(config.val_shards)}: class table "
                              f"{val_vocab.content_hash()} differs from the training shards' "
                              f"{vocab.content_hash()}")
    return vocab


def _build(config: TrainConfig, vocab: Vocabulary, device: torch.device, *, resuming: bool):
    """Model, optimizer and poly scheduler of a config (deterministic given the seed)."""
    from embseg.models import build_model

    seed_everything(config.seed)
    model = build_model(backbone=config.backbone, head=config.head,
                        num_classes=vocab.num_classes, embed_dim=config.embed_dim,
                        output_stride=config.output_stride, k=config.k,
                        temperature=config.temperature, margin=config.margin,
                        embed_bn=config.embed_bn, dropout=config.dropout,
                        backbone_weights=None if resuming else config.backbone_weights)
    model.to(device)
    groups = model.param_groups(config.lr, backbone_lr_mult=config.backbone_lr_mult,
                                class_lr_mult=config.class_lr_mult)
    optimizer = torch.optim.SGD(groups, lr=config.lr, momentum=MOMENTUM,
                                weight_decay=WEIGHT_DECAY)
    steps = config.steps

    def poly(step: int) -> float:
        return poly_factor(step, steps)

    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, poly)
    return model, optimizer, scheduler


def _check_resumable(config: TrainConfig, payload: dict[str, Any]) -> None:
    stored = {**SETTINGS_BEFORE_THEY_WERE_OPTIONS, **payload.get("train_config", {})}
    differing = [f"{name}={getattr(config, name)!r} (checkpoint: {stored.get(name)!r})"
                 for name in RUN_DEFINING_FIELDS
                 if name in stored and stored[name] != getattr(config, name)]
    if differing:
        raise EmbsegError(f"{payload['path']}: cannot resume with different settings: "
                          + ", ".join(differing))


def _init_from_checkpoint(config: TrainConfig, vocab: Vocabulary, model) -> None:
    """Fine-tuning: load the weights of ``config.init_checkpoint`` into a run at step 0.

    The checkpoint must share the run's class table and model settings; optimizer, schedule
    and step start afresh (only a resume continues those).
    """
    payload = load_checkpoint(config.init_checkpoint, map_location="cpu",
                              expected_hash=vocab.content_hash(),
                              vocabulary_file=_classes_file(config.shards),
                              fallback=False)
    if dict(payload["model_config"]) != dict(model.config):
        raise EmbsegError(f"{payload['path']}: model settings {payload['model_config']} differ "
                          f"from this run's {dict(model.config)}: cannot initialise from it")
    model.load_state_dict(payload["model"])
    log.info("initialised from %s (step %s)", payload["path"], payload.get("step"))


@dataclass
class _RunState:
    step: int = 0
    best_miou: float | None = None
    loader_state: LoaderState | None = None
    last_eval: dict[str, Any] | None = None


def _resume(config: TrainConfig, vocab: Vocabulary, model, optimizer, scheduler) -> _RunState:
    """Restore a run from ``RUN/last.pt`` (or its previous good version)."""
    last = Path(config.out) / "last.pt"
    if not last.exists() and not previous_path(last).exists():
        log.warning("%s: no checkpoint to resume from; starting at step 0", config.out)
        return _RunState()
    payload = load_checkpoint(last, map_location="cpu", expected_hash=vocab.content_hash(),
                              vocabulary_file=_classes_file(config.shards))
    _check_resumable(config, payload)
    model.load_state_dict(payload["model"])
    optimizer.load_state_dict(payload["optimizer"])
    scheduler.load_state_dict(payload["scheduler"])
    set_rng_state(payload["rng"])
    return _RunState(step=int(payload["step"]), best_miou=payload.get("best_miou"),
                     loader_state=LoaderState.from_dict(payload["data"]),
                     last_eval=payload.get("last_eval"))


def _eval_row(step: int, report: EvalReport) -> dict[str, Any]:
    summary = report.summary()
    return {"kind": "eval", "step": step, "val_miou": summary["miou"],
            "val_pixel_accuracy": summary["pixel_accuracy"],
            "val_mean_class_accuracy": summary["mean_class_accuracy"],
            "val_fw_iou": summary["fw_iou"], "val_group_miou": summary["group_miou"],
            "val_images": report.n_images, "val_bad_samples": report.n_bad_samples}


def _is_due(step: int, every: int | None, last_step: int) -> bool:
    return step == last_step or (every is not None and step % every == 0)


@dataclass
class _Session:
    """Everything a running training loop holds; one method per thing the loop does."""

    config: TrainConfig
    vocab: Vocabulary
    device: torch.device
    model: Any
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler
    state: _RunState
    batches: TrainBatches
    metrics_log: MetricsLog

    def payload(self) -> dict[str, Any]:
        """The checkpoint of the current step (plain data only)."""
        return new_payload(
            step=self.state.step, model=self.model.state_dict(),
            model_config=dict(self.model.config), optimizer=self.optimizer.state_dict(),
            scheduler=self.scheduler.state_dict(), rng=rng_state(),
            data=self.batches.state().to_dict(), vocabulary=vocabulary_record(self.vocab),
            class_table_hash=self.vocab.content_hash(), train_config=self.config.to_record(),
            best_miou=self.state.best_miou, last_eval=self.state.last_eval)

    def train_step(self) -> dict[str, Any]:
        """One SGD step on the next batch; returns (and logs) its metrics row."""
        tick = time.perf_counter()
        batch = next(self.batches)
        images = batch.image.to(self.device, non_blocking=True)
        target = batch.label.to(self.device, non_blocking=True)
        lr = self.optimizer.param_groups[1]["lr"]  # the head's: the base learning rate
        with torch.autocast(device_type=self.device.type, dtype=torch.bfloat16,
                            enabled=self.device.type == "cuda"):
            output = self.model(images)
        loss, parts = self.model.loss(output, target)
        if not math.isfinite(parts["loss"]):
            raise EmbsegError(f"{self.config.out}: loss is {parts['loss']} at step "
                              f"{self.state.step + 1}; lower --lr or resume from last.pt")
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        self.optimizer.step()
        self.scheduler.step()
        self.state.step += 1
        row = {"kind": "train", "step": self.state.step, **parts, "lr": lr,
               "images_per_second": round(len(batch.keys) / (time.perf_counter() - tick), 3),
               "bad_samples": self.batches.bad_samples}
        self.metrics_log.append(row)
        return row

    def validate(self, best_path: Path) -> str:
        """Evaluate on the val shards, log the row, keep ``best.pt``; returns a summary line."""
        report = evaluate_model(self.model, self.config.val_shards, vocab=self.vocab,
                                device=self.device, batch_size=self.config.eval_batch_size,
                                num_workers=self.config.num_workers,
                                on_bad_sample=self.config.on_bad_sample)
        self.state.last_eval = _eval_row(self.state.step, report)
        self.metrics_log.append(self.state.last_eval)
        best = self.state.best_miou
        if not math.isnan(report.miou) and (best is None or report.miou > best):
            self.state.best_miou = float(report.miou)
            save_checkpoint(self.payload(), best_path)
        return (f"step {self.state.step}: val mIoU {100 * report.miou:.2f} "
                f"(best {100 * (self.state.best_miou or 0):.2f})")

    def write_curves(self) -> Path:
        """Redraw ``RUN/curves.png`` from ``metrics.jsonl``."""
        path = Path(self.config.out) / "curves.png"
        write_curves(self.metrics_log.rows(), path, source=str(self.metrics_log.path),
                     title=f"{self.config.head} head, {self.config.backbone} backbone: "
                           f"{Path(self.config.out).name}")
        return path

    def progress(self, event: str, loss: float | None) -> TrainProgress:
        """The run's :class:`TrainProgress` now."""
        return TrainProgress(event=event, step=self.state.step, steps=self.config.steps,
                             loss=loss, val_miou=(self.state.last_eval or {}).get("val_miou"),
                             best_val_miou=self.state.best_miou, run_dir=Path(self.config.out))


def _start(config: TrainConfig, device: torch.device) -> _Session:
    """Build or restore everything a run needs (resume, fine-tuning init, loader position)."""
    run_dir = Path(config.out)
    vocab = _load_vocabularies(config)
    run_dir.mkdir(parents=True, exist_ok=True)
    for stale in run_dir.glob(".*.tmp-*"):  # temporary files of a killed run's writes
        stale.unlink(missing_ok=True)
    model, optimizer, scheduler = _build(config, vocab, device, resuming=config.resume)
    state = _RunState()
    if config.resume:
        state = _resume(config, vocab, model, optimizer, scheduler)
    if config.init_checkpoint is not None and state.step == 0:
        _init_from_checkpoint(config, vocab, model)
    metrics_log = MetricsLog(run_dir / "metrics.jsonl")
    metrics_log.truncate(state.step)
    batches = train_loader(config.shards, num_classes=vocab.num_classes,
                           batch_size=config.batch_size, crop_size=config.crop_size,
                           seed=config.seed, num_workers=config.num_workers,
                           shuffle_buffer=config.shuffle_buffer,
                           on_bad_sample=config.on_bad_sample, state=state.loader_state,
                           start_step=state.step, pin_memory=device.type == "cuda",
                           repeat_threshold=config.repeat_threshold)
    return _Session(config=config, vocab=vocab, device=device, model=model,
                    optimizer=optimizer, scheduler=scheduler, state=state, batches=batches,
                    metrics_log=metrics_log)


def _last_train_row(metrics_log: MetricsLog) -> dict[str, Any]:
    return next((r for r in reversed(metrics_log.rows()) if r.get("kind") == "train"), {})


def train(config: TrainConfig, *, progress: ProgressHook | None = None) -> TrainResult:
    """Train (or, with ``config.resume``, continue training) and return the run's result.

    ``progress``: called with a :class:`TrainProgress` at the start, after every step and
    evaluation, and at the end (see :data:`ProgressHook`).
    """
    def report(event: str, loss: float | None) -> None:
        if progress is not None:
            progress(run.progress(event, loss))

    config.check()
    device = resolve_device(config.device)
    run_dir = Path(config.out)
    last_path, best_path = run_dir / "last.pt", run_dir / "best.pt"
    if not config.resume and (last_path.exists() or previous_path(last_path).exists()):
        raise EmbsegError(f"{run_dir}: already holds a training run (last.pt); pass --resume to "
                          f"continue it or choose another --out")
    run = _start(config, device)
    eval_every = config.eval_every if config.eval_every is not None else config.checkpoint_every
    row: dict[str, Any] = _last_train_row(run.metrics_log) if run.state.step else {}
    bar = tqdm(total=config.steps, initial=run.state.step, disable=config.no_progress,
               dynamic_ncols=True, desc="train")
    report("start", row.get("loss"))
    run.model.train()
    try:
        while run.state.step < config.steps:
            row = run.train_step()
            bar.update(1)
            bar.set_postfix(loss=f"{row['loss']:.4f}", lr=f"{row['lr']:.2e}",
                            img_s=f"{row['images_per_second']:.1f}")
            report("step", row["loss"])
            if config.val_shards is not None and _is_due(row["step"], eval_every, config.steps):
                bar.write(run.validate(best_path))
                run.write_curves()
                report("eval", row["loss"])
            if _is_due(row["step"], config.checkpoint_every, config.steps):
                save_checkpoint(run.payload(), last_path, keep_previous=True)
    finally:
        bar.close()
        run.batches.close()
    bad_samples = run.batches.bad_samples
    if bad_samples:
        log.warning("%d bad samples were skipped (see metrics.jsonl)", bad_samples)
    curves = run.write_curves()
    report("end", row.get("loss"))
    final = {"loss": row.get("loss"), "bad_samples": bad_samples,
             "best_val_miou": run.state.best_miou,
             "val_miou": (run.state.last_eval or {}).get("val_miou")}
    return TrainResult(run_dir=run_dir, last_checkpoint=last_path,
                       best_checkpoint=best_path if best_path.exists() else None,
                       step=run.state.step, metrics=final, curves=curves)


def cli_train(args: argparse.Namespace) -> int:
    """``embseg train``: run training and print where the checkpoints and metrics are."""
    from embseg.recipes import config_from_args

    config = config_from_args(args)
    print(f"training run in {config.out} (metrics: {Path(config.out) / 'metrics.jsonl'})",
          flush=True)
    result = train(config)
    print(f"finished at step {result.step}: loss {result.metrics['loss']}, "
          f"val mIoU {result.metrics['val_miou']}, bad samples skipped "
          f"{result.metrics['bad_samples']}")
    print(f"last checkpoint: {result.last_checkpoint}")
    if result.best_checkpoint is not None:
        print(f"best checkpoint: {result.best_checkpoint} (val mIoU {result.metrics['best_val_miou']})")
    print(f"metrics: {result.run_dir / 'metrics.jsonl'}, curves: {result.curves}")
    return 0
