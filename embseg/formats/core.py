"""What every label-map format shares: items, the value map, pairing files, one item's sample.

A label-map dataset is a set of (image file, label PNG) pairs under a root folder plus a class
table. Its label PNGs hold the dataset's own values; a :class:`ValueMap` turns each value into
an embseg class id (1..C) or 0 (unlabelled), and refuses any value the dataset's table does not
have. :func:`process_pair` is the per-item work of the build: read both files, check them,
map the values and package the sample as the LVIS build does (original image bytes, a uint16
label PNG from :func:`embseg.labels.encode_label_png`, the present class ids and their pixel
counts from :func:`embseg.labels.class_pixel_counts`). It never raises for a per-item problem: a missing,
unpaired, undecodable or wrongly sized file, or a value outside the table, gives an
:class:`~embseg.labels.ImageResult` with status ``failed`` and a one-line reason.

Items are small frozen dataclasses (a key and two relative paths), so a plan of a million
images travels to the workers cheaply.
"""

from __future__ import annotations

import hashlib
import io
import os
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path, PurePosixPath

import numpy as np
from PIL import Image

from embseg.errors import EmbsegError, ItemFailure
from embseg.labels import (
    ImageResult,
    class_pixel_counts,
    encode_label_png,
    read_item_file,
    stored_image_size,
)
from embseg.vocab import Vocabulary

# Label PNG modes whose pixels are the stored values themselves (P: the palette index).
VALUE_MODES = ("L", "P", "I;16", "I;16B", "I;16L", "I")
# A tar member name (ustar) has 100 bytes: "<key>.seg.png" must fit.
MAX_KEY_BYTES = 90


@dataclass(frozen=True)
class PairItem:
    """One sample of a label-map dataset: its key and where its two files are.

    ``image`` and ``label`` are POSIX paths relative to the dataset root (None when the file
    is missing, and then ``failure`` says so). ``failure`` holds a problem found while listing
    the dataset; such an item is recorded as failed and never opened.
    """

    key: str
    image: str | None
    label: str | None
    image_id: int | None = None
    failure: str | None = None

    @property
    def rel_path(self) -> str:
        """The image's path relative to the root (the label's when there is no image)."""
        return self.image or self.label or ""

    @property
    def file_name(self) -> str:
        """The image file's own name (the label's when there is no image)."""
        return PurePosixPath(self.rel_path).name

    def paths(self, root: Path) -> list[Path]:
        """The files the item reads (for input fingerprints); none for a failed item."""
        if self.failure is not None:
            return []
        return [Path(root) / rel for rel in (self.image, self.label) if rel]


@dataclass(frozen=True)
class ValueMap:
    """Label-PNG value -> embseg class id (0 = unlabelled); other values are refused.

    ``values`` and ``class_ids`` are parallel: a value listed with class id 0 is unlabelled.
    ``dataset`` names the table in failure reasons.
    """

    dataset: str
    values: tuple[int, ...]
    class_ids: tuple[int, ...]

    def __post_init__(self) -> None:
        if len(self.values) != len(self.class_ids):
            raise ValueError("values and class_ids must have the same length")
        if len(set(self.values)) != len(self.values):
            raise ValueError("a value is listed twice")
        if self.values and not 0 <= min(self.values) <= max(self.values) <= 65535:
            raise ValueError("label values must lie in 0..65535")

    @cached_property
    def table(self) -> np.ndarray:
        """A lookup array: ``table[v]`` is v's class id, or -1 when v is not in the table."""
        table = np.full(max(self.values, default=-1) + 1, -1, dtype=np.int32)
        table[list(self.values)] = self.class_ids
        return table

    def as_dict(self) -> dict[int, int]:
        """Value -> class id."""
        return dict(zip(self.values, self.class_ids, strict=True))

    def digest(self) -> str:
        """sha256 of the mapping (part of a build's input hash)."""
        text = ",".join(f"{v}:{c}" for v, c in sorted(self.as_dict().items()))
        return hashlib.sha256(f"{self.dataset}|{text}".encode()).hexdigest()

    def apply(self, values: np.ndarray) -> np.ndarray:
        """The uint16 label map of a 2-D array of raw values; ItemFailure names bad values."""
        values = np.asarray(values)
        table = self.table
        flat = values.astype(np.int64, copy=False).ravel()
        inside = (flat >= 0) & (flat < table.size)
        mapped = np.full(flat.shape, -1, dtype=np.int32)
        mapped[inside] = table[flat[inside]]
        bad = mapped < 0
        if bad.any():
            found, counts = np.unique(flat[bad], return_counts=True)
            listed = ", ".join(f"{int(v)} ({int(n)} px)" for v, n in zip(found[:5], counts[:5],
                                                                          strict=True))
            more = f" and {found.size - 5} more" if found.size > 5 else ""
            raise ItemFailure(f"label has values outside the {self.dataset} table: "
                              f"{listed}{more}")
        return mapped.reshape(values.shape).astype(np.uint16)


