"""Pascal VOC 2012 segmentation: 21 classes, background included; VOC value v is class v + 1.

Layout under ROOT = ``VOCdevkit/VOC2012``::

    ImageSets/Segmentation/{train,val,trainval}.txt   one image id per line: the split
    JPEGImages/<id>.jpg
    SegmentationClass/<id>.png                        palette PNG: the index is the value

The split list decides the items: every listed id is an item (an id whose image or label file
is missing fails), unlisted files are not part of the split. Values 0..20 are background and the
20 object classes (class ids 1..21, the devkit's names); 255 (object borders and difficult
regions) is unlabelled; any other value fails the image. Groups: the devkit's person, animal,
vehicle and indoor; background is in none. The key is the image id (``2007_000032``). A split
list of one's own (e.g. ``trainaug.txt``) placed beside the official ones works the same way.
"""

from __future__ import annotations

from pathlib import Path

from embseg.errors import EmbsegError
from embseg.formats.core import LabelMapDataset, PairItem, ValueMap, key_problem, require_folder
from embseg.formats.tables import read_table
from embseg.vocab import VocabClass, Vocabulary

NAME = "voc"
OFFICIAL_SPLITS = ("train", "val", "trainval")
TABLE = "voc2012_classes.tsv"
UNLABELLED_VALUE = 255
LIST_DIR = "ImageSets/Segmentation"
IMAGE_DIR = "JPEGImages"
LABEL_DIR = "SegmentationClass"


def vocabulary() -> Vocabulary:
    """The 21 classes, class id = VOC value + 1."""
    classes = [VocabClass(id=int(row["value"]) + 1, name=row["name"], source=NAME, lvis_id=None,
                          coco_stuff_id=None, frequency=None, synonyms=(row["name"],),
                          group=row["group"] or None, source_id=int(row["value"]))
               for row in read_table(TABLE)]
    return Vocabulary(classes=tuple(classes), stuff_other_ids=())


def value_map() -> ValueMap:
    """v -> v + 1 for the 21 classes, 255 -> unlabelled."""
    values = [int(row["value"]) for row in read_table(TABLE)]
    return ValueMap(NAME, values=(*values, UNLABELLED_VALUE),
                    class_ids=(*(v + 1 for v in values), 0))


def read_split_list(path: Path) -> list[str]:
    """The image ids of a split list; EmbsegError naming the file and line when it is broken."""
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise EmbsegError(f"{path}: split list not found (VOC 2012 has "
                          f"{', '.join(OFFICIAL_SPLITS)} in {LIST_DIR}/)") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise EmbsegError(f"{path}: cannot read the split list ({exc})") from exc
    ids: list[str] = []
    first_line: dict[str, int] = {}
    for number, line in enumerate(text.splitlines(), start=1):
        fields = line.split()
        if not fields:
            continue
        if len(fields) != 1:
            raise EmbsegError(f"{path}: line {number}: expected one image id, got {line!r}")
        image_id = fields[0]
        if image_id in first_line:
            raise EmbsegError(f"{path}: line {number}: image id {image_id} is listed again "
                              f"(first on line {first_line[image_id]})")
        first_line[image_id] = number
        ids.append(image_id)
    if not ids:
        raise EmbsegError(f"{path}: the split list names no image")
    return ids


def _item(root: Path, image_id: str, list_name: str) -> PairItem:
    image, label = f"{IMAGE_DIR}/{image_id}.jpg", f"{LABEL_DIR}/{image_id}.png"
    problem = key_problem(image_id)
    if problem is None and any(c in image_id for c in "/\\"):
        problem = f"image id {image_id!r} is a path, not an id"
    if problem is None:
        missing = [rel for rel in (image, label) if not (root / rel).is_file()]
        if missing:
            problem = (f"listed in {list_name} but {' and '.join(missing)} "
                       f"{'is' if len(missing) == 1 else 'are'} missing")
    return PairItem(key=image_id, image=image, label=label, failure=problem)


def open_split(root: Path, split: str) -> LabelMapDataset:
    """The ids of ``ImageSets/Segmentation/<split>.txt``, sorted, with their two files."""
    root = Path(root)
    hint = "is ROOT the VOCdevkit/VOC2012 folder?"
    require_folder(root / LIST_DIR, f"VOC split lists; {hint}")
    require_folder(root / IMAGE_DIR, f"VOC images; {hint}")
    require_folder(root / LABEL_DIR, f"VOC segmentation labels; {hint}")
    if "/" in split or "\\" in split or split.startswith("."):
        raise EmbsegError(f"--split {split!r}: a VOC split is the name of a list in {LIST_DIR}/")
    list_path = root / LIST_DIR / f"{split}.txt"
    list_name = f"{LIST_DIR}/{split}.txt"
    ids = read_split_list(list_path)
    items = [_item(root, image_id, list_name) for image_id in sorted(ids)]
    return LabelMapDataset(format=NAME, root=root, split=split, vocab=vocabulary(),
                           value_map=value_map(), items=items, source_files=[list_path])
