"""The compression job as a user drives it: the Python API and the CLI on a local folder, in bfloat16,
with the output folder's safety rules and the settings' one source of truth."""

import json

import pytest
import torch
from families import tiny_folder
from safetensors import safe_open

import headalloc
from headalloc.cli import build_parser, main
from headalloc.compression.settings import BY_BUDGET_KIND, FLAGS, CompressConfig, config_from_args, preset

TINY = dict(corpus="pydoc", calib_windows=2, calib_length=32, distill_steps=2, kd_steps=2, kd_windows=2, kd_length=32,
            eval_windows=2, eval_length=32, step=4, heldout="none")


@pytest.fixture(scope="module")
def bf16_folder(tmp_path_factory):
    return tiny_folder("qwen2", tmp_path_factory.mktemp("qwen2-bf16"), torch.bfloat16)


def test_bfloat16_end_to_end_compress_save_load(bf16_folder, tmp_path):
    r = headalloc.compress(str(bf16_folder), budget=0.5, strategy="measured", progress=False, **TINY)
    assert r.config.runtime.fit_dtype == "float32" and r.report.teacher_dtype == "bfloat16"
    assert next(r.model.parameters()).dtype == torch.bfloat16  # the original's dtype, after fitting in float32
    assert r.model.config.text_config.model_type == "qwen2"
    assert r.report.validation.after.ppl > 1 and r.report.validation.teacher.ppl > 1
    out = r.save(tmp_path / "out")
    with safe_open(out / "model.safetensors", "pt") as f:
        assert {f.get_tensor(k).dtype for k in f.keys()} == {torch.bfloat16}
    from transformers import AutoModelForCausalLM

    loaded = AutoModelForCausalLM.from_pretrained(out, trust_remote_code=True)
    x = torch.randint(3, 96, (1, 12))
    with torch.no_grad():
        assert torch.equal(loaded(x).logits, r.model(x).logits)
    card = (out / "README.md").read_text()
    assert "base_model: " in card and "| perplexity |" in card and str(tmp_path) not in card
    # the saved record reads back as the run's own report; the card and the text summary show its numbers
    from headalloc.compression.report import CompressionReport

    back = CompressionReport.from_record(json.loads((out / "headalloc.json").read_text()))
    assert back == r.report
    v = r.report.validation
    assert f"| {v.teacher.ppl:.2f} | " in card and f" | {v.after.ppl:.2f} |" in card
    assert f"original {v.teacher.ppl:.2f}, compressed {v.after.ppl:.2f}" in r.report.format_text()[0]
    tok_cfg = json.loads((out / "tokenizer_config.json").read_text())
    assert not {"is_local", "local_files_only", "name_or_path"} & set(tok_cfg)
    # saving in another dtype on request
    out32 = r.save(tmp_path / "out32", dtype="float32")
    with safe_open(out32 / "model.safetensors", "pt") as f:
        assert {f.get_tensor(k).dtype for k in f.keys()} == {torch.float32}


def test_out_is_never_a_foreign_folder_and_overwrite_is_opt_in(bf16_folder, tmp_path, capsys):
    foreign = tmp_path / "mine"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("keep me")
    args = ["compress", "--model", str(bf16_folder), "--budget", "0.5", "--strategy", "uniform"] + \
        [f"--{k.replace('_', '-')}={v}" for k, v in TINY.items()]
    assert main(args + ["--out", str(foreign)]) == 2
    assert "did not write" in capsys.readouterr().err and (foreign / "notes.txt").read_text() == "keep me"
    assert main(args + ["--out", str(foreign), "--overwrite"]) == 2  # even with --overwrite
    assert (foreign / "notes.txt").read_text() == "keep me"
    afile = tmp_path / "a-file"
    afile.write_text("x")
    assert main(args + ["--out", str(afile)]) == 2 and "existing file" in capsys.readouterr().err
    ours = tmp_path / "ours"
    assert main(args + ["--out", str(ours)]) == 0 and (ours / "headalloc.json").exists()
    said = capsys.readouterr().out
    assert "time: " in said and " s (of which fitting text " in said  # where the minutes went
    # no perplexity before fitting unless asked for (--eval-before): not in the output, the record or the card
    assert "compressed " in said and " -> " not in said.split("perplexity: ")[1].split("\n")[0]
    assert "before_distill" not in json.loads((ours / "headalloc.json").read_text())
    assert "not measured (`--eval-before`)" in (ours / "README.md").read_text()
    assert main(args + ["--out", str(ours)]) == 2 and "--overwrite" in capsys.readouterr().err
    stamp = (ours / "headalloc.json").stat().st_mtime_ns
    assert main(args + ["--out", str(ours), "--overwrite"]) == 0
    assert (ours / "headalloc.json").stat().st_mtime_ns != stamp
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a-file", "mine", "ours"]  # no temporaries left


