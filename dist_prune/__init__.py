"""dist_prune: sharded pruning of LLaMA-family checkpoints (GBLM-Pruner, Wanda, SparseGPT, magnitude)."""

__version__ = "0.1.0"
