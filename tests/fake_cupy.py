"""A stand-in for the `cupy` and `cupyx` modules, built on NumPy, so the CuPy plugin's own
code runs in CI on machines without a GPU.

It imitates CuPy 14 where npgpt could go wrong on a real GPU:

- Arrays refuse implicit conversion to NumPy (`__array__` raises TypeError with CuPy's
  message) and refuse NumPy arrays as operands. Data crosses only through explicit calls,
  each counted in `STATE.transfers`: uploads (`cupy.asarray`/`cupy.array` of host data)
  and downloads (`.get()`, `cupy.asnumpy`, `.item()`, `.tolist()`, `float(x)`, ...).
- Arrays have `.mT` but no `__array_namespace__`; creation functions take no `device=`;
  reductions and scalar indexing give 0-d arrays, not scalars.
- Each array lives on the device that was current when it was made; using it while
  another device is current raises CuPy's ValueError (no peer access here).
- `cupyx.scatter_add` sums repeated indices (it is `numpy.add.at`, as CuPy documents);
  `cupy.unique` counts a synchronisation, as CuPy's waits for its data-dependent size;
  `take`, `take_along_axis` and integer-array indexing wrap an index outside the axis
  around, as CuPy's do.
- `cupy.cuda`: `Device` (context manager, `.use()`, `.synchronize()`), `runtime.
  getDeviceCount()` (raising CUDARuntimeError when `STATE.device_count == 0`),
  `get_current_stream().synchronize()` (counted), and a memory pool whose
  `total_bytes()` is the high-water mark of live arrays' bytes.

It is stricter than CuPy in one way: NumPy functions called on its arrays raise (CuPy
dispatches some through `__array_function__`), so host code cannot silently compute on
device arrays.

Use `install(monkeypatch)` in a test: it puts `cupy`, `cupyx`, `cupy.cuda` and
`cupy.cuda.runtime` into sys.modules for that test and resets the state. `make_backend`
builds the plugin's backend on the fake for the whole-suite `fake-cupy` backend.
`write_import_shim(folder)` makes `import cupy` give the fake in another process.
`ElementwiseKernel` and `ReductionKernel` run kernel code written in a small subset of
CUDA C (see KERNEL_FUNCTIONS) on NumPy, so fused kernels are tested here against the
reference; that they compile with NVRTC is checked only on a GPU (tests/test_cupy_gpu.py).
"""

from __future__ import annotations

import re
import sys
import types
import weakref
from dataclasses import dataclass, field

import numpy as np

__version__ = "14.2.0"


# -- state: current device, transfers, memory -----------------------------------------------
@dataclass
class Transfers:
    uploads: int = 0  # host -> device copies
    downloads: int = 0  # device -> host copies
    upload_bytes: int = 0
    download_bytes: int = 0
    syncs: int = 0  # explicit stream/device synchronisations

    def snapshot(self) -> Transfers:
        return Transfers(self.uploads, self.downloads, self.upload_bytes, self.download_bytes, self.syncs)

    def __sub__(self, other: Transfers) -> Transfers:
        return Transfers(*(a - b for a, b in zip(self.astuple(), other.astuple())))

    def astuple(self):
        return (self.uploads, self.downloads, self.upload_bytes, self.download_bytes, self.syncs)


@dataclass
class State:
    device_count: int = 2
    current: int = 0
    transfers: Transfers = field(default_factory=Transfers)
    used_bytes: int = 0
    peak_bytes: int = 0
    log: list = field(default_factory=list)  # ("up"/"down", shape) of each transfer, in order

    def upload(self, host: np.ndarray):
        self.transfers.uploads += 1
        self.transfers.upload_bytes += host.nbytes
        self.log.append(("up", host.shape))

    def download(self, host: np.ndarray):
        self.transfers.downloads += 1
        self.transfers.download_bytes += host.nbytes
        self.log.append(("down", host.shape))


STATE = State()


def reset(device_count: int = 2) -> None:
    global STATE
    STATE = State(device_count=device_count)


