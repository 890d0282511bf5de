"""Where the weights come from: a Hugging Face checkpoint of a supported family (safetensors) or a DeepSpeed ZeRO training
checkpoint (zero.py), checked before anything heavy is loaded, and read one tensor (or some rows) at a time.

`open_checkpoint` is the one entry: it returns a `CheckpointInfo` whose `open_weights()` gives a reader with
`shape(name)` and `read(names, rows)`, the same for both kinds, so nothing downstream knows which it is.
"""

import math
import os
import struct
from dataclasses import dataclass, replace
from pathlib import Path

import torch
from safetensors import safe_open
from torch import Tensor, nn

from .assets import resolve_model
from .errors import CheckpointError, shown
from .models import Family, family_of, linear_shapes
from .provenance import fingerprint
from .safe_io import open_regular, parse_json, read_json, resolved
from .zero import ZeroLayout, ZeroWeights, beside, find_tag_dir, is_zero_checkpoint, read_layout, require_trust

INDEX_FILE = "model.safetensors.index.json"
SINGLE_FILE = "model.safetensors"
OUT_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


@dataclass(frozen=True)
class CheckpointInfo:
    path: Path  # the weights: an HF checkpoint folder, or a ZeRO tag folder
    config: dict
    weight_files: tuple[Path, ...]
    files_dir: Path | None = None  # config.json and the tokenizer (None: `path`)
    zero: ZeroLayout | None = None
    out_dtype: torch.dtype | None = None  # None: the checkpoint's own dtype
    fingerprint: str = ""  # config.json and the weight files' sizes and headers (provenance.py)

    @property
    def weight_dtype(self) -> torch.dtype:
        """The dtype every weight is read in, pruned in and written in."""
        if self.out_dtype is not None:
            return self.out_dtype
        name = self.config.get("dtype") or self.config.get("torch_dtype") or "float32"
        return getattr(torch, name)

    @property
    def model_files(self) -> Path:
        return self.files_dir or self.path

    def open_weights(self) -> "SafetensorsWeights | ZeroWeights":
        if self.zero is not None:
            return ZeroWeights(self.zero, self.weight_dtype)
        return SafetensorsWeights(self.path, self.out_dtype)

    @property
    def num_layers(self) -> int:
        return int(self.config["num_hidden_layers"])

    @property
    def tied_embeddings(self) -> bool:
        return bool(self.config.get("tie_word_embeddings", False))

    @property
    def family(self) -> Family:
        return family_of(self.config)

    def transformers_config(self):
        """The transformers config object, made from the config.json read and checked here (not read again)."""
        return self.family.transformers_config(self.config)


def open_checkpoint(config) -> CheckpointInfo:
    """The checkpoint a PruneConfig names, checked; a DeepSpeed folder only with `source.trust_pickle`."""
    path, source = resolve_model(config.model), config.source
    out_dtype = OUT_DTYPES[source.out_dtype] if source.out_dtype else None
    if is_zero_checkpoint(path):
        info = inspect_zero_checkpoint(path, source, out_dtype or torch.bfloat16)
    else:
        for flag in ("ds_tag", "ds_config_dir"):
            if getattr(source, flag) is not None:
                raise CheckpointError(f"--{flag.replace('_', '-')} is for DeepSpeed checkpoints; {path} is not one")
        info = replace(inspect_checkpoint(path), out_dtype=out_dtype)
    return info


def inspect_zero_checkpoint(path: Path, source, out_dtype: torch.dtype) -> CheckpointInfo:
    """A ZeRO checkpoint's layout (pickled structure only, after the user said --trust-pickle) and the HF
    config and tokenizer that go with it, checked as an HF checkpoint's would be."""
    require_trust(path, source.trust_pickle)
    tag_dir = find_tag_dir(path, source.ds_tag)
    places = (Path(source.ds_config_dir),) if source.ds_config_dir else beside(tag_dir)
    files_dir = next((place for place in places if (place / "config.json").is_file()), None)
    if files_dir is None:
        raise CheckpointError(
            f"no config.json for DeepSpeed checkpoint {tag_dir} in {' or '.join(map(str, places))}: pass "
            f"--ds-config-dir, a folder with the model's config.json and tokenizer"
        )
    config = read_model_config(files_dir / "config.json")
    layout = read_layout(tag_dir)
    check_shapes(tag_dir, config, layout.shapes)
    files = {"shapes": layout.shapes, "sizes": {file.name: file.stat().st_size for file in layout.files}}
    return CheckpointInfo(tag_dir, config, layout.files, files_dir, layout, out_dtype, fingerprint(config, files))


