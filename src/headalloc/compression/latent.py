"""Peers' parameterisation inside our pipeline: keys and values through low-rank latents (Palu-style).

Palu (arXiv 2407.21118; code read at github.com/shadowpa0327/Palu) factorises each layer's key and
value projections, W ~ B A, caches the latent A x (rank r instead of kv heads x head dim) and rebuilds
the keys B (A x) at every step before rotary positions are applied. What is kept here: the data-aware
factorisation (truncated SVD of W whitened by the layer input's second moment, as Palu takes from
SVD-LLM), one latent over all the layer's kv heads (Palu's G-LRD with the group = every kv head; the
models here have 3-5 kv heads, Palu's default group is 4), and Palu's rank search `fisher`: each
projection's rank proportional to the mean square-root Fisher information of its weights (squared
LM-loss gradients on calibration text), capped at its full size, rounded to `step` (Palu: 32). What is
not: Palu's fused GPU kernels and its optional quantisation of the latents. Distillation afterwards is
ours, the same for every strategy.

MHA2MLA (arXiv 2502.14837; code: github.com/JT-Ushio/MHA2MLA) converts a model to DeepSeek's MLA:
partial RoPE (per head the frequency pairs of largest contribution keep their rotation, its "2-norm"
criterion; the rest lose it) and a joint low-rank latent for the non-rotary key part and the value
(its SVD_joint), which the cache holds with the kept rotary key part; then fine-tuning. `mha2mla` keeps
that: the same number of pairs and the same latent rank in every layer (as MHA2MLA), pairs ranked by our
data-aware logit energy (the same idea as its 2-norm), the joint factorisation whitened like Palu's, 4
pairs per kv head (MHA2MLA's r = 4) unless the budget forces fewer; the rank is what the KV budget leaves.
Not kept: its absorbed-matrix inference kernels (our runtime rebuilds keys and values from the latent).

`measured-latent` is our allocation over their parameterisation: the per-layer ranks chosen by the
exact knapsack over the measured loss increase of each candidate rank (the estimator of `measured`). The
knapsack adds the layers' estimates as if each layer's error were small and independent of the others';
a layer cut deep also moves what every later layer reads, so its true cost grows faster than its estimate.
Raising each layer's estimate to an exponent p > 1 before the sum makes deep single cuts dearer; which p
(`EXPONENTS`, 1 the plain sum among them) is measured, not assumed: each exponent's plan is built and the
whole compressed model's loss on the calibration windows is measured, and the lowest is kept (session 18:
at a quarter of SmolLM2's cache p = 1 cut the last layers' values to rank 16 and lost to Palu's
allocation; p = 3 was kept, 45.93 against 52.29 and Palu's 49.51 on Wikipedia before fitting, 1.30x against
1.35x and Palu's 1.33x after; at KV 0.5 and under a parameter budget of 0.5 the plain sum measures best).
With `empty=True` (Python API; off by default) both of our factorised strategies (`measured-latent`,
`measured-lowrank`) may also remove a layer's attention entirely (no heads, no cache: the budget it frees goes to
the other layers), its error measured like every other option; each exponent's plan is then built with and without
that option, and the same calibration loss decides. Measured on SmolLM2 at the default settings (session 18), the
plans with empty layers lost on the calibration text at both budgets tried (KV 0.25, parameters 0.5), so the
option stays off: it only adds planning time there.
"""

from __future__ import annotations

import numpy as np
import torch
from tqdm.auto import tqdm

from headalloc.compression.calibration import Calibration
from headalloc.compression.families import adapter_for
from headalloc.compression.reduce import Geometry
from headalloc.compression.spec import LayerPlan
from headalloc.compression.settings import PLAN_SELECT_CHOICES
from headalloc.compression.strategies import (TARGETS, Target, _capacity, _with_grads, candidate_error, choose,
                                              empty_layer_error, empty_plan, fit_folds, grid, strategy)


def _kv_weights_grad(attn, g: Geometry) -> tuple[torch.Tensor, torch.Tensor]:
    if hasattr(attn, "k_proj"):
        return attn.k_proj.weight.grad, attn.v_proj.weight.grad
    qkv = attn.qkv_proj.weight.grad  # Phi-3: [q; k; v] rows
    nq, nk = g.n_kv * g.n_rep * g.head_dim, g.n_kv * g.head_dim
    return qkv[nq:nq + nk], qkv[nq + nk:nq + 2 * nk]


