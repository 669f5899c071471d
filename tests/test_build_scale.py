"""The build at scale (issue 14): masks painted from their runs equal the official full-image
masks, the JSON index, digest-based unchanged rebuilds, worker-written shards, a source of
another kind through the same build, a worker crash, and shards on an S3-compatible store."""

from __future__ import annotations

import json
import os
import pickle
import shutil
import subprocess
import sys
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pycocotools.mask as mask_utils
import pytest
from annotation_files import (
    LVIS_CATEGORIES,
    STUFF_CATEGORIES,
    lvis_image,
    rle_ann,
    stuff_image,
    write_annotations,
    write_image,
)
from lvis import LVIS
from PIL import Image
from pycocotools.coco import COCO

from embseg import rle
from embseg.annotations import LvisCocoStuffSource, load_build_inputs
from embseg.build import (
    OutputFolder,
    build_shards,
    last_build_hash,
    plan_build,
    write_shard,
)
from embseg.buildsource import PlannedImage, SourcePlan
from embseg.errors import EmbsegError
from embseg.jsonindex import index_json_file
from embseg.labels import (
    ImageResult,
    class_pixel_counts,
    decode_label_png,
    encode_label_png,
    process_image,
)
from embseg.synth import generate_synthetic
from embseg.vocab import VocabClass, Vocabulary

SHARD_SIZE = 6


# ------------------------------------------------------------------ runs and painting


def _expand_runs(counts, height, width) -> np.ndarray:
    """A mask from COCO run lengths, written here: alternate 0/1 runs, column-major."""
    flat = np.repeat(np.arange(len(counts)) % 2, counts).astype(bool)
    return flat.reshape(width, height).T


@pytest.mark.parametrize("seed", range(4))
def test_decode_counts_matches_pycocotools(seed):
    rng = np.random.default_rng(seed)
    height, width = int(rng.integers(1, 40)), int(rng.integers(1, 40))
    for density in (0.0, 0.05, 0.5, 0.95, 1.0):
        mask = rng.random((height, width)) < density
        encoded = mask_utils.encode(np.asfortranarray(mask.astype(np.uint8)))
        status, runs = rle.decode_counts(encoded["counts"], height, width)
        assert status == rle.COUNTS_OK
        np.testing.assert_array_equal(_expand_runs(runs, height, width), mask)
        assert rle.encode_counts(runs) == encoded["counts"]
        assert rle.runs_area(runs) == int(mask.sum())


def test_decode_counts_refuses_what_pycocotools_would_misread():
    mask = np.zeros((4, 6), dtype=np.uint8)
    mask[1:3, 2:5] = 1
    good = mask_utils.encode(np.asfortranarray(mask))["counts"]
    assert rle.decode_counts(good, 4, 6)[0] == rle.COUNTS_OK
    assert rle.decode_counts(good, 4, 7)[0] == rle.COUNTS_SHORT
    assert rle.decode_counts(good, 4, 5)[0] == rle.COUNTS_LONG
    assert rle.decode_counts(good + b"\x7f", 4, 6)[0] == rle.COUNTS_MALFORMED
    assert rle.decode_counts(b"0" * 3 + b"P", 4, 6)[0] == rle.COUNTS_MALFORMED  # "more" at end
    # a zero-length run in the middle decodes to the same pixels but is not canonical
    status, _ = rle.decode_counts(rle.encode_counts(np.array([6, 2, 0, 0, 2, 14])), 4, 6)
    assert status == rle.COUNTS_NOT_CANONICAL


def _reference_label(height, width, lvis_masks, stuff_masks, overlap):
    """Per pixel, independently of the library: the first LVIS mask (file order, or by area
    with ties in file order) that covers it, else the first stuff mask, else 0."""
    order = list(range(len(lvis_masks)))
    if overlap == "smaller":
        order.sort(key=lambda i: (int(lvis_masks[i][1].sum()), i))
    label = np.zeros((height, width), dtype=np.uint16)
    done = np.zeros((height, width), dtype=bool)
    for class_id, mask in [lvis_masks[i] for i in order] + list(stuff_masks):
        for y, x in zip(*np.nonzero(mask & ~done), strict=True):
            label[y, x] = class_id
        done |= mask
    return label


