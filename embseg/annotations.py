"""Loading LVIS v1 and COCO-Stuff annotation files into per-image work items.

Every file is parsed once here and checked; whatever makes a whole file unusable (missing,
empty, malformed JSON, not LVIS/COCO format, unknown category, duplicate image ids, ...) raises
:class:`EmbsegError` with one line naming the file and the item. Problems of a single image found
at load time (unsafe path, sizes that disagree between files) are stored in
:attr:`ImageItem.failure` so that the build records that image as failed and goes on.

The input images are the LVIS file's images; COCO-Stuff files only add labels. Items are plain
picklable dataclasses: they travel to Ray workers, where :func:`embseg.labels.process_image`
decodes their masks with the official ``lvis`` / ``pycocotools`` APIs.
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import Any
from urllib.parse import urlparse

from embseg.errors import EmbsegError
from embseg.vocab import (
    Vocabulary,
    combine_stuff_categories,
    merge_vocabulary,
    read_json_file,
    validate_categories,
)


@dataclass
class ImageItem:
    """One input image with its annotations from every file (class ids already resolved).

    ``lvis_anns`` and ``stuff_anns`` keep file order (the painting order) and each dict carries
    ``class_id``: the merged class id (0 for COCO-Stuff ``other``). ``failure`` holds a problem
    found at load time; such an item is recorded as failed and its path is never opened.
    """

    image_id: int
    rel_path: str
    height: int
    width: int
    lvis_anns: list[dict] = field(default_factory=list)
    stuff_anns: list[dict] = field(default_factory=list)
    in_stuff: bool = False
    failure: str | None = None

    @property
    def key(self) -> str:
        """The WebDataset ``__key__``: the image id zero-padded to 12 digits."""
        return f"{self.image_id:012d}"

    @property
    def file_name(self) -> str:
        """The image file's own name (COCO ``file_name`` style, e.g. ``000000391895.jpg``)."""
        return PurePosixPath(self.rel_path).name

    def image_path(self, images_root: Path) -> Path | None:
        """Where the image file lies under ``images_root``; None for a failed item."""
        if self.failure is not None:
            return None
        return Path(images_root) / self.rel_path


@dataclass
class BuildInputs:
    """Everything a build needs from the annotation files: vocabulary and sorted items."""

    vocab: Vocabulary
    items: list[ImageItem]
    source_files: list[Path]


@dataclass
class AnnotationFile:
    """One parsed and checked LVIS/COCO annotation file."""

    path: Path
    images: list[dict]
    annotations: list[dict]
    categories: list[dict]


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _check_images(path: Path, images: list) -> None:
    seen: set[int] = set()
    for index, image in enumerate(images):
        if not isinstance(image, dict) or not _is_int(image.get("id")):
            raise EmbsegError(f"{path}: image #{index} has no integer 'id'")
        for dim in ("height", "width"):
            if not _is_int(image.get(dim)) or image[dim] <= 0:
                raise EmbsegError(f"{path}: image id {image['id']} has no positive integer "
                                  f"'{dim}'")
        if image["id"] in seen:
            raise EmbsegError(f"{path}: duplicate image id {image['id']}")
        seen.add(image["id"])


def _check_annotations(path: Path, annotations: list, image_ids: set[int],
                       category_ids: set[int]) -> None:
    seen: set[int] = set()
    for index, ann in enumerate(annotations):
        if not isinstance(ann, dict) or not _is_int(ann.get("id")):
            raise EmbsegError(f"{path}: annotation #{index} has no integer 'id'")
        ann_id = ann["id"]
        for key in ("image_id", "category_id"):
            if not _is_int(ann.get(key)):
                raise EmbsegError(f"{path}: annotation id {ann_id} has no integer '{key}'")
        if ann_id in seen:
            raise EmbsegError(f"{path}: duplicate annotation id {ann_id}")
        seen.add(ann_id)
        if ann["category_id"] not in category_ids:
            raise EmbsegError(f"{path}: annotation id {ann_id} has category_id "
                              f"{ann['category_id']}, which is not in 'categories'")
        if ann["image_id"] not in image_ids:
            raise EmbsegError(f"{path}: annotation id {ann_id} refers to image id "
                              f"{ann['image_id']}, which is not in 'images'")


def load_annotation_file(path: Path) -> AnnotationFile:
    """Parse and check one LVIS/COCO-format file (EmbsegError naming the file and item)."""
    path = Path(path)
    data = read_json_file(path)
    if not isinstance(data, dict):
        raise EmbsegError(f"{path}: not an LVIS/COCO annotation file (top level is "
                          f"{type(data).__name__}, expected an object)")
    for key in ("images", "annotations", "categories"):
        if key not in data:
            raise EmbsegError(f"{path}: not an LVIS/COCO annotation file (no '{key}')")
        if not isinstance(data[key], list):
            raise EmbsegError(f"{path}: not an LVIS/COCO annotation file ('{key}' is "
                              f"{type(data[key]).__name__}, expected a list)")
    categories = validate_categories(data["categories"], str(path))
    _check_images(path, data["images"])
    _check_annotations(path, data["annotations"], {img["id"] for img in data["images"]},
                       {cat["id"] for cat in categories})
    return AnnotationFile(path=path, images=data["images"], annotations=data["annotations"],
                          categories=categories)


