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
  are *compensated* (:func:`accurate_dot`, Ogita-Rump-Oishi Dot2) and, above
  ``eps``, ``s`` is formed from the sums and their remainders with the
  roundings of its own product, square root and quotient recovered
  (:func:`_precise_quotient`), so it is rounded once. Otherwise, above
  ``eps`` the denominator is ``sqrt(w11 * w22)``: one rounding instead of
  three, and ``s(x, x) == 1`` exactly.
* **Range (G3).** When the accumulation dtype cannot hold the squares of every
  finite input (bfloat16 in float32, float64 in float64, float32 without
  float64), rows whose sum of squares overflowed or fell below the normal
  range are recomputed from ``x / max|x|``, the way LAPACK's ``nrm2`` scales.
  With concrete arrays (``eager=True``) that second pass runs only if such a
  row exists; traced arrays whose backend supplies a ``branch`` (JAX:
  ``lax.cond``) compile it but run it only then; other traced and lazy arrays
  always take the scaled path for those dtypes. Only the offending rows take
  the rescaled values. The VJP is
  written as ``(g/c1) * (x2/c2 - [n1 > eps] s x1/c1)``: the normalised vectors
  are bounded, so no intermediate overflows unless ``g/c`` does (norms below
  about ``1/finfo.max``, where the gradient's own scale is not representable).
  On concrete arrays the multiplied-out form ``a x2 - b x1`` (half the
  arithmetic) is used when every ``a``, ``b`` is a normal number of the work
  dtype.
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
#: ``branch(pred, then_fn, else_fn)``: value-dependent control flow that a tracer
#: can compile (e.g. ``jax.lax.cond``); ``pred`` is a 0-d boolean array.
Branch = Callable[[Array, Callable[[], Any], Callable[[], Any]], Any]
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
    factor = _split_factor(a.dtype)
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
    branch: Branch | None = None,
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

    def rescued(parts: tuple) -> tuple[Array, ...]:
        # Only the offending rows take the scaled values: the others keep
        # exactly the bits they have without a bad row beside them (G6).
        bad = _out_of_range(xp, parts[1], x1, axis) | _out_of_range(xp, parts[2], x2, axis)
        return tuple(xp.where(bad, s, u) for s, u in zip(scaled(), parts, strict=True))

    if not rescale:
        parts = unscaled()
    elif eager:
        parts = unscaled()
        if bool(xp.any(_suspect(xp, parts[1]) | _suspect(xp, parts[2]))):
            parts = rescued(parts)
    elif branch is not None:
        # Traced: the common case is one pass; the rescue is compiled but runs
        # only when a sum of squares left the safe range (e.g. lax.cond).
        parts = unscaled()
        suspect = xp.any(_suspect(xp, parts[1]) | _suspect(xp, parts[2]))
        # Both branches must give arrays of one shape: the broadcast keepdims shape.
        shape = tuple(xp.broadcast_arrays(*parts[:3])[0].shape)

        def full(ps: tuple) -> tuple[Array, ...]:
            return tuple(xp.broadcast_to(p, shape) for p in ps)

        parts = branch(suspect, lambda p=parts: full(rescued(p)), lambda p=parts: full(p))
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
        # Below eps: first-order correction by the remainders lo of the sums,
        # (w12 + l12) / (den * (1 + l11 / (2 w11) + l22 / (2 w22))).
        zero = xp.zeros_like(s)
        rel = xp.where(above1, _safe_divide(xp, l11, 2 * w11), zero) + xp.where(
            above2, _safe_divide(xp, l22, 2 * w22), zero
        )
        rough = s + (_safe_divide(xp, l12, den) - s * rel)
        s = xp.where(above1 & above2, _precise_quotient(xp, w12, w11, w22, l12, l11, l22), rough)
    s = _clamp_unit(xp, s)
    return Residuals(s, n1s * m1, n2s * m2)


def _precise_quotient(
    xp: Any, w12: Array, w11: Array, w22: Array, l12: Array, l11: Array, l22: Array
) -> Array:
    r"""``(w12 + l12) / sqrt((w11 + l11) (w22 + l22))`` to about twice the working precision.

    Where nothing wider than the input exists, the plain ``w12 / sqrt(w11 * w22)``
    rounds three times (product, root, quotient): up to about 1.25 ulp(1.0)
    together, measured 1.0 ulp on parallel float32 rows. Here each rounding
    is recovered exactly (Dekker's TwoProduct) and folded into one
    first-order correction, so ``s`` is rounded once, at the end:

    .. math::

        r = \sqrt{p},\; p + p_e = w_{11} w_{22},\qquad
        \delta r = \frac{(p - r^2) + p_e + w_{11} l_{22} + w_{22} l_{11}}{2 r},\qquad
        s = q + \frac{(w_{12} - q r) + l_{12} - q\,\delta r}{r},\; q = w_{12} / r.

    Only for rows whose norms are both above eps, whose sums are in the safe
    range (so ``p`` is normal and ``r > 0``). NaN propagates.
    """
    factor = _split_factor(w11.dtype)
    p, pe = _two_product(xp, w11, w22, factor)
    r = xp.sqrt(p)
    r = xp.where(r > 0, r, xp.ones_like(r))  # not taken (both norms above eps): avoid 0/0
    rr, rre = _two_product(xp, r, r, factor)
    dr = (((p - rr) - rre) + pe + (w11 * l22 + w22 * l11)) / (2 * r)
    q = w12 / r
    qr, qre = _two_product(xp, q, r, factor)
    return q + (((w12 - qr) - qre) + l12 - q * dr) / r


def _split_factor(dtype: Any) -> float:
    """Dekker's splitting constant ``2**ceil(p/2) + 1`` for float32 / float64."""
    return 134217729.0 if _dtype_name(dtype) == "float64" else 4097.0


def _two_product(xp: Any, a: Array, b: Array, factor: float) -> tuple[Array, Array]:
    """``(p, e)`` with ``p = fl(a * b)`` and ``p + e == a * b`` exactly (no FMA needed)."""
    p = a * b
    ah, al = _split(a, factor)
    bh, bl = _split(b, factor)
    return p, ((ah * bh - p) + ah * bl + al * bh) + al * bl


def _suspect(xp: Any, w: Array) -> Array:
    """Sums of squares outside the safe range (overflowed, or too small to be accurate).

    Keeps ``w11 * w22`` normal and finite, and every square's rounding error
    (relative to ``w``) far below eps: ``sqrt(tiny) / eps <= w <= sqrt(max) / 4``.
    NaN is suspect too: a compensated split may overflow on huge finite input.
    """
    info = xp.finfo(w.dtype)
    lo = float(info.smallest_normal) ** 0.5 / float(info.eps)
    hi = float(info.max) ** 0.5 / 4
    return ~((w >= lo) & (w <= hi))


def _out_of_range(xp: Any, w: Array, a: Array, axis: int) -> Array:
    """Rows whose sum of squares is :func:`_suspect` and that are not all zero.

    An all-zero row is fine as it is; telling the two apart costs a ``max|a|``
    pass, which callers take only when a suspect exists.
    """
    suspect = _suspect(xp, w)
    if a.shape[axis] == 0:
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
    branch: Branch | None = None,
) -> tuple[Array, Residuals]:
    """Cosine similarity of validated inputs along a non-negative ``axis``.

    ``x1`` and ``x2`` share one real floating dtype and broadcast against each
    other; ``axis`` indexes their broadcast shape, which must have at least one
    dimension. Returns the result in the input dtype (the broadcast shape
    without ``axis``) and the :class:`Residuals` the VJP needs. ``eager=True``
    promises concrete arrays (values may be inspected); ``native_dots``
    replaces :func:`dots` on the accumulation-dtype inputs; for traced arrays,
    ``branch`` (e.g. ``jax.lax.cond``) lets the range rescue run only when a
    row needs it instead of always.
    """
    x1, x2 = _align(xp, x1, x2, axis)
    res = _stats(xp, x1, x2, axis, eps, eager, native_dots, branch)
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
    """Per-row scalars of the VJP: ``g1 = u1 * (x2 / c2 - t1 * x1 / c1)`` (and 1 <-> 2)."""

    u1: Array  #: g / c1
    u2: Array  #: g / c2
    c1: Array  #: max(n1, eps) as a divisor (1 where it is 0: then x1 is a zero vector)
    c2: Array  #: max(n2, eps) as a divisor
    t1: Array  #: [n1 > eps] s
    t2: Array  #: [n2 > eps] s
    a1: Array  #: g / (c1 c2), for the multiplied-out form g1 = a1 x2 - b1 x1
    b1: Array  #: [n1 > eps] g s / (n1 c1)
    a2: Array  #: g / (c1 c2)
    b2: Array  #: [n2 > eps] g s / (n2 c2)
    #: True when every multiplied-out coefficient is a normal number of the work
    #: dtype (or NaN): then that form loses nothing. Only computed for concrete
    #: arrays (``eager=True``); ``False`` otherwise.
    fused_ok: bool = False


