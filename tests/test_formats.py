"""`embseg build --format`: ADE20K, Cityscapes, Pascal VOC, COCO-Stuff maps and a generic
label-map folder, on tiny fixtures in each dataset's real folder layout written here.

The class tables are checked against independent statements written in this file (and, for the
COCO-Stuff stuff names, against the real category list beside the checkout); each format's
value mapping is checked pixel by pixel against an independent mapping of the raw values.
"""

from __future__ import annotations

import dataclasses
import io
import json
from pathlib import Path

import numpy as np
import pytest
from annotation_files import write_image
from PIL import Image

from embseg.errors import EmbsegError
from embseg.formats import (
    FORMAT_NAMES,
    MODULES,
    ade20k,
    cityscapes,
    coco_stuff_maps,
    open_dataset,
    voc,
)
from embseg.formats.core import ValueMap, list_files
from embseg.formats.labelmap import read_class_list
from embseg.labels import decode_label_png
from embseg.vocab import Vocabulary

# --- independent statements of the tables ------------------------------------------------------

CITYSCAPES_TRAIN_IDS = {7: 0, 8: 1, 11: 2, 12: 3, 13: 4, 17: 5, 19: 6, 20: 7, 21: 8, 22: 9,
                        23: 10, 24: 11, 25: 12, 26: 13, 27: 14, 28: 15, 31: 16, 32: 17, 33: 18}
CITYSCAPES_NAMES = ["road", "sidewalk", "building", "wall", "fence", "pole", "traffic light",
                    "traffic sign", "vegetation", "terrain", "sky", "person", "rider", "car",
                    "truck", "bus", "train", "motorcycle", "bicycle"]
CITYSCAPES_CATEGORIES = ["flat"] * 2 + ["construction"] * 3 + ["object"] * 3 + \
    ["nature"] * 2 + ["sky"] + ["human"] * 2 + ["vehicle"] * 6
VOC_NAMES = ["background", "aeroplane", "bicycle", "bird", "boat", "bottle", "bus", "car", "cat",
             "chair", "cow", "diningtable", "dog", "horse", "motorbike", "person", "pottedplant",
             "sheep", "sofa", "train", "tvmonitor"]
COCO_UNUSED_IDS = {12, 26, 29, 30, 45, 66, 68, 69, 71, 83, 91}
COCO_SOME_THINGS = {1: "person", 11: "fire hydrant", 13: "stop sign", 44: "bottle",
                    67: "dining table", 70: "toilet", 72: "tv", 90: "toothbrush"}
ADE_SOME = {1: "wall", 13: "person", 21: "car", 45: "chest of drawers", 90: "television receiver",
            139: "ashcan", 150: "flag"}


def reference_value_map(fmt: str) -> dict[int, int]:
    """Raw label value -> class id (0 unlabelled), stated independently of embseg's tables."""
    if fmt == "ade20k":
        return {v: v for v in range(151)}
    if fmt == "cityscapes":
        return {label_id: CITYSCAPES_TRAIN_IDS.get(label_id, -1) + 1 for label_id in range(34)}
    if fmt == "voc":
        return {**{v: v + 1 for v in range(21)}, 255: 0}
    if fmt == "coco-stuff-maps":
        used = [i for i in range(1, 183) if i not in COCO_UNUSED_IDS]
        return {**{coco_id - 1: rank for rank, coco_id in enumerate(used, start=1)}, 255: 0}
    raise KeyError(fmt)


def reference_apply(fmt: str, raw: np.ndarray) -> np.ndarray:
    mapping = reference_value_map(fmt)
    out = np.zeros(raw.shape, dtype=np.uint16)
    for (y, x), value in np.ndenumerate(raw):
        out[y, x] = mapping[int(value)]
    return out


def test_ade20k_table():
    vocab = ade20k.vocabulary()
    assert vocab.num_classes == 150 and [c.id for c in vocab.classes] == list(range(1, 151))
    for class_id, name in ADE_SOME.items():
        assert vocab.classes[class_id - 1].name == name
    assert vocab.classes[1].synonyms == ("building", "edifice")
    assert len(set(vocab.names)) == 150
    groups = vocab.groups()
    assert list(groups) == ["stuff", "thing"] and len(groups["stuff"]) == 35
    assert groups["stuff"][:4] == [1, 2, 3, 4] and 5 in groups["thing"]  # tree is a thing
    assert all(c.source == "ade20k" and c.source_id == c.id for c in vocab.classes)
    assert ade20k.value_map().as_dict() == reference_value_map("ade20k")


