"""Qwen2 / Qwen2.5: the LLaMA layout with biases on the query, key and value projections (none on
the output). The reducer carries the biases into the student: the kept rows of the q/k biases, and
the value bias through the same data-aware SVD as the value weights (as an extra input column)."""

from headalloc.compression.families.base import FamilyAdapter


class Qwen2Adapter(FamilyAdapter):
    name = "Qwen2"
    model_types = ("qwen2",)
