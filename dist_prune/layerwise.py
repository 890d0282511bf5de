"""Layer-sequential calibration: capture what decoder layer 0 receives, then walk the layers.

For each layer the caller runs the calibration batches once with hooks on the Linears (statistics), prunes,
then runs them again to produce the inputs of the next layer from the pruned weights.
"""

import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn

from .methods.stats import InputStatistics

# Decoder-layer Linears, and the one whose input each shares: q/k/v read the same normed hidden states,
# gate/up the same MLP input, so one accumulator serves each group.
LINEAR_INPUT_OWNER = {
    "self_attn.q_proj": "self_attn.q_proj",
    "self_attn.k_proj": "self_attn.q_proj",
    "self_attn.v_proj": "self_attn.q_proj",
    "self_attn.o_proj": "self_attn.o_proj",
    "mlp.gate_proj": "mlp.gate_proj",
    "mlp.up_proj": "mlp.gate_proj",
    "mlp.down_proj": "mlp.down_proj",
}


@dataclass
class LayerInputs:
    """Calibration batches at the input of the current layer, with the keyword arguments each needs."""

    hidden: list[Tensor]  # each (batch, tokens, hidden)
    kwargs: list[dict[str, Any]]  # attention mask, position ids, rotary position_embeddings, ...
    forward_seconds: float = field(default=0.0)

    @property
    def num_sequences(self) -> int:
        return sum(h.shape[0] for h in self.hidden)


class _Captured(Exception):
    pass


def decoder_layers(model: nn.Module) -> nn.ModuleList:
    return model.model.layers


def layer_linears(layer: nn.Module) -> Iterator[tuple[str, nn.Linear]]:
    for name in LINEAR_INPUT_OWNER:
        yield name, layer.get_submodule(name)


@torch.no_grad()
def capture_layer_inputs(model: nn.Module, batches: list[Tensor]) -> LayerInputs:
    """Run the embeddings of each token batch and stop at layer 0, keeping its exact inputs."""
    captured = LayerInputs(hidden=[], kwargs=[])

    def catch(_module: nn.Module, args: tuple, kwargs: dict) -> None:
        captured.hidden.append(args[0] if args else kwargs.pop("hidden_states"))
        captured.kwargs.append(dict(kwargs))
        raise _Captured

    handle = decoder_layers(model)[0].register_forward_pre_hook(catch, with_kwargs=True)
    try:
        for tokens in batches:
            try:
                model(input_ids=tokens, use_cache=False)
            except _Captured:
                pass
    finally:
        handle.remove()
    return captured


@torch.no_grad()
def run_layer(layer: nn.Module, inputs: LayerInputs) -> LayerInputs:
    """The layer's outputs for every batch: the next layer's inputs."""
    start = time.perf_counter()
    outputs = []
    for hidden, kwargs in zip(inputs.hidden, inputs.kwargs, strict=True):
        out = layer(hidden, **kwargs)
        outputs.append(out[0] if isinstance(out, tuple) else out)
    return LayerInputs(outputs, inputs.kwargs, inputs.forward_seconds + time.perf_counter() - start)


@torch.no_grad()
def collect_input_statistics(
    layer: nn.Module, inputs: LayerInputs, with_hessian: bool
) -> tuple[dict[str, InputStatistics], float]:
    """One forward pass over the calibration batches with hooks: statistics per input-sharing group."""
    stats: dict[str, InputStatistics] = {}
    handles = []
    for name in dict.fromkeys(LINEAR_INPUT_OWNER.values()):  # a fixed order, the same on every worker
        linear = layer.get_submodule(name)
        stats[name] = InputStatistics(linear.in_features, with_hessian, device=linear.weight.device)
        handles.append(linear.register_forward_hook(_stats_hook(stats[name])))
    start = time.perf_counter()
    try:
        for hidden, kwargs in zip(inputs.hidden, inputs.kwargs, strict=True):
            layer(hidden, **kwargs)
    finally:
        for handle in handles:
            handle.remove()
    return stats, time.perf_counter() - start


def _stats_hook(stats: InputStatistics):
    def hook(_module: nn.Module, args: tuple, _output: Tensor) -> None:
        stats.update(args[0])

    return hook
