"""Softmax saturation on real models (arXiv 2510.03784, Theorem 2): ||J||_2 against context length."""

from __future__ import annotations

from pathlib import Path

from headalloc.experiments.registry import Experiment, RunContext, register

SETTINGS = {
    "smollm2": {"quick": dict(lengths=[4, 8, 16, 32, 64, 128, 256], n_windows=4),
                "full": dict(lengths=[4, 8, 16, 32, 64, 128, 256, 512, 1024], n_windows=16)},
    "minilm": {"quick": dict(lengths=[4, 8, 16, 32, 64, 128], n_windows=4),
               "full": dict(lengths=[4, 8, 16, 32, 64, 128, 256, 512], n_windows=16)},
}


def _compute(model_name: str):
    def compute(ctx: RunContext) -> dict:
        from headalloc.assets import load_model
        from headalloc.probe.saturation import measure_saturation

        s = SETTINGS[model_name][ctx.scale]
        model, tok = load_model(model_name)
        rec = measure_saturation(model, tok, "wiki", s["lengths"], s["n_windows"], seed=ctx.seed, split="validation")
        rec["config"] = {"model": model_name, "corpus": "wiki", "split": "validation", "seed": ctx.seed, **s,
                         "attn_implementation": model.config._attn_implementation}
        return rec
    return compute


def _plot(model_name: str):
    def plot(rec: dict, out: Path) -> list[Path]:
        from headalloc.reports.figures import plot_saturation, plot_slopes

        return plot_saturation(rec, out / "jacobian_norm_vs_L.png", out / "logit_spread_vs_L.png", model_name) + [
            plot_slopes(rec, out / "slope_per_head.png", model_name)]
    return plot


def table(rec: dict) -> list[dict]:
    from headalloc.probe.saturation import saturation_verdict

    v = saturation_verdict(rec)
    L = rec["lengths"]
    norm0 = sum(map(sum, rec["norm_mean"][0])) / (rec["n_layers"] * rec["n_heads"])
    norm1 = sum(map(sum, rec["norm_mean"][-1])) / (rec["n_layers"] * rec["n_heads"])
    return [
        {"quantity": f"mean ||J|| at L={L[0]} -> L={L[-1]}", "paper": "clear fall with L",
         "measured": f"{norm0:.4f} -> {norm1:.4f}", "match": norm1 < norm0},
        {"quantity": "log-log slope, mean over layers", "paper": "-1 (O(1/L))",
         "measured": f"{rec['slope_model']:.2f}", "match": rec["slope_model"] <= -0.9},
        {"quantity": "layers whose norm falls with L", "paper": "all",
         "measured": f"{v['layers_falling']} / {v['layers']}", "match": v["layers_falling"] == v["layers"]},
        {"quantity": "layers at the 1/L rate (slope <= -0.9)", "paper": "all",
         "measured": f"{v['layers_at_1_over_L']} / {v['layers']}", "match": v["layers_at_1_over_L"] == v["layers"]},
        {"quantity": "per-layer slopes (min / median / max)", "paper": "",
         "measured": f"{v['slope_min']:.2f} / {v['slope_median']:.2f} / {v['slope_max']:.2f}", "match": None},
        {"quantity": "logit spread log-log slope", "paper": "grows with L (ICLR Fig. 10)",
         "measured": f"{rec['slope_spread_model']:.2f}", "match": rec["slope_spread_model"] > 0},
        {"quantity": "Jacobian time / forward time", "paper": "", "match": None,
         "measured": f"{rec['seconds_jacobian'] / max(rec['seconds_forward'], 1e-9):.3f}"},
    ]


register(Experiment(
    name="saturation_smollm2", title="Softmax saturation in SmolLM2-135M on Wikipedia",
    description="||diag(p)-pp^T||_2 per layer and head against context length L, full-context query rows "
                "(row L-1 of each window), held-out Wikipedia text.",
    compute=_compute("smollm2"), plot=_plot("smollm2"), table=table, order=30, tags=("saturation",)))

register(Experiment(
    name="saturation_minilm", title="Softmax saturation in all-MiniLM-L6-v2 on Wikipedia",
    description="The same measurement on a bidirectional encoder without RoPE, every query row, up to L=512.",
    compute=_compute("minilm"), plot=_plot("minilm"), table=table, order=31, tags=("saturation",)))


# ---------------------------------------------------------------- both readings, with and without sinks
READING_SETTINGS = {
    "smollm2": {"quick": dict(lengths=[16, 64, 256], n_windows=2),
                "full": dict(lengths=[16, 32, 64, 128, 256, 512, 1024], n_windows=8)},
    "minilm": {"quick": dict(lengths=[16, 64, 256], n_windows=2),
               "full": dict(lengths=[16, 32, 64, 128, 256, 512], n_windows=8)},
}
READINGS_CORPUS = "pydoc"  # long single documents: no Wikipedia lead reaches 512 tokens (longest 474)
# our own decoder: lm_allocation's uniform model (6 layers of 4 heads of 32, rotary, trained on Wikipedia with
# 128-token windows), trained here with lm_allocation's settings of the same scale; its context is 128
OWN_DECODER_LENGTHS = {"quick": [16, 32, 64, 128], "full": [8, 16, 32, 64, 128]}
OWN_DECODER_WINDOWS = {"quick": 8, "full": 32}


