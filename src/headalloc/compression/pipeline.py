"""Compression in one call: calibrate, plan, reduce, distil, evaluate; `result.save(dir)`.

    import headalloc
    r = headalloc.compress("smollm2", budget=0.5, strategy="measured", preset="quick")
    r.report.validation.after.ppl; print("\n".join(r.report.format_text())); r.save("out/smollm2-0.5")

`headalloc compress` is this function with the same names (the flags are derived from
`CompressConfig`).
"""

from __future__ import annotations

import os
import sys
import time
from dataclasses import dataclass, field, replace
from pathlib import Path

import torch

from headalloc.compression.calibration import Calibration, collect, shrink_second_moment
from headalloc.compression.families import adapter_for
from headalloc.compression.precision import autocast_context, model_device, resolve_autocast
from headalloc.compression.report import (CompressionReport, Costs, Perplexity, RatioInterval, TextResult,
                                          Timings)
from headalloc.compression.settings import CompressConfig, preset as make_preset
from headalloc.compression.spec import Plan
from headalloc.compression.workspace import PerplexityKey, TargetsKey, Workspace


@dataclass
class CompressionResult:
    """The compressed model, its plan, its settings, what was measured (`report`), and the record that `save`
    writes."""

    model: torch.nn.Module
    plan: Plan
    config: CompressConfig
    report: CompressionReport
    tokenizer: object = None
    teacher: torch.nn.Module | None = field(default=None, repr=False)
    workspace: Workspace | None = field(default=None, repr=False)

    @property
    def calibration(self) -> Calibration | None:
        return None if self.workspace is None else self.workspace.calibration

    def record(self, command: str | None = None) -> dict:
        rep = self.report.record()
        return {"config": self.config.to_dict(), "base_model": rep.pop("base_model"), "plan": self.plan.to_dict(),
                "command": command, **rep}

    def save(self, out: str | os.PathLike, overwrite: bool = False, dtype: str | torch.dtype | None = None,
             command: str | None = None) -> Path:
        """A folder that loads with AutoModelForCausalLM.from_pretrained(out, trust_remote_code=True);
        weights in `dtype` (default: the config's save_dtype, else the original's)."""
        from headalloc.compression.export import save_compressed

        dtype = dtype or self.config.runtime.save_dtype or self.report.teacher_dtype
        if isinstance(dtype, str):
            dtype = getattr(torch, dtype)
        return save_compressed(self.model, self.tokenizer, out, self.record(command), overwrite, dtype)


def _stage(progress: bool, i: int, n: int, text: str) -> None:
    if progress:
        print(f"[{i}/{n}] {text}", file=sys.stderr, flush=True)


def _windows(tok, corpus: str, split: str, length: int, n: int, seed: int) -> torch.Tensor:
    from headalloc.assets import token_windows

    return token_windows(tok, corpus, split, length, n, seed=seed)


def eval_windows(tok, cfg: CompressConfig) -> torch.Tensor:
    # validation split only: never used for calibration or distillation
    return _windows(tok, cfg.fit.corpus, "validation", cfg.eval.length, cfg.eval.windows, cfg.measure_seed + 1)


def heldout_windows(tok, cfg: CompressConfig) -> dict[str, torch.Tensor]:
    """Windows of each held-out kind of text (nothing is planned, calibrated or distilled on them)."""
    return {k: _windows(tok, k, "all", cfg.eval.length, cfg.eval.heldout_windows, cfg.measure_seed + 3)
            for k in cfg.heldout_kinds}


def _interval(after: Perplexity, teacher: Perplexity, cfg: CompressConfig) -> RatioInterval | None:
    """The perplexity ratio with a 90% paired bootstrap interval over the windows (None from a single window)."""
    from headalloc.evaluation.lm import paired_ratio_interval

    if len(after.window_nll) < 2 or len(teacher.window_nll) != len(after.window_nll):
        return None
    return RatioInterval.of(paired_ratio_interval(list(after.window_nll), list(teacher.window_nll),
                                                  cfg.eval.length - 1, seed=cfg.measure_seed))


