"""A model family as dist_prune sees it: the names and shapes of its tensors, its decoder layer, and the model
around the layers (the stem up to layer 0's input, the head after the last layer).

Every supported family names its decoder Linears alike (`self_attn.q_proj` ... `mlp.down_proj`: LLaMA's), so
those are constants here; a family differs in its norms, its biases, its transformers classes, and what the
stem and head compute, which transformers' own modules do. A worker walks a model one decoder layer at a time
without ever building the whole model: a layer is built on the meta device and filled (`decoder_layer`); the
stem and head run in a `Shell`, the family's own model with recorders in place of its decoder layers.
"""

import importlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

EMBEDDING = "model.embed_tokens.weight"
FINAL_NORM = "model.norm.weight"
LM_HEAD = "lm_head.weight"
LAYERS_PREFIX = "model.layers."

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
# The Linears that read each input, in pruning order (q/k/v, o, gate/up, down): pruned as one group.
INPUT_GROUPS = {
    owner: tuple(name for name in LINEARS if LINEAR_INPUT_OWNER[name] == owner)
    for owner in dict.fromkeys(LINEAR_INPUT_OWNER.values())
}
ATTENTION_LINEARS = LINEARS[:4]
MLP_LINEARS = LINEARS[4:]
# How heads and channels couple across a layer (structured pruning, for families with `structured=True`): a
# head is rows of q/k/v and input columns of o_proj, an MLP channel rows of gate/up and an input column of
# down_proj. These two write back into the residual stream, their units run along input columns:
COLUMN_LINEARS = ("self_attn.o_proj", "mlp.down_proj")
QUERY_HEAD_LINEARS = ("self_attn.q_proj", "self_attn.o_proj")  # one block per query head; k/v per KV head

Config = Any  # config.json as a dict, or a transformers config object: read through `setting`


def setting(config: Config, key: str, default: Any = None) -> Any:
    value = config.get(key) if isinstance(config, dict) else getattr(config, key, None)
    return default if value is None else value


def layer_prefix(index: int) -> str:
    return f"{LAYERS_PREFIX}{index}."


def linear_weight_name(index: int, linear: str) -> str:
    """`model.layers.3.mlp.up_proj.weight`: the checkpoint name of a decoder Linear's weight."""
    return f"{layer_prefix(index)}{linear}.weight"


def head_dim(config: Config) -> int:
    return setting(config, "head_dim") or setting(config, "hidden_size") // setting(config, "num_attention_heads")


def linear_shapes(config: Config) -> dict[str, tuple[int, int]]:
    """(out, in) of every decoder Linear, from config.json alone."""
    hidden, mlp = setting(config, "hidden_size"), setting(config, "intermediate_size")
    heads = setting(config, "num_attention_heads")
    kv_heads = setting(config, "num_key_value_heads") or heads
    q, kv = heads * head_dim(config), kv_heads * head_dim(config)
    return {
        "self_attn.q_proj": (q, hidden),
        "self_attn.k_proj": (kv, hidden),
        "self_attn.v_proj": (kv, hidden),
        "self_attn.o_proj": (hidden, q),
        "mlp.gate_proj": (mlp, hidden),
        "mlp.up_proj": (mlp, hidden),
        "mlp.down_proj": (hidden, mlp),
    }


def flag_biases(config: Config) -> tuple[str, ...]:
    """LLaMA's switches (Qwen3 and Gemma 3 have the first): `attention_bias` puts a bias on q/k/v/o,
    `mlp_bias` on gate/up/down (structured pruning's bias compensation writes them)."""
    return (ATTENTION_LINEARS if setting(config, "attention_bias") else ()) + (
        MLP_LINEARS if setting(config, "mlp_bias") else ()
    )


