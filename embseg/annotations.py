"""LVIS v1 and COCO-Stuff annotation files as a build source: compact per-image records.

:class:`LvisCocoStuffSource` plans a build (:mod:`embseg.buildsource`): each file is indexed
once by :func:`embseg.jsonindex.index_json_file` (byte spans of every image, annotation and
category, no Python objects for the 1.2 GB of polygons), the images and categories are parsed,
each annotation element is parsed only for its ids and checked, and the plan keeps per image a
few numbers and per annotation (file, byte offset, length, class id, element hash). A worker
reads its own shard's annotations back from the files by their spans
(:class:`LvisShardWork`) and paints them with :func:`embseg.labels.process_image`.

Whatever makes a whole file unusable (missing, empty, malformed JSON, not LVIS/COCO format,
unknown category, duplicate image ids, ...) raises :class:`EmbsegError` with one line naming
the file and the item. Problems of a single image found at load time (unsafe path, sizes that
disagree between files) are recorded as that image's failure, and the build records the image
as failed and goes on. The input images are the LVIS file's images; COCO-Stuff files only add
labels. :func:`load_build_inputs` gives the same plan as plain :class:`ImageItem` objects with
their annotation dicts (for tests and small tools).
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import Any
from urllib.parse import urlparse

import numpy as np

from embseg.buildsource import (
    PlannedImage,
    SourcePlan,
    vocabulary_from_array,
    vocabulary_to_array,
)
from embseg.errors import EmbsegError
from embseg.fileio import read_file_bytes
from embseg.jsonindex import (
    ArraySpans,
    ElementReader,
    JsonIndex,
    index_json_file,
    parse_element,
)
from embseg.vocab import (
    Vocabulary,
    combine_stuff_categories,
    merge_vocabulary,
    validate_categories,
)

SOURCE_KIND = "lvis-coco-stuff"
PLAN_VERSION = 1  # bump when the records or their digests change meaning


@dataclass
class ImageItem:
    """One input image with its annotations from every file (class ids already resolved).

    ``lvis_anns`` and ``stuff_anns`` keep file order (the painting order) and each dict carries
    ``class_id``: the merged class id (0 for COCO-Stuff ``other``). ``failure`` holds a problem
    found at load time; such an item is recorded as failed and its path is never opened.
    """

    image_id: int
    rel_path: str
    height: int
    width: int
    lvis_anns: list[dict] = field(default_factory=list)
    stuff_anns: list[dict] = field(default_factory=list)
    in_stuff: bool = False
    failure: str | None = None

    @property
    def key(self) -> str:
        """The WebDataset ``__key__``: the image id zero-padded to 12 digits."""
        return f"{self.image_id:012d}"

    @property
    def file_name(self) -> str:
        """The image file's own name (COCO ``file_name`` style, e.g. ``000000391895.jpg``)."""
        return PurePosixPath(self.rel_path).name

    def image_path(self, images_root: Path) -> Path | None:
        """Where the image file lies under ``images_root``; None for a failed item."""
        if self.failure is not None:
            return None
        return Path(images_root) / self.rel_path


@dataclass
class BuildInputs:
    """The plan of :class:`LvisCocoStuffSource` as plain items (see :func:`load_build_inputs`)."""

    vocab: Vocabulary
    items: list[ImageItem]
    source_files: list[Path]


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _safe_relative(text: str) -> str | None:
    """``text`` as a relative POSIX path inside the images root, or None if it could escape."""
    pure = PurePosixPath(text)
    if not text or "\x00" in text or pure.is_absolute() or ".." in pure.parts:
        return None
    parts = [p for p in pure.parts if p != "."]
    return "/".join(parts) if parts else None


def image_rel_path(image: dict) -> tuple[str, str | None]:
    """Relative image path (``train2017/000000391895.jpg``) and a failure reason or None.

    From LVIS ``coco_url`` the last two path parts; without ``coco_url``, ``file_name``. A path
    that could leave the images root (``..`` anywhere, absolute) is refused with a reason.
    """
    url = image.get("coco_url")
    if isinstance(url, str) and url:
        url_path = urlparse(url).path
        parts = [p for p in url_path.split("/") if p and p != "."]
        if ".." in parts:
            return url, f"unsafe path: coco_url {url!r} contains '..'"
        if not parts:
            return url, f"coco_url {url!r} names no file"
        return "/".join(parts[-2:]), None
    name = image.get("file_name")
    if isinstance(name, str) and name:
        safe = _safe_relative(name)
        if safe is None:
            return name, f"unsafe path: file_name {name!r} is absolute or contains '..'"
        return safe, None
    return "", "image has neither 'coco_url' nor 'file_name'"


