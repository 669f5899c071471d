"""The dataset build: annotation files + images -> WebDataset shards, in parallel on Ray.

Stages (each a function, so the Prefect rebuild flow can run them as tasks):

1. :func:`plan_build` parses and checks the annotation files (vocabulary + per-image items, via
   :mod:`embseg.annotations`), assigns the items, sorted by image id, to shards of
   ``shard_size`` (every image keeps its slot whatever happens to it later), and hashes the
   inputs: a digest per shard (its items' annotations, image file names/sizes/mtimes, the
   painting options, the vocabulary) and :attr:`BuildPlan.input_hash` over everything.
2. :func:`execute_plan` writes ``classes.parquet``, runs :func:`embseg.labels.process_image`
   as Ray tasks over small chunks of images (so two workers help even with one shard), writes
   each shard as soon as it and all earlier shards are complete, then ``manifest.parquet`` and
   ``build_info.json``.

Determinism: a shard's bytes depend only on its inputs. Samples are in key order, members
``<key>.jpg``, ``<key>.json``, ``<key>.seg.png``, tar headers fixed (mtime 0, uid/gid 0, empty
owner names, mode 0644, ustar), JSON with sorted keys and compact separators. The workers
encode each sample's tar members; the driver only concatenates them (the result equals what
Python's ``tarfile`` writes for the same members).

Crash safety: a shard is written under a hidden name (``.<split>-000000.tar.partial``, never
matching ``*-NNNNNN.tar``) and fsynced; then its record ``.parts/<split>-000000.parquet``
(manifest rows, input digest, sha256 and size of the tar) is written atomically; then the tar
is renamed into place. A rerun reuses every shard whose tar and record exist with the same
input digest and whose bytes still match the recorded sha256, and redoes the rest; stale
partial files are removed. ``build_info.json`` forgets the split when a build starts and
records it when the build ends, so :func:`last_build_hash` never vouches for a half-built split.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import errno
import fcntl
import hashlib
import json
import math
import os
import re
import sys
import tarfile
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
from tqdm import tqdm

from embseg.annotations import BuildInputs, ImageItem, load_build_inputs
from embseg.errors import EmbsegError
from embseg.fileio import fsync_dir, write_bytes_atomically
from embseg.labels import OVERLAP_MODES, ImageResult, process_image
from embseg.raywork import map_unordered, ray_runtime, warm_up

BUILD_FORMAT = "embseg-shards-v1"
PARTS_DIR = ".parts"
MANIFEST_NAME = "manifest.parquet"
CLASSES_NAME = "classes.parquet"
BUILD_INFO_NAME = "build_info.json"
MEMBER_SUFFIXES = ("jpg", "json", "seg.png")
MAX_CHUNK_IMAGES = 64
CHUNKS_PER_CPU = 4
_SPLIT_NAME = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_-]*")
_META_DIGEST = b"embseg.input_digest"
_META_SHA = b"embseg.tar_sha256"
_META_SIZE = b"embseg.tar_size"
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
    """One shard of the plan: the items ``inputs.items[start:stop]`` and their digest."""

    index: int
    name: str
    start: int
    stop: int
    input_digest: str


@dataclass
class BuildPlan:
    """What a build will do; a pure function of the inputs (nothing written yet)."""

    split: str
    out: Path
    images_root: Path
    shard_size: int
    overlap: str
    inputs: BuildInputs
    shards: list[PlannedShard]
    input_hash: str

    def shard_items(self, shard: PlannedShard) -> list[ImageItem]:
        """The items assigned to ``shard``, in key order."""
        return self.inputs.items[shard.start:shard.stop]


@dataclass
class BuildReport:
    """Outcome of a build (also stored, without the paths, in ``build_info.json``)."""

    split: str
    n_images: int
    n_ok: int
    n_skipped: int
    n_failed: int
    shards: list[Path]
    shard_bytes: list[int]
    reused_shards: int
    seconds: float
    images_per_second: float
    manifest_path: Path
    classes_path: Path
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


# --------------------------------------------------------------------------- plan


def plan_build(*, lvis: Path, coco_stuff: list[Path], images: Path, out: Path,
               split: str = "train", shard_size: int = 1000,
               overlap: str = "first") -> BuildPlan:
    """Parse the annotation files, assign images to shards and hash the inputs."""
    _check_parameters(split=split, shard_size=shard_size, overlap=overlap, out=Path(out))
    inputs = load_build_inputs(Path(lvis), [Path(p) for p in coco_stuff], Path(images))
    if not inputs.items:
        raise EmbsegError(f"{lvis}: the LVIS file lists no images: nothing to build")
    images_root = Path(images)
    options = {"format": BUILD_FORMAT, "overlap": overlap,
               "vocabulary": inputs.vocab.content_hash()}
    shards = []
    for index, start in enumerate(range(0, len(inputs.items), shard_size)):
        stop = min(start + shard_size, len(inputs.items))
        digest = hashlib.sha256(_canonical_json(options))
        for item in inputs.items[start:stop]:
            digest.update(_item_fingerprint(item, images_root))
        shards.append(PlannedShard(index=index, name=shard_name(split, index), start=start,
                                   stop=stop, input_digest=digest.hexdigest()))
    total = hashlib.sha256(_canonical_json({**options, "split": split,
                                            "shard_size": shard_size}))
    for path in inputs.source_files:
        total.update(_file_sha256(path).encode())
    for shard in shards:
        total.update(shard.input_digest.encode())
    return BuildPlan(split=split, out=Path(out), images_root=images_root,
                     shard_size=shard_size, overlap=overlap, inputs=inputs, shards=shards,
                     input_hash=total.hexdigest())


def shard_name(split: str, index: int) -> str:
    """``<split>-NNNNNN.tar``: the final name of shard ``index``."""
    return f"{split}-{index:06d}.tar"


def _check_parameters(*, split: str, shard_size: int, overlap: str, out: Path) -> None:
    if not _SPLIT_NAME.fullmatch(split):
        raise EmbsegError(f"--split {split!r}: use letters, digits, '_' and '-' only")
    if shard_size < 1:
        raise EmbsegError(f"--shard-size must be at least 1 (got {shard_size})")
    if overlap not in OVERLAP_MODES:
        raise EmbsegError(f"--overlap must be one of {', '.join(OVERLAP_MODES)} (got {overlap!r})")
    if out.exists() and not out.is_dir():
        raise EmbsegError(f"{out}: output path exists and is not a folder")


def _canonical_json(value: object) -> bytes:
    return json.dumps(value, sort_keys=True, separators=(",", ":"), ensure_ascii=True,
                      default=repr).encode("utf-8")


def _item_fingerprint(item: ImageItem, images_root: Path) -> bytes:
    """The item's full content plus its image file's size and mtime (or why there is none)."""
    path = item.image_path(images_root)
    if path is None:
        stat: object = "not opened"
    else:
        try:
            info = path.stat()
            stat = [info.st_size, info.st_mtime_ns]
        except OSError as exc:
            stat = f"unavailable: {errno.errorcode.get(exc.errno or 0, exc.errno)}"
    return hashlib.sha256(_canonical_json([dataclasses.asdict(item), stat])).digest()


def _file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


# --------------------------------------------------------------------------- execute


@dataclass
class _ShardRecord:
    """A finished shard: where it is, its size, manifest rows, and whether it was reused."""

    path: Path
    size: int
    rows: list[dict]
    reused: bool


def execute_plan(plan: BuildPlan, *, workers: int | None = None, ray_address: str | None = None,
                 progress: bool = True) -> BuildReport:
    """Build the shards of ``plan`` on Ray (reusing finished ones) and write the outputs.

    Writes ``classes.parquet`` first, then the shards, then ``manifest.parquet`` (replacing only
    this split's rows) and ``build_info.json``. ``seconds`` excludes Ray start-up (including
    the workers' imports).
    """
    out = plan.out
    out.mkdir(parents=True, exist_ok=True)
    (out / PARTS_DIR).mkdir(exist_ok=True)
    with _split_lock(out, plan.split):
        _check_vocabulary_compatible(plan)
        _forget_split(out, plan.split)
        _remove_stale_files(plan)
        plan.inputs.vocab.write_parquet(out / CLASSES_NAME)
        records: dict[int, _ShardRecord] = {}
        todo = []
        for shard in plan.shards:
            reused = _reusable_record(plan, shard)
            if reused is not None:
                records[shard.index] = reused
            else:
                todo.append(shard)
        bar = tqdm(total=len(plan.inputs.items), unit="img", desc=f"build {plan.split}",
                   disable=not progress, file=sys.stderr, mininterval=0.5)
        bar.update(sum(len(r.rows) for r in records.values()))
        with bar:
            if todo:
                with ray_runtime(workers=workers, ray_address=ray_address) as runtime:
                    warm_up(runtime.cpus, (__name__,))
                    started = time.perf_counter()
                    _build_shards(plan, todo, records, cpus=runtime.cpus, bar=bar)
                    seconds = time.perf_counter() - started
            else:
                seconds = 0.0
        n_processed = sum(s.stop - s.start for s in todo)
        return _finish(plan, records, seconds=seconds, n_processed=n_processed)


def build_shards(*, lvis: Path, coco_stuff: list[Path], images: Path, out: Path,
                 split: str = "train", shard_size: int = 1000, overlap: str = "first",
                 workers: int | None = None, ray_address: str | None = None,
                 progress: bool = True, allow_failures: bool = False) -> BuildReport:
    """:func:`plan_build` + :func:`execute_plan`.

    Raises :class:`ImageFailuresError` (exit code 1, outputs already written) when images
    failed and ``allow_failures`` is False.
    """
    plan = plan_build(lvis=lvis, coco_stuff=coco_stuff, images=images, out=out, split=split,
                      shard_size=shard_size, overlap=overlap)
    report = execute_plan(plan, workers=workers, ray_address=ray_address, progress=progress)
    if report.n_failed and not allow_failures:
        raise ImageFailuresError(report)
    return report


@dataclass
class ProcessedImage:
    """What a Ray task returns per image: the outcome and the image's ready-made tar blocks.

    Encoding the tar members in the workers keeps the driver's share of the work (it only
    concatenates blocks into files) small, so that more workers give more speed.
    """

    result: ImageResult  # jpg / seg_png / meta dropped: their bytes are in ``blocks``
    blocks: bytes  # the sample's tar members; empty unless the status is ok


def process_chunk(items: list[ImageItem], images_root: Path,
                  overlap: str) -> list[ProcessedImage]:
    """The Ray task: :func:`embseg.labels.process_image` over a few images, in order."""
    processed = []
    for item in items:
        result = process_image(item, images_root, overlap=overlap)
        blocks = sample_tar_blocks(result) if result.status == "ok" else b""
        result.jpg = result.seg_png = result.meta = None
        processed.append(ProcessedImage(result=result, blocks=blocks))
    return processed


def _chunks(plan: BuildPlan, shards: list[PlannedShard],
            cpus: int) -> Iterator[tuple[tuple[int, int], tuple]]:
    """((shard index, first position), (items, ...)) per task, shard by shard, in order."""
    n_images = sum(s.stop - s.start for s in shards)
    size = max(1, min(MAX_CHUNK_IMAGES, math.ceil(n_images / (cpus * CHUNKS_PER_CPU))))
    for shard in shards:
        items = plan.shard_items(shard)
        for start in range(0, len(items), size):
            yield (shard.index, start), (items[start:start + size],)


def _build_shards(plan: BuildPlan, todo: list[PlannedShard], records: dict[int, _ShardRecord],
                  *, cpus: int, bar: tqdm) -> None:
    """Run the chunks on Ray; write each shard once it and every earlier one are complete."""
    waiting = {shard.index: shard for shard in todo}
    results: dict[int, dict[int, list[ProcessedImage]]] = {shard.index: {} for shard in todo}
    received = dict.fromkeys(waiting, 0)
    order = [shard.index for shard in todo]
    next_position = 0
    chunk_items: dict[tuple[int, int], list[ImageItem]] = {}

    def jobs() -> Iterator[tuple[tuple[int, int], tuple]]:
        for key, args in _chunks(plan, todo, cpus):
            chunk_items[key] = args[0]
            yield key, args

    kwargs = {"images_root": plan.images_root, "overlap": plan.overlap}
    for (shard_index, start), chunk in map_unordered(process_chunk, jobs(), kwargs=kwargs,
                                                     max_in_flight=2 * cpus,
                                                     return_exceptions=True):
        items = chunk_items.pop((shard_index, start))
        if isinstance(chunk, BaseException):
            chunk = _isolate_crash(items, kwargs)
        results[shard_index][start] = chunk
        received[shard_index] += len(chunk)
        bar.update(len(chunk))
        while next_position < len(order):
            shard = waiting[order[next_position]]
            if received[shard.index] < shard.stop - shard.start:
                break
            ordered = [r for pos in sorted(results[shard.index]) for r in results[shard.index][pos]]
            records[shard.index] = _write_shard(plan, shard, ordered)
            del results[shard.index]
            next_position += 1


def _isolate_crash(items: list[ImageItem], kwargs: dict) -> list[ProcessedImage]:
    """A chunk whose worker died (even after retries): rerun its images one per task, so only
    the image that kills a worker (a decoder crash, memory) is recorded as failed."""
    singles = map_unordered(process_chunk, ((i, ([item],)) for i, item in enumerate(items)),
                            kwargs=kwargs, max_in_flight=len(items), return_exceptions=True)
    by_position: dict[int, ProcessedImage] = {}
    for position, value in singles:
        if isinstance(value, BaseException):
            item = items[position]
            reason = " ".join(str(value).split())[:300] or type(value).__name__
            failed = ImageResult(
                image_id=item.image_id, key=item.key, status="failed",
                reason=f"processing crashed its worker ({type(value).__name__}: {reason})")
            by_position[position] = ProcessedImage(result=failed, blocks=b"")
        else:
            by_position[position] = value[0]
    return [by_position[i] for i in range(len(items))]


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


def _manifest_rows(plan: BuildPlan, shard: PlannedShard,
                   processed: list[ProcessedImage]) -> list[dict]:
    rows = []
    for item, result in zip(plan.shard_items(shard), (p.result for p in processed), strict=True):
        if result.key != item.key:
            raise RuntimeError(f"result {result.key} arrived in the slot of {item.key}")
        rows.append({
            "split": plan.split, "key": item.key, "image_id": item.image_id,
            "file_name": item.file_name, "rel_path": item.rel_path, "shard": shard.name,
            "status": result.status, "reason": result.reason or None,
            "class_ids": [int(c) for c in result.class_ids],
            "pixel_counts": [int(c) for c in result.pixel_counts],
        })
    return rows


def _write_shard(plan: BuildPlan, shard: PlannedShard,
                 processed: list[ProcessedImage]) -> _ShardRecord:
    """Partial tar (fsync) -> record (atomic) -> rename the tar into place (see module doc)."""
    rows = _manifest_rows(plan, shard, processed)
    final = plan.out / shard.name
    partial = _partial_name(final)
    digest, size = hashlib.sha256(), 0
    with open(partial, "wb") as handle:
        blocks = [p.blocks for p in sorted(processed, key=lambda p: p.result.key) if p.blocks]
        for data in [*blocks, tar_end(sum(len(b) for b in blocks))]:
            handle.write(data)
            digest.update(data)
            size += len(data)
        handle.flush()
        os.fsync(handle.fileno())
    table = pa.Table.from_pylist(rows, schema=_MANIFEST_SCHEMA).replace_schema_metadata({
        _META_DIGEST: shard.input_digest.encode(),
        _META_SHA: digest.hexdigest().encode(),
        _META_SIZE: str(size).encode(),
    })
    _write_parquet_atomically(table, _record_path(plan.out, shard.name))
    os.replace(partial, final)
    fsync_dir(plan.out)
    return _ShardRecord(path=final, size=size, rows=rows, reused=False)


def _record_path(out: Path, name: str) -> Path:
    return out / PARTS_DIR / f"{name[:-len('.tar')]}.parquet"


def _reusable_record(plan: BuildPlan, shard: PlannedShard) -> _ShardRecord | None:
    """The finished shard from an earlier run, if its inputs and bytes are still the same."""
    final = plan.out / shard.name
    record = _record_path(plan.out, shard.name)
    if not (final.is_file() and record.is_file()):
        return None
    try:
        table = pq.read_table(record)
    except Exception:  # a damaged record only means the shard is rebuilt
        return None
    meta = table.schema.metadata or {}
    if meta.get(_META_DIGEST, b"").decode() != shard.input_digest:
        return None
    size = final.stat().st_size
    if str(size).encode() != meta.get(_META_SIZE) or \
            _file_sha256(final).encode() != meta.get(_META_SHA):
        return None
    rows = table.cast(_MANIFEST_SCHEMA).to_pylist()
    if [row["key"] for row in rows] != [item.key for item in plan.shard_items(shard)]:
        return None
    return _ShardRecord(path=final, size=size, rows=rows, reused=True)


def _remove_stale_files(plan: BuildPlan) -> None:
    """Delete partial files of this split, and shards/records beyond the plan's shard count."""
    split = re.escape(plan.split)
    finished = re.compile(rf"{split}-(\d{{6}})\.(tar|parquet)")
    partial = re.compile(rf"\.{split}-\d{{6}}\.(tar|parquet)\.partial")
    for folder in (plan.out, plan.out / PARTS_DIR):
        for path in folder.iterdir():
            match = finished.fullmatch(path.name)
            if partial.fullmatch(path.name) or (match and int(match.group(1)) >= len(plan.shards)):
                path.unlink(missing_ok=True)


