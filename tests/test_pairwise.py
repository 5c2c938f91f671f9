"""Pairwise similarity (issue 6, G9): values, gradients, detection, dask, memory."""

from __future__ import annotations

import importlib.util
import subprocess
import sys
import textwrap

import array_api_strict as xs
import numpy as np
import pytest
import scipy.spatial.distance
from hypothesis import assume, given
from hypothesis import strategies as st
from hypothesis.extra.array_api import make_strategies_namespace
from sklearn.metrics.pairwise import cosine_similarity as sk_cosine_similarity

import polycos
from polycos import _array_api, _core, _pairwise
from polycos._validate import validate
from polycos.testing import (
    assert_matches_reference,
    assert_vjp_matches_reference,
    reference_vjp,
)

xps = make_strategies_namespace(np)
finite = st.floats(-8, 8, width=32, allow_subnormal=False)
#: Measured error of the float64 matrix product (docs/pairwise.md): up to 5.5
#: ulp(1.0) for D up to 65536; float32 and float16 inputs keep G2 (1 ulp).
F64_ULPS = 8.0


def ulps_for(dtype: str) -> float:
    return F64_ULPS if dtype == "float64" else 1.0


def outer(x1, x2):
    """The broadcast spelling of ``pairwise(x1, x2)``: ``(..., N, 1, D)`` and ``(..., 1, M, D)``."""
    return x1[..., :, None, :], x2[..., None, :, :]


# --------------------------------------------------------------------------- strategies


@st.composite
def pairwise_inputs(draw, dtypes=("float32", "float64"), max_batch_dims=2, self_sim=None):
    """``(x1, x2 or None, eps)``: broadcastable batches of rows, with the hard cases mixed in."""
    dtype = draw(st.sampled_from(dtypes))
    batch = draw(
        xps.mutually_broadcastable_shapes(2, min_dims=0, max_dims=max_batch_dims, max_side=3)
    )
    n, m, d = draw(st.integers(0, 6)), draw(st.integers(0, 6)), draw(st.integers(0, 9))
    same = draw(st.booleans()) if self_sim is None else self_sim
    x1 = draw(xps.arrays(np.float64, (*batch.input_shapes[0], n, d), elements=finite))
    x2 = (
        None
        if same
        else draw(xps.arrays(np.float64, (*batch.input_shapes[1], m, d), elements=finite))
    )
    kind = draw(st.sampled_from(["random", "zero_rows", "scaled", "parallel", "nonfinite"]))
    rows = draw(st.lists(st.booleans(), min_size=n, max_size=n))
    mask = np.array(rows, dtype=bool).reshape(n, 1) if n else np.zeros((0, 1), dtype=bool)
    if kind == "zero_rows":
        x1 = np.where(mask, 0.0, x1)
    elif kind == "scaled":
        lo, hi = {"float16": (-10, 10), "float32": (-120, 120), "float64": (-1000, 1000)}[dtype]
        x1 = np.ldexp(x1, draw(st.integers(lo, hi)))
        x2 = None if x2 is None else np.ldexp(x2, draw(st.integers(lo, hi)))
    elif (
        kind == "parallel"
        and x2 is not None
        and n
        and m
        and x1.ndim <= x2.ndim
        and all(a in (1, b) for a, b in zip(x1.shape[::-1][2:], x2.shape[::-1][2:], strict=False))
    ):
        x2 = np.broadcast_to(x1[..., :1, :], x2.shape) * draw(st.sampled_from([1.0, -2.0, 1e-3]))
    elif kind == "nonfinite" and d:
        bad = draw(st.sampled_from([np.nan, np.inf, -np.inf]))
        x1 = np.where(mask & (np.arange(d) == 0), bad, x1)
    eps = draw(st.sampled_from([1e-8, 0.0, 0.5]))
    with np.errstate(over="ignore"):
        x1 = x1.astype(dtype)
        x2 = None if x2 is None else x2.astype(dtype)
    return x1, x2, eps


