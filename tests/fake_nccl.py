"""A stand-in for `cupy.cuda.nccl` on the fake CuPy (tests/fake_cupy.py), for CI without GPUs.

Each process of a real `mpiexec -n N` run is one "GPU": its NCCL communicator performs
every collective with MPI (mpi4py) on the memory the device pointers name, so the data
really moves between the ranks, and records each call: (name, count, NCCL type,
stream). The communicator checks that every rank joined with the same unique id (the
one rank 0 made: it must have been broadcast). It also gives the fake CuPy what the
NCCL path uses of CUDA: `ndarray.data.ptr`, streams with `ptr`, `record()` and
`wait_event()`, and events with `done`.

As on a GPU, a collective is asynchronous: the call posts a nonblocking MPI collective
and returns; the event recorded after it is done when that completes, and a stream
that waits for the event (the compute stream, before the optimizer) blocks until then.
To imitate a collective that never finishes (a hung peer, a dead link), set
FAKE_NCCL_HANG=RANK:N: that rank's N-th collective (from 1) and every later one are never
posted, so they and the other ranks' matching ones stay pending for ever.

Run as a script, it is an npgpt.train launcher on the fake GPU:

    mpiexec -n 2 python tests/fake_nccl.py REPORT_PREFIX --backend fake-cupy [train flags]

and each rank writes REPORT_PREFIX.<rank>.json: the NCCL calls and the fake CuPy's
host <-> device transfers.
"""

from __future__ import annotations

import ctypes
import itertools
import json
import os
import sys
import threading
import time
import types
from pathlib import Path

import numpy as np

import fake_cupy

NCCL_TYPES = {"NCCL_FLOAT16": np.float16, "NCCL_FLOAT32": np.float32, "NCCL_FLOAT64": np.float64}
CALLS: list[tuple[str, int, str, int]] = []  # (collective, count, NCCL type, stream pointer)
_STREAM_IDS = itertools.count(1)


def _host_view(ptr: int, count: int, nccl_type: str) -> np.ndarray:
    """The `count` elements at device pointer `ptr` (fake device memory is host memory)."""
    dtype = np.dtype(NCCL_TYPES[nccl_type])
    buffer = (ctypes.c_char * (count * dtype.itemsize)).from_address(ptr)
    return np.frombuffer(buffer, dtype=dtype, count=count)


class NcclCommunicator:
    """`cupy.cuda.nccl.NcclCommunicator(ndev, unique_id, rank)` over MPI_COMM_WORLD."""

    def __init__(self, ndev: int, unique_id, rank: int):
        from mpi4py import MPI

        self.MPI, self.world = MPI, MPI.COMM_WORLD
        if (ndev, rank) != (self.world.Get_size(), self.world.Get_rank()):
            raise RuntimeError(f"NCCL: ndev {ndev} rank {rank} differ from MPI's {self.world.Get_size()}, {self.world.Get_rank()}")
        if len({tuple(uid) for uid in self.world.allgather(unique_id)}) != 1:
            raise RuntimeError("NCCL: ranks joined with different unique ids (ncclInvalidUsage)")
        hang_rank, _, hang_call = os.environ.get("FAKE_NCCL_HANG", "-1:0").partition(":")
        self.hang_at = int(hang_call) if int(hang_rank) == rank else None
        self.aborted = False

    def _type_name(self, datatype: int) -> str:
        return next(name for name in NCCL_TYPES if getattr(nccl, name) == datatype)

    def _post(self, stream: int, start, *keep) -> None:
        """Post the MPI collective `start()` on `stream` (never, from FAKE_NCCL_HANG's call on)."""
        if self.aborted:
            raise RuntimeError("NCCL: communicator aborted (ncclInvalidUsage)")
        hung = self.hang_at is not None and len(CALLS) >= self.hang_at
        STREAMS[stream].pending.append(HUNG if hung else (start(), keep))

    def allReduce(self, sendbuf, recvbuf, count, datatype, op, stream):  # noqa: N802 - CuPy's spelling
        t = self._type_name(datatype)
        assert op == nccl.NCCL_SUM
        CALLS.append(("allReduce", count, t, stream))
        recv = _host_view(recvbuf, count, t)
        send = self.MPI.IN_PLACE if sendbuf == recvbuf else _host_view(sendbuf, count, t)
        self._post(stream, lambda: self.world.Iallreduce(send, recv), recv)

    def reduceScatter(self, sendbuf, recvbuf, recvcount, datatype, op, stream):  # noqa: N802
        t = self._type_name(datatype)
        assert op == nccl.NCCL_SUM
        CALLS.append(("reduceScatter", recvcount, t, stream))
        send, recv = _host_view(sendbuf, recvcount * self.world.Get_size(), t).copy(), _host_view(recvbuf, recvcount, t)
        self._post(stream, lambda: self.world.Ireduce_scatter_block(send, recv), send, recv)

    def allGather(self, sendbuf, recvbuf, count, datatype, stream):  # noqa: N802
        t = self._type_name(datatype)
        CALLS.append(("allGather", count, t, stream))
        recv = _host_view(recvbuf, count * self.world.Get_size(), t)
        in_place = sendbuf == recvbuf + self.world.Get_rank() * count * recv.itemsize
        send = self.MPI.IN_PLACE if in_place else _host_view(sendbuf, count, t).copy()
        self._post(stream, lambda: self.world.Iallgather(send, recv), send, recv)

    def abort(self) -> None:
        """ncclCommAbort: later calls fail (the pending MPI requests are left to MPI_Abort)."""
        self.aborted = True


