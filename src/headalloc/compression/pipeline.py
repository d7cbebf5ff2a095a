"""Compression in one call: calibrate, plan, reduce, distil, evaluate; `result.save(dir)`.

    import headalloc
    r = headalloc.compress("smollm2", budget=0.5, strategy="measured", preset="quick")
    r.metrics["after_distill"]["ppl"]; r.save("out/smollm2-0.5")

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

from headalloc.compression.calibration import Calibration, collect, shrink_second_moment  # noqa: F401 (re-exported)
from headalloc.compression.families import adapter_for
from headalloc.compression.precision import autocast_context, model_device, resolve_autocast
from headalloc.compression.settings import CompressConfig, preset as make_preset
from headalloc.compression.spec import Plan


@dataclass
class CompressionResult:
    """The compressed model, its plan, what was measured, and the record that `save` writes."""

    model: torch.nn.Module
    plan: Plan
    config: CompressConfig
    metrics: dict
    tokenizer: object = None
    teacher: torch.nn.Module | None = field(default=None, repr=False)
    calibration: Calibration | None = field(default=None, repr=False)

    def record(self, command: str | None = None) -> dict:
        return {"config": self.config.to_dict(), "base_model": self.metrics.get("base_model"),
                "plan": self.plan.to_dict(), "command": command, **{k: v for k, v in self.metrics.items()
                                                                     if k != "base_model"}}

    def save(self, out: str | os.PathLike, overwrite: bool = False, dtype: str | torch.dtype | None = None,
             command: str | None = None) -> Path:
        """A folder that loads with AutoModelForCausalLM.from_pretrained(out, trust_remote_code=True);
        weights in `dtype` (default: the config's save_dtype, else the original's)."""
        from headalloc.compression.export import save_compressed

        dtype = dtype or self.config.save_dtype or self.metrics.get("teacher_dtype")
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
    return _windows(tok, cfg.corpus, "validation", cfg.eval_length, cfg.eval_windows, cfg.measure_seed + 1)


def heldout_windows(tok, cfg: CompressConfig) -> dict[str, torch.Tensor]:
    """Windows of each held-out kind of text (nothing is planned, calibrated or distilled on them)."""
    return {k: _windows(tok, k, "all", cfg.eval_length, cfg.heldout_windows, cfg.measure_seed + 3) for k in cfg.heldout_kinds}


def _ratio(after: dict, teacher: dict, cfg: CompressConfig) -> dict | None:
    """The perplexity ratio with a 90% paired bootstrap interval over the windows (None from a single window)."""
    from headalloc.evaluation.lm import paired_ratio_interval

    if len(after.get("window_nll", ())) < 2 or len(teacher.get("window_nll", ())) != len(after["window_nll"]):
        return None
    return paired_ratio_interval(after["window_nll"], teacher["window_nll"], cfg.eval_length - 1, seed=cfg.measure_seed)


def heldout_ratios(metrics: dict) -> dict[str, float]:
    """Final perplexity on each held-out text as a ratio to the original's."""
    return {k: h["after"]["ppl"] / h["teacher"]["ppl"] for k, h in (metrics.get("heldout") or {}).items()
            if "after" in h and "teacher" in h}


