"""NumPy's fast kernel set: the reference layers reorganised for the CPU's caches and cores.

Each kernel computes its `npgpt.layers` (or `npgpt.optim`) formula (tests/test_kernels.py
proves it, forward and backward, in float64); what changes is only how the work is laid out:
- an inference batch (independent rows: no backward follows) is cut into pieces of
  about BATCH_ROWS positions that the threads take one at a time, each piece's whole
  forward on its own thread, BLAS included (`over_batch`): no hand-over between threads
  inside a forward, and a piece's activations stay in cache;
- a training batch is cut into one piece of whole rows per thread (`over_train_batch`),
  each piece's forward on its own thread, BLAS included, then (the model) the LM head
  and loss on the whole batch, then each piece's backward likewise; the model sums the
  pieces' gradients;
- elsewhere, elementwise and reduction passes (LayerNorm, GELU, the bias add and its
  gradient, the attention softmax, cross-entropy, AdamW, the gradient norm) run over row
  ranges on `npgpt.kernels.threads`' pool, one range per thread (NumPy releases the GIL
  inside its loops); matmuls are shared out, each thread running its own on one BLAS
  thread (attention's heads; a linear layer's dx and dw, by rows of dx and columns of
  dw; a forward product by rows when small, by one range of w's columns a thread when
  large; decoding's few rows whole, on one BLAS thread when small); only where the
  kernels have one thread, or for decoding's products, do they run whole on BLAS's
  own threads;
- a column-major token embedding (`npgpt.generate.decoding_layout`, where the LM head's
  x @ wte.T reads wte's columns as rows) is gathered through its transpose;
- decoding's few rows (under FEW_ROWS) make one pass per step of LayerNorm and GELU
  over all rows, and one-query attention one softmax over its S scores: no blocks, no
  thread ranges, few calls;
- inside a range, long chains (GELU, LayerNorm) run over blocks of ROW_BLOCK rows (more
  for short rows), so their passes hit the cache instead of main memory, built in place;
  LayerNorm's row means are BLAS matrix-vector products, its variances row-wise dot products;
- attention runs over blocks of QUERY_BLOCK queries, each against only the keys it can
  see, so the masked upper triangle of the T x S scores is (mostly) never computed, a
  block's heads in groups whose scores fit in L2 (stacked products: fewer calls); few
  heads of short rows (an inference piece) go all at once, in blocks of up to
  SMALL_QUERY_BLOCK queries; where no score of a head can overflow exp (a bound from
  its query and key lengths), the softmax skips its row maxima (softmax is unchanged by
  that shift);
- a training piece's forward (`backward_follows`) keeps GELU's slope, so its backward
  is one product;
- the position embedding's gradient is a sum over the batch when no row is packed;
- LayerNorm, the linear bias and cross-entropy write into buffers they own instead of
  allocating one per step of the formula; cross-entropy turns the logits into
  unnormalised probabilities (its loss needs only their row sums) and the backward turns
  them into the gradient, so one (N, V) buffer serves all three;
- a training step's LM head and loss (`lm_head_loss`) make the logits a tile of the
  vocabulary at a time (all rows by LM_TILE // N columns), taking the tile's exps and row
  sums while it is in cache, and its backward turns each tile into dlogits and takes its
  dwte rows and dx share at once: the (N, V) buffer is written once and read once;
- AdamW updates each parameter in one sweep of cache-sized blocks instead of ~10 passes
  over the whole tensor; a step's updates, sums of squares and the training pieces'
  gradient sum go a parameter a thread (`over_parameters`), one hand-off for all;
- inside a piece of `over_batch` no backward follows (`inference`): LayerNorm keeps no
  normalised copy, attention builds each query block's probabilities in one scratch per
  thread, and their caches are None; on one thread (eval's pieces) LayerNorm runs in fewer,
  larger blocks, attention reads k and v as the model's strided views (`attention_inference`),
  and GELU is written over its input;
- where numba is installed (`npgpt[numba]`; NPGPT_NUMBA=0 turns it off), float32 GELU (and
  a training forward's slope), the causal softmax, LayerNorm forward and backward, and the
  row maxima, exps and sums of cross-entropy and of the LM head's tiles run instead as the
  compiled loops of `npgpt.kernels.compiled` (`loops`): one pass per row each, a vectorised
  exp, over the same thread ranges (tests/test_compiled.py proves them in float32);
- there too, a float32 decode step (one position, one sequence) runs whole, from the token
  to its logits, in one call of `npgpt.kernels.compiled_step` on the threads
  (`decode_step`), and other one-row products (a prompt's last block) on its product
  (`one_row_product`): no Python, no cache-cold small calls and no hand-over between the
  ~50 ops of a step (tests/test_compiled_step.py proves them against the reference model).
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import importlib.util
import math
import os
import threading
import warnings

import numpy as np

from npgpt import layers, optim
from npgpt.kernels import REFERENCE, each_parameter, threads
from npgpt.kernels.threads import (MIN_ELEMENTS, blas_on_one_thread, blas_settable, free_threads, num_threads, parallel_items,
                                   parallel_rows)  # fmt: skip

ROW_BLOCK = 64  # rows per block of a long elementwise chain: (64, 4C) floats stay in L2
ROW_ELEMENTS = 1 << 16  # ... or more rows, up to this many elements, where rows are short (LayerNorm's C)
INFERENCE_ROW_ELEMENTS = 1 << 17  # ... in an inference piece's LayerNorm (its few passes): eval's 512 x 192 in one block
INFERENCE_GELU_ELEMENTS = 3 << 14  # ... in an inference piece's GELU over x: a block and its scratch, 384 KiB of float32, in L2
QUERY_BLOCK = 64  # queries per block: later blocks see more keys, none sees the future
FLAT_BLOCK = 1 << 16  # elements per block of the optimizer's sweep over a flat parameter
DOT_BLOCK = 1 << 13  # elements per dot product: OpenBLAS threads dots above 10000 elements
BATCHED_ATTENTION = 1 << 16  # scores up to which all heads go at once (else in groups of HEAD_GROUP)
SMALL_QUERY_BLOCK = 32  # queries per block when all heads go at once (an inference piece's short rows)
CE_BLOCK = 1 << 16  # logits per block of cross-entropy's passes (a few rows of a large V)
GEMM_PER_ELEMENT = 16  # multiply-adds of a matmul that take about as long as one element of a pass
SHARE_ROWS_FROM = 32  # rows from which the threads share a linear layer's rows (below: its columns)
BATCH_ROWS = 512  # positions per piece of an inference batch: a piece's activations stay in cache
SHARE_GEMV_FROM = 1 << 18  # multiply-adds from which decoding's products run on BLAS's own threads
FEW_ROWS = 32  # rows below which LayerNorm, GELU and the bias add make one pass per step over all rows (decoding)
LARGE_COLUMN_ALIGN = 64  # column pieces of a large product: multiples of this many columns
HEAD_GROUP = 1 << 17  # scores per group of heads taken together through a block (float32: L2's 512 KiB)
LM_TILE = 1 << 20  # logits per tile of the LM head's loss (all rows x a block of the vocabulary): in L3
VOCAB_ALIGN = 64  # vocabulary blocks of the LM head's loss: multiples of this many columns
TRAIN_ATTENTION = 1 << 18  # scores (all heads, all queries) up to which a training piece's attention is one block, all heads at once
TRAIN_PIECE = 128  # positions per piece of a training batch, at least: below, one piece
PARAMETER_ELEMENTS = 1 << 21  # elements (all parameters) from which `over_parameters` shares them among the threads
SMALL_GEMM = 1 << 27  # multiply-adds up to which a linear layer's forward product is shared among the threads
GELU_SCALE = layers.GELU_SCALE
COMPILED_ENV = "NPGPT_NUMBA"  # "0": never use the compiled loops, even where numba is installed
_piece = threading.local()  # .inference, .training: this thread runs a piece of over_batch, of over_train_batch


def inference() -> bool:
    """Whether this thread runs a piece of `over_batch`: no backward follows, so a kernel
    may keep no cache (None)."""
    return getattr(_piece, "inference", False)


def backward_follows() -> bool:
    """Whether this thread runs a piece of `over_train_batch`: its backward follows, so a
    forward kernel may keep what makes the backward cheaper (GELU's slope) instead of what
    costs the forward least."""
    return getattr(_piece, "training", False)


def compiled_loops():
    """`npgpt.kernels.compiled`, imported on first use (numba's import takes ~0.5 s), or
    None where numba is not installed or $NPGPT_NUMBA is "0", and where it is installed
    but cannot load (too old for this NumPy, its LLVM library missing, no folder to cache
    in), with a warning saying why: the NumPy passes run instead."""
    return compiled_module("compiled")


def compiled_step():
    """`npgpt.kernels.compiled_step` (a whole decode step in one call), or None, as
    `compiled_loops`."""
    return compiled_module("compiled_step")


@functools.cache
def compiled_module(name: str):
    """npgpt.kernels.<name>, a numba module, imported on first use, or None (see `compiled_loops`)."""
    if os.environ.get(COMPILED_ENV, "") == "0" or importlib.util.find_spec("numba") is None:
        return None
    try:
        return importlib.import_module(f"npgpt.kernels.{name}")
    except Exception as e:  # noqa: BLE001  (the loops are optional: any failure to load them leaves NumPy's passes)
        warnings.warn(f"numba is installed but npgpt's compiled loops cannot load ({type(e).__name__}: {e}); running "
                      f"NumPy's passes (where numba cannot cache, set NUMBA_CACHE_DIR to a writable folder; "
                      f"{COMPILED_ENV}=0 skips numba)", RuntimeWarning, stacklevel=2)  # fmt: skip
        return None


def announce_compiling(say):
    """Have say(text) called once, when numba first compiles one of npgpt's kernels in this
    process (its cache is cold: a first run takes ~15-20 s longer), where numba is in use.
    Returns the numba event listener (None without numba)."""
    if compiled_loops() is None:
        return None
    from numba.core import event

    class Once(event.Listener):
        said = False

        def on_start(self, ev):
            if not self.said:
                self.said = True
                say("notice: numba is compiling npgpt's CPU kernels (on a first run only, ~15-20 s; cached for later runs)")

        def on_end(self, ev):
            pass

    listener = Once()
    event.register("numba:compile", listener)
    return listener


def loops(*arrays):
    """`compiled_loops()` when every array is C-contiguous float32 (the loops' one
    layout), else None: the NumPy passes run."""
    if all(a.dtype == np.float32 and a.flags.c_contiguous for a in arrays):
        return compiled_loops()
    return None


@contextlib.contextmanager
def as_piece(kind: str):
    """Run the block as a piece of `kind` on this thread: "inference" (`inference`) or
    "training" (`backward_follows`)."""
    before = getattr(_piece, kind, False)
    setattr(_piece, kind, True)
    try:
        yield
    finally:
        setattr(_piece, kind, before)


def run_as_piece(kind: str, fn):
    """fn(b0, b1), run `as_piece(kind)` on the thread that calls it."""

    def piece(b0, b1):
        with as_piece(kind):
            return fn(b0, b1)

    return piece


def over_row_blocks(fn, N: int, row_size: int, overflow: str | None = None, elements: int | None = None) -> list:
    """fn(r0, r1) for every block of max(ROW_BLOCK, elements // row_size) rows of [0, N)
    (elements: ROW_ELEMENTS unless given), contiguous runs of blocks shared among the
    threads; returns each thread's list of fn's results. `overflow` ("ignore"): NumPy's
    overflow handling in fn, set once per thread (an errstate costs more than a pass over
    a small block)."""
    rows = block_rows(row_size, elements)

    def run(a, b):
        with np.errstate(over=overflow) if overflow else contextlib.nullcontext():
            return [fn(r0, min(r0 + rows, b)) for r0 in range(a, b, rows)]

    return parallel_rows(run, N, row_size, align=rows)


def block_rows(row_size: int, elements: int | None = None) -> int:
    """Rows per block of `over_row_blocks`: max(ROW_BLOCK, elements // row_size), elements
    ROW_ELEMENTS unless given."""
    return max(ROW_BLOCK, (ROW_ELEMENTS if elements is None else elements) // max(row_size, 1))


# -- linear ---------------------------------------------------------------------------------
def linear_forward(x, w, b):
    """x @ w + b, the bias (None: no bias) added in place. The cache is the reference's.
    Shared among the threads, each part on one BLAS thread with its bias added while it
    is in cache, except decoding's large products:
    - below SHARE_ROWS_FROM rows (decoding's matrix-vector products, where reading w is
      the work), whole (`few_rows_product`);
    - a small product (up to SMALL_GEMM multiply-adds) by rows (at least ROW_BLOCK a
      thread);
    - a larger one by one range of w's columns a thread (more pieces would pack x more
      often): no barrier between the threads inside the product, as BLAS's own threads
      have. It runs whole on BLAS's threads where the kernels have one thread.
    Where the BLAS pool cannot be set (not OpenBLAS), every product runs whole on BLAS's
    own threads."""
    N, (Cin, Cout) = x.shape[0], w.shape
    if N < SHARE_ROWS_FROM:  # checked first: a decode step makes 49 of these
        return few_rows_product(x, w, b), (x, w)
    if not blas_settable():
        return whole_product(x, w, b), (x, w)
    if N * Cin * Cout > SMALL_GEMM:
        if free_threads() == 1:
            return whole_product(x, w, b), (x, w)
        return by_columns(x, w, b, num_threads(), align=LARGE_COLUMN_ALIGN), (x, w)
    out = product_output(x, w, b)

    def rows(r0, r1):
        np.matmul(x[r0:r1], w, out=out[r0:r1])
        if b is not None:
            out[r0:r1] += b

    parallel_rows(rows, N, Cin * Cout // GEMM_PER_ELEMENT, align=ROW_BLOCK, one_blas_thread=True)
    return out, (x, w)


def whole_product(x, w, b):
    """x @ w + b in one BLAS call, the bias added in place (over row ranges)."""
    out = x @ w

    def add_bias(r0, r1):
        out[r0:r1] += b

    if b is not None:
        parallel_rows(add_bias, x.shape[0], w.shape[1])
    return out


def few_rows_product(x, w, b):
    """x @ w + b for a few rows (decoding's products, where reading w is the work), the
    bias added in place: one float32 row on the compiled step's product where numba is
    installed (`one_row_product`); else from SHARE_GEMV_FROM multiply-adds (every product
    of GPT-2 124M) on BLAS's own threads, whose spinning workers take a product within microseconds
    (pieces on Python threads woken per product lost ~100 us a hand-off to wake-ups:
    slower than one thread on the 0.2-0.5 ms products of a 124M block); below, on one
    BLAS thread (where the pool cannot be set, on BLAS's own). On a busy machine BLAS's
    threads stall waiting for a core (a 2-thread step then runs several times slower
    than on one thread: give --threads 1 there)."""
    N, (Cin, Cout) = x.shape[0], w.shape
    if N == 1 and (step := compiled_step()) is not None and (out := one_row_product(step, x, w, b)) is not None:
        return out
    if N * Cin * Cout >= SHARE_GEMV_FROM:
        out = x @ w
    else:
        with blas_on_one_thread():
            out = x @ w
    if b is not None:
        out += b
    return out


def one_row_product(step, x, w, b):
    """x (1, Cin) @ w + b by `compiled_step.product` on the threads, w row-major or
    column-major (its transpose's rows then give one output each), or None where x, w or b
    is not float32 or w is neither (OpenBLAS then runs it). The threads stream contiguous
    parts of w: the LM head of GPT-2 124M took ~6-9% less time than on OpenBLAS's GEMV, at
    1 thread and at 2 (in-process pairs, decoding_layout's column-major wte)."""
    if not (x.dtype == w.dtype == np.float32 and (b is None or b.dtype == np.float32)):
        return None
    if not (w.flags.c_contiguous or w.flags.f_contiguous):
        return None
    transposed = not w.flags.c_contiguous
    held, Cout, nt = (w.T if transposed else w), w.shape[1], free_threads()
    bias = filled(Cout, 0, np.float32) if b is None else b  # no bias: zeros
    x, out = np.ascontiguousarray(x[0]), np.empty((1, Cout), dtype=np.float32)
    flags, partial = step.new_flags(nt), np.empty((nt, Cout), dtype=np.float32)
    work = lambda tid: step.product(x, held, transposed, bias, out[0], False, partial, tid, nt, flags, 0)  # noqa: E731
    return out if together(step, work, nt, flags, "the product runs on BLAS") else None


def together(step, work, nt: int, flags, instead: str) -> bool:
    """work(tid) for tid < nt on nt threads at once, compiled code of `step` whose threads
    meet at spin barriers on `flags`: True if every thread finished, else (a thread gave up
    waiting) False, with a warning saying what runs `instead`. A thread stopped by an
    exception before it finished (Ctrl-C) sets the give-up mark, so no other waits for it."""

    def guarded(tid):
        try:
            return work(tid)
        except BaseException:
            step.give_up(flags, nt)
            raise

    if min(threads.at_once(guarded, nt)) >= 0:
        return True
    warnings.warn(f"the compiled step's threads gave up waiting for each other (a machine too busy to run {nt} "
                  f"threads at once?); {instead}", RuntimeWarning, stacklevel=3)  # fmt: skip
    return False


def product_output(x, w, b):
    """An empty (N, Cout) array for x @ w + b (b None: no bias), of the result's dtype."""
    dtype = np.result_type(x, w) if b is None else np.result_type(x, w, b)
    return np.empty((x.shape[0], w.shape[1]), dtype=dtype)


def by_columns(x, w, b, parts: int, align: int):
    """x @ w + b by up to `parts` ranges of w's columns (inner edges multiples of `align`),
    taken by the threads as they come free, each on one BLAS thread."""
    out = product_output(x, w, b)
    pieces = threads.row_ranges(w.shape[1], parts, align)

    def columns(i):
        c0, c1 = pieces[i]
        np.matmul(x, w[:, c0:c1], out=out[:, c0:c1])
        if b is not None:
            out[:, c0:c1] += b[c0:c1]

    parallel_items(columns, len(pieces))
    return out


def linear_backward(dout, cache):
    """dout (N, Cout) -> dx (N, Cin), dw (Cin, Cout), db (Cout,). On several threads, thread
    i of n computes rows r0:r1 of dx and the matching share c0:c1 = r0*Cout//N : r1*Cout//N
    of dw's and db's columns, each product on one BLAS thread: the threads never wait for
    each other, where BLAS's own threads meet at a barrier inside every product. Work too
    small to share runs on the calling thread, also on one BLAS thread. (Where the BLAS
    pool cannot be set, as with MKL, the products run whole on BLAS's threads.)"""
    x, w = cache
    N, Cout = dout.shape
    dx = np.empty((N, w.shape[0]), dtype=np.result_type(dout, w))
    dw = np.empty(w.shape, dtype=np.result_type(x, dout))
    db = np.empty(Cout, dtype=dout.dtype)

    def share(r0, r1):
        c0, c1 = r0 * Cout // N, r1 * Cout // N
        np.matmul(dout[r0:r1], w.mT, out=dx[r0:r1])
        np.matmul(x.mT, dout[:, c0:c1], out=dw[:, c0:c1])
        np.matmul(ones(N, dout.dtype), dout[:, c0:c1], out=db[c0:c1])  # column sums by BLAS

    if not blas_settable():  # a BLAS whose pool cannot be set to 1 (not OpenBLAS): its own threads
        share(0, N)
    else:  # on one BLAS thread even when too small to share out: 2 BLAS threads on tiny products stall
        with blas_on_one_thread():
            parallel_rows(share, N, w.shape[0] * Cout // GEMM_PER_ELEMENT)
    return dx, dw, db


# -- layer norm -----------------------------------------------------------------------------
def layer_norm_forward(x, w, b, eps):
    """x (N, C) -> out (N, C), block by block: the row means by BLAS matrix-vector products,
    the variances by row-wise dot products (no squares held), x - mean normalised in place."""
    N, C = x.shape
    compiled = loops(x, w, b)
    if inference():  # no backward follows: the output alone (a decode step's one row without array passes for its scale)
        if compiled is not None:
            out = np.empty_like(x)
            parallel_rows(lambda r0, r1: compiled.layer_norm_(x[r0:r1], w, b, np.float32(eps), out[r0:r1]), N, C)
            return out, None
        return (layer_norm_one_row(x, w, b, eps) if N == 1 else layer_norm_inference(x, w, b, eps)), None
    average = averaging(C, x.dtype)  # (C,) of 1/C
    if N < FEW_ROWS:
        return layer_norm_rows(x, w, b, eps, average)
    xhat, out, rstd = np.empty_like(x), np.empty_like(x), np.empty((N, 1), dtype=x.dtype)
    if compiled is not None:  # one pass per row
        parallel_rows(lambda r0, r1: compiled.layer_norm_train_(x[r0:r1], w, b, np.float32(eps), out[r0:r1], xhat[r0:r1],
                                                                rstd[r0:r1, 0]), N, C)  # fmt: skip
        return out, (xhat, rstd, w)

    def block(r0, r1):
        xh, rs, o = xhat[r0:r1], rstd[r0:r1, 0], out[r0:r1]
        np.subtract(x[r0:r1], (x[r0:r1] @ average)[:, None], out=xh)  # centred
        np.vecdot(xh, xh, out=rs)  # sums of squares, by rows (no squares held)
        rs *= 1.0 / C  # variance
        rs += eps
        np.sqrt(rs, out=rs)
        np.divide(1.0, rs, out=rs)  # (Nb,)
        xh *= rs[:, None]  # normalised
        np.multiply(xh, w, out=o)
        o += b

    over_row_blocks(block, N, C)
    return out, (xhat, rstd, w)


def layer_norm_rows(x, w, b, eps, average):
    """layer_norm_forward for a few rows (decoding): all rows at once, one pass per step
    (no blocks, no threads), the means and variances by products with `average`."""
    xhat = x - (x @ average)[:, None]  # centred
    rstd = ((xhat * xhat) @ average)[:, None]  # (N, 1), variance
    rstd += eps
    np.sqrt(rstd, out=rstd)
    np.divide(1.0, rstd, out=rstd)
    xhat *= rstd  # normalised
    out = xhat * w
    out += b
    return out, (xhat, rstd, w)


def layer_norm_one_row(x, w, b, eps):
    """layer_norm_forward's output alone for one row x (1, C) (a decode step's, no backward
    follows): x - mean, scaled by the reciprocal standard deviation (a Python float from
    one dot product, no array passes), then by w, plus b, in place."""
    C = x.shape[1]
    out = x - (x @ averaging(C, x.dtype))[:, None]  # centred
    row = out[0]
    out *= 1.0 / math.sqrt(float(row @ row) / C + eps)
    out *= w
    out += b
    return out


def layer_norm_inference(x, w, b, eps):
    """layer_norm_forward's output alone, built in it block by block (on one thread, blocks
    of up to INFERENCE_ROW_ELEMENTS: at eval's 512 x 192 one block took ~15% less time than
    two of ROW_ELEMENTS): x - mean, its row variances by row-wise dot products (no squares held),
    scaled in place (no xhat kept)."""
    N, C = x.shape
    out = np.empty_like(x)
    average = averaging(C, x.dtype)  # (C,) of 1/C

    def block(r0, r1):
        o = out[r0:r1]
        np.subtract(x[r0:r1], (x[r0:r1] @ average)[:, None], out=o)  # centred
        rs = np.vecdot(o, o)  # (Nb,) sums of squares (at eval's 512 x 192, ~2x faster than einsum's)
        rs *= 1.0 / C
        rs += eps
        np.sqrt(rs, out=rs)
        np.divide(1.0, rs, out=rs)
        o *= rs[:, None]  # normalised
        o *= w
        o += b

    over_row_blocks(block, N, C, elements=INFERENCE_ROW_ELEMENTS if free_threads() == 1 else None)
    return out


def layer_norm_backward(dout, cache):
    """dout (N, C) -> dx, dw, db; dx built in place, block by block: the column sums (dw,
    db) and row means by BLAS matrix-vector products, the row means of g * xhat by
    row-wise dot products (no product held)."""
    xhat, rstd, w = cache
    N, C = dout.shape
    dx = np.empty_like(dout)
    if (compiled := loops(dout, xhat, rstd, w)) is not None:  # one pass per row, dw and db summed per thread range

        def rows(r0, r1):
            dw, db = np.zeros(C, dtype=dout.dtype), np.zeros(C, dtype=dout.dtype)
            compiled.layer_norm_backward_(dout[r0:r1], xhat[r0:r1], rstd[r0:r1, 0], w, dx[r0:r1], dw, db)
            return dw, db

        parts = parallel_rows(rows, N, C)
        return dx, np.sum([p[0] for p in parts], axis=0), np.sum([p[1] for p in parts], axis=0)
    average = averaging(C, dout.dtype)  # (C,) of 1/C

    def block(r0, r1):
        d, xh, g = dout[r0:r1], xhat[r0:r1], dx[r0:r1]
        column_sum = ones(r1 - r0, d.dtype)  # (Nb,)
        np.multiply(d, xh, out=g)  # g as scratch
        dw = column_sum @ g
        db = column_sum @ d
        np.multiply(d, w, out=g)  # g = dout * w
        mean_gx = np.vecdot(g, xh)  # (Nb,)
        mean_gx *= 1.0 / C
        g -= (g @ average)[:, None]
        g -= xh * mean_gx[:, None]
        g *= rstd[r0:r1]
        return dw, db

    parts = over_row_blocks(block, N, C)
    dw = np.sum([p[0] for run in parts for p in run], axis=0)
    db = np.sum([p[1] for run in parts for p in run], axis=0)
    return dx, dw, db


# -- GELU -----------------------------------------------------------------------------------
def gelu_forward(x):
    """x (N, 4C) -> out (N, 4C). Where a backward follows (`backward_follows`), the cache is
    GELU's slope d(out)/dx, computed while x is in cache, and the backward is one product;
    elsewhere the cache is x, and a backward would recompute the tanh, except in a piece of
    `over_batch` on one thread (`inference`, from FEW_ROWS rows): there no backward follows,
    and GELU is written over x (the product before it, not read again) block by block
    through one block's scratch, ~10% faster than filling a new array (cache None), in
    blocks of INFERENCE_GELU_ELEMENTS or ROW_BLOCK rows (a block and its scratch in L2).
    Where `loops` has the compiled loops, they make it one pass: over x inside a piece of
    `over_batch` (any rows, any thread count), into a new array elsewhere (cache x), and
    together with the slope where a backward follows."""
    compiled = loops(x)
    if compiled is not None and not backward_follows():  # one pass: over x in a piece of over_batch, else into a copy
        out = x if inference() and x.flags.writeable else x.copy()
        parallel_rows(lambda r0, r1: compiled.gelu_(out[r0:r1]), out.shape[0], out.shape[1])
        return out, (None if out is x else x)
    if inference() and x.shape[0] >= FEW_ROWS and free_threads() == 1 and x.flags.writeable:
        scratch = np.empty((min(block_rows(x.shape[1], INFERENCE_GELU_ELEMENTS), x.shape[0]), x.shape[1]), dtype=x.dtype)
        over_row_blocks(lambda r0, r1: gelu_block(x[r0:r1], x[r0:r1], scratch[: r1 - r0]), x.shape[0], x.shape[1],
                        overflow="ignore", elements=INFERENCE_GELU_ELEMENTS)  # fmt: skip
        return x, None
    out = np.empty_like(x)
    if not backward_follows():
        if x.shape[0] < FEW_ROWS:  # decoding: one pass per step over all rows
            with np.errstate(over="ignore"):
                gelu_block(x, out)
            return out, x
        over_row_blocks(lambda r0, r1: gelu_block(x[r0:r1], out[r0:r1]), x.shape[0], x.shape[1], overflow="ignore")
        return out, x
    slope = np.empty_like(x)
    if compiled is not None:  # one pass
        parallel_rows(lambda r0, r1: compiled.gelu_slope_(x[r0:r1], out[r0:r1], slope[r0:r1]), x.shape[0], x.shape[1])
        return out, Slope(slope)
    over_row_blocks(lambda r0, r1: gelu_slope_block(x[r0:r1], out[r0:r1], slope[r0:r1]), x.shape[0], x.shape[1],
                    overflow="ignore")  # fmt: skip
    return out, Slope(slope)


@dataclasses.dataclass(frozen=True)
class Slope:
    """An elementwise op's cache holding its derivative d(out)/d(in): the backward is dout * values."""

    values: np.ndarray


def gelu_block(x, out, scratch=None):
    """0.5 x (1 + tanh u) written as x / (1 + exp(-2u)), into `out` (which may be x), built
    in `scratch` (x's shape; None: in `out`): one exp instead of a tanh (NumPy's float32
    tanh is ~1.6x its exp on AVX2). exp overflows to inf for very negative x (the caller
    ignores it), giving x / inf = -0, as the reference's 0.5 x (1 - 1)."""
    e = np.multiply(x, x, out=out if scratch is None else scratch)  # e = -2u = -2 sqrt(2/pi) (x + 0.044715 x^3)
    e *= -2 * GELU_SCALE * 0.044715
    e -= 2 * GELU_SCALE
    e *= x
    np.exp(e, out=e)
    e += 1.0
    return np.divide(x, e, out=out)


def gelu_slope_block(x, out, slope):
    """GELU of x into `out`, as `gelu_block` computes it, and its derivative into `slope`.
    With s = sigmoid(2u) = (1 + tanh u) / 2 = 1 / (1 + exp(-2u)) (the same exp), the
    reference's 0.5 (1 + t) + 0.5 x (1 - t^2) du/dx is s + 2 x s (1 - s) du/dx, and x s is
    GELU. exp overflows for very negative x (the caller ignores it): s = 0, out = -0,
    slope = 0."""
    x2 = np.multiply(x, x, out=slope)
    e = np.multiply(x2, -2 * GELU_SCALE * 0.044715, out=out)  # -2u = -2 sqrt(2/pi) (x + 0.044715 x^3)
    e -= 2 * GELU_SCALE
    e *= x
    np.exp(e, out=e)
    e += 1.0
    s = np.divide(1.0, e)  # sigmoid(2u)
    np.divide(x, e, out=out)  # GELU = x s
    rest = np.subtract(1.0, s)  # 1 - s, then x s (1 - s)
    rest *= out
    twice = x2  # 2 du/dx = 2 sqrt(2/pi) (1 + 3 * 0.044715 x^2), over x^2
    twice *= 2 * 3 * 0.044715 * GELU_SCALE
    twice += 2 * GELU_SCALE
    twice *= rest
    twice += s
    return slope


def gelu_backward(dout, cache):
    """dout (N, 4C) -> dx (N, 4C): dout times the forward's slope, written over the slope
    (the cache is read once: no second (N, 4C) array at the backward's peak), or from the
    input (recomputing the tanh) when the forward kept that."""
    if isinstance(cache, Slope):
        dx = cache.values

        def product(r0, r1):
            np.multiply(dout[r0:r1], dx[r0:r1], out=dx[r0:r1])

        parallel_rows(product, dout.shape[0], dout.shape[1])
        return dx
    x, dx = cache, np.empty_like(dout)
    over_row_blocks(lambda r0, r1: gelu_grad_block(dout[r0:r1], x[r0:r1], dx[r0:r1]), x.shape[0], x.shape[1],
                    overflow="ignore")  # fmt: skip
    return dx


def gelu_grad_block(dout, x, dx):
    """With s = sigmoid(2u) = (1 + tanh u) / 2 (one exp, as in the forward), the reference's
    0.5 (1 + t) + 0.5 x (1 - t^2) du/dx is s + 2 x s (1 - s) du/dx, built in `dx` (exp
    overflows for very negative x: the caller ignores it)."""
    x2 = x * x  # the rest is built in place: each temporary costs a pass
    e = (-2 * GELU_SCALE * 0.044715) * x2
    e -= 2 * GELU_SCALE
    e *= x  # -2u
    np.exp(e, out=e)
    e += 1.0
    s = np.divide(1.0, e, out=e)  # sigmoid(2u); 0 where exp overflowed
    du = x2  # x2 is not needed again
    du *= 3 * 0.044715 * GELU_SCALE
    du += GELU_SCALE  # du/dx
    np.subtract(1.0, s, out=dx)
    dx *= s
    dx *= du
    dx *= x
    dx *= 2.0  # 2 x s (1 - s) du/dx
    dx += s
    dx *= dout
    return dx


# -- attention over query blocks, heads split among the threads ----------------------------
def attention_forward(q, k, v, dropout=None, segments=None):
    """The reference's attention over blocks of queries, each block against only the keys
    s < S - T + t1 its last query can see. Each thread takes a range of the B * NH heads
    through every block (one hand-off per call; with dropout, block by block, as each
    block's mask is drawn between its two halves), its matmuls and softmax, with BLAS on
    one thread meanwhile: per-head matmuls are too small to split again. Blocks are of
    QUERY_BLOCK queries, or, when all heads' scores of a SMALL_QUERY_BLOCK block fit in
    BATCHED_ATTENTION (few heads of short rows), of SMALL_QUERY_BLOCK or fewer queries
    with all heads at once: fewer calls, and less of the masked triangle computed. Else
    a block's heads go in groups of one batch row whose scores fit in HEAD_GROUP (`head_groups`):
    stacked products, each call's work shared by the group, its scores in cache. A
    training piece (`backward_follows`) whose scores, all heads and queries, fit in
    TRAIN_ATTENTION (a small model's) runs one block of all heads: a few calls per
    step instead of a few per block, for the masked triangle's exps.
    y is a view of a (B, T, NH, hs) array: the heads side by side, as the model reads them.
    Where no score can overflow exp (a head's bound from the lengths of its queries and
    keys, `bounded_heads`, or else `exp_is_safe`), the softmax skips the row maxima.
    In a piece of `over_batch` (`inference`, no dropout) each thread builds every block's
    probabilities in one scratch, reused block after block, and the cache is None; there,
    on one thread with all heads at once and no segments, `attention_inference` runs it."""
    B, NH, T, hs = q.shape
    H, S = B * NH, k.shape[2]
    y = np.empty((B, T, NH, hs), dtype=q.dtype).transpose(0, 2, 1, 3)  # (B, NH, T, hs)
    if T == 1 and dropout is None and segments is None:  # decoding: one query sees every key
        return one_query_attention(q, k, v, y)
    qs = np.multiply(q, 1.0 / math.sqrt(hs), out=np.empty((B, NH, T, hs), dtype=q.dtype))  # scaled once, rows contiguous
    fits = BATCHED_ATTENTION // max(H * S, 1)  # queries per block whose scores fit, all heads at once
    together = fits >= max(1, SMALL_QUERY_BLOCK // 2)  # all heads at once, in blocks of up to SMALL_QUERY_BLOCK
    step = min(SMALL_QUERY_BLOCK, fits) if together else QUERY_BLOCK
    at_once = BATCHED_ATTENTION  # scores up to which a block's heads go all at once
    if backward_follows() and H * T * S <= TRAIN_ATTENTION:  # a small training piece: one block, all heads
        step, at_once = T, TRAIN_ATTENTION
    scratch = dropout is None and inference()  # no backward: each thread's blocks share one scratch
    if scratch and together and segments is None and free_threads() == 1:
        return attention_inference(qs, k, v, y, step), None
    safe = bounded_heads(qs, k)  # (H,)
    k, v = head_rows(k), head_rows(v)
    qh, kh, vh = qs.reshape(H, T, hs), k.reshape(H, S, hs), v.reshape(H, S, hs)  # heads as one axis
    blocks = []  # (t0, t1, s1, att (H, Tb, s1) or None with scratch, future, other) per block of queries
    for t0 in range(0, T, step):
        t1 = min(t0 + step, T)
        Tb, s1 = t1 - t0, S - T + t1  # keys visible to the block's last query
        future = future_keys(Tb) if Tb > 1 else None  # (Tb, Tb): key after query
        other = None if segments is None else segments[:, t0:t1, None] != segments[:, None, :s1]  # (B, Tb, s1)
        blocks.append((t0, t1, s1, None if scratch else np.empty((H, Tb, s1), dtype=q.dtype), future, other))

    def probs(block, att, h0, h1):  # heads [h0, h1) of a block: scores, then probabilities in att (h1 - h0, Tb, s1)
        t0, t1, s1, _, future, other = block
        for at in head_groups(H, t1 - t0, s1, h0, h1, NH, at_once=at_once):
            a = np.matmul(qh[at, t0:t1], kh[at, :s1].mT, out=att[at.start - h0 : at.stop - h0])  # (h, Tb, s1), scores
            if other is None:
                mask = None
            elif at.stop - at.start == H:  # all heads: (B, 1, Tb, s1) against (B, NH, Tb, s1)
                a, mask = a.reshape(B, NH, t1 - t0, s1), other[:, None]
            else:  # heads of one row
                mask = other[at.start // NH]
            masked_softmax(a, future, mask, bool(np.all(safe[at])))

    def values(block, dropped, h0, h1):  # heads [h0, h1) of a block: y = dropped probabilities (h1 - h0, Tb, s1) @ v
        t0, t1, s1 = block[:3]
        for at in head_groups(H, t1 - t0, s1, h0, h1, NH, at_once=at_once):
            if at.stop - at.start == H:  # all heads
                np.matmul(dropped.reshape(B, NH, t1 - t0, s1), v[:, :, :s1], out=y[:, :, t0:t1])
            else:  # heads of one row
                b, n0 = divmod(at.start, NH)
                np.matmul(dropped[at.start - h0 : at.stop - h0], vh[at, :s1], out=y[b, n0 : n0 + at.stop - at.start, t0:t1])

    sizes = [(t1 - t0) * s1 for t0, t1, s1, *_ in blocks]  # probabilities per head of each block
    work = sum(sizes) * hs  # multiply-adds per head
    if dropout is None:  # each thread takes its heads through every block: one hand-off per call
        def heads(h0, h1):
            buffer = np.empty((h1 - h0) * max(sizes), dtype=q.dtype) if scratch else None
            for block, size in zip(blocks, sizes):
                t0, t1, s1, att = block[:4]
                att = att[h0:h1] if buffer is None else buffer[: (h1 - h0) * size].reshape(h1 - h0, t1 - t0, s1)
                probs(block, att, h0, h1)
                values(block, att, h0, h1)

        parallel_rows(heads, H, work, one_blas_thread=True)
        return y, None if scratch else (qs, k, v, [(t0, t1, s1, att, None) for t0, t1, s1, att, _, _ in blocks])
    cache_blocks = []
    for block, size in zip(blocks, sizes):  # dropout draws each block's mask in order, between the two halves
        t0, t1, s1, att = block[:4]
        head_work = size * hs  # multiply-adds per head
        parallel_rows(lambda h0, h1, block=block, att=att: probs(block, att[h0:h1], h0, h1), H, head_work,
                      one_blas_thread=True)  # fmt: skip
        dropped, mask = dropout(att.reshape(B, NH, t1 - t0, s1), t0)
        dropped = dropped.reshape(H, t1 - t0, s1)
        parallel_rows(lambda h0, h1, block=block, dropped=dropped: values(block, dropped[h0:h1], h0, h1), H, head_work,
                      one_blas_thread=True)  # fmt: skip
        cache_blocks.append((t0, t1, s1, att, mask))
    return y, (qs, k, v, cache_blocks)


def attention_inference(qs, k, v, y, step: int):
    """attention_forward's output y (B, NH, T, hs) in a piece of `over_batch` on one thread,
    all heads at once (their scores of a block of `step` queries fit in BATCHED_ATTENTION),
    no segments: the queries scaled (qs, contiguous), k and v read where the model's views
    lie (the products take their strided rows: no copies), each block's probabilities in
    one scratch. Whether a block's softmax may skip its row maxima is `exp_is_safe`'s two
    reductions over its scores (for rows this short, cheaper than `bounded_heads`' pass)."""
    B, NH, T, hs = qs.shape
    S = k.shape[2]
    buffer = np.empty(B * NH * step * S, dtype=qs.dtype)
    for t0 in range(0, T, step):
        t1 = min(t0 + step, T)
        Tb, s1 = t1 - t0, S - T + t1  # keys visible to the block's last query
        a = np.matmul(qs[:, :, t0:t1], k[:, :, :s1].mT, out=buffer[: B * NH * Tb * s1].reshape(B, NH, Tb, s1))
        masked_softmax(a, future_keys(Tb) if Tb > 1 else None, None)
        np.matmul(a, v[:, :, :s1], out=y[:, :, t0:t1])
    return y


def head_groups(H: int, Tb: int, s1: int, h0: int, h1: int, NH: int, rows: bool = True, at_once: int | None = None) -> list[slice]:
    """Heads [h0, h1) of H, with Tb x s1 scores each in a block, in groups taken together:
    all H at once when their scores fit in `at_once` (None: BATCHED_ATTENTION) and [h0, h1)
    is all, else as many as fit in HEAD_GROUP (at least one), within one batch row of NH
    heads when `rows`."""
    if h1 - h0 == H and H * Tb * s1 <= (BATCHED_ATTENTION if at_once is None else at_once):
        return [slice(0, H)]
    per = max(1, HEAD_GROUP // max(Tb * s1, 1))
    groups, h = [], h0
    while h < h1:
        end = min(h1, h + per, (h // NH + 1) * NH if rows else h1)
        groups.append(slice(h, end))
        h = end
    return groups


def one_query_attention(q, k, v, y):
    """Decoding's attention, q (B, NH, 1, hs) against every key, into y: two stacked
    products and a softmax whose row maxima are one reduction (the whole-array checks
    of `exp_is_safe` would be two). In a piece of `over_batch` the cache is None."""
    qs = q * (1.0 / math.sqrt(q.shape[-1]))  # (B, NH, 1, hs), scaled as the backward's cache holds it
    att = np.matmul(qs, k.mT)  # (B, NH, 1, S)
    if (compiled := loops(att)) is not None:
        compiled.causal_softmax_(att.reshape(-1, 1, att.shape[-1]))  # one query: every key seen
    else:
        att -= np.maximum.reduce(att, axis=-1, keepdims=True)  # ufunc reductions: no Python wrapper (np.max, ndarray.max) per call
        np.exp(att, out=att)
        att /= np.add.reduce(att, axis=-1, keepdims=True)
    np.matmul(att, v, out=y)
    if inference():  # a decode step: no backward follows
        return y, None
    B, NH, _, S = att.shape
    return y, (qs, k, v, [(0, 1, S, att.reshape(B * NH, 1, S), None)])


@functools.lru_cache(maxsize=64)
def future_keys(Tb: int) -> np.ndarray:
    """(Tb, Tb) booleans, read-only: True where the key comes after the query."""
    future = np.triu(np.ones((Tb, Tb), dtype=bool), 1)
    future.flags.writeable = False
    return future


@functools.lru_cache(maxsize=128)
def seen_keys(Tb: int, dtype) -> np.ndarray:
    """(Tb, Tb) of 1 where the key is at or before the query, else 0, read-only."""
    seen = np.tril(np.ones((Tb, Tb), dtype=dtype))
    seen.flags.writeable = False
    return seen


def ones(n: int, dtype) -> np.ndarray:
    """A read-only vector of n ones: x @ ones(n) sums x's rows by BLAS."""
    return filled(n, 1, dtype)


@functools.lru_cache(maxsize=64)
def filled(n: int, value, dtype) -> np.ndarray:
    """A read-only vector of n `value`s."""
    vector = np.full(n, value, dtype=dtype)
    vector.flags.writeable = False
    return vector


@functools.lru_cache(maxsize=64)
def averaging(n: int, dtype) -> np.ndarray:
    """A read-only vector of n values 1/n: x @ averaging(n) averages x's rows by BLAS."""
    vector = np.full(n, 1.0 / n, dtype=dtype)
    vector.flags.writeable = False
    return vector


def head_rows(a):
    """a (B, NH, S, hs) with each head's rows contiguous: a copy of the strided views the
    model cuts out of the fused q, k, v projection (a KV cache's views are kept), so the
    products read whole cache lines."""
    row = a.shape[-1] * a.itemsize
    if a.strides[-1] == a.itemsize and (a.shape[-2] <= 1 or a.strides[-2] == row):
        return a
    return np.ascontiguousarray(a)


@functools.lru_cache(maxsize=256)
def exp_limit(row_length: int, dtype) -> float:
    """The largest |score| whose exp, unshifted, and a row sum of `row_length` of them stay
    finite and normal: -log(tiny) - log(row length) - 1, 81 for float32 rows of 128."""
    return -math.log(np.finfo(dtype).tiny) - math.log(max(row_length, 1)) - 1.0


def exp_is_safe(scores) -> bool:
    """Whether every score is within +-`exp_limit` of its row length. Two whole-array
    reductions: much cheaper than a maximum per row (ufunc reductions: no Python wrapper
    of np.min, np.max per call)."""
    if scores.size == 0:
        return True
    limit = exp_limit(scores.shape[-1], scores.dtype)
    return bool(-limit <= np.minimum.reduce(scores, axis=None) and np.maximum.reduce(scores, axis=None) <= limit)  # NaN: False


def bounded_heads(qs, k):
    """(B * NH,) booleans: whether every score qs . k of the head is within `exp_limit` of S,
    by |qs . k| <= max |qs_t| max |k_s| (a pass over q and k instead of two over the scores)."""
    B, NH = qs.shape[:2]
    longest = np.sqrt(np.max(np.vecdot(qs, qs), axis=-1) * np.max(np.vecdot(k, k), axis=-1))  # (B, NH)
    return (longest <= exp_limit(k.shape[2], qs.dtype)).reshape(B * NH)  # NaN: False


def masked_softmax(a, future, other, safe=False):
    """Softmax over the last axis of scores a (..., Tb, s1), in place: `future` (Tb, Tb)
    masks keys after each query (the last Tb columns), `other` (broadcast to a) keys of
    other documents. Unless `safe` (no score can overflow exp) or `exp_is_safe`, each row's
    maximum is subtracted first (softmax is unchanged by the shift), the masked scores
    set to -inf before; else the future's exps are zeroed after exp, by a product. Row
    sums by a matrix-vector product. Without `other`, the compiled loop (`loops`) does it all
    in one pass per row, each row shifted by its maximum."""
    if other is None and (compiled := loops(a)) is not None:
        Tb = 1 if future is None else future.shape[0]  # no future: each row sees every key
        compiled.causal_softmax_(a.reshape(-1, Tb, a.shape[-1]))
        return
    shift = not (safe or exp_is_safe(a))
    if future is not None and shift:
        np.copyto(a[..., a.shape[-1] - future.shape[0] :], -np.inf, where=future)
    if other is not None:
        np.copyto(a, -np.inf, where=other)
    if shift:
        a -= np.max(a, axis=-1, keepdims=True)
    np.exp(a, out=a)
    if future is not None and not shift:
        a[..., a.shape[-1] - future.shape[0] :] *= seen_keys(future.shape[0], a.dtype)
    total = a @ ones(a.shape[-1], a.dtype)  # (..., Tb)
    a *= np.divide(1.0, total, out=total)[..., None]


def attention_backward(dy, cache):
    """dy (B, NH, T, hs) -> dq (B, NH, T, hs), dk, dv (B, NH, S, hs), block by block (the
    forward's, the last first: it sees every key, so it writes dk and dv and the others
    add), each thread taking a range of heads through every block (one hand-off per
    call), in the forward's groups of heads (`head_groups`, here across batch rows):
    stacked products, a group's scores in cache."""
    qs, k, v, blocks = cache  # qs: the queries scaled by 1 / sqrt(hs)
    B, NH, T, hs = qs.shape
    H, S = B * NH, k.shape[2]
    scale = 1.0 / math.sqrt(hs)
    dq = np.empty((H, T, hs), dtype=qs.dtype)
    dk, dv = np.empty((H, S, hs), dtype=k.dtype), np.empty((H, S, hs), dtype=v.dtype)
    # heads as one axis (H, ., hs): a copy where dy is the model's strided view (qs, k, v: the forward's)
    qs, k, v, dy = (head_rows(a).reshape(H, -1, hs) for a in (qs, k, v, dy))

    def block_heads(block, first, at):  # heads `at` (a slice) of a block, stacked: p (h, Tb, s1), dyb (h, Tb, hs)
        t0, t1, s1, att, mask = block
        p, dyb = att[at], dy[at, t0:t1]
        drop = None if mask is None else np.broadcast_to(mask, (B, NH, t1 - t0, s1)).reshape(H, t1 - t0, s1)[at]
        dropped = p if drop is None else p * drop
        if first:
            np.matmul(dropped.mT, dyb, out=dv[at, :s1])  # (h, s1, hs)
        else:
            dv[at, :s1] += dropped.mT @ dyb
        d = dyb @ v[at, :s1].mT  # (h, Tb, s1), d(dropped probabilities)
        if drop is not None:
            d *= drop
        d -= np.vecdot(d, p)[..., None]  # row sums of d * p, no product held
        d *= p  # d(scores) / scale, scale = 1 / sqrt(hs): dk from the scaled queries, dq scaled after
        dqb = np.matmul(d, k[at, :s1], out=dq[at, t0:t1])
        dqb *= scale
        if first:
            np.matmul(d.mT, qs[at, t0:t1], out=dk[at, :s1])
        else:
            dk[at, :s1] += d.mT @ qs[at, t0:t1]

    def heads(h0, h1):  # a thread's heads through every block, the last first: their dk, dv rows are its own
        for i, block in enumerate(reversed(blocks)):
            for at in head_groups(H, block[1] - block[0], block[2], h0, h1, NH, rows=False):
                block_heads(block, i == 0, at)

    parallel_rows(heads, H, sum(block[3].size for block in blocks) // H * hs, one_blas_thread=True)
    return dq.reshape(B, NH, T, hs), dk.reshape(B, NH, S, hs), dv.reshape(B, NH, S, hs)


# -- embeddings ---------------------------------------------------------------------------------
def embedding_forward(wte, wpe, ids, pos):
    """`layers.embedding_forward`; a column-major wte (a decoding model's, see
    `npgpt.generate.decoding_layout`) is gathered as columns of its (C, V) transpose: NumPy's
    take of rows of a column-major array took ~0.15 s for GPT-2's wte, even for one id."""
    if not wte.flags.f_contiguous or wte.flags.c_contiguous or wte.dtype != wpe.dtype:
        return layers.embedding_forward(wte, wpe, ids, pos)
    B, T = ids.shape
    x = np.take(wpe, pos.reshape(-1), axis=0)  # (N, C)
    x += np.take(wte.T, ids.reshape(-1), axis=1).T
    return x.reshape(B, T, wte.shape[1]), (ids, pos)


def embedding_backward(dx, cache, dwte, wpe_shape, backend):
    """The reference's gradients; the token rows summed per id by sorting (`add_rows`)
    instead of a scatter-add row by row; when every row holds positions start..start+T-1
    (no segments), dwpe is one sum over the batch instead of a scatter-add of B*T rows."""
    ids, pos = cache
    B, T, C = dx.shape
    rows = dx.reshape(B * T, C)
    dwte = add_rows(dwte, ids.reshape(-1), rows)
    dwpe = np.zeros(wpe_shape, dtype=dx.dtype)
    start = int(pos[0, 0])
    if np.array_equal(pos, np.broadcast_to(np.arange(start, start + T), (B, T))):
        dwpe[start : start + T, :] = np.sum(dx, axis=0)
    else:
        np.add.at(dwpe, pos.reshape(-1), rows)
    return dwte, dwpe


def add_rows(target, ids, rows):
    """target[ids[n]] += rows[n] for every n, repeated ids summed, in place: the rows sorted
    by id (a stable sort keeps each id's rows in order), each id's run summed by one
    reduceat, the sums added to their (distinct) target rows at once. Returns target."""
    if ids.size == 0:
        return target
    order = np.argsort(ids, kind="stable")
    ranked = ids[order]
    starts = np.flatnonzero(np.concatenate(([True], ranked[1:] != ranked[:-1])))
    target[ranked[starts]] += np.add.reduceat(rows[order], starts, axis=0)
    return target


# -- cross-entropy, in the logits' own buffer, over row ranges ---------------------------------
def scored_rows(targets, ignore_index, dtype):
    """(safe (N,): the targets with ignored rows reading class 0, weight (N,): 1 / the
    scored count for a scored row, 0 for an ignored one): the loss is sum(weight * row loss)."""
    valid = targets != ignore_index
    return np.where(valid, targets, 0), valid.astype(dtype) / max(int(np.count_nonzero(valid)), 1)


def cross_entropy_forward(logits, targets, ignore_index=layers.IGNORE_INDEX):
    """The reference's loss by log-sum-exp, log(sum exp(z - m)) + m - target logit, m each
    row's maximum (or 0, below); the logits are overwritten with their unnormalised probabilities exp(z - m),
    which the backward divides by their row totals (kept in the cache): a loss alone makes
    no normalising pass. A thread's rows take their target logits in one gather, then
    four calls per block (row maxima, shift, exp, row sums); where no logit of a block can
    overflow exp (`exp_is_safe`'s two reductions), the shift is 0 and the block skips the
    row maxima and the shift (the loss and the probabilities are unchanged by it). The
    compiled loop (`loops`), where there is one, makes the exps and sums in one pass per row."""
    N, V = logits.shape
    safe, weight = scored_rows(targets, ignore_index, logits.dtype)
    row_loss = np.empty(N, dtype=logits.dtype)  # log(sum exp(z - max z)) + max z - target logit, per row
    total = np.empty(N, dtype=logits.dtype)  # sum exp(z - max z), per row
    top = np.empty(N, dtype=logits.dtype)  # max z, per row
    block = max(1, CE_BLOCK // max(V, 1))  # rows whose passes stay in cache
    every = ones(V, logits.dtype)
    compiled = loops(logits)

    def rows(a, b):
        target_logit = logits[np.arange(a, b), safe[a:b]]  # (b - a,), taken before the logits are overwritten
        if compiled is not None:  # one pass per row, each row shifted by its maximum
            compiled.exps_and_sums_(logits[a:b], top[a:b], total[a:b])
        else:
            for r0 in range(a, b, block):
                r1 = min(r0 + block, b)
                z = logits[r0:r1]
                if exp_is_safe(z):  # no shift: exp(z) and their row sums stay finite and normal
                    top[r0:r1] = 0.0
                else:
                    z -= np.max(z, axis=-1, out=top[r0:r1])[:, None]
                np.exp(z, out=z)  # unnormalised probabilities
                np.matmul(z, every, out=total[r0:r1])
        np.subtract(top[a:b], target_logit, out=row_loss[a:b])
        row_loss[a:b] += np.log(total[a:b])

    parallel_rows(rows, N, V, align=block, one_blas_thread=True)  # the row sums: matrix-vector products
    return np.asarray(np.sum(weight * row_loss)), (logits, total, safe, weight)


def cross_entropy_backward(dloss, cache):
    """dlogits = dloss * weight * (probs - one_hot), probs = exps / total, written into the
    exps."""
    exps, total, safe, weight = cache
    scale = weight * dloss  # (N,)
    dlogits = exps  # the exps are not needed again: scaled in place

    def rows(r0, r1):
        dlogits[r0:r1] *= (scale[r0:r1] / total[r0:r1])[:, None]
        dlogits[np.arange(r0, r1), safe[r0:r1]] -= scale[r0:r1]  # one target per row

    parallel_rows(rows, exps.shape[0], exps.shape[1])
    return dlogits


# -- the tied LM head's loss: the logits a tile at a time -----------------------------------------
def lm_head_loss_forward(x, wte, targets, ignore_index=layers.IGNORE_INDEX):
    """The reference's loss, the logits x @ wte^T made and consumed a tile of the vocabulary
    at a time (all N rows by a block of columns, `vocab_block`): each tile's product, row
    maxima, exps and row sums while it is in cache. The tiles' exps (one buffer of the logits'
    size) are kept for the backward, each with its own row maxima; the loss needs only
    their sums. Blocks are shared among the threads, each product on one BLAS thread (one
    tile or a few too: OpenBLAS's pool, once woken, spins for a while after a call, taking a
    core from the training pieces that follow). The compiled loop (`loops`), where there is
    one, makes a tile's maxima, exps and sums in one pass per row."""
    N, V = x.shape[0], wte.shape[0]
    safe, weight = scored_rows(targets, ignore_index, np.result_type(x, wte))
    width = vocab_block(N)
    starts = range(0, V, width)
    targets_in = target_cells(safe, width, len(starts))
    buffer = np.empty(N * V, dtype=np.result_type(x, wte))  # the tiles, one after another: the logits' size
    exps = [buffer[N * v0 : N * min(v0 + width, V)].reshape(N, -1) for v0 in starts]  # (N, Vb) each
    block_max = np.empty((len(starts), N), dtype=buffer.dtype)  # each tile's row maxima
    block_sum = np.empty_like(block_max)  # ... and its row sums of exp(z - block max)
    target_logit = np.empty(N, dtype=block_max.dtype)
    compiled = loops(buffer)

    def tiles(i0, i1):
        for i in range(i0, i1):
            v0, z = starts[i], exps[i]
            np.matmul(x, wte[v0 : v0 + width].mT, out=z)  # (N, Vb) logits
            rows, columns = targets_in[i]
            target_logit[rows] = z[rows, columns]  # each row's target sits in one block
            if compiled is not None:  # the same in one pass per row
                compiled.exps_and_sums_(z, block_max[i], block_sum[i])
                continue
            z -= np.max(z, axis=-1, out=block_max[i])[:, None]
            np.exp(z, out=z)
            np.matmul(z, ones(z.shape[1], z.dtype), out=block_sum[i])

    with blas_on_one_thread():  # also where the tiles stay on this thread: a spinning BLAS pool would take a core
        parallel_rows(tiles, len(starts), N * width * x.shape[1] // GEMM_PER_ELEMENT, one_blas_thread=True)
    top = np.max(block_max, axis=0)  # (N,) row maxima of the logits
    to_probs = np.exp(block_max - top)  # (nb, N): a tile's exps -> exp(z - top)
    total = np.einsum("bn,bn->n", block_sum, to_probs)  # (N,) sum exp(z - top)
    to_probs /= total  # ... -> probabilities
    loss = np.sum(weight * (top + np.log(total) - target_logit))
    return np.asarray(loss), (x, wte, exps, to_probs, weight, targets_in, width)


def lm_head_loss_backward(dloss, cache):
    """dx, dwte of the loss, a tile at a time: its exps scaled into dlogits = dloss * weight
    * (probs - one_hot) in place, then at once dwte's rows of the block and the tile's share
    of dx (summed over the tiles in order, a thread's own tiles first)."""
    x, wte, exps, to_probs, weight, targets_in, width = cache
    N, C = x.shape
    scale = weight * dloss  # (N,)
    to_dlogits = to_probs * scale  # (nb, N)
    dwte = np.empty(wte.shape, dtype=np.result_type(x, wte))

    def tiles(i0, i1):
        dx, share = np.empty((N, C), dtype=dwte.dtype), np.empty((N, C), dtype=dwte.dtype)
        for i in range(i0, i1):
            v0, d = i * width, exps[i]
            d *= to_dlogits[i][:, None]  # (N, Vb), probabilities * scale
            rows, columns = targets_in[i]
            d[rows, columns] -= scale[rows]
            np.matmul(d.mT, x, out=dwte[v0 : v0 + d.shape[1]])
            if i == i0:
                np.matmul(d, wte[v0 : v0 + d.shape[1]], out=dx)
            else:
                dx += np.matmul(d, wte[v0 : v0 + d.shape[1]], out=share)
        return dx

    with blas_on_one_thread():  # as in the forward
        parts = parallel_rows(tiles, len(exps), N * width * C // GEMM_PER_ELEMENT, one_blas_thread=True)
    dx = parts[0]
    for part in parts[1:]:
        dx += part
    return dx, dwte


def vocab_block(N: int) -> int:
    """Columns per tile of the LM head's loss for N rows: about LM_TILE logits, a multiple
    of VOCAB_ALIGN."""
    return max(VOCAB_ALIGN, LM_TILE // max(N, 1) // VOCAB_ALIGN * VOCAB_ALIGN)


def target_cells(targets, width: int, n_blocks: int) -> list:
    """For each block of `width` vocabulary columns, (rows, columns within the block) of
    the targets (N,) that fall in it."""
    block = targets // width
    order = np.argsort(block, kind="stable")
    edges = np.searchsorted(block[order], np.arange(n_blocks + 1))
    return [(order[a:b], targets[order[a:b]] - i * width) for i, (a, b) in enumerate(zip(edges[:-1], edges[1:]))]


# -- decoding: one cached position in one compiled call -----------------------------------------
STEP_WEIGHTS = ("attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj")  # the four products of a block, in order
STEP_VECTORS = ("ln_1.weight", "ln_1.bias", "attn.c_attn.bias", "attn.c_proj.bias", "ln_2.weight", "ln_2.bias",
                "mlp.c_fc.bias", "mlp.c_proj.bias")  # fmt: skip


def decode_step(params, config, ids, cache):
    """The logits (1, V) of token ids (1, 1) at position cache.length, in one call of
    `npgpt.kernels.compiled_step` on the threads (its keys and values written into the
    cache), or None (the model then runs the step op by op): without numba, for batches or
    several positions, for other dtypes or layouts than float32 parameters whose weights of
    each kind are all row-major or all column-major, and if the threads gave up waiting for
    each other (a warning says so)."""
    step = compiled_step() if ids.shape == (1, 1) and cache.batch_size == 1 else None
    if step is None or not (cache.keys.dtype == np.float32 and cache.keys.flags.c_contiguous):
        return None
    C, V, nt, token = config.n_embd, config.vocab_size, free_threads(), int(ids[0, 0])
    if not 0 <= token < V:  # (the model checks host ids; the step reads wte's row unchecked)
        return None
    arrays, kept = tuple(params.values()), cache.kernel_state  # a step's lookups and checks took ~0.1 ms: once a sequence
    if kept is None or len(kept[0]) != len(arrays) or not all(a is b for a, b in zip(arrays, kept[0])):
        kept = cache.kernel_state = (arrays, step_parameters(params, config.n_layer), {})
    parameters, scratch = kept[1:]
    if parameters is None:
        return None
    v, held, transposed, (wte, wte_transposed) = parameters
    if nt not in scratch:  # the threads' working arrays, kept for the sequence: own, shared, partial, scores
        scratch[nt] = (np.empty((nt, 2, C), dtype=np.float32), np.empty(9 * C, dtype=np.float32),
                       np.empty((nt, max(4 * C, 0 if wte_transposed else V)), dtype=np.float32),
                       np.empty((nt, config.n_ctx), dtype=np.float32))  # fmt: skip
    own, shared, partial, scores = scratch[nt]
    flags, logits = step.new_flags(nt), np.empty((1, V), dtype=np.float32)  # (the caller keeps the logits)

    def thread(tid):
        return step.step(tid, nt, flags, token, cache.length, np.float32(config.layer_norm_epsilon), wte, wte_transposed,
                         params["wpe.weight"], v["ln_1.weight"], v["ln_1.bias"], held[0], v["attn.c_attn.bias"], held[1],
                         v["attn.c_proj.bias"], v["ln_2.weight"], v["ln_2.bias"], held[2], v["mlp.c_fc.bias"], held[3],
                         v["mlp.c_proj.bias"], transposed, params["ln_f.weight"], params["ln_f.bias"],
                         filled(V, 0, np.float32), cache.keys, cache.values, logits[0], own, shared, partial, scores[tid])  # fmt: skip

    return logits if together(step, thread, nt, flags, "the step runs op by op") else None


def step_parameters(params, L: int):
    """(vectors, held, transposed, (wte, wte_transposed)) for `compiled_step.step`, or None
    where a parameter is not float32 or a kind of weight mixes layouts: vectors[name] the
    tuple of the L blocks' STEP_VECTORS `name`; per kind of STEP_WEIGHTS the tuple of its L
    weights as C-contiguous arrays, w (Cin, Cout) where row-major or w.T where column-major
    (transposed True); the LM head's weight wte^T likewise."""
    if any(value.dtype != np.float32 for value in params.values()):
        return None
    vectors = {name: tuple(params[f"h.{i}.{name}"] for i in range(L)) for name in STEP_VECTORS}
    if not all(v.flags.c_contiguous for vs in vectors.values() for v in vs):
        return None
    if not all(params[name].flags.c_contiguous for name in ("wpe.weight", "ln_f.weight", "ln_f.bias")):
        return None
    held, transposed = [], []
    for kind in STEP_WEIGHTS + ("wte",):
        ws = [params[f"h.{i}.{kind}.weight"] for i in range(L)] if kind != "wte" else [params["wte.weight"].T]  # (Cin, Cout)
        if all(w.flags.c_contiguous for w in ws):
            column_major = False
        elif all(w.flags.f_contiguous for w in ws):
            column_major = True
        else:
            return None
        held.append(tuple(w.T if column_major else w for w in ws))
        transposed.append(column_major)
    return vectors, tuple(held[:4]), tuple(transposed[:4]), (held[4][0], transposed[4])


# -- inference: a batch in pieces, one per thread at a time -------------------------------------
def over_batch(fn, B, T):
    """fn over pieces of about BATCH_ROWS positions (whole rows), at least one per thread
    when B allows, taken by the threads as they come free: each piece runs its kernels on
    its own thread, BLAS included, with no hand-over between threads inside a forward.
    Nested (a piece of an outer `over_batch`, as eval's): pieces of BATCH_ROWS, on its thread.
    Each piece runs `as_piece("inference")`: its kernels keep no cache for a backward.
    A Ctrl-C takes effect when the batch is done (`threads.interrupt_after`), so it never
    lands inside numba loading a kernel (a lock left held, or an exception inside
    llvmlite's C callbacks: lost, or a crash)."""
    per = max(1, min(BATCH_ROWS // max(T, 1), B // free_threads()))
    pieces = [(b0, min(b0 + per, B)) for b0 in range(0, B, per)]
    piece = run_as_piece("inference", fn)
    with threads.interrupt_after():
        if len(pieces) == 1:
            return [piece(0, B)]  # one piece: its kernels split their own passes
        return parallel_items(lambda i: piece(*pieces[i]), len(pieces))


# -- training: a batch in one piece per thread -------------------------------------------------
def over_train_batch(fn, B, T):
    """fn over one piece of whole rows per thread (at least TRAIN_PIECE positions each),
    run at once: each piece's forward, or its backward, runs its kernels on its own thread,
    BLAS included, so a step hands work between threads twice (around the whole batch's LM
    head), not in every kernel. Its price: a set of gradients per extra piece, summed by
    the caller. The same (B, T) and thread count give the same pieces. With fewer rows than
    threads the batch runs whole, its kernels sharing out their own passes (pieces of a
    row or so would leave threads idle). Each piece runs as a "training" piece (`backward_follows`)."""
    piece = run_as_piece("training", fn)
    if B < num_threads():
        return [piece(0, B)]
    return parallel_rows(piece, B, T * (MIN_ELEMENTS // TRAIN_PIECE), one_blas_thread=True)


# -- parameters: the optimizer's work and the pieces' gradient sum, a parameter a thread -------
def over_parameters(fn, sizes) -> list:
    """[fn(0), ..., fn(n - 1)], the parameters (of `sizes` elements) taken by the threads
    largest first, each thread the next when it finishes one (`parallel_items`): one
    hand-off for a whole step's updates instead of one per parameter, and no parameter's
    passes split (each fn's kernels run on its thread). On one thread, or for less than
    PARAMETER_ELEMENTS in all (a small model's step: its many tiny calls hold the GIL, so
    a second thread only waits), in order on the calling thread."""
    n = len(sizes)
    if free_threads() == 1 or n < 2 or sum(sizes) < PARAMETER_ELEMENTS:
        return each_parameter(fn, sizes)
    order = sorted(range(n), key=lambda i: -sizes[i])
    results: list = [None] * n

    def item(j):
        results[order[j]] = fn(order[j])

    parallel_items(item, n)
    return results


# -- the optimizer: AdamW and the gradient norm, in cache-sized blocks over row ranges ---------
def adamw_update(p, g, m, v, lr, weight_decay, beta1, beta2, step, eps, grad_scale=None):
    """`npgpt.optim.adamw_update`, one sweep over FLAT_BLOCK-element blocks of the flat
    parameter, each block's ~10 passes in cache (p, m, v updated in place; grad_scale
    folded into the moments' factors); a parameter of one block directly (its ~14 calls
    are most of its time)."""
    if not (p.flags.c_contiguous and m.flags.c_contiguous and v.flags.c_contiguous):  # no flat view to update in place
        return optim.adamw_update(p, g, m, v, lr, weight_decay, beta1, beta2, step, eps, grad_scale)
    pf, gf, mf, vf = p.reshape(-1), g.reshape(-1), m.reshape(-1), v.reshape(-1)  # views (g: a copy if strided)
    scale = 1.0 if grad_scale is None else np.asarray(grad_scale, dtype=pf.dtype)
    sqrt_bc2 = math.sqrt(1.0 - beta2**step)  # folded into eps and the step size: a pass fewer
    constants = (1.0 - lr * weight_decay if weight_decay else None, beta1, beta2, eps * sqrt_bc2,
                 lr / (1.0 - beta1**step) * sqrt_bc2, (1.0 - beta1) * scale, (1.0 - beta2) * scale * scale)  # fmt: skip
    if pf.size <= FLAT_BLOCK:
        adamw_block(pf, gf, mf, vf, np.empty_like(pf), *constants)
        return

    def run(b0, b1):
        scratch = np.empty(FLAT_BLOCK, dtype=pf.dtype)
        for e0 in range(b0 * FLAT_BLOCK, min(b1 * FLAT_BLOCK, pf.size), FLAT_BLOCK):
            e1 = min(e0 + FLAT_BLOCK, pf.size)
            adamw_block(pf[e0:e1], gf[e0:e1], mf[e0:e1], vf[e0:e1], scratch[: e1 - e0], *constants)

    parallel_rows(run, -(-pf.size // FLAT_BLOCK), FLAT_BLOCK)


def adamw_block(p, g, m, v, s, decay, beta1, beta2, eps_b, step_b, g_to_m, g2_to_v):
    """One AdamW step of flat pieces p, g, m, v (p, m, v in place), `s` a same-sized scratch;
    decay None: no weight decay. The moments take g_to_m * g and g2_to_v * g^2 ((1 - beta1)
    and (1 - beta2) times the gradient's scale and its square). With b = sqrt(1 - beta2^t),
    the reference's step_size * m / (sqrt(v) / b + eps) is step_b * m / (sqrt(v) + eps_b),
    eps_b = eps * b and step_b = step_size * b."""
    if decay is not None:
        p *= decay
    m *= beta1
    np.multiply(g, g_to_m, out=s)
    m += s
    v *= beta2
    np.multiply(g, g, out=s)
    s *= g2_to_v
    v += s
    np.sqrt(v, out=s)
    s += eps_b
    np.divide(m, s, out=s)
    s *= step_b
    p -= s


def sum_of_squares(g):
    """sum(g * g) as a 0-d array: BLAS dot products of DOT_BLOCK-element pieces (no g * g
    temporary; pieces this short stay on one BLAS thread), summed in float64."""
    flat = g.reshape(-1)
    n_blocks = -(-flat.size // DOT_BLOCK)

    def run(b0, b1):
        pieces = (flat[e0 : e0 + DOT_BLOCK] for e0 in range(b0 * DOT_BLOCK, min(b1 * DOT_BLOCK, flat.size), DOT_BLOCK))
        return math.fsum(float(np.dot(piece, piece)) for piece in pieces)

    return np.asarray(math.fsum(parallel_rows(run, n_blocks, DOT_BLOCK)), dtype=g.dtype)


KERNELS = REFERENCE.replace(
    "numpy-fast",
    linear_forward=linear_forward,
    linear_backward=linear_backward,
    layer_norm_forward=layer_norm_forward,
    layer_norm_backward=layer_norm_backward,
    gelu_forward=gelu_forward,
    gelu_backward=gelu_backward,
    attention_forward=attention_forward,
    attention_backward=attention_backward,
    embedding_forward=embedding_forward,
    embedding_backward=embedding_backward,
    cross_entropy_forward=cross_entropy_forward,
    cross_entropy_backward=cross_entropy_backward,
    lm_head_loss_forward=lm_head_loss_forward,
    lm_head_loss_backward=lm_head_loss_backward,
    over_batch=over_batch,
    over_train_batch=over_train_batch,
    over_parameters=over_parameters,
    decode_step=decode_step,
    adamw_update=adamw_update,
    sum_of_squares=sum_of_squares,
)
