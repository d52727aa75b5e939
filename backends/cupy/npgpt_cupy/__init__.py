"""npgpt's CuPy backend: the engine on an NVIDIA GPU.

Registered under the entry-point group `npgpt.backends` as `cupy` (and known to
`npgpt.backend` by import path, so a checkout with PYTHONPATH=.:backends/cupy needs no
install), `get_backend("cupy")` (or "cupy:1" for the second GPU) returns a `CupyBackend`:

- `xp`: CuPy's own namespace, which follows NumPy 2 and so the array API, plus the
  `device=` keyword of the creation functions (`npgpt_cupy.namespace`). CuPy arrays do
  not name their namespace (`__array_namespace__`), so the factory registers it with
  `npgpt.backend.register_array_namespace`.
- host <-> device copies happen only in `asarray` (upload) and `to_numpy` (`.get()`):
  CuPy refuses implicit conversion to NumPy, so any other crossing is an error.
- `index_add` is deterministic (the same bits on every run, unlike `cupyx.scatter_add`'s
  atomic adds): a segment sum by a one-hot matmul over the distinct ids.
- Indices are range-checked on the device (`namespace.CupyNamespace.check_indices`);
  a bad one raises IndexError at the next read-back (`to_numpy`, `synchronize`).
- `synchronize` waits on the current stream, `peak_memory_bytes` is what CuPy's memory
  pool holds.
- `uniform` (dropout's draws) runs on the GPU: cuRAND's Philox seeded by one draw from
  the host generator, so nothing is uploaded and a run still follows from its seed (and
  resumes bit for bit); the masks are not NumPy's.
- `kernels` is the fused set of `npgpt_cupy.kernels` (GELU, LayerNorm, attention's
  softmax, cross-entropy, dropout as CuPy kernels; the rest is the reference's).
- `communicator` (under mpiexec) sums gradients over NCCL between the ranks' GPUs.

Either CuPy wheel works, `cupy-cuda12x` (extra `npgpt[cupy]`) or `cupy-cuda13x`
(`npgpt[cupy13]`): both install the module `cupy`. Selecting the backend fails with a
`BackendError` saying what is wrong: CuPy missing (ImportError, turned into an install
hint by `get_backend`), CuPy too old, or no usable GPU.
"""

from __future__ import annotations

import functools
import importlib.metadata
import importlib.util
import os
import sys

from npgpt.backend import Backend, BackendError, register_array_namespace

from npgpt_cupy.kernels import KERNELS
from npgpt_cupy.namespace import CupyNamespace

__all__ = ["CupyBackend", "available", "make_backend"]

CURAND_PHILOX = 161  # curand.h's CURAND_RNG_PSEUDO_PHILOX4_32_10: a counter-based generator, no set-up kernel
SEGMENT_ROWS = 2048  # rows per one-hot block of index_add: at most (N, 2048) floats at a time

NO_GPU_HINT = (
    "check that this machine has an NVIDIA GPU and driver (`nvidia-smi` must list the GPU) and that your CuPy "
    'wheel suits the driver: cupy-cuda13x where nvidia-smi shows "CUDA Version: 13.x", cupy-cuda12x for 12.x'
)


def available() -> bool:
    """Whether CuPy is installed (without importing it; a GPU is checked only on use)."""
    if "cupy" in sys.modules:  # imported already (or blocked: None)
        return sys.modules["cupy"] is not None
    return importlib.util.find_spec("cupy") is not None


