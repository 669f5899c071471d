"""Vocabulary merge (against an independent merge), real category lists, Parquet, `embseg vocab`."""

from __future__ import annotations

import hashlib
import json
import random
import subprocess
import sys
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from embseg.cli import main
from embseg.errors import EmbsegError
from embseg.vocab import Vocabulary, build_vocabulary, merge_vocabulary, read_categories

WORDS = ["banner", "table", "towel", "grass", "sky-other", "road", "dog", "cat", "person",
         "napkin", "wall-brick", "tree", "sea", "pillow", "curtain", "car", "bus", "kite"]


def reference_merge(lvis: list[dict], stuff: list[dict]) -> dict[int, dict]:
    """Independent statement of the merge rule: class id -> expected row; plus stuff mapping."""
    rows = {c["id"]: {"name": c["name"], "source": "lvis", "lvis_id": c["id"],
                      "coco_stuff_id": None, "frequency": c.get("frequency")} for c in lvis}
    lvis_id_by_name = {c["name"]: c["id"] for c in lvis}
    next_id = len(lvis) + 1
    stuff_map = {}
    for cat in sorted(stuff, key=lambda c: c["id"]):
        if cat["id"] == 183:
            stuff_map[183] = 0
        elif cat["name"] in lvis_id_by_name:
            target = lvis_id_by_name[cat["name"]]
            rows[target]["source"] = "both"
            rows[target]["coco_stuff_id"] = cat["id"]
            stuff_map[cat["id"]] = target
        else:
            rows[next_id] = {"name": cat["name"], "source": "coco_stuff", "lvis_id": None,
                             "coco_stuff_id": cat["id"], "frequency": None}
            stuff_map[cat["id"]] = next_id
            next_id += 1
    return {"rows": rows, "stuff_map": stuff_map}


def random_lists(seed: int) -> tuple[list[dict], list[dict]]:
    rng = random.Random(seed)
    lvis_names = rng.sample(WORDS, rng.randint(1, 10))
    lvis = [{"id": i + 1, "name": n, "synonyms": [n], "frequency": rng.choice("rcf")}
            for i, n in enumerate(lvis_names)]
    rng.shuffle(lvis)  # the input order must not matter
    stuff_ids = rng.sample(range(92, 183), rng.randint(0, 12))
    stuff = [{"id": i, "name": rng.choice(WORDS) + ("" if rng.random() < 0.5 else f"-{i}")}
             for i in stuff_ids]
    # stuff names are unique within the file
    seen, unique = set(), []
    for cat in stuff:
        if cat["name"] not in seen:
            seen.add(cat["name"])
            unique.append(cat)
    if rng.random() < 0.8:
        unique.append({"id": 183, "name": "other"})
    rng.shuffle(unique)
    return lvis, unique


@pytest.mark.parametrize("seed", range(8))
def test_merge_matches_independent_merge(seed):
    lvis, stuff = random_lists(seed)
    vocab = merge_vocabulary(lvis, stuff)
    expected = reference_merge(lvis, stuff)
    assert vocab.num_classes == len(expected["rows"])
    for cls in vocab.classes:
        row = expected["rows"][cls.id]
        got = {"name": cls.name, "source": cls.source, "lvis_id": cls.lvis_id,
               "coco_stuff_id": cls.coco_stuff_id, "frequency": cls.frequency}
        assert got == row, f"class {cls.id}"
    assert vocab.stuff_to_class == expected["stuff_map"]
    assert vocab.lvis_to_class == {c["id"]: c["id"] for c in lvis}
    assert vocab.names == [expected["rows"][i]["name"] for i in range(1, vocab.num_classes + 1)]


def test_groups_put_merged_class_in_its_lvis_group():
    lvis = [{"id": 1, "name": "table", "frequency": "f"}, {"id": 2, "name": "kite",
                                                             "frequency": "r"},
            {"id": 3, "name": "bus", "frequency": "c"}]
    stuff = [{"id": 92, "name": "grass"}, {"id": 165, "name": "table"},
             {"id": 183, "name": "other"}]
    vocab = merge_vocabulary(lvis, stuff)
    assert vocab.groups() == {"rare": [2], "common": [3], "frequent": [1], "stuff": [4]}
    assert vocab.classes[0].source == "both"
    assert [c.name for c in vocab.merged_pairs()] == ["table"]