@dataclass
class LabelMapDataset:
    """One split of a dataset in its own layout: what the build needs to plan and run it.

    ``source_files`` are files besides the images and labels whose content decides the build
    (a split list, a class list): the build hashes their bytes.
    """

    format: str
    root: Path
    split: str
    vocab: Vocabulary
    value_map: ValueMap
    items: list[PairItem]
    source_files: list[Path] = field(default_factory=list)

    def options_digest(self) -> str:
        """sha256 over what, besides the files, decides every sample: format, table, map."""
        text = f"{self.format}|{self.vocab.content_hash()}|{self.value_map.digest()}"
        return hashlib.sha256(text.encode()).hexdigest()

    def process(self, item: PairItem) -> ImageResult:
        """:func:`process_pair` of one of this dataset's items."""
        return process_pair(item, self.root, self.value_map, fmt=self.format)


# --------------------------------------------------------------------------- listing files


def require_folder(path: Path, what: str) -> Path:
    """``path`` if it is a folder, else EmbsegError naming it and what it should be."""
    if not path.is_dir():
        raise EmbsegError(f"{path}: folder not found ({what})")
    return path


def key_problem(key: str) -> str | None:
    """Why ``key`` cannot be a WebDataset ``__key__`` (None when it can)."""
    if not key:
        return "empty file stem"
    if "." in key:
        return (f"file stem {key!r} contains '.', which WebDataset takes for the start of the "
                "member suffix; rename the file")
    if len(key.encode("utf-8")) > MAX_KEY_BYTES:
        return f"file stem {key!r} is longer than {MAX_KEY_BYTES} bytes (tar member names)"
    return None


@dataclass
class Listing:
    """Files of one kind found in a folder: key -> path relative to the root, and problems."""

    found: dict[str, str] = field(default_factory=dict)
    duplicates: dict[str, list[str]] = field(default_factory=dict)
    unexpected: list[str] = field(default_factory=list)


def list_files(folder: Path, root: Path, suffix: str, *, depth: int = 0,
               companions: tuple[str, ...] = (), exclude: Path | None = None,
               suffixes: tuple[str, ...] | None = None) -> Listing:
    """Files named ``<key><suffix>`` in ``folder``, ``depth`` folder levels down (``-1``: any).

    ``suffixes`` (case-insensitive) replaces ``suffix`` when several are allowed. Names ending
    in one of ``companions`` belong to the dataset but are not used (e.g. Cityscapes'
    ``_gtFine_color.png``); hidden files (``.name``) are ignored. Anything else, and files at
    another depth, are listed as ``unexpected`` (the build records them as failed). ``exclude``
    is a folder not to descend into.
    """
    wanted = tuple(s.lower() for s in (suffixes or (suffix,)))
    listing = Listing()
    root = Path(root)
    for dirpath, dirnames, filenames in os.walk(folder):
        here = Path(dirpath)
        level = len(here.relative_to(folder).parts)
        dirnames[:] = sorted(d for d in dirnames if not d.startswith(".")
                             and (exclude is None or (here / d).resolve() != exclude.resolve()))
        for name in sorted(filenames):
            if name.startswith("."):
                continue
            rel = (here / name).relative_to(root).as_posix()
            if companions and name.endswith(companions):
                continue
            match = next((s for s in wanted if name.lower().endswith(s)), None)
            if match is None or (depth >= 0 and level != depth):
                listing.unexpected.append(rel)
                continue
            key = name[:-len(match)]
            if key in listing.found or key in listing.duplicates:
                listing.duplicates.setdefault(key, [listing.found.pop(key)]
                                              if key in listing.found else []).append(rel)
            else:
                listing.found[key] = rel
    return listing