def weight_fisher(model, cal: Calibration, progress: bool = False) -> np.ndarray:
    """(layers, 2): Palu's sensitivity of W_K and W_V, mean over weights of sqrt(E[(dL/dw)^2]) over the
    calibration windows (next-token loss)."""
    key = "weight_fisher"
    if key in cal.cache:
        return cal.cache[key]
    ad, g = adapter_for(model), Geometry.of(model)
    attns = [ad.attention(model, l) for l in range(g.n_layers)]
    acc = np.zeros((g.n_layers, 2))
    sums = [[None, None] for _ in range(g.n_layers)]
    req = {n: p.requires_grad for n, p in model.named_parameters()}
    device = ad.embed(model).weight.device
    try:
        for p in model.parameters():
            p.requires_grad_(False)
        for a in attns:
            for p in a.parameters():
                p.requires_grad_(True)
        for w in tqdm(cal.windows, desc="Fisher information (palu)", disable=not progress, leave=False):
            model.zero_grad(set_to_none=True)
            with torch.enable_grad():
                ids = w[None].to(device)
                model(input_ids=ids, labels=ids).loss.backward()
            for l, a in enumerate(attns):
                for j, gr in enumerate(_kv_weights_grad(a, g)):
                    sq = gr.detach().double().square().cpu()
                    sums[l][j] = sq if sums[l][j] is None else sums[l][j] + sq
    finally:
        model.zero_grad(set_to_none=True)
        for n, p in model.named_parameters():
            p.requires_grad_(req[n])
    for l in range(g.n_layers):
        for j in range(2):
            acc[l, j] = float((sums[l][j] / len(cal.windows)).sqrt().mean())
    cal.cache[key] = acc
    return acc


def _latent_plan(g: Geometry, ranks: np.ndarray) -> list[LayerPlan]:
    return [LayerPlan(g.head_dim, g.head_dim, kind="palu", rank_k=int(rk), rank_v=int(rv)) for rk, rv in ranks]


def _cost(g: Geometry, ranks: np.ndarray, kind: str) -> int:
    return sum(g.spec(lp).cost(g.hidden, kind) for lp in _latent_plan(g, ranks))


def _check_target(target: Target, name: str) -> None:
    if target.widths_fixed:
        raise ValueError(f"{name}: latent keys and values have no counterpart in {target.name}; use --target any")


@strategy("palu", latent=True)
def palu_plan(model, budget: float, kind: str = "kv", step: int = 8, calibration: Calibration | None = None,
              progress: bool = False, target: Target = TARGETS["any"]):
    """Peer (Palu-style): low-rank latent keys and values, ranks per layer by Fisher information."""
    _check_target(target, "palu")
    g = Geometry.of(model)
    full = g.n_kv * g.head_dim
    fisher = weight_fisher(model, calibration, progress)
    _, cap = _capacity(g, budget, kind)
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


# Exponents tried on the layers' estimated errors before the knapsack (`measured-latent`); 1 is the plain sum
EXPONENTS = (1.0, 1.5, 2.0, 3.0, 4.0)


@strategy("measured-latent", latent=True)
def measured_latent_plan(model, budget: float, kind: str = "kv", step: int = 8,
                         calibration: Calibration | None = None, progress: bool = False,
                         target: Target = TARGETS["any"], exponents: tuple[float, ...] = EXPONENTS,
                         empty: bool = False):
    """Ours over the peers' latents: per-layer ranks by measured loss increase and an exact knapsack."""
    _check_target(target, "measured-latent")
    _check_exponents(exponents)
    cal = _with_grads(model, calibration, progress)
    g = Geometry.of(model)
    cands, e = _latent_errors(model, cal, step, progress)
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
    plan, predicted, info = choose_by_exponent(model, cal, options, labels, budget, kind, exponents, progress, empty)
    return plan, {"grid": cands, "ranks": [[lp.rank_k, lp.rank_v] for lp in plan], **info,
                  "predicted_error": predicted}


def _check_exponents(exponents) -> None:
    if not exponents or any(not (isinstance(p, (int, float)) and p > 0) for p in exponents):
        raise ValueError(f"exponents must be one or more positive numbers (1 is the plain sum); got {exponents!r}")


def empty_layer_errors(model, cal: Calibration, progress: bool = False) -> np.ndarray:
    """(layers,): the measured error (`layer_error`) of removing each layer's attention entirely. Cached."""
    if "empty_errors" not in cal.cache:
        cal.cache["empty_errors"] = np.array([
            empty_layer_error(model, l, cal)
            for l in tqdm(range(Geometry.of(model).n_layers), desc="measuring layers without attention",
                          disable=not progress)])
    return cal.cache["empty_errors"]


