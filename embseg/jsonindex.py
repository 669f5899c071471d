"""Byte spans of the elements of a big JSON file's top-level arrays, without parsing them.

Why: an LVIS train file is 1.2 GB of JSON; ``json.load`` turns it into ~10 GB of Python
objects and takes minutes. The build needs per-image records, not the objects: here one
compiled pass over the file's bytes (read once as plain bytes; no memory map, whose close
fails while any view of it lives) finds, for each top-level key whose value
is an array (``images``, ``annotations``, ``categories``), the byte span of every element, and
a 64-bit FNV-1a hash of each element's bytes that skips whitespace outside strings (so a file
re-written with other separators gives the same hashes). Elements are then parsed one at a
time (:func:`parse_element`), by the driver for the small fields it needs and by the workers
for the segmentations of their own shard.

The scan checks the structure (strings, nesting, commas, one top-level object); the grammar
of each element is checked by the parser that reads it.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import numba
import numpy as np
import orjson

from embseg.errors import EmbsegError
from embseg.fileio import read_file_bytes

_FNV_OFFSET = np.uint64(0xCBF29CE484222325)
_FNV_PRIME = np.uint64(0x100000001B3)

# error codes of the scan
_OK, _EMPTY, _NOT_OBJECT, _UNTERMINATED, _MISMATCH, _TRAILING, _BAD_KEY, _BAD_COMMA = range(8)
_MESSAGES = {
    _UNTERMINATED: "the file ends inside a string, array or object",
    _MISMATCH: "a bracket closes something it did not open",
    _TRAILING: "extra data after the top-level object",
    _BAD_KEY: "expected a quoted key and its value",
    _BAD_COMMA: "misplaced ',' or ':'",
}


@numba.njit(cache=True, nogil=True)
def _is_space(c):
    return c == 32 or c == 10 or c == 13 or c == 9


@numba.njit(cache=True, nogil=True)
def _grow(array, size):
    bigger = np.empty(max(16, 2 * array.shape[0]), dtype=array.dtype)
    bigger[:size] = array[:size]
    return bigger


@numba.njit(cache=True, nogil=True)
def _grow_rows(array, size):
    bigger = np.empty((max(16, 2 * array.shape[0]), array.shape[1]), dtype=array.dtype)
    bigger[:size] = array[:size]
    return bigger


@numba.njit(cache=True, nogil=True)
def _scan(data):  # noqa: C901 - one state machine
    """(code, position, keys, elements, hashes): keys rows (key start, key end, value start,
    value end, first value byte); elements rows (key row, start, end)."""
    n = data.shape[0]
    keys = np.empty((16, 5), dtype=np.int64)
    elems = np.empty((1024, 3), dtype=np.int64)
    hashes = np.empty(1024, dtype=np.uint64)
    n_keys = 0
    n_elems = 0
    stack = np.empty(512, dtype=np.uint8)
    i = 0
    while i < n and _is_space(data[i]):
        i += 1
    if i == n:
        return _EMPTY, 0, keys[:0], elems[:0], hashes[:0]
    if data[i] != 123:  # '{'
        return _NOT_OBJECT, i, keys[:0], elems[:0], hashes[:0]
    depth = 1
    stack[0] = 123
    i += 1
    expect_key = True
    seen_colon = False
    after_comma = False
    key_row = -1
    in_array_elem = False  # inside an element of a depth-2 array of the current key
    elem_start = 0
    last_end = 0
    h = _FNV_OFFSET
    while i < n:
        c = data[i]
        if c == 34:  # '"': a whole string
            start = i
            i += 1
            while i < n and data[i] != 34:
                if data[i] == 92:  # backslash escapes the next byte
                    i += 1
                i += 1
            if i >= n:
                return _UNTERMINATED, start, keys[:0], elems[:0], hashes[:0]
            if depth == 1:
                if not expect_key:
                    if key_row >= 0 and keys[key_row, 2] == -1 and seen_colon:
                        keys[key_row, 2] = start
                        keys[key_row, 4] = 34
                        keys[key_row, 3] = i + 1
                    else:
                        return _BAD_KEY, start, keys[:0], elems[:0], hashes[:0]
                else:
                    if n_keys == keys.shape[0]:
                        keys = _grow_rows(keys, n_keys)
                    keys[n_keys, 0] = start + 1
                    keys[n_keys, 1] = i
                    keys[n_keys, 2] = -1
                    keys[n_keys, 3] = -1
                    keys[n_keys, 4] = 0
                    key_row = n_keys
                    n_keys += 1
                    expect_key = False
                    seen_colon = False
            elif depth >= 2 and key_row >= 0 and keys[key_row, 4] == 91:
                if depth == 2 and not in_array_elem:
                    in_array_elem = True
                    after_comma = False
                    elem_start = start
                    h = _FNV_OFFSET
                if in_array_elem:
                    for j in range(start, i + 1):
                        h = (h ^ np.uint64(data[j])) * _FNV_PRIME
                    last_end = i + 1
            i += 1
            continue
        if _is_space(c):
            i += 1
            continue
        if depth == 1:
            if c == 58:  # ':'
                if expect_key or key_row < 0 or keys[key_row, 2] != -1 or seen_colon:
                    return _BAD_COMMA, i, keys[:0], elems[:0], hashes[:0]
                seen_colon = True
                i += 1
                continue
            if c == 44:  # ','
                if expect_key or key_row < 0 or keys[key_row, 3] == -1:
                    return _BAD_COMMA, i, keys[:0], elems[:0], hashes[:0]
                expect_key = True
                i += 1
                continue
            if c == 125:  # '}' closes the top level
                if key_row >= 0 and expect_key:  # a trailing comma
                    return _BAD_COMMA, i, keys[:0], elems[:0], hashes[:0]
                if key_row >= 0 and keys[key_row, 3] == -1:
                    return _BAD_KEY, i, keys[:0], elems[:0], hashes[:0]
                depth = 0
                i += 1
                break
            if expect_key or key_row < 0 or keys[key_row, 2] != -1 or not seen_colon:
                return _BAD_KEY, i, keys[:0], elems[:0], hashes[:0]
            keys[key_row, 2] = i
            keys[key_row, 4] = c
            if c == 91 or c == 123:  # '[' or '{': a nested value
                stack[depth] = c
                depth += 1
                i += 1
                continue
            while i < n and not (_is_space(data[i]) or data[i] == 44 or data[i] == 125):
                i += 1
            keys[key_row, 3] = i
            continue
        # depth >= 2: inside a top-level value
        array_value = keys[key_row, 4] == 91
        if c == 91 or c == 123:
            if depth == stack.shape[0]:
                return _MISMATCH, i, keys[:0], elems[:0], hashes[:0]
            if array_value and depth == 2 and not in_array_elem:
                in_array_elem = True
                after_comma = False
                elem_start = i
                h = _FNV_OFFSET
            stack[depth] = c
            depth += 1
        elif c == 93 or c == 125:
            opener = stack[depth - 1]
            if (c == 93 and opener != 91) or (c == 125 and opener != 123):
                return _MISMATCH, i, keys[:0], elems[:0], hashes[:0]
            depth -= 1
            if depth == 1:  # the key's value ends here
                if array_value and after_comma and not in_array_elem:
                    return _BAD_COMMA, i, keys[:0], elems[:0], hashes[:0]
                after_comma = False
                if array_value and in_array_elem:
                    if n_elems == elems.shape[0]:
                        elems = _grow_rows(elems, n_elems)
                        hashes = _grow(hashes, n_elems)
                    elems[n_elems, 0] = key_row
                    elems[n_elems, 1] = elem_start
                    elems[n_elems, 2] = last_end
                    hashes[n_elems] = h
                    n_elems += 1
                    in_array_elem = False
                keys[key_row, 3] = i + 1
                i += 1
                continue
        elif c == 44 and depth == 2 and array_value:
            if not in_array_elem:
                return _BAD_COMMA, i, keys[:0], elems[:0], hashes[:0]
            if n_elems == elems.shape[0]:
                elems = _grow_rows(elems, n_elems)
                hashes = _grow(hashes, n_elems)
            elems[n_elems, 0] = key_row
            elems[n_elems, 1] = elem_start
            elems[n_elems, 2] = last_end
            hashes[n_elems] = h
            n_elems += 1
            in_array_elem = False
            after_comma = True
            i += 1
            continue
        elif array_value and depth == 2 and not in_array_elem:
            in_array_elem = True  # a scalar element
            after_comma = False
            elem_start = i
            h = _FNV_OFFSET
        if in_array_elem:
            h = (h ^ np.uint64(c)) * _FNV_PRIME
            last_end = i + 1
        i += 1
    if depth != 0:
        return _UNTERMINATED, n, keys[:0], elems[:0], hashes[:0]
    while i < n and _is_space(data[i]):
        i += 1
    if i != n:
        return _TRAILING, i, keys[:0], elems[:0], hashes[:0]
    return _OK, 0, keys[:n_keys].copy(), elems[:n_elems].copy(), hashes[:n_elems].copy()


@dataclass
class ArraySpans:
    """Elements of one top-level array: byte offsets, lengths, and whitespace-blind hashes."""

    offsets: np.ndarray  # int64
    lengths: np.ndarray  # int64
    hashes: np.ndarray  # uint64

    def __len__(self) -> int:
        return len(self.offsets)


@dataclass
class JsonIndex:
    """What :func:`index_json_file` found: the top-level keys' value kinds and array spans."""

    path: Path
    kinds: dict[str, str]  # key -> "array", "object", "string", "number", "true", ...
    arrays: dict[str, ArraySpans]
    values: dict[str, tuple[int, int]]  # key -> (start, end) of its value


