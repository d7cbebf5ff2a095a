"""Every setting of a compression run, in one dataclass: the CLI's flags (with their help and
defaults), the Python API's keyword arguments, the experiments and the benchmark all read it.
Named presets are instances of it (`PRESETS`)."""

from __future__ import annotations

import argparse
from dataclasses import asdict, dataclass, field, fields, replace
from pathlib import Path

from headalloc.compression.targets import TARGETS

DTYPES = ("auto", "float32", "bfloat16", "float16")
# what the end-to-end stage may train, and its mixed precision (`distill.distill_end_to_end` checks against these too)
KD_TRAIN_CHOICES = ("attention", "reduced", "layers")
KD_AUTOCAST_CHOICES = ("none", "bfloat16")
# which windows each end-to-end step takes (`distill.window_order`)
KD_SAMPLING_CHOICES = ("epochs", "replacement")
# the `autocast` setting: the above, or "auto" (`precision.resolve_autocast`: bfloat16 where the hardware has bfloat16
# matrix units)
AUTOCAST_CHOICES = ("auto",) + KD_AUTOCAST_CHOICES
# how the factorised strategies pick among candidate plans (`latent.choose_by_exponent`)
PLAN_SELECT_CHOICES = ("mean", "worst-part")
# what the factorised strategies' error estimates measure (`strategies.candidate_error`, `latent.plan_losses`)
PLAN_ERROR_CHOICES = ("pooled", "leave-part-out")


def _f(default, help: str, group: str, choices=None, cli: bool = True):
    return field(default=default, metadata={"help": help, "group": group, "choices": choices, "cli": cli})


