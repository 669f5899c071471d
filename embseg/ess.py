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
"""

from __future__ import annotations

import torch
from torch import Tensor

DISTANCE_BLOCK_ELEMENTS = 2**22
"""Largest (pixels x classes) distance block the search allocates (16 MiB in float32)."""

CLASS_SLICE = 4096
"""Widest class slice of one block: slices of a few thousand classes keep the block's rows
short enough to stay in cache while the top-k reads them back (about 2x faster on CPU than
whole-table rows at C = 50,000), and bound the block's size whatever C is."""


def _block_shape(n_rows: int, n_cols: int, budget: int) -> tuple[int, int]:
    """Rows and columns of one distance block holding at most ``budget`` elements."""
    budget = max(1, int(budget))
    cols = max(1, min(n_cols, CLASS_SLICE, budget))
    rows = max(1, min(n_rows, budget // cols))
    return rows, cols


def _augmented_queries(emb: Tensor) -> Tensor:
    """``[-2 e, 1]`` rows: with :func:`_augmented_classes` one matrix product gives the scores."""
    return torch.cat([emb * -2.0, emb.new_ones(emb.shape[0], 1)], dim=1)


def _augmented_classes(class_emb: Tensor) -> Tensor:
    """``[c, ||c||^2]`` rows, so that ``[-2 e, 1] . [c, ||c||^2] = ||e - c||^2 - ||e||^2``.

    The missing ``||e||^2`` is constant along a row and does not change the ranking. Folding
    ``||c||^2`` into the product saves a pass over every block (an ``addmm`` with a broadcast
    bias first copies the bias into the whole output).
    """
    return torch.cat([class_emb, (class_emb * class_emb).sum(dim=1, keepdim=True)], dim=1)


def _smallest(scores: Tensor, k: int) -> tuple[Tensor, Tensor]:
    """Values and column indices of the k smallest scores per row, ascending."""
    if k == 1:  # a plain reduction is several times faster than top-k on CPU
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


def _knn_rows(queries: Tensor, classes: Tensor, k: int, cols: int, exclude: Tensor | None
              ) -> Tensor:
    """Nearest ``k`` classes of one block of augmented queries, ``cols`` classes at a time."""
    n_rows, n_classes = queries.shape[0], classes.shape[0]
    best_scores = queries.new_empty((n_rows, 0))
    best_ids = torch.empty((n_rows, 0), dtype=torch.long, device=queries.device)
    for start in range(0, n_classes, cols):
        stop = min(n_classes, start + cols)
        scores = queries @ classes[start:stop].t()
        if exclude is not None:
            _mask_excluded(scores, exclude - start)
        block_scores, block_pos = _smallest(scores, min(k, stop - start))
        del scores
        if best_ids.shape[1] == 0:
            best_scores, best_ids = block_scores, block_pos + start
        else:
            best_scores, best_ids = _merge_topk(best_scores, best_ids, block_scores,
                                                block_pos + start, k)
    return best_ids


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
        classes = _augmented_classes(class_emb.detach().to(dtype))
        rows, cols = _block_shape(n_rows, class_emb.shape[0], budget)
        parts = []
        for start in range(0, n_rows, rows):
            stop = min(n_rows, start + rows)
            queries = _augmented_queries(emb[start:stop].detach().to(dtype))
            block_exclude = None if exclude is None else exclude[start:stop]
            parts.append(_knn_rows(queries, classes, k, cols, block_exclude))
        return torch.cat(parts, dim=0)


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


PRODUCT_PATH_MIN_ELEMENTS = 2**20
"""Smallest candidate copy (M x (k+1) x d elements) worth replacing by products (see
:func:`uses_products`); below it the difference path is cheap anyway and exact at 0."""


def uses_products(num_pixels: int, num_candidates: int, dim: int, num_classes: int) -> bool:
    """Whether :func:`candidate_logits` takes its distances from the (M, C) product matrix.

    Only for small vocabularies, ``C <= 2 (k+1) d``, and a candidate copy big enough for its
    cost to matter. The product path holds at most two M x C matrices at once (the products,
    then their gradient), the difference path at least two M x (k+1) x d tensors (the copy
    and the differences, then their gradients), so memory stays bounded by the difference
    path whatever C is. On CPU the product path makes the candidate distances of k = 25,
    d = 64, C = 286 about five times cheaper, forward and backward (k = 7, d = 32: ~1.3x).
    """
    copy_elements = num_pixels * num_candidates * dim
    return (num_classes <= 2 * num_candidates * dim
            and copy_elements >= PRODUCT_PATH_MIN_ELEMENTS)


def _distances_from_products(emb: Tensor, class_emb: Tensor, candidates: Tensor) -> Tensor:
    """``||e - c_j||`` of the candidates as ``sqrt(||e||^2 + ||c_j||^2 - 2 e.c_j)``.

    The products come from one (M, C) matrix product, so forward and backward are matrix
    products plus an (M, C) gather/scatter. Rounding makes squared distances near 0 come out
    as tiny or negative numbers: they are clamped to the smallest normal float, whose
    gradient is 0 (as :func:`_euclidean`'s at distance 0).
    """
    products = emb @ class_emb.t()
    squared = ((emb * emb).sum(dim=1, keepdim=True)
               + (class_emb * class_emb).sum(dim=1)[candidates]
               - 2.0 * products.gather(1, candidates))
    return squared.clamp(min=torch.finfo(squared.dtype).tiny).sqrt()


def candidate_logits(emb: Tensor, class_emb: Tensor, candidates: Tensor, temperature: float
                     ) -> Tensor:
    """Logits ``-temperature * ||e - c_j||_2`` over each pixel's candidates.

    (M, k+1), differentiable w.r.t. both ``emb`` and the gathered rows of ``class_emb``.
    Distances come from the differences ``e - c_j`` (exact, also at 0), or, for large batches
    of a small vocabulary (:func:`uses_products`), from the pixel-class products.
    """
    if uses_products(*candidates.shape, emb.shape[1], class_emb.shape[0]):
        return -temperature * _distances_from_products(emb, class_emb, candidates)
    gathered = class_emb.index_select(0, candidates.reshape(-1)).view(
        *candidates.shape, class_emb.shape[1])  # (M, k+1, d)
    return -temperature * _euclidean(emb.unsqueeze(1) - gathered)


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


def margin_penalty(class_emb: Tensor, margin: float = 0.2, *,
                   budget: int = DISTANCE_BLOCK_ELEMENTS) -> Tensor:
    """Mean over classes of ``max(0, margin - distance to the nearest other class)``.

    Pushes class embeddings at least ``margin`` apart. The nearest other class is found in
    chunks without gradient (no C x C matrix); its distance is then recomputed with
    gradient. Zero (connected to the graph) for fewer than two classes.
    """
    num_classes = class_emb.shape[0]
    if num_classes < 2:
        return class_emb.sum() * 0.0
    own = torch.arange(num_classes, device=class_emb.device)
    nearest = knn_classes(class_emb, class_emb, 1, exclude=own, budget=budget)[:, 0]
    distance = _euclidean(class_emb - class_emb[nearest])
    return torch.clamp(margin - distance, min=0.0).mean()


def predict(emb: Tensor, class_emb: Tensor, *, budget: int = DISTANCE_BLOCK_ELEMENTS) -> Tensor:
    """The nearest class of each pixel, (B, d, H, W) -> (B, H, W) in ``0..C-1``."""
    if emb.dim() != 4:
        raise ValueError(f"predict needs emb (B,d,H,W), got {tuple(emb.shape)}")
    batch, dim, height, width = emb.shape
    flat = emb.detach().permute(0, 2, 3, 1).reshape(-1, dim)
    nearest = knn_classes(flat, class_emb, 1, budget=budget)[:, 0]
    return nearest.reshape(batch, height, width)
