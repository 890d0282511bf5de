"""Where a worker's weights live between uses: the two residencies.

- `StreamStore`: nothing stays resident. A decoder layer is read from the checkpoint (safetensors files or
  ZeRO partitions, memory-mapped: checkpoint.py) when its turn comes and dropped once done; a worker holds at
  most one layer.
- `ResidentStore`: every worker keeps its row block of every decoder-layer tensor in the checkpoint's dtype,
  read once at the start; a layer is assembled by an all-gather of the row blocks when its turn comes, and
  the pruned rows replace the dense ones.

Both hand out the same full layer tensors in the checkpoint's dtype, so everything downstream (statistics,
scores, masks) is identical whichever is used.

Streaming reads ahead when the run overlaps (config.py `overlap`): `layer(i, then=j)` returns layer i and
starts reading layer j in a thread (the layer loop asks for i + 1, the gradient pass's backward for i - 1), so
a worker holds at most two layers as read.
For a GPU the layer read ahead is copied into page-locked memory, from which it reaches the device at DMA
speed.
"""

import torch
from torch import Tensor

from ..background import Prefetcher, page_locked
from ..checkpoint import CheckpointInfo
from .collectives import gather_rows
from .process_group import Workers
from .shares import local_share


class StreamStore:
    """Each layer read from the checkpoint when asked for (the next one ahead, in a thread, when overlapping);
    nothing kept.
    `read_seconds` and `wait_seconds`: the last layer's read, and how long the caller waited for it."""

    def __init__(self, info: CheckpointInfo, device: torch.device | None = None, overlap: bool = True):
        self.reader = info.open_weights()
        self.num_layers = info.num_layers
        self.family, self.config = info.family, info.config
        self.pin = device is not None and device.type == "cuda"
        self.record = None  # worker 0 of a run that can be resumed: a provenance.ReadRecord checks what it reads
        self._layers = Prefetcher(self._read_layer, "read-ahead", overlap)

    def layer(self, index: int, then: int | None = None) -> dict[str, Tensor]:
        """Layer `index`, and layer `then` read ahead (None: nothing)."""
        return self._layers.get(index, then if then is not None and 0 <= then < self.num_layers else None)

    def layer_tensor_names(self, index: int) -> list[str]:
        return self.family.layer_tensor_names(self.config, index)

    def _read_layer(self, index: int) -> dict[str, Tensor]:
        tensors = self.reader.read(self.layer_tensor_names(index))
        if self.record is not None:  # hashed here, in the read-ahead thread
            self.record.check(f"layer {index}", tensors)
        # Memory-mapped tensors would be read from disk only when first used: read them here, in this thread.
        return page_locked(tensors) if self.pin else {name: t.clone() for name, t in tensors.items()}

    @property
    def read_seconds(self) -> float:
        return self._layers.load_seconds

    @property
    def wait_seconds(self) -> float:
        return self._layers.wait_seconds

    def close(self) -> None:
        self._layers.close()

    def rest(self) -> dict[str, Tensor]:
        """The tensors outside the decoder layers (never resident: the stem and the head read what they need)."""
        return self.read(list(self.family.rest_shapes(self.config)))

    def read(self, names: list[str]) -> dict[str, Tensor]:
        tensors = self.reader.read(names)
        for name, tensor in tensors.items():
            if self.record is not None:
                self.record.check(name, {name: tensor})
        return tensors

    def commit(self, index: int, state: dict[str, Tensor]) -> None:
        """Nothing to keep: the pruned layer is in the output file."""

    @property
    def resident_bytes(self) -> int:
        return 0


class ResidentStore(StreamStore):
    """This worker's row block of every decoder-layer tensor, in the checkpoint's dtype, on its device."""

    def __init__(self, info: CheckpointInfo, workers: Workers):
        super().__init__(info)
        self.workers = workers
        self.blocks: list[dict[str, Tensor]] = []
        self.rows: dict[str, int] = {}
        for index in range(self.num_layers):
            names = self.layer_tensor_names(index)
            self.rows.update({name: self.reader.shape(name)[0] for name in names})
            block = self.reader.read(names, {name: self._mine(name) for name in names})
            self.blocks.append({name: t.to(workers.device) for name, t in block.items()})

    def _mine(self, name: str) -> range:
        return local_share(self.rows[name], self.workers.rank, self.workers.world_size)

    def layer(self, index: int, then: int | None = None) -> dict[str, Tensor]:
        """The full layer, assembled from every worker's rows (a collective, in a fixed order; nothing to read
        ahead)."""
        state = {name: gather_rows(block, self.rows[name]) for name, block in sorted(self.blocks[index].items())}
        if self.record is not None:
            self.record.check(f"layer {index}", state)
        return state

    @property
    def read_seconds(self) -> float:
        return 0.0

    @property
    def wait_seconds(self) -> float:
        return 0.0

    def commit(self, index: int, state: dict[str, Tensor]) -> None:
        for name, block in self.blocks[index].items():
            mine = self._mine(name)
            block.copy_(state[name][mine.start : mine.stop])

    @property
    def resident_bytes(self) -> int:
        return sum(t.numel() * t.element_size() for block in self.blocks for t in block.values())
