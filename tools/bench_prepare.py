"""Prepare-step benchmark: `python -m npgpt.data prepare` throughput at 1 and 2 worker
processes, against tiktoken's `encode_ordinary_batch` at 1 and 2 threads.

The corpus is generated: documents of tinyshakespeare's lines drawn at random (seeded),
written as .jsonl files into a temp folder. npgpt's time is the whole prepare step (read,
decode, encode, write, spawn the workers), tiktoken's only the encoding of the documents
already in memory. Contenders run round-robin in one process; MB/s counts UTF-8 bytes of
document text.

    python tools/bench.py prepare [--mb 20] [--repeats 3]
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import statistics
import tempfile
from pathlib import Path

import numpy as np

from benchlib import emit, interleaved, log, summary  # noqa: E402  (tools/ is on sys.path: run through tools/bench.py)

from npgpt.prepare import is_val, prepare  # noqa: E402
from npgpt.tokenizer import load, save  # noqa: E402
from npgpt.tokenizer.bpe import GPT2_PATTERN  # noqa: E402

DATA = Path(os.environ.get("NPGPT_DATA", Path(__file__).resolve().parents[2] / "shared" / "data"))


def generate_documents(corpus: Path, nbytes: int, seed: int = 0) -> list[str]:
    """About `nbytes` of documents (20 to 1000 random lines of tinyshakespeare each)."""
    lines = np.array([line for line in corpus.read_text("utf-8").split("\n") if line], dtype=object)
    rng = np.random.default_rng(seed)
    documents, size = [], 0
    while size < nbytes:
        document = "\n".join(lines[rng.integers(0, len(lines), int(rng.integers(20, 1000)))]) + "\n"
        documents.append(document)
        size += len(document)
    return documents


def cpu_seconds() -> float:
    """User + system CPU seconds of this process and of its finished children."""
    own, children = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + children.ru_utime + children.ru_stime


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="bench.py prepare", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--mb", type=float, default=20.0, help="corpus size in MB (default 20)")
    parser.add_argument("--repeats", type=int, default=3, help="timed runs per contender (default 3)")
    parser.add_argument("--data", type=Path, default=DATA, help=f"data folder (default {DATA})")
    args = parser.parse_args(argv)

    import tiktoken
    import tiktoken.load

    documents = generate_documents(args.data / "corpora" / "tinyshakespeare.txt", int(args.mb * 1e6))
    nbytes = sum(len(d.encode("utf-8")) for d in documents)
    ranks = tiktoken.load.load_tiktoken_bpe(str(args.data / "gpt2" / "gpt2.tiktoken"))
    encoding = tiktoken.Encoding(name="gpt2", pat_str=GPT2_PATTERN, mergeable_ranks=ranks, special_tokens={"<|endoftext|>": 50256})
    with tempfile.TemporaryDirectory(prefix="bench-prepare.") as tmp:
        tmp = Path(tmp)
        tokenizer_dir = save(load(args.data / "gpt2" / "gpt2.tiktoken"), tmp / "tokenizer")
        (tmp / "corpus").mkdir()
        per_file = max(1, len(documents) // 20)
        for i in range(0, len(documents), per_file):
            with open(tmp / "corpus" / f"part{i // per_file:03d}.jsonl", "w") as f:
                f.writelines(json.dumps({"text": d}) + "\n" for d in documents[i : i + per_file])

        cpu = {1: [], 2: []}  # CPU seconds of each prepare run: this process and its workers

        def run_prepare(workers: int):
            out = tmp / f"out{workers}"
            shutil.rmtree(out, ignore_errors=True)  # a fresh folder: no no-op shortcut
            before = cpu_seconds()
            prepare([str(tmp / "corpus")], out, str(tokenizer_dir), workers=workers)
            cpu[workers].append(cpu_seconds() - before)

        log(f"{nbytes / 1e6:.1f} MB in {len(documents)} documents; timing {args.repeats} rounds")
        contenders = {
            "npgpt_prepare_1_worker": lambda: run_prepare(1),
            "npgpt_prepare_2_workers": lambda: run_prepare(2),
            "tiktoken_batch_1_thread": lambda: encoding.encode_ordinary_batch(documents, num_threads=1),
            "tiktoken_batch_2_threads": lambda: encoding.encode_ordinary_batch(documents, num_threads=2),
        }
        times = interleaved(contenders, args.repeats, warmup=0)
        expected = {"train": [], "val": []}
        for number, ids in enumerate(encoding.encode_ordinary_batch(documents)):
            expected["val" if is_val(1337, number, 0.0005) else "train"] += [*ids, 50256]
        ids_equal = all(
            np.array_equal(np.fromfile(tmp / out / f"{split}.bin", np.uint16), np.asarray(expected[split], np.uint16))
            for out in ("out1", "out2") for split in ("train", "val")
        )  # fmt: skip
    report = {name: {**summary(t), "MB_per_s": nbytes / statistics.median(t) / 1e6} for name, t in times.items()}
    for workers, name in ((1, "npgpt_prepare_1_worker"), (2, "npgpt_prepare_2_workers")):
        # cores the run kept busy (CPU / wall) tells a machine that gave it less than `workers`
        # cores apart from a prepare step with serial work in it
        report[name]["cpu_s"] = statistics.median(cpu[workers])
        report[name]["cores_used"] = statistics.median(c / t for c, t in zip(cpu[workers], times[name]))
    rate = {name: r["MB_per_s"] for name, r in report.items()}
    emit(
        {
            "benchmark": "prepare",
            "corpus": "generated from tinyshakespeare lines",
            "corpus_bytes": nbytes,
            "documents": len(documents),
            "ids_equal_to_tiktoken": bool(ids_equal),
            **report,
            "speedup_2_workers_over_1": rate["npgpt_prepare_2_workers"] / rate["npgpt_prepare_1_worker"],
            "cpu_2_workers_over_1": report["npgpt_prepare_2_workers"]["cpu_s"] / report["npgpt_prepare_1_worker"]["cpu_s"],
            "npgpt_over_tiktoken_1": rate["npgpt_prepare_1_worker"] / rate["tiktoken_batch_1_thread"],
            "npgpt_over_tiktoken_2": rate["npgpt_prepare_2_workers"] / rate["tiktoken_batch_2_threads"],
        },
        [f"prepare: {rate['npgpt_prepare_1_worker']:.2f} MB/s at 1 worker, {rate['npgpt_prepare_2_workers']:.2f} at 2"
         f" (x{rate['npgpt_prepare_2_workers'] / rate['npgpt_prepare_1_worker']:.2f});"
         f" npgpt / tiktoken {rate['npgpt_prepare_1_worker'] / rate['tiktoken_batch_1_thread']:.2f} at 1, "
         f"{rate['npgpt_prepare_2_workers'] / rate['tiktoken_batch_2_threads']:.2f} at 2"],
    )
    return 0
