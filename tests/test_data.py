"""Shard loaders: shapes, normalisation, label shift, aligned augmentation, EXIF, bad shards."""

from __future__ import annotations

import io
import tarfile

import numpy as np
import pytest
import torch
from PIL import Image
from shardutil import (
    block_label,
    colour_sample,
    encode_image,
    make_sample,
    palette,
    write_shards,
)

from embseg.data import LoaderState, eval_loader, list_shards, train_loader
from embseg.errors import EmbsegError

MEAN = np.array([0.485, 0.456, 0.406])
STD = np.array([0.229, 0.224, 0.225])
C = 10


def _unnormalise(image: torch.Tensor) -> np.ndarray:
    """(3,H,W) normalised -> (H,W,3) float 0..255 (independent of embseg's constants)."""
    return (image.numpy().transpose(1, 2, 0) * STD + MEAN) * 255.0


def _batches(loader, n):
    out = [next(loader) for _ in range(n)]
    loader.close()
    return out


@pytest.fixture(scope="module")
def colour_shards(tmp_path_factory):
    directory = tmp_path_factory.mktemp("colour") / "train"
    samples = [colour_sample(i, height=24 + 8 * (i % 3), width=40, num_classes=C)
               for i in range(12)]
    write_shards(directory, samples, num_classes=C, shard_size=5)
    return directory


def test_list_shards_ignores_hidden_and_partial_files(tmp_path):
    for name in ["train-000001.tar", "train-000000.tar", ".train-000002.tar",
                 "train-000003.tar.partial", "train-000004.tar.tmp", "train-12.tar", "notes.txt"]:
        (tmp_path / name).write_bytes(b"")
    assert [p.name for p in list_shards(tmp_path)] == ["train-000000.tar", "train-000001.tar"]
    with pytest.raises(EmbsegError, match="does not exist"):
        list_shards(tmp_path / "missing")
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(EmbsegError, match="no shards"):
        list_shards(empty)


def test_eval_loader_normalises_and_shifts_labels(tmp_path):
    rng = np.random.default_rng(0)
    image = rng.integers(0, 256, size=(16, 20, 3), dtype=np.uint8)
    label = block_label(16, 20, C, rng, block=4, unlabelled=0.3)
    write_shards(tmp_path, [make_sample(7, encode_image(image, "PNG"), label)], num_classes=C)
    (batch,) = list(eval_loader(tmp_path, num_classes=C))
    assert batch.image.dtype == torch.float32 and batch.image.shape == (1, 3, 16, 20)
    assert batch.label.dtype == torch.int64 and batch.label.shape == (1, 16, 20)
    expected = (image / 255.0 - MEAN) / STD
    np.testing.assert_allclose(batch.image[0].numpy().transpose(1, 2, 0), expected, atol=1e-5)
    expected_target = np.where(label == 0, -1, label.astype(np.int64) - 1)
    np.testing.assert_array_equal(batch.label[0].numpy(), expected_target)
    assert batch.keys == ["000000000007"]


def _interior(label: np.ndarray, radius: int = 1) -> np.ndarray:
    """Pixels whose (2r+1)^2 neighbourhood has a single label (no interpolation blending)."""
    h, w = label.shape
    same = np.ones_like(label, dtype=bool)
    padded = np.pad(label, radius, mode="edge")
    for dy in range(2 * radius + 1):
        for dx in range(2 * radius + 1):
            same &= padded[dy:dy + h, dx:dx + w] == label
    return same


def test_train_batches_shapes_and_aligned_augmentation(colour_shards):
    colours = palette(C).astype(np.float64)
    loader = train_loader(colour_shards, num_classes=C, batch_size=4, crop_size=32, seed=3,
                          num_workers=2, shuffle_buffer=8)
    checked, padded_pixels = 0, 0
    for batch in _batches(loader, 6):
        assert batch.image.shape == (4, 3, 32, 32) and batch.image.dtype == torch.float32
        assert batch.label.shape == (4, 32, 32) and batch.label.dtype == torch.int64
        assert int(batch.label.min()) >= -1 and int(batch.label.max()) <= C - 1
        for image, target in zip(batch.image, batch.label, strict=True):
            pixels = _unnormalise(image)
            nearest = np.argmin(((pixels[:, :, None, :] - colours) ** 2).sum(-1), axis=-1)
            target = target.numpy()
            # padding: ignore label and the mean colour (normalised 0)
            pad = (target == -1) & (np.abs(image.numpy()).max(0) < 1e-6)
            padded_pixels += int(pad.sum())
            labelled = (target >= 0) & _interior(target)
            agree = nearest[labelled] == target[labelled] + 1
            assert agree.mean() > 0.98, f"label/colour agreement {agree.mean():.3f}"
            checked += int(labelled.sum())
    assert checked > 2000 and padded_pixels > 0  # 24-40 px images at scale < 1 get padded


