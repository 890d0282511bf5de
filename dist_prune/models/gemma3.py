"""Gemma 3 (text): four norms a layer (before and after attention and MLP; RMSNorm scales by 1 + w), norms over
each head of q and k, an embedding scaled by sqrt(hidden), sliding-window and global layers with their own
rotary embeddings and masks (the Shell records each layer's), a tied head."""

import torch
from torch import Tensor, nn

from .family import Family, setting


def _embedding_scale(module: nn.Module, config) -> dict[str, Tensor] | None:
    """The scaled embedding's factor is a buffer outside the checkpoint, and its module has no config."""
    if not isinstance(module, nn.Embedding):
        return None
    return {"embed_scale": torch.tensor(setting(config, "hidden_size") ** 0.5)}


GEMMA3 = Family(
    "gemma3_text",
    "transformers.models.gemma3.modeling_gemma3",
    "Gemma3ForCausalLM",
    "Gemma3DecoderLayer",
    norms=("input_layernorm", "post_attention_layernorm", "pre_feedforward_layernorm", "post_feedforward_layernorm"),
    head_norms=("q_norm", "k_norm"),
    fresh_buffers=_embedding_scale,
)