def choose_by_exponent(model, cal: Calibration, options: list[list[tuple[int, float]]], labels: list[list[LayerPlan]],
                       budget: float, kind: str, exponents: tuple[float, ...] = EXPONENTS, progress: bool = False,
                       empty: bool = False):
    """For each exponent p, the knapsack's plan over the layers' estimated errors raised to p (`choose`); with
    `empty`, also each exponent's plan when any layer may instead lose its attention entirely (its error
    measured the same way, `empty_layer_errors`). Of these candidates the plan whose whole compressed model has the
    lowest loss on the calibration windows (`plan_losses`) is kept, so allowing empty layers can only change the
    plan where a plan with them measures better. Returns (plan, its predicted error as the plain sum,
    {"exponent", "empty_layers", "calibration_loss_by_candidate"})."""
    _check_exponents(exponents)
    g = Geometry.of(model)
    families = {False: (options, labels)}
    if empty:
        lp0 = empty_plan(g)
        e0 = empty_layer_errors(model, cal, progress)
        c0 = g.spec(lp0).cost(g.hidden, kind)
        families[True] = ([o + [(c0, float(e0[l]))] for l, o in enumerate(options)],
                          [lab + [lp0] for lab in labels])
    plans = {}
    for with_empty, (opts, labs) in families.items():
        for p in exponents:
            plans[(p, with_empty)], _ = choose(g, [[(c, err ** p) for c, err in o] for o in opts], labs, budget, kind)
    select = cal.cache.get("plan_select", "mean")
    if select not in PLAN_SELECT_CHOICES:
        raise ValueError(f"plan_select must be one of {', '.join(PLAN_SELECT_CHOICES)}; got {select!r}")
    per_window = plan_losses(model, cal, plans, progress, per_window=True)
    losses = {k: float(v.mean()) for k, v in per_window.items()}
    extra = {}
    if select == "worst-part":
        worst = worst_part_increase(model, cal, per_window)
        extra = {"worst_part_increase_by_candidate": {_name(k): v for k, v in worst.items()}}
        score = {k: v[1] for k, v in worst.items()}
    else:
        score = losses
    # a tie is the same plan: name it by p nearest 1, without empty layers
    best = min(score, key=lambda k: (score[k], k[1], abs(k[0] - 1)))
    plan = plans[best]
    opts, labs = families[best[1]]
    picks = [labs[l].index(lp) for l, lp in enumerate(plan)]
    predicted = float(sum(opts[l][j][1] for l, j in enumerate(picks)))
    return plan, predicted, {"exponent": best[0], "empty_layers": [l for l, lp in enumerate(plan) if lp.empty],
                             "select": select,
                             "calibration_loss_by_candidate": {_name(k): v for k, v in losses.items()}, **extra}


def _name(key: tuple[float, bool]) -> str:
    p, e = key
    return f"p={p}{', empty layers allowed' if e else ''}"


@torch.no_grad()
def worst_part_increase(model, cal: Calibration, per_window: dict) -> dict:
    """For each candidate (its per-window losses from `plan_losses(per_window=True)`): (the part of the fitting
    text, the mean loss increase over the original model there) for the part where that increase is largest. The
    parts are `cal.parts` (one part when the calibration does not name them); the increase in nats is the log of
    the perplexity ratio to the original on that part."""
    parts = cal.parts or ["all"] * len(cal.windows)
    if len(parts) != len(cal.windows):
        raise ValueError(f"the calibration names {len(parts)} parts for {len(cal.windows)} windows")
    if "teacher_window_nll" not in cal.cache:
        cal.cache["teacher_window_nll"] = _window_nll(model, cal.windows)
    base = cal.cache["teacher_window_nll"]
    names = sorted(set(parts))
    idx = {n: torch.tensor([i for i, q in enumerate(parts) if q == n]) for n in names}
    out = {}
    for k, v in per_window.items():
        inc = {n: float((v[i] - base[i]).mean()) for n, i in idx.items()}
        part = max(inc, key=inc.get)
        out[k] = (part, inc[part])
    return out


