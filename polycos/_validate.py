"""Argument checks and planning: every public call is validated and planned here, once.

Everything here runs before any arithmetic, so a bad call fails at once with an
exception that names the argument and the offending value, shape or type, and
nothing is left half-done (spec section 4). Nothing here reads array *values*:
it works on traced arrays (``jax.jit``, ``torch.compile``, ``torch.jit.trace``,
symbolic sizes) and lazy ones (dask, unknown chunk sizes included).

The result is a :class:`Call` (row-wise) or :class:`PairwiseCall`: the inputs
promoted to one floating dtype, the backend that serves them, the resolved
axis and eps, and the outer-product plan. Backends receive it and never
re-validate.
"""

from __future__ import annotations

import decimal
import math
import numbers
import operator
from typing import Any

from polycos import _backends, _core, _outer
from polycos._backends._base import Widened
from polycos._call import Call, PairwiseCall

__all__ = [
    "Call",
    "PairwiseCall",
    "broadcast_shapes",
    "check_eps",
    "check_grad",
    "normalize_axis",
    "resolve_dim",
    "validate",
    "validate_pairwise",
]


# --------------------------------------------------------------------------- pieces


def _type_name(x: object) -> str:
    t = type(x)
    return f"{t.__module__}.{t.__qualname__}"


def _known(d: Any) -> bool:
    """A size known as a number (dask's unknown chunk sizes are NaN or None)."""
    if d is None:
        return False
    try:
        return not (isinstance(d, float) and math.isnan(d))
    except TypeError:  # symbolic sizes compare but are not floats
        return True


def broadcast_shapes(*shapes: tuple, names: tuple[str, ...] = ()) -> tuple:
    """Broadcast shapes by the array-API rules, naming the arguments on failure.

    Sizes are compared with ``==`` only (never hashed or converted), so
    symbolic sizes (``torch.compile`` with dynamic shapes, ``torch.export``,
    ``torch.jit.trace``) stay symbolic. An unknown size (dask: NaN or None)
    broadcasts with anything and stays unknown.
    """
    ndim = 0
    for s in shapes:  # not max(genexpr): Dynamo traces plain loops best
        ndim = max(ndim, len(s))
    out: list[Any] = []
    for i in range(-ndim, 0):
        size: Any = 1
        unknown: Any = None
        for s in shapes:
            if len(s) < -i:
                continue
            d = s[i]
            if not _known(d):
                unknown = d
                continue
            if d == 1:
                continue
            if size == 1:
                size = d
            elif not d == size:  # noqa: SIM201 (== only: symbolic sizes define __eq__)
                who = " and ".join(
                    f"{n} with shape {_shape_str(sh)}" for n, sh in zip(names, shapes, strict=False)
                ) or ", ".join(_shape_str(sh) for sh in shapes)
                raise ValueError(f"shapes do not broadcast: {who} (axis {i} has sizes {size} and {d})")
        out.append(unknown if (unknown is not None and size == 1) else size)
    return tuple(out)


def _shape_str(shape: tuple) -> str:
    return "(" + ", ".join(str(d) for d in shape) + ("," if len(shape) == 1 else "") + ")"


def _short(value: Any, limit: int = 60) -> str:
    """``repr(value)``, shortened in the middle when long (``eps=10**400`` has 401 digits)."""
    try:
        text = repr(value)
    except Exception:  # a repr that fails is no reason to hide the error being reported
        text = f"<{type(value).__name__}>"
    return text if len(text) <= limit else f"{text[: limit // 2]}...{text[-(limit // 2) :]} ({len(text)} characters)"


def _traced(value: Any) -> bool:
    """A 0-d numeric array whose number is not known yet (a JIT's tracer): converting it fails."""
    if getattr(value, "shape", None) != () or not any(k in str(getattr(value, "dtype", "")) for k in ("float", "int")):
        return False
    try:
        float(value)
    except Exception:
        return True
    return False


def _is_time(value: Any) -> bool:
    """A NumPy ``timedelta64`` or ``datetime64`` (``timedelta64`` registers as ``numbers.Integral``)."""
    return type(value).__name__ in ("timedelta64", "datetime64") and type(value).__module__ == "numpy"


def traced_error(name: str, value: Any) -> TypeError:
    """The error for ``dim`` or ``eps`` given as a value JAX traces (``jit``, ``vmap``, ``grad``)."""
    return TypeError(
        f"{name} must be a concrete number, got a traced value with no number yet ({_short(value)}): "
        f"the arguments of a function under jax.jit, vmap or grad are traced; pass {name} as a "
        f"static argument (jax.jit's static_argnames) or close over it"
    )


