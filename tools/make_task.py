"""Synthetic prompt/completion tasks for fine-tuning, as JSON Lines train and test files.

    python tools/make_task.py reverse --out-dir runs/reverse --train 100000 --test 500

writes OUT/train.jsonl and OUT/test.jsonl ({"prompt": ..., "completion": ...} per line).
The test examples are held back: none of their prompts occurs in the training file.

Tasks:
    reverse  a random word of 3-6 (--max-len) lowercase letters, reversed:  {"prompt": "lamp=", "completion": "pmal"}
    add      the sum of two 3-digit numbers:                    {"prompt": "123+456=", "completion": "579"}
"""

from __future__ import annotations

import argparse
import json
import string
import sys
from pathlib import Path

import numpy as np


def reverse(rng: np.random.Generator, max_len: int = 6) -> tuple[str, str]:
    word = "".join(rng.choice(list(string.ascii_lowercase), size=int(rng.integers(3, max_len + 1))))
    return f"{word}=", word[::-1]


def add(rng: np.random.Generator, max_len=None) -> tuple[str, str]:
    a, b = (int(x) for x in rng.integers(100, 1000, size=2))
    return f"{a}+{b}=", str(a + b)


TASKS = {"reverse": reverse, "add": add}


def make(task: str, n_train: int, n_test: int, seed: int, max_len: int = 6) -> tuple[list[dict], list[dict]]:
    """n_train + n_test examples with distinct prompts, drawn from a generator seeded by `seed`;
    the test examples are the last n_test distinct prompts drawn."""
    rng, draw = np.random.default_rng(seed), TASKS[task]
    examples: dict[str, str] = {}
    for _ in range(100 * (n_train + n_test)):
        if len(examples) == n_train + n_test:
            break
        prompt, completion = draw(rng, max_len)
        examples.setdefault(prompt, completion)
    else:
        raise ValueError(f"the {task} task has fewer than {n_train + n_test} distinct prompts")
    records = [{"prompt": p, "completion": c} for p, c in examples.items()]
    return records[:n_train], records[n_train:]


def write_jsonl(path: Path, records: list[dict]):
    path.write_text("".join(json.dumps(r) + "\n" for r in records), encoding="utf-8")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python tools/make_task.py", description=__doc__.split("\n\n")[0])
    p.add_argument("task", choices=sorted(TASKS))
    p.add_argument("--out-dir", required=True, help="folder for train.jsonl and test.jsonl (created)")
    p.add_argument("--train", type=int, default=100000, help="training examples (default 100000)")
    p.add_argument("--test", type=int, default=500, help="held-back test examples (default 500)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--max-len", type=int, default=6, help="reverse: the longest word, 3 or more (default 6)")
    args = p.parse_args(argv)
    try:
        if args.max_len < 3:
            raise ValueError(f"--max-len must be at least 3, got {args.max_len}")
        train, test = make(args.task, args.train, args.test, args.seed, args.max_len)
    except ValueError as e:
        print(f"error: {e}; ask for fewer examples", file=sys.stderr)
        return 2
    out = Path(args.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    write_jsonl(out / "train.jsonl", train)
    write_jsonl(out / "test.jsonl", test)
    print(f"{out}/train.jsonl: {len(train)} examples; {out}/test.jsonl: {len(test)} held back", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
