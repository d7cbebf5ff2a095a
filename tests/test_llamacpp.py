"""The llama.cpp target: plans it can run, layers without attention, GGUF export, and llama.cpp itself.

Engine tests load the exported files in llama.cpp (llama-cpp-python) and compare with PyTorch; they
are skipped, with the reason, where the binding is not installed (`./scripts/setup.sh --llamacpp`).
"""

import copy
import importlib.util
import subprocess
import sys

import numpy as np
import pytest
import torch
from families import held_cache_bytes, tiny, tiny_folder, tiny_tokenizer
from transformers import AutoModelForCausalLM, DynamicCache

from headalloc.cli import main
from headalloc.compression.calibration import collect
from headalloc.compression.export.gguf import check_exportable, export_gguf
from headalloc.compression.reduce import Geometry, compress_model
from headalloc.compression.spec import HeadSpec, LayerPlan, Plan
from headalloc.compression.planning import STRATEGIES, make_plan
from headalloc.compression.planning.estimates import head_removal_error
from headalloc.compression.modeling_headalloc import CACHE_NAME  # 'cache' from transformers 5.24

ENGINE = importlib.util.find_spec("llama_cpp") is not None
needs_engine = pytest.mark.skipif(not ENGINE, reason="llama-cpp-python is not installed "
                                                     "(./scripts/setup.sh --llamacpp builds it)")


def _calibrated(family="llama-bias", seed=0):
    m = tiny(family, seed)
    torch.manual_seed(seed)
    return m, collect(m, torch.randint(0, 300, (3, 20)))


HEAD_STRATEGIES = ["uniform", "depth", "prune-heads", "measured"]


def test_strategies_without_a_llamacpp_form_refuse_the_target():
    m, data = _calibrated()
    for s in set(STRATEGIES) - set(HEAD_STRATEGIES):  # latent keys/values (peers): no GGUF counterpart
        with pytest.raises(ValueError, match="llamacpp"):
            make_plan(m, s, 0.5, data, "kv", target="llamacpp")


@pytest.mark.parametrize("strategy", HEAD_STRATEGIES)
@pytest.mark.parametrize("kind", ["kv", "params"])
def test_every_strategy_under_the_llamacpp_target_only_chooses_head_counts(strategy, kind):
    m, data = _calibrated()
    g = Geometry.of(m)
    plan = make_plan(m, strategy, 0.5, data, kind, target="llamacpp")
    assert plan.target == "llamacpp"
    st = compress_model(m, plan, data)
    if kind == "kv":  # the cache the model really holds, both float32
        assert held_cache_bytes(st) <= 0.5 * held_cache_bytes(m)
    else:  # the parameters the model really has
        attn = lambda x: sum(p.numel() for layer in x.model.layers for p in layer.self_attn.parameters())  # noqa
        assert attn(st) <= 0.5 * attn(m)
    for lp in plan:
        assert (lp.qk_dim, lp.v_dim) == (g.head_dim, g.head_dim)
        assert lp.keep_kv is not None  # something was removed or chosen by count
        assert len({len(r) for r in lp.keep_rep}) <= 1  # the same number of query heads in every group
    student = compress_model(m, plan, data)
    check_exportable(student)  # llama.cpp runs it


def test_low_budgets_remove_whole_layers_or_say_why():
    m, data = _calibrated()
    for s in ("measured", "prune-heads"):
        plan = make_plan(m, s, 0.2, data, "kv", target="llamacpp")
        assert any(lp.empty for lp in plan)  # 3 layers, 2 kv heads each: 20% leaves room for one kv head
        assert sum(len(lp.keep_kv) for lp in plan) == 1
        assert not plan[0].empty  # llama.cpp needs attention in the first layer
    for s in ("uniform", "depth"):
        with pytest.raises(ValueError, match="below one head per layer"):
            make_plan(m, s, 0.2, data, "kv", target="llamacpp")


