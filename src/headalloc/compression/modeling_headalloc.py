"""A causal LM whose attention layers have their own head counts and head widths (headalloc).

This file is self-contained (it imports only torch and transformers): `headalloc compress` copies it
into every saved model folder and points `config.json`'s `auto_map` at it, so

    AutoModelForCausalLM.from_pretrained(folder, trust_remote_code=True)

loads a compressed model in a process where headalloc is not installed.

The model is the original family's own decoder (`AutoModel.from_config(config.text_config)`: its
embeddings, MLPs, norms, rotary embedding with any scaling, masks and sliding windows) with each
layer's `self_attn` replaced by `ReducedAttention`, described by one entry of `config.attn_layers`:

    {"n_kv_heads": g, "n_rep": r, "qk_dim": k, "v_dim": v, "rope_pairs": [[j, ...] per kv head],
     "scale": s, "bias": {"q": bool, "k": bool, "v": bool, "o": bool}, "qk_norm": bool}

- query heads = g * r (r query heads share each key-value head: grouped-query attention);
- `rope_pairs[i]` are the rotary frequency pairs kept by kv head i (k/2 of the original head_dim/2
  pairs, rotate-half convention); queries and keys are laid out [first halves of the kept pairs,
  second halves], so rotation acts within each kept pair exactly as in the original;
- `scale` stays the original 1/sqrt(head_dim), so a plan that keeps everything is the original;
- `qk_norm` (Qwen3): per-head RMSNorm of queries and keys over the full head width before rotary,
  so it requires k = head_dim with every pair kept (checked);
- `"kind": "palu"` with `rank_k`, `rank_v` (`LatentAttention`): every head kept at full width, keys and
  values through rank-r latents (Palu-style); the cache holds the latents (rank_k + rank_v entries per
  token) and the keys are rebuilt from them, then rotated, at every step;
- `"kind": "mla"` with `rank` and `rope_pairs` (`MLAAttention`, MHA2MLA-style): per kv head the kept
  rotary pairs keep their rotation (cached as keys), the rest of each key loses it and comes, with the
  values, from one joint latent of rank `rank` (cached): 2 * pairs * kv heads + rank entries per token;
- `rank_q` / `rank_o` (any kind; 0 or absent: dense): the query / output projection factorised through a
  rank-r bottleneck (`LowRankLinear`: `down` then `up`, the bias on `up`); parameters only, the heads,
  the cache and the attention itself are unchanged; `o_groups` > 1 with `rank_o`: the output projection's
  `down` is block-diagonal (`BlockDown`), each kv group's head outputs through their own rank_o / o_groups
  directions, `up` shared;
- `n_kv_heads = n_rep = 0` (and no rope pairs): a layer without attention, which adds nothing to the
  residual stream and caches one placeholder element per token (transformers reads a layer's cached
  length off its keys).
The KV cache holds this layer's k and v widths, so its size follows the plan.
"""

from __future__ import annotations

import torch
from torch import nn
from transformers import AutoConfig, AutoModel, GenerationMixin, PreTrainedModel

try:  # transformers >= 5
    from transformers import PreTrainedConfig as _BaseConfig
except ImportError:  # pragma: no cover - transformers 4.x
    from transformers import PretrainedConfig as _BaseConfig
from transformers.modeling_outputs import CausalLMOutputWithPast
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

# transformers 5.24 renamed the key/value cache argument and output field `past_key_values` -> `cache`
# (the decoder layers pass `cache=` to attention). Both names are taken here; the installed version's
# name is the one passed on and returned.
CACHE_NAME = "cache" if "cache" in CausalLMOutputWithPast.__dataclass_fields__ else "past_key_values"


def _cache_arg(past_key_values, kwargs: dict):
    """The cache object, whichever name it came under (removed from kwargs)."""
    cache = kwargs.pop("cache", None)
    return cache if cache is not None else past_key_values

MODEL_TYPE = "headalloc"


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    h = x.shape[-1] // 2
    return torch.cat((-x[..., h:], x[..., :h]), dim=-1)


def full_head_dim(cfg) -> int:
    return getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads


