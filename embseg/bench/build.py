"""Part ``build``: dataset build throughput (synthetic images to shards) with 1 worker and with
all cores (Ray). Its last shards are what the ``loader`` part reads unless ``--shards`` is given.
"""

from __future__ import annotations

import itertools
import os
import statistics
from pathlib import Path
from typing import Any

from embseg.bench.core import BenchSettings, Part, PartRun, _alternating_rounds, _rounds_note


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


def markdown(result: dict[str, Any]) -> list[str]:
    """The build throughput line."""
    if not result.get("build"):
        return []
    b = result["build"]
    return ["", "## Dataset build", "",
            f"{b['images']} synthetic images of {b['image_size_px']} px: "
            f"{b['images_per_second_1_worker']:.1f} images/s with 1 worker, "
            f"{b['images_per_second_all_workers']:.1f} images/s with "
            f"{b['workers_all']} workers ({b['scaling_x']:.2f}x)"
            + _rounds_note(b.get("rounds_scaling_x"), "alternating") + "."]


def goals(result: dict[str, Any]) -> list[tuple[str, bool, str]]:
    """Build scaling of at least 1.6x on all cores."""
    if not result.get("build"):
        return []
    scaling = result["build"]["scaling_x"]
    return [(f"build scaling >= 1.6x on {result['build']['workers_all']} workers",
             scaling >= 1.6, f"{scaling:.2f}x")]


def run(ctx: PartRun) -> None:
    """The builds; their last shards are left for the loader part."""
    ctx.result["build"] = ctx.timed("build", lambda: bench_build(ctx.settings, ctx.workdir,
                                                                 ctx.log))
    ctx.built_shards = Path(ctx.result["build"].pop("shards_dir"))
    ctx.save()


PART = Part(name="build", run=run, results={"build": None}, markdown=markdown, goals=goals)
