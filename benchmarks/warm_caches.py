"""What a first `headalloc compress` pays beyond later runs, timed: drawing the fitting text (sampling the
generated part from the original, then cached on disk) and the original's perplexities (cached on disk).
Run it before timing `headalloc compress` with warm caches; the sum is the first run's extra.

    python benchmarks/warm_caches.py [--budget-kind kv] [any compress flag]
"""

import argparse
import time

from headalloc.assets.models import load_model
from headalloc.compression.fit_text import fit_windows
from headalloc.compression.pipeline import eval_windows, heldout_windows
from headalloc.compression.settings import add_config_args, config_from_args
from headalloc.evaluation.lm import cached_perplexity


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_config_args(ap)
    cfg = config_from_args(ap.parse_args()).validate()
    teacher, tok = load_model(cfg.model, dtype=cfg.runtime.dtype, device=cfg.runtime.device)
    t = time.time()
    fit_windows(teacher, tok, cfg, cfg.calib.windows, cfg.calib.length, cfg.runtime.seed)
    fit_windows(teacher, tok, cfg, cfg.kd.windows, cfg.kd.length, cfg.runtime.seed + 2)
    t1 = time.time()
    print(f"fitting text ({cfg.fit.text}, gen_batch {cfg.fit.gen_batch}): {t1 - t:.1f} s", flush=True)
    cached_perplexity(teacher, eval_windows(tok, cfg), desc="original ppl")
    for k, w in heldout_windows(tok, cfg).items():
        cached_perplexity(teacher, w, desc=k)
    print(f"original's perplexities: {time.time() - t1:.1f} s", flush=True)


if __name__ == "__main__":
    from headalloc.reports.ledger import recorded

    with recorded("benchmark", "warm_caches"):
        main()
