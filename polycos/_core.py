r"""The formulas: cosine similarity, its exact VJP and JVP, and the pairwise matrix, written once.

Every backend runs these functions or a listed mirror of them (see *Mirrors*
below). They are written against the Python array API standard: the namespace
``xp`` is passed in, so the same code runs on NumPy, array-api-strict, dask,
``torch`` and ``jax.numpy``, traced (``jax.jit``, ``torch.compile``) or lazy:
nothing branches on array values unless the caller says the arrays are
concrete (``eager=True``).

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
      = \frac{g}{c_1}\Big(\frac{x_2}{c_2} - [n_1 > \varepsilon]\, s\,\frac{x_1}{c_1}\Big),

and symmetrically for :math:`x_2`. For :math:`n_1 > \varepsilon` this is
:math:`g\,(x_2/(c_1 c_2) - s\,x_1/n_1^2)`; for :math:`n_1 \le \varepsilon`,
:math:`c_1 = \varepsilon` is constant and the function is linear in
:math:`x_1`, so the second term vanishes. It is the true derivative in every
regime (PyTorch's autograd is not, below ``eps``); with ``eps = 0`` the
gradient at a zero vector is 0. Gradients of broadcast inputs are summed back
to the input's shape.

The computation, row by row (what every mirror reproduces)
----------------------------------------------------------
``T`` is the storage dtype, ``A`` the accumulation dtype
(:func:`accumulation_dtype`): float32 for float16/bfloat16, float64 for
float32 (float32 where no float64 exists, e.g. JAX without x64), float64 for
float64. Two flags follow from the pair: **compensated**
(:func:`is_compensated`: nothing wider than ``T``) and **rescaled**
(:func:`is_rescaled`: squares of finite ``T`` values can leave ``A``'s range).

1. **Sums** :math:`w_{12} = \langle a_1, a_2\rangle, w_{11}, w_{22}` in ``A``
   (:func:`dots`). Products of ``T`` values are exact in a wider ``A``, so the
   sums are accurate far below ``T``'s ulp (G2). Compensated: Ogita-Rump-Oishi
   *Dot2* (:func:`accurate_dot`), which also returns each sum's remainder ``l``.
2. **Range** (G3, rescaled dtypes only): a row whose sum of squares left the
   safe range (:func:`_suspect`) and is not all zero is recomputed from
   :math:`b = a / m`, :math:`m = \max|a|` (the way LAPACK's ``nrm2`` scales);
   other rows keep :math:`m = 1`.
3. **Finish** (:func:`finish`): :math:`n_{is} = \sqrt{w_{ii}}` (norms in units of
   :math:`m_i`), :math:`e_i = \varepsilon / m_i`; where both norms exceed
   ``eps``, :math:`s = w_{12} / \sqrt{w_{11} w_{22}}` (one rounding, and
   :math:`s(x, x) = 1` exactly) or, compensated, the quotient with its three
   roundings recovered (:func:`_precise_quotient`); then clamped keeping NaN.
   The **residuals** are :math:`(s, n_{1s}, n_{2s}, m_1, m_2)`: scaled norms and
   scales, never :math:`n = n_s m`, which can overflow while the gradient is
   representable.
4. **Gradient** (:func:`grad_coefficients`, :func:`grad_elementwise`), in ``A``:
   :math:`c_i = \max(n_{is}, e_i)`, :math:`r_i = 1/c_i`,
   :math:`t_i = [n_{is} > e_i]\,s`, :math:`u_i = g\,r_i` (0 where
   :math:`c_i = 0`), :math:`h_i = (a_i / m_i)\,r_i`, and
   :math:`\bar x_1 = u_1 \big((h_2 - t_1 h_1) / m_1\big)`, :math:`\bar x_2 = u_2 \big((h_1 - t_2 h_2) / m_2\big)`,
   rounded to ``T`` once. :math:`|h_i| \le 1`, and the bracket (at most 2)
   is divided by the scale (at least the smallest normal number) before
   :math:`u_i` multiplies it, so nothing overflows or underflows unless the
   gradient itself does (not :math:`g / c` alone: parallel rows of tiny norm
   have a zero gradient). Where :math:`g\,r_i` itself overflows with a finite
   :math:`g` (rescaled dtypes: :math:`g` near the top of the range, a row of
   small norm), :math:`u_i = (g\,2^{-k})\,r_i` and the product is multiplied
   by :math:`p_i = 2^k` last (:data:`_GRAD_SHIFT`; :math:`p_i = 1` elsewhere).

NaN and inf: the clamp and the maximum keep NaN, ``0/0`` becomes ``0`` only
where a denominator is exactly zero, so a NaN or inf in a row gives NaN in that
row's output element and gradient only (G6).

Mirrors (places that restate this module; each is tested against it)
--------------------------------------------------------------------
* ``polycos/_kernels/rows.h``: steps 1-4 for one row (``row_scale``,
  ``finish``, ``grad_coefficients``, ``grad_element``, the pairwise row
  normalisation) and the rescue's thresholds (``Lim``),
  compiled into ``polycos/_kernels/cpu.cpp`` (NumPy, dask chunks, torch CPU,
  JAX CPU through ``jax.ffi``) and ``polycos/_kernels/cuda.cu`` (CuPy, torch
  CUDA). The sums are the same sums evaluated in another order; :func:`finish`
  and :func:`grad_elementwise` are reproduced bit for bit
  (``tests/test_kernels_cpu.py``, ``tests/test_cupy_kernels.py``).
  ``quotient_above`` restates :func:`finish`'s ``s`` for rows with both norms
  above eps, for a CPU forward that keeps no residuals (bitwise the full
  finish: ``test_dense_short_rows_have_the_general_loops_bits``).
* ``polycos/_kernels/cpu.cpp``, NumPy's lean pairwise path: ``polycos_normalize_pair``
  (:func:`normalize_rows` for two inputs at once, bitwise the kernel's row
  normalisation) and ``polycos_normalize_vjp`` (:func:`row_normalize_vjp`, the
  projection summed in the accumulation dtype; against the core and an exact
  reference in ``tests/test_kernels_cpu.py``), and ``polycos_clamp_round`` /
  ``polycos_clamp_round_rows`` (:func:`pairwise_product`'s clamp and rounding
  to float32 in one pass, on each float64 block of the product, NumPy and the
  torch ``pairwise_forward`` operator; bitwise, ``tests/test_kernels_cpu.py``,
  ``tests/test_torch.py``).
* ``polycos/_backends/torch.py``: the ``pairwise_backward`` operator for 2-D
  tensors (:func:`pairwise_vjp` with ``polycos_normalize_vjp``, against the
  core) and its fallback in torch ops ``_row_normalize_vjp``
  (:func:`row_normalize_vjp` bit for bit); ``_PAIRWISE_DTYPES`` (the dtype
  rules of :func:`product_dtype`, :func:`accumulation_dtype`,
  :func:`is_rescaled`) (``tests/test_torch.py``).
* ``polycos/_kernels/cuda_launch.py``: the accumulation dtypes per storage dtype for
  the CUDA launches (``tests/test_cupy_kernels.py``).
* ``polycos/_backends/jax.py``: :func:`dots` as one XLA variadic reduce (and
  its compensated variant) for JAX arrays without the CPU kernel
  (``tests/test_backends_specific.py``).
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable
from typing import Any, NamedTuple

__all__ = [
    "GradCoefficients",
    "Residuals",
    "RowNorms",
    "accumulation_dtype",
    "finish",
    "forward",
    "grad_coefficients",
    "grad_elementwise",
    "is_compensated",
    "is_rescaled",
    "jvp",
    "normalize_rows",
    "pack_residuals",
    "pairwise_forward",
    "pairwise_jvp",
    "pairwise_vjp",
    "sum_to_shape",
    "unpack_residuals",
    "vjp",
]

Array = Any

#: ``dots(a1, a2, axis, compensated) -> (w12, w11, w22[, l12, l11, l22])``: a
#: faster evaluation of :func:`dots` on inputs already in the accumulation dtype.
Dots = Callable[[Array, Array, int, bool], "tuple[Array, ...]"]
#: ``scale(a, axis) -> (a / m, m)``: the range rescue's row scaling, ``m`` about
#: ``max|a|`` (:func:`_row_scale`); a backend whose division is not IEEE (XLA on
#: CPU multiplies by a flushed reciprocal) scales by powers of two. Called with
#: ``eps`` bound: ``scale_for(eps)`` where a factory is needed.
Scale = Callable[[Array, int], "tuple[Array, Array]"]
#: ``branch(pred, then_fn, else_fn)``: value-dependent control flow that a tracer
#: can compile (e.g. ``jax.lax.cond``); ``pred`` is a 0-d boolean array.
Branch = Callable[[Array, Callable[[], Any], Callable[[], Any]], Any]


class Residuals(NamedTuple):
    """What the VJP and JVP need from the forward pass (accumulation dtype, ``keepdims``)."""

    s: Array  #: clamped similarity
    n1s: Array  #: ``||x1 / m1||``
    n2s: Array  #: ``||x2 / m2||``
    m1: Array  #: row scale of ``x1`` (1 where the row was not rescaled)
    m2: Array  #: row scale of ``x2``


# =========================================================================== dtypes


# NumPy builds ``dtype.name`` anew on every access (~3 us). Keyed by type first: dtypes of
# different libraries may hash alike, and some warn when compared with another's.
_DTYPE_NAMES: dict[tuple[type, Any], str] = {}


def _dtype_name(dtype: Any) -> str:
    """``"float32"`` for a NumPy/JAX dtype or scalar type, a torch or array-api-strict dtype."""
    # Only NumPy's dtypes (NumPy, JAX, ml_dtypes) are cached: their names are the slow ones,
    # and torch.compile cannot trace a dict lookup keyed by other libraries' dtypes.
    cached = type(dtype).__module__.startswith("numpy")
    key = (type(dtype), dtype)
    if cached:
        try:
            return _DTYPE_NAMES[key]
        except (KeyError, TypeError):  # TypeError: an unhashable dtype-like
            pass
    for attr in ("name", "__name__"):
        name = getattr(dtype, attr, None)
        if isinstance(name, str):
            break
    else:
        name = str(dtype).rsplit(".", 1)[-1]
    if cached:
        with contextlib.suppress(TypeError):
            _DTYPE_NAMES[key] = name
    return name


_FLOAT64: dict[tuple[Any, Any], bool] = {}  # (namespace, device) -> float64 exists there


def _has_float64(xp: Any, like: Array) -> bool:
    """Whether float64 exists on ``like``'s device (not on JAX without x64, nor on some devices)."""
    device = None if like is None else _device(like)
    # Not cached for JAX (the answer follows ``jax_enable_x64``, also as a scoped context)
    # nor torch (torch.compile cannot trace a dict keyed by devices; it answers statically).
    name = getattr(xp, "__name__", "")
    cached = "jax" not in name and "torch" not in name
    if cached:
        try:
            return _FLOAT64[xp, device]
        except (KeyError, TypeError):
            pass
    try:
        info = xp.__array_namespace_info__()
        found = "float64" in info.dtypes(device=device, kind="real floating")
    except Exception:
        found = hasattr(xp, "float64")
    if cached:
        with contextlib.suppress(TypeError):
            _FLOAT64[xp, device] = found
    return found


