"""Structured pruning (saap, flap), the worker's job read top to bottom (every launcher runs it on every worker).

load row shards -> sharded calibration pass (the gradient pass, or FLAP's forward-only statistics;
importances per group, merged as small vectors) -> allocation (the same on every worker) -> a smaller
sharded model, filled one gathered (and bias-compensated) layer at a time -> sharded recovery fine-tuning ->
worker 0 writes the layers, the config and the report.
`check_structured` is the driver's part: what can fail before a worker starts.
"""

import time
from contextlib import nullcontext
from pathlib import Path

import torch
from torch import Tensor, nn

from ..checkpoint import CheckpointInfo, open_checkpoint
from ..config import EVAL_BATCH, PruneConfig
from ..distributed import Workers, gather_layer_state, gather_non_layer_state, load_sharded_model, local_rows
from ..distributed.collectives import worker_memory
from ..distributed.evaluation import evaluation_steps, sharded_perplexity
from ..distributed.residency import StreamStore
from ..errors import ConfigError
from ..log import get_logger
from ..memory import ModelShape
from ..models import FAMILIES, decoder_layers
from ..precision import compute_dtype
from ..progress import Progress
from ..report import perplexity_entry, run_environment
from ..resolved import Resolved
from ..windows import token_windows
from ..writer import CheckpointWriter, finish_run
from .allocation import Module, allocate, check_capacity
from .groups import (
    ATTENTION,
    MLP,
    MODULES,
    LayerKeep,
    LayerShape,
    layer_keep,
    removal_steps,
    removed_units,
    weight_numel,
)
from .importance import IMPORTANCES
from .recovery import GROUP_ORDER, recover
from .scoring import (
    COLUMN_OWNER,
    CalibrationSource,
    ModuleScores,
    calibration_steps,
    comparable_scores,
    score_modules,
)
from .surgery import copy_modeling_file, kept_sizes, layer_shape, output_config, rebuild_smaller

log = get_logger()

# Grouped-query attention: drop query heads evenly inside every KV group rather than whole KV groups. It is
# the finer choice (each group keeps its own best heads) and SmolLM2's three KV groups would otherwise move
# in thirds of the attention at a time; groups.py implements both ("kv_group" is the other).
GQA_MODE = "query_heads"


def check_structured(config: PruneConfig) -> CheckpointInfo:
    """The driver's checks: protected layers, and a target the prunable modules can reach (config alone)."""
    info = open_checkpoint(config)
    if not info.family.structured:
        structured = ", ".join(sorted(f.model_type for f in FAMILIES.values() if f.structured))
        raise ConfigError(
            f"structured pruning ({config.prune.method}) writes {structured} checkpoints only; this one is "
            f"{info.family.model_type}: prune it unstructured (wanda, sparsegpt, gblm, magnitude) or N:M"
        )
    shapes = [config_layer_shape(info.config)] * info.num_layers
    s = config.structured
    layers = prunable_layers(info.num_layers, s.protect_first, s.protect_last)
    whole = ModelShape.from_config(info.config)
    check_capacity(plan_modules(shapes, layers), round(s.ratio * whole.layers * whole.layer_params))
    return info


