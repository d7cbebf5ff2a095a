"""A compressed (or original) model in llama.cpp: GGUF export, and running it through llama-cpp-python.

Export (`export_gguf`) writes llama.cpp's `deci` architecture with the `gguf` package (the writer
llama.cpp's own converter uses). That architecture reads per-layer `head_count` / `head_count_kv`
arrays, so each layer keeps its own number of key-value heads and of query heads per key-value
head, and llama.cpp sizes each layer's KV cache from them; a layer with `head_count` 0 has no
attention (llama.cpp's `src/models/deci.cpp`). Everything else is the LLaMA layout: RMSNorm,
SwiGLU MLP, rotary positions on the whole head. What llama.cpp cannot run is refused with the
reason: query-key or value widths other than the original's, a subset of rotary pairs (compress
with `--target llamacpp`), per-head q/k norms (Qwen3), a sliding window shorter than the context
(Mistral), rotary scaling other than none / linear / llama3, a tokenizer that is not byte-level BPE.

Conventions carried over, each checked by the engine test (logits of llama.cpp against ours):
- transformers rotates the two halves of a head (rotate_half); llama.cpp's `deci` rotates
  adjacent pairs, so query and key rows (and their biases) are permuted within each head so that
  pair j = (j, j + d/2) becomes (2j, 2j + 1);
- llama3 rotary scaling becomes the `rope_freqs` tensor of per-frequency divisors;
- GGUF shapes are the reverse of PyTorch's (the writer does this); norms stay float32;
- tokens: byte-level BPE vocabulary in id order, added special tokens as CONTROL, other added
  tokens as USER_DEFINED; merges, special ids and the chat template by `gguf.SpecialVocab`; the
  pre-tokenizer name is read off tokenizer.json's pre-tokenizer.

Running the file in llama.cpp is `compression.engine`'s.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import torch

from headalloc.compression.families.base import UnsupportedModelError
from headalloc.compression.targets import TARGETS

ARCH = "deci"
FAMILIES = ("llama", "mistral", "qwen2", "phi3")
OUTTYPES = ("f32", "f16", "q8_0")

# tokenizer.json pre-tokenizer regexes (Split, before a ByteLevel without its own regex) -> llama.cpp's name
_SPLIT_PRE = {
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+":
        "llama-bpe",
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+":
        "qwen2",
}


def _pre_tokenizer_name(tokenizer_json: dict) -> str:
    """llama.cpp's name (`tokenizer.ggml.pre`) for this tokenizer.json's pre-tokenizer, or a clear error."""
    pre = tokenizer_json.get("pre_tokenizer") or {}
    kind = pre.get("type")
    if kind == "ByteLevel" and pre.get("use_regex", True):
        return "gpt-2"  # GPT-2's regex alone
    if kind == "Sequence":
        steps = pre.get("pretokenizers") or []
        kinds = [s.get("type") for s in steps]
        if kinds == ["Digits", "ByteLevel"] and steps[0].get("individual_digits") and steps[1].get("use_regex", True):
            return "smollm"  # every digit alone, then GPT-2's regex
        if kinds == ["Split", "ByteLevel"] and not steps[1].get("use_regex", True):
            pattern = (steps[0].get("pattern") or {}).get("Regex")
            if pattern in _SPLIT_PRE:
                return _SPLIT_PRE[pattern]
    raise UnsupportedModelError(
        f"the tokenizer's pre-tokenizer ({json.dumps(pre)[:200]}) is not one llama.cpp is known here to reproduce "
        f"(GPT-2 byte-level, SmolLM digits + GPT-2, LLaMA-3, Qwen2); export is refused rather than tokenising "
        f"differently from the model")


def _permute_rope(w: torch.Tensor, n_heads: int) -> torch.Tensor:
    """Rows of each head from rotate-half order (j, j + d/2) to adjacent pairs (2j, 2j + 1)."""
    d = w.shape[0] // n_heads
    return w.reshape(n_heads, 2, d // 2, *w.shape[1:]).transpose(1, 2).reshape(w.shape)


def _attention(model, l: int):
    """(spec dict, q, k, v, o, {bias name: tensor}) of layer l, for a compressed or an original model."""
    from headalloc.compression.families import adapter_for
    from headalloc.compression.reduce import Geometry

    if getattr(model.config, "model_type", None) == "headalloc":
        spec = model.config.attn_layers[l]
        a = model.model.layers[l].self_attn
        if spec["n_kv_heads"] == 0:
            return spec, None, None, None, None, {}
        biases = {n: getattr(a, f"{n}_proj").bias for n in "qkvo" if getattr(a, f"{n}_proj").bias is not None}
        return spec, a.q_proj.weight, a.k_proj.weight, a.v_proj.weight, a.o_proj.weight, biases
    g = Geometry.of(model)
    w = adapter_for(model).weights(model, l)
    spec = g.spec(g.full()).to_dict()
    spec["rope_pairs"] = [list(range(g.head_dim // 2))] * g.n_kv
    biases = {n: b for n, b in (("q", w.q_bias), ("k", w.k_bias), ("v", w.v_bias), ("o", w.o_bias)) if b is not None}
    return spec, w.q, w.k, w.v, w.o, biases


def check_exportable(model) -> list[dict]:
    """The per-layer specs of `model` if llama.cpp runs it exactly; else UnsupportedModelError / ValueError
    saying why."""
    from headalloc.compression.modeling_headalloc import full_head_dim

    tc = model.config.get_text_config()
    family = getattr(tc, "model_type", None)
    if family not in FAMILIES:
        why = (" (its per-head q/k normalisation has no counterpart in llama.cpp's deci architecture)"
               if family == "qwen3" else "")
        raise UnsupportedModelError(f"GGUF export supports the {', '.join(FAMILIES)} families; this model is "
                                    f"{family!r}{why}")
    if getattr(tc, "hidden_act", "silu") != "silu":
        raise UnsupportedModelError(f"GGUF export needs a SiLU-gated MLP; this model's activation is {tc.hidden_act!r}")
    window = getattr(tc, "sliding_window", None)
    if window is not None and window < tc.max_position_embeddings:
        raise UnsupportedModelError(
            f"this model attends within a sliding window of {window} tokens (of {tc.max_position_embeddings}); "
            f"llama.cpp's deci architecture has no sliding window, so longer contexts would differ")
    _rope(model)  # refuses unsupported scaling
    hd = full_head_dim(tc)
    specs = [_attention(model, l)[0] for l in range(tc.num_hidden_layers)]
    TARGETS["llamacpp"].check(specs, hd)
    if any(s.get("qk_norm") for s in specs):
        raise UnsupportedModelError("per-head q/k normalisation cannot be expressed in llama.cpp's deci architecture")
    return specs


def _rope(model) -> tuple[float, dict]:
    """(rope theta, extra GGUF keys/tensors) for the model's rotary scaling."""
    tc = model.config.get_text_config()
    params = dict(getattr(tc, "rope_parameters", None) or getattr(tc, "rope_scaling", None) or {})
    theta = float(params.get("rope_theta", getattr(tc, "rope_theta", 10000.0)))
    kind = params.get("rope_type", params.get("type", "default")) or "default"
    if kind == "default":
        return theta, {}
    if kind == "linear":
        return theta, {"linear": float(params["factor"])}
    if kind == "llama3":
        inv = model.model.rotary_emb.inv_freq.detach().double().cpu()
        d = inv.numel() * 2
        base = 1.0 / (theta ** (torch.arange(0, d, 2, dtype=torch.float64) / d))
        return theta, {"rope_freqs": (base / inv).float()}  # llama.cpp divides each frequency by its factor
    raise UnsupportedModelError(f"rotary scaling {kind!r} is not exported (none, linear and llama3 are)")


