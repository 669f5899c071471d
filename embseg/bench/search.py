"""Part ``search``: the loss's exact nearest-class search, ``embseg.ess.knn_classes`` against
its peer, faiss's exact ``IndexFlatL2`` (faiss-cpu; faiss-gpu on a GPU when it is installed).

Same N pixels, C classes, d and k on both sides, in one run: unit-length random pixel and
class embeddings (what the ESS head feeds the search), the k nearest classes of every pixel.
Each (side, C) is a point in a process of its own (so each peak is its own), run in
alternating order over :attr:`~embseg.bench.core.BenchSettings.search_rounds` rounds; a point
times :attr:`~embseg.bench.core.BenchSettings.search_calls` calls after one warm-up call.
faiss is timed building its index and searching, since the loss searches a class table that
changed at the last step. The ids of both sides are compared: rows whose k ids differ are
checked to be distance ties (float64 distances of both lists). faiss is the bench extra
(``pip install 'embseg[bench]'``); without it the part measures ``knn_classes`` alone and
says so.
"""

from __future__ import annotations

import importlib.util
import statistics
from pathlib import Path
from typing import Any

from embseg.bench.core import (
    BenchSettings,
    Part,
    PartRun,
    _fmt_bytes,
    _fmt_seconds,
    _peak_rss_bytes,
    _proc_status_bytes,
)
from embseg.bench.points import _recorded

SIDES = ("knn_classes", "faiss")
TIE_TOLERANCE = 1e-5
"""Rows whose ids differ count as ties when their squared distances agree to this (float32
distances of unit vectors carry ~1e-7 relative error)."""


def search_data(pixels: int, classes: int, dim: int, seed: int = 0):
    """Unit-length (pixels, d) and (classes, d) float32 embeddings, the same in every process
    (drawn on the CPU from a seeded generator)."""
    import torch
    import torch.nn.functional as F

    generator = torch.Generator().manual_seed(seed)
    queries = F.normalize(torch.randn(pixels, dim, generator=generator), dim=1)
    table = F.normalize(torch.randn(classes, dim, generator=generator), dim=1)
    return queries.contiguous(), table.contiguous()


def faiss_available() -> bool:
    """True when faiss can be imported (the ``bench`` extra)."""
    return importlib.util.find_spec("faiss") is not None


def peer_missing(device: str) -> str | None:
    """Why faiss cannot be the peer on ``device`` (None: it can): not installed, or on CUDA
    a faiss without GPU support (faiss-cpu) or without a visible GPU."""
    if not faiss_available():
        return "faiss is not installed (pip install 'embseg[bench]')"
    if device == "cuda":
        import faiss

        if not hasattr(faiss, "GpuIndexFlatL2") or faiss.get_num_gpus() < 1:
            return "this faiss has no GPU support (faiss-gpu is not installed)"
    return None


def _searcher(side: str, queries, table, k: int, device):
    """A function running one search of ``side`` and returning its (N, k) ids as numpy."""
    if side == "knn_classes":
        from embseg.ess import knn_classes

        queries, table = queries.to(device), table.to(device)

        def search():
            return knn_classes(queries, table, k).cpu().numpy()

        return search
    import faiss

    if device.type == "cuda":
        if not hasattr(faiss, "GpuIndexFlatL2"):
            raise RuntimeError("faiss-gpu is not installed (faiss has no GPU index here)")
        import faiss.contrib.torch_utils  # noqa: F401 - faiss indexes take torch tensors

        resources = faiss.StandardGpuResources()
        queries, table = queries.to(device), table.to(device)

        def search():
            index = faiss.GpuIndexFlatL2(resources, table.shape[1])
            index.add(table)
            return index.search(queries, k)[1].cpu().numpy()

        return search
    queries_np, table_np = queries.numpy(), table.numpy()

    def search():
        index = faiss.IndexFlatL2(table_np.shape[1])
        index.add(table_np)
        return index.search(queries_np, k)[1]

    return search


def _search_point(spec: dict[str, Any]) -> dict[str, Any]:
    """One side at one C: peak memory over the warm-up and timed calls (also as the growth over
    the process's size just before them), each call's seconds, the threads, and the ids
    (saved to ``spec["ids_path"]``)."""
    import time

    import numpy as np
    import torch

    device = torch.device(spec["device"])
    queries, table = search_data(spec["pixels"], spec["classes"], spec["dim"])
    # a first search of a few rows loads and compiles the side's code (numba's kernels), so
    # the memory over the start is the search's own
    _searcher(spec["side"], queries[:64].clone(), table, spec["k"], device)()
    search = _searcher(spec["side"], queries, table, spec["k"], device)
    threads = torch.get_num_threads()
    if spec["side"] == "faiss":
        import faiss

        threads = faiss.omp_get_max_threads()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        before = torch.cuda.memory_allocated(device)
    else:
        before = _proc_status_bytes("VmRSS")
    ids = search()  # warm-up (and the ids)
    times = []
    for _ in range(max(1, spec["calls"])):
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        started = time.perf_counter()
        search()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        times.append(time.perf_counter() - started)
    if device.type == "cuda":
        # faiss-gpu allocates through its own resources, which torch does not count
        peak = torch.cuda.max_memory_allocated(device) if spec["side"] == "knn_classes" else None
    else:
        peak = _peak_rss_bytes()
    np.save(spec["ids_path"], ids.astype(np.int64))
    return {"peak_bytes": peak, "peak_over_start_bytes": None if peak is None or before is None
            else max(0, peak - before), "call_seconds": times,
            "step_seconds": min(times), "threads": threads}