def test_no_exif_transpose_and_colour_modes(tmp_path):
    rng = np.random.default_rng(1)
    stored = rng.integers(0, 256, size=(12, 30, 3), dtype=np.uint8)
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90 CW to display"
    rotated_jpeg = encode_image(stored, "JPEG", exif=exif.tobytes(), quality=95)
    gray = encode_image(stored[:, :, 0], "JPEG")
    buf = io.BytesIO()
    Image.fromarray(stored).convert("CMYK").save(buf, format="JPEG")
    cmyk = buf.getvalue()
    png_as_jpg = encode_image(stored, "PNG")
    label = np.ones((12, 30), dtype=np.uint16)
    samples = [make_sample(i, data, label)
               for i, data in enumerate([rotated_jpeg, gray, cmyk, png_as_jpg])]
    write_shards(tmp_path, samples, num_classes=C)
    batches = list(eval_loader(tmp_path, num_classes=C, batch_size=1))
    assert [b.keys[0] for b in batches] == [f"{i:012d}" for i in range(4)]
    for batch, data in zip(batches, [rotated_jpeg, gray, cmyk, png_as_jpg], strict=True):
        assert batch.image.shape == (1, 3, 12, 30)  # the stored grid, not the EXIF display
        reference = np.asarray(Image.open(io.BytesIO(data)).convert("RGB"), dtype=np.float64)
        np.testing.assert_allclose(_unnormalise(batch.image[0]), reference, atol=1e-3)
    np.testing.assert_allclose(_unnormalise(batches[3].image[0]), stored, atol=1e-3)


def test_same_seed_same_batches_and_resume_from_state(colour_shards):
    def loader(**kw):
        return train_loader(colour_shards, num_classes=C, batch_size=3, crop_size=16, seed=5,
                            num_workers=2, shuffle_buffer=6, **kw)

    first = loader()
    reference = [next(first) for _ in range(9)]
    first.close()
    again = _batches(loader(), 9)
    for a, b in zip(reference, again, strict=True):
        assert a.keys == b.keys and torch.equal(a.image, b.image) and torch.equal(a.label, b.label)
    partial = loader()
    for _ in range(5):
        next(partial)
    state = LoaderState.from_dict(partial.state().to_dict())
    partial.close()
    resumed = _batches(loader(state=state, start_step=5), 4)
    for a, b in zip(reference[5:], resumed, strict=True):
        assert a.keys == b.keys and torch.equal(a.image, b.image) and torch.equal(a.label, b.label)
    other_seed = _batches(train_loader(colour_shards, num_classes=C, batch_size=3, crop_size=16,
                                       seed=6, num_workers=2, shuffle_buffer=6), 3)
    assert [b.keys for b in other_seed] != [b.keys for b in reference[:3]]


# --------------------------------------------------------------------------- bad shards


def _good_samples(n: int, start: int = 0) -> list[dict]:
    return [colour_sample(start + i, height=16, width=16, num_classes=C) for i in range(n)]


def _member(shard, name: str) -> tarfile.TarInfo:
    with tarfile.open(shard) as tar:
        return tar.getmember(name)


def _cut_inside_member(shard, key: str) -> None:
    """Truncate ``shard`` in the middle of the data of ``<key>.seg.png``."""
    member = _member(shard, f"{key}.seg.png")
    shard.write_bytes(shard.read_bytes()[:member.offset_data + 20])


def test_truncated_tar_names_shard_and_key(tmp_path):
    (shard,) = write_shards(tmp_path, _good_samples(4), num_classes=C)
    _cut_inside_member(shard, "000000000002")
    with pytest.raises(EmbsegError, match=r"train-000000\.tar, key 000000000002: unreadable tar"):
        list(eval_loader(tmp_path, num_classes=C))
    skipping = eval_loader(tmp_path, num_classes=C, on_bad_sample="skip")
    keys = [key for batch in skipping for key in batch.keys]
    assert keys == ["000000000000", "000000000001"]
    assert skipping.bad_samples == 1


