"""The model registry of the retrain flow: versioned checkpoints and an atomic "current" pointer.

Layout of a models directory::

    MODELS/v0001.pt        a promoted checkpoint, copied once and never modified or deleted
    MODELS/v0001.json      what it is: val mIoU, source checkpoint, flow run, time
    MODELS/current.json    the pointer {"version": 1, "checkpoint": "v0001.pt", "miou": ...}
    MODELS/current.pt      a symlink to the current vNNNN.pt, for tools that want a path
    MODELS/decisions.jsonl one line per promotion decision (promoted or kept), for the audit

Promotion is atomic: the checkpoint is copied under a temporary name and hard-linked to the
next free ``vNNNN.pt`` (a link never overwrites, so two concurrent promotions cannot take the
same version), then ``current.json`` is written to a temporary file and swapped in with
``os.replace`` (the ``current.pt`` symlink is swapped the same way, right after). A crash at any point leaves the previous pointer intact and every earlier
model on disk. Pure Python: no Prefect, no torch, so the rule is testable on its own.
"""

from __future__ import annotations

import json
import math
import os
import re
import shutil
from dataclasses import dataclass, field
from datetime import datetime, timezone
from itertools import count
from pathlib import Path

from embseg.errors import EmbsegError
from embseg.fileio import fsync_dir, fsync_file, write_text_atomically

CURRENT_POINTER = "current.json"
CURRENT_LINK = "current.pt"
DECISIONS_LOG = "decisions.jsonl"
_VERSION_FILE = re.compile(r"^v(\d{4,})\.pt$")


@dataclass(frozen=True)
class CurrentModel:
    """The model the pointer designates: its version, checkpoint path and recorded val mIoU."""

    version: int
    checkpoint: Path
    miou: float
    info: dict = field(default_factory=dict)


@dataclass(frozen=True)
class PromotionDecision:
    """The outcome of one promotion attempt, with both scores and the reason, for the artifact."""

    promoted: bool
    reason: str
    new_checkpoint: Path
    new_miou: float
    current_miou: float | None
    previous_version: int | None
    current: CurrentModel | None  # the current model after the decision


def version_name(version: int) -> str:
    """File name of a promoted checkpoint: ``v0001.pt``."""
    return f"v{version:04d}.pt"


def read_current(models_dir: Path) -> CurrentModel | None:
    """The current model of ``models_dir``, or None when nothing was promoted yet.

    Raises EmbsegError when the pointer exists but is unreadable or names a missing file:
    silently starting over would let a worse model replace the real current one.
    """
    pointer = Path(models_dir) / CURRENT_POINTER
    if not pointer.exists():
        return None
    try:
        data = json.loads(pointer.read_text(encoding="utf-8"))
        version = int(data["version"])
        checkpoint = Path(models_dir) / str(data["checkpoint"])
        miou = float(data["miou"])
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise EmbsegError(f"{pointer}: unreadable current-model pointer: {exc}") from None
    if not checkpoint.is_file():
        raise EmbsegError(f"{pointer}: current model {checkpoint.name} is missing")
    return CurrentModel(version=version, checkpoint=checkpoint, miou=miou, info=data)


def should_promote(new_miou: float, current_miou: float | None) -> tuple[bool, str]:
    """The promotion rule: promote when the new val mIoU is at least the current one's.

    A NaN score (nothing to measure on) never promotes; with no comparable current score
    (first model, or the current model cannot be scored on today's val set) it promotes.
    """
    if math.isnan(new_miou):
        return False, "new model has no valid val mIoU (NaN): kept the current model"
    if current_miou is None or math.isnan(current_miou):
        return True, "no comparable current model: promoted the new one"
    if new_miou >= current_miou:
        return True, f"new val mIoU {new_miou:.4f} >= current {current_miou:.4f}: promoted"
    return False, f"new val mIoU {new_miou:.4f} < current {current_miou:.4f}: kept the current model"


