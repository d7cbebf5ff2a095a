"""Capture attention logits and probabilities from a Hugging Face model running its own kernel.

Hugging Face models (LLaMA, GPT-2, BERT families and most others in transformers >= 4.56) call
their attention kernel through `ALL_ATTENTION_FUNCTIONS[config._attn_implementation]` with the
queries and keys already projected and rotated (RoPE applied), before grouped-query repetition.
The probe wraps that entry for the duration of a `with` block: the model still runs its kernel
(SDPA by default), and the wrapper recomputes softmax(scale * Q K^T + mask) on the side, one
layer and a chunk of heads at a time, handing each chunk to a callback. Nothing else is held, so
memory stays bounded on long inputs; `rows=` restricts the query rows computed.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Sequence

import torch


@dataclass
class AttentionChunk:
    """Attention of heads [head_start, head_start + H) of one layer, for the selected query rows."""

    layer: int
    head_start: int
    logits: torch.Tensor  # (B, H, R, K): scale * q.k + mask, -inf where masked
    probs: torch.Tensor  # (B, H, R, K): softmax over keys
    rows: torch.Tensor  # (R,) query positions
    kv_group: int  # query heads per key-value head (grouped-query attention)


def _additive_mask(mask, q_len: int, k_len: int, causal: bool, device, dtype) -> torch.Tensor | None:
    """The mask as an additive float tensor broadcastable to (B, H, Q, K), or None."""
    if mask is None:
        if not causal or q_len == 1:
            return None
        # Causal with the last query aligned to the last key (works with a prefix cache too).
        q_pos = torch.arange(q_len, device=device) + (k_len - q_len)
        allowed = torch.arange(k_len, device=device)[None, :] <= q_pos[:, None]
        return torch.where(allowed, 0.0, float("-inf")).to(dtype)[None, None]
    if mask.dtype == torch.bool:
        return torch.where(mask, 0.0, float("-inf")).to(dtype)
    return mask.to(dtype)[..., :k_len]


class AttentionProbe:
    """Context manager: while active, every attention call of `model` reports its attention.

    `callback(chunk: AttentionChunk)` is called per layer and chunk of `head_chunk` heads. Layers
    are numbered in the order their attention runs in the forward pass.
    """

    def __init__(self, model, callback: Callable[[AttentionChunk], None], rows: Sequence[int] | None = None,
                 head_chunk: int | None = None, dtype: torch.dtype = torch.float32):
        self.model = model
        self.callback = callback
        self.rows = None if rows is None else torch.as_tensor(list(rows), dtype=torch.long)
        self.head_chunk = head_chunk
        self.dtype = dtype
        self._layer_ids: dict[int, int] = {}
        self._impl = None
        self._had_local = False
        self._old = None

    def __enter__(self) -> "AttentionProbe":
        from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

        impl = getattr(self.model.config, "_attn_implementation", None) or "eager"
        self._impl = impl
        self._had_local = impl in ALL_ATTENTION_FUNCTIONS._local_mapping
        self._old = ALL_ATTENTION_FUNCTIONS._local_mapping.get(impl)
        original = None if impl == "eager" else ALL_ATTENTION_FUNCTIONS[impl]

        def wrapped(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
            probs_full = self._report(module, query, key, attention_mask, scaling, kwargs)
            if original is not None:
                return original(module, query, key, value, attention_mask, scaling=scaling, dropout=dropout, **kwargs)
            # Eager: the probabilities were just computed for every row, reuse them.
            rep = query.shape[1] // key.shape[1]
            v = value.repeat_interleave(rep, dim=1) if rep > 1 else value
            out = torch.matmul(probs_full.to(v.dtype), v).transpose(1, 2).contiguous()
            return out, probs_full

        ALL_ATTENTION_FUNCTIONS._local_mapping[impl] = wrapped
        return self

    def __exit__(self, *exc) -> None:
        from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

        if self._had_local:
            ALL_ATTENTION_FUNCTIONS._local_mapping[self._impl] = self._old
        else:
            ALL_ATTENTION_FUNCTIONS._local_mapping.pop(self._impl, None)

    @torch.no_grad()
    def _report(self, module, query, key, attention_mask, scaling, kwargs):
        layer = self._layer_ids.setdefault(id(module), len(self._layer_ids))
        B, Hq, Q, dk = query.shape
        K = key.shape[2]
        rep = Hq // key.shape[1]
        scale = scaling if scaling is not None else dk ** -0.5
        causal = kwargs.get("is_causal")
        causal = bool(getattr(module, "is_causal", False)) if causal is None else bool(causal)
        mask = _additive_mask(attention_mask, Q, K, causal, query.device, self.dtype)
        eager_full = self._impl == "eager"
        rows = torch.arange(Q) if (self.rows is None or eager_full) else self.rows
        if int(rows.max()) >= Q:
            raise ValueError(f"probe rows up to {int(rows.max())} requested but the input has {Q} query positions")
        chunk = self.head_chunk or Hq
        q = query[:, :, rows].to(self.dtype)
        k = key.to(self.dtype)
        if mask is not None:
            mask = mask.expand(B, -1, -1, -1)[:, :, rows] if mask.shape[2] != 1 else mask
        full = [] if eager_full else None
        for h0 in range(0, Hq, chunk):
            h1 = min(Hq, h0 + chunk)
            kh = k[:, torch.arange(h0, h1) // rep]
            logits = torch.matmul(q[:, h0:h1], kh.transpose(-1, -2)) * scale
            if mask is not None:
                m = mask if mask.shape[1] == 1 else mask[:, h0:h1]
                logits = logits + m
            probs = torch.softmax(logits, dim=-1)
            probs = torch.nan_to_num(probs, nan=0.0)  # fully masked rows (padding queries)
            if eager_full:
                full.append(probs)
            sel = probs if self.rows is None or not eager_full else probs[:, :, self.rows]
            lg = logits if self.rows is None or not eager_full else logits[:, :, self.rows]
            self.callback(AttentionChunk(layer=layer, head_start=h0, logits=lg, probs=sel,
                                         rows=self.rows if self.rows is not None else rows, kv_group=rep))
        return torch.cat(full, dim=1) if eager_full else None


def capture_attentions(model, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                       rows: Sequence[int] | None = None) -> list[torch.Tensor]:
    """Attention probabilities of every layer, (B, H, R, K) each, from one forward pass (small inputs)."""
    store: dict[int, list[torch.Tensor]] = {}

    def keep(c: AttentionChunk) -> None:
        store.setdefault(c.layer, []).append(c.probs.clone())

    with AttentionProbe(model, keep, rows=rows), torch.no_grad():
        model(input_ids=input_ids, attention_mask=attention_mask)
    return [torch.cat(store[i], dim=1) for i in sorted(store)]


class SeqModelProbe:
    """The same reports as `AttentionProbe` for our own `SeqModel` decoders: every `GroupedAttention` layer's
    queries and keys (positions applied) are read through its `score_hook`, and softmax(q.k / sqrt(d) + the
    head's relative bias + the causal mask) is handed to `callback` per layer and head group. Padding masks are
    not supported (the probe is for whole windows)."""

    def __init__(self, model, callback: Callable[[AttentionChunk], None], dtype: torch.dtype = torch.float32):
        self.model, self.callback, self.dtype = model, callback, dtype
        self.layers = [b.attn for b in model.blocks]

    def __enter__(self) -> "SeqModelProbe":
        from headalloc.models.attention import relative_bias

        for li, a in enumerate(self.layers):
            offsets = [0]
            for g in a.groups:
                offsets.append(offsets[-1] + g.n_heads)

            def hook(gi: int, q: torch.Tensor, k: torch.Tensor, li=li, a=a, offsets=offsets) -> None:
                T = q.shape[2]
                logits = (q.to(self.dtype) @ k.to(self.dtype).transpose(-1, -2)) * q.shape[-1] ** -0.5
                if a.rel_bias is not None:
                    logits = logits + relative_bias(a.slopes[gi], T, a.rel_bias).to(self.dtype)[None]
                if a.causal:
                    logits = logits.masked_fill(~torch.ones(T, T, dtype=torch.bool, device=q.device).tril(),
                                                float("-inf"))
                self.callback(AttentionChunk(layer=li, head_start=offsets[gi], logits=logits,
                                             probs=torch.softmax(logits, -1), rows=torch.arange(T), kv_group=1))
            a.score_hook = hook
        return self

    def __exit__(self, *exc) -> None:
        for a in self.layers:
            a.score_hook = None
