"""Benchmark: end-to-end distillation steps in float32 against bfloat16 autocast (`--kd-autocast bfloat16`).

The end-to-end stage is most of a default compression's time. This times its step (a forward and a backward
pass through SmolLM2 on one window of 256 tokens, the attention projections trained, the top-k distillation loss)
both ways, interleaved in one process so the machine's load hits both alike, and prints the ratio. It also runs
the same steps from the same start on the same windows both ways and prints both loss curves (what mixed precision
costs in accuracy; the whole-pipeline effect is measured by
`bench_compress.py --kd-autocast bfloat16`). Whether bfloat16 is faster depends on the hardware: on CPUs with
bfloat16 matrix units (AMX, AVX512-BF16) and on GPUs it is; elsewhere it can be slower.

    python benchmarks/bench_autocast.py [--steps 6] [--rounds 3] [--device cpu]
"""

from __future__ import annotations

import argparse
import time

import torch

from headalloc.assets import load_model, token_windows
from headalloc.compression.distill import distill_end_to_end, teacher_topk
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


if __name__ == "__main__":
    main()
