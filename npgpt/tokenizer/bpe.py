"""Byte-level BPE as GPT-2 and tiktoken define it, in pure Python.

Encoding has two steps. The split pattern cuts text into chunks (words with their leading
space, numbers, punctuation runs, whitespace); each chunk's UTF-8 bytes are then merged
independently: start from single bytes and repeatedly join the adjacent pair whose joined
bytes have the lowest rank, until no adjacent pair joins into a token. A token's rank is
its id. A chunk that is itself a token is that token directly (tiktoken's shortcut, which
changes nothing for GPT-2's vocabulary but defines the result for any vocabulary).

Chunks repeat a lot in real text, so each chunk's ids are cached.
"""

from __future__ import annotations

import sys
from heapq import heapify, heappop, heappush
from itertools import chain

import regex

from npgpt.tokenizer.base import Tokenizer

# GPT-2's split pattern, written with possessive quantifiers (as tiktoken's r50k pattern):
# same chunks as the published `'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|
# \s+(?!\S)|\s+` (tests/test_tokenizer_unicode.py proves it), but faster, since the regex
# engine keeps no backtracking state inside a run.
GPT2_PATTERN = (
    r"""'(?:[sdmt]|ll|ve|re)| ?\p{L}++| ?\p{N}++| ?[^\s\p{L}\p{N}]++|\s++$|\s+(?!\S)|\s"""
)
# GPT-4's (cl100k_base): case-insensitive contractions, numbers in groups of up to three
# digits, a letter run may take one leading non-letter, newlines kept with punctuation.
GPT4_PATTERN = (
    r"""'(?i:[sdmt]|ll|ve|re)|[^\r\n\p{L}\p{N}]?+\p{L}++|\p{N}{1,3}+|"""
    r""" ?[^\s\p{L}\p{N}]++[\r\n]*+|\s++$|\s*[\r\n]|\s+(?!\S)|\s"""
)
PATTERNS = {"gpt2": GPT2_PATTERN, "gpt4": GPT4_PATTERN}

NO_MERGE = sys.maxsize  # rank of a pair whose joined bytes are not a token
SINGLE_BYTES = [bytes([b]) for b in range(256)]
CACHE_LIMIT = 1 << 20  # chunks remembered before the cache starts over
HEAP_FROM = 48  # chunks of this many bytes or more merge with the heap (see bpe_merge)


def bpe_merge(parts: list[bytes], ranks: dict[bytes, int], stop_rank: int = NO_MERGE) -> list[bytes]:
    """Merge `parts` in place: join the lowest-ranked adjacent pair (leftmost on ties)
    until no pair joins into a token with rank below `stop_rank`. Returns `parts`.

    Each merge scans every pair (quadratic in the chunk's length), which is fastest for
    the short chunks of ordinary text; `_encode_chunk` sends long chunks to
    `bpe_merge_heap`, which gives the same parts in O(n log n)."""
    get = ranks.get
    # pair_ranks[i] is the rank of parts[i] + parts[i + 1]
    pair_ranks = [get(a + b, NO_MERGE) for a, b in zip(parts, parts[1:])]
    while pair_ranks:
        best = min(pair_ranks)
        if best >= stop_rank:
            break
        i = pair_ranks.index(best)
        merged = parts[i] = parts[i] + parts[i + 1]
        del parts[i + 1], pair_ranks[i]
        if i > 0:
            pair_ranks[i - 1] = get(parts[i - 1] + merged, NO_MERGE)
        if i < len(pair_ranks):
            pair_ranks[i] = get(merged + parts[i + 1], NO_MERGE)
    return parts


def bpe_merge_heap(chunk: bytes, ranks: dict[bytes, int], stop_rank: int = NO_MERGE) -> list[bytes]:
    """The parts `bpe_merge` gives for the single bytes of `chunk`, in O(n log n).

    The parts form a linked list of byte ranges [start, end[start]) keyed by their start
    offset; a heap holds one entry per joinable adjacent pair: (rank, left start, right
    end), packed into one integer, (rank * N + left) * N + stop, which orders the same and
    compares faster. The smallest entry is the lowest rank, leftmost on ties (starts grow
    left to right). An entry goes stale when either of its parts joins something else: it
    is skipped when the part after its left one no longer ends at its recorded end (a part
    that was joined into its left neighbour has its end set past the chunk)."""
    n = len(chunk)
    N = n + 1  # > every offset, so the packed key's fields never overlap
    get = ranks.get
    end = list(range(1, n + 1))  # end[s]: end of the part starting at s (> n once it is joined in)
    prev = list(range(-1, n - 1))  # prev[s]: start of the part before it, or -1
    heap = [(r * N + s) * N + s + 2 for s in range(n - 1) if (r := get(chunk[s : s + 2], NO_MERGE)) < stop_rank]
    heapify(heap)
    while heap:
        key, stop = divmod(heappop(heap), N)
        left = key % N
        right = end[left]
        if right >= n or end[right] != stop:
            continue  # stale: a part of this pair has merged since
        # join the part starting at `right` into the one starting at `left`
        end[right] = N
        end[left] = stop
        if stop < n:
            prev[stop] = left
            after = end[stop]
            rank = get(chunk[left:after], NO_MERGE)
            if rank < stop_rank:
                heappush(heap, (rank * N + left) * N + after)
        before = prev[left]
        if before >= 0:
            rank = get(chunk[before:stop], NO_MERGE)
            if rank < stop_rank:
                heappush(heap, (rank * N + before) * N + stop)
    parts, start = [], 0
    while start < n:
        parts.append(chunk[start : end[start]])
        start = end[start]
    return parts


