"""Benchmark: one-token decode of latent-cache models, absorbed against rebuilt, side by side.

A Palu-style layer caches rank-r latents of its keys and values; an MHA2MLA-style layer caches the kept rotary
part of its keys and one joint latent. Decoding can rebuild every cached key and value from the latents at each
step (what the general forward does), or read them in the latent ("absorbed": the attention weights times the
cached latents, then one up projection per step; for MLA also the query through the key up projection, so
nothing is rebuilt). Palu's keys must still be rebuilt: their rotary positions are applied after the up
projection. Both paths give the same logits (tests/test_latent.py); this measures their decode speed against the
original weights in the same runtime, for SmolLM2 with every layer at half the KV cache (Palu: key and value
ranks 96 of 192; MLA: 8 of 32 rotary pairs per kv head and a rank-144 latent). Speed does not depend on the
weight values, so the latents are fitted on two short calibration windows only.

    python benchmarks/bench_latent_decode.py [--contexts 1024,4096] [--batches 1,8] [--new-tokens 8] [--repeats 2]
"""

from __future__ import annotations

import argparse
import copy
import time

import torch

from headalloc.assets import load_model, token_windows
from headalloc.compression.calibration import collect
from headalloc.compression.modeling_headalloc import LatentAttention, MLAAttention
from headalloc.compression.reduce import Geometry, compress_model
from headalloc.compression.spec import LayerPlan, Plan
from headalloc.evaluation.lm import same_runtime, speed
from headalloc.compression.modeling_headalloc import CACHE_NAME  # 'cache' from transformers 5.24


def rebuilt(model):
    """A copy whose latent layers decode by rebuilding keys and values (the general forward)."""
    out = copy.deepcopy(model)
    for mod in out.modules():
        if isinstance(mod, (LatentAttention, MLAAttention)):
            mod.decode_fast_path = False
    return out


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--contexts", default="1024,4096")
    ap.add_argument("--batches", default="1,8")
    ap.add_argument("--new-tokens", type=int, default=8)
    ap.add_argument("--repeats", type=int, default=2)
    a = ap.parse_args()
    t0 = time.perf_counter()
    m, tok = load_model("smollm2")
    g = Geometry.of(m)
    data = collect(m, token_windows(tok, "wiki", "train", 64, 2, seed=0))
    hd = g.head_dim
    palu = compress_model(m, Plan([LayerPlan(hd, hd, kind="palu", rank_k=96, rank_v=96)] * g.n_layers), data).eval()
    mla = compress_model(m, Plan([LayerPlan(hd, hd, kind="mla", rank=144, rope_keep=8)] * g.n_layers), data).eval()
    models = {"original": same_runtime(m).eval(), "palu rebuilt": rebuilt(palu), "palu absorbed": palu,
              "mla rebuilt": rebuilt(mla), "mla absorbed": mla}
    contexts = [int(c) for c in a.contexts.split(",")]
    ids = token_windows(tok, "wiki", "validation", max(contexts), 1, seed=0)
    with torch.no_grad():  # the two decode paths agree (the tests check it on every family; here on SmolLM2)
        for name in ("palu", "mla"):
            x = ids[:, :64]
            fast, slow = models[f"{name} absorbed"], models[f"{name} rebuilt"]
            outs = []
            for mod in (fast, slow):
                o = mod(x[:, :-1], use_cache=True)
                outs.append(mod(x[:, -1:], **{CACHE_NAME: getattr(o, CACHE_NAME)}, use_cache=True).logits)
            print(f"{name}: max |logit difference| absorbed vs rebuilt, one decode step after 63 tokens: "
                  f"{float((outs[0] - outs[1]).abs().max()):.2e}")
    kv = {k: mod.kv_cache_bytes_per_token() if hasattr(mod, "kv_cache_bytes_per_token") else None
          for k, mod in models.items()}
    print(f"KV bytes per token: " + ", ".join(f"{k} {v:,}" for k, v in kv.items() if v))
    print(f"\ndecode tokens/s as a ratio to the original weights in the same runtime ({a.new_tokens} greedy steps "
          f"after a one-sequence prefill, best of {a.repeats} interleaved runs, {torch.get_num_threads()} threads)")
    print(f"{'context, batch':<16}" + "".join(f"{k:>15}" for k in models))
    for b in (int(x) for x in a.batches.split(",")):
        with torch.no_grad():
            r = speed(models, ids, contexts=contexts, new_tokens=a.new_tokens, repeats=a.repeats, batch=b)
        for c in contexts:
            base = r["original"][str(c)]["decode_tok_s"]
            print(f"{f'{c}, {b}':<16}" + "".join(f"{r[k][str(c)]['decode_tok_s'] / base:>14.2f}x" for k in models)
                  + f"   (original {base:.1f} tok/s)", flush=True)
    print(f"\n{time.perf_counter() - t0:.0f} s")


if __name__ == "__main__":
    from headalloc.reports.ledger import recorded

    with recorded("benchmark", "bench_latent_decode"):
        main()
