"""Mistral: LLaMA's layer; a sliding window of attention where its config sets one (transformers' masks)."""

from .family import Family

MISTRAL = Family(
    "mistral",
    "transformers.models.mistral.modeling_mistral",
    "MistralForCausalLM",
    "MistralDecoderLayer",
    biases=lambda config: (),
)
