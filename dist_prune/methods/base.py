"""What every method is: the needs the job skeleton, the driver and the memory plan read without running
anything, and for an unstructured method its maths on one input group (the Linears that read one input)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from torch import Tensor

from .masks import prune_lowest_in_matrix, select_mask

if TYPE_CHECKING:
    from .stats import InputStatistics

MatrixSelector = Callable[[Tensor, float], Tensor]


@dataclass
class PruneOutcome:
    weight: Tensor  # fp32, exact zeros where pruned
    mask: Tensor  # True where pruned
    damp: float | None = None  # SparseGPT: damping fraction actually used
    # GBLM: sum of |W| G and of the whole score over these rows; their ratio says how much gradients weigh.
    gradient_score_sum: float | None = None
    score_sum: float | None = None


@dataclass(frozen=True)
class GroupMember:
    """One Linear of an input group as this worker holds it: its rows from `first_row` of the whole matrix."""

    weight: Tensor
    first_row: int = 0
    selector: MatrixSelector = prune_lowest_in_matrix  # one threshold over the whole matrix (or SparseGPT block)
    gradient_sums: Tensor | None = None  # GBLM: sum_n (s g_n)^2 (l2) or sum_n |s g_n| (l1) of these rows


# members, the prune settings (config.MethodConfig), the group's input statistics, the N:M pattern
PruneGroup = Callable[[dict[str, GroupMember], Any, "InputStatistics | None", tuple[int, int] | None], dict]


@dataclass(frozen=True)
class StructuredDefaults:
    """A structured method is a choice of group importance, allocation and bias compensation
    (docs/structured.md); every one of them can be overridden from the config."""

    importance: str
    allocation: str
    bias_compensation: bool
    ratio_spread: float | None = None  # the adaptive allocation's bound (docs/structured.md: measured at 20%, 50%)


@dataclass(frozen=True)
class Method:
    """One pruning method. `statistics`: what the layer loop collects of each Linear's input ("norms": sum x^2,
    "hessian": sum x x^T, or None); `gradients`: per-sample gradient sums of the dense model (a gradient pass
    before the layer loop); `prune`: an unstructured method's maths on one input group; `check`: its own
    settings' validation, run once by config.validate; `mask_pictures`: its masks come from calibration scores
    (report.md pictures some); `structured_defaults`: a structured method's choices (structured/)."""

    name: str
    statistics: str | None = None
    gradients: bool = False
    prune: PruneGroup | None = None
    check: Callable[[Any], None] | None = None
    mask_pictures: bool = False
    structured_defaults: StructuredDefaults | None = None

    @property
    def structured(self) -> bool:
        """Removes whole heads and channels (structured/) instead of masking weights."""
        return self.structured_defaults is not None


def prune_by_scores(
    member: GroupMember, scores: Tensor, ratio: float, nm: tuple[int, int] | None, scope: str = "row"
) -> PruneOutcome:
    """A score-based method's mask (a higher score is kept): N:M when given, else the lowest `ratio` of each row,
    or of the whole matrix (`scope` "matrix", through the member's selector: exact across workers)."""
    mask = member.selector(scores, ratio) if nm is None and scope == "matrix" else select_mask(scores, ratio, nm)
    return PruneOutcome(member.weight.float().masked_fill(mask, 0.0), mask)