_KIND = {91: "array", 123: "object", 34: "string", 116: "true", 102: "false", 110: "null"}


def index_json_file(path: Path, data: bytes | None = None) -> JsonIndex:
    """Scan ``path`` (or its bytes ``data``, already read; see the module docstring);
    EmbsegError naming the file if unusable."""
    path = Path(path)
    if data is None:
        data = read_file_bytes(path)
    array = np.frombuffer(data, dtype=np.uint8)
    code, position, keys, elems, hashes = _scan(array)
    where = _line_column(array, position) if code not in (_OK, _EMPTY) else ""
    kind = _top_level_kind(data[position:position + 1])
    names = [data[int(k[0]):int(k[1])] for k in keys]
    if code == _NOT_OBJECT:
        raise EmbsegError(f"{path}: not an LVIS/COCO annotation file (top level is {kind}, "
                          "expected an object)")
    if code == _EMPTY:
        raise EmbsegError(f"{path}: file is empty")
    if code != _OK:
        raise EmbsegError(f"{path}: malformed JSON at {where}: {_MESSAGES[code]}")
    kinds, arrays, values = {}, {}, {}
    for row, raw in enumerate(names):
        try:
            name = orjson.loads(b'"' + raw + b'"')
        except orjson.JSONDecodeError:
            raise EmbsegError(f"{path}: malformed JSON (a top-level key at byte {keys[row, 0]} "
                              "is not a valid string)") from None
        first = int(keys[row, 4])
        kinds[name] = _KIND.get(first, "number")
        values[name] = (int(keys[row, 2]), int(keys[row, 3]))
        if first == 91:
            mine = elems[:, 0] == row
            arrays[name] = ArraySpans(offsets=elems[mine, 1].copy(),
                                      lengths=(elems[mine, 2] - elems[mine, 1]).copy(),
                                      hashes=hashes[mine].copy())
    return JsonIndex(path=path, kinds=kinds, arrays=arrays, values=values)


