"""GBLM's gradient pass under FSDP2: per-sequence (scale * g)^2 or |scale * g|, summed over all workers.

FSDP's own reduce-scatter sums (or averages) the workers' gradients, and squaring that sum is wrong: the
square must come first. So each worker runs ONE sequence per backward, and a custom reduce-scatter squares
(or takes |.| of) the worker's scaled unsharded gradient before a SUM reduce-scatter, with the divide factor
set to 1. The reduced shard that FSDP hands back is then sum over workers of (s g_w)^2 for this step, and a
post-accumulate-grad hook adds it into an fp32 accumulator. With one worker FSDP never calls the
reduce-scatter, so the hook applies the power itself.
"""

from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path

import torch
import torch.distributed as dist
from safetensors import safe_open
from torch import Tensor, nn
from torch.distributed.fsdp import FSDPModule
from torch.distributed.fsdp._fully_shard._fsdp_api import ReduceScatter
from torch.distributed.tensor import DTensor, Shard

from ..gradients import check_gradient_sums, decoder_linear_weights
from ..log import get_logger
from ..methods.scores import accumulate_sample_gradient
from .process_group import Workers, local_share
from .sharded_model import local_rows

log = get_logger()


class SumReduceScatter(ReduceScatter):
    """A plain SUM reduce-scatter, whatever op FSDP asks for (the divide factor is 1, so nothing is lost)."""

    def allocate(self, size: Sequence[int], *, dtype: torch.dtype, device: torch.device) -> Tensor:
        return torch.empty(*size, dtype=dtype, device=device)

    def __call__(self, output_tensor: Tensor, input_tensor: Tensor, group, op, async_op: bool = False):
        return dist.reduce_scatter_single(
            output_tensor, input_tensor, op=dist.ReduceOp.SUM, group=group, async_op=async_op
        )


class PowerReduceScatter(SumReduceScatter):
    """(scale * g)^2 for l2 or |scale * g| for l1 on this worker's unsharded gradients, then a SUM reduce-scatter.

    `input_tensor` is FSDP's flat buffer of the unit's gradients (zero padding squares to zero); it is
    not used again after the collective, so it is transformed in place.
    """

    def __init__(self, scale: float, norm: str):
        self.scale = scale
        self.norm = norm

    def __call__(self, output_tensor: Tensor, input_tensor: Tensor, group, op, async_op: bool = False):
        input_tensor.mul_(self.scale)  # same order of operations as accumulate_sample_gradient
        input_tensor.square_() if self.norm == "l2" else input_tensor.abs_()
        return super().__call__(output_tensor, input_tensor, group, op, async_op)


def sharded_gradient_pass(
    model: nn.Module,
    windows: Tensor,
    workers: Workers,
    scale: float,
    norm: str,
    checkpointing: bool = False,
    progress: Callable[[], None] | None = None,
) -> dict[str, Tensor]:
    """sum over ALL workers' sequences of (scale * g_n)^2 (l2) or |scale * g_n| (l1), fp32.

    windows: (N, T), the whole calibration set on every worker; this worker uses `local_share`.
    Returns this worker's local row shard of the sums for every decoder Linear weight, keyed by full
    parameter name; `gather_gradient_sums` assembles them.
    """
    mine = local_share(windows.shape[0], workers.rank, workers.world_size)
    share = windows[mine.start : mine.stop]
    steps = len(local_share(windows.shape[0], 0, workers.world_size))  # the largest share
    targets = decoder_linear_weights(model)
    sums = {name: torch.zeros_like(local_rows(p).tensor, dtype=torch.float32) for name, p in targets.items()}
    squared_by_comm = workers.world_size > 1
    with (
        _only_targets_trainable(model, targets.values()),
        _power_reduce_scatter(model, scale, norm),
        _activation_checkpointing(model, checkpointing),
    ):
        handles = [
            p.register_post_accumulate_grad_hook(_accumulator(sums[name], scale, norm, squared_by_comm))
            for name, p in targets.items()
        ]
        try:
            for step in range(steps):
                _backward_one(model, share, step, windows.shape[1], workers.device)
                if progress is not None:
                    progress()
        finally:
            for handle in handles:
                handle.remove()
    return sums


