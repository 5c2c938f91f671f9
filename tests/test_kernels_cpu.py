"""The native CPU kernel (``polycos._kernels``: ``cpu.cpp`` + ``rows.h``).

* Values within 1 ulp(1.0) of the exact reference and gradients to the
  reference VJP, over random shapes, broadcasts, ``dim``, strides (negative,
  stride 0, transposed, gaps), dtypes and the hard cases (zero rows, eps = 0,
  NaN/inf rows, scales from the bottom to the top of each dtype's range).
* Bitwise mirrors: ``rows.h``'s ``finish`` against ``_core.finish`` and its
  gradient against ``_core.grad_coefficients`` + ``_core.grad_elementwise``.
* Bitwise repeatable across thread counts and ISA clones; 64-bit indexing;
  empty problems; FTZ/DAZ callers; the contiguous-copy fallback.
* The XLA FFI handlers under ``jax.jit`` and ``jax.vmap`` against the NumPy path.

Skipped as a whole, with the loader's reason, only when the library was not built.
"""

from __future__ import annotations

import math
import mmap
import threading
import time

import numpy as np
import pytest
from hypothesis import assume, given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from polycos import _core
from polycos import _kernels as K
from polycos.testing import (
    assert_matches_reference,
    assert_vjp_matches_reference,
    cosine_inputs,
)

pytestmark = pytest.mark.skipif(
    not K.available(), reason=f"CPU kernel not built: {K.unavailable_reason()}"
)

ml_dtypes = pytest.importorskip("ml_dtypes")
BF16 = ml_dtypes.bfloat16
DTYPES = ("float16", "bfloat16", "float32", "float64")


def np_dtype(name: str):
    return BF16 if name == "bfloat16" else np.dtype(name)


def as_dtype(a: np.ndarray, name: str) -> np.ndarray:
    return np.asarray(a).astype(np_dtype(name))


def wide(a: np.ndarray) -> np.ndarray:
    """An exact float64 copy (the reference cannot read bfloat16 reliably)."""
    return np.asarray(a).astype(np.float64)


def same_bits(a: np.ndarray, b: np.ndarray) -> bool:
    """Bitwise equality, NaN payloads included."""
    a, b = np.ascontiguousarray(a), np.ascontiguousarray(b)
    return a.shape == b.shape and a.dtype == b.dtype and a.tobytes() == b.tobytes()


def same_values(a: np.ndarray, b: np.ndarray) -> bool:
    """Bitwise equality, any NaN equal to any NaN."""
    a, b = np.asarray(a), np.asarray(b)
    nan_a, nan_b = np.isnan(a), np.isnan(b)
    return a.shape == b.shape and bool(np.array_equal(nan_a, nan_b)) and bool(
        np.array_equal(a[~nan_a].view(np.uint8 if a.dtype.itemsize == 1 else f"u{a.dtype.itemsize}"),
                       b[~nan_b].view(np.uint8 if b.dtype.itemsize == 1 else f"u{b.dtype.itemsize}"))
    )


# --------------------------------------------------------------------------- strided views


def restride(draw, x: np.ndarray) -> np.ndarray:
    """The same values as ``x`` in another memory layout: a reversed axis (negative
    stride), transposed storage, or gaps between elements."""
    kind = draw(st.sampled_from(["plain", "reversed", "fortran", "gaps"]))
    if x.ndim == 0 or x.size == 0 or kind == "plain":
        return x
    if kind == "reversed":
        axis = draw(st.integers(0, x.ndim - 1))
        return np.flip(np.flip(x, axis).copy(), axis)
    if kind == "fortran":
        return np.asfortranarray(x)
    buf = np.zeros((*x.shape[:-1], x.shape[-1] * 3), dtype=x.dtype)
    buf[..., ::3] = x
    return buf[..., ::3]


@st.composite
def cases(draw, dtypes=DTYPES, **kw):
    """``(x1, x2, dim, eps)`` NumPy inputs of one of ``dtypes``, in any layout; sometimes
    x2 is a stride-0 ``broadcast_to`` view of the full shape."""
    dtype = draw(st.sampled_from(dtypes))
    draw_as = "float32" if dtype == "bfloat16" else dtype
    case = draw(cosine_inputs(np, dtypes=(draw_as,), **kw))
    x1, x2 = as_dtype(case.x1, dtype), as_dtype(case.x2, dtype)
    x1, x2 = restride(draw, x1), restride(draw, x2)
    if draw(st.booleans()):
        x2 = np.broadcast_to(x2, np.broadcast_shapes(x1.shape, x2.shape))
    return x1, x2, case.dim, case.eps


def check_forward(x1: np.ndarray, x2: np.ndarray, dim: int, eps: float, **kw) -> np.ndarray:
    out, res = K.forward(x1, x2, dim, eps, **kw)
    assert out.dtype == x1.dtype
    assert_matches_reference(out, wide(x1), wide(x2), dim, eps)
    if res is not None:
        assert res.shape == (*out.shape, 5)
        assert np.all(np.isnan(res[..., 0]) | (np.abs(res[..., 0]) <= 1))
    return out


def check_backward(x1: np.ndarray, x2: np.ndarray, dim: int, eps: float, use_res: bool) -> None:
    out, res = K.forward(x1, x2, dim, eps, want_res=use_res)
    g = np.linspace(-2.0, 2.0, num=max(out.size, 1))[: out.size].reshape(out.shape).astype(x1.dtype)
    d1, d2 = K.backward(g, x1, x2, dim, eps, res)
    full = np.broadcast_shapes(x1.shape, x2.shape)
    assert d1.shape == d2.shape == (full or (1,))
    with np.errstate(all="ignore"):  # inf + -inf in rows that hold them: NaN, as it should
        g1 = _core.sum_to_shape(np, d1.astype(np.float64), x1.shape or (1,)).reshape(x1.shape)
        g2 = _core.sum_to_shape(np, d2.astype(np.float64), x2.shape or (1,)).reshape(x2.shape)
    with np.errstate(all="ignore"):
        assert_vjp_matches_reference(
            (g1.astype(x1.dtype), g2.astype(x2.dtype)), wide(g), wide(x1), wide(x2), dim, eps
        )


# --------------------------------------------------------------------------- against the reference


@given(cases(max_side=9))
def test_forward_matches_reference(case) -> None:
    """G1, G2, G4, G6 on any layout: within 1 ulp(1) of the exact value."""
    x1, x2, dim, eps = case
    check_forward(x1, x2, dim, eps)


@given(cases(max_side=7), st.booleans())
def test_backward_matches_reference(case, use_res: bool) -> None:
    """The VJP, from the residuals or recomputing them, against the exact VJP.

    Subnormal rows far below eps included: the rescue's scale has a floor
    (``_core._row_scale``) so that ``eps / m`` stays finite.
    """
    x1, x2, dim, eps = case
    check_backward(x1, x2, dim, eps, use_res)


@given(cases(dtypes=("float32",), max_side=7))
def test_float32_accumulating_in_float32(case) -> None:
    """The (float32, float32) pair (JAX without x64): compensated sums, still 1 ulp(1)."""
    x1, x2, dim, eps = case
    check_forward(x1, x2, dim, eps, acc_dtype=np.float32)
    out, res = K.forward(x1, x2, dim, eps, acc_dtype=np.float32)
    assert res.dtype == np.float32
    d1, _d2 = K.backward(np.ones(out.shape, np.float32), x1, x2, dim, eps, res)
    assert d1.dtype == np.float32


SCALES = {
    "float16": (2.0**-24, 6e4),
    "bfloat16": (2.0**-133, 3e38),
    "float32": (1e-45, 3e38),
    "float64": (5e-324, 1.7e308),
}


