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


def plot_saturation(rec: dict, path_norm: Path, path_spread: Path, title: str = "") -> list[Path]:
    """||J||_2 against L per layer (log-log, 1/L reference) and logit spread against L."""
    import numpy as np

    L = np.asarray(rec["lengths"], float)
    norm = np.asarray(rec["norm_mean"]).mean(axis=2)  # (len, layers)
    n_layers = norm.shape[1]
    cmap = plt.get_cmap("viridis")
    fig, ax = plt.subplots(figsize=(6.6, 4.4))
    for l in range(n_layers):
        ax.plot(L, norm[:, l], color=cmap(l / max(1, n_layers - 1)), lw=1)
    ref = norm[0].mean() * L[0] / L
    ax.plot(L, ref, "k--", lw=1.5, label="O(1/L) reference")
    ax.plot(L, norm.mean(axis=1), "r-", lw=2.5, label=f"mean over layers (slope {rec['slope_model']:.2f})")
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ax.set_xlabel("context length L")
    ax.set_ylabel("mean ||J||_2 over heads and query rows")
    sm = plt.cm.ScalarMappable(cmap=cmap, norm=plt.Normalize(0, n_layers - 1))
    fig.colorbar(sm, ax=ax, label="layer")
    ax.set_title(title + " softmax Jacobian norm")
    ax.legend(fontsize=8)
    out = [save_figure(fig, path_norm)]

    spread = np.asarray(rec["spread_mean"]).mean(axis=2)
    fig, ax = plt.subplots(figsize=(6.6, 4.4))
    for l in range(n_layers):
        ax.plot(L, spread[:, l], color=cmap(l / max(1, n_layers - 1)), lw=1)
    ax.set_xscale("log", base=2)
    ax.set_xlabel("context length L")
    ax.set_ylabel("mean logit spread (max - min)")
    fig.colorbar(sm, ax=ax, label="layer")
    ax.set_title(title + " logit spread grows with L?")
    out.append(save_figure(fig, path_spread))
    return out


def plot_slopes(rec: dict, path: Path, title: str = "") -> Path:
    """Log-log slope of ||J||_2 against L, per layer and head (heat map)."""
    import numpy as np

    s = np.asarray(rec["slope_per_head"], float)
    fig, ax = plt.subplots(figsize=(6.4, 0.18 * s.shape[0] + 1.8))
    im = ax.imshow(s, aspect="auto", cmap="coolwarm", vmin=-1.2, vmax=1.2)
    ax.set_xlabel("head")
    ax.set_ylabel("layer")
    fig.colorbar(im, ax=ax, label="slope of log ||J|| vs log L (-1 = O(1/L))")
    ax.set_title(title + " saturation slope per head")
    return save_figure(fig, path)


def plot_fourgram_tradeoff(rec: dict, paper: dict, path: Path) -> Path:
    """Validation MSE against heads per group (measured, mean ± std over seeds), the paper's values
    and the bound's prediction (right axis)."""

    hs = rec["heads_per_group"]
    fig, ax = plt.subplots(figsize=(6.6, 4.4))
    series = rec.get("series") or {"measured": rec}
    names = {"relbias": "per-head relative bias (main)", "sinusoidal": "sinusoidal positions (contrast)"}
    for mech, ser in series.items():
        ax.errorbar(ser["heads_per_group"], ser["val_mse_mean"], yerr=ser["val_mse_std"], marker="o", capsize=3,
                    label=f"{names.get(mech, mech)}: val MSE")
    ax.plot(list(paper), list(paper.values()), "s--", color="C3", label="paper val MSE")
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ax.set_xlabel("heads per group H (4 groups, head dim 64/H)")
    ax.set_ylabel("validation MSE")
    ax2 = ax.twinx()
    ax2.plot(hs, rec["bound"], "k:", label="bound E_256 (right)")
    ax2.set_ylabel("error bound")
    lines = ax.get_legend_handles_labels()
    l2 = ax2.get_legend_handles_labels()
    ax.legend(lines[0] + l2[0], lines[1] + l2[1], fontsize=8)
    ax.set_title(f"4-gram: argmin measured H={rec['argmin_empirical']}, bound H={rec['argmin_bound']}")
    return save_figure(fig, path)


