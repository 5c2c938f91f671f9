r"""The formulas: cosine similarity and its exact VJP, written once.

Every backend runs these functions; none restates the math. They are written
against the Python array API standard: the namespace ``xp`` is passed in, so the
same code runs on NumPy, array-api-strict, dask, ``torch`` and ``jax.numpy``
(inside ``jax.jit`` and ``torch.compile`` too: nothing branches on array values
unless the caller says the arrays are concrete, ``eager=True``).

Definition (identical to ``torch.nn.functional.cosine_similarity``)
--------------------------------------------------------------------
For vectors :math:`x_1, x_2` along ``axis`` (after broadcasting)

.. math::

    n_i = \lVert x_i \rVert_2, \qquad c_i = \max(n_i, \varepsilon), \qquad
    s = \operatorname{clip}\Big(\frac{\langle x_1, x_2\rangle}{c_1 c_2}, -1, 1\Big),

with :math:`s = 0` when :math:`c_1 c_2 = 0` (``eps = 0`` and a zero vector).

Gradient (vector-Jacobian product for an upstream gradient :math:`g`)
---------------------------------------------------------------------

.. math::

    \frac{\partial L}{\partial x_1}
      = \frac{g}{c_1}\Big(\frac{x_2}{c_2} - [n_1 > \varepsilon]\, \frac{s}{n_1}\, x_1\Big),

and symmetrically for :math:`x_2`. For :math:`n_1 > \varepsilon` this is
:math:`g\,(x_2/(c_1 c_2) - s\,x_1/n_1^2)`; for :math:`n_1 \le \varepsilon`,
:math:`c_1 = \varepsilon` is constant and the function is linear in
:math:`x_1`, so the second term vanishes. It is the true derivative in every
regime (PyTorch's autograd is not, below ``eps``). Gradients of broadcast
inputs are summed back to the input's shape.

Numerics
--------
* **Accuracy (G2).** The three reductions :math:`\langle x_1,x_2\rangle,
  \lVert x_1\rVert^2, \lVert x_2\rVert^2` run in a wider *accumulation dtype*:
  float32 for float16/bfloat16 and float64 for float32, where products are
  exact and rounding of the sums is far below the input's ulp. Where nothing
  wider exists (float64; float32 without float64, e.g. JAX without x64) they
  are *compensated* (:func:`accurate_dot`, Ogita-Rump-Oishi Dot2) and ``s``
  gets a first-order correction from their remainders. Above ``eps`` the
  denominator is ``sqrt(w11 * w22)``: one rounding instead of three, and
  ``s(x, x) == 1`` exactly.
* **Range (G3).** When the accumulation dtype cannot hold the squares of every
  finite input (bfloat16 in float32, float64 in float64, float32 without
  float64), rows whose sum of squares overflowed or fell below the normal
  range are recomputed from ``x / max|x|``, the way LAPACK's ``nrm2`` scales.
  With concrete arrays (``eager=True``) that second pass runs only if such a
  row exists; traced and lazy arrays always take the scaled path for those
  dtypes; only the offending rows take the rescaled values. The VJP is
  written as ``(g/c1) * (x2/c2 - (s/n1) x1)`` so that no intermediate
  overflows where the result does not; on concrete arrays the multiplied-out
  form ``a x2 - b x1`` (one multiply fewer) is used when every ``a``, ``b`` is
  a normal number of the work dtype.
* **Bounds (G1, G4, G6).** ``s`` is clamped with comparisons that keep NaN;
  ``0/0`` is replaced by ``0`` only where the denominator is exactly zero, so
  NaN and inf inputs still give NaN in their own output element.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, NamedTuple

__all__ = [
    "Residuals",
    "accumulation_dtype",
    "forward",
    "sum_to_shape",
    "vjp",
]

Array = Any


class Residuals(NamedTuple):
    """What the VJP needs from the forward pass (accumulation dtype, ``keepdims`` shape)."""

    s: Array  #: clamped similarity
    n1: Array  #: ``||x1||`` along the axis (unclamped)
    n2: Array  #: ``||x2||`` along the axis (unclamped)


def _has_float64(xp: Any, like: Array) -> bool:
    try:
        info = xp.__array_namespace_info__()
        return "float64" in info.dtypes(kind="real floating")
    except Exception:
        return hasattr(xp, "float64")


def _dtype_name(dtype: Any) -> str:
    """``"float32"`` for a NumPy/JAX dtype or scalar type, a torch or array-api-strict dtype."""
    for attr in ("name", "__name__"):
        name = getattr(dtype, attr, None)
        if isinstance(name, str):
            return name
    return str(dtype).rsplit(".", 1)[-1]


def accumulation_dtype(xp: Any, dtype: Any, like: Array | None = None) -> Any:
    """The dtype the reductions run in: at least float32, float64 for float32 when available."""
    name = _dtype_name(dtype)
    if name in ("float16", "bfloat16"):
        return xp.float32
    if name == "float32":
        return xp.float64 if _has_float64(xp, like) else xp.float32
    return dtype


def needs_rescaling(xp: Any, dtype: Any, acc: Any) -> bool:
    """Whether squares of finite ``dtype`` values can overflow/underflow in ``acc``."""
    name, acc_name = _dtype_name(dtype), _dtype_name(acc)
    return not (name == "float16" or (name == "float32" and acc_name == "float64"))


def _expand_to(xp: Any, x: Array, ndim: int) -> Array:
    """Prepend unit dimensions so ``x`` has ``ndim`` dimensions (a view)."""
    if x.ndim == ndim:
        return x
    return xp.reshape(x, (1,) * (ndim - x.ndim) + tuple(x.shape))


def _full_along(xp: Any, x: Array, axis: int, size: Any) -> Array:
    """Broadcast ``x`` along the reduced axis only (``vecdot`` needs equal lengths there)."""
    if x.shape[axis] == size:
        return x
    shape = list(x.shape)
    shape[axis] = size
    return xp.broadcast_to(x, tuple(shape))


def _safe_divide(xp: Any, num: Array, den: Array) -> Array:
    """``num / den`` with ``0`` where ``den == 0`` (NaN still propagates)."""
    zero = den == 0
    return xp.where(zero, xp.zeros_like(num), num / xp.where(zero, xp.ones_like(den), den))


def _clamp_unit(xp: Any, s: Array) -> Array:
    """Clamp to [-1, 1] keeping NaN (comparisons with NaN are false)."""
    one = xp.ones_like(s)
    s = xp.where(s > one, one, s)
    return xp.where(s < -one, -one, s)


def _keepdims_shape(shape: tuple, axis: int) -> tuple:
    return tuple(1 if i == axis else d for i, d in enumerate(shape))


def _scale(xp: Any, a: Array, axis: int) -> tuple[Array, Array]:
    """``(a / m, m)`` with ``m = max|a|`` along ``axis``; ``m = 1`` for zero or non-finite rows."""
    if a.shape[axis] == 0:
        return a, xp.ones(_keepdims_shape(a.shape, axis), dtype=a.dtype)
    m = xp.max(xp.abs(a), axis=axis, keepdims=True)
    ok = (m > 0) & (m < float("inf"))
    m = xp.where(ok, m, xp.ones_like(m))
    return a / m, m


Dots = Callable[[Array, Array, int, bool], "tuple[Array, ...]"]
Elementwise = Callable[[Array, Array, "GradCoefficients"], "tuple[Array, Array]"]


def dots(
    xp: Any, a1: Array, a2: Array, axis: int, *, compensated: bool = False
) -> tuple[Array, Array, Array]:
    """The three reductions ``(<a1,a2>, <a1,a1>, <a2,a2>)`` along ``axis``, keepdims.

    This is the only pass over the inputs in the forward; backends may replace
    it with a faster native evaluation of the same three sums (``native_dots``).
    ``compensated=True`` evaluates them in about twice the working precision
    and also returns their remainders: ``(w12, w11, w22, l12, l11, l22)`` (see
    :func:`accurate_dot`); used when no wider accumulation dtype exists.
    """
    if compensated:
        pairs = [accurate_dot(xp, u, v, axis) for u, v in ((a1, a2), (a1, a1), (a2, a2))]
        return tuple(xp.expand_dims(w, axis=axis) for w in (*(h for h, _ in pairs), *(lo for _, lo in pairs)))
    neg = axis - a1.ndim  # vecdot takes a negative axis
    w12 = xp.vecdot(a1, a2, axis=neg)
    w11 = xp.vecdot(a1, a1, axis=neg)
    w22 = xp.vecdot(a2, a2, axis=neg)
    return tuple(xp.expand_dims(w, axis=axis) for w in (w12, w11, w22))  # type: ignore[return-value]


def _split(x: Array, factor: float) -> tuple[Array, Array]:
    """Dekker's split ``x = hi + lo`` with ``hi`` holding the upper half of the significand."""
    c = x * factor
    hi = c - (c - x)
    return hi, x - hi


