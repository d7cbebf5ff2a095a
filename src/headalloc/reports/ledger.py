"""The results ledger: one JSON line per benchmark, study or reproduce run, appended automatically, so every number
in the docs can be traced to the commit, command, settings and machine it was measured with.

Where rows go: `$HEADALLOC_LEDGER` (a file; "off" writes none), else `docs/results/ledger.jsonl` of the checkout
headalloc runs from (an installed copy outside a checkout writes none). Rows are only ever appended; `rows()` reads
them back and `scripts/results.py` lists and searches them.
"""

from __future__ import annotations

import contextlib
import json
import os
import platform
import shlex
import subprocess
import sys
import time
import uuid
from pathlib import Path

_REPO = Path(__file__).resolve().parents[3]  # src/headalloc/reports/ledger.py -> the checkout's root
DEFAULT = _REPO / "docs" / "results" / "ledger.jsonl"


def path() -> Path | None:
    """Where rows are appended now, or None when nowhere."""
    env = os.environ.get("HEADALLOC_LEDGER")
    if env is not None:
        return None if env.strip().lower() in ("", "off", "0", "none") else Path(env).expanduser()
    return DEFAULT if DEFAULT.parent.is_dir() and (_REPO / ".git").exists() else None


def commit() -> dict:
    """The checkout's commit and whether its tracked files differ from it (None outside a git checkout)."""
    def git(*args):
        return subprocess.run(["git", "-C", str(_REPO), *args], capture_output=True, text=True, timeout=30)

    try:
        head = git("rev-parse", "HEAD")
        if head.returncode:
            return {"commit": None, "dirty": None}
        # (the ledger's own rows do not make a checkout differ from its commit)
        dirty = git("status", "--porcelain", "--untracked-files=no", "--", ".",
                    f":!{DEFAULT.relative_to(_REPO).as_posix()}")
        return {"commit": head.stdout.strip(), "dirty": bool(dirty.stdout.strip())}
    except (OSError, subprocess.SubprocessError):
        return {"commit": None, "dirty": None}


def machine() -> dict:
    """What the numbers were measured on."""
    out = {"platform": platform.platform(), "python": platform.python_version(), "cpus": os.cpu_count(),
           "processor": platform.processor() or platform.machine()}
    try:
        import torch

        out.update(torch=torch.__version__, threads=torch.get_num_threads(),
                   cuda=torch.cuda.get_device_name(0) if torch.cuda.is_available() else None)
    except ImportError:  # pragma: no cover
        pass
    return out


def append(kind: str, name: str, metrics: dict, settings: dict | None = None, command: str | None = None,
           log=None) -> dict | None:
    """Append one row (kind: "benchmark", "study", "reproduce"; name: the script or experiment) and return it; None
    when the ledger is off. A row that cannot be written is reported, never fatal: the run's own output stands."""
    where = path()
    if where is None:
        return None
    row = {"id": uuid.uuid4().hex[:12], "date": time.strftime("%Y-%m-%d %H:%M:%S"), "kind": kind, "name": name,
           **commit(), "command": command if command is not None else shlex.join([Path(sys.argv[0]).name,
                                                                                   *sys.argv[1:]]),
           "settings": settings or {}, "machine": machine(), "metrics": metrics}
    try:
        where.parent.mkdir(parents=True, exist_ok=True)
        line = json.dumps(_finite(row), default=str, allow_nan=False) + "\n"
        with open(where, "a", encoding="utf-8") as f:  # one write of one line: rows never interleave
            f.write(line)
    except (OSError, ValueError) as e:
        print(f"note: results ledger {where} not written: {e}", file=sys.stderr)
        return None
    (log or (lambda s: print(s, file=sys.stderr)))(f"ledger: row {row['id']} appended to {where}")
    return row


class _Tee:
    def __init__(self, stream):
        self.stream, self.parts = stream, []

    def write(self, text):
        self.parts.append(text)
        return self.stream.write(text)

    def flush(self):
        self.stream.flush()

    def __getattr__(self, name):
        return getattr(self.stream, name)


@contextlib.contextmanager
def recorded(kind: str, name: str, settings: dict | None = None):
    """Run a script's body and, if it finishes, append one row holding what it printed (its results, as read by a
    person) with the commit, command and machine. For scripts whose results are printed tables."""
    tee = _Tee(sys.stdout)
    sys.stdout = tee
    try:
        yield
    finally:
        sys.stdout = tee.stream
    append(kind, name, {"output": "".join(tee.parts)}, settings=settings)


def _finite(x):
    """NaN and infinities as None (JSON has neither)."""
    if isinstance(x, float):
        return x if x == x and x not in (float("inf"), float("-inf")) else None
    if isinstance(x, dict):
        return {str(k): _finite(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_finite(v) for v in x]
    return x


def rows(where: str | os.PathLike | None = None) -> list[dict]:
    """Every row of the ledger (the default one, or `where`), oldest first."""
    p = Path(where) if where is not None else (path() or DEFAULT)
    if not p.is_file():
        return []
    out = []
    for i, line in enumerate(p.read_text(encoding="utf-8").splitlines(), 1):
        if line.strip():
            try:
                out.append(json.loads(line))
            except ValueError as e:
                raise ValueError(f"{p}: line {i} is not a JSON row ({e}); fix or remove that line") from None
    return out
