"""Perplexity on non-overlapping token windows."""

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn


@torch.no_grad()
def next_token_nll(model: nn.Module, batch: Tensor) -> tuple[float, int]:
    """Summed next-token negative log-likelihood of a (B, T) batch, and the number of predicted tokens."""
    logits = model(input_ids=batch, use_cache=False).logits[:, :-1].float()  # (B, T-1, vocab)
    targets = batch[:, 1:]
    nll = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1), reduction="sum")
    return nll.item(), targets.numel()


def perplexity(model: nn.Module, windows: Tensor, batch_size: int = 2, progress=None) -> float:
    """exp(mean next-token NLL over all predicted tokens); windows: (count, seqlen), equal lengths."""
    device = next(model.parameters()).device
    total_nll, total_tokens = 0.0, 0
    for batch in windows.split(batch_size):
        nll, tokens = next_token_nll(model, batch.to(device))
        total_nll, total_tokens = total_nll + nll, total_tokens + tokens
        if progress is not None:
            progress(batch.shape[0])
    return math.exp(total_nll / total_tokens)
