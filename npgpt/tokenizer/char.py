"""A character-level tokenizer with the same interface, for character-level training recipes."""

from __future__ import annotations

from typing import Iterable

from npgpt.tokenizer.base import Tokenizer


class CharTokenizer(Tokenizer):
    """One id per character; the vocabulary is the sorted set of the training text's characters."""

    def __init__(self, chars: Iterable[str]):
        self.chars = list(chars)
        self._ids = {char: i for i, char in enumerate(self.chars)}
        if len(self._ids) != len(self.chars) or any(len(char) != 1 for char in self.chars):
            raise ValueError("a character vocabulary must be a list of distinct single characters")
        self.special_tokens = {}

    @classmethod
    def train(cls, text: str) -> "CharTokenizer":
        return cls(sorted(set(text)))

    @property
    def n_vocab(self) -> int:
        return len(self.chars)

    def encode_ordinary(self, text: str) -> list[int]:
        try:
            return [self._ids[char] for char in text]
        except KeyError as error:
            raise ValueError(
                f"character {error.args[0]!r} is not in this character-level vocabulary "
                f"(it knows only the {self.n_vocab} characters of its training text)"
            ) from None

    def token_bytes(self, token_id: int) -> bytes:
        return self._char(token_id).encode("utf-8")

    def decode(self, ids: Iterable[int]) -> str:
        return "".join(map(self._char, ids))

    def _char(self, token_id: int) -> str:
        if not 0 <= token_id < len(self.chars):
            raise ValueError(f"id {token_id!r} is not in this vocabulary (0..{self.n_vocab - 1})")
        return self.chars[token_id]

    def __repr__(self) -> str:
        return f"CharTokenizer(n_vocab={self.n_vocab})"
