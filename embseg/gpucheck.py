"""``embseg gpu-check``: does training work on this CUDA device, and at what speed and memory?

Two parts, written as ``gpu_check.json`` and ``gpu_check.md`` with pass/fail lines:

1. ``demo``: the ``make demo`` training configuration (tiny backbone from scratch, synthetic
   data), both heads, trained on the device; each checkpoint is then evaluated on the device
   (bf16 autocast, the torch nearest-class search) and on the CPU (float32, the compiled CPU
   kernels). It passes when every step trains (the trainer stops at a non-finite loss) and
   the losses fall, the val mIoU reaches
   :data:`DEMO_MIN_MIOU`, and the two evaluations agree within :data:`MAX_MIOU_GAP`.
2. ``paper``: the paper's training setting through the real shard loader: DeepLabV3+
   ResNet-101 (random weights), output stride 16, batch 16, 513 x 513 crops, 1,289 synthetic
   classes (1,203 LVIS-like + 86 stuff), both heads: images/s of the training loop (loader
   included) and the peak CUDA memory. It passes when every step trains.

A head that stops (a non-finite loss, CUDA out of memory) is a failed check with the error and
the steps done, not a crash; the files are rewritten after every head.

``prepare`` writes the synthetic data and its shards (it needs Ray, so it runs where the
project is installed); ``run`` needs only torch, numpy, numba, Pillow, pyarrow, tqdm and
webdataset, so it also runs on a machine that lacks Ray and Prefect::

    embseg gpu-check prepare --data .gpucheck
    embseg gpu-check run --data .gpucheck --out benchmarks/out/gpu-check [--device cuda]
"""

from __future__ import annotations

import argparse
import json
import math
import shutil
import statistics
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

DEMO_MIN_MIOU = 0.05
"""The demo configuration reaches ~21% val mIoU on the CPU (chance: 0.08%); a device run
below 5% trains wrongly, whatever bf16 and nondeterministic kernels change."""

MAX_MIOU_GAP = 0.01
"""Device (bf16) and CPU (float32) evaluations of one checkpoint may differ on near-tie
pixels only: at most 1 point of val mIoU."""

HEADS = ("embedding", "softmax")
PARTS = ("demo", "paper")


@dataclass(frozen=True)
class DataSettings:
    """One synthetic dataset of the check (the ``synth`` options)."""

    images: int
    val_images: int
    lvis_classes: int
    size: int


@dataclass(frozen=True)
class CheckSettings:
    """Sizes of both parts; the defaults are the ones the check is meant to run at."""

    demo_data: DataSettings = DataSettings(images=160, val_images=40, lvis_classes=30, size=64)
    demo_train: tuple[tuple[str, Any], ...] = (
        ("embed_dim", 64), ("k", 25), ("steps", 160), ("batch_size", 16), ("crop_size", 48),
        ("lr", 0.3), ("num_workers", 1), ("seed", 0))
    """The ``pipeline`` flow's defaults, which ``make demo`` trains with (a test keeps them
    equal)."""
    paper_data: DataSettings = DataSettings(images=64, val_images=0, lvis_classes=1203,
                                            size=512)
    paper_train: tuple[tuple[str, Any], ...] = (
        ("backbone", "resnet101"), ("output_stride", 16), ("embed_dim", 32), ("k", 7),
        ("steps", 30), ("batch_size", 16), ("crop_size", 513), ("lr", 0.01),
        ("num_workers", 8), ("seed", 0))
    paper_warmup_steps: int = 5  # not in the images/s median: cuDNN autotuning, loader start