def test_cityscapes_table():
    vocab = cityscapes.vocabulary()
    assert vocab.names == CITYSCAPES_NAMES
    assert [c.group for c in vocab.classes] == CITYSCAPES_CATEGORIES
    assert [c.source_id for c in vocab.classes] == sorted(CITYSCAPES_TRAIN_IDS,
                                                          key=CITYSCAPES_TRAIN_IDS.get)
    assert "rare" not in vocab.groups() and list(vocab.groups())[0] == "flat"
    assert cityscapes.value_map().as_dict() == reference_value_map("cityscapes")


def test_voc_table():
    vocab = voc.vocabulary()
    assert vocab.names == VOC_NAMES and vocab.classes[0].group is None
    groups = {name: [vocab.names[i - 1] for i in ids] for name, ids in vocab.groups().items()}
    assert groups["person"] == ["person"] and len(groups["animal"]) == 6
    assert sorted(groups["vehicle"]) == ["aeroplane", "bicycle", "boat", "bus", "car",
                                         "motorbike", "train"]
    assert voc.value_map().as_dict() == reference_value_map("voc")


def test_coco_stuff_maps_table(shared_vocab):
    vocab = coco_stuff_maps.vocabulary()
    assert vocab.num_classes == 171 == 80 + 91
    used = [c.coco_stuff_id for c in vocab.classes]
    assert used == sorted(set(range(1, 183)) - COCO_UNUSED_IDS)
    assert all(c.source_id == c.coco_stuff_id for c in vocab.classes)
    by_coco = {c.coco_stuff_id: c for c in vocab.classes}
    for coco_id, name in COCO_SOME_THINGS.items():
        assert by_coco[coco_id].name == name and by_coco[coco_id].group == "thing"
    stuff = json.loads((shared_vocab / "coco_stuff_categories.json").read_text())
    stuff = stuff["categories"] if isinstance(stuff, dict) else stuff
    real = {c["id"]: c["name"] for c in stuff if c["id"] != 183}
    assert {i: by_coco[i].name for i in range(92, 183)} == real
    assert all(by_coco[i].group == "stuff" for i in real)
    assert (by_coco[90].id, by_coco[92].id, by_coco[182].id) == (80, 81, 171)
    assert coco_stuff_maps.value_map().as_dict() == reference_value_map("coco-stuff-maps")


def test_tables_survive_classes_parquet_and_old_files_still_read(tmp_path):
    vocab = cityscapes.vocabulary()
    vocab.write_parquet(tmp_path / "classes.parquet")
    again = Vocabulary.read_parquet(tmp_path / "classes.parquet")
    assert again == vocab and again.groups() == vocab.groups()
    # a classes.parquet written before the group/source_id columns existed
    import pyarrow.parquet as pq

    table = pq.read_table(tmp_path / "classes.parquet").drop(["group", "source_id"])
    pq.write_table(table, tmp_path / "old.parquet")
    old = Vocabulary.read_parquet(tmp_path / "old.parquet")
    assert old.content_hash() == vocab.content_hash()
    assert all(c.group is None and c.source_id is None for c in old.classes)


def test_value_map_refuses_values_outside_the_table():
    value_map = ValueMap("toy", values=(0, 1, 5, 255), class_ids=(1, 2, 3, 0))
    raw = np.array([[0, 1], [5, 255]], dtype=np.uint8)
    assert value_map.apply(raw).tolist() == [[1, 2], [3, 0]]
    with pytest.raises(Exception, match=r"values outside the toy table: 2 \(1 px\), 300 \(2 px\)"):
        value_map.apply(np.array([[2, 300, 300]], dtype=np.int32))


# --- fixtures in the real layouts --------------------------------------------------------------

H, W = 12, 16


def write_label(path: Path, values: np.ndarray, *, mode: str = "L",
                palette: list[int] | None = None) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    if mode == "P":  # palette indices are the values; the colours are VOC's
        image = Image.frombytes("P", (values.shape[1], values.shape[0]),
                                values.astype(np.uint8).tobytes())
        image.putpalette(palette or voc_palette())
    else:
        image = Image.fromarray(values.astype(np.uint16 if mode == "I;16" else np.uint8))
    image.save(path, format="PNG")
    return path


