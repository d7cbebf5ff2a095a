"""Synthetic evidence for both papers, trained through the resumable sweep store.

- fourgram_tradeoff (2510.03784): D = 256, d = 8, four groups of H heads of dimension 64/H, heads
  selecting lags by a per-head relative-position bias (and, as the contrast, by sinusoidal positions).
- dretrieval (2510.06662): h heads of dimension 8 against sequence length T, D = 4 and D = 3, and a
  two-layer variant (transition expected at L*h = D).
Settings the papers do not give are chosen here and stored with every run's config.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from headalloc.experiments.registry import Experiment, RunContext, register
from headalloc.theory import tradeoff_curve

RUN_FN = "headalloc.training.runs:run_synthetic"

# ------------------------------------------------------------------ 4-gram trade-off
PAPER_FOURGRAM_VAL = {1: 0.3197, 2: 0.3174, 4: 0.1129, 8: 0.0167, 16: 0.0234, 32: 0.0559}
PAPER_FOURGRAM_TRAIN = {1: 0.8234, 2: 0.5583, 4: 0.3282, 8: 0.2459, 16: 0.2459, 32: 0.2665}
FOURGRAM_SETTINGS = {
    "quick": dict(T=16, n_train=4000, n_val=1000, steps=600, batch_size=64, lr=3e-3, seeds=[0]),
    # T = 16 leaves 12 scored positions per window for lags 1..4; whether 3000 steps converge is read off the
    # curves (last-interval change per H); 36 runs, about 80 core-minutes on this machine
    # the sinusoidal contrast converges within a few hundred steps (curves figure): 1000 steps there
    "full": dict(T=16, n_train=8000, n_val=2000, steps=3000, batch_size=64, lr=3e-3, seeds=[0, 1, 2],
                 contrast_steps=1000),
}
# How a head finds its lag. "relbias" is the setting of the paper's selection term (1.3 e^{0.02 m} / H_m
# depends on the head count only): every head adds a learnable relative-position score -p_h |i - j|
# (ALiBi-like) to its logits and there are no absolute positions, so one head's attention over lags is
# a decaying profile and H heads of a group combine (through W_O) into a sharper pick of lag m.
# "sinusoidal" (the earlier setup, kept as the contrast): absolute sinusoidal positions added to the
# input and dot-product attention, with which one wide head can address a lag exactly.
FOURGRAM_MECHANISMS = {
    "relbias": {"positions": "none", "rel_bias": "linear", "dot": True},
    "sinusoidal": {"positions": "sinusoidal", "rel_bias": None, "dot": True},
}
FOURGRAM_LAGS = [1, 2, 3, 4]  # m = 1..4 as the bound counts them; y_t has no x_t term


def fourgram_configs(scale: str, mechanism: str = "relbias") -> list[dict]:
    s = FOURGRAM_SETTINGS[scale]
    mech = FOURGRAM_MECHANISMS[mechanism]
    steps = s["steps"] if mechanism == "relbias" else s.get("contrast_steps", s["steps"])
    out = []
    for H in PAPER_FOURGRAM_VAL:
        for seed in s["seeds"]:
            out.append({
                "label": f"4gram {mechanism} H={H} seed={seed}",
                "task": {"name": "convolution", "d": 8, "lags": FOURGRAM_LAGS, "T": s["T"], "n_train": s["n_train"],
                         "n_val": s["n_val"], "seed": 1234},  # one fixed task (fixed rho_i) for every run
                "model": {"d_model": 256, "layers": [[[H, 64 // H, 64 // H]] * 4], **mech,
                          "residual": True, "layernorm": False, "ffn_hidden": 0},
                "train": {"steps": steps, "batch_size": s["batch_size"], "lr": s["lr"], "warmup": 50,
                          "eval_every": max(50, steps // 10), "seed": seed},
                "threads": 1,
            })
    return out


def _fourgram_series(configs, results) -> dict:
    by_h: dict[int, dict[str, list]] = {}
    for c, r in zip(configs, results):
        H = c["model"]["layers"][0][0][0]
        d = by_h.setdefault(H, {"val": [], "train": [], "curves": []})
        d["val"].append(r["val"]["mse"])
        d["train"].append(r["train"]["mse"])
        d["curves"].append([(h["step"], h["val_mse"]) for h in r["history"]])
    hs = sorted(by_h)
    val_mean = [float(np.mean(by_h[h]["val"])) for h in hs]
    # converged: the last tenth of training moved the validation MSE by less than 5% (every seed)
    drift = [max(abs(cv[-1][1] - cv[-2][1]) / max(cv[-1][1], 1e-12) for cv in by_h[h]["curves"] if len(cv) >= 2)
             for h in hs]
    return {"heads_per_group": hs, "val_mse_mean": val_mean,
            "val_mse_std": [float(np.std(by_h[h]["val"])) for h in hs],
            "val_mse_all": [by_h[h]["val"] for h in hs],
            "train_mse_mean": [float(np.mean(by_h[h]["train"])) for h in hs],
            "curves": {str(h): by_h[h]["curves"] for h in hs},
            "last_interval_change": drift,
            "argmin_empirical": hs[int(np.argmin(val_mean))]}


def compute_fourgram(ctx: RunContext) -> dict:
    from headalloc.training.sweep import run_sweep

    series = {}
    for mech in FOURGRAM_MECHANISMS:
        configs = fourgram_configs(ctx.scale, mech)
        results = run_sweep(configs, ctx.out_dir / "runs.sqlite", RUN_FN, executor=ctx.executor,
                            ray_address=ctx.ray_address, workers=2, desc=f"4-gram sweep ({mech})")
        series[mech] = _fourgram_series(configs, results)
    hs = series["relbias"]["heads_per_group"]
    bound = [b.total for b in tradeoff_curve(256, 8, hs, [1.0] * 4)]
    main = series["relbias"]
    return {
        "config": {"settings": FOURGRAM_SETTINGS[ctx.scale], "mechanisms": FOURGRAM_MECHANISMS,
                   "example_run": fourgram_configs(ctx.scale)[0],
                   "choices": "target y_t = sum_{m=1..4} rho_m x_{t-m} (rho_m random 8x8, unit spectral norm, "
                              "x ~ N(0, I_8)); x_t itself is not in the target, and the linear readout 256->8 "
                              "also sees it through the residual stream (it must learn to ignore it). Linear "
                              "embedding 8->256, one causal layer of 4 groups of H heads of width 64/H with a "
                              "residual, MSE on positions t >= 4, AdamW, warm-up 50 then cosine. Main series: "
                              "per-head learnable linear relative-position bias (slopes initialised spread over "
                              "[-0.5, 2]), no absolute positions; contrast: sinusoidal absolute positions",
                   "differences_from_paper": "the paper gives neither T, steps, optimiser, readout nor the "
                                             "positional mechanism; these are ours. Its MSE scale (normalisation "
                                             "of y) is unknown, so absolute values are not comparable; the "
                                             "argmin is."},
        **main,  # the main series at the top level (report, figures)
        "series": series,
        "bound": bound,
        "argmin_bound": hs[int(np.argmin(bound))],
    }


def plot_fourgram(rec: dict, out: Path) -> list[Path]:
    from headalloc.reports.figures import plot_fourgram_curves, plot_fourgram_tradeoff

    return [plot_fourgram_tradeoff(rec, PAPER_FOURGRAM_VAL, out / "fourgram_tradeoff.png"),
            plot_fourgram_curves(rec, out / "fourgram_curves.png", PAPER_FOURGRAM_VAL)]


def table_fourgram(rec: dict) -> list[dict]:
    from headalloc.reports import mean_spread

    n = len(rec["config"]["settings"]["seeds"])
    series = rec.get("series") or {"sinusoidal": rec}
    rows = []
    for mech, ser in series.items():
        for h, m, sd, dr in zip(ser["heads_per_group"], ser["val_mse_mean"], ser["val_mse_std"],
                                ser.get("last_interval_change", [None] * len(ser["heads_per_group"]))):
            conv = "" if dr is None else f" (last-interval change {dr:.0%})"
            rows.append({"quantity": f"{mech}: val MSE, H={h}", "paper": f"{PAPER_FOURGRAM_VAL[h]:.4f}",
                         "measured": mean_spread(m, sd, n) + conv, "match": None})
        rows.append({"quantity": f"{mech}: empirical argmin H", "paper": "8 (= bound's argmin)",
                     "measured": str(ser["argmin_empirical"]), "match": ser["argmin_empirical"] == rec["argmin_bound"]})
    return rows


# ------------------------------------------------------------------ D-retrieval
PAPER_TABLE2 = {  # validation NMSE, mean over seeds (D=4, N=32, head dim 8)
    1: [7.01e-2, 1.09e-1, 1.10e-1, 1.14e-1, 1.45e-1],
    2: [7.31e-3, 8.41e-3, 9.42e-3, 1.31e-2, 1.47e-2],
    3: [6.94e-4, 6.40e-4, 9.09e-4, 1.31e-3, 1.58e-3],
    4: [6.10e-5, 4.36e-5, 4.80e-5, 8.75e-6, 5.23e-6],
    5: [3.35e-5, 1.10e-5, 4.91e-6, 4.19e-6, 3.99e-6],
}
PAPER_T = [8, 16, 32, 64, 128]
PAPER_TABLE4 = {  # D=3, one layer, total width E = 32 fixed (minimum over seeds, as the paper reports)
    1: [1.38e-2, 1.63e-2, 1.84e-2, 2.17e-2, 2.31e-2],
    2: [1.09e-3, 7.08e-4, 7.24e-4, 7.76e-4, 1.11e-3],
    3: [4.18e-7, 1.72e-7, 1.17e-7, 3.58e-7, 2.11e-7],
    4: [5.56e-7, 1.22e-7, 6.89e-8, 1.85e-7, 3.48e-7],
}
PAPER_TABLE5 = {  # D=4, two layers, E = 32 fixed, no positions, no LayerNorm
    1: [2.12e-4, 1.85e-4, 2.22e-4, 3.13e-4, 4.28e-4],
    2: [7.22e-6, 2.69e-6, 3.50e-6, 3.07e-6, 3.83e-6],
    3: [8.16e-6, 1.83e-6, 1.73e-6, 3.86e-6, 3.50e-6],
    4: [3.68e-6, 1.87e-6, 2.60e-6, 4.32e-6, 5.98e-6],
    5: [6.15e-6, 3.02e-6, 3.31e-6, 3.78e-6, 5.34e-6],
}
PAPER_TABLES = {"main": PAPER_TABLE2, "d3": PAPER_TABLE4, "two_layer": PAPER_TABLE5}
FIXED_E = 32  # Tables 4-5: the total embedding width E = n h is fixed as h varies
DRET_SETTINGS = {
    "quick": dict(main_T=[8, 32], main_h=[2, 3, 4, 5], d3_T=[8, 32], d3_h=[1, 2, 3, 4], two_T=[8, 32],
                  two_h=[1, 2, 3], steps=1500, seeds=[0], probe_steps=[750, 1500, 3000]),
    # sized for 2 CPU cores (about 90 core-minutes): T in {8, 32, 128} for every variant, 2 seeds, except the
    # two-layer T = 128 cells (its full first-layer attention at T = 129 is 7x a one-layer step): 1 seed
    "full": dict(main_T=[8, 32, 128], main_h=[1, 2, 3, 4, 5], d3_T=[8, 32, 128], d3_h=[1, 2, 3, 4, 5],
                 two_T=[8, 32, 128], two_h=[1, 2, 3, 4, 5], steps=2000, seeds=[0, 1], two_one_seed_T=[128],
                 probe_steps=[1000, 2000, 4000, 8000, 16000]),
}


def head_groups(h: int, width: int | None) -> list[list[int]]:
    """h heads as [n_heads, qk_dim, v_dim] groups: each of `width` (Table 2: 8), or splitting a fixed total
    E = FIXED_E as evenly as integers allow (width=None; e.g. h=3: 11, 11, 10)."""
    if width is not None:
        return [[h, width, width]]
    base, extra = divmod(FIXED_E, h)
    groups = [[extra, base + 1, base + 1]] if extra else []
    return groups + [[h - extra, base, base]]


def _dret_config(variant: str, D: int, h: int, T: int, layers: int, steps: int, seed: int,
                 width: int | None = 8) -> dict:
    groups = head_groups(h, width)
    E = sum(g[0] * g[2] for g in groups)
    return {
        "label": f"{variant} D={D} h={h} T={T} seed={seed}",
        "task": {"name": "dretrieval", "D": D, "d": 4, "T": T, "n_train": 8000, "n_val": 2000, "seed": 1234},
        "model": {"d_model": E, "layers": [groups] * layers, "positions": "none", "residual": False,
                  "layernorm": False, "ffn_hidden": 0, "input_mlp_hidden": 32, "readout_hidden": 32,
                  "cls_token": True},
        "train": {"steps": steps, "batch_size": 256, "lr": 3e-3, "warmup": 100, "eval_every": max(100, steps // 6),
                  "seed": seed},
        "threads": 1,
    }


def dretrieval_configs(scale: str) -> list[dict]:
    s = DRET_SETTINGS[scale]
    cfgs = []
    for seed in s["seeds"]:
        cfgs += [_dret_config("main", 4, h, T, 1, s["steps"], seed) for h in s["main_h"] for T in s["main_T"]]
        cfgs += [_dret_config("d3", 3, h, T, 1, s["steps"], seed, width=None) for h in s["d3_h"] for T in s["d3_T"]]
        cfgs += [_dret_config("two_layer", 4, h, T, 2, s["steps"], seed, width=None)
                 for h in s["two_h"] for T in s["two_T"]
                 if seed == s["seeds"][0] or T not in s.get("two_one_seed_T", [])]
    # why our absolute NMSE sits far above the paper's: the same cell (D=4, h=4, T=32) trained longer
    cfgs += [dict(_dret_config("steps", 4, 4, 32, 1, n, 0), label=f"steps D=4 h=4 T=32 steps={n}")
             for n in s.get("probe_steps", [])]
    return cfgs


def _heads_of(model_cfg: dict) -> int:
    return sum(g[0] for g in model_cfg["layers"][0])


def compute_dretrieval(ctx: RunContext) -> dict:
    from headalloc.training.sweep import run_sweep

    configs = dretrieval_configs(ctx.scale)
    results = run_sweep(configs, ctx.out_dir / "runs.sqlite", RUN_FN, executor=ctx.executor,
                        ray_address=ctx.ray_address, workers=2, desc="D-retrieval sweep")
    cells: dict[str, dict] = {}
    probe = []
    for c, r in zip(configs, results):
        variant = c["label"].split()[0]
        if variant == "steps":
            probe.append({"steps": c["train"]["steps"], "nmse": r["val"]["nmse"], "train_nmse": r["train"].get("nmse")})
            continue
        key = f"{variant}|{_heads_of(c['model'])}|{c['task']['T']}"
        cells.setdefault(key, []).append(r["val"]["nmse"])
    grid = {}
    for key, vals in cells.items():
        variant, h, T = key.split("|")
        grid.setdefault(variant, {}).setdefault(h, {})[T] = {"mean": float(np.mean(vals)),
                                                             "min": float(np.min(vals)), "n": len(vals)}
    return {"config": {"settings": DRET_SETTINGS[ctx.scale], "example_run": configs[0],
                       "choices": "a_i: fixed random unit vectors (seed 1234, well conditioned); targets "
                                  "standardised; AdamW lr 3e-3, batch 256, warm-up 100 then cosine; NMSE on "
                                  "the 2000 validation samples; mean and min over seeds. Widths: D=4 one layer "
                                  "(Table 2) heads of width 8 (E = 8h); D=3 and two layers (Tables 4-5) total "
                                  "width E = 32 split over the h heads (e.g. h=3: 11, 11, 10)",
                       "differences_from_paper": "Appendix B gives neither optimiser, learning rate, batch, "
                                                 "steps nor seed count; ours are above. For h = 3 and 5 the "
                                                 "paper's E = 32 cannot split evenly; we use unequal widths"},
            "grid": grid, "steps_probe": probe}


def dretrieval_checks(rec: dict) -> list[dict]:
    """The issue's targets: NMSE(h=D) <= NMSE(h=D-1)/10 at every T, and for h < D error growing with T."""
    rows = []
    for variant, D, eff in (("main", 4, 1), ("d3", 3, 1), ("two_layer", 4, 2)):
        g = rec["grid"].get(variant)
        if not g:
            continue
        key = "mean" if variant == "main" else "min"  # what the paper's table for it reports
        h_at = D // eff  # transition head count: h = D (one layer), L*h = D (two layers)
        Ts = sorted({int(T) for h in g for T in g[h]})
        lo, hi = g.get(str(h_at - 1)), g.get(str(h_at))
        if lo and hi:
            ratios = [hi[str(T)][key] / lo[str(T)][key] for T in Ts if str(T) in lo and str(T) in hi]
            rows.append({"quantity": f"{variant}: NMSE(h={h_at}) / NMSE(h={h_at - 1}), per T",
                         "paper": "<= 0.1 (sharp drop at " + ("L*h" if eff > 1 else "h") + f" = {D})",
                         "measured": ", ".join(f"{x:.3g}" for x in ratios),
                         "match": bool(ratios) and all(x <= 0.1 for x in ratios)})
        if len(Ts) >= 2:
            grows = []
            for h in sorted(g, key=int):
                if int(h) < h_at:
                    vals = [g[h][str(T)][key] for T in Ts if str(T) in g[h]]
                    grows.append((h, vals[-1] > vals[0]))
            if grows:
                rows.append({"quantity": f"{variant}: for h < {h_at}, NMSE(T={Ts[-1]}) > NMSE(T={Ts[0]})",
                             "paper": "error grows with T",
                             "measured": ", ".join(f"h={h}: {'yes' if ok else 'no'}" for h, ok in grows),
                             "match": all(ok for _, ok in grows)})
    return rows


