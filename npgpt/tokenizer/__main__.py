"""Command line: python -m npgpt.tokenizer train|encode|decode ..."""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

from npgpt.errors import UserError, add_debug_flag, run_cli
from npgpt.tokenizer.char import CharTokenizer
from npgpt.tokenizer.train import train_bpe
from npgpt.tokenizer.formats import load as load_tokenizer, save as save_tokenizer


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
    for command in (parser, train, encode, decode):
        add_debug_flag(command)
    return parser


def main(argv: list[str] | None = None) -> int:
    return run_cli(_main, argv)


def _read(path: Path) -> str:
    try:
        return path.read_text("utf-8")
    except UnicodeDecodeError as e:
        raise UserError(f"{path} is not UTF-8 text ({e.reason} at byte {e.start}); convert it to UTF-8") from None


def _main(argv: list[str] | None) -> int:
    args = build_parser().parse_args(argv)
    if args.command == "train":
        text = _read(args.input)
        start = time.perf_counter()
        if args.char:
            tokenizer = CharTokenizer.train(text)
        else:
            try:
                tokenizer = train_bpe(text, args.vocab_size, args.pattern, args.special)
            except ValueError as e:  # a vocabulary size or pattern that cannot work
                raise UserError(f"{e}; change --vocab-size, --pattern or --special") from None
        seconds = time.perf_counter() - start
        save_tokenizer(tokenizer, args.output, None if args.char else args.format)
        print(f"trained {tokenizer!r} in {seconds:.2f} s; saved to {args.output}", file=sys.stderr)
    elif args.command == "encode":
        tokenizer = load_tokenizer(args.tokenizer)
        if args.text is not None:
            text = args.text
        else:
            text = _read(args.input) if args.input else sys.stdin.read()
        try:
            ids = tokenizer.encode(text, allowed_special="all" if args.allow_special else ())
        except ValueError as e:
            raise UserError(f"the text cannot be encoded: {e}") from None
        print(" ".join(map(str, ids)))
    else:
        tokenizer = load_tokenizer(args.tokenizer)
        words = sys.stdin.read().split() if not args.ids else []
        if not all(word.lstrip("-").isdigit() for word in words):
            raise UserError("stdin must hold whitespace-separated integer ids; give ids such as 15339 995")
        try:
            text = tokenizer.decode(args.ids or [int(word) for word in words])
        except ValueError as e:
            raise UserError(f"{e}; give ids the tokenizer has") from None
        sys.stdout.write(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