def test_float32_residuals_come_from_float64_sums() -> None:
    """(float32, float32), JAX without x64: the result is the (float32, float64) pair's
    (NumPy's bits); a row's residuals are that pair's rounded to float32 with m = 1 where
    its sums of squares lie in float32's safe range (or are 0), else the float32 pair's
    (rescued: m != 1; non-finite), row by row; the VJP recomputing them equals the VJP
    from them, bit for bit, and both match the reference."""
    rng = np.random.default_rng(21)
    a = rng.standard_normal((12, 40))
    b = rng.standard_normal((12, 40))
    a[3] *= 1e-30  # sums of squares below the safe range: rescued in float32
    a[5] *= 1e30  # above it
    a[7, 2] = np.nan
    a[9] = 0
    x1, x2 = a.astype(np.float32), b.astype(np.float32)
    out64, res64 = K.forward(x1, x2, 1, 1e-8)
    out32, res32 = K.forward(x1, x2, 1, 1e-8, acc_dtype=np.float32)
    assert same_values(out32, out64)
    plain = [0, 1, 2, 4, 6, 8, 9, 10, 11]
    want = res64[plain].astype(np.float32)
    want[:, 3:] = 1
    assert same_bits(res32[plain], want)
    assert np.all(res32[[3, 5], 3] != 1)  # the float32 pair's rescue: m = max|x1|
    assert np.all(np.isfinite(res32[[3, 5]]))
    for r in range(12):  # row-local: a row alone has the bits it has among the others
        _o, alone = K.forward(x1[r : r + 1], x2[r : r + 1], 1, 1e-8, acc_dtype=np.float32)
        assert same_values(alone, res32[r : r + 1]), r
    value_only, _none = K.forward(x1, x2, 1, 1e-8, acc_dtype=np.float32, want_res=False)
    assert same_values(value_only, out32)
    g = rng.uniform(-2, 2, 12).astype(np.float32)
    from_res = K.backward(g, x1, x2, 1, 1e-8, res32)
    recomputed = K.backward(g, x1, x2, 1, 1e-8, None, acc_dtype=np.float32)
    finite = [r for r in range(12) if r != 7]
    for u, v in zip(from_res, recomputed, strict=True):
        assert u.dtype == np.float32
        assert same_values(u, v)
    assert_vjp_matches_reference(
        tuple(d[finite] for d in from_res), wide(g[finite]), wide(x1[finite]), wide(x2[finite]), 1, 1e-8
    )
    assert np.all(np.isnan(from_res[0][7]))


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("where", ["bottom", "top", "subnormal"])
@pytest.mark.parametrize("layout", ["row", "column"])
def test_scale_safe(dtype: str, where: str, layout: str) -> None:
    """G3: rows scaled to the bottom (subnormals included) and the top of the range, eps = 0."""
    rng = np.random.default_rng(3)
    lo, hi = SCALES[dtype]
    info = ml_dtypes.finfo(BF16) if dtype == "bfloat16" else np.finfo(dtype)
    scale = {"bottom": float(info.smallest_normal) * 4, "top": hi / 40, "subnormal": lo * 8}[where]
    a = rng.uniform(-4, 4, (40, 33))
    b = rng.uniform(-4, 4, (40, 33))
    b[0] = a[0]
    x1 = as_dtype(a * scale, dtype)
    x2 = as_dtype(b * scale, dtype)
    assert np.all(np.isfinite(wide(x1)))
    if layout == "column":
        x1, x2 = np.ascontiguousarray(x1.T), np.ascontiguousarray(x2.T)
    dim = 1 if layout == "row" else 0
    out = check_forward(x1, x2, dim, 0.0)
    if where != "subnormal":
        assert out[0] == 1  # parallel rows: exactly 1 at any scale
    check_backward(x1, x2, dim, 0.0, use_res=True)


@pytest.mark.parametrize("dtype", DTYPES)
def test_long_rows_g2(dtype: str) -> None:
    """G2 at D = 65536 for nearly parallel rows, row and column layouts."""
    rng = np.random.default_rng(11)
    a = rng.standard_normal((16, 65536))
    x1 = as_dtype(a, dtype)
    x2 = as_dtype(a + 1e-3 * rng.standard_normal(a.shape), dtype)
    check_forward(x1[:3], x2[:3], 1, 1e-8)
    check_forward(np.ascontiguousarray(x1.T), np.ascontiguousarray(x2.T), 0, 1e-8)


@pytest.mark.parametrize("dtype", DTYPES)
def test_nonfinite_rows_stay_local(dtype: str) -> None:
    """G6: NaN / inf in a row gives NaN in that element and that gradient row only."""
    x1 = as_dtype(np.ones((4, 5)), dtype)
    x2 = as_dtype(np.arange(20.0).reshape(4, 5) + 1, dtype)
    x1[1, 2] = np.nan
    x2[2, 0] = np.inf
    for a, b, dim in ((x1, x2, 1), (np.ascontiguousarray(x1.T), np.ascontiguousarray(x2.T), 0)):
        out, res = K.forward(a, b, dim, 1e-8)
        s = wide(out)
        assert np.isnan(s[1])
        assert np.isnan(s[2])
        assert np.all(np.isfinite(s[[0, 3]]))
        d1, d2 = K.backward(np.ones(4, a.dtype), a, b, dim, 1e-8, res)
        d1 = wide(d1) if dim == 1 else wide(d1).T
        d2 = wide(d2) if dim == 1 else wide(d2).T
        assert np.all(np.isfinite(d1[[0, 3]]))
        assert np.all(np.isfinite(d2[[0, 3]]))
        assert np.all(np.isnan(d2[1]))


@pytest.mark.parametrize("dtype", DTYPES)
def test_zero_rows_and_eps_zero(dtype: str) -> None:
    """G4: zero vectors give s = 0 and zero, finite gradients for eps > 0 and eps = 0."""
    x1 = as_dtype(np.zeros((3, 6)), dtype)
    x2 = as_dtype(np.arange(18.0).reshape(3, 6), dtype)
    for eps in (0.0, 1e-8):
        out, res = K.forward(x1, x2, 1, eps)
        assert np.all(wide(out) == 0)
        d1, d2 = K.backward(np.ones(3, x1.dtype), x1, x2, 1, eps, res)
        assert np.all(wide(d2) == 0)
        if eps == 0:
            assert np.all(wide(d1) == 0)
        else:  # g x2 / (eps |x2|): about 1e8 (inf in float16, whose range ends at 65504)
            with np.errstate(over="ignore"):
                want = (wide(x2) / (eps * np.linalg.norm(wide(x2), axis=1, keepdims=True))).astype(x1.dtype)
            np.testing.assert_allclose(wide(d1), wide(want), rtol=1e-2)


# --------------------------------------------------------------------------- bitwise mirrors of _core


def _sums(rng: np.random.Generator, n: int, dt: type, compensated: bool) -> list[np.ndarray]:
    """Per-row sums as the kernel produces them: in range, zero, NaN or inf, in scaled units."""
    lo, hi = K._range_limits(np.dtype(dt).name)
    w11 = np.exp(rng.uniform(np.log(lo), np.log(hi), n)).astype(dt)
    w22 = np.exp(rng.uniform(np.log(lo), np.log(hi), n)).astype(dt)
    special = rng.integers(0, 8, n)
    w11[special == 1] = 0
    w22[special == 2] = 0
    w11[special == 3] = np.nan
    w22[special == 4] = np.inf
    w11[special == 5] = w22[special == 5]
    with np.errstate(all="ignore"):
        w12 = (np.sqrt(w11.astype(np.float64) * w22) * rng.uniform(-1.2, 1.2, n)).astype(dt)
    w12[special == 5] = w11[special == 5]
    if compensated:
        ls = [(w * rng.uniform(-1, 1, n) * np.finfo(dt).eps / 2).astype(dt) for w in (w12, w11, w22)]
    else:
        ls = [np.zeros(n, dt)] * 3
    m1 = np.where(rng.integers(0, 2, n) == 1, np.exp(rng.uniform(-60, 60, n)), 1.0).astype(dt)
    m2 = np.where(rng.integers(0, 2, n) == 1, np.exp(rng.uniform(-60, 60, n)), 1.0).astype(dt)
    return [w12, w11, w22, *ls, m1, m2]


@pytest.mark.parametrize("acc", ["float32", "float64"])
@pytest.mark.parametrize("compensated", [False, True])
@pytest.mark.parametrize("eps", [0.0, 1e-8, 0.5, 1e-30])
def test_finish_is_core_finish_bitwise(acc: str, compensated: bool, eps: float) -> None:
    """rows.h finish == _core.finish, bit for bit, on the same sums (every regime)."""
    rng = np.random.default_rng(int(eps * 1e9) + compensated)
    dt = np.dtype(acc).type
    sums = _sums(rng, 4000, dt, compensated)
    with np.errstate(all="ignore"):
        want = _core.finish(np, *sums, eps, compensated=compensated)
    got = K._test_finish(*sums, eps, compensated=compensated)
    for name, g, w in zip(want._fields, got, want, strict=True):
        assert same_values(g, np.asarray(w, dtype=dt)), name


@pytest.mark.parametrize("acc", ["float32", "float64"])
@pytest.mark.parametrize("rescaled", [False, True])
@pytest.mark.parametrize("eps", [0.0, 1e-8, 0.5])
def test_gradient_is_core_gradient_bitwise(acc: str, rescaled: bool, eps: float) -> None:
    """rows.h grad_coefficients + grad_element == _core's, bit for bit."""
    rng = np.random.default_rng(5 + rescaled)
    dt = np.dtype(acc).type
    rows, d = 300, 7
    sums = _sums(rng, rows, dt, False)
    if not rescaled:
        sums[6] = sums[7] = np.ones(rows, dt)
    with np.errstate(all="ignore"):
        res = _core.finish(np, *sums, eps, compensated=False)
    scale = np.exp(rng.uniform(-30, 30, (rows, 1)))
    a1 = (rng.standard_normal((rows, d)) * scale).astype(dt)
    a2 = (rng.standard_normal((rows, d)) * scale).astype(dt)
    a1[::17] = 0
    g = rng.uniform(-3, 3, rows).astype(dt)
    packed = np.stack([np.asarray(r, dtype=dt) for r in res], axis=-1)
    got = K._test_grad(a1, a2, g, packed, eps, rescaled=rescaled)
    with np.errstate(all="ignore"):
        keep = [np.asarray(r, dtype=dt)[:, None] for r in res]
        k = _core.grad_coefficients(np, g[:, None], _core.Residuals(*keep), eps, rescaled=rescaled)
        want = _core.grad_elementwise(np, a1, a2, k, rescaled=rescaled)
    for gv, wv in zip(got, want, strict=True):
        assert same_values(gv, np.asarray(wv, dtype=dt))