def _tokenizer(writer, folder: Path, vocab_size: int) -> None:
    import gguf
    from transformers import AutoTokenizer

    tj = folder / "tokenizer.json"
    if not tj.is_file():
        raise UnsupportedModelError(f"{folder} has no tokenizer.json (a fast tokenizer is needed for GGUF export)")
    spec = json.loads(tj.read_text(encoding="utf-8"))
    model = spec.get("model") or {}
    if model.get("type") != "BPE" or model.get("byte_fallback") or (spec.get("decoder") or {}).get("type") != "ByteLevel":
        raise UnsupportedModelError("GGUF export supports byte-level BPE tokenizers (GPT-2 style: SmolLM2, LLaMA-3, "
                                    "Qwen2); this tokenizer is not one")
    pre = _pre_tokenizer_name(spec)
    tok = AutoTokenizer.from_pretrained(folder, local_files_only=True)
    added = {i: t for i, t in tok.added_tokens_decoder.items()}
    n = max(vocab_size, len(tok))
    pieces = tok.convert_ids_to_tokens(list(range(len(tok))))
    tokens, types = [], []
    for i in range(n):
        if i >= len(pieces) or pieces[i] is None:  # embedding rows beyond the tokenizer: padding tokens
            tokens.append(f"[PAD{i}]".encode())
            types.append(gguf.TokenType.UNUSED)
            continue
        tokens.append(pieces[i].encode("utf-8"))
        if i in added:
            types.append(gguf.TokenType.CONTROL if added[i].special else gguf.TokenType.USER_DEFINED)
        else:
            types.append(gguf.TokenType.NORMAL)
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre(pre)
    writer.add_token_list(tokens)
    writer.add_token_types(types)
    special = gguf.SpecialVocab(folder, load_merges=True, n_vocab=n)
    special.add_to_gguf(writer, quiet=True)


