"""The dataset build: a source (annotation files + images) -> WebDataset shards, on Ray.

Stages (each a function, so the Prefect rebuild flow can run them as tasks):

1. :func:`plan_build` asks the source (:mod:`embseg.buildsource`; LVIS + COCO-Stuff by
   default) for its plan: the vocabulary and compact per-image records, sorted by key, each
   image keeping its slot whatever happens to it later. It hashes the source's input files
   (sha256 of their bytes), and each shard of ``shard_size`` images gets a digest of its
   records' digests, the image files' sizes and mtimes, the options and the vocabulary.
   When the input files' digests equal those of the last build of the split, the plan is
   read back from ``.parts/<split>.plan.npz`` instead of parsing: an unchanged rebuild checks
   only file digests and image stats.
2. :func:`execute_plan` writes ``classes.parquet`` and runs one Ray task per shard to redo
   (:func:`write_shard`): the worker processes its images (:meth:`ShardWork.process`), writes
   the shard straight into the output folder and its record, and returns only the manifest
   rows. No image bytes reach the driver. Then ``manifest.parquet`` and ``build_info.json``.

Output: a local folder or any fsspec URL (``s3://bucket/prefix``); workers and driver open it
with ``fsspec.core.url_to_fs``. On a cluster a local path must be a shared file system.

Determinism: a shard's bytes depend only on its inputs, not on which worker, how many
workers or nodes wrote it. Samples are in key order, members ``<key>.jpg``, ``<key>.json``,
``<key>.seg.png``, tar headers fixed (mtime 0, uid/gid 0, empty owner names, mode 0644,
ustar), JSON with sorted keys and compact separators; the bytes equal what Python's
``tarfile`` writes for the same members.

Crash safety: on a local folder a shard is written under a hidden name
(``.<split>-000000.tar.partial``, never matching ``*-NNNNNN.tar``) and fsynced; then its
record ``.parts/<split>-000000.parquet`` (manifest rows, input digest, sha256, size and stamp
(size, mtime) of the tar) is written atomically; then the tar is renamed into place. On an
object store the finished shard is one PUT (an object appears whole or not at all), then its
record. A rerun reuses every shard whose tar and record exist with the same input digest and
whose file still has the recorded stamp, and redoes the rest; stale partial files are removed.
``build_info.json`` forgets the split when a build starts and records it when the build ends,
so :func:`last_build_hash` never vouches for a half-built split.
"""

from __future__ import annotations

import argparse
import contextlib
import errno
import fcntl
import hashlib
import io
import json
import os
import posixpath
import re
import sys
import tarfile
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from tqdm import tqdm

from embseg.annotations import LvisCocoStuffSource
from embseg.buildsource import BuildSource, PlannedImage, ShardWork, SourcePlan
from embseg.errors import EmbsegError
from embseg.fileio import fsync_dir, write_bytes_atomically
from embseg.labels import OVERLAP_MODES, ImageResult
from embseg.raywork import map_unordered, ray_runtime, task_exception, warm_up
from embseg.vocab import Vocabulary

BUILD_FORMAT = "embseg-shards-v1"
PARTS_DIR = ".parts"
MANIFEST_NAME = "manifest.parquet"
CLASSES_NAME = "classes.parquet"
BUILD_INFO_NAME = "build_info.json"
MEMBER_SUFFIXES = ("jpg", "json", "seg.png")
_SPLIT_NAME = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_-]*")
_META_DIGEST = b"embseg.input_digest"
_META_SHA = b"embseg.tar_sha256"
_META_SIZE = b"embseg.tar_size"
_META_STAMP = b"embseg.tar_stamp"
_PLAN_META = "__plan_meta__"
_MANIFEST_SCHEMA = pa.schema([
    ("split", pa.string()),
    ("key", pa.string()),
    ("image_id", pa.int64()),
    ("file_name", pa.string()),
    ("rel_path", pa.string()),
    ("shard", pa.string()),
    ("status", pa.string()),
    ("reason", pa.string()),
    ("class_ids", pa.list_(pa.int32())),
    ("pixel_counts", pa.list_(pa.int64())),
])


@dataclass(frozen=True)
class PlannedShard:
    """One shard of the plan: the images ``images[start:stop]`` and their digest."""

    index: int
    name: str
    start: int
    stop: int
    input_digest: str


