"""Everything that knows about workers: process groups, where weights live (residency), the layer-wise
per-sample gradient pass, the few cross-worker reductions, and FSDP2 row sharding for structured pruning.
The maths in `dist_prune.methods` never imports torch.distributed."""

from .collectives import (
    ShardSelector,
    all_reduce_in_order,
    all_reduce_layer_statistics,
    all_reduce_statistics,
    select_lowest_global,
)
from .process_group import Workers, free_port, init_from_env, init_workers, on_workers, teardown
from .sharded_model import (
    RowShard,
    copy_local_rows,
    gather_layer_state,
    gather_non_layer_state,
    gather_state,
    load_sharded_model,
    local_rows,
    shard_model,
)
from .shares import batch_share, local_share
from .stop import StopRequest

__all__ = [
    "RowShard",
    "ShardSelector",
    "StopRequest",
    "Workers",
    "all_reduce_in_order",
    "all_reduce_layer_statistics",
    "all_reduce_statistics",
    "batch_share",
    "copy_local_rows",
    "free_port",
    "gather_layer_state",
    "gather_non_layer_state",
    "gather_state",
    "init_from_env",
    "init_workers",
    "load_sharded_model",
    "local_rows",
    "local_share",
    "on_workers",
    "select_lowest_global",
    "shard_model",
    "teardown",
]
