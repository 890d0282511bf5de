"""Recovery fine-tuning after structured pruning: low-rank adapters trained by groups, then merged away.

Every Linear of every pruned layer gets an adapter W x + s * B A x (A: (rank, in), B: (out, rank), B = 0 at the
start so training begins at the pruned model; s = alpha / rank with alpha = 2 * rank, LLM-Pruner's r=8,
alpha=16). "Group fine-tuning": the adapters form two groups, attention (q/k/v/o) and MLP (gate/up/down), and
the steps alternate between them, so each backward computes weight gradients for one group only. Adapters
are merged into the weights (W += s * B A) when training ends: the saved model is a plain Linear stack.
The adapter is these few lines rather than peft: no new dependency, and alternating groups needs nothing more.

Sharded (data parallel): the base weights stay FSDP row shards, frozen; the adapters are small and every
worker holds all of them. Each step's batch is split across workers; a worker's loss is weighted by its share
of the batch and the adapters' gradients are summed across workers, which gives every worker the gradient of
the whole batch's mean loss, so their optimizers stay identical. Merging adds each worker's rows of s * B A.
"""

import math
from collections.abc import Callable

import torch
from torch import Tensor, nn

from ..distributed import Workers, all_reduce_in_order, local_rows, local_share
from ..distributed.collectives import sum_across_workers
from ..log import get_logger
from ..models import decoder_layers
from .groups import ATTENTION, MLP, MODULES

log = get_logger()
GROUP_ORDER = (ATTENTION, MLP)


class LowRankAdapter(nn.Module):
    def __init__(self, base: nn.Linear, rank: int, generator: torch.Generator | None = None):
        super().__init__()
        self.base = base
        self.scale = 2.0  # alpha / rank with alpha = 2 * rank
        # Drawn on the CPU from the given generator: every worker must start from the same adapters.
        A = torch.empty(rank, base.in_features)
        nn.init.kaiming_uniform_(A, a=math.sqrt(5), generator=generator)  # nn.Linear's own, as in LoRA
        self.A = nn.Parameter(A.to(base.weight.device))
        self.B = nn.Parameter(torch.zeros(base.out_features, rank, device=base.weight.device))

    def forward(self, x: Tensor) -> Tensor:
        return self.base(x) + self.scale * (x @ self.A.T) @ self.B.T

    @torch.no_grad()
    def merged(self) -> nn.Linear:
        """The base Linear with s * B A added to its rows (to this worker's rows of a sharded weight)."""
        shard = local_rows(self.base.weight)
        rows = slice(shard.row_offset, shard.row_offset + shard.tensor.shape[0])
        shard.tensor.add_((self.scale * self.B[rows] @ self.A).to(shard.tensor.dtype))
        return self.base


def recover(
    model: nn.Module,
    windows: Tensor,
    layers: list[int],
    steps: int,
    rank: int,
    lr: float,
    batch_size: int,
    workers: Workers,
    seed: int = 0,
    progress: Callable[[], None] | None = None,
    after_step: Callable[[int], None] | None = None,
) -> list[float]:
    """Train adapters for `steps` steps on consecutive batches of `windows` (at least steps x batch_size of
    them), alternating groups; merge. Returns losses (each the whole batch's mean cross-entropy, the same on
    every worker). `after_step(k)` runs on every worker after step k (1-based), adapters attached: the
    recovery curve's perplexity measurements, collectives included."""
    if windows.shape[0] < steps * batch_size:
        raise ValueError(
            f"{steps} recovery steps of {batch_size} need {steps * batch_size} windows, got {windows.shape[0]}"
        )
    adapters = _attach(model, layers, rank, torch.Generator().manual_seed(seed))
    frozen = {p: p.requires_grad for p in model.parameters()}
    for p in frozen:
        p.requires_grad_(False)
    optimizer = torch.optim.AdamW(
        [p for group in adapters.values() for adapter in group for p in (adapter.A, adapter.B)], lr=lr, weight_decay=0.0
    )
    losses = []
    try:
        for step, batch in zip(range(steps), windows.split(batch_size), strict=False):
            active = GROUP_ORDER[step % len(GROUP_ORDER)]
            trained = _train_only(adapters, active)
            losses.append(_step(model, batch, trained, workers))
            optimizer.step()  # parameters without a gradient (the resting group) are skipped
            optimizer.zero_grad(set_to_none=True)
            log.debug("recovery step %d/%d (%s): loss %.4f", step + 1, steps, active, losses[-1])
            if progress is not None:
                progress()
            if after_step is not None:
                after_step(step + 1)
    finally:
        _merge(model, layers)
        for p, flag in frozen.items():
            p.requires_grad_(flag)
    return losses


def _train_only(adapters: dict[str, list[LowRankAdapter]], active: str) -> dict[str, Tensor]:
    trained = {}
    for kind, group in adapters.items():
        for number, adapter in enumerate(group):
            for name, param in (("A", adapter.A), ("B", adapter.B)):
                param.requires_grad_(kind == active)
                if kind == active:
                    trained[f"{kind}/{number:06d}/{name}"] = param
    return trained


def _step(model: nn.Module, batch: Tensor, trained: dict[str, Tensor], workers: Workers) -> float:
    """Forward and backward of this worker's part of `batch`; afterwards every trained adapter holds the
    gradient of the whole batch's mean loss. A worker with no sequence in this batch still joins FSDP's
    collectives, with a zero-weighted one."""
    mine = local_share(batch.shape[0], workers.rank, workers.world_size)
    weight = len(mine) / batch.shape[0]
    tokens = (batch[mine.start : mine.stop] if len(mine) else batch[:1]).to(workers.device)
    loss = model(input_ids=tokens, labels=tokens, use_cache=False).loss * weight
    loss.backward()
    all_reduce_in_order({name: p.grad for name, p in trained.items()})
    return sum_across_workers([loss.item()], workers.device)[0]


def _attach(
    model: nn.Module, layers: list[int], rank: int, generator: torch.Generator
) -> dict[str, list[LowRankAdapter]]:
    adapters: dict[str, list[LowRankAdapter]] = {kind: [] for kind in GROUP_ORDER}
    for index in layers:
        layer = decoder_layers(model)[index]
        for kind in GROUP_ORDER:
            for module in MODULES[kind]:
                parent_name, _, child = module.rpartition(".")
                parent = layer.get_submodule(parent_name)
                adapter = LowRankAdapter(getattr(parent, child), rank, generator)
                setattr(parent, child, adapter)
                adapters[kind].append(adapter)
    return adapters


def _merge(model: nn.Module, layers: list[int]) -> None:
    for index in layers:
        layer = decoder_layers(model)[index]
        for module in MODULES[ATTENTION] + MODULES[MLP]:
            parent_name, _, child = module.rpartition(".")
            parent = layer.get_submodule(parent_name)
            setattr(parent, child, getattr(parent, child).merged())