@dataclass
class CompressConfig:
    # what to compress
    model: str = _f("smollm2", "the packaged 'smollm2' or a local Hugging Face folder of a supported family", "model")
    budget: float = _f(0.5, "fraction in (0, 1] of the original attention parameters (or KV-cache bytes)", "plan")
    # "auto" since session 12 (was "measured"): picks by budget kind, target and family (strategies.auto_strategy)
    strategy: str = _f("auto", "where to cut (see `headalloc compress --help` for each; 'auto': the best measured "
                               "for the budget kind, target and family)", "plan")
    budget_kind: str = _f("params", "what the budget counts: attention parameters or KV-cache bytes per token",
                          "plan", ("params", "kv"))
    target: str = _f("any", "where the compressed model will run: 'any' (headalloc's runtime: any per-layer head "
                            "counts and widths) or 'llamacpp' (GGUF for llama.cpp: per-layer head counts only, "
                            "original head width; a layer may lose its attention)", "plan", tuple(TARGETS))
    step: int = _f(8, "candidate widths are multiples of this (even, up to the head dim)", "plan")
    # session 19: "worst-part" measured against the default "mean" at KV 0.25 (docs/compression.md)
    plan_select: str = _f("mean", "how our factorised strategies (measured-latent, measured-lowrank) pick among their "
                                  "candidate plans, each measured on the calibration windows before any fitting: "
                                  "the lowest loss over all windows ('mean'), or the smallest loss increase over the "
                                  "original on the part of the fitting text where it is largest ('worst-part': "
                                  "robust to the kind of text)", "plan", PLAN_SELECT_CHOICES)
    plan_error: str = _f("pooled", "what our measured strategies' estimates (each candidate's layer error; for "
                                   "measured-latent and measured-lowrank also each candidate plan's loss) measure: "
                                   "the reduced layers fitted to the whole fitting "
                                   "text and measured on its calibration windows ('pooled'), or for each part of the "
                                   "fitting text, fitted without that part and measured on its windows "
                                   "('leave-part-out': the error on a kind of text the fit never saw; needs a "
                                   "fitting text of two or more parts)", "plan", PLAN_ERROR_CHOICES)
    # True since session 22 (params 0.5, measured-lowrank, default settings otherwise, seed 0; logs in docs/results):
    # 1.10x / 1.27x / 1.44x -> 1.10x / 1.24x / 1.40x (Wikipedia / alice / pydoc); the quick and reproduce presets keep
    # False (their pinned tables)
    output_groups: bool = _f(True, "measured-lowrank also offers output projections factorised per kv group (a "
                                    "block-diagonal down factor, one block per group of query heads sharing a key, "
                                    "the up factor shared and refitted by least squares); the knapsack picks per "
                                    "layer", "plan")
    # calibration text: planning, calibration and both distillation stages read only its train split
    corpus: str = _f("wiki", "calibration/distillation text: 'wiki', 'pydoc', a text file (documents separated "
                             "by blank lines) or a .jsonl file of {\"text\": ...} documents", "calibration")
    # "mixed" since session 8: at KV budget 0.5 (measured-latent, default settings) it took the long held-out
    # texts from 1.51x / 1.71x (alice / pydoc) to 1.26x / 1.39x for Wikipedia 1.02x -> 1.03x.
    # "corpus+generated+canterbury" since session 14 (default settings, seed 0, logs in docs/results; Wikipedia / alice
    # / pydoc): params 0.5 (measured-lowrank) 1.097x / 1.38x / 1.51x -> 1.12x / 1.29x / 1.46x; KV 0.5
    # (measured-latent) 1.03x / 1.17x / 1.25x. Long books of other kinds than the held-out texts; the quick and
    # reproduce presets keep theirs.
    # None since session 16: by budget kind (BY_BUDGET_KIND); under a KV budget the module sources join it; under
    # params since session 23 a sixth of Moby-Dick takes half the books' share, and since session 24 the module sources
    # the other half.
    fit_text: str | None = _f(None,
                              "text the student is fitted on (planning, both distillation stages): windows of --corpus "
                              "('corpus'), the original model's own samples ('generated'), half of each ('mixed' = "
                              "'corpus+generated'), or shares of any such parts joined by '+', equal or weighted by "
                              "':W', where a part may also name another text (its train split: 'canterbury' long "
                              "books, 'stdlib' Python module sources, 'sotu' State of the Union speeches, 'mobydick' a "
                              "novel, 'npmdocs' npm's documentation, a text file), e.g. "
                              "'corpus:2+generated+canterbury': half Wikipedia, a quarter samples, a quarter long "
                              "books",
                              "calibration")
    gen_temperature: float = _f(1.0, "sampling temperature of the generated fitting text", "calibration")
    # 0 by measurement (session 12, default settings, seed 0; logs in docs/results; Wikipedia / alice / pydoc): at KV
    # 0.5 (measured-latent) 1.04x / 1.24x / 1.35x (8) -> 1.04x / 1.21x / 1.31x (0); at params 0.5 (measured-lowrank,
    # 128 moment windows) 1.10x / 1.45x / 1.62x -> 1.10x / 1.37x / 1.51x. Quick and reproduce presets keep 8.
    gen_prompt: int = _f(0, "tokens of --corpus that start each generated window (0: none, the samples start from "
                         "the tokenizer's BOS token, else its EOS: the model's own unconditional distribution)",
                         "calibration")
    # 64 since session 13 (was 16): about 1.6x the sampled tokens per second on 2 CPU cores; the draws depend on it,
    # so the quick and reproduce presets keep 16 (their pinned tables)
    gen_batch: int = _f(64, "sequences the original samples together for the generated fitting text (the samples "
                            "depend on it; larger is faster where memory allows)", "calibration")
    # None since session 16: by budget kind (BY_BUDGET_KIND): 0.2 under a KV budget, 0 (as measured) under params
    whiten_shrink: float | None = _f(None, "pull the calibration inputs' (and head outputs') second moments toward "
                                           "isotropic by this fraction in [0, 1) before data-aware factorisations (0: "
                                           "as measured)",
                                     "calibration")
    # 300 (every fitting window at the default kd_windows) by measurement (session 12, default settings, seed 0; logs
    # in docs/results): measured-lowrank at params 0.5 1.12x / 1.60x / 1.80x (0) -> 1.10x / 1.45x / 1.62x (128) ->
    # 1.10x / 1.42x / 1.55x (300; Wikipedia / alice / pydoc). The same teacher passes give the top-k targets, so more
    # windows cost only the moment sums. The quick and reproduce presets keep 0 (their pinned tables).
    # 600 since session 15, with kd_windows and kd_steps (see there).
    moment_windows: int = _f(600, "end-to-end fitting windows (at most --kd-windows) whose statistics (layer inputs' "
                                  "and head outputs' second moments) are pooled with the calibration windows' to "
                                  "whiten the factorisations (0: the calibration windows only)", "calibration")
    # "input" by measurement (session 9 runs, measured-lowrank at budget 0.5, default settings; logs in docs/results):
    # 1.12x / 1.60x / 1.80x (Wikipedia / alice / pydoc) against 1.14x / 1.69x / 2.00x with the Fisher weight
    # (session 9's notes had the two swapped, and made "fisher" the default on that; corrected in session 10)
    factor_output: str = _f("input", "how a factorised output projection (rank_o, measured-lowrank) is fitted: to the "
                                     "head outputs' second moment ('input'), with its error also weighted by the "
                                     "loss gradient's covariance at the attention output ('fisher': what the planners' "
                                     "estimate measures), or from the weights alone ('plain' truncated SVD)",
                            "calibration", ("input", "fisher", "plain"))
    calib_windows: int = _f(16, "calibration windows (planning and layer-local fitting)", "calibration")
    calib_length: int = _f(256, "tokens per calibration window", "calibration")
    # layer-local distillation
    distill_steps: int = _f(100, "Adam steps per layer in the layer-local stage (same for every strategy)",
                            "layer-local distillation")
    distill_lr: float = _f(5e-4, "learning rate of the layer-local stage", "layer-local distillation")
    distill_inputs: str = _f("teacher", "layer-local stage on the teacher's inputs (independent layers) or on the "
                                        "student's own, layer after layer (sequential)", "layer-local distillation",
                             ("teacher", "student"))
    # end-to-end distillation: attention projections fitted to the teacher's next-token distributions (top-k)
    kd_steps: int = _f(600, "end-to-end distillation steps after the layer-local stage (0 = skip)",
                       "end-to-end distillation")
    kd_lr: float = _f(3e-4, "peak learning rate of the end-to-end stage", "end-to-end distillation")
    # distinct windows, about one per step: 300 steps over 32 windows overfit them (1.32x -> 1.36x), over
    # 300 windows they gave 1.19x (100 steps over 128: 1.23x); one budget stays under 20 min on 2 cores.
    # 600 steps over 600 windows (their statistics too) since session 15 (seed 0, logs in docs/results; Wikipedia /
    # alice / pydoc at budget 0.5): params (measured-lowrank) 1.12x / 1.29x / 1.46x -> 1.10x / 1.27x / 1.44x, KV
    # (measured-latent) 1.03x / 1.17x / 1.25x -> 1.03x / 1.15x / 1.23x.
    kd_windows: int = _f(600, "distinct training windows for the end-to-end stage", "end-to-end distillation")
    # "epochs" since session 26 (was "replacement", which at 600 steps over 600 windows fitted about 367 of them):
    # params 0.5, measured-lowrank, the same plan and starting point, one thread, two runs side by side, on seed 0's
    # evaluation windows (Wikipedia / alice / pydoc): seed 0 1.10x / 1.18x / 1.23x -> 1.10x / 1.17x / 1.20x, seed 1
    # 1.11x / 1.20x / 1.28x -> 1.10x / 1.19x / 1.25x (docs/compression.md, session 26). The quick and reproduce
    # presets keep "replacement" (their pinned tables)
    kd_sampling: str = _f("epochs", "which windows each end-to-end step takes: every window once per pass, each "
                                         "pass in a new random order ('epochs'), or each step's drawn independently "
                                         "('replacement': at one window per step over as many steps as windows, "
                                         "about a third of them, and their teacher passes, go unused)",
                          "end-to-end distillation", KD_SAMPLING_CHOICES)
    kd_length: int = _f(256, "tokens per end-to-end window", "end-to-end distillation")
    kd_batch: int = _f(1, "windows per end-to-end step", "end-to-end distillation")
    kd_topk: int = _f(32, "teacher probabilities kept per position (top k); 0 = the full-vocabulary KL, the "
                          "teacher run beside the student at every step (no stored targets)",
                      "end-to-end distillation")
    kd_tail: bool = _f(True, "keep the teacher's mass outside its top k as one extra bucket (off: renormalised "
                             "top k)", "end-to-end distillation")
    kd_train: str = _f("attention", "what the end-to-end stage trains: every attention projection, only the "
                                    "attention weights the plan changed ('reduced': e.g. a latent layer's key/value "
                                    "factors, not its untouched query and output projections), or every "
                                    "decoder-layer weight", "end-to-end distillation", KD_TRAIN_CHOICES)
    kd_hidden: float = _f(0.0, "weight of a term matching every layer's hidden states (0 = off; costs a teacher "
                               "forward per step)", "end-to-end distillation")
    kd_anchor: float = _f(0.0, "weight of a penalty keeping the attention weights near their initialisation "
                                "(sum of |w - w0|^2 / |w0|^2; 0 = off)", "end-to-end distillation")
    kd_label: float = _f(0.0, "weight of the cross-entropy of the fitting windows' own next tokens (hard labels), "
                              "added to the distillation loss (0 = off: the teacher's distribution only)",
                         "end-to-end distillation")
    kd_ema: float = _f(0.0, "decay of an exponential moving average of the trained weights, which the student "
                            "keeps at the end (e.g. 0.99: about the last 100 steps averaged; 0 = off: the last "
                            "step's weights)", "end-to-end distillation")
    # evaluation
    eval_windows: int = _f(16, "validation windows for perplexity (never used for fitting)", "evaluation")
    eval_length: int = _f(512, "tokens per validation window", "evaluation")
    heldout: str | None = _f("alice,pydoc", "kinds of text that nothing is fitted on, evaluated too, comma-separated "
                                            "('alice': a long narrative, Alice's Adventures in Wonderland; 'pydoc': "
                                            "CPython's language reference, long technical documents with code; a text "
                                            "or .jsonl file; 'none' to skip)", "evaluation")
    heldout_windows: int = _f(12, "windows of each --heldout text (length --eval-length)", "evaluation")
    # off since session 14 (was always measured): about 70 s of a default run on 2 CPU cores; the quick and
    # reproduce presets and benchmarks/bench_compress.py keep it on (their tables show it)
    eval_before: bool = _f(False, "also measure the compressed model's perplexity before any fitting, on every "
                                  "evaluated text (a diagnostic of the plan alone)", "evaluation")
    seed: int = _f(0, "seed of every random draw (windows, fitting order)", "runtime")
    eval_seed: int | None = _f(None, "seed of the evaluation windows alone (validation and held-out; default: --seed). "
                                     "Fits at several --seed with one --eval-seed are measured on the same windows, "
                                     "so their spread is the fit's, not the measurement's", "evaluation")
    # where and in what precision
    dtype: str = _f("auto", "dtype the original is loaded in ('auto': the checkpoint's)", "runtime", DTYPES)
    fit_dtype: str = _f("float32", "dtype the student is fitted in (master weights)", "runtime", DTYPES[1:])
    save_dtype: str | None = _f(None, "dtype of the saved weights (default: the original's)", "runtime", DTYPES[1:])
    # "auto" since session 24 (was float32 throughout, the flag `kd_autocast` covering only the end-to-end stage):
    # the fitting's two heaviest parts, the original's passes over the end-to-end windows and the end-to-end stage,
    # in bfloat16 where the hardware has bfloat16 matrix units (docs/compression.md, session 24)
    autocast: str = _f("auto", "mixed precision of the fitting's heavy passes: the original's forward passes over "
                               "the end-to-end fitting windows (their top-k targets and the whitening statistics) "
                               "and the end-to-end stage's student forward and backward run under torch.autocast in "
                               "bfloat16; the trained weights, the optimiser's state, the plan's error estimates, the "
                               "layer-local stage and every evaluation stay in their own dtype. 'auto': bfloat16 "
                               "where the device has bfloat16 matrix units (a CUDA GPU that supports bfloat16, a CPU "
                               "with AVX512-BF16 or AMX), else 'none'; the value used is recorded", "runtime",
                       AUTOCAST_CHOICES)
    device: str | None = _f(None, "device for the original and the student, e.g. 'cuda' (default: CPU, or as "
                                  "--device-map places it)", "runtime")
    device_map: str | None = _f(None, "accelerate placement of the original, e.g. 'auto' (models larger than one "
                                      "device)", "runtime")

    def to_dict(self) -> dict:
        return asdict(self.resolved())

    def resolved(self) -> "CompressConfig":
        """A copy with every setting left to the budget kind (None) filled in from `BY_BUDGET_KIND`."""
        by_kind = BY_BUDGET_KIND.get(self.budget_kind)
        if by_kind is None:
            raise ValueError(f"budget_kind must be one of {', '.join(BY_BUDGET_KIND)}; got {self.budget_kind!r}")
        missing = {k: v for k, v in by_kind.items() if getattr(self, k) is None}
        return replace(self, **missing) if missing else self

    def __post_init__(self):
        if isinstance(self.heldout, str) and self.heldout.strip().lower() in ("none", ""):
            self.heldout = None

    @property
    def fit_parts(self) -> list[str]:
        """The fitting text's parts: 'corpus', 'generated' or a text's name (see `fit_shares` for their weights)."""
        return [p for p, _ in self.fit_shares]

    @property
    def fit_shares(self) -> list[tuple[str, int]]:
        """(part, weight) of the fitting text: 'a+b:2' is a with weight 1, b with 2 ('mixed' = 'corpus+generated')."""
        from headalloc.assets.corpus import KNOWN

        text = self.resolved().fit_text
        out = []
        for item in (["corpus", "generated"] if text == "mixed" else str(text).split("+")):
            p, _, w = item.strip().rpartition(":") if ":" in item else (item.strip(), "", "1")
            p = p.strip()
            if not p or (p not in ("corpus", "generated", *KNOWN) and not Path(p).expanduser().is_file()):
                raise ValueError(f"fit_text {self.fit_text!r}: part {p!r} is none of 'corpus', 'generated', a known "
                                 f"text ({', '.join(KNOWN)}) or an existing text file; e.g. 'mixed', "
                                 f"'corpus+generated+canterbury', 'corpus:2+generated+canterbury'")
            if not w.strip().isdigit() or int(w) < 1:
                raise ValueError(f"fit_text {self.fit_text!r}: the weight of part {p!r} must be a whole number >= 1; "
                                 f"got {w!r}")
            out.append((p, int(w)))
        if len({p for p, _ in out}) != len(out):
            raise ValueError(f"fit_text {self.fit_text!r} names a part twice")
        return out

    @property
    def fit_texts(self) -> list[str]:
        """The parts of the fitting text that name a text of their own (not 'corpus' or 'generated')."""
        return [p for p in self.fit_parts if p not in ("corpus", "generated")]

    @property
    def measure_seed(self) -> int:
        """The seed the evaluation windows are drawn with (`eval_seed`, else `seed`)."""
        return self.seed if self.eval_seed is None else self.eval_seed

    @property
    def heldout_kinds(self) -> list[str]:
        """The held-out texts, in the order given."""
        return [k.strip() for k in self.heldout.split(",") if k.strip()] if self.heldout else []

    def validate(self) -> "CompressConfig":
        """Clear errors for impossible settings, before any work; returns the settings `resolved` (every default
        that depends on the budget kind filled in)."""
        from headalloc.compression.strategies import check_budget

        self = self.resolved()

        check_budget(self.budget, self.strategy, self.budget_kind)
        for name in ("calib_windows", "calib_length", "kd_windows", "kd_length", "kd_batch", "gen_batch",
                     "eval_windows", "eval_length", "step"):
            if int(getattr(self, name)) < 1:
                raise ValueError(f"{name} must be >= 1; got {getattr(self, name)}")
        for name in ("seed", "eval_seed"):
            if getattr(self, name) is not None and int(getattr(self, name)) < 0:
                raise ValueError(f"{name} must be >= 0 (a numpy seed); got {getattr(self, name)}")
        if self.kd_topk < 0:
            raise ValueError(f"kd_topk must be >= 1, or 0 for the full-vocabulary KL; got {self.kd_topk}")
        if self.step % 2:
            raise ValueError(f"step must be even (query-key widths are whole rotary pairs); got {self.step}")
        for name in ("distill_steps", "kd_steps"):
            if int(getattr(self, name)) < 0:
                raise ValueError(f"{name} must be >= 0 (0 skips the stage); got {getattr(self, name)}")
        for name in ("distill_lr", "kd_lr"):
            if not float(getattr(self, name)) > 0:
                raise ValueError(f"{name} must be > 0; got {getattr(self, name)}")
        kinds = self.heldout_kinds
        for p in self.fit_texts:  # (also checks the spelling of every part)
            if p in kinds:
                raise ValueError(f"heldout {self.heldout!r} includes {p!r}, which fit_text {self.fit_text!r} fits on; "
                                 f"held-out text must be a kind nothing is fitted on (drop it from one of the two)")
        if self.corpus in kinds:
            raise ValueError(f"heldout {self.heldout!r} includes the fitting corpus {self.corpus!r}; held-out text must be "
                             f"a kind nothing is fitted on (drop it from --heldout, or 'none')")
        if len(set(kinds)) != len(kinds):
            raise ValueError(f"heldout {self.heldout!r} names a text twice")
        if not self.gen_temperature > 0 or self.gen_prompt < 0:
            raise ValueError(f"gen_temperature must be > 0 and gen_prompt >= 0 (0: unconditional samples); got "
                             f"{self.gen_temperature}, {self.gen_prompt}")
        if self.moment_windows < 0:
            raise ValueError(f"moment_windows must be >= 0 (0: the calibration windows only); got {self.moment_windows}")
        if self.plan_error not in PLAN_ERROR_CHOICES:
            raise ValueError(f"plan_error must be one of {', '.join(PLAN_ERROR_CHOICES)}; got {self.plan_error!r}")
        if self.plan_error == "leave-part-out" and (len(self.fit_parts) < 2 or not self.moment_windows):
            raise ValueError(f"plan_error 'leave-part-out' fits without each part of the fitting text in turn, so it "
                             f"needs a fitting text of two or more parts and moment_windows >= 1; got fit_text "
                             f"{self.fit_text!r}, moment_windows {self.moment_windows} (e.g. fit_text "
                             f"'corpus+generated+canterbury')")
        if not 0 <= self.whiten_shrink < 1:
            raise ValueError(f"whiten_shrink must be in [0, 1); got {self.whiten_shrink}")
        if not 0 <= self.kd_ema < 1:
            raise ValueError(f"kd_ema must be in [0, 1) (a decay per step; 0 = off); got {self.kd_ema}")
        if self.kd_hidden < 0 or self.kd_anchor < 0 or self.kd_label < 0:
            raise ValueError(f"kd_hidden, kd_anchor and kd_label must be >= 0; got {self.kd_hidden}, {self.kd_anchor}, "
                             f"{self.kd_label}")
        if self.eval_length < 2:
            raise ValueError(f"eval_length must be >= 2 tokens (perplexity predicts the next token); got "
                             f"{self.eval_length}")
        for f in fields(self):
            ch = f.metadata.get("choices")
            v = getattr(self, f.name)
            if ch and v is not None and v not in ch:
                raise ValueError(f"{f.name} must be one of {', '.join(ch)}; got {v!r}")
        return self


