"""Text sources and token windows for calibration and evaluation."""

import json
from pathlib import Path

import torch
from safetensors import safe_open
from torch import Tensor

from . import assets
from .errors import CalibrationError


def load_text(source: str, split: str) -> str:
    """ "wikipedia" (the bundled split), a .txt/.jsonl file, or "hf:NAME[:CONFIG]" (a reachable dataset)."""
    if source == "wikipedia":
        return assets.wikipedia_text(split)
    if source.startswith("hf:"):
        return _hf_dataset_text(source[3:], split)
    path = Path(source)
    if not path.is_file():
        raise CalibrationError(f"text source {source!r} is neither 'wikipedia', 'hf:NAME' nor an existing file")
    if path.suffix == ".jsonl":
        return "\n\n".join(_jsonl_texts(path))
    return path.read_text(encoding="utf-8")


def _jsonl_texts(path: Path) -> list[str]:
    texts = []
    with open(path, encoding="utf-8") as f:
        for number, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError:
                raise CalibrationError(f"{path}:{number} is not valid JSON") from None
            if not isinstance(record, dict) or not isinstance(record.get("text"), str):
                raise CalibrationError(f"{path}:{number} has no string field 'text'")
            texts.append(record["text"])
    return texts


def _hf_dataset_text(spec: str, split: str) -> str:
    try:
        import datasets  # optional: only for hub datasets, which need a network
    except ImportError:
        raise CalibrationError("hf: sources need the `datasets` package (pip install datasets)") from None
    name, _, config = spec.partition(":")
    hf_split = "train" if split == "calibration" else "validation"
    try:
        data = datasets.load_dataset(name, config or None, split=hf_split)
    except Exception as err:  # the hub raises many types; any of them means the source is unusable
        raise CalibrationError(f"could not load dataset {name!r}: {err}") from None
    return "\n\n".join(data["text"])


TOKENIZE_CHUNK_CHARS = 64_000


def tokenize(tokenizer, text: str) -> Tensor:
    """The whole text as one 1-D int64 token stream.

    Tokenized in chunks cut at paragraph breaks: a fast tokenizer's encoding of a whole 5 MB text holds
    offsets and alignments that peak near 1 GB, which would dominate a small model's memory.
    """
    pieces = [
        torch.tensor(tokenizer(chunk, add_special_tokens=False, verbose=False).input_ids, dtype=torch.int64)
        for chunk in _paragraph_chunks(text, TOKENIZE_CHUNK_CHARS)
    ]
    return torch.cat(pieces) if pieces else torch.zeros(0, dtype=torch.int64)


def _paragraph_chunks(text: str, size: int) -> list[str]:
    chunks, start = [], 0
    while start < len(text):
        end = len(text) if len(text) - start <= size else text.rfind("\n\n", start + 1, start + size)
        if end <= start:
            end = min(len(text), start + size)
        chunks.append(text[start:end])
        start = end
    return chunks


def sample_windows(tokens: Tensor, nsamples: int, seqlen: int, seed: int) -> Tensor:
    """nsamples windows of seqlen tokens at seeded random offsets: (nsamples, seqlen), int64."""
    if tokens.numel() < nsamples * seqlen:
        raise CalibrationError(
            f"calibration text has {tokens.numel()} tokens, fewer than nsamples x seqlen = "
            f"{nsamples} x {seqlen} = {nsamples * seqlen}; use more text or fewer/shorter windows"
        )
    generator = torch.Generator().manual_seed(seed)
    starts = torch.randint(0, tokens.numel() - seqlen + 1, (nsamples,), generator=generator)
    return torch.stack([tokens[s : s + seqlen] for s in starts.tolist()])


