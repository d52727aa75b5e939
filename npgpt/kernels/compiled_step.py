"""One cached decoding step of GPT-2, from the token to its logits, compiled whole (`npgpt[numba]`).

A decode step reads each weight once for one token, so its time is memory bandwidth plus,
op by op, ~50 small calls a step (LayerNorm, GELU, attention over the cache, bias and
residual adds, the model's Python), each starting cache-cold after a product has streamed
megabytes: ~3 ms of a 2-thread GPT-2 124M step of ~20 ms (session 10's profile). Here the
threads run the whole step (the embedding, every block, the final LayerNorm and the LM
head) in one call and meet at spin barriers instead:
- a product y = x @ W + b splits W's rows among the threads, each streaming a contiguous
  range: with W held (Cin, Cout), each thread sums its rows' share into its own partial
  (then each adds up its range of outputs); held transposed (Cout, Cin) (the column-major
  weights of `npgpt.generate.decoding_layout`), each thread computes its outputs whole, as
  dot products;
- attention splits the heads among the threads, each writing its heads' key and value into
  the cache and reading the cache's rows in place;
- LayerNorm, GELU and the residual adds run on the values while they are in cache; each
  thread keeps its own copy of the residual stream (the same numbers on every thread), so
  LayerNorm needs no barrier.
Every formula is the reference's (`npgpt.layers`), in float32, to round-off
(tests/test_compiled_step.py proves it against the reference model).

The threads wait for each other by spinning on counters (one per thread, each on its own
cache lines), yielding the core after a while; a thread that waits through GIVE_UP_YIELDS
yields gives up and the others with it, as they do when the calling thread sets the mark
(`give_up`) because it will not come: the step then reports failure and the model runs it
op by op instead (the cache's rows at this position are rewritten there).
"""

from __future__ import annotations

import math
import sys

import numba
import numpy as np
from llvmlite import ir
from numba.core import cgutils, types
from numba.core.extending import intrinsic

from npgpt.kernels.compiled import ELEMENTWISE, F32, REDUCING, gelu_, layer_norm_, shifted_exps_

LANE = 16  # int64s per thread's counter: 128 bytes, so no two threads' counters share a cache line
SPINS_BEFORE_YIELD = 1 << 14  # spins at a barrier before each further spin yields the core
GIVE_UP_YIELDS = 1 << 21  # ... and yields before the step gives up (~1-2 s on an idle core; longer where others run)
LINE = 16  # float32s per 64-byte cache line
ALIGN = 16  # output ranges start at multiples of 16 floats (64 bytes): no two threads write one line


@intrinsic
def load_acquire(typingctx, array, index):
    """array[index] (int64) read with acquire ordering: a load the compiler neither hoists
    out of a spin loop nor moves later loads above."""

    def codegen(context, builder, signature, args):
        ty = signature.args[0]
        pointer = cgutils.get_item_pointer(context, builder, ty, context.make_array(ty)(context, builder, args[0]), [args[1]])
        return builder.load_atomic(pointer, "acquire", 8)

    return types.int64(array, index), codegen


@intrinsic
def prefetch(typingctx, array, index):
    """Ask for the cache line of array[index] (1-d), to be read soon (LLVM's prefetch: a
    hint that never faults)."""

    def codegen(context, builder, signature, args):
        ty = signature.args[0]
        pointer = cgutils.get_item_pointer(context, builder, ty, context.make_array(ty)(context, builder, args[0]), [args[1]])
        byte_pointer = ir.IntType(8).as_pointer()
        hint = cgutils.get_or_insert_function(
            builder.module, ir.FunctionType(ir.VoidType(), [byte_pointer] + [ir.IntType(32)] * 3), "llvm.prefetch.p0")
        read, keep_close, data = (ir.Constant(ir.IntType(32), n) for n in (0, 3, 1))
        builder.call(hint, [builder.bitcast(pointer, byte_pointer), read, keep_close, data])
        return context.get_dummy_value()

    return types.void(array, index), codegen


@intrinsic
def store_release(typingctx, array, index, value):
    """array[index] = value (int64) with release ordering: every earlier write is visible to
    a thread that reads this value with `load_acquire`."""

    def codegen(context, builder, signature, args):
        ty = signature.args[0]
        pointer = cgutils.get_item_pointer(context, builder, ty, context.make_array(ty)(context, builder, args[0]), [args[1]])
        builder.store_atomic(args[2], pointer, "release", 8)
        return context.get_dummy_value()

    return types.void(array, index, value), codegen


if sys.platform == "win32":  # no sched_yield there: spin on

    @numba.njit(nogil=True, cache=True)
    def give_way():
        pass

else:
    sched_yield = types.ExternalFunction("sched_yield", types.int32())  # libc's, linked by name (cacheable)

    @numba.njit(nogil=True, cache=True)
    def give_way():
        sched_yield()


def new_flags(nt: int) -> np.ndarray:
    """The counters of nt threads' barriers (int64): thread t's at t * LANE, then the
    give-up mark and the yields each thread may wait through (GIVE_UP_YIELDS)."""
    flags = np.zeros((nt + 1) * LANE, dtype=np.int64)
    flags[nt * LANE + 1] = GIVE_UP_YIELDS
    return flags


