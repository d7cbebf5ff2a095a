"""Distillation of a compressed model: layer-local reconstruction from cached teacher activations.

For each layer, the student's attention (q, k, v, o projections) is fitted with Adam to the
teacher attention's output on the teacher's own layer inputs (calibration text), with loss
||y_student - y_teacher||^2 / E||y_teacher||^2. Layers are independent, so this runs on CPU in
minutes; every strategy gets the same windows and the same steps per layer.
"""

from __future__ import annotations

import torch
from tqdm.auto import tqdm

from headalloc.compression.calibration import Calibration
from headalloc.compression.families import adapter_for
from headalloc.compression.settings import KD_AUTOCAST_CHOICES, KD_TRAIN_CHOICES, EndToEndArgs


def _layer_out(layer, h, pe):
    out = layer(h, attention_mask=None, position_embeddings=pe)
    return out[0] if isinstance(out, tuple) else out


def _student_layers(student):
    return student.model.layers  # a HeadallocForCausalLM (modeling_headalloc) in every family


def distill_layerwise(teacher, student, cal: Calibration, steps: int = 50, lr: float = 5e-4, seed: int = 0,
                      progress: bool = True, inputs: str = "teacher") -> dict:
    """Fit each student attention layer to the teacher's; returns relative errors before and after.

    `inputs="teacher"`: every layer sees the teacher's own inputs (layers independent).
    `inputs="student"`: layers are fitted in order, each on the inputs the already-fitted student
    layers below it produce (targets stay the teacher's outputs), so a layer learns to absorb the
    drift of the layers before it (the sequential mode of GPTQ-style calibration).
    The student may be in another dtype than the teacher (e.g. float32 fitting of a bfloat16 model):
    inputs and targets are cast to the student's dtype."""
    if inputs not in ("teacher", "student"):
        raise ValueError(f"inputs must be 'teacher' or 'student'; got {inputs!r}")
    if steps < 0:
        raise ValueError(f"steps must be >= 0; got {steps}")
    ad = adapter_for(teacher)
    g = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    n = len(cal.positions)
    before, after = [], []
    layers = _student_layers(student)
    p0 = next(student.parameters())
    dt = p0.dtype
    cast = lambda t: t.to(device=p0.device, dtype=dt)  # noqa: E731
    pos = [tuple(cast(t) for t in pe) for pe in cal.positions]
    hs = None
    if inputs == "student":
        with torch.no_grad():
            hs = [student.model.embed_tokens(w[None].to(p0.device)) for w in cal.windows]
    for l in tqdm(range(len(layers)), desc="distilling layers", disable=not progress):
        t_attn, s_attn = ad.attention(teacher, l), layers[l].self_attn
        with torch.no_grad():
            targets = [cast(t_attn(hidden_states=X, position_embeddings=pe, attention_mask=None)[0])
                       for X, pe in zip(cal.inputs[l], cal.positions)]
            norm = torch.stack([t.float().square().mean() for t in targets]).mean()
            if hs is not None:
                xs = [layers[l].input_layernorm(h) for h in hs]
            else:
                xs = [cast(X) for X in cal.inputs[l]]

        def rel_err() -> float:
            with torch.no_grad():
                return float(sum((s_attn(hidden_states=X, position_embeddings=pe, attention_mask=None)[0] - y)
                                 .float().square().mean() for X, pe, y in zip(xs, pos, targets)) / n / norm)

        before.append(rel_err())
        params = [p for p in s_attn.parameters()]
        if steps > 0 and params:  # (a layer without attention has nothing to fit)
            for p in params:
                p.requires_grad_(True)
            opt = torch.optim.Adam(params, lr=lr)
            for _ in range(steps):
                i = int(torch.randint(0, n, (1,), generator=g))
                y = s_attn(hidden_states=xs[i], position_embeddings=pos[i], attention_mask=None)[0]
                loss = (y - targets[i]).float().square().mean() / norm
                if not torch.isfinite(loss):
                    raise RuntimeError(f"distillation loss became {loss.item()} in layer {l}; lower lr (now {lr})")
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
            for p in params:
                p.requires_grad_(False)
        after.append(rel_err())
        if hs is not None:
            with torch.no_grad():
                hs = [_layer_out(layers[l], h, pe) for h, pe in zip(hs, pos)]
    return {"layer_rel_error_before": before, "layer_rel_error_after": after, "steps_per_layer": steps, "lr": lr,
            "inputs": inputs}


