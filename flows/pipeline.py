"""``pipeline``, the main job: data -> shards -> training -> evaluation -> predictions.

1. ``synthetic-data``: without annotation files, the built-in synthetic dataset
   (``embseg.synth.generate_synthetic``; reused when already generated with the same settings);
2. ``dataset-rebuild`` of the train and val splits (skipped when up to date);
3. ``train`` into ``<runs>/pipeline-<flow run name>``;
4. ``evaluate`` on the val shards (the mIoU table artifact);
5. ``predict`` the first few val samples: per sample a triptych (image | ground truth |
   prediction, enlarged to >= 512 px, with its legend), the label map, colours, overlay.

The parameter defaults are the demo configuration: ``python -m flows.pipeline`` (``make demo``)
runs it in-process on Prefect's local ephemeral API, local Ray, synthetic data and the CPU,
and prints the mIoU table and where everything is. The ``pipeline/demo`` deployment runs the
same configuration on a worker.
"""

from __future__ import annotations

import inspect
import json
import math
import sys
from dataclasses import asdict
from pathlib import Path
from typing import Any

import pyarrow.parquet as pq
from prefect import flow, get_run_logger, task
from prefect.artifacts import create_markdown_artifact
from prefect.cache_policies import NO_CACHE

from embseg.errors import EmbsegError
from embseg.predict import predict_shards
from embseg.recipes import read_recipe
from embseg.synth import SynthDataset, generate_synthetic
from flows._common import flow_run_label
from flows.evaluate import evaluate_flow
from flows.rebuild import SplitSource, dataset_rebuild
from flows.train import train_flow

SYNTHETIC_STAMP = "pipeline-synthetic.json"
ARTIFACT_KEYS = ("pipeline-summary", "dataset-train", "dataset-val", "train-progress",
                 "train-figures", "train-report", "evaluation-report")


@task(name="synthetic-data", cache_policy=NO_CACHE, retries=1, retry_delay_seconds=2)
def synthetic_data_task(out: Path, *, images: int, val_images: int, lvis_classes: int,
                        size: int, seed: int, categories: Path | None) -> SynthDataset:
    """The synthetic dataset in ``out``: generated, or reused when its settings are unchanged.

    Regenerating would rewrite identical bytes with new modification times and so force a
    needless shard rebuild; the stamp file records the settings and the generated paths.
    """
    settings = {"images": images, "val_images": val_images, "lvis_classes": lvis_classes,
                "size": size, "seed": seed, "categories": str(categories) if categories else None}
    stamp = Path(out) / SYNTHETIC_STAMP
    reused = _reusable_synthetic(stamp, settings)
    logger = get_run_logger()
    if reused is not None:
        logger.info("synthetic dataset in %s is up to date: reused", out)
        return reused
    dataset = generate_synthetic(Path(out), images=images, val_images=val_images,
                                 lvis_classes=lvis_classes, seed=seed, categories=categories,
                                 size=size)
    paths = {name: str(path) for name, path in asdict(dataset).items()}
    stamp.write_text(json.dumps({"settings": settings, "paths": paths}, indent=2) + "\n")
    logger.info("synthetic dataset written to %s: %d train + %d val images", out, images,
                val_images)
    return dataset


def _reusable_synthetic(stamp: Path, settings: dict[str, Any]) -> SynthDataset | None:
    try:
        recorded = json.loads(stamp.read_text())
        dataset = SynthDataset(**{name: Path(path) for name, path in recorded["paths"].items()})
    except (OSError, ValueError, KeyError, TypeError):
        return None
    if recorded.get("settings") != settings:
        return None
    if not all(Path(path).exists() for path in asdict(dataset).values()):
        return None
    return dataset


@task(name="predict", cache_policy=NO_CACHE, retries=1, retry_delay_seconds=2)
def predict_task(checkpoint: Path, val_shards: Path, out: Path, *, count: int,
                 device: str) -> list[dict[str, Any]]:
    """Segment the first ``count`` val samples; write their triptychs (with ground truth)."""
    results = predict_shards(checkpoint, val_shards, out, count=count, device=device)
    get_run_logger().info("%d triptychs (image | ground truth | prediction) in %s",
                          len(results), out)
    return results


def _data_sources(*, lvis_train: Path | None, coco_stuff_train: list[Path] | None,
                  lvis_val: Path | None, coco_stuff_val: list[Path] | None,
                  images: Path | None) -> tuple[list[SplitSource], Path] | None:
    """The user's train/val files and images root, or None to use the synthetic dataset."""
    given = [lvis_train, lvis_val, images]
    if all(value is None for value in given) and not coco_stuff_train and not coco_stuff_val:
        return None
    if any(value is None for value in given):
        raise EmbsegError("pipeline: with real data give lvis_train, lvis_val and images "
                          "(and coco_stuff_train / coco_stuff_val), or none of them for the "
                          "synthetic dataset")
    return ([SplitSource(split="train", lvis=lvis_train, coco_stuff=coco_stuff_train or []),
             SplitSource(split="val", lvis=lvis_val, coco_stuff=coco_stuff_val or [])], images)


