"""COCO run-length masks as run lengths, and painting them without a full-image mask.

A COCO RLE lists, in column-major (Fortran) pixel order, the lengths of alternating runs of
0s and 1s, starting with 0s. The compressed ``counts`` string is pycocotools' encoding of that
list (``rleToString`` / ``rleFrString`` in its ``maskApi.c``): each count, from the third on
as the difference to the count two places before, in 5-bit groups, low group first, each
group a character ``48 + bits`` with bit 0x20 meaning "more groups follow" and, on the last
group, bit 0x10 the sign.

:func:`decode_counts` turns the string back into the run lengths (once per mask) and checks it
the way the build needs: well-formed characters, no negative run, exactly ``height * width``
pixels, and the canonical form that pycocotools' own encoder gives for that mask. A string
that passes decodes to exactly the mask ``pycocotools.mask.decode`` gives.
:func:`paint_runs` gives a class id to the mask's pixels that no earlier mask claimed, touching
only the pixels of its runs: the cost is the mask's area, not the image's.
"""

from __future__ import annotations

import numba
import numpy as np

# decode_counts status codes
COUNTS_OK, COUNTS_MALFORMED, COUNTS_SHORT, COUNTS_LONG, COUNTS_NOT_CANONICAL = range(5)


@numba.njit(cache=True, nogil=True)
def _decode(text, total):
    """(status, counts) of a compressed counts string (uint8 array)."""
    n = text.shape[0]
    counts = np.empty(n, dtype=np.int64)
    m = 0
    p = 0
    covered = 0
    while p < n:
        x = 0
        k = 0
        more = True
        while more:
            if p >= n:
                return COUNTS_MALFORMED, counts[:0]
            c = np.int64(text[p]) - 48
            if c < 0 or c > 63 or k > 12:
                return COUNTS_MALFORMED, counts[:0]
            x |= (c & 0x1F) << (5 * k)
            more = (c & 0x20) != 0
            p += 1
            k += 1
            if not more and (c & 0x10) != 0:
                x |= np.int64(-1) << (5 * k)
        if m > 2:
            x += counts[m - 2]
        if x < 0 or x > 0xFFFFFFFF:
            return COUNTS_MALFORMED, counts[:0]
        counts[m] = x
        covered += x
        m += 1
    if covered < total:
        return COUNTS_SHORT, counts[:m]
    if covered > total:
        return COUNTS_LONG, counts[:m]
    return COUNTS_OK, counts[:m]


@numba.njit(cache=True, nogil=True)
def _encode(counts):
    """pycocotools' ``rleToString`` of run lengths, as a uint8 array."""
    out = np.empty(counts.shape[0] * 7 + 1, dtype=np.uint8)
    p = 0
    for i in range(counts.shape[0]):
        x = counts[i]
        if i > 2:
            x -= counts[i - 2]
        more = True
        while more:
            c = x & 0x1F
            x >>= 5
            if c & 0x10:
                more = x != -1
            else:
                more = x != 0
            if more:
                c |= 0x20
            out[p] = c + 48
            p += 1
    return out[:p]


@numba.njit(cache=True, nogil=True)
def _canonical(text, counts):
    for i in range(1, counts.shape[0]):
        if counts[i] == 0:
            return False
    again = _encode(counts)
    if again.shape[0] != text.shape[0]:
        return False
    for i in range(text.shape[0]):
        if again[i] != text[i]:
            return False
    return True


def decode_counts(counts: str | bytes, height: int, width: int, *,
                  canonical: bool = True) -> tuple[int, np.ndarray]:
    """(status, run lengths as int64) of a compressed RLE string for a ``height x width``
    mask; status is one of the ``COUNTS_*`` codes (run lengths are valid only for OK).

    ``canonical=False`` skips the canonical-form check (for strings pycocotools made itself).
    """
    raw = counts.encode("ascii", "replace") if isinstance(counts, str) else bytes(counts)
    text = np.frombuffer(raw, dtype=np.uint8)
    status, runs = _decode(text, int(height) * int(width))
    if canonical and status == COUNTS_OK and not _canonical(text, runs):
        status = COUNTS_NOT_CANONICAL
    return int(status), runs


def encode_counts(runs: np.ndarray) -> bytes:
    """The compressed string of run lengths (pycocotools' encoding)."""
    return _encode(np.asarray(runs, dtype=np.int64)).tobytes()


def runs_area(runs: np.ndarray) -> int:
    """Pixels in the mask: the sum of the 1-runs (every second run, from the second)."""
    return int(runs[1::2].sum())


@numba.njit(cache=True, nogil=True)
def _paint(label, claimed, runs, class_id):
    position = 0
    painted = 0
    for j in range(runs.shape[0]):
        length = runs[j]
        if j & 1:
            for p in range(position, position + length):
                if not claimed[p]:
                    claimed[p] = True
                    label[p] = class_id
                    painted += 1
        position += length
    return painted


def paint_runs(label_t: np.ndarray, claimed_t: np.ndarray, runs: np.ndarray,
               class_id: int) -> int:
    """Give ``class_id`` to the unclaimed pixels of the mask ``runs`` and claim them; returns
    how many pixels it got.

    ``label_t`` (uint16) and ``claimed_t`` (bool) are flat column-major views of the label map
    (``label.T.ravel()`` order), the order COCO runs count in.
    """
    if not 0 <= class_id <= np.iinfo(np.uint16).max:
        raise ValueError(f"class id {class_id} does not fit a uint16 label map")
    return int(_paint(label_t, claimed_t, runs, np.uint16(class_id)))
