"""GBLM's per-sample gradient sums, one decoder layer at a time: a worker never holds more than one layer.

Forward, layer by layer, one sequence at a time, keeping each layer's input for this worker's sequences
(in host memory or in scratch files). At the head, each sequence's mean next-token cross-entropy gives the
gradient at the last layer's output. Then from the top layer down: load the layer, recompute its forward for
each sequence from the stored input, back-propagate the stored output gradient, and add (s g_n)^2 (l2) or
|s g_n| (l1) of every Linear weight into that layer's sums; the input gradient goes to the layer below.
Those are exactly the gradients of the whole model's backward (the chain rule, split at layer boundaries),
with one sequence per backward as the per-sample maths requires.

The scale s goes into the gradient at the head (the gradients of s * loss are s times those of the loss),
so each per-sample weight gradient arrives scaled and its square (l2) or absolute value (l1) is one
element-wise step. Each sequence's contribution is a number exact in fp32 (a square of a bf16 or fp16
gradient is exact there; an fp32 gradient's square is rounded to fp32), added into fp64 sums, summed across
workers and rounded once, so the result does not depend on how the sequences were split. Each worker keeps
its own rows of each finished layer in the scratch directory, for the layer loop to read.

Reading overlaps the compute: the next layer is read ahead (distributed/residency.py), and stored inputs on
disk are written behind and read ahead (ActivationStore).
"""

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import Tensor

from ..background import Background, Prefetcher, to_host
from ..errors import DistPruneError, KeptForResume
from ..log import get_logger
from ..methods.gblm import accumulate_sample_gradient
from ..models import EMBEDDING, LINEARS, Shell, family_of, layer_output, linear_weight_name
from ..progress import PhaseClock
from ..safe_io import is_regular, replace_file
from .collectives import all_reduce_in_order
from .process_group import Workers
from .shares import local_share

log = get_logger()


class Scratch:
    """A private directory for one worker's intermediate files, with a name stable for a run (output and
    worker). Removed when the run succeeds or fails on bad input; kept when it crashes or is stopped, so a
    --resume can reuse the files listed as `kept` (say GBLM's gradient rows); anything else in it is stale and
    cleared when the next run starts. Only regular files are ever reused: a link found in it is removed (the
    link, never what it points to), and a folder standing at its name or inside it is refused."""

    def __init__(self, root: Path, tag: str, resume: bool = False, kept: tuple[str, ...] = ()):
        self.dir = root / f".dist_prune-scratch-{tag}"
        self.kept = kept if resume else ()

    def __enter__(self) -> "Scratch":
        try:
            self.dir.mkdir(parents=True, exist_ok=True)
        except OSError as err:
            raise DistPruneError(f"cannot make the scratch folder {self.dir}: {err.strerror or err}") from None
        if self.dir.is_symlink() or not self.dir.is_dir():
            raise DistPruneError(f"{self.dir} is a link or not a folder: dist_prune keeps its scratch files in a "
                                 f"folder of its own; move it away")  # fmt: skip
        for entry in self.dir.iterdir():
            if entry.is_dir() and not entry.is_symlink():
                raise DistPruneError(f"the scratch folder {self.dir} holds a folder dist_prune did not make: {entry}")
            if not (entry.name.startswith(self.kept) and is_regular(entry)):
                entry.unlink()
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        bad_input = exc_type is not None and issubclass(exc_type, DistPruneError)
        if exc_type is None or (bad_input and not issubclass(exc_type, KeptForResume)):
            self._clear()
            self.dir.rmdir()

    def _clear(self) -> None:
        for file in self.dir.glob("*"):
            file.unlink()

    def save(self, name: str, tensors: dict[str, Tensor]) -> None:
        """Written whole or not at all (a kill mid-write leaves no half file to be reused)."""
        tensors = {k: v.contiguous().cpu() for k, v in tensors.items()}
        replace_file(self.dir / f"{name}.safetensors", lambda staged: save_file(tensors, staged))

    def has(self, name: str) -> bool:
        return self.has_file(f"{name}.safetensors")

    def has_file(self, filename: str) -> bool:
        return is_regular(self.dir / filename)

    def load(self, name: str) -> dict[str, Tensor]:
        with safe_open(self.dir / f"{name}.safetensors", framework="pt") as f:
            return {key: f.get_tensor(key) for key in f.keys()}

    def remove(self, name: str) -> None:
        (self.dir / f"{name}.safetensors").unlink()