# --------------------------------------------------------------------------- peers


@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_matches_sklearn_zero_rows_included(dtype):
    rng = np.random.default_rng(0)
    x = rng.standard_normal((40, 17)).astype(dtype)
    y = rng.standard_normal((30, 17)).astype(dtype)
    x[[3, 11]] = 0
    y[[0, 29]] = 0
    tol = 1e-6 if dtype == "float32" else 1e-14
    for a, b in ((x, y), (x, None)):
        s = polycos.pairwise_cosine_similarity(a, b)
        assert s.dtype == np.dtype(dtype)
        np.testing.assert_allclose(s, sk_cosine_similarity(a, b), rtol=0, atol=tol)
    assert np.all(polycos.pairwise_cosine_similarity(x, y)[[3, 11]] == 0)


@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_matches_scipy_cdist(dtype):
    rng = np.random.default_rng(1)
    x = rng.standard_normal((25, 64)).astype(dtype)
    y = (rng.standard_normal((33, 64)) + 0.5).astype(dtype)
    expected = 1 - scipy.spatial.distance.cdist(
        x.astype(np.float64), y.astype(np.float64), metric="cosine"
    )
    tol = 1e-6 if dtype == "float32" else 1e-14
    np.testing.assert_allclose(polycos.pairwise_cosine_similarity(x, y), expected, rtol=0, atol=tol)
    s = polycos.cosine_similarity(x[:, None, :], y[None, :, :], dim=-1)
    np.testing.assert_allclose(s, expected, rtol=0, atol=tol)


# --------------------------------------------------------------------------- values (G1-G4, G6)


@given(pairwise_inputs())
def test_matches_reference(case):
    x1, x2, eps = case
    s = polycos.pairwise_cosine_similarity(x1, x2, eps=eps)
    assert s.dtype == x1.dtype
    b1, b2 = outer(x1, x1 if x2 is None else x2)
    assert_matches_reference(s, b1, b2, -1, eps, ulps=ulps_for(x1.dtype.name))


@given(pairwise_inputs(dtypes=("float16",)))
def test_float16_accumulates_in_float32(case):
    x1, x2, eps = case
    s = polycos.pairwise_cosine_similarity(x1, x2, eps=eps)
    assert s.dtype == np.float16
    b1, b2 = outer(x1, x1 if x2 is None else x2)
    assert_matches_reference(s, b1, b2, -1, eps)


@pytest.mark.parametrize("d", [1, 128, 4097, 65536])
def test_long_rows_float32_within_one_ulp(d):
    rng = np.random.default_rng(d)
    x = (rng.standard_normal((6, d)) + 3).astype(np.float32)
    y = (x[::-1] + 1e-3 * rng.standard_normal((6, d))).astype(np.float32)
    s = polycos.pairwise_cosine_similarity(x, y, eps=0.0)
    assert_matches_reference(s, *outer(x, y), -1, 0.0)


def test_identical_rows_give_exactly_one():
    x = np.random.default_rng(2).standard_normal((300, 50)).astype(np.float32)
    s = polycos.pairwise_cosine_similarity(x)
    assert s.max() <= 1.0
    assert np.all(np.diagonal(s) == 1.0)


@pytest.mark.parametrize(
    ("dtype", "scale"),
    [
        ("float32", 1e-30),
        ("float32", 1e36),
        ("float64", 1e-300),
        ("float64", 1e300),
        ("float16", 6e4 / 8),
    ],
)
def test_scale_safe(dtype, scale):
    rng = np.random.default_rng(3)
    x = rng.uniform(-1, 1, (5, 8))
    y = rng.uniform(-1, 1, (4, 8))
    expected = polycos.pairwise_cosine_similarity(x.astype(dtype), y.astype(dtype), eps=0.0)
    xs_, ys_ = (x * scale).astype(dtype), (y * scale).astype(dtype)
    s = polycos.pairwise_cosine_similarity(xs_, ys_, eps=0.0)
    assert_matches_reference(s, *outer(xs_, ys_), -1, 0.0, ulps=ulps_for(dtype))
    np.testing.assert_allclose(s, expected, atol=4 * np.finfo(dtype).eps)