_KIND_NAMES = {"object": "dict", "array": "list", "string": "str", "number": "a number",
               "true": "bool", "false": "bool", "null": "NoneType"}


@dataclass
class _IndexedFile:
    """One LVIS/COCO file, indexed and checked: its images and categories parsed, its
    annotations as spans plus their ids."""

    path: Path
    images: list[dict]
    categories: list[dict]
    spans: ArraySpans
    ann_ids: np.ndarray
    ann_image_ids: np.ndarray
    ann_category_ids: np.ndarray


def _index_file(path: Path) -> _IndexedFile:
    """Index, parse and check one LVIS/COCO-format file (EmbsegError naming file and item)."""
    path = Path(path)
    raw = read_file_bytes(path)
    index = index_json_file(path, raw)
    for key in ("images", "annotations", "categories"):
        if key not in index.kinds:
            raise EmbsegError(f"{path}: not an LVIS/COCO annotation file (no '{key}')")
        if index.kinds[key] != "array":
            raise EmbsegError(f"{path}: not an LVIS/COCO annotation file ('{key}' is "
                              f"{_KIND_NAMES[index.kinds[key]]}, expected a list)")
    data = memoryview(raw)  # slices of it are parsed without copies; freed with ``raw``
    images = _parse_all(data, index, "images", path)
    categories = validate_categories(_parse_all(data, index, "categories", path), str(path))
    _check_images(path, images)
    ids, image_ids, category_ids = _annotation_ids(data, index.arrays["annotations"], path)
    del data, raw
    _check_annotations(path, ids, image_ids, category_ids,
                       np.array([img["id"] for img in images], dtype=np.int64),
                       np.array([cat["id"] for cat in categories], dtype=np.int64))
    return _IndexedFile(path=path, images=images, categories=categories,
                        spans=index.arrays["annotations"], ann_ids=ids,
                        ann_image_ids=image_ids, ann_category_ids=category_ids)


def _parse_all(data: memoryview, index: JsonIndex, key: str, path: Path) -> list:
    spans = index.arrays[key]
    what = key[:-1] if key != "categories" else "category"
    return [parse_element(data[o:o + n], path, f"{what} #{i}", o)
            for i, (o, n) in enumerate(zip(spans.offsets.tolist(), spans.lengths.tolist(), strict=True))]


def _annotation_ids(data: memoryview, spans: ArraySpans,
                    path: Path) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """id, image_id and category_id of every annotation (each element parsed once, then
    dropped: the segmentations are read again by the workers). The types are checked on the
    collected columns; the first bad annotation is then found and named."""
    import orjson

    ids, image_ids, category_ids = [], [], []
    loads = orjson.loads
    offsets, lengths = spans.offsets.tolist(), spans.lengths.tolist()
    try:
        for offset, length in zip(offsets, lengths, strict=True):
            ann = loads(data[offset:offset + length])
            ids.append(ann.get("id"))
            image_ids.append(ann.get("image_id"))
            category_ids.append(ann.get("category_id"))
    except (orjson.JSONDecodeError, AttributeError):
        index = len(ids)
        offset = offsets[index]
        parse_element(bytes(data[offset:offset + lengths[index]]), path,  # names a JSON error
                            f"annotation #{index}", offset)
        raise EmbsegError(f"{path}: annotation #{index} has no integer 'id'") from None
    if not all(set(map(type, column)) <= {int} for column in (ids, image_ids, category_ids)):
        for index, (ann_id, image_id, category_id) in enumerate(
                zip(ids, image_ids, category_ids, strict=True)):
            if not _is_int(ann_id):
                raise EmbsegError(f"{path}: annotation #{index} has no integer 'id'")
            for key, value in (("image_id", image_id), ("category_id", category_id)):
                if not _is_int(value):
                    raise EmbsegError(f"{path}: annotation id {ann_id} has no integer '{key}'")
    as_array = lambda values: np.array(values, dtype=np.int64)  # noqa: E731
    return as_array(ids), as_array(image_ids), as_array(category_ids)


