"""Compression of LLaMA-family heads: the exported model against Hugging Face's own model and
itself after a save/load round trip, and the reductions against dense references."""

import pytest
import torch
from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM

import headalloc  # noqa: F401  (registers the compressed model classes)
from headalloc.compression.calibration import collect
from headalloc.compression.families import adapter_for
from headalloc.compression.reduce import Geometry, compress_model, identity_plan, pair_importance
from headalloc.compression.spec import LayerPlan
from headalloc.compression.modeling_headalloc import CACHE_NAME  # 'cache' from transformers 5.24



def kd_args(**settings):
    """End-to-end settings for the unit tests: renormalised top k, each step's window drawn independently."""
    from headalloc.compression.settings import EndToEndArgs

    return EndToEndArgs(**{"tail": False, "sampling": "replacement", **settings})

def tiny_llama(seed=0):
    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=120, hidden_size=48, intermediate_size=64, num_hidden_layers=3,
                      num_attention_heads=6, num_key_value_heads=2, head_dim=16, max_position_embeddings=128,
                      tie_word_embeddings=True)
    return LlamaForCausalLM(cfg).eval()


def test_keep_everything_reproduces_the_original_logits():
    model = tiny_llama()
    ids = torch.randint(0, 120, (2, 30))
    cal = collect(model, ids, keep=False)
    student = compress_model(model, identity_plan(model), cal)
    with torch.no_grad():
        assert torch.allclose(student(ids).logits, model(ids).logits, atol=1e-4)


def test_round_trip_through_save_pretrained(tmp_path):
    model = tiny_llama()
    ids = torch.randint(0, 120, (1, 25))
    plan = [LayerPlan(8, 16), LayerPlan(4, 8, keep_kv=[1]), LayerPlan(16, 4, keep_rep=[[0, 2], [1, 2]])]
    student = compress_model(model, plan)
    student.save_pretrained(tmp_path)
    assert (tmp_path / "model.safetensors").exists()
    assert not list(tmp_path.glob("*.bin"))
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path, local_files_only=True)
    assert type(loaded).__name__ == "HeadallocForCausalLM"
    with torch.no_grad():
        assert torch.allclose(loaded(ids).logits, student(ids).logits, atol=1e-6)
        out = loaded.generate(ids, max_new_tokens=5, do_sample=False)
        # the KV cache holds each layer's own widths
        cache = getattr(loaded(ids, use_cache=True), CACHE_NAME)
    assert out.shape == (1, 30)
    ks = [cache.layers[i].keys.shape for i in range(3)]
    vs = [cache.layers[i].values.shape for i in range(3)]
    assert [k[1] for k in ks] == [2, 1, 2] and [k[-1] for k in ks] == [8, 4, 16] and [v[-1] for v in vs] == [16, 8, 4]
    assert loaded.kv_cache_bytes_per_token() == 4 * (2 * 24 + 1 * 12 + 2 * 20)


def test_generate_matches_full_forward_greedy():
    model = tiny_llama()
    student = compress_model(model, [LayerPlan(8, 8)] * 3)
    ids = torch.randint(0, 120, (1, 10))
    with torch.no_grad():
        gen = student.generate(ids, max_new_tokens=6, do_sample=False)
        seq = ids
        for _ in range(6):  # no cache: recompute every step
            nxt = student(seq, use_cache=False).logits[:, -1].argmax(-1, keepdim=True)
            seq = torch.cat([seq, nxt], 1)
    assert torch.equal(gen, seq)


def test_decode_fast_path_equals_full_forward_and_is_used(monkeypatch):
    """Each cached single-token step (no padding, no kv repeat) gives the logits of a full forward."""
    from headalloc.compression.modeling_headalloc import ReducedAttention

    model = tiny_llama()
    student = compress_model(model, [LayerPlan(8, 8), LayerPlan(4, 8, keep_kv=[1]),  # equal and unequal widths
                                     LayerPlan(16, 4, keep_rep=[[0, 2], [1, 2]])])
    calls = []
    orig = ReducedAttention._decode_one
    monkeypatch.setattr(ReducedAttention, "_decode_one",
                        lambda self, *a: calls.append(self.layer_idx) or orig(self, *a))
    ids = torch.randint(0, 120, (1, 14))
    with torch.no_grad():
        full = student(ids, use_cache=False).logits
        out = student(ids[:, :8], use_cache=True)
        cache, steps = getattr(out, CACHE_NAME), []
        for t in range(8, 14):
            out = student(ids[:, t:t + 1], **{CACHE_NAME: cache}, use_cache=True)
            cache = getattr(out, CACHE_NAME)
            steps.append(out.logits[:, -1])
    assert torch.allclose(torch.stack(steps, 1), full[:, 8:], atol=1e-5)
    assert calls.count(0) == 6 and len(calls) == 18


