"""The prune job read top to bottom: check -> calibration data -> load -> gradients -> layer loop -> write."""

import platform
import resource
import time
from collections.abc import Callable
from pathlib import Path

import torch
import transformers
import yaml
from torch import Tensor, nn

from . import __version__
from .assets import resolve_model
from .checkpoint import CheckpointInfo, check_pattern_fits, inspect_checkpoint, load_model, load_tokenizer
from .config import PruneConfig
from .data import evaluation_windows, load_text, load_token_windows, sample_windows, tokenize
from .errors import ConfigError
from .gradients import check_gradient_sums, gradient_pass, load_gradient_sums, save_gradient_sums
from .layerwise import (
    LINEAR_INPUT_OWNER,
    LayerInputs,
    capture_layer_inputs,
    collect_input_statistics,
    decoder_layers,
    layer_linears,
    run_layer,
)
from .log import get_logger
from .memory import check_fits, plan_for
from .methods import NEEDS_ACTIVATIONS, NEEDS_HESSIAN, PruneOutcome, prune_weight
from .methods.scores import gradient_term
from .metrics import perplexity
from .progress import Progress
from .report import write_report_markdown
from .writer import CheckpointWriter

log = get_logger()


def pick_device(name: str) -> torch.device:
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name == "cuda" and not torch.cuda.is_available():
        raise ConfigError("device cuda was asked for but no CUDA device is available")
    return torch.device(name)


def prune(config: PruneConfig, progress: Progress | None = None) -> dict:
    """Run one prune job in this process; returns the report also written to prune_report.json."""
    progress = progress or Progress("quiet")
    started = time.perf_counter()
    if config.runtime.threads:
        torch.set_num_threads(config.runtime.threads)
    info = inspect_checkpoint(resolve_model(config.model))
    check_pattern_fits(info, config.nm)
    memory_plan = plan_for(config, info.path)
    check_fits(memory_plan)
    device = pick_device(config.runtime.device)
    uses_calibration = NEEDS_ACTIVATIONS[config.prune.method]
    gradient_sums = _saved_gradients(config)
    with progress.phase("tokenize"):
        tokenizer = load_tokenizer(info.path)
        windows = calibration_windows(config, tokenizer) if uses_calibration else None
        eval_windows = _evaluation_windows(config, tokenizer) if config.evaluation.eval_after else None
    with CheckpointWriter(Path(config.out), info.num_layers, config.runtime.overwrite) as writer:
        with progress.phase("load"):
            model = load_model(info, device)
        perplexities = {}
        if eval_windows is not None:
            perplexities["dense"] = _perplexity(model, eval_windows, progress, "dense_eval")
        if gradient_sums is not None:
            check_gradient_sums(gradient_sums, model)
        elif config.prune.method == "gblm":
            with progress.phase("gradients", total=windows.shape[0]) as advance:
                p = config.prune
                checkpointing = config.runtime.activation_checkpointing
                gradient_sums = gradient_pass(model, windows, p.gblm_scale, p.gblm_norm, checkpointing, advance)
        with progress.phase("layers", total=info.num_layers) as advance:
            layers = prune_layers(model, windows, config, info, writer, gradient_sums, progress, advance)
        writer.write_rest(_non_layer_tensors(model, info))
        if eval_windows is not None:
            perplexities["pruned"] = _perplexity(model, eval_windows, progress, "pruned_eval")
        progress.timings["total"] = round(time.perf_counter() - started, 3)
        report = build_report(config, info, layers, perplexities, eval_windows, windows, progress.timings)
        report["memory_plan"] = memory_plan.to_dict()
        if windows is not None:
            writer.save_tensors("calibration.safetensors", {"input_ids": windows})
        writer.write_json("prune_report.json", report)
        write_report_markdown(writer.partial, report)
        (writer.partial / "prune_config.yaml").write_text(yaml.safe_dump(config.to_dict(), sort_keys=False))
        writer.copy_from_source(info.path)
        writer.finish(info.config, info.source_dtype)
    log.info("wrote %s", config.out)
    return report


def _perplexity(model: nn.Module, windows: Tensor, progress: Progress, phase: str) -> float:
    with progress.phase(phase, total=windows.shape[0]) as advance:
        value = perplexity(model, windows, progress=advance)
    log.info("%s perplexity %.3f", phase.split("_")[0], value)
    return value


