"""Distillation of a compressed model: layer-local reconstruction from cached teacher activations.

For each layer, the student's attention (q, k, v, o projections) is fitted with Adam to the
teacher attention's output on the teacher's own layer inputs (calibration text), with loss
||y_student - y_teacher||^2 / E||y_teacher||^2. Layers are independent, so this runs on CPU in
minutes; every strategy gets the same windows and the same steps per layer.
"""

from __future__ import annotations

import torch
from tqdm.auto import tqdm


def distill_layerwise(teacher, student, data: dict, steps: int = 50, lr: float = 5e-4, seed: int = 0,
                      progress: bool = True) -> dict:
    """Fit each student attention layer to the teacher's; returns relative errors before and after."""
    g = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    n = len(data["pos"])
    before, after = [], []
    for l in tqdm(range(len(student.model.layers)), desc="distilling layers", disable=not progress):
        t_attn, s_attn = teacher.model.layers[l].self_attn, student.model.layers[l].self_attn
        with torch.no_grad():
            targets = [t_attn(hidden_states=X, position_embeddings=pe, attention_mask=None)[0]
                       for X, pe in zip(data["inputs"][l], data["pos"])]
            norm = torch.stack([t.square().mean() for t in targets]).mean()

        def rel_err() -> float:
            with torch.no_grad():
                return float(sum((s_attn(hidden_states=X, position_embeddings=pe, attention_mask=None)[0] - y)
                                 .square().mean() for X, pe, y in zip(data["inputs"][l], data["pos"], targets))
                             / n / norm)

        before.append(rel_err())
        if steps > 0:
            params = [p for p in s_attn.parameters()]
            for p in params:
                p.requires_grad_(True)
            opt = torch.optim.Adam(params, lr=lr)
            for _ in range(steps):
                i = int(torch.randint(0, n, (1,), generator=g))
                y = s_attn(hidden_states=data["inputs"][l][i], position_embeddings=data["pos"][i],
                           attention_mask=None)[0]
                loss = (y - targets[i]).square().mean() / norm
                if not torch.isfinite(loss):
                    raise RuntimeError(f"distillation loss became {loss.item()} in layer {l}; lower lr (now {lr})")
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
            for p in params:
                p.requires_grad_(False)
        after.append(rel_err())
    return {"layer_rel_error_before": before, "layer_rel_error_after": after, "steps_per_layer": steps, "lr": lr}
