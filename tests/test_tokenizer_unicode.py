"""The split pattern on every Unicode code point, against tiktoken.

`\\p{L}` and `\\p{N}` follow the Unicode tables of the installed `regex` release; tiktoken's
follow its Rust regex crate (Unicode 16.0 in tiktoken 0.14). Measured over all 1,111,998
non-surrogate code points with tiktoken 0.14.0:

    regex 2023.12.25 .. 2024.7.24   4382 code points split differently (Unicode 15.1 tables)
    regex 2024.9.11  .. 2025.9.18   none                               (Unicode 16.0)
    regex 2025.10.22 .. 2026.6.28   4657 differ                        (Unicode 17.0)
    regex 2026.9.29  .. 2026.11.15  17480 differ

so npgpt needs regex>=2024.9.11,<2025.10.22. Every differing code point is unassigned in
Python 3.11's own `unicodedata` (Unicode 14): they are recently assigned characters.
"""

from __future__ import annotations

import numpy as np
import pytest
import regex
import tiktoken
from hypothesis import given, settings
from hypothesis import strategies as st
from tiktoken_ext.openai_public import r50k_pat_str

from npgpt.tokenizer import GPT2_PATTERN

COMPATIBLE_REGEX = ">=2024.9.11,<2025.10.22"
PUBLISHED_GPT2_PATTERN = r"""'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"""
PREFIXES = "!a1"  # punctuation, letter, digit: a code point joins the one of its own class


def tiktoken_joined(probes: list[str]) -> np.ndarray:
    """tiktoken's chunking, made visible: a vocabulary of the 256 bytes plus every
    prefix + byte pair, so a probe's first token has 2 bytes exactly when prefix and code
    point share a chunk (a token never spans chunks)."""
    ranks = {bytes([b]): b for b in range(256)}
    ranks.update({bytes([ord(p), b]): 256 * (1 + i) + b for i, p in enumerate(PREFIXES) for b in range(256)})
    probe = tiktoken.Encoding(name="probe", pat_str=r50k_pat_str, mergeable_ranks=ranks, special_tokens={})
    ids = np.array(probe.encode_ordinary("".join(probes)))
    token_lengths = np.where(ids < 256, 1, 2)
    token_starts = np.concatenate([[0], np.cumsum(token_lengths)[:-1]])
    probe_starts = np.concatenate([[0], np.cumsum([len(p.encode()) for p in probes])[:-1]])
    first = np.searchsorted(token_starts, probe_starts)
    return token_lengths[first] == 2


def npgpt_joined(probes: list[str]) -> np.ndarray:
    """Same question for npgpt's split: does no chunk start one character into a probe?"""
    chunk_lengths = np.fromiter(map(len, regex.findall(GPT2_PATTERN, "".join(probes))), dtype=np.int64)
    chunk_starts = np.concatenate([[0], np.cumsum(chunk_lengths)[:-1]])
    probe_starts = np.concatenate([[0], np.cumsum(np.fromiter(map(len, probes), dtype=np.int64))[:-1]])
    return ~np.isin(probe_starts + 1, chunk_starts)


@pytest.mark.slow
def test_every_code_point_splits_as_tiktoken():
    """Each code point c is probed as prefix + c + "\\n" ("\\n" never joins what follows).
    Stage by stage: is c punctuation-like ("!c" one chunk)? else a letter ("ac")? else a
    digit ("1c")? else whitespace. npgpt and tiktoken must agree at every stage."""
    remaining = np.array([cp for cp in range(0x110000) if not 0xD800 <= cp <= 0xDFFF])
    differing = []
    for prefix in PREFIXES:
        probes = [f"{prefix}{chr(cp)}\n" for cp in remaining.tolist()]
        theirs, ours = tiktoken_joined(probes), npgpt_joined(probes)
        differing += remaining[theirs != ours].tolist()
        remaining = remaining[~theirs & ~ours]
    assert not differing, (
        f"regex {regex.__version__} splits {len(differing)} code points (first: "
        f"{', '.join(f'U+{cp:04X}' for cp in differing[:5])}) differently from tiktoken "
        f"{tiktoken.__version__}: its Unicode tables differ. Install regex{COMPATIBLE_REGEX}."
    )


@settings(max_examples=300, deadline=None)
@given(st.text(st.characters(exclude_categories=("Cs",)).filter(str.isprintable) | st.sampled_from(" \n\t\r'"), max_size=40))
def test_possessive_pattern_splits_as_the_published_one(text):
    assert regex.findall(GPT2_PATTERN, text) == regex.findall(PUBLISHED_GPT2_PATTERN, text)