def prepare(data: Path, settings: CheckSettings = CheckSettings()) -> dict[str, Any]:
    """Synthetic data and train/val shards of both parts under ``data`` (needs Ray)."""
    from embseg.build import build_shards
    from embseg.raywork import ray_runtime
    from embseg.synth import generate_synthetic

    built: dict[str, Any] = {}
    with ray_runtime():  # one local Ray for the three builds (each would start its own)
        for part, sizes in (("demo", settings.demo_data), ("paper", settings.paper_data)):
            synthetic = generate_synthetic(data / part / "synthetic", images=sizes.images,
                                           val_images=sizes.val_images,
                                           lvis_classes=sizes.lvis_classes, seed=0,
                                           size=sizes.size)
            splits = [("train", synthetic.lvis_train, synthetic.stuff_train)]
            if sizes.val_images:
                splits.append(("val", synthetic.lvis_val, synthetic.stuff_val))
            for split, lvis, stuff in splits:
                report = build_shards(lvis=lvis, coco_stuff=[stuff],
                                      images=synthetic.images_root, out=data / part / split,
                                      split=split, shard_size=100, progress=False)
                built[f"{part}/{split}"] = report.n_ok
            shutil.rmtree(synthetic.images_root)  # the shards hold the images; travel light
    (data / "settings.json").write_text(json.dumps(asdict(settings), indent=2) + "\n")
    return built


def _train_rows(run_dir: Path) -> list[dict[str, Any]]:
    """The run's logged training steps (none where it stopped before logging one)."""
    from embseg.train import MetricsLog

    return [row for row in MetricsLog(run_dir / "metrics.jsonl").rows()
            if row.get("kind") == "train"]


@dataclass
class _HeadRun:
    """One head's training in the check: its logged rows, and how it ended."""

    rows: list[dict[str, Any]]
    peak_cuda_bytes: int | None
    seconds: float
    error: str | None  # the one-line error that stopped it (a non-finite loss, out of memory)


def _train(shards: Path, run_dir: Path, *, head: str, device: str,
           options: dict[str, Any]) -> _HeadRun:
    """Train one head. An error (the trainer stops at a non-finite loss; CUDA may run out of
    memory) is recorded with the steps done before it, not raised: it is a check's result."""
    import torch

    from embseg.errors import EmbsegError
    from embseg.train import TrainConfig, train

    cuda = torch.device(device) if device.startswith("cuda") else None
    config = TrainConfig(shards=shards, out=run_dir, head=head, device=device,
                         checkpoint_every=options["steps"], no_progress=True, **options)
    if cuda is not None:
        torch.cuda.reset_peak_memory_stats(cuda)
    started, error = time.perf_counter(), None
    try:
        train(config)
    except (EmbsegError, RuntimeError) as exc:  # RuntimeError: torch.OutOfMemoryError too
        error = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
    seconds = time.perf_counter() - started
    peak = torch.cuda.max_memory_allocated(cuda) if cuda is not None else None
    return _HeadRun(_train_rows(run_dir), peak, seconds, error)


