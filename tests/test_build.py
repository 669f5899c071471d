"""The shard build: format, determinism, manifest, vocabulary, exit codes and bad input."""

from __future__ import annotations

import io
import json
import os
import shutil
import subprocess
import sys
import tarfile
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import webdataset as wds
from PIL import Image

from embseg.annotations import load_build_inputs
from embseg.build import build_shards, execute_plan, last_build_hash, plan_build
from embseg.cli import main
from embseg.labels import process_image
from embseg.synth import generate_synthetic
from embseg.vocab import Vocabulary, build_vocabulary

N_TRAIN, N_VAL, SHARD_SIZE = 24, 6, 8


@pytest.fixture(scope="module")
def synth(tmp_path_factory):
    return generate_synthetic(tmp_path_factory.mktemp("build") / "synth", images=N_TRAIN,
                              val_images=N_VAL, lvis_classes=20, seed=1, size=64)


def _args(synth, out: Path, *extra: str, images: Path | None = None,
          lvis: Path | None = None) -> list[str]:
    return ["build", "--lvis", str(lvis or synth.lvis_train), "--coco-stuff",
            str(synth.stuff_train), "--coco-stuff", str(synth.stuff_val), "--images",
            str(images or synth.images_root), "--out", str(out), "--shard-size",
            str(SHARD_SIZE), "--no-progress", *extra]


def _kwargs(synth, out: Path, **extra) -> dict:
    return dict(lvis=synth.lvis_train, coco_stuff=[synth.stuff_train, synth.stuff_val],
                images=synth.images_root, out=out, shard_size=SHARD_SIZE, **extra)


@pytest.fixture(scope="module")
def built(synth, ray_local, tmp_path_factory):
    out = tmp_path_factory.mktemp("build") / "shards"
    report = build_shards(**_kwargs(synth, out), progress=False)
    return out, report


def _shard_bytes(out: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(out.glob("*-[0-9][0-9][0-9][0-9][0-9][0-9].tar"))}


def _manifest(out: Path) -> list[dict]:
    return pq.read_table(out / "manifest.parquet").to_pylist()


def _lvis_image_ids(path: Path) -> list[int]:
    return sorted(img["id"] for img in json.loads(path.read_text())["images"])


def test_report_and_files(built):
    out, report = built
    assert report.n_images == N_TRAIN and report.n_failed == 0 and report.reused_shards == 0
    assert report.n_ok + report.n_skipped == N_TRAIN
    assert [p.name for p in report.shards] == ["train-000000.tar", "train-000001.tar",
                                               "train-000002.tar"]
    assert report.shard_bytes == [p.stat().st_size for p in report.shards]
    assert not [p for p in out.iterdir() if p.name.endswith(".partial")]
    info = json.loads((out / "build_info.json").read_text())
    assert info["split"] == "train" and info["input_hash"] == report.input_hash
    assert info["shards"] == [p.name for p in report.shards]
    assert info["n_images"] == N_TRAIN and "images_per_second" in info


def test_shard_format_read_back_with_webdataset(synth, built):
    out, report = built
    inputs = load_build_inputs(synth.lvis_train, [synth.stuff_train, synth.stuff_val],
                               synth.images_root)
    items = {item.key: item for item in inputs.items}
    samples = list(wds.WebDataset([str(p) for p in report.shards], shardshuffle=False))
    ok_keys = [row["key"] for row in _manifest(out) if row["status"] == "ok"]
    assert len(ok_keys) == report.n_ok > 0  # the loop below has samples to check
    assert [s["__key__"] for s in samples] == sorted(ok_keys) == ok_keys
    for sample in samples:
        item = items[sample["__key__"]]
        assert sample["__key__"] == f"{item.image_id:012d}"
        assert sample["jpg"] == (synth.images_root / item.rel_path).read_bytes()
        label = np.array(Image.open(io.BytesIO(sample["seg.png"])))
        assert label.dtype == np.uint16 and label.shape == (item.height, item.width)
        expected = process_image(item, synth.images_root)
        assert expected.status == "ok"
        assert np.array_equal(label, np.array(Image.open(io.BytesIO(expected.seg_png))))
        meta = json.loads(sample["json"])
        present = sorted(int(c) for c in np.unique(label) if c)
        assert meta == {"image_id": item.image_id, "height": item.height,
                        "width": item.width, "file_name": item.file_name,
                        "n_lvis": len(item.lvis_anns), "n_stuff": len(item.stuff_anns),
                        "classes": present}
    assert len(samples) == report.n_ok


