"""Benchmark: does a data-aware factorisation of one layer hold on text it was not whitened on?

For a few layers of SmolLM2, the query projection at rank 96 and the output projection at rank 96 (each 0.75
of the layer's attention parameters; `reduce.factor_projections`), whitened by second moments measured on
Wikipedia training windows, then the layer's relative output error measured on those calibration windows and on
two kinds of text nothing was fitted on (`alice`, `pydoc`). Varied side by side in one run:
- the shrinkage of both moments toward isotropic (`--whiten-shrink`: 0 as measured, 1 = plain SVD) or, written
  `dA`, by A toward their own diagonal (each channel keeps its scale; `shrink_moment(..., target="diagonal")`), and
- how many windows the moments come from (`--moment-windows`: the calibration windows only, or more).
The calibration column is the error on the first `--windows` windows (in-sample for the smallest count).

    python studies/whitening_transfer.py [--layers 2,10,18,26] [--windows 8] [--more 64]
"""

from __future__ import annotations

import argparse

import torch

from headalloc.assets import load_model, token_windows
from headalloc.compression.calibration import collect, shrink_moment
from headalloc.compression.families import adapter_for
from headalloc.compression.calibration import shrink_second_moment
from headalloc.compression.reduce import Geometry, attention_module, output_moments, reduce_layer
from headalloc.compression.spec import LayerPlan
from headalloc.compression.planning.estimates import teacher_outputs


def rel_error(mod, data, ref) -> float:
    norm = sum(float(y.double().square().sum()) for y in ref)
    with torch.no_grad():
        return sum(float((mod(hidden_states=X, position_embeddings=pe, attention_mask=None)[0] - y)
                         .double().square().sum()) for X, pe, y in zip(data.inputs, data.positions, ref)) / norm


class _Layer:  # one layer's stored inputs, in the shape rel_error reads
    def __init__(self, cal, l):
        self.inputs, self.positions = cal.inputs[l], cal.positions


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--layers", default="2,10,18,26")
    ap.add_argument("--windows", type=int, default=8, help="calibration windows of 256 tokens (wiki train split)")
    ap.add_argument("--more", type=int, default=64, help="windows of the larger moment estimate")
    ap.add_argument("--heldout-windows", type=int, default=4, help="windows of 256 of each held-out text")
    ap.add_argument("--shrinks", default="0,0.05,0.2,0.5,0.999999,d0.2,d0.5,d1",
                    help="shrinkages: A toward isotropic, dA toward the moment's own diagonal")
    ap.add_argument("--seed", type=int, default=0)
    a = ap.parse_args()
    torch.manual_seed(a.seed)
    m, tok = load_model("smollm2")
    g, ad = Geometry.of(m), adapter_for(m)
    hd = g.head_dim
    wins = token_windows(tok, "wiki", "train", 256, max(a.windows, a.more), seed=a.seed)
    cal = collect(m, wins[:a.windows], keep=True)
    big = collect(m, wins, keep=False, outputs=True)
    texts = {"calib": cal, **{k: collect(m, token_windows(tok, k, "all", 256, a.heldout_windows, seed=a.seed + 3),
                                         keep=True) for k in ("alice", "pydoc")}}
    outm = output_moments(m, cal)
    shrinks = [(float(s[1:]), "diagonal") if s.startswith("d") else (float(s), "isotropic")
               for s in a.shrinks.split(",")]
    print(f"SmolLM2-135M; moments from {a.windows} (or {a.more}) Wikipedia training windows of 256, seed {a.seed}; "
          f"relative output error of the layer on: calibration windows / alice / pydoc ({a.heldout_windows} windows "
          f"of 256 each)")
    cols = [f"shrink {s:g}" + (" diag" if t == "diagonal" else "") for s, t in shrinks] + [f"{a.more} windows"]
    print(f"{'layer':>5} {'proj':>6}  " + "  ".join(f"{c:>20}" for c in cols))
    for l in (int(x) for x in a.layers.split(",")):
        w = ad.weights(m, l)
        refs = {k: teacher_outputs(m, l, d) for k, d in texts.items()}
        for lab, lp in (("q r96", LayerPlan(hd, hd, rank_q=96)), ("o r96", LayerPlan(hd, hd, rank_o=96))):
            cells = []
            moments = [(shrink_second_moment(cal.second_moment[l], s, t) if s else cal.second_moment[l],
                        shrink_moment(outm[l], s, t) if s else outm[l]) for s, t in shrinks]
            moments.append((big.second_moment[l], big.out_moment[l]))
            for M, om in moments:
                spec, red = reduce_layer(w, M, lp, g, l, out_moment=om)
                mod = attention_module(m.config, spec, red, l)
                cells.append("/".join(f"{rel_error(mod, _Layer(d, l), refs[k]):.3f}" for k, d in texts.items()))
            print(f"{l:>5} {lab:>6}  " + "  ".join(f"{c:>20}" for c in cells), flush=True)


if __name__ == "__main__":
    from headalloc.reports.ledger import recorded

    with recorded("study", "whitening_transfer"):
        main()
