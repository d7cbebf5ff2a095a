"""Strategies that keep every head's form (full-rank projections): narrower heads, fewer heads, or both.

- uniform: the same query-key and value width in every layer (the largest that fits);
- depth: the paper's principle, keep early layers and reduce later ones more: width fraction falling linearly
  with depth, f_l = b + a (1 - 2 l / (L-1)) with a = min(1 - b, b - step/hd) (mean b), rounded to the grid, then
  trimmed from the deepest layers until the budget holds;
- measured (ours): for every layer and candidate width, the estimated loss increase of the reduced layer
  (`estimates.layer_error`), measured separately for query-key and for value widths and added, plus whole-head
  removal candidates; the exact knapsack picks one candidate per layer under the budget;
- prune-heads (baseline): whole heads removed: per layer, how many kv heads and query heads per kv head to keep
  (ranked by the energy of each head's output on calibration text), chosen by the same knapsack.
Families whose query-key width cannot be narrowed exactly (per-head q/k norms) get candidates with the full
query-key width only. Under a target whose runtime keeps head widths fixed (`targets`, e.g. llama.cpp) every
strategy here chooses head counts instead of widths: uniform keeps the same (kv heads, query heads per kv head) in
every layer, heads ranked by the weights' own energy ||W_O^h W_V^g||; depth lets the number of kv heads fall
linearly with depth; prune-heads ranks heads by output energy on calibration text; measured ranks them by the
measured loss increase of removing each one; both knapsacks may also remove a layer's attention.
"""

from __future__ import annotations

import numpy as np
import torch
from tqdm.auto import tqdm

from headalloc.compression.calibration import Calibration
from headalloc.compression.families import adapter_for
from headalloc.compression.planning.estimates import (candidate_error, empty_layer_error, empty_plan, head_energy,
                                                      head_removal_error, layer_error, weight_head_energy, with_grads)
from headalloc.compression.planning.knapsack import budget_capacity, choose, grid
from headalloc.compression.planning.registry import PlanRequest, strategy
from headalloc.compression.planning.state import MeasureOptions, Measurements, PruneOptions, WidthErrors
from headalloc.compression.reduce import Geometry, reduce_layer
from headalloc.compression.spec import LayerPlan


@strategy("uniform", needs_calibration=False)
def uniform_plan(req: PlanRequest):
    """The same query-key and value width in every layer (the largest that fits)."""
    model, budget, kind, step, target = req.model, req.budget, req.kind, req.step, req.target
    g = Geometry.of(model)
    if target.widths_fixed:
        return _uniform_heads(model, g, budget, kind), {}
    hd = g.head_dim
    full, cap = budget_capacity(g, budget, kind)
    qk = lambda d: d if g.qk_reducible else hd  # noqa: E731
    fits = [d for d in grid(hd, step) if g.spec(LayerPlan(qk(d), d)).cost(g.hidden, kind) * g.n_layers <= cap]
    if not fits:
        raise ValueError(f"budget {budget} is below the smallest uniform width {step}; lower --step or raise the budget")
    return [LayerPlan(qk(max(fits)), max(fits)) for _ in range(g.n_layers)], {}


@strategy("depth", needs_calibration=False)
def depth_plan(req: PlanRequest):
    """The paper's principle: early layers kept wider, widths falling linearly with depth."""
    model, budget, kind, step, target = req.model, req.budget, req.kind, req.step, req.target
    g = Geometry.of(model)
    if target.widths_fixed:
        return _depth_heads(model, g, budget, kind), {}
    hd, L = g.head_dim, g.n_layers
    full, cap = budget_capacity(g, budget, kind)
    grid(hd, step)
    a = max(0.0, min(1 - budget, budget - step / hd))
    dims = [int(min(hd, max(step, step * round((budget + a * (1 - 2 * l / max(1, L - 1))) * hd / step))))
            for l in range(L)]
    qk = lambda d: d if g.qk_reducible else hd  # noqa: E731
    total = lambda: sum(g.spec(LayerPlan(qk(d), d)).cost(g.hidden, kind) for d in dims)  # noqa: E731
    l = L - 1
    while total() > cap:  # trim from the deepest layers first
        if all(d == step for d in dims):
            raise ValueError(f"budget {budget} is below the smallest depth schedule; raise the budget")
        if dims[l] > step:
            dims[l] -= step
        l = l - 1 if l > 0 else L - 1
    return [LayerPlan(qk(d), d) for d in dims], {}


