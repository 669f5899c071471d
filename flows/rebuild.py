"""``dataset-rebuild``: annotation files + images -> WebDataset shards, one folder per split.

Stages (Prefect tasks): ``vocabulary`` (merge the category lists, fail early on bad files),
``plan`` per split (parse annotations, list images, hash the inputs: ``embseg.build.plan_build``),
``build-shards`` (paint and pack on Ray: ``embseg.build.execute_plan``, local or on a cluster
via ``ray_address``), ``manifest-report`` (counts, shard sizes, classes by pixel frequency from
``manifest.parquet``, published as a markdown artifact).

A split whose input hash equals the hash of its last completed build
(``embseg.build.last_build_hash``) is reported "up to date" and not rebuilt, unless ``force``.
Shards go to ``<out>/<split>/<split>-NNNNNN.tar`` with ``classes.parquet``,
``manifest.parquet`` and ``build_info.json`` beside them.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pyarrow.parquet as pq
from prefect import flow, get_run_logger, task
from prefect.artifacts import create_markdown_artifact
from prefect.cache_policies import NO_CACHE
from pydantic import BaseModel, Field

from embseg.build import (
    BuildPlan,
    BuildReport,
    ImageFailuresError,
    execute_plan,
    last_build_hash,
    plan_build,
)
from embseg.errors import EmbsegError
from embseg.raywork import ray_runtime
from embseg.vocab import Vocabulary, build_vocabulary, summary_line
from flows._common import markdown_table, retry_unless_bad_input

HEAD_TAIL_CLASSES = 10


class SplitSource(BaseModel):
    """The annotation files of one split (``split`` names the output folder and shard files)."""

    split: str = Field(description="split name, e.g. train or val")
    lvis: Path = Field(description="LVIS v1 annotation file of the split")
    coco_stuff: list[Path] = Field(default_factory=list,
                                   description="COCO-Stuff annotation file(s) of the split")


@task(name="vocabulary", cache_policy=NO_CACHE)
def vocabulary_task(source: SplitSource) -> Vocabulary:
    """The merged vocabulary of one split's files (every split must yield the same one)."""
    vocab = build_vocabulary(source.lvis, list(source.coco_stuff))
    get_run_logger().info("vocabulary: %s", summary_line(vocab))
    return vocab


@task(name="plan", cache_policy=NO_CACHE, retries=1, retry_delay_seconds=2,
      retry_condition_fn=retry_unless_bad_input)
def plan_task(source: SplitSource, *, images: Path, out: Path, shard_size: int,
              overlap: str) -> BuildPlan:
    """Parse the split's annotations, list its images and hash the inputs (nothing written)."""
    plan = plan_build(lvis=source.lvis, coco_stuff=list(source.coco_stuff), images=images,
                      out=out, split=source.split, shard_size=shard_size, overlap=overlap)
    get_run_logger().info("plan %s: %d images in %d shards, input hash %s", source.split,
                          plan.n_images, len(plan.shards), plan.input_hash[:16])
    return plan


@task(name="build-shards", cache_policy=NO_CACHE, retries=2, retry_delay_seconds=5,
      retry_condition_fn=retry_unless_bad_input)
def build_shards_task(plans: list[BuildPlan], *, workers: int | None,
                      ray_address: str | None) -> dict[str, BuildReport]:
    """Paint the label maps and write the shards of every plan on one Ray session.

    Ray is started (or joined) once for all splits; a retry starts it afresh and reuses the
    shards that were finished before the failure.
    """
    logger = get_run_logger()
    reports: dict[str, BuildReport] = {}
    with ray_runtime(workers=workers, ray_address=ray_address) as runtime:
        logger.info("Ray: %d CPUs on %d node(s) (%s)", runtime.cpus, runtime.nodes,
                    runtime.address or ("local" if runtime.started_here else "already running"))
        for plan in plans:
            reports[plan.split] = execute_plan(plan, workers=workers, ray_address=ray_address,
                                               progress=False)
            logger.info(reports[plan.split].summary())
    return reports


