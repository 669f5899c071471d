"""Compiled CPU kernels of the ESS loss: the running k-smallest selection of the nearest-class
search, and the candidate distances with their gradient (numba, on torch tensors' memory).

Why: on CPU the loss at 1,284 classes cost several times the C = 21 loss, and most of it was
not arithmetic. ``torch.topk`` copies every row into (value, index) pairs before sorting part
of it, three to four times the cost of the distance product itself at k = 7; the candidate
distances went through (M, k+1, d) gathered copies and differences, forward and backward.
Here the search keeps, per query, the k smallest scores seen so far: one pass over a block
row compares each score with the row's current k-th smallest and inserts the rare smaller
one, so a block costs about one read and the running best of earlier class slices is merged
for free. The candidate distances read each pixel's candidate rows in place.

The kernels are exact (the same distances; float64 sums) and deterministic; the meaning of
every function is that of its torch counterpart in :mod:`embseg.ess`, which the tests check.
They run serially on ranges of rows, split over torch's thread count by a small pool of
Python threads (the kernels release the GIL). Numba's own parallel layers are not used: its
OpenMP layer shares OpenMP state with torch's and changed torch's later convolution results
(bit-level, enough to break exact resume), and its work-queue layer was slower.
"""

from __future__ import annotations

import math
import os
import threading
from concurrent.futures import ThreadPoolExecutor

import numba
import torch
from torch import Tensor

MIN_ROWS_PER_THREAD = 256
"""Fewer rows than this per thread run on the calling thread alone (hand-off costs ~50 us)."""


