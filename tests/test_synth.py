"""The synthetic dataset: real formats (read back by lvis / pycocotools), determinism, content."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
import pytest
from lvis import LVIS
from PIL import Image
from pycocotools.coco import COCO

from embseg.cli import main
from embseg.synth import SynthDataset, generate_synthetic

SMALL = dict(images=32, val_images=8, lvis_classes=30, seed=3, size=64)


@pytest.fixture(scope="module")
def small(tmp_path_factory) -> SynthDataset:
    return generate_synthetic(tmp_path_factory.mktemp("synth") / "data", **SMALL)


def _tree_digest(root: Path) -> dict[str, str]:
    """Relative path -> sha256 of every file under root."""
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


def _label_map(lvis: LVIS, stuff: COCO, image_id: int, lvis_to_class, stuff_to_class):
    """Independent painter: LVIS first wins, then stuff fills zeros, `other` -> 0."""
    img = lvis.imgs[image_id]
    label = np.zeros((img["height"], img["width"]), dtype=np.int64)
    for ann in lvis.img_ann_map[image_id]:
        mask = lvis.ann_to_mask(ann).astype(bool)
        label[mask & (label == 0)] = lvis_to_class[ann["category_id"]]
    if image_id in stuff.imgs:
        filled = label != 0
        for ann in stuff.imgToAnns[image_id]:
            mask = stuff.annToMask(ann).astype(bool) & ~filled
            label[mask] = stuff_to_class[ann["category_id"]]
            filled |= mask
    return label


def _merged_ids(lvis: LVIS, stuff: COCO):
    """Class ids by the merge rule, computed here independently of embseg.vocab."""
    lvis_to_class = {cid: cid for cid in lvis.cats}
    by_name = {cat["name"]: cid for cid, cat in lvis.cats.items()}
    stuff_to_class, next_id = {}, max(lvis.cats) + 1
    for sid in sorted(stuff.cats):
        name = stuff.cats[sid]["name"]
        if sid == 183:
            stuff_to_class[sid] = 0
        elif name in by_name:
            stuff_to_class[sid] = by_name[name]
        else:
            stuff_to_class[sid], next_id = next_id, next_id + 1
    return lvis_to_class, stuff_to_class


def test_layout_and_lvis_format(small):
    for split, folder in ((small.lvis_train, "train2017"), (small.lvis_val, "val2017")):
        lvis = LVIS(str(split))
        assert len(lvis.imgs) == (SMALL["images"] if folder == "train2017" else SMALL["val_images"])
        assert sorted(lvis.cats) == list(range(1, SMALL["lvis_classes"] + 1))
        for cat in lvis.cats.values():
            assert {"id", "name", "synonyms", "synset", "def", "frequency"} <= set(cat)
        assert {cat["frequency"] for cat in lvis.cats.values()} == {"r", "c", "f"}
        for img in lvis.imgs.values():
            assert {"id", "coco_url", "height", "width", "neg_category_ids",
                    "not_exhaustive_category_ids"} <= set(img)
            rel = Path(*img["coco_url"].split("/")[-2:])
            assert rel.parts[0] == folder and rel.name == f"{img['id']:012d}.jpg"
            with Image.open(small.images_root / rel) as im:
                assert im.format == "JPEG" and im.size == (img["width"], img["height"])
        for ann in lvis.anns.values():
            assert isinstance(ann["segmentation"], list) and len(ann["segmentation"][0]) >= 6
            assert ann["category_id"] in lvis.cats and len(ann["bbox"]) == 4
            mask = lvis.ann_to_mask(ann)
            img = lvis.imgs[ann["image_id"]]
            assert mask.shape == (img["height"], img["width"])
            assert mask.sum() > 0 and abs(mask.sum() - ann["area"]) <= 1


def test_frequency_matches_training_image_counts(small):
    train = LVIS(str(small.lvis_train))
    for cid, cat in train.cats.items():
        assert cat["image_count"] == len(set(train.cat_img_map[cid]))
    counts = {cid: cat["image_count"] for cid, cat in train.cats.items()}
    # Long tail: every rare class appears in fewer training images than every frequent one.
    rare = [counts[c] for c, cat in train.cats.items() if cat["frequency"] == "r"]
    frequent = [counts[c] for c, cat in train.cats.items() if cat["frequency"] == "f"]
    assert max(rare) < min(frequent)
    assert max(counts.values()) >= 3 * max(1, int(np.median(list(counts.values()))))


def test_stuff_format_other_and_merged_names(small):
    lvis = LVIS(str(small.lvis_train))
    for path, lvis_path in ((small.stuff_train, small.lvis_train), (small.stuff_val, small.lvis_val)):
        coco = COCO(str(path))
        assert sorted(coco.cats) == list(range(92, 184))
        assert coco.cats[183]["name"] == "other"
        assert all("supercategory" in cat for cat in coco.cats.values())
        for ann in coco.anns.values():
            assert isinstance(ann["segmentation"]["counts"], str)
            mask = coco.annToMask(ann)
            img = coco.imgs[ann["image_id"]]
            assert mask.shape == (img["height"], img["width"]) and mask.sum() == ann["area"]
        assert any(ann["category_id"] == 183 for ann in coco.anns.values())
        # At least one LVIS image is absent from the stuff file.
        lvis_ids = set(LVIS(str(lvis_path)).imgs)
        assert set(coco.imgs) < lvis_ids
    stuff = COCO(str(small.stuff_train))
    lvis_names = {cat["name"] for cat in lvis.cats.values()}
    merged = [sid for sid, cat in stuff.cats.items() if cat["name"] in lvis_names]
    assert len(merged) >= 2
    # Stuff masks of one image do not overlap (one stuff label per pixel, as in COCO-Stuff).
    for image_id in stuff.imgs:
        total = sum(stuff.annToMask(a).astype(int) for a in stuff.imgToAnns[image_id])
        assert total.max() == 1


def test_other_leaves_unlabelled_pixels_and_merged_class_is_painted(small):
    lvis, stuff = LVIS(str(small.lvis_train)), COCO(str(small.stuff_train))
    lvis_to_class, stuff_to_class = _merged_ids(lvis, stuff)
    merged_ids = {stuff_to_class[sid] for sid, cat in stuff.cats.items()
                  if sid != 183 and stuff_to_class[sid] <= max(lvis.cats)}
    zero_pixels, merged_stuff_pixels = 0, 0
    for image_id in stuff.imgs:
        label = _label_map(lvis, stuff, image_id, lvis_to_class, stuff_to_class)
        zero_pixels += int((label == 0).sum())
        for ann in stuff.imgToAnns[image_id]:
            if stuff_to_class[ann["category_id"]] in merged_ids:
                merged_stuff_pixels += int(stuff.annToMask(ann).sum())
    assert zero_pixels > 0  # distractor objects are `other` and no LVIS class
    assert merged_stuff_pixels > 0  # a stuff category merged into an LVIS class occurs


def test_each_class_has_its_own_appearance(small):
    """Nearest-centroid on region mean colours: train centroids classify val regions."""
    def regions(lvis_path, stuff_path):
        lvis, stuff = LVIS(str(lvis_path)), COCO(str(stuff_path))
        lvis_to_class, stuff_to_class = _merged_ids(lvis, stuff)
        out = []
        for image_id in stuff.imgs:
            label = _label_map(lvis, stuff, image_id, lvis_to_class, stuff_to_class)
            rel = Path(*lvis.imgs[image_id]["coco_url"].split("/")[-2:])
            pixels = np.asarray(Image.open(small.images_root / rel).convert("RGB"), dtype=float)
            for cls in np.unique(label[label > 0]):
                mask = label == cls
                if mask.sum() >= 64:
                    out.append((int(cls), pixels[mask].mean(axis=0)))
        return out

    train = regions(small.lvis_train, small.stuff_train)
    val = regions(small.lvis_val, small.stuff_val)
    centroids: dict[int, list] = {}
    for cls, colour in train:
        centroids.setdefault(cls, []).append(colour)
    names = sorted(centroids)
    table = np.stack([np.mean(centroids[c], axis=0) for c in names])
    known = [(cls, colour) for cls, colour in val if cls in centroids]
    assert len(known) >= 10
    hits = sum(names[int(np.argmin(((table - colour) ** 2).sum(1)))] == cls for cls, colour in known)
    assert hits / len(known) >= 0.9


def test_deterministic_per_seed(tmp_path, small):
    again = generate_synthetic(tmp_path / "again", **SMALL)
    assert _tree_digest(again.root) == _tree_digest(small.root)
    other = generate_synthetic(tmp_path / "other", **{**SMALL, "seed": 4})
    assert _tree_digest(other.root) != _tree_digest(small.root)


def test_a_pool_of_processes_writes_the_same_files(tmp_path, small, monkeypatch):
    import embseg.synth

    monkeypatch.setattr(embseg.synth, "PARALLEL_MIN_IMAGES", 1)  # both splits in the pool
    pooled = generate_synthetic(tmp_path / "pooled", **SMALL, workers=2)
    assert _tree_digest(pooled.root) == _tree_digest(small.root)


def test_borrowed_categories(tmp_path):
    cats = [{"id": i, "name": f"real_{i}", "synonyms": [f"real_{i}", f"alias_{i}"],
             "synset": f"real.n.{i:02d}", "def": f"definition {i}", "frequency": "rcf"[i % 3]}
            for i in range(1, 41)]
    source = tmp_path / "lvis_cats.json"
    source.write_text(json.dumps({"categories": cats, "images": [], "annotations": []}))
    data = generate_synthetic(tmp_path / "borrowed", images=6, val_images=2, lvis_classes=12,
                              categories=source, size=48)
    lvis = LVIS(str(data.lvis_train))
    by_name = {cat["name"]: cat for cat in cats}
    assert sorted(lvis.cats) == list(range(1, 13))
    for cat in lvis.cats.values():
        real = by_name[cat["name"]]
        assert (cat["frequency"], cat["synonyms"], cat["def"]) == (
            real["frequency"], real["synonyms"], real["def"])


def test_borrowed_real_lvis_list(tmp_path, shared_vocab):
    data = generate_synthetic(tmp_path / "real", images=4, val_images=1, lvis_classes=50,
                              categories=shared_vocab / "lvis_v1_categories.json", size=48)
    real = {c["name"]: c for c in json.loads((shared_vocab / "lvis_v1_categories.json").read_text())}
    lvis = LVIS(str(data.lvis_train))
    assert all(cat["frequency"] == real[cat["name"]]["frequency"] for cat in lvis.cats.values())


def test_cli_synth_and_bad_arguments(tmp_path, capsys):
    out = tmp_path / "cli"
    assert main(["synth", "--out", str(out), "--images", "3", "--val-images", "1",
                 "--lvis-classes", "5", "--size", "40"]) == 0
    assert (out / "lvis_v1_train.json").exists() and (out / "stuff_val2017.json").exists()
    assert len(list((out / "images" / "train2017").glob("*.jpg"))) == 3
    assert main(["synth", "--out", str(tmp_path / "bad"), "--lvis-classes", "2"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("embseg: error:") and "--lvis-classes" in err[0]
    assert main(["synth", "--out", str(tmp_path / "bad"), "--categories",
                 str(tmp_path / "missing.json")]) == 2
    assert "missing.json" in capsys.readouterr().err


def test_vocabulary_of_synthetic_files(small):
    from embseg.vocab import build_vocabulary

    vocab = build_vocabulary(small.lvis_train, [small.stuff_train, small.stuff_val])
    merged = [c for c in vocab.classes if c.source == "both"]
    assert len(merged) >= 2
    assert vocab.num_classes == SMALL["lvis_classes"] + 91 - len(merged)
    assert set(vocab.groups()) == {"rare", "common", "frequent", "stuff"}
    assert all(vocab.groups()[g] for g in ("rare", "common", "frequent", "stuff"))
