"""Evaluation counts against what the model actually holds: parameters of the attention modules,
bytes in the KV cache, and perplexity against a direct cross-entropy."""

import math

import torch
from transformers import LlamaConfig, LlamaForCausalLM

from headalloc.compression.reduce import compress_model
from headalloc.compression.spec import LayerPlan
from headalloc.evaluation.lm import counts, perplexity, speed
from headalloc.compression.modeling_headalloc import CACHE_NAME  # 'cache' from transformers 5.24


def models():
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=80, hidden_size=48, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=6, num_key_value_heads=2, head_dim=16, max_position_embeddings=256)
    t = LlamaForCausalLM(cfg).eval()
    return t, compress_model(t, [LayerPlan(8, 4), LayerPlan(16, 8, keep_kv=[0])])


def test_counts_match_the_model():
    for m in models():
        c = counts(m, context=10)
        attn = sum(p.numel() for l in m.model.layers for p in l.self_attn.parameters())
        assert c["params_attention"] == attn
        ids = torch.randint(0, 80, (1, 10))
        with torch.no_grad():
            cache = getattr(m(ids, use_cache=True), CACHE_NAME)
        held = sum(l.keys.numel() + l.values.numel() for l in cache.layers) * 4
        assert c["kv_bytes_per_token"] * 10 == held
        # decode traffic: every matrix weight except the embedding table (one row is looked up), unless it
        # is tied to the output head, which reads all of it; plus the cache
        tied = m.config.tie_word_embeddings
        weights = sum(p.numel() for n, p in m.named_parameters() if p.ndim == 2 and (tied or "embed" not in n)) * 4
        assert c["decode_bytes_per_token"] == weights + held


def test_perplexity_is_exp_of_mean_cross_entropy():
    t, _ = models()
    w = torch.randint(0, 80, (3, 12))
    with torch.no_grad():
        ce = torch.nn.functional.cross_entropy(t(w).logits[:, :-1].reshape(-1, 80), w[:, 1:].reshape(-1))
    assert math.isclose(perplexity(t, w, progress=False)["ppl"], math.exp(ce.item()), rel_tol=1e-5)


def test_window_nlls_are_transformers_own_loss_and_the_paired_interval_brackets_the_ratio():
    """Each window's summed NLL is transformers' own mean loss on that window times its predicted tokens; the paired
    ratio is exp of the mean difference per token, its bootstrap interval holds it, collapses to a point when every
    window differs by the same amount, and refuses windows that do not pair."""
    import numpy as np
    import pytest

    from headalloc.evaluation.lm import paired_ratio_interval

    t, s = models()
    w = torch.randint(0, 80, (6, 12))
    pt, ps = perplexity(t, w, progress=False), perplexity(s, w, progress=False)
    with torch.no_grad():
        hf = [float(t(x[None], labels=x[None]).loss) * 11 for x in w]
    assert np.allclose(pt["window_nll"], hf, rtol=1e-5)
    r = paired_ratio_interval(ps["window_nll"], pt["window_nll"], 11)
    assert math.isclose(r["ratio"], ps["ppl"] / pt["ppl"], rel_tol=1e-9)
    assert r["low"] <= r["ratio"] <= r["high"] and r["low"] < r["high"] and r["windows"] == 6
    shifted = paired_ratio_interval([x + 0.3 * 11 for x in pt["window_nll"]], pt["window_nll"], 11)
    assert math.isclose(shifted["low"], math.exp(0.3), rel_tol=1e-9)
    assert math.isclose(shifted["high"], math.exp(0.3), rel_tol=1e-9)
    with pytest.raises(ValueError, match="same windows"):
        paired_ratio_interval(ps["window_nll"][:5], pt["window_nll"], 11)


def test_cached_perplexity_is_measured_once_per_model_and_windows(tmp_path, monkeypatch):
    from headalloc.evaluation.lm import cached_perplexity

    monkeypatch.setenv("HEADALLOC_CACHE", str(tmp_path))
    t, s = models()
    calls = []
    t.register_forward_pre_hook(lambda mod, args: calls.append(1))
    w = torch.randint(0, 80, (3, 12))
    with torch.no_grad():
        ce = torch.nn.functional.cross_entropy(t(w).logits[:, :-1].reshape(-1, 80), w[:, 1:].reshape(-1))
    calls.clear()
    first = cached_perplexity(t, w, progress=False)
    assert math.isclose(first["ppl"], math.exp(ce.item()), rel_tol=1e-5) and len(calls) == 3
    assert cached_perplexity(t, w, progress=False) == first and len(calls) == 3  # from disk: no forward
    other = w.clone()
    other[0, 5] = (other[0, 5] + 1) % 80
    cached_perplexity(t, other, progress=False)  # other windows: measured
    assert len(calls) == 6
    with torch.no_grad():
        t.model.layers[1].mlp.down_proj.weight[0, 0] += 1.0  # other weights (not the first tensor): measured
    changed = cached_perplexity(t, w, progress=False)
    assert len(calls) == 9 and changed["ppl"] != first["ppl"]
    assert cached_perplexity(s, w, progress=False)["ppl"] == perplexity(s, w, progress=False)["ppl"]
    for f in (tmp_path / "perplexity").iterdir():
        f.write_text("{not json")  # damaged files are measured again, not trusted
    assert cached_perplexity(t, w, progress=False) == changed and len(calls) == 12


