"""Where to cut: per-layer plans that meet a global budget, by strategy.

Budget b in (0, 1]: attention parameters (or, with kind="kv", KV-cache bytes per token) at most b
times the teacher's. Candidate widths are multiples of `step` (8 by default) up to the head dim.
- uniform: the same qk and v width in every layer (the largest that fits);
- depth: the paper's principle, keep early layers and reduce later ones more: width fraction
  falling linearly with depth, f_l = b + a (1 - 2 l / (L-1)) with a = min(1 - b, b - step/hd) (mean b),
  rounded to the grid, then trimmed from the deepest layers until the budget holds;
- measured (ours): for every layer and candidate width, the estimated loss increase of the reduced layer:
  the Fisher-weighted error of its attention output on calibration text (LM-loss gradient . change)^2, measured
  separately for qk and for v and added; a multiple-choice knapsack (exact DP over layers) then
  picks one (qk, v) per layer minimising the total error under the budget;
- prune-heads (baseline): whole heads removed: per layer, how many kv heads and query heads per kv
  head to keep (ranked by the energy of each head's output on calibration text), chosen by the same
  knapsack over the measured error of each option.
"""

from __future__ import annotations

import math

import numpy as np
import torch

from headalloc.compression.llama import (LayerPlan, attention_params_of, head_dim_of, reduce_layer,
                                         reduced_attention)

STRATEGIES = ("uniform", "depth", "measured", "prune-heads")
BUDGET_KINDS = ("params", "kv")


def check_budget(budget: float, strategy: str, kind: str = "params") -> None:
    if not (isinstance(budget, (int, float)) and 0 < budget <= 1):
        raise ValueError(f"budget must be a fraction in (0, 1] of the original; got {budget!r}")
    if strategy not in STRATEGIES:
        raise ValueError(f"unknown strategy {strategy!r}; choose one of {', '.join(STRATEGIES)}")
    if kind not in BUDGET_KINDS:
        raise ValueError(f"budget kind must be one of {BUDGET_KINDS}; got {kind!r}")


def _spec(n_kv: int, n_rep: int, qk: int, v: int) -> dict:
    return {"n_kv_heads": n_kv, "n_rep": n_rep, "qk_dim": qk, "v_dim": v}


def cost_of(spec: dict, hidden: int, kind: str) -> int:
    if kind == "kv":
        return spec["n_kv_heads"] * (spec["qk_dim"] + spec["v_dim"])
    return attention_params_of([spec], hidden)


def knapsack(options: list[list[tuple[int, float]]], capacity: int) -> list[int]:
    """Exact multiple-choice knapsack: one option per layer, total cost <= capacity, minimal total error."""
    g = 0
    for opts in options:
        for c, _ in opts:
            g = math.gcd(g, int(c))
    g = max(g, 1)
    cap = capacity // g
    L = len(options)
    best = np.full((L + 1, cap + 1), np.inf)
    best[0, :] = 0.0  # best[l][b]: min error of layers < l with cost <= b
    choice = np.zeros((L, cap + 1), dtype=np.int64)
    for l, opts in enumerate(options):
        for j, (c, e) in enumerate(opts):
            c = int(c) // g
            if c > cap:
                continue
            cand = np.full(cap + 1, np.inf)
            cand[c:] = best[l, : cap + 1 - c] + e
            better = cand < best[l + 1]
            best[l + 1][better] = cand[better]
            choice[l][better] = j
    if not np.isfinite(best[L, cap]):
        raise ValueError(f"no plan meets the budget: even the smallest option of every layer costs "
                         f"{sum(min(c for c, _ in o) for o in options)} > {capacity}; raise the budget")
    picks, b = [], cap
    for l in range(L - 1, -1, -1):
        j = int(choice[l][b])
        picks.append(j)
        b -= int(options[l][j][0]) // g
    return picks[::-1]


def grid(hd: int, step: int) -> list[int]:
    return list(range(step, hd + 1, step))


def uniform_plan(cfg, budget: float, kind: str = "params", step: int = 8) -> list[LayerPlan]:
    hd, L, hidden = head_dim_of(cfg), cfg.num_hidden_layers, cfg.hidden_size
    g, r = cfg.num_key_value_heads, cfg.num_attention_heads // cfg.num_key_value_heads
    full = cost_of(_spec(g, r, hd, hd), hidden, kind)
    fits = [d for d in grid(hd, step) if cost_of(_spec(g, r, d, d), hidden, kind) <= budget * full + 1e-9]
    if not fits:
        raise ValueError(f"budget {budget} is below the smallest uniform width {step}; lower --step or raise the budget")
    return [LayerPlan(max(fits), max(fits)) for _ in range(L)]