def give_up(flags, nt: int) -> None:
    """Set the give-up mark (from Python: a thread that will not come, say on Ctrl-C before
    it started), so the others stop waiting at their next barrier."""
    flags[nt * LANE] = 1


@numba.njit(nogil=True, cache=True)
def barrier(flags, tid, nt, k):
    """Thread `tid` of `nt` has reached barrier k: wait until every thread has (flags from
    `new_flags`). False if a thread gave up: one that waited through its yields sets the
    give-up mark, and every other thread then stops waiting too."""
    store_release(flags, tid * LANE, k)
    spins, budget = 0, flags[nt * LANE + 1]
    for t in range(nt):
        while load_acquire(flags, t * LANE) < k:
            if load_acquire(flags, nt * LANE) != 0:
                return False
            spins += 1
            if spins > SPINS_BEFORE_YIELD:
                give_way()
                if spins > SPINS_BEFORE_YIELD + budget:
                    store_release(flags, nt * LANE, 1)
                    return False
    return True


@numba.njit(nogil=True, cache=True)
def share(n, tid, nt, align):
    """Thread tid's range [a, b) of [0, n) cut into nt nearly equal parts, inner edges at
    multiples of `align`."""
    a = n * tid // nt // align * align
    b = n if tid == nt - 1 else n * (tid + 1) // nt // align * align
    return a, b


@numba.njit(**REDUCING)
def rows_times(x, w, out, r0, r1):
    """out = x[r0:r1] @ w[r0:r1] (w (Cin, Cout)), eight rows of w at a time added into out
    (on GPT-2's shapes as fast as OpenBLAS's GEMV at one thread; four at a time was ~15%
    slower where Cout is 768)."""
    out[:] = F32(0.0)
    i = r0
    while i + 8 <= r1:
        a0, a1, a2, a3, a4, a5, a6, a7 = x[i], x[i + 1], x[i + 2], x[i + 3], x[i + 4], x[i + 5], x[i + 6], x[i + 7]
        w0, w1, w2, w3, w4, w5, w6, w7 = w[i], w[i + 1], w[i + 2], w[i + 3], w[i + 4], w[i + 5], w[i + 6], w[i + 7]
        for j in range(out.shape[0]):
            out[j] += (a0 * w0[j] + a1 * w1[j] + a2 * w2[j] + a3 * w3[j]) + (a4 * w4[j] + a5 * w5[j] + a6 * w6[j] + a7 * w7[j])
        i += 8
    while i < r1:
        a0, w0 = x[i], w[i]
        for j in range(out.shape[0]):
            out[j] += a0 * w0[j]
        i += 1


@numba.njit(**REDUCING)
def dots(x, wt, b, y, c0, c1):
    """y[c0:c1] = wt[c0:c1] @ x + b[c0:c1] (wt = W^T (Cout, Cin)), four rows of wt at a time
    (one at a time was ~20% slower than OpenBLAS where Cin is 3072)."""
    j = c0
    while j + 4 <= c1:
        w0, w1, w2, w3 = wt[j], wt[j + 1], wt[j + 2], wt[j + 3]
        s0 = s1 = s2 = s3 = F32(0.0)
        for i in range(x.shape[0]):
            s0 += w0[i] * x[i]
            s1 += w1[i] * x[i]
            s2 += w2[i] * x[i]
            s3 += w3[i] * x[i]
        y[j], y[j + 1], y[j + 2], y[j + 3] = s0 + b[j], s1 + b[j + 1], s2 + b[j + 2], s3 + b[j + 3]
        j += 4
    while j < c1:
        row, total = wt[j], F32(0.0)
        for i in range(x.shape[0]):
            total += row[i] * x[i]
        y[j] = total + b[j]
        j += 1


@numba.njit(**REDUCING)
def product(x, w, transposed, b, y, gelu, partial, tid, nt, flags, k):
    """y = x @ W + b on nt threads (GELU applied when `gelu`), W held as w (Cin, Cout), or as
    w = W^T (Cout, Cin) when `transposed`; partial (nt, >= Cout) scratch. Returns the
    barrier count after it, or -1 if a thread gave up."""
    if transposed:
        c0, c1 = share(w.shape[0], tid, nt, ALIGN)
        dots(x, w, b, y, c0, c1)
    else:
        Cin, Cout = w.shape
        r0, r1 = share(Cin, tid, nt, 1)
        rows_times(x, w, partial[tid, :Cout], r0, r1)
        k += 1
        if not barrier(flags, tid, nt, k):
            return -1
        c0, c1 = share(Cout, tid, nt, ALIGN)
        for j in range(c0, c1):
            total = b[j]
            for t in range(nt):
                total += partial[t, j]
            y[j] = total
    if gelu:
        gelu_(y[c0:c1])
    k += 1
    return k if barrier(flags, tid, nt, k) else -1


