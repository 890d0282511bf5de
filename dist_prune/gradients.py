"""GBLM's gradient sums file: its format (`dist-prune grad` writes it, `prune --gradients` reads it by rows)
and its checks. The pass itself is distributed/layer_gradients.py."""

import json
import math
import os
import struct
from pathlib import Path

import torch
from safetensors import safe_open
from torch import Tensor

from .distributed.shares import local_share
from .errors import ConfigError
from .models import LINEARS, linear_shapes, linear_weight_name
from .safe_io import disk_errors, new_staged

GRADIENT_KIND = "dist_prune/gblm-gradient-sums"
FP32_BYTES = 4


def save_gradient_sums(
    path: Path, sums: dict[str, Tensor], scale: float, norm: str, nsamples: int, seqlen: int
) -> None:
    with GradientSumsWriter(
        path, {name: list(t.shape) for name, t in sums.items()}, scale, norm, nsamples, seqlen
    ) as out:
        out.write(sums)


class GradientSumsWriter:
    """The gradients file written layer by layer, as the pass finishes each layer (top layer first), so the
    writer never holds more than one layer's sums (the whole file is 274 GB of fp32 at 70B).

    safetensors has no incremental writer. Its format is small and fixed: an 8-byte little-endian header
    length, a JSON header (name -> dtype, shape, byte offsets in the data section), then the tensors' bytes.
    Every shape is known before the pass starts, so the header is written first and each layer's sums land
    at their offsets when they are ready; `safe_open` reads the result like any other file. The file is
    built under a hidden name of its own (safe_io.new_staged) and renamed once every tensor is in place."""

    def __init__(self, path: Path, shapes: dict[str, list[int]], scale: float, norm: str, nsamples: int, seqlen: int):
        meta = {
            "kind": GRADIENT_KIND,
            "scale": repr(scale),
            "norm": norm,
            "nsamples": str(nsamples),
            "seqlen": str(seqlen),
        }
        header: dict = {"__metadata__": meta}
        self.offsets: dict[str, tuple[int, list[int]]] = {}
        end = 0
        for name in sorted(shapes):
            size = math.prod(shapes[name]) * FP32_BYTES
            header[name] = {"dtype": "F32", "shape": list(shapes[name]), "data_offsets": [end, end + size]}
            self.offsets[name] = (end, list(shapes[name]))
            end += size
        encoded = json.dumps(header, separators=(",", ":")).encode()
        encoded += b" " * (-len(encoded) % 8)  # the data section starts 8-byte aligned, as safetensors writes it
        self.data_start = 8 + len(encoded)
        self.path, self.partial = path, new_staged(path)
        self.file = open(self.partial, "wb")
        with disk_errors(path):
            self.file.write(struct.pack("<Q", len(encoded)) + encoded)
            self.file.truncate(self.data_start + end)
        self.missing = set(shapes)

    def write(self, tensors: dict[str, Tensor]) -> None:
        for name, tensor in tensors.items():
            start, shape = self.offsets[name]
            if list(tensor.shape) != shape:
                raise ValueError(f"{name}: sums of shape {list(tensor.shape)}, the header says {shape}")
            self.file.seek(self.data_start + start)
            with disk_errors(self.path):
                self.file.write(tensor.detach().to("cpu", torch.float32).contiguous().numpy().tobytes())
            self.missing.discard(name)

    def __enter__(self) -> "GradientSumsWriter":
        return self

    def __exit__(self, kind, *_) -> None:
        try:
            with disk_errors(self.path):
                self.file.close()  # buffered bytes are written here: the disk can still be full
            if kind is None and self.missing:
                raise ValueError(f"the gradient pass left {len(self.missing)} tensors unwritten")
            if kind is None:
                os.replace(self.partial, self.path)
        finally:
            self.partial.unlink(missing_ok=True)  # gone already when it took its name


def is_gradients_file(path: Path) -> bool:
    try:
        with safe_open(path, framework="pt") as f:
            return (f.metadata() or {}).get("kind") == GRADIENT_KIND
    except Exception:  # any unreadable file is simply not one of ours
        return False


def load_gradient_sums(
    path: Path, scale: float, norm: str, nsamples: int, seqlen: int, headers_only: bool = False
) -> dict[str, Tensor]:
    """A saved gradient file, refused when made with another scale, norm or calibration size than this run's
    (G is not divided by N, so the balance of GBLM's two terms depends on N and T).

    `headers_only` checks the file without reading a tensor (returns {}), for the driver's early checks.
    """
    if not path.is_file():
        raise ConfigError(f"gradients file {path} does not exist")
    if not is_gradients_file(path):
        raise ConfigError(f"{path} is not a gradients file written by `dist-prune grad`")
    with safe_open(path, framework="pt") as f:
        meta = f.metadata() or {}
        if meta.get("kind") != GRADIENT_KIND:
            raise ConfigError(f"{path} is not a gradients file written by `dist-prune grad`")
        if meta.get("norm") != norm or float(meta.get("scale", "nan")) != scale:
            raise ConfigError(
                f"{path} holds {meta.get('norm')} sums at scale {meta.get('scale')}; this run asks for {norm} at scale {scale}"
            )
        made = (meta.get("nsamples"), meta.get("seqlen"))
        if made != (str(nsamples), str(seqlen)):
            raise ConfigError(
                f"{path} was made from nsamples={made[0]} x seqlen={made[1]}; this run calibrates on "
                f"nsamples={nsamples} x seqlen={seqlen} (GBLM's gradient term grows with N: use matching sizes)"
            )
        return {} if headers_only else {name: f.get_tensor(name) for name in f.keys()}


def gradient_shapes(model_config: dict) -> dict[str, tuple[int, int]]:
    """The tensors of a gradients file: one per decoder Linear weight, of its shape."""
    shapes = linear_shapes(model_config)
    return {
        linear_weight_name(index, name): shape
        for index in range(model_config["num_hidden_layers"])
        for name, shape in shapes.items()
    }


def check_gradient_file_shapes(path: Path, model_config: dict) -> None:
    """A saved gradients file must cover exactly this model's decoder Linears, with the same shapes."""
    with safe_open(path, framework="pt") as f:
        check_gradient_sums({name: f.get_slice(name).get_shape() for name in f.keys()}, gradient_shapes(model_config))


def read_layer_gradient_rows(path: Path, index: int, rank: int, world_size: int) -> dict[str, Tensor]:
    """Worker `rank`'s rows of layer `index`'s saved sums, read with `get_slice`: no worker loads the whole
    file (274 GB of fp32 sums at 70B)."""
    rows = {}
    with safe_open(path, framework="pt") as f:
        for name in LINEARS:
            full_name = linear_weight_name(index, name)
            sliced = f.get_slice(full_name)
            mine = local_share(sliced.get_shape()[0], rank, world_size)
            rows[full_name] = sliced[mine.start : mine.stop]
    return rows


def check_gradient_sums(shapes: dict[str, tuple[int, ...]], expected: dict[str, tuple[int, ...]]) -> None:
    """Saved sums (name -> shape) must cover exactly the expected names, with the same shapes."""
    expected = {name: tuple(shape) for name, shape in expected.items()}
    found = {name: tuple(shape) for name, shape in shapes.items()}
    if found != expected:
        missing = sorted(set(expected) - set(found))[:3]
        raise ConfigError(f"saved gradients do not match this model (missing or misshapen: {missing or 'shapes'})")
