"""Part ``memory``: peak memory and step time of a DeepLabV3+ training step, ESS head vs softmax,
as the class count grows; and the step-time goal's two class counts timed alternately in one
process (``step_time_pairs``). Its figure is the memory-vs-classes plot.
"""

from __future__ import annotations

import statistics
from dataclasses import asdict
from pathlib import Path
from typing import Any

from embseg.bench.core import (
    MAX_MEASURED_STEPS,
    MEASURE_SECONDS,
    UNTIMED_STEP_MAX_SECONDS,
    BenchSettings,
    Part,
    PartRun,
    _allocator_keeps_freed_memory,
    _alternating_rounds,
    _fmt_peak,
    _fmt_seconds,
    _load_lines,
    _mapped_files_lines,
    _measure,
    _measured_fields,
    _point,
    _ratio,
    _row,
    _step_measure_seconds,
    _timed_call,
    _without_mapped_files,
)
from embseg.bench.points import _recorded, run_point

# ---------------------------------------------------------------------------------------------
# Points


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


# ---------------------------------------------------------------------------------------------
# The part


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


# ---------------------------------------------------------------------------------------------
# Figures, goals and report


def class_table_floor_bytes(settings: BenchSettings) -> int:
    """The ESS head's O(C d) memory at the largest C: the float32 table, its gradient, its SGD
    momentum and one normalised copy (or, in the backward pass, that copy's gradient)."""
    return 4 * max(settings.classes) * settings.steps[0].embed_dim * 4


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


def markdown(result: dict[str, Any]) -> list[str]:
    """The training-step table with its notes, and the step-time pairs."""
    lines: list[str] = []
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
    lines += _memory_notes(result) if memory else []
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
    return lines


def goals(result: dict[str, Any]) -> list[tuple[str, bool, str]]:
    """The peak-memory and step-time goals (none without training-step rows)."""
    return _memory_goals(result) if result.get("memory") else []


def after_goals(result: dict[str, Any]) -> list[str]:
    """The softmax/ESS peak memory ratio at 1,284 classes, under the goals."""
    memory = result.get("memory") or []
    if not memory:
        return []
    ratio = result.get("softmax_over_ess_memory_at_1284")
    anon = softmax_ess_ratio_without_mapped_files(result)
    return [f"- softmax/ESS peak memory at C=1284: "
            f"{_missing_ratio(memory) if ratio is None else f'{ratio:.2f}x'}"
            + ("" if anon is None else f" ({anon:.2f}x without mapped files)")]


def run(ctx: PartRun) -> None:
    """The training-step points, saved one by one, then the step-time pairs."""
    ctx.timed("memory", lambda: bench_memory(ctx.settings, ctx.log, ctx.result["memory"],
                                             ctx.save_point, ctx.run_point))
    ctx.result["step_time_pairs"] = ctx.timed(
        "step_time_pairs", lambda: bench_step_pairs(ctx.settings, ctx.log, ctx.run_point))
    ctx.save()


PART = Part(name="memory", run=run, results={"memory": [], "step_time_pairs": []},
            markdown=markdown, goals=goals, after_goals=after_goals,
            points={"step": _step_point, "step_pair": _step_pair_point},
            figure="memory_vs_classes.png", plot=plot)