def _safe_relative(text: str) -> str | None:
    """``text`` as a relative POSIX path inside the images root, or None if it could escape."""
    pure = PurePosixPath(text)
    if not text or "\x00" in text or pure.is_absolute() or ".." in pure.parts:
        return None
    parts = [p for p in pure.parts if p != "."]
    return "/".join(parts) if parts else None


def image_rel_path(image: dict) -> tuple[str, str | None]:
    """Relative image path (``train2017/000000391895.jpg``) and a failure reason or None.

    From LVIS ``coco_url`` the last two path parts; without ``coco_url``, ``file_name``. A path
    that could leave the images root (``..`` anywhere, absolute) is refused with a reason.
    """
    url = image.get("coco_url")
    if isinstance(url, str) and url:
        url_path = urlparse(url).path
        parts = [p for p in url_path.split("/") if p and p != "."]
        if ".." in parts:
            return url, f"unsafe path: coco_url {url!r} contains '..'"
        if not parts:
            return url, f"coco_url {url!r} names no file"
        return "/".join(parts[-2:]), None
    name = image.get("file_name")
    if isinstance(name, str) and name:
        safe = _safe_relative(name)
        if safe is None:
            return name, f"unsafe path: file_name {name!r} is absolute or contains '..'"
        return safe, None
    return "", "image has neither 'coco_url' nor 'file_name'"


def _anns_by_image(annotations: list[dict]) -> dict[int, list[dict]]:
    grouped: dict[int, list[dict]] = defaultdict(list)
    for ann in annotations:
        grouped[ann["image_id"]].append(ann)
    return grouped


def _stuff_index(stuff_files: list[AnnotationFile]) -> dict[int, tuple[AnnotationFile, dict]]:
    """Image id -> (stuff file, image dict); an image in two stuff files is an error."""
    index: dict[int, tuple[AnnotationFile, dict]] = {}
    for stuff in stuff_files:
        for image in stuff.images:
            seen = index.get(image["id"])
            if seen is not None:
                raise EmbsegError(f"image id {image['id']} appears in two COCO-Stuff files: "
                                  f"{seen[0].path} and {stuff.path}")
            index[image["id"]] = (stuff, image)
    return index


def _size_failure(lvis: AnnotationFile, image: dict, stuff: AnnotationFile,
                  stuff_image: dict) -> str | None:
    lvis_size = (image["width"], image["height"])
    stuff_size = (stuff_image["width"], stuff_image["height"])
    if lvis_size == stuff_size:
        return None
    return (f"size disagrees between files: {lvis.path.name} says {lvis_size[0]}x{lvis_size[1]}, "
            f"{stuff.path.name} says {stuff_size[0]}x{stuff_size[1]} (width x height)")


def _resolve_class_ids(annotations: list[dict], mapping: dict[int, int]) -> None:
    for ann in annotations:
        ann["class_id"] = mapping[ann["category_id"]]


def load_build_inputs(lvis_path: Path, stuff_paths: list[Path], images_root: Path) -> BuildInputs:
    """Parse the LVIS file and the COCO-Stuff files once; return the vocabulary and the items.

    Raises EmbsegError (one line naming the file and the item) for every fatal input problem.
    """
    lvis = load_annotation_file(lvis_path)
    stuff_files = [load_annotation_file(p) for p in stuff_paths]
    images_root = Path(images_root)
    if not images_root.is_dir():
        raise EmbsegError(f"{images_root}: images root folder not found")
    stuff_categories = combine_stuff_categories([(str(s.path), s.categories) for s in stuff_files])
    vocab = merge_vocabulary(lvis.categories, stuff_categories, lvis_source=str(lvis.path),
                             stuff_source=", ".join(str(s.path) for s in stuff_files))
    _resolve_class_ids(lvis.annotations, vocab.lvis_to_class)
    for stuff in stuff_files:
        _resolve_class_ids(stuff.annotations, vocab.stuff_to_class)
    stuff_index = _stuff_index(stuff_files)
    lvis_anns = _anns_by_image(lvis.annotations)
    stuff_anns: dict[int, list[dict]] = {}
    for stuff in stuff_files:
        stuff_anns.update(_anns_by_image(stuff.annotations))

    items = []
    for image in sorted(lvis.images, key=lambda img: img["id"]):
        rel_path, failure = image_rel_path(image)
        in_stuff = image["id"] in stuff_index
        if in_stuff:
            size_failure = _size_failure(lvis, image, *stuff_index[image["id"]])
            failure = "; ".join(f for f in (failure, size_failure) if f) or None
        items.append(ImageItem(
            image_id=image["id"], rel_path=rel_path, height=image["height"],
            width=image["width"], lvis_anns=lvis_anns.get(image["id"], []),
            stuff_anns=stuff_anns.get(image["id"], []), in_stuff=in_stuff, failure=failure))
    return BuildInputs(vocab=vocab, items=items,
                       source_files=[lvis.path, *(s.path for s in stuff_files)])
