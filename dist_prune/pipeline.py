"""The driver: check everything that can be checked cheaply, then hand the job to the launcher.

The checks run before any worker starts or any weight is read, so bad input costs a second and leaves
nothing behind.
"""

import time
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
from .gradients import check_gradient_file_shapes, is_gradients_file, load_gradient_sums
from .launch import launch, torchrun_world
from .memory import check_fits, plan_for, resolve_runtime
from .metrics import perplexity
from .progress import Progress
from .registry import method
from .writer import check_gradients_output, check_output


def prune(config: PruneConfig, progress: Progress | None = None) -> dict | None:
    """Prune with the configured launcher; returns the report (None on torchrun ranks other than 0)."""
    if method(config.prune.method).structured:
        from .structured.pipeline import check_structured  # imported when used: it loads transformers

        info = check_structured(config)
    else:
        info = open_checkpoint(config)
        check_pattern_fits(info, config.nm)
    check_output(Path(config.out), info.path, config.runtime.overwrite, config.runtime.resume)
    if method(config.prune.method).gradients and config.prune.gradients:
        _check_gradients_file(config, info)
    if config.calibration.calib_tokens:
        _check_calibration_tokens(config, info)
    return launch("prune", _resolved(config, info), progress or Progress("quiet"))


def compute_gradients(config: PruneConfig, out: Path, progress: Progress | None = None) -> Path | None:
    """`dist-prune grad`: the GBLM gradient pass alone, saved for later `prune --gradients FILE` runs."""
    info = open_checkpoint(config)
    check_gradients_output(out, info.path, config.runtime.overwrite, is_gradients_file)
    return launch("grad", _resolved(config, info), progress or Progress("quiet"))


def _resolved(config: PruneConfig, info: CheckpointInfo) -> PruneConfig:
    """Residency and activation storage decided once, here, from the memory plan; the workers get the result."""
    config = resolve_runtime(torchrun_world(config), info)
    check_fits(plan_for(config, info))
    return config


def _check_calibration_tokens(config: PruneConfig, info: CheckpointInfo) -> None:
    """Token ids the embedding has no row for would fail deep inside a worker: refuse them here."""
    c = config.calibration
    check_token_ids(load_token_windows(c.calib_tokens, c.nsamples, c.seqlen), info.config["vocab_size"], c.calib_tokens)


def _check_gradients_file(config: PruneConfig, info: CheckpointInfo) -> None:
    """Made for this run's scale, norm and calibration size, and for this model's shapes."""
    p, c = config.prune, config.calibration
    load_gradient_sums(Path(p.gradients), p.gblm_scale, p.gblm_norm, c.nsamples, c.seqlen, headers_only=True)
    check_gradient_file_shapes(Path(p.gradients), info.config)


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
