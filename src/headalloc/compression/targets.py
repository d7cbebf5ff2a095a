"""Where a compressed model will run, and which plans that runtime can run exactly (a registry).

- `any`: headalloc's own runtime (`modeling_headalloc`, loaded by transformers): per layer its own
  number of key-value heads, query heads per key-value head, query-key width (a subset of rotary
  pairs per head) and value width.
- `llamacpp`: llama.cpp (and what is built on it: ollama, LM Studio, llama-cpp-python) through its
  `deci` GGUF architecture, which reads per-layer `head_count` / `head_count_kv` arrays and sizes
  each layer's KV cache from them; a layer whose `head_count` is 0 has no attention at all (checked
  in llama.cpp's `src/models/deci.cpp`, vendored by llama-cpp-python 0.3.36). Head width and rotary
  frequencies are one setting for the whole model there, so every kept head keeps the original
  width and all its rotary pairs; per layer only the number of key-value heads and of query heads
  per key-value head (the same for every group of the layer) may change, or the layer's attention
  may be removed, except in the first layer: llama.cpp reads the head width off layer 0's head count
  (`n_embd / n_head(0)`, and ignores `key_length` when that count is 0), so a model whose first layer
  has no attention loads with zero-width heads and fails (found by the engine test).
A strategy asked for a target only proposes what the target can run (`strategies.make_plan`), and
`check` says why a plan or a saved model cannot run there.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Target:
    name: str
    description: str
    widths_fixed: bool  # every kept head keeps the full head width and every rotary pair
    # strategies also consider removing a layer's attention entirely (both runtimes run such a layer;
    # off for `any` so that its documented plans stay what they were measured as)
    propose_empty: bool
    first_layer_attention: bool = False  # the runtime needs attention in layer 0 (llama.cpp)

    def problems(self, attn_layers: list[dict], head_dim: int) -> list[str]:
        """Why each layer of a per-layer spec (HeadSpec dicts, as in a saved config.json) cannot run
        here (empty: it can)."""
        out = []
        for i, a in enumerate(attn_layers):
            if a["n_kv_heads"] == 0:
                if i == 0 and self.first_layer_attention:
                    out.append(f"layer 0 has no attention; {self.name} reads the head width off the first layer's "
                               f"head count, so the first layer must keep at least one head")
                continue  # no attention: both runtimes run it elsewhere
            if self.widths_fixed:
                if a.get("kind", "heads") != "heads":
                    out.append(f"layer {i} keeps its keys and values through a latent ({a['kind']}); {self.name} "
                               f"caches every kv head's keys and values")
                if a.get("rank_q") or a.get("rank_o"):
                    out.append(f"layer {i} factorises its query or output projection (rank_q={a.get('rank_q', 0)}, "
                               f"rank_o={a.get('rank_o', 0)}); {self.name} runs dense projections")
                if a["qk_dim"] != head_dim or a["v_dim"] != head_dim:
                    out.append(f"layer {i} has query-key width {a['qk_dim']} and value width {a['v_dim']}; "
                               f"{self.name} needs the original head width {head_dim} in every layer")
                pairs = a.get("rope_pairs")
                if pairs is not None and any(list(p) != list(range(head_dim // 2)) for p in pairs):
                    out.append(f"layer {i} keeps a subset of rotary frequencies; {self.name} rotates every pair")
        return out

    def check(self, attn_layers: list[dict], head_dim: int) -> None:
        bad = self.problems(attn_layers, head_dim)
        if bad:
            more = f" (and {len(bad) - 3} more)" if len(bad) > 3 else ""
            raise ValueError(f"this plan cannot run in {self.name}: " + "; ".join(bad[:3]) + more +
                             f". Compress with `--target {self.name}` so that every strategy only chooses "
                             f"what {self.name} runs")


TARGETS: dict[str, Target] = {
    "any": Target("any", "headalloc's own runtime (transformers, trust_remote_code): any per-layer head "
                  "counts and widths", widths_fixed=False, propose_empty=False),
    "llamacpp": Target("llamacpp", "llama.cpp via GGUF (deci architecture): per-layer counts of key-value "
                       "heads and of query heads per key-value head, original head width, or no attention "
                       "in a layer but the first", widths_fixed=True, propose_empty=True,
                       first_layer_attention=True),
}


def get_target(name: str) -> Target:
    if name not in TARGETS:
        raise ValueError(f"unknown target {name!r}; choose one of {', '.join(TARGETS)}")
    return TARGETS[name]
