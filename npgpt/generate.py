"""Text generation: a library API (iterators of token ids and of text) and its CLI.

    from npgpt.weights import load_model
    model, tokenizer = load_model("shakespeare")            # or a folder / .safetensors file
    decoding_layout(model)                                  # optional: weights laid out for decoding's products
    for piece in generate(model, tokenizer, "ROMEO:", max_new_tokens=100, seed=0):
        print(piece, end="", flush=True)

Decoding uses the KV cache: the prompt is run once (prefill), then each step sends only the
one new id to the device and brings back only the last position's logits (V,) to sample on
the host (`npgpt.sampling`), so the same seed gives the same text on every backend.

Past the context, both paths follow one rule (`window_start`): the model sees the tokens
from the window's start on; when they would exceed n_ctx, the window restarts at the last
n_ctx // 2 tokens. The cached path rebuilds its cache then (paid once per n_ctx / 2
tokens); `use_cache=False` recomputes the same window every step, so both give the same
text.

CLI:  python -m npgpt.generate --prompt "ROMEO:" --max-new-tokens 200 --top-k 40
      (see --help; reads the prompt from stdin when --prompt is absent and stdin is not a
      terminal; streams UTF-8 text to stdout, notices and --stats to stderr)
"""

from __future__ import annotations

import argparse
import sys
import time
import warnings
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass

import numpy as np

from npgpt.backend import array_namespace, get_backend
from npgpt.errors import UserError, add_debug_flag, run_cli
from npgpt.kernels.numpy_fast import announce_compiling, compiled_step
from npgpt.kernels.threads import add_threads_option, configure as configure_threads, num_threads
from npgpt.model import FLOAT_DTYPES, GPT
from npgpt.sampling import SamplingConfig, sample
from npgpt.weights import load_model

class PromptError(UserError, ValueError):
    """The prompt cannot be used: longer than the context with cropping refused."""


class PromptCropped(UserWarning):
    """The prompt was longer than the context; only its last n_ctx tokens were kept."""


# -- the prompt -----------------------------------------------------------------------------
def encode_prompt(tokenizer, text: str, n_ctx: int, crop: bool = True) -> tuple[list[int], int]:
    """Prompt text -> (ids, number of tokens cropped from the front).

    An empty prompt starts from <|endoftext|>, as GPT-2 was trained to, or from a newline
    (a paragraph break) in a vocabulary without it, such as the shipped Shakespeare model's.
    A prompt longer than the context keeps its last n_ctx tokens, or raises PromptError if
    crop is False.
    """
    if text:
        try:
            ids = tokenizer.encode(text, allowed_special="all")
        except ValueError as e:  # a character the vocabulary lacks
            raise PromptError(f"the prompt cannot be encoded: {e}; change the prompt or use another model") from None
    else:
        ids = [tokenizer.eot_id] if tokenizer.eot_id is not None else tokenizer.encode("\n")
    excess = len(ids) - n_ctx
    if excess > 0 and not crop:
        raise PromptError(
            f"the prompt is {len(ids)} tokens but the model's context holds {n_ctx}: shorten it, "
            "or allow cropping to its last tokens (leave out --no-crop)"
        )
    return (ids[excess:], excess) if excess > 0 else (ids, 0)


# -- generation -----------------------------------------------------------------------------
@dataclass
class GenerationStats:
    """Counts and times of one or more generate calls (for --stats and the benchmark)."""

    prompt_tokens: int = 0
    prompt_seconds: float = 0.0  # prefill, up to the first token's logits on the host
    new_tokens: int = 0
    generate_seconds: float = 0.0  # the decode steps and sampling, not the consumer's time

    def report(self, model: GPT) -> str:
        backend = model.backend
        mib = 2**20
        weight_bytes = sum(_nbytes(p) for p in model.params.values())
        return "\n".join(
            [
                f"prompt:     {self.prompt_tokens} tokens in {self.prompt_seconds:.3f} s "
                f"({_rate(self.prompt_tokens, self.prompt_seconds)} tokens/s)",
                f"generation: {self.new_tokens} tokens in {self.generate_seconds:.3f} s "
                f"({_rate(self.new_tokens, self.generate_seconds)} tokens/s)",
                f"memory:     weights {weight_bytes / mib:.1f} MiB, peak {backend.peak_memory_bytes() / mib:.1f} MiB "
                f"({backend.name}; {'host RSS' if backend.name == 'numpy' else 'device'})",
            ]
        )


