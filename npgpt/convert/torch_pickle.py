"""Read PyTorch `pytorch_model.bin` state dicts without torch and without running their code.

A `torch.save` file is a pickle, and unpickling can call any importable function: loading
an untrusted one with `pickle.load` (or `torch.load(weights_only=False)`) runs whatever it
says. Here `SafeUnpickler.find_class` resolves only the few globals a state dict needs, each
to a function of ours that builds inert placeholders; every other global is refused before
anything is called. Tensor bytes never pass through pickle: they are "persistent ids" that
name raw storages, read here as NumPy arrays.

Two layouts exist:
- zip (torch >= 1.6): `<name>/data.pkl` (the pickle), `<name>/data/<key>` (one raw storage
  per key), `<name>/byteorder` ("little" or "big"; absent = little);
- legacy (older torch, e.g. early Hugging Face uploads): five pickles back to back -- magic
  number, protocol version, system info, the state dict, the list of storage keys -- then
  each storage as int64 element count + raw bytes, in the order of that list.
"""

from __future__ import annotations

import collections
import io
import pickle
import zipfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from npgpt.checkpoint import bfloat16_to_float32
from npgpt.convert.common import ConversionError

LEGACY_MAGIC = 0x1950A86A20F9469CFC6C
LEGACY_PROTOCOL = 1001

STORAGE_DTYPES = {
    "FloatStorage": "float32", "HalfStorage": "float16", "BFloat16Storage": "bfloat16",
    "DoubleStorage": "float64", "LongStorage": "int64", "IntStorage": "int32",
    "ShortStorage": "int16", "CharStorage": "int8", "ByteStorage": "uint8", "BoolStorage": "bool",
}  # fmt: skip


@dataclass(frozen=True)
class StorageType:
    """Stand-in for a `torch.<X>Storage` class: only its element type matters."""

    dtype: str

    @property
    def numpy_dtype(self) -> np.dtype:  # bfloat16 is kept as its uint16 bit patterns
        return np.dtype("uint16" if self.dtype == "bfloat16" else self.dtype)


@dataclass(frozen=True)
class StorageRef:
    """A storage named by a persistent id: which raw blob, its element type and length."""

    key: str
    storage_type: StorageType
    numel: int


@dataclass(frozen=True)
class TensorRef:
    """What `torch._utils._rebuild_tensor_v2` would build, not yet materialised."""

    storage: StorageRef
    offset: int
    shape: tuple
    stride: tuple


def rebuild_tensor(storage, storage_offset, size, stride, requires_grad=False, backward_hooks=None, metadata=None):
    """Safe stand-in for torch._utils._rebuild_tensor_v2."""
    if not isinstance(storage, StorageRef):
        raise ConversionError("pytorch_model.bin: a tensor is built from something that is not a storage")
    return TensorRef(storage, int(storage_offset), tuple(int(n) for n in size), tuple(int(s) for s in stride))


def rebuild_parameter(data, requires_grad=False, backward_hooks=None):
    """Safe stand-in for torch._utils._rebuild_parameter: a Parameter is just its tensor."""
    if not isinstance(data, TensorRef):
        raise ConversionError("pytorch_model.bin: a parameter wraps something that is not a tensor")
    return data


ALLOWED_GLOBALS = {
    ("collections", "OrderedDict"): collections.OrderedDict,
    ("torch._utils", "_rebuild_tensor_v2"): rebuild_tensor,
    ("torch._utils", "_rebuild_parameter"): rebuild_parameter,
    **{("torch", name): StorageType(dtype) for name, dtype in STORAGE_DTYPES.items()},
}


class SafeUnpickler(pickle.Unpickler):
    """An unpickler that can build only state dicts of tensor placeholders."""

    def find_class(self, module, name):
        try:
            return ALLOWED_GLOBALS[(module, name)]
        except KeyError:
            raise ConversionError(
                f"pytorch_model.bin refers to {module}.{name}, which is not needed to rebuild "
                "tensors; refusing to load it (the file may be malicious). Use a "
                "model.safetensors file instead, or re-save the state dict from trusted code."
            ) from None

    def persistent_load(self, pid):
        """("storage", type, key, location, numel[, view]) -> StorageRef."""
        if not (isinstance(pid, tuple) and len(pid) in (5, 6) and pid[0] == "storage" and isinstance(pid[1], StorageType)):
            raise ConversionError(f"pytorch_model.bin: unsupported persistent id {pid!r:.80}")
        if len(pid) == 6 and pid[5] is not None:
            raise ConversionError("pytorch_model.bin: legacy storage views are not supported")
        return StorageRef(str(pid[2]), pid[1], int(pid[4]))


def safe_unpickle(data: bytes):
    """Unpickle `data` with SafeUnpickler; malformed input becomes a ConversionError."""
    try:
        return SafeUnpickler(io.BytesIO(data)).load()
    except ConversionError:
        raise
    except Exception as error:  # anything the restricted pickle machinery trips over
        raise ConversionError(f"pytorch_model.bin: cannot unpickle ({type(error).__name__}: {error})") from None