def validate_attn_layers(attn_layers: list, text_config) -> None:
    """Clear errors for a malformed per-layer spec (a corrupt or hand-edited config.json)."""
    head_dim = full_head_dim(text_config)
    if len(attn_layers) != text_config.num_hidden_layers:
        raise ValueError(f"attn_layers has {len(attn_layers)} entries for {text_config.num_hidden_layers} layers")
    for i, a in enumerate(attn_layers):
        g, r, k, v = a["n_kv_heads"], a["n_rep"], a["qk_dim"], a["v_dim"]
        if g == 0 and r == 0 and not a.get("rope_pairs") and not any((a.get("bias") or {}).values()):
            continue  # a layer without attention
        if a.get("kind", "heads") not in ("heads", "palu", "mla"):
            raise ValueError(f"layer {i}: unknown attention kind {a.get('kind')!r} (heads, palu, mla)")
        for name in ("rank_q", "rank_o"):
            rank = a.get(name, 0) or 0
            if not isinstance(rank, int) or isinstance(rank, bool) or rank < 0:
                raise ValueError(f"layer {i}: {name} must be an integer >= 0 (0: a dense projection); got {rank!r}")
        og = a.get("o_groups", 0) or 0
        if not isinstance(og, int) or isinstance(og, bool) or og < 0:
            raise ValueError(f"layer {i}: o_groups must be an integer >= 0 (0 or 1: one down factor); got {og!r}")
        if og > 1 and ((a.get("rank_o") or 0) % og or (g * r * v) % og):
            raise ValueError(f"layer {i}: o_groups {og} must divide rank_o ({a.get('rank_o')}) and the head outputs' "
                             f"width ({g * r * v})")
        if a.get("kind") == "mla":
            pairs = a.get("rope_pairs")
            if not (1 <= a.get("rank", 0) <= g * (k + v)) or pairs is None or len(pairs) != g \
                    or len({len(p) for p in pairs}) != 1 or k != head_dim:
                raise ValueError(f"layer {i}: an mla layer needs rank in [1, {g * (k + v)}], full width and the same "
                                 f"number of kept rotary pairs for each of {g} kv heads; got {a}")
            continue
        if a.get("kind") == "palu" and not (1 <= a.get("rank_k", 0) <= g * k and 1 <= a.get("rank_v", 0) <= g * v):
            raise ValueError(f"layer {i}: latent ranks must be in [1, kv heads x width]; got {a}")
        if min(g, r, k, v) < 1:
            raise ValueError(f"layer {i}: head counts and dimensions must be >= 1; got {a}")
        if k % 2:
            raise ValueError(f"layer {i}: qk_dim {k} must be even (rotary pairs)")
        pairs = a.get("rope_pairs")
        if pairs is None or len(pairs) != g or any(len(p) != k // 2 for p in pairs):
            raise ValueError(f"layer {i}: rope_pairs must list {k // 2} pairs for each of {g} kv heads")
        if any(not 0 <= j < head_dim // 2 for p in pairs for j in p):
            raise ValueError(f"layer {i}: rope pair index outside [0, {head_dim // 2})")
        if a.get("qk_norm") and (k != head_dim or any(list(p) != list(range(head_dim // 2)) for p in pairs)):
            raise ValueError(f"layer {i}: per-head q/k normalisation needs the full query-key width {head_dim} "
                             f"with every rotary pair kept; got qk_dim={k}")


class HeadallocConfig(_BaseConfig):
    """The original model's config (`text_config`) plus one attention spec per layer (`attn_layers`)."""

    model_type = MODEL_TYPE
    sub_configs = {"text_config": AutoConfig}

    def __init__(self, text_config=None, attn_layers: list | None = None, headalloc_plan: dict | None = None,
                 **kwargs):
        if isinstance(text_config, dict):
            text_config = AutoConfig.for_model(**text_config)
        self.text_config = text_config
        self.attn_layers = attn_layers
        self.headalloc_plan = headalloc_plan  # provenance: strategy, budget, per-layer choice
        if text_config is not None:
            kwargs.setdefault("tie_word_embeddings", bool(getattr(text_config, "tie_word_embeddings", False)))
            if attn_layers is not None:
                validate_attn_layers(attn_layers, text_config)
        super().__init__(**kwargs)

    def get_text_config(self, *args, **kwargs):
        return self.text_config


class RMSNorm(nn.Module):
    """x / rms(x) * weight, computed in float32 (as LLaMA-family models do)."""

    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dtype = x.dtype
        x = x.float()
        x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x.to(dtype)


class BlockDown(nn.Module):
    """A block-diagonal linear map (no bias): the input's `groups` consecutive blocks, each through its own
    (rank / groups, in / groups) matrix, the results concatenated. `weight`: (groups, rank / groups, in / groups)."""

    def __init__(self, in_features: int, rank: int, groups: int):
        super().__init__()
        self.groups = groups
        self.weight = nn.Parameter(torch.empty(groups, rank // groups, in_features // groups))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.einsum("...gi,gri->...gr", x.unflatten(-1, (self.groups, -1)), self.weight).flatten(-2)


class LowRankLinear(nn.Module):
    """A linear map through a rank-r bottleneck: up(down(x)) (the bias, if any, on `up`); with groups > 1 `down`
    is block-diagonal (`BlockDown`)."""

    def __init__(self, in_features: int, rank: int, out_features: int, bias: bool, groups: int = 1):
        super().__init__()
        self.down = BlockDown(in_features, rank, groups) if groups > 1 else nn.Linear(in_features, rank, bias=False)
        self.up = nn.Linear(rank, out_features, bias=bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.up(self.down(x))


def _projection(in_features: int, out_features: int, bias: bool, rank: int, groups: int = 1) -> nn.Module:
    return LowRankLinear(in_features, rank, out_features, bias, groups) if rank else \
        nn.Linear(in_features, out_features, bias=bias)


class ReducedAttention(nn.Module):
    """Attention with this layer's own kv heads, query heads per kv head, qk and v widths."""

    def __init__(self, text_config, spec: dict, layer_idx: int):
        super().__init__()
        self.config, self.layer_idx = text_config, layer_idx
        self.spec = spec
        self.n_kv, self.n_rep = spec["n_kv_heads"], spec["n_rep"]
        self.n_q = self.n_kv * self.n_rep
        self.qk_dim, self.v_dim = spec["qk_dim"], spec["v_dim"]
        self.head_dim = self.qk_dim  # read by some transformers utilities
        self.num_key_value_groups = self.n_rep
        self.scaling = spec["scale"]
        self.attention_dropout = float(getattr(text_config, "attention_dropout", 0.0) or 0.0)
        self.is_causal = True
        layer_types = getattr(text_config, "layer_types", None)
        sliding = layer_types is not None and layer_types[layer_idx] == "sliding_attention"
        self.sliding_window = getattr(text_config, "sliding_window", None) if sliding else None
        self._full_head_dim = full_head_dim(text_config)
        self._rope_pairs = [list(p) for p in spec["rope_pairs"]]
        self._rope_index: torch.Tensor | None = None  # built on first use (from_pretrained inits on "meta")
        bias = spec.get("bias") or {}
        hidden = text_config.hidden_size
        self.decode_fast_path = True  # single-token decode without padding or kv repeat (see _decode_one)
        if self.n_kv == 0:  # no attention in this layer
            self.q_proj = self.k_proj = self.v_proj = self.o_proj = self.q_norm = self.k_norm = None
            return
        self.q_proj = _projection(hidden, self.n_q * self.qk_dim, bool(bias.get("q")), spec.get("rank_q") or 0)
        self.k_proj = nn.Linear(hidden, self.n_kv * self.qk_dim, bias=bool(bias.get("k")))
        self.v_proj = nn.Linear(hidden, self.n_kv * self.v_dim, bias=bool(bias.get("v")))
        self.o_proj = _projection(self.n_q * self.v_dim, hidden, bool(bias.get("o")), spec.get("rank_o") or 0,
                                  spec.get("o_groups") or 1)
        if spec.get("qk_norm"):
            eps = getattr(text_config, "rms_norm_eps", 1e-6)
            self.q_norm, self.k_norm = RMSNorm(self.qk_dim, eps), RMSNorm(self.qk_dim, eps)
        else:
            self.q_norm = self.k_norm = None

    def rope_index(self, device) -> torch.Tensor:
        """(n_kv, qk_dim) coordinates of the original head kept by each kv head: pairs' first then second halves."""
        if self._rope_index is None or self._rope_index.device != device:
            pairs = torch.tensor(self._rope_pairs, dtype=torch.long, device=device)
            self._rope_index = torch.cat([pairs, pairs + self._full_head_dim // 2], dim=1)
        return self._rope_index

    def qkv(self, hidden_states: torch.Tensor, position_embeddings) -> tuple[torch.Tensor, ...]:
        """Rotated queries (B, n_q, T, qk), keys (B, n_kv, T, qk) and values (B, n_kv, T, v)."""
        B, T, _ = hidden_states.shape
        q = self.q_proj(hidden_states).view(B, T, self.n_q, self.qk_dim)
        k = self.k_proj(hidden_states).view(B, T, self.n_kv, self.qk_dim)
        v = self.v_proj(hidden_states).view(B, T, self.n_kv, self.v_dim).transpose(1, 2)
        if self.q_norm is not None:
            q, k = self.q_norm(q), self.k_norm(k)
        q, k = q.transpose(1, 2), k.transpose(1, 2)
        cos, sin = position_embeddings  # (B, T, full head_dim)
        idx = self.rope_index(cos.device)
        cos_k = cos[:, :, idx].transpose(1, 2).to(q.dtype)  # (B, n_kv, T, qk)
        sin_k = sin[:, :, idx].transpose(1, 2).to(q.dtype)
        cos_q = cos_k.repeat_interleave(self.n_rep, dim=1)
        sin_q = sin_k.repeat_interleave(self.n_rep, dim=1)
        return q * cos_q + rotate_half(q) * sin_q, k * cos_k + rotate_half(k) * sin_k, v

    def forward(self, hidden_states, position_embeddings=None, attention_mask=None, past_key_values=None,
                **kwargs):
        past_key_values = _cache_arg(past_key_values, kwargs)
        B, T, _ = hidden_states.shape
        if self.n_kv == 0:  # nothing to attend with
            if past_key_values is not None:  # transformers reads a layer's cached length off its keys, so one
                # placeholder element per token records it (values: none)
                past_key_values.update(hidden_states.new_zeros(B, 1, T, 1), hidden_states.new_zeros(B, 1, T, 0),
                                       self.layer_idx)
            return torch.zeros_like(hidden_states), None
        q, k, v = self.qkv(hidden_states, position_embeddings)
        if past_key_values is not None:
            k, v = past_key_values.update(k, v, self.layer_idx)
        if T == 1 and attention_mask is None and not self.training and self.decode_fast_path:
            return self._decode_one(q, k, v, B), None
        # Fused SDPA kernels need equal query/key and value widths; with unequal widths PyTorch falls
        # back to a math kernel that is several times slower. Zero-padding the narrower side to the
        # wider one changes no logit (scale is explicit) and no output (padded value columns are cut).
        d = max(self.qk_dim, self.v_dim)
        if self.qk_dim < d:
            q, k = nn.functional.pad(q, (0, d - self.qk_dim)), nn.functional.pad(k, (0, d - self.qk_dim))
        elif self.v_dim < d:
            v = nn.functional.pad(v, (0, d - self.v_dim))
        return self._attend(q, k, v, attention_mask, kwargs)

    def _attend(self, q, k, v, attention_mask, kwargs):
        """The registered attention implementation on rotated q (B, n_q, T, .), k and v (B, n_kv, S, .), then
        the output projection (value columns past v_dim are padding and are cut)."""
        B, T = q.shape[0], q.shape[2]
        attention_interface = ALL_ATTENTION_FUNCTIONS.get_interface(
            getattr(self.config, "_attn_implementation", None) or "sdpa", _eager_attention)
        kwargs.pop("sliding_window", None)
        out, weights = attention_interface(self, q, k, v, attention_mask,
                                           dropout=0.0 if not self.training else self.attention_dropout,
                                           scaling=self.scaling, sliding_window=self.sliding_window, **kwargs)
        out = out[..., : self.v_dim].reshape(B, T, self.n_q * self.v_dim).contiguous()
        return self.o_proj(out), weights

    def _decode_one(self, q, k, v, B: int) -> torch.Tensor:
        """One new query token against the whole cache, by kv head: (B, n_kv, n_rep, qk) @ (B, n_kv, qk, L).

        No key/value repeat for grouped queries and no padding of the cache to equal widths, so each
        decode step reads the (smaller) cache once. Kernel choice from a micro-benchmark on a CPU
        (L = 1024 and 4096): SDPA on packed queries is fastest for equal widths, two matmuls for unequal.
        """
        qg = q.reshape(B, self.n_kv, self.n_rep, self.qk_dim)  # query head h uses kv head h // n_rep
        if self.sliding_window is not None and k.shape[2] > self.sliding_window:
            k, v = k[:, :, -self.sliding_window:], v[:, :, -self.sliding_window:]
        if self.qk_dim == self.v_dim:
            out = nn.functional.scaled_dot_product_attention(qg, k, v, scale=self.scaling)
        else:
            scores = torch.matmul(qg, k.transpose(-1, -2)) * self.scaling  # (B, n_kv, n_rep, L)
            probs = torch.softmax(scores, dim=-1, dtype=torch.float32).to(v.dtype)
            out = torch.matmul(probs, v)  # (B, n_kv, n_rep, v_dim)
        return self.o_proj(out.reshape(B, 1, self.n_q * self.v_dim))


def _absorbed_values(probs: torch.Tensor, latent: torch.Tensor, up: nn.Linear, n_kv: int, v_dim: int) -> torch.Tensor:
    """Attention-weighted values without rebuilding them: probs (B, n_kv, n_rep, S) over cached latents
    (B, S, r) give (probs @ latent) (B, n_kv, n_rep, r), then each kv head's block of the up projection
    (v = c W_up^T + b, and the weights of one query sum to 1, so the bias is added once)."""
    pc = torch.matmul(probs.to(latent.dtype), latent[:, None])  # (B, n_kv, n_rep, r)
    w = up.weight.view(n_kv, v_dim, -1)  # (n_kv, v_dim, r)
    out = torch.einsum("bgjr,gdr->bgjd", pc, w)
    return out if up.bias is None else out + up.bias.view(1, n_kv, 1, v_dim)


class LatentAttention(ReducedAttention):
    """Palu-style attention: queries as the original; keys and values each through a low-rank latent,
    c_k = x A_k (rank_k) and c_v = x A_v (rank_v), which is what the cache holds; at every step all cached
    keys are rebuilt (c_k B_k, then their rotary positions) and values (c_v B_v). Cached tokens are taken
    to sit at consecutive positions ending at the newest (no left padding)."""

    def __init__(self, text_config, spec: dict, layer_idx: int):
        super().__init__(text_config, {**spec, "kind": "heads"}, layer_idx)
        self.spec = spec
        bias = spec.get("bias") or {}
        hidden = text_config.hidden_size
        del self.k_proj, self.v_proj
        self.rank_k, self.rank_v = spec["rank_k"], spec["rank_v"]
        self.k_down = nn.Linear(hidden, self.rank_k, bias=False)
        self.k_up = nn.Linear(self.rank_k, self.n_kv * self.qk_dim, bias=bool(bias.get("k")))
        self.v_down = nn.Linear(hidden, self.rank_v, bias=False)
        self.v_up = nn.Linear(self.rank_v, self.n_kv * self.v_dim, bias=bool(bias.get("v")))
        self.decode_fast_path = True  # one-token decode reads values in the latent (False: rebuild them)
        self._rotary = None  # the decoder's rotary embedding, set by HeadallocForCausalLM (not a submodule)

    def forward(self, hidden_states, position_embeddings=None, attention_mask=None, past_key_values=None,
                **kwargs):
        past_key_values = _cache_arg(past_key_values, kwargs)
        B, T, _ = hidden_states.shape
        q = self.q_proj(hidden_states).view(B, T, self.n_q, self.qk_dim).transpose(1, 2)
        cos, sin = position_embeddings
        q = q * cos[:, None].to(q.dtype) + rotate_half(q) * sin[:, None].to(q.dtype)
        ck, cv = self.k_down(hidden_states)[:, None], self.v_down(hidden_states)[:, None]  # (B, 1, T, r)
        if past_key_values is not None:
            ck, cv = past_key_values.update(ck, cv, self.layer_idx)
        S = ck.shape[2]
        decode = T == 1 and attention_mask is None and not self.training and self.decode_fast_path
        if decode and self.sliding_window is not None and S > self.sliding_window:
            ck, cv, S = ck[:, :, -self.sliding_window:], cv[:, :, -self.sliding_window:], self.sliding_window
        k = self.k_up(ck[:, 0]).view(B, S, self.n_kv, self.qk_dim).transpose(1, 2)
        if S != T:  # rotary positions of every cached key
            if self._rotary is None:
                raise RuntimeError("LatentAttention needs the decoder's rotary embedding for cached keys")
            seen = past_key_values.get_seq_length(self.layer_idx) if past_key_values is not None else S
            pos = (torch.arange(S, device=k.device) + (seen - S))[None].expand(B, S)  # a sliding cache keeps the last S
            cos, sin = self._rotary(k, pos)
        k = k * cos[:, None].to(k.dtype) + rotate_half(k) * sin[:, None].to(k.dtype)
        if decode:  # one new token: values are read in the latent (never rebuilt), keys must be (rotary)
            qg = q.reshape(B, self.n_kv, self.n_rep, self.qk_dim)
            scores = torch.matmul(qg, k.transpose(-1, -2)) * self.scaling  # (B, n_kv, n_rep, S)
            probs = torch.softmax(scores, dim=-1, dtype=torch.float32)
            out = _absorbed_values(probs, cv[:, 0], self.v_up, self.n_kv, self.v_dim)
            return self.o_proj(out.reshape(B, 1, self.n_q * self.v_dim).to(q.dtype)), None
        v = self.v_up(cv[:, 0]).view(B, S, self.n_kv, self.v_dim).transpose(1, 2)
        return self._attend(q, k, v, attention_mask, kwargs)


class MLAAttention(ReducedAttention):
    """MHA2MLA-style attention. Queries keep the full width, laid out per head as [kept rotary pairs
    (first halves, second halves) | the other coordinates]; keys are [k_rope (rotated, cached) | k_nope =
    c W_uk (no rotation)] and values c W_uv, with c = x W_down the joint latent (cached)."""

    def __init__(self, text_config, spec: dict, layer_idx: int):
        pairs = [list(p) for p in spec["rope_pairs"]]
        every_pair = [list(range(full_head_dim(text_config) // 2))] * spec["n_kv_heads"]
        super().__init__(text_config, {**spec, "kind": "heads", "rope_pairs": every_pair}, layer_idx)
        self.spec = spec
        self._rope_pairs = pairs
        self.p2 = 2 * len(pairs[0])  # rotated coordinates per kv head
        bias = spec.get("bias") or {}
        hidden = text_config.hidden_size
        del self.k_proj, self.v_proj
        self.rank = spec["rank"]
        self.k_rope = nn.Linear(hidden, self.n_kv * self.p2, bias=bool(bias.get("k")))
        self.kv_down = nn.Linear(hidden, self.rank, bias=False)
        self.k_up = nn.Linear(self.rank, self.n_kv * (self.qk_dim - self.p2), bias=bool(bias.get("k")))
        self.v_up = nn.Linear(self.rank, self.n_kv * self.v_dim, bias=bool(bias.get("v")))
        self.decode_fast_path = True  # one-token decode in the absorbed form (False: rebuild keys and values)

    def forward(self, hidden_states, position_embeddings=None, attention_mask=None, past_key_values=None,
                **kwargs):
        past_key_values = _cache_arg(past_key_values, kwargs)
        B, T, _ = hidden_states.shape
        cos, sin = position_embeddings
        idx = self.rope_index(cos.device)  # (n_kv, 2p)
        cos_k = cos[:, :, idx].transpose(1, 2).to(hidden_states.dtype)  # (B, n_kv, T, 2p)
        sin_k = sin[:, :, idx].transpose(1, 2).to(hidden_states.dtype)
        q = self.q_proj(hidden_states).view(B, T, self.n_q, self.qk_dim).transpose(1, 2)
        qr, qn = q[..., : self.p2], q[..., self.p2:]
        cq, sq = cos_k.repeat_interleave(self.n_rep, 1), sin_k.repeat_interleave(self.n_rep, 1)
        q = torch.cat([qr * cq + rotate_half(qr) * sq, qn], -1)
        kr = self.k_rope(hidden_states).view(B, T, self.n_kv, self.p2).transpose(1, 2)
        kr = kr * cos_k + rotate_half(kr) * sin_k
        c = self.kv_down(hidden_states)[:, None]  # (B, 1, T, rank)
        if past_key_values is not None:
            kr, c = past_key_values.update(kr, c, self.layer_idx)
        S = c.shape[2]
        if T == 1 and attention_mask is None and not self.training and self.decode_fast_path:
            return self._decode_absorbed(q, kr, c[:, 0], B), None
        kn = self.k_up(c[:, 0]).view(B, S, self.n_kv, self.qk_dim - self.p2).transpose(1, 2)
        v = self.v_up(c[:, 0]).view(B, S, self.n_kv, self.v_dim).transpose(1, 2)
        k = torch.cat([kr, kn], -1)
        return self._attend(q, k, v, attention_mask, kwargs)


    def _decode_absorbed(self, q, kr, c, B: int) -> torch.Tensor:
        """One new query token, MLA's absorbed form: nothing is rebuilt from the latent c (B, S, rank). The
        non-rotary query part goes through the key up projection, q_n . (c W_uk^T + b) = (q_n W_uk) . c + q_n . b,
        whose bias term is the same for every cached token and so leaves the softmax unchanged; values as
        in `_absorbed_values`. Scores: rotary part against the cached rotated keys kr plus the latent part."""
        if self.sliding_window is not None and c.shape[1] > self.sliding_window:
            kr, c = kr[:, :, -self.sliding_window:], c[:, -self.sliding_window:]
        qg = q.reshape(B, self.n_kv, self.n_rep, self.qk_dim)
        qr, qn = qg[..., : self.p2], qg[..., self.p2:]
        w_uk = self.k_up.weight.view(self.n_kv, self.qk_dim - self.p2, self.rank)
        qa = torch.einsum("bgjd,gdr->bgjr", qn, w_uk)  # (B, n_kv, n_rep, rank)
        scores = torch.matmul(qr, kr.transpose(-1, -2)) + torch.matmul(qa, c[:, None].transpose(-1, -2))
        probs = torch.softmax(scores * self.scaling, dim=-1, dtype=torch.float32)
        out = _absorbed_values(probs, c, self.v_up, self.n_kv, self.v_dim)
        return self.o_proj(out.reshape(B, 1, self.n_q * self.v_dim).to(q.dtype))


def make_attention(text_config, spec: dict, layer_idx: int) -> nn.Module:
    """The attention module a per-layer spec describes."""
    if spec.get("kind", "heads") == "palu":
        return LatentAttention(text_config, spec, layer_idx)
    if spec.get("kind", "heads") == "mla":
        return MLAAttention(text_config, spec, layer_idx)
    return ReducedAttention(text_config, spec, layer_idx)


def _eager_attention(module, query, key, value, attention_mask, scaling, dropout=0.0, **kwargs):
    """Plain softmax attention (grouped-query), the fallback when no registered implementation applies."""
    n_rep = query.shape[1] // key.shape[1]
    key, value = key.repeat_interleave(n_rep, dim=1), value.repeat_interleave(n_rep, dim=1)
    scores = torch.matmul(query, key.transpose(2, 3)) * scaling
    if attention_mask is not None:
        scores = scores + attention_mask[:, :, :, : key.shape[-2]]
    probs = torch.softmax(scores, dim=-1, dtype=torch.float32).to(query.dtype)
    probs = nn.functional.dropout(probs, p=dropout, training=module.training)
    return torch.matmul(probs, value).transpose(1, 2).contiguous(), probs


def attention_layers(decoder) -> nn.ModuleList:
    """The decoder layers of a transformers base model (`model.layers` in every supported family)."""
    return decoder.layers


class HeadallocForCausalLM(PreTrainedModel, GenerationMixin):
    config_class = HeadallocConfig
    base_model_prefix = "model"
    supports_gradient_checkpointing = True
    _supports_sdpa = True
    _supports_flash_attn = False
    _no_split_modules = ["ReducedAttention"]
    _tied_weights_keys = {"lm_head.weight": "model.embed_tokens.weight"}

    def __init__(self, config: HeadallocConfig):
        super().__init__(config)
        tc = config.text_config
        self.model = AutoModel.from_config(tc)
        if config.attn_layers is None:
            raise ValueError("a headalloc model needs config.attn_layers (one attention spec per layer)")
        for i, layer in enumerate(attention_layers(self.model)):
            layer.self_attn = make_attention(tc, config.attn_layers[i], i)
            if isinstance(layer.self_attn, LatentAttention):
                object.__setattr__(layer.self_attn, "_rotary", self.model.rotary_emb)
        self.vocab_size = tc.vocab_size
        self.lm_head = nn.Linear(tc.hidden_size, tc.vocab_size, bias=False)
        self.post_init()

    def _init_weights(self, module):
        std = getattr(self.config.text_config, "initializer_range", 0.02)
        if isinstance(module, nn.Linear):
            module.weight.data.normal_(0.0, std)
            if module.bias is not None:
                module.bias.data.zero_()
        elif isinstance(module, nn.Embedding):
            module.weight.data.normal_(0.0, std)

    def get_input_embeddings(self):
        return self.model.get_input_embeddings()

    def set_input_embeddings(self, value):
        self.model.set_input_embeddings(value)

    def get_output_embeddings(self):
        return self.lm_head

    def set_output_embeddings(self, value):
        self.lm_head = value

    def forward(self, input_ids=None, attention_mask=None, position_ids=None, past_key_values=None,
                inputs_embeds=None, labels=None, use_cache=None, logits_to_keep: int = 0, **kwargs):
        cache = _cache_arg(past_key_values, kwargs)
        out = self.model(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                         inputs_embeds=inputs_embeds, use_cache=use_cache, **{CACHE_NAME: cache}, **kwargs)
        h = out.last_hidden_state
        if isinstance(logits_to_keep, int) and logits_to_keep > 0:
            h = h[:, -logits_to_keep:]
        logits = self.lm_head(h)
        loss = None
        if labels is not None:
            loss = nn.functional.cross_entropy(logits[:, :-1].flatten(0, 1).float(), labels[:, 1:].flatten(),
                                               ignore_index=-100)
        return CausalLMOutputWithPast(loss=loss, logits=logits, **{CACHE_NAME: getattr(out, CACHE_NAME)},
                                      hidden_states=out.hidden_states, attentions=out.attentions)

    def kv_cache_bytes_per_token(self, dtype_bytes: int | None = None) -> int:
        """Bytes of KV cache per token: sum over layers of kv_heads * (qk_dim + v_dim) * element size."""
        b = dtype_bytes or next(self.parameters()).element_size()
        def entries(a):
            if a.get("kind") == "palu":
                return a["rank_k"] + a["rank_v"]
            if a.get("kind") == "mla":
                return a["n_kv_heads"] * 2 * len(a["rope_pairs"][0]) + a["rank"]
            return a["n_kv_heads"] * (a["qk_dim"] + a["v_dim"])
        return sum(entries(a) for a in self.config.attn_layers) * b
