"""The core on NumPy and array-api-strict: values, gradients and guarantees G1-G4, G6-G8."""

from __future__ import annotations

import array_api_strict as xs
import numpy as np
import pytest
import scipy.spatial.distance
from hypothesis import assume, given
from hypothesis import strategies as st
from hypothesis.extra.array_api import make_strategies_namespace

import polycos
from polycos import _array_api
from polycos.testing import (
    assert_matches_reference,
    assert_vjp_matches_reference,
    cosine_inputs,
    reference,
    reference_vjp,
    to_numpy,
)

xps = make_strategies_namespace(np)
NAMESPACES = [pytest.param(np, id="numpy"), pytest.param(xs, id="array_api_strict")]
finite32 = st.floats(-100, 100, width=32, allow_subnormal=False)


def rows(n_max: int = 8, d_max: int = 16, dtype: str = "float64", elements: object = finite32):
    """Two (N, D) arrays of one shape."""
    return st.tuples(st.integers(1, n_max), st.integers(1, d_max)).flatmap(
        lambda s: st.tuples(
            xps.arrays(np.dtype(dtype), s, elements=elements),
            xps.arrays(np.dtype(dtype), s, elements=elements),
        )
    )


# --------------------------------------------------------------------------- seed regressions


@pytest.mark.parametrize(("dim", "expected"), [(0, [0.9558, 0.9839]), (1, [0.9734, 0.9972])])
@pytest.mark.parametrize("xp", NAMESPACES)
def test_seed_examples(xp, dim, expected):
    a = xp.asarray([[1.0, 2.0], [3.0, 4.0]], dtype=xp.float32)
    b = xp.asarray([[5.0, 6.0], [7.0, 8.0]], dtype=xp.float32)
    s = polycos.cosine_similarity(a, b, dim=dim)
    assert type(s) is type(a)
    np.testing.assert_allclose(to_numpy(s), expected, atol=5e-5)
    assert_matches_reference(s, a, b, dim)


# --------------------------------------------------------------------------- values (G1, G2)


@pytest.mark.parametrize("xp", NAMESPACES)
@given(data=st.data())
def test_matches_reference_within_one_ulp(xp, data):
    case = data.draw(cosine_inputs(xp, dtypes=("float32", "float64")))
    s = polycos.cosine_similarity(case.x1, case.x2, case.dim, case.eps)
    assert type(s) is type(case.x1)
    assert str(s.dtype) == str(case.x1.dtype)
    assert_matches_reference(s, case.x1, case.x2, case.dim, case.eps)


@given(cosine_inputs(np, dtypes=("float16",)))
def test_float16_accumulates_in_float32(case):
    s = polycos.cosine_similarity(case.x1, case.x2, case.dim, case.eps)
    assert s.dtype == np.float16
    assert_matches_reference(s, case.x1, case.x2, case.dim, case.eps)


@pytest.mark.parametrize("dtype", ["float32", "float64"])
@given(
    d=st.sampled_from([1, 7, 256, 4097, 65536]),
    seed=st.integers(0, 2**32 - 1),
    noise=st.sampled_from([0.0, 1e-7, 1e-3, 1.0, 100.0]),
    offset=st.floats(-10, 10),
)
def test_long_rows_within_one_ulp(dtype, d, seed, noise, offset):
    # Hypothesis cannot draw 65536-element arrays efficiently: it draws the
    # distribution (seed, offset, how parallel the pair is) and NumPy fills it.
    rng = np.random.default_rng(seed)
    x1 = (rng.standard_normal((3, d)) + offset).astype(dtype)
    x2 = (x1 + noise * rng.standard_normal((3, d))).astype(dtype)
    s = polycos.cosine_similarity(x1, x2, dim=1, eps=0.0)
    assert_matches_reference(s, x1, x2, 1, 0.0)