def _falls(losses: list[float]) -> bool:
    """The mean of the last fifth of the losses is below that of the first fifth."""
    window = max(1, len(losses) // 5)
    return statistics.fmean(losses[-window:]) < statistics.fmean(losses[:window])


def _common(head: str, run: _HeadRun, steps: int) -> dict[str, Any]:
    """The fields of a head's row that both parts share."""
    losses = [row["loss"] for row in run.rows]
    return {"head": head, "steps_planned": steps, "steps": len(run.rows),
            "train_seconds": round(run.seconds, 2), "peak_cuda_bytes": run.peak_cuda_bytes,
            "error": run.error, "first_loss": losses[0] if losses else None,
            "last_loss": losses[-1] if losses else None,
            "trained": run.error is None and len(losses) == steps
            and all(math.isfinite(v) for v in losses), "losses": losses}


def _demo(data: Path, work: Path, rows: list[dict[str, Any]], *, device: str,
          settings: CheckSettings, save, log) -> None:
    """Part 1, both heads: train on ``device``, evaluate on it and on the CPU; each head's
    row is appended to ``rows`` and ``save()`` runs after it."""
    from embseg.evaluate import evaluate

    options = dict(settings.demo_train)
    for head in HEADS:
        run = _train(data / "demo" / "train", work / f"demo-{head}", head=head, device=device,
                     options=options)
        row = _common(head, run, options["steps"])
        row["loss_falls"] = row["trained"] and _falls(row["losses"])
        evaluations = {"device": None, "cpu": None}
        if row["trained"]:
            checkpoint = work / f"demo-{head}" / "last.pt"
            evaluations = {name: evaluate(checkpoint, data / "demo" / "val",
                                          device=where).summary()
                           for name, where in (("device", device), ("cpu", "cpu"))}
        for name, summary in evaluations.items():
            row[f"val_miou_{name}"] = summary and summary["miou"]
            row[f"val_pixel_accuracy_{name}"] = summary and summary["pixel_accuracy"]
        rows.append(row)
        save()
        log(f"demo   {head:9s} loss {_loss_span(row)}; val mIoU {_pct(row['val_miou_device'])} "
            f"on {device}, {_pct(row['val_miou_cpu'])} on cpu; {run.seconds:.1f} s"
            + (f"; stopped: {run.error}" if run.error else ""))


def _paper(data: Path, work: Path, rows: list[dict[str, Any]], *, device: str,
           settings: CheckSettings, save, log) -> None:
    """Part 2, both heads: the paper's setting through the loader; speed and memory (rows
    and ``save`` as in :func:`_demo`)."""
    from embseg.evaluate import shard_vocabulary

    classes = shard_vocabulary(data / "paper" / "train").num_classes
    options = dict(settings.paper_train)
    for head in HEADS:
        run = _train(data / "paper" / "train", work / f"paper-{head}", head=head,
                     device=device, options=options)
        rates = [r["images_per_second"] for r in run.rows[settings.paper_warmup_steps:]]
        row = {**_common(head, run, options["steps"]), "classes": classes,
               "backbone": options["backbone"], "batch": options["batch_size"],
               "crop_px": options["crop_size"],
               "images_per_second_median": statistics.median(rates) if rates else None,
               "images_per_second": [r["images_per_second"] for r in run.rows]}
        rows.append(row)
        save()
        log(f"paper  {head:9s} C={classes} {row['images_per_second_median'] or 0:.1f} "
            f"images/s, peak {_gib(run.peak_cuda_bytes)}, loss {_loss_span(row)}"
            + (f"; stopped: {run.error}" if run.error else ""))


def _trained_detail(row: dict[str, Any]) -> str:
    detail = f"{row['steps']}/{row['steps_planned']} steps, loss {_loss_span(row)}"
    return detail + (f"; stopped: {row['error']}" if row.get("error") else "")


def checks(result: dict[str, Any]) -> list[tuple[str, bool, str]]:
    """The pass/fail lines of a result: (name, passed, detail)."""
    out = []
    for row in result.get("demo", []):
        head = row["head"]
        gap = _gap(row["val_miou_device"], row["val_miou_cpu"])
        out += [(f"demo {head}: every step trained, losses finite and falling",
                 row["trained"] and row["loss_falls"], _trained_detail(row)),
                (f"demo {head}: val mIoU >= {100 * DEMO_MIN_MIOU:.0f}%",
                 (row["val_miou_device"] or 0) >= DEMO_MIN_MIOU, _pct(row["val_miou_device"])),
                (f"demo {head}: device and CPU evaluations within "
                 f"{100 * MAX_MIOU_GAP:.0f} point", gap is not None and gap <= MAX_MIOU_GAP,
                 f"{_pct(row['val_miou_device'])} vs {_pct(row['val_miou_cpu'])}")]
    for row in result.get("paper", []):
        out.append((f"paper {row['head']}: every step trained at C={row['classes']}, losses "
                    f"finite", row["trained"], _trained_detail(row)))
    return out


def to_markdown(result: dict[str, Any]) -> str:
    """The check as markdown: both parts' tables and the pass/fail lines."""
    lines = [f"# embseg gpu-check ({result['device']}, {result['date']})", ""]
    if result.get("demo"):
        lines += ["## Demo configuration, trained on the device", "",
                  "| head | steps | train s | loss first -> last | val mIoU device | "
                  "val mIoU CPU | pixel acc. device |", "|---|---:|---:|---|---:|---:|---:|"]
        lines += [f"| {r['head']} | {r['steps']} | {r['train_seconds']:.1f} | "
                  f"{_loss_span(r)} | "
                  f"{_pct(r['val_miou_device'])} | {_pct(r['val_miou_cpu'])} | "
                  f"{_pct(r['val_pixel_accuracy_device'])} |" for r in result["demo"]]
        lines.append("")
    if result.get("paper"):
        first = result["paper"][0]
        lines += [f"## Paper setting: {first['backbone']}, batch {first['batch']} x "
                  f"{first['crop_px']}², C = {first['classes']:,}, through the shard loader",
                  "", "| head | steps | images/s (median, loader included) | peak CUDA memory "
                  "| loss first -> last |", "|---|---:|---:|---:|---|"]
        lines += [f"| {r['head']} | {r['steps']} | "
                  f"{r['images_per_second_median'] or 0:.1f} | {_gib(r['peak_cuda_bytes'])} | "
                  f"{_loss_span(r)} |" for r in result["paper"]]
        lines.append("")
    lines += ["## Checks", ""]
    lines += [f"- {'PASS' if ok else 'FAIL'}: {name} ({detail})"
              for name, ok, detail in checks(result)]
    return "\n".join(lines) + "\n"


def run_check(data: Path, out: Path, *, device: str = "cuda", parts: tuple[str, ...] = PARTS,
              settings: CheckSettings | None = None, log=print) -> dict[str, Any]:
    """Run the chosen parts on ``device`` with the data of :func:`prepare`; write the JSON (with
    every step's loss) and the markdown after each head, so a run cut short keeps what it did."""
    from embseg.bench import device_name, software_versions
    from embseg.errors import EmbsegError
    from embseg.evaluate import resolve_device

    unknown = [part for part in parts if part not in PARTS]
    if unknown or not parts:
        raise EmbsegError(f"gpu-check --parts: unknown part(s) {', '.join(unknown) or '(none)'};"
                          f" choose from {', '.join(PARTS)}")
    missing = [str(data / part / "train") for part in parts
               if not (data / part / "train").is_dir()]
    if missing:
        raise EmbsegError(f"{missing[0]}: no shards here; run `embseg gpu-check prepare "
                          f"--data {data}` first")
    resolve_device(device)
    settings = settings or CheckSettings()
    out.mkdir(parents=True, exist_ok=True)
    result: dict[str, Any] = {"device": device_name("cuda" if device.startswith("cuda")
                                                    else "cpu"),
                              "date": time.strftime("%Y-%m-%d"),
                              "versions": software_versions(), "settings": asdict(settings)}

    def save() -> None:
        result["checks"] = [{"check": n, "passed": ok, "value": d} for n, ok, d in checks(result)]
        (out / "gpu_check.json").write_text(json.dumps(result, indent=2) + "\n")
        (out / "gpu_check.md").write_text(to_markdown(result))

    with tempfile.TemporaryDirectory(prefix="embseg-gpu-check-") as tmp:
        for part, runner in zip(PARTS, (_demo, _paper), strict=True):
            if part in parts:
                result[part] = []
                runner(data, Path(tmp), result[part], device=device, settings=settings,
                       save=save, log=log)
    return result


def cli_gpu_check(args: argparse.Namespace) -> int:
    """``embseg gpu-check prepare|run``; ``run`` exits 1 when a check fails."""
    if args.action == "prepare":
        built = prepare(args.data)
        print(f"gpu-check data in {args.data}: " + ", ".join(f"{k} {v} images"
                                                             for k, v in built.items()))
        return 0
    parts = tuple(part.strip() for part in args.parts.split(",") if part.strip())
    result = run_check(args.data, args.out, device=args.device, parts=parts)
    print()
    print(to_markdown(result))
    return 0 if all(item["passed"] for item in result["checks"]) else 1


def _gap(a: float | None, b: float | None) -> float | None:
    return None if a is None or b is None else abs(a - b)


def _pct(value: float | None) -> str:
    return "n/a" if value is None else f"{100 * value:.2f}%"


def _loss_span(row: dict[str, Any]) -> str:
    if row["first_loss"] is None:
        return "-"
    return f"{row['first_loss']:.3f} -> {row['last_loss']:.3f}"


def _gib(value: int | None) -> str:
    return "-" if value is None else f"{value / 2**30:.2f} GiB"
