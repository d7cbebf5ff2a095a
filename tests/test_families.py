"""Every supported family through the same pipeline, against the family's own Hugging Face model:
identity plans reproduce its logits, reduced plans save to a folder that loads where headalloc cannot
be imported, cached generation equals recomputation, biases and q/k norms are carried and used."""

import json
import subprocess
import sys
import textwrap

import pytest
import torch
from families import BUILDERS, tiny
from transformers import GPT2Config, GPT2LMHeadModel

from headalloc.compression.calibration import collect
from headalloc.compression.export import save_compressed
from headalloc.compression.families import ADAPTERS, UnsupportedModelError, adapter_for
from headalloc.compression.reduce import Geometry, compress_model, identity_plan
from headalloc.compression.spec import LayerPlan

FAMILIES = list(BUILDERS)


def reduced_plan(model):
    """A plan that narrows, removes kv heads and query heads (qk kept whole where q/k norms forbid it)."""
    g = Geometry.of(model)
    qk = lambda d: d if g.qk_reducible else g.head_dim  # noqa: E731
    return [LayerPlan(qk(8), 12), LayerPlan(qk(4), 8, keep_kv=[1]), LayerPlan(qk(16), 4, keep_rep=[[0, 2], [1, 2]])]


def ids(seed=1, n=2, T=30):
    return torch.randint(3, 96, (n, T), generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("family", FAMILIES)
def test_keep_everything_reproduces_the_family_logits(family):
    model = tiny(family)
    x = ids()
    student = compress_model(model, identity_plan(model), collect(model, x))
    with torch.no_grad():
        torch.testing.assert_close(student(x).logits, model(x).logits, atol=2e-5, rtol=1e-4)


@pytest.mark.parametrize("family", FAMILIES)
def test_cached_generation_equals_recomputation(family):
    model = tiny(family)
    student = compress_model(model, reduced_plan(model), collect(model, ids()))
    x = ids(seed=5, n=1, T=14)  # longer than Mistral's window of 12 after a few steps
    with torch.no_grad():
        gen = student.generate(x, max_new_tokens=6, do_sample=False)
        seq = x
        for _ in range(6):
            nxt = student(seq, use_cache=False).logits[:, -1].argmax(-1, keepdim=True)
            seq = torch.cat([seq, nxt], 1)
    assert gen.tolist() == seq.tolist()


def test_biases_and_qk_norms_are_carried_and_used():
    for family, attr in (("qwen2", "q_proj.bias"), ("llama-bias", "o_proj.bias"), ("qwen3", "q_norm.weight")):
        model = tiny(family)
        x = ids()
        student = compress_model(model, reduced_plan(model), collect(model, x))
        t = student.model.layers[1].self_attn.get_parameter(attr)
        with torch.no_grad():
            before = student(x).logits
            t.copy_(torch.ones_like(t) if "norm" in attr else torch.zeros_like(t))
            assert not torch.allclose(student(x).logits, before, atol=1e-4), (family, attr)
    # Qwen2's value bias goes through the value SVD: with every width kept the outputs are the teacher's
    model = tiny("qwen2")
    s = compress_model(model, identity_plan(model), collect(model, ids()))
    assert s.model.layers[0].self_attn.v_proj.bias is not None and s.model.layers[0].self_attn.o_proj.bias is None


def test_qwen3_query_key_width_is_kept_whole_or_refused():
    model = tiny("qwen3")
    with pytest.raises(ValueError, match="cannot be narrowed exactly"):
        compress_model(model, [LayerPlan(8, 8)] * 3)
    from headalloc.compression.planning import make_plan

    cal = collect(model, ids())
    for strategy in ("uniform", "depth", "measured"):
        plan = make_plan(model, strategy, 0.75, cal, step=4)
        assert all(lp.qk_dim == 16 for lp in plan), strategy
        assert any(lp.v_dim < 16 or lp.keep_kv is not None for lp in plan), strategy


def test_saved_folders_load_where_headalloc_cannot_be_imported(tmp_path):
    x = ids(seed=3, n=1, T=20)
    expected = {}
    for family in FAMILIES:
        model = tiny(family)
        student = compress_model(model, reduced_plan(model), collect(model, ids()))
        with torch.no_grad():
            expected[family] = student(x).logits
        save_compressed(student, None, tmp_path / family, {"plan": {"strategy": "test"}})
        cfg = json.loads((tmp_path / family / "config.json").read_text())
        assert cfg["auto_map"]["AutoModelForCausalLM"] == "modeling_headalloc.HeadallocForCausalLM"
        assert (tmp_path / family / "modeling_headalloc.py").exists() and (tmp_path / family / "README.md").exists()
    script = textwrap.dedent(f"""
        import importlib.abc, json, sys
        class Block(importlib.abc.MetaPathFinder):
            def find_spec(self, name, path, target=None):
                if name == "headalloc" or name.startswith("headalloc."):
                    raise ImportError("headalloc is blocked in this process")
        sys.meta_path.insert(0, Block())
        try:
            import headalloc
            sys.exit("headalloc was importable")
        except ImportError:
            pass
        import torch
        from transformers import AutoModelForCausalLM
        x = torch.tensor({x.tolist()})
        out = {{}}
        for family in {FAMILIES!r}:
            m = AutoModelForCausalLM.from_pretrained(r"{tmp_path}/" + family, trust_remote_code=True).eval()
            assert type(m).__module__.startswith("transformers_modules"), type(m).__module__
            with torch.no_grad():
                out[family] = m(x).logits.tolist()
                g = m.generate(x, max_new_tokens=3, do_sample=False)
            assert g.shape == (1, 23)
        print(json.dumps(out))
    """)
    env = {"HF_HUB_OFFLINE": "1", "HF_MODULES_CACHE": str(tmp_path / "modules"), "PATH": "/usr/bin:/bin"}
    r = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env, timeout=300,
                       cwd=tmp_path)
    assert r.returncode == 0, r.stderr[-3000:]
    got = json.loads(r.stdout.strip().splitlines()[-1])
    for family in FAMILIES:
        torch.testing.assert_close(torch.tensor(got[family]), expected[family], atol=1e-5, rtol=1e-4)


def test_unsupported_families_are_refused_by_name():
    with pytest.raises(UnsupportedModelError, match="supported families: LLaMA"):
        adapter_for(GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=16, n_head=2)))
    assert set(ADAPTERS) == {"llama", "mistral", "qwen2", "qwen3", "phi3"}
    from transformers import Phi3Config

    with pytest.raises(UnsupportedModelError, match="partial rotary"):
        adapter_for(Phi3Config(vocab_size=96, hidden_size=96, num_attention_heads=6, num_hidden_layers=1,
                               partial_rotary_factor=0.5, pad_token_id=0))
