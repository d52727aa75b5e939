"""Data-parallel training under a real `mpiexec -n 2` (and -n 4) (MPICH from the test extra), against
one process: the same run however the global batch is split (dropout on), ZeRO-1, resume
at another world size, Ctrl-C, a killed or hung rank, rank-0-only output; and, in
process, the flat layout and its buckets.

Equality is "up to the order of float summation": per tensor, max |a - b| <= rtol x max |a|,
with rtol 1e-6 at float64 and 1e-4 at float32 (20 AdamW steps of a tiny model; Adam's
1/sqrt(v) amplifies last-bit differences of small gradients)."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from conftest import ROOT
from npgpt import train
from npgpt.checkpoint import load_safetensors
from npgpt.distributed import Comm, DataParallel, Layout, backward_order
from npgpt.model import GPT, param_shapes
from npgpt.config import GPTConfig

TEXT = (
    "First Citizen:\nBefore we proceed any further, hear me speak.\n\nAll:\nSpeak, speak.\n\n"
    "First Citizen:\nYou are all resolved rather to die than to famish?\n\nAll:\nResolved. resolved.\n\n"
) * 12
TINY = ["--n-layer", "2", "--n-head", "2", "--n-embd", "8", "--block-size", "8", "--batch-size", "2",
        "--warmup-iters", "2", "--log-interval", "5", "--eval-iters", "3", "--eval-interval", "10",
        "--dropout", "0.1", "--checkpoint-interval", "1000", "--max-iters", "20"]  # fmt: skip
BUCKETS = ["--bucket-mb", "0.001"]  # ~1 KB: several buckets even for the tiny model
RTOL = {"float64": 1e-6, "float32": 1e-4}
TIMEOUT = 120  # seconds for any one mpiexec run: a hang fails the test, never the suite


def mpiexec() -> str:
    found = shutil.which("mpiexec") or shutil.which("mpiexec", path=str(Path(sys.executable).parent))
    if not found:
        pytest.skip('mpiexec not found: pip install -e ".[test]" brings mpich')
    return found


def env() -> dict:
    paths = [str(ROOT), str(ROOT / "backends" / "cupy"), *filter(None, os.environ.get("PYTHONPATH", "").split(os.pathsep))]
    return {**os.environ, "PYTHONPATH": os.pathsep.join(paths), "OMP_NUM_THREADS": "1"}


def launch(n: int, *flags, program=("-m", "npgpt.train"), extra_env=None, **popen):
    cmd = [mpiexec(), "-n", str(n), sys.executable, *program, *flags]
    return subprocess.Popen(cmd, cwd=ROOT, env=env() | (extra_env or {}), stderr=subprocess.PIPE, stdout=subprocess.PIPE,
                            text=True, **popen)  # fmt: skip


def mpirun(n: int, *flags, **launch_args) -> subprocess.CompletedProcess:
    proc = launch(n, *flags, **launch_args)
    try:
        out, err = proc.communicate(timeout=TIMEOUT)
    except subprocess.TimeoutExpired:
        proc.kill()
        out, err = proc.communicate()
        pytest.fail(f"mpiexec -n {n} did not finish in {TIMEOUT} s:\n{err[-3000:]}")
    return subprocess.CompletedProcess(proc.args, proc.returncode, out, err)


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    path = tmp_path_factory.mktemp("corpus") / "corpus.txt"
    path.write_text(TEXT, encoding="utf-8")
    return str(path)


@pytest.fixture(scope="module")
def reference(corpus, tmp_path_factory):
    """One process, --grad-accum 4, at each dtype: the run every split must reproduce."""
    runs = {}
    for dtype in RTOL:
        out = tmp_path_factory.mktemp(f"one-{dtype}")
        assert train.main(["--data", corpus, "--out-dir", str(out), *TINY, "--grad-accum", "4", "--dtype", dtype]) == 0
        runs[dtype] = out
    return runs


def state(out: Path) -> dict[str, np.ndarray]:
    params, _ = load_safetensors(out / "model.safetensors")
    moments, _ = load_safetensors(out / "trainer_state.safetensors")
    return {**params, **moments}


def log(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]


def assert_same_run(a: Path, b: Path, rtol: float):
    """Losses, validation losses, parameters and moments equal within rtol."""
    la, lb = log(a), log(b)
    assert [r["step"] for r in la] == [r["step"] for r in lb]
    for ra, rb in zip(la, lb):
        for key in ("loss", "val_loss", "grad_norm"):
            if key in ra:
                assert rb[key] == pytest.approx(ra[key], rel=rtol), (ra["step"], key)
    sa, sb = state(a), state(b)
    assert sa.keys() == sb.keys()
    worst = max((float(np.max(np.abs(sa[k] - sb[k])) / np.max(np.abs(sa[k]))), k) for k in sa if np.any(sa[k]))
    assert worst[0] <= rtol, worst


# -- mpiexec -n 2 --------------------------------------------------------------------------------
@pytest.mark.parametrize("ranks, dtype", [(2, "float64"), (2, "float32"), (4, "float64")])
def test_ranks_train_the_run_of_one_process(corpus, reference, tmp_path, ranks, dtype):
    """2 ranks x --grad-accum 2 and 4 ranks x --grad-accum 1 == 1 process x --grad-accum 4
    (same sequences, same dropout masks), and only rank 0 prints or writes."""
    out = tmp_path / "split"
    accum = str(4 // ranks)
    done = mpirun(ranks, "--data", corpus, "--out-dir", str(out), *TINY, *BUCKETS, "--grad-accum", accum, "--dtype", dtype)
    assert done.returncode == 0, done.stderr
    assert_same_run(reference[dtype], out, RTOL[dtype])
    # one progress line per log interval (rank 1 is silent), global batch and comm share shown
    assert done.stderr.count("step     20/20") == 1, done.stderr
    assert f"global batch 2 x {accum} x {ranks} ranks" in done.stderr and "comm " in done.stderr
    assert done.stdout == ""
    assert sorted(os.listdir(out)) == sorted(os.listdir(reference[dtype]))


def test_zero1_trains_the_run_of_one_process(corpus, reference, tmp_path):
    """--zero 1: moments sharded, the checkpoint gathered to the unsharded format."""
    out = tmp_path / "zero"
    done = mpirun(2, "--data", corpus, "--out-dir", str(out), *TINY, *BUCKETS, "--grad-accum", "2",
                  "--dtype", "float64", "--zero", "1")  # fmt: skip
    assert done.returncode == 0, done.stderr
    assert_same_run(reference["float64"], out, RTOL["float64"])


@pytest.mark.parametrize("first, then", [(2, 1), (1, 2)])
def test_resume_at_another_world_size_continues_the_run(corpus, reference, tmp_path, first, then):
    out = tmp_path / "run"
    flags = ["--data", corpus, "--out-dir", str(out), *TINY, "--dtype", "float64", "--lr-decay-iters", "20"]
    accum = ["--grad-accum", str(4 // first)]
    if first == 1:
        assert train.main([*flags, *accum, "--max-iters", "10"]) == 0
    else:
        done = mpirun(first, *flags, *accum, "--max-iters", "10")
        assert done.returncode == 0, done.stderr
    resume = ["--resume", "--out-dir", str(out), "--max-iters", "20"]
    if then == 1:
        assert train.main(resume) == 0
    else:
        done = mpirun(then, *resume, "--zero", "1")
        assert done.returncode == 0, done.stderr
        assert "on 2 ranks x --grad-accum 2" in done.stderr
    assert_same_run(reference["float64"], out, RTOL["float64"])


def test_resume_refuses_a_world_size_that_does_not_divide_the_global_batch(corpus, tmp_path, capsys):
    out = tmp_path / "run"
    assert train.main(["--data", corpus, "--out-dir", str(out), *TINY, "--grad-accum", "3", "--max-iters", "2"]) == 0
    done = mpirun(2, "--resume", "--out-dir", str(out), "--max-iters", "4")
    assert done.returncode == 1 and done.stderr.count("error: ") == 1, done.stderr
    assert "3 micro-batches" in done.stderr and "Traceback" not in done.stderr


@pytest.fixture(scope="module")
def fake_gpu_reference(corpus, tmp_path_factory):
    """One process on the fake GPU, --grad-accum 4, float64 (dropout masks come from the
    GPU's generator there, so the reference must run on the same backend)."""
    out = tmp_path_factory.mktemp("one-fake-gpu")
    flags = ["--data", corpus, "--out-dir", str(out), *TINY, "--grad-accum", "4", "--dtype", "float64"]
    assert train.main([*flags, "--backend", "fake-cupy"]) == 0
    return out


@pytest.mark.parametrize("zero", [0, 1])
def test_the_nccl_path_runs_end_to_end_on_the_fake_gpu(corpus, fake_gpu_reference, tmp_path, zero):
    """--backend fake-cupy under mpiexec -n 2: each rank on its own (fake) GPU, gradients
    summed by NCCL calls on a stream of their own (buckets, or reduce-scatter + all-gather
    with ZeRO-1), none downloaded: the host receives only the log's scalars and the final
    checkpoint. The run equals one process on the fake GPU."""
    out, report = tmp_path / "run", tmp_path / "report"
    done = mpirun(2, str(report), "--data", corpus, "--out-dir", str(out), *TINY, *BUCKETS, "--grad-accum", "2",
                  "--dtype", "float64", "--backend", "fake-cupy", "--zero", str(zero),
                  program=[str(ROOT / "tests" / "fake_nccl.py")])  # fmt: skip
    assert done.returncode == 0, done.stderr
    assert_same_run(fake_gpu_reference, out, RTOL["float64"])
    ranks = [json.loads(Path(f"{report}.{r}.json").read_text()) for r in range(2)]
    assert ranks[0]["calls"] == ranks[1]["calls"]  # the same collectives in the same order
    calls = ranks[0]["calls"]
    model = GPT.load(out / "model.safetensors")
    n_params = sum(int(np.prod(p.shape)) for p in model.params.values())
    layout = Layout({k: tuple(v.shape) for k, v in model.params.items()}, 8, 2, float(BUCKETS[1]) * 2**20)
    buckets, steps = len(layout.buckets), 20
    kinds = {kind: sum(1 for c in calls if c[0] == kind) for kind in ("allReduce", "reduceScatter", "allGather")}
    reported = 20 // 5  # the loss is summed over the ranks once per log interval
    if zero:
        assert kinds == {"allReduce": steps + reported, "reduceScatter": steps * buckets, "allGather": steps * buckets}
    else:
        assert kinds == {"allReduce": steps * buckets + reported, "reduceScatter": 0, "allGather": 0}
        assert sum(c[1] for c in calls if c[1] > 1) == steps * layout.total
    assert all(c[2] == "NCCL_FLOAT64" and c[3] != ranks[0]["compute_stream"] for c in calls)
    # Downloads: the final checkpoint (rank 0: parameters + 2 moments; with ZeRO-1 each rank
    # its two moment shards of total / 2), and scalars. Gradients through the host would add
    # 8 x n_params per step.
    moments = 8 * (layout.total if zero else 2 * n_params)
    assert ranks[0]["download_bytes"] <= 8 * n_params + moments + 4096
    assert ranks[1]["download_bytes"] <= (moments if zero else 0) + 4096


def test_a_hung_nccl_collective_ends_the_job(corpus, tmp_path):
    """Rank 1's 7th NCCL collective never runs (FAKE_NCCL_HANG: a hung GPU or link), so
    both ranks' device-side waits would block for ever: the NCCL watchdog aborts NCCL and
    ends the job after --comm-timeout with the one-line message, before the run ends."""
    out, report = tmp_path / "run", tmp_path / "report"
    done = mpirun(2, str(report), "--data", corpus, "--out-dir", str(out), *TINY, *BUCKETS, "--grad-accum", "2",
                  "--backend", "fake-cupy", "--comm-timeout", "2", program=[str(ROOT / "tests" / "fake_nccl.py")],
                  extra_env={"FAKE_NCCL_HANG": "1:7"})  # fmt: skip
    assert done.returncode != 0
    line = next((line for line in done.stderr.splitlines() if line.startswith("error: rank")), "")
    assert "waited" in line and "for the other ranks' NCCL collective, which stopped answering (a rank died or hangs)" in line, done.stderr
    assert "--resume" in line and "Traceback" not in done.stderr
    assert int(line.split(" waited ")[1].split()[0]) >= 2  # it waited out --comm-timeout
    assert not Path(f"{report}.0.json").exists() and not Path(f"{report}.1.json").exists()  # neither rank finished


def test_a_rank_stuck_in_set_up_ends_the_job(tmp_path):
    """The set-up's object collectives (on_every_rank's, the NCCL id's broadcast) are
    bounded too: rank 1 never arrives, rank 0 gives up after the timeout, saying why."""
    program = ("import time, sys; from npgpt.distributed import connect, on_every_rank; comm = connect(2.0); "
               "time.sleep(60) if comm.rank == 1 else None; on_every_rank(comm, lambda: 1); sys.exit(3)")  # fmt: skip
    done = mpirun(2, program=["-c", program])
    assert done.returncode not in (0, 3)
    line = next((line for line in done.stderr.splitlines() if line.startswith("error: rank 0 waited ")), "")
    assert " s for the other ranks, which stopped answering (a rank died or hangs)" in line and "--resume" in line, done.stderr
    assert int(line.split(" waited ")[1].split()[0]) >= 2  # it waited out the timeout


def rank_pid(mpiexec_pid: int, rank: int) -> int | None:
    """The pid of `rank` among mpiexec's descendants (MPICH's PMI_RANK in its environment)."""
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            environ = (entry / "environ").read_bytes().split(b"\0")
            if f"PMI_RANK={rank}".encode() not in environ:
                continue
            pid = int(entry.name)
            while pid > 1:  # is it under our mpiexec?
                pid = int((Path("/proc") / str(pid) / "stat").read_text().rsplit(")", 1)[1].split()[1])
                if pid == mpiexec_pid:
                    return int(entry.name)
        except (OSError, ValueError, IndexError):
            continue
    return None


def started_steps(proc, steps: int) -> None:
    """Read rank 0's progress until it reports `steps` steps."""
    for line in proc.stderr:
        if line.startswith("step") and "/" in line.split()[1] and int(line.split()[1].split("/")[0]) >= steps:
            return
    pytest.fail(f"the run ended before step {steps}")


@pytest.mark.parametrize("how", ["killed", "hung"])
def test_a_dead_or_hung_rank_ends_the_job(corpus, tmp_path, how):
    """SIGKILL (MPICH ends the job) or SIGSTOP (the others' bounded wait ends it, saying
    why) on rank 1: mpiexec returns non-zero within seconds, not never."""
    out = tmp_path / "run"
    proc = launch(2, "--data", corpus, "--out-dir", str(out), *TINY, "--max-iters", "100000", "--log-interval", "1",
                  "--comm-timeout", "3")  # fmt: skip
    try:
        started_steps(proc, 2)
        pid = rank_pid(proc.pid, 1)
        assert pid is not None
        os.kill(pid, signal.SIGKILL if how == "killed" else signal.SIGSTOP)
        start = time.monotonic()
        _, err = proc.communicate(timeout=60)
        assert time.monotonic() - start < 30
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
    assert proc.returncode != 0
    if how == "hung":
        assert "stopped answering (a rank died or hangs)" in err and "--resume" in err, err


def test_ctrl_c_on_mpiexec_saves_one_checkpoint(corpus, tmp_path):
    """SIGINT to mpiexec reaches every rank (possibly in different steps); they agree on
    one step, rank 0 saves it once, and the run resumes on one process."""
    out = tmp_path / "run"
    proc = launch(2, "--data", corpus, "--out-dir", str(out), *TINY, "--max-iters", "100000", "--log-interval", "1",
                  "--lr-decay-iters", "100")  # fmt: skip
    try:
        started_steps(proc, 3)
        proc.send_signal(signal.SIGINT)
        _, err = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
    assert proc.returncode == 130, err
    assert err.count("interrupted: checkpoint at step") == 1 and "Traceback" not in err
    step = int(load_safetensors(out / "model.safetensors")[1]["npgpt.step"])
    assert json.loads(load_safetensors(out / "trainer_state.safetensors")[1]["npgpt.trainer"])["step"] == step
    assert log(out)[-1]["step"] == step
    assert train.main(["--resume", "--out-dir", str(out), "--max-iters", str(step + 1)]) == 0


# -- in process -----------------------------------------------------------------------------------
def test_layout_buckets_cover_every_parameter_once_in_backward_order():
    shapes = param_shapes(GPTConfig(vocab_size=11, n_ctx=8, n_embd=8, n_head=2, n_layer=3))
    order = backward_order(list(shapes))
    assert order[:2] == ["ln_f.weight", "ln_f.bias"] and order[-2:] == ["wte.weight", "wpe.weight"]
    assert order.index("h.2.ln_1.weight") < order.index("h.1.mlp.c_proj.bias")
    layout = Layout(shapes, itemsize=4, world=3, bucket_bytes=400)
    assert len(layout.buckets) > 3
    covered = np.zeros(layout.total, dtype=int)
    for name, (offset, size, shape) in layout.slots.items():
        assert size == np.prod(shape)
        covered[offset : offset + size] += 1
    assert covered.max() == 1 and covered.sum() == sum(np.prod(s) for s in shapes.values())
    previous = 0
    for start, stop, names in layout.buckets:
        assert start == previous and (stop - start) % 3 == 0
        previous = stop
        assert all(start <= layout.slots[n][0] and layout.slots[n][0] + layout.slots[n][1] <= stop for n in names)
        lo, hi = layout.shard(layout.buckets.index((start, stop, names)), 2)
        assert hi == stop and hi - lo == (stop - start) // 3


def test_zero1_on_one_process_is_adamw(backend):
    """DataParallel with --zero 1 on a one-process world: 3 steps equal the plain AdamW loop
    (same arithmetic, on views of the flat buffers), and its state dict is AdamW's."""
    from npgpt.optim import AdamW, clip_grad_norm

    config = GPTConfig(vocab_size=13, n_ctx=8, n_embd=8, n_head=2, n_layer=2)
    plain, flat = GPT.init(config, backend, seed=3, dtype="float64"), GPT.init(config, backend, seed=3, dtype="float64")
    opt = AdamW(plain.params, backend)
    dp = DataParallel(flat, Comm(), micro_batches=1, zero=1, bucket_mb=0.001)
    rng = np.random.default_rng(0)
    for _ in range(3):
        ids, targets = rng.integers(0, 13, (2, 8)), rng.integers(0, 13, (2, 8))
        _, grads = plain.loss_and_grads(ids, targets)
        clip_grad_norm(grads, 0.5, backend)
        opt.step(grads, 1e-2)
        _, grads = flat.loss_and_grads(ids, targets)
        dp.add(grads, final=True)
        dp.reduce()
        dp.clip_and_step(0.5, 1e-2)
    for name in plain.params:
        np.testing.assert_allclose(backend.to_numpy(flat.params[name]), backend.to_numpy(plain.params[name]), rtol=1e-12, atol=1e-14)
    tensors, scalars = dp.state_dict()
    expected, expected_scalars = opt.state_dict()
    assert scalars == expected_scalars and tensors.keys() == expected.keys()
    for key in expected:
        np.testing.assert_allclose(tensors[key], expected[key], rtol=1e-12, atol=1e-14)


class RecordingComm(Comm):
    """The one-process world, noting when each bucket's sum starts."""

    def __init__(self):
        super().__init__()
        self.events: list[str] = []

    def start_allreduce(self, buf):
        self.events.append(f"start {buf.shape[0]}")


def test_buckets_start_during_the_backward_pass():
    """Through the grad_ready hook each bucket starts as soon as its gradients are final:
    ln_f's and the last block's first, the embeddings' last, and no bucket waits for the
    end of the backward pass except the one that holds wte and wpe."""
    config = GPTConfig(vocab_size=13, n_ctx=8, n_embd=8, n_head=2, n_layer=3)
    model = GPT.init(config, "numpy", seed=0, dtype="float64")
    comm = RecordingComm()
    dp = DataParallel(model, comm, micro_batches=1, bucket_mb=900 / 2**20)  # ~1 block per bucket

    def hook(names, grads):
        comm.events.append(" ".join(names))
        dp.ready(names, grads)

    ids = np.random.default_rng(0).integers(0, 13, (2, 8))
    model.loss_and_grads(ids, ids, grad_ready=hook)
    starts = [i for i, e in enumerate(comm.events) if e.startswith("start")]
    assert len(starts) == len(dp.layout.buckets) >= 4
    last_report = max(i for i, e in enumerate(comm.events) if not e.startswith("start"))
    assert comm.events[last_report] == "wte.weight wpe.weight"
    assert sum(1 for i in starts if i > last_report) == 1  # only the embeddings' bucket starts at the end
    assert starts[0] < comm.events.index(" ".join(n for n in model.params if n.startswith("h.0.")))
    dp.reduce()


class TwoRanks(Comm):
    """Rank 0 of a two-rank world whose rank 1 reports `other` from its set-up."""

    def __init__(self, other):
        super().__init__()
        self.size, self.other = 2, other

    def allgather_object(self, obj) -> list:
        return [obj, self.other]


def test_a_rank_that_cannot_start_stops_them_all():
    from npgpt.distributed import DistributedError, on_every_rank

    assert on_every_rank(TwoRanks(None), lambda: "trainer") == "trainer"
    with pytest.raises(DistributedError, match="rank 1 could not start: --data x: no such file"):
        on_every_rank(TwoRanks("--data x: no such file"), lambda: "trainer")
    with pytest.raises(ValueError, match="mine"):  # a rank's own failure is raised as it is
        on_every_rank(TwoRanks(None), lambda: (_ for _ in ()).throw(ValueError("mine")))


def test_resume_splits_the_global_batch_or_says_how():
    assert train.split_global_batch(4, 2, None) == 2 and train.split_global_batch(4, 4, 1) == 1
    with pytest.raises(train.TrainingError, match="leave out --grad-accum"):
        train.split_global_batch(4, 2, 1)
