"""Mask selection shared by every score-based method. True marks a weight to prune.

Ties are broken by position (stable sort), so a mask is a deterministic function of the scores: this
matters for checkpoints dequantised from 4-bit files, where |W| has many exact ties.
"""

import torch
from torch import Tensor


def prune_lowest_per_row(scores: Tensor, ratio: float) -> Tensor:
    """Prune exactly int(in * ratio) lowest-scoring inputs of each row. scores: (out, in)."""
    k = int(scores.shape[1] * ratio)
    order = torch.sort(scores, dim=1, stable=True).indices[:, :k]
    return torch.zeros_like(scores, dtype=torch.bool).scatter_(1, order, True)


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
    order = torch.sort(groups, dim=2, stable=True).indices[:, :, : m - n]
    mask = torch.zeros_like(groups, dtype=torch.bool).scatter_(2, order, True)
    return mask.view(rows, cols)


def select_mask(scores: Tensor, ratio: float, nm: tuple[int, int] | None) -> Tensor:
    """The per-row comparison groups: N:M when given, else the lowest `ratio` of each row."""
    return prune_n_m(scores, *nm) if nm is not None else prune_lowest_per_row(scores, ratio)
