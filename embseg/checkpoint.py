"""Checkpoints: written atomically, read as data only, tied to one class table.

A checkpoint is a ``torch.save`` dict holding only tensors and plain Python values (dicts,
lists, str, int, float, bool, None), so it loads with ``torch.load(weights_only=True)``:
a checkpoint is data, never code. Contents: model state and config, optimizer and scheduler
state, step, RNG states (python, numpy, torch CPU, CUDA) and the data loader position, the
vocabulary as plain lists with its content hash, the training config and the best val mIoU.

Writes go to a temporary file in the same directory, are fsynced and renamed over the final
name, so a reader never sees half a checkpoint under ``last.pt``. Before ``last.pt`` is
replaced, the current one is kept as ``last.prev.pt``; a ``last.pt`` that fails to load
(truncated, corrupt) makes :func:`load_checkpoint` fall back to it with a warning.
"""

from __future__ import annotations

import os
import random
import shutil
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import torch

from embseg.errors import EmbsegError
from embseg.fileio import temporary_sibling, write_atomically
from embseg.vocab import VocabClass, Vocabulary

FORMAT = "embseg-checkpoint"
VERSION = 1
REQUIRED_KEYS = ("format", "model", "model_config", "class_table_hash", "vocabulary")


class CheckpointFallbackWarning(UserWarning):
    """A checkpoint did not load and its previous good version was used instead."""


def previous_path(path: Path) -> Path:
    """Where the previous good version of ``path`` is kept: ``last.pt`` -> ``last.prev.pt``."""
    path = Path(path)
    return path.with_name(f"{path.stem}.prev{path.suffix}")


def _keep_previous(path: Path) -> None:
    """Make ``previous_path(path)`` a copy of the current ``path`` (atomically replaced)."""
    previous = previous_path(path)
    staging = temporary_sibling(previous)
    staging.unlink(missing_ok=True)
    try:
        os.link(path, staging)  # the current file stays in place: no moment without last.pt
    except OSError:
        shutil.copy2(path, staging)
    os.replace(staging, previous)


def save_checkpoint(payload: dict[str, Any], path: Path, *, keep_previous: bool = False) -> Path:
    """Write ``payload`` to ``path`` atomically (temp file, fsync, rename); returns ``path``.

    With ``keep_previous`` the file being replaced is kept as :func:`previous_path` first.
    """
    path = Path(path)

    def write(tmp: Path) -> None:
        torch.save(payload, tmp)
        if keep_previous and path.exists():  # only once the new one is complete
            _keep_previous(path)

    return write_atomically(path, write)


def _read(path: Path, map_location: str | torch.device) -> dict[str, Any]:
    """One checkpoint file, validated; raises ValueError with a one-line reason."""
    try:
        payload = torch.load(path, map_location=map_location, weights_only=True)
    except FileNotFoundError:
        raise ValueError("file not found") from None
    except Exception as exc:  # truncated zip, bad pickle, non-data objects, ...
        reason = " ".join(str(exc).split())[:200] or type(exc).__name__
        raise ValueError(f"does not load ({reason})") from None
    if not isinstance(payload, dict) or payload.get("format") != FORMAT:
        raise ValueError("not an embseg checkpoint")
    missing = [key for key in REQUIRED_KEYS if key not in payload]
    if missing:
        raise ValueError(f"checkpoint lacks {missing}")
    return payload


def load_checkpoint(path: Path, *, map_location: str | torch.device = "cpu",
                    expected_hash: str | None = None, vocabulary_file: Path | None = None,
                    fallback: bool = True) -> dict[str, Any]:
    """Read a checkpoint with ``weights_only=True``; the payload dict gets ``"path"`` added.

    If ``path`` does not load and ``fallback`` is set, its previous good version
    (``last.prev.pt`` for ``last.pt``) is used with a :class:`CheckpointFallbackWarning`.
    With ``expected_hash`` the checkpoint's class-table hash must match (the vocabulary of
    ``vocabulary_file``); otherwise EmbsegError names both hashes and both files.
    """
    path = Path(path)
    candidates = [path] + ([previous_path(path)] if fallback else [])
    problems = []
    for candidate in candidates:
        if candidate != path and not candidate.exists():
            continue
        try:
            payload = _read(candidate, map_location)
        except ValueError as exc:
            problems.append(f"{candidate}: {exc}")
            continue
        if candidate != path:
            warnings.warn(f"{problems[0]}; using the previous good checkpoint {candidate} "
                          f"(step {payload.get('step')})", CheckpointFallbackWarning,
                          stacklevel=2)
        payload["path"] = str(candidate)
        if expected_hash is not None:
            check_class_table(payload, expected_hash, vocabulary_file=vocabulary_file)
        return payload
    raise EmbsegError("; ".join(problems) + ("" if len(problems) > 1 or not fallback
                                             else "; no previous good checkpoint"))


