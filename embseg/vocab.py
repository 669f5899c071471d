"""The class table of a dataset: the merged LVIS v1 + COCO-Stuff vocabulary (1284 classes for
the real category lists), or the table of another dataset's format (:mod:`embseg.formats`).

Merge rule (Jain et al., ICCV 2021): every LVIS category keeps its id (1..N); a COCO-Stuff stuff
category (ids 92..182) whose name equals an LVIS name exactly merges into that LVIS class
(source ``both``); every other stuff category gets the next new id (N+1, ...) in ascending
COCO-Stuff id order. COCO-Stuff ``other`` (id 183) is not a class: its pixels are unlabeled (0).

Other datasets (ADE20K, Cityscapes, Pascal VOC, COCO-Stuff label maps, a generic label-map
folder) keep their own class tables: their classes carry the dataset as ``source``, the class's
id in that dataset's own table as ``source_id`` and an evaluation ``group`` from the dataset's
own table (ADE20K stuff/thing, Cityscapes categories, ...). A vocabulary whose classes name
their groups reports those groups; one whose classes name none (every LVIS vocabulary, also
``classes.parquet`` files written before these columns existed) reports LVIS's
rare/common/frequent and stuff.

The vocabulary is stored as ``classes.parquet`` (one row per class, ids 1..C contiguous);
checkpoints record :meth:`Vocabulary.content_hash` so that a model is never evaluated against a
different class table.
"""

from __future__ import annotations

import argparse
import hashlib
import io
import json
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import Any

from embseg.errors import EmbsegError
from embseg.fileio import read_file_bytes, write_bytes_atomically

STUFF_FIRST_ID = 92
STUFF_LAST_ID = 182
STUFF_OTHER_ID = 183
STUFF_OTHER_NAME = "other"
FREQUENCY_GROUPS = {"r": "rare", "c": "common", "f": "frequent"}
GROUP_NAMES = ("rare", "common", "frequent", "stuff")
LVIS_SOURCES = ("lvis", "coco_stuff", "both")
FORMAT_SOURCES = ("ade20k", "cityscapes", "voc", "coco_stuff_164k", "labelmap")
SOURCES = LVIS_SOURCES + FORMAT_SOURCES
PARQUET_COLUMNS = ("id", "name", "source", "lvis_id", "coco_stuff_id", "frequency", "synonyms")
OPTIONAL_COLUMNS = ("group", "source_id")  # absent from files written before the formats
_OTHER_IDS_KEY = b"embseg.stuff_other_ids"


@dataclass(frozen=True)
class VocabClass:
    """One class of the vocabulary (``id`` is the label-map value, 1..C).

    ``group`` is the class's evaluation group where its dataset's table defines one (None for
    LVIS classes: their groups follow from ``source`` and ``frequency``); ``source_id`` is the
    class's id in its dataset's own table (ADE20K index, Cityscapes label id, VOC index, COCO
    category id, the generic label map's value; None for LVIS, whose ids are ``lvis_id`` /
    ``coco_stuff_id``).
    """

    id: int
    name: str
    source: str
    lvis_id: int | None
    coco_stuff_id: int | None
    frequency: str | None
    synonyms: tuple[str, ...] = field(default=())
    group: str | None = None
    source_id: int | None = None

    def __post_init__(self) -> None:
        # Accept any sequence (e.g. a list read from JSON) but store a tuple: hashable, immutable.
        object.__setattr__(self, "synonyms", tuple(self.synonyms))


