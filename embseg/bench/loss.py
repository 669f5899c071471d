"""Part ``loss``: the loss alone, forward and backward, ESS (``ess_loss`` + ``margin_penalty``)
vs full softmax cross-entropy, as the class count grows.
"""

from __future__ import annotations

from typing import Any

from embseg.bench.core import (
    BenchSettings,
    Part,
    PartRun,
    _fmt_peak,
    _fmt_seconds,
    _loss_steps,
    _mapped_files_lines,
    _measure,
    _measured_fields,
    _point,
    _row,
)
from embseg.bench.points import _recorded, run_point


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


def markdown(result: dict[str, Any]) -> list[str]:
    """The loss-alone table and its mapped-files line."""
    loss = result.get("loss") or []
    if not loss:
        return []
    lines = ["", f"## Loss alone ({loss[0]['pixels']:,} pixels, forward + backward)", "",
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
    return lines


def run(ctx: PartRun) -> None:
    """The loss points, saved one by one."""
    ctx.timed("loss", lambda: bench_loss(ctx.settings, ctx.log, ctx.result["loss"],
                                         ctx.save_point, ctx.run_point))


PART = Part(name="loss", run=run, results={"loss": []}, markdown=markdown,
            points={"loss": _loss_point})