def _synthetic_sources(synthetic: SynthDataset) -> tuple[list[SplitSource], Path]:
    """The train/val splits and images root of the synthetic dataset."""
    return ([SplitSource(split="train", lvis=synthetic.lvis_train,
                         coco_stuff=[synthetic.stuff_train]),
             SplitSource(split="val", lvis=synthetic.lvis_val, coco_stuff=[synthetic.stuff_val])],
            synthetic.images_root)


def majority_class_baseline(per_class_table: Path) -> dict[str, float]:
    """Chance level for the demo printout: the scores of always predicting the commonest class.

    From the evaluation's ``per_class.parquet`` (ground-truth pixels per class): that class's
    IoU is its pixel share, every other present class scores 0.
    """
    counts = [c for c in pq.read_table(per_class_table, columns=["target_pixels"])
              .column("target_pixels").to_pylist() if c > 0]
    if not counts:
        return {"miou": float("nan"), "pixel_accuracy": float("nan")}
    share = max(counts) / sum(counts)
    return {"miou": share / len(counts), "pixel_accuracy": share}


def summary_markdown(result: dict[str, Any]) -> str:
    """The pipeline artifact (and the demo's closing printout): results and where they are."""
    chance = result["chance"]
    lines = [f"# embseg pipeline: val mIoU {_pct(result['miou'])}%", "",
             f"Chance level (always the commonest val class): mIoU {_pct(chance['miou'])}%, "
             f"pixel accuracy {_pct(chance['pixel_accuracy'])}%.", "",
             f"- data: {result['data']}",
             f"- shards: `{result['shards']['train']}`, `{result['shards']['val']}`",
             f"- checkpoint: `{result['checkpoint']}` (step {result['step']})",
             f"- metrics: `{result['metrics_file']}`, curves: `{result['curves']}`",
             f"- evaluation tables: `{result['eval_dir']}`",
             f"- prediction triptychs (image | ground truth | prediction): "
             f"`{result['predictions_dir']}` ({len(result['predictions'])} images)",
             f"- Prefect artifacts: {', '.join(f'`{key}`' for key in ARTIFACT_KEYS)}",
             "", "## Val mIoU table (%)", "", result["table_markdown"]]
    return "\n".join(lines)


DEMO_TRAINING = ("head", "embed_dim", "k", "steps", "batch_size", "crop_size", "lr",
                 "num_workers")
"""The pipeline's training parameters: the demo's recipe (``configs/demo.yaml``)."""


def demo_training_defaults() -> dict[str, Any]:
    """The demo's training settings: the defaults of the :data:`DEMO_TRAINING` parameters."""
    parameters = inspect.signature(pipeline.fn).parameters
    return {name: parameters[name].default for name in DEMO_TRAINING}


def _recipe_instead(settings: dict[str, Any], config: Path) -> dict[str, Any]:
    """No demo settings when a recipe trains; a demo parameter changed as well is ambiguous.
    Checked (and the recipe read) before any data work."""
    changed = [name for name, value in settings.items()
               if value != demo_training_defaults()[name]]
    if changed:
        raise EmbsegError(f"pipeline: config={config} replaces the demo's training settings; "
                          f"give {', '.join(changed)} in train_options (they override the "
                          f"recipe), not as pipeline parameters")
    read_recipe(config)  # a bad recipe fails now, not after the shard build
    return {}


def _pct(value: float | None) -> str:
    return "n/a" if value is None or math.isnan(value) else f"{100 * value:.2f}"


