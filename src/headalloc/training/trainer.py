"""Training loop for the synthetic tasks: AdamW, warm-up + cosine schedule, seeded, with validation
metrics (MSE, NMSE = MSE / Var(y); cross-entropy and accuracy for token tasks)."""

from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from headalloc.tasks.synthetic import TaskData


class NonFiniteLossError(RuntimeError):
    """The loss became NaN or infinite."""


@dataclass
class TrainConfig:
    steps: int = 2000
    batch_size: int = 128
    lr: float = 1e-3
    weight_decay: float = 0.0
    warmup: int = 100
    schedule: str = "cosine"  # "cosine" (to 10% of lr) or "constant"
    grad_clip: float = 1.0
    eval_every: int = 500
    eval_batch: int = 1000
    seed: int = 0

    def __post_init__(self):
        if self.steps < 1 or self.batch_size < 1:
            raise ValueError(f"steps and batch_size must be >= 1; got steps={self.steps}, batch_size={self.batch_size}")
        if not (self.lr > 0 and math.isfinite(self.lr)):
            raise ValueError(f"lr must be a positive number; got {self.lr}")
        if self.schedule not in ("cosine", "constant"):
            raise ValueError(f"schedule must be 'cosine' or 'constant'; got {self.schedule!r}")

    def to_dict(self) -> dict:
        return asdict(self)


def lr_at(step: int, cfg: TrainConfig) -> float:
    if step < cfg.warmup:
        return cfg.lr * (step + 1) / cfg.warmup
    if cfg.schedule == "constant":
        return cfg.lr
    t = (step - cfg.warmup) / max(1, cfg.steps - cfg.warmup)
    return cfg.lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(1.0, t))))


def _loss(out: torch.Tensor, y: torch.Tensor, data: TaskData) -> torch.Tensor:
    if data.score_mask is not None:
        out, y = out[:, data.score_mask], y[:, data.score_mask]
    if data.loss == "ce":
        return F.cross_entropy(out.reshape(-1, out.shape[-1]), y.reshape(-1))
    return F.mse_loss(out, y)


@torch.no_grad()
def evaluate(model, x: torch.Tensor, y: torch.Tensor, data: TaskData, batch: int = 1000) -> dict:
    """Validation metrics over scored positions: mse and nmse, or ce and accuracy."""
    model.eval()
    outs = torch.cat([model(x[i:i + batch]) for i in range(0, len(x), batch)])
    model.train()
    if data.score_mask is not None:
        outs, y = outs[:, data.score_mask], y[:, data.score_mask]
    if data.loss == "ce":
        ce = F.cross_entropy(outs.reshape(-1, outs.shape[-1]), y.reshape(-1)).item()
        acc = (outs.argmax(-1) == y).float().mean().item()
        return {"ce": ce, "accuracy": acc}
    mse = F.mse_loss(outs, y).item()
    var = y.var(unbiased=False).item()
    return {"mse": mse, "nmse": mse / var if var > 0 else float("nan")}


def train(model: torch.nn.Module, data: TaskData, cfg: TrainConfig, progress: bool = True, desc: str = "train") -> dict:
    """Train `model` on `data`; returns the validation history and final train/validation metrics."""
    torch.manual_seed(cfg.seed)
    g = torch.Generator().manual_seed(cfg.seed)
    decay = [p for n, p in model.named_parameters() if p.ndim >= 2]
    no_decay = [p for n, p in model.named_parameters() if p.ndim < 2]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": cfg.weight_decay},
                             {"params": no_decay, "weight_decay": 0.0}], lr=cfg.lr)
    n = len(data.x_train)
    history = []
    t0 = time.time()
    model.train()
    bar = tqdm(range(cfg.steps), desc=desc, disable=not progress, leave=False, mininterval=1.0)
    running = None
    for step in bar:
        for group in opt.param_groups:
            group["lr"] = lr_at(step, cfg)
        idx = torch.randint(0, n, (cfg.batch_size,), generator=g)
        loss = _loss(model(data.x_train[idx]), data.y_train[idx], data)
        if not torch.isfinite(loss):
            raise NonFiniteLossError(
                f"loss became {loss.item()} at step {step} (lr {lr_at(step, cfg):.2e}); lower the learning rate "
                f"(now {cfg.lr}), raise warm-up (now {cfg.warmup}) or keep grad_clip on (now {cfg.grad_clip})")
        opt.zero_grad(set_to_none=True)
        loss.backward()
        if cfg.grad_clip:
            torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
        opt.step()
        running = loss.item() if running is None else 0.98 * running + 0.02 * loss.item()
        if (step + 1) % cfg.eval_every == 0 or step + 1 == cfg.steps:
            m = evaluate(model, data.x_val, data.y_val, data, cfg.eval_batch)
            history.append({"step": step + 1, "train_loss_ema": running, **{f"val_{k}": v for k, v in m.items()}})
            bar.set_postfix({k: f"{v:.3g}" for k, v in m.items()})
    sub = slice(0, min(n, 2000))
    final_train = evaluate(model, data.x_train[sub], data.y_train[sub], data, cfg.eval_batch)
    final_val = evaluate(model, data.x_val, data.y_val, data, cfg.eval_batch)
    return {"history": history, "train": final_train, "val": final_val, "seconds": time.time() - t0}
