"""What every reader in npgpt.convert shares: the error type and dtype helpers."""

from __future__ import annotations

import numpy as np


class ConversionError(ValueError):
    """A source checkpoint cannot be converted; the message names the file or tensor and why."""


def bfloat16_to_float32(raw: np.ndarray) -> np.ndarray:
    """Widen bfloat16 values stored as uint16 bit patterns to float32 (exact: bfloat16 is the
    top half of a float32). NumPy has no bfloat16 dtype, hence the bit patterns."""
    return (raw.astype(np.uint32) << 16).view(np.float32)
