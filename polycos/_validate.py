"""Argument checks shared by every entry point.

Everything here runs before any arithmetic, so a bad call fails at once with an
exception that names the argument and the offending value, shape or type, and
nothing is left half-done (spec section 4). No function here looks at array
*values*: they all work on traced arrays (``jax.jit``, ``torch.compile``) and
lazy ones (dask) too.
"""

from __future__ import annotations

import math
import numbers
from dataclasses import dataclass
from typing import Any

import array_api_compat

__all__ = [
    "Call",
    "broadcast_shapes",
    "check_eps",
    "normalize_axis",
    "resolve_dim",
    "validate",
]


@dataclass(frozen=True)
class Call:
    """A validated call: inputs promoted to one floating dtype, the axis resolved.

    ``x1`` and ``x2`` are *not* broadcast yet (broadcasting is left to the
    arithmetic so no ``N*M*D`` array is ever built by validation); ``shape`` is
    their broadcast shape and ``axis`` a non-negative index into it. A 0-d
    broadcast shape is reported as ``shape == ()`` with ``axis == 0``; callers
    reshape such inputs to ``(1,)``.
    """

    xp: Any
    x1: Any
    x2: Any
    shape: tuple[int, ...]
    axis: int
    eps: float

    @property
    def dtype(self) -> Any:
        return self.x1.dtype


def _type_name(x: object) -> str:
    t = type(x)
    return f"{t.__module__}.{t.__qualname__}"


def broadcast_shapes(*shapes: tuple, names: tuple[str, ...] = ()) -> tuple:
    """Broadcast shapes by the array-API rules, naming the arguments on failure.

    ``None`` (an unknown dask dimension) broadcasts with anything.
    """
    ndim = 0
    for s in shapes:  # not max(genexpr, default=0): torch.compile cannot trace that
        ndim = max(ndim, len(s))
    out: list[int | None] = []
    for i in range(-ndim, 0):
        sizes = {s[i] for s in shapes if len(s) >= -i} - {1}
        known = sizes - {None}
        if len(known) > 1:
            who = " and ".join(
                f"{n} with shape {tuple(s)}" for n, s in zip(names, shapes, strict=False)
            )
            raise ValueError(
                f"shapes do not broadcast: {who} (axis {i} has sizes {sorted(known)})"
            )
        out.append(known.pop() if known else (None if None in sizes else 1))
    return tuple(out)


def normalize_axis(axis: Any, ndim: int, *, name: str = "dim", shape: tuple = ()) -> int:
    """Resolve a possibly negative axis against ``ndim`` (a 0-d shape counts as 1-d)."""
    if isinstance(axis, bool) or not isinstance(axis, numbers.Integral):
        raise TypeError(f"{name} must be an int, got {axis!r} of type {type(axis).__name__}")
    axis = int(axis)
    n = max(ndim, 1)
    if not -n <= axis < n:
        raise IndexError(
            f"{name}={axis} is out of range for inputs broadcast to shape {tuple(shape)} "
            f"(expected {-n} <= {name} < {n})"
        )
    return axis % n


def resolve_dim(dim: Any, axis: Any, default: int = 1) -> Any:
    """``dim`` and its NumPy-style alias ``axis``: at most one may be given."""
    if dim is not None and axis is not None:
        raise TypeError(f"give dim or axis, not both (got dim={dim!r}, axis={axis!r})")
    if dim is not None:
        return dim
    if axis is not None:
        return axis
    return default


def check_eps(eps: Any) -> float:
    """``eps`` must be a finite, non-negative real number."""
    if isinstance(eps, bool) or not isinstance(eps, numbers.Real):
        # 0-d arrays (NumPy scalars, 0-d tensors) are accepted if they convert.
        try:
            if getattr(eps, "shape", None) != () or isinstance(eps, bool):
                raise TypeError
            eps = float(eps)
        except (TypeError, ValueError):
            raise TypeError(
                f"eps must be a real number, got {eps!r} of type {type(eps).__name__}"
            ) from None
    eps = float(eps)
    if not math.isfinite(eps) or eps < 0:
        raise ValueError(f"eps must be finite and >= 0, got eps={eps!r}")
    return eps


def namespace(x1: Any, x2: Any) -> Any:
    """The array namespace shared by ``x1`` and ``x2`` (``TypeError`` otherwise)."""
    for name, x in (("x1", x1), ("x2", x2)):
        if not array_api_compat.is_array_api_obj(x):
            raise TypeError(
                f"{name} must be an array (NumPy, PyTorch, JAX, CuPy or another array-API "
                f"library), got {_type_name(x)}"
            )
    try:
        return array_api_compat.array_namespace(x1, x2)
    except TypeError:
        raise TypeError(
            f"x1 and x2 must come from the same array library, got {_type_name(x1)} "
            f"and {_type_name(x2)}"
        ) from None


def _is_dtype_kind(xp: Any, dtype: Any, kind: str) -> bool:
    try:
        return bool(xp.isdtype(dtype, kind))
    except (TypeError, ValueError, AttributeError):  # e.g. ml_dtypes' bfloat16 in NumPy
        return kind == "real floating" and getattr(dtype, "kind", "") == "V"


def default_float(xp: Any, like: Any) -> Any:
    try:
        info = xp.__array_namespace_info__()
        return info.default_dtypes(device=array_api_compat.device(like))["real floating"]
    except Exception:
        return xp.float64 if hasattr(xp, "float64") else xp.float32


def promote(xp: Any, x1: Any, x2: Any) -> tuple[Any, Any]:
    """Cast both inputs to their common real floating dtype (spec section 2.1)."""
    for name, x in (("x1", x1), ("x2", x2)):
        if _is_dtype_kind(xp, x.dtype, "complex floating"):
            raise TypeError(f"{name} has complex dtype {x.dtype}; only real inputs are supported")
    xs = []
    for x in (x1, x2):
        if _is_dtype_kind(xp, x.dtype, "real floating"):
            xs.append(x)
        else:  # integer and bool inputs become the backend's default float
            xs.append(xp.astype(x, default_float(xp, x)))
    dtype = xp.result_type(xs[0], xs[1])
    return tuple(x if x.dtype == dtype else xp.astype(x, dtype) for x in xs)  # type: ignore[return-value]


def validate(x1: Any, x2: Any, dim: Any, eps: Any) -> Call:
    """Check every argument and return the resolved call (spec section 4)."""
    xp = namespace(x1, x2)
    shape = broadcast_shapes(tuple(x1.shape), tuple(x2.shape), names=("x1", "x2"))
    axis = normalize_axis(dim, len(shape), name="dim", shape=shape)
    eps = check_eps(eps)
    p1, p2 = promote(xp, x1, x2)
    return Call(xp=xp, x1=p1, x2=p2, shape=shape, axis=axis, eps=eps)