def accurate_dot(xp: Any, a: Array, b: Array, axis: int) -> tuple[Array, Array]:
    r"""``<a, b>`` along ``axis`` in about twice the working precision, as ``hi + lo``.

    Ogita, Rump and Oishi's *Dot2* ("Accurate sum and dot product", SIAM J.
    Sci. Comput. 26, 2005), vectorised: every product is split exactly into
    :math:`p + e` (Dekker's TwoProduct, no FMA needed), and the products are
    summed by a pairwise tree of Knuth's error-free TwoSum whose rounding
    errors are collected and added back. The result is as accurate as if
    computed in twice the precision: ``hi`` is that value rounded and ``lo``
    the (approximate) remainder, both without keepdims. Needs ``|a|, |b|`` well
    below ``sqrt(max)`` (true after rescaling). No value-dependent branching.
    """
    name = _dtype_name(a.dtype)
    factor = 134217729.0 if name == "float64" else 4097.0  # 2**ceil(p/2) + 1
    a, b = xp.broadcast_arrays(a, b)
    p = xp.moveaxis(a * b, axis, -1)
    ah, al = _split(xp.moveaxis(a, axis, -1), factor)
    bh, bl = _split(xp.moveaxis(b, axis, -1), factor)
    err = xp.sum(((ah * bh - p) + ah * bl + al * bh) + al * bl, axis=-1)
    while p.shape[-1] > 1:
        if p.shape[-1] % 2:
            pad = xp.zeros((*p.shape[:-1], 1), dtype=p.dtype)
            p = xp.concat([p, pad], axis=-1)
        u, v = p[..., 0::2], p[..., 1::2]
        s = u + v
        vv = s - u
        err = err + xp.sum((u - (s - vv)) + (v - vv), axis=-1)
        p = s
    p = xp.sum(p, axis=-1)  # the one remaining term (0 for an empty axis)
    hi = p + err
    return hi, err - (hi - p)  # Fast2Sum: |err| <= |p| up to rounding