class TopKTargets:
    """Accumulates the teacher's top-k next-token probabilities from logits (batch, T, vocab), renormalised over
    the k tokens, and the probability left outside them; `result()` is `teacher_topk`'s dict. Can be fed by
    any teacher forward pass (e.g. the calibration pass that also gathers the whitening moments)."""

    def __init__(self, k: int):
        self.k = k
        self.ids, self.probs, self.tail = [], [], []

    def __call__(self, logits: torch.Tensor) -> None:
        top = torch.softmax(logits.float(), -1).topk(self.k, dim=-1)
        values, indices = top.values.cpu(), top.indices.cpu()
        kept = values.sum(-1, keepdim=True)
        self.tail.append((1 - kept[..., 0]).clamp_min(0))
        self.ids.append(indices)
        self.probs.append(values / kept)

    def result(self) -> dict:
        tail = torch.cat(self.tail)
        return {"ids": torch.cat(self.ids), "probs": torch.cat(self.probs), "tail": tail,
                "mass": float(1 - tail.mean()), "k": self.k}


def merge_topk(n: int, parts: list[tuple[torch.Tensor, dict]]) -> dict:
    """One `teacher_topk` dict for n windows from parts, each (window indices, its targets); together the
    indices must cover every window once."""
    parts = [(i, t) for i, t in parts if len(i)]
    covered = torch.cat([i for i, _ in parts]).sort().values
    if not torch.equal(covered, torch.arange(n)):
        raise ValueError(f"the parts' window indices must cover 0..{n - 1} once each")
    out = {}
    for key in ("ids", "probs", "tail"):
        first = parts[0][1][key]
        out[key] = first.new_empty((n,) + tuple(first.shape[1:]))
        for i, t in parts:
            out[key][i] = t[key]
    return {**out, "mass": float(1 - out["tail"].mean()), "k": parts[0][1]["k"]}


@torch.no_grad()
def teacher_topk(teacher, windows: torch.Tensor, k: int = 32, progress: bool = True, batch: int = 4) -> dict:
    """The teacher's top-k next-token probabilities on every position of `windows` (n, T), renormalised
    over the k tokens: a few MB instead of full-vocabulary logits, so distillation steps need no
    teacher forward. `batch` windows per forward (the full-vocabulary logits of a batch are the peak memory).
    Returns {"ids": (n, T, k) int64, "probs": (n, T, k), "tail": (n, T) probability outside the top k,
    "mass": mean top-k mass}."""
    acc = TopKTargets(k)
    device = adapter_for(teacher).embed(teacher).weight.device
    for s in tqdm(range(0, len(windows), batch), desc="teacher top-k", disable=not progress, leave=False):
        acc(teacher(input_ids=windows[s:s + batch].to(device)).logits)
    return acc.result()


def topk_distill_loss(logits: torch.Tensor, ids: torch.Tensor, probs: torch.Tensor,
                      tail: torch.Tensor | None = None) -> torch.Tensor:
    """Cross-entropy of the student against the teacher's top-k distribution, per token (mean).

    Without `tail`: against the top k renormalised, which pushes the student to put no mass outside
    them. With `tail` (the teacher's probability outside its top k): against the k tokens plus one
    "rest" bucket, i.e. KL(teacher || student) + H(teacher) on that coarsened distribution, which
    leaves the student's tail to match the teacher's. With k = vocabulary size both are
    KL(teacher || student) + the teacher's entropy."""
    logq = torch.log_softmax(logits.float(), -1)
    logq_k = logq.gather(-1, ids)
    if tail is None:
        return -(probs * logq_k).sum(-1).mean()
    p_k = probs * (1 - tail).unsqueeze(-1)
    rest = torch.log((1 - logq_k.exp().sum(-1)).clamp_min(1e-9))
    return -((p_k * logq_k).sum(-1) + tail * rest).mean()


def full_distill_loss(logits: torch.Tensor, teacher_logits: torch.Tensor) -> torch.Tensor:
    """Cross-entropy of the student against the teacher's whole next-token distribution, per token (mean):
    KL(teacher || student) + the teacher's entropy, the limit of `topk_distill_loss` as k reaches the vocabulary
    (the same units, so the two losses compare)."""
    p = torch.softmax(teacher_logits.float(), -1)
    return -(p * torch.log_softmax(logits.float(), -1)).sum(-1).mean()


