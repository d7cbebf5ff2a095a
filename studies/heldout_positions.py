"""Benchmark: where in a window a compressed model loses, on each kind of text.

Loads a saved compressed model and its original (named in the folder's headalloc.json), scores the same windows
of Wikipedia validation text and of the two held-out texts with both, and prints the perplexity ratio per
position bucket, then the mean log-loss increase on tokens that continue a bigram already seen earlier in the
window ("copyable": what in-context copying predicts) and on the rest.

    python studies/heldout_positions.py FOLDER [--windows 12] [--length 512]
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch
import torch.nn.functional as F

from headalloc.assets import load_model, token_windows


def token_nll(model, windows: torch.Tensor) -> torch.Tensor:
    """(n, T-1) next-token negative log-likelihood of each window."""
    out = []
    with torch.no_grad():
        for x in windows:
            logits = model(x[None]).logits[0, :-1].float()
            out.append(F.cross_entropy(logits, x[1:], reduction="none"))
    return torch.stack(out)


def copyable(windows: torch.Tensor) -> torch.Tensor:
    """(n, T-1) True where the target token continues a bigram that occurred earlier in its window."""
    rows = []
    for x in windows.tolist():
        seen, row = set(), []
        for a, b in zip(x[:-1], x[1:]):
            row.append((a, b) in seen)
            seen.add((a, b))
        rows.append(row)
    return torch.tensor(rows)


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("folder", type=Path, help="a model saved by `headalloc compress`")
    ap.add_argument("--windows", type=int, default=12)
    ap.add_argument("--length", type=int, default=512)
    ap.add_argument("--seed", type=int, default=0)
    a = ap.parse_args()
    meta = json.loads((a.folder / "headalloc.json").read_text())
    original, tok = load_model(meta["config"]["model"])
    student, _ = load_model(a.folder)
    edges = [0, 64, 128, 256, 384, a.length - 1]
    print(f"{a.folder} against {meta['config']['model']}; {a.windows} windows of {a.length} per text, seed {a.seed}")
    print(f"{'text':>6}  " + "  ".join(f"{f'{lo}-{hi}':>16}" for lo, hi in zip(edges, edges[1:]))
          + "  copyable: share, +nats   other: +nats")
    for kind, split, seed in (("wiki", "validation", a.seed + 1), ("alice", "all", a.seed + 3),
                              ("pydoc", "all", a.seed + 3)):
        w = token_windows(tok, kind, split, a.length, a.windows, seed=seed)
        t, s = token_nll(original, w), token_nll(student, w)
        cells = []
        for lo, hi in zip(edges, edges[1:]):
            to, so = t[:, lo:hi].mean(), s[:, lo:hi].mean()
            cells.append(f"{float(to.exp()):.1f}->{float(so.exp()):.1f} {float((so - to).exp()):.2f}x")
        c, d = copyable(w), s - t
        print(f"{kind:>6}  " + "  ".join(f"{x:>16}" for x in cells)
              + f"  {float(c.float().mean()):.2f}, {float(d[c].mean()):+.3f}   {float(d[~c].mean()):+.3f}", flush=True)


if __name__ == "__main__":
    from headalloc.reports.ledger import recorded

    with recorded("study", "heldout_positions"):
        main()
