"""npgpt's benchmarks: `python tools/bench.py <name> [options]`, JSON on stdout, a summary
(CPU model, BLAS kernel, load, the key ratios) on stderr. `<name> --help` lists options.
"""

import importlib
import os
import sys

import npgpt  # noqa: F401  (before NumPy: it sets OpenBLAS's spin timeout, as the CLIs do)

# name -> (module in tools/ with a main(argv), one line of help). One line adds a benchmark.
BENCHMARKS = {
    "forward": ("bench_forward", "GPT-2 124M forward pass vs the GEMM ceiling (and PyTorch, --vs torch)"),
    "train": ("bench_train", "training step vs the GEMM ceiling and PyTorch; the Shakespeare recipe race (--backend cupy: GPU)"),
    "generate": ("bench_generate", "cached/uncached decoding vs the bandwidth ceiling and transformers (--backend cupy: GPU)"),
    "tokenizer": ("bench_tokenizer", "BPE encode/decode/train throughput vs tiktoken and encoder.py; time per chunk length"),
    "eval": ("bench_eval", "the whole python -m npgpt.eval run on tinyshakespeare with the shipped model: wall time, tokens/s"),
    "prepare": ("bench_prepare", "corpus prepare step at 1 and 2 processes vs tiktoken's encode_ordinary_batch"),
    "scale": ("bench_scale", "data-parallel tokens/s: 1 rank x 2 threads vs 2 ranks x 1 thread (mpiexec); comm; ZeRO-1 memory"),
}


def usage() -> str:
    rows = "\n".join(f"    {name:<10} {help_}" for name, (_, help_) in BENCHMARKS.items())
    return f"{__doc__}\n{rows}\n\n--debug (or NPGPT_DEBUG=1): tracebacks instead of one-line errors."


def main(argv=None):
    argv = list(sys.argv[1:] if argv is None else argv)
    debug = os.environ.get("NPGPT_DEBUG") == "1" or "--debug" in argv
    argv = [a for a in argv if a != "--debug"]
    if not argv or argv[0] in ("-h", "--help"):
        print(usage())
        return 0 if argv else 2
    if argv[0] not in BENCHMARKS:
        print(f"error: unknown benchmark {argv[0]!r}; choose one of {', '.join(BENCHMARKS)}", file=sys.stderr)
        return 2
    module = importlib.import_module(BENCHMARKS[argv[0]][0])  # tools/ is sys.path[0] when run as a script
    from benchlib import BenchError

    try:
        return module.main(argv[1:])
    except (BenchError, ImportError, OSError, ValueError) as e:
        if debug:
            raise
        print(f"error: {e}" if isinstance(e, BenchError) else f"error: {type(e).__name__}: {e}; rerun with --debug for a traceback",
              file=sys.stderr)  # fmt: skip
        return 1


if __name__ == "__main__":
    sys.exit(main())
