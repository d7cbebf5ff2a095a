"""Attention-ablation importance of each layer of a trained causal `SeqModel` language model.

For layer l: the mean next-token cross-entropy on the given windows with layer l's attention output
removed (the residual stream passes through unchanged), minus the intact model's. A layer whose
attention can be removed at little cost is a layer where attention parameters can be spared.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


@torch.no_grad()
def _lm_loss(model, windows: torch.Tensor, batch: int) -> float:
    tot, n = 0.0, 0
    for i in range(0, windows.shape[0], batch):
        w = windows[i:i + batch]
        logits = model(w[:, :-1])
        tot += F.cross_entropy(logits.reshape(-1, logits.shape[-1]), w[:, 1:].reshape(-1), reduction="sum").item()
        n += w[:, 1:].numel()
    return tot / n


@torch.no_grad()
def layer_ablation(model, windows: torch.Tensor, batch: int = 16) -> dict:
    """{"base_loss", "ablated_loss": [per layer], "delta": [per layer]} on `windows` (n, T+1) token ids."""
    if windows.ndim != 2 or windows.shape[1] < 2:
        raise ValueError(f"windows must be (n, T+1) token ids with T >= 1; got shape {tuple(windows.shape)}")
    was_training = model.training
    model.eval()
    try:
        base = _lm_loss(model, windows, batch)
        ablated = []
        for block in model.blocks:
            handle = block.attn.register_forward_hook(lambda mod, inp, out: torch.zeros_like(out))
            try:
                ablated.append(_lm_loss(model, windows, batch))
            finally:
                handle.remove()
    finally:
        model.train(was_training)
    return {"base_loss": base, "ablated_loss": ablated, "delta": [a - base for a in ablated],
            "n_windows": int(windows.shape[0]), "window_tokens": int(windows.shape[1] - 1)}