def grad_coefficients(
    xp: Any, g: Array, residuals: Residuals, axis: int, eps: float, work: Any, *, eager: bool = False
) -> GradCoefficients:
    """The VJP's per-row scalars, computed in the accumulation dtype, returned in ``work``."""
    s, n1, n2 = residuals
    ga = _expand_to(xp, xp.expand_dims(xp.astype(g, s.dtype, copy=False), axis=axis), s.ndim)
    one, zero = xp.ones_like(n1), xp.zeros_like(s)
    c1, c2 = xp.maximum(n1, eps), xp.maximum(n2, eps)
    c1 = xp.where(c1 == 0, one, c1)  # eps = 0 and a zero vector: x / c stays 0
    c2 = xp.where(c2 == 0, xp.ones_like(n2), c2)
    t1 = xp.where(n1 > eps, s, zero)
    t2 = xp.where(n2 > eps, s, zero)
    u1 = xp.where(n1 > 0, ga / c1, xp.zeros_like(ga)) if eps == 0 else ga / c1
    u2 = xp.where(n2 > 0, ga / c2, xp.zeros_like(ga)) if eps == 0 else ga / c2
    numerators = (u1, u1 * t1, u2, u2 * t2)
    fused = tuple(n / c for n, c in zip(numerators, (c2, c1, c1, c2), strict=True))
    coefs = tuple(xp.astype(t, work, copy=False) for t in (u1, u2, c1, c2, t1, t2, *fused))
    ok = False
    if eager:  # checked after rounding to the work dtype, where the products happen
        lo, hi = float(xp.finfo(work).smallest_normal), float(xp.finfo(work).max)
        ok = all(
            bool(xp.all(((xp.abs(f) >= lo) & (xp.abs(f) <= hi)) | (n == 0) | xp.isnan(f)))
            for f, n in zip(coefs[6:], numerators, strict=True)
        )
    return GradCoefficients(*coefs, fused_ok=ok)


