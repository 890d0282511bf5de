"""GBLM-Pruner (Das et al. 2023): the Wanda term plus |W| * G, G from the dense model's per-sample gradients,
compared within each row. The per-sample sums come from the layer-wise gradient pass
(distributed/layer_gradients.py), which adds each sequence's term with `accumulate_sample_gradient`."""

import torch
from torch import Tensor

from .base import Method, prune_by_scores
from .wanda import wanda_score


def gblm_score(W: Tensor, scaler_row: Tensor, G: Tensor) -> Tensor:
    return wanda_score(W, scaler_row) + W.float().abs() * G.float()


def accumulate_sample_gradient(acc: Tensor, scaled_grad: Tensor, norm: str) -> None:
    """Add one sequence's gradient, already scaled (s g), to the accumulator: (s g)^2 for l2, |s g| for l1.

    Each addend is a number exact in fp32 (the square of a bf16 or fp16 gradient is exact there; an fp32
    gradient's square is rounded to fp32), so fp64 accumulators add them exactly in any order."""
    acc.add_(scaled_grad.to(torch.float32, copy=True).square_() if norm == "l2" else scaled_grad.abs())


def gradient_term(acc: Tensor, norm: str) -> Tensor:
    """G_l2 = sqrt(sum_n (s g_n)^2); G_l1 = sum_n |s g_n|. No division by the number of sequences."""
    return acc.sqrt() if norm == "l2" else acc.clone()


def _prune(members, cfg, stats, nm):
    scaler_row, outcomes = stats.scaler_row(), {}
    for name, m in members.items():
        G = gradient_term(m.gradient_sums.float(), cfg.gblm_norm)
        scores = gblm_score(m.weight, scaler_row, G)
        outcome = prune_by_scores(m, scores, cfg.sparsity, nm)
        outcome.gradient_score_sum = float((m.weight.float().abs() * G).sum())
        outcome.score_sum = float(scores.sum())
        outcomes[name] = outcome
    return outcomes


GBLM = Method("gblm", statistics="norms", gradients=True, prune=_prune, mask_pictures=True)
