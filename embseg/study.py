"""``embseg study``: the paper's claim in miniature, ESS against softmax as the class count grows.

Both heads are trained on the built-in synthetic data (generated and built here, cached by
its settings) at a ladder of class counts, default C = 150 (64 LVIS-like + 86 stuff) and
C = 1,289 (1,203 LVIS-like classes in LVIS v1's rare/common/frequent proportions + 86 stuff),
plus ESS alone at a count where softmax does not fit ESS's memory (default 10,000). Two
comparisons per class count:

- ``equal_steps``: both heads get the same steps, batch and crop;
- ``equal_memory``: ESS's peak training-step memory at that C is measured, and softmax gets
  the largest batch and crop whose peak fits in it (:func:`memory_matched_setting`); the step
  count stays the same (softmax sees fewer pixels, as a user with one fixed GPU would).

The ESS run is the reference of both comparisons and is recorded under both. At the
repeat-factor class counts (default 1,289) ESS also trains with repeat-factor sampling (the
threshold scaled to the synthetic set: :func:`scaled_repeat_threshold`).

Every training run and every memory probe runs in a process of its own (on CPU forked from a
server that has imported torch once, :mod:`embseg.forkserver`; on CUDA a fresh interpreter):
a run's memory never inflates another's, and the orchestrating process never runs torch
itself. A probe is a few training steps of the run's model on random input: on CUDA
``max_memory_allocated``; on CPU the growth of the process's resident anonymous memory (peak
RSS, VmHWM, minus resident mapped-file pages, against the same figure before the model was
built), with glibc's allocator set as ``embseg bench`` sets it (freed blocks go back to the
system, so the peak is what the step holds) and the CPU loss kernels compiled beforehand for
both heads (a fixed cost, not training-step memory).

Outputs under ``--out`` (all three rewritten after every run, so a study cut short keeps what
it measured): ``study.json`` (``{"device", "runs": [...], "goals": [...]}`` plus the settings,
the memory searches and the failures), ``study.md`` and ``study.png``.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import os
import platform
import resource
import shutil
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

from embseg.errors import EmbsegError
from embseg.fileio import write_bytes_atomically, write_text_atomically
from embseg.forkserver import ForkServer, ForkServerExited

LVIS_V1_GROUP_SIZES = {"f": 405, "c": 461, "r": 337}
"""Frequent / common / rare category counts of LVIS v1 (1,203 categories)."""

LVIS_REPEAT_THRESHOLD = 0.001
"""LVIS's usual repeat-factor threshold t (Gupta et al., 2019)."""

STUFF_CLASSES = 86
"""Merged classes the synthetic COCO-Stuff adds: 91 stuff categories, 5 of them named like an
LVIS class (merged into it) once there are more than 15 LVIS classes (embseg.synth)."""

MIN_LVIS_CLASSES = 16

HEAD_NAMES = {"embedding": "ess", "softmax": "softmax"}
COMPARISONS = ("equal_steps", "equal_memory")
GROUPS = ("rare", "common", "frequent", "stuff")
SMALL_GOAL_RATIO = 0.95
RATIO_FLOOR = 1e-9
"""Denominator floor of the small-C ratio when softmax's mIoU is 0."""

FROM_SCRATCH_OPTIONS = {"lr": 0.05, "backbone_lr_mult": 1.0, "dropout": 0.0}
"""Trainer options both heads get here: the backbone trains from random weights (the 0.1
backbone multiplier and the ASPP dropout of 0.5 protect pretrained weights and slow a short
run from scratch down: benchmarks/README.md, 'Training on synthetic data')."""

PROBE_ENV = {"MALLOC_MMAP_THRESHOLD_": "65536", "MALLOC_ARENA_MAX": "1",
             "OMP_WAIT_POLICY": "PASSIVE"}
"""Environment of every probe and run (embseg bench's point environment, same reasons)."""

PROBE_STEPS = 2  # SGD's momentum buffers exist from the second step on


@dataclass(frozen=True)
class StudySizes:
    """Data and training sizes of one study (``--quick`` or the GPU sizes)."""

    images: int
    val_images: int
    image_size: int
    steps: int
    batch_size: int
    crop_size: int
    backbone: str
    num_workers: int
    classes: tuple[int, ...] = (150, 1289)
    ess_only_classes: tuple[int, ...] = (10_000,)
    rfs_classes: tuple[int, ...] = (1289,)
    seeds: int = 2


QUICK = StudySizes(images=1600, val_images=200, image_size=128, steps=300, batch_size=8,
                   crop_size=64, backbone="tiny", num_workers=1)
"""A CPU study (2 cores, about 25 minutes): the tiny backbone from scratch on 128 px images."""

GPU = StudySizes(images=8000, val_images=1000, image_size=256, steps=4000, batch_size=16,
                 crop_size=192, backbone="resnet50", num_workers=8)
"""The sizes for one GPU (not run yet: no GPU has been lent to this project)."""


# --------------------------------------------------------------------------- data


def lvis_like_categories(count: int) -> list[dict[str, Any]]:
    """``count`` LVIS-style categories whose r/c/f split has LVIS v1's proportions.

    Largest-remainder rounding of 405 : 461 : 337 (f : c : r), at least one class per group.
    Given to :func:`embseg.synth.generate_synthetic` as ``categories``, the frequent classes
    get the commonest occurrence ranks, then the common, then the rare ones.
    """
    if count < 3:
        raise EmbsegError(f"study: {count} LVIS-like classes cannot fill the r/c/f groups")
    total = sum(LVIS_V1_GROUP_SIZES.values())
    exact = {g: count * n / total for g, n in LVIS_V1_GROUP_SIZES.items()}
    sizes = {g: math.floor(v) for g, v in exact.items()}
    for g in sorted(exact, key=lambda g: exact[g] - sizes[g], reverse=True)[:count - sum(sizes.values())]:
        sizes[g] += 1
    for g in sizes:  # every group non-empty (only matters below ~8 classes)
        if sizes[g] == 0:
            sizes[max(sizes, key=sizes.get)] -= 1
            sizes[g] = 1
    frequencies = [g for g in ("f", "c", "r") for _ in range(sizes[g])]
    return [{"id": i, "name": f"thing_{i:05d}", "synonyms": [f"thing_{i:05d}"],
             "synset": f"thing_{i:05d}.n.01", "def": f"synthetic object class {i}",
             "frequency": frequency}
            for i, frequency in enumerate(frequencies, start=1)]