def _integer_0d(value: Any) -> int | None:
    """The number of a 0-d integer array (``torch.tensor(1)``, ``np.array(1)``; not traced), else ``None``.

    ``F.cosine_similarity`` accepts such a tensor as ``dim``; bool arrays are not integers here.
    """
    dtype = str(getattr(value, "dtype", ""))
    if getattr(value, "shape", None) != () or "int" not in dtype or "bool" in dtype:
        return None
    try:
        return operator.index(value)
    except Exception:
        return None


def normalize_axis(axis: Any, ndim: int, *, name: str = "dim", shape: tuple = ()) -> int:
    """Resolve a possibly negative axis against ``ndim`` (a 0-d shape counts as 1-d)."""
    if isinstance(axis, bool) or not isinstance(axis, numbers.Integral) or _is_time(axis):
        if _traced(axis):
            raise traced_error(name, axis)
        index = None if isinstance(axis, bool) or _is_time(axis) else _integer_0d(axis)
        if index is None:
            raise TypeError(f"{name} must be an int, got {_short(axis)} of type {type(axis).__name__}")
        axis = index
    axis = int(axis)
    n = max(ndim, 1)
    if not -n <= axis < n:
        raise IndexError(
            f"{name}={axis} is out of range for inputs broadcast to shape {_shape_str(shape)} "
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
    """``eps`` must be a finite, non-negative real number, returned as a Python float.

    Accepted: Python and NumPy reals (``Fraction`` too), ``decimal.Decimal``,
    and concrete 0-d real arrays of any library. Rejected with ``TypeError``:
    bools, complex numbers, strings, arrays with dimensions, values traced by
    ``jax.jit``, and tensors that require grad (polycos does not differentiate
    with respect to ``eps``). Negative, NaN, infinite or too-large values
    raise ``ValueError``; ``-0.0`` is ``0.0``.
    """
    if _is_time(eps):
        raise TypeError(f"eps must be a real number, got {_short(eps)} of type {type(eps).__name__}")
    if isinstance(eps, bool) or not isinstance(eps, (numbers.Real, decimal.Decimal)):
        if isinstance(eps, bool) or getattr(eps, "shape", None) != ():
            raise TypeError(f"eps must be a real number, got {_short(eps)} of type {type(eps).__name__}")
        dtype = str(getattr(eps, "dtype", ""))
        # a real dtype by name ("float32", "torch.int64", "bfloat16"): strings, bytes,
        # objects and dates are not parsed, whatever float() would make of them
        if "complex" in dtype or "bool" in dtype or not any(k in dtype for k in ("float", "int")):
            raise TypeError(f"eps must be a real number, got {_short(eps)} of dtype {dtype or None}")
        if getattr(eps, "requires_grad", False):
            raise TypeError(
                f"eps is a tensor that requires grad ({_short(eps)}); polycos treats eps as a "
                "constant, so no gradient would reach it: pass float(eps.detach())"
            )
        if getattr(getattr(eps, "device", None), "type", None) == "meta":
            raise TypeError(
                f"eps is a tensor on the meta device, which holds no value ({_short(eps)}); pass a Python float"
            )
        if _traced(eps):
            raise traced_error("eps", eps)
        try:
            eps = float(eps)
        except (TypeError, ValueError):
            raise TypeError(
                f"eps must be a real number, got {_short(eps)} of type {type(eps).__name__}"
            ) from None
    if isinstance(eps, decimal.Decimal) and not eps.is_finite():  # float() refuses a signalling NaN
        raise ValueError(f"eps must be finite and >= 0, got eps={_short(eps)}")
    try:
        value = float(eps)
    except OverflowError:  # e.g. 10**400
        raise ValueError(f"eps must be finite and >= 0, got eps={_short(eps)} (too large for a float)") from None
    if not 0 <= value < math.inf:  # comparisons, not math.isfinite: a symbolic float stays symbolic
        too_large = " (too large for a float)" if value == math.inf and not _is_inf(eps) else ""
        raise ValueError(f"eps must be finite and >= 0, got eps={_short(eps)}{too_large}")
    return value + 0.0  # -0.0 becomes 0.0


def _is_inf(eps: Any) -> bool:
    try:
        return bool(eps == math.inf)
    except Exception:
        return False


def _backend_and_namespace(arrays: tuple[tuple[str, Any], ...]) -> tuple[Any, Any]:
    backend = _backends.backend_for(arrays)
    return backend, backend.namespace(arrays)


# --------------------------------------------------------------------------- entry points


def validate(x1: Any, x2: Any, dim: Any, eps: Any, *, axis: Any = None) -> Call:
    """Check every argument of a row-wise call and plan it (spec section 4)."""
    call = _plain_rowwise(x1, x2, dim, eps, axis)
    if call is not None:
        return call
    given1, given2 = x1, x2
    dim = resolve_dim(dim, axis)
    backend, xp = _backend_and_namespace((("x1", x1), ("x2", x2)))
    _register(backend, xp)
    x1, x2 = backend.accept(xp, (("x1", x1), ("x2", x2)))
    shape = broadcast_shapes(tuple(x1.shape), tuple(x2.shape), names=("x1", "x2"))
    ax = normalize_axis(dim, len(shape), name="dim", shape=shape)
    eps = check_eps(eps)
    p1, p2 = backend.promote(xp, x1, x2)
    backend, p1, p2 = _widen(backend, xp, p1, p2, eps)
    outer = _outer.plan(shape, ax, tuple(p1.shape), tuple(p2.shape))
    if p1 is given1 and p2 is given2 and type(dim) is int and _plain_entry(p1, p2) is not None:
        if len(_ROWWISE_PLANS) >= _ROWWISE_PLANS_MAX:
            _ROWWISE_PLANS.clear()
        call = Call(backend, xp, p1, p2, shape, ax, eps, outer)
        _ROWWISE_PLANS[(tuple(p1.shape), tuple(p2.shape), dim)] = (shape, ax, outer, call.out_shape)
        return call
    return Call(backend, xp, p1, p2, shape, ax, eps, outer)


#: The plans of row-wise calls on plain arrays (:func:`_plain_entry`) already
#: validated the long way, by ``(x1.shape, x2.shape, dim)``: ``(broadcast shape,
#: axis, outer plan)``. A training loop repeats a few shapes; the checks that
#: depend on the shapes alone are not repeated (:func:`_plain_rowwise`).
_ROWWISE_PLANS: dict[tuple, tuple] = {}
_ROWWISE_PLANS_MAX = 1024

#: ``(array type, backend, namespace, dtypes)`` of each backend whose arrays have
#: been validated the long way and that names plain arrays
#: (:meth:`polycos._backends._base.Backend.plain_arrays`: NumPy's ``ndarray``,
#: torch's ``Tensor``): their common calls are then recognised in a few
#: attribute reads. A tuple scanned with ``is``: Dynamo traces it.
_PLAIN: tuple[tuple[type, Any, Any, tuple[Any, ...]], ...] = ()


def _register(backend: Any, xp: Any) -> None:
    """Remember a backend's plain array type once its arrays have been validated the long way."""
    global _PLAIN
    spec = backend.plain_arrays()
    if spec is None or any(entry[1] is backend for entry in _PLAIN):
        return
    array_type, dtypes = spec
    _PLAIN = (*_PLAIN, (array_type, backend, xp, tuple(dtypes)))


def _plain_entry(x1: Any, x2: Any | None) -> tuple[type, Any, Any, tuple[Any, ...]] | None:
    """The registry entry of two plain arrays (``x2`` may be ``None``) of one fast dtype; else ``None``.

    Plain: exactly the backend's array type (no subclass), a dtype it lists,
    ``x2`` of the same type and dtype, and whatever the backend checks per call
    (:meth:`~polycos._backends._base.Backend.plain_now`: torch's device, layout,
    not while compiling). For these every type, dtype and device check of the
    full path passes and promotes nothing.
    """
    t = type(x1)
    for entry in _PLAIN:
        if t is entry[0]:
            if x1.dtype not in entry[3] or (x2 is not None and (type(x2) is not t or x2.dtype != x1.dtype)):
                return None
            return entry if entry[1].plain_now(x1, x2) else None
    return None


def _plain_rowwise(x1: Any, x2: Any, dim: Any, eps: Any, axis: Any) -> Call | None:
    """A row-wise call on plain arrays whose shapes were validated before, in a few attribute reads; else ``None``.

    Two plain arrays (:func:`_plain_entry`), an ``int`` ``dim`` (or ``axis``, or
    neither: 1) and a Python float ``eps`` that is finite and ``>= 0``: every
    check of the full path passes for these exactly as it did for the same
    shapes and ``dim`` (no promotion), so the call is the same :class:`Call`.
    Everything else, every error included, takes the full path.
    """
    if not _PLAIN or type(eps) is not float or not 0.0 <= eps < math.inf:
        return None
    if axis is None:
        dim = 1 if dim is None else dim
    elif dim is None:
        dim = axis
    else:
        return None
    if type(dim) is not int or x2 is None:
        return None
    entry = _plain_entry(x1, x2)
    if entry is None:
        return None
    known = _ROWWISE_PLANS.get((tuple(x1.shape), tuple(x2.shape), dim))
    if known is None:
        return None
    return Call(entry[1], entry[2], x1, x2, known[0], known[1], eps + 0.0, known[2], known[3])


def _plain_pairwise(x1: Any, x2: Any | None, eps: Any) -> PairwiseCall | None:
    """The common pairwise call on plain arrays, validated in a few attribute reads; ``None`` for anything else.

    Two plain arrays (:func:`_plain_entry`) of shapes ``(N, D)``, ``(M, D)``
    (or ``x2=None``) and a Python float ``eps`` that is finite and ``>= 0``:
    every check of the full path passes for these and changes nothing (no
    promotion, no broadcast), so the call is the same :class:`PairwiseCall`.
    Everything else, every error included, takes the full path.
    """
    if not _PLAIN or type(eps) is not float or not 0.0 <= eps < math.inf:
        return None
    entry = _plain_entry(x1, x2)
    if entry is None or x1.ndim != 2:
        return None
    if x2 is None:
        m = x1.shape[0]
    elif x2.ndim != 2 or x2.shape[1] != x1.shape[1]:
        return None
    else:
        m = x2.shape[0]
    return PairwiseCall(entry[1], entry[2], x1, x2, eps + 0.0, (x1.shape[0], m))


def validate_pairwise(x1: Any, x2: Any | None, eps: Any) -> PairwiseCall:
    """Check the arguments of a pairwise call (spec section 4)."""
    call = _plain_pairwise(x1, x2, eps)
    if call is not None:
        return call
    given = (("x1", x1),) if x2 is None else (("x1", x1), ("x2", x2))
    backend, xp = _backend_and_namespace(given)
    _register(backend, xp)
    accepted = backend.accept(xp, given)
    x1 = accepted[0]
    x2 = None if x2 is None else accepted[1]
    for name, x in zip(("x1", "x2"), accepted, strict=False):
        if x.ndim < 2:
            raise ValueError(
                f"{name} must have at least 2 dimensions (..., N, D), got shape {_shape_str(tuple(x.shape))}"
            )
    other = x1 if x2 is None else x2
    try:
        batch = broadcast_shapes(tuple(x1.shape[:-2]), tuple(other.shape[:-2]))
    except ValueError:
        raise ValueError(
            f"leading dimensions do not broadcast: x1 with shape {_shape_str(tuple(x1.shape))} and "
            f"x2 with shape {_shape_str(tuple(other.shape))}"
        ) from None
    d1, d2 = x1.shape[-1], other.shape[-1]
    if not (d1 == d2 or d1 == 1 or d2 == 1):
        raise ValueError(
            f"vector lengths differ: x1 with shape {_shape_str(tuple(x1.shape))} has D={d1}, "
            f"x2 with shape {_shape_str(tuple(other.shape))} has D={d2}"
        )
    eps = check_eps(eps)
    p1, p2 = backend.promote(xp, x1, other)
    backend, p1, p2 = _widen(backend, xp, p1, p2, eps)
    shape = (*batch, x1.shape[-2], other.shape[-2])
    return PairwiseCall(backend, xp, p1, None if x2 is None else p2, eps, shape)


#: float32's largest finite value: a larger ``eps`` is beyond a float32 accumulation.
_F32_MAX = 3.4028234663852886e38


def _widen(backend: Any, xp: Any, x1: Any, x2: Any, eps: float) -> tuple[Any, Any, Any]:
    """``(backend, x1, x2)``, widened to float64 (:class:`~polycos._backends._base.Widened`) where
    ``eps`` is beyond float32's range, the inputs' sums would run in float32 with rescaled rows
    (bfloat16), and float64 exists; unchanged otherwise (docs/semantics.md, ``eps`` beyond the
    accumulation dtype)."""
    if not eps > _F32_MAX:
        return backend, x1, x2
    dtype = x1.dtype
    acc = _core.accumulation_dtype(xp, dtype, like=x1)
    if _core._dtype_name(acc) != "float32" or not _core.is_rescaled(dtype, acc) or not _core._has_float64(xp, x1):
        return backend, x1, x2
    wide = (xp.astype(x, xp.float64) for x in (x1, x2))
    return Widened(backend, dtype), *wide


def check_grad(grad: Any, call: Call | PairwiseCall, shape: tuple) -> Any:
    """``grad`` of the inputs' library and device, real, broadcastable to ``shape``; cast to the call's dtype."""
    backend = call.backend
    if type(grad) is type(call.x1) and _plain_entry(call.x1, grad) is not None and tuple(grad.shape) == tuple(shape):
        # a plain array of the inputs' kind and dtype, of the result's shape, passes every check below unchanged
        return grad
    if not backend.owns(grad):
        raise TypeError(
            f"grad must be an array of the same library as x1 and x2 ({backend.name}), "
            f"got {_type_name(grad)}"
        )
    (grad,) = backend.accept(call.xp, (("grad", grad),))
    backend.check_same_device((("x1", call.x1), ("grad", grad)))
    try:
        if broadcast_shapes(tuple(grad.shape), shape) != tuple(shape):
            raise ValueError
    except ValueError:
        raise ValueError(
            f"grad with shape {_shape_str(tuple(grad.shape))} does not broadcast to the result "
            f"shape {_shape_str(tuple(shape))}"
        ) from None
    return backend.cast_grad(call.xp, grad, call.dtype)
