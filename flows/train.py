"""``train``: the single-GPU trainer (``embseg.train.train``) as a tracked, resumable stage.

The flow's parameters are the fields of :class:`embseg.train.TrainConfig` (one per
``embseg train`` option) and ``config``, a recipe file (``configs/*.yaml``): a parameter left
at None comes from the recipe, else the trainer's default. ``resume`` is not a parameter; the
flow decides it: when the run folder ``out`` already holds ``last.pt`` (or its kept previous
version), training continues from it.
So a retried task, a retried flow run or the same flow started again with the same ``out``
resume from the last checkpoint, never from step 0.

While it runs, the Prefect UI shows a progress artifact (key ``train-progress``: steps done of
the total, the last loss and val mIoU in its description, updated every few seconds) and, at
each evaluation, a table of the last figures (key ``train-figures``). At the end it publishes
a markdown artifact (key ``train-report``) with the checkpoint paths, the final metrics and
a link to ``curves.png``, and returns them.
"""

from __future__ import annotations

import dataclasses
import json
import math
import time
from pathlib import Path
from typing import Any

from prefect import flow, get_run_logger, task
from prefect.artifacts import (
    create_markdown_artifact,
    create_progress_artifact,
    update_progress_artifact,
)
from prefect.cache_policies import NO_CACHE

from embseg.checkpoint import previous_path
from embseg.recipes import layered_settings
from embseg.train import TrainConfig, TrainProgress, TrainResult, train
from flows._common import markdown_table, retry_unless_bad_input

FLOW_DECIDED_FIELDS = ("resume",)
"""TrainConfig fields that are not flow parameters: the flow sets them itself."""

FLOW_DEFAULTS = {"no_progress": True}
"""Where the flow's default differs from the trainer's: no progress bars in Prefect's logs."""


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


PROGRESS_KEY = "train-progress"
FIGURES_KEY = "train-figures"


def progress_line(progress: TrainProgress) -> str:
    """``step 80/160 (50%): loss 1.2345, val mIoU 12.34% (best 13.00%)``."""
    def pct(value: float | None) -> str:
        return "n/a" if value is None or math.isnan(value) else f"{100 * value:.2f}%"

    loss = "n/a" if progress.loss is None else f"{progress.loss:.4f}"
    return (f"step {progress.step}/{progress.steps} ({100 * progress.fraction:.0f}%): "
            f"loss {loss}, val mIoU {pct(progress.val_miou)} "
            f"(best {pct(progress.best_val_miou)})")


class PrefectTrainProgress:
    """The trainer's progress hook for a flow: shows a run in the Prefect UI while it runs.

    A progress artifact (``train-progress``) is created at the start and updated in place, at
    most every ``interval_s`` seconds and at every evaluation and the end, with the steps done
    (as a percentage) and a description holding the last loss and val mIoU. At every
    evaluation and at the end a markdown artifact (``train-figures``) gets a new version with
    the last figures. A failed API call is logged and training goes on: the UI is not worth
    a lost run.
    """

    def __init__(self, *, interval_s: float = 2.0) -> None:
        self.interval_s = interval_s
        self.artifact_id = None
        self._last_update = -math.inf
        self._warned = False

    def __call__(self, progress: TrainProgress) -> None:
        now = time.monotonic()
        due = progress.event != "step" or now - self._last_update >= self.interval_s
        try:
            if self.artifact_id is None:
                self.artifact_id = create_progress_artifact(
                    progress=100 * progress.fraction, key=PROGRESS_KEY,
                    description=f"train `{progress.run_dir}`: {progress_line(progress)}")
                self._last_update = now
            elif due:
                update_progress_artifact(
                    self.artifact_id, 100 * progress.fraction,
                    description=f"train `{progress.run_dir}`: {progress_line(progress)}")
                self._last_update = now
            if progress.event in ("eval", "end"):
                create_markdown_artifact(key=FIGURES_KEY, markdown=figures_markdown(progress),
                                         description=f"train: last figures of {progress.run_dir}")
        except Exception as exc:  # noqa: BLE001 - the API is down: keep training, say so once
            if not self._warned:
                get_run_logger().warning("training progress not sent to Prefect: %s", exc)
                self._warned = True


