"""Head-dimension reduction of LLaMA-family (rotary, grouped-query) models.

- Query-key: a projection of q and k commutes with RoPE only inside each rotary frequency pair, so
  the query-key width is reduced by keeping a subset of pairs, chosen per key-value head (and so
  shared by the query heads of its group) by data-aware importance
      I_j = sum_{h in group} E|q_{h,j}|^2 * E|k_{g,j}|^2,
  the energy of pair j's contribution q_{h,j} . k_{g,j} to the logits on calibration text
  (E|W x|^2 = tr(W C W^T) with C the covariance of the layer's attention input).
- Value-output: values carry no rotation, so the value width of kv head g is reduced by a
  truncated SVD of the whole group's value-output map A_g = [W_O^h W_V^g]_{h in group}, weighted
  by C^{1/2} (data-aware) or not (plain), so every query head of the group shares the basis.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from transformers import LlamaForCausalLM

from headalloc.compression.hf_model import HeadallocLlamaConfig, HeadallocLlamaForCausalLM, identity_attn_layers


def head_dim_of(cfg) -> int:
    return getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads


def check_llama(model) -> None:
    if not isinstance(model, LlamaForCausalLM):
        raise ValueError(f"this compression path needs a LLaMA-family causal LM (rotary, grouped-query); got "
                         f"{type(model).__name__}. BERT/GPT-2 heads use headalloc.compression.svd.")


@torch.no_grad()
def collect_layer_inputs(model, windows: torch.Tensor, keep: bool | list[int] = True, batch: int = 1):
    """Per layer: covariance C = E[x x^T] of the attention input x (after input_layernorm), the
    inputs themselves (if `keep`), and the position embeddings, from teacher forward passes."""
    layers = model.model.layers
    cov = [torch.zeros(model.config.hidden_size, model.config.hidden_size, dtype=torch.float64) for _ in layers]
    count = [0]
    xs: list[list[torch.Tensor]] = [[] for _ in layers]
    pos: list = []
    handles = []
    resid = [0.0 for _ in layers]  # sum of squared norms of the residual stream entering each layer

    for i, layer in enumerate(layers):
        def layer_hook(mod, args, kwargs, i=i):
            h = kwargs.get("hidden_states", args[0] if args else None)
            resid[i] += float(h.double().square().sum())
        handles.append(layer.register_forward_pre_hook(layer_hook, with_kwargs=True))
    for i, layer in enumerate(layers):
        def hook(mod, args, kwargs, i=i):
            x = kwargs.get("hidden_states", args[0] if args else None)
            flat = x.reshape(-1, x.shape[-1]).double()
            cov[i] += flat.T @ flat
            if keep is True or (isinstance(keep, list) and i in keep):
                xs[i].append(x.detach().clone())
            if i == 0:
                count[0] += flat.shape[0]
                if keep:
                    pe = kwargs.get("position_embeddings")
                    pos.append(tuple(t.detach().clone() for t in pe))
        handles.append(layer.self_attn.register_forward_pre_hook(hook, with_kwargs=True))
    try:
        for s in range(0, len(windows), batch):
            model(input_ids=windows[s:s + batch])
    finally:
        for h in handles:
            h.remove()
    return {"windows": windows, "cov": [c / count[0] for c in cov], "inputs": xs if keep is not False else None,
            "resid_sq": [r / count[0] for r in resid],
            "pos": pos if keep is not False else None, "tokens": count[0]}


def _sym_sqrt(C: torch.Tensor, eps: float = 1e-6):
    w, V = torch.linalg.eigh(C)
    w = w.clamp_min(eps * w.max())
    return (V * w.sqrt()) @ V.T, (V / w.sqrt()) @ V.T


@torch.no_grad()
def pair_importance(attn, C: torch.Tensor | None, n_kv: int, n_rep: int, head_dim: int) -> torch.Tensor:
    """(n_kv, head_dim/2) logit energy of each rotary pair, summed over the query heads of the group."""
    Wq = attn.q_proj.weight.double().view(n_kv * n_rep, head_dim, -1)
    Wk = attn.k_proj.weight.double().view(n_kv, head_dim, -1)
    C = torch.eye(Wq.shape[-1], dtype=torch.float64) if C is None else C.double()
    e_q = torch.einsum("hdi,ij,hdj->hd", Wq, C, Wq)  # E|q_{h,d}|^2 per coordinate
    e_k = torch.einsum("gdi,ij,gdj->gd", Wk, C, Wk)
    half = head_dim // 2
    pq = (e_q[:, :half] + e_q[:, half:]).view(n_kv, n_rep, half).sum(1)  # per pair, summed over the group
    pk = e_k[:, :half] + e_k[:, half:]
    return pq * pk


def low_rank_svd(M: torch.Tensor, N: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Thin SVD of the product M @ N, M (m, r), N (r, n), r small, without forming it: QR of both
    factors, then the SVD of an r x r core. Returns U (m, r), S (r,), Vh (r, n) with U diag(S) Vh = M N
    (the product has rank <= r, so nothing is lost)."""
    Qm, Rm = torch.linalg.qr(M)
    Qn, Rn = torch.linalg.qr(N.transpose(0, 1))
    u, S, vh = torch.linalg.svd(Rm @ Rn.transpose(0, 1))
    return Qm @ u, S, vh @ Qn.transpose(0, 1)


