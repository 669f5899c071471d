"""Reading WebDataset shards for training and evaluation.

Shards are ``DIR/<split>-NNNNNN.tar`` with one sample per image (``jpg`` = the original image
bytes, ``seg.png`` = the uint16 label map, ``json`` = metadata). Two loaders sit on top:

- :func:`train_loader`: endless, shuffled, augmented batches (the paper's random scale 0.5-2.0,
  random crop padded with ignore, horizontal flip, ImageNet normalisation). The batch order is
  a pure function of the run seed and the step, also with DataLoader workers, so a run resumed
  from a checkpoint sees exactly the batches an uninterrupted run would have seen.
- :func:`eval_loader`: one pass, full images, no augmentation.

Why the order is deterministic: each DataLoader worker serves one *logical stream*; stream
``i`` reads, in epoch ``e``, a seeded permutation of the shards (every n-th shard, or every
n-th sample when there are fewer shards than streams) through a seeded shuffle buffer, and
augments each sample with a generator seeded by (seed, epoch, key). The DataLoader takes
batches round-robin from its workers, so step ``s`` gets the next batch of stream
``s mod n``. Each batch carries its stream's position (epoch, items consumed, bad samples so
far); the trainer stores those positions in checkpoints, and a resumed loader fast-forwards
each stream (reading, not decoding, the items it had consumed) and rotates the worker-to-stream
mapping by the resume step.

Labels follow the stored pixel grid: images are decoded by content (a PNG under a ``.jpg``
name decodes) and never EXIF-transposed; grayscale, CMYK, palette and alpha images become RGB.
Label ids ``1..C`` become targets ``0..C-1``; unlabelled (0) and padding become ``-1``.

Bad samples (an unreadable or truncated tar, a sample that does not decode, a label of the
wrong size or with ids above C, shards missing samples their manifest lists) either stop the
job with an :class:`~embseg.errors.EmbsegError` naming the shard and the key
(``on_bad_sample="fail"``) or are skipped, counted and logged with shard, key and reason
(``"skip"``).
"""

from __future__ import annotations

import hashlib
import io
import logging
import random
import re
import time
import zlib
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import webdataset as wds
from PIL import Image
from webdataset.tariterators import base_plus_ext

from embseg.errors import EmbsegError
from embseg.sampling import REPEAT_INDEX, describe_factors, repeat_factors, repeat_samples

log = logging.getLogger(__name__)

IGNORE_INDEX = -1
"""Target value of unlabelled and padded pixels."""

IMAGENET_MEAN = np.array([0.485, 0.456, 0.406], dtype=np.float32)
IMAGENET_STD = np.array([0.229, 0.224, 0.225], dtype=np.float32)

SCALE_RANGE = (0.5, 2.0)
"""Random rescaling range of the training augmentation (the paper's)."""

BAD_SAMPLE_POLICIES = ("skip", "fail")

_SHARD_NAME = re.compile(r"[^./][^/]*-\d{6}\.tar")
_LABEL_MODES = {"I;16", "I;16L", "I;16B", "I", "L", "P"}


# ---------------------------------------------------------------------------------------------
# Shard listing and the manifest


def list_shards(directory: Path) -> list[Path]:
    """Every ``DIR/*-NNNNNN.tar`` shard, sorted by name.

    Hidden and partial files (``.train-000000.tar.tmp``, ``train-000000.tar.partial``) never
    match. Raises EmbsegError when the directory is missing or holds no shard.
    """
    directory = Path(directory)
    if not directory.is_dir():
        raise EmbsegError(f"{directory}: shard directory does not exist")
    shards = sorted(p for p in directory.iterdir() if _SHARD_NAME.fullmatch(p.name) and p.is_file())
    if not shards:
        raise EmbsegError(f"{directory}: no shards (*-NNNNNN.tar) found")
    return shards


def read_num_classes(directory: Path) -> int:
    """Number of classes C of the vocabulary stored beside the shards (``DIR/classes.parquet``)."""
    from embseg.vocab import Vocabulary

    path = Path(directory) / "classes.parquet"
    if not path.is_file():
        raise EmbsegError(f"{path}: vocabulary missing (build the shards with `embseg build`)")
    return Vocabulary.read_parquet(path).num_classes


def manifest_keys(directory: Path) -> dict[str, list[str]]:
    """Keys the build wrote into each shard (from ``DIR/manifest.parquet``), by shard file name.

    Only rows with status ``ok`` are written to shards. Used to detect a shard cut at a member
    boundary, which a tar reader cannot tell from a complete one. Empty when there is no
    manifest (shards written by other tools).
    """
    path = Path(directory) / "manifest.parquet"
    if not path.is_file():
        return {}
    import pyarrow.parquet as pq

    try:
        table = pq.read_table(path, columns=["key", "shard", "status"]).to_pylist()
    except Exception as exc:  # unreadable or without those columns: not fatal, no check
        log.warning("%s: manifest not usable for shard checks (%s)", path, exc)
        return {}
    keys: dict[str, list[str]] = {}
    for row in table:
        if row["status"] == "ok" and row["shard"] is not None:
            keys.setdefault(Path(str(row["shard"])).name, []).append(str(row["key"]))
    return keys


