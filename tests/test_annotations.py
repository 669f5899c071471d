"""Loading LVIS / COCO-Stuff files into build items: resolution, paths, and every bad input."""

from __future__ import annotations

import json
import pickle
from pathlib import Path

import pytest
from annotation_files import (
    LVIS_CATEGORIES,
    STUFF_CATEGORIES,
    STUFF_TO_CLASS,
    box_mask,
    lvis_image,
    polygon_ann,
    rle_ann,
    stuff_image,
    write_annotations,
)

from embseg.annotations import ImageItem, image_rel_path, load_build_inputs
from embseg.errors import EmbsegError

SQUARE = [2, 2, 10, 2, 10, 10, 2, 10]


@pytest.fixture
def world(tmp_path):
    """LVIS train file (3 images, given out of order), a stuff file, an images root."""
    root = tmp_path / "images"
    root.mkdir()
    lvis = write_annotations(
        tmp_path / "lvis_v1_train.json",
        images=[lvis_image(30, 16, 12), lvis_image(10, 16, 12),
                lvis_image(20, 16, 12, coco_url=None, file_name="val2017/000000000020.jpg")],
        annotations=[polygon_ann(101, 10, 3, SQUARE), polygon_ann(102, 30, 1, SQUARE),
                     polygon_ann(103, 10, 2, SQUARE), polygon_ann(104, 10, 4, SQUARE)],
        categories=LVIS_CATEGORIES)
    stuff = write_annotations(
        tmp_path / "stuff_train2017.json",
        images=[stuff_image(10, 16, 12), stuff_image(20, 16, 12), stuff_image(99, 16, 12)],
        annotations=[rle_ann(201, 10, 183, box_mask(12, 16, 0, 0, 4, 4)),
                     rle_ann(202, 10, 165, box_mask(12, 16, 0, 0, 6, 6)),
                     rle_ann(203, 10, 92, box_mask(12, 16, 6, 0, 12, 16)),
                     rle_ann(204, 99, 93, box_mask(12, 16, 0, 0, 12, 16))],
        categories=STUFF_CATEGORIES)
    return {"lvis": lvis, "stuff": stuff, "root": root, "tmp": tmp_path}


def test_items_resolved_sorted_and_in_file_order(world):
    inputs = load_build_inputs(world["lvis"], [world["stuff"]], world["root"])
    assert inputs.vocab.names == ["cat", "table", "dog", "towel", "grass", "sky-other"]
    assert inputs.source_files == [world["lvis"], world["stuff"]]
    assert [item.image_id for item in inputs.items] == [10, 20, 30]  # stuff-only 99 is no input
    first, second, third = inputs.items
    assert first.rel_path == "train2017/000000000010.jpg"
    assert second.rel_path == "val2017/000000000020.jpg"  # from file_name: no coco_url
    assert [a["id"] for a in first.lvis_anns] == [101, 103, 104]
    assert [a["class_id"] for a in first.lvis_anns] == [3, 2, 4]
    assert [a["id"] for a in first.stuff_anns] == [201, 202, 203]
    assert [a["class_id"] for a in first.stuff_anns] == [STUFF_TO_CLASS[c] for c in (183, 165, 92)]
    assert (first.in_stuff, second.in_stuff, third.in_stuff) == (True, True, False)
    assert second.lvis_anns == [] and second.stuff_anns == []
    assert [a["class_id"] for a in third.lvis_anns] == [1] and third.stuff_anns == []
    assert all(item.failure is None for item in inputs.items)
    assert (first.height, first.width, first.key, first.file_name) == (
        12, 16, "000000000010", "000000000010.jpg")
    assert pickle.loads(pickle.dumps(first)) == first  # items travel to Ray workers


