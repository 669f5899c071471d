"""ADE20K SceneParsing (``ADEChallengeData2016``): 150 classes, ADE value v is class v.

Layout under ROOT = ``ADEChallengeData2016``::

    images/{training,validation}/ADE_train_00000001.jpg ...
    annotations/{training,validation}/ADE_train_00000001.png   (8-bit, values 0..150)

Value 0 is "other" (unlabelled); 1..150 are the classes of ``objectInfo150`` in its order, so a
value is its own class id. The class name is the first of the table's names, the others are
synonyms; the table's stuff column gives the evaluation groups ``stuff`` (35) and ``thing``
(115). The key is the image stem (``ADE_val_00000001``).
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

NAME = "ade20k"
SPLITS = ("training", "validation")
TABLE = "ade20k_objectInfo150.tsv"


def vocabulary() -> Vocabulary:
    """The 150 classes of objectInfo150 (id = ADE value)."""
    classes = []
    for row in read_table(TABLE):
        names = tuple(n.strip() for n in row["names"].split(","))
        classes.append(VocabClass(id=int(row["idx"]), name=names[0], source=NAME, lvis_id=None,
                                  coco_stuff_id=None, frequency=None, synonyms=names,
                                  group="stuff" if row["stuff"] == "1" else "thing",
                                  source_id=int(row["idx"])))
    return Vocabulary(classes=tuple(classes), stuff_other_ids=())


def value_map() -> ValueMap:
    """0 -> unlabelled, v -> v for the 150 classes."""
    ids = [int(row["idx"]) for row in read_table(TABLE)]
    return ValueMap(NAME, values=(0, *ids), class_ids=(0, *ids))


def open_split(root: Path, split: str) -> LabelMapDataset:
    """The items of ``images/<split>`` and ``annotations/<split>``, paired by stem."""
    split_choice(split, SPLITS, NAME)
    root = Path(root)
    hint = "the ADEChallengeData2016 folder"
    images = require_folder(root / "images" / split, f"ADE20K images; is {root} {hint}?")
    labels = require_folder(root / "annotations" / split,
                            f"ADE20K annotations; is {root} {hint}?")
    items = pair_listings(
        list_files(images, root, ".jpg"), list_files(labels, root, ".png"),
        expected_label=lambda key: f"annotations/{split}/{key}.png",
        expected_image=lambda key: f"images/{split}/{key}.jpg")
    return LabelMapDataset(format=NAME, root=root, split=split, vocab=vocabulary(),
                           value_map=value_map(), items=items)
