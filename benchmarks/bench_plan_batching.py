"""Benchmark: the planners' measurements with several calibration windows to a pass against one window at a time.

Most of a factorised plan's time after the original's passes is spent measuring candidates: each candidate's layer
error (`strategies.layer_error`) runs the candidate attention on the calibration windows, and the knapsack's
candidate plans are scored by the whole model's loss on them (`latent._window_nll`). Both now take several windows
to a pass (`strategies.window_batches`, up to `ROWS_PER_PASS` tokens; 4 windows to a forward). This runs both ways on
SmolLM2 at the default calibration (16 windows of 256), interleaved (one way, the other, again) so the machine's
drift falls on both, and prints the times, their ratio and how far the two ways' numbers are apart.

    python benchmarks/bench_plan_batching.py [--layers 0,10,20] [--repeats 2] [--windows 16]
"""

from __future__ import annotations

import argparse
import time

import numpy as np
import torch

import headalloc.compression.strategies as st
from headalloc.assets import load_model, token_windows
from headalloc.compression.calibration import collect
from headalloc.compression.families import adapter_for
from headalloc.compression.latent import _window_nll, rank_grid
from headalloc.compression.reduce import Geometry, reduce_layer
from headalloc.compression.spec import LayerPlan


def measure_ranks(model, cal, layers, rows: int) -> tuple[float, list[float]]:
    """Seconds and errors of every query-rank candidate of measured-lowrank in `layers`, `rows` tokens to a pass."""
    st.ROWS_PER_PASS = rows
    g, ad = Geometry.of(model), adapter_for(model)
    out, t = [], time.perf_counter()
    for l in layers:
        cal.cache.pop("teacher_out", None)
        cache: dict = {}
        for r in rank_grid(g.hidden, g.n_kv * g.n_rep * g.head_dim, 8):
            spec, w = reduce_layer(ad.weights(model, l), cal.second_moment[l], LayerPlan(g.head_dim, g.head_dim,
                                                                                         rank_q=r), g, l, cache)
            out.append(st.layer_error(model, l, cal, spec, w))
    return time.perf_counter() - t, out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--layers", default="0,10,20")
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--windows", type=int, default=16)
    args = ap.parse_args()
    layers = [int(x) for x in args.layers.split(",")]
    model, tok = load_model("smollm2")
    w = token_windows(tok, "wiki", "train", 256, args.windows, seed=0)
    cal = collect(model, w)
    cal.grads = st.attention_output_grads(model, cal)
    default = st.ROWS_PER_PASS
    times = {"one window a pass": [], "several windows a pass": []}
    nll_times = {"one window a forward": [], "4 windows a forward": []}
    errs, nlls = {}, {}
    for _ in range(args.repeats):
        for name, rows in (("one window a pass", w.shape[1]), ("several windows a pass", default)):
            s, errs[name] = measure_ranks(model, cal, layers, rows)
            times[name].append(s)
        for name, b in (("one window a forward", 1), ("4 windows a forward", 4)):
            t = time.perf_counter()
            with torch.no_grad():
                nlls[name] = _window_nll(model, w, batch=b).numpy()
            nll_times[name].append(time.perf_counter() - t)
    st.ROWS_PER_PASS = default
    print(f"SmolLM2, {args.windows} calibration windows of 256, {torch.get_num_threads()} threads, layers {layers}, "
          f"best of {args.repeats} interleaved runs")
    for table, (a, b) in ((times, tuple(times)), (nll_times, tuple(nll_times))):
        ta, tb = min(table[a]), min(table[b])
        print(f"  {a}: {ta:.2f} s   {b}: {tb:.2f} s   ratio {ta / tb:.2f}x")
    ea, eb = np.array(errs["one window a pass"]), np.array(errs["several windows a pass"])
    na, nb = nlls["one window a forward"], nlls["4 windows a forward"]
    print(f"  layer errors: largest relative difference {np.max(np.abs(ea - eb) / np.abs(ea)):.1e} over {len(ea)} "
          f"candidates; window losses: largest absolute difference {np.max(np.abs(na - nb)):.1e} nats")


if __name__ == "__main__":
    main()
