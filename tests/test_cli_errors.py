"""Bad input through the command line: one line naming the value and the fix, exit status 2, never a
traceback, and no work started (one case per kind found by trying bad inputs as a user would)."""

import json

import pytest

from headalloc.cli import main


@pytest.fixture
def corrupt_model(tmp_path):
    d = tmp_path / "corrupt"
    d.mkdir()
    (d / "config.json").write_text('{"model_type": "llama"')  # truncated JSON
    return d


def _run(args, capsys):
    rc = main(args)
    err = capsys.readouterr().err.strip()
    return rc, err


def test_corrupt_config_is_one_clear_line_in_every_command(corrupt_model, capsys, tmp_path):
    for args in (["evaluate", "--model", str(corrupt_model)],
                 ["saturation", "--model", str(corrupt_model), "--out", str(tmp_path / "s")],
                 ["compress", "--model", str(corrupt_model), "--out", str(tmp_path / "c")]):
        rc, err = _run(args, capsys)
        assert rc == 2 and "could not be read as a Hugging Face config" in err and len(err.splitlines()) == 1, err


def test_run_configs_without_sections_and_unknown_run_functions(tmp_path, capsys):
    p = tmp_path / "empty.json"
    p.write_text("{}")
    rc, err = _run(["train", "--config", str(p)], capsys)
    assert rc == 2 and "needs the sections ['task', 'model']" in err
    good = {"task": {"name": "ngram", "T": 8, "n": 2, "n_train": 64, "n_val": 32, "seed": 0},
            "model": {"d_model": 16, "layers": 1, "attn_groups": [[2, 8]]}, "train": {"steps": 2}}
    p.write_text(json.dumps([good]))
    store = tmp_path / "s.sqlite"
    rc, err = _run(["sweep", "--config", str(p), "--fn", "no.such:fn", "--store", str(store)], capsys)
    assert rc == 2 and "cannot be found" in err and not store.exists()


def test_unwritable_outputs_fail_before_any_work(tmp_path, capsys):
    rc, err = _run(["plan", "--budget", "64", "--token-dim", "8", "--rho", "1", "--plot", "/proc/x.png"], capsys)
    assert rc == 2 and "cannot write /proc/x.png" in err
    rc, err = _run(["compress", "--out", "/proc/headalloc-out"], capsys)  # refused before loading anything
    assert rc == 2 and "cannot write in /proc" in err
    rc, err = _run(["compress", "--step", "3", "--out", str(tmp_path / "c")], capsys)
    assert rc == 2 and "step must be even" in err


def test_evaluate_refuses_lengths_beyond_the_models_positions(tmp_path, capsys):
    from families import tiny_folder

    folder = tiny_folder("llama", tmp_path / "m")  # 128 positions
    rc, err = _run(["evaluate", "--model", str(folder), "--corpus", "pydoc", "--length", "512"], capsys)
    assert rc == 2 and "has 128 positions" in err
    rc, err = _run(["evaluate", "--model", str(folder), "--corpus", "pydoc", "--length", "64", "--windows", "1",
                    "--reference", str(folder), "--contexts", "256"], capsys)
    assert rc == 2 and "has 128 positions" in err


def test_a_corpus_too_small_for_a_split_is_a_clear_error(tmp_path, capsys):
    short = tmp_path / "short.txt"
    short.write_text("one short document only")
    rc, err = _run(["compress", "--corpus", str(short), "--out", str(tmp_path / "c")], capsys)
    assert rc == 2 and "has no documents" in err
