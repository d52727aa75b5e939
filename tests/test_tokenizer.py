"""GPT-2's tokenizer: ids identical to tiktoken's, round trips, special tokens, streaming, file forms."""

from __future__ import annotations

import json

import pytest
import tiktoken
import tiktoken.load
from conftest import data_path
from hypothesis import given, settings
from hypothesis import strategies as st

from npgpt.tokenizer import ENDOFTEXT, BPETokenizer
from npgpt.tokenizer.formats import read_merges_form, read_tiktoken
from npgpt.tokenizer.formats import load as load_tokenizer, save as save_tokenizer

# The published form of GPT-2's split pattern (npgpt uses an equivalent possessive form).
PUBLISHED_GPT2_PATTERN = r"""'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"""
TIKTOKEN_GPT2_PATTERN = r"""'(?:[sdmt]|ll|ve|re)| ?\p{L}++| ?\p{N}++| ?[^\s\p{L}\p{N}]++|\s++$|\s+(?!\S)|\s"""


@pytest.fixture(scope="module")
def gpt2() -> BPETokenizer:
    return load_tokenizer(data_path("gpt2/gpt2.tiktoken"))


@pytest.fixture(scope="module")
def reference() -> tiktoken.Encoding:
    """tiktoken's "gpt2" Encoding, built offline from the same rank file."""
    ranks = tiktoken.load.load_tiktoken_bpe(str(data_path("gpt2/gpt2.tiktoken")))
    return tiktoken.Encoding(
        name="gpt2-offline", pat_str=TIKTOKEN_GPT2_PATTERN, mergeable_ranks=ranks, special_tokens={ENDOFTEXT: 50256}
    )


# Text with the things tokenizers get wrong: whitespace runs, digits, contractions, emoji,
# CJK, combining marks. Code points unassigned in Python's Unicode tables (Cn) are left to
# test_tokenizer_unicode.py, which checks every code point against tiktoken once.
tricky_pieces = st.sampled_from(
    [" ", "  ", "\n", "\n\n", "\t", " \n ", "\r\n", "'s", "'ll", "'re", "'ve", "'m", "'d", "'t", "'S", "don't",
     "123", " 4567", "3.14", "!!", "?!", " ...", "😀", "👍🏽", "🇺🇸", "中文字", "日本語", "한국어", "e\u0301",
     "a\u0308\u0323", "\u200b", "\u00a0", "\u3000", "Ω≈ç√", "ﬁ", "‼", "<|endoftext", "|>"]
)
assigned_text = st.text(st.characters(exclude_categories=("Cs", "Cn")))
texts = st.lists(st.one_of(tricky_pieces, assigned_text), max_size=12).map("".join)


def test_golden_vectors(gpt2):
    assert gpt2.encode("hello world") == [31373, 995]
    assert gpt2.encode("hello <|endoftext|>", allowed_special={ENDOFTEXT}) == [31373, 220, 50256]
    assert gpt2.encode("hello <|endoftext|>", allowed_special="all") == [31373, 220, 50256]
    assert gpt2.decode([31373, 995]) == "hello world"
    assert (gpt2.n_vocab, gpt2.eot_id, gpt2.special_tokens) == (50257, 50256, {ENDOFTEXT: 50256})


def test_tinyshakespeare_ids_identical_to_tiktoken(gpt2, reference):
    text = data_path("corpora/tinyshakespeare.txt").read_text("utf-8")
    ids = gpt2.encode(text)
    assert ids == reference.encode(text)
    assert gpt2.decode(ids) == text


@settings(max_examples=300, deadline=None)
@given(texts)
def test_ids_identical_to_tiktoken_and_round_trip(gpt2, reference, text):
    ids = gpt2.encode(text, disallowed_special=())
    assert ids == reference.encode(text, disallowed_special=())
    assert gpt2.decode(ids) == text


