"""Per-image work of the dataset build: decode masks, paint the label map, package the sample.

Painting rule (:func:`paint_label_map`): LVIS instance masks are painted in annotation-file
order and an earlier annotation keeps its pixels (first wins); then COCO-Stuff masks fill only
the pixels LVIS left at 0, first wins among stuff too; a COCO-Stuff ``other`` mask claims its
pixels as 0 (unlabeled). With ``overlap="smaller"`` the LVIS masks are ordered by area,
smallest first (ties keep file order), so smaller instances end up over larger ones.

Masks: every segmentation becomes a COCO run-length mask the way the official APIs make it
(``LVIS.ann_to_rle`` / ``COCO.annToRLE``: polygons rasterised by
``pycocotools.mask.frPyObjects`` and merged, uncompressed RLE as given, compressed RLE as
given), and is painted straight from its runs (:mod:`embseg.rle`): each mask is decoded once
and costs its own area, never a full-image boolean mask. The label map equals painting the
official full-image masks (``ann_to_mask`` / ``annToMask``); the tests check that against a
painter of their own. Before decoding, every segmentation is checked, because pycocotools
silently turns a 4-number polygon into a box and fills an RLE that is too short with
uninitialised memory.

:func:`process_image` never raises for a per-image problem: it returns an :class:`ImageResult`
with status ``failed`` (or ``skipped``) and a one-line reason.
"""

from __future__ import annotations

import io
import warnings
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pycocotools.mask as mask_utils
from PIL import Image

from embseg import rle
from embseg.annotations import ImageItem
from embseg.errors import ItemFailure

OVERLAP_MODES = ("first", "smaller")
# A polygon point may lie this far outside the image (annotation tools round outwards);
# further out means the annotation does not belong to an image of this size.
POLYGON_TOLERANCE_PX = 1.0
# PNG settings chosen by measurement (benchmarks/results/*build-scale*: "PNG settings"): on
# LVIS-like 640x480 label maps, libpng's "up" filter with zlib's run-length strategy encodes in
# ~1.5 ms against ~10 ms for Pillow's default (adaptive filters, level 6), for ~20% more bytes.
PNG_FILTER = "up"
PNG_STRATEGY = "rle"
PNG_COMPRESSION = 1
NO_ANNOTATION_REASON = "no annotation in the LVIS or COCO-Stuff files"

ClassMask = tuple[int, np.ndarray]  # (class id, HxW boolean mask)
ClassRuns = tuple[int, np.ndarray]  # (class id, COCO run lengths, column-major)


@dataclass
class ImageResult:
    """Outcome of one image: the shard sample when ``status == "ok"``, else the reason."""

    image_id: int | None  # None where the dataset has no numeric id (embseg.formats)
    key: str
    status: str
    reason: str = ""
    jpg: bytes | None = None
    seg_png: bytes | None = None
    meta: dict | None = None
    class_ids: list[int] = field(default_factory=list)
    pixel_counts: list[int] = field(default_factory=list)


def paint_label_map(
    *,
    height: int,
    width: int,
    lvis_masks: Sequence[ClassMask],
    stuff_masks: Sequence[ClassMask],
    overlap: str = "first",
) -> np.ndarray:
    """Paint (class id, HxW mask) pairs into a uint16 label map by the module's rule.

    ``lvis_masks`` and ``stuff_masks`` are in annotation-file order; a stuff class id of 0 is
    COCO-Stuff ``other`` (claims pixels as unlabeled).
    """
    def runs(masks: Sequence[ClassMask]) -> list[ClassRuns]:
        out = []
        for class_id, mask in masks:
            mask = np.asarray(mask, dtype=bool)
            if mask.shape != (height, width):
                raise ValueError(f"mask shape {mask.shape} differs from label map "
                                 f"{(height, width)}")
            encoded = mask_utils.encode(np.asfortranarray(mask.astype(np.uint8)))
            out.append((class_id, _runs_of(encoded["counts"], height, width)))
        return out

    return paint_runs_label_map(height=height, width=width, lvis_runs=runs(lvis_masks),
                                stuff_runs=runs(stuff_masks), overlap=overlap)


def paint_runs_label_map(
    *,
    height: int,
    width: int,
    lvis_runs: Sequence[ClassRuns],
    stuff_runs: Sequence[ClassRuns],
    overlap: str = "first",
) -> np.ndarray:
    """:func:`paint_label_map` for masks given as COCO run lengths (:mod:`embseg.rle`)."""
    return _paint_runs(height, width, lvis_runs, stuff_runs, overlap)[0]


