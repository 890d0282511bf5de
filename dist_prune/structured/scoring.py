"""From the calibration passes to one importance vector, one instability number and one input mean per
prunable module.

The glue between the worker engine and the pure maths of importance.py. The importance decides the pass
(distributed/layer_gradients.py):
- the gradient measures (fused, element, vector, activation): the calibration windows are split into
  batches, each batch one layer-wise gradient pass giving, per decoder Linear, sum_n g_n (Taylor's g: the
  gradient of the total loss, g_n being sequence n's mean cross-entropy), sum_n g_n^2 (the diagonal Fisher,
  from per-sample gradients), of which each worker keeps the rows of its FSDP shards, and the sums of x and x^2
  of each Linear's input;
- fluctuation (FLAP): one forward-only pass of the dense model giving the sums of x and x^2 of the o_proj and
  down_proj inputs (their channel means and variances).
Each worker scores the groups its rows touch; the partial vectors (one number per head or channel, or per
input channel for fluctuation) are summed across workers. Every worker ends with the same scores.

Fusion divides each measure by its mean over the groups of every pruned layer of a kind together and weighs it
by the inverse square of its instability across the calibration batches (docs/structured.md: why), one
weight per (measure, kind), so fused scores keep the measures' relative weight the same in every layer.
"""

from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch import Tensor, nn

from ..distributed import Workers, all_reduce_in_order, local_rows
from ..distributed.layer_gradients import (
    ActivationStore,
    GradientRequest,
    LayerSums,
    layerwise_gradient_pass,
    layerwise_input_moments,
)
from ..models import LINEAR_INPUT_OWNER, decoder_layers, linear_weight_name
from .groups import ATTENTION, MLP, MODULES, LayerShape
from .importance import (
    IMPORTANCES,
    MEASURES,
    channel_variance,
    finish_measures,
    fluctuation_channels,
    fluctuation_scores,
    fuse,
    group_measures,
    instability,
    standardize,
)
from .surgery import layer_shape

Key = tuple[int, str]  # (layer index, ATTENTION or MLP)
INPUT_OWNERS = tuple(sorted(set(LINEAR_INPUT_OWNER.values())))
# The Linear whose input channels are the units of each kind: its input mean is what bias compensation needs.
COLUMN_OWNER = {ATTENTION: "self_attn.o_proj", MLP: "mlp.down_proj"}


@dataclass(frozen=True)
class ModuleScores:
    layer: int
    kind: str
    shape: LayerShape
    scores: Tensor  # (units,) the configured importance over the whole calibration set
    instability: float  # mean coefficient of variation of the units' importance across batches
    input_mean: Tensor  # mean over the calibration tokens of each input channel of COLUMN_OWNER[kind]


@dataclass
class CalibrationSums:
    """This worker's rows (those of its FSDP shards) of sum_n g_n^2 (`power`) and sum_n g_n (`plain`) in fp32,
    and the whole fp64 sums of x^2 and x of the owners' inputs, for the prunable layers; keyed by weight name."""

    power: dict[str, Tensor] = field(default_factory=dict)
    plain: dict[str, Tensor] = field(default_factory=dict)
    input_sq: dict[str, Tensor] = field(default_factory=dict)
    input_sum: dict[str, Tensor] = field(default_factory=dict)
    sequences: int = 0
    tokens: int = 0

    def add_(self, other: "CalibrationSums") -> "CalibrationSums":
        for mine, theirs in zip(self._sums(), other._sums(), strict=True):
            for name, tensor in theirs.items():
                mine[name].add_(tensor)
        self.sequences += other.sequences
        self.tokens += other.tokens
        return self

    def _sums(self) -> tuple[dict[str, Tensor], ...]:
        return self.power, self.plain, self.input_sq, self.input_sum

    def input_mean(self, name: str) -> Tensor:
        return (self.input_sum[name] / self.tokens).float()


@dataclass(frozen=True)
class CalibrationSource:
    """Where the layer-wise passes read the dense weights (the checkpoint), and in what they compute."""

    store: object  # distributed.residency.StreamStore
    model_config: object
    dtype: torch.dtype


def calibration_batches(windows: Tensor, num_batches: int, importance: str) -> tuple[Tensor, ...]:
    """Stability batches for the gradient measures; one batch for a forward-only importance (its adaptive
    allocation is refused by the config: standardised scores have no meaningful coefficient of variation)."""
    return windows.tensor_split(1 if IMPORTANCES[importance].forward_only else min(num_batches, windows.shape[0]))