@pytest.mark.parametrize("dtype", ["float32", "float64"])
@given(data=st.data())
def test_identical_vectors_give_one(dtype, data):
    x, _ = data.draw(rows(dtype=dtype))
    assume(np.all(np.linalg.norm(x.astype(np.float64), axis=1) > 1e-8))
    s = polycos.cosine_similarity(x, x, dim=1)
    assert np.all(s <= 1.0)
    np.testing.assert_array_less(np.abs(s - 1.0), np.finfo(dtype).eps)


def test_identical_rows_never_exceed_one():
    # PyTorch gives 1 + 2e-7 on 20-30 % of such rows (spec, G1).
    x = np.random.default_rng(0).standard_normal((4096, 300)).astype(np.float32)
    s = polycos.cosine_similarity(x, x)
    assert s.max() <= 1.0
    assert np.mean(s == 1.0) > 0.99


# --------------------------------------------------------------------------- algebraic properties


@given(data=st.data(), eps=st.sampled_from([0.0, 1e-8, 1.0]))
def test_symmetric_and_odd(data, eps):
    x1, x2 = data.draw(rows())
    s = polycos.cosine_similarity(x1, x2, eps=eps)
    np.testing.assert_array_equal(polycos.cosine_similarity(x2, x1, eps=eps), s)
    np.testing.assert_array_equal(polycos.cosine_similarity(-x1, x2, eps=eps), -s)


@given(data=st.data(), scale=st.floats(1e-20, 1e20))
def test_positive_scale_invariance_with_eps_zero(data, scale):
    x1, x2 = data.draw(rows())
    s = polycos.cosine_similarity(x1, x2, eps=0.0)
    s_scaled = polycos.cosine_similarity(x1 * scale, x2, eps=0.0)
    np.testing.assert_allclose(s_scaled, s, rtol=0, atol=4 * np.finfo(np.float64).eps)


@given(data=st.data())
def test_matches_scipy(data):
    x1, x2 = data.draw(rows())
    assume(np.all(np.linalg.norm(x1, axis=1) > 1e-3) and np.all(np.linalg.norm(x2, axis=1) > 1e-3))
    s = polycos.cosine_similarity(x1, x2, eps=0.0)
    expected = [1 - scipy.spatial.distance.cosine(a, b) for a, b in zip(x1, x2, strict=True)]
    np.testing.assert_allclose(s, expected, atol=1e-14)


# --------------------------------------------------------------------------- gradients


@pytest.mark.parametrize("xp", NAMESPACES)
@given(data=st.data())
def test_vjp_matches_exact_reference(xp, data):
    case = data.draw(cosine_inputs(xp, dtypes=("float32", "float64")))
    s = polycos.cosine_similarity(case.x1, case.x2, case.dim, case.eps)
    g = data.draw(xps.arrays(np.float64, tuple(s.shape), elements=st.floats(-2, 2)))
    grad = xp.asarray(g.astype(str(s.dtype).rsplit(".", 1)[-1]))
    g1, g2 = polycos.cosine_similarity_vjp(grad, case.x1, case.x2, case.dim, case.eps)
    assert type(g1) is type(case.x1)
    assert tuple(g1.shape) == tuple(case.x1.shape)
    assert tuple(g2.shape) == tuple(case.x2.shape)
    assert_vjp_matches_reference((g1, g2), grad, case.x1, case.x2, case.dim, case.eps)


