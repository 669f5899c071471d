"""Repeat-factor sampling: the LVIS formulas against an independent computation, the per-epoch
counts, and the training loader's epochs with repeats."""

from __future__ import annotations

import math
from collections import Counter
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from shardutil import colour_sample, write_shards

from embseg.data import train_loader
from embseg.errors import EmbsegError
from embseg.sampling import (
    REPEAT_INDEX,
    class_image_fractions,
    class_repeat_factor,
    epoch_repeats,
    image_repeat_factor,
    repeat_factors,
    repeat_samples,
)

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _manifest(path: Path, rows: list[tuple[str, str, list[int]]]) -> Path:
    table = pa.Table.from_pylist(
        [{"split": "train", "key": key, "shard": "train-000000.tar", "status": status,
          "reason": None if status == "ok" else "x", "class_ids": classes}
         for key, status, classes in rows],
        schema=pa.schema([("split", pa.string()), ("key", pa.string()), ("shard", pa.string()),
                          ("status", pa.string()), ("reason", pa.string()),
                          ("class_ids", pa.list_(pa.int32()))]))
    pq.write_table(table, path)
    return path


def _reference_factors(rows: list[tuple[str, str, list[int]]], t: float) -> dict[str, float]:
    """The paper's rule written independently: an image x class incidence matrix in numpy."""
    ok = [(key, classes) for key, status, classes in rows if status == "ok"]
    class_ids = sorted({c for _, classes in ok for c in classes})
    column = {c: j for j, c in enumerate(class_ids)}
    incidence = np.zeros((len(ok), len(class_ids)), dtype=bool)
    for i, (_, classes) in enumerate(ok):
        incidence[i, [column[c] for c in classes]] = True
    f = incidence.mean(axis=0)
    r = np.maximum(1.0, np.sqrt(t / f))
    return {key: float(np.max(r[incidence[i]], initial=1.0)) for i, (key, _) in enumerate(ok)}


def test_hand_computed_example(tmp_path):
    # 4 ok images: class 1 in all of them, class 2 in one, class 3 in two; plus a failed row
    rows = [("a", "ok", [1, 2]), ("b", "ok", [1, 3]), ("c", "ok", [1, 3, 3]), ("d", "ok", [1]),
            ("e", "ok", []), ("f", "failed", [2])]
    assert class_image_fractions([c for _, s, c in rows if s == "ok"]) == {
        1: 0.8, 2: 0.2, 3: 0.4}
    factors = repeat_factors(_manifest(tmp_path / "m.parquet", rows), 0.8)
    # r(1) = 1, r(2) = sqrt(0.8 / 0.2) = 2, r(3) = sqrt(2); e has no class: 1; f is not ok
    assert factors == pytest.approx({"a": 2.0, "b": math.sqrt(2), "c": math.sqrt(2),
                                     "d": 1.0, "e": 1.0})


def test_repeat_factors_match_an_independent_computation(tmp_path):
    rng = np.random.default_rng(7)
    # a long tail: class c appears in an image with probability ~ 1 / c
    rows = []
    for i in range(300):
        classes = [c for c in range(1, 120) if rng.random() < 0.8 / c]
        status = "ok" if rng.random() > 0.05 else rng.choice(["failed", "skipped"])
        rows.append((f"{i:012d}", str(status), classes))
    manifest = _manifest(tmp_path / "manifest.parquet", rows)
    for t in (0.001, 0.01, 0.3):
        got = repeat_factors(manifest, t)
        want = _reference_factors(rows, t)
        assert got.keys() == want.keys()
        assert [got[k] for k in want] == pytest.approx([want[k] for k in want], rel=1e-12)
    assert max(repeat_factors(manifest, 0.3).values()) > 5  # the tail is repeated


def test_the_small_formulas():
    assert class_repeat_factor(0.5, 0.001) == 1.0  # frequent: never below 1
    assert class_repeat_factor(0.0001, 0.001) == pytest.approx(math.sqrt(10))
    with pytest.raises(ValueError):
        class_repeat_factor(0.0, 0.001)
    assert image_repeat_factor([], {1: 3.0}) == 1.0
    assert image_repeat_factor([1, 2], {1: 3.0, 2: 1.5}) == 3.0


def test_manifest_problems_are_one_line_errors(tmp_path):
    with pytest.raises(EmbsegError, match=r"nowhere\.parquet: manifest missing"):
        repeat_factors(tmp_path / "nowhere.parquet", 0.001)
    old = tmp_path / "old.parquet"
    pq.write_table(pa.table({"key": ["a"], "status": ["ok"]}), old)
    with pytest.raises(EmbsegError, match=r"old\.parquet: manifest has no column 'class_ids'"):
        repeat_factors(old, 0.001)
    twice = _manifest(tmp_path / "twice.parquet", [("a", "ok", [1]), ("a", "ok", [2])])
    with pytest.raises(EmbsegError, match=r"twice\.parquet: key a: listed twice"):
        repeat_factors(twice, 0.001)
    (tmp_path / "bad.parquet").write_bytes(b"not parquet")
    with pytest.raises(EmbsegError, match=r"bad\.parquet: manifest unreadable"):
        repeat_factors(tmp_path / "bad.parquet", 0.001)
    for threshold in (0, -1.0, float("nan")):
        with pytest.raises(EmbsegError, match="repeat threshold must be a number > 0"):
            repeat_factors(twice, threshold)


