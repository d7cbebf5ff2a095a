"""Benchmark: which structure of factors keeps the query and output projections best at the same parameter count,
on the fitting text and on text nothing was fitted on?

Under the parameter budget 0.5 SmolLM2's query and output projections (576 x 576) are cut to about rank 96 in every
layer, each one pair of factors over the whole matrix (today's `measured-lowrank`). Three other structures at equal
parameters, each fitted by whitened least squares on the fitting windows' moments:
- shared across layers (as in "Basis Sharing: Cross-Layer Parameter Sharing for Large Language Model Compression",
  Wang et al. 2024): one factor shared by a group of n consecutive layers (the query's input-side basis, each
  layer's coefficients refitted under its own moment; the output's residual-side basis), so 576 r' (1 + n) instead
  of 2 n 576 r parameters: r' = 2 n r / (n + 1);
- per kv group: each group of query heads that share a key (its rows of the query projection, its columns of the
  output projection, 192 wide) factorised alone at rank r / 2;
- per head: each head's 64 rows (columns) alone at rank r / 5;
- for the output projection also per kv group with the shared up factor refitted by least squares under the whole
  moment (the blocks' cross terms), the down factors kept.
For each, the mean over the 30 layers of the whitened relative error tr(dW M dW^T) / tr(W M W^T) under the moments
M of the fitting windows (half Wikipedia, half the Canterbury books: in-sample) and of two held-out texts (`alice`,
`pydoc`: 12 windows of 256 each). The pipeline's default moments also pool the end-to-end windows; this is a
one-matrix-at-a-time measurement, not a compressed model.

    python studies/basis_sharing.py [--windows 48] [--rank 96]
"""

from __future__ import annotations

import argparse

import torch

from headalloc.assets import load_model, token_windows
from headalloc.compression.calibration import collect
from headalloc.compression.families import adapter_for
from headalloc.compression.reduce import Geometry


