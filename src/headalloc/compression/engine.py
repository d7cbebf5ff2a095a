"""Running a GGUF in llama.cpp through its Python binding (llama-cpp-python): logits, generation, the cache it
allocates, speed, and the check of an export against the PyTorch model it came from. Needs the optional extra
`pip install headalloc[llamacpp]` (built from source; `./scripts/setup.sh --llamacpp`).
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import torch

ENGINE_INSTALL = "pip install 'headalloc[llamacpp]'  (or ./scripts/setup.sh --llamacpp; builds llama.cpp, minutes)"


def require_engine():
    """The llama_cpp module (llama-cpp-python), or a clear error naming the install."""
    try:
        import llama_cpp
    except ImportError:
        raise ValueError(f"llama.cpp's Python binding (llama-cpp-python) is not installed; install it with: "
                         f"{ENGINE_INSTALL}") from None
    return llama_cpp


class _CaptureStderr:
    """Collect what the C library writes to file descriptor 2 (llama.cpp's log) while the block runs."""

    def __enter__(self):
        import tempfile

        self.file = tempfile.TemporaryFile(mode="w+b")
        self.saved = os.dup(2)
        os.dup2(self.file.fileno(), 2)
        return self

    def __exit__(self, *exc):
        os.dup2(self.saved, 2)
        os.close(self.saved)
        self.file.seek(0)
        self.text = self.file.read().decode("utf-8", "replace")
        self.file.close()
        return False


def engine_open(path: str | os.PathLike, n_ctx: int, flash_attn: bool = True, threads: int | None = None,
                logits_all: bool = False):
    """(llama_cpp.Llama, its load log) for the GGUF at `path`; a file that llama.cpp refuses is a clear error."""
    llama_cpp = require_engine()
    if not Path(path).is_file():
        raise FileNotFoundError(f"{path} does not exist; write it with `headalloc export-gguf`")
    with _CaptureStderr() as cap:
        try:
            llm = llama_cpp.Llama(str(path), n_ctx=n_ctx, n_batch=512, n_threads=threads, logits_all=logits_all,
                                  flash_attn=flash_attn, verbose=True, seed=0)
        except ValueError as e:
            err = e
        else:
            err = None
    if err is not None:
        lines = [ln for ln in cap.text.splitlines() if "error" in ln.lower()]
        raise ValueError(f"llama.cpp could not load {path}: {lines[-1] if lines else err}")
    return llm, cap.text


def engine_logits(path: str | os.PathLike, ids: list[int], flash_attn: bool = True) -> np.ndarray:
    """llama.cpp's logits (len(ids), vocab) for the token ids `ids` (no BOS added)."""
    llm, _ = engine_open(path, n_ctx=max(64, len(ids)), flash_attn=flash_attn, logits_all=True)
    llm.eval(ids)
    out = np.array(llm.scores[: len(ids)], dtype=np.float32)
    llm.close()
    return out


def _mib(log: str, pattern: str) -> float | None:
    import re

    m = re.findall(pattern, log)
    return float(sum(float(x) for x in m)) if m else None


def memory_report(log: str) -> dict:
    """Buffer sizes (MiB) that llama.cpp reports when it loads a model and makes a context."""
    import re

    cells = re.findall(r"llama_kv_cache: size =\s*[\d.]+ MiB \(\s*(\d+) cells", log)
    return {"model_mib": _mib(log, r"model buffer size\s*=\s*([\d.]+) MiB"),
            "kv_cache_mib": _mib(log, r"llama_kv_cache: size =\s*([\d.]+) MiB"),
            "kv_cells": int(cells[0]) if cells else None,
            "compute_mib": _mib(log, r"compute buffer size\s*=\s*([\d.]+) MiB")}


def engine_measure(path: str | os.PathLike, tokens: list[int], contexts=(1024, 4096), new_tokens: int = 32,
                   flash_attn: bool = True, threads: int | None = None) -> dict:
    """In llama.cpp: KV-cache bytes per token and buffer sizes (from its own report) at the largest context,
    prompt tokens/s for a prompt of each context length, and generation tokens/s after it."""
    import time

    top = max(contexts)
    if len(tokens) < top + new_tokens:
        raise ValueError(f"need {top + new_tokens} tokens of text for contexts {contexts}; got {len(tokens)}")
    llm, log = engine_open(path, n_ctx=top + new_tokens, flash_attn=flash_attn, threads=threads)
    mem = memory_report(log)
    llama_cpp = require_engine()
    res = {"n_ctx": top + new_tokens, "flash_attn": flash_attn, **mem,
           # allocated cache / cells (llama.cpp rounds cells up to a multiple of 256; the report has 2 decimals)
           "kv_bytes_per_token_allocated": None if not mem["kv_cells"] else mem["kv_cache_mib"] * 2 ** 20 / mem["kv_cells"],
           "v_cache_padded": "padding V cache" in log, "speed": {}}
    state = {}
    for c in contexts:
        llm.reset()  # the next eval starts at position 0 and drops the cached keys and values
        t0 = time.perf_counter()
        llm.eval(tokens[:c])
        t1 = time.perf_counter()
        state[c] = llama_cpp.llama_state_seq_get_size(llm._ctx.ctx, 0)
        for t in tokens[c:c + new_tokens]:
            llm.eval([t])
        t2 = time.perf_counter()
        res["speed"][c] = {"prompt_tok_s": c / (t1 - t0), "gen_tok_s": new_tokens / (t2 - t1)}
    with _CaptureStderr():
        llm.close()
    if len(state) >= 2:  # exact: the sequence's saved state grows by this much per cached token
        (c1, s1), (c2, s2) = sorted(state.items())[:2]
        res["kv_bytes_per_token"] = (s2 - s1) / (c2 - c1)
    return res


@torch.no_grad()
def check_gguf(model: str | os.PathLike, gguf_path: str | os.PathLike, prompt: str, new_tokens: int = 16) -> dict:
    """The GGUF in llama.cpp against the PyTorch model it was exported from: tokenisation of `prompt`,
    logits on it (f32 export: equal up to float rounding), greedy agreement, and a short generation."""
    from headalloc.assets import load_model

    if new_tokens < 1:
        raise ValueError(f"--new-tokens must be >= 1; got {new_tokens}")
    if not Path(gguf_path).is_file():
        raise FileNotFoundError(f"{gguf_path} does not exist; write it with `headalloc export-gguf`")
    require_engine()
    m, tok = load_model(model, causal=True, dtype=torch.float32)
    ids = tok(prompt, add_special_tokens=False)["input_ids"]
    if len(ids) < 2:
        raise ValueError(f"the prompt {prompt!r} is too short; give a sentence")
    llm, _ = engine_open(gguf_path, n_ctx=max(64, len(ids) + new_tokens), logits_all=True)
    cpp_ids = llm.tokenize(prompt.encode("utf-8"), add_bos=False, special=True)
    llm.eval(ids)
    lc = np.array(llm.scores[: len(ids)], dtype=np.float32)
    lt = m(torch.tensor([ids])).logits[0].float().numpy()
    out = []
    for _ in range(new_tokens):
        t = int(np.argmax(llm.scores[llm.n_tokens - 1]))
        out.append(t)
        llm.eval([t])
    with _CaptureStderr():
        llm.close()
    return {"tokens_equal": cpp_ids == ids, "prompt_tokens": len(ids), "max_abs_diff": float(np.abs(lc - lt).max()),
            "logit_scale": float(np.abs(lt).max()), "argmax_agree": float((lc.argmax(-1) == lt.argmax(-1)).mean()),
            "generated": tok.decode(out), "generated_ids": out}
