"""Checkpoints in the safetensors format, read (memory-mapped) and written with NumPy alone.

A safetensors file is:  u64 little-endian N | N bytes of JSON header | raw tensor bytes.
The header maps each tensor name to {"dtype", "shape", "data_offsets": [begin, end]}
(offsets relative to the byte after the header) plus an optional "__metadata__" map of
strings, where npgpt keeps its GPTConfig as JSON. Nothing in the file is ever executed.
"""

from __future__ import annotations

import json
import math
import os
import tempfile
from pathlib import Path

import numpy as np

from npgpt.config import GPTConfig
from npgpt.errors import UserError

CONFIG_KEY = "npgpt.config"
DTYPES = {  # safetensors name -> NumPy dtype (little-endian)
    "F64": np.dtype("<f8"), "F32": np.dtype("<f4"), "F16": np.dtype("<f2"),
    "I64": np.dtype("<i8"), "I32": np.dtype("<i4"), "I16": np.dtype("<i2"), "I8": np.dtype("i1"),
    "U64": np.dtype("<u8"), "U32": np.dtype("<u4"), "U16": np.dtype("<u2"), "U8": np.dtype("u1"),
    "BOOL": np.dtype("?"),
}  # fmt: skip
NAMES = {dtype: name for name, dtype in DTYPES.items()}
BF16 = "BF16"  # read only: NumPy has no bfloat16, so it is widened to float32 (exactly)
MAX_HEADER_BYTES = 100 * 1024 * 1024


class CheckpointError(UserError, ValueError):
    """A file that is not a valid safetensors checkpoint (what is wrong is in the message)."""