def _heads_plan(g: Geometry, nk: int, nr: int, energy: torch.Tensor) -> LayerPlan:
    """Full-width plan keeping the nk kv heads and, in each, the nr query heads of highest `energy` (n_kv, n_rep)."""
    kv_order = torch.argsort(energy.sum(1), descending=True).tolist()
    kept = sorted(kv_order[:nk])
    reps = [sorted(torch.argsort(energy[k], descending=True)[:nr].tolist()) for k in kept]
    return LayerPlan(g.head_dim, g.head_dim, keep_kv=kept, keep_rep=reps)


def _uniform_heads(model, g: Geometry, budget: float, kind: str) -> list[LayerPlan]:
    """The same (kv heads, query heads per kv head) in every layer: the costliest that fits (ties: more kv heads)."""
    _, cap = budget_capacity(g, budget, kind)
    energy = weight_head_energy(model)
    shapes = [(nk, nr) for nk in range(1, g.n_kv + 1) for nr in range(1, g.n_rep + 1)]
    cost = lambda nk, nr: g.spec(LayerPlan(g.head_dim, g.head_dim, list(range(nk)), [list(range(nr))] * nk)  # noqa: E731
                                 ).cost(g.hidden, kind) * g.n_layers
    fits = [(cost(nk, nr), nk, nr) for nk, nr in shapes if cost(nk, nr) <= cap]
    if not fits:
        raise ValueError(f"budget {budget} is below one head per layer in every layer; raise the budget (or use "
                         f"the measured or prune-heads strategy, which may remove a layer's attention)")
    _, nk, nr = max(fits)
    return [_heads_plan(g, nk, nr, energy[l]) for l in range(g.n_layers)]


def _depth_heads(model, g: Geometry, budget: float, kind: str) -> list[LayerPlan]:
    """Kv heads per layer falling linearly with depth (mean fraction `budget`), all query heads per kv head
    kept, trimmed from the deepest layers (kv heads, then query heads) until the budget holds."""
    L, n = g.n_layers, g.n_kv
    _, cap = budget_capacity(g, budget, kind)
    energy = weight_head_energy(model)
    a = max(0.0, min(1 - budget, budget - 1 / n))
    nks = [int(min(n, max(1, round((budget + a * (1 - 2 * l / max(1, L - 1))) * n)))) for l in range(L)]
    nrs = [g.n_rep] * L
    plans = lambda: [_heads_plan(g, nk, nr, energy[l]) for l, (nk, nr) in enumerate(zip(nks, nrs))]  # noqa: E731
    total = lambda: sum(g.spec(lp).cost(g.hidden, kind) for lp in plans())  # noqa: E731
    l = L - 1
    while total() > cap:
        if all(k == 1 for k in nks) and all(r == 1 for r in nrs):
            raise ValueError(f"budget {budget} is below one head per layer in every layer; raise the budget (or "
                             f"use the measured or prune-heads strategy, which may remove a layer's attention)")
        if nks[l] > 1:
            nks[l] -= 1
        elif all(k == 1 for k in nks) and nrs[l] > 1:
            nrs[l] -= 1
        l = l - 1 if l > 0 else L - 1
    return plans()


@torch.no_grad()
def _measure_pruning(model, cal: Calibration, kind: str, progress: bool, store: Measurements,
                     measure: MeasureOptions, rank: str = "energy", empty: bool = False, empty_from: int = 0):
    """Per layer: every (kv heads kept, query heads per kv head kept) option at full width, the heads
    ranked by output energy (`rank="energy"`) or by the measured error of removing each one
    (`rank="measured"`), with its cost and measured error; with `empty`, also no attention at all (in layers
    from `empty_from` on)."""
    return store.get(PruneOptions(kind, rank, empty, empty_from, measure),
                     lambda: _prune_options(model, cal, kind, progress, store, rank, empty, empty_from))


def _prune_options(model, cal: Calibration, kind: str, progress: bool, store: Measurements, rank: str, empty: bool,
                   empty_from: int):
    ad, g = adapter_for(model), Geometry.of(model)
    score = head_energy(model, cal) if rank == "energy" else head_removal_error(model, cal, store)
    options, plans = [], []
    for l in tqdm(range(g.n_layers), desc=f"measuring head pruning ({rank} ranking)", disable=not progress):
        e, w = score[l], ad.weights(model, l)
        opts, ps = [], []
        for nk in range(1, g.n_kv + 1):
            for nr in range(1, g.n_rep + 1):
                lp = _heads_plan(g, nk, nr, e)
                err = 0.0 if (nk == g.n_kv and nr == g.n_rep) else layer_error(
                    model, l, cal, *reduce_layer(w, None, lp, g, l), store=store)
                opts.append((g.spec(lp).cost(g.hidden, kind), err))
                ps.append(lp)
        if empty and l >= empty_from:
            lp = empty_plan(g)
            opts.append((g.spec(lp).cost(g.hidden, kind), empty_layer_error(model, l, cal, store)))
            ps.append(lp)
        options.append(opts)
        plans.append(ps)
    return options, plans, score


