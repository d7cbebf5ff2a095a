"""Compression strategies: the knapsack against brute force, budgets honoured, bad input rejected."""

import itertools

import numpy as np
import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from headalloc.cli import main
from headalloc.compression.calibration import collect
from headalloc.compression.reduce import Geometry, compress_model
from headalloc.compression.spec import HeadSpec, LayerPlan
from headalloc.compression.planning import STRATEGIES, PlanRequest, check_budget, knapsack, make_plan
from headalloc.compression.planning.heads import depth_plan, uniform_plan
from headalloc.evaluation.lm import counts


def test_knapsack_equals_brute_force():
    rng = np.random.default_rng(0)
    for _ in range(20):
        options = [[(int(rng.integers(1, 6)) * 3, float(rng.random())) for _ in range(4)] for _ in range(4)]
        cap = int(rng.integers(12, 50))
        feasible = [c for c in itertools.product(*[range(4)] * 4)
                    if sum(options[l][j][0] for l, j in enumerate(c)) <= cap]
        if not feasible:
            with pytest.raises(ValueError, match="no plan meets the budget"):
                knapsack(options, cap)
            continue
        best = min(sum(options[l][j][1] for l, j in enumerate(c)) for c in feasible)
        picks = knapsack(options, cap)
        assert sum(options[l][j][1] for l, j in enumerate(picks)) == pytest.approx(best)
        assert sum(options[l][j][0] for l, j in enumerate(picks)) <= cap


def tiny():
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=100, hidden_size=48, intermediate_size=96, num_hidden_layers=4,
                      num_attention_heads=6, num_key_value_heads=2, head_dim=16, max_position_embeddings=64)
    return LlamaForCausalLM(cfg).eval()


@pytest.mark.parametrize("strategy", ["uniform", "depth", "measured", "prune-heads"])
@pytest.mark.parametrize("kind", ["params", "kv"])
def test_every_strategy_meets_the_budget(strategy, kind):
    model = tiny()
    data = collect(model, torch.randint(0, 100, (3, 24)))
    plan = make_plan(model, strategy, 0.5, data, kind, step=4, progress=False)
    student = compress_model(model, plan, data)
    full = 4 * HeadSpec(2, 3, 16, 16).cost(48, kind)
    used = sum(HeadSpec.from_dict(a).cost(48, kind) for a in student.config.attn_layers)
    assert used <= 0.5 * full
    with torch.no_grad():
        assert torch.isfinite(student(torch.randint(0, 100, (1, 10))).logits).all()
    if kind == "params":  # the formula against the student's actual attention tensors
        real = sum(p.numel() for l in student.model.layers for p in l.self_attn.parameters())
        assert counts(student)["params_attention"] == real


def test_depth_keeps_early_layers_wider():
    plan, _ = depth_plan(PlanRequest(tiny(), 0.5, step=4))
    dims = [p.qk_dim for p in plan]
    assert dims[0] > dims[-1] and dims == sorted(dims, reverse=True)
    assert [p.qk_dim for p in uniform_plan(PlanRequest(tiny(), 0.5, step=4))[0]] == [8] * 4