def recovery_windows(tokens: Tensor, count: int, seqlen: int, seed: int) -> Tensor:
    """`count` windows of `seqlen` tokens for recovery fine-tuning: the text cut into non-overlapping windows,
    taken in a seeded random order; once every window has been used a new order starts (the next epoch)."""
    available = tokens.numel() // seqlen
    if available == 0:
        raise CalibrationError(f"calibration text has {tokens.numel()} tokens, less than one window of {seqlen}")
    windows = tokens[: available * seqlen].view(available, seqlen)
    generator = torch.Generator().manual_seed(seed)
    epochs = -(-count // available)
    order = torch.cat([torch.randperm(available, generator=generator) for _ in range(epochs)])
    return windows[order[:count]]


def load_token_windows(path: str, nsamples: int, seqlen: int) -> Tensor:
    """Pre-tokenized windows from a safetensors file holding one integer tensor (N, T)."""
    try:
        with safe_open(path, framework="pt") as f:
            keys = list(f.keys())
            if len(keys) != 1:
                raise CalibrationError(f"{path} must hold exactly one tensor, found {len(keys)}")
            windows = f.get_tensor(keys[0])
    except (OSError, FileNotFoundError) as err:
        raise CalibrationError(f"cannot read calibration tokens {path}: {err}") from None
    except Exception as err:  # safetensors raises its own error type for corrupt headers
        if isinstance(err, CalibrationError):
            raise
        raise CalibrationError(f"{path} is not a valid safetensors file: {err}") from None
    if windows.dim() != 2 or windows.dtype.is_floating_point or windows.dtype == torch.bool:
        raise CalibrationError(f"{path} must hold an integer tensor [N, T], got {windows.dtype} {list(windows.shape)}")
    if windows.shape[0] < nsamples or windows.shape[1] < seqlen:
        raise CalibrationError(
            f"{path} holds {windows.shape[0]} x {windows.shape[1]} tokens; the run asks for {nsamples} x {seqlen}"
        )
    return windows[:nsamples, :seqlen].long()


def check_token_ids(tokens: Tensor, vocab_size: int, source: str) -> Tensor:
    """Token ids the model's embedding has no row for (a tokenizer that does not go with the model, a token
    file made for another) would fail deep inside a worker: refused here, in one line."""
    if tokens.numel() and (int(tokens.min()) < 0 or int(tokens.max()) >= vocab_size):
        raise CalibrationError(
            f"{source} gives token ids from {int(tokens.min())} to {int(tokens.max())}; this model's vocabulary has "
            f"ids 0 to {vocab_size - 1}"
        )
    return tokens


def evaluation_windows(tokens: Tensor, seqlen: int, max_windows: int | None) -> Tensor:
    """Non-overlapping windows from the start of the stream: (windows, seqlen)."""
    count = tokens.numel() // seqlen
    if max_windows is not None:
        count = min(count, max_windows)
    if count == 0:
        raise CalibrationError(f"evaluation text has {tokens.numel()} tokens, less than one window of {seqlen}")
    return tokens[: count * seqlen].view(count, seqlen)


def recovery_token_windows(config, stream: Tensor | None, calibration: Tensor) -> Tensor:
    """Structured recovery's windows, recover_steps x batch_size of them: fresh windows of the calibration
    `stream`, or the `calibration` windows cycled when the stream is None (a pre-tokenized file)."""
    c, s = config.calibration, config.structured
    count = s.recover_steps * c.batch_size
    if stream is None:
        return calibration.repeat(-(-count // calibration.shape[0]), 1)[:count]
    return recovery_windows(stream, count, c.seqlen, c.seed)


def calibration_stream(config, tokenizer) -> Tensor | None:
    """The calibration text as one token stream; None when pre-tokenized windows stand in for it."""
    c = config.calibration
    return None if c.calib_tokens else tokenize(tokenizer, load_text(c.calib_source, "calibration"))


def calibration_windows(config, stream: Tensor | None) -> Tensor:
    """The run's calibration windows (N, T): sampled from the calibration `stream`, or the pre-tokenized
    windows when the stream is None."""
    c = config.calibration
    if stream is None:
        return load_token_windows(c.calib_tokens, c.nsamples, c.seqlen)
    return sample_windows(stream, c.nsamples, c.seqlen, c.seed)
