"""Perplexity of a checkpoint on a text file: `python -m npgpt.eval --weights DIR --data FILE`.

Texts longer than the context are scored with windows: windows of `context` input tokens
start every `stride` tokens; each also predicts the token after its inputs, and scores
only the targets no earlier window scored (the others get the ignore index), so every
token after the first is predicted exactly once, with up to `context - stride` tokens of
extra history.

The default stride is the context: disjoint windows, each token predicted from the tokens
of its own window alone (1 to context of them). This is how llm.c reads its validation
split (consecutive windows of T inputs, each target the token after its input), and how
nanoGPT's estimate_loss scores a window (every position, from the window alone; nanoGPT
draws its windows at random offsets instead of tiling the text). A smaller `--stride`
gives every scored token at least `context - stride` tokens of history, at about
context / stride times the work. The windows, at any stride, are those of Hugging Face's
documented loop ("Perplexity of fixed-length models") with max_length = context + 1 and
the same stride: an HF window of max_length tokens predicts max_length - 1 of them.

Windows of equal length are scored `batch_size` at a time at most, in pieces that NumPy's
fast kernels run on their threads, or (`--workers processes`, and by default where it can
run) on forked worker processes of one thread each (see `perplexity`, `worker_processes`).
"""

from __future__ import annotations

import argparse
import functools
import json
import math
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np

from npgpt.backend import get_backend
from npgpt.layers import IGNORE_INDEX
from npgpt.errors import UserError, add_debug_flag, run_cli
from npgpt.kernels.threads import add_threads_option, configure as configure_threads, on_one_thread
from npgpt.model import FLOAT_DTYPES
from npgpt.tokenizer.base import last_safe_cut
from npgpt.weights import load_model

LOGITS_BUDGET = 2**26  # default batch: at most this many logits (256 MiB in float32) at once
MAX_BATCH = 256  # ... and at most this many windows
READ_CHARS = 1 << 16  # --max-tokens: characters read per step


class EvalError(UserError, ValueError):
    """An evaluation that cannot run; the message says why and what to do."""


def sliding_windows(n_tokens: int, context: int, stride: int):
    """(begin, end, first_scored) per window: inputs are tokens [begin, end - 1), targets
    [begin + 1, end), and only targets at positions >= first_scored count."""
    if not 1 <= stride <= context:
        raise EvalError(f"stride must be in [1, context={context}], got {stride}; give a --stride in that range")
    scored_to = 1  # token 0 has no history: it is never predicted
    for begin in range(0, max(n_tokens - 1, 0), stride):
        end = min(begin + context + 1, n_tokens)
        yield begin, end, scored_to
        scored_to = end
        if end == n_tokens:
            return