def test_nonfinite_rows_touch_only_their_row_and_column():
    rng = np.random.default_rng(4)
    x = rng.standard_normal((6, 5)).astype(np.float32)
    y = rng.standard_normal((7, 5)).astype(np.float32)
    clean = polycos.pairwise_cosine_similarity(x, y)
    x[2, 1], y[4, 0] = np.nan, np.inf
    s = polycos.pairwise_cosine_similarity(x, y)
    bad = np.zeros(s.shape, dtype=bool)
    bad[2, :], bad[:, 4] = True, True
    assert np.all(np.isnan(s[bad]))
    np.testing.assert_array_equal(s[~bad], clean[~bad])


def test_inputs_untouched_and_not_aliased():
    x = np.random.default_rng(5).standard_normal((4, 3))
    before = x.copy()
    s = polycos.pairwise_cosine_similarity(x)
    np.testing.assert_array_equal(x, before)
    assert not np.shares_memory(s, x)


def test_bitwise_repeatable():
    x = np.random.default_rng(6).standard_normal((257, 33)).astype(np.float32)
    a = polycos.pairwise_cosine_similarity(x, x[::2])
    b = polycos.pairwise_cosine_similarity(x, x[::2])
    assert a.tobytes() == b.tobytes()


def test_large_numpy_product_is_blocked_and_accurate(monkeypatch):
    monkeypatch.setattr(_pairwise, "PRODUCT_ELEMENTS", 1000)
    monkeypatch.setattr(_pairwise, "BLOCK_ELEMENTS", 2000)
    rng = np.random.default_rng(7)
    x = rng.standard_normal((2, 700, 9)).astype(np.float32)
    y = rng.standard_normal((1, 5, 9)).astype(np.float32)
    x[0, 300, 3] = np.nan
    calls = []
    real = np.matmul
    monkeypatch.setattr(np, "matmul", lambda *a, **k: calls.append(a[0].shape) or real(*a, **k))
    s = polycos.pairwise_cosine_similarity(x, y)
    assert len(calls) == 3  # 700 rows in blocks of 256
    assert_matches_reference(s, *outer(x, y), -1)


@pytest.mark.parametrize(
    "xp", [pytest.param(np, id="numpy"), pytest.param(xs, id="array_api_strict")]
)
def test_array_type_in_is_array_type_out(xp):
    a = np.random.default_rng(8).standard_normal((2, 3, 4))
    b = np.random.default_rng(9).standard_normal((5, 4))
    x1, x2 = xp.asarray(a, dtype=xp.float32), xp.asarray(b, dtype=xp.float32)
    s = polycos.pairwise_cosine_similarity(x1, x2)
    assert type(s) is type(x1)
    assert s.dtype == xp.float32
    assert tuple(s.shape) == (2, 3, 5)
    assert_matches_reference(s, *outer(a.astype(np.float32), b.astype(np.float32)), -1)
    (g1, g2) = polycos.pairwise_cosine_similarity_vjp(xp.ones((2, 3, 5), dtype=xp.float32), x1, x2)
    assert type(g1) is type(x1)
    assert tuple(g2.shape) == (5, 4)


def test_integer_inputs_are_promoted():
    s = polycos.pairwise_cosine_similarity(np.array([[1, 0], [1, 1]]))
    assert s.dtype == np.float64
    np.testing.assert_allclose(s, [[1, 2**-0.5], [2**-0.5, 1]])


def test_vector_length_one_broadcasts():
    x = np.array([[2.0], [-1.0]])
    y = np.array([[1.0, 1.0, 1.0], [1.0, -1.0, 0.0]])
    s = polycos.pairwise_cosine_similarity(x, y)
    assert_matches_reference(s, *outer(x, y), -1)
    g = np.arange(4.0).reshape(2, 2)
    got = polycos.pairwise_cosine_similarity_vjp(g, x, y)
    assert got[0].shape == (2, 1)
    assert_vjp_matches_reference((got[0][:, None, :], got[1][None]), g, *outer(x, y), -1, ulps=32)


