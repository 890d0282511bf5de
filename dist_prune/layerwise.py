"""Layer-sequential calibration: what decoder layer 0 receives, then one layer at a time.

For each layer the caller runs the calibration batches once with hooks on the Linears (statistics), prunes,
then runs them again to produce the inputs of the next layer from the pruned weights.
"""

from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from .methods.stats import InputStatistics
from .models import LINEAR_INPUT_OWNER, Shell, layer_output


@dataclass
class LayerInputs:
    """Calibration batches at the input of decoder layer `index`, with the keyword arguments each layer needs
    (per batch, per layer: Gemma 3's sliding-window layers take other masks and rotary embeddings than its
    global ones; the tensors are shared between layers)."""

    hidden: list[Tensor]  # each (batch, tokens, hidden)
    kwargs: list[list[dict[str, Any]]]  # [batch][layer]: attention mask, position ids, position_embeddings, ...
    index: int = 0

    def batches(self):
        """(hidden states, this layer's keyword arguments) of each batch."""
        return zip(self.hidden, (per_layer[self.index] for per_layer in self.kwargs), strict=True)


@torch.no_grad()
def embed_batches(shell: Shell, batches: list[Tensor]) -> LayerInputs:
    """Layer 0's inputs for each token batch, with the keyword arguments of every layer."""
    hidden, kwargs = [], []
    for tokens in batches:
        h, kw = shell.stem(tokens)
        hidden.append(h)
        kwargs.append(kw)
    return LayerInputs(hidden, kwargs)


@torch.no_grad()
def run_layer(layer: nn.Module, inputs: LayerInputs) -> LayerInputs:
    """The layer's outputs for every batch: the next layer's inputs."""
    outputs = [layer_output(layer(hidden, **kwargs)) for hidden, kwargs in inputs.batches()]
    return LayerInputs(outputs, inputs.kwargs, inputs.index + 1)


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
        for hidden, kwargs in inputs.batches():
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
