"""Figures, each drawn from a stored result record (never by re-running the work)."""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from headalloc.io import save_figure  # noqa: E402


def plot_tradeoff_curve(rec: dict, path: Path, paper: dict[int, float] | None = None, title: str = "") -> Path:
    """Bound E_D and its parts against the number of heads, with the paper's points."""
    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    h = rec["heads"]
    ax.plot(h, rec["total"], label="bound E_D", color="k", lw=2)
    ax.plot(h, rec["dimension"], label="dimension term", ls="--")
    ax.plot(h, rec["selection"], label="selection term", ls=":")
    if paper:
        ax.scatter(list(paper), list(paper.values()), color="C3", zorder=5, label="paper (SPEC.md)")
    ax.axvline(rec["argmin_heads"], color="grey", lw=0.8)
    ax.set_xscale("log", base=2)
    ax.set_xlabel("heads H (head dim D/H)")
    ax.set_ylabel("error bound")
    ax.set_title(title)
    ax.legend()
    return save_figure(fig, path)


def plot_uniform_group_curve(rec: dict, path: Path) -> Path:
    """Bound for M equal groups of H heads against H, marking the solver's optimum."""
    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    hs = rec["uniform_heads_per_group"]
    ax.plot(hs, [c["total"] for c in rec["uniform_curve"]], marker="o", color="k", label="bound")
    ax.plot(hs, [c["dimension"] for c in rec["uniform_curve"]], ls="--", label="dimension term")
    ax.plot(hs, [c["selection"] for c in rec["uniform_curve"]], ls=":", label="selection term")
    best = rec["solution"]["best"]
    ax.axvline(best["groups"][0]["heads"], color="C3", lw=1, label="solver optimum")
    ax.set_xscale("log", base=2)
    ax.set_xlabel("heads per group H (4 groups, head dim 64/H)")
    ax.set_ylabel("error bound")
    ax.set_title(f"4-gram bound, D={rec['config']['budget']}, d={rec['config']['token_dim']}")
    ax.legend()
    return save_figure(fig, path)
