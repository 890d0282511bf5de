"""What a run read of its source model, so that --resume never mixes two models.

Two records, both of what the run reads anyway:
- the checkpoint's fingerprint: one SHA-256 of config.json and of every weight file's size and header (names,
  dtypes, shapes, offsets), among the settings a --resume must match: another architecture, dtype or file
  layout at the same path is refused by the driver before any work starts;
- the SHA-256 of each decoder layer and each tensor outside the layers, taken by worker 0 the first time a
  run reads it (`ReadRecord`) and kept in the manifest: a resumed run compares each part it reads with the
  interrupted run's record, so a model of the same shape with other weights (another fine-tune, a file
  replaced in place) is refused before anything computed from it is written.
"""

import hashlib
import json
import os
import threading
from concurrent.futures import ThreadPoolExecutor

import torch
from torch import Tensor

from .errors import KeptForResume

DIGEST_THREADS = min(8, os.cpu_count() or 1)


class ModelChanged(KeptForResume):
    """The source model is not the one an interrupted run read: its finished layers stay for when it is back."""


def fingerprint(config: dict, files: dict[str, object]) -> str:
    """config.json and a description of each weight file (its size and header), as one SHA-256."""
    return hashlib.sha256(json.dumps([config, files], sort_keys=True, default=str).encode()).hexdigest()


def tensors_sha256(tensors: dict[str, Tensor]) -> str:
    """Names, dtypes, shapes and bytes of `tensors`, in name order: one SHA-256 over each tensor's own SHA-256,
    the tensors hashed in threads (a LLaMA-2-70B layer is 1.7 GB: 2 s of one core's SHA-256)."""
    names = sorted(tensors)
    with ThreadPoolExecutor(max_workers=DIGEST_THREADS) as pool:
        digests = list(pool.map(lambda name: _tensor_sha256(name, tensors[name]), names))
    return hashlib.sha256(b"".join(digests)).hexdigest()


def _tensor_sha256(name: str, tensor: Tensor) -> bytes:
    tensor = tensor.detach().contiguous().cpu()
    digest = hashlib.sha256(f"{name} {tensor.dtype} {list(tensor.shape)}\n".encode())
    digest.update(tensor.reshape(-1).view(torch.uint8).numpy())
    return digest.digest()


class ReadRecord:
    """What worker 0 reads of the model, checked part by part: each decoder layer and each tensor outside the
    layers is hashed the first time the run reads it (by the weight store, in its read-ahead thread when it
    streams) and checked against `reads` (what an interrupted run recorded), or recorded there."""

    def __init__(self, reads: dict[str, str], model: str):
        self.reads, self.model = reads, model
        self.seen: set[str] = set()
        self._lock = threading.Lock()

    def check(self, part: str, tensors: dict[str, Tensor]) -> None:
        with self._lock:
            if part in self.seen:  # once per run: a resident layer read again after pruning holds pruned rows
                return
            self.seen.add(part)
        digest = tensors_sha256(tensors)
        with self._lock:
            recorded = self.reads.setdefault(part, digest)
        if recorded != digest:
            raise ModelChanged(
                f"the model at {self.model} is not the one the interrupted run read ({part} differs): resuming "
                f"would mix two models; put that model back, or start afresh without --resume after removing "
                f"the partial output"
            )