def calibration(teacher, tok, cfg: CompressConfig, progress: bool = False) -> Calibration:
    from headalloc.compression.distill import TopKTargets
    from headalloc.compression.fit_text import fit_windows

    cfg = _with_autocast(cfg.resolved(), teacher)  # (a config given to the Python API unvalidated: its defaults)
    t = time.time()
    w, parts = fit_windows(teacher, tok, cfg, cfg.calib_windows, cfg.calib_length, cfg.seed, progress, parts=True)
    kd, kd_parts = fit_windows(teacher, tok, cfg, cfg.kd_windows, cfg.kd_length, cfg.seed + 2, progress, parts=True) \
        if cfg.moment_windows else (None, None)
    fit_seconds = time.time() - t  # the fitting text: tokenising, or sampling it from the original (once per setting)
    cal = collect(teacher, w, keep=True, progress=progress, outputs=cfg.moment_windows > 0)
    cal.parts = parts
    cal.cache["seconds_fit_text"] = fit_seconds
    if cfg.moment_windows:
        # the whitening statistics from more text: an evenly spaced subset of the end-to-end fitting windows (the
        # same draw as kd_targets', so generated text is sampled once), pooled with the calibration windows'.
        # The same forward passes give those windows' top-k distillation targets (kd_targets computes the rest)
        idx = torch.linspace(0, len(kd) - 1, min(cfg.moment_windows, len(kd))).long().unique()
        top = TopKTargets(cfg.kd_topk) if cfg.kd_topk else None  # (kd_topk 0: the teacher runs at each step)
        # (4 windows per forward: the same top-k targets bit for bit and the moments to about 1e-7, in less time;
        # the calibration windows above stay one per forward, as their stored inputs are per window).
        # leave-part-out estimates need each part's moments apart: the windows are then passed part by part
        groups = {None: idx}
        if cfg.plan_error == "leave-part-out":
            names = sorted({kd_parts[i] for i in idx.tolist()})
            groups = {p: idx[torch.tensor([kd_parts[i] == p for i in idx.tolist()])] for p in names}
        with autocast_context(cfg.autocast, model_device(teacher)):  # (the moments' sums stay float32: gram)
            stats = {p: collect(teacher, kd[i], keep=False, batch=4, progress=progress, outputs=True, on_logits=top)
                     for p, i in groups.items()}
        if top is not None:
            cal.cache[_kd_key(cfg) + ("part",)] = (torch.cat(list(groups.values())), top.result())
        if cfg.plan_error == "leave-part-out":
            cal.part_moments = {p: (c.second_moment, c.out_moment, c.tokens) for p, c in stats.items()}
        extra = _pooled(list(stats.values()))
        n = cal.tokens + extra.tokens
        cal.second_moment = [(a * cal.tokens + b * extra.tokens) / n
                             for a, b in zip(cal.second_moment, extra.second_moment)]
        cal.out_moment = [(a * cal.tokens + b * extra.tokens) / n for a, b in zip(cal.out_moment, extra.out_moment)]
    if cfg.whiten_shrink > 0:
        cal.second_moment = [shrink_second_moment(m, cfg.whiten_shrink) for m in cal.second_moment]
    cal.cache["fit_text"] = _fit_key(cfg)  # checked on reuse
    cal.cache["factor_output"] = cfg.factor_output
    cal.cache["autocast"] = cfg.autocast  # (resolved: the precision of the passes over the end-to-end windows)
    cal.cache["whiten_shrink"] = cfg.whiten_shrink  # also applied to the head outputs' moment (output_moments)
    return cal


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
    return replace(cfg, autocast=resolve_autocast(cfg.autocast, model_device(model)))


def _fit_key(cfg: CompressConfig) -> tuple:
    """What a calibration's statistics depend on (`cfg` with `autocast` resolved)."""
    return (cfg.fit_text, cfg.corpus, cfg.gen_prompt, cfg.gen_temperature, cfg.gen_batch) + \
        ((("whiten_shrink", cfg.whiten_shrink),) if cfg.whiten_shrink else ()) + \
        ((("moment_windows", cfg.moment_windows, cfg.kd_windows, cfg.kd_length),) if cfg.moment_windows else ()) + \
        ((("factor_output", cfg.factor_output),) if cfg.factor_output != "input" else ()) + \
        ((("plan_error", cfg.plan_error),) if cfg.plan_error != "pooled" else ()) + \
        ((("autocast", cfg.autocast),) if cfg.moment_windows and cfg.autocast != "none" else ())


def kd_targets(teacher, tok, cfg: CompressConfig, cal: Calibration, progress: bool = True):
    """Training-split windows for end-to-end distillation (a draw separate from the calibration
    windows) and the teacher's top-k targets on them (None with kd_topk 0: the full-vocabulary KL runs the teacher
    at each step); cached on the calibration so strategies share them."""
    from headalloc.compression.distill import merge_topk, teacher_topk
    from headalloc.compression.fit_text import fit_windows

    cfg = _with_autocast(cfg.resolved(), teacher)  # (a config given to the Python API unvalidated: its defaults)
    key = _kd_key(cfg)
    if key not in cal.cache and not cfg.kd_topk:  # the full-vocabulary KL: no stored targets
        cal.cache[key] = (fit_windows(teacher, tok, cfg, cfg.kd_windows, cfg.kd_length, cfg.seed + 2, progress), None)
    if key not in cal.cache:
        w = fit_windows(teacher, tok, cfg, cfg.kd_windows, cfg.kd_length, cfg.seed + 2, progress)
        # windows whose targets the calibration pass already computed (moment_windows) are not run again
        done, part = cal.cache.pop(key + ("part",), (torch.zeros(0, dtype=torch.long), None))
        rest = torch.ones(len(w), dtype=torch.bool)
        rest[done] = False
        rest = rest.nonzero()[:, 0]
        with autocast_context(cfg.autocast, model_device(teacher)):
            parts = [(done, part)] + ([(rest, teacher_topk(teacher, w[rest], cfg.kd_topk, progress))]
                                      if len(rest) else [])
        cal.cache[key] = (w, merge_topk(len(w), parts))
    return cal.cache[key]


def _kd_key(cfg: CompressConfig) -> tuple:
    return ("kd", cfg.corpus, cfg.fit_text, cfg.gen_prompt, cfg.gen_temperature, cfg.gen_batch, cfg.kd_windows,
            cfg.kd_length, cfg.kd_topk, cfg.seed) + ((cfg.autocast,) if cfg.autocast != "none" else ())


