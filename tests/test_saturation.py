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
