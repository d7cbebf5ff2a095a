"""Experiments register themselves here; `headalloc reproduce` runs them and gathers a report.

An experiment is three functions over one JSON record:
- compute(ctx) -> record: does the work (training, probing, solving) and returns a JSON-able dict
  that includes the settings it ran with;
- plot(record, out_dir) -> [png paths]: draws figures from the stored record only;
- table(record) -> rows: the "paper vs measured" rows for the report.
So figures and tables can always be redrawn from stored results without re-running anything.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from headalloc.io import atomic_write_json, read_json


@dataclass
class RunContext:
    """What an experiment is told: where to write, at which scale, with which seed."""

    out_dir: Path
    quick: bool = False
    seed: int = 0
    executor: str = "local"
    ray_address: str | None = None
    force: bool = False

    @property
    def scale(self) -> str:
        return "quick" if self.quick else "full"


@dataclass
class Experiment:
    name: str
    title: str
    description: str
    compute: Callable[[RunContext], dict]
    plot: Callable[[dict, Path], list[Path]]
    table: Callable[[dict], list[dict]]
    order: int = 100
    tags: tuple[str, ...] = field(default_factory=tuple)


_REGISTRY: dict[str, Experiment] = {}


def register(experiment: Experiment) -> Experiment:
    if experiment.name in _REGISTRY:
        raise ValueError(f"experiment {experiment.name!r} is registered twice")
    _REGISTRY[experiment.name] = experiment
    return experiment


def experiments() -> dict[str, Experiment]:
    """All registered experiments, in report order (importing the modules that register them)."""
    import headalloc.experiments  # noqa: F401  (registers the built-in experiments)

    return dict(sorted(_REGISTRY.items(), key=lambda kv: (kv[1].order, kv[0])))


def select(only: str | None) -> list[Experiment]:
    """Experiments named in a comma-separated `only` (all when None)."""
    all_exps = experiments()
    if not only:
        return list(all_exps.values())
    names = [n.strip() for n in only.split(",") if n.strip()]
    unknown = [n for n in names if n not in all_exps]
    if unknown:
        raise ValueError(f"unknown experiment(s) {unknown}; registered: {', '.join(all_exps)}")
    return [all_exps[n] for n in names]


def result_path(out: Path, exp: Experiment) -> Path:
    return Path(out) / exp.name / "result.json"


def run_experiment(exp: Experiment, out: Path, quick: bool, seed: int = 0, force: bool = False,
                   executor: str = "local", ray_address: str | None = None, log=print) -> dict:
    """Compute an experiment unless a finished result at the same scale and seed exists; plot it."""
    out_dir = Path(out) / exp.name
    path = result_path(out, exp)
    record = None
    if path.exists() and not force:
        try:
            stored = read_json(path)
        except ValueError:
            stored = None
        if stored and stored.get("_meta", {}).get("scale") == ("quick" if quick else "full") and \
                stored.get("_meta", {}).get("seed") == seed:
            record = stored
            log(f"[{exp.name}] finished result found at {path}; not recomputed (use --force to redo)")
    if record is None:
        log(f"[{exp.name}] running ({'quick' if quick else 'full'} scale)")
        ctx = RunContext(out_dir=out_dir, quick=quick, seed=seed, executor=executor,
                         ray_address=ray_address, force=force)
        out_dir.mkdir(parents=True, exist_ok=True)
        t0 = time.time()
        record = exp.compute(ctx)
        record["_meta"] = {"experiment": exp.name, "scale": ctx.scale, "seed": seed,
                           "seconds": round(time.time() - t0, 2),
                           "finished": time.strftime("%Y-%m-%d %H:%M:%S")}
        atomic_write_json(path, record)
        log(f"[{exp.name}] done in {record['_meta']['seconds']} s -> {path}")
        from headalloc.reports.ledger import append

        append("reproduce", exp.name, {"table": exp.table(record), "seconds": record["_meta"]["seconds"]},
               settings={"scale": ctx.scale, "seed": seed, "result": str(path)}, log=log)
    exp.plot(record, out_dir)
    return record