@torch.no_grad()
def value_output_svd(attn, C: torch.Tensor | None, n_kv: int, n_rep: int, head_dim: int, v_new: int,
                     keep_rep: list[list[int]] | None = None, cache: dict | None = None):
    """Reduced (W_V, W_O) of width v_new per kv head by SVD of each group's value-output map.

    `cache` (a dict kept by the caller) stores each group's SVD, so other widths are slices."""
    hidden = attn.v_proj.weight.shape[1]
    Wv = attn.v_proj.weight.double().view(n_kv, head_dim, hidden)
    Wo = attn.o_proj.weight.double().view(hidden, n_kv, n_rep, head_dim)
    if C is not None:
        Cs, Cis = cache["sqrt"] if cache is not None and "sqrt" in cache else _sym_sqrt(C.double())
        if cache is not None:
            cache["sqrt"] = (Cs, Cis)
    new_v, new_o = [], []
    for g in range(n_kv):
        reps = list(range(n_rep)) if keep_rep is None else keep_rep[g]
        key = (g, tuple(reps))
        if cache is not None and key in cache:
            U, S, Vh = cache[key]
        else:
            M = torch.cat([Wo[:, g, h] for h in reps], dim=0)  # A = M @ W_V: (len(reps)*hidden, hidden)
            U, S, Vh = low_rank_svd(M, Wv[g] @ Cs if C is not None else Wv[g])
            if cache is not None:
                cache[key] = (U, S, Vh)
        k = min(v_new, S.numel())
        V_new = Vh[:k] @ Cis if C is not None else Vh[:k]  # (k, hidden)
        O_new = (U[:, :k] * S[:k]).view(len(reps), hidden, k)
        if k < v_new:  # pad (rank-deficient group): zero directions change nothing
            V_new = torch.cat([V_new, V_new.new_zeros(v_new - k, hidden)])
            O_new = torch.cat([O_new, O_new.new_zeros(len(reps), hidden, v_new - k)], dim=2)
        new_v.append(V_new)
        new_o.append(O_new)
    return new_v, new_o  # per group: (v_new, hidden), (reps, hidden, v_new)


@dataclass
class LayerPlan:
    """What one layer keeps: kv heads, query heads per kv head, qk and v widths."""

    qk_dim: int
    v_dim: int
    keep_kv: list[int] | None = None  # indices of kept kv heads (None: all)
    keep_rep: list[list[int]] | None = None  # per kept kv head, kept query heads (None: all)

    def to_dict(self) -> dict:
        return {"qk_dim": self.qk_dim, "v_dim": self.v_dim, "keep_kv": self.keep_kv, "keep_rep": self.keep_rep}