def get_unique_id():
    return tuple(np.random.default_rng().integers(0, 256, 128).tolist())


nccl = types.ModuleType("cupy.cuda.nccl", "fake NCCL (tests/fake_nccl.py): MPI standing in for NVLink")
nccl.NcclCommunicator, nccl.get_unique_id = NcclCommunicator, get_unique_id
nccl.NCCL_SUM = 0
for _value, _name in enumerate(NCCL_TYPES, start=6):
    setattr(nccl, _name, _value)


# -- the CUDA pieces the NCCL path uses ------------------------------------------------------
HUNG = object()  # a pending collective that never completes
STREAMS: dict[int, Stream] = {}
_MPI_LOCK = threading.Lock()  # the watchdog thread and the main thread both test requests


class Event:
    """Marks the work queued on a stream before `record()`: done when its collectives are."""

    def __init__(self, stream: int, pending: list):
        self.stream, self.pending = stream, pending

    @property
    def done(self) -> bool:
        if any(p is HUNG for p in self.pending):
            return False
        from mpi4py import MPI

        with _MPI_LOCK:
            return MPI.Request.Testall([request for request, _ in self.pending])


class Stream(fake_cupy.Stream):
    """A stream with an id for a pointer; its work is the MPI collectives posted on it
    (the fake's kernels run at once, on the host)."""

    def __init__(self, non_blocking: bool = False):
        self.ptr = next(_STREAM_IDS)
        self.pending: list = []  # (MPI request, buffers it uses) or HUNG
        STREAMS[self.ptr] = self

    def record(self, event=None) -> Event:
        self.pending = [p for p in self.pending if p is HUNG or p[0]]  # a completed request is falsy (MPI_REQUEST_NULL)
        return Event(self.ptr, list(self.pending))

    def wait_event(self, event: Event) -> None:
        """Later work on this stream runs after the event: the host blocks until it is done."""
        assert isinstance(event, Event)
        while not event.done:
            time.sleep(1e-4)


_COMPUTE = Stream()


class MemoryPointer:
    def __init__(self, ptr: int):
        self.ptr = ptr


def _data(array) -> MemoryPointer:
    host = array._a
    if not host.flags.c_contiguous:
        raise ValueError("NCCL needs contiguous device buffers")
    return MemoryPointer(host.__array_interface__["data"][0])


def install() -> None:
    """Give this process's fake CuPy modules NCCL and the CUDA pieces above (for good)."""
    cuda = fake_cupy.modules()["cupy.cuda"]
    cuda.nccl, cuda.Stream, cuda.Event = nccl, Stream, Event
    cuda.get_current_stream = lambda device=None: _COMPUTE
    fake_cupy.ndarray.data = property(_data)


def main(argv: list[str]) -> int:
    from npgpt import backend, train

    install()
    backend.BUILTIN["fake-cupy"] = fake_cupy.make_backend
    status = train.main(argv[1:])
    from mpi4py import MPI

    t = fake_cupy.STATE.transfers
    report = {"status": status, "calls": CALLS, "compute_stream": _COMPUTE.ptr, "downloads": t.downloads,
              "download_bytes": t.download_bytes, "uploads": t.uploads, "upload_bytes": t.upload_bytes}  # fmt: skip
    Path(f"{argv[0]}.{MPI.COMM_WORLD.Get_rank()}.json").write_text(json.dumps(report))
    return status


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
