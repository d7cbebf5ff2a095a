"""Factorised query and output projections (`rank_q` / `rank_o`) and the `measured-lowrank` strategy: exact at
full rank against each family's own model, parameter counts against the modules, the output-projection input
moments against an independent solve, budgets, saving and loading without headalloc, refusals."""

import pytest
import torch
from families import logits_without_headalloc, tiny, tiny_tokenizer
from transformers import DynamicCache

from headalloc.compression.calibration import collect
from headalloc.compression.reduce import Geometry, compress_model, output_moments
from headalloc.compression.spec import HeadSpec, LayerPlan, Plan
from headalloc.compression.planning import Measurements, PlanOptions, PlanRequest, make_plan
from headalloc.compression.targets import TARGETS
from headalloc.compression.modeling_headalloc import CACHE_NAME  # 'cache' from transformers 5.24


@pytest.mark.parametrize("family", ["llama", "llama-bias", "mistral", "qwen2", "qwen3", "phi3"])
def test_full_rank_factors_are_the_family_model_and_count_their_parameters(family):
    m = tiny(family)
    g = Geometry.of(m)
    hd, nq = g.head_dim, g.n_kv * g.n_rep * g.head_dim
    data = collect(m, torch.randint(0, 300, (3, 20)))
    r = min(g.hidden, nq)
    st = compress_model(m, Plan([LayerPlan(hd, hd, rank_q=r, rank_o=r)] * g.n_layers), data)
    ids = torch.randint(0, 300, (2, 15))
    with torch.no_grad():
        torch.testing.assert_close(st(ids).logits, m(ids).logits, atol=3e-5, rtol=1e-4)
        low = compress_model(m, Plan([LayerPlan(hd, hd, rank_q=5, rank_o=7), LayerPlan(hd, hd, rank_q=9),
                                      LayerPlan(hd, hd, rank_o=4)]), data)
        ref = low(ids).logits
        a = low(ids[:, :9], **{CACHE_NAME: DynamicCache(config=low.config.text_config)}, use_cache=True)
        b = low(ids[:, 9:], **{CACHE_NAME: getattr(a, CACHE_NAME)}, use_cache=True)
        torch.testing.assert_close(b.logits, ref[:, 9:], atol=3e-5, rtol=1e-4)
    for layer, spec in zip(low.model.layers, low.config.attn_layers):  # the budget's count is the modules' own
        assert HeadSpec.from_dict(spec).params(g.hidden) == sum(p.numel() for p in layer.self_attn.parameters())
    assert low.kv_cache_bytes_per_token(1) == m.config.num_hidden_layers * 2 * g.n_kv * hd  # the cache is unchanged
    assert type(low.model.layers[0].self_attn.q_proj).__name__ == "LowRankLinear"


def test_output_moments_are_the_second_moment_of_the_head_outputs():
    """Head outputs z recovered independently from the family attention's own output y = W_O z + b_O by a
    linear solve (W_O is square and invertible here), then E[z z^T] compared."""
    m = tiny("llama-bias")
    data = collect(m, torch.randint(0, 300, (2, 11)))
    mom = output_moments(m, data)
    attn = m.model.layers[1].self_attn
    zs = []
    with torch.no_grad():
        for X, pe in zip(data.inputs[1], data.positions):
            y = attn(hidden_states=X, position_embeddings=pe, attention_mask=None)[0][0].double()
            W, b = attn.o_proj.weight.double(), attn.o_proj.bias.double()
            zs.append(torch.linalg.solve(W, (y - b).T).T)
    Z = torch.cat(zs)
    torch.testing.assert_close(mom[1], Z.T @ Z / Z.shape[0], atol=1e-5, rtol=1e-3)  # float32 attention


def test_whitened_output_factor_beats_the_plain_one_on_the_data():
    """With the head outputs' moment, the rank-r output projection has a smaller output error on the calibration
    text than plain truncated SVD of W_O (Eckart-Young in the data's metric)."""
    m = tiny("llama")
    g = Geometry.of(m)
    hd = g.head_dim
    data = collect(m, torch.randint(0, 300, (4, 20)))
    ids = data.windows
    with torch.no_grad():
        want = m(ids).logits
        errs = {}
        for name, d in (("data", data), ("plain", None)):
            st = compress_model(m, Plan([LayerPlan(hd, hd, rank_o=6)] * g.n_layers), d)
            errs[name] = float((st(ids).logits - want).square().mean())
    assert errs["data"] < errs["plain"]