def accumulation_dtype(xp: Any, dtype: Any, like: Array | None = None) -> Any:
    """The dtype the reductions and the gradient run in: float32 for half, float64 for float32 where it exists."""
    name = _dtype_name(dtype)
    if name in ("float16", "bfloat16"):
        return xp.float32
    if name == "float32":
        return xp.float64 if _has_float64(xp, like) else xp.float32
    return dtype


def _eps_for(xp: Any, acc: Any, eps: float) -> float:
    """``eps`` as the accumulation dtype holds it: at most its largest finite value.

    ``eps = 1e300`` is valid; in a float32 accumulation it would be ``inf``, and
    making it a constant would overflow (an error on torch, a warning on JAX).
    At most ``finfo.max`` it stays finite. The results are the same where no
    norm comes near ``finfo.max`` (float16 in float32, float32 in float64);
    bfloat16 inputs with such an ``eps`` are computed in float64 where it
    exists (:func:`polycos._validate._widen`), and without float64 the
    difference is a documented limit (docs/semantics.md). The kernels clamp
    the same way (``eps_for`` in ``cpu.cpp``).
    """
    top = float(xp.finfo(acc).max)
    return eps if eps < top else top


def is_compensated(dtype: Any, acc: Any) -> bool:
    """Nothing wider than ``dtype`` to accumulate in: the sums are compensated (Dot2)."""
    return _dtype_name(acc) == _dtype_name(dtype)


def is_rescaled(dtype: Any, acc: Any) -> bool:
    """Whether squares of finite ``dtype`` values can overflow or underflow in ``acc``."""
    name, acc_name = _dtype_name(dtype), _dtype_name(acc)
    return not (name == "float16" or (name == "float32" and acc_name == "float64"))


# =========================================================================== small helpers


def _expand_to(xp: Any, x: Array, ndim: int) -> Array:
    """Prepend unit dimensions so ``x`` has ``ndim`` dimensions (a view)."""
    if x.ndim == ndim:
        return x
    return xp.reshape(x, (1,) * (ndim - x.ndim) + tuple(x.shape))