def test_pair_importance_equals_measured_logit_energy():
    model = tiny_llama()
    ids = torch.randint(0, 120, (4, 40))
    data = collect(model, ids)
    attn = model.model.layers[1].self_attn
    imp = pair_importance(adapter_for(model).weights(model, 1), data.second_moment[1], Geometry.of(model))
    x = torch.cat([t.reshape(-1, 48) for t in data.inputs[1]]).double()
    q = (x @ attn.q_proj.weight.double().T).view(-1, 2, 3, 16)
    k = (x @ attn.k_proj.weight.double().T).view(-1, 2, 16)
    eq = (q[..., :8] ** 2 + q[..., 8:] ** 2).mean(0).sum(1)  # (kv, pair)
    ek = (k[..., :8] ** 2 + k[..., 8:] ** 2).mean(0)
    assert torch.allclose(imp, eq * ek, rtol=1e-6)


def test_value_svd_is_optimal_rank_k_for_the_group():
    """Plain value SVD: the group's value-output map error equals the discarded singular values."""
    model = tiny_llama()
    attn = model.model.layers[0].self_attn
    from headalloc.compression.reduce import value_output_svd
    vs, os_ = value_output_svd(adapter_for(model).weights(model, 0), None, Geometry.of(model), 5)
    Wv = attn.v_proj.weight.detach().double().view(2, 16, 48)
    Wo = attn.o_proj.weight.detach().double().view(48, 2, 3, 16)
    for g in range(2):
        A = torch.cat([Wo[:, g, h] @ Wv[g] for h in range(3)])
        approx = torch.cat([os_[g][h] @ vs[g] for h in range(3)])
        s = torch.linalg.svdvals(A)
        assert torch.linalg.norm(A - approx).item() == pytest.approx(s[5:].square().sum().sqrt().item(), rel=1e-6)


def test_bad_plans_are_clear_errors():
    model = tiny_llama()
    with pytest.raises(ValueError, match="qk_dim must be even"):
        compress_model(model, [LayerPlan(7, 8)] * 3)
    with pytest.raises(ValueError, match="plan has 1 layers"):
        compress_model(model, [LayerPlan(8, 8)])
    with pytest.raises(ValueError, match="supported families: LLaMA"):
        from transformers import GPT2Config, GPT2LMHeadModel
        compress_model(GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=16, n_head=2)), [])


# ---------------------------------------------------------------- single heads
from headalloc.probe.single_head import (head_forward, reduce_head, teacher_head_bert,  # noqa: E402
                                               teacher_head_llama)


def test_llama_head_matrices_reproduce_eager_attention():
    model = tiny_llama()
    model.set_attn_implementation("eager")
    ids = torch.randint(0, 120, (2, 12))
    data = collect(model, ids)
    with torch.no_grad():
        att = model(ids, output_attentions=True).attentions
    X = torch.cat(data.inputs[1]).double()
    cos, sin = (torch.cat([p[j] for p in data.positions]).double() for j in (0, 1))
    hw = teacher_head_llama(model, 1, 4)
    _, probs, _ = head_forward(hw, X, True, cos, sin)
    assert torch.allclose(probs.float(), att[1][:, 4], atol=1e-5)
    # the full-width student is the teacher
    full = reduce_head(hw, 16, data.cov[1])
    assert torch.allclose(head_forward(full, X, True, cos, sin)[2], head_forward(hw, X, True, cos, sin)[2], atol=1e-8)


