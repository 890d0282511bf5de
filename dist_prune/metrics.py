"""Perplexity on non-overlapping token windows."""

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn


@torch.no_grad()
def perplexity(model: nn.Module, windows: Tensor, batch_size: int = 2, progress=None) -> float:
    """exp(mean next-token NLL over all predicted tokens); windows: (count, seqlen), equal lengths."""
    total_nll, total_tokens = 0.0, 0
    for start in range(0, windows.shape[0], batch_size):
        batch = windows[start : start + batch_size].to(model.device)
        logits = model(input_ids=batch, use_cache=False).logits[:, :-1].float()  # (B, T-1, vocab)
        targets = batch[:, 1:]
        total_nll += F.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1), reduction="sum").item()
        total_tokens += targets.numel()
        if progress is not None:
            progress(batch.shape[0])
    return math.exp(total_nll / total_tokens)
