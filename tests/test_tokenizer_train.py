"""Training BPE vocabularies, the character-level tokenizer, and the command line."""

from __future__ import annotations

import warnings
from collections import Counter

import pytest
from conftest import data_path
from hypothesis import given, settings
from hypothesis import strategies as st

from npgpt.tokenizer import BPETokenizer, CharTokenizer, train_bpe
from npgpt.tokenizer.__main__ import main as cli
from npgpt.tokenizer.bpe import GPT2_PATTERN, GPT4_PATTERN, SINGLE_BYTES
from npgpt.tokenizer.train import count_chunks
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
