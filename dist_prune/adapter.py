"""The one place that knows LLaMA's tensor names and module layout.

Everything else asks this module for a decoder layer's names, builds a plain layer from a state dict, runs
the stem (embeddings up to the input of layer 0) or the head (final norm and lm_head) through it, so a
worker can walk a model one decoder layer at a time without ever building the whole model.
"""

from collections.abc import Iterator
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

EMBEDDING = "model.embed_tokens.weight"
FINAL_NORM = "model.norm.weight"
LM_HEAD = "lm_head.weight"

# Decoder-layer Linears, and the one whose input each shares: q/k/v read the same normed hidden states,
# gate/up the same MLP input, so one accumulator serves each group.
LINEAR_INPUT_OWNER = {
    "self_attn.q_proj": "self_attn.q_proj",
    "self_attn.k_proj": "self_attn.q_proj",
    "self_attn.v_proj": "self_attn.q_proj",
    "self_attn.o_proj": "self_attn.o_proj",
    "mlp.gate_proj": "mlp.gate_proj",
    "mlp.up_proj": "mlp.gate_proj",
    "mlp.down_proj": "mlp.down_proj",
}
LINEARS = tuple(LINEAR_INPUT_OWNER)
NORMS = ("input_layernorm", "post_attention_layernorm")


LAYERS_PREFIX = "model.layers."


def layer_prefix(index: int) -> str:
    return f"{LAYERS_PREFIX}{index}."


def linear_weight_name(index: int, linear: str) -> str:
    """`model.layers.3.mlp.up_proj.weight`: the checkpoint name of a decoder Linear's weight."""
    return f"{layer_prefix(index)}{linear}.weight"


def layer_tensor_names(index: int) -> list[str]:
    """Every tensor of decoder layer `index` in the checkpoint (LLaMA has no biases by default)."""
    return [linear_weight_name(index, name) for name in LINEARS] + [
        f"{layer_prefix(index)}{norm}.weight" for norm in NORMS
    ]


def linear_shapes(model_config: dict) -> dict[str, tuple[int, int]]:
    """(out, in) of every decoder Linear, from config.json alone."""
    hidden, mlp = model_config["hidden_size"], model_config["intermediate_size"]
    heads = model_config["num_attention_heads"]
    kv_heads = model_config.get("num_key_value_heads") or heads
    head_dim = model_config.get("head_dim") or hidden // heads
    q, kv = heads * head_dim, kv_heads * head_dim
    return {
        "self_attn.q_proj": (q, hidden),
        "self_attn.k_proj": (kv, hidden),
        "self_attn.v_proj": (kv, hidden),
        "self_attn.o_proj": (hidden, q),
        "mlp.gate_proj": (mlp, hidden),
        "mlp.up_proj": (mlp, hidden),
        "mlp.down_proj": (hidden, mlp),
    }


def expected_shapes(model_config: dict) -> dict[str, tuple[int, ...]]:
    """Every tensor a LLaMA checkpoint must hold, with its shape, from config.json alone."""
    return dict(iter_expected_shapes(model_config))


def iter_expected_shapes(model_config: dict) -> Iterator[tuple[str, tuple[int, ...]]]:
    """The same, one at a time, outside the layers first: a check can stop at the first one missing before
    a config.json claiming a billion layers has them all listed."""
    yield from _rest_shapes(model_config).items()
    for index in range(model_config["num_hidden_layers"]):
        yield from _layer_shapes(model_config, index).items()


def _rest_shapes(model_config: dict) -> dict[str, tuple[int, ...]]:
    hidden, vocab = model_config["hidden_size"], model_config["vocab_size"]
    tied = bool(model_config.get("tie_word_embeddings", False))
    shapes: dict[str, tuple[int, ...]] = {name: (vocab, hidden) for name in (EMBEDDING, LM_HEAD)}
    shapes[FINAL_NORM] = (hidden,)
    if tied:
        del shapes[LM_HEAD]
    return shapes


def _layer_shapes(model_config: dict, index: int) -> dict[str, tuple[int, ...]]:
    biased = {
        name for name in LINEARS if model_config.get("attention_bias" if name.startswith("self_attn") else "mlp_bias")
    }
    linears = linear_shapes(model_config)
    shapes = {linear_weight_name(index, name): shape for name, shape in linears.items()}
    # attention_bias / mlp_bias (structured pruning's bias compensation writes them): one per output row
    shapes.update({f"{layer_prefix(index)}{name}.bias": (linears[name][0],) for name in biased})
    shapes.update({f"{layer_prefix(index)}{norm}.weight": (model_config["hidden_size"],) for norm in NORMS})
    return shapes


def rest_tensor_names(tied: bool) -> list[str]:
    """The tensors outside the decoder layers; a tied lm_head is the embedding and is not stored."""
    return [EMBEDDING, FINAL_NORM] + ([] if tied else [LM_HEAD])