def _backward_one(model: nn.Module, share: Tensor, step: int, seqlen: int, device: torch.device) -> None:
    """One sequence per backward. A worker whose share is used up still joins FSDP's collectives with a
    zero-weighted dummy sequence: its gradients, and so its contribution to every sum, are exactly zero."""
    weight = 1.0 if step < share.shape[0] else 0.0
    sequence = share[step] if weight else torch.zeros(seqlen, dtype=torch.long)
    tokens = sequence[None, :].to(device)  # batch of one: per-sample gradients
    loss = model(input_ids=tokens, labels=tokens, use_cache=False).loss
    (loss * weight).backward()


def _accumulator(acc: Tensor, scale: float, norm: str, squared_by_comm: bool):
    def hook(param: Tensor) -> None:
        grad = param.grad.to_local() if isinstance(param.grad, DTensor) else param.grad
        if squared_by_comm:
            acc.add_(grad)
        else:
            accumulate_sample_gradient(acc, grad, scale, norm)
        param.grad = None  # the next step must start from zero

    return hook


@contextmanager
def _only_targets_trainable(model: nn.Module, targets) -> Iterator[None]:
    """Gradients only for the decoder Linears: no wasted backward work, and only they are reduced."""
    previous = {p: p.requires_grad for p in model.parameters()}
    target_ids = {id(p) for p in targets}
    for p in model.parameters():
        p.requires_grad_(id(p) in target_ids)
    try:
        yield
    finally:
        for p, flag in previous.items():
            p.requires_grad_(flag)
            p.grad = None


@contextmanager
def _activation_checkpointing(model: nn.Module, enabled: bool) -> Iterator[None]:
    """Keep only each decoder layer's input and recompute the rest in backward (what makes 70B fit).

    transformers checkpoints only in training mode; LLaMA has no dropout, so the maths is unchanged.
    """
    if not enabled:
        yield
        return
    model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
    model.train()
    try:
        yield
    finally:
        model.activation_checkpointing_disable()
        model.eval()


@contextmanager
def _power_reduce_scatter(model: nn.Module, scale: float, norm: str) -> Iterator[None]:
    """Install the squaring reduce-scatter on every FSDP unit; afterwards leave a plain SUM one, which is
    what the divide factor of 1 means for any later backward."""
    units = [m for m in model.modules() if isinstance(m, FSDPModule)]
    for unit in units:
        unit.set_gradient_divide_factor(1.0)
        unit.set_custom_reduce_scatter(PowerReduceScatter(scale, norm))
    try:
        yield
    finally:
        for unit in units:
            unit.set_custom_reduce_scatter(SumReduceScatter())


@torch.no_grad()
def gather_gradient_sums(model: nn.Module, sums: dict[str, Tensor]) -> dict[str, Tensor]:
    """Full sums on every worker (a collective), e.g. to save them with `gradients.save_gradient_sums`."""
    targets = decoder_linear_weights(model)
    return {name: _gather_rows(targets[name], local) for name, local in sums.items()}


def _gather_rows(param: nn.Parameter, local: Tensor) -> Tensor:
    if not isinstance(param, DTensor):
        return local
    spec = DTensor.from_local(local, param.device_mesh, [Shard(0)], shape=param.shape, stride=param.stride())
    return spec.full_tensor()


def read_gradient_rows(path: Path, model: nn.Module) -> dict[str, Tensor]:
    """This worker's rows of saved gradient sums, read with `get_slice`: no worker loads the whole file
    (274 GB of fp32 sums at 70B). Names and shapes must match the model's decoder Linears."""
    targets = decoder_linear_weights(model)
    with safe_open(path, framework="pt") as f:
        check_gradient_sums({name: f.get_slice(name).get_shape() for name in f.keys()}, model)
        rows = {}
        for name, param in targets.items():
            shard = local_rows(param)
            block = f.get_slice(name)[shard.row_offset : shard.row_offset + shard.tensor.shape[0]]
            rows[name] = block.float().contiguous().to(shard.tensor.device)
    return rows
