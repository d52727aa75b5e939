"""Train a GPT-2 on a UTF-8 text file: `python -m npgpt.train --data FILE --out-dir DIR`,
or on a folder of token files made by `python -m npgpt.data prepare` (`--data DIR`).

From scratch (the tokenizer chosen by `--tokenizer`) or fine-tuning a checkpoint
(`--init-from weights/NAME`). The output folder is a checkpoint that `npgpt.generate`
and `npgpt.eval` read, and that `--resume` continues from:

    model.safetensors          parameters + GPTConfig (+ the step, to match the state)
    npgpt_tokenizer.json ...   the tokenizer's files
    trainer_state.safetensors  AdamW moments; metadata: step, settings, tokens seen
    log.jsonl                  one JSON object per log interval and per evaluation

Every file is written to a temp file and renamed, the trainer state last, so an
interruption at any moment leaves the previous consistent checkpoint. The data order
and dropout masks are functions of (seed, step) alone (see `npgpt.data`), so the saved
step is the whole RNG state and a resumed run is bit-for-bit the run that never stopped.

On a device backend the loop reads nothing back to the host except at log intervals
(the summed loss and gradient norm) and checkpoints.

Under `mpiexec -n N` the run is data-parallel (see `npgpt.distributed`): rank r trains
on the global micro-batches r*grad_accum ... (r+1)*grad_accum - 1 of each step, so the
global batch is batch-size x grad-accum x N, and one process with `--grad-accum 4` trains
on exactly the sequences (and dropout masks) of two ranks with `--grad-accum 2`. Only
rank 0 prints and writes; a checkpoint holds the unsharded optimizer state, so a run may
resume at another world size that divides its global batch.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import math
import os
import shutil
import signal
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from npgpt.backend import get_backend
from npgpt.errors import EXIT_INTERRUPTED, UserError, add_debug_flag, run_cli
from npgpt.kernels.threads import configure as configure_threads
from npgpt.checkpoint import load_safetensors, save_checkpoint, save_safetensors
from npgpt.config import GPTConfig
from npgpt.data import BatchSampler, split_tokens
from npgpt.distributed import (DEFAULT_BUCKET_MB, DEFAULT_TIMEOUT, Comm, DataParallel, connect, launched_rank,
                               limit_threads, on_every_rank, rank_backend)  # fmt: skip
from npgpt.model import GPT, FLOAT_DTYPES
from npgpt.optim import AdamW, clipped_step, cosine_lr
from npgpt.prepare import read_tokens, split_tokens_of
from npgpt.tokenizer.formats import save as save_tokenizer
from npgpt.weights import WEIGHTS_FILE, check_vocabularies, load_host_params, load_tokenizer_beside, resolve_weights
from npgpt.layers import IGNORE_INDEX
from npgpt.pairs import PairsData, add_end_of_text, load_examples, read_pairs

STATE_FILE, LOG_FILE = "trainer_state.safetensors", "log.jsonl"
STEP_KEY, TRAINER_KEY = "npgpt.step", "npgpt.trainer"
# Settings a resumed run may change; any other flag must match the checkpoint's.
RESUME_OVERRIDES = {"max_iters", "log_interval", "eval_interval", "eval_iters", "checkpoint_interval", "backend", "debug",
                    "threads", "zero", "bucket_mb", "comm_timeout"}
NOT_SAVED = {"resume", "overwrite", "debug"}  # flags of this invocation, not settings of the run
DROPOUT_STREAM = 2  # seeds dropout generators apart from the data sampler's (0 train, 1 val)


class TrainingError(UserError, RuntimeError):
    """A run that cannot start or continue; the message says why and what to do."""


# -- command line -----------------------------------------------------------------------
def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m npgpt.train",
        description="Train a GPT-2 (from scratch or from a checkpoint) on a UTF-8 text file.",
        epilog="Example (the CPU character-level Shakespeare recipe): python -m npgpt.train "
        "--data ../shared/data/corpora/tinyshakespeare.txt --out-dir runs/shakespeare-char --tokenizer char. "
        "A new run never writes into a folder holding files it did not make (such as the shipped "
        "weights/shakespeare/) unless --overwrite is given.",
    )
    g = p.add_argument_group("data and output")
    g.add_argument("--data", help="UTF-8 text file, a folder made by python -m npgpt.data prepare, or with --format pairs "
                                  "a JSON Lines file (required unless --resume)")
    g.add_argument("--format", choices=("text", "pairs"), default="text",
                   help="text: continued pre-training, loss on every token (default); pairs: fine-tune on "
                        "{\"prompt\", \"completion\"} records, loss on completions only, packed into windows")  # fmt: skip
    g.add_argument("--skip-bad", action="store_true", help="with --format pairs: skip bad records (counted) instead of stopping")
    g.add_argument("--out-dir", required=True, help="checkpoint folder (created; with --resume, read first)")
    g.add_argument("--resume", action="store_true", help="continue the run saved in --out-dir exactly where it stopped")
    g.add_argument("--overwrite", action="store_true", help="start a new run in --out-dir even if it holds another model or run (replaces its files)")
    g.add_argument("--tokenizer",
                   help="char | bytes | bpe:N (train an N-token byte-level BPE on the text) | a tokenizer folder, "
                        "e.g. ../shared/data/gpt2 for GPT-2's BPE (default: a prepared folder's own, else char; "
                        "ignored with --init-from)")  # fmt: skip
    g.add_argument("--init-from", help="fine-tune: a checkpoint folder, .safetensors file or weights/NAME (model + tokenizer)")
    g.add_argument("--val-fraction", type=float, default=0.1, help="last fraction of a text file's tokens held out for validation "
                   "(default 0.1; a prepared folder has its own split)")  # fmt: skip
    m = p.add_argument_group("model (from scratch)")
    m.add_argument("--preset", help="a GPT-2 size (gpt2, gpt2-medium, ..., or 124M, ...) instead of the four flags below")
    m.add_argument("--n-layer", type=int, default=4)
    m.add_argument("--n-head", type=int, default=4)
    m.add_argument("--n-embd", type=int, default=128)
    m.add_argument("--block-size", type=int, help="training sequence length T (default 64; the context when fine-tuning)")
    m.add_argument("--dropout", type=float, default=0.0)
    m.add_argument("--dtype", choices=FLOAT_DTYPES, default="float32")
    o = p.add_argument_group("optimisation")
    o.add_argument("--batch-size", type=int, default=12, help="sequences per micro-batch B")
    o.add_argument("--grad-accum", type=int, default=1, help="micro-batches per optimizer step")
    o.add_argument("--max-iters", type=int, default=2000, help="optimizer steps to run to")
    o.add_argument("--lr-decay-iters", type=int, help="step where the cosine reaches --min-lr (default: --max-iters of the first run; a resume keeps it)")
    o.add_argument("--lr", type=float, default=1e-3, help="peak learning rate")
    o.add_argument("--min-lr", type=float, default=1e-4)
    o.add_argument("--warmup-iters", type=int, default=100)
    o.add_argument("--weight-decay", type=float, default=0.1, help="AdamW decay of the 2-D weight matrices")
    o.add_argument("--decay-embeddings", action="store_true", help="also decay wte and wpe (nanoGPT's groups; the default is minGPT's)")
    o.add_argument("--beta1", type=float, default=0.9)
    o.add_argument("--beta2", type=float, default=0.99)
    o.add_argument("--grad-clip", type=float, default=1.0, help="global gradient-norm limit (0: off)")
    o.add_argument("--seed", type=int, default=1337, help="seeds the init, the data order and dropout")
    r = p.add_argument_group("running")
    r.add_argument("--backend", default="numpy", help="array backend: numpy, cupy, array-api-strict, ... (default numpy)")
    r.add_argument("--log-interval", type=int, default=10, help="steps between progress lines (and host syncs)")
    r.add_argument("--eval-interval", type=int, default=250, help="steps between validation estimates (0: only at the end)")
    r.add_argument("--eval-iters", type=int, default=20, help="validation batches per estimate")
    r.add_argument("--checkpoint-interval", type=int, default=250, help="steps between checkpoints (and at the end, and on Ctrl-C)")
    r.add_argument("--threads", type=int, help="BLAS threads per process (default: all cores; under mpiexec, the cores "
                                                "divided by the ranks on the node)")  # fmt: skip
    d = p.add_argument_group("many processes (under mpiexec -n N; see the README)")
    d.add_argument("--zero", type=int, choices=(0, 1), default=0, help="1: shard AdamW's moments across ranks (ZeRO-1)")
    d.add_argument("--bucket-mb", type=float, default=DEFAULT_BUCKET_MB, help="gradient all-reduce bucket size in MB (default 25)")
    d.add_argument("--comm-timeout", type=float, default=DEFAULT_TIMEOUT,
                   help="seconds a rank waits for the others before ending the job (a rank died or hangs; default 600)")  # fmt: skip
    add_debug_flag(p)
    return p


def explicit_flags(argv) -> set[str]:
    """Destinations the user actually gave on the command line (defaults suppressed)."""
    probe = build_parser()
    for action in probe._actions:
        action.default = argparse.SUPPRESS
    return set(vars(probe.parse_args(argv)))


# -- setup: tokenizer, tokens, model ----------------------------------------------------
def make_tokenizer(spec: str, text: str):
    from npgpt.tokenizer import BPETokenizer, CharTokenizer, load, train_bpe

    if spec == "char":
        return CharTokenizer.train(text)
    if spec == "bytes":
        return BPETokenizer({bytes([b]): b for b in range(256)})
    if spec.startswith("bpe:"):
        size = spec[4:]
        if not size.isdigit() or int(size) < 256:
            raise TrainingError(f"--tokenizer {spec!r}: N must be a whole number of tokens, at least 256 (the bytes); e.g. bpe:1024")
        return train_bpe(text, int(size))
    if Path(spec).exists():
        return load(spec)
    raise TrainingError(f"--tokenizer {spec!r} is unknown; use char, bytes, bpe:N or an existing tokenizer folder")


def load_splits(tokenizer, path, val_fraction: float) -> tuple[np.ndarray, np.ndarray]:
    """(train, val) tokens of --data: a prepared folder's splits, memory-mapped, or a text
    file's tokens cut by --val-fraction."""
    if Path(path).is_dir():
        return read_tokens(path, tokenizer, "train"), split_tokens_of(path, "val")
    try:
        ids = read_tokens(path, tokenizer)
    except ValueError as e:  # a character the vocabulary lacks
        raise TrainingError(f"--data {path} cannot be encoded with the run's tokenizer ({e}); train with another tokenizer") from None
    try:
        return split_tokens(ids, val_fraction)
    except ValueError as e:  # a bad fraction
        raise TrainingError(str(e)) from None


