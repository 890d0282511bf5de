"""Single-process reference implementations the engine is tested against (not used by the package)."""

import torch
from torch import Tensor, nn

from dist_prune.methods.gblm import accumulate_sample_gradient
from dist_prune.models import LINEARS, decoder_layers, linear_weight_name


def decoder_linear_weights(model: nn.Module) -> dict[str, nn.Parameter]:
    """Full parameter names of every decoder-layer Linear weight (lm_head excluded, as in the paper)."""
    return {
        linear_weight_name(i, name): layer.get_submodule(name).weight
        for i, layer in enumerate(decoder_layers(model))
        for name in LINEARS
    }


def gradient_pass(
    model: nn.Module, windows: Tensor, scale: float, norm: str, checkpointing: bool = False, progress=None
) -> dict[str, Tensor]:
    """sum_n (scale * g_n)^2 (l2) or sum_n |scale * g_n| (l1) per weight, fp32; windows: (N, T).

    With `checkpointing`, each decoder layer's activations are recomputed in backward instead of kept
    (transformers only checkpoints in training mode; LLaMA has no dropout, so the maths is unchanged).
    """
    targets = decoder_linear_weights(model)
    sums = {name: torch.zeros_like(p, dtype=torch.float32) for name, p in targets.items()}
    previous = {p: p.requires_grad for p in model.parameters()}
    for p in model.parameters():
        p.requires_grad_(False)
    handles = []
    for name, param in targets.items():
        param.requires_grad_(True)
        handles.append(param.register_post_accumulate_grad_hook(_accumulator(sums[name], scale, norm)))
    if checkpointing:
        model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
        model.train()
    try:
        for sequence in windows:
            tokens = sequence[None, :].to(model.device)  # batch of one: per-sample gradients
            model(input_ids=tokens, labels=tokens, use_cache=False).loss.backward()
            if progress is not None:
                progress()
    finally:
        if checkpointing:
            model.activation_checkpointing_disable()
            model.eval()
        for handle in handles:
            handle.remove()
        for p, flag in previous.items():
            p.requires_grad_(flag)
            p.grad = None
    return sums


def _accumulator(acc: Tensor, scale: float, norm: str):
    def hook(param: Tensor) -> None:
        accumulate_sample_gradient(acc, param.grad * scale, norm)
        param.grad = None  # the next sequence must start from zero, and memory is freed at once

    return hook


def plain_and_input_sums(model: nn.Module, windows: Tensor, owners: list[str]) -> tuple[dict, dict]:
    """sum_n g_n per decoder Linear weight (one backward per sequence), and sum_{n,t} x^2 of the inputs of
    the named Linears ("model.layers.1.mlp.down_proj"), keyed by their weight names."""
    targets = decoder_linear_weights(model)
    plain = {name: torch.zeros_like(p, dtype=torch.float32) for name, p in targets.items()}
    inputs = {f"{owner}.weight": torch.zeros(model.get_submodule(owner).in_features) for owner in owners}

    def hook(key: str):
        def add(_module: nn.Module, args: tuple, _output: Tensor) -> None:  # returns None: output unchanged
            inputs[key].add_(args[0].detach().square().sum(dim=(0, 1)))

        return add

    handles = [model.get_submodule(owner).register_forward_hook(hook(f"{owner}.weight")) for owner in owners]
    try:
        for sequence in windows:
            tokens = sequence[None, :]
            loss = model(input_ids=tokens, labels=tokens, use_cache=False).loss
            for name, grad in zip(targets, torch.autograd.grad(loss, list(targets.values())), strict=True):
                plain[name].add_(grad)
    finally:
        for handle in handles:
            handle.remove()
    return plain, inputs
