"""The embedding-space loss of Jain et al. (ICCV 2021) and its nearest-class search.

Public API (tools outside the project call these; names and meanings are fixed):

- :func:`knn_classes` -- exact k nearest class embeddings of each pixel embedding;
- :func:`ess_loss` -- the kNN-approximated cross-entropy;
- :func:`margin_penalty` -- the regulariser keeping class embeddings apart;
- :func:`predict` -- the nearest class of each pixel (the embedding head's decision rule).

Pixel embeddings and class embeddings arrive already L2-normalised; targets are class
indices ``0..C-1`` with ``ignore_index`` (default -1) for unlabelled pixels.

Why chunks: a pixel-by-class distance matrix for a 2 x 256 x 256 batch and 50,000 classes
would hold 6.5e9 floats, and the class-by-class matrix of the regulariser 2.5e9. Every
search here runs over blocks of at most ``budget`` distances (rows of pixels x a slice of the
classes), keeping a running top-k across class slices, so peak memory does not grow with
the number of classes. The search runs without gradient; the few distances that enter the
loss are recomputed exactly (``||e - c||``) with gradient.

On CPU the search's selection and the candidate distances run in compiled kernels
(:mod:`embseg.cpu_kernels`, numba): the same results, several times faster than torch's
top-k and gathers there. ``EMBSEG_CPU_KERNELS=0`` runs the plain torch code GPUs run.
"""

from __future__ import annotations

import os

import torch
from torch import Tensor

DISTANCE_BLOCK_ELEMENTS = 2**25
"""Largest (pixels x classes) distance block the search allocates (128 MiB in float32; CPUs
take at most :data:`CPU_SEARCH_BLOCK_ELEMENTS`). On a GPU each block costs a few kernel
launches whatever its size: at 2**22 a 16 x 513 x 513 batch at C = 1,284 took ~1,300 blocks
(several thousand launches, tens of milliseconds), at 2**25 ~160. Chosen by that count, not
yet timed on a GPU."""

CLASS_SLICE = 2048
"""Widest class slice of one block: it bounds the block's size whatever C is, and keeps a
block row short enough to stay in cache while it is read back (on CPU, slices of 2,048
classes searched 100,000 classes about 1.8x faster than slices of 4,096)."""

CPU_SEARCH_BLOCK_ELEMENTS = 2**21
"""Distances per block of the nearest-class search on CPU (8 MiB in float32): large enough
that the matrix product runs at speed and the compiled selection's thread start-up is
amortised, small enough to stay in the last-level cache (1.3-2x faster than 2**18 at 1,284
and 10,000 classes). GPUs take the whole ``budget``."""

CPU_TILE_ELEMENTS = 2**18
"""Cells per class-by-class tile of the margin penalty's search on CPU (1 MiB in float32):
a tile that stays in the core's cache while its row and column minima read it back."""

CPU_KERNELS_ENV = "EMBSEG_CPU_KERNELS"
"""Environment variable: ``0`` turns off the compiled CPU kernels (:mod:`embseg.cpu_kernels`)
and runs the plain torch code that GPUs run (slower on CPU; the same results)."""


def _compiled(*tensors: Tensor) -> bool:
    """Whether to run the compiled CPU kernels: every tensor in CPU memory, not turned off."""
    return (all(tensor.device.type == "cpu" for tensor in tensors)
            and os.environ.get(CPU_KERNELS_ENV, "1") != "0")