# ---------------------------------------------------------------------------------------------
# Decoding and augmentation (plain numpy / PIL, used by the loaders and by predict)


def decode_image(data: bytes) -> np.ndarray:
    """RGB uint8 array (H, W, 3) of encoded image bytes, decoded by content, never transposed.

    The stored pixel grid is kept as is (no EXIF orientation): label maps follow it.
    """
    with Image.open(io.BytesIO(data)) as img:
        img.load()
        rgb = img if img.mode == "RGB" else img.convert("RGB")
        return np.asarray(rgb, dtype=np.uint8).copy()


def decode_label(data: bytes) -> np.ndarray:
    """Class-id array (H, W) int32 of a single-channel label PNG (uint16 by the format)."""
    with Image.open(io.BytesIO(data)) as img:
        img.load()
        if img.mode not in _LABEL_MODES:
            raise ValueError(f"label image has mode {img.mode}, expected a single-channel map")
        return np.asarray(img).astype(np.int32)


_NORMALIZED_VALUES = ((np.arange(256, dtype=np.float32)[None, :] / 255.0
                      - IMAGENET_MEAN[:, None]) / IMAGENET_STD[:, None])
"""(3, 256) float32: ``(v / 255 - mean[c]) / std[c]`` for every uint8 value v of channel c."""


def normalize_image(image: np.ndarray) -> torch.Tensor:
    """ImageNet-normalised float32 tensor (3, H, W) of an RGB uint8 array (H, W, 3).

    ``(image / 255 - mean) / std`` in float32, looked up per channel from a 256-entry table
    (the same float32 operations, done once per value instead of per pixel) straight into
    the channel-first layout.
    """
    height, width = image.shape[:2]
    out = np.empty((3, height, width), dtype=np.float32)
    for channel in range(3):
        np.take(_NORMALIZED_VALUES[channel], image[:, :, channel], out=out[channel])
    return torch.from_numpy(out)


def label_to_target(label: np.ndarray) -> torch.Tensor:
    """Targets (H, W) int64: class id c -> c - 1, unlabelled 0 -> -1 (ignore)."""
    target = label.astype(np.int64) - 1
    target[label <= 0] = IGNORE_INDEX
    return torch.from_numpy(target)


