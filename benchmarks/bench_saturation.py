"""Benchmark: exact softmax-Jacobian norm.

(1) O(L) secular-equation solver against torch.linalg.eigvalsh at L=512, same rows, one run
    (issue target: >= 100x).
(2) In the saturation measurement on SmolLM2 at L=1024: time of the Jacobian computation against
    the model's forward pass, measured side by side (issue target: < 10%).

    .venv/bin/python benchmarks/bench_saturation.py [--windows 2] [--skip-model]
"""

import argparse
import time

import torch

from headalloc.theory import softmax_jacobian_norm


def bench_solver(L: int = 512, rows: int = 256) -> None:
    g = torch.Generator().manual_seed(0)
    p = torch.softmax(3 * torch.randn(rows, L, generator=g, dtype=torch.float64), -1)
    J = torch.diag_embed(p) - p.unsqueeze(-1) * p.unsqueeze(-2)
    t = time.perf_counter()
    ref = torch.linalg.eigvalsh(J)[..., -1]
    t_eig = time.perf_counter() - t
    best = float("inf")
    for _ in range(3):
        t = time.perf_counter()
        got = softmax_jacobian_norm(p)
        best = min(best, time.perf_counter() - t)
    rel = ((got - ref).abs() / ref).max().item()
    print(f"L={L}, {rows} rows: eigvalsh {t_eig:.3f} s, secular solver {best:.4f} s, "
          f"speed-up {t_eig / best:.0f}x (target >= 100x), max rel. difference {rel:.1e}")


def bench_model(windows: int) -> None:
    from headalloc.assets import load_model
    from headalloc.probe.saturation import measure_saturation

    model, tok = load_model("smollm2")
    lengths = [4, 8, 16, 32, 64, 128, 256, 512, 1024]
    rec = measure_saturation(model, tok, "wiki", lengths, n_windows=windows, progress=False)
    ratio = rec["seconds_jacobian"] / rec["seconds_forward"]
    print(f"SmolLM2, {windows} windows of 1024 tokens, rows L-1 for L={lengths}: forward "
          f"{rec['seconds_forward']:.2f} s, Jacobian {rec['seconds_jacobian']:.3f} s, ratio {ratio:.3f} "
          f"(target < 0.10)")


if __name__ == "__main__":
    from headalloc.reports.ledger import recorded

    with recorded("benchmark", "bench_saturation"):
        ap = argparse.ArgumentParser()
        ap.add_argument("--windows", type=int, default=2)
        ap.add_argument("--skip-model", action="store_true")
        a = ap.parse_args()
        bench_solver()
        if not a.skip_model:
            bench_model(a.windows)
