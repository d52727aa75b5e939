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

from npgpt.errors import UserError
from npgpt.tokenizer.base import ENDOFTEXT, Tokenizer
from npgpt.tokenizer.bpe import GPT2_PATTERN, BPETokenizer
from npgpt.tokenizer.char import CharTokenizer

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


class TokenizerFileError(UserError, ValueError):
    """A vocabulary file that cannot be read; the message names the file and the line."""


def _read_text(path: Path, encoding: str) -> str:
    try:
        return path.read_text(encoding)
    except UnicodeDecodeError as e:
        line = path.read_bytes()[: e.start].count(b"\n") + 1
        raise TokenizerFileError(f"{path}:{line}: not {encoding} text ({e.reason}); the file is damaged, replace it") from None


def _read_json(path: Path):
    try:
        return json.loads(_read_text(path, "utf-8"))
    except json.JSONDecodeError as e:
        raise TokenizerFileError(f"{path}:{e.lineno}: invalid JSON ({e.msg}); the file is damaged, replace it") from None


# --- tiktoken -------------------------------------------------------------------------
def read_tiktoken(path: str | Path) -> dict[bytes, int]:
    """Ranks of a .tiktoken file; every line `base64 rank`, tokens and ranks unique, the
    ranks 0..n-1 (errors name the file and line)."""
    path = Path(path)
    ranks: dict[bytes, int] = {}
    seen: dict[int, int] = {}  # rank -> line
    for line_number, line in enumerate(_read_text(path, "ascii").splitlines(), 1):
        if not line:
            continue
        try:
            token_text, rank_text = line.split()
            token, rank = base64.b64decode(token_text, validate=True), int(rank_text)
        except ValueError as error:
            raise TokenizerFileError(f"{path}:{line_number}: not a 'base64 rank' line ({error}); the file is damaged, replace it") from None
        if token in ranks or rank in seen:
            raise TokenizerFileError(f"{path}:{line_number}: token {token!r} or rank {rank} appears twice; the file is damaged, replace it")
        ranks[token], seen[rank] = rank, line_number
    _check_contiguous(path, seen)
    return ranks


def _check_contiguous(path: Path, lines_by_rank: dict[int, int]) -> None:
    for expected, rank in enumerate(sorted(lines_by_rank)):
        if rank != expected:
            raise TokenizerFileError(
                f"{path}:{lines_by_rank[rank]}: rank {rank} follows {expected - 1}, ranks must be 0, 1, 2, ... "
                "without gaps; the file is damaged or truncated, replace it"
            )


def write_tiktoken(path: Path, ranks: dict[bytes, int]) -> None:
    lines = (f"{base64.b64encode(token).decode()} {rank}\n" for token, rank in sorted(ranks.items(), key=lambda t: t[1]))
    path.write_text("".join(lines), "ascii")