@dataclass
class BuildPlan:
    """What a build will do; a pure function of the inputs (nothing written yet)."""

    split: str
    out: Path | str
    shard_size: int
    source_kind: str
    source: SourcePlan
    shards: list[PlannedShard]
    input_hash: str
    file_digests: list[tuple[str, str]]  # (input file, sha256)
    source_options: dict = field(default_factory=dict)
    from_cache: bool = False
    plan_seconds: float = 0.0

    @property
    def vocab(self) -> Vocabulary:
        """The merged vocabulary (written as ``classes.parquet``)."""
        return self.source.vocab

    @property
    def images(self) -> list[PlannedImage]:
        """Every image of the split, in key order."""
        return self.source.images

    @property
    def n_images(self) -> int:
        return len(self.source.images)

    @property
    def source_files(self) -> list[Path]:
        """The input files the plan came from."""
        return [Path(path) for path, _ in self.file_digests]

    @property
    def inputs(self) -> PlanInputs:
        """The vocabulary, the images and the input files together (as earlier versions had
        them)."""
        return PlanInputs(vocab=self.vocab, items=self.images, source_files=self.source_files)


@dataclass(frozen=True)
class PlanInputs:
    """See :attr:`BuildPlan.inputs`."""

    vocab: Vocabulary
    items: list[PlannedImage]
    source_files: list[Path]


@dataclass
class BuildReport:
    """Outcome of a build (also stored, without the paths, in ``build_info.json``)."""

    split: str
    n_images: int
    n_ok: int
    n_skipped: int
    n_failed: int
    shards: list[Path | str]
    shard_bytes: list[int]
    reused_shards: int
    seconds: float
    images_per_second: float
    manifest_path: Path | str
    classes_path: Path | str
    input_hash: str
    failures: list[tuple[str, str]] = field(default_factory=list)  # (key, reason), first 20

    def summary(self) -> str:
        """The one-line result the CLI prints."""
        written = len(self.shards) - self.reused_shards
        return (f"embseg build: split {self.split}: {self.n_images} images -> {self.n_ok} ok, "
                f"{self.n_skipped} skipped, {self.n_failed} failed; {len(self.shards)} "
                f"shard{'' if len(self.shards) == 1 else 's'} ({written} written, {self.reused_shards} reused) in {self.seconds:.1f} s, "
                f"{self.images_per_second:.1f} images/s")


class ImageFailuresError(EmbsegError):
    """Some images failed (recorded in the manifest) and failures were not allowed: exit 1."""

    exit_code = 1

    def __init__(self, report: BuildReport):
        key, reason = report.failures[0] if report.failures else ("?", "?")
        super().__init__(f"{report.n_failed} of {report.n_images} images failed (reasons in "
                         f"{report.manifest_path}; first: {key}: {reason}); pass "
                         "--allow-failures to accept")
        self.report = report


# --------------------------------------------------------------------------- output folder


class OutputFolder:
    """The output folder: a local directory (crash-safe renames) or an fsspec URL."""

    def __init__(self, out: Path | str):
        import fsspec
        from fsspec.implementations.local import LocalFileSystem

        self.url = str(out)
        self.fs, root = fsspec.core.url_to_fs(self.url)
        self.local = isinstance(self.fs, LocalFileSystem)
        self.root = Path(root) if self.local else root.rstrip("/")

    def path(self, *names: str) -> Path | str:
        """Where ``names`` (relative, ``/``-separated) lie: a Path locally, else a URL path."""
        if self.local:
            return Path(self.root, *names)
        return posixpath.join(self.root, *names)

    def display(self, *names: str) -> Path | str:
        """A name for messages and reports (local Path, or the URL)."""
        if self.local:
            return self.path(*names)
        return posixpath.join(self.url.rstrip("/"), *names)

    def makedirs(self) -> None:
        if self.local:
            Path(self.root, PARTS_DIR).mkdir(parents=True, exist_ok=True)
        else:
            with contextlib.suppress(Exception):  # object stores have no folders
                self.fs.makedirs(self.path(PARTS_DIR), exist_ok=True)

    def is_file(self, *names: str) -> bool:
        if self.local:
            return self.path(*names).is_file()
        return self.fs.isfile(self.path(*names))

    def read_bytes(self, *names: str) -> bytes:
        if self.local:
            return self.path(*names).read_bytes()
        return self.fs.cat_file(self.path(*names))

    def write(self, data: bytes, *names: str) -> None:
        """Write a whole file: hidden partial + fsync + rename locally, one PUT elsewhere."""
        if self.local:
            target = self.path(*names)
            write_bytes_atomically(target, data, temporary=_partial_name(target))
        else:
            self.fs.pipe_file(self.path(*names), data)

    def remove(self, *names: str) -> None:
        if self.local:
            self.path(*names).unlink(missing_ok=True)
        else:
            with contextlib.suppress(FileNotFoundError):
                self.fs.rm_file(self.path(*names))

    def names(self, *folder: str) -> list[str]:
        """File names in a folder (empty if there is none)."""
        if self.local:
            directory = self.path(*folder)
            return sorted(p.name for p in directory.iterdir()) if directory.is_dir() else []
        try:
            return sorted(posixpath.basename(p.rstrip("/"))
                          for p in self.fs.ls(self.path(*folder), detail=False))
        except FileNotFoundError:
            return []

    def stamp(self, *names: str) -> str | None:
        """What tells a file's version apart without reading it: size and mtime (ns) locally,
        size and ETag (or modification time) on a store; None if the file is missing."""
        if self.local:
            try:
                info = self.path(*names).stat()
            except FileNotFoundError:
                return None
            return f"{info.st_size}:{info.st_mtime_ns}"
        try:
            info = self.fs.info(self.path(*names))
        except FileNotFoundError:
            return None
        version = next((str(info[k]) for k in ("ETag", "etag", "mtime", "LastModified",
                                                 "last_modified") if info.get(k)), "")
        return f"{info.get('size')}:{version}"


