"""Property-testing tools: Hypothesis strategies, an exact reference, cross-backend asserts.

The same tools polycos' own test suite uses, public so you can property-test
code built on cosine similarity across array libraries.

* :func:`cosine_inputs` draws ``(x1, x2, dim, eps)`` for any array namespace:
  broadcast-compatible shapes (0-d, size-0 and size-1 dims included), and the
  hard cases — zero rows, tiny and huge scales, nearly parallel and nearly
  orthogonal vectors, NaN/inf rows.
* :func:`reference` and :func:`reference_vjp` evaluate the definition in
  extended precision (``numpy.longdouble``: float64 inputs get more than
  float64 accuracy where the platform has it; float32 and narrower are exact
  to far below their ulp).
* :func:`assert_matches_reference`, :func:`assert_vjp_matches_reference` and
  :func:`assert_backends_agree` check results against that reference.

Examples
--------
>>> import numpy as np
>>> from hypothesis import given, settings
>>> import polycos
>>> from polycos.testing import cosine_inputs, assert_matches_reference
>>> @settings(max_examples=20, deadline=None)
... @given(cosine_inputs(np, dtypes=("float32",)))
... def test_polycos_matches_reference(case):
...     s = polycos.cosine_similarity(case.x1, case.x2, case.dim, case.eps)
...     assert_matches_reference(s, case.x1, case.x2, case.dim, case.eps)
>>> test_polycos_matches_reference()
"""

from __future__ import annotations

import types
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import array_api_compat
import numpy as np

__all__ = [
    "CosineCase",
    "assert_backends_agree",
    "assert_matches_reference",
    "assert_vjp_matches_reference",
    "available_backends",
    "cosine_inputs",
    "exact_reference",
    "from_numpy",
    "reference",
    "reference_vjp",
    "to_numpy",
]

_EXT = np.longdouble  # extended precision where the platform has it (80-bit on x86-64)


# --------------------------------------------------------------------------- conversion


def _backend_of(x: Any) -> Any:
    from polycos import _backends

    return _backends.backend_for((("x", x),))


def to_numpy(x: Any) -> np.ndarray:
    """Copy an array of any supported library to NumPy (bfloat16 as float32)."""
    return _backend_of(x).to_numpy(x)


def from_numpy(xp: Any, a: np.ndarray, dtype: str | None = None) -> Any:
    """``a`` as an array of the library whose namespace (or array) is ``xp`` (``dtype`` by name).

    Given an array, ``a`` comes out on that array's device.
    """
    from polycos import _backends

    if isinstance(xp, types.ModuleType):
        return _backends.get(_namespace_backend(xp)).from_numpy(np.asarray(a), dtype, xp=xp)
    like = (("xp", xp),)
    backend = _backends.backend_for(like)  # the registry's owner of the array (TypeError if none)
    return backend.from_numpy(
        np.asarray(a), dtype, xp=backend.namespace(like), device=array_api_compat.device(xp)
    )


def _namespace_backend(xp: Any) -> str:
    """The registry name of the backend of a namespace (``numpy``, ``torch``, ``jax.numpy`` ...)."""
    from polycos import _backends

    for entry in _backends.ENTRIES:
        if entry.name == "array_api":
            continue
        probe = getattr(xp, "__name__", "")
        roots = {entry.name, *entry.requires}
        if probe.split(".")[0] in roots or f"array_api_compat.{entry.name}" in probe:
            return entry.name
    return "array_api"


# --------------------------------------------------------------------------- reference


def _prepare(x1: Any, x2: Any, dim: int) -> tuple[np.ndarray, np.ndarray, int, tuple]:
    a1, a2 = to_numpy(x1).astype(_EXT), to_numpy(x2).astype(_EXT)
    shape = np.broadcast_shapes(a1.shape, a2.shape)
    nd = max(len(shape), 1)
    if not -nd <= dim < nd:
        raise IndexError(f"dim={dim} out of range for shape {shape}")
    dim %= nd
    if not shape:
        a1, a2, shape = a1.reshape(1), a2.reshape(1), (1,)
    return np.broadcast_to(a1, shape), np.broadcast_to(a2, shape), dim, shape


