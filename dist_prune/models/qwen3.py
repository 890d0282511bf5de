"""Qwen3 (dense): LLaMA's layer with an RMSNorm over each head of q and of k."""

from .family import Family

QWEN3 = Family(
    "qwen3",
    "transformers.models.qwen3.modeling_qwen3",
    "Qwen3ForCausalLM",
    "Qwen3DecoderLayer",
    head_norms=("q_norm", "k_norm"),
)
