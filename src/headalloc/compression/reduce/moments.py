"""The statistics a factorised output projection is fitted to: the second moment of the teacher's head outputs
(what the output projection reads) and, for `factor_output` 'fisher', the loss gradient's covariance at the
attention output. The planners keep them per calibration and fold (`planning.estimates.factor_inputs`)."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from headalloc.compression.calibration import Calibration, InputMoment, shrink_moment
from headalloc.compression.families import adapter_for
from headalloc.compression.settings import FACTOR_OUTPUT_CHOICES


@torch.no_grad()
def output_moments(model, cal: Calibration) -> list[torch.Tensor] | None:
    """Per layer: E[z z^T] of the teacher's output-projection input z (every head's output, concatenated) on
    the calibration inputs (float64, CPU; `cal.out_moment` when the calibration collected it), pulled toward
    isotropic by the calibration's `whiten_shrink`; None when the calibration kept no inputs."""
    if cal.inputs is None or not all(cal.inputs):
        return None
    if cal.out_moment is not None:
        out = list(cal.out_moment)
    else:
        ad = adapter_for(model)
        out = []
        for l in range(ad.n_layers(model.config)):
            attn = ad.attention(model, l)
            acc = InputMoment()
            h = attn.o_proj.register_forward_pre_hook(acc)
            try:
                for X, pe in zip(cal.inputs[l], cal.positions):
                    attn(hidden_states=X, position_embeddings=pe, attention_mask=None)
            finally:
                h.remove()
            out.append(acc.moment())
    if cal.whiten_shrink:  # the same pull toward isotropic as the layer inputs'
        out = [shrink_moment(c, cal.whiten_shrink) for c in out]
    return out


@torch.no_grad()
def grad_moments(cal: Calibration, ridge: float = 1e-2) -> list[torch.Tensor] | None:
    """Per layer: E[g g^T] of the LM-loss gradient at the attention output on the calibration text (float64,
    CPU), plus `ridge` x its mean eigenvalue on the diagonal (positive definite, so it can weight a
    factorisation); None without gradients."""
    if cal.grads is None:
        return None
    out = []
    for gl in cal.grads:
        G = sum((lambda f: f.T @ f)(g.reshape(-1, g.shape[-1]).double().cpu()) for g in gl)
        G = G / sum(g.reshape(-1, g.shape[-1]).shape[0] for g in gl)
        out.append(G + ridge * torch.trace(G) / G.shape[0] * torch.eye(G.shape[0], dtype=G.dtype))
    return out


@dataclass(frozen=True)
class FactorInputs:
    """Per layer, what a factorised output projection is fitted to (`reduce_layer`'s `out_moment` and
    `out_weight`); `None` entries mean plain SVD on that side."""

    out_moment: list[torch.Tensor] | None = None
    out_weight: list[torch.Tensor] | None = None

    def for_layer(self, layer: int) -> dict:
        return {"out_moment": None if self.out_moment is None else self.out_moment[layer],
                **({"out_weight": None if self.out_weight is None else self.out_weight[layer]}
                   if self.out_weight is not None else {})}


PLAIN = FactorInputs()


def factor_inputs(model, cal: Calibration | None, factor_output: str = "input") -> FactorInputs:
    """What `factor_output` fits a factorised output projection to on `cal`: 'input' whitens it by the head
    outputs only, 'fisher' also weights its error by the gradient covariance, 'plain' uses neither (truncated SVD
    of the weights)."""
    if factor_output not in FACTOR_OUTPUT_CHOICES:
        raise ValueError(f"factor_output must be one of {', '.join(FACTOR_OUTPUT_CHOICES)}; got {factor_output!r}")
    if cal is None or factor_output == "plain":
        return PLAIN
    outm = output_moments(model, cal)
    return FactorInputs(outm, grad_moments(cal)) if factor_output == "fisher" else FactorInputs(outm)