def own_decoder(ctx: RunContext):
    """Train (or load, when an earlier run saved it) the lm_allocation uniform decoder of this scale."""
    from transformers import PreTrainedTokenizerFast

    from headalloc.experiments.lm_allocation import configs as lm_configs
    from headalloc.models import load_seqmodel
    from headalloc.tasks.lm import train_tokenizer
    from headalloc.training.runs import run_lm

    save = ctx.out_dir / "own_decoder"
    cfg = next(c for c in lm_configs(ctx.scale, save_dir=save) if c.get("save_dir"))
    info = {"config": cfg}
    try:  # kept from an earlier run (it was written whole or not at all)
        model, meta = load_seqmodel(save)
    except (FileNotFoundError, ValueError) as e:  # absent, or damaged: train it (again)
        if not isinstance(e, FileNotFoundError):
            print(f"retraining our decoder: {e}", flush=True)
        info["training"] = {k: v for k, v in run_lm(cfg, progress=True).items() if k != "curve"}
        model, meta = load_seqmodel(save)
    tok = PreTrainedTokenizerFast(tokenizer_object=train_tokenizer(meta["corpus"], meta["vocab_size"]))
    return model.eval(), tok, info


def compute_readings(ctx: RunContext) -> dict:
    from headalloc.assets import load_model
    from headalloc.assets.corpus import document_windows
    from headalloc.probe.saturation import measure_saturation_readings

    out = {"config": {"corpus": READINGS_CORPUS, "split": "all", "seed": ctx.seed,
                      "settings": {m: s[ctx.scale] for m, s in READING_SETTINGS.items()},
                      "windows": "each window from inside one document of CPython's language reference (no "
                                 "separator inside; Wikipedia has no article of 512 tokens), one per document",
                      "own_decoder": "lm_allocation's uniform decoder of the same scale (context 128), windows "
                                     "tokenised with its own Wikipedia BPE"},
           "models": {}}
    def once(name: str, settings: dict, measure) -> None:
        """Each model's readings are kept in their own file as soon as they are done (an interrupted full run
        resumes at the next model); a file made with other settings is recomputed."""
        from headalloc.io import atomic_write_json, read_json

        path = ctx.out_dir / f"readings_{name}.json"
        if path.is_file():
            try:
                kept = read_json(path)
                if kept.get("settings") == settings and kept.get("seed") == ctx.seed:
                    out["models"][name] = kept["readings"]
                    return
            except (ValueError, KeyError, AttributeError):
                pass  # damaged: measure again
        out["models"][name] = measure()
        atomic_write_json(path, {"settings": settings, "seed": ctx.seed, "readings": out["models"][name]})

    for name, s in READING_SETTINGS.items():
        s = s[ctx.scale]

        def hf(name=name, s=s):
            model, tok = load_model(name, attn_implementation="eager")
            w = document_windows(tok, READINGS_CORPUS, "all", max(s["lengths"]), s["n_windows"], seed=ctx.seed)
            return measure_saturation_readings(model, tok, w, s["lengths"])
        once(name, s, hf)

    def own():
        model, tok, info = own_decoder(ctx)
        lengths = OWN_DECODER_LENGTHS[ctx.scale]
        w = document_windows(tok, READINGS_CORPUS, "all", max(lengths), OWN_DECODER_WINDOWS[ctx.scale],
                             seed=ctx.seed)
        return {**measure_saturation_readings(model, tok, w, lengths), "decoder": info}
    once("own_decoder", {"lengths": OWN_DECODER_LENGTHS[ctx.scale], "n_windows": OWN_DECODER_WINDOWS[ctx.scale]},
         own)
    return out


def plot_readings(rec: dict, out: Path) -> list[Path]:
    from headalloc.reports.figures import plot_saturation_readings

    return [plot_saturation_readings(rec, out / "saturation_readings.png")]


def table_readings(rec: dict) -> list[dict]:
    rows = []
    for name, r in rec["models"].items():
        for key, v in r["readings"].items():
            reading, rows_, sinks = key.split("|")
            rows.append({"quantity": f"{name}: {reading}, {rows_} rows, {sinks} sinks: log-log slope (layers at 1/L)",
                         "paper": "-1 (O(1/L))",
                         "measured": f"{v['slope_model']:+.2f} ({v['layers_at_1_over_L']}/{r['n_layers']}; falling "
                                     f"{v['layers_falling']})",
                         "match": v["slope_model"] <= -0.9})
    rows.append({"quantity": "note", "paper": "", "match": None,
                 "measured": "the column average is at most sqrt(2)/L for every softmax (sum_l ||J e_l|| <= "
                             "sqrt(2) sum_l p_l (1 - p_l) <= sqrt(2)): its 1/L fall holds for any attention"})
    return rows


register(Experiment(
    name="saturation_readings", title="Softmax saturation: both readings of the paper's Jacobian, with and without sinks",
    description="Per layer, against context L on long single-document windows: the row Jacobian norm "
                "||diag(p)-pp^T||_2 and the per-key column sensitivity ||dp/dz_l|| (mean and max over keys), for the "
                "last query row and all rows, with and without attention-sink keys; SmolLM2, MiniLM and our own "
                "trained decoder.",
    compute=compute_readings, plot=plot_readings, table=table_readings, order=32, tags=("saturation",)))
