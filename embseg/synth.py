"""A synthetic dataset in the real LVIS v1 / COCO-Stuff 2017 layout and formats.

Users without the 120k COCO images (and the tests, and ``make demo``) get annotation files that
the real readers (``lvis.LVIS``, ``pycocotools.coco.COCO``) load, and images in which every class
has its own learnable appearance, so that the whole pipeline (vocabulary, build, training,
evaluation) can be exercised end to end on a CPU in minutes.

What it writes under ``out``:

- ``lvis_v1_train.json`` / ``lvis_v1_val.json``: LVIS v1 (images with ``coco_url``, polygons,
  long-tailed categories whose ``frequency`` r/c/f is derived from the number of training images
  a class appears in, as LVIS does, with thresholds scaled to the dataset size);
- ``stuff_train2017.json`` / ``stuff_val2017.json``: COCO-Stuff (categories 92..182 plus
  183 ``other``, one compressed-RLE annotation per category and image; ``other`` covers every
  thing pixel, as in the real files). A few stuff names equal LVIS names (the merge path), one
  image per split is absent from the stuff file;
- ``images/train2017/<12-digit id>.jpg`` and ``images/val2017/...``.

Appearance: class ``i`` of the merged vocabulary (LVIS ids first, then the unmerged stuff
categories in ascending COCO-Stuff id order) gets a colour on an RGB lattice plus a texture
(flat / stripes / checker / diagonal) chosen so that lattice neighbours differ in texture.
Everything is a pure function of the arguments: the same arguments give the same bytes.
"""

from __future__ import annotations

import argparse
import functools
import io
import json
import math
import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image
from pycocotools import mask as mask_utils

from embseg.errors import EmbsegError
from embseg.fileio import write_bytes_atomically
from embseg.vocab import read_categories

STUFF_FIRST_ID = 92
STUFF_LAST_ID = 182
OTHER_ID = 183
DEFAULT_SIZE = 128
JPEG_QUALITY = 95
URL_ROOT = "http://images.cocodataset.org"
STUFF_SUPERCATEGORIES = ("ground", "plant", "sky", "structural", "textile", "wall", "water")
# Stuff categories that carry the name of an LVIS class (the merge path of the vocabulary).
MERGED_STUFF_IDS = (93, 104, 117, 131, 150)
# Ranks (0 = most frequent) of the LVIS classes whose names those stuff categories borrow.
MERGED_LVIS_RANKS = (1, 3, 6, 10, 15)
TEXTURE_KINDS = 5
TEXTURE_PERIOD = 8
TEXTURE_AMPLITUDE = 16.0
PIXEL_NOISE = 3.0


@dataclass(frozen=True)
class SynthDataset:
    """Paths of a generated synthetic dataset (the same layout as the real downloads)."""

    root: Path
    lvis_train: Path
    lvis_val: Path
    stuff_train: Path
    stuff_val: Path
    images_root: Path


@dataclass(frozen=True)
class _Category:
    """One LVIS category of the synthetic vocabulary before its frequency is known."""

    id: int
    name: str
    synonyms: list[str]
    synset: str
    definition: str
    frequency: str | None  # borrowed from a real file, else derived from the training images


@dataclass
class _Split:
    """Everything generated for one split, ready to be written as JSON."""

    folder: str
    images_lvis: list[dict] = field(default_factory=list)
    images_stuff: list[dict] = field(default_factory=list)
    anns_lvis: list[dict] = field(default_factory=list)
    anns_stuff: list[dict] = field(default_factory=list)


@dataclass(frozen=True)
class _World:
    """The class inventory and sampling distributions shared by both splits."""

    lvis: list[_Category]
    lvis_probs: np.ndarray  # occurrence probability per LVIS class (index = id - 1)
    stuff_names: dict[int, str]  # stuff id (92..182) -> name
    stuff_probs: np.ndarray  # occurrence probability per stuff id (index = id - 92)
    palette: np.ndarray  # (n_classes, 3) float colours, index = merged class id - 1
    textures: np.ndarray  # (n_classes,) texture kind per merged class
    stuff_appearance: dict[int, int]  # stuff id -> appearance index (merged class id - 1)