# --------------------------------------------------------------------------- plan


def plan_build(*, source: BuildSource | None = None, lvis: Path | None = None,
               coco_stuff: list[Path] | None = None, images: Path | None = None,
               out: Path | str, split: str = "train", shard_size: int = 1000,
               overlap: str = "first") -> BuildPlan:
    """Plan the build of ``split`` into ``out`` (nothing is written).

    ``source`` is any :class:`~embseg.buildsource.BuildSource`; without it, the LVIS file
    ``lvis``, the COCO-Stuff files ``coco_stuff`` and the images root ``images`` make one
    (:class:`~embseg.annotations.LvisCocoStuffSource` with ``overlap``).
    """
    started = time.perf_counter()
    if overlap not in OVERLAP_MODES:
        raise EmbsegError(f"--overlap must be one of {', '.join(OVERLAP_MODES)} (got {overlap!r})")
    if source is None:
        if lvis is None or coco_stuff is None or images is None:
            raise TypeError("plan_build needs a source, or lvis, coco_stuff and images")
        source = LvisCocoStuffSource(lvis=Path(lvis), coco_stuff=tuple(map(Path, coco_stuff)),
                                     images_root=Path(images), overlap=overlap)
    folder = OutputFolder(out)
    _check_parameters(split=split, shard_size=shard_size, folder=folder)
    header = {"format": BUILD_FORMAT, "source": source.kind, "options": source.options()}
    file_digests = [(str(path), _file_sha256(Path(path))) for path in source.input_files()]
    meta = {**header, "files": file_digests}
    cached = _read_plan_cache(folder, split, meta)
    plan = source.plan_from_arrays(cached) if cached is not None else None
    from_cache = plan is not None
    if plan is None:
        plan = source.plan()
    if not plan.images:
        raise EmbsegError(f"{file_digests[0][0] if file_digests else source.kind}: the source "
                          "lists no images: nothing to build")
    header["vocabulary"] = plan.vocab.content_hash()
    shards = []
    for index, start in enumerate(range(0, len(plan.images), shard_size)):
        stop = min(start + shard_size, len(plan.images))
        digest = hashlib.sha256(_canonical_json(header))
        for image in plan.images[start:stop]:
            digest.update(image.key.encode() + b"\0" + image.digest)
            digest.update(_stats(image.stat_paths))
        shards.append(PlannedShard(index=index, name=shard_name(split, index), start=start,
                                   stop=stop, input_digest=digest.hexdigest()))
    total = hashlib.sha256(_canonical_json({**header, "split": split, "shard_size": shard_size}))
    for _, sha in file_digests:
        total.update(sha.encode())
    for shard in shards:
        total.update(shard.input_digest.encode())
    return BuildPlan(split=split, out=out, shard_size=shard_size, source_kind=source.kind,
                     source=plan, shards=shards, input_hash=total.hexdigest(),
                     file_digests=file_digests, source_options=header["options"],
                     from_cache=from_cache,
                     plan_seconds=time.perf_counter() - started)


def shard_name(split: str, index: int) -> str:
    """``<split>-NNNNNN.tar``: the final name of shard ``index``."""
    return f"{split}-{index:06d}.tar"


def _check_parameters(*, split: str, shard_size: int, folder: OutputFolder) -> None:
    if not _SPLIT_NAME.fullmatch(split):
        raise EmbsegError(f"--split {split!r}: use letters, digits, '_' and '-' only")
    if shard_size < 1:
        raise EmbsegError(f"--shard-size must be at least 1 (got {shard_size})")
    if folder.local and folder.root.exists() and not folder.root.is_dir():
        raise EmbsegError(f"{folder.root}: output path exists and is not a folder")