# --------------------------------------------------------------------------- outputs


def _finish(plan: BuildPlan, records: dict[int, _ShardRecord], *, seconds: float,
            n_processed: int) -> BuildReport:
    rows = [row for index in sorted(records) for row in records[index].rows]
    if len(rows) != len(plan.inputs.items):
        raise RuntimeError(f"manifest has {len(rows)} rows for {len(plan.inputs.items)} images")
    _write_manifest(plan.out, plan.split, rows)
    counts = {status: sum(row["status"] == status for row in rows)
              for status in ("ok", "skipped", "failed")}
    shards = [records[i].path for i in sorted(records)]
    report = BuildReport(
        split=plan.split, n_images=len(rows), n_ok=counts["ok"], n_skipped=counts["skipped"],
        n_failed=counts["failed"], shards=shards,
        shard_bytes=[records[i].size for i in sorted(records)],
        reused_shards=sum(r.reused for r in records.values()), seconds=seconds,
        images_per_second=n_processed / seconds if seconds > 0 else 0.0,
        manifest_path=plan.out / MANIFEST_NAME, classes_path=plan.out / CLASSES_NAME,
        input_hash=plan.input_hash,
        failures=[(row["key"], row["reason"]) for row in rows if row["status"] == "failed"][:20],
    )
    _record_split(plan.out, report)
    return report