class CupyBackend(Backend):
    """Arrays in one GPU's memory through CuPy; the device is made current for the thread."""

    def __init__(self, cupy, cupyx, device):
        super().__init__(f"cupy:{device.id}", array_api_namespace(cupy), device, kernels=KERNELS)
        self._cupy, self._cupyx = cupy, cupyx
        self._float16_checked = False

    def dtype(self, name: str):
        """A dtype by name; the first ask for float16 runs a float16 kernel, since those
        compile against CUDA's headers (cuda_fp16.h), which a bare driver lacks."""
        if name == "float16" and not self._float16_checked:
            _check_float16(self)
            self._float16_checked = True
        return super().dtype(name)

    def asarray(self, host, dtype=None):
        """Host data -> device array: the one host->device copy."""
        with self.device:
            return self._cupy.asarray(host, dtype=dtype)

    def to_numpy(self, x):
        """Device array -> NumPy: the one device->host copy (waits for the array's work);
        IndexError if an out-of-range index was used since the last read-back."""
        host = x.get()
        self.xp.raise_on_bad_index(self.device.id)
        return host

    def index_add(self, target, ids, values):
        """target[ids[n], :] += values[n, :] in place, repeated ids summed, with the same
        bits on every run (atomic adds, as in `cupyx.scatter_add`, sum in a varying order).

        Distinct ids are added by plain indexing. Otherwise
        each distinct id's rows are summed by a matmul with a one-hot (U distinct ids,
        rows) matrix, SEGMENT_ROWS rows at a time, and added to its row once: 2 U N C
        flops for N rows of C. `cupy.unique` costs one synchronisation (its size is data).
        """
        xp = self.xp
        xp.check_indices(ids, target.shape[0])
        distinct, inverse = self._cupy.unique(ids, return_inverse=True)  # (U,), (N,)
        if distinct.size == ids.size:
            target[ids] += values
            return target
        U, (N, C) = distinct.size, values.shape
        sums = xp.zeros((U, C), dtype=values.dtype, device=self.device)
        slots = xp.arange(U, dtype=inverse.dtype, device=self.device)[:, None]  # (U, 1)
        for r0 in range(0, N, SEGMENT_ROWS):
            r1 = min(r0 + SEGMENT_ROWS, N)
            one_hot = xp.astype(slots == inverse[None, r0:r1], values.dtype)  # (U, rows)
            sums += one_hot @ values[r0:r1, :]
        target[distinct] += sums
        return target

    def communicator(self, comm):
        """NCCL between the ranks' GPUs (`npgpt_cupy.nccl`), its id sent over `comm` (MPI)."""
        if comm.size == 1:
            return comm
        from npgpt_cupy.nccl import NCCLComm

        return NCCLComm(comm, self._cupy)

    def uniform(self, rng, shape, dtype):
        """U[0, 1) samples drawn on the GPU by cuRAND's Philox generator, seeded with one
        draw from the host generator `rng`: no upload, and the same `rng` state gives the
        same samples (the stream is not NumPy's: the masks differ from other backends')."""
        xp, seed = self.xp, int(rng.integers(2**63))
        draw = dtype if dtype in (xp.float32, xp.float64) else xp.float32
        with self.device:
            samples = self._cupy.random.RandomState(seed, method=CURAND_PHILOX).random_sample(shape, dtype=draw)
        if draw == dtype:
            return samples
        below_one = 1.0 - float(xp.finfo(dtype).epsneg)  # float16 rounds 0.9999 up to 1: keep [0, 1)
        return xp.minimum(xp.astype(samples, dtype), below_one)

    def synchronize(self) -> None:
        """Wait for the stream's work (IndexError if an out-of-range index was used)."""
        self._cupy.cuda.get_current_stream().synchronize()
        self.xp.raise_on_bad_index(self.device.id)

    def peak_memory_bytes(self) -> int:
        """Bytes held by CuPy's memory pool: its high-water mark, since the pool keeps
        freed blocks for reuse and only returns them on `free_all_blocks()`."""
        return self._cupy.get_default_memory_pool().total_bytes()


@functools.cache
def array_api_namespace(cupy) -> CupyNamespace:
    """One namespace per `cupy` module, shared by every device's backend (it is
    device-free), so `Backend.holds` recognises CuPy arrays whichever backend asks."""
    return CupyNamespace(cupy)


