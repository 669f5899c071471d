"""``embseg bench``: memory and speed of the ESS head against the softmax baseline as the class
count grows, and the throughput of the dataset build and of the training input pipeline.

Every memory/speed point runs in a process of its own, so one point's allocations never
inflate another's peak: on CUDA a fresh interpreter, whose peak is
``torch.cuda.max_memory_allocated`` after ``reset_peak_memory_stats``; on CPU a child forked
from a server that has imported torch once (:class:`PointServer`), whose peak is its own peak
resident set size. A point that does not fit (CUDA out-of-memory, or the CPU address-space
cap) is recorded with a null peak.
"""

from __future__ import annotations

import argparse
import contextlib
import itertools
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import tempfile
import time
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
    notes: list[str] = field(default_factory=list)


def settings_for(*, quick: bool, gpu_sizes: bool, device: str) -> BenchSettings:
    """The benchmark sizes for the flags given (see ``embseg bench --help``)."""
    if gpu_sizes:
        steps = [StepSetting("resnet50", 16, 513), StepSetting("resnet101", 16, 513)]
        return BenchSettings(device=device, steps=steps, loss_pixels=(16, 513, 513))
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


# ---------------------------------------------------------------------------------------------
# Subprocess points


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


def _training_step(spec: dict[str, Any], classes: int):
    """A function running one training step (forward, loss, backward, SGD update) of
    DeepLabV3+ with ``spec``'s head at ``classes`` classes, on fixed random input.

    The model is built right after ``torch.manual_seed(0)``, so two calls with different
    class counts get the same backbone and decoder weights (the class table comes last)."""
    import torch

    from embseg.models import build_model

    device = torch.device(spec["device"])
    torch.manual_seed(0)
    model = build_model(backbone=spec["backbone"], head=spec["head"], num_classes=classes,
                        embed_dim=spec["embed_dim"],
                        output_stride=spec["output_stride"]).to(device)
    optimizer = torch.optim.SGD(model.param_groups(0.01), lr=0.01, momentum=0.9,
                                weight_decay=1e-4)
    images = torch.randn(spec["batch"], 3, spec["size"], spec["size"], device=device)
    target = torch.randint(0, classes, (spec["batch"], spec["size"], spec["size"]),
                           device=device)

    def step() -> None:
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
            output = model(images)
        loss, _ = model.loss(output.float(), target)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    return step


def _step_point(spec: dict[str, Any]) -> dict[str, Any]:
    """One training step (forward, loss, backward, SGD update) of DeepLabV3+ with one head."""
    import torch

    step = _training_step(spec, spec["classes"])
    return _measure(step, torch.device(spec["device"]), spec["measured_steps"], memory_steps=2,
                    measure_seconds=spec.get("measure_seconds", MEASURE_SECONDS))


def _step_pair_point(spec: dict[str, Any]) -> dict[str, Any]:
    """Step times of one head at two class counts, timed alternately in one process.

    Separate processes differ by 10-30% in step time on a shared CPU (the same point ran
    0.61-0.79 s in three processes within minutes), more than the 1.15x goal allows. Here
    both models live in one process and each round times one step of each, the order
    alternating between rounds; the per-round ratios cancel what drifts between rounds, and
    their median is the result. No peak memory is read here (two models share the process).
    """
    import torch

    device = torch.device(spec["device"])
    low, high = spec["classes_pair"]
    steps = {low: _training_step(spec, low), high: _training_step(spec, high)}

    for classes in (low, high):  # untimed: SGD momentum, caches, compiled kernels
        steps[classes]()
    if device.type == "cpu":
        _allocator_keeps_freed_memory()
    for classes in (low, high):  # untimed: the heap (or CUDA cache) grows to its working size
        steps[classes]()
    seconds_low, seconds_high = _alternating_rounds(
        spec["rounds"], lambda: _timed_call(steps[low], device),
        lambda: _timed_call(steps[high], device))
    ratios = [b / a for a, b in zip(seconds_low, seconds_high, strict=True)]
    return {"classes": [low, high], "head": spec["head"], "rounds": len(ratios),
            "step_seconds_low": seconds_low, "step_seconds_high": seconds_high,
            "rounds_ratio_x": ratios, "ratio_x": statistics.median(ratios)}


def _loss_point(spec: dict[str, Any]) -> dict[str, Any]:
    """The loss alone, forward and backward: ESS (ess_loss + margin_penalty) or full softmax CE."""
    import torch
    import torch.nn.functional as F

    from embseg import ess

    device = torch.device(spec["device"])
    torch.manual_seed(0)
    batch, height, width = spec["pixels"]
    classes, dim = spec["classes"], spec["embed_dim"]
    target = torch.randint(0, classes, (batch, height, width), device=device)
    if spec["head"] == "ess":
        raw = torch.randn(batch, dim, height, width, device=device, requires_grad=True)
        table = torch.empty(classes, dim, device=device).uniform_(-1, 1).requires_grad_(True)

        def step() -> None:
            emb = F.normalize(raw, dim=1)
            class_emb = ess.normalize_rows(table)  # as the model normalises its table
            loss = ess.ess_loss(emb, target, class_emb, k=7, temperature=20.0)
            loss = loss + ess.margin_penalty(class_emb, margin=0.2)
            loss.backward()
            raw.grad = table.grad = None
    else:
        from embseg.models import softmax_cross_entropy  # the softmax head's own loss

        logits = torch.randn(batch, classes, height, width, device=device, requires_grad=True)

        def step() -> None:
            softmax_cross_entropy(logits, target).backward()
            logits.grad = None

    return _measure(step, device, spec["measured_steps"], memory_steps=1)


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


