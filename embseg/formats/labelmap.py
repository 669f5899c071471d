"""A generic folder of label maps: an images folder, a label-PNG folder and a class list.

Files are found in both folders and their subfolders and paired by file stem (``a/x.jpg`` with
``b/x.png``); the key is the stem. Images may be JPEG, PNG, BMP, TIFF or WebP (``.jpg``,
``.jpeg``, ``.png``, ``.bmp``, ``.tif``, ``.tiff``, ``.webp``), labels are PNGs that store one
value per pixel (8- or 16-bit grayscale, or palette indices). An image without a label, a label
without an image, two files with one stem, or another file in either folder fails as an item.

The class list is a UTF-8 text file, one class per line (blank lines and ``#`` comments are
skipped), in one of two styles:

- names only: the n-th class line (from 0) is label value n;
- ``VALUE NAME`` on every line (``7 road``), for tables whose values have gaps; a first
  class line of that form chooses this style.

The unlabelled value (``--unlabelled``, default 255) is no class; any other value that the list
does not name fails the image. Class ids 1..C follow ascending value order; ``classes.parquet``
keeps each class's value as ``source_id``.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

from embseg.errors import EmbsegError
from embseg.formats.core import LabelMapDataset, ValueMap, list_files, pair_listings, require_folder
from embseg.vocab import VocabClass, Vocabulary

NAME = "labelmap"
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff", ".webp")
LABEL_SUFFIX = ".png"
DEFAULT_UNLABELLED = 255
MAX_VALUE = 65535


_NUMBERED = re.compile(r"(\d+)\s+(\S.*)")


def _numbered(line: str) -> tuple[int, str] | None:
    match = _NUMBERED.fullmatch(line)
    return (int(match.group(1)), match.group(2).strip()) if match else None


def read_class_list(path: Path, *, unlabelled: int) -> list[tuple[int, str]]:
    """(value, name) pairs of a class list, ascending by value; EmbsegError naming the line."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise EmbsegError(f"{path}: class list not found") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise EmbsegError(f"{path}: cannot read the class list ({exc})") from exc
    lines = [(number, line.strip()) for number, line in enumerate(text.splitlines(), start=1)
             if line.strip() and not line.strip().startswith("#")]
    if not lines:
        raise EmbsegError(f"{path}: the class list names no class")
    explicit = _numbered(lines[0][1]) is not None  # the first class line sets the style
    pairs: list[tuple[int, str]] = []
    for index, (number, line) in enumerate(lines):
        if not explicit:
            pairs.append((index, line))
            continue
        numbered = _numbered(line)
        if numbered is None:
            raise EmbsegError(f"{path}: line {number}: expected 'VALUE NAME' like the first "
                              f"class line, got {line!r}")
        pairs.append(numbered)
    seen_values: dict[int, int] = {}
    seen_names: dict[str, int] = {}
    for (number, _), (value, name) in zip(lines, pairs, strict=True):
        if value > MAX_VALUE:
            raise EmbsegError(f"{path}: line {number}: value {value} does not fit a 16-bit "
                              "label PNG")
        if value == unlabelled:
            raise EmbsegError(f"{path}: line {number}: value {value} ({name!r}) is the "
                              f"unlabelled value (--unlabelled {unlabelled}); drop the line, "
                              "number the classes, or choose another --unlabelled")
        if value in seen_values:
            raise EmbsegError(f"{path}: line {number}: value {value} is already given on line "
                              f"{seen_values[value]}")
        if name in seen_names:
            raise EmbsegError(f"{path}: line {number}: class name {name!r} is already given on "
                              f"line {seen_names[name]}")
        seen_values[value], seen_names[name] = number, number
    return sorted(pairs)


def open_split(images: Path, split: str, *, labels: Path | None, classes: Path | None,
               unlabelled: int | None = None) -> LabelMapDataset:
    """The (image, label) pairs of two folders and the class list's table.

    ``split`` only names the output; EmbsegError when a folder or the class list is missing.
    """
    if labels is None or classes is None:
        raise EmbsegError("--format labelmap needs --labels (the label PNG folder) and "
                          "--classes (the class list file)")
    unlabelled = DEFAULT_UNLABELLED if unlabelled is None else int(unlabelled)
    if not 0 <= unlabelled <= MAX_VALUE:
        raise EmbsegError(f"--unlabelled {unlabelled}: must be a label value in 0..{MAX_VALUE}")
    images, labels, classes = Path(images), Path(labels), Path(classes)
    require_folder(images, "images of --format labelmap")
    require_folder(labels, "label PNGs of --format labelmap (--labels)")
    if images.resolve() == labels.resolve():
        raise EmbsegError(f"{images}: --images and --labels must be two different folders")
    pairs = read_class_list(classes, unlabelled=unlabelled)
    vocab = Vocabulary(classes=tuple(
        VocabClass(id=rank, name=name, source=NAME, lvis_id=None, coco_stuff_id=None,
                   frequency=None, synonyms=(name,), source_id=value)
        for rank, (value, name) in enumerate(pairs, start=1)), stuff_other_ids=())
    value_map = ValueMap(f"{NAME} ({classes.name})",
                         values=(*(v for v, _ in pairs), unlabelled),
                         class_ids=(*range(1, len(pairs) + 1), 0))
    root = Path(os.path.commonpath([images.resolve(), labels.resolve()]))
    image_listing = list_files(images, root, "", depth=-1, suffixes=IMAGE_SUFFIXES,
                               exclude=labels)
    label_listing = list_files(labels, root, LABEL_SUFFIX, depth=-1, exclude=images)
    items = pair_listings(image_listing, label_listing,
                          expected_label=lambda key: f"{labels}/**/{key}{LABEL_SUFFIX}",
                          expected_image=lambda key: f"{images}/**/{key}.jpg (or .png, ...)")
    return LabelMapDataset(format=NAME, root=root, split=split, vocab=vocab,
                           value_map=value_map, items=items, source_files=[classes])
