"""Where to cut: per-layer plans that meet a global budget, by strategy (a registry).

A budget b in (0, 1] allows at most b times the teacher's attention parameters (or, with kind "kv", its KV-cache
entries per token). Every strategy is a function of one `PlanRequest` that returns per-layer `LayerPlan`s.

registry   PlanRequest, the registry (`@strategy`), "auto", make_plan
state      PlanOptions (what strategies read) and the Measurements store (what they measured)
knapsack   the exact multiple-choice knapsack and the width grid
estimates  a candidate's estimated loss increase, measured on the calibration text
select     choosing among candidate plans by the whole model's calibration loss
heads      uniform, depth, prune-heads, measured (full-rank heads: narrower or fewer)
latent     palu, mha2mla (the peers) and measured-latent (ours over their latents)
lowrank    measured-lowrank (ours: factorised projections and latents)

Add a strategy: one function `fn(req: PlanRequest) -> (list[LayerPlan], info)` decorated with
`@strategy("name")`, in the module of its family here or in a new module here (every module of this package is
imported below, so nothing else changes). The CLI's choices, the experiments and the benchmarks read `STRATEGIES`.
"""

import importlib
import pkgutil


from headalloc.compression.planning.registry import (AUTO, AUTO_DESCRIPTION, BUDGET_KINDS, STRATEGIES, PlanRequest,
                                                     Strategy, auto_strategy, check_budget, make_plan, strategy)
from headalloc.compression.planning.state import EXPONENTS, MeasureOptions, Measurements, PlanOptions
from headalloc.compression.planning.knapsack import budget_capacity, choose, grid, knapsack

for _m in pkgutil.iter_modules(__path__):  # every module here, in name order: each registers its strategies
    importlib.import_module(f"{__name__}.{_m.name}")

__all__ = ["AUTO", "AUTO_DESCRIPTION", "BUDGET_KINDS", "STRATEGIES", "PlanRequest", "Strategy", "auto_strategy",
           "check_budget", "make_plan", "strategy", "EXPONENTS", "MeasureOptions", "Measurements", "PlanOptions",
           "budget_capacity", "choose", "grid", "knapsack"]