def generate_ids(
    model: GPT,
    prompt_ids: Sequence[int],
    max_new_tokens: int,
    sampling: SamplingConfig = SamplingConfig(),
    rng: np.random.Generator | None = None,
    *,
    use_cache: bool = True,
    stats: GenerationStats | None = None,
    n_vocab: int | None = None,
) -> Iterator[int]:
    """The ids that follow `prompt_ids` (1 to n_ctx ids), one at a time.

    Nothing is computed ahead: the forward pass for the next id runs only when it is asked
    for, so a consumer that stops (end of text, a stop string) wastes no work.
    use_cache=False recomputes the whole window every step (the reference path).
    n_vocab: sample only ids below it (a tokenizer smaller than the model's padded vocabulary).
    """
    n_ctx = model.config.n_ctx
    if not 1 <= len(prompt_ids) <= n_ctx:
        raise ValueError(f"the prompt must hold 1 to n_ctx = {n_ctx} ids, got {len(prompt_ids)}")
    rng = rng if rng is not None else np.random.default_rng()
    stats = stats if stats is not None else GenerationStats()
    tokens = list(prompt_ids)  # the whole text so far, for recomputation and the window
    cache = model.new_cache(1) if use_cache else None
    start_of_window = 0

    start = time.perf_counter()
    logits = last_logits(model, tokens, cache)
    stats.prompt_tokens += len(tokens)
    stats.prompt_seconds += time.perf_counter() - start
    for step in range(max_new_tokens):
        start = time.perf_counter()
        if step:
            start_of_window = window_start(start_of_window, len(tokens), n_ctx)
            logits, cache = _next_logits(model, tokens, start_of_window, cache)
        token = sample(logits[:n_vocab], sampling, rng)
        tokens.append(token)
        stats.new_tokens += 1
        stats.generate_seconds += time.perf_counter() - start
        yield token


def decoding_layout(model: GPT, threads: int | None = None) -> GPT:
    """Lay out, in place, the weights of `model` (NumPy backend; other backends are left as
    they are) as decoding's matrix-vector products read them fastest on `threads` threads
    (None: the kernels' `num_threads()`), and return it: the same values and shapes, so
    every path computes the same. Column-major (Fortran order): the token embedding wte
    (V, C), whose transpose (C, V) the LM head reads, and each block's mlp.c_proj (4C, C),
    so a product x (1, Cin) @ w (Cin, Cout) reads rows of the longer side (OpenBLAS
    streams 1.3-1.5x faster that way on GPT-2's shapes; the compiled step's product
    too); from 2 threads, where decoding's products run on OpenBLAS (no compiled step),
    also each block's attn.c_proj (C, C) (OpenBLAS's 2-thread GEMV streamed it ~1.2x
    faster so, its 1-thread one ~1.2x slower; the compiled step's 2-thread step was ~4%
    slower so). Every other weight is row-major, so a later call for another thread
    count lays the model out afresh. Each weight's copy replaces it as
    made: no extra memory once the old arrays have no other reference. Training such a
    model is correct but slower (AdamW falls back to its reference on non-C-ordered
    parameters). The CLI decodes with it; `npgpt.weights.load_model` and `GPT` give the
    default (C-ordered) layout."""
    if model.backend.name != "numpy":
        return model
    on_blas = compiled_step() is None  # else the compiled step runs decoding's products
    columns = COLUMN_MAJOR + (COLUMN_MAJOR_FROM_2_THREADS if (threads or num_threads()) > 1 and on_blas else ())
    for name, value in model.params.items():
        if name.endswith(columns):
            model.params[name] = np.asfortranarray(value)
        elif value.ndim == 2 and not value.flags.c_contiguous:
            model.params[name] = np.ascontiguousarray(value)
    return model


COLUMN_MAJOR = ("wte.weight", "mlp.c_proj.weight")  # weights `decoding_layout` holds column-major
COLUMN_MAJOR_FROM_2_THREADS = ("attn.c_proj.weight",)  # ... and these, on 2 threads or more without the compiled step


def window_start(start: int, length: int, n_ctx: int) -> int:
    """Where the model's view of `length` tokens begins: at `start` while they fit the
    context, else at the last n_ctx // 2 tokens (the sliding window both paths follow)."""
    return start if length - start <= n_ctx else length - n_ctx // 2


def _next_logits(model: GPT, tokens: list[int], start: int, cache):
    """(logits, cache) after tokens[start:], whose last id is new: one cached step; without
    a cache, a recompute of the window; a cache that does not hold tokens[start:-1] (the
    window moved) is rebuilt from the window."""
    if cache is None:
        return last_logits(model, tokens[start:], None), None
    if cache.length != len(tokens) - 1 - start:
        cache = model.new_cache(1)
        return last_logits(model, tokens[start:], cache), cache
    return last_logits(model, tokens[-1:], cache), cache


