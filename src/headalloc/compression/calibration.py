"""Calibration: what the teacher does on calibration text, captured once and shared by every
strategy and by layer-local distillation.

Per layer: the second moment E[x~ x~^T] of the attention input augmented with a constant 1,
x~ = [x; 1] (so biases are handled by the same formulas as weights: the last row/column is the
mean), the inputs themselves and the rotary position embeddings (for fitting and measuring), and
the mean squared norm of the residual stream entering the layer. A calibration is data: what the
planners derive from it is kept apart (`planning.state.Measurements`), and nothing is written onto it.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import torch
from tqdm.auto import tqdm

from headalloc.compression.families import adapter_for


@dataclass
class Calibration:
    windows: torch.Tensor  # (n, T) token ids
    second_moment: list[torch.Tensor]  # per layer (hidden+1, hidden+1), float64, on the CPU
    inputs: list[list[torch.Tensor]] | None  # per layer, per window: (1, T, hidden) attention input
    positions: list[tuple[torch.Tensor, torch.Tensor]] | None  # per window: (cos, sin)
    resid_sq: list[float]  # per layer: mean |h|^2 of the residual stream entering it
    tokens: int
    grads: list[list[torch.Tensor]] | None = None  # per layer, per window: dLoss/d(attention output)
    out_moment: list[torch.Tensor] | None = None  # per layer: E[z z^T] of the output projection's input (outputs=True)
    parts: list[str] | None = None  # per window: the part of the fitting text it came from (None: one kind)
    # per part of the fitting text: (second moments, output moments, tokens) of its moment windows, unshrunk
    # (pipeline.prepare with plan_error "leave-part-out"; read by `folds`)
    part_moments: dict[str, tuple[list[torch.Tensor], list[torch.Tensor], int]] | None = None
    whiten_shrink: float = 0.0  # how far the moments were pulled toward isotropic (`shrink_second_moment`)
    fold: str | None = None  # the part of the fitting text this calibration's moments leave out (`excluding`)
    made_with: tuple | None = None  # the settings its statistics depend on (pipeline; checked when it is reused)

    def excluding(self, part: str) -> "Calibration":
        """The same windows, inputs and gradients, with the whitening moments of every part of the fitting text but
        `part` (pooled by tokens, shrunk as the full calibration's are): what a factorisation fitted without
        ever seeing that kind of text starts from."""
        if not self.part_moments or part not in self.part_moments or len(self.part_moments) < 2:
            raise ValueError(f"no moments without part {part!r}: the calibration holds per-part moments of "
                             f"{sorted(self.part_moments or {})}; a leave-part-out estimate needs two or more parts")
        rest = [v for k, v in self.part_moments.items() if k != part]
        n = sum(t for _, _, t in rest)
        sm = [sum(m[l] * t for m, _, t in rest) / n for l in range(len(self.second_moment))]
        om = [sum(o[l] * t for _, o, t in rest) / n for l in range(len(self.second_moment))]
        if self.whiten_shrink:  # (the output moments are shrunk by reduce.output_moments, which reads the same)
            sm = [shrink_second_moment(m, self.whiten_shrink) for m in sm]
        return replace(self, second_moment=sm, out_moment=om, part_moments=None, fold=part)

    def folds(self) -> list[tuple["Calibration", list[int]]]:
        """Leave-part-out folds: for each part of the fitting text among the calibration windows, (this calibration
        without that part's moments, the indices of that part's windows)."""
        if not self.parts or len(self.parts) != len(self.windows):
            raise ValueError("a leave-part-out estimate needs the part of each calibration window "
                             "(pipeline.prepare names them)")
        names = sorted(set(self.parts))
        if len(names) < 2:
            raise ValueError(f"a leave-part-out estimate needs a fitting text of two or more parts; the "
                             f"calibration windows are all {names[0]!r} (e.g. fit_text 'corpus+generated')")
        return [(self.excluding(p), [i for i, q in enumerate(self.parts) if q == p]) for p in names]

    @property
    def cov(self) -> list[torch.Tensor]:
        """E[x x^T] per layer (hidden, hidden)."""
        return [m[:-1, :-1] for m in self.second_moment]

    def __len__(self) -> int:
        return len(self.windows)


def gram(x: torch.Tensor) -> torch.Tensor:
    """x^T x of one batch's rows (n, d), formed in float32 where x is (a GPU's activations stay on it) and
    returned in float64 on the CPU, where the sums over many windows are kept: per batch float32 is exact to
    about 1e-7 of the matrix's norm (checked against float64 in the tests) and twice as fast on a CPU. Always in
    float32, also inside a pass under bfloat16 autocast (the `autocast` setting)."""
    x = x.float()
    with torch.autocast(x.device.type, enabled=False):
        return (x.T @ x).double().cpu()


class InputMoment:
    """A forward pre-hook that sums z^T z over the rows of a module's first input (float64, on the CPU):
    the second moment of what an output projection reads, `moment()` = the sum over the rows seen."""

    def __init__(self):
        self.sum: torch.Tensor | None = None
        self.rows = 0

    def __call__(self, mod, args) -> None:
        z = args[0].reshape(-1, args[0].shape[-1])
        self.sum = gram(z) if self.sum is None else self.sum + gram(z)
        self.rows += z.shape[0]

    def moment(self) -> torch.Tensor:
        return self.sum / self.rows


@torch.no_grad()
def collect(model, windows: torch.Tensor, keep: bool | list[int] = True, batch: int = 1,
            progress: bool = False, outputs: bool = False, on_logits=None) -> Calibration:
    """Teacher forward passes over `windows` (n, T) with hooks on every layer's attention input.
    `keep`: store the inputs of every layer (True), of the listed layers, or none (False). `outputs`: also the
    second moment of every layer's output-projection input (the concatenated head outputs), `out_moment`.
    `on_logits`: called with each batch's output logits (e.g. `TopKTargets`, so one pass also gives the
    distillation targets)."""
    ad = adapter_for(model)
    cfg = model.config
    L, h = ad.n_layers(cfg), ad.hidden_size(cfg)
    layers = ad.layers(model)
    mom = [torch.zeros(h + 1, h + 1, dtype=torch.float64) for _ in range(L)]
    count = [0]
    xs: list[list[torch.Tensor]] = [[] for _ in range(L)]
    pos: list = []
    resid = [0.0] * L
    zmom = [InputMoment() for _ in range(L)] if outputs else []
    handles = []

    for i in range(L):
        def layer_hook(mod, args, kwargs, i=i):
            hs = kwargs.get("hidden_states", args[0] if args else None)
            resid[i] += float(hs.double().square().sum())

        def attn_hook(mod, args, kwargs, i=i):
            x = kwargs.get("hidden_states", args[0] if args else None)
            flat = x.reshape(-1, x.shape[-1])
            mom[i] += gram(torch.cat([flat, flat.new_ones(flat.shape[0], 1)], 1))
            if keep is True or (isinstance(keep, list) and i in keep):
                xs[i].append(x.detach().clone())
            if i == 0:
                count[0] += flat.shape[0]
                if keep is not False:
                    pos.append(tuple(t.detach().clone() for t in kwargs.get("position_embeddings")))
        handles.append(layers[i].register_forward_pre_hook(layer_hook, with_kwargs=True))
        handles.append(ad.attention(model, i).register_forward_pre_hook(attn_hook, with_kwargs=True))
        if outputs:
            handles.append(ad.attention(model, i).o_proj.register_forward_pre_hook(zmom[i]))
    device = ad.embed(model).weight.device
    try:
        for s in tqdm(range(0, len(windows), batch), desc="calibration forward passes", disable=not progress,
                      leave=False):
            out = model(input_ids=windows[s:s + batch].to(device))
            if on_logits is not None:
                on_logits(out.logits)
    finally:
        for hd in handles:
            hd.remove()
    n = count[0]
    return Calibration(windows=windows, second_moment=[m / n for m in mom], inputs=xs if keep is not False else None,
                       positions=pos if keep is not False else None, resid_sq=[r / n for r in resid], tokens=n,
                       out_moment=[z.moment() for z in zmom] if outputs else None)


SHRINK_TARGETS = ("isotropic", "diagonal")


def shrink_second_moment(m: torch.Tensor, alpha: float, target: str = "isotropic") -> torch.Tensor:
    """(1 - alpha) M + alpha diag(s, ..., s, 1) for an augmented second moment M = [[C, mu], [mu^T, 1]],
    s = tr(C) / d: the input covariance pulled toward the isotropic one of the same energy (a convex
    combination of positive semi-definite matrices, so still one), the constant entry kept at 1. Data-aware
    factorisations then also keep what the weights do in directions the calibration text rarely visits.
    `target="diagonal"`: C pulled toward its own diagonal instead (`shrink_moment`)."""
    out = m.clone()
    out[:-1, :-1] = shrink_moment(m[:-1, :-1], alpha, target)
    out[:-1, -1] *= 1 - alpha
    out[-1, :-1] *= 1 - alpha
    return out


def shrink_moment(c: torch.Tensor, alpha: float, target: str = "isotropic") -> torch.Tensor:
    """(1 - alpha) C + alpha T: a second moment pulled toward T, the isotropic moment of the same energy
    (tr(C) / d) I, or its own diagonal diag(C) (`target="diagonal"`: each channel keeps its scale, only the
    correlations between channels are weakened)."""
    if target == "isotropic":
        d = c.shape[0]
        return (1 - alpha) * c + alpha * float(torch.trace(c)) / d * torch.eye(d, dtype=c.dtype, device=c.device)
    if target == "diagonal":
        return (1 - alpha) * c + alpha * torch.diag(torch.diagonal(c))
    raise ValueError(f"shrinkage target must be one of {', '.join(SHRINK_TARGETS)}; got {target!r}")