def prune_structured_on_worker(resolved: Resolved, workers: Workers, progress: Progress) -> dict | None:
    """The whole structured job on this worker; worker 0 writes the output and returns the report."""
    started = time.perf_counter()
    config, info = resolved.config, resolved.info
    s = config.structured
    layers = prunable_layers(info.num_layers, s.protect_first, s.protect_last)
    windows, eval_windows, recovery = token_windows(config, info, progress)
    writer = None
    if workers.is_main:
        out, r = Path(config.out), config.runtime
        writer = CheckpointWriter(out, info.num_layers, {}, r.overwrite, resumable=False, overlap=r.overlap)
    with writer or nullcontext():
        with progress.phase("load"):
            model = load_sharded_model(info, workers)
        shapes_before = [layer_shape(layer) for layer in decoder_layers(model)]
        params_before = parameter_counts(model)
        target = round(s.ratio * params_before["decoder_layers"])
        perplexities = {}
        _measure(perplexities, "dense", model, eval_windows, workers, progress)
        scored, counts, keeps, weights = _choose_removals(
            model, info, windows, layers, target, config, workers, progress
        )
        sizes = kept_sizes(shapes_before, keeps)
        output = output_config(info.config, sizes, shapes_before[0].head_dim, biases=s.bias_compensation)
        means = compensation_means(scored) if s.bias_compensation else None
        with progress.phase("prune"):
            model = rebuild_smaller(model, keeps, output, info.weight_dtype, workers, means)
        losses, curve = [], []
        if s.recover_steps:
            _measure(perplexities, "before_recovery", model, eval_windows, workers, progress)
            losses, curve = _recover(model, recovery, eval_windows, layers, config, info, workers, progress)
        _measure(perplexities, "pruned", model, eval_windows, workers, progress)
        memory = worker_memory(_weight_bytes(model), workers, progress)
        _write_weights(writer, model, info)  # a collective: every worker gathers, worker 0 writes
        if writer is None:
            return None
        progress.timings["total"] = round(time.perf_counter() - started, 3)
        report = build_report(config, info, model, params_before, target, shapes_before, keeps, scored, counts)
        report["fusion_weights"] = _weights_entry(weights)
        report.update(
            perplexity=perplexity_entry(perplexities, eval_windows, config),
            recovery=_recovery_entry(config, losses, curve, perplexities),
            checkpoint_form="bundled modeling file (trust_remote_code)" if "auto_map" in output else "stock Llama",
            calibration={"sequences": windows.shape[0], "seqlen": windows.shape[1]},
            timings_s=dict(progress.timings),
            workers=memory,
            memory_plan=resolved.plan.to_dict(),
            **run_environment(workers.world_size),
        )
        _write_outputs(writer, config, info, report, output, windows)
    log.info("wrote %s (%s)", config.out, report["checkpoint_form"])
    return report


def _choose_removals(
    model: nn.Module,
    info: CheckpointInfo,
    windows: Tensor,
    layers: list[int],
    target: int,
    config: PruneConfig,
    workers: Workers,
    progress: Progress,
) -> tuple[list[ModuleScores], list[int], dict[int, LayerKeep], dict | None]:
    """Score every group, allocate the target over the modules, pick the lowest-scored groups of each."""
    s = config.structured
    store = StreamStore(info, workers.device, config.runtime.overlap)
    source = CalibrationSource(store, model.config, compute_dtype(workers.device, info.weight_dtype))
    phase = "statistics" if IMPORTANCES[s.importance].forward_only else "gradients"
    steps = calibration_steps(windows, s.stability_batches, layers, s.importance, info.num_layers)
    with progress.phase(phase, total=steps) as advance:
        try:
            scored, weights = score_modules(
                model, source, windows, layers, s.importance, GQA_MODE, s.stability_batches, workers, advance
            )
        finally:
            store.close()
    if weights is not None:
        log.info("fusion weights: %s", ", ".join(f"{kind} {m} {w:.3g}" for (kind, m), w in weights.items()))
    modules = [Module(m.layer, m.kind, removal_steps(m.kind, m.shape, GQA_MODE), m.instability) for m in scored]
    counts = allocate(modules, target, s.allocation, comparable_scores(scored, s.importance), s.ratio_spread)
    return scored, counts, kept_units(scored, counts), weights


def compensation_means(scored: list[ModuleScores]) -> dict[int, dict[str, Tensor]]:
    """Per pruned layer, the calibration mean of the input of o_proj and of down_proj (bias compensation)."""
    means: dict[int, dict[str, Tensor]] = {}
    for m in scored:
        means.setdefault(m.layer, {})[COLUMN_OWNER[m.kind]] = m.input_mean
    return means


def _recover(
    model: nn.Module,
    windows: Tensor,
    eval_windows: Tensor | None,
    layers: list[int],
    config: PruneConfig,
    info: CheckpointInfo,
    workers: Workers,
    progress: Progress,
) -> tuple[list[float], list[dict]]:
    """Recovery fine-tuning; every `recover_eval_every` steps a point of the curve: perplexity against the
    recovery tokens seen so far (with the adapters attached, before their merge and rounding)."""
    s, batch = config.structured, config.calibration.batch_size
    curve = []

    def measure(step: int) -> None:
        if eval_windows is not None and s.recover_eval_every and step % s.recover_eval_every == 0:
            value = measure_perplexity(model, eval_windows, workers, progress, f"recovery_{step}_eval")
            curve.append({"step": step, "tokens": step * batch * windows.shape[1], "perplexity": value})

    with progress.phase("recovery", total=s.recover_steps) as advance:
        losses = recover(
            model, windows, layers, s.recover_steps, s.recover_rank, s.recover_lr, batch, workers,
            config.calibration.seed, advance, measure,
        )  # fmt: skip
    round_to_dtype_(model, info.weight_dtype)
    return losses, curve


