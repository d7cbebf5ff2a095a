"""Model-family adapters, found by the config's `model_type`. To add a family: one file here with a
`FamilyAdapter` subclass (what differs from the LLaMA layout), its entry in `ADAPTERS`, and a test in
tests/test_families.py built from the family's own config class."""

from __future__ import annotations

from headalloc.compression.families.base import AttentionWeights, FamilyAdapter, UnsupportedModelError
from headalloc.compression.families.llama import LlamaAdapter
from headalloc.compression.families.mistral import MistralAdapter
from headalloc.compression.families.phi3 import Phi3Adapter
from headalloc.compression.families.qwen2 import Qwen2Adapter
from headalloc.compression.families.qwen3 import Qwen3Adapter

ADAPTERS: dict[str, FamilyAdapter] = {t: a() for a in (LlamaAdapter, MistralAdapter, Qwen2Adapter, Qwen3Adapter,
                                                        Phi3Adapter) for t in a.model_types}


def supported() -> str:
    return ", ".join(f"{a.name} ({t})" for t, a in ADAPTERS.items())


def adapter_for(model_or_config) -> FamilyAdapter:
    """The adapter for a model or config, checked; UnsupportedModelError names the supported families."""
    cfg = getattr(model_or_config, "config", model_or_config)
    mt = getattr(cfg, "model_type", None)
    if mt == "headalloc":
        raise UnsupportedModelError("this model was already compressed by headalloc; compress the original model "
                                    "(its base is named in the folder's README.md and headalloc.json)")
    if mt not in ADAPTERS:
        raise UnsupportedModelError(f"model type {mt!r} is not supported for compression; supported families: "
                                    f"{supported()}. (BERT/GPT-2 heads: headalloc.probe.single_head.)")
    adapter = ADAPTERS[mt]
    adapter.check(cfg)
    return adapter


__all__ = ["ADAPTERS", "AttentionWeights", "FamilyAdapter", "UnsupportedModelError", "adapter_for", "supported"]