def test_every_setting_is_a_flag_with_its_default_in_the_help():
    ap = build_parser()
    sub = next(a for a in ap._actions if a.dest == "command").choices["compress"]
    by_dest = {a.dest: a for a in sub._actions}
    default = CompressConfig()
    for name in FLAGS:
        assert name in by_dest, name
        if default.get(name) is None and name in BY_BUDGET_KIND["params"]:  # each budget kind's default, named
            help_ = " ".join(by_dest[name].help.split())
            assert all(f"{k} {v[name]!r}" in help_ for k, v in BY_BUDGET_KIND.items()), (name, help_)
        else:
            assert f"default: {default.get(name)}" in by_dest[name].help, name
    args = ap.parse_args(["compress", "--kd-steps", "7", "--no-kd-tail", "--quick", "--save-dtype", "bfloat16"])
    cfg = config_from_args(args)
    assert (cfg.kd.steps, cfg.kd.tail, cfg.runtime.save_dtype) == (7, False, "bfloat16")
    assert cfg.calib.windows == preset("quick").calib.windows  # the preset under the flags
    assert config_from_args(ap.parse_args(["compress"])) == preset("default")


@pytest.mark.parametrize("flag,value,message", [("--budget", "2", "budget must be a fraction"),
                                                ("--kd-steps", "-3", "kd_steps must be >= 0"),
                                                ("--distill-steps", "-1", "distill_steps must be >= 0"),
                                                ("--eval-length", "1", "eval_length must be >= 2"),
                                                ("--gen-prompt", "-1", "gen_prompt >= 0"),
                                                ("--eval-seed", "-2", "eval_seed must be >= 0"),
                                                ("--kd-ema", "1", "kd_ema must be in [0, 1)")])
def test_bad_settings_fail_before_any_work(flag, value, message, capsys, tmp_path):
    assert main(["compress", flag, value, "--out", str(tmp_path / "o")]) == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "o").exists()


def test_a_setting_outside_its_choices_names_them(capsys, tmp_path):
    with pytest.raises(SystemExit) as e:
        main(["compress", "--kd-sampling", "shuffle", "--out", str(tmp_path / "o")])
    assert e.value.code == 2
    assert "invalid choice: 'shuffle' (choose from 'epochs', 'replacement')" in capsys.readouterr().err
    with pytest.raises(ValueError, match="kd_sampling must be one of epochs, replacement; got 'shuffle'"):
        CompressConfig().replace(kd_sampling="shuffle").validate()
    assert not (tmp_path / "o").exists()


def test_eval_seed_fixes_the_measured_windows_whatever_the_fitting_seed(tmp_path):
    from transformers import AutoTokenizer

    from headalloc.compression.pipeline import eval_windows, heldout_windows

    tok = AutoTokenizer.from_pretrained(tiny_folder("llama", tmp_path / "llama"))
    base = dict(corpus="pydoc", eval_windows=3, eval_length=64, heldout="alice", heldout_windows=3)
    a, b, own = (CompressConfig().replace(**base, seed=s, eval_seed=e) for s, e in ((0, 5), (1, 5), (1, None)))
    assert torch.equal(eval_windows(tok, a), eval_windows(tok, b))
    assert torch.equal(heldout_windows(tok, a)["alice"], heldout_windows(tok, b)["alice"])
    # without --eval-seed the windows follow --seed, so another fitting seed is measured elsewhere
    assert torch.equal(eval_windows(tok, own), eval_windows(tok, CompressConfig().replace(**base, seed=1, eval_seed=1)))
    assert not torch.equal(eval_windows(tok, own), eval_windows(tok, a))