def pair_listings(images: Listing, labels: Listing, *, expected_label: Callable[[str], str],
                  expected_image: Callable[[str], str],
                  image_id: Callable[[str], int | None] | None = None) -> list[PairItem]:
    """Items of two listings paired by key, sorted by key; every problem becomes a failed item.

    ``expected_label(key)`` / ``expected_image(key)`` give the path (relative to the root)
    where the missing partner was looked for, for the failure reason; ``image_id(key)`` an
    optional numeric id.
    """
    items: dict[str, PairItem] = {}
    for key in set(images.found) | set(labels.found):
        image, label = images.found.get(key), labels.found.get(key)
        number = image_id(key) if image_id is not None else None
        failure = key_problem(key)
        if failure is None and label is None:
            failure = f"no label file for image {image} (expected {expected_label(key)})"
        elif failure is None and image is None:
            failure = f"no image file for label {label} (expected {expected_image(key)})"
        items[key] = PairItem(key=key, image=image, label=label, image_id=number,
                              failure=failure)
    for listing, kind in ((images, "image"), (labels, "label")):
        for key, paths in listing.duplicates.items():
            items[key] = PairItem(key=key, image=None, label=None, failure=(
                f"{len(paths)} {kind} files share the key {key!r}: {', '.join(paths)}"))
        for rel in listing.unexpected:
            items[rel] = PairItem(key=rel, image=None, label=None, failure=(
                f"unexpected file {rel} in the {kind} folder (not part of the dataset's "
                "layout; move it away)"))
    return [items[key] for key in sorted(items)]


# --------------------------------------------------------------------------- one item


def _one_line(exc: BaseException) -> str:
    return " ".join(str(exc).split()) or type(exc).__name__


def read_label_values(data: bytes) -> np.ndarray:
    """The stored values of a label PNG (palette indices for mode P), as a 2-D array.

    ItemFailure for a file that is no PNG, does not decode, or holds colours (RGB/RGBA)
    rather than values.
    """
    try:
        with Image.open(io.BytesIO(data)) as image:
            if image.format != "PNG":
                raise ItemFailure(f"label file is {image.format or 'not a known format'}, "
                                  "not PNG")
            if image.mode not in VALUE_MODES:
                raise ItemFailure(f"label PNG has mode {image.mode}: it must store one value "
                                  f"per pixel (modes {', '.join(VALUE_MODES)}), not colours")
            image.load()
            return np.array(image)
    except ItemFailure:
        raise
    except Exception as exc:  # PIL raises OSError, SyntaxError, ValueError, ... for bad files
        raise ItemFailure(f"label PNG cannot be decoded ({type(exc).__name__}: "
                          f"{_one_line(exc)})") from exc


def _process(item: PairItem, root: Path, value_map: ValueMap, fmt: str) -> ImageResult:
    if item.failure:
        raise ItemFailure(item.failure)
    if item.image is None or item.label is None:
        raise ItemFailure("item has no image or no label file")
    data = read_item_file(root / item.image, "image")
    width, height = stored_image_size(data)
    values = read_label_values(read_item_file(root / item.label, "label"))
    if values.shape != (height, width):
        raise ItemFailure(f"label {item.label} is {values.shape[1]}x{values.shape[0]} but the "
                          f"image is {width}x{height} (width x height)")
    label = value_map.apply(values)
    class_ids, pixel_counts = class_pixel_counts(label)
    meta = {"format": fmt, "height": height, "width": width, "file_name": item.file_name,
            "label_file": item.label, "classes": class_ids}
    if item.image_id is not None:
        meta["image_id"] = item.image_id
    return ImageResult(image_id=item.image_id, key=item.key, status="ok", jpg=data,
                       seg_png=encode_label_png(label), meta=meta, class_ids=class_ids,
                       pixel_counts=pixel_counts)


def process_pair(item: PairItem, root: Path, value_map: ValueMap, *, fmt: str) -> ImageResult:
    """Read, check and map one item; a per-item problem gives ``failed`` with the reason.

    The image bytes are kept unchanged (a PNG image stays PNG bytes under the sample's
    ``jpg`` member, which every reader decodes by content); the label map follows the stored
    pixel grid of both files, whose sizes must be equal.
    """
    try:
        return _process(item, Path(root), value_map, fmt)
    except ItemFailure as exc:
        reason = str(exc)
    except Exception as exc:  # never let one item stop a build
        reason = f"unexpected {type(exc).__name__}: {_one_line(exc)}"
    return ImageResult(image_id=item.image_id, key=item.key, status="failed", reason=reason)


def split_choice(split: str, allowed: Iterable[str], fmt: str) -> str:
    """``split`` if the format has it, else EmbsegError listing the format's split names."""
    allowed = list(allowed)
    if split not in allowed:
        raise EmbsegError(f"--split {split!r}: {fmt} splits are {', '.join(allowed)}")
    return split
