"""Backends: an array-API namespace `xp` plus the few operations the standard lacks.

The engine touches arrays only through `backend.xp` (the array API standard) and the
methods below, so the same model code runs on NumPy, on `array-api-strict` (the test
suite's stand-in for a GPU: it refuses hidden host conversion and float64 leaks) and on
plugins such as CuPy, which register a factory under the entry-point group
`npgpt.backends`:

    [project.entry-points."npgpt.backends"]
    cupy = "npgpt_cupy:make_backend"      # make_backend(device: str | None) -> Backend

A backend name may carry a device after a colon: "array-api-strict:device1", "cupy:1".
Without an install (a source checkout on PYTHONPATH, no entry points), a plugin is named
by its import path, `module:factory[:device]` ("npgpt_cupy:make_backend:1"), and the
plugins this project ships (KNOWN_PLUGINS) are found by name from their import path.
"""

from __future__ import annotations

import ctypes
import importlib
import resource
import sys
from collections.abc import Callable

import numpy as np

from npgpt.errors import UserError
from npgpt.kernels import Kernels, select_kernels
from npgpt.kernels.numpy_fast import KERNELS as NUMPY_KERNELS
from npgpt.namespaces import array_namespace, register_array_namespace  # noqa: F401 (re-exported for plugins)

ENTRY_POINT_GROUP = "npgpt.backends"
# Plugins of this project, found by import path when no entry point names them (a source
# checkout with PYTHONPATH=.:backends/cupy and nothing installed).
KNOWN_PLUGINS = {"cupy": "npgpt_cupy:make_backend"}
INSTALL_HINTS = {
    "cupy": (
        'pip install "npgpt[cupy13]" where nvidia-smi shows "CUDA Version: 13.x", "npgpt[cupy]" where it shows 12.x '
        "(a source checkout finds the plugin with PYTHONPATH=.:backends/cupy)"
    ),
    "array-api-strict": "pip install array-api-strict",
}


class BackendError(UserError, RuntimeError):
    """A backend that is unknown, not installed, or cannot run on this machine."""


class Backend:
    """An array namespace on one device, with the operations the array API lacks.

    This base class is portable: every method is written with `xp` alone, so a new
    backend only overrides what it can do faster (NumPy's `np.add.at`, CuPy's
    `cupyx.scatter_add`, a device RNG).

    `kernels` is the set of layer kernels the model calls (see `npgpt.kernels`): the
    plain reference unless the backend supplies its own; NPGPT_KERNELS=reference in
    the environment makes every backend use the reference.
    """

    def __init__(self, name: str, xp, device=None, kernels: Kernels | None = None):
        self.name = name
        self.xp = xp
        self.device = device
        self.kernels = select_kernels(kernels)

    def __repr__(self):
        return f"<Backend {self.name}>"

    # -- host <-> device: the only two places data crosses --------------------------
    def asarray(self, host, dtype=None):
        """Host data (NumPy array, list, scalar) -> an array on this backend's device."""
        return self.xp.asarray(host, dtype=dtype, device=self.device)

    def to_numpy(self, x) -> np.ndarray:
        """Device array -> NumPy array on the host (an explicit copy where needed)."""
        return np.from_dlpack(x)

    def holds(self, x) -> bool:
        """Whether `x` is an array of this backend (rather than host data to upload)."""
        try:
            return array_namespace(x) is self.xp
        except TypeError:
            return False

    def dtype(self, name: str):
        """A dtype of this namespace by its standard name ("float32", "int64", ...)."""
        return getattr(self.xp, name)

    # -- what the array API standard lacks -----------------------------------------
    def index_add(self, target, ids, values):
        """target[ids[n], :] += values[n, :] for every n, repeated ids summed.

        target (V, C), ids (N,) integer, values (N, C); returns the updated target
        (in place where the backend can). The portable form is a one-hot matmul:
        exact, and fine for test-sized V; real backends override it.
        """
        xp = self.xp
        one_hot = xp.astype(ids[:, None] == xp.arange(target.shape[0], dtype=ids.dtype, device=self.device), values.dtype)
        return target + xp.matmul(xp.matrix_transpose(one_hot), values)  # (V, N) @ (N, C)

    def uniform(self, rng: np.random.Generator, shape: tuple[int, ...], dtype):
        """Uniform [0, 1) samples on the device, drawn from a seeded host generator so
        every backend sees the same stream (dropout masks, reproducible runs)."""
        return self.asarray(rng.random(shape, dtype=np.float32), dtype=dtype)

    def communicator(self, comm):
        """The communicator data-parallel training sums this backend's arrays with: by
        default `comm` itself (MPI on host buffers, which NumPy arrays are); a GPU
        backend returns one that keeps gradients on the device (CuPy: NCCL)."""
        return comm

    def synchronize(self) -> None:
        """Wait for queued device work (for honest timing). Host backends: nothing."""

    def peak_memory_bytes(self) -> int:
        """Peak memory this process used on the backend's device (host RSS here)."""
        rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        return rss if sys.platform == "darwin" else rss * 1024