def test_a_saved_model_measured_again_on_held_out_text_gives_the_jobs_figure(tmp_path):
    """`headalloc evaluate --split all` on a saved model reproduces the held-out perplexity `compress` reported
    (same windows: its seed is the job's + 2), and `--windows 0` measures every window of the text."""
    from transformers import AutoTokenizer

    from headalloc.assets import token_windows

    folder = tiny_folder("llama", tmp_path / "llama")
    r = headalloc.compress(str(folder), budget=0.5, strategy="uniform", progress=False,
                           **{**TINY, "heldout": "alice", "heldout_windows": 2, "seed": 4})
    out = r.save(tmp_path / "out")
    base = ["evaluate", "--model", str(out), "--corpus", "alice", "--split", "all", "--length", "32"]
    assert main(base + ["--windows", "2", "--seed", "6", "--out", str(tmp_path / "two.json")]) == 0
    two = json.loads((tmp_path / "two.json").read_text())
    assert two["perplexity"]["ppl"] == pytest.approx(r.report.heldout["alice"].after.ppl, rel=1e-5)
    h = r.report.heldout["alice"]  # the job's ratio, with its interval over the two windows
    assert h.interval.ratio == pytest.approx(h.after.ppl / h.teacher.ppl, rel=1e-9)
    assert h.interval.low <= h.interval.ratio <= h.interval.high and h.interval.windows == 2
    assert main(base + ["--windows", "0", "--out", str(tmp_path / "all.json")]) == 0
    every = len(token_windows(AutoTokenizer.from_pretrained(folder), "alice", "all", 32))
    assert json.loads((tmp_path / "all.json").read_text())["eval"]["windows"] == every > 2


def test_unsupported_family_folder_is_refused_before_loading(tmp_path, capsys):
    from transformers import GPT2Config

    GPT2Config(n_layer=1, n_embd=16, n_head=2).save_pretrained(tmp_path)  # no weights: never loaded
    assert main(["compress", "--model", str(tmp_path), "--out", str(tmp_path / "o")]) == 2
    assert "supported families" in capsys.readouterr().err


def test_device_map_placement_gives_the_same_student(tmp_path):
    """A teacher loaded with device_map="auto" gives the same compressed model as a plain load, and a
    teacher that accelerate placed (hf_device_map) gets a student dispatched to the same placement.
    (With one device transformers places without a map; a multi-GPU run is not tested here.)"""
    from headalloc.compression.reduce import compress_model

    folder = tiny_folder("llama", tmp_path / "llama")
    kw = dict(budget=0.5, strategy="uniform", progress=False, **TINY)
    a = headalloc.compress(str(folder), **kw)
    b = headalloc.compress(str(folder), device_map="auto", **kw)
    x = torch.randint(3, 96, (1, 16))
    with torch.no_grad():
        torch.testing.assert_close(b.model(x).logits, a.model(x).logits)
    a.teacher.hf_device_map = {"": "cpu"}
    placed = compress_model(a.teacher, a.plan)
    assert placed.hf_device_map == {"": "cpu"}
    with torch.no_grad():
        torch.testing.assert_close(placed(x).logits, compress_model(a.teacher, a.plan)(x).logits)


def test_calibration_text_from_a_jsonl_file(tmp_path):
    from pydoc_data.topics import topics

    from headalloc.assets.corpus import load_corpus

    p = tmp_path / "docs.jsonl"
    p.write_text("\n".join(json.dumps({"text": t, "id": k}) for k, t in sorted(topics.items())) + "\n")
    c = load_corpus(str(p))
    assert len(c.documents) == len([t for t in topics.values() if t.strip()])
    folder = tiny_folder("mistral", tmp_path / "mistral")
    import codecs
    import this  # noqa: F401  (the Zen of Python: a second, unrelated kind of text)

    zen = tmp_path / "zen.txt"
    zen.write_text(codecs.decode(this.s, "rot13"))
    r = headalloc.compress(str(folder), budget=0.5, strategy="depth", progress=False,
                           **{**TINY, "corpus": str(p), "heldout": str(zen), "heldout_windows": 2, "eval_before": True})
    assert r.record()["evaluation"]["corpus"] == r.report.validation.name == str(p)
    h = r.report.heldout[str(zen)]  # evaluated on the held-out text: original, before and after fitting
    assert h.name == str(zen) and all(getattr(h, k).tokens == 2 * 31 for k in ("teacher", "before", "after"))
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"title": "no text field"}\n')
    with pytest.raises(ValueError, match="no string field 'text'"):
        load_corpus(str(bad))


