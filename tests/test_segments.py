"""Packed documents: with `segments`, each document in a window gets exactly the logits and
loss it gets alone (its own positions from 0, no attention across documents)."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from npgpt.backend import NumpyBackend
from npgpt.config import GPTConfig
from npgpt.kernels import REFERENCE
from npgpt.model import GPT, segment_positions

from test_gradients import random_model
from test_model import host, tiny_model

CFG = GPTConfig(vocab_size=11, n_ctx=16, n_embd=8, n_head=2, n_layer=2)

windows = st.lists(st.lists(st.integers(1, 6), min_size=1, max_size=4), min_size=1, max_size=3).filter(
    lambda rows: all(sum(r) <= CFG.n_ctx for r in rows) and len({sum(r) for r in rows}) == 1
)  # rows of document lengths, every row the same total T


@pytest.mark.parametrize("kernels", ["fast", "reference"])
@settings(max_examples=15, deadline=None)
@given(lengths=windows, seed=st.integers(0, 2**16))
def test_a_packed_window_scores_each_document_as_if_alone(kernels, lengths, seed):
    model = random_model(CFG, seed)
    if kernels == "reference":
        model = GPT.from_numpy(CFG, model.to_numpy(), NumpyBackend(REFERENCE))
    rng = np.random.default_rng(seed)
    T = sum(lengths[0])
    ids, targets = rng.integers(0, CFG.vocab_size, (len(lengths), T)), rng.integers(0, CFG.vocab_size, (len(lengths), T))
    segments = np.array([np.repeat(np.arange(len(row)) * 7 + 1, row) for row in lengths])
    logits = model.forward(ids, segments=segments)
    packed_loss = float(model.loss(ids, targets, segments=segments))
    total = 0.0
    for b, row in enumerate(lengths):
        for start, n in zip(np.cumsum([0, *row[:-1]]), row):
            alone = slice(start, start + n)
            np.testing.assert_allclose(logits[b, alone], model.forward(ids[b : b + 1, alone])[0], rtol=0, atol=1e-12)
            total += n * float(model.loss(ids[b : b + 1, alone], targets[b : b + 1, alone]))
    np.testing.assert_allclose(packed_loss, total / ids.size, rtol=1e-12)


def test_one_segment_is_no_segments():
    model = random_model(CFG, 0)
    ids = np.arange(2 * 9).reshape(2, 9) % CFG.vocab_size
    np.testing.assert_array_equal(model.forward(ids, segments=np.zeros_like(ids)), model.forward(ids))


def test_positions_restart_at_each_document():
    segments = np.array([[4, 4, 4, 9, 9, 2], [0, 1, 1, 1, 1, 1]])
    np.testing.assert_array_equal(segment_positions(segments), [[0, 1, 2, 0, 1, 0], [0, 0, 1, 2, 3, 4]])


def test_bad_segments_are_refused():
    model = random_model(CFG, 0)
    ids = np.zeros((1, 4), dtype=np.int64)
    with pytest.raises(ValueError, match="cannot be combined with a KV cache"):
        model.forward(ids, model.new_cache(1), segments=np.zeros_like(ids))
    with pytest.raises(ValueError, match="one contiguous run"):
        model.forward(ids, segments=np.array([[0, 1, 0, 1]]))
    with pytest.raises(ValueError, match="segments must be a"):
        model.forward(ids, segments=np.zeros((1, 3), dtype=np.int64))


def test_segments_on_every_test_backend(backend):
    """Host or device segments on any backend give NumPy's loss and gradients."""
    ids = np.arange(2 * 9).reshape(2, 9) % 37
    segments = np.array([[0, 0, 0, 0, 1, 1, 1, 1, 1], [5, 5, 6, 6, 6, 6, 6, 6, 6]])
    model, reference = tiny_model(backend), tiny_model()
    loss, grads = model.loss_and_grads(ids, ids, segments=model.backend.asarray(segments))
    ref_loss, ref_grads = reference.loss_and_grads(ids, ids, segments=segments)
    assert abs(float(host(model, loss)) - float(ref_loss)) < 1e-5
    for name in grads:
        np.testing.assert_allclose(host(model, grads[name]), ref_grads[name], rtol=0, atol=1e-5, err_msg=name)
