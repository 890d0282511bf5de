"""Qwen2 and Qwen2.5: LLaMA's layer with a bias on q, k and v (always)."""

from .family import Family

QWEN2 = Family(
    "qwen2",
    "transformers.models.qwen2.modeling_qwen2",
    "Qwen2ForCausalLM",
    "Qwen2DecoderLayer",
    biases=lambda config: ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"),
)
