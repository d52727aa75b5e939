"""npgpt's benchmarks: `python tools/bench.py <name> [options]`, JSON on stdout.

    forward    GPT-2 124M forward pass vs the matmul ceiling (and PyTorch, --vs torch)
    train      training step time and the Shakespeare recipe race vs PyTorch
    generate   cached/uncached decoding vs the bandwidth ceiling (and transformers)
    tokenizer  BPE encode/decode/train throughput vs tiktoken and encoder.py
    prepare    corpus prepare step at 1 and 2 processes vs tiktoken's encode_ordinary_batch
    gpu        GPT-2 124M decoding and a training step on CuPy vs PyTorch CUDA

`python tools/bench.py <name> --help` lists each one's options.
"""

import importlib
import sys
from pathlib import Path

NAMES = ("forward", "train", "generate", "tokenizer", "gpu", "prepare")


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    if not argv or argv[0] not in NAMES:
        print(__doc__, file=sys.stderr)
        return 2
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    return importlib.import_module(f"bench_{argv[0]}").main(argv[1:])


if __name__ == "__main__":
    sys.exit(main())
