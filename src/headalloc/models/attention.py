"""Attention whose heads come in groups of different sizes.

A layer's allocation is a list of groups (n_heads, qk_dim, v_dim). One fused projection makes the
queries, keys and values of every group; each group then runs as one batched
`scaled_dot_product_attention` call over its n_heads heads; the concatenated outputs (width
sum n_heads * v_dim) go through one output projection back to the model width.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterable, Sequence

import torch
import torch.nn.functional as F
from torch import nn


@dataclass(frozen=True)
class HeadGroup:
    """n_heads heads with query/key width qk_dim and value width v_dim."""

    n_heads: int
    qk_dim: int
    v_dim: int

    def __post_init__(self):
        for name in ("n_heads", "qk_dim", "v_dim"):
            v = getattr(self, name)
            if not isinstance(v, int) or v < 1:
                raise ValueError(f"head group {name} must be a positive integer; got {v!r} in {self}")


def as_groups(groups: Iterable) -> tuple[HeadGroup, ...]:
    """Normalise [(n, qk, v)] / [(n, d)] / [HeadGroup] / [{"n_heads":..}] into HeadGroups."""
    out = []
    for g in groups:
        if isinstance(g, HeadGroup):
            out.append(g)
        elif isinstance(g, dict):
            out.append(HeadGroup(int(g["n_heads"]), int(g["qk_dim"]), int(g.get("v_dim", g["qk_dim"]))))
        else:
            g = tuple(int(x) for x in g)
            if len(g) == 2:
                out.append(HeadGroup(g[0], g[1], g[1]))
            elif len(g) == 3:
                out.append(HeadGroup(*g))
            else:
                raise ValueError(f"a head group is (n_heads, head_dim) or (n_heads, qk_dim, v_dim); got {g!r}")
    if not out:
        raise ValueError("an attention layer needs at least one head group")
    return tuple(out)


def split_width(width: int, n_heads: int) -> int:
    """Head dimension when `width` is shared by `n_heads` equal heads; a clear error if it does not divide."""
    if n_heads < 1 or width % n_heads:
        raise ValueError(f"width {width} does not divide into {n_heads} heads; choose a head count that divides "
                         f"{width} (divisors: {[d for d in range(1, width + 1) if width % d == 0]})")
    return width // n_heads


def rotary_cache(T: int, dim: int, base: float = 10000.0, device=None, dtype=torch.float32):
    """cos and sin tables (T, dim) for rotary embeddings in the half-split layout."""
    inv = 1.0 / (base ** (torch.arange(0, dim, 2, device=device, dtype=torch.float32) / dim))
    ang = torch.arange(T, device=device, dtype=torch.float32)[:, None] * inv[None]
    ang = torch.cat([ang, ang], dim=-1)
    return ang.cos().to(dtype), ang.sin().to(dtype)


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    rot = torch.cat([-x[..., half:], x[..., :half]], dim=-1)
    return x * cos + rot * sin


REL_BIAS = ("linear", "log")


def relative_bias(slopes: torch.Tensor, T: int, kind: str) -> torch.Tensor:
    """(H, T, T) additive scores -p_h phi(i - j) for query i and key j, with phi(x) = x ("linear",
    ALiBi-like) or log(1 + x) ("log"); the distance is |i - j| (causal layers only see j <= i)."""
    pos = torch.arange(T, device=slopes.device, dtype=slopes.dtype)
    dist = (pos[:, None] - pos[None, :]).abs()
    phi = dist if kind == "linear" else torch.log1p(dist)
    return -slopes[:, None, None] * phi


class GroupedAttention(nn.Module):
    """Multi-head attention with heterogeneous head groups (see module docstring).

    `rel_bias` ("linear" or "log"): every head adds its own learnable relative-position score
    -p_h phi(i - j) (the setting of 2510.03784's selection term, where a head picks a lag through a
    per-head positional kernel and H heads combine into a sharper pick); `dot=False` drops the
    query-key term, so heads attend by position alone."""

    def __init__(self, d_model: int, groups: Sequence, causal: bool = True, rotary: bool = False,
                 bias: bool = True, out_dim: int | None = None, rotary_base: float = 10000.0,
                 rel_bias: str | None = None, dot: bool = True):
        super().__init__()
        if rel_bias is not None and rel_bias not in REL_BIAS:
            raise ValueError(f"rel_bias must be one of {REL_BIAS} or None; got {rel_bias!r}")
        if not dot and rel_bias is None:
            raise ValueError("dot=False leaves no way to score keys: give rel_bias too")
        self.rel_bias, self.dot = rel_bias, dot
        self.groups = as_groups(groups)
        self.d_model, self.causal, self.rotary, self.rotary_base = d_model, causal, rotary, rotary_base
        if rotary:
            odd = [g for g in self.groups if g.qk_dim % 2]
            if odd:
                raise ValueError(f"rotary positions need even query/key widths; groups {odd} have odd qk_dim")
        self.q_widths = [g.n_heads * g.qk_dim for g in self.groups]
        self.v_widths = [g.n_heads * g.v_dim for g in self.groups]
        self.qk_total, self.v_total = sum(self.q_widths), sum(self.v_widths)
        self.qkv = nn.Linear(d_model, 2 * self.qk_total + self.v_total, bias=bias)
        self.out = nn.Linear(self.v_total, out_dim or d_model, bias=bias)
        if rel_bias is not None:  # per head slope p_h, spread at init so heads start at different ranges
            self.slopes = nn.ParameterList(
                [nn.Parameter(torch.linspace(-0.5, 2.0, g.n_heads) if g.n_heads > 1 else torch.ones(1) * 0.5)
                 for g in self.groups])
        # Optional observer called as score_hook(group_index, q, k) with (B, H, T, d) queries and keys
        # after positions are applied; used by the saturation probe of trained SeqModels.
        self.score_hook = None

    def forward(self, x: torch.Tensor, key_padding_mask: torch.Tensor | None = None,
                last_only: bool = False) -> torch.Tensor:
        """(B, T, d_model) -> (B, T, out_dim); with `last_only`, only the last position's output (B, 1, out_dim)
        (the same numbers as the last row of the full output, for models that read out one token)."""
        B, T, _ = x.shape
        q_all, k_all, v_all = self.qkv(x).split([self.qk_total, self.qk_total, self.v_total], dim=-1)
        Tq = T
        if last_only:
            if self.rotary or self.score_hook is not None:
                raise ValueError("last_only is not available with rotary positions or a score hook")
            q_all, Tq = q_all[:, -1:], 1
        mask = None
        if key_padding_mask is not None:  # (B, T) True = real token
            mask = key_padding_mask[:, None, None, :].to(torch.bool)
            if self.causal and not last_only:
                mask = mask & torch.ones(T, T, dtype=torch.bool, device=x.device).tril()
        causal = self.causal and not last_only  # the last query sees every key
        outs = []
        for g, q, k, v in zip(self.groups, q_all.split(self.q_widths, -1), k_all.split(self.q_widths, -1),
                              v_all.split(self.v_widths, -1)):
            q = q.view(B, Tq, g.n_heads, g.qk_dim).transpose(1, 2)
            k = k.view(B, T, g.n_heads, g.qk_dim).transpose(1, 2)
            v = v.view(B, T, g.n_heads, g.v_dim).transpose(1, 2)
            if self.rotary:
                cos, sin = rotary_cache(T, g.qk_dim, self.rotary_base, x.device, x.dtype)
                q, k = apply_rotary(q, cos, sin), apply_rotary(k, cos, sin)
            if self.score_hook is not None:
                self.score_hook(len(outs), q, k)
            if self.rel_bias is None:
                o = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=causal and mask is None)
            else:
                add = relative_bias(self.slopes[len(outs)], T, self.rel_bias).to(q.dtype)[None]  # (1, H, T, T)
                allowed = mask if mask is not None else (
                    torch.ones(T, T, dtype=torch.bool, device=x.device).tril() if causal else None)
                if allowed is not None:
                    add = add.masked_fill(~allowed, float("-inf"))
                add = add[..., -Tq:, :]
                # written out rather than through SDPA: with a float mask SDPA's CPU path checks every row
                # for -inf (a tenth of the step time at 32 heads); the softmax is the same
                scores = add if not self.dot else (q @ k.transpose(-1, -2)) * (g.qk_dim ** -0.5) + add
                o = torch.softmax(scores, dim=-1) @ v
            outs.append(o.transpose(1, 2).reshape(B, Tq, g.n_heads * g.v_dim))
        return self.out(torch.cat(outs, dim=-1) if len(outs) > 1 else outs[0])


def attention_params(d_model: int, groups: Sequence, bias: bool = True, out_dim: int | None = None) -> int:
    """Parameters of a GroupedAttention layer (projections and biases)."""
    gs = as_groups(groups)
    qk = sum(g.n_heads * g.qk_dim for g in gs)
    v = sum(g.n_heads * g.v_dim for g in gs)
    out_dim = out_dim or d_model
    return d_model * (2 * qk + v) + (2 * qk + v if bias else 0) + v * out_dim + (out_dim if bias else 0)


def attention_flops_per_token(d_model: int, groups: Sequence, context: int, causal: bool = True,
                              out_dim: int | None = None) -> float:
    """Forward FLOPs per token (2 per multiply-add): projections plus scores and mixing over `context` keys.

    For causal attention over a sequence of length `context`, the average query sees (context+1)/2 keys.
    """
    gs = as_groups(groups)
    qk = sum(g.n_heads * g.qk_dim for g in gs)
    v = sum(g.n_heads * g.v_dim for g in gs)
    keys = (context + 1) / 2 if causal else context
    proj = 2 * d_model * (2 * qk + v) + 2 * v * (out_dim or d_model)
    return proj + 2 * keys * (qk + v)


def sinusoidal_table(T: int, d: int) -> torch.Tensor:
    pos = torch.arange(T, dtype=torch.float32)[:, None]
    i = torch.arange(0, d, 2, dtype=torch.float32)
    ang = pos / (10000 ** (i / d))
    pe = torch.zeros(T, d)
    pe[:, 0::2] = torch.sin(ang)
    pe[:, 1::2] = torch.cos(ang[:, : d // 2])
    return pe