def inspect_checkpoint(path: Path, trust_remote_code: bool = False) -> CheckpointInfo:
    """Config and weight files, verified complete; raises CheckpointError with the one thing wrong.

    A checkpoint that ships its own model code (`auto_map`, such as a structured output with per-layer sizes)
    is accepted only with `trust_remote_code`, and then its shapes are the model code's business."""
    if not path.is_dir():
        raise CheckpointError(f"model directory {path} does not exist")
    config = read_model_config(path / "config.json")
    if "auto_map" in config and not trust_remote_code:
        raise CheckpointError(
            f"{path} ships its own model code ({shown(config['auto_map'])}); loading it runs that code: pass "
            f"--trust-remote-code to evaluate it (dist_prune prunes stock checkpoints of the families it reads)"
        )
    files = listed_weight_files(path)
    headers = {file: check_safetensors_file(file) for file in files}
    if "auto_map" not in config:
        check_tensors(path, config, headers)
    described = {file.name: [file.stat().st_size, entries] for file, entries in headers.items()}
    return CheckpointInfo(path=path, config=config, weight_files=files, fingerprint=fingerprint(config, described))


def read_model_config(config_file: Path) -> dict:
    """A config.json of a supported family (models/) with every size the model is built from."""
    config = _read_json(config_file, "model config")
    family_of(config)  # one line naming the supported model types otherwise
    check_model_config(config, config_file)
    return config


REQUIRED_SIZES = ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads", "vocab_size")
FLOAT_DTYPES = ("float32", "bfloat16", "float16")


def check_model_config(config: dict, config_file: Path) -> None:
    """The sizes the model is built from must be there (a missing one would build a default-size model), and
    the weights must be floating point."""
    for key in REQUIRED_SIZES:
        value = config.get(key)
        if not _positive_int(value):
            raise CheckpointError(f"{config_file}: {key} must be a positive integer, got {shown(value)}")
    kv_heads = config.get("num_key_value_heads") or config["num_attention_heads"]
    if not _positive_int(kv_heads) or config["num_attention_heads"] % kv_heads:
        raise CheckpointError(f"{config_file}: num_key_value_heads {shown(kv_heads)} must divide the heads")
    if config.get("head_dim") is not None and not _positive_int(config["head_dim"]):
        raise CheckpointError(f"{config_file}: head_dim must be a positive integer, got {shown(config['head_dim'])}")
    dtype = config.get("dtype") or config.get("torch_dtype") or "float32"
    if not isinstance(dtype, str) or dtype not in FLOAT_DTYPES:
        raise CheckpointError(f"{config_file}: dtype {shown(dtype)} is not one of {', '.join(FLOAT_DTYPES)}")


def _positive_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value > 0


def check_shapes(path: Path, config: dict, shapes: dict[str, tuple[int, ...]]) -> None:
    """Every tensor the model needs is there with the shape config.json implies."""
    for name, shape in family_of(config).iter_expected_shapes(config):
        if name not in shapes:
            raise CheckpointError(f"checkpoint {path} has no tensor {name}")
        if list(shapes[name]) != list(shape):
            raise CheckpointError(f"{name} has shape {list(shapes[name])} in {path}; config.json implies {list(shape)}")


def check_tensors(path: Path, config: dict, headers: dict[Path, dict]) -> None:
    """Every tensor the model needs is in the file the index names, with the shape config.json implies."""
    index = _read_json(path / INDEX_FILE, "weight index")["weight_map"] if (path / INDEX_FILE).is_file() else None
    shapes = {}
    for name, _ in family_of(config).iter_expected_shapes(config):
        file = path / index[name] if index and name in index else (path / SINGLE_FILE if index is None else None)
        entry = headers.get(file, {}).get(name) if file else None
        if entry is None:
            raise CheckpointError(f"checkpoint {path} has no tensor {name}" + (f" in {file.name}" if file else ""))
        shapes[name] = entry["shape"]
    check_shapes(path, config, shapes)


