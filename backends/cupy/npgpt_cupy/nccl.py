"""Gradients between GPUs over NCCL (`cupy.cuda.nccl`), for `mpiexec -n N ... --backend cupy`.

As llm.c does: rank 0 makes an NCCL unique id, MPI broadcasts it, and every rank joins
one NCCL communicator with its own GPU. The collectives run on a stream of their own:
each waits (on the device) for the work queued so far on the compute stream, and the
compute stream waits for it before the optimizer reads the result, so a bucket's
reduction overlaps the rest of the backward pass and nothing crosses to the host.
Host-side collectives (the stop flag, the validation loss, checkpoint gathers) stay on MPI.

Bounded waits. The host never blocks on a collective itself, but a later read-back (the
loss, a checkpoint) would block for ever behind one that never finishes (a rank hangs, a
link fails). So a watchdog thread, as PyTorch's NCCL process group has, tests the oldest
unfinished collective's event every WATCH_SECONDS; once one has been pending for
`timeout` seconds (--comm-timeout) it aborts the NCCL communicator (ncclCommAbort: the
stuck kernels return) and ends the job through MPI with the one-line message MPI's own
waits give. A rank that dies outright is ended by mpiexec, as on the MPI path.
"""

from __future__ import annotations

import collections
import os
import signal
import threading
import time

from npgpt.distributed import Comm, hung_message

WATCH_SECONDS = 0.05  # how often the watchdog tests the oldest pending collective

NCCL_TYPES = {"float16": "NCCL_FLOAT16", "float32": "NCCL_FLOAT32", "float64": "NCCL_FLOAT64"}


class NCCLComm(Comm):
    """Device-buffer collectives over NCCL, host ones delegated to an MPI communicator."""

    def __init__(self, host: Comm, cupy):
        super().__init__()
        self.host, self.cupy = host, cupy
        self.rank, self.size = host.rank, host.size
        self.local_rank, self.local_size, self.timeout = host.local_rank, host.local_size, host.timeout
        nccl = self.nccl = cupy.cuda.nccl
        unique_id = nccl.get_unique_id() if host.rank == 0 else None
        unique_id = host.broadcast_object(unique_id)
        self.comm = nccl.NcclCommunicator(host.size, unique_id, host.rank)
        self.stream = cupy.cuda.Stream(non_blocking=True)  # collectives run here
        self.device = cupy.cuda.Device()  # this rank's GPU (the backend made it current)
        self._pending: collections.deque = collections.deque()  # (event, launch time), oldest first
        self._lock = threading.Lock()
        self._watchdog: threading.Thread | None = None

    def _launch(self, call):
        """Queue `call(stream_ptr)` on the NCCL stream after everything queued so far on
        the compute stream; the request is the event marking its end (watched)."""
        compute = self.cupy.cuda.get_current_stream()
        self.stream.wait_event(compute.record())
        call(self.stream.ptr)
        event = self.stream.record()
        with self._lock:
            self._pending.append((event, time.monotonic()))
            if self._watchdog is None:
                self._watchdog = threading.Thread(target=self._watch, name="npgpt-nccl-watchdog", daemon=True)
                self._watchdog.start()
        return event

    def _watch(self):
        """Drop finished collectives (one stream: they finish in order); end the job when
        the oldest has been pending for `timeout` seconds."""
        signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGINT, signal.SIGTERM})  # Ctrl-C stays with the main thread
        self.device.use()  # the current device is per thread: query the events on this rank's GPU
        while True:
            with self._lock:
                while self._pending and self._pending[0][0].done:
                    self._pending.popleft()
                launched = self._pending[0][1] if self._pending else None
            if launched is not None and time.monotonic() - launched > self.timeout:
                self._hung(time.monotonic() - launched)
            time.sleep(WATCH_SECONDS)

    def _hung(self, waited: float):
        """Abort NCCL and end the job, saying which rank gave up and how to go on."""
        message = hung_message(self.rank, waited, "the other ranks' NCCL collective")
        try:
            self.comm.abort()
        except Exception:  # noqa: BLE001 - ending the job matters more than a clean NCCL abort
            pass
        self.host.abort(message)
        os._exit(1)  # a host without MPI_Abort

    def _type(self, buf):
        return getattr(self.nccl, NCCL_TYPES[str(buf.dtype)])

    def start_allreduce(self, buf):
        ptr, n = buf.data.ptr, buf.size
        return self._launch(lambda s: self.comm.allReduce(ptr, ptr, n, self._type(buf), self.nccl.NCCL_SUM, s))

    def start_reduce_scatter(self, buf, out):
        send, recv, n = buf.data.ptr, out.data.ptr, out.size
        return self._launch(lambda s: self.comm.reduceScatter(send, recv, n, self._type(buf), self.nccl.NCCL_SUM, s))

    def start_allgather(self, buf):
        n = buf.size // self.size  # in place: this rank's part sits at offset rank * n
        send, recv = buf.data.ptr + self.rank * n * buf.itemsize, buf.data.ptr
        return self._launch(lambda s: self.comm.allGather(send, recv, n, self._type(buf), s))

    def wait(self, requests) -> None:
        """The compute stream waits (on the device) for each collective; the host goes on
        (a later read-back waits for them, bounded by the watchdog)."""
        compute = self.cupy.cuda.get_current_stream()
        for event in requests:
            if event is not None:
                compute.wait_event(event)

    def allreduce_host(self, values):
        return self.host.allreduce_host(values)

    def gather_host(self, array):
        return self.host.gather_host(array)

    def allgather_object(self, obj) -> list:
        return self.host.allgather_object(obj)

    def broadcast_object(self, obj):
        return self.host.broadcast_object(obj)

    def abort(self, message: str, status: int = 1):
        self.host.abort(message, status)

    def take_wait_seconds(self) -> float:
        return self.host.take_wait_seconds()
