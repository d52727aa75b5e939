"""What every npgpt tokenizer offers: special-token rules, decoding, streaming (files: `formats`)."""

from __future__ import annotations

import codecs
from typing import Callable, Collection, Iterable, Literal

import regex

ENDOFTEXT = "<|endoftext|>"

# Where a text may be cut, its parts encoded apart giving the ids of the whole: after a "\n"
# between two non-space characters, where GPT-2's and GPT-4's split patterns always end a
# chunk. In UTF-8 bytes only printable ASCII neighbours count (a byte >= 0x80 may end a
# space such as U+00A0). prepare cuts bytes at SAFE_CUT; eval cuts text at `last_safe_cut`.
SAFE_CUT = regex.compile(rb"[\x21-\x7e]\n(?=[\x21-\x7e])")


def last_safe_cut(text: str) -> int:
    """The end of the last "\n" of `text` with non-space characters on both sides (0 if none)."""
    i = len(text) - 1
    while True:
        i = text.rfind("\n", 0, i)
        if i <= 0:
            return 0
        if i + 1 < len(text) and not text[i - 1].isspace() and not text[i + 1].isspace():
            return i + 1

# Which special tokens encode() may meet: "all", or a collection of token strings.
SpecialSet = Literal["all"] | Collection[str]


class StreamDecoder:
    """Turns ids into text one id at a time, emitting only complete UTF-8 characters.

    A token may end in the middle of a multi-byte character; its bytes are held back until
    the character is complete, so a terminal never shows a broken one. Invalid bytes become
    U+FFFD exactly as in `decode`, so the concatenation of every `feed` and the final
    `flush` equals `tokenizer.decode(ids)`.
    """

    def __init__(self, token_bytes: Callable[[int], bytes]):
        self._token_bytes = token_bytes
        self._utf8 = codecs.getincrementaldecoder("utf-8")(errors="replace")

    def feed(self, token_id: int) -> str:
        """Add one id; return the text that is now complete (possibly "")."""
        return self._utf8.decode(self._token_bytes(token_id))

    def flush(self) -> str:
        """End of stream: return what is held back (incomplete bytes become U+FFFD)."""
        text = self._utf8.decode(b"", final=True)
        self._utf8.reset()
        return text


class Tokenizer:
    """Base class: subclasses provide `encode_ordinary`, `token_bytes`, `n_vocab`.

    `special_tokens` maps each special token's text to its id.
    """

    special_tokens: dict[str, int]

    # --- what subclasses implement ----------------------------------------------------
    @property
    def n_vocab(self) -> int:
        raise NotImplementedError

    def encode_ordinary(self, text: str) -> list[int]:
        """Encode `text` treating special-token strings as ordinary text."""
        raise NotImplementedError

    def token_bytes(self, token_id: int) -> bytes:
        """The bytes one id stands for (a special token's UTF-8 text for a special id)."""
        raise NotImplementedError

    # --- shared behaviour --------------------------------------------------------------
    @property
    def eot_id(self) -> int | None:
        """Id of <|endoftext|>, or None when this vocabulary has none."""
        return self.special_tokens.get(ENDOFTEXT)

    def encode(
        self,
        text: str,
        *,
        allowed_special: SpecialSet = (),
        disallowed_special: SpecialSet = "all",
    ) -> list[int]:
        """Encode text to ids, with tiktoken's rules for special tokens.

        A special token's string in `text` becomes its id if it is in `allowed_special`;
        if it is in `disallowed_special` (by default every special not allowed) encoding
        raises ValueError; otherwise (e.g. `disallowed_special=()`) it is ordinary text.
        """
        allowed = self._special_set(allowed_special)
        disallowed = self._special_set(disallowed_special) - allowed
        if disallowed:
            found = _special_regex(disallowed).search(text)
            if found:
                token = found.group()
                raise ValueError(
                    f"the text contains the special token {token!r}. Pass "
                    f"allowed_special={{{token!r}}} (or 'all') to encode it as its id "
                    f"{self.special_tokens[token]}, or disallowed_special=() to encode it as "
                    "ordinary text."
                )
        if not allowed:
            return self.encode_ordinary(text)
        ids: list[int] = []
        start = 0
        for found in _special_regex(allowed).finditer(text):
            ids += self.encode_ordinary(text[start : found.start()])
            ids.append(self.special_tokens[found.group()])
            start = found.end()
        ids += self.encode_ordinary(text[start:])
        return ids

    def decode_bytes(self, ids: Iterable[int]) -> bytes:
        return b"".join(map(self.token_bytes, ids))

    def decode(self, ids: Iterable[int]) -> str:
        """Ids to text; bytes that are not valid UTF-8 become U+FFFD (as GPT-2 does)."""
        return self.decode_bytes(ids).decode("utf-8", errors="replace")

    def stream_decoder(self) -> StreamDecoder:
        """A decoder for generation: `.feed(id) -> str` per id, `.flush() -> str` at the end."""
        return StreamDecoder(self.token_bytes)

    def _special_set(self, which: SpecialSet) -> set[str]:
        if which == "all":
            return set(self.special_tokens)
        unknown = set(which) - set(self.special_tokens)
        if unknown:
            raise ValueError(
                f"{sorted(unknown)} are not special tokens of this tokenizer "
                f"(its special tokens: {sorted(self.special_tokens)})"
            )
        return set(which)


def _special_regex(tokens: set[str]) -> regex.Pattern:
    """A regex matching any of `tokens`, preferring the longest where several start together."""
    return regex.compile("|".join(map(regex.escape, sorted(tokens, key=lambda t: (-len(t), t)))))