# Defaults that depend on what the budget counts (a field left None takes its kind's value; see `resolved`), by
# measurement at budget 0.5, default settings otherwise (session 16, seed 0, logs in docs/results; Wikipedia / alice /
# pydoc ratios to the original):
# - kv (measured-latent): 'corpus+generated+canterbury' 1.03x / 1.15x / 1.23x; --whiten-shrink 0.2 1.03x / 1.13x /
#   1.22x; both and 'stdlib' (Python module sources) in the fitting text 1.05x / 1.13x / 1.11x.
# - params (measured-lowrank): the module sources (a sixth) take pydoc 1.44x -> 1.26x but Wikipedia 1.10x -> 1.12x and
#   alice 1.27x -> 1.29x; with shrink 0.2 too, Wikipedia 1.14x. Neither is the default there.
# - params, session 23 (measured-lowrank, output groups): a sixth of Moby-Dick in place of half the Canterbury books
#   ('corpus:2+generated:2+canterbury+mobydick': the same Wikipedia and sampled windows) 1.10x / 1.24x / 1.40x ->
#   1.09x / 1.19x / 1.45x; the novel in place of all of them ('...+mobydick:2') 1.09x / 1.18x / 1.44x. The broader
#   mix is the default (an unseen text is better served by more kinds of long writing than by one book).
# - params, session 24 (the same, bfloat16 autocast, two runs side by side at one thread): the Python module sources in
#   place of the books ('corpus:2+generated:2+mobydick+stdlib') 1.10x / 1.21x / 1.49x -> 1.10x / 1.18x / 1.23x.
# - params, session 28 (every window once; seeds 0 / 1 / 2 on seed 0's evaluation windows, then on whole texts): npm's
#   documentation as a seventh ('...+npmdocs'; a technical manual about another tool) takes the whole of pydoc 1.208x /
#   1.239x / 1.206x -> 1.177x / 1.195x / 1.190x, the worst never-used text at each seed from 1.208x / 1.239x / 1.206x
#   to 1.184x / 1.195x / 1.191x, while alice, canterbury, sotu and 64 Wikipedia windows move -0.2 to +2.3 % (all within
#   1.20x / 1.10x; docs/compression.md).
BY_BUDGET_KIND: dict[str, dict] = {
    "params": {"fit_text": "corpus:2+generated:2+mobydick+stdlib+npmdocs", "whiten_shrink": 0.0},
    "kv": {"fit_text": "corpus+generated+canterbury+stdlib", "whiten_shrink": 0.2},
}

