"""A LLaMA whose decoder layers have their own head counts and MLP widths (structured pruning output).

Shipped inside pruned checkpoints and loaded through `auto_map` with
`AutoModelForCausalLM.from_pretrained(path, trust_remote_code=True)`. Self-contained: it imports only
transformers, so it runs wherever the checkpoint is copied. `config.layer_sizes[i]` holds layer i's
num_attention_heads, num_key_value_heads and intermediate_size; everything else is the stock Llama code.
"""

import copy

from transformers import LlamaConfig, LlamaForCausalLM
from transformers.models.llama.modeling_llama import LlamaDecoderLayer

SIZE_KEYS = ("num_attention_heads", "num_key_value_heads", "intermediate_size")


def layer_config(config: LlamaConfig, sizes: dict) -> LlamaConfig:
    """The global config with one layer's sizes; head_dim is explicit in the global config."""
    layer = copy.copy(config)
    # Set through __dict__: the sizes only shape this layer's modules, and the config class's
    # hidden_size % num_attention_heads check does not apply when head_dim is given.
    layer.__dict__.update({key: sizes[key] for key in SIZE_KEYS})
    return layer


class PrunedLlamaForCausalLM(LlamaForCausalLM):
    def __init__(self, config: LlamaConfig):
        super().__init__(config)
        for index, sizes in enumerate(config.layer_sizes):
            layer = LlamaDecoderLayer(layer_config(config, sizes), index)
            # The attention reads its kernel choice from its config at run time: share the global one so
            # that a later set_attn_implementation reaches every layer.
            layer.self_attn.config = config
            layer.mlp.config = config
            self.model.layers[index] = layer
        self.post_init()
