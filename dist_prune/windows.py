"""The token windows of every phase of a run, from one tokenization of each split: calibration, evaluation,
and structured recovery's fresh windows."""

from typing import NamedTuple

from torch import Tensor

from .checkpoint import CheckpointInfo, load_tokenizer
from .config import PruneConfig
from .data import (
    calibration_stream,
    calibration_windows,
    check_token_ids,
    evaluation_windows,
    load_text,
    recovery_token_windows,
    tokenize,
)
from .progress import Progress
from .registry import method, runs_calibration


class TokenWindows(NamedTuple):
    calibration: Tensor | None  # when the method calibrates
    evaluation: Tensor | None  # when evaluation was asked for
    recovery: Tensor | None  # structured recovery's fresh windows of the calibration split


def token_windows(config: PruneConfig, info: CheckpointInfo, progress: Progress) -> TokenWindows:
    """The windows of every phase, from one tokenization of each split, in the model's vocabulary."""
    m, e = method(config.prune.method), config.evaluation
    with progress.phase("tokenize"):
        tokenizer = load_tokenizer(info.model_files)
        calibration = recovery = evaluation = None
        if runs_calibration(m, config.prune) or m.gradients or m.structured:
            stream = calibration_stream_checked(config, tokenizer, info)
            calibration = calibration_windows(config, stream)
            if m.structured and config.structured.recover_steps:
                recovery = recovery_token_windows(config, stream, calibration)
        if e.eval_after:
            tokens = tokenize(tokenizer, load_text(e.eval_text, "evaluation"))
            evaluation = evaluation_windows(check_token_ids(tokens, info.config["vocab_size"], e.eval_text),
                                            e.eval_seqlen, e.eval_windows)  # fmt: skip
        return TokenWindows(calibration, evaluation, recovery)


def calibration_stream_checked(config: PruneConfig, tokenizer, info: CheckpointInfo) -> Tensor | None:
    """The calibration text's tokens, refused when the model has no row for one (the driver checked a token
    file)."""
    stream = calibration_stream(config, tokenizer)
    if stream is not None:
        check_token_ids(stream, info.config["vocab_size"], config.calibration.calib_source)
    return stream