@strategy("prune-heads")
def prune_plan(req: PlanRequest):
    """Baseline: remove whole heads, chosen per layer by measured error under the budget."""
    g = req.geometry
    cal = with_grads(req.model, req.calibration, req.measurements, req.progress)
    options, plans, energy = _measure_pruning(req.model, cal, req.kind, req.progress, req.measurements,
                                              req.options.measure, empty=req.target.propose_empty,
                                              empty_from=int(req.target.first_layer_attention))
    plan, _ = choose(g, options, plans, req.budget, req.kind)
    return plan, {"head_energy": [e.tolist() for e in energy]}


@strategy("measured")
def measured_plan(req: PlanRequest, heads: bool = True):
    """Ours: per layer and head, measured loss increase of each candidate; exact knapsack under the budget."""
    model, budget, kind, step, target, progress = req.model, req.budget, req.kind, req.step, req.target, req.progress
    store, measure = req.measurements, req.options.measure
    cal = with_grads(model, req.calibration, store, progress)
    g = Geometry.of(model)
    if target.widths_fixed:  # head counts only, heads ranked by their measured removal error
        options, plans, score = _measure_pruning(model, cal, kind, progress, store, measure, rank="measured",
                                                 empty=target.propose_empty,
                                                 empty_from=int(target.first_layer_attention))
        plan, predicted = choose(g, options, plans, budget, kind)
        return plan, {"head_removal_error": [e.tolist() for e in score],
                      "layers_without_attention": [l for l, lp in enumerate(plan) if lp.empty],
                      "predicted_error": predicted}
    dims = grid(g.head_dim, step)
    e_qk, e_v = store.get(WidthErrors(tuple(dims), measure),
                          lambda: _measure_widths(model, cal, dims, progress, measure, store))
    extra = _measure_pruning(model, cal, kind, progress, store, measure)[:2] if heads else None
    return _measured_choice(g, dims, e_qk, e_v, budget, kind, extra)


def _measure_widths(model, cal: Calibration, dims: list[int], progress: bool, measure: MeasureOptions,
                    store: Measurements):
    """Per layer and width: the error of narrowing only the query-key width, and only the value width."""
    g = Geometry.of(model)
    hd, L = g.head_dim, g.n_layers
    e_qk, e_v = np.zeros((L, len(dims))), np.zeros((L, len(dims)))
    for l in tqdm(range(L), desc="measuring layer errors", disable=not progress):
        svd_cache: dict = {}
        for j, d in enumerate(dims):
            if d < hd:
                # not a candidate where query-key widths cannot be cut (per-head q/k norms)
                e_qk[l, j] = candidate_error(model, l, cal, LayerPlan(d, hd), svd_cache, measure=measure,
                                             store=store) if g.qk_reducible else np.inf
                e_v[l, j] = candidate_error(model, l, cal, LayerPlan(hd, d), svd_cache, measure=measure, store=store)
    return e_qk, e_v


def _measured_choice(g: Geometry, dims, e_qk, e_v, budget, kind, extra=None):
    hd = g.head_dim
    options, labels = [], []
    for l in range(g.n_layers):
        opts, labs = [], []
        for i, qk in enumerate(dims):
            if qk < hd and not g.qk_reducible:
                continue
            for j, v in enumerate(dims):
                lp = LayerPlan(qk, v)
                opts.append((g.spec(lp).cost(g.hidden, kind), e_qk[l, i] + e_v[l, j]))
                labs.append(lp)
        if extra is not None:  # head-removal candidates (full width); the keep-everything one is already in
            for (c, e), lp in zip(extra[0][l], extra[1][l]):
                if len(lp.keep_kv) < g.n_kv or any(len(x) < g.n_rep for x in lp.keep_rep):
                    opts.append((c, e))
                    labs.append(lp)
        options.append(opts)
        labels.append(labs)
    plan, predicted = choose(g, options, labels, budget, kind)
    return plan, {"grid": dims, "err_qk": np.where(np.isfinite(e_qk), e_qk, -1).tolist(), "err_v": e_v.tolist(),
                  "layers_with_heads_removed": [l for l, lp in enumerate(plan) if lp.keep_kv is not None],
                  "predicted_error": predicted}