def plot_fourgram_curves(rec: dict, path: Path, paper: dict | None = None) -> Path:
    """Validation MSE against training step for every H (each seed a line), one panel per mechanism:
    whether each run converged; the paper's final validation MSE per H as a marker at the right edge."""
    series = rec.get("series") or {"measured": rec}
    fig, axes = plt.subplots(1, len(series), figsize=(5.2 * len(series), 4.0), squeeze=False)
    cmap = plt.get_cmap("viridis")
    for ax, (mech, ser) in zip(axes[0], series.items()):
        hs = ser["heads_per_group"]
        for i, h in enumerate(hs):
            for j, cv in enumerate(ser["curves"][str(h)]):
                ax.plot([c[0] for c in cv], [c[1] for c in cv], color=cmap(i / max(1, len(hs) - 1)),
                        label=f"H={h}" if j == 0 else None, lw=1)
            if paper and h in paper:
                last = max(c[0] for cv in ser["curves"][str(h)] for c in cv)
                ax.plot([last], [paper[h]], marker="<", ms=7, color=cmap(i / max(1, len(hs) - 1)),
                        label="paper, final" if i == 0 else None, ls="none", mec="k", mew=0.5)
        ax.set_yscale("log")
        ax.set_xlabel("training step")
        ax.set_title(mech, fontsize=9)
    axes[0][0].set_ylabel("validation MSE")
    axes[0][0].legend(fontsize=7)
    fig.suptitle("4-gram training curves (convergence check)", fontsize=10)
    return save_figure(fig, path)


def plot_dretrieval_grid(rec: dict, paper: dict, paper_T: list, path: Path) -> Path:
    """NMSE against h per T (log scale), for each variant, with the paper's table for it dotted
    (`paper`: variant -> {h: [NMSE per T in paper_T]}; Table 2 is a mean over seeds, Tables 4-5 a minimum,
    and ours is drawn the same way)."""
    variants = [v for v in ("main", "d3", "two_layer") if v in rec["grid"]]
    fig, axes = plt.subplots(1, len(variants), figsize=(5.0 * len(variants), 4.2), squeeze=False)
    titles = {"main": "D=4, one layer, width 8 per head (Table 2, mean)",
              "d3": "D=3, one layer, E=32 (Table 4, min)", "two_layer": "D=4, two layers, E=32 (Table 5, min)"}
    for ax, v in zip(axes[0], variants):
        g = rec["grid"][v]
        key = "mean" if v == "main" else "min"
        table = paper.get(v, {}) if isinstance(next(iter(paper)), str) else (paper if v == "main" else {})
        hs = sorted(g, key=int)
        Ts = sorted({int(T) for h in hs for T in g[h]})
        cmap = plt.get_cmap("plasma")
        for i, T in enumerate(Ts):
            xs = [int(h) for h in hs if str(T) in g[h]]
            ax.plot(xs, [g[str(h)][str(T)][key] for h in xs], marker="o", color=cmap(i / max(1, len(Ts))),
                    label=f"T={T}")
            if table and T in paper_T:
                ax.plot(sorted(table), [table[h][paper_T.index(T)] for h in sorted(table)], ls=":",
                        color=cmap(i / max(1, len(Ts))), alpha=0.7)
        ax.set_yscale("log")
        ax.set_xlabel("heads h")
        ax.set_ylabel(f"validation NMSE ({key} over seeds)")
        ax.set_title(titles[v] + "\n(dotted: the paper)", fontsize=9)
        ax.legend(fontsize=7)
    return save_figure(fig, path)

