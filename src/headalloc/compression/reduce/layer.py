"""Head-dimension reduction of rotary, grouped-query attention (any supported family).

- Query-key: a projection of q and k commutes with RoPE only inside each rotary frequency pair, so
  the query-key width is reduced by keeping a subset of pairs, chosen per key-value head (and so
  shared by the query heads of its group) by data-aware importance
      I_j = sum_{h in group} E|q_{h,j}|^2 * E|k_{g,j}|^2,
  the energy of pair j's contribution q_{h,j} . k_{g,j} to the logits on calibration text
  (E|W x + b|^2 = w~ M w~^T with M the second moment of x~ = [x; 1]).
- Value-output: values carry no rotation, so the value width of kv head g is reduced by a
  truncated SVD of the whole group's value-output map A_g = [W_O^h W_V^g]_{h in group}, weighted
  by M^{1/2} (data-aware) or not (plain), so every query head of the group shares the basis. A value
  bias is an extra input column (the constant 1), so it is reduced by the same SVD.
Everything here reads the teacher through its family adapter (`families`), and the student's
layers are `modeling_headalloc.ReducedAttention`, the same module the saved model runs.
"""

from __future__ import annotations

import torch

from headalloc.compression.families import AttentionWeights
from headalloc.compression.reduce.geometry import Geometry
from headalloc.compression.reduce.linalg import _aug, _sym_sqrt, block_whitened_low_rank, low_rank_svd, whitened_low_rank
from headalloc.compression.spec import HeadSpec, LayerPlan


@torch.no_grad()
def pair_importance(w: AttentionWeights, M: torch.Tensor | None, g: Geometry) -> torch.Tensor:
    """(n_kv, head_dim/2) logit energy of each rotary pair, summed over the query heads of the group."""
    hd = g.head_dim
    Wq = _aug(w.q, w.q_bias).cpu().view(g.n_kv * g.n_rep, hd, -1)
    Wk = _aug(w.k, w.k_bias).cpu().view(g.n_kv, hd, -1)
    M = torch.eye(Wq.shape[-1], dtype=torch.float64) if M is None else M.double()
    e_q = torch.einsum("hdi,ij,hdj->hd", Wq, M, Wq)  # E|q_{h,d}|^2 per coordinate
    e_k = torch.einsum("gdi,ij,gdj->gd", Wk, M, Wk)
    half = hd // 2
    pq = (e_q[:, :half] + e_q[:, half:]).view(g.n_kv, g.n_rep, half).sum(1)  # per pair, summed over the group
    pk = e_k[:, :half] + e_k[:, half:]
    return pq * pk


@torch.no_grad()
def value_output_svd(w: AttentionWeights, M: torch.Tensor | None, g: Geometry, v_new: int,
                     keep_rep: list[list[int]] | None = None, cache: dict | None = None):
    """Reduced (W_V~, W_O) of width v_new per kv head by SVD of each group's value-output map; W_V~
    has a last column (the bias) when the teacher's values have a bias.

    `cache` (a dict kept by the caller) stores each group's SVD, so other widths are slices."""
    hd, hidden = g.head_dim, g.hidden
    with_bias = w.v_bias is not None
    Wv = (_aug(w.v, w.v_bias) if with_bias else w.v.double()).cpu().view(g.n_kv, hd, -1)
    Wo = w.o.double().cpu().view(hidden, g.n_kv, g.n_rep, hd)
    if M is not None:
        C = M.double() if with_bias else M.double()[:-1, :-1]
        Cs, Cis = cache["sqrt"] if cache is not None and "sqrt" in cache else _sym_sqrt(C)
        if cache is not None:
            cache["sqrt"] = (Cs, Cis)
    new_v, new_o = [], []
    for kv in range(g.n_kv):
        reps = list(range(g.n_rep)) if keep_rep is None else keep_rep[kv]
        key = (kv, tuple(reps))
        if cache is not None and key in cache:
            U, S, Vh = cache[key]
        else:
            A = torch.cat([Wo[:, kv, h] for h in reps], dim=0)  # value-output map = A @ W_V
            U, S, Vh = low_rank_svd(A, Wv[kv] @ Cs if M is not None else Wv[kv])
            if cache is not None:
                cache[key] = (U, S, Vh)
        k = min(v_new, S.numel())
        V_new = Vh[:k] @ Cis if M is not None else Vh[:k]  # (k, in)
        O_new = (U[:, :k] * S[:k]).view(len(reps), hidden, k)
        if k < v_new:  # pad (rank-deficient group): zero directions change nothing
            V_new = torch.cat([V_new, V_new.new_zeros(v_new - k, V_new.shape[1])])
            O_new = torch.cat([O_new, O_new.new_zeros(len(reps), hidden, v_new - k)], dim=2)
        new_v.append(V_new)
        new_o.append(O_new)
    return new_v, new_o  # per group: (v_new, in), (reps, hidden, v_new)


