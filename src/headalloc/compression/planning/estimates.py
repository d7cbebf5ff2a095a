"""The planners' estimates: what replacing one layer's attention costs, measured on the calibration text.

The estimate of a candidate (`layer_error`) is the Fisher-weighted error of the layer's attention output,
mean_t (g_t . dy_t)^2 with g the LM-loss gradient at that output (the second-order term of the loss change;
layers treated as independent). `candidate_error` fits a candidate's reduced weights as `MeasureOptions` says
(pooled, or leave-part-out folds) and measures it; the other functions measure what whole-head and whole-layer
candidates, and Palu's rank search, need. Everything measured is kept in a `Measurements` store when one is given.
"""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import torch
from tqdm.auto import tqdm

from headalloc.compression.calibration import Calibration
from headalloc.compression.families import AttentionWeights, adapter_for
from headalloc.compression.planning.state import (Folds, GradMoments, Grads, MeasureOptions, Measurements,
                                                  OutputMoments)
from headalloc.compression.reduce import Geometry, attention_module, grad_moments, output_moments, reduce_layer
from headalloc.compression.reduce.moments import PLAIN, FactorInputs
from headalloc.compression.reduce.moments import factor_inputs as reduce_factor_inputs
from headalloc.compression.spec import LayerPlan


def attention_output_grads(model, cal: Calibration, progress: bool = False) -> list[list[torch.Tensor]]:
    """Per layer and calibration window: gradient of the LM loss (next-token NLL on the calibration
    text) with respect to the layer's attention output."""
    ad = adapter_for(model)
    L = ad.n_layers(model.config)
    grads: list[list[torch.Tensor]] = [[] for _ in range(L)]
    handles = []
    for i in range(L):
        def hook(mod, args, out, i=i):
            out[0].register_hook(lambda gr, i=i: grads[i].append(gr.detach().clone()))
        handles.append(ad.attention(model, i).register_forward_hook(hook))
    trainable = [p for p in model.parameters() if p.requires_grad]
    for p in trainable:  # gradients reach the activations through the embeddings; no weight gradients
        p.requires_grad_(False)
    device = ad.embed(model).weight.device
    try:
        for w in tqdm(cal.windows, desc="gradients at attention outputs", disable=not progress, leave=False):
            ids = w[None].to(device)
            with torch.enable_grad():
                emb = ad.embed(model)(ids).detach().requires_grad_(True)
                loss = model(inputs_embeds=emb, labels=ids).loss * ids.shape[1]
                loss.backward()
    finally:
        for h in handles:
            h.remove()
        for p in trainable:
            p.requires_grad_(True)
        model.zero_grad(set_to_none=True)
    return grads


ROWS_PER_PASS = 8192  # calibration windows are measured several at a time, up to about this many tokens


def window_batches(cal: Calibration, l: int, idx) -> list[list[int]]:
    """The listed calibration windows in groups passed through one layer together: every window of a group has
    the same length and the same rotary position embeddings (windows start at position 0), up to about
    `ROWS_PER_PASS` tokens a group. A group's products are larger matrices than one window's, which is most of
    the planning time on a CPU."""
    groups: list[list[int]] = []
    for i in idx:
        g = groups[-1] if groups else None
        if g is not None and (len(g) + 1) * cal.inputs[l][i].shape[-2] <= ROWS_PER_PASS and \
                cal.inputs[l][i].shape == cal.inputs[l][g[0]].shape and _same_positions(cal, g[0], i):
            g.append(i)
        else:
            groups.append([i])
    return groups


def _same_positions(cal: Calibration, i: int, j: int) -> bool:
    a, b = cal.positions[i], cal.positions[j]
    return all(x is y or (x.shape == y.shape and torch.equal(x, y)) for x, y in zip(a, b))


@torch.no_grad()
def layer_passes(model, l: int, cal: Calibration, idx, store: Measurements | None = None
                 ) -> list[tuple[list[int], torch.Tensor, torch.Tensor]]:
    """(windows, their inputs stacked, the teacher attention's outputs on them) for each pass of `window_batches` over
    the listed windows of layer l: stacked once per layer and window list, then shared by every candidate measured
    there (`store` keeps the current layer's)."""
    def compute():
        attn = adapter_for(model).attention(model, l)
        passes = []
        for grp in window_batches(cal, l, key):
            X = torch.cat([cal.inputs[l][i] for i in grp])
            passes.append((grp, X, attn(hidden_states=X, position_embeddings=cal.positions[grp[0]],
                                        attention_mask=None)[0]))
        return passes

    key = tuple(idx)
    return compute() if store is None else store.layer_passes(l, key, compute)


def teacher_outputs(model, l: int, cal: Calibration, store: Measurements | None = None) -> list[torch.Tensor]:
    """The teacher attention's outputs on the calibration inputs of layer l, one (1, T, hidden) per window."""
    out: list = [None] * len(cal.inputs[l])
    for grp, _, y in layer_passes(model, l, cal, range(len(cal.inputs[l])), store):
        for i, yi in zip(grp, y.split(1)):
            out[i] = yi
    return out


