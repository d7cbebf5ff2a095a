"""Qwen3: the LLaMA layout plus a per-head RMSNorm of queries and keys over the full head width,
applied before rotary positions. Narrowing the query-key width would change every norm, so the
query-key width stays whole (`qk_reducible = False`): plans narrow the value width and remove whole
heads, both of which keep the norms exact."""

from headalloc.compression.families.base import FamilyAdapter


class Qwen3Adapter(FamilyAdapter):
    name = "Qwen3"
    model_types = ("qwen3",)
    qk_reducible = False

    def qk_norms(self, attn):
        return {"q_norm": attn.q_norm.weight.detach(), "k_norm": attn.k_norm.weight.detach()}
