"""Evaluation of (compressed) causal LMs: held-out perplexity, parameter counts, KV-cache bytes,
FLOPs per token, and measured prefill/decode speed against a reference model in one run."""

from __future__ import annotations

import math
import time

import torch
from tqdm.auto import tqdm

from headalloc.compression.modeling_headalloc import CACHE_NAME  # "cache" from transformers 5.24



@torch.no_grad()
def perplexity(model, windows: torch.Tensor, progress: bool = True, desc: str = "perplexity") -> dict:
    """exp(mean next-token NLL) over every predicted token of the windows (each scored independently);
    "window_nll": each window's summed NLL (for intervals over windows, see `paired_ratio_interval`)."""
    nll, n, per = 0.0, 0, []
    device = model.get_input_embeddings().weight.device
    for w in tqdm(windows, desc=desc, disable=not progress, leave=False):
        logits = model(input_ids=w[None].to(device)).logits[0, :-1].double().cpu()
        per.append(float(torch.nn.functional.cross_entropy(logits, w[1:], reduction="sum")))
        nll += per[-1]
        n += w.numel() - 1
    return {"ppl": math.exp(nll / n), "nll": nll / n, "tokens": n, "window_nll": per}


def paired_ratio_interval(model_nll, reference_nll, tokens_per_window: int, level: float = 0.9,
                          resamples: int = 2000, seed: int = 0) -> dict:
    """The perplexity ratio of a model to a reference on the same windows (given each window's summed NLL), and
    a percentile bootstrap interval over windows (the same windows drawn for both: a paired resampling), so a
    ratio is reported with how much it could move on other windows of the same text."""
    import numpy as np

    a, b = np.asarray(model_nll, dtype=np.float64), np.asarray(reference_nll, dtype=np.float64)
    if a.shape != b.shape or a.ndim != 1 or len(a) < 2:
        raise ValueError(f"need the same windows (at least 2) for both; got {a.shape} and {b.shape}")
    if not 0 < level < 1:
        raise ValueError(f"level must be in (0, 1); got {level}")
    ratio = math.exp((a.sum() - b.sum()) / (len(a) * tokens_per_window))
    rng = np.random.default_rng(seed)
    idx = rng.integers(0, len(a), size=(resamples, len(a)))
    boot = np.exp((a[idx].sum(1) - b[idx].sum(1)) / (len(a) * tokens_per_window))
    lo, hi = np.quantile(boot, [(1 - level) / 2, (1 + level) / 2])
    return {"ratio": ratio, "low": float(lo), "high": float(hi), "level": level, "windows": len(a)}


def cached_perplexity(model, windows: torch.Tensor, progress: bool = True, desc: str = "perplexity") -> dict:
    """`perplexity`, kept on disk (under the cache folder) for a model that does not change between runs: the
    original's perplexities on the evaluation windows are the same in every run, so only the first pays them.
    Keyed by the model's config, the sum of its weights, dtype and device type and the windows' tokens."""
    import hashlib

    from headalloc.assets.models import cache_file, model_identity
    from headalloc.io import atomic_write_json, read_json

    p = next(model.parameters())
    tokens = hashlib.sha1(windows.to(torch.int64).cpu().numpy().tobytes()).hexdigest()
    path = cache_file("perplexity", {**model_identity(model), "dtype": str(p.dtype), "device": p.device.type,
                                     "windows": tokens, "shape": list(windows.shape)}, ".json")
    if path.exists():
        try:
            got = read_json(path)
            if isinstance(got, dict) and set(got) == {"ppl", "nll", "tokens", "window_nll"}:
                return got
        except (OSError, ValueError):
            pass  # damaged: measure again
    got = perplexity(model, windows, progress, desc)
    try:
        atomic_write_json(path, got)
    except OSError:
        pass  # a read-only cache folder costs only the time
    return got


def counts(model, context: int = 1024, batch: int = 1) -> dict:
    """Parameters, KV-cache bytes per token (model dtype and fp16) and FLOPs per token at `context`;
    `batch` sequences decoded together share one read of the weights (memory-traffic prediction).
    Works for the original (any supported family) and for a compressed model."""
    from headalloc.compression.reduce import student_specs

    if batch < 1 or context < 0:
        raise ValueError(f"batch must be >= 1 and context >= 0; got batch={batch}, context={context}")
    tc = model.config.get_text_config()
    specs = student_specs(model)
    attn_p = sum(s.params(tc.hidden_size) for s in specs)
    attn_ctx = sum(s.context_flops() for s in specs)  # per key: scores and mixing (decode)
    prefill_ctx = sum(s.context_flops(decode=False) for s in specs)
    kv = sum(s.kv_size() for s in specs)
    total = sum(p.numel() for p in model.parameters())
    emb = model.get_input_embeddings().weight.numel()
    lm_head = model.get_output_embeddings().weight.numel()
    matmul_params = total - emb + (lm_head if model.config.tie_word_embeddings else 0)
    norms = sum(p.numel() for n, p in model.named_parameters() if "norm" in n)
    biases = sum(p.numel() for n, p in model.named_parameters() if n.endswith(".bias"))
    dense = 2 * (matmul_params - norms - biases)
    elt = next(model.parameters()).element_size()
    return {
        "params_total": total,
        "params_attention": attn_p,
        "kv_bytes_per_token": kv * elt,
        "kv_bytes_per_token_fp16": kv * 2,
        "attention_flops_per_token": 2 * attn_p + attn_ctx * context,
        "decode_flops_per_token": dense + attn_ctx * context,  # one new token attending to `context` keys
        "prefill_flops_per_token": dense + prefill_ctx * (context + 1) / 2,
        # decode on a CPU is bound by memory traffic: every weight is read once per step (shared by the
        # `batch` sequences of the step) and each sequence's whole KV cache once per new token (GQA reads
        # each kv head once however many query heads share it)
        "decode_bytes_per_token": (matmul_params - norms) * elt / batch + kv * elt * context,
        "context": context,
        "batch": batch,
    }