@pytest.mark.parametrize(
    ("x1", "x2", "exc", "words"),
    [
        (np.ones(3), np.ones((2, 3)), ValueError, "x1 must have at least 2 dimensions"),
        (np.ones((2, 3)), np.ones((2, 4)), ValueError, "vector lengths differ"),
        (np.ones((2, 2, 3)), np.ones((3, 2, 3)), ValueError, "leading dimensions do not broadcast"),
        (np.ones((2, 3)), [[1.0, 2.0, 3.0]], TypeError, "x2 must be an array"),
        (np.ones((2, 3)) * 1j, None, TypeError, "complex"),
    ],
)
def test_bad_input_raises_naming_the_argument(x1, x2, exc, words):
    with pytest.raises(exc, match=words):
        polycos.pairwise_cosine_similarity(x1, x2)


def test_bad_eps_and_grad():
    x = np.ones((2, 3))
    with pytest.raises(ValueError, match="eps"):
        polycos.pairwise_cosine_similarity(x, eps=-1.0)
    with pytest.raises(ValueError, match=r"grad with shape \(3, 3\)"):
        polycos.pairwise_cosine_similarity_vjp(np.ones((3, 3)), x)
    with pytest.raises(TypeError, match="grad must be an array"):
        polycos.pairwise_cosine_similarity_vjp([[1.0]], x)


# --------------------------------------------------------------------------- gradients


def _row_norms(x):
    """Row norms without overflow (x near 1e154 squares past float64's range)."""
    a = np.abs(x.astype(np.float64))
    m = np.max(a, axis=-1, keepdims=True, initial=0.0)
    safe = np.where(m > 0, m, 1.0)
    with np.errstate(all="ignore"):
        return safe * np.linalg.norm(a / safe, axis=-1, keepdims=True)


@given(pairwise_inputs())
def test_vjp_matches_reference(case):
    x1, x2, eps = case
    s = polycos.pairwise_cosine_similarity(x1, x2, eps=eps)
    g = np.linspace(-1, 1, num=max(s.size, 1))[: s.size].reshape(s.shape).astype(x1.dtype)
    got = polycos.pairwise_cosine_similarity_vjp(g, x1, x2, eps=eps)
    other = x1 if x2 is None else x2
    assert len(got) == (1 if x2 is None else 2)
    b1, b2 = outer(x1, other)
    if x2 is None:
        # x appears on both sides: its gradient is the sum of the two partial ones.
        r1, r2 = reference_vjp(g, b1, b2, -1, eps)
        ref = r1.reshape(x1.shape) + r2.reshape(x1.shape)
        with np.errstate(all="ignore"):
            scale = np.sum(
                np.abs(g) + np.abs(np.swapaxes(g, -1, -2)), axis=-1, keepdims=True
            ) / np.maximum(_row_norms(x1), eps)
        tol = 64 * np.finfo(x1.dtype).eps * np.where(np.isfinite(scale), scale, 0)
        tol = np.broadcast_to(tol, x1.shape)
        d = got[0].astype(np.float64)
        # NaN row by row: a row whose partner holds inf may be NaN across (its
        # normalised partner is NaN there), where the entrywise reference keeps
        # the components that inf multiplies by 0 (found by the thorough profile).
        assert np.array_equal(np.isnan(d).any(-1), np.isnan(ref).any(-1))
        ok = np.isfinite(ref) & np.isfinite(tol) & ~np.isnan(ref).any(-1, keepdims=True)
        assert np.all(np.abs(d - ref)[ok] <= tol[ok] + 1e-300)
    else:
        assert got[0].shape == x1.shape
        assert got[1].shape == x2.shape
        assert got[0].dtype == x1.dtype
        g1 = np.expand_dims(got[0], -2)
        g2 = np.expand_dims(got[1], -3)
        assert_vjp_matches_reference((g1, g2), g, b1, b2, -1, eps)


