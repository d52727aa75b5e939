"""The array-API namespace npgpt sees on CuPy: CuPy's own `cupy` module, plus the one
thing of the standard its functions lack (as of CuPy 14), the `device=` keyword of the
creation functions, and a guard CuPy lacks: `take` and `take_along_axis` wrap an index
outside the axis around instead of raising, so here each call also records, on the
device, whether any index was outside [0, n). Reading that record costs a transfer, so
the backend reads it only where it reads data back anyway (`CupyBackend.to_numpy`,
`synchronize`) and raises IndexError then.

Everything else (permute_dims, matrix_transpose, astype, isdtype, take_along_axis, the
dtypes, ...) is CuPy's, looked up on the `cupy` module at each use, so this is a thin
view of CuPy and not a copy of it.
"""

from __future__ import annotations

import functools
import types

from npgpt.errors import UserError

# Functions of the standard that create an array and take `device=`.
CREATION_FUNCTIONS = (
    "arange", "asarray", "empty", "empty_like", "eye", "full", "full_like",
    "linspace", "ones", "ones_like", "zeros", "zeros_like",
)  # fmt: skip


class DeviceIndexError(UserError, IndexError):
    """An index outside its axis reached a gather on the GPU (CuPy would have wrapped it)."""


class CupyNamespace(types.ModuleType):
    """`cupy`, with `device=` accepted by the creation functions (a `cupy.cuda.Device`:
    the array is allocated with that device current)."""

    def __init__(self, cupy):
        super().__init__("npgpt_cupy.xp", __doc__)
        self._cupy = cupy
        self._bad_index = {}  # GPU number -> 0-d bool array: some index was out of range
        for name in CREATION_FUNCTIONS:
            setattr(self, name, _with_device(getattr(cupy, name)))

    def take(self, x, indices, /, *, axis=None):
        self.check_indices(indices, x.size if axis is None else x.shape[axis])
        return self._cupy.take(x, indices, axis=axis)

    def take_along_axis(self, x, indices, /, *, axis=-1):
        self.check_indices(indices, x.shape[axis])
        return self._cupy.take_along_axis(x, indices, axis=axis)

    def check_indices(self, indices, n: int) -> None:
        """Record on the device whether any of `indices` is outside [0, n): one min and
        one max, no transfer (see `raise_on_bad_index`)."""
        if indices.size == 0:
            return
        bad = (self._cupy.min(indices) < 0) | (self._cupy.max(indices) >= n)
        device = indices.device.id
        seen = self._bad_index.get(device)
        self._bad_index[device] = bad if seen is None else seen | bad

    def raise_on_bad_index(self, device: int) -> None:
        """DeviceIndexError (an IndexError) if an index checked on GPU `device` since the
        last call was out of range (reads one bool back: call it where the stream is synchronised anyway)."""
        bad = self._bad_index.pop(device, None)
        if bad is not None and bool(bad.get()):
            raise DeviceIndexError(
                f"an index outside its axis reached take/take_along_axis on GPU {device}, which CuPy wraps silently: "
                "a token id >= vocab_size, or a target neither in [0, vocab_size) nor the ignore index; "
                "check that the ids come from the model's tokenizer and the ignore index is the data's"
            )

    def __getattr__(self, name):  # only called for names not set above
        return getattr(self._cupy, name)

    def __repr__(self):
        return f"<array-API view of cupy {self._cupy.__version__}>"


def _with_device(create):
    """create(*args, **kwargs) with an extra `device=`: run it with that device current."""

    @functools.wraps(create)
    def create_on(*args, device=None, **kwargs):
        if device is None:
            return create(*args, **kwargs)
        with device:
            return create(*args, **kwargs)

    return create_on
