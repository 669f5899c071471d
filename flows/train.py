"""``train``: the single-GPU trainer (``embseg.train.train``) as a tracked, resumable stage.

The flow's parameters are the fields of :class:`embseg.train.TrainConfig` (one per
``embseg train`` option), except ``resume``, which the flow decides: when the run folder
``out`` already holds ``last.pt`` (or its kept previous version), training continues from it.
So a retried task, a retried flow run or the same flow started again with the same ``out``
resume from the last checkpoint, never from step 0.

Publishes a markdown artifact (key ``train-report``) with the checkpoint paths and the final
metrics, and returns them.
"""

from __future__ import annotations

import dataclasses
import json
import math
from pathlib import Path
from typing import Any

from prefect import flow, get_run_logger, task
from prefect.artifacts import create_markdown_artifact
from prefect.cache_policies import NO_CACHE

from embseg.checkpoint import previous_path
from embseg.train import TrainConfig, TrainResult, train
from flows._common import markdown_table, retry_unless_bad_input

FLOW_DECIDED_FIELDS = ("resume",)
"""TrainConfig fields that are not flow parameters: the flow sets them itself."""


def has_checkpoint(run_dir: Path) -> bool:
    """True when ``run_dir`` holds a checkpoint to resume from (``last.pt`` or its previous)."""
    last = Path(run_dir) / "last.pt"
    return last.exists() or previous_path(last).exists()


def last_logged_step(run_dir: Path) -> int:
    """The last training step recorded in ``RUN/metrics.jsonl`` (0 when there is none)."""
    path = Path(run_dir) / "metrics.jsonl"
    if not path.exists():
        return 0
    step = 0
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            continue
        if row.get("kind") == "train":
            step = max(step, int(row.get("step", 0)))
    return step


@task(name="train-model", cache_policy=NO_CACHE, retries=1, retry_delay_seconds=5,
      retry_condition_fn=retry_unless_bad_input)
def train_model_task(config: TrainConfig) -> TrainResult:
    """Train, resuming from the run folder's last checkpoint when there is one."""
    logger = get_run_logger()
    resume = has_checkpoint(config.out)
    if resume:
        logger.info("resuming %s from its last checkpoint (metrics logged up to step %d)",
                    config.out, last_logged_step(config.out))
    else:
        logger.info("starting a new training run in %s", config.out)
    result = train(dataclasses.replace(config, resume=resume))
    logger.info("finished at step %d: %s", result.step, result.metrics)
    return result


def train_summary(result: TrainResult) -> dict[str, Any]:
    """The flow's JSON-friendly result: where the checkpoints are and the final metrics."""
    checkpoint = result.best_checkpoint or result.last_checkpoint
    return {
        "run_dir": str(result.run_dir),
        "checkpoint": str(checkpoint),
        "last_checkpoint": str(result.last_checkpoint),
        "best_checkpoint": str(result.best_checkpoint) if result.best_checkpoint else None,
        "metrics_file": str(Path(result.run_dir) / "metrics.jsonl"),
        "step": result.step,
        "metrics": {k: _plain(v) for k, v in result.metrics.items()},
    }


def train_markdown(summary: dict[str, Any]) -> str:
    """The training artifact: checkpoint paths and final metrics."""
    rows = [[name, value] for name, value in summary["metrics"].items()]
    return "\n".join([
        f"# Training run `{summary['run_dir']}`", "",
        f"Finished at step {summary['step']}.", "",
        f"- checkpoint (best by val mIoU, else last): `{summary['checkpoint']}`",
        f"- last checkpoint: `{summary['last_checkpoint']}`",
        f"- metrics: `{summary['metrics_file']}`", "",
        markdown_table(["metric", "value"], rows),
    ])


def _plain(value: Any) -> Any:
    if isinstance(value, float) and math.isnan(value):
        return None
    return value


@flow(name="train", log_prints=True)
def train_flow(
    shards: Path,
    out: Path,
    val_shards: Path | None = None,
    head: str = "embedding",
    backbone: str = "tiny",
    backbone_weights: Path | None = None,
    output_stride: int = 16,
    embed_dim: int = 32,
    k: int = 7,
    temperature: float = 20.0,
    margin: float = 0.2,
    embed_bn: bool = True,
    dropout: float = 0.5,
    backbone_lr_mult: float = 0.1,
    class_lr_mult: float = 30.0,
    steps: int = 1000,
    batch_size: int = 8,
    crop_size: int = 256,
    lr: float = 0.01,
    num_workers: int = 2,
    checkpoint_every: int = 100,
    eval_every: int | None = None,
    seed: int = 0,
    device: str = "cpu",
    on_bad_sample: str = "skip",
    no_progress: bool = True,
    shuffle_buffer: int = 256,
    repeat_threshold: float | None = None,
    eval_batch_size: int = 4,
    init_checkpoint: Path | None = None,
) -> dict[str, Any]:
    """Train a model on ``shards`` into the run folder ``out`` (see ``embseg train --help``).

    ``init_checkpoint`` starts a new run from a checkpoint's weights (fine-tuning); a run that
    already has a checkpoint in ``out`` resumes from it instead. ``repeat_threshold``:
    repeat-factor sampling with that t (LVIS uses 0.001), off when None.
    """
    params = dict(locals())
    config = TrainConfig(resume=False, **params)
    result = train_model_task(config)
    summary = train_summary(result)
    create_markdown_artifact(key="train-report", markdown=train_markdown(summary),
                             description=f"train: run {summary['run_dir']}")
    print(f"checkpoint: {summary['checkpoint']} (step {summary['step']}); "
          f"metrics: {summary['metrics_file']}")
    return summary


def train_config_fields() -> list[str]:
    """Names of the TrainConfig fields the flow exposes as parameters."""
    return [f.name for f in dataclasses.fields(TrainConfig) if f.name not in FLOW_DECIDED_FIELDS]
