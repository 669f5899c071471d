"""COCO-Stuff 164k label maps (``stuffthingmaps_trainval2017``): 80 things + 91 stuff.

Layout under ROOT (the folder holding the COCO images and the maps)::

    train2017/000000000009.jpg ...          val2017/...
    stuffthingmaps_trainval2017/{train2017,val2017}/000000000009.png   (8-bit)

A map value v is COCO category id v + 1 (0..181 -> ids 1..182); 255 is unlabelled. COCO
uses 171 of the ids 1..182: the 80 thing ids among 1..90 and the 91 stuff ids 92..182. The 11
unused ids 12, 26, 29, 30, 45, 66, 68, 69, 71, 83, 91 are not classes (a map holding their
values, 11, 25, 28, 29, 44, 65, 67, 68, 70, 82, 90, fails), nor is 183 "other". The used ids
become class ids 1..171 in ascending COCO id order: person (1) -> 1, ..., toothbrush (90) -> 80,
banner (92) -> 81, ..., wood (182) -> 171. ``classes.parquet`` keeps each class's COCO id
(``coco_stuff_id`` and ``source_id``); groups ``thing`` and ``stuff``. The key is the image stem
(``000000000139``) and the image id its number.
"""

from __future__ import annotations

from pathlib import Path

from embseg.formats.core import (
    LabelMapDataset,
    ValueMap,
    list_files,
    pair_listings,
    require_folder,
    split_choice,
)
from embseg.formats.tables import read_table
from embseg.vocab import VocabClass, Vocabulary

NAME = "coco-stuff-maps"
SOURCE = "coco_stuff_164k"
SPLITS = ("train2017", "val2017")
TABLE = "coco_stuff_164k.tsv"
MAPS_DIR = "stuffthingmaps_trainval2017"
UNLABELLED_VALUE = 255


def _rows() -> list[dict[str, str]]:
    return sorted(read_table(TABLE), key=lambda row: int(row["coco_id"]))


def vocabulary() -> Vocabulary:
    """The 171 classes in ascending COCO id order (class id = rank + 1)."""
    classes = [VocabClass(id=rank, name=row["name"], source=SOURCE, lvis_id=None,
                          coco_stuff_id=int(row["coco_id"]), frequency=None,
                          synonyms=(row["name"],), group=row["kind"],
                          source_id=int(row["coco_id"]))
               for rank, row in enumerate(_rows(), start=1)]
    return Vocabulary(classes=tuple(classes), stuff_other_ids=())


def value_map() -> ValueMap:
    """Map value (COCO id - 1) -> class id; 255 -> unlabelled; unused ids are not values."""
    values = [int(row["coco_id"]) - 1 for row in _rows()]
    return ValueMap(NAME, values=(*values, UNLABELLED_VALUE),
                    class_ids=(*range(1, len(values) + 1), 0))


def open_split(root: Path, split: str) -> LabelMapDataset:
    """The images of ``<split>/`` and the maps of ``stuffthingmaps_trainval2017/<split>/``."""
    split_choice(split, SPLITS, NAME)
    root = Path(root)
    hint = f"is ROOT the folder holding {split}/ and {MAPS_DIR}/?"
    images = require_folder(root / split, f"COCO images; {hint}")
    labels = require_folder(root / MAPS_DIR / split, f"COCO-Stuff maps; {hint}")
    items = pair_listings(
        list_files(images, root, ".jpg"), list_files(labels, root, ".png"),
        expected_label=lambda key: f"{MAPS_DIR}/{split}/{key}.png",
        expected_image=lambda key: f"{split}/{key}.jpg",
        image_id=lambda key: int(key) if key.isdigit() else None)
    return LabelMapDataset(format=NAME, root=root, split=split, vocab=vocabulary(),
                           value_map=value_map(), items=items)
