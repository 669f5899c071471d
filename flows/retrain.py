"""``retrain`` (the scheduled flow): rebuild if needed, train, evaluate, promote if not worse.

1. ``dataset-rebuild`` for the train and val splits (skipped per split when up to date);
2. ``train`` into a new run folder ``<runs>/retrain-<flow run name>``, fine-tuned from the
   current model (``fine_tune=True``, when there is one with the same class table) or from
   scratch;
3. ``evaluate`` the new checkpoint and the current model on the same val shards;
4. ``promote``: the new checkpoint becomes the current model only if its val mIoU is at least
   the current one's (see flows/promotion.py: atomic pointer swap, every earlier model kept).

The ``retrain-decision`` artifact records both scores and the decision.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from prefect import flow, get_run_logger, task
from prefect.artifacts import create_markdown_artifact
from prefect.cache_policies import NO_CACHE

from embseg.checkpoint import load_checkpoint
from embseg.recipes import read_recipe
from embseg.vocab import Vocabulary
from flows._common import flow_run_label, markdown_table
from flows.evaluate import evaluate_flow
from flows.promotion import CurrentModel, PromotionDecision, promote_if_better, read_current
from flows.rebuild import SplitSource, dataset_rebuild
from flows.train import train_flow


@task(name="current-model", cache_policy=NO_CACHE, retries=1, retry_delay_seconds=2)
def current_model_task(models: Path) -> CurrentModel | None:
    """The model the registry's pointer designates (None before the first promotion)."""
    current = read_current(models)
    logger = get_run_logger()
    if current is None:
        logger.info("no current model in %s yet", models)
    else:
        logger.info("current model: v%04d (val mIoU %.4f) %s", current.version, current.miou,
                    current.checkpoint)
    return current


def class_table_matches(checkpoint: Path, shards: Path) -> bool:
    """True when the checkpoint was trained on the class table of ``shards/classes.parquet``."""
    payload = load_checkpoint(checkpoint, map_location="cpu", fallback=False)
    shard_vocab = Vocabulary.read_parquet(Path(shards) / "classes.parquet")
    return payload["class_table_hash"] == shard_vocab.content_hash()


@task(name="promote", cache_policy=NO_CACHE, retries=2, retry_delay_seconds=2)
def promote_task(models: Path, checkpoint: Path, *, new_miou: float, current_miou: float | None,
                 metadata: dict[str, Any]) -> PromotionDecision:
    """Apply the promotion rule (new val mIoU >= current) and record the decision."""
    decision = promote_if_better(models, checkpoint, new_miou=new_miou,
                                 current_miou=current_miou, metadata=metadata)
    get_run_logger().info(decision.reason)
    return decision


def decision_markdown(decision: PromotionDecision, *, notes: list[str],
                      rebuild: dict[str, dict[str, Any]], run_dir: str) -> str:
    """The retrain artifact: both scores, the decision and why, what the data step did."""
    def score(value: float | None) -> str:
        return "-" if value is None else f"{100 * value:.2f}"

    current = decision.current
    rows = [["new model", f"`{decision.new_checkpoint}`", score(decision.new_miou)],
            ["current model (before)",
             f"v{decision.previous_version:04d}" if decision.previous_version else "none",
             score(decision.current_miou)]]
    lines = [f"# Retrain: {'PROMOTED' if decision.promoted else 'KEPT the current model'}", "",
             decision.reason, "",
             markdown_table(["model", "checkpoint", "val mIoU (%)"], rows), "",
             f"Current model now: v{current.version:04d} `{current.checkpoint}`" if current
             else "No current model.",
             f"Training run: `{run_dir}`", "", "## Data", "",
             markdown_table(["split", "status", "images ok", "skipped", "failed"],
                            [[s, r["status"], r["n_ok"], r["n_skipped"], r["n_failed"]]
                             for s, r in rebuild.items()])]
    if notes:
        lines += ["", "## Notes", ""] + [f"- {note}" for note in notes]
    return "\n".join(lines)