def _write_manifest(out: Path, split: str, rows: list[dict]) -> None:
    """Replace this split's rows of ``manifest.parquet`` (other splits' rows are kept)."""
    path = out / MANIFEST_NAME
    kept: list[dict] = []
    if path.exists():
        try:
            existing = pq.read_table(path)
        except Exception as exc:
            raise EmbsegError(f"{path}: existing manifest is unreadable ({exc}); move it "
                              "away to rebuild") from None
        if "split" in existing.column_names:
            kept = [row for row in existing.cast(_MANIFEST_SCHEMA).to_pylist()
                    if row["split"] != split]
    merged = sorted(kept + rows, key=lambda row: (row["split"], row["key"]))
    _write_parquet_atomically(pa.Table.from_pylist(merged, schema=_MANIFEST_SCHEMA), path)


def _read_build_info(out: Path) -> dict:
    path = out / BUILD_INFO_NAME
    try:
        info = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {"splits": {}}
    if not isinstance(info, dict) or not isinstance(info.get("splits"), dict):
        return {"splits": {}}
    return info


def _forget_split(out: Path, split: str) -> None:
    """Drop the split from ``build_info.json`` before any of its shards change."""
    info = _read_build_info(out)
    if split not in info["splits"] and info.get("split") != split:
        return
    info["splits"].pop(split, None)
    if info.get("split") == split:  # the top level described this split's last build
        info = {"splits": info["splits"]}
    _write_durably(out / BUILD_INFO_NAME, _pretty_json(info))