@dataclass(frozen=True)
class Family:
    """One transformers model family.

    `norms`: each decoder layer's hidden-sized norms; `head_norms`: its head_dim-sized ones (on q and k);
    `biases(config)`: the Linears that carry a bias; `structured`: heads and channels are coupled as in LLaMA
    and the smaller model can be written (structured pruning)."""

    model_type: str
    module: str  # the transformers module holding the classes
    causal_lm: str
    decoder_layer_class: str
    norms: tuple[str, ...] = ("input_layernorm", "post_attention_layernorm")
    head_norms: tuple[str, ...] = ()
    biases: Callable[[Config], tuple[str, ...]] = flag_biases
    structured: bool = False
    fresh_buffers: Callable[[nn.Module, Config], dict[str, Tensor]] | None = field(default=None, compare=False)

    # -- names and shapes, from config.json alone

    def layer_shapes(self, config: Config, index: int) -> dict[str, tuple[int, ...]]:
        """Every tensor of decoder layer `index` with its shape."""
        prefix, linears = layer_prefix(index), linear_shapes(config)
        shapes = {linear_weight_name(index, name): shape for name, shape in linears.items()}
        shapes.update({f"{prefix}{name}.bias": (linears[name][0],) for name in self.biases(config)})
        shapes.update({f"{prefix}{norm}.weight": (setting(config, "hidden_size"),) for norm in self.norms})
        shapes.update({f"{prefix}self_attn.{norm}.weight": (head_dim(config),) for norm in self.head_norms})
        return shapes

    def layer_tensor_names(self, config: Config, index: int) -> list[str]:
        return list(self.layer_shapes(config, index))

    def rest_shapes(self, config: Config) -> dict[str, tuple[int, ...]]:
        """The tensors outside the decoder layers; a tied lm_head is the embedding and is not stored."""
        hidden, vocab = setting(config, "hidden_size"), setting(config, "vocab_size")
        shapes = {EMBEDDING: (vocab, hidden), FINAL_NORM: (hidden,)}
        if not tied(config):
            shapes[LM_HEAD] = (vocab, hidden)
        return shapes

    def expected_shapes(self, config: Config) -> dict[str, tuple[int, ...]]:
        """Every tensor the checkpoint must hold, with its shape."""
        return dict(self.iter_expected_shapes(config))

    def iter_expected_shapes(self, config: Config) -> Iterator[tuple[str, tuple[int, ...]]]:
        """The same, one at a time, outside the layers first: a check can stop at the first one missing before
        a config.json claiming a billion layers has them all listed."""
        yield from self.rest_shapes(config).items()
        for index in range(setting(config, "num_hidden_layers")):
            yield from self.layer_shapes(config, index).items()

    def head_tensor_names(self, config: Config) -> list[str]:
        """What the head needs: the final norm and lm_head (the embedding, when tied)."""
        return [FINAL_NORM, EMBEDDING if tied(config) else LM_HEAD]

    # -- modules

    def classes(self) -> tuple[type, type]:
        """(the causal LM class, the decoder layer class) of transformers."""
        module = importlib.import_module(self.module)
        return getattr(module, self.causal_lm), getattr(module, self.decoder_layer_class)

    def transformers_config(self, config: dict):
        """The transformers config object of a config.json (already read and checked)."""
        from transformers import AutoConfig

        return AutoConfig.for_model(**config)

    def decoder_layer(self, config, index: int, state: dict[str, Tensor], dtype: torch.dtype) -> nn.Module:
        """A plain decoder layer holding `state` (checkpoint names of layer `index`) in `dtype`."""
        _, layer_class = self.classes()
        with torch.device("meta"):
            layer = layer_class(config, index)
        prefix = layer_prefix(index)
        local = {name.removeprefix(prefix): t.to(dtype) for name, t in state.items()}
        layer.load_state_dict(local, assign=True, strict=True)
        return layer.eval().requires_grad_(False)


def tied(config: Config) -> bool:
    return bool(setting(config, "tie_word_embeddings", False))


def layer_output(out) -> Tensor:
    """A decoder layer's hidden states (some transformers versions return them in a tuple)."""
    return out[0] if isinstance(out, tuple) else out


def decoder_layers(model: nn.Module) -> nn.ModuleList:
    """The decoder layers of a whole causal LM of any supported family."""
    return model.model.layers


