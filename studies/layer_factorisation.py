"""Benchmark: one layer's attention at equal parameter cost, narrowed heads against factorised projections.

For a few layers of SmolLM2, each candidate's estimated loss increase (`strategies.layer_error`: the
Fisher-weighted output error on the calibration text, what the `measured` planners minimise) and its plain
relative output error, side by side, with each candidate's attention-parameter fraction printed next to it so
the equal-cost pairs can be checked:
- query-key width 32 (q and k narrowed, 0.75 of the layer) vs query rank 96 (k dense; the same cost);
- value width 32 (v and o narrowed) vs output rank 96 (v dense; the same cost);
- the whole layer at half its parameters: widths 32/32 (uniform) vs q and o rank 96 with k, v dense.
Factorisations are the whitened truncated SVDs of `reduce.factor_projections` (queries by the layer input's
second moment, the output projection by the head outputs').

    python studies/layer_factorisation.py [--layers 2,10,18,26] [--windows 8]
"""

from __future__ import annotations

import argparse

import torch

from headalloc.assets import load_model, token_windows
from headalloc.compression.calibration import collect
from headalloc.compression.families import adapter_for
from headalloc.compression.reduce import Geometry, attention_module, output_moments, reduce_layer
from headalloc.compression.spec import LayerPlan
from headalloc.compression.planning.estimates import attention_output_grads, layer_error, teacher_outputs


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--layers", default="2,10,18,26")
    ap.add_argument("--windows", type=int, default=8, help="calibration windows of 256 tokens (wiki train split)")
    ap.add_argument("--seed", type=int, default=0)
    a = ap.parse_args()
    m, tok = load_model("smollm2")
    g, ad = Geometry.of(m), adapter_for(m)
    hd = g.head_dim
    cal = collect(m, token_windows(tok, "wiki", "train", 256, a.windows, seed=a.seed), keep=True)
    cal.grads = attention_output_grads(m, cal)
    outm = output_moments(m, cal)
    full = g.spec(g.full()).params(g.hidden)
    cands = [("qk width 32", LayerPlan(32, hd)), ("q rank 96", LayerPlan(hd, hd, rank_q=96)),
             ("v width 32", LayerPlan(hd, 32)), ("o rank 96", LayerPlan(hd, hd, rank_o=96)),
             ("widths 32/32", LayerPlan(32, 32)), ("q, o rank 96", LayerPlan(hd, hd, rank_q=96, rank_o=96))]
    print(f"SmolLM2-135M, {a.windows} calibration windows of 256 (wiki train split, seed {a.seed}); per candidate: "
          f"attention parameters of the layer / original, Fisher-weighted loss-increase estimate, relative output error")
    print(f"{'layer':>5}  " + "  ".join(f"{n:>24}" for n, _ in cands))
    for l in (int(x) for x in a.layers.split(",")):
        w, M = ad.weights(m, l), cal.second_moment[l]
        ref = teacher_outputs(m, l, cal)
        norm = sum(float(y.double().square().sum()) for y in ref)
        cells = []
        for _, lp in cands:
            spec, red = reduce_layer(w, M, lp, g, l, out_moment=outm[l])
            est = layer_error(m, l, cal, spec, red)
            mod = attention_module(m.config, spec, red, l)
            with torch.no_grad():
                rel = sum(float((mod(hidden_states=X, position_embeddings=pe, attention_mask=None)[0] - y)
                                .double().square().sum()) for X, pe, y in zip(cal.inputs[l], cal.positions, ref)) / norm
            cells.append(f"{spec.params(g.hidden) / full:.3f} {est:8.3g} {rel:6.3f}")
        print(f"{l:>5}  " + "  ".join(f"{c:>24}" for c in cells), flush=True)


if __name__ == "__main__":
    from headalloc.reports.ledger import recorded

    with recorded("study", "layer_factorisation"):
        main()
