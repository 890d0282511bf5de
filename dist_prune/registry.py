"""What each method needs from the job: the one table the job skeleton, the driver and the plan consult,
instead of comparing method names in many places. The maths of each is in `dist_prune.methods`."""

from dataclasses import dataclass

# Structured importances that one forward pass of the dense model gives, without gradients (FLAP's): the
# scoring pass (structured/scoring.py) and the memory plan both follow this.
FORWARD_ONLY = ("fluctuation",)


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
    name: str
    statistics: str | None  # input statistics per layer: "norms" (sum x^2), "hessian" (sum x x^T), or None
    gradients: bool  # per-sample gradient sums of the dense model (a gradient pass before the layer loop)
    structured: bool = False  # removes whole heads and channels (structured/), instead of masking weights
    # Masks come from calibration scores (where the GBLM paper sees row/column structure): report.md pictures some.
    mask_pictures: bool = False
    structured_defaults: StructuredDefaults | None = None  # what `structured.*` fields left unset become


METHODS = {
    m.name: m
    for m in (
        Method("magnitude", statistics=None, gradients=False),
        Method("wanda", statistics="norms", gradients=False, mask_pictures=True),
        Method("sparsegpt", statistics="hessian", gradients=False, mask_pictures=True),
        Method("gblm", statistics="norms", gradients=True, mask_pictures=True),
        Method(
            "saap",
            statistics=None,
            gradients=True,
            structured=True,
            structured_defaults=StructuredDefaults("fused", "global", bias_compensation=True, ratio_spread=0.2),
        ),
        Method(
            "flap",
            statistics=None,
            gradients=False,
            structured=True,
            structured_defaults=StructuredDefaults("fluctuation", "global", bias_compensation=True),
        ),
    )
}


def method(name: str) -> Method:
    return METHODS[name]