@dataclass(frozen=True)
class Vocabulary:
    """The ordered class table plus the COCO-Stuff ids that mean "unlabeled" (``other``).

    ``classes[i].id == i + 1`` always holds (checked on construction).
    """

    classes: tuple[VocabClass, ...]
    stuff_other_ids: tuple[int, ...] = (STUFF_OTHER_ID,)

    def __post_init__(self) -> None:
        object.__setattr__(self, "classes", tuple(self.classes))
        object.__setattr__(self, "stuff_other_ids", tuple(int(i) for i in self.stuff_other_ids))
        for index, cls in enumerate(self.classes):
            if cls.id != index + 1:
                raise ValueError(f"class ids must be 1..C in order; position {index} has id {cls.id}")
            if cls.source not in SOURCES:
                raise ValueError(f"class {cls.id} has unknown source {cls.source!r}")

    @property
    def num_classes(self) -> int:
        """C, the number of classes (label-map values run 1..C, 0 is unlabeled)."""
        return len(self.classes)

    @cached_property
    def names(self) -> list[str]:
        """Class names; index i holds the name of class id i + 1."""
        return [cls.name for cls in self.classes]

    @cached_property
    def lvis_to_class(self) -> dict[int, int]:
        """LVIS category id -> merged class id (identity for LVIS classes)."""
        return {cls.lvis_id: cls.id for cls in self.classes if cls.lvis_id is not None}

    @cached_property
    def stuff_to_class(self) -> dict[int, int]:
        """COCO-Stuff category id -> merged class id; ``other`` maps to 0 (unlabeled)."""
        mapping = {cls.coco_stuff_id: cls.id for cls in self.classes
                   if cls.coco_stuff_id is not None}
        for other_id in self.stuff_other_ids:
            mapping[other_id] = 0
        return mapping

    def merged_pairs(self) -> list[VocabClass]:
        """Classes where a COCO-Stuff category merged into an LVIS category (source ``both``)."""
        return [cls for cls in self.classes if cls.source == "both"]

    def groups(self) -> dict[str, list[int]]:
        """Class ids per evaluation group.

        When any class names its ``group`` (the other datasets' tables), the groups are those
        names in order of first appearance, and a class without one is in no group. Otherwise an
        LVIS vocabulary has ``rare``/``common``/``frequent`` and ``stuff``, always all four (a
        ``both`` class counts in its LVIS frequency group, an LVIS class without a frequency is
        in no group), and any other (e.g. a generic label map's) has none.
        """
        if any(cls.group is not None for cls in self.classes):
            named: dict[str, list[int]] = {}
            for cls in self.classes:
                if cls.group is not None:
                    named.setdefault(cls.group, []).append(cls.id)
            return named
        if any(cls.source not in LVIS_SOURCES for cls in self.classes):
            return {}
        groups: dict[str, list[int]] = {name: [] for name in GROUP_NAMES}
        for cls in self.classes:
            if cls.source == "coco_stuff":
                groups["stuff"].append(cls.id)
            elif cls.frequency in FREQUENCY_GROUPS:
                groups[FREQUENCY_GROUPS[cls.frequency]].append(cls.id)
        return groups

    def content_hash(self) -> str:
        """sha256 (hex) of the ordered ``[[id, name], ...]`` list as compact UTF-8 JSON.

        Two vocabularies with the same hash assign the same name to every label value, which is
        what a checkpoint needs to be valid for a dataset.
        """
        pairs = [[cls.id, cls.name] for cls in self.classes]
        payload = json.dumps(pairs, separators=(",", ":"), ensure_ascii=False)
        return hashlib.sha256(payload.encode("utf-8")).hexdigest()

    def write_parquet(self, path: Path) -> None:
        """Write ``classes.parquet`` atomically (temporary file in the same folder, then rename)."""
        write_bytes_atomically(Path(path), self.parquet_bytes())

    def parquet_bytes(self) -> bytes:
        """The bytes of ``classes.parquet`` (same vocabulary -> same bytes)."""
        import pyarrow as pa
        import pyarrow.parquet as pq

        table = pa.table(
            {
                "id": pa.array([c.id for c in self.classes], pa.int32()),
                "name": pa.array([c.name for c in self.classes], pa.string()),
                "source": pa.array([c.source for c in self.classes], pa.string()),
                "lvis_id": pa.array([c.lvis_id for c in self.classes], pa.int32()),
                "coco_stuff_id": pa.array([c.coco_stuff_id for c in self.classes], pa.int32()),
                "frequency": pa.array([c.frequency for c in self.classes], pa.string()),
                "synonyms": pa.array([list(c.synonyms) for c in self.classes],
                                     pa.list_(pa.string())),
                "group": pa.array([c.group for c in self.classes], pa.string()),
                "source_id": pa.array([c.source_id for c in self.classes], pa.int32()),
            }
        )
        table = table.replace_schema_metadata(
            {_OTHER_IDS_KEY: json.dumps(list(self.stuff_other_ids)).encode()}
        )
        buffer = pa.BufferOutputStream()
        pq.write_table(table, buffer)
        return buffer.getvalue().to_pybytes()

    @classmethod
    def read_parquet(cls, path: Path) -> Vocabulary:
        """Read a ``classes.parquet`` written by :meth:`write_parquet` (EmbsegError if unusable)."""
        path = Path(path)
        if not path.is_file():
            raise EmbsegError(f"{path}: vocabulary file not found")
        return cls._from_parquet(path, where=path)

    @classmethod
    def from_parquet_bytes(cls, data: bytes, *, where: str) -> Vocabulary:
        """A ``classes.parquet`` read elsewhere (e.g. from a URL beside remote shards);
        ``where`` names it in errors."""
        return cls._from_parquet(io.BytesIO(data), where=where)

    @classmethod
    def _from_parquet(cls, source: Path | io.BytesIO, *, where: str | Path) -> Vocabulary:
        import pyarrow.parquet as pq

        path = where  # named in every error
        try:
            table = pq.read_table(source)
        except Exception as exc:  # pyarrow raises several types for damaged files
            raise EmbsegError(f"{path}: not a readable Parquet file ({_one_line(exc)})") from exc
        missing = [c for c in PARQUET_COLUMNS if c not in table.column_names]
        if missing:
            raise EmbsegError(f"{path}: not a classes.parquet (missing columns {missing})")
        present = [c for c in OPTIONAL_COLUMNS if c in table.column_names]
        rows = table.select([*PARQUET_COLUMNS, *present]).to_pylist()
        metadata = table.schema.metadata or {}
        other_ids = (json.loads(metadata[_OTHER_IDS_KEY]) if _OTHER_IDS_KEY in metadata
                     else [STUFF_OTHER_ID])
        classes = [
            VocabClass(id=row["id"], name=row["name"], source=row["source"],
                       lvis_id=row["lvis_id"], coco_stuff_id=row["coco_stuff_id"],
                       frequency=row["frequency"], synonyms=row["synonyms"] or (),
                       group=row.get("group"), source_id=row.get("source_id"))
            for row in rows
        ]
        try:
            return cls(classes=tuple(classes), stuff_other_ids=tuple(other_ids))
        except ValueError as exc:
            raise EmbsegError(f"{path}: {exc}") from exc


