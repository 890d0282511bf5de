"""Importance of coupled groups: three measures, their uncertainty-weighted fusion, and their stability.

W: a Linear weight (out, in); g = sum_n g_n, the gradient of the total calibration loss (g_n: sequence n's
mean cross-entropy); F = sum_n g_n^2, the diagonal (empirical) Fisher from per-sequence gradients;
scaler_row[j] = (1/N) sum_{n,t} x_ntj^2 of the Linear's input. All maths in fp32; a higher score is kept.
"""

import torch
from torch import Tensor

from .groups import MODULES, LayerShape, group_sums

MEASURES = ("vector", "element", "activation")


def vector_terms(W: Tensor, g: Tensor) -> Tensor:
    """w_k g_k, signed: the vector-wise Taylor score is |sum over the group| (LLM-Pruner, eq. 4)."""
    return W.float() * g.float()


def element_scores(W: Tensor, g: Tensor, F: Tensor) -> Tensor:
    """|w_k g_k - 0.5 w_k^2 F_k|: element-wise second-order Taylor with the diagonal Fisher (LLM-Pruner)."""
    W = W.float()
    return (W * g.float() - 0.5 * W.square() * F.float()).abs()


def activation_scores(W: Tensor, scaler_row: Tensor) -> Tensor:
    """|w_ij| * ||X_j||, Wanda's per-element score, summed per group."""
    return W.float().abs() * scaler_row.float().sqrt()[None, :]


def group_measures(
    weights: dict[str, Tensor],
    grad: dict[str, Tensor],
    fisher: dict[str, Tensor],
    scaler_row: dict[str, Tensor],
    kind: str,
    shape: LayerShape,
    mode: str,
    measures: tuple[str, ...] = MEASURES,
    row_starts: dict[str, int] | None = None,
) -> dict[str, Tensor]:
    """Each measure's sums per unit of one layer's attention or MLP; dicts keyed by module name ("mlp.up_proj").

    The matrices may be row shards placed by `row_starts` (scaler_row is always whole): the results of all
    shards add up to the whole layer's. The vector measure is still signed here; `finish_measures` takes its
    |.| once every shard's part is added.
    """
    per_element = {
        "vector": lambda m: vector_terms(weights[m], grad[m]),
        "element": lambda m: element_scores(weights[m], grad[m], fisher[m]),
        "activation": lambda m: activation_scores(weights[m], scaler_row[m]),
    }
    modules = MODULES[kind]
    return {
        measure: group_sums({m: per_element[measure](m) for m in modules}, kind, shape, mode, row_starts)
        for measure in measures
    }


def finish_measures(sums: dict[str, Tensor]) -> dict[str, Tensor]:
    """Whole-layer sums of `group_measures` -> scores: the vector-wise score is |signed sum over the group|."""
    return {measure: values.abs() if measure == "vector" else values for measure, values in sums.items()}


def fuse(measures: dict[str, Tensor]) -> Tensor:
    """Homoscedastic-uncertainty fusion (Kendall et al. 2018) with sigma fitted in closed form.

    Kendall's objective per measure is I_m / (2 sigma_m^2) + log sigma_m; its minimum over sigma_m is at
    sigma_m^2 = I_m, and with one sigma per measure over all groups scored together, sigma_m^2 = mean(I_m).
    Substituting gives sum_m I_m / (2 mean(I_m)) + const; this returns (1/M) sum_m I_m / mean(I_m), the same
    ranking (a positive factor 2/M, and the constant sum of log sigma_m dropped).
    """
    parts = [values / values.mean().clamp_min(torch.finfo(values.dtype).tiny) for values in measures.values()]
    return torch.stack(parts).mean(dim=0)


def instability(batch_scores: Tensor) -> float:
    """Mean over units of the coefficient of variation (std / mean, population std) of their importance
    across calibration batches; batch_scores: (batches, units). 0 for a single batch."""
    mean = batch_scores.mean(dim=0)
    std = batch_scores.std(dim=0, correction=0)
    return float((std / mean.abs().clamp_min(torch.finfo(mean.dtype).tiny)).mean())
