"""Probing pretrained models: attention capture and the softmax-saturation measurement."""

from headalloc.probe.attention import AttentionProbe, capture_attentions

__all__ = ["AttentionProbe", "capture_attentions"]
