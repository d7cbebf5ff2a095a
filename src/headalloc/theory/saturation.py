"""Softmax saturation: the exact spectral norm of the softmax Jacobian J = diag(p) - p p^T.

J is symmetric PSD and a rank-one downdate of diag(p), so its eigenvalues interlace the sorted
entries of p: the largest lies in [p_(2), p_(1)] and is the root there of the secular equation
    f(lam) = 1 - sum_i p_i^2 / (p_i - lam) = 0,
which is strictly decreasing on (p_(2), p_(1)). A safeguarded rational (two-pole) iteration, as
in LAPACK's secular-equation solvers, with bisection when a step leaves the bracket, finds it in a
handful of O(L) passes, against O(L^3) for a dense eigensolver.
"""

from __future__ import annotations

import torch


def softmax_jacobian_norm(p: torch.Tensor, rtol: float = 1e-12, max_iter: int = 100) -> torch.Tensor:
    """||diag(p) - p p^T||_2 for each distribution p along the last dimension (batched, O(L) per row).

    `p` must hold probability vectors (non-negative, summing to 1) in its last dimension; masked
    keys may be exact zeros. Returns a tensor of shape p.shape[:-1] in p's floating dtype.
    """
    if not torch.is_tensor(p):
        p = torch.as_tensor(p)
    if p.ndim == 0:
        raise ValueError("p must have at least one dimension (the distribution); got a scalar")
    out_dtype = p.dtype if p.is_floating_point() else torch.float64
    if p.shape[-1] == 0:
        raise ValueError(f"p has an empty last dimension (shape {tuple(p.shape)}); a distribution needs >= 1 entry")
    if p.shape[-1] == 1:
        return torch.zeros(p.shape[:-1], dtype=out_dtype, device=p.device)
    q = p.detach().to(torch.float64)
    top = torch.topk(q, 2, dim=-1)
    p1, p2 = top.values[..., 0].clone(), top.values[..., 1].clone()
    # The rest of the distribution, without its largest entry (a zero adds nothing below).
    rest = q.scatter(-1, top.indices[..., :1], 0.0)
    rest_sq = rest * rest
    lo, hi = p2.clone(), p1.clone()
    # Start from the largest eigenvalue of the 2x2 block of J on the two largest entries.
    a, c, off = p1 - p1 * p1, p2 - p2 * p2, -p1 * p2
    lam = 0.5 * (a + c) + torch.sqrt(0.25 * (a - c) ** 2 + off * off)
    lam = torch.minimum(torch.maximum(lam, lo), hi)
    tiny = torch.finfo(torch.float64).tiny
    active = (hi - lo) > rtol * hi.clamp_min(tiny)
    for _ in range(max_iter):
        if not bool(active.any()):
            break
        idx = active.nonzero(as_tuple=True)
        la, P1, P2 = lam[idx], p1[idx], p2[idx]
        diff = rest[idx] - la.unsqueeze(-1)
        diff = torch.where(diff == 0, torch.full_like(diff, -1e-300), diff)  # a key exactly at lam
        inv = 1.0 / diff
        t2 = rest_sq[idx] * inv
        psi2, dpsi2 = t2.sum(-1), (t2 * inv).sum(-1)
        f = 1.0 - P1 * P1 / (P1 - la) - psi2
        lo_a = torch.where(f > 0, la, lo[idx])  # f decreases on the bracket: root is right of lam if f > 0
        hi_a = torch.where(f < 0, la, hi[idx])
        # Rational model of the rest (s + t/(p2 - lam), matching value and slope at lam) keeps the
        # two poles exact; the model equation is a quadratic with one root in (p2, p1).
        t = dpsi2 * (P2 - la) ** 2
        A = 1.0 - (psi2 - dpsi2 * (P2 - la))
        qb = -A * (P1 + P2) + P1 * P1 + t
        qc = A * P1 * P2 - P1 * P1 * P2 - t * P1
        disc = torch.sqrt((qb * qb - 4 * A * qc).clamp_min(0.0))
        sgn = torch.where(qb >= 0, 1.0, -1.0)
        qq = -0.5 * (qb + sgn * disc)
        r1 = qq / A
        r2 = qc / torch.where(qq == 0, torch.full_like(qq, tiny), qq)
        r1_in = (r1 > lo_a) & (r1 < hi_a) & torch.isfinite(r1)
        r2_in = (r2 > lo_a) & (r2 < hi_a) & torch.isfinite(r2)
        new = torch.where(r1_in, r1, torch.where(r2_in, r2, 0.5 * (lo_a + hi_a)))
        # The model's root may coincide with lam itself, which is then a bracket end: converged.
        at_lam = ((r1 - la).abs() <= rtol * la.abs()) | ((r2 - la).abs() <= rtol * la.abs()) | (f == 0)
        new = torch.where(at_lam, la, new)
        conv = at_lam | ((new - la).abs() <= rtol * new.abs()) | ((hi_a - lo_a) <= rtol * hi_a)
        lam[idx] = new
        lo[idx], hi[idx] = lo_a, hi_a
        act = active.clone()
        act[idx] = ~conv
        active = act
    return lam.to(out_dtype)


def softmax_jacobian_columns(p: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The second reading of "the Jacobian with respect to the logits": the sensitivity of the whole
    distribution to one key's logit, ||dp/dz_l||_2 = ||J e_l||_2 = p_l sqrt((1 - p_l)^2 + sum_i p_i^2 - p_l^2)
    (column l of J = diag(p) - p p^T). Returns (mean over keys, max over keys) along the last dimension;
    keys with p_l = 0 (masked) are excluded from the mean (their sensitivity is 0)."""
    q = p.detach().to(torch.float64)
    s = (q * q).sum(-1, keepdim=True)
    col = q * torch.sqrt(((1 - q) ** 2 + s - q * q).clamp_min(0))
    keys = (q > 0).sum(-1).clamp_min(1)
    return col.sum(-1) / keys, col.amax(-1)


def without_keys(p: torch.Tensor, drop: torch.Tensor) -> torch.Tensor:
    """p with the keys where `drop` (broadcastable boolean over the last dimension) is True removed and
    the rest renormalised: the attention the row would have without those (sink) keys, logits unchanged."""
    q = p.masked_fill(drop, 0.0)
    return q / q.sum(-1, keepdim=True).clamp_min(torch.finfo(q.dtype).tiny)