def plot_single_head(rec: dict, out: Path) -> list[Path]:
    """Two figures: output error against student dimension (per head and variant, at the longest L),
    and max attention-score error against L (data-aware students) with a 1/L reference."""
    import numpy as np

    dims, L = rec["dims"], rec["lengths"]
    last = str(L[-1] - 1)
    heads = list(rec["heads"])
    fig, axes = plt.subplots(1, len(heads), figsize=(4.6 * len(heads), 3.8), squeeze=False)
    for ax, hk in zip(axes[0], heads):
        for var, st in (("svd_plain", ":"), ("data_aware", "--"), ("finetuned", "-")):
            ax.plot(dims, [rec["heads"][hk][str(d)][var][last]["output_rel"] for d in dims], st, marker="o",
                    label=var)
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xlabel("student dimension")
        ax.set_ylabel(f"relative head-output error (L={L[-1]})")
        ax.set_title(f"{rec['config']['model']} {hk}")
        ax.legend(fontsize=7)
    paths = [save_figure(fig, out / "error_vs_dim.png")]
    fig, axes = plt.subplots(1, len(heads), figsize=(4.6 * len(heads), 3.8), squeeze=False)
    cmap = plt.get_cmap("viridis")
    for ax, hk in zip(axes[0], heads):
        for i, d in enumerate(dims):
            v = [rec["heads"][hk][str(d)]["data_aware"][str(x - 1)]["score_max"] for x in L]
            ax.plot(L, v, marker="o", color=cmap(i / max(1, len(dims) - 1)), label=f"dim {d}")
        ref = np.asarray(L, float)
        first = rec["heads"][hk][str(dims[0])]["data_aware"][str(L[0] - 1)]["score_max"]
        ax.plot(L, first * ref[0] / ref, "k--", label="1/L")
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xlabel("context length L")
        ax.set_ylabel("max |p_student - p_teacher| per row")
        ax.set_title(f"{rec['config']['model']} {hk}")
        ax.legend(fontsize=7)
    paths.append(save_figure(fig, out / "score_error_vs_L.png"))
    return paths


def plot_compression(rec: dict, path: Path) -> Path:
    """Perplexity against budget, one line per strategy, before (dashed) and after (solid) distillation."""
    fig, ax = plt.subplots(figsize=(6.6, 4.4))
    strategies = sorted({c["strategy"] for c in rec["cells"].values()})
    t = rec["teacher"]["ppl"]
    for i, s in enumerate(strategies):
        cells = sorted([c for c in rec["cells"].values() if c["strategy"] == s], key=lambda c: c["budget"])
        b = [c["budget"] for c in cells] + [1.0]
        ax.plot(b, [c["after"]["ppl"] for c in cells] + [t], "-o", color=f"C{i}", label=f"{s} (distilled)")
        ax.plot(b, [c["before"]["ppl"] for c in cells] + [t], "--", color=f"C{i}", alpha=0.6)
    ax.axhline(t, color="k", lw=0.8, label="original")
    ax.set_yscale("log")
    ax.set_xlabel("attention-parameter budget (fraction of original)")
    ax.set_ylabel("held-out perplexity (dashed: before distillation)")
    ax.set_title("SmolLM2-135M: compression strategies")
    ax.legend(fontsize=8)
    return save_figure(fig, path)


def projection_params(lp: dict, hidden: int = 576, n_kv: int = 3, n_rep: int = 3) -> dict[str, int]:
    """Weights of the q, k, v and o projections of one layer plan (a LayerPlan dict) in a model of `hidden` with
    n_kv kv heads of n_rep query heads (SmolLM2-135M by default): narrowed or removed heads, factorised
    query/output projections and latent keys/values counted as the runtime holds them (no biases)."""
    if lp.get("keep_kv") is not None and not lp["keep_kv"]:
        return {"q": 0, "k": 0, "v": 0, "o": 0}
    g = len(lp["keep_kv"]) if lp.get("keep_kv") else n_kv
    nq = g * (len(lp["keep_rep"][0]) if lp.get("keep_rep") else n_rep)
    qk, v = lp["qk_dim"], lp["v_dim"]
    latent = lp.get("kind") == "palu"
    return {"q": lp["rank_q"] * (hidden + nq * qk) if lp.get("rank_q") else hidden * nq * qk,
            "k": lp["rank_k"] * (hidden + g * qk) if latent else hidden * g * qk,
            "v": lp["rank_v"] * (hidden + g * v) if latent else hidden * g * v,
            "o": lp["rank_o"] * (nq * v + hidden) if lp.get("rank_o") else nq * v * hidden}