def test_bert_head_svd_student_full_rank_is_exact_and_low_rank_is_optimal():
    from transformers import BertConfig, BertModel
    torch.manual_seed(0)
    m = BertModel(BertConfig(vocab_size=50, hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                             intermediate_size=40)).eval()
    m.set_attn_implementation("eager")
    ids = torch.randint(0, 50, (2, 9))
    with torch.no_grad():
        out = m(ids, output_attentions=True, output_hidden_states=True)
    X = out.hidden_states[0].double()
    hw = teacher_head_bert(m, 0, 1)
    _, p, o = head_forward(hw, X, causal=False)
    assert torch.allclose(p.float(), out.attentions[0][:, 1], atol=1e-5)
    full = reduce_head(hw, 16)
    assert torch.allclose(head_forward(full, X, False)[2], o, atol=1e-8)
    # plain rank-r student: the query-key form error equals the discarded singular values (Eckart-Young)
    r = reduce_head(hw, 4)
    aug = lambda W, b: torch.cat([W, b[:, None]], 1)  # noqa: E731
    A = aug(hw.Wq, hw.bq).T @ aug(hw.Wk, hw.bk)
    A4 = aug(r.Wq, r.bq).T @ aug(r.Wk, r.bk)
    s = torch.linalg.svdvals(A)
    assert torch.linalg.norm(A - A4).item() == pytest.approx(s[4:].square().sum().sqrt().item(), rel=1e-6)


@pytest.mark.slow
def test_real_smollm2_identity_compression_reproduces_logits():
    """SmolLM2 through the compressed format keeping every dimension gives the original logits
    (the save/load round trip is covered on the tiny model above)."""
    from headalloc.assets import load_model

    model, tok = load_model("smollm2")
    ids = tok("The capital of France is Paris, and the capital of Italy is", return_tensors="pt").input_ids
    student = compress_model(model, identity_plan(model))
    with torch.no_grad():
        assert torch.allclose(student(ids).logits, model(ids).logits, atol=1e-3, rtol=1e-4)


def test_topk_distill_loss_with_full_vocabulary_is_kl_plus_entropy():
    from headalloc.compression.distill import topk_distill_loss

    torch.manual_seed(0)
    t_logits, s_logits = torch.randn(5, 30), torch.randn(5, 30)
    p = torch.softmax(t_logits, -1)
    top = p.topk(30, -1)
    got = topk_distill_loss(s_logits, top.indices, top.values)
    kl = torch.nn.functional.kl_div(torch.log_softmax(s_logits, -1), p, reduction="batchmean")
    entropy = -(p * p.log()).sum(-1).mean()
    assert torch.allclose(got, kl + entropy, atol=1e-6)


def test_end_to_end_distillation_lowers_the_loss_and_trains_only_attention():
    from headalloc.compression.distill import distill_end_to_end

    model = tiny_llama()
    student = compress_model(model, [LayerPlan(4, 4)] * 3)
    frozen_before = {n: p.clone() for n, p in student.named_parameters() if ".self_attn." not in n}
    w = torch.randint(0, 120, (6, 24))
    r = distill_end_to_end(model, student, w, kd_args(steps=40, lr=1e-3, topk=16), progress=False)
    assert r["loss_after"] < r["loss_before"]
    for n, p in student.named_parameters():
        if n in frozen_before:
            assert torch.equal(p, frozen_before[n]), n
    with pytest.raises(ValueError, match="kd_steps must be"):
        distill_end_to_end(model, student, w, kd_args(steps=-1), progress=False)


def test_end_to_end_distillation_of_every_layer_weight_keeps_embeddings_and_head():
    from headalloc.compression.distill import distill_end_to_end

    model = tiny_llama()
    student = compress_model(model, [LayerPlan(4, 4)] * 3)
    before = {n: p.clone() for n, p in student.named_parameters()}
    w = torch.randint(0, 120, (6, 24))
    r = distill_end_to_end(model, student, w, kd_args(steps=20, lr=1e-3, topk=16, train="layers"), progress=False)
    assert r["loss_after"] < r["loss_before"] and r["train"] == "layers"
    for n, p in student.named_parameters():
        changed = not torch.equal(p, before[n])
        assert changed == (".layers." in n), n  # every decoder-layer weight moves, nothing else does
        assert p.requires_grad  # trainability restored afterwards
    with pytest.raises(ValueError, match="train must be"):
        distill_end_to_end(model, student, w, kd_args(steps=1, train="mlp"), progress=False)


def test_low_rank_svd_of_a_product_matches_the_dense_svd():
    from headalloc.compression.reduce import low_rank_svd

    g = torch.Generator().manual_seed(0)
    M, N = torch.randn(90, 8, generator=g, dtype=torch.float64), torch.randn(8, 40, generator=g, dtype=torch.float64)
    U, S, Vh = low_rank_svd(M, N)
    dense = torch.linalg.svdvals(M @ N)
    assert torch.allclose(S, dense[:8], atol=1e-9) and float(dense[8:].abs().max()) < 1e-9
    assert torch.allclose((U * S) @ Vh, M @ N, atol=1e-9)
    assert torch.allclose(U.T @ U, torch.eye(8, dtype=torch.float64), atol=1e-9)
    assert torch.allclose(Vh @ Vh.T, torch.eye(8, dtype=torch.float64), atol=1e-9)


