"""OWL, outlier-weighted layer-wise sparsity (Yin et al. 2024): layers holding more outliers are pruned less.

A layer's outlier ratio is the fraction of its Wanda scores |W_ij| ||X_j|| (over all its Linears together)
above `threshold` times their mean, measured on the dense model. The ratios are scaled linearly onto a range
of width 2 * lambda and centred on the target: layer l keeps density (1 - target) + scaled_l - mean(scaled),
so the mean sparsity over layers is the target, the sparsities span 2 * lambda, and none is farther than
2 * lambda from the target (lambda when the ratios are spread evenly).

Sparsities are then rounded to a grid on which every Linear's per-row count is a whole number of weights
(multiples of 1 / gcd of the input widths), by largest remainder so that they still add up to the target
(exactly whenever the target lies on the grid; otherwise to the nearest point of it).
"""

import math

from torch import Tensor


def outlier_ratio(weights: list[Tensor], scaler_rows: list[Tensor], threshold: float) -> float:
    """The fraction of the layer's Wanda scores above threshold x their mean. weights[j]: (out, in) of one
    Linear; scaler_rows[j]: (1/N) sum x^2 of its input."""
    scores = [W.float().abs() * s.float().sqrt()[None, :] for W, s in zip(weights, scaler_rows, strict=True)]
    count = sum(s.numel() for s in scores)
    mean = sum(float(s.double().sum()) for s in scores) / count
    return sum(int((s > threshold * mean).sum()) for s in scores) / count


def owl_sparsities(ratios: list[float], target: float, spread: float, step: float) -> list[float]:
    """Each layer's sparsity from its outlier ratio, on multiples of `step`, mean the target."""
    low, high = min(ratios), max(ratios)
    scaled = [(r - low) / (high - low) * 2 * spread if high > low else 0.0 for r in ratios]
    centre = sum(scaled) / len(scaled)
    wanted = [min(1.0, max(0.0, target - (s - centre))) for s in scaled]
    return _on_grid(wanted, round(target * len(ratios) / step), step)


def _on_grid(values: list[float], total_units: int, step: float) -> list[float]:
    """Largest-remainder rounding of values / step to whole units adding up to total_units (each in [0, 1])."""
    units = [math.floor(v / step + 1e-9) for v in values]
    most = round(1 / step)
    order = sorted(range(len(values)), key=lambda i: (-(values[i] / step - units[i]), i))
    for i in order:
        if sum(units) >= total_units:
            break
        if units[i] < most:
            units[i] += 1
    for i in reversed(order):
        if sum(units) <= total_units:
            break
        if units[i] > 0:
            units[i] -= 1
    return [u * step for u in units]


def grid_step(input_widths: list[int]) -> float:
    """The sparsity step on which every Linear prunes a whole number of weights per row."""
    return 1.0 / math.gcd(*input_widths)
