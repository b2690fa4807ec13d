"""Tests for trainables/corpora.py: where corpora are looked for, and what the error says when they are not."""
from pathlib import Path

import pytest

from trainables import corpora
from trainables.corpora import default_data_dir, find_corpus
from trainables.toy import toy_grammar_corpus


def test_find_corpus_prefers_data_dir_then_env(tmp_path, monkeypatch):
    (tmp_path / "env" / "ptb").mkdir(parents=True)
    (tmp_path / "explicit" / "ptb").mkdir(parents=True)
    monkeypatch.setenv("G2_DATA_DIR", str(tmp_path / "env"))
    assert find_corpus("ptb") == tmp_path / "env" / "ptb"
    assert find_corpus("ptb", data_dir=str(tmp_path / "explicit")) == tmp_path / "explicit" / "ptb"


def test_find_corpus_accepts_existing_path(tmp_path, monkeypatch):
    monkeypatch.delenv("G2_DATA_DIR", raising=False)
    corpus = toy_grammar_corpus(tmp_path / "mine", seed=0, n_train=5, n_valid=2, n_test=2)
    assert find_corpus(str(corpus)) == corpus
    monkeypatch.chdir(tmp_path)
    assert find_corpus("mine").resolve() == corpus.resolve()


@pytest.mark.parametrize("env", [None, "set"])
def test_find_corpus_error_names_both_places(tmp_path, monkeypatch, env):
    if env:
        monkeypatch.setenv("G2_DATA_DIR", str(tmp_path / "nowhere"))
    else:
        monkeypatch.delenv("G2_DATA_DIR", raising=False)
    monkeypatch.chdir(tmp_path)
    with pytest.raises(FileNotFoundError) as info:
        find_corpus("no-such-corpus")
    msg = str(info.value)
    assert "'no-such-corpus'" in msg
    assert (f"G2_DATA_DIR is {tmp_path / 'nowhere'}" if env else "G2_DATA_DIR is unset") in msg
    assert str(default_data_dir() / "no-such-corpus") in msg
    assert default_data_dir() == Path(corpora.__file__).resolve().parents[2] / "shared" / "data"
