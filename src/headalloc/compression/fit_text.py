"""The text a student is fitted on: windows of a corpus, or the original model's own samples.

"generated": each window starts with `prompt` tokens of the corpus (train split) and continues with
what the original model samples at `temperature` (its own distribution: data-free distillation in
the spirit of generating the teacher's text; the prompts only vary the topics). `prompt` 0: no corpus
text at all, every window starts from the tokenizer's BOS token (else its EOS, the usual document
separator) and is the model's unconditional sample. Sampled once per
setting and cached on disk (next to the converted models), so other strategies and budgets reuse
them. "mixed": half corpus windows, half generated; any parts joined by "+" (e.g.
"corpus+generated+canterbury") share the windows equally, or by weight ("corpus:2+generated+canterbury").
"""

from __future__ import annotations

import io

import numpy as np
import torch
from tqdm.auto import tqdm


def _cache_path(teacher, corpus: str, n: int, length: int, seed: int, prompt: int, temperature: float, batch: int):
    from headalloc.assets.models import cache_file, model_identity

    return cache_file("generated", {**model_identity(teacher, all_weights=False), "corpus": corpus, "n": n,
                                    "length": length, "seed": seed, "prompt": prompt, "t": temperature,
                                    "batch": batch}, ".npy")


@torch.no_grad()
def generated_windows(teacher, tok, corpus: str, n: int, length: int, seed: int, prompt: int = 8,
                      temperature: float = 1.0, batch: int = 64, progress: bool = True) -> torch.Tensor:
    """(n, length) token windows: `prompt` corpus tokens (0: one BOS/EOS token), then the teacher's samples
    (no early stop), `batch` sequences sampled together (the draws depend on it, so it is part of the cache
    key)."""
    from headalloc.assets import token_windows
    from headalloc.io import atomic_write_bytes

    if length <= max(prompt, 1):
        raise ValueError(f"generated windows need length > prompt (and > 1); got length {length}, prompt {prompt}")
    start = tok.bos_token_id if tok.bos_token_id is not None else tok.eos_token_id
    if prompt == 0 and start is None:
        raise ValueError("unconditional samples (gen_prompt 0) start from the tokenizer's BOS or EOS token, and this "
                         "tokenizer has neither; use gen_prompt >= 1 (corpus tokens start each window)")
    path = _cache_path(teacher, corpus, n, length, seed, prompt, temperature, batch)
    if path.exists():
        try:
            arr = np.load(path, allow_pickle=False)
            if arr.shape == (n, length):
                return torch.from_numpy(arr)
        except (OSError, ValueError):
            pass  # damaged: sample again
    prompts = token_windows(tok, corpus, "train", prompt, n, seed=seed + 7) if prompt else \
        torch.full((n, 1), start, dtype=torch.long)
    width = prompts.shape[1]
    device = teacher.get_input_embeddings().weight.device
    gen = torch.Generator(device="cpu").manual_seed(seed)
    rows = []
    for s in tqdm(range(0, n, batch), desc="sampling fitting text from the original", disable=not progress,
                  leave=False):
        torch.manual_seed(int(torch.randint(0, 2**31 - 1, (1,), generator=gen)))
        p = prompts[s:s + batch].to(device)
        out = teacher.generate(p, attention_mask=torch.ones_like(p), do_sample=True, temperature=temperature,
                               top_k=0, top_p=1.0, max_new_tokens=length - width, min_new_tokens=length - width,
                               pad_token_id=tok.pad_token_id if tok.pad_token_id is not None else 0)
        rows.append(out[:, :length].cpu())
    arr = torch.cat(rows)
    buf = io.BytesIO()
    np.save(buf, arr.numpy(), allow_pickle=False)
    try:
        atomic_write_bytes(path, buf.getvalue())
    except OSError as e:
        from headalloc.io import cache_write_error

        raise cache_write_error(path, e) from None
    return arr


def fit_windows(teacher, tok, cfg, n: int, length: int, seed: int, progress: bool = True, parts: bool = False):
    """`n` windows of `length` tokens to fit on, per `cfg.fit.text`: shares of its parts by weight (the first takes
    what does not divide), each from a train split only (`cfg.fit.corpus`'s, or a named text's) or sampled, shuffled.
    `parts`: return (windows, the part each window came from), e.g. for choosing a plan by its worst part."""
    from headalloc.assets import token_windows

    names, weights = zip(*cfg.fit_shares)
    if names == ("corpus",):
        w = token_windows(tok, cfg.fit.corpus, "train", length, n, seed=seed)
        return (w, ["corpus"] * len(w)) if parts else w
    total = sum(weights)
    shares = [n * w // total for w in weights[1:]]
    shares = [n - sum(shares)] + shares
    out, labels = [], []
    for part, m in zip(names, shares):
        if not m:
            continue
        labels += [part] * m
        if part == "generated":
            out.append(generated_windows(teacher, tok, cfg.fit.corpus, m, length, seed, cfg.fit.gen_prompt,
                                         cfg.fit.gen_temperature, cfg.fit.gen_batch, progress=progress))
        else:
            out.append(token_windows(tok, cfg.fit.corpus if part == "corpus" else part, "train", length, m, seed=seed))
    w = torch.cat(out)
    order = torch.randperm(len(w), generator=torch.Generator().manual_seed(seed))
    return (w[order], [labels[i] for i in order.tolist()]) if parts else w[order]
