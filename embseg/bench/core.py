"""The shared core of ``embseg bench``: what to measure (:class:`BenchSettings`), how a step is
measured inside a point's process (peak memory, then step times), how figures are formatted,
and :class:`Part`, the record each part of the benchmark registers.
"""

from __future__ import annotations

import os
import platform
import resource
import statistics
import time
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

CLASS_COUNTS = (21, 150, 1284, 10_000, 100_000)


POINT_TIMEOUT_S = 600


POINT_ENV = {"MALLOC_MMAP_THRESHOLD_": "65536", "MALLOC_ARENA_MAX": "1",
             "OMP_WAIT_POLICY": "PASSIVE"}
"""Environment of every point's subprocess (recorded in the JSON).

glibc serves large blocks from its heap and keeps freed ones, raising its mmap threshold as
it goes; the resident set then depends on the order of frees and on which thread freed
what (three runs of the same 100,000-class step of the tiny backbone peaked at 516, 526 and
588 MiB, and 773 MiB with spinning OpenMP threads). A fixed 64 KiB mmap threshold and one
arena hand every large block back when it is freed, so the peak RSS is the peak of what the
step really holds (the setting of the memory test in ``tests/test_ess.py``); every point
pays the same price in page faults for it. Passive OpenMP threads keep step times meaningful
on a machine shared with other jobs (with spinning threads that step took 62 s instead of
19 s under load).
"""


@dataclass(frozen=True)
class StepSetting:
    """One training-step configuration: backbone and input size shared by both heads."""

    backbone: str
    batch: int
    size: int
    output_stride: int = 16
    embed_dim: int = 32


@dataclass
class BenchSettings:
    """What to measure: ``quick`` CPU sizes, or the paper's GPU setting."""

    device: str
    steps: list[StepSetting]
    classes: tuple[int, ...] = CLASS_COUNTS
    loss_classes: tuple[int, ...] = CLASS_COUNTS
    loss_pixels: tuple[int, int, int] = (2, 128, 128)  # batch, height, width for the loss alone
    build_images: int = 200
    build_size: int = 128
    build_rounds: int = 3
    loader_images: int = 200
    loader_rounds: int = 3
    cpu_memory_cap_gib: float = 8.0
    measured_steps: int = 2
    loss_measured_steps: int | None = None  # None: measured_steps
    step_measure_seconds: float | None = None  # None: MEASURE_SECONDS (training-step table)
    step_pair_classes: tuple[int, int] = (21, 1284)  # the step-time goal's two class counts
    step_pair_rounds: int = 7
    search_classes: tuple[int, ...] = (1284, 10_000)  # the search part: knn_classes vs faiss
    search_pixels: int = 32_768
    search_dim: int = 32
    search_k: int = 8
    search_calls: int = 5  # timed calls per point, after a warm-up call
    search_rounds: int = 2  # points per side and C, the leading side alternating
    notes: list[str] = field(default_factory=list)


def settings_for(*, quick: bool, gpu_sizes: bool, device: str) -> BenchSettings:
    """The benchmark sizes for the flags given (see ``embseg bench --help``)."""
    if gpu_sizes:
        steps = [StepSetting("resnet50", 16, 513), StepSetting("resnet101", 16, 513)]
        # the search at the paper's step: every pixel of 16 crops of 513 x 513
        return BenchSettings(device=device, steps=steps, loss_pixels=(16, 513, 513),
                             search_pixels=16 * 513 * 513)
    if quick:
        # ResNet-50 (the paper's backbone, random weights) at 2 x 128 x 128 on 2 CPU cores:
        # the tiny CPU backbone's activations are so small that the process baseline
        # (~300 MiB of Python + torch) and the O(C d) class table dominated its peak. At
        # C = 100,000 the exact nearest-class search over 32,768 pixels and the margin
        # penalty's exact C x C nearest-other search cost ~10 s per step, so that point runs
        # only its two memory steps (the second one timed), and the loss-alone sweep stops
        # at C = 10,000 (it goes on to 100,000 without --quick), and five alternating rounds
        # for the step-time pair, one timed step per training-step point (the step-time
        # goal comes from the pair): --quick stays near 4 minutes. 1,600 build images: a
        # shorter build is timed over ~2 s or less and its ratio is noise (1,200 images gave
        # 1.39x-1.77x where 1,600 gave 1.70x-2.13x on the same day); and two alternating
        # rounds of the two builds (one pair gave 1.41x-2.05x in a day).
        return BenchSettings(device=device, steps=[StepSetting("resnet50", 2, 128)],
                             loss_classes=CLASS_COUNTS[:-1], loss_pixels=(2, 96, 96),
                             build_images=1600, build_rounds=2, loader_images=640,
                             loader_rounds=3,
                             measured_steps=1, loss_measured_steps=1, step_pair_rounds=5,
                             step_measure_seconds=0.0)
    return BenchSettings(device=device, steps=[StepSetting("mobilenetv2", 4, 256)],
                         loss_pixels=(4, 256, 256), measured_steps=3)