def side_params(lp: dict, hidden: int = 576, n_kv: int = 3, n_rep: int = 3) -> tuple[int, int]:
    """(query + key, value + output) weights of one layer plan (see `projection_params`)."""
    p = projection_params(lp, hidden, n_kv, n_rep)
    return p["q"] + p["k"], p["v"] + p["o"]


def plot_plan_projections(layers: list[dict], n_kv: int, n_rep: int, head_dim: int, hidden: int, path: Path,
                          title: str = "") -> Path:
    """Layers by projection (q, k, v, o): the fraction of each projection's weights kept, for plans with
    factorised projections or latent keys/values (every head kept, so a heads-by-widths grid says nothing)."""
    import numpy as np

    full = projection_params({"qk_dim": head_dim, "v_dim": head_dim}, hidden, n_kv, n_rep)
    frac = np.array([[projection_params(lp, hidden, n_kv, n_rep)[k] / full[k] for k in "qkvo"] for lp in layers])
    fig, ax = plt.subplots(figsize=(5.0, 0.18 * len(layers) + 2.0))
    im = ax.imshow(frac, cmap="viridis", vmin=0, vmax=max(1.0, float(frac.max())), aspect="auto",
                   interpolation="nearest")
    for (i, j), f in np.ndenumerate(frac):
        lp = layers[i]
        r = {"q": lp.get("rank_q"), "k": lp.get("rank_k") if lp.get("kind") == "palu" else None,
             "v": lp.get("rank_v") if lp.get("kind") == "palu" else None, "o": lp.get("rank_o")}["qkvo"[j]]
        ax.text(j, i, f"r{r}" if r else "", ha="center", va="center", fontsize=5, color="w" if f < 0.6 else "k")
    ax.set_xticks(range(4), ["query", "key", "value", "output"])
    ax.set_ylabel("layer")
    fig.colorbar(im, ax=ax, shrink=0.8, label="fraction of the projection's weights kept")
    ax.set_title((title or "Attention plan: projections kept per layer")
                 + "\n(rN: factorised / latent at rank N; every head kept)", fontsize=9)
    fig.tight_layout()
    return save_figure(fig, path)


def plot_plans(rec: dict, path: Path) -> Path:
    """Per layer and strategy at budget 0.5 (or the first budget): the query-key and the value-output
    parameters kept, in units of the original head width (64 = everything kept), so narrowed heads, removed
    heads and factorised projections read on one scale."""
    budgets = sorted({c["budget"] for c in rec["cells"].values()})
    b = 0.5 if 0.5 in budgets else budgets[0]
    cells = [c for c in rec["cells"].values() if c["budget"] == b]
    fig, axes = plt.subplots(1, len(cells), figsize=(3.2 * len(cells), 4.2), squeeze=False, sharey=True)
    full_qk, full_vo = side_params({"qk_dim": 64, "v_dim": 64})
    for ax, c in zip(axes[0], sorted(cells, key=lambda c: c["strategy"])):
        layers = c["plan"]
        L = range(len(layers))
        sides = [side_params(l) for l in layers]
        ax.barh(L, [64 * a / full_qk for a, _ in sides], height=0.4, label="query-key params (x 64 / original)")
        ax.barh([x + 0.4 for x in L], [64 * b_ / full_vo for _, b_ in sides], height=0.4,
                label="value-output params (x 64 / original)")
        ax.axvline(64, color="k", lw=0.8)
        ax.set_title(c["strategy"])
        ax.set_xlabel("kept (original 64)")
    axes[0][0].invert_yaxis()  # shared y: invert once, layer 0 on top
    axes[0][0].set_ylabel("layer")
    axes[0][0].legend(fontsize=7)
    fig.suptitle(f"Plans at budget {b} (bars: per-layer attention width; line: original)")
    return save_figure(fig, path)