@task(name="manifest-report", cache_policy=NO_CACHE, retries=1, retry_delay_seconds=2)
def manifest_report_task(out: Path, split: str, *, status: str, input_hash: str,
                         report: BuildReport | None) -> dict[str, Any]:
    """Summarise ``manifest.parquet`` for the split and publish it as a markdown artifact."""
    summary = summarize_manifest(out, split)
    summary.update(status=status, input_hash=input_hash, out=str(out))
    if report is not None:
        summary.update(seconds=round(report.seconds, 2),
                       images_per_second=round(report.images_per_second, 2),
                       reused_shards=report.reused_shards)
    create_markdown_artifact(key=f"dataset-{_artifact_slug(split)}",
                             markdown=manifest_markdown(summary),
                             description=f"dataset-rebuild: split {split} ({status})")
    return summary


def summarize_manifest(out: Path, split: str) -> dict[str, Any]:
    """Counts by status, shard files and sizes, and classes by pixel frequency for one split."""
    table = pq.read_table(Path(out) / "manifest.parquet",
                          filters=[("split", "=", split)],
                          columns=["status", "reason", "shard", "class_ids", "pixel_counts"])
    rows = table.to_pylist()
    counts = {name: sum(row["status"] == name for row in rows) for name in ("ok", "skipped", "failed")}
    pixels: dict[int, int] = {}
    for row in rows:
        for class_id, count in zip(row["class_ids"] or [], row["pixel_counts"] or [], strict=True):
            pixels[class_id] = pixels.get(class_id, 0) + count
    vocab = Vocabulary.read_parquet(Path(out) / "classes.parquet")
    names = vocab.names
    ranked = sorted(((count, class_id) for class_id, count in pixels.items() if class_id > 0),
                    key=lambda pair: (-pair[0], pair[1]))
    total = sum(count for count, _ in ranked) or 1
    classes = [{"id": class_id, "name": names[class_id - 1], "pixels": count,
                "share": count / total} for count, class_id in ranked]
    shards = sorted(Path(out).glob(f"{split}-[0-9][0-9][0-9][0-9][0-9][0-9].tar"))
    reasons: dict[str, int] = {}
    for row in rows:
        if row["status"] != "ok":
            reasons[row["reason"] or "?"] = reasons.get(row["reason"] or "?", 0) + 1
    return {
        "split": split, "n_images": len(rows), **{f"n_{k}": v for k, v in counts.items()},
        "shards": [{"name": p.name, "bytes": p.stat().st_size} for p in shards],
        "num_classes": vocab.num_classes, "classes_present": len(classes),
        "unlabeled_pixels": pixels.get(0, 0),
        "head_classes": classes[:HEAD_TAIL_CLASSES],
        "tail_classes": classes[-HEAD_TAIL_CLASSES:][::-1] if len(classes) > HEAD_TAIL_CLASSES
        else [],
        "problems": dict(sorted(reasons.items(), key=lambda kv: -kv[1])[:10]),
    }


def manifest_markdown(summary: dict[str, Any]) -> str:
    """The dataset artifact: what happened, counts, shards, head and tail classes."""
    lines = [f"# Dataset split `{summary['split']}`: {summary['status']}", "",
             f"Folder `{summary['out']}`, input hash `{summary['input_hash'][:16]}`."]
    if "seconds" in summary:
        lines.append(f"Built in {summary['seconds']} s ({summary['images_per_second']} images/s), "
                     f"{summary['reused_shards']} shard(s) reused.")
    lines += ["", markdown_table(["images", "ok", "skipped", "failed"],
                                 [[summary["n_images"], summary["n_ok"], summary["n_skipped"],
                                   summary["n_failed"]]])]
    if summary["problems"]:
        lines += ["", "## Skipped / failed images (by reason)", "",
                  markdown_table(["reason", "images"], list(summary["problems"].items()))]
    shard_bytes = [s["bytes"] for s in summary["shards"]]
    lines += ["", f"## Shards: {len(shard_bytes)}, {sum(shard_bytes) / 1e6:.2f} MB in total", "",
              markdown_table(["shard", "MB"],
                             [[s["name"], f"{s['bytes'] / 1e6:.2f}"] for s in summary["shards"]])]
    lines += ["", f"## Classes by pixel frequency ({summary['classes_present']} of "
                  f"{summary['num_classes']} present)", "", "Head (most pixels):", "",
              _class_table(summary["head_classes"])]
    if summary["tail_classes"]:
        lines += ["", "Tail (fewest pixels, among present classes):", "",
                  _class_table(summary["tail_classes"])]
    return "\n".join(lines)