# --- encoder.json + vocab.bpe / vocab.json + merges.txt -------------------------------
def read_merges_form(vocab_path: str | Path, merges_path: str | Path, special_tokens: dict[str, int] | None = None
                     ) -> tuple[dict[bytes, int], dict[str, int]]:  # fmt: skip
    """(ranks, special_tokens) from a vocabulary + merges pair of files, validated: every
    merge two space-separated parts already in the vocabulary, its result in it with an id
    above the previous merge's, and every other entry a byte or a special token (one given
    in `special_tokens`, else an entry written <...> after the last merge). Errors name the
    file and line."""
    vocab_path, merges_path = Path(vocab_path), Path(merges_path)
    vocab = _read_json(vocab_path)
    if not isinstance(vocab, dict) or not all(isinstance(i, int) and not isinstance(i, bool) for i in vocab.values()):
        raise TokenizerFileError(f"{vocab_path}: expected a JSON object of token -> integer id; the file is damaged, replace it")
    merges = []  # (line number, left, right)
    for line_number, line in enumerate(_read_text(merges_path, "utf-8").splitlines(), 1):
        if not line or line.startswith("#version"):
            continue
        parts = line.split(" ")
        if len(parts) != 2 or not all(parts):
            raise TokenizerFileError(f"{merges_path}:{line_number}: expected two tokens separated by one space, got {line!r}; the file is damaged, replace it")
        merges.append((line_number, parts[0], parts[1]))
    byte_chars = unicode_to_bytes()
    missing_bytes = [char for char in byte_chars if char not in vocab]
    if missing_bytes:
        raise TokenizerFileError(f"{vocab_path}: the single byte {missing_bytes[0]!r} is missing (all 256 must be tokens); the file is damaged, replace it")
    _check_merges(merges, vocab, merges_path)
    merged = {left + right for _, left, right in merges}
    last_merge_id = max((vocab[left + right] for _, left, right in merges), default=-1)
    ranks, specials = {}, {}
    for text, token_id in vocab.items():
        if text in byte_chars or text in merged:
            ranks[text_to_token(text)] = token_id
        elif special_tokens is not None and text in special_tokens or (
            special_tokens is None and token_id > last_merge_id and text.startswith("<") and text.endswith(">")
        ):
            specials[text] = token_id
        else:
            raise TokenizerFileError(
                f"{vocab_path}: entry {text!r} (id {token_id}) is neither a byte, nor made by a merge in {merges_path} "
                f"({len(merges)} merges for {len(vocab)} entries), nor a special token; the merges file looks "
                "truncated, replace it"
            )
    if len(ranks) != 256 + len(merges):
        raise TokenizerFileError(
            f"{merges_path}: {len(merges)} merges make {len(ranks) - 256} distinct tokens (a merge repeats); "
            "the file is damaged, replace it"
        )
    for expected, token_id in enumerate(sorted(ranks.values())):
        if token_id != expected:
            raise TokenizerFileError(f"{vocab_path}: ids must be 0, 1, 2, ... without gaps, but {expected} is missing; "
                                     "the file is damaged, replace it")  # fmt: skip
    return ranks, specials


def _check_merges(merges: list[tuple[int, str, str]], vocab: dict[str, int], merges_path) -> None:
    """Every merge's parts exist before it; ids grow with merge order (the encoder uses a
    token's id as its rank)."""
    previous = max(vocab[char] for char in bytes_to_unicode().values())
    made = set(bytes_to_unicode().values())
    for line_number, left, right in merges:
        for part in (left, right):
            if part not in made:
                raise TokenizerFileError(f"{merges_path}:{line_number}: merge part {part!r} is not a byte or an earlier merge's result; the file is damaged, replace it")
        token_id = vocab.get(left + right)
        if token_id is None:
            raise TokenizerFileError(f"{merges_path}:{line_number}: merge ({left} {right}) makes a token missing from the vocabulary; the files do not belong together")
        if token_id <= previous:
            raise TokenizerFileError(
                f"{merges_path}:{line_number}: merge ({left} {right}) gives id {token_id}, not above the "
                f"previous merge's {previous}; npgpt needs ids in merge order (as GPT-2's are)"
            )
        made.add(left + right)
        previous = token_id


def write_merges_form(directory: Path, tokenizer: BPETokenizer, form: str = "huggingface") -> None:
    vocab_name, merges_name = MERGES_FORMS[form]
    vocab = {token_to_text(token): rank for token, rank in sorted(tokenizer.ranks.items(), key=lambda t: t[1])}
    vocab.update(tokenizer.special_tokens)
    lines = ["#version: 0.2"] + [f"{token_to_text(left)} {token_to_text(right)}" for left, right in tokenizer.merges()]
    (directory / vocab_name).write_text(json.dumps(vocab, ensure_ascii=False), "utf-8")
    (directory / merges_name).write_text("\n".join(lines) + "\n", "utf-8")


# --- saving and loading whole tokenizers ----------------------------------------------
FORMATS = ("tiktoken", *MERGES_FORMS)  # the forms a BPE vocabulary can be saved in


