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


__all__ = ["METHODS", "Method", "StructuredDefaults", "method"]
