"""The one calibration pass structured pruning needs: per-sequence gradients and Linear input norms.

For every decoder Linear weight, in fp32: sum_n g_n (the gradient of the total calibration loss: Taylor's g)
and sum_n g_n^2 (the diagonal Fisher), where g_n is the gradient of sequence n's mean cross-entropy. Each
backward sees one sequence, so the squares are of per-sample gradients (GBLM's rule, gradients.py). Forward
hooks add sum_{n,t} x^2 of each Linear's input on the way. The sequences are split into batches; each
batch's sums are handed to a callback (per-batch importances, for the stability indicator) before they are
added to the totals, so memory holds two sets of sums at most.
"""

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from ..gradients import decoder_linear_weights
from ..layerwise import LINEAR_INPUT_OWNER, decoder_layers

INPUT_OWNERS = sorted(set(LINEAR_INPUT_OWNER.values()))


@dataclass
class CalibrationSums:
    """Raw sums keyed by full parameter name ("model.layers.3.mlp.up_proj.weight"); sequences: N."""

    grad: dict[str, Tensor]
    fisher: dict[str, Tensor]
    input_sq: dict[str, Tensor]  # keyed by the input-owning Linear's weight name, (in,)
    sequences: int

    def add_(self, other: "CalibrationSums") -> "CalibrationSums":
        for mine, theirs in ((self.grad, other.grad), (self.fisher, other.fisher), (self.input_sq, other.input_sq)):
            for name, tensor in theirs.items():
                mine[name].add_(tensor)
        self.sequences += other.sequences
        return self

    def scaler_row(self, layer: int, module: str) -> Tensor:
        """(1/N) sum_{n,t} x^2 of the input of `module` ("mlp.up_proj") in decoder layer `layer` (Wanda's)."""
        return self.input_sq[weight_name(layer, LINEAR_INPUT_OWNER[module])] / self.sequences


def weight_name(layer: int, module: str) -> str:
    return f"model.layers.{layer}.{module}.weight"


def calibration_pass(
    model: nn.Module,
    windows: Tensor,
    layers: list[int],
    num_batches: int,
    on_batch: Callable[[CalibrationSums], None],
    progress: Callable[[], None] | None = None,
) -> CalibrationSums:
    """Totals over all windows (N, T) for the Linears of `layers`; `on_batch` sees each batch's sums first."""
    totals = None
    for batch in windows.tensor_split(min(num_batches, windows.shape[0])):
        sums = batch_sums(model, batch, layers, progress)
        on_batch(sums)
        totals = sums if totals is None else totals.add_(sums)
    return totals


def batch_sums(
    model: nn.Module, windows: Tensor, layers: list[int], progress: Callable[[], None] | None = None
) -> CalibrationSums:
    # Only the layers being pruned: protected layers need no sums, and backward stops below the lowest one.
    prefixes = tuple(f"model.layers.{index}." for index in layers)
    targets = {name: p for name, p in decoder_linear_weights(model).items() if name.startswith(prefixes)}
    sums = CalibrationSums(
        grad={name: torch.zeros_like(p, dtype=torch.float32) for name, p in targets.items()},
        fisher={name: torch.zeros_like(p, dtype=torch.float32) for name, p in targets.items()},
        input_sq={},
        sequences=windows.shape[0],
    )
    previous = {p: p.requires_grad for p in model.parameters()}
    for p in model.parameters():
        p.requires_grad_(False)
    handles = [_input_hook(model, index, owner, sums.input_sq) for index in layers for owner in INPUT_OWNERS]
    for name, param in targets.items():
        param.requires_grad_(True)
        handles.append(param.register_post_accumulate_grad_hook(_accumulator(sums.grad[name], sums.fisher[name])))
    try:
        for sequence in windows:
            tokens = sequence[None, :].to(model.device)  # a batch of one: per-sample gradients
            model(input_ids=tokens, labels=tokens, use_cache=False).loss.backward()
            if progress is not None:
                progress()
    finally:
        for handle in handles:
            handle.remove()
        for p, flag in previous.items():
            p.requires_grad_(flag)
            p.grad = None
    return sums


def _input_hook(model: nn.Module, index: int, owner: str, input_sq: dict[str, Tensor]):
    linear = decoder_layers(model)[index].get_submodule(owner)
    name = weight_name(index, owner)
    input_sq[name] = torch.zeros(linear.in_features, dtype=torch.float32, device=linear.weight.device)

    def hook(_module: nn.Module, args: tuple, _output: Tensor) -> None:
        x = args[0].detach().float()  # (batch, tokens, in); detached: the sums must not join the graph
        input_sq[name].add_(x.square().sum(dim=(0, 1)))

    return linear.register_forward_hook(hook)


def _accumulator(grad_sum: Tensor, fisher: Tensor):
    def hook(param: Tensor) -> None:
        g = param.grad.float()
        grad_sum.add_(g)
        fisher.addcmul_(g, g)  # g^2 without a temporary
        param.grad = None  # the next sequence starts from zero, and the memory is freed at once

    return hook