def _canonical_json(value: object) -> bytes:
    return json.dumps(value, sort_keys=True, separators=(",", ":"), ensure_ascii=True,
                      default=repr).encode("utf-8")


def _stats(paths: tuple[str, ...]) -> bytes:
    """Size and mtime of each file (or why there is none): the images' part of a digest."""
    if not paths:
        return b"not opened;"
    parts = []
    for path in paths:
        try:
            info = os.stat(path)
            parts.append(f"{info.st_size},{info.st_mtime_ns};")
        except OSError as exc:
            parts.append(f"unavailable: {errno.errorcode.get(exc.errno or 0, exc.errno)};")
    return "".join(parts).encode()


def _file_sha256(path: Path) -> str:
    if not path.exists():
        raise EmbsegError(f"{path}: file not found")
    if not path.is_file():
        raise EmbsegError(f"{path}: not a file")
    digest = hashlib.sha256()
    try:
        with open(path, "rb") as handle:
            for block in iter(lambda: handle.read(1 << 22), b""):
                digest.update(block)
    except OSError as exc:
        raise EmbsegError(f"{path}: cannot read ({' '.join(str(exc).split())})") from exc
    return digest.hexdigest()


def _plan_cache_name(split: str) -> str:
    return f"{split}.plan.npz"


def _read_plan_cache(folder: OutputFolder, split: str, meta: dict) -> dict | None:
    """The arrays of the split's last plan if it came from the same files and settings."""
    try:
        data = folder.read_bytes(PARTS_DIR, _plan_cache_name(split))
        with np.load(io.BytesIO(data), allow_pickle=False) as npz:
            arrays = {name: npz[name] for name in npz.files}
        if json.loads(str(arrays.pop(_PLAN_META)[()])) != json.loads(_canonical_json(meta)):
            return None
        return arrays
    except Exception:  # missing, damaged or from other inputs: plan from the files
        return None


def _write_plan_cache(folder: OutputFolder, plan: BuildPlan) -> None:
    if plan.source.arrays is None:
        return
    header = {"format": BUILD_FORMAT, "source": plan.source_kind,
              "options": plan.source_options, "files": plan.file_digests}
    buffer = io.BytesIO()
    np.savez(buffer, **plan.source.arrays, **{_PLAN_META: np.array(
        _canonical_json(header).decode())})
    folder.write(buffer.getvalue(), PARTS_DIR, _plan_cache_name(plan.split))


# --------------------------------------------------------------------------- execute


@dataclass(frozen=True)
class ShardTarget:
    """Where and what a shard task writes: the shard, its record, its images' manifest
    fields."""

    out: str
    split: str
    name: str
    input_digest: str
    keys: list[str]
    image_ids: list[int]
    file_names: list[str]
    rel_paths: list[str]


@dataclass
class ShardDone:
    """What a shard task returns (no image bytes): manifest rows and the tar's identity."""

    name: str
    rows: pa.Table
    size: int
    stamp: str
    reused: bool = False


def execute_plan(plan: BuildPlan, *, workers: int | None = None, ray_address: str | None = None,
                 progress: bool = True) -> BuildReport:
    """Build the shards of ``plan`` on Ray (reusing finished ones) and write the outputs.

    Writes ``classes.parquet`` first, then the shards (written by the workers), then
    ``manifest.parquet`` (replacing only this split's rows) and ``build_info.json``.
    ``seconds`` excludes Ray start-up (including the workers' imports).
    """
    folder = OutputFolder(plan.out)
    folder.makedirs()
    with _split_lock(folder, plan.split):
        _check_vocabulary_compatible(plan, folder)
        _forget_split(folder, plan.split)
        _remove_stale_files(plan, folder)
        folder.write(plan.vocab.parquet_bytes(), CLASSES_NAME)
        if not plan.from_cache:
            _write_plan_cache(folder, plan)
        records: dict[int, ShardDone] = {}
        todo = []
        for shard in plan.shards:
            reused = _reusable_record(plan, shard, folder)
            if reused is not None:
                records[shard.index] = reused
            else:
                todo.append(shard)
        bar = tqdm(total=plan.n_images, unit="img", desc=f"build {plan.split}",
                   disable=not progress, file=sys.stderr, mininterval=0.5)
        bar.update(sum(len(r.rows) for r in records.values()))
        with bar:
            if todo:
                with ray_runtime(workers=workers, ray_address=ray_address) as runtime:
                    warm_up(runtime.cpus, (__name__, "embseg.labels", "embseg.rle",
                                           "embseg.annotations"))
                    started = time.perf_counter()
                    _build_shards(plan, todo, records, cpus=runtime.cpus, bar=bar)
                    seconds = time.perf_counter() - started
            else:
                seconds = 0.0
        n_processed = sum(s.stop - s.start for s in todo)
        return _finish(plan, folder, records, seconds=seconds, n_processed=n_processed)


