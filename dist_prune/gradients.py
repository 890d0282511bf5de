"""GBLM's gradient sums: which weights they cover, and their file format (`dist-prune grad` writes it,
`prune --gradients` reads it). The pass itself is distributed/grad_pass.py."""

from pathlib import Path

from safetensors import safe_open
from safetensors.torch import save_file
from torch import Tensor, nn

from .errors import ConfigError
from .layerwise import decoder_layers, layer_linears

GRADIENT_KIND = "dist_prune/gblm-gradient-sums"


def decoder_linear_weights(model: nn.Module) -> dict[str, nn.Parameter]:
    """Full parameter names of every decoder-layer Linear weight (lm_head excluded, as in the paper)."""
    return {
        f"model.layers.{i}.{name}.weight": linear.weight
        for i, layer in enumerate(decoder_layers(model))
        for name, linear in layer_linears(layer)
    }


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


def check_gradient_sums(shapes: dict[str, tuple[int, ...]], model: nn.Module) -> None:
    """Saved sums (name -> shape) must cover exactly this model's decoder Linears, with the same shapes."""
    expected = {name: tuple(p.shape) for name, p in decoder_linear_weights(model).items()}
    found = {name: tuple(shape) for name, shape in shapes.items()}
    if found != expected:
        missing = sorted(set(expected) - set(found))[:3]
        raise ConfigError(f"saved gradients do not match this model (missing or misshapen: {missing or 'shapes'})")
