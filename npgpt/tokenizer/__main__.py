"""Command line: python -m npgpt.tokenizer train|encode|decode ..."""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

from npgpt.tokenizer.base import Tokenizer
from npgpt.tokenizer.char import CharTokenizer
from npgpt.tokenizer.train import train_bpe


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m npgpt.tokenizer", description="Train, encode with and decode with npgpt tokenizers.")
    commands = parser.add_subparsers(dest="command", required=True)

    train = commands.add_parser("train", help="learn a vocabulary from a text file and save it")
    train.add_argument("input", type=Path, help="UTF-8 text corpus")
    train.add_argument("output", type=Path, help="directory to save the tokenizer in")
    train.add_argument("--vocab-size", type=int, default=1024, help="ids in all: 256 bytes + merges + special tokens (default 1024)")
    train.add_argument("--pattern", default="gpt2", help='split pattern: "gpt2" (default), "gpt4" or a regex')
    train.add_argument("--special", action="append", default=[], metavar="TOKEN", help="register a special token (repeatable), e.g. '<|endoftext|>'")
    train.add_argument("--format", default="tiktoken", choices=["tiktoken", "huggingface", "gpt2"], help="vocabulary file form (default tiktoken)")
    train.add_argument("--char", action="store_true", help="character-level tokenizer instead of BPE (vocab = the text's characters)")

    encode = commands.add_parser("encode", help="print the ids of a text, space-separated")
    encode.add_argument("tokenizer", type=Path, help="tokenizer directory (or .tiktoken file)")
    source = encode.add_mutually_exclusive_group()
    source.add_argument("--text", help="text to encode (default: stdin)")
    source.add_argument("--input", type=Path, help="UTF-8 file to encode (default: stdin)")
    encode.add_argument("--allow-special", action="store_true", help="encode special-token strings as their ids")

    decode = commands.add_parser("decode", help="print the text of ids")
    decode.add_argument("tokenizer", type=Path, help="tokenizer directory (or .tiktoken file)")
    decode.add_argument("ids", nargs="*", type=int, help="ids to decode (default: whitespace-separated ids on stdin)")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.command == "train":
        text = args.input.read_text("utf-8")
        start = time.perf_counter()
        if args.char:
            tokenizer = CharTokenizer.train(text)
        else:
            tokenizer = train_bpe(text, args.vocab_size, args.pattern, args.special)
        seconds = time.perf_counter() - start
        tokenizer.save(args.output, None if args.char else args.format)
        print(f"trained {tokenizer!r} in {seconds:.2f} s; saved to {args.output}", file=sys.stderr)
    elif args.command == "encode":
        tokenizer = Tokenizer.load(args.tokenizer)
        if args.text is not None:
            text = args.text
        else:
            text = args.input.read_text("utf-8") if args.input else sys.stdin.read()
        ids = tokenizer.encode(text, allowed_special="all" if args.allow_special else ())
        print(" ".join(map(str, ids)))
    else:
        tokenizer = Tokenizer.load(args.tokenizer)
        ids = args.ids or [int(word) for word in sys.stdin.read().split()]
        sys.stdout.write(tokenizer.decode(ids))
    return 0


if __name__ == "__main__":
    try:
        sys.exit(main())
    except (ValueError, FileNotFoundError) as error:
        sys.exit(f"error: {error}")
