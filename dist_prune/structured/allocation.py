"""Per-module pruning amounts that remove a total number of parameters: uniformly, adaptively, or globally.

A module is the attention or the MLP of one unprotected layer. Adaptive: its ratio is proportional to its
importance instability relative to the other modules of the same kind (the least stable structures go
first), r_l = clamp(lam * u_l / mean_kind(u)), with lam solved so that the removed parameters equal the
target; the clamp keeps each ratio within `spread` of the uniform ratio (OWL's bound: without it a measure
whose instability varies a lot between layers empties whole modules) and below "one unit left". Uniform:
every module the same ratio. Global (FLAP): every unit of every module in one list, ranked by its standardised
score, each weighing the parameters it removes; the lowest go until the target is reached, and each module's
ratio is the share of its units that went. Then whole steps (groups.Steps): attention steps are coarse, so
they are rounded to the nearest first, and the MLPs, whose steps are single channels, absorb the difference;
the total misses the target by at most about one channel per module (uniform) or one channel overall
(adaptive, global).
"""

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor

from ..errors import ConfigError
from .groups import ATTENTION, MLP, Steps

BISECTION_ROUNDS = 100


@dataclass(frozen=True)
class Module:
    layer: int
    kind: str
    steps: Steps
    instability: float = 0.0

    @property
    def capacity(self) -> int:
        """Parameters removed if every removable step goes."""
        return self.steps.removable * self.steps.params


@dataclass(frozen=True)
class Allocation:
    """A rule for the per-module amounts: `counts(modules, target, scores, spread)`, the steps removed per
    module; `needs_stability`: it reads the modules' importance instability across calibration batches (which
    a forward-only importance has no meaningful value of)."""

    name: str
    counts: Callable[[list["Module"], int, list[Tensor] | None, float | None], list[int]]
    needs_stability: bool = False


def allocate(
    modules: list[Module],
    target_params: int,
    rule: str,
    scores: list[Tensor] | None = None,
    spread: float | None = None,
) -> list[int]:
    """Steps removed per module (same order as `modules`), removing about `target_params` parameters, by the
    rule of ALLOCATIONS named `rule`."""
    check_capacity(modules, target_params)
    return ALLOCATIONS[rule].counts(modules, target_params, scores, spread)


def _global(modules: list[Module], target_params: int, scores: list[Tensor] | None, _spread) -> list[int]:
    """FLAP's: one threshold over every module's unit `scores`."""
    assert scores is not None
    ratios = threshold_ratios(modules, scores, target_params)
    # the MLPs share what attention's rounding leaves in these proportions
    return whole_steps(modules, ratios, ratios, target_params, equal=False)


def _adaptive(modules: list[Module], target_params: int, _scores, spread: float | None) -> list[int]:
    """Ratios from the instability, each within `spread` of the uniform ratio (None: unbounded)."""
    weights = instability_weights(modules)
    ratios = solve_ratios(modules, weights, target_params, spread)
    return whole_steps(modules, ratios, weights, target_params, equal=False, spread=spread)


def _uniform(modules: list[Module], target_params: int, _scores, _spread) -> list[int]:
    weights = [1.0] * len(modules)
    ratios = solve_ratios(modules, weights, target_params)
    return whole_steps(modules, ratios, weights, target_params, equal=True)


ALLOCATIONS = {
    rule.name: rule
    for rule in (
        Allocation("global", _global),
        Allocation("adaptive", _adaptive, needs_stability=True),
        Allocation("uniform", _uniform),
    )
}


def whole_steps(
    modules: list[Module],
    ratios: list[float],
    weights: list[float],
    target_params: int,
    equal: bool,
    spread: float | None = None,
) -> list[int]:
    """Ratios -> whole steps: attention rounded to the nearest step, the MLPs absorbing the difference."""
    counts = [0] * len(modules)
    attention = [i for i, m in enumerate(modules) if m.kind == ATTENTION]
    for i in attention:
        counts[i] = min(modules[i].steps.removable, round(ratios[i] * modules[i].steps.count))
    left = target_params - sum(counts[i] * modules[i].steps.params for i in attention)
    mlp = [i for i, m in enumerate(modules) if m.kind == MLP]
    mlp_counts = mlp_steps([modules[i] for i in mlp], [weights[i] for i in mlp], left, equal, spread)
    for i, count in zip(mlp, mlp_counts, strict=True):
        counts[i] = count
    return counts