@pytest.mark.parametrize("eps", [1e-8, 0.0, 1.5])
@pytest.mark.parametrize("self_sim", [False, True])
def test_vjp_matches_finite_differences(eps, self_sim):
    rng = np.random.default_rng(10)
    x1 = rng.standard_normal((2, 4, 5))
    x2 = None if self_sim else rng.standard_normal((1, 3, 5))
    x1[0, 1] *= 0.1  # a norm below eps = 1.5
    g = rng.standard_normal(polycos.pairwise_cosine_similarity(x1, x2, eps=eps).shape)
    got = polycos.pairwise_cosine_similarity_vjp(g, x1, x2, eps=eps)

    def loss(a, b):
        return float(np.sum(g * polycos.pairwise_cosine_similarity(a, b, eps=eps)))

    for i, x in enumerate([x1] if self_sim else [x1, x2]):
        fd = np.zeros_like(x)
        h = 1e-6
        for idx in np.ndindex(x.shape):
            xp_, xm = x.copy(), x.copy()
            xp_[idx] += h
            xm[idx] -= h
            args_p = (xp_, None) if self_sim else ((xp_, x2) if i == 0 else (x1, xp_))
            args_m = (xm, None) if self_sim else ((xm, x2) if i == 0 else (x1, xm))
            fd[idx] = (loss(*args_p) - loss(*args_m)) / (2 * h)
        np.testing.assert_allclose(got[i], fd, rtol=1e-6, atol=1e-7)


def test_zero_rows_have_finite_gradients_with_eps_zero():
    x = np.array([[0.0, 0.0], [1.0, 2.0]], dtype=np.float32)
    (g,) = polycos.pairwise_cosine_similarity_vjp(np.ones((2, 2), np.float32), x, eps=0.0)
    assert np.all(np.isfinite(g))
    np.testing.assert_array_equal(g[0], 0)


# --------------------------------------------------------------------------- detection


@st.composite
def outer_calls(draw, dtypes=("float32", "float64")):
    """A row-wise call whose broadcast is an outer product: roles drawn per axis."""
    nd = draw(st.integers(3, 5))
    axis = draw(st.integers(0, nd - 1))
    roles = draw(
        st.lists(
            st.sampled_from(["batch", "batch1", "left", "right"]), min_size=nd - 1, max_size=nd - 1
        ).filter(lambda r: "left" in r and "right" in r)
    )
    d = draw(st.integers(0, 6))
    s1, s2 = [], []
    it = iter(roles)
    for k in range(nd):
        if k == axis:
            d1, d2 = draw(st.sampled_from([(d, d), (d, d), (1, d), (d, 1)]))
            s1.append(d1)
            s2.append(d2)
            continue
        role = next(it)
        size = draw(st.integers(2, 4))
        s1.append({"batch": size, "batch1": 1, "left": size, "right": 1}[role])
        s2.append(
            {"batch": size, "batch1": draw(st.sampled_from([1, size])), "left": 1, "right": size}[
                role
            ]
        )
    drop = draw(st.integers(0, nd))  # leading unit axes of x1 may be left out
    k = 0
    while k < min(drop, axis) and s1[0] == 1:
        s1.pop(0)
        k += 1
    dtype = draw(st.sampled_from(dtypes))
    x1 = draw(xps.arrays(np.dtype(dtype), tuple(s1), elements=finite))
    x2 = draw(xps.arrays(np.dtype(dtype), tuple(s2), elements=finite))
    if draw(st.booleans()) and x1.size:
        x1 = np.where(
            np.arange(x1.shape[0]).reshape((-1,) + (1,) * (x1.ndim - 1)) == 0, 0, x1
        ).astype(dtype)
    eps = draw(st.sampled_from([1e-8, 0.0, 0.5]))
    return x1, x2, axis - nd, eps