def test_compressed_model_loads_with_accelerate_device_placement(tmp_path):
    """The path for models too large for one device: from_pretrained(device_map="auto") through
    accelerate (here every layer lands on the CPU) gives the same logits and generation."""
    model = tiny_llama()
    student = compress_model(model, [LayerPlan(8, 16), LayerPlan(4, 8, keep_kv=[1]), LayerPlan(16, 4)])
    student.save_pretrained(tmp_path)
    placed = AutoModelForCausalLM.from_pretrained(tmp_path, local_files_only=True, device_map="auto")
    ids = torch.randint(0, 120, (1, 20))
    with torch.no_grad():
        assert torch.allclose(placed(ids).logits, student(ids).logits, atol=1e-6)
        assert torch.equal(placed.generate(ids, max_new_tokens=4, do_sample=False),
                           student.generate(ids, max_new_tokens=4, do_sample=False))


def test_plan_grid_matches_the_compressed_model(tmp_path):
    from headalloc.reports.figures import plan_grid, plot_plan_grid

    model = tiny_llama()
    plan = [LayerPlan(8, 16), LayerPlan(4, 8, keep_kv=[1]), LayerPlan(16, 4, keep_kv=[0, 1], keep_rep=[[0, 2], [1, 2]])]
    student = compress_model(model, plan)
    layers = [lp.to_dict() for lp in plan]
    qk, v = plan_grid(layers, 2, 3)
    for row_q, row_v, a, lp in zip(qk, v, student.config.attn_layers, plan):
        kept = [h for h, w in enumerate(row_q) if w]
        assert len(kept) == a["n_kv_heads"] * a["n_rep"]
        assert {row_q[h] for h in kept} == {a["qk_dim"]} and {row_v[h] for h in kept} == {a["v_dim"]}
    assert [h for h, w in enumerate(qk[1]) if w] == [3, 4, 5]  # kv head 1 keeps query heads 3..5
    assert [h for h, w in enumerate(qk[2]) if w] == [0, 2, 4, 5]
    assert plot_plan_grid(layers, 2, 3, 16, tmp_path / "plan.png").exists()


def test_sequential_layerwise_distillation_walks_the_student_residual_stream():
    """inputs="student": with nothing removed the student's own stream is the teacher's (checked
    against the inputs the teacher's forward hooks captured), so every layer starts at zero error;
    with a reduced plan both modes lower every layer's error."""
    from headalloc.compression.distill import distill_layerwise

    model = tiny_llama()
    data = collect(model, torch.randint(0, 120, (3, 20)), keep=True)
    same = compress_model(model, identity_plan(model))
    r = distill_layerwise(model, same, data, steps=0, progress=False, inputs="student")
    assert max(r["layer_rel_error_before"]) < 1e-10
    for mode in ("teacher", "student"):
        student = compress_model(model, [LayerPlan(4, 4)] * 3, data)
        r = distill_layerwise(model, student, data, steps=30, lr=3e-4, progress=False, inputs=mode)
        assert all(a < b for a, b in zip(r["layer_rel_error_after"], r["layer_rel_error_before"])), mode
    with pytest.raises(ValueError, match="inputs must be"):
        distill_layerwise(model, student, data, steps=0, progress=False, inputs="mixed")


