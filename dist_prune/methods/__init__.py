"""The pruning maths: pure functions of tensors, with no I/O and no knowledge of workers.

`prune_weight` is the one place that knows which method needs which statistic.
"""

from dataclasses import dataclass

from torch import Tensor

from ..config import MethodConfig, parse_pattern
from .masks import select_mask
from .scores import gblm_score, magnitude_score, wanda_score
from .sparsegpt import sparsegpt_prune
from .stats import InputStatistics

NEEDS_ACTIVATIONS = {"magnitude": False, "wanda": True, "sparsegpt": True, "gblm": True}
NEEDS_HESSIAN = {"magnitude": False, "wanda": False, "sparsegpt": True, "gblm": False}


@dataclass
class PruneOutcome:
    weight: Tensor  # fp32, exact zeros where pruned
    mask: Tensor  # True where pruned
    damp: float | None = None  # SparseGPT: damping fraction actually used
    gradient_share: float | None = None  # GBLM: sum |W|G / sum of the whole score (how much gradients weigh)


def prune_weight(W: Tensor, cfg: MethodConfig, stats: InputStatistics | None, G: Tensor | None) -> PruneOutcome:
    """Score and mask one weight matrix (or a row shard of one) with the configured method."""
    nm = parse_pattern(cfg.pattern)
    if cfg.method == "sparsegpt":
        assert stats is not None
        result = sparsegpt_prune(W, stats.hessian(), cfg.sparsity, nm, cfg.sparsegpt_blocksize, cfg.sparsegpt_damp)
        return PruneOutcome(result.weight, result.mask, result.damp)
    scores = _scores(W, cfg, stats, G)
    per_row = not (cfg.method == "magnitude" and cfg.magnitude_scope == "matrix")
    mask = select_mask(scores, cfg.sparsity, nm, per_row=per_row)
    share = None
    if G is not None:
        share = float((W.float().abs() * G.float()).sum() / scores.sum())
    return PruneOutcome(W.float().masked_fill(mask, 0.0), mask, gradient_share=share)


def _scores(W: Tensor, cfg: MethodConfig, stats: InputStatistics | None, G: Tensor | None) -> Tensor:
    if cfg.method == "magnitude":
        return magnitude_score(W)
    assert stats is not None
    if cfg.method == "wanda":
        return wanda_score(W, stats.scaler_row())
    assert G is not None
    return gblm_score(W, stats.scaler_row(), G)