def prunable_layers(num_layers: int, protect_first: int, protect_last: int) -> list[int]:
    layers = list(range(protect_first, num_layers - protect_last))
    if not layers:
        raise ConfigError(
            f"protect_first={protect_first} and protect_last={protect_last} protect all {num_layers} layers"
        )
    return layers


def plan_modules(shapes: list[LayerShape], layers: list[int]) -> list[Module]:
    return [Module(i, kind, removal_steps(kind, shapes[i], GQA_MODE)) for i in layers for kind in (ATTENTION, MLP)]


def config_layer_shape(config: dict) -> LayerShape:
    shape = ModelShape.from_config(config)
    return LayerShape(shape.hidden, shape.heads, shape.kv_heads, shape.head_dim, shape.mlp)


def kept_units(scored: list[ModuleScores], counts: list[int]) -> dict[int, LayerKeep]:
    """What survives in every pruned layer: all but the `count` lowest-scored units of each module."""
    removed = {
        (m.layer, m.kind): removed_units(m.scores, count, m.kind, m.shape, GQA_MODE)
        for m, count in zip(scored, counts, strict=True)
    }
    shapes = {m.layer: m.shape for m in scored}
    return {
        index: layer_keep(removed[(index, ATTENTION)], removed[(index, MLP)], shapes[index], GQA_MODE)
        for index in sorted(shapes)
    }


@torch.no_grad()
def round_to_dtype_(model: nn.Module, dtype: torch.dtype) -> None:
    for p in decoder_layers(model).parameters():
        shard = local_rows(p).tensor
        shard.copy_(shard.to(dtype))


def parameter_counts(model: nn.Module) -> dict[str, int]:
    """Parameters of the whole model (tied embeddings once) and of its decoder layers (Linears and norms);
    global counts, whatever the sharding."""
    return {
        "model": sum(p.numel() for p in model.parameters()),
        "decoder_layers": sum(p.numel() for p in decoder_layers(model).parameters()),
    }


def _measure(
    perplexities: dict,
    name: str,
    model: nn.Module,
    eval_windows: Tensor | None,
    workers: Workers,
    progress: Progress,
) -> None:
    if eval_windows is not None:
        perplexities[name] = measure_perplexity(model, eval_windows, workers, progress, f"{name}_eval")


def _weight_bytes(model: nn.Module) -> int:
    """Bytes of this worker's row shards."""
    return sum(local_rows(p).tensor.numel() * local_rows(p).tensor.element_size() for p in model.parameters())


def measure_perplexity(model: nn.Module, windows: Tensor, workers: Workers, progress: Progress, phase: str) -> float:
    with progress.phase(phase, total=evaluation_steps(windows.shape[0], workers, EVAL_BATCH)) as advance:
        value = sharded_perplexity(model, windows, workers, EVAL_BATCH, advance)
    log.info("%s perplexity %.3f", phase.removesuffix("_eval"), value)
    return value


def _write_weights(writer: CheckpointWriter | None, model: nn.Module, info: CheckpointInfo) -> None:
    dtype = info.weight_dtype
    for index in range(len(decoder_layers(model))):
        state = gather_layer_state(model, index)
        if writer is not None:
            writer.write_layer(index, {name: t.to(dtype) for name, t in state.items()}, entry={})
    rest = gather_non_layer_state(model)  # a tied lm_head is left out: transformers re-ties it on load
    if writer is not None:
        writer.write_rest({name: t.to(dtype) for name, t in rest.items()})


def _write_outputs(
    writer: CheckpointWriter, config: PruneConfig, info: CheckpointInfo, report: dict, output: dict, windows: Tensor
) -> None:
    copy_modeling_file(output, writer.partial)
    finish_run(writer, config, report, windows, info.model_files, output, info.weight_dtype)