@given(data=st.data(), eps=st.sampled_from([1e-8, 0.5, 3.0]))
def test_vjp_matches_central_differences(data, eps):
    # eps = 0.5 and 3.0 put some norms below eps: the linear regime.
    x1, x2 = data.draw(rows(n_max=3, d_max=5))
    n1, n2 = np.linalg.norm(x1, axis=1), np.linalg.norm(x2, axis=1)
    assume(np.all(np.abs(n1 - eps) > 1e-3) and np.all(np.abs(n2 - eps) > 1e-3))  # away from the kink
    assume(np.all(n1 > 1e-3) and np.all(n2 > 1e-3))
    g = data.draw(xps.arrays(np.float64, (x1.shape[0],), elements=st.floats(-2, 2)))
    g1, g2 = polycos.cosine_similarity_vjp(g, x1, x2, eps=eps)
    for x, other, gx, first in ((x1, x2, g1, True), (x2, x1, g2, False)):
        num = np.zeros_like(x)
        for idx in np.ndindex(x.shape):
            # A step relative to the row's norm: the central difference is off by
            # about h**2 times the third derivative, ~ (h / ||x||)**2, so a fixed
            # h fails on short rows (found by the thorough profile: ||x2|| = 0.0055).
            h = 1e-6 * max(float(np.linalg.norm(x[idx[0]])), 1e-3)
            xp_, xm = x.copy(), x.copy()
            xp_[idx] += h
            xm[idx] -= h
            fp = polycos.cosine_similarity(xp_, other, eps=eps) if first else polycos.cosine_similarity(other, xp_, eps=eps)
            fm = polycos.cosine_similarity(xm, other, eps=eps) if first else polycos.cosine_similarity(other, xm, eps=eps)
            num[idx] = np.sum(g * (fp - fm)) / (2 * h)
        np.testing.assert_allclose(gx, num, atol=1e-6 * (1 + np.abs(num).max()), rtol=1e-5)


@given(data=st.data())
def test_vjp_matches_seed_closed_form(data):
    # Seed 002: grad_x = y/(|x||y|) - s x/|x|^2 for norms above eps.
    x, y = data.draw(rows())
    nx, ny = np.linalg.norm(x, axis=1, keepdims=True), np.linalg.norm(y, axis=1, keepdims=True)
    assume(np.all(nx > 1e-3) and np.all(ny > 1e-3))
    s = np.sum(x * y, axis=1, keepdims=True) / (nx * ny)
    gx, gy = polycos.cosine_similarity_vjp(np.ones(x.shape[0]), x, y)
    np.testing.assert_allclose(gx, y / (nx * ny) - s * x / nx**2, atol=1e-12 / np.min(nx * ny) + 1e-12)
    np.testing.assert_allclose(gy, x / (nx * ny) - s * y / ny**2, atol=1e-12 / np.min(nx * ny) + 1e-12)


@given(data=st.data())
def test_broadcast_gradients_are_summed(data):
    x1, x2 = data.draw(rows(n_max=5))
    q = x1[:1]  # (1, D) broadcast against (N, D)
    g = data.draw(xps.arrays(np.float64, (x2.shape[0],), elements=st.floats(-2, 2)))
    gq, g2 = polycos.cosine_similarity_vjp(g, q, x2)
    gfull, g2full = polycos.cosine_similarity_vjp(g, np.broadcast_to(q, x2.shape).copy(), x2)
    assert gq.shape == q.shape
    np.testing.assert_allclose(gq, gfull.sum(axis=0, keepdims=True), rtol=1e-12, atol=1e-12)
    np.testing.assert_array_equal(g2, g2full)


def test_gradient_below_eps_is_the_linear_branch():
    # ||x1|| = 1e-9 < eps: s = <x1, x2> / (eps ||x2||) is linear in x1.
    x1 = np.array([[1e-9, 0.0]])
    x2 = np.array([[3.0, 4.0]])
    g1, g2 = polycos.cosine_similarity_vjp(np.ones(1), x1, x2, eps=1e-8)
    np.testing.assert_allclose(g1, x2 / (1e-8 * 5.0))
    _ref1, ref2 = reference_vjp(np.ones(1), x1, x2, eps=1e-8)
    np.testing.assert_allclose(g2, ref2)


# --------------------------------------------------------------------------- range, zeros, NaN (G3, G4, G6)


@pytest.mark.parametrize("scale", [1e-30, 1e-20, 1e-10, 1e10, 1e20, 1e30, 1e36])
def test_float32_scale_safe_with_eps_zero(scale):
    rng = np.random.default_rng(1)
    x1 = rng.standard_normal((16, 64)).astype(np.float32)
    x2 = rng.standard_normal((16, 64)).astype(np.float32)
    s = polycos.cosine_similarity(x1, x2, eps=0.0)
    s_scaled = polycos.cosine_similarity(x1 * np.float32(scale), x2 * np.float32(scale), eps=0.0)
    np.testing.assert_allclose(s_scaled, s, atol=2**-23)
    g = np.ones(16, np.float32)
    g1, _ = polycos.cosine_similarity_vjp(g, x1 * np.float32(scale), x2, eps=0.0)
    r1, _ = reference_vjp(g, x1 * np.float32(scale), x2, eps=0.0)
    assert np.all(np.isfinite(g1))
    np.testing.assert_allclose(g1, r1, rtol=1e-5, atol=1e-5 * np.abs(r1).max())