def teacher_metrics(teacher, ev: torch.Tensor, cal: Calibration, cfg: CompressConfig, progress: bool = False) -> dict:
    """The original's validation perplexity and counts, measured once per calibration (every strategy and
    budget that shares it reuses them)."""
    from headalloc.evaluation.lm import cached_perplexity, counts

    key = ("teacher_eval", cfg.corpus, cfg.eval_windows, cfg.eval_length, cfg.measure_seed)
    if key not in cal.cache:
        cal.cache[key] = {**cached_perplexity(teacher, ev, progress, desc="original ppl"), **counts(teacher)}
    return cal.cache[key]


def plan_settings(cal: Calibration, cfg: CompressConfig) -> Calibration:
    """Put the settings the strategies read while planning on the calibration they are given (a calibration is
    shared by strategies and budgets, so each plan sets them): how our factorised strategies pick among candidate
    plans (`plan_select`), what their estimates measure (`plan_error`), measured-lowrank's options
    (`output_groups`)."""
    if cfg.plan_error != "pooled" and not cal.part_moments:
        raise ValueError(f"plan_error {cfg.plan_error!r} needs a calibration made with it (per-part moments); this "
                         f"one was made with plan_error 'pooled' (pipeline.calibration with the same settings)")
    cal.cache.update(plan_select=cfg.plan_select, plan_error=cfg.plan_error, output_groups=cfg.output_groups)
    return cal


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
             calibration_data: Calibration | None = None, evaluate: bool = True, progress: bool = True,
             keep_stages: bool = False, **settings) -> CompressionResult:
    """Compress a model's attention to a budget. `model_or_path`: a loaded Hugging Face causal LM (give
    its `tokenizer` too), the packaged "smollm2", or a local folder. Settings: `config`, else the named
    `preset` with `budget`, `strategy` and any other `CompressConfig` field as keywords.
    `calibration_data`: reuse a calibration (several strategies or budgets on the same text).
    `keep_stages`: also measure perplexity after the layer-local stage alone."""
    from headalloc.assets import load_model
    from headalloc.compression.distill import distill_end_to_end, distill_layerwise
    from headalloc.compression.reduce import Geometry, cast_parameters, compress_model
    from headalloc.compression.strategies import make_plan
    from headalloc.evaluation.lm import cached_perplexity, counts, perplexity

    given_model = model_or_path is not None and not isinstance(model_or_path, (str, os.PathLike))
    over = {k: v for k, v in dict(budget=budget, strategy=strategy, **settings).items() if v is not None}
    if model_or_path is not None and not given_model:
        over["model"] = str(model_or_path)
    cfg = (replace(config, **over) if config is not None else make_preset(preset, **over)).validate()
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
        teacher, tok = load_model(cfg.model, dtype=cfg.dtype, device_map=cfg.device_map, device=cfg.device)
    teacher.eval()
    cfg = _with_autocast(cfg, teacher)  # ('auto' recorded as what it was on this device)
    limit = _max_positions(teacher)
    for name in ("calib_length", "kd_length", "eval_length"):
        if limit is not None and getattr(cfg, name) > limit:
            raise ValueError(f"{name} {getattr(cfg, name)} exceeds the model's maximum of {limit} positions")
    ev = eval_windows(tok, cfg) if evaluate else None  # checks there is enough text before any work
    ho = heldout_windows(tok, cfg) if evaluate else {}
    _check_fit_texts(cfg)
    fit_dtype = getattr(torch, cfg.fit_dtype)
    teacher_dtype = next(teacher.parameters()).dtype
    metrics: dict = {"base_model": base_model_name(cfg.model if not given_model else teacher),
                     "teacher_dtype": str(teacher_dtype).replace("torch.", "")}

    t0 = time.time()
    cal = calibration_data
    fit = _fit_key(cfg)
    if cal is not None and cal.cache.get("fit_text", fit) != fit:
        raise ValueError(f"the calibration given was made from other fitting text {cal.cache['fit_text']} than "
                         f"these settings ask for {fit}; make it with the same settings (pipeline.calibration)")
    if cal is None:
        _stage(progress, 2, n, f"calibration: {cfg.calib_windows} windows of {cfg.calib_length} tokens "
                               f"({cfg.fit_text} text, '{cfg.corpus}' train split)")
        if progress and cfg.moment_windows > cfg.kd_windows:
            print(f"note: moment_windows {cfg.moment_windows} is more than kd_windows {cfg.kd_windows}; the "
                  f"statistics come from all {cfg.kd_windows} end-to-end windows", file=sys.stderr)
        cal = calibration(teacher, tok, cfg, progress)
    _stage(progress, 2, n, f"planning: strategy {cfg.strategy}, {cfg.budget_kind} budget {cfg.budget}, "
                           f"target {cfg.target}")
    plan_settings(cal, cfg)
    plan = make_plan(teacher, cfg.strategy, cfg.budget, cal, cfg.budget_kind, cfg.step, progress, cfg.target)
    student = compress_model(teacher, plan, cal, dtype=fit_dtype)
    metrics["seconds_plan"] = time.time() - t0
    if calibration_data is None:  # of which drawing the fitting text (sampling it once per setting, then cached)
        metrics["seconds_fit_text"] = cal.cache.get("seconds_fit_text")
    if ho:  # keyed by text: {"alice": {"corpus", "windows", "length", "before", "teacher", "after"}, ...}
        metrics["heldout"] = {k: {"corpus": k, "windows": cfg.heldout_windows, "length": cfg.eval_length}
                              for k in ho}
    if evaluate and cfg.eval_before:  # the plan alone, before any fitting (a diagnostic)
        metrics["before_distill"] = perplexity(student, ev, progress, desc="compressed ppl (before distillation)")
        for k, w in ho.items():
            metrics["heldout"][k]["before"] = perplexity(student, w, progress, desc=f"held-out '{k}' ppl (before)")
    full = Geometry.of(teacher).full()
    identity = all(lp == full for lp in plan)
    t1 = time.time()
    metrics["distill"] = metrics["end_to_end"] = None
    if identity:
        metrics["note"] = "the plan keeps every head and width: nothing to fit, weights unchanged"
        if progress:
            print(f"note: {metrics['note']}", file=sys.stderr)
    else:
        _stage(progress, 3, n, f"layer-local distillation: {cfg.distill_steps} steps per layer")
        metrics["distill"] = distill_layerwise(teacher, student, cal, cfg.distill_steps, cfg.distill_lr, cfg.seed,
                                               progress, inputs=cfg.distill_inputs)
        metrics["seconds_layerwise"] = time.time() - t1
        if keep_stages and evaluate and cfg.kd_steps > 0:
            metrics["after_layerwise"] = perplexity(student, ev, progress, desc="after layer-local")
            for k, w in ho.items():
                metrics["heldout"][k]["after_layerwise"] = perplexity(student, w, progress,
                                                                      desc=f"held-out '{k}' after layer-local")
        if cfg.kd_steps > 0:
            _stage(progress, 4, n, f"end-to-end distillation: {cfg.kd_steps} steps on {cfg.kd_windows} windows"
                                   + (" (bfloat16 autocast)" if cfg.autocast == "bfloat16" else ""))
            w, targets = kd_targets(teacher, tok, cfg, cal, progress)
            kd = distill_end_to_end(teacher, student, w, cfg.kd_steps, cfg.kd_lr, cfg.kd_batch, cfg.kd_topk,
                                    cfg.seed, progress, targets=targets, train=cfg.kd_train, tail=cfg.kd_tail,
                                    hidden_weight=cfg.kd_hidden, anchor=cfg.kd_anchor, ema=cfg.kd_ema,
                                    autocast=cfg.autocast, label_weight=cfg.kd_label,
                                    sampling=cfg.kd_sampling)
            kd.pop("train_curve")
            metrics["end_to_end"] = kd
    metrics["seconds_distill"] = time.time() - t1
    save_dtype = getattr(torch, cfg.save_dtype) if cfg.save_dtype else teacher_dtype
    cast_parameters(student, save_dtype)
    if evaluate:
        _stage(progress, n, n, f"evaluation: {cfg.eval_windows} validation windows of {cfg.eval_length} tokens")
        metrics["teacher"] = teacher_metrics(teacher, ev, cal, cfg, progress)
        metrics["after_distill"] = {**perplexity(student, ev, progress, desc="compressed ppl"), **counts(student)}
        for k, w in ho.items():
            hkey = ("teacher_heldout", k, cfg.heldout_windows, cfg.eval_length, cfg.measure_seed)
            if hkey not in cal.cache:
                cal.cache[hkey] = cached_perplexity(teacher, w, progress, desc=f"original '{k}' ppl")
            metrics["heldout"][k].update(teacher=cal.cache[hkey],
                                         after=perplexity(student, w, progress, desc=f"compressed '{k}' ppl"))
            metrics["heldout"][k]["ratio"] = _ratio(metrics["heldout"][k]["after"], cal.cache[hkey], cfg)
        metrics["ratio"] = _ratio(metrics["after_distill"], metrics["teacher"], cfg)
        metrics["evaluation"] = {"corpus": cfg.corpus, "split": "validation", "windows": cfg.eval_windows,
                                 "length": cfg.eval_length}
    metrics["seconds_total"] = time.time() - t_start
    return CompressionResult(student, plan, cfg, metrics, tok, teacher, cal)
