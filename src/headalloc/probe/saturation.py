"""Softmax saturation of a pretrained model: ||J||_2 of every layer and head against context length L.

What is averaged (stated once, used everywhere):
- Causal models: for each window of max(L) tokens, the query row at position L-1 attends to
  exactly L keys, and by causality its attention equals that of a window of exactly L tokens. So
  one forward pass per window gives the full-context-L row for every L; statistics for a length
  are over windows (one row per window, per layer and head).
- Bidirectional models: a separate forward per L on windows of L tokens ([CLS] ... [SEP]), every
  query row sees all L keys; statistics are over all rows of all windows.
Per (L, layer, head): mean and median of ||J||_2, mean largest probability, mean logit spread
(max - min of the scaled logits over the row's keys).
"""

from __future__ import annotations

import time
from typing import Sequence

import numpy as np
import torch
from tqdm.auto import tqdm

from headalloc.assets.corpus import Corpus, load_corpus, token_windows
from headalloc.probe.attention import AttentionChunk, AttentionProbe, SeqModelProbe
from headalloc.theory.saturation import softmax_jacobian_norm


def _is_seqmodel(model) -> bool:
    from headalloc.models import SeqModel

    return isinstance(model, SeqModel)


def is_causal_model(model) -> bool:
    if _is_seqmodel(model):
        return bool(model.cfg.causal)
    cfg = model.config
    return bool(getattr(cfg, "is_decoder", False)) or any(
        a.endswith("ForCausalLM") or a.endswith("LMHeadModel") for a in (getattr(cfg, "architectures", None) or [])
    ) or model.__class__.__name__.endswith(("ForCausalLM", "LMHeadModel"))


def max_positions(model) -> int | None:
    if _is_seqmodel(model):
        return model.cfg.max_len
    return getattr(model.config, "max_position_embeddings", None) or getattr(model.config, "n_positions", None)


def _validate_lengths(lengths: Sequence[int], limit: int | None) -> list[int]:
    lengths = sorted({int(x) for x in lengths})
    if not lengths or lengths[0] < 2:
        raise ValueError(f"lengths must be integers >= 2 (a softmax over one key is constant); got {lengths}")
    if limit is not None and lengths[-1] > limit:
        raise ValueError(f"length {lengths[-1]} exceeds the model's maximum of {limit} positions; "
                         f"use lengths up to {limit}")
    return lengths


def loglog_slope(lengths: Sequence[float], values: Sequence[float]) -> float:
    """Least-squares slope of log(value) against log(L) (-1 is the O(1/L) rate)."""
    x, y = np.log(np.asarray(lengths, float)), np.log(np.asarray(values, float))
    ok = np.isfinite(y)
    if ok.sum() < 2:
        return float("nan")
    return float(np.polyfit(x[ok], y[ok], 1)[0])