def _tensor(writer, name: str, t: torch.Tensor, outtype: str) -> None:
    import gguf

    a = t.detach().float().cpu().numpy()
    if a.ndim == 1 or outtype == "f32":
        writer.add_tensor(name, a.astype(np.float32))
    elif outtype == "f16":
        writer.add_tensor(name, a.astype(np.float16))
    elif a.shape[-1] % 32 == 0:
        q = gguf.quants.quantize(a, gguf.GGMLQuantizationType.Q8_0)
        writer.add_tensor(name, q, raw_shape=q.shape, raw_dtype=gguf.GGMLQuantizationType.Q8_0)
    else:  # rows not a multiple of the 32-value block: kept in f16 (as llama.cpp's converter does)
        writer.add_tensor(name, a.astype(np.float16))


def load_for_export(model: str | os.PathLike):
    """(model in float32 on the CPU, its folder) for a name ('smollm2') or a saved folder (compressed or not)."""
    from headalloc.assets import load_model, resolve_model

    folder = resolve_model(model)
    if not (Path(folder) / "config.json").is_file():
        raise FileNotFoundError(f"{folder} has no config.json: give a folder that `headalloc compress` saved, or an "
                                f"original model's folder")
    m, _ = load_model(folder, causal=True, dtype=torch.float32)
    return m, Path(folder)


