"""Every method, by name: the one table the job skeleton, the driver, the config and the memory plan consult,
instead of comparing method names. A method is one module (its maths and its `Method`) and one line here."""

from .methods.base import Method, StructuredDefaults
from .methods.gblm import GBLM
from .methods.magnitude import MAGNITUDE
from .methods.sparsegpt import SPARSEGPT
from .methods.wanda import WANDA
from .structured.methods import FLAP, SAAP

METHODS = {m.name: m for m in (MAGNITUDE, WANDA, SPARSEGPT, GBLM, SAAP, FLAP)}


def method(name: str) -> Method:
    return METHODS[name]


def layer_statistics(needs: Method, prune) -> str | None:
    """What the layer loop collects of each Linear's input (config.MethodConfig `prune`): the method's own, or
    X X^T for every method when each Linear is reconstructed on its dense inputs (reconstruct.py fits on the
    Hessian the same forward gives, so the fit costs no forward of its own)."""
    return "hessian" if prune.reconstruct == "linear" else needs.statistics


def runs_calibration(needs: Method, prune) -> bool:
    """Whether calibration sequences go through the layers: for statistics, a reconstruction or OWL's pre-pass."""
    return bool(layer_statistics(needs, prune)) or prune.reconstruct != "none" or prune.sparsity_profile != "uniform"


__all__ = ["METHODS", "Method", "StructuredDefaults", "layer_statistics", "method", "runs_calibration"]