def _one_line(exc: BaseException) -> str:
    return " ".join(str(exc).split()) or type(exc).__name__


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def validate_categories(categories: Any, source: str) -> list[dict]:
    """Check a ``categories`` block: a list of dicts with an int ``id`` and a str ``name``.

    Raises EmbsegError naming ``source`` (usually the file) and the offending entry.
    """
    if not isinstance(categories, list):
        raise EmbsegError(f"{source}: 'categories' is not a list")
    seen: set[int] = set()
    for index, cat in enumerate(categories):
        if not isinstance(cat, dict) or not _is_int(cat.get("id")):
            raise EmbsegError(f"{source}: category #{index} has no integer 'id'")
        if not isinstance(cat.get("name"), str) or not cat["name"]:
            raise EmbsegError(f"{source}: category id {cat['id']} has no name")
        if cat["id"] in seen:
            raise EmbsegError(f"{source}: category id {cat['id']} appears twice")
        seen.add(cat["id"])
    return categories


def read_json_file(path: Path) -> Any:
    """Parse one JSON file, turning every way it can be unusable into a one-line EmbsegError."""
    path = Path(path)
    data = read_file_bytes(path)
    if not data.strip():
        raise EmbsegError(f"{path}: file is empty")
    try:
        return json.loads(data)
    except json.JSONDecodeError as exc:
        raise EmbsegError(
            f"{path}: malformed JSON at line {exc.lineno} column {exc.colno} "
            f"(character {exc.pos}): {exc.msg}"
        ) from exc
    except UnicodeDecodeError as exc:
        raise EmbsegError(f"{path}: not UTF-8 text ({_one_line(exc)})") from exc


