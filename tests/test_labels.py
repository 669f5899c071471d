"""The painting rule against an independent per-pixel painter, mask kinds, and bad images."""

from __future__ import annotations

import io
import json
import re

import numpy as np
import pytest
from annotation_files import (
    LVIS_CATEGORIES,
    STUFF_CATEGORIES,
    STUFF_TO_CLASS,
    box_mask,
    lvis_image,
    polygon_ann,
    polygon_mask,
    rle_ann,
    stuff_image,
    write_annotations,
    write_image,
)
from PIL import Image

from embseg.annotations import load_build_inputs
from embseg.labels import decode_label_png, encode_label_png, paint_label_map, process_image

W, H = 24, 16
REL = "train2017/000000000001.jpg"


def reference_paint(height, width, lvis, stuff, overlap="first"):
    """Per pixel: the first LVIS mask (in painting order) covering it, else the first stuff mask.

    Painting order is file order, or for "smaller" ascending area with ties in file order.
    """
    order = list(range(len(lvis)))
    if overlap == "smaller":
        areas = [sum(bool(v) for row in mask.tolist() for v in row) for _, mask in lvis]
        order.sort(key=lambda i: (areas[i], i))
    label = np.zeros((height, width), dtype=np.int64)
    for y in range(height):
        for x in range(width):
            value = None
            for i in order:
                if lvis[i][1][y][x]:
                    value = lvis[i][0]
                    break
            if value is None:
                for class_id, mask in stuff:
                    if mask[y][x]:
                        value = class_id
                        break
            label[y][x] = value or 0
    return label


def random_masks(rng, count, height, width, class_ids):
    masks = []
    for _ in range(count):
        kind = rng.integers(3)
        if kind == 0:  # rectangle
            top, left = rng.integers(0, height), rng.integers(0, width)
            mask = box_mask(height, width, top, left, top + rng.integers(1, height),
                            left + rng.integers(1, width))
        elif kind == 1:  # ellipse
            yy, xx = np.mgrid[:height, :width]
            cy, cx = rng.uniform(0, height), rng.uniform(0, width)
            mask = ((yy - cy) / rng.uniform(1, height)) ** 2 + (
                (xx - cx) / rng.uniform(1, width)) ** 2 <= 1
        else:  # speckle
            mask = rng.random((height, width)) < 0.3
        masks.append((int(rng.choice(class_ids)), mask))
    return masks


@pytest.mark.parametrize("overlap", ["first", "smaller"])
@pytest.mark.parametrize("seed", range(6))
def test_paint_matches_independent_painter(seed, overlap):
    rng = np.random.default_rng(seed)
    height, width = int(rng.integers(5, 20)), int(rng.integers(5, 20))
    lvis = random_masks(rng, int(rng.integers(0, 8)), height, width, [1, 2, 3, 300, 1203])
    stuff = random_masks(rng, int(rng.integers(0, 6)), height, width, [0, 0, 50, 1204, 1284])
    got = paint_label_map(height=height, width=width, lvis_masks=lvis, stuff_masks=stuff,
                          overlap=overlap)
    assert got.dtype == np.uint16 and got.shape == (height, width)
    np.testing.assert_array_equal(got, reference_paint(height, width, lvis, stuff, overlap))


def test_paint_rule_cases_by_hand():
    big, small = box_mask(4, 4, 0, 0, 4, 4), box_mask(4, 4, 1, 1, 3, 3)
    first = paint_label_map(height=4, width=4, lvis_masks=[(1, big), (2, small)], stuff_masks=[])
    assert (first == 1).all()  # first wins: the later small instance is hidden
    smaller = paint_label_map(height=4, width=4, lvis_masks=[(1, big), (2, small)],
                              stuff_masks=[], overlap="smaller")
    assert smaller[1:3, 1:3].tolist() == [[2, 2], [2, 2]] and smaller[0].tolist() == [1] * 4
    twin_a, twin_b = box_mask(4, 4, 0, 0, 2, 4), box_mask(4, 4, 1, 0, 3, 4)  # equal areas
    tie = paint_label_map(height=4, width=4, lvis_masks=[(7, twin_a), (8, twin_b)],
                          stuff_masks=[], overlap="smaller")
    assert tie[:, 0].tolist() == [7, 7, 8, 0]  # ties keep file order
    other_first = paint_label_map(height=4, width=4, lvis_masks=[(1, small)],
                                  stuff_masks=[(0, box_mask(4, 4, 0, 0, 2, 4)), (5, big)])
    assert other_first.tolist() == [[0, 0, 0, 0], [0, 1, 1, 0], [5, 1, 1, 5], [5, 5, 5, 5]]
    with pytest.raises(ValueError, match="overlap"):
        paint_label_map(height=4, width=4, lvis_masks=[], stuff_masks=[], overlap="largest")


