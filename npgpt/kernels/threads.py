"""The NumPy kernels' thread pool, and the BLAS pool kept the same size.

NumPy releases the GIL inside its ufuncs and reductions, so a pass over an array split
into row ranges runs on several cores from plain Python threads. `parallel_rows` runs
`fn(r0, r1)` over such ranges on a persistent pool: one range in the calling thread,
the others on the pool's workers. `parallel_items` hands independent pieces of work
(batch rows of an inference forward) to the threads as each becomes free. Inside either,
a nested `parallel_rows` or `parallel_items` runs on its own thread alone: the outer
split already uses every thread.

How many threads:
- `set_num_threads(n)` (the CLIs' `--threads N`), else
- $NPGPT_NUM_THREADS (read at each pass, so a change applies), else
- the BLAS library's own thread count, read at each call (so a `threadpoolctl` limit
  set around a benchmark applies to both pools).
`set_num_threads` and $NPGPT_NUM_THREADS also set the BLAS pool to n, through OpenBLAS's
`openblas_set_num_threads` found by ctypes among the loaded libraries (Linux: listed in
/proc/self/maps; NumPy's wheels bundle OpenBLAS). Where no OpenBLAS is found (macOS
Accelerate, MKL builds, other systems) the BLAS pool is left alone: set
OMP_NUM_THREADS / OPENBLAS_NUM_THREADS / MKL_NUM_THREADS before starting Python there.
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import itertools
import _signal  # signal's C functions: the signal module's wrappers cost ~5 us a call (enum conversions)
import os
import signal
import threading
from concurrent.futures import ThreadPoolExecutor

from npgpt.errors import UserError

ENV = "NPGPT_NUM_THREADS"
MIN_ELEMENTS = 1 << 16  # elements per thread below which a pass (tens of us) stays on the calling thread



class ThreadsError(UserError, ValueError):
    """A thread count that is not a whole number >= 1."""


_chosen: int | None = None  # set_num_threads' n; None: the environment's, else follow BLAS
_env_seen: str | None = None  # the $NPGPT_NUM_THREADS value last applied
_env_threads: int | None = None
_pool: ThreadPoolExecutor | None = None
_pool_size = 0
_lock = threading.Lock()
_inside = threading.local()  # .active: this thread runs a range of a parallel call


def _openblas():
    """(get, set) ctypes functions of the loaded OpenBLAS, or None."""
    try:
        with open("/proc/self/maps") as f:
            paths = sorted({line.split()[-1] for line in f if "openblas" in line.lower() and "/" in line})
    except OSError:
        return None
    for path in paths:
        try:
            lib = ctypes.PyDLL(path)  # keeps the GIL: a call is a few instructions, and releasing it
            # would make a thread wait to take it back from the others mid-pass
        except OSError:
            continue
        for get_name, set_name in (
            ("scipy_openblas_get_num_threads64_", "scipy_openblas_set_num_threads64_"),
            ("openblas_get_num_threads64_", "openblas_set_num_threads64_"),
            ("openblas_get_num_threads", "openblas_set_num_threads"),
        ):
            get, set_ = getattr(lib, get_name, None), getattr(lib, set_name, None)
            if get is not None and set_ is not None:
                get.restype, set_.argtypes = ctypes.c_int, [ctypes.c_int]
                return get, set_
    return None


_blas = None
_blas_looked = False


def _blas_functions():
    global _blas, _blas_looked
    if not _blas_looked:
        import numpy  # noqa: F401  (loads the BLAS library this looks for)

        _blas, _blas_looked = _openblas(), True
    return _blas


def blas_threads() -> int | None:
    """The BLAS pool's thread count, where the BLAS is a loaded OpenBLAS; else None."""
    blas = _blas_functions()
    return None if blas is None else max(1, int(blas[0]()))


def blas_settable() -> bool:
    """Whether the BLAS pool's size can be set (a loaded OpenBLAS), without a call into it."""
    return _blas_functions() is not None