def rebuild_unsaved_buffers(model: nn.Module, family: Family, device) -> None:
    """Buffers a checkpoint does not hold (rotary inv_freq, Gemma's embedding scale) are garbage in a model
    built on the meta device: make them afresh on the CPU, by the family's rule or from the owning module's
    config, and move them to `device`."""
    for module in model.modules():
        persistent = module.state_dict(keep_vars=True).keys()
        unsaved = [name for name, _ in module.named_buffers(recurse=False) if name not in persistent]
        if not unsaved:
            continue
        fresh = family.fresh_buffers(module, model.config) if family.fresh_buffers else None
        if fresh is None:
            fresh = dict(type(module)(module.config).named_buffers(recurse=False))
        for name in unsaved:
            setattr(module, name, fresh[name].to(device))


class _Captured(Exception):
    pass


class _Recorder(nn.Module):
    """Stands in for a decoder layer: records the keyword arguments the model hands it (and, at layer 0, the
    hidden states); the last one stops the model before its final norm."""

    def __init__(self, index: int, last: int, sink: list):
        super().__init__()
        self.index, self.last, self.sink = index, last, sink

    def forward(self, hidden_states: Tensor, **kwargs) -> Tensor:
        if self.index == 0:
            self.sink.append(hidden_states)
        self.sink.append(kwargs)
        if self.index == self.last:
            raise _Captured
        return hidden_states


class Shell:
    """The family's model around its decoder layers, built on the meta device with the tensors outside the
    layers that are given (`rest`, checkpoint names) made real: `stem(tokens)` (needs the embedding) gives
    layer 0's hidden states and the keyword arguments of every layer, exactly what the model hands its layers
    (rotary position embeddings, masks: Gemma 3's sliding-window layers get their own); `logits(hidden)`
    (needs the final norm and lm_head, or the tied embedding) applies the final norm and lm_head."""

    def __init__(self, family: Family, config, rest: dict[str, Tensor], dtype: torch.dtype, device):
        causal_lm, _ = family.classes()
        with torch.device("meta"):
            self.lm = causal_lm(config)
        self.config, self.device = config, torch.device(device)
        self._recorded: list = []
        last = config.num_hidden_layers - 1
        self.lm.model.layers = nn.ModuleList(_Recorder(i, last, self._recorded) for i in range(last + 1))
        places = {EMBEDDING: self.lm.model.embed_tokens, FINAL_NORM: self.lm.model.norm, LM_HEAD: self.lm.lm_head}
        for name, tensor in rest.items():
            places[name].weight = nn.Parameter(tensor.to(self.device, dtype), requires_grad=False)
        if EMBEDDING in rest and tied(config):
            self.lm.lm_head.weight = self.lm.model.embed_tokens.weight
        rebuild_unsaved_buffers(self.lm, family, self.device)

    @torch.no_grad()
    def stem(self, tokens: Tensor) -> tuple[Tensor, list[dict[str, Any]]]:
        """Layer 0's hidden states (B, T, hidden) for a (B, T) token batch, and each layer's keyword arguments."""
        self._recorded.clear()
        try:
            self.lm.model(input_ids=tokens.to(self.device), use_cache=False)
        except _Captured:
            pass
        hidden, *kwargs = self._recorded
        self._recorded.clear()
        return hidden, kwargs

    def logits(self, hidden: Tensor) -> Tensor:
        """(B, T, vocab) in fp32, with the family's final-logit soft cap where it has one."""
        logits = self.lm.lm_head(self.lm.model.norm(hidden)).float()
        cap = setting(self.config, "final_logit_softcapping")
        return torch.tanh(logits / cap) * cap if cap else logits

    def nll(self, hidden: Tensor, tokens: Tensor) -> Tensor:
        """Per-sequence summed next-token negative log-likelihood, (B,), fp32."""
        logits = self.logits(hidden)[:, :-1]
        targets = tokens[:, 1:].to(logits.device)
        losses = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1), reduction="none")
        return losses.view(targets.shape).sum(dim=1)
