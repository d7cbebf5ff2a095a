"""The peers' parameterisation, keys and values through low-rank latents, and our allocation over it.

Palu (arXiv 2407.21118; code read at github.com/shadowpa0327/Palu) factorises each layer's key and value
projections, W ~ B A, caches the latent A x (rank r instead of kv heads x head dim) and rebuilds the keys B (A x)
at every step before rotary positions are applied. What is kept here: the data-aware factorisation (truncated SVD
of W whitened by the layer input's second moment, as Palu takes from SVD-LLM), one latent over all the layer's kv
heads (Palu's G-LRD with the group = every kv head), and Palu's rank search `fisher`: each projection's rank
proportional to the mean square-root Fisher information of its weights, capped at its full size, rounded to
`step`. Not kept: Palu's fused GPU kernels and its optional quantisation of the latents. Distillation afterwards
is ours, the same for every strategy.

MHA2MLA (arXiv 2502.14837; code: github.com/JT-Ushio/MHA2MLA) converts a model to DeepSeek's MLA: partial RoPE
(per head the frequency pairs of largest contribution keep their rotation; the rest lose it) and a joint low-rank
latent for the non-rotary key part and the value, which the cache holds with the kept rotary key part. `mha2mla`
keeps the same number of pairs and the same latent rank in every layer, pairs ranked by our data-aware logit
energy, the joint factorisation whitened like Palu's, 4 pairs per kv head (MHA2MLA's r = 4) unless the budget
forces fewer; the rank is what the KV budget leaves. Not kept: its absorbed-matrix inference kernels.

`measured-latent` is ours: per-layer ranks chosen by the exact knapsack over the measured loss increase of each
candidate rank, the plan picked among exponents by the whole model's calibration loss (`select`).
"""

from __future__ import annotations

import numpy as np
from tqdm.auto import tqdm

from headalloc.compression.calibration import Calibration
from headalloc.compression.planning.estimates import candidate_error, weight_fisher, with_grads
from headalloc.compression.planning.knapsack import budget_capacity, grid
from headalloc.compression.planning.registry import PlanRequest, strategy
from headalloc.compression.planning.select import choose_by_exponent
from headalloc.compression.planning.state import LatentErrors, MeasureOptions, Measurements, WeightFisher
from headalloc.compression.reduce import Geometry
from headalloc.compression.spec import LayerPlan
from headalloc.compression.targets import Target


def _latent_plan(g: Geometry, ranks: np.ndarray) -> list[LayerPlan]:
    return [LayerPlan(g.head_dim, g.head_dim, kind="palu", rank_k=int(rk), rank_v=int(rv)) for rk, rv in ranks]


def _cost(g: Geometry, ranks: np.ndarray, kind: str) -> int:
    return sum(g.spec(lp).cost(g.hidden, kind) for lp in _latent_plan(g, ranks))


def _check_target(target: Target, name: str) -> None:
    if target.widths_fixed:
        raise ValueError(f"{name}: latent keys and values have no counterpart in {target.name}; use --target any")


@strategy("palu", latent=True)
def palu_plan(req: PlanRequest):
    """Peer (Palu-style): low-rank latent keys and values, ranks per layer by Fisher information."""
    model, budget, kind, step = req.model, req.budget, req.kind, req.step
    _check_target(req.target, "palu")
    g = Geometry.of(model)
    full = g.n_kv * g.head_dim
    fisher = req.measurements.get(WeightFisher(), lambda: weight_fisher(model, req.calibration, req.progress))
    _, cap = budget_capacity(g, budget, kind)
    total = budget * fisher.size * full  # Palu: a total rank, split in proportion to the Fisher information
    ranks = np.minimum(full, np.maximum(step, np.round(total * fisher / fisher.sum() / step) * step)).astype(int)
    order = np.argsort(fisher, axis=None)  # trim the least sensitive projections first
    i = 0
    while _cost(g, ranks, kind) > cap:
        l, j = np.unravel_index(order[i % order.size], fisher.shape)
        if ranks[l, j] > step:
            ranks[l, j] -= step
        i += 1
        if i > 100 * order.size:
            raise ValueError(f"budget {budget} is below the smallest latent ranks ({step}); raise the budget")
    return _latent_plan(g, ranks), {"fisher_k_v": fisher.tolist(), "ranks": ranks.tolist()}


