"""Evaluation: batched windows equal one-at-a-time scoring; --max-tokens reads a prefix that
encodes to exactly the whole text's first ids."""

from __future__ import annotations

import sys

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
    assert read_ids(tokenizer, path, None, processes=3).tolist() == whole  # in parts, two on forked processes


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
            assert read_ids(tokenizer, path, None, processes=3).tolist() == tokenizer.encode(text)
        finally:
            npgpt.eval.READ_CHARS = old


@pytest.mark.parametrize("where", [0.1, 0.9])  # in this process's part; in a forked process's
def test_a_text_the_tokenizer_cannot_encode_fails_in_parts_as_whole(where, tmp_path):
    from npgpt.eval import EvalError

    class Letters:  # a tokenizer of the letters a-z and space, newline, "."
        def encode(self, text, allowed_special=None):
            if any(c not in "abcdefghijklmnopqrstuvwxyz .\n" for c in text):
                raise ValueError("a character outside the vocabulary")
            return [ord(c) for c in text]

    lines = ["ab ba."] * 200
    lines[int(where * len(lines))] = "ab \u00e9"
    path = tmp_path / "t.txt"
    path.write_text("\n".join(lines), "utf-8")
    with pytest.raises(EvalError, match="cannot be encoded"):
        read_ids(Letters(), path, None, processes=2)
    lines[int(where * len(lines))] = "ab"
    path.write_text("\n".join(lines), "utf-8")
    assert read_ids(Letters(), path, None, processes=2).tolist() == [ord(c) for c in "\n".join(lines)]