def figures_markdown(progress: TrainProgress) -> str:
    """The ``train-figures`` artifact: where the run stands, as a table."""
    def figure(value: float | None, scale: float = 1.0) -> Any:
        return "n/a" if value is None else scale * value

    rows = [["step", f"{progress.step} of {progress.steps}"],
            ["last training loss", figure(progress.loss)],
            ["last val mIoU (%)", figure(progress.val_miou, 100)],
            ["best val mIoU (%)", figure(progress.best_val_miou, 100)]]
    return "\n".join([f"# Training `{progress.run_dir}`: "
                      f"{'finished' if progress.event == 'end' else 'running'}", "",
                      markdown_table(["figure", "value"], rows), "",
                      f"Curves: `{Path(progress.run_dir) / 'curves.png'}`"])


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
    result = train(dataclasses.replace(config, resume=resume), progress=PrefectTrainProgress())
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
        "curves": str(result.curves) if result.curves else None,
        "step": result.step,
        "metrics": {k: _plain(v) for k, v in result.metrics.items()},
    }


def train_markdown(summary: dict[str, Any]) -> str:
    """The training artifact: checkpoint paths, final metrics and a link to the curves."""
    rows = [[name, value] for name, value in summary["metrics"].items()]
    lines = [f"# Training run `{summary['run_dir']}`", "",
             f"Finished at step {summary['step']}.", "",
             f"- checkpoint (best by val mIoU, else last): `{summary['checkpoint']}`",
             f"- last checkpoint: `{summary['last_checkpoint']}`",
             f"- metrics: `{summary['metrics_file']}`"]
    if summary.get("curves"):
        curves = Path(summary["curves"]).resolve()
        lines.append(f"- curves (loss and val mIoU against step): [{curves.name}]"
                     f"({curves.as_uri()}) `{curves}`")
    if summary.get("recipe"):
        lines.append(f"- recipe: `{summary['recipe']}`")
    return "\n".join([*lines, "", markdown_table(["metric", "value"], rows)])


def _plain(value: Any) -> Any:
    if isinstance(value, float) and math.isnan(value):
        return None
    return value


@flow(name="train", log_prints=True)
def train_flow(
    shards: Path,
    out: Path,
    val_shards: Path | None = None,
    head: str | None = None,
    backbone: str | None = None,
    backbone_weights: Path | None = None,
    output_stride: int | None = None,
    embed_dim: int | None = None,
    k: int | None = None,
    temperature: float | None = None,
    margin: float | None = None,
    embed_bn: bool | None = None,
    dropout: float | None = None,
    backbone_lr_mult: float | None = None,
    class_lr_mult: float | None = None,
    steps: int | None = None,
    batch_size: int | None = None,
    crop_size: int | None = None,
    lr: float | None = None,
    num_workers: int | None = None,
    checkpoint_every: int | None = None,
    eval_every: int | None = None,
    seed: int | None = None,
    device: str | None = None,
    on_bad_sample: str | None = None,
    no_progress: bool | None = None,
    shuffle_buffer: int | None = None,
    repeat_threshold: float | None = None,
    eval_batch_size: int | None = None,
    init_checkpoint: Path | None = None,
    config: Path | None = None,
) -> dict[str, Any]:
    """Train a model on ``shards`` into the run folder ``out`` (see ``embseg train --help``).

    ``config``: a recipe file (``configs/*.yaml``). Every other parameter left at None takes
    the recipe's value when it has one, else the trainer's default (``embseg train --help``;
    ``no_progress`` defaults to True here: no progress bars in Prefect's logs); a parameter
    given overrides the recipe. ``init_checkpoint`` starts a new run from a checkpoint's
    weights (fine-tuning); a run that already has a checkpoint in ``out`` resumes from it
    instead. ``repeat_threshold``: repeat-factor sampling with that t (LVIS uses 0.001).
    """
    params = dict(locals())
    recipe = params.pop("config")
    train_config = flow_train_config(params, recipe=recipe)
    if recipe is not None:
        print(f"training with the recipe {recipe} (the parameters given override it)")
    result = train_model_task(train_config)
    summary = train_summary(result)
    summary["recipe"] = str(recipe) if recipe is not None else None
    create_markdown_artifact(key="train-report", markdown=train_markdown(summary),
                             description=f"train: run {summary['run_dir']}")
    print(f"checkpoint: {summary['checkpoint']} (step {summary['step']}); "
          f"metrics: {summary['metrics_file']}")
    return summary


def flow_train_config(params: dict[str, Any], *, recipe: Path | None = None) -> TrainConfig:
    """The TrainConfig of ``train`` flow parameters: those not None override the ``recipe``
    file, which overrides :data:`FLOW_DEFAULTS` and then the trainer's defaults."""
    given = {name: value for name, value in params.items() if value is not None}
    settings = layered_settings(given=given, recipe=recipe, defaults=FLOW_DEFAULTS)
    return TrainConfig(resume=False, **settings)


def train_config_fields() -> list[str]:
    """Names of the TrainConfig fields the flow exposes as parameters (then ``config``)."""
    return [f.name for f in dataclasses.fields(TrainConfig) if f.name not in FLOW_DECIDED_FIELDS]