@torch.no_grad()
def layer_error(model, l: int, cal: Calibration, spec, weights, windows: list[int] | None = None,
                store: Measurements | None = None) -> float:
    """Estimated loss increase from replacing layer l's attention: the Fisher-weighted output error
    mean_t (g_t . dy_t)^2, with g the LM-loss gradient at the attention output (second-order term of
    the loss change; layers are treated as independent). Without gradients: |dy|^2 relative to the
    residual stream entering the layer. Mean over the calibration windows, or over the listed `windows`
    (measured several windows to a pass, `window_batches`)."""
    X0 = cal.inputs[l][0]
    student = attention_module(model.config, spec, weights, l, device=X0.device, dtype=X0.dtype)
    err = 0.0
    idx = range(len(cal.inputs[l])) if windows is None else windows
    for grp, X, ref in layer_passes(model, l, cal, idx, store):
        dy = ref - student(hidden_states=X, position_embeddings=cal.positions[grp[0]], attention_mask=None)[0]
        if cal.grads is not None:
            G = cal.grads[l][grp[0]] if len(grp) == 1 else torch.cat([cal.grads[l][i] for i in grp])
            err += float((G * dy).double().sum(-1).square().sum())
        else:
            err += float(dy.double().square().sum(-1).mean(-1).sum()) / cal.resid_sq[l]
    return err / len(idx)


def fit_folds(cal: Calibration, measure: MeasureOptions, store: Measurements | None = None
              ) -> list[tuple[Calibration, list[int] | None]]:
    """What a candidate is fitted on and measured on (`measure.error`): 'pooled', one fold, the whole calibration
    measured on all its windows; 'leave-part-out', per part of the fitting text the calibration without that part's
    moments, measured on that part's windows (`Calibration.folds`)."""
    if measure.error == "pooled":
        return [(cal, None)]
    return cal.folds() if store is None else store.get(Folds(), cal.folds)


def factor_inputs(model, cal: Calibration, measure: MeasureOptions, store: Measurements | None = None
                  ) -> FactorInputs:
    """`reduce.factor_inputs` of `cal` (a calibration or one of its folds) under `measure.factor_output`, the
    moments kept in `store`; 'fisher' reads the gradients that planning measured (`with_grads`)."""
    if store is None:
        return reduce_factor_inputs(model, cal, measure.factor_output)
    if measure.factor_output == "plain":
        return PLAIN
    outm = store.get(OutputMoments(cal.fold), lambda: output_moments(model, cal))
    if measure.factor_output == "fisher":
        grads = cal.grads if cal.grads is not None else store.get(Grads(), lambda: attention_output_grads(model, cal))
        return FactorInputs(outm, store.get(GradMoments(1e-2), lambda: grad_moments(replace(cal, grads=grads))))
    return FactorInputs(outm)


def candidate_error(model, l: int, cal: Calibration, lp: LayerPlan, caches: dict, output_factor: bool = False,
                    measure: MeasureOptions = MeasureOptions(), store: Measurements | None = None) -> float:
    """`layer_error` of plan `lp` in layer l, its factorisations fitted and measured per `fit_folds` (window-weighted
    mean over the folds). `caches`: per fold, the layer's SVD cache (`reduce_layer`); `output_factor`: fit a
    factorised output projection as `measure.factor_output` says (`factor_inputs`)."""
    w, g = adapter_for(model).weights(model, l), Geometry.of(model)
    total, n = 0.0, 0
    for f, (c, idx) in enumerate(fit_folds(cal, measure, store)):
        kw = factor_inputs(model, c, measure, store).for_layer(l) if output_factor else {}
        k = len(cal.inputs[l]) if idx is None else len(idx)
        total += k * layer_error(model, l, cal, *reduce_layer(w, c.second_moment[l], lp, g, l,
                                                              caches.setdefault(f, {}), **kw), windows=idx, store=store)
        n += k
    return total / n


def with_grads(model, cal: Calibration, store: Measurements, progress: bool = False) -> Calibration:
    """`cal` with the LM-loss gradients at every attention output (measured once per store), so that `layer_error`
    weights the output error by them; the calibration given is not changed."""
    if cal.grads is not None:
        return cal
    return replace(cal, grads=store.get(Grads(), lambda: attention_output_grads(model, cal, progress)))


@torch.no_grad()
def head_energy(model, cal: Calibration) -> list[torch.Tensor]:
    """Per layer (n_kv, n_rep): mean squared norm of each query head's contribution W_O^h o_h."""
    ad, g = adapter_for(model), Geometry.of(model)
    out = []
    for l in range(g.n_layers):
        w = ad.weights(model, l)
        acc = torch.zeros(g.n_kv, g.n_rep, dtype=torch.float64)
        X0 = cal.inputs[l][0]
        for kv in range(g.n_kv):
            for h in range(g.n_rep):
                spec, red = reduce_layer(w, None, LayerPlan(g.head_dim, g.head_dim, [kv], [[h]]), g, l)
                red.o_bias = None  # the head's own contribution, without the layer's output bias
                spec.bias = {**spec.bias, "o": False}
                head = attention_module(model.config, spec, red, l, device=X0.device, dtype=X0.dtype)
                for X, pe in zip(cal.inputs[l], cal.positions):
                    y = head(hidden_states=X, position_embeddings=pe, attention_mask=None)[0]
                    acc[kv, h] += float(y.double().square().sum(-1).mean())
        out.append(acc / len(cal.positions))
    return out