def _full_along(xp: Any, x: Array, axis: int, size: Any) -> Array:
    """Broadcast ``x`` along the reduced axis only (``vecdot`` needs equal lengths there).

    An unknown (dask NaN) length is taken to equal an unknown ``size``, as the
    lazy library itself pairs such arrays chunk by chunk (it cannot broadcast them).
    """
    n = x.shape[axis]
    if n == size or (n != n and size != size):
        return x
    shape = list(x.shape)
    shape[axis] = size
    return xp.broadcast_to(x, tuple(shape))


def _align(xp: Any, x1: Array, x2: Array, axis: int) -> tuple[Array, Array]:
    """Same rank, same length along ``axis`` (views; other axes stay broadcastable)."""
    ndim = max(x1.ndim, x2.ndim)
    x1, x2 = _expand_to(xp, x1, ndim), _expand_to(xp, x2, ndim)
    size = x2.shape[axis] if x1.shape[axis] == 1 else x1.shape[axis]
    return _full_along(xp, x1, axis, size), _full_along(xp, x2, axis, size)


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


def _broadcast(x1: Array, x2: Array) -> tuple:
    """The broadcast shape of two arrays of equal rank (sizes compared, never hashed)."""
    return tuple(b if a == 1 else a for a, b in zip(x1.shape, x2.shape, strict=True))


def _same_shape(a: tuple, b: tuple) -> bool:
    """Equal shapes; an unknown (dask NaN) size equals an unknown size in the same place."""
    return len(a) == len(b) and all(x == y or (x != x and y != y) for x, y in zip(a, b, strict=True))


def _has_no_rows(shape: tuple) -> bool:
    """A known size 0 somewhere (unknown dask sizes are NaN or None: not known)."""
    return any(isinstance(d, int) and d == 0 for d in shape)




def _zeros(xp: Any, shape: tuple, dtype: Any, like: Array) -> Array:
    """Zeros of ``shape`` on ``like``'s device; an empty ``shape`` made from a 1-d empty array.

    (dask's automatic chunking divides by zero for some empty shapes, e.g. ``(0, 10**6)``.)
    """
    shape = tuple(shape)
    if _has_no_rows(shape):
        return xp.reshape(xp.zeros((0,), dtype=dtype, device=_device(like)), shape)
    return xp.zeros(shape, dtype=dtype, device=_device(like))


def _device(x: Array) -> Any:
    """``x.device`` (the standard's attribute), else array-api-compat's answer, else ``None``."""
    try:
        return x.device
    except Exception:  # e.g. a traced JAX array without a committed device
        pass
    import array_api_compat

    try:
        return array_api_compat.device(x)
    except Exception:
        return None


def _row_scale(xp: Any, a: Array, axis: int, eps: float) -> Array:
    """The rescue's row scale ``m`` along ``axis`` (keepdims), in ``a``'s dtype.

    ``m = max(max|a|, tiny, eps / hi)`` for rows whose ``max|a|`` is positive and
    finite, else 1 (``tiny`` the smallest normal number, ``hi`` the top of
    :func:`_suspect`'s range). The floor keeps ``1 / m`` and ``eps / m`` finite:
    a row of subnormal numbers far below ``eps`` still has ``c = eps``
    representable in units of ``m`` (``eps / m`` would overflow otherwise and
    the gradient would vanish).
    """
    if a.shape[axis] == 0:
        return xp.ones_like(xp.sum(a, axis=axis, keepdims=True))  # *_like: subclasses (DTensor) too
    m = xp.max(xp.abs(a), axis=axis, keepdims=True)
    ok = (m > 0) & (m < float("inf"))
    info = xp.finfo(a.dtype)
    eps = _eps_for(xp, a.dtype, eps)
    by_eps = xp.full_like(m, eps) / (float(info.max) ** 0.5 / 4)  # in a's dtype, as the kernels compute it
    floor = xp.maximum(by_eps, xp.full_like(m, float(info.smallest_normal)))
    return xp.where(ok, xp.maximum(m, floor), xp.ones_like(m))


def _divide_by_row_max(xp: Any, eps: float) -> Scale:
    """The default :data:`Scale`: ``(a / m, m)`` with ``m`` about ``max|a|`` (:func:`_row_scale`)."""

    def scale(a: Array, axis: int) -> tuple[Array, Array]:
        m = _row_scale(xp, a, axis, eps)
        return a / m, m

    return scale


def sum_to_shape(xp: Any, x: Array, shape: tuple) -> Array:
    """Sum ``x`` over the axes along which an input of ``shape`` was broadcast."""
    shape = tuple(shape)
    if _same_shape(tuple(x.shape), shape):
        return x
    if _has_no_rows(tuple(x.shape)):  # an empty sum: zeros, without a pass over the partner's shape
        return _zeros(xp, shape, x.dtype, x)
    lead = x.ndim - len(shape)
    axes = tuple(range(lead)) + tuple(
        lead + i for i, d in enumerate(shape) if d == 1 and x.shape[lead + i] != 1
    )
    if axes:
        x = xp.sum(x, axis=axes, keepdims=True)
    return xp.reshape(x, shape)


# =========================================================================== step 1: sums


def dots(
    xp: Any, a1: Array, a2: Array, axis: int, *, compensated: bool = False
) -> tuple[Array, ...]:
    """The three sums ``(<a1,a2>, <a1,a1>, <a2,a2>)`` along ``axis``, keepdims, in ``a1``'s dtype.

    ``compensated=True`` evaluates them in about twice the working precision
    and also returns their remainders: ``(w12, w11, w22, l12, l11, l22)`` (see
    :func:`accurate_dot`); otherwise the remainders are zero and not returned.
    """
    if compensated:
        pairs = [accurate_dot(xp, u, v, axis) for u, v in ((a1, a2), (a1, a1), (a2, a2))]
        parts = (*(h for h, _ in pairs), *(lo for _, lo in pairs))
        return tuple(xp.expand_dims(w, axis=axis) for w in parts)
    neg = axis - a1.ndim  # vecdot takes a negative axis
    sums = (xp.vecdot(a1, a2, axis=neg), xp.vecdot(a1, a1, axis=neg), xp.vecdot(a2, a2, axis=neg))
    return tuple(xp.expand_dims(w, axis=axis) for w in sums)


def _split_factor(dtype: Any) -> float:
    """Dekker's splitting constant ``2**ceil(p/2) + 1`` for float32 / float64."""
    return 134217729.0 if _dtype_name(dtype) == "float64" else 4097.0


def _split(x: Array, factor: float) -> tuple[Array, Array]:
    """Dekker's split ``x = hi + lo`` with ``hi`` holding the upper half of the significand."""
    c = x * factor
    hi = c - (c - x)
    return hi, x - hi


def _two_product(xp: Any, a: Array, b: Array, factor: float) -> tuple[Array, Array]:
    """``(p, e)`` with ``p = fl(a * b)`` and ``p + e == a * b`` exactly (no FMA needed)."""
    p = a * b
    ah, al = _split(a, factor)
    bh, bl = _split(b, factor)
    return p, ((ah * bh - p) + ah * bl + al * bh) + al * bl