def plot_lm_curves(rec: dict, path: Path) -> Path:
    """Validation loss against training tokens, per schedule (mean over seeds, band = min..max)."""
    import numpy as np

    fig, ax = plt.subplots(figsize=(6.6, 4.4))
    for i, (name, s) in enumerate(rec["summary"].items()):
        tokens = [p["tokens"] for p in s["curves"][0]]
        vals = np.array([[p["val_loss"] for p in c] for c in s["curves"]])
        ax.plot(tokens, vals.mean(0), color=f"C{i}", label=f"{name} ({s['attention_params']:,} attn params)")
        if len(vals) > 1:
            ax.fill_between(tokens, vals.min(0), vals.max(0), color=f"C{i}", alpha=0.2)
    ax.set_xlabel("training tokens")
    ax.set_ylabel("validation loss (nats/token)")
    ax.set_title("Per-layer allocation at equal attention budget")
    ax.legend(fontsize=7)
    return save_figure(fig, path)


def plot_lm_probe(rec: dict, path: Path) -> Path:
    """The trained uniform model's measurements behind the "measured" schedule: attention-ablation
    loss increase per layer, mean ||J||_2 against context per layer, and the resulting widths."""
    p = rec["uniform_probe"]
    fig, axes = plt.subplots(1, 3, figsize=(13, 3.8))
    d = p["ablation"]["delta"]
    axes[0].bar(range(len(d)), d, color="C0")
    axes[0].set_xlabel("layer")
    axes[0].set_ylabel("loss increase without the layer's attention (nats)")
    axes[0].set_title("attention-ablation importance")
    norms = list(zip(*p["norm_mean"]))  # per layer, over lengths
    for l, ys in enumerate(norms):
        axes[1].plot(p["lengths"], ys, marker="o", ms=3, color=plt.cm.viridis(l / max(1, len(norms) - 1)),
                     label=f"layer {l} (slope {p['slope_per_layer'][l]:+.2f})")
    axes[1].set_xscale("log")
    axes[1].set_yscale("log")
    axes[1].set_xlabel("context length L")
    axes[1].set_ylabel("mean ||J||_2")
    axes[1].set_title("softmax saturation")
    axes[1].legend(fontsize=6)
    for i, name in enumerate(("uniform", "principle", "measured")):
        if name in rec["summary"]:
            axes[2].plot(rec["summary"][name]["widths"], marker="o", label=name, color=f"C{i}")
    axes[2].set_xlabel("layer")
    axes[2].set_ylabel("attention width (heads x head dim)")
    axes[2].set_title("schedules")
    axes[2].legend(fontsize=7)
    fig.tight_layout()
    return save_figure(fig, path)


def plan_grid(layers: list[dict], n_kv: int, n_rep: int) -> tuple[list[list[int]], list[list[int]]]:
    """(qk widths, v widths), each layers x original query heads (kv-head-major: head h uses kv head
    h // n_rep); 0 where the head is removed."""
    qk, v = [], []
    for lp in layers:
        kept_kv = list(range(n_kv)) if lp.get("keep_kv") is None else list(lp["keep_kv"])
        reps = lp.get("keep_rep") or [list(range(n_rep))] * len(kept_kv)
        row_q, row_v = [0] * (n_kv * n_rep), [0] * (n_kv * n_rep)
        for g, rs in zip(kept_kv, reps):
            for r in rs:
                row_q[g * n_rep + r], row_v[g * n_rep + r] = lp["qk_dim"], lp["v_dim"]
        qk.append(row_q)
        v.append(row_v)
    return qk, v


