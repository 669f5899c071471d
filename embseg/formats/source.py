"""The label-map formats as sources of the build (:class:`embseg.buildsource.BuildSource`).

The build plans shards over :attr:`SourcePlan.images` (one per item, in key order) and sends
each shard's :class:`FormatShardWork` (the shard's items: keys and relative paths, plus the
value map) to the worker that writes the shard; there :meth:`FormatShardWork.process` runs
:func:`embseg.formats.core.process_pair`. A shard's digest covers each item's key, its two
file names, its listing-time failure and both files' size and mtime, so a changed, added or
removed image or label rebuilds only the shards it touches.

The split is listed afresh on every build (no plan cache): for ADE20K, Cityscapes and COCO-Stuff
the folder listing is the index, which no file digest can vouch for.
"""

from __future__ import annotations

import argparse
import hashlib
import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from embseg.buildsource import PlannedImage, SourcePlan
from embseg.errors import EmbsegError
from embseg.formats import LVIS, open_dataset
from embseg.formats.core import LabelMapDataset, PairItem, ValueMap, process_pair
from embseg.labels import ImageResult


@dataclass(frozen=True)
class FormatShardWork:
    """One shard's items: small (keys, relative paths and the value map, no pixels)."""

    format: str
    root: Path
    value_map: ValueMap
    items: tuple[PairItem, ...]

    def __len__(self) -> int:
        return len(self.items)

    def process(self, index: int) -> ImageResult:
        """Item ``index`` of the shard as a sample, or ``failed`` with its reason."""
        return process_pair(self.items[index], self.root, self.value_map, fmt=self.format)


def _planned(item: PairItem, root: Path) -> PlannedImage:
    paths = item.paths(root)
    digest = hashlib.sha256(json.dumps([item.key, item.image, item.label, item.image_id,
                                        item.failure]).encode("utf-8")).digest()
    return PlannedImage(key=item.key, image_id=item.image_id, file_name=item.file_name,
                        rel_path=item.rel_path,
                        stat_paths=tuple(str(p) for p in paths),
                        digest=digest)


class FormatSource:
    """A split of an ADE20K / Cityscapes / VOC / COCO-Stuff-maps / label-map dataset.

    The split is listed when the source is made, so a missing folder or a broken split or class
    list is an :class:`~embseg.errors.EmbsegError` before anything is written.
    """

    def __init__(self, format: str, *, images: Path, split: str, labels: Path | None = None,
                 classes: Path | None = None, unlabelled: int | None = None) -> None:
        self.dataset: LabelMapDataset = open_dataset(
            format, images=images, split=split, labels=labels, classes=classes,
            unlabelled=unlabelled)
        self.kind = self.dataset.format

    def input_files(self) -> list[Path]:
        """The split list (VOC) or class list (labelmap) whose bytes decide the items."""
        return list(self.dataset.source_files)

    def options(self) -> dict:
        """What else decides every sample: the format and its value map."""
        return {"format": self.dataset.format, "value_map": self.dataset.value_map.digest()}

    def plan(self) -> SourcePlan:
        """The vocabulary, one planned image per item, and each shard's work."""
        dataset = self.dataset
        items = tuple(dataset.items)

        def work(start: int, stop: int) -> FormatShardWork:
            return FormatShardWork(format=dataset.format, root=dataset.root,
                                   value_map=dataset.value_map, items=items[start:stop])

        return SourcePlan(vocab=dataset.vocab,
                          images=[_planned(item, dataset.root) for item in items], work=work)

    def plan_from_arrays(self, arrays: dict[str, np.ndarray]) -> SourcePlan | None:
        """None: the folder listing is the index, so every build lists the split again."""
        return None


def source_from_args(args: argparse.Namespace) -> FormatSource | None:
    """The source of ``embseg build``'s options: None for ``--format lvis`` (the annotation
    build of :mod:`embseg.build`), else a :class:`FormatSource`. EmbsegError for options of
    another format."""
    fmt = getattr(args, "format", LVIS)
    labelmap_options = [name for name in ("labels", "classes", "unlabelled")
                        if getattr(args, name, None) is not None]
    if fmt == LVIS:
        if args.lvis is None or not args.coco_stuff:
            raise EmbsegError("--format lvis (the default) needs --lvis and --coco-stuff; for a "
                              "dataset in its own layout give --format (ade20k, cityscapes, voc, "
                              "coco-stuff-maps, labelmap)")
        if labelmap_options:
            raise EmbsegError(f"--{labelmap_options[0]} is for --format labelmap, not lvis")
        return None
    if args.lvis is not None or args.coco_stuff:
        raise EmbsegError(f"--lvis and --coco-stuff are for --format lvis, not {fmt}")
    if getattr(args, "overlap", "first") != "first":
        raise EmbsegError(f"--overlap is for --format lvis (instance masks), not {fmt}")
    return FormatSource(fmt, images=args.images, split=args.split, labels=args.labels,
                        classes=args.classes, unlabelled=args.unlabelled)
