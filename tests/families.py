"""Tiny random models built from each supported family's own config class (offline, no download),
with every weight randomised (biases and norm weights included, so that they matter)."""

import torch
from transformers import (LlamaConfig, LlamaForCausalLM, MistralConfig, MistralForCausalLM, Phi3Config,
                          Phi3ForCausalLM, Qwen2Config, Qwen2ForCausalLM, Qwen3Config, Qwen3ForCausalLM)

COMMON = dict(vocab_size=300, hidden_size=96, intermediate_size=64, num_hidden_layers=3, num_attention_heads=6,
              num_key_value_heads=2, max_position_embeddings=128)


def _llama():
    return LlamaForCausalLM(LlamaConfig(**COMMON, head_dim=16, tie_word_embeddings=True,
                                        rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                                      "high_freq_factor": 4.0, "original_max_position_embeddings": 16}))


def _llama_bias():
    return LlamaForCausalLM(LlamaConfig(**COMMON, head_dim=16, attention_bias=True))


def _mistral():
    return MistralForCausalLM(MistralConfig(**COMMON, head_dim=16, sliding_window=12))


def _qwen2():
    return Qwen2ForCausalLM(Qwen2Config(**COMMON, tie_word_embeddings=False))


def _qwen3():
    return Qwen3ForCausalLM(Qwen3Config(**COMMON, head_dim=16))


def _phi3():
    return Phi3ForCausalLM(Phi3Config(**COMMON, pad_token_id=0, bos_token_id=1, eos_token_id=2))


BUILDERS = {"llama": _llama, "llama-bias": _llama_bias, "mistral": _mistral, "qwen2": _qwen2, "qwen3": _qwen3,
            "phi3": _phi3}


def tiny(family: str, seed: int = 0):
    torch.manual_seed(seed)
    model = BUILDERS[family]()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("bias") or "norm" in name:
                p.copy_(torch.randn_like(p) * 0.3 + (1.0 if "norm" in name else 0.0))
    return model.eval()


def tiny_tokenizer(folder=None, vocab_size: int = 300):
    """A byte-level BPE trained on CPython's language reference (always on disk, offline); saved into
    `folder` when given."""
    from pydoc_data.topics import topics
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=["<|endoftext|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(list(topics.values()), trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|endoftext|>")
    if folder is not None:
        fast.save_pretrained(folder)
    return fast


def tiny_folder(family, folder, dtype=torch.float32):
    """A complete local checkpoint folder (config, safetensors weights, tokenizer) of a tiny model."""
    model = tiny(family).to(dtype)
    model.save_pretrained(folder)
    tiny_tokenizer(folder)
    return folder


def logits_without_headalloc(folder, ids: torch.Tensor, work, dtype: torch.dtype | None = None) -> torch.Tensor:
    """A saved model's logits on `ids` (float32), computed in a fresh Python process where importing headalloc
    fails: plain transformers with trust_remote_code=True, as a user without headalloc loads it. The process also
    checks the loaded weights' dtype (`dtype`, when given) and that greedy generation runs."""
    import subprocess
    import sys
    from pathlib import Path

    work = Path(work)
    torch.save(ids, work / "ids.pt")
    check = f"assert next(m.parameters()).dtype == torch.{str(dtype).split('.')[-1]}\n" if dtype is not None else ""
    code = ("import sys, torch; sys.modules['headalloc'] = None\n"
            "from transformers import AutoModelForCausalLM\n"
            f"m = AutoModelForCausalLM.from_pretrained({str(folder)!r}, trust_remote_code=True, dtype='auto')\n"
            + check +
            f"ids = torch.load({str(work / 'ids.pt')!r})\n"
            f"torch.save(m(ids).logits.detach().float(), {str(work / 'out.pt')!r})\n"
            "print(m.generate(ids, max_new_tokens=4, do_sample=False).shape)\n")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    return torch.load(work / "out.pt")


def held_cache_bytes(model, tokens: int = 12) -> int:
    """Bytes the model's KV cache really holds after a forward over `tokens` tokens (every tensor of every layer of
    the cache transformers hands back), divided by `tokens`: a measurement of the cache, independent of any cost
    formula."""
    from transformers.modeling_outputs import CausalLMOutputWithPast

    name = "cache" if "cache" in CausalLMOutputWithPast.__dataclass_fields__ else "past_key_values"
    vocab = model.get_input_embeddings().weight.shape[0]
    with torch.no_grad():
        cache = getattr(model(torch.randint(0, vocab, (1, tokens)), use_cache=True), name)
    held = 0
    for layer in cache.layers:
        for t in vars(layer).values():
            if isinstance(t, torch.Tensor):
                held += t.numel() * t.element_size()
    assert held % tokens == 0, "a cache holds whole tokens"
    return held // tokens
