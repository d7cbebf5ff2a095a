"""A teacher's attention shape, read through its family adapter: what plans and budgets are counted in."""

from __future__ import annotations

from dataclasses import dataclass

from headalloc.compression.families import adapter_for
from headalloc.compression.spec import HeadSpec, LayerPlan


@dataclass(frozen=True)
class Geometry:
    """A teacher's attention shape: head width, kv heads, query heads per kv head, hidden size, layers."""

    head_dim: int
    n_kv: int
    n_rep: int
    hidden: int
    n_layers: int
    bias: tuple = ()  # projections with biases, e.g. ("q", "k", "v")
    qk_norm: bool = False
    qk_reducible: bool = True

    @classmethod
    def of(cls, model) -> "Geometry":
        ad = adapter_for(model)
        cfg = model.config
        w = ad.weights(model, 0)
        return cls(ad.head_dim(cfg), ad.n_kv_heads(cfg), ad.n_rep(cfg), ad.hidden_size(cfg), ad.n_layers(cfg),
                   tuple(k for k, v in w.bias.items() if v), w.q_norm is not None, ad.qk_reducible)

    def spec(self, lp: LayerPlan) -> HeadSpec:
        """The shape (no rope pairs) that a layer plan gives in this model: what budgets count."""
        return lp.shape(self.n_kv, self.n_rep, {b: True for b in self.bias}, self.qk_norm)

    def full(self) -> LayerPlan:
        return LayerPlan(self.head_dim, self.head_dim)