def voc_palette() -> list[int]:
    """The VOC colour map (bits of the index spread over R, G, B), written out here."""
    colours = []
    for index in range(256):
        r = g = b = 0
        c = index
        for shift in range(7, -1, -1):
            r |= ((c >> 0) & 1) << shift
            g |= ((c >> 1) & 1) << shift
            b |= ((c >> 2) & 1) << shift
            c >>= 3
        colours += [r, g, b]
    return colours


def raw_values(seed: int, choices: list[int], shape=(H, W)) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return rng.choice(np.array(choices), size=shape).astype(np.int64)


def check_ok(dataset, item, raw: np.ndarray, fmt: str) -> None:
    result = dataset.process(item)
    assert result.status == "ok", result.reason
    assert result.jpg == (dataset.root / item.image).read_bytes()
    label = decode_label_png(result.seg_png)
    assert label.dtype == np.uint16 and label.shape == raw.shape
    expected = reference_apply(fmt, raw)
    assert np.array_equal(label, expected)
    ids = sorted(int(v) for v in np.unique(expected) if v)
    assert result.class_ids == ids
    assert result.pixel_counts == [int((expected == i).sum()) for i in ids]
    assert result.meta["classes"] == ids and result.meta["format"] == fmt
    assert (result.meta["height"], result.meta["width"]) == raw.shape


def failures(dataset) -> dict[str, str]:
    out = {}
    for item in dataset.items:
        result = dataset.process(item)
        if result.status != "ok":
            assert result.status == "failed" and result.reason and "\n" not in result.reason
            out[item.key] = result.reason
    return out


@pytest.fixture
def ade_root(tmp_path) -> Path:
    root = tmp_path / "ADEChallengeData2016"
    for split, prefix in (("training", "ADE_train"), ("validation", "ADE_val")):
        for index in (1, 2):
            key = f"{prefix}_{index:08d}"
            write_image(root / "images" / split / f"{key}.jpg", W, H, seed=index)
            write_label(root / "annotations" / split / f"{key}.png",
                        raw_values(index, [0, 1, 2, 13, 150]))
    val = root / "images" / "validation"
    write_image(val / "ADE_val_00000003.jpg", W, H)                      # no annotation
    write_label(root / "annotations" / "validation" / "ADE_val_00000004.png",
                raw_values(4, [0, 1]))                                    # no image
    write_image(val / "ADE_val_00000005.jpg", W, H)
    write_label(root / "annotations" / "validation" / "ADE_val_00000005.png",
                raw_values(5, [0, 1], shape=(H + 1, W)))                  # wrong size
    write_image(val / "ADE_val_00000006.jpg", W, H)
    write_label(root / "annotations" / "validation" / "ADE_val_00000006.png",
                raw_values(6, [0, 151, 200]))                             # out of range
    (val / "notes.txt").write_text("not an image")                       # stray file
    return root


def test_ade20k_layout_keys_values_and_failures(ade_root):
    dataset = open_dataset("ade20k", images=ade_root, split="validation")
    assert [i.key for i in dataset.items] == [
        "ADE_val_00000001", "ADE_val_00000002", "ADE_val_00000003", "ADE_val_00000004",
        "ADE_val_00000005", "ADE_val_00000006", "images/validation/notes.txt"]
    for item in dataset.items[:2]:
        raw = np.array(Image.open(ade_root / item.label))
        check_ok(dataset, item, raw, "ade20k")
    reasons = failures(dataset)
    assert set(reasons) == {i.key for i in dataset.items[2:]}
    assert "no label file" in reasons["ADE_val_00000003"]
    assert "annotations/validation/ADE_val_00000003.png" in reasons["ADE_val_00000003"]
    assert "no image file" in reasons["ADE_val_00000004"]
    assert "17x12" not in reasons["ADE_val_00000005"] and "16x13" in reasons["ADE_val_00000005"]
    assert "16x12" in reasons["ADE_val_00000005"]
    assert "151" in reasons["ADE_val_00000006"] and "200" in reasons["ADE_val_00000006"]
    assert "unexpected file" in reasons["images/validation/notes.txt"]
    training = open_dataset("ade20k", images=ade_root, split="training")
    assert [i.key for i in training.items] == ["ADE_train_00000001", "ADE_train_00000002"]
    assert not failures(training)


