"""Crash-safe file writes shared by every stage, and the one checked whole-file read.

A file a later stage reads (a shard record, a checkpoint, a vocabulary, an evaluation table,
a prediction picture) must never be seen half written: a kill, a full disk or an exception
in the middle of a write has to leave either the old file or no file under the final name.
Every writer therefore writes a hidden sibling in the same directory, flushes it to disk,
and renames it over the final name (``os.replace`` is atomic within a file system); the
directory is then flushed so the rename itself survives a power cut.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path

from embseg.errors import EmbsegError


def fsync_file(path: Path) -> None:
    """Flush a written file's data to disk."""
    with open(path, "rb") as handle:
        os.fsync(handle.fileno())


def fsync_dir(path: Path) -> None:
    """Flush a directory entry (a rename into it) to disk; a file system that refuses is
    left alone (the rename has still happened)."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def temporary_sibling(path: Path) -> Path:
    """A hidden name beside ``path`` for writing it: ``.<name>.tmp-<pid><suffix>``.

    Hidden, so that folder scans (shard globs, version lists) never pick it up; the pid keeps
    two processes apart; the final suffix is kept because some writers (matplotlib, PIL)
    choose the format from it.
    """
    path = Path(path)
    return path.with_name(f".{path.name}.tmp-{os.getpid()}{path.suffix}")


def write_atomically(path: Path, write: Callable[[Path], object], *,
                     temporary: Path | None = None) -> Path:
    """Produce ``path`` by ``write(temporary)``, then fsync and rename it into place.

    ``temporary`` defaults to :func:`temporary_sibling`; it must be in the same directory.
    The temporary is removed when ``write`` fails; the parent directory is created if needed.
    Returns ``path``.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = temporary_sibling(path) if temporary is None else Path(temporary)
    try:
        write(tmp)
        fsync_file(tmp)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    fsync_dir(path.parent)
    return path


def write_bytes_atomically(path: Path, data: bytes, *, temporary: Path | None = None) -> Path:
    """:func:`write_atomically` for bytes already in memory."""
    return write_atomically(path, lambda tmp: tmp.write_bytes(data), temporary=temporary)


def write_text_atomically(path: Path, text: str) -> Path:
    """:func:`write_atomically` for UTF-8 text already in memory."""
    return write_atomically(path, lambda tmp: tmp.write_text(text, encoding="utf-8"))


def read_file_bytes(path: Path) -> bytes:
    """The whole file (EmbsegError naming it when it is missing, not a file, unreadable or
    empty). Plain bytes, not a memory map: views of them can outlive any scope safely."""
    path = Path(path)
    if not path.exists():
        raise EmbsegError(f"{path}: file not found")
    if not path.is_file():
        raise EmbsegError(f"{path}: not a file")
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise EmbsegError(f"{path}: cannot read ({' '.join(str(exc).split())})") from exc
    if not data:
        raise EmbsegError(f"{path}: file is empty")
    return data
