"""The `headalloc` command: one entry point with a subcommand per job.

Each subcommand is a thin layer over a library function with the same parameters, so the CLI and
the Python API say the same thing.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path


def _floats(text: str) -> list[float]:
    try:
        return [float(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated numbers, got {text!r}") from None


def _ints(text: str) -> list[int]:
    try:
        return [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from None


# ---------------------------------------------------------------- plan
def cmd_plan(args: argparse.Namespace) -> int:
    from headalloc.theory import allocate

    res = allocate(args.budget, args.token_dim, args.rho, args.B, top_k=args.top, exact_budget=not args.at_most,
                   head_dims=args.head_dims, max_heads=args.max_heads, max_groups=args.max_groups)
    if args.json:
        print(json.dumps(res.to_dict(), indent=2))
    else:
        print(f"budget D={res.budget}  token dim d={res.token_dim}  |rho|={list(res.rho_norms)}  B={res.B}  "
              f"({'sum H_m d_m = D' if res.exact_budget else 'sum H_m d_m <= D'})")
        for rank, a in enumerate(res.allocations):
            label = "optimum" if rank == 0 else f"runner-up {rank}"
            b = a.bound
            print(f"\n{label}: M={a.n_groups} groups, {a.n_heads} heads, budget used {a.budget}")
            print(f"  bound {b.total:.4f} = dimension {b.dimension:.4f} + selection {b.selection:.4f} + tail {b.tail:.4f}")
            print("  lag  heads  head_dim  heads*dim")
            for m, (h, d) in enumerate(a.groups, start=1):
                print(f"  {m:>3}  {h:>5}  {d:>8}  {h * d:>9}")
    if args.plot:
        from headalloc.reports.figures import plot_uniform_group_curve
        from headalloc.theory import tradeoff_curve

        M = res.best.n_groups
        per_group = res.budget / M
        hs = [h for h in (1, 2, 4, 8, 16, 32, 64, 128, 256, 512) if h <= per_group]
        rec = {"uniform_heads_per_group": hs,
               "uniform_curve": [b.to_dict() for b in tradeoff_curve(res.budget, res.token_dim, hs, res.rho_norms,
                                                                      res.B, n_groups=M)],
               "solution": res.to_dict(), "config": {"budget": res.budget, "token_dim": res.token_dim}}
        path = plot_uniform_group_curve(rec, Path(args.plot))
        print(f"\nfigure: {path}", file=sys.stderr)
    return 0


# ---------------------------------------------------------------- reproduce
def cmd_reproduce(args: argparse.Namespace) -> int:
    from headalloc.experiments.registry import run_experiment, select
    from headalloc.reports.html import build_report

    exps = select(args.only)
    out = Path(args.out)
    failed = []
    for exp in exps:
        try:
            run_experiment(exp, out, quick=args.quick, seed=args.seed, force=args.force,
                           executor=args.executor, ray_address=args.ray_address)
        except Exception as e:  # one failing experiment must not lose the others' report
            if args.fail_fast:
                raise
            failed.append(exp.name)
            print(f"[{exp.name}] FAILED: {type(e).__name__}: {e}", file=sys.stderr)
    report = build_report(out, exps)
    print(f"report: {report}")
    if failed:
        print(f"failed experiments: {', '.join(failed)}", file=sys.stderr)
        return 1
    return 0


def cmd_list(args: argparse.Namespace) -> int:
    from headalloc.experiments.registry import experiments

    for name, exp in experiments().items():
        print(f"{name:28s} {exp.title}")
    return 0


def cmd_report(args: argparse.Namespace) -> int:
    from headalloc.experiments.registry import result_path, select
    from headalloc.io import read_json
    from headalloc.reports.html import build_report

    out = Path(args.out)
    exps = select(args.only)
    found = [exp for exp in exps if result_path(out, exp).exists()]
    if not found:
        raise FileNotFoundError(f"{out} holds no experiment results; run `headalloc reproduce --out {out}` first")
    for exp in found:  # redraw figures from stored results only
        exp.plot(read_json(result_path(out, exp)), out / exp.name)
    print(f"report: {build_report(out, exps)}")
    return 0


# ---------------------------------------------------------------- saturation
def cmd_saturation(args: argparse.Namespace) -> int:
    from headalloc.assets import load_model
    from headalloc.experiments.saturation import table
    from headalloc.io import atomic_write_json
    from headalloc.probe.saturation import measure_saturation
    from headalloc.reports.figures import plot_saturation, plot_slopes

    out = Path(args.out)
    model, tok = load_model(args.model)
    rec = measure_saturation(model, tok, args.corpus, args.lengths, args.windows, seed=args.seed, split=args.split)
    rec["config"] = {"model": str(args.model), "corpus": str(args.corpus), "split": args.split,
                     "lengths": args.lengths, "n_windows": args.windows, "seed": args.seed}
    atomic_write_json(out / "saturation.json", rec)
    plot_saturation(rec, out / "jacobian_norm_vs_L.png", out / "logit_spread_vs_L.png", str(args.model))
    plot_slopes(rec, out / "slope_per_head.png", str(args.model))
    for row in table(rec):
        print(f"{row['quantity']:45s} {row['measured']:>24s}   (paper: {row['paper']})")
    print(f"results and figures in {out}")
    return 0


# ---------------------------------------------------------------- train / sweep
def _load_configs(path: str) -> list[dict]:
    import json as _json

    p = Path(path)
    if not p.exists():
        raise FileNotFoundError(f"config file {p} does not exist")
    try:
        data = _json.loads(p.read_text())
    except _json.JSONDecodeError as e:
        raise ValueError(f"{p} is not valid JSON: {e}") from None
    return data if isinstance(data, list) else [data]


def _apply_sets(cfg: dict, sets: list[str]) -> dict:
    """--set a.b=value overrides (value parsed as JSON when possible)."""
    import copy
    import json as _json

    cfg = copy.deepcopy(cfg)
    for item in sets or []:
        key, sep, val = item.partition("=")
        if not sep:
            raise ValueError(f"--set expects key=value; got {item!r}")
        try:
            v = _json.loads(val)
        except _json.JSONDecodeError:
            v = val
        node = cfg
        parts = key.split(".")
        for k in parts[:-1]:
            node = node.setdefault(k, {})
        node[parts[-1]] = v
    return cfg


def cmd_train(args: argparse.Namespace) -> int:
    from headalloc.io import atomic_write_json
    from headalloc.training.runs import run_synthetic

    if args.config:
        cfg = _load_configs(args.config)[0]
    else:
        from headalloc.experiments.synthetic import fourgram_configs

        cfg = fourgram_configs("quick")[3]  # the paper's optimum H=8 as a runnable default
    cfg = _apply_sets(cfg, args.set)
    result = run_synthetic(cfg, progress=True)
    summary = {"config": cfg, "train": result["train"], "val": result["val"], "n_params": result["n_params"],
               "attention_params": result["attention_params"], "seconds": round(result["seconds"], 1)}
    print(json.dumps(summary, indent=1))
    if args.out:
        atomic_write_json(args.out, {"config": cfg, "result": result})
    return 0


def cmd_sweep(args: argparse.Namespace) -> int:
    from headalloc.training.sweep import run_sweep

    if args.config:
        configs = [_apply_sets(c, args.set) for c in _load_configs(args.config)]
    else:
        from headalloc.experiments import synthetic

        makers = {"fourgram": synthetic.fourgram_configs, "dretrieval": synthetic.dretrieval_configs}
        if args.preset not in makers:
            raise ValueError(f"give --config FILE or --preset one of {sorted(makers)}")
        configs = [_apply_sets(c, args.set) for c in makers[args.preset]("quick" if args.quick else "full")]
    results = run_sweep(configs, args.store, args.run_fn, executor=args.executor, ray_address=args.ray_address,
                        workers=args.workers)
    for c, r in zip(configs, results):
        metric = r["val"].get("nmse", r["val"].get("ce"))
        print(f"{c.get('label', '?'):40s} val {metric:.4g}")
    print(f"{len(results)} runs in {args.store}")
    return 0


# ---------------------------------------------------------------- compress / evaluate
def cmd_compress(args: argparse.Namespace) -> int:
    from headalloc.compression.export import check_output
    from headalloc.compression.pipeline import check_model, compress
    from headalloc.compression.reduce import Geometry
    from headalloc.compression.settings import config_from_args
    from headalloc.reports.figures import plot_plan_grid

    cfg = config_from_args(args).validate()  # every setting, the family and the output: before any work
    check_model(cfg.model)
    out = check_output(args.out, args.overwrite)
    r = compress(config=cfg)
    command = "headalloc " + " ".join(sys.argv[1:]) if sys.argv and sys.argv[0].endswith("headalloc") else None
    r.save(out, overwrite=args.overwrite, command=command)
    g = Geometry.of(r.teacher)
    plot_plan_grid(r.plan.to_dict()["layers"], g.n_kv, g.n_rep, g.head_dim, out / "plan.png",
                   f"{cfg.model}: {r.plan.strategy} plan at {cfg.plan.budget_kind} budget {cfg.plan.budget}",
                   hidden=g.hidden)
    print(f"saved {out}: loads with AutoModelForCausalLM.from_pretrained({str(out)!r}, trust_remote_code=True)")
    for line in r.report.format_text():
        print(line)
    if cfg.plan.target == "llamacpp":
        print(f"for llama.cpp: headalloc export-gguf {out} {out}.gguf")
    return 0


def cmd_evaluate(args: argparse.Namespace) -> int:

    from headalloc.assets import load_model, token_windows
    from headalloc.evaluation.lm import compare, counts, perplexity
    from headalloc.io import atomic_write_json

    if args.windows < 0 or args.length < 2 or args.batch < 1 or args.repeats < 1 or args.new_tokens < 1 \
            or min(args.contexts) < 1:
        raise ValueError(f"--batch, --repeats, --new-tokens and --contexts must be >= 1, --windows >= 0 (0: every "
                         f"window of the split) and --length >= 2; "
                         f"got {args.windows}, {args.batch}, {args.repeats}, {args.new_tokens}, {args.contexts}, "
                         f"{args.length}")
    model, tok = load_model(args.model, dtype=args.dtype, device_map=args.device_map, device=args.device)
    limit = getattr(model.config.get_text_config(), "max_position_embeddings", None)
    longest = max([args.length] + (list(args.contexts) if args.reference else []))
    if limit is not None and longest + (args.new_tokens if args.reference else 0) > limit:
        raise ValueError(f"{args.model} has {limit} positions; --length {args.length} / --contexts {args.contexts} "
                         f"(plus {args.new_tokens} decoded tokens) go beyond it: ask for shorter ones")
    ev = token_windows(tok, args.corpus, args.split, args.length, args.windows or None, seed=args.seed + 1)
    res = {"model": str(args.model), "perplexity": perplexity(model, ev), **counts(model, args.length),
           "eval": {"corpus": args.corpus, "split": args.split, "windows": len(ev), "length": args.length,
                    "seed": args.seed}}
    print(f"{args.model}: perplexity {res['perplexity']['ppl']:.2f} on {len(ev)} {args.split} windows of "
          f"{args.length} tokens; attention params {res['params_attention']:,}; KV cache "
          f"{res['kv_bytes_per_token']} bytes/token")
    if args.reference:
        ref, _ = load_model(args.reference, dtype=args.dtype, device_map=args.device_map, device=args.device)
        res["reference"] = {"model": args.reference, "perplexity": perplexity(ref, ev), **counts(ref, args.length)}
        long = token_windows(tok, args.corpus, args.split, max(args.contexts), 1, seed=args.seed)
        res["speed"] = compare(ref, model, long, args.contexts, args.new_tokens, args.repeats, batch=args.batch)
        print(f"reference {args.reference}: perplexity {res['reference']['perplexity']['ppl']:.2f}")
        for c, v in res["speed"].items():
            stock = (f"; vs the stock model: decode {v['decode_speedup_vs_stock']:.2f}x, prefill "
                     f"{v['prefill_speedup_vs_stock']:.2f}x" if "decode_speedup_vs_stock" in v else "")
            print(f"context {c}, decode batch {args.batch}: decode {v['model']['decode_tok_s']:.1f} vs {v['reference']['decode_tok_s']:.1f} tok/s "
                  f"(speed-up {v['decode_speedup_measured']:.2f}x measured, {v['decode_speedup_predicted']:.2f}x "
                  f"by FLOPs, {v['decode_speedup_predicted_bytes']:.2f}x by memory traffic); prefill {v['model']['prefill_tok_s']:.0f} vs {v['reference']['prefill_tok_s']:.0f} "
                  f"tok/s ({v['prefill_speedup_measured']:.2f}x measured, {v['prefill_speedup_predicted']:.2f}x by "
                  f"FLOPs){stock}")
    if args.out:
        atomic_write_json(args.out, res)
    return 0


def cmd_export_gguf(args: argparse.Namespace) -> int:
    from headalloc.compression.export.gguf import export_gguf

    info = export_gguf(args.model, args.out, args.outtype, overwrite=args.overwrite, progress=True)
    empty = info["layers_without_attention"]
    print(f"wrote {info['path']} ({info['bytes'] / 2**20:.1f} MiB, {info['outtype']}, llama.cpp architecture "
          f"'{info['arch']}'): query heads per layer {info['head_count']}, key-value heads {info['head_count_kv']}"
          + (f"; no attention in layers {empty}" if empty else ""))
    print("run it with llama.cpp (llama-cli -m FILE), or check it here: headalloc check-gguf "
          f"{args.model} {info['path']}")
    return 0


def cmd_check_gguf(args: argparse.Namespace) -> int:
    from headalloc.compression.engine import check_gguf

    r = check_gguf(args.model, args.gguf, args.prompt, args.new_tokens)
    print(f"tokens: llama.cpp {'matches' if r['tokens_equal'] else 'DIFFERS FROM'} the model's tokenizer on the prompt")
    print(f"logits on {r['prompt_tokens']} prompt tokens: max |llama.cpp - PyTorch| = {r['max_abs_diff']:.2e} "
          f"(logit scale {r['logit_scale']:.1f}); greedy next tokens agree at {r['argmax_agree']:.0%} of positions")
    print(f"llama.cpp generates: {r['generated']!r}")
    return 0 if r["tokens_equal"] else 1


def _add_load_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--device-map", default=None,
                   help="accelerate placement passed to from_pretrained, e.g. 'auto' (models too large for one device)")
    p.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16", "float16"],
                   help="weights' dtype when loading ('auto': the checkpoint's)")
    p.add_argument("--device", default=None, help="e.g. 'cuda' (default: CPU)")


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="headalloc", description=__doc__.splitlines()[0])
    sub = ap.add_subparsers(dest="command", required=True)

    p = sub.add_parser("plan", help="optimal allocation of heads and head dimensions for a budget")
    p.add_argument("--budget", type=int, required=True, help="total budget D = sum_m H_m d_m")
    p.add_argument("--token-dim", type=int, required=True, help="token dimension d")
    p.add_argument("--rho", type=_floats, required=True, help="lag weights |rho_1|,|rho_2|,...")
    p.add_argument("--B", type=float, default=1.0, help="input norm bound B")
    p.add_argument("--top", type=int, default=5, help="how many allocations to list (optimum + runners-up)")
    p.add_argument("--at-most", action="store_true", help="solve sum H_m d_m <= D instead of == D")
    p.add_argument("--head-dims", type=_ints, default=None, help="allowed head dimensions, e.g. 8,16,32,64")
    p.add_argument("--max-heads", type=int, default=None, help="cap on heads per group")
    p.add_argument("--max-groups", type=int, default=None, help="cap on the number of groups M")
    p.add_argument("--json", action="store_true", help="print JSON")
    p.add_argument("--plot", default=None, metavar="FILE", help="draw the bound against heads per group")
    p.set_defaults(fn=cmd_plan)

    p = sub.add_parser("reproduce", help="run the registered experiments and write the report")
    p.add_argument("--out", default="results", help="output folder (results, figures, report.html)")
    p.add_argument("--quick", action="store_true", help="minutes on a laptop instead of the paper-scale run")
    p.add_argument("--only", default=None, help="comma-separated experiment names (see `headalloc list`)")
    p.add_argument("--force", action="store_true", help="recompute finished experiments")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--executor", choices=["local", "ray"], default="local", help="where sweeps run")
    p.add_argument("--ray-address", default=None, help="address of an existing Ray cluster")
    p.add_argument("--fail-fast", action="store_true", help="stop at the first failing experiment")
    p.set_defaults(fn=cmd_reproduce)

    p = sub.add_parser("list", help="list the registered experiments")
    p.set_defaults(fn=cmd_list)

    p = sub.add_parser("report", help="redraw figures and the HTML report from stored results")
    p.add_argument("--out", default="results")
    p.add_argument("--only", default=None)
    p.set_defaults(fn=cmd_report)

    p = sub.add_parser("saturation", help="softmax-Jacobian norm per layer and head against context length")
    p.add_argument("--model", default="smollm2", help="smollm2, minilm, or a Hugging Face model directory")
    p.add_argument("--corpus", default="wiki", help="wiki, pydoc, or a text file")
    p.add_argument("--split", default="validation", choices=["train", "validation"])
    p.add_argument("--lengths", type=_ints, default=[4, 8, 16, 32, 64, 128, 256, 512, 1024])
    p.add_argument("--windows", type=int, default=8, help="windows of text per length")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default="results/saturation")
    p.set_defaults(fn=cmd_saturation)

    p = sub.add_parser("train", help="train one synthetic-task model from a JSON config")
    p.add_argument("--config", default=None, help="JSON file {task, model, train}; default: 4-gram H=8 (quick)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config entry, e.g. --set train.steps=200 --set model.positions=rotary")
    p.add_argument("--out", default=None, help="write config and result (JSON) here")
    p.set_defaults(fn=cmd_train)

    p = sub.add_parser("sweep", help="run a list of configs into a resumable SQLite store")
    p.add_argument("--config", default=None, help="JSON file with a list of run configs")
    p.add_argument("--preset", default=None, help="fourgram or dretrieval (the reproduce sweeps)")
    p.add_argument("--quick", action="store_true", help="with --preset: the quick settings")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override in every config")
    p.add_argument("--store", default="results/sweep.sqlite", help="SQLite file (finished runs are skipped)")
    p.add_argument("--fn", dest="run_fn", default="headalloc.training.runs:run_synthetic",
                   help="run function module:function")
    p.add_argument("--executor", choices=["local", "ray"], default="local")
    p.add_argument("--workers", type=int, default=1, help="local worker processes")
    p.add_argument("--ray-address", default=None, help="existing Ray cluster (default: start a local one)")
    p.set_defaults(fn=cmd_sweep)

    from headalloc.compression.planning import AUTO, AUTO_DESCRIPTION, STRATEGIES
    from headalloc.compression.settings import PRESETS, add_config_args

    strategies = "; ".join([f"{AUTO} (default): {AUTO_DESCRIPTION}"] +
                           [f"{k}: {v.description.rstrip('.')}" for k, v in STRATEGIES.items()])
    p = sub.add_parser("compress", help="compress a model's attention to a budget, distil, save a loadable folder",
                       description="Compress the attention of a LLaMA, Mistral, Qwen2, Qwen3 or Phi-3 model to a "
                                   "budget. Strategies: " + strategies)
    p.add_argument("--out", default="results/compressed", help="folder for the saved model (refused if it exists "
                                                               "and was not written by headalloc)")
    p.add_argument("--overwrite", action="store_true", help="replace --out if it holds an earlier headalloc model")
    p.add_argument("--preset", choices=list(PRESETS), default=None, help="named settings that the flags below override (default: default)")
    p.add_argument("--quick", action="store_true", help="the quick preset: smaller calibration, distillation, "
                                                        "evaluation")
    add_config_args(p, choices={"strategy": [AUTO, *STRATEGIES]})
    p.set_defaults(fn=cmd_compress)

    p = sub.add_parser("evaluate", help="perplexity, counts, KV bytes, FLOPs and speed against a reference")
    p.add_argument("--model", required=True, help="a saved (compressed) model directory or a name")
    p.add_argument("--reference", default=None, help="model to compare speed with, e.g. smollm2")
    p.add_argument("--corpus", default="wiki")
    p.add_argument("--split", default="validation", choices=["validation", "train", "all"],
                   help="which part of the corpus ('all' for a held-out kind of text such as alice or pydoc, "
                        "which nothing is fitted on)")
    p.add_argument("--windows", type=int, default=16, help="windows drawn with --seed (0: every window, in order)")
    p.add_argument("--length", type=int, default=512)
    p.add_argument("--contexts", type=_ints, default=[1024, 4096])
    p.add_argument("--new-tokens", type=int, default=32)
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--batch", type=int, default=1,
                   help="sequences decoded together (share the prompt's cache); tok/s counts all of them")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default=None, help="write the results here (JSON)")
    _add_load_args(p)
    p.set_defaults(fn=cmd_evaluate)

    p = sub.add_parser("export-gguf", help="write a compressed (or original) model as GGUF for llama.cpp",
                       description="Write a model that `headalloc compress --target llamacpp` saved (or an original "
                                   "LLaMA/Mistral/Qwen2/Phi-3 folder, or 'smollm2') as a GGUF file in llama.cpp's "
                                   "'deci' architecture: per-layer query and key-value head counts, so llama.cpp "
                                   "sizes each layer's KV cache from them. A plan that llama.cpp cannot run is "
                                   "refused with the reason.")
    p.add_argument("model", help="a saved model folder, or 'smollm2'")
    p.add_argument("out", help="the .gguf file to write (refused if it exists, unless --overwrite)")
    p.add_argument("--outtype", default="f32", choices=["f32", "f16", "q8_0"],
                   help="weights' type in the file (norms stay f32; default: f32)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing output file")
    p.set_defaults(fn=cmd_export_gguf)

    p = sub.add_parser("check-gguf", help="load a GGUF in llama.cpp and compare it with the PyTorch model",
                       description="Needs llama-cpp-python (pip install 'headalloc[llamacpp]'). Compares the "
                                   "tokenisation and the logits on a prompt, and generates a few tokens.")
    p.add_argument("model", help="the folder (or 'smollm2') the GGUF was exported from")
    p.add_argument("gguf", help="the .gguf file")
    p.add_argument("--prompt", default="The history of the city begins in the twelfth century, when")
    p.add_argument("--new-tokens", type=int, default=16)
    p.set_defaults(fn=cmd_check_gguf)

    return ap




def main(argv: list[str] | None = None) -> int:
    ap = build_parser()
    args = ap.parse_args(argv)
    try:
        return int(args.fn(args) or 0)
    except (ValueError, OSError) as e:  # bad input, missing or unwritable files: one line, no traceback
        print(f"headalloc {args.command}: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
