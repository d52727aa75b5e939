"""A straightforward pure-Python GPT-2 BPE, written the way OpenAI's original encoder.py
works: the benchmark's baseline for what "pure Python" costs without npgpt's care.

Bytes are first mapped to printable characters (bytes_to_unicode), the published split
pattern cuts the text, and each word is merged by rebuilding its tuple of symbols around
the lowest-ranked pair from vocab.bpe, recomputing the set of pairs every round. Words are
cached as space-joined strings.
"""

from __future__ import annotations

import json
from pathlib import Path

import regex

from npgpt.tokenizer.formats import bytes_to_unicode

PUBLISHED_GPT2_PATTERN = r"""'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"""


def pairs_of(word: tuple[str, ...]) -> set[tuple[str, str]]:
    return set(zip(word, word[1:]))


class BaselineBPE:
    def __init__(self, encoder_json: str | Path, vocab_bpe: str | Path):
        self.encoder = json.loads(Path(encoder_json).read_text("utf-8"))
        self.decoder = {i: s for s, i in self.encoder.items()}
        merges = Path(vocab_bpe).read_text("utf-8").splitlines()[1:]
        self.bpe_ranks = {tuple(line.split()): i for i, line in enumerate(merges) if line}
        self.byte_encoder = bytes_to_unicode()
        self.byte_decoder = {c: b for b, c in self.byte_encoder.items()}
        self.pattern = regex.compile(PUBLISHED_GPT2_PATTERN)
        self.cache: dict[str, str] = {}

    def bpe(self, token: str) -> str:
        if token in self.cache:
            return self.cache[token]
        word = tuple(token)
        pairs = pairs_of(word)
        while pairs:
            bigram = min(pairs, key=lambda pair: self.bpe_ranks.get(pair, float("inf")))
            if bigram not in self.bpe_ranks:
                break
            first, second = bigram
            new_word: list[str] = []
            i = 0
            while i < len(word):
                try:
                    j = word.index(first, i)
                except ValueError:
                    new_word.extend(word[i:])
                    break
                new_word.extend(word[i:j])
                i = j
                if word[i] == first and i < len(word) - 1 and word[i + 1] == second:
                    new_word.append(first + second)
                    i += 2
                else:
                    new_word.append(word[i])
                    i += 1
            word = tuple(new_word)
            if len(word) == 1:
                break
            pairs = pairs_of(word)
        result = self.cache[token] = " ".join(word)
        return result

    def encode(self, text: str) -> list[int]:
        ids = []
        for token in self.pattern.findall(text):
            token = "".join(self.byte_encoder[b] for b in token.encode("utf-8"))
            ids.extend(self.encoder[piece] for piece in self.bpe(token).split(" "))
        return ids

    def decode(self, ids: list[int]) -> str:
        text = "".join(self.decoder[i] for i in ids)
        return bytearray(self.byte_decoder[c] for c in text).decode("utf-8", errors="replace")