def grad_elementwise(
    xp: Any, x1: Array, x2: Array, k: GradCoefficients, out: tuple[Array, Array] | None = None
) -> tuple[Array, Array]:
    """The VJP's elementwise pass: ``g1 = u1 (x2/c2 - t1 x1/c1)``, ``g2 = u2 (x1/c1 - t2 x2/c2)``.

    Inputs are in the work dtype with broadcast-compatible shapes. The
    normalised vectors ``x/c`` and the bracket are bounded by 2 in magnitude, so
    nothing overflows or underflows unless ``u = g/c`` itself does (G3). With
    ``out`` (mutable arrays of the broadcast shape) the result is written in
    place there, and when ``k.fused_ok`` in the multiplied-out form
    ``g1 = a1 x2 - b1 x1`` (the same expression; two products per element).
    """
    if out is None or not k.fused_ok:
        h1, h2 = x1 / k.c1, x2 / k.c2
        g1, g2 = k.u1 * (h2 - k.t1 * h1), k.u2 * (h1 - k.t2 * h2)
        if out is None:
            return g1, g2
        out[0][...] = g1
        out[1][...] = g2
        return out
    g1, g2 = out
    g1[...] = k.a1 * x2
    g1 -= k.b1 * x1
    g2[...] = k.a2 * x1
    g2 -= k.b2 * x2
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
    branch: Branch | None = None,
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
        _, residuals = forward(
            xp, x1, x2, axis, eps, eager=eager, native_dots=native_dots, branch=branch
        )
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