def _stats(
    xp: Any,
    x1: Array,
    x2: Array,
    axis: int,
    eps: float,
    eager: bool,
    native_dots: Dots | None,
) -> Residuals:
    """``(s, n1, n2)``, keepdims, in the accumulation dtype."""
    acc = accumulation_dtype(xp, x1.dtype, x1)
    rescale = needs_rescaling(xp, x1.dtype, acc)
    compensated = _dtype_name(acc) == _dtype_name(x1.dtype)  # nothing wider to accumulate in

    def upcast(x: Array) -> Array:
        return xp.astype(x, acc, copy=False)

    def split(ws: tuple) -> tuple[Array, ...]:
        """``(w12, w11, w22, l12, l11, l22)``: sums and their remainders (0 if exact enough)."""
        if len(ws) == 6:
            return ws
        zero = xp.zeros((1,) * x1.ndim, dtype=acc)
        return (*ws, zero, zero, zero)

    def unscaled() -> tuple[Array, ...]:
        if native_dots is not None:
            ws = native_dots(x1, x2, axis, compensated)
        else:
            ws = dots(xp, upcast(x1), upcast(x2), axis, compensated=compensated)
        one = xp.ones((1,) * x1.ndim, dtype=acc)
        return (*split(ws), one, one)

    def scaled() -> tuple[Array, ...]:
        b1, m1 = _scale(xp, upcast(x1), axis)
        b2, m2 = _scale(xp, upcast(x2), axis)
        return (*split(dots(xp, b1, b2, axis, compensated=compensated)), m1, m2)

    if not rescale:
        parts = unscaled()
    elif eager:
        parts = unscaled()
        bad1, bad2 = _out_of_range(xp, parts[1], x1, axis), _out_of_range(xp, parts[2], x2, axis)
        if bool(xp.any(bad1)) or bool(xp.any(bad2)):
            # Only the offending rows take the scaled values: the others keep
            # exactly the bits they have without a bad row beside them (G6).
            bad = bad1 | bad2
            parts = tuple(xp.where(bad, s, u) for s, u in zip(scaled(), parts, strict=True))
    else:
        parts = scaled()
    w12, w11, w22, l12, l11, l22, m1, m2 = parts

    n1s, n2s = xp.sqrt(w11), xp.sqrt(w22)
    # max(n, eps) in scaled units: max(n_s * m, eps) / m == max(n_s, eps / m)
    e1, e2 = eps / m1, eps / m2
    above1, above2 = n1s > e1, n2s > e2
    # Above eps, sqrt(w11 * w22) rounds once where n1 * n2 rounds three times, and
    # gives s(x, x) == 1 exactly (sqrt(fl(w * w)) == w). In range by construction.
    den = xp.where(
        above1 & above2, xp.sqrt(w11 * w22), xp.maximum(n1s, e1) * xp.maximum(n2s, e2)
    )
    s = _safe_divide(xp, w12, den)
    if compensated:
        # First-order correction by the remainders lo of the compensated sums:
        # (w12 + l12) / (den * (1 + l11 / (2 w11) + l22 / (2 w22))).
        zero = xp.zeros_like(s)
        rel = xp.where(above1, _safe_divide(xp, l11, 2 * w11), zero) + xp.where(
            above2, _safe_divide(xp, l22, 2 * w22), zero
        )
        s = s + (_safe_divide(xp, l12, den) - s * rel)
    s = _clamp_unit(xp, s)
    return Residuals(s, n1s * m1, n2s * m2)


