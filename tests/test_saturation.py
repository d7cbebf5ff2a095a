"""Saturation measurement: the full-context-row shortcut against separate windows of exactly L
tokens run through eager attention, with a dense eigensolver as the norm reference."""

import numpy as np
import pytest
import torch
from transformers import BertConfig, BertModel

from headalloc.assets.corpus import token_windows
from headalloc.probe.saturation import loglog_slope, measure_saturation


def dense_norm(p):
    J = torch.diag_embed(p) - p.unsqueeze(-1) * p.unsqueeze(-2)
    return torch.linalg.eigvalsh(J)[..., -1]


def test_causal_saturation_matches_separate_windows(tiny_llama, tiny_tokenizer):
    lengths = [4, 8, 16, 32]
    rec = measure_saturation(tiny_llama, tiny_tokenizer, "pydoc", lengths, n_windows=3, seed=1, progress=False)
    windows = token_windows(tiny_tokenizer, "pydoc", "validation", 32, 3, seed=1)
    tiny_llama.set_attn_implementation("eager")
    for i, L in enumerate(lengths):
        with torch.no_grad():
            att = tiny_llama(input_ids=windows[:, :L], output_attentions=True).attentions
        for layer, a in enumerate(att):
            ref = dense_norm(a[:, :, L - 1].double()).mean(0)  # (heads,), mean over windows
            assert np.allclose(rec["norm_mean"][i][layer], ref.numpy(), rtol=1e-5, atol=1e-7)
            pmax = a[:, :, L - 1].amax(-1).mean(0)
            assert np.allclose(rec["pmax_mean"][i][layer], pmax.numpy(), atol=1e-5)
    assert rec["causal"] and rec["n_layers"] == 2 and rec["n_heads"] == 6


def test_bidirectional_saturation_averages_every_row(tiny_tokenizer):
    torch.manual_seed(0)
    model = BertModel(BertConfig(vocab_size=300, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                                 intermediate_size=48, max_position_embeddings=64)).eval()
    tiny_tokenizer.cls_token, tiny_tokenizer.sep_token = "<|endoftext|>", "<|endoftext|>"
    rec = measure_saturation(model, tiny_tokenizer, "pydoc", [8, 16], n_windows=2, progress=False)
    assert not rec["causal"]
    model.set_attn_implementation("eager")
    cls = [tiny_tokenizer.cls_token_id]
    for i, L in enumerate([8, 16]):
        w = token_windows(tiny_tokenizer, "pydoc", "validation", L, 2, seed=0, prefix_ids=cls, suffix_ids=cls)
        with torch.no_grad():
            att = model(input_ids=w, output_attentions=True).attentions
        for layer, a in enumerate(att):
            ref = dense_norm(a.double()).permute(1, 0, 2).reshape(4, -1)
            assert np.allclose(rec["norm_mean"][i][layer], ref.mean(1).numpy(), rtol=1e-5)
            assert np.allclose(rec["norm_median"][i][layer], ref.median(1).values.numpy(), rtol=1e-5)


def test_loglog_slope_recovers_power_law():
    L = [4, 8, 16, 32, 64]
    assert loglog_slope(L, [3.0 / x for x in L]) == pytest.approx(-1.0)
    assert loglog_slope(L, [2.0 * x ** 0.5 for x in L]) == pytest.approx(0.5)


def test_saturation_rejects_lengths_beyond_the_model(tiny_llama, tiny_tokenizer):
    with pytest.raises(ValueError, match="exceeds the model's maximum of 128"):
        measure_saturation(tiny_llama, tiny_tokenizer, "pydoc", [4, 256], n_windows=1, progress=False)
    with pytest.raises(ValueError, match=">= 2"):
        measure_saturation(tiny_llama, tiny_tokenizer, "pydoc", [1, 4], n_windows=1, progress=False)


def test_seqmodel_saturation_matches_separate_windows_and_eigvalsh():
    """Row L-1 of one long window = the last row of a window of exactly L (causality), and the
    Jacobian norm equals the dense eigensolver's largest eigenvalue of diag(p) - p p^T."""
    from headalloc.models import SeqModel, SeqModelConfig
    from headalloc.probe.saturation import seqmodel_saturation

    torch.manual_seed(0)
    m = SeqModel(SeqModelConfig(d_model=32, layers=[[[2, 8, 8], [1, 16, 16]], [[4, 8, 8]]], vocab_size=40,
                                causal=True, positions="rotary", layernorm=True, ffn_hidden=32, max_len=32))
    x = torch.randint(0, 40, (3, 32))
    lengths = [2, 5, 16, 32]
    got = np.asarray(seqmodel_saturation(m, x, lengths)["norm_mean"])
    ref = np.zeros_like(got)
    for i, L in enumerate(lengths):
        vals = {0: [], 1: []}
        for li, block in enumerate(m.blocks):
            def hook(gi, q, k, li=li):
                logits = q[:, :, -1:].double() @ k.double().transpose(-1, -2) / q.shape[-1] ** 0.5
                p = torch.softmax(logits, -1)[:, :, 0]  # (B, H, L): the last row sees all L keys
                J = torch.diag_embed(p) - p[..., :, None] * p[..., None, :]
                vals[li].append(torch.linalg.eigvalsh(J)[..., -1].flatten())
            block.attn.score_hook = hook
        with torch.no_grad():
            m.eval()(x[:, :L])
        for block in m.blocks:
            block.attn.score_hook = None
        for li in vals:
            ref[i, li] = torch.cat(vals[li]).mean().item()
    # the two sides come from float32 forward passes over windows of different lengths, whose matmuls may block (and
    # round) differently with more than one thread: equal to float32 rounding, not bit for bit
    np.testing.assert_allclose(got, ref, rtol=1e-6, atol=1e-9)
    with pytest.raises(ValueError, match="windows must be"):
        seqmodel_saturation(m, x[:, :8], lengths)


