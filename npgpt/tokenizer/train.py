"""Learning a byte-level BPE vocabulary from a corpus.

Start from the 256 single bytes. Cut the corpus into chunks with the split pattern and
count each distinct chunk once. Then, until the vocabulary is full: take the most frequent
adjacent pair of tokens over all chunks (ties: the pair whose (left, right) bytes sort
first), make their concatenation the next token, and re-encode the chunks that contain it.

Re-encoding continues the encoder's own greedy merge with the new token added, so every
chunk's tokens stay exactly what `BPETokenizer.encode` gives with the vocabulary learned so
far (this also covers a merge that makes a new neighbour pair of older rank, and a chunk
that becomes a token as a whole). Pair counts are updated only for the chunks that change,
and a heap with lazy deletion finds the most frequent pair.
"""

from __future__ import annotations

import heapq
import warnings
from collections import Counter
from typing import Iterable

import regex

from npgpt.tokenizer.base import _special_regex
from npgpt.tokenizer.bpe import PATTERNS, SINGLE_BYTES, BPETokenizer, bpe_merge, replace_surrogates

Pair = tuple[bytes, bytes]


def train_bpe(
    text: str,
    vocab_size: int,
    pattern: str = "gpt2",
    special_tokens: Iterable[str] = (),
) -> BPETokenizer:
    """A BPETokenizer with `vocab_size` ids: 256 bytes, the learned merges, then the special
    tokens (in the order given). `pattern` is "gpt2", "gpt4" or a regex. Special tokens'
    strings in the corpus are cut out before counting, so no merge spans them."""
    special_tokens = list(dict.fromkeys(special_tokens))
    n_merges = vocab_size - 256 - len(special_tokens)
    if n_merges < 0:
        raise ValueError(f"vocab_size {vocab_size} is below 256 bytes + {len(special_tokens)} special tokens")
    pattern = PATTERNS.get(pattern, pattern)
    ranks = {token: rank for rank, token in enumerate(SINGLE_BYTES)}
    corpus = _ChunkCorpus(count_chunks(text, pattern, special_tokens), ranks)
    for _ in range(n_merges):
        pair = corpus.most_frequent_pair()
        if pair is None:
            warnings.warn(f"the corpus ran out of pairs to merge after {len(ranks) - 256} merges", stacklevel=2)
            break
        token = pair[0] + pair[1]
        ranks[token] = len(ranks)
        corpus.add_token(token)
    specials = {special: len(ranks) + i for i, special in enumerate(special_tokens)}
    return BPETokenizer(ranks, specials, pattern)


def count_chunks(text: str, pattern: str, special_tokens: Iterable[str] = ()) -> Counter[bytes]:
    """How often each chunk (UTF-8 bytes of one split-pattern match) occurs in `text`."""
    text = replace_surrogates(text)
    special_tokens = set(special_tokens)
    segments = _special_regex(special_tokens).split(text) if special_tokens else [text]
    split = regex.compile(pattern).findall
    counts = Counter(chunk for segment in segments for chunk in split(segment))
    return Counter({chunk.encode("utf-8"): n for chunk, n in counts.items()})


class _ChunkCorpus:
    """The distinct chunks, each as its current list of tokens, with pair counts over all."""

    def __init__(self, chunk_counts: Counter[bytes], ranks: dict[bytes, int]):
        self.ranks = ranks
        self.chunks = list(chunk_counts)
        self.counts = [chunk_counts[chunk] for chunk in self.chunks]
        self.index = {chunk: i for i, chunk in enumerate(self.chunks)}
        self.tokens = [list(map(SINGLE_BYTES.__getitem__, chunk)) for chunk in self.chunks]
        self.pair_counts: Counter[Pair] = Counter()
        self.pair_chunks: dict[Pair, set[int]] = {}  # pair -> chunks that have (or had) it
        for i in range(len(self.chunks)):
            self._count_pairs(i, +1)
        self.heap = [(-count, pair) for pair, count in self.pair_counts.items()]
        heapq.heapify(self.heap)

    def most_frequent_pair(self) -> Pair | None:
        while self.heap:
            negative_count, pair = self.heap[0]
            if self.pair_counts.get(pair) == -negative_count:
                return pair
            heapq.heappop(self.heap)  # stale: the count changed since it was pushed
        return None

    def add_token(self, token: bytes) -> None:
        """Re-encode every chunk that the new (highest-ranked) token changes."""
        affected = set()
        for cut in range(1, len(token)):  # every pair that joins into `token`
            affected |= self.pair_chunks.get((token[:cut], token[cut:]), set())
        if token in self.index:
            affected.add(self.index[token])
        changed: set[Pair] = set()
        for i in sorted(affected):
            changed |= self._count_pairs(i, -1)
            if self.chunks[i] == token:
                self.tokens[i] = [token]
            else:
                bpe_merge(self.tokens[i], self.ranks)
            changed |= self._count_pairs(i, +1)
        for pair in changed:
            count = self.pair_counts[pair]
            if count > 0:
                heapq.heappush(self.heap, (-count, pair))
            else:
                del self.pair_counts[pair], self.pair_chunks[pair]

    def _count_pairs(self, i: int, sign: int) -> set[Pair]:
        """Add (sign +1) or remove (-1) chunk i's adjacent pairs from the counts."""
        tokens, weight = self.tokens[i], sign * self.counts[i]
        pairs = set(zip(tokens, tokens[1:]))
        for pair in zip(tokens, tokens[1:]):
            self.pair_counts[pair] += weight
        if sign > 0:
            for pair in pairs:
                self.pair_chunks.setdefault(pair, set()).add(i)
        return pairs