@settings(max_examples=100, deadline=None)
@given(st.text(st.characters(exclude_categories=("Cn",))))
def test_lone_surrogates_encode_as_tiktoken_does(gpt2, reference, text):
    assert gpt2.encode(text, disallowed_special=()) == reference.encode(text, disallowed_special=())


@settings(max_examples=200, deadline=None)
@given(st.lists(st.integers(0, 50256), max_size=30))
def test_decode_of_any_ids_matches_tiktoken(gpt2, reference, ids):
    """Arbitrary ids can end mid-character: bytes that are not UTF-8 decode to U+FFFD."""
    assert gpt2.decode(ids) == reference.decode(ids)
    assert gpt2.decode_bytes(ids) == reference.decode_bytes(ids)


def test_special_tokens_follow_tiktoken_rules(gpt2, reference):
    text = "a<|endoftext|>b"
    with pytest.raises(ValueError, match="special token '<\\|endoftext\\|>'.*allowed_special"):
        gpt2.encode(text)
    assert gpt2.encode(text, allowed_special="all") == reference.encode(text, allowed_special="all")
    as_text = gpt2.encode(text, disallowed_special=())
    assert as_text == reference.encode(text, disallowed_special=()) and 50256 not in as_text
    assert gpt2.encode_ordinary(text) == as_text
    with pytest.raises(ValueError, match="not special tokens"):
        gpt2.encode(text, allowed_special={"<|im_start|>"})


def test_special_token_beside_text_splits_as_tiktoken():
    tok = BPETokenizer({bytes([b]): b for b in range(256)}, {"<a>": 256, "<ab>": 257})
    assert tok.encode("x<ab>y<a>", allowed_special="all") == [120, 257, 121, 256]
    assert tok.encode("x<ab>", allowed_special={"<a>"}, disallowed_special=()) == [120, 60, 97, 98, 62]


@settings(max_examples=200, deadline=None)
@given(st.lists(st.integers(0, 50256), max_size=30))
def test_stream_decoder_concatenates_to_decode(gpt2, ids):
    stream = gpt2.stream_decoder()
    pieces = [stream.feed(i) for i in ids] + [stream.flush()]
    assert "".join(pieces) == gpt2.decode(ids)


@settings(max_examples=200, deadline=None)
@given(texts)
def test_stream_decoder_never_emits_broken_characters(gpt2, text):
    """On valid text every piece is a run of whole characters, emitted as soon as complete."""
    stream = gpt2.stream_decoder()
    emitted = ""
    ids = gpt2.encode(text, disallowed_special=())
    for n, token_id in enumerate(ids, 1):
        emitted += stream.feed(token_id)
        assert "\ufffd" not in emitted or "\ufffd" in text
        done = gpt2.decode_bytes(ids[:n]).decode("utf-8", errors="ignore")
        assert emitted == done or (done.startswith(emitted) and len(done) - len(emitted) <= 1)
    assert emitted + stream.flush() == text


def test_three_published_forms_load_to_the_same_tokenizer(gpt2, tmp_path):
    gpt2_dir = data_path("gpt2/encoder.json").parent
    ranks, specials = read_merges_form(gpt2_dir / "encoder.json", gpt2_dir / "vocab.bpe")
    assert ranks == read_tiktoken(gpt2_dir / "gpt2.tiktoken") == gpt2.ranks
    assert specials == {ENDOFTEXT: 50256}
    # Hugging Face's form holds the same two files under other names.
    hf_dir = tmp_path / "hf"
    hf_dir.mkdir()
    (hf_dir / "vocab.json").write_bytes((gpt2_dir / "encoder.json").read_bytes())
    (hf_dir / "merges.txt").write_bytes((gpt2_dir / "vocab.bpe").read_bytes())
    openai_dir = tmp_path / "openai"
    openai_dir.mkdir()
    for name in ("encoder.json", "vocab.bpe"):
        (openai_dir / name).write_bytes((gpt2_dir / name).read_bytes())
    for tok in (load_tokenizer(gpt2_dir), load_tokenizer(hf_dir), load_tokenizer(openai_dir)):
        assert tok.ranks == gpt2.ranks and tok.special_tokens == gpt2.special_tokens
        assert tok.pattern == gpt2.pattern


