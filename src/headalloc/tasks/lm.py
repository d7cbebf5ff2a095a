"""Language modelling on real text: a byte-level BPE trained on the training split only, and
token streams for training (random windows) and validation (fixed windows)."""

from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np
import torch

from headalloc.assets.corpus import load_corpus
from headalloc.assets.models import cache_dir

EOT = "<|endoftext|>"


def train_tokenizer(corpus: str = "wiki", vocab_size: int = 2048, path: str | Path | None = None):
    """Byte-level BPE of `vocab_size` tokens trained on the corpus' training split (cached on disk)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    texts = load_corpus(corpus).split("train")
    key = hashlib.sha1(f"{corpus}|{vocab_size}|{len(texts)}".encode()).hexdigest()[:12]
    path = Path(path) if path else cache_dir() / "tokenizers" / f"{corpus}-bpe{vocab_size}-{key}.json"
    if path.exists():
        return Tokenizer.from_file(str(path))
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=[EOT], show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(texts, trainer)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tok.save(str(tmp))
    tmp.replace(path)
    return tok


def token_stream(tok, corpus: str, split: str) -> torch.Tensor:
    """All documents of a split, tokenised and joined by <|endoftext|>."""
    eot = tok.token_to_id(EOT)
    ids: list[int] = []
    for enc in tok.encode_batch(load_corpus(corpus).split(split)):
        ids.extend(enc.ids)
        ids.append(eot)
    return torch.tensor(np.asarray(ids, dtype=np.int64))


def random_windows(stream: torch.Tensor, length: int, batch: int, g: torch.Generator) -> torch.Tensor:
    if len(stream) <= length + 1:
        raise ValueError(f"text of {len(stream)} tokens is too short for windows of {length}")
    starts = torch.randint(0, len(stream) - length - 1, (batch,), generator=g)
    return torch.stack([stream[s:s + length + 1] for s in starts.tolist()])


def fixed_windows(stream: torch.Tensor, length: int, n: int) -> torch.Tensor:
    avail = (len(stream) - 1) // length
    if avail < n:
        raise ValueError(f"validation text has {avail} windows of {length} tokens; {n} were requested")
    return torch.stack([stream[i * length: i * length + length + 1] for i in range(n)])
