"""Physical removal on a transformers LLaMA, and the config that makes the smaller checkpoint loadable.

A result whose decoder layers all have the same sizes is a stock LlamaForCausalLM (head_dim written out,
since num_heads * head_dim no longer equals hidden_size). Otherwise transformers 5.x's Llama builds every
layer from the global config (its `per_layer_config` support stops at the config class: LlamaModel ignores
it), so the checkpoint carries modeling_pruned_llama.py and an `auto_map` to it: load it with
`AutoModelForCausalLM.from_pretrained(path, trust_remote_code=True)`. Without that flag transformers builds a
stock Llama and refuses the checkpoint for its mismatched shapes; it never loads it wrongly.
"""

import shutil
from pathlib import Path

import torch
from torch import nn

from ..layerwise import decoder_layers
from .groups import ATTENTION, COLUMN_MODULES, MLP, MODULES, LayerKeep, LayerShape, kept_lines, slice_weight
from .modeling_pruned_llama import SIZE_KEYS

BUNDLED_MODELING_FILE = Path(__file__).with_name("modeling_pruned_llama.py")
BUNDLED_CLASS = "PrunedLlamaForCausalLM"


def layer_shape(layer: nn.Module) -> LayerShape:
    """Sizes read from the modules themselves, so they are right before and after pruning."""
    attention, mlp = layer.self_attn, layer.mlp
    head_dim = attention.head_dim
    return LayerShape(
        hidden=attention.q_proj.in_features,
        num_heads=attention.q_proj.out_features // head_dim,
        num_kv_heads=attention.k_proj.out_features // head_dim,
        head_dim=head_dim,
        intermediate=mlp.gate_proj.out_features,
    )


@torch.no_grad()
def prune_layer_(layer: nn.Module, keep: LayerKeep) -> None:
    """Remove everything `keep` does not list from the layer's seven Linears, in place."""
    head_dim = layer.self_attn.head_dim
    for module in MODULES[ATTENTION] + MODULES[MLP]:
        linear = layer.get_submodule(module)
        linear.weight = nn.Parameter(slice_weight(module, linear.weight, keep, head_dim).clone())
        if module in COLUMN_MODULES:
            linear.in_features = linear.weight.shape[1]  # the bias belongs to the output: unchanged
            continue
        linear.out_features = linear.weight.shape[0]
        if linear.bias is not None:
            linear.bias = nn.Parameter(linear.bias[kept_lines(module, keep, head_dim).to(linear.bias.device)].clone())
    # repeat_kv reads this at run time: query heads per KV head after pruning
    layer.self_attn.num_key_value_groups = len(keep.query_heads) // len(keep.kv_heads)


def layer_sizes(model: nn.Module) -> list[dict[str, int]]:
    shapes = [layer_shape(layer) for layer in decoder_layers(model)]
    return [dict(zip(SIZE_KEYS, (s.num_heads, s.num_kv_heads, s.intermediate), strict=True)) for s in shapes]


def output_config(source: dict, sizes: list[dict[str, int]], head_dim: int) -> dict:
    """config.json for the pruned model: stock Llama when every layer is alike, else the bundled form."""
    config = dict(source, head_dim=head_dim)
    if is_stock_loadable(sizes, source["hidden_size"]):
        config.update(sizes[0])
        return config
    # Global sizes stay the unpruned ones (a valid Llama config); each layer's truth is in layer_sizes.
    config.update(
        layer_sizes=sizes,
        architectures=[BUNDLED_CLASS],
        auto_map={"AutoModelForCausalLM": f"{BUNDLED_MODELING_FILE.stem}.{BUNDLED_CLASS}"},
    )
    return config


def is_stock_loadable(sizes: list[dict[str, int]], hidden_size: int) -> bool:
    """Same sizes in every layer, and LlamaConfig's hidden_size % num_attention_heads check passes."""
    return all(s == sizes[0] for s in sizes) and hidden_size % sizes[0]["num_attention_heads"] == 0


def copy_modeling_file(config: dict, directory: Path) -> None:
    if "auto_map" in config:
        shutil.copy2(BUNDLED_MODELING_FILE, directory / BUNDLED_MODELING_FILE.name)
