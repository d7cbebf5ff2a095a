"""What a compression run measured, typed, and the one place it is formatted.

`CompressionReport` holds the perplexities (validation text and every held-out text: the original's, the
compressed model's before and after fitting, the ratio's interval over windows), the costs of both models, the
distillation records and the timings. `record()` writes it in the layout of a saved folder's `headalloc.json`
and `CompressionReport.from_record` reads it back, so a saved folder and a live run give the same object.
`summary_rows` is the one summary: `format_text` prints it (the CLI, the benchmarks, the reproduce experiment's
log) and `format_markdown` tables it (the model card).
"""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass(frozen=True)
class Perplexity:
    """exp(mean next-token NLL) over every predicted token of some windows; `window_nll`: each window's sum."""

    ppl: float
    nll: float
    tokens: int
    window_nll: tuple[float, ...] = ()

    @classmethod
    def of(cls, d: dict | None) -> "Perplexity | None":
        if d is None:
            return None
        return cls(float(d["ppl"]), float(d["nll"]), int(d["tokens"]), tuple(d.get("window_nll") or ()))

    def to_dict(self) -> dict:
        return {"ppl": self.ppl, "nll": self.nll, "tokens": self.tokens, "window_nll": list(self.window_nll)}


@dataclass(frozen=True)
class RatioInterval:
    """A perplexity ratio with its paired bootstrap interval over windows (`evaluation.lm.paired_ratio_interval`)."""

    ratio: float
    low: float
    high: float
    level: float
    windows: int

    @classmethod
    def of(cls, d: dict | None) -> "RatioInterval | None":
        return None if d is None else cls(d["ratio"], d["low"], d["high"], d["level"], d["windows"])

    def to_dict(self) -> dict:
        return {"ratio": self.ratio, "low": self.low, "high": self.high, "level": self.level, "windows": self.windows}


@dataclass(frozen=True)
class Costs:
    """A model's counts (`evaluation.lm.counts`): parameters, KV-cache bytes, FLOPs per token."""

    params_total: int
    params_attention: int
    kv_bytes_per_token: int
    extra: tuple[tuple[str, object], ...] = ()  # the rest of `counts`' entries, kept for the record

    @classmethod
    def of(cls, d: dict | None) -> "Costs | None":
        if d is None or "params_attention" not in d:
            return None
        main = ("params_total", "params_attention", "kv_bytes_per_token")
        return cls(d["params_total"], d["params_attention"], d["kv_bytes_per_token"],
                   tuple((k, v) for k, v in d.items() if k not in main and k not in _PERPLEXITY_KEYS))

    def to_dict(self) -> dict:
        return {"params_total": self.params_total, "params_attention": self.params_attention,
                "kv_bytes_per_token": self.kv_bytes_per_token, **dict(self.extra)}


_PERPLEXITY_KEYS = ("ppl", "nll", "tokens", "window_nll")


@dataclass(frozen=True)
class TextResult:
    """One evaluated text: the original's perplexity, the compressed model's before any fitting (with
    --eval-before), after the layer-local stage (`keep_stages`) and at the end, and the final ratio's interval."""

    name: str
    windows: int
    length: int
    teacher: Perplexity | None = None
    after: Perplexity | None = None
    before: Perplexity | None = None
    after_layerwise: Perplexity | None = None
    interval: RatioInterval | None = None

    @property
    def ratio(self) -> float | None:
        return None if self.after is None or self.teacher is None else self.after.ppl / self.teacher.ppl


@dataclass(frozen=True)
class Timings:
    """Seconds per stage: drawing the fitting text (within planning; None when a calibration was reused),
    planning (calibration included), layer-local fitting, all distillation, the whole run."""

    fit_text: float | None = None
    plan: float | None = None
    layerwise: float | None = None
    distill: float | None = None
    total: float | None = None


