"""The job one worker runs, identical under every launcher (in-process, torchrun rank, Ray actor).

Each worker holds a row shard of every weight (FSDP2) and a share of the calibration sequences. Per decoder
layer: gather the layer, run the local sequences with hooks, sum the statistics across workers, score and
mask the local rows with the pure maths, gather the pruned layer to propagate and (worker 0) write it.
"""

import resource
import time
from contextlib import nullcontext
from pathlib import Path

import torch
from torch import Tensor, nn

from .assets import resolve_model
from .checkpoint import CheckpointInfo, inspect_checkpoint, load_tokenizer
from .config import PruneConfig
from .data import calibration_windows, evaluation_windows, load_text, tokenize
from .distributed import (
    GradientRequest,
    ShardSelector,
    Workers,
    all_reduce_layer_statistics,
    gather_gradient_sums,
    gather_layer_state,
    gather_non_layer_state,
    input_stem,
    linear_weight_shards,
    load_sharded_model,
    local_rows,
    local_share,
    plain_layer,
    read_gradient_rows,
    sharded_gradient_pass,
)
from .distributed.collectives import sum_across_workers
from .distributed.evaluation import evaluation_steps, sharded_perplexity
from .gradients import load_gradient_sums, save_gradient_sums
from .layerwise import LINEAR_INPUT_OWNER, LayerInputs, capture_layer_inputs, collect_input_statistics, run_layer
from .log import get_logger
from .memory import EVAL_BATCH, plan_for
from .methods import NEEDS_ACTIVATIONS, NEEDS_HESSIAN, prune_weight
from .methods.scores import gradient_term
from .progress import Progress
from .report import build_report, write_report_markdown
from .writer import CheckpointWriter, write_run_files

log = get_logger()


def prune_on_worker(config: PruneConfig, workers: Workers, progress: Progress) -> dict | None:
    """The whole prune job on this worker; worker 0 writes the output and returns the report."""
    started = time.perf_counter()
    info = inspect_checkpoint(resolve_model(config.model))
    method = config.prune.method
    with progress.phase("tokenize"):
        tokenizer = load_tokenizer(info.path)
        windows = calibration_windows(config, tokenizer) if NEEDS_ACTIVATIONS[method] else None
        eval_windows = evaluation_set(config, tokenizer) if config.evaluation.eval_after else None
    saved = _saved_gradients(config)  # checked before any weight is read; rows are read after loading
    writer = CheckpointWriter(Path(config.out), info.num_layers, config.runtime.overwrite) if workers.is_main else None
    with writer or nullcontext():
        with progress.phase("load"):
            model = load_sharded_model(info.path, workers)
        perplexities = {}
        if eval_windows is not None:
            perplexities["dense"] = measure_perplexity(model, eval_windows, workers, progress, "dense_eval")
        sums = _gradient_sums(model, windows, config, workers, progress, saved)
        with progress.phase("layers", total=info.num_layers) as advance:
            layers = prune_layers(model, windows, config, info, workers, writer, sums, progress, advance)
        rest = gather_non_layer_state(model)
        if eval_windows is not None:
            perplexities["pruned"] = measure_perplexity(model, eval_windows, workers, progress, "pruned_eval")
        memory = worker_memory(model, workers, progress)
        if writer is None:
            return None
        writer.write_rest({name: t.to(info.source_dtype) for name, t in rest.items()})
        progress.timings["total"] = round(time.perf_counter() - started, 3)
        report = build_report(config, info, layers, perplexities, eval_windows, windows, progress.timings, workers)
        report["workers"] = memory
        report["memory_plan"] = plan_for(config, info.path).to_dict()  # the prediction, beside the measurement
        write_run_files(writer, config, report, windows)
        write_report_markdown(writer.partial, report)
        writer.copy_from_source(info.path)
        writer.finish(info.config, info.source_dtype)
    log.info("wrote %s", config.out)
    return report


