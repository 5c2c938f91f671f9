"""The JAX adapter: custom_vjp under jit, vmap, grad (to second order), jacrev, x64, sharding."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from functools import partial

import array_api_strict as xs
import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st
from hypothesis.extra.array_api import make_strategies_namespace

jax = pytest.importorskip("jax")
jnp = pytest.importorskip("jax.numpy")
optax = pytest.importorskip("optax")
from jax.test_util import check_grads  # noqa: E402

import polycos  # noqa: E402
import polycos.jax as pj  # noqa: E402
from polycos.testing import (  # noqa: E402
    assert_matches_reference,
    assert_vjp_matches_reference,
    cosine_inputs,
    reference,
    reference_vjp,
    to_numpy,
)

xps = make_strategies_namespace(np)


def enable_x64():
    """``jax_enable_x64`` on for a block (``jax.enable_x64``; ``jax.experimental`` before 0.5)."""
    try:
        return jax.enable_x64(True)
    except (AttributeError, TypeError):
        from jax.experimental import enable_x64 as legacy

        return legacy()

finite = st.floats(-100, 100, width=32, allow_subnormal=False)


def rows(n_max: int = 6, d_max: int = 12, elements: object = finite):
    """Two float32 NumPy arrays of one (N, D) shape."""
    return st.tuples(st.integers(1, n_max), st.integers(1, d_max)).flatmap(
        lambda s: st.tuples(
            xps.arrays(np.float32, s, elements=elements), xps.arrays(np.float32, s, elements=elements)
        )
    )


#: One jitted function for all tests (a fresh jax.jit per call would recompile every time).
_cos_jit = jax.jit(pj.cosine_similarity, static_argnames=("dim", "eps"))


def jitted(dim: int = 1, eps: float = 1e-8):
    return partial(_cos_jit, dim=dim, eps=eps)


def vjp_of(f, x1, x2, g):
    _, pullback = jax.vjp(f, x1, x2)
    return pullback(g)


@partial(jax.jit, static_argnames=("dim", "eps"))
def _vjp_jit(x1, x2, g, dim, eps):
    return vjp_of(partial(pj.cosine_similarity, dim=dim, eps=eps), x1, x2, g)


@partial(jax.jit, static_argnames=("eps",))
def _grad_sum_jit(x1, x2, eps):
    return jax.grad(lambda u: pj.cosine_similarity(u, x2, eps=eps).sum())(x1)


@partial(jax.jit, static_argnames=("eps",))
def _vmapped(a1, a2, eps):
    """vmap over rows, over columns, over a middle axis, and per-example gradients."""
    f = partial(pj.cosine_similarity, dim=0, eps=eps)
    b1, b2 = jnp.stack([a1, -a1]), jnp.stack([a2, a2])  # (2, N, D)
    return (
        jax.vmap(f)(a1, a2),
        jax.vmap(f, in_axes=1)(a1, a2),
        jax.vmap(partial(pj.cosine_similarity, dim=-1, eps=eps), in_axes=1, out_axes=1)(b1, b2),
        jax.vmap(jax.grad(f))(a1, a2),
    )


# --------------------------------------------------------------------------- seeds, routing


@pytest.mark.parametrize(("dim", "expected"), [(0, [0.9558, 0.9839]), (1, [0.9734, 0.9972])])
def test_seed_examples(dim, expected):
    a = jnp.asarray([[1.0, 2.0], [3.0, 4.0]])
    b = jnp.asarray([[5.0, 6.0], [7.0, 8.0]])
    for s in (pj.cosine_similarity(a, b, dim=dim), jitted(dim)(a, b), polycos.cosine_similarity(a, b, dim)):
        assert isinstance(s, jax.Array)
        assert s.dtype == jnp.float32
        np.testing.assert_allclose(np.asarray(s), expected, atol=5e-5)
        assert_matches_reference(s, a, b, dim)


def test_import_polycos_does_not_import_jax():
    code = "import sys, polycos; assert 'jax' not in sys.modules and 'polycos.jax' not in sys.modules"
    subprocess.run([sys.executable, "-c", code], check=True)


def test_polycos_routes_jax_arrays_here():
    a = jnp.asarray([[1.0, 2.0], [3.0, 4.0]])
    b = jnp.asarray([[5.0, 6.0], [7.0, 8.0]])
    s = polycos.cosine_similarity(a, b)
    assert np.array_equal(np.asarray(s), np.asarray(pj.cosine_similarity(a, b)))
    g = jnp.asarray([1.0, -2.0])
    got = polycos.cosine_similarity_vjp(g, a, b)
    assert all(isinstance(t, jax.Array) for t in got)
    want = vjp_of(pj.cosine_similarity, a, b, g)
    for x, y in zip(got, want, strict=True):
        np.testing.assert_allclose(np.asarray(x), np.asarray(y), rtol=1e-6)
    # the module-level polycos gradient is differentiable by JAX too
    h = jax.grad(lambda a: polycos.cosine_similarity_vjp(g, a, b)[0].sum())(a)
    assert np.all(np.isfinite(np.asarray(h)))


def test_zero_dim_inputs():
    for dim in (0, -1):
        s = pj.cosine_similarity(jnp.asarray(-3.0), jnp.asarray(2.0), dim=dim)
        assert s.shape == ()
        assert float(s) == -1.0
    g = jax.grad(lambda x: pj.cosine_similarity(x, jnp.asarray(2.0), dim=0))(jnp.asarray(-3.0))
    assert float(g) == 0.0
    g1, g2 = polycos.cosine_similarity_vjp(jnp.asarray(1.0), jnp.asarray(-3.0), jnp.asarray(2.0), 0)
    assert g1.shape == g2.shape == ()


# --------------------------------------------------------------------------- values, parity (G1, G2)


def xla_sees(x):
    """``x`` as XLA computes with it: on CPU (and GPU) XLA flushes subnormal
    inputs to zero (denormals-are-zero), so the definition is checked on that."""
    a = to_numpy(x)
    tiny = float(jnp.finfo(x.dtype).smallest_normal)
    return np.where(np.abs(a.astype(np.float64)) < tiny, np.zeros_like(a), a)


def test_xla_flushes_subnormals_so_they_count_as_zero():
    # Why the reference is taken on xla_sees(...): a row of subnormals is a zero row in XLA.
    x2 = jnp.array([5.877472e-39, 1e-39], jnp.float32)
    s = pj.cosine_similarity(jnp.ones(2, jnp.float32), x2, dim=0, eps=0.0)
    expected = reference(np.ones(2, np.float32), xla_sees(x2), 0, 0.0)
    assert float(s) == float(expected)


@given(case=cosine_inputs(jnp, dtypes=("float32", "float16", "bfloat16")))
def test_matches_reference_and_numpy_under_jit(case):
    s = jitted(case.dim, case.eps)(case.x1, case.x2)
    assert s.dtype == case.x1.dtype
    a1, a2 = xla_sees(case.x1), xla_sees(case.x2)
    assert_matches_reference(s, a1, a2, case.dim, case.eps)  # G1, G2 (1 ulp)
    if str(s.dtype) != "bfloat16":  # NumPy has no bfloat16
        expected = polycos.cosine_similarity(a1, a2, case.dim, case.eps)
        np.testing.assert_allclose(
            np.asarray(s, np.float64), expected, rtol=0, atol=2 * float(jnp.finfo(s.dtype).eps)
        )


@given(case=cosine_inputs(jnp, dtypes=("float32", "float16", "bfloat16")), data=st.data())
def test_vjp_matches_reference_and_numpy_under_jit(case, data):
    shape = reference(case.x1, case.x2, case.dim, case.eps).shape
    g = data.draw(xps.arrays(np.float32, shape, elements=st.floats(-2, 2, width=32)))
    gj = jnp.asarray(g, dtype=case.x1.dtype)
    grads = _vjp_jit(case.x1, case.x2, gj, case.dim, case.eps)
    assert [t.shape for t in grads] == [case.x1.shape, case.x2.shape]
    assert all(t.dtype == case.x1.dtype for t in grads)
    a1, a2 = xla_sees(case.x1), xla_sees(case.x2)
    assert_vjp_matches_reference(grads, to_numpy(gj), a1, a2, case.dim, case.eps)
    if str(case.x1.dtype) == "float32":
        want = polycos.cosine_similarity_vjp(to_numpy(gj), a1, a2, case.dim, case.eps)
        assert_vjp_matches_reference(want, to_numpy(gj), a1, a2, case.dim, case.eps)
        for got, ref in zip(grads, want, strict=True):
            assert np.array_equal(np.isnan(np.asarray(got)), np.isnan(ref))


@given(case=cosine_inputs(jnp, dtypes=("float32", "float64")))
def test_x64_on_matches_reference(case):
    with enable_x64():
        x1, x2 = jnp.asarray(to_numpy(case.x1)), jnp.asarray(to_numpy(case.x2))
        if str(case.x1.dtype) == "float64":  # drawn as float32 with x64 off: widen
            x1, x2 = x1.astype(jnp.float64), x2.astype(jnp.float64)
        s = jitted(case.dim, case.eps)(x1, x2)
        assert s.dtype == x1.dtype
        r1, r2 = xla_sees(x1), xla_sees(x2)
        assert_matches_reference(s, r1, r2, case.dim, case.eps)
        g = jnp.ones(s.shape, s.dtype)
        grads = vjp_of(partial(pj.cosine_similarity, dim=case.dim, eps=case.eps), x1, x2, g)
        assert_vjp_matches_reference(grads, np.ones(s.shape), r1, r2, case.dim, case.eps)


@given(pair=rows(), eps=st.sampled_from([1e-8, 1e-3, 0.5, 3.0]))
def test_matches_optax_where_eps_rules_agree(pair, eps):
    # optax clamps the squared norm: max(n^2, epsilon) = max(n, eps)^2 with epsilon = eps^2.
    a1, a2 = (jnp.asarray(a) for a in pair)
    ours = pj.cosine_similarity(a1, a2, dim=-1, eps=eps)
    theirs = optax.cosine_similarity(a1, a2, epsilon=eps**2)
    np.testing.assert_allclose(np.asarray(ours), np.clip(np.asarray(theirs), -1, 1), atol=3e-6)

    def loss(f):
        return lambda a, b: jnp.sum(f(a, b) * jnp.arange(1.0, a.shape[0] + 1))

    ours_g = jax.grad(loss(partial(pj.cosine_similarity, dim=-1, eps=eps)), (0, 1))(a1, a2)
    theirs_g = jax.grad(loss(partial(optax.cosine_similarity, epsilon=eps**2)), (0, 1))(a1, a2)
    for x, y, a in zip(ours_g, theirs_g, (a1, a2), strict=True):
        # Row scale of a gradient entry is |g| / max(||a||, eps) (g <= N here).
        c = np.maximum(np.linalg.norm(np.asarray(a, np.float64), axis=-1, keepdims=True), eps)
        np.testing.assert_allclose(np.asarray(x), np.asarray(y), rtol=0, atol=float(1e-4 * a.shape[0] / c.min()))


@given(pair=rows(elements=st.floats(0.5, 100, width=32) | st.floats(-100, -0.5, width=32)))
def test_matches_optax_with_eps_zero_and_nonzero_rows(pair):
    a1, a2 = (jnp.asarray(a) for a in pair)
    ours = jitted(-1, 0.0)(a1, a2)
    theirs = optax.cosine_similarity(a1, a2, epsilon=0.0)
    np.testing.assert_allclose(np.asarray(ours), np.clip(np.asarray(theirs), -1, 1), atol=3e-6)


# --------------------------------------------------------------------------- dtype promotion, x64


def test_dtype_follows_jax_promotion():
    i = jnp.asarray([[1, 2], [3, 4]], dtype=jnp.int32)
    h = jnp.asarray([[1, 2], [3, 4]], dtype=jnp.float16)
    assert pj.cosine_similarity(i, i).dtype == jnp.float32
    assert pj.cosine_similarity(h, h).dtype == jnp.float16
    assert pj.cosine_similarity(h, h.astype(jnp.bfloat16)).dtype == jnp.float32
    with enable_x64():
        i64 = jnp.asarray([[1, 2], [3, 4]])
        f32 = jnp.asarray([[1.0, 2.0], [3.0, 4.0]], dtype=jnp.float32)
        assert pj.cosine_similarity(i64, i64).dtype == jnp.float64
        assert pj.cosine_similarity(f32, f32).dtype == jnp.float32
        assert pj.cosine_similarity(f32, f32.astype(jnp.float64)).dtype == jnp.float64
        assert jitted()(f32, f32).dtype == jnp.float32


def test_x64_off_and_on_in_subprocesses_agree():
    # jax_enable_x64 set at start-up (the usual way), float32 in both runs.
    code = textwrap.dedent(
        """
        import sys, jax
        jax.config.update("jax_enable_x64", sys.argv[1] == "on")
        import jax.numpy as jnp, numpy as np
        from polycos.jax import cosine_similarity
        x = jax.random.normal(jax.random.key(0), (64, 300), jnp.float32)
        y = x + 1e-3 * jax.random.normal(jax.random.key(1), (64, 300), jnp.float32)
        s = jax.jit(cosine_similarity)(x, y)
        g = jax.jit(jax.grad(lambda a: cosine_similarity(a, y).sum()))(x)
        assert s.dtype == g.dtype == jnp.float32, (s.dtype, g.dtype)
        np.save(sys.stdout.buffer, np.concatenate([np.asarray(s), np.asarray(g).ravel()]))
        """
    )
    out = {}
    for mode in ("off", "on"):
        res = subprocess.run([sys.executable, "-c", code, mode], check=True, capture_output=True)
        import io

        out[mode] = np.load(io.BytesIO(res.stdout))
    x = np.asarray(jax.random.normal(jax.random.key(0), (64, 300), jnp.float32))
    y = x + 1e-3 * np.asarray(jax.random.normal(jax.random.key(1), (64, 300), jnp.float32))
    for mode in ("off", "on"):
        assert_matches_reference(out[mode][:64].astype(np.float32), x, y)
    np.testing.assert_allclose(out["off"][64:], out["on"][64:], rtol=0, atol=1e-6)


# --------------------------------------------------------------------------- gradients (G5)


def _regimes(dtype):
    """(x1, x2, eps) in every regime: above eps, below eps, zero rows with eps > 0, broadcast."""
    k1, k2 = jax.random.split(jax.random.key(42))
    x1 = jax.random.normal(k1, (4, 5), dtype)
    x2 = jax.random.normal(k2, (4, 5), dtype)
    return [
        pytest.param(x1, x2, 1e-8, 1, id="above-eps"),
        pytest.param(0.05 * x1, x2, 1.0, 1, id="x1-below-eps"),
        pytest.param(0.05 * x1, 0.05 * x2, 1.0, 1, id="both-below-eps"),
        pytest.param(x1.at[1].set(0.0), x2.at[2].set(0.0), 0.5, 1, id="zero-rows-eps>0"),
        pytest.param(x1.at[1].set(0.0), x2, 0.05, 1, id="zero-row-small-eps"),
        pytest.param(x1[:1], x2, 1e-8, 1, id="broadcast-x1"),
        pytest.param(x1, x2[:, :1], 1e-8, 0, id="broadcast-dim0"),
        pytest.param(x1[0, 0], x2[0, 0], 1e-8, 0, id="0-d"),
    ]


@pytest.mark.parametrize(("x1", "x2", "eps", "dim"), _regimes(jnp.float32))
def test_check_grads_float32(x1, x2, eps, dim):
    f = partial(pj.cosine_similarity, dim=dim, eps=eps)
    check_grads(f, (x1, x2), order=2, modes=["rev"], atol=5e-2, rtol=5e-2, eps=1e-3)


@pytest.mark.parametrize(("x1", "x2", "eps", "dim"), _regimes(np.float64))
def test_check_grads_float64(x1, x2, eps, dim):
    with enable_x64():
        x1, x2 = jnp.asarray(x1, jnp.float64), jnp.asarray(x2, jnp.float64)
        f = jax.jit(partial(pj.cosine_similarity, dim=dim, eps=eps))
        check_grads(f, (x1, x2), order=2, modes=["rev"])


def test_eps_zero_zero_vectors_gradients():
    # Discontinuous at a zero vector, so no finite differences there: the gradient (and
    # its derivative) is 0 by definition, and the function of the *other* input is the
    # constant 0, which check_grads can verify.
    with enable_x64():
        z = jnp.zeros((2, 3)).at[1].set(jnp.asarray([1.0, -2.0, 0.5]))
        y = jnp.asarray([[1.0, 2.0, 3.0], [-1.0, 0.5, 2.0]])
        f = partial(pj.cosine_similarity, eps=0.0)
        check_grads(lambda b: f(z, b), (y,), order=2, modes=["rev"])
        check_grads(lambda a: f(a, z), (y,), order=2, modes=["rev"])
        g1, g2 = jax.grad(lambda a, b: f(a, b).sum(), (0, 1))(z, y)
        assert np.all(np.asarray(g1[0]) == 0)
        assert np.all(np.asarray(g2[0]) == 0)
        assert np.any(np.asarray(g1[1]) != 0)
        hess = jax.jacrev(jax.grad(lambda a: f(a, y).sum()))(z)
        assert np.all(np.isfinite(np.asarray(hess)))
        assert np.all(np.asarray(hess[0]) == 0)


def test_jacrev_matches_vjp_rows():
    x1 = jax.random.normal(jax.random.key(0), (3, 4))
    x2 = jax.random.normal(jax.random.key(1), (3, 4))
    j1, j2 = jax.jit(jax.jacrev(pj.cosine_similarity, (0, 1)))(x1, x2)
    assert j1.shape == j2.shape == (3, 3, 4)
    for i in range(3):
        g = np.zeros(3, np.float32)
        g[i] = 1
        r1, r2 = polycos.cosine_similarity_vjp(g, np.asarray(x1), np.asarray(x2))
        np.testing.assert_allclose(np.asarray(j1[i]), r1, rtol=1e-5, atol=1e-7)
        np.testing.assert_allclose(np.asarray(j2[i]), r2, rtol=1e-5, atol=1e-7)


def test_forward_mode_raises_a_clear_error():
    x = jnp.ones((2, 3))
    f = partial(pj.cosine_similarity, x2=jnp.arange(6.0).reshape(2, 3))
    with pytest.raises(TypeError, match=r"reverse mode.*jax\.jacrev"):
        jax.jvp(f, (x,), (x,))
    with pytest.raises(TypeError, match=r"reverse mode.*jax\.jacrev"):
        jax.jacfwd(f)(x)
    # forward-over-reverse works: the backward rule is plain jax.numpy
    hess = jax.jit(jax.hessian(lambda a: f(a).sum()))(x)
    ref = jax.jacrev(jax.jacrev(lambda a: f(a).sum()))(x)
    np.testing.assert_allclose(np.asarray(hess), np.asarray(ref), rtol=1e-5, atol=1e-6)
    t = jnp.arange(6.0).reshape(2, 3) / 7
    _, hvp = jax.jvp(jax.grad(lambda a: f(a).sum()), (x,), (t,))
    np.testing.assert_allclose(
        np.asarray(hvp), np.einsum("ijkl,kl->ij", np.asarray(ref), np.asarray(t)), rtol=1e-5, atol=1e-6
    )


# --------------------------------------------------------------------------- vmap


@given(pair=rows(n_max=4, d_max=6), data=st.data())
def test_vmap_over_rows_and_over_other_axes(pair, data):
    a1, a2 = (jnp.asarray(a) for a in pair)
    eps = data.draw(st.sampled_from([1e-8, 0.0, 0.5]))
    v, vc, vm, pg = _vmapped(a1, a2, eps)
    # vmap over the rows: each call sees 1-d vectors (dim 0)
    np.testing.assert_array_equal(np.asarray(v), np.asarray(pj.cosine_similarity(a1, a2, 1, eps)))
    # vmap over an axis other than dim: columns, reducing along the (unmapped) rows
    np.testing.assert_array_equal(np.asarray(vc), np.asarray(pj.cosine_similarity(a1, a2, 0, eps)))
    # batch axis in the middle of a 3-d input, dim after it
    b1, b2 = jnp.stack([a1, -a1]), jnp.stack([a2, a2])
    np.testing.assert_array_equal(np.asarray(vm), np.asarray(pj.cosine_similarity(b1, b2, -1, eps)))
    # per-example gradients under vmap match the exact VJP, as the batched gradient does
    ones = np.ones(a1.shape[0], np.float32)
    g2 = vjp_of(partial(pj.cosine_similarity, eps=eps), a1, a2, jnp.asarray(ones))[1]
    bg = jax.grad(lambda u: pj.cosine_similarity(u, a2, 1, eps).sum())(a1)
    for g in (pg, bg):
        assert_vjp_matches_reference((g, g2), ones, a1, a2, 1, eps)


# --------------------------------------------------------------------------- guarantees inside jit


@given(x=rows().map(lambda p: p[0]), c=st.floats(0.3, 3.0))
def test_parallel_rows_within_half_ulp_without_x64(x, c):
    # Products rounded once, or s formed as a plain float32 w12 / sqrt(w11 w22),
    # give 1 - 2**-23 here (1.0 ulp(1.0)); the exact sums and the precise
    # quotient keep parallel rows within half of G2's bound.
    y = (np.float32(c) * x).astype(np.float32)
    ref = reference(x, y, 1, 0.0)
    s = np.asarray(jitted(1, 0.0)(jnp.asarray(x), jnp.asarray(y)), np.float64)
    assert np.max(np.abs(s - ref), initial=0.0) <= 0.5 * 2.0**-23


@given(x=rows().map(lambda p: p[0]))
def test_g1_identical_vectors_bounded(x):
    for dtype in (jnp.float32, jnp.float16, jnp.bfloat16):
        a = jnp.asarray(x, dtype)
        s = np.asarray(jitted()(a, a), np.float64)
        assert np.all(np.abs(s) <= 1.0)
        assert np.all(np.abs(np.asarray(jitted()(a, -a), np.float64)) <= 1.0)


@pytest.mark.parametrize("scale", [1e-30, 1e-20, 1e20, 1e36])
def test_g3_scale_safe_float32(scale):
    x1 = jax.random.normal(jax.random.key(3), (8, 33))
    x2 = jax.random.normal(jax.random.key(4), (8, 33))
    base = jitted(1, 0.0)(x1, x2)
    s = jitted(1, 0.0)(x1 * scale, x2)
    s2 = jitted(1, 0.0)(x1 * scale, x2 * scale)
    assert_matches_reference(s, x1 * scale, x2, 1, 0.0)
    np.testing.assert_allclose(np.asarray(s), np.asarray(base), atol=1.2e-7)
    np.testing.assert_allclose(np.asarray(s2), np.asarray(base), atol=1.2e-7)
    g1, _ = jax.jit(jax.grad(lambda a, b: pj.cosine_similarity(a, b, eps=0.0).sum(), (0, 1)))(x1 * scale, x2)
    gb, _ = jax.grad(lambda a, b: pj.cosine_similarity(a, b, eps=0.0).sum(), (0, 1))(x1, x2)
    # d/dx1 scales by 1/scale; XLA flushes results below float32's normal range to 0.
    want = np.asarray(gb, np.float64) / scale
    normal = np.abs(want) >= 2 * float(jnp.finfo(jnp.float32).smallest_normal)
    assert normal.any()
    got = np.asarray(g1, np.float64)
    np.testing.assert_allclose(got[normal], want[normal], rtol=1e-4)
    assert np.all(np.abs(got[~normal]) <= 2 * float(jnp.finfo(jnp.float32).smallest_normal))


def test_g3_float16_large_values():
    a = jnp.asarray([[60000.0, 30000.0], [1e-4, 2e-4]], jnp.float16)
    b = jnp.asarray([[60000.0, -30000.0], [2e-4, 4e-4]], jnp.float16)
    s = jitted(1, 0.0)(a, b)
    assert_matches_reference(s, a, b, 1, 0.0)
    np.testing.assert_allclose(np.asarray(s, np.float64), [0.6, 1.0], atol=1e-3)
    g = jax.jit(jax.grad(lambda u: pj.cosine_similarity(u, b, eps=0.0).sum()))(a)
    assert np.all(np.isfinite(np.asarray(g, np.float64)))


@pytest.mark.parametrize("eps", [1e-8, 0.0])
def test_g4_zero_vectors_inside_jit(eps):
    x = jnp.asarray([[0.0, 0.0, 0.0], [1.0, 2.0, 3.0]])
    y = jnp.asarray([[1.0, 2.0, 3.0], [0.0, 0.0, 0.0]])
    s = jitted(1, eps)(x, y)
    assert np.array_equal(np.asarray(s), [0.0, 0.0])
    assert float(jitted(1, eps)(x[:1], x[:1])[0]) == 0.0
    f = jax.jit(jax.grad(lambda a, b: pj.cosine_similarity(a, b, eps=eps).sum(), (0, 1)))
    for g in f(x, y) + f(x, x):
        assert np.all(np.isfinite(np.asarray(g)))
    h = jax.jit(jax.grad(lambda a: jax.grad(lambda u: pj.cosine_similarity(u, y, eps=eps).sum())(a).sum()))(x)
    assert np.all(np.isfinite(np.asarray(h)))


@given(pair=rows(n_max=5), data=st.data())
def test_g6_nonfinite_stays_in_its_row_inside_jit(pair, data):
    a1, a2 = pair
    n, d = a1.shape
    row = data.draw(st.integers(0, n - 1))
    col = data.draw(st.integers(0, d - 1))
    bad = data.draw(st.sampled_from([np.nan, np.inf, -np.inf]))
    b1 = a1.copy()
    b1[row, col] = bad
    eps = data.draw(st.sampled_from([1e-8, 0.0]))
    f = jitted(1, eps)
    clean = np.asarray(f(jnp.asarray(a1), jnp.asarray(a2)))
    dirty = np.asarray(f(jnp.asarray(b1), jnp.asarray(a2)))
    assert np.isnan(dirty[row])
    others = np.arange(n) != row
    assert np.array_equal(dirty[others], clean[others])  # bitwise: untouched
    g = _grad_sum_jit(jnp.asarray(b1), jnp.asarray(a2), eps)
    assert np.all(np.isfinite(np.asarray(g)[others]))


@given(case=cosine_inputs(jnp, dtypes=("float32", "float16", "bfloat16")))
def test_g7_g8_inputs_unchanged_and_bitwise_repeatable(case):
    before = (to_numpy(case.x1), to_numpy(case.x2))
    f = jitted(case.dim, case.eps)
    s1, s2 = f(case.x1, case.x2), f(case.x1, case.x2)
    s3 = pj.cosine_similarity(case.x1, case.x2, case.dim, case.eps)
    assert np.asarray(s1).tobytes() == np.asarray(s2).tobytes()
    assert np.asarray(s3).tobytes() == np.asarray(pj.cosine_similarity(case.x1, case.x2, case.dim, case.eps)).tobytes()
    np.testing.assert_array_equal(to_numpy(case.x1), before[0])
    np.testing.assert_array_equal(to_numpy(case.x2), before[1])
    assert s1 is not case.x1
    assert s1 is not case.x2


# --------------------------------------------------------------------------- bad input (spec 4)


def test_bad_input_raises_naming_the_argument():
    a = jnp.ones((2, 3))
    with pytest.raises(TypeError, match="same array library"):
        pj.cosine_similarity(a, xs.ones((2, 3)))
    # NumPy arrays are taken, as by jax.numpy
    assert isinstance(pj.cosine_similarity(a, np.ones((2, 3))), jax.Array)
    with pytest.raises(TypeError, match="x2 must be an array"):
        pj.cosine_similarity(a, [[1.0, 2.0, 3.0]])
    with pytest.raises(TypeError, match="complex"):
        pj.cosine_similarity(a, a.astype(jnp.complex64))
    with pytest.raises(ValueError, match="do not broadcast"):
        pj.cosine_similarity(a, jnp.ones((3, 3)))
    with pytest.raises(IndexError, match="dim=2"):
        pj.cosine_similarity(a, a, dim=2)
    for eps in (-1.0, float("nan"), float("inf")):
        with pytest.raises(ValueError, match="eps"):
            pj.cosine_similarity(a, a, eps=eps)
    with pytest.raises(TypeError, match="static"):
        jax.jit(lambda e: pj.cosine_similarity(a, a, eps=e))(0.1)
    with pytest.raises(TypeError, match="not both"):
        pj.cosine_similarity(a, a, dim=0, axis=0)
    # validation also holds inside jit (shapes are static)
    with pytest.raises(IndexError, match="dim=-3"):
        jax.jit(partial(pj.cosine_similarity, dim=-3))(a, a)


# --------------------------------------------------------------------------- sharding


SHARDING_SCRIPT = textwrap.dedent(
    """
    import jax, jax.numpy as jnp, numpy as np
    from jax.sharding import Mesh, NamedSharding, PartitionSpec as P
    from polycos.jax import cosine_similarity
    assert len(jax.devices()) == 2, jax.devices()
    mesh = Mesh(np.array(jax.devices()), ("rows",))
    rows = NamedSharding(mesh, P("rows", None))
    x1 = jax.random.normal(jax.random.key(0), (64, 48))
    x2 = jax.random.normal(jax.random.key(1), (64, 48))
    s1, s2 = jax.device_put(x1, rows), jax.device_put(x2, rows)
    f = jax.jit(cosine_similarity)
    out = f(s1, s2)
    assert out.sharding.is_equivalent_to(NamedSharding(mesh, P("rows")), 1), out.sharding
    assert len(out.addressable_shards) == 2
    assert all(sh.data.shape == (32,) for sh in out.addressable_shards)
    np.testing.assert_array_equal(np.asarray(out), np.asarray(f(x1, x2)))
    loss = jax.jit(jax.grad(lambda a, b: (cosine_similarity(a, b) ** 2).sum(), (0, 1)))
    g1, g2 = loss(s1, s2)
    assert g1.sharding.is_equivalent_to(rows, 2), g1.sharding
    assert g2.sharding.is_equivalent_to(rows, 2), g2.sharding
    r1, r2 = loss(x1, x2)
    np.testing.assert_allclose(np.asarray(g1), np.asarray(r1), rtol=1e-6, atol=1e-9)
    np.testing.assert_allclose(np.asarray(g2), np.asarray(r2), rtol=1e-6, atol=1e-9)
    print("sharded ok")
    """
)


def test_sharded_rows_over_two_devices():
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=2", JAX_PLATFORMS="cpu")
    res = subprocess.run(
        [sys.executable, "-c", SHARDING_SCRIPT], env=env, capture_output=True, text=True, timeout=300
    )
    assert res.returncode == 0, res.stderr[-4000:]
    assert "sharded ok" in res.stdout


# --------------------------------------------------------------------------- pairwise (G9)


def test_outer_broadcast_takes_the_matrix_path_with_exact_gradients():
    rng = np.random.default_rng(21)
    z = rng.standard_normal((5, 4)).astype(np.float32)
    z[1] = 0.0
    y = rng.standard_normal((3, 4)).astype(np.float32)
    zj, yj = jnp.asarray(z), jnp.asarray(y)
    f = jax.jit(lambda a, b: pj.cosine_similarity(a[:, None], b[None], dim=-1))
    # The jaxpr holds a matrix product (dot_general), no (N, M, D) intermediate.
    jaxpr = str(jax.make_jaxpr(f)(zj, yj))
    assert "dot_general" in jaxpr
    assert "f32[5,3,4]" not in jaxpr
    s = f(zj, yj)
    assert_matches_reference(np.asarray(s), z[:, None], y[None], -1, 1e-8)
    g = rng.standard_normal((5, 3)).astype(np.float32)
    ga, gb = vjp_of(lambda a, b: f(a, b), zj, yj, jnp.asarray(g))
    # The float64 row-wise VJP of the definition, summed over the broadcast partner.
    r1, r2 = reference_vjp(g, z[:, None], y[None], -1, 1e-8)
    np.testing.assert_allclose(np.asarray(ga), r1.reshape(5, 4), atol=1e-5, rtol=1e-5)
    np.testing.assert_allclose(np.asarray(gb), r2.reshape(3, 4), atol=1e-5, rtol=1e-5)


def test_pairwise_check_grads_second_order():
    with enable_x64():
        rng = np.random.default_rng(22)
        z = jnp.asarray(rng.standard_normal((4, 3)))
        y = jnp.asarray(rng.standard_normal((2, 3)))
        check_grads(lambda a: polycos.pairwise_cosine_similarity(a), (z,), order=2, modes=["rev"])
        check_grads(
            lambda a, b: pj.cosine_similarity(a[None], b[:, None], dim=2), (z, y), order=2,
            modes=["rev"],
        )


@given(pair=rows(n_max=5, d_max=40), data=st.data())
def test_pairwise_with_x64_within_one_ulp(pair, data):
    # With x64 on, float32 rows are normalised and multiplied in float64: G2 holds.
    # (With x64 off the product is a float32 matrix product; see docs/pairwise.md.)
    x, y = pair
    y = y[: data.draw(st.integers(1, y.shape[0]))]
    with enable_x64():
        s = polycos.pairwise_cosine_similarity(jnp.asarray(x), jnp.asarray(y))
        assert s.dtype == jnp.float32
        assert_matches_reference(np.asarray(s), x[:, None, :], y[None, :, :], -1, 1e-8)
