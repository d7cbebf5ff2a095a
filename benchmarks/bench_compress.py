"""Benchmark: whole-model compression of SmolLM2 at one budget (issue targets at budget 0.5).

Prints, from one run: perplexity of every strategy after the same distillation (ratio to the
original) on the Wikipedia validation windows and on each held-out kind of text that nothing is
fitted on ('alice', 'pydoc': original -> before fitting -> after the layer-local stage -> final),
the KV cache of the `measured` model relative to the original, and decode/prefill
speed of the `measured` model against the original at 1024 and 4096 tokens of context, measured
side by side (interleaved) next to the speed-up its FLOP count predicts.

    .venv/bin/python benchmarks/bench_compress.py            # quick settings (about 15 minutes)
    .venv/bin/python benchmarks/bench_compress.py --full     # `headalloc compress`'s defaults (about 25-35 min a strategy on one of 2 cores)
"""

import argparse
import time

from headalloc.assets import load_model, token_windows
from headalloc.compression.pipeline import compress, eval_windows, prepare, teacher_perplexity
from headalloc.compression.planning import STRATEGIES
from headalloc.compression.precision import model_device, resolve_autocast
from headalloc.compression.settings import add_config_args, config_from_args, preset
from headalloc.compression.workspace import PerplexityKey
from headalloc.evaluation.lm import compare, counts
from headalloc.reports.ledger import append


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--full", action="store_true", help="`headalloc compress`'s default settings (else the quick preset)")
    ap.add_argument("--new-tokens", type=int, default=32)
    ap.add_argument("--repeats", type=int, default=3, help="speed: best of this many interleaved runs")
    ap.add_argument("--batches", default="1,8",
                    help="decode batch sizes (sequences decoded together from one prompt's cache)")
    ap.add_argument("--speed-only", action="store_true",
                    help="only the measured model's plan (no distillation: speed does not depend on weight values): "
                         "KV cache and speed")
    ap.add_argument("--no-speed", action="store_true", help="perplexities only (for a busy machine)")
    ap.add_argument("--strategies", default=",".join(STRATEGIES),
                    help="comma-separated subset (the settings are seeded, so runs are comparable)")
    ap.add_argument("--budgets", default=None, help="comma-separated budgets run one after the other (default: --budget)")
    ap.add_argument("--speed-of", default="measured",
                    help="comma-separated strategies whose models get the speed measurement, or 'all'")
    ap.add_argument("--save-dir", default=None,
                    help="also save every compressed model under this folder (one subfolder per budget kind, budget "
                         "and strategy; `headalloc evaluate --model` measures it again on more or other text)")
    add_config_args(ap, exclude=("strategy",))
    a = ap.parse_args()
    # the perplexity before fitting is part of every row here (`headalloc compress` measures it with --eval-before)
    cfg = config_from_args(a, base=preset("default" if a.full else "quick", eval_before=True)).validate()
    if a.speed_only:
        cfg = cfg.replace(distill_steps=0, kd_steps=0)
    teacher, tok = load_model(cfg.model, dtype=cfg.runtime.dtype)
    cfg = cfg.replace(autocast=resolve_autocast(cfg.runtime.autocast, model_device(teacher)))  # (as used: printed below)
    data = prepare(teacher, tok, cfg)
    ev = eval_windows(tok, cfg)
    key = PerplexityKey(cfg.fit.corpus, "validation", cfg.eval.windows, cfg.eval.length, cfg.measure_seed)
    t_ppl = teacher_perplexity(teacher, ev, data, key)["ppl"]  # measured once; every strategy reuses it
    print(f"fitting text: {cfg.fit.text} ('{cfg.fit.corpus}' train split); original perplexity {t_ppl:.2f} "
          f"({cfg.eval.windows} validation windows of {cfg.eval.length} tokens); "
          f"distillation, identical for every strategy: {cfg.layerwise.steps} Adam steps per layer ({cfg.layerwise.inputs}'s "
          f"inputs) on "
          f"{cfg.calib.windows} calibration windows of {cfg.calib.length}, then {cfg.kd.steps} end-to-end steps "
          f"(batch {cfg.kd.batch}, lr {cfg.kd.lr}, {'full-vocabulary teacher distribution (teacher at every step)' if not cfg.kd.topk else f'top-{cfg.kd.topk} teacher targets'}{' + tail bucket' if cfg.kd.tail and cfg.kd.topk else ''}{f' + {cfg.kd.hidden} x hidden states' if cfg.kd.hidden else ''}{f' + {cfg.kd.label} x hard labels' if cfg.kd.label else ''}{f', weights averaged (EMA {cfg.kd.ema})' if cfg.kd.ema else ''}, windows {'once per pass' if cfg.kd.sampling == 'epochs' else 'drawn with replacement'}, training {cfg.kd.train}{f'; the teacher passes over its windows and this stage under {cfg.runtime.autocast} autocast' if cfg.runtime.autocast != 'none' else ''}) on {cfg.kd.windows} training "
          f"windows of {cfg.kd.length}")
    budgets = [float(b) for b in a.budgets.split(",")] if a.budgets else [cfg.plan.budget]
    if a.save_dir:  # every folder the run will write, checked before any work (nothing foreign is overwritten)
        from headalloc.compression.export import check_output


        for budget in budgets:
            for strat in (("measured",) if a.speed_only else a.strategies.split(",")):
                try:
                    check_output(save_path(a, cfg.replace(budget=budget), strat))
                except ValueError as e:
                    raise SystemExit(f"--save-dir: {e}") from None
    for budget in budgets:
        print(f"\n== {cfg.plan.budget_kind} budget {budget} ==", flush=True)
        run_budget(a, cfg.replace(budget=budget), teacher, tok, data, t_ppl)


