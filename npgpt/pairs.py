"""Labelled prompt/completion pairs: reading, tokenizing, and packing into training windows.

A pairs file is JSON Lines, one record per line: {"prompt": "...", "completion": "..."}
(other fields are ignored, blank lines skipped). Each example is tokenized as

    prompt ids + completion ids + <|endoftext|>       (an empty prompt is <|endoftext|>)

and predicts every next token, but the targets of positions whose next token is still
prompt are the ignore index: the loss and its gradient come from completion tokens (and
the end-of-text) only. An example with more than `block_size` positions loses tokens from
the left of its prompt (it is counted); one whose completion alone does not fit is a bad
record.

Examples are packed whole, in file order, into `block_size` windows (next fit; the tail
of a window is padding with ignored targets). Each window carries `segments`: the index
of the example each position belongs to. The trainer passes them to the model, which
masks attention across examples and restarts positions at each example, so each example
contributes to a packed window's loss and gradient what it contributes alone (to rounding).
"""

from __future__ import annotations

import json
import sys
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from npgpt.data import SPLITS
from npgpt.errors import UserError
from npgpt.layers import IGNORE_INDEX

FIELDS = ("prompt", "completion")
SKIP_HINT = "fix the record, or pass --skip-bad to skip bad records"


class PairsError(UserError, ValueError):
    """A pairs file that cannot be used; the message names the file and line."""


@dataclass(frozen=True)
class Pair:
    prompt: str
    completion: str
    line: int  # 1-based line in the file


@dataclass
class PairsFile:
    """The good records of a file, and one message per record skipped."""

    path: str
    pairs: list[Pair] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)

    def skip_note(self) -> str:
        """'' or '; skipped N bad records (first: ...)' for a summary line."""
        if not self.skipped:
            return ""
        return f"; skipped {len(self.skipped)} bad record{'s' * (len(self.skipped) != 1)} (first: {self.skipped[0]})"


