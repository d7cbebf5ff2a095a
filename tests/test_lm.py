"""Language-model experiment pieces: equal budgets across schedules, a tokenizer trained on the
training split only, and a short training run that lowers validation loss."""

import pytest

import torch

from headalloc.experiments.lm_allocation import SCHEDULES, configs, measured_schedule
from headalloc.models import SeqModel, SeqModelConfig, load_seqmodel, save_seqmodel


def test_schedules_have_equal_attention_parameters():
    def attn(name):
        return SeqModel(SeqModelConfig(d_model=128, layers=SCHEDULES[name], vocab_size=64)).attention_params()
    base = attn("uniform")
    for name in ("principle", "reverse"):
        assert attn(name) == base, name
    assert attn("principle_low") < base
    assert len(configs("quick")) == 3  # the measured schedule is added after the uniform model is probed


@pytest.mark.parametrize("norms", [[0.3, 0.25, 0.2, 0.15, 0.1, 0.05], [1] * 6, [5, 0, 0, 0, 0, 0.01],
                                   [0.11, 0.29, 0.07, 0.2, 0.2, 0.13]])
def test_measured_schedule_spends_exactly_the_uniform_budget(norms):
    sched = measured_schedule(norms)
    def attn(layers):
        return SeqModel(SeqModelConfig(d_model=128, layers=layers, vocab_size=64)).attention_params()
    assert attn(sched) == attn(SCHEDULES["uniform"])
    widths = [sum(h * d for h, d in layer) for layer in sched]
    assert min(widths) >= 32
    # more saturated (smaller ||J||) never gets more width than a less saturated layer
    for i in range(6):
        for j in range(6):
            if norms[i] < norms[j]:
                assert widths[i] <= widths[j] + 32  # up to one unit of rounding
    if len(set(norms)) == 1:
        assert sched == [[(4, 32)]] * 6
    with pytest.raises(ValueError, match="not all zero"):
        measured_schedule([0] * 6)


def test_seqmodel_checkpoint_round_trip_and_corruption(tmp_path):
    torch.manual_seed(0)
    m = SeqModel(SeqModelConfig(d_model=32, layers=[[[2, 16, 16], [1, 8, 8]]] * 2, vocab_size=50, causal=True,
                                positions="rotary", layernorm=True, ffn_hidden=64, tie_embeddings=True, max_len=16))
    save_seqmodel(m, tmp_path / "ck", extra={"corpus": "wiki"})
    m2, meta = load_seqmodel(tmp_path / "ck")
    x = torch.randint(0, 50, (2, 12))
    assert torch.equal(m(x), m2(x)) and meta == {"corpus": "wiki"}
    assert m2.readout.weight is m2.embed.weight  # tying survives
    (tmp_path / "ck" / "model.safetensors").write_bytes(b"garbage")
    with pytest.raises(ValueError, match="corrupt"):
        load_seqmodel(tmp_path / "ck")
    with pytest.raises(FileNotFoundError, match="not a SeqModel checkpoint"):
        load_seqmodel(tmp_path / "nothing")


def test_run_lm_learns_on_real_text(tmp_path, monkeypatch):
    monkeypatch.setenv("HEADALLOC_CACHE", str(tmp_path))
    from headalloc.training.runs import run_lm
    cfg = {"corpus": "pydoc", "vocab_size": 300,
           "model": {"d_model": 32, "layers": [[[2, 16, 16]]] * 2, "positions": "rotary", "layernorm": True,
                     "ffn_hidden": 64, "tie_embeddings": True},
           "train": {"steps": 60, "batch_size": 8, "seq_len": 32, "lr": 3e-3, "warmup": 5, "eval_every": 30,
                     "eval_windows": 8, "seed": 0}}
    r = run_lm(cfg)
    assert r["curve"][-1]["val_loss"] < r["curve"][0]["val_loss"] + 1e-9
    assert r["curve"][-1]["val_loss"] < 5.7  # below the uniform guess ln(300) = 5.70
    assert list(tmp_path.glob("tokenizers/*.json"))


def test_lm_text_too_short_is_an_error():
    import torch
    from headalloc.tasks.lm import fixed_windows, random_windows
    with pytest.raises(ValueError, match="too short"):
        random_windows(torch.arange(10), 32, 2, torch.Generator())
    with pytest.raises(ValueError, match="were requested"):
        fixed_windows(torch.arange(100), 32, 10)


def test_layer_ablation_equals_zeroed_output_projection():
    """Removing a layer's attention = zeroing its output projection (weights and bias) in a copy."""
    import copy

    import torch.nn.functional as F

    from headalloc.probe.ablation import layer_ablation

    torch.manual_seed(0)
    m = SeqModel(SeqModelConfig(d_model=32, layers=[[[2, 16, 16]]] * 3, vocab_size=50, output_dim=50, causal=True,
                                positions="rotary", layernorm=True, ffn_hidden=64, max_len=16))
    w = torch.randint(0, 50, (5, 13))
    r = layer_ablation(m, w, batch=2)
    for li in range(3):
        m2 = copy.deepcopy(m)
        m2.blocks[li].attn.out.weight.data.zero_()
        m2.blocks[li].attn.out.bias.data.zero_()
        with torch.no_grad():
            logits = m2(w[:, :-1])
        ref = F.cross_entropy(logits.reshape(-1, 50), w[:, 1:].reshape(-1)).item()
        assert abs(r["ablated_loss"][li] - ref) < 1e-5
    assert abs(r["delta"][0] - (r["ablated_loss"][0] - r["base_loss"])) < 1e-12