@pytest.mark.parametrize("dtype", ["float16", "float64"])
def test_extreme_finite_values(dtype):
    big = np.finfo(dtype).max / 4
    x1 = np.array([[big, big], [big, -big]], dtype=dtype)
    x2 = np.array([[big, big], [big, big]], dtype=dtype)
    np.testing.assert_allclose(polycos.cosine_similarity(x1, x2).astype(np.float64), [1.0, 0.0], atol=1e-3)
    tiny = np.finfo(dtype).smallest_subnormal * 4
    t = np.array([[tiny, tiny]], dtype=dtype)
    np.testing.assert_allclose(polycos.cosine_similarity(t, t, eps=0.0).astype(np.float64), [1.0])


def test_float16_sixty_thousand():
    x = np.array([[60000.0, 60000.0]], dtype=np.float16)
    assert polycos.cosine_similarity(x, x)[0] == 1.0


@pytest.mark.parametrize("eps", [0.0, 1e-8])
def test_zero_vectors(eps):
    x1 = np.zeros((2, 3))
    x2 = np.array([[1.0, 2.0, 3.0], [0.0, 0.0, 0.0]])
    s = polycos.cosine_similarity(x1, x2, eps=eps)
    np.testing.assert_array_equal(s, [0.0, 0.0])
    g1, g2 = polycos.cosine_similarity_vjp(np.ones(2), x1, x2, eps=eps)
    assert np.all(np.isfinite(g1))
    assert np.all(np.isfinite(g2))
    if eps == 0.0:
        np.testing.assert_array_equal(g1, 0.0)
        np.testing.assert_array_equal(g2, 0.0)


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_nonfinite_rows_are_isolated(bad):
    rng = np.random.default_rng(2)
    x1, x2 = rng.standard_normal((5, 4)), rng.standard_normal((5, 4))
    clean = polycos.cosine_similarity(x1, x2)
    x1[2, 1] = bad
    s = polycos.cosine_similarity(x1, x2)
    assert np.isnan(s[2])
    np.testing.assert_array_equal(np.delete(s, 2), np.delete(clean, 2))
    g1, g2 = polycos.cosine_similarity_vjp(np.ones(5), x1, x2)
    assert np.all(np.isfinite(np.delete(g1, 2, axis=0)))
    assert np.all(np.isfinite(np.delete(g2, 2, axis=0)))


# --------------------------------------------------------------------------- G7, G8, blocking


@given(case=cosine_inputs(np))
def test_inputs_unmodified_and_outputs_fresh(case):
    c1, c2 = case.x1.copy(), case.x2.copy()
    s = polycos.cosine_similarity(case.x1, case.x2, case.dim, case.eps)
    g1, g2 = polycos.cosine_similarity_vjp(np.ones(s.shape, s.dtype), case.x1, case.x2, case.dim, case.eps)
    np.testing.assert_array_equal(case.x1, c1)
    np.testing.assert_array_equal(case.x2, c2)
    for out in (s, g1, g2):
        assert not np.shares_memory(out, case.x1)
        assert not np.shares_memory(out, case.x2)


def test_bitwise_repeatable():
    rng = np.random.default_rng(3)
    x1, x2 = rng.standard_normal((3000, 200)).astype(np.float32), rng.standard_normal((3000, 200)).astype(np.float32)
    a = polycos.cosine_similarity(x1, x2)
    b = polycos.cosine_similarity(x1, x2)
    assert a.tobytes() == b.tobytes()
    ga = polycos.cosine_similarity_vjp(a, x1, x2)
    gb = polycos.cosine_similarity_vjp(a, x1, x2)
    assert all(u.tobytes() == v.tobytes() for u, v in zip(ga, gb, strict=True))