_QUICK = dict(calib_windows=6, calib_length=256, distill_steps=30, eval_windows=6, eval_length=256, step=16,
              kd_steps=20, kd_windows=8, heldout_windows=6, moment_windows=0, gen_prompt=8, gen_batch=16,
              eval_before=True, fit_text="mixed", whiten_shrink=0.0, output_groups=False, autocast="none",
              kd_sampling="replacement")
PRESETS: dict[str, CompressConfig] = {
    "default": CompressConfig(),
    "quick": replace(CompressConfig(), **_QUICK),
    # (both keep float32 throughout, autocast "none": their pinned tables were made so on any machine)
    # the settings the documented reproduce table was made with (lighter than the default so that its
    # 12 cells fit in about 1.5 h on 2 cores)
    "reproduce": replace(CompressConfig(), kd_steps=100, kd_windows=128, kd_tail=False, fit_text="corpus",
                         whiten_shrink=0.0, moment_windows=0, gen_prompt=8, gen_batch=16, eval_before=True,
                         output_groups=False, autocast="none", kd_sampling="replacement"),
}


def preset(name: str, **overrides) -> CompressConfig:
    if name not in PRESETS:
        raise ValueError(f"unknown preset {name!r}; choose one of {', '.join(PRESETS)}")
    return replace(PRESETS[name], **overrides)