class _RowPool:
    """Python threads that run a kernel over row ranges; forgotten in a forked child."""

    def __init__(self) -> None:
        self._executor: ThreadPoolExecutor | None = None
        self._size = 0
        self._lock = threading.Lock()  # callers on several threads share one executor

    def run(self, kernel, num_rows: int, *arrays) -> None:
        """``kernel(start, stop, *arrays)`` over ``0..num_rows``, split over torch's threads."""
        threads = max(1, min(torch.get_num_threads(), num_rows // MIN_ROWS_PER_THREAD))
        if threads == 1:
            kernel(0, num_rows, *arrays)
            return
        bounds = [num_rows * part // threads for part in range(threads + 1)]
        with self._lock:  # no other caller replaces the executor between these submits
            executor = self._executor_for(threads - 1)
            futures = [executor.submit(kernel, bounds[part], bounds[part + 1], *arrays)
                       for part in range(1, threads)]
        kernel(bounds[0], bounds[1], *arrays)
        for future in futures:
            future.result()

    def _executor_for(self, workers: int) -> ThreadPoolExecutor:
        """The executor of this process with at least ``workers`` threads (call under the
        lock); a smaller one is retired, its queued work still runs."""
        if self._executor is None or self._size < workers:
            if self._executor is not None:
                self._executor.shutdown(wait=False)
            self._executor = ThreadPoolExecutor(max_workers=workers,
                                                thread_name_prefix="embseg-kernel")
            self._size = workers
        return self._executor

    def forget_after_fork(self) -> None:
        """In a forked child: the parent's threads and lock state do not carry over."""
        self._lock = threading.Lock()
        self._executor, self._size = None, 0


_POOL = _RowPool()
if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_POOL.forget_after_fork)


@numba.njit(nogil=True, cache=True)
def _merge_rows(start, stop, scores, column_offset, exclude, best_values,
                best_ids):  # pragma: no cover
    width = scores.shape[1]
    k = best_values.shape[1]
    for row in range(start, stop):
        values = best_values[row]
        ids = best_ids[row]
        excluded = exclude[row] - column_offset
        kth = values[k - 1]
        row_scores = scores[row]
        for column in range(width):
            score = row_scores[column]
            if score < kth and column != excluded:
                slot = k - 1
                while slot > 0 and values[slot - 1] > score:
                    values[slot] = values[slot - 1]
                    ids[slot] = ids[slot - 1]
                    slot -= 1
                values[slot] = score
                ids[slot] = column + column_offset
                kth = values[k - 1]


def merge_smallest_(scores: Tensor, column_offset: int, exclude: Tensor,
                    best_values: Tensor, best_ids: Tensor) -> None:
    """Fold a block of scores (R, W) into each row's ascending k smallest, in place.

    ``best_values``/``best_ids`` (R, k) hold the running best, +inf in unfilled slots (start
    from all +inf). Column ``j`` of ``scores`` is class ``column_offset + j``; ``exclude``
    (R,) int64 names a class per row never to select (-1 for none). A score enters only when
    strictly smaller than the current k-th, so among equal scores the class seen first (the
    lower id, slices visited in order) ranks first; NaN never enters. CPU tensors, the
    scores in the dtype of ``best_values``.
    """
    _POOL.run(_merge_rows, scores.shape[0], scores.numpy(), int(column_offset),
              exclude.numpy(), best_values.numpy(), best_ids.numpy())


@numba.njit(nogil=True, cache=True)
def _distances(start, stop, emb, class_emb, candidates, out):  # pragma: no cover
    num_candidates = candidates.shape[1]
    dim = emb.shape[1]
    for pixel in range(start, stop):
        for slot in range(num_candidates):
            row = candidates[pixel, slot]
            total = 0.0
            for axis in range(dim):
                diff = emb[pixel, axis] - class_emb[row, axis]
                total += diff * diff
            out[pixel, slot] = math.sqrt(total)


def candidate_distances(emb: Tensor, class_emb: Tensor, candidates: Tensor) -> Tensor:
    """``||e_i - c_{candidates[i, j]}||`` as an (M, k+1) tensor (CPU, no autograd).

    ``emb`` (M, d) and ``class_emb`` (C, d) of one dtype; ``candidates`` (M, k+1) int64 in
    ``0..C-1``.
    """
    out = emb.new_empty(candidates.shape)
    _POOL.run(_distances, candidates.shape[0], emb.numpy(), class_emb.numpy(),
              candidates.numpy(), out.numpy())
    return out


@numba.njit(nogil=True, cache=True)
def _pixel_gradients(start, stop, emb, class_emb, candidates, scale,
                     grad_emb):  # pragma: no cover
    num_candidates = candidates.shape[1]
    dim = emb.shape[1]
    for pixel in range(start, stop):
        for axis in range(dim):
            grad_emb[pixel, axis] = 0.0
        for slot in range(num_candidates):
            weight = scale[pixel, slot]
            if weight != 0.0:
                row = candidates[pixel, slot]
                for axis in range(dim):
                    grad_emb[pixel, axis] += weight * (emb[pixel, axis] - class_emb[row, axis])


@numba.njit(nogil=True, cache=True)
def _class_gradients(emb, class_emb, candidates, scale, grad_classes):  # pragma: no cover
    num_pixels, num_candidates = candidates.shape
    dim = emb.shape[1]
    for pixel in range(num_pixels):  # serial: pixels share classes
        for slot in range(num_candidates):
            weight = scale[pixel, slot]
            if weight != 0.0:
                row = candidates[pixel, slot]
                for axis in range(dim):
                    grad_classes[row, axis] -= weight * (emb[pixel, axis] - class_emb[row, axis])


def candidate_distance_gradients(emb: Tensor, class_emb: Tensor, candidates: Tensor,
                                 scale: Tensor, *, want_emb: bool,
                                 want_classes: bool) -> tuple[Tensor | None, Tensor | None]:
    """Gradients of :func:`candidate_distances` w.r.t. ``emb`` and ``class_emb``.

    ``scale`` (M, k+1), in the dtype of ``emb``, is the incoming gradient over the distance
    (0 where the distance is 0): pixel ``i`` gets ``sum_j scale[i, j] (e_i - c_j)`` and each
    candidate class the opposite, summed over its pixels in pixel order (deterministic).
    """
    grad_emb = grad_classes = None
    arrays = (emb.numpy(), class_emb.numpy(), candidates.numpy(), scale.numpy())
    if want_emb:
        grad_emb = torch.empty_like(emb)
        _POOL.run(_pixel_gradients, candidates.shape[0], *arrays, grad_emb.numpy())
    if want_classes:
        grad_classes = torch.zeros_like(class_emb)
        _class_gradients(*arrays, grad_classes.numpy())
    return grad_emb, grad_classes