# (dtype, accumulation dtype) pairs whose rows may be rescaled, so that both of
# row_grad's arithmetic variants run; (small, big): a row norm and a cotangent whose
# quotient overflows (test_guarantees' cotangent-over-the-norm case).
_RESCALED = {
    ("bfloat16", "float32"): (-18, 112),
    ("float32", "float32"): (-18, 112),
    ("float64", "float64"): (-200, 826),
}


@pytest.mark.parametrize(("dtype", "acc"), list(_RESCALED))
@pytest.mark.parametrize("d", [3, 16, 37])
@pytest.mark.parametrize("layout", ["row", "strided", "column"])
def test_kernel_gradient_rows_are_core_gradient_bitwise(dtype: str, acc: str, d: int, layout: str) -> None:
    """The kernel's VJP through every layout, on rows of every arithmetic variant (plain
    rows; rescaled rows, m != 1; shifted cotangents, p != 1), is _core's VJP from the same
    residuals bit for bit, in the accumulation dtype (no narrowing to compare through)."""
    rng = np.random.default_rng(d)
    small, big = _RESCALED[(dtype, acc)]
    info = ml_dtypes.finfo(BF16) if dtype == "bfloat16" else np.finfo(dtype)
    rows = 24
    a = rng.uniform(-2, 2, (rows, d))
    b = rng.uniform(-2, 2, (rows, d))
    a[0], a[0, 0] = 0.0, 2.0**small  # ||x1|| tiny: g / ||x1|| overflows, p1 != 1 ...
    b[0], b[0, 0], b[0, 1] = 0.0, 1.0, 2.0**-7  # ... the gradient (2^-7 of it) does not
    a[1:4] *= float(info.smallest_normal) * 8  # rescaled rows: m != 1
    a[4:7] *= float(info.max) / 64
    g = rng.uniform(-3, 3, rows)
    g[0] = 2.0**big
    x1, x2 = as_dtype(a, dtype), as_dtype(b, dtype)
    gk = g.astype(acc)
    if layout == "column":
        x1, x2 = np.ascontiguousarray(x1.T), np.ascontiguousarray(x2.T)
    elif layout == "strided":
        x1, x2 = np.asfortranarray(x1), x2[:, ::-1].copy()[:, ::-1]
    dim = 0 if layout == "column" else 1
    _out, res = K.forward(x1, x2, dim, 0.0, acc_dtype=np.dtype(acc))
    d1, d2 = K.backward(gk, x1, x2, dim, 0.0, res, out_dtype=np.dtype(acc))
    if layout == "column":
        d1, d2, x1, x2 = d1.T, d2.T, x1.T, x2.T
    with np.errstate(all="ignore"):
        keep = _core.Residuals(*(res[:, i : i + 1] for i in range(5)))
        k = _core.grad_coefficients(np, gk[:, None], keep, 0.0, rescaled=True)
        # every variant runs: a shifted row, rescaled rows, plain rows
        assert k.p1[0, 0] != 1
        assert np.all(k.m1[1:7] != 1)
        assert np.all(k.p1[1:] == 1)
        want = _core.grad_elementwise(np, x1.astype(acc), x2.astype(acc), k, rescaled=True)
    for got, w in zip((d1, d2), want, strict=True):
        assert got.dtype == np.dtype(acc)
        assert same_values(got, w)
    assert np.all(np.isfinite(d1[0])), "the shifted row's gradient is finite"


def test_range_limits_are_the_cores() -> None:
    """The rescue thresholds compiled into rows.h are _core._suspect's."""
    for acc in ("float32", "float64"):
        lo, hi = K._range_limits(acc)
        info = np.finfo(acc)
        dt = np.dtype(acc).type
        assert lo == float(dt(float(info.smallest_normal) ** 0.5 / float(info.eps)))
        assert hi == float(dt(float(info.max) ** 0.5 / 4))
        w = np.array([lo, np.nextafter(dt(lo), dt(0)), hi, np.nextafter(dt(hi), dt(np.inf))], dtype=dt)
        assert _core._suspect(np, w).tolist() == [False, True, False, True]


@pytest.mark.parametrize("dtype", DTYPES)
def test_normalize_rows(dtype: str) -> None:
    """normalize_rows: xhat to a few ulp of x / max(||x||, eps); bitwise the core's on exact sums."""
    rng = np.random.default_rng(9)
    spread = 3 if dtype == "float16" else 20
    x = as_dtype(rng.standard_normal((50, 37)) * np.exp(rng.uniform(-spread, spread, (50, 1))), dtype)
    x[3] = 0
    x[4, 2] = np.nan
    acc = K.DEFAULT_ACC[dtype]
    for eps in (0.0, 1e-8):
        r = K.normalize_rows(x, eps)
        assert r.xhat.dtype == np.dtype(acc)
        assert r.cs.shape == r.ns.shape == r.m.shape == (50, 1)
        xw = np.asarray(x).astype(np.longdouble)
        with np.errstate(all="ignore"):
            m = np.max(np.abs(xw), axis=1, keepdims=True)
            n = np.sqrt(np.sum((xw / m) ** 2, axis=1, keepdims=True)) * m
            want = np.where(np.maximum(n, eps) == 0, 0, xw / np.maximum(n, eps)).astype(np.float64)
        ok = np.isfinite(want)
        np.testing.assert_allclose(wide(r.xhat)[ok], want[ok], rtol=4 * np.finfo(acc).eps, atol=0)
        assert np.all(np.isnan(r.xhat[4]))
        assert np.all(r.xhat[3] == 0)
    # rows whose sums of squares are exact in any order (max|x| = 8): bitwise the core's
    y = rng.integers(-7, 8, (20, 12)).astype(np.float64)
    y[:, 0] = 8
    y = as_dtype(y, dtype)
    got = K.normalize_rows(y, 1e-8)
    want = _core.normalize_rows(np, y, 1e-8)
    assert same_values(got.xhat, np.asarray(want.xhat))
    assert same_values(got.ns, np.asarray(want.ns, dtype=got.ns.dtype))
    assert same_values(got.cs, np.asarray(want.cs, dtype=got.cs.dtype))


def _pairwise_rows(dtype: str, rows: int = 40, d: int = 37) -> np.ndarray:
    """Rows over many scales, a zero row, a row below eps, a NaN row, a huge and a tiny row (float64)."""
    rng = np.random.default_rng(31)
    x = rng.standard_normal((rows, d)) * np.exp(rng.uniform(-5, 5, (rows, 1)))
    x[3] = 0
    x[5] *= 1e-12 / np.linalg.norm(x[5])
    x[6, 4] = np.nan
    if dtype == "float64":
        x[7] *= 1e290
        x[8] *= 1e-300
    else:  # unscaled float32: 1 / c is subnormal (norm near max), or past max (subnormal row)
        x[7] = np.abs(x[7]) / np.abs(x[7]).max() * 3e38 * np.sign(x[7])
        x[8] = np.round(x[8] / np.abs(x[8]).max() * 8) * 2.0**-149
    return x.astype(dtype)


@pytest.mark.parametrize("dtype", ["float32", "float64"])
@pytest.mark.parametrize("work", [False, True])
def test_normalize_pair_is_normalize_rows_bitwise(dtype: str, work: bool) -> None:
    """normalize_pair: both inputs' rows in one call, the bits of normalize_rows (xhat rounded once with work)."""
    x1, x2 = _pairwise_rows(dtype, 40), _pairwise_rows(dtype, 23)[::-1].copy()
    for eps in (0.0, 1e-8):
        for second in (x2, None):
            xh, stats = K.normalize_pair(x1, second, eps, work=work, stats=True)
            parts = [K.normalize_rows(x, eps) for x in ((x1,) if second is None else (x1, second))]
            want = np.concatenate([r.xhat for r in parts])
            assert xh.dtype == (np.dtype(dtype) if work else np.float64)
            assert same_bits(xh, want.astype(xh.dtype))
            for i, field in enumerate(("cs", "ns", "m")):
                assert same_bits(stats[i], np.concatenate([getattr(r, field)[:, 0] for r in parts]))
            out = np.empty_like(xh)
            got, none = K.normalize_pair(x1, second, eps, work=work, out=out)
            assert got is out
            assert none is None
            assert same_bits(out, xh)


def test_address_is_ctypes_data() -> None:
    """``address`` (the buffer protocol where it applies) is ``ctypes.data`` for every kind of array."""
    import ml_dtypes

    base = np.arange(24, dtype=np.float32).reshape(4, 6)
    ro = base.copy()
    ro.flags.writeable = False
    arrays = [base, base[1:], base[:, 2:], base[::-1], base.T, ro, np.broadcast_to(base[0], (3, 6)),
              np.empty((0, 3)), np.zeros(5, ml_dtypes.bfloat16), np.full((), 2.0)]
    for a in arrays:
        assert K.address(a) == a.ctypes.data


def _quotients_are_divisions(x: np.ndarray, eps: float) -> None:
    """Float32 rows: the kernel's xhat is ``x / c`` correctly rounded (the core's division), on every clone."""
    results = []
    for isa in ("baseline", "avx2"):
        if not K.isa_available(isa):
            continue
        prev = K.set_isa(isa)
        try:
            xh, stats = K.normalize_pair(x, None, eps, stats=True, nthreads=1)
        finally:
            K.set_isa(prev)
        cs = stats[0][:, None]
        with np.errstate(all="ignore"):
            want = x.astype(np.float64) / np.where(cs == 0, 1.0, cs)
        assert same_bits(xh, want), isa
        results.append(xh)
    assert all(same_bits(r, results[0]) for r in results)