# =========================================================================== forward mode
# Added for the PyTorch adapter (issue 3): ``CosineSimilarityFunction.jvp``.
# Changes no function above; expresses the JVP through the VJP's own pieces.


def jvp(
    xp: Any,
    t1: Array | None,
    t2: Array | None,
    x1: Array,
    x2: Array,
    axis: int,
    eps: float,
    residuals: Residuals | None = None,
    *,
    eager: bool = False,
    native_dots: Dots | None = None,
) -> Array:
    r"""Jacobian-vector product: the derivative of :func:`forward`'s result along ``(t1, t2)``.

    Each output element depends only on its own pair of vectors, so the
    Jacobian is block diagonal and its blocks are the VJP at :math:`g = 1`
    before broadcast inputs are summed back (the VJP transposed):

    .. math::

        \dot s = \sum_{\text{axis}} \Big(\frac{\partial s}{\partial x_1} \odot t_1
                 + \frac{\partial s}{\partial x_2} \odot t_2\Big), \qquad
        \frac{\partial s}{\partial x_1}
          = \frac{1}{c_1}\Big(\frac{x_2}{c_2} - [n_1 > \varepsilon]\,\frac{s}{n_1}\,x_1\Big),

    evaluated by :func:`grad_coefficients` and :func:`grad_elementwise`.
    ``t1``, ``t2`` have the shapes of ``x1``, ``x2`` (``None``: a zero
    tangent). Returns the tangent of the result, in ``x1``'s dtype.
    """
    if residuals is None:
        _, residuals = forward(xp, x1, x2, axis, eps, eager=eager, native_dots=native_dots)
    work = work_dtype(xp, x1.dtype)
    ones = xp.ones_like(xp.squeeze(residuals.s, axis=axis))
    k = grad_coefficients(xp, ones, residuals, axis, eps, work)
    x1a, x2a = _align(xp, x1, x2, axis)
    d1, d2 = grad_elementwise(
        xp, xp.astype(x1a, work, copy=False), xp.astype(x2a, work, copy=False), k
    )
    total = xp.zeros_like(xp.squeeze(k.u1, axis=axis))
    for d, t in ((d1, t1), (d2, t2)):
        if t is not None:
            t = xp.astype(_expand_to(xp, t, d.ndim), work, copy=False)
            total = total + xp.sum(d * t, axis=axis)
    return xp.astype(total, x1.dtype, copy=False)


# =========================================================================== pairwise
# Added for pairwise similarity (issue 6). Changes no function above; reuses
# the accumulation dtype, rescaling and compensated sums of the row-wise core.


class RowNorms(NamedTuple):
    r"""Rows normalised once, for the pairwise matrix and its VJP (accumulation dtype).

    For a row :math:`x` with scale :math:`m` (``max|x|`` where rescaling is
    needed, else 1) and :math:`b = x / m`: ``ns`` :math:`= \lVert b\rVert`,
    ``cs`` :math:`= \max(\lVert b\rVert, \varepsilon / m)` and ``xhat``
    :math:`= b / c_s = x / \max(\lVert x\rVert, \varepsilon)` (0 where
    :math:`c_s = 0`).
    """

    xhat: Array  #: ``x / max(||x||, eps)``, shape ``(..., N, D)``
    cs: Array  #: ``max(||x||, eps) / m``, keepdims ``(..., N, 1)``
    above: Array  #: ``||x|| > eps`` (bool), keepdims
    m: Array | None  #: row scale, keepdims; ``None`` when no rescaling was needed


