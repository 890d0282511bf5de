"""Mask selection shared by every score-based method. True marks a weight to prune.

Ties are broken by position (the order of a stable sort), so a mask is a deterministic function of the
scores: this matters for checkpoints dequantised from 4-bit files, where |W| has many exact ties.

The k lowest of a row are found by selection, not sorting: `kthvalue` gives the k-th smallest score, every
score below it is pruned, and of the scores equal to it the first ones by position make up the count. That is
the stable sort's answer in linear time (on a GPU a 28672 x 8192 matrix takes 12 ms against 27 ms sorted).
"""

import torch
from torch import Tensor

# Rows are selected a block at a time: the comparison masks and the int32 running count of ties are
# 6 bytes per score, 0.42 GB for one 13B MLP matrix at once; blocks of ~4M scores keep that transient small.
SELECT_BLOCK_ELEMENTS = 1 << 22


def _row_blocks(rows: int, cols: int) -> range:
    return range(0, rows, max(1, SELECT_BLOCK_ELEMENTS // max(cols, 1)))


def lowest_k(scores: Tensor, k: int) -> Tensor:
    """Along the last dimension: exactly the k lowest scores of each row (ties to the lower index). NaN counts
    as the highest score, as a sort orders it."""
    if k <= 0:
        return torch.zeros_like(scores, dtype=torch.bool)
    if k >= scores.shape[-1]:
        return torch.ones_like(scores, dtype=torch.bool)
    scores = torch.nan_to_num(scores, nan=float("inf"))
    threshold = scores.kthvalue(k, dim=-1, keepdim=True).values
    below = scores < threshold
    ties = scores == threshold
    ties_wanted = k - below.sum(dim=-1, keepdim=True, dtype=torch.int32)
    return below | (ties & (ties.cumsum(dim=-1, dtype=torch.int32) <= ties_wanted))


def prune_lowest_per_row(scores: Tensor, ratio: float) -> Tensor:
    """Prune exactly int(in * ratio) lowest-scoring inputs of each row. scores: (out, in)."""
    rows, cols = scores.shape
    k = int(cols * ratio)
    mask = torch.empty_like(scores, dtype=torch.bool)
    step = _row_blocks(rows, cols).step
    for start in _row_blocks(rows, cols):
        mask[start : start + step] = lowest_k(scores[start : start + step], k)
    return mask


def prune_lowest_in_matrix(scores: Tensor, ratio: float) -> Tensor:
    """Prune exactly int(numel * ratio) lowest scores of the whole matrix (one threshold per matrix)."""
    return lowest_in_matrix(scores, int(scores.numel() * ratio))


def lowest_in_matrix(scores: Tensor, k: int) -> Tensor:
    """The k lowest scores of the whole matrix, ties by flat (row-major) index. One sort: a GPU selects the k-th
    of one long vector in a single thread block, which is slower than sorting it."""
    order = torch.sort(scores.flatten(), stable=True).indices[:k]
    mask = torch.zeros(scores.numel(), dtype=torch.bool, device=scores.device)
    return mask.scatter_(0, order, True).view_as(scores)


def prune_n_m(scores: Tensor, n: int, m: int) -> Tensor:
    """N:M per row: in every group of m consecutive inputs, keep the n highest and prune the m - n lowest."""
    rows, cols = scores.shape
    if cols % m:
        raise ValueError(f"{cols} input columns are not divisible by M={m}")
    groups = scores.reshape(rows, cols // m, m)
    mask = torch.zeros_like(groups, dtype=torch.bool)
    step = _row_blocks(rows, cols).step
    for start in _row_blocks(rows, cols):
        order = torch.sort(groups[start : start + step], dim=2, stable=True).indices[:, :, : m - n]
        mask[start : start + step].scatter_(2, order, True)
    return mask.view(rows, cols)


def select_mask(scores: Tensor, ratio: float, nm: tuple[int, int] | None) -> Tensor:
    """The per-row comparison groups: N:M when given, else the lowest `ratio` of each row."""
    return prune_n_m(scores, *nm) if nm is not None else prune_lowest_per_row(scores, ratio)
