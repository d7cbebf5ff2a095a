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
from dataclasses import replace

from headalloc.compression.pipeline import calibration, compress, eval_windows, heldout_ratios, teacher_metrics
from headalloc.compression.precision import model_device, resolve_autocast
from headalloc.compression.settings import add_config_args, config_from_args, preset
from headalloc.compression.strategies import STRATEGIES
from headalloc.evaluation.lm import compare, counts


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
        cfg = replace(cfg, distill_steps=0, kd_steps=0)
    teacher, tok = load_model(cfg.model, dtype=cfg.dtype)
    cfg = replace(cfg, autocast=resolve_autocast(cfg.autocast, model_device(teacher)))  # (as used: printed below)
    data = calibration(teacher, tok, cfg)
    ev = eval_windows(tok, cfg)
    t_ppl = teacher_metrics(teacher, ev, data, cfg)["ppl"]  # measured once; every strategy reuses it
    print(f"fitting text: {cfg.fit_text} ('{cfg.corpus}' train split); original perplexity {t_ppl:.2f} "
          f"({cfg.eval_windows} validation windows of {cfg.eval_length} tokens); "
          f"distillation, identical for every strategy: {cfg.distill_steps} Adam steps per layer ({cfg.distill_inputs}'s "
          f"inputs) on "
          f"{cfg.calib_windows} calibration windows of {cfg.calib_length}, then {cfg.kd_steps} end-to-end steps "
          f"(batch {cfg.kd_batch}, lr {cfg.kd_lr}, {'full-vocabulary teacher distribution (teacher at every step)' if not cfg.kd_topk else f'top-{cfg.kd_topk} teacher targets'}{' + tail bucket' if cfg.kd_tail and cfg.kd_topk else ''}{f' + {cfg.kd_hidden} x hidden states' if cfg.kd_hidden else ''}{f' + {cfg.kd_label} x hard labels' if cfg.kd_label else ''}{f', weights averaged (EMA {cfg.kd_ema})' if cfg.kd_ema else ''}, windows {'once per pass' if cfg.kd_sampling == 'epochs' else 'drawn with replacement'}, training {cfg.kd_train}{f'; the teacher passes over its windows and this stage under {cfg.autocast} autocast' if cfg.autocast != 'none' else ''}) on {cfg.kd_windows} training "
          f"windows of {cfg.kd_length}")
    budgets = [float(b) for b in a.budgets.split(",")] if a.budgets else [cfg.budget]
    if a.save_dir:  # every folder the run will write, checked before any work (nothing foreign is overwritten)
        from headalloc.compression.export import check_output

        for budget in budgets:
            for strat in (("measured",) if a.speed_only else a.strategies.split(",")):
                try:
                    check_output(save_path(a, replace(cfg, budget=budget), strat))
                except ValueError as e:
                    raise SystemExit(f"--save-dir: {e}") from None
    for budget in budgets:
        print(f"\n== {cfg.budget_kind} budget {budget} ==", flush=True)
        run_budget(a, replace(cfg, budget=budget), teacher, tok, data, t_ppl)


def interval(r) -> str:
    """A ratio's 90% paired bootstrap interval over the evaluation windows, when measured."""
    return f" [{r['low']:.2f}, {r['high']:.2f}]" if r else ""


def save_path(a, cfg, strat: str):
    """Where --save-dir keeps one strategy's model at one budget (e.g. DIR/params05-measured-lowrank)."""
    from pathlib import Path

    return Path(a.save_dir) / f"{cfg.budget_kind}{cfg.budget:g}-{strat}".replace(".", "")


def run_budget(a, cfg, teacher, tok, data, t_ppl):
    models, rows = {}, []
    for strat in (("measured",) if a.speed_only else a.strategies.split(",")):
        t0 = time.time()
        try:
            r = compress(teacher, tokenizer=tok, config=replace(cfg, strategy=strat), calibration_data=data,
                         progress=False, keep_stages=True)
        except ValueError as e:  # e.g. a budget below a strategy's smallest option
            print(f"  {strat:15s} not run: {e}", flush=True)
            continue
        m = r.metrics
        p = m["after_distill"]["ppl"]
        mid = (f"before fitting {m['before_distill']['ppl']:.2f}; " if "before_distill" in m else "") + \
            (f"after layer-local only {m['after_layerwise']['ppl']:7.2f}; " if "after_layerwise" in m else "")
        held = "".join(f"; held-out '{k}' {h['teacher']['ppl']:.2f} -> "
                       + (f"{h['before']['ppl']:.2f} -> " if "before" in h else "")
                       + (f"{h['after_layerwise']['ppl']:.2f} -> " if "after_layerwise" in h else "") + f"{h['after']['ppl']:.2f} "
                       f"({h['after']['ppl'] / h['teacher']['ppl']:.2f}x{interval(h.get('ratio'))}, {h['windows']} windows of {h['length']})"
                       for k, h in (m.get("heldout") or {}).items())
        models[strat] = r.model
        if a.save_dir:
            print(f"  {'':15s} saved to {r.save(save_path(a, cfg, strat))}", flush=True)
        kvr = m["after_distill"]["kv_bytes_per_token"] / m["teacher"]["kv_bytes_per_token"]
        rows.append((strat, p / t_ppl, heldout_ratios(m), kvr, m["after_distill"]["kv_bytes_per_token"]))
        print(f"  {strat:15s} {mid}ppl {p:7.2f}  ({p / t_ppl:.2f}x original{interval(m.get('ratio'))}){held}; KV {kvr:.3f}x   "
              f"[{time.time() - t0:.0f} s: plan {m['seconds_plan']:.0f}, layer-local {m.get('seconds_layerwise', 0):.0f}, "
              f"end-to-end {m['seconds_distill'] - m.get('seconds_layerwise', 0):.0f}, rest evaluation]", flush=True)
        if "exponent" in r.plan.info:  # our knapsacks: the candidate plan that lost least on the calibration text
            losses = ", ".join(f"{k}: {v:.4f}" for k, v in r.plan.info["calibration_loss_by_candidate"].items())
            print(f"  {'':15s} kept p={r.plan.info['exponent']}, layers without attention "
                  f"{r.plan.info['empty_layers'] or 'none'} (calibration loss before fitting: {losses})", flush=True)
    kinds = cfg.heldout_kinds
    print(f"\n{'strategy':15s} {'Wikipedia':>10s} " + " ".join(f"{k[:12]:>12s}" for k in kinds) +
          f" {'KV':>7s} {'KV bytes/token':>15s}  ({cfg.budget_kind} budget {cfg.budget}; ratios to the original)")
    for strat, w, h, kvr, kvb in rows:
        print(f"{strat:15s} {w:9.2f}x " + " ".join(f"{h.get(k, float('nan')):11.2f}x" for k in kinds) +
              f" {kvr:6.3f}x {kvb:15,d}")
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