@given(outer_calls())
def test_detected_path_matches_direct_path(case):
    x1, x2, dim, eps = case
    call = validate(x1, x2, dim, eps)
    assert _pairwise.detect(call) is not None
    s = polycos.cosine_similarity(x1, x2, dim=dim, eps=eps)
    direct = _array_api.forward(call)
    assert s.shape == direct.shape
    assert s.dtype == direct.dtype
    ulps = ulps_for(x1.dtype.name)
    assert_matches_reference(s, x1, x2, dim, eps, ulps=ulps)
    assert_matches_reference(direct, x1, x2, dim, eps, ulps=ulps)
    g = np.linspace(-2, 2, num=max(s.size, 1))[: s.size].reshape(s.shape).astype(x1.dtype)
    got = polycos.cosine_similarity_vjp(g, x1, x2, dim=dim, eps=eps)
    want = _array_api.vjp(g, call)
    for a, b in zip(got, want, strict=True):
        assert a.shape == b.shape
        assert a.dtype == b.dtype
    assert_vjp_matches_reference(got, g, x1, x2, dim, eps)
    assert_vjp_matches_reference(want, g, x1, x2, dim, eps)


def test_detected_calls_take_the_matrix_path(monkeypatch):
    taken = []
    real = _pairwise._generic_forward
    monkeypatch.setattr(
        _pairwise, "_generic_forward", lambda *a: taken.append(a[1].shape) or real(*a)
    )
    z = np.random.default_rng(11).standard_normal((6, 4)).astype(np.float32)
    # seed 001: CosineSimilarity(dim=2)(z.unsqueeze(0), z.unsqueeze(1)), transposed result
    s = polycos.cosine_similarity(z[None], z[:, None], dim=2)
    assert taken == [(6, 4)]
    assert s.flags.c_contiguous  # computed in the caller's order, not a transposed view
    np.testing.assert_allclose(s, sk_cosine_similarity(z), atol=1e-6)
    polycos.cosine_similarity(z[:, None, :], z[None, :, :], dim=-1)
    polycos.cosine_similarity(z.T[:, :, None], z.T[:, None, :], dim=0)  # dim not last
    polycos.cosine_similarity(
        np.stack([z, z])[:, :, None], np.stack([z, z])[:, None], dim=-1
    )  # batched
    assert len(taken) == 4


@pytest.mark.parametrize(
    ("s1", "s2", "dim"),
    [
        ((6, 4), (6, 4), 1),  # row-wise
        ((6, 1, 4), (1, 1, 4), -1),  # one side only (x2 broadcast)
        ((1, 4), (5, 4), -1),  # one query against many rows
        ((6, 5, 4), (6, 5, 4), -1),  # same shapes, 3-d
        (
            (6, 1, 4),
            (1, 5, 1),
            -1,
        ),  # outer along the non-reduced dims, but x2's vector has length 1
        ((6, 1, 4), (1, 5, 4), 0),  # the reduced dim is one of the outer ones
    ],
)
def test_other_patterns_keep_the_direct_path(s1, s2, dim):
    x1, x2 = np.ones(s1), np.ones(s2)
    call = validate(x1, x2, dim, 1e-8)
    plan = _pairwise.detect(call)
    if s2 == (1, 5, 1):  # this one *is* an outer product: D broadcasts (length-1 vector)
        assert plan is not None
        assert_matches_reference(polycos.cosine_similarity(x1, x2, dim), x1, x2, dim)
    else:
        assert plan is None