def last_logits(model: GPT, ids: Sequence[int], cache=None) -> np.ndarray:
    """Run `ids` (one sequence) through the model and return the last position's logits
    (V,) as a NumPy array: the only data that comes back from the device. The prompt and
    each decode step's one id run as the kernels' inference schedule's one piece
    (`over_batch` of one row: no backward follows, so its kernels keep no activations
    for one)."""
    rows = np.asarray(ids, dtype=np.int64)[None, :]
    logits = model.backend.kernels.over_batch(lambda b0, b1: model.forward(rows, cache, last_only=True), 1, rows.shape[1])[0]
    return model.backend.to_numpy(logits[0, -1, :])  # (1, 1, V) -> (V,)


def generate(
    model: GPT,
    tokenizer,
    prompt: str | Sequence[int] = "",
    *,
    max_new_tokens: int = 256,
    sampling: SamplingConfig = SamplingConfig(),
    seed: int | np.random.Generator | None = None,
    stop: Iterable[str] = (),
    crop: bool = True,
    use_cache: bool = True,
    stats: GenerationStats | None = None,
) -> Iterator[str]:
    """Pieces of generated text, as soon as they are whole UTF-8 characters.

    Stops after max_new_tokens, at <|endoftext|> (not included), or before the first stop
    string (not included). `prompt` is text or already-encoded ids; text longer than the
    context is cropped to its last tokens with a PromptCropped warning (or PromptError
    with crop=False). `seed` is an int or a Generator to continue.
    """
    if isinstance(prompt, str):
        prompt, cropped = encode_prompt(tokenizer, prompt, model.config.n_ctx, crop)
        if cropped:
            warnings.warn(f"the prompt was cropped to its last {len(prompt)} tokens", PromptCropped, stacklevel=2)
    rng = seed if isinstance(seed, np.random.Generator) else np.random.default_rng(seed)
    decoder, held = tokenizer.stream_decoder(), StopStrings(stop)
    ids = generate_ids(model, prompt, max_new_tokens, sampling, rng, use_cache=use_cache, stats=stats, n_vocab=tokenizer.n_vocab)
    for token in ids:
        if token == tokenizer.eot_id:
            break
        piece = held.push(decoder.feed(token))
        if piece:
            yield piece
        if held.stopped:
            return
    piece = held.push(decoder.flush()) + held.release()
    if piece:
        yield piece


class StopStrings:
    """Streams text through, holding back any tail that could begin a stop string, and
    cuts the text before the first stop string that appears."""

    def __init__(self, stops: Iterable[str]):
        self.stops = [s for s in stops if s]
        self.pending = ""
        self.stopped = False

    def push(self, text: str) -> str:
        """Add text; return what can be shown now (everything before a stop string, less
        a tail that might still grow into one)."""
        if self.stopped:
            return ""
        self.pending += text
        hit = min((i for i in (self.pending.find(s) for s in self.stops) if i >= 0), default=None)
        undecided = len(self.pending) - self._held_tail()  # a stop may still start here
        if hit is not None and hit <= undecided:
            self.stopped = True
            shown, self.pending = self.pending[:hit], ""
            return shown
        shown, self.pending = self.pending[:undecided], self.pending[undecided:]
        return shown

    def release(self) -> str:
        """The held text, at the end of the text: up to a stop string found in it, if any."""
        hit = min((i for i in (self.pending.find(s) for s in self.stops) if i >= 0), default=len(self.pending))
        self.stopped = self.stopped or hit < len(self.pending)
        shown, self.pending = self.pending[:hit], ""
        return shown

    def _held_tail(self) -> int:
        """Length of the longest tail of `pending` that is a proper prefix of a stop string."""
        longest = max((len(s) - 1 for s in self.stops), default=0)
        for n in range(min(longest, len(self.pending)), 0, -1):
            tail = self.pending[-n:]
            if any(s.startswith(tail) for s in self.stops):
                return n
        return 0


def _nbytes(x) -> int:
    return x.size * array_namespace(x).finfo(x.dtype).bits // 8


def _rate(count: int, seconds: float) -> str:
    return f"{count / seconds:.1f}" if seconds > 0 else "n/a"


