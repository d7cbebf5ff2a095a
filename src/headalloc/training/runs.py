"""Run functions: a config dict in, a JSON-able result out. Sweeps call these by dotted name."""

from __future__ import annotations

import torch

from headalloc.models import SeqModel, SeqModelConfig
from headalloc.tasks import make_task
from headalloc.training.trainer import TrainConfig, train


def build_model(task, model_cfg: dict) -> SeqModel:
    """A SeqModel shaped for `task` (input/vocab/output sizes come from the task)."""
    cfg = dict(model_cfg)
    cfg.setdefault("max_len", task.x_train.shape[1] + 1)
    cfg.update(input_dim=task.input_dim, vocab_size=task.vocab_size, output_dim=task.output_dim)
    if task.seq_to_vec:
        cfg.setdefault("cls_token", True)
    return SeqModel(SeqModelConfig(**cfg))


def run_synthetic(config: dict, progress: bool = False) -> dict:
    """config = {"task": {"name": ..., **params}, "model": {SeqModelConfig fields}, "train": {TrainConfig fields}}."""
    torch.set_num_threads(int(config.get("threads", 1)))
    task_cfg = dict(config["task"])
    task = make_task(task_cfg.pop("name"), **task_cfg)
    tcfg = TrainConfig(**config.get("train", {}))
    torch.manual_seed(tcfg.seed)
    model = build_model(task, config["model"])
    out = train(model, task, tcfg, progress=progress, desc=config.get("label", "train"))
    T = task.x_train.shape[1]
    out.update(n_params=model.n_params(), attention_params=model.attention_params(),
               attention_flops_per_token=model.attention_flops_per_token(T + int(model.cfg.cls_token)))
    return out
