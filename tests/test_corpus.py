"""moeify.corpus: the stdlib-docstring corpus is deterministic, split without overlap, and batches are pure."""

import ast

import pytest
import torch

from moeify.corpus import batch_at, eval_windows, stdlib_docstrings, stdlib_files
from moeify.errors import ConfigError


@pytest.fixture(scope="module")
def corpus():
    return stdlib_docstrings(30_000)


def test_deterministic_and_split_by_docstring(corpus):
    again = stdlib_docstrings(30_000)
    assert torch.equal(corpus.train, again.train) and torch.equal(corpus.val, again.val)
    assert corpus.description["sha256"] == again.description["sha256"]
    n = corpus.description["docstrings"]
    assert n >= 10 and 0.02 < corpus.val.numel() / (corpus.train.numel() + corpus.val.numel()) < 0.3
    val = bytes(corpus.val.tolist()).decode()
    assert val not in bytes(corpus.train.tolist()).decode()  # a held-out docstring, not a copy of training text
    assert corpus.train.dtype == torch.uint8 and int(corpus.train.max()) < 128  # ASCII only


def test_text_is_the_first_files_docstrings(corpus):
    # independent reading of the first stdlib file with a docstring: its module docstring opens the corpus
    for path in stdlib_files():
        doc = ast.get_docstring(ast.parse(path.read_bytes()))
        if doc and len(doc) >= 200 and doc.isascii():
            break
    assert bytes(corpus.train[:100].tolist()).decode() == doc[:100]


def test_batches_are_a_function_of_seed_and_step(corpus):
    a = batch_at(corpus.train, 7, batch_size=3, seq_len=16, seed=1)
    assert torch.equal(a, batch_at(corpus.train, 7, batch_size=3, seq_len=16, seed=1))
    assert not torch.equal(a, batch_at(corpus.train, 8, batch_size=3, seq_len=16, seed=1))
    assert not torch.equal(a, batch_at(corpus.train, 7, batch_size=3, seq_len=16, seed=2))
    assert a.shape == (3, 16) and a.dtype == torch.long
    w = eval_windows(corpus.val, num=4, seq_len=16)
    assert w.shape == (4, 16) and torch.equal(w[0], corpus.val[:16].long())


@pytest.mark.parametrize("call", [lambda c: stdlib_docstrings(10), lambda c: stdlib_docstrings(5000, val_every=1),
                                  lambda c: batch_at(c.train[:8], 0, batch_size=1, seq_len=16, seed=0),
                                  lambda c: eval_windows(c.val[:8], num=1, seq_len=16)])
def test_bad_input_is_a_typed_error(corpus, call):
    with pytest.raises(ConfigError):
        call(corpus)