def set_num_threads(n: int) -> None:
    """Use n threads for the kernels' passes and (OpenBLAS) for BLAS."""
    global _chosen
    if int(n) < 1:
        raise ThreadsError(f"the number of threads must be at least 1, got {n}; give 1 or more")
    _chosen = int(n)
    blas = _blas_functions()
    if blas is not None:
        blas[1](_chosen)


def num_threads() -> int:
    """The threads a pass runs on now (see the module docstring for where n comes from).
    $NPGPT_NUM_THREADS is read at each call; a new value also sets the BLAS pool, once."""
    if _chosen is not None:
        return _chosen
    value = os.environ.get(ENV, "").strip()
    if value != _env_seen:
        _apply_environment(value)
    return _env_threads or blas_threads() or 1


def _apply_environment(value: str) -> None:
    global _env_seen, _env_threads
    if value and (not value.isdigit() or int(value) < 1):
        raise ThreadsError(f"{ENV} must be a whole number >= 1, got {value!r}; unset it or give e.g. {ENV}=2")
    _env_seen, _env_threads = value, int(value) if value else None
    blas = _blas_functions()
    if value and blas is not None:
        blas[1](int(value))


def _executor(workers: int) -> ThreadPoolExecutor:
    global _pool, _pool_size
    with _lock:
        if _pool is None or _pool_size < workers:
            if _pool is not None:
                _pool.shutdown(wait=False)
            _pool, _pool_size = ThreadPoolExecutor(workers, thread_name_prefix="npgpt"), workers
        return _pool


