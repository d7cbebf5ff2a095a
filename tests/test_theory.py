"""Theory: the bound against the paper's values, the solver against brute-force enumeration,
and the softmax Jacobian norm against a dense eigensolver."""

import math

import numpy as np
import pytest
import torch

from headalloc.theory import allocate, error_bound, softmax_jacobian_norm

PAPER_E128 = {1: 1.326, 2: 0.663, 8: 0.166, 9: 0.481, 10: 0.580, 20: 0.841, 80: 0.965}


@pytest.mark.parametrize("h,value", sorted(PAPER_E128.items()))
def test_e128_matches_paper_figure(h, value):
    assert round(error_bound([(h, 128 / h)], [1.0], 16).total, 3) == pytest.approx(value, abs=1e-12)


def test_e128_is_u_shaped_with_minimum_at_D_over_d():
    totals = [error_bound([(h, 128 / h)], [1.0], 16).total for h in range(1, 129)]
    assert int(np.argmin(totals)) + 1 == 8


def test_bound_parts_by_hand():
    # Two groups, three lags: tail is |rho_3| B; parts computed from the formula directly.
    parts = error_bound([(2, 4), (3, 16)], [0.5, 1.0, 0.25], token_dim=8, B=2.0, eps=0.1)
    dim = 0.5 * 2 * 1.1 * math.sqrt(1 - 4 / 8)
    sel = 0.5 * 2 * 1.3 * math.exp(0.02) / 2 + 1.0 * 2 * 1.3 * math.exp(0.04) / 3
    assert parts.dimension == pytest.approx(dim)
    assert parts.selection == pytest.approx(sel)
    assert parts.tail == pytest.approx(0.5)
    assert parts.total == pytest.approx(dim + sel + 0.5)