def _run_point_child(spec_json: str) -> None:
    """Subprocess entry: run one point and print its JSON result on the last line."""
    spec = json.loads(spec_json)
    if spec["device"] == "cpu":
        _limit_address_space(spec["cpu_memory_cap_gib"])
    import torch

    torch.set_num_threads(max(1, os.cpu_count() or 1))
    runner = {"step": _step_point, "step_pair": _step_pair_point,
              "loss": _loss_point}[spec["kind"]]
    try:
        result = runner(spec)
    except Exception as exc:  # noqa: BLE001 - OOM of any flavour is a result, not a crash
        if not _is_oom(exc):
            raise
        result = {"peak_bytes": None, "step_seconds": None, "oom": True}
    print(json.dumps(result))


def run_point(spec: dict[str, Any]) -> dict[str, Any]:
    """Run one point in a fresh interpreter; a crash for lack of memory counts as OOM."""
    code = "import sys; from embseg.bench import _run_point_child; _run_point_child(sys.argv[1])"
    env = dict(os.environ, **POINT_ENV)
    proc = subprocess.run([sys.executable, "-c", code, json.dumps(spec)], capture_output=True,
                          text=True, timeout=POINT_TIMEOUT_S, env=env)
    return _point_result(spec, proc.returncode, proc.stdout, proc.stderr)


class PointError(RuntimeError):
    """A point's process ended with an error other than running out of memory."""


def _point_result(spec: dict[str, Any], returncode: int, stdout: str, stderr: str
                  ) -> dict[str, Any]:
    """A finished point's JSON result; OOM for a kill or an out-of-memory error, else raise
    :class:`PointError` with the error's last line."""
    if returncode == 0 and stdout.strip():
        return json.loads(stdout.strip().splitlines()[-1])
    if returncode < 0 or _is_oom(RuntimeError(stderr)):
        return {"peak_bytes": None, "step_seconds": None, "oom": True}
    last = (stderr.strip().splitlines() or ["no output"])[-1]
    raise PointError(f"benchmark point {spec} failed: {last}")


def _recorded(run, spec: dict[str, Any], log) -> dict[str, Any]:
    """``run(spec)``, with a :class:`PointError` recorded as the point's result (null figures
    and ``error``) rather than raised: one point whose kernel fails (a GPU run is minutes of
    lent time) does not cost the points after it. The command reports such points at the end
    and exits 1."""
    try:
        return run(spec)
    except PointError as exc:
        log(f"error  {exc}")
        return {"peak_bytes": None, "step_seconds": None, "error": str(exc)}


class PointServer:
    """Runs CPU points, each in a child process forked from one interpreter that has already
    imported torch and the model code.

    A fresh interpreter per point spends ~2.5 s of a 2-core CPU on imports before its first
    step, about a minute of ``--quick``. A forked child is still a process of its own: its
    peak (VmHWM) starts at what the server held at the fork, a Python + torch process like a
    fresh one, and its allocations die with it. The server never runs torch work itself, so
    no OpenMP thread pool exists to be broken by the fork, and numba is not imported there
    (the softmax points would carry its libraries). Use :func:`run_point` on CUDA.
    """

    def __init__(self) -> None:
        code = "from embseg.bench import _serve_points; _serve_points()"
        self._proc = subprocess.Popen(
            [sys.executable, "-c", code], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
            text=True, env=dict(os.environ, **POINT_ENV), start_new_session=True)

    def run(self, spec: dict[str, Any]) -> dict[str, Any]:
        """:func:`run_point` of ``spec`` in a forked child (same results, same errors)."""
        import select

        assert self._proc.stdin is not None and self._proc.stdout is not None
        self._proc.stdin.write(json.dumps(spec) + "\n")
        self._proc.stdin.flush()
        ready, _, _ = select.select([self._proc.stdout], [], [], POINT_TIMEOUT_S)
        if not ready:
            self.close()
            raise subprocess.TimeoutExpired(f"benchmark point {spec}", POINT_TIMEOUT_S)
        line = self._proc.stdout.readline()
        if not line:
            raise RuntimeError(f"benchmark point {spec} failed: the point server exited "
                               f"({self._proc.wait()})")
        answer = json.loads(line)
        return _point_result(spec, answer["returncode"], answer["stdout"], answer["stderr"])

    def close(self) -> None:
        """Stop the server and any child it is running."""
        if self._proc.poll() is None:
            import signal

            os.killpg(self._proc.pid, signal.SIGKILL)
        self._proc.wait()

    def __enter__(self) -> PointServer:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _serve_points() -> None:
    """The :class:`PointServer` process: one JSON spec per line in, one answer per line out
    (the child's exit code, negative for a signal, and what it printed)."""
    import traceback

    import torch  # noqa: F401 - imported once here, inherited by every forked point

    import embseg.ess  # noqa: F401
    import embseg.models  # noqa: F401

    answers = os.fdopen(os.dup(1), "w")
    os.dup2(2, 1)  # nothing else printed here can reach the answers
    for line in sys.stdin:
        with tempfile.TemporaryFile() as out, tempfile.TemporaryFile() as err:
            sys.stdout.flush()
            sys.stderr.flush()
            pid = os.fork()
            if pid == 0:  # the point
                code = 1
                try:
                    os.dup2(os.open(os.devnull, os.O_RDONLY), 0)
                    os.dup2(out.fileno(), 1)
                    os.dup2(err.fileno(), 2)
                    _run_point_child(line.strip())
                    code = 0
                except BaseException:  # noqa: BLE001 - reported through stderr and the code
                    traceback.print_exc()
                finally:
                    sys.stdout.flush()
                    sys.stderr.flush()
                    os._exit(code)
            _, status = os.waitpid(pid, 0)
            out.seek(0)
            err.seek(0)
            answers.write(json.dumps({
                "returncode": os.waitstatus_to_exitcode(status),
                "stdout": out.read().decode(errors="replace"),
                "stderr": err.read().decode(errors="replace")}) + "\n")
            answers.flush()


