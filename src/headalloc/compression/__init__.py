"""Compression of pretrained attention heads to a budget.

The stages of `headalloc.compress` (pipeline.py), in order, and where each lives:

settings     CompressConfig: one small dataclass per stage, its presets, the CLI flags derived from it
families/    one adapter per model family (the only place that knows module paths and layouts)
fit_text     the text the student is fitted on (corpus windows, the original's samples, other texts)
calibration  what the teacher does on calibration text (second moments, layer inputs; data only)
workspace    what runs on one teacher and fitting text share: calibration, measurements, teacher targets
planning/    where to cut: the strategy registry, typed options and measurements, the knapsack, estimates
spec         HeadSpec / LayerPlan / Plan: shapes, costs and choices; targets: what a runtime can run
reduce/      building the student from the teacher and a plan (rotary pairs, SVDs, latents, factorisations)
distill      layer-local and end-to-end distillation
report       the typed report of a run and its one summary formatter
export/      the saved folder (Hugging Face) and GGUF for llama.cpp; engine: running a GGUF in llama.cpp
modeling_headalloc  the runtime of a compressed model (self-contained, copied into every export)
"""
