"""Crash-safe writes (embseg.fileio): the final name holds the old file or the new one, never half."""

from pathlib import Path

import pytest

from embseg.fileio import (
    temporary_sibling,
    write_atomically,
    write_bytes_atomically,
    write_text_atomically,
)


def _hidden_leftovers(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if p.name.startswith("."))


def test_a_write_replaces_the_file_and_leaves_no_temporary(tmp_path):
    target = tmp_path / "sub" / "table.json"
    write_text_atomically(target, "old")
    write_bytes_atomically(target, b"new")
    assert target.read_bytes() == b"new"
    assert _hidden_leftovers(target.parent) == []


def test_a_failing_writer_keeps_the_old_file_and_removes_its_temporary(tmp_path):
    target = tmp_path / "summary.json"
    target.write_text("previous version")

    def half_then_fail(tmp: Path) -> None:
        tmp.write_text("half of the new ver")
        raise OSError("disk full")

    with pytest.raises(OSError, match="disk full"):
        write_atomically(target, half_then_fail)
    assert target.read_text() == "previous version"
    assert _hidden_leftovers(tmp_path) == []


def test_the_temporary_is_hidden_beside_the_file_and_keeps_its_suffix(tmp_path):
    target = tmp_path / "legend.png"
    seen: list[Path] = []
    write_atomically(target, lambda tmp: (seen.append(tmp), tmp.write_bytes(b"png")))
    assert seen[0].parent == tmp_path and seen[0].name.startswith(".legend.png.")
    assert seen[0].suffix == ".png" and seen[0] == temporary_sibling(target)


def test_an_explicit_temporary_name_is_used(tmp_path):
    target = tmp_path / "train-000000.tar"
    partial = tmp_path / ".train-000000.tar.partial"
    seen: list[Path] = []
    write_atomically(target, lambda tmp: (seen.append(tmp), tmp.write_bytes(b"tar")),
                     temporary=partial)
    assert seen == [partial] and target.read_bytes() == b"tar" and not partial.exists()
