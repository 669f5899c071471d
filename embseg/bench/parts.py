"""The registry of ``embseg bench``'s parts: the order they run and report in.

Each part is the module ``embseg.bench.<name>`` and describes itself in its ``PART``
(:class:`embseg.bench.core.Part`); registering a part is adding its name to
:data:`PART_MODULES`.
"""

from __future__ import annotations

from collections.abc import Callable
from importlib import import_module
from typing import Any

from embseg.bench.core import Part

PART_MODULES = ("memory", "loss", "search", "build", "loader")
"""The parts, in the order a run runs them and its report lists them."""

REGISTRY: dict[str, Part] = {name: import_module(f"embseg.bench.{name}").PART
                             for name in PART_MODULES}

PARTS = tuple(REGISTRY)
"""The parts of a run: training step (with the step-time pair), loss alone, the loss's
nearest-class search against faiss, build, loader."""


def point_kinds() -> dict[str, Callable[[dict[str, Any]], dict[str, Any]]]:
    """Every part's point kinds, each with the function a point process runs for it."""
    return {kind: point for part in REGISTRY.values() for kind, point in part.points.items()}