def _norm(a: np.ndarray, dim: int) -> np.ndarray:
    # Scaled like nrm2, so even longdouble never overflows or underflows.
    m = np.max(np.abs(a), axis=dim, keepdims=True) if a.shape[dim] else np.zeros(())
    m = np.where((m > 0) & np.isfinite(m), m, 1)
    return np.sqrt(np.sum((a / m) ** 2, axis=dim, keepdims=True)) * m


def _stats(a1: np.ndarray, a2: np.ndarray, dim: int, eps: float) -> tuple[np.ndarray, ...]:
    with np.errstate(all="ignore"):
        n1, n2 = _norm(a1, dim), _norm(a2, dim)
        c1, c2 = np.maximum(n1, eps), np.maximum(n2, eps)
        u1 = np.where(c1 == 0, 0, a1 / np.where(c1 == 0, 1, c1))  # NaN norms stay NaN
        u2 = np.where(c2 == 0, 0, a2 / np.where(c2 == 0, 1, c2))
        s = np.clip(np.sum(u1 * u2, axis=dim, keepdims=True), -1, 1)
        s = np.where(np.isnan(s), np.nan, s)
    return s, n1, n2, c1, c2


def reference(x1: Any, x2: Any, dim: int = 1, eps: float = 1e-8) -> np.ndarray:
    """The definition (spec section 2) in extended precision, as a float64 NumPy array.

    Inputs of any supported library are copied to NumPy first. Normalising by
    ``max(||x||, eps)`` before the dot product keeps every intermediate in range.

    >>> import numpy as np
    >>> reference(np.array([[1.0, 2.0], [3.0, 4.0]]), np.array([[5.0, 6.0], [7.0, 8.0]]), dim=0).round(4)
    array([0.9558, 0.9839])
    """
    a1, a2, dim, _shape = _prepare(x1, x2, dim)
    s = _stats(a1, a2, dim, eps)[0]
    out_shape = tuple(d for i, d in enumerate(np.broadcast_shapes(np.shape(to_numpy(x1)), np.shape(to_numpy(x2)))) if i != dim)
    return np.asarray(np.squeeze(s, axis=dim), dtype=np.float64).reshape(out_shape)


def exact_reference(x1: Any, x2: Any, dim: int = 1, eps: float = 1e-8) -> np.ndarray:
    """The definition evaluated exactly (rational sums, 50-digit square root), as float64.

    Slow (Python arithmetic per element): for sampled rows at the top and bottom
    of a dtype's range, where every floating-point reference needs care. Each
    value is the exact result rounded once to float64.

    >>> import numpy as np
    >>> float(exact_reference(np.array([1e-310, 1e-310]), np.array([1e-310, 0.0]), dim=0, eps=0.0))
    0.7071067811865476
    """
    import decimal
    from fractions import Fraction

    _, _, dim, _shape = _prepare(x1, x2, dim)
    b1 = np.moveaxis(np.broadcast_to(np.asarray(_to64(x1)), _shape), dim, -1)
    b2 = np.moveaxis(np.broadcast_to(np.asarray(_to64(x2)), _shape), dim, -1)
    out = np.empty(b1.shape[:-1], dtype=np.float64)
    e = Fraction(eps)
    ctx = decimal.Context(prec=50)
    for idx in np.ndindex(out.shape):
        r1, r2 = b1[idx], b2[idx]
        if not (np.all(np.isfinite(r1)) and np.all(np.isfinite(r2))):
            out[idx] = np.nan
            continue
        f1 = [Fraction(float(v)) for v in r1]
        f2 = [Fraction(float(v)) for v in r2]
        w12 = sum((u * v for u, v in zip(f1, f2, strict=True)), Fraction(0))
        n1 = ctx.sqrt(_dec(sum((u * u for u in f1), Fraction(0)), ctx))
        n2 = ctx.sqrt(_dec(sum((v * v for v in f2), Fraction(0)), ctx))
        c1, c2 = max(n1, _dec(e, ctx)), max(n2, _dec(e, ctx))
        den = ctx.multiply(c1, c2)
        s = decimal.Decimal(0) if den == 0 else ctx.divide(_dec(w12, ctx), den)
        out[idx] = float(min(max(s, decimal.Decimal(-1)), decimal.Decimal(1)))
    return out.reshape(tuple(d for i, d in enumerate(_shape) if i != dim))


def _to64(x: Any) -> np.ndarray:
    return np.asarray(to_numpy(x), dtype=np.float64)