@torch.no_grad()
def export_gguf(model, out: str | os.PathLike, outtype: str = "f32", tokenizer_dir: str | os.PathLike | None = None,
                overwrite: bool = False, name: str | None = None, progress: bool = False) -> dict:
    """Write `model` (a name or folder, or a loaded compressed / original model with `tokenizer_dir`) to
    `out` as GGUF (`deci` architecture) in `outtype` (f32, f16 or q8_0). Refuses what llama.cpp cannot run
    and an existing `out` unless `overwrite`. The file is complete or absent. Returns a summary."""
    import gguf

    from headalloc.io import atomic_file

    if outtype not in OUTTYPES:
        raise ValueError(f"--outtype must be one of {', '.join(OUTTYPES)}; got {outtype!r}")
    out = Path(out)
    if out.suffix != ".gguf":
        raise ValueError(f"the output file should end in .gguf; got {out}")
    if out.is_dir():
        raise ValueError(f"{out} is a folder; give a file path ending in .gguf")
    if out.exists() and not overwrite:
        raise ValueError(f"{out} exists; pass --overwrite to replace it, or choose another path")
    if isinstance(model, (str, os.PathLike)):
        model, folder = load_for_export(model)
    else:
        if tokenizer_dir is None:
            raise ValueError("give tokenizer_dir (a folder with the model's tokenizer.json) with a loaded model")
        folder = Path(tokenizer_dir)
    specs = check_exportable(model)
    tc = model.config.get_text_config()
    L, hidden = tc.num_hidden_layers, tc.hidden_size
    from headalloc.compression.modeling_headalloc import full_head_dim

    hd = full_head_dim(tc)
    theta, rope_extra = _rope(model)
    n_head = [s["n_kv_heads"] * s["n_rep"] for s in specs]
    n_kv = [s["n_kv_heads"] for s in specs]
    with atomic_file(out, replace=overwrite) as tmp:
        w = gguf.GGUFWriter(tmp, arch=ARCH)
        w.add_name(name or str(getattr(model.config, "_name_or_path", "") or "headalloc model"))
        w.add_file_type({"f32": gguf.LlamaFileType.ALL_F32, "f16": gguf.LlamaFileType.MOSTLY_F16,
                         "q8_0": gguf.LlamaFileType.MOSTLY_Q8_0}[outtype])
        w.add_block_count(L)
        w.add_context_length(int(tc.max_position_embeddings))
        w.add_embedding_length(hidden)
        w.add_feed_forward_length([int(tc.intermediate_size)] * L)
        w.add_head_count(n_head)
        w.add_head_count_kv(n_kv)
        w.add_key_length(hd)
        w.add_value_length(hd)
        w.add_rope_dimension_count(hd)
        w.add_rope_freq_base(theta)
        w.add_layer_norm_rms_eps(float(tc.rms_norm_eps))
        w.add_vocab_size(int(tc.vocab_size))
        if "linear" in rope_extra:
            w.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
            w.add_rope_scaling_factor(rope_extra["linear"])
        _tokenizer(w, folder, int(tc.vocab_size))
        if getattr(model.config, "headalloc_plan", None):
            w.add_string("headalloc.plan", json.dumps(model.config.headalloc_plan.get("layers", [])))

        dec = model.model
        _tensor(w, "token_embd.weight", dec.embed_tokens.weight, outtype)
        _tensor(w, "output_norm.weight", dec.norm.weight, "f32")
        tied = bool(getattr(model.config, "tie_word_embeddings", False) or getattr(tc, "tie_word_embeddings", False))
        if not tied:
            _tensor(w, "output.weight", model.lm_head.weight, outtype)
        if "rope_freqs" in rope_extra:
            _tensor(w, "rope_freqs.weight", rope_extra["rope_freqs"], "f32")
        for l in range(L):
            layer = dec.layers[l]
            spec, q, k, v, o, biases = _attention(model, l)
            p = f"blk.{l}."
            if spec["n_kv_heads"] > 0:
                nq, nk = spec["n_kv_heads"] * spec["n_rep"], spec["n_kv_heads"]
                _tensor(w, p + "attn_norm.weight", layer.input_layernorm.weight, "f32")
                _tensor(w, p + "attn_q.weight", _permute_rope(q, nq), outtype)
                _tensor(w, p + "attn_k.weight", _permute_rope(k, nk), outtype)
                _tensor(w, p + "attn_v.weight", v, outtype)
                _tensor(w, p + "attn_output.weight", o, outtype)
                for n, b in biases.items():
                    b = _permute_rope(b, nq if n == "q" else nk) if n in "qk" else b
                    _tensor(w, p + {"q": "attn_q", "k": "attn_k", "v": "attn_v", "o": "attn_output"}[n] + ".bias",
                            b, "f32")
            mlp = layer.mlp
            if hasattr(mlp, "gate_up_proj"):  # Phi-3: gate and up fused, gate first
                gate, up = mlp.gate_up_proj.weight.chunk(2, dim=0)
            else:
                gate, up = mlp.gate_proj.weight, mlp.up_proj.weight
            _tensor(w, p + "ffn_norm.weight", layer.post_attention_layernorm.weight, "f32")
            _tensor(w, p + "ffn_gate.weight", gate, outtype)
            _tensor(w, p + "ffn_up.weight", up, outtype)
            _tensor(w, p + "ffn_down.weight", mlp.down_proj.weight, outtype)
        w.write_header_to_file()
        w.write_kv_data_to_file()
        w.write_tensors_to_file(progress=progress)
        w.close()
    kv_per_token = sum(s["n_kv_heads"] * (s["qk_dim"] + s["v_dim"]) for s in specs)
    return {"path": str(out), "bytes": out.stat().st_size, "outtype": outtype, "arch": ARCH, "head_count": n_head,
            "head_count_kv": n_kv, "kv_entries_per_token": kv_per_token,
            "layers_without_attention": [l for l, s in enumerate(specs) if s["n_kv_heads"] == 0]}
