#!/usr/bin/env python3
"""Compare two runs' records for identical behaviour: every plan and every measured number equal, timings and
paths ignored. Used to show that a refactor changed no result: run the same command on two commits, then

    python scripts/compare_runs.py BEFORE AFTER

where each is a `headalloc compress` output folder (its headalloc.json), a `headalloc reproduce` results folder
(every <experiment>/result.json in it) or one JSON file. Exit 0 when identical, 1 with each difference listed."""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path

# what depends on the clock, the machine or where a run was written, not on what was computed: a key is ignored
# when one of its words (split at "_") is one of these, e.g. "seconds_plan", "out_dir"; "candidate" is not "date"
IGNORED = {"seconds", "time", "elapsed", "command", "path", "dir", "created", "finished", "machine", "commit",
           "python", "version", "platform", "speed", "date", "host", "tok"}


def ignored(key: str) -> bool:
    return bool(IGNORED & set(key.lower().split("_")))


def _load(path: Path):
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise SystemExit(f"compare_runs: {path} is not a readable JSON record ({e}); give the run's own output") from None


def records(path: Path) -> dict[str, object]:
    if path.is_file():
        return {path.name: _load(path)}
    if (path / "headalloc.json").is_file():
        return {"headalloc.json": _load(path / "headalloc.json")}
    found = {str(p.relative_to(path)): _load(p) for p in sorted(path.rglob("result.json"))}
    if not found:
        raise SystemExit(f"compare_runs: {path} holds no headalloc.json or result.json; give a compress output "
                         f"folder, a reproduce results folder or a JSON file")
    return found


def diff(a, b, where: str, out: list[str]) -> None:
    if isinstance(a, dict) and isinstance(b, dict):
        for k in sorted(set(a) | set(b), key=str):
            if ignored(str(k)):
                continue
            if k not in a or k not in b:
                out.append(f"{where}.{k}: only in {'after' if k in b else 'before'}")
            else:
                diff(a[k], b[k], f"{where}.{k}", out)
    elif isinstance(a, list) and isinstance(b, list):
        if len(a) != len(b):
            out.append(f"{where}: {len(a)} items before, {len(b)} after")
        for i, (x, y) in enumerate(zip(a, b)):
            diff(x, y, f"{where}[{i}]", out)
    elif isinstance(a, float) and isinstance(b, float) and math.isnan(a) and math.isnan(b):
        return
    elif a != b:
        out.append(f"{where}: {a!r} before, {b!r} after")


def main(argv: list[str]) -> int:
    if len(argv) != 2:
        print(__doc__, file=sys.stderr)
        return 2
    before, after = (records(Path(p)) for p in argv)
    out: list[str] = []
    for name in sorted(set(before) | set(after)):
        if name not in before or name not in after:
            out.append(f"{name}: only in {'after' if name in after else 'before'}")
            continue
        diff(before[name], after[name], name, out)
    for line in out:
        print(line)
    print(f"{len(before)} record(s) compared: " + ("identical" if not out else f"{len(out)} difference(s)"))
    return 1 if out else 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
