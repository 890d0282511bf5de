"""The pruning maths: pure functions of tensors, with no I/O and no knowledge of workers or models.

One module per method (magnitude, wanda, gblm, sparsegpt) holds its maths and its `Method`: what it needs from
the job, and `prune(members, cfg, stats, nm)` on one input group (the Linears that read one input: they share
their input statistics, and SparseGPT factorises their Hessian once). dist_prune/registry.py lists them.
"""

from .base import GroupMember, Method, PruneOutcome, StructuredDefaults, prune_by_scores
from .stats import InputStatistics

__all__ = ["GroupMember", "InputStatistics", "Method", "PruneOutcome", "StructuredDefaults", "prune_by_scores"]
