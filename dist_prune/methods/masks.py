"""Mask selection shared by every score-based method. True marks a weight to prune.

Ties are broken by position (stable sort), so a mask is a deterministic function of the scores: this
matters for checkpoints dequantised from 4-bit files, where |W| has many exact ties.
"""

import torch
from torch import Tensor

# Rows are sorted a block at a time: a sort's int64 indices are twice the fp32 scores, 0.57 GB for one 13B
# MLP matrix at once; blocks of ~4M elements keep that transient small (every row is independent).
SORT_BLOCK_ELEMENTS = 1 << 22


def _row_blocks(rows: int, cols: int) -> range:
    return range(0, rows, max(1, SORT_BLOCK_ELEMENTS // max(cols, 1)))


def prune_lowest_per_row(scores: Tensor, ratio: float) -> Tensor:
    """Prune exactly int(in * ratio) lowest-scoring inputs of each row. scores: (out, in)."""
    rows, cols = scores.shape
    k = int(cols * ratio)
    mask = torch.zeros_like(scores, dtype=torch.bool)
    step = _row_blocks(rows, cols).step
    for start in _row_blocks(rows, cols):
        order = torch.sort(scores[start : start + step], dim=1, stable=True).indices[:, :k]
        mask[start : start + step].scatter_(1, order, True)
    return mask


def prune_lowest_in_matrix(scores: Tensor, ratio: float) -> Tensor:
    """Prune exactly int(numel * ratio) lowest scores of the whole matrix (one threshold per matrix)."""
    k = int(scores.numel() * ratio)
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