def _dec(f: Any, ctx: Any) -> Any:
    import decimal

    return ctx.divide(decimal.Decimal(f.numerator), decimal.Decimal(f.denominator))


def _sum_to(g: np.ndarray, shape: tuple) -> np.ndarray:
    lead = g.ndim - len(shape)
    g = g.sum(axis=tuple(range(lead))) if lead else g
    axes = tuple(i for i, d in enumerate(shape) if d == 1 and g.shape[i] != 1)
    return g.sum(axis=axes, keepdims=True).reshape(shape) if axes else g.reshape(shape)


def reference_vjp(
    grad: Any, x1: Any, x2: Any, dim: int = 1, eps: float = 1e-8
) -> tuple[np.ndarray, np.ndarray]:
    """The exact VJP (spec section 2.5) in extended precision, as float64 NumPy arrays.

    >>> import numpy as np
    >>> g1, g2 = reference_vjp(np.ones(1), np.array([[1.0, 0.0]]), np.array([[1.0, 1.0]]))
    >>> g1.round(4)
    array([[0.    , 0.7071]])
    """
    shape1, shape2 = np.shape(to_numpy(x1)), np.shape(to_numpy(x2))
    a1, a2, dim, shape = _prepare(x1, x2, dim)
    s, n1, n2, c1, c2 = _stats(a1, a2, dim, eps)
    g = np.expand_dims(np.broadcast_to(to_numpy(grad).astype(_EXT), tuple(d for i, d in enumerate(shape) if i != dim)), dim)
    with np.errstate(all="ignore"):
        inv1 = np.where(c1 == 0, 0, 1 / np.where(c1 == 0, 1, c1))  # NaN stays NaN
        inv2 = np.where(c2 == 0, 0, 1 / np.where(c2 == 0, 1, c2))
        q1 = np.where(n1 > eps, s / np.where(n1 > 0, n1, 1), 0)
        q2 = np.where(n2 > eps, s / np.where(n2 > 0, n2, 1), 0)
        g1 = g * inv1 * (a2 * inv2 - q1 * a1)
        g2 = g * inv2 * (a1 * inv1 - q2 * a2)
    g1 = _sum_to(g1, (1,) * (len(shape) - len(shape1)) + shape1 if shape1 else (1,))
    g2 = _sum_to(g2, (1,) * (len(shape) - len(shape2)) + shape2 if shape2 else (1,))
    return g1.astype(np.float64).reshape(shape1), g2.astype(np.float64).reshape(shape2)


# --------------------------------------------------------------------------- asserts


#: Significand bits of the floating dtypes polycos computes in, by name.
_MANTISSA = {"float16": 10, "bfloat16": 7, "float32": 23, "float64": 52}
#: The dtypes :func:`cosine_inputs` draws and the asserts measure in ulps.
DTYPES = tuple(_MANTISSA)


def _ulp_one(dtype_name: str) -> float:
    """ulp(1.0) of a floating dtype by name (bfloat16 included)."""
    return 2.0 ** -_MANTISSA[dtype_name]


def _floating(what: str, x: Any) -> str:
    """The dtype name of ``x``, asserted to be one whose ulp the asserts know."""
    name = _dtype_name(x)
    assert name in _MANTISSA, (
        f"{what} has dtype {name}, not a floating dtype ({', '.join(DTYPES)})"
    )
    return name


def _finfo(name: str) -> Any:
    if name == "bfloat16":
        import ml_dtypes

        return ml_dtypes.finfo(ml_dtypes.bfloat16)
    return np.finfo(name)


def _dtype_name(x: Any) -> str:
    return str(x.dtype).rsplit(".", 1)[-1]


