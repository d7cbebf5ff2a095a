"""Benchmark: the savings of a compressed SmolLM2 realised in llama.cpp, and what the engine's constraint costs.

One run, on the packaged model and text, at a KV-cache budget (0.5 by default):
1. the measured strategy unconstrained (`--target any`: per-head widths, our runtime only) and
   constrained to what llama.cpp runs (`--target llamacpp`: per-layer head counts, original width,
   possibly no attention in a layer), both with the same calibration and distillation settings;
   perplexity on the Wikipedia validation windows and on the held-out text;
2. the original and the constrained model exported to GGUF (`--outtype`, f32 by default), loaded in
   llama.cpp (llama-cpp-python): logits on a prompt against PyTorch, then, measured side by side
   (original and compressed alternately, `--repeats` times, best kept): the KV cache llama.cpp
   allocates (its own report) and bytes per cached token, the buffers at a 4096-token context,
   prompt and generation tokens/s at 1024 and 4096 tokens of context, with flash attention on
   (llama.cpp pads every layer's V cache to the widest layer without it: shown too).

    .venv/bin/python benchmarks/bench_llamacpp.py           # quick settings (about 15 min)
    .venv/bin/python benchmarks/bench_llamacpp.py --full    # `headalloc compress`'s defaults (about 45 min)
Needs `./scripts/setup.sh --llamacpp`.
"""

import argparse
import time
from pathlib import Path

import numpy as np