def test_the_default_stride_is_the_context_disjoint_windows():
    model = GPT.init(CONFIG, seed=1, dtype="float64")
    ids = np.random.default_rng(0).integers(0, CONFIG.vocab_size, 50)
    result = perplexity(model, ids)
    assert result["stride"] == result["context"] == CONFIG.n_ctx
    assert result["windows"] == -(-49 // CONFIG.n_ctx)  # 49 targets in windows of 12
    assert result["loss"] == perplexity(model, ids, stride=CONFIG.n_ctx)["loss"]


@pytest.mark.parametrize("stride", [None, 5])
def test_pieces_on_threads_give_the_reference_kernels_result(stride, monkeypatch):
    """Float64: the fast set's pieces (2 windows each, on 2 threads, LM head only on scored
    positions) against the reference set, which runs each batch whole."""
    import npgpt.kernels.numpy_fast as fast
    from npgpt.backend import NumpyBackend
    from npgpt.kernels import REFERENCE, threads

    model = GPT.init(CONFIG, seed=2, dtype="float64")
    reference = GPT.from_numpy(CONFIG, model.to_numpy(), NumpyBackend(REFERENCE))
    ids = np.random.default_rng(3).integers(0, CONFIG.vocab_size, 300)
    monkeypatch.setattr(fast, "BATCH_ROWS", 2 * CONFIG.n_ctx)
    monkeypatch.setattr(threads, "_chosen", 2)
    ours = perplexity(model, ids, stride=stride, batch_size=7)
    expected = perplexity(reference, ids, stride=stride, batch_size=7)
    assert ours["tokens_evaluated"] == expected["tokens_evaluated"] == 299
    assert ours["loss"] == pytest.approx(expected["loss"], rel=1e-12)


def test_the_shipped_model_scores_as_with_the_reference_kernels():
    """Float32, the first 4,096 tokens of tinyshakespeare: the fast set's mean loss within
    1e-5 (relative) of the reference set's (on one thread: the reference's many small
    products crawl on two BLAS threads of a busy machine)."""
    threadpoolctl = pytest.importorskip("threadpoolctl")
    from npgpt.backend import NumpyBackend
    from npgpt.kernels import REFERENCE
    from npgpt.weights import load_model

    model, tokenizer = load_model("shakespeare")
    reference = GPT.from_numpy(model.config, model.to_numpy(), NumpyBackend(REFERENCE))
    ids = read_ids(tokenizer, data_path("corpora/tinyshakespeare.txt"), 4097)
    ours = perplexity(model, ids)
    with threadpoolctl.threadpool_limits(limits=1, user_api="blas"):
        expected = perplexity(reference, ids)
    assert ours["tokens_evaluated"] == expected["tokens_evaluated"] == 4096
    assert ours["loss"] == pytest.approx(expected["loss"], rel=1e-5)


def test_the_result_does_not_depend_on_which_thread_scored_what(monkeypatch):
    """Float32, pieces of 2 windows: 2 threads taking pieces as they come free give exactly
    the 1-thread loss (the pieces' sums are added exactly)."""
    import npgpt.kernels.numpy_fast as fast
    from npgpt.kernels import threads

    model = GPT.init(CONFIG, seed=4)
    ids = np.random.default_rng(5).integers(0, CONFIG.vocab_size, 500)
    monkeypatch.setattr(fast, "BATCH_ROWS", 2 * CONFIG.n_ctx)
    results = []
    for n in (1, 2, 2):
        monkeypatch.setattr(threads, "_chosen", n)
        results.append(perplexity(model, ids, batch_size=3)["loss"])
    assert results[0] == results[1] == results[2]


def test_a_failing_piece_stops_the_others_taking_more(monkeypatch):
    """An error in one piece (or Ctrl-C) is raised, and the threads start no further work."""
    import npgpt.kernels.numpy_fast as fast
    from npgpt.kernels import threads

    model = GPT.init(CONFIG, seed=4)
    ids = np.random.default_rng(5).integers(0, CONFIG.vocab_size, 2000)  # 167 windows, 84 pieces
    monkeypatch.setattr(fast, "BATCH_ROWS", 2 * CONFIG.n_ctx)
    monkeypatch.setattr(threads, "_chosen", 2)
    calls, real_loss = [], model.loss

    def loss(*args, **kwargs):
        calls.append(1)
        if len(calls) == 3:
            raise KeyboardInterrupt
        return real_loss(*args, **kwargs)

    monkeypatch.setattr(model, "loss", loss)
    with pytest.raises(KeyboardInterrupt):
        perplexity(model, ids)
    assert 3 <= len(calls) <= 4  # the failing call, and at most the other thread's one under way


def test_the_shipped_model_scores_the_same_on_one_and_two_threads(monkeypatch):
    """Float32, the shipped model, 3,000 tokens of tinyshakespeare (23 whole windows and a
    short last one, which runs alone): 2 threads give exactly the 1-thread loss, as the
    windows' pieces run their kernels on one thread at any thread count."""
    from npgpt.kernels import threads
    from npgpt.weights import load_model

    model, tokenizer = load_model("shakespeare")
    ids = read_ids(tokenizer, data_path("corpora/tinyshakespeare.txt"), 3000)
    results = []
    for n in (1, 2):
        monkeypatch.setattr(threads, "_chosen", n)
        results.append(perplexity(model, ids)["loss"])
    assert results[0] == results[1]


def test_forked_worker_processes_give_the_one_thread_loss():
    """Float32, the shipped model, 3,000 tokens: pieces scored on 2 forked worker processes
    (as each comes free) give exactly the 1-thread loss, and progress reaches the total."""
    from npgpt.weights import load_model

    model, tokenizer = load_model("shakespeare")
    ids = read_ids(tokenizer, data_path("corpora/tinyshakespeare.txt"), 3000)
    seen = []
    on_processes = perplexity(model, ids, processes=2, progress=lambda d, t: seen.append((d, t)))
    assert on_processes["loss"] == perplexity(model, ids)["loss"]
    assert seen[-1] == (2999, 2999) and [d for d, _ in seen] == sorted(d for d, _ in seen)


def test_an_error_in_a_worker_process_is_raised_in_the_parent(monkeypatch):
    """A piece failing in a forked worker raises its error (the same type and message) in
    the caller, and the other workers are stopped."""
    from npgpt.eval import EvalError

    model = GPT.init(CONFIG, seed=4)
    ids = np.random.default_rng(5).integers(0, CONFIG.vocab_size, 400)
    real_loss = model.loss

    def loss(inputs, targets, **kwargs):
        if inputs.shape[0] == 1:  # the last, shorter window
            raise EvalError("a piece failed; stop")
        return real_loss(inputs, targets, **kwargs)

    monkeypatch.setattr(model, "loss", loss)
    with pytest.raises(EvalError, match="a piece failed"):
        perplexity(model, ids, processes=2)


def test_the_cli_scores_on_processes_as_on_threads():
    """`python -m npgpt.eval` at 2 threads (default --workers auto: processes here, Linux;
    its module is __main__ in the workers too) prints the loss of `--workers threads`."""
    import json
    import os
    import subprocess
    import sys

    command = [sys.executable, "-m", "npgpt.eval", "--weights", "shakespeare", "--data",
               str(data_path("corpora/tinyshakespeare.txt")), "--max-tokens", "1500", "--threads", "2", "--json", "--quiet"]  # fmt: skip
    results = [subprocess.run(command + extra, capture_output=True, text=True, env=os.environ, timeout=120) for extra in (["--workers", "threads"], [])]
    assert [r.returncode for r in results] == [0, 0], [r.stderr for r in results]
    threads, processes = (json.loads(r.stdout) for r in results)
    assert processes["loss"] == threads["loss"] and processes["tokens_evaluated"] == 1499


def test_workers_auto_takes_processes_only_where_they_run():
    from npgpt.eval import worker_processes

    linux = sys.platform == "linux"
    assert worker_processes("auto", 2, "numpy") == (2 if linux else 1)
    assert worker_processes("auto", 1, "numpy") == 1
    assert worker_processes("auto", 2, "array-api-strict") == 1
    assert worker_processes("threads", 2, "numpy") == 1
    assert worker_processes("processes", 3, "numpy") == 3
