"""Everything that knows about workers: process groups, FSDP2 row sharding, the sharded per-sample gradient
pass and the few cross-worker reductions. The maths in `dist_prune.methods` never imports torch.distributed."""

from .collectives import (
    ShardSelector,
    all_reduce_in_order,
    all_reduce_layer_statistics,
    all_reduce_statistics,
    select_lowest_global,
)
from .grad_pass import GradientRequest, GradientSums, gather_gradient_sums, sharded_gradient_pass
from .process_group import Workers, batch_share, free_port, init_from_env, init_workers, local_share, teardown
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

__all__ = [
    "GradientRequest",
    "GradientSums",
    "RowShard",
    "ShardSelector",
    "Workers",
    "all_reduce_in_order",
    "all_reduce_layer_statistics",
    "all_reduce_statistics",
    "batch_share",
    "copy_local_rows",
    "free_port",
    "gather_gradient_sums",
    "gather_layer_state",
    "gather_non_layer_state",
    "gather_state",
    "init_from_env",
    "init_workers",
    "load_sharded_model",
    "local_rows",
    "local_share",
    "select_lowest_global",
    "shard_model",
    "sharded_gradient_pass",
    "teardown",
]