def check_capacity(modules: list[Module], target_params: int) -> None:
    capacity = sum(m.capacity for m in modules)
    if target_params > capacity:
        raise ConfigError(
            f"cannot remove {target_params:,} parameters: the unprotected layers hold only {capacity:,} removable "
            "(lower the ratio or protect fewer layers)"
        )


def instability_weights(modules: list[Module]) -> list[float]:
    """u_l / mean(u) over the modules of the same kind; all ones for a kind with no instability at all."""
    weights = []
    for m in modules:
        same_kind = [other.instability for other in modules if other.kind == m.kind]
        mean = sum(same_kind) / len(same_kind)
        weights.append(m.instability / mean if mean > 0 else 1.0)
    return weights


def threshold_ratios(modules: list[Module], scores: list[Tensor], target_params: int) -> list[float]:
    """FLAP's global cut: units of all modules ranked by score (lowest first, ties by position), each weighing
    the parameters its removal saves; the shortest prefix whose weight is closest to the target goes. Returns
    each module's share of removed units."""
    unit_params = torch.cat(
        [torch.full((len(s),), m.steps.params * m.steps.count / len(s), dtype=torch.float64) for m, s in zip(modules, scores, strict=True)]
    )  # fmt: skip
    owner = torch.cat([torch.full((len(s),), i) for i, s in enumerate(scores)])
    order = torch.sort(torch.cat([s.double() for s in scores]), stable=True).indices
    removed = torch.cumsum(unit_params[order], dim=0)
    cut = int(torch.argmin((removed - target_params).abs())) + 1
    counts = torch.bincount(owner[order[:cut]], minlength=len(modules))
    return [int(c) / len(s) for c, s in zip(counts, scores, strict=True)]


def solve_ratios(
    modules: list[Module], weights: list[float], target_params: int, spread: float | None = None
) -> list[float]:
    """r_l = clamp_l(lam * w_l) with sum_l r_l * count_l * params_l = target (bisection on lam).

    clamp_l: to [0, cap_l], and with a `spread` to within it of the uniform solution's ratio. The uniform
    solution lies inside every such box and meets the target, so the bounded one always exists."""
    caps = [m.steps.removable / m.steps.count for m in modules]
    lows, highs = [0.0] * len(modules), caps
    if spread is not None:
        centre = solve_ratios(modules, [1.0] * len(modules), target_params)
        lows = [max(0.0, c - spread) for c in centre]
        highs = [min(cap, c + spread) for c, cap in zip(centre, caps, strict=True)]

    def ratios(lam: float) -> list[float]:
        return [min(high, max(low, lam * w)) for low, high, w in zip(lows, highs, weights, strict=True)]

    def removed(lam: float) -> float:
        return sum(r * m.steps.count * m.steps.params for r, m in zip(ratios(lam), modules, strict=True))

    low, high = 0.0, 1.0
    while removed(high) < target_params and high < 1e12:
        high *= 2
    for _ in range(BISECTION_ROUNDS):
        middle = (low + high) / 2
        low, high = (middle, high) if removed(middle) < target_params else (low, middle)
    return ratios(high)


def mlp_steps(
    modules: list[Module], weights: list[float], target_params: int, equal: bool, spread: float | None = None
) -> list[int]:
    """MLP channels removed per module, removing as close to `target_params` as whole channels allow.

    equal: the same count everywhere (uniform layers stay identical); otherwise proportional to `weights`,
    floored, and the missing channels go to the largest remainders (Hamilton's apportionment).
    """
    if not modules or target_params <= 0:
        return [0] * len(modules)
    params = modules[0].steps.params  # one channel: a gate row, an up row and a down column, all layers alike
    if equal:
        count = min(min(m.steps.removable for m in modules), round(target_params / (params * len(modules))))
        return [count] * len(modules)
    ratios = solve_ratios(modules, weights, target_params, spread)
    ideal = [r * m.steps.count for r, m in zip(ratios, modules, strict=True)]
    counts = [math.floor(x) for x in ideal]
    missing = round(target_params / params) - sum(counts)
    by_remainder = sorted(range(len(modules)), key=lambda i: counts[i] - ideal[i])  # largest remainder first
    for i in [i for i in by_remainder if counts[i] < modules[i].steps.removable][: max(missing, 0)]:
        counts[i] += 1
    return counts
