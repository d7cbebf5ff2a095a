"""Choosing among candidate plans by what the whole compressed model measures, not by the layers' summed estimates.

The knapsack adds the layers' estimates as if each layer's error were small and independent of the others'; a
layer cut deep also moves what every later layer reads, so its true cost grows faster than its estimate. Raising
each layer's estimate to an exponent p > 1 before the sum makes deep single cuts dearer. Which p is measured, not
assumed: each exponent's plan is built and the whole compressed model's loss on the calibration windows decides
(`choose_by_exponent`). With `PlanOptions.empty_layers` each exponent's plan is also built with the option of
removing a layer's attention, and the same loss decides.
"""

from __future__ import annotations

import numpy as np
import torch
from tqdm.auto import tqdm

from headalloc.compression.calibration import Calibration
from headalloc.compression.planning.estimates import empty_layer_error, empty_plan, factor_inputs, fit_folds
from headalloc.compression.planning.knapsack import choose
from headalloc.compression.planning.state import (EmptyErrors, MeasureOptions, Measurements, PlanOptions,
                                                  TeacherWindowLoss)
from headalloc.compression.reduce import Geometry, compress_model
from headalloc.compression.spec import LayerPlan


def empty_layer_errors(model, cal: Calibration, store: Measurements, measure: MeasureOptions = MeasureOptions(),
                       progress: bool = False) -> np.ndarray:
    """(layers,): the measured error (`layer_error`) of removing each layer's attention entirely."""
    return store.get(EmptyErrors(measure), lambda: np.array([
        empty_layer_error(model, l, cal, store)
        for l in tqdm(range(Geometry.of(model).n_layers), desc="measuring layers without attention",
                      disable=not progress)]))


def choose_by_exponent(model, cal: Calibration, options: list[list[tuple[int, float]]], labels: list[list[LayerPlan]],
                       budget: float, kind: str, plan_options: PlanOptions = PlanOptions(),
                       store: Measurements | None = None, progress: bool = False):
    """For each exponent p of `plan_options.exponents`, the knapsack's plan over the layers' estimated errors raised
    to p (`choose`); with `plan_options.empty_layers`, also each exponent's plan when any layer may instead lose its attention entirely (its error
    measured the same way, `empty_layer_errors`). Of these candidates the plan whose whole compressed model has the
    lowest loss on the calibration windows (`plan_losses`) is kept, so allowing empty layers can only change the
    plan where a plan with them measures better. Returns (plan, its predicted error as the plain sum,
    {"exponent", "empty_layers", "select", "calibration_loss_by_candidate"}). Candidates are scored as
    `plan_options.select` says: the mean loss, or the largest increase over the original on one part of the fitting
    text ('worst-part')."""
    store = Measurements() if store is None else store
    measure, exponents, select = plan_options.measure, plan_options.exponents, plan_options.select
    g = Geometry.of(model)
    families = {False: (options, labels)}
    if plan_options.empty_layers:
        lp0 = empty_plan(g)
        e0 = empty_layer_errors(model, cal, store, measure, progress)
        c0 = g.spec(lp0).cost(g.hidden, kind)
        families[True] = ([o + [(c0, float(e0[l]))] for l, o in enumerate(options)],
                          [lab + [lp0] for lab in labels])
    plans = {}
    for with_empty, (opts, labs) in families.items():
        for p in exponents:
            plans[(p, with_empty)], _ = choose(g, [[(c, err ** p) for c, err in o] for o in opts], labs, budget, kind)
    per_window = plan_losses(model, cal, plans, progress, per_window=True, measure=measure, store=store)
    losses = {k: float(v.mean()) for k, v in per_window.items()}
    extra = {}
    if select == "worst-part":
        worst = worst_part_increase(model, cal, per_window, store)
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
def worst_part_increase(model, cal: Calibration, per_window: dict, store: Measurements | None = None) -> dict:
    """For each candidate (its per-window losses from `plan_losses(per_window=True)`): (the part of the fitting
    text, the mean loss increase over the original model there) for the part where that increase is largest. The
    parts are `cal.parts` (one part when the calibration does not name them); the increase in nats is the log of
    the perplexity ratio to the original on that part."""
    parts = cal.parts or ["all"] * len(cal.windows)
    if len(parts) != len(cal.windows):
        raise ValueError(f"the calibration names {len(parts)} parts for {len(cal.windows)} windows")
    base = (Measurements() if store is None else store).get(TeacherWindowLoss(), lambda: window_nll(model, cal.windows))
    names = sorted(set(parts))
    idx = {n: torch.tensor([i for i, q in enumerate(parts) if q == n]) for n in names}
    out = {}
    for k, v in per_window.items():
        inc = {n: float((v[i] - base[i]).mean()) for n, i in idx.items()}
        part = max(inc, key=inc.get)
        out[k] = (part, inc[part])
    return out


def window_nll(model, windows: torch.Tensor, batch: int = 4) -> torch.Tensor:
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
def plan_losses(model, cal: Calibration, plans: dict, progress: bool = False, per_window: bool = False,
                measure: MeasureOptions = MeasureOptions(), store: Measurements | None = None) -> dict:
    """The whole compressed model's next-token loss on the calibration windows, before any fitting (fitted and
    scored per `fit_folds`: with 'leave-part-out', each part's windows by the model fitted without it), for each
    candidate plan (keyed as given; identical plans are built and measured once): the mean over every token, or
    with `per_window` each window's mean, (n,) float64 (the windows are of equal length, so their mean is the
    former)."""
    seen: list[tuple[list[LayerPlan], torch.Tensor]] = []
    out = {}
    dtype = next(model.parameters()).dtype
    for k, layers in tqdm(plans.items(), desc="measuring candidate plans", disable=not progress, leave=False):
        same = [v for other, v in seen if other == list(layers)]
        if not same:
            nll = torch.zeros(len(cal.windows), dtype=torch.float64)
            for c, idx in fit_folds(cal, measure, store):  # (leave-part-out: each part's windows by a model fitted
                idx = list(range(len(cal.windows))) if idx is None else idx  # without it)
                factor = factor_inputs(model, c, measure, store) if any(lp.rank_o for lp in layers) else None
                student = compress_model(model, layers, c, dtype=dtype, factor=factor)
                nll[idx] = window_nll(student, cal.windows[idx])
                del student
            same = [nll]
            seen.append((list(layers), same[0]))
        out[k] = same[0] if per_window else float(same[0].mean())
    return out