@torch.no_grad()
def head_removal_error(model, cal: Calibration, store: Measurements | None = None) -> list[torch.Tensor]:
    """Per layer (n_kv, n_rep): the measured loss increase (`layer_error`) of silencing one query head,
    and, for ranking kv heads, the sum over its query heads. Higher = more needed."""
    ad, g = adapter_for(model), Geometry.of(model)
    out = []
    for l in range(g.n_layers):
        w = ad.weights(model, l)
        spec, full = reduce_layer(w, None, g.full(), g, l)
        err = torch.zeros(g.n_kv, g.n_rep, dtype=torch.float64)
        for kv in range(g.n_kv):
            for h in range(g.n_rep):
                o = full.o.clone()
                c = (kv * g.n_rep + h) * g.head_dim
                o[:, c:c + g.head_dim] = 0  # the head's output removed, everything else kept
                err[kv, h] = layer_error(model, l, cal, spec, AttentionWeights(**{**full.__dict__, "o": o}),
                                         store=store)
        out.append(err)
    return out


@torch.no_grad()
def weight_head_energy(model) -> list[torch.Tensor]:
    """Per layer (n_kv, n_rep): ||W_O^h W_V^g||_F^2, each query head's value-output map (no data needed)."""
    ad, g = adapter_for(model), Geometry.of(model)
    out = []
    for l in range(g.n_layers):
        w = ad.weights(model, l)
        Wv = w.v.double().view(g.n_kv, g.head_dim, -1)
        Wo = w.o.double().view(g.hidden, g.n_kv, g.n_rep, g.head_dim)
        out.append(torch.stack([torch.stack([(Wo[:, kv, h] @ Wv[kv]).square().sum() for h in range(g.n_rep)])
                                for kv in range(g.n_kv)]).cpu())
    return out


def empty_plan(g: Geometry) -> LayerPlan:
    """A layer without attention (no heads, no cache)."""
    return LayerPlan(g.head_dim, g.head_dim, keep_kv=[], keep_rep=[])


@torch.no_grad()
def empty_layer_error(model, l: int, cal: Calibration, store: Measurements | None = None) -> float:
    """The measured error (`layer_error`) of removing layer l's attention entirely."""
    g = Geometry.of(model)
    return layer_error(model, l, cal, *reduce_layer(adapter_for(model).weights(model, l), None, empty_plan(g), g, l),
                       store=store)
def _kv_weights_grad(attn, g: Geometry) -> tuple[torch.Tensor, torch.Tensor]:
    if hasattr(attn, "k_proj"):
        return attn.k_proj.weight.grad, attn.v_proj.weight.grad
    qkv = attn.qkv_proj.weight.grad  # Phi-3: [q; k; v] rows
    nq, nk = g.n_kv * g.n_rep * g.head_dim, g.n_kv * g.head_dim
    return qkv[nq:nq + nk], qkv[nq + nk:nq + 2 * nk]


def weight_fisher(model, cal: Calibration, progress: bool = False) -> np.ndarray:
    """(layers, 2): Palu's sensitivity of W_K and W_V, mean over weights of sqrt(E[(dL/dw)^2]) over the
    calibration windows (next-token loss)."""
    ad, g = adapter_for(model), Geometry.of(model)
    attns = [ad.attention(model, l) for l in range(g.n_layers)]
    acc = np.zeros((g.n_layers, 2))
    sums = [[None, None] for _ in range(g.n_layers)]
    req = {n: p.requires_grad for n, p in model.named_parameters()}
    device = ad.embed(model).weight.device
    try:
        for p in model.parameters():
            p.requires_grad_(False)
        for a in attns:
            for p in a.parameters():
                p.requires_grad_(True)
        for w in tqdm(cal.windows, desc="Fisher information (palu)", disable=not progress, leave=False):
            model.zero_grad(set_to_none=True)
            with torch.enable_grad():
                ids = w[None].to(device)
                model(input_ids=ids, labels=ids).loss.backward()
            for l, a in enumerate(attns):
                for j, gr in enumerate(_kv_weights_grad(a, g)):
                    sq = gr.detach().double().square().cpu()
                    sums[l][j] = sq if sums[l][j] is None else sums[l][j] + sq
    finally:
        model.zero_grad(set_to_none=True)
        for n, p in model.named_parameters():
            p.requires_grad_(req[n])
    for l in range(g.n_layers):
        for j in range(2):
            acc[l, j] = float((sums[l][j] / len(cal.windows)).sqrt().mean())
    return acc