# ---------------------------------------------------------------------------------------------
# The four parts


def bench_memory(settings: BenchSettings, log, rows: list[dict[str, Any]] | None = None,
                 on_point=None, run=run_point) -> list[dict[str, Any]]:
    """Part 1: peak memory and step time of a training step, ESS vs softmax, vs C.

    Rows are appended to ``rows`` (a new list by default) and ``on_point()`` runs after each
    one, so a caller can save what is done while the slow points still run."""
    rows = [] if rows is None else rows
    for setting in settings.steps:
        for head, head_name in (("embedding", "ess"), ("softmax", "softmax")):
            for classes in settings.classes:
                spec = {"kind": "step", "device": settings.device, "head": head,
                        "classes": classes, "cpu_memory_cap_gib": settings.cpu_memory_cap_gib,
                        "measured_steps": settings.measured_steps,
                        "measure_seconds": _step_measure_seconds(settings), **asdict(setting)}
                result = _recorded(run, spec, log)
                row = {"head": head_name, "classes": classes, "backbone": setting.backbone,
                       "batch": setting.batch, "image_size_px": setting.size,
                       "output_stride": setting.output_stride, **_measured_fields(result)}
                rows.append(row)
                log(f"step   {head_name:7s} {setting.backbone:11s} C={classes:>7d} "
                    f"{_fmt_peak(row):>10s} {_fmt_seconds(row['step_seconds'])}")
                if on_point is not None:
                    on_point()
    return rows


def bench_step_pairs(settings: BenchSettings, log, run=run_point) -> list[dict[str, Any]]:
    """Part 1b: the ESS step-time goal's two class counts timed alternately in one process
    (:func:`_step_pair_point`), per backbone; an entry with ``"oom": true`` if they do not fit,
    or with ``error`` if the point failed otherwise."""
    pairs = []
    for setting in settings.steps:
        spec = {"kind": "step_pair", "device": settings.device, "head": "embedding",
                "classes_pair": list(settings.step_pair_classes),
                "rounds": settings.step_pair_rounds,
                "cpu_memory_cap_gib": settings.cpu_memory_cap_gib, **asdict(setting)}
        result = _recorded(run, spec, log)
        low, high = settings.step_pair_classes
        pair = {"backbone": setting.backbone, "head": "ess", "classes": [low, high], **{
            key: value for key, value in result.items() if key not in ("classes", "head")}}
        pairs.append(pair)
        if pair.get("ratio_x") is None:
            log(f"pair   ess     {setting.backbone:11s} C={low} vs C={high}: "
                f"{'failed' if pair.get('error') else 'OOM'}")
        else:
            log(f"pair   ess     {setting.backbone:11s} C={high} / C={low} step time "
                f"{pair['ratio_x']:.3f}x (median of {pair['rounds']} alternating rounds)")
    return pairs


def _measured_fields(result: dict[str, Any]) -> dict[str, Any]:
    """A point's figures for its table row, and its ``error`` if it failed (not OOM)."""
    fields = {"peak_bytes": result["peak_bytes"],
              "mapped_file_bytes": result.get("mapped_file_bytes"),
              "step_seconds": result["step_seconds"], "timed_steps": result.get("timed_steps")}
    if result.get("error"):
        fields["error"] = result["error"]
    return fields


def failed_points(result: dict[str, Any]) -> list[str]:
    """The errors of the run's points that failed (not OOM), in the order they ran."""
    rows = (result.get("memory") or []) + (result.get("step_time_pairs") or []) + \
        (result.get("loss") or [])
    return [row["error"] for row in rows if row.get("error")]


def _step_measure_seconds(settings: BenchSettings) -> float:
    return MEASURE_SECONDS if settings.step_measure_seconds is None \
        else settings.step_measure_seconds


def _loss_steps(settings: BenchSettings) -> int:
    return settings.measured_steps if settings.loss_measured_steps is None \
        else settings.loss_measured_steps