def _step_measure_seconds(settings: BenchSettings) -> float:
    return MEASURE_SECONDS if settings.step_measure_seconds is None \
        else settings.step_measure_seconds


def _loss_steps(settings: BenchSettings) -> int:
    return settings.measured_steps if settings.loss_measured_steps is None \
        else settings.loss_measured_steps


def settings_record(settings: BenchSettings, *, quick: bool, gpu_sizes: bool
                    ) -> dict[str, Any]:
    """What the figures were measured with (sizes, steps, subprocess environment), for the JSON."""
    return {"quick": quick, "gpu_sizes": gpu_sizes,
            "training_step": [asdict(step) for step in settings.steps],
            "measured_steps_after_warmup": settings.measured_steps,
            "step_measure_seconds": _step_measure_seconds(settings),
            "loss_pixels_batch_height_width": list(settings.loss_pixels),
            "loss_measured_steps_after_warmup": _loss_steps(settings),
            "loss_embed_dim": 32, "ess_k": 7,
            "cpu_memory_cap_gib": settings.cpu_memory_cap_gib,
            "point_env": dict(POINT_ENV) if settings.device == "cpu" else {},
            "peak_memory": ("torch.cuda.max_memory_allocated" if settings.device == "cuda"
                            else "peak RSS (VmHWM) of the point's process"),
            "point_process": ("a fresh interpreter" if settings.device == "cuda" else
                              "forked from a server that imported torch once"),
            "build_images": settings.build_images, "build_image_size_px": settings.build_size,
            "build_rounds": settings.build_rounds,
            "loader_images": settings.loader_images, "loader_rounds": settings.loader_rounds,
            "step_pair_classes": list(settings.step_pair_classes),
            "step_pair_rounds": settings.step_pair_rounds,
            "search_classes": list(settings.search_classes),
            "search_pixels": settings.search_pixels, "search_dim": settings.search_dim,
            "search_k": settings.search_k, "search_calls": settings.search_calls,
            "search_rounds": settings.search_rounds}


def software_versions() -> dict[str, str | None]:
    """Python and the packages the figures depend on (None: not installed)."""
    from importlib import metadata

    import torch

    versions: dict[str, str | None] = {"python": platform.python_version(),
                                       "torch": torch.__version__,
                                       "cuda": torch.version.cuda}
    for package in ("numpy", "numba", "pillow", "faiss-cpu"):
        try:
            versions[package] = metadata.version(package)
        except metadata.PackageNotFoundError:
            versions[package] = None
    return versions


def device_name(device: str) -> str:
    """A human description of the device the figures were taken on."""
    if device == "cuda":
        import torch

        return torch.cuda.get_device_name(0)
    return f"CPU ({platform.processor() or platform.machine()}, {os.cpu_count()} cores)"


# ---------------------------------------------------------------------------------------------
# Measuring inside a point's process


def _limit_address_space(cap_gib: float) -> None:
    cap = int(cap_gib * 2**30)
    resource.setrlimit(resource.RLIMIT_AS, (cap, cap))