def check_class_table(payload: dict[str, Any], expected_hash: str, *,
                      vocabulary_file: Path | None = None) -> None:
    """EmbsegError unless the checkpoint was trained on the class table with ``expected_hash``."""
    stored = payload["class_table_hash"]
    if stored != expected_hash:
        where = f" of {vocabulary_file}" if vocabulary_file is not None else ""
        raise EmbsegError(
            f"{payload.get('path', 'checkpoint')}: trained on class table {stored} "
            f"({len(payload['vocabulary']['ids'])} classes), but the vocabulary{where} is "
            f"{expected_hash}: a checkpoint only works with its own vocabulary")


# ---------------------------------------------------------------------------------------------
# Plain-data records (allowed by weights_only=True)


def vocabulary_record(vocab: Vocabulary) -> dict[str, list]:
    """The vocabulary as plain lists (ids, names, source, frequency, ...)."""
    classes = vocab.classes
    return {"ids": [c.id for c in classes], "names": [c.name for c in classes],
            "source": [c.source for c in classes], "frequency": [c.frequency for c in classes],
            "lvis_id": [c.lvis_id for c in classes],
            "coco_stuff_id": [c.coco_stuff_id for c in classes],
            "synonyms": [list(c.synonyms) for c in classes],
            "group": [c.group for c in classes], "source_id": [c.source_id for c in classes],
            "stuff_other_ids": list(vocab.stuff_other_ids)}


def vocabulary_from_record(record: dict[str, list]) -> Vocabulary:
    """The :class:`Vocabulary` stored by :func:`vocabulary_record` (records written before
    ``group``/``source_id`` existed read as None for both)."""
    count = len(record["ids"])
    groups = record.get("group", [None] * count)
    source_ids = record.get("source_id", [None] * count)
    classes = [VocabClass(id=i, name=n, source=s, lvis_id=lv, coco_stuff_id=cs, frequency=f,
                          synonyms=tuple(syn), group=g, source_id=sid)
               for i, n, s, lv, cs, f, syn, g, sid in zip(
                   record["ids"], record["names"], record["source"], record["lvis_id"],
                   record["coco_stuff_id"], record["frequency"], record["synonyms"], groups,
                   source_ids, strict=True)]
    return Vocabulary(classes=tuple(classes),
                      stuff_other_ids=tuple(record.get("stuff_other_ids", [183])))


def checkpoint_vocabulary(payload: dict[str, Any]) -> Vocabulary:
    """The vocabulary a checkpoint was trained on (its hash re-checked)."""
    vocab = vocabulary_from_record(payload["vocabulary"])
    if vocab.content_hash() != payload["class_table_hash"]:
        raise EmbsegError(f"{payload.get('path', 'checkpoint')}: stored vocabulary does not "
                          f"match its stored class-table hash (corrupt checkpoint)")
    return vocab


def rng_state() -> dict[str, Any]:
    """Python, numpy, torch CPU and (if initialised) CUDA RNG states as tensors and lists."""
    version, internal, gauss = random.getstate()
    name, keys, pos, has_gauss, cached = np.random.get_state()
    state: dict[str, Any] = {
        "python": {"version": version, "state": list(internal), "gauss": gauss},
        "numpy": {"name": name, "keys": torch.from_numpy(keys.astype(np.int64)), "pos": int(pos),
                  "has_gauss": int(has_gauss), "cached": float(cached)},
        "torch": torch.get_rng_state(),
        "cuda": [],
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = list(torch.cuda.get_rng_state_all())
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    """Restore what :func:`rng_state` recorded."""
    py = state["python"]
    random.setstate((py["version"], tuple(py["state"]), py["gauss"]))
    npy = state["numpy"]
    np.random.set_state((npy["name"], npy["keys"].numpy().astype(np.uint32), npy["pos"],
                         npy["has_gauss"], npy["cached"]))
    torch.set_rng_state(state["torch"].cpu())
    if state.get("cuda") and torch.cuda.is_available():
        torch.cuda.set_rng_state_all([s.cpu() for s in state["cuda"]])


def new_payload(**fields: Any) -> dict[str, Any]:
    """A checkpoint dict with the format marker and ``fields``."""
    return {"format": FORMAT, "version": VERSION, **fields}