def test_both_readings_against_the_dense_jacobian_and_sinks_removed():
    """Row reading = spectral norm of diag(p) - pp^T (eigvalsh); column reading = column norms of the same
    matrix; dropping a key renormalises the rest."""
    import torch

    from headalloc.theory.saturation import softmax_jacobian_columns, softmax_jacobian_norm, without_keys

    torch.manual_seed(0)
    p = torch.softmax(torch.randn(5, 7, dtype=torch.float64) * 3, -1)
    J = torch.diag_embed(p) - p[:, :, None] * p[:, None, :]
    cols = J.norm(dim=1)  # ||J e_l|| for each key l
    mean, mx = softmax_jacobian_columns(p)
    torch.testing.assert_close(mean, cols.mean(-1))
    torch.testing.assert_close(mx, cols.amax(-1))
    torch.testing.assert_close(softmax_jacobian_norm(p), torch.linalg.eigvalsh(J)[:, -1])
    drop = torch.zeros(7, dtype=torch.bool)
    drop[0] = True
    q = without_keys(p, drop)
    torch.testing.assert_close(q[:, 1:], p[:, 1:] / p[:, 1:].sum(-1, keepdim=True))
    assert (q[:, 0] == 0).all()
    assert bool((mean <= 2 ** 0.5 / 7 + 1e-12).all())  # the column average is at most sqrt(2)/L for any p


def test_readings_probe_rows_and_sinks_on_a_tiny_causal_model():
    """The last-row reading at L equals the readings of the model's own attention row L-1 computed densely."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from headalloc.probe.saturation import measure_saturation_readings

    torch.manual_seed(0)
    m = LlamaForCausalLM(LlamaConfig(vocab_size=50, hidden_size=32, intermediate_size=32, num_hidden_layers=1,
                                     num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=64,
                                     attn_implementation="eager")).eval()
    w = torch.randint(0, 50, (2, 16))
    r = measure_saturation_readings(m, None, w, [8, 16], progress=False)
    with torch.no_grad():
        att = m(w, output_attentions=True).attentions[0].double()  # (B, H, T, T)
    p = att[:, :, 15, :16]
    J = torch.diag_embed(p) - p[..., :, None] * p[..., None, :]
    want = torch.linalg.eigvalsh(J)[..., -1].mean()
    assert r["readings"]["row|last|with"]["per_layer"][1][0] == pytest.approx(float(want), rel=1e-6)
    q = p[..., 1:] / p[..., 1:].sum(-1, keepdim=True)
    Jq = torch.diag_embed(q) - q[..., :, None] * q[..., None, :]
    want_cols = Jq.norm(dim=-2).mean(-1).mean()
    assert r["readings"]["col_mean|last|without"]["per_layer"][1][0] == pytest.approx(float(want_cols),
                                                                                       rel=1e-6)


def test_readings_of_our_own_decoder_use_its_real_attention():
    """Our SeqModel decoders (rotary, two head groups): the probe's probabilities, mixed with the layer's values
    and output projection, give the layer's real output (so they are the attention it ran); the last-row reading
    equals the dense eigensolver on those probabilities."""
    import torch

    from headalloc.models import SeqModel, SeqModelConfig
    from headalloc.probe.attention import AttentionChunk, SeqModelProbe
    from headalloc.probe.saturation import measure_saturation_readings

    torch.manual_seed(0)
    m = SeqModel(SeqModelConfig(vocab_size=40, output_dim=40, d_model=24, layers=[[(2, 8, 8), (4, 2, 2)]] * 2,
                                positions="rotary", residual=True, layernorm=True, ffn_hidden=32, max_len=32,
                                causal=True)).double().eval()
    w = torch.randint(0, 40, (2, 16))
    chunks: list[AttentionChunk] = []
    seen = {}
    m.blocks[1].attn.register_forward_hook(lambda mod, args, out: seen.update(x=args[0], out=out))
    with SeqModelProbe(m, chunks.append, dtype=torch.float64), torch.no_grad():
        m(w)
    a = m.blocks[1].attn
    v = a.qkv(seen["x"]).split([a.qk_total, a.qk_total, a.v_total], -1)[2]
    mixed, vo = [], 0
    for c in [c for c in chunks if c.layer == 1]:
        H = c.probs.shape[1]
        g = a.groups[[0, 2].index(c.head_start)]
        vh = v[..., vo:vo + H * g.v_dim].view(2, 16, H, g.v_dim).transpose(1, 2)
        mixed.append((c.probs @ vh).transpose(1, 2).reshape(2, 16, H * g.v_dim))
        vo += H * g.v_dim
    torch.testing.assert_close(a.out(torch.cat(mixed, -1)), seen["out"])
    r = measure_saturation_readings(m, None, w, [8, 16], progress=False)
    p = torch.cat([c.probs for c in chunks if c.layer == 0], 1)[:, :, 15]
    J = torch.diag_embed(p) - p[..., :, None] * p[..., None, :]
    assert r["readings"]["row|last|with"]["per_layer"][1][0] == pytest.approx(
        float(torch.linalg.eigvalsh(J)[..., -1].mean()), rel=1e-5)