@torch.no_grad()
def reduce_layer(attn, C: torch.Tensor | None, lp: LayerPlan, head_dim: int, n_kv0: int, n_rep0: int,
                 layer_idx: int = 0, cache: dict | None = None) -> tuple[dict, tuple[torch.Tensor, ...]]:
    """One layer's reduced head spec and its (W_Q, W_K, W_V, W_O) from the teacher attention `attn`."""
    hd = head_dim
    if lp.qk_dim % 2 or not 2 <= lp.qk_dim <= hd or not 1 <= lp.v_dim <= hd:
        raise ValueError(f"layer {layer_idx}: qk_dim must be even in [2, {hd}] and v_dim in [1, {hd}]; got "
                         f"qk_dim={lp.qk_dim}, v_dim={lp.v_dim}")
    keep_kv = list(range(n_kv0)) if lp.keep_kv is None else list(lp.keep_kv)
    keep_rep = [list(range(n_rep0))] * len(keep_kv) if lp.keep_rep is None else [list(r) for r in lp.keep_rep]
    if not keep_kv or len(keep_rep) != len(keep_kv) or len({len(r) for r in keep_rep}) != 1 or not keep_rep[0]:
        raise ValueError(f"layer {layer_idx}: keep at least one kv head, and the same number (>= 1) of query heads "
                         f"in every kept group; got keep_kv={keep_kv}, keep_rep={keep_rep}")
    n_rep = len(keep_rep[0])
    imp = pair_importance(attn, C, n_kv0, n_rep0, hd)
    pairs = [sorted(torch.topk(imp[g], lp.qk_dim // 2).indices.tolist()) for g in keep_kv]
    Wq = attn.q_proj.weight.view(n_kv0, n_rep0, hd, -1)
    Wk = attn.k_proj.weight.view(n_kv0, hd, -1)
    q_rows, k_rows = [], []
    for j, (g, ps) in enumerate(zip(keep_kv, pairs)):
        idx = torch.tensor(ps + [p + hd // 2 for p in ps])
        k_rows.append(Wk[g, idx])
        q_rows += [Wq[g, h, idx] for h in keep_rep[j]]
    reps_all = [keep_rep[keep_kv.index(g)] if g in keep_kv else list(range(n_rep0)) for g in range(n_kv0)]
    vs, os_ = value_output_svd(attn, C, n_kv0, n_rep0, hd, lp.v_dim, keep_rep=reps_all, cache=cache)
    v_rows = torch.cat([vs[g] for g in keep_kv]).float()
    o_cols = torch.cat([os_[g][j] for g in keep_kv for j in range(n_rep)], dim=1).float()
    spec = {"n_kv_heads": len(keep_kv), "n_rep": n_rep, "qk_dim": lp.qk_dim, "v_dim": lp.v_dim,
            "rope_pairs": pairs, "scale": attn.scaling}
    return spec, (torch.cat(q_rows).float(), torch.cat(k_rows).float(), v_rows, o_cols)


def reduced_attention(spec: dict, weights, X: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                      head_dim: int) -> torch.Tensor:
    """Functional forward of a reduced layer (causal, no cache): X (B, T, hidden) -> attention output."""
    from transformers.models.llama.modeling_llama import rotate_half

    Wq, Wk, Wv, Wo = weights
    B, T, _ = X.shape
    g, r, k, v = spec["n_kv_heads"], spec["n_rep"], spec["qk_dim"], spec["v_dim"]
    pairs = torch.tensor(spec["rope_pairs"], dtype=torch.long)
    idx = torch.cat([pairs, pairs + head_dim // 2], dim=1)  # (g, k)
    q = (X @ Wq.T).view(B, T, g * r, k).transpose(1, 2)
    kk = (X @ Wk.T).view(B, T, g, k).transpose(1, 2)
    vv = (X @ Wv.T).view(B, T, g, v).transpose(1, 2)
    ck, sk = cos[:, :, idx].transpose(1, 2), sin[:, :, idx].transpose(1, 2)
    cq, sq = ck.repeat_interleave(r, 1), sk.repeat_interleave(r, 1)
    q, kk = q * cq + rotate_half(q) * sq, kk * ck + rotate_half(kk) * sk
    kk, vv = kk.repeat_interleave(r, 1), vv.repeat_interleave(r, 1)
    o = torch.nn.functional.scaled_dot_product_attention(q, kk, vv, is_causal=True, scale=spec["scale"])
    return o.transpose(1, 2).reshape(B, T, g * r * v) @ Wo.T


@torch.no_grad()
def compress_llama(model: LlamaForCausalLM, plan: list[LayerPlan], covariances: list[torch.Tensor] | None = None,
                   plan_info: dict | None = None) -> HeadallocLlamaForCausalLM:
    """A HeadallocLlamaForCausalLM whose attention follows `plan`, initialised from `model`.

    With `covariances` (per layer, from collect_layer_inputs) the pair choice and the value SVD are
    data-aware; without, they use the identity (weights only).
    """
    check_llama(model)
    cfg = model.config
    hd, n_kv0 = head_dim_of(cfg), cfg.num_key_value_heads
    n_rep0 = cfg.num_attention_heads // n_kv0
    if len(plan) != cfg.num_hidden_layers:
        raise ValueError(f"plan has {len(plan)} layers; the model has {cfg.num_hidden_layers}")
    attn_layers, new_weights = [], []
    for i, (layer, lp) in enumerate(zip(model.model.layers, plan)):
        spec, w = reduce_layer(layer.self_attn, None if covariances is None else covariances[i], lp, hd, n_kv0,
                               n_rep0, i)
        attn_layers.append(spec)
        new_weights.append(w)
    return build_student(model, attn_layers, new_weights, plan_info)


@torch.no_grad()
def build_student(model, attn_layers: list[dict], weights: list, plan_info: dict | None = None):
    """Assemble a HeadallocLlamaForCausalLM from per-layer specs and attention weights; the rest is the teacher's."""
    cfg = model.config
    new_cfg = HeadallocLlamaConfig(**{k: v for k, v in cfg.to_dict().items()
                                      if k not in ("model_type", "architectures", "transformers_version",
                                                   "attn_layers", "headalloc_plan")},
                                   attn_layers=attn_layers, headalloc_plan=plan_info)
    new_cfg.architectures = ["HeadallocLlamaForCausalLM"]
    student = HeadallocLlamaForCausalLM(new_cfg)
    sd = {k: v for k, v in model.state_dict().items() if ".self_attn." not in k}
    _, unexpected = student.load_state_dict(sd, strict=False)
    assert not unexpected, unexpected
    for layer, (q, k, v, o) in zip(student.model.layers, weights):
        layer.self_attn.q_proj.weight.copy_(q)
        layer.self_attn.k_proj.weight.copy_(k)
        layer.self_attn.v_proj.weight.copy_(v)
        layer.self_attn.o_proj.weight.copy_(o)
    if cfg.tie_word_embeddings:
        student.tie_weights()
    student.config._attn_implementation = model.config._attn_implementation
    return student.eval()


def identity_plan(model) -> list[LayerPlan]:
    hd = head_dim_of(model.config)
    return [LayerPlan(hd, hd) for _ in range(model.config.num_hidden_layers)]


def attention_params_of(attn_layers: list[dict], hidden: int) -> int:
    """Attention projection parameters (no biases in LLaMA) of a list of per-layer head specs."""
    total = 0
    for a in attn_layers:
        nq = a["n_kv_heads"] * a["n_rep"]
        total += hidden * (nq * a["qk_dim"] + a["n_kv_heads"] * (a["qk_dim"] + a["v_dim"])) + nq * a["v_dim"] * hidden
    return total