@torch.no_grad()
def reduce_layer(w: AttentionWeights, M: torch.Tensor | None, lp: LayerPlan, g: Geometry, layer_idx: int = 0,
                 cache: dict | None = None, out_moment: torch.Tensor | None = None,
                 out_weight: torch.Tensor | None = None) -> tuple[HeadSpec, AttentionWeights]:
    """One layer's reduced head spec and weights (float32, CPU) from the teacher's weights `w`.
    `M`: the layer's augmented second moment (data-aware), or None (weights only). `out_moment`: the second
    moment of the teacher's output-projection input (the concatenated head outputs), which a factorised
    output projection (`lp.rank_o`) is whitened by (None: plain SVD); `out_weight`: its output-side weight
    (see `factor_projections`)."""
    spec, red = _reduce_layer(w, M, lp, g, layer_idx, cache)
    if lp.rank_q or lp.rank_o:
        spec, red = factor_projections(spec, red, M, lp, layer_idx, cache, out_moment, out_weight)
    return spec, red


@torch.no_grad()
def factor_projections(spec: HeadSpec, red: AttentionWeights, M: torch.Tensor | None, lp: LayerPlan,
                       layer_idx: int = 0, cache: dict | None = None, out_moment: torch.Tensor | None = None,
                       out_weight: torch.Tensor | None = None):
    """The query and/or output projection of a reduced layer factorised into down (rank, in) and up (out, rank)
    by a truncated SVD whitened by its input's second moment (the layer input for queries; the head outputs,
    `out_moment`, for the output projection), the data-aware factorisation of SVD-LLM and Palu applied to the
    projections a KV-cache method leaves alone. `out_weight` (hidden, hidden): the output projection's error
    is also weighted on its output side, e.g. by the loss gradient's covariance there (`grad_moments`).
    Exact at full rank; the heads and the cache are unchanged."""
    if spec.n_kv_heads == 0:
        raise ValueError(f"layer {layer_idx}: a layer without attention has no projections to factorise")
    sc = cache if cache is not None else {}
    q, o, q_down, o_down = red.q, red.o, None, None
    for name, r, W in (("rank_q", lp.rank_q, red.q), ("rank_o", lp.rank_o, red.o)):
        if r is not None and not 1 <= int(r) <= min(W.shape):
            raise ValueError(f"layer {layer_idx}: {name} must be in [1, {min(W.shape)}] (the smaller side of the "
                             f"{tuple(W.shape)} projection), or None for a dense one; got {r}")
    if lp.rank_q:
        C = None if M is None else M.double()[:-1, :-1]  # the bias stays on the up projection
        q, q_down = whitened_low_rank(red.q, C, int(lp.rank_q), sc.setdefault("q_whiten", {}))
    if lp.rank_o:
        # the teacher's head-output moment applies when the reduced layer's output projection reads the teacher's
        # head outputs: every head at full value width in the teacher's basis (heads kind, see _reduce_layer;
        # palu and mla layers keep the teacher's output projection); otherwise plain SVD
        same_basis = red.o.shape[1] == (out_moment.shape[0] if out_moment is not None else -1) and (
            spec.kind != "heads" or (lp.keep_kv is None and lp.keep_rep is None and lp.v_dim == spec.v_dim))
        Cz = out_moment if same_basis else None
        groups = int(lp.o_groups or 1)
        if groups > 1:
            o, o_down = block_whitened_low_rank(red.o, Cz, int(lp.rank_o), groups, sc, out_weight=out_weight,
                                                layer_idx=layer_idx)
        else:
            o, o_down = whitened_low_rank(red.o, Cz, int(lp.rank_o), sc.setdefault(("o_whiten", Cz is None), {}),
                                          out_weight=out_weight)
    spec = HeadSpec.from_dict({**spec.to_dict(), "rank_q": int(lp.rank_q or 0), "rank_o": int(lp.rank_o or 0),
                               "o_groups": int(lp.o_groups or 0) if lp.rank_o else 0})
    return spec, AttentionWeights(**{**red.__dict__, "q": q, "o": o, "q_down": q_down, "o_down": o_down})


