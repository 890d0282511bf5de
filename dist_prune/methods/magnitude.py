"""Magnitude pruning: |W|, one threshold per whole matrix (as in the papers) or per row."""

from torch import Tensor

from .base import Method, prune_by_scores


def magnitude_score(W: Tensor) -> Tensor:
    return W.float().abs()


def _prune(members, cfg, stats, nm):
    scope = "matrix" if cfg.magnitude_scope == "matrix" else "row"
    return {name: prune_by_scores(m, magnitude_score(m.weight), cfg.sparsity, nm, scope) for name, m in members.items()}


MAGNITUDE = Method("magnitude", prune=_prune)
