"""Small helpers shared by the flows: markdown tables, retry conditions, run names, and a
guard that keeps forked children (DataLoader workers) of a flow process exiting cleanly.

Nothing here knows about segmentation.
"""

from __future__ import annotations

import math
import os
import threading
from collections.abc import Sequence
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


def flow_run_label(default: str = "local") -> str:
    """``<flow run name>-<first 8 hex digits of its id>``: unique, stable across retries.

    Run folders are named with it, so a retried flow run finds (and resumes) its own run
    while a new flow run never lands in an older one's folder.
    """
    from prefect.runtime import flow_run

    run_id, name = flow_run.get_id(), flow_run.get_name()
    if not run_id or not name:
        return default
    return f"{name}-{str(run_id).replace('-', '')[:8]}"


def _drop_prefect_service_atexits() -> None:
    """In a forked child: forget the parent's Prefect services' thread-exit hooks.

    Prefect 3.8 resets its background services in a forked child (their event is set to
    None) but leaves each service's ``threading._register_atexit`` hook in place; when the
    child exits through multiprocessing, that hook fails an assertion inside
    ``threading._shutdown`` and the child exits with code 1. PyTorch DataLoader workers are
    such children (``embseg.data`` forks them), so without this every train/evaluate stage
    with ``num_workers > 0`` fails inside a flow ("DataLoader worker exited unexpectedly").
    The child never uses the parent's services, so dropping their hooks loses nothing.
    """
    from prefect._internal.concurrency.services import _QueueServiceBase

    hooks = getattr(threading, "_threading_atexits", None)
    if hooks is None:
        return
    hooks[:] = [hook for hook in hooks if not _is_service_exit_hook(hook, _QueueServiceBase)]


def _is_service_exit_hook(hook: Any, service_class: type) -> bool:
    """True for a ``functools.partial`` wrapping a Prefect service's bound ``_at_exit``."""
    method = getattr(hook, "func", hook)
    return getattr(method, "__func__", None) is service_class._at_exit


def install_fork_guard() -> None:
    """Register :func:`_drop_prefect_service_atexits` to run in every forked child (once)."""
    global _FORK_GUARD_INSTALLED
    if not _FORK_GUARD_INSTALLED and hasattr(os, "register_at_fork"):
        os.register_at_fork(after_in_child=_drop_prefect_service_atexits)
        _FORK_GUARD_INSTALLED = True


_FORK_GUARD_INSTALLED = False
install_fork_guard()