def _check_images(path: Path, images: list) -> None:
    seen: set[int] = set()
    for index, image in enumerate(images):
        if not isinstance(image, dict) or not _is_int(image.get("id")):
            raise EmbsegError(f"{path}: image #{index} has no integer 'id'")
        for dim in ("height", "width"):
            if not _is_int(image.get(dim)) or image[dim] <= 0:
                raise EmbsegError(f"{path}: image id {image['id']} has no positive integer "
                                  f"'{dim}'")
        if image["id"] in seen:
            raise EmbsegError(f"{path}: duplicate image id {image['id']}")
        seen.add(image["id"])


def _first_later_duplicate(values: np.ndarray) -> int | None:
    """Index of the first element (in order) whose value appeared before it, or None."""
    if len(values) < 2:
        return None
    order = np.argsort(values, kind="stable")
    repeated = values[order][1:] == values[order][:-1]
    return int(order[1:][repeated].min()) if repeated.any() else None


def _check_annotations(path: Path, ids: np.ndarray, image_ids: np.ndarray,
                       category_ids: np.ndarray, known_images: np.ndarray,
                       known_categories: np.ndarray) -> None:
    """Duplicate ids, unknown categories and unknown images; the first bad annotation in file
    order is reported (for one annotation, in that order of checks)."""
    problems: list[tuple[int, int, str]] = []
    duplicate = _first_later_duplicate(ids)
    if duplicate is not None:
        problems.append((duplicate, 0, f"duplicate annotation id {ids[duplicate]}"))
    unknown = np.flatnonzero(~np.isin(category_ids, known_categories))
    if len(unknown):
        i = int(unknown[0])
        problems.append((i, 1, f"annotation id {ids[i]} has category_id {category_ids[i]}, "
                               "which is not in 'categories'"))
    orphan = np.flatnonzero(~np.isin(image_ids, known_images))
    if len(orphan):
        i = int(orphan[0])
        problems.append((i, 2, f"annotation id {ids[i]} refers to image id {image_ids[i]}, "
                               "which is not in 'images'"))
    if problems:
        raise EmbsegError(f"{path}: {min(problems)[2]}")


def _size_failure(lvis: Path, image: dict, stuff: Path, stuff_image: dict) -> str | None:
    lvis_size = (image["width"], image["height"])
    stuff_size = (stuff_image["width"], stuff_image["height"])
    if lvis_size == stuff_size:
        return None
    return (f"size disagrees between files: {lvis.name} says {lvis_size[0]}x{lvis_size[1]}, "
            f"{stuff.name} says {stuff_size[0]}x{stuff_size[1]} (width x height)")


def _lookup(mapping: dict[int, int], keys: np.ndarray) -> np.ndarray:
    """``mapping[k]`` for every k of ``keys`` (all present), vectorised."""
    if not len(keys):
        return np.zeros(0, dtype=np.int64)
    table_keys = np.array(sorted(mapping), dtype=np.int64)
    table_values = np.array([mapping[k] for k in table_keys.tolist()], dtype=np.int64)
    return table_values[np.searchsorted(table_keys, keys)]


_ANN_DTYPE = np.dtype([("file", "<i2"), ("class_id", "<i4"), ("hash", "<u8")])