def test_generated_fitting_text_is_the_originals_own_samples(tmp_path, monkeypatch):
    """fit_text="generated": windows start with corpus tokens and continue with the original model's samples
    (every continuation token has non-zero probability under the model; the same seed gives the same
    windows, from the on-disk cache the second time)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from headalloc.compression.fit_text import generated_windows

    monkeypatch.setenv("HEADALLOC_CACHE", str(tmp_path / "cache"))
    folder = tiny_folder("llama", tmp_path / "llama")
    model = AutoModelForCausalLM.from_pretrained(folder).eval()
    tok = AutoTokenizer.from_pretrained(folder)
    w = generated_windows(model, tok, "pydoc", n=3, length=20, seed=0, prompt=4, progress=False)
    assert w.shape == (3, 20) and list((tmp_path / "cache" / "generated").glob("*.npy"))
    again = generated_windows(model, tok, "pydoc", n=3, length=20, seed=0, prompt=4, progress=False)
    assert torch.equal(w, again)
    two = generated_windows(model, tok, "pydoc", n=3, length=20, seed=0, prompt=4, batch=2, progress=False)
    assert torch.equal(two, generated_windows(model, tok, "pydoc", n=3, length=20, seed=0, prompt=4, batch=2,
                                              progress=False))
    assert len(list((tmp_path / "cache" / "generated").glob("*.npy"))) == 2  # other batches, other draws
    assert torch.equal(two[:, :4], w[:, :4]) and not torch.equal(two, w)
    from headalloc.assets.corpus import load_corpus, tokenize_split

    ids = tokenize_split(tok, load_corpus("pydoc"), "train").tolist()
    starts = {tuple(ids[i:i + 4]) for i in range(0, len(ids) - 4, 4)}  # the prompt windows' grid
    assert all(tuple(row[:4].tolist()) in starts for row in w)  # prompts from the corpus, the rest sampled
    other = generated_windows(model, tok, "pydoc", n=3, length=20, seed=1, prompt=4, progress=False)
    assert not torch.equal(w[:, 4:], other[:, 4:])
    free = generated_windows(model, tok, "pydoc", n=3, length=20, seed=0, prompt=0, progress=False)
    start = tok.bos_token_id if tok.bos_token_id is not None else tok.eos_token_id
    assert free.shape == (3, 20) and (free[:, 0] == start).all()  # unconditional: one start token, then samples
    assert len({tuple(r.tolist()) for r in free}) == 3
    r = headalloc.compress(str(folder), budget=0.5, strategy="uniform", progress=False,
                           **{**TINY, "fit_text": "mixed"})
    assert r.report.end_to_end["windows"] == TINY["kd_windows"]


def test_fitting_text_parts_share_the_windows_equally(tmp_path, monkeypatch):
    """fit_text "a+b+c": equal shares of corpus windows, the model's samples and another text's train split;
    "mixed" is exactly "corpus+generated"; a misspelt part or a part that is also held out is refused."""

    from transformers import AutoModelForCausalLM, AutoTokenizer

    from headalloc.assets.corpus import load_corpus, tokenize_split
    from headalloc.compression.fit_text import fit_windows
    from headalloc.compression.settings import preset

    monkeypatch.setenv("HEADALLOC_CACHE", str(tmp_path / "cache"))
    folder = tiny_folder("llama", tmp_path / "llama")
    model = AutoModelForCausalLM.from_pretrained(folder).eval()
    tok = AutoTokenizer.from_pretrained(folder)
    books = tmp_path / "books.txt"
    books.write_text("\n\n".join(f"zebra {i} crossing the river at night" * 30 for i in range(40)))
    cfg = preset("default", **{**TINY, "gen_prompt": 0, "gen_batch": 4})
    mixed = fit_windows(model, tok, cfg.replace(fit_text="mixed").validate(), 7, 16, 0, False)
    assert torch.equal(mixed, fit_windows(model, tok, cfg.replace(fit_text="corpus+generated").validate(), 7, 16, 0,
                                          False))
    three = fit_windows(model, tok, cfg.replace(fit_text=f"corpus+generated+{books}").validate(), 9, 16, 0, False)
    start = tok.bos_token_id if tok.bos_token_id is not None else tok.eos_token_id
    ids = tokenize_split(tok, load_corpus(str(books)), "train").tolist()
    from_books = [r for r in three.tolist() if any(ids[i:i + 16] == r for i in range(0, len(ids) - 15, 16))]
    assert len(from_books) == 3 and int((three[:, 0] == start).sum()) >= 3  # three shares of three windows
    # the labels name where each window came from: the book windows are exactly the ones labelled with the book
    same, labels = fit_windows(model, tok, cfg.replace(fit_text=f"corpus+generated+{books}").validate(), 9, 16, 0,
                               False, parts=True)
    assert torch.equal(same, three) and sorted(set(labels)) == sorted(["corpus", "generated", str(books)])
    assert [r in from_books for r in three.tolist()] == [lab == str(books) for lab in labels]
    assert all(int(r[0]) == start for r, lab in zip(three, labels) if lab == "generated")
    weighted = fit_windows(model, tok, cfg.replace(fit_text=f"corpus:2+generated+{books}").validate(), 8, 16, 0, False)
    assert sum(any(ids[i:i + 16] == r for i in range(0, len(ids) - 15, 16)) for r in weighted.tolist()) == 2
    for bad in ("corpus+genrated", "corpus+corpus", "corpus:0+generated", "corpus:x"):
        with pytest.raises(ValueError, match="fit_text"):
            cfg.replace(fit_text=bad).validate()
    with pytest.raises(ValueError, match="nothing is fitted on"):
        cfg.replace(fit_text=f"corpus+generated+{books}", heldout=str(books)).validate()
    # a named text that is not there (this cache has no Brotli archive) stops the run before any sampling
    gen_dir = tmp_path / "cache" / "generated"
    before = sorted(gen_dir.glob("*.npy"))
    with pytest.raises(FileNotFoundError, match="brotli==1.2.1"):
        headalloc.compress(str(folder), budget=0.5, strategy="uniform", progress=False,
                           **{**TINY, "fit_text": "corpus+generated+canterbury", "gen_prompt": 0, "calib_windows": 6})
    assert sorted(gen_dir.glob("*.npy")) == before


def test_budget_one_keeps_the_weights_and_says_so(tmp_path):
    folder = tiny_folder("llama", tmp_path / "llama")
    r = headalloc.compress(str(folder), budget=1.0, strategy="uniform", progress=False, **TINY)
    assert "nothing to fit" in r.report.note and r.report.end_to_end is None
    x = torch.randint(3, 96, (1, 16))
    with torch.no_grad():
        torch.testing.assert_close(r.model(x).logits, r.teacher(x).logits, atol=2e-5, rtol=1e-4)


@pytest.mark.parametrize("sig", ["SIGINT", "SIGKILL"])
def test_a_save_killed_midway_leaves_nothing_that_the_next_run_does_not_remove(tmp_path, sig):
    """A signal while a folder is being written: the target never appears half-written; after SIGINT
    the temporary is removed at once, after SIGKILL (no clean-up possible) the next write removes it
    (recognisable by name and by its dead process)."""
    import os
    import signal
    import subprocess
    import sys

    target = tmp_path / "model"
    script = "\n".join([
        "import signal, sys, time",
        # Ctrl-C's behaviour even when started from a background shell job (which ignores SIGINT)
        "signal.signal(signal.SIGINT, signal.default_int_handler)",
        "from headalloc.io import atomic_directory",
        f"with atomic_directory(r'{target}') as tmp:",
        "    (tmp / 'model.safetensors').write_bytes(b'x' * 1000)",
        "    print('writing', flush=True)",
        "    time.sleep(60)", ""])
    p = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    assert p.stdout.readline().strip() == "writing"
    os.kill(p.pid, getattr(signal, sig))
    p.wait()
    leftovers = [q for q in tmp_path.iterdir() if q.name != "model"]
    assert not target.exists()
    if sig == "SIGINT":
        assert leftovers == []
    else:
        assert len(leftovers) == 1 and "headalloc-tmp" in leftovers[0].name
    from headalloc.io import atomic_directory

    with atomic_directory(target) as tmp:
        (tmp / "ok").write_text("done")
    assert sorted(q.name for q in tmp_path.iterdir()) == ["model"] and (target / "ok").exists()


def test_a_calibration_is_reused_only_with_the_fitting_text_it_was_made_from(tmp_path):
    """A workspace's calibration, the teacher's targets and its perplexities are measured once: a second run on it
    passes no window through the whole original (counted by a hook) and reports the same original perplexity;
    settings that change the fitting text are refused."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from headalloc.compression.pipeline import prepare
    from headalloc.compression.settings import preset

    folder = tiny_folder("llama", tmp_path / "llama")
    model, tok = AutoModelForCausalLM.from_pretrained(folder).eval(), AutoTokenizer.from_pretrained(folder)
    cfg = preset("default", budget=0.5, strategy="uniform", fit_text="corpus", **TINY)
    cal = prepare(model, tok, cfg)
    r = headalloc.compress(model, tokenizer=tok, config=cfg, calibration_data=cal, progress=False)
    passes = []
    hook = model.model.register_forward_pre_hook(lambda *a: passes.append(1))
    try:
        again = headalloc.compress(model, tokenizer=tok, config=cfg.replace(budget=0.75), calibration_data=cal,
                                   progress=False)
    finally:
        hook.remove()
    assert passes == [] and again.report.validation.teacher == r.report.validation.teacher
    with pytest.raises(ValueError, match="other fitting text"):
        headalloc.compress(model, tokenizer=tok, config=cfg.replace(fit_text="mixed"), calibration_data=cal,
                           progress=False)
    with pytest.raises(ValueError, match="other fitting text"):  # a shrunk second moment is another calibration
        headalloc.compress(model, tokenizer=tok, config=cfg.replace(whiten_shrink=0.2), calibration_data=cal,
                           progress=False)
    with pytest.raises(ValueError, match="other fitting text"):  # so are moments pooled over more windows
        headalloc.compress(model, tokenizer=tok, config=cfg.replace(moment_windows=3), calibration_data=cal,
                           progress=False)


