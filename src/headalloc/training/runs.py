"""Run functions: a config dict in, a JSON-able result out. Sweeps call these by dotted name."""

from __future__ import annotations

import contextlib

import torch

from headalloc.models import SeqModel, SeqModelConfig
from headalloc.tasks import make_task
from headalloc.training.trainer import TrainConfig, train


def config_of(cls, d: dict, where: str):
    """`cls(**d)` with a clear error naming an unknown key (and the closest valid one) instead of a TypeError."""
    import dataclasses
    import difflib

    names = [f.name for f in dataclasses.fields(cls)]
    for k in d:
        if k not in names:
            close = difflib.get_close_matches(k, names, n=1)
            raise ValueError(f"unknown setting {where}.{k}" + (f"; did you mean {where}.{close[0]}?" if close else "")
                             + f" (valid: {', '.join(names)})")
    return cls(**d)


@contextlib.contextmanager
def torch_threads(n: int):
    """torch's intra-op thread count set to `n` for the block, then restored: a run in the caller's process (the
    local executor, `headalloc train`) must not leave the rest of it (e.g. a later experiment of the same
    `reproduce`) on its count, which changes its speed and, through summation order, its numbers."""
    before = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def build_model(task, model_cfg: dict) -> SeqModel:
    """A SeqModel shaped for `task` (input/vocab/output sizes come from the task)."""
    cfg = dict(model_cfg)
    cfg.setdefault("max_len", task.x_train.shape[1] + 1)
    cfg.update(input_dim=task.input_dim, vocab_size=task.vocab_size, output_dim=task.output_dim)
    if task.seq_to_vec:
        cfg.setdefault("cls_token", True)
    return SeqModel(config_of(SeqModelConfig, cfg, "model"))


def run_synthetic(config: dict, progress: bool = False) -> dict:
    """config = {"task": {"name": ..., **params}, "model": {SeqModelConfig fields}, "train": {TrainConfig fields},
    optional "threads" (torch threads for this run, default 1; restored afterwards)}."""
    with torch_threads(int(config.get("threads", 1))):
        return _run_synthetic(config, progress)


def _run_synthetic(config: dict, progress: bool) -> dict:
    missing = [k for k in ("task", "model") if not isinstance(config.get(k), dict)]
    if missing:
        raise ValueError(f"a run config needs the sections {missing} ({{'task': {{'name': ...}}, 'model': {{...}}, "
                         f"'train': {{...}}}}); got keys {sorted(config)}")
    if "name" not in config["task"]:
        raise ValueError("the run config's task has no 'name' (e.g. 'ngram', 'dretrieval')")
    task_cfg = dict(config["task"])
    task = make_task(task_cfg.pop("name"), **task_cfg)
    tcfg = config_of(TrainConfig, config.get("train", {}), "train")
    torch.manual_seed(tcfg.seed)
    model = build_model(task, config["model"])
    out = train(model, task, tcfg, progress=progress, desc=config.get("label", "train"))
    T = task.x_train.shape[1]
    out.update(n_params=model.n_params(), attention_params=model.attention_params(),
               attention_flops_per_token=model.attention_flops_per_token(T + int(model.cfg.cls_token)))
    return out


def run_lm(config: dict, progress: bool = False) -> dict:
    """Train a small causal LM on real text. config = {"corpus", "vocab_size", "model": {SeqModelConfig
    fields without vocab}, "train": {"steps", "batch_size", "seq_len", "lr", "warmup", "eval_every",
    "eval_windows", "seed"}, optional "save_dir"}. Returns the validation loss curve against training
    tokens; with "save_dir" the trained model is also saved there (safetensors, see `load_seqmodel`)."""
    with torch_threads(int(config.get("threads", 1))):
        return _run_lm(config, progress)


def _run_lm(config: dict, progress: bool) -> dict:
    import math
    import time

    import torch.nn.functional as F

    from headalloc.tasks.lm import fixed_windows, random_windows, token_stream, train_tokenizer
    from headalloc.training.trainer import NonFiniteLossError

    tr = config["train"]
    tok = train_tokenizer(config.get("corpus", "wiki"), config.get("vocab_size", 2048))
    train_ids = token_stream(tok, config.get("corpus", "wiki"), "train")
    val = fixed_windows(token_stream(tok, config.get("corpus", "wiki"), "validation"), tr["seq_len"],
                        tr.get("eval_windows", 64))
    torch.manual_seed(tr["seed"])
    mcfg = dict(config["model"], vocab_size=tok.get_vocab_size(), output_dim=tok.get_vocab_size(),
                max_len=tr["seq_len"], causal=True)
    model = SeqModel(SeqModelConfig(**mcfg))
    decay = [p for p in model.parameters() if p.ndim >= 2]
    other = [p for p in model.parameters() if p.ndim < 2]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": tr.get("weight_decay", 0.1)},
                             {"params": other, "weight_decay": 0.0}], lr=tr["lr"], betas=(0.9, 0.95))
    g = torch.Generator().manual_seed(tr["seed"])

    @torch.no_grad()
    def val_loss() -> float:
        model.eval()
        tot = sum(F.cross_entropy(model(w[None, :-1])[0], w[1:], reduction="sum").item() for w in val)
        model.train()
        return tot / (val.shape[0] * tr["seq_len"])

    curve, t0 = [], time.time()
    tokens_per_step = tr["batch_size"] * tr["seq_len"]
    for step in range(tr["steps"]):
        lr = tr["lr"] * min(1.0, (step + 1) / tr["warmup"]) * (
            0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(1.0, step / tr["steps"]))))
        for group in opt.param_groups:
            group["lr"] = lr
        b = random_windows(train_ids, tr["seq_len"], tr["batch_size"], g)
        logits = model(b[:, :-1])
        loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), b[:, 1:].reshape(-1))
        if not torch.isfinite(loss):
            raise NonFiniteLossError(f"loss became {loss.item()} at step {step}; lower lr (now {tr['lr']})")
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        if (step + 1) % tr["eval_every"] == 0 or step + 1 == tr["steps"]:
            curve.append({"step": step + 1, "tokens": (step + 1) * tokens_per_step, "val_loss": val_loss(),
                          "train_loss": loss.item()})
    if config.get("save_dir"):
        from headalloc.models import save_seqmodel

        save_seqmodel(model, config["save_dir"], extra={"corpus": config.get("corpus", "wiki"),
                                                        "vocab_size": config.get("vocab_size", 2048),
                                                        "seq_len": tr["seq_len"]})
    return {"val_loss": curve[-1]["val_loss"], "val_ppl": math.exp(curve[-1]["val_loss"]), "curve": curve,
            "n_params": model.n_params(), "attention_params": model.attention_params(),
            "attention_flops_per_token": model.attention_flops_per_token(tr["seq_len"]),
            "vocab_size": tok.get_vocab_size(), "train_tokens_available": len(train_ids),
            "seconds": time.time() - t0}
