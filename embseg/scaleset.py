"""An LVIS-train-like input set for the build's scale benchmark (``embseg bench --parts build-scale``).

At full size it has the density of LVIS v1 train with COCO-Stuff 2017: 100,170 images of
640x480, 1,269,961 LVIS polygon annotations of 50 vertices each and 601,020 compressed-RLE
COCO-Stuff annotations, with the category lists the caller gives (the real LVIS v1 and
COCO-Stuff lists in the benchmark). ``images`` asks for a fraction: every count scales with it.

What is real and what is not: the annotation files have the real formats, sizes and densities
(they drive the label work: polygon rasterisation, RLE decoding, painting). The pixels do not
matter to a build, so the JPEG files are a pool of ``jpeg_pool`` distinct 640x480 pictures,
hard-linked to every image's name (a build reads and stores each file's bytes all the same);
the COCO-Stuff regions come from a pool of distinct layouts of eight wavy regions each.
"""

from __future__ import annotations

import io
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import orjson
import pycocotools.mask as mask_utils
from PIL import Image

FULL_IMAGES = 100_170
FULL_POLYGONS = 1_269_961
FULL_STUFF = 601_020
WIDTH, HEIGHT = 640, 480
VERTICES = 50
STUFF_OTHER_ID = 183


@dataclass(frozen=True)
class ScaleSet:
    """Paths and counts of a written set."""

    root: Path
    lvis: Path
    stuff: Path
    images_root: Path
    n_images: int
    n_polygons: int
    n_stuff: int
    jpeg_pool: int
    mean_jpeg_bytes: float


def write_scale_set(root: Path, *, images: int, lvis_categories: list[dict],
                    stuff_categories: list[dict], jpeg_pool: int = 256, layouts: int = 128,
                    seed: int = 0) -> ScaleSet:
    """Write the set under ``root`` (``lvis_v1_train.json``, ``stuff_train2017.json``,
    ``images/train2017/``); counts scale with ``images / 100,170``."""
    root = Path(root)
    folder = root / "images" / "train2017"
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    fraction = images / FULL_IMAGES
    n_polygons = round(FULL_POLYGONS * fraction)
    n_stuff = round(FULL_STUFF * fraction)
    image_ids = np.sort(rng.choice(np.arange(1, 6 * images + 10), size=images, replace=False))
    # annotations per image: a spread like the real one (many images with few, some with many)
    polys_per_image = _split_counts(rng, n_polygons, images)
    stuff_per_image = _split_counts(rng, n_stuff, images, spread=0.1)
    lvis_ids = np.array([c["id"] for c in lvis_categories])
    weights = 1.0 / np.arange(1, len(lvis_ids) + 1) ** 0.9
    weights /= weights.sum()
    stuff_ids = np.array([c["id"] for c in stuff_categories])

    pool = _jpeg_pool(rng, jpeg_pool)
    pool_paths = []
    for index, data in enumerate(pool):
        path = root / "images" / f"pool-{index:04d}.jpg"
        path.write_bytes(data)
        pool_paths.append(path)
    for n, image_id in enumerate(image_ids):
        target = folder / f"{image_id:012d}.jpg"
        if not target.exists():
            os.link(pool_paths[n % len(pool_paths)], target)

    images_json = [_image_dict(int(i)) for i in image_ids]
    lvis_path = root / "lvis_v1_train.json"
    with open(lvis_path, "wb") as out:
        out.write(b'{"info":{"description":"embseg build-scale LVIS-like set"},"licenses":[],')
        out.write(b'"images":' + orjson.dumps(images_json) + b',"annotations":[')
        ann_id = 1
        first = True
        for start in range(0, images, 2000):
            stop = min(start + 2000, images)
            counts = polys_per_image[start:stop]
            total = int(counts.sum())
            if not total:
                continue
            owners = np.repeat(image_ids[start:stop], counts)
            polygons = _polygons(rng, total)
            categories = rng.choice(lvis_ids, size=total, p=weights)
            chunks = []
            for k in range(total):
                poly = polygons[k]
                x0, y0 = poly[0::2].min(), poly[1::2].min()
                box = [round(float(x0), 2), round(float(y0), 2),
                       round(float(poly[0::2].max() - x0), 2),
                       round(float(poly[1::2].max() - y0), 2)]
                chunks.append(orjson.dumps({
                    "id": ann_id, "image_id": int(owners[k]), "category_id": int(categories[k]),
                    "segmentation": [poly], "bbox": box,
                    "area": round(box[2] * box[3] * 0.6, 2)},
                    option=orjson.OPT_SERIALIZE_NUMPY))
                ann_id += 1
            out.write((b"" if first else b",") + b",".join(chunks))
            first = False
        out.write(b'],"categories":' + orjson.dumps(lvis_categories) + b"}")

    stuff_rles = _stuff_layouts(rng, layouts)
    stuff_path = root / "stuff_train2017.json"
    with open(stuff_path, "wb") as out:
        out.write(b'{"info":{"description":"embseg build-scale COCO-Stuff-like set"},'
                  b'"licenses":[],"images":' + orjson.dumps(images_json) + b',"annotations":[')
        ann_id = 10_000_000
        chunks = []
        for image_id, count in zip(image_ids, stuff_per_image, strict=True):
            layout = stuff_rles[int(rng.integers(len(stuff_rles)))]
            for region in range(min(int(count), len(layout))):
                rle, box, area = layout[region]
                category = int(rng.choice(stuff_ids))
                chunks.append(orjson.dumps({
                    "id": ann_id, "image_id": int(image_id), "category_id": category,
                    "segmentation": rle, "bbox": box, "area": area, "iscrowd": 0}))
                ann_id += 1
        out.write(b",".join(chunks))
        out.write(b'],"categories":' + orjson.dumps(stuff_categories) + b"}")
    return ScaleSet(root=root, lvis=lvis_path, stuff=stuff_path, images_root=root / "images",
                    n_images=images, n_polygons=n_polygons, n_stuff=ann_id - 10_000_000,
                    jpeg_pool=len(pool), mean_jpeg_bytes=float(np.mean([len(d) for d in pool])))


