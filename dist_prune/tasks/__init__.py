"""Task data shipped with dist_prune: the offline zero-shot suite (README.md here; dist_prune/zeroshot.py)."""
