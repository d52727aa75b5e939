"""The array-API namespace npgpt sees on CuPy: CuPy's own `cupy` module, plus the one
thing of the standard its functions lack (as of CuPy 14): the `device=` keyword of the
creation functions.

Everything else (permute_dims, matrix_transpose, astype, isdtype, take_along_axis, the
dtypes, ...) is CuPy's, looked up on the `cupy` module at each use, so this is a thin
view of CuPy and not a copy of it.
"""

from __future__ import annotations

import functools
import types

# Functions of the standard that create an array and take `device=`.
CREATION_FUNCTIONS = (
    "arange", "asarray", "empty", "empty_like", "eye", "full", "full_like",
    "linspace", "ones", "ones_like", "zeros", "zeros_like",
)  # fmt: skip


class CupyNamespace(types.ModuleType):
    """`cupy`, with `device=` accepted by the creation functions (a `cupy.cuda.Device`:
    the array is allocated with that device current)."""

    def __init__(self, cupy):
        super().__init__("npgpt_cupy.xp", __doc__)
        self._cupy = cupy
        for name in CREATION_FUNCTIONS:
            setattr(self, name, _with_device(getattr(cupy, name)))

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
