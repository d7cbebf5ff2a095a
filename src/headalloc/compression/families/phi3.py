"""Phi-3: one fused query-key-value projection `qkv_proj` (rows: all query heads, then key heads,
then value heads), no biases; whole-head rotary only (partial rotary is refused by `check`)."""

import torch

from headalloc.compression.families.base import AttentionWeights, FamilyAdapter


class Phi3Adapter(FamilyAdapter):
    name = "Phi-3"
    model_types = ("phi3",)

    @torch.no_grad()
    def weights(self, model, layer: int) -> AttentionWeights:
        a = self.attention(model, layer)
        cfg = model.config
        hd = self.head_dim(cfg)
        nq, nkv = self.n_heads(cfg) * hd, self.n_kv_heads(cfg) * hd
        w = a.qkv_proj.weight.detach()
        if w.shape[0] != nq + 2 * nkv:
            raise ValueError(f"Phi-3 layer {layer}: qkv_proj has {w.shape[0]} rows, expected {nq + 2 * nkv}")
        return AttentionWeights(q=w[:nq], k=w[nq:nq + nkv], v=w[nq + nkv:], o=a.o_proj.weight.detach(),
                                scale=float(a.scaling))