def _out_of_range(xp: Any, w: Array, a: Array, axis: int) -> Array:
    """Rows whose sum of squares overflowed, or is so small its terms lost precision.

    Out-of-range sums are only suspects: an all-zero row is fine as it is.
    Telling the two apart costs a ``max|a|`` pass, taken only when a suspect exists.
    """
    info = xp.finfo(w.dtype)
    # Keep w11 * w22 normal and finite, and every square's rounding error
    # (relative to w) far below eps: sqrt(tiny) / eps <= w <= sqrt(max) / 4.
    lo = float(info.smallest_normal) ** 0.5 / float(info.eps)
    hi = float(info.max) ** 0.5 / 4
    suspect = ~((w >= lo) & (w <= hi))  # NaN too: a split may overflow on huge finite input
    if a.shape[axis] == 0 or not bool(xp.any(suspect)):
        return xp.zeros_like(suspect)
    return suspect & (xp.max(xp.abs(a), axis=axis, keepdims=True) > 0)


def forward(
    xp: Any,
    x1: Array,
    x2: Array,
    axis: int,
    eps: float,
    *,
    eager: bool = False,
    native_dots: Dots | None = None,
) -> tuple[Array, Residuals]:
    """Cosine similarity of validated inputs along a non-negative ``axis``.

    ``x1`` and ``x2`` share one real floating dtype and broadcast against each
    other; ``axis`` indexes their broadcast shape, which must have at least one
    dimension. Returns the result in the input dtype (the broadcast shape
    without ``axis``) and the :class:`Residuals` the VJP needs. ``eager=True``
    promises concrete arrays (values may be inspected); ``native_dots``
    replaces :func:`dots` on the accumulation-dtype inputs.
    """
    x1, x2 = _align(xp, x1, x2, axis)
    res = _stats(xp, x1, x2, axis, eps, eager, native_dots)
    out = xp.astype(xp.squeeze(res.s, axis=axis), x1.dtype, copy=False)
    return out, res