def prepared_tokenizer(folder):
    from npgpt.prepare import TOKENIZER_DIR
    from npgpt.tokenizer import load

    return load(Path(folder) / TOKENIZER_DIR)


def read_text(path) -> str:
    try:
        text = Path(path).read_text("utf-8")
    except FileNotFoundError:
        raise TrainingError(f"--data {path}: no such file; give a UTF-8 text file") from None
    except IsADirectoryError:
        raise TrainingError(f"--data {path} is a folder; give a UTF-8 text file") from None
    except UnicodeDecodeError as e:
        raise TrainingError(f"--data {path} is not UTF-8 text ({e.reason} at byte {e.start}); convert it to UTF-8") from None
    if not text:
        raise TrainingError(f"--data {path} is empty; give a text to train on")
    return text


def scratch_config(args, vocab_size: int) -> GPTConfig:
    T = args.block_size or 64
    if args.preset:
        return GPTConfig.preset(args.preset, vocab_size=vocab_size, n_ctx=T, dropout=args.dropout)
    return GPTConfig(vocab_size=vocab_size, n_ctx=T, n_embd=args.n_embd, n_head=args.n_head,
                     n_layer=args.n_layer, dropout=args.dropout)  # fmt: skip


# -- the run ------------------------------------------------------------------------------
class Trainer:
    """One training run: model, optimizer, samplers, and the checkpoint folder."""

    def __init__(self, args, model: GPT, tokenizer, data: tuple[np.ndarray, np.ndarray] | PairsData, start_step: int = 0,
                 comm: Comm | None = None):  # fmt: skip
        """`data`: (train, val) token streams (--format text) or tokenized pairs (--format pairs)."""
        self.args, self.model, self.tokenizer = args, model, tokenizer
        self.comm = comm = comm or Comm()
        self.out = Path(args.out_dir)
        self.backend = model.backend
        adamw = dict(betas=(args.beta1, args.beta2), weight_decay=args.weight_decay, decay_embeddings=args.decay_embeddings)
        self.dp = None  # one process, unsharded: the plain loop below
        if comm.size > 1 or args.zero:
            self.dp = DataParallel(model, model.backend.communicator(comm), args.grad_accum, zero=args.zero,
                                   bucket_mb=args.bucket_mb, **adamw)  # fmt: skip
        self.opt = self.dp.opt if self.dp else AdamW(model.params, model.backend, **adamw)
        T = args.block_size
        self.pairs = isinstance(data, PairsData)
        if self.pairs:
            # every rank draws from the global count of micro-batches per step
            self.train_data, self.val_data = data.samplers(T, args.batch_size, args.grad_accum * comm.size, args.seed,
                                                           args.val_fraction)  # fmt: skip
            self.data_summary = data.summary()
        else:
            train, val = data
            try:
                self.train_data = BatchSampler(train, args.batch_size, T, args.seed, "train")
                self.val_data = BatchSampler(val, args.batch_size, T, args.seed, "val") if len(val) else None
            except ValueError as e:  # too few tokens
                raise TrainingError(str(e)) from None
            self.data_summary = f"{len(self.train_data.tokens):,} train tokens"
        self.scored = 0  # targets scored (completion tokens with --format pairs) since the last report
        self.step = start_step
        self.tokens_per_step = args.batch_size * T * args.grad_accum * comm.size
        self.interrupted = False  # set by the Ctrl-C handler, at any moment
        self.stop_requested = False  # set only between steps (agreed by all ranks under mpiexec)
        self.last_good_step = start_step
        self.saved_once = start_step > 0  # a resumed run has a checkpoint on disk

    # -- one optimizer step ---------------------------------------------------------------
    def train_step(self):
        """Forward, backward (accumulated over micro-batches), clip, AdamW. Returns the
        mean loss and the gradient norm as 0-d device arrays (no host sync).

        Under mpiexec this rank's micro-batches go into `DataParallel`'s buckets; during
        the last one's backward pass each bucket starts its sum over the ranks as soon as
        its gradients are final (the `grad_ready` hook). The loss returned is this rank's mean."""
        args, dp = self.args, self.dp
        total_loss, grads = 0.0, None
        for micro in range(args.grad_accum):
            final = micro == args.grad_accum - 1
            loss, g = self.micro_batch(micro, grad_ready=dp.ready if dp and final else None)
            total_loss = total_loss + loss
            if dp:
                if not final:
                    dp.add(g)
            elif grads is None:
                grads = g
            else:
                for name, value in g.items():
                    grads[name] += value
        if dp:
            dp.reduce()
            norm = dp.clip_and_step(args.grad_clip, self.lr(self.step))
        else:
            if args.grad_accum > 1:
                for value in grads.values():
                    value *= 1.0 / args.grad_accum
            norm = clipped_step(self.opt, grads, args.grad_clip, self.lr(self.step))
        self.step += 1
        return total_loss / args.grad_accum, norm

    def micro_batch(self, micro: int, grad_ready=None):
        """Loss and gradients of this rank's micro-batch `micro` of the step: the global
        micro-batch rank x grad-accum + micro, whose sequences and dropout masks depend on
        (seed, step, that index) alone."""
        args, model = self.args, self.model
        j = self.comm.rank * args.grad_accum + micro
        ids, targets, *segments = self.train_data.batch(self.step, j)  # packed pairs: + segments
        self.scored += int(np.count_nonzero(targets != IGNORE_INDEX))
        rng = np.random.default_rng([args.seed, DROPOUT_STREAM, self.step, j]) if model.config.dropout else None
        return model.loss_and_grads(ids, targets, rng=rng, segments=segments[0] if segments else None, grad_ready=grad_ready)

    def lr(self, step: int) -> float:
        a = self.args
        return cosine_lr(step, a.lr, a.min_lr, a.warmup_iters, a.lr_decay_iters)

    def val_loss(self) -> float:
        """Mean loss over `eval_iters` fixed validation batches (the same ones every time)."""
        if self.comm.size == 1:
            losses = [self.val_batch_loss(*self.val_data.batch(i)) for i in range(self.args.eval_iters)]
            return float(self.backend.to_numpy(sum(losses[1:], losses[0]))) / len(losses)
        # Batch i on rank i % world; the per-rank sums are added on the host.
        mine = [float(self.backend.to_numpy(self.val_batch_loss(*self.val_data.batch(i))))
                for i in range(self.comm.rank, self.args.eval_iters, self.comm.size)]  # fmt: skip
        return float(self.comm.allreduce_host(np.array([sum(mine)]))[0]) / self.args.eval_iters

    def val_batch_loss(self, ids, targets, segments=None):
        return self.model.loss(ids, targets, segments=segments)

    # -- the loop ---------------------------------------------------------------------------
    def run(self) -> int:
        """Train to --max-iters; returns the exit status (0 done, 130 interrupted, 1 diverged)."""
        args = self.args
        if self.step >= args.max_iters:
            say(f"already at step {self.step} of {args.max_iters}: nothing to do (raise --max-iters to continue)")
            return 0
        ranks = f" on each of {self.comm.size} ranks" if self.comm.size > 1 else ""
        say(f"training {self.model.config} on {self.backend.name}{ranks}: {self.data_summary}, "
            f"global batch {args.batch_size} x {args.grad_accum} x {self.comm.size} ranks = {self.tokens_per_step:,} "
            f"tokens/step, steps {self.step} -> {args.max_iters}")  # fmt: skip
        window_loss, window_norm, window_steps = 0.0, 0.0, 0
        clock = time.perf_counter()
        previous = signal.signal(signal.SIGINT, self._on_interrupt)
        try:
            while self.step < args.max_iters and not self.stop_requested:
                loss, norm = self.train_step()
                self.stop_requested = self.interrupted
                if self.comm.size > 1:  # every rank stops after the same step (Ctrl-C reaches them at different times)
                    self.stop_requested = bool(self.comm.allreduce_host(np.array([int(self.interrupted)]))[0])
                window_loss, window_norm, window_steps = window_loss + loss, window_norm + norm, window_steps + 1
                done = self.step == args.max_iters
                checkpoint_due = done or self.stop_requested or self.step % args.checkpoint_interval == 0
                eval_due = self.val_data is not None and (done or (args.eval_interval and self.step % args.eval_interval == 0))
                if checkpoint_due or eval_due or self.step % args.log_interval == 0:
                    elapsed = time.perf_counter() - clock
                    if not self.report(window_loss, window_norm, window_steps, elapsed):
                        return 1
                    window_loss, window_norm, window_steps = 0.0, 0.0, 0
                    if eval_due:
                        self.evaluate()
                    if checkpoint_due:
                        self.save()
                    clock = time.perf_counter()
        finally:
            signal.signal(signal.SIGINT, previous)
        if self.stop_requested:
            say(f"interrupted: checkpoint at step {self.step} saved in {self.out}; continue with --resume --out-dir {self.out}")
            return 130
        return 0

    def _on_interrupt(self, signum, frame):
        """First Ctrl-C: finish the step, save, stop. A second one aborts at once without
        saving: under mpiexec the whole job (a rank that left alone would leave the others
        waiting for it). The notice goes out by `say_now`: this handler may run in the middle
        of a print to the same stream."""
        if self.interrupted:
            if self.comm.size > 1:
                self.comm.abort("interrupted (Ctrl-C twice): the job stopped without saving", EXIT_INTERRUPTED)
            raise KeyboardInterrupt
        self.interrupted = True
        say_now("\nCtrl-C: finishing this step and saving a checkpoint (press again to abort without saving)")

    def report(self, loss_sum, norm_sum, steps, elapsed) -> bool:
        """Read the window's loss back to the host, print and log it; False if it diverged."""
        if self.dp:  # the mean over ranks of their mean losses
            loss_sum = self.dp.comm_sum_scalar(loss_sum) / self.comm.size
        loss = float(self.backend.to_numpy(loss_sum)) / steps
        norm = float(self.backend.to_numpy(norm_sum)) / steps
        if not (math.isfinite(loss) and math.isfinite(norm)):
            say(f"error: the loss became non-finite (loss {loss}, gradient norm {norm}) between steps "
                f"{self.step - steps} and {self.step}. Stopped without saving: the last good checkpoint "
                f"(step {self.last_good_step}) is kept in {self.out}. Try a lower --lr, more --warmup-iters "
                f"or a --grad-clip.")  # fmt: skip
            return False
        tokens_per_s = steps * self.tokens_per_step / elapsed
        scored_per_s, self.scored = self.scored / elapsed, 0
        eta = (self.args.max_iters - self.step) * elapsed / steps
        comm_share = self.comm.take_wait_seconds() / elapsed
        comm = f" | comm {100 * comm_share:.0f}%" if self.comm.size > 1 else ""
        what, rate = ("completion loss", f"{scored_per_s:,.0f} completion tok/s ({tokens_per_s:,.0f} tok/s)") if self.pairs \
            else ("loss", f"{tokens_per_s:,.0f} tok/s")  # fmt: skip
        say(f"step {self.step:>6}/{self.args.max_iters} | {what} {loss:.4f} | lr {self.lr(self.step - 1):.2e} | "
            f"grad norm {norm:.3f} | {rate}{comm} | {1000 * elapsed / steps:.0f} ms/step | ETA {format_duration(eta)}")  # fmt: skip
        extra = {"completion_tokens_per_s": scored_per_s} if self.pairs else {}
        if self.comm.size > 1:
            extra |= {"comm_wait_share": comm_share, "ranks": self.comm.size}
        self.log(step=self.step, loss=loss, lr=self.lr(self.step - 1), grad_norm=norm,
                 tokens_per_s=tokens_per_s, seconds_per_step=elapsed / steps, **extra)  # fmt: skip
        return True

    def evaluate(self):
        loss = self.val_loss()
        say(f"step {self.step:>6}: val loss {loss:.4f} | val perplexity {math.exp(min(loss, 700)):.2f}")
        self.log(step=self.step, val_loss=loss, val_perplexity=math.exp(min(loss, 700)))

    def log(self, **record):
        if self.comm.rank != 0:
            return
        with open(self.out / LOG_FILE, "a") as f:
            f.write(json.dumps(record) + "\n")

    # -- checkpoints ------------------------------------------------------------------------
    def save(self):
        """Model and trainer state, each written in full under a pending name first and
        only then renamed into place, so a failed write (a full disk) leaves the previous
        checkpoint whole and resumable. The state names the step, so a crash between the
        two renames is detected on resume, never silently mixed. Under mpiexec rank 0
        writes (the ZeRO-1 moment shards are gathered to it first)."""
        optimizer = self.dp.state_dict() if self.dp else self.opt.state_dict()
        if self.comm.rank != 0:
            self.last_good_step, self.saved_once = self.step, True
            return
        pending = {name: self.out / f".{name}.pending" for name in (WEIGHTS_FILE, STATE_FILE)}
        try:
            save_checkpoint(pending[WEIGHTS_FILE], self.model.to_numpy(), self.model.config, {STEP_KEY: str(self.step)})
            moments, scalars = optimizer
            state = {"step": self.step, "optimizer": scalars, "tokens_seen": self.step * self.tokens_per_step,
                     "world_size": self.comm.size,
                     "args": {k: v for k, v in vars(self.args).items() if k not in NOT_SAVED}}  # fmt: skip
            save_safetensors(pending[STATE_FILE], moments, {TRAINER_KEY: json.dumps(state), STEP_KEY: str(self.step)})
        except OSError as e:
            for file in pending.values():
                file.unlink(missing_ok=True)
            kept = f"the checkpoint of step {self.last_good_step} is kept" if self.saved_once else "nothing was saved"
            raise TrainingError(
                f"could not save step {self.step} in {self.out} ({e.strerror or e}); {kept}. Free some space "
                f"(or fix the folder) and continue with --resume --out-dir {self.out}"
            ) from None
        for name, file in pending.items():
            os.replace(file, self.out / name)
        self.last_good_step, self.saved_once = self.step, True


