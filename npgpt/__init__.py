"""npgpt: GPT-2 with hand-written backprop, written once against an array-API backend."""

import os

# OpenBLAS's idle threads spin for 2^28 TSC cycles (~0.1 s) after every product before they
# sleep, taking a core from the kernels' own thread pool between products. 2^20 cycles
# (~0.3-0.5 ms at 2-3 GHz) still covers back-to-back products. OpenBLAS reads this once, when NumPy
# loads it: a program that imports NumPy before npgpt sets it itself, or keeps the default.
os.environ.setdefault("OPENBLAS_THREAD_TIMEOUT", "20")

from npgpt.backend import Backend, available_backends, get_backend  # noqa: E402
from npgpt.config import GPTConfig  # noqa: E402

__all__ = ["Backend", "GPTConfig", "available_backends", "get_backend"]
__version__ = "0.1.0"