def generate_synthetic(
    out: Path,
    *,
    images: int = 200,
    val_images: int = 50,
    lvis_classes: int = 200,
    seed: int = 0,
    categories: Path | None = None,
    size: int = DEFAULT_SIZE,
    workers: int | None = None,
) -> SynthDataset:
    """Write a synthetic LVIS v1 + COCO-Stuff dataset under ``out`` and return its paths.

    ``categories`` (an LVIS annotation file or a bare list of LVIS categories) lends real names,
    synonyms and frequencies to the ``lvis_classes`` synthetic classes (a deterministic sample).
    ``workers`` processes render a large split (default: one per CPU); the files are the same
    for any number.
    """
    workers = workers if workers is not None else os.cpu_count() or 1
    _check_arguments(images=images, val_images=val_images, lvis_classes=lvis_classes, size=size)
    out = Path(out)
    world = _make_world(lvis_classes=lvis_classes, seed=seed, categories=categories)
    train = _generate_split(world, folder="train2017", first_id=1, count=images, seed=seed,
                            size=size, out=out, workers=workers)
    val = _generate_split(world, folder="val2017", first_id=images + 1, count=val_images,
                          seed=seed, size=size, out=out, workers=workers)
    lvis_categories = _lvis_category_dicts(world, train)
    stuff_categories = _stuff_category_dicts(world)
    dataset = SynthDataset(
        root=out,
        lvis_train=out / "lvis_v1_train.json",
        lvis_val=out / "lvis_v1_val.json",
        stuff_train=out / "stuff_train2017.json",
        stuff_val=out / "stuff_val2017.json",
        images_root=out / "images",
    )
    _write_json(dataset.lvis_train, _lvis_file(train, lvis_categories))
    _write_json(dataset.lvis_val, _lvis_file(val, lvis_categories))
    _write_json(dataset.stuff_train, _stuff_file(train, stuff_categories))
    _write_json(dataset.stuff_val, _stuff_file(val, stuff_categories))
    return dataset


def cli_synth(args: argparse.Namespace) -> int:
    """``embseg synth``: write the synthetic dataset and print where it is."""
    dataset = generate_synthetic(
        args.out,
        images=args.images,
        val_images=args.val_images,
        lvis_classes=args.lvis_classes,
        seed=args.seed,
        categories=args.categories,
        size=args.size if args.size is not None else DEFAULT_SIZE,
    )
    print(f"synthetic dataset: {args.images} train + {args.val_images} val images, "
          f"{args.lvis_classes} LVIS classes + {STUFF_LAST_ID - STUFF_FIRST_ID + 1} stuff "
          f"categories in {dataset.root}")
    print(f"  lvis:  {dataset.lvis_train} {dataset.lvis_val}")
    print(f"  stuff: {dataset.stuff_train} {dataset.stuff_val}")
    print(f"  images root: {dataset.images_root}")
    return 0


# --------------------------------------------------------------------------- arguments


def _check_arguments(*, images: int, val_images: int, lvis_classes: int, size: int) -> None:
    """Reject argument values that cannot give a usable dataset (one clear line each)."""
    if images < 1:
        raise EmbsegError(f"synth: --images must be at least 1 (got {images})")
    if val_images < 0:
        raise EmbsegError(f"synth: --val-images must be at least 0 (got {val_images})")
    if lvis_classes < 3:
        raise EmbsegError(f"synth: --lvis-classes must be at least 3 (got {lvis_classes}): "
                          "the r/c/f frequency groups need three classes")
    if size < 32:
        raise EmbsegError(f"synth: --size must be at least 32 pixels (got {size})")