@strategy("measured-latent", latent=True)
def measured_latent_plan(req: PlanRequest):
    """Ours over the peers' latents: per-layer ranks by measured loss increase and an exact knapsack."""
    model, budget, kind, progress = req.model, req.budget, req.kind, req.progress
    _check_target(req.target, "measured-latent")
    cal = with_grads(model, req.calibration, req.measurements, progress)
    g = Geometry.of(model)
    cands, e = latent_errors(model, cal, req.step, progress, req.options.measure, req.measurements)
    options, labels = [], []
    for l in range(g.n_layers):
        opts, labs = [], []
        for i, rk in enumerate(cands):
            for j, rv in enumerate(cands):
                lp = LayerPlan(g.head_dim, g.head_dim, kind="palu", rank_k=rk, rank_v=rv)
                opts.append((g.spec(lp).cost(g.hidden, kind), e[l, 0, i] + e[l, 1, j]))
                labs.append(lp)
        options.append(opts)
        labels.append(labs)
    plan, predicted, info = choose_by_exponent(model, cal, options, labels, budget, kind, req.options,
                                               req.measurements, progress)
    return plan, {"grid": cands, "ranks": [[lp.rank_k, lp.rank_v] for lp in plan], **info,
                  "predicted_error": predicted}


def latent_errors(model, cal: Calibration, step: int, progress: bool, measure: MeasureOptions,
                  store: Measurements) -> tuple[list[int], np.ndarray]:
    """Candidate latent ranks (multiples of 2 * step up to kv heads x head dim) and, per layer, the measured
    error (`layer_error`) of a latent key of each rank with exact values, and of latent values with exact keys:
    (layers, 2, ranks)."""
    g = Geometry.of(model)
    full = g.n_kv * g.head_dim
    cands = grid(full, 2 * step) if full >= 2 * step else [full]

    def measure_all():
        e = np.zeros((g.n_layers, 2, len(cands)))
        for l in tqdm(range(g.n_layers), desc="measuring latent ranks", disable=not progress):
            sc: dict = {}
            for i, r in enumerate(cands):
                if r < full:
                    e[l, 0, i] = candidate_error(model, l, cal, LayerPlan(g.head_dim, g.head_dim, kind="palu",
                                                                          rank_k=r, rank_v=full), sc, measure=measure,
                                                 store=store)
                    e[l, 1, i] = candidate_error(model, l, cal, LayerPlan(g.head_dim, g.head_dim, kind="palu",
                                                                          rank_k=full, rank_v=r), sc, measure=measure,
                                                 store=store)
        return e

    return cands, store.get(LatentErrors(tuple(cands), measure), measure_all)


MLA_PAIRS = 4  # MHA2MLA's partial RoPE: r = 4 kept frequency pairs per head


@strategy("mha2mla", latent=True)
def mha2mla_plan(req: PlanRequest):
    """Peer (MHA2MLA-style): partial RoPE + a joint key/value latent, the same in every layer."""
    model, budget, kind, step = req.model, req.budget, req.kind, req.step
    _check_target(req.target, "mha2mla")
    g = Geometry.of(model)
    hd = g.head_dim
    _, cap = budget_capacity(g, budget, kind)
    for p in range(min(MLA_PAIRS, hd // 2), 0, -1):
        top = g.n_kv * (2 * hd - 2 * p)
        fits = [r for r in range(step, top + 1, step)
                if g.spec(LayerPlan(hd, hd, kind="mla", rank=r, rope_keep=p)).cost(g.hidden, kind) * g.n_layers <= cap]
        if fits:
            r = max(fits)
            return [LayerPlan(hd, hd, kind="mla", rank=r, rope_keep=p) for _ in range(g.n_layers)], \
                {"rope_pairs_per_kv_head": p, "rank": r}
    raise ValueError(f"budget {budget} is below one rotary pair and a latent of rank {step}; raise the budget")
