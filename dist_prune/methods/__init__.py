"""The pruning maths: pure functions of tensors, with no I/O and no knowledge of workers.

`prune_group` is the one place that knows which method needs which statistic. The Linears that read the same
input are pruned together: they share their input statistics, and SparseGPT factorises their Hessian once.
"""

from collections.abc import Callable
from dataclasses import dataclass

from torch import Tensor

from ..config import MethodConfig, parse_pattern
from .masks import prune_lowest_in_matrix, select_mask
from .scores import gblm_score, gradient_term, magnitude_score, wanda_score
from .sparsegpt import sparsegpt_prune_group
from .stats import InputStatistics

MatrixSelector = Callable[[Tensor, float], Tensor]


@dataclass
class PruneOutcome:
    weight: Tensor  # fp32, exact zeros where pruned
    mask: Tensor  # True where pruned
    damp: float | None = None  # SparseGPT: damping fraction actually used
    # GBLM: sum of |W| G and of the whole score over these rows; their ratio says how much gradients weigh.
    gradient_score_sum: float | None = None
    score_sum: float | None = None


@dataclass(frozen=True)
class GroupMember:
    """One Linear of an input group as this worker holds it: its rows from `first_row` of the whole matrix."""

    weight: Tensor
    first_row: int = 0
    selector: MatrixSelector = prune_lowest_in_matrix  # one threshold over the whole matrix (or SparseGPT block)
    gradient_sums: Tensor | None = None  # GBLM: sum_n (s g_n)^2 (l2) or sum_n |s g_n| (l1) of these rows


def prune_group(
    members: dict[str, GroupMember], cfg: MethodConfig, stats: InputStatistics | None
) -> dict[str, PruneOutcome]:
    """Score and mask the Linears that read one input (or row shards of them) with the configured method.

    A member's `selector(scores, ratio)` makes the one-threshold-per-matrix choices (per-matrix magnitude,
    SparseGPT's unstructured blocks); on a row shard the caller passes an exact cross-worker selection."""
    if cfg.method == "sparsegpt":
        assert stats is not None
        results = sparsegpt_prune_group(
            [m.weight for m in members.values()], stats.hessian(), cfg.sparsity, parse_pattern(cfg.pattern),
            cfg.sparsegpt_blocksize, cfg.sparsegpt_damp, [m.selector for m in members.values()],
            [m.first_row for m in members.values()],
        )  # fmt: skip
        return {name: PruneOutcome(r.weight, r.mask, r.damp) for name, r in zip(members, results, strict=True)}
    return {name: prune_weight(m.weight, cfg, stats, m.gradient_sums, m.selector) for name, m in members.items()}


def prune_weight(
    W: Tensor,
    cfg: MethodConfig,
    stats: InputStatistics | None,
    gradient_sums: Tensor | None = None,
    matrix_selector: MatrixSelector = prune_lowest_in_matrix,
) -> PruneOutcome:
    """Score and mask one weight matrix (or a row shard of one) with a score-based method."""
    nm = parse_pattern(cfg.pattern)
    G = gradient_term(gradient_sums.float(), cfg.gblm_norm) if gradient_sums is not None else None
    scores = _scores(W, cfg, stats, G)
    if nm is None and cfg.method == "magnitude" and cfg.magnitude_scope == "matrix":
        mask = matrix_selector(scores, cfg.sparsity)
    else:
        mask = select_mask(scores, cfg.sparsity, nm)
    outcome = PruneOutcome(W.float().masked_fill(mask, 0.0), mask)
    if G is not None:
        outcome.gradient_score_sum = float((W.float().abs() * G).sum())
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