@dataclass(frozen=True)
class LvisCocoStuffSource:
    """An LVIS v1 file plus COCO-Stuff files as a build source (:mod:`embseg.buildsource`)."""

    lvis: Path
    coco_stuff: tuple[Path, ...]
    images_root: Path
    overlap: str = "first"
    kind: str = SOURCE_KIND

    def input_files(self) -> list[Path]:
        return [Path(self.lvis), *(Path(p) for p in self.coco_stuff)]

    def options(self) -> dict:
        return {"overlap": self.overlap, "plan_version": PLAN_VERSION}

    def plan(self) -> SourcePlan:
        lvis = _index_file(self.lvis)
        stuff_files = [_index_file(p) for p in self.coco_stuff]
        self._check_images_root()
        stuff_categories = combine_stuff_categories(
            [(str(s.path), s.categories) for s in stuff_files])
        vocab = merge_vocabulary(lvis.categories, stuff_categories, lvis_source=str(lvis.path),
                                 stuff_source=", ".join(str(s.path) for s in stuff_files))
        stuff_image: dict[int, tuple[int, dict]] = {}
        for number, stuff in enumerate(stuff_files):
            for image in stuff.images:
                seen = stuff_image.get(image["id"])
                if seen is not None:
                    raise EmbsegError(f"image id {image['id']} appears in two COCO-Stuff files: "
                                      f"{stuff_files[seen[0]].path} and {stuff.path}")
                stuff_image[image["id"]] = (number, image)

        images = sorted(lvis.images, key=lambda img: img["id"])
        image_ids = np.array([img["id"] for img in images], dtype=np.int64)
        rel_paths, failures, in_stuff = [], [], []
        for image in images:
            rel_path, failure = image_rel_path(image)
            found = stuff_image.get(image["id"])
            if found is not None:
                number, other = found
                size_failure = _size_failure(lvis.path, image, stuff_files[number].path, other)
                failure = "; ".join(f for f in (failure, size_failure) if f) or None
            rel_paths.append(rel_path)
            failures.append(failure or "")
            in_stuff.append(found is not None)

        # every annotation of an input image: (image position, file, file order) order
        parts = []
        for number, (indexed, mapping) in enumerate(
                [(lvis, vocab.lvis_to_class), *((s, vocab.stuff_to_class) for s in stuff_files)]):
            position = np.searchsorted(image_ids, indexed.ann_image_ids)
            position = np.minimum(position, max(len(image_ids) - 1, 0))
            keep = (image_ids[position] == indexed.ann_image_ids) if len(image_ids) else \
                np.zeros(len(indexed.ann_ids), dtype=bool)
            parts.append({
                "position": position[keep], "file": np.full(int(keep.sum()), number, np.int16),
                "order": np.flatnonzero(keep), "offset": indexed.spans.offsets[keep],
                "length": indexed.spans.lengths[keep], "hash": indexed.spans.hashes[keep],
                "class_id": _lookup(mapping, indexed.ann_category_ids[keep]).astype(np.int32)})
        anns = {key: np.concatenate([p[key] for p in parts]) for key in parts[0]}
        order = np.lexsort((anns["order"], anns["file"], anns["position"]))
        anns = {key: value[order] for key, value in anns.items()}
        arrays = {
            "image_id": image_ids,
            "height": np.array([img["height"] for img in images], dtype=np.int64),
            "width": np.array([img["width"] for img in images], dtype=np.int64),
            "rel_path": np.array(rel_paths, dtype=np.str_),
            "failure": np.array(failures, dtype=np.str_),
            "in_stuff": np.array(in_stuff, dtype=bool),
            "ann_start": np.searchsorted(anns["position"], np.arange(len(images) + 1)),
            "ann_file": anns["file"], "ann_offset": anns["offset"],
            "ann_length": anns["length"], "ann_hash": anns["hash"],
            "ann_class_id": anns["class_id"],
            "vocab": vocabulary_to_array(vocab),
        }
        return self._plan(arrays, vocab)

    def plan_from_arrays(self, arrays: dict[str, np.ndarray]) -> SourcePlan | None:
        self._check_images_root()
        return self._plan(arrays, vocabulary_from_array(arrays["vocab"]))

    def _check_images_root(self) -> None:
        if not Path(self.images_root).is_dir():
            raise EmbsegError(f"{self.images_root}: images root folder not found")

    def _plan(self, arrays: dict[str, np.ndarray], vocab: Vocabulary) -> SourcePlan:
        files = [str(p) for p in self.input_files()]
        stamps = [_stamp(Path(f)) for f in files]
        rows = np.empty(len(arrays["ann_file"]), dtype=_ANN_DTYPE)
        rows["file"], rows["class_id"], rows["hash"] = (
            arrays["ann_file"], arrays["ann_class_id"], arrays["ann_hash"])
        starts = arrays["ann_start"].tolist()
        root = Path(self.images_root)
        planned = []
        for i, (image_id, rel_path, failure) in enumerate(zip(
                arrays["image_id"].tolist(), arrays["rel_path"].tolist(),
                arrays["failure"].tolist(), strict=True)):
            digest = hashlib.blake2b(digest_size=16)
            digest.update(f"{image_id}\0{rel_path}\0{arrays['height'][i]}\0"
                          f"{arrays['width'][i]}\0{failure}\0{bool(arrays['in_stuff'][i])}\0"
                          .encode())
            digest.update(rows[starts[i]:starts[i + 1]].tobytes())
            planned.append(PlannedImage(
                key=f"{image_id:012d}", image_id=image_id,
                file_name=PurePosixPath(rel_path).name, rel_path=rel_path,
                stat_paths=() if failure else (str(root / rel_path),),
                digest=digest.digest()))

        def work(start: int, stop: int) -> LvisShardWork:
            first, last = starts[start], starts[stop]
            return LvisShardWork(
                files=files, stamps=stamps, images_root=str(root), overlap=self.overlap,
                image={k: arrays[k][start:stop] for k in _IMAGE_FIELDS},
                ann_start=arrays["ann_start"][start:stop + 1] - first,
                ann={k: arrays[k][first:last] for k in _ANN_FIELDS})

        return SourcePlan(vocab=vocab, images=planned, work=work, arrays=arrays)


