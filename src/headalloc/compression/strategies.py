"""Where to cut: per-layer plans that meet a global budget, by strategy (a registry).

Budget b in (0, 1]: attention parameters (or, with kind="kv", KV-cache entries per token) at most b
times the teacher's. Candidate widths are multiples of `step` (8 by default) up to the head dim.
- uniform: the same qk and v width in every layer (the largest that fits);
- depth: the paper's principle, keep early layers and reduce later ones more: width fraction
  falling linearly with depth, f_l = b + a (1 - 2 l / (L-1)) with a = min(1 - b, b - step/hd) (mean b),
  rounded to the grid, then trimmed from the deepest layers until the budget holds;
- measured (ours): for every layer and candidate, the estimated loss increase of the reduced layer:
  the Fisher-weighted error of its attention output on calibration text (LM-loss gradient . change)^2,
  measured separately for qk and for v and added, plus whole-head removal candidates; a
  multiple-choice knapsack (exact DP over layers) picks one candidate per layer under the budget;
- prune-heads (baseline): whole heads removed: per layer, how many kv heads and query heads per kv
  head to keep (ranked by the energy of each head's output on calibration text), chosen by the same
  knapsack over the measured error of each option.
Families whose query-key width cannot be narrowed exactly (per-head q/k norms) get candidates with
the full query-key width only. Under a target whose runtime keeps head widths fixed (`targets`,
e.g. llama.cpp) every strategy chooses head counts instead of widths: uniform keeps the same
(kv heads, query heads per kv head) in every layer, heads ranked by the weights' own energy
||W_O^h W_V^g||; depth lets the number of kv heads fall linearly with depth; prune-heads ranks heads
by output energy on calibration text; measured ranks them by the measured loss increase of removing
each one, the same estimator as for widths; both knapsacks may also remove a layer's attention.
The peers' latent parameterisations (palu, mha2mla, measured-latent) live in `latent.py`.
Add a strategy with `@strategy("name")`; the CLI's choices, the experiments and the benchmark read
`STRATEGIES`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable

import numpy as np
import torch
from tqdm.auto import tqdm

from headalloc.compression.calibration import Calibration
from headalloc.compression.families import AttentionWeights, adapter_for
from headalloc.compression.reduce import Geometry, attention_module, reduce_layer
from headalloc.compression.spec import LayerPlan, Plan
from headalloc.compression.targets import TARGETS, Target, get_target

BUDGET_KINDS = ("params", "kv")


@dataclass(frozen=True)
class Strategy:
    name: str
    fn: Callable  # (model, budget, kind, step, calibration, progress, target) -> (list[LayerPlan], info)
    needs_calibration: bool
    description: str
    latent: bool = False  # keys/values through latents (the peers' parameterisation); KV-budget comparisons




STRATEGIES: dict[str, Strategy] = {}


def strategy(name: str, needs_calibration: bool = True, latent: bool = False):
    """Register a plan function under `name` (its docstring's first line is its description)."""
    def deco(fn):
        STRATEGIES[name] = Strategy(name, fn, needs_calibration, (fn.__doc__ or "").strip().splitlines()[0], latent)
        return fn
    return deco


AUTO = "auto"
AUTO_DESCRIPTION = ("the best measured strategy for the budget kind, target and family: measured-lowrank under a "
                    "parameter budget, measured-latent under a KV budget, measured (head counts) for llama.cpp or "
                    "for a KV budget on a family with per-head q/k norms")


def auto_strategy(model, kind: str = "params", target: str | Target = "any") -> str:
    """The strategy `auto` (the default) stands for, by measurement on SmolLM2 at budget 0.5 (default settings;
    Wikipedia / alice / pydoc ratios to the original; docs/compression.md): under a parameter budget
    measured-lowrank (1.10x / 1.27x / 1.44x, session 15; measured, which narrows or removes heads, at session 8's
    settings: 1.25x / 2.14x / 2.43x); under a KV budget measured-latent (1.05x / 1.13x / 1.11x, session 16, with the KV budget's fitting text
    and shrunk moments; Palu at the same settings 1.07x / 1.16x / 1.15x; at KV 0.25, the mean of two seeds, ours 1.31x / 1.66x / 1.54x against
    Palu's 1.35x / 1.68x / 1.58x, sessions 18-20). Where the target keeps
    every head's width (llama.cpp) or keys cannot go through a latent (per-head q/k norms) under a KV budget:
    measured."""
    t = get_target(target) if isinstance(target, str) else target
    if t.widths_fixed:
        return "measured"
    if kind == "kv":
        return "measured" if Geometry.of(model).qk_norm else "measured-latent"
    return "measured-lowrank"


def check_budget(budget: float, strategy_name: str, kind: str = "params") -> None:
    if isinstance(budget, bool) or not (isinstance(budget, (int, float)) and 0 < budget <= 1):
        raise ValueError(f"budget must be a fraction in (0, 1] of the original; got {budget!r}")
    if strategy_name != AUTO and strategy_name not in STRATEGIES:
        raise ValueError(f"unknown strategy {strategy_name!r}; choose one of {', '.join([AUTO, *STRATEGIES])}")
    if kind not in BUDGET_KINDS:
        raise ValueError(f"budget kind must be one of {BUDGET_KINDS}; got {kind!r}")


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


def choose(g: "Geometry", options: list[list[tuple[int, float]]], labels: list[list[LayerPlan]], budget: float,
           kind: str) -> tuple[list[LayerPlan], float]:
    """One candidate per layer (options: (cost, estimated error), labels: their plans) by the exact knapsack
    under the budget; returns the plan and its predicted error."""
    _, cap = _capacity(g, budget, kind)
    picks = knapsack(options, cap)
    return [labels[l][j] for l, j in enumerate(picks)], float(sum(options[l][j][1] for l, j in enumerate(picks)))


def grid(hd: int, step: int) -> list[int]:
    if step < 2 or step % 2 or step > hd:
        raise ValueError(f"width step must be even and in [2, {hd}] (the head dim); got {step}")
    return list(range(step, hd + 1, step))


def _capacity(g: Geometry, budget: float, kind: str) -> tuple[int, int]:
    full = g.spec(g.full()).cost(g.hidden, kind) * g.n_layers
    return full, int(budget * full + 1e-6)


@strategy("uniform", needs_calibration=False)
def uniform_plan(model, budget: float, kind: str = "params", step: int = 8, calibration=None, progress=False,
                 target: Target = TARGETS["any"]):
    """The same query-key and value width in every layer (the largest that fits)."""
    g = Geometry.of(model)
    if target.widths_fixed:
        return _uniform_heads(model, g, budget, kind), {}
    hd = g.head_dim
    full, cap = _capacity(g, budget, kind)
    qk = lambda d: d if g.qk_reducible else hd  # noqa: E731
    fits = [d for d in grid(hd, step) if g.spec(LayerPlan(qk(d), d)).cost(g.hidden, kind) * g.n_layers <= cap]
    if not fits:
        raise ValueError(f"budget {budget} is below the smallest uniform width {step}; lower --step or raise the budget")
    return [LayerPlan(qk(max(fits)), max(fits)) for _ in range(g.n_layers)], {}


@strategy("depth", needs_calibration=False)
def depth_plan(model, budget: float, kind: str = "params", step: int = 8, calibration=None, progress=False,
               target: Target = TARGETS["any"]):
    """The paper's principle: early layers kept wider, widths falling linearly with depth."""
    g = Geometry.of(model)
    if target.widths_fixed:
        return _depth_heads(model, g, budget, kind), {}
    hd, L = g.head_dim, g.n_layers
    full, cap = _capacity(g, budget, kind)
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


@torch.no_grad()
def weight_head_energy(model) -> list[torch.Tensor]:
    """Per layer (n_kv, n_rep): ||W_O^h W_V^g||_F^2, each query head's value-output map (no data needed)."""
    ad, g = adapter_for(model), Geometry.of(model)
    out = []
    for l in range(g.n_layers):
        w = ad.weights(model, l)
        Wv = w.v.double().view(g.n_kv, g.head_dim, -1)
        Wo = w.o.double().view(g.hidden, g.n_kv, g.n_rep, g.head_dim)
        out.append(torch.stack([torch.stack([(Wo[:, kv, h] @ Wv[kv]).square().sum() for h in range(g.n_rep)])
                                for kv in range(g.n_kv)]).cpu())
    return out


def _uniform_heads(model, g: Geometry, budget: float, kind: str) -> list[LayerPlan]:
    """The same (kv heads, query heads per kv head) in every layer: the costliest that fits (ties: more kv heads)."""
    _, cap = _capacity(g, budget, kind)
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
    _, cap = _capacity(g, budget, kind)
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


def attention_output_grads(model, cal: Calibration, progress: bool = False) -> list[list[torch.Tensor]]:
    """Per layer and calibration window: gradient of the LM loss (next-token NLL on the calibration
    text) with respect to the layer's attention output."""
    ad = adapter_for(model)
    L = ad.n_layers(model.config)
    grads: list[list[torch.Tensor]] = [[] for _ in range(L)]
    handles = []
    for i in range(L):
        def hook(mod, args, out, i=i):
            out[0].register_hook(lambda gr, i=i: grads[i].append(gr.detach().clone()))
        handles.append(ad.attention(model, i).register_forward_hook(hook))
    trainable = [p for p in model.parameters() if p.requires_grad]
    for p in trainable:  # gradients reach the activations through the embeddings; no weight gradients
        p.requires_grad_(False)
    device = ad.embed(model).weight.device
    try:
        for w in tqdm(cal.windows, desc="gradients at attention outputs", disable=not progress, leave=False):
            ids = w[None].to(device)
            with torch.enable_grad():
                emb = ad.embed(model)(ids).detach().requires_grad_(True)
                loss = model(inputs_embeds=emb, labels=ids).loss * ids.shape[1]
                loss.backward()
    finally:
        for h in handles:
            h.remove()
        for p in trainable:
            p.requires_grad_(True)
        model.zero_grad(set_to_none=True)
    return grads


ROWS_PER_PASS = 8192  # calibration windows are measured several at a time, up to about this many tokens


def window_batches(cal: Calibration, l: int, idx) -> list[list[int]]:
    """The listed calibration windows in groups passed through one layer together: every window of a group has
    the same length and the same rotary position embeddings (windows start at position 0), up to about
    `ROWS_PER_PASS` tokens a group. A group's products are larger matrices than one window's, which is most of
    the planning time on a CPU."""
    groups: list[list[int]] = []
    for i in idx:
        g = groups[-1] if groups else None
        if g is not None and (len(g) + 1) * cal.inputs[l][i].shape[-2] <= ROWS_PER_PASS and \
                cal.inputs[l][i].shape == cal.inputs[l][g[0]].shape and _same_positions(cal, g[0], i):
            g.append(i)
        else:
            groups.append([i])
    return groups


def _same_positions(cal: Calibration, i: int, j: int) -> bool:
    a, b = cal.positions[i], cal.positions[j]
    return all(x is y or (x.shape == y.shape and torch.equal(x, y)) for x, y in zip(a, b))


@torch.no_grad()
def _layer_passes(model, l: int, cal: Calibration, idx) -> list[tuple[list[int], torch.Tensor, torch.Tensor]]:
    """(windows, their inputs stacked, the teacher attention's outputs on them) for each pass of `window_batches` over
    the listed windows of layer l: stacked once per layer and window list, then shared by every candidate measured
    there (cached for one layer: the measurements walk the layers in order)."""
    cache = cal.cache.setdefault("teacher_out", {})
    if l not in cache:
        cache.clear()
        cache[l] = {}
    key = tuple(idx)
    if key not in cache[l]:
        attn = adapter_for(model).attention(model, l)
        passes = []
        for grp in window_batches(cal, l, key):
            X = torch.cat([cal.inputs[l][i] for i in grp])
            passes.append((grp, X, attn(hidden_states=X, position_embeddings=cal.positions[grp[0]],
                                        attention_mask=None)[0]))
        cache[l][key] = passes
    return cache[l][key]


def teacher_outputs(model, l: int, cal: Calibration) -> list[torch.Tensor]:
    """The teacher attention's outputs on the calibration inputs of layer l, one (1, T, hidden) per window (cached
    for one layer)."""
    out: list = [None] * len(cal.inputs[l])
    for grp, _, y in _layer_passes(model, l, cal, range(len(cal.inputs[l]))):
        for i, yi in zip(grp, y.split(1)):
            out[i] = yi
    return out


@torch.no_grad()
def layer_error(model, l: int, cal: Calibration, spec, weights, windows: list[int] | None = None) -> float:
    """Estimated loss increase from replacing layer l's attention: the Fisher-weighted output error
    mean_t (g_t . dy_t)^2, with g the LM-loss gradient at the attention output (second-order term of
    the loss change; layers are treated as independent). Without gradients: |dy|^2 relative to the
    residual stream entering the layer. Mean over the calibration windows, or over the listed `windows`
    (measured several windows to a pass, `window_batches`)."""
    X0 = cal.inputs[l][0]
    student = attention_module(model.config, spec, weights, l, device=X0.device, dtype=X0.dtype)
    err = 0.0
    idx = range(len(cal.inputs[l])) if windows is None else windows
    for grp, X, ref in _layer_passes(model, l, cal, idx):
        dy = ref - student(hidden_states=X, position_embeddings=cal.positions[grp[0]], attention_mask=None)[0]
        if cal.grads is not None:
            G = cal.grads[l][grp[0]] if len(grp) == 1 else torch.cat([cal.grads[l][i] for i in grp])
            err += float((G * dy).double().sum(-1).square().sum())
        else:
            err += float(dy.double().square().sum(-1).mean(-1).sum()) / cal.resid_sq[l]
    return err / len(idx)


def fit_folds(cal: Calibration) -> list[tuple[Calibration, list[int] | None]]:
    """What a candidate is fitted on and measured on (`cal.cache["plan_error"]`): 'pooled' (the default), one fold,
    the whole calibration measured on all its windows; 'leave-part-out', per part of the fitting text the
    calibration without that part's moments, measured on that part's windows (`Calibration.folds`)."""
    mode = cal.cache.get("plan_error", "pooled")
    if mode == "pooled":
        return [(cal, None)]
    if mode == "leave-part-out":
        return cal.folds()
    raise ValueError(f"plan_error must be 'pooled' or 'leave-part-out'; got {mode!r}")


def candidate_error(model, l: int, cal: Calibration, lp: LayerPlan, caches: dict, output_factor: bool = False) -> float:
    """`layer_error` of plan `lp` in layer l, its factorisations fitted and measured per `fit_folds` (window-weighted
    mean over the folds). `caches`: per fold, the layer's SVD cache (`reduce_layer`); `output_factor`: fit a
    factorised output projection as the calibration's setting says (`factor_weights`)."""
    from headalloc.compression.reduce import factor_weights, output_moments

    w, g = adapter_for(model).weights(model, l), Geometry.of(model)
    total, n = 0.0, 0
    for f, (c, idx) in enumerate(fit_folds(cal)):
        if output_factor:
            output_moments(model, c)
        kw = factor_weights(c, l) if output_factor else {}
        k = len(cal.inputs[l]) if idx is None else len(idx)
        total += k * layer_error(model, l, cal, *reduce_layer(w, c.second_moment[l], lp, g, l,
                                                              caches.setdefault(f, {}), **kw), windows=idx)
        n += k
    return total / n


def _measure_widths(model, cal: Calibration, dims: list[int], progress: bool):
    """Per layer and width: the error of narrowing only the query-key width, and only the value width."""
    g = Geometry.of(model)
    hd, L = g.head_dim, g.n_layers
    e_qk, e_v = np.zeros((L, len(dims))), np.zeros((L, len(dims)))
    for l in tqdm(range(L), desc="measuring layer errors", disable=not progress):
        svd_cache: dict = {}
        for j, d in enumerate(dims):
            if d < hd:
                # not a candidate where query-key widths cannot be cut (per-head q/k norms)
                e_qk[l, j] = candidate_error(model, l, cal, LayerPlan(d, hd), svd_cache) if g.qk_reducible else np.inf
                e_v[l, j] = candidate_error(model, l, cal, LayerPlan(hd, d), svd_cache)
    return e_qk, e_v


@torch.no_grad()
def head_energy(model, cal: Calibration) -> list[torch.Tensor]:
    """Per layer (n_kv, n_rep): mean squared norm of each query head's contribution W_O^h o_h."""
    ad, g = adapter_for(model), Geometry.of(model)
    out = []
    for l in range(g.n_layers):
        w = ad.weights(model, l)
        acc = torch.zeros(g.n_kv, g.n_rep, dtype=torch.float64)
        X0 = cal.inputs[l][0]
        for kv in range(g.n_kv):
            for h in range(g.n_rep):
                spec, red = reduce_layer(w, None, LayerPlan(g.head_dim, g.head_dim, [kv], [[h]]), g, l)
                red.o_bias = None  # the head's own contribution, without the layer's output bias
                spec.bias = {**spec.bias, "o": False}
                head = attention_module(model.config, spec, red, l, device=X0.device, dtype=X0.dtype)
                for X, pe in zip(cal.inputs[l], cal.positions):
                    y = head(hidden_states=X, position_embeddings=pe, attention_mask=None)[0]
                    acc[kv, h] += float(y.double().square().sum(-1).mean())
        out.append(acc / len(cal.positions))
    return out


@torch.no_grad()
def head_removal_error(model, cal: Calibration) -> list[torch.Tensor]:
    """Per layer (n_kv, n_rep): the measured loss increase (`layer_error`) of silencing one query head,
    and, for ranking kv heads, the sum over its query heads. Higher = more needed."""
    ad, g = adapter_for(model), Geometry.of(model)
    out = []
    for l in range(g.n_layers):
        w = ad.weights(model, l)
        spec, full = reduce_layer(w, None, g.full(), g, l)
        err = torch.zeros(g.n_kv, g.n_rep, dtype=torch.float64)
        for kv in range(g.n_kv):
            for h in range(g.n_rep):
                o = full.o.clone()
                c = (kv * g.n_rep + h) * g.head_dim
                o[:, c:c + g.head_dim] = 0  # the head's output removed, everything else kept
                err[kv, h] = layer_error(model, l, cal, spec, AttentionWeights(**{**full.__dict__, "o": o}))
        out.append(err)
    return out


def empty_plan(g: Geometry) -> LayerPlan:
    """A layer without attention (no heads, no cache)."""
    return LayerPlan(g.head_dim, g.head_dim, keep_kv=[], keep_rep=[])


@torch.no_grad()
def empty_layer_error(model, l: int, cal: Calibration) -> float:
    """The measured error (`layer_error`) of removing layer l's attention entirely."""
    g = Geometry.of(model)
    return layer_error(model, l, cal, *reduce_layer(adapter_for(model).weights(model, l), None, empty_plan(g), g, l))


@torch.no_grad()
def _measure_pruning(model, cal: Calibration, kind: str, progress: bool, rank: str = "energy",
                     empty: bool = False, empty_from: int = 0):
    """Per layer: every (kv heads kept, query heads per kv head kept) option at full width, the heads
    ranked by output energy (`rank="energy"`) or by the measured error of removing each one
    (`rank="measured"`), with its cost and measured error; with `empty`, also no attention at all (in layers
    from `empty_from` on)."""
    key = ("prune_options", kind, rank, empty, empty_from)
    if key in cal.cache:
        return cal.cache[key]
    ad, g = adapter_for(model), Geometry.of(model)
    hd = g.head_dim
    score = head_energy(model, cal) if rank == "energy" else head_removal_error(model, cal)
    options, plans = [], []
    for l in tqdm(range(g.n_layers), desc=f"measuring head pruning ({rank} ranking)", disable=not progress):
        e, w = score[l], ad.weights(model, l)
        opts, ps = [], []
        for nk in range(1, g.n_kv + 1):
            for nr in range(1, g.n_rep + 1):
                lp = _heads_plan(g, nk, nr, e)
                err = 0.0 if (nk == g.n_kv and nr == g.n_rep) else layer_error(
                    model, l, cal, *reduce_layer(w, None, lp, g, l))
                opts.append((g.spec(lp).cost(g.hidden, kind), err))
                ps.append(lp)
        if empty and l >= empty_from:
            lp = empty_plan(g)
            opts.append((g.spec(lp).cost(g.hidden, kind), empty_layer_error(model, l, cal)))
            ps.append(lp)
        options.append(opts)
        plans.append(ps)
    cal.cache[key] = (options, plans, score)
    return cal.cache[key]


@strategy("prune-heads")
def prune_plan(model, budget: float, kind: str = "params", step: int = 8, calibration: Calibration | None = None,
               progress: bool = False, target: Target = TARGETS["any"]):
    """Baseline: remove whole heads, chosen per layer by measured error under the budget."""
    g = Geometry.of(model)
    options, plans, energy = _measure_pruning(model, _with_grads(model, calibration, progress), kind, progress,
                                              empty=target.propose_empty, empty_from=int(target.first_layer_attention))
    plan, _ = choose(g, options, plans, budget, kind)
    return plan, {"head_energy": [e.tolist() for e in energy]}


def _with_grads(model, cal: Calibration, progress: bool) -> Calibration:
    if cal.grads is None:
        cal.grads = attention_output_grads(model, cal, progress)
    return cal


@strategy("measured")
def measured_plan(model, budget: float, kind: str = "params", step: int = 8, calibration: Calibration | None = None,
                  progress: bool = False, target: Target = TARGETS["any"], heads: bool = True):
    """Ours: per layer and head, measured loss increase of each candidate; exact knapsack under the budget."""
    cal = _with_grads(model, calibration, progress)
    g = Geometry.of(model)
    if target.widths_fixed:  # head counts only, heads ranked by their measured removal error
        options, plans, score = _measure_pruning(model, cal, kind, progress, rank="measured",
                                                 empty=target.propose_empty,
                                                 empty_from=int(target.first_layer_attention))
        plan, predicted = choose(g, options, plans, budget, kind)
        return plan, {"head_removal_error": [e.tolist() for e in score],
                      "layers_without_attention": [l for l, lp in enumerate(plan) if lp.empty],
                      "predicted_error": predicted}
    dims = grid(g.head_dim, step)
    key = ("width_errors", tuple(dims), cal.cache.get("plan_error", "pooled"))
    if key not in cal.cache:  # the measurement does not depend on the budget
        cal.cache[key] = _measure_widths(model, cal, dims, progress)
    e_qk, e_v = cal.cache[key]
    extra = _measure_pruning(model, cal, kind, progress)[:2] if heads else None
    return _measured_choice(g, dims, e_qk, e_v, budget, kind, extra)


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


def make_plan(model, strategy_name: str, budget: float, calibration: Calibration | None = None, kind: str = "params",
              step: int = 8, progress: bool = False, target: str = "any") -> Plan:
    """The plan of `strategy_name` at `budget` for `model` (calibration: from `calibration.collect`), choosing
    only what `target`'s runtime runs (`targets.TARGETS`). "auto": the strategy `auto_strategy` picks (the plan
    names it; its info says it was picked)."""
    check_budget(budget, strategy_name, kind)
    t = get_target(target)
    picked = strategy_name == AUTO
    if picked:
        strategy_name = auto_strategy(model, kind, t)
    s = STRATEGIES[strategy_name]
    if s.needs_calibration and (calibration is None or calibration.inputs is None):
        raise ValueError(f"strategy {strategy_name!r} needs calibration data with the layer inputs kept")
    layers, info = s.fn(model, budget, kind, step, calibration=calibration, progress=progress, target=t)
    g = Geometry.of(model)
    t.check([g.spec(lp).to_dict() for lp in layers], g.head_dim)  # (rope pairs: all kept at full width)
    if picked:
        info = {**info, "picked_by": AUTO}
    return Plan(layers, strategy_name, budget, kind, info, target)


from headalloc.compression import latent as _latent  # noqa: E402,F401  (registers the latent strategies)