# ------------------------------------------------------------------ CLI derived from the dataclass
def _parse_type(f):
    t = f.type if isinstance(f.type, str) else getattr(f.type, "__name__", str(f.type))
    if "bool" in t:
        return bool
    if "float" in t:
        return float
    if "int" in t:
        return int
    return str


def add_config_args(parser: argparse.ArgumentParser, exclude: tuple[str, ...] = (),
                    choices: dict[str, list[str]] | None = None) -> None:
    """One flag per CompressConfig field (`kd_steps` -> `--kd-steps`), in argument groups, with the
    default and the quick preset's value in the help. Every flag defaults to None ("not given"), so
    `config_from_args` can layer given flags over a preset."""
    quick = PRESETS["quick"]
    groups: dict[str, argparse._ArgumentGroup] = {}
    for f in fields(CompressConfig):
        if f.name in exclude or not f.metadata.get("cli", True):
            continue
        grp = f.metadata["group"]
        if grp not in groups:
            groups[grp] = parser.add_argument_group(grp)
        default, q = f.default, getattr(quick, f.name)
        shown = default if default is not None or f.name not in BY_BUDGET_KIND["params"] else \
            "by budget kind: " + ", ".join(f"{k} {v[f.name]!r}" for k, v in BY_BUDGET_KIND.items())
        help_ = f"{f.metadata['help']} (default: {shown}" + (f"; --quick: {q}" if q != default else "") + ")"
        flag = "--" + f.name.replace("_", "-")
        ch = (choices or {}).get(f.name) or f.metadata.get("choices")
        typ = _parse_type(f)
        if typ is bool:
            groups[grp].add_argument(flag, dest=f.name, action=argparse.BooleanOptionalAction, default=None, help=help_)
        else:
            groups[grp].add_argument(flag, dest=f.name, type=typ, default=None, choices=ch, help=help_,
                                     metavar=None if ch else f.name.split("_")[-1].upper())


def config_from_args(args: argparse.Namespace, base: CompressConfig | None = None) -> CompressConfig:
    """`base` (default: the preset named by args.preset, or --quick, or "default") with every given flag."""
    if base is None:
        name = getattr(args, "preset", None) or ("quick" if getattr(args, "quick", False) else "default")
        base = preset(name)
    given = {f.name: getattr(args, f.name) for f in fields(CompressConfig)
             if getattr(args, f.name, None) is not None}
    return replace(base, **given)
