"""A small sequence model built from grouped-head attention layers.

Reads top to bottom in the order data flows: embed (linear, per-token MLP, or token table) ->
positions -> [optional classification token] -> L blocks (attention, optional residual, LayerNorm
and FFN) -> readout (every position, or the classification token). It expresses both papers'
synthetic setups exactly:
- 2510.03784 4-gram: linear embedding, rotary positions, one causal layer of M head groups with a
  residual, linear readout at every position;
- 2510.06662 D-retrieval: per-token ReLU MLP 4 -> N -> 8h, a trainable classification token, no
  positions, one layer of h heads of dimension 8, no residual / LayerNorm, GELU MLP readout at the
  classification token.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from torch import nn

from headalloc.models.attention import (GroupedAttention, as_groups, attention_flops_per_token, attention_params,
                                        sinusoidal_table)

POSITIONS = ("none", "learned", "sinusoidal", "rotary")


@dataclass
class SeqModelConfig:
    """Architecture of a SeqModel. `layers[i]` is layer i's allocation: [(n_heads, qk_dim, v_dim), ...]."""

    d_model: int
    layers: list
    input_dim: int | None = None  # continuous inputs of this width ...
    vocab_size: int | None = None  # ... or token ids
    output_dim: int = 1
    max_len: int = 1024
    positions: str = "none"
    causal: bool = True
    residual: bool = True
    layernorm: bool = False
    ffn_hidden: int = 0  # 0 = no FFN
    input_mlp_hidden: int = 0  # 0 = linear embedding; >0 = per-token ReLU MLP input -> N -> d_model
    readout_hidden: int = 0  # 0 = linear readout; >0 = GELU MLP d_model -> N -> output
    cls_token: bool = False  # append a trainable token and read out only there
    tie_embeddings: bool = False
    bias: bool = True
    rel_bias: str | None = None  # "linear" / "log": a learnable per-head relative-position score in every layer
    dot: bool = True  # False: heads score keys by position alone (needs rel_bias)

    def __post_init__(self):
        if (self.input_dim is None) == (self.vocab_size is None):
            raise ValueError("give exactly one of input_dim (continuous inputs) and vocab_size (token ids)")
        if self.positions not in POSITIONS:
            raise ValueError(f"positions must be one of {POSITIONS}; got {self.positions!r}")
        if not self.layers:
            raise ValueError("a model needs at least one attention layer")
        self.layers = [[list(asdict(g).values()) for g in as_groups(layer)] for layer in self.layers]

    def to_dict(self) -> dict:
        return asdict(self)


class Block(nn.Module):
    def __init__(self, cfg: SeqModelConfig, groups):
        super().__init__()
        self.cfg = cfg
        self.norm1 = nn.LayerNorm(cfg.d_model) if cfg.layernorm else nn.Identity()
        self.attn = GroupedAttention(cfg.d_model, groups, causal=cfg.causal and not cfg.cls_token,
                                     rotary=cfg.positions == "rotary", bias=cfg.bias, rel_bias=cfg.rel_bias,
                                     dot=cfg.dot)
        self.ffn = None
        if cfg.ffn_hidden:
            self.norm2 = nn.LayerNorm(cfg.d_model) if cfg.layernorm else nn.Identity()
            self.ffn = nn.Sequential(nn.Linear(cfg.d_model, cfg.ffn_hidden), nn.GELU(),
                                     nn.Linear(cfg.ffn_hidden, cfg.d_model))

    def forward(self, x: torch.Tensor, key_padding_mask=None, last_only: bool = False) -> torch.Tensor:
        a = self.attn(self.norm1(x), key_padding_mask, last_only=last_only)
        if last_only:
            x = x[:, -1:]
        x = x + a if self.cfg.residual else a
        if self.ffn is not None:
            f = self.ffn(self.norm2(x))
            x = x + f if self.cfg.residual else f
        return x


