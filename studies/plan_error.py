"""Benchmark: which estimate of a factorisation's error predicts its error on text of a kind never fitted on?

For a few layers of SmolLM2 and a few candidate factorisations (query or output projection at a rank, latent keys
or values), the layer's relative output error |dy|^2 / |y|^2:
- pooled: fitted to the whole fitting text's moments, measured on its calibration windows (what the knapsack read
  before `--plan-error leave-part-out`);
- leave-part-out: for each part of the fitting text, fitted without that part, measured on its windows;
- on each held-out text (`alice`, `pydoc`; never fitted on), fitted to the whole fitting text's moments: the truth
  the estimates try to predict.
A good estimate is close to the held-out errors and, above all, ranks the candidates as they do: the knapsack
compares candidates, so the ratio held-out / estimate should be the same for every candidate.

    python studies/plan_error.py [--layers 2,10,18,26] [--moment-windows 150] [any compress flag]
"""

from __future__ import annotations

import argparse

import numpy as np
import torch

from headalloc.assets import load_model, token_windows
from headalloc.compression.calibration import collect
from headalloc.compression.families import adapter_for
from headalloc.compression.pipeline import prepare
from headalloc.compression.reduce import Geometry, attention_module, factor_inputs, reduce_layer
from headalloc.compression.settings import add_config_args, config_from_args, preset
from headalloc.compression.spec import LayerPlan
from headalloc.reports.ledger import append


@torch.no_grad()
def rel_error(model, l: int, spec, weights, cal, idx=None) -> float:
    """sum |dy|^2 / sum |y|^2 of layer l's attention over the windows `idx` of `cal` (all by default)."""
    attn = adapter_for(model).attention(model, l)
    mod = attention_module(model.config, spec, weights, l)
    num = den = 0.0
    for i in (range(len(cal.inputs[l])) if idx is None else idx):
        X, pe = cal.inputs[l][i], cal.positions[i]
        y = attn(hidden_states=X, position_embeddings=pe, attention_mask=None)[0]
        num += float((mod(hidden_states=X, position_embeddings=pe, attention_mask=None)[0] - y).double().square().sum())
        den += float(y.double().square().sum())
    return num / den


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--layers", default="2,10,18,26")
    ap.add_argument("--heldout-windows-256", type=int, default=6, help="windows of 256 tokens of each held-out text")
    add_config_args(ap)
    a = ap.parse_args()
    cfg = config_from_args(a, base=preset("default", moment_windows=150)).validate()
    cfg = cfg.replace(plan_error="leave-part-out").validate()
    m, tok = load_model(cfg.model, dtype=cfg.runtime.dtype)
    g, ad = Geometry.of(m), adapter_for(m)
    hd, full_kv = g.head_dim, g.n_kv * g.head_dim
    cal = prepare(m, tok, cfg).calibration
    folds = cal.folds()
    factors = {None: factor_inputs(m, cal, cfg.calib.factor_output),
               **{c.fold: factor_inputs(m, c, cfg.calib.factor_output) for c, _ in folds}}
    held = {k: collect(m, token_windows(tok, k, "all", 256, a.heldout_windows_256, seed=cfg.runtime.seed + 3), keep=True)
            for k in cfg.heldout_kinds}
    cands = {"q r96": LayerPlan(hd, hd, rank_q=96), "q r48": LayerPlan(hd, hd, rank_q=48),
             "o r96": LayerPlan(hd, hd, rank_o=96), "o r192": LayerPlan(hd, hd, rank_o=192),
             "k r64": LayerPlan(hd, hd, kind="palu", rank_k=64, rank_v=full_kv),
             "v r64": LayerPlan(hd, hd, kind="palu", rank_k=full_kv, rank_v=64)}
    parts = sorted(set(cal.parts))
    print(f"SmolLM2; fitting text {cfg.fit.text} ({cfg.calib.moment_windows} moment windows + {cfg.calib.windows} calibration "
          f"windows of {cfg.calib.length}; parts of the calibration windows: "
          f"{', '.join(f'{p} {cal.parts.count(p)}' for p in parts)}); held-out: {', '.join(held)} "
          f"({a.heldout_windows_256} windows of 256 each); seed {cfg.runtime.seed}. Relative output error of the layer:")
    kinds = list(held)
    print(f"{'layer':>5} {'candidate':>9} {'pooled':>8} {'leave-out':>9} " + " ".join(f"{k:>8}" for k in kinds)
          + "   held-out mean / pooled, / leave-part-out")
    ratios = {"pooled": [], "leave-part-out": []}
    for l in (int(x) for x in a.layers.split(",")):
        w = ad.weights(m, l)
        for name, lp in cands.items():
            kw = lambda c: factors[c.fold].for_layer(l) if lp.rank_o else {}  # noqa: E731
            pooled_fit = reduce_layer(w, cal.second_moment[l], lp, g, l, **kw(cal))
            pooled = rel_error(m, l, *pooled_fit, cal)
            n, lpo = 0, 0.0
            for c, idx in folds:
                lpo += len(idx) * rel_error(m, l, *reduce_layer(w, c.second_moment[l], lp, g, l, **kw(c)), cal, idx)
                n += len(idx)
            lpo /= n
            truth = [rel_error(m, l, *pooled_fit, held[k]) for k in kinds]
            t = float(np.mean(truth))
            ratios["pooled"].append(t / pooled)
            ratios["leave-part-out"].append(t / lpo)
            print(f"{l:>5} {name:>9} {pooled:8.4f} {lpo:9.4f} " + " ".join(f"{x:8.4f}" for x in truth)
                  + f"   {t / pooled:6.2f}x {t / lpo:6.2f}x", flush=True)
    summary = {}
    for k, r in ratios.items():
        r = np.log(np.array(r))
        summary[k] = {"geometric_mean": float(np.exp(r.mean())), "sd_log": float(r.std())}
        print(f"held-out / {k}: geometric mean {np.exp(r.mean()):.2f}x, spread over candidates (sd of log) {r.std():.2f}")
    append("study", "plan_error", settings=cfg.to_dict(), metrics={"held_out_over_estimate": summary})


if __name__ == "__main__":
    main()