def save_path(a, cfg, strat: str):
    """Where --save-dir keeps one strategy's model at one budget (e.g. DIR/params05-measured-lowrank)."""
    from pathlib import Path

    return Path(a.save_dir) / f"{cfg.plan.budget_kind}{cfg.plan.budget:g}-{strat}".replace(".", "")


def run_budget(a, cfg, teacher, tok, data, t_ppl):
    models, rows = {}, []
    for strat in (("measured",) if a.speed_only else a.strategies.split(",")):
        t0 = time.time()
        try:
            r = compress(teacher, tokenizer=tok, config=cfg.replace(strategy=strat), calibration_data=data,
                         progress=False, keep_stages=True)
        except ValueError as e:  # e.g. a budget below a strategy's smallest option
            print(f"  {strat:15s} not run: {e}", flush=True)
            continue
        rep = r.report
        models[strat] = r.model
        if a.save_dir:
            print(f"  {'':15s} saved to {r.save(save_path(a, cfg, strat))}", flush=True)
        kvr = rep.costs.kv_bytes_per_token / rep.teacher_costs.kv_bytes_per_token
        rows.append((strat, rep.validation.ratio, {k: h.ratio for k, h in rep.heldout.items()}, kvr,
                     rep.costs.kv_bytes_per_token))
        print(f"  {strat} ({time.time() - t0:.0f} s):", flush=True)
        for line in rep.format_text():
            print(f"    {line}", flush=True)
        if "exponent" in r.plan.info:  # our knapsacks: the candidate plan that lost least on the calibration text
            losses = ", ".join(f"{k}: {v:.4f}" for k, v in r.plan.info["calibration_loss_by_candidate"].items())
            print(f"  {'':15s} kept p={r.plan.info['exponent']}, layers without attention "
                  f"{r.plan.info['empty_layers'] or 'none'} (calibration loss before fitting: {losses})", flush=True)
    kinds = cfg.heldout_kinds
    print(f"\n{'strategy':15s} {'Wikipedia':>10s} " + " ".join(f"{k[:12]:>12s}" for k in kinds) +
          f" {'KV':>7s} {'KV bytes/token':>15s}  ({cfg.plan.budget_kind} budget {cfg.plan.budget}; ratios to the original)")
    for strat, w, h, kvr, kvb in rows:
        print(f"{strat:15s} {w:9.2f}x " + " ".join(f"{h.get(k, float('nan')):11.2f}x" for k in kinds) +
              f" {kvr:6.3f}x {kvb:15,d}")
    append("benchmark", "bench_compress", settings=cfg.to_dict(),
           metrics={"budget_kind": cfg.plan.budget_kind, "budget": cfg.plan.budget, "original_ppl": t_ppl,
                    "by_strategy": {s: {"wikipedia": w, **h, "kv": kvr} for s, w, h, kvr, _ in rows}})
    if a.no_speed:
        return
    speed_of = list(models) if a.speed_of == "all" else [s for s in a.speed_of.split(",") if s in models]
    long = token_windows(tok, "wiki", "validation", 4096, 1, seed=0)
    for name in speed_of:
        m = models[name]
        kv = counts(m)["kv_bytes_per_token"] / counts(teacher)["kv_bytes_per_token"]
        print(f"{name}: KV cache {kv:.3f}x of the original")
        for b in [int(x) for x in a.batches.split(",")]:
            for c, v in compare(teacher, m, long, (1024, 4096), a.new_tokens, repeats=a.repeats, progress=False,
                                batch=b).items():
                frac = v["decode_fraction_of_predicted"]
                fb = v["decode_fraction_of_predicted_bytes"]
                print(f"{name}: decode batch {b}, context {c}: decode speed-up measured "
                      f"{v['decode_speedup_measured']:.2f}x ({v['model']['decode_tok_s']:.1f} vs "
                      f"{v['reference']['decode_tok_s']:.1f} tok/s) vs FLOP-predicted "
                      f"{v['decode_speedup_predicted']:.2f}x (fraction of predicted gain "
                      f"{frac if frac is None else round(frac, 2)}) and memory-traffic-predicted "
                      f"{v['decode_speedup_predicted_bytes']:.2f}x (fraction {fb if fb is None else round(fb, 2)}); "
                      f"prefill {v['prefill_speedup_measured']:.2f}x vs {v['prefill_speedup_predicted']:.2f}x; "
                      f"against the stock HF model: decode {v['decode_speedup_vs_stock']:.2f}x, prefill "
                      f"{v['prefill_speedup_vs_stock']:.2f}x", flush=True)
    print(f"(speed-ups are against the original weights in the same runtime, identical logits; 'stock' is "
          f"transformers' LlamaForCausalLM with SDPA; {a.new_tokens} greedy decode steps after a one-sequence "
          f"prefill, best of {a.repeats} interleaved runs)")


if __name__ == "__main__":
    main()
