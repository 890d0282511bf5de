"""From the layer-wise gradient pass to one importance vector and one instability number per prunable module.

The glue between the worker engine and the pure maths of importance.py. The calibration windows are split
into batches; each batch is one layer-wise pass (distributed/layer_gradients.py) giving, per decoder Linear,
sum_n g_n (Taylor's g: the gradient of the total loss, g_n being sequence n's mean cross-entropy), sum_n g_n^2
(the diagonal Fisher, from per-sample gradients) and the vector sum_{n,t} x^2 of its input, of which each
worker keeps the rows of its FSDP shards. Each worker scores the groups its rows touch; the partial vectors (one number
per head or channel) are summed across workers. Every worker ends with the same scores.

Fusion fits one sigma per (measure, kind) over the groups of every pruned layer together, so fused scores
keep the measures' relative weight the same in every layer.
"""

from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch import Tensor, nn

from ..adapter import LINEAR_INPUT_OWNER, decoder_layers, linear_weight_name
from ..distributed import Workers, all_reduce_in_order, local_rows
from ..distributed.layer_gradients import ActivationStore, GradientRequest, LayerSums, layerwise_gradient_pass
from .groups import ATTENTION, MLP, MODULES, LayerShape
from .importance import MEASURES, finish_measures, fuse, group_measures, instability
from .surgery import layer_shape

Key = tuple[int, str]  # (layer index, ATTENTION or MLP)
INPUT_OWNERS = tuple(sorted(set(LINEAR_INPUT_OWNER.values())))


@dataclass(frozen=True)
class ModuleScores:
    layer: int
    kind: str
    shape: LayerShape
    scores: Tensor  # (units,) the configured importance over the whole calibration set
    instability: float  # mean coefficient of variation of the units' importance across batches


@dataclass
class GradientSums:
    """This worker's rows (those of its FSDP shards) of sum_n g_n^2 (`power`) and sum_n g_n (`plain`) in fp32,
    and the whole input square sums of the owners, for the prunable layers; keyed by weight name."""

    power: dict[str, Tensor] = field(default_factory=dict)
    plain: dict[str, Tensor] = field(default_factory=dict)
    input_sq: dict[str, Tensor] = field(default_factory=dict)
    sequences: int = 0

    def add_(self, other: "GradientSums") -> "GradientSums":
        for mine, theirs in ((self.power, other.power), (self.plain, other.plain), (self.input_sq, other.input_sq)):
            for name, tensor in theirs.items():
                mine[name].add_(tensor)
        self.sequences += other.sequences
        return self


@dataclass(frozen=True)
class GradientSource:
    """Where the layer-wise pass reads the dense weights (the checkpoint), and in what it computes."""

    store: object  # distributed.residency.StreamStore
    model_config: object
    dtype: torch.dtype


def calibration_batches(windows: Tensor, num_batches: int) -> tuple[Tensor, ...]:
    return windows.tensor_split(min(num_batches, windows.shape[0]))


def gradient_steps(windows: Tensor, num_batches: int, num_layers: int) -> int:
    """Progress steps of the gradient passes: two per layer (forward, backward) for each batch."""
    return len(calibration_batches(windows, num_batches)) * 2 * num_layers


def score_modules(
    model: nn.Module,
    source: GradientSource,
    windows: Tensor,
    layers: list[int],
    importance: str,
    mode: str,
    num_batches: int,
    workers: Workers,
    progress: Callable[[], None] | None = None,
) -> list[ModuleScores]:
    """Importance of every unit of the modules of `layers`, identical on every worker (collectives)."""
    batch_scores: dict[Key, list[Tensor]] = {}
    totals = None
    for batch in calibration_batches(windows, num_batches):
        sums = batch_sums(model, source, batch, layers, workers, progress)
        for key, scores in module_importances(model, sums, layers, importance, mode).items():
            batch_scores.setdefault(key, []).append(scores)
        totals = sums if totals is None else totals.add_(sums)
    final = module_importances(model, totals, layers, importance, mode)
    return [
        ModuleScores(layer, kind, shape_of(model, layer), scores, instability(torch.stack(batch_scores[(layer, kind)])))
        for (layer, kind), scores in final.items()
    ]