@given(case=cosine_inputs(np, min_dims=2, max_side=8), block=st.sampled_from([1, 3, 16]))
def test_numpy_blocking_matches_one_pass(case, block):
    # Row blocks change nothing in the forward (each row's sums are the same
    # sums), and the blocked VJP still matches the exact reference.
    s0 = polycos.cosine_similarity(case.x1, case.x2, case.dim, case.eps)
    grad = np.ones(s0.shape, s0.dtype)
    old = _array_api.BLOCK_ELEMENTS
    _array_api.BLOCK_ELEMENTS = block
    try:
        s1 = polycos.cosine_similarity(case.x1, case.x2, case.dim, case.eps)
        g1 = polycos.cosine_similarity_vjp(grad, case.x1, case.x2, case.dim, case.eps)
    finally:
        _array_api.BLOCK_ELEMENTS = old
    np.testing.assert_array_equal(s1, s0)
    assert_vjp_matches_reference(g1, grad, case.x1, case.x2, case.dim, case.eps)


# --------------------------------------------------------------------------- shapes and dtypes


def test_zero_dim_inputs():
    s = polycos.cosine_similarity(np.float64(3.0), np.float64(-2.0), 0)
    assert s.shape == ()
    assert s == -1.0
    assert polycos.cosine_similarity(np.array(3.0), np.array(2.0), -1) == 1.0
    g1, g2 = polycos.cosine_similarity_vjp(np.array(1.0), np.array(3.0), np.array(2.0), 0)
    assert g1.shape == ()
    assert g2.shape == ()


def test_size_zero_dims():
    s = polycos.cosine_similarity(np.ones((0, 3)), np.ones((0, 3)))
    assert s.shape == (0,)
    s = polycos.cosine_similarity(np.ones((2, 0)), np.ones((2, 0)))
    np.testing.assert_array_equal(s, [0.0, 0.0])


def test_axis_alias_and_negative_dim():
    a = np.arange(6.0).reshape(2, 3) + 1
    b = a[::-1]
    np.testing.assert_array_equal(polycos.cosine_similarity(a, b, axis=0), polycos.cosine_similarity(a, b, dim=0))
    np.testing.assert_array_equal(polycos.cosine_similarity(a, b, dim=-1), polycos.cosine_similarity(a, b, dim=1))


@pytest.mark.parametrize("xp", NAMESPACES)
def test_integer_and_bool_promote_to_default_float(xp):
    a = xp.asarray([[1, 2], [3, 4]])
    b = xp.asarray([[True, False], [True, True]])
    s = polycos.cosine_similarity(a, b)
    assert s.dtype == xp.float64
    np.testing.assert_allclose(to_numpy(s), reference(np.array([[1, 2], [3, 4]]), np.array([[1, 0], [1, 1]])))


def test_mixed_precision_promotes():
    s = polycos.cosine_similarity(np.ones((2, 3), np.float32), np.ones((2, 3), np.float64))
    assert s.dtype == np.float64


def test_dask_stays_lazy_and_chunked():
    import dask
    import dask.array as da

    rng = np.random.default_rng(4)
    x1, x2 = rng.standard_normal((40, 6)), rng.standard_normal((40, 6))
    d1, d2 = da.from_array(x1, chunks=(10, 6)), da.from_array(x2, chunks=(10, 6))
    calls = []
    with dask.config.set(scheduler=lambda dsk, keys, **kw: calls.append(1) or dask.get(dsk, keys)):
        s = polycos.cosine_similarity(d1, d2)
        g1, g2 = polycos.cosine_similarity_vjp(da.ones(40, chunks=10), d1, d2)
        assert not calls, "polycos computed a dask array eagerly"
    assert isinstance(s, da.Array)
    assert isinstance(g1, da.Array)
    assert s.numblocks == (4,)
    assert_matches_reference(s, x1, x2)
    assert_vjp_matches_reference((g1, g2), np.ones(40), x1, x2)