def _allocated(nbytes: int) -> None:
    STATE.used_bytes += nbytes
    STATE.peak_bytes = max(STATE.peak_bytes, STATE.used_bytes)


def _freed(state: State, nbytes: int) -> None:
    state.used_bytes -= nbytes


# -- the array ------------------------------------------------------------------------------
class ndarray:  # noqa: N801 - CuPy's spelling
    """A NumPy array standing for device memory on one device."""

    __slots__ = ("_a", "_dev", "__weakref__")
    __array_priority__ = 100
    __array_ufunc__ = None  # NumPy operators defer to ours, which refuse NumPy operands
    __hash__ = None

    def __init__(self, *args, **kwargs):
        raise TypeError("create fake cupy arrays with the module's functions (cupy.asarray, cupy.zeros, ...)")

    # -- what must not happen implicitly
    def __array__(self, dtype=None, copy=None):
        raise TypeError(
            "Implicit conversion to a NumPy array is not allowed. Please use `.get()` to construct a NumPy array explicitly."
        )

    # -- explicit downloads
    def get(self, stream=None, order="C", out=None, blocking=True) -> np.ndarray:
        host = np.array(_host(self), order=order, copy=True)
        STATE.download(host)
        if out is not None:
            out[...] = host
            return out
        return host

    def item(self):
        return self.get().item()

    def tolist(self):
        return self.get().tolist()

    def __float__(self):
        return float(self.get())

    def __int__(self):
        return int(self.get())

    def __bool__(self):
        return bool(self.get())

    def __complex__(self):
        return complex(self.get())

    # -- attributes
    shape = property(lambda self: self._a.shape)
    ndim = property(lambda self: self._a.ndim)
    size = property(lambda self: self._a.size)
    dtype = property(lambda self: self._a.dtype)
    nbytes = property(lambda self: self._a.nbytes)
    itemsize = property(lambda self: self._a.itemsize)
    strides = property(lambda self: self._a.strides)
    device = property(lambda self: Device(self._dev))
    T = property(lambda self: _wrap(_host(self).T))

    @property
    def mT(self):  # noqa: N802
        if self.ndim < 2:
            raise ValueError("matrix transpose with ndim < 2 is undefined")
        return _wrap(np.swapaxes(_host(self), -1, -2))

    def __len__(self):
        return len(self._a)

    def __iter__(self):
        return (_wrap(row) for row in _host(self))

    def __repr__(self):  # no data: printing must not be a hidden download
        return f"fake_cupy.ndarray(shape={self.shape}, dtype={self.dtype}, device={self._dev})"

    # -- indexing
    def __getitem__(self, key):
        return _wrap(_host(self)[_wrapped_indices(_unwrap(key), self.shape)])

    def __setitem__(self, key, value):
        _host(self)[_wrapped_indices(_unwrap(key), self.shape)] = _unwrap(value)

    # -- methods CuPy arrays have
    def astype(self, dtype, order="K", casting=None, subok=None, copy=True):
        return _wrap(_host(self).astype(dtype, order=order, copy=copy))

    def reshape(self, *shape, order="C"):
        return _wrap(_host(self).reshape(*shape, order=order))

    def copy(self, order="C"):
        return _wrap(_host(self).copy(order=order))

    def transpose(self, *axes):
        return _wrap(_host(self).transpose(*axes))


def _method(name):
    def method(self, *args, **kwargs):
        return _wrap(getattr(_host(self), name)(*_unwrap(args), **_unwrap(kwargs)))

    method.__name__ = name
    return method


for _name in ("sum", "mean", "max", "min", "argmax", "argmin", "any", "all", "ravel", "flatten",
              "squeeze", "swapaxes", "clip", "cumsum", "prod", "std", "var", "dot", "repeat", "fill"):  # fmt: skip
    setattr(ndarray, _name, _method(_name))


def _operator(name):
    def op(self, other):
        result = getattr(_host(self), name)(_unwrap(other))
        return self if result is self._a else _wrap(result)  # in-place ops keep the array

    op.__name__ = name
    return op