@pytest.fixture
def cityscapes_root(tmp_path) -> Path:
    root = tmp_path / "cityscapes"
    values = list(range(34))
    for split, city, frames in (("train", "aachen", [19, 20]), ("val", "frankfurt", [294, 295]),
                                ("val", "lindau", [7])):
        for frame in frames:
            stem = f"{city}_000000_{frame:06d}"
            write_image(root / "leftImg8bit" / split / city / f"{stem}_leftImg8bit.png", W, H,
                        fmt="PNG", seed=frame)
            gt = root / "gtFine" / split / city
            write_label(gt / f"{stem}_gtFine_labelIds.png", raw_values(frame, values))
            write_label(gt / f"{stem}_gtFine_instanceIds.png", raw_values(frame, [0, 26]))
            write_image(gt / f"{stem}_gtFine_color.png", W, H, fmt="PNG")
            (gt / f"{stem}_gtFine_polygons.json").write_text("{}")
    # lindau_000000_000007: labelIds with an id the table does not have
    write_label(root / "gtFine/val/lindau/lindau_000000_000007_gtFine_labelIds.png",
                raw_values(7, [7, 34, 99]))
    # an image whose labelIds file is missing (only the colour file exists)
    write_image(root / "leftImg8bit/val/lindau/lindau_000000_000008_leftImg8bit.png", W, H,
                fmt="PNG")
    write_image(root / "gtFine/val/lindau/lindau_000000_000008_gtFine_color.png", W, H,
                fmt="PNG")
    return root


def test_cityscapes_layout_keys_values_and_failures(cityscapes_root):
    dataset = open_dataset("cityscapes", images=cityscapes_root, split="val")
    keys = [i.key for i in dataset.items]
    assert keys == ["frankfurt_000000_000294", "frankfurt_000000_000295",
                    "lindau_000000_000007", "lindau_000000_000008"]
    assert dataset.items[0].image == \
        "leftImg8bit/val/frankfurt/frankfurt_000000_000294_leftImg8bit.png"
    for item in dataset.items[:2]:
        check_ok(dataset, item, np.array(Image.open(cityscapes_root / item.label)), "cityscapes")
    reasons = failures(dataset)
    assert set(reasons) == {"lindau_000000_000007", "lindau_000000_000008"}
    assert "34 (" in reasons["lindau_000000_000007"] and "99 (" in reasons["lindau_000000_000007"]
    assert "gtFine/val/lindau/lindau_000000_000008_gtFine_labelIds.png" in \
        reasons["lindau_000000_000008"]
    assert [i.key for i in open_dataset("cityscapes", images=cityscapes_root,
                                        split="train").items] == [
        "aachen_000000_000019", "aachen_000000_000020"]


@pytest.fixture
def voc_root(tmp_path) -> Path:
    root = tmp_path / "VOCdevkit" / "VOC2012"
    values = list(range(21)) + [255]
    for image_id in ("2007_000032", "2007_000033", "2008_000001", "2009_000002"):
        write_image(root / "JPEGImages" / f"{image_id}.jpg", W, H, seed=int(image_id[-1]))
        write_label(root / "SegmentationClass" / f"{image_id}.png",
                    raw_values(int(image_id[-2:]), values), mode="P")
    write_image(root / "JPEGImages" / "2010_000005.jpg", W, H)             # no label file
    write_label(root / "SegmentationClass" / "2011_000006.png", raw_values(1, [0]), mode="P")
    write_label(root / "SegmentationClass" / "2009_000002.png", raw_values(2, [0, 21, 254]),
                mode="P")                                                # out of range
    write_image(root / "JPEGImages" / "2012_000007.jpg", W, H)            # RGB label
    Image.new("RGB", (W, H), (128, 0, 0)).save(root / "SegmentationClass" / "2012_000007.png")
    write_image(root / "JPEGImages" / "2012_000099.jpg", W, H)            # not listed
    lists = root / "ImageSets" / "Segmentation"
    lists.mkdir(parents=True)
    (lists / "train.txt").write_text("2008_000001\n2007_000032\n2010_000005\n2011_000006\n")
    (lists / "val.txt").write_text("2007_000033\n2009_000002\n2012_000007\n\n")
    return root