def make_backend(device: str | None) -> CupyBackend:
    """The `npgpt.backends` factory: "cupy" is GPU 0, "cupy:1" GPU 1.

    Raises ImportError without CuPy, BackendError with CuPy but no usable GPU.
    """
    try:
        import cupy
        import cupyx
    except ImportError as e:  # get_backend turns this into an install hint
        raise ImportError(f"CuPy is not installed or cannot be imported: {e}") from e

    if not hasattr(cupy.ndarray, "mT"):
        raise BackendError(
            f"CuPy {cupy.__version__} is too old: npgpt needs CuPy 14 or newer (NumPy 2's API, ndarray.mT); "
            f'to fix: pip install -U "{_cupy_wheel()}>=14"'
        )
    index = _device_index(device)
    count = _device_count(cupy)
    if index >= count:
        raise BackendError(f"there is no GPU {index}: CuPy sees {count} GPU(s), numbered 0 to {count - 1}")
    gpu = cupy.cuda.Device(index)
    gpu.use()  # CuPy computes on the current device: make it this one for the thread
    backend = CupyBackend(cupy, cupyx, gpu)
    register_array_namespace(cupy.ndarray, backend.xp)
    _refuse_tf32()
    _smoke_test(backend)
    return backend


def _device_index(device: str | None) -> int:
    if device is None:
        return 0
    if not device.isdigit():
        raise BackendError(f"a CuPy device is a GPU number, as in cupy:0 or cupy:1, got cupy:{device}")
    return int(device)


def _device_count(cupy) -> int:
    """How many GPUs CUDA sees; BackendError (saying why) when it sees none."""
    try:
        count = cupy.cuda.runtime.getDeviceCount()
    except Exception as e:  # CUDARuntimeError: no device, no driver, driver too old
        raise BackendError(f"CuPy is installed but cannot reach a GPU ({_why(e)}); {NO_GPU_HINT}") from e
    if count == 0:
        raise BackendError(f"CuPy is installed but CUDA sees no GPU; {NO_GPU_HINT}")
    return count


def _smoke_test(backend: CupyBackend) -> None:
    """Compile and run one tiny kernel now, so missing CUDA libraries (NVRTC, cuBLAS)
    show up here with a hint rather than in the middle of a forward pass."""
    if failure := _tiny_kernel_fails(backend, backend.xp.float32):
        raise BackendError(
            f"CuPy found GPU {backend.device.id} but cannot run a kernel on it ({_why(failure)}); "
            f"the CUDA libraries may be missing: pip install \"{_cupy_wheel()}[ctk]\" brings them; else {NO_GPU_HINT}"
        ) from failure


def _tiny_kernel_fails(backend: CupyBackend, dtype) -> Exception | None:
    """Run an elementwise kernel and a matmul in `dtype`; the exception, if one is raised."""
    try:
        x = backend.asarray([[1.0, 2.0]], dtype=dtype)
        backend.to_numpy(backend.xp.tanh(x) @ x.mT)
    except Exception as e:  # a compile error, a missing library, no device: reported by the caller
        return e
    return None


def _refuse_tf32() -> None:
    """CUPY_TF32=1 turns float32 matmuls into TF32 (a 10-bit mantissa): float32 results
    would then differ from NumPy's by ~1e-3, not round-off, so it is refused."""
    if os.environ.get("CUPY_TF32", "0") != "0":
        raise BackendError(
            f"CUPY_TF32={os.environ['CUPY_TF32']} makes float32 matmuls TF32, ~1e-3 off the float32 results npgpt "
            "promises; to fix: unset CUPY_TF32 (for speed, use --dtype float16 instead)"
        )


def _check_float16(backend: CupyBackend) -> None:
    """Run a float16 kernel and matmul (BackendError if they fail)."""
    if failure := _tiny_kernel_fails(backend, backend.xp.float16):
        raise BackendError(
            f"CuPy cannot run float16 kernels on GPU {backend.device.id} ({_why(failure)}); they need CUDA's "
            f'headers (cuda_fp16.h): pip install "{_cupy_wheel()}[ctk]" brings them, or set CUDA_PATH to a CUDA '
            "toolkit; else use float32"
        ) from failure


def _why(error: Exception) -> str:
    """An exception in one line (a compile error's message carries the whole log)."""
    lines = str(error).strip().splitlines()
    return f"{type(error).__name__}: {lines[0]}" if lines else type(error).__name__


def _cupy_wheel() -> str:
    """The name of the installed CuPy distribution ("cupy-cuda13x", ...)."""
    names = importlib.metadata.packages_distributions().get("cupy") or ["cupy-cuda13x"]
    return names[0]