def bench_loss(settings: BenchSettings, log, rows: list[dict[str, Any]] | None = None,
               on_point=None, run=run_point) -> list[dict[str, Any]]:
    """Part 2: the loss alone, ess_loss + margin_penalty vs full cross-entropy, vs C (rows and
    ``on_point`` as in :func:`bench_memory`)."""
    rows = [] if rows is None else rows
    batch, height, width = settings.loss_pixels
    for head in ("ess", "softmax"):
        for classes in settings.loss_classes:
            spec = {"kind": "loss", "device": settings.device, "head": head, "classes": classes,
                    "embed_dim": 32, "pixels": list(settings.loss_pixels),
                    "cpu_memory_cap_gib": settings.cpu_memory_cap_gib,
                    "measured_steps": _loss_steps(settings)}
            result = _recorded(run, spec, log)
            row = {"head": head, "classes": classes, "pixels": batch * height * width,
                   **_measured_fields(result)}
            rows.append(row)
            log(f"loss   {head:7s} C={classes:>7d} {_fmt_peak(row):>10s} "
                f"{_fmt_seconds(row['step_seconds'])}")
            if on_point is not None:
                on_point()
    return rows


def bench_build(settings: BenchSettings, workdir: Path, log) -> dict[str, Any]:
    """Part 3: dataset build throughput with 1 worker and with all cores (Ray).

    The two builds are run ``build_rounds`` times, alternating which goes first, and the
    scaling is the median of the rounds' ratios: one build's execute stage lasts a few
    seconds, and on a shared machine one pair of them scattered from 1.41x to 2.05x in a day.
    """
    from embseg.build import build_shards
    from embseg.synth import generate_synthetic

    data = generate_synthetic(workdir / "synth", images=settings.build_images, val_images=0,
                              seed=0, size=settings.build_size)
    all_cores = os.cpu_count() or 1
    builds = itertools.count()
    last_out: dict[int, Path] = {}

    def build(workers: int) -> float:
        out = workdir / f"shards-{workers}-{next(builds)}"  # a new folder: nothing reused
        report = build_shards(lvis=data.lvis_train, coco_stuff=[data.stuff_train],
                              images=data.images_root, out=out, split="train",
                              shard_size=100, workers=workers, progress=False)
        last_out[workers] = out
        log(f"build  workers={workers} {report.images_per_second:8.1f} images/s")
        return report.images_per_second

    one, every = _alternating_rounds(settings.build_rounds, lambda: build(1),
                                     lambda: build(all_cores))
    ratios = [b / a for a, b in zip(one, every, strict=True)]
    return {"images": settings.build_images, "image_size_px": settings.build_size,
            "workers_all": all_cores, "rounds": len(ratios),
            "images_per_second_1_worker": statistics.median(one),
            "images_per_second_all_workers": statistics.median(every),
            "scaling_x": statistics.median(ratios),
            "rounds_images_per_second_1_worker": one,
            "rounds_images_per_second_all_workers": every,
            "rounds_scaling_x": ratios,
            "shards_dir": str(last_out[all_cores])}


def bench_loader(settings: BenchSettings, workdir: Path, shards: Path, log) -> dict[str, Any]:
    """Part 4: training input pipeline (decode + augment) from shards vs from loose files.

    Both sides use the same decode and augmentation, batch size, crop size and number of
    DataLoader workers; only the storage differs (sequential tar reads vs a file per read).
    The two are timed back to back ``loader_rounds`` times, alternating which goes first, and
    the median of the per-round ratios is the result: on a machine shared with other jobs a
    single pair of runs can differ by 2x either way.
    """
    from embseg.data import loader_throughput

    figures = {"batch_size": 8, "crop_size": 128, "num_workers": min(2, os.cpu_count() or 1)}

    def measure(source: str) -> float:
        extra = {"loose_dir": workdir / "loose"} if source == "files" else {}
        return loader_throughput(shards, images=settings.loader_images, source=source,
                                 **figures, **extra)

    def log_round(shard_rate: float, file_rate: float) -> None:
        log(f"loader shards {shard_rate:8.1f} images/s; loose files {file_rate:8.1f} "
            f"images/s ({shard_rate / file_rate:.2f}x)")

    shard_runs, loose_runs = _alternating_rounds(settings.loader_rounds,
                                                 lambda: measure("shards"),
                                                 lambda: measure("files"), log_round)
    ratios = [a / b for a, b in zip(shard_runs, loose_runs, strict=True)]
    cold = _storage_read_rates(shards, workdir / "loose", settings.loader_rounds)
    if cold:
        log(f"read   from storage: shards {cold['images_per_second_shards']:8.1f} images/s; "
            f"loose files {cold['images_per_second_loose_files']:8.1f} images/s "
            f"({cold['speedup_x']:.2f}x)")
    return {"images": settings.loader_images, "batch_size": figures["batch_size"],
            "crop_px": figures["crop_size"], "num_workers": figures["num_workers"],
            "rounds": len(ratios),
            "images_per_second_shards": statistics.median(shard_runs),
            "images_per_second_loose_files": statistics.median(loose_runs),
            "speedup_x": statistics.median(ratios),
            "rounds_images_per_second_shards": shard_runs,
            "rounds_images_per_second_loose_files": loose_runs,
            "rounds_speedup_x": ratios, "storage_read": cold}


def _drop_from_page_cache(paths: list[Path]) -> None:
    """Ask the kernel to drop the files' cached pages (written back first, so none stays
    dirty); needs ``posix_fadvise``. Nothing but the cache changes."""
    for path in paths:
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fdatasync(fd)
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)