@torch.no_grad()
def measure_saturation(model, tokenizer, corpus: Corpus | str = "wiki", lengths: Sequence[int] = (4, 8, 16, 32),
                       n_windows: int = 8, seed: int = 0, split: str = "validation", progress: bool = True) -> dict:
    """Per length, layer and head: statistics of ||diag(p) - p p^T||_2 over query rows (see module doc)."""
    if isinstance(corpus, str):
        corpus = load_corpus(corpus)
    causal = is_causal_model(model)
    lengths = _validate_lengths(lengths, max_positions(model))
    # store[L][layer] -> list of (norm, pmax, spread) tensors of shape (H, samples) for that chunk.
    store: dict[int, dict[int, list]] = {L: {} for L in lengths}

    pending: list[tuple[AttentionChunk, torch.Tensor, torch.Tensor]] = []

    def cb(c: AttentionChunk):
        # Cheap statistics now; the Jacobian norms of all layers in one batched call after the pass.
        finite = torch.isfinite(c.logits)
        spread = torch.where(finite, c.logits, -torch.inf).amax(-1) - torch.where(finite, c.logits, torch.inf).amin(-1)
        pending.append((c, c.probs.amax(-1).double(), spread.double()))

    def flush(split_rows: bool) -> float:
        t = time.perf_counter()
        shapes = [c.probs.shape for c, _, _ in pending]
        same = len({s[-1] for s in shapes}) == 1
        if same:
            flat = torch.cat([c.probs.reshape(-1, c.probs.shape[-1]) for c, _, _ in pending]).double()
            norms_flat = softmax_jacobian_norm(flat)
        offset = 0
        for (c, pm, sp), shp in zip(pending, shapes):
            n_el = shp[0] * shp[1] * shp[2]
            n = (norms_flat[offset:offset + n_el].reshape(shp[:3]) if same
                 else softmax_jacobian_norm(c.probs.double()))
            offset += n_el
            if split_rows:  # causal: row r is the full-context row of lengths[r]
                for r, L in enumerate(lengths):
                    _add(L, c, n[:, :, r:r + 1], pm[:, :, r:r + 1], sp[:, :, r:r + 1])
            else:
                _add(c.rows.numel(), c, n, pm, sp)
        pending.clear()
        return time.perf_counter() - t

    def _add(L: int, c: AttentionChunk, n, pm, sp):
        # (B, H, R) -> (H, B*R); chunks of heads are concatenated along H later
        flat = [x.permute(1, 0, 2).reshape(x.shape[1], -1) for x in (n, pm, sp)]
        store[L].setdefault(c.layer, {}).setdefault(c.head_start, []).append(flat)

    t_forward = t_jac = 0.0
    if causal:
        Lmax = lengths[-1]
        windows = token_windows(tokenizer, corpus, split, Lmax, n_windows, seed=seed)
        # Row L-1 has zero probability (and -inf logits) past key L-1, so whole rows are exact.
        with AttentionProbe(model, cb, rows=[L - 1 for L in lengths]):
            for w in tqdm(windows, desc=f"saturation windows (L<={Lmax})", disable=not progress):
                t = time.perf_counter()
                model(input_ids=w[None])
                t_forward += time.perf_counter() - t
                t_jac += flush(split_rows=True)
    else:
        cls_id, sep_id = tokenizer.cls_token_id, tokenizer.sep_token_id
        pre = [cls_id] if cls_id is not None else []
        suf = [sep_id] if sep_id is not None else []
        for L in tqdm(lengths, desc="saturation lengths", disable=not progress):
            windows = token_windows(tokenizer, corpus, split, L, n_windows, seed=seed, prefix_ids=pre, suffix_ids=suf)
            with AttentionProbe(model, cb):
                t = time.perf_counter()
                model(input_ids=windows)
                t_forward += time.perf_counter() - t
            t_jac += flush(split_rows=False)

    n_layers = len(store[lengths[0]])
    per_layer = {L: {l: [torch.cat([torch.cat([f[k] for f in store[L][l][h0]], dim=1)
                                    for h0 in sorted(store[L][l])], dim=0) for k in range(3)]
                     for l in store[L]} for L in lengths}
    n_heads = per_layer[lengths[0]][0][0].shape[0]
    out = {k: np.zeros((len(lengths), n_layers, n_heads)) for k in ("norm_mean", "norm_median", "pmax_mean",
                                                                     "spread_mean")}
    for i, L in enumerate(lengths):
        for l in range(n_layers):
            norm, pmax, spread = per_layer[L][l]
            out["norm_mean"][i, l] = norm.mean(1).numpy()
            out["norm_median"][i, l] = norm.median(1).values.numpy()
            out["pmax_mean"][i, l] = pmax.mean(1).numpy()
            out["spread_mean"][i, l] = spread.mean(1).numpy()
    layer_norm = out["norm_mean"].mean(axis=2)  # (len, layers)
    slopes_layer = [loglog_slope(lengths, layer_norm[:, l]) for l in range(n_layers)]
    slopes_head = [[loglog_slope(lengths, out["norm_mean"][:, l, h]) for h in range(n_heads)] for l in range(n_layers)]
    return {
        "causal": causal,
        "lengths": lengths,
        "n_windows": n_windows,
        "n_layers": n_layers,
        "n_heads": n_heads,
        "averaging": ("causal: query row L-1 of each window (exactly L keys), one row per window"
                      if causal else "bidirectional: every query row of every window of L tokens"),
        **{k: v.tolist() for k, v in out.items()},
        "slope_per_layer": slopes_layer,
        "slope_per_head": slopes_head,
        "slope_model": loglog_slope(lengths, layer_norm.mean(axis=1)),
        "slope_pmax_model": loglog_slope(lengths, out["pmax_mean"].mean(axis=(1, 2))),
        "slope_spread_model": loglog_slope(lengths, np.maximum(out["spread_mean"].mean(axis=(1, 2)), 1e-12)),
        "seconds_forward": t_forward,
        "seconds_jacobian": t_jac,
    }