for _name in ("add", "sub", "mul", "truediv", "floordiv", "mod", "pow", "matmul", "and", "or", "xor",
              "lshift", "rshift"):  # fmt: skip
    for _form in (f"__{_name}__", f"__r{_name}__", f"__i{_name}__"):
        setattr(ndarray, _form, _operator(_form))
for _name in ("__eq__", "__ne__", "__lt__", "__le__", "__gt__", "__ge__"):
    setattr(ndarray, _name, _operator(_name))
for _name in ("__neg__", "__pos__", "__abs__", "__invert__"):
    setattr(ndarray, _name, (lambda n: lambda self: _wrap(getattr(_host(self), n)()))(_name))


def _host(x: ndarray) -> np.ndarray:
    """The NumPy data behind x, after CuPy's check that x is on the current device."""
    if x._dev != STATE.current:
        raise ValueError(
            f"The device where the array resides ({x._dev}) is different from the current device ({STATE.current}). "
            "Peer access is unavailable between these devices."
        )
    return x._a


def _wrapped_indices(key, shape):
    """Integer-array indices taken modulo their axis, as CuPy's indexing wraps them."""
    keys = key if isinstance(key, tuple) else (key,)
    if any(k is None or k is Ellipsis for k in keys):
        return key
    wrapped = tuple(k % n if isinstance(k, np.ndarray) and k.dtype.kind in "iu" else k for k, n in zip(keys, shape))
    wrapped += keys[len(wrapped) :]
    return wrapped if isinstance(key, tuple) else wrapped[0]


def _wrap(result):
    """NumPy results -> device arrays on the current device (scalars become 0-d arrays)."""
    if isinstance(result, np.generic):
        result = np.asarray(result)
    if isinstance(result, tuple):
        return tuple(_wrap(r) for r in result)
    if not isinstance(result, np.ndarray):
        return result
    x = object.__new__(ndarray)
    x._a, x._dev = result, STATE.current
    if result.base is None and result.nbytes:  # owns its memory: count it in the pool
        _allocated(result.nbytes)
        weakref.finalize(x, _freed, STATE, result.nbytes)
    return x


def _unwrap(value):
    """Operands -> NumPy, refusing host arrays as CuPy does (scalars, slices, dtypes pass)."""
    if isinstance(value, ndarray):
        return _host(value)
    if isinstance(value, np.ndarray):
        raise TypeError(f"Unsupported type {type(value)}")
    if isinstance(value, (tuple, list)):
        return type(value)(_unwrap(v) for v in value)
    if isinstance(value, dict):
        return {k: _unwrap(v) for k, v in value.items()}
    return value


# -- module functions -----------------------------------------------------------------------
def asarray(a, dtype=None, order=None, *, copy=None, blocking=False):
    """Device arrays pass through (cast if asked); host data is uploaded (counted)."""
    if isinstance(a, ndarray):
        return a if dtype is None or a.dtype == np.dtype(dtype) else a.astype(dtype)
    host = np.array(a, dtype=dtype, order=order or "K", copy=True)
    STATE.upload(host)
    return _wrap(host)


def array(obj, dtype=None, copy=True, order="K", subok=False, ndmin=0, *, blocking=False):
    if isinstance(obj, ndarray):
        return _wrap(np.array(_host(obj), dtype=dtype, copy=True, ndmin=ndmin))
    host = np.array(obj, dtype=dtype, copy=True, order=order, ndmin=ndmin)
    STATE.upload(host)
    return _wrap(host)


def asnumpy(a, stream=None, order="C", out=None, *, blocking=True):
    return a.get(stream, order, out, blocking) if isinstance(a, ndarray) else np.asarray(a, order=order)


def _device_function(name):
    """numpy.NAME on device arrays, without the `device=` keyword CuPy lacks."""
    np_function = getattr(np, name)

    def function(*args, **kwargs):
        if "device" in kwargs:
            raise TypeError(f"{name}() got an unexpected keyword argument 'device'")
        return _wrap(np_function(*_unwrap(args), **_unwrap(kwargs)))

    function.__name__ = name
    return function