def _random_polygon(rng, height, width):
    cx, cy = rng.uniform(-2, width + 2), rng.uniform(-2, height + 2)
    radius = rng.uniform(1, max(height, width) / 2)
    angles = np.sort(rng.uniform(0, 2 * np.pi, size=int(rng.integers(3, 12))))
    xs = np.clip(cx + radius * np.cos(angles), 0, width)
    ys = np.clip(cy + radius * np.sin(angles), 0, height)
    return [round(float(v), 2) for pair in zip(xs, ys, strict=True) for v in pair]


@pytest.mark.parametrize("overlap", ["first", "smaller"])
@pytest.mark.parametrize("seed", range(3))
def test_painting_from_runs_equals_official_full_image_masks(tmp_path, seed, overlap):
    """Polygons (one or several parts, at the borders, tiny), compressed and uncompressed
    RLEs: the label map equals the official full-image masks (``LVIS.ann_to_mask``,
    ``COCO.annToMask``) painted by the reference painter above."""
    rng = np.random.default_rng(seed)
    height, width = int(rng.integers(30, 60)), int(rng.integers(30, 60))
    lvis_anns = []
    for ann_id in range(1, 15):
        if rng.random() < 0.7:
            parts = [_random_polygon(rng, height, width) for _ in range(int(rng.integers(1, 3)))]
            lvis_anns.append({"id": ann_id, "image_id": 1, "category_id": int(rng.integers(1, 5)),
                              "segmentation": parts, "area": 1.0, "bbox": [0, 0, 1, 1]})
        else:
            mask = rng.random((height, width)) < rng.uniform(0.01, 0.3)
            lvis_anns.append(rle_ann(ann_id, 1, int(rng.integers(1, 5)), mask,
                                     compressed=bool(rng.integers(2))))
    stuff_anns = []
    for ann_id in range(100, 106):
        top, left = int(rng.integers(0, height)), int(rng.integers(0, width))
        mask = np.zeros((height, width), dtype=bool)
        mask[top:top + int(rng.integers(1, height)), left:left + int(rng.integers(1, width))] = 1
        stuff_anns.append(rle_ann(ann_id, 1, int(rng.choice([92, 93, 165, 168, 183])), mask,
                                  compressed=bool(rng.integers(2))))
    root = tmp_path / "images"
    write_image(root / "train2017" / "000000000001.jpg", width, height)
    lvis_path = write_annotations(tmp_path / "lvis.json", [lvis_image(1, width, height)],
                                  lvis_anns, LVIS_CATEGORIES)
    stuff_path = write_annotations(tmp_path / "stuff.json", [stuff_image(1, width, height)],
                                   stuff_anns, STUFF_CATEGORIES)
    (item,) = load_build_inputs(lvis_path, [stuff_path], root).items
    result = process_image(item, root, overlap=overlap)
    assert result.status == "ok", result.reason

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        official_lvis = LVIS(str(lvis_path))
        official_stuff = COCO(str(stuff_path))
        lvis_masks = [(ann["category_id"], official_lvis.ann_to_mask(ann).astype(bool))
                      for ann in official_lvis.dataset["annotations"]]
        stuff_class = {92: 5, 93: 6, 165: 2, 168: 4, 183: 0}
        stuff_masks = [(stuff_class[ann["category_id"]], official_stuff.annToMask(ann) > 0)
                       for ann in official_stuff.dataset["annotations"]]
    expected = _reference_label(height, width, lvis_masks, stuff_masks, overlap)
    np.testing.assert_array_equal(decode_label_png(result.seg_png), expected)
    ids, counts = class_pixel_counts(expected)
    assert (result.class_ids, result.pixel_counts) == (ids, counts)