def test_tar_headers_are_fixed_and_equal_a_tarfile_archive(built):
    """Members in key order (.jpg, .json, .seg.png), fixed headers; the bytes equal an archive
    that Python's tarfile writes from the same members and headers."""
    _, report = built
    for shard in report.shards:
        with tarfile.open(shard) as tar:
            members = [(m, tar.extractfile(m).read()) for m in tar.getmembers()]
        names = [m.name for m, _ in members]
        keys = sorted({n.split(".", 1)[0] for n in names})
        assert names == [f"{k}.{s}" for k in keys for s in ("jpg", "json", "seg.png")]
        for m, _ in members:
            assert (m.mtime, m.uid, m.gid, m.uname, m.gname, m.mode) == (0, 0, 0, "", "", 0o644)
            assert m.isreg()
        expected = io.BytesIO()
        with tarfile.open(fileobj=expected, mode="w", format=tarfile.USTAR_FORMAT) as tar:
            for m, data in members:
                info = tarfile.TarInfo(m.name)
                info.size, info.mtime, info.mode = len(data), 0, 0o644
                info.uid = info.gid = 0
                info.uname = info.gname = ""
                tar.addfile(info, io.BytesIO(data))
        assert shard.read_bytes() == expected.getvalue()
        for m, data in members:
            if m.name.endswith(".json"):
                assert data == json.dumps(json.loads(data), sort_keys=True,
                                          separators=(",", ":")).encode()


def test_manifest_lists_every_input_image(synth, built):
    out, report = built
    rows = _manifest(out)
    assert [row["image_id"] for row in rows] == _lvis_image_ids(synth.lvis_train)
    assert {row["split"] for row in rows} == {"train"}
    for index, row in enumerate(rows):
        assert row["key"] == f"{row['image_id']:012d}"
        assert row["shard"] == f"train-{index // SHARD_SIZE:06d}.tar"
        assert row["status"] in ("ok", "skipped", "failed")
        assert (row["reason"] is None) == (row["status"] == "ok")
        assert len(row["class_ids"]) == len(row["pixel_counts"])
    samples = {s["__key__"]: s for s in wds.WebDataset([str(p) for p in report.shards],
                                                         shardshuffle=False)}
    for row in rows:
        label = np.array(Image.open(io.BytesIO(samples[row["key"]]["seg.png"])))
        counts = np.bincount(label.ravel())
        ids = [i for i in range(1, len(counts)) if counts[i]]
        assert row["class_ids"] == ids and row["pixel_counts"] == [int(counts[i]) for i in ids]


def test_classes_parquet_matches_build_vocabulary(synth, built):
    out, _ = built
    expected = build_vocabulary(synth.lvis_train, [synth.stuff_train, synth.stuff_val])
    written = Vocabulary.read_parquet(out / "classes.parquet")
    assert written.classes == expected.classes
    assert written.content_hash() == expected.content_hash()
    assert any(c.source == "both" for c in written.classes)


def test_rebuild_is_byte_identical_and_reuses_shards(synth, built, tmp_path):
    out, report = built
    before = _shard_bytes(out)
    again = build_shards(**_kwargs(synth, out), progress=False)
    assert again.reused_shards == len(before) and _shard_bytes(out) == before
    assert again.input_hash == report.input_hash
    fresh = build_shards(**_kwargs(synth, tmp_path / "fresh"), progress=False)
    assert fresh.reused_shards == 0 and _shard_bytes(tmp_path / "fresh") == before
    assert _manifest(tmp_path / "fresh") == _manifest(out)


def test_one_worker_subprocess_gives_the_same_bytes(synth, built, tmp_path):
    """The console script with its own 1-CPU local Ray vs. the 2-CPU shared Ray in-process."""
    out, _ = built
    env = {**os.environ, "RAY_USAGE_STATS_ENABLED": "0"}
    argv = [sys.executable, "-m", "embseg", *_args(synth, tmp_path / "w1", "--workers", "1")]
    done = subprocess.run(argv, capture_output=True, text=True, env=env, timeout=180)
    assert done.returncode == 0, done.stderr
    assert "3 shards (3 written, 0 reused)" in done.stdout and "images/s" in done.stdout
    assert _shard_bytes(tmp_path / "w1") == _shard_bytes(out)


def test_changed_annotation_rebuilds_only_its_shard(synth, ray_local, tmp_path):
    out = tmp_path / "shards"
    first = build_shards(**_kwargs(synth, out), progress=False)
    before = _shard_bytes(out)
    data = json.loads(synth.lvis_train.read_text())
    last_image = max(img["id"] for img in data["images"])
    for ann in data["annotations"]:
        if ann["image_id"] == last_image:
            ann["category_id"] = 1 if ann["category_id"] != 1 else 2
    edited = tmp_path / "lvis_edited.json"
    edited.write_text(json.dumps(data))
    second = build_shards(**{**_kwargs(synth, out), "lvis": edited}, progress=False)
    assert second.input_hash != first.input_hash
    assert second.reused_shards == len(before) - 1
    after = _shard_bytes(out)
    assert after["train-000000.tar"] == before["train-000000.tar"]
    assert after["train-000002.tar"] != before["train-000002.tar"]


