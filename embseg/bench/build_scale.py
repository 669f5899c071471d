"""Part ``build-scale``: the dataset build at the size of LVIS v1 train (``--images N``).

One run writes an LVIS-train-like set (:mod:`embseg.scaleset`: the real density; ``--images``
takes a fraction of it) and measures, side by side:

- the build with all cores into a fresh folder: planning seconds, the driver's peak RSS,
  images/s of the execute stage and end to end (planning, Ray start-up and execute);
- the same build again with nothing changed (the unchanged rebuild), end to end as the
  ``embseg build`` command runs it (interpreter start included);
- the build with 1 worker (on the whole set up to ``SCALING_MAX_IMAGES``, else on a subset
  of ``SCALING_SHARDS_PER_WORKER`` shards per worker, built with 1 worker and with all
  cores): per-core speed, the scaling, and whether the shards are byte-identical;
- a naive serial baseline on a ``NAIVE_SAMPLE``-image subset of the same images: the official
  APIs (``lvis.LVIS`` / ``pycocotools.coco.COCO``) loaded on the subset's files, each
  annotation's full-image mask (``ann_to_mask`` / ``annToMask``) painted over the whole label
  map, then a PNG with Pillow's defaults, one file per image, as the paper's release does it;
- PNG settings: encoding time and size of the sample's label maps per setting (the choice
  in :mod:`embseg.labels`).

Every build runs in a process of its own (``python -m embseg.bench.build_scale POINT``), so
its peak RSS is the driver's alone (Ray's workers are other processes).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from embseg.bench.core import Part, PartRun

TODAY_PER_CORE_IMAGES_PER_SECOND = 36.0
"""Per-core speed of the build before issue 14 (its workers' images/s per core, measured in
the issue on this machine at 10,017 images: 2 workers at 73 images/s in the execute stage)."""
SCALING_MAX_IMAGES = 20_000
SCALING_SHARDS_PER_WORKER = 3
"""Above SCALING_MAX_IMAGES images the scaling is measured on the set's first
``workers x 3`` shards: a whole number of one-shard tasks per worker (5 shards on 2 workers
made one worker build 3 while the other idled)."""
NAIVE_SAMPLE = 1_000
PNG_SAMPLE = 100
POINT_TIMEOUT_S = 7200


def _vocab_dir() -> Path | None:
    """The real category lists (tests/benchmarks only): EMBSEG_VOCAB_DIR, or ../shared/vocab
    beside the checkout."""
    candidates = [os.environ.get("EMBSEG_VOCAB_DIR"),
                  Path(__file__).resolve().parents[3] / "shared" / "vocab"]
    for candidate in candidates:
        if candidate and (Path(candidate) / "lvis_v1_categories.json").is_file():
            return Path(candidate)
    return None


def _categories() -> tuple[list[dict], list[dict], str]:
    folder = _vocab_dir()
    if folder is not None:
        lvis = json.loads((folder / "lvis_v1_categories.json").read_text())
        stuff = json.loads((folder / "coco_stuff_categories.json").read_text())
        return lvis, stuff, f"the real LVIS v1 and COCO-Stuff category lists ({folder})"
    lvis = [{"id": i, "name": f"class_{i:04d}", "synonyms": [f"class_{i:04d}"],
             "frequency": "rfc"[i % 3]} for i in range(1, 1204)]
    stuff = [{"id": i, "name": f"stuff_{i}", "supercategory": "stuff"} for i in range(92, 183)]
    stuff.append({"id": 183, "name": "other", "supercategory": "other"})
    return lvis, stuff, "generated category lists (1203 + 91; the real ones were not found)"


def _run_point(spec: dict[str, Any], log) -> dict[str, Any]:
    """Run one measurement in a fresh interpreter; its JSON answer and the wall seconds."""
    repo = str(Path(__file__).resolve().parents[2])
    env = {**os.environ, "RAY_USAGE_STATS_ENABLED": "0",
           "PYTHONPATH": os.pathsep.join(p for p in (repo, os.environ.get("PYTHONPATH")) if p)}
    load_before = [round(v, 2) for v in os.getloadavg()]
    started = time.perf_counter()
    done = subprocess.run([sys.executable, "-m", "embseg.bench.build_scale", json.dumps(spec)],
                          capture_output=True, text=True, env=env, timeout=POINT_TIMEOUT_S)
    wall = time.perf_counter() - started
    if done.returncode != 0:
        raise RuntimeError(f"build-scale point {spec['kind']} failed (exit {done.returncode}): "
                           f"{done.stderr.strip()[-2000:]}")
    answer = json.loads(done.stdout.strip().splitlines()[-1])
    answer["process_wall_seconds"] = round(wall, 2)
    answer["load_average_1_5_15_before_after"] = [load_before,
                                                  [round(v, 2) for v in os.getloadavg()]]
    log(f"build-scale {spec['kind']} {spec.get('label', '')}: "
        + ", ".join(f"{k}={v}" for k, v in answer.items() if not isinstance(v, (list, dict))))
    return answer


# --------------------------------------------------------------------------- points


def _point_build(spec: dict[str, Any]) -> dict[str, Any]:
    """Plan and execute one build (this process is the driver)."""
    from embseg.bench.core import _peak_rss_bytes
    from embseg.build import execute_plan, plan_build

    started = time.perf_counter()
    plan = plan_build(lvis=Path(spec["lvis"]), coco_stuff=[Path(spec["stuff"])],
                      images=Path(spec["images"]), out=Path(spec["out"]), split="train",
                      shard_size=spec["shard_size"])
    planned = time.perf_counter()
    report = execute_plan(plan, workers=spec["workers"], progress=False)
    finished = time.perf_counter()
    return {
        "workers": spec["workers"], "images": report.n_images, "ok": report.n_ok,
        "failed": report.n_failed, "shards": len(report.shards),
        "reused_shards": report.reused_shards, "plan_from_cache": plan.from_cache,
        "plan_seconds": round(planned - started, 2),
        "execute_seconds": round(report.seconds, 2),
        "ray_start_seconds": round(finished - planned - report.seconds, 2),
        "build_seconds": round(finished - started, 2),
        "execute_images_per_second": round(report.images_per_second, 1),
        "worker_cpu_seconds": round(report.worker_cpu_seconds, 1),
        "images_per_worker_cpu_second": round(
            (report.n_images - report.reused_shards * spec["shard_size"])
            / report.worker_cpu_seconds, 1) if report.worker_cpu_seconds else None,
        "end_to_end_images_per_second": round(report.n_images / (finished - started), 1),
        "driver_peak_rss_bytes": _peak_rss_bytes(),  # VmHWM: this process image only
        "driver_cpu_seconds": round(time.process_time(), 1),
        "shard_bytes": sum(report.shard_bytes),
    }


def _point_naive(spec: dict[str, Any]) -> dict[str, Any]:
    """The naive serial script: official APIs, full-image masks, Pillow PNG per image."""
    import contextlib
    import io
    import warnings

    import numpy as np
    from lvis import LVIS
    from PIL import Image
    from pycocotools.coco import COCO

    out = Path(spec["out"])
    out.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    cpu_started = time.process_time()
    with contextlib.redirect_stdout(io.StringIO()):
        lvis = LVIS(spec["lvis"])
        stuff = COCO(spec["stuff"])
    loaded = time.perf_counter()
    stuff_classes = {}
    lvis_names = {c["id"]: c["name"] for c in lvis.dataset["categories"]}
    next_id = max(lvis_names) + 1
    for cat in sorted(stuff.dataset["categories"], key=lambda c: c["id"]):
        if cat["name"] == "other":
            stuff_classes[cat["id"]] = 0
        else:
            match = [i for i, n in lvis_names.items() if n == cat["name"]]
            stuff_classes[cat["id"]] = match[0] if match else next_id
            next_id += 0 if match else 1
    warnings.simplefilter("ignore", DeprecationWarning)
    for image_id in sorted(lvis.imgs):
        info = lvis.imgs[image_id]
        label = np.zeros((info["height"], info["width"]), dtype=np.uint16)
        claimed = np.zeros(label.shape, dtype=bool)
        for ann in lvis.img_ann_map.get(image_id, []):
            mask = lvis.ann_to_mask(ann) > 0
            label[mask & ~claimed] = ann["category_id"]
            claimed |= mask
        for ann in stuff.imgToAnns.get(image_id, []):
            mask = stuff.annToMask(ann) > 0
            label[mask & ~claimed] = stuff_classes[ann["category_id"]]
            claimed |= mask
        Image.fromarray(label).save(out / f"{image_id:012d}.png")
    finished = time.perf_counter()
    cpu = time.process_time() - cpu_started
    n = len(lvis.imgs)
    return {"images": n, "load_seconds": round(loaded - started, 2), "cpu_seconds": round(cpu, 1),
            "images_per_cpu_second": round(n / cpu, 1),
            "paint_png_seconds": round(finished - loaded, 2),
            "end_to_end_images_per_second": round(n / (finished - started), 1)}


def _point_png(spec: dict[str, Any]) -> dict[str, Any]:
    """Encoding time and bytes of the sample's label maps for each PNG setting."""
    import io

    import numpy as np
    from PIL import Image

    from embseg.annotations import LvisCocoStuffSource
    from embseg.labels import _class_runs, _paint_runs, png_parameters

    source = LvisCocoStuffSource(lvis=Path(spec["lvis"]), coco_stuff=(Path(spec["stuff"]),),
                                 images_root=Path(spec["images"]))
    plan = source.plan()
    work = plan.work(0, min(len(plan.images), spec["maps"]))
    maps = []
    for i in range(len(work)):
        item = work.item(i)
        label, _ = _paint_runs(item.height, item.width,
                               _class_runs(item.lvis_anns, item.height, item.width),
                               _class_runs(item.stuff_anns, item.height, item.width), "first")
        maps.append(label)
    work.close()
    import cv2

    def pillow(label, level=6):
        buffer = io.BytesIO()
        Image.fromarray(label).save(buffer, format="PNG", compress_level=level)
        return buffer.getvalue()

    settings = [("Pillow, compress_level 6 (before issue 14)", pillow),
                ("Pillow, compress_level 1", lambda label: pillow(label, 1))]
    for filter_name in ("none", "sub", "up", "paeth"):
        for strategy, level in (("default", 1), ("default", 6), ("rle", 1)):
            params = png_parameters(filter_name, strategy, level)
            settings.append((f"libpng filter {filter_name}, zlib {strategy} level {level}",
                             lambda label, p=params: cv2.imencode(".png", label, p)[1].tobytes()))
    times: dict[str, list[float]] = {name: [] for name, _ in settings}
    sizes: dict[str, float] = {}
    for _ in range(spec.get("rounds", 3)):  # rounds over all settings: load hits them alike
        for name, encode in settings:
            encode(maps[0])
            started = time.perf_counter()
            sizes[name] = float(np.mean([len(encode(label)) for label in maps]))
            times[name].append((time.perf_counter() - started) / len(maps) * 1000)
    rows = [{"setting": name, "ms_per_map": round(float(np.median(times[name])), 2),
             "ms_per_map_min": round(min(times[name]), 2), "mean_bytes": int(sizes[name])}
            for name, _ in settings]
    return {"maps": len(maps), "rows": rows}