def test_voc_palette_pngs_split_lists_and_failures(voc_root):
    with Image.open(voc_root / "SegmentationClass" / "2007_000032.png") as written:
        assert written.mode == "P"  # the fixture is a real palette PNG
    train = open_dataset("voc", images=voc_root, split="train")
    assert [i.key for i in train.items] == ["2007_000032", "2008_000001", "2010_000005",
                                            "2011_000006"]
    assert train.source_files == [voc_root / "ImageSets/Segmentation/train.txt"]
    for item in train.items[:2]:
        raw = np.array(Image.open(voc_root / item.label))  # palette indices
        assert set(np.unique(raw)) <= set(range(21)) | {255}
        check_ok(train, item, raw, "voc")
    reasons = failures(train)
    assert "listed in ImageSets/Segmentation/train.txt but SegmentationClass/2010_000005.png " \
        "is missing" in reasons["2010_000005"]
    assert "JPEGImages/2011_000006.jpg is missing" in reasons["2011_000006"]
    val = open_dataset("voc", images=voc_root, split="val")
    assert [i.key for i in val.items] == ["2007_000033", "2009_000002", "2012_000007"]
    reasons = failures(val)
    assert set(reasons) == {"2009_000002", "2012_000007"}
    assert "21 (" in reasons["2009_000002"] and "254 (" in reasons["2009_000002"]
    assert "mode RGB" in reasons["2012_000007"]


def test_voc_broken_split_lists_are_one_line_errors(voc_root):
    lists = voc_root / "ImageSets" / "Segmentation"
    with pytest.raises(EmbsegError, match="test.txt: split list not found"):
        open_dataset("voc", images=voc_root, split="test")
    (lists / "dup.txt").write_text("2007_000032\n2007_000033\n2007_000032\n")
    with pytest.raises(EmbsegError, match=r"dup.txt: line 3: image id 2007_000032 is listed "
                                          r"again \(first on line 1\)"):
        open_dataset("voc", images=voc_root, split="dup")
    (lists / "two.txt").write_text("2007_000032 1\n")
    with pytest.raises(EmbsegError, match="two.txt: line 1: expected one image id"):
        open_dataset("voc", images=voc_root, split="two")
    (lists / "empty.txt").write_text("\n")
    with pytest.raises(EmbsegError, match="names no image"):
        open_dataset("voc", images=voc_root, split="empty")
    (lists / "odd.txt").write_text("../x\n2007.000032\n")
    reasons = failures(open_dataset("voc", images=voc_root, split="odd"))
    assert "'../x'" in reasons["../x"] and "contains '.'" in reasons["2007.000032"]


@pytest.fixture
def coco_root(tmp_path) -> Path:
    root = tmp_path / "coco"
    values = [0, 1, 89, 91, 181, 255]  # person, toothbrush, banner, wood, unlabelled
    for image_id in (139, 285):
        write_image(root / "val2017" / f"{image_id:012d}.jpg", W, H, seed=image_id)
        write_label(root / "stuffthingmaps_trainval2017" / "val2017" / f"{image_id:012d}.png",
                    raw_values(image_id, values))
    write_image(root / "val2017" / "000000000632.jpg", W, H)
    write_label(root / "stuffthingmaps_trainval2017/val2017/000000000632.png",
                raw_values(3, [0, 11, 182]))  # COCO id 12 (unused) and 183 (other)
    write_image(root / "val2017" / "000000000724.jpg", W, H)  # no map
    return root


def test_coco_stuff_maps_layout_values_and_failures(coco_root):
    dataset = open_dataset("coco-stuff-maps", images=coco_root, split="val2017")
    assert [(i.key, i.image_id) for i in dataset.items] == [
        ("000000000139", 139), ("000000000285", 285), ("000000000632", 632),
        ("000000000724", 724)]
    for item in dataset.items[:2]:
        raw = np.array(Image.open(coco_root / item.label))
        check_ok(dataset, item, raw, "coco-stuff-maps")
        assert dataset.process(item).meta["image_id"] == item.image_id
    reasons = failures(dataset)
    assert set(reasons) == {"000000000632", "000000000724"}
    assert "11 (" in reasons["000000000632"] and "182 (" in reasons["000000000632"]
    assert "stuffthingmaps_trainval2017/val2017/000000000724.png" in reasons["000000000724"]


