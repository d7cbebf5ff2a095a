"""Benchmark: the fitting's heavy passes in float32 against bfloat16 autocast (the `--autocast` setting).

The end-to-end stage is most of a default compression's time. This times its step (a forward and a backward
pass through SmolLM2 on one window of 256 tokens, the attention projections trained, the top-k distillation loss)
both ways, interleaved in one process so the machine's load hits both alike, and prints the ratio. It also runs
the same steps from the same start on the same windows both ways and prints both loss curves (what mixed precision
costs in accuracy; the whole-pipeline effect is measured by
`bench_compress.py --autocast bfloat16` against `--autocast none`). It times the other heavy pass the setting covers
the same way: the original's forward over the end-to-end windows (4 per forward) with the whitening moments and top-k
targets gathered, and prints how far the bfloat16 pass's targets and moments are from the float32 pass's. Whether bfloat16 is faster depends on the hardware: on CPUs with
bfloat16 matrix units (AMX, AVX512-BF16) and on GPUs it is; elsewhere it can be slower.

    python benchmarks/bench_autocast.py [--steps 6] [--rounds 3] [--device cpu]
"""

from __future__ import annotations

import argparse
import time

import torch

from headalloc.assets import load_model, token_windows
from headalloc.compression.calibration import collect
from headalloc.compression.distill import TopKTargets, distill_end_to_end, teacher_topk
from headalloc.compression.precision import autocast_context
from headalloc.compression.reduce import Geometry, compress_model


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--steps", type=int, default=6, help="steps per timed block")
    ap.add_argument("--rounds", type=int, default=3, help="interleaved float32 / bfloat16 blocks")
    ap.add_argument("--device", default="cpu")
    a = ap.parse_args()
    teacher, tok = load_model("smollm2", device=a.device)
    w = token_windows(tok, "wiki", "train", 256, a.steps, seed=0)
    targets = teacher_topk(teacher, w, 32, progress=False)
    full = Geometry.of(teacher).full()

    def fresh():
        return compress_model(teacher, [full] * Geometry.of(teacher).n_layers)  # every head kept: the real step cost

    def block(student, autocast):
        t = time.perf_counter()
        r = distill_end_to_end(teacher, student, w, a.steps, 3e-4, 1, 32, 0, False, targets=targets, tail=True,
                               report_windows=1, autocast=autocast)
        return (time.perf_counter() - t) / a.steps, r

    times = {"none": [], "bfloat16": []}
    for _ in range(a.rounds):
        for ac in ("none", "bfloat16"):
            times[ac].append(block(fresh(), ac)[0])
    s32, s16 = fresh(), fresh()
    _, r32 = block(s32, "none")
    _, r16 = block(s16, "bfloat16")
    best = {k: min(v) for k, v in times.items()}
    print(f"SmolLM2, one window of 256 tokens per step, attention trained, {a.steps} steps x {a.rounds} interleaved "
          f"blocks on {a.device} with {torch.get_num_threads()} threads (best block; every block in brackets)")
    for k, v in times.items():
        print(f"  {k:9s} {best[k]:.3f} s/step  ({', '.join(f'{x:.3f}' for x in v)})")
    print(f"  bfloat16 autocast: {best['none'] / best['bfloat16']:.2f}x the float32 step rate")
    c32, c16 = r32["train_curve"], r16["train_curve"]
    print(f"  same {a.steps} steps from the same start: training loss per step, float32 "
          f"{' '.join(f'{x:.4f}' for x in c32)}; bfloat16 {' '.join(f'{x:.4f}' for x in c16)}; loss after (first window) "
          f"{r32['loss_after']:.4f} vs {r16['loss_after']:.4f}")

    # the original's pass over fitting windows (moments + top-k targets), as pipeline.prepare runs it
    wt = token_windows(tok, "wiki", "train", 256, 8, seed=1)

    def teacher_pass(autocast):
        top = TopKTargets(32)
        t = time.perf_counter()
        with torch.no_grad(), autocast_context(autocast, a.device):
            c = collect(teacher, wt, keep=False, batch=4, outputs=True, on_logits=top)
        return time.perf_counter() - t, c, top.result()

    passes = {"none": [], "bfloat16": []}
    for _ in range(a.rounds):
        for ac in passes:
            passes[ac].append(teacher_pass(ac))
    tb = {k: min(p[0] for p in v) for k, v in passes.items()}
    (_, m32, t32), (_, m16, t16) = passes["none"][0], passes["bfloat16"][0]
    rel = max(float((x - y).norm() / y.norm()) for x, y in zip(m16.second_moment, m32.second_moment))
    rel_o = max(float((x - y).norm() / y.norm()) for x, y in zip(m16.out_moment, m32.out_moment))
    agree = float((t16["ids"][..., 0] == t32["ids"][..., 0]).float().mean())
    print(f"the original's pass over {len(wt)} fitting windows of 256 (4 per forward; moments and top-32 targets), "
          f"{a.rounds} interleaved rounds (best; every round in brackets)")
    for k, v in passes.items():
        print(f"  {k:9s} {tb[k]:.2f} s  ({', '.join(f'{p[0]:.2f}' for p in v)})")
    print(f"  bfloat16 autocast: {tb['none'] / tb['bfloat16']:.2f}x the float32 rate; against float32: most likely "
          f"token the same at {agree:.1%} of positions, top-k mass {t16['mass']:.4f} vs {t32['mass']:.4f}, layer "
          f"inputs' second moments within {rel:.1e} and head outputs' within {rel_o:.1e} (relative, worst layer)")


if __name__ == "__main__":
    from headalloc.reports.ledger import recorded

    with recorded("benchmark", "bench_autocast"):
        main()