def normalize_rows(xp: Any, x: Array, eps: float) -> RowNorms:
    """``x / max(||x||, eps)`` along the last axis, accurate and range-safe.

    The norm runs in the accumulation dtype (:func:`accumulation_dtype`); where
    that cannot hold every square (:func:`needs_rescaling`) rows are first
    divided by ``max|x|``; where nothing wider than the input exists the sum of
    squares is compensated (:func:`accurate_dot`). Zero rows with ``eps = 0``
    give ``xhat = 0``; NaN or inf in a row gives NaN in that row of ``xhat``.
    No branching on values (works traced and lazy).
    """
    acc = accumulation_dtype(xp, x.dtype, x)
    axis = x.ndim - 1
    a = xp.astype(x, acc, copy=False)
    m = None
    if needs_rescaling(xp, x.dtype, acc):
        a, m = _scale(xp, a, axis)
    if _dtype_name(acc) == _dtype_name(x.dtype):  # nothing wider: compensated sum
        hi, lo = accurate_dot(xp, a, a, axis)
        root = xp.sqrt(hi)
        ns = root + _safe_divide(xp, lo, 2 * root)  # sqrt(hi + lo) to first order
        ns = xp.expand_dims(ns, axis=axis)
    else:
        ns = xp.expand_dims(xp.sqrt(xp.vecdot(a, a, axis=-1)), axis=axis)
    e = eps if m is None else eps / m
    cs = xp.maximum(ns, e) if m is not None else xp.maximum(ns, xp.full_like(ns, eps))
    # cs == 0 only for an all-zero row (eps = 0): dividing it by 1 gives 0.
    xhat = a / xp.where(cs == 0, xp.ones_like(cs), cs)
    return RowNorms(xhat, cs, ns > e, m)


def _align_last(xp: Any, x1: Array, x2: Array) -> tuple[Array, Array]:
    """Equal length along the last (reduced) axis: a length-1 row is broadcast."""
    axis1, axis2 = x1.ndim - 1, x2.ndim - 1
    if x1.shape[-1] == 1 and x2.shape[-1] != 1:
        x1 = _full_along(xp, x1, axis1, x2.shape[-1])
    elif x2.shape[-1] == 1 and x1.shape[-1] != 1:
        x2 = _full_along(xp, x2, axis2, x1.shape[-1])
    return x1, x2


Product = Callable[[Array, Array, Any], Array]


def pairwise_product(xp: Any, h1: Array, h2: Array | None, dtype: Any) -> Array:
    """``clip(h1 @ h2^T, -1, 1)`` in ``h1``'s dtype, returned in ``dtype`` (NaN kept).

    ``h2 = None`` means ``h2 = h1`` (libraries may then use a symmetric
    product). Casting before clamping is the same as after (rounding is
    monotone and +-1 are representable) and clamps the narrower array.
    """
    h2 = h1 if h2 is None else h2
    s = xp.astype(xp.matmul(h1, xp.matrix_transpose(h2)), dtype, copy=False)
    return _clamp_unit(xp, s)