@dataclass(frozen=True)
class DataSpec:
    """One synthetic dataset of the study: its class count and the synth settings."""

    classes: int
    images: int
    val_images: int
    image_size: int
    seed: int

    @property
    def lvis_classes(self) -> int:
        return self.classes - STUFF_CLASSES

    def key(self) -> str:
        record = {**asdict(self), "categories": "lvis-v1-proportions", "stuff": STUFF_CLASSES}
        digest = hashlib.sha256(json.dumps(record, sort_keys=True).encode()).hexdigest()
        return f"data-c{self.classes}-{digest[:12]}"


@dataclass(frozen=True)
class StudyData:
    """Built shards of one class count and the repeat threshold scaled to them."""

    classes: int
    train: Path
    val: Path
    repeat_threshold: float
    train_images: int


def check_classes(classes: int) -> None:
    """EmbsegError unless the synthetic data can have exactly ``classes`` merged classes."""
    if classes - STUFF_CLASSES < MIN_LVIS_CLASSES:
        raise EmbsegError(f"--classes {classes}: the synthetic data has {STUFF_CLASSES} stuff "
                          f"classes and needs at least {MIN_LVIS_CLASSES} LVIS-like ones "
                          f"(C >= {STUFF_CLASSES + MIN_LVIS_CLASSES})")


def scaled_repeat_threshold(lvis_train: Path, frequent_classes: int) -> float:
    """LVIS's t = 0.001, moved to the same place in the synthetic set's class frequencies.

    In LVIS v1, t = 0.001 is the common/frequent boundary: a frequent class is in more than
    100 of ~100k training images, so the classes with f(c) < t that get repeated are the
    rare and common ones. The synthetic set has far fewer images, so its boundary is at a
    larger fraction: t here is the image fraction f(c) of the least frequent of the
    ``frequent_classes`` most frequent LVIS-like classes (by training image count, from the
    LVIS file's ``image_count``), so the same share of classes gets repeated.
    """
    data = json.loads(Path(lvis_train).read_text())
    counts = sorted((int(c.get("image_count", 0)) for c in data["categories"]), reverse=True)
    n_images = max(1, len(data["images"]))
    index = max(0, min(len(counts), frequent_classes) - 1)
    return max(counts[index], 1) / n_images


def prepare_data(specs: Sequence[DataSpec], work: Path, log: Callable[[str], None]
                 ) -> dict[int, StudyData]:
    """Synthetic data and train/val shards per spec, cached under ``work`` by the settings.

    Missing datasets are generated and built on one local Ray; the rendered images are
    deleted afterwards (the shards hold them).
    """
    from embseg.synth import generate_synthetic

    ready: dict[int, StudyData] = {}
    missing = []
    for spec in specs:
        folder = Path(work) / spec.key()
        if (folder / "ready.json").is_file():
            ready[spec.classes] = _study_data(spec, folder)
        else:
            missing.append((spec, folder))
    if not missing:
        return ready
    from embseg.build import build_shards
    from embseg.raywork import ray_runtime

    with ray_runtime():  # one local Ray for every build (each would start its own)
        for spec, folder in missing:
            started = time.perf_counter()
            if folder.exists():
                shutil.rmtree(folder)  # a build cut short: start it again
            folder.mkdir(parents=True)
            categories = folder / "categories.json"
            write_text_atomically(categories, json.dumps(lvis_like_categories(spec.lvis_classes)))
            synthetic = generate_synthetic(folder / "synthetic", images=spec.images,
                                           val_images=spec.val_images,
                                           lvis_classes=spec.lvis_classes, seed=spec.seed,
                                           categories=categories, size=spec.image_size)
            shutil.copy(synthetic.lvis_train, folder / "lvis_v1_train.json")
            for split, lvis, stuff in (("train", synthetic.lvis_train, synthetic.stuff_train),
                                       ("val", synthetic.lvis_val, synthetic.stuff_val)):
                build_shards(lvis=lvis, coco_stuff=[stuff], images=synthetic.images_root,
                             out=folder / split, split=split, progress=False,
                             allow_failures=False)
            shutil.rmtree(folder / "synthetic")
            write_text_atomically(folder / "ready.json", json.dumps(asdict(spec)) + "\n")
            ready[spec.classes] = _study_data(spec, folder)
            log(f"data C={spec.classes}: {spec.images} train + {spec.val_images} val images "
                f"of {spec.image_size} px in {time.perf_counter() - started:.0f} s ({folder})")
    return ready


def _study_data(spec: DataSpec, folder: Path) -> StudyData:
    frequent = lvis_like_categories(spec.lvis_classes)
    n_frequent = sum(c["frequency"] == "f" for c in frequent)
    return StudyData(classes=spec.classes, train=folder / "train", val=folder / "val",
                     repeat_threshold=scaled_repeat_threshold(folder / "lvis_v1_train.json",
                                                              n_frequent),
                     train_images=spec.images)


# --------------------------------------------------------------------------- memory matching


@dataclass
class Probe:
    """One measured (batch, crop) point of a memory search."""

    batch: int
    crop: int
    peak_bytes: int | None  # None: did not run (out of memory)
    fits: bool


@dataclass
class MatchedSetting:
    """The largest setting found within the budget (None: nothing fits) and every probe."""

    budget_bytes: int
    batch: int | None
    crop: int | None
    peak_bytes: int | None
    probes: list[Probe] = field(default_factory=list)