def test_two_stuff_files_for_train_and_val_images(tmp_path):
    root = tmp_path / "images"
    root.mkdir()
    lvis = write_annotations(tmp_path / "lvis_v1_val.json",
                             images=[lvis_image(1, 8, 8), lvis_image(2, 8, 8, split="val2017")],
                             annotations=[], categories=LVIS_CATEGORIES)
    train = write_annotations(tmp_path / "stuff_train.json", [stuff_image(1, 8, 8)],
                              [rle_ann(7, 1, 92, box_mask(8, 8, 0, 0, 8, 8))], STUFF_CATEGORIES)
    val = write_annotations(tmp_path / "stuff_val.json", [stuff_image(2, 8, 8)],
                            [rle_ann(7, 2, 93, box_mask(8, 8, 0, 0, 8, 8))], STUFF_CATEGORIES)
    items = load_build_inputs(lvis, [train, val], root).items
    assert [(i.rel_path, i.in_stuff, [a["class_id"] for a in i.stuff_anns]) for i in items] == [
        ("train2017/000000000001.jpg", True, [5]), ("val2017/000000000002.jpg", True, [6])]


def _rewrite(path: Path, edit) -> None:
    data = json.loads(path.read_text())
    edit(data)
    path.write_text(json.dumps(data))


def test_missing_files_and_folders(world):
    with pytest.raises(EmbsegError, match=r"nope\.json: file not found"):
        load_build_inputs(world["tmp"] / "nope.json", [world["stuff"]], world["root"])
    with pytest.raises(EmbsegError, match=r"gone\.json: file not found"):
        load_build_inputs(world["lvis"], [world["tmp"] / "gone.json"], world["root"])
    with pytest.raises(EmbsegError, match=r"no_images: images root folder not found"):
        load_build_inputs(world["lvis"], [world["stuff"]], world["tmp"] / "no_images")
    with pytest.raises(EmbsegError, match="images root folder not found"):
        load_build_inputs(world["lvis"], [world["stuff"]], world["lvis"])  # a file, not a folder
    with pytest.raises(EmbsegError, match="not a file"):
        load_build_inputs(world["root"], [world["stuff"]], world["root"])


@pytest.mark.parametrize("text, pattern", [
    ("", "file is empty"),
    ('{"images": [], "annotations": [}', r"malformed JSON at line 1 column 32 \(character 31\)"),
    ("[1, 2]", r"not an LVIS/COCO annotation file \(top level is list"),
    ('{"images": [], "categories": []}', r"not an LVIS/COCO annotation file \(no 'annotations'\)"),
    ('{"images": {}, "annotations": [], "categories": []}', "'images' is dict, expected a list"),
    ('{"images": [{"id": 1, "width": 4}], "annotations": [], "categories": []}',
     "image id 1 has no positive integer 'height'"),
    ('{"images": [], "annotations": [{"image_id": 1}], "categories": []}',
     "annotation #0 has no integer 'id'"),
])
def test_unusable_lvis_file(world, text, pattern):
    world["lvis"].write_text(text)
    with pytest.raises(EmbsegError, match=pattern) as info:
        load_build_inputs(world["lvis"], [world["stuff"]], world["root"])
    assert str(world["lvis"]) in str(info.value) and "\n" not in str(info.value)


def test_unknown_category_names_file_and_annotation(world):
    _rewrite(world["lvis"], lambda d: d["annotations"].append(polygon_ann(777, 10, 99, SQUARE)))
    with pytest.raises(EmbsegError, match=r"lvis_v1_train\.json: annotation id 777 has "
                                          r"category_id 99, which is not in 'categories'"):
        load_build_inputs(world["lvis"], [world["stuff"]], world["root"])


def test_unknown_stuff_category(world):
    _rewrite(world["stuff"], lambda d: d["annotations"].append(
        rle_ann(555, 10, 140, box_mask(12, 16, 0, 0, 1, 1))))
    with pytest.raises(EmbsegError, match=r"stuff_train2017\.json: annotation id 555 has "
                                          r"category_id 140"):
        load_build_inputs(world["lvis"], [world["stuff"]], world["root"])


def test_annotation_of_unknown_image(world):
    _rewrite(world["lvis"], lambda d: d["annotations"].append(polygon_ann(778, 12345, 1, SQUARE)))
    with pytest.raises(EmbsegError, match="annotation id 778 refers to image id 12345"):
        load_build_inputs(world["lvis"], [world["stuff"]], world["root"])