@pytest.mark.parametrize("family", ["llama-bias", "qwen3"])
def test_measured_lowrank_meets_params_and_kv_budgets(family):
    m = tiny(family)
    g = Geometry.of(m)
    data = collect(m, torch.randint(0, 300, (3, 20)))
    full = {k: g.spec(g.full()).cost(g.hidden, k) * g.n_layers for k in ("params", "kv")}
    low = 0.3 if family != "qwen3" else 0.45  # (without latent keys the smallest plan keeps k and v dense)
    for kind, b in (("params", 0.5), ("params", low), ("kv", 0.5)):
        if family == "qwen3" and kind == "kv":
            with pytest.raises(ValueError, match="q/k norms"):
                make_plan(m, "measured-lowrank", b, data, kind, step=4)
            continue
        plan = make_plan(m, "measured-lowrank", b, data, kind, step=4)
        st = compress_model(m, plan, data)
        specs = [HeadSpec.from_dict(a) for a in st.config.attn_layers]
        used = sum(s.cost(g.hidden, kind) for s in specs)
        assert used <= b * full[kind]
        if kind == "params":  # the real parameter count of the attention modules
            assert sum(p.numel() for layer in st.model.layers for p in layer.self_attn.parameters()) == used
            assert any(s.rank_q or s.rank_o for s in specs)
        else:  # query/output factors save no cache: never chosen under a KV budget
            assert not any(s.rank_q or s.rank_o for s in specs)
        if family == "qwen3":  # per-head q/k norms: no latent keys, and so no KV budget (above)
            assert all(s.kind == "heads" for s in specs)
        with torch.no_grad():
            assert torch.isfinite(st(torch.randint(0, 300, (1, 9))).logits).all()


def test_lowrank_is_refused_for_llamacpp_and_invalid_ranks_are_named():
    m = tiny("llama")
    g = Geometry.of(m)
    hd = g.head_dim
    data = collect(m, torch.randint(0, 300, (3, 20)))
    with pytest.raises(ValueError, match="llamacpp"):
        make_plan(m, "measured-lowrank", 0.5, data, "params", target="llamacpp")
    spec = g.spec(LayerPlan(hd, hd, rank_q=4)).to_dict()
    assert any("factorises" in p for p in TARGETS["llamacpp"].problems([spec], hd))
    with pytest.raises(ValueError, match="rank_q must be in"):
        compress_model(m, Plan([LayerPlan(hd, hd, rank_q=10_000)] * 3), data)