def test_label_png_is_uint16_and_deterministic():
    label = np.array([[0, 1, 255], [256, 1284, 65535]], dtype=np.uint16)
    data = encode_label_png(label)
    assert data == encode_label_png(label.copy())
    with Image.open(io.BytesIO(data)) as image:
        assert image.format == "PNG" and image.mode == "I;16"
    np.testing.assert_array_equal(decode_label_png(data), label)


# --- end to end through the official mask APIs ------------------------------------------------

def run_one(tmp_path, *, lvis_anns=(), stuff_anns=None, lvis_size=(W, H), stuff_size=None,
            write=None, image_overrides=None, overlap="first"):
    """Write one image + LVIS (+ stuff) file, load them, process the image; (result, root)."""
    root = tmp_path / "images"
    root.mkdir(parents=True, exist_ok=True)
    if write is None:
        write_image(root / REL, W, H)
    else:
        write(root / REL)
    image = lvis_image(1, *lvis_size)
    image.update(image_overrides or {})
    lvis = write_annotations(tmp_path / "lvis.json", [image], list(lvis_anns), LVIS_CATEGORIES)
    stuff_files = []
    if stuff_anns is not None:
        stuff_files.append(write_annotations(
            tmp_path / "stuff.json", [stuff_image(1, *(stuff_size or lvis_size))],
            list(stuff_anns), STUFF_CATEGORIES))
    (item,) = load_build_inputs(lvis, stuff_files, root).items
    return process_image(item, root, overlap=overlap), root


POLY_A = [1, 1, 15, 1, 15, 12, 1, 12]            # a large box
POLY_B1, POLY_B2 = [18, 2, 23, 2, 20, 9], [16, 10, 22, 10, 22, 15, 16, 15]  # two parts


def mixed_annotations():
    """LVIS and stuff annotations using every mask kind in both files, with overlaps."""
    rle_dog = box_mask(H, W, 4, 4, 10, 20)
    rle_towel = box_mask(H, W, 11, 14, 15, 18)
    lvis = [polygon_ann(1, 1, 1, POLY_A), rle_ann(2, 1, 3, rle_dog),
            rle_ann(3, 1, 4, rle_towel, compressed=False), polygon_ann(4, 1, 2, POLY_B1, POLY_B2)]
    other = box_mask(H, W, 0, 0, 3, 24)
    grass = box_mask(H, W, 12, 0, 16, 24)
    sky_poly = [0, 0, 24, 0, 24, 6, 0, 6]
    table = box_mask(H, W, 0, 10, 16, 14)
    stuff = [rle_ann(11, 1, 183, other), rle_ann(12, 1, 92, grass, compressed=False),
             polygon_ann(13, 1, 93, sky_poly), rle_ann(14, 1, 165, table)]
    expected_lvis = [(1, polygon_mask([POLY_A], H, W)), (3, rle_dog), (4, rle_towel),
                     (2, polygon_mask([POLY_B1, POLY_B2], H, W))]
    expected_stuff = [(0, other), (5, grass), (6, polygon_mask([sky_poly], H, W)), (2, table)]
    return lvis, stuff, expected_lvis, expected_stuff


@pytest.mark.parametrize("overlap", ["first", "smaller"])
def test_process_image_all_mask_kinds_match_reference(tmp_path, overlap):
    lvis, stuff, expected_lvis, expected_stuff = mixed_annotations()
    result, root = run_one(tmp_path, lvis_anns=lvis, stuff_anns=stuff, overlap=overlap)
    assert (result.status, result.reason, result.key) == ("ok", "", "000000000001")
    label = decode_label_png(result.seg_png)
    expected = reference_paint(H, W, expected_lvis, expected_stuff, overlap)
    np.testing.assert_array_equal(label, expected)
    assert result.jpg == (root / REL).read_bytes()  # the original bytes, unchanged
    ids, counts = np.unique(expected[expected > 0], return_counts=True)
    assert result.class_ids == ids.tolist() and result.pixel_counts == counts.tolist()
    assert result.meta == {"image_id": 1, "height": H, "width": W,
                           "file_name": "000000000001.jpg", "n_lvis": 4, "n_stuff": 4,
                           "classes": ids.tolist()}
    json.dumps(result.meta)
    assert {0, 1, 2, 3, 4, 5, 6} <= set(np.unique(label).tolist())  # every source shows up
    again, _ = run_one(tmp_path, lvis_anns=lvis, stuff_anns=stuff, overlap=overlap)
    assert again.seg_png == result.seg_png