POINTS = {"build": _point_build, "naive": _point_naive, "png": _point_png}


# --------------------------------------------------------------------------- the part


def _shard_digests(folder: Path) -> dict[str, str]:
    import hashlib

    digests = {}
    for path in sorted(folder.glob("train-[0-9][0-9][0-9][0-9][0-9][0-9].tar")):
        digest = hashlib.sha256()
        with open(path, "rb") as handle:
            for block in iter(lambda: handle.read(1 << 22), b""):
                digest.update(block)
        digests[path.name] = digest.hexdigest()
    return digests


def write_subset(lvis: Path, stuff: Path, n_images: int, out: Path) -> tuple[Path, Path]:
    """The first ``n_images`` images (by id) of the two files with their annotations, as two
    new files (elements copied byte for byte from their spans)."""
    from embseg.annotations import _index_file
    from embseg.jsonindex import index_json_file

    out.mkdir(parents=True, exist_ok=True)
    written = []
    keep_ids = None
    for source, name in ((lvis, "lvis_v1_train.json"), (stuff, "stuff_train2017.json")):
        indexed = _index_file(source)
        spans = index_json_file(source)
        if keep_ids is None:
            keep_ids = set(sorted(img["id"] for img in indexed.images)[:n_images])
        raw = source.read_bytes()
        images = _pick(raw, spans.arrays["images"],
                       [img["id"] in keep_ids for img in indexed.images])
        anns = _pick(raw, spans.arrays["annotations"],
                     [i in keep_ids for i in indexed.ann_image_ids.tolist()])
        cats = _pick(raw, spans.arrays["categories"], [True] * len(indexed.categories))
        del raw
        target = out / name
        target.write_bytes(b'{"images":[' + images + b'],"annotations":[' + anns
                           + b'],"categories":[' + cats + b"]}")
        written.append(target)
    return written[0], written[1]