def test_stride_zero_axes_are_collapsed_in_forward_only(monkeypatch):
    rng = np.random.default_rng(12)
    x = rng.standard_normal((5, 3)).astype(np.float32)
    y = rng.standard_normal((4, 3)).astype(np.float32)
    xb = np.broadcast_to(x[:, None, :], (5, 4, 3))  # stride 0 along axis 1
    taken = []
    real = _pairwise._generic_forward
    monkeypatch.setattr(_pairwise, "_generic_forward", lambda *a: taken.append(1) or real(*a))
    s = polycos.cosine_similarity(xb, y[None], dim=-1)
    assert taken == [1]
    assert_matches_reference(s, xb, y[None], -1)
    g = np.ones((5, 4), np.float32)
    g1, g2 = polycos.cosine_similarity_vjp(g, xb, y[None], dim=-1)
    assert g1.shape == (5, 4, 3)  # every element of xb is its own input
    assert_vjp_matches_reference((g1, g2), g, xb, y[None], -1)


def test_detection_reads_no_values():
    class Shape:
        """An object with only shapes: detection must not touch data."""

        def __init__(self, shape):
            self.shape, self.ndim = shape, len(shape)

    call = validate(np.ones((3, 1, 2)), np.ones((1, 4, 2)), -1, 1e-8)
    call = type(call)(call.xp, Shape((3, 1, 2)), Shape((1, 4, 2)), call.shape, call.axis, call.eps)
    plan = _pairwise.detect(call)
    assert plan is not None
    assert plan.left == (0,)
    assert plan.right == (1,)
    assert not plan.swap


# --------------------------------------------------------------------------- dask

dask_installed = importlib.util.find_spec("dask") is not None


def _counted_dask(a, chunks, counter):
    import dask.array as da

    def touch(block):
        if block.size:  # dask calls it on empty arrays to learn the output type
            counter.append(block.shape)
        return block

    return da.from_array(a, chunks=chunks).map_blocks(touch, dtype=a.dtype)


@pytest.mark.skipif(not dask_installed, reason="dask not installed")
def test_dask_pairwise_is_lazy_and_chunkwise():
    import dask

    rng = np.random.default_rng(13)
    a = rng.standard_normal((60, 10)).astype(np.float32)
    b = rng.standard_normal((45, 10)).astype(np.float32)
    touched = []
    x, y = _counted_dask(a, (20, 5), touched), _counted_dask(b, (15, 5), touched)
    s = polycos.pairwise_cosine_similarity(x, y)
    d = polycos.cosine_similarity(x[:, None, :], y[None, :, :], dim=-1)
    g = polycos.pairwise_cosine_similarity_vjp(s, x, y)
    assert touched == []  # nothing computed yet
    assert type(s).__module__.startswith("dask")
    assert type(g[0]).__module__.startswith("dask")
    assert s.chunks == ((20, 20, 20), (15, 15, 15))  # one output block per pair of row blocks
    with dask.config.set(scheduler="threads"):
        s_np, d_np, g_np = dask.compute(s, d, g)
    assert max(int(np.prod(t)) for t in touched) <= 100  # only input chunks were ever formed
    assert_matches_reference(s_np, *outer(a, b), -1)
    assert_matches_reference(d_np, *outer(a, b), -1)
    want = polycos.pairwise_cosine_similarity_vjp(s_np, a, b)
    for got_, want_ in zip(g_np, want, strict=True):
        np.testing.assert_allclose(got_, want_, rtol=1e-5, atol=1e-6)


@pytest.mark.skipif(not dask_installed, reason="dask not installed")
def test_dask_rowwise_is_lazy():
    import dask

    touched = []
    a = np.random.default_rng(14).standard_normal((40, 6))
    x = _counted_dask(a, (10, 6), touched)
    s = polycos.cosine_similarity(x, x[::-1], dim=1)
    assert touched == []
    with dask.config.set(scheduler="threads"):
        assert_matches_reference(s.compute(), a, a[::-1], 1)


