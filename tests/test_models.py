"""Grouped-head attention against an independent reference: per-group attention written out by hand
with explicit softmax, and torch's own MultiheadAttention for the one-group case."""

import pytest
import torch

from headalloc.models import GroupedAttention, SeqModel, SeqModelConfig, attention_params
from headalloc.models.attention import apply_rotary, as_groups, rotary_cache, split_width


def reference_attention(layer: GroupedAttention, x: torch.Tensor) -> torch.Tensor:
    """Each head computed one at a time with an explicit softmax and causal mask."""
    B, T, _ = x.shape
    W, b = layer.qkv.weight, layer.qkv.bias
    qk, vt = layer.qk_total, layer.v_total
    heads_out = []
    q_off, v_off = 0, 2 * qk
    for g in layer.groups:
        for h in range(g.n_heads):
            qs = slice(q_off + h * g.qk_dim, q_off + (h + 1) * g.qk_dim)
            ks = slice(qk + q_off + h * g.qk_dim, qk + q_off + (h + 1) * g.qk_dim)
            vs = slice(v_off + h * g.v_dim, v_off + (h + 1) * g.v_dim)
            q, k, v = x @ W[qs].T + b[qs], x @ W[ks].T + b[ks], x @ W[vs].T + b[vs]
            if layer.rotary:
                cos, sin = rotary_cache(T, g.qk_dim)
                q, k = apply_rotary(q, cos, sin), apply_rotary(k, cos, sin)
            s = q @ k.transpose(-1, -2) / g.qk_dim ** 0.5
            if layer.causal:
                s = s.masked_fill(~torch.ones(T, T, dtype=torch.bool).tril(), float("-inf"))
            heads_out.append(torch.softmax(s, -1) @ v)
        q_off += g.n_heads * g.qk_dim
        v_off += g.n_heads * g.v_dim
    return layer.out(torch.cat(heads_out, -1))


@pytest.mark.parametrize("groups,causal,rotary", [
    ([(2, 8, 8), (3, 4, 6), (1, 16, 2)], True, False),
    ([(4, 4, 4), (2, 8, 8)], False, False),
    ([(2, 8, 8), (1, 4, 12)], True, True),
])
def test_grouped_attention_matches_per_head_reference(groups, causal, rotary):
    torch.manual_seed(0)
    layer = GroupedAttention(24, groups, causal=causal, rotary=rotary)
    x = torch.randn(3, 11, 24)
    assert torch.allclose(layer(x), reference_attention(layer, x), atol=1e-5)


def test_one_group_equals_torch_multihead_attention():
    torch.manual_seed(0)
    mha = torch.nn.MultiheadAttention(32, 4, batch_first=True)
    layer = GroupedAttention(32, [(4, 8, 8)], causal=True)
    with torch.no_grad():
        layer.qkv.weight.copy_(mha.in_proj_weight)
        layer.qkv.bias.copy_(mha.in_proj_bias)
        layer.out.weight.copy_(mha.out_proj.weight)
        layer.out.bias.copy_(mha.out_proj.bias)
    x = torch.randn(2, 9, 32)
    mask = torch.ones(9, 9, dtype=torch.bool).triu(1)
    ref, _ = mha(x, x, x, attn_mask=mask, need_weights=False)
    assert torch.allclose(layer(x), ref, atol=1e-5)
    assert attention_params(32, [(4, 8, 8)]) == sum(p.numel() for p in mha.parameters())


def test_padding_mask_ignores_padded_keys():
    torch.manual_seed(0)
    layer = GroupedAttention(16, [(2, 8, 8)], causal=False)
    x = torch.randn(1, 6, 16)
    keep = torch.tensor([[1, 1, 1, 1, 0, 0]], dtype=torch.bool)
    full = layer(x, keep)[:, :4]
    trimmed = layer(x[:, :4])
    assert torch.allclose(full, trimmed, atol=1e-6)


def test_bad_groups_and_widths_are_clear_errors():
    with pytest.raises(ValueError, match="positive integer"):
        as_groups([(0, 8)])
    with pytest.raises(ValueError, match="does not divide into 3 heads"):
        split_width(64, 3)
    with pytest.raises(ValueError, match="even query/key widths"):
        GroupedAttention(16, [(2, 3, 3)], rotary=True)
    with pytest.raises(ValueError, match="exactly one of input_dim"):
        SeqModelConfig(d_model=8, layers=[[(1, 8)]])


