"""Mixed precision for the fitting's heavy passes (the `autocast` setting): which devices run bfloat16 matrix
products fast, and the context the teacher's passes and the end-to-end stage run in."""

from __future__ import annotations

import contextlib

import torch

from headalloc.compression.settings import AUTOCAST_CHOICES


def fast_bfloat16(device: torch.device | str) -> bool:
    """Whether `device` multiplies bfloat16 matrices in hardware: a CUDA GPU that supports bfloat16, or a CPU with
    AVX512-BF16 or AMX tiles (elsewhere, e.g. a CPU with AVX2 only, PyTorch emulates bfloat16 and it is slower than
    float32)."""
    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.is_available() and torch.cuda.is_bf16_supported()
    if device.type == "cpu":
        cpu = torch.cpu
        return any(getattr(cpu, name, lambda: False)() for name in ("_is_avx512_bf16_supported",
                                                                    "_is_amx_tile_supported"))
    return False


def resolve_autocast(setting: str, device: torch.device | str) -> str:
    """The `autocast` setting as used on `device`: 'none' or 'bfloat16' ('auto': bfloat16 where `fast_bfloat16`)."""
    if setting not in AUTOCAST_CHOICES:
        raise ValueError(f"autocast must be one of {', '.join(AUTOCAST_CHOICES)}; got {setting!r}")
    if setting == "auto":
        return "bfloat16" if fast_bfloat16(device) else "none"
    return setting


def model_device(model) -> torch.device:
    from headalloc.compression.families import adapter_for

    return adapter_for(model).embed(model).weight.device


def autocast_context(setting: str, device: torch.device | str):
    """torch.autocast in bfloat16 on `device` for a resolved setting 'bfloat16'; a no-op context for 'none'."""
    if setting not in ("none", "bfloat16"):
        raise ValueError(f"autocast_context needs a resolved setting ('none' or 'bfloat16'; see resolve_autocast); "
                         f"got {setting!r}")
    if setting == "none":
        return contextlib.nullcontext()
    return torch.autocast(torch.device(device).type, dtype=torch.bfloat16)