@flow(name="retrain", log_prints=True)
def retrain(
    splits: list[SplitSource],
    images: Path,
    shards: Path = Path("shards"),
    runs: Path = Path("runs"),
    models: Path = Path("models"),
    train_split: str = "train",
    val_split: str = "val",
    fine_tune: bool = True,
    shard_size: int = 1000,
    ray_address: str | None = None,
    workers: int | None = None,
    force_rebuild: bool = False,
    steps: int | None = None,
    batch_size: int | None = None,
    crop_size: int | None = None,
    lr: float | None = None,
    device: str = "cpu",
    repeat_threshold: float | None = None,
    train_options: dict[str, Any] | None = None,
    config: Path | None = None,
) -> dict[str, Any]:
    """Rebuild, train, evaluate and maybe promote; returns the decision and both scores.

    ``splits`` as for ``dataset-rebuild`` (must include ``train_split`` and ``val_split``);
    ``repeat_threshold``: repeat-factor sampling in training (t; off when None).
    ``train_options``: further ``train`` flow parameters (e.g. ``{"head": "softmax"}``).
    ``config``: a recipe file (``configs/*.yaml``) for the train stage; ``steps``,
    ``batch_size``, ``crop_size``, ``lr`` and ``train_options`` override it where given (None:
    the recipe's, else the trainer's default); ``device`` is every stage's.
    ``fine_tune=False`` trains from scratch (``backbone_weights`` in ``train_options`` still
    apply).
    """
    notes: list[str] = []
    if config is not None:
        read_recipe(config)  # a bad recipe fails now, not after the rebuild
    rebuild = dataset_rebuild(splits=splits, images=images, out=shards, shard_size=shard_size,
                              ray_address=ray_address, workers=workers, force=force_rebuild)
    train_shards, val_shards = Path(shards) / train_split, Path(shards) / val_split
    current = current_model_task(Path(models))
    compatible = current is not None and class_table_matches(current.checkpoint, train_shards)
    if current is not None and not compatible:
        notes.append(f"current model v{current.version:04d} was trained on another class table: "
                     "it cannot be fine-tuned or scored on today's data")
    init = current.checkpoint if fine_tune and compatible else None
    if fine_tune and init is None:
        notes.append("no compatible current model: trained from scratch")
    run_dir = Path(runs) / f"retrain-{flow_run_label()}"
    options = {"steps": steps, "batch_size": batch_size, "crop_size": crop_size, "lr": lr,
               "device": device, "repeat_threshold": repeat_threshold, **(train_options or {})}
    trained = train_flow(shards=train_shards, val_shards=val_shards, out=run_dir,
                         init_checkpoint=init, config=config, **options)
    new_eval = evaluate_flow(checkpoint=Path(trained["checkpoint"]), shards=val_shards,
                             out=run_dir / "eval-new", device=device,
                             artifact_key="evaluation-new-model")
    current_eval = None
    if compatible:
        current_eval = evaluate_flow(checkpoint=current.checkpoint, shards=val_shards,
                                     out=run_dir / "eval-current", device=device,
                                     artifact_key="evaluation-current-model")
    new_miou = _score(new_eval)
    current_miou = _score(current_eval) if current_eval is not None else None
    decision = promote_task(Path(models), Path(trained["checkpoint"]), new_miou=new_miou,
                            current_miou=current_miou, metadata={
                                "run_dir": str(run_dir), "flow_run": flow_run_label(),
                                "fine_tuned_from": str(init) if init else None,
                                "step": trained["step"]})
    create_markdown_artifact(key="retrain-decision",
                             markdown=decision_markdown(decision, notes=notes, rebuild=rebuild,
                                                        run_dir=str(run_dir)),
                             description="retrain: scores and promotion decision")
    print(decision.reason)
    return {
        "promoted": decision.promoted, "reason": decision.reason,
        "new_miou": new_miou, "current_miou": current_miou,
        "new_checkpoint": trained["checkpoint"], "run_dir": str(run_dir),
        "current_version": decision.current.version if decision.current else None,
        "current_checkpoint": str(decision.current.checkpoint) if decision.current else None,
        "notes": notes,
    }


def _score(evaluation: dict[str, Any]) -> float:
    """The val mIoU of an evaluate-flow result (NaN when undefined)."""
    value = evaluation.get("miou")
    return float("nan") if value is None else float(value)
