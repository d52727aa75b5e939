"""The kernels' thread pool: how rows are split, that ranges really run on several threads,
where the thread count comes from (--threads, $NPGPT_NUM_THREADS, the BLAS pool), and
that the BLAS pool follows it."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time

import pytest
from hypothesis import given
from hypothesis import strategies as st

from npgpt import eval as evaluate
from npgpt import generate, train
from npgpt.kernels import threads

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@given(N=st.integers(0, 200), parts=st.integers(1, 9), align=st.integers(1, 16))
def test_row_ranges_cover_every_row_once(N, parts, align):
    ranges = threads.row_ranges(N, parts, align)
    assert [r for r0, r1 in ranges for r in range(r0, r1)] == list(range(N))
    assert len(ranges) <= parts and all(r1 > r0 for r0, r1 in ranges)
    assert all(r1 % align == 0 for _, r1 in ranges[:-1])  # inner edges on block boundaries


def test_ranges_run_on_several_threads_in_order(restore_threads):
    threads._chosen, threads.MIN_ELEMENTS = 3, 1
    seen = threads.parallel_rows(lambda r0, r1: (r0, r1, threading.get_ident()), 10)
    assert [(r0, r1) for r0, r1, _ in seen] == [(0, 4), (4, 8), (8, 10)]
    assert seen[0][2] == threading.get_ident()  # the caller takes the first range
    assert len({ident for *_, ident in seen}) >= 2  # the others go to the pool's workers
    threads.MIN_ELEMENTS = 1 << 16
    assert len(threads.parallel_rows(lambda r0, r1: r0, 10, row_size=100)) == 1  # too small to split


def test_ctrl_c_in_a_parallel_call_is_raised_after_it(restore_threads):
    """As when Ctrl-C lands while the calling thread holds llvmlite's lock (numba loading a
    kernel) that a worker then needs: raised inside, it would leave the lock held and the
    worker waiting (here 10 s, then failing); raised after the call, every task ends."""
    threads._chosen, threads.MIN_ELEMENTS = 2, 1
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler
    lock, got, ended = threading.Lock(), [], []

    def task(r0, r1):
        if threading.current_thread() is threading.main_thread():
            with_lock = lock.acquire(timeout=10)
            os.kill(os.getpid(), signal.SIGINT)
            time.sleep(0.2)  # a KeyboardInterrupt raised here would skip the release
            ended.append(with_lock)
            lock.release()
        else:
            got.append(lock.acquire(timeout=10))
            if got[-1]:
                lock.release()

    with pytest.raises(KeyboardInterrupt):
        threads.parallel_rows(task, 2)
    assert ended == [True] and got == [True]
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler


def test_a_second_ctrl_c_in_a_parallel_call_is_raised_at_once(restore_threads):
    threads._chosen, threads.MIN_ELEMENTS = 2, 1
    ended = []

    def task(r0, r1):
        if threading.current_thread() is threading.main_thread():
            for when in ("after the first", "after the second"):
                os.kill(os.getpid(), signal.SIGINT)
                time.sleep(0.1)
                ended.append(when)

    with pytest.raises(KeyboardInterrupt):
        threads.parallel_rows(task, 2)
    assert ended == ["after the first"] and signal.getsignal(signal.SIGINT) is signal.default_int_handler


def test_an_error_in_a_range_reaches_the_caller(restore_threads):
    threads._chosen, threads.MIN_ELEMENTS = 2, 1

    def fail_late(r0, r1):
        if r0 > 0:
            raise RuntimeError("range failed")

    with pytest.raises(RuntimeError, match="range failed"):
        threads.parallel_rows(fail_late, 10)


@pytest.mark.skipif(threads.blas_threads() is None, reason="no OpenBLAS loaded: the BLAS pool is not set here")
def test_set_num_threads_sets_the_blas_pool_too(restore_threads):
    threadpoolctl = pytest.importorskip("threadpoolctl")
    for n in (1, 2):
        threads.set_num_threads(n)
        assert threads.num_threads() == n
        assert [p["num_threads"] for p in threadpoolctl.threadpool_info() if p["user_api"] == "blas"] == [n]
    with pytest.raises(threads.ThreadsError, match="at least 1"):
        threads.set_num_threads(0)


@pytest.mark.skipif(threads.blas_threads() is None, reason="no OpenBLAS loaded")
def test_by_default_the_pool_follows_the_blas_pool(restore_threads):
    threadpoolctl = pytest.importorskip("threadpoolctl")
    threads._chosen = None
    with threadpoolctl.threadpool_limits(limits=1):
        assert threads.num_threads() == 1
    assert threads.num_threads() == threads.blas_threads()


def probe(env: dict) -> subprocess.CompletedProcess:
    code = "from npgpt.kernels import threads; print(threads.num_threads(), threads.blas_threads())"
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, timeout=120,
                          env={**os.environ, **env})  # fmt: skip


@pytest.mark.skipif(threads.blas_threads() is None, reason="no OpenBLAS loaded")
def test_a_changed_environment_value_applies_to_both_pools(monkeypatch, restore_threads):
    """As a benchmark does: NPGPT_NUM_THREADS=1 for one run, then 2 for the next."""
    threads._chosen = None
    for n in (1, 2, 1):
        monkeypatch.setenv("NPGPT_NUM_THREADS", str(n))
        assert threads.num_threads() == n and threads.blas_threads() == n
    monkeypatch.delenv("NPGPT_NUM_THREADS")
    threads._blas_functions()[1](2)
    assert threads.num_threads() == 2  # unset: the BLAS pool's count again


def test_the_environment_sets_both_pools():
    result = probe({"NPGPT_NUM_THREADS": "1"})
    assert result.returncode == 0, result.stderr
    pool, blas = result.stdout.split()
    assert pool == "1" and blas in ("1", "None")
    result = probe({"NPGPT_NUM_THREADS": "two"})
    assert result.returncode != 0 and "NPGPT_NUM_THREADS must be a whole number" in result.stderr


@pytest.mark.parametrize("module", [train, generate, evaluate])
def test_every_cli_takes_threads(module, capsys):
    assert module.build_parser().parse_args(["--threads", "2", *required(module)]).threads == 2
    if module is train:  # train's --threads is npgpt.distributed's (checked when applied)
        return
    with pytest.raises(SystemExit) as exit_info:
        module.build_parser().parse_args(["--threads", "0", *required(module)])
    assert exit_info.value.code == 2 and "--threads: must be a whole number >= 1" in capsys.readouterr().err


def test_a_bad_environment_value_is_a_one_line_cli_error(monkeypatch, capsys, restore_threads):
    threads._chosen = None
    monkeypatch.setenv("NPGPT_NUM_THREADS", "0")
    assert generate.main(["--prompt", "hi"]) == 1
    err = capsys.readouterr().err
    assert err.startswith("error: NPGPT_NUM_THREADS must be a whole number >= 1") and err.count("\n") == 1


def required(module) -> list[str]:
    return {evaluate: ["--weights", "w", "--data", "d"], train: ["--out-dir", "o"]}.get(module, [])


def test_train_applies_threads(tmp_path, restore_threads):
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("to be or not to be, that is the question. " * 40, encoding="utf-8")
    flags = ["--data", str(corpus), "--out-dir", str(tmp_path / "run"), "--threads", "1", "--n-layer", "1",
             "--n-head", "2", "--n-embd", "8", "--block-size", "8", "--batch-size", "2", "--max-iters", "2",
             "--eval-iters", "1", "--warmup-iters", "1"]  # fmt: skip
    assert train.main(flags) == 0
    assert threads.num_threads() == 1


@pytest.mark.skipif(threads.blas_threads() is None, reason="no OpenBLAS loaded")
def test_ranges_that_call_blas_get_one_blas_thread_each(restore_threads):
    threads.set_num_threads(2)
    threads.MIN_ELEMENTS = 1
    assert threads.parallel_rows(lambda r0, r1: threads.blas_threads(), 4, one_blas_thread=True) == [1, 1]
    assert threads.blas_threads() == 2  # restored
    assert threads.parallel_rows(lambda r0, r1: threads.blas_threads(), 4) == [2, 2]


def test_items_run_once_each_on_several_threads_and_nested_calls_stay_on_their_thread(restore_threads):
    threads._chosen, threads.MIN_ELEMENTS = 3, 1
    meet = threading.Barrier(2, timeout=30)  # items 0 and 1 can only finish on two threads at once

    def item(i):
        if i < 2:
            meet.wait()
        inner = threads.parallel_rows(lambda r0, r1: (r0, r1, threading.get_ident()), 10)  # nested: one range
        return i, threading.get_ident(), inner

    seen = threads.parallel_items(item, 7)
    assert [i for i, _, _ in seen] == list(range(7))
    assert len({ident for _, ident, _ in seen}) >= 2
    assert all(inner == [(0, 10, ident)] for _, ident, inner in seen)
    assert threads.parallel_rows(lambda r0, r1: r0, 10) == [0, 4, 8]  # outside: split again

    def fail_late(i):
        if i == 5:
            raise RuntimeError("item failed")
        return i

    with pytest.raises(RuntimeError, match="item failed"):
        threads.parallel_items(fail_late, 7)


def test_items_do_not_wait_for_a_worker_that_never_started(restore_threads):
    """Every worker of the pool held back (a busy machine): the calling thread takes all
    the items and returns without waiting for a worker to start."""
    threads._chosen = 2
    pool = threads._executor(1)
    release = threading.Event()
    held = [pool.submit(release.wait, 60) for _ in range(threads._pool_size)]
    done = []
    caller = threading.Thread(target=lambda: done.append(threads.parallel_items(lambda i: (i, threading.get_ident()), 5)))
    try:
        caller.start()
        caller.join(timeout=30)
        assert done, "parallel_items waited for a worker that could not start"
        assert [i for i, _ in done[0]] == list(range(5))
        assert {ident for _, ident in done[0]} == {caller.ident}
    finally:
        release.set()
        for f in held:
            f.result()
        caller.join()


@given(B=st.integers(1, 40), T=st.integers(1, 300), n=st.integers(1, 4))
def test_a_batch_is_cut_into_pieces_covering_its_rows_in_order(B, T, n):
    import npgpt.kernels.numpy_fast as fast

    saved = threads._chosen
    threads._chosen = n
    try:
        pieces = fast.over_batch(lambda b0, b1: (b0, b1), B, T)
    finally:
        threads._chosen = saved
    assert [b for b0, b1 in pieces for b in range(b0, b1)] == list(range(B))
    per = max(b1 - b0 for b0, b1 in pieces)
    assert per == 1 or per * T <= fast.BATCH_ROWS  # whole rows, about BATCH_ROWS positions a piece
    assert len(pieces) >= min(n, B) or len(pieces) == 1 and per == B  # a piece per thread where B allows


def test_importing_npgpt_shortens_openblas_spinning_unless_the_user_set_it(monkeypatch):
    """npgpt sets OPENBLAS_THREAD_TIMEOUT (read when NumPy loads OpenBLAS) only where unset."""
    code = "import npgpt, os; print(os.environ['OPENBLAS_THREAD_TIMEOUT'])"
    monkeypatch.delenv("OPENBLAS_THREAD_TIMEOUT", raising=False)
    for given, expected in (({}, "20"), ({"OPENBLAS_THREAD_TIMEOUT": "28"}, "28")):
        out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, timeout=120,
                             env={**os.environ, **given}, check=True)  # fmt: skip
        assert out.stdout.strip() == expected


@pytest.mark.skipif(threads.blas_threads() is None, reason="no OpenBLAS loaded")
def test_blas_on_one_thread_sets_and_restores_the_blas_pool(restore_threads):
    threads.set_num_threads(2)
    with threads.blas_on_one_thread():
        assert threads.blas_threads() == 1
        with threads.blas_on_one_thread():  # nested: still one, and the outer restore wins
            assert threads.blas_threads() == 1
        assert threads.blas_threads() == 1
    assert threads.blas_threads() == 2
    with pytest.raises(RuntimeError), threads.blas_on_one_thread():
        raise RuntimeError("restored even on an error")
    assert threads.blas_threads() == 2