def build_shards(*, lvis: Path | None = None, coco_stuff: list[Path] | None = None,
                 images: Path | None = None, out: Path | str, source: BuildSource | None = None,
                 split: str = "train", shard_size: int = 1000, overlap: str = "first",
                 workers: int | None = None, ray_address: str | None = None,
                 progress: bool = True, allow_failures: bool = False) -> BuildReport:
    """:func:`plan_build` + :func:`execute_plan`.

    Raises :class:`ImageFailuresError` (exit code 1, outputs already written) when images
    failed and ``allow_failures`` is False.
    """
    plan = plan_build(source=source, lvis=lvis, coco_stuff=coco_stuff, images=images, out=out,
                      split=split, shard_size=shard_size, overlap=overlap)
    report = execute_plan(plan, workers=workers, ray_address=ray_address, progress=progress)
    if report.n_failed and not allow_failures:
        raise ImageFailuresError(report)
    return report


def _target(plan: BuildPlan, shard: PlannedShard) -> ShardTarget:
    images = plan.images[shard.start:shard.stop]
    return ShardTarget(out=str(plan.out), split=plan.split, name=shard.name,
                       input_digest=shard.input_digest, keys=[i.key for i in images],
                       image_ids=[i.image_id for i in images],
                       file_names=[i.file_name for i in images],
                       rel_paths=[i.rel_path for i in images])


def _build_shards(plan: BuildPlan, todo: list[PlannedShard], records: dict[int, ShardDone],
                  *, cpus: int, bar: tqdm) -> None:
    """One Ray task per shard; a shard whose worker died is redone with its crashing images
    found and recorded as failed."""
    shards = {shard.index: shard for shard in todo}
    jobs = ((shard.index, (plan.source.work(shard.start, shard.stop), _target(plan, shard)))
            for shard in todo)
    for index, done in map_unordered(write_shard, jobs, max_in_flight=2 * cpus,
                                     return_exceptions=True):
        if isinstance(done, BaseException):
            done = _after_task_error(plan, shards[index], done)
        records[index] = done
        bar.update(len(done.rows))


def _after_task_error(plan: BuildPlan, shard: PlannedShard, error: BaseException) -> ShardDone:
    """A shard task failed: re-raise the error of our own code, or, when its worker died
    (even after Ray's retries), probe each image in its own task and redo the shard with
    those that kill a worker recorded as failed."""
    cause = task_exception(error)
    if cause is not None:
        if isinstance(cause, EmbsegError):
            raise EmbsegError(str(cause)) from None
        if isinstance(cause, OSError):
            raise EmbsegError(f"{OutputFolder(plan.out).display(shard.name)}: cannot write the "
                              f"shard ({' '.join(str(cause).split())})") from None
        raise cause
    work = plan.source.work(shard.start, shard.stop)
    probes = map_unordered(probe_image, ((i, (work, i)) for i in range(len(work))),
                           max_in_flight=max(1, len(work)), return_exceptions=True)
    crashed = {}
    for position, value in probes:
        if isinstance(value, BaseException) and task_exception(value) is None:
            reason = " ".join(str(value).split())[:300] or type(value).__name__
            crashed[position] = f"processing crashed its worker ({type(value).__name__}: {reason})"
    retry = dict(map_unordered(write_shard, [(0, (work, _target(plan, shard), crashed))],
                               max_in_flight=1, return_exceptions=True))[0]
    if isinstance(retry, BaseException):
        cause = task_exception(retry)
        if isinstance(cause, EmbsegError):
            raise EmbsegError(str(cause)) from None
        raise EmbsegError(f"shard {shard.name}: its task failed again after the images that "
                          f"crash a worker were set aside ({type(retry).__name__})")
    return retry


def probe_image(work: ShardWork, index: int) -> str:
    """Ray task: process one image and return only its status (finds images that kill a
    worker)."""
    return work.process(index).status


# --------------------------------------------------------------------------- the shard task