def _block_shape(n_rows: int, n_cols: int, budget: int, device: torch.device | None = None
                 ) -> tuple[int, int]:
    """Rows and columns of one distance block holding at most ``budget`` elements (and at
    most ``CPU_SEARCH_BLOCK_ELEMENTS`` on CPU)."""
    budget = max(1, int(budget))
    if device is None or device.type == "cpu":
        budget = min(budget, CPU_SEARCH_BLOCK_ELEMENTS)
    cols = max(1, min(n_cols, CLASS_SLICE, budget))
    rows = max(1, min(n_rows, budget // cols))
    return rows, cols


def _augmented_queries(emb: Tensor) -> Tensor:
    """``[-2 e, 1]`` rows: with :func:`_augmented_classes` one matrix product gives the scores."""
    return torch.cat([emb * -2.0, emb.new_ones(emb.shape[0], 1)], dim=1)


def _squared_norms(class_emb: Tensor) -> Tensor:
    """``||c||^2`` of every row, (C,), computed a slice at a time (no C x d temporary)."""
    out = class_emb.new_empty(class_emb.shape[0])
    for start in range(0, class_emb.shape[0], CLASS_SLICE):
        rows = class_emb[start:start + CLASS_SLICE]
        out[start:start + CLASS_SLICE] = (rows * rows).sum(dim=1)
    return out


def _augmented_classes(class_emb: Tensor, squared_norms: Tensor) -> Tensor:
    """``[c, ||c||^2]`` rows, so that ``[-2 e, 1] . [c, ||c||^2] = ||e - c||^2 - ||e||^2``.

    The missing ``||e||^2`` is constant along a row and does not change the ranking. Folding
    ``||c||^2`` into the product saves a pass over every block (an ``addmm`` with a broadcast
    bias first copies the bias into the whole output). Built one class slice at a time: a
    whole-table copy would be C x (d + 1) floats, the one part of the search that grows
    with C.
    """
    return torch.cat([class_emb, squared_norms.unsqueeze(1)], dim=1)


def _smallest(scores: Tensor, k: int) -> tuple[Tensor, Tensor]:
    """Values and column indices of the k smallest scores per row, ascending (GPU search)."""
    if k == 1:  # a plain reduction is cheaper than top-k
        values, positions = scores.min(dim=1, keepdim=True)
        return values, positions
    return torch.topk(scores, k, dim=1, largest=False, sorted=True)


def _merge_topk(best_scores: Tensor, best_ids: Tensor, scores: Tensor, ids: Tensor, k: int
                ) -> tuple[Tensor, Tensor]:
    """The (at most) k smallest of two candidate sets of the same rows, ascending."""
    all_scores = torch.cat([best_scores, scores], dim=1)
    all_ids = torch.cat([best_ids, ids], dim=1)
    keep = min(k, all_scores.shape[1])
    top_scores, pos = torch.topk(all_scores, keep, dim=1, largest=False, sorted=True)
    return top_scores, torch.gather(all_ids, 1, pos)


def _mask_excluded(scores: Tensor, local_exclude: Tensor) -> None:
    """Set ``scores[i, local_exclude[i]]`` to +inf where that column is inside the block.

    Written as gather/where/scatter rather than boolean indexing so that it never waits for
    the device (no ``nonzero``).
    """
    width = scores.shape[1]
    inside = (local_exclude >= 0) & (local_exclude < width)
    column = local_exclude.clamp(0, width - 1).unsqueeze(1)
    current = scores.gather(1, column)
    scores.scatter_(1, column, torch.where(inside.unsqueeze(1), float("inf"), current))


def _block_view(buffer: Tensor, rows: int, cols: int) -> Tensor:
    """A contiguous (rows, cols) matrix over the front of a flat scratch buffer."""
    return buffer[:rows * cols].view(rows, cols)


def _search_slices(queries: Tensor, class_emb: Tensor, squared_norms: Tensor, k: int,
                   rows: int, cols: int, exclude: Tensor | None) -> Tensor:
    """Nearest ``k`` classes of every augmented query, ``rows`` x ``cols`` scores at a time.

    Class slices are the outer loop, so that each slice's augmented rows
    (:func:`_augmented_classes`) are built once per search rather than once per row block;
    the running best of every query, (N, k) like the result, is merged slice by slice: on
    CPU by one compiled pass per block (:func:`embseg.cpu_kernels.merge_smallest_`), elsewhere
    by top-k. Every block's scores are written into one scratch buffer allocated once per
    search: a fresh block per step would be thousands of large allocations per call, each
    one paged in again when the allocator hands large blocks back to the system.
    """
    n_rows, n_classes = queries.shape[0], class_emb.shape[0]
    compiled = _compiled(queries)
    if compiled:
        from embseg import cpu_kernels  # numba, loaded only where it runs
    buffer = queries.new_empty(rows * cols)
    best_scores = queries.new_full((n_rows, k), float("inf"))  # no candidate yet
    best_ids = torch.zeros((n_rows, k), dtype=torch.long, device=queries.device)
    if compiled and exclude is None:
        exclude = torch.full((n_rows,), -1, dtype=torch.long)
    for col_start in range(0, n_classes, cols):
        col_stop = min(n_classes, col_start + cols)
        classes = _augmented_classes(class_emb[col_start:col_stop],
                                     squared_norms[col_start:col_stop]).t()
        for row_start in range(0, n_rows, rows):
            row_stop = min(n_rows, row_start + rows)
            scores = torch.mm(queries[row_start:row_stop], classes,
                              out=_block_view(buffer, row_stop - row_start,
                                              col_stop - col_start))
            if compiled:
                cpu_kernels.merge_smallest_(scores, col_start, exclude[row_start:row_stop],
                                best_scores[row_start:row_stop], best_ids[row_start:row_stop])
            else:
                _merge_block(scores, col_start, exclude, best_scores, best_ids,
                             row_start, row_stop, k)
    return best_ids


def _merge_block(scores: Tensor, col_start: int, exclude: Tensor | None, best_scores: Tensor,
                 best_ids: Tensor, row_start: int, row_stop: int, k: int) -> None:
    """Merge a block's k smallest into the running best of its rows with top-k (GPU)."""
    if exclude is not None:
        _mask_excluded(scores, exclude[row_start:row_stop] - col_start)
    slice_k = min(k, scores.shape[1])
    block_scores, block_pos = _smallest(scores, slice_k)
    block_ids = block_pos + col_start
    if col_start == 0 and slice_k == k:
        best_scores[row_start:row_stop] = block_scores
        best_ids[row_start:row_stop] = block_ids
    else:
        merged_scores, merged_ids = _merge_topk(best_scores[row_start:row_stop],
                                                best_ids[row_start:row_stop],
                                                block_scores, block_ids, k)
        best_scores[row_start:row_stop] = merged_scores
        best_ids[row_start:row_stop] = merged_ids


NORMALIZE_EPS = 1e-12
"""Smallest norm divided by, as in ``torch.nn.functional.normalize``."""


class _NormalizeRows(torch.autograd.Function):
    """``x / max(||x||, eps)`` per row with a backward that holds one (C, d) tensor.

    Autograd's ``F.normalize`` backward builds four or five (C, d) temporaries (the quotient
    rule through the expanded norm); on a 100,000-class table that is most of the training
    step's memory growth with C. Here the backward is ``(g - y (y . g)) / ||x||`` written a
    slice of rows at a time into the gradient, with ``y`` recomputed from the saved ``x``
    (where ``||x|| < eps`` the norm is the constant ``eps``: ``g / eps``).
    """

    @staticmethod
    def forward(ctx, table: Tensor) -> Tensor:
        norms = torch.linalg.vector_norm(table, ord=2, dim=1, keepdim=True)
        ctx.save_for_backward(table, norms)
        return table / norms.clamp(min=NORMALIZE_EPS)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_out: Tensor) -> Tensor:
        table, norms = ctx.saved_tensors
        grad = torch.empty_like(table)
        for start in range(0, table.shape[0], CLASS_SLICE):
            stop = start + CLASS_SLICE
            norm = norms[start:stop]
            denominator = norm.clamp(min=NORMALIZE_EPS)
            g = grad_out[start:stop]
            unit_rows = table[start:stop] / denominator
            along = (unit_rows * g).sum(dim=1, keepdim=True) * (norm >= NORMALIZE_EPS)
            torch.div(g - unit_rows * along, denominator, out=grad[start:stop])
        return grad


def normalize_rows(table: Tensor) -> Tensor:
    """Each row of a (C, d) table divided by its L2 norm (``F.normalize(table, dim=1)``).

    Same values and gradient as ``torch.nn.functional.normalize(table, dim=1)``; its
    backward pass allocates only the (C, d) gradient (see :class:`_NormalizeRows`), which
    keeps a large class table's training step flat in memory.
    """
    if table.dim() != 2:
        raise ValueError(f"normalize_rows needs a (C, d) table, got {tuple(table.shape)}")
    return _NormalizeRows.apply(table)


def _check_knn_args(emb: Tensor, class_emb: Tensor, k: int, excluding: bool) -> None:
    """Shapes and k range of a nearest-class search (ValueError on misuse)."""
    if emb.dim() != 2 or class_emb.dim() != 2 or emb.shape[1] != class_emb.shape[1]:
        raise ValueError(
            f"knn_classes needs emb (N,d) and class_emb (C,d), got {tuple(emb.shape)} "
            f"and {tuple(class_emb.shape)}")
    available = class_emb.shape[0] - (1 if excluding else 0)
    if not 0 <= k <= available:
        raise ValueError(f"k={k} is outside 0..{available} for {class_emb.shape[0]} classes")


def knn_classes(emb: Tensor, class_emb: Tensor, k: int, *, exclude: Tensor | None = None,
                budget: int = DISTANCE_BLOCK_ELEMENTS) -> Tensor:
    """The ``k`` nearest classes (by L2 distance) of each embedding, nearest first.

    Args:
        emb: (N, d) query embeddings.
        class_emb: (C, d) class embeddings.
        k: neighbours per query, ``0 <= k <= C`` (``C - 1`` with ``exclude``).
        exclude: optional (N,) class index per query that must not be returned (the
            target in :func:`ess_loss`, the class itself in :func:`margin_penalty`).
        budget: largest number of distances held at once (see the module docstring).

    Returns:
        (N, k) long tensor of class indices, exact (not approximate), ascending distance.
        Computed without gradient, on the tensors' device (in at least float32), with
        matrix products ``||c||^2 - 2 e.c`` over blocks of at most ``budget`` elements.
    """
    _check_knn_args(emb, class_emb, k, exclude is not None)
    n_rows = emb.shape[0]
    if k == 0 or n_rows == 0:
        return torch.empty((n_rows, k), dtype=torch.long, device=emb.device)
    with torch.no_grad():
        # at least float32: a bf16/fp16 search would not be exact
        dtype = torch.promote_types(torch.promote_types(emb.dtype, class_emb.dtype),
                                    torch.float32)
        classes = class_emb.detach().to(dtype)
        squared_norms = _squared_norms(classes)
        rows, cols = _block_shape(n_rows, class_emb.shape[0], budget, emb.device)
        queries = _augmented_queries(emb.detach().to(dtype))  # (N, d + 1), like emb
        return _search_slices(queries, classes, squared_norms, k, rows, cols, exclude)


def _euclidean(diff: Tensor) -> Tensor:
    """``||diff||_2`` over the last axis with a safe gradient (0, not NaN, at distance 0)."""
    return torch.linalg.vector_norm(diff, ord=2, dim=-1)


def _labelled_pixels(emb: Tensor, target: Tensor, ignore_index: int) -> tuple[Tensor, Tensor]:
    """(M, d) embeddings and (M,) targets of the pixels whose target is not ``ignore_index``."""
    if emb.dim() != 4 or target.shape != (emb.shape[0], *emb.shape[2:]):
        raise ValueError(f"ess_loss needs emb (B,d,H,W) and target (B,H,W), got "
                         f"{tuple(emb.shape)} and {tuple(target.shape)}")
    flat_emb = emb.permute(0, 2, 3, 1).reshape(-1, emb.shape[1])
    flat_target = target.reshape(-1)
    labelled = flat_target != ignore_index
    return flat_emb[labelled], flat_target[labelled].long()


def _check_targets(target: Tensor, num_classes: int) -> None:
    """ValueError when a labelled target is outside ``0..C-1`` (would be a wrong label)."""
    if target.numel() and (int(target.min()) < 0 or int(target.max()) >= num_classes):
        raise ValueError(f"targets must lie in 0..{num_classes - 1} (or be the ignore index); "
                         f"got values in {int(target.min())}..{int(target.max())}")


def candidate_classes(emb: Tensor, target: Tensor, class_emb: Tensor, k: int, *,
                      budget: int = DISTANCE_BLOCK_ELEMENTS) -> Tensor:
    """The candidate set of each pixel: its target, then its ``k`` nearest other classes.

    (M, k+1) long tensor, the target at column 0. The neighbour search excludes the target,
    so the target is never one of its own negatives and no candidate repeats (the paper's
    release replaced a neighbour equal to the target by ``index - 1``, which could repeat).
    """
    neighbours = knn_classes(emb, class_emb, k, exclude=target, budget=budget)
    return torch.cat([target.unsqueeze(1), neighbours], dim=1)


DIFFERENCE_CHUNK_ELEMENTS = 2**24
"""Largest (pixels x candidates x d) slice of differences the candidate distances hold on the
torch path (64 MiB in float32; the compiled CPU kernels hold none). Each chunk is a few
kernel launches on a GPU: a 16 x 513 x 513 batch at k = 7, d = 32 is 64 chunks at 2**24,
1,027 at 2**20. Chosen by that count, not yet timed on a GPU."""


def _difference_rows(num_candidates: int, dim: int) -> int:
    """Pixels per chunk of :class:`_CandidateDistances` (at least one)."""
    return max(1, DIFFERENCE_CHUNK_ELEMENTS // max(1, num_candidates * dim))


def _same_dtype(emb: Tensor, class_emb: Tensor) -> tuple[Tensor, Tensor]:
    """Both detached and contiguous in their promoted dtype (the compiled kernels' input)."""
    dtype = torch.promote_types(emb.dtype, class_emb.dtype)
    return (emb.detach().to(dtype).contiguous(), class_emb.detach().to(dtype).contiguous())


class _CandidateDistances(torch.autograd.Function):
    """``||e_i - c_{j}||`` for each pixel ``i`` and candidate class ``j`` of its row.

    The same numbers as ``vector_norm(e.unsqueeze(1) - class_emb[candidates], dim=-1)``, but
    the (M, k+1, d) candidate rows and differences exist only a chunk of pixels at a time,
    forward and backward: autograd would keep the differences for the backward pass and
    then build their gradient and the gathered rows' gradient at full size, several M x (k+1)
    x d tensors in all (hundreds of MB for a 2 x 256 x 256 batch). Saved are the pixel and
    class embeddings (which exist anyway), the candidate ids and the distances. The
    gradient at distance 0 is 0, as ``vector_norm``'s. On CPU, compiled kernels
    (:mod:`embseg.cpu_kernels`) read the candidate rows in place instead, about five times
    faster forward and backward at k = 7, d = 32.
    """

    @staticmethod
    def forward(ctx, emb: Tensor, class_emb: Tensor, candidates: Tensor) -> Tensor:
        if _compiled(emb, class_emb):
            from embseg import cpu_kernels  # numba, loaded only where it runs

            pixels, classes = _same_dtype(emb, class_emb)
            out = cpu_kernels.candidate_distances(pixels, classes, candidates.contiguous())
            ctx.save_for_backward(emb, class_emb, candidates, out)
            return out
        rows = _difference_rows(candidates.shape[1], emb.shape[1])
        out = emb.new_empty(candidates.shape,
                            dtype=torch.promote_types(emb.dtype, class_emb.dtype))
        for start in range(0, candidates.shape[0], rows):
            stop = start + rows
            gathered = class_emb[candidates[start:stop]]  # (r, k+1, d)
            torch.linalg.vector_norm(emb[start:stop].unsqueeze(1) - gathered, ord=2, dim=-1,
                                     out=out[start:stop])
        ctx.save_for_backward(emb, class_emb, candidates, out)
        return out

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_out: Tensor) -> tuple[Tensor | None, Tensor | None, None]:
        emb, class_emb, candidates, distances = ctx.saved_tensors
        want_emb, want_classes = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        # d||e - c|| / de = (e - c) / ||e - c||, and 0 where the distance is 0
        scale = torch.where(distances > 0, grad_out / distances.clamp(min=1e-30),
                            torch.zeros_like(distances))
        if _compiled(emb, class_emb):
            from embseg import cpu_kernels

            pixels, classes = _same_dtype(emb, class_emb)
            grad_emb, grad_classes = cpu_kernels.candidate_distance_gradients(
                pixels, classes, candidates.contiguous(), scale.to(pixels.dtype).contiguous(),
                want_emb=want_emb, want_classes=want_classes)
            return (None if grad_emb is None else grad_emb.to(emb.dtype),
                    None if grad_classes is None else grad_classes.to(class_emb.dtype), None)
        grad_emb = torch.zeros_like(emb) if want_emb else None
        grad_classes = torch.zeros_like(class_emb) if want_classes else None
        rows = _difference_rows(candidates.shape[1], emb.shape[1])
        for start in range(0, candidates.shape[0], rows):
            stop = start + rows
            ids = candidates[start:stop]
            weighted = ((emb[start:stop].unsqueeze(1) - class_emb[ids])
                        * scale[start:stop].unsqueeze(2))
            if grad_emb is not None:
                grad_emb[start:stop] = weighted.sum(dim=1)
            if grad_classes is not None:
                grad_classes.index_add_(0, ids.reshape(-1),
                                        weighted.reshape(-1, emb.shape[1]).to(class_emb.dtype),
                                        alpha=-1.0)
        return grad_emb, grad_classes, None


def candidate_logits(emb: Tensor, class_emb: Tensor, candidates: Tensor, temperature: float
                     ) -> Tensor:
    """Logits ``-temperature * ||e - c_j||_2`` over each pixel's candidates.

    (M, k+1), differentiable w.r.t. both ``emb`` and the gathered rows of ``class_emb``;
    the distances come from the differences ``e - c_j`` (exact, also at 0), see
    :class:`_CandidateDistances`.
    """
    return -temperature * _CandidateDistances.apply(emb, class_emb, candidates)


def ess_loss(emb: Tensor, target: Tensor, class_emb: Tensor, *, k: int, temperature: float,
             ignore_index: int = -1, budget: int = DISTANCE_BLOCK_ELEMENTS) -> Tensor:
    """Cross-entropy over the target and its k nearest other classes (the kNN-approximated
    class probability of the paper).

    Args:
        emb: (B, d, H, W) L2-normalised pixel embeddings.
        target: (B, H, W) class indices ``0..C-1``; ``ignore_index`` marks unlabelled pixels.
        class_emb: (C, d) L2-normalised class embeddings.
        k: negatives per pixel; clipped to ``C - 1``. With ``k = C - 1`` the loss equals
            ``F.cross_entropy(-temperature * torch.cdist(e, class_emb), t)``.
        temperature: scale of the negative distances.
        ignore_index: target value of unlabelled pixels (they get no gradient).
        budget: largest distance block of the neighbour search.

    Returns:
        Scalar mean over labelled pixels; a zero connected to the graph (zero gradients)
        when no pixel is labelled.
    """
    pixels, labels = _labelled_pixels(emb, target, ignore_index)
    if labels.numel() == 0:
        return emb.sum() * 0.0 + class_emb.sum() * 0.0
    num_classes = class_emb.shape[0]
    _check_targets(labels, num_classes)
    candidates = candidate_classes(pixels, labels, class_emb, min(int(k), num_classes - 1),
                                   budget=budget)
    logits = candidate_logits(pixels, class_emb, candidates, temperature)
    return (torch.logsumexp(logits, dim=1) - logits[:, 0]).mean()


MARGIN_SLACK = 1e-3
"""Relative slack of the margin pre-filter: a class whose estimated squared distance to its
nearest other class is below ``margin^2 + MARGIN_SLACK * scale`` (``scale`` = four times the
largest squared norm, the range of squared distances) counts as possibly inside the margin.
It covers the rounding of the ``||a||^2 + ||b||^2 - 2 a.b`` estimate many times over; a
class let through that is in fact outside the margin adds an exact zero."""


def _tile_side(n_classes: int, budget: int, device: torch.device) -> int:
    """Side of the square class-by-class tiles of the symmetric search (<= ``budget`` cells,
    and :data:`CPU_TILE_ELEMENTS` on CPU)."""
    budget = max(1, int(budget))
    if device.type == "cpu":
        budget = min(budget, CPU_TILE_ELEMENTS)
    side = max(1, int(budget ** 0.5))
    return max(1, min(n_classes, CLASS_SLICE, side))


def _nearest_other_squared_distances(class_emb: Tensor, *,
                                    budget: int = DISTANCE_BLOCK_ELEMENTS,
                                    squared_norms: Tensor | None = None) -> Tensor:
    """(C,) squared distance of each class to its nearest other class, without gradient.

    Each unordered pair is scored once: square tiles on and above the block diagonal, each
    tile's row minima going to its row classes and its column minima to its column classes
    (``||a - b|| = ||b - a||``), so the search costs half of the C x C distances of a
    row-by-row search. The scores are ``||a||^2 + ||b||^2 - 2 a.b`` from one matrix product
    of augmented rows (float32 at least), clamped at 0; only values are kept (a column
    minimum with its index is several times slower on CPU than one without), which is all
    the margin hinge needs to tell which classes may be inside the margin.
    ``squared_norms`` may pass the rows' ``||c||^2`` (float32 at least) when the caller
    already has them.
    """
    num_classes = class_emb.shape[0]
    dtype = torch.promote_types(class_emb.dtype, torch.float32)
    classes = class_emb.detach().to(dtype)
    if squared_norms is None:
        squared_norms = _squared_norms(classes)
    best = torch.full((num_classes,), float("inf"), dtype=dtype, device=classes.device)
    side = _tile_side(num_classes, budget, classes.device)
    buffer = classes.new_empty(side * side)  # every tile's scores (see _search_slices)
    for row_start in range(0, num_classes, side):
        row_stop = min(num_classes, row_start + side)
        rows = classes[row_start:row_stop]
        row_part = torch.cat([rows * -2.0, rows.new_ones(len(rows), 1),
                              squared_norms[row_start:row_stop].unsqueeze(1)], dim=1)
        for col_start in range(row_start, num_classes, side):
            col_stop = min(num_classes, col_start + side)
            cols = classes[col_start:col_stop]
            col_part = torch.cat([cols, squared_norms[col_start:col_stop].unsqueeze(1),
                                  cols.new_ones(len(cols), 1)], dim=1)
            # ||a||^2 + ||b||^2 - 2 a.b
            scores = torch.mm(row_part, col_part.t(),
                              out=_block_view(buffer, len(rows), len(cols)))
            if col_start == row_start:
                scores.fill_diagonal_(float("inf"))  # a class is not its own neighbour
            torch.minimum(best[row_start:row_stop], scores.amin(dim=1),
                          out=best[row_start:row_stop])
            if col_start != row_start:
                torch.minimum(best[col_start:col_stop], scores.amin(dim=0),
                              out=best[col_start:col_stop])
            del scores
    return best.clamp_(min=0.0)


def _classes_near_the_margin(class_emb: Tensor, margin: float, budget: int) -> Tensor:
    """Indices of the classes whose nearest other class may lie closer than ``margin``."""
    dtype = torch.promote_types(class_emb.dtype, torch.float32)
    squared_norms = _squared_norms(class_emb.detach().to(dtype))
    squared = _nearest_other_squared_distances(class_emb, budget=budget,
                                               squared_norms=squared_norms)
    scale = 4.0 * float(squared_norms.max())
    threshold = float(margin) ** 2 + MARGIN_SLACK * max(scale, 1e-12)
    return torch.nonzero(squared <= threshold).squeeze(1)


def margin_penalty(class_emb: Tensor, margin: float = 0.2, *,
                   budget: int = DISTANCE_BLOCK_ELEMENTS) -> Tensor:
    """Mean over classes of ``max(0, margin - distance to the nearest other class)``.

    Pushes class embeddings at least ``margin`` apart. Exact, in three steps, all in chunks
    (no C x C matrix, no C x d temporary besides the gradient itself):

    1. without gradient, every class's squared distance to its nearest other class, scoring
       each pair once (:func:`_nearest_other_squared_distances`);
    2. the classes that may be inside the margin (with slack for rounding) get their exact
       nearest other class from :func:`knn_classes`; every other class's term is exactly 0
       with zero gradient, whichever class is nearest;
    3. those classes' distances are recomputed with gradient from one gather of the rows
       involved, so the backward pass adds a single (C, d) gradient.

    The search costs half of C x C x d multiply-adds plus (classes near the margin) x C x d.
    Zero (connected to the graph) for fewer than two classes or none near the margin.
    """
    num_classes = class_emb.shape[0]
    if num_classes < 2:
        return class_emb.sum() * 0.0
    near = _classes_near_the_margin(class_emb, margin, budget)
    if near.numel() == 0:
        return class_emb.sum() * 0.0 + 0.0  # + 0.0: a sum < 0 times 0.0 is -0.0
    nearest = knn_classes(class_emb.detach()[near], class_emb, 1, exclude=near, budget=budget)[:, 0]
    pairs = class_emb.index_select(0, torch.cat([near, nearest]))
    distance = _euclidean(pairs[:len(near)] - pairs[len(near):])
    return torch.clamp(margin - distance, min=0.0).sum() / num_classes


def predict(emb: Tensor, class_emb: Tensor, *, budget: int = DISTANCE_BLOCK_ELEMENTS) -> Tensor:
    """The nearest class of each pixel, (B, d, H, W) -> (B, H, W) in ``0..C-1``."""
    if emb.dim() != 4:
        raise ValueError(f"predict needs emb (B,d,H,W), got {tuple(emb.shape)}")
    batch, dim, height, width = emb.shape
    flat = emb.detach().permute(0, 2, 3, 1).reshape(-1, dim)
    nearest = knn_classes(flat, class_emb, 1, budget=budget)[:, 0]
    return nearest.reshape(batch, height, width)