def _window_nll(model, windows: torch.Tensor, batch: int = 4) -> torch.Tensor:
    """(n,) float64: each window's mean next-token loss (transformers' own cross-entropy on its logits), `batch`
    windows to a forward pass."""
    device = model.get_input_embeddings().weight.device
    out = []
    for s in range(0, len(windows), batch):
        w = windows[s:s + batch]
        logits = model(input_ids=w.to(device)).logits[:, :-1]
        out += [torch.nn.functional.cross_entropy(x.double().cpu(), y[1:]) for x, y in zip(logits, w)]
    return torch.stack(out)


@torch.no_grad()
def plan_losses(model, cal: Calibration, plans: dict, progress: bool = False, per_window: bool = False) -> dict:
    """The whole compressed model's next-token loss on the calibration windows, before any fitting (fitted and
    scored per `fit_folds`: with 'leave-part-out', each part's windows by the model fitted without it), for each
    candidate plan (keyed as given; identical plans are built and measured once): the mean over every token, or
    with `per_window` each window's mean, (n,) float64 (the windows are of equal length, so their mean is the
    former)."""
    from headalloc.compression.reduce import compress_model

    seen: list[tuple[list[LayerPlan], torch.Tensor]] = []
    out = {}
    dtype = next(model.parameters()).dtype
    for k, layers in tqdm(plans.items(), desc="measuring candidate plans", disable=not progress, leave=False):
        same = [v for other, v in seen if other == list(layers)]
        if not same:
            nll = torch.zeros(len(cal.windows), dtype=torch.float64)
            for c, idx in fit_folds(cal):  # (leave-part-out: each part's windows scored by a model fitted without it)
                idx = list(range(len(cal.windows))) if idx is None else idx
                student = compress_model(model, layers, c, dtype=dtype)
                nll[idx] = _window_nll(student, cal.windows[idx])
                del student
            same = [nll]
            seen.append((list(layers), same[0]))
        out[k] = same[0] if per_window else float(same[0].mean())
    return out