def test_labelmap_class_lists(tmp_path):
    names = tmp_path / "names.txt"
    names.write_text("# my classes\nbackground\ncat\n\ndog\n")
    assert read_class_list(names, unlabelled=255) == [(0, "background"), (1, "cat"), (2, "dog")]
    numbered = tmp_path / "numbered.txt"
    numbered.write_text("7 road\n26\ttraffic light\n1 ego vehicle\n")
    assert read_class_list(numbered, unlabelled=0) == [(1, "ego vehicle"), (7, "road"),
                                                       (26, "traffic light")]
    cases = {"5 a\nb\n": "line 2: expected 'VALUE NAME'",
             "1 a\n1 b\n": "line 2: value 1 is already given on line 1",
             "a\na\n": "line 2: class name 'a' is already given on line 1",
             "0 x\n255 y\n": "line 2: value 255 .* is the unlabelled value",
             "70000 x\n": "does not fit a 16-bit", "# only a comment\n": "names no class"}
    for text, pattern in cases.items():
        bad = tmp_path / "bad.txt"
        bad.write_text(text)
        with pytest.raises(EmbsegError, match=pattern):
            read_class_list(bad, unlabelled=255)


def test_labelmap_pairs_by_stem_in_subfolders(tmp_path):
    images, labels = tmp_path / "data" / "img", tmp_path / "data" / "ann"
    (tmp_path / "classes.txt").write_text("0 sky\n3 tree\n9 road\n")
    write_image(images / "a" / "x1.jpg", W, H)
    write_image(images / "b" / "x2.png", W, H, fmt="PNG")
    write_label(labels / "a" / "x1.png", raw_values(1, [0, 3, 9, 65535]).astype(np.uint16),
                mode="I;16")
    write_label(labels / "x2.png", raw_values(2, [3, 9]))
    write_image(images / "x3.jpg", W, H)                       # no label
    write_image(images / "c" / "x4.jpg", W, H)                 # same stem twice
    write_image(images / "d" / "x4.jpg", W, H)
    write_label(labels / "x4.png", raw_values(4, [0]))
    write_label(labels / "x5.png", raw_values(5, [0, 4]))      # no image; 4 is no class
    dataset = open_dataset("labelmap", images=images, split="mine", labels=labels,
                           classes=tmp_path / "classes.txt", unlabelled=65535)
    assert dataset.vocab.names == ["sky", "tree", "road"]
    assert [c.source_id for c in dataset.vocab.classes] == [0, 3, 9]
    assert dataset.value_map.as_dict() == {0: 1, 3: 2, 9: 3, 65535: 0}
    assert [i.key for i in dataset.items] == ["x1", "x2", "x3", "x4", "x5"]
    for item in dataset.items[:2]:
        raw = np.array(Image.open(dataset.root / item.label)).astype(np.int64)
        result = dataset.process(item)
        assert result.status == "ok", result.reason
        mapping = {0: 1, 3: 2, 9: 3, 65535: 0}
        expected = np.vectorize(mapping.get)(raw).astype(np.uint16)
        assert np.array_equal(decode_label_png(result.seg_png), expected)
    reasons = failures(dataset)
    assert set(reasons) == {"x3", "x4", "x5"}
    assert "2 image files share the key 'x4'" in reasons["x4"]
    assert "no image file for label" in reasons["x5"]
    with pytest.raises(EmbsegError, match="needs --labels"):
        open_dataset("labelmap", images=images, split="mine")


def test_bad_roots_and_splits_are_one_line_errors(tmp_path, ade_root):
    with pytest.raises(EmbsegError, match="ade20k splits are training, validation"):
        open_dataset("ade20k", images=ade_root, split="val")
    with pytest.raises(EmbsegError, match="is .* the ADEChallengeData2016 folder"):
        open_dataset("ade20k", images=tmp_path, split="training")
    with pytest.raises(EmbsegError, match="test split has no public labels"):
        open_dataset("cityscapes", images=tmp_path, split="test")
    with pytest.raises(EmbsegError, match="dataset root folder not found"):
        open_dataset("coco-stuff-maps", images=tmp_path / "nope", split="val2017")
    with pytest.raises(EmbsegError, match="choose one of lvis, ade20k"):
        open_dataset("kitti", images=tmp_path, split="x")
    with pytest.raises(EmbsegError, match="are for --format labelmap"):
        open_dataset("voc", images=tmp_path, split="x", unlabelled=0)
    assert FORMAT_NAMES == ("lvis", "ade20k", "cityscapes", "voc", "coco-stuff-maps", "labelmap")
    import importlib

    for name, module in MODULES.items():
        assert importlib.import_module(module).NAME == name


