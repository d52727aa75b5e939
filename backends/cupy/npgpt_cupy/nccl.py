"""Gradients between GPUs over NCCL (`cupy.cuda.nccl`), for `mpiexec -n N ... --backend cupy`.

As llm.c does: rank 0 makes an NCCL unique id, MPI broadcasts it, and every rank joins
one NCCL communicator with its own GPU. The collectives run on a stream of their own:
each waits (on the device) for the work queued so far on the compute stream, and the
compute stream waits for it before the optimizer reads the result, so a bucket's
reduction overlaps the rest of the backward pass and nothing crosses to the host.
Host-side collectives (the stop flag, the validation loss, checkpoint gathers) stay on MPI.
"""

from __future__ import annotations

from npgpt.distributed import Comm

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

    def _launch(self, call):
        """Queue `call(stream_ptr)` on the NCCL stream after everything queued so far on
        the compute stream; the request is the event marking its end."""
        compute = self.cupy.cuda.get_current_stream()
        self.stream.wait_event(compute.record())
        call(self.stream.ptr)
        return self.stream.record()

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
        """The compute stream waits (on the device) for each collective; the host goes on."""
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
