"""From the calibration pass to one importance vector and one instability number per prunable module.

The glue between the model, the calibration sums and the pure maths of importance.py. Fusion fits one
sigma per (measure, kind) over the groups of every pruned layer together, so fused scores keep the
measures' relative weight the same in every layer.
"""

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from ..layerwise import decoder_layers
from .calibration import CalibrationSums, calibration_pass, weight_name
from .groups import ATTENTION, MLP, MODULES, LayerShape
from .importance import MEASURES, fuse, group_measures, instability
from .surgery import layer_shape

Key = tuple[int, str]  # (layer index, ATTENTION or MLP)


@dataclass(frozen=True)
class ModuleScores:
    layer: int
    kind: str
    shape: LayerShape
    scores: Tensor  # (units,) the configured importance over the whole calibration set
    instability: float  # mean coefficient of variation of the units' importance across batches


def score_modules(
    model: nn.Module,
    windows: Tensor,
    layers: list[int],
    importance: str,
    mode: str,
    num_batches: int,
    progress: Callable[[], None] | None = None,
) -> list[ModuleScores]:
    batch_scores: dict[Key, list[Tensor]] = {}

    def on_batch(sums: CalibrationSums) -> None:
        for key, scores in module_importances(model, sums, layers, importance, mode).items():
            batch_scores.setdefault(key, []).append(scores)

    totals = calibration_pass(model, windows, layers, num_batches, on_batch, progress)
    final = module_importances(model, totals, layers, importance, mode)
    return [
        ModuleScores(layer, kind, shape_of(model, layer), scores, instability(torch.stack(batch_scores[(layer, kind)])))
        for (layer, kind), scores in final.items()
    ]


def shape_of(model: nn.Module, index: int) -> LayerShape:
    return layer_shape(decoder_layers(model)[index])


def module_importances(
    model: nn.Module, sums: CalibrationSums, layers: list[int], importance: str, mode: str
) -> dict[Key, Tensor]:
    measures = MEASURES if importance == "fused" else (importance,)
    per_module = {}
    for index in layers:
        layer = decoder_layers(model)[index]
        shape = layer_shape(layer)
        for kind in (ATTENTION, MLP):
            modules = MODULES[kind]
            per_module[(index, kind)] = group_measures(
                weights={m: layer.get_submodule(m).weight.detach() for m in modules},
                grad={m: sums.grad[weight_name(index, m)] for m in modules},
                fisher={m: sums.fisher[weight_name(index, m)] for m in modules},
                scaler_row={m: sums.scaler_row(index, m) for m in modules},
                kind=kind,
                shape=shape,
                mode=mode,
                measures=measures,
            )
    if importance != "fused":
        return {key: values[importance] for key, values in per_module.items()}
    return fuse_per_kind(per_module)


def fuse_per_kind(per_module: dict[Key, dict[str, Tensor]]) -> dict[Key, Tensor]:
    """Fusion with one sigma per measure over all modules of a kind: concatenate, fuse, split back."""
    fused = {}
    for kind in (ATTENTION, MLP):
        keys = [key for key in per_module if key[1] == kind]
        sizes = [per_module[key][MEASURES[0]].numel() for key in keys]
        joined = {m: torch.cat([per_module[key][m] for key in keys]) for m in MEASURES}
        fused.update(zip(keys, fuse(joined).split(sizes), strict=True))
    return fused