def assert_matches_reference(
    result: Any, x1: Any, x2: Any, dim: int = 1, eps: float = 1e-8, *, ulps: float = 1.0
) -> None:
    """Assert ``result`` is within ``ulps`` × ulp(1.0) of the exact value, elementwise.

    Also asserts ``|result| <= 1``, the broadcast result shape, and NaN exactly
    where the reference is NaN. ``ulp(1.0)`` is that of ``result``'s dtype.
    """
    ulp = _ulp_one(_floating("result", result))
    r = to_numpy(result).astype(np.float64)
    ref = reference(x1, x2, dim, eps)
    assert r.shape == ref.shape, f"shape {r.shape} != expected {ref.shape}"
    nan_r, nan_ref = np.isnan(r), np.isnan(ref)
    if not r.ndim:  # no index to name
        assert nan_r == nan_ref, f"NaN differs from the reference: got {r.item()}, expected {ref.item()}"
    assert np.array_equal(nan_r, nan_ref), (
        f"NaN at {np.argwhere(nan_r != nan_ref)[:5].tolist()} differs from the reference"
    )
    ok = ~nan_ref
    assert np.all(np.abs(r[ok]) <= 1.0), f"|s| > 1: max {np.max(np.abs(r[ok]))!r}"
    if ok.any():
        err = np.max(np.abs(r[ok] - ref[ok]))
        assert err <= ulps * ulp, f"error {err:.3g} = {err / ulp:.3g} ulp(1) > {ulps} ulp(1)"


def assert_vjp_matches_reference(
    grads: tuple[Any, Any],
    grad: Any,
    x1: Any,
    x2: Any,
    dim: int = 1,
    eps: float = 1e-8,
    *,
    ulps: float = 32.0,
) -> None:
    """Assert gradients match :func:`reference_vjp` to ``ulps`` × ulp(1.0) of the row's scale.

    The scale of a row of ``dL/dx1`` is ``|g| / max(||x1||, eps)`` (an upper bound
    on its entries up to a factor 2), summed over broadcast rows; the tolerance
    never goes below the dtype's smallest subnormal. Rows where either
    ``max(||x||, eps)`` is below ``4 / finfo.max`` of the gradient's dtype
    (about its smallest normal number: there ``x / ||x||`` and ``g / ||x||``
    are not representable accurately) are outside the guarantee and skipped.
    """
    refs = reference_vjp(grad, x1, x2, dim, eps)
    a1, a2, d, shape = _prepare(x1, x2, dim)
    _, _, _, c1, c2 = _stats(a1, a2, d, eps)
    g = np.abs(np.expand_dims(np.broadcast_to(to_numpy(grad).astype(np.float64), tuple(n for i, n in enumerate(shape) if i != d)), d))
    for name, got, ref, c, x in (("x1", grads[0], refs[0], c1, x1), ("x2", grads[1], refs[1], c2, x2)):
        _floating(f"grad of {name}", got)
        got_np = to_numpy(got).astype(np.float64)
        assert got_np.shape == ref.shape, f"grad of {name}: shape {got_np.shape} != {ref.shape}"
        with np.errstate(all="ignore"):
            scale = np.broadcast_to(np.where(c > 0, g / np.where(c > 0, c, 1), 0).astype(np.float64), shape)
        xs = np.shape(to_numpy(x))
        scale = _sum_to(np.asarray(scale), (1,) * (len(shape) - len(xs)) + xs if xs else (1,)).reshape(xs)
        info = _finfo(_dtype_name(got))
        tol = ulps * _ulp_one(_dtype_name(got)) * 2 * scale + 2 * info.smallest_subnormal
        with np.errstate(all="ignore"):
            inv = np.maximum(*(np.broadcast_to(np.where(cc > 0, 1 / np.where(cc > 0, cc, 1), 0), shape) for cc in (c1, c2)))
        out_of_range = np.asarray(np.abs(inv) >= float(info.max) / 4, dtype=np.int64)
        in_range = _sum_to(out_of_range, (1,) * (len(shape) - len(xs)) + xs if xs else (1,)).reshape(xs) == 0
        nonfinite = ~(np.isfinite(a1) & np.isfinite(a2)).all(axis=d, keepdims=True)
        poisoned = _sum_to(np.broadcast_to(nonfinite, shape).astype(np.int64), (1,) * (len(shape) - len(xs)) + xs if xs else (1,)).reshape(xs) > 0
        finite = np.isfinite(ref) & in_range & ~(poisoned & np.isnan(got_np))
        # NaN where the reference is NaN; elsewhere NaN only in a row that holds
        # a NaN or inf (G6: a non-finite row poisons its own gradient, no other).
        assert not np.any(np.isnan(ref) & in_range & ~np.isnan(got_np)), f"grad of {name}: NaN missing"
        assert not np.any(np.isnan(got_np) & ~np.isnan(ref) & in_range & ~poisoned), (
            f"grad of {name}: NaN outside the rows that hold NaN or inf"
        )
        bad = np.abs(got_np - ref) > tol
        bad &= finite
        assert not bad.any(), (
            f"grad of {name} differs from the reference at {np.argwhere(bad)[:3].tolist()}: "
            f"got {got_np[bad][:3]}, expected {ref[bad][:3]}"
        )