def _storage_read_rates(shards_dir: Path, loose_dir: Path, rounds: int
                        ) -> dict[str, Any] | None:
    """Samples per second read from storage, without decoding: every shard through the
    loader's tar reader vs every loose image + label file, each from a dropped page cache.

    The decode + augment comparison above reads both sides from the page cache, where a file
    open costs microseconds; what shards are for is the read from storage (a file per image
    and label against a few sequential reads). Rounds alternate which side goes first; the
    median of their ratios is the result. None where the page cache cannot be dropped.
    """
    from embseg.data import BadItem, list_shards, read_shard

    tars = list_shards(shards_dir)
    loose = sorted(loose_dir.glob("*.jpg"))
    files = [path for image in loose for path in (image, image.with_suffix(".png"))]
    if not tars or not files or not hasattr(os, "posix_fadvise"):
        return None

    def shard_rate() -> float:
        _drop_from_page_cache(tars)
        started, samples = time.perf_counter(), 0
        for tar in tars:
            samples += sum(not isinstance(item, BadItem) for item in read_shard(tar))
        return samples / (time.perf_counter() - started)

    def file_rate() -> float:
        _drop_from_page_cache(files)
        started = time.perf_counter()
        for path in files:
            path.read_bytes()
        return len(loose) / (time.perf_counter() - started)

    shard_runs, loose_runs = _alternating_rounds(rounds, shard_rate, file_rate)
    ratios = [a / b for a, b in zip(shard_runs, loose_runs, strict=True)]
    return {"samples": len(loose), "rounds": len(ratios),
            "images_per_second_shards": statistics.median(shard_runs),
            "images_per_second_loose_files": statistics.median(loose_runs),
            "speedup_x": statistics.median(ratios), "rounds_speedup_x": ratios}


# ---------------------------------------------------------------------------------------------
# Reporting


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


def _memory_goals(result: dict[str, Any]) -> list[tuple[str, bool, str]]:
    """The peak-memory and step-time goals of the first backbone's training-step rows."""
    out = []
    memory = [r for r in result["memory"] if r["backbone"] == result["memory"][0]["backbone"]]
    classes = sorted({r["classes"] for r in memory})
    lo, hi = classes[0], classes[-1]
    mem_ratio = _ratio(_point(memory, "ess", hi, "peak_bytes"),
                       _point(memory, "ess", lo, "peak_bytes"))
    # on CPU the goal also holds without the libraries' resident pages, a share that the
    # page cache sets and that would dilute any growth
    anon_ratio = _ratio(_without_mapped_files(memory, "ess", hi),
                        _without_mapped_files(memory, "ess", lo))
    detail = f"{mem_ratio and round(mem_ratio, 3)}x"
    if anon_ratio is not None:
        detail += f"; {anon_ratio:.3f}x without mapped files"
    out.append((f"ESS peak memory at C={hi} <= 1.10x that at C={lo}",
                mem_ratio is not None and mem_ratio <= 1.10
                and (anon_ratio is None or anon_ratio <= 1.10), detail))
    pair = step_time_pair(result)
    if pair is not None:
        time_ratio = pair.get("ratio_x")
        low, high = pair["classes"]
        out.append((f"ESS step time at C={high} <= 1.15x that at C={low}",
                    time_ratio is not None and time_ratio <= 1.15,
                    f"{time_ratio and round(time_ratio, 3)}x, median of "
                    f"{pair.get('rounds')} alternating rounds in one process"))
    elif 1284 in classes:
        time_ratio = _ratio(_point(memory, "ess", 1284, "step_seconds"),
                            _point(memory, "ess", lo, "step_seconds"))
        out.append((f"ESS step time at C=1284 <= 1.15x that at C={lo}",
                    time_ratio is not None and time_ratio <= 1.15,
                    f"{time_ratio and round(time_ratio, 3)}x"))
    return out


def goals(result: dict[str, Any]) -> list[tuple[str, bool, str]]:
    """The goals of the parts the run has, as (name, passed, detail); a missing figure fails
    its goal."""
    out = _memory_goals(result) if result.get("memory") else []
    if result.get("build"):
        scaling = result["build"]["scaling_x"]
        out.append((f"build scaling >= 1.6x on {result['build']['workers_all']} workers",
                    scaling >= 1.6, f"{scaling:.2f}x"))
    if result.get("loader"):
        speed = result["loader"]["speedup_x"]
        out.append(("shard loader at least as fast as loose files", speed >= 1.0,
                    f"{speed:.3f}x"))
    return out


def step_time_pair(result: dict[str, Any]) -> dict[str, Any] | None:
    """The alternating step-time measurement of the first backbone, if the run has one."""
    if not result.get("memory"):
        return None
    backbone = result["memory"][0]["backbone"]
    for pair in result.get("step_time_pairs") or []:
        if pair["backbone"] == backbone:
            return pair
    return None


def softmax_ess_ratio(result: dict[str, Any], classes: int = 1284) -> float | None:
    """Peak memory of the softmax head over the ESS head's at ``classes`` (None when OOM)."""
    memory = result["memory"]
    return _ratio(_point(memory, "softmax", classes, "peak_bytes"),
                  _point(memory, "ess", classes, "peak_bytes"))


