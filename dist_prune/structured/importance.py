"""Importance of coupled groups: three gradient measures, their uncertainty-weighted fusion, their stability,
and FLAP's fluctuation metric.

W: a Linear weight (out, in); g = sum_n g_n, the gradient of the total calibration loss (g_n: sequence n's
mean cross-entropy); F = sum_n g_n^2, the diagonal (empirical) Fisher from per-sequence gradients;
scaler_row[j] = (1/N) sum_{n,t} x_ntj^2 of the Linear's input. All maths in fp32; a higher score is kept.
"""

from dataclasses import dataclass

import torch
from torch import Tensor

from .groups import MLP, MODULES, LayerShape, group_sums, num_units, unit_index

MEASURES = ("vector", "element", "activation")


@dataclass(frozen=True)
class Importance:
    """A group importance: the measures computed per unit (more than one: fused), and whether one forward pass
    of the dense model gives it, without gradients (FLAP's fluctuation: the scoring pass and the memory plan
    follow this)."""

    name: str
    measures: tuple[str, ...]
    forward_only: bool = False

    @property
    def fused(self) -> bool:
        return len(self.measures) > 1


IMPORTANCES = {
    i.name: i
    for i in (
        Importance("fused", MEASURES),
        Importance("element", ("element",)),
        Importance("vector", ("vector",)),
        Importance("activation", ("activation",)),
        Importance("fluctuation", ("fluctuation",), forward_only=True),
    )
}


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


def fuse(measures: dict[str, Tensor], weights: dict[str, float] | None = None) -> Tensor:
    """Each measure divided by its mean, averaged with `weights` (equal when None).

    With equal weights this is SAAP's homoscedastic-uncertainty fusion (Kendall et al. 2018) with sigma fitted in
    closed form: the objective per measure is I_m / (2 sigma_m^2) + log sigma_m, minimal at sigma_m^2 = I_m,
    and with one sigma per measure over all groups scored together sigma_m^2 = mean(I_m); substituting gives
    sum_m I_m / (2 mean(I_m)) + const, ranked the same as this. `weights` add a second factor per measure (the
    pipeline's: inverse squared instability across calibration batches, scoring.measure_weights).
    """
    weights = weights or dict.fromkeys(measures, 1.0)
    total = sum(weights[m] for m in measures)
    parts = [
        weights[m] * values / values.mean().clamp_min(torch.finfo(values.dtype).tiny) for m, values in measures.items()
    ]
    return torch.stack(parts).sum(dim=0) / total


def instability(batch_scores: Tensor) -> float:
    """Mean over units of the coefficient of variation (std / mean, population std) of their importance
    across calibration batches; batch_scores: (batches, units). 0 for a single batch."""
    mean = batch_scores.mean(dim=0)
    std = batch_scores.std(dim=0, correction=0)
    return float((std / mean.abs().clamp_min(torch.finfo(mean.dtype).tiny)).mean())


def channel_variance(input_sum: Tensor, input_sq: Tensor, tokens: int) -> Tensor:
    """Var(X_j) of each input channel over all calibration tokens (population variance), from the fp64 sums
    sum_t x_tj and sum_t x_tj^2 that merge across workers by addition."""
    mean = input_sum.double() / tokens
    return (input_sq.double() / tokens - mean.square()).clamp_min(0).float()


def fluctuation_channels(W: Tensor, variance: Tensor) -> Tensor:
    """FLAP's WIFV per input channel j of o_proj or down_proj: Var(X_j) * ||W[:, j]||^2, shape (in,).

    W may be a row shard: the column norms are sums over rows, so the shards' vectors add up to the whole's."""
    return W.float().square().sum(dim=0) * variance.float()


def standardize(values: Tensor) -> Tensor:
    """(x - mean) / std over the vector (std with Bessel's correction, as FLAP's reference code); zeros for a
    single value."""
    if values.numel() < 2:
        return torch.zeros_like(values)
    return (values - values.mean()) / values.std().clamp_min(torch.finfo(values.dtype).tiny)


def fluctuation_scores(channels: Tensor, kind: str, shape: LayerShape, mode: str) -> Tensor:
    """One layer's WIFV per channel -> one standardised score per unit, comparable across layers and modules.

    MLP: each channel is a unit; its score is standardised over the layer's channels. Attention: FLAP squares
    the channel metric, standardises it over the layer's o_proj inputs and averages it over each unit's
    channels (a query head's head_dim, or a KV group's r heads)."""
    if kind == MLP:
        return standardize(channels.float())
    standard = standardize(channels.float().square())
    index = unit_index("self_attn.o_proj", shape, mode).to(channels.device)
    units = num_units(kind, shape, mode)
    totals = torch.zeros(units, device=channels.device).index_add_(0, index, standard)
    return totals / torch.bincount(index, minlength=units)
