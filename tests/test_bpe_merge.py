"""BPE merging: the heap merge (long chunks) equals the quadratic reference on any vocabulary,
and chunks of 100,000 characters encode to tiktoken's ids."""

from __future__ import annotations

import random
import string

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from test_tokenizer import gpt2, reference  # noqa: F401 (fixtures)

from npgpt.tokenizer.bpe import HEAP_FROM, SINGLE_BYTES, bpe_merge, bpe_merge_heap

# Tokens and most chunks are drawn from a 3-byte alphabet so that random vocabularies make
# many merges, long ones included.
ALPHABET = b"ab\xff"
token_bytes = st.lists(st.sampled_from(ALPHABET), min_size=2, max_size=5).map(bytes)


@st.composite
def vocabularies(draw) -> dict[bytes, int]:
    """All 256 single bytes plus random multi-byte tokens, with random distinct ranks."""
    tokens = list(SINGLE_BYTES) + draw(st.lists(token_bytes, unique=True, min_size=3, max_size=80))
    ranks = draw(st.permutations(range(len(tokens))))
    return dict(zip(tokens, ranks))


chunks = st.one_of(
    st.binary(max_size=150),
    st.lists(st.sampled_from(ALPHABET), max_size=200).map(bytes),
)


@settings(max_examples=200, deadline=None)
@given(vocabularies(), chunks, st.one_of(st.none(), st.integers(0, 320)))
def test_heap_merge_equals_the_reference(ranks, chunk, stop_rank):
    kwargs = {} if stop_rank is None else {"stop_rank": stop_rank}
    expected = bpe_merge(list(map(SINGLE_BYTES.__getitem__, chunk)), ranks, **kwargs)
    assert bpe_merge_heap(chunk, ranks, **kwargs) == expected


def test_heap_merge_equals_the_reference_on_gpt2(gpt2):
    rng = random.Random(0)
    for length in (HEAP_FROM - 1, HEAP_FROM, 500, 3000):
        chunk = "".join(rng.choice(string.ascii_lowercase) for _ in range(length)).encode()
        assert bpe_merge_heap(chunk, gpt2.ranks) == bpe_merge(list(map(SINGLE_BYTES.__getitem__, chunk)), gpt2.ranks)


def _long_texts() -> dict[str, str]:
    rng = random.Random(1)
    n = 100_000
    return {
        "letters": "".join(rng.choice(string.ascii_lowercase) for _ in range(n)),
        "digits": "".join(rng.choice(string.digits) for _ in range(n)),
        "punctuation": "".join(rng.choice("!\"#$%&()*+,-./:;<=>?@[]^_{|}~") for _ in range(n)),
        "spaces": " " * (n - 1) + "x",
        "mixed": "".join(rng.choice(string.ascii_letters + string.digits + string.punctuation + "  ") for _ in range(n)),
        "base64": "".join(rng.choice(string.ascii_letters + string.digits + "+/") for _ in range(n)),
    }


@pytest.mark.parametrize("kind", list(_long_texts()))
def test_100k_character_chunks_match_tiktoken(gpt2, reference, kind):
    text = _long_texts()[kind]
    gpt2._cache.clear()
    assert gpt2.encode_ordinary(text) == reference.encode_ordinary(text)