def _paint_runs(height: int, width: int, lvis_runs: Sequence[ClassRuns],
                stuff_runs: Sequence[ClassRuns],
                overlap: str) -> tuple[np.ndarray, tuple[list[int], list[int]]]:
    """The label map and its :func:`class_pixel_counts`, counted while painting."""
    if overlap not in OVERLAP_MODES:
        raise ValueError(f"overlap must be one of {OVERLAP_MODES}, not {overlap!r}")
    ordered = list(lvis_runs)
    if overlap == "smaller":
        ordered.sort(key=lambda pair: rle.runs_area(pair[1]))  # stable: ties keep file order
    label_t = np.zeros(height * width, dtype=np.uint16)  # column-major, as runs count
    claimed_t = np.zeros(height * width, dtype=bool)
    painted: dict[int, int] = {}
    for class_id, runs in [*ordered, *stuff_runs]:
        if int(runs.sum()) != height * width:
            raise ValueError(f"runs cover {int(runs.sum())} pixels, the map has "
                             f"{height * width}")
        got = rle.paint_runs(label_t, claimed_t, runs, class_id)
        if got and class_id:
            painted[class_id] = painted.get(class_id, 0) + got
    ids = sorted(painted)
    return (np.ascontiguousarray(label_t.reshape(width, height).T),
            (ids, [painted[i] for i in ids]))


def _runs_of(counts: bytes | str, height: int, width: int) -> np.ndarray:
    """Run lengths of a compressed string that pycocotools itself produced."""
    status, runs = rle.decode_counts(counts, height, width, canonical=False)
    if status != rle.COUNTS_OK:
        raise RuntimeError(f"pycocotools produced an RLE that does not decode (status {status})")
    return runs


def encode_label_png(label: np.ndarray) -> bytes:
    """The label map as 16-bit grayscale PNG bytes (same array -> same bytes).

    Written by libpng through OpenCV with :data:`PNG_FILTER` / :data:`PNG_STRATEGY` (Pillow
    has no filter choice); any PNG reader gives the same uint16 array back.
    """
    if label.dtype != np.uint16 or label.ndim != 2:
        raise ValueError(f"label map must be a 2-D uint16 array, not {label.dtype} {label.shape}")
    import cv2

    ok, data = cv2.imencode(".png", label, png_parameters(PNG_FILTER, PNG_STRATEGY,
                                                          PNG_COMPRESSION))
    if not ok:
        raise RuntimeError(f"PNG encoding of a {label.shape} label map failed")
    return data.tobytes()


def png_parameters(filter_name: str, strategy: str, compression: int) -> list[int]:
    """OpenCV ``imencode`` parameters for a PNG filter, zlib strategy and level."""
    import cv2

    filters = {"none": cv2.IMWRITE_PNG_FILTER_NONE, "sub": cv2.IMWRITE_PNG_FILTER_SUB,
               "up": cv2.IMWRITE_PNG_FILTER_UP, "paeth": cv2.IMWRITE_PNG_FILTER_PAETH,
               "fast": cv2.IMWRITE_PNG_FAST_FILTERS}
    strategies = {"default": cv2.IMWRITE_PNG_STRATEGY_DEFAULT,
                  "filtered": cv2.IMWRITE_PNG_STRATEGY_FILTERED,
                  "rle": cv2.IMWRITE_PNG_STRATEGY_RLE}
    return [cv2.IMWRITE_PNG_COMPRESSION, compression, cv2.IMWRITE_PNG_STRATEGY,
            strategies[strategy], cv2.IMWRITE_PNG_FILTER, filters[filter_name]]


def decode_label_png(data: bytes) -> np.ndarray:
    """Inverse of :func:`encode_label_png`: a 2-D uint16 array."""
    with Image.open(io.BytesIO(data)) as image:
        return np.array(image, dtype=np.uint16)


# --- segmentation checks (before the official decoders see the data) -------------------------

_NUMBER_TYPES = {int, float}  # exact types: a bool is not a coordinate


