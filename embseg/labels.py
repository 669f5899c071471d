"""Per-image work of the dataset build: decode masks, paint the label map, package the sample.

Painting rule (:func:`paint_label_map`): LVIS instance masks are painted in annotation-file
order and an earlier annotation keeps its pixels (first wins); then COCO-Stuff masks fill only
the pixels LVIS left at 0, first wins among stuff too; a COCO-Stuff ``other`` mask claims its
pixels as 0 (unlabeled). With ``overlap="smaller"`` the LVIS masks are ordered by decoded area,
smallest first (ties keep file order), so smaller instances end up over larger ones.

Masks are decoded by the official APIs only (``lvis.LVIS.ann_to_mask`` for LVIS,
``pycocotools.coco.COCO.annToMask`` for COCO-Stuff), each built over just one item's annotation
dicts. Before decoding, every segmentation is checked, because pycocotools silently turns a
4-number polygon into a box and fills an RLE that is too short with uninitialised memory.

:func:`process_image` never raises for a per-image problem: it returns an :class:`ImageResult`
with status ``failed`` (or ``skipped``) and a one-line reason.
"""

from __future__ import annotations

import contextlib
import io
import warnings
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pycocotools.mask as mask_utils
from lvis.lvis import LVIS
from PIL import Image
from pycocotools.coco import COCO

from embseg.annotations import ImageItem
from embseg.errors import ItemFailure

OVERLAP_MODES = ("first", "smaller")
# A polygon point may lie this far outside the image (annotation tools round outwards);
# further out means the annotation does not belong to an image of this size.
POLYGON_TOLERANCE_PX = 1.0
PNG_COMPRESS_LEVEL = 6
NO_ANNOTATION_REASON = "no annotation in the LVIS or COCO-Stuff files"

ClassMask = tuple[int, np.ndarray]


@dataclass
class ImageResult:
    """Outcome of one image: the shard sample when ``status == "ok"``, else the reason."""

    image_id: int
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
    if overlap not in OVERLAP_MODES:
        raise ValueError(f"overlap must be one of {OVERLAP_MODES}, not {overlap!r}")
    masks = [(class_id, np.asarray(mask, dtype=bool)) for class_id, mask in lvis_masks]
    if overlap == "smaller":
        masks.sort(key=lambda pair: int(np.count_nonzero(pair[1])))  # stable: ties keep order
    label = np.zeros((height, width), dtype=np.uint16)
    claimed = np.zeros((height, width), dtype=bool)
    for class_id, mask in masks:
        _paint_unclaimed(label, claimed, class_id, mask)
    for class_id, mask in stuff_masks:
        _paint_unclaimed(label, claimed, class_id, np.asarray(mask, dtype=bool))
    return label


def _paint_unclaimed(label: np.ndarray, claimed: np.ndarray, class_id: int,
                     mask: np.ndarray) -> None:
    """Give ``class_id`` to the mask's pixels nobody claimed yet; they are claimed afterwards."""
    if not 0 <= class_id <= np.iinfo(np.uint16).max:
        raise ValueError(f"class id {class_id} does not fit a uint16 label map")
    if mask.shape != label.shape:
        raise ValueError(f"mask shape {mask.shape} differs from label map {label.shape}")
    label[mask & ~claimed] = class_id
    claimed |= mask


def encode_label_png(label: np.ndarray) -> bytes:
    """The label map as 16-bit grayscale PNG bytes (same array -> same bytes)."""
    if label.dtype != np.uint16 or label.ndim != 2:
        raise ValueError(f"label map must be a 2-D uint16 array, not {label.dtype} {label.shape}")
    buffer = io.BytesIO()
    Image.fromarray(label).save(buffer, format="PNG", compress_level=PNG_COMPRESS_LEVEL)
    return buffer.getvalue()


def decode_label_png(data: bytes) -> np.ndarray:
    """Inverse of :func:`encode_label_png`: a 2-D uint16 array."""
    with Image.open(io.BytesIO(data)) as image:
        return np.array(image, dtype=np.uint16)


# --- segmentation checks (before the official decoders see the data) -------------------------

def _is_number(value: object) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _check_polygons(ann_id: object, polygons: list, height: int, width: int) -> None:
    if not polygons:
        raise ItemFailure(f"annotation {ann_id}: segmentation is an empty polygon list")
    for polygon in polygons:
        if not isinstance(polygon, list) or not all(_is_number(v) for v in polygon):
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


