"""The training loader: endless, shuffled, augmented batches that resume exactly.

The batch order is a pure function of the run seed and the step, also with DataLoader
workers, so a run resumed from a checkpoint sees exactly the batches an uninterrupted run
would have seen. Each DataLoader worker serves one logical stream (:mod:`embseg.data.streams`)
and augments each sample with a generator seeded by (seed, epoch, key). The DataLoader takes
batches round-robin from its workers, so step ``s`` gets the next batch of stream
``s mod n``. Each batch carries its stream's position (epoch, items consumed, bad samples so
far); the trainer stores those positions in checkpoints, and a resumed loader fast-forwards
each stream (reading, not decoding, the items it had consumed) and rotates the
worker-to-stream mapping by the resume step.
"""

from __future__ import annotations

import io
import logging
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from embseg.data.decode import augmented_tensors, decode_sample
from embseg.data.reading import BadItem
from embseg.data.sources import (
    MANIFEST_FILE,
    ShardSource,
    is_local,
    manifest_keys,
    read_beside,
    shard_source,
)
from embseg.data.streams import check_policy, epoch_items, key_number, seed_sequence, stack
from embseg.errors import EmbsegError
from embseg.sampling import (
    MANIFEST_COLUMNS,
    REPEAT_INDEX,
    describe_factors,
    repeat_factors,
    repeat_factors_of_rows,
)

log = logging.getLogger(__name__)


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


@dataclass(frozen=True)
class TrainLoaderSpec:
    """Everything that defines the training batches (the same spec gives the same batches)."""

    shards: tuple[tuple[str, str], ...]  # (url, name) of every shard, in the source's order
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
            for item in epoch_items(spec.shards, spec.expected_keys, stream=stream,
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
                    yield {"image": stack(images), "label": stack(targets),
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
        image, label = decode_sample(sample, self.spec.num_classes)
        # a repeated sample's later copies get augmentations of their own
        copy = sample.get(REPEAT_INDEX, 0)
        rng = np.random.default_rng(seed_sequence(self.spec.seed, epoch,
                                                  key_number(sample["__key__"]), 0xA06,
                                                  *([copy] if copy else [])))
        return augmented_tensors(image, label, crop_size=self.spec.crop_size, rng=rng)


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


def _planned_repeats(source: ShardSource, threshold: float | None) -> dict[str, float] | None:
    """Repeat factors by key from the manifest beside the shards (None: sampling off)."""
    if threshold is None:
        return None
    location = source.beside_file(MANIFEST_FILE) or f"{source.spec}: {MANIFEST_FILE}"
    if is_local(location):
        factors = repeat_factors(Path(location), threshold)
    else:
        factors = repeat_factors_of_rows(_remote_manifest_rows(source, location), threshold,
                                         source=location)
    log.info("%s: %s", source.spec, describe_factors(factors, threshold))
    return factors


def _remote_manifest_rows(source: ShardSource, location: str) -> list[dict[str, Any]]:
    """The manifest rows repeat-factor sampling reads, from a manifest beside URL shards."""
    import pyarrow.parquet as pq

    try:
        data = read_beside(source, MANIFEST_FILE)
    except EmbsegError as exc:
        raise EmbsegError(f"{exc}; repeat-factor sampling plans from its per-image class "
                          f"lists") from None
    try:
        names = pq.read_schema(io.BytesIO(data)).names
        missing = [column for column in MANIFEST_COLUMNS if column not in names]
        if missing:
            raise EmbsegError(f"{location}: manifest has no column {missing[0]!r} (needed for "
                              "repeat-factor sampling; rebuild the shards with `embseg build`)")
        return pq.read_table(io.BytesIO(data), columns=list(MANIFEST_COLUMNS)).to_pylist()
    except EmbsegError:
        raise
    except Exception as exc:  # noqa: BLE001 - pyarrow raises several types for damaged files
        raise EmbsegError(f"{location}: manifest unreadable ({exc})") from None


def train_loader(shards: str | Path | ShardSource, *, num_classes: int, batch_size: int,
                 crop_size: int, seed: int = 0, num_workers: int = 2, shuffle_buffer: int = 256,
                 on_bad_sample: str = "skip", state: LoaderState | None = None,
                 start_step: int = 0, pin_memory: bool = False,
                 repeat_threshold: float | None = None) -> TrainBatches:
    """Endless augmented training batches from ``shards`` (a ``--shards`` value: a folder,
    pattern, URL or ``pipe:`` command; see :mod:`embseg.data.sources`).

    The batches are a deterministic function of (shards, seed, batch_size, crop_size,
    num_workers, shuffle_buffer, repeat_threshold): resuming with the ``state`` saved after
    step ``start_step`` continues exactly as the uninterrupted loader would have.
    ``num_workers`` DataLoader workers (0: in-process) each serve one stream; a resumed loader
    must use the same number. ``repeat_threshold``: repeat-factor sampling with that ``t``
    (:mod:`embseg.sampling`; factors from ``manifest.parquet``), off when None.
    """
    check_policy(on_bad_sample)
    num_streams = max(1, num_workers)
    if state is None:
        state = LoaderState.fresh(num_streams)
    if len(state.streams) != num_streams:
        raise EmbsegError(f"{shards}: loader state has {len(state.streams)} streams but "
                          f"{num_workers} workers were asked for (resume with the same "
                          f"--num-workers)")
    source = shard_source(shards)
    spec = TrainLoaderSpec(shards=tuple(zip(source.urls, source.names, strict=True)),
                           num_classes=num_classes, batch_size=batch_size, crop_size=crop_size,
                           seed=seed, num_streams=num_streams, shuffle_buffer=shuffle_buffer,
                           on_bad_sample=on_bad_sample, expected_keys=manifest_keys(source),
                           repeat_factors=_planned_repeats(source, repeat_threshold))
    return TrainBatches(spec, state, start_step=start_step, num_workers=num_workers,
                        pin_memory=pin_memory)


