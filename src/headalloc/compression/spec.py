"""Typed objects that flow through compression: a layer's head spec, a layer's plan, the whole plan.

`HeadSpec` is the one definition of a layer's attention shape and of what it costs (parameters,
KV-cache entries per token); `LayerPlan` says what a strategy keeps in one layer; `Plan` is a
strategy's answer for the whole model, with its provenance.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field


@dataclass
class HeadSpec:
    """One attention layer: n_kv_heads kv heads, n_rep query heads each, query-key width qk_dim and
    value width v_dim per head; rotary pairs kept per kv head; which projections carry biases;
    per-head q/k norms. n_kv_heads = n_rep = 0: a layer without attention (it adds nothing).
    The dict form is what `modeling_headalloc` reads from config.json."""

    n_kv_heads: int
    n_rep: int
    qk_dim: int
    v_dim: int
    rope_pairs: list[list[int]] | None = None
    scale: float = 1.0
    bias: dict = field(default_factory=dict)
    qk_norm: bool = False
    # "heads": the layout above; "palu": keys and values through rank-rank_k / rank_v latents (the cache
    # holds the latents; keys are rebuilt from them before rotary positions are applied)
    kind: str = "heads"
    rank_k: int = 0
    rank_v: int = 0
    # "mla" (MHA2MLA-style): rope_keep rotary pairs per kv head keep their rotation (cached as keys), the
    # rest of the key and the whole value come from one joint latent of rank `rank` (cached)
    rank: int = 0
    rope_keep: int = 0
    # any kind: the query and/or output projection factorised through a rank-rank_q / rank_o bottleneck
    # (down then up; 0 = a dense projection). Parameters only: the cache and the heads are unchanged
    rank_q: int = 0
    rank_o: int = 0
    # o_groups > 1 (with rank_o): the output projection's down factor is block-diagonal, each of o_groups
    # consecutive blocks of the head outputs (a kv group's heads) through its own rank_o / o_groups directions;
    # the up factor (hidden x rank_o) is shared. 0 or 1: one down factor over every head output
    o_groups: int = 0

    @property
    def n_heads(self) -> int:
        return self.n_kv_heads * self.n_rep

    def params(self, hidden: int) -> int:
        """Attention parameters: the four projections, their biases and the q/k norm weights."""
        nq, g, k, v = self.n_heads, self.n_kv_heads, self.qk_dim, self.v_dim
        weights = hidden * (nq * k + g * (k + v)) + nq * v * hidden
        if self.kind == "palu":
            weights = hidden * nq * k + (hidden + g * k) * self.rank_k + (hidden + g * v) * self.rank_v \
                + nq * v * hidden
        if self.kind == "mla":
            kr = 2 * self.rope_keep
            weights = hidden * nq * k + hidden * g * kr + (hidden + g * (k - kr) + g * v) * self.rank + nq * v * hidden
        if self.rank_q:  # dense hidden x (nq k) -> rank_q x (hidden + nq k)
            weights += self.rank_q * (hidden + nq * k) - hidden * nq * k
        if self.rank_o:
            weights += self.rank_o * (nq * v // max(1, self.o_groups) + hidden) - nq * v * hidden
        b = self.bias or {}
        biases = (nq * k if b.get("q") else 0) + (g * k if b.get("k") else 0) + (g * v if b.get("v") else 0) \
            + (hidden if b.get("o") else 0)
        return weights + biases + (2 * k if self.qk_norm else 0)

    def kv_size(self) -> int:
        """KV-cache entries per token (multiply by the element size for bytes)."""
        if self.kind == "palu":
            return self.rank_k + self.rank_v
        if self.kind == "mla":
            return self.n_kv_heads * 2 * self.rope_keep + self.rank
        return self.n_kv_heads * (self.qk_dim + self.v_dim)

    def context_flops(self, decode: bool = True) -> int:
        """FLOPs per token per key attended: scores (q . k) and mixing (p v) of every query head. Decoding
        (`decode`), palu: every cached key is rebuilt from its latent (rotary positions come after the up
        projection) and the values are mixed in the latent (absorbed: p c, then one up projection per step);
        mla: absorbed, scores against the kept rotary part and the latent, values mixed in the latent. A prefill
        rebuilds each key and value once, through weights the dense count already has, then attends at full width."""
        if decode and self.kind == "palu":
            return 2 * self.n_heads * (self.qk_dim + self.rank_v) + 2 * self.n_kv_heads * self.rank_k * self.qk_dim
        if decode and self.kind == "mla":
            return 2 * self.n_heads * (2 * self.rope_keep + 2 * self.rank)
        return 2 * self.n_heads * (self.qk_dim + self.v_dim)

    def cost(self, hidden: int, kind: str) -> int:
        """What a budget counts: "params" or "kv"."""
        if kind == "kv":
            return self.kv_size()
        if kind == "params":
            return self.params(hidden)
        raise ValueError(f"budget kind must be 'params' or 'kv'; got {kind!r}")

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "HeadSpec":
        return cls(**{k: d[k] for k in cls.__dataclass_fields__ if k in d})


@dataclass
class LayerPlan:
    """What one layer keeps: kv heads, query heads per kv head, qk and v widths."""

    qk_dim: int
    v_dim: int
    keep_kv: list[int] | None = None  # indices of kept kv heads (None: all)
    keep_rep: list[list[int]] | None = None  # per kept kv head, kept query heads (None: all)
    kind: str = "heads"  # "palu": every head kept, keys and values through latents of rank_k / rank_v
    rank_k: int | None = None
    rank_v: int | None = None
    rank: int | None = None  # "mla": joint latent rank, and rotary pairs kept per kv head
    rope_keep: int | None = None
    rank_q: int | None = None  # any kind: query / output projection through a low-rank bottleneck (None: dense)
    rank_o: int | None = None
    o_groups: int | None = None  # with rank_o: a block-diagonal down factor over this many head blocks (HeadSpec)

    @property
    def empty(self) -> bool:
        """No attention at all in this layer (every head removed): the layer adds nothing to the residual."""
        return self.keep_kv is not None and len(self.keep_kv) == 0

    def shape(self, n_kv: int, n_rep: int, bias: dict | None = None, qk_norm: bool = False) -> HeadSpec:
        """The HeadSpec this choice gives in a layer of n_kv kv heads with n_rep query heads each."""
        if self.empty:
            return HeadSpec(0, 0, self.qk_dim, self.v_dim, rope_pairs=[])
        spec = self._shape(n_kv, n_rep, bias, qk_norm)
        spec.rank_q, spec.rank_o = int(self.rank_q or 0), int(self.rank_o or 0)
        spec.o_groups = int(self.o_groups or 0) if self.rank_o else 0
        return spec

    def _shape(self, n_kv: int, n_rep: int, bias: dict | None, qk_norm: bool) -> HeadSpec:
        if self.kind == "palu":
            return HeadSpec(n_kv, n_rep, self.qk_dim, self.v_dim, bias=dict(bias or {}), qk_norm=qk_norm, kind="palu",
                            rank_k=int(self.rank_k), rank_v=int(self.rank_v))
        if self.kind == "mla":
            return HeadSpec(n_kv, n_rep, self.qk_dim, self.v_dim, bias=dict(bias or {}), qk_norm=qk_norm, kind="mla",
                            rank=int(self.rank), rope_keep=int(self.rope_keep))
        g = n_kv if self.keep_kv is None else len(self.keep_kv)
        r = n_rep if self.keep_rep is None else len(self.keep_rep[0])
        return HeadSpec(g, r, self.qk_dim, self.v_dim, bias=dict(bias or {}), qk_norm=qk_norm)

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "LayerPlan":
        return cls(**{k: d.get(k) for k in ("qk_dim", "v_dim", "keep_kv", "keep_rep", "rank_k", "rank_v", "rank",
                                            "rope_keep", "rank_q", "rank_o", "o_groups")},
                   kind=d.get("kind") or "heads")


@dataclass
class Plan:
    """A strategy's per-layer choice at a budget, with what it measured to get there."""

    layers: list[LayerPlan]
    strategy: str = ""
    budget: float = 1.0
    budget_kind: str = "params"
    info: dict = field(default_factory=dict)
    target: str = "any"

    def __len__(self) -> int:
        return len(self.layers)

    def __iter__(self):
        return iter(self.layers)

    def __getitem__(self, i):
        return self.layers[i]

    def to_dict(self, with_info: bool = True) -> dict:
        d = {"strategy": self.strategy, "budget": self.budget, "budget_kind": self.budget_kind,
             "target": self.target, "layers": [lp.to_dict() for lp in self.layers]}
        if with_info:
            d.update({k: v for k, v in self.info.items() if k not in d})
        return d