# -- CLI --------------------------------------------------------------------------------------
def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m npgpt.generate",
        description="Generate text with a GPT-2 model, streaming it to stdout.",
        epilog=(
            "Without --weights, the shipped default model (weights/shakespeare/) is used. "
            "Use real GPT-2: python tools/convert_gpt2.py --help, then --weights DIR."
        ),
    )
    parser.add_argument("--backend", default="numpy", help="array backend, e.g. numpy, cupy, array-api-strict (default: numpy)")
    add_threads_option(parser)
    parser.add_argument("--weights", help="a folder with model.safetensors and the tokenizer, a .safetensors file, or a NAME for weights/NAME/")
    parser.add_argument("--dtype", choices=FLOAT_DTYPES, help="cast the weights (default: as stored)")
    parser.add_argument("--prompt", help="text to continue (default: read stdin when it is not a terminal; else start from <|endoftext|>)")
    parser.add_argument("--max-new-tokens", type=int, default=256, help="tokens to generate per sample (default: 256)")
    parser.add_argument("--temperature", type=float, default=1.0, help="divide the logits by this; 0 means greedy (default: 1.0)")
    parser.add_argument("--top-k", type=int, help="sample only among the k most likely tokens")
    parser.add_argument("--top-p", type=float, help="sample only among the smallest set of most likely tokens whose probability reaches p")
    parser.add_argument("--greedy", action="store_true", help="always take the most likely token")
    parser.add_argument("--seed", type=int, help="random seed; the same seed gives the same text on every backend")
    parser.add_argument("--num-samples", type=int, default=1, help="independent samples to generate (default: 1)")
    parser.add_argument("--stop", action="append", default=[], type=unescape, metavar="TEXT",
                        help=r"stop before this string; repeat for several; escapes \n \t \\ \uXXXX work, e.g. --stop '\n\n'")  # fmt: skip
    parser.add_argument("--stats", action="store_true", help="print prompt and generation speed and memory to stderr")
    parser.add_argument("--no-crop", action="store_true", help="refuse a prompt longer than the context instead of keeping its last tokens")
    parser.add_argument("--no-cache", action="store_true", help="recompute the whole window every step (slow; for comparison)")
    add_debug_flag(parser)
    return parser


def unescape(text: str) -> str:
    r"""A command-line string with Python's backslash escapes (\n, \t, \\, \uXXXX) applied."""
    try:
        return text.encode("latin-1", "backslashreplace").decode("unicode_escape")
    except UnicodeDecodeError as e:
        raise argparse.ArgumentTypeError(f"invalid escape in {text!r} ({e.reason})") from None


def main(argv: Sequence[str] | None = None) -> int:
    return run_cli(_main, argv)


def _main(argv: Sequence[str] | None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.max_new_tokens < 0:
        parser.error(f"--max-new-tokens must be >= 0, got {args.max_new_tokens}")
    if args.num_samples < 1:
        parser.error(f"--num-samples must be >= 1, got {args.num_samples}")
    try:
        sampling = SamplingConfig(args.temperature, args.top_k, args.top_p, args.greedy)
    except ValueError as e:
        parser.error(f"invalid sampling values: {e}")
    configure_threads(args.threads)
    model, tokenizer = load_model(args.weights, get_backend(args.backend), args.dtype, say=_notice)
    if model.backend.name == "numpy":
        announce_compiling(_notice)
    decoding_layout(model)
    prompt = args.prompt if args.prompt is not None else _stdin_prompt()
    ids, cropped = encode_prompt(tokenizer, prompt, model.config.n_ctx, crop=not args.no_crop)
    if cropped:
        _notice(f"notice: the prompt was cropped to its last {len(ids)} tokens "
                f"(dropped {cropped}) to fit the context of {model.config.n_ctx}")  # fmt: skip
    _utf8(sys.stdout)
    rng, stats = np.random.default_rng(args.seed), GenerationStats()
    try:
        for n in range(args.num_samples):
            if n:
                sys.stdout.write("\n---\n")
            for piece in generate(model, tokenizer, ids, max_new_tokens=args.max_new_tokens, sampling=sampling,
                                  seed=rng, stop=args.stop, use_cache=not args.no_cache, stats=stats):  # fmt: skip
                sys.stdout.write(piece)
                sys.stdout.flush()
        sys.stdout.write("\n")
        sys.stdout.flush()
    finally:
        if args.stats:
            print(stats.report(model), file=sys.stderr)
    return 0


def _notice(message: str) -> None:
    print(message, file=sys.stderr)


def _stdin_prompt() -> str:
    return "" if sys.stdin is None or sys.stdin.isatty() else sys.stdin.read()


def _utf8(stream) -> None:
    """Make a text stream write UTF-8, whatever the locale says (generated text is Unicode)."""
    if (getattr(stream, "encoding", None) or "").lower().replace("-", "") != "utf8" and hasattr(stream, "reconfigure"):
        stream.reconfigure(encoding="utf-8")


if __name__ == "__main__":
    sys.exit(main())
