"""Recovery fine-tuning after structured pruning: low-rank adapters trained by groups, then merged away.

Every Linear of every pruned layer gets an adapter W x + s * B A x (A: (rank, in), B: (out, rank), B = 0 at the
start so training begins at the pruned model; s = alpha / rank with alpha = 2 * rank, LLM-Pruner's r=8,
alpha=16). "Group fine-tuning": the adapters form two groups, attention (q/k/v/o) and MLP (gate/up/down), and
the steps alternate between them, so each backward computes weight gradients for one group only. Adapters
are merged into the weights (W += s * B A) when training ends: the saved model is a plain Linear stack.
The adapter is these few lines rather than peft: no new dependency, and alternating groups needs nothing more.
"""

import math
from collections.abc import Callable
from itertools import cycle

import torch
from torch import Tensor, nn

from ..layerwise import decoder_layers
from ..log import get_logger
from .groups import ATTENTION, MLP, MODULES

log = get_logger()
GROUP_ORDER = (ATTENTION, MLP)


class LowRankAdapter(nn.Module):
    def __init__(self, base: nn.Linear, rank: int):
        super().__init__()
        self.base = base
        self.scale = 2.0  # alpha / rank with alpha = 2 * rank
        self.A = nn.Parameter(torch.empty(rank, base.in_features, device=base.weight.device))
        self.B = nn.Parameter(torch.zeros(base.out_features, rank, device=base.weight.device))
        nn.init.kaiming_uniform_(self.A, a=math.sqrt(5))  # nn.Linear's own initialisation, as in LoRA

    def forward(self, x: Tensor) -> Tensor:
        return self.base(x) + self.scale * (x @ self.A.T) @ self.B.T

    @torch.no_grad()
    def merged(self) -> nn.Linear:
        self.base.weight += (self.scale * self.B @ self.A).to(self.base.weight.dtype)
        return self.base


def recover(
    model: nn.Module,
    windows: Tensor,
    layers: list[int],
    steps: int,
    rank: int,
    lr: float,
    batch_size: int,
    progress: Callable[[], None] | None = None,
) -> list[float]:
    """Train adapters on the calibration windows for `steps` steps, alternating groups; merge. Returns losses."""
    adapters = _attach(model, layers, rank)
    frozen = {p: p.requires_grad for p in model.parameters()}
    for p in frozen:
        p.requires_grad_(False)
    trained = [p for group in adapters.values() for adapter in group for p in (adapter.A, adapter.B)]
    optimizer = torch.optim.AdamW(trained, lr=lr, weight_decay=0.0)
    batches = cycle(windows.split(batch_size))
    losses = []
    try:
        for step in range(steps):
            active = GROUP_ORDER[step % len(GROUP_ORDER)]
            for kind, group in adapters.items():
                for adapter in group:
                    adapter.A.requires_grad_(kind == active)
                    adapter.B.requires_grad_(kind == active)
            tokens = next(batches).to(model.device)
            loss = model(input_ids=tokens, labels=tokens, use_cache=False).loss
            loss.backward()
            optimizer.step()  # parameters without a gradient (the resting group) are skipped
            optimizer.zero_grad(set_to_none=True)
            losses.append(loss.item())
            log.debug("recovery step %d/%d (%s): loss %.4f", step + 1, steps, active, losses[-1])
            if progress is not None:
                progress()
    finally:
        _merge(model, layers)
        for p, flag in frozen.items():
            p.requires_grad_(flag)
    return losses


def _attach(model: nn.Module, layers: list[int], rank: int) -> dict[str, list[LowRankAdapter]]:
    adapters: dict[str, list[LowRankAdapter]] = {kind: [] for kind in GROUP_ORDER}
    for index in layers:
        layer = decoder_layers(model)[index]
        for kind in GROUP_ORDER:
            for module in MODULES[kind]:
                parent_name, _, child = module.rpartition(".")
                parent = layer.get_submodule(parent_name)
                adapter = LowRankAdapter(getattr(parent, child), rank)
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
