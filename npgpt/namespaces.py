"""Which array-API namespace an array belongs to (for arrays that do not say themselves).

Layers and kernels read the namespace off their arrays; `npgpt.backend` re-exports both
functions (plugins call `npgpt.backend.register_array_namespace`).
"""

from __future__ import annotations

# Array types that lack `__array_namespace__` (CuPy's ndarray, as of CuPy 14), mapped to
# the namespace their backend serves; filled by plugins through register_array_namespace.
_REGISTERED_NAMESPACES: dict[type, object] = {}


def register_array_namespace(array_type: type, xp) -> None:
    """Declare `xp` the namespace of arrays of `array_type`, for array types that do not
    name their own through `__array_namespace__` (a plugin calls this in its factory)."""
    _REGISTERED_NAMESPACES[array_type] = xp


def array_namespace(x):
    """The array-API namespace of array `x`: its own `__array_namespace__()`, else the one
    a backend registered for its type. TypeError for anything else (lists, scalars)."""
    own = getattr(x, "__array_namespace__", None)
    if own is not None:
        return own()
    xp = _REGISTERED_NAMESPACES.get(type(x))
    if xp is None:
        raise TypeError(f"{type(x).__name__} is not an array of any known backend")
    return xp