@pytest.fixture(scope="module")
def gpt2_huggingface_dir(gpt2, tmp_path_factory):
    return save_tokenizer(gpt2, tmp_path_factory.mktemp("gpt2-hf"), format="huggingface")


def test_saved_merges_reproduce_gpt2s_files(gpt2_huggingface_dir):
    """Merge rules derived from ranks alone are exactly OpenAI's vocab.bpe."""
    saved_vocab = json.loads((gpt2_huggingface_dir / "vocab.json").read_text("utf-8"))
    assert saved_vocab == json.loads(data_path("gpt2/encoder.json").read_text("utf-8"))
    saved_merges = (gpt2_huggingface_dir / "merges.txt").read_text("utf-8").splitlines()
    assert saved_merges[1:] == data_path("gpt2/vocab.bpe").read_text("utf-8").splitlines()[1:]


def test_save_load_round_trip(gpt2, gpt2_huggingface_dir, tmp_path):
    for directory in (save_tokenizer(gpt2, tmp_path, format="tiktoken"), gpt2_huggingface_dir):
        loaded = load_tokenizer(directory)
        assert (loaded.ranks, loaded.special_tokens, loaded.pattern) == (gpt2.ranks, gpt2.special_tokens, gpt2.pattern)


def test_saved_huggingface_form_loads_in_transformers(gpt2, gpt2_huggingface_dir):
    transformers = pytest.importorskip("transformers")
    hf = transformers.GPT2Tokenizer(str(gpt2_huggingface_dir / "vocab.json"), str(gpt2_huggingface_dir / "merges.txt"))
    text = "Hello world, it's 2024!  Ünïcödé 中文 😀\n\n"
    assert hf.encode(text) == gpt2.encode(text)


def test_errors_say_what_is_wrong(gpt2, tmp_path):
    with pytest.raises(ValueError, match="not in this vocabulary"):
        gpt2.decode([50257])
    with pytest.raises(ValueError, match="not in this vocabulary"):
        gpt2.stream_decoder().feed(-1)
    with pytest.raises(FileNotFoundError, match="no tokenizer found"):
        load_tokenizer(tmp_path)
    with pytest.raises(ValueError, match="every single byte"):
        BPETokenizer({b"a": 0})


# -- the package's shape: no import circle ----------------------------------------------------
TOKENIZER_MODULES = ["base", "bpe", "char", "formats", "train", "__main__"]


@pytest.mark.parametrize("module", TOKENIZER_MODULES)
def test_each_tokenizer_module_imports_alone_in_a_fresh_interpreter(module):
    import subprocess
    import sys

    name = f"npgpt.tokenizer.{module}"
    code = f"import importlib, sys; importlib.import_module({name!r}); print(sorted(m for m in sys.modules if m.startswith('npgpt.tokenizer.')))"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr


def test_the_tokenizer_modules_import_no_circle():
    """Every import in the package, function-local ones included, points one way."""
    import ast
    from pathlib import Path

    folder = Path(__import__("npgpt.tokenizer").tokenizer.__file__).parent
    graph = {}
    for module in TOKENIZER_MODULES:
        tree = ast.parse((folder / f"{module}.py").read_text("utf-8"))
        targets = set()
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("npgpt.tokenizer."):
                targets.add(node.module.rsplit(".", 1)[1])
            elif isinstance(node, ast.ImportFrom) and node.module == "npgpt.tokenizer":
                targets.add("__init__")
        graph[module] = targets
    order = ["base", "bpe", "char", "train", "formats", "__main__"]  # each imports only earlier ones
    for module, targets in graph.items():
        assert targets <= set(order[: order.index(module)]), (module, targets)