def available_backends(dtype: str | None = None) -> dict[str, Callable[[np.ndarray], Any]]:
    """Installed array libraries polycos supports here, as ``name -> from_numpy``.

    Asks the backend registry (:mod:`polycos._backends`); CuPy counts only with a usable GPU.
    With ``dtype`` (a name, e.g. ``"float16"``), only the libraries that have
    arrays of that dtype (array-api-strict has no ``float16`` nor ``bfloat16``).
    """
    from polycos import _backends

    out: dict[str, Callable[[np.ndarray], Any]] = {}
    for name in _backends.installed():
        backend = _backends.get(name)
        if backend.usable() and (dtype is None or _holds(backend, dtype)):
            out[name] = lambda a, b=backend: b.from_numpy(np.asarray(a))
    return out


_HOLDS: dict[tuple[str, str], bool] = {}


def _holds(backend: Any, dtype: str) -> bool:
    """Whether the backend's library has arrays of ``dtype`` (by name); asked once per pair."""
    key = (backend.name, dtype)
    if key not in _HOLDS:
        holds = dtype in backend.dtypes
        if holds:  # the backends' dtype lists are polycos' own; the library may still lack one
            try:
                backend.from_numpy(np.zeros(1, np.float32), dtype)
            except (AttributeError, TypeError):  # no such dtype there (array_api_strict.float16)
                holds = False
        _HOLDS[key] = holds
    return _HOLDS[key]


def _promoted(*names: str) -> str:
    """NumPy's promotion of floating dtype names (bfloat16 included): what polycos returns."""
    if len(set(names)) == 1:
        return names[0]
    return _dtype_name(np.result_type(*(_np_dtype(n) for n in names)))


def _np_dtype(name: str) -> np.dtype:
    if name == "bfloat16":
        import ml_dtypes

        return np.dtype(ml_dtypes.bfloat16)
    return np.dtype(name)


def assert_backends_agree(
    x1: np.ndarray,
    x2: np.ndarray,
    dim: int = 1,
    eps: float = 1e-8,
    *,
    backends: Sequence[str] | None = None,
    ulps: float = 1.0,
) -> None:
    """Run ``polycos.cosine_similarity`` on every installed backend and check them all.

    Each backend must return its own array type and the promoted dtype of the
    inputs it was given, and match the exact reference to ``ulps`` × ulp(1.0);
    so all backends agree with each other to twice that. The same holds for
    :func:`polycos.cosine_similarity_vjp`. Size-0 results agree trivially;
    their shapes and dtypes are still checked.

    ``backends`` (default: every one :func:`available_backends` lists) names
    the libraries; by default those without arrays of the inputs' dtypes are
    left out (array-api-strict for ``float16`` and ``bfloat16``), named
    explicitly they are a ``ValueError``, as is a name not available here.
    """
    import polycos
    from polycos import _backends

    found = available_backends()
    floating = [_dtype_name(x) for x in (x1, x2) if _dtype_name(x) in _MANTISSA]
    dtypes = list(dict.fromkeys(floating))  # (integer and bool inputs are promoted: any library has them)
    if backends is None:
        names = [n for n in found if all(_holds(_backends.get(n), dt) for dt in dtypes)]
    else:
        names = list(backends)
        known = [e.name for e in _backends.ENTRIES]
        for name in names:
            if name not in known:
                raise ValueError(f"no backend called {name!r}; known: {', '.join(known)}")
            if name not in found:
                raise ValueError(
                    f"backend {name!r} is not available here (available: {', '.join(found)})"
                )
            lacking = [dt for dt in dtypes if not _holds(_backends.get(name), dt)]
            if lacking:
                raise ValueError(f"backend {name!r} has no {' nor '.join(lacking)} arrays")
    ref_shape = reference(x1, x2, dim, eps).shape
    grad_dtype = _np_dtype(_promoted(*floating)) if len(floating) == 2 else np.dtype(np.float64)
    # num=size, not max(1, size): an empty result gets an empty cotangent
    grad = np.linspace(-1.0, 1.0, num=int(np.prod(ref_shape))).reshape(ref_shape).astype(grad_dtype)
    for name in names:
        convert = found[name]
        a1, a2 = convert(x1), convert(x2)
        s = polycos.cosine_similarity(a1, a2, dim, eps)
        assert type(s).__module__.split(".")[0] == type(a1).__module__.split(".")[0], (
            f"{name}: result is {type(s).__name__}, not the input's array type"
        )
        # Floating inputs: the promoted dtype of the arrays the library holds (JAX without x64
        # holds float64 as float32). Integer inputs become each library's own default float.
        want = _promoted(_dtype_name(a1), _dtype_name(a2)) if len(floating) == 2 else None
        _assert_dtype(name, "result", s, want)
        assert_matches_reference(s, x1, x2, dim, eps, ulps=ulps)
        g = polycos.cosine_similarity_vjp(convert(grad), a1, a2, dim, eps)
        _assert_dtype(name, "grad of x1", g[0], want)
        _assert_dtype(name, "grad of x2", g[1], want)
        assert_vjp_matches_reference(g, grad, x1, x2, dim, eps)