def test_duplicate_image_ids(world):
    _rewrite(world["lvis"], lambda d: d["images"].append(lvis_image(20, 8, 8)))
    with pytest.raises(EmbsegError, match=r"lvis_v1_train\.json: duplicate image id 20"):
        load_build_inputs(world["lvis"], [world["stuff"]], world["root"])


def test_duplicate_annotation_ids(world):
    _rewrite(world["lvis"], lambda d: d["annotations"].append(polygon_ann(101, 20, 1, SQUARE)))
    with pytest.raises(EmbsegError, match="duplicate annotation id 101"):
        load_build_inputs(world["lvis"], [world["stuff"]], world["root"])


def test_same_image_in_two_stuff_files(world):
    other = write_annotations(world["tmp"] / "stuff_val2017.json", [stuff_image(20, 16, 12)], [],
                              STUFF_CATEGORIES)
    with pytest.raises(EmbsegError) as info:
        load_build_inputs(world["lvis"], [world["stuff"], other], world["root"])
    message = str(info.value)
    assert "image id 20" in message
    assert "stuff_train2017.json" in message and "stuff_val2017.json" in message


def test_stuff_files_disagreeing_on_a_category(world):
    renamed = [dict(c, name="lawn") if c["id"] == 92 else c for c in STUFF_CATEGORIES]
    other = write_annotations(world["tmp"] / "stuff_val2017.json", [], [], renamed)
    with pytest.raises(EmbsegError, match="disagree on COCO-Stuff category id 92"):
        load_build_inputs(world["lvis"], [world["stuff"], other], world["root"])


def test_size_disagreement_between_files_is_an_item_failure(world):
    def shrink(data):
        data["images"][0]["width"] = 20  # image 10
        data["images"][0]["height"] = 15
    _rewrite(world["stuff"], shrink)
    items = {i.image_id: i for i in load_build_inputs(world["lvis"], [world["stuff"]],
                                                      world["root"]).items}
    reason = items[10].failure
    assert reason is not None and "16x12" in reason and "20x15" in reason
    assert "lvis_v1_train.json" in reason and "stuff_train2017.json" in reason
    assert items[20].failure is None
    assert items[10].image_path(world["root"]) is None


@pytest.mark.parametrize("image, expected_path, failure", [
    ({"coco_url": "http://images.cocodataset.org/train2017/000000391895.jpg"},
     "train2017/000000391895.jpg", None),
    ({"coco_url": "http://x.org/a/b/val2017/1.jpg", "file_name": "ignored.jpg"},
     "val2017/1.jpg", None),
    ({"file_name": "train2017/2.jpg"}, "train2017/2.jpg", None),
    ({"file_name": "./3.jpg"}, "3.jpg", None),
    ({"coco_url": "http://x.org/train2017/../../etc/passwd"}, None, "unsafe path"),
    ({"coco_url": "http://x.org/../secret.jpg"}, None, "unsafe path"),
    ({"file_name": "../secret.jpg"}, None, "unsafe path"),
    ({"file_name": "train2017/../../secret.jpg"}, None, "unsafe path"),
    ({"file_name": "/etc/passwd"}, None, "unsafe path"),
    ({}, None, "neither 'coco_url' nor 'file_name'"),
])
def test_image_paths_stay_inside_the_images_root(image, expected_path, failure):
    rel_path, reason = image_rel_path(image)
    if failure is None:
        assert (rel_path, reason) == (expected_path, None)
    else:
        assert reason is not None and failure in reason


def test_unsafe_coco_url_becomes_item_failure(world):
    _rewrite(world["lvis"], lambda d: d["images"][1].update(
        coco_url="http://images.cocodataset.org/../../outside/000000000010.jpg"))
    items = {i.image_id: i for i in load_build_inputs(world["lvis"], [world["stuff"]],
                                                      world["root"]).items}
    assert "unsafe path" in items[10].failure
    assert isinstance(items[10], ImageItem)