def _latent_errors(model, cal: Calibration, step: int, progress: bool) -> tuple[list[int], np.ndarray]:
    """Candidate latent ranks (multiples of 2 * step up to kv heads x head dim) and, per layer, the measured
    error (`layer_error`) of a latent key of each rank with exact values, and of latent values with exact keys:
    (layers, 2, ranks). Cached on the calibration."""
    g = Geometry.of(model)
    full = g.n_kv * g.head_dim
    cands = grid(full, 2 * step) if full >= 2 * step else [full]
    key = ("latent_errors", tuple(cands), cal.cache.get("plan_error", "pooled"))
    if key not in cal.cache:
        e = np.zeros((g.n_layers, 2, len(cands)))
        for l in tqdm(range(g.n_layers), desc="measuring latent ranks", disable=not progress):
            sc: dict = {}
            for i, r in enumerate(cands):
                if r < full:
                    e[l, 0, i] = candidate_error(model, l, cal, LayerPlan(g.head_dim, g.head_dim, kind="palu",
                                                                          rank_k=r, rank_v=full), sc)
                    e[l, 1, i] = candidate_error(model, l, cal, LayerPlan(g.head_dim, g.head_dim, kind="palu",
                                                                          rank_k=full, rank_v=r), sc)
        cal.cache[key] = e
    return cands, cal.cache[key]


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
def measured_lowrank_plan(model, budget: float, kind: str = "params", step: int = 8,
                          calibration: Calibration | None = None, progress: bool = False,
                          target: Target = TARGETS["any"], exponents: tuple[float, ...] = EXPONENTS,
                          empty: bool = False):
    """Ours, factorised: every head kept; q, o and k/v latents at per-layer ranks by measured error."""
    if target.widths_fixed:
        raise ValueError(f"measured-lowrank: factorised projections and latent keys/values have no counterpart in "
                         f"{target.name}; use --target any (or the measured strategy)")
    _check_exponents(exponents)
    cal = _with_grads(model, calibration, progress)
    g = Geometry.of(model)
    hd, nq = g.head_dim, g.n_kv * g.n_rep * g.head_dim
    full_lp = g.full()
    base = g.spec(full_lp).cost(g.hidden, kind)
    delta = lambda lp: g.spec(lp).cost(g.hidden, kind) - base  # noqa: E731  (costs add across projections)
    rq, ro = rank_grid(g.hidden, nq, step), rank_grid(nq, g.hidden, step)
    # output_groups: also output projections with a block-diagonal down factor, one block per kv group, at
    # total ranks costing about what the whole-matrix grid's do (the knapsack picks per layer)
    og = g.n_kv if cal.cache.get("output_groups") and g.n_kv > 1 and g.n_rep * hd <= g.hidden else 0
    rg = sorted({og * step * max(1, round(r * (nq + g.hidden) / (nq // og + g.hidden) / (og * step))) for r in ro}
                if og else set())
    rg = [r for r in rg if r * (nq // og + g.hidden) < nq * g.hidden and r // og <= nq // og]
    key = ("qo_rank_errors", tuple(rq), tuple(ro), cal.cache.get("factor_output", "input"), og, tuple(rg),
           cal.cache.get("plan_error", "pooled"))
    if key not in cal.cache:
        e = np.zeros((g.n_layers, 3, max(len(rq), len(ro), len(rg))))
        for l in tqdm(range(g.n_layers), desc="measuring query/output ranks", disable=not progress):
            sc: dict = {}
            for i, r in enumerate(rq):
                e[l, 0, i] = candidate_error(model, l, cal, LayerPlan(hd, hd, rank_q=r), sc)
            for i, r in enumerate(ro):
                e[l, 1, i] = candidate_error(model, l, cal, LayerPlan(hd, hd, rank_o=r), sc, output_factor=True)
            for i, r in enumerate(rg):
                e[l, 2, i] = candidate_error(model, l, cal, LayerPlan(hd, hd, rank_o=r, o_groups=og), sc,
                                             output_factor=True)
        cal.cache[key] = e
    e_qo = cal.cache[key]
    latent_ok = not g.qk_norm  # latent keys cannot carry per-head q/k norms
    if kind == "kv" and not latent_ok:
        raise ValueError("measured-lowrank: this family normalises every query and key head (q/k norms), so keys "
                         "cannot go through a latent and the strategy cannot shrink the KV cache; use the measured "
                         "strategy (narrower values, fewer heads) for a KV budget")
    if latent_ok:
        # a coarser rank grid than measured-latent's (multiples of 4 * step): under a parameter budget the
        # query/output ranks carry most of the choice, and the planning time stays near measured's
        kv_cands, e_kv = _latent_errors(model, cal, 2 * step, progress)
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
        opts, labs = [], []
        for c1, e1, q, (o, o_groups) in qo:
            for c2, e2, k, v in _pareto(kvs):
                lp = LayerPlan(hd, hd, rank_q=q, rank_o=o, o_groups=o_groups) if k is None else \
                    LayerPlan(hd, hd, kind="palu", rank_k=k, rank_v=v, rank_q=q, rank_o=o, o_groups=o_groups)
                opts.append((g.spec(lp).cost(g.hidden, kind), e1 + e2, lp))
        front = _pareto(opts)
        options.append([(c, err) for c, err, _ in front])
        labels.append([lp for _, _, lp in front])
    plan, predicted, info = choose_by_exponent(model, cal, options, labels, budget, kind, exponents, progress, empty)
    return plan, {"rank_grid_q": rq, "rank_grid_o": ro, "rank_grid_o_groups": rg, "output_groups": og,
                  "ranks": [{"q": lp.rank_q, "o": lp.rank_o, "o_groups": lp.o_groups, "k": lp.rank_k, "v": lp.rank_v}
                            for lp in plan],
                  **info, "predicted_error": predicted}


MLA_PAIRS = 4  # MHA2MLA's partial RoPE: r = 4 kept frequency pairs per head


@strategy("mha2mla", latent=True)
def mha2mla_plan(model, budget: float, kind: str = "kv", step: int = 8, calibration: Calibration | None = None,
                 progress: bool = False, target: Target = TARGETS["any"]):
    """Peer (MHA2MLA-style): partial RoPE + a joint key/value latent, the same in every layer."""
    _check_target(target, "mha2mla")
    g = Geometry.of(model)
    hd = g.head_dim
    _, cap = _capacity(g, budget, kind)
    for p in range(min(MLA_PAIRS, hd // 2), 0, -1):
        top = g.n_kv * (2 * hd - 2 * p)
        fits = [r for r in range(step, top + 1, step)
                if g.spec(LayerPlan(hd, hd, kind="mla", rank=r, rope_keep=p)).cost(g.hidden, kind) * g.n_layers <= cap]
        if fits:
            r = max(fits)
            return [LayerPlan(hd, hd, kind="mla", rank=r, rope_keep=p) for _ in range(g.n_layers)], \
                {"rope_pairs_per_kv_head": p, "rank": r}
    raise ValueError(f"budget {budget} is below one rotary pair and a latent of rank {step}; raise the budget")
