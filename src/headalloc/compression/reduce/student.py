"""The student model: attention layers built from reduced weights, every other weight copied from the teacher."""

from __future__ import annotations

import torch

from headalloc.compression.calibration import Calibration
from headalloc.compression.families import AttentionWeights, adapter_for
from headalloc.compression.modeling_headalloc import HeadallocConfig, HeadallocForCausalLM, make_attention
from headalloc.compression.reduce.geometry import Geometry
from headalloc.compression.reduce.layer import reduce_layer
from headalloc.compression.reduce.moments import FactorInputs
from headalloc.compression.spec import HeadSpec, LayerPlan, Plan


def _state(w: AttentionWeights) -> dict:
    sd = _dense_state(w)
    for name, down in (("q_proj", w.q_down), ("o_proj", w.o_down)):  # factorised: down then up (bias on up)
        if down is not None:
            sd[f"{name}.up.weight"] = sd.pop(f"{name}.weight")
            if f"{name}.bias" in sd:
                sd[f"{name}.up.bias"] = sd.pop(f"{name}.bias")
            sd[f"{name}.down.weight"] = down
    return sd


def _dense_state(w: AttentionWeights) -> dict:
    if w.kv_down is not None:  # MHA2MLA-style
        sd = {"q_proj.weight": w.q, "k_rope.weight": w.k_rope, "kv_down.weight": w.kv_down, "k_up.weight": w.k,
              "v_up.weight": w.v, "o_proj.weight": w.o}
        for name, t in (("q_proj.bias", w.q_bias), ("k_rope.bias", w.k_rope_bias), ("k_up.bias", w.k_bias),
                        ("v_up.bias", w.v_bias), ("o_proj.bias", w.o_bias)):
            if t is not None:
                sd[name] = t
        return sd
    if w.q.numel() == 0:  # a layer without attention has no weights
        return {}
    if w.k_down is not None:  # latent keys and values
        sd = {"q_proj.weight": w.q, "k_down.weight": w.k_down, "k_up.weight": w.k, "v_down.weight": w.v_down,
              "v_up.weight": w.v, "o_proj.weight": w.o}
        for name, t in (("q_proj.bias", w.q_bias), ("k_up.bias", w.k_bias), ("v_up.bias", w.v_bias),
                        ("o_proj.bias", w.o_bias)):
            if t is not None:
                sd[name] = t
        return sd
    sd = {"q_proj.weight": w.q, "k_proj.weight": w.k, "v_proj.weight": w.v, "o_proj.weight": w.o}
    for name, t in (("q_proj.bias", w.q_bias), ("k_proj.bias", w.k_bias), ("v_proj.bias", w.v_bias),
                    ("o_proj.bias", w.o_bias), ("q_norm.weight", w.q_norm), ("k_norm.weight", w.k_norm)):
        if t is not None:
            sd[name] = t
    return sd


@torch.no_grad()
def attention_module(text_config, spec: HeadSpec, w: AttentionWeights, layer_idx: int = 0,
                     device=None, dtype=None) -> torch.nn.Module:
    """The student attention layer (the module the saved model runs) holding weights `w`."""
    with torch.device("meta"):
        m = make_attention(text_config, spec.to_dict(), layer_idx)
    sd = {k: v.to(device=device or v.device, dtype=dtype or v.dtype) for k, v in _state(w).items()}
    m.load_state_dict(sd, assign=True, strict=True)
    return m