def test_undecodable_and_non_png_labels_fail(tmp_path, ade_root):
    annotations = ade_root / "annotations" / "training"
    data = (annotations / "ADE_train_00000001.png").read_bytes()
    (annotations / "ADE_train_00000001.png").write_bytes(data[: len(data) // 2])
    buffer = io.BytesIO()
    Image.fromarray(np.zeros((H, W), np.uint8)).save(buffer, format="JPEG")
    (annotations / "ADE_train_00000002.png").write_bytes(buffer.getvalue())
    reasons = failures(open_dataset("ade20k", images=ade_root, split="training"))
    assert "cannot be decoded" in reasons["ADE_train_00000001"]
    assert "is JPEG, not PNG" in reasons["ADE_train_00000002"]


def test_list_files_depth_and_companions(tmp_path):
    (tmp_path / "a").mkdir()
    (tmp_path / "top_x.png").write_bytes(b"")
    (tmp_path / "a" / "k_x.png").write_bytes(b"")
    (tmp_path / "a" / "k_y.png").write_bytes(b"")
    (tmp_path / "a" / ".hidden").write_bytes(b"")
    listing = list_files(tmp_path, tmp_path, "_x.png", depth=1, companions=("_y.png",))
    assert listing.found == {"k": "a/k_x.png"} and listing.unexpected == ["top_x.png"]


def test_checkpoint_record_keeps_groups_and_reads_old_records():
    from embseg.checkpoint import vocabulary_from_record, vocabulary_record

    vocab = coco_stuff_maps.vocabulary()
    record = vocabulary_record(vocab)
    assert vocabulary_from_record(record) == vocab
    old = {k: v for k, v in record.items() if k not in ("group", "source_id")}
    again = vocabulary_from_record(old)
    assert again.content_hash() == vocab.content_hash() and again.groups() != vocab.groups()


def test_evaluation_reports_the_datasets_own_groups(tmp_path):
    import torch

    from embseg.evaluate import build_report
    from embseg.metrics import SegmentationMetrics

    vocab = cityscapes.vocabulary()
    metrics = SegmentationMetrics(vocab.num_classes)
    target = torch.tensor([[0, 0, 1, 13], [13, 18, 18, 2]])  # road, sidewalk, car, bicycle, ...
    prediction = torch.tensor([[0, 1, 1, 13], [13, 18, 0, 2]])
    metrics.update(prediction, target)
    report = build_report(metrics.compute(vocab.groups()), vocab, n_images=1, n_bad_samples=0,
                          shards="x")
    assert list(report.group_miou) == ["flat", "construction", "object", "nature", "sky",
                                       "human", "vehicle"]
    road = 1 / 3  # target {(0,0),(0,1)}, predicted {(0,0),(1,2)}: 1 hit, union 3
    sidewalk = 1 / 2  # target {(0,2)}, predicted {(0,1),(0,2)}
    assert report.group_miou["flat"] == pytest.approx((road + sidewalk) / 2)
    assert report.per_class[0]["group"] == "flat"
    markdown = report.to_markdown()
    assert "| flat |" in markdown and "| vehicle |" in markdown and "rare" not in markdown
    no_groups = Vocabulary(classes=tuple(dataclasses.replace(c, source="labelmap", group=None)
                                         for c in vocab.classes))
    assert no_groups.groups() == {}  # a generic label map: no groups, no group table
    report = build_report(metrics.compute(no_groups.groups()), no_groups, n_images=1,
                          n_bad_samples=0, shards="x")
    assert report.group_miou == {} and "| group |" not in report.to_markdown()


# --- the build, train and eval on one format's shards -----------------------------------------


def _shard_samples(out: Path) -> dict[str, dict]:
    import webdataset as wds

    shards = sorted(str(p) for p in out.glob("*-[0-9][0-9][0-9][0-9][0-9][0-9].tar"))
    return {s["__key__"]: s for s in wds.WebDataset(shards, shardshuffle=False)}


def _build_args(root: Path, out: Path, fmt: str, split: str, *extra: str) -> list[str]:
    return ["build", "--format", fmt, "--images", str(root), "--split", split, "--out",
            str(out), "--shard-size", "2", "--no-progress", *extra]


def test_build_voc_shards_manifest_and_classes(voc_root, ray_local, tmp_path, capsys):
    import pyarrow.parquet as pq

    from embseg.cli import main

    out = tmp_path / "voc-train"
    assert main(_build_args(voc_root, out, "voc", "train")) == 1  # two items failed
    captured = capsys.readouterr()
    assert "4 images -> 2 ok, 0 skipped, 2 failed" in captured.out
    assert captured.err.count("\n") == 1 and "--allow-failures" in captured.err
    rows = pq.read_table(out / "manifest.parquet").to_pylist()
    assert [(r["key"], r["status"]) for r in rows] == [
        ("2007_000032", "ok"), ("2008_000001", "ok"), ("2010_000005", "failed"),
        ("2011_000006", "failed")]
    assert "SegmentationClass/2010_000005.png is missing" in rows[2]["reason"]
    assert Vocabulary.read_parquet(out / "classes.parquet") == voc.vocabulary()
    samples = _shard_samples(out)
    assert sorted(samples) == ["2007_000032", "2008_000001"]
    for row in rows[:2]:
        sample = samples[row["key"]]
        assert sample["jpg"] == (voc_root / "JPEGImages" / f"{row['key']}.jpg").read_bytes()
        raw = np.array(Image.open(voc_root / "SegmentationClass" / f"{row['key']}.png"))
        label = decode_label_png(sample["seg.png"])
        assert np.array_equal(label, reference_apply("voc", raw))
        ids = sorted(int(v) for v in np.unique(label) if v)
        assert row["class_ids"] == ids
        assert row["pixel_counts"] == [int((label == i).sum()) for i in ids]
        assert json.loads(sample["json"])["label_file"] == f"SegmentationClass/{row['key']}.png"
    before = {p.name: p.read_bytes() for p in out.glob("*.tar")}
    assert main(_build_args(voc_root, out, "voc", "train", "--allow-failures")) == 0
    assert "reused" in capsys.readouterr().out
    assert {p.name: p.read_bytes() for p in out.glob("*.tar")} == before
    # a changed label rebuilds: the shard holding it gets new bytes
    write_label(voc_root / "SegmentationClass" / "2010_000005.png", raw_values(3, [0, 1]),
                mode="P")
    assert main(_build_args(voc_root, out, "voc", "train")) == 1
    assert sorted(_shard_samples(out)) == ["2007_000032", "2008_000001", "2010_000005"]


def test_build_option_rules_are_one_line_errors(voc_root, tmp_path, capsys):
    from embseg.cli import main

    out = tmp_path / "x"
    cases = [(_build_args(voc_root, out, "voc", "train", "--lvis", "a.json"), "--format lvis"),
             (["build", "--images", str(voc_root), "--out", str(out)], "--lvis"),
             (_build_args(voc_root, out, "voc", "train", "--classes", "c.txt"),
              "for --format labelmap"),
             (_build_args(voc_root, out, "ade20k", "train"), "ade20k splits are")]
    for argv, expected in cases:
        assert main(argv) == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and err.startswith("embseg: error: ") and expected in err
    assert not out.exists() or not list(out.glob("*.tar"))


def test_train_and_eval_on_cityscapes_shards(cityscapes_root, ray_local, tmp_path,
                                             one_torch_thread):
    """A few training steps and an evaluation run unchanged on a format's shards; the eval
    report's groups are the Cityscapes categories."""
    from embseg.cli import main
    from embseg.evaluate import evaluate
    from embseg.train import TrainConfig, train

    shards = tmp_path / "shards"
    assert main(_build_args(cityscapes_root, shards / "train", "cityscapes", "train")) == 0
    assert main(_build_args(cityscapes_root, shards / "val", "cityscapes", "val",
                            "--allow-failures")) == 0
    result = train(TrainConfig(shards=shards / "train", val_shards=shards / "val",
                               out=tmp_path / "run", steps=2, batch_size=2, crop_size=16,
                               num_workers=0, checkpoint_every=2, no_progress=True))
    assert result.step == 2
    report = evaluate(result.last_checkpoint, shards / "val", num_workers=0)
    assert report.n_images == 2  # the two lindau items failed at build time
    assert list(report.group_miou) == ["flat", "construction", "object", "nature", "sky",
                                       "human", "vehicle"]
    assert "| vehicle |" in report.to_markdown()
