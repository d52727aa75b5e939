"""npgpt: GPT-2 with hand-written backprop, written once against an array-API backend."""

from npgpt.backend import Backend, available_backends, get_backend
from npgpt.config import GPTConfig

__all__ = ["Backend", "GPTConfig", "available_backends", "get_backend"]
__version__ = "0.1.0"