@flow(name="pipeline", log_prints=True)
def pipeline(
    lvis_train: Path | None = None,
    coco_stuff_train: list[Path] | None = None,
    lvis_val: Path | None = None,
    coco_stuff_val: list[Path] | None = None,
    images: Path | None = None,
    synthetic_dir: Path = Path("data/synthetic"),
    synthetic_images: int = 160,
    synthetic_val_images: int = 40,
    synthetic_lvis_classes: int = 30,
    synthetic_size: int = 64,
    synthetic_categories: Path | None = None,
    seed: int = 0,
    shards: Path = Path("shards"),
    runs: Path = Path("runs"),
    shard_size: int = 100,
    ray_address: str | None = None,
    workers: int | None = None,
    force_rebuild: bool = False,
    head: str = "embedding",
    embed_dim: int = 64,
    k: int = 25,
    steps: int = 160,
    batch_size: int = 16,
    crop_size: int = 48,
    lr: float = 0.3,
    num_workers: int = 1,
    device: str = "cpu",
    repeat_threshold: float | None = None,
    train_options: dict[str, Any] | None = None,
    config: Path | None = None,
    predict_count: int = 4,
) -> dict[str, Any]:
    """Run the whole pipeline; defaults are the demo configuration (synthetic data, CPU).

    Real data: give ``lvis_train``, ``lvis_val``, ``coco_stuff_train``, ``coco_stuff_val`` and
    ``images`` (the folder holding ``train2017/`` and ``val2017/``). ``repeat_threshold``:
    repeat-factor sampling in training (t; off when None). ``train_options``: further
    ``train`` flow parameters (e.g. ``{"backbone": "resnet50", "output_stride": 8}``).
    ``config``: a recipe file (``configs/*.yaml``) for the train stage *instead of* the demo's
    training settings (:data:`DEMO_TRAINING`: give changes to those in ``train_options``,
    which override the recipe); ``seed``, ``device`` and ``repeat_threshold`` apply with or
    without it. ``configs/demo.yaml`` is the demo's training settings as a recipe.
    """
    demo = {"head": head, "embed_dim": embed_dim, "k": k, "steps": steps,
            "batch_size": batch_size, "crop_size": crop_size, "lr": lr, "num_workers": num_workers}
    options = {**(demo if config is None else _recipe_instead(demo, config)),
               "device": device, "seed": seed, "repeat_threshold": repeat_threshold,
               **(train_options or {})}
    sources = _data_sources(lvis_train=lvis_train, coco_stuff_train=coco_stuff_train,
                            lvis_val=lvis_val, coco_stuff_val=coco_stuff_val, images=images)
    if sources is None:
        synthetic = synthetic_data_task(Path(synthetic_dir), images=synthetic_images,
                                        val_images=synthetic_val_images,
                                        lvis_classes=synthetic_lvis_classes, size=synthetic_size,
                                        seed=seed, categories=synthetic_categories)
        splits, images_root = _synthetic_sources(synthetic)
        data = f"synthetic ({synthetic_images} train + {synthetic_val_images} val images) in " \
               f"`{synthetic.root}`"
    else:
        splits, images_root = sources
        data = f"`{lvis_train}`, `{lvis_val}`, images in `{images_root}`"
    dataset_rebuild(splits=splits, images=images_root, out=shards, shard_size=shard_size,
                    ray_address=ray_address, workers=workers, force=force_rebuild)
    train_shards, val_shards = Path(shards) / "train", Path(shards) / "val"
    run_dir = Path(runs) / f"pipeline-{flow_run_label()}"
    trained = train_flow(shards=train_shards, val_shards=val_shards, out=run_dir,
                         config=config, **options)
    evaluation = evaluate_flow(checkpoint=Path(trained["checkpoint"]), shards=val_shards,
                               out=run_dir / "eval-val", device=device)
    predictions = predict_task(Path(trained["checkpoint"]), val_shards, run_dir / "predictions",
                               count=predict_count, device=device)
    result = {
        "data": data,
        "shards": {"train": str(train_shards), "val": str(val_shards)},
        "run_dir": str(run_dir), "checkpoint": trained["checkpoint"], "step": trained["step"],
        "metrics_file": trained["metrics_file"], "eval_dir": str(run_dir / "eval-val"),
        "miou": evaluation["miou"], "group_miou": evaluation["group_miou"],
        "table_markdown": evaluation["table_markdown"],
        "chance": majority_class_baseline(Path(evaluation["files"]["per_class_parquet"])),
        "predictions_dir": str(run_dir / "predictions"),
        "curves": trained.get("curves"),
        "predictions": [p["triptych"] for p in predictions],
        "artifacts": list(ARTIFACT_KEYS),
    }
    create_markdown_artifact(key="pipeline-summary", markdown=summary_markdown(result),
                             description="pipeline: results and where they are")
    return result


def main() -> int:
    """``python -m flows.pipeline`` / ``make demo``: the demo configuration, in-process."""
    from prefect.settings import PREFECT_API_URL, PREFECT_HOME

    try:
        result = pipeline()
    except EmbsegError as exc:
        print(f"embseg: error: {exc}", file=sys.stderr)
        return exc.exit_code
    print()
    print(summary_markdown(result))
    api = PREFECT_API_URL.value()
    where = f"the Prefect server at {api}" if api else \
        f"Prefect's local database in {PREFECT_HOME.value()} (view: `prefect server start`, " \
        f"then http://127.0.0.1:4200/artifacts)"
    print(f"\nFlow runs, logs and artifacts are stored in {where}.")
    return 0


if __name__ == "__main__":
    sys.exit(main())
