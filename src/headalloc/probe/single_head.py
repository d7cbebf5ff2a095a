"""One attention head as explicit matrices, its reduced-dimension student, and their errors.

Teacher heads come from LLaMA-family models (rotary, grouped-query: the head's own query rows and
its key-value head's rows) or BERT/GPT-2-style models (no rotary; biases kept). Students:
- plain heads: truncated SVD of the query-key form [W_Q b_Q]^T [W_K b_K] (biases folded in by
  augmenting x with a constant 1) and of the value-output form W_O [W_V b_V], optionally weighted
  by C^{1/2} with C = E[x x^T] of the layer's input on calibration text ("data-aware");
- rotary heads: the data-aware subset of rotary pairs for query-key, SVD for value-output.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import torch

from headalloc.compression.reduce.linalg import _sym_sqrt
from transformers.models.llama.modeling_llama import rotate_half


@dataclass
class HeadWeights:
    """q = Wq x + bq, k = Wk x + bk, v = Wv x + bv, out = Wo (sum_t p_t v_t); logits = scale q.k."""

    Wq: torch.Tensor
    Wk: torch.Tensor
    Wv: torch.Tensor
    Wo: torch.Tensor
    bq: torch.Tensor | None
    bk: torch.Tensor | None
    bv: torch.Tensor | None
    scale: float
    rope_index: torch.Tensor | None = None  # teacher coordinates kept (rotary heads), first then second halves

    @property
    def qk_dim(self) -> int:
        return self.Wq.shape[0]

    @property
    def v_dim(self) -> int:
        return self.Wv.shape[0]

    def params(self):
        return [t for t in (self.Wq, self.Wk, self.Wv, self.Wo, self.bq, self.bk, self.bv) if t is not None]


def _lin(W, b, X):
    y = X @ W.T
    return y if b is None else y + b


def head_forward(hw: HeadWeights, X: torch.Tensor, causal: bool, cos: torch.Tensor | None = None,
                 sin: torch.Tensor | None = None, key_mask: torch.Tensor | None = None):
    """(logits, probs, out) of one head on layer inputs X (B, T, hidden); cos/sin: full-width rotary tables."""
    q, k, v = _lin(hw.Wq, hw.bq, X), _lin(hw.Wk, hw.bk, X), _lin(hw.Wv, hw.bv, X)
    if hw.rope_index is not None:
        c, s = cos[..., hw.rope_index], sin[..., hw.rope_index]
        q, k = q * c + rotate_half(q) * s, k * c + rotate_half(k) * s
    logits = hw.scale * q @ k.transpose(-1, -2)
    T = X.shape[1]
    if causal:
        logits = logits.masked_fill(~torch.ones(T, T, dtype=torch.bool, device=X.device).tril(), float("-inf"))
    if key_mask is not None:
        logits = logits.masked_fill(~key_mask[:, None, :].bool(), float("-inf"))
    probs = torch.softmax(logits, dim=-1)
    return logits, probs, (probs @ v) @ hw.Wo.T


def teacher_head_llama(model, layer: int, head: int) -> HeadWeights:
    cfg = model.config
    hd = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
    rep = cfg.num_attention_heads // cfg.num_key_value_heads
    a = model.model.layers[layer].self_attn
    g = head // rep
    sl, kv = slice(head * hd, (head + 1) * hd), slice(g * hd, (g + 1) * hd)
    d = lambda t: t.detach().double().clone()  # noqa: E731
    return HeadWeights(d(a.q_proj.weight[sl]), d(a.k_proj.weight[kv]), d(a.v_proj.weight[kv]), d(a.o_proj.weight[:, sl]),
                       None, None, None, a.scaling, torch.arange(hd))


def teacher_head_bert(model, layer: int, head: int) -> HeadWeights:
    att = model.encoder.layer[layer].attention
    s, o = att.self, att.output.dense
    hd = s.attention_head_size
    sl = slice(head * hd, (head + 1) * hd)
    d = lambda t: t.detach().double().clone()  # noqa: E731
    return HeadWeights(d(s.query.weight[sl]), d(s.key.weight[sl]), d(s.value.weight[sl]), d(o.weight[:, sl]),
                       d(s.query.bias[sl]), d(s.key.bias[sl]), d(s.value.bias[sl]), hd ** -0.5, None)


def _augment(W, b):
    return torch.cat([W, (b if b is not None else W.new_zeros(W.shape[0]))[:, None]], dim=1)


def reduce_head(hw: HeadWeights, dim: int, C: torch.Tensor | None = None, mean: torch.Tensor | None = None) -> HeadWeights:
    """Student of width `dim` for query-key and value. C (and the input mean, for biases) make it data-aware."""
    if not 1 <= dim <= hw.qk_dim:
        raise ValueError(f"student dimension must be in [1, {hw.qk_dim}]; got {dim}")
    hidden = hw.Wq.shape[1]
    if C is not None:
        # second moment of the augmented input [x; 1]
        m = mean if mean is not None else torch.zeros(hidden, dtype=torch.float64)
        Ct = torch.zeros(hidden + 1, hidden + 1, dtype=torch.float64)
        Ct[:hidden, :hidden], Ct[:hidden, -1], Ct[-1, :hidden], Ct[-1, -1] = C, m, m, 1.0
        Cs, Cis = _sym_sqrt(Ct)
    # value-output: SVD of Wo [Wv bv]
    B = hw.Wo @ _augment(hw.Wv, hw.bv)
    U, S, Vh = torch.linalg.svd(B @ Cs if C is not None else B, full_matrices=False)
    Vn = Vh[:dim] @ Cis if C is not None else Vh[:dim]
    Wv, bv = Vn[:, :hidden], (Vn[:, -1] if hw.bv is not None else None)
    Wo = U[:, :dim] * S[:dim]
    if hw.rope_index is not None:
        if dim % 2:
            raise ValueError(f"a rotary head keeps whole frequency pairs: dimension must be even; got {dim}")
        half = hw.qk_dim // 2
        X2 = C if C is not None else torch.eye(hidden, dtype=torch.float64)
        eq = torch.einsum("di,ij,dj->d", hw.Wq, X2, hw.Wq)
        ek = torch.einsum("di,ij,dj->d", hw.Wk, X2, hw.Wk)
        imp = (eq[:half] + eq[half:]) * (ek[:half] + ek[half:])
        pairs = torch.topk(imp, dim // 2).indices.sort().values
        idx = torch.cat([pairs, pairs + half])
        return replace(hw, Wq=hw.Wq[idx].clone(), Wk=hw.Wk[idx].clone(), Wv=Wv, bv=bv, Wo=Wo,
                       rope_index=hw.rope_index[idx].clone())
    A = _augment(hw.Wq, hw.bq).T @ _augment(hw.Wk, hw.bk)  # (hidden+1, hidden+1), rank <= head dim
    U, S, Vh = torch.linalg.svd(Cs @ A @ Cs if C is not None else A)
    P = U[:, :dim] * S[:dim].sqrt()
    Q = Vh[:dim].T * S[:dim].sqrt()
    if C is not None:
        P, Q = Cis @ P, Cis @ Q
    Wq_a, Wk_a = P.T, Q.T  # (dim, hidden+1): q'.k' = x~^T P Q^T x~ ~= x~^T A x~
    return replace(hw, Wq=Wq_a[:, :hidden], bq=Wq_a[:, -1], Wk=Wk_a[:, :hidden], bk=Wk_a[:, -1], Wv=Wv, bv=bv, Wo=Wo)


@torch.no_grad()
def head_errors(teacher: HeadWeights, student: HeadWeights, X: torch.Tensor, causal: bool, rows,
                cos=None, sin=None) -> dict:
    """Per query row r (context r+1 for causal heads): attention error (max and L1) and relative output error."""
    _, pt, ot = head_forward(teacher, X, causal, cos, sin)
    _, ps, os_ = head_forward(student, X, causal, cos, sin)
    out = {}
    for r in rows:
        dp = (ps[:, r] - pt[:, r]).abs()
        out[str(int(r))] = {"score_max": dp.amax(-1).mean().item(), "score_l1": dp.sum(-1).mean().item(),
                       "output_rel": ((os_[:, r] - ot[:, r]).norm(dim=-1) / ot[:, r].norm(dim=-1).clamp_min(1e-12))
                       .mean().item()}
    return out


def finetune_head(teacher: HeadWeights, student: HeadWeights, X: torch.Tensor, causal: bool, steps: int = 200,
                  lr: float = 1e-3, seed: int = 0, cos=None, sin=None) -> tuple[HeadWeights, list[float]]:
    """Fit the student's matrices to the teacher head's output on calibration inputs X (Adam, MSE)."""
    torch.manual_seed(seed)
    with torch.no_grad():
        target = head_forward(teacher, X, causal, cos, sin)[2]
        norm = target.square().mean()
    st = replace(student, **{k: (getattr(student, k).clone().requires_grad_(True) if getattr(student, k) is not None
                                 else None) for k in ("Wq", "Wk", "Wv", "Wo", "bq", "bk", "bv")})
    opt = torch.optim.Adam(st.params(), lr=lr)
    g = torch.Generator().manual_seed(seed)
    losses = []
    for _ in range(steps):
        i = int(torch.randint(0, X.shape[0], (1,), generator=g))
        out = head_forward(st, X[i:i + 1], causal, None if cos is None else cos[i:i + 1],
                           None if sin is None else sin[i:i + 1])[2]
        loss = (out - target[i:i + 1]).square().mean() / norm
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    return replace(st, **{k: (getattr(st, k).detach() if getattr(st, k) is not None else None)
                          for k in ("Wq", "Wk", "Wv", "Wo", "bq", "bk", "bv")}), losses