def batch_sums(
    model: nn.Module,
    source: GradientSource,
    batch: Tensor,
    layers: list[int],
    workers: Workers,
    progress: Callable[[], None] | None = None,
) -> GradientSums:
    """One layer-wise pass over `batch`: this worker's rows of the prunable layers' sums (a collective)."""
    sums = GradientSums(sequences=batch.shape[0])

    def keep_my_rows(_index: int, layer: LayerSums) -> None:
        for name in layer.power:
            rows = local_rows(model.get_parameter(name))
            block = slice(rows.row_offset, rows.row_offset + rows.tensor.shape[0])
            sums.power[name] = layer.power[name][block].float()
            sums.plain[name] = layer.plain[name][block].float()
        sums.input_sq.update({name: total.float() for name, total in layer.input_sq.items()})

    request = GradientRequest(plain=True, input_owners=INPUT_OWNERS, layers=frozenset(layers))
    activations = ActivationStore(None, workers.device)
    layerwise_gradient_pass(
        source.store, source.model_config, batch, request, workers, activations, source.dtype, keep_my_rows, progress
    )
    return sums


def shape_of(model: nn.Module, index: int) -> LayerShape:
    return layer_shape(decoder_layers(model)[index])


def module_importances(
    model: nn.Module, sums: GradientSums, layers: list[int], importance: str, mode: str
) -> dict[Key, Tensor]:
    """One score vector per (layer, kind): partial measures from this worker's rows, summed across workers."""
    measures = MEASURES if importance == "fused" else (importance,)
    partial = {}
    for index in layers:
        layer = decoder_layers(model)[index]
        for kind in (ATTENTION, MLP):
            values = _partial_measures(layer, index, sums, kind, mode, measures)
            partial.update({f"{index}/{kind}/{measure}": v for measure, v in values.items()})
    all_reduce_in_order(partial)  # small vectors: one number per head or channel
    per_module = {
        (index, kind): finish_measures({m: partial[f"{index}/{kind}/{m}"] for m in measures})
        for index in layers
        for kind in (ATTENTION, MLP)
    }
    if importance != "fused":
        return {key: values[importance] for key, values in per_module.items()}
    return fuse_per_kind(per_module)


def _partial_measures(
    layer: nn.Module, index: int, sums: GradientSums, kind: str, mode: str, measures: tuple[str, ...]
) -> dict[str, Tensor]:
    modules = MODULES[kind]
    shards = {m: local_rows(layer.get_submodule(m).weight) for m in modules}
    names = {m: linear_weight_name(index, m) for m in modules}
    owners = {m: linear_weight_name(index, LINEAR_INPUT_OWNER[m]) for m in modules}
    return group_measures(
        weights={m: shards[m].tensor for m in modules},
        grad={m: sums.plain[names[m]] for m in modules},
        fisher={m: sums.power[names[m]] for m in modules},
        scaler_row={m: sums.input_sq[owners[m]] / sums.sequences for m in modules},
        kind=kind,
        shape=layer_shape(layer),
        mode=mode,
        measures=measures,
        row_starts={m: shards[m].row_offset for m in modules},
    )


def fuse_per_kind(per_module: dict[Key, dict[str, Tensor]]) -> dict[Key, Tensor]:
    """Fusion with one sigma per measure over all modules of a kind: concatenate, fuse, split back."""
    fused = {}
    for kind in (ATTENTION, MLP):
        keys = [key for key in per_module if key[1] == kind]
        sizes = [per_module[key][MEASURES[0]].numel() for key in keys]
        joined = {m: torch.cat([per_module[key][m] for key in keys]) for m in MEASURES}
        fused.update(zip(keys, fuse(joined).split(sizes), strict=True))
    return fused