def test_float32_row_quotients_are_the_division() -> None:
    """Float32 rows normalised in float64: each ``x / c`` is the correctly rounded division
    (the core's), the same bits on every ISA clone, over half a million quotients: rows of 1
    to 4 values over float32's whole range (subnormals included), so that ``c`` takes every
    binade and every position in it, with ``eps`` inside the rows' range and far beyond it."""
    rng = np.random.default_rng(7)
    for d in (1, 2, 3, 4):
        mant = rng.uniform(-2.0, 2.0, (40_000, d))
        expo = rng.integers(-150, 128, (40_000, 1)) + rng.integers(-30, 1, (40_000, d))
        x = np.ldexp(mant, expo).astype(np.float32)
        x[:100] = rng.integers(-3, 4, (100, d))  # small integers: quotients of exact squares
        x[100] = 0
        x[101, 0] = np.nan
        x[102, 0] = np.inf
        for eps in (0.0, 1e-8, 1e300):
            _quotients_are_divisions(x, eps)


@settings(deadline=None)
@given(
    hnp.arrays(np.float32, st.tuples(st.integers(1, 5), st.integers(1, 40)),
               elements=st.floats(width=32, allow_nan=False, allow_infinity=False)),
    st.sampled_from([0.0, 1e-30, 1e-8, 1.0, 1e30, 1e250]),
)
def test_float32_row_quotients_are_the_division_on_any_rows(x: np.ndarray, eps: float) -> None:
    _quotients_are_divisions(x, eps)


def _normalize_vjp_reference(h: np.ndarray, v: np.ndarray, stats: np.ndarray, eps: float, rescaled: bool) -> np.ndarray:
    """_core.row_normalize_vjp's formula in long double on the same (rounded) h, v and statistics."""
    cs, ns, m = (np.asarray(stats[i], np.longdouble)[:, None] for i in range(3))
    if not rescaled:
        m = np.ones_like(m)
    hw, vw = h.astype(np.longdouble), v.astype(np.longdouble)
    with np.errstate(all="ignore"):
        proj = np.where(ns > eps / m, np.sum(hw * vw, axis=1, keepdims=True), 0)
        inv = np.where(cs == 0, 0, 1 / np.where(cs == 0, 1, cs))
        return ((vw - proj * hw) * inv) / m


@pytest.mark.parametrize("dtype", ["float32", "float64"])
@pytest.mark.parametrize("eps", [0.0, 1e-8])
def test_normalize_vjp_mirrors_core(dtype: str, eps: float) -> None:
    """normalize_vjp (rows.h-style row kernel) against _core.row_normalize_vjp and an exact reference.

    Not bitwise: the kernel sums <h, v> in the accumulation dtype (NumPy's vecdot
    in the product dtype), so each element may differ by the rounding of that
    sum; both are within a few ulp of the product dtype of the exact value.
    """
    x = _pairwise_rows(dtype)
    rng = np.random.default_rng(32)
    v = rng.standard_normal(x.shape)
    if dtype == "float32":  # gradients in range for the rows of norm near max (7) and subnormal (8)
        v[7] *= 2.0**100
        v[8] *= 2.0**-100
    v = v.astype(dtype)
    rescaled = dtype == "float64"
    h, stats = K.normalize_pair(x, None, eps, work=True, stats=True)
    want = _normalize_vjp_reference(h, v, stats, eps, rescaled)
    got = K.normalize_vjp(h, v.copy(), stats, eps, rescaled=rescaled)
    r = _core.normalize_rows(np, x, eps)
    core = np.asarray(_core.row_normalize_vjp(np, r, v, eps, h))
    tiny = np.finfo(dtype).eps
    scale = np.max(np.abs(np.where(np.isfinite(want), want, 0)), axis=1, keepdims=True)
    ok = np.isfinite(want)
    for arr in (got, core):
        assert arr.dtype == np.dtype(dtype)
        err = np.abs(arr.astype(np.longdouble) - want)
        assert np.all(np.where(ok, err <= 8 * tiny * scale, True))
    assert np.array_equal(np.isnan(got), np.isnan(core))  # the NaN row, only
    if dtype == "float32":  # 1 / c not a normal float32 (shifted by 2**64): checked above, and in range
        assert np.isfinite(got[7:9]).all()
        assert (got[7:9] != 0).all()
    assert np.all(np.isnan(got[6]))
    assert not np.isnan(np.delete(got, 6, axis=0)).any()
    # a zero row: linear below eps (v / eps), zero with eps = 0
    assert np.array_equal(got[3], core[3])
    assert (eps > 0 or not got[3].any())
    # the same bits on every thread count and ISA clone
    big = np.tile(x, (300, 1))
    hb, sb = K.normalize_pair(big, None, eps, work=True, stats=True)
    vb = np.tile(v, (300, 1))
    one = K.normalize_vjp(hb, vb.copy(), sb, eps, rescaled=rescaled, nthreads=1)
    assert same_bits(one, K.normalize_vjp(hb, vb.copy(), sb, eps, rescaled=rescaled, nthreads=5))
    for isa in ("baseline", "avx2"):
        if K.isa_available(isa):
            prev = K.set_isa(isa)
            try:
                assert same_bits(one, K.normalize_vjp(hb, vb.copy(), sb, eps, rescaled=rescaled, nthreads=1))
            finally:
                K.set_isa(prev)


_EDGES = [np.nan, np.inf, -np.inf, 0.0, -0.0, 1.0, -1.0, 1 + 2**-52, -1 - 2**-52, 1 - 2**-30, -1 + 2**-30,
          1 - 2**-25, 1e300, -1e300, 5e-324, -5e-324, 1e-40, 2.0**-149, 2.0**-150, 0.5 + 2**-25]