def _line_column(data: np.ndarray, position: int) -> str:
    """``line L column C (character N)`` of a byte position (as :mod:`json` reports it)."""
    before = data[:position]
    newlines = np.flatnonzero(before == 10)
    line_start = int(newlines[-1]) + 1 if len(newlines) else 0
    characters = int(np.count_nonzero((before & 0xC0) != 0x80))  # UTF-8 lead bytes
    column = int(np.count_nonzero((data[line_start:position] & 0xC0) != 0x80)) + 1
    return f"line {len(newlines) + 1} column {column} (character {characters})"


def _top_level_kind(first: bytes) -> str:
    return {b"[": "list", b'"': "str", b"t": "bool", b"f": "bool", b"n": "NoneType"}.get(
        first, "a number" if first[:1].isdigit() or first == b"-" else "not JSON")


class ElementReader:
    """Reads and parses elements of one file by their spans (``pread``; thread-safe)."""

    def __init__(self, path: Path):
        self.path = Path(path)
        self._fd = os.open(self.path, os.O_RDONLY)

    def raw(self, offset: int, length: int) -> bytes:
        data = os.pread(self._fd, int(length), int(offset))
        if len(data) != length:
            raise EmbsegError(f"{self.path}: file is shorter than when it was planned "
                              "(changed during the build?)")
        return data

    def parse(self, offset: int, length: int, what: str) -> object:
        return parse_element(self.raw(offset, length), self.path, what, offset)

    def close(self) -> None:
        os.close(self._fd)

    def __enter__(self) -> ElementReader:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def parse_element(data: bytes, path: Path, what: str, offset: int) -> object:
    """One element's JSON; EmbsegError naming the file, the element and the byte offset."""
    try:
        return orjson.loads(data)
    except orjson.JSONDecodeError as exc:
        raise EmbsegError(f"{path}: {what} at byte {offset} is malformed JSON "
                          f"({' '.join(str(exc).split())})") from None