# Names checked against CuPy 14.2's `cupy/__init__.py`.
DEVICE_FUNCTIONS = (
    "zeros ones empty full zeros_like ones_like empty_like full_like arange eye linspace "
    "reshape transpose permute_dims matrix_transpose take take_along_axis stack concatenate "
    "concat where exp log log1p tanh sqrt square sum mean max min maximum minimum argmax "
    "argmin astype abs matmul clip sort argsort cumsum all any isfinite isnan sign expand_dims "
    "squeeze broadcast_to flip tril triu var std prod einsum outer power pow multiply add "
    "subtract divide negative equal not_equal less less_equal greater greater_equal "
    "logical_and logical_or logical_not exp2 log2 floor ceil round mod count_nonzero "
    "moveaxis ravel allclose array_equal"
).split()
HOST_ATTRIBUTES = (
    "isdtype finfo iinfo result_type can_cast dtype float16 float32 float64 int8 int16 int32 "
    "int64 uint8 bool bool_ inf nan pi e newaxis"
).split()


def take(a, indices, axis=None, out=None):
    """cupy.take: an index outside the axis wraps around (CuPy checks nothing)."""
    a, indices = _unwrap(a), _unwrap(indices)
    return _wrap(np.take(a, indices, axis=axis, mode="wrap"))


def take_along_axis(a, indices, axis):
    """cupy.take_along_axis: fancy indexing, which wraps an index outside the axis."""
    a, indices = _unwrap(a), _unwrap(indices)
    return _wrap(np.take_along_axis(a, indices % a.shape[axis], axis=axis))


def unique(ar, *args, **kwargs):
    """cupy.unique: its result's size depends on the data, so CuPy synchronises (counted)."""
    STATE.transfers.syncs += 1
    return _wrap(np.unique(_unwrap(ar), *args, **_unwrap(kwargs)))


def scatter_add(a, slices, value):
    """cupyx.scatter_add: a[slices] += value with repeated indices summed, in place."""
    if not isinstance(a, ndarray):
        raise TypeError(f"scatter_add needs a cupy.ndarray, got {type(a)}")
    np.add.at(_host(a), _unwrap(slices), _unwrap(value))


# -- cupy.cuda -------------------------------------------------------------------------------
class CUDARuntimeError(RuntimeError):
    pass


class Device:
    """A CUDA device by number; `with Device(i):` makes it current for the block."""

    def __init__(self, device=None):
        self.id = STATE.current if device is None else int(device)
        self._previous = []

    def __enter__(self):
        self._previous.append(STATE.current)
        self.use()
        return self

    def __exit__(self, *exc):
        STATE.current = self._previous.pop()

    def use(self):
        if not 0 <= self.id < STATE.device_count:
            raise CUDARuntimeError("cudaErrorInvalidDevice: invalid device ordinal")
        STATE.current = self.id

    def synchronize(self):
        STATE.transfers.syncs += 1

    def __eq__(self, other):
        return isinstance(other, Device) and other.id == self.id

    def __hash__(self):
        return hash(self.id)

    def __repr__(self):
        return f"<CUDA Device {self.id}>"

    @property
    def mem_info(self) -> tuple[int, int]:
        """(free, total) bytes: total is FAKE_MEMORY_BYTES, used is what live arrays hold."""
        return FAKE_MEMORY_BYTES - STATE.used_bytes, FAKE_MEMORY_BYTES


class Stream:
    def synchronize(self):
        STATE.transfers.syncs += 1


def get_current_stream(device=None) -> Stream:
    return Stream()


def getDeviceCount() -> int:  # noqa: N802 - CUDA's spelling
    if STATE.device_count == 0:
        raise CUDARuntimeError("cudaErrorNoDevice: no CUDA-capable device is detected")
    return STATE.device_count