def test_topk_distill_loss_with_tail_bucket_is_kl_of_the_coarsened_distributions():
    """k tokens + one "rest" bucket: equals KL + entropy computed on explicitly coarsened teacher and
    student distributions (k+1 outcomes), and is minimised by the teacher itself, unlike the
    renormalised top-k loss, which prefers a student with no tail."""
    from headalloc.compression.distill import teacher_topk, topk_distill_loss

    torch.manual_seed(0)
    t_logits, s_logits = torch.randn(5, 30), torch.randn(5, 30)
    p, q = torch.softmax(t_logits, -1), torch.softmax(s_logits, -1)
    top = p.topk(6, -1)
    tail = 1 - top.values.sum(-1)
    got = topk_distill_loss(s_logits, top.indices, top.values / top.values.sum(-1, keepdim=True), tail)
    pc = torch.cat([top.values, tail[:, None]], -1)
    qk = q.gather(-1, top.indices)
    qc = torch.cat([qk, 1 - qk.sum(-1, keepdim=True)], -1)
    expect = (torch.nn.functional.kl_div(qc.log(), pc, reduction="batchmean") - (pc * pc.log()).sum(-1).mean())
    assert torch.allclose(got, expect, atol=1e-5)
    renorm = top.values / top.values.sum(-1, keepdim=True)
    at_teacher = topk_distill_loss(t_logits, top.indices, renorm, tail)
    sharper = t_logits.scatter_add(-1, top.indices, torch.full_like(top.values, 3.0))  # less mass outside top k
    assert at_teacher < topk_distill_loss(sharper, top.indices, renorm, tail)
    assert topk_distill_loss(sharper, top.indices, renorm) < topk_distill_loss(t_logits, top.indices, renorm)
    # teacher_topk stores the tail it removed
    model = tiny_llama()
    w = torch.randint(0, 120, (5, 10))
    with torch.no_grad():  # one window at a time, through transformers' own softmax
        full = torch.cat([torch.softmax(model(input_ids=x[None]).logits, -1) for x in w])
    ref = full.topk(8, -1)
    for batch in (1, 2, 4):  # batches that divide the windows and one that leaves a remainder
        tk = teacher_topk(model, w, k=8, progress=False, batch=batch)
        assert torch.allclose(tk["tail"], 1 - ref.values.sum(-1), atol=1e-6)
        assert torch.equal(tk["ids"], ref.indices)
        assert torch.allclose(tk["probs"], ref.values / ref.values.sum(-1, keepdim=True), atol=1e-6)


def test_batched_calibration_passes_give_the_moments_of_transformers_hidden_states():
    """collect with several windows per forward (as the pipeline's end-to-end windows are) gives the same
    per-layer moments as computed densely from transformers' own hidden states, one window at a time, and the
    same top-k targets; a batch that leaves a remainder counts every row once."""
    from headalloc.compression.distill import TopKTargets

    model = tiny_llama()
    w = torch.randint(0, 120, (5, 12))
    with torch.no_grad():
        hidden = [model(input_ids=x[None], output_hidden_states=True).hidden_states for x in w]
        ref = []
        for i, layer in enumerate(model.model.layers):  # the attention reads the layer's normalised input
            x = torch.cat([layer.input_layernorm(h[i])[0] for h in hidden]).double()
            x = torch.cat([x, x.new_ones(len(x), 1)], 1)
            ref.append(x.T @ x / len(x))
        ref_top = torch.cat([torch.softmax(model(input_ids=x[None]).logits, -1) for x in w]).topk(8, -1)
    for batch in (1, 2, 4):
        top = TopKTargets(8)
        cal = collect(model, w, keep=False, batch=batch, outputs=True, on_logits=top)
        assert cal.tokens == w.numel()
        for got, want in zip(cal.second_moment, ref):
            assert torch.allclose(got, want, rtol=1e-5, atol=1e-6)
        assert torch.equal(top.result()["ids"], ref_top.indices)


def test_end_to_end_distillation_with_tail_bucket_lowers_its_loss():
    from headalloc.compression.distill import distill_end_to_end

    model = tiny_llama()
    student = compress_model(model, [LayerPlan(4, 4)] * 3)
    w = torch.randint(0, 120, (6, 24))
    r = distill_end_to_end(model, student, w, kd_args(steps=30, lr=1e-3, topk=8, tail=True), progress=False)
    assert r["tail"] and r["loss_after"] < r["loss_before"]


def test_hidden_state_loss_is_zero_at_the_teacher_and_matches_a_direct_computation():
    from headalloc.compression.distill import hidden_state_loss

    model = tiny_llama()
    student = compress_model(model, [LayerPlan(4, 4)] * 3)
    w = torch.randint(0, 120, (2, 12))
    with torch.no_grad():
        t = model(input_ids=w, output_hidden_states=True).hidden_states
        s = student(input_ids=w, output_hidden_states=True).hidden_states
    assert len(t) == len(s) == 4  # embeddings + 3 layers
    assert float(hidden_state_loss(t, t)) == 0.0
    direct = sum(float(((a - b).norm(dim=-1) ** 2 / b.norm(dim=-1) ** 2).mean()) for a, b in zip(s[1:], t[1:])) / 3
    assert abs(float(hidden_state_loss(s, t)) - direct) < 1e-5 and direct > 0