def test_image_absent_from_stuff_gets_lvis_labels_only(tmp_path):
    lvis, _, expected_lvis, _ = mixed_annotations()
    result, _ = run_one(tmp_path, lvis_anns=lvis, stuff_anns=None)
    assert result.status == "ok"
    np.testing.assert_array_equal(decode_label_png(result.seg_png),
                                  reference_paint(H, W, expected_lvis, []))
    assert result.meta["n_stuff"] == 0


def test_stuff_only_image_and_merged_ids(tmp_path):
    mask = box_mask(H, W, 0, 0, 8, 24)
    rest = box_mask(H, W, 8, 0, 16, 24)
    result, _ = run_one(tmp_path, stuff_anns=[rle_ann(1, 1, 168, mask), rle_ann(2, 1, 92, rest)])
    assert result.status == "ok"
    label = decode_label_png(result.seg_png)
    assert (label[:8] == STUFF_TO_CLASS[168]).all() and (label[8:] == 5).all()
    assert result.class_ids == [4, 5] and result.pixel_counts == [8 * 24, 8 * 24]


@pytest.mark.parametrize("stuff_anns", [None, []])
def test_image_without_any_annotation_is_skipped(tmp_path, stuff_anns):
    result, _ = run_one(tmp_path, lvis_anns=[], stuff_anns=stuff_anns)
    assert result.status == "skipped" and "no annotation" in result.reason
    assert result.jpg is None and result.seg_png is None


# --- image files ---------------------------------------------------------------------------

ONE_BOX = [polygon_ann(5, 1, 1, [0, 0, 12, 0, 12, 8, 0, 8])]


@pytest.mark.parametrize("mode", ["L", "CMYK"])
def test_grayscale_and_cmyk_jpeg_are_fine(tmp_path, mode):
    result, root = run_one(tmp_path, lvis_anns=ONE_BOX,
                           write=lambda p: write_image(p, W, H, mode=mode))
    assert result.status == "ok", result.reason
    assert result.jpg == (root / REL).read_bytes()


def test_png_bytes_under_jpg_name_decode_by_content(tmp_path):
    result, root = run_one(tmp_path, lvis_anns=ONE_BOX,
                           write=lambda p: write_image(p, W, H, fmt="PNG"))
    assert result.status == "ok", result.reason
    assert result.jpg[:8] == b"\x89PNG\r\n\x1a\n" == (root / REL).read_bytes()[:8]


def test_exif_rotation_labels_follow_stored_grid(tmp_path):
    def rotated(path):  # stored 24x16, displayed 16x24 (orientation 6: rotate 90 CW)
        write_image(path, W, H, orientation=6)
    result, _ = run_one(tmp_path, lvis_anns=ONE_BOX, write=rotated)
    assert result.status == "ok", result.reason
    label = decode_label_png(result.seg_png)
    assert label.shape == (H, W) and (label[:8, :12] == 1).all()
    displayed, _ = run_one(tmp_path / "b", lvis_anns=[], lvis_size=(H, W), write=rotated,
                           stuff_anns=[rle_ann(1, 1, 92, box_mask(W, H, 0, 0, 2, 2))])
    assert displayed.status == "failed"
    assert "24x16" in displayed.reason and "16x24" in displayed.reason


def test_truncated_jpeg_fails(tmp_path):
    def truncated(path):
        write_image(path, W, H)
        path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    result, _ = run_one(tmp_path, lvis_anns=ONE_BOX, write=truncated)
    assert result.status == "failed" and "cannot be decoded" in result.reason
    assert "truncated" in result.reason.lower()


@pytest.mark.parametrize("content, pattern", [
    (b"this is not an image", "cannot be decoded"),
    (b"", "image file is empty"),
])
def test_undecodable_image_fails(tmp_path, content, pattern):
    result, _ = run_one(tmp_path, lvis_anns=ONE_BOX, write=lambda p: (
        p.parent.mkdir(parents=True, exist_ok=True), p.write_bytes(content)))
    assert result.status == "failed" and pattern in result.reason


