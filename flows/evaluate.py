"""``evaluate``: mIoU of a checkpoint on shards (``embseg.evaluate.evaluate``) as a tracked stage.

Publishes the mIoU table as a markdown artifact (key ``evaluation-report``): overall figures,
mIoU of each class group of the shards' dataset (LVIS: rare / common / frequent and stuff; other
datasets: their own, e.g. the Cityscapes categories), best and worst classes. The
per-class table (Parquet + CSV) and ``summary.json`` are written to ``out`` (default: an
``eval-<shards folder>`` folder beside the checkpoint).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from prefect import flow, get_run_logger, task
from prefect.artifacts import create_markdown_artifact
from prefect.cache_policies import NO_CACHE

from embseg.data.sources import source_label
from embseg.evaluate import EvalReport, evaluate
from flows._common import retry_unless_bad_input

BEST_WORST_CLASSES = 5


def default_eval_dir(checkpoint: Path, shards: str | Path) -> Path:
    """Where the tables go when no ``out`` is given: beside the checkpoint, named after the
    shards' folder (``eval-val`` for ``shards/val`` or ``s3://bucket/shards/val``)."""
    return Path(checkpoint).parent / f"eval-{source_label(shards)}"


@task(name="evaluate-model", cache_policy=NO_CACHE, retries=1, retry_delay_seconds=2,
      retry_condition_fn=retry_unless_bad_input)
def evaluate_model_task(checkpoint: Path, shards: str | Path, *, out: Path, device: str,
                        batch_size: int, on_bad_sample: str, num_workers: int) -> EvalReport:
    """Score the checkpoint on the shards and write the per-class tables."""
    report = evaluate(checkpoint, shards, out=out, device=device, batch_size=batch_size,
                      on_bad_sample=on_bad_sample, num_workers=num_workers)
    get_run_logger().info("%s on %s: mIoU %.4f over %d images", checkpoint, shards, report.miou,
                          report.n_images)
    return report


def evaluation_markdown(report: EvalReport, *, title: str) -> str:
    """The evaluation artifact: what was scored, then the library's mIoU table (in %)."""
    files = "".join(f"\n- {name}: `{path}`" for name, path in report.files.items())
    return "\n".join([
        f"# {title}", "",
        f"Checkpoint `{report.checkpoint}` (step {report.step}) on `{report.shards}`: "
        f"{report.n_images} images. Figures in %.", files, "",
        report.to_markdown(top=BEST_WORST_CLASSES),
    ])


def evaluation_summary(report: EvalReport) -> dict[str, Any]:
    """The flow's JSON-friendly result: summary figures, files and the markdown table."""
    return {**report.summary(), "files": dict(report.files),
            "table_markdown": report.to_markdown(top=BEST_WORST_CLASSES)}


@flow(name="evaluate", log_prints=True)
def evaluate_flow(
    checkpoint: Path,
    shards: str | Path,
    out: Path | None = None,
    device: str = "cpu",
    batch_size: int = 4,
    on_bad_sample: str = "fail",
    num_workers: int = 2,
    artifact_key: str = "evaluation-report",
) -> dict[str, Any]:
    """Evaluate ``checkpoint`` on ``shards`` (a folder, brace pattern, ``pipe:`` command or
    URL); returns the summary figures."""
    out = Path(out) if out is not None else default_eval_dir(checkpoint, shards)
    report = evaluate_model_task(Path(checkpoint), shards, out=out, device=device,
                                 batch_size=batch_size, on_bad_sample=on_bad_sample,
                                 num_workers=num_workers)
    create_markdown_artifact(key=artifact_key,
                             markdown=evaluation_markdown(report, title="Evaluation"),
                             description=f"evaluate: {checkpoint} on {shards}")
    print(f"mIoU {100 * report.miou:.2f}% on {report.n_images} images; tables in {out}")
    return evaluation_summary(report)