def depth_plan(cfg, budget: float, kind: str = "params", step: int = 8) -> list[LayerPlan]:
    hd, L, hidden = head_dim_of(cfg), cfg.num_hidden_layers, cfg.hidden_size
    g, r = cfg.num_key_value_heads, cfg.num_attention_heads // cfg.num_key_value_heads
    a = max(0.0, min(1 - budget, budget - step / hd))
    dims = []
    for l in range(L):
        f = budget + a * (1 - 2 * l / max(1, L - 1))
        dims.append(int(min(hd, max(step, step * round(f * hd / step)))))
    full = cost_of(_spec(g, r, hd, hd), hidden, kind) * L
    total = lambda: sum(cost_of(_spec(g, r, d, d), hidden, kind) for d in dims)  # noqa: E731
    l = L - 1
    while total() > budget * full + 1e-9:  # trim from the deepest layers first
        if dims[l] > step:
            dims[l] -= step
        l = l - 1 if l > 0 else L - 1
        if all(d == step for d in dims) and total() > budget * full + 1e-9:
            raise ValueError(f"budget {budget} is below the smallest depth schedule; raise the budget")
    return [LayerPlan(d, d) for d in dims]


def attention_output_grads(model, data: dict) -> list[list[torch.Tensor]]:
    """Per layer and calibration window: gradient of the LM loss (next-token NLL on the calibration
    text) with respect to the layer's attention output."""
    grads: list[list[torch.Tensor]] = [[] for _ in model.model.layers]
    handles = []
    for i, layer in enumerate(model.model.layers):
        def hook(mod, args, out, i=i):
            out[0].register_hook(lambda g, i=i: grads[i].append(g.detach().clone()))
        handles.append(layer.self_attn.register_forward_hook(hook))
    trainable = [p for p in model.parameters() if p.requires_grad]
    for p in trainable:  # gradients reach the activations through the embeddings; no weight gradients
        p.requires_grad_(False)
    try:
        for w in data["windows"]:
            model.zero_grad(set_to_none=True)
            ids = w[None]
            with torch.enable_grad():
                emb = model.model.embed_tokens(ids).detach().requires_grad_(True)  # grads flow without weights
                loss = model(inputs_embeds=emb, labels=ids).loss * ids.shape[1]
                loss.backward()
    finally:
        for h in handles:
            h.remove()
        for p in trainable:
            p.requires_grad_(True)
        model.zero_grad(set_to_none=True)
    return grads


@torch.no_grad()
def _teacher_outputs(model, l: int, data: dict) -> list[torch.Tensor]:
    key = "_teacher_out"
    cache = data.setdefault(key, {})
    if l not in cache:
        attn = model.model.layers[l].self_attn
        cache[l] = [attn(hidden_states=X, position_embeddings=pe, attention_mask=None)[0]
                    for X, pe in zip(data["inputs"][l], data["pos"])]
    return cache[l]


@torch.no_grad()
def _layer_error(model, l: int, data: dict, spec_w, hd: int) -> float:
    """Estimated loss increase from replacing layer l's attention: the Fisher-weighted output error
    mean_t (g_t . dy_t)^2, with g the LM-loss gradient at the attention output (second-order term of
    the loss change; layers are treated as independent). Without gradients: |dy|^2 relative to the
    residual stream entering the layer."""
    grads = data.get("grads")
    err, n = 0.0, 0
    for i, (X, (cos, sin)) in enumerate(zip(data["inputs"][l], data["pos"])):
        dy = _teacher_outputs(model, l, data)[i] - reduced_attention(spec_w[0], spec_w[1], X, cos, sin, hd)
        if grads is not None:
            err += float((grads[l][i] * dy).double().sum(-1).square().sum())
        else:
            err += float(dy.double().square().sum(-1).mean()) / data["resid_sq"][l]
        n += 1
    return err / n