def test_tar_cut_between_members_is_caught_by_the_manifest(tmp_path):
    (shard,) = write_shards(tmp_path, _good_samples(4), num_classes=C)
    cut = min(_member(shard, f"000000000003.{part}").offset for part in ("jpg", "json", "seg.png"))
    shard.write_bytes(shard.read_bytes()[:cut])  # exactly before the sample's first header
    with pytest.raises(EmbsegError, match=r"train-000000\.tar, key 000000000003: truncated"):
        list(eval_loader(tmp_path, num_classes=C))


def test_undecodable_sample_fail_and_skip(tmp_path):
    samples = _good_samples(6)
    samples[2]["jpg"] = b"\xff\xd8\xff\xe0 not really a jpeg"
    samples[4]["seg.png"] = samples[4]["seg.png"][:40]
    write_shards(tmp_path, samples, num_classes=C, shard_size=3)
    with pytest.raises(EmbsegError, match=r"train-000000\.tar, key 000000000002: image does not"):
        list(eval_loader(tmp_path, num_classes=C))
    skipping = eval_loader(tmp_path, num_classes=C, on_bad_sample="skip", num_workers=2)
    keys = sorted(key for batch in skipping for key in batch.keys)
    assert keys == [f"{i:012d}" for i in (0, 1, 3, 5)]
    assert skipping.bad_samples == 2
    assert any("key 000000000004: label map does not decode" in s for s in skipping.skipped)

    one_shard = tmp_path / "one"
    write_shards(one_shard, samples, num_classes=C)  # 0 1 [2] 3 [4] 5 in one shard
    train = train_loader(one_shard, num_classes=C, batch_size=2, crop_size=16, num_workers=0,
                         shuffle_buffer=0)
    for _ in range(4):  # two epochs of the 4 good samples
        assert not {"000000000002", "000000000004"} & set(next(train).keys)
    assert train.bad_samples == 4  # 2 per epoch, counted
    failing = train_loader(tmp_path, num_classes=C, batch_size=2, crop_size=16, num_workers=2,
                           on_bad_sample="fail")
    with pytest.raises(EmbsegError, match=r"key 00000000000[24]: (image|label map) does not"):
        for _ in range(3):
            next(failing)
    failing.close()


def test_wrong_labels_are_bad_samples(tmp_path):
    samples = _good_samples(3)
    samples[0]["seg.png"] = make_sample(0, b"", np.full((16, 16), C + 1, np.uint16))["seg.png"]
    samples[1]["seg.png"] = make_sample(1, b"", np.ones((8, 16), np.uint16))["seg.png"]
    write_shards(tmp_path, samples, num_classes=C)
    skipping = eval_loader(tmp_path, num_classes=C, on_bad_sample="skip")
    assert [key for batch in skipping for key in batch.keys] == ["000000000002"]
    assert any(f"label id {C + 1} exceeds" in s for s in skipping.skipped)
    assert any("label map is 16x8 but the image is 16x16" in s for s in skipping.skipped)


# --------------------------------------------------------------------------- the tar reader


def _tarfile_samples(path) -> list[dict]:
    """Independent reference: Python's tarfile, consecutive members grouped by the name up to
    the first dot of the last path part (WebDataset's rule; a name without a dot is no
    sample part), parts lower-cased."""
    samples: list[dict] = []
    with tarfile.open(path) as tar:
        for info in tar:
            if not info.isreg():
                continue
            directory, _, base = info.name.rpartition("/")
            stem, dot, part = base.partition(".")
            if not dot:
                continue
            key = f"{directory}/{stem}" if directory else stem
            if not samples or samples[-1]["__key__"] != key:
                samples.append({"__key__": key})
            samples[-1][part.lower()] = tar.extractfile(info).read()
    return samples


def _write_tar(path, members: list[tuple[str, bytes]], fmt: int, mode: str = "w") -> None:
    with tarfile.open(path, mode, format=fmt) as tar:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))


