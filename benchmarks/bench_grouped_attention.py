"""Benchmark: forward+backward throughput of grouped-head attention against a uniform multi-head
layer of the same total width, timed side by side (interleaved) in one run.

Issue target: with up to 4 groups, at least 0.8 of the uniform layer's throughput.

    .venv/bin/python benchmarks/bench_grouped_attention.py [--d-model 512 --T 256 --batch 8]
"""

import argparse
import time

import torch

from headalloc.models import GroupedAttention

ALLOCATIONS = {
    "uniform 8x64 (reference)": [(8, 64, 64)],
    "2 groups 4x64 + 8x32": [(4, 64, 64), (8, 32, 32)],
    "3 groups 2x64 + 8x32 + 8x16": [(2, 64, 64), (8, 32, 32), (8, 16, 16)],
    "4 groups 2x64 + 4x32 + 8x16 + 16x8 (paper style)": [(2, 64, 64), (4, 32, 32), (8, 16, 16), (16, 8, 8)],
    "4 groups of 2x64 (same shape, split)": [(2, 64, 64)] * 4,
    "uniform 32x16 (reference for many small heads)": [(32, 16, 16)],
}
# Each grouped allocation is compared with the uniform layer whose head count is closest: the
# softmax work grows with the number of heads (heads x T^2), whatever the grouping.
REFERENCE = {k: ("uniform 32x16 (reference for many small heads)" if sum(n for n, _, _ in g) > 16
                 else "uniform 8x64 (reference)") for k, g in ALLOCATIONS.items()}


def step(layer, x):
    layer.zero_grad(set_to_none=True)
    layer(x).square().mean().backward()


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--d-model", type=int, default=512)
    ap.add_argument("--T", type=int, default=256)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--iters", type=int, default=5)
    a = ap.parse_args()
    torch.manual_seed(0)
    layers = {k: GroupedAttention(a.d_model, g, causal=True) for k, g in ALLOCATIONS.items()}
    for k, g in ALLOCATIONS.items():
        assert sum(n * v for n, _, v in g) == a.d_model, k
    x = torch.randn(a.batch, a.T, a.d_model)
    for layer in layers.values():
        step(layer, x)  # warm-up
    best = {k: float("inf") for k in layers}
    for _ in range(a.rounds):  # interleave so machine noise hits every layer alike
        for k, layer in layers.items():
            t = time.perf_counter()
            for _ in range(a.iters):
                step(layer, x)
            best[k] = min(best[k], (time.perf_counter() - t) / a.iters)
    tokens = a.batch * a.T
    print(f"d_model={a.d_model}, T={a.T}, batch={a.batch}, threads={torch.get_num_threads()}, forward+backward")
    for k, t in best.items():
        ref = REFERENCE[k]
        heads = sum(n for n, _, _ in ALLOCATIONS[k])
        print(f"  {k:50s} {heads:3d} heads {tokens / t:8.0f} tok/s   ratio vs {ref.split(' (')[0]}: "
              f"{best[ref] / t:.2f}   vs uniform 8x64: {best['uniform 8x64 (reference)'] / t:.2f}")
    print("target: >= 0.80 for every allocation with up to 4 groups")


if __name__ == "__main__":
    from headalloc.reports.ledger import recorded

    with recorded("benchmark", "bench_grouped_attention"):
        main()