def write_shard(work: ShardWork, target: ShardTarget,
                crashed: dict[int, str] | None = None) -> ShardDone:
    """Ray task: process the shard's images, write the shard and its record, return the rows.

    Images in ``crashed`` are recorded as failed with that reason without being processed.
    """
    folder = OutputFolder(target.out)
    crashed = crashed or {}
    results: list[ImageResult] = []
    digest, size = hashlib.sha256(), 0

    def members() -> Iterator[bytes]:
        nonlocal size
        for index in range(len(work)):
            if index in crashed:
                result = ImageResult(image_id=target.image_ids[index], key=target.keys[index],
                                     status="failed", reason=crashed[index])
            else:
                result = work.process(index)
            if result.key != target.keys[index]:
                raise RuntimeError(f"result {result.key} arrived in the slot of "
                                   f"{target.keys[index]}")
            if result.status == "ok":
                block = sample_tar_blocks(result)
                digest.update(block)
                size += len(block)
                yield block
            results.append(_without_bytes(result))
        end = tar_end(size)
        digest.update(end)
        size += len(end)
        yield end

    final = folder.path(target.name)
    try:
        if folder.local:
            partial = _partial_name(final)
            with open(partial, "wb") as handle:
                for block in members():
                    handle.write(block)
                handle.flush()
                os.fsync(handle.fileno())
            info = os.stat(partial)
            stamp = f"{info.st_size}:{info.st_mtime_ns}"  # a rename keeps both
        else:
            with folder.fs.open(final, "wb") as handle:  # one object, whole or not at all
                for block in members():
                    handle.write(block)
            stamp = folder.stamp(target.name) or ""
        rows = _manifest_table(target, results)
        table = rows.replace_schema_metadata({
            _META_DIGEST: target.input_digest.encode(), _META_SHA: digest.hexdigest().encode(),
            _META_SIZE: str(size).encode(), _META_STAMP: stamp.encode()})
        folder.write(_parquet_bytes(table), PARTS_DIR, _record_name(target.name))
        if folder.local:
            os.replace(partial, final)
            fsync_dir(folder.root)
    finally:
        close = getattr(work, "close", None)
        if close is not None:
            close()
    return ShardDone(name=target.name, rows=rows, size=size, stamp=stamp)


def _without_bytes(result: ImageResult) -> ImageResult:
    result.jpg = result.seg_png = result.meta = None
    return result


def _manifest_table(target: ShardTarget, results: list[ImageResult]) -> pa.Table:
    return pa.Table.from_pydict({
        "split": [target.split] * len(results), "key": target.keys,
        "image_id": target.image_ids, "file_name": target.file_names,
        "rel_path": target.rel_paths, "shard": [target.name] * len(results),
        "status": [r.status for r in results], "reason": [r.reason or None for r in results],
        "class_ids": [[int(c) for c in r.class_ids] for r in results],
        "pixel_counts": [[int(c) for c in r.pixel_counts] for r in results],
    }, schema=_MANIFEST_SCHEMA)


# --------------------------------------------------------------------------- shard files


def tar_member(name: str, data: bytes) -> bytes:
    """One tar member (ustar header, data, NUL padding) with fixed owner, mode and mtime."""
    info = tarfile.TarInfo(name)
    info.size = len(data)
    info.mtime = 0
    info.mode = 0o644
    info.uid = info.gid = 0
    info.uname = info.gname = ""
    info.type = tarfile.REGTYPE
    header = info.tobuf(format=tarfile.USTAR_FORMAT, encoding="utf-8", errors="strict")
    padding = -len(data) % tarfile.BLOCKSIZE
    return header + data + tarfile.NUL * padding


def sample_tar_blocks(result: ImageResult) -> bytes:
    """The members of one sample, in the fixed order ``.jpg``, ``.json``, ``.seg.png``."""
    members = {"jpg": result.jpg, "json": _canonical_json(result.meta), "seg.png": result.seg_png}
    return b"".join(tar_member(f"{result.key}.{suffix}", members[suffix])
                    for suffix in MEMBER_SUFFIXES)


def tar_end(offset: int) -> bytes:
    """End of archive after ``offset`` bytes: two zero blocks, then zeros up to a full record
    (what Python's tarfile writes, so shards equal a tarfile-written archive)."""
    offset += 2 * tarfile.BLOCKSIZE
    return tarfile.NUL * (2 * tarfile.BLOCKSIZE + (-offset % tarfile.RECORDSIZE))


def _record_name(name: str) -> str:
    return f"{name[:-len('.tar')]}.parquet"


