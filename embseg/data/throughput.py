"""Throughput of the training input pipeline, for ``embseg bench``: shards against the same
samples as loose image / label files."""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import torch

from embseg.data.decode import augmented_tensors, decode_sample
from embseg.data.reading import BadItem, read_shard
from embseg.data.sources import read_num_classes, shard_source
from embseg.data.train_stream import train_loader


def _export_loose_files(shards: str | Path, loose_dir: Path) -> list[tuple[Path, Path]]:
    """Write every shard sample as loose ``<key>.jpg`` / ``<key>.png`` files (once)."""
    loose_dir.mkdir(parents=True, exist_ok=True)
    pairs = []
    for shard in shard_source(shards).urls:
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


def loader_throughput(shards_dir: str | Path, *, images: int, source: str = "shards",
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
        image, label = decode_sample(sample, self.num_classes)
        rng = np.random.default_rng(index)
        return augmented_tensors(image, label, crop_size=self.crop_size, rng=rng)

