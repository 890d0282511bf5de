"""Layer-sequential calibration: what decoder layer 0 receives, then one layer at a time.

For each layer the caller runs the calibration batches once with hooks on the Linears (statistics), prunes,
then runs them again to produce the inputs of the next layer from the pruned weights.
"""

from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from .adapter import LINEAR_INPUT_OWNER, Stem
from .methods.stats import InputStatistics


@dataclass
class LayerInputs:
    """Calibration batches at the input of the current layer, with the keyword arguments each needs."""

    hidden: list[Tensor]  # each (batch, tokens, hidden)
    kwargs: list[dict[str, Any]]  # attention mask, position ids, rotary position_embeddings, ...


@torch.no_grad()
def embed_batches(stem: Stem, batches: list[Tensor]) -> LayerInputs:
    """Layer 0's inputs for each token batch, with the keyword arguments each needs."""
    hidden, kwargs = [], []
    for tokens in batches:
        h, kw = stem(tokens)
        hidden.append(h)
        kwargs.append(kw)
    return LayerInputs(hidden, kwargs)


@torch.no_grad()
def run_layer(layer: nn.Module, inputs: LayerInputs) -> LayerInputs:
    """The layer's outputs for every batch: the next layer's inputs."""
    outputs = []
    for hidden, kwargs in zip(inputs.hidden, inputs.kwargs, strict=True):
        out = layer(hidden, **kwargs)
        outputs.append(out[0] if isinstance(out, tuple) else out)
    return LayerInputs(outputs, inputs.kwargs)


Timer = Any  # a callable giving a context manager per phase name (progress.PhaseClock)


@torch.no_grad()
def collect_input_statistics(
    layer: nn.Module, inputs: LayerInputs, with_hessian: bool, timer: Timer | None = None
) -> dict[str, InputStatistics]:
    """One forward pass over the calibration batches with hooks: statistics per input-sharing group. With a
    `timer`, the hooks' work is timed as the phase "statistics"."""
    stats: dict[str, InputStatistics] = {}
    handles = []
    for name in dict.fromkeys(LINEAR_INPUT_OWNER.values()):  # a fixed order, the same on every worker
        linear = layer.get_submodule(name)
        stats[name] = InputStatistics(linear.in_features, with_hessian, device=linear.weight.device)
        handles.append(linear.register_forward_hook(_stats_hook(stats[name], timer)))
    try:
        for hidden, kwargs in zip(inputs.hidden, inputs.kwargs, strict=True):
            layer(hidden, **kwargs)
    finally:
        for handle in handles:
            handle.remove()
    return stats


def _stats_hook(stats: InputStatistics, timer: Timer | None):
    def hook(_module: nn.Module, args: tuple, _output: Tensor) -> None:
        with _phase(timer, "statistics"):
            stats.update(args[0])

    return hook


def _phase(timer: Timer | None, name: str) -> AbstractContextManager:
    return timer(name) if timer is not None else nullcontext()
