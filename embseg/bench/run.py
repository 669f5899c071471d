"""The ``embseg bench`` driver: check the chosen parts, run them in the registry's order (the
point parts through one :class:`~embseg.bench.points.PointServer` on CPU), and save after
every point.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from embseg.bench.core import PartRun, device_name, settings_for, settings_record, software_versions
from embseg.bench.parts import PARTS, REGISTRY
from embseg.bench.points import PointServer, run_point
from embseg.bench.report import _write_outputs, failed_points, to_markdown


def check_parts(parts: tuple[str, ...], shards: Path | None) -> None:
    """EmbsegError unless ``parts`` are known, each can run with the others chosen (the loader
    has shards to read), and ``shards`` holds shards."""
    from embseg.errors import EmbsegError

    unknown = [part for part in parts if part not in PARTS]
    if unknown or not parts:
        raise EmbsegError(f"--parts: unknown part(s) {', '.join(unknown) or '(none given)'}; "
                          f"choose from {', '.join(PARTS)}")
    for name in PARTS:
        if name in parts and REGISTRY[name].check is not None:
            REGISTRY[name].check(parts, shards)
    if shards is not None and not any(shards.glob("*.tar")):
        raise EmbsegError(f"{shards}: --shards: no .tar shards in this folder")


def run_bench(*, quick: bool, gpu_sizes: bool, out: Path, json_path: Path | None,
              parts: tuple[str, ...] = PARTS, shards: Path | None = None,
              log=print) -> dict[str, Any]:
    """Run the chosen parts, in registry order, and write JSON, markdown and (with the memory
    part) the memory plot under ``out``. ``shards``: the loader reads these (the user's own
    data) instead of the build part's synthetic shards."""
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
                              **_empty_results()}
    part_seconds: dict[str, float] = {}
    json_path = json_path or out / "bench.json"

    def save(complete: bool = False, with_plot: bool = True) -> None:
        _write_outputs(result, settings, out=out, json_path=json_path,
                       part_seconds=part_seconds, started=started, complete=complete,
                       with_plot=with_plot)

    def timed_part(name: str, run):
        part_started = time.time()
        value = run()
        part_seconds[name] = round(time.time() - part_started, 1)
        return value

    chosen = [part for name, part in REGISTRY.items() if name in parts]  # registry order
    last_with_points = max((i for i, part in enumerate(chosen) if part.points), default=-1)
    with (tempfile.TemporaryDirectory(prefix="embseg-bench-") as tmp,
          contextlib.ExitStack() as server):
        ctx = PartRun(settings=settings, result=result, log=log, run_point=run_point,
                      save=save, timed=timed_part, workdir=Path(tmp), shards=shards)
        if device == "cpu" and last_with_points >= 0:
            ctx.run_point = server.enter_context(PointServer()).run
        for index, part in enumerate(chosen):
            part.run(ctx)
            if index == last_with_points:
                server.close()  # the build and loader parts run without the point server
                ctx.run_point = run_point
    save(complete=True)
    return result


def cli_bench(args: argparse.Namespace) -> int:
    """``embseg bench``: prints progress, the tables and the pass/fail goal lines; exits 1
    when a point failed with an error other than running out of memory."""
    parts = tuple(part.strip() for part in args.parts.split(",") if part.strip())
    result = run_bench(quick=args.quick, gpu_sizes=args.gpu_sizes, out=args.out,
                       json_path=args.json, parts=parts, shards=args.shards)
    print()
    print(to_markdown(result))
    written = [args.json or args.out / "bench.json", args.out / "bench.md"]
    written += [args.out / part.figure for part in REGISTRY.values()
                if part.plot is not None and part.figure and result.get(part.name)]
    print(f"wrote {', '.join(str(path) for path in written)} in "
          f"{result['total_seconds']:.0f} s")
    failed = failed_points(result)
    if failed:
        print(f"embseg bench: {len(failed)} point(s) failed (not out of memory); their errors "
              f"are under 'Failed points' in bench.md", file=sys.stderr)
        return 1
    return 0


def _empty_results() -> dict[str, Any]:
    """Every registered part's result keys with their empty values (a run's JSON has them all,
    whichever parts ran)."""
    return {key: copy.deepcopy(empty) for part in REGISTRY.values()
            for key, empty in part.results.items()}