def accurate_dot(xp: Any, a: Array, b: Array, axis: int) -> tuple[Array, Array]:
    r"""``<a, b>`` along ``axis`` in about twice the working precision, as ``(w, l)``.

    Ogita, Rump and Oishi's *Dot2* ("Accurate sum and dot product", SIAM J.
    Sci. Comput. 26, 2005), vectorised: every product is split exactly into
    :math:`p + e` (Dekker's TwoProduct), the products are summed by a pairwise
    tree of Knuth's error-free TwoSum, and the rounding errors are collected
    and added back. ``w`` is the sum rounded, ``l`` the remainder (without
    keepdims). Needs ``|a|, |b|`` well below ``sqrt(max)`` (true after
    rescaling). No value-dependent branching.
    """
    factor = _split_factor(a.dtype)
    a, b = xp.broadcast_arrays(a, b)
    p, e = _two_product(xp, xp.moveaxis(a, axis, -1), xp.moveaxis(b, axis, -1), factor)
    err = xp.sum(e, axis=-1)
    while p.shape[-1] > 1:
        if p.shape[-1] % 2:
            pad = xp.zeros_like(xp.sum(p, axis=-1, keepdims=True))  # *_like: keeps subclasses
            p = xp.concat([p, pad], axis=-1)
        # Pairs by reshape + unstack, not strided slicing: plain ops on every
        # backend (Python indexing needs a device guard on torch's fake devices).
        u, v = xp.unstack(xp.reshape(p, (*p.shape[:-1], p.shape[-1] // 2, 2)), axis=-1)
        s = u + v
        vv = s - u
        err = err + xp.sum((u - (s - vv)) + (v - vv), axis=-1)
        p = s
    p = xp.sum(p, axis=-1)  # the one remaining term (0 for an empty axis)
    w = p + err
    return w, err - (w - p)  # Fast2Sum: |err| <= |p| up to rounding


# =========================================================================== step 2: range


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
    """Rows whose sum of squares is :func:`_suspect` and that are not all zero."""
    suspect = _suspect(xp, w)
    if a.shape[axis] == 0:
        return xp.zeros_like(suspect)
    return suspect & (xp.max(xp.abs(a), axis=axis, keepdims=True) > 0)


def _row_sums(
    xp: Any,
    a1: Array,
    a2: Array,
    axis: int,
    *,
    rescaled: bool,
    compensated: bool,
    eager: bool,
    native_dots: Dots | None,
    branch: Branch | None,
    scale: Scale | None,
    eps: float,
) -> tuple[Array, ...]:
    """Steps 1 and 2: ``(w12, w11, w22, l12, l11, l22, m1, m2)`` in the accumulation dtype."""

    def sums(b1: Array, b2: Array) -> tuple[Array, ...]:
        ws = (native_dots or _generic_dots(xp))(b1, b2, axis, compensated)
        if len(ws) == 3:
            zero = xp.zeros_like(ws[0])  # helpers made *_like: same device, same tensor subclass
            ws = (*ws, zero, zero, zero)
        return tuple(ws)

    def unscaled() -> tuple[Array, ...]:
        ws = sums(a1, a2)
        one = xp.ones_like(ws[0])
        return (*ws, one, one)

    def scaled() -> tuple[Array, ...]:
        b1, m1 = (scale or _divide_by_row_max(xp, eps))(a1, axis)
        b2, m2 = (scale or _divide_by_row_max(xp, eps))(a2, axis)
        return (*sums(b1, b2), m1, m2)

    def rescued(parts: tuple) -> tuple[Array, ...]:
        # Only the offending rows take the scaled values: the others keep
        # exactly the bits they have without a bad row beside them (G6).
        bad = _out_of_range(xp, parts[1], a1, axis) | _out_of_range(xp, parts[2], a2, axis)
        return tuple(xp.where(bad, s, u) for s, u in zip(scaled(), parts, strict=True))

    if not rescaled:
        return unscaled()
    if eager:
        parts = unscaled()
        if bool(xp.any(_suspect(xp, parts[1]) | _suspect(xp, parts[2]))):
            parts = rescued(parts)
        return parts
    if branch is not None:
        # Traced: the common case is one pass; the rescue is compiled but runs
        # only when a sum of squares left the safe range (e.g. lax.cond).
        parts = unscaled()
        suspect = xp.any(_suspect(xp, parts[1]) | _suspect(xp, parts[2]))
        shape = tuple(xp.broadcast_arrays(*parts[:3])[0].shape)  # both branches: one shape

        def full(ps: tuple) -> tuple[Array, ...]:
            return tuple(xp.broadcast_to(p, shape) for p in ps)

        return branch(suspect, lambda p=parts: full(rescued(p)), lambda p=parts: full(p))
    return scaled()  # traced without a branch, or lazy: every row scaled


def _generic_dots(xp: Any) -> Dots:
    return lambda a1, a2, axis, compensated: dots(xp, a1, a2, axis, compensated=compensated)


# =========================================================================== step 3: finish


def finish(
    xp: Any,
    w12: Array,
    w11: Array,
    w22: Array,
    l12: Array,
    l11: Array,
    l22: Array,
    m1: Array,
    m2: Array,
    eps: float,
    *,
    compensated: bool,
) -> Residuals:
    """Step 3: ``s`` and the residuals from the sums (in units of the scales ``m1``, ``m2``).

    Mirrored bit for bit by ``finish`` in ``polycos/_kernels/rows.h``.
    """
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
        # Below eps: first-order correction by the remainders of the sums,
        # (w12 + l12) / (den * (1 + l11 / (2 w11) + l22 / (2 w22))).
        zero = xp.zeros_like(s)
        rel = xp.where(above1, _safe_divide(xp, l11, 2 * w11), zero) + xp.where(
            above2, _safe_divide(xp, l22, 2 * w22), zero
        )
        rough = s + (_safe_divide(xp, l12, den) - s * rel)
        s = xp.where(above1 & above2, _precise_quotient(xp, w12, w11, w22, l12, l11, l22), rough)
    return Residuals(_clamp_unit(xp, s), n1s, n2s, m1, m2)


def _precise_quotient(
    xp: Any, w12: Array, w11: Array, w22: Array, l12: Array, l11: Array, l22: Array
) -> Array:
    r"""``(w12 + l12) / sqrt((w11 + l11) (w22 + l22))`` to about twice the working precision.

    Where nothing wider than the input exists, the plain ``w12 / sqrt(w11 * w22)``
    rounds three times (product, root, quotient): up to about 1.25 ulp(1.0)
    together. Here each rounding is recovered exactly (Dekker's TwoProduct)
    and folded into one first-order correction, so ``s`` is rounded once:

    .. math::

        r = \sqrt{p},\; p + p_e = w_{11} w_{22},\qquad
        \delta r = \frac{(p - r^2) + p_e + w_{11} l_{22} + w_{22} l_{11}}{2 r},\qquad
        s = q + \frac{(w_{12} - q r) + l_{12} - q\,\delta r}{r},\; q = w_{12} / r.

    Only for rows whose norms are both above eps and whose sums are in the
    safe range (so ``p`` is normal and ``r > 0``). NaN propagates.
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


# =========================================================================== forward


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
    scale: Scale | None = None,
) -> tuple[Array, Residuals]:
    """Cosine similarity of validated inputs along a non-negative ``axis`` (steps 1-3).

    ``x1`` and ``x2`` share one real floating dtype and broadcast against each
    other; ``axis`` indexes their broadcast shape, which has at least one
    dimension. Returns the result in the input dtype (the broadcast shape
    without ``axis``) and the :class:`Residuals`. ``eager=True`` promises
    concrete arrays (values may be inspected: the range rescue runs only if a
    row needs it); ``native_dots`` replaces :func:`dots`; for traced arrays
    ``branch`` (e.g. ``jax.lax.cond``) lets the rescue run only when needed.
    """
    x1, x2 = _align(xp, x1, x2, axis)
    acc = accumulation_dtype(xp, x1.dtype, x1)
    eps = _eps_for(xp, acc, eps)
    keep = _keepdims_shape(_broadcast(x1, x2), axis)
    if _has_no_rows(keep):  # nothing to compute, and nothing proportional to a broadcast partner
        zero = _zeros(xp, keep, acc, x1)
        out = _zeros(xp, tuple(d for i, d in enumerate(keep) if i != axis), x1.dtype, x1)
        return out, Residuals(zero, zero, zero, zero + 1, zero + 1)
    a1, a2 = xp.astype(x1, acc, copy=False), xp.astype(x2, acc, copy=False)
    compensated = is_compensated(x1.dtype, acc)
    parts = _row_sums(
        xp, a1, a2, axis, rescaled=is_rescaled(x1.dtype, acc), compensated=compensated,
        eager=eager, native_dots=native_dots, branch=branch, scale=scale, eps=eps,
    )
    res = finish(xp, *parts, eps, compensated=compensated)
    out = xp.astype(xp.squeeze(res.s, axis=axis), x1.dtype, copy=False)
    return out, res


def pack_residuals(xp: Any, res: Residuals, axis: int) -> Array:
    """The residuals as one array ``(*result_shape, 5)``: the layout the native kernels use."""
    shape = tuple(xp.broadcast_arrays(*res)[0].shape)
    parts = [xp.squeeze(xp.broadcast_to(r, shape), axis=axis) for r in res]
    return xp.stack(parts, axis=-1)


def unpack_residuals(xp: Any, packed: Array, axis: int) -> Residuals:
    """Inverse of :func:`pack_residuals`: keepdims arrays along ``axis``."""
    return Residuals(*(xp.expand_dims(r, axis=axis) for r in xp.unstack(packed, axis=-1)))


# =========================================================================== step 4: gradient


class GradCoefficients(NamedTuple):
    """Per-row scalars of the VJP: ``d1 = (u1 ((h2 - t1 h1) / m1)) p1`` with ``h = (a / m) r`` (and 1 <-> 2)."""

    u1: Array  #: g / c1 (0 where c1 == 0), c1 in units of m1
    u2: Array  #: g / c2
    r1: Array  #: 1 / c1, c1 = max(n1s, eps / m1) (1 where that is 0: x1 is then a zero vector)
    r2: Array  #: 1 / c2
    t1: Array  #: [n1s > eps / m1] s
    t2: Array  #: [n2s > eps / m2] s
    m1: Array  #: row scale of x1
    m2: Array  #: row scale of x2
    p1: Array  #: ``2**k`` where ``u1`` is shifted down by it (:data:`_GRAD_SHIFT`), else 1
    p2: Array  #: the same for ``u2``


#: Rescaled accumulation dtypes (bits -> k): where ``u = g / c`` overflows while the
#: gradient need not (a finite ``g`` near the top of the range and ``c`` of a row in the
#: safe range, down to ``2**-230`` in float64, ``2**-20`` in float32), ``u = (g 2**-k) / c``
#: and the last product is multiplied by ``2**k``: exact scalings, one rounding.
_GRAD_SHIFT = {64: 512, 32: 64}


def grad_coefficients(
    xp: Any, g: Array, res: Residuals, eps: float, *, rescaled: bool
) -> GradCoefficients:
    """Step 4's per-row scalars, in the residuals' (accumulation) dtype.

    ``g`` is the upstream gradient with ``keepdims`` shape. Mirrored by
    ``coefficients`` in ``polycos/_kernels/rows.h``.
    """
    s, n1s, n2s, m1, m2 = res
    g = xp.astype(g, s.dtype, copy=False)

    info = xp.finfo(s.dtype)
    top = float(info.max)

    def side(ns: Array, m: Array) -> tuple[Array, Array, Array]:
        e = eps / m if rescaled else xp.full_like(ns, eps)
        cs = xp.maximum(ns, e)
        zero = cs == 0  # eps = 0 and a zero vector: h stays 0 and so does the gradient
        c = xp.where(zero, xp.ones_like(cs), cs)
        r = 1 / c
        # 1 / c overflows only for c = eps below 1 / max (a subnormal eps) on a zero row
        # (a nonzero row that small is rescaled): there u = g / c, and r is capped at
        # max (h = 0 r stays 0; it was 0 inf = NaN).
        huge = r > top
        u = xp.where(zero, xp.zeros_like(g), xp.where(huge, g / c, g * r))
        p = xp.ones_like(u)
        if rescaled:
            k = _GRAD_SHIFT[info.bits]
            over = (g <= top) & (g >= -top) & ((u > top) | (u < -top))
            down = g * 2.0**-k
            u = xp.where(over, xp.where(huge, down / c, down * r), u)
            p = xp.where(over, xp.full_like(p, 2.0**k), p)
        r = xp.where(huge, xp.full_like(r, top), r)
        return u, r, xp.where(ns > e, s, xp.zeros_like(s)), p

    u1, r1, t1, p1 = side(n1s, m1)
    u2, r2, t2, p2 = side(n2s, m2)
    return GradCoefficients(u1, u2, r1, r2, t1, t2, m1, m2, p1, p2)


def grad_elementwise(
    xp: Any, a1: Array, a2: Array, k: GradCoefficients, *, rescaled: bool
) -> tuple[Array, Array]:
    """Step 4's elementwise pass, in the accumulation dtype: ``d1 = (u1 ((h2 - t1 h1) / m1)) p1`` and 1 <-> 2.

    ``h = (a / m) r`` is bounded by 1 in magnitude and the row scale is applied
    last, so nothing overflows or underflows unless the gradient itself does
    (G3). Without rescaling (``m = 1``) the divisions are left out: same bits.
    Mirrored bit for bit by the gradient element of ``polycos/_kernels/rows.h``.
    """
    if not rescaled:
        h1, h2 = a1 * k.r1, a2 * k.r2
        return (k.u1 * (h2 - k.t1 * h1)) * k.p1, (k.u2 * (h1 - k.t2 * h2)) * k.p2
    h1, h2 = (a1 / k.m1) * k.r1, (a2 / k.m2) * k.r2
    # The bracket (|.| <= 2) over m (>= the smallest normal: no overflow) before u multiplies
    # it: u * bracket could underflow first where the gradient itself is a normal number.
    return (k.u1 * ((h2 - k.t1 * h1) / k.m1)) * k.p1, (k.u2 * ((h1 - k.t2 * h2) / k.m2)) * k.p2


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
    branch: Branch | None = None,
) -> tuple[Array, Array]:
    """Gradients of ``sum(g * cosine_similarity(x1, x2))`` w.r.t. ``x1`` and ``x2``.

    ``g`` has (or broadcasts to) the forward result's shape. The gradients have
    the shapes and dtype of ``x1`` and ``x2``; broadcast inputs get theirs
    summed (in the accumulation dtype) back to their shape. ``residuals`` from
    :func:`forward` are recomputed when not given.
    """
    shape1, shape2 = tuple(x1.shape), tuple(x2.shape)
    ndim = max(x1.ndim, x2.ndim)
    if _has_no_rows(_keepdims_shape(_broadcast(_expand_to(xp, x1, ndim), _expand_to(xp, x2, ndim)), axis)):
        # No result elements, no terms: zero gradients (made lazily: calloc'd, never touched).
        return _zeros(xp, shape1, x1.dtype, x1), _zeros(xp, shape2, x2.dtype, x2)
    if residuals is None:
        _, residuals = forward(
            xp, x1, x2, axis, eps, eager=eager, native_dots=native_dots, branch=branch
        )
    acc = residuals.s.dtype
    eps = _eps_for(xp, acc, eps)
    rescaled = is_rescaled(x1.dtype, acc)
    gk = _expand_to(xp, xp.expand_dims(g, axis=axis), ndim) if g.ndim == ndim - 1 else g
    k = grad_coefficients(xp, gk, residuals, eps, rescaled=rescaled)
    x1a, x2a = _align(xp, x1, x2, axis)
    d1, d2 = grad_elementwise(
        xp, xp.astype(x1a, acc, copy=False), xp.astype(x2a, acc, copy=False), k, rescaled=rescaled
    )
    d1 = xp.astype(sum_to_shape(xp, d1, shape1), x1.dtype, copy=False)
    d2 = xp.astype(sum_to_shape(xp, d2, shape2), x2.dtype, copy=False)
    return d1, d2


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
                 + \frac{\partial s}{\partial x_2} \odot t_2\Big),

    with :math:`\partial s / \partial x_i` from :func:`grad_coefficients` and
    :func:`grad_elementwise`. ``t1``, ``t2`` have the shapes of ``x1``, ``x2``
    (``None``: a zero tangent). Linear in the tangents. Returns the tangent of
    the result, in ``x1``'s dtype.
    """
    out = jvp_accumulated(xp, t1, t2, x1, x2, axis, eps, residuals, eager=eager, native_dots=native_dots)
    return xp.astype(out, x1.dtype, copy=False)


def jvp_accumulated(
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
    """:func:`jvp` before the final rounding: the tangent in the accumulation dtype."""
    if residuals is None:
        _, residuals = forward(xp, x1, x2, axis, eps, eager=eager, native_dots=native_dots)
    acc = residuals.s.dtype
    eps = _eps_for(xp, acc, eps)
    rescaled = is_rescaled(x1.dtype, acc)
    k = grad_coefficients(xp, xp.ones_like(residuals.s), residuals, eps, rescaled=rescaled)
    x1a, x2a = _align(xp, x1, x2, axis)
    d1, d2 = grad_elementwise(
        xp, xp.astype(x1a, acc, copy=False), xp.astype(x2a, acc, copy=False), k, rescaled=rescaled
    )
    total = None
    for d, t in ((d1, t1), (d2, t2)):
        if t is not None:
            t = xp.astype(_expand_to(xp, t, d.ndim), acc, copy=False)
            term = xp.sum(d * t, axis=axis)
            total = term if total is None else total + term
    if total is None:
        total = xp.zeros_like(xp.squeeze(residuals.s, axis=axis))
    return total


# =========================================================================== pairwise


class RowNorms(NamedTuple):
    r"""Rows normalised once, for the pairwise matrix and its VJP (accumulation dtype).

    For a row :math:`x` with scale :math:`m` (``max|x|`` for rescaled dtypes,
    else 1) and :math:`b = x / m`: ``ns`` :math:`= \lVert b\rVert`, ``cs``
    :math:`= \max(\lVert b\rVert, \varepsilon / m)` and ``xhat``
    :math:`= b / c_s = x / \max(\lVert x\rVert, \varepsilon)` (0 where
    :math:`c_s = 0`). Per-row fields are ``keepdims`` ``(..., N, 1)``.
    """

    xhat: Array  #: ``x / max(||x||, eps)``, shape ``(..., N, D)``
    cs: Array  #: ``max(||x||, eps) / m``
    ns: Array  #: ``||x|| / m``
    m: Array | None  #: row scale; ``None`` when the dtype needs no rescaling


def _row_above(xp: Any, r: RowNorms, eps: float) -> Array:
    e = eps if r.m is None else eps / r.m
    return r.ns > e


def normalize_rows(xp: Any, x: Array, eps: float, *, scale: Scale | None = None) -> RowNorms:
    """``x / max(||x||, eps)`` along the last axis, accurate and range-safe.

    The norm runs in the accumulation dtype; rescaled dtypes divide every row
    by ``max|x|`` first; where nothing wider than the input exists the sum of
    squares is compensated. Zero rows with ``eps = 0`` give ``xhat = 0``; NaN
    or inf in a row gives NaN in that row of ``xhat``. No branching on values.
    Mirrored by the pairwise row normalisation of ``polycos/_kernels/rows.h``.
    """
    acc = accumulation_dtype(xp, x.dtype, x)
    eps = _eps_for(xp, acc, eps)
    axis = x.ndim - 1
    a = xp.astype(x, acc, copy=False)
    m = None
    if is_rescaled(x.dtype, acc):
        a, m = (scale or _divide_by_row_max(xp, eps))(a, axis)
    if is_compensated(x.dtype, acc):
        hi, lo = accurate_dot(xp, a, a, axis)
        root = xp.sqrt(hi)
        ns = xp.expand_dims(root + _safe_divide(xp, lo, 2 * root), axis=axis)
    else:
        ns = xp.expand_dims(xp.sqrt(xp.vecdot(a, a, axis=-1)), axis=axis)
    e = xp.full_like(ns, eps) if m is None else eps / m
    cs = xp.maximum(ns, e)
    # cs == 0 only for an all-zero row (eps = 0): dividing it by 1 gives 0.
    xhat = a / xp.where(cs == 0, xp.ones_like(cs), cs)
    return RowNorms(xhat, cs, ns, m)


def _align_last(xp: Any, x1: Array, x2: Array) -> tuple[Array, Array]:
    """Equal length along the last (reduced) axis: a length-1 row is broadcast."""
    if x1.shape[-1] == 1 and x2.shape[-1] != 1:
        x1 = _full_along(xp, x1, x1.ndim - 1, x2.shape[-1])
    elif x2.shape[-1] == 1 and x1.shape[-1] != 1:
        x2 = _full_along(xp, x2, x2.ndim - 1, x1.shape[-1])
    return x1, x2


#: ``product(h1, h2_or_None, dtype) -> S``: a faster :func:`pairwise_product`.
Product = Callable[[Array, Array, Any], Array]
#: ``normalize(x, eps) -> RowNorms``: a faster :func:`normalize_rows`.
Normalize = Callable[[Array, float], RowNorms]
#: ``tmatmul(a, b) -> matrix_transpose(a) @ b``: a faster transposed product.
TransposedProduct = Callable[[Array, Array], Array]


def pairwise_product(xp: Any, h1: Array, h2: Array | None, dtype: Any) -> Array:
    """``clip(h1 @ h2^T, -1, 1)`` in ``h1``'s dtype, returned in ``dtype`` (NaN kept).

    ``h2 = None`` means ``h2 = h1``. Casting before clamping is the same as
    after (rounding is monotone and +-1 are representable).
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
    native_normalize: Normalize | None = None,
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
    accumulation dtype (float64 for float32 inputs: within ulp(1.0) of exact),
    ``O(N M + (N + M) D)`` memory, never ``N M D``. For float64 inputs the
    product's rounding is the error (see docs/pairwise.md). An empty ``S``
    (``N``, ``M`` or a batch size 0) is returned at once: no row is
    normalised, however large its partner, and the residuals are stride-0
    placeholders of the right shapes (the VJP of an empty ``S`` reads none).
    """
    if x2 is not None:
        x1, x2 = _align_last(xp, x1, x2)
    shape = _pairwise_shape(x1, x2)
    if _has_no_rows(shape):  # no pairs: nothing to normalise (a partner may be a huge broadcast view)
        r2 = None if x2 is None else _placeholder_rows(xp, x2)
        return _zeros(xp, shape, x1.dtype, x1), (_placeholder_rows(xp, x1), r2)
    normalize = native_normalize or (lambda x, e: normalize_rows(xp, x, e))
    r1 = normalize(x1, eps)
    r2 = None if x2 is None else normalize(x2, eps)
    h2 = None if r2 is None else r2.xhat
    product = native_product or (lambda a, b, dt: pairwise_product(xp, a, b, dt))
    return product(r1.xhat, h2, x1.dtype), (r1, r2)


def _placeholder_rows(xp: Any, x: Array) -> RowNorms:
    """:class:`RowNorms` of ``x``'s shapes and accumulation dtype as stride-0 zeros (ones for ``m``): no memory."""
    acc = accumulation_dtype(xp, x.dtype, x)
    unit = (1,) * x.ndim
    rows = (*tuple(x.shape[:-1]), 1)
    zero = _zeros(xp, unit, acc, x)
    m = xp.broadcast_to(zero + 1, rows) if is_rescaled(x.dtype, acc) else None
    return RowNorms(xp.broadcast_to(zero, tuple(x.shape)), xp.broadcast_to(zero, rows), xp.broadcast_to(zero, rows), m)


def _pairwise_shape(x1: Array, x2: Array | None) -> tuple:
    """The shape ``(..., N, M)`` of the similarity matrix (leading sizes compared, never hashed)."""
    other = x1 if x2 is None else x2
    lead1, lead2 = tuple(x1.shape[:-2]), tuple(other.shape[:-2])
    n = max(len(lead1), len(lead2))
    lead1, lead2 = (1,) * (n - len(lead1)) + lead1, (1,) * (n - len(lead2)) + lead2
    batch = tuple(b if a == 1 else a for a, b in zip(lead1, lead2, strict=True))
    return (*batch, x1.shape[-2], other.shape[-2])


def _reciprocal_shift(xp: Any, inv: Array, dtype: Any) -> tuple[Array | None, Array | None]:
    """Exact powers of two ``(pre, post)`` that keep ``1 / c`` a normal number of ``dtype``.

    Unscaled float32 rows (their squares fit float64) have ``1 / c`` in float64;
    rounded to float32 it is subnormal for norms above ``1 / tiny`` (rows near
    ``max``: 143 ulp lost at D = 16384, or 0 where XLA flushes it) and beyond
    ``max`` below ``1 / max``. There ``(x (inv pre)) post`` with ``pre = 2**64``
    (``2**-64``) and ``post = 1 / pre``; elsewhere both are 1, the same bits as
    ``x inv``. ``(None, None)`` when ``inv`` is already in ``dtype``.
    """
    if _dtype_name(inv.dtype) == _dtype_name(dtype):
        return None, None
    info = xp.finfo(dtype)
    low, high = inv < float(info.smallest_normal), inv > float(info.max)
    one = xp.ones_like(inv)
    pre = xp.where(low, 2.0**64 * one, xp.where(high, 2.0**-64 * one, one))
    post = xp.where(low, 2.0**-64 * one, xp.where(high, 2.0**64 * one, one))
    return pre, xp.astype(post, dtype)


def _divide_by_scale(xp: Any, d: Array, m: Array) -> Array:
    """``d / m`` for row scales ``m`` (keepdims), also where ``1 / m`` is subnormal.

    XLA divides by a broadcast divisor as a product with its reciprocal, which
    it flushes to 0 when subnormal (``m`` past ``2**1022`` in float64): the
    gradient of a row near the top of the range became 0. Where ``m`` is
    above the square root of the range, both sides are scaled by an exact
    power of two first; in IEEE arithmetic the quotient is the same.
    """
    info = xp.finfo(m.dtype)
    half = 2.0 ** ((int(math.log2(float(info.max))) + 1) // 2)  # 2**512 in float64, 2**64 in float32
    big = m > half
    return xp.where(big, d / half, d) / xp.where(big, m / half, m)


def row_normalize_vjp(xp: Any, r: RowNorms, v: Array, eps: float, h: Array | None = None) -> Array:
    r"""VJP of :math:`x \mapsto \hat x = x / \max(\lVert x\rVert, \varepsilon)` for cotangent ``v``.

    Above ``eps`` the Jacobian is :math:`(I - \hat x \hat x^{\mathsf T}) / \lVert x\rVert`
    (symmetric); at or below it :math:`c = \varepsilon` is constant and the
    Jacobian is :math:`I / \varepsilon`. Hence

    .. math::

        \bar x = \frac{v - [n > \varepsilon]\,(\hat x \cdot v)\,\hat x}{c}.

    With :math:`v_i = \sum_j g_{ij} \hat x_{2j}`, this is the row-wise VJP summed
    over the partner rows, as it must be. Computed in the dtype of ``h``
    (``r.xhat`` cast by the caller; the accumulation dtype by default), the
    row scale applied last (G3). A rescaled row at or below ``eps`` is
    :math:`v / \varepsilon` directly: there :math:`c / m = \varepsilon / m`, and
    :math:`(v\,m / \varepsilon) / m` would underflow before the row scale
    brings it back (a float64 row of 1e-200 with ``eps = 1``).
    """
    eps = _eps_for(xp, r.cs.dtype, eps)
    h = r.xhat if h is None else h
    v = xp.astype(v, h.dtype, copy=False)
    above = _row_above(xp, r, eps)
    proj = xp.expand_dims(xp.vecdot(h, v, axis=-1), axis=h.ndim - 1)
    proj = xp.where(above, proj, xp.zeros_like(proj))
    inv = _safe_divide(xp, xp.ones_like(r.cs), r.cs)  # 1 / c in units of m, in the accumulation dtype
    pre, post = _reciprocal_shift(xp, inv, h.dtype) if r.m is None else (None, None)
    if pre is not None:
        inv = inv * pre
    d = (v - proj * h) * xp.astype(inv, h.dtype, copy=False)
    if post is not None:
        d = d * post
    if r.m is None:
        return d
    d = _divide_by_scale(xp, d, xp.astype(r.m, h.dtype, copy=False))
    if eps == 0:  # only zero rows are at or below 0, and their gradient is 0
        return d
    below = r.ns <= eps / r.m  # (not ~above: a NaN row stays NaN)
    return xp.where(below, v / eps, d)


MatMul = Callable[[Array, Array], Array]


def product_dtype(xp: Any, dtype: Any) -> Any:
    """The dtype of the pairwise VJP's matrix products: float32 up to float32, else the input's."""
    return xp.float32 if _dtype_name(dtype) in ("float16", "bfloat16", "float32") else dtype


def pairwise_vjp(
    xp: Any,
    g: Array,
    x1: Array,
    x2: Array | None,
    eps: float,
    residuals: tuple[RowNorms, RowNorms | None] | None = None,
    *,
    native_normalize: Normalize | None = None,
    native_tmatmul: TransposedProduct | None = None,
) -> tuple[Array, Array | None]:
    r"""Gradients of ``sum(g * S)`` for ``S = pairwise_forward(x1, x2)``, by matrix products.

    .. math::

        \bar{\hat X}_1 = G \hat X_2, \qquad \bar{\hat X}_2 = G^{\mathsf T} \hat X_1
        \quad(\text{self-similarity: } (G + G^{\mathsf T}) \hat X),

    summed over broadcast leading dimensions, then :func:`row_normalize_vjp`.
    The products and the normalisation's VJP run in the *product dtype*
    (:func:`product_dtype`: float32 for float32 and narrower inputs): the
    gradient carries no 1-ulp promise, and float32 products keep a forward
    plus backward within 1.5x of a plain normalise-then-multiply (the float64
    product of the forward is what G2 needs). ``g`` has ``S``'s shape. Returns
    ``(dx1, dx2)`` with the shapes and dtype of the inputs (``dx2 = None``
    when ``x2`` is ``None``). Memory ``O(N M + (N + M) D)``.
    """
    shape1 = tuple(x1.shape)
    shape2 = None if x2 is None else tuple(x2.shape)
    if x2 is not None:
        x1, x2 = _align_last(xp, x1, x2)
    if _has_no_rows(tuple(g.shape)) or _has_no_rows(_pairwise_shape(x1, x2)):
        # No pairs at all: zero gradients (even for NaN rows), nothing normalised.
        z1 = _zeros(xp, shape1, x1.dtype, x1)
        return z1, None if x2 is None else _zeros(xp, shape2, x2.dtype, x2)  # type: ignore[arg-type]
    if residuals is None:
        normalize = native_normalize or (lambda x, e: normalize_rows(xp, x, e))
        residuals = (normalize(x1, eps), None if x2 is None else normalize(x2, eps))
    r1, r2 = residuals
    tmatmul = native_tmatmul or (lambda a, b: xp.matmul(xp.matrix_transpose(a), b))
    work = product_dtype(xp, x1.dtype)
    h1 = xp.astype(r1.xhat, work, copy=False)
    gw = xp.astype(g, work, copy=False)
    if r2 is None:
        # Two products rather than (G + G^T) h1: adding a transposed N x M matrix
        # is cache-hostile and costs about as much as a product.
        v = xp.matmul(gw, h1) + tmatmul(gw, h1)
        d1 = row_normalize_vjp(xp, r1, sum_to_shape(xp, v, tuple(h1.shape)), eps, h1)
        return xp.astype(sum_to_shape(xp, d1, shape1), x1.dtype, copy=False), None
    h2 = xp.astype(r2.xhat, work, copy=False)
    v1 = sum_to_shape(xp, xp.matmul(gw, h2), tuple(h1.shape))
    v2 = sum_to_shape(xp, tmatmul(gw, h1), tuple(h2.shape))
    d1 = row_normalize_vjp(xp, r1, v1, eps, h1)
    d2 = row_normalize_vjp(xp, r2, v2, eps, h2)
    return (
        xp.astype(sum_to_shape(xp, d1, shape1), x1.dtype, copy=False),
        xp.astype(sum_to_shape(xp, d2, shape2), x2.dtype, copy=False),  # type: ignore[union-attr, arg-type]
    )


def pairwise_jvp(
    xp: Any, t1: Array | None, t2: Array | None, x1: Array, x2: Array | None, eps: float
) -> Array:
    r"""Jacobian-vector product of :func:`pairwise_forward` along tangents ``(t1, t2)``.

    The Jacobian of the row normalisation is symmetric (see
    :func:`row_normalize_vjp`), so the tangent of :math:`\hat x` is that same
    function applied to the tangent, and

    .. math::

        \dot S = \dot{\hat X}_1 \hat X_2^{\mathsf T} + \hat X_1 \dot{\hat X}_2^{\mathsf T}.

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
        return row_normalize_vjp(xp, r, t, eps)

    d1 = tangent(r1, t1, x1)
    d2 = d1 if x2 is None else tangent(r2, t2, x2)
    out = xp.matmul(d1, xp.matrix_transpose(h2)) + xp.matmul(h1, xp.matrix_transpose(d2))
    return xp.astype(out, x1.dtype, copy=False)