def read_categories(path: Path) -> list[dict]:
    """The ``categories`` block of an LVIS/COCO annotation file (or a bare list of categories).

    Only that block is used: files whose ``images``/``annotations`` are empty work.
    """
    data = read_json_file(path)
    if isinstance(data, dict):
        if "categories" not in data:
            raise EmbsegError(f"{path}: not an LVIS/COCO annotation file (no 'categories')")
        data = data["categories"]
    elif not isinstance(data, list):
        raise EmbsegError(f"{path}: not an LVIS/COCO annotation file (top level is "
                          f"{type(data).__name__})")
    return validate_categories(data, str(path))


def is_stuff_other(category: dict) -> bool:
    """True for COCO-Stuff's ``other`` category (id 183 / name "other"): not a class."""
    return category["id"] == STUFF_OTHER_ID or category["name"] == STUFF_OTHER_NAME


def check_stuff_ids(categories: Iterable[dict], source: str) -> None:
    """COCO-Stuff files hold ids 92..182 (stuff) and 183 (other); anything else is an error."""
    for cat in categories:
        if not STUFF_FIRST_ID <= cat["id"] <= STUFF_OTHER_ID:
            raise EmbsegError(
                f"{source}: category id {cat['id']} ({cat['name']!r}) is outside the COCO-Stuff "
                f"range {STUFF_FIRST_ID}..{STUFF_OTHER_ID}"
            )


def combine_stuff_categories(per_file: Sequence[tuple[str, list[dict]]]) -> list[dict]:
    """Union of the categories of several COCO-Stuff files, sorted by id.

    The files must agree: the same id must carry the same name everywhere (EmbsegError naming
    both files and the id otherwise).
    """
    by_id: dict[int, tuple[str, dict]] = {}
    for source, categories in per_file:
        check_stuff_ids(categories, source)
        for cat in categories:
            seen = by_id.get(cat["id"])
            if seen is None:
                by_id[cat["id"]] = (source, cat)
            elif seen[1]["name"] != cat["name"]:
                raise EmbsegError(
                    f"{seen[0]} and {source} disagree on COCO-Stuff category id {cat['id']}: "
                    f"{seen[1]['name']!r} vs {cat['name']!r}"
                )
    return [by_id[i][1] for i in sorted(by_id)]


def _lvis_class(cat: dict, source: str) -> VocabClass:
    frequency = cat.get("frequency")
    if frequency is not None and frequency not in FREQUENCY_GROUPS:
        raise EmbsegError(f"{source}: category id {cat['id']} has frequency {frequency!r} "
                          f"(expected r, c or f)")
    synonyms = cat.get("synonyms") or [cat["name"]]
    if not isinstance(synonyms, list) or not all(isinstance(s, str) for s in synonyms):
        raise EmbsegError(f"{source}: category id {cat['id']} has malformed 'synonyms'")
    return VocabClass(id=cat["id"], name=cat["name"], source="lvis", lvis_id=cat["id"],
                      coco_stuff_id=None, frequency=frequency, synonyms=tuple(synonyms))


