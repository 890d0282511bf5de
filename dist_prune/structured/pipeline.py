"""SAAP-style structured pruning, the job read top to bottom.

check -> calibration data -> load -> gradient pass (importances per group, per batch) -> allocation ->
physical removal -> recovery fine-tuning -> write a smaller checkpoint and the report.
"""

import platform
import resource
import time
from pathlib import Path

import torch
import transformers
from torch import Tensor, nn

from .. import __version__
from ..assets import resolve_model
from ..checkpoint import CheckpointInfo, inspect_checkpoint, load_model, load_tokenizer
from ..config import PruneConfig
from ..data import calibration_windows, evaluation_windows, load_text, tokenize
from ..errors import ConfigError
from ..launch import pick_device
from ..layerwise import decoder_layers
from ..log import get_logger
from ..memory import MemoryPlan, check_fits, plan_for
from ..metrics import perplexity
from ..progress import Progress
from ..report import write_report_markdown
from ..writer import CheckpointWriter, write_run_files
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
from .recovery import GROUP_ORDER, recover
from .scoring import ModuleScores, score_modules
from .surgery import copy_modeling_file, layer_shape, layer_sizes, output_config, prune_layer_

log = get_logger()

# Grouped-query attention: drop query heads evenly inside every KV group rather than whole KV groups. It is
# the finer choice (each group keeps its own best heads) and SmolLM2's three KV groups would otherwise move
# in thirds of the attention at a time; groups.py implements both ("kv_group" is the other).
GQA_MODE = "query_heads"


def prune_structured(config: PruneConfig, progress: Progress | None = None) -> dict:
    """Run one structured prune job in this process; returns the report also written to prune_report.json."""
    progress, started = progress or Progress("quiet"), time.perf_counter()
    info, memory_plan, layers = _check(config)
    writer = CheckpointWriter(Path(config.out), info.num_layers, config.runtime.overwrite)
    with progress.phase("tokenize"):
        tokenizer = load_tokenizer(info.path)
        windows = calibration_windows(config, tokenizer)
        eval_windows = _evaluation_windows(config, tokenizer) if config.evaluation.eval_after else None
    with writer:
        with progress.phase("load"):
            model = load_model(info, pick_device(config.runtime.device))
        shapes_before = [layer_shape(layer) for layer in decoder_layers(model)]
        params_before = parameter_counts(model)
        target = round(config.structured.ratio * params_before["decoder_layers"])
        check_capacity(plan_modules(shapes_before, layers), target)
        perplexities = {}
        _measure(perplexities, "dense", model, eval_windows, progress)
        scored, counts, keeps = _prune_model(model, windows, layers, target, config, info, progress)
        losses = []
        if config.structured.recover_steps:
            _measure(perplexities, "before_recovery", model, eval_windows, progress)
            losses = _recover(model, windows, layers, config, info, progress)
        _measure(perplexities, "pruned", model, eval_windows, progress)
        output = output_config(info.config, layer_sizes(model), shapes_before[0].head_dim)
        _write_weights(writer, model, info)
        progress.timings["total"] = round(time.perf_counter() - started, 3)
        report = build_report(config, info, model, params_before, target, shapes_before, keeps, scored, counts)
        report.update(
            perplexity=_perplexity_entry(perplexities, eval_windows, config),
            recovery=_recovery_entry(config, losses),
            checkpoint_form="bundled modeling file (trust_remote_code)" if "auto_map" in output else "stock Llama",
            calibration={"sequences": windows.shape[0], "seqlen": windows.shape[1]},
            timings_s=dict(progress.timings),
            memory_plan=memory_plan.to_dict(),
            peak_rss_mib=resource.getrusage(resource.RUSAGE_SELF).ru_maxrss // 1024,
        )
        _write_outputs(writer, config, info, report, output, windows)
    log.info("wrote %s (%s)", config.out, report["checkpoint_form"])
    return report


def _check(config: PruneConfig) -> tuple[CheckpointInfo, MemoryPlan, list[int]]:
    """Everything that can fail before a weight is read."""
    if config.runtime.workers != 1:
        raise ConfigError("saap runs in one in-process worker; use --workers 1")
    if config.runtime.threads:
        torch.set_num_threads(config.runtime.threads)
    info = inspect_checkpoint(resolve_model(config.model))
    memory_plan = plan_for(config, info.path)
    check_fits(memory_plan)
    s = config.structured
    return info, memory_plan, prunable_layers(info.num_layers, s.protect_first, s.protect_last)


def _prune_model(
    model: nn.Module,
    windows: Tensor,
    layers: list[int],
    target: int,
    config: PruneConfig,
    info: CheckpointInfo,
    progress: Progress,
) -> tuple[list[ModuleScores], list[int], dict[int, LayerKeep]]:
    """Score every group, allocate the target over the modules, slice the lowest-scored groups out."""
    s = config.structured
    with progress.phase("gradients", total=windows.shape[0]) as advance:
        scored = score_modules(model, windows, layers, s.importance, GQA_MODE, s.stability_batches, advance)
    modules = [Module(m.layer, m.kind, removal_steps(m.kind, m.shape, GQA_MODE), m.instability) for m in scored]
    counts = allocate(modules, target, adaptive=s.allocation == "adaptive")
    with progress.phase("prune"):
        keeps = remove_groups(model, scored, counts, info.source_dtype)
    return scored, counts, keeps


