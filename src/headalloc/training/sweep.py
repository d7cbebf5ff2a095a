"""Sweeps: a list of configs, run locally or on Ray, with results in a SQLite store.

One row per run, keyed by a hash of the canonical JSON of its config, written in one transaction
when the run finishes. Re-running a sweep skips finished runs; killing it midway loses only the
runs in flight. The same list of configs runs unchanged on both executors.
"""

from __future__ import annotations

import hashlib
import importlib
import json
import sqlite3
import time
from pathlib import Path
from typing import Callable, Sequence

from tqdm.auto import tqdm


def config_key(config: dict) -> str:
    """Stable identity of a run: sha1 of its canonical JSON."""
    return hashlib.sha1(json.dumps(config, sort_keys=True, separators=(",", ":")).encode()).hexdigest()


class SweepStore:
    """SQLite table runs(key, config, result, seconds, finished); safe against interruption."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        try:
            with self._connect() as c:
                c.execute("CREATE TABLE IF NOT EXISTS runs (key TEXT PRIMARY KEY, config TEXT NOT NULL, "
                          "result TEXT NOT NULL, seconds REAL, finished TEXT)")
        except sqlite3.DatabaseError as e:
            raise ValueError(f"{self.path} is not a usable sweep store ({e}); move it away and re-run") from e

    def _connect(self) -> sqlite3.Connection:
        c = sqlite3.connect(self.path, timeout=60)
        c.execute("PRAGMA journal_mode=WAL")
        return c

    def get(self, config: dict) -> dict | None:
        with self._connect() as c:
            row = c.execute("SELECT result FROM runs WHERE key = ?", (config_key(config),)).fetchone()
        return None if row is None else json.loads(row[0])

    def put(self, config: dict, result: dict, seconds: float | None = None) -> None:
        with self._connect() as c:  # one transaction: the row is there complete, or not at all
            c.execute("INSERT OR REPLACE INTO runs VALUES (?, ?, ?, ?, ?)",
                      (config_key(config), json.dumps(config, sort_keys=True), json.dumps(result),
                       seconds, time.strftime("%Y-%m-%d %H:%M:%S")))

    def finished_keys(self) -> set[str]:
        with self._connect() as c:
            return {r[0] for r in c.execute("SELECT key FROM runs")}

    def __len__(self) -> int:
        with self._connect() as c:
            return c.execute("SELECT COUNT(*) FROM runs").fetchone()[0]


def resolve_fn(path: str) -> Callable[[dict], dict]:
    """"package.module:function" -> the function (importable on any Ray worker)."""
    mod, _, name = path.partition(":")
    if not name:
        raise ValueError(f"run function must be 'module:function'; got {path!r}")
    try:
        fn = getattr(importlib.import_module(mod), name)
    except (ImportError, AttributeError) as e:
        raise ValueError(f"run function {path!r} cannot be found ({e}); give an importable 'module:function', "
                         f"e.g. headalloc.training.runs:run_synthetic") from None
    if not callable(fn):
        raise ValueError(f"run function {path!r} is not callable")
    return fn


def _run_one(fn_path: str, config: dict) -> tuple[dict, float]:
    t = time.time()
    out = resolve_fn(fn_path)(config)
    return out, time.time() - t


def run_sweep(configs: Sequence[dict], store: str | Path | SweepStore,
              fn: str = "headalloc.training.runs:run_synthetic", executor: str = "local",
              ray_address: str | None = None, progress: bool = True, desc: str = "sweep",
              workers: int = 1) -> list[dict]:
    """Run every config not yet in `store`; return all results in the order of `configs`.

    executor="local" runs in this process (workers=1) or in `workers` processes; "ray" submits one
    task per run to a local Ray instance or the cluster at `ray_address`. Either way the driver
    writes each result to the store the moment its run finishes.
    """
    resolve_fn(fn)  # a wrong name is an error before any run, not after the first
    store = store if isinstance(store, SweepStore) else SweepStore(store)
    keys = [config_key(c) for c in configs]
    if len(set(keys)) != len(keys):
        raise ValueError("the sweep lists the same config twice; give each run a distinct config (e.g. a seed)")
    done = store.finished_keys()
    todo = [c for c, k in zip(configs, keys) if k not in done]
    if executor == "local" and workers <= 1:
        for c in tqdm(todo, desc=f"{desc} ({len(configs) - len(todo)} done before)", disable=not progress):
            out, sec = _run_one(fn, c)
            store.put(c, out, sec)
    elif executor == "local":
        _run_pool(todo, store, fn, workers, progress, desc)
    elif executor == "ray":
        _run_ray(todo, store, fn, ray_address, progress, desc)
    else:
        raise ValueError(f"executor must be 'local' or 'ray'; got {executor!r}")
    return [store.get(c) for c in configs]


def end_with_parent(parent: int | None = None) -> None:
    """Pool-worker initializer: the worker is killed when the process that started it dies (Linux
    PR_SET_PDEATHSIG), so a killed sweep leaves no orphan computing or holding memory. `parent`: the
    starting process's pid, to catch a parent that died while this worker was still starting."""
    import os
    import signal
    import sys

    if sys.platform.startswith("linux"):
        import ctypes

        try:
            ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, int(signal.SIGTERM))  # PR_SET_PDEATHSIG = 1
        except OSError:  # pragma: no cover - no libc by that name
            pass
    if parent is not None and os.getppid() != parent:
        os._exit(1)


def _run_pool(todo: list[dict], store: SweepStore, fn: str, workers: int, progress: bool, desc: str) -> None:
    import multiprocessing as mp
    import os
    from concurrent.futures import ProcessPoolExecutor, as_completed

    with ProcessPoolExecutor(max_workers=workers, mp_context=mp.get_context("spawn"),
                             initializer=end_with_parent, initargs=(os.getpid(),)) as pool:
        futures = {pool.submit(_run_one, fn, c): c for c in todo}
        for fut in tqdm(as_completed(futures), total=len(futures), desc=f"{desc} ({workers} workers)",
                        disable=not progress):
            out, sec = fut.result()
            store.put(futures[fut], out, sec)


def _run_ray(todo: list[dict], store: SweepStore, fn: str, address: str | None, progress: bool, desc: str) -> None:
    if not todo:
        return
    try:
        import ray
    except ImportError as e:
        raise ValueError("the Ray executor needs Ray: pip install 'headalloc[ray]'") from e
    started_here = not ray.is_initialized()
    if started_here:
        kwargs = {"address": address} if address else {"include_dashboard": False}
        ray.init(ignore_reinit_error=True, log_to_driver=False, **kwargs)
    remote = ray.remote(num_cpus=1)(_run_one)
    pending = {remote.remote(fn, c): c for c in todo}
    bar = tqdm(total=len(todo), desc=f"{desc} (ray)", disable=not progress)
    try:
        while pending:
            ready, _ = ray.wait(list(pending), num_returns=1)
            for ref in ready:
                c = pending.pop(ref)
                out, sec = ray.get(ref)
                store.put(c, out, sec)  # written by the driver as each run finishes
                bar.update(1)
    finally:
        bar.close()
        for ref in pending:
            ray.cancel(ref)
        if started_here and not address:
            ray.shutdown()
