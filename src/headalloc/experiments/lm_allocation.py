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
    # measured: widths from the uniform model's softmax saturation would need a second stage; we use
    # the fixed rule "more heads where attention is least saturated" read off the saturation probe of
    # SmolLM2 (early layers fall with L, later do not): one layer of 8x16 at the bottom, rest uniform.
    "early_heads": [[(8, 16)], [(4, 32)], [(4, 32)], [(4, 32)], [(4, 32)], [(4, 32)]],
    # lower budget (576 = 0.75 x 768): does the principle hold uniform's quality with fewer parameters?
    "principle_low": [[(10, 16)], [(8, 16)], [(3, 32)], [(3, 32)], [(2, 32)], [(1, 32)]],
}
SETTINGS = {
    "quick": dict(steps=300, seeds=[0], batch_size=16, seq_len=128, eval_every=100, eval_windows=32,
                  schedules=["uniform", "principle", "reverse"]),
    "full": dict(steps=2000, seeds=[0, 1, 2], batch_size=16, seq_len=128, eval_every=250, eval_windows=128,
                 schedules=list(SCHEDULES)),
}


def configs(scale: str) -> list[dict]:
    s = SETTINGS[scale]
    out = []
    for name in s["schedules"]:
        for seed in s["seeds"]:
            out.append({"label": f"{name} seed={seed}", "schedule": name, "corpus": "wiki", "vocab_size": 2048,
                        "model": {"d_model": D_MODEL, "layers": [[list(g) for g in layer] for layer in SCHEDULES[name]],
                                  "positions": "rotary", "residual": True, "layernorm": True, "ffn_hidden": 4 * D_MODEL,
                                  "tie_embeddings": True},
                        "train": {"steps": s["steps"], "batch_size": s["batch_size"], "seq_len": s["seq_len"],
                                  "lr": 3e-3, "warmup": max(20, s["steps"] // 20), "eval_every": s["eval_every"],
                                  "eval_windows": s["eval_windows"], "seed": seed},
                        "threads": 1})
    return out


def compute(ctx: RunContext) -> dict:
    from headalloc.training.sweep import run_sweep

    cfgs = configs(ctx.scale)
    res = run_sweep(cfgs, ctx.out_dir / "runs.sqlite", "headalloc.training.runs:run_lm", executor=ctx.executor,
                    ray_address=ctx.ray_address, workers=2, desc="LM allocation sweep")
    by: dict[str, list] = {}
    for c, r in zip(cfgs, res):
        by.setdefault(c["schedule"], []).append(r)
    summary = {}
    for name, rs in by.items():
        losses = [r["val_loss"] for r in rs]
        summary[name] = {"val_loss_mean": float(np.mean(losses)), "val_loss_std": float(np.std(losses)),
                         "val_loss_all": losses, "seeds": len(rs), "attention_params": rs[0]["attention_params"],
                         "attention_flops_per_token": rs[0]["attention_flops_per_token"],
                         "n_params": rs[0]["n_params"], "widths": [sum(h * d for h, d in l) for l in SCHEDULES[name]],
                         "curves": [r["curve"] for r in rs]}
    return {"config": {**SETTINGS[ctx.scale], "example_run": cfgs[0], "schedules": {k: SCHEDULES[k] for k in by}},
            "summary": summary}


def table(rec: dict) -> list[dict]:
    s = rec["summary"]
    rows = [{"quantity": f"{k}: val loss (mean ± std over {v['seeds']} seeds)", "paper": "",
             "measured": f"{v['val_loss_mean']:.4f} ± {v['val_loss_std']:.4f}; attn params {v['attention_params']:,}",
             "match": None} for k, v in s.items()]
    if "uniform" in s and "principle" in s:
        u, p = s["uniform"], s["principle"]
        spread = max(u["val_loss_std"], p["val_loss_std"], 1e-9)
        diff = u["val_loss_mean"] - p["val_loss_mean"]
        rows.append({"quantity": "principle beats uniform at equal budget (difference vs seed spread)",
                     "paper": "implied", "measured": f"{diff:+.4f} (spread {spread:.4f})",
                     "match": diff > 2 * spread if min(u["seeds"], p["seeds"]) > 1 else None})
    if "uniform" in s and "principle_low" in s:
        u, p = s["uniform"], s["principle_low"]
        rows.append({"quantity": "principle at 0.75x budget vs uniform", "paper": "holds quality",
                     "measured": f"{p['val_loss_mean']:.4f} vs {u['val_loss_mean']:.4f}",
                     "match": p["val_loss_mean"] <= u["val_loss_mean"] + max(u["val_loss_std"], 1e-9)})
    return rows


def plot(rec: dict, out: Path) -> list[Path]:
    from headalloc.reports.figures import plot_lm_curves

    return [plot_lm_curves(rec, out / "val_loss_vs_tokens.png")]


register(Experiment(
    name="lm_allocation", title="Decoders trained on Wikipedia: per-layer allocations at equal attention budget",
    description="6-layer pre-norm decoders (d_model 128, rotary, FFN 512, BPE 2048 trained on the train split) "
                "with uniform, the paper's principle, its reverse, and more; validation loss on held-out articles.",
    compute=compute, plot=plot, table=table, order=60, tags=("lm",)))