def test_end_to_end_distillation_with_hidden_states_lowers_both_terms():
    from headalloc.compression.distill import distill_end_to_end, hidden_state_loss

    model = tiny_llama()
    student = compress_model(model, [LayerPlan(4, 4)] * 3)
    w = torch.randint(0, 120, (6, 24))

    def hid():
        with torch.no_grad():
            return float(hidden_state_loss(student(input_ids=w, output_hidden_states=True).hidden_states,
                                           model(input_ids=w, output_hidden_states=True).hidden_states))

    h0 = hid()
    r = distill_end_to_end(model, student, w, kd_args(steps=30, lr=1e-3, topk=8, tail=True, hidden=1.0), progress=False)
    assert r["hidden_weight"] == 1.0 and r["loss_after"] < r["loss_before"] and hid() < h0
    with pytest.raises(ValueError, match="kd_hidden"):
        distill_end_to_end(model, student, w, kd_args(steps=1, hidden=-1.0), progress=False)


def test_anchor_penalty_keeps_the_student_nearer_its_initialisation():
    """With the anchor term the attention weights move less from their initialisation than without
    (same seed, windows and steps), measured by the same relative distance the penalty uses."""
    from headalloc.compression.distill import distill_end_to_end

    model = tiny_llama()
    w = torch.randint(0, 120, (6, 24))

    def moved(anchor):
        student = compress_model(model, [LayerPlan(4, 4)] * 3)
        init = {n: p.detach().clone() for n, p in student.named_parameters() if ".self_attn." in n}
        r = distill_end_to_end(model, student, w, kd_args(steps=40, lr=3e-3, topk=16, anchor=anchor), progress=False)
        assert r["anchor"] == anchor
        return sum(float((p.detach() - init[n]).square().sum() / init[n].square().sum())
                   for n, p in student.named_parameters() if n in init)

    assert moved(10.0) < 0.5 * moved(0.0)


def _trained_windows(sampling, steps, batch, seed=3):
    """The windows each end-to-end step fed the student, read back from the tokens the student's embedding saw."""
    from headalloc.compression.distill import distill_end_to_end

    model = tiny_llama()
    student = compress_model(model, [LayerPlan(4, 4)] * 3)
    w = torch.randint(0, 120, (6, 24), generator=torch.Generator().manual_seed(1))
    w[:, 0] = torch.arange(6)  # six windows, each row distinct
    fed = []
    hook = student.model.embed_tokens.register_forward_hook(lambda m, a, out: fed.append(a[0].clone()))
    r = distill_end_to_end(model, student, w, kd_args(steps=steps, lr=1e-3, batch=batch, topk=8, sampling=sampling),
                           seed=seed, progress=False, report_windows=1)
    hook.remove()
    steps_fed = fed[1:-1]  # (the first and last forwards report the loss on window 0)
    assert len(steps_fed) == steps
    rows = [[int(torch.nonzero((w == x).all(-1))[0]) for x in ids] for ids in steps_fed]
    return rows, r


def test_epochs_take_every_window_once_per_pass_and_replacement_draws_as_before():
    rows, r = _trained_windows("epochs", steps=9, batch=2)  # 18 draws over 6 windows: three whole passes
    flat = [i for step in rows for i in step]
    for p in range(3):
        assert sorted(flat[6 * p:6 * p + 6]) == list(range(6))
    assert r["sampling"] == "epochs" and r["windows_seen"] == 6
    assert flat[:6] != flat[6:12]  # each pass in a new order
    # "replacement": each step's windows are an independent draw, the stream of a generator with the same seed
    rows, r = _trained_windows("replacement", steps=9, batch=2)
    g = torch.Generator().manual_seed(3)
    assert rows == [torch.randint(0, 6, (2,), generator=g).tolist() for _ in range(9)]
    assert r["windows_seen"] == len({i for step in rows for i in step})


def test_window_order_and_bad_sampling():
    from headalloc.compression.distill import distill_end_to_end, window_order

    g = torch.Generator().manual_seed(0)
    o = window_order(600, 600, 1, g)
    assert o.shape == (600, 1) and sorted(o.flatten().tolist()) == list(range(600))
    assert window_order(5, 0, 3, g).shape == (0, 3)
    model = tiny_llama()
    with pytest.raises(ValueError, match="kd_sampling must be one of epochs, replacement; got 'shuffle'"):
        distill_end_to_end(model, compress_model(model, [LayerPlan(4, 4)] * 3), torch.zeros(2, 8, dtype=torch.long),
                           kd_args(steps=1, sampling="shuffle"), progress=False)