def row_ranges(N: int, parts: int, align: int = 1) -> list[tuple[int, int]]:
    """[0, N) cut into at most `parts` contiguous, nearly equal ranges whose inner edges
    are multiples of `align`."""
    step = -(-N // max(1, parts))
    step = -(-step // align) * align
    return [(r0, min(r0 + step, N)) for r0 in range(0, N, max(step, 1))]


def parallel_rows(fn, N: int, row_size: int = 1, align: int = 1, one_blas_thread: bool = False) -> list:
    """[fn(r0, r1) for ranges covering rows [0, N) once each, in order], the ranges run on
    up to `num_threads()` threads; `row_size` (elements per row) keeps small work on the
    calling thread, `align` makes the inner range edges multiples of it.

    `one_blas_thread`: fn calls BLAS on small matrices; while the ranges run on several
    threads, the (OpenBLAS) BLAS pool is set to one thread, so each range's calls run in
    its own thread, and restored after. Other threads' BLAS calls meanwhile get one too.
    """
    if N * row_size < 2 * MIN_ELEMENTS:  # too small to share (checked first: each call costs)
        return [fn(0, N)] if N else []
    parts = min(free_threads(), max(1, (N * row_size) // MIN_ELEMENTS), N)
    ranges = row_ranges(N, parts, align)
    if len(ranges) <= 1:
        return [fn(0, N)] if N else []
    return _run([lambda r0=r0, r1=r1: fn(r0, r1) for r0, r1 in ranges], len(ranges), one_blas_thread)


def parallel_items(fn, n: int) -> list:
    """[fn(0), ..., fn(n - 1)], independent items taken in order by up to `num_threads()`
    threads, each taking the next item when it finishes one (so a thread slowed by other
    work on the machine takes fewer, and one not yet started when the items run out is
    not waited for). BLAS runs on one thread in each, as with
    `parallel_rows(one_blas_thread=True)`; kernels called inside run on their own thread."""
    workers = min(free_threads(), n)
    if workers <= 1:
        return [fn(i) for i in range(n)]
    results: list = [None] * n
    counter = itertools.count()  # shared: next() on it is atomic under the GIL

    def take():
        while (i := next(counter)) < n:
            results[i] = fn(i)

    _run([take] * workers, workers, one_blas_thread=True, interchangeable=True)
    return results


def at_once(fn, n: int) -> list:
    """[fn(0), ..., fn(n - 1)], each on its own thread at the same time (fn(0) on the calling
    thread), for work whose threads wait for each other (spin barriers): the pool's workers
    are free outside a parallel call, so n <= `free_threads()` start at once. BLAS as is."""
    if n <= 1:
        return [fn(0)] if n else []
    return _run([lambda i=i: fn(i) for i in range(n)], n, one_blas_thread=False)


def free_threads() -> int:
    """The threads a kernel called here may share its work among: 1 inside a parallel
    call (the outer split already uses every thread), else `num_threads()`."""
    return 1 if _nested() else num_threads()


def _nested() -> bool:
    return getattr(_inside, "active", False)


@contextlib.contextmanager
def _as_nested():
    """The block with this thread marked as inside a parallel call (nested calls run serially)."""
    before = _nested()
    _inside.active = True
    try:
        yield
    finally:
        _inside.active = before


def _marked(task):
    """task() inside a parallel call (`_as_nested`)."""
    with _as_nested():
        return task()


@contextlib.contextmanager
def on_one_thread():
    """Run the block's kernels on this thread alone, BLAS on one thread, as inside a
    parallel call: the same work then takes the same paths at any thread count."""
    with _as_nested(), blas_on_one_thread():
        yield


def _run(tasks, n: int, one_blas_thread: bool, interchangeable: bool = False) -> list:
    """[task() for task in tasks] on n threads: the first in the calling thread.
    `interchangeable`: the tasks take shared work until none is left, so once the calling
    thread's task returns, a task no worker has started yet is cancelled (None) instead
    of waited for: a busy machine that holds a worker back costs no wait. A Ctrl-C meanwhile
    is raised when every task has ended (`interrupt_after`)."""
    with interrupt_after(), blas_on_one_thread() if one_blas_thread else contextlib.nullcontext():
        futures = [_executor(n - 1).submit(_marked, task) for task in tasks[1:]]
        try:
            first = _marked(tasks[0])
        finally:
            rest = [None if interchangeable and f.cancel() else f.result() for f in futures]
    return [first, *rest]


@contextlib.contextmanager
def interrupt_after():
    """Run the block with a Ctrl-C (SIGINT) held back until the block ends, then raised as
    KeyboardInterrupt; a second Ctrl-C meanwhile is raised at once. A KeyboardInterrupt
    raised in the calling thread while numba loads a kernel (llvmlite takes its lock, then
    runs Python code) can leave that lock held: a pool thread loading the same kernel then
    waits for it forever, and so does the caller, waiting for that thread. A no-op off the
    main thread, and where SIGINT has a handler other than Python's default (the trainer's)."""
    if threading.current_thread() is not threading.main_thread() or _signal.getsignal(signal.SIGINT) is not signal.default_int_handler:
        yield
        return
    caught = []

    def hold(signum, frame):
        if caught:
            raise KeyboardInterrupt
        caught.append(signum)

    _signal.signal(signal.SIGINT, hold)
    try:
        yield
    finally:
        _signal.signal(signal.SIGINT, signal.default_int_handler)
    if caught:
        raise KeyboardInterrupt


@contextlib.contextmanager
def blas_on_one_thread():
    """Run the block with the (OpenBLAS) BLAS pool at one thread, restored after; a no-op
    where the pool cannot be set. Other threads' BLAS calls meanwhile get one too."""
    blas = _blas_functions()
    before = None if blas is None else blas[0]()
    if before is not None and before > 1:
        blas[1](1)
    try:
        yield
    finally:
        if before is not None and before > 1:
            blas[1](before)


def configure(n: int | None) -> int:
    """A CLI's thread count: `--threads` n when given, else $NPGPT_NUM_THREADS or the BLAS
    count (a bad $NPGPT_NUM_THREADS raises ThreadsError, a one-line CLI error). Returns it."""
    if n:
        set_num_threads(n)
    return num_threads()


def add_threads_option(parser) -> None:
    """The CLIs' `--threads N` (applied by `configure`)."""

    def positive(text: str) -> int:
        if not text.isdigit() or int(text) < 1:
            raise argparse.ArgumentTypeError(f"must be a whole number >= 1, got {text!r}")
        return int(text)

    parser.add_argument("--threads", type=positive, metavar="N",
                        help=f"CPU threads for NumPy's kernels and BLAS (default: ${ENV}, else the BLAS library's count)")  # fmt: skip
