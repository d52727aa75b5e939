"""Reading and writing vocabularies in their published forms, and finding which a directory holds.

- tiktoken: `<name>.tiktoken`, one line per token: base64 of its bytes, a space, its id.
- OpenAI's GPT-2 release: `encoder.json` (token -> id) + `vocab.bpe` (merge rules in order).
- Hugging Face: `vocab.json` + `merges.txt`, the same two files under other names.
  The last two write bytes as printable characters (GPT-2's `bytes_to_unicode` table).
- npgpt_tokenizer.json, written beside the vocabulary by `save`: the split pattern, the
  special tokens and which form the vocabulary is in (or, for a character-level
  tokenizer, the whole vocabulary).

Without npgpt_tokenizer.json a vocabulary is taken as GPT-2's: its split pattern, and
for a tiktoken file `<|endoftext|>` as the id after the last rank (as tiktoken's "gpt2");
in the two merges forms, entries that are neither a byte nor a merge's result are the
special tokens.
"""

from __future__ import annotations

import base64
import json
from functools import lru_cache
from pathlib import Path

from npgpt.tokenizer.base import ENDOFTEXT, Tokenizer
from npgpt.tokenizer.bpe import GPT2_PATTERN, BPETokenizer

METADATA = "npgpt_tokenizer.json"
TIKTOKEN_FILE = "tokenizer.tiktoken"
MERGES_FORMS = {  # format name -> (vocabulary file, merges file)
    "gpt2": ("encoder.json", "vocab.bpe"),
    "huggingface": ("vocab.json", "merges.txt"),
}


@lru_cache(maxsize=None)
def bytes_to_unicode() -> dict[int, str]:
    """GPT-2's table from each byte to a printable character: printable Latin-1 bytes map to
    themselves, the other 68 (controls, space, soft hyphen...) to chr(256), chr(257), ..."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    table = {b: chr(b) for b in printable}
    others = (b for b in range(256) if b not in table)
    table.update((b, chr(256 + n)) for n, b in enumerate(others))
    return dict(sorted(table.items()))


@lru_cache(maxsize=None)
def unicode_to_bytes() -> dict[str, int]:
    return {char: b for b, char in bytes_to_unicode().items()}


def token_to_text(token: bytes) -> str:
    return "".join(map(bytes_to_unicode().__getitem__, token))


def text_to_token(text: str) -> bytes:
    return bytes(map(unicode_to_bytes().__getitem__, text))


# --- tiktoken -------------------------------------------------------------------------
def read_tiktoken(path: str | Path) -> dict[bytes, int]:
    ranks = {}
    for line_number, line in enumerate(Path(path).read_text("ascii").splitlines(), 1):
        if not line:
            continue
        try:
            token, rank = line.split()
            ranks[base64.b64decode(token, validate=True)] = int(rank)
        except ValueError as error:
            raise ValueError(f"{path}:{line_number}: not a 'base64 rank' line ({error})") from None
    return ranks


def write_tiktoken(path: Path, ranks: dict[bytes, int]) -> None:
    lines = (f"{base64.b64encode(token).decode()} {rank}\n" for token, rank in sorted(ranks.items(), key=lambda t: t[1]))
    path.write_text("".join(lines), "ascii")


# --- encoder.json + vocab.bpe / vocab.json + merges.txt -------------------------------
def read_merges_form(vocab_path: str | Path, merges_path: str | Path) -> tuple[dict[bytes, int], dict[str, int]]:
    """(ranks, special_tokens) from a vocabulary + merges pair of files."""
    vocab = json.loads(Path(vocab_path).read_text("utf-8"))
    merges = [line.split(" ") for line in Path(merges_path).read_text("utf-8").splitlines()]
    merges = [pair for pair in merges if pair != [""] and not pair[0].startswith("#version")]
    merged = {left + right for left, right in merges}
    byte_chars = unicode_to_bytes()
    ranks, special_tokens = {}, {}
    for text, token_id in vocab.items():
        if text in byte_chars or text in merged:
            ranks[text_to_token(text)] = token_id
        else:
            special_tokens[text] = token_id
    _check_merge_order(merges, vocab, merges_path)
    return ranks, special_tokens


def _check_merge_order(merges: list[list[str]], vocab: dict[str, int], merges_path) -> None:
    """Ids must grow with merge order, since the encoder uses a token's id as its rank."""
    previous = max(vocab[char] for char in bytes_to_unicode().values())
    for line_number, (left, right) in enumerate(merges, 1):
        token_id = vocab.get(left + right)
        if token_id is None:
            raise ValueError(f"{merges_path}: merge {line_number} ({left} {right}) makes a token missing from the vocabulary")
        if token_id <= previous:
            raise ValueError(
                f"{merges_path}: merge {line_number} ({left} {right}) gives id {token_id}, not above the "
                f"previous merge's {previous}; npgpt needs ids in merge order (as GPT-2's are)"
            )
        previous = token_id