def _record_split(out: Path, report: BuildReport) -> None:
    """Store the finished build in ``build_info.json``: top level = latest build, per split."""
    entry = {
        "split": report.split, "input_hash": report.input_hash, "format": BUILD_FORMAT,
        "n_images": report.n_images, "n_ok": report.n_ok, "n_skipped": report.n_skipped,
        "n_failed": report.n_failed,
        "shards": [p.name for p in report.shards], "shard_bytes": report.shard_bytes,
        "reused_shards": report.reused_shards, "seconds": round(report.seconds, 3),
        "images_per_second": round(report.images_per_second, 2),
    }
    info = _read_build_info(out)
    info["splits"][report.split] = entry
    _write_durably(out / BUILD_INFO_NAME, _pretty_json({**entry, "splits": info["splits"]}))


def last_build_hash(out: Path, split: str) -> str | None:
    """The input hash of the last completed build of ``split`` in ``out``, if still intact.

    None when there was none, a build of the split started since, or a listed shard, the
    manifest or the vocabulary is missing or has another size.
    """
    out = Path(out)
    entry = _read_build_info(out)["splits"].get(split)
    if not isinstance(entry, dict) or entry.get("format") != BUILD_FORMAT:
        return None
    if not (out / MANIFEST_NAME).is_file() or not (out / CLASSES_NAME).is_file():
        return None
    for name, size in zip(entry.get("shards", []), entry.get("shard_bytes", []), strict=False):
        path = out / name
        if not path.is_file() or path.stat().st_size != size:
            return None
    return entry.get("input_hash")