def format_duration(seconds: float) -> str:
    seconds = int(seconds)
    return f"{seconds // 3600}h{seconds // 60 % 60:02d}m" if seconds >= 3600 else f"{seconds // 60}m{seconds % 60:02d}s"


def say(message: str):
    print(message, file=sys.stderr, flush=True)


def say_now(message: str):
    """`say` from a signal handler: straight to stderr's file descriptor. The handler may
    run in the middle of a print to sys.stderr, and a second write into its buffer then
    raises RuntimeError (reentrant call): under mpiexec that ended one rank and left the
    job hanging."""
    try:
        fd = sys.stderr.fileno()
    except (OSError, ValueError, AttributeError):  # a stream without a descriptor (io.StringIO, a notebook's): no buffer to re-enter
        say(message)
        return
    with contextlib.suppress(OSError):  # stderr gone: the notice is lost, the checkpoint is not
        os.write(fd, (message + "\n").encode())


def write_tokenizer(tokenizer, out: Path):
    """The tokenizer's files, written to a temp folder and moved in file by file."""
    with tempfile.TemporaryDirectory(dir=out, prefix=".tokenizer.") as tmp:
        save_tokenizer(tokenizer, tmp)
        for file in Path(tmp).iterdir():
            os.replace(file, out / file.name)