def pairwise_forward(
    xp: Any,
    x1: Array,
    x2: Array | None,
    eps: float,
    *,
    native_product: Product | None = None,
) -> tuple[Array, tuple[RowNorms, RowNorms | None]]:
    r"""Cosine similarity of every row of ``x1`` with every row of ``x2``.

    ``x1`` is ``(..., N, D)``, ``x2`` is ``(..., M, D)`` (``D`` equal or 1;
    leading dimensions broadcast) or ``None`` for ``x2 = x1``; one real
    floating dtype. Returns ``S`` of shape ``(..., N, M)`` in that dtype and
    the residuals the VJP needs:

    .. math::

        \hat x = \frac{x}{\max(\lVert x\rVert, \varepsilon)}, \qquad
        S = \operatorname{clip}(\hat X_1 \hat X_2^{\mathsf T}, -1, 1),

    which is the definition, entry by entry. The rows are normalised once
    (:func:`normalize_rows`) and ``S`` is **one matrix product** in the
    accumulation dtype (float64 for float32 inputs, so the result is within
    ``ulp(1.0)`` of exact: the product's rounding is far below float32's ulp,
    then one rounding to float32), ``O(N M + (N + M) D)`` memory, never
    ``N M D``. For float64 inputs the product runs in float64 and its rounding
    is the error (measured at most 5.5 ulp(1.0) for ``D`` up to 65536; see
    docs/pairwise.md).
    ``native_product(h1, h2_or_None, dtype)`` may replace :func:`pairwise_product`.
    """
    if x2 is not None:
        x1, x2 = _align_last(xp, x1, x2)
    r1 = normalize_rows(xp, x1, eps)
    r2 = None if x2 is None else normalize_rows(xp, x2, eps)
    h2 = None if r2 is None else r2.xhat
    product = native_product or (lambda a, b, dt: pairwise_product(xp, a, b, dt))
    return product(r1.xhat, h2, x1.dtype), (r1, r2)


def row_normalize_vjp(xp: Any, r: RowNorms, v: Array) -> Array:
    r"""VJP of :math:`x \mapsto \hat x = x / \max(\lVert x\rVert, \varepsilon)` for cotangent ``v``.

    Above ``eps`` the Jacobian is :math:`(I - \hat x \hat x^{\mathsf T}) / \lVert x\rVert`
    (symmetric); at or below it :math:`c = \varepsilon` is constant and the
    Jacobian is :math:`I / \varepsilon`. Hence

    .. math::

        \bar x = \frac{v - [n > \varepsilon]\,(\hat x \cdot v)\,\hat x}{c}.

    With :math:`v_i = \sum_j g_{ij} \hat x_{2j}`, :math:`\hat x_{1i}\cdot v_i =
    \sum_j g_{ij} S_{ij}`, so :math:`\bar x_{1i} = \sum_j \frac{g_{ij}}{c_{1i}}
    \big(\hat x_{2j} - [n_{1i} > \varepsilon] S_{ij} \hat x_{1i}\big)`: the
    row-wise VJP summed over the broadcast partner, as it must be. ``v`` may be
    in any dtype; the result is in the accumulation dtype. Multiplying by
    ``1 / c`` (0 for a zero row with ``eps = 0``) lets NaN in ``v`` through.
    """
    h = r.xhat
    va = xp.astype(v, h.dtype, copy=False)
    proj = xp.expand_dims(xp.vecdot(h, va, axis=-1), axis=h.ndim - 1)
    inv = _safe_divide(xp, xp.ones_like(r.cs), r.cs)
    if r.m is not None:  # cs is in units of m: 1 / c = (1 / cs) / m
        inv = _safe_divide(xp, inv, r.m)
    # (v - [n > eps] (h.v) h) / c, with the per-row factors formed on (..., N, 1)
    coef = xp.where(r.above, proj * inv, xp.zeros_like(proj))
    return va * inv - coef * h


MatMul = Callable[[Array, Array], Array]


