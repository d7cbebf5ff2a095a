"""`measured-lowrank` (ours): every head kept; the query and output projections factorised and the keys and values
through latents, at per-layer ranks chosen by the exact knapsack over each candidate's measured loss increase,
the plan picked among exponents by the whole model's calibration loss (`select`). With
`PlanOptions.output_groups` output projections are also offered factorised per kv group (a block-diagonal down
factor, the up factor shared and refitted by least squares); the knapsack picks per layer."""

from __future__ import annotations

import numpy as np
from tqdm.auto import tqdm

from headalloc.compression.planning.estimates import candidate_error, with_grads
from headalloc.compression.planning.latent import latent_errors
from headalloc.compression.planning.registry import PlanRequest, strategy
from headalloc.compression.planning.select import choose_by_exponent
from headalloc.compression.planning.state import QueryOutputErrors
from headalloc.compression.reduce import Geometry
from headalloc.compression.spec import LayerPlan


def rank_grid(n_in: int, n_out: int, step: int, n: int = 8) -> list[int]:
    """Ranks worth factorising an (n_out, n_in) projection at: multiples of about a ninth of the break-even rank
    n_in n_out / (n_in + n_out) (a multiple of `step`), below it (at or above it the factors cost more
    parameters than the dense matrix)."""
    even = n_in * n_out / (n_in + n_out)
    s = max(step, step * round(even / (n + 1) / step))
    return [r for r in range(s, int(even) + 1, s) if r < even][:n]


def _pareto(opts: list[tuple]) -> list[tuple]:
    """(cost, error, ...) options not beaten by a cheaper-or-equal one with lower error."""
    out, best = [], np.inf
    for o in sorted(opts, key=lambda t: (t[0], t[1])):
        if o[1] < best:
            out.append(o)
            best = o[1]
    return out


@strategy("measured-lowrank")
def measured_lowrank_plan(req: PlanRequest):
    """Ours, factorised: every head kept; q, o and k/v latents at per-layer ranks by measured error."""
    model, budget, kind, step, target, progress = req.model, req.budget, req.kind, req.step, req.target, req.progress
    store, measure = req.measurements, req.options.measure
    if target.widths_fixed:
        raise ValueError(f"measured-lowrank: factorised projections and latent keys/values have no counterpart in "
                         f"{target.name}; use --target any (or the measured strategy)")
    cal = with_grads(model, req.calibration, store, progress)
    g = Geometry.of(model)
    hd, nq = g.head_dim, g.n_kv * g.n_rep * g.head_dim
    full_lp = g.full()
    base = g.spec(full_lp).cost(g.hidden, kind)
    delta = lambda lp: g.spec(lp).cost(g.hidden, kind) - base  # noqa: E731  (costs add across projections)
    rq, ro = rank_grid(g.hidden, nq, step), rank_grid(nq, g.hidden, step)
    # output_groups: also output projections with a block-diagonal down factor, one block per kv group, at
    # total ranks costing about what the whole-matrix grid's do (the knapsack picks per layer)
    og = g.n_kv if req.options.output_groups and g.n_kv > 1 and g.n_rep * hd <= g.hidden else 0
    rg = sorted({og * step * max(1, round(r * (nq + g.hidden) / (nq // og + g.hidden) / (og * step))) for r in ro}
                if og else set())
    rg = [r for r in rg if r * (nq // og + g.hidden) < nq * g.hidden and r // og <= nq // og]

    def measure_all():
        e = np.zeros((g.n_layers, 3, max(len(rq), len(ro), len(rg))))
        for l in tqdm(range(g.n_layers), desc="measuring query/output ranks", disable=not progress):
            sc: dict = {}
            for i, r in enumerate(rq):
                e[l, 0, i] = candidate_error(model, l, cal, LayerPlan(hd, hd, rank_q=r), sc, measure=measure, store=store)
            for i, r in enumerate(ro):
                e[l, 1, i] = candidate_error(model, l, cal, LayerPlan(hd, hd, rank_o=r), sc, output_factor=True,
                                             measure=measure, store=store)
            for i, r in enumerate(rg):
                e[l, 2, i] = candidate_error(model, l, cal, LayerPlan(hd, hd, rank_o=r, o_groups=og), sc,
                                             output_factor=True, measure=measure, store=store)
        return e

    e_qo = store.get(QueryOutputErrors(tuple(rq), tuple(ro), og, tuple(rg), measure), measure_all)
    latent_ok = not g.qk_norm  # latent keys cannot carry per-head q/k norms
    if kind == "kv" and not latent_ok:
        raise ValueError("measured-lowrank: this family normalises every query and key head (q/k norms), so keys "
                         "cannot go through a latent and the strategy cannot shrink the KV cache; use the measured "
                         "strategy (narrower values, fewer heads) for a KV budget")
    if latent_ok:
        # a coarser rank grid than measured-latent's (multiples of 4 * step): under a parameter budget the
        # query/output ranks carry most of the choice, and the planning time stays near measured's
        kv_cands, e_kv = latent_errors(model, cal, 2 * step, progress, measure, store)
        full_kv = g.n_kv * hd
        kv_ranks = [r for r in kv_cands if r < full_kv] + [full_kv]
    options, labels = [], []
    for l in range(g.n_layers):
        qs = [(0, 0.0, None)] + [(delta(LayerPlan(hd, hd, rank_q=r)), e_qo[l, 0, i], r) for i, r in enumerate(rq)]
        os_ = [(0, 0.0, (None, None))] + \
            [(delta(LayerPlan(hd, hd, rank_o=r)), e_qo[l, 1, i], (r, None)) for i, r in enumerate(ro)] + \
            [(delta(LayerPlan(hd, hd, rank_o=r, o_groups=og)), e_qo[l, 2, i], (r, og)) for i, r in enumerate(rg)]
        qo = _pareto([(a[0] + b[0], a[1] + b[1], a[2], b[2]) for a in _pareto(qs) for b in _pareto(os_)])
        kvs = [(0, 0.0, None, None)]
        if latent_ok:
            err = lambda j, r: 0.0 if r == full_kv else e_kv[l, j, kv_cands.index(r)]  # noqa: E731
            kvs += [(delta(LayerPlan(hd, hd, kind="palu", rank_k=a, rank_v=b)), err(0, a) + err(1, b), a, b)
                    for a in kv_ranks for b in kv_ranks]
        opts = []
        for c1, e1, q, (o, o_groups) in qo:
            for c2, e2, k, v in _pareto(kvs):
                lp = LayerPlan(hd, hd, rank_q=q, rank_o=o, o_groups=o_groups) if k is None else \
                    LayerPlan(hd, hd, kind="palu", rank_k=k, rank_v=v, rank_q=q, rank_o=o, o_groups=o_groups)
                opts.append((g.spec(lp).cost(g.hidden, kind), e1 + e2, lp))
        front = _pareto(opts)
        options.append([(c, err) for c, err, _ in front])
        labels.append([lp for _, _, lp in front])
    plan, predicted, info = choose_by_exponent(model, cal, options, labels, budget, kind, req.options, store, progress)
    return plan, {"rank_grid_q": rq, "rank_grid_o": ro, "rank_grid_o_groups": rg, "output_groups": og,
                  "ranks": [{"q": lp.rank_q, "o": lp.rank_o, "o_groups": lp.o_groups, "k": lp.rank_k, "v": lp.rank_v}
                            for lp in plan],
                  **info, "predicted_error": predicted}
