"""Saving a compressed model so that it travels: a folder that loads with

    AutoModelForCausalLM.from_pretrained(folder, trust_remote_code=True)

in any process (headalloc not needed: the folder carries `modeling_headalloc.py` and `auto_map`), with
its tokenizer (machine-local keys removed), a model card (README.md) and `headalloc.json` (the full
record). Written atomically; an existing folder is replaced only when it was written by headalloc
and overwriting was asked for; nothing else is ever deleted.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import torch

from headalloc.compression import modeling_headalloc

MARKER = "headalloc.json"
AUTO_MAP = {"AutoConfig": "modeling_headalloc.HeadallocConfig",
            "AutoModelForCausalLM": "modeling_headalloc.HeadallocForCausalLM"}
LOCAL_TOKENIZER_KEYS = ("is_local", "local_files_only", "name_or_path", "_name_or_path", "cache_dir")


def check_output(out: str | os.PathLike, overwrite: bool = False) -> Path:
    """Fail before any work if `out` cannot take a saved model: an existing file, a non-empty folder
    that headalloc did not write (never touched), one it did write without `overwrite`, or a place
    that is not writable."""
    out = Path(out).expanduser()
    if out.exists() and not out.is_dir():
        raise ValueError(f"--out {out} is an existing file; give a folder path")
    if out.is_dir() and any(out.iterdir()):
        if not (out / MARKER).exists():
            raise ValueError(f"--out {out} is a non-empty folder that headalloc did not write; it is left untouched. "
                             f"Choose a new folder (or empty this one yourself)")
        if not overwrite:
            raise ValueError(f"--out {out} already holds a compressed model; pass --overwrite to replace it "
                             f"(or choose a new folder)")
    import tempfile

    try:  # a real probe (permissions alone say nothing for root or for /proc-like places)
        out.parent.mkdir(parents=True, exist_ok=True)
        tempfile.TemporaryDirectory(dir=out.parent, prefix=f".{out.name}.probe-").cleanup()
    except OSError as e:
        raise ValueError(f"--out {out}: cannot write in {out.parent} ({e.strerror or e}); choose a folder you can "
                         f"write to") from None
    return out


def _clean_tokenizer_files(folder: Path) -> None:
    p = folder / "tokenizer_config.json"
    if p.exists():
        d = json.loads(p.read_text(encoding="utf-8"))
        for k in LOCAL_TOKENIZER_KEYS:
            d.pop(k, None)
        p.write_text(json.dumps(d, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")


def model_card(record: dict) -> str:
    """README.md for the saved folder: base model, the plan, measured perplexity and KV size, the command."""
    from headalloc.compression.report import CompressionReport

    cfg = record.get("config", {})
    plan = record.get("plan", {})
    base = record.get("base_model", cfg.get("model", "unknown"))
    lines = ["---", f"base_model: {base}", "library_name: transformers", "tags:", "- headalloc",
             "- attention-compression", "---", "",
             f"# {Path(str(base)).name}, attention compressed by headalloc", "",
             f"Strategy **{plan.get('strategy')}**"
             + (" (picked by `auto`)" if plan.get("picked_by") == "auto" else "")
             + f" at {plan.get('budget_kind')} budget **{plan.get('budget')}** "
             f"of the original attention" + (f", for the `{plan['target']}` runtime" if plan.get("target", "any") != "any"
                                             else "") + ".", "",
             "```python", "from transformers import AutoModelForCausalLM, AutoTokenizer",
             "model = AutoModelForCausalLM.from_pretrained(folder, trust_remote_code=True)",
             "tokenizer = AutoTokenizer.from_pretrained(folder)", "```", ""]
    measured = CompressionReport.from_record(record).format_markdown()
    if measured:
        lines += ["## Measured", "", *measured, ""]
    if plan.get("layers"):
        lines += ["## Plan (per layer)", "", "| layer | kv heads kept | query heads per kv head | qk width | v width | "
                  "query / output projection rank |", "|---|---|---|---|---|---|"]
        for i, lp in enumerate(plan["layers"]):
            kv = "all" if lp.get("keep_kv") is None else (str(lp["keep_kv"]) if lp["keep_kv"] else "none: no attention")
            rep = "all" if lp.get("keep_rep") is None else str(lp["keep_rep"])
            if lp.get("kind") == "palu":
                kv += f" (latent keys rank {lp['rank_k']}, values rank {lp['rank_v']})"
            elif lp.get("kind") == "mla":
                kv += f" (MLA: {lp['rope_keep']} rotary pairs per kv head + joint latent rank {lp['rank']})"
            fact = " / ".join(str(lp.get(k) or "dense") for k in ("rank_q", "rank_o"))
            lines.append(f"| {i} | {kv} | {rep} | {lp['qk_dim']} | {lp['v_dim']} | {fact} |")
        lines.append("")
    if plan.get("target") == "llamacpp":
        lines += ["## llama.cpp", "", "Every layer keeps the original head width, so llama.cpp runs this model "
                  "(GGUF architecture `deci`, per-layer head counts):", "", "```console",
                  "headalloc export-gguf FOLDER model.gguf --outtype f16", "```", ""]
    if record.get("command"):
        lines += ["## Made with", "", "```console", record["command"], "```", ""]
    lines += ["Settings, distillation records and timings: `headalloc.json`.", ""]
    return "\n".join(lines)


def save_compressed(model, tokenizer, out: str | os.PathLike, record: dict | None = None, overwrite: bool = False,
                    dtype: torch.dtype | None = None) -> Path:
    """Write the folder (see the module docstring); returns its path."""
    from headalloc.io import atomic_directory

    out = check_output(out, overwrite)
    record = dict(record or {})
    if dtype is not None and next(model.parameters()).dtype != dtype:
        import copy

        from headalloc.compression.reduce import cast_parameters

        model = cast_parameters(copy.deepcopy(model), dtype)  # the in-memory model keeps its dtype
    with atomic_directory(out, replace=True) as tmp:
        model.config.auto_map = dict(AUTO_MAP)
        model.save_pretrained(tmp, safe_serialization=True)
        shutil.copyfile(modeling_headalloc.__file__, tmp / "modeling_headalloc.py")
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
            _clean_tokenizer_files(tmp)
        (tmp / "README.md").write_text(model_card(record), encoding="utf-8")
        (tmp / MARKER).write_text(json.dumps(record, indent=1, default=str), encoding="utf-8")
    return out