def getDeviceProperties(device: int) -> dict:  # noqa: N802
    """A few of cudaDeviceProp's fields, as CuPy returns them (the name as bytes)."""
    if not 0 <= device < STATE.device_count:
        raise CUDARuntimeError("cudaErrorInvalidDevice: invalid device ordinal")
    return {"name": b"fake GPU (tests/fake_cupy.py, NumPy)", "totalGlobalMem": FAKE_MEMORY_BYTES, "major": 0, "minor": 0,
            "multiProcessorCount": 1}  # fmt: skip


FAKE_MEMORY_BYTES = 16 * 2**30
FAKE_CUDA_VERSION = 13000  # CUDA's integer form of 13.0


def driverGetVersion() -> int:  # noqa: N802
    return FAKE_CUDA_VERSION


def runtimeGetVersion() -> int:  # noqa: N802
    return FAKE_CUDA_VERSION


class MemoryPool:
    def used_bytes(self) -> int:
        return STATE.used_bytes

    def total_bytes(self) -> int:
        return STATE.peak_bytes

    def free_all_blocks(self) -> None:
        STATE.peak_bytes = STATE.used_bytes


_POOL = MemoryPool()


def get_default_memory_pool() -> MemoryPool:
    return _POOL


class RandomState:
    """cupy.random.RandomState: a seeded generator drawing on the device (no upload); here
    NumPy's PCG64 stands in for cuRAND, so the numbers are not CuPy's."""

    def __init__(self, seed=None, method=100):
        self._rng = np.random.default_rng(seed)
        self.method = method

    def random_sample(self, size=None, dtype=float):
        return _wrap(self._rng.random(size, dtype=dtype))


# -- user kernels: CuPy's ElementwiseKernel and ReductionKernel, run on NumPy ---------------
# Kernel code in a small subset of CUDA C runs here: statements `[const] TYPE name = expr;`,
# `name = expr;`, `name op= expr;`, with + - * /, comparisons, parentheses, literals and
# the math functions below, over whole arrays at once (no `i`, no `raw`, no `?:`, no
# loops). Anything else is refused, so a kernel that uses more is caught here, not on a GPU.
KERNEL_FUNCTIONS = {"tanh": np.tanh, "exp": np.exp, "log": np.log, "sqrt": np.sqrt, "rsqrt": lambda v: 1 / np.sqrt(v),
                    "max": np.maximum, "min": np.minimum, "fabs": np.abs}  # fmt: skip
_DECLARATION = re.compile(r"^(?:const\s+)?(?:[A-Z]|float|double|int|long long|long|bool)\s+(?=[A-Za-z_]\w*\s*=)")
_UNSUPPORTED = re.compile(r"[?\[\]{}]|\bfor\b|\bwhile\b|\bif\b|//|/\*|\b_ind\b|\bi\b")


def _kernel_python(code: str) -> str:
    """Kernel statements -> Python statements (SyntaxError or ValueError if outside the subset)."""
    if _UNSUPPORTED.search(code):
        raise ValueError(f"fake_cupy runs kernels in a small subset of CUDA C (see KERNEL_FUNCTIONS); got: {code!r}")
    statements = [_DECLARATION.sub("", s.strip()) for s in code.split(";") if s.strip()]
    python = "\n".join(statements)
    compile(python, "<kernel>", "exec")
    return python


def _kernel_params(params: str) -> list[tuple[str, str]]:
    """'T x, float32 y' -> [("T", "x"), ("float32", "y")]."""
    pairs = [p.split() for p in params.split(",") if p.strip()]
    if any(len(p) != 2 for p in pairs):
        raise ValueError(f"fake_cupy kernels take 'TYPE name' parameters (no raw), got {params!r}")
    return [(t, n) for t, n in pairs]