def check_out_dir(out: Path, overwrite: bool) -> None:
    """Refuse to start a run in a folder holding anything but nothing, unless --overwrite."""
    if out.exists() and not out.is_dir():
        raise TrainingError(f"--out-dir {out} is a file, not a folder; choose another --out-dir")
    if overwrite or not out.is_dir():
        return
    if (out / STATE_FILE).exists():
        raise TrainingError(f"{out} already holds a training run; continue it with --resume, choose another --out-dir, "
                            "or pass --overwrite to start over")  # fmt: skip
    names = sorted(p.name for p in out.iterdir())
    if names:
        shown = ", ".join(names[:4]) + (", ..." if len(names) > 4 else "")
        raise TrainingError(
            f"--out-dir {out} holds files that no training run started ({shown}), such as a shipped or converted "
            "model; choose another --out-dir (e.g. runs/NAME), or pass --overwrite to replace them"
        )


def start(args, comm: Comm) -> Trainer:
    """A fresh run: tokenizer and model from scratch or from --init-from. Everything is
    checked before --out-dir is touched."""
    if not args.data:
        raise TrainingError("--data is required (a UTF-8 text file, a prepared folder, or JSON Lines with --format pairs) unless --resume")
    out = Path(args.out_dir)
    if comm.rank == 0:  # the others would see the folder rank 0 is filling
        check_out_dir(out, args.overwrite)
    args.lr_decay_iters = args.lr_decay_iters or args.max_iters  # fixed now: a resume may change --max-iters
    backend = get_backend(rank_backend(args.backend, comm))
    if args.init_from:
        file = resolve_weights(args.init_from)
        tokenizer = load_tokenizer_beside(file)
        params, config, _ = load_host_params(file, copy=True)
        check_vocabularies(params, config, tokenizer, file.parent, say)
        if args.format == "pairs":
            tokenizer, params, added = add_end_of_text(tokenizer, params)
            config = dataclasses.replace(config, vocab_size=params["wte.weight"].shape[0])
            if added:
                say(f"added <|endoftext|> to the tokenizer as id {tokenizer.eot_id} (to end each completion)")
        args.block_size = args.block_size or config.n_ctx
        config = dataclasses.replace(config, dropout=args.dropout)
        model = GPT.from_numpy(config, params, backend, args.dtype)
    elif args.format == "text" and Path(args.data).is_dir():  # a prepared folder: its tokenizer, unless --tokenizer names another
        if args.tokenizer == "char" or (args.tokenizer or "").startswith("bpe:"):
            raise TrainingError(f"--tokenizer {args.tokenizer} learns from text, but {args.data} is already tokenized; "
                                "leave --tokenizer out (the folder's own is used) or prepare with it")  # fmt: skip
        tokenizer = prepared_tokenizer(args.data) if args.tokenizer is None else make_tokenizer(args.tokenizer, "")
        config = scratch_config(args, tokenizer.n_vocab)
        args.block_size = config.n_ctx
        model = GPT.init(config, backend, seed=args.seed, dtype=args.dtype)
    else:
        if args.format == "pairs":
            pairs = read_pairs(args.data, args.skip_bad).pairs
            text = "\n".join(p.prompt + p.completion for p in pairs)
            tokenizer, _, _ = add_end_of_text(make_tokenizer(args.tokenizer or "char", text))
        else:
            tokenizer = make_tokenizer(args.tokenizer or "char", read_text(args.data))
        config = scratch_config(args, tokenizer.n_vocab)
        args.block_size = config.n_ctx
        model = GPT.init(config, backend, seed=args.seed, dtype=args.dtype)
    if args.block_size > model.config.n_ctx:
        raise TrainingError(f"--block-size {args.block_size} exceeds the model's context of {model.config.n_ctx}; "
                            "give a smaller --block-size")  # fmt: skip
    trainer = Trainer(args, model, tokenizer, load_data(args, tokenizer), comm=comm)
    if comm.rank == 0:
        out.mkdir(parents=True, exist_ok=True)
        for stale in (STATE_FILE, LOG_FILE):  # with --overwrite: the old run is over
            (out / stale).unlink(missing_ok=True)
        write_tokenizer(tokenizer, out)
    return trainer


