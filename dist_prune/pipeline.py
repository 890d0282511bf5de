"""The driver: check everything that can be checked cheaply, then hand the job to the launcher.

The checks run before any worker starts or any weight is read, so bad input costs a second and leaves
nothing behind.
"""

import json
import math
import time
from contextlib import nullcontext
from pathlib import Path

from .assets import resolve_model
from .checkpoint import (
    CheckpointInfo,
    check_pattern_fits,
    inspect_checkpoint,
    load_model,
    load_tokenizer,
    open_checkpoint,
)
from .config import PruneConfig
from .data import check_token_ids, evaluation_windows, load_text, load_token_windows, tokenize
from .errors import ConfigError
from .gradients import FP32_BYTES, check_gradient_file_shapes, gradient_shapes, is_gradients_file, load_gradient_sums
from .job import run_settings, scratch_root
from .launch import launch, torchrun_world, writes_output
from .memory import MemoryPlan, check_fits, plan_for, resolve_runtime
from .metrics import perplexity
from .progress import Progress
from .registry import method
from .report import ZERO_SHOT_PLOT, write_report_markdown
from .resolved import Resolved
from .safe_io import check_room, check_writable, is_regular, locked_dir, write_text
from .writer import check_gradients_output, check_output, check_partial, list_added_files, partial_dir


def prune(config: PruneConfig, progress: Progress | None = None) -> dict | None:
    """Prune with the configured launcher; returns the report (None on torchrun ranks other than 0)."""
    info = checked_source(config)
    out = Path(config.out)
    check_output(out, info.path, config.runtime.overwrite)
    if config.evaluation.eval_tasks:
        from .zeroshot import check_tasks, expand

        check_tasks(expand(config.evaluation.eval_tasks.split(",")))
    with _output_lock(config):
        check_partial(out, config.runtime.resume, run_settings(config, info), info.num_layers)
        if method(config.prune.method).gradients and config.prune.gradients:
            _check_gradients_file(config, info)
        if config.calibration.calib_tokens:
            _check_calibration_tokens(config, info)
        run = resolve(config, info)
        _check_disks(run.config, run.plan, out, run.plan.parameters * run.plan.checkpoint_bytes - _bytes_in(partial_dir(out)))
        report = launch("prune", run, progress or Progress("quiet"))
    if report is not None and config.evaluation.eval_tasks:
        report = _add_zero_shot(run, out, report)
    return report


def _add_zero_shot(run: Resolved, out: Path, report: dict) -> dict:
    """`prune --eval-tasks`: the dense and the pruned model through the harness, once the output is published;
    the accuracies join prune_report.json and report.md (a table and a chart)."""
    e = run.config.evaluation
    tasks = e.eval_tasks.split(",")
    report["zero_shot"] = {
        name: zero_shot_model(str(path), tasks, e.eval_limit, device=run.config.runtime.device,
                              trust_remote_code=name == "pruned" and run.method.structured)
        for name, path in (("dense", run.info.path), ("pruned", out))
    }  # fmt: skip
    write_text(out / "prune_report.json", json.dumps(report, indent=2) + "\n")
    write_report_markdown(out, report, e.plots)
    if e.plots:
        list_added_files(out, [ZERO_SHOT_PLOT])
    return report


def compute_gradients(config: PruneConfig, out: Path, progress: Progress | None = None) -> Path | None:
    """`dist-prune grad`: the GBLM gradient pass alone, saved for later `prune --gradients FILE` runs."""
    info = open_checkpoint(config)
    check_gradients_output(out, info.path, config.runtime.overwrite, is_gradients_file)
    run = resolve(config, info)
    _check_disks(run.config, run.plan, out, FP32_BYTES * sum(math.prod(s) for s in gradient_shapes(info.config).values()))
    return launch("grad", run, progress or Progress("quiet"))


def checked_source(config: PruneConfig) -> CheckpointInfo:
    """The checkpoint, checked for the run: for structured pruning its target reachable, else the N:M pattern
    fitting every Linear's width."""
    if method(config.prune.method).structured:
        from .structured.pipeline import check_structured  # imported when used: it loads transformers

        return check_structured(config)
    info = open_checkpoint(config)
    check_pattern_fits(info, config.nm)
    return info


def resolve(config: PruneConfig, info: CheckpointInfo | None = None) -> Resolved:
    """Everything the workers need, decided once, here: the checkpoint (checked), residency and activation
    storage from the memory plan, the plan itself (which must fit), the pattern."""
    info = info if info is not None else checked_source(config)
    config = resolve_runtime(torchrun_world(config), info)
    plan = plan_for(config, info)
    check_fits(plan)
    return Resolved(config, info, plan, config.nm)


