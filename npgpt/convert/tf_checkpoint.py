"""Read OpenAI's TensorFlow GPT-2 checkpoints without TensorFlow.

A TF "V2" checkpoint with prefix P is `P.index` plus data shards `P.data-SSSSS-of-NNNNN`.
The index is a LevelDB-style sorted string table (SSTable) mapping each tensor name to a
`BundleEntryProto` (protobuf) that says where its bytes are: dtype, shape, shard, offset,
size and a masked CRC-32C of the bytes. The key "" holds a `BundleHeaderProto`.

SSTable layout (all integers little-endian, "varint" = LEB128 as in protobuf):
  file   = data blocks..., meta-index block, index block, footer (48 bytes)
  footer = BlockHandle(meta-index) BlockHandle(index) zero padding to 40 bytes, magic (8)
  BlockHandle = varint offset, varint size
  block  = entries..., uint32 restart offsets..., uint32 restart count; then a 5-byte
           trailer: compression type (0 = none) and the masked CRC-32C of block + type
  entry  = varint shared, varint non_shared, varint value_size, key suffix, value; the key
           is the previous key's first `shared` bytes + the suffix (prefix compression);
           at restart points shared is 0
  The index block maps a separator key to the BlockHandle of each data block.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Iterator

import numpy as np

from npgpt.checkpoint import bfloat16_to_float32
from npgpt.convert.common import ConversionError
from npgpt.convert.crc32c import crc32c, mask

TABLE_MAGIC = 0xDB4775248B80FB57
FOOTER_SIZE = 48
BLOCK_TRAILER_SIZE = 5

# TensorFlow's DataType enum (tensorflow/core/framework/types.proto) -> NumPy dtype names
TF_DTYPES = {
    1: "float32", 2: "float64", 3: "int32", 4: "uint8", 5: "int16", 6: "int8",
    9: "int64", 10: "bool", 14: "bfloat16", 17: "uint16", 19: "float16", 22: "uint32",
    23: "uint64",
}  # fmt: skip


# --- protobuf wire format ---------------------------------------------------------------


def read_varint(buf: bytes, pos: int) -> tuple[int, int]:
    """Decode a base-128 varint at `pos`; return (value, position after it)."""
    value = shift = 0
    while True:
        if pos >= len(buf):
            raise ConversionError("truncated varint in checkpoint index")
        byte = buf[pos]
        pos += 1
        value |= (byte & 0x7F) << shift
        if not byte & 0x80:
            return value, pos
        shift += 7
        if shift > 63:
            raise ConversionError("varint longer than 10 bytes in checkpoint index")


def parse_message(buf: bytes) -> dict[int, list]:
    """Split a protobuf message into {field number: [values]}: varints as int, 64/32-bit
    fields as unsigned int, length-delimited fields as bytes (sub-messages parsed by caller)."""
    fields: dict[int, list] = {}
    pos = 0
    while pos < len(buf):
        tag, pos = read_varint(buf, pos)
        number, wire_type = tag >> 3, tag & 7
        if wire_type == 0:
            value, pos = read_varint(buf, pos)
        elif wire_type == 1:
            value, pos = int.from_bytes(buf[pos : pos + 8], "little"), pos + 8
        elif wire_type == 2:
            length, pos = read_varint(buf, pos)
            value, pos = buf[pos : pos + length], pos + length
        elif wire_type == 5:
            value, pos = int.from_bytes(buf[pos : pos + 4], "little"), pos + 4
        else:
            raise ConversionError(f"unsupported protobuf wire type {wire_type} in checkpoint index")
        if pos > len(buf):
            raise ConversionError("truncated protobuf message in checkpoint index")
        fields.setdefault(number, []).append(value)
    return fields


def as_int64(value: int) -> int:
    """Reinterpret a decoded varint as a signed int64 (negative values use 10 bytes)."""
    return value - (1 << 64) if value >= 1 << 63 else value


def parse_bundle_entry(name: str, buf: bytes) -> dict:
    """BundleEntryProto: 1 dtype, 2 shape (TensorShapeProto: 2 dim {1 size}), 3 shard_id,
    4 offset, 5 size, 6 crc32c (fixed32), 7 slices (partitioned variables; unsupported)."""
    fields = parse_message(buf)
    if 7 in fields:
        raise ConversionError(f"tensor {name!r} is a partitioned (sliced) variable; not supported")
    dtype_enum = fields.get(1, [0])[0]
    if dtype_enum not in TF_DTYPES:
        raise ConversionError(f"tensor {name!r} has unsupported TensorFlow dtype enum {dtype_enum}")
    shape_fields = parse_message(fields[2][0]) if 2 in fields else {}
    shape = tuple(as_int64(parse_message(dim).get(1, [0])[0]) for dim in shape_fields.get(2, []))
    return {
        "dtype": TF_DTYPES[dtype_enum],
        "shape": shape,
        "shard_id": fields.get(3, [0])[0],
        "offset": fields.get(4, [0])[0],
        "size": fields.get(5, [0])[0],
        "crc32c": fields.get(6, [None])[0],
    }


def parse_bundle_header(buf: bytes) -> dict:
    """BundleHeaderProto: 1 num_shards, 2 endianness (0 little, 1 big), 3 version."""
    fields = parse_message(buf)
    return {"num_shards": fields.get(1, [1])[0], "big_endian": fields.get(2, [0])[0] == 1}


# --- SSTable ------------------------------------------------------------------------------


def read_block_handle(buf: bytes, pos: int) -> tuple[tuple[int, int], int]:
    offset, pos = read_varint(buf, pos)
    size, pos = read_varint(buf, pos)
    return (offset, size), pos


def read_block(table: bytes, handle: tuple[int, int]) -> bytes:
    """The contents of one block, after checking its trailer (uncompressed, CRC matches)."""
    offset, size = handle
    end = offset + size + BLOCK_TRAILER_SIZE
    if end > len(table):
        raise ConversionError(f"checkpoint index is truncated: block at {offset} ends past the file")
    contents = table[offset : offset + size]
    compression = table[offset + size]
    if compression != 0:
        raise ConversionError(f"checkpoint index block at {offset} is compressed (type {compression}); only uncompressed tables are supported")
    stored = int.from_bytes(table[offset + size + 1 : end], "little")
    if mask(crc32c(table[offset : offset + size + 1])) != stored:
        raise ConversionError(f"checkpoint index block at {offset} fails its CRC-32C check (corrupt file)")
    return contents


def block_entries(block: bytes) -> Iterator[tuple[bytes, bytes]]:
    """Yield (key, value) of a block in order, undoing prefix compression."""
    n_restarts = int.from_bytes(block[-4:], "little")
    entries_end = len(block) - 4 - 4 * n_restarts
    if entries_end < 0:
        raise ConversionError("checkpoint index block has a corrupt restart array")
    restarts = {int.from_bytes(block[entries_end + 4 * i : entries_end + 4 * i + 4], "little") for i in range(n_restarts)}
    key = b""
    pos = 0
    while pos < entries_end:
        entry_start = pos
        shared, pos = read_varint(block, pos)
        non_shared, pos = read_varint(block, pos)
        value_size, pos = read_varint(block, pos)
        if entry_start in restarts and shared:
            raise ConversionError("checkpoint index block: a restart point has a shared key prefix")
        key = key[:shared] + block[pos : pos + non_shared]
        pos += non_shared
        value = block[pos : pos + value_size]
        pos += value_size
        if pos > entries_end:
            raise ConversionError("checkpoint index block: an entry runs past the block")
        yield key, value


def table_items(table: bytes) -> Iterator[tuple[bytes, bytes]]:
    """All (key, value) pairs of an SSTable, in key order."""
    if len(table) < FOOTER_SIZE:
        raise ConversionError("checkpoint index is shorter than a table footer (truncated file?)")
    footer = table[-FOOTER_SIZE:]
    if int.from_bytes(footer[-8:], "little") != TABLE_MAGIC:
        raise ConversionError("checkpoint index does not end with the table magic number (truncated or not a TF index)")
    _meta_index, pos = read_block_handle(footer, 0)
    index_handle, _ = read_block_handle(footer, pos)
    for _separator, handle_bytes in block_entries(read_block(table, index_handle)):
        handle, _ = read_block_handle(handle_bytes, 0)
        yield from block_entries(read_block(table, handle))


# --- checkpoint ---------------------------------------------------------------------------


def checkpoint_prefix(directory: Path) -> Path:
    """The checkpoint prefix named by the `checkpoint` state file, else the one `*.index`."""
    state = directory / "checkpoint"
    if state.exists():
        match = re.search(r'model_checkpoint_path:\s*"([^"]+)"', state.read_text())
        if match:
            named = Path(match.group(1))
            for candidate in (named, directory / named, directory / named.name):
                if Path(f"{candidate}.index").exists():
                    return candidate
    indexes = sorted(directory.glob("*.index"))
    if len(indexes) != 1:
        raise ConversionError(f"{directory}: expected one TF checkpoint (*.index), found {len(indexes)}")
    return indexes[0].with_suffix("")


def read_tf_checkpoint(directory: str | Path) -> dict[str, np.ndarray]:
    """Every tensor of the TF checkpoint in `directory`, by TF name (e.g. "model/h0/attn/c_attn/w"),
    as NumPy arrays in native byte order; bfloat16 is widened to float32."""
    prefix = checkpoint_prefix(Path(directory))
    items = iter(table_items(Path(f"{prefix}.index").read_bytes()))
    first_key, header_bytes = next(items, (None, b""))
    if first_key != b"":
        raise ConversionError(f"{prefix}.index: missing the bundle header entry (key \"\")")
    header = parse_bundle_header(header_bytes)
    entries = {key.decode("utf-8"): value for key, value in items}
    shards: dict[int, np.memmap] = {}
    tensors = {}
    for name, value in entries.items():
        entry = parse_bundle_entry(name, value)
        shard_id = entry["shard_id"]
        if shard_id not in shards:
            shard_path = Path(f"{prefix}.data-{shard_id:05d}-of-{header['num_shards']:05d}")
            if not shard_path.exists():
                raise ConversionError(f"tensor {name!r} lives in {shard_path.name}, which is missing")
            shards[shard_id] = np.memmap(shard_path, dtype=np.uint8, mode="r")
        tensors[name] = read_entry(name, entry, shards[shard_id], header["big_endian"])
    return tensors


def read_entry(name: str, entry: dict, shard: np.ndarray, big_endian: bool) -> np.ndarray:
    """Slice one tensor's bytes out of its data shard, check them, and shape them."""
    offset, size, shape = entry["offset"], entry["size"], entry["shape"]
    if offset + size > shard.size:
        raise ConversionError(f"tensor {name!r}: bytes {offset}..{offset + size} lie past the end of its data shard ({shard.size} bytes; truncated file?)")
    raw = np.array(shard[offset : offset + size])
    if entry["crc32c"] is not None and mask(crc32c(raw)) != entry["crc32c"]:
        raise ConversionError(f"tensor {name!r}: CRC-32C mismatch (corrupt data shard)")
    storage = "uint16" if entry["dtype"] == "bfloat16" else entry["dtype"]
    dtype = np.dtype(storage).newbyteorder(">" if big_endian else "<")
    expected = int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
    if size != expected:
        raise ConversionError(f"tensor {name!r}: {size} bytes stored, but shape {shape} of {entry['dtype']} needs {expected}")
    array = raw.view(dtype).reshape(shape).astype(dtype.newbyteorder("="))
    return bfloat16_to_float32(array) if entry["dtype"] == "bfloat16" else array