def load_data(args, tokenizer) -> tuple[np.ndarray, np.ndarray] | PairsData:
    """The (train, val) token streams of a text file or prepared folder, or the examples of a pairs file."""
    if getattr(args, "format", "text") == "pairs":  # runs saved before --format existed are text
        return load_examples(args.data, tokenizer, args.block_size, args.skip_bad)
    return load_splits(tokenizer, args.data, args.val_fraction)


def resume(args, given: set[str], comm: Comm) -> Trainer:
    """The run saved in --out-dir, with the saved settings (a few may be overridden)."""
    out = Path(args.out_dir)
    if not (out / STATE_FILE).exists():
        raise TrainingError(f"nothing to resume: {out / STATE_FILE} does not exist; start the run without --resume")
    moments, meta = load_safetensors(out / STATE_FILE)
    if TRAINER_KEY not in meta or STEP_KEY not in meta:
        raise TrainingError(f"{out / STATE_FILE} is not an npgpt trainer state; the folder cannot be resumed")
    state = json.loads(meta[TRAINER_KEY])
    params, config, model_meta = load_host_params(out / WEIGHTS_FILE, copy=True)
    if model_meta.get(STEP_KEY) != meta[STEP_KEY]:
        raise TrainingError(f"{out}: model is at step {model_meta.get(STEP_KEY)} but the trainer state at "
                            f"{meta[STEP_KEY]} (a save was cut off); the folder cannot be resumed")  # fmt: skip
    saved = state["args"]
    clashes = [f"--{k.replace('_', '-')} ({getattr(args, k)!r} vs saved {saved[k]!r})"
               for k in given - RESUME_OVERRIDES - NOT_SAVED - {"out_dir", "grad_accum"} if getattr(args, k) != saved.get(k)]  # fmt: skip
    if clashes:
        raise TrainingError(f"a resumed run keeps its settings; these differ: {', '.join(clashes)}. "
                            f"Only {', '.join('--' + k.replace('_', '-') for k in sorted(RESUME_OVERRIDES))} may change.")  # fmt: skip
    grad_accum = split_global_batch(saved["grad_accum"] * state.get("world_size", 1), comm.size,
                                    args.grad_accum if "grad_accum" in given else None)  # fmt: skip
    overrides = {k: getattr(args, k) for k in given & RESUME_OVERRIDES}
    args = argparse.Namespace(**{**DEFAULTS_OF_NEW_FLAGS, **saved, **overrides, "out_dir": str(out), "grad_accum": grad_accum})
    tokenizer = load_tokenizer_beside(out / WEIGHTS_FILE)
    check_vocabularies(params, config, tokenizer, out, say)
    model = GPT.from_numpy(config, params, get_backend(rank_backend(args.backend, comm)))
    trainer = Trainer(args, model, tokenizer, load_data(args, tokenizer), start_step=state["step"], comm=comm)
    (trainer.dp or trainer.opt).load_state_dict(moments, state["optimizer"])
    if comm.rank == 0:
        truncate_log(out / LOG_FILE, state["step"])
    say(f"resuming {out} at step {state['step']}" + (f" on {comm.size} ranks x --grad-accum {grad_accum}" if comm.size > 1 else ""))
    return trainer