def saturation_verdict(rec: dict) -> dict:
    """Where the paper's claims hold: a fall with L (slope < 0) and the O(1/L) rate (slope <= -0.9)."""
    slopes = np.asarray(rec["slope_per_layer"], float)
    return {
        "layers": len(slopes),
        "layers_falling": int((slopes < 0).sum()),
        "layers_at_1_over_L": int((slopes <= -0.9).sum()),
        "slope_min": float(np.nanmin(slopes)),
        "slope_max": float(np.nanmax(slopes)),
        "slope_median": float(np.nanmedian(slopes)),
    }


@torch.no_grad()
def seqmodel_saturation(model, windows: torch.Tensor, lengths: Sequence[int]) -> dict:
    """Softmax saturation of a trained causal `SeqModel` (our grouped-head decoders).

    Same averaging as `measure_saturation` for causal models: one forward per window of max(lengths)
    tokens, and query row L-1 (which sees exactly L keys) stands for context length L. Heads of all
    groups of a layer are pooled. Returns per-length, per-layer mean ||J||_2 and the per-layer log-log
    slope against L.
    """
    if not getattr(model.cfg, "causal", False):
        raise ValueError("seqmodel_saturation needs a causal SeqModel (row L-1 stands for context L)")
    lengths = _validate_lengths(lengths, model.cfg.max_len)
    if windows.ndim != 2 or windows.shape[1] < lengths[-1]:
        raise ValueError(f"windows must be (n, >= {lengths[-1]}) token ids; got shape {tuple(windows.shape)}")
    rows = torch.tensor([L - 1 for L in lengths])
    n_layers = len(model.blocks)
    sums = np.zeros((len(lengths), n_layers))
    counts_heads = np.zeros(n_layers)

    def add(c: AttentionChunk) -> None:  # the layers' own attention (relative biases included), rows L-1
        norms = softmax_jacobian_norm(c.probs[:, :, rows])  # (B, H, R)
        sums[:, c.layer] += norms.sum((0, 1)).numpy()
        counts_heads[c.layer] += norms.shape[0] * norms.shape[1]

    was_training = model.training
    model.eval()
    try:
        with SeqModelProbe(model, add, dtype=torch.float64):
            model(windows[:, :lengths[-1]])
    finally:
        model.train(was_training)
    norm = sums / counts_heads[None, :]
    return {"lengths": lengths, "norm_mean": norm.tolist(), "n_windows": int(windows.shape[0]),
            "slope_per_layer": [loglog_slope(lengths, norm[:, l]) for l in range(n_layers)]}


READINGS = ("row", "col_mean", "col_max")


def _readings(p: torch.Tensor) -> dict[str, torch.Tensor]:
    """Per distribution (last dimension): ||J||_2 of the row (the first reading) and the per-key column
    sensitivity ||dp/dz_l|| averaged and maximised over keys (the second reading)."""
    from headalloc.theory.saturation import softmax_jacobian_columns

    cm, cx = softmax_jacobian_columns(p)
    return {"row": softmax_jacobian_norm(p.double()), "col_mean": cm, "col_max": cx}