@torch.no_grad()
def measured_plan(model, data: dict, budget: float, kind: str = "params", step: int = 8,
                  progress: bool = True, heads: bool = True) -> tuple[list[LayerPlan], dict]:
    """Per layer, every candidate is scored by its measured (Fisher-weighted) output error: narrower
    query/key and value widths for all heads, and (with `heads`) removing whole kv heads or query heads
    per kv head, ranked by output energy; an exact multiple-choice knapsack picks one candidate per
    layer under the global budget."""
    cfg = model.config
    hd, L, hidden = head_dim_of(cfg), cfg.num_hidden_layers, cfg.hidden_size
    g, r = cfg.num_key_value_heads, cfg.num_attention_heads // cfg.num_key_value_heads
    dims = grid(hd, step)
    if "grads" not in data:
        data["grads"] = attention_output_grads(model, data)
    cached = data.get("_measured_errors")
    if cached is not None and cached[0] == dims:  # the measurement does not depend on the budget
        e_qk, e_v = cached[1], cached[2]
    else:
        e_qk, e_v = _measure_widths(model, data, dims, progress)
        data["_measured_errors"] = (dims, e_qk, e_v)
    extra = None
    if heads:  # per-head choices too: removing whole kv / query heads competes with narrowing them
        if f"_prune_options_{kind}" not in data:
            data[f"_prune_options_{kind}"] = _measure_pruning(model, data, kind, progress)
        extra = data[f"_prune_options_{kind}"][:2]
    return _measured_choice(cfg, dims, e_qk, e_v, budget, kind, extra)


def _measure_widths(model, data, dims, progress):
    from tqdm.auto import tqdm

    cfg = model.config
    hd, L = head_dim_of(cfg), cfg.num_hidden_layers
    g, r = cfg.num_key_value_heads, cfg.num_attention_heads // cfg.num_key_value_heads
    e_qk = np.zeros((L, len(dims)))
    e_v = np.zeros((L, len(dims)))
    for l in tqdm(range(L), desc="measuring layer errors", disable=not progress):
        attn, C = model.model.layers[l].self_attn, data["cov"][l]
        svd_cache: dict = {}
        for j, d in enumerate(dims):
            if d < hd:
                e_qk[l, j] = _layer_error(model, l, data, reduce_layer(attn, C, LayerPlan(d, hd), hd, g, r, l,
                                                                       svd_cache), hd)
                e_v[l, j] = _layer_error(model, l, data, reduce_layer(attn, C, LayerPlan(hd, d), hd, g, r, l,
                                                                      svd_cache), hd)
        data.get("_teacher_out", {}).pop(l, None)
    return e_qk, e_v


def _measured_choice(cfg, dims, e_qk, e_v, budget, kind, extra=None):
    hd, L, hidden = head_dim_of(cfg), cfg.num_hidden_layers, cfg.hidden_size
    g, r = cfg.num_key_value_heads, cfg.num_attention_heads // cfg.num_key_value_heads
    options, labels = [], []
    for l in range(L):
        opts, labs = [], []
        for i, qk in enumerate(dims):
            for j, v in enumerate(dims):
                opts.append((cost_of(_spec(g, r, qk, v), hidden, kind), e_qk[l, i] + e_v[l, j]))
                labs.append(LayerPlan(qk, v))
        if extra is not None:  # head-removal candidates (full width); the keep-everything one is already in
            for (c, e), lp in zip(extra[0][l], extra[1][l]):
                if lp.keep_kv is not None and (len(lp.keep_kv) < g or any(len(x) < r for x in lp.keep_rep)):
                    opts.append((c, e))
                    labs.append(lp)
        options.append(opts)
        labels.append(labs)
    full = cost_of(_spec(g, r, hd, hd), hidden, kind) * L
    picks = knapsack(options, int(budget * full + 1e-6))
    plan = [labels[l][j] for l, j in enumerate(picks)]
    return plan, {"grid": dims, "err_qk": e_qk.tolist(), "err_v": e_v.tolist(),
                  "layers_with_heads_removed": [l for l, lp in enumerate(plan) if lp.keep_kv is not None],
                  "predicted_error": float(sum(options[l][j][1] for l, j in enumerate(picks)))}