# Flags added after some checkpoints were written: their values for those checkpoints.
DEFAULTS_OF_NEW_FLAGS = {"threads": None, "zero": 0, "bucket_mb": DEFAULT_BUCKET_MB, "comm_timeout": DEFAULT_TIMEOUT}


def split_global_batch(micro_batches: int, world: int, given: int | None) -> int:
    """--grad-accum of a resumed run on `world` ranks: the saved run's global count of
    micro-batches per step, divided over the ranks (the same sequences, another split)."""
    if micro_batches % world:
        raise TrainingError(f"the run's global batch is {micro_batches} micro-batches per step, which {world} ranks "
                            f"cannot share equally: resume on a number of ranks that divides {micro_batches}")  # fmt: skip
    if given is not None and given * world != micro_batches:
        raise TrainingError(f"--grad-accum {given} on {world} ranks gives {given * world} micro-batches per step, but "
                            f"the run has {micro_batches}: leave out --grad-accum (it becomes {micro_batches // world})")  # fmt: skip
    return micro_batches // world


def truncate_log(path: Path, step: int):
    """Drop log lines past the checkpoint's step (they will be written again)."""
    if path.exists():
        kept = [line for line in path.read_text().splitlines() if json.loads(line)["step"] <= step]
        path.write_text("".join(line + "\n" for line in kept))