class ActivationStore:
    """Each layer's inputs for this worker's sequences: in host memory, or one scratch file per layer.
    Never on the accelerator: all layers' inputs are far larger than one layer (344 GB in bf16 at 70B).
    Files are written behind and read ahead in threads when the run overlaps: layer i's inputs are written while
    layer i computes, and the backward reads layer i - 1's while it computes layer i."""

    def __init__(self, scratch: Scratch | None, device: torch.device, overlap: bool = True):
        self.scratch = scratch
        self.device = device
        self.layers: dict[int, list[Tensor]] = {}
        self._writes = Background("store-inputs", overlap)
        self._reads = Prefetcher(self._load, "load-inputs", overlap)

    def put(self, index: int, hidden: list[Tensor]) -> None:
        host = [to_host(h) for h in hidden]
        if self.scratch is None:
            self.layers[index] = host
        elif host:
            self._writes.submit(self.scratch.save, f"inputs-{index}", {str(n): h for n, h in enumerate(host)})

    def pop(self, index: int, then: int | None = None) -> list[Tensor]:
        """Layer `index`'s stored inputs on the device; layer `then`'s are read ahead."""
        if self.scratch is None:
            return [h.to(self.device) for h in self.layers.pop(index)]
        self._writes.wait()  # the backward starts after the last input was stored
        return [h.to(self.device) for h in self._reads.get(index, then)]

    def drop(self, index: int) -> None:
        """Layer `index`'s inputs are not needed (the backward stops above it)."""
        self.layers.pop(index, None)
        if self.scratch is not None:
            self._writes.wait()
            self._remove(index)

    def _load(self, index: int) -> list[Tensor]:
        name = f"inputs-{index}"
        if not self.scratch.has(name):  # this worker holds no sequence
            return []
        stored = self.scratch.load(name)
        self._remove(index)
        return [stored[str(n)].clone() for n in range(len(stored))]  # read now, not when first used

    def _remove(self, index: int) -> None:
        if self.scratch.has(f"inputs-{index}"):
            self.scratch.remove(f"inputs-{index}")

    def close(self) -> None:
        try:
            self._writes.close()
        finally:
            self._reads.close()


@dataclass(frozen=True)
class GradientRequest:
    """What the pass sums, per decoder Linear weight of `layers` (None: every decoder layer)."""

    scale: float = 1.0
    norm: str = "l2"  # sum_n (scale * g_n)^2, or sum_n |scale * g_n| for "l1"
    plain: bool = False  # also sum_n scale * g_n (structured pruning's first-order Taylor term, at scale 1)
    input_owners: tuple[str, ...] = ()  # Linears ("mlp.down_proj") whose input's sum_{n,t} x and x^2 are summed
    layers: frozenset[int] | None = None


@dataclass
class LayerSums:
    """One layer's fp64 sums over every worker's sequences, keyed by the weight's checkpoint name."""

    power: dict[str, Tensor]
    plain: dict[str, Tensor] = field(default_factory=dict)
    input_sq: dict[str, Tensor] = field(default_factory=dict)
    input_sum: dict[str, Tensor] = field(default_factory=dict)

    def all_reduce(self) -> None:
        """Every worker's sequences, in place, in one collective (unique names across the kinds of sums)."""
        kinds = {"power": self.power, "plain": self.plain, "input": self.input_sq, "input_sum": self.input_sum}
        all_reduce_in_order({f"{kind}:{name}": t for kind, sums in kinds.items() for name, t in sums.items()})


def layerwise_input_moments(
    store,
    model_config,
    windows: Tensor,
    owners: tuple[str, ...],
    layers: frozenset[int],
    workers: Workers,
    dtype: torch.dtype,
    on_layer: Callable[[int, LayerSums], None],
    progress: Callable[[], None] | None = None,
) -> None:
    """Forward only, the dense model one layer at a time (FLAP's statistics): calls `on_layer(index, sums)` with
    the fp64 sums over every worker's sequences of x and x^2 of the inputs of `owners`, for each of `layers`,
    from the bottom up (`power` empty). One progress step per layer up to the highest asked.

    windows: (N, T), the same on every worker, of which this worker uses its `local_share`."""
    _, hidden, kwargs = _my_first_inputs(store, model_config, windows, workers, dtype)
    for index in range(max(layers) + 1):
        state = store.layer(index, then=index + 1 if index < max(layers) else None)
        layer = family_of(model_config).decoder_layer(model_config, index, state, dtype).to(workers.device)
        sums = LayerSums(power={})
        handles = _hook_inputs(layer, index, owners, sums) if index in layers else []
        try:
            with torch.no_grad():
                hidden = [layer_output(layer(h, **kwargs[index])) for h in hidden]
        finally:
            for handle in handles:
                handle.remove()
        del layer
        if index in layers:
            sums.all_reduce()
            on_layer(index, sums)
        _advance(progress)


