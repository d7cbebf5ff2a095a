"""The `autocast` setting: 'auto' picks bfloat16 only where the hardware multiplies it, the passes it covers stay
close to float32's, the moments' sums stay float32 inside it, and the value used is recorded and keys the
calibration."""


import pytest
import torch
from families import tiny_folder
from test_compress_api import TINY

import headalloc
from headalloc.compression import precision
from headalloc.compression.calibration import gram


@pytest.mark.parametrize("avx512_bf16,amx,expected", [(False, False, "none"), (True, False, "bfloat16"),
                                                      (False, True, "bfloat16")])
def test_auto_is_bfloat16_only_on_cpus_with_bfloat16_units(monkeypatch, avx512_bf16, amx, expected):
    monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda: avx512_bf16, raising=False)
    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: amx, raising=False)
    assert precision.resolve_autocast("auto", "cpu") == expected
    assert precision.resolve_autocast("auto", torch.device("cpu")) == expected
    for given in ("none", "bfloat16"):  # a value given is kept on any device
        assert precision.resolve_autocast(given, "cpu") == given
    assert precision.resolve_autocast("auto", "meta") == "none"
    with pytest.raises(ValueError, match="autocast must be one of auto, none, bfloat16; got 'float8'"):
        precision.resolve_autocast("float8", "cpu")
    with pytest.raises(ValueError, match="resolved setting"):
        precision.autocast_context("auto", "cpu")


def test_moment_sums_stay_float32_inside_a_bfloat16_pass():
    """The reference is float64; the same product left to autocast (bfloat16) is visibly further off."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(512, 48, generator=g) + 0.5
    ref = x.double().T @ x.double()
    with precision.autocast_context("bfloat16", "cpu"):
        ours = gram(x)
        raw = (x.T @ x).double()
    assert ours.dtype == torch.float64
    assert float((ours - ref).norm() / ref.norm()) < 1e-6
    assert float((raw - ref).norm() / ref.norm()) > 1e-4  # (what gram guards against)


def test_a_bfloat16_calibration_tracks_float32_and_is_its_own(tmp_path):
    """The original's passes over the end-to-end windows under bfloat16 autocast give targets and moments close to
    float32's; the calibration records its precision, is not reused for the other, and `compress` records what
    'auto' was on this machine."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from headalloc.compression.pipeline import kd_targets, prepare
    from headalloc.compression.settings import preset

    folder = tiny_folder("llama", tmp_path / "llama")
    model, tok = AutoModelForCausalLM.from_pretrained(folder).eval(), AutoTokenizer.from_pretrained(folder)
    cfg = preset("default", budget=0.5, strategy="uniform", fit_text="corpus", **{**TINY, "kd_windows": 6},
                 moment_windows=6)
    cals = {ac: prepare(model, tok, cfg.replace(autocast=ac)) for ac in ("none", "bfloat16")}
    assert {ac: c.autocast for ac, c in cals.items()} == {"none": "none", "bfloat16": "bfloat16"}
    t = {ac: kd_targets(model, tok, cfg.replace(autocast=ac), c)[1] for ac, c in cals.items()}
    assert float((t["bfloat16"]["ids"][..., 0] == t["none"]["ids"][..., 0]).float().mean()) > 0.9
    p = {ac: v["probs"][..., 0] * (1 - v["tail"]) for ac, v in t.items()}  # the most likely token's probability
    assert float((p["bfloat16"] - p["none"]).abs().max()) < 0.05
    for a, b in zip(cals["bfloat16"].calibration.second_moment, cals["none"].calibration.second_moment):
        assert float((a - b).norm() / b.norm()) < 2e-2
    assert not torch.equal(t["bfloat16"]["probs"], t["none"]["probs"])  # (the pass did run in bfloat16)
    with pytest.raises(ValueError, match="other fitting text"):
        headalloc.compress(model, tokenizer=tok, config=cfg.replace(autocast="bfloat16"),
                           calibration_data=cals["none"], progress=False)
    r = headalloc.compress(model, tokenizer=tok, config=cfg, progress=False)
    used = precision.resolve_autocast("auto", "cpu")
    assert r.config.runtime.autocast == used and r.report.end_to_end["autocast"] == used
    assert r.record()["config"]["autocast"] == used