def replace_surrogates(text: str) -> str:
    """Text with lone surrogates (not encodable as UTF-8) replaced by U+FFFD, and
    surrogate pairs joined into the characters they stand for, as tiktoken does."""
    return text.encode("utf-16", "surrogatepass").decode("utf-16", "replace")


class _ChunkCache(dict):
    """chunk text -> its ids; a missing chunk is encoded on first lookup."""

    def __init__(self, encode_chunk):
        super().__init__()
        self._encode_chunk = encode_chunk

    def __missing__(self, chunk: str) -> list[int]:
        if len(self) >= CACHE_LIMIT:
            self.clear()
        ids = self[chunk] = self._encode_chunk(chunk.encode("utf-8"))
        return ids


class BPETokenizer(Tokenizer):
    """A byte-level BPE vocabulary: `ranks` maps each token's bytes to its id (all 256
    single bytes included); `special_tokens` maps special strings to ids past the ranks."""

    def __init__(
        self,
        ranks: dict[bytes, int],
        special_tokens: dict[str, int] | None = None,
        pattern: str = GPT2_PATTERN,
    ):
        missing = [b for b in SINGLE_BYTES if b not in ranks]
        if missing:
            raise ValueError(
                f"a byte-level BPE vocabulary needs every single byte as a token; {len(missing)} "
                f"are missing (e.g. {missing[0]!r})"
            )
        self.ranks = ranks
        self.special_tokens = dict(special_tokens or {})
        self.pattern = PATTERNS.get(pattern, pattern)
        self._split = regex.compile(self.pattern).findall
        self._decoder = {rank: token for token, rank in ranks.items()}
        if len(self._decoder) != len(ranks):
            raise ValueError("two tokens of the vocabulary share an id")
        for text, token_id in self.special_tokens.items():
            if token_id in self._decoder:
                raise ValueError(f"special token {text!r} reuses id {token_id} of an ordinary token")
            self._decoder[token_id] = text.encode("utf-8")
        self._cache = _ChunkCache(self._encode_chunk)

    @property
    def n_vocab(self) -> int:
        return max(self._decoder) + 1

    def encode_ordinary(self, text: str) -> list[int]:
        try:
            return list(chain.from_iterable(map(self._cache.__getitem__, self._split(text))))
        except UnicodeEncodeError:
            return self.encode_ordinary(replace_surrogates(text))

    def _encode_chunk(self, chunk: bytes) -> list[int]:
        """Ids of one chunk (the UTF-8 bytes of one match of the split pattern)."""
        ranks = self.ranks
        token_id = ranks.get(chunk)
        if token_id is not None:
            return [token_id]
        if len(chunk) >= HEAP_FROM:
            return [ranks[part] for part in bpe_merge_heap(chunk, ranks)]
        return [ranks[part] for part in bpe_merge(list(map(SINGLE_BYTES.__getitem__, chunk)), ranks)]

    def token_bytes(self, token_id: int) -> bytes:
        try:
            return self._decoder[token_id]
        except KeyError:
            raise ValueError(f"id {token_id!r} is not in this vocabulary (0..{self.n_vocab - 1})") from None

    def decode_bytes(self, ids) -> bytes:
        try:
            return b"".join(map(self._decoder.__getitem__, ids))
        except KeyError as error:
            raise ValueError(
                f"id {error.args[0]!r} is not in this vocabulary (0..{self.n_vocab - 1})"
            ) from None

    def merges(self) -> list[tuple[bytes, bytes]]:
        """The merge rules, in rank order, that build every multi-byte token: the pair a
        token is made of is what merging its own bytes with the lower ranks gives."""
        pairs = []
        for token, rank in sorted(self.ranks.items(), key=lambda item: item[1]):
            if len(token) == 1:
                continue
            parts = bpe_merge(list(map(SINGLE_BYTES.__getitem__, token)), self.ranks, stop_rank=rank)
            if len(parts) != 2:
                raise ValueError(
                    f"token {token!r} (id {rank}) cannot be built by merging lower-ranked tokens, "
                    "so this vocabulary has no merges-file form"
                )
            pairs.append((parts[0], parts[1]))
        return pairs

    def __repr__(self) -> str:
        return f"BPETokenizer(n_vocab={self.n_vocab}, special_tokens={self.special_tokens})"