def softmax_ess_ratio_without_mapped_files(result: dict[str, Any], classes: int = 1284
                                           ) -> float | None:
    """:func:`softmax_ess_ratio` of the peaks minus their mapped-file pages (CPU runs)."""
    memory = result["memory"]
    return _ratio(_without_mapped_files(memory, "softmax", classes),
                  _without_mapped_files(memory, "ess", classes))


def _memory_notes(result: dict[str, Any]) -> list[str]:
    """Lines under the training-step table: how peaks were taken, the O(C d) floor, the load."""
    settings = result.get("settings", {})
    lines = [""]
    if settings.get("peak_memory"):
        steps = settings.get("measured_steps_after_warmup")
        budget = settings.get("step_measure_seconds", MEASURE_SECONDS)
        timed = (f"median of the steps timed after those (at least {steps}, more up to "
                 f"{budget:g} s of steps, at most {MAX_MEASURED_STEPS})" if budget
                 else f"median of the {steps} step(s) timed after those")
        lines.append(f"Peak: {settings['peak_memory']} over the first two steps (SGD momentum "
                     f"exists from the second); step time: {timed}, with the allocator "
                     f"caching freed blocks (one untimed step first for steps under "
                     f"{UNTIMED_STEP_MAX_SECONDS:g} s; a slower step's last memory step is its "
                     f"first timed one). Output stride 16, embedding d = 32, k = 7, random "
                     f"weights.")
    if settings.get("point_env"):
        env = " ".join(f"{k}={v}" for k, v in settings["point_env"].items())
        process = settings.get("point_process")
        lines.append(f"Each point's process{f' ({process})' if process else ''}, environment: "
                     f"`{env}`.")
    lines += _mapped_files_lines(result["memory"])
    floor = result.get("class_table_floor_bytes")
    if floor:
        top = max(r["classes"] for r in result["memory"])
        lines.append(f"O(C d) floor of the ESS head at C = {top:,}: table + gradient + SGD "
                     f"momentum + one normalised copy or its gradient = {floor / 2**20:.1f} MiB.")
    return lines + _load_lines(result)


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


def to_markdown(result: dict[str, Any]) -> str:
    """The benchmark as markdown tables (memory, loss, build, loader, goals)."""
    lines = [f"# embseg bench ({result['device']}, {result['date']})"]
    if result.get("versions"):
        lines += ["", ", ".join(f"{name} {version}" for name, version in
                                result["versions"].items() if version is not None) + "."]
    if result.get("complete") is False:
        lines += ["", "Incomplete: the run stopped, or is still running, after the points "
                      "below."]
    memory = result.get("memory") or []
    if memory:
        lines += ["", "## Training step (DeepLabV3+, forward + loss + backward + SGD)", "",
                  "| backbone | batch x size | classes | ESS peak | ESS step | softmax peak "
                  "| softmax step |", "|---|---|---:|---:|---:|---:|---:|"]
    for backbone in dict.fromkeys(r["backbone"] for r in memory):
        rows = [r for r in memory if r["backbone"] == backbone]
        first = rows[0]
        for classes in sorted({r["classes"] for r in rows}):
            lines.append(
                f"| {backbone} | {first['batch']} x {first['image_size_px']}² | {classes:,} | "
                f"{_fmt_peak(_row(rows, 'ess', classes))} | "
                f"{_fmt_seconds(_point(rows, 'ess', classes, 'step_seconds'))} | "
                f"{_fmt_peak(_row(rows, 'softmax', classes))} | "
                f"{_fmt_seconds(_point(rows, 'softmax', classes, 'step_seconds'))} |")
    lines += _memory_notes(result) if memory else ["", *_load_lines(result)]
    for pair in result.get("step_time_pairs") or []:
        low, high = pair["classes"]
        if pair.get("ratio_x") is None:
            lines.append(f"Step time, ESS, {pair['backbone']}, C = {high:,} vs C = {low:,} in "
                         f"one process: {'failed' if pair.get('error') else 'out of memory'}.")
            continue
        lines.append(
            f"Step time, ESS, {pair['backbone']}, C = {high:,} vs C = {low:,}, both models in "
            f"one process, one step of each per round, order alternating: "
            f"{statistics.median(pair['step_seconds_high']):.3f} s vs "
            f"{statistics.median(pair['step_seconds_low']):.3f} s, ratio "
            f"{pair['ratio_x']:.3f}x (median of {pair['rounds']} rounds: "
            + ", ".join(f"{r:.2f}" for r in pair["rounds_ratio_x"]) + "). The goal uses this "
            "ratio, not the table's separate processes.")
    loss = result.get("loss") or []
    if loss:
        lines += ["", f"## Loss alone ({loss[0]['pixels']:,} pixels, forward + backward)", "",
                  "| classes | ESS peak | ESS time | full CE peak | full CE time |",
                  "|---:|---:|---:|---:|---:|"]
        for classes in sorted({r["classes"] for r in loss}):
            lines.append(
                f"| {classes:,} | {_fmt_peak(_row(loss, 'ess', classes))} | "
                f"{_fmt_seconds(_point(loss, 'ess', classes, 'step_seconds'))} | "
                f"{_fmt_peak(_row(loss, 'softmax', classes))} | "
                f"{_fmt_seconds(_point(loss, 'softmax', classes, 'step_seconds'))} |")
        mapped = _mapped_files_lines(loss)
        lines += ["", *mapped] if mapped else []
    if result.get("build"):
        b = result["build"]
        lines += ["", "## Dataset build", "",
                  f"{b['images']} synthetic images of {b['image_size_px']} px: "
                  f"{b['images_per_second_1_worker']:.1f} images/s with 1 worker, "
                  f"{b['images_per_second_all_workers']:.1f} images/s with "
                  f"{b['workers_all']} workers ({b['scaling_x']:.2f}x)"
                  + _rounds_note(b.get("rounds_scaling_x"), "alternating") + "."]
    if result.get("loader"):
        ld = result["loader"]
        lines += ["", "## Training input pipeline (decode + augment)", "",
                  (f"Shards ({ld['shards']}): " if ld.get("shards") else "Shards: ")
                  + f"{ld['images_per_second_shards']:.1f} images/s; loose JPEG/PNG files: "
                  f"{ld['images_per_second_loose_files']:.1f} images/s ({ld['speedup_x']:.3f}x)"
                  + _rounds_note(ld.get("rounds_speedup_x"), "back-to-back") + "."]
        cold = ld.get("storage_read")
        if cold:
            lines += ["", f"Read from storage alone (page cache dropped, no decoding, all "
                          f"{cold['samples']} samples): shards "
                          f"{cold['images_per_second_shards']:.0f} samples/s, loose files "
                          f"{cold['images_per_second_loose_files']:.0f} samples/s "
                          f"({cold['speedup_x']:.2f}x, median of {cold['rounds']} rounds)."]
    failed = failed_points(result)
    if failed:
        lines += ["", f"## Failed points ({len(failed)})", "", *[f"- {error}" for error in failed]]
    ratio = result.get("softmax_over_ess_memory_at_1284")
    lines += ["", "## Goals", ""]
    lines += [f"- {'PASS' if ok else 'FAIL'}: {name} ({detail})" for name, ok, detail in goals(result)]
    if memory:
        anon = softmax_ess_ratio_without_mapped_files(result)
        lines.append(f"- softmax/ESS peak memory at C=1284: "
                     f"{_missing_ratio(memory) if ratio is None else f'{ratio:.2f}x'}"
                     + ("" if anon is None else f" ({anon:.2f}x without mapped files)"))
    return "\n".join(lines) + "\n"