def _align(xp: Any, x1: Array, x2: Array, axis: int) -> tuple[Array, Array]:
    """Same rank, same length along ``axis`` (views; other axes stay broadcastable)."""
    ndim = max(x1.ndim, x2.ndim)
    x1, x2 = _expand_to(xp, x1, ndim), _expand_to(xp, x2, ndim)
    size = x2.shape[axis] if x1.shape[axis] == 1 else x1.shape[axis]
    return _full_along(xp, x1, axis, size), _full_along(xp, x2, axis, size)


def work_dtype(xp: Any, dtype: Any) -> Any:
    """Elementwise gradient arithmetic: half precision is widened to float32."""
    return xp.float32 if _dtype_name(dtype) in ("float16", "bfloat16") else dtype


def sum_to_shape(xp: Any, x: Array, shape: tuple) -> Array:
    """Sum ``x`` over the axes along which an input of ``shape`` was broadcast."""
    shape = tuple(shape)
    if tuple(x.shape) == shape:
        return x
    lead = x.ndim - len(shape)
    axes = tuple(range(lead)) + tuple(
        lead + i for i, d in enumerate(shape) if d == 1 and x.shape[lead + i] != 1
    )
    if axes:
        x = xp.sum(x, axis=axes, keepdims=True)
    return xp.reshape(x, shape)


class GradCoefficients(NamedTuple):
    """Per-row scalars of the VJP, ``g1 = u1 * (p2 * x2 - q1 * x1)`` (and 1 <-> 2)."""

    u1: Array  #: g / c1
    u2: Array  #: g / c2
    p1: Array  #: 1 / c1  (0 for a zero vector with eps = 0)
    p2: Array  #: 1 / c2
    q1: Array  #: [n1 > eps] s / n1
    q2: Array  #: [n2 > eps] s / n2
    a1: Array  #: u1 * p2 = g / (c1 c2), for the fused form g1 = a1 x2 - b1 x1
    b1: Array  #: u1 * q1
    a2: Array  #: u2 * p1
    b2: Array  #: u2 * q2
    #: True when every fused coefficient is a normal number of the work dtype
    #: (or the row is NaN anyway): then the fused form loses nothing. Only
    #: computed for concrete arrays (``eager=True``); ``False`` otherwise.
    fused_ok: bool = False