def materialize(name: str, ref: TensorRef, storages: dict[str, np.ndarray]) -> np.ndarray:
    """Copy a tensor out of its storage (any strides), widening bfloat16 to float32."""
    flat = storages[ref.storage.key]
    if flat.size < ref.storage.numel:
        raise ConversionError(f"tensor {name!r}: its storage holds {flat.size} elements, {ref.storage.numel} expected (truncated file?)")
    if any(n < 0 for n in ref.shape) or any(s < 0 for s in ref.stride) or len(ref.shape) != len(ref.stride):
        raise ConversionError(f"tensor {name!r}: invalid shape {ref.shape} / stride {ref.stride}")
    last = ref.offset + sum((n - 1) * s for n, s in zip(ref.shape, ref.stride)) if all(ref.shape) else ref.offset - 1
    if ref.offset < 0 or last >= flat.size:
        raise ConversionError(f"tensor {name!r}: shape {ref.shape} at offset {ref.offset} reads past its storage of {flat.size} elements")
    view = np.lib.stride_tricks.as_strided(
        flat[ref.offset :], shape=ref.shape, strides=[s * flat.itemsize for s in ref.stride], writeable=False
    )
    array = np.array(view, dtype=flat.dtype.newbyteorder("="))
    return bfloat16_to_float32(array) if ref.storage.storage_type.dtype == "bfloat16" else array


def collect_tensors(state, path: Path, storages: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """The unpickled state dict as {name: array}."""
    if not isinstance(state, dict):
        raise ConversionError(f"{path}: expected a state dict, found {type(state).__name__}")
    tensors = {}
    for name, value in state.items():
        if not isinstance(value, TensorRef):
            raise ConversionError(f"{path}: entry {name!r} is a {type(value).__name__}, not a tensor")
        tensors[str(name)] = materialize(str(name), value, storages)
    return tensors


def read_pytorch_bin(path: str | Path) -> dict[str, np.ndarray]:
    """Every tensor of a `torch.save`d state dict, by name, as NumPy arrays."""
    path = Path(path)
    if zipfile.is_zipfile(path):
        return read_zip_archive(path)
    return read_legacy(path)


def read_zip_archive(path: Path) -> dict[str, np.ndarray]:
    try:
        with zipfile.ZipFile(path) as archive:
            pickles = [n for n in archive.namelist() if n.endswith("/data.pkl") or n == "data.pkl"]
            if len(pickles) != 1:
                raise ConversionError(f"{path}: expected one data.pkl in the zip archive, found {len(pickles)}")
            root = pickles[0][: -len("data.pkl")]  # e.g. "archive/"
            names = set(archive.namelist())
            byteorder = archive.read(f"{root}byteorder").decode().strip() if f"{root}byteorder" in names else "little"
            state = safe_unpickle(archive.read(pickles[0]))
            storages = {}
            for ref in storage_refs(state):
                if ref.key in storages:
                    continue
                member = f"{root}data/{ref.key}"
                if member not in names:
                    raise ConversionError(f"{path}: storage {member} is missing from the archive")
                dtype = ref.storage_type.numpy_dtype.newbyteorder("<" if byteorder == "little" else ">")
                blob = archive.read(member)
                storages[ref.key] = np.frombuffer(blob[: len(blob) // dtype.itemsize * dtype.itemsize], dtype=dtype)
    except zipfile.BadZipFile as error:
        raise ConversionError(f"{path}: corrupt or truncated zip archive ({error})") from None
    return collect_tensors(state, path, storages)


def storage_refs(state) -> list[StorageRef]:
    return [value.storage for value in state.values() if isinstance(value, TensorRef)] if isinstance(state, dict) else []


def read_legacy(path: Path) -> dict[str, np.ndarray]:
    stream = io.BytesIO(path.read_bytes())

    def next_pickle():
        try:
            return SafeUnpickler(stream).load()
        except ConversionError:
            raise
        except Exception as error:
            raise ConversionError(f"{path}: not a PyTorch checkpoint, or truncated ({type(error).__name__}: {error})") from None

    if next_pickle() != LEGACY_MAGIC:
        raise ConversionError(f"{path}: neither a zip archive nor a legacy PyTorch file (wrong magic number)")
    if next_pickle() != LEGACY_PROTOCOL:
        raise ConversionError(f"{path}: unsupported legacy PyTorch protocol version")
    sys_info = next_pickle()
    little = not isinstance(sys_info, dict) or sys_info.get("little_endian", True)
    state = next_pickle()
    keys = next_pickle()
    refs = {ref.key: ref for ref in storage_refs(state)}
    storages = {}
    for key in keys:
        numel = int.from_bytes(stream.read(8), "little")
        if key not in refs:
            raise ConversionError(f"{path}: storage {key} is listed but no tensor uses it")
        dtype = refs[key].storage_type.numpy_dtype.newbyteorder("<" if little else ">")
        blob = stream.read(numel * dtype.itemsize)
        storages[key] = np.frombuffer(blob[: len(blob) // dtype.itemsize * dtype.itemsize], dtype=dtype)
    missing = set(refs) - set(storages)
    if missing:
        raise ConversionError(f"{path}: storages {sorted(missing)} are missing (truncated file?)")
    return collect_tensors(state, path, storages)
