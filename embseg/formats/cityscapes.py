"""Cityscapes (fine annotations): the 19 train ids of the official label table.

Layout under ROOT (the folder holding ``leftImg8bit/`` and ``gtFine/``)::

    leftImg8bit/{train,val}/<city>/<city>_<seq>_<frame>_leftImg8bit.png
    gtFine/{train,val}/<city>/<city>_<seq>_<frame>_gtFine_labelIds.png   (+ _color, _instanceIds,
                                                                          _polygons.json: unused)

The ``*_labelIds.png`` files hold the table's label ids 0..33. A label id whose train id t is
0..18 becomes class t + 1 (road = 1, ..., bicycle = 19); every other id (unlabeled, ego vehicle,
parking, caravan, ...) is unlabelled; a value that is no label id fails the image. The classes
keep the table's names, its label id (``source_id``) and its category as evaluation group
(flat, construction, object, nature, sky, human, vehicle). The key is the image stem without
``_leftImg8bit`` (``frankfurt_000000_000294``). The test split has no public labels.
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

NAME = "cityscapes"
SPLITS = ("train", "val")
TABLE = "cityscapes_labels.tsv"
IMAGE_SUFFIX = "_leftImg8bit.png"
LABEL_SUFFIX = "_gtFine_labelIds.png"
LABEL_COMPANIONS = ("_gtFine_color.png", "_gtFine_instanceIds.png", "_gtFine_labelTrainIds.png",
                    "_gtFine_polygons.json")
NUM_TRAIN_IDS = 19


def _trained_rows() -> list[dict[str, str]]:
    rows = [row for row in read_table(TABLE) if 0 <= int(row["train_id"]) < NUM_TRAIN_IDS]
    return sorted(rows, key=lambda row: int(row["train_id"]))


def vocabulary() -> Vocabulary:
    """The 19 trained classes, class id = train id + 1."""
    classes = [VocabClass(id=int(row["train_id"]) + 1, name=row["name"], source=NAME,
                          lvis_id=None, coco_stuff_id=None, frequency=None,
                          synonyms=(row["name"],), group=row["category"],
                          source_id=int(row["id"]))
               for row in _trained_rows()]
    return Vocabulary(classes=tuple(classes), stuff_other_ids=())


def value_map() -> ValueMap:
    """Label id -> train id + 1, or 0 for the ids that are not trained on."""
    values, class_ids = [], []
    for row in read_table(TABLE):
        label_id, train_id = int(row["id"]), int(row["train_id"])
        if label_id < 0:  # license plate: not in the label images
            continue
        values.append(label_id)
        class_ids.append(train_id + 1 if 0 <= train_id < NUM_TRAIN_IDS else 0)
    return ValueMap(NAME, values=tuple(values), class_ids=tuple(class_ids))


def open_split(root: Path, split: str) -> LabelMapDataset:
    """The items of ``leftImg8bit/<split>/*/`` and ``gtFine/<split>/*/``, paired by key."""
    if split == "test":
        split_choice(split, SPLITS, f"{NAME} (its test split has no public labels)")
    split_choice(split, SPLITS, NAME)
    root = Path(root)
    hint = "is ROOT the folder holding leftImg8bit/ and gtFine/?"
    images = require_folder(root / "leftImg8bit" / split, f"Cityscapes images; {hint}")
    labels = require_folder(root / "gtFine" / split, f"Cityscapes fine labels; {hint}")

    def city(key: str) -> str:
        return key.split("_", 1)[0]

    items = pair_listings(
        list_files(images, root, IMAGE_SUFFIX, depth=1),
        list_files(labels, root, LABEL_SUFFIX, depth=1, companions=LABEL_COMPANIONS),
        expected_label=lambda key: f"gtFine/{split}/{city(key)}/{key}{LABEL_SUFFIX}",
        expected_image=lambda key: f"leftImg8bit/{split}/{city(key)}/{key}{IMAGE_SUFFIX}")
    return LabelMapDataset(format=NAME, root=root, split=split, vocab=vocabulary(),
                           value_map=value_map(), items=items)