@dataclass
class CompressionReport:
    base_model: str
    teacher_dtype: str
    validation: TextResult | None = None  # the corpus's validation windows (None with evaluate=False)
    validation_corpus: str | None = None
    heldout: dict[str, TextResult] = field(default_factory=dict)  # keyed by text, in the order given
    teacher_costs: Costs | None = None
    costs: Costs | None = None
    layerwise: dict | None = None  # the layer-local stage's record (`distill.distill_layerwise`)
    end_to_end: dict | None = None  # the end-to-end stage's record (`distill.distill_end_to_end`)
    timings: Timings = field(default_factory=Timings)
    note: str | None = None

    # -------------------------------------------------------------- the record (headalloc.json's layout)
    def record(self) -> dict:
        out: dict = {"base_model": self.base_model, "teacher_dtype": self.teacher_dtype}
        t = self.timings
        for k in ("plan", "fit_text", "layerwise", "distill", "total"):
            if getattr(t, k) is not None:
                out[f"seconds_{k}"] = getattr(t, k)
        if self.heldout:
            out["heldout"] = {k: _text_record(h) for k, h in self.heldout.items()}
        v = self.validation
        if v is not None and v.before is not None:
            out["before_distill"] = v.before.to_dict()
        if v is not None and v.after_layerwise is not None:
            out["after_layerwise"] = v.after_layerwise.to_dict()
        out["distill"] = self.layerwise
        out["end_to_end"] = self.end_to_end
        if self.note is not None:
            out["note"] = self.note
        if v is not None and v.teacher is not None:
            out["teacher"] = {**v.teacher.to_dict(), **(self.teacher_costs.to_dict() if self.teacher_costs else {})}
            out["after_distill"] = {**v.after.to_dict(), **(self.costs.to_dict() if self.costs else {})}
            out["ratio"] = None if v.interval is None else v.interval.to_dict()
            out["evaluation"] = {"corpus": self.validation_corpus, "split": "validation", "windows": v.windows,
                                 "length": v.length}
        return out

    @classmethod
    def from_record(cls, rec: dict) -> "CompressionReport":
        """The report a saved folder's `headalloc.json` (or `record()`) holds."""
        ev = rec.get("evaluation") or {}
        validation = None
        if rec.get("teacher") is not None:
            validation = TextResult(ev.get("corpus", "?"), ev.get("windows", 0), ev.get("length", 0),
                                    Perplexity.of(rec["teacher"]), Perplexity.of(rec.get("after_distill")),
                                    Perplexity.of(rec.get("before_distill")), Perplexity.of(rec.get("after_layerwise")),
                                    RatioInterval.of(rec.get("ratio")))
        held = rec.get("heldout") or {}
        if "corpus" in held and isinstance(held.get("corpus"), str):  # records before several held-out texts
            held = {held["corpus"]: held}
        return cls(
            base_model=rec.get("base_model", (rec.get("config") or {}).get("model", "unknown")),
            teacher_dtype=rec.get("teacher_dtype", "?"), validation=validation, validation_corpus=ev.get("corpus"),
            heldout={k: TextResult(h.get("corpus", k), h.get("windows", 0), h.get("length", 0),
                                   Perplexity.of(h.get("teacher")), Perplexity.of(h.get("after")),
                                   Perplexity.of(h.get("before")), Perplexity.of(h.get("after_layerwise")),
                                   RatioInterval.of(h.get("ratio"))) for k, h in held.items()},
            teacher_costs=Costs.of(rec.get("teacher")), costs=Costs.of(rec.get("after_distill")),
            layerwise=rec.get("distill"), end_to_end=rec.get("end_to_end"),
            timings=Timings(*(rec.get(f"seconds_{k}") for k in ("fit_text", "plan", "layerwise", "distill", "total"))),
            note=rec.get("note"))

    # -------------------------------------------------------------- the one summary
    def summary_rows(self) -> list[SummaryRow]:
        """One row per evaluated text, then the costs: what every summary of a run shows."""
        rows = []
        texts = ([("validation", self.validation)] if self.validation is not None else []) + \
            [("held-out", h) for h in self.heldout.values()]
        for role, tr in texts:
            if tr.teacher is None or tr.after is None:
                continue
            rows.append(SummaryRow(role, tr.name, tr.windows, tr.length, tr.teacher.ppl,
                                   None if tr.before is None else tr.before.ppl, tr.after.ppl, tr.ratio, tr.interval,
                                   None if tr.after_layerwise is None else tr.after_layerwise.ppl))
        if self.teacher_costs and self.costs:
            rows.append(SummaryRow("cost", "attention parameters", None, None, self.teacher_costs.params_attention,
                                   None, self.costs.params_attention,
                                   self.costs.params_attention / self.teacher_costs.params_attention))
            rows.append(SummaryRow("cost", "KV cache bytes per token", None, None,
                                   self.teacher_costs.kv_bytes_per_token, None, self.costs.kv_bytes_per_token,
                                   self.costs.kv_bytes_per_token / self.teacher_costs.kv_bytes_per_token))
        return rows

    def format_text(self) -> list[str]:
        """The summary as lines of text (the CLI, the benchmarks and the reproduce experiment print these): each
        text's perplexity, original then compressed (before fitting -> after the layer-local stage -> final, as far
        as measured), its ratio and interval; the costs; the time."""
        lines = []
        for r in self.summary_rows():
            if r.role == "cost":
                continue
            before = "".join(f"{x:.2f} -> " for x in (r.before, r.after_layerwise) if x is not None)
            interval = (f", 90% interval over windows {r.interval.low:.2f}-{r.interval.high:.2f}"
                        if r.interval else "")
            what = "perplexity" if r.role == "validation" else f"held-out text '{r.name}' (never fitted on)"
            after = "after distillation " if r.role == "validation" else ""
            lines.append(f"{what}: original {r.original:.2f}, compressed {before}{r.after:.2f} {after}"
                         f"({r.ratio:.2f}x{interval}; {r.windows} "
                         f"{'validation ' if r.role == 'validation' else ''}windows of {r.length})")
        costs = [r for r in self.summary_rows() if r.role == "cost"]
        if costs:
            lines.append(f"attention params {costs[0].ratio:.3f}x, KV cache {costs[1].ratio:.3f}x of the original")
        t = self.timings
        if t.total is not None:
            parts = [f"plan {t.plan:.0f} s" + (f" (of which fitting text {t.fit_text:.0f} s)" if t.fit_text else "")]
            if t.distill is not None:
                parts.append(f"distillation {t.distill:.0f} s" + (f" (layer-local {t.layerwise:.0f} s)"
                                                                  if t.layerwise is not None else ""))
            lines.append(f"time: {t.total / 60:.1f} min: " + ", ".join(parts) + ", the rest evaluation")
        return lines

    def format_markdown(self) -> list[str]:
        """The summary as a Markdown table (the model card)."""
        rows = self.summary_rows()
        if not rows or self.validation is None:
            return []
        v = self.validation
        out = [f"Perplexity on {v.windows} held-out windows of {v.length} tokens of `{v.name}` (validation split, "
               f"never used for fitting):", "",
               "| | original | compressed, before distillation | compressed |", "|---|---|---|---|"]
        for r in rows:
            if r.role == "cost":
                out.append(f"| {r.name} | {r.original:,} | | {r.after:,} ({r.ratio:.3f}x) |")
                continue
            label = "perplexity" if r.role == "validation" else \
                f"perplexity on held-out `{r.name}` (a kind of text never fitted on)"
            before = f"{r.before:.2f}" if r.before is not None else "not measured (`--eval-before`)"
            out.append(f"| {label} | {r.original:.2f} | {before} | {r.after:.2f} |")
        return out


@dataclass(frozen=True)
class SummaryRow:
    role: str  # "validation", "held-out" or "cost"
    name: str
    windows: int | None
    length: int | None
    original: float
    before: float | None
    after: float
    ratio: float
    interval: RatioInterval | None = None
    after_layerwise: float | None = None  # after the layer-local stage alone, when measured (`keep_stages`)


def _text_record(h: TextResult) -> dict:
    d: dict = {"corpus": h.name, "windows": h.windows, "length": h.length}
    for k in ("before", "after_layerwise", "teacher", "after"):
        if getattr(h, k) is not None:
            d[k] = getattr(h, k).to_dict()
    if h.teacher is not None and h.after is not None:
        d["ratio"] = None if h.interval is None else h.interval.to_dict()
    return d
