"""Reading a Hugging Face LLaMA checkpoint: checked before anything heavy is loaded."""

import json
import struct
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from .errors import CheckpointError

SUPPORTED_MODEL_TYPES = ("llama",)
INDEX_FILE = "model.safetensors.index.json"
SINGLE_FILE = "model.safetensors"


@dataclass(frozen=True)
class CheckpointInfo:
    path: Path
    config: dict
    weight_files: tuple[Path, ...]

    @property
    def source_dtype(self) -> torch.dtype:
        name = self.config.get("dtype") or self.config.get("torch_dtype") or "float32"
        return getattr(torch, name)

    @property
    def num_layers(self) -> int:
        return int(self.config["num_hidden_layers"])

    @property
    def tied_embeddings(self) -> bool:
        return bool(self.config.get("tie_word_embeddings", False))

    def linear_input_sizes(self) -> dict[str, int]:
        """Input width of each decoder Linear (what an N:M pattern must divide)."""
        heads = self.config["num_attention_heads"]
        head_dim = self.config.get("head_dim") or self.config["hidden_size"] // heads
        hidden, mlp = self.config["hidden_size"], self.config["intermediate_size"]
        return {"q/k/v/gate/up": hidden, "o_proj": heads * head_dim, "down_proj": mlp}


def inspect_checkpoint(path: Path) -> CheckpointInfo:
    """Config and weight files, verified complete; raises CheckpointError with the one thing wrong."""
    if not path.is_dir():
        raise CheckpointError(f"model directory {path} does not exist")
    config = _read_json(path / "config.json", "model config")
    model_type = config.get("model_type")
    if model_type not in SUPPORTED_MODEL_TYPES:
        raise CheckpointError(
            f"unsupported architecture {model_type!r} ({', '.join(config.get('architectures') or [])}); "
            f"dist_prune prunes LLaMA-family checkpoints (model_type {', '.join(SUPPORTED_MODEL_TYPES)})"
        )
    files = listed_weight_files(path)
    for file in files:
        check_safetensors_file(file)
    return CheckpointInfo(path=path, config=config, weight_files=files)


def _read_json(path: Path, what: str) -> dict:
    if not path.is_file():
        raise CheckpointError(f"{what} {path} is missing")
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise CheckpointError(f"{what} {path} is not valid JSON: {err}") from None


def listed_weight_files(path: Path) -> tuple[Path, ...]:
    if (path / INDEX_FILE).is_file():
        index = _read_json(path / INDEX_FILE, "weight index")
        names = sorted(set(index.get("weight_map", {}).values()))
        if not names:
            raise CheckpointError(f"{path / INDEX_FILE} maps no weights")
        missing = [n for n in names if not (path / n).is_file()]
        if missing:
            raise CheckpointError(f"checkpoint {path} is missing shard(s): {', '.join(missing)}")
        return tuple(path / n for n in names)
    if (path / SINGLE_FILE).is_file():
        return (path / SINGLE_FILE,)
    raise CheckpointError(f"no safetensors weights in {path} (expected {SINGLE_FILE} or {INDEX_FILE})")


def check_safetensors_file(file: Path) -> None:
    """A truncated or corrupt shard is caught here from its header, without reading the tensors."""
    size = file.stat().st_size
    with open(file, "rb") as f:
        head = f.read(8)
        if len(head) < 8:
            raise CheckpointError(f"shard {file} is truncated ({size} bytes)")
        (header_len,) = struct.unpack("<Q", head)
        if 8 + header_len > size:
            raise CheckpointError(f"shard {file} is truncated: its header alone needs {8 + header_len} bytes")
        try:
            header = json.loads(f.read(header_len))
        except (json.JSONDecodeError, UnicodeDecodeError):
            raise CheckpointError(f"shard {file} has a corrupt header") from None
    ends = [entry["data_offsets"][1] for key, entry in header.items() if key != "__metadata__"]
    expected = 8 + header_len + max(ends, default=0)
    if size != expected:
        raise CheckpointError(f"shard {file} is truncated or corrupt: {size} bytes, its header describes {expected}")


def check_pattern_fits(info: CheckpointInfo, nm: tuple[int, int] | None) -> None:
    if nm is None:
        return
    for what, width in info.linear_input_sizes().items():
        if width % nm[1]:
            raise CheckpointError(
                f"N:M {nm[0]}:{nm[1]} is impossible here: {what} has {width} inputs, not a multiple of {nm[1]}"
            )


def load_model(info: CheckpointInfo, device: torch.device) -> nn.Module:
    """The whole model in fp32 on one device (the in-process worker)."""
    from transformers import AutoModelForCausalLM
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # our own log lines say what is loading; no bars in pipeline logs
    model = AutoModelForCausalLM.from_pretrained(info.path, dtype=torch.float32)
    return model.to(device).eval()


def load_tokenizer(path: Path):
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(path)
    except (OSError, ValueError) as err:
        raise CheckpointError(f"no usable tokenizer in {path}: {err}") from None