def promote_if_better(
    models_dir: Path,
    checkpoint: Path,
    *,
    new_miou: float,
    current_miou: float | None,
    metadata: dict | None = None,
) -> PromotionDecision:
    """Apply the promotion rule to ``checkpoint`` and record the decision in ``models_dir``.

    ``current_miou`` is the current model's score on the same val shards the new one was
    scored on (None when there is no current model or it cannot be scored there).
    """
    models_dir = Path(models_dir)
    models_dir.mkdir(parents=True, exist_ok=True)
    previous = read_current(models_dir)
    promoted, reason = should_promote(new_miou, current_miou)
    current = promote(models_dir, checkpoint, miou=new_miou, metadata=metadata) if promoted \
        else previous
    decision = PromotionDecision(
        promoted=promoted, reason=reason, new_checkpoint=Path(checkpoint), new_miou=new_miou,
        current_miou=current_miou, previous_version=previous.version if previous else None,
        current=current,
    )
    _append_decision(models_dir, decision, metadata or {})
    return decision


def promote(models_dir: Path, checkpoint: Path, *, miou: float,
            metadata: dict | None = None) -> CurrentModel:
    """Copy ``checkpoint`` to the next free ``vNNNN.pt`` and point ``current.json`` at it."""
    models_dir = Path(models_dir)
    checkpoint = Path(checkpoint)
    if not checkpoint.is_file():
        raise EmbsegError(f"{checkpoint}: checkpoint to promote not found")
    version = _store_version(models_dir, checkpoint)
    info = {
        "version": version,
        "checkpoint": version_name(version),
        "miou": miou,
        "source": str(checkpoint.resolve()),
        "promoted_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        **(metadata or {}),
    }
    _write_json_atomic(models_dir / f"v{version:04d}.json", info)
    _write_json_atomic(models_dir / CURRENT_POINTER, info)
    _replace_symlink(models_dir / CURRENT_LINK, version_name(version))
    return CurrentModel(version=version, checkpoint=models_dir / version_name(version),
                        miou=miou, info=info)


def stored_versions(models_dir: Path) -> list[int]:
    """Versions of every promoted checkpoint in ``models_dir``, ascending."""
    if not Path(models_dir).is_dir():
        return []
    found = (_VERSION_FILE.match(p.name) for p in Path(models_dir).iterdir())
    return sorted(int(m.group(1)) for m in found if m)


def _store_version(models_dir: Path, checkpoint: Path) -> int:
    """Copy the checkpoint in under a temporary name, then link it to the next free version."""
    partial = models_dir / f".{checkpoint.name}.{os.getpid()}.partial"
    shutil.copyfile(checkpoint, partial)
    fsync_file(partial)
    try:
        start = max(stored_versions(models_dir), default=0) + 1
        for version in count(start):
            try:
                os.link(partial, models_dir / version_name(version))
            except FileExistsError:
                continue  # taken by a concurrent promotion: try the next number
            fsync_dir(models_dir)
            return version
    finally:
        partial.unlink(missing_ok=True)
    raise AssertionError("unreachable")  # pragma: no cover


def _append_decision(models_dir: Path, decision: PromotionDecision, metadata: dict) -> None:
    record = {
        "time": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "promoted": decision.promoted,
        "reason": decision.reason,
        "new_checkpoint": str(decision.new_checkpoint),
        "new_miou": decision.new_miou,
        "current_miou": decision.current_miou,
        "previous_version": decision.previous_version,
        "current_version": decision.current.version if decision.current else None,
        **metadata,
    }
    with open(models_dir / DECISIONS_LOG, "a", encoding="utf-8") as handle:
        handle.write(json.dumps(record, default=str) + "\n")


def _write_json_atomic(path: Path, data: dict) -> None:
    write_text_atomically(path, json.dumps(data, indent=2, default=str))


def _replace_symlink(link: Path, target: str) -> None:
    """Point ``link`` at ``target`` (relative) atomically: new link, then ``os.replace``."""
    tmp = link.with_name(f".{link.name}.{os.getpid()}.partial")
    tmp.unlink(missing_ok=True)
    os.symlink(target, tmp)
    os.replace(tmp, link)
    fsync_dir(link.parent)