def calibration_steps(windows: Tensor, num_batches: int, layers: list[int], importance: str, num_layers: int) -> int:
    """Progress steps: per batch, two per layer (forward, backward) for a gradient pass, one per layer up to
    the highest prunable one for a forward-only pass."""
    per_pass = max(layers) + 1 if IMPORTANCES[importance].forward_only else 2 * num_layers
    return len(calibration_batches(windows, num_batches, importance)) * per_pass


def score_modules(
    model: nn.Module,
    source: CalibrationSource,
    windows: Tensor,
    layers: list[int],
    importance: str,
    mode: str,
    num_batches: int,
    workers: Workers,
    progress: Callable[[], None] | None = None,
) -> tuple[list[ModuleScores], dict[tuple[str, str], float] | None]:
    """Importance of every unit of the modules of `layers`, identical on every worker (collectives), and the
    fusion's weight of each (kind, measure) (None unless fused)."""
    per_batch: list[dict[Key, dict[str, Tensor]]] = []
    totals = None
    for batch in calibration_batches(windows, num_batches, importance):
        sums = batch_sums(model, source, batch, layers, importance, workers, progress)
        per_batch.append(module_measures(model, sums, layers, importance, mode))
        totals = sums if totals is None else totals.add_(sums)
        del sums  # else this batch's sums (two fp32 sets of the pruned weights) live through the next pass
    weights = measure_weights(per_batch) if IMPORTANCES[importance].fused else None
    final = combine(module_measures(model, totals, layers, importance, mode), importance, weights)
    batch_scores = [combine(measures, importance, weights) for measures in per_batch]
    scored = [
        ModuleScores(
            layer,
            kind,
            shape_of(model, layer),
            scores.cpu(),  # one number per head or channel: allocation and selection run on the host
            instability(torch.stack([batch[(layer, kind)] for batch in batch_scores])),
            totals.input_mean(linear_weight_name(layer, COLUMN_OWNER[kind])),
        )  # fmt: skip
        for (layer, kind), scores in final.items()
    ]
    return scored, weights


def comparable_scores(scored: list[ModuleScores], importance: str) -> list[Tensor]:
    """Each module's scores on one scale across layers and kinds, for the global cut: (x - mean) / std over
    the module's units. FLAP's fluctuation scores are standardised by their own definition already
    (importance.fluctuation_scores: attention per channel, before the head average), so they stay as they are."""
    return [m.scores if IMPORTANCES[importance].forward_only else standardize(m.scores) for m in scored]


def measure_weights(per_batch: list[dict[Key, dict[str, Tensor]]]) -> dict[tuple[str, str], float]:
    """Each measure's weight in the fusion, per kind: the inverse square of its instability across calibration
    batches (mean over the kind's modules of the units' coefficient of variation), so a measure that the
    batches disagree on counts less. All ones with a single batch, or when a measure does not vary at all
    (its weight would be infinite)."""
    cv = {}
    for kind in (ATTENTION, MLP):
        keys = [key for key in per_batch[0] if key[1] == kind]
        for m in MEASURES:
            values = [instability(torch.stack([batch[key][m] for batch in per_batch])) for key in keys]
            cv[(kind, m)] = sum(values) / len(values)
    if len(per_batch) < 2 or min(cv.values()) <= 0:
        return dict.fromkeys(cv, 1.0)
    return {key: 1.0 / value**2 for key, value in cv.items()}


def combine(
    measures: dict[Key, dict[str, Tensor]], importance: str, weights: dict[tuple[str, str], float] | None
) -> dict[Key, Tensor]:
    """One score vector per module: the configured measure, or the fusion of all three."""
    if not IMPORTANCES[importance].fused:
        return {key: values[importance] for key, values in measures.items()}
    return fuse_per_kind(measures, weights)


