"""Evaluation: perplexity, counts, KV-cache bytes, FLOPs and measured speed."""