def candidate_crops(crop: int, *, step: int = 8, min_fraction: float = 0.5,
                    min_crop: int = 32) -> list[int]:
    """Crops to try, largest first: ``crop``, then the multiples of ``step`` down to
    ``min_fraction * crop`` (and not below ``min_crop``).

    Below half the reference crop a softmax run no longer sees the objects at the scale the
    other head does, so smaller crops count as not fitting; ``min_crop`` is two output
    strides (a 1 x 1 feature map of one image has no batch statistics).
    """
    smallest = max(step, min_crop, math.ceil(crop * min_fraction))
    return [crop, *(c for c in range(crop - 1, smallest - 1, -1) if c % step == 0)]


def memory_matched_setting(measure: Callable[[int, int], int | None], budget: int, *,
                           max_batch: int, crops: Sequence[int]) -> MatchedSetting:
    """The (batch, crop) with the most pixels per step, ``batch * crop**2``, whose measured
    peak is at most ``budget``; ties go to the larger crop.

    ``measure(batch, crop)`` returns the peak bytes (None when it ran out of memory). The
    peak is taken to grow with the batch at a fixed crop: per crop (largest first) the
    largest batch <= ``max_batch`` that fits is found by doubling from 1 and then bisecting,
    so no probe is much larger than the budget; crops that cannot beat the best found so far
    even at ``max_batch`` are not probed.
    """
    result = MatchedSetting(budget_bytes=int(budget), batch=None, crop=None, peak_bytes=None)
    peaks: dict[tuple[int, int], int | None] = {}

    def fits(batch: int, crop: int) -> bool:
        if (batch, crop) not in peaks:
            peak = measure(batch, crop)
            peaks[(batch, crop)] = peak
            result.probes.append(Probe(batch=batch, crop=crop, peak_bytes=peak,
                                       fits=peak is not None and peak <= budget))
        peak = peaks[(batch, crop)]
        return peak is not None and peak <= budget

    best_pixels = 0
    for crop in sorted(set(crops), reverse=True):
        if max_batch * crop * crop <= best_pixels or not fits(1, crop):
            continue
        good, bad = 1, None
        while bad is None and good < max_batch:  # double until it no longer fits
            trial = min(max_batch, good * 2)
            if fits(trial, crop):
                good = trial
            else:
                bad = trial
        while bad is not None and bad - good > 1:
            middle = (good + bad) // 2
            if fits(middle, crop):
                good = middle
            else:
                bad = middle
        if good * crop * crop > best_pixels:
            best_pixels = good * crop * crop
            result.batch, result.crop, result.peak_bytes = good, crop, peaks[(good, crop)]
    return result


# --------------------------------------------------------------------------- jobs (subprocesses)


