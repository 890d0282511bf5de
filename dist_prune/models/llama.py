"""LLaMA 1, 2 and 3 (Llama 3's rope scaling is transformers' business), SmolLM2, and the structured outputs of
dist_prune (`attention_bias` / `mlp_bias` from bias compensation)."""

from .family import Family

LLAMA = Family(
    "llama", "transformers.models.llama.modeling_llama", "LlamaForCausalLM", "LlamaDecoderLayer", structured=True
)