@torch.no_grad()
def head_energy(model, data: dict) -> list[torch.Tensor]:
    """Per layer (n_kv, n_rep): mean squared norm of each query head's contribution W_O^h o_h."""
    cfg = model.config
    hd, g = head_dim_of(cfg), cfg.num_key_value_heads
    r = cfg.num_attention_heads // g
    out = []
    for l, layer in enumerate(model.model.layers):
        attn = layer.self_attn
        acc = torch.zeros(g, r, dtype=torch.float64)
        for X, (cos, sin) in zip(data["inputs"][l], data["pos"]):
            for kv in range(g):
                for h in range(r):
                    spec = {"n_kv_heads": 1, "n_rep": 1, "qk_dim": hd, "v_dim": hd,
                            "rope_pairs": [list(range(hd // 2))], "scale": attn.scaling}
                    q = attn.q_proj.weight[(kv * r + h) * hd:(kv * r + h + 1) * hd]
                    k = attn.k_proj.weight[kv * hd:(kv + 1) * hd]
                    v = attn.v_proj.weight[kv * hd:(kv + 1) * hd]
                    o = attn.o_proj.weight[:, (kv * r + h) * hd:(kv * r + h + 1) * hd]
                    y = reduced_attention(spec, (q, k, v, o), X, cos, sin, hd)
                    acc[kv, h] += float(y.double().square().sum(-1).mean())
        out.append(acc / len(data["pos"]))
    return out


@torch.no_grad()
def prune_plan(model, data: dict, budget: float, kind: str = "params", progress: bool = True):
    from tqdm.auto import tqdm

    cfg = model.config
    hd, L, hidden = head_dim_of(cfg), cfg.num_hidden_layers, cfg.hidden_size
    g, r = cfg.num_key_value_heads, cfg.num_attention_heads // cfg.num_key_value_heads
    if f"_prune_options_{kind}" in data:
        options, plans, energy = data[f"_prune_options_{kind}"]
    else:
        options, plans, energy = _measure_pruning(model, data, kind, progress)
        data[f"_prune_options_{kind}"] = (options, plans, energy)
    full = cost_of(_spec(g, r, hd, hd), hidden, kind) * L
    picks = knapsack(options, int(budget * full + 1e-6))
    return [plans[l][j] for l, j in enumerate(picks)], {"head_energy": [e.tolist() for e in energy]}


@torch.no_grad()
def _measure_pruning(model, data, kind, progress):
    from tqdm.auto import tqdm

    cfg = model.config
    hd, L, hidden = head_dim_of(cfg), cfg.num_hidden_layers, cfg.hidden_size
    g, r = cfg.num_key_value_heads, cfg.num_attention_heads // cfg.num_key_value_heads
    if "grads" not in data:
        data["grads"] = attention_output_grads(model, data)
    energy = head_energy(model, data)
    options, plans = [], []
    for l in tqdm(range(L), desc="measuring head pruning", disable=not progress):
        e = energy[l]
        kv_order = torch.argsort(e.sum(1), descending=True).tolist()
        opts, ps = [], []
        for nk in range(1, g + 1):
            kept = sorted(kv_order[:nk])
            for nr in range(1, r + 1):
                reps = [sorted(torch.argsort(e[k], descending=True)[:nr].tolist()) for k in kept]
                lp = LayerPlan(hd, hd, keep_kv=kept, keep_rep=reps)
                err = 0.0 if (nk == g and nr == r) else _layer_error(
                    model, l, data, reduce_layer(model.model.layers[l].self_attn, None, lp, hd, g, r, l), hd)
                opts.append((cost_of(_spec(nk, nr, hd, hd), hidden, kind), err))
                ps.append(lp)
        options.append(opts)
        plans.append(ps)
        data.get("_teacher_out", {}).pop(l, None)
    return options, plans, energy


def make_plan(model, strategy: str, budget: float, data: dict | None, kind: str = "params", step: int = 8,
              progress: bool = True) -> tuple[list[LayerPlan], dict]:
    """Per-layer plan for `strategy` at `budget` (data: calibration inputs from collect_layer_inputs)."""
    check_budget(budget, strategy, kind)
    if strategy == "uniform":
        return uniform_plan(model.config, budget, kind, step), {}
    if strategy == "depth":
        return depth_plan(model.config, budget, kind, step), {}
    if data is None:
        raise ValueError(f"strategy {strategy!r} needs calibration data")
    if strategy == "measured":
        return measured_plan(model, data, budget, kind, step, progress)
    return prune_plan(model, data, budget, kind, progress)
