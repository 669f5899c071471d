"""The report of a run: its goals, its failed points, the markdown, and the files written
after every point (JSON, markdown, and each part's figure).
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import Any

from embseg.bench.core import BenchSettings, Goal, _load_lines
from embseg.bench.memory import (
    class_table_floor_bytes,
    softmax_ess_ratio,
    softmax_ess_ratio_without_mapped_files,
)
from embseg.bench.parts import REGISTRY


def goals(result: dict[str, Any]) -> list[Goal]:
    """The goals of the parts the run has, as (name, passed, detail), part by part in registry
    order; a missing figure fails its goal."""
    return [goal for part in REGISTRY.values() for goal in part.goals(result)]


def failed_points(result: dict[str, Any]) -> list[str]:
    """The errors of the run's points that failed (not OOM), in the order they ran: the rows
    of every part's list-valued results."""
    rows = [row for part in REGISTRY.values() for key in part.results
            if isinstance(result.get(key), list) for row in result[key]]
    return [row["error"] for row in rows if row.get("error")]


def to_markdown(result: dict[str, Any]) -> str:
    """The benchmark as markdown: the header, each part's section in registry order (memory,
    loss, build, loader), the failed points, the goals."""
    lines = [f"# embseg bench ({result['device']}, {result['date']})"]
    if result.get("versions"):
        lines += ["", ", ".join(f"{name} {version}" for name, version in
                                result["versions"].items() if version is not None) + "."]
    if result.get("complete") is False:
        lines += ["", "Incomplete: the run stopped, or is still running, after the points "
                      "below."]
    if not result.get("memory"):  # with training-step rows: under their table
        lines += ["", *_load_lines(result)]
    for part in REGISTRY.values():
        lines += part.markdown(result)
    failed = failed_points(result)
    if failed:
        lines += ["", f"## Failed points ({len(failed)})", "", *[f"- {error}" for error in failed]]
    lines += ["", "## Goals", ""]
    lines += [f"- {'PASS' if ok else 'FAIL'}: {name} ({detail})" for name, ok, detail in goals(result)]
    for part in REGISTRY.values():
        lines += part.after_goals(result)
    return "\n".join(lines) + "\n"


def _write_outputs(result: dict[str, Any], settings: BenchSettings, *, out: Path,
                   json_path: Path, part_seconds: dict[str, float], started: float,
                   complete: bool, with_plot: bool = True) -> None:
    """Derived figures, then the JSON, the markdown and (with ``with_plot``) the figure of each
    part that has rows (the memory plot); called after every point (JSON and markdown) and
    part (all three), so a run cut short still leaves what it measured."""
    result["complete"] = complete
    result["part_seconds"] = dict(part_seconds)
    # the memory part's headline figures, at their place in the JSON
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
    for part in REGISTRY.values():
        if part.plot is not None and part.figure and result.get(part.name) and with_plot:
            part.plot(result, out / part.figure)