def pairwise_vjp(
    xp: Any,
    g: Array,
    x1: Array,
    x2: Array | None,
    eps: float,
    residuals: tuple[RowNorms, RowNorms | None] | None = None,
    *,
    native_matmul: MatMul | None = None,
) -> tuple[Array, Array | None]:
    r"""Gradients of ``sum(g * S)`` for ``S = pairwise_forward(x1, x2)``, by matrix products.

    .. math::

        \bar{\hat X}_1 = G \hat X_2, \qquad \bar{\hat X}_2 = G^{\mathsf T} \hat X_1
        \quad(\text{self-similarity: } (G + G^{\mathsf T}) \hat X),

    summed over broadcast leading dimensions, then :func:`row_normalize_vjp`.
    The products run in the work dtype (:func:`work_dtype`), the
    normalisation's VJP in the accumulation dtype. ``g`` has ``S``'s shape.
    Returns ``(dx1, dx2)`` with the shapes and dtype of the inputs
    (``dx2 = None`` when ``x2`` is ``None``). Memory ``O(N M + (N + M) D)``.
    """
    shape1 = tuple(x1.shape)
    shape2 = None if x2 is None else tuple(x2.shape)
    if residuals is None:
        _, residuals = pairwise_forward(xp, x1, x2, eps, native_product=_no_product)
    r1, r2 = residuals
    work = work_dtype(xp, x1.dtype)
    matmul = native_matmul or xp.matmul
    if 0 in tuple(g.shape):  # no pairs at all: no terms, zero gradients (even for NaN rows)
        return xp.zeros_like(x1), None if x2 is None else xp.zeros_like(x2)
    gw = xp.astype(g, work, copy=False)
    h1 = xp.astype(r1.xhat, work, copy=False)
    if r2 is None:
        # Two products rather than (G + G^T) h1: adding a transposed N x M matrix
        # is cache-hostile and costs about as much as a product.
        v = matmul(gw, h1) + matmul(xp.matrix_transpose(gw), h1)
        v = sum_to_shape(xp, v, tuple(h1.shape))
        d1 = row_normalize_vjp(xp, r1, v)
        return xp.astype(sum_to_shape(xp, d1, shape1), x1.dtype, copy=False), None
    h2 = xp.astype(r2.xhat, work, copy=False)
    v1 = sum_to_shape(xp, matmul(gw, h2), tuple(h1.shape))
    v2 = sum_to_shape(xp, matmul(xp.matrix_transpose(gw), h1), tuple(h2.shape))
    d1 = row_normalize_vjp(xp, r1, v1)
    d2 = row_normalize_vjp(xp, r2, v2)
    return (
        xp.astype(sum_to_shape(xp, d1, shape1), x1.dtype, copy=False),
        xp.astype(sum_to_shape(xp, d2, shape2), x2.dtype, copy=False),  # type: ignore[union-attr, arg-type]
    )


def _no_product(h1: Array, h2: Array | None, dtype: Any) -> None:
    """Residuals only: the VJP does not need ``S``."""
    return None


def pairwise_jvp(
    xp: Any, t1: Array | None, t2: Array | None, x1: Array, x2: Array | None, eps: float
) -> Array:
    r"""Jacobian-vector product of :func:`pairwise_forward` along tangents ``(t1, t2)``.

    The Jacobian of the row normalisation :math:`x \mapsto \hat x` is symmetric
    (see :func:`row_normalize_vjp`), so the tangent of :math:`\hat x` is that
    same function applied to the tangent, and

    .. math::

        \dot S = \dot{\hat X}_1 \hat X_2^{\mathsf T} + \hat X_1 \dot{\hat X}_2^{\mathsf T}
        \quad(\text{self-similarity: } \dot{\hat X} \hat X^{\mathsf T}
        + \hat X \dot{\hat X}^{\mathsf T}).

    ``t1``, ``t2`` have the shapes of ``x1``, ``x2`` (``None``: a zero tangent;
    ``t2`` is ignored when ``x2`` is ``None``). Returns ``S``'s tangent in ``x1``'s dtype.
    """
    if x2 is not None:
        x1, x2 = _align_last(xp, x1, x2)
    r1 = normalize_rows(xp, x1, eps)
    r2 = r1 if x2 is None else normalize_rows(xp, x2, eps)
    h1, h2 = r1.xhat, r2.xhat

    def tangent(r: RowNorms, t: Array | None, like: Array) -> Array:
        if t is None:
            return xp.zeros_like(r.xhat)
        t = xp.broadcast_to(xp.astype(t, r.xhat.dtype, copy=False), tuple(like.shape))
        return row_normalize_vjp(xp, r, t)

    d1 = tangent(r1, t1, x1)
    d2 = d1 if x2 is None else tangent(r2, t2, x2)
    out = xp.matmul(d1, xp.matrix_transpose(h2)) + xp.matmul(h1, xp.matrix_transpose(d2))
    return xp.astype(out, x1.dtype, copy=False)
