"""The information-extraction error bound of arXiv 2510.03784 and its exact allocation solver.

Notation follows the paper: a layer with embedding budget D splits its heads into M groups, group
m has H_m heads of dimension d_m and extracts lag m; D = sum_m H_m d_m; the token dimension is d.

    E_D <= sum_m |rho_m| B ((1+eps) 1{d_m <= d} sqrt(1 - d_m/d) + 1.3 e^{0.02 m} / H_m)
           + sum_{k>M} |rho_k| B
"""

from __future__ import annotations

import heapq
import math
from dataclasses import asdict, dataclass, field
from typing import Sequence

import numpy as np

SELECTION_CONST = 1.3  # the paper's fitted constant in 1.3 e^{0.02 m} / H_m
SELECTION_RATE = 0.02


@dataclass(frozen=True)
class BoundParts:
    """The bound E_D and its three parts: dimension loss, selection error, tail of unserved lags."""

    total: float
    dimension: float
    selection: float
    tail: float

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass(frozen=True)
class Allocation:
    """One allocation of a layer: groups[m-1] = (H_m heads, d_m head dim) serving lag m."""

    groups: tuple[tuple[int, int], ...]
    bound: BoundParts

    @property
    def n_groups(self) -> int:
        return len(self.groups)

    @property
    def budget(self) -> int:
        return sum(h * d for h, d in self.groups)

    @property
    def n_heads(self) -> int:
        return sum(h for h, _ in self.groups)

    def to_dict(self) -> dict:
        return {
            "groups": [{"lag": m + 1, "heads": h, "head_dim": d} for m, (h, d) in enumerate(self.groups)],
            "n_groups": self.n_groups,
            "n_heads": self.n_heads,
            "budget": self.budget,
            "bound": self.bound.to_dict(),
        }


@dataclass
class AllocationResult:
    """The optimum of the allocation problem and the runners-up, best first."""

    budget: int
    token_dim: int
    rho_norms: tuple[float, ...]
    B: float
    exact_budget: bool
    allocations: list[Allocation] = field(default_factory=list)

    @property
    def best(self) -> Allocation:
        return self.allocations[0]

    def to_dict(self) -> dict:
        return {
            "budget": self.budget,
            "token_dim": self.token_dim,
            "rho_norms": list(self.rho_norms),
            "B": self.B,
            "constraint": "sum H_m d_m == D" if self.exact_budget else "sum H_m d_m <= D",
            "best": self.best.to_dict(),
            "runners_up": [a.to_dict() for a in self.allocations[1:]],
        }


def _check_rho(rho_norms: Sequence[float]) -> np.ndarray:
    rho = np.asarray(list(rho_norms), dtype=np.float64)
    if rho.ndim != 1 or rho.size == 0:
        raise ValueError(
            f"rho_norms must be a non-empty list of lag weights |rho_1|, |rho_2|, ...; got {list(rho_norms)!r}"
        )
    if not np.all(np.isfinite(rho)) or np.any(rho < 0):
        raise ValueError(f"rho_norms must be finite and >= 0 (they are norms); got {rho.tolist()}")
    return rho


def _check_positive(name: str, value: float, integer: bool = False) -> None:
    ok = value > 0 and math.isfinite(value)
    if integer:
        ok = ok and float(value).is_integer()
    if not ok:
        kind = "a positive integer" if integer else "a positive finite number"
        raise ValueError(f"{name} must be {kind}; got {value!r}")


def dimension_term(head_dim: float | np.ndarray, token_dim: float) -> np.ndarray:
    """1{d_m <= d} sqrt(1 - d_m/d): the information a head narrower than the token loses."""
    dm = np.asarray(head_dim, dtype=np.float64)
    return np.where(dm <= token_dim, np.sqrt(np.clip(1.0 - dm / token_dim, 0.0, None)), 0.0)


