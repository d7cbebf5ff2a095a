"""Small decoders trained from scratch on Wikipedia with different per-layer allocations at equal
attention budget (the comparison 2510.03784's reviewers asked for), and one lower budget."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from headalloc.experiments.registry import Experiment, RunContext, register

D_MODEL, LAYERS = 128, 6
# Attention widths per layer (sum of heads x head dim); every schedule but "principle_low" sums to
# 6 x 128 = 768, so attention parameters and everything else are equal.
SCHEDULES = {
    "uniform": [[(4, 32)]] * 6,
    # the paper's principle: early layers extract information with more, narrower heads (d_m = 16)
    # and a larger share of the budget; later layers run on fewer heads
    "principle": [[(12, 16)], [(10, 16)], [(4, 32)], [(4, 32)], [(3, 32)], [(2, 32)]],
    # its reverse: the same widths, mirrored in depth (narrow-head style moved to the top)
    "reverse": [[(2, 32)], [(3, 32)], [(4, 32)], [(4, 32)], [(10, 16)], [(12, 16)]],
    # "measured" is not listed here: it is derived from the trained uniform model (see measured_schedule)
    # lower budget (576 = 0.75 x 768): does the principle hold uniform's quality with fewer parameters?
    "principle_low": [[(10, 16)], [(8, 16)], [(3, 32)], [(3, 32)], [(2, 32)], [(1, 32)]],
}
SETTINGS = {
    "quick": dict(steps=300, seeds=[0], batch_size=16, seq_len=128, eval_every=100, eval_windows=32,
                  schedules=["uniform", "principle", "reverse", "measured"]),
    "full": dict(steps=1000, seeds=[0, 1, 2], batch_size=16, seq_len=128, eval_every=200, eval_windows=128,
                 schedules=[*SCHEDULES, "measured"]),
}
PROBE_LENGTHS = (4, 8, 16, 32, 64, 128)
PROBE_WINDOWS = 64
MEASURED_RULE = ("width of each layer proportional to its attention-ablation importance (validation-free: "
                 "loss increase on training windows when the layer's attention output is removed) in the "
                 "trained uniform model (seed 0); multiples of 32, at least 32, total 768; layers above the "
                 "uniform width use heads of 16, the others heads of 32")


def measured_schedule(layer_scores, budget: int = 6 * 128, unit: int = 32, narrow: int = 16) -> list[list[tuple]]:
    """The "measured" allocation: per-layer widths from measurements on the trained uniform model.

    Rule (ours; the paper gives none): each layer's attention width is proportional to its score
    (we use the attention-ablation importance, see `headalloc.probe.ablation`), rounded to multiples
    of `unit` by largest remainder with at least one unit per layer and the total exactly `budget`.
    Layers given more than the uniform width spend it on more, narrower heads of width `narrow` (the
    paper's early-layer trade-off); the others use heads of width `unit`.

    A first version used each layer's softmax saturation (mean ||J||_2 at the training context) as the
    score; on the quick uniform model those lie within 0.16-0.20 across layers, so the rule returned
    the uniform schedule. The saturation probe is still run and reported next to the result.
    """
    w = np.asarray(layer_scores, float)
    n_units, L = budget // unit, len(w)
    if budget % unit or n_units < L:
        raise ValueError(f"budget {budget} must be a multiple of {unit} with at least one unit per layer ({L} layers)")
    if not np.all(np.isfinite(w)) or np.any(w < 0) or w.sum() <= 0:
        raise ValueError(f"layer scores must be finite, non-negative and not all zero; got {w.tolist()}")
    units = np.ones(L, int)  # every layer keeps one head
    raw = w / w.sum() * (n_units - L)
    units += np.floor(raw).astype(int)
    rest = n_units - units.sum()
    units[np.argsort(-(raw - np.floor(raw)), kind="stable")[:rest]] += 1
    uniform = budget / L
    out = []
    for u in units:
        width = int(u) * unit
        out.append([(width // narrow, narrow)] if width > uniform else [(width // unit, unit)])
    return out


def configs(scale: str, schedules: dict | None = None, save_dir: Path | None = None) -> list[dict]:
    """Run configs of `scale` for `schedules` (default: the fixed ones listed for that scale). With
    `save_dir`, the uniform model of the first seed is saved there (the measured schedule probes it)."""
    s = SETTINGS[scale]
    schedules = schedules or {k: SCHEDULES[k] for k in s["schedules"] if k in SCHEDULES}
    out = []
    for name, layers in schedules.items():
        for seed in s["seeds"]:
            out.append({"label": f"{name} seed={seed}", "schedule": name, "corpus": "wiki", "vocab_size": 2048,
                        "model": {"d_model": D_MODEL, "layers": [[list(g) for g in layer] for layer in layers],
                                  "positions": "rotary", "residual": True, "layernorm": True, "ffn_hidden": 4 * D_MODEL,
                                  "tie_embeddings": True},
                        "train": {"steps": s["steps"], "batch_size": s["batch_size"], "seq_len": s["seq_len"],
                                  "lr": 3e-3, "warmup": max(20, s["steps"] // 20), "eval_every": s["eval_every"],
                                  "eval_windows": s["eval_windows"], "seed": seed},
                        "threads": 1})
            if save_dir is not None and name == "uniform" and seed == s["seeds"][0]:
                out[-1]["save_dir"] = str(save_dir)
    return out


def probe_uniform(cfg: dict) -> dict:
    """Saturation probe and attention-ablation importance of the trained uniform model, both on
    training-split windows (validation text never informs a schedule)."""
    import torch

    from headalloc.models import load_seqmodel
    from headalloc.probe.ablation import layer_ablation
    from headalloc.probe.saturation import seqmodel_saturation
    from headalloc.tasks.lm import random_windows, token_stream, train_tokenizer

    model, meta = load_seqmodel(cfg["save_dir"])
    tok = train_tokenizer(meta["corpus"], meta["vocab_size"])
    stream = token_stream(tok, meta["corpus"], "train")
    windows = random_windows(stream, PROBE_LENGTHS[-1], PROBE_WINDOWS, torch.Generator().manual_seed(1234))
    out = seqmodel_saturation(model, windows[:, :-1], PROBE_LENGTHS)
    out["ablation"] = layer_ablation(model, windows)
    return out


def compute(ctx: RunContext) -> dict:
    from headalloc.training.sweep import run_sweep

    from headalloc.training.runs import run_lm

    store = ctx.out_dir / "runs.sqlite"
    cfgs = configs(ctx.scale, save_dir=ctx.out_dir / "checkpoints" / "uniform_seed0")
    res = run_sweep(cfgs, store, "headalloc.training.runs:run_lm", executor=ctx.executor,
                    ray_address=ctx.ray_address, workers=2, desc="LM allocation sweep (fixed schedules)")
    schedules = {k: SCHEDULES[k] for k in SETTINGS[ctx.scale]["schedules"] if k in SCHEDULES}
    probe = None
    if "measured" in SETTINGS[ctx.scale]["schedules"]:
        saved = next(c for c in cfgs if "save_dir" in c)
        if not Path(saved["save_dir"], "model.safetensors").is_file():  # finished earlier, checkpoint gone
            run_lm(saved)
        probe = probe_uniform(saved)
        ell = PROBE_LENGTHS.index(SETTINGS[ctx.scale]["seq_len"])
        probe["layer_norm_at_train_length"] = probe["norm_mean"][ell]
        schedules["measured"] = measured_schedule(np.maximum(probe["ablation"]["delta"], 0.0))
        more = configs(ctx.scale, {"measured": schedules["measured"]})
        res += run_sweep(more, store, "headalloc.training.runs:run_lm", executor=ctx.executor,
                         ray_address=ctx.ray_address, workers=2, desc="LM allocation sweep (measured schedule)")
        cfgs += more
    by: dict[str, list] = {}
    for c, r in zip(cfgs, res):
        by.setdefault(c["schedule"], []).append(r)
    summary = {}
    for name, rs in by.items():
        losses = [r["val_loss"] for r in rs]
        summary[name] = {"val_loss_mean": float(np.mean(losses)), "val_loss_std": float(np.std(losses)),
                         "val_loss_all": losses, "seeds": len(rs), "attention_params": rs[0]["attention_params"],
                         "attention_flops_per_token": rs[0]["attention_flops_per_token"],
                         "n_params": rs[0]["n_params"],
                         "widths": [sum(h * d for h, d in l) for l in schedules[name]],
                         "curves": [r["curve"] for r in rs]}
    return {"config": {**SETTINGS[ctx.scale], "example_run": cfgs[0], "schedules": schedules,
                       "probe": {"lengths": list(PROBE_LENGTHS), "windows": PROBE_WINDOWS, "split": "train",
                                 "rule": MEASURED_RULE}},
            "uniform_probe": probe, "summary": summary}


def table(rec: dict) -> list[dict]:
    s = rec["summary"]
    from headalloc.reports import mean_spread

    rows = [{"quantity": f"{k}: val loss", "paper": "",
             "measured": f"{mean_spread(v['val_loss_mean'], v['val_loss_std'], v['seeds'], '.4f')}; "
                         f"attn params {v['attention_params']:,}",
             "match": None} for k, v in s.items()]
    if "uniform" in s and "principle" in s:
        u, p = s["uniform"], s["principle"]
        spread = max(u["val_loss_std"], p["val_loss_std"], 1e-9)
        diff = u["val_loss_mean"] - p["val_loss_mean"]
        rows.append({"quantity": "principle beats uniform at equal budget (difference vs seed spread)",
                     "paper": "implied", "measured": f"{diff:+.4f} (spread {spread:.4f})",
                     "match": diff > 2 * spread if min(u["seeds"], p["seeds"]) > 1 else None})
    if "uniform" in s and "measured" in s:
        u, m = s["uniform"], s["measured"]
        spread = max(u["val_loss_std"], m["val_loss_std"], 1e-9)
        diff = u["val_loss_mean"] - m["val_loss_mean"]
        rows.append({"quantity": "measured (from the uniform model's probe) vs uniform at equal budget",
                     "paper": "", "measured": f"{diff:+.4f} (spread {spread:.4f}); widths {m['widths']}",
                     "match": None})
    if "uniform" in s and "principle_low" in s:
        u, p = s["uniform"], s["principle_low"]
        rows.append({"quantity": "principle at 0.75x budget vs uniform", "paper": "holds quality",
                     "measured": f"{p['val_loss_mean']:.4f} vs {u['val_loss_mean']:.4f}",
                     "match": p["val_loss_mean"] <= u["val_loss_mean"] + max(u["val_loss_std"], 1e-9)})
    return rows


def plot(rec: dict, out: Path) -> list[Path]:
    from headalloc.reports.figures import plot_lm_curves, plot_lm_probe

    figs = [plot_lm_curves(rec, out / "val_loss_vs_tokens.png")]
    if rec.get("uniform_probe"):
        figs.append(plot_lm_probe(rec, out / "uniform_probe.png"))
    return figs


register(Experiment(
    name="lm_allocation", title="Decoders trained on Wikipedia: per-layer allocations at equal attention budget",
    description="6-layer pre-norm decoders (d_model 128, rotary, FFN 512, BPE 2048 trained on the train split) "
                "with uniform, the paper's principle, its reverse, and more; validation loss on held-out articles.",
    compute=compute, plot=plot, table=table, order=60, tags=("lm",)))