def _read_json(path: Path, what: str) -> dict:
    if not path.is_file():
        raise CheckpointError(f"{what} {path} is missing")
    value = read_json(path, what, CheckpointError)
    if not isinstance(value, dict):
        raise CheckpointError(f"{what} {path} must hold a JSON object, not {type(value).__name__}")
    return value


def listed_weight_files(path: Path) -> tuple[Path, ...]:
    if (path / INDEX_FILE).is_file():
        weight_map = _read_json(path / INDEX_FILE, "weight index").get("weight_map")
        if not isinstance(weight_map, dict) or not all(isinstance(v, str) for v in weight_map.values()):
            raise CheckpointError(f"{path / INDEX_FILE} has no weight_map of tensor names to file names")
        names = sorted(set(weight_map.values()))
        if not names:
            raise CheckpointError(f"{path / INDEX_FILE} maps no weights")
        root = resolved(path)
        outside = [n for n in names if root not in resolved(root / n).parents]
        if outside:
            raise CheckpointError(f"{path / INDEX_FILE} names files outside the checkpoint directory: {outside[0]}")
        missing = [
            n for n in names if not os.path.lexists(path / n)
        ]  # what is there but not a file: refused by its check
        if missing:
            raise CheckpointError(f"checkpoint {path} is missing shard(s): {', '.join(missing)}")
        return tuple(path / n for n in names)
    if os.path.lexists(path / SINGLE_FILE):  # whatever stands there: not a regular file is refused by its check
        return (path / SINGLE_FILE,)
    raise CheckpointError(f"no safetensors weights in {path} (expected {SINGLE_FILE} or {INDEX_FILE})")


def has_weights(path: Path) -> bool:
    """A folder naming safetensors weights the HF way (an index, or model.safetensors, whatever it turns out
    to be: its checks say what is wrong with it)."""
    return (path / INDEX_FILE).is_file() or os.path.lexists(path / SINGLE_FILE)


# safetensors' own limit on a header; and the bytes per element of each dtype it stores.
HEADER_LIMIT = 100_000_000
DTYPE_BYTES = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2, "F8_E4M3": 1, "F8_E5M2": 1, "I64": 8, "I32": 4, "I16": 2,
               "I8": 1, "U64": 8, "U32": 4, "U16": 2, "U8": 1, "BOOL": 1}  # fmt: skip


def check_safetensors_file(file: Path) -> dict:
    """A truncated or corrupt shard is caught here from its header, without reading the tensors; returns
    the header's tensor entries by name."""
    with open_regular(file, "shard", CheckpointError) as f:
        size = os.fstat(f.fileno()).st_size
        head = f.read(8)
        if len(head) < 8:
            raise CheckpointError(f"shard {file} is truncated ({size} bytes)")
        (header_len,) = struct.unpack("<Q", head)
        if 8 + header_len > size:
            raise CheckpointError(f"shard {file} is truncated: its header alone needs {8 + header_len} bytes")
        if header_len > HEADER_LIMIT:
            raise CheckpointError(f"shard {file} has a corrupt header (it claims {header_len:,} bytes)")
        header = parse_json(f.read(header_len), f"the header of shard {file}", CheckpointError)
    if not isinstance(header, dict):
        raise CheckpointError(f"shard {file} has a corrupt header (not a JSON object)")
    entries = {key: entry for key, entry in header.items() if key != "__metadata__"}
    if not all(_valid_entry(entry) for entry in entries.values()):
        raise CheckpointError(f"shard {file} has a corrupt header (a tensor without dtype, shape and offsets)")
    mismatched = next((name for name, entry in entries.items() if not _sized_as_shaped(entry)), None)
    if mismatched is not None:
        raise CheckpointError(
            f"shard {file} has a corrupt header: {shown(mismatched)}'s bytes do not match its dtype and shape"
        )
    spans = sorted(tuple(entry["data_offsets"]) for entry in entries.values())
    # Tensors tile the data section: each starts where the previous one ends, none overlaps another.
    if any(start != previous_end for (start, _), (_, previous_end) in zip(spans[1:], spans, strict=False)):
        raise CheckpointError(f"shard {file} has a corrupt header (tensor data overlap or leave gaps)")
    if spans and spans[0][0] != 0:
        raise CheckpointError(f"shard {file} has a corrupt header (tensor data does not start at 0)")
    expected = 8 + header_len + (spans[-1][1] if spans else 0)
    if size != expected:
        raise CheckpointError(f"shard {file} is truncated or corrupt: {size} bytes, its header describes {expected}")
    return entries