def test_last_build_hash(synth, ray_local, tmp_path):
    out = tmp_path / "shards"
    assert last_build_hash(out, "train") is None
    plan = plan_build(**_kwargs(synth, out))
    report = execute_plan(plan, progress=False)
    assert last_build_hash(out, "train") == plan.input_hash == report.input_hash
    assert last_build_hash(out, "val") is None
    assert plan_build(**_kwargs(synth, out)).input_hash == plan.input_hash
    assert plan_build(**_kwargs(synth, out, overlap="smaller")).input_hash != plan.input_hash
    # An image file touched (mtime) changes the hash; a missing shard voids the record.
    image = synth.images_root / plan.inputs.items[0].rel_path
    stat = image.stat()
    os.utime(image, ns=(stat.st_atime_ns, stat.st_mtime_ns + 10**9))
    try:
        assert plan_build(**_kwargs(synth, out)).input_hash != plan.input_hash
    finally:
        os.utime(image, ns=(stat.st_atime_ns, stat.st_mtime_ns))
    (out / "train-000001.tar").unlink()
    assert last_build_hash(out, "train") is None


def test_splits_share_a_folder_and_fewer_shards_remove_stale_ones(synth, ray_local, tmp_path):
    out = tmp_path / "shards"
    build_shards(**_kwargs(synth, out), progress=False)
    build_shards(lvis=synth.lvis_val, coco_stuff=[synth.stuff_val], images=synth.images_root,
                 out=out, split="val", shard_size=4, progress=False)
    rows = _manifest(out)
    assert sorted({row["split"] for row in rows}) == ["train", "val"]
    assert len(rows) == N_TRAIN + N_VAL
    # Rebuild train with bigger shards: 2 shards; train-000002.tar must go, val stays.
    report = build_shards(**{**_kwargs(synth, out), "shard_size": 12}, progress=False)
    assert [p.name for p in report.shards] == ["train-000000.tar", "train-000001.tar"]
    assert not (out / "train-000002.tar").exists()
    assert (out / "val-000000.tar").exists() and (out / "val-000001.tar").exists()
    rows = _manifest(out)
    assert sum(row["split"] == "val" for row in rows) == N_VAL
    assert {row["shard"] for row in rows if row["split"] == "train"} == {
        "train-000000.tar", "train-000001.tar"}
    assert last_build_hash(out, "val") is not None


def test_image_failures_exit_1_unless_allowed(synth, ray_local, tmp_path, capsys):
    images = tmp_path / "images"
    shutil.copytree(synth.images_root, images)
    ids = _lvis_image_ids(synth.lvis_train)
    truncated = images / "train2017" / f"{ids[3]:012d}.jpg"
    truncated.write_bytes(truncated.read_bytes()[:200])
    (images / "train2017" / f"{ids[10]:012d}.jpg").unlink()
    out = tmp_path / "shards"
    assert main(_args(synth, out, images=images)) == 1
    captured = capsys.readouterr()
    err = captured.err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("embseg: error: 2 of 24 images failed")
    assert "0 skipped, 2 failed" in captured.out
    rows = {row["image_id"]: row for row in _manifest(out)}
    assert len(rows) == N_TRAIN
    assert rows[ids[3]]["status"] == "failed" and rows[ids[3]]["reason"]
    assert rows[ids[10]]["status"] == "failed" and "not found" in rows[ids[10]]["reason"]
    keys = {s["__key__"] for s in wds.WebDataset(sorted(str(p) for p in out.glob("*.tar")),
                                                  shardshuffle=False)}
    assert f"{ids[3]:012d}" not in keys and len(keys) == N_TRAIN - 2
    assert main(_args(synth, out, "--allow-failures", images=images)) == 0


def test_image_without_annotations_is_skipped_and_recorded(synth, ray_local, tmp_path):
    data = json.loads(synth.lvis_train.read_text())
    extra = dict(data["images"][0], id=999, coco_url=data["images"][0]["coco_url"].replace(
        f"{data['images'][0]['id']:012d}", f"{999:012d}"))
    data["images"].append(extra)
    lvis = tmp_path / "lvis.json"
    lvis.write_text(json.dumps(data))
    images = tmp_path / "images"
    shutil.copytree(synth.images_root, images)
    shutil.copy(images / "train2017" / f"{data['images'][0]['id']:012d}.jpg",
                images / "train2017" / f"{999:012d}.jpg")
    out = tmp_path / "shards"
    assert main(_args(synth, out, images=images, lvis=lvis)) == 0
    row = [r for r in _manifest(out) if r["image_id"] == 999][0]
    assert row["status"] == "skipped" and "no annotation" in row["reason"]
    assert row["shard"] == "train-000003.tar"  # the slot after the 24 annotated images