def plot_plan_grid(layers: list[dict], n_kv: int, n_rep: int, head_dim: int, path: Path, title: str = "",
                   hidden: int | None = None) -> Path:
    """Layers by query heads, before (every head at `head_dim`) and after: kept qk width and v width
    per head (blank: head removed); vertical lines separate kv groups. A plan with factorised projections
    or latent keys/values is drawn by projection instead (`plot_plan_projections`, needs `hidden`)."""
    import numpy as np

    if hidden and any(lp.get("rank_q") or lp.get("rank_o") or lp.get("kind", "heads") == "palu" for lp in layers):
        return plot_plan_projections(layers, n_kv, n_rep, head_dim, hidden, path, title)

    qk, v = plan_grid(layers, n_kv, n_rep)
    before = np.full((len(layers), n_kv * n_rep), head_dim)
    panels = [("before (qk = v)", before), ("after: qk width", np.array(qk)), ("after: v width", np.array(v))]
    fig, axes = plt.subplots(1, 3, figsize=(9.0, 0.18 * len(layers) + 2.0), sharey=True)
    cmap = plt.get_cmap("viridis").with_extremes(bad="white")
    for ax, (name, m) in zip(axes, panels):
        im = ax.imshow(np.ma.masked_equal(m, 0), cmap=cmap, vmin=0, vmax=head_dim, aspect="auto",
                       interpolation="nearest")
        for g in range(1, n_kv):
            ax.axvline(g * n_rep - 0.5, color="k", lw=1)
        ax.set_title(name, fontsize=9)
        ax.set_xlabel("query head")
        ax.set_xticks(range(n_kv * n_rep))
        ax.tick_params(labelsize=6)
    axes[0].set_ylabel("layer")
    fig.colorbar(im, ax=axes, shrink=0.8, label="kept width (blank: head removed)")
    fig.suptitle((title or "Attention plan: layers by heads, before and after")
                 + "\n(black lines separate the kv-head groups)", fontsize=10)
    return save_figure(fig, path)


def plot_saturation_readings(rec: dict, path: Path) -> Path:
    """Model-mean value of each reading against L (log-log), one panel per model, with a 1/L guide."""
    import numpy as np

    models = rec["models"]
    fig, axes = plt.subplots(1, len(models), figsize=(6.0 * len(models), 4.4), squeeze=False)
    styles = {"row": "-", "col_mean": "--", "col_max": ":"}
    for ax, (name, r) in zip(axes[0], models.items()):
        L = np.array(r["lengths"], float)
        for i, (key, v) in enumerate(sorted(r["readings"].items())):
            reading, rows, sinks = key.split("|")
            y = np.array(v["per_layer"]).mean(axis=1)
            ax.plot(L, y, styles[reading], marker="o" if sinks == "with" else "x", ms=4,
                    color=f"C{i % 10}", label=f"{reading}, {rows} rows, {sinks} sinks ({v['slope_model']:+.2f})")
        ax.plot(L, 0.5 * L[0] / L * np.array(r["readings"][next(iter(r["readings"]))]["per_layer"]).mean(axis=1)[0],
                "k", lw=0.6, alpha=0.5, label="1/L guide")
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_xticks(L, [str(int(x)) for x in L], fontsize=7)  # the measured lengths, no minor labels
        ax.xaxis.set_minor_formatter(plt.NullFormatter())
        ax.set_xlabel("context length L (keys)")
        ax.set_ylabel("mean over layers and heads")
        ax.set_title(f"{name}: slope in brackets (paper: -1)", fontsize=9)
        ax.legend(fontsize=6)
    fig.suptitle("Two readings of ||J||: row norm vs per-key column sensitivity; with/without sink keys", fontsize=10)
    return save_figure(fig, path)