def test_missing_image_file_fails(tmp_path):
    result, root = run_one(tmp_path, lvis_anns=ONE_BOX,
                           write=lambda p: p.parent.mkdir(parents=True, exist_ok=True))
    assert result.status == "failed"
    assert result.reason == f"image file not found: {root / REL}"


def test_pixel_grid_differing_from_annotation_fails(tmp_path):
    result, _ = run_one(tmp_path, lvis_anns=ONE_BOX, write=lambda p: write_image(p, 30, 20))
    assert result.status == "failed"
    assert "30x20" in result.reason and f"{W}x{H}" in result.reason


def test_sizes_disagreeing_between_lvis_and_stuff_fail(tmp_path):
    result, _ = run_one(tmp_path, lvis_anns=ONE_BOX, stuff_anns=[], stuff_size=(W + 1, H))
    assert result.status == "failed"
    assert f"{W}x{H}" in result.reason and f"{W + 1}x{H}" in result.reason


def test_unsafe_coco_url_fails_without_reading_outside(tmp_path):
    write_image(tmp_path / "secret.jpg", W, H)
    result, _ = run_one(tmp_path, lvis_anns=ONE_BOX, image_overrides={
        "coco_url": "http://images.cocodataset.org/../secret.jpg"})
    assert result.status == "failed" and "unsafe path" in result.reason
    assert result.jpg is None


# --- bad segmentations ---------------------------------------------------------------------

def short_rle(ann_id):
    ann = rle_ann(ann_id, 1, 92, box_mask(H, W, 0, 0, 4, 4))
    ann["segmentation"]["counts"] = rle_ann(0, 1, 92, box_mask(H, W // 2, 0, 0, 4, 4))[
        "segmentation"]["counts"]  # encodes only half of the pixels
    return ann


def long_rle(ann_id):
    ann = rle_ann(ann_id, 1, 92, box_mask(H, W, 0, 0, 4, 4))
    ann["segmentation"]["counts"] = rle_ann(0, 1, 92, box_mask(H, 2 * W, 0, 0, 4, 4))[
        "segmentation"]["counts"]  # encodes twice the pixels
    return ann


@pytest.mark.parametrize("lvis_anns, stuff_anns, pattern", [
    ([polygon_ann(41, 1, 1, [1, 1, 8, 8])], None,
     "annotation 41: polygon with fewer than 3 points"),
    ([polygon_ann(42, 1, 1, POLY_A, [3, 3])], None,
     "annotation 42: polygon with fewer than 3 points"),
    ([polygon_ann(43, 1, 1)], None, "annotation 43: segmentation is an empty polygon list"),
    ([polygon_ann(44, 1, 1, [1, 1, 8, 1, 8, 5, 2])], None, "annotation 44: polygon has an odd number"),
    ([polygon_ann(45, 1, 1, [1, 1, 80, 1, 80, 9])], None,
     r"annotation 45: polygon point \(80, 1\) lies outside the 24x16 image"),
    ([rle_ann(46, 1, 1, box_mask(H + 1, W, 0, 0, 2, 2))], None,
     r"annotation 46: RLE size 24x17 differs from the image 24x16"),
    (ONE_BOX, [rle_ann(47, 1, 92, box_mask(H, W + 2, 0, 0, 2, 2), compressed=False)],
     r"annotation 47: RLE size 26x16 differs"),
    (ONE_BOX, [short_rle(48)], "annotation 48: compressed RLE does not encode a full 24x16"),
    (ONE_BOX, [long_rle(49)], "annotation 49: cannot decode segmentation"),
    (ONE_BOX, [dict(rle_ann(50, 1, 92, box_mask(H, W, 0, 0, 2, 2), compressed=False),
                    segmentation={"size": [H, W], "counts": [3, 5]})],
     "annotation 50: uncompressed RLE covers 8 pixels, the image has 384"),
    (ONE_BOX, [dict(polygon_ann(51, 1, 92, POLY_A), segmentation=7)],
     "annotation 51: segmentation is neither polygons nor RLE"),
])
def test_bad_segmentation_fails_the_image(tmp_path, lvis_anns, stuff_anns, pattern):
    result, _ = run_one(tmp_path, lvis_anns=lvis_anns, stuff_anns=stuff_anns)
    assert result.status == "failed"
    assert re.search(pattern, result.reason), result.reason
    assert "\n" not in result.reason and result.seg_png is None
