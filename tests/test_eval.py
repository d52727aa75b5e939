"""Evaluation: batched windows equal one-at-a-time scoring; --max-tokens reads a prefix that
encodes to exactly the whole text's first ids."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from conftest import data_path
from npgpt.config import GPTConfig
from npgpt.eval import perplexity, read_ids
from npgpt.model import GPT

CONFIG = GPTConfig(vocab_size=40, n_ctx=12, n_embd=16, n_head=2, n_layer=1)


@settings(max_examples=25, deadline=None)
@given(st.integers(2, 80), st.integers(1, 12), st.data())
def test_batched_windows_equal_one_window_at_a_time(n, context, data):
    stride = data.draw(st.integers(1, context))
    batch = data.draw(st.integers(2, 9))
    model = GPT.init(CONFIG, seed=1, dtype="float64")
    ids = np.random.default_rng(n).integers(0, CONFIG.vocab_size, n)
    one = perplexity(model, ids, context, stride, batch_size=1)
    many = perplexity(model, ids, context, stride, batch_size=batch)
    assert many["tokens_evaluated"] == one["tokens_evaluated"] == n - 1
    assert many["loss"] == pytest.approx(one["loss"], rel=1e-12)


def test_progress_is_reported_up_to_the_total():
    seen = []
    perplexity(GPT.init(CONFIG, seed=1), np.arange(60) % 40, 12, 6, batch_size=2, progress=lambda d, t: seen.append((d, t)))
    assert seen[-1] == (59, 59) and [d for d, _ in seen] == sorted(d for d, _ in seen)


@pytest.mark.parametrize("max_tokens", [1, 2, 1000, 5000, 17000])
def test_max_tokens_reads_a_prefix_encoding_to_the_first_ids(max_tokens, tmp_path, monkeypatch):
    from npgpt.weights import load_tokenizer_beside, resolve_weights

    corpus = data_path("corpora/tinyshakespeare.txt")
    tokenizer = load_tokenizer_beside(resolve_weights("shakespeare"))
    text = corpus.read_text("utf-8")[:200_000]
    path = tmp_path / "text.txt"
    path.write_text(text, "utf-8")
    monkeypatch.setattr("npgpt.eval.READ_CHARS", 997)  # many blocks, cut anywhere
    whole = tokenizer.encode(text, allowed_special="all")
    assert read_ids(tokenizer, path, max_tokens).tolist() == whole[:max_tokens]
    assert read_ids(tokenizer, path).tolist() == whole


@settings(max_examples=30, deadline=None)
@given(st.text(alphabet="ab \n.", max_size=300), st.integers(1, 200))
def test_max_tokens_prefix_is_exact_for_any_text(text, max_tokens):
    import tempfile
    from pathlib import Path

    from npgpt.tokenizer import train_bpe

    tokenizer = train_bpe("aa bb ab. ba\nab\n\n a.b " * 20, 264)
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "t.txt"
        path.write_text(text, "utf-8")
        import npgpt.eval

        old, npgpt.eval.READ_CHARS = npgpt.eval.READ_CHARS, 7
        try:
            assert read_ids(tokenizer, path, max_tokens).tolist() == tokenizer.encode(text)[:max_tokens]
        finally:
            npgpt.eval.READ_CHARS = old
