"""Assets: names, clear errors for missing packages and short text, a stable split by article."""

import pytest

from headalloc.assets.corpus import load_corpus, token_windows
from headalloc.assets.models import package_dir, resolve_model


def test_missing_package_error_names_the_install_command():
    with pytest.raises(FileNotFoundError, match="pip install --no-deps some-pkg==1.0"):
        package_dir("headalloc_no_such_package", "pip install --no-deps some-pkg==1.0")


def test_unknown_model_name_is_a_clear_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="neither a known name"):
        resolve_model("gpt5")
    with pytest.raises(FileNotFoundError, match="no config.json"):
        resolve_model(tmp_path)


def test_split_is_deterministic_disjoint_and_complete():
    c = load_corpus("pydoc")
    train, val = c.split("train"), c.split("validation")
    assert train == load_corpus("pydoc").split("train")
    assert not set(train) & set(val)
    assert len(train) + len(val) == len(c.documents)
    assert 0 < len(val) < len(train)
    with pytest.raises(ValueError, match="split must be one of"):
        c.split("test")


def test_text_file_corpus_and_too_short_text(tmp_path, tiny_tokenizer):
    f = tmp_path / "t.txt"
    f.write_text("first doc about lists\n\nsecond doc about dicts\n\nthird")
    c = load_corpus(f)
    assert len(c.documents) == 3
    with pytest.raises(ValueError, match="windows of 4096"):
        token_windows(tiny_tokenizer, c, "train", 4096, 1)
    with pytest.raises(FileNotFoundError, match="neither a known name"):
        load_corpus(tmp_path / "missing.txt")


def test_windows_are_sampled_deterministically(tiny_tokenizer):
    a = token_windows(tiny_tokenizer, "pydoc", "train", 64, 5, seed=3)
    b = token_windows(tiny_tokenizer, "pydoc", "train", 64, 5, seed=3)
    assert a.shape == (5, 64) and bool((a == b).all())
    with pytest.raises(ValueError, match="were requested"):
        token_windows(tiny_tokenizer, "pydoc", "validation", 64, 10**6)


@pytest.mark.slow
def test_real_smollm2_loads_and_answers():
    import torch
    from headalloc.assets import load_model

    model, tok = load_model("smollm2")
    assert model.config.num_hidden_layers == 30 and model.config.num_key_value_heads == 3
    ids = tok("The capital of France is", return_tensors="pt").input_ids
    with torch.no_grad():
        out = model.generate(ids, max_new_tokens=2, do_sample=False)
    assert tok.decode(out[0, ids.shape[1]:]).strip().startswith("Paris")


@pytest.mark.slow
def test_real_wiki_corpus():
    c = load_corpus("wiki")
    assert len(c.documents) > 10_000 - 100
    assert len(c.split("validation")) > 500