def _is_number(value: object) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _check_polygons(ann_id: object, polygons: list, height: int, width: int) -> None:
    if not polygons:
        raise ItemFailure(f"annotation {ann_id}: segmentation is an empty polygon list")
    for polygon in polygons:
        if not isinstance(polygon, list) or not set(map(type, polygon)) <= _NUMBER_TYPES:
            raise ItemFailure(f"annotation {ann_id}: polygon is not a list of numbers")
        if len(polygon) < 6:
            raise ItemFailure(f"annotation {ann_id}: polygon with fewer than 3 points "
                              f"({len(polygon)} coordinates)")
        if len(polygon) % 2:
            raise ItemFailure(f"annotation {ann_id}: polygon has an odd number of coordinates "
                              f"({len(polygon)})")
        coords = np.asarray(polygon, dtype=np.float64).reshape(-1, 2)
        if not np.isfinite(coords).all():
            raise ItemFailure(f"annotation {ann_id}: polygon has a non-finite coordinate")
        low, high = -POLYGON_TOLERANCE_PX, np.array([width, height]) + POLYGON_TOLERANCE_PX
        outside = ((coords < low) | (coords > high)).any(axis=1)
        if outside.any():
            x, y = coords[int(np.argmax(outside))]
            raise ItemFailure(f"annotation {ann_id}: polygon point ({x:g}, {y:g}) lies outside "
                              f"the {width}x{height} image")


def _check_rle(ann_id: object, rle: dict, height: int, width: int) -> None:
    size, counts = rle.get("size"), rle.get("counts")
    if not (isinstance(size, list) and len(size) == 2 and all(_is_number(v) for v in size)):
        raise ItemFailure(f"annotation {ann_id}: RLE has no [height, width] 'size'")
    if list(size) != [height, width]:
        raise ItemFailure(f"annotation {ann_id}: RLE size {size[1]}x{size[0]} differs from the "
                          f"image {width}x{height} (width x height)")
    if isinstance(counts, list):
        if not all(isinstance(c, int) and not isinstance(c, bool) and c >= 0 for c in counts):
            raise ItemFailure(f"annotation {ann_id}: RLE counts are not non-negative integers")
        if sum(counts) != height * width:
            raise ItemFailure(f"annotation {ann_id}: uncompressed RLE covers {sum(counts)} "
                              f"pixels, the image has {height * width}")
    elif not isinstance(counts, str) or not counts:
        raise ItemFailure(f"annotation {ann_id}: RLE 'counts' is neither a list nor a string")


def check_segmentation(ann: dict, height: int, width: int) -> None:
    """Raise ItemFailure (naming the annotation id) if the segmentation cannot be decoded right."""
    ann_id = ann.get("id")
    segmentation = ann.get("segmentation")
    if isinstance(segmentation, list):
        _check_polygons(ann_id, segmentation, height, width)
    elif isinstance(segmentation, dict):
        _check_rle(ann_id, segmentation, height, width)
    else:
        raise ItemFailure(f"annotation {ann_id}: segmentation is neither polygons nor RLE")


def segmentation_runs(ann: dict, height: int, width: int) -> np.ndarray:
    """The annotation's mask as COCO run lengths, made as the official APIs make its RLE.

    Raises ItemFailure (naming the annotation id) for a segmentation that cannot be decoded
    right (see :func:`check_segmentation`; a compressed string must be well-formed, cover
    exactly the image and be in the canonical form pycocotools' encoder writes).
    """
    check_segmentation(ann, height, width)
    ann_id = ann.get("id")
    segmentation = ann["segmentation"]
    if isinstance(segmentation, dict) and isinstance(segmentation["counts"], list):
        return np.asarray(segmentation["counts"], dtype=np.int64)  # checked: sums to h*w
    if isinstance(segmentation, dict):
        status, runs = rle.decode_counts(segmentation["counts"], height, width)
        if status == rle.COUNTS_OK:
            return runs
        if status in (rle.COUNTS_SHORT, rle.COUNTS_NOT_CANONICAL):
            raise ItemFailure(f"annotation {ann_id}: compressed RLE does not encode a full "
                              f"{width}x{height} mask")
        covered = f" (covers {int(runs.sum())} pixels, the image has {height * width})" \
            if status == rle.COUNTS_LONG else " (not a pycocotools counts string)"
        raise ItemFailure(f"annotation {ann_id}: cannot decode segmentation{covered}")
    try:
        with warnings.catch_warnings():  # pycocotools' numpy-2 __array__ DeprecationWarning
            warnings.simplefilter("ignore", DeprecationWarning)
            parts = mask_utils.frPyObjects(segmentation, height, width)
            merged = parts[0] if len(parts) == 1 else mask_utils.merge(parts)  # same result
    except Exception as exc:  # pycocotools raises ValueError/TypeError for odd input
        raise ItemFailure(f"annotation {ann_id}: cannot decode segmentation "
                          f"({type(exc).__name__}: {' '.join(str(exc).split())})") from exc
    return _runs_of(merged["counts"], height, width)