def augment(image: np.ndarray, label: np.ndarray, *, crop_size: int,
            rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The paper's training augmentation on an aligned image/label pair.

    Random scale in [0.5, 2.0] (bilinear image, nearest label, same pixel-centre mapping),
    padding to at least ``crop_size`` (image with the mean colour, label with 0: the
    caller normalises padding to exactly 0 and ignore), a random
    ``crop_size`` square crop and a horizontal flip with probability 0.5. Returns the image
    (uint8), the label (int32, class ids) and a validity mask (False on padding) so the caller
    can mark padding as ignore.
    """
    height, width = label.shape
    scale = rng.uniform(*SCALE_RANGE)
    new_h, new_w = max(1, round(height * scale)), max(1, round(width * scale))
    image = np.asarray(Image.fromarray(image).resize((new_w, new_h), Image.BILINEAR))
    label = np.asarray(Image.fromarray(np.asarray(label, dtype=np.int32)).resize(
        (new_w, new_h), Image.NEAREST))
    pad_h, pad_w = max(crop_size, new_h), max(crop_size, new_w)
    top = int(rng.integers(0, pad_h - crop_size + 1))
    left = int(rng.integers(0, pad_w - crop_size + 1))
    # the crop window of the padded image, built directly (never the whole padded image):
    # its part inside the rescaled image, the rest padding
    rows = max(0, min(crop_size, new_h - top))
    cols = max(0, min(crop_size, new_w - left))
    crop_image = np.empty((crop_size, crop_size, 3), dtype=np.uint8)
    crop_image[:] = np.round(IMAGENET_MEAN * 255).astype(np.uint8)
    crop_label = np.zeros((crop_size, crop_size), dtype=np.int32)
    valid = np.zeros((crop_size, crop_size), dtype=bool)
    crop_image[:rows, :cols] = image[top:top + rows, left:left + cols]
    crop_label[:rows, :cols] = label[top:top + rows, left:left + cols]
    valid[:rows, :cols] = True
    if rng.random() < 0.5:
        return (np.ascontiguousarray(crop_image[:, ::-1]),
                np.ascontiguousarray(crop_label[:, ::-1]), np.ascontiguousarray(valid[:, ::-1]))
    return crop_image, crop_label, valid


def _augmented_tensors(image: np.ndarray, label: np.ndarray, *, crop_size: int,
                       rng: np.random.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """Augmented, normalised image (3,S,S) and target (S,S); padding is 0 and ignore."""
    image, label, valid = augment(image, label, crop_size=crop_size, rng=rng)
    padding = torch.from_numpy(~valid)
    tensor = normalize_image(image).masked_fill_(padding, 0.0)  # broadcast over channels
    target = label_to_target(label).masked_fill_(padding, IGNORE_INDEX)
    return tensor, target


def _decode_sample(sample: dict[str, Any], num_classes: int) -> tuple[np.ndarray, np.ndarray]:
    """Image and label of a raw shard sample; ValueError with the reason when it is bad."""
    for part in ("jpg", "seg.png"):
        if part not in sample:
            raise ValueError(f"sample has no '{part}' member")
    try:
        image = decode_image(sample["jpg"])
    except Exception as exc:
        raise ValueError(f"image does not decode ({exc})") from None
    try:
        label = decode_label(sample["seg.png"])
    except Exception as exc:
        raise ValueError(f"label map does not decode ({exc})") from None
    if label.shape != image.shape[:2]:
        raise ValueError(f"label map is {label.shape[1]}x{label.shape[0]} but the image is "
                         f"{image.shape[1]}x{image.shape[0]}")
    if label.size and int(label.max()) > num_classes:
        raise ValueError(f"label id {int(label.max())} exceeds the {num_classes} classes")
    return image, label


# ---------------------------------------------------------------------------------------------
# Raw sample streams (shard reading, bad-item markers, deterministic order)


@dataclass
class BadItem:
    """A shard item that could not be used: which shard, which key, why."""

    shard: str
    key: str | None
    reason: str

    def describe(self) -> str:
        key = self.key if self.key is not None else "?"
        return f"shard {self.shard}, key {key}: {self.reason}"


def _split_member(member: str | None) -> tuple[str | None, str | None]:
    """(sample key, part suffix) of a tar member name, as WebDataset groups them."""
    if not member:
        return None, None
    key, suffix = base_plus_ext(member)
    return key, suffix.lower() if suffix is not None else None


def _failed_key(member_key: str | None, seen: set[str], missing: list[str]) -> str | None:
    """The key at which reading stopped: the manifest's first missing key when known, else the
    key of the member being read (if its sample was not complete), else "after <last key>"."""
    if missing:
        return missing[0]
    if member_key is not None and member_key not in seen:
        return member_key
    return f"after {member_key}" if member_key is not None else None


TAR_BLOCK = 512
READ_BUFFER_BYTES = 1 << 20
"""Shards are read front to back through a buffer of this size (few, large reads)."""

_ZERO_BLOCK = bytes(TAR_BLOCK)
_REGULAR_TYPES = (b"0", b"\0", b"7")  # regular file, old-style regular file, contiguous file
_META_MEMBER = re.compile(r"__[^/]*__($|/)")  # WebDataset's metadata members (skipped)


class _TarError(Exception):
    """A shard that cannot be read on: why, and the member being read when it is known."""

    def __init__(self, reason: str, member: str | None = None) -> None:
        super().__init__(reason)
        self.reason = reason
        self.member = member


def _text_field(field: bytes) -> str:
    """A NUL-terminated header string."""
    end = field.find(b"\0")
    return (field if end < 0 else field[:end]).decode("utf-8", "surrogateescape")


def _number_field(field: bytes) -> int:
    """A numeric header field: octal text, or GNU base-256 when the high bit is set."""
    if field[0] & 0x80:
        value = int.from_bytes(field[1:], "big")
        return value - 256 ** (len(field) - 1) if field[0] == 0xFF else value
    text = _text_field(field).strip()
    try:
        return int(text or "0", 8)
    except ValueError:
        raise _TarError("invalid header") from None


def _checksum_ok(header: bytes) -> bool:
    """The header checksum (sum of its bytes, the checksum field read as spaces) matches."""
    stored = _number_field(header[148:156])
    unsigned = sum(header) - sum(header[148:156]) + 8 * 32
    if stored == unsigned:
        return True
    signed = unsigned - 256 * sum(1 for byte in header if byte >= 128)
    signed += 256 * sum(1 for byte in header[148:156] if byte >= 128)
    return stored == signed


def _pax_records(data: bytes) -> dict[str, str]:
    """``key=value`` records of a PAX extended header (``"<length> key=value\n"`` each)."""
    records, offset = {}, 0
    while offset < len(data):
        space = data.find(b" ", offset)
        if space < 0:
            break
        length = int(data[offset:space] or b"0")
        if length <= 0:
            break
        key, _, value = data[space + 1:offset + length - 1].partition(b"=")
        records[key.decode("utf-8", "surrogateescape")] = value.decode("utf-8",
                                                                      "surrogateescape")
        offset += length
    return records


def _read_exact(stream: Any, size: int, member: str | None) -> bytes:
    data = stream.read(size)
    if len(data) < size:
        raise _TarError("unexpected end of data", member)
    return data


def _tar_members(shard: Path) -> Iterator[tuple[str, bytes]]:
    """(name, bytes) of each regular member of a tar (plain or gzip), in archive order.

    A small reader instead of ``tarfile`` + WebDataset's generic pipeline (their per-member
    Python work cost about a third of a millisecond per sample, as much as reading the same
    images as loose files): one buffered sequential pass, the ustar/GNU/PAX header fields
    that name and size a member, the header checksum. Raises :class:`_TarError` for an
    empty file, a bad header or data cut short; a cut at a member boundary reads as a
    shorter archive, as with ``tarfile`` (the manifest check catches it).
    """
    with open(shard, "rb", buffering=READ_BUFFER_BYTES) as raw:
        stream: Any = raw
        if raw.peek(2)[:2] == b"\x1f\x8b":
            import gzip

            stream = gzip.GzipFile(fileobj=raw)
        long_name: str | None = None
        pax: dict[str, str] = {}
        first = True
        while True:
            header = stream.read(TAR_BLOCK)
            if not header:
                if first:
                    raise _TarError("empty file")
                return
            if len(header) < TAR_BLOCK:
                raise _TarError("truncated header")
            if header == _ZERO_BLOCK:
                return
            if not _checksum_ok(header):
                raise _TarError("bad checksum")
            first = False
            kind = header[156:157]
            name = _text_field(header[0:100])
            if header[257:265] == b"ustar\x0000" and header[345] != 0:
                name = _text_field(header[345:500]) + "/" + name
            size = _number_field(header[124:136])
            if kind not in (b"x", b"g", b"L", b"K"):
                name = pax.get("path", long_name or name)
                size = int(pax.get("size", size))
                long_name, pax = None, {}
            data = _read_exact(stream, size, name)
            stream.read(-size % TAR_BLOCK)  # padding to the block
            if kind == b"x":
                pax = _pax_records(data)
            elif kind == b"L":
                long_name = _text_field(data)
            elif kind in _REGULAR_TYPES and not _META_MEMBER.match(name):
                yield name, data


def read_shard(shard: Path, expected_keys: list[str] | None = None) -> Iterator[dict | BadItem]:
    """Raw samples of one shard (dicts of bytes with ``__key__``), then BadItems for problems.

    Members are grouped into samples as WebDataset groups them (key = name up to the first
    dot of its last path part, part = the rest, lower-cased; consecutive members of one key
    form one sample). A read error (truncated or corrupt tar, unreadable file, a part twice
    in one sample) ends the shard with one BadItem naming the member where reading stopped;
    complete samples before it are kept, the sample being read when it stopped is not. Keys
    that ``expected_keys`` (the manifest) lists but the shard lacks give one BadItem naming
    the first missing key: a tar cut exactly between members reads as a complete, shorter
    archive.
    """
    url = str(shard)
    seen: set[str] = set()
    current: dict | None = None
    last_member: str | None = None
    error: _TarError | None = None
    try:
        for name, data in _tar_members(shard):
            last_member = name
            key, suffix = _split_member(name)
            if key is None:
                continue
            if current is not None and current["__key__"] != key:
                seen.add(current["__key__"])
                yield current
                current = None
            if current is None:
                current = {"__key__": key, "__url__": url}
            if suffix in current:
                raise _TarError(f"{name}: duplicate file name in tar file", name)
            current[suffix] = data
    except _TarError as exc:
        error = exc
    except (OSError, EOFError, zlib.error) as exc:  # unreadable file, broken gzip stream
        error = _TarError(str(exc) or type(exc).__name__)
    member_key, suffix = _split_member(error.member if error and error.member else last_member)
    if current is not None:
        stopped_inside = (error is not None and current["__key__"] == member_key
                          and suffix not in current)
        if not stopped_inside:
            seen.add(current["__key__"])
            yield current
    missing = [key for key in (expected_keys or []) if key not in seen]
    if error is not None:
        yield BadItem(url, _failed_key(member_key, seen, missing),
                      f"unreadable tar ({error.reason})")
        return
    if missing:
        yield BadItem(url, missing[0], f"truncated tar: {len(missing)} sample(s) of the "
                      f"manifest missing, from this key on")


def _seed_sequence(*parts: int) -> np.random.SeedSequence:
    return np.random.SeedSequence([int(p) & 0xFFFFFFFFFFFF for p in parts])


def _key_number(key: str) -> int:
    if key.isdigit():
        return int(key)
    return int.from_bytes(hashlib.sha256(key.encode()).digest()[:6], "big")


@dataclass
class StreamPosition:
    """Where one logical stream is: epoch, items consumed in that epoch, bad items so far."""

    epoch: int = 0
    position: int = 0
    bad: int = 0


@dataclass
class LoaderState:
    """Positions of all logical streams of a training loader (stored in checkpoints)."""

    streams: list[StreamPosition] = field(default_factory=list)

    @property
    def bad_samples(self) -> int:
        return sum(stream.bad for stream in self.streams)

    def to_dict(self) -> dict[str, list[list[int]]]:
        """Plain lists of ints (safe for ``torch.load(weights_only=True)``)."""
        return {"streams": [[s.epoch, s.position, s.bad] for s in self.streams]}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> LoaderState:
        return cls([StreamPosition(int(e), int(p), int(b)) for e, p, b in data["streams"]])

    @classmethod
    def fresh(cls, num_streams: int) -> LoaderState:
        return cls([StreamPosition() for _ in range(num_streams)])


def _epoch_items(shards: list[Path], expected: dict[str, list[str]], *, stream: int,
                 num_streams: int, epoch: int, seed: int, shuffle_buffer: int,
                 shuffle_shards: bool = True,
                 factors: dict[str, float] | None = None) -> Iterator[dict | BadItem]:
    """The items of one logical stream in one epoch, in their (seeded) training order.

    ``factors`` (repeat-factor sampling): each sample comes ``epoch_repeats`` times, the
    copies entering the shuffle buffer one after another (it spreads them apart).
    """
    ordered = list(shards)
    if shuffle_shards:
        order = np.random.default_rng(_seed_sequence(seed, epoch, 0x5EED)).permutation(len(shards))
        ordered = [shards[i] for i in order]
    by_shard = len(ordered) >= num_streams
    mine = ordered[stream::num_streams] if by_shard else ordered

    def raw() -> Iterator[dict | BadItem]:
        index = 0
        for shard in mine:
            for item in read_shard(shard, expected.get(shard.name)):
                if by_shard or index % num_streams == stream:
                    yield item
                index += 1

    # THE repeat-factor hook (embseg.sampling): the only place a sample's count is applied
    items = repeat_samples(raw(), factors, seed=seed, epoch=epoch)
    if shuffle_buffer <= 1:
        yield from items
        return
    rng = random.Random(int(_seed_sequence(seed, epoch, stream, 0x5F1).generate_state(1)[0]))
    yield from wds.filters.shuffle(bufsize=shuffle_buffer, initial=shuffle_buffer, rng=rng)(items)


def _stack(tensors: list[torch.Tensor]) -> torch.Tensor:
    """One batch tensor; inside a DataLoader worker it is built straight in shared memory.

    A batch stacked in ordinary memory is copied once more into shared memory when the worker
    sends it to the main process; ``default_collate`` allocates the shared block first and
    stacks into it (the loose-file DataLoader path gets the same through its collate).
    """
    return torch.utils.data.default_collate(tensors)


# ---------------------------------------------------------------------------------------------
# Training loader


@dataclass(frozen=True)
class TrainLoaderSpec:
    """Everything that defines the training batches (the same spec gives the same batches)."""

    shards: tuple[Path, ...]
    num_classes: int
    batch_size: int
    crop_size: int
    seed: int
    num_streams: int
    shuffle_buffer: int
    on_bad_sample: str
    expected_keys: dict[str, list[str]]
    repeat_factors: dict[str, float] | None = None  # key -> factor (repeat-factor sampling)


class _TrainStreams(torch.utils.data.IterableDataset):
    """Yields collated batches of one logical stream per DataLoader worker (or of stream 0)."""

    def __init__(self, spec: TrainLoaderSpec, state: LoaderState, rotation: int) -> None:
        super().__init__()
        self.spec = spec
        self.state = state
        self.rotation = rotation

    def __iter__(self) -> Iterator[dict[str, Any]]:
        info = torch.utils.data.get_worker_info()
        worker = 0 if info is None else info.id
        stream = (worker + self.rotation) % self.spec.num_streams
        return self._batches(stream, self.state.streams[stream])

    def _batches(self, stream: int, start: StreamPosition) -> Iterator[dict[str, Any]]:
        spec = self.spec
        epoch, skip, bad = start.epoch, start.position, start.bad
        images: list[torch.Tensor] = []
        targets: list[torch.Tensor] = []
        keys: list[str] = []
        skipped: list[str] = []
        while True:
            position, good_in_epoch = 0, 0
            for item in _epoch_items(list(spec.shards), spec.expected_keys, stream=stream,
                                     num_streams=spec.num_streams, epoch=epoch, seed=spec.seed,
                                     shuffle_buffer=spec.shuffle_buffer,
                                     factors=spec.repeat_factors):
                position += 1
                if position <= skip:
                    good_in_epoch += not isinstance(item, BadItem)
                    continue
                if not isinstance(item, BadItem):
                    try:
                        image, target = self._prepare(item, epoch)
                    except ValueError as exc:
                        item = BadItem(item.get("__url__", "?"), item["__key__"], str(exc))
                if isinstance(item, BadItem):
                    if spec.on_bad_sample == "fail":
                        yield {"error": item.describe()}
                        return
                    bad += 1
                    skipped.append(item.describe())
                    continue
                good_in_epoch += 1
                images.append(image)
                targets.append(target)
                keys.append(item["__key__"])
                if len(images) == spec.batch_size:
                    yield {"image": _stack(images), "label": _stack(targets),
                           "keys": keys, "stream": stream, "state": [epoch, position, bad],
                           "skipped": skipped}
                    images, targets, keys, skipped = [], [], [], []
            if good_in_epoch == 0:
                problems = "; ".join(skipped[-3:]) or "none"
                yield {"error": f"loader stream {stream} of {spec.num_streams} got no usable "
                                f"sample in epoch {epoch} (all bad, or fewer samples than "
                                f"--num-workers); last problems: {problems}"}
                return
            epoch, skip = epoch + 1, 0

    def _prepare(self, sample: dict[str, Any], epoch: int) -> tuple[torch.Tensor, torch.Tensor]:
        image, label = _decode_sample(sample, self.spec.num_classes)
        # a repeated sample's later copies get augmentations of their own
        copy = sample.get(REPEAT_INDEX, 0)
        rng = np.random.default_rng(_seed_sequence(self.spec.seed, epoch,
                                                   _key_number(sample["__key__"]), 0xA06,
                                                   *([copy] if copy else [])))
        return _augmented_tensors(image, label, crop_size=self.spec.crop_size, rng=rng)


@dataclass
class TrainBatch:
    """One training batch: normalised images (B,3,S,S) float32, targets (B,S,S) int64."""

    image: torch.Tensor
    label: torch.Tensor
    keys: list[str]


class TrainBatches:
    """Endless iterator of training batches that knows its resumable position.

    ``state()`` is the position after the last batch handed out; pass it (and the step) to
    :func:`train_loader` to continue identically. ``bad_samples`` counts skipped items.
    """

    def __init__(self, spec: TrainLoaderSpec, state: LoaderState, *, start_step: int,
                 num_workers: int, pin_memory: bool) -> None:
        self.spec = spec
        self._state = LoaderState([StreamPosition(s.epoch, s.position, s.bad)
                                   for s in state.streams])
        dataset = _TrainStreams(spec, state, rotation=start_step % spec.num_streams)
        self._loader = torch.utils.data.DataLoader(
            dataset, batch_size=None, num_workers=num_workers, pin_memory=pin_memory,
            # own generator: creating the iterator must not consume the global torch RNG
            generator=torch.Generator().manual_seed(spec.seed),
            multiprocessing_context="fork" if num_workers > 0 else None)
        self._iterator: Iterator[dict[str, Any]] | None = None

    @property
    def bad_samples(self) -> int:
        return self._state.bad_samples

    def state(self) -> LoaderState:
        return LoaderState([StreamPosition(s.epoch, s.position, s.bad)
                            for s in self._state.streams])

    def __iter__(self) -> TrainBatches:
        return self

    def __next__(self) -> TrainBatch:
        if self._iterator is None:
            self._iterator = iter(self._loader)
        batch = next(self._iterator)
        if "error" in batch:
            self.close()
            raise EmbsegError(batch["error"])
        for reason in batch["skipped"]:
            log.warning("skipped bad sample: %s", reason)
        epoch, position, bad = batch["state"]
        self._state.streams[batch["stream"]] = StreamPosition(epoch, position, bad)
        return TrainBatch(batch["image"], batch["label"], batch["keys"])

    def close(self) -> None:
        """Stop the DataLoader workers."""
        iterator, self._iterator = self._iterator, None
        shutdown = getattr(iterator, "_shutdown_workers", None)
        if shutdown is not None:
            shutdown()


def _check_policy(on_bad_sample: str) -> None:
    if on_bad_sample not in BAD_SAMPLE_POLICIES:
        raise ValueError(f"on_bad_sample must be one of {BAD_SAMPLE_POLICIES}, "
                         f"not {on_bad_sample!r}")


def _planned_repeats(shards_dir: Path, threshold: float | None) -> dict[str, float] | None:
    if threshold is None:
        return None
    factors = repeat_factors(Path(shards_dir) / "manifest.parquet", threshold)
    log.info("%s: %s", shards_dir, describe_factors(factors, threshold))
    return factors


def train_loader(shards_dir: Path, *, num_classes: int, batch_size: int, crop_size: int,
                 seed: int = 0, num_workers: int = 2, shuffle_buffer: int = 256,
                 on_bad_sample: str = "skip", state: LoaderState | None = None,
                 start_step: int = 0, pin_memory: bool = False,
                 repeat_threshold: float | None = None) -> TrainBatches:
    """Endless augmented training batches from the shards in ``shards_dir``.

    The batches are a deterministic function of (shards, seed, batch_size, crop_size,
    num_workers, shuffle_buffer, repeat_threshold): resuming with the ``state`` saved after
    step ``start_step`` continues exactly as the uninterrupted loader would have.
    ``num_workers`` DataLoader workers (0: in-process) each serve one stream; a resumed loader
    must use the same number. ``repeat_threshold``: repeat-factor sampling with that ``t``
    (:mod:`embseg.sampling`; factors from ``manifest.parquet``), off when None.
    """
    _check_policy(on_bad_sample)
    num_streams = max(1, num_workers)
    if state is None:
        state = LoaderState.fresh(num_streams)
    if len(state.streams) != num_streams:
        raise EmbsegError(f"{shards_dir}: loader state has {len(state.streams)} streams but "
                          f"{num_workers} workers were asked for (resume with the same "
                          f"--num-workers)")
    spec = TrainLoaderSpec(shards=tuple(list_shards(shards_dir)), num_classes=num_classes,
                           batch_size=batch_size, crop_size=crop_size, seed=seed,
                           num_streams=num_streams, shuffle_buffer=shuffle_buffer,
                           on_bad_sample=on_bad_sample, expected_keys=manifest_keys(shards_dir),
                           repeat_factors=_planned_repeats(shards_dir, repeat_threshold))
    return TrainBatches(spec, state, start_step=start_step, num_workers=num_workers,
                        pin_memory=pin_memory)


# ---------------------------------------------------------------------------------------------
# Evaluation loader


@dataclass
class EvalBatch:
    """Full-size images of one size: images (B,3,H,W) normalised, targets (B,H,W) int64."""

    image: torch.Tensor
    label: torch.Tensor
    keys: list[str]


class _EvalStreams(torch.utils.data.IterableDataset):
    """One pass over the shards; batches group consecutive images of equal size."""

    def __init__(self, shards: list[Path], expected: dict[str, list[str]], *, num_classes: int,
                 batch_size: int, on_bad_sample: str, num_streams: int) -> None:
        super().__init__()
        self.shards = shards
        self.expected = expected
        self.num_classes = num_classes
        self.batch_size = batch_size
        self.on_bad_sample = on_bad_sample
        self.num_streams = num_streams

    def __iter__(self) -> Iterator[dict[str, Any]]:
        info = torch.utils.data.get_worker_info()
        stream = 0 if info is None else info.id
        items = _epoch_items(self.shards, self.expected, stream=stream,
                             num_streams=self.num_streams, epoch=0, seed=0, shuffle_buffer=0,
                             shuffle_shards=False)
        return self._batches(items)

    def _batches(self, items: Iterator[dict | BadItem]) -> Iterator[dict[str, Any]]:
        pending: list[tuple[str, torch.Tensor, torch.Tensor]] = []
        skipped: list[str] = []
        for item in items:
            if not isinstance(item, BadItem):
                try:
                    image, label = _decode_sample(item, self.num_classes)
                except ValueError as exc:
                    item = BadItem(item.get("__url__", "?"), item["__key__"], str(exc))
            if isinstance(item, BadItem):
                if self.on_bad_sample == "fail":
                    yield {"error": item.describe()}
                    return
                skipped.append(item.describe())
                continue
            sample = (item["__key__"], normalize_image(image), label_to_target(label))
            if pending and (pending[0][1].shape != sample[1].shape
                            or len(pending) == self.batch_size):
                yield self._collate(pending, skipped)
                pending, skipped = [], []
            pending.append(sample)
        if pending or skipped:
            yield self._collate(pending, skipped)

    @staticmethod
    def _collate(pending: list[tuple[str, torch.Tensor, torch.Tensor]],
                 skipped: list[str]) -> dict[str, Any]:
        if not pending:
            return {"skipped": skipped}
        return {"keys": [p[0] for p in pending], "image": _stack([p[1] for p in pending]),
                "label": _stack([p[2] for p in pending]), "skipped": skipped}


class EvalBatches:
    """One pass of evaluation batches; ``bad_samples`` and ``images`` count what was seen."""

    def __init__(self, dataset: _EvalStreams, num_workers: int) -> None:
        self._loader = torch.utils.data.DataLoader(
            dataset, batch_size=None, num_workers=num_workers,
            generator=torch.Generator().manual_seed(0),
            multiprocessing_context="fork" if num_workers > 0 else None)
        self.bad_samples = 0
        self.images = 0
        self.skipped: list[str] = []

    def __iter__(self) -> Iterator[EvalBatch]:
        for batch in self._loader:
            if "error" in batch:
                raise EmbsegError(batch["error"])
            for reason in batch["skipped"]:
                log.warning("skipped bad sample: %s", reason)
            self.skipped.extend(batch["skipped"])
            self.bad_samples += len(batch["skipped"])
            if "image" in batch:
                self.images += len(batch["keys"])
                yield EvalBatch(batch["image"], batch["label"], batch["keys"])


def eval_loader(shards_dir: Path, *, num_classes: int, batch_size: int = 4, num_workers: int = 0,
                on_bad_sample: str = "fail") -> EvalBatches:
    """One pass over the shards in ``shards_dir``: full images, no augmentation.

    Batches hold up to ``batch_size`` consecutive images of the same size. Bad samples raise
    EmbsegError naming shard and key (``"fail"``, the default) or are counted (``"skip"``).
    """
    _check_policy(on_bad_sample)
    dataset = _EvalStreams(list_shards(shards_dir), manifest_keys(shards_dir),
                           num_classes=num_classes, batch_size=batch_size,
                           on_bad_sample=on_bad_sample, num_streams=max(1, num_workers))
    return EvalBatches(dataset, num_workers)


# ---------------------------------------------------------------------------------------------
# Throughput (for `embseg bench`)


def _export_loose_files(shards_dir: Path, loose_dir: Path) -> list[tuple[Path, Path]]:
    """Write every shard sample as loose ``<key>.jpg`` / ``<key>.png`` files (once)."""
    loose_dir.mkdir(parents=True, exist_ok=True)
    pairs = []
    for shard in list_shards(shards_dir):
        for item in read_shard(shard):
            if isinstance(item, BadItem) or "jpg" not in item or "seg.png" not in item:
                continue
            image_path = loose_dir / f"{item['__key__']}.jpg"
            label_path = loose_dir / f"{item['__key__']}.png"
            if not image_path.exists():
                image_path.write_bytes(item["jpg"])
                label_path.write_bytes(item["seg.png"])
            pairs.append((image_path, label_path))
    return pairs


def loader_throughput(shards_dir: Path, *, images: int, source: str = "shards",
                      loose_dir: Path | None = None, crop_size: int = 256, batch_size: int = 8,
                      num_workers: int = 2) -> float:
    """Images per second of the training input pipeline (read + decode + augment).

    ``source="shards"`` reads the shards through :func:`train_loader`; ``source="files"``
    reads the same samples as loose files (exported once into ``loose_dir``) through a
    map-style DataLoader, the baseline that shards are meant to beat.
    """
    num_classes = read_num_classes(shards_dir)
    batches = max(1, -(-images // batch_size))
    if source == "shards":
        loader = train_loader(shards_dir, num_classes=num_classes, batch_size=batch_size,
                              crop_size=crop_size, num_workers=num_workers)
        next(loader)  # start-up (worker fork, first shard open) is not throughput
        start = time.perf_counter()
        for _ in range(batches):
            next(loader)
        seconds = time.perf_counter() - start
        loader.close()
        return batches * batch_size / seconds
    if source != "files" or loose_dir is None:
        raise ValueError("source must be 'shards', or 'files' with a loose_dir")
    dataset = _LooseFiles(_export_loose_files(shards_dir, loose_dir), num_classes, crop_size)
    sampler = torch.utils.data.RandomSampler(dataset, replacement=True,
                                             num_samples=(batches + 1) * batch_size,
                                             generator=torch.Generator().manual_seed(0))
    loader = iter(torch.utils.data.DataLoader(dataset, batch_size=batch_size, sampler=sampler,
                                              num_workers=num_workers))
    next(loader)
    start = time.perf_counter()
    for _ in range(batches):
        next(loader)
    return batches * batch_size / (time.perf_counter() - start)


class _LooseFiles(torch.utils.data.Dataset):
    """Map-style dataset over loose image/label files (the loader benchmark's baseline)."""

    def __init__(self, pairs: list[tuple[Path, Path]], num_classes: int, crop_size: int) -> None:
        self.pairs = pairs
        self.num_classes = num_classes
        self.crop_size = crop_size

    def __len__(self) -> int:
        return len(self.pairs)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        image_path, label_path = self.pairs[index]
        sample = {"jpg": image_path.read_bytes(), "seg.png": label_path.read_bytes()}
        image, label = _decode_sample(sample, self.num_classes)
        rng = np.random.default_rng(index)
        return _augmented_tensors(image, label, crop_size=self.crop_size, rng=rng)

