"""Part ``loader``: the training input pipeline (decode + augment) reading shards vs loose files,
and the read from storage alone (page cache dropped, no decoding).
"""

from __future__ import annotations

import os
import statistics
import time
from pathlib import Path
from typing import Any

from embseg.bench.core import BenchSettings, Part, PartRun, _alternating_rounds, _rounds_note


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


def markdown(result: dict[str, Any]) -> list[str]:
    """The loader throughput line, and the read from storage alone."""
    if not result.get("loader"):
        return []
    ld = result["loader"]
    lines = ["", "## Training input pipeline (decode + augment)", "",
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
    return lines


def goals(result: dict[str, Any]) -> list[tuple[str, bool, str]]:
    """The shard loader at least as fast as loose files."""
    if not result.get("loader"):
        return []
    speed = result["loader"]["speedup_x"]
    return [("shard loader at least as fast as loose files", speed >= 1.0, f"{speed:.3f}x")]


def check(parts: tuple[str, ...], shards: Path | None) -> None:
    """The loader needs shards: the build part's, or ``--shards``."""
    if "build" not in parts and shards is None:
        from embseg.errors import EmbsegError

        raise EmbsegError("--parts: the loader reads the build part's shards; add build to "
                          "--parts or give --shards DIR")


def run(ctx: PartRun) -> None:
    """The loader rounds, on the user's shards or else the build part's."""
    ctx.result["loader"] = ctx.timed("loader", lambda: bench_loader(
        ctx.settings, ctx.workdir, ctx.shards or ctx.built_shards, ctx.log))
    if ctx.shards is not None:
        ctx.result["loader"]["shards"] = str(ctx.shards)


PART = Part(name="loader", run=run, results={"loader": None}, markdown=markdown, goals=goals,
            check=check)
