"""Palu-style latent keys and values: exact at full rank per family, the whitened factorisation against
Eckart-Young with an independent matrix square root, cached decoding, saving, the strategies' budgets."""

import numpy as np
import pytest
import scipy.linalg
import torch
from families import held_cache_bytes, logits_without_headalloc, tiny, tiny_tokenizer
from transformers import DynamicCache

from headalloc.compression.calibration import collect
from headalloc.compression.reduce import Geometry, compress_model, whitened_low_rank
from headalloc.compression.spec import HeadSpec, LayerPlan, Plan
from headalloc.compression.planning import STRATEGIES, Measurements, PlanOptions, PlanRequest, make_plan
from headalloc.compression.modeling_headalloc import CACHE_NAME  # 'cache' from transformers 5.24


def _one_token_at_a_time(model, ids, start):
    """Logits of positions start.. decoded one token per call from a cache of the prefix (the decode path)."""
    cache = DynamicCache(config=model.config.text_config)
    model(ids[:, :start], **{CACHE_NAME: cache}, use_cache=True)
    return torch.stack([model(ids[:, t:t + 1], **{CACHE_NAME: cache}, use_cache=True).logits[:, 0]
                        for t in range(start, ids.shape[1])], 1)


def _latent(g, rk, rv):
    return LayerPlan(g.head_dim, g.head_dim, kind="palu", rank_k=rk, rank_v=rv)


@pytest.mark.parametrize("family", ["llama", "llama-bias", "mistral", "qwen2", "phi3"])
def test_full_rank_latents_are_the_family_model_and_cache_correctly(family):
    m = tiny(family)
    g = Geometry.of(m)
    full = g.n_kv * g.head_dim
    data = collect(m, torch.randint(0, 300, (3, 20)))
    st = compress_model(m, Plan([_latent(g, full, full)] * g.n_layers), data)
    ids = torch.randint(0, 300, (2, 15))
    with torch.no_grad():
        want = m(ids).logits
        torch.testing.assert_close(st(ids).logits, want, atol=2e-5, rtol=1e-4)
        low = compress_model(m, Plan([_latent(g, 8, 16)] * g.n_layers), data)
        ref = low(ids).logits
        a = low(ids[:, :9], **{CACHE_NAME: DynamicCache(config=low.config.text_config)}, use_cache=True)
        b = low(ids[:, 9:], **{CACHE_NAME: getattr(a, CACHE_NAME)}, use_cache=True)
        torch.testing.assert_close(b.logits, ref[:, 9:], atol=2e-5, rtol=1e-4)  # keys rebuilt from cached latents
        # one token per step reads values in the latent (absorbed): against HF's model at full rank, and low rank
        torch.testing.assert_close(_one_token_at_a_time(st, ids, 4), want[:, 4:], atol=2e-5, rtol=1e-4)
        torch.testing.assert_close(_one_token_at_a_time(low, ids, 4), ref[:, 4:], atol=2e-5, rtol=1e-4)
    assert low.kv_cache_bytes_per_token(1) == g.n_layers * (8 + 16)


def test_whitened_factorisation_is_the_best_rank_r_map_for_the_data():
    """E|Wx - UDx|^2 = tr((W - UD) C (W - UD)^T) equals the Eckart-Young tail of W C^{1/2}, with C^{1/2}
    from scipy's sqrtm (independent of ours)."""
    rng = np.random.default_rng(0)
    W = torch.tensor(rng.standard_normal((12, 20)))
    X = rng.standard_normal((500, 20)) @ rng.standard_normal((20, 20))
    C = torch.tensor(X.T @ X / 500)
    for r in (1, 4, 9):
        up, down = whitened_low_rank(W, C, r)
        E = W - up.double() @ down.double()
        err = float(torch.trace(E @ C @ E.T))
        s = np.linalg.svd(W.numpy() @ np.real(scipy.linalg.sqrtm(C.numpy())), compute_uv=False)
        assert err == pytest.approx(float((s[r:] ** 2).sum()), rel=1e-4)
    # one cache serves every rank and several maps: the same factors as without it, never another map's
    cache: dict = {}
    W2 = torch.tensor(rng.standard_normal((12, 20)))
    for r in (4, 1, 9):
        for M in (W, W2, W):
            up, down = whitened_low_rank(M, C, r, cache)
            up0, down0 = whitened_low_rank(M, C, r)
            assert torch.equal(up, up0) and torch.equal(down, down0)
    assert len(cache["svd"]) == 2


