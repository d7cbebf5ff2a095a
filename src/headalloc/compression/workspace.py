"""What runs on one teacher and one fitting text share: the calibration, the planners' measurements, and the
teacher's distillation targets and perplexities, each in a typed store under frozen keys. Several strategies or
budgets compressed from one `Workspace` (`pipeline.prepare`) measure each of these once."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from headalloc.compression.calibration import Calibration
from headalloc.compression.planning.state import Measurements


@dataclass(frozen=True)
class TargetsKey:
    """What the end-to-end stage's windows and the teacher's top-k targets on them depend on."""

    corpus: str
    fit_text: str
    gen_prompt: int
    gen_temperature: float
    gen_batch: int
    windows: int
    length: int
    topk: int
    seed: int
    autocast: str

    @classmethod
    def of(cls, cfg) -> "TargetsKey":
        """From resolved settings (`autocast` resolved for the device)."""
        return cls(cfg.fit.corpus, cfg.fit.text, cfg.fit.gen_prompt, cfg.fit.gen_temperature, cfg.fit.gen_batch, cfg.kd.windows,
                   cfg.kd.length, cfg.kd.topk, cfg.runtime.seed, cfg.runtime.autocast)


@dataclass(frozen=True)
class PerplexityKey:
    """The original's perplexity on some evaluation windows: which text, how many windows, how long, which draw."""

    text: str
    split: str
    windows: int
    length: int
    seed: int


class TeacherCache:
    """The teacher's end-to-end targets (windows, top-k targets or None for the full-vocabulary KL), the targets
    the calibration pass already computed for some of those windows, and its perplexities."""

    def __init__(self):
        self.targets: dict[TargetsKey, tuple[torch.Tensor, dict | None]] = {}
        self.partial_targets: dict[TargetsKey, tuple[torch.Tensor, dict]] = {}
        self.perplexity: dict[PerplexityKey, dict] = {}


@dataclass
class Workspace:
    calibration: Calibration
    measurements: Measurements = field(default_factory=Measurements)
    teacher: TeacherCache = field(default_factory=TeacherCache)
    seconds_fit_text: float | None = None  # drawing the fitting text (tokenising, or sampling it from the original)
    autocast: str | None = None  # the precision of the passes over the end-to-end windows (resolved)
