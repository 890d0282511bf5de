"""What each method needs from the job: the one table the job skeleton, the driver and the plan consult,
instead of comparing method names in many places. The maths of each is in `dist_prune.methods`."""

from dataclasses import dataclass


@dataclass(frozen=True)
class Method:
    name: str
    statistics: str | None  # input statistics per layer: "norms" (sum x^2), "hessian" (sum x x^T), or None
    gradients: bool  # per-sample gradient sums of the dense model (a gradient pass before the layer loop)
    structured: bool = False  # removes whole heads and channels (structured/), instead of masking weights
    # Masks come from calibration scores (where the GBLM paper sees row/column structure): report.md pictures some.
    mask_pictures: bool = False


METHODS = {
    m.name: m
    for m in (
        Method("magnitude", statistics=None, gradients=False),
        Method("wanda", statistics="norms", gradients=False, mask_pictures=True),
        Method("sparsegpt", statistics="hessian", gradients=False, mask_pictures=True),
        Method("gblm", statistics="norms", gradients=True, mask_pictures=True),
        Method("saap", statistics=None, gradients=True, structured=True),
    )
}


def method(name: str) -> Method:
    return METHODS[name]
