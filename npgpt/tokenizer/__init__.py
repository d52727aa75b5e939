"""npgpt's tokenizers: GPT-2's byte-level BPE in pure Python (ids identical to tiktoken's),
a BPE trainer, and a character-level tokenizer with the same interface.

Loading and using one::

    from npgpt.tokenizer import load, save
    tok = load("weights/gpt2")                  # a directory in any form below, or a .tiktoken file
    ids = tok.encode("hello world")             # [31373, 995]
    tok.encode("hi<|endoftext|>", allowed_special="all")   # [5303, 50256]
    tok.decode(ids)                             # "hello world"; invalid UTF-8 -> U+FFFD
    tok.n_vocab, tok.eot_id, tok.special_tokens # 50257, 50256, {"<|endoftext|>": 50256}

Every tokenizer (`Tokenizer` subclass) has:

- `encode(text, *, allowed_special=(), disallowed_special="all") -> list[int]`: tiktoken's
  rules: a special token's string becomes its id only if allowed ("all" or a set of
  strings); by default any other special string raises ValueError; with
  `disallowed_special=()` it is encoded as ordinary text. `encode_ordinary(text)` is the
  latter directly.
- `decode(ids) -> str`, `decode_bytes(ids) -> bytes`, `token_bytes(id) -> bytes`.
- `stream_decoder()`: an object with `.feed(id) -> str` and `.flush() -> str` that emits
  only complete UTF-8 characters; all its pieces joined equal `decode(ids)`.
- `n_vocab` (largest id + 1), `eot_id` (id of <|endoftext|> or None), `special_tokens`
  (string -> id).

Files (all in `formats`, the one module that reads and writes them):

- `save(tokenizer, directory, format=None)`: BPE: "tiktoken" (default), "huggingface" or
  "gpt2"; character-level: its own form. `npgpt_tokenizer.json` (pattern, special tokens)
  is written beside the vocabulary.
- `load(directory)`: detects npgpt_tokenizer.json, `*.tiktoken`, `encoder.json` +
  `vocab.bpe`, or `vocab.json` + `merges.txt`, and validates them (errors name the file and
  line: `TokenizerFileError`).

Classes and functions:

- `BPETokenizer(ranks, special_tokens=None, pattern=GPT2_PATTERN)`: `ranks` maps token
  bytes -> id; `pattern` is "gpt2", "gpt4" or a regex. `.merges()` lists merge rules.
- `train_bpe(text, vocab_size, pattern="gpt2", special_tokens=())` -> BPETokenizer.
- `CharTokenizer(chars)`, `CharTokenizer.train(text)`: vocabulary = sorted set of characters.
- `GPT2_PATTERN`, `GPT4_PATTERN`: the split patterns.

Command line: `python -m npgpt.tokenizer train|encode|decode --help`.

The split pattern's `\\p{L}`/`\\p{N}` follow the Unicode tables of the installed `regex`
release; tests/test_tokenizer_unicode.py pins the releases whose tables agree with
tiktoken's on every code point.
"""

from npgpt.tokenizer.base import ENDOFTEXT, StreamDecoder, Tokenizer
from npgpt.tokenizer.bpe import GPT2_PATTERN, GPT4_PATTERN, BPETokenizer
from npgpt.tokenizer.char import CharTokenizer
from npgpt.tokenizer.formats import TokenizerFileError, load, save
from npgpt.tokenizer.train import train_bpe

__all__ = [
    "ENDOFTEXT",
    "GPT2_PATTERN",
    "GPT4_PATTERN",
    "BPETokenizer",
    "CharTokenizer",
    "StreamDecoder",
    "Tokenizer",
    "TokenizerFileError",
    "load",
    "save",
    "train_bpe",
]
