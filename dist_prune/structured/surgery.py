"""Physical removal on a transformers LLaMA, and the config that makes the smaller checkpoint loadable.

A result whose decoder layers all have the same sizes is a stock LlamaForCausalLM (head_dim written out,
since num_heads * head_dim no longer equals hidden_size). Otherwise transformers 5.x's Llama builds every
layer from the global config (its `per_layer_config` support stops at the config class: LlamaModel ignores
it), so the checkpoint carries modeling_pruned_llama.py and an `auto_map` to it: load it with
`AutoModelForCausalLM.from_pretrained(path, trust_remote_code=True)`. Without that flag transformers builds a
stock Llama and refuses the checkpoint for its mismatched shapes; it never loads it wrongly.
"""

from pathlib import Path

import torch
from torch import Tensor, nn
from transformers import LlamaConfig, LlamaForCausalLM

from ..distributed import Workers, copy_local_rows, gather_state, local_rows, shard_model
from ..models import LAYERS_PREFIX, decoder_layers
from ..safe_io import copy_file
from .groups import (
    ATTENTION,
    COLUMN_MODULES,
    MLP,
    MODULES,
    LayerKeep,
    LayerShape,
    compensation_bias,
    kept_lines,
    slice_weight,
)
from .modeling_pruned_llama import SIZE_KEYS, PrunedLlamaForCausalLM

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


def slice_layer_state(state: dict[str, Tensor], keep: LayerKeep, head_dim: int) -> dict[str, Tensor]:
    """A decoder layer's full state (names relative to the layer) with the removed rows and columns gone."""
    sliced = dict(state)
    for module in MODULES[ATTENTION] + MODULES[MLP]:
        sliced[f"{module}.weight"] = slice_weight(module, state[f"{module}.weight"], keep, head_dim)
        bias = f"{module}.bias"
        if bias in state and module not in COLUMN_MODULES:  # a column module's bias belongs to its output
            sliced[bias] = state[bias][kept_lines(module, keep, head_dim).to(state[bias].device)]
    return sliced


def compensate_layer_state(
    state: dict[str, Tensor], keep: LayerKeep, head_dim: int, input_means: dict[str, Tensor]
) -> dict[str, Tensor]:
    """A decoder layer's full state with FLAP's compensation added to the biases of o_proj and down_proj
    (`input_means`: the calibration mean of each one's input, keyed by module name). Before slicing: the
    compensation reads the removed columns."""
    compensated = dict(state)
    for module in COLUMN_MODULES:
        bias = compensation_bias(module, state[f"{module}.weight"], input_means[module], keep, head_dim)
        name = f"{module}.bias"
        compensated[name] = state[name].float() + bias if name in state else bias
    return compensated


def kept_sizes(shapes: list[LayerShape], keeps: dict[int, LayerKeep]) -> list[dict[str, int]]:
    """Every layer's head counts and MLP width after removal (protected layers as they were)."""
    sizes = []
    for index, shape in enumerate(shapes):
        keep = keeps.get(index)
        values = (
            (shape.num_heads, shape.num_kv_heads, shape.intermediate)
            if keep is None
            else (len(keep.query_heads), len(keep.kv_heads), len(keep.channels))
        )
        sizes.append(dict(zip(SIZE_KEYS, values, strict=True)))
    return sizes


def build_on_meta(output: dict) -> nn.Module:
    """The pruned architecture described by `output_config`, on the meta device (fp32 when materialised)."""
    config = LlamaConfig(**output)
    model_class = PrunedLlamaForCausalLM if "auto_map" in output else LlamaForCausalLM
    with torch.device("meta"):
        return model_class(config)


@torch.no_grad()
def rebuild_smaller(
    model: nn.Module,
    keeps: dict[int, LayerKeep],
    output: dict,
    dtype: torch.dtype,
    workers: Workers,
    input_means: dict[int, dict[str, Tensor]] | None = None,
) -> nn.Module:
    """A new row-sharded model of the pruned architecture, filled one gathered layer at a time; with
    `input_means` (per pruned layer, per column module) the removed channels are compensated by biases.

    Weights are rounded to the saved dtype, so that what is evaluated and fine-tuned is exactly what is
    written. The non-layer weights keep their shapes and so their sharding: local rows are copied directly.
    Biases the output config asks for and the source lacks (attention_bias / mlp_bias put one on every
    projection of a block) start at zero.
    """
    smaller = shard_model(build_on_meta(output), workers)
    head_dim = output["head_dim"]
    for index, (layer, target) in enumerate(zip(decoder_layers(model), decoder_layers(smaller), strict=True)):
        state = gather_state(layer)  # a collective: every worker, every layer, in order
        if index in keeps:
            if input_means is not None:
                state = compensate_layer_state(state, keeps[index], head_dim, input_means[index])
            state = slice_layer_state(state, keeps[index], head_dim)
        for name, param in target.named_parameters():
            value = state[name] if name in state else torch.zeros(param.shape)
            copy_local_rows(param, value.to(dtype))
    old = dict(model.named_parameters())
    for name, param in smaller.named_parameters():
        if not name.startswith(LAYERS_PREFIX):
            local_rows(param).tensor.copy_(local_rows(old[name]).tensor)
    return smaller


def output_config(source: dict, sizes: list[dict[str, int]], head_dim: int, biases: bool = False) -> dict:
    """config.json for the pruned model: stock Llama when every layer is alike, else the bundled form.
    `biases`: compensation biases on o_proj and down_proj, so LlamaConfig's attention_bias and mlp_bias (which
    give every projection of the block a bias; the others stay zero)."""
    config = dict(source, head_dim=head_dim)
    if biases:
        config.update(attention_bias=True, mlp_bias=True)
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
        copy_file(BUNDLED_MODELING_FILE, directory / BUNDLED_MODELING_FILE.name)