def hidden_state_loss(student_hidden, teacher_hidden) -> torch.Tensor:
    """Mean over layers and tokens of |h_s - h_t|^2 / |h_t|^2, each decoder layer's output (the
    embedding output, identical in both, is skipped). Per-token normalisation keeps the few tokens
    with very large residual norms from dominating."""
    terms = [((s - t).square().sum(-1) / t.square().sum(-1).clamp_min(1e-12)).mean()
             for s, t in zip(student_hidden[1:], teacher_hidden[1:])]
    return torch.stack(terms).mean()


TRAIN_CHOICES, AUTOCAST_CHOICES = KD_TRAIN_CHOICES, KD_AUTOCAST_CHOICES  # (one table: settings.py)


def trainable(teacher, student, train: str) -> list[torch.nn.Parameter]:
    """What the end-to-end stage moves: every attention projection ("attention"), only the attention
    weights the plan changed ("reduced": a student weight whose name or shape the teacher's attention
    does not have; e.g. a latent layer's key/value factors, not its untouched query and output
    projections), or every decoder-layer weight ("layers")."""
    if train == "layers":
        return [p for layer in student.model.layers for p in layer.parameters()]
    if train == "attention":
        return [p for layer in student.model.layers for p in layer.self_attn.parameters()]
    out = []
    for ls, lt in zip(student.model.layers, teacher.model.layers):
        tshape = {n: p.shape for n, p in lt.self_attn.named_parameters()}
        out += [p for n, p in ls.self_attn.named_parameters() if tshape.get(n) != p.shape]
    return out