def _kernel_inputs(params, args) -> tuple[dict, dict]:
    """Bind inputs: ({name: NumPy value}, {type letter: dtype}) -- letters from array args."""
    if len(args) < len(params):
        raise TypeError(f"kernel needs {len(params)} inputs, got {len(args)}")
    types, values = {}, {}
    for (kind, name), arg in zip(params, args):
        if isinstance(arg, ndarray):
            if len(kind) == 1:
                types.setdefault(kind, arg.dtype)
            values[name] = _host(arg)
    for (kind, name), arg in zip(params, args):
        if not isinstance(arg, ndarray):
            dtype = types[kind] if len(kind) == 1 else np.dtype(kind)
            values[name] = dtype.type(arg)
    return values, types


class ElementwiseKernel:
    """cupy.ElementwiseKernel on NumPy: the operation runs once over the broadcast inputs."""

    def __init__(self, in_params, out_params, operation, name="kernel", **options):
        self.in_params, self.out_params = _kernel_params(in_params), _kernel_params(out_params)
        self.name, self.python = name, _kernel_python(operation)

    def __call__(self, *args, size=None):
        """Inputs, then optionally the outputs to write into (an output may be an input)."""
        values, types = _kernel_inputs(self.in_params, args)
        given = args[len(self.in_params) :]
        shape = np.broadcast_shapes(*(np.shape(v) for v in values.values()), *(g.shape for g in given))
        scope = dict(values)
        with np.errstate(all="ignore"):
            exec(self.python, dict(KERNEL_FUNCTIONS), scope)
        outs = []
        for n, (kind, name) in enumerate(self.out_params):
            dtype = types[kind] if len(kind) == 1 else np.dtype(kind)
            result = np.broadcast_to(scope[name], shape)
            if n < len(given):
                _host(given[n])[...] = result
                outs.append(given[n])
            else:
                outs.append(_wrap(np.array(result, dtype=dtype)))
        return outs[0] if len(outs) == 1 else tuple(outs)


class ReductionKernel:
    """cupy.ReductionKernel on NumPy: map, reduce over `axis` ("a + b", "max(a, b)" or
    "min(a, b)"), then the post-map, where `_in_ind.size() / _out_ind.size()` is the
    number of values reduced into each output."""

    REDUCERS = {"a+b": np.sum, "max(a,b)": np.max, "min(a,b)": np.min}

    def __init__(self, in_params, out_params, map_expr, reduce_expr, post_map_expr, identity, name="reduce", **options):
        self.in_params, self.out_params = _kernel_params(in_params), _kernel_params(out_params)
        if len(self.out_params) != 1 or reduce_expr.replace(" ", "") not in self.REDUCERS:
            raise ValueError(f"fake_cupy reductions have one output and reduce with {list(self.REDUCERS)}")
        self.reduce = self.REDUCERS[reduce_expr.replace(" ", "")]
        self.map = _kernel_python(f"_mapped = {map_expr}")
        post = post_map_expr.replace("_in_ind.size()", "_in_size").replace("_out_ind.size()", "_out_size")
        self.post, self.name = _kernel_python(post), name

    def __call__(self, *args, axis=None, keepdims=False):
        values, types = _kernel_inputs(self.in_params, args)
        shape = np.broadcast_shapes(*(np.shape(v) for v in values.values()))
        scope = dict(values)
        with np.errstate(all="ignore"):
            exec(self.map, dict(KERNEL_FUNCTIONS), scope)
            mapped = np.broadcast_to(scope["_mapped"], shape)
            a = self.reduce(mapped, axis=axis, keepdims=keepdims)
            scope.update(a=a, _in_size=mapped.size, _out_size=max(np.size(a), 1))
            exec(self.post, dict(KERNEL_FUNCTIONS), scope)
        kind, name = self.out_params[0]
        dtype = types[kind] if len(kind) == 1 else np.dtype(kind)
        return _wrap(np.asarray(scope[name], dtype=dtype))


