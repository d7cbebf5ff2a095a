"""Synthetic tasks of both papers, each a seeded generator with a fixed train/validation split.

- "convolution" (2510.03784): x_t ~ N(0, I_d) white noise, y_t = sum_{i in lags} rho_i x_{t-i} with
  fixed random d x d matrices rho_i scaled to spectral norms |rho_i|. An n-gram target is lags
  0..n-1. Loss on positions t >= max lag (every lag inside the sequence).
- "induction_first_step": y_t = x_{t-1} (the previous-token head), a convolution with rho_1 = I.
- "induction": token sequences [s; s] of a random segment s of length T/2 over a vocabulary of V;
  in the second copy the next token is predicted (cross-entropy), which needs a previous-token
  head and an induction head.
- "nonlinear_convolution" (our choice for the paper's nonlinear extension): y_t = tanh(sum_i rho_i x_{t-i}),
  elementwise, so the extraction is linear and the readout nonlinear.
- "dretrieval" (2510.06662, Gaussian): x(t) ~ N(0, I_d), y = sum_{i=1..D} max_t a_i^T x(t) with fixed
  random unit vectors a_i (linear independence checked), sequence-to-vector.
- "dretrieval_general" (2510.06662, eqs. 8-9): x(t) ~ U([0,1]^d), f_i(x) = (x-c_i)^T A_i (x-c_i) / k_i
  with A_i positive definite and distinct centres c_i (unique minimisers, PD Hessians),
  z_i = min_{t in S_i} f_i(x(t)) with |S_i| >= T/4, and F_0(z) = sum_i w_i z_i (all w_i != 0) or
  tanh(W z) . v. This satisfies the paper's non-degeneracy Assumption 2.
Regression targets are standardised with training statistics; NMSE = MSE / Var(y) is unaffected.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch


@dataclass
class TaskData:
    """Tensors of one task; `loss` is "mse" or "ce"; `score_mask` (T,) marks scored positions (seq2seq)."""

    name: str
    x_train: torch.Tensor
    y_train: torch.Tensor
    x_val: torch.Tensor
    y_val: torch.Tensor
    loss: str = "mse"
    score_mask: torch.Tensor | None = None  # None for sequence-to-vector tasks
    input_dim: int | None = None
    vocab_size: int | None = None
    output_dim: int = 1
    seq_to_vec: bool = False
    info: dict | None = None


def _split(n_train: int, n_val: int, make: Callable[[int, torch.Generator], tuple], g: torch.Generator):
    x, y = make(n_train + n_val, g)
    return x[:n_train], y[:n_train], x[n_train:], y[n_train:]


def _standardise(y_tr: torch.Tensor, y_va: torch.Tensor, dims) -> tuple[torch.Tensor, torch.Tensor, dict]:
    mu, sd = y_tr.mean(dim=dims, keepdim=True), y_tr.std(dim=dims, keepdim=True).clamp_min(1e-8)
    return (y_tr - mu) / sd, (y_va - mu) / sd, {"y_mean": mu.flatten().tolist(), "y_std": sd.flatten().tolist()}


def _random_matrices(n: int, d: int, norms, g: torch.Generator) -> torch.Tensor:
    mats = torch.randn(n, d, d, generator=g) / d ** 0.5
    spec = torch.linalg.matrix_norm(mats, ord=2)
    return mats / spec[:, None, None] * torch.as_tensor(norms, dtype=torch.float32)[:, None, None]


def convolution(d: int = 8, lags=(0, 1, 2, 3), rho_norms=None, T: int = 32, n_train: int = 8000,
                n_val: int = 2000, seed: int = 0, nonlinear: bool = False, identity: bool = False) -> TaskData:
    lags = [int(l) for l in lags]
    if min(lags) < 0 or max(lags) >= T:
        raise ValueError(f"lags must lie in [0, T={T}); got {lags}")
    norms = [1.0] * len(lags) if rho_norms is None else list(rho_norms)
    if len(norms) != len(lags):
        raise ValueError(f"{len(lags)} lags but {len(norms)} rho norms")
    g = torch.Generator().manual_seed(seed)
    rho = torch.stack([torch.eye(d) * n for n in norms]) if identity else _random_matrices(len(lags), d, norms, g)

    def make(n, g):
        x = torch.randn(n, T, d, generator=g)
        y = torch.zeros_like(x)
        for lag, r in zip(lags, rho):
            y[:, lag:] += x[:, : T - lag] @ r.T
        return x, (torch.tanh(y) if nonlinear else y)

    x_tr, y_tr, x_va, y_va = _split(n_train, n_val, make, g)
    mask = torch.zeros(T, dtype=torch.bool)
    mask[max(lags):] = True
    name = "nonlinear_convolution" if nonlinear else ("induction_first_step" if identity else "convolution")
    return TaskData(name, x_tr, y_tr, x_va, y_va, "mse", mask, input_dim=d, output_dim=d,
                    info={"lags": lags, "rho_norms": norms, "d": d, "T": T})


def induction(vocab: int = 16, T: int = 32, n_train: int = 8000, n_val: int = 2000, seed: int = 0) -> TaskData:
    if T % 2:
        raise ValueError(f"induction needs an even T (two copies of a segment); got {T}")
    g = torch.Generator().manual_seed(seed)

    def make(n, g):
        s = torch.randint(0, vocab, (n, T // 2), generator=g)
        x = torch.cat([s, s], dim=1)
        y = torch.roll(x, -1, dims=1)  # next token
        return x, y

    x_tr, y_tr, x_va, y_va = _split(n_train, n_val, make, g)
    mask = torch.zeros(T, dtype=torch.bool)
    mask[T // 2: T - 1] = True  # predictable positions: inside the second copy
    return TaskData("induction", x_tr, y_tr, x_va, y_va, "ce", mask, vocab_size=vocab, output_dim=vocab,
                    info={"vocab": vocab, "T": T})


def _independent_unit_vectors(D: int, d: int, g: torch.Generator) -> torch.Tensor:
    if D > d:
        raise ValueError(f"D={D} linearly independent directions need d >= D; got d={d}")
    for _ in range(100):
        a = torch.randn(D, d, generator=g)
        a = a / a.norm(dim=1, keepdim=True)
        if torch.linalg.matrix_rank(a) == D and torch.linalg.svdvals(a).min() > 0.2:
            return a
    raise RuntimeError("could not draw well-conditioned directions")  # pragma: no cover


def dretrieval(D: int = 4, d: int = 4, T: int = 16, n_train: int = 8000, n_val: int = 2000, seed: int = 0) -> TaskData:
    g = torch.Generator().manual_seed(seed)
    a = _independent_unit_vectors(D, d, g)

    def make(n, g):
        x = torch.randn(n, T, d, generator=g)
        y = (x @ a.T).amax(dim=1).sum(dim=-1, keepdim=True)
        return x, y

    x_tr, y_tr, x_va, y_va = _split(n_train, n_val, make, g)
    y_tr, y_va, st = _standardise(y_tr, y_va, 0)
    return TaskData("dretrieval", x_tr, y_tr, x_va, y_va, "mse", None, input_dim=d, output_dim=1, seq_to_vec=True,
                    info={"D": D, "d": d, "T": T, "a": a.tolist(), **st})


def dretrieval_general(D: int = 3, d: int = 2, T: int = 16, n_train: int = 8000, n_val: int = 2000, seed: int = 0,
                       subsets: bool = False, F0: str = "linear") -> TaskData:
    g = torch.Generator().manual_seed(seed)
    centres = 0.2 + 0.6 * torch.rand(D, d, generator=g)
    while torch.cdist(centres, centres).add(torch.eye(D)).min() < 0.1:  # distinct minimisers (Assumption 2.2)
        centres = 0.2 + 0.6 * torch.rand(D, d, generator=g)
    Q = torch.linalg.qr(torch.randn(D, d, d, generator=g)).Q
    eig = 0.5 + torch.rand(D, d, generator=g)
    A = Q @ torch.diag_embed(eig) @ Q.transpose(1, 2)  # positive definite Hessians (Assumption 2.3)
    kappa = eig.amax(dim=1) * d  # (x-c)^T A (x-c) <= max eig * d on the unit cube: f_i in [0, 1]
    if subsets:
        S = torch.zeros(D, T, dtype=torch.bool)
        for i in range(D):
            S[i, torch.randperm(T, generator=g)[: max(1, -(-T // 4))]] = True  # |S_i| >= T/4
    else:
        S = torch.ones(D, T, dtype=torch.bool)
    w = torch.where(torch.rand(D, generator=g) < 0.5, -1.0, 1.0) * (0.5 + torch.rand(D, generator=g))
    W = torch.randn(D, D, generator=g)
    v = torch.randn(D, generator=g)

    def make(n, g):
        x = torch.rand(n, T, d, generator=g)
        diff = x[:, :, None, :] - centres  # (n, T, D, d)
        f = torch.einsum("ntde,def,ntdf->ntd", diff, A, diff) / kappa
        z = torch.where(S.T[None], f, torch.inf).amin(dim=1)  # (n, D)
        y = z @ w if F0 == "linear" else torch.tanh(z @ W.T) @ v
        return x, y[:, None]

    x_tr, y_tr, x_va, y_va = _split(n_train, n_val, make, g)
    y_tr, y_va, st = _standardise(y_tr, y_va, 0)
    return TaskData("dretrieval_general", x_tr, y_tr, x_va, y_va, "mse", None, input_dim=d, output_dim=1,
                    seq_to_vec=True, info={"D": D, "d": d, "T": T, "subsets": subsets, "F0": F0, **st})


TASKS: dict[str, Callable[..., TaskData]] = {
    "convolution": convolution,
    "ngram": convolution,
    "induction_first_step": lambda **kw: convolution(**{"lags": (1,), "identity": True, **kw}),
    "nonlinear_convolution": lambda **kw: convolution(**{**kw, "nonlinear": True}),
    "induction": induction,
    "dretrieval": dretrieval,
    "dretrieval_general": dretrieval_general,
}


def make_task(name: str, **params) -> TaskData:
    """Build a task by name with its parameters (see the module docstring for defaults)."""
    if name not in TASKS:
        raise ValueError(f"unknown task {name!r}; available: {', '.join(TASKS)}")
    try:
        return TASKS[name](**params)
    except TypeError as e:
        raise ValueError(f"bad parameters for task {name!r}: {e}") from None