def _recover(
    model: nn.Module, windows: Tensor, layers: list[int], config: PruneConfig, info: CheckpointInfo, progress: Progress
) -> list[float]:
    s, batch = config.structured, config.calibration.batch_size
    with progress.phase("recovery", total=s.recover_steps) as advance:
        losses = recover(model, windows, layers, s.recover_steps, s.recover_rank, s.recover_lr, batch, advance)
    round_to_dtype_(model, info.source_dtype)
    return losses


def prunable_layers(num_layers: int, protect_first: int, protect_last: int) -> list[int]:
    layers = list(range(protect_first, num_layers - protect_last))
    if not layers:
        raise ConfigError(
            f"protect_first={protect_first} and protect_last={protect_last} protect all {num_layers} layers"
        )
    return layers


def plan_modules(shapes: list[LayerShape], layers: list[int]) -> list[Module]:
    return [Module(i, kind, removal_steps(kind, shapes[i], GQA_MODE)) for i in layers for kind in (ATTENTION, MLP)]


def remove_groups(
    model: nn.Module, scored: list[ModuleScores], counts: list[int], dtype: torch.dtype
) -> dict[int, LayerKeep]:
    """Pick the lowest-scored units of every module and slice them out of the model."""
    removed = {
        (m.layer, m.kind): removed_units(m.scores, count, m.kind, m.shape, GQA_MODE)
        for m, count in zip(scored, counts, strict=True)
    }
    keeps = {}
    for index in sorted({m.layer for m in scored}):
        layer = decoder_layers(model)[index]
        keep = layer_keep(removed[(index, ATTENTION)], removed[(index, MLP)], layer_shape(layer), GQA_MODE)
        prune_layer_(layer, keep)
        keeps[index] = keep
    # Round to the saved dtype now, so that what is evaluated and fine-tuned is exactly what is written.
    round_to_dtype_(model, dtype)
    return keeps


@torch.no_grad()
def round_to_dtype_(model: nn.Module, dtype: torch.dtype) -> None:
    for p in decoder_layers(model).parameters():
        p.copy_(p.to(dtype))


def parameter_counts(model: nn.Module) -> dict[str, int]:
    """Parameters of the whole model (tied embeddings once) and of its decoder layers (Linears and norms)."""
    return {
        "model": sum(p.numel() for p in model.parameters()),
        "decoder_layers": sum(p.numel() for p in decoder_layers(model).parameters()),
    }


def _evaluation_windows(config: PruneConfig, tokenizer) -> Tensor:
    e = config.evaluation
    return evaluation_windows(tokenize(tokenizer, load_text(e.eval_text, "evaluation")), e.eval_seqlen, e.eval_windows)


def _measure(perplexities: dict, name: str, model: nn.Module, eval_windows: Tensor | None, progress: Progress) -> None:
    if eval_windows is None:
        return
    with progress.phase(f"{name}_eval", total=eval_windows.shape[0]) as advance:
        perplexities[name] = perplexity(model, eval_windows, progress=advance)
    log.info("%s perplexity %.3f", name, perplexities[name])


def _write_weights(writer: CheckpointWriter, model: nn.Module, info: CheckpointInfo) -> None:
    dtype = info.source_dtype
    for index, layer in enumerate(decoder_layers(model)):
        writer.write_layer(index, {f"model.layers.{index}.{k}": t.to(dtype) for k, t in layer.state_dict().items()})
    rest = {k: t.to(dtype) for k, t in model.state_dict().items() if not k.startswith("model.layers.")}
    if info.tied_embeddings:
        rest.pop("lm_head.weight", None)  # transformers re-ties it to the embeddings on load
    writer.write_rest(rest)


def _write_outputs(
    writer: CheckpointWriter, config: PruneConfig, info: CheckpointInfo, report: dict, output: dict, windows: Tensor
) -> None:
    write_run_files(writer, config, report, windows)
    write_report_markdown(writer.partial, report)
    writer.copy_from_source(info.path)
    copy_modeling_file(output, writer.partial)
    writer.finish(output, info.source_dtype)


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
        "method": "saap",
        "pattern": f"structured {config.structured.ratio}",
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
        "versions": {"dist_prune": __version__, "torch": torch.__version__, "transformers": transformers.__version__},
        "machine": {"platform": platform.platform(), "threads": torch.get_num_threads()},
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


def _perplexity_entry(perplexities: dict, eval_windows: Tensor | None, config: PruneConfig) -> dict | None:
    if eval_windows is None:
        return None
    e = config.evaluation
    return dict(perplexities, text=e.eval_text, seqlen=e.eval_seqlen, windows=eval_windows.shape[0])


def _recovery_entry(config: PruneConfig, losses: list[float]) -> dict | None:
    s = config.structured
    if not s.recover_steps:
        return None
    return {
        "steps": s.recover_steps,
        "rank": s.recover_rank,
        "lr": s.recover_lr,
        "batch_size": config.calibration.batch_size,
        "groups": f"{' / '.join(GROUP_ORDER)} adapters, alternating every step",
        "losses": losses,
    }
