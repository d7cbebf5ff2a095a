"""What the compression pipeline needs to know about a model family, in one place.

A `FamilyAdapter` reads a Hugging Face causal LM of its family: where the decoder layers and their
attention modules are, the head counts and head width, the rotary convention, and each layer's
attention weights split into separate query, key, value and output projections with their biases
and per-head q/k norms (`AttentionWeights`). Strategies, the reducer, calibration, distillation and
evaluation use only this interface, so adding a family is one small file (see `llama.py`) plus its
test. Adapters are found by the config's `model_type` (`families.adapter_for`).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn


class UnsupportedModelError(ValueError):
    """The model (or one of its settings) cannot be compressed by headalloc; the message says why."""


@dataclass
class AttentionWeights:
    """One layer's attention in the layout the reducer works in.

    q: (n_heads * head_dim, hidden), k and v: (n_kv_heads * head_dim, hidden), o: (hidden,
    n_heads * head_dim); query head h uses kv head h // (n_heads / n_kv_heads). Biases are None
    where the family has none. q_norm / k_norm: per-head RMSNorm weights (head_dim,) applied to
    queries and keys before rotary positions (Qwen3), else None."""

    q: torch.Tensor
    k: torch.Tensor
    v: torch.Tensor
    o: torch.Tensor
    q_bias: torch.Tensor | None = None
    k_bias: torch.Tensor | None = None
    v_bias: torch.Tensor | None = None
    o_bias: torch.Tensor | None = None
    q_norm: torch.Tensor | None = None
    k_norm: torch.Tensor | None = None
    scale: float = 1.0
    # latent (Palu-style) layers: k = k_up @ k_down, v = v_up @ v_down; then `k` / `v` above hold the up
    # projections (g*hd, rank) and these the down projections (rank, hidden)
    k_down: torch.Tensor | None = None
    v_down: torch.Tensor | None = None
    # MHA2MLA-style layers: k_rope (g*2p, hidden) rotated keys; kv_down (rank, hidden) the joint latent;
    # then `k` holds the up projection of the non-rotary key part (g*(hd-2p), rank) and `v` the value's
    kv_down: torch.Tensor | None = None
    k_rope: torch.Tensor | None = None
    k_rope_bias: torch.Tensor | None = None
    # factorised query / output projections (any kind): q = q @ q_down, o = o @ o_down; then `q` holds the up
    # projection (n_heads*qk, rank_q) and `o` (hidden, rank_o), these the down projections
    q_down: torch.Tensor | None = None
    o_down: torch.Tensor | None = None

    @property
    def bias(self) -> dict[str, bool]:
        return {"q": self.q_bias is not None, "k": self.k_bias is not None, "v": self.v_bias is not None,
                "o": self.o_bias is not None}


def _bias(linear: nn.Linear) -> torch.Tensor | None:
    return None if getattr(linear, "bias", None) is None else linear.bias.detach()


class FamilyAdapter:
    """Separate q/k/v/o projections in `model.model.layers[i].self_attn` (LLaMA layout); families that
    differ override what differs."""

    name: str = ""
    model_types: tuple[str, ...] = ()
    # False where the query-key width cannot be narrowed exactly (per-head q/k norms over the full
    # width); strategies then reduce value widths and remove heads only.
    qk_reducible: bool = True

    # -------------------------------------------------------------- config
    def check(self, cfg) -> None:
        """Raise UnsupportedModelError for settings of this family the reducer cannot keep exact."""
        factor = getattr(cfg, "partial_rotary_factor", None)
        if factor is None:
            factor = (getattr(cfg, "rope_parameters", None) or {}).get("partial_rotary_factor", 1.0)
        if factor is not None and float(factor) != 1.0:
            raise UnsupportedModelError(
                f"{self.name}: partial rotary embeddings (partial_rotary_factor={factor}) are not supported yet; "
                f"only models that rotate the whole head can be compressed")
        if self.n_heads(cfg) % self.n_kv_heads(cfg):
            raise UnsupportedModelError(f"{self.name}: {self.n_heads(cfg)} query heads do not divide into "
                                        f"{self.n_kv_heads(cfg)} key-value heads")
        if self.head_dim(cfg) % 2:
            raise UnsupportedModelError(f"{self.name}: head_dim {self.head_dim(cfg)} is odd; rotary pairs need an even width")

    def head_dim(self, cfg) -> int:
        return getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads

    def n_heads(self, cfg) -> int:
        return cfg.num_attention_heads

    def n_kv_heads(self, cfg) -> int:
        return getattr(cfg, "num_key_value_heads", None) or cfg.num_attention_heads

    def n_rep(self, cfg) -> int:
        return self.n_heads(cfg) // self.n_kv_heads(cfg)

    def n_layers(self, cfg) -> int:
        return cfg.num_hidden_layers

    def hidden_size(self, cfg) -> int:
        return cfg.hidden_size

    # -------------------------------------------------------------- modules
    def layers(self, model) -> nn.ModuleList:
        return model.model.layers

    def attention(self, model, layer: int) -> nn.Module:
        return self.layers(model)[layer].self_attn

    def input_norm(self, model, layer: int) -> nn.Module:
        """The norm applied to the residual stream before the layer's attention."""
        return self.layers(model)[layer].input_layernorm

    def embed(self, model) -> nn.Embedding:
        return model.model.embed_tokens

    def attention_key(self) -> str:
        """Substring of every state-dict key that belongs to the attention (replaced by the student's)."""
        return ".self_attn."

    # -------------------------------------------------------------- weights
    @torch.no_grad()
    def weights(self, model, layer: int) -> AttentionWeights:
        a = self.attention(model, layer)
        return AttentionWeights(q=a.q_proj.weight.detach(), k=a.k_proj.weight.detach(), v=a.v_proj.weight.detach(),
                                o=a.o_proj.weight.detach(), q_bias=_bias(a.q_proj), k_bias=_bias(a.k_proj),
                                v_bias=_bias(a.v_proj), o_bias=_bias(a.o_proj), scale=float(a.scaling),
                                **self.qk_norms(a))

    def qk_norms(self, attn: nn.Module) -> dict:
        return {}