def _reusable_record(plan: BuildPlan, shard: PlannedShard,
                     folder: OutputFolder) -> ShardDone | None:
    """The finished shard from an earlier run, if its inputs are the same and its file still
    has the stamp (size, mtime / ETag) recorded when it was written."""
    if not folder.is_file(PARTS_DIR, _record_name(shard.name)):
        return None
    stamp = folder.stamp(shard.name)
    if stamp is None:
        return None
    try:
        table = pq.read_table(io.BytesIO(folder.read_bytes(PARTS_DIR, _record_name(shard.name))))
        table = table.cast(_MANIFEST_SCHEMA.with_metadata(table.schema.metadata))
    except Exception:  # a damaged record only means the shard is rebuilt
        return None
    meta = table.schema.metadata or {}
    if meta.get(_META_DIGEST, b"").decode() != shard.input_digest:
        return None
    if meta.get(_META_STAMP, b"").decode() != stamp:
        return None
    if table.column("key").to_pylist() != [i.key for i in plan.images[shard.start:shard.stop]]:
        return None
    return ShardDone(name=shard.name, rows=table.replace_schema_metadata(None),
                     size=int(meta[_META_SIZE]), stamp=stamp, reused=True)


def _remove_stale_files(plan: BuildPlan, folder: OutputFolder) -> None:
    """Delete partial files of this split, and shards/records beyond the plan's shard count."""
    split = re.escape(plan.split)
    finished = re.compile(rf"{split}-(\d{{6}})\.(tar|parquet)")
    partial = re.compile(rf"\.{split}-\d{{6}}\.(tar|parquet)\.partial")
    for sub in ((), (PARTS_DIR,)):
        for name in folder.names(*sub):
            match = finished.fullmatch(name)
            if partial.fullmatch(name) or (match and int(match.group(1)) >= len(plan.shards)):
                folder.remove(*sub, name)


# --------------------------------------------------------------------------- outputs


def _finish(plan: BuildPlan, folder: OutputFolder, records: dict[int, ShardDone], *,
            seconds: float, n_processed: int) -> BuildReport:
    table = pa.concat_tables([records[i].rows for i in sorted(records)])
    if table.num_rows != plan.n_images:
        raise RuntimeError(f"manifest has {table.num_rows} rows for {plan.n_images} images")
    _write_manifest(folder, plan.split, table)
    statuses = table.column("status").to_pylist()
    counts = {status: statuses.count(status) for status in ("ok", "skipped", "failed")}
    failed = [i for i, status in enumerate(statuses) if status == "failed"][:20]
    keys, reasons = table.column("key"), table.column("reason")
    report = BuildReport(
        split=plan.split, n_images=table.num_rows, n_ok=counts["ok"],
        n_skipped=counts["skipped"], n_failed=counts["failed"],
        shards=[folder.display(records[i].name) for i in sorted(records)],
        shard_bytes=[records[i].size for i in sorted(records)],
        reused_shards=sum(r.reused for r in records.values()), seconds=seconds,
        images_per_second=n_processed / seconds if seconds > 0 else 0.0,
        manifest_path=folder.display(MANIFEST_NAME), classes_path=folder.display(CLASSES_NAME),
        input_hash=plan.input_hash,
        failures=[(keys[i].as_py(), reasons[i].as_py()) for i in failed],
    )
    _record_split(folder, report, plan)
    return report


def _write_manifest(folder: OutputFolder, split: str, rows: pa.Table) -> None:
    """Replace this split's rows of ``manifest.parquet`` (other splits' rows are kept)."""
    tables = [rows]
    if folder.is_file(MANIFEST_NAME):
        try:
            existing = pq.read_table(io.BytesIO(folder.read_bytes(MANIFEST_NAME)))
        except Exception as exc:
            raise EmbsegError(f"{folder.display(MANIFEST_NAME)}: existing manifest is "
                              f"unreadable ({exc}); move it away to rebuild") from None
        if "split" in existing.column_names:
            existing = existing.cast(_MANIFEST_SCHEMA)
            keep = np.asarray(existing.column("split").to_numpy(zero_copy_only=False) != split)
            tables.append(existing.filter(pa.array(keep)))
    merged = pa.concat_tables(tables).sort_by([("split", "ascending"), ("key", "ascending")])
    folder.write(_parquet_bytes(merged), MANIFEST_NAME)


def _parquet_bytes(table: pa.Table) -> bytes:
    buffer = pa.BufferOutputStream()
    pq.write_table(table, buffer)
    return buffer.getvalue().to_pybytes()


def _read_build_info(folder: OutputFolder) -> dict:
    try:
        info = json.loads(folder.read_bytes(BUILD_INFO_NAME).decode("utf-8"))
    except (OSError, ValueError):
        return {"splits": {}}
    if not isinstance(info, dict) or not isinstance(info.get("splits"), dict):
        return {"splits": {}}
    return info


def _forget_split(folder: OutputFolder, split: str) -> None:
    """Drop the split from ``build_info.json`` before any of its shards change."""
    info = _read_build_info(folder)
    if split not in info["splits"] and info.get("split") != split:
        return
    info["splits"].pop(split, None)
    if info.get("split") == split:  # the top level described this split's last build
        info = {"splits": info["splits"]}
    folder.write(_pretty_json(info), BUILD_INFO_NAME)