@torch.no_grad()
def build_student(teacher, specs: list[HeadSpec], weights: list[AttentionWeights], plan_info: dict | None = None,
                  dtype: torch.dtype | None = None) -> HeadallocForCausalLM:
    """A HeadallocForCausalLM whose attention layers are `specs`/`weights` and whose every other weight is
    the teacher's (copied), on the teacher's device, in `dtype` (default: the teacher's)."""
    ad = adapter_for(teacher)
    param = next(teacher.parameters())
    dtype = dtype or param.dtype
    cfg = HeadallocConfig(text_config=teacher.config.to_dict(), attn_layers=[s.to_dict() for s in specs],
                          headalloc_plan=plan_info)
    cfg.architectures = ["HeadallocForCausalLM"]
    with torch.device("meta"):
        student = HeadallocForCausalLM(cfg)
    key = ad.attention_key()
    sd = {k: v for k, v in teacher.state_dict().items() if key not in k}
    for i, w in enumerate(weights):
        sd.update({f"model.layers.{i}.self_attn.{k}": v for k, v in _state(w).items()})
    # a fresh copy of every tensor, on the teacher's device (or each layer's, under a device map)
    dev_of = {n: p.device for n, p in teacher.named_parameters()}
    sd = {k: v.detach().to(device=dev_of.get(k, param.device), dtype=dtype, copy=True) for k, v in sd.items()}
    if cfg.tie_word_embeddings:
        sd.pop("lm_head.weight", None)
    missing, unexpected = student.load_state_dict(sd, strict=False, assign=True)
    missing = [m for m in missing if not (cfg.tie_word_embeddings and m == "lm_head.weight")]
    if missing or unexpected:
        raise RuntimeError(f"student and teacher weights do not line up: missing {missing[:5]}, unexpected "
                           f"{unexpected[:5]}")
    for name, buf in teacher.named_buffers():  # rotary inverse frequencies etc. (not in the state dict)
        try:
            tgt = student.get_buffer(name)
        except AttributeError:
            continue
        if tgt.is_meta:
            mod, _, attr = name.rpartition(".")
            student.get_submodule(mod).register_buffer(attr, buf.detach().clone(), persistent=False)
    if cfg.tie_word_embeddings:
        student.lm_head.weight = student.model.embed_tokens.weight
    for name, p in list(student.named_parameters()) + list(student.named_buffers()):
        if p.is_meta:
            raise RuntimeError(f"student tensor {name} was not initialised from the teacher")
    student.config.text_config._attn_implementation = teacher.config._attn_implementation
    if getattr(teacher, "hf_device_map", None):  # the same placement as the teacher, with accelerate's hooks
        from accelerate import dispatch_model

        student = dispatch_model(student, device_map=teacher.hf_device_map)
    return student.eval()


@torch.no_grad()
def compress_model(teacher, plan: Plan | list[LayerPlan], calibration: Calibration | None = None,
                   dtype: torch.dtype | None = None, factor: FactorInputs | None = None) -> HeadallocForCausalLM:
    """The student that `plan` gives, initialised from `teacher` (data-aware with a calibration). `factor`: what
    factorised output projections are fitted to (`moments.factor_inputs`; default: the calibration's head outputs,
    factor_output 'input')."""
    from headalloc.compression.reduce.moments import factor_inputs

    ad = adapter_for(teacher)
    g = Geometry.of(teacher)
    layers = list(plan)
    if len(layers) != g.n_layers:
        raise ValueError(f"plan has {len(layers)} layers; the model has {g.n_layers}")
    if factor is None and any(lp.rank_o for lp in layers):
        factor = factor_inputs(teacher, calibration)
    specs, weights = [], []
    for i, lp in enumerate(layers):
        M = None if calibration is None else calibration.second_moment[i]
        s, w = reduce_layer(ad.weights(teacher, i), M, lp, g, i, **(factor.for_layer(i) if lp.rank_o else {}))
        specs.append(s)
        weights.append(w)
    info = plan.to_dict(with_info=False) if isinstance(plan, Plan) else {"layers": [lp.to_dict() for lp in layers]}
    return build_student(teacher, specs, weights, info, dtype)


@torch.no_grad()
def cast_parameters(model, dtype: torch.dtype):
    """Parameters to `dtype`, buffers untouched (rotary inverse frequencies stay float32, as transformers
    keeps them when it loads a model in a lower precision)."""
    for p in model.parameters():
        if p.is_floating_point() and p.dtype != dtype:
            p.data = p.data.to(dtype)
    return model


def identity_plan(model) -> Plan:
    g = Geometry.of(model)
    return Plan([g.full() for _ in range(g.n_layers)], "identity", 1.0)


def student_specs(model) -> list[HeadSpec]:
    """Per-layer head specs of any supported model: a student's own, or a teacher's full shape."""
    if getattr(model.config, "model_type", None) == "headalloc":
        return [HeadSpec.from_dict(a) for a in model.config.attn_layers]
    g = Geometry.of(model)
    return [g.spec(g.full()) for _ in range(g.n_layers)]