class Slowed(torch.nn.Module):
    """A model whose every forward call takes at least `delay` seconds longer."""

    def __init__(self, model, delay):
        super().__init__()
        self.model, self.delay = model, delay

    def get_input_embeddings(self):
        return self.model.get_input_embeddings()

    def forward(self, *a, **k):
        import time

        time.sleep(self.delay)
        return self.model(*a, **k)


def test_speed_runs_side_by_side_and_measures_time():
    """Decode tok/s is bounded by the time each step is known to take: a model slowed by 100 ms per call
    decodes at most 10 tok/s and prefills at most 640 tok/s, whatever the machine's load; and from below by the
    tokens over the wall-clock time of the whole measurement, which contains every timed segment (a rate of 0, or
    one taken from a clock that did not run, fails). No bound relates the plain models to each other: on a loaded
    machine either can be slower."""
    import time

    t, s = models()
    t0 = time.perf_counter()
    res = speed({"a": t, "b": s, "slow": Slowed(t, 0.1)}, torch.randint(0, 80, (1, 64)), contexts=(32, 64),
                new_tokens=3, repeats=1, progress=False)
    elapsed = time.perf_counter() - t0
    assert set(res) == {"a", "b", "slow"}
    for name in res:
        for c in (32, 64):
            assert res[name][str(c)]["decode_tok_s"] >= 3 / elapsed
            assert res[name][str(c)]["prefill_tok_s"] >= c / elapsed
    assert res["slow"]["64"]["decode_tok_s"] <= 10
    # (no ordering between the slowed and the plain model: on a loaded CI machine a plain step can take longer
    # than the 0.1 s delay; the bounds above hold whatever the load, as the delay is a sleep inside each call)
    assert res["slow"]["64"]["prefill_tok_s"] <= 64 / 0.1


def test_compare_reports_same_runtime_and_stock_reference():
    from headalloc.evaluation.lm import compare, same_runtime

    t, s = models()
    twin = same_runtime(t)
    ids = torch.randint(0, 80, (1, 40))
    with torch.no_grad():  # the same-runtime reference is the original model exactly
        assert torch.allclose(twin(ids).logits, t(ids).logits, atol=1e-5)
    assert same_runtime(s) is None
    res = compare(t, s, ids, contexts=(32,), new_tokens=2, repeats=1, progress=False)["32"]
    assert {"reference", "reference_stock", "decode_speedup_vs_stock"} <= set(res)
    assert res["decode_speedup_predicted"] > 1  # fewer attention FLOPs than the original


def test_batched_decode_from_a_repeated_cache_matches_single_sequence_decode():
    """The speed test's batch decode (one prompt's cache repeated B times) computes, for every row, exactly
    what batch-1 decode computes, in both runtimes (the reduced model's fast decode path included)."""
    import time

    ids = torch.randint(0, 80, (1, 20))
    for m in models():
        with torch.no_grad():
            one = m(input_ids=ids, use_cache=True)
            many = m(input_ids=ids, use_cache=True)
            getattr(many, CACHE_NAME).batch_repeat_interleave(3)
            nxt = one.logits[:, -1:].argmax(-1)
            a = m(input_ids=nxt, **{CACHE_NAME: getattr(one, CACHE_NAME)}, use_cache=True).logits
            b = m(input_ids=nxt.repeat(3, 1), **{CACHE_NAME: getattr(many, CACHE_NAME)}, use_cache=True).logits
        assert b.shape[0] == 3 and torch.allclose(b, a.expand_as(b), atol=1e-5)
        t0 = time.perf_counter()
        res = speed({"m": m, "slow": Slowed(m, 0.1)}, ids, contexts=(20,), new_tokens=2, repeats=1,
                    progress=False, batch=3)
        elapsed = time.perf_counter() - t0
        assert 3 * 2 / elapsed <= res["slow"]["20"]["decode_tok_s"] <= 3 / 0.1  # 3 tokens a step


def test_batched_decode_traffic_shares_the_weights():
    t, s = models()
    for m in (t, s):
        one, four = counts(m, context=10), counts(m, context=10, batch=4)
        kv = one["kv_bytes_per_token"] * 10
        assert math.isclose(four["decode_bytes_per_token"], (one["decode_bytes_per_token"] - kv) / 4 + kv)
        assert four["decode_flops_per_token"] == one["decode_flops_per_token"]


def test_planning_window_losses_several_windows_to_a_pass_are_transformers_own_loss():
    """The candidate plans' per-window losses (several windows to a forward pass) are transformers' own mean loss on
    each window alone, for every batch size, including a last pass that is not full."""
    import numpy as np

    from headalloc.compression.planning.select import window_nll as _window_nll

    t, _ = models()
    w = torch.randint(0, 80, (7, 12))
    with torch.no_grad():
        hf = [float(t(x[None], labels=x[None]).loss) for x in w]
        for batch in (1, 3, 7, 16):
            assert np.allclose(_window_nll(t, w, batch=batch).numpy(), hf, rtol=1e-5)
