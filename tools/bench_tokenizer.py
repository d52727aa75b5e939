"""Tokenizer benchmark: encode/decode throughput on tinyshakespeare and BPE training time.

Three GPT-2 tokenizers, timed round-robin in one process: npgpt's, tiktoken (Rust, one
thread) and tools/baseline_bpe.py (pure Python the way OpenAI's encoder.py works).
"cold" is the first call on a freshly built tokenizer (empty caches; building it is not
timed), "warm" a later call on the same one. MB/s counts UTF-8 bytes of text. Ratios are
npgpt's throughput over the others'. Also: the time to train a 1024-token vocabulary, and
the growth with a chunk's length: seconds to encode one chunk of n random lowercase
letters (one match of the split pattern), npgpt (cache cleared) vs tiktoken, and npgpt's
quadratic merge alone up to --quadratic-up-to letters.

    python tools/bench.py tokenizer [--repeats 5] [--train-repeats 3] [--chunk-lengths 1000,...]
"""

from __future__ import annotations

import argparse
import os
import statistics
import time
from pathlib import Path

os.environ.setdefault("RAYON_NUM_THREADS", "1")  # tiktoken's thread pool (used by batch calls only)

from baseline_bpe import BaselineBPE  # noqa: E402  (tools/ is on sys.path: run through tools/bench.py)
from benchlib import emit, interleaved, log, summary  # noqa: E402

from npgpt.tokenizer import bpe, train_bpe  # noqa: E402
from npgpt.tokenizer.bpe import GPT2_PATTERN  # noqa: E402
from npgpt.tokenizer.formats import load as load_tokenizer, save as save_tokenizer  # noqa: E402

DATA = Path(os.environ.get("NPGPT_DATA", Path(__file__).resolve().parents[2] / "shared" / "data"))


def builders(data: Path) -> dict:
    """name -> zero-argument function building a fresh GPT-2 tokenizer."""
    import tiktoken
    import tiktoken.load

    tiktoken_ranks = tiktoken.load.load_tiktoken_bpe(str(data / "gpt2" / "gpt2.tiktoken"))
    return {
        "npgpt": lambda: load_tokenizer(data / "gpt2" / "gpt2.tiktoken"),
        "tiktoken": lambda: tiktoken.Encoding(
            name="gpt2", pat_str=GPT2_PATTERN, mergeable_ranks=tiktoken_ranks, special_tokens={"<|endoftext|>": 50256}
        ),
        "baseline": lambda: BaselineBPE(data / "gpt2" / "encoder.json", data / "gpt2" / "vocab.bpe"),
    }


def cold_times(build: dict, call, repeats: int) -> dict[str, list[float]]:
    """Seconds of `call(tokenizer)` on a fresh tokenizer each time, round-robin."""
    times = {name: [] for name in build}
    for _ in range(repeats):
        for name, make in build.items():
            tokenizer = make()
            start = time.perf_counter()
            call(tokenizer)
            times[name].append(time.perf_counter() - start)
    return times


def throughput(times: dict[str, list[float]], nbytes: int) -> dict:
    report = {name: {**summary(t), "MB_per_s": nbytes / statistics.median(t) / 1e6} for name, t in times.items()}
    for other in ("tiktoken", "baseline"):
        report[f"npgpt_over_{other}"] = report["npgpt"]["MB_per_s"] / report[other]["MB_per_s"]
    return report


def chunk_growth(npgpt_tokenizer, tiktoken_encoding, lengths, quadratic_up_to: int, repeats: int) -> dict:
    """Per chunk length n: median seconds to encode n random lowercase letters, per contender."""
    import random
    import string

    rng = random.Random(0)
    table = {}
    for n in lengths:
        text = "".join(rng.choice(string.ascii_lowercase) for _ in range(n))

        def npgpt_heap():
            npgpt_tokenizer._cache.clear()
            npgpt_tokenizer.encode_ordinary(text)

        contenders = {"npgpt": npgpt_heap, "tiktoken": lambda: tiktoken_encoding.encode_ordinary(text)}
        if n <= quadratic_up_to:
            singles = [bytes([b]) for b in text.encode()]
            contenders["npgpt_quadratic_merge"] = lambda: bpe.bpe_merge(list(singles), npgpt_tokenizer.ranks)
        times = interleaved(contenders, repeats, warmup=0)
        table[n] = {name: statistics.median(t) for name, t in times.items()}
        log(f"chunk of {n:,} letters: " + ", ".join(f"{k} {v * 1e3:.1f} ms" for k, v in table[n].items()))
    return table