def gradients_on_worker(config: PruneConfig, out: Path, workers: Workers, progress: Progress) -> Path | None:
    """`dist-prune grad`: the sharded gradient pass alone; worker 0 saves the full sums."""
    info = inspect_checkpoint(resolve_model(config.model))
    windows = calibration_windows(config, load_tokenizer(info.path))
    with progress.phase("load"):
        model = load_sharded_model(info.path, workers)
    full = gather_gradient_sums(model, _gradient_pass(model, windows, config, workers, progress))
    if not workers.is_main:
        return None
    p, c = config.prune, config.calibration
    save_gradient_sums(out, full, p.gblm_scale, p.gblm_norm, c.nsamples, c.seqlen)
    return out


def _gradient_sums(model, windows, config: PruneConfig, workers: Workers, progress: Progress, saved):
    """This worker's rows of the GBLM gradient sums: from a saved file, or from a new gradient pass."""
    if saved is not None:
        return read_gradient_rows(saved, model)
    return _gradient_pass(model, windows, config, workers, progress) if config.prune.method == "gblm" else None


def _gradient_pass(model, windows, config: PruneConfig, workers: Workers, progress: Progress) -> dict[str, Tensor]:
    p = config.prune
    steps = len(local_share(windows.shape[0], 0, workers.world_size))
    request = GradientRequest(scale=p.gblm_scale, norm=p.gblm_norm)
    with progress.phase("gradients", total=steps) as advance:
        return sharded_gradient_pass(
            model, windows, workers, request, config.runtime.activation_checkpointing, advance
        ).power


def prune_layers(
    model: nn.Module,
    windows: Tensor | None,
    config: PruneConfig,
    info: CheckpointInfo,
    workers: Workers,
    writer: CheckpointWriter | None,
    sums: dict[str, Tensor] | None,
    progress: Progress,
    advance,
) -> list[dict]:
    """Stats -> score -> mask -> apply -> propagate -> write, one decoder layer at a time."""
    inputs = _layer0_inputs(model, windows, config, workers) if windows is not None else None
    layers = []
    for index in range(info.num_layers):
        start = time.perf_counter()
        stats = {}
        if inputs is not None:
            layer = plain_layer(model, index)
            stats, seconds = collect_input_statistics(layer, inputs, NEEDS_HESSIAN[config.prune.method])
            progress.add_time("calibration_forward", seconds)
            all_reduce_layer_statistics(stats)
        notes = _prune_layer_rows(model, index, stats, sums, config, info, workers)
        state = gather_layer_state(model, index)
        if inputs is not None:
            prefix = f"model.layers.{index}."
            layer.load_state_dict({name.removeprefix(prefix): t for name, t in state.items()})
            inputs = _propagate(layer, inputs, progress)
        if writer is not None:
            writer.write_layer(index, {name: t.to(info.source_dtype) for name, t in state.items()})
        layers.append(_layer_entry(index, state, notes, time.perf_counter() - start))
        advance(1)
    return layers


def _prune_layer_rows(model, index, stats, sums, config, info, workers) -> dict[str, dict]:
    """Score and mask this worker's rows of every Linear of layer `index`, in the same order everywhere."""
    shards = linear_weight_shards(model.model.layers[index])
    notes = {}
    for name in LINEAR_INPUT_OWNER:  # the selectors are collectives: a fixed order on every worker
        shard = shards[name]
        G = None
        if sums is not None:
            G = gradient_term(sums.pop(f"model.layers.{index}.{name}.weight"), config.prune.gblm_norm)
        selector = ShardSelector(shard.row_offset, shard.total_rows)
        outcome = prune_weight(shard.tensor, config.prune, stats.get(LINEAR_INPUT_OWNER[name]), G, selector)
        # Round to the saved dtype now, so the next layer calibrates on exactly the weights we write.
        shard.tensor.copy_(outcome.weight.to(info.source_dtype))
        notes[name] = {}
        if outcome.damp is not None:
            notes[name]["sparsegpt_damp"] = outcome.damp
        if outcome.score_sum is not None:
            gradient, total = sum_across_workers([outcome.gradient_score_sum, outcome.score_sum], workers.device)
            notes[name]["gradient_share"] = gradient / total
    return notes