def _read_borrowed_categories(path: Path) -> list[dict]:
    """The LVIS categories of ``path`` (an LVIS file or a bare list), each with r/c/f."""
    cats = read_categories(path)
    if not cats:
        raise EmbsegError(f"{path}: the 'categories' list is empty")
    for cat in cats:
        if cat.get("frequency") not in ("r", "c", "f"):
            raise EmbsegError(f"{path}: category id {cat['id']} ({cat['name']}) has no "
                              "LVIS frequency r/c/f")
    return sorted(cats, key=lambda cat: cat["id"])


# --------------------------------------------------------------------------- class inventory


def _make_world(*, lvis_classes: int, seed: int, categories: Path | None) -> _World:
    """LVIS classes, stuff categories, their long-tailed distributions and appearances."""
    rng = np.random.default_rng([seed, 7919])
    lvis, ranks = _make_lvis_categories(rng, lvis_classes=lvis_classes, categories=categories)
    lvis_probs = _zipf(ranks, exponent=0.7)
    stuff_ids = list(range(STUFF_FIRST_ID, STUFF_LAST_ID + 1))
    rank_to_lvis = {int(rank): index for index, rank in enumerate(ranks)}
    merged = {
        stuff_id: rank_to_lvis[rank]
        for stuff_id, rank in zip(MERGED_STUFF_IDS, MERGED_LVIS_RANKS, strict=True)
        if rank < lvis_classes
    }
    stuff_names = {
        stuff_id: lvis[merged[stuff_id]].name if stuff_id in merged else f"stuff_{stuff_id:03d}"
        for stuff_id in stuff_ids
    }
    stuff_probs = _zipf(rng.permutation(len(stuff_ids)), exponent=0.7)
    stuff_appearance: dict[int, int] = {}
    next_index = lvis_classes
    for stuff_id in stuff_ids:
        if stuff_id in merged:
            stuff_appearance[stuff_id] = merged[stuff_id]
        else:
            stuff_appearance[stuff_id] = next_index
            next_index += 1
    palette, textures = _appearances(next_index)
    return _World(lvis=lvis, lvis_probs=lvis_probs, stuff_names=stuff_names,
                  stuff_probs=stuff_probs, palette=palette, textures=textures,
                  stuff_appearance=stuff_appearance)


def _make_lvis_categories(
    rng: np.random.Generator, *, lvis_classes: int, categories: Path | None
) -> tuple[list[_Category], np.ndarray]:
    """The synthetic LVIS categories (ids 1..K) and each one's occurrence rank (0 = commonest)."""
    if categories is None:
        lvis = [
            _Category(id=i, name=f"thing_{i:04d}", synonyms=[f"thing_{i:04d}"],
                      synset=f"thing_{i:04d}.n.01", definition=f"synthetic object class {i}",
                      frequency=None)
            for i in range(1, lvis_classes + 1)
        ]
        return lvis, rng.permutation(lvis_classes)
    borrowed = _read_borrowed_categories(categories)
    if lvis_classes > len(borrowed):
        raise EmbsegError(f"{categories}: --lvis-classes {lvis_classes} exceeds the "
                          f"{len(borrowed)} categories in the file")
    picked = sorted(rng.choice(len(borrowed), size=lvis_classes, replace=False).tolist())
    lvis = []
    for new_id, index in enumerate(picked, start=1):
        cat = borrowed[index]
        synonyms = cat.get("synonyms") or [cat["name"]]
        lvis.append(_Category(id=new_id, name=cat["name"], synonyms=list(synonyms),
                              synset=str(cat.get("synset", "")), definition=str(cat.get("def", "")),
                              frequency=cat["frequency"]))
    # Real frequencies order the long tail: frequent classes first, then common, then rare.
    group_order = {"f": 0, "c": 1, "r": 2}
    tiebreak = rng.permutation(lvis_classes)
    order = sorted(range(lvis_classes),
                   key=lambda i: (group_order[lvis[i].frequency], tiebreak[i]))
    ranks = np.empty(lvis_classes, dtype=np.int64)
    ranks[order] = np.arange(lvis_classes)
    return lvis, ranks


