"""Model families as plug-ins: one module per family, registered here by config.json's `model_type`.

Everything that depends on a family asks its `Family` (names, shapes, biases, norms, the decoder layer class,
the stem and head through a `Shell`); nothing else in dist_prune knows a family's names. A new family is one
module and one line below (docs/extending.md).
"""

from ..errors import CheckpointError, shown
from .family import (
    ATTENTION_LINEARS,
    COLUMN_LINEARS,
    EMBEDDING,
    FINAL_NORM,
    INPUT_GROUPS,
    LAYERS_PREFIX,
    LINEAR_INPUT_OWNER,
    LINEARS,
    LM_HEAD,
    MLP_LINEARS,
    QUERY_HEAD_LINEARS,
    Family,
    Shell,
    decoder_layers,
    head_dim,
    layer_output,
    layer_prefix,
    linear_shapes,
    linear_weight_name,
    rebuild_unsaved_buffers,
    setting,
    tied,
)
from .gemma3 import GEMMA3
from .llama import LLAMA
from .mistral import MISTRAL
from .qwen2 import QWEN2
from .qwen3 import QWEN3

FAMILIES = {family.model_type: family for family in (LLAMA, MISTRAL, QWEN2, QWEN3, GEMMA3)}


def family_of(config) -> Family:
    """The family of a config.json (dict or transformers config); one clear line for any other."""
    model_type = setting(config, "model_type")
    if not isinstance(model_type, str) or model_type not in FAMILIES:
        raise CheckpointError(
            f"unsupported model_type {shown(model_type)}; dist_prune reads {', '.join(sorted(FAMILIES))}"
        )
    return FAMILIES[model_type]


__all__ = [
    "ATTENTION_LINEARS",
    "COLUMN_LINEARS",
    "EMBEDDING",
    "FAMILIES",
    "FINAL_NORM",
    "INPUT_GROUPS",
    "LAYERS_PREFIX",
    "LINEARS",
    "LINEAR_INPUT_OWNER",
    "LM_HEAD",
    "MLP_LINEARS",
    "QUERY_HEAD_LINEARS",
    "Family",
    "Shell",
    "decoder_layers",
    "family_of",
    "head_dim",
    "layer_output",
    "layer_prefix",
    "linear_shapes",
    "linear_weight_name",
    "rebuild_unsaved_buffers",
    "setting",
    "tied",
]
