"""Small helpers shared by the flows: markdown tables, retry conditions, run names.

Nothing here knows about segmentation; it only shapes what the flows report.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from embseg.errors import EmbsegError


def markdown_table(headers: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    """A GitHub-style markdown table (floats with 4 decimals, NaN as "n/a")."""
    def cell(value: Any) -> str:
        if isinstance(value, float):
            return "n/a" if math.isnan(value) else f"{value:.4f}"
        return str(value).replace("|", "\\|")

    lines = ["| " + " | ".join(headers) + " |", "|" + "---|" * len(headers)]
    lines += ["| " + " | ".join(cell(v) for v in row) + " |" for row in rows]
    return "\n".join(lines)


def retry_unless_bad_input(task: Any, task_run: Any, state: Any) -> bool:
    """Prefect ``retry_condition_fn``: retry infrastructure failures, never bad input.

    An EmbsegError names a file and an item the user must fix; running again cannot help.
    """
    try:
        state.result()
    except EmbsegError:
        return False
    except Exception:  # noqa: BLE001 - anything else may be transient (Ray, file system)
        return True
    return True


def as_path(value: str | Path | None) -> Path | None:
    """Path of a flow parameter (parameters arrive as JSON strings from deployments)."""
    return None if value in (None, "") else Path(value)


def flow_run_label(default: str = "local") -> str:
    """The current flow run's name (stable across retries of that run), else ``default``."""
    from prefect.runtime import flow_run

    return flow_run.get_name() or default
