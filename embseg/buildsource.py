"""What a dataset source gives the build (:mod:`embseg.build`), whatever its format.

A build is a *source* (format-specific: parse the annotation files once, the vocabulary, the
per-image work) plus the build itself (format-independent: shards, digests, reuse, Ray,
workers that write their shards, manifest, failures, ``build_info.json``).

- :class:`BuildSource` is what the caller hands to :func:`embseg.build.plan_build`.
- Its :meth:`~BuildSource.plan` returns a :class:`SourcePlan`: the vocabulary, one
  :class:`PlannedImage` per image in key order, and ``work(start, stop)``, which packs the
  records of ``images[start:stop]`` into a small picklable :class:`ShardWork`.
- The Ray task that writes one shard calls :meth:`ShardWork.process` for each of its images,
  in the worker: that is where files are read, masks decoded and label maps painted.

Per-image problems are never raised: ``process`` returns an
:class:`embseg.labels.ImageResult` with status ``failed`` (or ``skipped``) and a one-line
reason, also for problems found while planning (which the source keeps in its records).
Problems that make a whole input unusable raise :class:`embseg.errors.EmbsegError` from
``plan`` with one line naming the file and the item.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Protocol, runtime_checkable

import numpy as np

from embseg.vocab import VocabClass, Vocabulary

if TYPE_CHECKING:
    from embseg.labels import ImageResult


@dataclass(frozen=True)
class PlannedImage:
    """One image of a plan: its manifest fields and what its shard digest needs.

    ``stat_paths``: files whose size and mtime enter the shard digest (the image, a label
    file, ...); empty when the image is never opened (a load-time failure). ``digest``: a
    digest of everything else the worker uses for this image (annotations, sizes, a
    load-time failure), from bytes the source already has, never re-serialised data.
    """

    key: str
    image_id: int
    file_name: str
    rel_path: str
    stat_paths: tuple[str, ...]
    digest: bytes


@runtime_checkable
class ShardWork(Protocol):
    """The records of one shard's images, sent to the Ray task that writes the shard."""

    def __len__(self) -> int:
        """Number of images (in key order)."""

    def process(self, index: int) -> ImageResult:
        """Image ``index`` of this shard, processed in the worker; never raises for a
        per-image problem."""


@dataclass
class SourcePlan:
    """A parsed source: the vocabulary, the images in key order and their work packer.

    ``arrays`` (optional): the plan as plain numpy arrays (no object dtype), stored by the
    build so that an unchanged rebuild skips parsing (:meth:`BuildSource.plan_from_arrays`).
    """

    vocab: Vocabulary
    images: list[PlannedImage]
    work: Callable[[int, int], ShardWork]
    arrays: dict[str, np.ndarray] | None = field(default=None, repr=False)


@runtime_checkable
class BuildSource(Protocol):
    """A dataset format's planner (see the module docstring)."""

    kind: str

    def input_files(self) -> list[Path]:
        """The annotation/index files; the build stores their sha256 (unchanged rebuilds)."""

    def options(self) -> dict:
        """JSON-able settings that change the output (they enter every shard digest)."""

    def plan(self) -> SourcePlan:
        """Parse each input once (EmbsegError for a fatal input problem)."""

    def plan_from_arrays(self, arrays: dict[str, np.ndarray]) -> SourcePlan | None:
        """The plan again from :attr:`SourcePlan.arrays` without parsing (None: not cached)."""


def vocabulary_to_array(vocab: Vocabulary) -> np.ndarray:
    """A vocabulary as a 0-d unicode array (for :attr:`SourcePlan.arrays`)."""
    payload = {"classes": [asdict(c) for c in vocab.classes],
               "stuff_other_ids": list(vocab.stuff_other_ids)}
    return np.array(json.dumps(payload, ensure_ascii=False, sort_keys=True))


def vocabulary_from_array(array: np.ndarray) -> Vocabulary:
    """Inverse of :func:`vocabulary_to_array`."""
    payload = json.loads(str(array[()]))
    return Vocabulary(classes=tuple(VocabClass(**c) for c in payload["classes"]),
                      stuff_other_ids=tuple(payload["stuff_other_ids"]))