def compute_gradients(config: PruneConfig, out: Path, progress: Progress | None = None) -> Path:
    """`dist-prune grad`: the GBLM gradient pass alone, saved for later `prune --gradients FILE` runs."""
    info = inspect_checkpoint(resolve_model(config.model))
    windows = calibration_windows(config, load_tokenizer(info.path))
    if out.exists() and not config.runtime.overwrite:
        raise ConfigError(f"gradients file {out} already exists (pass --overwrite to replace it)")
    model = load_model(info, pick_device(config.runtime.device))
    progress = progress or Progress("quiet")
    with progress.phase("gradients", total=windows.shape[0]) as advance:
        p, checkpointing = config.prune, config.runtime.activation_checkpointing
        sums = gradient_pass(model, windows, p.gblm_scale, p.gblm_norm, checkpointing, advance)
    c = config.calibration
    save_gradient_sums(out, sums, config.prune.gblm_scale, config.prune.gblm_norm, c.nsamples, c.seqlen)
    return out


def calibration_windows(config: PruneConfig, tokenizer) -> Tensor:
    c = config.calibration
    if c.calib_tokens:
        return load_token_windows(c.calib_tokens, c.nsamples, c.seqlen)
    tokens = tokenize(tokenizer, load_text(c.calib_source, "calibration"))
    return sample_windows(tokens, c.nsamples, c.seqlen, c.seed)


def _evaluation_windows(config: PruneConfig, tokenizer) -> Tensor:
    e = config.evaluation
    return evaluation_windows(tokenize(tokenizer, load_text(e.eval_text, "evaluation")), e.eval_seqlen, e.eval_windows)


def _saved_gradients(config: PruneConfig) -> dict[str, Tensor] | None:
    p = config.prune
    if p.method != "gblm" or not p.gradients:
        return None
    return load_gradient_sums(Path(p.gradients), p.gblm_scale, p.gblm_norm)


def prune_layers(
    model: nn.Module,
    windows: Tensor | None,
    config: PruneConfig,
    info: CheckpointInfo,
    writer: CheckpointWriter,
    gradient_sums: dict[str, Tensor] | None,
    progress: Progress,
    advance: Callable[[int], None],
) -> list[dict]:
    """Stats -> score -> mask -> apply -> propagate -> write, one decoder layer at a time."""
    method = config.prune.method
    inputs = None
    if windows is not None:
        batches = list(windows.to(model.device).split(config.calibration.batch_size))
        inputs = capture_layer_inputs(model, batches)
    layers = []
    for index, layer in enumerate(decoder_layers(model)):
        start = time.perf_counter()
        stats = {}
        if inputs is not None:
            stats, seconds = collect_input_statistics(layer, inputs, NEEDS_HESSIAN[method])
            progress.add_time("calibration_forward", seconds)
        modules = {}
        for name, linear in layer_linears(layer):
            G = None
            if gradient_sums is not None:
                G = gradient_term(gradient_sums.pop(f"model.layers.{index}.{name}.weight"), config.prune.gblm_norm)
            outcome = prune_weight(linear.weight.data, config.prune, stats.get(LINEAR_INPUT_OWNER[name]), G)
            # Round to the saved dtype now, so the next layer calibrates on exactly the weights we write.
            linear.weight.data.copy_(outcome.weight.to(info.source_dtype))
            modules[name] = _module_entry(linear.weight.data, outcome)
        if inputs is not None:
            inputs = _propagate(layer, inputs, progress)
        writer.write_layer(index, _layer_tensors(index, layer, info.source_dtype))
        layers.append(_layer_report(index, modules, time.perf_counter() - start))
        advance(1)
    return layers


def _propagate(layer: nn.Module, inputs: LayerInputs, progress: Progress) -> LayerInputs:
    outputs = run_layer(layer, inputs)
    progress.add_time("calibration_forward", outputs.forward_seconds - inputs.forward_seconds)
    return outputs


def _module_entry(weight: Tensor, outcome: PruneOutcome) -> dict:
    zeros = int((weight == 0).sum())
    entry = {"zeros": zeros, "numel": weight.numel(), "sparsity": zeros / weight.numel()}
    if outcome.damp is not None:
        entry["sparsegpt_damp"] = outcome.damp
    if outcome.gradient_share is not None:
        entry["gradient_share"] = outcome.gradient_share
    return entry