def perplexity(model, ids: np.ndarray, context: int | None = None, stride: int | None = None,
               batch_size: int | None = None, progress: Callable[[int, int], None] | None = None,
               processes: int = 1) -> dict:  # fmt: skip
    """Mean negative log-likelihood (nats/token) and perplexity of `ids` under `model`.

    Runs of windows of one length go to the kernels' `over_batch` whole, as one batch of
    independent rows: NumPy's fast set hands their pieces to its threads as each comes
    free, with no wait at the end of each batch. A piece is scored `batch_size` windows
    at a time at most (default: MAX_BATCH, and LOGITS_BUDGET logits at once), which is
    what bounds memory where a set runs a batch whole (the reference). Each piece runs
    its kernels on one thread, also a run's only piece (the last, shorter window), and
    the pieces' sums are added exactly (math.fsum), so the result does not depend on
    which thread ran what, nor on the thread count where that leaves the pieces alone
    (over_batch cuts smaller ones only for runs shorter than two pieces a thread).
    progress(scored, total): called after each piece with the tokens scored so far.

    processes > 1 (NumPy backend, Linux): the pieces, as over_batch cuts them on one
    thread, go instead to that many forked worker processes of one thread each, as each
    comes free: no GIL shared between them. The loss equals the 1-thread loss."""
    context = context or model.config.n_ctx
    if not 1 <= context <= model.config.n_ctx:
        raise EvalError(f"context {context} must be in [1, the model's n_ctx {model.config.n_ctx}]; give a smaller --context")
    stride = stride or context
    batch_size = batch_size or max(1, min(MAX_BATCH, LOGITS_BUDGET // (context * model.config.vocab_size)))
    windows = list(sliding_windows(len(ids), context, stride))
    total = sum(end - first for _, end, first in windows)
    if total == 0:
        raise EvalError("the text has fewer than 2 tokens, so there is nothing to score; give a longer text")
    if processes > 1:
        sums = _score_on_processes(model, ids, _chunks(model, windows, batch_size), processes, progress, total)
        return _result(sums, total, windows, context, stride)
    sums: list[float] = []  # each chunk's summed negative log-likelihood
    scored, lock, stop = 0, threading.Lock(), threading.Event()

    def score(run: list, b0: int, b1: int) -> None:  # windows [b0, b1) of a run
        nonlocal scored
        for c0 in range(b0, b1, batch_size):
            if stop.is_set():  # another piece failed (or Ctrl-C): take no more work
                return
            try:
                with on_one_thread():  # as every piece but a run's only one: the same paths at any thread count
                    nll, n_new = _score_windows(model, ids, run[c0 : min(c0 + batch_size, b1)])
            except BaseException:
                stop.set()
                raise
            with lock:
                sums.append(nll)
                scored += n_new
                if progress is not None:
                    progress(scored, total)

    for run in _same_length_runs(windows):
        model.backend.kernels.over_batch(functools.partial(score, run), len(run), run[0][1] - run[0][0] - 1)
    return _result(sums, total, windows, context, stride)


def _result(sums: list[float], total: int, windows: list, context: int, stride: int) -> dict:
    mean = math.fsum(sums) / total
    return {"tokens_evaluated": total, "windows": len(windows), "context": context, "stride": stride,
            "loss": mean, "perplexity": math.exp(mean)}  # fmt: skip


def _chunks(model, windows: list, batch_size: int) -> list[list]:
    """The windows scored as one batch each: every run cut into pieces as the kernels'
    over_batch cuts it on one thread, each piece into batch_size windows at most."""
    chunks = []
    for run in _same_length_runs(windows):
        with on_one_thread():
            pieces = model.backend.kernels.over_batch(lambda b0, b1: (b0, b1), len(run), run[0][1] - run[0][0] - 1)
        chunks += [run[c0 : min(c0 + batch_size, b1)] for b0, b1 in pieces for c0 in range(b0, b1, batch_size)]
    return chunks


def _score_on_processes(model, ids, chunks: list, processes: int, progress, total: int) -> list[float]:
    """Each chunk's summed negative log-likelihood, scored on `processes` forked workers
    (which inherit the model and ids: nothing is pickled but the results), each taking
    the next chunk from a shared counter as it comes free, its kernels and BLAS on one
    thread. A worker's error is raised here; the others are then stopped."""
    import multiprocessing
    import queue

    if sys.platform != "linux" or model.backend.name != "numpy":
        raise EvalError("scoring on processes needs Linux and the numpy backend; give --workers threads")
    context = multiprocessing.get_context("fork")
    taken, results = context.Value("q", 0), context.Queue()

    def work() -> None:
        import signal

        from npgpt.kernels.threads import set_num_threads

        signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is the parent's to handle
        set_num_threads(1)
        try:
            while True:
                with taken.get_lock():
                    i, taken.value = taken.value, taken.value + 1
                if i >= len(chunks):
                    break
                with on_one_thread():
                    results.put(_score_windows(model, ids, chunks[i]))
        except BaseException as e:  # noqa: BLE001  (sent to the parent, which raises it)
            results.put(_travelling(e))
        results.put(None)  # this worker is done

    workers = [context.Process(target=work, daemon=True) for _ in range(processes)]
    for worker in workers:
        worker.start()
    sums: list[float] = []
    scored, running = 0, processes
    try:
        while running:
            try:
                item = results.get(timeout=1.0)
            except queue.Empty:
                if any(w.exitcode not in (None, 0) for w in workers):
                    raise EvalError("a worker process died while scoring (out of memory?); "
                                    "give --workers threads, or fewer --threads") from None  # fmt: skip
                continue
            if item is None:
                running -= 1
            elif isinstance(item, BaseException):
                raise item
            else:
                sums.append(item[0])
                scored += item[1]
                if progress is not None:
                    progress(scored, total)
    finally:
        for worker in workers:
            if worker.is_alive():
                worker.terminate()
            worker.join()
    if len(sums) != len(chunks):  # a result lost on the way (it cannot be: a bug)
        raise RuntimeError(f"{len(sums)} of {len(chunks)} chunks came back from the worker processes")
    return sums


def _travelling(error: BaseException) -> BaseException:
    """`error`, or where it cannot be pickled (to go to the parent process), a RuntimeError with its text."""
    import pickle

    try:
        pickle.dumps(error)
    except Exception:  # noqa: BLE001
        return RuntimeError(f"{type(error).__name__}: {error}")
    return error


def worker_processes(workers: str, threads: int, backend: str) -> int:
    """--workers as perplexity's `processes` (1: threads in this process). "auto" takes
    processes where they can run (Linux, the numpy backend, 2+ threads): on 2 cores they
    scored tinyshakespeare 6-15% faster than threads (24.0 s against 25.6 s, then 23.8 s
    against 27.9 s, medians of 3, round-robin), the pieces no longer sharing one GIL."""
    if workers == "auto":
        workers = "processes" if threads > 1 and sys.platform == "linux" and backend == "numpy" else "threads"
    return threads if workers == "processes" else 1


def _score_windows(model, ids: np.ndarray, windows: list) -> tuple[float, int]:
    """(summed negative log-likelihood, scored targets) of windows of one length, as one batch."""
    inputs = np.stack([ids[begin : end - 1] for begin, end, _ in windows]).astype(np.int64)  # (B, T)
    targets = np.stack([ids[begin + 1 : end] for begin, end, _ in windows]).astype(np.int64)  # (B, T), a copy
    for row, (begin, _, first) in enumerate(windows):
        targets[row, : first - (begin + 1)] = IGNORE_INDEX
    n_new = sum(end - first for _, end, first in windows)
    loss = model.loss(inputs, targets, ignore_index=IGNORE_INDEX)  # mean over the scored targets
    return float(model.backend.to_numpy(loss)) * n_new, n_new


def _same_length_runs(windows):
    """Consecutive runs of windows of the same length (every window but the last has context + 1 tokens)."""
    run: list = []
    for window in windows:
        if run and window[1] - window[0] != run[0][1] - run[0][0]:
            yield run
            run = []
        run.append(window)
    if run:
        yield run


def read_ids(tokenizer, path, max_tokens: int | None = None, processes: int = 1) -> np.ndarray:
    """The ids of a UTF-8 file, or of its first max_tokens tokens, read and encoded a block
    at a time up to where they are reached. Blocks are cut after a newline between two
    non-space characters, where GPT-2's and GPT-4's split patterns always cut, so the ids
    equal the first max_tokens ids of encoding the whole file. A whole file is cut so into
    up to `processes` parts (Linux), all but the first encoded on forked processes while
    this one encodes the first (`encode_in_parts`): the same ids."""
    path = Path(path)
    ids: list[int] = []
    try:
        with open(path, encoding="utf-8") as f:
            if max_tokens is None:
                return encode_in_parts(tokenizer, f.read(), path, processes)
            pending = ""
            while len(ids) < max_tokens:
                block = f.read(READ_CHARS)
                pending += block
                cut = len(pending) if not block else last_safe_cut(pending)
                ids += _encode(tokenizer, pending[:cut], path)
                pending = pending[cut:]
                if not block:
                    break
    except UnicodeDecodeError as e:
        raise EvalError(f"--data {path} is not UTF-8 text ({e.reason}); convert it to UTF-8") from None
    except IsADirectoryError:
        raise EvalError(f"--data {path} is a folder; give a UTF-8 text file") from None
    return np.asarray(ids[:max_tokens], dtype=np.int64)


def encode_in_parts(tokenizer, text: str, path, parts: int) -> np.ndarray:
    """The ids (int64) of `text`, cut at up to parts - 1 safe cuts (`last_safe_cut`, near equal
    shares), the parts after the first encoded on forked processes (Linux) while this one
    encodes the first; the same ids as encoding the text whole. A part whose process fails
    without an error to send (killed) is encoded here."""
    cuts = [0]
    if parts > 1 and sys.platform == "linux":
        for i in range(1, parts):
            cut = last_safe_cut(text[: len(text) * i // parts])
            if cut > cuts[-1]:
                cuts.append(cut)
    cuts.append(len(text))
    if len(cuts) == 2:
        return np.asarray(_encode(tokenizer, text, path), dtype=np.int64)
    import multiprocessing

    context, helpers = multiprocessing.get_context("fork"), []
    for a, b in zip(cuts[1:-1], cuts[2:]):
        receive, send = context.Pipe(duplex=False)
        helper = context.Process(target=_encode_to, args=(tokenizer, text, a, b, path, send), daemon=True)
        helper.start()
        send.close()
        helpers.append((helper, receive, a, b))
    ids = [np.asarray(_encode(tokenizer, text[: cuts[1]], path), dtype=np.int64)]
    for helper, receive, a, b in helpers:
        try:
            part = receive.recv()
        except EOFError:  # the process died without a word: encode its part here
            part = np.asarray(_encode(tokenizer, text[a:b], path), dtype=np.int64)
        helper.join()
        if isinstance(part, BaseException):
            raise part
        ids.append(part)
    return np.concatenate(ids)


def _encode_to(tokenizer, text: str, a: int, b: int, path, send) -> None:
    """encode_in_parts' forked process: the ids of text[a:b] (or the error) sent on `send`."""
    try:
        send.send(np.asarray(_encode(tokenizer, text[a:b], path), dtype=np.int64))
    except BaseException as e:  # noqa: BLE001  (sent to the parent, which raises it)
        send.send(_travelling(e))


def _encode(tokenizer, text: str, path) -> list[int]:
    try:
        return tokenizer.encode(text, allowed_special="all")
    except ValueError as e:  # a character the vocabulary lacks
        raise EvalError(f"--data {path} cannot be encoded with the model's tokenizer ({e}); evaluate on another text") from None


class Progress:
    """A progress line on stderr: tokens scored, tokens/s, ETA (redrawn in place on a terminal)."""

    def __init__(self, stream=sys.stderr, every: float = 1.0):
        self.stream, self.start, self.last = stream, time.perf_counter(), 0.0
        self.tty = getattr(stream, "isatty", lambda: False)()
        self.every = every if self.tty else 10 * every

    def __call__(self, done: int, total: int):
        now = time.perf_counter() - self.start
        if done < total and now - self.last < self.every:
            return
        self.last = now
        rate = done / now if now > 0 else 0.0
        eta = (total - done) / rate if rate > 0 else 0.0
        line = f"{done:,}/{total:,} tokens | {rate:,.0f} tokens/s | ETA {eta:.0f} s"
        self.stream.write(f"\r{line}" if self.tty else line + "\n")
        if self.tty and done == total:
            self.stream.write("\n")
        self.stream.flush()


def _unescape(text: str) -> str:
    """`npgpt.generate.unescape`, imported when a --stop is given (eval of a text never needs it)."""
    from npgpt.generate import unescape

    return unescape(text)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m npgpt.eval", description=__doc__.split("\n\n")[0].split(": ")[0] + ".",
                                epilog="See the module docstring (python -c 'import npgpt.eval; help(npgpt.eval)') for the method.")  # fmt: skip
    p.add_argument("--weights", required=True, help="checkpoint folder (model.safetensors + tokenizer), .safetensors file, or NAME for weights/NAME/")
    p.add_argument("--data", required=True, help="UTF-8 text file to score, a folder made by python -m npgpt.data prepare, "
                                                 "or (with --format pairs) JSON Lines pairs")
    p.add_argument("--split", default="val", choices=["train", "val"], help="which split of a prepared folder to score (default val)")
    p.add_argument("--format", choices=("text", "pairs"), default="text",
                   help="text: perplexity of the text (default); pairs: completion loss and exact-match accuracy "
                        "of greedy generation on {\"prompt\", \"completion\"} records (see npgpt.pairs_eval)")  # fmt: skip
    p.add_argument("--stop", action="append", default=[], type=_unescape, metavar="TEXT",
                   help=r"pairs: a string that ends generation; repeat for several; escapes \n \t \\ \uXXXX work")  # fmt: skip
    p.add_argument("--max-new-tokens", type=int, default=256, help="pairs: generation limit per prompt (default 256)")
    p.add_argument("--skip-bad", action="store_true", help="pairs: skip bad records (counted) instead of stopping")
    p.add_argument("--context", type=int, help="tokens per window (default: the model's n_ctx)")
    p.add_argument("--stride", type=int, help="tokens between window starts (default: the context, disjoint windows; "
                                              "smaller gives each token more history at context/stride times the work)")
    p.add_argument("--max-tokens", type=int, help="score only the first N tokens of the text (reads only as much of the file as they need)")
    p.add_argument("--batch-size", type=int, help="windows per forward pass (default: as many as keep the logits under 256 MiB, at most 256)")
    p.add_argument("--backend", default="numpy", help="array backend (default numpy)")
    add_threads_option(p)
    p.add_argument("--workers", choices=("auto", "threads", "processes"), default="auto",
                   help="threads: --threads threads in this process; processes: --threads forked worker processes of "
                        "one thread each (Linux, numpy backend), no GIL shared between them; auto (default): processes "
                        "where they can run and --threads is 2 or more, else threads. The same loss every way")  # fmt: skip
    p.add_argument("--dtype", choices=FLOAT_DTYPES, help="cast the weights (default: as stored)")
    p.add_argument("--json", action="store_true", help="print the result as JSON")
    p.add_argument("--quiet", action="store_true", help="no progress line")
    add_debug_flag(p)
    return p


def main(argv=None) -> int:
    return run_cli(_main, argv)


def _main(argv) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    for name in ("context", "stride", "max_tokens", "batch_size"):
        if getattr(args, name) is not None and getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    n_threads = configure_threads(args.threads)
    model, tokenizer = load_model(args.weights, get_backend(args.backend), args.dtype, say=lambda m: print(m, file=sys.stderr))
    if args.format == "pairs":
        return score_pairs_main(args, model, tokenizer)
    processes = worker_processes(args.workers, n_threads, model.backend.name)
    if Path(args.data).is_dir():  # a prepared folder: one split, memory-mapped
        from npgpt.prepare import read_tokens  # (multiprocessing and more: imported only here)

        ids = read_tokens(args.data, tokenizer, args.split)[: args.max_tokens]
    else:
        ids = read_ids(tokenizer, args.data, args.max_tokens, processes)
    start = time.perf_counter()
    result = perplexity(model, ids, args.context, args.stride, args.batch_size, None if args.quiet else Progress(), processes)
    result["seconds"] = time.perf_counter() - start
    if args.json:
        print(json.dumps(result))
    else:
        print(f"{args.data}: {result['tokens_evaluated']:,} tokens evaluated in {result['windows']} windows "
              f"(context {result['context']}, stride {result['stride']}): loss {result['loss']:.4f} nats/token, "
              f"perplexity {result['perplexity']:.3f}")  # fmt: skip
    return 0


def score_pairs_main(args, model, tokenizer) -> int:
    from npgpt import pairs_eval
    from npgpt.pairs import read_pairs

    result = pairs_eval.score_pairs(model, tokenizer, read_pairs(args.data, args.skip_bad), args.stop,
                                    args.max_new_tokens, args.skip_bad, None if args.quiet else pairs_eval.say)  # fmt: skip
    print(json.dumps(result) if args.json else pairs_eval.summary(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
