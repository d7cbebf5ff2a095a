"""The strategy registry: what a strategy is given (`PlanRequest`), how one is added (`@strategy`), which one
"auto" stands for, and `make_plan`, which checks the request and the plan against the target."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

import torch

from headalloc.compression.calibration import Calibration
from headalloc.compression.planning.state import Measurements, PlanOptions
from headalloc.compression.reduce import Geometry
from headalloc.compression.spec import LayerPlan, Plan
from headalloc.compression.targets import TARGETS, Target, get_target

BUDGET_KINDS = ("params", "kv")


@dataclass(frozen=True, eq=False)
class PlanRequest:
    """Every input a strategy reads: the teacher, the budget (a fraction of its attention parameters, or with
    kind "kv" of its KV-cache bytes per token), the width grid's `step`, the runtime `target`, the calibration
    (None for the strategies that need none), the options, and the store its measurements are kept in."""

    model: torch.nn.Module
    budget: float
    kind: str = "params"
    step: int = 8
    target: Target = TARGETS["any"]
    calibration: Calibration | None = None
    options: PlanOptions = PlanOptions()
    measurements: Measurements = field(default_factory=Measurements)
    progress: bool = False

    @property
    def geometry(self) -> Geometry:
        return Geometry.of(self.model)


@dataclass(frozen=True)
class Strategy:
    name: str
    fn: Callable[[PlanRequest], tuple[list[LayerPlan], dict]]  # the per-layer plans and what the strategy measured
    needs_calibration: bool
    description: str
    latent: bool = False  # keys/values through latents (the peers' parameterisation); compared under a KV budget


STRATEGIES: dict[str, Strategy] = {}


def strategy(name: str, needs_calibration: bool = True, latent: bool = False):
    """Register a plan function `fn(request: PlanRequest) -> (layer plans, info)` under `name` (its docstring's
    first line is its description)."""
    def deco(fn):
        if name in STRATEGIES or name == AUTO:
            raise ValueError(f"strategy {name!r} is already registered")
        STRATEGIES[name] = Strategy(name, fn, needs_calibration, (fn.__doc__ or "").strip().splitlines()[0], latent)
        return fn
    return deco


AUTO = "auto"
AUTO_DESCRIPTION = ("the best measured strategy for the budget kind, target and family: measured-lowrank under a "
                    "parameter budget, measured-latent under a KV budget, measured (head counts) for llama.cpp or "
                    "for a KV budget on a family with per-head q/k norms")


def auto_strategy(model, kind: str = "params", target: str | Target = "any") -> str:
    """The strategy "auto" (the default) stands for; the measurements behind the choice are in
    docs/design/strategy-choice.md. Where the target keeps every head's width (llama.cpp) or keys cannot go through
    a latent (per-head q/k norms) under a KV budget: measured."""
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


def make_plan(model, strategy_name: str, budget: float, calibration: Calibration | None = None, kind: str = "params",
              step: int = 8, progress: bool = False, target: str = "any", options: PlanOptions | None = None,
              measurements: Measurements | None = None) -> Plan:
    """The plan of `strategy_name` at `budget` for `model` (calibration: from `calibration.collect`), choosing
    only what `target`'s runtime runs (`targets.TARGETS`). "auto": the strategy `auto_strategy` picks (the plan
    names it; its info says it was picked). `measurements`: a store shared with other plans on the same teacher
    and calibration (their measurements are then taken once)."""
    check_budget(budget, strategy_name, kind)
    t = get_target(target)
    picked = strategy_name == AUTO
    if picked:
        strategy_name = auto_strategy(model, kind, t)
    s = STRATEGIES[strategy_name]
    if s.needs_calibration and (calibration is None or calibration.inputs is None):
        raise ValueError(f"strategy {strategy_name!r} needs calibration data with the layer inputs kept")
    req = PlanRequest(model, budget, kind, step, t, calibration, options or PlanOptions(),
                      Measurements() if measurements is None else measurements, progress)
    layers, info = s.fn(req)
    g = Geometry.of(model)
    t.check([g.spec(lp).to_dict() for lp in layers], g.head_dim)  # (rope pairs: all kept at full width)
    if picked:
        info = {**info, "picked_by": AUTO}
    return Plan(layers, strategy_name, budget, kind, info, target)
