"""Training BPE vocabularies, the character-level tokenizer, and the command line."""

from __future__ import annotations

import warnings
from collections import Counter
from unittest import mock

import pytest
from conftest import data_path
from test_bpe_merge import ALPHABET, token_bytes
from hypothesis import example, given, settings
from hypothesis import strategies as st

from npgpt.tokenizer import BPETokenizer, CharTokenizer, train_bpe
from npgpt.tokenizer.__main__ import main as cli
from npgpt.tokenizer import train
from npgpt.tokenizer.bpe import GPT2_PATTERN, GPT4_PATTERN, SINGLE_BYTES, bpe_merge
from npgpt.tokenizer.train import _ChunkCorpus, _LongChunk, count_chunks
from npgpt.tokenizer.formats import load as load_tokenizer, save as save_tokenizer


def test_hand_worked_merges():
    """"aaabdaaabac" is one chunk. Pair counts: aa 4, ab 2, ... -> "aa" (256). Now
    [aa a b d aa a b a c]: (aa,a) and (a,b) both 2; the tie goes to the pair whose bytes sort
    first, (a,b) -> "ab" (257). Now [aa ab d aa ab a c]: (aa,ab) 2 -> "aaab" (258)."""
    tok = train_bpe("aaabdaaabac", vocab_size=259)
    assert tok.merges() == [(b"a", b"a"), (b"a", b"b"), (b"aa", b"ab")]
    assert tok.encode("aaabdaaabac") == [258, ord("d"), 258, ord("a"), ord("c")]


def brute_force_train(text: str, vocab_size: int, pattern: str) -> dict[bytes, int]:
    """The definition, slowly: every step re-encode every chunk with the vocabulary so far,
    count all adjacent pairs, and add the most frequent (ties: smallest bytes)."""
    chunks = count_chunks(text, pattern)
    ranks = {token: rank for rank, token in enumerate(SINGLE_BYTES)}
    while len(ranks) < vocab_size:
        tok = BPETokenizer(dict(ranks), pattern=pattern)
        pairs = Counter()
        for chunk, count in chunks.items():
            tokens = [tok.token_bytes(i) for i in tok._encode_chunk(chunk)]
            for pair in zip(tokens, tokens[1:]):
                pairs[pair] += count
        if not pairs:
            break
        best = min(pairs, key=lambda pair: (-pairs[pair], pair))
        ranks[best[0] + best[1]] = len(ranks)
    return ranks


@pytest.mark.parametrize("pattern", ["gpt2", "gpt4"])
def test_incremental_training_equals_brute_force(pattern):
    text = data_path("corpora/tinyshakespeare.txt").read_text("utf-8")[:3000]
    pattern = {"gpt2": GPT2_PATTERN, "gpt4": GPT4_PATTERN}[pattern]
    assert train_bpe(text, 330, pattern).ranks == brute_force_train(text, 330, pattern)