def _all_allocations(budget, n_lags, exact=True, dims=None):
    """Every allocation (tuple of (H, d) per lag 1..M), by brute-force recursion."""
    def fill(m_left, b_left):
        if m_left == 0:
            if (b_left == 0) or (not exact):
                yield ()
            return
        for d in range(1, b_left + 1):
            if dims is not None and d not in dims:
                continue
            for h in range(1, b_left // d + 1):
                for rest in fill(m_left - 1, b_left - h * d):
                    yield ((h, d),) + rest
    for M in range(1, n_lags + 1):
        yield from fill(M, budget)


@pytest.mark.parametrize("budget,token_dim,rho,exact", [
    (12, 4, [1.0, 1.0], True),
    (16, 4, [1.0, 0.5, 0.3], True),
    (18, 6, [0.2, 1.0, 0.7], True),
    (14, 4, [1.0, 0.9, 0.1], False),
    (10, 8, [0.0, 1.0], True),
])
def test_allocate_equals_brute_force(budget, token_dim, rho, exact):
    brute = sorted(error_bound(a, rho, token_dim).total for a in _all_allocations(budget, len(rho), exact))
    res = allocate(budget, token_dim, rho, top_k=6, exact_budget=exact)
    got = [a.bound.total for a in res.allocations]
    assert got == pytest.approx(brute[:6], abs=1e-12)
    for a in res.allocations:
        assert (a.budget == budget) if exact else (a.budget <= budget)
        assert a.bound.total == pytest.approx(error_bound(a.groups, rho, token_dim).total)
    assert len({a.groups for a in res.allocations}) == len(res.allocations)


def test_allocate_restricted_dims_equals_brute_force():
    dims = {2, 4}
    brute = sorted(error_bound(a, [1, 1], 4).total for a in _all_allocations(12, 2, True, dims))
    res = allocate(12, 4, [1, 1], top_k=3, head_dims=sorted(dims))
    assert [a.bound.total for a in res.allocations] == pytest.approx(brute[:3])


def test_spec_example_where_wider_than_token_helps():
    res = allocate(120, 16, [0.5, 1.0, 0.2])
    assert res.best.groups == ((3, 16), (4, 18))
    assert res.best.bound.total == pytest.approx(0.7593, abs=5e-5)
    capped = allocate(120, 16, [0.5, 1.0, 0.2], head_dims=range(1, 17))
    assert capped.best.bound.total == pytest.approx(0.7875, abs=5e-5)
    at_most = allocate(120, 16, [0.5, 1.0, 0.2], exact_budget=False)
    assert all(d <= 16 for _, d in at_most.best.groups)


def test_fourgram_optimum():
    res = allocate(256, 8, [1, 1, 1, 1])
    assert res.best.groups == ((8, 8),) * 4


@pytest.mark.parametrize("kwargs,match", [
    (dict(budget=0, token_dim=8, rho_norms=[1]), "budget"),
    (dict(budget=10.5, token_dim=8, rho_norms=[1]), "budget"),
    (dict(budget=16, token_dim=0, rho_norms=[1]), "token_dim"),
    (dict(budget=16, token_dim=8, rho_norms=[]), "rho_norms"),
    (dict(budget=16, token_dim=8, rho_norms=[1, -1]), "rho_norms"),
    (dict(budget=10, token_dim=8, rho_norms=[1], head_dims=[4, 8]), "cannot be met"),
])
def test_allocate_rejects_bad_input(kwargs, match):
    with pytest.raises(ValueError, match=match):
        allocate(**kwargs)


def test_error_bound_rejects_more_groups_than_lags():
    with pytest.raises(ValueError, match="lag weights"):
        error_bound([(1, 1), (1, 1)], [1.0], 4)


# ---------------------------------------------------------------- softmax saturation
def _dense_norm(p):
    J = torch.diag_embed(p) - p.unsqueeze(-1) * p.unsqueeze(-2)
    return torch.linalg.eigvalsh(J)[..., -1]


def _cases():
    g = torch.Generator().manual_seed(0)
    L = 257
    yield "random", torch.softmax(torch.randn(64, L, generator=g, dtype=torch.float64), -1)
    yield "peaked", torch.softmax(8 * torch.randn(64, L, generator=g, dtype=torch.float64), -1)
    yield "uniform", torch.full((4, L), 1.0 / L, dtype=torch.float64)
    yield "one-hot", torch.eye(L, dtype=torch.float64)[:4]
    tied = torch.zeros(3, L, dtype=torch.float64)
    tied[0, :2] = 0.5
    tied[1, :3] = torch.tensor([0.3, 0.3, 0.4])
    tied[2, :4] = torch.tensor([0.4, 0.4, 0.1, 0.1])
    yield "tied", tied
    masked = torch.softmax(torch.randn(8, L, generator=g, dtype=torch.float64), -1)
    masked[:, 100:] = 0
    yield "causal-masked", masked / masked.sum(-1, keepdim=True)


@pytest.mark.parametrize("name,p", list(_cases()), ids=lambda x: x if isinstance(x, str) else "")
def test_jacobian_norm_matches_eigvalsh(name, p):
    ref = _dense_norm(p)
    got = softmax_jacobian_norm(p)
    rel = (got - ref).abs() / ref.abs().clamp_min(1e-300)
    # Relative 1e-6, except where the norm is at eigvalsh's own absolute precision.
    assert bool(((rel <= 1e-6) | ((got - ref).abs() <= 1e-14)).all()), (name, rel.max())


def test_jacobian_norm_extremely_peaked_stays_in_interlacing_bracket():
    p = torch.softmax(60 * torch.randn(32, 300, dtype=torch.float64), -1)
    got = softmax_jacobian_norm(p)
    top = p.topk(2, -1).values
    assert bool(((got >= top[:, 1]) & (got <= top[:, 0])).all())
    assert (got - _dense_norm(p)).abs().max() < 1e-13


def test_jacobian_norm_batched_shapes_and_float32():
    p = torch.softmax(torch.randn(2, 3, 5, 64), -1)
    got = softmax_jacobian_norm(p)
    assert got.shape == (2, 3, 5) and got.dtype == torch.float32
    assert torch.allclose(got.double(), _dense_norm(p.double()), rtol=1e-5)
    assert softmax_jacobian_norm(torch.ones(3, 1)).tolist() == [0.0, 0.0, 0.0]


def test_a_budget_too_large_for_memory_is_refused_before_allocating(capsys):
    from headalloc.cli import main

    assert main(["plan", "--budget", "100000000", "--token-dim", "8", "--rho", "1,1"]) == 2
    err = capsys.readouterr().err
    assert "GiB" in err and "head_dims" in err
    # the same budget with few allowed widths is small enough
    from headalloc.theory import allocate

    assert allocate(4096, 8, [1, 1], head_dims=[8, 16, 32, 64]).best.budget == 4096