def prepare(teacher, tok, cfg: CompressConfig, progress: bool = False) -> Workspace:
    """The calibration of `teacher` on the fitting text that `cfg` names, in a `Workspace` that several runs
    (strategies, budgets) on the same text can share (`compress(..., calibration_data=workspace)`)."""
    from headalloc.compression.distill import TopKTargets
    from headalloc.compression.fit_text import fit_windows

    cfg = _with_autocast(cfg.resolved(), teacher)  # (a config given to the Python API unvalidated: its defaults)
    t = time.time()
    seed = cfg.runtime.seed
    w, parts = fit_windows(teacher, tok, cfg, cfg.calib.windows, cfg.calib.length, seed, progress, parts=True)
    kd, kd_parts = fit_windows(teacher, tok, cfg, cfg.kd.windows, cfg.kd.length, seed + 2, progress, parts=True) \
        if cfg.calib.moment_windows else (None, None)
    fit_seconds = time.time() - t  # the fitting text: tokenising, or sampling it from the original (once per setting)
    cal = collect(teacher, w, keep=True, progress=progress, outputs=cfg.calib.moment_windows > 0)
    cal.parts = parts
    ws = Workspace(cal, seconds_fit_text=fit_seconds, autocast=cfg.runtime.autocast)
    if cfg.calib.moment_windows:
        # the whitening statistics from more text: an evenly spaced subset of the end-to-end fitting windows (the
        # same draw as kd_targets', so generated text is sampled once), pooled with the calibration windows'.
        # The same forward passes give those windows' top-k distillation targets (kd_targets computes the rest)
        idx = torch.linspace(0, len(kd) - 1, min(cfg.calib.moment_windows, len(kd))).long().unique()
        top = TopKTargets(cfg.kd.topk) if cfg.kd.topk else None  # (kd_topk 0: the teacher runs at each step)
        # (4 windows per forward: the same top-k targets bit for bit and the moments to about 1e-7, in less time;
        # the calibration windows above stay one per forward, as their stored inputs are per window).
        # leave-part-out estimates need each part's moments apart: the windows are then passed part by part
        groups = {None: idx}
        if cfg.plan.error == "leave-part-out":
            names = sorted({kd_parts[i] for i in idx.tolist()})
            groups = {p: idx[torch.tensor([kd_parts[i] == p for i in idx.tolist()])] for p in names}
        with autocast_context(cfg.runtime.autocast, model_device(teacher)):  # (the moments' sums stay float32: gram)
            stats = {p: collect(teacher, kd[i], keep=False, batch=4, progress=progress, outputs=True, on_logits=top)
                     for p, i in groups.items()}
        if top is not None:
            ws.teacher.partial_targets[TargetsKey.of(cfg)] = (torch.cat(list(groups.values())), top.result())
        if cfg.plan.error == "leave-part-out":
            cal.part_moments = {p: (c.second_moment, c.out_moment, c.tokens) for p, c in stats.items()}
        extra = _pooled(list(stats.values()))
        n = cal.tokens + extra.tokens
        cal.second_moment = [(a * cal.tokens + b * extra.tokens) / n
                             for a, b in zip(cal.second_moment, extra.second_moment)]
        cal.out_moment = [(a * cal.tokens + b * extra.tokens) / n for a, b in zip(cal.out_moment, extra.out_moment)]
    if cfg.calib.whiten_shrink > 0:
        cal.second_moment = [shrink_second_moment(m, cfg.calib.whiten_shrink) for m in cal.second_moment]
    cal.whiten_shrink = cfg.calib.whiten_shrink  # (also applied to the head outputs' moment: reduce.output_moments)
    cal.made_with = _fit_key(cfg)  # checked on reuse
    return ws


def _pooled(stats: list[Calibration]) -> Calibration:
    """One calibration's moments from several (weighted by their tokens); the first's otherwise."""
    if len(stats) == 1:
        return stats[0]
    n = sum(c.tokens for c in stats)
    return replace(stats[0], tokens=n,
                   second_moment=[sum(c.second_moment[l] * c.tokens for c in stats) / n
                                  for l in range(len(stats[0].second_moment))],
                   out_moment=[sum(c.out_moment[l] * c.tokens for c in stats) / n
                               for l in range(len(stats[0].out_moment))])


def _with_autocast(cfg: CompressConfig, model) -> CompressConfig:
    """`cfg` with its `autocast` setting resolved for the model's device ('auto' -> 'bfloat16' or 'none')."""
    return cfg.replace(autocast=resolve_autocast(cfg.runtime.autocast, model_device(model)))