def layerwise_gradient_pass(
    store,
    model_config,
    windows: Tensor,
    request: GradientRequest,
    workers: Workers,
    activations: ActivationStore,
    dtype: torch.dtype,
    on_layer: Callable[[int, LayerSums], None],
    progress: Callable[[], None] | None = None,
    timer: PhaseClock | None = None,
) -> float:
    """Calls `on_layer(index, sums)` with the full fp64 sums of each asked layer (the same on every worker;
    round them once), from the top layer down; returns the mean calibration loss. Two progress steps per layer.
    `timer` (a progress.PhaseClock) gets the phases: read, read_wait, h2d, forward, d2h, backward, reduce.

    windows: (N, T), the same on every worker, of which this worker uses its `local_share`."""
    timer = timer or PhaseClock(workers.device)
    tokens, hidden, kwargs = _my_first_inputs(store, model_config, windows, workers, dtype)
    asked = set(range(store.num_layers) if request.layers is None else request.layers)
    top = store.num_layers - 1
    lowest = min(asked, default=store.num_layers)
    for index in range(store.num_layers):
        # The top layer is read again for the backward: read ahead while it and the head compute.
        layer = _layer_on_device(store, model_config, index, min(index + 1, top), dtype, workers.device, timer)
        with timer("d2h"):
            activations.put(index, hidden)
        with timer("forward"), torch.no_grad():
            hidden = [layer_output(layer(h, **kwargs[index])) for h in hidden]
        del layer
        _advance(progress)
    family = family_of(model_config)
    head = Shell(family, model_config, store.read(family.head_tensor_names(model_config)), dtype, workers.device)
    with timer("backward"):
        grads, loss = _head_gradients(head, hidden, tokens, request.scale)
    del head, hidden
    for index in reversed(range(store.num_layers)):
        if index < lowest:  # nothing asked below: the backward stops
            activations.drop(index)
            _advance(progress)
            continue
        below = index - 1 if index > lowest else None
        with timer("h2d"):
            inputs = activations.pop(index, then=below)
        layer = _layer_on_device(store, model_config, index, below, dtype, workers.device, timer)
        wanted = request if index in asked else None
        with timer("backward"):
            sums, grads = _layer_sums(layer, index, inputs, grads, kwargs[index], wanted, index > lowest)
        if sums is not None:
            with timer("reduce"):
                sums.all_reduce()
            on_layer(index, sums)
        del layer, sums, inputs  # before the next layer is read: one layer in memory, not two
        _advance(progress)
    total_loss = torch.tensor([loss, float(tokens.shape[0])], dtype=torch.float64, device=workers.device)
    all_reduce_in_order({"loss": total_loss})
    return float(total_loss[0] / total_loss[1])


def _layer_on_device(store, model_config, index: int, then: int | None, dtype, device, timer):
    """Layer `index` built in the compute dtype on the device (layer `then` read ahead meanwhile)."""
    with timer("read_wait"):
        state = store.layer(index, then=then)
    timer.add("read", store.read_seconds)
    with timer("h2d"):
        return family_of(model_config).decoder_layer(model_config, index, state, dtype).to(device)


def _advance(progress: Callable[[], None] | None) -> None:
    if progress is not None:
        progress()


def _my_first_inputs(store, model_config, windows: Tensor, workers: Workers, dtype: torch.dtype):
    """This worker's share of the windows, layer 0's input for each of its sequences, and the shared keyword
    arguments; the embedding is read, used and dropped."""
    mine = local_share(windows.shape[0], workers.rank, workers.world_size)
    tokens = windows[mine.start : mine.stop].to(workers.device)
    shell = Shell(family_of(model_config), model_config, store.read([EMBEDDING]), dtype, workers.device)
    hidden, kwargs = _embed(shell, tokens)
    return tokens, hidden, kwargs


