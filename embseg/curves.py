"""``RUN/curves.png``: training loss and val mIoU against step, drawn from ``metrics.jsonl``.

The trainer redraws it at each evaluation and at the end, so the picture beside the metrics
is never older than the last val figure. The PNG records where its numbers came from (text
chunks ``Source``: the metrics file, ``Description``: how many points of each curve), so a
picture can be traced back to its run.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from embseg.fileio import write_atomically

LOSS_COLOUR = "#1f77b4"
MIOU_COLOUR = "#d62728"


@dataclass(frozen=True)
class Curves:
    """The plotted series: training loss per step, val mIoU (in %) per evaluation step."""

    loss_steps: list[int]
    losses: list[float]
    eval_steps: list[int]
    val_miou_percent: list[float]

    @classmethod
    def from_rows(cls, rows: list[dict[str, Any]]) -> Curves:
        """The series of ``metrics.jsonl`` rows (``kind`` train / eval); undefined values left out."""
        train = [(r["step"], r["loss"]) for r in rows
                 if r.get("kind") == "train" and _finite(r.get("loss"))]
        evals = [(r["step"], 100 * r["val_miou"]) for r in rows
                 if r.get("kind") == "eval" and _finite(r.get("val_miou"))]
        return cls(loss_steps=[s for s, _ in train], losses=[v for _, v in train],
                   eval_steps=[s for s, _ in evals], val_miou_percent=[v for _, v in evals])


def _finite(value: Any) -> bool:
    return isinstance(value, int | float) and math.isfinite(value)


def write_curves(rows: list[dict[str, Any]], path: Path, *, source: str,
                 title: str | None = None) -> Curves:
    """Draw loss (top) and val mIoU (bottom) against step into the PNG ``path``; return the data.

    A run without validation rows gets the loss panel and a note in the mIoU panel.
    """
    from matplotlib.figure import Figure  # no pyplot: no global state, no GUI backend

    curves = Curves.from_rows(rows)
    figure = Figure(figsize=(7, 5.5), dpi=100, layout="constrained")
    loss_axes, miou_axes = figure.subplots(2, 1, sharex=True)
    loss_axes.plot(curves.loss_steps, curves.losses, color=LOSS_COLOUR, linewidth=1.2)
    loss_axes.set_ylabel("training loss")
    loss_axes.grid(alpha=0.3)
    if curves.eval_steps:
        miou_axes.plot(curves.eval_steps, curves.val_miou_percent, color=MIOU_COLOUR,
                       marker="o", linewidth=1.5)
        best = max(curves.val_miou_percent)
        miou_axes.set_title(f"last {curves.val_miou_percent[-1]:.2f}%, best {best:.2f}%",
                            fontsize=9)
    else:
        miou_axes.text(0.5, 0.5, "no validation in this run (--val-shards)", ha="center",
                       va="center", transform=miou_axes.transAxes, color="gray")
    miou_axes.set_ylabel("val mIoU (%)")
    miou_axes.set_xlabel("step")
    miou_axes.grid(alpha=0.3)
    figure.suptitle(title or "training curves")
    metadata = {"Title": title or "training curves", "Source": source,
                "Description": json.dumps({"loss_points": len(curves.losses),
                                           "val_miou_points": len(curves.eval_steps)})}
    write_atomically(Path(path), lambda tmp: figure.savefig(tmp, format="png",
                                                            metadata=metadata))
    return curves