_IMAGE_FIELDS = ("image_id", "height", "width", "rel_path", "failure", "in_stuff")
_ANN_FIELDS = ("ann_file", "ann_offset", "ann_length", "ann_class_id")


def _stamp(path: Path) -> tuple[int, int]:
    info = path.stat()
    return info.st_size, info.st_mtime_ns


@dataclass
class LvisShardWork:
    """The records of one shard's images (:class:`embseg.buildsource.ShardWork`): a few
    numbers per image and per annotation; the annotations are read back by their byte spans
    in the worker."""

    files: list[str]
    stamps: list[tuple[int, int]]
    images_root: str
    overlap: str
    image: dict[str, np.ndarray]
    ann_start: np.ndarray
    ann: dict[str, np.ndarray]
    _readers: dict[int, ElementReader] = field(default_factory=dict, repr=False, compare=False)

    def __len__(self) -> int:
        return len(self.image["image_id"])

    def __getstate__(self) -> dict:
        return {**self.__dict__, "_readers": {}}

    def _reader(self, number: int) -> ElementReader:
        reader = self._readers.get(number)
        if reader is None:
            path = Path(self.files[number])
            try:
                now = _stamp(path)
            except OSError as exc:
                raise EmbsegError(f"{path}: cannot read ({' '.join(str(exc).split())})") from exc
            if now != tuple(self.stamps[number]):
                raise EmbsegError(f"{path}: the file changed after the build was planned; "
                                  "run the build again")
            reader = self._readers[number] = ElementReader(path)
        return reader

    def item(self, index: int) -> ImageItem:
        """Image ``index`` as an :class:`ImageItem` with its annotation dicts (read here)."""
        lvis_anns, stuff_anns = [], []
        for j in range(int(self.ann_start[index]), int(self.ann_start[index + 1])):
            number = int(self.ann["ann_file"][j])
            offset = int(self.ann["ann_offset"][j])
            ann = self._reader(number).parse(offset, int(self.ann["ann_length"][j]),
                                             "annotation")
            ann["class_id"] = int(self.ann["ann_class_id"][j])
            (lvis_anns if number == 0 else stuff_anns).append(ann)
        failure = str(self.image["failure"][index])
        return ImageItem(image_id=int(self.image["image_id"][index]),
                         rel_path=str(self.image["rel_path"][index]),
                         height=int(self.image["height"][index]),
                         width=int(self.image["width"][index]), lvis_anns=lvis_anns,
                         stuff_anns=stuff_anns, in_stuff=bool(self.image["in_stuff"][index]),
                         failure=failure or None)

    def process(self, index: int):
        """:func:`embseg.labels.process_image` of image ``index``."""
        from embseg.labels import process_image

        return process_image(self.item(index), Path(self.images_root), overlap=self.overlap)

    def close(self) -> None:
        for reader in self._readers.values():
            reader.close()
        self._readers.clear()


def load_build_inputs(lvis_path: Path, stuff_paths: list[Path], images_root: Path) -> BuildInputs:
    """The plan of :class:`LvisCocoStuffSource` as items with their annotation dicts.

    Raises EmbsegError (one line naming the file and the item) for every fatal input problem.
    """
    source = LvisCocoStuffSource(lvis=Path(lvis_path), coco_stuff=tuple(map(Path, stuff_paths)),
                                 images_root=Path(images_root))
    plan = source.plan()
    work = plan.work(0, len(plan.images))
    try:
        items = [work.item(i) for i in range(len(work))]
    finally:
        work.close()
    return BuildInputs(vocab=plan.vocab, items=items, source_files=source.input_files())