def _check_decoded(ann: dict, mask: np.ndarray, height: int, width: int) -> np.ndarray:
    """Verify a decoded mask; a compressed RLE must round-trip (catches too-short counts)."""
    ann_id = ann.get("id")
    if mask.shape != (height, width):
        raise ItemFailure(f"annotation {ann_id}: decoded mask is {mask.shape[1]}x{mask.shape[0]}, "
                          f"the image {width}x{height}")
    if mask.size and mask.max() > 1:
        raise ItemFailure(f"annotation {ann_id}: RLE does not decode to a binary mask")
    counts = ann["segmentation"].get("counts") if isinstance(ann["segmentation"], dict) else None
    if isinstance(counts, str):
        again = mask_utils.encode(np.asfortranarray(mask))["counts"].decode("ascii")
        if again != counts:
            raise ItemFailure(f"annotation {ann_id}: compressed RLE does not encode a full "
                              f"{width}x{height} mask")
    return mask.view(bool)


# --- the official per-image API objects -------------------------------------------------------

def _image_dataset(item: ImageItem, annotations: list[dict]) -> dict:
    image = {"id": item.image_id, "height": item.height, "width": item.width}
    return {"images": [image], "annotations": annotations, "categories": []}


class _ItemLVIS(LVIS):
    """The LVIS API over one image's already-parsed annotations (no file is read again)."""

    def _load_json(self, path):  # LVIS.__init__ hands its argument here: it is the dataset
        return path


def _decode_with(api_to_mask, item: ImageItem, annotations: list[dict]) -> list[ClassMask]:
    masks = []
    for ann in annotations:
        check_segmentation(ann, item.height, item.width)
        try:
            with warnings.catch_warnings():  # pycocotools' numpy-2 __array__ DeprecationWarning
                warnings.simplefilter("ignore", DeprecationWarning)
                mask = api_to_mask(ann)
        except Exception as exc:  # pycocotools raises ValueError/TypeError for bad RLE strings
            raise ItemFailure(f"annotation {ann.get('id')}: cannot decode segmentation "
                              f"({type(exc).__name__}: {' '.join(str(exc).split())})") from exc
        masks.append((ann["class_id"], _check_decoded(ann, mask, item.height, item.width)))
    return masks


def decode_lvis_masks(item: ImageItem) -> list[ClassMask]:
    """(class id, HxW bool mask) of the item's LVIS annotations via ``LVIS.ann_to_mask``."""
    if not item.lvis_anns:
        return []
    api = _ItemLVIS(_image_dataset(item, item.lvis_anns))
    return _decode_with(api.ann_to_mask, item, item.lvis_anns)


def decode_stuff_masks(item: ImageItem) -> list[ClassMask]:
    """(class id, HxW bool mask) of the item's COCO-Stuff annotations via ``COCO.annToMask``."""
    if not item.stuff_anns:
        return []
    with contextlib.redirect_stdout(io.StringIO()):  # COCO prints "creating index..."
        api = COCO()
        api.dataset = _image_dataset(item, item.stuff_anns)
        api.createIndex()
    return _decode_with(api.annToMask, item, item.stuff_anns)


# --- one image, end to end -------------------------------------------------------------------

def _one_line(exc: BaseException) -> str:
    return " ".join(str(exc).split()) or type(exc).__name__


def _read_image_bytes(path: Path) -> bytes:
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        raise ItemFailure(f"image file not found: {path}") from None
    except OSError as exc:
        raise ItemFailure(f"cannot read image file {path}: {_one_line(exc)}") from exc
    if not data:
        raise ItemFailure(f"image file is empty: {path}")
    return data


def stored_image_size(data: bytes) -> tuple[int, int]:
    """(width, height) of the stored pixel grid after a full decode by content (no EXIF turn).

    Raises ItemFailure for bytes that no decoder accepts or that end early.
    """
    try:
        with Image.open(io.BytesIO(data)) as image:
            image.load()
            return image.size
    except Exception as exc:  # PIL raises OSError, SyntaxError, ValueError, ... for bad files
        raise ItemFailure(f"image cannot be decoded ({type(exc).__name__}: "
                          f"{_one_line(exc)})") from exc


def _class_pixel_counts(label: np.ndarray) -> tuple[list[int], list[int]]:
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
    data = _read_image_bytes(images_root / item.rel_path)
    width, height = stored_image_size(data)
    if (width, height) != (item.width, item.height):
        raise ItemFailure(f"image is {width}x{height} pixels but the annotations say "
                          f"{item.width}x{item.height} (width x height)")
    label = paint_label_map(height=item.height, width=item.width,
                            lvis_masks=decode_lvis_masks(item),
                            stuff_masks=decode_stuff_masks(item), overlap=overlap)
    class_ids, pixel_counts = _class_pixel_counts(label)
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
    "decode_label_png",
    "decode_lvis_masks",
    "decode_stuff_masks",
    "encode_label_png",
    "paint_label_map",
    "process_image",
    "stored_image_size",
]