def test_epoch_repeats_floor_plus_a_fractional_draw():
    keys = [f"{i:012d}" for i in range(20_000)]
    for r in (1.0, 2.0, 2.3, 1.75):
        counts = np.array([epoch_repeats(r, seed=3, epoch=0, key=k) for k in keys])
        whole, frac = math.floor(r), r - math.floor(r)
        assert set(np.unique(counts)) <= {whole, whole + 1}
        # the extra copy comes with probability frac: within 5 binomial standard deviations
        share = float(np.mean(counts == whole + 1))
        assert abs(share - frac) <= 5 * math.sqrt(max(frac * (1 - frac), 1e-12) / len(keys))
    with pytest.raises(ValueError):
        epoch_repeats(0.5, seed=0, epoch=0, key="a")


def test_epoch_repeats_are_a_function_of_seed_epoch_and_key():
    keys = [f"k{i}" for i in range(2000)]

    def draw(seed, epoch, order=keys):
        return {k: epoch_repeats(2.5, seed=seed, epoch=epoch, key=k) for k in order}

    first = draw(0, 0)
    assert draw(0, 0, order=list(reversed(keys))) == first  # order does not matter
    assert draw(0, 0) == first
    # another epoch or seed draws afresh: about half the keys change (2 * 0.5 * 0.5)
    for other in (draw(0, 1), draw(1, 0)):
        changed = sum(first[k] != other[k] for k in keys) / len(keys)
        assert 0.4 < changed < 0.6


def test_repeat_samples_copies_and_passes_markers_through():
    marker = object()
    stream = [{"__key__": "a", "jpg": b"x"}, marker, {"__key__": "b"}, {"__key__": "new"}]
    out = list(repeat_samples(stream, {"a": 3.0, "b": 1.0}, seed=0, epoch=0))
    assert [item if item is marker else (item["__key__"], item[REPEAT_INDEX]) for item in out] \
        == [("a", 0), ("a", 1), ("a", 2), marker, ("b", 0), ("new", 0)]
    assert out[0]["jpg"] is stream[0]["jpg"]  # shallow copies: the bytes are shared
    assert list(repeat_samples(stream, None, seed=0, epoch=0)) == stream


@pytest.fixture(scope="module")
def skewed_shards(tmp_path_factory) -> Path:
    """16 images listed with class 1, four of them with class 7 too: f(7) = 1/4, so t = 1
    gives those four the factor sqrt(4) = 2 and the others 1."""
    root = tmp_path_factory.mktemp("rfs-shards")
    samples = [colour_sample(i, height=24, width=24, num_classes=7) for i in range(16)]
    write_shards(root, samples, num_classes=7, shard_size=6)
    table = pq.read_table(root / "manifest.parquet").to_pylist()
    for index, row in enumerate(table):
        row["class_ids"] = [1, 7] if index < 4 else [1]
    pq.write_table(pa.Table.from_pylist(table), root / "manifest.parquet")
    return root


def test_the_loader_shows_each_image_its_count_per_epoch(skewed_shards):
    factors = repeat_factors(skewed_shards / "manifest.parquet", 1.0)
    assert sorted(set(factors.values())) == pytest.approx([1.0, 2.0])
    for epoch in (0, 1):
        want = Counter({k: epoch_repeats(factors[k], seed=4, epoch=epoch, key=k)
                        for k in factors})
        assert sum(want.values()) == 16 + 4  # four images twice, the rest once
    loader = train_loader(skewed_shards, num_classes=7, batch_size=1, crop_size=16, seed=4,
                          num_workers=0, shuffle_buffer=8, repeat_threshold=1.0)
    epoch0 = [next(loader) for _ in range(20)]
    epoch1_start = next(loader)
    loader.close()
    assert Counter(b.keys[0] for b in epoch0) == Counter(
        {k: epoch_repeats(factors[k], seed=4, epoch=0, key=k) for k in factors})
    assert loader.state().streams[0].epoch == 1 and epoch1_start.keys
    # the two copies of a repeated image are augmented independently
    twice = [k for k, r in factors.items() if r == 2.0][0]
    copies = [b.image for b in epoch0 if b.keys[0] == twice]
    assert len(copies) == 2 and not torch.equal(copies[0], copies[1])
