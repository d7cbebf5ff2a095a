"""The linear algebra of data-aware reduction: symmetric square roots, thin SVDs of products, and truncated
SVDs whitened by an input's second moment (SVD-LLM's and Palu's factorisation), whole or block-diagonal."""

from __future__ import annotations

import torch


def _sym_sqrt(C: torch.Tensor, eps: float = 1e-6):
    w, V = torch.linalg.eigh(C)
    w = w.clamp_min(eps * w.max())
    return (V * w.sqrt()) @ V.T, (V / w.sqrt()) @ V.T


def _aug(W: torch.Tensor, b: torch.Tensor | None) -> torch.Tensor:
    """[W | b] in float64 (b = 0 when absent): the map on x~ = [x; 1]."""
    W = W.double()
    col = b.double()[:, None] if b is not None else W.new_zeros(W.shape[0], 1)
    return torch.cat([W, col], 1)


def low_rank_svd(M: torch.Tensor, N: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Thin SVD of the product M @ N, M (m, r), N (r, n), r small, without forming it: QR of both
    factors, then the SVD of an r x r core. Returns U (m, r), S (r,), Vh (r, n) with U diag(S) Vh = M N
    (the product has rank <= r, so nothing is lost)."""
    Qm, Rm = torch.linalg.qr(M)
    Qn, Rn = torch.linalg.qr(N.transpose(0, 1))
    u, S, vh = torch.linalg.svd(Rm @ Rn.transpose(0, 1))
    return Qm @ u, S, vh @ Qn.transpose(0, 1)


def whitened_low_rank(W: torch.Tensor, C: torch.Tensor | None, rank: int, sqrt_cache: dict | None = None,
                      out_weight: torch.Tensor | None = None):
    """(up (out, rank), down (rank, in)) minimising E|W x - up down x|^2 for inputs of second moment C
    (truncated SVD of W C^{1/2}, as SVD-LLM and Palu whiten; None: plain SVD of W). The singular values are
    split evenly (sqrt) between the factors. `out_weight` D (out, out), positive definite: minimise
    E[(W x - up down x)^T D (W x - up down x)] instead (SVD of D^{1/2} W C^{1/2})."""
    if out_weight is not None:
        Ds, Dis = _sym_sqrt(out_weight.double().cpu())
        up, down = whitened_low_rank(Ds @ W.double().cpu(), C, rank, sqrt_cache)
        return (Dis @ up.double()).float(), down
    W = W.double().cpu()
    if C is None:
        U, S, Vh = torch.linalg.svd(W, full_matrices=False)
        down = Vh
    else:
        if sqrt_cache is not None and "sqrt" in sqrt_cache:
            Cs, Cis = sqrt_cache["sqrt"]
        else:
            Cs, Cis = _sym_sqrt(C.double().cpu())
            if sqrt_cache is not None:
                sqrt_cache["sqrt"] = (Cs, Cis)
        # candidates of one layer differ only in rank: one SVD per map serves them all (kept beside the
        # moment's square root, checked against the map itself so another map never gets a stale one)
        svds = sqrt_cache.setdefault("svd", []) if sqrt_cache is not None else []
        hit = next((f for Wc, *f in svds if Wc.shape == W.shape and torch.equal(Wc, W)), None)
        if hit is None:
            U, S, Vh = torch.linalg.svd(W @ Cs, full_matrices=False)
            hit = (U, S, Vh @ Cis)
            if sqrt_cache is not None:
                svds.append((W.clone(), *hit))
        U, S, down = hit
    r = min(rank, S.numel())
    s = S[:r].sqrt()
    up, down = U[:, :r] * s, s[:, None] * down[:r]
    if r < rank:  # pad (more rank than the map has): zero directions change nothing
        up = torch.cat([up, up.new_zeros(up.shape[0], rank - r)], 1)
        down = torch.cat([down, down.new_zeros(rank - r, down.shape[1])], 0)
    return up.float(), down.float()


@torch.no_grad()
def block_whitened_low_rank(W: torch.Tensor, C: torch.Tensor | None, rank: int, groups: int, cache: dict | None = None,
                            out_weight: torch.Tensor | None = None, layer_idx: int = 0):
    """(up (out, rank), down (groups, rank / groups, in / groups)) for W (out, in) with a block-diagonal down
    factor: each of `groups` consecutive blocks of the input (a kv group's head outputs) gets its own rank / groups
    directions, from the whitened SVD of its columns under its diagonal block of C (`whitened_low_rank`); then the
    shared up factor is refitted by least squares under the whole C, up = W C D^T (D C D^T)^+, which accounts for
    the blocks' cross terms (the least-squares up factor does not depend on an output-side weight). At equal
    parameters this keeps the output projection better than one rank-r factorisation on SmolLM2, on text the
    moments never saw too (`studies/basis_sharing.py`)."""
    n_out, n_in = W.shape
    if groups < 2 or n_in % groups or rank % groups or not 1 <= rank // groups <= min(n_out, n_in // groups):
        raise ValueError(f"layer {layer_idx}: a block-diagonal output factor needs groups >= 2 dividing the "
                         f"{n_in} head outputs and the rank {rank}, with rank / groups in [1, "
                         f"{min(n_out, n_in // max(groups, 1))}]; got groups={groups}")
    sc = cache if cache is not None else {}
    w, r = n_in // groups, rank // groups
    W = W.double().cpu()
    Cd = None if C is None else C.double().cpu()
    downs = []
    for j in range(groups):
        b = slice(j * w, (j + 1) * w)
        _, d = whitened_low_rank(W[:, b], None if Cd is None else Cd[b, b], r,
                                 sc.setdefault(("o_whiten_block", groups, j, Cd is None), {}), out_weight=out_weight)
        downs.append(d.double())
    D = torch.block_diag(*downs)  # (rank, in)
    Cm = torch.eye(n_in, dtype=torch.float64) if Cd is None else Cd
    up = W @ Cm @ D.T @ torch.linalg.pinv(D @ Cm @ D.T)
    return up.float(), torch.stack(downs).float()