def _pick(raw: bytes, spans, keep: list[bool]) -> bytes:
    """The kept elements' bytes, comma-separated."""
    return b",".join(raw[o:o + n] for o, n, k in zip(
        spans.offsets.tolist(), spans.lengths.tolist(), keep, strict=True) if k)


def bench_build_scale(images: int, workdir: Path, log, save=lambda: None,
                      result: dict | None = None) -> dict[str, Any]:
    """The measurements of the module docstring; ``result`` is filled as they come."""
    from embseg.scaleset import write_scale_set

    result = {} if result is None else result
    workers_all = os.cpu_count() or 1
    result["workers_all"] = workers_all
    lvis_categories, stuff_categories, categories_note = _categories()
    log(f"build-scale: writing an LVIS-train-like set of {images} images ...")
    started = time.perf_counter()
    data = write_scale_set(workdir / "set", images=images, lvis_categories=lvis_categories,
                           stuff_categories=stuff_categories)
    result["set"] = {
        "images": data.n_images, "lvis_polygon_annotations": data.n_polygons,
        "vertices_per_polygon": 50, "coco_stuff_rle_annotations": data.n_stuff,
        "lvis_file_bytes": data.lvis.stat().st_size, "stuff_file_bytes": data.stuff.stat().st_size,
        "image_size": "640x480", "jpeg_pool": data.jpeg_pool,
        "mean_jpeg_bytes": round(data.mean_jpeg_bytes), "categories": categories_note,
        "write_seconds": round(time.perf_counter() - started, 1),
        "note": (f"{data.jpeg_pool} distinct JPEGs hard-linked to the {data.n_images} file "
                 "names (annotations, not pixels, drive the label work)")}
    save()
    common = {"lvis": str(data.lvis), "stuff": str(data.stuff),
              "images": str(data.images_root), "shard_size": 1000}
    full_out = workdir / "shards-all"
    result["full_build"] = _run_point({**common, "kind": "build", "out": str(full_out),
                                       "workers": workers_all, "label": "all cores"}, log)
    save()
    rebuild = _run_point({**common, "kind": "build", "out": str(full_out),
                          "workers": workers_all, "label": "unchanged rebuild"}, log)
    result["unchanged_rebuild"] = rebuild
    save()

    if images <= SCALING_MAX_IMAGES:
        scaling_set = common
        scaling_note = f"the whole set ({images} images)"
        all_out = full_out
        result["scaling_all_cores"] = result["full_build"]
    else:
        sample = SCALING_SHARDS_PER_WORKER * workers_all * common["shard_size"]
        lvis, stuff = write_subset(data.lvis, data.stuff, sample, workdir / "scaling")
        scaling_set = {**common, "lvis": str(lvis), "stuff": str(stuff)}
        scaling_note = f"the set's first {sample} images"
        all_out = workdir / "shards-scaling-all"
        result["scaling_all_cores"] = _run_point({**scaling_set, "kind": "build",
                                                  "out": str(all_out), "workers": workers_all,
                                                  "label": "scaling, all cores"}, log)
    one_out = workdir / "shards-one"
    result["scaling_one_worker"] = _run_point({**scaling_set, "kind": "build",
                                               "out": str(one_out), "workers": 1,
                                               "label": "1 worker"}, log)
    result["scaling_note"] = scaling_note
    result["shards_identical_1_vs_all_workers"] = _shard_digests(one_out) == \
        _shard_digests(all_out)
    save()

    sample = min(NAIVE_SAMPLE, images)
    lvis, stuff = write_subset(data.lvis, data.stuff, sample, workdir / "naive-set")
    result["naive"] = _run_point({"kind": "naive", "lvis": str(lvis), "stuff": str(stuff),
                                  "out": str(workdir / "naive-out"), "label": "naive serial"},
                                 log)
    result["naive"]["sample"] = f"the set's first {sample} images"
    result["png_settings"] = _run_point({"kind": "png", "lvis": str(lvis), "stuff": str(stuff),
                                         "images": str(data.images_root),
                                         "maps": min(PNG_SAMPLE, sample)}, log)
    save()
    return result