def selection_term(n_heads: float | np.ndarray, lag: int | np.ndarray) -> np.ndarray:
    """1.3 e^{0.02 m} / H_m: the error of selecting lag m with H_m softmax heads."""
    return SELECTION_CONST * np.exp(SELECTION_RATE * np.asarray(lag, dtype=np.float64)) / np.asarray(
        n_heads, dtype=np.float64
    )


def error_bound(
    groups: Sequence[tuple[float, float]],
    rho_norms: Sequence[float],
    token_dim: float,
    B: float = 1.0,
    eps: float = 0.0,
) -> BoundParts:
    """The paper's bound E_D for head groups [(H_1, d_1), ...]; group m serves lag m, the rest is tail.

    Fractional H_m and d_m are accepted so that curves can be drawn.
    """
    rho = _check_rho(rho_norms)
    _check_positive("token_dim", token_dim)
    _check_positive("B", B)
    if eps < 0:
        raise ValueError(f"eps must be >= 0; got {eps!r}")
    groups = [tuple(g) for g in groups]
    if len(groups) > rho.size:
        raise ValueError(
            f"{len(groups)} head groups but only {rho.size} lag weights: group m serves lag m, so give "
            f"at least as many rho norms as groups (pad with zeros for lags that do not matter)"
        )
    dim = sel = 0.0
    for m, g in enumerate(groups, start=1):
        if len(g) != 2:
            raise ValueError(f"group {m} must be (n_heads, head_dim); got {g!r}")
        h, d = float(g[0]), float(g[1])
        _check_positive(f"n_heads of group {m}", h)
        _check_positive(f"head_dim of group {m}", d)
        w = rho[m - 1] * B
        dim += w * (1.0 + eps) * float(dimension_term(d, token_dim))
        sel += w * float(selection_term(h, m))
    tail = float(rho[len(groups):].sum() * B)
    return BoundParts(total=dim + sel + tail, dimension=dim, selection=sel, tail=tail)