def test_a_registered_strategy_is_offered_by_the_cli_and_planned_by_make_plan():
    """Adding a strategy is one decorated function: the CLI offers it, `make_plan` runs it with the request it is
    given, and its plan is checked against the target like any other."""
    from headalloc.cli import build_parser
    from headalloc.compression.planning import strategy

    seen = {}

    @strategy("every-other-layer-half", needs_calibration=False)
    def half(req):
        """Test: every other layer at half width."""
        seen["req"] = req
        hd = req.geometry.head_dim
        return [LayerPlan(hd // 2 if l % 2 else hd, hd // 2 if l % 2 else hd) for l in range(req.geometry.n_layers)], {}

    try:
        ap = build_parser()
        sub = next(a for a in ap._actions if a.dest == "command").choices["compress"]
        action = next(a for a in sub._actions if a.dest == "strategy")
        assert "every-other-layer-half" in action.choices and "auto" in action.choices
        assert "every other layer at half width" in sub.description
        plan = make_plan(tiny(), "every-other-layer-half", 0.9, step=4)
        assert [lp.qk_dim for lp in plan] == [16, 8, 16, 8] and plan.strategy == "every-other-layer-half"
        assert seen["req"].budget == 0.9 and seen["req"].step == 4 and seen["req"].calibration is None
        with pytest.raises(ValueError, match="already registered"):
            strategy("every-other-layer-half")(half)
    finally:
        STRATEGIES.pop("every-other-layer-half")


def test_auto_picks_by_budget_kind_target_and_family():
    """The default strategy "auto" gives exactly the plan of the strategy it names for the setting (made
    independently by name), and the plan records the concrete strategy and that it was picked."""
    from families import tiny as tiny_family

    from headalloc.compression.settings import CompressConfig

    assert CompressConfig().plan.strategy == "auto"
    model = tiny()
    data = collect(model, torch.randint(0, 100, (3, 24)))
    for kind, target, expect in (("params", "any", "measured-lowrank"), ("kv", "any", "measured-latent"),
                                 ("params", "llamacpp", "measured")):
        plan = make_plan(model, "auto", 0.5, data, kind, step=4, target=target)
        ref = make_plan(model, expect, 0.5, data, kind, step=4, target=target)
        assert plan.strategy == expect and plan.info["picked_by"] == "auto"
        assert list(plan) == list(ref), (kind, target)
    q3 = tiny_family("qwen3")  # per-head q/k norms: no latent keys, so a KV budget goes to measured
    data = collect(q3, torch.randint(0, 100, (2, 16)))
    assert make_plan(q3, "auto", 0.5, data, "kv", step=4).strategy == "measured"


def test_bad_budget_strategy_and_family_fail_before_work(capsys):
    with pytest.raises(ValueError, match=r"in \(0, 1\]"):
        check_budget(0.0, "uniform")
    with pytest.raises(ValueError, match="unknown strategy"):
        check_budget(0.5, "random")
    assert main(["compress", "--budget", "2"]) == 2
    assert "budget must be a fraction" in capsys.readouterr().err


def test_measured_with_head_choices_is_never_worse_than_widths_or_pruning_alone():
    """The measured plan's candidate set is the union of narrowing and head removal, so its predicted
    loss increase (same estimator, exact knapsack) is at most either alone's, by brute-force evaluation
    of the other two plans under the same estimator."""
    from headalloc.compression.families import adapter_for
    from headalloc.compression.planning import Measurements
    from headalloc.compression.planning.estimates import layer_error, with_grads
    from headalloc.compression.planning.heads import measured_plan, prune_plan
    from headalloc.compression.reduce import reduce_layer

    model = tiny()
    store = Measurements()
    data = with_grads(model, collect(model, torch.randint(0, 100, (3, 24))), store)  # (the planners' estimator)
    ad, g = adapter_for(model), Geometry.of(model)

    def predicted(plan):
        return sum(layer_error(model, l, data, *reduce_layer(ad.weights(model, l), None, lp, g, l))
                   for l, lp in enumerate(plan))

    full = 4 * HeadSpec(2, 3, 16, 16).params(48)
    for budget in (0.3, 0.5, 0.8):
        req = PlanRequest(model, budget, step=4, calibration=data, measurements=store)
        both, info = measured_plan(req, heads=True)
        widths, _ = measured_plan(req, heads=False)
        pruned, _ = prune_plan(req)
        # the measured estimator is additive over qk and v; compare on the same footing: each plan's
        # own knapsack objective is at least the union's optimum
        assert info["predicted_error"] <= min(predicted(pruned),
                                              measured_plan(req, heads=False)[1]["predicted_error"]) + 1e-9
        for plan in (both, widths, pruned):
            assert len(plan) == 4 and sum(g.spec(lp).params(48) for lp in plan) <= budget * full
        assert any(lp.keep_kv is not None for lp in pruned) and all(lp.keep_kv is None for lp in widths)


@pytest.mark.parametrize("rows", [10_000, 48, 24])
def test_layer_error_several_windows_to_a_pass_equals_one_window_at_a_time(monkeypatch, rows):
    """The planning estimates measure several calibration windows per pass (`window_batches`); each window through
    Hugging Face's own attention module alone, summed by hand, is the reference (with and without gradients, over all
    windows and a listed subset), and a window of another length goes in a pass of its own."""
    import headalloc.compression.planning.estimates as st
    from headalloc.compression.families import adapter_for
    from headalloc.compression.spec import LayerPlan

    monkeypatch.setattr(st, "ROWS_PER_PASS", rows)
    model = tiny()
    data = collect(model, torch.randint(0, 100, (5, 24)))
    ad, g = adapter_for(model), Geometry.of(model)
    lp = LayerPlan(16, 16, rank_q=8)
    for l in (0, 3):
        spec, w = st.reduce_layer(ad.weights(model, l), data.second_moment[l], lp, g, l)
        student = st.attention_module(model.config, spec, w, l)
        attn = ad.attention(model, l)
        with torch.no_grad():
            dys = [attn(hidden_states=X, position_embeddings=pe, attention_mask=None)[0]
                   - student(hidden_states=X, position_embeddings=pe, attention_mask=None)[0]
                   for X, pe in zip(data.inputs[l], data.positions)]
        plain = [float(dy.double().square().sum(-1).mean()) / data.resid_sq[l] for dy in dys]
        assert st.layer_error(model, l, data, spec, w) == pytest.approx(sum(plain) / 5, rel=1e-5)
        assert st.layer_error(model, l, data, spec, w, windows=[1, 4]) == pytest.approx((plain[1] + plain[4]) / 2,
                                                                                       rel=1e-5)
        grads = [[torch.randn_like(X) for X in data.inputs[k]] for k in range(4)]
        weighted = [float((gr * dy).double().sum(-1).square().sum()) for gr, dy in zip(grads[l], dys)]
        data.grads = grads
        assert st.layer_error(model, l, data, spec, w) == pytest.approx(sum(weighted) / 5, rel=1e-5)
        data.grads = None
    assert st.window_batches(data, 0, range(5)) == ([[0, 1, 2, 3, 4]] if rows >= 120 else
                                                    [[0, 1], [2, 3], [4]] if rows == 48 else [[i] for i in range(5)])
    other = collect(model, torch.randint(0, 100, (1, 20)))  # a shorter window: its own pass
    data.inputs = [x + o for x, o in zip(data.inputs, other.inputs)]
    data.positions = data.positions + other.positions
    assert [5] in st.window_batches(data, 0, range(6))