@pytest.mark.skipif(
    importlib.util.find_spec("distributed") is None, reason="dask.distributed not installed"
)
def test_dask_distributed_two_workers():
    import dask.array as da
    from distributed import Client, LocalCluster

    rng = np.random.default_rng(15)
    a = rng.standard_normal((30, 8))
    b = rng.standard_normal((20, 8))
    with (
        LocalCluster(
            n_workers=2, threads_per_worker=1, processes=False, dashboard_address=None
        ) as cluster,
        Client(cluster) as client,
    ):
        x, y = da.from_array(a, chunks=(10, 8)), da.from_array(b, chunks=(10, 8))
        s = polycos.pairwise_cosine_similarity(x, y)
        (gx,) = polycos.pairwise_cosine_similarity_vjp(da.ones((30, 30), chunks=10), x)
        s_np, gx_np = client.compute([s, gx], sync=True)
    assert_matches_reference(s_np, *outer(a, b), -1, ulps=F64_ULPS)
    np.testing.assert_allclose(
        gx_np, polycos.pairwise_cosine_similarity_vjp(np.ones((30, 30)), a)[0], atol=1e-13
    )


# --------------------------------------------------------------------------- torch memory (seed 001)


MEMORY_SCRIPT = textwrap.dedent(
    """
    import resource, sys
    # A guard, not the measurement: PyTorch's own broadcast would need ~12.6 GB.
    resource.setrlimit(resource.RLIMIT_AS, (8 << 30, 8 << 30))
    import torch
    import polycos
    from polycos.torch import CosineSimilarity
    torch.manual_seed(0)
    z = torch.randn(2048, 128, requires_grad=True)
    s = CosineSimilarity(dim=2)(z.unsqueeze(0), z.unsqueeze(1))
    assert s.shape == (2048, 2048)
    s.square().sum().backward()
    s2 = polycos.cosine_similarity(z[None], z[:, None], dim=2)
    (s2 * torch.randn(2048, 2048)).sum().backward()
    assert torch.isfinite(z.grad).all()
    # VmHWM is this process's own peak: ru_maxrss would also count the parent's
    # RSS at fork time (Linux keeps it across exec), i.e. the whole pytest run.
    try:
        with open("/proc/self/status") as f:
            hwm = next(line for line in f if line.startswith("VmHWM:"))
        print(int(hwm.split()[1]) * 1024)
    except OSError:
        print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024)
    """
)


@pytest.mark.slow
def test_torch_seed001_pattern_stays_under_1_5_gb():
    pytest.importorskip("torch")
    out = subprocess.run(
        [sys.executable, "-c", MEMORY_SCRIPT],
        capture_output=True,
        text=True,
        timeout=600,
        check=False,
    )
    assert out.returncode == 0, out.stderr[-3000:]
    peak = int(out.stdout.strip().splitlines()[-1])
    assert peak < 1.5e9, f"peak RSS {peak / 1e9:.2f} GB"


# --------------------------------------------------------------------------- core pieces


def test_row_normalize_vjp_is_the_jacobian_transpose():
    rng = np.random.default_rng(16)
    x = rng.standard_normal((3, 4))
    x[1] *= 1e-3  # below eps
    eps = 1e-2
    r = _core.normalize_rows(np, x, eps)
    v = rng.standard_normal((3, 4))
    got = _core.row_normalize_vjp(np, r, v)
    for i in range(3):
        n = np.linalg.norm(x[i])
        jac = (np.eye(4) - np.outer(x[i], x[i]) / n**2) / n if n > eps else np.eye(4) / eps
        np.testing.assert_allclose(got[i], jac.T @ v[i], rtol=1e-12)


@given(st.integers(1, 4), st.integers(0, 40))
def test_normalize_rows_float64_rescales(n, e):
    rng = np.random.default_rng(e)
    x = np.ldexp(rng.standard_normal((n, 3)), 25 * (e - 20))  # 2**-500 ... 2**500
    assume(np.all(np.isfinite(x)))
    r = _core.normalize_rows(np, x, 0.0)
    m = np.max(np.abs(x), axis=-1, keepdims=True)
    b = (x / m).astype(np.longdouble)
    expected = b / np.sqrt(np.sum(b * b, axis=-1, keepdims=True))
    assert r.xhat.dtype == np.float64
    np.testing.assert_allclose(r.xhat, expected.astype(np.float64), rtol=1e-15, atol=1e-300)