def read_pairs(path, skip_bad: bool = False) -> PairsFile:
    """The records of a JSON Lines pairs file. A bad record (invalid JSON or UTF-8, not an
    object, a missing or non-string field, an empty completion) raises PairsError naming
    file:line, or with `skip_bad` is skipped and counted."""
    path = str(path)
    try:
        raw = Path(path).read_bytes()
    except FileNotFoundError:
        raise PairsError(f"{path}: no such file; give a JSON Lines file of {{\"prompt\", \"completion\"}} records") from None
    except OSError as e:
        raise PairsError(f"{path}: cannot read it ({e.strerror}); check the path") from None
    result = PairsFile(path)
    for number, line in enumerate(raw.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            result.pairs.append(parse_record(line, number))
        except ValueError as e:
            where = f"{path}:{number}: {e}"
            if not skip_bad:
                raise PairsError(f"{where}; {SKIP_HINT}") from None
            result.skipped.append(where)
    if not result.pairs:
        raise PairsError(f"{path}: no usable records{result.skip_note()}; each line must be a JSON object with "
                         f"string fields \"prompt\" and \"completion\"")  # fmt: skip
    return result


def parse_record(line: bytes, number: int) -> Pair:
    """One line -> Pair; ValueError saying what is wrong with it."""
    try:
        text = line.decode("utf-8")
    except UnicodeDecodeError as e:
        raise ValueError(f"not UTF-8 (byte {e.start + 1})") from None
    try:
        record = json.loads(text)
    except json.JSONDecodeError as e:
        raise ValueError(f"invalid JSON ({e.msg} at column {e.colno})") from None
    if not isinstance(record, dict):
        raise ValueError(f"a JSON {type(record).__name__}, not an object with \"prompt\" and \"completion\"")
    for name in FIELDS:
        if name not in record:
            raise ValueError(f"no \"{name}\" field")
        if not isinstance(record[name], str):
            kind = "null" if record[name] is None else type(record[name]).__name__
            raise ValueError(f"\"{name}\" is a JSON {kind}, not a string")
    if not record["completion"]:
        raise ValueError("\"completion\" is empty")
    return Pair(record["prompt"], record["completion"], number)


def encode_pair(tokenizer, pair: Pair) -> tuple[list[int], list[int]]:
    """(prompt ids, completion ids), each encoded on its own (as generation sees the prompt).
    An empty prompt is <|endoftext|> (or a newline without one), as in `npgpt.generate`."""
    from npgpt.generate import encode_prompt

    prompt, _ = encode_prompt(tokenizer, pair.prompt, n_ctx=sys.maxsize)
    return prompt, tokenizer.encode(pair.completion, allowed_special="all")


@dataclass
class Example:
    """One example's inputs and targets (L,), prompt targets set to IGNORE_INDEX."""

    ids: np.ndarray
    targets: np.ndarray
    cut: int  # prompt tokens dropped from the left to fit the block


def make_example(prompt: list[int], completion: list[int], eot: int | None, block_size: int) -> Example:
    """prompt + completion (+ eot) as inputs/targets of at most `block_size` positions.

    Position i predicts token i + 1; only the predictions of completion tokens and the end
    of text are scored. Too long: the prompt loses tokens from its left (at least one
    prompt token stays, to predict the first completion token); ValueError if even that
    does not fit."""
    tail = completion + ([eot] if eot is not None else [])
    if len(tail) > block_size:
        raise ValueError(f"the completion is {len(tail)} tokens{' with end-of-text' * (eot is not None)}, "
                         f"more than the block of {block_size} holds with a prompt")  # fmt: skip
    cut = max(0, len(prompt) + len(tail) - 1 - block_size)
    seq = np.asarray(prompt[cut:] + tail, dtype=np.int64)
    targets = seq[1:].copy()
    targets[: len(prompt) - cut - 1] = IGNORE_INDEX
    return Example(seq[:-1], targets, cut)


@dataclass
class Packed:
    """Windows (W, T): ids, targets (IGNORE_INDEX where nothing is scored), segments (the
    example index within the window; padding is one more segment)."""

    ids: np.ndarray
    targets: np.ndarray
    segments: np.ndarray

    @property
    def scored(self) -> int:
        return int(np.count_nonzero(self.targets != IGNORE_INDEX))


def pack(examples: list[Example], block_size: int, pad_id: int = 0) -> Packed:
    """Whole examples into block_size windows in order: an example goes into the current
    window if it fits, else starts the next one (no example is ever split)."""
    starts, used = [], []  # per example: its window and offset
    for ex in examples:
        if len(ex.ids) > block_size:
            raise ValueError(f"an example of {len(ex.ids)} positions does not fit a block of {block_size}")
        if not used or used[-1] + len(ex.ids) > block_size:
            used.append(0)
        starts.append((len(used) - 1, used[-1]))
        used[-1] += len(ex.ids)
    W, T = len(used), block_size
    ids = np.full((W, T), pad_id, dtype=np.int64)
    targets = np.full((W, T), IGNORE_INDEX, dtype=np.int64)
    segments = np.empty((W, T), dtype=np.int64)
    count = np.zeros(W, dtype=np.int64)  # examples placed per window so far
    for ex, (w, off) in zip(examples, starts):
        end = off + len(ex.ids)
        ids[w, off:end], targets[w, off:end], segments[w, off:end] = ex.ids, ex.targets, count[w]
        count[w] += 1
    for w in range(W):
        segments[w, used[w] :] = count[w]  # the padding: a segment of its own
    return Packed(ids, targets, segments)


@dataclass
class PairsData:
    """A pairs file made into training examples for one tokenizer and block size."""

    file: PairsFile
    examples: list[Example]
    truncated: int  # examples whose prompt lost tokens

    def summary(self) -> str:
        scored = sum(int(np.count_nonzero(ex.targets != IGNORE_INDEX)) for ex in self.examples)
        return (f"{len(self.examples):,} pairs from {self.file.path} ({scored:,} completion tokens; "
                f"{self.truncated} prompts truncated from the left{self.file.skip_note()})")  # fmt: skip

    def samplers(self, block_size, batch_size, grad_accum, seed, val_fraction):
        """(train, validation or None) PackedSamplers: the last val_fraction of the examples
        validate."""
        train, val = split_examples(self.examples, val_fraction)
        if not train:
            raise PairsError(f"{self.file.path}: no examples left to train on; lower --val-fraction")
        val_sampler = PackedSampler(pack(val, block_size), batch_size, 1, seed, "val") if val else None
        return PackedSampler(pack(train, block_size), batch_size, grad_accum, seed, "train"), val_sampler


def load_examples(path, tokenizer, block_size: int, skip_bad: bool = False) -> PairsData:
    """Read, tokenize and fit every record to `block_size`; records that cannot be encoded
    or fitted are bad records too (PairsError, or skipped with `skip_bad`)."""
    if tokenizer.eot_id is None:
        raise PairsError("the tokenizer has no <|endoftext|> token to end each completion with; "
                         "use npgpt.pairs.add_end_of_text (the trainer does this)")  # fmt: skip
    file = read_pairs(path, skip_bad)
    examples, good = [], []
    for pair in file.pairs:
        try:
            examples.append(make_example(*encode_pair(tokenizer, pair), tokenizer.eot_id, block_size))
            good.append(pair)
        except ValueError as e:
            where = f"{file.path}:{pair.line}: {e}"
            if not skip_bad:
                raise PairsError(f"{where}; {SKIP_HINT} (or raise --block-size)") from None
            file.skipped.append(where)
    file.pairs = good
    if not examples:
        raise PairsError(f"{file.path}: no record fits{file.skip_note()}")
    return PairsData(file, examples, sum(ex.cut > 0 for ex in examples))


def split_examples(examples: list, val_fraction: float) -> tuple[list, list]:
    """The first (1 - val_fraction) of the examples for training, the rest for validation."""
    if not 0.0 <= val_fraction < 1.0:
        raise ValueError(f"the validation fraction must be in [0, 1), got {val_fraction}")
    cut = len(examples) - int(round(len(examples) * val_fraction))
    return examples[:cut], examples[cut:]


class PackedSampler:
    """Batches of packed windows: ids, targets, segments (B, T) int64.

    Windows are visited epoch by epoch, each epoch in the order of a permutation seeded by
    (seed, split, epoch): the batch of any (step, micro) is a function of those numbers
    alone, so resuming needs only the step. `grad_accum` fixes how many batches a step
    takes."""

    def __init__(self, packed: Packed, batch_size: int, grad_accum: int, seed: int, split: str = "train"):
        self.packed, self.batch_size, self.grad_accum, self.seed, self.split = packed, batch_size, grad_accum, seed, split
        self._orders: dict[int, np.ndarray] = {}

    @property
    def windows(self) -> int:
        return len(self.packed.ids)

    def _order(self, epoch: int) -> np.ndarray:
        if epoch not in self._orders:
            if len(self._orders) > 2:
                self._orders.clear()
            self._orders[epoch] = np.random.default_rng([self.seed, SPLITS[self.split], epoch]).permutation(self.windows)
        return self._orders[epoch]

    def batch(self, step: int, micro: int = 0) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        first = (step * self.grad_accum + micro) * self.batch_size
        rows = [self._order(i // self.windows)[i % self.windows] for i in range(first, first + self.batch_size)]
        p = self.packed
        return p.ids[rows], p.targets[rows], p.segments[rows]


def add_end_of_text(tokenizer, params: dict[str, np.ndarray] | None = None):
    """A tokenizer with <|endoftext|> (unchanged if it has one) and, for a model's host
    `params`, the token embedding grown to match: the new id is n_vocab, its row (unless
    the embedding already has a spare one) the mean of the others (an average token). Returns (tokenizer, params, added)."""
    from npgpt.tokenizer import BPETokenizer
    from npgpt.tokenizer.base import ENDOFTEXT

    if tokenizer.eot_id is not None:
        return tokenizer, params, False
    if not isinstance(tokenizer, BPETokenizer):
        raise PairsError(f"a {type(tokenizer).__name__} has no <|endoftext|> and cannot take one; "
                         "use a byte-level tokenizer for pairs (--tokenizer bytes or bpe:N)")  # fmt: skip
    grown = BPETokenizer(tokenizer.ranks, {**tokenizer.special_tokens, ENDOFTEXT: tokenizer.n_vocab}, tokenizer.pattern)
    if params is not None and params["wte.weight"].shape[0] <= grown.eot_id:  # no spare (padding) row
        wte = params["wte.weight"]  # (V, C)
        params = {**params, "wte.weight": np.concatenate([wte, wte.mean(axis=0, keepdims=True)]).astype(wte.dtype)}
    return grown, params, True