# --------------------------------------------------------------------------- bad input (spec section 4)


@pytest.mark.parametrize(
    ("args", "kwargs", "exc", "match"),
    [
        (([1.0, 2.0], np.ones(2)), {}, TypeError, "x1 must be an array.*list"),
        ((np.ones(2), "ab"), {}, TypeError, "x2 must be an array.*str"),
        ((np.ones((2, 2)), xs.ones((2, 2))), {}, TypeError, "same array library"),
        ((np.ones(2, complex), np.ones(2)), {"dim": 0}, TypeError, "x1 has complex dtype"),
        ((np.ones((2, 3)), np.ones((4, 3))), {}, ValueError, r"x1 with shape \(2, 3\) and x2 with shape \(4, 3\)"),
        ((np.ones((2, 3)), np.ones((2, 3))), {"dim": 2}, IndexError, r"dim=2 is out of range.*\(2, 3\)"),
        ((np.ones((2, 3)), np.ones((2, 3))), {"dim": -3}, IndexError, "dim=-3"),
        ((np.ones(()), np.ones(())), {"dim": 1}, IndexError, "dim=1"),
        ((np.ones((2, 3)), np.ones((2, 3))), {"dim": 1.0}, TypeError, "dim must be an int"),
        ((np.ones((2, 3)), np.ones((2, 3))), {"dim": 1, "axis": 1}, TypeError, "dim or axis"),
        ((np.ones((2, 3)), np.ones((2, 3))), {"eps": -1.0}, ValueError, "eps=-1.0"),
        ((np.ones((2, 3)), np.ones((2, 3))), {"eps": float("nan")}, ValueError, "eps=nan"),
        ((np.ones((2, 3)), np.ones((2, 3))), {"eps": float("inf")}, ValueError, "eps=inf"),
        ((np.ones((2, 3)), np.ones((2, 3))), {"eps": "1e-8"}, TypeError, "eps must be a real number"),
    ],
)
def test_bad_input_raises_clearly(args, kwargs, exc, match):
    copies = [a.copy() if isinstance(a, np.ndarray) else a for a in args]
    with pytest.raises(exc, match=match):
        polycos.cosine_similarity(*args, **kwargs)
    with pytest.raises(exc, match=match):
        polycos.cosine_similarity_vjp(np.ones(2), *args, **kwargs)
    for a, c in zip(args, copies, strict=True):
        if isinstance(a, np.ndarray):
            np.testing.assert_array_equal(a, c)


def test_vjp_bad_grad():
    with pytest.raises(ValueError, match=r"grad with shape \(3,\).*\(2,\)"):
        polycos.cosine_similarity_vjp(np.ones(3), np.ones((2, 3)), np.ones((2, 3)))
    with pytest.raises(TypeError, match="grad must be an array"):
        polycos.cosine_similarity_vjp([1.0, 1.0], np.ones((2, 3)), np.ones((2, 3)))


def test_import_is_light():
    import subprocess
    import sys

    code = "import sys, polycos; print(sorted(m for m in ('torch', 'jax', 'cupy', 'dask') if m in sys.modules))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


@pytest.mark.parametrize("xp", NAMESPACES)
@given(data=st.data())
def test_with_vjp_matches_separate_calls(xp, data):
    case = data.draw(cosine_inputs(xp))
    s, vjp = polycos.cosine_similarity_with_vjp(case.x1, case.x2, case.dim, case.eps)
    np.testing.assert_array_equal(to_numpy(s), to_numpy(polycos.cosine_similarity(case.x1, case.x2, case.dim, case.eps)))
    grad = xp.asarray(np.linspace(-1, 1, int(np.prod(s.shape))).reshape(tuple(s.shape)), dtype=s.dtype)
    g = vjp(grad)
    assert_vjp_matches_reference(g, grad, case.x1, case.x2, case.dim, case.eps)
    with pytest.raises(ValueError, match="grad with shape"):
        vjp(xp.ones((7, 5, 3), dtype=s.dtype))