def grad_coefficients(
    xp: Any, g: Array, residuals: Residuals, axis: int, eps: float, work: Any, *, eager: bool = False
) -> GradCoefficients:
    """The VJP's per-row scalars, computed in the accumulation dtype, returned in ``work``."""
    s, n1, n2 = residuals
    ga = _expand_to(xp, xp.expand_dims(xp.astype(g, s.dtype, copy=False), axis=axis), s.ndim)
    c1, c2 = xp.maximum(n1, eps), xp.maximum(n2, eps)
    one = xp.ones_like(c1)
    p1, p2 = _safe_divide(xp, one, c1), _safe_divide(xp, one, c2)
    zero = xp.zeros_like(s)
    q1 = xp.where(n1 > eps, _safe_divide(xp, s, n1), zero)
    q2 = xp.where(n2 > eps, _safe_divide(xp, s, n2), zero)
    u1, u2 = ga * p1, ga * p2
    fused = (u1 * p2, u1 * q1, u2 * p1, u2 * q2)
    ok = False
    if eager:
        info = xp.finfo(work)
        lo, hi = float(info.smallest_normal), float(info.max)
        ok = all(
            bool(xp.all(((xp.abs(f) >= lo) & (xp.abs(f) <= hi)) | (f == 0) | xp.isnan(f)))
            for f in fused
        )
    coefs = (u1, u2, p1, p2, q1, q2, *fused)
    return GradCoefficients(*(xp.astype(t, work, copy=False) for t in coefs), fused_ok=ok)


def grad_elementwise(
    xp: Any, x1: Array, x2: Array, k: GradCoefficients, out: tuple[Array, Array] | None = None
) -> tuple[Array, Array]:
    """The VJP's one elementwise pass: ``g1 = u1 (p2 x2 - q1 x1)``, ``g2 = u2 (p1 x1 - q2 x2)``.

    Inputs are in the work dtype with broadcast-compatible shapes. The factored
    form never overflows or underflows where the result does not (G3). With
    ``out`` (mutable arrays of the broadcast shape) the result is written in
    place there, and when ``k.fused_ok`` in the cheaper fused form
    ``g1 = a1 x2 - b1 x1`` (the same expression, multiplied out).
    """
    if out is None:
        return k.u1 * (k.p2 * x2 - k.q1 * x1), k.u2 * (k.p1 * x1 - k.q2 * x2)
    g1, g2 = out
    if k.fused_ok:
        g1[...] = k.a1 * x2
        g1 -= k.b1 * x1
        g2[...] = k.a2 * x1
        g2 -= k.b2 * x2
        return g1, g2
    g1[...] = k.p2 * x2
    g1 -= k.q1 * x1
    g1 *= k.u1
    g2[...] = k.p1 * x1
    g2 -= k.q2 * x2
    g2 *= k.u2
    return g1, g2


def vjp(
    xp: Any,
    g: Array,
    x1: Array,
    x2: Array,
    axis: int,
    eps: float,
    residuals: Residuals | None = None,
    *,
    eager: bool = False,
    native_dots: Dots | None = None,
    native_elementwise: Elementwise | None = None,
) -> tuple[Array, Array]:
    """Gradients of ``sum(g * cosine_similarity(x1, x2))`` w.r.t. ``x1`` and ``x2``.

    ``g`` has the forward result's shape. The gradients have the shapes and
    dtype of ``x1`` and ``x2``. ``residuals`` from :func:`forward` are
    recomputed when not given. ``native_elementwise(x1, x2, coefs)`` may
    replace the generic elementwise pass; it receives the aligned inputs and
    must return gradients that :func:`sum_to_shape` takes to the inputs' shapes.
    """
    shape1, shape2 = tuple(x1.shape), tuple(x2.shape)
    if residuals is None:
        _, residuals = forward(xp, x1, x2, axis, eps, eager=eager, native_dots=native_dots)
    work = work_dtype(xp, x1.dtype)
    k = grad_coefficients(xp, g, residuals, axis, eps, work, eager=eager)
    x1a, x2a = _align(xp, x1, x2, axis)
    if native_elementwise is not None:
        g1, g2 = native_elementwise(x1a, x2a, k)
    else:
        g1, g2 = grad_elementwise(
            xp, xp.astype(x1a, work, copy=False), xp.astype(x2a, work, copy=False), k
        )
    g1 = xp.astype(sum_to_shape(xp, g1, shape1), x1.dtype, copy=False)
    g2 = xp.astype(sum_to_shape(xp, g2, shape2), x2.dtype, copy=False)
    return g1, g2
