"""Reconstruction of a decoder layer's kept weights after its masks are chosen (`--reconstruct`), inside the
layer loop: the maths is methods/reconstruction.py; this module feeds it the sums it needs.

Modes:
- "linear": each Linear fitted on its own inputs in the dense layer (x_p = x_d): the optimal update of the
  kept weights for any method's mask, what SparseGPT's OBS sweep approximates for its own. One pass.
- "block": the input groups in order (q/k/v, o, gate/up, down), each fitted on its inputs in the layer as
  reconstructed so far, against the dense layer's outputs: o_proj takes up the error of q/k/v, gate/up that of
  the attention, down_proj that of gate/up, so the attention's and the MLP's outputs match the dense ones.
  One pass of the calibration batches per group, through the layer up to that group.

Both fit to the dense layer on the pruned model's inputs (the inputs SparseGPT uses). Fitting to the dense
model's own activations instead (carried beside through the dense layers) was tried and left out: on the real
SmolLM2 (Wanda 50%, block, 16 x 256 calibration) it gave perplexity 35.37 against 29.35, no better than no
fit (35.59): a Linear alone cannot take up the residual stream's accumulated difference.

Each worker runs its own calibration batches; the sums are added over workers in fp64 (methods/stats.py) and
every worker fits its own rows, so the result does not depend on the number of workers.
"""

import copy
from collections.abc import Callable
from dataclasses import replace

import torch
from torch import Tensor, nn

from .distributed.collectives import all_reduce_sums, sum_across_workers
from .layerwise import LayerInputs
from .methods import GroupMember
from .methods.base import PruneOutcome
from .methods.reconstruction import reconstruct_group
from .methods.stats import CrossStatistics


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
        # block mode runs the calibration through the layer as reconstructed so far: a copy, whose groups
        # take the fitted weights as they are made
        self.current = copy.deepcopy(layer) if self.mode == "block" else layer
        self.changed = False  # a group of `current` holds fitted weights

    def fit(self, owner: str, members: dict[str, GroupMember], outcomes: dict[str, PruneOutcome]):
        """The group's fitted rows (the masks the method chose, kept) and each member's relative output error
        before and after, sum ||W' x_p - W x_d||^2 / sum ||W x_d||^2 over all workers' calibration tokens."""
        stats = self._statistics(owner, list(members))
        all_reduce_sums(stats.tensors())
        H, C = stats.rounded()
        fits = reconstruct_group(
            [m.weight for m in members.values()], [o.weight for o in outcomes.values()],
            [o.mask for o in outcomes.values()], [m.first_row for m in members.values()], H, C, self.damp,
            self.iterations,
        )  # fmt: skip
        del H, C
        residuals = sum_across_workers([r for f in fits for r in (f.residual_before, f.residual_after)], self.device)
        fitted, errors = {}, {}
        for j, (name, outcome) in enumerate(outcomes.items()):
            energy = float(stats.energy[j])
            before, after = (max(0.0, energy + r) / energy if energy > 0 else 0.0 for r in residuals[2 * j : 2 * j + 2])
            fitted[name] = replace(outcome, weight=fits[j].weight)
            errors[name] = {"reconstruction_error_before": before, "reconstruction_error_after": after}
        return fitted, errors

    def use(self, name: str, weight: Tensor) -> None:
        """Block mode: the whole fitted matrix goes into the layer the next groups' inputs come from."""
        if self.mode == "block":
            with torch.no_grad():
                self.current.get_submodule(name).weight.copy_(weight)
            self.changed = True

    def _statistics(self, owner: str, names: list[str]) -> CrossStatistics:
        """The group's sums over this worker's batches: its input in the dense layer (and the dense outputs), and
        in the layer as fitted so far, the same until a group has been fitted (always, in linear mode)."""
        width = self.dense.get_submodule(owner).in_features
        stats = CrossStatistics(width, len(names), with_cross=self.changed, device=self.device)
        with torch.no_grad():
            for hidden, kwargs in self.calibration.batches():
                x_dense, outputs = _group_input(self.dense, owner, names, hidden, kwargs)
                x = _group_input(self.current, owner, [], hidden, kwargs)[0] if self.changed else x_dense
                stats.update(x, x_dense, outputs)
                del x, x_dense, outputs
        return stats


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