def cold_encode_by_merge(make, text: str, repeats: int) -> dict:
    """Cold encode seconds with long chunks merged by the heap (as shipped) and with every
    chunk merged by the quadratic merge (the algorithm before the heap), interleaved."""
    times = {"heap_for_long_chunks": [], "quadratic_only": []}
    shipped = bpe.HEAP_FROM
    try:
        for _ in range(repeats):
            for name, heap_from in (("heap_for_long_chunks", shipped), ("quadratic_only", 1 << 62)):
                bpe.HEAP_FROM = heap_from
                tokenizer = make()
                start = time.perf_counter()
                tokenizer.encode(text)
                times[name].append(time.perf_counter() - start)
    finally:
        bpe.HEAP_FROM = shipped
    return {name: summary(t) for name, t in times.items()}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="bench.py tokenizer", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=5, help="timed runs per contender and measure (default 5)")
    parser.add_argument("--train-repeats", type=int, default=3, help="timed 1024-token trainings (default 3)")
    parser.add_argument("--data", type=Path, default=DATA, help=f"data folder (default {DATA})")
    parser.add_argument("--chunk-lengths", default="1000,2000,5000,10000,20000,50000,100000",
                        help="letters per chunk for the growth table (comma-separated)")
    parser.add_argument("--quadratic-up-to", type=int, default=10000, help="longest chunk timed with the quadratic merge (default 10000)")
    parser.add_argument("--chunk-repeats", type=int, default=3, help="timed runs per chunk length (default 3)")
    parser.add_argument("--max-chars", type=int, help="use only the corpus's first N characters (smoke runs)")
    args = parser.parse_args(argv)

    text = (args.data / "corpora" / "tinyshakespeare.txt").read_text("utf-8")[: args.max_chars]
    nbytes = len(text.encode("utf-8"))
    build = builders(args.data)
    warm = {name: make() for name, make in build.items()}
    ids = {name: tok.encode(text) for name, tok in warm.items()}
    identical = ids["npgpt"] == ids["tiktoken"] == ids["baseline"]
    log(f"ids identical across the three: {identical}")

    log("encode, cold")
    encode_cold = cold_times(build, lambda tok: tok.encode(text), args.repeats)
    log("encode, warm")
    encode_warm = interleaved({name: (lambda tok=tok: tok.encode(text)) for name, tok in warm.items()}, args.repeats)
    tokens = ids["tiktoken"]
    log("decode, cold")
    decode_cold = cold_times(build, lambda tok: tok.decode(tokens), args.repeats)
    log("decode, warm")
    decode_warm = interleaved({name: (lambda tok=tok: tok.decode(tokens)) for name, tok in warm.items()}, args.repeats)

    log("training a 1024-token vocabulary")
    train_seconds = []
    for _ in range(args.train_repeats):
        start = time.perf_counter()
        trained = train_bpe(text, 1024)
        train_seconds.append(time.perf_counter() - start)

    log("chunk-length growth")
    growth = chunk_growth(warm["npgpt"], warm["tiktoken"], [int(n) for n in args.chunk_lengths.split(",")],
                          args.quadratic_up_to, args.chunk_repeats)  # fmt: skip
    log("cold encode: heap merge for long chunks vs quadratic merge only")
    by_merge = cold_encode_by_merge(build["npgpt"], text, args.repeats)

    encode_warm, encode_cold = throughput(encode_warm, nbytes), throughput(encode_cold, nbytes)
    lines = [f"tokenizer: npgpt / tiktoken encode warm {encode_warm['npgpt_over_tiktoken']:.2f}, cold {encode_cold['npgpt_over_tiktoken']:.2f};"
             f" train 1024: {statistics.median(train_seconds):.2f} s"]
    emit(
        {
            "benchmark": "tokenizer",
            "corpus": "tinyshakespeare" if args.max_chars is None else f"tinyshakespeare[:{args.max_chars}]",
            "corpus_bytes": nbytes,
            "tokens": len(tokens),
            "threads": 1,
            "ids_identical_to_tiktoken_and_baseline": identical,
            "encode_cold": encode_cold,
            "encode_warm": encode_warm,
            "decode_cold": throughput(decode_cold, nbytes),
            "decode_warm": throughput(decode_warm, nbytes),
            "chunk_length_seconds": growth,
            "cold_encode_by_merge": by_merge,
            "train_1024": {**summary(train_seconds), "n_vocab": trained.n_vocab, "tokens_of_corpus": len(trained.encode(text))},
            "goals": {"encode_warm_over_tiktoken": 0.4, "encode_cold_over_tiktoken": 0.2, "train_1024_s": 10.0},
        },
        lines,
    )
    return 0