def main(argv=None) -> int:
    if launched_rank() != 0:  # under mpiexec only rank 0 prints
        sys.stdout = sys.stderr = open(os.devnull, "w")
    return run_cli(_main, argv)


def _main(argv) -> int:
    parser = build_parser()
    argv = sys.argv[1:] if argv is None else list(argv)
    args = parser.parse_args(argv)
    for name in ("batch_size", "grad_accum", "max_iters", "log_interval", "checkpoint_interval", "eval_iters"):
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    if args.data:
        args.data = str(Path(args.data).resolve())  # a resumed run may start elsewhere
    comm = connect(args.comm_timeout)
    created = None if args.resume or comm.rank else first_missing(Path(args.out_dir))
    trainer, status = None, 1
    try:
        trainer = on_every_rank(comm, lambda: set_up(args, argv, comm))
        status = trainer.run()
        return status
    finally:
        if created is not None and status != 0 and not (trainer and trainer.saved_once):
            shutil.rmtree(created, ignore_errors=True)  # a failed start leaves nothing behind


def set_up(args, argv, comm: Comm) -> Trainer:
    limit_threads(args.threads, comm)
    configure_threads(args.threads)  # npgpt's kernel pool: the same count (default: follows BLAS)
    return resume(args, explicit_flags(argv), comm) if args.resume else start(args, comm)


def first_missing(path: Path) -> Path | None:
    """The outermost folder of `path` that does not exist yet (what mkdir -p would create)."""
    missing = None
    path = path.absolute()
    while not path.exists() and path != path.parent:
        missing, path = path, path.parent
    return missing


if __name__ == "__main__":
    sys.exit(main())
