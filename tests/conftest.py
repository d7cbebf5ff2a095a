import os

import pytest
import torch

os.environ["HEADALLOC_LEDGER"] = "off"  # test runs append no rows to the repository's results ledger


@pytest.fixture(scope="session")
def tiny_tokenizer():
    """A byte-level BPE of 300 tokens trained on CPython's language reference (always on disk)."""
    from families import tiny_tokenizer as make

    return make()


@pytest.fixture
def tiny_llama():
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=300, hidden_size=48, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=6, num_key_value_heads=2, head_dim=8, max_position_embeddings=128)
    return LlamaForCausalLM(cfg).eval()