def _peak_rss_bytes() -> int:
    """Peak resident set of this process image: Linux's ``VmHWM``.

    Not ``ru_maxrss``: that survives ``execve``, and a subprocess started by vfork (as
    ``subprocess`` does) begins with its parent's peak, so every point of a parent that once
    held 2 GiB read 2 GiB. ``ru_maxrss`` only where ``/proc`` is absent.
    """
    value = _proc_status_bytes("VmHWM")
    return value if value is not None else \
        resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def _proc_status_bytes(field: str) -> int | None:
    """A ``kB`` field of ``/proc/self/status`` in bytes (None where it is not available)."""
    try:
        with open("/proc/self/status") as status:
            for line in status:
                if line.startswith(f"{field}:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        return None
    return None


def _mapped_file_rss_bytes() -> int | None:
    """Resident pages of mapped files (torch's and numba's shared libraries), from Linux's
    ``RssFile``; None where ``/proc`` does not give it.

    They count in the peak RSS, but how many of them are resident depends on the page cache
    (the kernel maps cached neighbours of a touched page too). Two checkouts on one machine
    read the same points 50-110 MiB apart, with equal anonymous memory (to 4 KiB after
    ``import torch``).
    """
    return _proc_status_bytes("RssFile")


def _is_oom(exc: BaseException) -> bool:
    text = str(exc).lower()
    return isinstance(exc, MemoryError) or "out of memory" in text or "can't allocate" in text \
        or "not enough memory" in text or "std::bad_alloc" in text


GLIBC_M_TRIM_THRESHOLD, GLIBC_M_MMAP_THRESHOLD = -1, -3  # mallopt parameters (malloc.h)


def _allocator_keeps_freed_memory() -> bool:
    """Switch glibc from the exact accounting of :data:`POINT_ENV` to caching freed blocks.

    The fixed 64 KiB mmap threshold makes the peak RSS honest, but every large allocation
    then costs fresh pages (page faults), which taxes chunked code more than the rest. Step
    times are therefore taken after this switch (blocks up to 32 MiB from the heap, which is
    not trimmed), once the peak has been read. False where mallopt is not available.
    """
    import ctypes
    import ctypes.util

    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c"))
        return bool(libc.mallopt(GLIBC_M_MMAP_THRESHOLD, 32 * 2**20)
                    and libc.mallopt(GLIBC_M_TRIM_THRESHOLD, 2**30))
    except (OSError, AttributeError):
        return False


UNTIMED_STEP_MAX_SECONDS = 3.0
"""Steps slower than this skip the untimed allocator-refill step, and the last memory step
counts as the first timed one: page faults are then a small share of a step, and at
C = 100,000 on CPU one step costs ~10 s."""


MEASURE_SECONDS = 1.5
MAX_MEASURED_STEPS = 9
"""Cheap steps are timed repeatedly (until MEASURE_SECONDS of timed steps, at most
MAX_MEASURED_STEPS) and their median is reported: one step of a few tenths of a second is
too noisy on a shared CPU for a 1.15x goal."""


def _measure(step, device, measured_steps: int, memory_steps: int = 2,
             measure_seconds: float | None = None) -> dict[str, Any]:
    """Peak memory over ``memory_steps`` steps, then the median time of the measured steps.

    On CUDA the first step is the warm-up and the peak is ``max_memory_allocated`` over all
    steps. On CPU the peak RSS is read after ``memory_steps`` steps (two for a training step:
    SGD's momentum exists from the second on), then the allocator switches to caching
    (:func:`_allocator_keeps_freed_memory`) and, for steps cheaper than
    :data:`UNTIMED_STEP_MAX_SECONDS`, one untimed step refills its cache (slower steps count
    the last memory step as their first timed one). At least ``measured_steps`` steps are
    timed, more while they add up to less than ``measure_seconds`` (default
    :data:`MEASURE_SECONDS`).
    """
    import torch

    times: list[float] = []
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
        step()  # warm-up
    else:
        last = [_timed_call(step, device) for _ in range(max(1, memory_steps))][-1]
        peak = _peak_rss_bytes()
        mapped_files = _mapped_file_rss_bytes()
        if last >= UNTIMED_STEP_MAX_SECONDS:
            times.append(last)  # a slow step: the last memory step is the first timed one
        if _allocator_keeps_freed_memory() and last < UNTIMED_STEP_MAX_SECONDS:
            step()  # untimed: the heap grows to its working size
    budget = MEASURE_SECONDS if measure_seconds is None else measure_seconds
    while len(times) < max(1, measured_steps) or (
            sum(times) < budget and len(times) < MAX_MEASURED_STEPS):
        times.append(_timed_call(step, device))
    if device.type == "cuda":
        peak = torch.cuda.max_memory_allocated(device)
        mapped_files = None
    return {"peak_bytes": int(peak), "mapped_file_bytes": mapped_files,
            "step_seconds": statistics.median(times), "timed_steps": len(times)}


def _timed_call(step, device) -> float:
    """Seconds of one ``step()``, on CUDA with the work it queued (synchronised around it)."""
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize(device)
    started = time.perf_counter()
    step()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter() - started


def _alternating_rounds(rounds: int, first, second, on_round=None
                        ) -> tuple[list[float], list[float]]:
    """``first()`` and ``second()`` once per round, the order alternating (``first`` leads in
    even rounds), so that a machine slowing down or speeding up weighs on both sides alike.
    ``on_round(a, b)`` sees each round's pair of results."""
    firsts: list[float] = []
    seconds: list[float] = []
    for round_index in range(max(1, rounds)):
        if round_index % 2 == 0:
            a = first()
            b = second()
        else:
            b = second()
            a = first()
        firsts.append(a)
        seconds.append(b)
        if on_round is not None:
            on_round(a, b)
    return firsts, seconds


# ---------------------------------------------------------------------------------------------
# Formatting shared by the parts' reports


def _fmt_bytes(value: int | None) -> str:
    return "OOM" if value is None else f"{value / 2**20:.0f} MiB"


def _fmt_seconds(value: float | None) -> str:
    return "-" if value is None else f"{value:.3f} s"


def _fmt_peak(row: dict[str, Any] | None) -> str:
    """A row's peak: MiB, ``OOM`` (a null peak, or no row), or ``error`` (a failed point)."""
    if row is not None and row.get("error"):
        return "error"
    return _fmt_bytes(None if row is None else row["peak_bytes"])


def _row(rows: list[dict[str, Any]], head: str, classes: int) -> dict[str, Any] | None:
    return next((r for r in rows if r["head"] == head and r["classes"] == classes), None)


def _point(rows: list[dict[str, Any]], head: str, classes: int, key: str):
    row = _row(rows, head, classes)
    return None if row is None else row.get(key)  # mapped_file_bytes: CPU runs of 2026-12-01 on


def _ratio(a: float | None, b: float | None) -> float | None:
    return None if a is None or b is None else a / b


def _without_mapped_files(rows: list[dict[str, Any]], head: str, classes: int) -> int | None:
    """A CPU point's peak minus its resident mapped-file pages (None: not recorded, or OOM)."""
    peak, mapped = (_point(rows, head, classes, "peak_bytes"),
                    _point(rows, head, classes, "mapped_file_bytes"))
    return None if peak is None or mapped is None else peak - mapped


def _measured_fields(result: dict[str, Any]) -> dict[str, Any]:
    """A point's figures for its table row, and its ``error`` if it failed (not OOM)."""
    fields = {"peak_bytes": result["peak_bytes"],
              "mapped_file_bytes": result.get("mapped_file_bytes"),
              "step_seconds": result["step_seconds"], "timed_steps": result.get("timed_steps")}
    if result.get("error"):
        fields["error"] = result["error"]
    return fields


def _mapped_files_lines(rows: list[dict[str, Any]]) -> list[str]:
    """One line: how much of the CPU peaks are mapped files, and the anonymous part's range."""
    rows = [r for r in rows
            if r.get("mapped_file_bytes") is not None and r["peak_bytes"] is not None]
    if not rows:
        return []
    files = [r["mapped_file_bytes"] / 2**20 for r in rows]
    ranges = []
    for head, name in (("ess", "ESS"), ("softmax", "softmax")):
        rest = [(r["peak_bytes"] - r["mapped_file_bytes"]) / 2**20 for r in rows
                if r["head"] == head]
        if rest:
            ranges.append(f"{name} {min(rest):.0f}-{max(rest):.0f} MiB")
    return [f"Of these peaks, {min(files):.0f}-{max(files):.0f} MiB are resident pages of "
            f"mapped files (shared libraries): the page cache, not the method, sets that share "
            f"(on a 2-core CPU machine, the same points read 50-110 MiB apart from two "
            f"checkouts). Peak minus them: {', '.join(ranges)} (`mapped_file_bytes` in the "
            f"JSON)."]


def _load_lines(result: dict[str, Any]) -> list[str]:
    """The load average before and after the run, as one line (none when not recorded)."""
    before, after = (result.get("load_average_1_5_15_before"),
                     result.get("load_average_1_5_15_after"))
    if not (before and after):
        return []
    return [f"Load average (1/5/15 min) before: {', '.join(f'{v:.2f}' for v in before)}; "
            f"after: {', '.join(f'{v:.2f}' for v in after)}."]


def _rounds_note(ratios: list[float] | None, kind: str) -> str:
    """``, medians of N <kind> rounds (ratios a, b, ...)``; empty for a run without rounds."""
    if not ratios:
        return ""
    return (f", medians of {len(ratios)} {kind} rounds (ratios "
            + ", ".join(f"{r:.2f}" for r in ratios) + ")")


# ---------------------------------------------------------------------------------------------
# The record of a part

Goal = tuple[str, bool, str]
"""A goal's name, whether the run met it, and the figure it was judged on."""


def _none(result: dict[str, Any]) -> list[Any]:
    return []


@dataclass
class PartRun:
    """What a part's ``run`` works with: the settings, the result it fills in, and the run's
    services (log, point runner, saving, timing, a scratch folder)."""

    settings: BenchSettings
    result: dict[str, Any]
    log: Callable[[str], None]
    run_point: Callable[[dict[str, Any]], dict[str, Any]]
    """Runs one point spec in a process of its own (the CPU point server, or a fresh one)."""
    save: Callable[..., None]
    """``save(with_plot=True)``: write the JSON, the markdown and (``with_plot``) the figures."""
    timed: Callable[[str, Callable[[], Any]], Any]
    """``timed(name, fn)``: ``fn()``, its seconds recorded under ``part_seconds[name]``."""
    workdir: Path
    shards: Path | None = None
    """The user's ``--shards`` (the loader reads them instead of the build part's)."""
    built_shards: Path | None = None
    """The build part's last shards, for the loader part after it."""

    def save_point(self) -> None:
        """Save after one point: JSON and markdown (the figures wait for the end of the part)."""
        self.save(with_plot=False)


@dataclass(frozen=True)
class Part:
    """One part of ``embseg bench``, as registered in :data:`embseg.bench.parts.PART_MODULES`.

    ``name`` is its ``--parts`` name and its module's (``embseg.bench.<name>``). ``results``
    names the keys it fills in the result, with their empty values (every run's JSON has them,
    in registry order). ``markdown`` and ``goals`` see the whole result, are called for every
    run and return nothing when the part's figures are absent. ``points`` maps the point kinds
    it runs in point processes to their functions (spec -> figures)."""

    name: str
    run: Callable[[PartRun], None]
    results: Mapping[str, Any]
    markdown: Callable[[dict[str, Any]], list[str]]
    goals: Callable[[dict[str, Any]], list[Goal]] = _none
    after_goals: Callable[[dict[str, Any]], list[str]] = _none
    """Lines under the goal list (the memory part's softmax/ESS ratio)."""
    points: Mapping[str, Callable[[dict[str, Any]], dict[str, Any]]] = field(
        default_factory=dict)
    check: Callable[[tuple[str, ...], Path | None], None] | None = None
    """Raise EmbsegError when the chosen parts and ``--shards`` do not let this part run."""
    figure: str | None = None
    plot: Callable[[dict[str, Any], Path], None] | None = None
    """Writes ``figure`` (a file name under ``--out``) when the result has the part's rows."""