@pytest.mark.parametrize("strategy", ["palu", "measured-latent"])
def test_latent_strategies_meet_the_kv_budget_and_refuse_llamacpp(strategy):
    m = tiny("llama-bias")
    g = Geometry.of(m)
    data = collect(m, torch.randint(0, 300, (3, 20)))
    plan = make_plan(m, strategy, 0.5, data, "kv", step=8)
    used = sum(g.spec(lp).kv_size() for lp in plan)
    st = compress_model(m, plan, data)
    assert held_cache_bytes(st) <= 0.5 * held_cache_bytes(m)  # the cache the model really holds, both float32
    assert st.kv_cache_bytes_per_token(1) == used
    assert [HeadSpec.from_dict(a).kv_size() for a in st.config.attn_layers] == [lp.rank_k + lp.rank_v for lp in plan]
    with pytest.raises(ValueError, match="llamacpp"):
        make_plan(m, strategy, 0.5, data, "kv", target="llamacpp")


def test_a_saved_latent_model_loads_without_headalloc(tmp_path):
    m = tiny("qwen2")
    g = Geometry.of(m)
    st = compress_model(m, Plan([_latent(g, 8, 24), _latent(g, 16, 16), _latent(g, 32, 8)]))
    from headalloc.compression.export import save_compressed

    save_compressed(st, tiny_tokenizer(), tmp_path / "m")
    ids = torch.randint(0, 300, (1, 12))
    with torch.no_grad():
        want = st(ids).logits
    torch.testing.assert_close(logits_without_headalloc(tmp_path / "m", ids, tmp_path), want, atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("family", ["llama", "llama-bias", "qwen2", "phi3"])
def test_mla_layers_with_every_pair_and_full_rank_are_the_family_model(family):
    m = tiny(family)
    g = Geometry.of(m)
    hd = g.head_dim
    data = collect(m, torch.randint(0, 300, (3, 20)))
    full = compress_model(m, Plan([LayerPlan(hd, hd, kind="mla", rank=g.n_kv * hd, rope_keep=hd // 2)] * 3), data)
    ids = torch.randint(0, 300, (2, 15))
    with torch.no_grad():
        torch.testing.assert_close(full(ids).logits, m(ids).logits, atol=2e-5, rtol=1e-4)
        low = compress_model(m, Plan([LayerPlan(hd, hd, kind="mla", rank=12, rope_keep=2)] * 3), data)
        ref = low(ids).logits
        a = low(ids[:, :9], **{CACHE_NAME: DynamicCache(config=low.config.text_config)}, use_cache=True)
        b = low(ids[:, 9:], **{CACHE_NAME: getattr(a, CACHE_NAME)}, use_cache=True)
        torch.testing.assert_close(b.logits, ref[:, 9:], atol=2e-5, rtol=1e-4)
        # one token per step: MLA's absorbed form (keys' non-rotary part and values never rebuilt)
        torch.testing.assert_close(_one_token_at_a_time(full, ids, 4), m(ids).logits[:, 4:], atol=2e-5, rtol=1e-4)
        torch.testing.assert_close(_one_token_at_a_time(low, ids, 4), ref[:, 4:], atol=2e-5, rtol=1e-4)
    assert low.kv_cache_bytes_per_token(1) == 3 * (g.n_kv * 2 * 2 + 12)
    assert HeadSpec.from_dict(low.config.attn_layers[0]).kv_size() == g.n_kv * 4 + 12


def test_mla_keeps_the_highest_energy_pairs_and_more_pairs_stay_closer_to_the_original():
    from headalloc.compression.families import adapter_for
    from headalloc.compression.reduce import pair_importance

    m = tiny("llama")
    g = Geometry.of(m)
    hd = g.head_dim
    data = collect(m, torch.randint(0, 300, (4, 24)))
    ids = torch.randint(0, 300, (2, 20))
    errs = {}
    for p in (1, 4, hd // 2):
        full_rank = g.n_kv * (2 * hd - 2 * p)  # no truncation: only the dropped rotation differs
        st = compress_model(m, Plan([LayerPlan(hd, hd, kind="mla", rank=full_rank, rope_keep=p)] * 3), data)
        with torch.no_grad():
            errs[p] = float((st(ids).logits - m(ids).logits).square().mean())
        if p == 4:
            imp = pair_importance(adapter_for(m).weights(m, 0), data.second_moment[0], g)
            assert st.config.attn_layers[0]["rope_pairs"] == [sorted(torch.topk(imp[kv], 4).indices.tolist())
                                                             for kv in range(g.n_kv)]
    assert errs[hd // 2] < 1e-9 < errs[4] < errs[1]


def test_mha2mla_strategy_meets_the_budget():
    m = tiny("llama-bias")
    g = Geometry.of(m)
    data = collect(m, torch.randint(0, 300, (3, 20)))
    for b in (0.5, 0.25):
        plan = make_plan(m, "mha2mla", b, data, "kv", step=4)
        assert sum(g.spec(lp).kv_size() for lp in plan) <= b * g.n_layers * 2 * g.n_kv * g.head_dim
        assert len({(lp.rank, lp.rope_keep) for lp in plan}) == 1  # the same in every layer, as MHA2MLA
        st = compress_model(m, plan, data)
        with torch.no_grad():
            assert torch.isfinite(st(torch.randint(0, 300, (1, 9))).logits).all()


def test_reduced_training_moves_only_what_the_plan_changed():
    """kd_train='reduced': a latent layer's key/value factors move, its query and output projections (the
    teacher's, untouched by the plan) stay bit-identical; with a narrowed-heads plan every projection moves."""
    from headalloc.compression.distill import distill_end_to_end, trainable
    from headalloc.compression.settings import EndToEndArgs

    m = tiny("llama")
    g = Geometry.of(m)
    data = collect(m, torch.randint(0, 300, (3, 20)))
    st = compress_model(m, Plan([_latent(g, 8, 16)] * g.n_layers), data)
    names = {n.split(".")[-2] for n, p in st.model.layers.named_parameters()
             if any(p is q for q in trainable(m, st, "reduced"))}
    assert names == {"k_down", "k_up", "v_down", "v_up"}
    before = {n: p.detach().clone() for n, p in st.named_parameters()}
    distill_end_to_end(m, st, torch.randint(0, 300, (4, 16)), EndToEndArgs(steps=3, lr=1e-2, topk=4, train="reduced",
                                                                         tail=False, sampling="replacement"),
                       progress=False)
    moved = {n for n, p in st.named_parameters() if not torch.equal(p, before[n])}
    assert moved and all(n.split(".")[-2] in names for n in moved)
    assert any(".k_down." in n for n in moved)
    narrow = compress_model(m, Plan([LayerPlan(g.head_dim // 2, g.head_dim // 2)] * g.n_layers), data)
    assert len(trainable(m, narrow, "reduced")) == len(trainable(m, narrow, "attention"))


def test_shrunk_second_moment_moves_the_factorisation_from_data_aware_to_plain():
    """whiten_shrink: the shrunk moment stays a second moment (PSD, same input energy, constant entry 1);
    near full shrinkage the whitened factorisation is plain truncated SVD (numpy's Eckart-Young tail)."""
    from headalloc.compression.calibration import shrink_second_moment

    rng = np.random.default_rng(1)
    W = torch.tensor(rng.standard_normal((10, 16)))
    X = rng.standard_normal((400, 16)) @ np.diag(np.linspace(0.05, 3, 16)) + 0.3
    A = np.concatenate([X, np.ones((400, 1))], 1)
    M = torch.tensor(A.T @ A / 400)
    for alpha in (0.2, 0.7):
        S = shrink_second_moment(M, alpha)
        assert float(torch.linalg.eigvalsh(S).min()) > 0 and float(S[-1, -1]) == pytest.approx(1.0)
        assert float(torch.trace(S[:-1, :-1])) == pytest.approx(float(torch.trace(M[:-1, :-1])))
    s = np.linalg.svd(W.numpy(), compute_uv=False)
    for r in (2, 5):
        up, down = whitened_low_rank(W, shrink_second_moment(M, 1 - 1e-9)[:-1, :-1], r)
        err = float(((W - up.double() @ down.double()) ** 2).sum())
        assert err == pytest.approx(float((s[r:] ** 2).sum()), rel=1e-4)
        up0, down0 = whitened_low_rank(W, M[:-1, :-1], r)  # the data-aware one is worse in plain Frobenius terms
        assert float(((W - up0.double() @ down0.double()) ** 2).sum()) > err


def _loss(m, layers, data):
    """The compressed model's next-token loss on the calibration windows, by transformers' own labels path."""
    st = compress_model(m, Plan(layers), data)
    with torch.no_grad():
        return float(sum(st(input_ids=w[None], labels=w[None]).loss for w in data.windows)) / len(data.windows)


OURS = [("measured-latent", "kv", 0.45), ("measured-lowrank", "params", 0.5)]


@pytest.mark.parametrize("strategy,kind,budget", OURS)
def test_our_knapsack_keeps_the_exponent_whose_plan_loses_least_on_the_calibration_text(strategy, kind, budget):
    """Each exponent's plan, rebuilt alone, scored by the compressed model's own loss (transformers' labels path,
    not our perplexity): the plan kept is the best of them, so never worse than the plain sum's (p = 1)."""
    fn = STRATEGIES[strategy].fn
    m = tiny("llama")
    g = Geometry.of(m)
    torch.manual_seed(1)
    data = collect(m, torch.randint(0, 300, (4, 24)), outputs=True)
    chosen, info = fn(_req(m, budget, kind, data, exponents=(1.0, 2.0, 3.0)))
    alone = {p: fn(_req(m, budget, kind, data, exponents=(p,)))[0] for p in (1.0, 2.0, 3.0)}
    assert alone[1.0] != alone[2.0]  # (the exponents disagree here, so the choice is a real one)
    assert info["exponent"] in alone and chosen == alone[info["exponent"]] and info["empty_layers"] == []
    assert _loss(m, chosen, data) <= min(_loss(m, pl, data) for pl in alone.values()) + 1e-6
    _assert_within_budget(m, chosen, data, kind, budget)


@pytest.mark.parametrize("strategy,kind,budget", [("measured-latent", "kv", 0.3), ("measured-lowrank", "params", 0.3)])
def test_our_knapsack_removes_a_layers_attention_that_adds_nothing(strategy, kind, budget):
    """A layer whose attention output is silenced (its output projection zeroed) loses nothing when its attention
    is removed: at a budget tight enough that what it frees matters, with empty layers allowed the plan removes it,
    spends what it frees on the other layers, and its loss (transformers' own) is no worse than the best plan that
    keeps attention in every layer; the measured error of removing it is zero, of removing the others not."""
    from headalloc.compression.families import adapter_for
    from headalloc.compression.planning.estimates import with_grads
    from headalloc.compression.planning.select import empty_layer_errors

    fn = STRATEGIES[strategy].fn
    m = tiny("llama")
    g = Geometry.of(m)
    with torch.no_grad():
        adapter_for(m).attention(m, 1).o_proj.weight.zero_()
    torch.manual_seed(1)
    data = collect(m, torch.randint(0, 300, (4, 24)), outputs=True)
    store = Measurements()
    dense, _ = fn(_req(m, budget, kind, data, store, exponents=(1.0, 2.0)))
    chosen, info = fn(_req(m, budget, kind, data, store, exponents=(1.0, 2.0), empty_layers=True))
    e0 = empty_layer_errors(m, with_grads(m, data, store), store)  # (the estimates the plan was chosen by)
    assert e0[1] == 0 and e0[0] > 0 and e0[2] > 0
    assert 1 in info["empty_layers"] and chosen[1].empty
    assert [l for l, lp in enumerate(chosen) if lp.empty] == info["empty_layers"]
    assert _loss(m, chosen, data) <= _loss(m, dense, data) + 1e-6
    _assert_within_budget(m, chosen, data, kind, budget)
    assert sum(g.spec(lp).cost(g.hidden, kind) for l, lp in enumerate(chosen) if l != 1) > \
        sum(g.spec(lp).cost(g.hidden, kind) for l, lp in enumerate(dense) if l != 1)  # the freed budget is spent


@pytest.mark.parametrize("strategy,kind,budget", OURS)
def test_worst_part_selection_keeps_the_plan_with_the_smallest_largest_part_increase(strategy, kind, budget):
    """With plan_select 'worst-part' the kept candidate is the one whose loss increase over the original, on the
    part of the calibration text where it is largest, is smallest; every loss here by transformers' labels path,
    per part, independently of the strategy's own measurement."""
    fn = STRATEGIES[strategy].fn
    m = tiny("llama")
    torch.manual_seed(1)
    wide, narrow = torch.randint(0, 300, (3, 24)), torch.randint(0, 12, (3, 24))  # two kinds of "text"
    data = collect(m, torch.cat([wide, narrow]), outputs=True)
    data.parts = ["wide"] * 3 + ["narrow"] * 3
    exps = (1.0, 2.0, 3.0)
    chosen, info = fn(_req(m, budget, kind, data, exponents=exps, select="worst-part"))
    alone = {p: fn(_req(m, budget, kind, data, exponents=(p,), select="worst-part"))[0] for p in exps}

    def part_losses(model):
        with torch.no_grad():
            return {n: float(sum(model(input_ids=w[None], labels=w[None]).loss for w in ws)) / len(ws)
                    for n, ws in (("wide", wide), ("narrow", narrow))}

    base = part_losses(m)
    worst = {}
    for p, pl in alone.items():
        got = part_losses(compress_model(m, Plan(pl), data))
        worst[p] = max(got[n] - base[n] for n in got)
    assert info["select"] == "worst-part" and chosen == alone[info["exponent"]]
    assert worst[info["exponent"]] <= min(worst.values()) + 1e-6
    reported = info["worst_part_increase_by_candidate"][f"p={info['exponent']}"]
    assert reported[0] in ("wide", "narrow") and reported[1] == pytest.approx(worst[info["exponent"]], abs=1e-5)


def test_plan_options_refuse_an_unknown_criterion_before_any_measurement():
    with pytest.raises(ValueError, match="plan_select must be one of mean, worst-part; got 'median'"):
        PlanOptions(select="median")
    with pytest.raises(ValueError, match="exponents must be one or more positive numbers"):
        PlanOptions(exponents=(1.0, -2.0))
    with pytest.raises(ValueError, match="plan_error must be one of pooled, leave-part-out"):
        PlanOptions(error="folded")


def _req(m, budget, kind, data, store=None, **options):
    return PlanRequest(m, budget, kind, step=2, calibration=data, options=PlanOptions(**options),
                       measurements=Measurements() if store is None else store)


def _assert_within_budget(m, plan, data, kind: str, budget: float) -> None:
    """Measured on the compressed model itself: the cache it really holds, or the parameters it really has."""
    st = compress_model(m, Plan(plan), data)
    if kind == "kv":
        assert held_cache_bytes(st) <= budget * held_cache_bytes(m)
    else:
        attn = lambda x: sum(p.numel() for layer in x.model.layers for p in layer.self_attn.parameters())  # noqa
        assert attn(st) <= budget * attn(m)