class SeqModel(nn.Module):
    def __init__(self, cfg: SeqModelConfig):
        super().__init__()
        self.cfg = cfg
        d = cfg.d_model
        if cfg.vocab_size is not None:
            self.embed = nn.Embedding(cfg.vocab_size, d)
            nn.init.normal_(self.embed.weight, std=0.02)  # GPT-style: keeps tied logits small at init
        elif cfg.input_mlp_hidden:
            self.embed = nn.Sequential(nn.Linear(cfg.input_dim, cfg.input_mlp_hidden), nn.ReLU(),
                                       nn.Linear(cfg.input_mlp_hidden, d))
        else:
            self.embed = nn.Linear(cfg.input_dim, d)
        if cfg.positions == "learned":
            self.pos = nn.Parameter(torch.randn(cfg.max_len, d) * 0.02)
        elif cfg.positions == "sinusoidal":
            self.register_buffer("pos", sinusoidal_table(cfg.max_len, d), persistent=False)
        else:
            self.pos = None
        self.cls = nn.Parameter(torch.randn(d) * 0.02) if cfg.cls_token else None
        self.blocks = nn.ModuleList(Block(cfg, groups) for groups in cfg.layers)
        self.norm_f = nn.LayerNorm(d) if cfg.layernorm else nn.Identity()
        if cfg.readout_hidden:
            self.readout = nn.Sequential(nn.Linear(d, cfg.readout_hidden), nn.GELU(),
                                         nn.Linear(cfg.readout_hidden, cfg.output_dim))
        else:
            self.readout = nn.Linear(d, cfg.output_dim, bias=cfg.bias)
            if cfg.tie_embeddings and cfg.vocab_size is not None:
                self.readout.weight = self.embed.weight

    def forward(self, x: torch.Tensor, key_padding_mask: torch.Tensor | None = None) -> torch.Tensor:
        """(B, T[, input_dim]) -> (B, T, output_dim), or (B, output_dim) with a classification token."""
        T = x.shape[1]
        if T > self.cfg.max_len:
            raise ValueError(f"sequence length {T} exceeds max_len={self.cfg.max_len}; build the model with a "
                             f"larger max_len")
        h = self.embed(x)
        if self.pos is not None:
            h = h + self.pos[:T]
        if self.cls is not None:
            h = torch.cat([h, self.cls.expand(h.shape[0], 1, -1)], dim=1)
            if key_padding_mask is not None:
                key_padding_mask = torch.cat([key_padding_mask, key_padding_mask.new_ones(h.shape[0], 1)], 1)
        last = len(self.blocks) - 1
        for i, block in enumerate(self.blocks):
            # with a classification token only its row of the last layer is read: compute that row alone
            only = (i == last and self.cls is not None and block.attn.score_hook is None
                    and not block.attn.rotary)
            h = block(h, key_padding_mask, last_only=only)
        h = self.norm_f(h)
        if self.cls is not None:
            return self.readout(h[:, -1])
        return self.readout(h)

    # ------------------------------------------------------------------ accounting
    def attention_params(self) -> int:
        return sum(attention_params(self.cfg.d_model, g, self.cfg.bias) for g in self.cfg.layers)

    def attention_flops_per_token(self, context: int) -> float:
        return sum(attention_flops_per_token(self.cfg.d_model, g, context, self.cfg.causal) for g in self.cfg.layers)

    def n_params(self) -> int:
        return sum(p.numel() for p in self.parameters())


# ---------------------------------------------------------------------------- checkpoints
CHECKPOINT_WEIGHTS, CHECKPOINT_CONFIG = "model.safetensors", "config.json"


def save_seqmodel(model: SeqModel, path: str | Path, extra: dict | None = None) -> Path:
    """Save weights (safetensors; tied weights stored once) and config to folder `path`, atomically:
    the folder appears complete or not at all."""
    from safetensors.torch import save_model

    from headalloc.io import atomic_directory, atomic_write_json

    with atomic_directory(path) as tmp:
        save_model(model, str(tmp / CHECKPOINT_WEIGHTS))
        atomic_write_json(tmp / CHECKPOINT_CONFIG, {"seqmodel": model.cfg.to_dict(), **(extra or {})})
    return Path(path)


def load_seqmodel(path: str | Path) -> tuple[SeqModel, dict]:
    """Load a folder written by `save_seqmodel`; returns (model, extra metadata). Never unpickles."""
    import json

    from safetensors import SafetensorError
    from safetensors.torch import load_model

    path = Path(path)
    cfg_file, w_file = path / CHECKPOINT_CONFIG, path / CHECKPOINT_WEIGHTS
    if not cfg_file.is_file() or not w_file.is_file():
        raise FileNotFoundError(f"{path} is not a SeqModel checkpoint: expected {CHECKPOINT_CONFIG} and "
                                f"{CHECKPOINT_WEIGHTS} inside (write one with save_seqmodel)")
    try:
        meta = json.loads(cfg_file.read_text())
        model = SeqModel(SeqModelConfig(**meta.pop("seqmodel")))
    except (json.JSONDecodeError, KeyError, TypeError) as e:
        raise ValueError(f"corrupt SeqModel config {cfg_file}: {e}") from e
    try:
        load_model(model, str(w_file))
    except (SafetensorError, RuntimeError) as e:
        raise ValueError(f"corrupt or mismatched SeqModel weights {w_file}: {e}") from e
    return model, meta