def test_real_category_lists(shared_vocab):
    lvis = read_categories(shared_vocab / "lvis_v1_categories.json")
    stuff = read_categories(shared_vocab / "coco_stuff_categories.json")
    vocab = build_vocabulary(shared_vocab / "lvis_v1_categories.json",
                             [shared_vocab / "coco_stuff_categories.json"])
    assert vocab.num_classes == 1284
    assert [c.id for c in vocab.classes] == list(range(1, 1285))
    lvis_by_id = {c["id"]: c for c in lvis}
    for cls in vocab.classes[:1203]:  # every LVIS category keeps its id and name
        assert cls.lvis_id == cls.id and cls.name == lvis_by_id[cls.id]["name"]
        assert cls.frequency == lvis_by_id[cls.id]["frequency"]
    lvis_names = {c["name"]: c["id"] for c in lvis}
    merged = [c for c in stuff if c["name"] in lvis_names]
    assert len(merged) == 10
    for cat in merged:
        cls = vocab.classes[lvis_names[cat["name"]] - 1]
        assert cls.source == "both" and cls.coco_stuff_id == cat["id"] and cls.name == cat["name"]
        assert vocab.stuff_to_class[cat["id"]] == cls.id
    new = [c for c in sorted(stuff, key=lambda c: c["id"])
           if c["name"] not in lvis_names and c["id"] != 183]
    assert len(new) == 1284 - 1203
    for offset, cat in enumerate(new):
        cls = vocab.classes[1203 + offset]
        assert (cls.id, cls.name, cls.source, cls.coco_stuff_id) == (
            1204 + offset, cat["name"], "coco_stuff", cat["id"])
    assert vocab.stuff_to_class[183] == 0
    groups = vocab.groups()
    assert {k: len(v) for k, v in groups.items()} == {
        "rare": sum(c["frequency"] == "r" for c in lvis),
        "common": sum(c["frequency"] == "c" for c in lvis),
        "frequent": sum(c["frequency"] == "f" for c in lvis), "stuff": 81}


def test_parquet_round_trip(tmp_path):
    lvis, stuff = random_lists(3)
    vocab = merge_vocabulary(lvis, stuff)
    path = tmp_path / "sub" / "classes.parquet"
    vocab.write_parquet(path)
    vocab.write_parquet(path)  # overwriting works
    assert [p.name for p in path.parent.iterdir()] == ["classes.parquet"]  # no temp files left
    table = pq.read_table(path)
    schema = table.schema
    assert schema.field("id").type == pa.int32()
    assert schema.field("synonyms").type == pa.list_(pa.string())
    for column in ("name", "source", "frequency"):
        assert schema.field(column).type == pa.string()
    for column in ("lvis_id", "coco_stuff_id"):
        assert pa.types.is_integer(schema.field(column).type)
    rows = table.to_pylist()
    assert [r["id"] for r in rows] == list(range(1, vocab.num_classes + 1))
    for row, cls in zip(rows, vocab.classes, strict=True):
        assert row["lvis_id"] == cls.lvis_id and row["coco_stuff_id"] == cls.coco_stuff_id
        assert row["synonyms"] == list(cls.synonyms)
    again = Vocabulary.read_parquet(path)
    assert again == vocab
    assert again.content_hash() == vocab.content_hash()
    assert again.stuff_to_class == vocab.stuff_to_class


def test_content_hash_is_sha256_of_ordered_id_name_pairs():
    vocab = merge_vocabulary([{"id": 1, "name": "cat"}, {"id": 2, "name": "dog"}],
                             [{"id": 92, "name": "grass"}])
    payload = '[[1,"cat"],[2,"dog"],[3,"grass"]]'
    assert vocab.content_hash() == hashlib.sha256(payload.encode()).hexdigest()
    renamed = merge_vocabulary([{"id": 1, "name": "cat"}, {"id": 2, "name": "hound"}],
                               [{"id": 92, "name": "grass"}])
    assert renamed.content_hash() != vocab.content_hash()


def write_json(path: Path, data) -> Path:
    path.write_text(json.dumps(data))
    return path


LVIS_CATS = [{"id": 1, "name": "cat", "frequency": "f", "synonyms": ["cat"]},
             {"id": 2, "name": "table", "frequency": "c", "synonyms": ["table", "desk"]}]