def save_safetensors(path, tensors: dict[str, np.ndarray], metadata: dict[str, str] | None = None):
    """Write `tensors` to `path` atomically: a temp file in the same folder, then rename,
    so a crash never leaves a half-written checkpoint under the real name."""
    header: dict[str, object] = {"__metadata__": dict(metadata)} if metadata else {}
    arrays, offset = [], 0
    for name, array in tensors.items():
        array = np.asarray(array, order="C")  # (np.ascontiguousarray would make 0-d arrays 1-d)
        dtype = array.dtype.newbyteorder("<") if array.dtype.byteorder == ">" else array.dtype
        if dtype not in NAMES:
            raise CheckpointError(f"tensor {name!r}: dtype {array.dtype} cannot be stored in safetensors")
        array = array.astype(dtype, copy=False)
        header[name] = {"dtype": NAMES[dtype], "shape": list(array.shape), "data_offsets": [offset, offset + array.nbytes]}
        arrays.append(array)
        offset += array.nbytes
    blob = json.dumps(header, separators=(",", ":")).encode()
    blob += b" " * (-len(blob) % 8)  # pad so the data starts 8-byte aligned
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            os.fchmod(f.fileno(), 0o644)  # mkstemp's 0600 would make a shared checkpoint unreadable
            f.write(len(blob).to_bytes(8, "little"))
            f.write(blob)
            for array in arrays:
                f.write(memoryview(array.reshape(-1)).cast("B"))
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def load_safetensors(path) -> tuple[dict[str, np.ndarray], dict[str, str]]:
    """Read a safetensors file as read-only arrays memory-mapped from disk, and its metadata.

    Every header field is validated (dtype, shape, offsets inside the file, no overlaps
    or holes) so a damaged or hostile file gives a CheckpointError naming the tensor.
    """
    path = Path(path)
    size = path.stat().st_size
    with open(path, "rb") as f:
        prefix = f.read(8)
        if len(prefix) < 8:
            raise CheckpointError(f"{path}: too short to be a safetensors file ({size} bytes)")
        n = int.from_bytes(prefix, "little")
        if n > min(size - 8, MAX_HEADER_BYTES):
            raise CheckpointError(f"{path}: header length {n} is impossible for a {size}-byte file (truncated or not safetensors)")
        try:
            header = json.loads(f.read(n))
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            raise CheckpointError(f"{path}: header is not valid JSON ({e})") from None
    if not isinstance(header, dict):
        raise CheckpointError(f"{path}: header must be a JSON object")
    metadata = header.pop("__metadata__", None) or {}
    if not all(isinstance(k, str) and isinstance(v, str) for k, v in metadata.items()):
        raise CheckpointError(f"{path}: __metadata__ must map strings to strings")
    data_size = size - 8 - n
    data = np.memmap(path, dtype=np.uint8, mode="r", offset=8 + n, shape=(data_size,)) if data_size else np.empty(0, np.uint8)
    tensors, spans = {}, []
    for name, entry in header.items():
        dtype, shape, (begin, end) = _validate_entry(path, name, entry, data_size)
        array = np.frombuffer(data, dtype, count=(end - begin) // dtype.itemsize, offset=begin).reshape(shape)
        tensors[name] = bfloat16_to_float32(array) if entry["dtype"] == BF16 else array
        spans.append((begin, end, name))
    expected = 0
    for begin, end, name in sorted(spans):
        if begin != expected:
            raise CheckpointError(f"{path}: tensor {name!r} starts at byte {begin}, expected {expected} (overlap or hole)")
        expected = end
    if expected != data_size:
        raise CheckpointError(f"{path}: tensors cover {expected} bytes but the data section has {data_size}")
    return tensors, metadata


def _validate_entry(path, name, entry, data_size):
    try:
        dtype = np.dtype("<u2") if entry["dtype"] == BF16 else DTYPES[entry["dtype"]]
        shape = tuple(entry["shape"])
        begin, end = entry["data_offsets"]
    except (KeyError, TypeError, ValueError):
        raise CheckpointError(f"{path}: tensor {name!r} has a malformed entry {entry!r} (dtype unsupported or fields missing)") from None
    if not all(isinstance(d, int) and d >= 0 for d in (*shape, begin, end)):
        raise CheckpointError(f"{path}: tensor {name!r} has a non-integer or negative shape/offset")
    if end - begin != math.prod(shape) * dtype.itemsize or end > data_size:
        raise CheckpointError(
            f"{path}: tensor {name!r} of shape {shape} {entry['dtype']} needs bytes [{begin}, {end}) "
            f"but the data section has {data_size} bytes (truncated or corrupt file)"
        )
    return dtype, shape, (begin, end)


def bfloat16_to_float32(raw: np.ndarray) -> np.ndarray:
    """Widen bfloat16 values stored as uint16 bit patterns to float32 (exact: bfloat16 is the
    top half of a float32)."""
    return (raw.astype(np.uint32) << 16).view(np.float32)


def save_checkpoint(path, params: dict[str, np.ndarray], config: GPTConfig, metadata: dict[str, str] | None = None):
    """An npgpt checkpoint: the parameters plus the GPTConfig (and `metadata`) in the header."""
    save_safetensors(path, params, {**(metadata or {}), CONFIG_KEY: config.to_json(), "format": "npgpt"})


def load_checkpoint(path) -> tuple[dict[str, np.ndarray], GPTConfig]:
    """Parameters (memory-mapped) and config of an npgpt checkpoint."""
    params, config, _ = read_checkpoint(path)
    return params, config


def read_checkpoint(path) -> tuple[dict[str, np.ndarray], GPTConfig, dict[str, str]]:
    """Parameters (memory-mapped), config and header metadata of an npgpt checkpoint."""
    params, metadata = load_safetensors(path)
    if CONFIG_KEY not in metadata:
        raise CheckpointError(
            f"{path}: no {CONFIG_KEY!r} in the header metadata, so this is not an npgpt checkpoint; "
            "convert published GPT-2 weights with tools/convert_gpt2.py first."
        )
    try:
        config = GPTConfig.from_json(metadata[CONFIG_KEY])
    except (ValueError, TypeError) as e:  # JSONDecodeError is a ValueError
        raise CheckpointError(f"{path}: the config in the header is invalid ({e}); the file is damaged or was not written by npgpt") from None
    return params, config, metadata
