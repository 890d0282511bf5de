"""Per-sample gradient sums under FSDP2: sum over every worker's sequences of (scale * g_n)^2 or |scale * g_n|,
and, when asked (structured pruning), the plain sum of g_n and the input square sums of chosen Linears.

FSDP's own reduce-scatter sums (or averages) the workers' gradients, and squaring that sum is wrong: the
square must come first. So each worker runs ONE sequence per backward, and a custom reduce-scatter squares
(or takes |.| of) the worker's scaled unsharded gradient before a SUM reduce-scatter, with the divide factor
set to 1. The reduced shard that FSDP hands back is then sum over workers of (s g_w)^2 for this step, and a
post-accumulate-grad hook adds it into an fp32 accumulator. The plain sum needs a second reduce-scatter of
the untouched gradient first, into a buffer laid out like FSDP's output. With one worker FSDP never calls
the reduce-scatter, so the hook applies the power itself.
"""

from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field

import torch
import torch.distributed as dist
from torch import Tensor, nn
from torch.distributed.fsdp import FSDPModule
from torch.distributed.fsdp._fully_shard._fsdp_api import ReduceScatter
from torch.distributed.tensor import DTensor, Shard

from ..adapter import decoder_layers, decoder_linear_weights
from ..log import get_logger
from ..methods.scores import accumulate_sample_gradient
from .collectives import all_reduce_in_order
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
    not used again after the collective, so it is transformed in place. With `plain_outputs`, the untouched
    gradients are reduce-scattered first into a buffer shaped like FSDP's output, filed under the address
    of that output so the hooks can find their rows (`_plain_rows`).
    """

    def __init__(self, scale: float, norm: str, plain_outputs: dict[int, Tensor] | None = None):
        self.scale = scale
        self.norm = norm
        self.plain_outputs = plain_outputs

    def __call__(self, output_tensor: Tensor, input_tensor: Tensor, group, op, async_op: bool = False):
        if self.plain_outputs is not None:
            plain = torch.empty_like(output_tensor)
            super().__call__(plain, input_tensor, group, op)  # synchronous: the input is squared next
            self.plain_outputs[output_tensor.untyped_storage().data_ptr()] = plain
        input_tensor.mul_(self.scale)  # same order of operations as accumulate_sample_gradient
        input_tensor.square_() if self.norm == "l2" else input_tensor.abs_()
        return super().__call__(output_tensor, input_tensor, group, op, async_op)


@dataclass(frozen=True)
class GradientRequest:
    """What one pass sums, per decoder Linear weight of `layers` (None: every decoder layer)."""

    scale: float = 1.0
    norm: str = "l2"  # sum_n (scale * g_n)^2, or sum_n |scale * g_n| for "l1"
    plain: bool = False  # also sum_n g_n, unscaled
    layers: tuple[int, ...] | None = None
    input_owners: tuple[str, ...] = ()  # Linears ("mlp.up_proj") whose input's sum_{n,t} x^2 is also summed


@dataclass
class GradientSums:
    """This worker's row shards of the gradient sums (fp32, keyed by full parameter name), and the input
    square sums of the asked Linears, full and identical on every worker (keyed by their weight names)."""

    power: dict[str, Tensor]
    plain: dict[str, Tensor] = field(default_factory=dict)
    input_sq: dict[str, Tensor] = field(default_factory=dict)
    sequences: int = 0

    def add_(self, other: "GradientSums") -> "GradientSums":
        for mine, theirs in ((self.power, other.power), (self.plain, other.plain), (self.input_sq, other.input_sq)):
            for name, tensor in theirs.items():
                mine[name].add_(tensor)
        self.sequences += other.sequences
        return self


def sharded_gradient_pass(
    model: nn.Module,
    windows: Tensor,
    workers: Workers,
    request: GradientRequest,
    checkpointing: bool = False,
    progress: Callable[[], None] | None = None,
) -> GradientSums:
    """The sums of `request` over ALL workers' sequences; windows: (N, T), the same on every worker, of which
    this worker uses its `local_share`. `gather_gradient_sums` assembles full tensors from the row shards."""
    mine = local_share(windows.shape[0], workers.rank, workers.world_size)
    share = windows[mine.start : mine.stop]
    steps = len(local_share(windows.shape[0], 0, workers.world_size))  # the largest share
    targets = _targets(model, request.layers)
    sums = GradientSums(
        power={name: _zero_rows(p) for name, p in targets.items()},
        plain={name: _zero_rows(p) for name, p in targets.items()} if request.plain else {},
        input_sq=_input_sums(model, request),
        sequences=windows.shape[0],
    )
    plain_outputs: dict[int, Tensor] | None = {} if request.plain and workers.world_size > 1 else None
    counting = [False]  # the input hooks count real forwards only: not dummies, not recomputation
    with (
        _only_targets_trainable(model, targets.values()),
        _power_reduce_scatter(model, request, plain_outputs),
        _activation_checkpointing(model, checkpointing),
    ):
        handles = [
            p.register_post_accumulate_grad_hook(_accumulator(sums, name, request, workers.world_size, plain_outputs))
            for name, p in targets.items()
        ]
        handles += [_input_hook(model, name, sums.input_sq[name], counting) for name in sums.input_sq]
        try:
            for step in range(steps):
                _backward_one(model, share, step, windows.shape[1], workers.device, counting)
                if plain_outputs is not None:
                    plain_outputs.clear()
                if progress is not None:
                    progress()
        finally:
            for handle in handles:
                handle.remove()
    all_reduce_in_order(sums.input_sq)
    return sums


def _targets(model: nn.Module, layers: tuple[int, ...] | None) -> dict[str, nn.Parameter]:
    targets = decoder_linear_weights(model)
    if layers is None:
        return targets
    prefixes = tuple(f"model.layers.{index}." for index in layers)
    return {name: p for name, p in targets.items() if name.startswith(prefixes)}


def _zero_rows(param: nn.Parameter) -> Tensor:
    return torch.zeros_like(local_rows(param).tensor, dtype=torch.float32)


def _input_sums(model: nn.Module, request: GradientRequest) -> dict[str, Tensor]:
    layers = request.layers if request.layers is not None else range(len(decoder_layers(model)))
    sums = {}
    for index in layers:
        for owner in request.input_owners:
            linear = decoder_layers(model)[index].get_submodule(owner)
            sums[f"model.layers.{index}.{owner}.weight"] = torch.zeros(
                linear.in_features, dtype=torch.float32, device=local_rows(linear.weight).tensor.device
            )
    return sums


def _input_hook(model: nn.Module, weight_name: str, acc: Tensor, counting: list[bool]):
    linear = model.get_submodule(weight_name.removesuffix(".weight"))

    def hook(_module: nn.Module, args: tuple, _output: Tensor) -> None:
        if counting[0]:
            x = args[0].detach().float()  # (batch, tokens, in); detached: the sums must not join the graph
            acc.add_(x.square().sum(dim=(0, 1)))

    return linear.register_forward_hook(hook)


def _backward_one(
    model: nn.Module, share: Tensor, step: int, seqlen: int, device: torch.device, counting: list[bool]
) -> None:
    """One sequence per backward. A worker whose share is used up still joins FSDP's collectives with a
    zero-weighted dummy sequence: its gradients, and so its contribution to every sum, are exactly zero."""
    weight = 1.0 if step < share.shape[0] else 0.0
    sequence = share[step] if weight else torch.zeros(seqlen, dtype=torch.long)
    tokens = sequence[None, :].to(device)  # batch of one: per-sample gradients
    counting[0] = bool(weight)
    try:
        loss = model(input_ids=tokens, labels=tokens, use_cache=False).loss
    finally:
        counting[0] = False
    (loss * weight).backward()


def _accumulator(
    sums: GradientSums, name: str, request: GradientRequest, world_size: int, plain_outputs: dict[int, Tensor] | None
):
    power, plain = sums.power[name], sums.plain.get(name)

    def hook(param: Tensor) -> None:
        grad = param.grad.to_local() if isinstance(param.grad, DTensor) else param.grad
        if world_size > 1:  # the reduce-scatter already applied the power
            power.add_(grad)
            if plain is not None:
                plain.add_(_plain_rows(plain_outputs, grad))
        else:
            accumulate_sample_gradient(power, grad, request.scale, request.norm)
            if plain is not None:
                plain.add_(grad)
        param.grad = None  # the next step must start from zero

    return hook


def _plain_rows(plain_outputs: dict[int, Tensor], grad: Tensor) -> Tensor:
    """This parameter's rows of the plain reduce-scatter: FSDP hands back each gradient as a strided view
    of its reduce-scatter output, so the same view of the plain buffer holds the plain sum."""
    plain = plain_outputs.get(grad.untyped_storage().data_ptr())
    if plain is None:
        raise RuntimeError(
            "FSDP no longer returns gradients as views of its reduce-scatter output; the plain gradient "
            "sums of structured pruning cannot be located (torch version change?)"
        )
    return plain.as_strided(grad.size(), grad.stride(), grad.storage_offset())


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
def _power_reduce_scatter(
    model: nn.Module, request: GradientRequest, plain_outputs: dict[int, Tensor] | None
) -> Iterator[None]:
    """Install the squaring reduce-scatter on every FSDP unit; afterwards leave a plain SUM one, which is
    what the divide factor of 1 means for any later backward."""
    units = [m for m in model.modules() if isinstance(m, FSDPModule)]
    for unit in units:
        unit.set_gradient_divide_factor(1.0)
        unit.set_custom_reduce_scatter(PowerReduceScatter(request.scale, request.norm, plain_outputs))
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