def test_ema_ends_at_the_moving_average_of_the_trajectory(monkeypatch):
    """With `ema` the student ends at the exponential moving average of the weights the optimiser visited
    (recorded after every Adam step, averaged here in float64 from the starting weights); the trajectory itself is
    the one without averaging (same seed), whose last weights differ from the average."""
    from headalloc.compression.distill import distill_end_to_end

    model = tiny_llama()
    w = torch.randint(0, 120, (6, 24))
    visited = []

    class Recording(torch.optim.Adam):
        def step(self, *a, **k):
            out = super().step(*a, **k)
            visited.append([p.detach().double().clone() for g in self.param_groups for p in g["params"]])
            return out

    monkeypatch.setattr(torch.optim, "Adam", Recording)

    def fitted(ema):
        visited.clear()
        student = compress_model(model, [LayerPlan(4, 4)] * 3)
        start = [p.detach().double().clone() for layer in student.model.layers for p in layer.self_attn.parameters()]
        r = distill_end_to_end(model, student, w, kd_args(steps=25, lr=3e-3, topk=16, ema=ema), progress=False)
        assert r["ema"] == ema and len(visited) == 25
        return student, start, [list(v) for v in visited]

    plain, _, path_plain = fitted(0.0)
    averaged, start, path = fitted(0.9)
    assert all(torch.equal(a, b) for a, b in zip(path_plain[-1], path[-1]))  # averaging leaves the path alone
    ref = start
    for step in path:
        ref = [0.9 * r + 0.1 * p for r, p in zip(ref, step)]
    got = [p.detach().double() for layer in averaged.model.layers for p in layer.self_attn.parameters()]
    last = [p.detach().double() for layer in plain.model.layers for p in layer.self_attn.parameters()]
    assert max(float((g - r).abs().max()) for g, r in zip(got, ref)) < 1e-6
    assert max(float((g - l).abs().max()) for g, l in zip(got, last)) > 1e-3
    with pytest.raises(ValueError, match="ema must be in"):
        distill_end_to_end(model, plain, w, kd_args(steps=1, ema=1.0), progress=False)


def test_hard_labels_pull_the_student_toward_the_windows_own_next_tokens():
    """With the label term the student's cross-entropy on the windows' next tokens (computed here from the logits,
    independently of transformers' loss the term uses) falls further than with the teacher's distribution alone; the
    windows repeat a pattern the random teacher does not know."""
    import torch.nn.functional as F

    from headalloc.compression.distill import distill_end_to_end

    model = tiny_llama()
    w = torch.arange(24).repeat(6, 1) % 7 + 3  # a period-7 sequence

    def ce_after(weight):
        student = compress_model(model, [LayerPlan(4, 4)] * 3)
        r = distill_end_to_end(model, student, w, kd_args(steps=60, lr=1e-2, topk=16, tail=True, train="layers",
                                                          label=weight), progress=False)
        assert r["label_weight"] == weight
        with torch.no_grad():
            logits = student(input_ids=w).logits
        return float(F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), w[:, 1:].reshape(-1)))

    with_labels, without = ce_after(2.0), ce_after(0.0)
    assert with_labels < without - 0.5, (with_labels, without)  # nats per token (about 0.9 apart here)
    with pytest.raises(ValueError, match="kd_label"):
        distill_end_to_end(model, compress_model(model, [LayerPlan(4, 4)] * 3), w, kd_args(steps=1, label=-1.0),
                           progress=False)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_calibration_moments_equal_float64_sums_of_the_captured_inputs(dtype):
    # per-window Grams are formed in float32 where the activations are (session 14); the moments must still equal
    # the float64 mean of [x; 1][x; 1]^T over every captured row, and of the output projections' inputs
    model = tiny_llama().to(dtype)
    windows = torch.randint(0, 120, (3, 20), generator=torch.Generator().manual_seed(1))
    seen = [[] for _ in range(3)]
    hooks = [adapter_for(model).attention(model, i).o_proj.register_forward_pre_hook(
        lambda m, a, i=i: seen[i].append(a[0].reshape(-1, a[0].shape[-1]).double())) for i in range(3)]
    try:
        cal = collect(model, windows, keep=True, outputs=True)
    finally:
        for h in hooks:
            h.remove()
    assert cal.tokens == 60
    for i in range(3):
        x = torch.cat([t.reshape(-1, t.shape[-1]).double() for t in cal.inputs[i]])
        aug = torch.cat([x, torch.ones(len(x), 1, dtype=torch.float64)], 1)
        assert cal.second_moment[i].dtype == torch.float64
        ref = aug.T @ aug / 60
        # float32 products: near-cancelling entries lose digits, the matrix as a whole does not
        assert float((cal.second_moment[i] - ref).norm() / ref.norm()) < 1e-6
        z = torch.cat(seen[i])
        ref = z.T @ z / 60
        assert float((cal.out_moment[i] - ref).norm() / ref.norm()) < 1e-6


