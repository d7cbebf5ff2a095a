#!/usr/bin/env python3
"""The results ledger (docs/results/ledger.jsonl): list and search its rows, or index result logs into it.

    python scripts/results.py list [--kind benchmark] [--name bench_compress] [--grep TEXT] [--last N]
    python scripts/results.py show ID           # one row, whole
    python scripts/results.py index             # add a "log" row for every file in docs/results/ not yet indexed

A "log" row stands for a result file written by hand before the ledger existed: its file, the commit, session and
command its header names (when it names them), and its first lines.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))

from headalloc.reports import ledger  # noqa: E402

RESULTS = ROOT / "docs" / "results"


def header(path: Path) -> dict:
    """What a hand-written log says about itself in its first line (a comment) or file name."""
    try:
        first = path.read_text(encoding="utf-8", errors="replace").splitlines()[:3]
    except OSError:
        first = []
    head = first[0] if first else ""
    commit = re.search(r"\b(?:commit|clone of|code of)\s+([0-9a-f]{7,40})\b", head)
    session = re.search(r"\bsessions?\s+(\d+)", head) or re.search(r"_s(\d+)\b", path.stem)
    command = re.search(r"(?:cmd:|^#)\s*((?:OMP_NUM_THREADS=\d+\s+)?(?:\.venv/bin/)?(?:python|headalloc)\s[^()]*?)"
                        r"(?:\s{2,}|\s\(|$)", head)
    return {"file": str(path.relative_to(ROOT)), "commit": commit.group(1) if commit else None,
            "session": int(session.group(1)) if session else None,
            "command": command.group(1).strip() if command else None, "head": first}


def cmd_index(a) -> int:
    where = ledger.path() or ledger.DEFAULT
    known = {r.get("metrics", {}).get("file") for r in ledger.rows(where) if r.get("kind") == "log"}
    added = 0
    for p in sorted(RESULTS.iterdir()):
        if p.name == where.name or p.is_dir() or str(p.relative_to(ROOT)) in known:
            continue
        h = header(p)
        row = {"id": "log-" + re.sub(r"[^a-z0-9]+", "-", p.name.lower()), "date": None, "kind": "log",
               "name": p.stem, "commit": h["commit"], "dirty": None, "command": h["command"], "settings": {},
               "machine": {}, "metrics": {"file": h["file"], "session": h["session"], "head": h["head"]}}
        with open(where, "a", encoding="utf-8") as f:
            f.write(json.dumps(row) + "\n")
        added += 1
    print(f"{added} log(s) indexed into {where}")
    return 0


def cmd_list(a) -> int:
    rows = ledger.rows(a.ledger)
    if a.kind:
        rows = [r for r in rows if r.get("kind") == a.kind]
    if a.name:
        rows = [r for r in rows if a.name in (r.get("name") or "")]
    if a.grep:
        rows = [r for r in rows if a.grep.lower() in json.dumps(r).lower()]
    for r in rows[-a.last:] if a.last else rows:
        what = r["metrics"].get("file") if r.get("kind") == "log" else (r.get("command") or "")
        print(f"{r['id']:14s} {r.get('kind', ''):10s} {(r.get('commit') or '?')[:9]:9s} "
              f"{r.get('date') or '':19s} {r.get('name', ''):28s} {what}")
    print(f"{len(rows)} row(s)", file=sys.stderr)
    return 0


def cmd_show(a) -> int:
    for r in ledger.rows(a.ledger):
        if r["id"] == a.id:
            print(json.dumps(r, indent=1))
            return 0
    print(f"no row {a.id!r} in the ledger; `python scripts/results.py list` shows the ids", file=sys.stderr)
    return 2


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--ledger", default=None, help="another ledger file (default: the repository's)")
    sub = ap.add_subparsers(dest="cmd", required=True)
    p = sub.add_parser("list")
    p.add_argument("--kind", choices=["benchmark", "study", "reproduce", "log"])
    p.add_argument("--name")
    p.add_argument("--grep")
    p.add_argument("--last", type=int, default=0)
    p.set_defaults(fn=cmd_list)
    p = sub.add_parser("show")
    p.add_argument("id")
    p.set_defaults(fn=cmd_show)
    sub.add_parser("index").set_defaults(fn=cmd_index)
    a = ap.parse_args(argv)
    try:
        return a.fn(a)
    except ValueError as e:  # a damaged ledger line: named, with the fix
        print(f"results: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    raise SystemExit(main())
