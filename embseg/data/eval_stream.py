"""The evaluation loader: one pass over the shards, full images, no augmentation."""

from __future__ import annotations

import logging
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from embseg.data.decode import decode_sample, label_to_target, normalize_image
from embseg.data.reading import BadItem
from embseg.data.sources import ShardSource, manifest_keys, shard_source
from embseg.data.streams import check_policy, epoch_items, stack
from embseg.errors import EmbsegError

log = logging.getLogger(__name__)


@dataclass
class EvalBatch:
    """Full-size images of one size: images (B,3,H,W) normalised, targets (B,H,W) int64."""

    image: torch.Tensor
    label: torch.Tensor
    keys: list[str]


class _EvalStreams(torch.utils.data.IterableDataset):
    """One pass over the shards; batches group consecutive images of equal size."""

    def __init__(self, shards: list[tuple[str, str]], expected: dict[str, list[str]], *,
                 num_classes: int, batch_size: int, on_bad_sample: str,
                 num_streams: int) -> None:
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
        items = epoch_items(self.shards, self.expected, stream=stream,
                            num_streams=self.num_streams, epoch=0, seed=0, shuffle_buffer=0,
                            shuffle_shards=False)
        return self._batches(items)

    def _batches(self, items: Iterator[dict | BadItem]) -> Iterator[dict[str, Any]]:
        pending: list[tuple[str, torch.Tensor, torch.Tensor]] = []
        skipped: list[str] = []
        for item in items:
            if not isinstance(item, BadItem):
                try:
                    image, label = decode_sample(item, self.num_classes)
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
        return {"keys": [p[0] for p in pending], "image": stack([p[1] for p in pending]),
                "label": stack([p[2] for p in pending]), "skipped": skipped}


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


def eval_loader(shards: str | Path | ShardSource, *, num_classes: int, batch_size: int = 4,
                num_workers: int = 0, on_bad_sample: str = "fail") -> EvalBatches:
    """One pass over ``shards`` (a ``--shards`` value: a folder, pattern, URL or ``pipe:``
    command; see :mod:`embseg.data.sources`): full images, no augmentation.

    Batches hold up to ``batch_size`` consecutive images of the same size. Bad samples raise
    EmbsegError naming shard and key (``"fail"``, the default) or are counted (``"skip"``).
    """
    check_policy(on_bad_sample)
    source = shard_source(shards)
    dataset = _EvalStreams(list(zip(source.urls, source.names, strict=True)),
                           manifest_keys(source), num_classes=num_classes, batch_size=batch_size,
                           on_bad_sample=on_bad_sample, num_streams=max(1, num_workers))
    return EvalBatches(dataset, num_workers)