def test_seqmodel_papers_setups_shapes_and_counts():
    m = SeqModel(SeqModelConfig(d_model=256, layers=[[(8, 8, 8)] * 4], input_dim=8, output_dim=8,
                                positions="sinusoidal"))
    assert m(torch.randn(2, 16, 8)).shape == (2, 16, 8)
    assert m.attention_params() == sum(p.numel() for p in m.blocks[0].attn.parameters())
    r = SeqModel(SeqModelConfig(d_model=32, layers=[[(4, 8, 8)]], input_dim=4, input_mlp_hidden=32,
                                readout_hidden=32, cls_token=True, residual=False))
    assert r(torch.randn(5, 7, 4)).shape == (5, 1)
    # the classification token sees every position: permuting the inputs leaves the output unchanged
    x = torch.randn(2, 7, 4)
    assert torch.allclose(r(x), r(x[:, torch.randperm(7)]), atol=1e-5)
    with pytest.raises(ValueError, match="exceeds max_len"):
        m(torch.randn(1, 2000, 8))


@pytest.mark.parametrize("kind", ["linear", "log"])
@pytest.mark.parametrize("dot", [True, False])
def test_relative_position_bias_equals_explicit_per_head_softmax(kind, dot):
    """Each head's scores are q.k/sqrt(d) (if dot) - p_h phi(i - j), causal, softmax per head:
    checked against a loop over heads written out with explicit softmax."""
    import math

    from headalloc.models.attention import GroupedAttention

    torch.manual_seed(0)
    layer = GroupedAttention(12, [(2, 4, 3), (3, 2, 2)], causal=True, rel_bias=kind, dot=dot).double()
    with torch.no_grad():
        for s in layer.slopes:
            s.copy_(torch.randn_like(s))
    x = torch.randn(2, 7, 12, dtype=torch.float64)
    q_all, k_all, v_all = layer.qkv(x).split([layer.qk_total, layer.qk_total, layer.v_total], -1)
    outs, qo, vo = [], 0, 0
    for gi, g in enumerate(layer.groups):
        for h in range(g.n_heads):
            q = q_all[..., qo + h * g.qk_dim: qo + (h + 1) * g.qk_dim]
            k = k_all[..., qo + h * g.qk_dim: qo + (h + 1) * g.qk_dim]
            v = v_all[..., vo + h * g.v_dim: vo + (h + 1) * g.v_dim]
            scores = torch.zeros(2, 7, 7, dtype=torch.float64)
            for i in range(7):
                for j in range(7):
                    dist = abs(i - j)
                    phi = dist if kind == "linear" else math.log1p(dist)
                    scores[:, i, j] = (q[:, i] @ k[:, j].T).diagonal() / math.sqrt(g.qk_dim) * dot \
                        - layer.slopes[gi][h] * phi if j <= i else -math.inf
            outs.append(torch.softmax(scores, -1) @ v)
        qo += g.n_heads * g.qk_dim
        vo += g.n_heads * g.v_dim
    ref = layer.out(torch.cat(outs, -1))
    torch.testing.assert_close(layer(x), ref)
    with pytest.raises(ValueError, match="rel_bias must be"):
        GroupedAttention(12, [(2, 4)], rel_bias="t5")


@pytest.mark.parametrize("causal,rel_bias", [(False, None), (True, None), (True, "linear"), (False, "log")])
def test_last_only_is_the_last_row_of_the_hand_written_attention(causal, rel_bias):
    """`last_only` (used for the classification-token readout) gives the last row of the full layer, which is
    checked against the per-head reference (padding masks included)."""
    torch.manual_seed(1)
    layer = GroupedAttention(24, [(2, 8, 8), (3, 4, 6)], causal=causal, rel_bias=rel_bias).double()
    x = torch.randn(3, 9, 24, dtype=torch.float64)
    full = layer(x)
    if rel_bias is None:
        torch.testing.assert_close(full, reference_attention(layer, x))
    torch.testing.assert_close(layer(x, last_only=True), full[:, -1:])
    pad = torch.ones(3, 9, dtype=torch.bool)
    pad[0, 2:5] = False
    torch.testing.assert_close(layer(x, pad, last_only=True), layer(x, pad)[:, -1:])


def test_cls_model_reads_the_same_output_as_all_rows():
    """A classification-token SeqModel computes only the read row in its last layer: the same output as the
    full forward pass (every row computed, the last one read)."""
    torch.manual_seed(2)
    cfg = SeqModelConfig(input_dim=4, output_dim=1, d_model=16, layers=[[(2, 4, 4)], [(4, 4, 4)]],
                         positions="none", residual=True, cls_token=True, input_mlp_hidden=8, readout_hidden=8)
    m = SeqModel(cfg).double()
    x = torch.randn(5, 12, 4, dtype=torch.float64)
    h = torch.cat([m.embed(x), m.cls.expand(5, 1, -1)], 1)
    for block in m.blocks:
        h = block(h)
    torch.testing.assert_close(m(x), m.readout(m.norm_f(h)[:, -1]))
