"""What a run read of its source model, so that --resume never mixes two models.

Two records, both of what the run reads anyway:
- the checkpoint's fingerprint: one SHA-256 of config.json and of every weight file's size and header (names,
  dtypes, shapes, offsets), among the settings a --resume must match: another architecture, dtype or file
  layout at the same path is refused by the driver before any work starts;
- the SHA-256 of each decoder layer and each tensor outside the layers, taken by worker 0 the first time a
  run reads it (`RecordedReads`) and kept in the manifest: a resumed run compares each part it reads with the
  interrupted run's record, so a model of the same shape with other weights (another fine-tune, a file
  replaced in place) is refused before anything computed from it is written.
"""

import hashlib
import json

import torch
from torch import Tensor

from .errors import KeptForResume


class ModelChanged(KeptForResume):
    """The source model is not the one an interrupted run read: its finished layers stay for when it is back."""


def fingerprint(config: dict, files: dict[str, object]) -> str:
    """config.json and a description of each weight file (its size and header), as one SHA-256."""
    return hashlib.sha256(json.dumps([config, files], sort_keys=True, default=str).encode()).hexdigest()


def tensors_sha256(tensors: dict[str, Tensor]) -> str:
    """Names, dtypes, shapes and bytes of `tensors`, in name order."""
    digest = hashlib.sha256()
    for name in sorted(tensors):
        tensor = tensors[name].detach().contiguous().cpu()
        digest.update(f"{name} {tensor.dtype} {list(tensor.shape)}\n".encode())
        digest.update(tensor.reshape(-1).view(torch.uint8).numpy())
    return digest.hexdigest()


class RecordedReads:
    """Worker 0's weight store, read through: each layer and tensor is hashed the first time this run reads it
    and checked against `reads` (what an interrupted run recorded), or recorded there. Every other attribute is
    the store's."""

    def __init__(self, store, reads: dict[str, str], model: str):
        self.store, self.reads, self.model = store, reads, model
        self.seen: set[str] = set()

    def __getattr__(self, name: str):
        return getattr(self.store, name)

    def layer(self, index: int) -> dict[str, Tensor]:
        state = self.store.layer(index)
        self._check(f"layer {index}", state)
        return state

    def read(self, names: list[str]) -> dict[str, Tensor]:
        return self._each_checked(self.store.read(names))

    def rest(self) -> dict[str, Tensor]:
        return self._each_checked(self.store.rest())

    def _each_checked(self, tensors: dict[str, Tensor]) -> dict[str, Tensor]:
        for name, tensor in tensors.items():
            self._check(name, {name: tensor})
        return tensors

    def _check(self, part: str, tensors: dict[str, Tensor]) -> None:
        if part in self.seen:  # once per run: a resident layer read again after pruning holds the pruned rows
            return
        self.seen.add(part)
        digest = tensors_sha256(tensors)
        if self.reads.setdefault(part, digest) != digest:
            raise ModelChanged(
                f"the model at {self.model} is not the one the interrupted run read ({part} differs): resuming "
                f"would mix two models; put that model back, or start afresh without --resume after removing "
                f"the partial output"
            )