@pytest.mark.parametrize("fmt", [tarfile.USTAR_FORMAT, tarfile.GNU_FORMAT, tarfile.PAX_FORMAT])
@pytest.mark.parametrize("mode", ["w", "w:gz"])
def test_reader_matches_tarfile_for_long_names_formats_and_gzip(tmp_path, fmt, mode):
    from embseg.data import read_shard

    rng = np.random.default_rng(3)
    long_dir = "d" * 120 if fmt != tarfile.USTAR_FORMAT else "d" * 90  # ustar: prefix field
    members = []
    for i in range(5):
        key = f"{long_dir}/{'k' * (30 + i)}{i:04d}" if i % 2 else f"{i:012d}"
        for part in ("jpg", "JSON", "seg.png"):
            size = int(rng.integers(0, 3000))
            members.append((f"{key}.{part}", rng.integers(0, 256, size, dtype=np.uint8).tobytes()))
    members.append(("__meta__", b"skipped by both"))
    path = tmp_path / "train-000000.tar"
    _write_tar(path, members, fmt, mode)
    got = [dict(item) for item in read_shard(path)]
    for item in got:
        assert item.pop("__url__") == str(path)
    assert got == _tarfile_samples(path)


def test_corrupt_header_duplicate_part_and_empty_file_are_reported(tmp_path):
    from embseg.data import BadItem, read_shard

    (shard,) = write_shards(tmp_path / "a", _good_samples(4), num_classes=C, manifest=False)
    data = bytearray(shard.read_bytes())
    data[_member(shard, "000000000002.jpg").offset + 10] ^= 0xFF  # name byte: checksum fails
    shard.write_bytes(bytes(data))
    items = list(read_shard(shard))
    assert [i["__key__"] for i in items[:-1]] == ["000000000000", "000000000001"]
    assert isinstance(items[-1], BadItem)
    assert items[-1].key == "after 000000000001" and "bad checksum" in items[-1].reason

    duplicate = tmp_path / "b" / "train-000000.tar"
    duplicate.parent.mkdir()
    _write_tar(duplicate, [("0001.jpg", b"x"), ("0001.png", b"y"), ("0001.jpg", b"z")],
               tarfile.USTAR_FORMAT)
    first, bad = list(read_shard(duplicate))  # reading stops at the second 0001.jpg
    assert first["jpg"] == b"x" and first["png"] == b"y"
    assert isinstance(bad, BadItem) and "duplicate" in bad.reason

    empty = tmp_path / "c" / "train-000000.tar"
    empty.parent.mkdir()
    empty.write_bytes(b"")
    (bad,) = list(read_shard(empty))
    assert isinstance(bad, BadItem) and bad.reason == "unreadable tar (empty file)"


def _reference_augment(image, label, crop_size, rng):
    """Independent: rescale, pad the whole image (mean colour / 0), crop, maybe flip."""
    height, width = label.shape
    scale = rng.uniform(0.5, 2.0)
    size = (max(1, round(width * scale)), max(1, round(height * scale)))
    image = np.asarray(Image.fromarray(image).resize(size, Image.BILINEAR))
    label = np.asarray(Image.fromarray(label.astype(np.int32)).resize(size, Image.NEAREST))
    pad_h, pad_w = max(crop_size, size[1]), max(crop_size, size[0])
    padded = np.tile(np.round(MEAN * 255).astype(np.uint8), (pad_h, pad_w, 1))
    padded[:size[1], :size[0]] = image
    padded_label = np.zeros((pad_h, pad_w), np.int32)
    padded_label[:size[1], :size[0]] = label
    top = int(rng.integers(0, pad_h - crop_size + 1))
    left = int(rng.integers(0, pad_w - crop_size + 1))
    image = padded[top:top + crop_size, left:left + crop_size]
    label = padded_label[top:top + crop_size, left:left + crop_size]
    if rng.random() < 0.5:
        image, label = image[:, ::-1], label[:, ::-1]
    return image, label


def test_augment_crop_window_equals_padding_the_whole_image():
    from embseg.data import augment, normalize_image

    rng = np.random.default_rng(9)
    for trial in range(60):
        height, width = (int(v) for v in rng.integers(3, 90, size=2))
        image = rng.integers(0, 256, size=(height, width, 3), dtype=np.uint8)
        label = rng.integers(0, C + 1, size=(height, width)).astype(np.int32)
        crop = int(rng.choice([8, 32, 64]))
        got_image, got_label, valid = augment(image, label, crop_size=crop,
                                              rng=np.random.default_rng(trial))
        want_image, want_label = _reference_augment(image, label, crop,
                                                    np.random.default_rng(trial))
        np.testing.assert_array_equal(got_image, want_image)
        np.testing.assert_array_equal(got_label, want_label)
        assert valid.any() and valid.shape == (crop, crop)
        want_norm = ((image.astype(np.float32) / 255.0 - MEAN.astype(np.float32))
                     / STD.astype(np.float32)).transpose(2, 0, 1)
        assert np.array_equal(normalize_image(image).numpy(), want_norm)
