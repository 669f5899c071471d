"""The datasets' official label tables, kept as data in ``embseg/formats/tables/*.tsv``.

Each file is tab-separated: ``#`` comment lines (what the columns mean and where the table
comes from), one header line, one row per label. :func:`read_table` returns the rows as dicts
of strings; the format modules turn them into a :class:`~embseg.vocab.Vocabulary` and a
:class:`~embseg.formats.core.ValueMap`.
"""

from __future__ import annotations

from functools import cache
from importlib import resources


@cache
def read_table(name: str) -> tuple[dict[str, str], ...]:
    """Rows of ``tables/<name>`` (header names -> cell text), in file order."""
    text = (resources.files("embseg.formats") / "tables" / name).read_text(encoding="utf-8")
    lines = [line for line in text.splitlines() if line and not line.startswith("#")]
    header = lines[0].split("\t")
    rows = []
    for number, line in enumerate(lines[1:], start=2):
        cells = line.split("\t")
        if len(cells) != len(header):
            raise ValueError(f"tables/{name}: row {number} has {len(cells)} cells, the header "
                             f"{len(header)}")
        rows.append(dict(zip(header, cells, strict=True)))
    return tuple(rows)