def table_dretrieval(rec: dict) -> list[dict]:
    rows = dretrieval_checks(rec)
    if rec.get("steps_probe"):
        pr = sorted(rec["steps_probe"], key=lambda x: x["steps"])
        rows.append({"quantity": "D=4 h=4 T=32 NMSE against training steps (why the absolute level differs)",
                     "paper": "4.8e-05 (steps not given)",
                     "measured": ", ".join(f"{x['steps']}: {x['nmse']:.3g}" for x in pr), "match": None})
    names = {"main": "D=4 (Table 2, mean over seeds)", "d3": "D=3, E=32 (Table 4, min over seeds)",
             "two_layer": "D=4 two layers, E=32 (Table 5, min over seeds)"}
    for variant, paper in PAPER_TABLES.items():
        g = rec["grid"].get(variant, {})
        for h in sorted(g, key=int):
            for T in sorted(g[h], key=int):
                pv = paper.get(int(h), [None] * 5)[PAPER_T.index(int(T))] if int(T) in PAPER_T else None
                c = g[h][T]
                mine = c["mean"] if variant == "main" else c["min"]
                rows.append({"quantity": f"{names[variant]}: NMSE h={h} T={T}",
                             "paper": f"{pv:.3g}" if pv else "",
                             "measured": f"{mine:.3g}" + (f" (min {c['min']:.3g})" if variant == "main" else
                                                          f" (mean {c['mean']:.3g})")
                             + (f", {mine / pv:.3g}x the paper" if pv else ""),
                             "match": None})
    return rows


def plot_dretrieval(rec: dict, out: Path) -> list[Path]:
    from headalloc.reports.figures import plot_dretrieval_grid

    return [plot_dretrieval_grid(rec, PAPER_TABLES, PAPER_T, out / "dretrieval_nmse.png")]


register(Experiment(
    name="fourgram_tradeoff", title="4-gram trade-off: heads per group vs head dimension at D=256 (trained)",
    description="One attention layer, 4 groups of H heads of dimension 64/H, trained on the 4-gram convolution "
                "of white noise (d=8). Paper: empirical argmin H=8 equals the bound's.",
    compute=compute_fourgram, plot=plot_fourgram, table=table_fourgram, order=20, tags=("synthetic",)))

register(Experiment(
    name="dretrieval", title="D-retrieval: head count transition at h = D (trained)",
    description="y = sum_i max_t a_i^T x(t), x ~ N(0, I_4); h heads of dimension 8; D=4, D=3 and two layers.",
    compute=compute_dretrieval, plot=plot_dretrieval, table=table_dretrieval, order=21, tags=("synthetic",)))