def _record_split(folder: OutputFolder, report: BuildReport, plan: BuildPlan) -> None:
    """Store the finished build in ``build_info.json``: top level = latest build, per split."""
    entry = {
        "split": report.split, "input_hash": report.input_hash, "format": BUILD_FORMAT,
        "source": plan.source_kind,
        "input_files": [{"path": path, "sha256": sha} for path, sha in plan.file_digests],
        "n_images": report.n_images, "n_ok": report.n_ok, "n_skipped": report.n_skipped,
        "n_failed": report.n_failed,
        "shards": [posixpath.basename(str(p)) for p in report.shards],
        "shard_bytes": report.shard_bytes,
        "reused_shards": report.reused_shards, "seconds": round(report.seconds, 3),
        "images_per_second": round(report.images_per_second, 2),
    }
    info = _read_build_info(folder)
    info["splits"][report.split] = entry
    folder.write(_pretty_json({**entry, "splits": info["splits"]}), BUILD_INFO_NAME)


def last_build_hash(out: Path | str, split: str) -> str | None:
    """The input hash of the last completed build of ``split`` in ``out``, if still intact.

    None when there was none, a build of the split started since, or a listed shard, the
    manifest or the vocabulary is missing or has another size.
    """
    folder = OutputFolder(out)
    entry = _read_build_info(folder)["splits"].get(split)
    if not isinstance(entry, dict) or entry.get("format") != BUILD_FORMAT:
        return None
    if not folder.is_file(MANIFEST_NAME) or not folder.is_file(CLASSES_NAME):
        return None
    for name, size in zip(entry.get("shards", []), entry.get("shard_bytes", []), strict=False):
        stamp = folder.stamp(name)
        if stamp is None or stamp.split(":", 1)[0] != str(size):
            return None
    return entry.get("input_hash")


def _check_vocabulary_compatible(plan: BuildPlan, folder: OutputFolder) -> None:
    """Refuse to mix splits built with different vocabularies in one folder."""
    if not folder.is_file(CLASSES_NAME):
        return
    other_splits = set(_read_build_info(folder)["splits"]) - {plan.split}
    if not other_splits:
        return
    if folder.local:
        existing = Vocabulary.read_parquet(folder.path(CLASSES_NAME))
        same = existing.content_hash() == plan.vocab.content_hash()
    else:
        same = folder.read_bytes(CLASSES_NAME) == plan.vocab.parquet_bytes()
    if not same:
        raise EmbsegError(f"{folder.display(CLASSES_NAME)}: split(s) "
                          f"{', '.join(sorted(other_splits))} in this folder were built with a "
                          "different vocabulary; use another --out")


# --------------------------------------------------------------------------- files


def _pretty_json(value: object) -> bytes:
    return (json.dumps(value, indent=2, sort_keys=True) + "\n").encode("utf-8")


def _partial_name(path: Path) -> Path:
    """The hidden name a build file is written under (stale ones are recognised and removed)."""
    return path.with_name(f".{path.name}.partial")


@contextlib.contextmanager
def _split_lock(folder: OutputFolder, split: str) -> Iterator[None]:
    """One build of a split per local folder at a time (the lock dies with the process).
    An object store has no locks: there, do not start two builds of a split at once."""
    if not folder.local:
        yield
        return
    with open(folder.path(f".{split}.lock"), "a+b") as handle:
        try:
            fcntl.flock(handle.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise EmbsegError(f"{folder.root}: another build of split {split!r} is running in "
                              "this folder") from None
        try:
            yield
        finally:
            fcntl.flock(handle.fileno(), fcntl.LOCK_UN)


# --------------------------------------------------------------------------- CLI


def cli_build(args: argparse.Namespace) -> int:
    """``embseg build``: 0 on success, 1 if images failed (unless --allow-failures)."""
    from embseg.formats.source import source_from_args  # None for --format lvis

    source = source_from_args(args)
    try:
        report = build_shards(
            source=source, lvis=args.lvis, coco_stuff=list(args.coco_stuff or []),
            images=args.images, out=args.out,
            split=args.split, shard_size=args.shard_size, overlap=args.overlap,
            workers=args.workers, ray_address=args.ray_address,
            progress=not args.no_progress, allow_failures=args.allow_failures)
    except ImageFailuresError as exc:
        print(exc.report.summary())
        raise
    print(report.summary())
    for key, reason in report.failures[:5]:
        print(f"  failed {key}: {reason}")
    return 0
