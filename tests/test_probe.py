"""The probe's captured attention equals eager attention's own output, on tiny random models of
the LLaMA (RoPE, grouped-query), GPT-2 and BERT families, while the model runs SDPA."""

import pytest
import torch
from transformers import (BertConfig, BertModel, GPT2Config, GPT2LMHeadModel, LlamaConfig,
                          LlamaForCausalLM)

from headalloc.probe import AttentionProbe, capture_attentions


def tiny(family: str, attn: str):
    torch.manual_seed(0)
    if family == "llama":
        cfg = LlamaConfig(vocab_size=97, hidden_size=48, intermediate_size=64, num_hidden_layers=2,
                          num_attention_heads=6, num_key_value_heads=2, head_dim=8, max_position_embeddings=64)
        m = LlamaForCausalLM(cfg)
    elif family == "gpt2":
        cfg = GPT2Config(vocab_size=97, n_embd=32, n_layer=2, n_head=4, n_positions=64)
        m = GPT2LMHeadModel(cfg)
    else:
        cfg = BertConfig(vocab_size=97, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                         intermediate_size=48, max_position_embeddings=64)
        m = BertModel(cfg)
    m.set_attn_implementation(attn)
    return m.eval()


@pytest.mark.parametrize("family", ["llama", "gpt2", "bert"])
def test_probe_under_sdpa_equals_eager_attentions(family):
    ids = torch.randint(0, 97, (2, 21), generator=torch.Generator().manual_seed(1))
    mask = torch.ones_like(ids)
    if family == "bert":
        mask[1, -5:] = 0  # padding keys in the second sequence
    eager = tiny(family, "eager")
    with torch.no_grad():
        ref = eager(input_ids=ids, attention_mask=mask, output_attentions=True).attentions
    model = tiny(family, "sdpa")
    got = capture_attentions(model, ids, attention_mask=mask)
    assert len(got) == len(ref)
    for g, r in zip(got, ref):
        valid = mask[:, None, :, None].bool().expand_as(r)  # rows of padding queries are undefined
        assert torch.allclose(g[valid], r[valid], atol=1e-5), (g - r).abs().max()


def test_probe_leaves_model_outputs_unchanged_and_restores_kernel():
    model = tiny("llama", "sdpa")
    ids = torch.randint(0, 97, (1, 16))
    with torch.no_grad():
        before = model(ids).logits
        with AttentionProbe(model, lambda c: None):
            during = model(ids).logits
        after = model(ids).logits
    assert torch.equal(before, during) and torch.equal(before, after)
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS
    assert "sdpa" not in ALL_ATTENTION_FUNCTIONS._local_mapping


def test_probe_rows_and_head_chunks():
    model = tiny("llama", "sdpa")
    ids = torch.randint(0, 97, (1, 16))
    full = capture_attentions(model, ids)
    seen = {}

    def cb(c):
        seen[(c.layer, c.head_start)] = c.probs
        assert c.kv_group == 3

    with AttentionProbe(model, cb, rows=[3, 15], head_chunk=2), torch.no_grad():
        model(ids)
    assert sorted(seen) == [(l, h) for l in range(2) for h in (0, 2, 4)]
    for (l, h), p in seen.items():
        assert torch.allclose(p, full[l][:, h:h + 2, [3, 15]], atol=1e-6)
        assert torch.all(p[:, :, 0, 4:] == 0)  # causal: row 3 sees keys 0..3 only
