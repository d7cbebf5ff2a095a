"""What planning reads besides the model and the budget: explicit options, and a store of measurements.

`PlanOptions` holds every setting a strategy reads (built from the run's settings by `PlanOptions.of`; nothing is
read from the calibration). `Measurements` memoises what the planners measure on one teacher and one calibration,
each entry under a key that is a frozen dataclass. Every key of an estimate holds the whole `MeasureOptions` (the
options that change what an estimate measures), so an option added there enters every key by itself, and a key
cannot be misspelt. Runs that share a calibration share its `Measurements` through a `Workspace` (pipeline).
"""

from __future__ import annotations

from dataclasses import dataclass, is_dataclass
from typing import Any, Callable, TypeVar

T = TypeVar("T")
from headalloc.compression.settings import FACTOR_OUTPUT_CHOICES, PLAN_ERROR_CHOICES, PLAN_SELECT_CHOICES

# exponents tried on the layers' estimated errors before the knapsack; 1 is the plain sum (`select`)
EXPONENTS = (1.0, 1.5, 2.0, 3.0, 4.0)


@dataclass(frozen=True)
class MeasureOptions:
    """The options that change what an estimate measures; every measurement key holds all of them."""

    error: str = "pooled"  # 'pooled' or 'leave-part-out' (PLAN_ERROR_CHOICES)
    factor_output: str = "input"  # how factorised output projections are fitted (FACTOR_OUTPUT_CHOICES)

    def __post_init__(self):
        _check_choice("plan_error", self.error, PLAN_ERROR_CHOICES)
        _check_choice("factor_output", self.factor_output, FACTOR_OUTPUT_CHOICES)


@dataclass(frozen=True)
class PlanOptions:
    """Every option a strategy reads. Defaults are each option's plain form (no output groups, no empty layers);
    a run's settings give theirs through `PlanOptions.of(config)`."""

    select: str = "mean"  # how measured-latent / measured-lowrank pick among candidate plans (PLAN_SELECT_CHOICES)
    error: str = "pooled"
    factor_output: str = "input"
    output_groups: bool = False  # measured-lowrank also offers output projections factorised per kv group
    exponents: tuple[float, ...] = EXPONENTS  # candidate exponents of the layers' estimates (measured-latent/-lowrank)
    empty_layers: bool = False  # measured-latent / measured-lowrank may also remove a layer's attention

    def __post_init__(self):
        _check_choice("plan_select", self.select, PLAN_SELECT_CHOICES)
        self.measure  # (checks error and factor_output)
        if not self.exponents or any(isinstance(p, bool) or not (isinstance(p, (int, float)) and p > 0)
                                     for p in self.exponents):
            raise ValueError(f"exponents must be one or more positive numbers (1 is the plain sum); got "
                             f"{self.exponents!r}")
        object.__setattr__(self, "exponents", tuple(float(p) for p in self.exponents))

    @property
    def measure(self) -> MeasureOptions:
        return MeasureOptions(self.error, self.factor_output)

    @classmethod
    def of(cls, config) -> "PlanOptions":
        """The options a run's settings (`CompressConfig`) give."""
        return cls(select=config.plan.select, error=config.plan.error, factor_output=config.calib.factor_output,
                   output_groups=config.plan.output_groups)


def _check_choice(name: str, value, choices: tuple) -> None:
    if value not in choices:
        raise ValueError(f"{name} must be one of {', '.join(choices)}; got {value!r}")


# ---------------------------------------------------------------- measurement keys (one class per measurement)
@dataclass(frozen=True)
class Grads:
    """The LM-loss gradient at every layer's attention output, per calibration window."""


@dataclass(frozen=True)
class GradMoments:
    """Per layer: the gradients' second moment plus `ridge` x its mean eigenvalue."""
    ridge: float


@dataclass(frozen=True)
class OutputMoments:
    """Per layer: the second moment of the teacher's output-projection input, shrunk as the calibration says, for
    the calibration (`fold` None) or its leave-part-out fold without that part."""
    fold: str | None


@dataclass(frozen=True)
class Folds:
    """Leave-part-out folds of the calibration (`Calibration.folds`)."""


@dataclass(frozen=True)
class WidthErrors:
    """Per layer and width: the estimate of narrowing only the query-key width, and only the value width."""
    dims: tuple[int, ...]
    measure: MeasureOptions


@dataclass(frozen=True)
class PruneOptions:
    """Per layer: every (kv heads, query heads per kv head) option with its cost and estimate."""
    kind: str
    rank: str
    empty: bool
    empty_from: int
    measure: MeasureOptions


@dataclass(frozen=True)
class LatentErrors:
    """Per layer and rank: the estimate of a latent key (exact values), and of latent values (exact keys)."""
    ranks: tuple[int, ...]
    measure: MeasureOptions


@dataclass(frozen=True)
class QueryOutputErrors:
    """Per layer and rank: the estimate of a factorised query, output, and grouped output projection."""
    ranks_q: tuple[int, ...]
    ranks_o: tuple[int, ...]
    output_groups: int
    ranks_o_groups: tuple[int, ...]
    measure: MeasureOptions


@dataclass(frozen=True)
class EmptyErrors:
    """Per layer: the estimate of removing the layer's attention entirely."""
    measure: MeasureOptions


@dataclass(frozen=True)
class TeacherWindowLoss:
    """The original's mean next-token loss on each calibration window."""


@dataclass(frozen=True)
class WeightFisher:
    """Palu's sensitivity of every layer's key and value weights."""


class Measurements:
    """Memoised measurements of one teacher on one calibration, each under a frozen-dataclass key. One layer's
    stacked inputs and teacher outputs are held apart (`layer_passes`): the measurements walk the layers in order,
    so only the current layer's are kept."""

    def __init__(self):
        self._memo: dict[Any, Any] = {}
        self._layer: tuple[int, dict] | None = None

    def get(self, key, compute: Callable[[], T]) -> T:
        if not (is_dataclass(key) and type(key).__dataclass_params__.frozen):
            raise TypeError(f"a measurement key must be a frozen dataclass (planning.state); got {key!r}")
        if key not in self._memo:
            self._memo[key] = compute()
        return self._memo[key]

    def __contains__(self, key) -> bool:
        return key in self._memo

    def keys(self) -> list:
        return list(self._memo)

    def layer_passes(self, layer: int, windows: tuple[int, ...], compute: Callable[[], T]) -> T:
        """The passes of `layer` over `windows`, kept for the last layer asked only."""
        if self._layer is None or self._layer[0] != layer:
            self._layer = (layer, {})
        memo = self._layer[1]
        if windows not in memo:
            memo[windows] = compute()
        return memo[windows]
