"""Datasets in their own folder layouts and label tables, built into embseg's shard format.

``embseg build --format NAME`` reads one of these (``lvis``, the default, is the LVIS v1 +
COCO-Stuff annotation build of :mod:`embseg.build`):

| format | ROOT | splits | class ids |
| --- | --- | --- | --- |
| ``ade20k`` | ``ADEChallengeData2016`` | ``training``, ``validation`` | 150; ADE value v -> v |
| ``cityscapes`` | the folder of ``leftImg8bit/``, ``gtFine/`` | ``train``, ``val`` | 19; train id t -> t + 1 |
| ``voc`` | ``VOCdevkit/VOC2012`` | ``train``, ``val``, ``trainval`` | 21; VOC value v -> v + 1 |
| ``coco-stuff-maps`` | the folder of ``train2017/``, ``stuffthingmaps_trainval2017/`` | ``train2017``, ``val2017`` | 171; COCO ids in order |
| ``labelmap`` | the images folder (+ ``--labels``, ``--classes``) | any name | the class list's |

Each module states its layout, keys and value mapping; :mod:`embseg.formats.core` holds what
they share, including the per-item work (:func:`~embseg.formats.core.process_pair`).
"""

from __future__ import annotations

import importlib
from pathlib import Path
from typing import TYPE_CHECKING

from embseg.errors import EmbsegError

if TYPE_CHECKING:
    from embseg.formats.core import LabelMapDataset

LVIS = "lvis"
# format name -> its module (imported when used: the CLI reads the names without numpy/PIL)
MODULES = {"ade20k": "embseg.formats.ade20k", "cityscapes": "embseg.formats.cityscapes",
           "voc": "embseg.formats.voc", "coco-stuff-maps": "embseg.formats.coco_stuff_maps",
           "labelmap": "embseg.formats.labelmap"}
FORMAT_NAMES = (LVIS, *MODULES)


def open_dataset(format: str, *, images: Path, split: str, labels: Path | None = None,
                 classes: Path | None = None, unlabelled: int | None = None) -> LabelMapDataset:
    """List one split of a dataset in format ``format`` (not ``lvis``) rooted at ``images``.

    Raises EmbsegError (one line naming the folder or file) for what makes the whole split
    unusable: an unknown format or split, a missing folder, a broken split or class list.
    Per-item problems are in the items' ``failure``.
    """
    if format not in MODULES:
        raise EmbsegError(f"--format {format!r}: choose one of {', '.join(FORMAT_NAMES)}"
                          + (" (lvis is the annotation-file build of embseg.build)"
                             if format == LVIS else ""))
    module = importlib.import_module(MODULES[format])
    images = Path(images)
    if format == "labelmap":
        return module.open_split(images, split, labels=labels, classes=classes,
                                 unlabelled=unlabelled)
    if labels is not None or classes is not None or unlabelled is not None:
        raise EmbsegError(f"--labels, --classes and --unlabelled are for --format labelmap, "
                          f"not {format}")
    if not images.is_dir():
        raise EmbsegError(f"{images}: dataset root folder not found")
    return module.open_split(images, split)


__all__ = ["FORMAT_NAMES", "LVIS", "MODULES", "open_dataset"]