def test_defaults_by_budget_kind_fill_only_what_was_not_given(monkeypatch):
    """fit_text and whiten_shrink left unset take their budget kind's values (validate and to_dict resolve them),
    from whatever table is in force (here the test's own); a given value, or a preset's, is kept under either
    kind."""
    from headalloc.compression import settings

    monkeypatch.setattr(settings, "BY_BUDGET_KIND", {"params": {"fit_text": "corpus+stdlib", "whiten_shrink": 0.05},
                                                     "kv": {"fit_text": "generated", "whiten_shrink": 0.3}})
    for kind, want in (("params", ("corpus+stdlib", 0.05)), ("kv", ("generated", 0.3))):
        cfg = preset("default").replace(budget_kind=kind).validate()
        assert (cfg.fit.text, cfg.calib.whiten_shrink) == want
        assert preset("default").replace(budget_kind=kind).to_dict()["fit_text"] == want[0]
        given = preset("default").replace(budget_kind=kind, fit_text="mixed", whiten_shrink=0.1).validate()
        assert (given.fit.text, given.calib.whiten_shrink) == ("mixed", 0.1)
        quick = preset("quick").replace(budget_kind=kind).validate()
        assert (quick.fit.text, quick.calib.whiten_shrink) == ("mixed", 0.0)  # the main job's cells do not move
    assert [p for p, _ in preset("default").replace(budget_kind="params").fit_shares] == ["corpus", "stdlib"]
    with pytest.raises(ValueError, match="budget_kind"):
        preset("default").replace(budget_kind="flops").validate()
