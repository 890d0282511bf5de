"""Importance scores of magnitude, Wanda and GBLM-Pruner. W: (out, in); a higher score is kept.

All scores are computed in fp32 whatever the weight dtype, as in the reference implementations.
"""

from torch import Tensor


def magnitude_score(W: Tensor) -> Tensor:
    return W.float().abs()


def wanda_score(W: Tensor, scaler_row: Tensor) -> Tensor:
    """Wanda (Sun et al. 2023): |W_ij| * ||X_j||, with scaler_row[j] = (1/N) sum_{n,t} x_ntj^2."""
    return W.float().abs() * scaler_row.float().sqrt()[None, :]


def gblm_score(W: Tensor, scaler_row: Tensor, G: Tensor) -> Tensor:
    """GBLM-Pruner (Das et al. 2023): the Wanda term plus |W| * G, G from the dense model's gradients."""
    return wanda_score(W, scaler_row) + W.float().abs() * G.float()


def accumulate_sample_gradient(acc: Tensor, grad: Tensor, scale: float, norm: str) -> None:
    """Add one sequence's gradient to the fp32 accumulator: (s g)^2 for l2, |s g| for l1."""
    scaled = grad.float() * scale
    acc.add_(scaled.square() if norm == "l2" else scaled.abs())


def gradient_term(acc: Tensor, norm: str) -> Tensor:
    """G_l2 = sqrt(sum_n (s g_n)^2); G_l1 = sum_n |s g_n|. No division by the number of sequences."""
    return acc.sqrt() if norm == "l2" else acc.clone()
