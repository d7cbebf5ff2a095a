"""Compression of pretrained attention heads."""