def _status_bytes(name: str) -> int | None:
    try:
        with open("/proc/self/status") as status:
            for line in status:
                if line.startswith(f"{name}:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        return None
    return None


def _anonymous_bytes(total_field: str) -> int:
    """``total_field`` (VmRSS or VmHWM) minus the resident mapped-file pages (RssFile)."""
    total = _status_bytes(total_field)
    if total is None:  # no /proc: ru_maxrss (KiB on Linux) stands in
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    return total - (_status_bytes("RssFile") or 0)


def _model_options(job: dict[str, Any]) -> dict[str, Any]:
    """build_model's arguments of a job (the trainer's, from the job's train options)."""
    options = job["options"]
    return {"backbone": job["backbone"], "head": job["head"], "num_classes": job["classes"],
            "embed_dim": options["embed_dim"], "output_stride": options["output_stride"],
            "k": options["k"], "temperature": options["temperature"],
            "margin": options["margin"], "embed_bn": options["embed_bn"],
            "dropout": options["dropout"]}


def _probe_job(job: dict[str, Any]) -> dict[str, Any]:
    """Peak memory of ``PROBE_STEPS`` training steps of the job's model on random input."""
    import torch

    from embseg import ess
    from embseg.models import build_model
    from embseg.train import MOMENTUM, WEIGHT_DECAY

    device = torch.device(job["device"])
    options = job["options"]
    if device.type == "cpu":  # compile/load the loss kernels first, for both heads alike
        warm = torch.nn.functional.normalize(torch.randn(1, 4, 2, 2), dim=1)
        ess.ess_loss(warm, torch.zeros(1, 2, 2, dtype=torch.long),
                     torch.nn.functional.normalize(torch.randn(3, 4), dim=1), k=1,
                     temperature=1.0)
        base = _anonymous_bytes("VmRSS")
    else:
        torch.cuda.reset_peak_memory_stats(device)
        base = torch.cuda.memory_allocated(device)
    torch.manual_seed(0)
    model = build_model(**_model_options(job)).to(device)
    groups = model.param_groups(options["lr"], backbone_lr_mult=options["backbone_lr_mult"],
                                class_lr_mult=options["class_lr_mult"])
    optimizer = torch.optim.SGD(groups, lr=options["lr"], momentum=MOMENTUM,
                                weight_decay=WEIGHT_DECAY)
    batch, crop = job["batch_size"], job["crop_size"]
    images = torch.randn(batch, 3, crop, crop, device=device)
    target = torch.randint(0, job["classes"], (batch, crop, crop), device=device)
    for _ in range(PROBE_STEPS):
        with torch.autocast(device_type=device.type, dtype=torch.bfloat16,
                            enabled=device.type == "cuda"):
            output = model(images)
        loss, _ = model.loss(output, target)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
    if device.type == "cuda":
        peak = torch.cuda.max_memory_allocated(device) - base
    else:
        peak = _anonymous_bytes("VmHWM") - base
    return {"peak_bytes": int(peak)}


def _train_job(job: dict[str, Any]) -> dict[str, Any]:
    """Train one run, evaluate it on the val shards; its figures."""
    from embseg.train import MetricsLog, TrainConfig, train

    options = dict(job["options"])
    if job.get("repeat_threshold") is not None:
        options["repeat_threshold"] = job["repeat_threshold"]
    run_dir = Path(job["run_dir"])
    if run_dir.exists():
        shutil.rmtree(run_dir)  # a run cut short is redone from the start
    config = TrainConfig(shards=Path(job["train"]), val_shards=Path(job["val"]), out=run_dir,
                         head=job["head"], backbone=job["backbone"], steps=job["steps"],
                         batch_size=job["batch_size"], crop_size=job["crop_size"],
                         seed=job["seed"], device=job["device"],
                         num_workers=job["num_workers"], checkpoint_every=job["steps"],
                         no_progress=True, **options)
    started = time.perf_counter()
    train(config)
    seconds = time.perf_counter() - started
    rows = MetricsLog(run_dir / "metrics.jsonl").rows()
    evaluation = [row for row in rows if row.get("kind") == "eval"][-1]
    speeds = [row["images_per_second"] for row in rows if row.get("kind") == "train"]
    for checkpoint in run_dir.glob("*.pt"):
        checkpoint.unlink()  # the figures are what the study keeps
    groups = evaluation.get("val_group_miou") or {}
    return {"val_miou": evaluation["val_miou"], "pixel_accuracy": evaluation["val_pixel_accuracy"],
            "group_miou": {name: groups.get(name) for name in GROUPS}, "seconds": seconds,
            "images_per_second": statistics.median(speeds) if speeds else None}


JOB_PRELOAD = ("torch", "embseg.models", "embseg.train", "embseg.evaluate")
"""What the CPU job server imports once for every probe and run it forks."""


def _job_child(request: str) -> None:
    """Job process entry: ``request`` is JSON ``{"job", "result"}``; run the job and write its
    JSON result to the ``result`` path."""
    payload = json.loads(request)
    job = payload["job"]
    result = {"probe": _probe_job, "train": _train_job}[job["kind"]](job)
    write_text_atomically(Path(payload["result"]), json.dumps(result))


class JobError(EmbsegError):
    """A probe or training run ended with an error."""


def job_server() -> ForkServer:
    """The server CPU probes and runs are forked from (the study's allocator environment)."""
    return ForkServer("embseg.study:_job_child", preload=JOB_PRELOAD, env=PROBE_ENV)


def run_job(job: dict[str, Any], work: Path, server: ForkServer | None = None
            ) -> dict[str, Any]:
    """Run one job in a process of its own and return its result: forked from ``server``
    when given, else a fresh interpreter. JobError on failure; a probe that runs out of
    memory returns a null peak."""
    result_path = Path(work) / f".job-{os.getpid()}.json"
    result_path.unlink(missing_ok=True)
    request = json.dumps({"job": job, "result": str(result_path)})
    if server is not None:
        returncode, stderr = _forked(server, request)
    else:
        code = "import sys; from embseg.study import _job_child; _job_child(sys.argv[1])"
        proc = subprocess.run([sys.executable, "-c", code, request], capture_output=True,
                              text=True, env=dict(os.environ, **PROBE_ENV))
        returncode, stderr = proc.returncode, proc.stderr
    if returncode == 0 and result_path.is_file():
        result = json.loads(result_path.read_text())
        result_path.unlink()
        return result
    text = stderr.strip()
    if job["kind"] == "probe" and (returncode == -9 or "out of memory" in text.lower()
                                   or "can't allocate" in text.lower()):
        return {"peak_bytes": None}
    if returncode in (-2, 130):
        raise KeyboardInterrupt
    last = (text.splitlines() or [f"exit status {returncode}"])[-1]
    raise JobError(f"study {job['kind']} {job.get('name', '')}: {last}")


def _forked(server: ForkServer, request: str) -> tuple[int, str]:
    try:
        child = server.run(request)
    except ForkServerExited as exc:
        raise JobError(f"study: {exc}") from None
    return child.returncode, child.stderr


# --------------------------------------------------------------------------- the study


@dataclass
class StudyPlan:
    """Everything one ``embseg study`` does, before it runs."""

    device: str
    quick: bool
    sizes: StudySizes
    options: dict[str, Any]
    data_seed: int = 0

    def class_counts(self) -> list[int]:
        return sorted(set(self.sizes.classes) | set(self.sizes.ess_only_classes))

    def softmax_crops(self) -> list[int]:
        """The crops the memory search tries for softmax, largest first."""
        return candidate_crops(self.sizes.crop_size,
                               min_crop=2 * int(self.options["output_stride"]))


def train_options(overrides: dict[str, Any] | None = None) -> dict[str, Any]:
    """The trainer's defaults for the method (``TrainConfig``), with the study's from-scratch
    options and ``overrides`` on top."""
    from embseg.train import TrainConfig

    defaults = TrainConfig(shards=Path("."), out=Path("."))
    names = ("embed_dim", "k", "temperature", "margin", "embed_bn", "dropout",
             "backbone_lr_mult", "class_lr_mult", "lr", "output_stride")
    options = {name: getattr(defaults, name) for name in names}
    options.update(FROM_SCRATCH_OPTIONS)
    for name, value in (overrides or {}).items():
        if not hasattr(defaults, name) or name in ("shards", "out", "val_shards"):
            raise EmbsegError(f"--set {name}: not a training setting")
        options[name] = value
    return options


def _job(plan: StudyPlan, data: StudyData, *, kind: str, head: str, batch: int, crop: int,
         seed: int = 0, comparison: str = "", repeat_threshold: float | None = None,
         work: Path) -> dict[str, Any]:
    name = (f"{HEAD_NAMES[head]}-c{data.classes}-{comparison or 'probe'}-b{batch}-s{crop}"
            f"{'-rfs' if repeat_threshold is not None else ''}-seed{seed}")
    return {"kind": kind, "name": name, "head": head, "classes": data.classes,
            "backbone": plan.sizes.backbone, "batch_size": batch, "crop_size": crop,
            "steps": plan.sizes.steps, "seed": seed, "device": plan.device,
            "num_workers": plan.sizes.num_workers, "options": plan.options,
            "repeat_threshold": repeat_threshold, "train": str(data.train),
            "val": str(data.val), "run_dir": str(Path(work) / "runs" / name),
            "comparison": comparison}


class Study:
    """Runs a :class:`StudyPlan` and keeps ``study.json``/``.md``/``.png`` up to date."""

    def __init__(self, plan: StudyPlan, out: Path, work: Path, log: Callable[[str], None]):
        self.plan, self.out, self.work, self.log = plan, Path(out), Path(work), log
        self.result: dict[str, Any] = {
            "device": device_description(plan.device), "runs": [], "goals": [],
            "complete": False, "settings": {
                "quick": plan.quick, "sizes": asdict(plan.sizes), "train_options": plan.options,
                "data_seed": plan.data_seed, "probe_steps": PROBE_STEPS,
                "peak_memory": ("torch.cuda.max_memory_allocated over the probe's steps"
                                if plan.device.startswith("cuda") else
                                "growth of the probe process's resident anonymous memory "
                                "(VmHWM - RssFile) over its steps"),
                "equal_memory": "softmax gets the largest batch x crop^2 whose peak fits in "
                                "ESS's; steps held equal", "probe_env": PROBE_ENV,
                "job_process": ("a fresh interpreter per probe and run"
                                if plan.device.startswith("cuda") else
                                "a child forked per probe and run from one server that "
                                "imported torch (embseg.forkserver)"),
                "software": software_versions()},
            "memory_search": [], "repeat_thresholds": {}, "failed": [],
            "load_average": {"start": _load_average()}}
        self.started = time.perf_counter()
        self.probes: dict[tuple[int, str, int, int], int | None] = {}
        self.server: ForkServer | None = None  # CPU jobs are forked from it while run() runs

    def save(self) -> None:
        self.result["goals"] = [asdict(g) for g in goals(self.result["runs"], self.plan)]
        self.result["seconds"] = round(time.perf_counter() - self.started, 1)
        self.result["load_average"]["now"] = _load_average()
        self.out.mkdir(parents=True, exist_ok=True)
        write_text_atomically(self.out / "study.json", json.dumps(self.result, indent=1) + "\n")
        write_text_atomically(self.out / "study.md", to_markdown(self.result, self.plan))
        plot(self.result, self.out / "study.png")

    def probe(self, data: StudyData, head: str, batch: int, crop: int) -> int | None:
        """Peak training-step bytes of one setting (measured once per study)."""
        key = (data.classes, head, batch, crop)
        if key not in self.probes:
            job = _job(self.plan, data, kind="probe", head=head, batch=batch, crop=crop,
                       work=self.work)
            self.probes[key] = run_job(job, self.work, self.server)["peak_bytes"]
        return self.probes[key]

    def match(self, data: StudyData) -> dict[str, Any]:
        """ESS's peak at the reference setting and softmax's memory-matched setting."""
        sizes = self.plan.sizes
        ess_peak = self.probe(data, "embedding", sizes.batch_size, sizes.crop_size)
        if ess_peak is None:
            raise EmbsegError(f"study: ESS at C={data.classes} does not fit in memory at "
                              f"batch {sizes.batch_size}, crop {sizes.crop_size}")
        matched = memory_matched_setting(
            lambda b, s: self.probe(data, "softmax", b, s), ess_peak,
            max_batch=sizes.batch_size, crops=self.plan.softmax_crops())
        record = {"classes": data.classes, "ess_peak_bytes": ess_peak,
                  "ess_batch_size": sizes.batch_size, "ess_crop_size": sizes.crop_size,
                  "softmax_batch_size": matched.batch, "softmax_crop_size": matched.crop,
                  "softmax_peak_bytes": matched.peak_bytes,
                  "probes": [asdict(p) for p in matched.probes]}
        self.result["memory_search"].append(record)
        fitted = (f"softmax batch {matched.batch}, crop {matched.crop} ({_mib(matched.peak_bytes)})"
                  if matched.batch else "softmax does not fit (no batch >= 1 at crop >= "
                  f"{min(self.plan.softmax_crops())})")
        self.log(f"memory C={data.classes}: ESS {_mib(ess_peak)} at batch {sizes.batch_size}, "
                 f"crop {sizes.crop_size}; {fitted}; {len(matched.probes)} probes")
        self.save()
        return record

    def train(self, data: StudyData, head: str, comparisons: Sequence[str], *, batch: int,
              crop: int, seed: int, peak: int | None,
              repeat_threshold: float | None = None) -> None:
        job = _job(self.plan, data, kind="train", head=head, batch=batch, crop=crop, seed=seed,
                   comparison="+".join(comparisons), repeat_threshold=repeat_threshold,
                   work=self.work)
        try:
            figures = run_job(job, self.work, self.server)
        except JobError as exc:
            self.log(f"FAILED {job['name']}: {exc}")
            self.result["failed"].append({"run": job["name"], "error": str(exc)})
            self.save()
            return
        for comparison in comparisons:
            self.result["runs"].append({
                "head": HEAD_NAMES[head], "classes": data.classes, "comparison": comparison,
                "seed": seed, "val_miou": figures["val_miou"],
                "group_miou": figures["group_miou"], "pixel_accuracy": figures["pixel_accuracy"],
                "peak_bytes": peak, "batch_size": batch, "crop_size": crop,
                "steps": self.plan.sizes.steps, "seconds": round(figures["seconds"], 1),
                "repeat_threshold": repeat_threshold})
        self.log(f"run {job['name']}: val mIoU {_pct(figures['val_miou'])}, groups "
                 + ", ".join(f"{g} {_pct(figures['group_miou'][g])}" for g in GROUPS)
                 + f", {figures['seconds']:.0f} s ({figures['images_per_second'] or 0:.1f} images/s)")
        self.save()

    def run(self) -> dict[str, Any]:
        """Data, memory searches, then every run; the result (also in ``study.json``)."""
        if self.plan.device.startswith("cuda"):
            return self._run()
        with job_server() as server:
            self.server = server
            try:
                return self._run()
            finally:
                self.server = None

    def _run(self) -> dict[str, Any]:
        sizes = self.plan.sizes
        self.save()
        specs = [DataSpec(classes=c, images=sizes.images, val_images=sizes.val_images,
                          image_size=sizes.image_size, seed=self.plan.data_seed)
                 for c in self.plan.class_counts()]
        data = prepare_data(specs, self.work / "data", self.log)
        self.result["repeat_thresholds"] = {str(c): d.repeat_threshold for c, d in data.items()}
        matched = {c: self.match(data[c]) for c in self.plan.class_counts()}
        ess_peak = {c: matched[c]["ess_peak_bytes"] for c in matched}
        softmax_peak = {}
        for c in sizes.classes:
            softmax_peak[c] = self.probe(data[c], "softmax", sizes.batch_size, sizes.crop_size)
        reference = {"batch": sizes.batch_size, "crop": sizes.crop_size}
        small = min(sizes.classes)
        # What the goals need comes first (ESS everywhere, equal-steps softmax at the smallest
        # count, equal-memory softmax from the largest count down), then the repeat-factor
        # and ESS-only runs, and softmax's costly equal-steps runs at larger counts last, so
        # that a study cut short has measured its goals.
        stages: list[tuple[int, str, str]] = [(c, "embedding", "both") for c in sizes.classes]
        stages.append((small, "softmax", "equal_steps"))
        stages += [(c, "softmax", "equal_memory") for c in sorted(sizes.classes, reverse=True)]
        stages += [(c, "embedding", "rfs") for c in sizes.rfs_classes if c in data]
        stages += [(c, "embedding", "both") for c in sizes.ess_only_classes]
        stages += [(c, "softmax", "equal_steps") for c in sizes.classes if c != small]
        for c, head, comparison in stages:
            for seed in range(sizes.seeds):
                if head == "embedding":
                    rfs = comparison == "rfs"
                    self.train(data[c], head, ["equal_steps"] if rfs else COMPARISONS,
                               seed=seed, peak=ess_peak[c], **reference,
                               repeat_threshold=data[c].repeat_threshold if rfs else None)
                elif comparison == "equal_memory" and matched[c]["softmax_batch_size"]:
                    self.train(data[c], head, ["equal_memory"], seed=seed,
                               batch=matched[c]["softmax_batch_size"],
                               crop=matched[c]["softmax_crop_size"],
                               peak=matched[c]["softmax_peak_bytes"])
                elif comparison == "equal_steps":
                    self.train(data[c], head, ["equal_steps"], seed=seed,
                               peak=softmax_peak[c], **reference)
        self.result["complete"] = True
        self.result["load_average"]["end"] = _load_average()
        self.save()
        return self.result


# --------------------------------------------------------------------------- figures


@dataclass
class Goal:
    name: str
    passed: bool
    value: float


def _runs(runs: Iterable[dict[str, Any]], *, head: str, classes: int, comparison: str,
          rfs: bool = False) -> list[dict[str, Any]]:
    return [r for r in runs if r["head"] == head and r["classes"] == classes
            and r["comparison"] == comparison and (r["repeat_threshold"] is not None) == rfs]


def spread(values: Sequence[float]) -> float:
    """The seed spread: max - min (0 for one value)."""
    return max(values) - min(values) if values else math.nan


def goal_details(runs: list[dict[str, Any]], plan: StudyPlan) -> list[tuple[Goal, str]]:
    """The two goals of the issue at the ladder's largest and smallest class counts (where
    both heads have at least one finished run), each with its explanation."""
    out: list[tuple[Goal, str]] = []
    ladder = sorted(plan.sizes.classes)
    if not ladder:
        return out
    large, small = ladder[-1], ladder[0]
    ess = [r["val_miou"] for r in _runs(runs, head="ess", classes=large, comparison="equal_memory")]
    soft = [r["val_miou"] for r in _runs(runs, head="softmax", classes=large,
                                         comparison="equal_memory")]
    if ess and soft:
        margin = statistics.mean(ess) - statistics.mean(soft)
        bound = max(spread(ess), spread(soft))
        name = (f"C={large}, equal memory: ESS val mIoU - softmax val mIoU > seed spread "
                f"(max - min over seeds, the larger head's)")
        out.append((Goal(name, bool(margin > bound), margin),
                    f"ESS {_pct(statistics.mean(ess))} ({len(ess)} seeds), softmax "
                    f"{_pct(statistics.mean(soft))} ({len(soft)} seeds): difference "
                    f"{100 * margin:+.2f} points, spread {100 * bound:.2f} points"))
    ess = [r["val_miou"] for r in _runs(runs, head="ess", classes=small, comparison="equal_steps")]
    soft = [r["val_miou"] for r in _runs(runs, head="softmax", classes=small,
                                         comparison="equal_steps")]
    if ess and soft:
        ess_mean, soft_mean = statistics.mean(ess), statistics.mean(soft)
        # softmax at 0 (a run too short to learn anything): both at 0 count as equal (1.0x);
        # otherwise the ratio is taken against a floor far below one pixel's IoU, so that
        # study.json keeps a finite number
        ratio = 1.0 if ess_mean == soft_mean == 0 else ess_mean / max(soft_mean, RATIO_FLOOR)
        name = f"C={small}, equal steps: ESS val mIoU >= {SMALL_GOAL_RATIO}x softmax"
        out.append((Goal(name, bool(ratio >= SMALL_GOAL_RATIO), float(ratio)),
                    f"ESS {_pct(ess_mean)}, softmax {_pct(soft_mean)} "
                    f"(means of {len(ess)} and {len(soft)} seeds): {ratio:.3f}x"))
    return out


def goals(runs: list[dict[str, Any]], plan: StudyPlan) -> list[Goal]:
    return [goal for goal, _ in goal_details(runs, plan)]


def goal_lines(result: dict[str, Any], plan: StudyPlan) -> list[str]:
    lines = [f"{'PASS' if goal.passed else 'FAIL'}: {goal.name}: {detail}"
             for goal, detail in goal_details(result["runs"], plan)]
    return lines or ["(no goal measured yet)"]


def _pct(value: float | None) -> str:
    return "-" if value is None or (isinstance(value, float) and math.isnan(value)) \
        else f"{100 * value:.2f}%"


def _mib(value: int | None) -> str:
    return "-" if value is None else f"{value / 2**20:.0f} MiB"


def _mean_spread(values: list[float | None]) -> str:
    present = [v for v in values if v is not None]
    if not present:
        return "-"
    if len(present) == 1:
        return f"{100 * present[0]:.2f}"
    return f"{100 * statistics.mean(present):.2f} ± {50 * spread(present):.2f}"


def summary_rows(runs: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """One row per (classes, comparison, head, repeat-factor sampling) with seed means."""
    keys = []
    for r in runs:
        key = (r["classes"], r["comparison"], r["head"], r["repeat_threshold"])
        if key not in keys:
            keys.append(key)
    rows = []
    for classes, comparison, head, threshold in sorted(keys, key=lambda k: (
            k[0], COMPARISONS.index(k[1]), k[2], k[3] is not None)):
        group = [r for r in runs if (r["classes"], r["comparison"], r["head"],
                                     r["repeat_threshold"]) == (classes, comparison, head,
                                                                threshold)]
        miou = [r["val_miou"] for r in group]
        rows.append({"classes": classes, "comparison": comparison, "head": head,
                     "repeat_threshold": threshold, "seeds": len(group),
                     "mean": statistics.mean(miou), "spread": spread(miou), "runs": group})
    return rows


def to_markdown(result: dict[str, Any], plan: StudyPlan) -> str:
    sizes = plan.sizes
    lines = ["# embseg study: ESS vs softmax as the class count grows", "",
             f"Device: {result['device']}. {'Quick (CPU) sizes' if plan.quick else 'GPU sizes'}: "
             f"{sizes.images} train / {sizes.val_images} val synthetic images of "
             f"{sizes.image_size} px, backbone {sizes.backbone} from scratch, {sizes.steps} "
             f"steps, reference batch {sizes.batch_size} and crop {sizes.crop_size}, "
             f"{sizes.seeds} seeds. {'Complete' if result['complete'] else 'Incomplete (cut short or running)'}"
             f"; {result.get('seconds', 0):.0f} s so far.", "",
             "Method settings (both heads where they apply): "
             + ", ".join(f"{k} = {v}" for k, v in plan.options.items()) + ".", "",
             "## Goals", ""]
    lines += [f"- {line}" for line in goal_lines(result, plan)]
    lines += ["", "## Val mIoU (mean ± half the seed range, %)", "",
              "The ESS run is the reference setting of both comparisons and is listed under "
              "both. Peak = training-step peak memory of the setting ("
              + result["settings"]["peak_memory"] + ").", "",
              "| C | comparison | head | RFS t | seeds | val mIoU | rare | common | frequent "
              "| stuff | pixel acc. | batch | crop | steps | peak | s/run |",
              "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- "
              "| --- | --- | --- |"]
    for row in summary_rows(result["runs"]):
        group = row["runs"]
        first = group[0]
        cells = [str(row["classes"]), row["comparison"], row["head"],
                 "-" if row["repeat_threshold"] is None else f"{row['repeat_threshold']:.4f}",
                 str(row["seeds"]), _mean_spread([r["val_miou"] for r in group])]
        cells += [_mean_spread([r["group_miou"][g] for r in group]) for g in GROUPS]
        cells += [_mean_spread([r["pixel_accuracy"] for r in group]), str(first["batch_size"]),
                  str(first["crop_size"]), str(first["steps"]), _mib(first["peak_bytes"]),
                  f"{statistics.mean(r['seconds'] for r in group):.0f}"]
        lines.append("| " + " | ".join(cells) + " |")
    lines += ["", "## Memory matching", "",
              "| C | ESS peak (batch, crop) | softmax setting found | softmax peak | probes "
              "(batch x crop: peak) |", "| --- | --- | --- | --- | --- |"]
    for search in result["memory_search"]:
        probes = ", ".join(f"{p['batch']}x{p['crop']}: {_mib(p['peak_bytes'])}"
                           f"{'' if p['fits'] else ' (over)'}" for p in search["probes"])
        found = (f"batch {search['softmax_batch_size']}, crop {search['softmax_crop_size']}"
                 if search["softmax_batch_size"] else "does not fit")
        lines.append(f"| {search['classes']} | {_mib(search['ess_peak_bytes'])} "
                     f"({search['ess_batch_size']}, {search['ess_crop_size']}) | {found} | "
                     f"{_mib(search['softmax_peak_bytes'])} | {probes} |")
    if result["repeat_thresholds"]:
        lines += ["", "Repeat-factor threshold t per class count (LVIS's 0.001 moved to the "
                  "synthetic set's common/frequent boundary): "
                  + ", ".join(f"C={c}: {t:.4f}" for c, t in result["repeat_thresholds"].items())
                  + "."]
    if result["failed"]:
        lines += ["", "## Failed runs", ""]
        lines += [f"- {f['run']}: {f['error']}" for f in result["failed"]]
    load = result["load_average"]
    lines += ["", f"Load average (1, 5, 15 min): start {load.get('start')}, "
              f"{'end' if 'end' in load else 'now'} {load.get('end', load.get('now'))}.", ""]
    return "\n".join(lines)


def plot(result: dict[str, Any], path: Path) -> None:
    """Val mIoU vs C (log x), both heads, one panel per comparison, seed range as error bars."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import matplotlib.ticker

    fig, axes = plt.subplots(1, 2, figsize=(10, 4.2), sharey=True)
    rows = summary_rows(result["runs"])
    styles = {("ess", False): ("o-", "ESS"), ("softmax", False): ("s--", "softmax"),
              ("ess", True): ("^:", "ESS + repeat-factor sampling")}
    for ax, comparison in zip(axes, COMPARISONS, strict=True):
        for (head, rfs), (style, label) in styles.items():
            points = [r for r in rows if r["comparison"] == comparison and r["head"] == head
                      and (r["repeat_threshold"] is not None) == rfs]
            if not points:
                continue
            xs = [p["classes"] for p in points]
            ys = [100 * p["mean"] for p in points]
            low = [100 * (p["mean"] - min(r["val_miou"] for r in p["runs"])) for p in points]
            high = [100 * (max(r["val_miou"] for r in p["runs"]) - p["mean"]) for p in points]
            ax.errorbar(xs, ys, yerr=[low, high], fmt=style, capsize=4, label=label)
        if comparison == "equal_memory":
            unfit = [m["classes"] for m in result["memory_search"]
                     if m["softmax_batch_size"] is None]
            if unfit:
                ax.plot(unfit, [0.0] * len(unfit), "rx", markersize=9,
                        label="softmax does not fit ESS's memory")
        ax.set_xscale("log")
        ax.set_yscale("symlog", linthresh=0.1)  # the large-C points are fractions of 1%
        ax.set_yticks([0, 0.1, 0.3, 1, 3, 10, 30, 100])
        ax.yaxis.set_major_formatter(matplotlib.ticker.FuncFormatter(lambda v, _: f"{v:g}"))
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=8)
        ax.set_xlabel("classes C")
        ax.set_title(comparison.replace("_", " "))
        ax.grid(True, which="both", alpha=0.3)
    axes[0].set_ylabel("val mIoU (%), log above 0.1")
    top = max([100 * max(r["val_miou"] for r in row["runs"]) for row in rows] + [1.0])
    axes[0].set_ylim(0, top * 1.5)
    fig.suptitle(f"embseg study, {result['device']} (error bars: seed range)", fontsize=10)
    fig.tight_layout()
    import io

    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=110)
    plt.close(fig)
    write_bytes_atomically(path, buffer.getvalue())


def device_description(device: str) -> str:
    """The device in words (CPU model and cores, or the CUDA device name)."""
    if device.startswith("cuda"):
        import torch

        return f"cuda: {torch.cuda.get_device_name(0)}"
    model = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as info:
            model = next((line.split(":", 1)[1].strip() for line in info
                          if line.startswith("model name")), model)
    except OSError:
        pass
    return f"cpu: {model}, {os.cpu_count()} cores"


def software_versions() -> dict[str, str | None]:
    from importlib import metadata

    versions: dict[str, str | None] = {"python": platform.python_version()}
    for name in ("torch", "numpy", "numba"):
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            versions[name] = None
    return versions


def _load_average() -> list[float] | None:
    try:
        return [round(v, 2) for v in os.getloadavg()]
    except OSError:
        return None


# --------------------------------------------------------------------------- command line


def _int_list(text: str | None) -> tuple[int, ...] | None:
    if text is None:
        return None
    try:
        return tuple(int(v) for v in text.split(",") if v.strip())
    except ValueError:
        raise EmbsegError(f"study: {text!r} is not a comma-separated list of integers") from None


def _overrides(pairs: Sequence[str]) -> dict[str, Any]:
    values: dict[str, Any] = {}
    for pair in pairs:
        name, sep, text = pair.partition("=")
        if not sep:
            raise EmbsegError(f"--set {pair!r}: use NAME=VALUE (e.g. --set k=25)")
        try:
            values[name.strip()] = json.loads(text)
        except json.JSONDecodeError:
            values[name.strip()] = text
    return values


def plan_from_args(args: argparse.Namespace) -> StudyPlan:
    """The :class:`StudyPlan` of parsed ``embseg study`` options."""
    sizes = QUICK if args.quick else GPU
    changes: dict[str, Any] = {}
    for name in ("images", "val_images", "image_size", "steps", "batch_size", "crop_size",
                 "seeds", "num_workers"):
        if getattr(args, name, None) is not None:
            changes[name] = getattr(args, name)
    for name in ("classes", "ess_only_classes", "rfs_classes"):
        value = _int_list(getattr(args, name, None))
        if value is not None:
            changes[name] = value
    sizes = replace(sizes, **changes)
    for classes in (*sizes.classes, *sizes.ess_only_classes):
        check_classes(classes)
    if sizes.seeds < 1 or sizes.steps < 1 or sizes.batch_size < 1 or sizes.crop_size < 32:
        raise EmbsegError("study: --seeds, --steps and --batch-size must be at least 1 and "
                          "--crop-size at least 32")
    return StudyPlan(device=args.device, quick=args.quick, sizes=sizes,
                     options=train_options(_overrides(args.set or [])), data_seed=args.data_seed)


def cli_study(args: argparse.Namespace) -> int:
    """``embseg study``: run the study, print the goal lines; exit 1 when a goal fails."""
    from embseg.evaluate import resolve_device

    resolve_device(args.device)
    plan = plan_from_args(args)
    out = Path(args.out)
    work = Path(args.work) if args.work is not None else out / "work"
    work.mkdir(parents=True, exist_ok=True)

    def log(line: str) -> None:
        print(f"[{time.strftime('%H:%M:%S')}] {line}", flush=True)

    log(f"study on {plan.device}: classes {list(plan.sizes.classes)}, ESS only "
        f"{list(plan.sizes.ess_only_classes)}, {plan.sizes.seeds} seeds; files in {out}")
    study = Study(plan, out, work, log)
    result = study.run()
    for line in goal_lines(result, plan):
        print(line)
    print(f"study: {out / 'study.json'}, {out / 'study.md'}, {out / 'study.png'}")
    return 0 if all(g["passed"] for g in result["goals"]) else 1
