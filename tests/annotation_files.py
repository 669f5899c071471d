"""Helpers for tests: tiny LVIS / COCO-Stuff annotation files and PIL-written images.

Vocabulary of these files: 1 cat, 2 table (LVIS + stuff 165), 3 dog, 4 towel (LVIS + stuff 168),
5 grass (stuff 92), 6 sky-other (stuff 93); stuff 183 ``other`` -> 0.
"""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import numpy as np
import pycocotools.mask as mask_utils
from PIL import Image

LVIS_CATEGORIES = [
    {"id": 1, "name": "cat", "synonyms": ["cat"], "frequency": "f"},
    {"id": 2, "name": "table", "synonyms": ["table"], "frequency": "c"},
    {"id": 3, "name": "dog", "synonyms": ["dog"], "frequency": "r"},
    {"id": 4, "name": "towel", "synonyms": ["towel"], "frequency": "c"},
]
STUFF_CATEGORIES = [
    {"id": 92, "name": "grass", "supercategory": "plant"},
    {"id": 93, "name": "sky-other", "supercategory": "sky"},
    {"id": 165, "name": "table", "supercategory": "furniture"},
    {"id": 168, "name": "towel", "supercategory": "textile"},
    {"id": 183, "name": "other", "supercategory": "other"},
]
STUFF_TO_CLASS = {92: 5, 93: 6, 165: 2, 168: 4, 183: 0}


def write_image(path: Path, width: int, height: int, *, mode: str = "RGB", fmt: str = "JPEG",
                seed: int = 0, orientation: int | None = None) -> Path:
    """A noise image of the given stored size; ``orientation`` writes an EXIF Orientation tag."""
    rng = np.random.default_rng(seed)
    channels = {"RGB": 3, "L": 1, "CMYK": 4}[mode]
    pixels = rng.integers(0, 256, size=(height, width, channels), dtype=np.uint8)
    image = Image.fromarray(pixels[..., 0] if channels == 1 else pixels, mode=mode)
    path.parent.mkdir(parents=True, exist_ok=True)
    kwargs = {}
    if orientation is not None:
        exif = Image.Exif()
        exif[0x0112] = orientation
        kwargs["exif"] = exif.tobytes()
    image.save(path, format=fmt, **kwargs)
    return path


def lvis_image(image_id: int, width: int, height: int, *, split: str = "train2017",
               coco_url: str | None = "auto", file_name: str | None = None) -> dict:
    """An LVIS v1 image record (``coco_url`` points at ``<split>/<12-digit id>.jpg``)."""
    image = {"id": image_id, "width": width, "height": height}
    if coco_url == "auto":
        coco_url = f"http://images.cocodataset.org/{split}/{image_id:012d}.jpg"
    if coco_url is not None:
        image["coco_url"] = coco_url
    if file_name is not None:
        image["file_name"] = file_name
    return image


def stuff_image(image_id: int, width: int, height: int) -> dict:
    """A COCO-Stuff image record."""
    return {"id": image_id, "width": width, "height": height, "file_name": f"{image_id:012d}.jpg"}


def polygon_ann(ann_id: int, image_id: int, category_id: int, *polygons: list) -> dict:
    """An annotation whose segmentation is one or more polygons."""
    return {"id": ann_id, "image_id": image_id, "category_id": category_id,
            "segmentation": [list(p) for p in polygons], "area": 1.0, "bbox": [0, 0, 1, 1]}


def column_major_counts(mask: np.ndarray) -> list[int]:
    """Uncompressed COCO RLE counts of a mask, written here independently of pycocotools."""
    flat = np.asarray(mask, dtype=np.uint8).flatten(order="F").tolist()
    counts, current, run = [], 0, 0
    for value in flat:
        if value != current:
            counts.append(run)
            current, run = value, 0
        run += 1
    counts.append(run)
    return counts


def rle_ann(ann_id: int, image_id: int, category_id: int, mask: np.ndarray, *,
            compressed: bool = True) -> dict:
    """An annotation whose segmentation is compressed (str counts) or uncompressed RLE."""
    height, width = mask.shape
    if compressed:
        rle = mask_utils.encode(np.asfortranarray(mask.astype(np.uint8)))
        segmentation = {"size": [height, width], "counts": rle["counts"].decode("ascii")}
    else:
        segmentation = {"size": [height, width], "counts": column_major_counts(mask)}
    return {"id": ann_id, "image_id": image_id, "category_id": category_id,
            "segmentation": segmentation, "area": float(mask.sum()), "bbox": [0, 0, 1, 1],
            "iscrowd": 0}


def write_annotations(path: Path, images: list[dict], annotations: list[dict],
                      categories: list[dict]) -> Path:
    """Write an LVIS/COCO-format JSON file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"info": {}, "images": images, "annotations": annotations,
                                "categories": categories}))
    return path


def polygon_mask(polygons: list[list[float]], height: int, width: int) -> np.ndarray:
    """The mask pycocotools rasterises for polygons (the expected mask of a polygon annotation)."""
    rles = mask_utils.frPyObjects([list(p) for p in polygons], height, width)
    with warnings.catch_warnings():  # pycocotools' numpy-2 __array__ DeprecationWarning
        warnings.simplefilter("ignore", DeprecationWarning)
        return mask_utils.decode(mask_utils.merge(rles)).astype(bool)


def box_mask(height: int, width: int, top: int, left: int, bottom: int, right: int) -> np.ndarray:
    """A boolean mask that is True on rows top..bottom-1 and columns left..right-1."""
    mask = np.zeros((height, width), dtype=bool)
    mask[top:bottom, left:right] = True
    return mask
