"""plan_error 'leave-part-out': per-part moments from the calibration pass, moments without a part, and the
factorised strategies' estimates (layer errors, candidate plans' losses) fitted without each part and measured on
it; references are collect() over the windows themselves and transformers' own labels loss."""

import pytest
import torch
from families import held_cache_bytes, tiny, tiny_tokenizer

from headalloc.compression.calibration import collect
from headalloc.compression.reduce import Geometry, compress_model
from headalloc.compression.spec import LayerPlan, Plan


def _two_kinds(m, seed: int = 1):
    """Calibration over two kinds of "text" (tokens from the whole vocabulary, tokens from a dozen), with each
    kind's own moments as its part moments: the independent reference for what the pipeline builds."""
    torch.manual_seed(seed)
    wide, narrow = torch.randint(0, 300, (3, 24)), torch.randint(0, 12, (3, 24))
    data = collect(m, torch.cat([wide, narrow]), outputs=True)
    data.parts = ["wide"] * 3 + ["narrow"] * 3
    own = {k: collect(m, w, keep=False, outputs=True) for k, w in (("wide", wide), ("narrow", narrow))}
    data.part_moments = {k: (c.second_moment, c.out_moment, c.tokens) for k, c in own.items()}
    return data, wide, narrow, own


def test_the_pipeline_keeps_each_parts_moments_and_pools_them_as_before():
    """With leave-part-out the calibration pass runs the moment windows part by part: each part's moments are those
    of collect() over that part's windows alone, the pooled moments and the distillation targets are those of the
    default (pooled) calibration, and the moments without a part are collect()'s over the other parts' windows."""
    from headalloc.compression.fit_text import fit_windows
    from headalloc.compression.pipeline import kd_targets, prepare
    from headalloc.compression.settings import preset

    m = tiny("llama-bias")
    tok = tiny_tokenizer()
    base = dict(budget=0.5, strategy="measured-lowrank", moment_windows=4, calib_windows=2, calib_length=16,
                kd_windows=6, kd_length=16, kd_topk=8, corpus="pydoc", fit_text="corpus+stdlib", heldout="none",
                autocast="none")  # (float32 passes, as the collect() references below; test_precision covers bfloat16)
    lpo = preset("default", plan_error="leave-part-out", **base).validate()
    pooled = preset("default", **base).validate()
    ws_lpo, ws_ref = prepare(m, tok, lpo), prepare(m, tok, pooled)
    cal, ref = ws_lpo.calibration, ws_ref.calibration
    kd, parts = fit_windows(m, tok, lpo, lpo.kd.windows, lpo.kd.length, lpo.runtime.seed + 2, False, parts=True)
    idx = torch.linspace(0, 5, 4).long().unique().tolist()
    assert sorted(cal.part_moments) == sorted({parts[i] for i in idx}) and ref.part_moments is None
    for p, (sm, om, n) in cal.part_moments.items():
        own = collect(m, kd[[i for i in idx if parts[i] == p]], keep=False, outputs=True)
        assert n == own.tokens
        for l in range(3):
            torch.testing.assert_close(sm[l], own.second_moment[l], atol=1e-6, rtol=1e-5)
            torch.testing.assert_close(om[l], own.out_moment[l], atol=1e-6, rtol=1e-5)
    for l in range(3):
        torch.testing.assert_close(cal.second_moment[l], ref.second_moment[l], atol=1e-6, rtol=1e-5)
        torch.testing.assert_close(cal.out_moment[l], ref.out_moment[l], atol=1e-6, rtol=1e-5)
    got = kd_targets(m, tok, lpo, ws_lpo, progress=False)[1]
    want = kd_targets(m, tok, pooled, ws_ref, progress=False)[1]
    assert torch.equal(got["ids"], want["ids"])
    torch.testing.assert_close(got["probs"], want["probs"])
    for p in cal.part_moments:
        others = collect(m, kd[[i for i in idx if parts[i] != p]], keep=False, outputs=True)
        without = cal.excluding(p)
        for l in range(3):
            torch.testing.assert_close(without.second_moment[l], others.second_moment[l], atol=1e-6, rtol=1e-5)
            torch.testing.assert_close(without.out_moment[l], others.out_moment[l], atol=1e-6, rtol=1e-5)