def _class_runs(annotations: list[dict], height: int, width: int) -> list[ClassRuns]:
    return [(ann["class_id"], segmentation_runs(ann, height, width)) for ann in annotations]


# --- one image, end to end -------------------------------------------------------------------

def _one_line(exc: BaseException) -> str:
    return " ".join(str(exc).split()) or type(exc).__name__


def read_item_file(path: Path, what: str = "image") -> bytes:
    """The bytes of one item's ``what`` file (image, label); an ItemFailure naming the file
    when it is missing, unreadable or empty (the item fails, the build goes on)."""
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        raise ItemFailure(f"{what} file not found: {path}") from None
    except OSError as exc:
        raise ItemFailure(f"cannot read {what} file {path}: {_one_line(exc)}") from exc
    if not data:
        raise ItemFailure(f"{what} file is empty: {path}")
    return data


def stored_image_size(data: bytes) -> tuple[int, int]:
    """(width, height) of the stored pixel grid after a full decode by content (no EXIF turn).

    Raises ItemFailure for bytes that no decoder accepts or that end early. A JPEG is decoded
    at 1/8 scale (``draft``): libjpeg still reads and entropy-decodes every block, so a
    damaged or truncated file fails the same way, at about half the cost of a full decode.
    """
    try:
        with Image.open(io.BytesIO(data)) as image:
            size = image.size
            if image.format == "JPEG":
                image.draft(image.mode, (max(1, size[0] // 8), max(1, size[1] // 8)))
            image.load()
            return size
    except Exception as exc:  # PIL raises OSError, SyntaxError, ValueError, ... for bad files
        raise ItemFailure(f"image cannot be decoded ({type(exc).__name__}: "
                          f"{_one_line(exc)})") from exc


def class_pixel_counts(label: np.ndarray) -> tuple[list[int], list[int]]:
    """The class ids present in a label map (0 excluded) and their pixel counts."""
    counts = np.bincount(label.ravel())
    present = np.flatnonzero(counts)
    present = present[present > 0]
    return present.tolist(), counts[present].tolist()


def _process(item: ImageItem, images_root: Path, overlap: str) -> ImageResult:
    if item.failure:
        raise ItemFailure(item.failure)
    if not item.lvis_anns and not item.stuff_anns:
        return ImageResult(image_id=item.image_id, key=item.key, status="skipped",
                           reason=NO_ANNOTATION_REASON)
    data = read_item_file(images_root / item.rel_path)
    width, height = stored_image_size(data)
    if (width, height) != (item.width, item.height):
        raise ItemFailure(f"image is {width}x{height} pixels but the annotations say "
                          f"{item.width}x{item.height} (width x height)")
    label, (class_ids, pixel_counts) = _paint_runs(
        item.height, item.width, _class_runs(item.lvis_anns, item.height, item.width),
        _class_runs(item.stuff_anns, item.height, item.width), overlap)
    meta = {"image_id": item.image_id, "height": item.height, "width": item.width,
            "file_name": item.file_name, "n_lvis": len(item.lvis_anns),
            "n_stuff": len(item.stuff_anns), "classes": class_ids}
    return ImageResult(image_id=item.image_id, key=item.key, status="ok", jpg=data,
                       seg_png=encode_label_png(label), meta=meta, class_ids=class_ids,
                       pixel_counts=pixel_counts)


def process_image(item: ImageItem, images_root: Path, *, overlap: str = "first") -> ImageResult:
    """Read, check and label one image; per-image problems give ``failed`` with a reason.

    The image bytes are kept unchanged (for the shard); the label map follows the stored pixel
    grid (no EXIF orientation), whose size must equal the annotations' height and width.
    """
    if overlap not in OVERLAP_MODES:
        raise ValueError(f"overlap must be one of {OVERLAP_MODES}, not {overlap!r}")
    try:
        return _process(item, Path(images_root), overlap)
    except ItemFailure as exc:
        reason = str(exc)
    except Exception as exc:  # never let one image stop a build of 120k
        reason = f"unexpected {type(exc).__name__}: {_one_line(exc)}"
    return ImageResult(image_id=item.image_id, key=item.key, status="failed", reason=reason)


__all__ = [
    "ImageResult",
    "check_segmentation",
    "class_pixel_counts",
    "decode_label_png",
    "encode_label_png",
    "paint_label_map",
    "paint_runs_label_map",
    "process_image",
    "segmentation_runs",
    "stored_image_size",
]