def worker_memory(model: nn.Module, workers: Workers, progress: Progress) -> list[dict]:
    """Every worker's peak memory, its host peak after each phase so far, and the bytes of its weight shards,
    as seen by worker 0 (a collective)."""
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    if workers.device.type == "cuda":
        peak = torch.cuda.max_memory_allocated(workers.device)
    weights = sum(local_rows(p).tensor.numel() * local_rows(p).tensor.element_size() for p in model.parameters())
    phases = list(progress.host_peaks)  # every worker runs the same phases in the same order
    mine = [float(peak), float(weights), *(float(progress.host_peaks[phase]) for phase in phases)]
    width = len(mine)
    values = [0.0] * (width * workers.world_size)
    values[width * workers.rank : width * (workers.rank + 1)] = mine
    summed = sum_across_workers(values, workers.device)
    return [
        {
            "rank": rank,
            "peak_bytes": int(summed[width * rank]),
            "weight_bytes": int(summed[width * rank + 1]),
            "host_peak_after_phase": {phase: int(summed[width * rank + 2 + i]) for i, phase in enumerate(phases)},
        }
        for rank in range(workers.world_size)
    ]


def _layer0_inputs(model: nn.Module, windows: Tensor, config: PruneConfig, workers: Workers) -> LayerInputs:
    mine = local_share(windows.shape[0], workers.rank, workers.world_size)
    batches = list(windows[mine.start : mine.stop].to(workers.device).split(config.calibration.batch_size))
    return capture_layer_inputs(input_stem(model, workers.device), batches)


def _propagate(layer: nn.Module, inputs: LayerInputs, progress: Progress) -> LayerInputs:
    outputs = run_layer(layer, inputs)
    progress.add_time("calibration_forward", outputs.forward_seconds - inputs.forward_seconds)
    return outputs


def _layer_entry(index: int, state: dict[str, Tensor], notes: dict[str, dict], seconds: float) -> dict:
    modules = {}
    for name, extra in notes.items():
        weight = state[f"model.layers.{index}.{name}.weight"]
        zeros = int((weight == 0).sum())
        modules[name] = {"zeros": zeros, "numel": weight.numel(), "sparsity": zeros / weight.numel(), **extra}
    zeros = sum(m["zeros"] for m in modules.values())
    numel = sum(m["numel"] for m in modules.values())
    return {"layer": index, "sparsity": zeros / numel, "seconds": round(seconds, 3), "modules": modules}


def measure_perplexity(model: nn.Module, windows: Tensor, workers: Workers, progress: Progress, phase: str) -> float:
    with progress.phase(phase, total=evaluation_steps(windows.shape[0], workers, EVAL_BATCH)) as advance:
        value = sharded_perplexity(model, windows, workers, EVAL_BATCH, advance)
    log.info("%s perplexity %.3f", phase.removesuffix("_eval"), value)
    return value


def evaluation_set(config: PruneConfig, tokenizer) -> Tensor:
    e = config.evaluation
    return evaluation_windows(tokenize(tokenizer, load_text(e.eval_text, "evaluation")), e.eval_seqlen, e.eval_windows)


def _saved_gradients(config: PruneConfig) -> Path | None:
    """A gradients file made for this run's scale, norm and calibration size (its headers are checked)."""
    p, c = config.prune, config.calibration
    if p.method != "gblm" or not p.gradients:
        return None
    load_gradient_sums(Path(p.gradients), p.gblm_scale, p.gblm_norm, c.nsamples, c.seqlen, headers_only=True)
    return Path(p.gradients)
