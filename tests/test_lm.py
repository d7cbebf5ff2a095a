"""Language-model experiment pieces: equal budgets across schedules, a tokenizer trained on the
training split only, and a short training run that lowers validation loss."""

import pytest

from headalloc.experiments.lm_allocation import SCHEDULES, configs
from headalloc.models import SeqModel, SeqModelConfig


def test_schedules_have_equal_attention_parameters():
    def attn(name):
        return SeqModel(SeqModelConfig(d_model=128, layers=SCHEDULES[name], vocab_size=64)).attention_params()
    base = attn("uniform")
    for name in ("principle", "reverse", "early_heads"):
        assert attn(name) == base, name
    assert attn("principle_low") < base
    assert len(configs("quick")) == 3


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