def _check_vocabulary_compatible(plan: BuildPlan) -> None:
    """Refuse to mix splits built with different vocabularies in one folder."""
    from embseg.vocab import Vocabulary

    path = plan.out / CLASSES_NAME
    if not path.is_file():
        return
    other_splits = set(_read_build_info(plan.out)["splits"]) - {plan.split}
    if not other_splits:
        return
    existing = Vocabulary.read_parquet(path)
    if existing.content_hash() != plan.inputs.vocab.content_hash():
        raise EmbsegError(f"{path}: split(s) {', '.join(sorted(other_splits))} in this folder "
                          "were built with a different vocabulary; use another --out")


# --------------------------------------------------------------------------- files


def _pretty_json(value: object) -> bytes:
    return (json.dumps(value, indent=2, sort_keys=True) + "\n").encode("utf-8")


def _partial_name(path: Path) -> Path:
    """The hidden name a build file is written under (stale ones are recognised and removed)."""
    return path.with_name(f".{path.name}.partial")


def _write_durably(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path`` through its hidden ``.partial`` name (fsync, rename)."""
    write_bytes_atomically(path, data, temporary=_partial_name(path))


def _write_parquet_atomically(table: pa.Table, path: Path) -> None:
    buffer = pa.BufferOutputStream()
    pq.write_table(table, buffer)
    _write_durably(path, buffer.getvalue().to_pybytes())


@contextlib.contextmanager
def _split_lock(out: Path, split: str) -> Iterator[None]:
    """One build of a split per folder at a time (the lock dies with the process)."""
    with open(out / f".{split}.lock", "a+b") as handle:
        try:
            fcntl.flock(handle.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise EmbsegError(f"{out}: another build of split {split!r} is running in this "
                              "folder") from None
        try:
            yield
        finally:
            fcntl.flock(handle.fileno(), fcntl.LOCK_UN)


# --------------------------------------------------------------------------- CLI


def cli_build(args: argparse.Namespace) -> int:
    """``embseg build``: 0 on success, 1 if images failed (unless --allow-failures)."""
    try:
        report = build_shards(
            lvis=args.lvis, coco_stuff=list(args.coco_stuff), images=args.images, out=args.out,
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