@torch.no_grad()
def measure_saturation_readings(model, tokenizer, windows: torch.Tensor, lengths: Sequence[int],
                                sinks: str = "first", progress: bool = True) -> dict:
    """Both readings of the paper's "Jacobian of the attention scores with respect to the logits" against
    context length L, with and without attention-sink keys, per layer (mean over heads and windows).

    Causal models: one forward per window of max(L) tokens; "last" is the query row L-1 (exactly L keys),
    "all" averages rows 1..L-1 of the window (row r sees r+1 keys; by causality they are the rows of a
    window of L tokens). Bidirectional models: a forward per L on the first L-2 tokens of each window
    between [CLS] and [SEP]; every row sees L keys ("all"; there is no "last").
    Sinks: the first key (`sinks="first"`; for encoders also [SEP]); "without sinks" drops those keys and
    renormalises the rest (the logits unchanged), rows that would have no key left are skipped."""
    from headalloc.theory.saturation import without_keys

    causal = is_causal_model(model)
    lengths = _validate_lengths(lengths, max_positions(model))
    Lmax = lengths[-1]
    if windows.ndim != 2 or windows.shape[1] < Lmax:
        raise ValueError(f"windows must be (n, >= {Lmax}) token ids; got shape {tuple(windows.shape)}")
    rows_kind = ("last", "all") if causal else ("all",)
    # acc[(reading, rows, sinks)][L index][layer] -> list of per-head means
    acc: dict[tuple, dict] = {}

    def add(key, i, layer, val: torch.Tensor):  # val (B, H, R) -> mean over B and R per head
        acc.setdefault(key, {}).setdefault(i, {}).setdefault(layer, []).append(val.mean(dim=(0, 2)))

    def cb_causal(c: AttentionChunk):
        p = c.probs.double()  # (B, H, Lmax, Lmax), zeros past each row's last key
        K = p.shape[-1]
        sink = torch.zeros(K, dtype=torch.bool)
        sink[0] = True
        for tag, q in (("with", p), ("without", without_keys(p, sink))):  # row 0 (only the sink) is skipped below
            r = _readings(q)  # each (B, H, rows)
            start = 1  # row 0 has one key (or none without the sink)
            for i, L in enumerate(lengths):
                for name, v in r.items():
                    add((name, "last", tag), i, c.layer, v[:, :, L - 1:L])
                    add((name, "all", tag), i, c.layer, v[:, :, start:L])

    t0 = time.perf_counter()
    if causal:
        own = _is_seqmodel(model)  # our own decoders: read through the layers' score hooks
        with (SeqModelProbe(model, cb_causal) if own else AttentionProbe(model, cb_causal)):
            for w in tqdm(windows[:, :Lmax], desc=f"saturation readings (L<={Lmax})", disable=not progress):
                if own:
                    model(w[None])
                else:
                    model(input_ids=w[None])
    elif _is_seqmodel(model):
        raise ValueError("saturation readings of our own SeqModels need a causal decoder")
    else:
        cls_id, sep_id = tokenizer.cls_token_id, tokenizer.sep_token_id
        for i, L in enumerate(tqdm(lengths, desc="saturation readings", disable=not progress)):
            ids = torch.cat([torch.full((len(windows), 1), cls_id), windows[:, :L - 2],
                             torch.full((len(windows), 1), sep_id)], dim=1)

            def cb_enc(c: AttentionChunk, i=i):
                p = c.probs.double()  # (B, H, L, L)
                sink = torch.zeros(p.shape[-1], dtype=torch.bool)
                sink[0] = sink[-1] = True  # [CLS] and [SEP]
                for tag, q in (("with", p), ("without", without_keys(p, sink))):
                    for name, v in _readings(q).items():
                        add((name, "all", tag), i, c.layer, v)

            with AttentionProbe(model, cb_enc):
                model(input_ids=ids)
    n_layers = len(next(iter(acc.values()))[0])
    out = {}
    for (name, rows, tag), per_len in acc.items():
        m = np.array([[float(torch.cat(per_len[i][l]).mean()) for l in range(n_layers)] for i in range(len(lengths))])
        slopes = [loglog_slope(lengths, m[:, l]) for l in range(n_layers)]
        out[f"{name}|{rows}|{tag}"] = {"per_layer": m.tolist(), "slope_per_layer": slopes,
                                       "slope_model": loglog_slope(lengths, m.mean(axis=1)),
                                       "layers_at_1_over_L": int(sum(s <= -0.9 for s in slopes)),
                                       "layers_falling": int(sum(s < 0 for s in slopes))}
    return {"causal": causal, "lengths": lengths, "n_windows": int(len(windows)), "n_layers": n_layers,
            "rows": list(rows_kind), "readings": out, "seconds": time.perf_counter() - t0,
            "definitions": {
                "row": "||diag(p) - p p^T||_2 of a query row (the norm of the row's Jacobian)",
                "col_mean": "mean over keys l of ||dp/dz_l||_2 (how much the row's distribution moves per "
                            "unit change of one key's logit)",
                "col_max": "max over keys l of ||dp/dz_l||_2",
                "without": "sink keys dropped and the rest renormalised (causal: the first token; encoder: "
                           "[CLS] and [SEP])"}}
