"""Mistral: the LLaMA layout without biases; sliding-window attention is kept by the student
(the decoder's own masks; the student's decode path honours the window)."""

from headalloc.compression.families.base import FamilyAdapter


class MistralAdapter(FamilyAdapter):
    name = "Mistral"
    model_types = ("mistral",)