def test_bfloat16_autocast_end_to_end_keeps_float32_weights_and_tracks_the_float32_run():
    """Mixed precision: the trained weights stay float32, the loss falls, and the result is near the
    float32 run's (same seed and windows), the reference for what the autocast only approximates."""
    from headalloc.compression.distill import distill_end_to_end

    model = tiny_llama()
    w = torch.randint(0, 120, (6, 24))

    def run(autocast):
        student = compress_model(model, [LayerPlan(4, 4)] * 3)
        r = distill_end_to_end(model, student, w, kd_args(steps=40, lr=1e-3, topk=16), progress=False, autocast=autocast)
        assert all(p.dtype == torch.float32 for p in student.parameters())
        return r, student

    (r32, s32), (r16, s16) = run("none"), run("bfloat16")
    assert r16["autocast"] == "bfloat16" and r16["loss_after"] < r16["loss_before"]
    assert r16["loss_before"] == pytest.approx(r32["loss_before"])  # the reports are float32 forwards
    assert abs(r16["loss_after"] - r32["loss_after"]) < 0.1 * (r32["loss_before"] - r32["loss_after"])
    with pytest.raises(ValueError, match="autocast must be"):
        distill_end_to_end(model, s16, w, kd_args(steps=1), progress=False, autocast="float8")


def test_full_vocabulary_distill_loss_is_kl_plus_entropy():
    from headalloc.compression.distill import full_distill_loss

    torch.manual_seed(0)
    t_logits, s_logits = torch.randn(2, 5, 30), torch.randn(2, 5, 30)
    p = torch.softmax(t_logits, -1)
    kl = torch.nn.functional.kl_div(torch.log_softmax(s_logits, -1), p, reduction="sum") / 10
    entropy = -(p * p.log()).sum(-1).mean()
    torch.testing.assert_close(full_distill_loss(s_logits, t_logits), kl + entropy)
    # soft-target cross-entropy, torch's own
    ce = torch.nn.functional.cross_entropy(s_logits.reshape(-1, 30), p.reshape(-1, 30))
    torch.testing.assert_close(full_distill_loss(s_logits, t_logits), ce)


def test_end_to_end_full_vocabulary_matches_stored_targets_over_the_whole_vocabulary():
    """kd k=0 (the teacher run at every step, the whole distribution) trains exactly as stored top-k targets with
    k = the vocabulary size (nothing renormalised away): the same weights after the same steps."""
    import copy

    from headalloc.compression.distill import distill_end_to_end

    model = tiny_llama()
    a = compress_model(model, [LayerPlan(4, 4)] * 3)
    b = copy.deepcopy(a)
    w = torch.randint(0, 120, (6, 24))
    ra = distill_end_to_end(model, a, w, kd_args(steps=40, lr=1e-3, topk=0), progress=False)
    rb = distill_end_to_end(model, b, w, kd_args(steps=40, lr=1e-3, topk=120), progress=False)
    assert ra["loss_after"] < ra["loss_before"]
    assert ra["loss_before"] == pytest.approx(rb["loss_before"], rel=1e-5)
    with torch.no_grad():  # the reported loss is the soft cross-entropy against the teacher, from the logits
        want = sum(torch.nn.functional.cross_entropy(
            a(input_ids=w[i:i + 1]).logits[0], torch.softmax(model(input_ids=w[i:i + 1]).logits[0], -1))
            for i in range(4)) / 4
    assert ra["loss_after"] == pytest.approx(float(want), rel=1e-5)
    for (n, pa), (_, pb) in zip(a.named_parameters(), b.named_parameters()):
        torch.testing.assert_close(pa, pb, rtol=1e-4, atol=1e-5, msg=n)
    with pytest.raises(ValueError, match="kd_topk must be >= 1, or 0"):
        distill_end_to_end(model, a, w, kd_args(steps=1, topk=-1), progress=False)