from headalloc.assets import load_model, resolve_model, token_windows
from headalloc.compression.engine import engine_logits, engine_measure, require_engine
from headalloc.compression.export.gguf import export_gguf
from headalloc.compression.pipeline import compress, eval_windows, prepare, teacher_perplexity
from headalloc.compression.settings import add_config_args, config_from_args, preset
from headalloc.compression.workspace import PerplexityKey
from headalloc.io import atomic_write_json
from headalloc.reports.ledger import append


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--full", action="store_true", help="`headalloc compress`'s default settings (else quick)")
    ap.add_argument("--outtype", default="f32", choices=["f32", "f16", "q8_0"])
    ap.add_argument("--contexts", default="1024,4096")
    ap.add_argument("--new-tokens", type=int, default=32)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--threads", type=int, default=None, help="llama.cpp threads (default: its own choice)")
    ap.add_argument("--work", default="results/bench_llamacpp", help="folder for the GGUF files and results.json")
    ap.add_argument("--skip-unconstrained", action="store_true", help="only the llama.cpp-constrained plan")
    add_config_args(ap, exclude=("target", "budget_kind"))
    a = ap.parse_args()
    require_engine()
    cfg = config_from_args(a, base=preset("default" if a.full else "quick").replace(budget_kind="kv",
                                           strategy="measured")).validate()
    contexts = [int(c) for c in a.contexts.split(",")]
    work = Path(a.work)
    work.mkdir(parents=True, exist_ok=True)
    teacher, tok = load_model(cfg.model, dtype=cfg.runtime.dtype)
    data = prepare(teacher, tok, cfg)
    ev = eval_windows(tok, cfg)
    key = PerplexityKey(cfg.fit.corpus, "validation", cfg.eval.windows, cfg.eval.length, cfg.measure_seed)
    t_ppl = teacher_perplexity(teacher, ev, data, key)["ppl"]
    print(f"SmolLM2 ({cfg.model}), strategy {cfg.plan.strategy}, KV budget {cfg.plan.budget}; "
          f"{'default' if a.full else 'quick'} settings: {cfg.calib.windows} calibration windows, "
          f"{cfg.layerwise.steps} layer-local steps, {cfg.kd.steps} end-to-end steps on {cfg.kd.windows} windows; "
          f"seed {cfg.runtime.seed}; original perplexity {t_ppl:.2f} ({cfg.eval.windows} Wikipedia validation windows of "
          f"{cfg.eval.length})", flush=True)
    res = {"settings": cfg.to_dict(), "contexts": contexts, "outtype": a.outtype, "runs": {}}
    results = {}
    for target in (("llamacpp",) if a.skip_unconstrained else ("any", "llamacpp")):
        t0 = time.time()
        r = compress(teacher, tokenizer=tok, config=cfg.replace(target=target), calibration_data=data,
                     progress=False)
        rep = r.report
        h = next(iter(rep.heldout.values()), None)  # the first held-out text
        row = {"ppl": rep.validation.after.ppl, "ratio": rep.validation.after.ppl / t_ppl,
               "kv_bytes_per_token": rep.costs.kv_bytes_per_token,
               "kv_ratio": rep.costs.kv_bytes_per_token / rep.teacher_costs.kv_bytes_per_token,
               "heldout_ppl": h.after.ppl if h else None, "heldout_ratio": h.ratio if h else None,
               "plan": [(len(lp.keep_kv) if lp.keep_kv is not None else None, lp.qk_dim, lp.v_dim) for lp in r.plan],
               "seconds": time.time() - t0}
        results[target] = (r, row)
        res["runs"][target] = row
        print(f"target {target:8s}: Wikipedia {row['ppl']:.2f} ({row['ratio']:.2f}x), held-out '{h.name}' "
              f"{row['heldout_ppl']:.2f} ({row['heldout_ratio']:.2f}x, original {h.teacher.ppl:.2f}); "
              f"KV {row['kv_ratio']:.3f}x in PyTorch; {row['seconds'] / 60:.1f} min", flush=True)
    r, _ = results["llamacpp"]
    print("llama.cpp plan (kv heads x query heads per kv head per layer): "
          + " ".join(f"{a_['n_kv_heads']}x{a_['n_rep']}" for a_ in r.model.config.attn_layers))
    folder = resolve_model(cfg.model)
    files = {"original": work / f"original-{a.outtype}.gguf", "compressed": work / f"compressed-{a.outtype}.gguf"}
    export_gguf(teacher, files["original"], a.outtype, tokenizer_dir=folder, overwrite=True, name="SmolLM2 original")
    export_gguf(r.model.float(), files["compressed"], a.outtype, tokenizer_dir=folder, overwrite=True,
                name="SmolLM2 compressed (headalloc)")
    ids = tok("The history of the city begins in the twelfth century, when the river was first bridged and a "
              "market grew on its northern bank.")["input_ids"]
    import torch

    with torch.no_grad():
        lt = r.model(torch.tensor([ids])).logits[0].float().numpy()
    lc = engine_logits(files["compressed"], ids)
    res["logits"] = {"max_abs_diff": float(np.abs(lc - lt).max()), "scale": float(np.abs(lt).max()),
                     "argmax_agree": float((lc.argmax(-1) == lt.argmax(-1)).mean()), "tokens": len(ids)}
    print(f"compressed GGUF in llama.cpp vs PyTorch on {len(ids)} tokens: max |dlogit| "
          f"{res['logits']['max_abs_diff']:.2e} (scale {res['logits']['scale']:.1f}), greedy agreement "
          f"{res['logits']['argmax_agree']:.0%}", flush=True)
    text = token_windows(tok, cfg.fit.corpus, "validation", max(contexts) + a.new_tokens, 1, seed=cfg.runtime.seed)[0].tolist()
    best = {}
    for rep in range(a.repeats):
        for name, f in files.items():  # alternately, so both see the same machine load
            for fa in ((True, False) if rep == 0 else (True,)):
                m_ = engine_measure(f, text, contexts, a.new_tokens, flash_attn=fa, threads=a.threads)
                key = (name, fa)
                if key not in best:
                    best[key] = m_
                else:
                    for c in contexts:
                        for k in ("prompt_tok_s", "gen_tok_s"):
                            best[key]["speed"][c][k] = max(best[key]["speed"][c][k], m_["speed"][c][k])
    res["engine"] = {f"{n}{'' if fa else '_no_flash_attn'}": v for (n, fa), v in best.items()}
    o, c_ = best[("original", True)], best[("compressed", True)]
    print(f"\nllama.cpp (llama-cpp-python), {a.outtype} weights, f16 KV cache, flash attention on, n_ctx "
          f"{o['n_ctx']}, best of {a.repeats}:")
    print(f"{'':34s}{'original':>12s}{'compressed':>12s}{'ratio':>8s}")
    rows = [("KV bytes per cached token", o["kv_bytes_per_token"], c_["kv_bytes_per_token"]),
            ("KV cache allocated (MiB)", o["kv_cache_mib"], c_["kv_cache_mib"]),
            ("model buffer (MiB)", o["model_mib"], c_["model_mib"]),
            ("compute buffer (MiB)", o["compute_mib"], c_["compute_mib"]),
            (f"total at {o['n_ctx']} ctx (MiB)", o["model_mib"] + o["kv_cache_mib"] + o["compute_mib"],
             c_["model_mib"] + c_["kv_cache_mib"] + c_["compute_mib"])]
    for c in contexts:
        rows.append((f"prompt tok/s, {c} tokens", o["speed"][c]["prompt_tok_s"], c_["speed"][c]["prompt_tok_s"]))
        rows.append((f"generation tok/s after {c}", o["speed"][c]["gen_tok_s"], c_["speed"][c]["gen_tok_s"]))
    for label, x, y in rows:
        print(f"{label:34s}{x:12.1f}{y:12.1f}{y / x:8.3f}")
    nf = best[("compressed", False)]
    print(f"without flash attention llama.cpp pads every layer's V cache to the widest layer: compressed KV cache "
          f"{nf['kv_cache_mib']:.1f} MiB (vs {c_['kv_cache_mib']:.1f} with it; original "
          f"{best[('original', False)]['kv_cache_mib']:.1f}); padding reported: {nf['v_cache_padded']}")
    if "any" in results:
        u, l_ = res["runs"]["any"], res["runs"]["llamacpp"]
        print(f"\ncost of the llama.cpp constraint at KV budget {cfg.plan.budget}: Wikipedia {u['ppl']:.2f} -> "
              f"{l_['ppl']:.2f} ({l_['ppl'] / u['ppl']:.3f}x), held-out {u['heldout_ppl']:.2f} -> "
              f"{l_['heldout_ppl']:.2f} ({l_['heldout_ppl'] / u['heldout_ppl']:.3f}x)")
    atomic_write_json(work / "results.json", res)
    print(f"results: {work / 'results.json'}")
    append("benchmark", "bench_llamacpp", settings={**cfg.to_dict(), "outtype": a.outtype},
           metrics={"runs": res["runs"], "logits": res["logits"], "engine": res["engine"]})


if __name__ == "__main__":
    main()