def _assert_dtype(backend: str, what: str, x: Any, want: str | None) -> None:
    got = _dtype_name(x)
    assert want is None or got == want, f"{backend}: {what} has dtype {got}, expected {want}"


# --------------------------------------------------------------------------- strategies


@dataclass(frozen=True)
class CosineCase:
    """One drawn call: ``cosine_similarity(x1, x2, dim, eps)``; ``kind`` names the hard case."""

    x1: Any
    x2: Any
    dim: int
    eps: float
    kind: str


#: The hard cases :func:`cosine_inputs` mixes in.
KINDS = ("random", "zero_rows", "scaled", "parallel", "orthogonal", "nonfinite")


def cosine_inputs(
    xp: Any = np,
    *,
    dtypes: Sequence[str] = ("float32", "float64"),
    kinds: Sequence[str] = KINDS,
    min_dims: int = 0,
    max_dims: int = 3,
    min_side: int = 0,
    max_side: int = 6,
    eps: Any = None,
    scales: tuple[float, float] | None = None,
) -> Any:
    """Hypothesis strategy of :class:`CosineCase` for the array namespace ``xp``.

    Parameters
    ----------
    xp : namespace
        ``numpy``, ``torch``, ``jax.numpy``, ``cupy``, ``dask.array``,
        ``array_api_strict`` (arrays are drawn with ``hypothesis.extra.array_api``
        on NumPy and converted).
    dtypes : sequence of str
        Floating dtypes to draw from (``"float16"``, ``"bfloat16"``, ``"float32"``, ``"float64"``).
    kinds : sequence of str
        Hard cases to mix in (see :data:`KINDS`): rows zeroed, rows scaled by
        tiny/huge powers of two, nearly parallel or nearly orthogonal pairs,
        rows holding NaN or inf.
    min_dims, max_dims, min_side, max_side : int
        Bounds of the two mutually broadcastable shapes (0-d and size-0 allowed by default).
    eps : strategy of float, optional
        Default: ``1e-8``, ``0``, or a value near the drawn norms.
    scales : (float, float), optional
        Range of the row scale factors for ``"scaled"``; default: the widest
        range safe for the dtype's exponent range.
    """
    from hypothesis import strategies as st
    from hypothesis.extra.array_api import make_strategies_namespace

    for what, given, accepted in (("dtypes", dtypes, DTYPES), ("kinds", kinds, KINDS)):
        if isinstance(given, str) or not given:
            raise ValueError(f"{what} must be a non-empty sequence of names from {', '.join(accepted)}; "
                             f"got {given!r}")
        bad = [v for v in given if v not in accepted]
        if bad:
            raise ValueError(f"unknown {what} {', '.join(map(repr, bad))}; choose from {', '.join(accepted)}")
    xps = make_strategies_namespace(np)

    @st.composite
    def draw_case(draw: Any) -> CosineCase:
        dtype = draw(st.sampled_from(list(dtypes)))
        shapes = draw(
            xps.mutually_broadcastable_shapes(
                2, min_dims=min_dims, max_dims=max_dims, min_side=min_side, max_side=max_side
            )
        )
        bshape = shapes.result_shape
        nd = max(len(bshape), 1)
        dim = draw(st.integers(-nd, nd - 1))
        store = "float64" if dtype == "float64" else "float32"  # float16 is not array-API
        elements = st.floats(-8, 8, width=16 if dtype == "float16" else 32, allow_subnormal=False)
        x1 = draw(xps.arrays(np.dtype(store), shapes.input_shapes[0], elements=elements)).astype(np.float64)
        x2 = draw(xps.arrays(np.dtype(store), shapes.input_shapes[1], elements=elements)).astype(np.float64)
        kind = draw(st.sampled_from(list(kinds)))
        x1, x2 = _apply_kind(draw, kind, x1, x2, dim % nd, len(bshape), dtype, scales)
        e = draw(eps) if eps is not None else draw(st.sampled_from([1e-8, 0.0, 0.5]))
        x1 = _round_to(x1, dtype)
        x2 = _round_to(x2, dtype)
        # the backend's conversion for NumPy too: it knows bfloat16 (ml_dtypes), astype does not
        return CosineCase(from_numpy(xp, x1, dtype), from_numpy(xp, x2, dtype), dim, e, kind)

    return draw_case()


