"""A LLaMA sharded by rows across the workers with FSDP2, each worker reading only its own rows.

Build on the meta device (no memory), shard, allocate each worker's local shards, then fill them through
checkpoint.py's reader (safetensors `get_slice` reads just the requested rows through mmap). The local
shard of a Linear weight is a contiguous block of output rows, exactly what the per-row maths needs.
"""

from dataclasses import dataclass

import torch
from torch import Tensor, nn
from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard
from torch.distributed.tensor import DTensor
from transformers import AutoConfig, AutoModelForCausalLM

from ..checkpoint import CheckpointInfo
from ..errors import CheckpointError
from ..log import get_logger
from ..models import LAYERS_PREFIX, decoder_layers, family_of, layer_prefix, rebuild_unsaved_buffers
from .process_group import Workers

log = get_logger()

TIED_HEAD = "lm_head.weight"


@dataclass(frozen=True)
class RowShard:
    """This worker's rows [row_offset, row_offset + tensor.shape[0]) of a matrix with `total_rows` rows."""

    tensor: Tensor  # shares storage with the sharded parameter: writing into it changes the model
    row_offset: int
    total_rows: int


def load_sharded_model(info: CheckpointInfo, workers: Workers, dtype: torch.dtype = torch.float32) -> nn.Module:
    """The checkpoint as an FSDP2 model whose parameters are row shards (`Shard(0)`)."""
    config = AutoConfig.from_pretrained(info.model_files)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    shard_model(model, workers)
    fill_local_shards(model, info.open_weights())
    log.info("loaded the local row shards of %s", info.path)
    return model


def shard_model(model: nn.Module, workers: Workers) -> nn.Module:
    """A model built on the meta device, sharded by rows and given (uninitialised) local shards, in place."""
    # Each decoder layer becomes its own FSDP unit (one all-gather per layer), then the root takes
    # what is left (embeddings, final norm, lm_head); the root must be wrapped last.
    # Gradients are reduced in fp32 even for bf16 weights: the gradient pass squares inside the reduce-scatter.
    policy = MixedPrecisionPolicy(reduce_dtype=torch.float32)
    for layer in decoder_layers(model):
        fully_shard(layer, mesh=workers.mesh, mp_policy=policy)
    fully_shard(model, mesh=workers.mesh, mp_policy=policy)
    model.to_empty(device=workers.device)
    _tie_head_if_needed(model)
    rebuild_unsaved_buffers(model, family_of(model.config), workers.device)
    return model.eval()


@torch.no_grad()
def fill_local_shards(model: nn.Module, weights) -> None:
    """Copy each parameter's local rows from the checkpoint (`CheckpointInfo.open_weights()`), reading only them."""
    for name, param in model.named_parameters():  # a tied lm_head is listed once, as the embedding
        shape = weights.shape(name)
        if shape != list(param.shape):
            raise CheckpointError(f"{name} has shape {shape} in the checkpoint, the config says {list(param.shape)}")
        copy_local_rows(param, _RowsRead(weights, name))


class _RowsRead:
    """One tensor of the checkpoint, read only when sliced, and then only those rows (for copy_local_rows)."""

    def __init__(self, weights, name: str):
        self.weights, self.name = weights, name

    def __getitem__(self, rows: slice) -> Tensor:
        return self.weights.read([self.name], {self.name: range(rows.start, rows.stop)})[self.name]


@torch.no_grad()
def copy_local_rows(param: nn.Parameter, source) -> None:
    """This worker's rows of `source` (a full tensor, or a safetensors slice read lazily) into `param`."""
    shard = local_rows(param)
    rows = shard.tensor.shape[0]
    if rows:  # a worker may hold no rows of a small tensor
        shard.tensor.copy_(source[shard.row_offset : shard.row_offset + rows])


def _tie_head_if_needed(model: nn.Module) -> None:
    """`to_empty` keeps a tied lm_head tied; fail loudly should a future version not."""
    if not model.config.tie_word_embeddings:
        return
    if model.get_output_embeddings().weight is not model.get_input_embeddings().weight:
        raise CheckpointError("lm_head is no longer tied to the embeddings after sharding")


def local_rows(param: nn.Parameter) -> RowShard:
    """This worker's row block of a row-sharded parameter, where FSDP2 actually put it.

    FSDP2 splits rows like `torch.chunk` (ceil-sized blocks, the last ranks possibly short or empty);
    the offset is read from the DTensor's own layout (the chunk list it hands distributed checkpointing),
    not recomputed from that rule.
    """
    if not isinstance(param, DTensor):
        return RowShard(param.detach(), 0, param.shape[0])
    (chunk,) = param.__create_chunk_list__()
    offset = chunk.offsets
    with torch.no_grad():
        local = param.to_local().detach()
    return RowShard(local, offset[0], param.shape[0])


@torch.no_grad()
def gather_state(module: nn.Module) -> dict[str, Tensor]:
    """Full tensors of a module's state (parameters and persistent buffers), on every worker.

    A collective: every worker must call it for the same module in the same order. Names are relative
    to `module`, like `module.state_dict()`.
    """
    return {name: _full(t) for name, t in module.state_dict().items()}


def gather_layer_state(model: nn.Module, index: int) -> dict[str, Tensor]:
    """Full tensors of decoder layer `index`, named as in the checkpoint (`model.layers.3.mlp.up_proj.weight`)."""
    state = gather_state(decoder_layers(model)[index])
    return {layer_prefix(index) + name: t for name, t in state.items()}


def gather_non_layer_state(model: nn.Module) -> dict[str, Tensor]:
    """Embeddings, final norm and lm_head (left out when tied, as transformers re-ties it on load)."""
    state = {name: t for name, t in model.state_dict().items() if not name.startswith(LAYERS_PREFIX)}
    if model.config.tie_word_embeddings:
        state.pop(TIED_HEAD, None)
    with torch.no_grad():
        return {name: _full(t) for name, t in state.items()}


def _full(t: Tensor) -> Tensor:
    """A full copy that never aliases the model: on a one-worker mesh `full_tensor` returns the shard itself."""
    if not isinstance(t, DTensor):
        return t.clone()
    full = t.full_tensor()
    return full.clone() if t.device_mesh.size() == 1 else full