def _split_counts(rng: np.random.Generator, total: int, parts: int, *,
                  spread: float = 1.0) -> np.ndarray:
    """``parts`` non-negative counts summing to ``total`` (gamma-distributed shares)."""
    shares = rng.gamma(1.0 / spread, size=parts)
    counts = np.floor(shares / shares.sum() * total).astype(np.int64)
    missing = total - int(counts.sum())
    counts[rng.choice(parts, size=missing, replace=True)] += 1
    return counts


def _image_dict(image_id: int) -> dict:
    name = f"{image_id:012d}.jpg"
    return {"id": image_id, "height": HEIGHT, "width": WIDTH, "license": 1,
            "coco_url": f"http://images.cocodataset.org/train2017/{name}",
            "flickr_url": f"http://farm1.staticflickr.com/1/{image_id}.jpg",
            "date_captured": "2013-11-14 16:28:13", "neg_category_ids": [],
            "not_exhaustive_category_ids": []}


def _polygons(rng: np.random.Generator, count: int) -> np.ndarray:
    """``count`` star-shaped 50-vertex polygons (x0, y0, x1, ...) inside the image, 2 decimals."""
    radius = np.exp(rng.uniform(np.log(4.0), np.log(180.0), size=(count, 1)))
    cx = rng.uniform(0, WIDTH, size=(count, 1))
    cy = rng.uniform(0, HEIGHT, size=(count, 1))
    angles = np.sort(rng.uniform(0, 2 * np.pi, size=(count, VERTICES)), axis=1)
    r = radius * rng.uniform(0.55, 1.0, size=(count, VERTICES))
    xs = np.clip(cx + r * np.cos(angles), 0, WIDTH)
    ys = np.clip(cy + r * np.sin(angles), 0, HEIGHT)
    coords = np.empty((count, 2 * VERTICES))
    coords[:, 0::2], coords[:, 1::2] = xs, ys
    return np.round(coords, 2)


def _stuff_layouts(rng: np.random.Generator, count: int) -> list[list[tuple[dict, list, float]]]:
    """``count`` layouts of eight regions (four wavy bands, each split in two, with blobs of
    the others), each region as
    (compressed RLE, bbox, area)."""
    yy, xx = np.mgrid[:HEIGHT, :WIDTH]
    layouts = []
    for _ in range(count):
        cuts = np.sort(rng.uniform(0.1, 0.9, size=3)) * HEIGHT
        band = np.zeros((HEIGHT, WIDTH), dtype=np.int64)
        for cut in cuts:
            wave = (cut + 25 * np.sin(xx / rng.uniform(15, 60) + rng.uniform(0, 6))
                    + 6 * np.sin(xx / rng.uniform(2, 6)))
            band += yy > wave
        split = WIDTH * rng.uniform(0.3, 0.7) + 30 * np.sin(yy / rng.uniform(10, 40))
        regions = band * 2 + (xx > split)
        for _ in range(14):  # blobs of other regions: ragged, many-run masks like real stuff
            cy, cx = rng.uniform(0, HEIGHT), rng.uniform(0, WIDTH)
            ry, rx = rng.uniform(8, 60), rng.uniform(8, 90)
            inside = ((yy - cy) / ry) ** 2 + ((xx - cx) / rx) ** 2 <= 1
            regions[inside] = rng.integers(0, 8)
        layout = []
        for value in rng.permutation(np.unique(regions)):
            mask = np.asfortranarray((regions == value).astype(np.uint8))
            rle = mask_utils.encode(mask)
            box = [float(v) for v in mask_utils.toBbox(rle)]
            layout.append(({"size": [HEIGHT, WIDTH], "counts": rle["counts"].decode("ascii")},
                           box, float(mask_utils.area(rle))))
        layouts.append(layout)
    return layouts


def _jpeg_pool(rng: np.random.Generator, count: int) -> list[bytes]:
    """``count`` distinct 640x480 JPEGs (smooth colour fields with noise, quality 90)."""
    pool = []
    for _ in range(count):
        small = rng.integers(0, 256, size=(HEIGHT // 16, WIDTH // 16, 3), dtype=np.uint8)
        image = Image.fromarray(small).resize((WIDTH, HEIGHT), Image.BICUBIC)
        pixels = np.asarray(image).astype(np.int16)
        pixels += rng.integers(-12, 13, size=pixels.shape, dtype=np.int16)
        buffer = io.BytesIO()
        Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8)).save(buffer, format="JPEG",
                                                                       quality=90)
        pool.append(buffer.getvalue())
    return pool