def _output_lock(config: PruneConfig):
    """One run per output: the process that writes it holds a lock on its partial directory from the first
    check to the publish, so a second run (or a second --resume) is refused before it starts any work."""
    if not writes_output(config):
        return nullcontext()
    out = Path(config.out)
    busy = (
        f"another dist_prune run is writing {out} (it holds {partial_dir(out)}): let it finish, or pick another --out"
    )
    return locked_dir(partial_dir(out), busy)


def _check_disks(config: PruneConfig, plan: MemoryPlan, out: Path, output_bytes: int) -> None:
    """Room for the output and for the scratch files the plan counts (each worker of this host writes its
    own), before any work starts; the scratch folder must be one this user can write."""
    needs = {out.absolute().parent: max(output_bytes, 0)}
    if plan.scratch:
        root = scratch_root(config)
        check_writable(root, "scratch folder")
        needs[root] = needs.get(root, 0) + plan.scratch * plan.workers_per_host
    check_room(needs)


def _bytes_in(folder: Path) -> int:
    """What an interrupted run already wrote (a resumed run writes only the rest)."""
    return sum(entry.stat().st_size for entry in folder.iterdir() if is_regular(entry)) if folder.is_dir() else 0


def _check_calibration_tokens(config: PruneConfig, info: CheckpointInfo) -> None:
    """Token ids the embedding has no row for would fail deep inside a worker: refuse them here."""
    c = config.calibration
    check_token_ids(load_token_windows(c.calib_tokens, c.nsamples, c.seqlen), info.config["vocab_size"], c.calib_tokens)


def _check_gradients_file(config: PruneConfig, info: CheckpointInfo) -> None:
    """Made for this run's scale, norm and calibration size, and for this model's shapes."""
    p, c = config.prune, config.calibration
    load_gradient_sums(Path(p.gradients), p.gblm_scale, p.gblm_norm, c.nsamples, c.seqlen, headers_only=True)
    check_gradient_file_shapes(Path(p.gradients), info.config)


def zero_shot_model(
    model: str, tasks: list[str], limit: int | None, batch_size: int = 8, device: str = "auto",
    trust_remote_code: bool = False,
) -> dict:  # fmt: skip
    """`dist-prune eval --tasks`: zero-shot accuracy of any checkpoint through the harness (zeroshot.py)."""
    import tempfile

    from .launch import pick_device
    from .zeroshot import expand, load_tasks, zero_shot

    if limit is not None and limit < 1:
        raise ConfigError(f"--limit must be at least 1 example per task, got {limit}")
    info = inspect_checkpoint(resolve_model(model), trust_remote_code)
    with tempfile.TemporaryDirectory(prefix="dist_prune-tasks-") as workdir:
        loaded, chance = load_tasks(expand(tasks), Path(workdir))
        lm = load_model(info, pick_device(device), trust_remote_code)
        return {"model": str(info.path)} | zero_shot(lm, load_tokenizer(info.path), loaded, chance, limit, batch_size)


def generation_model(
    model: str, batch_sizes: tuple[int, ...] = (1, 16), prompt_tokens: int = 128, new_tokens: int = 128,
    runs: int = 3, device: str = "auto", trust_remote_code: bool = False,
) -> dict:  # fmt: skip
    """`dist-prune eval --generation`: greedy decoding speed, prompts cut from the Wikipedia evaluation split."""
    from .launch import pick_device
    from .zeroshot import generation_speed

    info = inspect_checkpoint(resolve_model(model), trust_remote_code)
    tokens = tokenize(load_tokenizer(info.path), load_text("wikipedia", "evaluation"))
    prompts = evaluation_windows(tokens, prompt_tokens, max(batch_sizes))
    lm = load_model(info, pick_device(device), trust_remote_code)
    return {"model": str(info.path)} | generation_speed(lm, prompts, new_tokens, batch_sizes, runs)


def evaluate_model(
    model: str,
    text: str,
    seqlen: int,
    windows: int | None,
    device: str = "auto",
    progress: Progress | None = None,
    trust_remote_code: bool = False,
) -> dict:
    """`dist-prune eval`: perplexity of any checkpoint on the evaluation split or a text file (one process)."""
    from .launch import pick_device

    info = inspect_checkpoint(resolve_model(model), trust_remote_code)
    if seqlen < 2 or (windows is not None and windows < 1):
        raise ConfigError(f"eval needs --seqlen of at least 2 and --windows of at least 1, got {seqlen} and {windows}")
    tokens = tokenize(load_tokenizer(info.path), load_text(text, "evaluation"))
    batches = evaluation_windows(check_token_ids(tokens, info.config["vocab_size"], text), seqlen, windows)
    start = time.perf_counter()
    progress = progress or Progress("quiet")
    with progress.phase("eval", total=batches.shape[0]) as advance:
        value = perplexity(load_model(info, pick_device(device), trust_remote_code), batches, progress=advance)
    return {
        "model": str(info.path),
        "perplexity": value,
        "text": text,
        "seqlen": seqlen,
        "windows": batches.shape[0],
        "seconds": round(time.perf_counter() - start, 3),
    }