def _missing_ratio(memory: list[dict[str, Any]]) -> str:
    """Why the softmax/ESS ratio at 1,284 classes is missing."""
    if _point(memory, "softmax", 1284, "error") or _point(memory, "ess", 1284, "error"):
        return "a point failed"
    return "softmax OOM"


def plot(result: dict[str, Any], path: Path) -> None:
    """Peak memory vs class count (log x axis), both heads, one line per backbone."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    memory = result["memory"]
    for backbone in dict.fromkeys(r["backbone"] for r in memory):
        for head, style in (("ess", "o-"), ("softmax", "s--")):
            rows = [r for r in memory if r["backbone"] == backbone and r["head"] == head]
            xs = [r["classes"] for r in rows if r["peak_bytes"] is not None]
            ys = [r["peak_bytes"] / 2**30 for r in rows if r["peak_bytes"] is not None]
            ax.plot(xs, ys, style, label=f"{head} ({backbone})")
            for r in rows:
                if r["peak_bytes"] is None:
                    ax.annotate(_fmt_peak(r), (r["classes"], ax.get_ylim()[1] if ys else 0),
                                ha="center", fontsize=8)
    ax.set_xscale("log")
    ax.set_xlabel("classes C")
    ax.set_ylabel("peak memory (GiB)")
    ax.set_title(f"Training step peak memory, {result['device']}")
    ax.legend()
    ax.grid(True, which="both", alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def software_versions() -> dict[str, str | None]:
    """Python and the packages the figures depend on (None: not installed)."""
    from importlib import metadata

    import torch

    versions: dict[str, str | None] = {"python": platform.python_version(),
                                       "torch": torch.__version__,
                                       "cuda": torch.version.cuda}
    for package in ("numpy", "numba", "pillow"):
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
            "step_pair_rounds": settings.step_pair_rounds}


def class_table_floor_bytes(settings: BenchSettings) -> int:
    """The ESS head's O(C d) memory at the largest C: the float32 table, its gradient, its SGD
    momentum and one normalised copy (or, in the backward pass, that copy's gradient)."""
    return 4 * max(settings.classes) * settings.steps[0].embed_dim * 4


PARTS = ("memory", "loss", "build", "loader")
"""The parts of a run: training step (with the step-time pair), loss alone, build, loader."""


def check_parts(parts: tuple[str, ...], shards: Path | None) -> None:
    """EmbsegError unless ``parts`` are known and the loader has shards to read."""
    from embseg.errors import EmbsegError

    unknown = [part for part in parts if part not in PARTS]
    if unknown or not parts:
        raise EmbsegError(f"--parts: unknown part(s) {', '.join(unknown) or '(none given)'}; "
                          f"choose from {', '.join(PARTS)}")
    if "loader" in parts and "build" not in parts and shards is None:
        raise EmbsegError("--parts: the loader reads the build part's shards; add build to "
                          "--parts or give --shards DIR")
    if shards is not None and not any(shards.glob("*.tar")):
        raise EmbsegError(f"{shards}: --shards: no .tar shards in this folder")


def run_bench(*, quick: bool, gpu_sizes: bool, out: Path, json_path: Path | None,
              parts: tuple[str, ...] = PARTS, shards: Path | None = None,
              log=print) -> dict[str, Any]:
    """Run the chosen parts and write JSON, markdown and (with the memory part) the memory
    plot under ``out``. ``shards``: the loader reads these (the user's own data) instead of
    the build part's synthetic shards."""
    import torch

    check_parts(parts, shards)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    if gpu_sizes and device != "cuda":
        from embseg.errors import EmbsegError

        raise EmbsegError("--gpu-sizes needs a CUDA GPU; none is visible to torch")
    settings = settings_for(quick=quick, gpu_sizes=gpu_sizes, device=device)
    out.mkdir(parents=True, exist_ok=True)
    started = time.time()
    result: dict[str, Any] = {"device": device_name(device),
                              "date": time.strftime("%Y-%m-%d"),
                              "versions": software_versions(),
                              "settings": {**settings_record(settings, quick=quick,
                                                             gpu_sizes=gpu_sizes),
                                           "parts": list(parts)},
                              "units": {"peak_bytes": "bytes", "step_seconds": "seconds"},
                              "load_average_1_5_15_before": list(os.getloadavg()),
                              "memory": [], "step_time_pairs": [], "loss": [],
                              "build": None, "loader": None}
    part_seconds: dict[str, float] = {}
    json_path = json_path or out / "bench.json"

    def save(complete: bool = False, with_plot: bool = True) -> None:
        _write_outputs(result, settings, out=out, json_path=json_path,
                       part_seconds=part_seconds, started=started, complete=complete,
                       with_plot=with_plot)

    def save_point() -> None:  # the plot waits for the end of the part
        save(with_plot=False)

    def timed_part(name: str, run):
        part_started = time.time()
        value = run()
        part_seconds[name] = round(time.time() - part_started, 1)
        return value

    with contextlib.ExitStack() as stack:
        run = run_point
        if device == "cpu" and ("memory" in parts or "loss" in parts):
            run = stack.enter_context(PointServer()).run
        if "memory" in parts:
            timed_part("memory", lambda: bench_memory(settings, log, result["memory"],
                                                      save_point, run))
            result["step_time_pairs"] = timed_part(
                "step_time_pairs", lambda: bench_step_pairs(settings, log, run))
            save()
        if "loss" in parts:
            timed_part("loss", lambda: bench_loss(settings, log, result["loss"], save_point,
                                                  run))
    with tempfile.TemporaryDirectory(prefix="embseg-bench-") as tmp:
        loader_shards = shards
        if "build" in parts:
            result["build"] = timed_part("build", lambda: bench_build(settings, Path(tmp), log))
            built = Path(result["build"].pop("shards_dir"))
            loader_shards = loader_shards or built
            save()
        if "loader" in parts:
            result["loader"] = timed_part("loader", lambda: bench_loader(
                settings, Path(tmp), loader_shards, log))
            if shards is not None:
                result["loader"]["shards"] = str(shards)
    save(complete=True)
    return result


def _write_outputs(result: dict[str, Any], settings: BenchSettings, *, out: Path,
                   json_path: Path, part_seconds: dict[str, float], started: float,
                   complete: bool, with_plot: bool = True) -> None:
    """Derived figures, then the JSON, the markdown and (with memory rows and ``with_plot``)
    the plot; called after every point (JSON and markdown) and part (all three), so a run
    cut short still leaves what it measured."""
    result["complete"] = complete
    result["part_seconds"] = dict(part_seconds)
    result["softmax_over_ess_memory_at_1284"] = softmax_ess_ratio(result)
    result["softmax_over_ess_memory_at_1284_without_mapped_files"] = \
        softmax_ess_ratio_without_mapped_files(result)
    result["goals"] = [{"goal": n, "passed": ok, "value": d} for n, ok, d in goals(result)]
    result["failed_points"] = failed_points(result)
    if result["memory"]:
        result["class_table_floor_bytes"] = class_table_floor_bytes(settings)
    result["load_average_1_5_15_after"] = list(os.getloadavg())
    result["total_seconds"] = time.time() - started
    json_path.parent.mkdir(parents=True, exist_ok=True)
    json_path.write_text(json.dumps(result, indent=2) + "\n")
    (out / "bench.md").write_text(to_markdown(result))
    if result["memory"] and with_plot:
        plot(result, out / "memory_vs_classes.png")


def cli_bench(args: argparse.Namespace) -> int:
    """``embseg bench``: prints progress, the tables and the pass/fail goal lines; exits 1
    when a point failed with an error other than running out of memory."""
    parts = tuple(part.strip() for part in args.parts.split(",") if part.strip())
    result = run_bench(quick=args.quick, gpu_sizes=args.gpu_sizes, out=args.out,
                       json_path=args.json, parts=parts, shards=args.shards)
    print()
    print(to_markdown(result))
    written = [args.json or args.out / "bench.json", args.out / "bench.md"]
    if result["memory"]:
        written.append(args.out / "memory_vs_classes.png")
    print(f"wrote {', '.join(str(path) for path in written)} in "
          f"{result['total_seconds']:.0f} s")
    failed = failed_points(result)
    if failed:
        print(f"embseg bench: {len(failed)} point(s) failed (not out of memory); their errors "
              f"are under 'Failed points' in bench.md", file=sys.stderr)
        return 1
    return 0
