"""Importance scores of magnitude, Wanda and GBLM-Pruner. W: (out, in); a higher score is kept.

All scores are computed in fp32 whatever the weight dtype, as in the reference implementations.
"""

import torch
from torch import Tensor


def magnitude_score(W: Tensor) -> Tensor:
    return W.float().abs()


def wanda_score(W: Tensor, scaler_row: Tensor) -> Tensor:
    """Wanda (Sun et al. 2023): |W_ij| * ||X_j||, with scaler_row[j] = (1/N) sum_{n,t} x_ntj^2."""
    return W.float().abs() * scaler_row.float().sqrt()[None, :]


def gblm_score(W: Tensor, scaler_row: Tensor, G: Tensor) -> Tensor:
    """GBLM-Pruner (Das et al. 2023): the Wanda term plus |W| * G, G from the dense model's gradients."""
    return wanda_score(W, scaler_row) + W.float().abs() * G.float()


def accumulate_sample_gradient(acc: Tensor, scaled_grad: Tensor, norm: str) -> None:
    """Add one sequence's gradient, already scaled (s g), to the accumulator: (s g)^2 for l2, |s g| for l1.

    Each addend is a number exact in fp32 (the square of a bf16 or fp16 gradient is exact there; an fp32
    gradient's square is rounded to fp32), so fp64 accumulators add them exactly in any order."""
    acc.add_(scaled_grad.to(torch.float32, copy=True).square_() if norm == "l2" else scaled_grad.abs())


def gradient_term(acc: Tensor, norm: str) -> Tensor:
    """G_l2 = sqrt(sum_n (s g_n)^2); G_l1 = sum_n |s g_n|. No division by the number of sequences."""
    return acc.sqrt() if norm == "l2" else acc.clone()