def _derived(b: dict[str, Any]) -> dict[str, Any]:
    """Ratios of the goals (wall clock), and the same by CPU time (what a loaded machine
    does not distort as much: images per CPU-second of the workers / the naive process)."""
    one, every = b.get("scaling_one_worker"), b.get("scaling_all_cores")
    full, naive = b.get("full_build"), b.get("naive")
    derived: dict[str, Any] = {}
    if one and every:
        derived["scaling_x"] = every["execute_images_per_second"] / \
            one["execute_images_per_second"]
        derived["per_core_x_today"] = one["execute_images_per_second"] / \
            TODAY_PER_CORE_IMAGES_PER_SECOND
        if one.get("images_per_worker_cpu_second"):
            derived["per_core_cpu_x_today"] = one["images_per_worker_cpu_second"] / \
                TODAY_PER_CORE_IMAGES_PER_SECOND
    if full and naive:
        derived["end_to_end_x_naive"] = full["end_to_end_images_per_second"] / \
            naive["end_to_end_images_per_second"]
        if every and every.get("images_per_worker_cpu_second") and naive.get("cpu_seconds"):
            derived["worker_cpu_efficiency_x_naive"] = every["images_per_worker_cpu_second"] / \
                naive["images_per_cpu_second"]
    return derived


def markdown(result: dict[str, Any]) -> list[str]:
    """The build-scale tables."""
    b = result.get("build-scale")
    if not b or "set" not in b:
        return []
    s = b["set"]
    lines = ["", "## Dataset build at LVIS scale (build-scale)", "",
             f"Set: {s['images']:,} images of {s['image_size']}, {s['lvis_polygon_annotations']:,} "
             f"LVIS polygons of {s['vertices_per_polygon']} vertices "
             f"({s['lvis_file_bytes'] / 1e9:.2f} GB), {s['coco_stuff_rle_annotations']:,} "
             f"COCO-Stuff compressed RLEs ({s['stuff_file_bytes'] / 1e9:.2f} GB); "
             f"{s['categories']}; {s['note']} (mean JPEG {s['mean_jpeg_bytes'] / 1e3:.0f} kB).",
             ""]
    rows = [("full build, all cores", b.get("full_build")),
            ("unchanged rebuild", b.get("unchanged_rebuild"))]
    if b.get("scaling_all_cores") != b.get("full_build"):
        rows.append(("scaling set, all cores", b.get("scaling_all_cores")))
    rows.append(("scaling set, 1 worker", b.get("scaling_one_worker")))
    lines += ["| build | workers | images | plan s | Ray start s | execute s | execute img/s | "
              "end-to-end img/s | process wall s | driver peak RSS | reused shards | "
              "img per worker CPU-s | load 1-min before/after |",
              "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for name, row in rows:
        if row:
            per_cpu = row.get("images_per_worker_cpu_second")
            load = row.get("load_average_1_5_15_before_after")
            lines.append(
                f"| {name} | {row['workers']} | {row['images']:,} | {row['plan_seconds']:.1f} | "
                f"{row['ray_start_seconds']:.1f} | {row['execute_seconds']:.1f} | "
                f"{row['execute_images_per_second']:.1f} | "
                f"{row['end_to_end_images_per_second']:.1f} | {row['process_wall_seconds']:.1f} | "
                f"{row['driver_peak_rss_bytes'] / 2**30:.2f} GiB | {row['reused_shards']} | "
                f"{'-' if per_cpu is None else f'{per_cpu:.1f}'} | "
                f"{'-' if not load else f'{load[0][0]:.1f} / {load[1][0]:.1f}'} |")
    if b.get("scaling_note"):
        lines += ["", f"Scaling set: {b['scaling_note']}; shards byte-identical with 1 worker "
                      f"and with all cores: {b.get('shards_identical_1_vs_all_workers')}."]
    naive = b.get("naive")
    if naive:
        lines += ["", f"Naive serial baseline ({naive['sample']}: official APIs loaded on them, "
                      "full-image masks, Pillow PNG per image): "
                      f"{naive['end_to_end_images_per_second']:.1f} images/s end to end "
                      f"(load {naive['load_seconds']:.1f} s, paint + PNG "
                      f"{naive['paint_png_seconds']:.1f} s"
                      + (f"; {naive['images_per_cpu_second']:.1f} images per CPU-second"
                         if naive.get("images_per_cpu_second") else "") + ")."]
    derived = _derived(b)
    if derived:
        lines += ["", "Ratios: " + ", ".join(f"{k} = {v:.2f}" for k, v in derived.items())
                  + f" (today's per-core speed: {TODAY_PER_CORE_IMAGES_PER_SECOND:.0f} images/s, "
                    "from issue 14)."]
    png = b.get("png_settings")
    if png:
        lines += ["", f"PNG settings on {png['maps']} label maps of the sample (median and "
                      "fastest of 3 rounds over all settings):", "",
                  "| setting | ms per map | fastest round | mean bytes |", "|---|---|---|---|"]
        lines += [f"| {r['setting']} | {r['ms_per_map']:.2f} | {r['ms_per_map_min']:.2f} | "
                  f"{r['mean_bytes']:,} |" for r in png["rows"]]
    return lines


def goals(result: dict[str, Any]) -> list[tuple[str, bool, str]]:
    """The goals of issue 14 that this run measured."""
    b = result.get("build-scale")
    if not b or not b.get("full_build"):
        return []
    full = b["full_build"]
    n = full["images"]
    out = [(f"planning <= 60 s ({n:,} images)", full["plan_seconds"] <= 60,
            f"{full['plan_seconds']:.1f} s"),
           (f"driver peak RSS <= 3 GB ({n:,} images)",
            full["driver_peak_rss_bytes"] <= 3e9,
            f"{full['driver_peak_rss_bytes'] / 1e9:.2f} GB")]
    rebuild = b.get("unchanged_rebuild")
    if rebuild:
        out.append((f"unchanged rebuild <= 30 s end to end ({n:,} images)",
                    rebuild["process_wall_seconds"] <= 30 and
                    rebuild["reused_shards"] == rebuild["shards"],
                    f"{rebuild['process_wall_seconds']:.1f} s, {rebuild['reused_shards']} of "
                    f"{rebuild['shards']} shards reused"))
    derived = _derived(b)
    if "per_core_x_today" in derived:
        out.append(("per-core throughput >= 2.5x today's", derived["per_core_x_today"] >= 2.5,
                    f"{derived['per_core_x_today']:.2f}x"))
        out.append((f"{b['workers_all']} workers >= 1.8x 1 worker", derived["scaling_x"] >= 1.8,
                    f"{derived['scaling_x']:.2f}x"))
        out.append(("shards byte-identical, 1 worker vs all",
                    bool(b.get("shards_identical_1_vs_all_workers")), "compared by sha256"))
    if "end_to_end_x_naive" in derived:
        out.append((f"end to end, {b['workers_all']} workers >= 3x the naive serial script",
                    derived["end_to_end_x_naive"] >= 3, f"{derived['end_to_end_x_naive']:.2f}x"))
    return out


def run(ctx: PartRun) -> None:
    """Write the set in the run's scratch folder and measure (see the module docstring)."""
    ctx.result["build-scale"] = {}
    ctx.timed("build-scale", lambda: bench_build_scale(
        ctx.settings.build_scale_images, ctx.workdir, ctx.log, save=ctx.save,
        result=ctx.result["build-scale"]))
    ctx.save()


PART = Part(name="build-scale", run=run, results={"build-scale": None}, markdown=markdown,
            goals=goals)


if __name__ == "__main__":
    point = json.loads(sys.argv[1])
    print(json.dumps(POINTS[point["kind"]](point)))