def _fit_key(cfg: CompressConfig) -> tuple:
    """What a calibration's statistics depend on (`cfg` with `autocast` resolved)."""
    return (cfg.fit.text, cfg.fit.corpus, cfg.fit.gen_prompt, cfg.fit.gen_temperature, cfg.fit.gen_batch) + \
        ((("whiten_shrink", cfg.calib.whiten_shrink),) if cfg.calib.whiten_shrink else ()) + \
        ((("moment_windows", cfg.calib.moment_windows, cfg.kd.windows, cfg.kd.length),)
         if cfg.calib.moment_windows else ()) + \
        ((("factor_output", cfg.calib.factor_output),) if cfg.calib.factor_output != "input" else ()) + \
        ((("plan_error", cfg.plan.error),) if cfg.plan.error != "pooled" else ()) + \
        ((("autocast", cfg.runtime.autocast),) if cfg.calib.moment_windows and cfg.runtime.autocast != "none" else ())


def kd_targets(teacher, tok, cfg: CompressConfig, ws: Workspace, progress: bool = True):
    """Training-split windows for end-to-end distillation (a draw separate from the calibration
    windows) and the teacher's top-k targets on them (None with kd_topk 0: the full-vocabulary KL runs the teacher
    at each step); kept in the workspace so strategies share them."""
    from headalloc.compression.distill import merge_topk, teacher_topk
    from headalloc.compression.fit_text import fit_windows

    cfg = _with_autocast(cfg.resolved(), teacher)  # (a config given to the Python API unvalidated: its defaults)
    key = TargetsKey.of(cfg)
    store = ws.teacher.targets
    if key not in store and not cfg.kd.topk:  # the full-vocabulary KL: no stored targets
        store[key] = (fit_windows(teacher, tok, cfg, cfg.kd.windows, cfg.kd.length, cfg.runtime.seed + 2, progress),
                      None)
    if key not in store:
        w = fit_windows(teacher, tok, cfg, cfg.kd.windows, cfg.kd.length, cfg.runtime.seed + 2, progress)
        # windows whose targets the calibration pass already computed (moment_windows) are not run again
        done, part = ws.teacher.partial_targets.pop(key, (torch.zeros(0, dtype=torch.long), None))
        rest = torch.ones(len(w), dtype=torch.bool)
        rest[done] = False
        rest = rest.nonzero()[:, 0]
        with autocast_context(cfg.runtime.autocast, model_device(teacher)):
            parts = [(done, part)] + ([(rest, teacher_topk(teacher, w[rest], cfg.kd.topk, progress))]
                                      if len(rest) else [])
        store[key] = (w, merge_topk(len(w), parts))
    return store[key]


def teacher_perplexity(teacher, windows: torch.Tensor, ws: Workspace, key: PerplexityKey,
                       progress: bool = False) -> dict:
    """The original's perplexity on `windows`, measured once per workspace (every strategy and budget that shares
    it reuses it) and kept on disk across runs (`cached_perplexity`)."""
    from headalloc.evaluation.lm import cached_perplexity

    if key not in ws.teacher.perplexity:
        ws.teacher.perplexity[key] = cached_perplexity(teacher, windows, progress, desc=f"original '{key.text}' ppl")
    return ws.teacher.perplexity[key]


def plan_options(ws: Workspace, cfg: CompressConfig):
    """The options the strategies read (`PlanOptions`), checked against what the calibration was made with."""
    from headalloc.compression.planning import PlanOptions

    if cfg.plan.error != "pooled" and not ws.calibration.part_moments:
        raise ValueError(f"plan_error {cfg.plan.error!r} needs a calibration made with it (per-part moments); this "
                         f"one was made with plan_error 'pooled' (pipeline.prepare with the same settings)")
    return PlanOptions.of(cfg)


def check_model(name_or_path: str) -> Path:
    """Resolve a model name or folder and check its family, before any loading or work."""
    from headalloc.assets.models import load_config, resolve_model

    path = resolve_model(name_or_path)
    adapter_for(load_config(path))
    return path


def base_model_name(model_or_name) -> str:
    """What a model card names as the base: a hub id where one is known, never a machine-local path."""
    from headalloc.assets.models import HUB_IDS

    if isinstance(model_or_name, str) and model_or_name in HUB_IDS:
        return HUB_IDS[model_or_name]
    name = str(getattr(getattr(model_or_name, "config", None), "_name_or_path", "") or model_or_name)
    return Path(name).name if os.path.isabs(name) or os.path.exists(name) else name


def _check_fit_texts(cfg: CompressConfig) -> None:
    """Every named text of the fitting text is there (e.g. a missing download), before any sampling or fitting."""
    from headalloc.assets.corpus import load_corpus

    for name in cfg.fit_texts:
        load_corpus(name)