def merge_vocabulary(
    lvis_categories: list[dict],
    stuff_categories: list[dict],
    *,
    lvis_source: str = "LVIS categories",
    stuff_source: str = "COCO-Stuff categories",
) -> Vocabulary:
    """Merge LVIS and COCO-Stuff categories by the rule in the module docstring.

    ``lvis_source``/``stuff_source`` name the inputs in error messages (usually file paths).
    LVIS ids must be exactly 1..N (they are kept as class ids, which must be contiguous).
    """
    validate_categories(lvis_categories, lvis_source)
    validate_categories(stuff_categories, stuff_source)
    check_stuff_ids(stuff_categories, stuff_source)
    lvis_sorted = sorted(lvis_categories, key=lambda c: c["id"])
    for expected, cat in enumerate(lvis_sorted, start=1):
        if cat["id"] != expected:
            raise EmbsegError(f"{lvis_source}: LVIS category ids must be 1..{len(lvis_sorted)} "
                              f"without gaps (class ids are kept); id {expected} is missing")
    classes = [_lvis_class(cat, lvis_source) for cat in lvis_sorted]
    by_name: dict[str, int] = {}
    for cls in classes:
        if cls.name in by_name:
            raise EmbsegError(f"{lvis_source}: LVIS category name {cls.name!r} is used by ids "
                              f"{by_name[cls.name]} and {cls.id}")
        by_name[cls.name] = cls.id
    other_ids = []
    for cat in sorted(stuff_categories, key=lambda c: c["id"]):
        if is_stuff_other(cat):
            other_ids.append(cat["id"])
        elif cat["name"] in by_name:
            index = by_name[cat["name"]] - 1
            lvis_cls = classes[index]
            synonyms = lvis_cls.synonyms + (() if cat["name"] in lvis_cls.synonyms
                                            else (cat["name"],))
            classes[index] = VocabClass(
                id=lvis_cls.id, name=lvis_cls.name, source="both", lvis_id=lvis_cls.lvis_id,
                coco_stuff_id=cat["id"], frequency=lvis_cls.frequency, synonyms=synonyms)
        else:
            classes.append(VocabClass(id=len(classes) + 1, name=cat["name"], source="coco_stuff",
                                      lvis_id=None, coco_stuff_id=cat["id"], frequency=None,
                                      synonyms=(cat["name"],)))
    return Vocabulary(classes=tuple(classes), stuff_other_ids=tuple(other_ids))


def build_vocabulary(lvis_path: Path, stuff_paths: list[Path]) -> Vocabulary:
    """Read the ``categories`` blocks of the given files and merge them into one vocabulary."""
    lvis_categories = read_categories(lvis_path)
    per_file = [(str(p), read_categories(p)) for p in stuff_paths]
    stuff_categories = combine_stuff_categories(per_file)
    return merge_vocabulary(lvis_categories, stuff_categories, lvis_source=str(lvis_path),
                            stuff_source=", ".join(src for src, _ in per_file) or "COCO-Stuff")


def summary_line(vocab: Vocabulary) -> str:
    """One line for humans: class count, where they come from, the merged pairs (LVIS) or the
    groups (other datasets)."""
    sources = sorted({c.source for c in vocab.classes})
    if vocab.classes and not set(sources) <= set(LVIS_SOURCES):
        groups = ", ".join(f"{len(ids)} {name}" for name, ids in vocab.groups().items())
        return (f"{vocab.num_classes} classes ({', '.join(sources)})"
                + (f": {groups}" if groups else ""))
    n_lvis = sum(1 for c in vocab.classes if c.lvis_id is not None)
    n_new_stuff = vocab.num_classes - n_lvis
    merged = vocab.merged_pairs()
    names = ", ".join(f"{c.name} ({c.coco_stuff_id}->{c.id})" for c in merged)
    return (f"{vocab.num_classes} classes ({n_lvis} LVIS + {n_new_stuff} COCO-Stuff), "
            f"{len(merged)} merged pairs" + (f": {names}" if merged else ""))


def cli_vocab(args: argparse.Namespace) -> int:
    """``embseg vocab``: merge the category lists and write ``classes.parquet``."""
    vocab = build_vocabulary(args.lvis, list(args.coco_stuff))
    vocab.write_parquet(args.out)
    print(f"embseg vocab: {summary_line(vocab)} -> {args.out}")
    return 0