def _zipf(ranks: np.ndarray, *, exponent: float) -> np.ndarray:
    """Zipf-like probabilities, ``p ~ 1 / (rank + 1) ** exponent``, indexed like ``ranks``."""
    weights = 1.0 / (np.asarray(ranks, dtype=np.float64) + 1.0) ** exponent
    return weights / weights.sum()


def _appearances(n_classes: int) -> tuple[np.ndarray, np.ndarray]:
    """A colour per class on an RGB lattice and a texture kind that differs between neighbours.

    Colours are lattice points spread over [24, 232]^3 (visited with a stride coprime to the
    lattice size, so consecutive classes are far apart); the texture kind ``(i + 2j + 3k) % 5``
    differs for any two points one lattice step apart, so even the closest colours also differ
    in pattern.
    """
    levels = max(2, math.ceil(n_classes ** (1.0 / 3.0) - 1e-9))
    total = levels ** 3
    stride = _coprime_stride(total)
    points = [(index * stride) % total for index in range(n_classes)]
    ijk = np.array([(p // (levels * levels), (p // levels) % levels, p % levels) for p in points])
    step = (232.0 - 24.0) / (levels - 1)
    palette = 24.0 + ijk.astype(np.float64) * step
    textures = (ijk[:, 0] + 2 * ijk[:, 1] + 3 * ijk[:, 2]) % TEXTURE_KINDS
    return palette, textures


def _coprime_stride(total: int) -> int:
    """A stride near ``0.38 * total`` that is coprime to ``total`` (visits every lattice point)."""
    stride = max(1, int(total * 0.381966))
    while math.gcd(stride, total) != 1:
        stride += 1
    return stride


# --------------------------------------------------------------------------- images


PARALLEL_MIN_IMAGES = 400
"""Splits this large are rendered by a pool of processes (one per CPU): below it, starting
the pool's interpreters costs more than it saves."""


def _generate_split(world: _World, *, folder: str, first_id: int, count: int, seed: int,
                    size: int, out: Path, workers: int) -> _Split:
    """Render ``count`` images of one split, write the JPEGs and collect the annotations.

    Every image comes from a generator seeded by (seed, split, index) alone, so the images
    are rendered in any order, by ``workers`` processes for a large split, and the
    annotations (numbered here, in image order) are the same either way.
    """
    split = _Split(folder=folder)
    image_dir = out / "images" / folder
    image_dir.mkdir(parents=True, exist_ok=True)
    render = functools.partial(_render_image, world, folder=folder, first_id=first_id,
                               seed=seed, size=size, image_dir=image_dir)
    if workers > 1 and count >= PARALLEL_MIN_IMAGES:
        import multiprocessing
        from concurrent.futures import ProcessPoolExecutor

        # spawn, not fork: the caller may hold threads (Ray, Prefect) that fork would copy
        with ProcessPoolExecutor(max_workers=workers,
                                 mp_context=multiprocessing.get_context("spawn")) as pool:
            rendered = list(pool.map(render, range(count), chunksize=32))
    else:
        rendered = [render(index) for index in range(count)]
    for index, (image_id, file_name, height, width, lvis_image, things, stuff) in enumerate(
            rendered):
        split.images_lvis.append(lvis_image)
        for category_id, polygon, area, bbox in things:
            split.anns_lvis.append({
                "id": len(split.anns_lvis) + 1, "image_id": image_id,
                "category_id": category_id, "segmentation": [polygon],
                "bbox": bbox, "area": area,
            })
        # The last image of each split is absent from the stuff file (LVIS-only labels).
        if index == count - 1 and count > 1:
            continue
        split.images_stuff.append(_stuff_image(image_id=image_id, folder=folder,
                                               file_name=file_name, height=height, width=width))
        for category_id, rle, area, bbox in stuff:
            split.anns_stuff.append({
                "id": len(split.anns_stuff) + 1, "image_id": image_id,
                "category_id": category_id, "segmentation": rle, "area": area,
                "bbox": bbox, "iscrowd": 0,
            })
    return split


def _render_image(world: _World, index: int, *, folder: str, first_id: int, seed: int,
                  size: int, image_dir: Path) -> tuple:
    """Render image ``index`` of a split, write its JPEG; its id, file name, size, LVIS image
    record and (unnumbered) thing and stuff annotations."""
    image_id = first_id + index
    rng = np.random.default_rng([seed, 0 if folder.startswith("train") else 1, index])
    height, width = _image_shape(rng, size)
    pixels, things, stuff = _render(world, rng, height=height, width=width,
                                    force_extras=index == 0)
    file_name = f"{image_id:012d}.jpg"
    write_bytes_atomically(image_dir / file_name, _encode_jpeg(pixels))
    lvis_image = _lvis_image(world, rng, image_id=image_id, folder=folder, file_name=file_name,
                             height=height, width=width, things=things)
    return image_id, file_name, height, width, lvis_image, things, stuff


def _image_shape(rng: np.random.Generator, size: int) -> tuple[int, int]:
    """(height, width): mostly square, sometimes landscape or portrait as in COCO."""
    short = int(round(size * 0.75 / 8.0)) * 8
    kind = rng.integers(0, 4)
    if kind == 1:
        return short, size
    if kind == 2:
        return size, short
    return size, size


def _render(world: _World, rng: np.random.Generator, *, height: int, width: int,
            force_extras: bool) -> tuple[np.ndarray, list[tuple], list[tuple]]:
    """Pixels and annotations of one image.

    Stuff cells fill the background; things (LVIS annotations, in file order) are drawn so that
    an earlier annotation is on top (the "first wins" label rule sees what the image shows);
    unannotated distractor objects stand for COCO things that LVIS missed. The stuff file's
    ``other`` covers every object pixel, each stuff category its cells minus the objects.
    """
    cells = _stuff_cells(rng, height=height, width=width)
    n_cells = int(cells.max()) + 1
    stuff_ids = STUFF_FIRST_ID + rng.choice(len(world.stuff_probs), size=n_cells,
                                             p=world.stuff_probs)
    canvas = np.zeros((height, width, 3), dtype=np.float64)
    for cell in range(n_cells):
        _paint_class(world, canvas, cells == cell, world.stuff_appearance[int(stuff_ids[cell])])
    n_things = int(rng.integers(2, 6))
    thing_ids = 1 + rng.choice(len(world.lvis_probs), size=n_things, p=world.lvis_probs)
    things = [(int(cid), _object_polygon(rng, height=height, width=width)) for cid in thing_ids]
    n_distractors = 1 if force_extras or rng.random() < 0.3 else 0
    distractors = [_object_polygon(rng, height=height, width=width)
                   for _ in range(n_distractors)]
    object_mask = np.zeros((height, width), dtype=bool)
    for polygon in distractors:
        mask = _polygon_mask(polygon, height=height, width=width)
        _paint_distractor(rng, canvas, mask)
        object_mask |= mask
    thing_anns = []
    for category_id, polygon in reversed(things):
        mask = _polygon_mask(polygon, height=height, width=width)
        _paint_class(world, canvas, mask, category_id - 1)
        object_mask |= mask
    for category_id, polygon in things:
        rle = _polygon_rle(polygon, height=height, width=width)
        thing_anns.append((category_id, polygon, float(mask_utils.area(rle)),
                           _rounded(mask_utils.toBbox(rle).tolist())))
    canvas += rng.normal(0.0, PIXEL_NOISE, size=canvas.shape)
    pixels = np.clip(np.rint(canvas), 0, 255).astype(np.uint8)
    stuff_anns = _stuff_annotations(cells, stuff_ids, object_mask)
    return pixels, thing_anns, stuff_anns


def _stuff_cells(rng: np.random.Generator, *, height: int, width: int) -> np.ndarray:
    """An (H, W) int map of background regions: wavy horizontal bands or Voronoi cells."""
    ys, xs = np.mgrid[0:height, 0:width].astype(np.float64)
    if rng.random() < 0.5:
        n_bands = int(rng.integers(2, 5))
        cells = np.zeros((height, width), dtype=np.int64)
        bases = np.sort(rng.uniform(0.15, 0.85, size=n_bands - 1)) * height
        for base in bases:
            amplitude = rng.uniform(0.0, 0.08) * height
            frequency = rng.uniform(0.5, 2.0) * 2.0 * math.pi / width
            phase = rng.uniform(0.0, 2.0 * math.pi)
            cells += ys > base + amplitude * np.sin(frequency * xs + phase)
        return _compact(cells)
    n_seeds = int(rng.integers(2, 6))
    seeds = rng.uniform(0.0, 1.0, size=(n_seeds, 2)) * (height, width)
    distance = (ys[None] - seeds[:, 0, None, None]) ** 2 + (xs[None] - seeds[:, 1, None, None]) ** 2
    return _compact(np.argmin(distance, axis=0))


def _compact(cells: np.ndarray) -> np.ndarray:
    """Renumber region ids to 0..n-1 (bands may leave ids unused)."""
    _, inverse = np.unique(cells, return_inverse=True)
    return inverse.reshape(cells.shape)


def _object_polygon(rng: np.random.Generator, *, height: int, width: int) -> list[float]:
    """A flat ``[x1, y1, x2, y2, ...]`` polygon: ellipse, blob or rotated rectangle.

    Objects span 25-60 % of the image side and stay inside the image (vertices clipped).
    """
    side = min(height, width)
    cx, cy = rng.uniform(0.15, 0.85) * width, rng.uniform(0.15, 0.85) * height
    rx, ry = rng.uniform(0.125, 0.3, size=2) * side
    angle = rng.uniform(0.0, math.pi)
    kind = int(rng.integers(0, 3))
    if kind == 2:  # rotated rectangle
        corners = np.array([(-1, -1), (1, -1), (1, 1), (-1, 1)], dtype=np.float64) * (rx, ry)
        local = corners
    else:
        theta = np.linspace(0.0, 2.0 * math.pi, 24, endpoint=False)
        radius = np.ones_like(theta)
        if kind == 1:  # blob: radius modulated by low-frequency harmonics
            for harmonic in (2, 3):
                radius += rng.uniform(0.05, 0.2) * np.sin(harmonic * theta + rng.uniform(0, 6.3))
        local = np.stack([rx * radius * np.cos(theta), ry * radius * np.sin(theta)], axis=1)
    cos, sin = math.cos(angle), math.sin(angle)
    xs = cx + local[:, 0] * cos - local[:, 1] * sin
    ys = cy + local[:, 0] * sin + local[:, 1] * cos
    xs = np.clip(xs, 0.0, float(width))
    ys = np.clip(ys, 0.0, float(height))
    return [round(float(v), 2) for xy in zip(xs, ys, strict=True) for v in xy]


def _polygon_rle(polygon: list[float], *, height: int, width: int) -> dict:
    """The compressed RLE of a polygon, rasterised by pycocotools (as the readers will)."""
    return mask_utils.merge(mask_utils.frPyObjects([polygon], height, width))


def _polygon_mask(polygon: list[float], *, height: int, width: int) -> np.ndarray:
    """The (H, W) bool mask of a polygon, exactly as the LVIS/COCO APIs decode it."""
    return mask_utils.decode(_polygon_rle(polygon, height=height, width=width)).astype(bool)


def _texture(kind: int, shape: tuple[int, int]) -> np.ndarray:
    """A zero-mean +-1 pattern of one of the texture kinds, in image coordinates."""
    ys, xs = np.mgrid[0:shape[0], 0:shape[1]]
    half = TEXTURE_PERIOD // 2
    if kind == 0:
        return np.zeros(shape)
    if kind == 1:
        pattern = (ys // half) % 2
    elif kind == 2:
        pattern = (xs // half) % 2
    elif kind == 3:
        pattern = (ys // half + xs // half) % 2
    else:
        pattern = ((xs + ys) // half) % 2
    return pattern * 2.0 - 1.0


def _paint_class(world: _World, canvas: np.ndarray, mask: np.ndarray, index: int) -> None:
    """Paint the appearance (colour + texture) of merged class ``index + 1`` into ``mask``."""
    if not mask.any():
        return
    pattern = _texture(int(world.textures[index]), mask.shape)[mask]
    canvas[mask] = world.palette[index] + TEXTURE_AMPLITUDE * pattern[:, None]


def _paint_distractor(rng: np.random.Generator, canvas: np.ndarray, mask: np.ndarray) -> None:
    """An unannotated object: a random colour with coarse noise that no class has."""
    colour = rng.uniform(40.0, 215.0, size=3)
    canvas[mask] = colour + rng.normal(0.0, 30.0, size=(int(mask.sum()), 3))


def _stuff_annotations(cells: np.ndarray, stuff_ids: np.ndarray,
                       object_mask: np.ndarray) -> list[tuple]:
    """(category_id, rle, area, bbox) per stuff category present, ``other`` for objects."""
    masks: dict[int, np.ndarray] = {}
    for cell, stuff_id in enumerate(stuff_ids.tolist()):
        region = (cells == cell) & ~object_mask
        masks[stuff_id] = masks[stuff_id] | region if stuff_id in masks else region
    masks[OTHER_ID] = object_mask
    annotations = []
    for stuff_id in sorted(masks):
        if not masks[stuff_id].any():
            continue
        rle = mask_utils.encode(np.asfortranarray(masks[stuff_id].astype(np.uint8)))
        area = float(mask_utils.area(rle))
        bbox = _rounded(mask_utils.toBbox(rle).tolist())
        segmentation = {"size": [int(v) for v in rle["size"]],
                        "counts": rle["counts"].decode("ascii")}
        annotations.append((stuff_id, segmentation, area, bbox))
    return annotations


def _encode_jpeg(pixels: np.ndarray) -> bytes:
    """High-quality baseline JPEG without chroma subsampling (class colours stay distinct)."""
    buffer = io.BytesIO()
    Image.fromarray(pixels, mode="RGB").save(buffer, format="JPEG", quality=JPEG_QUALITY,
                                             subsampling=0)
    return buffer.getvalue()


def _rounded(values: Sequence[float]) -> list[float]:
    return [round(float(v), 2) for v in values]


# --------------------------------------------------------------------------- annotation files


def _lvis_image(world: _World, rng: np.random.Generator, *, image_id: int, folder: str,
                file_name: str, height: int, width: int, things: list[tuple]) -> dict:
    """An LVIS v1 image record (no ``file_name``: readers use ``coco_url``)."""
    present = sorted({category_id for category_id, *_ in things})
    absent = [c.id for c in world.lvis if c.id not in present]
    n_negative = min(len(absent), int(rng.integers(0, 4)))
    negatives = sorted(rng.choice(absent, size=n_negative, replace=False).tolist()) if absent else []
    not_exhaustive = present[:1] if rng.random() < 0.1 else []
    return {
        "id": image_id,
        "coco_url": f"{URL_ROOT}/{folder}/{file_name}",
        "height": height,
        "width": width,
        "neg_category_ids": [int(v) for v in negatives],
        "not_exhaustive_category_ids": not_exhaustive,
        "license": 1,
        "flickr_url": "",
        "date_captured": "2013-11-14 16:28:13",
    }


def _stuff_image(*, image_id: int, folder: str, file_name: str, height: int, width: int) -> dict:
    """A COCO image record."""
    return {
        "id": image_id,
        "file_name": file_name,
        "coco_url": f"{URL_ROOT}/{folder}/{file_name}",
        "height": height,
        "width": width,
        "license": 1,
        "flickr_url": "",
        "date_captured": "2013-11-14 16:28:13",
    }


def _lvis_category_dicts(world: _World, train: _Split) -> list[dict]:
    """LVIS category records with image/instance counts and r/c/f frequencies.

    Without borrowed frequencies, the LVIS rule (rare: 1-10 training images, common: 11-100,
    frequent: more) is scaled to the dataset: rare up to half the mean image count per class,
    frequent above twice it. If a group would be empty, the classes are split into thirds by
    image count instead, so that all three groups exist.
    """
    image_sets: dict[int, set[int]] = {c.id: set() for c in world.lvis}
    instances: dict[int, int] = dict.fromkeys(image_sets, 0)
    for ann in train.anns_lvis:
        image_sets[ann["category_id"]].add(ann["image_id"])
        instances[ann["category_id"]] += 1
    image_counts = {cid: len(ids) for cid, ids in image_sets.items()}
    frequencies = {c.id: c.frequency for c in world.lvis}
    if any(value is None for value in frequencies.values()):
        frequencies = _derived_frequencies(image_counts)
    return [
        {
            "id": c.id, "name": c.name, "synonyms": c.synonyms, "synset": c.synset,
            "def": c.definition, "frequency": frequencies[c.id],
            "image_count": image_counts[c.id], "instance_count": instances[c.id],
        }
        for c in world.lvis
    ]


def _derived_frequencies(image_counts: dict[int, int]) -> dict[int, str]:
    """r/c/f from training image counts, with every group non-empty (see the caller)."""
    mean = sum(image_counts.values()) / max(1, len(image_counts))
    rare_max = max(1.0, mean / 2.0)
    frequent_min = max(rare_max + 1.0, mean * 2.0)
    frequencies = {
        cid: "r" if count <= rare_max else "f" if count > frequent_min else "c"
        for cid, count in image_counts.items()
    }
    if len(set(frequencies.values())) < 3:
        # Too few images for the thresholds: split the classes by count into thirds instead.
        by_count = sorted(image_counts, key=lambda cid: (image_counts[cid], cid))
        third = max(1, len(by_count) // 3)
        frequencies = {cid: "r" if rank < third else "f" if rank >= len(by_count) - third else "c"
                       for rank, cid in enumerate(by_count)}
    return frequencies


def _stuff_category_dicts(world: _World) -> list[dict]:
    """COCO-Stuff category records 92..182 and 183 ``other``."""
    cats = [
        {"id": stuff_id, "name": name,
         "supercategory": STUFF_SUPERCATEGORIES[stuff_id % len(STUFF_SUPERCATEGORIES)]}
        for stuff_id, name in sorted(world.stuff_names.items())
    ]
    cats.append({"id": OTHER_ID, "name": "other", "supercategory": "other"})
    return cats


def _info(description: str) -> dict:
    return {"description": description, "url": "", "version": "1.0", "year": 2017,
            "contributor": "embseg synthetic generator", "date_created": "2017-09-01"}


_LICENSES = [{"id": 1, "name": "synthetic data, no restrictions", "url": ""}]


def _lvis_file(split: _Split, categories: list[dict]) -> dict:
    return {"info": _info("embseg synthetic LVIS v1"), "licenses": _LICENSES,
            "images": split.images_lvis, "annotations": split.anns_lvis,
            "categories": categories}


def _stuff_file(split: _Split, categories: list[dict]) -> dict:
    return {"info": _info("embseg synthetic COCO-Stuff 2017"), "licenses": _LICENSES,
            "images": split.images_stuff, "annotations": split.anns_stuff,
            "categories": categories}


def _write_json(path: Path, data: dict) -> None:
    write_bytes_atomically(path, json.dumps(data, separators=(",", ":")).encode("utf-8"))


