"""CRC-32C (Castagnoli), the checksum of LevelDB tables and TensorFlow tensor bundles.

`zlib.crc32` is the other CRC-32 (IEEE polynomial), so this is written out. The byte-wise
table loop (`crc32c_bytes`) is the definition; `crc32c` computes the same value for big
buffers by running the loop over many chunks at once in NumPy and joining the chunk CRCs,
which works because a CRC register is linear over GF(2).
"""

from __future__ import annotations

import numpy as np

POLYNOMIAL = 0x82F63B78  # Castagnoli polynomial 0x1EDC6F41, bit-reflected
MASK_DELTA = 0xA282EAD8  # LevelDB's constant for "masked" CRCs


def _byte_table() -> np.ndarray:
    """TABLE[b] = the register after shifting byte b through a zero register (8 steps)."""
    table = np.arange(256, dtype=np.uint32)
    for _ in range(8):
        table = np.where(table & 1, (table >> 1) ^ POLYNOMIAL, table >> 1).astype(np.uint32)
    return table


TABLE = _byte_table()
_TABLE_LIST = [int(v) for v in TABLE]


def _update_bytes(register: int, data: bytes) -> int:
    """Feed bytes through the raw register (no initial value or final xor)."""
    for byte in data:
        register = _TABLE_LIST[(register ^ byte) & 0xFF] ^ (register >> 8)
    return register


def crc32c_bytes(data: bytes) -> int:
    """CRC-32C of `data`, one byte at a time (the reference definition; slow in Python)."""
    return _update_bytes(0xFFFFFFFF, data) ^ 0xFFFFFFFF


def _zeros_operator(length: int) -> list[list[int]]:
    """Tables applying "feed `length` zero bytes" to a register: a linear map on 32 bits,
    stored as 4 lookup tables (one per register byte) of 256 entries."""
    basis = (np.uint32(1) << np.arange(32, dtype=np.uint32)).astype(np.uint32)  # e_0..e_31
    for _ in range(length):
        basis = TABLE[basis & 0xFF] ^ (basis >> 8)
    tables = []
    for byte_index in range(4):
        columns = basis[8 * byte_index : 8 * byte_index + 8]
        table = np.zeros(256, dtype=np.uint32)
        for bit in range(8):
            table ^= np.where((np.arange(256) >> bit) & 1, columns[bit], 0).astype(np.uint32)
        tables.append([int(v) for v in table])
    return tables


def crc32c(data) -> int:
    """CRC-32C of a bytes-like object or uint8 array, fast for large buffers.

    The buffer is cut into K chunks of L bytes (plus a short tail). The raw CRCs of all
    chunks are computed in lockstep, one NumPy gather per byte column; then, left to right,
    register = shift_L(register) ^ chunk_crc, where shift_L (feeding L zero bytes) is linear.
    """
    buffer = np.frombuffer(data, dtype=np.uint8) if not isinstance(data, np.ndarray) else data
    buffer = buffer.reshape(-1)
    chunk = max(64, int(np.sqrt(buffer.size)))
    n_chunks = buffer.size // chunk
    if n_chunks < 4:
        return crc32c_bytes(buffer.tobytes())
    chunks = buffer[: n_chunks * chunk].reshape(n_chunks, chunk)  # (K, L)
    lanes = np.zeros(n_chunks, dtype=np.uint32)  # raw CRC of each chunk, from register 0
    for column in range(chunk):
        lanes = TABLE[(lanes ^ chunks[:, column]) & 0xFF] ^ (lanes >> 8)
    shift = _zeros_operator(chunk)
    register = 0xFFFFFFFF
    for lane in lanes.tolist():
        register = (
            shift[0][register & 0xFF]
            ^ shift[1][(register >> 8) & 0xFF]
            ^ shift[2][(register >> 16) & 0xFF]
            ^ shift[3][register >> 24]
            ^ lane
        )
    register = _update_bytes(register, buffer[n_chunks * chunk :].tobytes())
    return register ^ 0xFFFFFFFF


def mask(crc: int) -> int:
    """LevelDB/TensorFlow "masked" CRC: rotate right by 15 and add a constant, so that a
    CRC stored inside checksummed data does not checksum to something trivial."""
    return ((((crc >> 15) | (crc << 17)) & 0xFFFFFFFF) + MASK_DELTA) & 0xFFFFFFFF
