"""Benchmark: saved compressed models measured again on whole texts, with intervals over windows.

`headalloc compress` and `bench_compress.py` measure a few windows of each text (16 Wikipedia validation windows,
12 of each held-out kind by default) so that one budget fits in 20 minutes; a ratio from 12 windows can move by
several percent with the windows drawn. This measures saved models (`bench_compress.py --save-dir`, or
`headalloc compress --out`) against the original on every window of each text (or a sample of them), side by side
in one run, and prints each perplexity ratio with a paired bootstrap interval over windows.

    .venv/bin/python benchmarks/bench_saved_heldout.py DIR [DIR ...]                 # every window of alice and pydoc, 64 Wikipedia
    .venv/bin/python benchmarks/bench_saved_heldout.py DIR --texts alice:all:0 --out r.json
    .venv/bin/python benchmarks/bench_saved_heldout.py --from r.json --quarters   # where the loss is, from a saved run

`--quarters` splits each text's windows into four by the original's loss on them (easiest first) and prints how
many nats a window the model loses in each quarter: whether compression costs most where the original is surest.
"""

import argparse
import time
from pathlib import Path

from headalloc.assets import load_model, token_windows
from headalloc.evaluation.lm import cached_perplexity, paired_ratio_interval, perplexity
from headalloc.io import atomic_write_json


def parse_texts(spec: str) -> list[tuple[str, str, int]]:
    """'wiki:validation:64,alice:all:0' -> [(corpus, split, windows)]; windows 0 = every window."""
    out = []
    for part in spec.split(","):
        bits = part.strip().split(":")
        if len(bits) != 3 or not bits[2].isdigit():
            raise SystemExit(f"--texts: {part!r} is not corpus:split:windows (e.g. alice:all:0, wiki:validation:64)")
        out.append((bits[0], bits[1], int(bits[2])))
    return out


def quarters(base_nll, model_nll, parts: int = 4) -> list[tuple[float, float]]:
    """(the original's mean window loss, the model's mean loss increase) in each of `parts` groups of windows ordered
    by the original's loss, easiest first (nats per window)."""
    import numpy as np

    b, m = np.asarray(base_nll, dtype=float), np.asarray(model_nll, dtype=float)
    if b.shape != m.shape or len(b) < parts:
        raise SystemExit(f"--quarters needs the same windows for both, at least {parts}; got {len(b)} and {len(m)}")
    return [(float(b[i].mean()), float((m[i] - b[i]).mean())) for i in np.array_split(np.argsort(b), parts)]


def print_quarters(res: dict) -> None:
    print("\nnats lost a window, by quarter of the original's loss (easiest first; the original's mean loss in brackets)")
    for d, row in res["models"].items():
        for k, v in row.items():
            q = quarters(res["texts"][k]["window_nll"], v["window_nll"])
            print(f"{d[-40:]:40s} {k:>16s} " + "  ".join(f"{lost:6.1f} ({orig:.0f})" for orig, lost in q))


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("models", nargs="*", help="saved model folders")
    ap.add_argument("--reference", default="smollm2", help="the original the ratios are to")
    ap.add_argument("--texts", default="wiki:validation:64,alice:all:0,pydoc:all:0",
                    help="corpus:split:windows, comma-separated (windows 0: every window, in order)")
    ap.add_argument("--length", type=int, default=512)
    ap.add_argument("--seed", type=int, default=0, help="draws the windows when a text asks for a sample")
    ap.add_argument("--level", type=float, default=0.9, help="the intervals' coverage")
    ap.add_argument("--out", default=None, help="also write every figure here (JSON, atomically)")
    ap.add_argument("--quarters", action="store_true", help="also print the loss by quarter of the original's loss")
    ap.add_argument("--from", dest="source", default=None,
                    help="read a previous run's --out file instead of measuring (with --quarters)")
    a = ap.parse_args()
    if a.source:
        import json

        try:
            print_quarters(json.loads(Path(a.source).read_text()))
        except (OSError, ValueError, KeyError) as e:
            raise SystemExit(f"--from {a.source}: not a readable --out file of this benchmark ({e})") from None
        return
    if not a.models:
        raise SystemExit("give one or more saved model folders (or --from FILE --quarters)")
    texts = parse_texts(a.texts)
    if not 0 < a.level < 1 or a.length < 2:
        raise SystemExit(f"--level must be in (0, 1) and --length >= 2; got {a.level}, {a.length}")
    from headalloc.assets.models import resolve_model

    for d in a.models:  # every folder exists and holds a config before the original's passes
        try:
            resolve_model(d)
        except FileNotFoundError as e:
            raise SystemExit(str(e)) from None
    ref, tok = load_model(a.reference)
    windows = {f"{c}:{s}": token_windows(tok, c, s, a.length, n or None, seed=a.seed) for c, s, n in texts}
    t0 = time.time()
    base = {k: cached_perplexity(ref, w, desc=f"original {k}") for k, w in windows.items()}
    print(f"original {a.reference}: " + "; ".join(f"{k} {v['ppl']:.2f} ({len(windows[k])} windows of {a.length})"
                                              for k, v in base.items()) + f"  [{time.time() - t0:.0f} s]", flush=True)
    res = {"reference": a.reference, "length": a.length, "seed": a.seed, "level": a.level,
           "texts": {k: {"windows": len(w), "ppl": base[k]["ppl"], "window_nll": list(base[k]["window_nll"])}
                     for k, w in windows.items()}, "models": {}}
    for d in a.models:
        model, _ = load_model(d)
        row = {}
        t0 = time.time()
        for k, w in windows.items():
            got = perplexity(model, w, desc=f"{Path(d).name} {k}")
            row[k] = {"ppl": got["ppl"], **paired_ratio_interval(got["window_nll"], base[k]["window_nll"],
                                                                 a.length - 1, a.level, seed=a.seed),
                      "window_nll": list(got["window_nll"])}
        res["models"][d] = row
        print(f"{d}: " + "; ".join(f"{k} {v['ppl']:.2f} = {v['ratio']:.3f}x [{v['low']:.3f}, {v['high']:.3f}]"
                                   for k, v in row.items()) + f"  [{time.time() - t0:.0f} s]", flush=True)
        del model
    names = list(windows)
    print(f"\n{'model':40s} " + " ".join(f"{k:>24s}" for k in names) +
          f"   (ratio to the original, {a.level:.0%} paired bootstrap interval over windows)")
    for d, row in res["models"].items():
        print(f"{d[-40:]:40s} " + " ".join(f"{row[k]['ratio']:6.3f}x [{row[k]['low']:.3f}, {row[k]['high']:.3f}]"
                                          for k in names))
    if a.out:  # before anything else can fail
        atomic_write_json(a.out, res)
    if a.quarters:
        print_quarters(res)


if __name__ == "__main__":
    from headalloc.reports.ledger import recorded

    with recorded("benchmark", "bench_saved_heldout"):
        main()
