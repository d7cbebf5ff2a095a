"""LLaMA family (Llama 2/3 incl. llama3 rope scaling, SmolLM2): separate q/k/v/o projections,
biases when `attention_bias`, rotate-half rotary embeddings over the whole head."""

from headalloc.compression.families.base import FamilyAdapter


class LlamaAdapter(FamilyAdapter):
    name = "LLaMA"
    model_types = ("llama",)
