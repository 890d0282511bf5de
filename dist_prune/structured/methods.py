"""The structured methods (docs/structured.md): each a choice of group importance, allocation and bias
compensation, run by structured/pipeline.py on the sharded model."""

from ..methods.base import Method, StructuredDefaults

SAAP = Method(
    "saap",
    gradients=True,
    structured_defaults=StructuredDefaults("fused", "global", bias_compensation=True, ratio_spread=0.2),
)
FLAP = Method("flap", structured_defaults=StructuredDefaults("fluctuation", "global", bias_compensation=True))
