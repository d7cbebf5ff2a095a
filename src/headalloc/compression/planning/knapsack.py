"""The exact multiple-choice knapsack that turns per-layer candidates (cost, estimated error) into a plan under a
global budget, and the grids candidates are drawn from."""

from __future__ import annotations

import math

import numpy as np

from headalloc.compression.reduce import Geometry
from headalloc.compression.spec import LayerPlan


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
    _, cap = budget_capacity(g, budget, kind)
    picks = knapsack(options, cap)
    return [labels[l][j] for l, j in enumerate(picks)], float(sum(options[l][j][1] for l, j in enumerate(picks)))


def grid(hd: int, step: int) -> list[int]:
    if step < 2 or step % 2 or step > hd:
        raise ValueError(f"width step must be even and in [2, {hd}] (the head dim); got {step}")
    return list(range(step, hd + 1, step))


def budget_capacity(g: Geometry, budget: float, kind: str) -> tuple[int, int]:
    full = g.spec(g.full()).cost(g.hidden, kind) * g.n_layers
    return full, int(budget * full + 1e-6)