def _pairs(budget: int, head_dims: np.ndarray, max_heads: int | None) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Every (H, d) with d in head_dims and H d <= budget, sorted by the budget H d they use."""
    hs, ds = [], []
    for d in head_dims:
        n = budget // int(d) if max_heads is None else min(budget // int(d), max_heads)
        if n >= 1:
            hs.append(np.arange(1, n + 1))
            ds.append(np.full(n, int(d)))
    if not hs:
        return np.zeros(0, np.int64), np.zeros(0, np.int64), np.zeros(0, np.int64)
    h, d = np.concatenate(hs), np.concatenate(ds)
    b = h * d
    order = np.argsort(b, kind="stable")
    return h[order], d[order], b[order]


def _group_cost_table(costs: np.ndarray, used: np.ndarray, budget: int) -> np.ndarray:
    """g[b] = best cost of one group with H d == b exactly (inf where no pair uses b)."""
    g = np.full(budget + 1, np.inf)
    np.minimum.at(g, used, costs)
    return g


def _min_plus(prev: np.ndarray, g: np.ndarray, chunk: int = 256) -> np.ndarray:
    """out[b] = min_{1<=j<=b} prev[b-j] + g[j] (a min-plus convolution), vectorised in row chunks."""
    n = prev.size  # budget + 1
    out = np.full(n, np.inf)
    finite = np.flatnonzero(np.isfinite(prev))
    if finite.size == 0:
        return out
    lo = int(finite[0])
    # prev padded on the left with inf so that row b reads prev[b-1], ..., prev[b-(n-1)].
    pad = np.concatenate([np.full(n - 1, np.inf), prev])
    windows = np.lib.stride_tricks.sliding_window_view(pad, n - 1)  # windows[s] = pad[s : s+n-1]
    g_rev = g[1:][::-1]  # g_rev[k] = g[n-1-k]
    for start in range(lo + 1, n, chunk):
        stop = min(n, start + chunk)
        # Row b needs j <= b - lo only; columns k = n-1-j, so restrict to k >= n-1-(stop-1-lo).
        k0 = max(0, n - 1 - (stop - 1 - lo))
        block = windows[start:stop, k0:] + g_rev[None, k0:]
        out[start:stop] = block.min(axis=1)
    return out


MAX_SOLVER_BYTES = 4 * 2**30  # refuse problems whose tables would exceed this (2 GiB is safe on a laptop)


def allocate(
    budget: int,
    token_dim: int,
    rho_norms: Sequence[float],
    B: float = 1.0,
    *,
    top_k: int = 5,
    exact_budget: bool = True,
    head_dims: Sequence[int] | None = None,
    max_heads: int | None = None,
    max_groups: int | None = None,
) -> AllocationResult:
    """Exact minimiser of the bound (eps = 0) over M, H_m, d_m with sum H_m d_m = D, plus runners-up.

    The objective is separable over groups, so a dynamic programme over (group m, budget used)
    gives the exact optimum: F_m(b) = min_{b'} F_{m-1}(b - b') + g_m(b'), where g_m(b') is the best
    single-group cost with H d = b'. The `top_k` best allocations are then enumerated exactly by a
    best-first search whose priority is (cost so far + exact optimal completion from the table).

    `exact_budget=False` solves the "at most D" variant. `head_dims` restricts the allowed head
    dimensions (e.g. multiples of 8), `max_heads` caps H_m, `max_groups` caps M.
    """
    rho = _check_rho(rho_norms)
    _check_positive("budget", budget, integer=True)
    _check_positive("token_dim", token_dim, integer=True)
    _check_positive("B", B)
    if top_k < 1:
        raise ValueError(f"top_k must be >= 1; got {top_k}")
    budget, token_dim = int(budget), int(token_dim)
    if head_dims is None:
        dims = None  # every width 1..D (listed after the memory check below)
    else:
        dims = np.unique(np.asarray(list(head_dims), dtype=np.int64))
        if dims.size == 0 or np.any(dims < 1):
            raise ValueError(f"head_dims must be positive integers; got {list(head_dims)!r}")
        dims = dims[dims <= budget]
    if max_heads is not None and max_heads < 1:
        raise ValueError(f"max_heads must be >= 1; got {max_heads}")
    n_lags = rho.size if max_groups is None else min(rho.size, int(max_groups))
    if n_lags < 1:
        raise ValueError(f"max_groups must be >= 1; got {max_groups}")

    # The solver holds every (heads, dim) pair with heads * dim <= D (about D ln D of them, a few arrays
    # of 8-byte numbers each) and one table of D numbers per lag: refuse what would need gigabytes.
    if head_dims is None:  # sum_{d<=D} floor(D/d) ~ D (ln D + 0.58), without listing the D widths
        n_pairs = int(budget * (math.log(budget) + 0.58)) + 1
        if max_heads is not None:
            n_pairs = min(n_pairs, budget * int(max_heads))
    else:
        per_dim = budget // dims
        n_pairs = int(np.minimum(per_dim, max_heads).sum() if max_heads is not None else per_dim.sum())
    need = 8 * (6 * n_pairs + (n_lags + 2) * (budget + 1) + (budget if head_dims is None else 0))
    if need > MAX_SOLVER_BYTES:
        raise ValueError(f"budget D={budget} would need about {need / 2**30:.1f} GiB in the exact solver "
                         f"({n_pairs:,} (heads, dim) pairs); restrict head_dims (e.g. powers of two), cap "
                         f"max_heads, or solve a smaller budget")
    if dims is None:
        dims = np.arange(1, budget + 1)
    # Forward DP tables: F[m][b] = min cost of groups 1..m (dimension + selection) using exactly b.
    ph, pd, pb = _pairs(budget, dims, max_heads)
    dim_t, inv_h = dimension_term(pd, token_dim), 1.0 / ph

    def pair_costs(m: int) -> np.ndarray:
        return rho[m - 1] * B * (dim_t + SELECTION_CONST * math.exp(SELECTION_RATE * m) * inv_h)

    F = [np.concatenate([[0.0], np.full(budget, np.inf)])]
    for m in range(1, n_lags + 1):
        F.append(_min_plus(F[-1], _group_cost_table(pair_costs(m), pb, budget)))
    tails = np.array([rho[m:].sum() * B for m in range(n_lags + 1)])

    # Best-first enumeration of complete allocations. A state is (lags M..m+1 chosen, budget b
    # left for lags 1..m); its priority is cost so far + F[m][b], the exact optimum of the rest, so
    # complete allocations pop in order of total cost. Children of a state are generated at once
    # (vectorised), sorted, and released one at a time: popping child i pushes child i+1.
    def children(m: int, b: int, acc: float):
        n = int(np.searchsorted(pb, b, side="right"))  # pairs using at most b
        c = pair_costs(m)[:n]
        left = b - pb[:n]
        prio = acc + c + F[m - 1][left]
        ok = np.flatnonzero(np.isfinite(prio))
        order = ok[np.argsort(prio[ok], kind="stable")]
        return (prio[order], (acc + c)[order], ph[order], pd[order], left[order])

    heap: list = []
    counter = 0
    roots = []
    for M in range(1, n_lags + 1):
        ends = [budget] if exact_budget else range(M, budget + 1)
        roots += [(F[M][b] + tails[M], M, b) for b in ends if np.isfinite(F[M][b])]
    if not roots:
        raise ValueError(
            f"budget D={budget} cannot be met: no allocation of heads with head_dims "
            f"{'any' if head_dims is None else list(map(int, dims))} and max_heads={max_heads} sums to "
            f"{'exactly ' if exact_budget else 'at most '}{budget}. Choose a budget that is a sum of "
            f"multiples of the allowed head dimensions, or relax head_dims / max_heads."
        )
    roots.sort()
    # Heap entries: (priority, tiebreak, sibling list, index in it, lag m of the child, chosen so far).
    root_list = ("roots", roots)
    heapq.heappush(heap, (roots[0][0], counter, root_list, 0, None, ()))
    found: list[Allocation] = []
    while heap and len(found) < top_k:
        prio, _, sibs, i, m_parent, chosen = heapq.heappop(heap)
        if sibs[0] == "roots":
            M, b, acc, new_chosen, m = sibs[1][i][1], sibs[1][i][2], float(tails[sibs[1][i][1]]), (), sibs[1][i][1]
            nxt = sibs[1][i + 1][0] if i + 1 < len(sibs[1]) else None
        else:
            p, accs, hs, ds, lefts = sibs[1]
            b, acc, m = int(lefts[i]), float(accs[i]), m_parent - 1
            new_chosen = chosen + ((int(hs[i]), int(ds[i])),)
            nxt = p[i + 1] if i + 1 < len(p) else None
        counter += 1
        if nxt is not None:
            heapq.heappush(heap, (nxt, counter, sibs, i + 1, m_parent, chosen))
            counter += 1
        if m == 0:
            groups = tuple(reversed(new_chosen))
            found.append(Allocation(groups=groups, bound=error_bound(groups, rho, token_dim, B)))
            continue
        kids = children(m, b, acc)
        if kids is not None and kids[0].size:
            heapq.heappush(heap, (kids[0][0], counter, ("kids", kids), 0, m, new_chosen))
    return AllocationResult(budget=budget, token_dim=token_dim, rho_norms=tuple(rho.tolist()), B=B,
                            exact_budget=exact_budget, allocations=found)


def tradeoff_curve(budget: float, token_dim: float, n_heads: Sequence[float], rho_norms: Sequence[float],
                   B: float = 1.0, n_groups: int | None = None) -> list[BoundParts]:
    """Bound when each of M groups has H heads of dimension budget/(M H) (the paper's E_D figure);
    M = n_groups, or one group per lag weight."""
    rho = _check_rho(rho_norms)
    M = rho.size if n_groups is None else int(n_groups)
    return [error_bound([(h, budget / (M * h))] * M, rho, token_dim, B) for h in n_heads]
