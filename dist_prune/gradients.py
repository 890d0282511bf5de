"""GBLM's gradient pass: per-sequence gradients of the dense model, scaled, squared (or abs) and summed.

Each backward sees exactly one sequence, so the accumulator holds sum_n (s g_n)^2 and not (sum_n s g_n)^2;
a batch with a mean loss, or an all-reduce of gradients, would compute the latter.
"""

from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import Tensor, nn

from .errors import ConfigError
from .layerwise import decoder_layers, layer_linears
from .methods.scores import accumulate_sample_gradient

GRADIENT_KIND = "dist_prune/gblm-gradient-sums"


def decoder_linear_weights(model: nn.Module) -> dict[str, nn.Parameter]:
    """Full parameter names of every decoder-layer Linear weight (lm_head excluded, as in the paper)."""
    return {
        f"model.layers.{i}.{name}.weight": linear.weight
        for i, layer in enumerate(decoder_layers(model))
        for name, linear in layer_linears(layer)
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
        accumulate_sample_gradient(acc, param.grad, scale, norm)
        param.grad = None  # the next sequence must start from zero, and memory is freed at once

    return hook


def save_gradient_sums(
    path: Path, sums: dict[str, Tensor], scale: float, norm: str, nsamples: int, seqlen: int
) -> None:
    meta = {"kind": GRADIENT_KIND, "scale": repr(scale), "norm": norm, "nsamples": str(nsamples), "seqlen": str(seqlen)}
    partial = path.with_name(path.name + ".partial")
    save_file({k: v.contiguous().cpu() for k, v in sums.items()}, partial, metadata=meta)
    partial.rename(path)


def load_gradient_sums(
    path: Path, scale: float, norm: str, nsamples: int, seqlen: int, headers_only: bool = False
) -> dict[str, Tensor]:
    """A saved gradient file, refused when made with another scale, norm or calibration size than this run's
    (G is not divided by N, so the balance of GBLM's two terms depends on N and T).

    `headers_only` checks the file without reading a tensor (returns {}), for the driver's early checks.
    """
    if not path.is_file():
        raise ConfigError(f"gradients file {path} does not exist")
    with safe_open(path, framework="pt") as f:
        meta = f.metadata() or {}
        if meta.get("kind") != GRADIENT_KIND:
            raise ConfigError(f"{path} is not a gradients file written by `dist-prune grad`")
        if meta.get("norm") != norm or float(meta.get("scale", "nan")) != scale:
            raise ConfigError(
                f"{path} holds {meta.get('norm')} sums at scale {meta.get('scale')}; this run asks for {norm} at scale {scale}"
            )
        made = (meta.get("nsamples"), meta.get("seqlen"))
        if made != (str(nsamples), str(seqlen)):
            raise ConfigError(
                f"{path} was made from nsamples={made[0]} x seqlen={made[1]}; this run calibrates on "
                f"nsamples={nsamples} x seqlen={seqlen} (GBLM's gradient term grows with N: use matching sizes)"
            )
        return {} if headers_only else {name: f.get_tensor(name) for name in f.keys()}


def check_gradient_sums(sums: dict[str, Tensor], model: nn.Module) -> None:
    """Saved sums must cover exactly this model's decoder Linears, with the same shapes."""
    expected = {name: tuple(p.shape) for name, p in decoder_linear_weights(model).items()}
    found = {name: tuple(t.shape) for name, t in sums.items()}
    if found != expected:
        missing = sorted(set(expected) - set(found))[:3]
        raise ConfigError(f"saved gradients do not match this model (missing or misshapen: {missing or 'shapes'})")