def _reduce_layer(w: AttentionWeights, M: torch.Tensor | None, lp: LayerPlan, g: Geometry, layer_idx: int = 0,
                  cache: dict | None = None) -> tuple[HeadSpec, AttentionWeights]:
    hd = g.head_dim
    if lp.qk_dim % 2 or not 2 <= lp.qk_dim <= hd or not 1 <= lp.v_dim <= hd:
        raise ValueError(f"layer {layer_idx}: qk_dim must be even in [2, {hd}] and v_dim in [1, {hd}]; got "
                         f"qk_dim={lp.qk_dim}, v_dim={lp.v_dim}")
    if w.q_norm is not None and lp.qk_dim != hd:
        raise ValueError(f"layer {layer_idx}: this family normalises every query and key head over its full width "
                         f"{hd} (q_norm/k_norm), so the query-key width cannot be narrowed exactly (asked {lp.qk_dim}); "
                         f"narrow the value width or remove heads instead (the strategies do this for this family)")
    if lp.kind == "palu":
        return reduce_latent(w, M, lp, g, layer_idx, cache)
    if lp.kind == "mla":
        return reduce_mla(w, M, lp, g, layer_idx, cache)
    if lp.empty:  # no attention in this layer
        z = w.q.new_zeros(0, w.q.shape[1]).float().cpu()
        return (HeadSpec(0, 0, lp.qk_dim, lp.v_dim, [], w.scale, {}, False),
                AttentionWeights(q=z, k=z, v=z, o=z.T.contiguous(), scale=w.scale))
    keep_kv = list(range(g.n_kv)) if lp.keep_kv is None else list(lp.keep_kv)
    keep_rep = [list(range(g.n_rep))] * len(keep_kv) if lp.keep_rep is None else [list(r) for r in lp.keep_rep]
    if not keep_kv or len(keep_rep) != len(keep_kv) or len({len(r) for r in keep_rep}) != 1 or not keep_rep[0]:
        raise ValueError(f"layer {layer_idx}: keep at least one kv head, and the same number (>= 1) of query heads "
                         f"in every kept group; got keep_kv={keep_kv}, keep_rep={keep_rep}")
    if any(not 0 <= k < g.n_kv for k in keep_kv) or any(not 0 <= h < g.n_rep for r in keep_rep for h in r):
        raise ValueError(f"layer {layer_idx}: head index out of range ({g.n_kv} kv heads, {g.n_rep} query heads "
                         f"each); got keep_kv={keep_kv}, keep_rep={keep_rep}")
    n_rep = len(keep_rep[0])
    if lp.qk_dim == hd:
        pairs = [list(range(hd // 2)) for _ in keep_kv]
    else:
        imp = pair_importance(w, M, g)
        pairs = [sorted(torch.topk(imp[kv], lp.qk_dim // 2).indices.tolist()) for kv in keep_kv]
    f32 = lambda t: None if t is None else t.detach().float().cpu().clone()  # noqa: E731
    Wq, Wk = f32(w.q).view(g.n_kv, g.n_rep, hd, -1), f32(w.k).view(g.n_kv, hd, -1)
    bq = f32(w.q_bias).view(g.n_kv, g.n_rep, hd) if w.q_bias is not None else None
    bk = f32(w.k_bias).view(g.n_kv, hd) if w.k_bias is not None else None
    q_rows, k_rows, q_b, k_b = [], [], [], []
    for j, (kv, ps) in enumerate(zip(keep_kv, pairs)):
        idx = torch.tensor(ps + [p + hd // 2 for p in ps])
        k_rows.append(Wk[kv, idx])
        q_rows += [Wq[kv, h, idx] for h in keep_rep[j]]
        if bk is not None:
            k_b.append(bk[kv, idx])
        if bq is not None:
            q_b += [bq[kv, h, idx] for h in keep_rep[j]]
    reps_all = [keep_rep[keep_kv.index(kv)] if kv in keep_kv else list(range(g.n_rep)) for kv in range(g.n_kv)]
    if lp.rank_o and lp.v_dim == hd and lp.keep_kv is None and lp.keep_rep is None:
        # the output projection will be factorised whitened by the teacher's head outputs, so the values keep
        # the teacher's own basis (the value-output SVD below would rotate each group's value coordinates)
        v_full = torch.cat([f32(w.v), f32(w.v_bias)[:, None]], 1) if w.v_bias is not None else f32(w.v)
        o_cols = f32(w.o)
    else:
        vs, os_ = value_output_svd(w, M, g, lp.v_dim, keep_rep=reps_all, cache=cache)
        v_full = torch.cat([vs[kv] for kv in keep_kv]).float()
        o_cols = torch.cat([os_[kv][j] for kv in keep_kv for j in range(n_rep)], dim=1).float()
    v_bias = v_full[:, -1].contiguous() if w.v_bias is not None else None
    spec = HeadSpec(len(keep_kv), n_rep, lp.qk_dim, lp.v_dim, pairs, w.scale, w.bias, w.q_norm is not None)
    red = AttentionWeights(q=torch.cat(q_rows), k=torch.cat(k_rows),
                           v=v_full[:, :-1].contiguous() if v_bias is not None else v_full, o=o_cols,
                           q_bias=torch.cat(q_b) if q_b else None, k_bias=torch.cat(k_b) if k_b else None,
                           v_bias=v_bias, o_bias=f32(w.o_bias), q_norm=f32(w.q_norm), k_norm=f32(w.k_norm),
                           scale=w.scale)
    return spec, red


@torch.no_grad()
def reduce_latent(w: AttentionWeights, M: torch.Tensor | None, lp: LayerPlan, g: Geometry, layer_idx: int = 0,
                  cache: dict | None = None) -> tuple[HeadSpec, AttentionWeights]:
    """Palu-style layer: every head kept; W_K and W_V each factorised (data-aware, whitened by the layer
    input's second moment) into a down projection to a rank-r latent (what the cache holds) and an up
    projection back to all kv heads (keys get their rotary positions after the up projection)."""
    full = g.n_kv * g.head_dim
    if lp.keep_kv is not None or lp.keep_rep is not None or (lp.qk_dim, lp.v_dim) != (g.head_dim, g.head_dim):
        raise ValueError(f"layer {layer_idx}: a latent (palu) layer keeps every head at full width")
    for name, r in (("rank_k", lp.rank_k), ("rank_v", lp.rank_v)):
        if r is None or not 1 <= int(r) <= full:
            raise ValueError(f"layer {layer_idx}: {name} must be in [1, {full}] (kv heads x head dim); got {r}")
    if w.q_norm is not None:
        raise ValueError(f"layer {layer_idx}: latent keys cannot carry per-head q/k norms (Qwen3)")
    C = None if M is None else M.double()[:-1, :-1]  # biases stay on the up projections
    sc = cache if cache is not None else {}
    k_up, k_down = whitened_low_rank(w.k, C, int(lp.rank_k), sc)
    v_up, v_down = whitened_low_rank(w.v, C, int(lp.rank_v), sc)
    f32 = lambda t: None if t is None else t.detach().float().cpu().clone()  # noqa: E731
    spec = HeadSpec(g.n_kv, g.n_rep, g.head_dim, g.head_dim, [list(range(g.head_dim // 2))] * g.n_kv, w.scale,
                    w.bias, False, kind="palu", rank_k=int(lp.rank_k), rank_v=int(lp.rank_v))
    red = AttentionWeights(q=f32(w.q), k=k_up, v=v_up, o=f32(w.o), q_bias=f32(w.q_bias), k_bias=f32(w.k_bias),
                           v_bias=f32(w.v_bias), o_bias=f32(w.o_bias), scale=w.scale, k_down=k_down, v_down=v_down)
    return spec, red


@torch.no_grad()
def reduce_mla(w: AttentionWeights, M: torch.Tensor | None, lp: LayerPlan, g: Geometry, layer_idx: int = 0,
               cache: dict | None = None) -> tuple[HeadSpec, AttentionWeights]:
    """MHA2MLA-style layer: per kv head the `rope_keep` rotary pairs of highest logit energy (pair_importance,
    the data-aware counterpart of MHA2MLA's 2-norm ranking) keep their rotation; the other key coordinates lose
    it and, with the values, are factorised jointly (whitened truncated SVD of [W_K,nope; W_V]) into a rank-r
    latent. Exact when every pair is kept and r is full; dropping rotation changes the function, which the
    distillation then fits (MHA2MLA fine-tunes)."""
    hd, half = g.head_dim, g.head_dim // 2
    p = int(lp.rope_keep or 0)
    if lp.keep_kv is not None or lp.keep_rep is not None or (lp.qk_dim, lp.v_dim) != (hd, hd):
        raise ValueError(f"layer {layer_idx}: an mla layer keeps every head at full width")
    if not 1 <= p <= half:
        raise ValueError(f"layer {layer_idx}: rope_keep must be in [1, {half}]; got {lp.rope_keep}")
    nope = g.n_kv * (hd - 2 * p)
    if lp.rank is None or not 1 <= int(lp.rank) <= nope + g.n_kv * hd:
        raise ValueError(f"layer {layer_idx}: rank must be in [1, {nope + g.n_kv * hd}]; got {lp.rank}")
    if w.q_norm is not None:
        raise ValueError(f"layer {layer_idx}: mla layers cannot carry per-head q/k norms (Qwen3)")
    imp = pair_importance(w, M, g)
    pairs = [sorted(torch.topk(imp[kv], p).indices.tolist()) for kv in range(g.n_kv)]
    f32 = lambda t: None if t is None else t.detach().float().cpu().clone()  # noqa: E731
    Wq, Wk = f32(w.q).view(g.n_kv, g.n_rep, hd, -1), f32(w.k).view(g.n_kv, hd, -1)
    bq = f32(w.q_bias).view(g.n_kv, g.n_rep, hd) if w.q_bias is not None else None
    bk = f32(w.k_bias).view(g.n_kv, hd) if w.k_bias is not None else None
    q_rows, q_b, kr_rows, kr_b, kn_rows, kn_b = [], [], [], [], [], []
    for kv, ps in enumerate(pairs):
        rot = ps + [j + half for j in ps]
        rest = [j for j in range(hd) if j not in set(rot)]
        order = torch.tensor(rot + rest)
        q_rows += [Wq[kv, h, order] for h in range(g.n_rep)]
        kr_rows.append(Wk[kv, torch.tensor(rot)])
        kn_rows.append(Wk[kv, torch.tensor(rest)] if rest else Wk.new_zeros(0, Wk.shape[-1]))
        if bq is not None:
            q_b += [bq[kv, h, order] for h in range(g.n_rep)]
        if bk is not None:
            kr_b.append(bk[kv, torch.tensor(rot)])
            kn_b.append(bk[kv, torch.tensor(rest)] if rest else bk.new_zeros(0))
    W_kn = torch.cat(kn_rows)
    joint = torch.cat([W_kn, f32(w.v)])
    C = None if M is None else M.double()[:-1, :-1]
    up, down = whitened_low_rank(joint, C, int(lp.rank), cache if cache is not None else {})
    spec = HeadSpec(g.n_kv, g.n_rep, hd, hd, pairs, w.scale, w.bias, False, kind="mla", rank=int(lp.rank),
                    rope_keep=p)
    red = AttentionWeights(q=torch.cat(q_rows), k=up[: W_kn.shape[0]].contiguous(), v=up[W_kn.shape[0]:].contiguous(),
                           o=f32(w.o), q_bias=torch.cat(q_b) if q_b else None,
                           k_bias=torch.cat(kn_b) if kn_b else None, v_bias=f32(w.v_bias), o_bias=f32(w.o_bias),
                           scale=w.scale, kv_down=down, k_rope=torch.cat(kr_rows),
                           k_rope_bias=torch.cat(kr_b) if kr_b else None)
    return spec, red
