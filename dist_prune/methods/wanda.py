"""Wanda (Sun et al. 2023): |W_ij| * ||X_j||, compared within each row. No weight update."""

from torch import Tensor

from .base import Method, prune_by_scores


def wanda_score(W: Tensor, scaler_row: Tensor) -> Tensor:
    """|W_ij| * sqrt(scaler_row_j), scaler_row[j] = (1/N) sum_{n,t} x_ntj^2; fp32 whatever W's dtype."""
    return W.float().abs() * scaler_row.float().sqrt()[None, :]


def _prune(members, cfg, stats, nm):
    scaler_row = stats.scaler_row()
    return {
        name: prune_by_scores(m, wanda_score(m.weight, scaler_row), cfg.sparsity, nm) for name, m in members.items()
    }


WANDA = Method("wanda", statistics="norms", prune=_prune, mask_pictures=True)
