"""Reconstruction of a decoder layer's kept weights after its masks are chosen (`--reconstruct`), inside the
layer loop: the maths is methods/reconstruction.py; this module feeds it the sums it needs.

Modes:
- "linear": each Linear fitted on its own inputs in the dense layer (x_p = x_d): the optimal update of the
  kept weights for any method's mask, what SparseGPT's OBS sweep approximates for its own. It fits on the
  layer's Hessians, which the statistics forward collects for every method (registry.layer_statistics): no
  forward of its own.
- "block": the input groups in order (q/k/v, o, gate/up, down), each fitted on its inputs in the layer as
  reconstructed so far, against the dense layer's outputs: o_proj takes up the error of q/k/v, gate/up that of
  the attention, down_proj that of gate/up, so the attention's and the MLP's outputs match the dense ones.
  One pass of the calibration batches per group, through the layer up to that group, once with the dense
  weights and once with the fitted ones (the layer's Linears read the written matrices while it runs: no copy
  of the layer).

Both fit to the dense layer on the pruned model's inputs (the inputs SparseGPT uses). Fitting to the dense
model's own activations instead (carried beside through the dense layers) was tried and left out: on the real
SmolLM2 (Wanda 50%, block, 16 x 256 calibration) it gave perplexity 35.37 against 29.35, no better than no
fit (35.59): a Linear alone cannot take up the residual stream's accumulated difference.

Each worker runs its own calibration batches; the sums are added over workers in fp64 (methods/stats.py) and
every worker fits its own rows, so the result does not depend on the number of workers.
"""

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import replace

import torch
from torch import Tensor, nn
from torch.nn.utils import parametrize

from .distributed.collectives import all_reduce_sums, sum_across_workers
from .layerwise import LayerInputs
from .methods import GroupMember
from .methods.base import PruneOutcome
from .methods.reconstruction import reconstruct_group
from .methods.stats import CrossStatistics, InputStatistics


class _Captured(Exception):
    """Raised by a hook once a forward has given what is wanted: the rest of the layer is not computed."""


class LayerReconstruction:
    """One decoder layer's reconstruction, group by group as the job prunes them (`fit`, then `use`)."""

    def __init__(self, layer: nn.Module, calibration: LayerInputs, settings, device):
        self.dense, self.calibration = layer, calibration
        self.mode, self.damp, self.iterations = (
            settings.reconstruct,
            settings.reconstruct_damp,
            settings.reconstruct_iterations,
        )
        self.device = device
        self.fitted: dict[str, Tensor] = {}  # block mode: the whole fitted matrices, as written

    def fit(
        self,
        owner: str,
        members: dict[str, GroupMember],
        outcomes: dict[str, PruneOutcome],
        statistics: InputStatistics | None,
    ):
        """The group's fitted rows (the masks the method chose, kept) and each member's relative output error
        before and after, sum ||W' x_p - W x_d||^2 / sum ||W x_d||^2 over all workers' calibration tokens.
        `statistics`: the group's input statistics, whose Hessian serves while no Linear of the layer has
        been fitted."""
        H, C, energies = self._sums(owner, list(members), statistics)
        fits = reconstruct_group(
            [m.weight for m in members.values()], [o.weight for o in outcomes.values()],
            [o.mask for o in outcomes.values()], [m.first_row for m in members.values()], H, C, self.damp,
            self.iterations,
        )  # fmt: skip
        del H, C
        totals = sum_across_workers([r for f in fits for r in (f.residual_before, f.residual_after, f.energy or 0.0)],
                                    self.device)  # fmt: skip
        fitted, errors = {}, {}
        for j, (name, outcome) in enumerate(outcomes.items()):
            before, after, energy = totals[3 * j : 3 * j + 3]
            energy = float(energies[j]) if energies is not None else energy
            before, after = (max(0.0, energy + r) / energy if energy > 0 else 0.0 for r in (before, after))
            fitted[name] = replace(outcome, weight=fits[j].weight)
            errors[name] = {"reconstruction_error_before": before, "reconstruction_error_after": after}
        return fitted, errors

    def use(self, name: str, weight: Tensor) -> None:
        """Block mode: the whole fitted matrix, which the next groups' inputs go through."""
        if self.mode == "block":
            self.fitted[name] = weight

    def _sums(self, owner: str, names: list[str], statistics: InputStatistics | None):
        """H, C (None: H) and the members' target energies (None: from H), summed over all workers."""
        if not self.fitted and statistics is not None and statistics.has_hessian:
            return statistics.hessian(), None, None
        stats = self._statistics(owner, names)
        all_reduce_sums(stats.tensors())
        return *stats.rounded(), stats.energy

    def _statistics(self, owner: str, names: list[str]) -> CrossStatistics:
        """The group's sums over this worker's batches: its input in the layer as fitted so far and, once a
        group has been fitted, in the dense layer and the dense outputs."""
        width = self.dense.get_submodule(owner).in_features
        crossed = bool(self.fitted)
        stats = CrossStatistics(width, len(names), with_cross=crossed, device=self.device)
        with torch.no_grad():
            for hidden, kwargs in self.calibration.batches():
                if not crossed:
                    stats.update(_group_input(self.dense, owner, [], hidden, kwargs)[0])
                    continue
                x_dense, outputs = _group_input(self.dense, owner, names, hidden, kwargs)
                with _reading(self.dense, self.fitted):
                    x = _group_input(self.dense, owner, [], hidden, kwargs)[0]
                stats.update(x, x_dense, outputs)
                del x, x_dense, outputs
        return stats


class _Written(nn.Module):
    """A parametrization: the Linear reads the written matrix (its dtype widened to the layer's as it runs)
    instead of its own weight, which stays untouched beneath."""

    def __init__(self, weight: Tensor):
        super().__init__()
        self.written = weight

    def forward(self, own: Tensor) -> Tensor:
        return self.written.to(own.dtype)


@contextmanager
def _reading(layer: nn.Module, weights: dict[str, Tensor]) -> Iterator[None]:
    """The layer's Linears `weights` (by name) read those matrices while the context lasts."""
    for name, weight in weights.items():
        parametrize.register_parametrization(layer.get_submodule(name), "weight", _Written(weight), unsafe=True)
    try:
        yield
    finally:
        for name in weights:
            parametrize.remove_parametrizations(layer.get_submodule(name), "weight", leave_parametrized=False)


def _group_input(layer: nn.Module, owner: str, names: list[str], hidden: Tensor, kwargs: dict):
    """The input of `owner` in `layer`'s forward on one batch, and the outputs of the Linears `names`; the
    forward stops once it has them."""
    seen: dict[str, Tensor] = {}

    def take_input(_module, args):
        seen[""] = args[0]
        if not names:
            raise _Captured

    def take_output(name: str) -> Callable:
        def hook(_module, _args, output):
            seen[name] = output
            if all(n in seen for n in names):
                raise _Captured

        return hook

    handles = [layer.get_submodule(owner).register_forward_pre_hook(take_input)]
    handles += [layer.get_submodule(name).register_forward_hook(take_output(name)) for name in names]
    try:
        layer(hidden, **kwargs)
    except _Captured:
        pass
    finally:
        for handle in handles:
            handle.remove()
    return seen[""], [seen[name] for name in names]