def _layer_report(index: int, modules: dict[str, dict], seconds: float) -> dict:
    zeros = sum(m["zeros"] for m in modules.values())
    numel = sum(m["numel"] for m in modules.values())
    return {"layer": index, "sparsity": zeros / numel, "seconds": round(seconds, 3), "modules": modules}


def _layer_tensors(index: int, layer: nn.Module, dtype: torch.dtype) -> dict[str, Tensor]:
    return {f"model.layers.{index}.{name}": t.to(dtype) for name, t in layer.state_dict().items()}


def _non_layer_tensors(model: nn.Module, info: CheckpointInfo) -> dict[str, Tensor]:
    tensors = {
        name: t.to(info.source_dtype) for name, t in model.state_dict().items() if not name.startswith("model.layers.")
    }
    if info.tied_embeddings:
        tensors.pop("lm_head.weight", None)  # transformers re-ties it to the embeddings on load
    return tensors


def build_report(
    config: PruneConfig,
    info: CheckpointInfo,
    layers: list[dict],
    perplexities: dict,
    eval_windows: Tensor | None,
    windows: Tensor | None,
    timings: dict[str, float],
) -> dict:
    zeros = sum(layer["modules"][m]["zeros"] for layer in layers for m in layer["modules"])
    numel = sum(layer["modules"][m]["numel"] for layer in layers for m in layer["modules"])
    retried = [
        {"layer": layer["layer"], "module": m, "damp": entry["sparsegpt_damp"]}
        for layer in layers
        for m, entry in layer["modules"].items()
        if entry.get("sparsegpt_damp", config.prune.sparsegpt_damp) != config.prune.sparsegpt_damp
    ]
    return {
        "method": config.prune.method,
        "pattern": config.prune.pattern or f"unstructured {config.prune.sparsity}",
        "source": str(info.path),
        "config": config.to_dict(),
        "calibration": None if windows is None else {"sequences": windows.shape[0], "seqlen": windows.shape[1]},
        "total_sparsity": zeros / numel,
        "pruned_weights": zeros,
        "decoder_linear_weights": numel,
        "perplexity": _perplexity_entry(perplexities, eval_windows, config),
        "sparsegpt_damping_retries": retried,
        "gblm_gradient_share": _mean_gradient_share(layers),
        "layers": layers,
        "timings_s": dict(timings),
        "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss // 1024,
        "versions": {"dist_prune": __version__, "torch": torch.__version__, "transformers": transformers.__version__},
        "machine": {"platform": platform.platform(), "threads": torch.get_num_threads()},
    }


def _mean_gradient_share(layers: list[dict]) -> float | None:
    """GBLM: average share of the gradient term in the score; near 0 means GBLM ranks like Wanda."""
    shares = [m["gradient_share"] for layer in layers for m in layer["modules"].values() if "gradient_share" in m]
    return sum(shares) / len(shares) if shares else None


def _perplexity_entry(perplexities: dict, eval_windows: Tensor | None, config: PruneConfig) -> dict | None:
    if eval_windows is None:
        return None
    e = config.evaluation
    return dict(perplexities, text=e.eval_text, seqlen=e.eval_seqlen, windows=eval_windows.shape[0])


def evaluate_model(
    model: str, text: str, seqlen: int, windows: int | None, device: str = "auto", progress: Progress | None = None
) -> dict:
    """`dist-prune eval`: perplexity of any checkpoint on the evaluation split or a text file."""
    info = inspect_checkpoint(resolve_model(model))
    tokenizer = load_tokenizer(info.path)
    batches = evaluation_windows(tokenize(tokenizer, load_text(text, "evaluation")), seqlen, windows)
    start = time.perf_counter()
    progress = progress or Progress("quiet")
    with progress.phase("eval", total=batches.shape[0]) as advance:
        value = perplexity(load_model(info, pick_device(device)), batches, progress=advance)
    return {
        "model": str(info.path),
        "perplexity": value,
        "text": text,
        "seqlen": seqlen,
        "windows": batches.shape[0],
        "seconds": round(time.perf_counter() - start, 3),
    }