def head_tensor_names(tied: bool) -> list[str]:
    """What the head needs: the final norm and lm_head (the embedding, when tied)."""
    return [FINAL_NORM, EMBEDDING if tied else LM_HEAD]


def decoder_layers(model: nn.Module) -> nn.ModuleList:
    return model.model.layers


def layer_linears(layer: nn.Module) -> Iterator[tuple[str, nn.Linear]]:
    for name in LINEARS:
        yield name, layer.get_submodule(name)


def decoder_linear_weights(model: nn.Module) -> dict[str, nn.Parameter]:
    """Full parameter names of every decoder-layer Linear weight (lm_head excluded, as in the paper)."""
    return {
        f"model.layers.{i}.{name}.weight": linear.weight
        for i, layer in enumerate(decoder_layers(model))
        for name, linear in layer_linears(layer)
    }


def compute_dtype(device: torch.device, weight_dtype: torch.dtype) -> torch.dtype:
    """fp32 on the CPU (some CPUs here emulate bf16 at 1% of the fp32 rate); the checkpoint's half
    precision on CUDA. Statistics, scores and gradient sums are fp32 or fp64 whatever this is."""
    if device.type == "cuda" and weight_dtype in (torch.bfloat16, torch.float16):
        return weight_dtype
    return torch.float32


def build_layer(model_config, index: int, state: dict[str, Tensor], dtype: torch.dtype) -> nn.Module:
    """A plain decoder layer holding `state` (checkpoint names of layer `index`) in `dtype`."""
    from transformers.models.llama.modeling_llama import LlamaDecoderLayer

    with torch.device("meta"):
        layer = LlamaDecoderLayer(model_config, index)
    prefix = layer_prefix(index)
    local = {name.removeprefix(prefix): t.to(dtype) for name, t in state.items()}
    layer.load_state_dict(local, assign=True, strict=True)
    return layer.eval().requires_grad_(False)


class _Captured(Exception):
    pass


class Stem:
    """Embeddings up to the input of decoder layer 0, run by transformers' own LlamaModel so the keyword
    arguments (rotary position_embeddings, masks, position ids) are exactly what the layers expect. Only the
    embedding is real; the decoder layers stay on the meta device and are never run."""

    def __init__(self, model_config, embedding: Tensor, dtype: torch.dtype):
        from transformers import LlamaForCausalLM

        with torch.device("meta"):
            self.model = LlamaForCausalLM(model_config).model
        self.model.embed_tokens.weight = nn.Parameter(embedding.to(dtype), requires_grad=False)
        _rebuild_rotary(self.model, embedding.device)

    @torch.no_grad()
    def __call__(self, tokens: Tensor) -> tuple[Tensor, dict[str, Any]]:
        """Layer 0's hidden states (B, T, hidden) and keyword arguments for a (B, T) token batch."""
        captured: dict[str, Any] = {}

        def catch(_module: nn.Module, args: tuple, kwargs: dict) -> None:
            captured["hidden"] = args[0] if args else kwargs.pop("hidden_states")
            captured["kwargs"] = dict(kwargs)
            raise _Captured

        handle = self.model.layers[0].register_forward_pre_hook(catch, with_kwargs=True)
        try:
            self.model(input_ids=tokens.to(self.model.embed_tokens.weight.device), use_cache=False)
        except _Captured:
            pass
        finally:
            handle.remove()
        return captured["hidden"], captured["kwargs"]


def _rebuild_rotary(model: nn.Module, device: torch.device) -> None:
    """inv_freq is a non-persistent buffer: construct the rotary module afresh (on the CPU) from its config."""
    rotary = model.rotary_emb
    fresh = type(rotary)(rotary.config)
    for name, buffer in fresh.named_buffers():
        setattr(rotary, name, buffer.to(device))


class Head:
    """Final RMSNorm and lm_head, applied to the last decoder layer's output."""

    def __init__(self, model_config, rest: dict[str, Tensor], dtype: torch.dtype, device: torch.device):
        """`rest`: the tensors outside the decoder layers, by checkpoint name (a tied head is the embedding)."""
        self.eps = model_config.rms_norm_eps
        self.norm_weight = rest[FINAL_NORM].to(device, dtype)
        self.head_weight = rest[LM_HEAD if LM_HEAD in rest else EMBEDDING].to(device, dtype)

    def logits(self, hidden: Tensor) -> Tensor:
        """(B, T, vocab) in fp32; the norm computes in fp32 as LlamaRMSNorm does."""
        x = hidden.float()
        x = x * torch.rsqrt(x.square().mean(-1, keepdim=True) + self.eps)
        x = self.norm_weight * x.to(hidden.dtype)
        return (x @ self.head_weight.T).float()

    def nll(self, hidden: Tensor, tokens: Tensor) -> Tensor:
        """Per-sequence summed next-token negative log-likelihood, (B,), fp32."""
        logits = self.logits(hidden)[:, :-1]
        targets = tokens[:, 1:].to(logits.device)
        losses = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1), reduction="none")
        return losses.view(targets.shape).sum(dim=1)
