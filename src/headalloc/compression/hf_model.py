"""A Hugging Face LLaMA-family model whose layers have their own head counts and head dimensions.

`HeadallocLlamaConfig` (model_type "headalloc_llama") extends `LlamaConfig` with one entry per
layer in `attn_layers`:
    {"n_kv_heads": g, "n_rep": r, "qk_dim": k, "v_dim": v, "rope_pairs": [[j, ...] per kv head],
     "scale": s}
- query heads = g * r (r query heads share each key-value head: grouped-query attention);
- `rope_pairs[i]` are the rotary frequency pairs kept by kv head i (k/2 of the teacher's
  head_dim/2 pairs); queries and keys are laid out [first halves of the kept pairs, second halves],
  so rotation acts within each kept pair exactly as in the teacher;
- `scale` stays the teacher's 1/sqrt(head_dim), so a plan that keeps everything is the teacher.
After `import headalloc`, `AutoModelForCausalLM.from_pretrained(dir)` loads it (safetensors), the
KV cache holds k- and v-dims per layer, and `generate` works.
"""

from __future__ import annotations

from typing import Callable

import torch
from torch import nn
from transformers import AutoConfig, AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS
from transformers.models.llama.modeling_llama import eager_attention_forward, rotate_half


class HeadallocLlamaConfig(LlamaConfig):
    model_type = "headalloc_llama"

    def __init__(self, attn_layers: list | None = None, headalloc_plan: dict | None = None, **kwargs):
        super().__init__(**kwargs)
        self.attn_layers = attn_layers
        self.headalloc_plan = headalloc_plan  # provenance: strategy, budget, dims per layer
        if attn_layers is not None:
            validate_attn_layers(attn_layers, self)