def batch_sums(
    model: nn.Module,
    source: CalibrationSource,
    batch: Tensor,
    layers: list[int],
    importance: str,
    workers: Workers,
    progress: Callable[[], None] | None = None,
) -> CalibrationSums:
    """One layer-wise pass over `batch`: this worker's rows of the prunable layers' sums (a collective)."""
    sums = CalibrationSums(sequences=batch.shape[0], tokens=batch.numel())

    def keep_my_rows(_index: int, layer: LayerSums) -> None:
        for name in layer.power:
            rows = local_rows(model.get_parameter(name))
            block = slice(rows.row_offset, rows.row_offset + rows.tensor.shape[0])
            sums.power[name] = layer.power[name][block].float()
            sums.plain[name] = layer.plain[name][block].float()
        sums.input_sq.update(layer.input_sq)
        sums.input_sum.update(layer.input_sum)

    if IMPORTANCES[importance].forward_only:
        layerwise_input_moments(
            source.store, source.model_config, batch, tuple(COLUMN_OWNER.values()), frozenset(layers), workers,
            source.dtype, keep_my_rows, progress,
        )  # fmt: skip
        return sums
    request = GradientRequest(plain=True, input_owners=INPUT_OWNERS, layers=frozenset(layers))
    activations = ActivationStore(None, workers.device)
    layerwise_gradient_pass(
        source.store, source.model_config, batch, request, workers, activations, source.dtype, keep_my_rows, progress
    )
    return sums


def shape_of(model: nn.Module, index: int) -> LayerShape:
    return layer_shape(decoder_layers(model)[index])


def module_measures(
    model: nn.Module, sums: CalibrationSums, layers: list[int], importance: str, mode: str
) -> dict[Key, dict[str, Tensor]]:
    """Per (layer, kind), each measure the importance needs, one score per unit: partial measures from this
    worker's rows, summed across workers (fluctuation: per input channel, then standardised into units)."""
    measures = IMPORTANCES[importance].measures
    partial = {}
    for index in layers:
        layer = decoder_layers(model)[index]
        for kind in (ATTENTION, MLP):
            values = _partial_measures(layer, index, sums, kind, mode, measures)
            partial.update({f"{index}/{kind}/{measure}": v for measure, v in values.items()})
    all_reduce_in_order(partial)  # small vectors: one number per head or channel
    whole = {
        (index, kind): {m: partial[f"{index}/{kind}/{m}"] for m in measures}
        for index in layers
        for kind in (ATTENTION, MLP)
    }
    if IMPORTANCES[importance].forward_only:
        return {
            (index, kind): {importance: fluctuation_scores(values[importance], kind, shape_of(model, index), mode)}
            for (index, kind), values in whole.items()
        }
    return {key: finish_measures(values) for key, values in whole.items()}


def _partial_measures(
    layer: nn.Module, index: int, sums: CalibrationSums, kind: str, mode: str, measures: tuple[str, ...]
) -> dict[str, Tensor]:
    if "fluctuation" in measures:  # per input channel of o_proj / down_proj, from this worker's rows
        name = linear_weight_name(index, COLUMN_OWNER[kind])
        variance = channel_variance(sums.input_sum[name], sums.input_sq[name], sums.tokens)
        return {"fluctuation": fluctuation_channels(local_rows(layer.get_submodule(COLUMN_OWNER[kind]).weight).tensor, variance)}  # fmt: skip
    modules = MODULES[kind]
    shards = {m: local_rows(layer.get_submodule(m).weight) for m in modules}
    names = {m: linear_weight_name(index, m) for m in modules}
    owners = {m: linear_weight_name(index, LINEAR_INPUT_OWNER[m]) for m in modules}
    return group_measures(
        weights={m: shards[m].tensor for m in modules},
        grad={m: sums.plain[names[m]] for m in modules},
        fisher={m: sums.power[names[m]] for m in modules},
        scaler_row={m: (sums.input_sq[owners[m]] / sums.sequences).float() for m in modules},
        kind=kind,
        shape=layer_shape(layer),
        mode=mode,
        measures=measures,
        row_starts={m: shards[m].row_offset for m in modules},
    )


def fuse_per_kind(
    per_module: dict[Key, dict[str, Tensor]], weights: dict[tuple[str, str], float] | None = None
) -> dict[Key, Tensor]:
    """Fusion with one mean per measure over all modules of a kind: concatenate, fuse, split back."""
    fused = {}
    for kind in (ATTENTION, MLP):
        keys = [key for key in per_module if key[1] == kind]
        sizes = [per_module[key][MEASURES[0]].numel() for key in keys]
        joined = {m: torch.cat([per_module[key][m] for key in keys]) for m in MEASURES}
        kind_weights = None if weights is None else {m: weights[(kind, m)] for m in MEASURES}
        fused.update(zip(keys, fuse(joined, kind_weights).split(sizes), strict=True))
    return fused