def test_label_png_bytes_are_fixed():
    """The PNG settings give the same bytes for the same map (and any reader the same map)."""
    label = (np.arange(48 * 64, dtype=np.uint16).reshape(48, 64) // 97) * 41
    data = encode_label_png(label)
    assert data == encode_label_png(label.copy()) and data[:8] == b"\x89PNG\r\n\x1a\n"
    np.testing.assert_array_equal(decode_label_png(data), label)


# ------------------------------------------------------------------ the JSON index


def test_json_index_spans_and_whitespace_blind_hashes(tmp_path):
    data = {"info": {"x": [1, {"y": "]}"}]}, "images": [{"id": 1, "s": "a\"b\\\\"}, {"id": 2}],
            "annotations": [{"id": 5, "segmentation": [[1.5, 2, 3.25, 4, 5, 6]]}, 7, "z"],
            "categories": []}
    compact = tmp_path / "compact.json"
    compact.write_text(json.dumps(data, separators=(",", ":")))
    spaced = tmp_path / "spaced.json"
    spaced.write_text(json.dumps(data, indent=3))
    a, b = index_json_file(compact), index_json_file(spaced)
    assert a.kinds == {"info": "object", "images": "array", "annotations": "array",
                       "categories": "array"}
    raw = compact.read_bytes()
    for key in ("images", "annotations", "categories"):
        spans = a.arrays[key]
        assert [json.loads(raw[o:o + n]) for o, n in zip(
            spans.offsets.tolist(), spans.lengths.tolist(), strict=True)] == data[key]
        assert a.arrays[key].hashes.tolist() == b.arrays[key].hashes.tolist()
    data["annotations"][0]["segmentation"][0][2] = 3.5
    compact.write_text(json.dumps(data, separators=(",", ":")))
    changed = index_json_file(compact).arrays["annotations"].hashes.tolist()
    assert changed[0] != b.arrays["annotations"].hashes[0] and changed[1:] == \
        b.arrays["annotations"].hashes.tolist()[1:]


@pytest.mark.parametrize("text, pattern", [
    ('{"images": [1, 2', r"line 1 column 17 \(character 16\): the file ends inside"),
    ('{"a": 1}\n x', r"line 2 column 2 \(character 10\): extra data"),
    ('{"a": [1,, 2]}', r"line 1 column 10 \(character 9\): misplaced"),
    ('{"a": [1, 2,]}', "misplaced"),
    ('{"a" 1}', "expected a quoted key"),
    ('{"é": [}', r"line 1 column 8 \(character 7\): a bracket closes"),
])
def test_json_index_names_where_the_json_breaks(tmp_path, text, pattern):
    path = tmp_path / "bad.json"
    path.write_text(text, encoding="utf-8")
    with pytest.raises(EmbsegError, match=pattern) as info:
        index_json_file(path)
    assert str(path) in str(info.value) and "malformed JSON at" in str(info.value)


# ------------------------------------------------------------------ builds


@pytest.fixture(scope="module")
def synth(tmp_path_factory):
    return generate_synthetic(tmp_path_factory.mktemp("scale") / "synth", images=18,
                              val_images=1, lvis_classes=12, seed=3, size=64)


def _kwargs(synth, out, **extra) -> dict:
    return {"lvis": synth.lvis_train, "coco_stuff": [synth.stuff_train],
            "images": synth.images_root, "out": out, "shard_size": SHARD_SIZE,
            "progress": False, **extra}


def _shards(out: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(out.glob("train-[0-9]*.tar"))}


def test_unchanged_rebuild_checks_file_digests_and_image_stats_only(synth, ray_local, tmp_path,
                                                                   monkeypatch):
    images = tmp_path / "images"
    shutil.copytree(synth.images_root, images)
    lvis = tmp_path / "lvis.json"
    shutil.copy(synth.lvis_train, lvis)
    kwargs = {**_kwargs(synth, tmp_path / "out"), "images": images, "lvis": lvis}
    plan_args = {k: v for k, v in kwargs.items() if k != "progress"}
    first = build_shards(**kwargs)
    before = _shards(tmp_path / "out")
    assert (tmp_path / "out" / ".parts" / "train.plan.npz").is_file()

    def no_parsing(self):
        raise AssertionError("an unchanged rebuild parsed the annotation files")

    with monkeypatch.context() as patch:
        patch.setattr(LvisCocoStuffSource, "plan", no_parsing)
        plan = plan_build(**plan_args)
        assert plan.from_cache and plan.input_hash == first.input_hash
        again = build_shards(**kwargs)
        assert again.reused_shards == len(before) == 3 and _shards(tmp_path / "out") == before
        # the annotation file touched, its bytes unchanged: still no parsing, all reused
        stat = lvis.stat()
        os.utime(lvis, ns=(stat.st_atime_ns, stat.st_mtime_ns + 10**9))
        assert build_shards(**kwargs).reused_shards == 3
        # an image rewritten (new bytes, new stat): only its shard is rebuilt
        changed = plan.images[SHARD_SIZE + 1]
        with Image.open(images / changed.rel_path) as old:
            size = old.size
        write_image(images / changed.rel_path, *size, seed=99)
        assert Path(changed.stat_paths[0]) == images / changed.rel_path
        partly = build_shards(**kwargs)
        assert partly.reused_shards == 2
        after = _shards(tmp_path / "out")
        assert after["train-000001.tar"] != before["train-000001.tar"]
        assert {k: v for k, v in after.items() if k != "train-000001.tar"} == \
            {k: v for k, v in before.items() if k != "train-000001.tar"}
    # other annotation bytes: the file is parsed again
    data = json.loads(lvis.read_text())
    data["annotations"][0]["category_id"] = 1 if data["annotations"][0]["category_id"] != 1 else 2
    lvis.write_text(json.dumps(data))
    assert not plan_build(**plan_args).from_cache


def test_workers_write_the_shards_and_return_no_image_bytes(synth, tmp_path):
    """The shard task (run here in-process) writes the tar and its record itself; what it
    returns is the manifest rows and the tar's identity, none of the images' bytes."""
    out = tmp_path / "out"
    OutputFolder(out).makedirs()
    plan = plan_build(**{k: v for k, v in _kwargs(synth, out).items() if k != "progress"})
    from embseg.build import _target

    shard = plan.shards[0]
    done = write_shard(plan.source.work(shard.start, shard.stop), _target(plan, shard))
    tar = out / shard.name
    assert tar.is_file() and done.size == tar.stat().st_size > 0
    assert not [p for p in out.iterdir() if p.name.endswith(".partial")]
    record = pq.read_table(out / ".parts" / "train-000000.parquet")
    assert record.schema.metadata[b"embseg.input_digest"].decode() == shard.input_digest
    assert done.rows.column("key").to_pylist() == [i.key for i in plan.images[:SHARD_SIZE]]
    returned = pickle.dumps(done)
    for image in plan.images[:SHARD_SIZE]:  # no image's bytes travel back to the driver
        assert Path(image.stat_paths[0]).read_bytes()[:4000] not in returned
    assert len(returned) < 0.1 * done.size


def test_shards_are_the_same_for_any_worker_count_and_shard_task_order(synth, ray_local,
                                                                        tmp_path):
    """Two local Ray CPUs (in-process) and a 1-CPU Ray in a subprocess, and shard sizes that
    leave a short last shard: byte-identical shards and manifests."""
    two = build_shards(**_kwargs(synth, tmp_path / "two", shard_size=4))
    env = {**os.environ, "RAY_USAGE_STATS_ENABLED": "0"}
    done = subprocess.run(
        [sys.executable, "-m", "embseg", "build", "--lvis", str(synth.lvis_train),
         "--coco-stuff", str(synth.stuff_train), "--images", str(synth.images_root),
         "--out", str(tmp_path / "one"), "--shard-size", "4", "--workers", "1",
         "--no-progress"], capture_output=True, text=True, env=env, timeout=300)
    assert done.returncode == 0, done.stderr
    assert len(two.shards) == 5 and _shards(tmp_path / "one") == _shards(tmp_path / "two")
    assert pq.read_table(tmp_path / "one" / "manifest.parquet").to_pylist() == \
        pq.read_table(tmp_path / "two" / "manifest.parquet").to_pylist()


# ------------------------------------------------------------------ another source kind


@dataclass
class ToyWork:
    """Square label maps whose value is the image number; image ``crash`` kills its worker."""

    numbers: list[int]
    crash: int | None = None

    def __len__(self) -> int:
        return len(self.numbers)

    def process(self, index: int) -> ImageResult:
        number = self.numbers[index]
        if number == self.crash:
            os._exit(3)  # a decoder that takes its process down
        label = np.full((8, 8), number % 3 + 1, dtype=np.uint16)
        ids, counts = class_pixel_counts(label)
        return ImageResult(image_id=number, key=f"toy{number:04d}", status="ok",
                           jpg=b"not really a jpeg " + bytes([number]),
                           seg_png=encode_label_png(label), meta={"n": number},
                           class_ids=ids, pixel_counts=counts)


@dataclass(frozen=True)
class ToySource:
    """A minimal :class:`embseg.buildsource.BuildSource` of another kind."""

    index_file: Path
    crash: int | None = None
    kind: str = "toy"

    def input_files(self) -> list[Path]:
        return [self.index_file]

    def options(self) -> dict:
        return {"crash": self.crash}

    def plan(self) -> SourcePlan:
        numbers = [int(n) for n in self.index_file.read_text().split()]
        vocab = Vocabulary(classes=tuple(VocabClass(id=i, name=f"c{i}", source="lvis",
                                                    lvis_id=i, coco_stuff_id=None,
                                                    frequency="f") for i in (1, 2, 3)))
        images = [PlannedImage(key=f"toy{n:04d}", image_id=n, file_name=f"{n}.toy",
                               rel_path=f"{n}.toy", stat_paths=(), digest=str(n).encode())
                  for n in numbers]
        return SourcePlan(vocab=vocab, images=images,
                          work=lambda a, b: ToyWork(numbers[a:b], self.crash))

    def plan_from_arrays(self, arrays):
        return None


def test_another_source_kind_and_a_crashing_image(ray_local, tmp_path):
    """The build is format-independent; an image that kills its worker (even after Ray's
    retries) is found by per-image probes and recorded as failed, the rest of its shard
    built as usual."""
    ray_local.cloudpickle.register_pickle_by_value(sys.modules[__name__])
    index = tmp_path / "index.txt"
    index.write_text("1 2 3 4 5 6 7")
    report = build_shards(source=ToySource(index, crash=5), out=tmp_path / "out", shard_size=3,
                          progress=False, allow_failures=True)
    rows = {r["key"]: r for r in pq.read_table(tmp_path / "out" / "manifest.parquet").to_pylist()}
    assert report.n_images == 7 and report.n_failed == 1 and report.n_ok == 6
    assert rows["toy0005"]["status"] == "failed"
    assert "crashed its worker" in rows["toy0005"]["reason"]
    assert rows["toy0004"]["status"] == rows["toy0006"]["status"] == "ok"
    build_shards(source=ToySource(index), out=tmp_path / "clean", shard_size=3,
                         progress=False)
    assert _shards(tmp_path / "out")["train-000000.tar"] == \
        _shards(tmp_path / "clean")["train-000000.tar"]


# ------------------------------------------------------------------ object store


@pytest.mark.parametrize("store", ["s3_bucket", "gcs_bucket"])
def test_build_to_an_object_store_prefix(synth, ray_local, store, request, tmp_path):
    """``embseg build --out s3://bucket/prefix`` (moto) and ``gs://bucket/prefix`` (the GCS
    emulator), each with its own Ray started after the server: the same shard bytes and
    manifest as a local build; a rerun reuses every shard."""
    bucket = request.getfixturevalue(store)
    local = build_shards(**_kwargs(synth, tmp_path / "local"))
    url = f"{bucket.url}/shards/train"
    env = {**os.environ, **bucket.server.env, "RAY_USAGE_STATS_ENABLED": "0"}
    argv = [sys.executable, "-m", "embseg", "build", "--lvis", str(synth.lvis_train),
            "--coco-stuff", str(synth.stuff_train), "--images", str(synth.images_root),
            "--out", url, "--shard-size", str(SHARD_SIZE), "--workers", "2", "--no-progress"]
    for expected in ("(3 written, 0 reused)", "(0 written, 3 reused)"):
        done = subprocess.run(argv, capture_output=True, text=True, env=env, timeout=300)
        assert done.returncode == 0, done.stderr
        assert expected in done.stdout
    fs = bucket.server.filesystem()
    prefix = url.split("://", 1)[1]
    names = sorted(name for name in (p.rsplit("/", 1)[-1] for p in fs.ls(prefix, detail=False))
                   if not name.startswith("."))
    assert names == ["build_info.json", "classes.parquet", "manifest.parquet",
                     "train-000000.tar", "train-000001.tar", "train-000002.tar"]
    for path in local.shards:
        assert fs.cat_file(f"{prefix}/{Path(path).name}") == Path(path).read_bytes()
    assert fs.cat_file(f"{prefix}/manifest.parquet") and \
        fs.cat_file(f"{prefix}/classes.parquet") == (tmp_path / "local" /
                                                     "classes.parquet").read_bytes()
    assert not [n for n in fs.find(prefix) if n.endswith(".partial")]
    assert last_build_hash(url, "train") == local.input_hash


def test_an_annotation_file_changed_after_planning_stops_the_build(synth, ray_local, tmp_path):
    """The workers read the annotations back by their planned byte spans: a file that changed
    since the plan is a one-line error, never shards painted from shifted bytes."""
    from embseg.build import execute_plan

    lvis = tmp_path / "lvis.json"
    shutil.copy(synth.lvis_train, lvis)
    kwargs = {k: v for k, v in _kwargs(synth, tmp_path / "out").items() if k != "progress"}
    plan = plan_build(**{**kwargs, "lvis": lvis})
    data = json.loads(lvis.read_text())
    lvis.write_text(json.dumps(data, indent=1))  # same content, other byte offsets
    with pytest.raises(EmbsegError, match="changed after the build was planned") as info:
        execute_plan(plan, progress=False)
    assert str(lvis) in str(info.value) and "\n" not in str(info.value)
    assert not list((tmp_path / "out").glob("train-*.tar"))


def test_a_copied_shard_folder_is_reused_after_one_check_of_its_bytes(synth, ray_local,
                                                                     tmp_path):
    """Copied without mtimes, every shard's stamp differs: its recorded size and sha256 still
    match, so it is reused (and its record takes the new stamp); a shard damaged in the copy
    is rebuilt."""
    first = build_shards(**_kwargs(synth, tmp_path / "out"))
    shutil.copytree(tmp_path / "out", tmp_path / "copy", copy_function=shutil.copyfile)
    damaged = tmp_path / "copy" / "train-000002.tar"
    data = bytearray(damaged.read_bytes())
    data[700] ^= 0xFF
    damaged.write_bytes(bytes(data))
    again = build_shards(**_kwargs(synth, tmp_path / "copy"))
    assert again.reused_shards == len(first.shards) - 1
    assert _shards(tmp_path / "copy") == _shards(tmp_path / "out")
    record = pq.read_table(tmp_path / "copy" / ".parts" / "train-000000.parquet")
    stat = (tmp_path / "copy" / "train-000000.tar").stat()
    assert record.schema.metadata[b"embseg.tar_stamp"].decode() == \
        f"{stat.st_size}:{stat.st_mtime_ns}"