@settings(max_examples=30, deadline=None)
@given(st.text(st.sampled_from("ab \n'é"), max_size=60), st.integers(256, 280))
def test_incremental_training_equals_brute_force_on_small_alphabets(text, vocab_size):
    """Repetitive text makes merges that create older-rank neighbours and whole-chunk tokens."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # short texts run out of pairs before vocab_size
        ranks = train_bpe(text, vocab_size).ranks
    assert ranks == brute_force_train(text, len(ranks), GPT2_PATTERN)


def every_chunk_incremental():
    """Every chunk of two bytes or more goes the _LongChunk way (the threshold is forced down)."""
    return mock.patch.object(train, "INCREMENTAL_FROM", 2)


def train_quietly(text: str, vocab_size: int, pattern: str = "gpt2") -> dict[bytes, int]:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # short texts run out of pairs before vocab_size
        return train_bpe(text, vocab_size, pattern).ranks


@pytest.mark.parametrize("pattern", [GPT2_PATTERN, GPT4_PATTERN])
def test_incremental_long_chunks_equal_brute_force(pattern):
    text = data_path("corpora/tinyshakespeare.txt").read_text("utf-8")[:3000]
    with every_chunk_incremental():
        assert train_bpe(text, 330, pattern).ranks == brute_force_train(text, 330, pattern)


@settings(max_examples=30, deadline=None)
@given(st.text(st.sampled_from("ab \n'é"), max_size=60), st.integers(256, 280))
def test_incremental_long_chunks_equal_brute_force_on_small_alphabets(text, vocab_size):
    with every_chunk_incremental():
        ranks = train_quietly(text, vocab_size)
    assert ranks == brute_force_train(text, len(ranks), GPT2_PATTERN)


@st.composite
def long_texts(draw) -> str:
    """A few words of 100-3000 letters from a small alphabet, some repeated, joined by runs
    of spaces and newlines: texts whose chunks are long."""
    words = draw(st.lists(st.text(st.sampled_from("abcd"), min_size=100, max_size=3000), min_size=1, max_size=3))
    picks = draw(st.lists(st.integers(0, len(words) - 1), min_size=1, max_size=6))
    return "".join(words[i] + draw(st.sampled_from([" ", "  ", "\n", " \n "])) for i in picks)


@settings(max_examples=25, deadline=None)
@given(long_texts(), st.sampled_from(["gpt2", r"\S+|\s+"]), st.integers(256, 330))
def test_long_chunk_path_equals_the_whole_chunk_path(text, pattern, vocab_size):
    """The same ranks whether every chunk is re-encoded whole or every chunk incrementally."""
    with mock.patch.object(train, "INCREMENTAL_FROM", 10**9):
        expected = train_quietly(text, vocab_size, pattern)
    with every_chunk_incremental():
        assert train_quietly(text, vocab_size, pattern) == expected


@settings(max_examples=15, deadline=None)
@given(long_texts(), st.integers(1, 60))
def test_long_chunks_stay_what_the_encoder_gives(text, n_merges):
    """After every new token, each chunk's tokens are the encoder's parts for it."""
    ranks = {token: rank for rank, token in enumerate(SINGLE_BYTES)}
    with every_chunk_incremental():
        corpus = _ChunkCorpus(count_chunks(text, GPT2_PATTERN), ranks)
    assert corpus.long or not any(len(chunk) >= 2 for chunk in corpus.chunks)
    for _ in range(n_merges):
        pair = corpus.most_frequent_pair()
        if pair is None:
            break
        ranks[pair[0] + pair[1]] = len(ranks)
        corpus.add_token(pair[0] + pair[1])
        tok = BPETokenizer(dict(ranks))
        for i, chunk in enumerate(corpus.chunks):
            assert corpus.parts(i) == [tok.token_bytes(t) for t in tok._encode_chunk(chunk)]


@settings(max_examples=200, deadline=None)
@given(st.lists(token_bytes, unique=True, max_size=40), st.lists(st.sampled_from(ALPHABET), max_size=300).map(bytes))
@example([b"ab", b"bcd", b"abcd", b"cd"], b"abcd")  # "cd" makes (ab, cd): "abcd", older, joins too
@example([b"cd", b"abc", b"abcd", b"ab"], b"abcd")  # the same on the right of "ab"
@example([b"cdq", b"pcd", b"cd"], b"pcdq")  # "cd" makes (p, cd) and (cd, q): the lower rank joins
def test_long_chunk_continues_the_encoders_merge(tokens, chunk):
    """For any vocabulary (cascades of older-rank joins included, which trained vocabularies
    rarely make), adding tokens one at a time gives `bpe_merge`'s parts with the ranks so
    far, and the pair changes it reports are the true ones."""
    ranks = {token: rank for rank, token in enumerate(SINGLE_BYTES)}
    long_chunk = _LongChunk(chunk)
    for token in tokens:
        before = long_chunk.parts()
        ranks[token] = len(ranks)
        changes = long_chunk.add_token(token, ranks)
        after = long_chunk.parts()
        assert after == bpe_merge(list(map(SINGLE_BYTES.__getitem__, chunk)), ranks)
        expected = Counter(zip(after, after[1:]))
        expected.subtract(Counter(zip(before, before[1:])))
        assert changes == Counter({pair: change for pair, change in expected.items() if change})


@settings(max_examples=100, deadline=None)
@given(
    st.lists(token_bytes, unique=True, max_size=30),
    st.dictionaries(st.lists(st.sampled_from(ALPHABET), min_size=1, max_size=80).map(bytes), st.integers(1, 3)),
    st.sampled_from([2, 10**9]),
)
@example([b"abc"], {b"abc": 1, b"abcabc": 2}, 2)  # "abc" is chunk 0 as a whole, not a pair of [a, b, c]
def test_corpus_tokens_and_counts_follow_any_vocabulary(tokens, chunk_counts, incremental_from):
    """Whatever tokens are added (in rank order), every chunk's tokens are the encoder's parts
    (a chunk that is a token as a whole included) and the pair counts are their true sums."""
    ranks = {token: rank for rank, token in enumerate(SINGLE_BYTES)}
    with mock.patch.object(train, "INCREMENTAL_FROM", incremental_from):
        corpus = _ChunkCorpus(Counter(chunk_counts), ranks)
    for token in tokens:
        ranks[token] = len(ranks)
        corpus.add_token(token)
    tok = BPETokenizer(dict(ranks))
    expected_counts = Counter()
    for i, (chunk, count) in enumerate(chunk_counts.items()):
        parts = corpus.parts(i)
        assert parts == [tok.token_bytes(t) for t in tok._encode_chunk(chunk)]
        for pair in zip(parts, parts[1:]):
            expected_counts[pair] += count
    assert corpus.pair_counts == expected_counts


def test_special_tokens_are_registered_and_never_merged():
    text = "hello<|endoftext|>hello<|endoftext|>hello"
    tok = train_bpe(text, 261, special_tokens=["<|endoftext|>"])  # 4 merges make "hello"
    assert tok.special_tokens == {"<|endoftext|>": 260} and tok.eot_id == 260 and tok.n_vocab == 261
    assert all(b"<" not in token for token in tok.ranks if len(token) > 1)
    assert tok.encode(text, allowed_special="all") == [259, 260, 259, 260, 259]


@pytest.mark.parametrize("format", ["tiktoken", "huggingface", "gpt2"])
def test_trained_vocabulary_save_load_round_trip(tmp_path, format):
    text = data_path("corpora/tinyshakespeare.txt").read_text("utf-8")[:20000]
    tok = train_bpe(text, 400, "gpt4", special_tokens=["<|endoftext|>", "<|pad|>"])
    loaded = load_tokenizer(save_tokenizer(tok, tmp_path, format=format))
    assert (loaded.ranks, loaded.special_tokens, loaded.pattern) == (tok.ranks, tok.special_tokens, GPT4_PATTERN)
    assert loaded.encode(text) == tok.encode(text)
    assert loaded.decode(tok.encode(text)) == text


def test_training_is_deterministic():
    text = data_path("corpora/tinyshakespeare.txt").read_text("utf-8")[:5000]
    assert train_bpe(text, 300).ranks == train_bpe(text, 300).ranks


def test_too_small_vocab_size_is_an_error():
    with pytest.raises(ValueError, match="below 256 bytes"):
        train_bpe("abc", 256, special_tokens=["<|endoftext|>"])


def test_char_tokenizer(tmp_path):
    text = "hello, wörld\n"
    tok = CharTokenizer.train(text)
    assert tok.chars == sorted(set(text)) and tok.n_vocab == len(set(text)) and tok.eot_id is None
    ids = tok.encode(text)
    assert ids == [tok.chars.index(c) for c in text] and tok.decode(ids) == text
    stream = tok.stream_decoder()
    assert "".join(stream.feed(i) for i in ids) + stream.flush() == text
    loaded = load_tokenizer(save_tokenizer(tok, tmp_path))
    assert isinstance(loaded, CharTokenizer) and loaded.chars == tok.chars
    with pytest.raises(ValueError, match="'z' is not in this character-level vocabulary"):
        tok.encode("z")
    with pytest.raises(ValueError, match="not in this vocabulary"):
        tok.decode([len(tok.chars)])


def test_cli_train_encode_decode(tmp_path, capsys):
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("the cat sat on the mat. the end.\n" * 20, "utf-8")
    assert cli(["train", str(corpus), str(tmp_path / "tok"), "--vocab-size", "270", "--special", "<|endoftext|>"]) == 0
    tok = load_tokenizer(tmp_path / "tok")
    assert tok.n_vocab == 270 and tok.eot_id == 269
    capsys.readouterr()
    cli(["encode", str(tmp_path / "tok"), "--allow-special", "--text", "the mat<|endoftext|>"])
    ids = capsys.readouterr().out.split()
    assert [int(i) for i in ids] == tok.encode("the mat<|endoftext|>", allowed_special="all")
    cli(["decode", str(tmp_path / "tok"), *ids])
    assert capsys.readouterr().out == "the mat<|endoftext|>"
    assert cli(["train", str(corpus), str(tmp_path / "chars"), "--char"]) == 0
    assert isinstance(load_tokenizer(tmp_path / "chars"), CharTokenizer)