@numba.njit(**REDUCING)
def attend(qkv, keys, values, y, scores, pos, h0, h1):
    """Heads [h0, h1) of the query at position `pos`: its key and value (from qkv (3C,))
    written into the cache's rows `pos` (keys, values (NH, n_ctx, hs)), then y[head] =
    softmax(q k^T / sqrt(hs)) v over positions 0..pos; scores (>= pos + 1,) scratch."""
    NH, _, hs = keys.shape
    C = NH * hs
    for h in range(h0, h1):  # first ask for every row it reads: after the products they come from memory, and
        k_rows, v_rows = keys[h].reshape(-1), values[h].reshape(-1)  # head by head each would wait for its first
        for e in range(0, (pos + 1) * hs, LINE):  # (GPT-2 124M at 64 keys, 2 threads: 1.2 -> 0.3 ms a step)
            prefetch(k_rows, e)
            prefetch(v_rows, e)
    scale = F32(1.0 / math.sqrt(hs))
    for h in range(h0, h1):
        k, v = keys[h], values[h]
        for d in range(hs):
            k[pos, d] = qkv[C + h * hs + d]
            v[pos, d] = qkv[2 * C + h * hs + d]
        q = qkv[h * hs : (h + 1) * hs]
        for s in range(pos + 1):
            row = k[s]
            total = F32(0.0)
            for d in range(hs):
                total += q[d] * row[d]
            scores[s] = total * scale  # q k / sqrt(hs), scaled once per key (no scaled copy of q per head)
        norm = F32(1.0) / shifted_exps_(scores, pos + 1)[1]
        out = y[h * hs : (h + 1) * hs]
        out[:] = F32(0.0)
        for s in range(pos + 1):
            p = scores[s] * norm
            row = v[s]
            for d in range(hs):
                out[d] += p * row[d]


@numba.njit(**ELEMENTWISE)
def add(x, y):
    """x += y."""
    for c in range(x.shape[0]):
        x[c] += y[c]


@numba.njit(**REDUCING)
def step(tid, nt, flags, token, pos, eps, wte, wte_transposed, wpe, ln_1w, ln_1b, attn_w, attn_b, proj_w, proj_b, ln_2w,
         ln_2b, fc_w, fc_b, out_w, out_b, transposed, ln_fw, ln_fb, no_bias, keys, values, logits, own, shared, partial,
         scores):  # fmt: skip
    """Thread tid's part of one decoding step: token id `token` at position `pos` through
    the embedding, every block, the final LayerNorm and the tied LM head into logits (V,).

    wte is the LM head's weight as `product` holds it: wte^T (C, V), or wte (V, C) itself
    when `wte_transposed` (so the token's embedding is a column of the one or a row of the
    other); no_bias (V,) zeros. Per block i: ln_1w[i] ... out_b[i] are its parameters
    (tuples over the blocks), the four weights held as in `product` (transposed[j] for
    c_attn, attn.c_proj, mlp.c_fc, mlp.c_proj); keys, values (L, 1, NH, n_ctx, hs) the
    cache. own (nt, 2, C): each thread's residual stream and LayerNorm output (the same
    numbers on every thread); shared (9C,): qkv (3C), the attention's output (C), a
    product's output (C), the MLP's hidden (4C) after one another; partial (nt, >= 4C and
    >= V where wte^T is held) and scores (>= pos + 1,) scratch.
    Returns 0, or -1 if a thread gave up waiting."""
    C = wpe.shape[1]
    NH = keys.shape[2]
    h0, h1 = share(NH, tid, nt, 1)
    stream, normed = own[tid, 0], own[tid, 1]
    qkv, att, proj, hidden = shared[: 3 * C], shared[3 * C : 4 * C], shared[4 * C : 5 * C], shared[5 * C : 9 * C]
    for c in range(C):
        stream[c] = (wte[token, c] if wte_transposed else wte[c, token]) + wpe[pos, c]
    k = 0
    for i in range(len(attn_w)):
        layer_norm_(stream.reshape(1, C), ln_1w[i], ln_1b[i], eps, normed.reshape(1, C))
        k = product(normed, attn_w[i], transposed[0], attn_b[i], qkv, False, partial, tid, nt, flags, k)
        if k < 0:
            return -1
        attend(qkv, keys[i, 0], values[i, 0], att, scores, pos, h0, h1)
        k += 1
        if not barrier(flags, tid, nt, k):
            return -1
        k = product(att, proj_w[i], transposed[1], proj_b[i], proj, False, partial, tid, nt, flags, k)
        if k < 0:
            return -1
        add(stream, proj)
        layer_norm_(stream.reshape(1, C), ln_2w[i], ln_2b[i], eps, normed.reshape(1, C))
        k = product(normed, fc_w[i], transposed[2], fc_b[i], hidden, True, partial, tid, nt, flags, k)
        if k < 0:
            return -1
        k = product(hidden, out_w[i], transposed[3], out_b[i], proj, False, partial, tid, nt, flags, k)
        if k < 0:
            return -1
        add(stream, proj)
    layer_norm_(stream.reshape(1, C), ln_fw, ln_fb, eps, normed.reshape(1, C))
    k = product(normed, wte, wte_transposed, no_bias, logits, False, partial, tid, nt, flags, k)
    return 0 if k >= 0 else -1