def compare_ids(knn_ids, faiss_ids, queries, table) -> dict[str, Any]:
    """How far the two sides' ids agree: identical rows, and for the others whether the two
    lists are distance ties (the largest gap between their float64 squared distances, rank
    by rank: two lists nearest-first differ only by swapping equally distant classes)."""
    import numpy as np

    knn_ids, faiss_ids = np.asarray(knn_ids), np.asarray(faiss_ids)
    differ = np.flatnonzero((knn_ids != faiss_ids).any(axis=1))
    gap = 0.0
    if differ.size:
        q = queries.double().numpy()[differ]
        t = table.double().numpy()

        def distances(ids):
            rows = t[ids[differ]]  # (m, k, d)
            return ((rows - q[:, None, :]) ** 2).sum(-1)  # rank by rank: nearest first

        gap = float(np.abs(distances(knn_ids) - distances(faiss_ids)).max())
    return {"rows": int(knn_ids.shape[0]), "identical_rows": int(knn_ids.shape[0] - differ.size),
            "differing_rows": int(differ.size), "max_distance_gap": gap,
            "differences_are_ties": gap <= TIE_TOLERANCE}


def bench_search(settings: BenchSettings, log, rows: list[dict[str, Any]], workdir: Path,
                 run, on_point=None, have_faiss: bool | None = None) -> list[dict[str, Any]]:
    """For each C: both sides over alternating rounds, a row each, then the ids compared."""
    import numpy as np

    missing = peer_missing(settings.device) if have_faiss is None else \
        None if have_faiss else "faiss is not installed (pip install 'embseg[bench]')"
    sides = SIDES if missing is None else SIDES[:1]
    if missing is not None:
        log(f"search: {missing}: knn_classes alone")
    for classes in settings.search_classes:
        found: dict[str, list[dict[str, Any]]] = {side: [] for side in sides}

        def point(side: str, round_index: int, classes: int = classes, found=found) -> None:
            ids_path = workdir / f"search-{side}-{classes}-{round_index}.npy"
            spec = {"kind": "search", "device": settings.device, "side": side,
                    "classes": classes, "pixels": settings.search_pixels,
                    "dim": settings.search_dim, "k": settings.search_k,
                    "calls": settings.search_calls, "ids_path": str(ids_path),
                    "cpu_memory_cap_gib": settings.cpu_memory_cap_gib}
            result = _recorded(run, spec, log)
            found[side].append({**result, "ids_path": ids_path})

        for round_index in range(settings.search_rounds):  # alternating which side leads
            for side in sides if round_index % 2 == 0 else sides[::-1]:
                point(side, round_index)
        agreement = None
        if len(sides) == 2 and all(r.get("ids_path", Path()).is_file()
                                   for side in sides for r in found[side][:1]):
            queries, table = search_data(settings.search_pixels, classes, settings.search_dim)
            agreement = compare_ids(np.load(found["knn_classes"][0]["ids_path"]),
                                    np.load(found["faiss"][0]["ids_path"]), queries, table)
        for side in sides:
            row = _side_row(side, classes, settings, found[side], agreement)
            rows.append(row)
            log(f"search {side:11s} C={classes:>6d} min {_fmt_seconds(row['min_seconds'])} "
                f"median {_fmt_seconds(row['median_seconds'])} peak {_fmt_bytes(row['peak_bytes'])}")
        if on_point is not None:
            on_point()
    return rows


def _side_row(side: str, classes: int, settings: BenchSettings, results: list[dict[str, Any]],
              agreement: dict[str, Any] | None) -> dict[str, Any]:
    """One side's row at one C over its rounds: min and median call seconds, largest peak."""
    times = [t for r in results for t in r.get("call_seconds") or []]
    peaks = [r["peak_bytes"] for r in results if r.get("peak_bytes") is not None]
    growth = [r["peak_over_start_bytes"] for r in results
              if r.get("peak_over_start_bytes") is not None]
    row = {"side": side, "classes": classes, "pixels": settings.search_pixels,
           "dim": settings.search_dim, "k": settings.search_k, "rounds": len(results),
           "calls": len(times), "min_seconds": min(times) if times else None,
           "median_seconds": statistics.median(times) if times else None,
           "round_min_seconds": [r.get("step_seconds") for r in results],
           "peak_bytes": max(peaks) if peaks else None,
           "peak_over_start_bytes": max(growth) if growth else None,
           "threads": next((r.get("threads") for r in results if r.get("threads")), None),
           "ids": agreement}
    errors = [r["error"] for r in results if r.get("error")]
    if errors:
        row["error"] = errors[0]
    return row