def test_candidate_plans_are_scored_on_each_part_by_a_model_fitted_without_it():
    """plan_losses under leave-part-out: each window's loss is that of the model compressed with the other part's
    moments only (built from collect() over the other kind's windows), by transformers' labels path."""
    from headalloc.compression.planning import MeasureOptions
    from headalloc.compression.planning.select import plan_losses

    m = tiny("llama")
    g = Geometry.of(m)
    hd = g.head_dim
    data, wide, narrow, own = _two_kinds(m)
    plan = [LayerPlan(hd, hd, rank_q=4, rank_o=4)] + [g.full() for _ in range(g.n_layers - 1)]
    got = plan_losses(m, data, {"p": plan}, per_window=True, measure=MeasureOptions(error="leave-part-out"))["p"]
    for k, ws, other in (("wide", wide, "narrow"), ("narrow", narrow, "wide")):
        fit = collect(m, torch.cat([wide, narrow]), outputs=True)  # inputs kept; moments replaced below
        fit.second_moment, fit.out_moment = own[other].second_moment, own[other].out_moment
        st = compress_model(m, Plan(plan), fit)  # (output projection whitened by the head outputs: 'input')
        with torch.no_grad():
            ref = torch.stack([st(input_ids=w[None], labels=w[None]).loss.double() for w in ws])
        rows = [i for i, p in enumerate(data.parts) if p == k]
        torch.testing.assert_close(got[rows], ref, atol=1e-5, rtol=1e-5)


def test_an_unseen_kind_costs_more_than_the_pooled_estimate_and_the_strategy_plans_on_it():
    """A low-rank query fitted without a kind of text loses more on that kind than one fitted with it (the pooled
    estimate is in-sample): the leave-part-out error is larger. Our measured strategies then plan on such errors
    and still meet their budgets."""
    from headalloc.compression.planning import STRATEGIES, MeasureOptions, Measurements, PlanOptions, PlanRequest
    from headalloc.compression.planning.estimates import candidate_error

    m = tiny("llama")
    g = Geometry.of(m)
    hd = g.head_dim
    data, *_ = _two_kinds(m)
    lp = LayerPlan(hd, hd, rank_q=2)
    pooled = candidate_error(m, 1, data, lp, {})
    assert candidate_error(m, 1, data, lp, {}, measure=MeasureOptions(error="leave-part-out")) > pooled
    store = Measurements()
    for name, kind, budget in (("measured", "params", 0.5), ("measured-latent", "kv", 0.45),
                               ("measured-lowrank", "params", 0.5)):
        opts = PlanOptions(error="leave-part-out", exponents=(1.0, 2.0))
        plan, info = STRATEGIES[name].fn(PlanRequest(m, budget, kind, step=2, calibration=data, options=opts,
                                                     measurements=store))
        st = compress_model(m, Plan(plan), data)
        if kind == "kv":  # the cache the model really holds, both float32
            assert held_cache_bytes(st) <= budget * held_cache_bytes(m)
        else:  # the parameters the model really has
            attn = lambda x: sum(p.numel() for layer in x.model.layers for p in layer.self_attn.parameters())  # noqa
            assert attn(st) <= budget * attn(m)


def test_leave_part_out_needs_two_parts_and_says_so():
    from headalloc.compression.settings import preset

    with pytest.raises(ValueError, match="two or more parts"):
        preset("default", plan_error="leave-part-out", fit_text="corpus").validate()
    with pytest.raises(ValueError, match="plan_error must be one of pooled, leave-part-out; got 'held-out'"):
        preset("default", plan_error="held-out").validate()
    m = tiny("llama")
    data = collect(m, torch.randint(0, 300, (2, 16)), outputs=True)
    data.parts = ["a", "a"]
    with pytest.raises(ValueError, match="two or more parts"):
        data.folds()


def test_a_pooled_calibration_is_refused_for_leave_part_out_planning():
    """A calibration made without per-part moments cannot give leave-part-out estimates: planning with it says so
    before any measuring (`pipeline.plan_options`, which compress() and the benchmarks read the options through)."""
    from headalloc.compression.pipeline import plan_options
    from headalloc.compression.settings import preset
    from headalloc.compression.workspace import Workspace

    m = tiny("llama")
    data = collect(m, torch.randint(0, 300, (2, 16)), outputs=True)
    cfg = preset("default", plan_error="leave-part-out", plan_select="worst-part")
    with pytest.raises(ValueError, match="needs a calibration made with it"):
        plan_options(Workspace(data), cfg)
    data.part_moments = {"a": (data.second_moment, data.out_moment, data.tokens)}
    opts = plan_options(Workspace(data), cfg)
    assert (opts.select, opts.error) == ("worst-part", "leave-part-out")
