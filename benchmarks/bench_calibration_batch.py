"""Benchmark: the teacher passes over the end-to-end windows, one window per forward against several.

A default compression runs the original model over its 600 end-to-end fitting windows once (the whitening moments
and the top-k distillation targets from the same pass; `calibration.collect`); on 2 CPU cores that is a third of a
default run. This times that pass on real text at `--batch` windows per forward against one, the two interleaved in
one process so the machine's load hits both alike, prints the ratio, and checks that both give the same top-k
targets and moments (the batched pass is what `pipeline.prepare` runs).

    python benchmarks/bench_calibration_batch.py [--windows 16] [--batch 4] [--rounds 3] [--device cpu]
"""

from __future__ import annotations

import argparse
import time

import torch

from headalloc.assets import load_model, token_windows
from headalloc.compression.calibration import collect
from headalloc.compression.distill import TopKTargets


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--windows", type=int, default=16, help="windows of 256 tokens per timed block")
    ap.add_argument("--batch", type=int, default=4, help="windows per forward in the batched pass")
    ap.add_argument("--rounds", type=int, default=3, help="interleaved blocks of each")
    ap.add_argument("--device", default="cpu")
    a = ap.parse_args()
    teacher, tok = load_model("smollm2", device=a.device)
    w = token_windows(tok, "wiki", "train", 256, a.windows, seed=0)

    def block(batch):
        top = TopKTargets(32)
        t = time.perf_counter()
        cal = collect(teacher, w, keep=False, batch=batch, outputs=True, on_logits=top)
        return (time.perf_counter() - t) / a.windows, cal, top.result()

    times = {1: [], a.batch: []}
    for _ in range(a.rounds):
        for b in times:
            times[b].append(block(b)[0])
    _, c1, t1 = block(1)
    _, cb, tb = block(a.batch)
    best = {b: min(v) for b, v in times.items()}
    print(f"SmolLM2 teacher passes with moments and top-32 targets, {a.windows} Wikipedia windows of 256 per block, "
          f"{a.rounds} interleaved blocks on {a.device} with {torch.get_num_threads()} threads (best block; every "
          f"block in brackets)")
    for b, v in times.items():
        print(f"  {b} window(s) per forward: {best[b]:.3f} s/window  ({', '.join(f'{x:.3f}' for x in v)})")
    print(f"  {a.batch} per forward: {best[1] / best[a.batch]:.2f}x the rate of one")
    rel = max(float((x - y).norm() / x.norm()) for x, y in zip(c1.second_moment, cb.second_moment))
    same = torch.equal(t1["ids"], tb["ids"])
    print(f"  same top-k token ids: {same}; largest relative difference of a layer's moment: {rel:.1e}; "
          f"largest probability difference: {float((t1['probs'] - tb['probs']).abs().max()):.1e}")


if __name__ == "__main__":
    from headalloc.reports.ledger import recorded

    with recorded("benchmark", "bench_calibration_batch"):
        main()
