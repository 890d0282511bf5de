"""Where a worker's weights live between uses: the two residencies.

- `StreamStore`: nothing stays resident. A decoder layer is read from the checkpoint (safetensors files or
  ZeRO partitions, memory-mapped: checkpoint.py) when its turn comes and dropped once done; a worker holds at
  most one layer.
- `ResidentStore`: every worker keeps its row block of every decoder-layer tensor in the checkpoint's dtype,
  read once at the start; a layer is assembled by an all-gather of the row blocks when its turn comes, and
  the pruned rows replace the dense ones.

Both hand out the same full layer tensors in the checkpoint's dtype, so everything downstream (statistics,
scores, masks) is identical whichever is used.
"""

from torch import Tensor

from ..adapter import layer_tensor_names, rest_tensor_names
from ..checkpoint import CheckpointInfo
from .collectives import gather_rows
from .process_group import Workers, local_share


class StreamStore:
    """Each layer read from the checkpoint when asked for; nothing kept."""

    def __init__(self, info: CheckpointInfo):
        self.reader = info.open_weights()
        self.num_layers = info.num_layers
        self.tied = info.tied_embeddings

    def layer(self, index: int) -> dict[str, Tensor]:
        return self.reader.read(layer_tensor_names(index))

    def rest(self) -> dict[str, Tensor]:
        """The tensors outside the decoder layers (never resident: the stem and the head read what they need)."""
        return self.read(rest_tensor_names(self.tied))

    def read(self, names: list[str]) -> dict[str, Tensor]:
        return self.reader.read(names)

    def commit(self, index: int, state: dict[str, Tensor]) -> None:
        """Nothing to keep: the pruned layer is in the output file."""

    @property
    def resident_bytes(self) -> int:
        return 0


class ResidentStore(StreamStore):
    """This worker's row block of every decoder-layer tensor, in the checkpoint's dtype."""

    def __init__(self, info: CheckpointInfo, workers: Workers):
        super().__init__(info)
        self.workers = workers
        self.blocks: list[dict[str, Tensor]] = []
        self.rows: dict[str, int] = {}
        for index in range(self.num_layers):
            names = layer_tensor_names(index)
            self.rows.update({name: self.reader.shape(name)[0] for name in names})
            self.blocks.append(self.reader.read(names, {name: self._mine(name) for name in names}))

    def _mine(self, name: str) -> range:
        return local_share(self.rows[name], self.workers.rank, self.workers.world_size)

    def layer(self, index: int) -> dict[str, Tensor]:
        """The full layer, assembled from every worker's rows (a collective, in a fixed order)."""
        return {name: gather_rows(block, self.rows[name]) for name, block in sorted(self.blocks[index].items())}

    def commit(self, index: int, state: dict[str, Tensor]) -> None:
        for name, block in self.blocks[index].items():
            mine = self._mine(name)
            block.copy_(state[name][mine.start : mine.stop])

    @property
    def resident_bytes(self) -> int:
        return sum(t.numel() * t.element_size() for block in self.blocks for t in block.values())
