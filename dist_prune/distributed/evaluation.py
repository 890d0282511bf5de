"""Perplexity of the row-sharded model: each worker scores its share of the windows.

An FSDP forward is a collective, so every worker runs the same number of batches; a worker whose share
is used up runs a dummy batch whose result it discards.
"""

import math

from torch import Tensor, nn
from torch.distributed.fsdp import FSDPModule

from ..metrics import next_token_nll
from .collectives import sum_across_workers
from .process_group import Workers
from .shares import local_share


def evaluation_steps(count: int, workers: Workers, batch_size: int) -> int:
    """Batches every worker runs for `count` windows: enough for the largest share."""
    return -(-len(local_share(count, 0, workers.world_size)) // batch_size)


def sharded_perplexity(model: nn.Module, windows: Tensor, workers: Workers, batch_size: int, progress=None) -> float:
    mine = local_share(windows.shape[0], workers.rank, workers.world_size)
    share = windows[mine.start : mine.stop]
    total_nll, total_tokens = 0.0, 0
    for step in range(evaluation_steps(windows.shape[0], workers, batch_size)):
        batch = share[step * batch_size : (step + 1) * batch_size]
        nll, tokens = next_token_nll(model, (batch if batch.shape[0] else windows[:1]).to(workers.device))
        if batch.shape[0]:
            total_nll, total_tokens = total_nll + nll, total_tokens + tokens
        if progress is not None:
            progress(1)
    total_nll, total_tokens = sum_across_workers([total_nll, float(total_tokens)], workers.device)
    for module in model.modules():  # FSDP leaves the root unsharded after a forward that has no backward
        if isinstance(module, FSDPModule):
            module.reshard()
    return math.exp(total_nll / total_tokens)