def test_head_removal_error_against_the_family_attention_with_the_head_silenced():
    """Independent reference: the HF attention module itself with one head's output columns zeroed."""
    m, data = _calibrated()
    data.grads = None  # relative output error (no gradient weighting) keeps the reference short
    g = Geometry.of(m)
    err = head_removal_error(m, data)
    l, kv, h = 1, 1, 2
    attn = copy.deepcopy(m.model.layers[l].self_attn)
    c = (kv * g.n_rep + h) * g.head_dim
    with torch.no_grad():
        attn.o_proj.weight[:, c:c + g.head_dim] = 0
        ref = 0.0
        for X, pe in zip(data.inputs[l], data.positions):
            y0 = m.model.layers[l].self_attn(hidden_states=X, position_embeddings=pe, attention_mask=None)[0]
            y1 = attn(hidden_states=X, position_embeddings=pe, attention_mask=None)[0]
            ref += float((y0 - y1).double().square().sum(-1).mean()) / data.resid_sq[l]
    assert float(err[l][kv, h]) == pytest.approx(ref / len(data.positions), rel=1e-4)


@pytest.mark.parametrize("empty", [0, 1])
def test_a_layer_without_attention_is_the_family_model_with_that_attention_silenced(tmp_path, empty):
    m = tiny("llama")
    g = Geometry.of(m)
    hd = g.head_dim
    plan = Plan([LayerPlan(hd, hd, [], []) if i == empty else g.full() for i in range(3)])
    student = compress_model(m, plan)
    assert student.config.attn_layers[empty]["n_kv_heads"] == 0
    assert not list(student.model.layers[empty].self_attn.parameters())
    ref = copy.deepcopy(m)
    with torch.no_grad():
        ref.model.layers[empty].self_attn.o_proj.weight.zero_()
    ids = torch.randint(0, 300, (2, 17))
    with torch.no_grad():
        want = ref(ids).logits
        got = student(ids).logits
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-4)
        # cached decoding equals recomputation; the cache records the tokens of the empty layer too
        cache = DynamicCache(config=student.config.text_config)
        a = student(ids[:, :10], **{CACHE_NAME: cache}, use_cache=True)
        b = student(ids[:, 10:], **{CACHE_NAME: getattr(a, CACHE_NAME)}, use_cache=True)
        torch.testing.assert_close(b.logits, want[:, 10:], atol=1e-5, rtol=1e-4)
        assert getattr(b, CACHE_NAME).get_seq_length(empty) == 17
        # generation with the cache equals greedy recomputation (positions come from layer 0's cache)
        gen = student.generate(ids[:1, :5], max_new_tokens=6, do_sample=False)
        seq = ids[:1, :5]
        for _ in range(6):
            seq = torch.cat([seq, ref(seq).logits[:, -1:].argmax(-1)], 1)
        assert torch.equal(gen, seq)
    assert HeadSpec.from_dict(student.config.attn_layers[empty]).kv_size() == 0
    student.save_pretrained(tmp_path)
    again = AutoModelForCausalLM.from_pretrained(tmp_path, trust_remote_code=True)
    with torch.no_grad():
        torch.testing.assert_close(again(ids).logits, got)


def test_export_writes_per_layer_head_counts_and_refuses_what_llamacpp_cannot_run(tmp_path):
    import gguf

    tok_dir = tmp_path / "tok"
    tiny_tokenizer(tok_dir)
    m = tiny("llama-bias")
    g = Geometry.of(m)
    hd = g.head_dim
    plan = Plan([LayerPlan(hd, hd, [1], [[0, 2]]), LayerPlan(hd, hd, [], []), g.full()])
    student = compress_model(m, plan)
    out = tmp_path / "m.gguf"
    info = export_gguf(student, out, "f32", tokenizer_dir=tok_dir)
    r = gguf.GGUFReader(out)
    f = r.fields
    assert f["general.architecture"].contents() == "deci"
    assert f["deci.attention.head_count"].contents() == [2, 0, 6] == info["head_count"]
    assert f["deci.attention.head_count_kv"].contents() == [1, 0, 2]
    assert f["deci.attention.key_length"].contents() == hd
    names = {t.name for t in r.tensors}
    assert "blk.0.attn_q.weight" in names and "blk.0.attn_q.bias" in names
    assert not any(n.startswith("blk.1.attn") for n in names)  # no attention, no attention weights
    q = next(t for t in r.tensors if t.name == "blk.0.attn_q.weight")
    assert list(q.shape) == [g.hidden, 2 * hd]  # GGUF lists the row length first
    assert f["tokenizer.ggml.pre"].contents() == "gpt-2"
    assert len(f["tokenizer.ggml.tokens"].data) == m.config.vocab_size
    # refusals, each naming the reason
    with pytest.raises(ValueError, match="exists"):
        export_gguf(student, out, "f32", tokenizer_dir=tok_dir)
    export_gguf(student, out, "f16", tokenizer_dir=tok_dir, overwrite=True)
    narrow = compress_model(m, Plan([LayerPlan(8, 16), g.full(), g.full()]))
    with pytest.raises(ValueError, match="--target llamacpp"):
        export_gguf(narrow, tmp_path / "n.gguf", tokenizer_dir=tok_dir)
    first_empty = compress_model(m, Plan([LayerPlan(hd, hd, [], []), g.full(), g.full()]))
    with pytest.raises(ValueError, match="first layer"):  # llama.cpp reads the head width off layer 0
        export_gguf(first_empty, tmp_path / "f.gguf", tokenizer_dir=tok_dir)
    with pytest.raises(ValueError, match="q/k normalisation"):
        export_gguf(tiny("qwen3"), tmp_path / "q.gguf", tokenizer_dir=tok_dir)
    with pytest.raises(ValueError, match="sliding window"):
        export_gguf(tiny("mistral"), tmp_path / "s.gguf", tokenizer_dir=tok_dir)
    with pytest.raises(ValueError, match="outtype"):
        export_gguf(student, tmp_path / "x.gguf", "q4", tokenizer_dir=tok_dir)
    assert not (tmp_path / "n.gguf").exists() and not list(tmp_path.glob(".*headalloc-tmp*"))