def validate_attn_layers(attn_layers: list, cfg) -> None:
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
    if len(attn_layers) != cfg.num_hidden_layers:
        raise ValueError(f"attn_layers has {len(attn_layers)} entries for {cfg.num_hidden_layers} layers")
    for i, a in enumerate(attn_layers):
        g, r, k, v = a["n_kv_heads"], a["n_rep"], a["qk_dim"], a["v_dim"]
        if min(g, r, k, v) < 1:
            raise ValueError(f"layer {i}: head counts and dimensions must be >= 1; got {a}")
        if k % 2:
            raise ValueError(f"layer {i}: qk_dim {k} must be even (rotary pairs)")
        pairs = a.get("rope_pairs")
        if pairs is None or len(pairs) != g or any(len(p) != k // 2 for p in pairs):
            raise ValueError(f"layer {i}: rope_pairs must list {k // 2} pairs for each of {g} kv heads")
        if any(not 0 <= j < head_dim // 2 for p in pairs for j in p):
            raise ValueError(f"layer {i}: rope pair index outside [0, {head_dim // 2})")


def identity_attn_layers(cfg: LlamaConfig) -> list[dict]:
    """The plan that keeps every head and dimension of a LLaMA config."""
    hd = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
    g = cfg.num_key_value_heads
    return [{"n_kv_heads": g, "n_rep": cfg.num_attention_heads // g, "qk_dim": hd, "v_dim": hd,
             "rope_pairs": [list(range(hd // 2))] * g, "scale": hd ** -0.5}
            for _ in range(cfg.num_hidden_layers)]


class ReducedLlamaAttention(nn.Module):
    """LLaMA attention with this layer's own kv heads, query heads per kv head, qk and v widths."""

    def __init__(self, config: HeadallocLlamaConfig, layer_idx: int):
        super().__init__()
        a = config.attn_layers[layer_idx]
        self.config, self.layer_idx = config, layer_idx
        self.n_kv, self.n_rep = a["n_kv_heads"], a["n_rep"]
        self.n_q = self.n_kv * self.n_rep
        self.qk_dim, self.v_dim = a["qk_dim"], a["v_dim"]
        self.head_dim = self.qk_dim  # read by some HF utilities
        self.num_key_value_groups = self.n_rep
        self.scaling = a["scale"]
        self.attention_dropout = config.attention_dropout
        self.is_causal = True
        self._full_head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
        self._rope_pairs = [list(p) for p in a["rope_pairs"]]
        self._rope_index: torch.Tensor | None = None  # built on first use (from_pretrained inits on "meta")
        bias = config.attention_bias
        self.q_proj = nn.Linear(config.hidden_size, self.n_q * self.qk_dim, bias=bias)
        self.k_proj = nn.Linear(config.hidden_size, self.n_kv * self.qk_dim, bias=bias)
        self.v_proj = nn.Linear(config.hidden_size, self.n_kv * self.v_dim, bias=bias)
        self.o_proj = nn.Linear(self.n_q * self.v_dim, config.hidden_size, bias=bias)
        self.decode_fast_path = True  # single-token decode without padding or kv repeat (see _decode_one)

    def rope_index(self, device) -> torch.Tensor:
        """(n_kv, qk_dim) coordinates of the teacher head kept by each kv head: pairs' first then second halves."""
        if self._rope_index is None or self._rope_index.device != device:
            pairs = torch.tensor(self._rope_pairs, dtype=torch.long, device=device)
            self._rope_index = torch.cat([pairs, pairs + self._full_head_dim // 2], dim=1)
        return self._rope_index

    def forward(self, hidden_states, position_embeddings=None, attention_mask=None, past_key_values=None,
                **kwargs):
        B, T, _ = hidden_states.shape
        q = self.q_proj(hidden_states).view(B, T, self.n_q, self.qk_dim).transpose(1, 2)
        k = self.k_proj(hidden_states).view(B, T, self.n_kv, self.qk_dim).transpose(1, 2)
        v = self.v_proj(hidden_states).view(B, T, self.n_kv, self.v_dim).transpose(1, 2)
        cos, sin = position_embeddings  # (B, T, full head_dim)
        idx = self.rope_index(cos.device)
        cos_k = cos[:, :, idx].transpose(1, 2)  # (B, n_kv, T, qk)
        sin_k = sin[:, :, idx].transpose(1, 2)
        cos_q = cos_k.repeat_interleave(self.n_rep, dim=1)
        sin_q = sin_k.repeat_interleave(self.n_rep, dim=1)
        q = q * cos_q + rotate_half(q) * sin_q
        k = k * cos_k + rotate_half(k) * sin_k
        if past_key_values is not None:
            k, v = past_key_values.update(k, v, self.layer_idx)
        if T == 1 and attention_mask is None and not self.training and self.decode_fast_path:
            return self._decode_one(q, k, v, B), None
        attention_interface: Callable = ALL_ATTENTION_FUNCTIONS.get_interface(
            self.config._attn_implementation, eager_attention_forward)
        # Fused SDPA kernels need equal query/key and value widths; with unequal widths PyTorch falls
        # back to a math kernel that is several times slower. Zero-padding the narrower side to the
        # wider one changes no logit (scale is explicit) and no output (padded value columns are cut).
        d = max(self.qk_dim, self.v_dim)
        if self.qk_dim < d:
            q, k = nn.functional.pad(q, (0, d - self.qk_dim)), nn.functional.pad(k, (0, d - self.qk_dim))
        elif self.v_dim < d:
            v = nn.functional.pad(v, (0, d - self.v_dim))
        out, weights = attention_interface(self, q, k, v, attention_mask,
                                           dropout=0.0 if not self.training else self.attention_dropout,
                                           scaling=self.scaling, **kwargs)
        out = out[..., : self.v_dim].reshape(B, T, self.n_q * self.v_dim).contiguous()
        return self.o_proj(out), weights


    def _decode_one(self, q, k, v, B: int) -> torch.Tensor:
        """One new query token against the whole cache, by kv head: (B, n_kv, n_rep, qk) @ (B, n_kv, qk, L).

        No key/value repeat for grouped queries and no padding of the cache to equal widths, so each
        decode step reads the (smaller) cache once. Kernel choice from a micro-benchmark on this CPU
        (L = 1024 and 4096): SDPA on packed queries is fastest for equal widths, two matmuls for unequal.
        """
        qg = q.reshape(B, self.n_kv, self.n_rep, self.qk_dim)  # query head h uses kv head h // n_rep
        if self.qk_dim == self.v_dim:  # the fused kernel, on kv heads directly (n_rep queries each)
            out = nn.functional.scaled_dot_product_attention(qg, k, v, scale=self.scaling)
        else:  # unequal widths: the fused kernel would need a padded copy of the cache every step
            scores = torch.matmul(qg, k.transpose(-1, -2)) * self.scaling  # (B, n_kv, n_rep, L)
            probs = torch.softmax(scores, dim=-1, dtype=torch.float32).to(v.dtype)
            out = torch.matmul(probs, v)  # (B, n_kv, n_rep, v_dim)
        return self.o_proj(out.reshape(B, 1, self.n_q * self.v_dim))


class HeadallocLlamaForCausalLM(LlamaForCausalLM):
    config_class = HeadallocLlamaConfig

    def __init__(self, config: HeadallocLlamaConfig):
        super().__init__(config)
        if config.attn_layers is None:
            config.attn_layers = identity_attn_layers(config)
        for i, layer in enumerate(self.model.layers):
            layer.self_attn = ReducedLlamaAttention(config, i)
        self.post_init()

    def kv_cache_bytes_per_token(self, dtype_bytes: int | None = None) -> int:
        """Bytes of KV cache per token: sum over layers of kv_heads * (qk_dim + v_dim) * element size."""
        b = dtype_bytes or next(self.parameters()).element_size()
        return sum(a["n_kv_heads"] * (a["qk_dim"] + a["v_dim"]) for a in self.config.attn_layers) * b


AutoConfig.register("headalloc_llama", HeadallocLlamaConfig, exist_ok=True)
AutoModelForCausalLM.register(HeadallocLlamaConfig, HeadallocLlamaForCausalLM, exist_ok=True)