def build_report(
    config: PruneConfig,
    info: CheckpointInfo,
    model: nn.Module,
    params_before: dict[str, int],
    target: int,
    shapes_before: list[LayerShape],
    keeps: dict[int, LayerKeep],
    scored: list[ModuleScores],
    counts: list[int],
) -> dict:
    params_after = parameter_counts(model)
    removed = params_before["decoder_layers"] - params_after["decoder_layers"]
    return {
        "method": config.prune.method,
        "pattern": f"structured {config.structured.ratio}",
        "importance": config.structured.importance,
        "allocation_rule": config.structured.allocation,
        "bias_compensation": config.structured.bias_compensation,
        "ratio_spread": config.structured.ratio_spread,
        "source": str(info.path),
        "config": config.to_dict(),
        "gqa_mode": GQA_MODE,
        "parameters": {
            "model_before": params_before["model"],
            "model_after": params_after["model"],
            "decoder_layers_before": params_before["decoder_layers"],
            "decoder_layers_after": params_after["decoder_layers"],
            "target_removed": target,
            "removed": removed,
        },
        "total_sparsity": removed / params_before["decoder_layers"],
        "structure": [_structure_entry(i, shape, keeps.get(i)) for i, shape in enumerate(shapes_before)],
        "layers": [_layer_entry(i, layer, shapes_before[i]) for i, layer in enumerate(decoder_layers(model))],
        "allocation": _allocation_entries(scored, counts),
    }


def _structure_entry(index: int, shape: LayerShape, keep: LayerKeep | None) -> dict:
    return {
        "layer": index,
        "heads_kept": shape.num_heads if keep is None else len(keep.query_heads),
        "heads_total": shape.num_heads,
        "kv_heads_kept": shape.num_kv_heads if keep is None else len(keep.kv_heads),
        "kv_heads_total": shape.num_kv_heads,
        "channels_kept": shape.intermediate if keep is None else len(keep.channels),
        "channels_total": shape.intermediate,
        "protected": keep is None,
    }


def _layer_entry(index: int, layer: nn.Module, before: LayerShape) -> dict:
    """Fraction of each Linear's weights removed (the report's sparsity tables and plots)."""
    modules = {}
    for module in MODULES[ATTENTION] + MODULES[MLP]:
        numel, kept = weight_numel(module, before), layer.get_submodule(module).weight.numel()
        modules[module] = {"numel": numel, "kept": kept, "sparsity": 1 - kept / numel}
    numel = sum(m["numel"] for m in modules.values())
    kept = sum(m["kept"] for m in modules.values())
    return {"layer": index, "sparsity": 1 - kept / numel, "modules": modules}


def _allocation_entries(scored: list[ModuleScores], counts: list[int]) -> list[dict]:
    return [
        {"layer": m.layer, "kind": m.kind, "instability": m.instability, "steps_removed": count}
        for m, count in zip(scored, counts, strict=True)
    ]


def _weights_entry(weights: dict[tuple[str, str], float] | None) -> dict | None:
    """The fusion's weight of each measure per kind, normalised to sum to 1 (None unless fused)."""
    if weights is None:
        return None
    entry: dict[str, dict[str, float]] = {}
    for (kind, measure), weight in weights.items():
        entry.setdefault(kind, {})[measure] = weight
    return {kind: {m: w / sum(values.values()) for m, w in values.items()} for kind, values in entry.items()}


def _recovery_entry(config: PruneConfig, losses: list[float], curve: list[dict], perplexities: dict) -> dict | None:
    s, c = config.structured, config.calibration
    if not s.recover_steps:
        return None
    start = [{"step": 0, "tokens": 0, "perplexity": perplexities["before_recovery"]}] if curve else []
    return {
        "steps": s.recover_steps,
        "rank": s.recover_rank,
        "lr": s.recover_lr,
        "schedule": "AdamW, constant learning rate, no weight decay",
        "batch_size": c.batch_size,
        "tokens": s.recover_steps * c.batch_size * c.seqlen,
        "data": "fresh windows of the calibration split, seeded order (never the evaluation split)",
        "groups": f"{' / '.join(GROUP_ORDER)} adapters, alternating every step",
        "losses": losses,
        "curve": start + curve,  # perplexity against recovery tokens; the last point is before merging
    }