def test_export_gguf_cli(tmp_path, capsys):
    folder = tiny_folder("phi3", tmp_path / "phi3")
    out = tmp_path / "phi3.gguf"
    assert main(["export-gguf", str(folder), str(out), "--outtype", "q8_0"]) == 0
    assert out.stat().st_size > 0
    import os
    mask = os.umask(0)
    os.umask(mask)
    assert out.stat().st_mode & 0o777 == 0o666 & ~mask  # a normal file, not the private temporary's mode
    assert main(["export-gguf", str(folder), str(out)]) == 2
    assert "--overwrite" in capsys.readouterr().err
    assert main(["export-gguf", str(tmp_path / "missing"), str(tmp_path / "y.gguf")]) == 2


def test_a_missing_engine_is_named_with_its_install(monkeypatch):
    from headalloc.compression import engine

    monkeypatch.setitem(sys.modules, "llama_cpp", None)  # import fails as if not installed
    with pytest.raises(ValueError, match=r"headalloc\[llamacpp\]"):
        engine.require_engine()


# ------------------------------------------------------------------------------------------ the engine
PROMPT = "The quick brown fox: def f(x): return 42 + x; print(f(7))  # a comment\n\tand 12345 more"


@needs_engine
@pytest.mark.parametrize("family", ["llama", "llama-bias", "qwen2", "phi3"])
def test_llamacpp_runs_the_export_as_pytorch_does(family, tmp_path):
    """llama.cpp's own logits on the exported f32 file against PyTorch's, for the original and for a plan with
    fewer kv heads, fewer query heads per kv head and a layer without attention; its tokenizer against ours."""
    from headalloc.compression.engine import engine_logits, engine_open

    tok = tiny_tokenizer(tmp_path)
    ids = tok(PROMPT)["input_ids"]
    m = tiny(family)
    g = Geometry.of(m)
    hd = g.head_dim
    student = compress_model(m, Plan([LayerPlan(hd, hd, [1], [[0, 2]]), LayerPlan(hd, hd, [], []), g.full()]))
    for name, model in (("original", m), ("compressed", student)):
        path = tmp_path / f"{name}.gguf"
        export_gguf(model, path, "f32", tokenizer_dir=tmp_path)
        with torch.no_grad():
            want = model(torch.tensor([ids])).logits[0].numpy()
        got = engine_logits(path, ids)
        assert np.abs(got - want).max() < 2e-3 * max(1.0, np.abs(want).max()), name
        llm, _ = engine_open(path, n_ctx=64)
        assert llm.tokenize(PROMPT.encode(), add_bos=False, special=True) == ids
        text = llm.create_completion("def f(x):", max_tokens=5, temperature=0.0)["choices"][0]["text"]
        assert isinstance(text, str)
        llm.close()