def _round_to(a: np.ndarray, dtype: str) -> np.ndarray:
    if dtype == "bfloat16":  # round-to-nearest-even to 8 significant bits, kept as float32
        b = np.asarray(a, dtype=np.float32).view(np.uint32)
        b = ((b + 0x7FFF + ((b >> 16) & 1)) & 0xFFFF0000).astype(np.uint32)
        return b.view(np.float32).astype(np.float64)
    with np.errstate(over="ignore"):
        return np.asarray(a, dtype=dtype).astype(np.float64)


def _row_mask(draw: Any, x: np.ndarray, dim: int, nd: int) -> np.ndarray:
    """A boolean mask over ``x``'s rows (size 1 along the reduced axis)."""
    from hypothesis import strategies as st

    k = dim - (nd - x.ndim)
    shape = tuple(1 if i == k else d for i, d in enumerate(x.shape))
    n = int(np.prod(shape))
    bits = draw(st.lists(st.booleans(), min_size=n, max_size=n))
    return np.array(bits, dtype=bool).reshape(shape)


def _apply_kind(
    draw: Any, kind: str, x1: np.ndarray, x2: np.ndarray, dim: int, nd: int, dtype: str,
    scales: tuple[float, float] | None,
) -> tuple[np.ndarray, np.ndarray]:
    from hypothesis import strategies as st

    if kind == "zero_rows":
        return np.where(_row_mask(draw, x1, dim, nd), 0.0, x1), x2
    if kind == "scaled":
        info = {"float16": (-14, 12), "bfloat16": (-120, 120), "float32": (-120, 120), "float64": (-1000, 1000)}[dtype]
        lo, hi = (np.log2(scales[0]), np.log2(scales[1])) if scales else info
        e1 = draw(st.integers(int(lo), int(hi)))
        e2 = draw(st.integers(int(lo), int(hi)))
        return np.ldexp(x1, e1), np.ldexp(x2, e2)
    if kind == "parallel" and np.broadcast_shapes(x1.shape, x2.shape) == x2.shape:
        c = draw(st.sampled_from([1.0, -1.0, 3.0, 1e-3]))
        noise = draw(st.sampled_from([0.0, 1e-6, 1e-3]))
        return x1, np.broadcast_to(x1, x2.shape) * c + noise * x2
    if kind == "orthogonal" and x1.shape == x2.shape:
        with np.errstate(all="ignore"):
            n = np.sum(x1 * x1, axis=dim, keepdims=True)
            proj = np.where(n > 0, np.sum(x1 * x2, axis=dim, keepdims=True) / np.where(n > 0, n, 1), 0)
        return x1, x2 - proj * x1
    if kind == "nonfinite" and x1.size:
        bad = draw(st.sampled_from([np.nan, np.inf, -np.inf]))
        mask = _row_mask(draw, x1, dim, nd)
        first = np.zeros(x1.shape, dtype=bool)
        k = dim - (nd - x1.ndim)
        if 0 <= k < x1.ndim and x1.shape[k] > 0:
            idx = [slice(None)] * x1.ndim
            idx[k] = slice(0, 1)
            first[tuple(idx)] = True
        elif not 0 <= k < x1.ndim:
            first[...] = True
        return np.where(mask & first, bad, x1), x2
    return x1, x2
