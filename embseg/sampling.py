"""Repeat-factor sampling for the long tail (LVIS: Gupta, Dollar and Girshick, CVPR 2019).

Images that hold rare classes are shown more often. With a threshold ``t``:

- ``f(c)``: the fraction of training images that contain class ``c``
  (:func:`class_image_fractions`);
- ``r(c) = max(1, sqrt(t / f(c)))``: the class's repeat factor (:func:`class_repeat_factor`);
- an image's factor ``r`` is the largest ``r(c)`` over the classes present in it, 1 for an
  image without any class (:func:`image_repeat_factor`);
- in each epoch an image appears ``floor(r)`` times, plus once more with probability
  ``r - floor(r)`` (:func:`epoch_repeats`).

The factors are planned from ``manifest.parquet`` (the per-image class lists the build
recorded), so no image is decoded (:func:`repeat_factors`). The per-epoch count of an image is
a pure function of (seed, epoch, sample key): the same for any number of loader workers and
any reading order, so a resumed run repeats exactly what an uninterrupted one would.
:func:`repeat_samples` applies the counts to a stream of samples; the training loader calls it
once per epoch, before its shuffle buffer (which spreads the copies apart).
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any

from embseg.errors import EmbsegError

REPEAT_INDEX = "__repeat__"
"""Key of a repeated sample's copy number (0 for the first copy) in the sample dict."""

_MANIFEST_COLUMNS = ("key", "status", "class_ids")


def class_image_fractions(class_lists: Sequence[Iterable[int]]) -> dict[int, float]:
    """``f(c)``: the fraction of the images (one class list each) that contain class ``c``.

    An image counts once per class however often the class occurs in its list.
    """
    if not class_lists:
        return {}
    counts: dict[int, int] = {}
    for classes in class_lists:
        for class_id in set(classes):
            counts[class_id] = counts.get(class_id, 0) + 1
    return {class_id: count / len(class_lists) for class_id, count in counts.items()}


def class_repeat_factor(fraction: float, threshold: float) -> float:
    """``r(c) = max(1, sqrt(t / f(c)))`` for a class in a ``fraction`` f(c) > 0 of the images."""
    if not fraction > 0:
        raise ValueError(f"class image fraction must be > 0, not {fraction}")
    return max(1.0, math.sqrt(threshold / fraction))


def image_repeat_factor(classes: Iterable[int], class_factors: dict[int, float]) -> float:
    """An image's factor: the largest ``r(c)`` over its classes (1 for an image with none)."""
    return max((class_factors[class_id] for class_id in classes), default=1.0)


def _check_threshold(threshold: float) -> None:
    if not (isinstance(threshold, int | float) and math.isfinite(threshold) and threshold > 0):
        raise EmbsegError(f"repeat threshold must be a number > 0, not {threshold!r}")


def repeat_factors(manifest: Path, threshold: float) -> dict[str, float]:
    """Sample key -> repeat factor for every ``ok`` row of ``manifest.parquet``.

    ``f(c)`` counts over those rows (the images the shards hold), from their ``class_ids``
    lists; nothing is decoded. Raises EmbsegError naming the file when it is missing,
    unreadable, lacks a column, or lists a key twice.
    """
    _check_threshold(threshold)
    manifest = Path(manifest)
    if not manifest.is_file():
        raise EmbsegError(f"{manifest}: manifest missing; repeat-factor sampling plans from its "
                          "per-image class lists (build the shards with `embseg build`)")
    import pyarrow.parquet as pq

    try:
        names = pq.read_schema(manifest).names
    except Exception as exc:
        raise EmbsegError(f"{manifest}: manifest unreadable ({exc})") from None
    missing = [column for column in _MANIFEST_COLUMNS if column not in names]
    if missing:
        raise EmbsegError(f"{manifest}: manifest has no column {missing[0]!r} (needed for "
                          "repeat-factor sampling; rebuild the shards with `embseg build`)")
    rows = pq.read_table(manifest, columns=list(_MANIFEST_COLUMNS)).to_pylist()
    images: dict[str, list[int]] = {}
    for row in rows:
        if row["status"] != "ok":
            continue
        key = str(row["key"])
        if key in images:
            raise EmbsegError(f"{manifest}: key {key}: listed twice among the ok rows")
        images[key] = [int(c) for c in row["class_ids"] or []]
    fractions = class_image_fractions(list(images.values()))
    class_factors = {c: class_repeat_factor(f, threshold) for c, f in fractions.items()}
    return {key: image_repeat_factor(classes, class_factors) for key, classes in images.items()}


def _unit_uniform(*, seed: int, epoch: int, key: str) -> float:
    """A number in [0, 1) that is a pure function of (seed, epoch, key).

    A counter-based generator: 53 bits of BLAKE2b of the three values (the same on every
    machine, in every process and in any order of calls).
    """
    digest = hashlib.blake2b(f"{int(seed)}\0{int(epoch)}\0{key}".encode(), digest_size=8,
                             person=b"embseg-rfs").digest()
    return (int.from_bytes(digest, "big") >> 11) * 2.0 ** -53


def epoch_repeats(factor: float, *, seed: int, epoch: int, key: str) -> int:
    """How often the image ``key`` appears in ``epoch``: floor(r), plus 1 with probability
    r - floor(r), drawn from a generator seeded by (seed, epoch, key). Never 0 (r >= 1)."""
    if not factor >= 1:
        raise ValueError(f"repeat factor must be >= 1, not {factor}")
    whole = math.floor(factor)
    return whole + (_unit_uniform(seed=seed, epoch=epoch, key=key) < factor - whole)


def repeat_samples(samples: Iterable[Any], factors: dict[str, float] | None, *, seed: int,
                   epoch: int) -> Iterator[Any]:
    """Each sample dict (with ``__key__``) :func:`epoch_repeats` times in a row, every copy a
    shallow copy carrying its copy number under :data:`REPEAT_INDEX`; anything else (a bad
    item marker) passes through once. ``factors=None``: the stream unchanged. A key the
    factors do not list (absent from the manifest) counts 1."""
    if factors is None:
        yield from samples
        return
    for sample in samples:
        if not isinstance(sample, dict):
            yield sample
            continue
        key = sample["__key__"]
        count = epoch_repeats(factors.get(key, 1.0), seed=seed, epoch=epoch, key=key)
        for copy in range(count):
            yield {**sample, REPEAT_INDEX: copy}


def describe_factors(factors: dict[str, float], threshold: float) -> str:
    """One line for the log: how many images repeat and the expected epoch length."""
    repeated = sum(1 for r in factors.values() if r > 1)
    expected = sum(factors.values())
    top = max(factors.values(), default=1.0)
    return (f"repeat-factor sampling (t = {threshold:g}): {repeated} of {len(factors)} images "
            f"repeated (largest factor {top:.2f}); about {expected:.0f} samples per epoch "
            f"instead of {len(factors)}")