@needs_engine
def test_llamacpp_caches_only_the_kept_heads(tmp_path):
    """Bytes per cached token in llama.cpp (its saved sequence state, growing with the tokens) fall by exactly
    the removed key/value entries (f16: 2 bytes each), with flash attention (without it, llama.cpp pads every
    layer's V cache to the widest layer)."""
    from headalloc.compression.engine import engine_measure

    tok = tiny_tokenizer(tmp_path)
    m = tiny("llama")
    g = Geometry.of(m)
    hd = g.head_dim
    student = compress_model(m, Plan([LayerPlan(hd, hd, [1], [[0, 2]]), LayerPlan(hd, hd, [], []), g.full()]))
    text = (tok(PROMPT * 8)["input_ids"] * 4)[:100]
    per_token = {}
    for name, model in (("original", m), ("compressed", student)):
        path = tmp_path / f"{name}.gguf"
        export_gguf(model, path, "f32", tokenizer_dir=tmp_path)
        r = engine_measure(path, text, contexts=(32, 64), new_tokens=4)
        per_token[name] = r["kv_bytes_per_token"]
        assert r["speed"][64]["gen_tok_s"] > 0
    removed = (2 - 1) * 2 * hd + 2 * 2 * hd  # layer 0: one kv head of k and v; layer 1: both
    assert per_token["original"] - per_token["compressed"] == 2 * removed


@needs_engine
def test_check_gguf_cli_on_a_saved_folder(tmp_path, capsys):
    folder = tiny_folder("llama", tmp_path / "m")
    out = tmp_path / "m.gguf"
    assert main(["export-gguf", str(folder), str(out)]) == 0
    assert main(["check-gguf", str(folder), str(out), "--prompt", PROMPT, "--new-tokens", "3"]) == 0
    assert "llama.cpp matches" in capsys.readouterr().out


def test_export_runs_where_the_engine_is_absent():
    """Export needs only the gguf writer, not llama.cpp: a process without llama_cpp exports."""
    code = ("import sys; sys.modules['llama_cpp'] = None\n"
            "import torch, tempfile, pathlib; sys.path.insert(0, 'tests')\n"
            "from families import tiny, tiny_tokenizer\n"
            "from headalloc.compression.export.gguf import export_gguf\n"
            "d = pathlib.Path(tempfile.mkdtemp()); tiny_tokenizer(d)\n"
            "print(export_gguf(tiny('llama'), d / 'm.gguf', tokenizer_dir=d)['arch'])\n")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    assert r.stdout.strip().endswith("deci")


def test_compress_for_llamacpp_then_export_from_the_cli_bfloat16(tmp_path, capsys):
    """The user's path: a bfloat16 Qwen2 folder compressed with --target llamacpp at a KV budget, saved, exported
    to GGUF from the saved folder, and (with the engine) checked in llama.cpp."""
    import json

    folder = tiny_folder("qwen2", tmp_path / "qwen2", torch.bfloat16)
    tiny = dict(corpus="pydoc", calib_windows=2, calib_length=32, distill_steps=2, kd_steps=2, kd_windows=2,
                kd_length=32, eval_windows=2, eval_length=32, heldout="none")
    out = tmp_path / "small"
    args = ["compress", "--model", str(folder), "--budget", "0.5", "--budget-kind", "kv", "--target", "llamacpp",
            "--out", str(out)] + [f"--{k.replace('_', '-')}={v}" for k, v in tiny.items()]
    assert main(args) == 0
    assert "export-gguf" in capsys.readouterr().out
    layers = json.loads((out / "config.json").read_text())["attn_layers"]
    assert all(a["n_kv_heads"] == 0 or a["qk_dim"] == a["v_dim"] == 16 for a in layers)
    assert "## llama.cpp" in (out / "README.md").read_text()
    gg = tmp_path / "small.gguf"
    assert main(["export-gguf", str(out), str(gg), "--outtype", "f16"]) == 0
    if ENGINE:
        assert main(["check-gguf", str(out), str(gg), "--prompt", PROMPT, "--new-tokens", "2"]) == 0
    # a plan for headalloc's own runtime (narrowed widths) is refused with the way out
    other = tmp_path / "narrow"
    assert main([
        "compress", "--model", str(folder), "--budget", "0.5", "--strategy", "uniform", "--step", "4",
        "--out", str(other)] + [f"--{k.replace('_', '-')}={v}" for k, v in tiny.items()]) == 0
    capsys.readouterr()
    assert main(["export-gguf", str(other), str(tmp_path / "narrow.gguf")]) == 2
    assert "--target llamacpp" in capsys.readouterr().err