def _side(rows: list[dict[str, Any]], side: str, classes: int) -> dict[str, Any] | None:
    return next((r for r in rows if r["side"] == side and r["classes"] == classes), None)


def _ratio_of(rows: list[dict[str, Any]], classes: int, key: str) -> float | None:
    knn, peer = _side(rows, "knn_classes", classes), _side(rows, "faiss", classes)
    if knn is None or peer is None or not knn.get(key) or not peer.get(key):
        return None
    return knn[key] / peer[key]


def markdown(result: dict[str, Any]) -> list[str]:
    """The search table: both sides per C, their ratio and whether the ids agree."""
    rows = result.get("search") or []
    if not rows:
        return []
    first = rows[0]
    lines = ["", f"## Nearest-class search: knn_classes vs faiss IndexFlatL2 (N = "
                 f"{first['pixels']:,} pixels, d = {first['dim']}, k = {first['k']})", "",
             "| classes | knn_classes min / median | faiss min / median | ratio (min) | "
             "knn_classes peak (over start) | faiss peak (over start) | ids |",
             "|---:|---:|---:|---:|---:|---:|---|"]
    for classes in sorted({r["classes"] for r in rows}):
        knn, peer = _side(rows, "knn_classes", classes), _side(rows, "faiss", classes)
        ratio = _ratio_of(rows, classes, "min_seconds")
        lines.append(f"| {classes:,} | {_times(knn)} | {_times(peer)} | "
                     f"{'-' if ratio is None else f'{ratio:.2f}x'} | {_peaks(knn)} | "
                     f"{_peaks(peer)} | {_ids(knn)} |")
    threads = {r["side"]: r.get("threads") for r in rows}
    lines += ["", f"Threads: knn_classes {threads.get('knn_classes')}, faiss "
                  f"{threads.get('faiss', '-')}; faiss times include building its index (the "
                  f"loss searches a class table that changed at the last step). Peaks are the "
                  f"point process's (over start: above its size just before the first call)."]
    if not any(r["side"] == "faiss" for r in rows):
        lines += ["", f"No peer row: {result.get('search_peer_missing') or 'faiss missing'}."]
    return lines


def _times(row: dict[str, Any] | None) -> str:
    if row is None:
        return "-"
    if row.get("error"):
        return "error"
    return f"{_fmt_seconds(row['min_seconds'])} / {_fmt_seconds(row['median_seconds'])}"


def _peaks(row: dict[str, Any] | None) -> str:
    if row is None or row.get("error"):
        return "-"
    if row["peak_bytes"] is None:
        return "not counted" if row["side"] == "faiss" else "OOM"
    return f"{_fmt_bytes(row['peak_bytes'])} ({_fmt_bytes(row['peak_over_start_bytes'])})"


def _ids(row: dict[str, Any] | None) -> str:
    ids = (row or {}).get("ids")
    if not ids:
        return "-"
    if not ids["differing_rows"]:
        return f"identical ({ids['rows']:,} rows)"
    ties = "ties" if ids["differences_are_ties"] else "NOT ties"
    return (f"{ids['differing_rows']:,} of {ids['rows']:,} rows differ ({ties}, largest "
            f"distance gap {ids['max_distance_gap']:.1e})")


def goals(result: dict[str, Any]) -> list[tuple[str, bool, str]]:
    """knn_classes at least as fast as faiss (fastest calls) at each C, with the same ids up
    to distance ties; none without faiss rows."""
    rows = result.get("search") or []
    out = []
    for classes in sorted({r["classes"] for r in rows if r["side"] == "faiss"}):
        ratio = _ratio_of(rows, classes, "min_seconds")
        ids = (_side(rows, "knn_classes", classes) or {}).get("ids") or {}
        same = bool(ids) and (ids["differing_rows"] == 0 or ids["differences_are_ties"])
        detail = ("no figure" if ratio is None else
                  f"{ratio:.2f}x faiss's time; ids "
                  f"{'identical' if ids.get('differing_rows') == 0 else 'equal up to ties' if same else 'differ'}")
        out.append((f"knn_classes at C={classes:,} at least as fast as faiss IndexFlatL2 with "
                    f"the same ids", ratio is not None and ratio <= 1.0 and same, detail))
    return out


def run(ctx: PartRun) -> None:
    """Both sides at each class count, saved after each count."""
    ctx.result["search_peer_missing"] = peer_missing(ctx.settings.device)
    ctx.timed("search", lambda: bench_search(ctx.settings, ctx.log, ctx.result["search"],
                                             ctx.workdir, ctx.run_point, ctx.save_point,
                                             have_faiss=ctx.result["search_peer_missing"] is None))


PART = Part(name="search", run=run, results={"search": [], "search_peer_missing": None},
            markdown=markdown, goals=goals,
            points={"search": _search_point})
