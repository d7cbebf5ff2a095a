"""Compression of pretrained attention heads to a budget.

families/   one adapter per model family (the only place that knows module paths and layouts)
calibration what the teacher does on calibration text (typed, shared by every stage)
spec        HeadSpec / LayerPlan / Plan: shapes, costs and choices
strategies  where to cut (a registry: uniform, depth, measured, prune-heads)
reduce      building the student from the teacher and a plan (rotary pairs, value-output SVD)
distill     layer-local and end-to-end distillation
settings    CompressConfig, its presets, and the CLI flags derived from it
pipeline    compress(): the whole job; CompressionResult.save()
export      the saved folder: weights, modeling code + auto_map, tokenizer, model card
modeling_headalloc  the runtime of a compressed model (self-contained, copied into every export)
single_head the paper's single-head experiment (plain SVD path, also for BERT)
"""