def test_a_saved_factorised_model_loads_without_headalloc_in_bfloat16(tmp_path):
    m = tiny("qwen2")
    g = Geometry.of(m)
    hd = g.head_dim
    data = collect(m, torch.randint(0, 300, (3, 20)))
    plan = Plan([LayerPlan(hd, hd, rank_q=8, rank_o=12),
                 LayerPlan(hd, hd, kind="palu", rank_k=8, rank_v=16, rank_q=16),
                 LayerPlan(hd // 2, hd, rank_o=10, o_groups=2)])  # (a block-diagonal output down factor)
    st = compress_model(m, plan, data, dtype=torch.bfloat16)
    assert type(st.model.layers[2].self_attn.o_proj.down).__name__ == "BlockDown"
    from headalloc.compression.export import save_compressed

    save_compressed(st, tiny_tokenizer(), tmp_path / "m")
    ids = torch.randint(0, 300, (1, 12))
    with torch.no_grad():
        want = st(ids).logits.float()
    got = logits_without_headalloc(tmp_path / "m", ids, tmp_path, dtype=torch.bfloat16)
    torch.testing.assert_close(got, want, atol=1e-3, rtol=1e-3)


def test_output_weighted_factorisation_is_eckart_young_in_the_weighted_metric():
    """E[(dW x)^T D (dW x)] = tr(D dW C dW^T) of the out_weight factorisation equals the Eckart-Young tail of
    D^{1/2} W C^{1/2} (scipy's sqrtm, independent of ours), and beats the input-only whitened factorisation
    in that metric."""
    import numpy as np
    import scipy.linalg

    from headalloc.compression.reduce import whitened_low_rank

    rng = np.random.default_rng(3)
    W = torch.tensor(rng.standard_normal((14, 18)))
    X = rng.standard_normal((400, 18)) @ rng.standard_normal((18, 18))
    Y = rng.standard_normal((400, 14)) @ rng.standard_normal((14, 14))
    C, D = torch.tensor(X.T @ X / 400), torch.tensor(Y.T @ Y / 400)
    tail = lambda r: float((np.linalg.svd(np.real(scipy.linalg.sqrtm(D.numpy())) @ W.numpy()  # noqa: E731
                                          @ np.real(scipy.linalg.sqrtm(C.numpy())), compute_uv=False)[r:] ** 2).sum())
    for r in (2, 7):
        up, down = whitened_low_rank(W, C, r, out_weight=D)
        E = W - up.double() @ down.double()
        assert float(torch.trace(D @ E @ C @ E.T)) == pytest.approx(tail(r), rel=1e-4)
        up0, down0 = whitened_low_rank(W, C, r)
        E0 = W - up0.double() @ down0.double()
        assert float(torch.trace(D @ E0 @ C @ E0.T)) > tail(r)


def test_fisher_weighted_output_factors_lower_the_planners_estimate():
    """factor_output='fisher': the output factor of each layer has a lower Fisher-weighted error (layer_error, the
    planners' estimate) than the input-only one."""
    from headalloc.compression.families import adapter_for
    from headalloc.compression.planning.estimates import layer_error, with_grads
    from headalloc.compression.reduce import factor_inputs, reduce_layer

    m = tiny("llama")
    g = Geometry.of(m)
    hd = g.head_dim
    cal = with_grads(m, collect(m, torch.randint(0, 300, (6, 24))), Measurements())
    inputs, fisher_inputs = factor_inputs(m, cal, "input"), factor_inputs(m, cal, "fisher")
    lp = LayerPlan(hd, hd, rank_o=5)
    for l in range(g.n_layers):
        w = adapter_for(m).weights(m, l)
        plain = layer_error(m, l, cal, *reduce_layer(w, cal.second_moment[l], lp, g, l, **inputs.for_layer(l)))
        kw = fisher_inputs.for_layer(l)
        assert kw["out_weight"] is not None
        fisher = layer_error(m, l, cal, *reduce_layer(w, cal.second_moment[l], lp, g, l, **kw))
        assert fisher < plain


def test_plan_figure_counts_each_side_as_the_budget_does():
    """The plan figure's query-key + value-output parameters add up to HeadSpec.params (what budgets count) for
    narrowed, pruned, factorised and latent layers of SmolLM2's shape (no biases)."""
    from headalloc.reports.figures import side_params

    g = Geometry(head_dim=64, n_kv=3, n_rep=3, hidden=576, n_layers=1)
    plans = [LayerPlan(64, 64), LayerPlan(32, 48), LayerPlan(64, 64, keep_kv=[0, 2], keep_rep=[[1], [0]]),
             LayerPlan(64, 64, rank_q=96, rank_o=160), LayerPlan(64, 64, kind="palu", rank_k=64, rank_v=96, rank_q=32),
             LayerPlan(64, 64, keep_kv=[], keep_rep=[])]
    for lp in plans:
        assert sum(side_params(lp.to_dict())) == g.spec(lp).params(576)


def test_output_factor_is_the_best_rank_r_map_of_the_teachers_head_outputs():
    """A layer whose only change is rank_o reads the teacher's own head outputs z, so its output error
    E|W_O z - W' z|^2 on the calibration text must equal the Eckart-Young tail of W_O E[zz^T]^{1/2} (scipy's
    sqrtm; z recovered by a linear solve from the family attention's output, independent of our hooks)."""
    import numpy as np
    import scipy.linalg

    from headalloc.compression.families import adapter_for
    from headalloc.compression.reduce import attention_module, factor_inputs, reduce_layer

    m = tiny("llama-bias")
    g = Geometry.of(m)
    hd = g.head_dim
    cal = collect(m, torch.randint(0, 300, (3, 16)))
    attn = m.model.layers[2].self_attn
    W, b = attn.o_proj.weight.detach().double(), attn.o_proj.bias.detach().double()
    with torch.no_grad():
        ys = [attn(hidden_states=X, position_embeddings=pe, attention_mask=None)[0][0].double()
              for X, pe in zip(cal.inputs[2], cal.positions)]
    Z = torch.cat([torch.linalg.solve(W, (y - b).T).T for y in ys])
    Cz = (Z.T @ Z / Z.shape[0]).numpy()
    r = 5
    spec, red = reduce_layer(adapter_for(m).weights(m, 2), cal.second_moment[2], LayerPlan(hd, hd, rank_o=r), g, 2,
                             **factor_inputs(m, cal).for_layer(2))
    mod = attention_module(m.config.get_text_config(), spec, red, 2)
    with torch.no_grad():
        err = sum(float((mod(hidden_states=X, position_embeddings=pe, attention_mask=None)[0][0].double() - y)
                        .square().sum()) for X, pe, y in zip(cal.inputs[2], cal.positions, ys)) / Z.shape[0]
    s = np.linalg.svd(W.numpy() @ np.real(scipy.linalg.sqrtm(Cz)), compute_uv=False)
    assert err == pytest.approx(float((s[r:] ** 2).sum()), rel=1e-2)  # (float32 layer)


def test_plain_output_factor_is_the_truncated_svd_of_the_weights():
    """factor_output='plain': the output factor is numpy's truncated SVD of W_O (no calibration statistics)."""
    import numpy as np

    from headalloc.compression.families import adapter_for
    from headalloc.compression.reduce import factor_inputs, reduce_layer

    m = tiny("llama")
    g = Geometry.of(m)
    hd = g.head_dim
    cal = collect(m, torch.randint(0, 300, (3, 16)))
    w = adapter_for(m).weights(m, 1)
    kw = factor_inputs(m, cal, "plain").for_layer(1)
    _, red = reduce_layer(w, cal.second_moment[1], LayerPlan(hd, hd, rank_o=4), g, 1, **kw)
    U, S, Vh = np.linalg.svd(w.o.detach().double().numpy())
    want = (U[:, :4] * S[:4]) @ Vh[:4]
    np.testing.assert_allclose((red.o.double() @ red.o_down.double()).numpy(), want, atol=1e-5)


def test_whiten_shrink_pulls_the_output_factor_to_the_plain_one():
    """whiten_shrink also applies to the head outputs' moment: shrunk all the way toward isotropic, the output
    factor whitened by it is numpy's plain truncated SVD of W_O; unshrunk it differs from it."""
    import numpy as np

    from headalloc.compression.families import adapter_for
    from dataclasses import replace

    from headalloc.compression.reduce import factor_inputs, reduce_layer

    m = tiny("llama")
    g = Geometry.of(m)
    hd = g.head_dim
    w = adapter_for(m).weights(m, 1)
    U, S, Vh = np.linalg.svd(w.o.detach().double().numpy())
    plain = (U[:, :4] * S[:4]) @ Vh[:4]
    ids = torch.randint(0, 300, (3, 16))
    gaps = {}
    for alpha in (0.0, 1 - 1e-9):
        cal = replace(collect(m, ids), whiten_shrink=alpha)
        kw = factor_inputs(m, cal, "input").for_layer(1)
        _, red = reduce_layer(w, cal.second_moment[1], LayerPlan(hd, hd, rank_o=4), g, 1, **kw)
        gaps[alpha] = float(np.abs((red.o.double() @ red.o_down.double()).numpy() - plain).max())
    assert gaps[1 - 1e-9] < 1e-5 < gaps[0.0]


def test_moments_over_more_windows_pool_the_calibration_and_fitting_windows():
    """moment_windows: the whitening moments are those of the calibration windows and an evenly spaced subset of
    the end-to-end windows together, checked against one collect() over all of those windows at once; the head
    outputs' moment (hooked on o_proj in the model's forward) against output_moments' per-layer recomputation."""
    from headalloc.compression.fit_text import fit_windows
    from headalloc.compression.pipeline import prepare
    from headalloc.compression.settings import preset

    m = tiny("llama-bias")
    tok = tiny_tokenizer()
    tiny_cfg = dict(calib_windows=2, calib_length=16, kd_windows=5, kd_length=16, corpus="pydoc", fit_text="corpus",
                    autocast="none")  # (float32 passes, as the collect() reference; test_precision covers bfloat16)
    cfg = preset("default", budget=0.5, strategy="measured-lowrank", moment_windows=3, **tiny_cfg)
    cal = prepare(m, tok, cfg).calibration
    kd = fit_windows(m, tok, cfg, cfg.kd.windows, cfg.kd.length, cfg.runtime.seed + 2, False)
    assert len(cal.windows) == 2  # the stored inputs stay the calibration windows'
    both = torch.cat([cal.windows, kd[torch.tensor([0, 2, 4])]])
    whole = collect(m, both, keep=True)
    for l in range(3):
        # the calibration runs the fitting windows 4 to a forward; the float32 sums then differ in rounding order
        # from one forward over all windows (CI's CPU: 5e-7 relative), so the bound is float32 accumulation's
        torch.testing.assert_close(cal.second_moment[l], whole.second_moment[l], atol=1e-6, rtol=1e-5)
        torch.testing.assert_close(output_moments(m, cal)[l], output_moments(m, whole)[l], atol=1e-6, rtol=1e-4)


def test_one_teacher_pass_gives_the_moments_and_those_windows_distillation_targets():
    """With moment_windows, the calibration's forward passes over the fitting windows also give their top-k
    targets: kd_targets then runs the teacher only on the other windows, and its targets equal teacher_topk's
    over every window (one window at a time); no more forward passes than windows in all."""
    from headalloc.compression.distill import merge_topk, teacher_topk
    from headalloc.compression.pipeline import kd_targets, prepare
    from headalloc.compression.settings import preset

    m = tiny("llama-bias")
    tok = tiny_tokenizer()
    cfg = preset("default", budget=0.5, strategy="measured-lowrank", moment_windows=3, calib_windows=2,
                 calib_length=16, kd_windows=5, kd_length=16, kd_topk=8, corpus="pydoc", fit_text="corpus",
                 autocast="none")  # (float32 passes, as the teacher_topk reference; test_precision covers bfloat16)
    rows = []
    hook = m.model.register_forward_pre_hook(lambda mod, args, kwargs: rows.append(len(kwargs["input_ids"])),
                                             with_kwargs=True)
    try:
        ws = prepare(m, tok, cfg)
        assert sum(rows) == 2 + 3  # calibration windows + the moment windows
        rows.clear()
        w, got = kd_targets(m, tok, cfg, ws, progress=False)
        assert sum(rows) == 5 - 3  # only the windows the calibration pass did not run
    finally:
        hook.remove()
    ref = teacher_topk(m, w, k=8, progress=False, batch=1)
    assert torch.equal(got["ids"], ref["ids"])
    torch.testing.assert_close(got["probs"], ref["probs"])
    torch.testing.assert_close(got["tail"], ref["tail"])
    assert got["mass"] == pytest.approx(ref["mass"])
    with pytest.raises(ValueError, match="cover"):
        merge_topk(5, [(torch.tensor([0, 1]), ref)])


def test_full_vocabulary_kl_stores_no_targets_and_runs_no_extra_teacher_pass():
    """kd_topk 0: the calibration's pass over the moment windows keeps no targets and kd_targets runs the teacher on
    no window (the end-to-end stage runs it at each step); a negative kd_topk is refused by name."""
    from headalloc.compression.pipeline import kd_targets, prepare
    from headalloc.compression.settings import preset

    m = tiny("llama-bias")
    tok = tiny_tokenizer()
    cfg = preset("default", budget=0.5, strategy="measured-lowrank", moment_windows=3, calib_windows=2,
                 calib_length=16, kd_windows=5, kd_length=16, kd_topk=0, corpus="pydoc", fit_text="corpus",
                 heldout="none")
    cfg.validate()
    rows = []
    hook = m.model.register_forward_pre_hook(lambda mod, args, kwargs: rows.append(len(kwargs["input_ids"])),
                                             with_kwargs=True)
    try:
        ws = prepare(m, tok, cfg)
        rows.clear()
        w, targets = kd_targets(m, tok, cfg, ws, progress=False)
    finally:
        hook.remove()
    assert targets is None and rows == [] and w.shape == (5, 16)
    assert not ws.teacher.partial_targets  # nothing vocabulary-sized kept from the calibration pass
    with pytest.raises(ValueError, match="kd_topk"):
        preset("default", budget=0.5, kd_topk=-1).validate()


@pytest.mark.parametrize("family", ["llama", "llama-bias", "qwen2", "phi3"])
def test_block_output_factors_at_full_block_rank_are_the_family_model_and_count_their_parameters(family):
    """A block-diagonal output down factor (o_groups = kv heads): exact at full rank per block against the family's
    own model; at low rank the budget's parameter count is the modules' own and a cached decode matches the full
    forward."""
    m = tiny(family)
    g = Geometry.of(m)
    hd, nq = g.head_dim, g.n_kv * g.n_rep * g.head_dim
    data = collect(m, torch.randint(0, 300, (3, 20)))
    st = compress_model(m, Plan([LayerPlan(hd, hd, rank_o=nq, o_groups=g.n_kv)] * g.n_layers), data)
    ids = torch.randint(0, 300, (2, 15))
    with torch.no_grad():
        torch.testing.assert_close(st(ids).logits, m(ids).logits, atol=3e-5, rtol=1e-4)
        low = compress_model(m, Plan([LayerPlan(hd, hd, rank_o=8, o_groups=g.n_kv),
                                      LayerPlan(hd, hd, rank_q=6, rank_o=12, o_groups=g.n_kv),
                                      LayerPlan(hd, hd, rank_o=8)]), data)
        ref = low(ids).logits
        a = low(ids[:, :9], **{CACHE_NAME: DynamicCache(config=low.config.text_config)}, use_cache=True)
        b = low(ids[:, 9:], **{CACHE_NAME: getattr(a, CACHE_NAME)}, use_cache=True)
        torch.testing.assert_close(b.logits, ref[:, 9:], atol=3e-5, rtol=1e-4)
    for layer, spec in zip(low.model.layers, low.config.attn_layers):
        assert HeadSpec.from_dict(spec).params(g.hidden) == sum(p.numel() for p in layer.self_attn.parameters())
    assert low.config.attn_layers[0]["o_groups"] == g.n_kv and low.config.attn_layers[2]["o_groups"] == 0
    with pytest.raises(ValueError, match="block-diagonal"):
        compress_model(m, Plan([LayerPlan(hd, hd, rank_o=9, o_groups=g.n_kv)] * g.n_layers), data)


def test_block_output_factor_has_the_least_squares_up_factor_and_beats_its_blocks_alone():
    """block_whitened_low_rank: the down factor is block-diagonal, each block the whitened truncated SVD of its
    columns (checked against torch's SVD of the whitened block); the shared up factor makes the error's gradient
    vanish (autograd) and so is no worse than the blocks' own up factors."""
    from headalloc.compression.reduce import block_whitened_low_rank

    g = torch.Generator().manual_seed(0)
    W = torch.randn(10, 12, generator=g, dtype=torch.float64)
    A = torch.randn(12, 40, generator=g, dtype=torch.float64)
    C = A @ A.T / 40 + 0.3 * torch.ones(12, 12, dtype=torch.float64)  # correlated across the blocks
    up, down = block_whitened_low_rank(W, C, rank=6, groups=3)
    assert up.shape == (10, 6) and down.shape == (3, 2, 4)
    D = torch.block_diag(*down.double())
    U = up.double().requires_grad_(True)
    err = torch.trace((W - U @ D) @ C @ (W - U @ D).T)
    err.backward()
    assert U.grad.abs().max() < 1e-4 * float(err.detach())
    # each block alone: the best rank-2 map of its columns in its own metric (Eckart-Young)
    alone = torch.zeros_like(W)
    for j in range(3):
        b = slice(4 * j, 4 * j + 4)
        e, V = torch.linalg.eigh(C[b, b])
        S = (V * e.sqrt()) @ V.T
        u, sv, vt = torch.linalg.svd(W[:, b] @ S)
        alone[:, b] = (u[:, :2] * sv[:2]) @ vt[:2] @ torch.linalg.inv(S)
        # the block's down rows span the same row space as the SVD's
        P = vt[:2] @ torch.linalg.inv(S)
        Q = D[2 * j:2 * j + 2, b]
        assert int(torch.linalg.matrix_rank(torch.cat([P, Q]), rtol=1e-5)) == 2  # (float32 factors)
    err_alone = torch.trace((W - alone) @ C @ (W - alone).T)
    assert float(err.detach()) <= float(err_alone) + 1e-6


def test_measured_lowrank_with_output_groups_meets_the_budget_and_measures_both_structures():
    from headalloc.compression.planning.lowrank import measured_lowrank_plan
    from headalloc.compression.planning.state import QueryOutputErrors

    m = tiny("llama-bias")
    g = Geometry.of(m)
    data = collect(m, torch.randint(0, 300, (3, 20)))
    store = Measurements()
    full = g.spec(g.full()).cost(g.hidden, "params") * g.n_layers
    for b in (0.5, 0.35):
        plan, info = measured_lowrank_plan(PlanRequest(m, b, "params", step=4, calibration=data,
                                                       options=PlanOptions(output_groups=True), measurements=store))
        assert info["output_groups"] == g.n_kv and info["rank_grid_o_groups"]
        st = compress_model(m, Plan(plan), data)
        used = sum(HeadSpec.from_dict(a).params(g.hidden) for a in st.config.attn_layers)
        assert used <= b * full
        assert sum(p.numel() for layer in st.model.layers for p in layer.self_attn.parameters()) == used
    # one store serves both budgets: the candidates' estimates were measured once
    assert len([k for k in store.keys() if isinstance(k, QueryOutputErrors)]) == 1