@given(hnp.arrays(np.float64, st.integers(0, 70), elements=st.one_of(st.floats(), st.sampled_from(_EDGES))))
def test_clamp_round_is_the_core_clamp_then_one_rounding(p: np.ndarray) -> None:
    """``clamp_round_ptr`` (the pairwise float32 tiles' last pass) against ``_core.pairwise_product``'s
    clamp and rounding: NaN kept, +-inf and beyond +-1 clamped, -0.0 kept, ties and subnormals rounded
    as NumPy casts; nothing written past ``n``."""
    p = np.concatenate([p, np.array(_EDGES)])
    out = np.full(p.size + 1, 7.0, np.float32)
    K.clamp_round_ptr(p.ctypes.data, p.size, out.ctypes.data)
    with np.errstate(all="ignore"):
        want = np.clip(p, -1.0, 1.0).astype(np.float32)
    assert same_bits(out[:-1], want)
    assert out[-1] == 7.0
    # a block of rows into a wider matrix (clamp_round_rows_ptr): that block written, nothing else
    rows, cols = 3, max(1, p.size // 3)
    block = np.ascontiguousarray(p[: rows * cols].reshape(rows, cols))
    big = np.full((rows + 1, cols + 5), 7.0, np.float32)
    K.clamp_round_rows_ptr(block.ctypes.data, rows, cols, big[:, 2:].ctypes.data, big.shape[1])
    assert same_bits(big[:rows, 2 : 2 + cols], want[: rows * cols].reshape(rows, cols))
    rest = big.copy()
    rest[:rows, 2 : 2 + cols] = 7.0
    assert np.all(rest == 7.0)


@pytest.mark.parametrize("dtype", ["float32", "float64"])
@pytest.mark.parametrize("self_similarity", [False, True])
@pytest.mark.parametrize("n", [3, 40, 300, 800])
def test_numpy_pairwise_lean_path_matches_general_path(dtype: str, self_similarity: bool, n: int) -> None:
    """The NumPy backend's lean 2-D path: the general path's forward bits, its gradients to rounding;
    from the forward's residuals (``keep``), the gradients of the path that normalises again, bitwise.
    At n = 800 a float32 product is formed in float64 blocks (of rows; of columns too with x2)."""
    from polycos._backends import numpy as nb

    x1 = np.tile(_pairwise_rows(dtype), (n // 40 + 1, 1))[:n]
    x2 = None if self_similarity else np.tile(_pairwise_rows(dtype, 23)[::-1], (1 + (n + 300) // 23, 1))[: max(23, n + 300)]
    m = n if x2 is None else x2.shape[0]
    if n == 800 and dtype == "float32":  # the blocks are really used: rows, and columns (m = 1100) with x2
        assert K.product_blocks(n, m)[0] < n
        assert x2 is None or K.product_blocks(n, m)[1] < m
    g = np.random.default_rng(33).standard_normal((n, m)).astype(dtype)
    for eps in (0.0, 1e-8):
        with np.errstate(all="ignore"):
            s = nb._forward_2d(K, x1, x2, eps)
            want = _core.pairwise_forward(np, x1, x2, eps, native_product=nb._product,
                                          native_normalize=nb._normalize())[0]
            assert s.dtype == np.dtype(dtype)
            assert same_bits(s, want)
            got = nb._vjp_2d(K, g, x1, x2, eps)
            ref = _core.pairwise_vjp(np, g, x1, x2, eps, native_normalize=nb._normalize())
            kept, residuals = nb._forward_2d(K, x1, x2, eps, keep=True)
            assert same_bits(kept, want)
            again = nb._vjp_2d(K, g, x1, x2, eps, residuals)
        for a, b in zip(got, again, strict=True):
            assert (a is None and b is None) or same_bits(a, b)
        for a, b in zip(got, ref, strict=True):
            if b is None:
                assert a is None
                continue
            assert a.dtype == b.dtype == np.dtype(dtype)
            assert a.shape == b.shape
            assert np.array_equal(np.isnan(a), np.isnan(b))
            fin = np.isfinite(b)
            scale = np.max(np.abs(np.where(fin, b, 0)), axis=1, keepdims=True)
            tol = 64 * np.finfo(dtype).eps * (scale + np.abs(b))
            assert np.all(np.where(fin, np.abs(a - b) <= tol, True))


# --------------------------------------------------------------------------- determinism


def _run_all(x1: np.ndarray, x2: np.ndarray, dim: int, nthreads: int) -> list[np.ndarray]:
    out, res = K.forward(x1, x2, dim, 1e-8, nthreads=nthreads)
    g = np.linspace(-1, 1, out.size).reshape(out.shape).astype(x1.dtype)
    d1, d2 = K.backward(g, x1, x2, dim, 1e-8, res, nthreads=nthreads)
    e1, e2 = K.backward(g, x1, x2, dim, 1e-8, nthreads=nthreads)  # recomputed statistics
    bare = K.forward(x1, x2, dim, 1e-8, want_res=False, nthreads=nthreads)[0]  # the forward without norms
    outs = [out, res, d1, d2, e1, e2, bare]
    if dim == x1.ndim - 1:
        outs += list(K.normalize_rows(x1, 1e-8, nthreads=nthreads))
    return outs


def _big_inputs(dtype: str, layout: str) -> tuple[np.ndarray, np.ndarray, int]:
    """Enough rows for 7 threads; one row that needs the range rescue (rescaling dtypes)."""
    rng = np.random.default_rng(21)
    a = rng.standard_normal((6000, 129)) * np.exp(rng.uniform(-3, 3, (6000, 1)))
    b = rng.standard_normal((6000, 129))
    a[7] *= {"float16": 1.0, "bfloat16": 1e30, "float32": 1e30, "float64": 1e200}[dtype]
    x1, x2 = as_dtype(a, dtype), as_dtype(b, dtype)
    if layout == "column":
        return np.ascontiguousarray(x1.T), np.ascontiguousarray(x2.T), 0
    if layout == "strided":
        return x1[:, ::-1], x2[::-1], 1
    if layout == "short":  # dense rows of 16: the dense loops (60000 rows, so that threads split them)
        return np.tile(x1[:, :16], (10, 1)), np.tile(x2[:, :16], (10, 1)), 1
    return x1, x2, 1


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("layout", ["row", "column", "strided", "short"])
def test_bitwise_across_thread_counts(dtype: str, layout: str) -> None:
    """G8/G13: the same bits for 1, 2, 3 and 7 threads (rows split at different places)."""
    x1, x2, dim = _big_inputs(dtype, layout)
    ref = _run_all(x1, x2, dim, 1)
    for nt in (2, 3, 7):
        for a, b in zip(ref, _run_all(x1, x2, dim, nt), strict=True):
            assert same_bits(a, b), nt


def test_strided_layout_has_the_row_layouts_bits() -> None:
    """The strided loop sums in the row loop's order: bitwise equal results."""
    rng = np.random.default_rng(2)
    x1 = rng.standard_normal((50, 300)).astype(np.float32)
    x2 = rng.standard_normal((50, 300)).astype(np.float32)
    gap1 = np.zeros((50, 900), np.float32)
    gap1[:, ::3] = x1
    out, res = K.forward(x1, x2, 1, 1e-8)
    out2, res2 = K.forward(gap1[:, ::3], x2, 1, 1e-8)
    assert same_bits(out, out2)
    assert same_bits(res, res2)


def _lanes(dtype: str, acc: str) -> int:
    """The kernel's lanes per row step (cpu.cpp Cfg::L): 64 bytes of accumulators."""
    return 64 // np.dtype(acc).itemsize


def _operand(a: np.ndarray) -> tuple[int, tuple[int, ...], tuple[int, ...]]:
    return a.ctypes.data, a.shape, tuple(s // a.itemsize for s in a.strides)


@settings(max_examples=60, deadline=None)
@given(
    dtype_acc=st.sampled_from([("float16", "float32"), ("bfloat16", "float32"), ("float32", "float64"),
                               ("float32", "float32"), ("float64", "float64")]),
    steps=st.sampled_from([1, 2, 3, 4]),
    rows=st.integers(1, 40),
    eps=st.sampled_from([0.0, 1e-8, 0.5, 3.0]),
    out_step=st.sampled_from([1, 2]),
    seed=st.integers(0, 2**32 - 1),
)
def test_dense_short_rows_have_the_general_loops_bits(dtype_acc, steps, rows, eps, out_step, seed) -> None:
    """Dense rows of L, 2L, 4L elements take unrolled loops (forward_dense_rows,
    backward_dense_rows), and a forward without residuals skips the norms of rows above
    eps (quotient_above): the same bits as the general loops (a strided view of the same
    rows) with residuals, for rows of every kind (zero, at eps, rescued, non-finite), any
    count (partial groups), a strided result and a broadcast upstream gradient, in every
    ISA clone."""
    dtype, acc = dtype_acc
    d = steps * _lanes(dtype, acc)
    rng = np.random.default_rng(seed)
    scale = np.exp(rng.uniform(-4, 4, (rows, 1)))
    a = rng.standard_normal((rows, d)) * scale
    b = rng.standard_normal((rows, d))
    top = float(np.finfo(np.float64 if dtype == "float64" else np.float32).max)
    kinds = rng.integers(0, 8, rows)
    for r, k in enumerate(kinds):
        if k == 1:
            a[r] = 0
        elif k == 2:  # norm exactly eps, and one ulp either side
            a[r] = 0
            a[r, 0] = np.nextafter(eps, [0.0, np.inf][r % 2]) if r % 3 else eps
        elif k == 3 and dtype in ("bfloat16", "float32", "float64"):
            a[r] = a[r] / np.abs(a[r]).max() * (top / 8)  # sums of squares overflow: rescued
        elif k == 4:
            a[r, rng.integers(d)] = [np.nan, np.inf, -np.inf][r % 3]
    with np.errstate(all="ignore"):
        x1, x2 = as_dtype(a, dtype), as_dtype(b, dtype)
    gap1 = np.zeros((rows, 3 * d), x1.dtype)
    gap1[:, ::3] = x1
    out_ref = np.zeros(rows, x1.dtype)
    res = np.zeros((rows, 5), acc)
    K.forward_ptr(dtype, acc, _operand(gap1[:, ::3]), _operand(x2), 1, eps, _operand(out_ref), res.ctypes.data, 1)
    # The VJP (backward_dense_rows): from the residuals and recomputing them, against the
    # general loop on the strided view; g with zeros, huge and tiny entries, sometimes broadcast.
    gw = rng.standard_normal(rows) * np.exp(rng.uniform(-30, 30, rows))
    gw[rng.integers(0, 8, rows) == 0] = 0
    with np.errstate(all="ignore"):
        g = as_dtype(gw, dtype)
    g = np.broadcast_to(g[:1], g.shape) if out_step == 2 else g
    grads_ref = {}
    for res_ptr in (res.ctypes.data, 0):
        e1, e2 = np.zeros_like(x1), np.zeros_like(x2)
        K.backward_ptr(dtype, acc, dtype, _operand(g), _operand(gap1[:, ::3]), _operand(x2), 1, eps, res_ptr,
                       _operand(e1), _operand(e2), 1)
        grads_ref[res_ptr] = (e1, e2)
    # The dense loops in every ISA clone this CPU runs (the general loop's bits are the same in
    # each: test_bitwise_across_isa_clones).
    prev = K.isa()
    try:
        for isa in [name for name in ("baseline", "avx2") if K.isa_available(name)]:
            K.set_isa(isa)
            for want_res in (False, True):
                buf = np.full(rows * out_step, 7, x1.dtype)
                out = buf[::out_step]
                res2 = np.zeros((rows, 5), acc)
                K.forward_ptr(dtype, acc, _operand(x1), _operand(x2), 1, eps, _operand(out),
                              res2.ctypes.data if want_res else 0, 1)
                assert same_bits(out, out_ref), (isa, want_res)
                assert np.all(buf.reshape(rows, out_step)[:, 1:] == 7)  # nothing written between results
                if want_res:
                    assert same_bits(res2, res), isa
            for res_ptr, (e1, e2) in grads_ref.items():
                d1, d2 = np.zeros_like(x1), np.zeros_like(x2)
                K.backward_ptr(dtype, acc, dtype, _operand(g), _operand(x1), _operand(x2), 1, eps, res_ptr,
                               _operand(d1), _operand(d2), 1)
                assert same_bits(d1, e1), (isa, res_ptr)
                assert same_bits(d2, e2), (isa, res_ptr)
    finally:
        K.set_isa(prev)


@pytest.mark.skipif(not K.available() or not K.isa_available("avx2"), reason="no AVX2 clone on this CPU")
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("layout", ["row", "column", "strided", "short"])
def test_bitwise_across_isa_clones(dtype: str, layout: str) -> None:
    """The baseline x86-64 and the AVX2+FMA clones compute the same bits (set_isa = POLYCOS_CPU_ISA)."""
    x1, x2, dim = _big_inputs(dtype, layout)
    x1, x2 = x1[:300] if dim == 1 else x1[:, :300], x2[:300] if dim == 1 else x2[:, :300]
    prev = K.set_isa("baseline")
    try:
        base = _run_all(x1, x2, dim, 2)
        K.set_isa("avx2")
        fast = _run_all(x1, x2, dim, 2)
    finally:
        K.set_isa(prev)
    for a, b in zip(base, fast, strict=True):
        assert same_bits(a, b)


@pytest.mark.skipif(not K.available() or not K.isa_available("avx2"), reason="no AVX2 clone on this CPU")
@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
def test_half_conversions_across_isa_clones(dtype: str) -> None:
    """Every 16-bit pattern (subnormals, inf, NaN) widens and narrows to the same bits in both
    clones (the AVX2 clone converts float16 with F16C, the baseline with integer code).

    NaN payloads may differ where several NaNs meet: x86 returns the first operand's NaN and
    the compiler orders commutative operands freely (IEEE leaves the payload unspecified), so
    NaN compares equal to NaN here; every other value compares bit for bit."""
    bits = np.arange(1 << 16, dtype=np.uint16)
    x1 = bits.view(np_dtype(dtype)).reshape(-1, 16)
    x2 = np.roll(bits, 1).view(np_dtype(dtype)).reshape(-1, 16)
    g = np.linspace(-3, 3, x1.shape[0]).astype(np_dtype(dtype))
    # (narrowing of every value: xhat-like outputs written back in T via the gradient of
    # rows (x, 1) against (1, 0): d1 = g * (e1 - s x / |x|) / |x| spans the range)
    base, fast = _outputs_per_isa(x1, x2, g, 0.0)
    for a, b in zip(base, fast, strict=True):
        assert same_values(a, b)


def _outputs_per_isa(x1: np.ndarray, x2: np.ndarray, g: np.ndarray, norm_eps: float) -> list[list[np.ndarray]]:
    """Forward, residuals, both gradients and the row normalisation of ``x1``, by the baseline
    and then the AVX2 clone (rows along axis 1, eps 1e-8; ``norm_eps`` for the normalisation)."""
    outs = []
    prev = K.set_isa("baseline")
    try:
        for isa in ("baseline", "avx2"):
            K.set_isa(isa)
            with np.errstate(all="ignore"):
                out, res = K.forward(x1, x2, 1, 1e-8)
                d = K.backward(g, x1, x2, 1, 1e-8, res)
                n = K.normalize_rows(x1, norm_eps)
            outs.append([out, res, *d, *n])
    finally:
        K.set_isa(prev)
    return outs


def test_concurrent_calls() -> None:
    """Thread-safe from the first call: calls from several Python threads agree."""
    x1, x2, dim = _big_inputs("float32", "row")
    want = K.forward(x1, x2, dim, 1e-8, nthreads=2)[0]
    results: list[np.ndarray] = []

    def work() -> None:
        for _ in range(3):
            results.append(K.forward(x1, x2, dim, 1e-8, nthreads=2)[0])

    threads = [threading.Thread(target=work) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(results) == 12
    assert all(same_bits(r, want) for r in results)


def test_ftz_daz_caller_thread() -> None:
    """A caller running with flush-to-zero / denormals-are-zero gets the IEEE results."""
    torch = pytest.importorskip("torch")
    x1 = np.array([[3e-39, 4e-39, 0.0], [1e-40, 0.0, 2e-40]], dtype=np.float32)  # subnormal inputs
    x2 = np.array([[1e-39, 1e-39, 1e-39], [1e-40, 1e-40, 0.0]], dtype=np.float32)
    want = K.forward(x1, x2, 1, 0.0)
    wg = K.backward(np.ones(2, np.float32), x1, x2, 1, 0.0, want[1])
    if not torch.set_flush_denormal(True):
        pytest.skip("this CPU cannot flush denormals")
    try:
        got = K.forward(x1, x2, 1, 0.0)
        gg = K.backward(np.ones(2, np.float32), x1, x2, 1, 0.0, got[1])
        assert np.float32(1e-40) * np.float32(1) == 0  # the caller's thread does flush
    finally:
        torch.set_flush_denormal(False)
    assert same_bits(want[0], got[0])
    assert same_bits(want[1], got[1])
    assert same_bits(wg[0], gg[0])
    assert same_bits(wg[1], gg[1])
    assert_matches_reference(got[0], x1, x2, 1, 0.0)


# --------------------------------------------------------------------------- shapes, strides, sizes


@given(
    hnp.mutually_broadcastable_shapes(num_shapes=2, min_dims=1, max_dims=5, max_side=3),
    st.data(),
)
def test_broadcasts_and_transposes(shapes, data) -> None:
    """Any broadcast and transposed/reversed storage: equal to the contiguous computation."""
    rng = np.random.default_rng(0)
    full = shapes.result_shape
    dim = data.draw(st.integers(0, len(full) - 1))
    xs = []
    for shape in shapes.input_shapes:
        x = rng.standard_normal(shape).astype(np.float64)
        perm = data.draw(st.permutations(range(len(shape))))
        x = np.ascontiguousarray(x.transpose(perm)).transpose(np.argsort(perm))  # same values, permuted strides
        if x.ndim and data.draw(st.booleans()):
            x = np.flip(np.flip(x, 0).copy(), 0)
        xs.append(x)
    dense = [np.ascontiguousarray(np.broadcast_to(x, full)) for x in xs]
    out, res = K.forward(*xs, dim, 1e-8)
    assert_matches_reference(out, *dense, dim, 1e-8)
    g = rng.standard_normal(out.shape)
    d1, d2 = K.backward(g, *xs, dim, 1e-8, res)
    e1, e2 = K.backward(g, *dense, dim, 1e-8)
    for d, e in ((d1, e1), (d2, e2)):  # other layouts sum in other orders: ulps apart
        np.testing.assert_allclose(d, e, rtol=1e-12, atol=1e-12 * float(np.max(np.abs(e), initial=0)))


def test_fragmented_layout_falls_back_to_copies() -> None:
    """More unmergeable batch dims than the kernel walks: NeedContiguous, then contiguous copies."""
    k = K.max_batch_dims() // 2 + 1  # 2k > max_batch_dims batch dims, none mergeable
    s1 = (2, 1) * k + (5,)
    s2 = (1, 2) * k + (5,)
    rng = np.random.default_rng(1)
    x1, x2 = rng.standard_normal(s1), rng.standard_normal(s2)
    full = np.broadcast_shapes(s1, s2)
    strides = [tuple(s // 8 for s in np.broadcast_to(x, full).strides) for x in (x1, x2)]
    with pytest.raises(K.NeedContiguous):
        K._test_row_offsets(full, len(full) - 1, strides, 0)
    out, res = K.forward(x1, x2, -1, 1e-8)
    assert_matches_reference(out, x1, x2, -1, 1e-8)
    d1, d2 = K.backward(np.ones(out.shape), x1, x2, -1, 1e-8, res)
    e1, e2 = K.backward(np.ones(out.shape), *(np.ascontiguousarray(np.broadcast_to(x, full)) for x in (x1, x2)), -1, 1e-8)
    np.testing.assert_allclose(d1, e1, rtol=1e-14)
    np.testing.assert_allclose(d2, e2, rtol=1e-14)


def test_empty_results_do_no_work() -> None:
    """An empty result returns at once, even against a huge broadcast partner; n = 0 rows give 0."""
    huge = np.broadcast_to(np.float32(1), (1, 10**12))
    t = time.perf_counter()
    out, res = K.forward(np.ones((0, 1), np.float32), huge, 1, 1e-8)
    d1, _d2 = K.backward(np.ones(0, np.float32), np.ones((0, 1), np.float32), huge, 1, 1e-8, res)
    assert time.perf_counter() - t < 1.0
    assert out.shape == (0,)
    assert res.shape == (0, 5)
    assert d1.shape == (0, 10**12)
    out, res = K.forward(np.ones((4, 0), np.float64), np.ones((4, 0)), 1, 1e-8)
    assert np.all(out == 0)
    out, res = K.forward(np.ones((0, 3)), np.ones((0, 3)), 0, 0.0)
    assert np.all(out == 0)
    assert out.shape == (3,)
    assert K.forward(np.float32(2), np.float32(-3), 0, 1e-8)[0].shape == ()


def test_long_row_64bit_lengths() -> None:
    """A row of 2**31 + 8 elements (stride-0 views: no memory): 64-bit loop counters."""
    n = 2**31 + 8
    x1 = np.broadcast_to(np.float32(1.5), (n,))
    x2 = np.broadcast_to(np.float32(-0.25), (n,))
    out, res = K.forward(x1, x2, 0, 1e-8, nthreads=1)  # float64 sums: exact here
    assert out == -1.0
    assert res[1] == math.sqrt(2.25 * n)
    assert res[2] == math.sqrt(0.0625 * n)


@given(
    st.lists(st.integers(1, 1 << 20), min_size=4, max_size=4),
    st.lists(st.integers(-(1 << 24), 1 << 24), min_size=4, max_size=4),
    st.data(),
)
def test_row_offsets_past_2_31(sizes, strides, data) -> None:
    """The row iterator's offsets (64-bit) for > 2**33 rows against a Python model."""
    sizes[0] = max(sizes[0], (1 << 33) // math.prod(sizes[1:]) + 1)
    shape = (*sizes, 3)
    rows = math.prod(sizes)
    assume(rows * 3 < 1 << 62)  # element counts are signed 64-bit
    row = data.draw(st.integers(0, rows - 2))
    full = (*strides, 1)
    other = (*[s * 3 for s in strides[::-1]], 0)
    got, nxt = K._test_row_offsets(shape, 4, [full, other], row)

    def model(r: int) -> tuple[int, int]:
        idx = []
        for z in reversed(sizes):
            idx.append(r % z)
            r //= z
        idx.reverse()
        return (sum(i * s for i, s in zip(idx, strides, strict=True)),
                sum(i * s for i, s in zip(idx, other[:4], strict=True)))

    assert got == model(row)
    assert nxt == model(row + 1)


# --------------------------------------------------------------------------- API


def test_num_threads(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("POLYCOS_NUM_THREADS", raising=False)
    assert K.num_threads() >= 1
    assert K.num_threads(3) == 3
    monkeypatch.setenv("POLYCOS_NUM_THREADS", "5")
    assert K.num_threads() == 5
    monkeypatch.setenv("POLYCOS_NUM_THREADS", "zero")
    with pytest.raises(ValueError, match="POLYCOS_NUM_THREADS"):
        K.num_threads()
    with pytest.raises(ValueError, match="nthreads"):
        K.num_threads(0)


def test_bad_arguments() -> None:
    with pytest.raises(TypeError, match="supports"):
        K.forward(np.ones(3, np.int32), np.ones(3, np.int32), 0, 1e-8)
    with pytest.raises(TypeError, match="one dtype"):
        K.forward(np.ones(3, np.float32), np.ones(3), 0, 1e-8)
    with pytest.raises(ValueError, match="broadcast"):
        K.forward(np.ones((2, 3)), np.ones((4, 3)), 1, 1e-8)
    with pytest.raises(IndexError):
        K.forward(np.ones((2, 3)), np.ones((2, 3)), 2, 1e-8)
    with pytest.raises(TypeError, match="unsupported"):
        K.forward(np.ones(3, np.float16), np.ones(3, np.float16), 0, 1e-8, acc_dtype=np.float64)


def test_pointer_api_matches_numpy_api() -> None:
    """forward_ptr / backward_ptr (the torch adapter's entry) write what forward / backward return."""
    rng = np.random.default_rng(4)
    x1 = rng.standard_normal((6, 40)).astype(np.float32)
    x2 = rng.standard_normal((1, 40)).astype(np.float32)
    out, res = K.forward(x1, x2, 1, 1e-8)
    o = np.empty(6, np.float32)
    r = np.empty((6, 5), np.float64)

    def op(x: np.ndarray) -> K.Operand:
        return (x.ctypes.data, x.shape, tuple(s // x.itemsize for s in x.strides))

    K.forward_ptr("float32", "float64", op(x1), op(x2), 1, 1e-8, op(o), r.ctypes.data, 1)
    assert same_bits(o, out)
    assert same_bits(r, res)
    g = np.ones(6, np.float32)
    d1, d2 = np.empty((6, 40), np.float32), np.empty((6, 40), np.float32)
    K.backward_ptr("float32", "float64", "float32", op(g), op(x1), op(x2), 1, 1e-8, r.ctypes.data,
                   op(d1), op(d2), 1)
    e1, e2 = K.backward(g, x1, x2, 1, 1e-8, res)
    assert same_bits(d1, e1)
    assert same_bits(d2, e2)


# --------------------------------------------------------------------------- JAX FFI


@pytest.fixture(scope="module")
def jax():
    jax = pytest.importorskip("jax")
    K.register_jax()
    return jax


@pytest.mark.parametrize("dtype", ["float16", "bfloat16", "float32"])
def test_jax_ffi_matches_numpy_bitwise(jax, dtype: str) -> None:
    """The XLA FFI handlers under jit (and vmap) compute the NumPy path's bits."""
    import jax.numpy as jnp

    rng = np.random.default_rng(8)
    a = as_dtype(rng.standard_normal((5, 6, 33)), dtype)
    b = as_dtype(rng.standard_normal((6, 33)), dtype)
    acc = K._jax_acc(a.dtype)
    want_out, want_res = K.forward(a, b, 2, 1e-8, acc_dtype=acc)
    out, res = jax.jit(lambda x, y: K.jax_forward(x, y, 2, 1e-8))(jnp.asarray(a), jnp.asarray(b))
    assert same_bits(np.asarray(out), want_out)
    assert same_bits(np.asarray(res), want_res)
    g = as_dtype(rng.standard_normal(want_out.shape), dtype)
    wd = K.backward(g, a, b, 2, 1e-8, want_res)
    for r in (res, None):
        d = jax.jit(lambda g_, x, y, rr=r: K.jax_backward(g_, x, y, rr, 2, 1e-8))(jnp.asarray(g), jnp.asarray(a), jnp.asarray(b))
        assert same_bits(np.asarray(d[0]), wd[0])
        assert same_bits(np.asarray(d[1]), wd[1])
    # vmap over the leading axis of x1 only (x2 unbatched: a unit dim, broadcast by the handler)
    vout, vres = jax.jit(jax.vmap(lambda x: K.jax_forward(x, jnp.asarray(b), 1, 1e-8)))(jnp.asarray(a))
    assert same_bits(np.asarray(vout), want_out)
    assert same_bits(np.asarray(vres), want_res)
    # vmap over the cotangent only (as jacrev does)
    gs = as_dtype(rng.standard_normal((3, *want_out.shape)), dtype)
    vd = jax.vmap(lambda g_: K.jax_backward(g_, jnp.asarray(a), jnp.asarray(b), res, 2, 1e-8))(jnp.asarray(gs))
    for i in range(3):
        w = K.backward(gs[i], a, b, 2, 1e-8, want_res)
        assert same_bits(np.asarray(vd[0][i]), w[0])
        assert same_bits(np.asarray(vd[1][i]), w[1])
    # normalize_rows
    nr = jax.jit(lambda x: K.jax_normalize_rows(x, 1e-8))(jnp.asarray(a))
    wn = K.normalize_rows(a, 1e-8, acc_dtype=acc)
    for u, v in zip(nr, wn, strict=True):
        assert same_bits(np.asarray(u), v)


def test_jax_float32_result_is_numpys_differentiated_or_not(jax) -> None:
    """Without x64, float32 ``s`` under ``jax.vjp`` (the forward that keeps float32
    residuals) is the value-only call's and NumPy's, bit for bit; so is the gradient."""
    import jax.numpy as jnp

    import polycos

    if jax.dtypes.canonicalize_dtype(np.float64) == np.dtype(np.float64):
        pytest.skip("x64 is on: float32 accumulates in float64 anyway")
    rng = np.random.default_rng(12)
    a = rng.standard_normal((9, 33)).astype(np.float32)
    b = rng.standard_normal((9, 33)).astype(np.float32)
    g = rng.standard_normal(9).astype(np.float32)
    want = polycos.cosine_similarity(a, b)
    value = jax.jit(polycos.cosine_similarity)(jnp.asarray(a), jnp.asarray(b))
    s, pull = jax.vjp(jax.jit(polycos.cosine_similarity), jnp.asarray(a), jnp.asarray(b))
    assert same_bits(np.asarray(value), want)
    assert same_bits(np.asarray(s), want)
    _s, res = K.forward(a, b, 1, 1e-8, acc_dtype=np.float32)
    want_grads = K.backward(g, a, b, 1, 1e-8, res)
    for got, w in zip(pull(jnp.asarray(g)), want_grads, strict=True):
        assert same_bits(np.asarray(got), w)


def test_jax_ffi_x64(jax) -> None:
    """With x64 on, float32 accumulates in float64 (as NumPy) and float64 runs too."""
    import jax.numpy as jnp

    rng = np.random.default_rng(10)
    with jax.enable_x64(True):
        for dtype in ("float32", "float64"):
            a = rng.standard_normal((7, 20)).astype(dtype)
            b = rng.standard_normal((7, 20)).astype(dtype)
            out, res = jax.jit(lambda x, y: K.jax_forward(x, y, 0, 0.0))(jnp.asarray(a), jnp.asarray(b))
            assert res.dtype == np.float64
            want = K.forward(a, b, 0, 0.0)
            assert same_bits(np.asarray(out), want[0])
            assert same_bits(np.asarray(res), want[1])


@settings(max_examples=15)
@given(cases(dtypes=("float32",), min_dims=1, max_side=5))
def test_jax_ffi_any_broadcast(jax, case) -> None:
    """Broadcasting inputs of different ranks through the handler: the NumPy bits."""
    import jax.numpy as jnp

    x1, x2, dim, eps = case
    want = K.forward(np.ascontiguousarray(x1), np.ascontiguousarray(x2), dim, eps, acc_dtype=K._jax_acc(np.float32))
    got = jax.jit(lambda x, y: K.jax_forward(x, y, dim, eps))(jnp.asarray(x1), jnp.asarray(x2))
    assert same_values(np.asarray(got[0]), want[0])


@pytest.mark.skipif(not K.available() or not K.isa_available("avx2"), reason="no AVX2 clone on this CPU")
@settings(max_examples=30, deadline=None)
@given(
    dtype=st.sampled_from(["float16", "float32"]),
    d=st.sampled_from([1, 7, 16, 37, 256]),
    seed=st.integers(0, 2**32 - 1),
)
def test_fused_exact_products_are_the_separate_ones(dtype: str, d: int, seed: int) -> None:
    """(float16, float32) and (float32, float64) sums add each exact product with one fused
    multiply-add in the AVX2 clone, a multiply and an add in the baseline: the same bits over
    the whole range of the dtype (subnormal to largest finite, zero rows, rows that need no
    rescue by construction), forward, its residuals, the VJP and the row normalisation."""
    rng = np.random.default_rng(seed)
    info = np.finfo(np_dtype(dtype))
    lo, hi = math.log2(float(info.smallest_subnormal)), math.log2(float(info.max))
    n = 64

    def draw() -> np.ndarray:
        x = np.exp2(rng.uniform(lo, hi, (n, d))) * rng.choice([-1.0, 1.0], (n, d))
        x[rng.random((n, d)) < 0.2] = 0.0
        x[::9] = 0.0
        return x.astype(np_dtype(dtype))

    x1, x2 = draw(), draw()
    g = rng.standard_normal(n).astype(np_dtype(dtype))
    base, fast = _outputs_per_isa(x1, x2, g, 1e-8)
    for a, b in zip(base, fast, strict=True):
        assert same_bits(a, b)


# --------------------------------------------------------------------------- huge-page advice


def test_huge_page_advice_is_a_hint() -> None:
    """``advise_huge_pages_ptr`` changes no data, accepts any span (below 4 MiB it does nothing),
    and rejects a negative length naming the kernel's status."""
    x = np.arange(3 << 20, dtype=np.float32)  # 12 MiB, written before the advice
    before = x.copy()
    K.advise_huge_pages_ptr(K.address(x), x.nbytes)
    K.advise_huge_pages_ptr(K.address(x), 100)
    K.advise_huge_pages_ptr(K.address(x), 0)
    np.testing.assert_array_equal(x, before)
    with pytest.raises(K.KernelError, match="shapes do not broadcast"):
        K.advise_huge_pages_ptr(K.address(x), -1)


_STREAM_PAIRS = [("float16", "float32"), ("bfloat16", "float32"), ("float32", "float64"),
                 ("float32", "float32"), ("float64", "float64")]


def _touched_lines(shape: tuple[int, ...], dtype, offset: int = 0) -> np.ndarray:
    """An array written (so in memory: not np.zeros, whose pages may not be) starting ``offset``
    bytes after a 64-byte line."""
    dtype = np.dtype(dtype)
    buf = np.empty(math.prod(shape) * dtype.itemsize + 128, np.uint8)
    buf.fill(0)
    start = -buf.ctypes.data % 64 + offset
    return buf[start : start + math.prod(shape) * dtype.itemsize].view(dtype).reshape(shape)


@pytest.mark.parametrize(("dtype", "acc"), _STREAM_PAIRS)
@pytest.mark.parametrize("out", ["dtype", "acc"])
@pytest.mark.parametrize("d", [16, 64, 256])
def test_streamed_gradients_are_the_regular_ones_bitwise(dtype: str, acc: str, out: str, d: int) -> None:
    """The VJP's streaming stores (cpu.cpp ``Call::stream``) write the bits regular stores write,
    on plain, rescaled (one row near the top of the range) and shifted rows (a cotangent near the
    top of the range), on one and on three threads; they are used only where every gradient row
    starts a 64-byte line, the gradients exceed the threshold and their pages are in memory.
    Mutation check: a bit flipped in a streamed value, or streaming without the alignment test,
    fails it."""
    rng = np.random.default_rng(d)
    odt = dtype if out == "dtype" else acc
    rows = 3 * 1024 * 64 // d  # 192 KiB of float32 gradient: 16, 64 and 256 cover the dense and row loops
    a = rng.standard_normal((rows, d)) * np.exp(rng.uniform(-3, 3, (rows, 1)))
    b = rng.standard_normal((rows, d))
    if (dtype, acc) != ("float16", "float32"):
        a[7] *= {"bfloat16": 1e30, "float32": 1e30, "float64": 1e200}[dtype]
    x1, x2 = as_dtype(a, dtype), as_dtype(b, dtype)
    _, res = K.forward(x1, x2, 1, 1e-8, acc_dtype=acc)
    g = np.linspace(-1, 1, rows).astype(np_dtype(acc))
    g[3] = np.finfo(np_dtype(acc)).max / 4  # the shifted coefficients (p != 1), where they apply
    op = _operand  # (ptr, shape, strides in elements)

    def vjp(stream_bytes: int, nthreads: int, offset: int = 0, fresh: bool = False):
        d1, d2 = (_touched_lines((rows, d), np_dtype(odt), offset) for _ in range(2))
        if fresh:  # new pages, never written: not in memory
            maps = [mmap.mmap(-1, d1.nbytes + 64) for _ in range(2)]
            d1, d2 = (np.frombuffer(m, np_dtype(odt), rows * d).reshape(rows, d) for m in maps)
        before = K.stream_calls()
        K.set_stream_bytes(stream_bytes)
        try:
            K.backward_ptr(dtype, acc, odt, op(g), op(x1), op(x2), 1, 1e-8, K.address(res), op(d1), op(d2),
                           nthreads, g_dtype=acc)
        finally:
            K.set_stream_bytes(None)
        return d1.copy(), d2.copy(), K.stream_calls() - before

    whole_lines = d * np.dtype(np_dtype(odt)).itemsize % 64 == 0  # else no row but the first starts a line
    r1, r2, n = vjp(1 << 62, 1)
    assert n == 0
    for nthreads in (1, 3):
        s1, s2, n = vjp(0, nthreads)
        assert n == whole_lines, "aligned, resident gradients above the threshold stream"
        assert same_bits(s1, r1)
        assert same_bits(s2, r2)
    u1, u2, n = vjp(0, 1, offset=16)
    assert n == 0, "rows 16 bytes into a line do not stream"
    assert same_bits(u1, r1)
    assert same_bits(u2, r2)
    f1, f2, n = vjp(0, 1, fresh=True)
    assert n == 0, "gradients in new pages do not stream"
    assert same_bits(f1, r1)
    assert same_bits(f2, r2)
    assert vjp(r1.nbytes * 2 + 1, 1)[2] == 0, "below the threshold: regular stores"
    assert vjp(r1.nbytes * 2, 1)[2] == whole_lines


def test_stream_threshold_is_half_the_l3() -> None:
    """The default streaming threshold: half of CPU 0's L3 as sysfs gives it (32 MiB if unknown)."""
    import glob

    l3 = 32 << 20
    for d in sorted(glob.glob("/sys/devices/system/cpu/cpu0/cache/index*")):
        with open(f"{d}/level") as f:
            if f.read().strip() != "3":
                continue
        with open(f"{d}/size") as f:
            size = f.read().strip()
        l3 = int(size[:-1]) << {"K": 10, "M": 20}[size[-1]] if size[-1] in "KM" else int(size)
        break
    K.set_stream_bytes(None)
    assert K.set_stream_bytes(12345) == l3 // 2
    assert K.set_stream_bytes(None) == 12345


_TORCH_PAIRWISE_FAULTS = """
import resource, sys, torch, polycos
from polycos._backends import torch as tb
torch.set_num_threads(1)
if sys.argv[1] == "off":
    tb._CpuKernels.advise_huge_pages = lambda self, t: None
rows = {"float32": (2048, 4096), "float64": (2048, 2048)}[sys.argv[2]]
a, b = (torch.randn(n, 64, dtype=getattr(torch, sys.argv[2])) for n in rows)
polycos.pairwise_cosine_similarity(a, b)  # first call: the cached tile, the temporaries' heap
f0 = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
s = polycos.pairwise_cosine_similarity(a, b)  # a new 32 MiB result
print(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - f0)
"""


def _thp_madvise() -> bool:
    try:
        with open("/sys/kernel/mm/transparent_hugepage/enabled") as f:
            return "[madvise]" in f.read()  # ("always" backs torch's memory with huge pages unasked)
    except OSError:
        return False


@pytest.mark.skipif(not _thp_madvise(), reason="needs Linux transparent huge pages in madvise mode")
@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_torch_pairwise_result_is_written_in_huge_pages(dtype: str) -> None:
    """torch allocates the pairwise result in 4 KiB pages, which the product (float32: blocks
    rounded into it; float64: ``matmul(out=)``) then first-touches one fault at a time (8192 per
    32 MiB); advised before it is written, the result takes a few dozen huge-page faults plus the
    4 KiB pages at its unaligned ends."""
    import subprocess
    import sys

    pytest.importorskip("torch")
    faults = {}
    for mode in ("off", "on"):
        proc = subprocess.run([sys.executable, "-c", _TORCH_PAIRWISE_FAULTS, mode, dtype], capture_output=True,
                              text=True, timeout=120)
        assert proc.returncode == 0, proc.stderr[-2000:]
        faults[mode] = int(proc.stdout.split()[-1])
    assert faults["off"] >= 8192, faults
    assert faults["on"] <= faults["off"] // 4, faults