@torch.no_grad()
def _prefill_decode(model, ids: torch.Tensor, new_tokens: int, batch: int = 1) -> tuple[float, float]:
    """Seconds for a prefill of `ids` (1, T) (building the KV cache) and for `new_tokens` greedy decode
    steps of `batch` sequences that share that prompt (the cache is copied `batch` times, not re-run)."""
    ids = ids.to(model.get_input_embeddings().weight.device)
    t = time.perf_counter()
    out = model(input_ids=ids, use_cache=True, logits_to_keep=1)
    t_pre = time.perf_counter() - t
    cache, nxt = getattr(out, CACHE_NAME), out.logits[:, -1:].argmax(-1)
    if batch > 1:
        cache.batch_repeat_interleave(batch)
        nxt = nxt.repeat(batch, 1)
    t = time.perf_counter()
    for _ in range(new_tokens):
        out = model(input_ids=nxt, use_cache=True, **{CACHE_NAME: cache})
        cache, nxt = getattr(out, CACHE_NAME), out.logits[:, -1:].argmax(-1)
    return t_pre, time.perf_counter() - t


def speed(models: dict, ids: torch.Tensor, contexts=(1024, 4096), new_tokens: int = 32, repeats: int = 2,
          progress: bool = True, batch: int = 1) -> dict:
    """Prefill (one sequence) and decode tokens/s (`batch` sequences per step, tokens counted over all)
    for each model at each context, interleaved so noise hits all alike (best of `repeats`)."""
    if batch < 1 or new_tokens < 1 or repeats < 1:
        raise ValueError(f"batch, new_tokens and repeats must be >= 1; got {batch}, {new_tokens}, {repeats}")
    res = {name: {} for name in models}
    for c in contexts:
        if ids.shape[1] < c:
            raise ValueError(f"speed test needs {c} tokens of text; got {ids.shape[1]}")
        x = ids[:, :c]
        best = {name: [float("inf"), float("inf")] for name in models}
        for _ in tqdm(range(repeats), desc=f"speed at context {c}", disable=not progress, leave=False):
            for name, m in models.items():
                t_pre, t_dec = _prefill_decode(m, x, new_tokens, batch)
                best[name][0] = min(best[name][0], t_pre)
                best[name][1] = min(best[name][1], t_dec)
        for name in models:
            res[name][str(c)] = {"prefill_tok_s": c / best[name][0], "decode_tok_s": batch * new_tokens / best[name][1],
                                 "prefill_seconds": best[name][0]}
    return res


def same_runtime(reference):
    """`reference` in the compressed models' own runtime (HeadallocForCausalLM with every dimension
    kept: identical logits, tested), so a speed comparison isolates what the compression removes from
    what the attention implementation does. Returns None if `reference` is already in that runtime."""
    from headalloc.compression.reduce import compress_model, identity_plan

    if getattr(reference.config, "model_type", None) == "headalloc":
        return None
    return compress_model(reference, identity_plan(reference)).eval()


def compare(reference, model, ids: torch.Tensor, contexts=(1024, 4096), new_tokens: int = 32, repeats: int = 2,
            progress: bool = True, batch: int = 1) -> dict:
    """Measured and FLOP-predicted speed-ups of `model` over `reference`, side by side, in one run.

    The headline measured speed-up is against the reference in the same runtime (see `same_runtime`);
    the speed-up against the stock Hugging Face model is reported next to it as `..._vs_stock`.
    """
    models = {"reference": reference, "model": model}
    twin = same_runtime(reference)
    if twin is not None:
        models = {"reference_stock": reference, "reference": twin, "model": model}
    sp = speed(models, ids, contexts, new_tokens, repeats, progress, batch)
    out = {}
    for c in contexts:
        cr, cm = counts(reference, c, batch), counts(model, c, batch)
        r, m = sp["reference"][str(c)], sp["model"][str(c)]
        pred_dec = cr["decode_flops_per_token"] / cm["decode_flops_per_token"]
        pred_bytes = cr["decode_bytes_per_token"] / cm["decode_bytes_per_token"]
        pred_pre = cr["prefill_flops_per_token"] / cm["prefill_flops_per_token"]
        meas_dec = m["decode_tok_s"] / r["decode_tok_s"]
        meas_pre = m["prefill_tok_s"] / r["prefill_tok_s"]
        out[str(c)] = {"reference": r, "model": m,
                       "decode_speedup_measured": meas_dec, "decode_speedup_predicted": pred_dec,
                       "decode_fraction_of_predicted": (meas_dec - 1) / (pred_dec - 1) if pred_dec > 1 else None,
                       "decode_speedup_predicted_bytes": pred_bytes,
                       "decode_fraction_of_predicted_bytes": (meas_dec - 1) / (pred_bytes - 1) if pred_bytes > 1
                       else None,
                       "prefill_speedup_measured": meas_pre, "prefill_speedup_predicted": pred_pre,
                       "batch": batch, "new_tokens": new_tokens, "repeats": repeats}
        if twin is not None:
            st = sp["reference_stock"][str(c)]
            out[str(c)].update(reference_stock=st, decode_speedup_vs_stock=m["decode_tok_s"] / st["decode_tok_s"],
                               prefill_speedup_vs_stock=m["prefill_tok_s"] / st["prefill_tok_s"])
    return out