def write_merges_form(directory: Path, tokenizer: BPETokenizer, form: str = "huggingface") -> None:
    vocab_name, merges_name = MERGES_FORMS[form]
    vocab = {token_to_text(token): rank for token, rank in sorted(tokenizer.ranks.items(), key=lambda t: t[1])}
    vocab.update(tokenizer.special_tokens)
    lines = ["#version: 0.2"] + [f"{token_to_text(left)} {token_to_text(right)}" for left, right in tokenizer.merges()]
    (directory / vocab_name).write_text(json.dumps(vocab, ensure_ascii=False), "utf-8")
    (directory / merges_name).write_text("\n".join(lines) + "\n", "utf-8")


# --- saving and loading whole tokenizers ----------------------------------------------
def save_bpe(tokenizer: BPETokenizer, directory: str | Path, format: str = "tiktoken") -> Path:
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    if format == "tiktoken":
        write_tiktoken(directory / TIKTOKEN_FILE, tokenizer.ranks)
    elif format in MERGES_FORMS:
        write_merges_form(directory, tokenizer, format)
    else:
        raise ValueError(f"unknown tokenizer format {format!r}; use 'tiktoken', 'huggingface' or 'gpt2'")
    metadata = {"kind": "bpe", "format": format, "pattern": tokenizer.pattern, "special_tokens": tokenizer.special_tokens}
    write_metadata(directory, metadata)
    return directory


def write_metadata(directory: Path, metadata: dict) -> None:
    (directory / METADATA).write_text(json.dumps(metadata, indent=1, ensure_ascii=False) + "\n", "utf-8")


def load_tokenizer(path: str | Path) -> Tokenizer:
    """The tokenizer a directory holds (see the module docstring), or a .tiktoken file's."""
    path = Path(path)
    if path.is_file() and path.suffix == ".tiktoken":
        ranks = read_tiktoken(path)
        return BPETokenizer(ranks, {ENDOFTEXT: max(ranks.values()) + 1}, GPT2_PATTERN)
    if path.is_file() and path.name == METADATA:
        path = path.parent
    if not path.is_dir():
        raise FileNotFoundError(f"no tokenizer at {path}: expected a directory or a .tiktoken file")
    metadata_path = path / METADATA
    metadata = json.loads(metadata_path.read_text("utf-8")) if metadata_path.exists() else {}
    if metadata.get("kind") == "char":
        from npgpt.tokenizer.char import CharTokenizer

        return CharTokenizer(metadata["chars"])
    format = metadata.get("format") or _detect_format(path)
    if format == "tiktoken":
        files = [path / TIKTOKEN_FILE] if (path / TIKTOKEN_FILE).exists() else sorted(path.glob("*.tiktoken"))
        if len(files) != 1:
            raise ValueError(f"{path} holds {len(files)} .tiktoken files; expected one")
        ranks = read_tiktoken(files[0])
        special_tokens = {ENDOFTEXT: max(ranks.values()) + 1}
    else:
        ranks, special_tokens = read_merges_form(*(path / name for name in MERGES_FORMS[format]))
    return BPETokenizer(ranks, metadata.get("special_tokens", special_tokens), metadata.get("pattern", GPT2_PATTERN))


def _detect_format(directory: Path) -> str:
    if any(directory.glob("*.tiktoken")):
        return "tiktoken"
    for format, names in MERGES_FORMS.items():
        if all((directory / name).exists() for name in names):
            return format
    raise FileNotFoundError(
        f"no tokenizer found in {directory}: expected {METADATA}, a .tiktoken file, "
        "encoder.json + vocab.bpe, or vocab.json + merges.txt"
    )
