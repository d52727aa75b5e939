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

A short chunk is re-encoded whole (`bpe_merge`) and its pairs recounted. A long one
(`INCREMENTAL_FROM` bytes or more) would make that quadratic, so `_LongChunk` keeps an index
of where each pair occurs and joins only the new token's occurrences and the neighbour pairs
these joins create: the cost per new token follows the occurrences, not the chunk's length.
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

INCREMENTAL_FROM = 64  # chunks of this many bytes or more are _LongChunks (see _ChunkCorpus)


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
    """The distinct chunks, each as its current list of tokens, with pair counts over all.
    Chunk i's tokens are `tokens[i]`, or `long[i]` (a _LongChunk) for a long chunk."""

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
        self.long = {i: _LongChunk(chunk) for i, chunk in enumerate(self.chunks) if len(chunk) >= INCREMENTAL_FROM}
        for i in self.long:
            self.tokens[i] = None  # kept by self.long[i] from now on
        self.heap = [(-count, pair) for pair, count in self.pair_counts.items()]
        heapq.heapify(self.heap)

    def parts(self, i: int) -> list[bytes]:
        """Chunk i's current tokens."""
        return self.long[i].parts() if i in self.long else self.tokens[i]

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
            if i in self.long:
                if self.chunks[i] != token:
                    changed |= self._add_pair_changes(i, self.long[i].add_token(token, self.ranks))
                    continue
                self.tokens[i] = self.long.pop(i).parts()  # the whole chunk became a token: a list again
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

    def _add_pair_changes(self, i: int, changes: Counter[Pair]) -> set[Pair]:
        """Add chunk i's change in pair occurrences (pair -> how many more) to the counts."""
        weight = self.counts[i]
        for pair, change in changes.items():
            self.pair_counts[pair] += change * weight
            if change > 0:
                self.pair_chunks.setdefault(pair, set()).add(i)
        return set(changes)


class _LongChunk:
    """A long chunk's tokens, re-merged only where a new token occurs.

    Re-encoding a chunk of n bytes with `bpe_merge` after a new token costs O(n) per join,
    and recounting its pairs O(n) more, so training on one long chunk would be quadratic.
    But the tokens before a new token t are a fixed point of the older ranks: the only
    pairs that can join are those whose concatenation is t. So join those, lowest rank
    first and leftmost on ties as `bpe_merge` does, and then any neighbour pair a join
    creates that is a token (an older rank joins before the rest of t's occurrences: a
    cascade), with a heap of (rank, left start, right end) entries as in `bpe_merge_heap`,
    whose linked list of byte ranges this keeps between tokens. `where[pair]` holds the
    start offsets of the pair's left parts, so t's occurrences are found without a scan."""

    def __init__(self, chunk: bytes):
        n = self.n = len(chunk)
        self.chunk = chunk
        self.end = list(range(1, n + 1))  # end[s]: end of the part starting at s (> n once it is joined in)
        self.prev = list(range(-1, n - 1))  # prev[s]: start of the part before it, or -1
        self.where: dict[Pair, set[int]] = {}
        for s in range(n - 1):
            self.where.setdefault((chunk[s : s + 1], chunk[s + 1 : s + 2]), set()).add(s)

    def parts(self) -> list[bytes]:
        """The chunk's current tokens, left to right."""
        parts, start = [], 0
        while start < self.n:
            parts.append(self.chunk[start : self.end[start]])
            start = self.end[start]
        return parts

    def add_token(self, token: bytes, ranks: dict[bytes, int]) -> Counter[Pair]:
        """Merge on with the new `token` (the highest rank in `ranks`). Returns, per pair,
        how many more times it occurs now (negative: fewer)."""
        chunk, n, end, prev = self.chunk, self.n, self.end, self.prev
        changes: Counter[Pair] = Counter()

        def add(pair: Pair, start: int, sign: int) -> None:  # sign -1: remove the pair at `start`
            changes[pair] += sign
            if sign > 0:
                self.where.setdefault(pair, set()).add(start)
            else:
                starts = self.where[pair]
                starts.discard(start)
                if not starts:
                    del self.where[pair]

        rank = ranks[token]
        heap = [
            (rank, left, left + len(token))
            for cut in range(1, len(token))
            for left in self.where.get((token[:cut], token[cut:]), ())
        ]
        heapq.heapify(heap)
        while heap:
            rank, left, stop = heapq.heappop(heap)
            right = end[left]
            if right >= n or end[right] != stop:
                continue  # stale: a part of this pair has joined another since
            a, b, joined = chunk[left:right], chunk[right:stop], chunk[left:stop]
            add((a, b), left, -1)
            end[right] = n + 1  # the right part is joined into the left one
            end[left] = stop
            if stop < n:  # the pair with the part after: (b, c) -> (joined, c)
                after = end[stop]
                prev[stop] = left
                c = chunk[stop:after]
                add((b, c), right, -1)
                add((joined, c), left, +1)
                if (r := ranks.get(joined + c)) is not None:
                    heapq.heappush(heap, (r, left, after))
            before = prev[left]
            if before >= 0:  # the pair with the part before: (p, a) -> (p, joined)
                p = chunk[before:left]
                add((p, a), before, -1)
                add((p, joined), before, +1)
                if (r := ranks.get(p + joined)) is not None:
                    heapq.heappush(heap, (r, before, stop))
        return Counter({pair: change for pair, change in changes.items() if change})
