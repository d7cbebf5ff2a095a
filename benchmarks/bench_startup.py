"""Benchmark: start-up time of `import headalloc` and of `headalloc compress --help`, each in a fresh process, for
this checkout and, with --against, another checkout's source tree (e.g. a worktree of an older commit: `git
worktree add /tmp/old COMMIT`), interleaved so the machine's load falls on both alike; prints the median and the
best of each and their ratio.

    python benchmarks/bench_startup.py [--repeats 7] [--against /tmp/old/src]
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

SRC = Path(__file__).resolve().parents[1] / "src"
JOBS = {"import headalloc": "import headalloc",
        "headalloc compress --help": "from headalloc.cli import main; main(['compress', '--help'])"}


def once(src: Path, code: str) -> float:
    env = {**os.environ, "PYTHONPATH": str(src)}
    t = time.perf_counter()
    subprocess.run([sys.executable, "-c", code], env=env, check=True, stdout=subprocess.DEVNULL,
                   stderr=subprocess.DEVNULL)
    return time.perf_counter() - t


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeats", type=int, default=7)
    ap.add_argument("--against", type=Path, default=None, help="another checkout's src folder")
    a = ap.parse_args()
    if a.repeats < 1:
        raise SystemExit(f"--repeats must be >= 1; got {a.repeats}")
    if a.against is not None and not (a.against / "headalloc" / "__init__.py").is_file():
        raise SystemExit(f"--against {a.against}: no headalloc package there; give a checkout's src folder")
    trees = {"this": SRC, **({"against": a.against} if a.against else {})}
    times = {(t, j): [] for t in trees for j in JOBS}
    for _ in range(a.repeats):
        for j, code in JOBS.items():
            for t, src in trees.items():
                times[(t, j)].append(once(src, code))
    for j in JOBS:
        line = []
        for t in trees:
            v = times[(t, j)]
            line.append(f"{t}: median {statistics.median(v):.2f} s, best {min(v):.2f} s")
        ratio = (f"; this / against: median {statistics.median(times[('this', j)]) / statistics.median(times[('against', j)]):.3f}x"
                 if a.against else "")
        print(f"{j:28s} " + "; ".join(line) + ratio)
    print(f"({a.repeats} runs each, interleaved; {os.cpu_count()} CPUs)")


if __name__ == "__main__":
    from headalloc.reports.ledger import recorded

    with recorded("benchmark", "bench_startup"):
        main()