def sqrtm(m: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    e, v = torch.linalg.eigh(m)
    e = e.clamp_min(e.max() * 1e-10)
    return (v * e.sqrt()) @ v.T, (v / e.sqrt()) @ v.T


def rel_err(w: torch.Tensor, wh: torch.Tensor, m: torch.Tensor) -> float:
    d = w - wh
    return float(torch.trace(d @ m @ d.T) / torch.trace(w @ m @ w.T))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--windows", type=int, default=48, help="fitting windows of 256 (half wiki, half canterbury)")
    ap.add_argument("--rank", type=int, default=96, help="the separate factorisation's rank per layer")
    ap.add_argument("--groups", default="1,2,3,5,10,30", help="group sizes (consecutive layers sharing a basis)")
    args = ap.parse_args()
    torch.manual_seed(0)
    m, tok = load_model("smollm2")
    ad = adapter_for(m)
    n_layers = len(ad.layers(m))
    fitw = torch.cat([token_windows(tok, "wiki", "train", 256, args.windows // 2, seed=0),
                      token_windows(tok, "canterbury", "train", 256, args.windows - args.windows // 2, seed=0)])
    fit = collect(m, fitw, keep=False, outputs=True)
    held = {k: collect(m, token_windows(tok, k, "all", 256, 12, seed=3), keep=False, outputs=True)
            for k in ("alice", "pydoc")}
    gains = [ad.layers(m)[l].input_layernorm.weight.detach().double() for l in range(n_layers)]
    w_q = [ad.weights(m, l).q.double() * gains[l][None] for l in range(n_layers)]  # on the un-gained normed input
    w_o = [ad.weights(m, l).o.double() for l in range(n_layers)]

    def m_q(cal, l):
        g = gains[l]
        return cal.cov[l] / g[:, None] / g[None]

    def m_o(cal, l):
        return cal.out_moment[l]

    def q_group(ls, r):
        ms = [m_q(fit, l) for l in ls]
        if len(ls) == 1:
            s, si = sqrtm(ms[0])
            u, sv, vt = torch.linalg.svd(w_q[ls[0]] @ s, full_matrices=False)
            return {ls[0]: (u[:, :r] * sv[:r]) @ vt[:r] @ si}
        s, si = sqrtm(sum(ms) / len(ms))
        _, _, vt = torch.linalg.svd(torch.cat([w_q[l] @ s for l in ls], 0), full_matrices=False)
        b = vt[:r] @ si  # r x 576, shared
        # each layer's coefficients by least squares under its own moment
        return {l: (w_q[l] @ mm @ b.T @ torch.linalg.pinv(b @ mm @ b.T)) @ b for l, mm in zip(ls, ms)}

    def o_group(ls, r):
        ss = [sqrtm(m_o(fit, l))[0] for l in ls]
        u, _, _ = torch.linalg.svd(torch.cat([w_o[l] @ s for l, s in zip(ls, ss)], 1), full_matrices=False)
        ur = u[:, :r]  # 576 x r, shared
        return {l: ur @ (ur.T @ w_o[l]) for l in ls}

    def whitened_svd(w, mm, r):
        sq, si = sqrtm(mm)
        u, sv, vt = torch.linalg.svd(w @ sq, full_matrices=False)
        return (u[:, :r] * sv[:r]) @ vt[:r] @ si

    geo = Geometry.of(m)
    n_heads, hd, n_kv = geo.n_kv * geo.n_rep, geo.head_dim, geo.n_kv

    def blocks(width):  # index blocks of `width` consecutive heads' dims (heads of a kv group are consecutive)
        return [list(range(i, i + width)) for i in range(0, n_heads * hd, width)]

    def q_blocks(ls, r, width):
        out = {}
        for l in ls:
            mm, wh = m_q(fit, l), torch.zeros_like(w_q[l])
            for b in blocks(width):
                wh[b] = whitened_svd(w_q[l][b], mm, r)
            out[l] = wh
        return out

    def o_blocks(ls, r, width, refit=False):
        out = {}
        for l in ls:
            mm, wh = m_o(fit, l), torch.zeros_like(w_o[l])
            downs = []
            for b in blocks(width):
                sq, si = sqrtm(mm[b][:, b])
                u, sv, vt = torch.linalg.svd(w_o[l][:, b] @ sq, full_matrices=False)
                wh[:, b] = (u[:, :r] * sv[:r]) @ vt[:r] @ si
                d = torch.zeros(r, w_o[l].shape[1], dtype=mm.dtype)
                d[:, b] = vt[:r] @ si
                downs.append(d)
            if refit:  # the up factor by least squares under the whole moment (cross terms between blocks)
                d = torch.cat(downs)
                wh = (w_o[l] @ mm @ d.T @ torch.linalg.pinv(d @ mm @ d.T)) @ d
            out[l] = wh
        return out

    def measure(name, fn, ws, mf, group, rank):
        rows = {"fit": [], "alice": [], "pydoc": []}
        for start in range(0, n_layers, group):
            ls = list(range(start, min(n_layers, start + group)))
            wh = fn(ls, rank(len(ls)))
            for l in ls:
                rows["fit"].append(rel_err(ws[l], wh[l], mf(fit, l)))
                for k in ("alice", "pydoc"):
                    rows[k].append(rel_err(ws[l], wh[l], mf(held[k], l)))
        mean = {k: sum(v) / n_layers for k, v in rows.items()}
        print(f"{name:<44} fitting {mean['fit']:.4f}  alice {mean['alice']:.4f}  pydoc {mean['pydoc']:.4f}",
              flush=True)

    r = args.rank
    gw = (n_heads // n_kv) * hd
    print(f"moments: {len(fitw)} fitting windows of 256 (half wiki, half canterbury); held-out alice / pydoc 12 "
          f"windows of 256 each; mean whitened relative error over {n_layers} layers, equal parameters to rank {r}")
    for proj, fn, blk, ws, mf in (("query", q_group, q_blocks, w_q, m_q), ("output", o_group, o_blocks, w_o, m_o)):
        for n in (int(x) for x in args.groups.split(",")):
            what = "whole matrix (today)" if n == 1 else f"shared by {n} layers"
            measure(f"{proj} {what}, rank {round(2 * n * r / (n + 1))}", fn, ws, mf, n,
                    lambda k: round(2 * k * r / (k + 1)))
        h = w_q[0].shape[1]
        r_g = round(r * 2 * h / (n_kv * (h + gw)))  # equal parameters: n_kv r_g (h + gw) = r (2 h)
        r_h = round(r * 2 * h / (n_heads * (h + hd)))
        measure(f"{proj} per kv group ({gw} wide), rank {r_g}", lambda ls, _r: blk(ls, r_g, gw), ws, mf, 1, int)
        measure(f"{proj} per head ({hd} wide), rank {r_h}", lambda ls, _r: blk(ls, r_h, hd), ws, mf, 1, int)
        if proj == "output":
            measure(f"{proj} per kv group, rank {r_g}, up factor refitted", lambda ls, _r: blk(ls, r_g, gw, True),
                    ws, mf, 1, int)

if __name__ == "__main__":
    from headalloc.reports.ledger import recorded

    with recorded("study", "basis_sharing"):
        main()