def window_order(n: int, steps: int, batch: int, generator: torch.Generator) -> torch.Tensor:
    """(steps, batch) window indices taking every one of n windows once per pass, each pass in a new random order
    (passes run on across step boundaries: a batch may hold the end of one pass and the start of the next)."""
    if n < 1 or steps < 0 or batch < 1:
        raise ValueError(f"need n >= 1 windows, steps >= 0 and batch >= 1; got {n}, {steps}, {batch}")
    need = steps * batch
    passes = [torch.randperm(n, generator=generator) for _ in range(-(-need // n))]
    return (torch.cat(passes) if passes else torch.zeros(0, dtype=torch.long))[:need].view(steps, batch)


def distill_end_to_end(teacher, student, windows: torch.Tensor, args: EndToEndArgs = EndToEndArgs(), seed: int = 0,
                       progress: bool = True, targets: dict | None = None, autocast: str = "none",
                       report_windows: int = 4) -> dict:
    """Fine-tune the student to match the teacher's next-token distributions on `windows` (fitting text), through
    the whole network, so errors that layer-local fitting leaves to accumulate across layers are corrected. `args`
    (`settings.EndToEndArgs`): `train` (see `trainable`) "attention" (every attention projection), "reduced" (only
    the attention weights the plan changed) or "layers" (every decoder-layer weight; embeddings and output head
    stay frozen); `tail`: the loss keeps the teacher's mass outside its top k as one extra bucket
    (`topk_distill_loss`); `hidden` > 0 adds that weight times `hidden_state_loss` (every layer's output against
    the teacher's, from a teacher forward each step); `anchor`, `label`: see their flags; `ema` in (0, 1): the
    student ends with an exponential moving average of the trained weights (decay `ema` per step, kept in float32
    from the starting weights) instead of the last step's; `sampling`: which windows each step takes
    (`window_order`). Adam, linear warm-up over the first 10% of steps, cosine decay to 10%.
    `autocast="bfloat16"`: the student's forward (and so its backward) runs under `torch.autocast` in bfloat16
    while the trained weights and Adam's state stay in their own dtype. `targets`: the teacher's top-k targets on
    `windows` (`teacher_topk`; computed here when not given). Returns the distillation loss before and after (on
    the first `report_windows` windows; the next-token term only) and the settings."""
    import math

    from headalloc.compression.precision import autocast_context

    args.validate()
    steps, lr, batch, k, train, tail = args.steps, args.lr, args.batch, args.topk, args.train, args.tail
    hidden_weight, anchor, ema, label_weight, sampling = args.hidden, args.anchor, args.ema, args.label, args.sampling
    full = k == 0  # the full-vocabulary KL: the teacher runs beside the student at every step, nothing stored
    if not full:
        targets = targets or teacher_topk(teacher, windows, k, progress)
    g = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    if autocast not in AUTOCAST_CHOICES:
        raise ValueError(f"autocast must be one of {', '.join(AUTOCAST_CHOICES)}; got {autocast!r}")
    if train not in TRAIN_CHOICES:
        raise ValueError(f"train must be one of {', '.join(TRAIN_CHOICES)}; got {train!r}")
    dev = student.get_input_embeddings().weight.device
    params = trainable(teacher, student, train)
    frozen = [p for p in student.parameters() if p.requires_grad]
    for p in student.parameters():
        p.requires_grad_(False)

    n_report = min(len(windows), report_windows)
    if not full and tail and "tail" not in targets:
        raise ValueError("tail=True needs targets with the teacher's tail mass (from teacher_topk)")
    tails = targets["tail"] if tail and not full else None

    def loss_on(logits: torch.Tensor, idx: torch.Tensor, teacher_logits: torch.Tensor | None = None) -> torch.Tensor:
        if full:
            if teacher_logits is None:
                with torch.no_grad():
                    teacher_logits = teacher(input_ids=windows[idx].to(dev)).logits
            return full_distill_loss(logits, teacher_logits.to(logits.device))
        return topk_distill_loss(logits, targets["ids"][idx].to(logits.device), targets["probs"][idx].to(logits.device),
                                 tails[idx].to(logits.device) if tails is not None else None)

    @torch.no_grad()
    def full_loss() -> float:  # on the first `report_windows` windows (a progress report, not an evaluation)
        return float(sum(loss_on(student(input_ids=windows[i:i + 1].to(dev)).logits, torch.tensor([i]))
                         for i in range(n_report)) / n_report)

    was_training = student.training
    student.eval()  # no dropout in LLaMA anyway; keeps the decode/prefill code paths as in use
    before = full_loss()
    for p in params:
        p.requires_grad_(True)
    opt = torch.optim.Adam(params, lr=lr)
    # anchor > 0: penalty anchor * sum_p |p - p0|^2 / |p0|^2 keeps the student near its initialisation
    init = [(p, p.detach().clone(), float(p.detach().float().square().sum()) or 1.0) for p in params] if anchor else []
    warm = max(1, steps // 10)
    averaged = [p.detach().float().clone() for p in params] if ema and steps else []
    curve = []
    order = window_order(len(windows), steps, batch, g) if sampling == "epochs" else None
    seen = set()
    for step in tqdm(range(steps), desc="end-to-end distillation", disable=not progress, leave=False):
        for group in opt.param_groups:
            group["lr"] = lr * min(1.0, (step + 1) / warm) * (0.1 + 0.45 * (1 + math.cos(math.pi * step / steps)))
        # ("replacement" draws step by step, as before the setting existed: the same windows for the same seed)
        idx = order[step] if order is not None else torch.randint(0, len(windows), (batch,), generator=g)
        seen.update(idx.tolist())
        with autocast_context(autocast, dev):
            ids = windows[idx].to(dev)
            out = student(input_ids=ids, output_hidden_states=hidden_weight > 0,
                          labels=ids if label_weight > 0 else None)
        t_out = None
        if hidden_weight > 0:  # (one teacher forward serves the hidden states and, if full, the logits)
            with torch.no_grad():
                t_out = teacher(input_ids=windows[idx].to(dev), output_hidden_states=True)
        loss = loss_on(out.logits, idx, t_out.logits if t_out is not None else None)
        if hidden_weight > 0:
            t_hidden = [t.to(out.hidden_states[0].dtype) for t in t_out.hidden_states]
            loss = loss + hidden_weight * hidden_state_loss(out.hidden_states, t_hidden)
        if label_weight > 0:
            loss = loss + label_weight * out.loss.float()
        if init:
            loss = loss + anchor * sum((p - p0).float().square().sum() / n0 for p, p0, n0 in init)
        if not torch.isfinite(loss):
            raise RuntimeError(f"end-to-end distillation loss became {loss.item()} at step {step}; lower lr (now {lr})")
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        with torch.no_grad():
            for a, p in zip(averaged, params):
                a.lerp_(p.detach().float(), 1 - ema)
        curve.append(float(loss.detach()))
    for p in params:
        p.requires_grad_(False)
    with torch.no_grad():
        for a, p in zip(averaged, params):
            p.copy_(a.to(p.dtype))
    for p in frozen:
        p.requires_grad_(True)
    after = full_loss()
    student.train(was_training)
    return {"loss_before": before, "loss_after": after, "steps": steps, "lr": lr, "batch": batch, "k": k,
            "train": train, "tail": tail, "hidden_weight": hidden_weight, "anchor": anchor, "ema": ema, "autocast": autocast,
            "label_weight": label_weight, "sampling": sampling, "windows_seen": len(seen),
            "windows": int(windows.shape[0]), "window_length": int(windows.shape[1]),
            "teacher_topk_mass": 1.0 if full else targets["mass"], "train_curve": curve}