def _embed(shell: Shell, tokens: Tensor) -> tuple[list[Tensor], list[dict]]:
    """Layer 0's input for each sequence (batch of one), and each layer's keyword arguments, shared by all of
    them (none for a worker without sequences: it runs no layer)."""
    hidden, kwargs = [], [{}] * shell.config.num_hidden_layers
    for sequence in tokens:
        h, kwargs = shell.stem(sequence[None, :])
        hidden.append(h)
    return hidden, kwargs


def _head_gradients(head: Shell, hidden: list[Tensor], tokens: Tensor, scale: float) -> tuple[list[Tensor], float]:
    """d(scale * mean next-token cross-entropy of sequence n) / d(last layer's output), per sequence; and the
    summed mean losses (unscaled)."""
    grads, total = [], 0.0
    for h, sequence in zip(hidden, tokens, strict=True):
        h = h.detach().requires_grad_(True)
        with torch.enable_grad():
            loss = head.nll(h, sequence[None, :])[0] / (sequence.shape[0] - 1)
            (grad,) = torch.autograd.grad(loss * scale, [h])
        grads.append(grad)
        total += float(loss.detach())
    return grads, total


def _layer_sums(
    layer, index: int, inputs: list[Tensor], grads: list[Tensor], kwargs: dict, request: GradientRequest | None,
    need_input_grad: bool,
) -> tuple[LayerSums | None, list[Tensor]]:  # fmt: skip
    """One layer's fp64 sums over this worker's sequences (none when `request` is None: the layer only passes
    the gradient down), and the gradients at the layer's input.

    Each weight's gradient is added into its sums the moment backward produces it and then dropped, so one
    Linear's gradient is alive at a time, not the whole layer's. Each sequence's forward runs once here, so
    input sums hooked on it count every sequence once."""
    sums, handles = None, []
    if request is not None:
        sums = LayerSums(power={})
        for name in LINEARS:
            weight = layer.get_submodule(name).weight
            weight_name = linear_weight_name(index, name)
            power = sums.power[weight_name] = torch.zeros_like(weight, dtype=torch.float64)
            plain = None
            if request.plain:
                plain = sums.plain[weight_name] = torch.zeros_like(power)
            weight.requires_grad_(True)
            handles.append(weight.register_post_accumulate_grad_hook(_accumulate_into(power, plain, request)))
        handles += _hook_inputs(layer, index, request.input_owners, sums)
    below = []
    try:
        for x, grad_out in zip(inputs, grads, strict=True):
            x = x.detach().requires_grad_(need_input_grad)
            with torch.enable_grad():
                layer_output(layer(x, **kwargs)).backward(grad_out)
            if need_input_grad:
                below.append(x.grad)
    finally:
        for handle in handles:
            handle.remove()
    return sums, below


def _accumulate_into(power: Tensor, plain: Tensor | None, request: GradientRequest):
    """The gradient arrives scaled (the scale went in at the head)."""

    def hook(weight: Tensor) -> None:
        grad = weight.grad
        accumulate_sample_gradient(power, grad, request.norm)
        if plain is not None:
            plain.add_(grad)
        weight.grad = None  # the next sequence starts from zero, and the memory is free at once

    return hook


def _hook_inputs(layer, index: int, owners: tuple[str, ...], sums: LayerSums) -> list:
    """Forward hooks adding sum_{n,t} x^2 and sum_{n,t} x of each owner's input into `sums` (fp64)."""
    handles = []
    for owner in owners:
        linear = layer.get_submodule(owner)
        name = linear_weight_name(index, owner)
        for totals in (sums.input_sq, sums.input_sum):
            totals[name] = torch.zeros(linear.in_features, dtype=torch.float64, device=linear.weight.device)
        handles.append(linear.register_forward_hook(_input_moments_into(sums.input_sq[name], sums.input_sum[name])))
    return handles


def _input_moments_into(square_total: Tensor, total: Tensor):
    def hook(_module, args: tuple, _output) -> None:
        x = args[0].detach().float()
        square_total.add_(x.square().sum(dim=(0, 1)))
        total.add_(x.sum(dim=(0, 1)))

    return hook