def _max_positions(model) -> int | None:
    return getattr(model.config, "max_position_embeddings", None)


def compress(model_or_path=None, *, budget: float | None = None, strategy: str | None = None,
             preset: str = "default", config: CompressConfig | None = None, tokenizer=None,
             calibration_data: Workspace | Calibration | None = None, evaluate: bool = True, progress: bool = True,
             keep_stages: bool = False, **settings) -> CompressionResult:
    """Compress a model's attention to a budget. `model_or_path`: a loaded Hugging Face causal LM (give
    its `tokenizer` too), the packaged "smollm2", or a local folder. Settings: `config`, else the named
    `preset` with `budget`, `strategy` and any other `CompressConfig` field as keywords.
    `calibration_data`: reuse a `Workspace` from `prepare` (several strategies or budgets on the same text share
    its calibration, measurements and the teacher's targets), or a bare `Calibration`.
    `keep_stages`: also measure perplexity after the layer-local stage alone."""
    from headalloc.assets import load_model
    from headalloc.compression.distill import distill_end_to_end, distill_layerwise
    from headalloc.compression.planning import make_plan
    from headalloc.compression.planning.estimates import factor_inputs
    from headalloc.compression.reduce import Geometry, cast_parameters, compress_model
    from headalloc.evaluation.lm import counts, perplexity

    given_model = model_or_path is not None and not isinstance(model_or_path, (str, os.PathLike))
    over = {k: v for k, v in dict(budget=budget, strategy=strategy, **settings).items() if v is not None}
    if model_or_path is not None and not given_model:
        over["model"] = str(model_or_path)
    cfg = (config.replace(**over) if config is not None else make_preset(preset, **over)).validate()
    n = 5 if evaluate else 4
    t_start = time.time()
    if given_model:
        teacher, tok = model_or_path, tokenizer
        adapter_for(teacher)
        if tok is None and evaluate:
            raise ValueError("give the tokenizer with a loaded model (tokenizer=...), or evaluate=False")
    else:
        check_model(cfg.model)
        _stage(progress, 1, n, f"loading {cfg.model}")
        rt = cfg.runtime
        teacher, tok = load_model(cfg.model, dtype=rt.dtype, device_map=rt.device_map, device=rt.device)
    teacher.eval()
    cfg = _with_autocast(cfg, teacher)  # ('auto' recorded as what it was on this device)
    limit = _max_positions(teacher)
    for name in ("calib_length", "kd_length", "eval_length"):
        if limit is not None and cfg.get(name) > limit:
            raise ValueError(f"{name} {cfg.get(name)} exceeds the model's maximum of {limit} positions")
    ev = eval_windows(tok, cfg) if evaluate else None  # checks there is enough text before any work
    ho = heldout_windows(tok, cfg) if evaluate else {}
    _check_fit_texts(cfg)
    fit_dtype = getattr(torch, cfg.runtime.fit_dtype)
    teacher_dtype = next(teacher.parameters()).dtype
    report = CompressionReport(base_model=base_model_name(cfg.model if not given_model else teacher),
                               teacher_dtype=str(teacher_dtype).replace("torch.", ""))
    times: dict[str, float | None] = {}

    t0 = time.time()
    ws = Workspace(calibration_data) if isinstance(calibration_data, Calibration) else calibration_data
    fit = _fit_key(cfg)
    if ws is not None and ws.calibration.made_with not in (None, fit):
        raise ValueError(f"the calibration given was made from other fitting text {ws.calibration.made_with} than "
                         f"these settings ask for {fit}; make it with the same settings (pipeline.prepare)")
    if ws is None:
        _stage(progress, 2, n, f"calibration: {cfg.calib.windows} windows of {cfg.calib.length} tokens "
                               f"({cfg.fit.text} text, '{cfg.fit.corpus}' train split)")
        if progress and cfg.calib.moment_windows > cfg.kd.windows:
            print(f"note: moment_windows {cfg.calib.moment_windows} is more than kd_windows {cfg.kd.windows}; the "
                  f"statistics come from all {cfg.kd.windows} end-to-end windows", file=sys.stderr)
        ws = prepare(teacher, tok, cfg, progress)
        times["fit_text"] = ws.seconds_fit_text  # (of planning: drawing the fitting text, sampled once per setting)
    cal = ws.calibration
    _stage(progress, 2, n, f"planning: strategy {cfg.plan.strategy}, {cfg.plan.budget_kind} budget "
                           f"{cfg.plan.budget}, target {cfg.plan.target}")
    options = plan_options(ws, cfg)
    p = cfg.plan
    plan = make_plan(teacher, p.strategy, p.budget, cal, p.budget_kind, p.step, progress, p.target, options=options,
                     measurements=ws.measurements)
    factor = factor_inputs(teacher, cal, options.measure, ws.measurements) if any(lp.rank_o for lp in plan) else None
    student = compress_model(teacher, plan, cal, dtype=fit_dtype, factor=factor)
    times["plan"] = time.time() - t0
    before: dict[str, Perplexity] = {}
    after_layerwise: dict[str, Perplexity] = {}
    if evaluate and cfg.eval.before:  # the plan alone, before any fitting (a diagnostic)
        before["validation"] = Perplexity.of(perplexity(student, ev, progress,
                                                        desc="compressed ppl (before distillation)"))
        for k, w in ho.items():
            before[k] = Perplexity.of(perplexity(student, w, progress, desc=f"held-out '{k}' ppl (before)"))
    full = Geometry.of(teacher).full()
    identity = all(lp == full for lp in plan)
    t1 = time.time()
    if identity:
        report.note = "the plan keeps every head and width: nothing to fit, weights unchanged"
        if progress:
            print(f"note: {report.note}", file=sys.stderr)
    else:
        _stage(progress, 3, n, f"layer-local distillation: {cfg.layerwise.steps} steps per layer")
        lw = cfg.layerwise
        report.layerwise = distill_layerwise(teacher, student, cal, lw.steps, lw.lr, cfg.runtime.seed, progress,
                                             inputs=lw.inputs)
        times["layerwise"] = time.time() - t1
        if keep_stages and evaluate and cfg.kd.steps > 0:
            after_layerwise["validation"] = Perplexity.of(perplexity(student, ev, progress, desc="after layer-local"))
            for k, w in ho.items():
                after_layerwise[k] = Perplexity.of(perplexity(student, w, progress,
                                                              desc=f"held-out '{k}' after layer-local"))
        if cfg.kd.steps > 0:
            _stage(progress, 4, n, f"end-to-end distillation: {cfg.kd.steps} steps on {cfg.kd.windows} windows"
                                   + (" (bfloat16 autocast)" if cfg.runtime.autocast == "bfloat16" else ""))
            w, targets = kd_targets(teacher, tok, cfg, ws, progress)
            kd = distill_end_to_end(teacher, student, w, cfg.kd, cfg.runtime.seed, progress, targets=targets,
                                    autocast=cfg.runtime.autocast)
            kd.pop("train_curve")
            report.end_to_end = kd
    times["distill"] = time.time() - t1
    save_dtype = getattr(torch, cfg.runtime.save_dtype) if cfg.runtime.save_dtype else teacher_dtype
    cast_parameters(student, save_dtype)
    if evaluate:
        _stage(progress, n, n, f"evaluation: {cfg.eval.windows} validation windows of {cfg.eval.length} tokens")
        t = Perplexity.of(teacher_perplexity(teacher, ev, ws, PerplexityKey(cfg.fit.corpus, "validation",
                                                                            cfg.eval.windows, cfg.eval.length,
                                                                            cfg.measure_seed), progress))
        a = Perplexity.of(perplexity(student, ev, progress, desc="compressed ppl"))
        report.teacher_costs, report.costs = Costs.of(counts(teacher)), Costs.of(counts(student))
        report.validation = TextResult(cfg.fit.corpus, cfg.eval.windows, cfg.eval.length, t, a,
                                       before.get("validation"), after_layerwise.get("validation"),
                                       _interval(a, t, cfg))
        report.validation_corpus = cfg.fit.corpus
        for k, w in ho.items():
            tk = Perplexity.of(teacher_perplexity(teacher, w, ws, PerplexityKey(k, "all", cfg.eval.heldout_windows,
                                                                                cfg.eval.length, cfg.measure_seed),
                                                  progress))
            ak = Perplexity.of(perplexity(student, w, progress, desc=f"compressed '{k}' ppl"))
            report.heldout[k] = TextResult(k, cfg.eval.heldout_windows, cfg.eval.length, tk, ak, before.get(k),
                                           after_layerwise.get(k), _interval(ak, tk, cfg))
    times["total"] = time.time() - t_start
    report.timings = Timings(**times)
    return CompressionResult(student, plan, cfg, report, tok, teacher, ws)
