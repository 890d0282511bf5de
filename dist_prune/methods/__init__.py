"""The pruning maths: pure functions of tensors, with no I/O and no knowledge of workers.

`prune_weight` is the one place that knows which method needs which statistic.
"""

from collections.abc import Callable
from dataclasses import dataclass

from torch import Tensor

from ..config import MethodConfig, parse_pattern
from .masks import prune_lowest_in_matrix, select_mask
from .scores import gblm_score, magnitude_score, wanda_score
from .sparsegpt import sparsegpt_prune
from .stats import InputStatistics

NEEDS_ACTIVATIONS = {"magnitude": False, "wanda": True, "sparsegpt": True, "gblm": True}
NEEDS_HESSIAN = {"magnitude": False, "wanda": False, "sparsegpt": True, "gblm": False}

MatrixSelector = Callable[[Tensor, float], Tensor]


@dataclass
class PruneOutcome:
    weight: Tensor  # fp32, exact zeros where pruned
    mask: Tensor  # True where pruned
    damp: float | None = None  # SparseGPT: damping fraction actually used
    # GBLM: sum of |W| G and of the whole score over these rows; their ratio says how much gradients weigh.
    gradient_score_sum: float | None = None
    score_sum: float | None = None


def prune_weight(
    W: Tensor,
    cfg: MethodConfig,
    stats: InputStatistics | None,
    G: Tensor | None,
    matrix_selector: MatrixSelector = prune_lowest_in_matrix,
) -> PruneOutcome:
    """Score and mask one weight matrix (or a row shard of one) with the configured method.

    `matrix_selector(scores, ratio)` makes the one-threshold-per-matrix choices (per-matrix magnitude,
    SparseGPT's unstructured blocks); on a row shard the caller passes an exact cross-worker selection.
    """
    nm = parse_pattern(cfg.pattern)
    if cfg.method == "sparsegpt":
        assert stats is not None
        result = sparsegpt_prune(
            W, stats.hessian(), cfg.sparsity, nm, cfg.sparsegpt_blocksize, cfg.sparsegpt_damp, matrix_selector
        )
        return PruneOutcome(result.weight, result.mask, result.damp)
    scores = _scores(W, cfg, stats, G)
    if nm is None and cfg.method == "magnitude" and cfg.magnitude_scope == "matrix":
        mask = matrix_selector(scores, cfg.sparsity)
    else:
        mask = select_mask(scores, cfg.sparsity, nm)
    outcome = PruneOutcome(W.float().masked_fill(mask, 0.0), mask)
    if G is not None:
        outcome.gradient_score_sum = float((W.float().abs() * G.float()).sum())
        outcome.score_sum = float(scores.sum())
    return outcome


def _scores(W: Tensor, cfg: MethodConfig, stats: InputStatistics | None, G: Tensor | None) -> Tensor:
    if cfg.method == "magnitude":
        return magnitude_score(W)
    assert stats is not None
    if cfg.method == "wanda":
        return wanda_score(W, stats.scaler_row())
    assert G is not None
    return gblm_score(W, stats.scaler_row(), G)