STUFF_CATS = [{"id": 92, "name": "grass"}, {"id": 165, "name": "table"},
              {"id": 183, "name": "other"}]


def test_build_vocabulary_from_files_with_empty_images(tmp_path):
    lvis = write_json(tmp_path / "lvis.json",
                      {"images": [], "annotations": [], "categories": LVIS_CATS})
    stuff = write_json(tmp_path / "stuff.json", STUFF_CATS)  # a bare list works too
    vocab = build_vocabulary(lvis, [stuff])
    assert vocab.names == ["cat", "table", "grass"]
    assert vocab.classes[1].synonyms == ("table", "desk")
    assert vocab.stuff_to_class == {92: 3, 165: 2, 183: 0}


def test_several_stuff_files_are_united_and_must_agree(tmp_path):
    lvis = write_json(tmp_path / "lvis.json", {"categories": LVIS_CATS})
    first = write_json(tmp_path / "stuff_a.json", {"categories": STUFF_CATS[:1]})
    second = write_json(tmp_path / "stuff_b.json", {"categories": STUFF_CATS})
    assert build_vocabulary(lvis, [first, second]).num_classes == 3
    bad = write_json(tmp_path / "stuff_c.json", {"categories": [{"id": 92, "name": "gras"}]})
    with pytest.raises(EmbsegError) as info:
        build_vocabulary(lvis, [second, bad])
    message = str(info.value)
    assert "stuff_b.json" in message and "stuff_c.json" in message and "92" in message
    assert "\n" not in message


def test_stuff_category_outside_range_is_an_error(tmp_path):
    lvis = write_json(tmp_path / "lvis.json", {"categories": LVIS_CATS})
    stuff = write_json(tmp_path / "stuff.json", {"categories": [{"id": 12, "name": "x"}]})
    with pytest.raises(EmbsegError, match=r"stuff\.json.*category id 12 "):
        build_vocabulary(lvis, [stuff])


@pytest.mark.parametrize("content, pattern", [
    (None, "file not found"),
    ("", "file is empty"),
    ("  \n", "file is empty"),
    ('{"categories": [', r"malformed JSON at line 1 column 17"),
    ('{"images": []}', "no 'categories'"),
    ("42", "top level is int"),
    ('{"categories": [{"id": 1}]}', "category id 1 has no name"),
    ('{"categories": [{"id": 1, "name": "a"}, {"id": 1, "name": "b"}]}', "appears twice"),
])
def test_bad_category_files(tmp_path, content, pattern):
    path = tmp_path / "bad.json"
    if content is not None:
        path.write_text(content)
    with pytest.raises(EmbsegError, match=pattern) as info:
        read_categories(path)
    assert str(path) in str(info.value)


def test_lvis_ids_must_be_contiguous_and_frequencies_valid():
    with pytest.raises(EmbsegError, match="id 2 is missing"):
        merge_vocabulary([{"id": 1, "name": "a"}, {"id": 3, "name": "b"}], [])
    with pytest.raises(EmbsegError, match="frequency 'x'"):
        merge_vocabulary([{"id": 1, "name": "a", "frequency": "x"}], [])


def test_cli_vocab_writes_parquet_and_prints_one_line(tmp_path, capsys):
    lvis = write_json(tmp_path / "lvis.json", {"images": [], "annotations": [],
                                               "categories": LVIS_CATS})
    stuff = write_json(tmp_path / "stuff.json", {"images": [], "annotations": [],
                                                 "categories": STUFF_CATS})
    out = tmp_path / "classes.parquet"
    assert main(["vocab", "--lvis", str(lvis), "--coco-stuff", str(stuff),
                 "--out", str(out)]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert len(lines) == 1
    assert "3 classes" in lines[0] and "1 merged pairs" in lines[0] and "table" in lines[0]
    assert Vocabulary.read_parquet(out).names == ["cat", "table", "grass"]


def test_cli_vocab_bad_input_is_one_line_and_exit_2(tmp_path):
    stuff = write_json(tmp_path / "stuff.json", {"categories": STUFF_CATS})
    missing = tmp_path / "nope.json"
    proc = subprocess.run(
        [sys.executable, "-m", "embseg", "vocab", "--lvis", str(missing), "--coco-stuff",
         str(stuff), "--out", str(tmp_path / "c.parquet")],
        capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == [f"embseg: error: {missing}: file not found"]
    assert not (tmp_path / "c.parquet").exists()