class NumpyBackend(Backend):
    """NumPy on the CPU: the reference backend, running the fast NumPy kernel set
    (`npgpt.kernels.numpy_fast`, its passes on `npgpt.kernels.threads`' pool) unless given
    another (`NumpyBackend(REFERENCE)`).

    Like a GPU framework's caching allocator, it asks glibc's malloc to keep freed memory
    for reuse: a training step allocates and frees the same large temporaries every time,
    and by default each one comes back from the OS as fresh zeroed pages (page faults
    cost 1.1x-2x of a small model's step time on these CPUs; see the README).
    """

    def __init__(self, kernels: Kernels | None = NUMPY_KERNELS):
        super().__init__("numpy", np, kernels=kernels)
        keep_freed_memory()

    def asarray(self, host, dtype=None):
        """Host and device are one here, so no copy -- except of read-only data (a memory-
        mapped checkpoint), since parameters are updated in place when training."""
        x = np.asarray(host, dtype=dtype)
        return x if x.flags.writeable else x.copy()

    def to_numpy(self, x) -> np.ndarray:
        return np.asarray(x)

    def index_add(self, target, ids, values):
        np.add.at(target, ids, values)
        return target


def keep_freed_memory() -> None:
    """Make glibc's malloc serve large blocks from its heap and keep freed memory (up to
    2 GiB) instead of unmapping it, in the pool threads' arenas too (a top pad of 64 MiB:
    their heaps, at most 64 MiB each, are never handed back, where a training piece's
    thread otherwise faults ~40 MB of fresh pages in every step); a no-op where the C
    library is not glibc."""
    try:
        libc = ctypes.CDLL("libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return
    M_TRIM_THRESHOLD, M_TOP_PAD, M_MMAP_THRESHOLD = -1, -2, -3
    mallopt(M_MMAP_THRESHOLD, 1 << 30)
    mallopt(M_TRIM_THRESHOLD, 1 << 31)
    mallopt(M_TOP_PAD, 1 << 26)


def _make_array_api_strict(device: str | None) -> Backend:
    import array_api_strict as xps

    devices = {str(d.__repr__()).split("'")[1]: d for d in xps.__array_namespace_info__().devices()}
    name = device or "CPU_DEVICE"
    if name not in devices:
        raise BackendError(f"array-api-strict has no device {name!r}; it has: {', '.join(devices)}")
    return Backend(f"array-api-strict:{name}", xps, devices[name])


BUILTIN: dict[str, Callable[[str | None], Backend]] = {
    "numpy": lambda device: NumpyBackend(),
    "array-api-strict": _make_array_api_strict,
}


def _plugins() -> dict[str, importlib.metadata.EntryPoint]:
    """Plugins by name: the installed entry points, else the known ones by import path.
    (importlib.metadata is imported here, not at start-up: it costs ~40 ms that the
    built-in backends never need.)"""
    import importlib.metadata

    known = {name: importlib.metadata.EntryPoint(name, value, ENTRY_POINT_GROUP) for name, value in KNOWN_PLUGINS.items()}
    return known | {ep.name: ep for ep in importlib.metadata.entry_points(group=ENTRY_POINT_GROUP)}


def _usable(entry: importlib.metadata.EntryPoint) -> bool:
    """Whether a plugin's module imports and, if it has an `available()`, that says yes
    (the CuPy plugin imports without CuPy; its `available()` checks for CuPy)."""
    try:
        module = importlib.import_module(entry.module)
    except ImportError:
        return False
    available = getattr(module, "available", None)
    return bool(available()) if callable(available) else True


def available_backends() -> list[str]:
    """Names of the backends that can be selected here: built-in ones whose library is
    installed, and plugins whose module and library import (a GPU is not checked)."""
    names = ["numpy"]
    try:
        import array_api_strict  # noqa: F401

        names.append("array-api-strict")
    except ImportError:
        pass
    return names + sorted(name for name, entry in _plugins().items() if name not in names and _usable(entry))


def _factory_by_path(spec: str) -> tuple[Callable[[str | None], Backend], str] | None:
    """`module:factory[:device]` -> (the factory, the device or ""); None when `spec` is
    not of that form or its module is not importable."""
    module_name, _, rest = spec.partition(":")
    attr, _, device = rest.partition(":")
    if not attr.isidentifier() or not all(part.isidentifier() for part in module_name.split(".")):
        return None
    try:
        module = importlib.import_module(module_name)
    except ModuleNotFoundError as e:
        if e.name == module_name or module_name.startswith(f"{e.name}."):  # the module itself is missing
            return None
        raise
    factory = getattr(module, attr, None)
    if not callable(factory):
        raise BackendError(f"{module_name!r} has no backend factory {attr!r}; a plugin is named as module:factory")
    return factory, device


def get_backend(spec: str | Backend = "numpy") -> Backend:
    """A backend by name, e.g. "numpy", "cupy", "array-api-strict:device1", or a plugin by
    import path, "npgpt_cupy:make_backend" (a device may follow: "...:make_backend:1")."""
    if isinstance(spec, Backend):
        return spec
    name, _, device = spec.partition(":")
    factory = BUILTIN.get(name)
    if factory is None:
        entry = _plugins().get(name)
        by_path = _factory_by_path(spec) if entry is None else None
        if entry is None and by_path is None:
            hint = f"; install it with: {INSTALL_HINTS[name]}" if name in INSTALL_HINTS else "; or name a plugin as module:factory"
            raise BackendError(f"unknown backend {name!r}; available here: {', '.join(available_backends())}{hint}")
        try:
            factory, device = by_path if by_path is not None else (entry.load(), device)
        except ImportError as e:
            raise _not_usable(name, e) from e
    try:
        return factory(device or None)
    except ImportError as e:
        raise _not_usable(name, e) from e


def _not_usable(name: str, error: ImportError) -> BackendError:
    hint = INSTALL_HINTS.get(name, f"install the package that provides {name!r}")
    return BackendError(f"backend {name!r} is not usable here ({error}); to fix: {hint}")