def _class_table(classes: list[dict[str, Any]]) -> str:
    return markdown_table(["class", "id", "pixels", "share"],
                          [[c["name"], c["id"], c["pixels"], f"{100 * c['share']:.2f}%"]
                           for c in classes])


def _artifact_slug(text: str) -> str:
    """Artifact keys allow lowercase letters, digits and dashes only."""
    slug = "".join(ch if ch.isalnum() else "-" for ch in text.lower()).strip("-")
    return slug or "split"


def _up_to_date(plan: BuildPlan, out: Path, *, force: bool) -> bool:
    return not force and last_build_hash(out, plan.split) == plan.input_hash


def _check_same_vocabulary(plan: BuildPlan, vocab: Vocabulary, reference: SplitSource) -> None:
    """Every split must share the vocabulary: a model is only scored on its own class table."""
    if plan.vocab.content_hash() != vocab.content_hash():
        raise EmbsegError(f"{plan.source_files[0]}: split {plan.split!r} gives a different "
                          f"vocabulary ({plan.vocab.num_classes} classes) than "
                          f"{reference.lvis} ({vocab.num_classes} classes)")


@flow(name="dataset-rebuild", log_prints=True)
def dataset_rebuild(
    splits: list[SplitSource],
    images: Path,
    out: Path = Path("shards"),
    shard_size: int = 1000,
    ray_address: str | None = None,
    workers: int | None = None,
    force: bool = False,
    overlap: str = "first",
    allow_failures: bool = False,
) -> dict[str, dict[str, Any]]:
    """Build (or confirm up to date) the shards of every split; returns a summary per split.

    ``splits``: ``[{"split": "train", "lvis": ".../lvis_v1_train.json", "coco_stuff":
    [".../stuff_train2017.json"]}, ...]``; each split is written to ``<out>/<split>``.
    ``ray_address`` runs the painting on an existing Ray cluster (``auto`` or
    ``ray://host:10001``); otherwise a local Ray with ``workers`` CPUs (default: all) is used.
    Images that fail are recorded in the manifest; unless ``allow_failures`` the run then fails
    after publishing its report.
    """
    if not splits:
        raise EmbsegError("dataset-rebuild: no splits given")
    names = [s.split for s in splits]
    if len(set(names)) != len(names):
        raise EmbsegError(f"dataset-rebuild: split names repeat: {names}")
    vocab = vocabulary_task(splits[0])
    outs = {source.split: Path(out) / source.split for source in splits}
    plans: dict[str, BuildPlan] = {}
    for source in splits:
        plans[source.split] = plan_task(source, images=Path(images), out=outs[source.split],
                                        shard_size=shard_size, overlap=overlap)
        _check_same_vocabulary(plans[source.split], vocab, splits[0])
    stale = [plan for plan in plans.values() if not _up_to_date(plan, plan.out, force=force)]
    for name in sorted(plans.keys() - {plan.split for plan in stale}):
        print(f"{name}: up to date (input hash {plans[name].input_hash[:16]}), not rebuilt")
    reports = build_shards_task(stale, workers=workers, ray_address=ray_address) if stale else {}
    results: dict[str, dict[str, Any]] = {}
    for name, plan in plans.items():
        report = reports.get(name)
        results[name] = manifest_report_task(
            plan.out, name, status="rebuilt" if report else "up to date",
            input_hash=plan.input_hash, report=report)
        if report is not None:
            print(report.summary())
    failed = [report for report in reports.values() if report.n_failed]
    if failed and not allow_failures:
        raise ImageFailuresError(failed[0])
    return results