def _valid_entry(entry) -> bool:
    if not isinstance(entry, dict) or not isinstance(entry.get("dtype"), str):
        return False
    shape, offsets = entry.get("shape"), entry.get("data_offsets")
    return (
        isinstance(shape, list)
        and all(isinstance(n, int) and n >= 0 for n in shape)
        and isinstance(offsets, list)
        and len(offsets) == 2
        and all(isinstance(n, int) for n in offsets)
        and 0 <= offsets[0] <= offsets[1]
    )


def _sized_as_shaped(entry: dict) -> bool:
    """A known dtype whose element size times the shape's element count is the entry's byte span."""
    itemsize = DTYPE_BYTES.get(entry["dtype"])
    start, end = entry["data_offsets"]
    return itemsize is not None and math.prod(entry["shape"]) * itemsize == end - start


def check_pattern_fits(info: CheckpointInfo, nm: tuple[int, int] | None) -> None:
    if nm is None:
        return
    for name, (_, width) in linear_shapes(info.config).items():
        if width % nm[1]:
            raise CheckpointError(
                f"N:M {nm[0]}:{nm[1]} is impossible here: {name} has {width} inputs, not a multiple of {nm[1]}"
            )


def tensor_files(path: Path) -> dict[str, Path]:
    """Which safetensors file holds each tensor of the checkpoint."""
    if (path / INDEX_FILE).is_file():
        weight_map = _read_json(path / INDEX_FILE, "weight index")["weight_map"]
        return {name: path / file for name, file in weight_map.items()}
    if (path / SINGLE_FILE).is_file():
        with safe_open(path / SINGLE_FILE, framework="pt") as f:
            return dict.fromkeys(f.keys(), path / SINGLE_FILE)
    raise CheckpointError(f"no safetensors weights in {path} (expected {SINGLE_FILE} or {INDEX_FILE})")


class SafetensorsWeights:
    """Tensors of an HF checkpoint by name, whole or by rows, read through mmap one file open at a time
    (and rounded to `dtype` when the user asked for another output dtype)."""

    def __init__(self, path: Path, dtype: torch.dtype | None = None):
        self.files, self.dtype = tensor_files(path), dtype

    def shape(self, name: str) -> list[int]:
        with safe_open(self._file(name), framework="pt") as f:
            return f.get_slice(name).get_shape()

    def read(self, names: list[str], rows: dict[str, range] | None = None) -> dict[str, Tensor]:
        by_file: dict[Path, list[str]] = {}
        for name in names:
            by_file.setdefault(self._file(name), []).append(name)
        tensors = {}
        for file, file_names in by_file.items():
            with safe_open(file, framework="pt", device="cpu") as f:
                for name in file_names:
                    block = rows.get(name) if rows else None
                    tensor = f.get_slice(name)[block.start : block.stop] if block else f.get_tensor(name)
                    tensors[name] = tensor if self.dtype is None else tensor.to(self.dtype)
        return tensors

    def _file(self, name: str) -> Path:
        if name not in self.files:
            raise CheckpointError(f"the checkpoint has no tensor {name}")
        return self.files[name]


def load_model(info: CheckpointInfo, device: torch.device, trust_remote_code: bool = False) -> nn.Module:
    """The whole model in fp32 on one device (the in-process worker)."""
    from transformers import AutoModelForCausalLM
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # our own log lines say what is loading; no bars in pipeline logs
    model = AutoModelForCausalLM.from_pretrained(
        info.model_files, dtype=torch.float32, trust_remote_code=trust_remote_code
    )
    return model.to(device).eval()


def load_tokenizer(path: Path):
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(path)
    except (OSError, ValueError) as err:
        raise CheckpointError(f"no usable tokenizer in {path}: {err}") from None