def save(tokenizer: Tokenizer, directory: str | Path, format: str | None = None) -> Path:
    """Write `tokenizer` to `directory` and return it: a BPE vocabulary as "tiktoken"
    (tokenizer.tiktoken; also for None), "huggingface" (vocab.json + merges.txt) or "gpt2"
    (encoder.json + vocab.bpe), plus npgpt_tokenizer.json (pattern and special tokens); a
    character vocabulary as npgpt_tokenizer.json alone (format None or "char")."""
    directory = Path(directory)
    if isinstance(tokenizer, CharTokenizer):
        if format not in (None, "char"):
            raise ValueError(f"a character-level tokenizer is saved in its own form only, not {format!r}")
        directory.mkdir(parents=True, exist_ok=True)
        write_metadata(directory, {"kind": "char", "chars": tokenizer.chars})
        return directory
    format = format or "tiktoken"
    if format not in FORMATS:
        raise ValueError(f"unknown tokenizer format {format!r}; use one of {', '.join(FORMATS)}")
    directory.mkdir(parents=True, exist_ok=True)
    if format == "tiktoken":
        write_tiktoken(directory / TIKTOKEN_FILE, tokenizer.ranks)
    else:
        write_merges_form(directory, tokenizer, format)
    metadata = {"kind": "bpe", "format": format, "pattern": tokenizer.pattern, "special_tokens": tokenizer.special_tokens}
    write_metadata(directory, metadata)
    return directory


def write_metadata(directory: Path, metadata: dict) -> None:
    (directory / METADATA).write_text(json.dumps(metadata, indent=1, ensure_ascii=False) + "\n", "utf-8")


def load(path: str | Path) -> Tokenizer:
    """The tokenizer a directory holds (see the module docstring), or a .tiktoken file's."""
    path = Path(path)
    if path.is_file() and path.suffix == ".tiktoken":
        ranks = read_tiktoken(path)
        return _bpe(path, ranks, {ENDOFTEXT: max(ranks.values()) + 1}, GPT2_PATTERN)
    if path.is_file() and path.name == METADATA:
        path = path.parent
    if not path.is_dir():
        raise FileNotFoundError(f"no tokenizer at {path}: expected a directory or a .tiktoken file")
    metadata_path = path / METADATA
    metadata = _read_json(metadata_path) if metadata_path.exists() else {}
    if not isinstance(metadata, dict):
        raise TokenizerFileError(f"{metadata_path}: expected a JSON object; the file is damaged, replace it")
    if metadata.get("kind") == "char":
        try:
            return CharTokenizer(metadata["chars"])
        except (KeyError, TypeError, ValueError) as e:
            raise TokenizerFileError(f"{metadata_path}: not a valid character vocabulary ({e}); the file is damaged, replace it") from None
    format = metadata.get("format") or _detect_format(path)
    special_tokens = metadata.get("special_tokens")
    if format == "tiktoken":
        files = [path / TIKTOKEN_FILE] if (path / TIKTOKEN_FILE).exists() else sorted(path.glob("*.tiktoken"))
        if len(files) != 1:
            raise TokenizerFileError(f"{path} holds {len(files)} .tiktoken files; expected one")
        ranks = read_tiktoken(files[0])
        source = files[0]
        special_tokens = {ENDOFTEXT: max(ranks.values()) + 1} if special_tokens is None else special_tokens
    elif format in MERGES_FORMS:
        vocab_file, merges_file = (path / name for name in MERGES_FORMS[format])
        ranks, special_tokens = read_merges_form(vocab_file, merges_file, special_tokens)
        source = vocab_file
    else:
        raise TokenizerFileError(f"{metadata_path}: unknown format {format!r}; the file is damaged, replace it")
    return _bpe(source, ranks, special_tokens, metadata.get("pattern", GPT2_PATTERN))


def _bpe(source: Path, ranks, special_tokens, pattern) -> BPETokenizer:
    try:
        return BPETokenizer(ranks, special_tokens, pattern)
    except (ValueError, TypeError) as e:  # also regex.error, a ValueError
        raise TokenizerFileError(f"{source}: not a valid BPE vocabulary ({e}); the file is damaged, replace it") from None


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
