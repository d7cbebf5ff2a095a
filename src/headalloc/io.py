"""Atomic writes: a result file is either absent or complete, never half-written."""

from __future__ import annotations

import contextlib
import json
import os
import tempfile
from pathlib import Path
from typing import Any


def cache_write_error(path: Path, e: OSError) -> ValueError:
    return ValueError(f"cannot write the cache file {path} ({e.strerror or e}); set HEADALLOC_CACHE to a writable "
                      f"folder")


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> Path:
    """Write bytes to `path` through a temporary file in the same folder and an atomic rename."""
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    except OSError as e:
        raise OSError(e.errno, f"cannot write {path}: {e.strerror or e}; choose a writable location") from None
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    return path


def atomic_write_text(path: str | os.PathLike, text: str) -> Path:
    return atomic_write_bytes(path, text.encode("utf-8"))


def atomic_write_json(path: str | os.PathLike, obj: Any) -> Path:
    return atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=False, default=_json_default) + "\n")


def _json_default(o: Any) -> Any:
    import numpy as np

    if isinstance(o, (np.integer,)):
        return int(o)
    if isinstance(o, (np.floating,)):
        return float(o)
    if isinstance(o, np.ndarray):
        return o.tolist()
    if hasattr(o, "to_dict"):
        return o.to_dict()
    raise TypeError(f"cannot serialise {type(o).__name__} to JSON")


DIGESTS = "headalloc-digests.json"
_VERIFIED: set = set()  # (path, size, mtime) already hashed in this process


def _sha256(path: Path) -> str:
    import hashlib

    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 22), b""):
            h.update(chunk)
    return h.hexdigest()


def write_digests(folder: str | os.PathLike) -> None:
    """Record size and SHA-256 of every file in a cache folder that headalloc wrote."""
    folder = Path(folder)
    d = {p.name: {"size": p.stat().st_size, "sha256": _sha256(p)} for p in sorted(folder.iterdir())
         if p.is_file() and p.name != DIGESTS}
    (folder / DIGESTS).write_text(json.dumps(d, indent=1))


def verify_digests(folder: str | os.PathLike) -> str | None:
    """None if every recorded file of a cache folder is intact, else what is wrong. Sizes are checked
    every time, contents hashed once per process."""
    folder = Path(folder)
    rec = folder / DIGESTS
    if not rec.exists():
        return f"no {DIGESTS} (written by an older headalloc, or interrupted)"
    try:
        d = json.loads(rec.read_text())
    except json.JSONDecodeError:
        return f"{DIGESTS} is not valid JSON"
    for name, want in d.items():
        p = folder / name
        if not p.exists():
            return f"{name} is missing"
        st = p.stat()
        if st.st_size != want["size"]:
            return f"{name} has {st.st_size} bytes, {want['size']} were written"
        key = (str(p), st.st_size, st.st_mtime_ns)
        if key not in _VERIFIED:
            if _sha256(p) != want["sha256"]:
                return f"{name} does not match the checksum recorded when it was written"
            _VERIFIED.add(key)
    return None


def read_json(path: str | os.PathLike) -> Any:
    path = Path(path)
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"{path} is not valid JSON ({e}); delete it and re-run to recompute") from e


def save_figure(fig, path: str | os.PathLike, dpi: int = 120) -> Path:
    """Save a matplotlib figure atomically as PNG and close it."""
    import io

    import matplotlib.pyplot as plt

    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=dpi, bbox_inches="tight")
    plt.close(fig)
    return atomic_write_bytes(path, buf.getvalue())


TMP_MARK = "headalloc-tmp"


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def clean_stale_temporaries(folder: str | os.PathLike) -> list[Path]:
    """Remove temporary folders that an earlier, killed headalloc process left in `folder` (named
    `.<target>.headalloc-tmp-<pid>-...`; only those whose process is gone)."""
    import re
    import shutil

    removed = []
    folder = Path(folder)
    if not folder.is_dir():
        return removed
    for p in folder.iterdir():
        m = re.match(rf"^\..*\.{TMP_MARK}-(\d+)-", p.name)
        if m and not _pid_alive(int(m.group(1))):
            if p.is_dir():
                shutil.rmtree(p, ignore_errors=True)
            else:
                p.unlink(missing_ok=True)
            removed.append(p)
    return removed


@contextlib.contextmanager
def atomic_file(path: str | os.PathLike, replace: bool = False):
    """Yield a temporary file path next to `path` for a writer that needs a path (large outputs);
    on success it takes the place of `path` by a rename, on error it is removed. An existing `path`
    is replaced only if `replace`. Temporaries of killed runs are removed by the next write."""
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        clean_stale_temporaries(path.parent)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.{TMP_MARK}-{os.getpid()}-")
        os.close(fd)
    except OSError as e:
        raise OSError(e.errno, f"cannot write {path}: {e.strerror or e}; choose a writable location") from None
    if path.exists() and not replace:
        os.unlink(tmp)
        raise FileExistsError(f"{path} exists; refusing to replace it")
    try:
        yield Path(tmp)
        mask = os.umask(0)
        os.umask(mask)
        os.chmod(tmp, 0o666 & ~mask)  # a normal file's permissions (the temporary was private)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


@contextlib.contextmanager
def atomic_directory(path: str | os.PathLike, replace: bool = True):
    """Yield a temporary folder next to `path`; on success it takes the place of `path` by a rename, on
    error it is removed. The folder at `path` is complete or absent, never half-written.
    An existing `path` is replaced only if `replace` (it is moved aside first, then removed), else it
    is an error. Temporaries of killed runs are recognisable and removed by the next run."""
    import shutil

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    clean_stale_temporaries(path.parent)
    if path.exists() and not replace:
        raise FileExistsError(f"{path} exists; refusing to replace it")
    tmp = Path(tempfile.mkdtemp(dir=path.parent, prefix=f".{path.name}.{TMP_MARK}-{os.getpid()}-"))
    try:
        yield tmp
        old = None
        if path.exists():
            old = Path(tempfile.mkdtemp(dir=path.parent, prefix=f".{path.name}.{TMP_MARK}-{os.getpid()}-old-"))
            os.replace(path, old / "replaced")
        tmp.rename(path)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