def _one_error_line(capsys) -> str:
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("embseg: error: "), err
    return err[0]


def test_fatal_bad_input_exit_2_with_one_line(synth, tmp_path, capsys):
    out = tmp_path / "shards"
    missing = tmp_path / "nope.json"
    assert main(_args(synth, out, lvis=missing)) == 2
    assert str(missing) in _one_error_line(capsys)

    assert main(_args(synth, out, images=tmp_path / "no_images")) == 2
    assert "no_images" in _one_error_line(capsys)

    malformed = tmp_path / "malformed.json"
    malformed.write_text('{"images": [1, 2')
    assert main(_args(synth, out, lvis=malformed)) == 2
    assert "malformed.json" in _one_error_line(capsys)

    empty = tmp_path / "empty.json"
    empty.write_text("")
    assert main(_args(synth, out, lvis=empty)) == 2
    assert "empty.json" in _one_error_line(capsys)

    not_lvis = tmp_path / "not_lvis.json"
    not_lvis.write_text(json.dumps({"hello": "world"}))
    assert main(_args(synth, out, lvis=not_lvis)) == 2
    assert "not_lvis.json" in _one_error_line(capsys)

    data = json.loads(synth.lvis_train.read_text())
    data["annotations"][5]["category_id"] = 7777
    unknown = tmp_path / "unknown_cat.json"
    unknown.write_text(json.dumps(data))
    assert main(_args(synth, out, lvis=unknown)) == 2
    line = _one_error_line(capsys)
    assert "unknown_cat.json" in line and "7777" in line
    assert str(data["annotations"][5]["id"]) in line

    assert main(_args(synth, out, "--shard-size", "0")) == 2
    assert "--shard-size" in _one_error_line(capsys)
    assert main(_args(synth, out, "--split", "../evil")) == 2
    assert "--split" in _one_error_line(capsys)
    assert not out.exists() or not list(out.glob("*.tar"))  # nothing written for fatal input


def test_ray_address_joins_an_existing_cluster(synth, built, ray_local, tmp_path):
    """A subprocess builds on the test session's Ray via --ray-address and leaves it running."""
    from ray._private.state import jobs  # the GCS job table (the public one needs a dashboard)

    out, _ = built
    address = ray_local.get_runtime_context().gcs_address
    jobs_before = {job["JobID"] for job in jobs()}
    env = {**os.environ, "RAY_USAGE_STATS_ENABLED": "0"}
    argv = [sys.executable, "-m", "embseg", *_args(synth, tmp_path / "cluster", "--ray-address",
                                                   address)]
    done = subprocess.run(argv, capture_output=True, text=True, env=env, timeout=180)
    assert done.returncode == 0, done.stderr
    # the build was a driver of this Ray (a local Ray of its own would not be in its table)
    new_jobs = [job for job in jobs() if job["JobID"] not in jobs_before]
    assert len(new_jobs) == 1 and new_jobs[0]["IsDead"], new_jobs
    assert _shard_bytes(tmp_path / "cluster") == _shard_bytes(out)
    assert ray_local.is_initialized()
    assert ray_local.get(ray_local.remote(lambda: 7).remote()) == 7


def test_unreachable_ray_address_is_one_line_exit_2(synth, tmp_path):
    env = {**os.environ, "RAY_USAGE_STATS_ENABLED": "0"}
    argv = [sys.executable, "-m", "embseg", *_args(synth, tmp_path / "x", "--ray-address",
                                                   "127.0.0.1:9")]
    done = subprocess.run(argv, capture_output=True, text=True, env=env, timeout=120)
    assert done.returncode == 2
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and "127.0.0.1:9" in lines[0] and lines[0].startswith("embseg: error:")


def _square(n: int) -> int:
    return n * n


def _kill_own_worker(code: int) -> None:
    os._exit(code)


def test_map_unordered_yields_results_and_dead_workers(ray_local):
    """Real Ray tasks; a task that kills its worker (even after Ray's retries) comes back as
    an error value with ``return_exceptions`` instead of stopping the whole map."""
    from embseg.raywork import map_unordered

    ray_local.cloudpickle.register_pickle_by_value(sys.modules[__name__])
    squares = dict(map_unordered(_square, ((n, (n,)) for n in range(12)), max_in_flight=3))
    assert squares == {n: n * n for n in range(12)}
    jobs = [("dies", (3,))]
    crashed = dict(map_unordered(_kill_own_worker, jobs, max_in_flight=1, return_exceptions=True))
    assert isinstance(crashed["dies"], ray_local.exceptions.RayError)