# -- the modules ---------------------------------------------------------------------------
def build_modules() -> dict[str, types.ModuleType]:
    """Fresh `cupy`, `cupy.cuda`, `cupy.cuda.runtime` and `cupyx` module objects."""
    runtime = types.ModuleType("cupy.cuda.runtime")
    runtime.getDeviceCount, runtime.CUDARuntimeError = getDeviceCount, CUDARuntimeError
    runtime.getDeviceProperties, runtime.driverGetVersion = getDeviceProperties, driverGetVersion
    runtime.runtimeGetVersion = runtimeGetVersion
    cuda = types.ModuleType("cupy.cuda")
    cuda.Device, cuda.Stream, cuda.get_current_stream, cuda.runtime = Device, Stream, get_current_stream, runtime
    cupy = types.ModuleType("cupy", "fake cupy (tests/fake_cupy.py): NumPy standing in for a GPU")
    cupy.__version__, cupy.ndarray, cupy.cuda = __version__, ndarray, cuda
    cupy.asarray, cupy.array, cupy.asnumpy = asarray, array, asnumpy
    cupy.get_default_memory_pool = get_default_memory_pool
    for name in DEVICE_FUNCTIONS:
        setattr(cupy, name, _device_function(name))
    for name in HOST_ATTRIBUTES:
        setattr(cupy, name, getattr(np, name))
    cupy.unique, cupy.take, cupy.take_along_axis = unique, take, take_along_axis
    cupy.ElementwiseKernel, cupy.ReductionKernel = ElementwiseKernel, ReductionKernel
    cupy.random = types.ModuleType("cupy.random")
    cupy.random.RandomState = RandomState
    cupyx = types.ModuleType("cupyx")
    cupyx.scatter_add = scatter_add
    return {"cupy": cupy, "cupy.cuda": cuda, "cupy.cuda.runtime": runtime, "cupy.random": cupy.random, "cupyx": cupyx}


_MODULES: dict[str, types.ModuleType] = {}


def modules() -> dict[str, types.ModuleType]:
    """The fake modules, built once per process: CuPy's namespace is one module object, and
    npgpt maps the array type to one namespace built from it."""
    if not _MODULES:
        _MODULES.update(build_modules())
    return _MODULES


def install(monkeypatch, device_count: int = 2) -> dict[str, types.ModuleType]:
    """Make `import cupy` / `import cupyx` give the fake for this test (monkeypatch undoes
    it), with fresh state: no transfers counted, device 0 current."""
    reset(device_count)
    for name, module in modules().items():
        monkeypatch.setitem(sys.modules, name, module)
    return modules()


def make_backend(device: str | None = None):
    """The CuPy plugin's backend built on the fake, leaving sys.modules as it was: the
    `fake-cupy` test backend (NPGPT_TEST_BACKENDS=numpy,fake-cupy)."""
    import npgpt_cupy

    saved = {name: sys.modules.get(name) for name in modules()}
    sys.modules.update(modules())
    try:
        backend = npgpt_cupy.make_backend(device)
        backend.name = f"fake-{backend.name}"  # "fake-cupy:0": `--backend <name>` finds this fake again
        return backend
    finally:
        for name, module in saved.items():
            if module is None:
                del sys.modules[name]
            else:
                sys.modules[name] = module


def write_import_shim(folder, nccl: bool = False) -> None:
    """Write packages `cupy` and `cupyx` into `folder` that make `import cupy` give this
    fake in any Python that has `folder` on its path (a subprocess, tools/gpu_check.sh);
    `nccl`: with tests/fake_nccl.py's `cupy.cuda.nccl` (over MPI, for mpiexec runs)."""
    from pathlib import Path

    tests = Path(__file__).resolve().parent
    for name in ("cupy", "cupyx"):
        package = Path(folder) / name
        package.mkdir(parents=True, exist_ok=True)
        (package / "__init__.py").write_text(
            f'"""`import {name}` gives tests/fake_cupy.py\'s module (written by fake_cupy.write_import_shim)."""\n'
            "import sys\n"
            f"sys.path.insert(0, {str(tests)!r})\n"
            "import fake_cupy\n\n"
            "sys.modules.update(fake_cupy.modules())\n"
            + ("import fake_nccl\n\nfake_nccl.install()\n" if nccl and name == "cupy" else "")
        )
