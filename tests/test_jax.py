"""What is specific to JAX: the kernel inside ``jit`` (``jax.ffi``), the custom JVP rule in
every mode (``jvp``, ``jacfwd``, ``grad``, ``hessian``), ``vmap``, sharding, x64 on and off,
parity with optax, and pairwise accuracy without x64 (issue 16). The guarantees themselves run
for JAX in ``test_guarantees.py``.
"""

from __future__ import annotations

import io
import os
import re
import subprocess
import sys
import textwrap
import warnings
from functools import partial
from typing import Any

import numpy as np
import pytest
from hypothesis import assume, given, settings
from hypothesis import strategies as st
from hypothesis.extra.array_api import make_strategies_namespace

jax = pytest.importorskip("jax")
import jax.numpy as jnp  # noqa: E402
from jax.test_util import check_grads  # noqa: E402

import polycos  # noqa: E402
import polycos.jax as pj  # noqa: E402
from polycos._backends import jax as backend  # noqa: E402
from polycos.testing import (  # noqa: E402
    assert_matches_reference,
    assert_vjp_matches_reference,
    reference,
    reference_vjp,
)

xps = make_strategies_namespace(np)
finite = st.floats(-100, 100, width=32, allow_subnormal=False)


def rows(n_max: int = 6, d_max: int = 12, elements: st.SearchStrategy = finite) -> st.SearchStrategy:
    return st.tuples(st.integers(1, n_max), st.integers(1, d_max)).flatmap(
        lambda s: st.tuples(xps.arrays(np.float32, s, elements=elements), xps.arrays(np.float32, s, elements=elements))
    )


def _keys(n: int) -> list:
    return list(jax.random.split(jax.random.key(42), n))


# --------------------------------------------------------------------------- the kernel inside jit


needs_kernel = pytest.mark.skipif(
    not backend.JaxBackend.native.fget(None),  # type: ignore[attr-defined]
    reason="the CPU kernel is not built here: JAX runs the core in jax.numpy",
)


def _custom_calls(f: object, *args: jax.Array) -> list[str]:
    """The custom-call targets in the compiled (optimised) HLO of ``jax.jit(f)``."""
    hlo = jax.jit(f).lower(*args).compile().as_text()
    assert "callback" not in hlo  # the kernels are FFI calls, never host callbacks
    return re.findall(r'custom_call_target="([a-z_]+)"', hlo)


@needs_kernel
def test_cpu_kernel_is_called_inside_jit() -> None:
    """The value alone: one kernel call writing ``s`` only (no residuals)."""
    x = jnp.ones((8, 16))
    assert _custom_calls(lambda a: pj.cosine_similarity(a, a[::-1]), x) == ["polycos_forward_value"]


@needs_kernel
@pytest.mark.parametrize("x64", [False, True], ids=["x64-off", "x64-on"])
def test_reverse_mode_is_one_kernel_forward_and_one_kernel_backward(x64: bool) -> None:
    """The fast path cannot regress silently: ``value_and_grad`` is the two kernel calls and nothing of N x D.

    Reverse mode transposes the tangent primitive into ``polycos_backward``;
    were it XLA's transpose of the jnp tangent map, there would be fusions over
    the inputs' shape besides the two calls.
    """
    with jax.enable_x64(x64):
        x, y, w = jnp.ones((64, 48)), jnp.ones((64, 48)), jnp.ones(64)
        loss = lambda a, b, c: jnp.sum(pj.cosine_similarity(a, b) * c)  # noqa: E731
        f = jax.value_and_grad(loss, argnums=(0, 1))
        assert sorted(_custom_calls(f, x, y, w)) == ["polycos_backward", "polycos_forward"]
        hlo = jax.jit(f).lower(x, y, w).compile().as_text()
        ops = set(re.findall(r"= f(?:32|64)\[64,48\]\{[0-9,]*\} ([a-z-]+)\(", hlo))  # what makes N x D arrays
        assert ops <= {"parameter", "custom-call", "get-tuple-element"}, ops
        # grad of vmap goes through the primitive's batching rule, and keeps the kernel
        xs = jnp.ones((3, 64, 48))
        batched = jax.grad(lambda a: jax.vmap(lambda u: pj.cosine_similarity(u, y))(a).sum())
        assert "polycos_backward" in _custom_calls(batched, xs)
        # forward mode stays the tangent map in jnp (no backward kernel)
        fwd = lambda a, t: jax.jvp(lambda u: pj.cosine_similarity(u, y), (a,), (t,))  # noqa: E731
        assert _custom_calls(fwd, x, x) == ["polycos_forward"]


@needs_kernel
@pytest.mark.parametrize("x64", [False, True], ids=["x64-off", "x64-on"])
@pytest.mark.parametrize("dtype", ["float32", "float64", "float16"])
def test_reverse_mode_equals_the_core_vjp_bitwise(x64: bool, dtype: str) -> None:
    """Unbroadcast rows: the kernel's backward mirrors :func:`polycos._core.vjp` bit for bit.

    The core runs in NumPy on the kernel's own residuals (the sums are the
    kernel's; the gradient's elementwise step is mirrored exactly), in every
    regime: above and below ``eps``, zero rows.
    """
    from polycos import _core

    if dtype == "float64" and not x64:
        pytest.skip("no float64 without x64")
    rng = np.random.default_rng(31)
    a = rng.standard_normal((9, 37))
    b = rng.standard_normal((9, 37))
    a[1] *= 1e-3  # below eps
    a[2] = 0.0
    b[3] *= 1e-3
    g = rng.standard_normal(9)
    eps = 1e-2
    with jax.enable_x64(x64):
        x1, x2, gj = jnp.asarray(a, dtype), jnp.asarray(b, dtype), jnp.asarray(g, dtype)
        _, pull = jax.vjp(lambda u, v: pj.cosine_similarity(u, v, eps=eps), x1, x2)
        d1, d2 = jax.jit(pull)(gj)
        _, packed = jax.jit(backend.cosine, static_argnums=(2, 3))(x1, x2, 1, eps)
    res = _core.unpack_residuals(np, np.asarray(packed), 1)
    n1, n2, ng = (np.asarray(v) for v in (x1, x2, gj))
    r1, r2 = _core.vjp(np, ng, n1, n2, 1, eps, res)
    assert (d1.dtype, d2.dtype) == (x1.dtype, x2.dtype)
    np.testing.assert_array_equal(np.asarray(d1), r1)
    np.testing.assert_array_equal(np.asarray(d2), r2)


_BROADCASTS = [
    pytest.param((1, 3, 6), (2, 3, 6), -1, id="batch-dim"),
    pytest.param((6,), (2, 3, 6), -1, id="lower-rank"),
    pytest.param((2, 3, 1), (2, 3, 6), 2, id="along-the-axis"),
    pytest.param((3, 6), (2, 1, 6), 1, id="both-broadcast-dim1"),
]


@pytest.mark.parametrize(("shape1", "shape2", "dim"), _BROADCASTS)
@pytest.mark.parametrize("x64", [False, True], ids=["x64-off", "x64-on"])
def test_broadcast_gradients_are_summed_in_the_accumulation_dtype(shape1: tuple, shape2: tuple, dim: int,
                                                                 x64: bool) -> None:
    """Broadcast inputs: the kernel's gradients summed back to their shapes, within rounding of the exact ones."""
    rng = np.random.default_rng(32)
    a, b = rng.standard_normal(shape1), rng.standard_normal(shape2)
    with jax.enable_x64(x64):
        x1, x2 = jnp.asarray(a, jnp.float32), jnp.asarray(b, jnp.float32)
        f = partial(pj.cosine_similarity, dim=dim)
        g = jnp.asarray(rng.standard_normal(f(x1, x2).shape), jnp.float32)
        d1, d2 = jax.jit(lambda u, v: jax.vjp(f, u, v)[1](g))(x1, x2)
        assert (d1.shape, d2.shape, d1.dtype, d2.dtype) == (shape1, shape2, jnp.float32, jnp.float32)
    for d, (exact, scale) in zip((d1, d2), _exact_vjp_and_scale(g, x1, x2, dim), strict=True):
        assert np.all(np.abs(np.asarray(d, np.float64) - exact) <= 2.0**-20 * scale)


def _exact_vjp_and_scale(g: jax.Array, x1: jax.Array, x2: jax.Array, dim: int) -> list:
    """Per input: the exact gradient and the sum of the magnitudes of what makes it up.

    The bracket ``x2 / (c1 c2) - s x1 / n1^2`` and the sums over broadcast axes can
    cancel (along the axis they do: the gradient is orthogonal to ``x``), so
    errors are bounded relative to those magnitudes, not to the result.
    """
    from polycos._core import sum_to_shape

    full = np.broadcast_shapes(x1.shape, x2.shape)
    u, v = (np.broadcast_to(np.asarray(t, np.float64), full) for t in (x1, x2))
    gk = np.expand_dims(np.asarray(g, np.float64), dim)
    terms = reference_vjp(np.asarray(g, np.float64), u, v, dim)  # before the sums over broadcast axes
    n1, n2 = (np.linalg.norm(t, axis=dim, keepdims=True) for t in (u, v))
    s = np.abs(np.sum(u * v, axis=dim, keepdims=True)) / (n1 * n2)
    mags = (np.abs(gk) * (np.abs(v) / (n1 * n2) + s * np.abs(u) / n1**2),
            np.abs(gk) * (np.abs(u) / (n1 * n2) + s * np.abs(v) / n2**2))
    return [(sum_to_shape(np, t, x.shape), sum_to_shape(np, m, x.shape))
            for t, m, x in zip(terms, mags, (x1, x2), strict=True)]


@pytest.mark.parametrize(("shape1", "shape2", "dim"), _BROADCASTS)
def test_kernel_and_core_pullbacks_agree(shape1: tuple, shape2: tuple, dim: int) -> None:
    """The transpose's two branches (the kernel on CPU, the core elsewhere) give the same gradients."""
    rng = np.random.default_rng(33)
    x1, x2 = (jnp.asarray(rng.standard_normal(s), jnp.float32) for s in (shape1, shape2))
    nd = max(len(shape1), len(shape2))
    axis = dim % nd
    out, packed = jax.jit(backend.cosine, static_argnums=(2, 3))(x1, x2, axis, 1e-8)
    g = jnp.asarray(rng.standard_normal(out.shape), jnp.float32)
    args = (g, x1, x2, packed, axis, 1e-8, shape1, shape2)
    core = jax.jit(backend._core_pullback, static_argnums=(4, 5, 6, 7))(*args)
    if backend._kernels() is not None:
        kernel = jax.jit(backend._kernel_pullback, static_argnums=(4, 5, 6, 7))(*args)
        for k, c, (_, scale) in zip(kernel, core, _exact_vjp_and_scale(g, x1, x2, dim), strict=True):
            assert (k.shape, k.dtype) == (c.shape, c.dtype)
            assert np.all(np.abs(np.asarray(k, np.float64) - np.asarray(c)) <= 2.0**-20 * scale)
    public = jax.jit(lambda u, v: jax.vjp(partial(pj.cosine_similarity, dim=dim), u, v)[1](g))(x1, x2)
    for p, k in zip(public, kernel if backend._kernels() is not None else core, strict=True):
        np.testing.assert_array_equal(np.asarray(p), np.asarray(k))  # the public path is that branch


def test_kernel_and_core_primal_agree() -> None:
    a, b = (jax.random.normal(k, (33, 70)) for k in _keys(2))
    out, res = jax.jit(backend.cosine, static_argnums=(2, 3))(a, b, 1, 1e-8)
    core_out, core_res = jax.jit(backend._core_primal, static_argnums=(2, 3))(a, b, 1, 1e-8)
    assert float(jnp.max(jnp.abs(out - core_out))) <= 2.0**-23
    np.testing.assert_allclose(np.asarray(res), np.asarray(core_res), rtol=2e-7, atol=1e-30)


@needs_kernel
@pytest.mark.parametrize("x64", [False, True], ids=["x64-off", "x64-on"])
def test_value_alone_is_the_differentiated_value(x64: bool) -> None:
    """The value-only kernel call (float64 accumulation for float32, x64 off too) gives the bits that
    ``value_and_grad`` gives (the residual-writing call: compensated float32 sums with x64 off) and NumPy's."""
    rng = np.random.default_rng(35)
    for d in (3, 16, 300):
        a = rng.standard_normal((2000, d)).astype(np.float32)
        b = (a + rng.choice([1e-4, 1e-2, 1.0], (2000, 1)) * rng.standard_normal((2000, d))).astype(np.float32)
        with jax.enable_x64(x64):
            x1, x2 = jnp.asarray(a), jnp.asarray(b)
            alone = jax.jit(pj.cosine_similarity)(x1, x2)
            differentiated = jax.jit(lambda u: jax.vjp(lambda w: pj.cosine_similarity(w, x2), u)[0])(x1)  # noqa: B023
        np.testing.assert_array_equal(np.asarray(alone), np.asarray(differentiated))
        np.testing.assert_array_equal(np.asarray(alone), polycos.cosine_similarity(a, b))


# --------------------------------------------------------------------------- every mode of differentiation (G5, G10, G11)


def _regimes(dtype: jnp.dtype) -> list:
    """Every regime in one (4, 5) batch where possible: each new shape or eps is a compilation."""
    k1, k2 = _keys(2)
    x1, x2 = jax.random.normal(k1, (4, 5), dtype), jax.random.normal(k2, (4, 5), dtype)
    mixed1 = x1.at[1].multiply(0.05).at[2].set(0.0)  # rows above eps, below eps, zero
    mixed2 = x2.at[0].multiply(0.05).at[3].set(0.0)
    return [
        pytest.param(mixed1, mixed2, 0.5, 1, id="above-below-zero-eps>0"),
        pytest.param(x1[:1], x2, 1e-8, 0, id="broadcast-dim0"),
        pytest.param(x1[0, 0], x2[0, 0], 1e-8, 0, id="0-d"),
    ]


@pytest.mark.parametrize(("x1", "x2", "eps", "dim"), _regimes(jnp.float32))
def test_check_grads_forward_and_reverse_float32(x1: jax.Array, x2: jax.Array, eps: float, dim: int) -> None:
    f = partial(pj.cosine_similarity, dim=dim, eps=eps)
    check_grads(f, (x1, x2), order=2, modes=["fwd", "rev"], atol=2e-2, rtol=2e-2)
    g = jnp.ones(f(x1, x2).shape)
    grads = jax.vjp(f, x1, x2)[1](g)
    assert_vjp_matches_reference(grads, np.asarray(g), np.asarray(x1), np.asarray(x2), dim, eps)


def test_check_grads_float64_every_mode() -> None:
    with jax.enable_x64(True):
        for p in _regimes(jnp.float64):
            x1, x2, eps, dim = p.values
            f = partial(pj.cosine_similarity, dim=dim, eps=eps)
            check_grads(f, (x1, x2), order=2, modes=["fwd", "rev"])


def test_jvp_jacfwd_jacrev_hessian_agree_with_the_exact_jacobian() -> None:
    with jax.enable_x64(True):
        x1, x2 = (jax.random.normal(k, (3, 4), jnp.float64) for k in _keys(2))
        x1 = x1.at[1].multiply(1e-3)  # a row below eps
        eps = 0.01
        f = partial(pj.cosine_similarity, eps=eps)
        jf = jax.jacfwd(f, argnums=(0, 1))(x1, x2)
        jr = jax.jacrev(f, argnums=(0, 1))(x1, x2)
        for u, v in zip(jf, jr, strict=True):
            np.testing.assert_allclose(np.asarray(u), np.asarray(v), rtol=1e-12, atol=1e-12 / eps)
        for i in range(3):
            e = np.zeros(3)
            e[i] = 1.0
            r1, r2 = reference_vjp(e, np.asarray(x1), np.asarray(x2), 1, eps)
            np.testing.assert_allclose(np.asarray(jr[0][i]), r1, rtol=1e-12, atol=1e-14)
            np.testing.assert_allclose(np.asarray(jr[1][i]), r2, rtol=1e-12, atol=1e-14)
        _, tangent = jax.jvp(lambda a: f(a, x2), (x1,), (jnp.ones_like(x1),))
        np.testing.assert_allclose(np.asarray(tangent), np.asarray(jr[0].sum((-2, -1))), rtol=1e-12)
        loss = lambda a: f(a, x2).sum()  # noqa: E731
        h_fr = jax.jacfwd(jax.grad(loss))(x1)
        h_rr = jax.jacrev(jax.grad(loss))(x1)
        h = jax.hessian(loss)(x1)
        np.testing.assert_allclose(np.asarray(h_fr), np.asarray(h_rr), rtol=1e-9, atol=1e-12 / eps**2)
        np.testing.assert_allclose(np.asarray(h), np.asarray(h_rr), rtol=1e-9, atol=1e-12 / eps**2)


def test_vmap_of_grad_and_jit() -> None:
    x1, x2 = (jax.random.normal(k, (6, 3, 4)) for k in _keys(2))
    batched = jax.jit(jax.vmap(pj.cosine_similarity))(x1, x2)
    looped = jnp.stack([pj.cosine_similarity(a, b) for a, b in zip(x1, x2, strict=True)])
    np.testing.assert_array_equal(np.asarray(batched), np.asarray(looped))
    per_sample = jax.vmap(jax.grad(lambda a, b: pj.cosine_similarity(a, b, dim=0)))(x1[:, 0], x1[:, 1])
    ref = reference_vjp(np.ones(6), np.asarray(x1[:, 0]), np.asarray(x1[:, 1]), 1)[0]
    np.testing.assert_allclose(np.asarray(per_sample), ref, rtol=1e-5, atol=1e-6)
    axis_batched = jax.vmap(lambda a, b: pj.cosine_similarity(a, b, dim=0), in_axes=(1, 1))(x1, x2)
    np.testing.assert_allclose(np.asarray(axis_batched), np.asarray(pj.cosine_similarity(x1, x2, dim=0)),
                               rtol=0, atol=2e-7)


@pytest.mark.parametrize("in_axes", [(0, 0), (1, None), (None, 2), (2, 1)], ids=str)
def test_grad_of_vmap_and_vmap_of_grad_agree_with_a_loop(in_axes: tuple) -> None:
    """Batched tangents, batched inputs and batched residuals meet in the primitive's batching rule."""
    k1, k2 = _keys(2)
    x1, x2 = jax.random.normal(k1, (4, 3, 5)), jax.random.normal(k2, (4, 3, 5))
    a = x1 if in_axes[0] is not None else x1[0]
    b = x2 if in_axes[1] is not None else x2[0]
    a, b = (v if ax is None else jnp.moveaxis(v, 0, ax) for v, ax in zip((a, b), in_axes, strict=True))
    f = lambda u, v: pj.cosine_similarity(u, v, dim=-1)  # noqa: E731
    loss = lambda u, v: jax.vmap(f, in_axes=in_axes)(u, v).sum()  # noqa: E731
    g1, g2 = jax.jit(jax.grad(loss, (0, 1)))(a, b)
    per = jax.jit(jax.vmap(jax.grad(lambda u, v: f(u, v).sum(), (0, 1)), in_axes=in_axes))(a, b)

    def pick(v: jax.Array, ax: int | None, i: int) -> jax.Array:
        return v if ax is None else jnp.take(v, i, axis=ax)

    r1 = np.zeros(a.shape)
    r2 = np.zeros(b.shape)
    for i in range(4):
        u, v = pick(a, in_axes[0], i), pick(b, in_axes[1], i)
        e1, e2 = reference_vjp(np.ones(3), np.asarray(u), np.asarray(v), -1)
        for r, e, ax, p in ((r1, e1, in_axes[0], per[0]), (r2, e2, in_axes[1], per[1])):
            if ax is None:
                r += e
            else:
                idx = [slice(None)] * r.ndim
                idx[ax] = i
                r[tuple(idx)] = e
            np.testing.assert_allclose(np.asarray(pick(p, 0, i)), e, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(np.asarray(g1), r1, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(np.asarray(g2), r2, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize(("shape1", "shape2", "dim"), _BROADCASTS)
def test_check_grads_on_broadcast_shapes(shape1: tuple, shape2: tuple, dim: int) -> None:
    with jax.enable_x64(True):
        rng = np.random.default_rng(34)
        x1, x2 = (jnp.asarray(rng.standard_normal(s)) for s in (shape1, shape2))
        check_grads(partial(pj.cosine_similarity, dim=dim), (x1, x2), order=2, modes=("fwd", "rev"))


@pytest.mark.parametrize("x64", [False, True], ids=["x64-off", "x64-on"])
def test_empty_and_zero_d_gradients(x64: bool) -> None:
    """No rows: zero gradients of the inputs' shapes (nothing of a broadcast partner's size); 0-d: derivative 0."""
    with jax.enable_x64(x64):
        dt = jnp.float64 if x64 else jnp.float32
        grad = jax.jit(jax.grad(lambda u, v: pj.cosine_similarity(u, v).sum(), (0, 1)))
        for s1, s2 in (((0, 4), (0, 4)), ((0, 4), (1, 4)), ((3, 0), (3, 0)), ((2, 0, 3), (1, 0, 3))):
            d1, d2 = grad(jnp.ones(s1, dt), jnp.ones(s2, dt))
            assert (d1.shape, d2.shape, d1.dtype, d2.dtype) == (s1, s2, dt, dt)
            assert not np.any(np.asarray(d1))
            assert not np.any(np.asarray(d2))
        scalar = jax.jit(jax.grad(lambda u, v: pj.cosine_similarity(u, v, dim=0), (0, 1)))
        for u, v in ((2.0, -3.0), (0.0, 1.0), (0.0, 0.0)):  # below eps, s = u v / (eps |v|): 1 / eps at (0, 1)
            d = scalar(jnp.asarray(u, dt), jnp.asarray(v, dt))
            ref = reference_vjp(np.ones(()), np.asarray(u), np.asarray(v), 0)
            assert all(t.shape == () and t.dtype == dt for t in d)
            np.testing.assert_allclose(np.asarray(d, np.float64), np.asarray(ref), rtol=1e-6)
        per = jax.vmap(jax.grad(lambda u, v: pj.cosine_similarity(u, v, dim=0)))(jnp.ones(3, dt), jnp.arange(3.0, dtype=dt))
        np.testing.assert_array_equal(np.asarray(per), np.zeros(3))  # s = 0 or 1, constant: derivative 0


@pytest.mark.parametrize("dtype", ["float16", "bfloat16", "float32"])
def test_subnormal_eps_traces_under_errstate_raise(dtype: str) -> None:
    """G13: tracing casts eps to the dtype with NumPy; 1e-39 is subnormal in float32, and valid."""
    a = jnp.ones((2, 3), dtype)
    b = jnp.arange(6.0).reshape(2, 3).astype(dtype)
    calls = {
        "value": lambda e: pj.cosine_similarity(a, b, eps=e),
        "jit": lambda e: jax.jit(lambda u, v: pj.cosine_similarity(u, v, eps=e))(a, b),
        "grad": lambda e: jax.grad(lambda u: pj.cosine_similarity(u, b, eps=e).astype(jnp.float32).sum())(a),
        "jvp": lambda e: jax.jvp(lambda u: pj.cosine_similarity(u, b, eps=e), (a,), (b,))[1],
        "pairwise": lambda e: pj.pairwise_cosine_similarity(a, b, eps=e),
        "pairwise_grad": lambda e: jax.grad(lambda u: pj.pairwise_cosine_similarity(u, b, eps=e).astype(jnp.float32).sum())(a),
        "outer": lambda e: pj.cosine_similarity(a[:, None, :], b[None], dim=-1, eps=e),
    }
    for name, call in calls.items():
        for eps in (1e-39, 1e-45):
            expected = np.asarray(call(eps), np.float64)
            with np.errstate(all="raise"), warnings.catch_warnings():
                warnings.simplefilter("error")
                got = np.asarray(call(eps), np.float64)
            np.testing.assert_array_equal(got, expected, err_msg=f"{name}, eps={eps}")


@pytest.mark.filterwarnings("ignore:the matrix subclass:PendingDeprecationWarning")
def test_numpy_inputs_follow_numpys_input_policy() -> None:
    """polycos.jax converts NumPy arrays as jax.numpy does, after polycos's NumPy checks (not JAX's errors)."""
    y = np.ones((1, 2))
    for bad, match in (
        (np.matrix([[1.0, 2.0]]), r"x1 is a numpy.matrix"),
        (np.ma.masked_array([[1.0, 2.0]]), r"x1 is a numpy masked array"),
        (np.array([["a", "b"]]), r"x1 has dtype <U1, which is not numeric"),
        (np.array([[1, 2]], dtype=object), r"x1 has dtype object, which is not numeric"),
        (np.array([[1, 2]], dtype="datetime64[s]"), r"x1 has dtype datetime64\[s\], which is not numeric"),
    ):
        with pytest.raises(TypeError, match=match):
            pj.cosine_similarity(bad, y)
        with pytest.raises(TypeError, match=match):
            pj.pairwise_cosine_similarity(bad, y)
    with pytest.raises(TypeError, match=r"x2 is a numpy.matrix"):
        pj.pairwise_cosine_similarity(y, np.matrix(y))
    s = pj.cosine_similarity(np.array([[3.0, 4.0]]), np.array([[4.0, 3.0]]))  # plain arrays: converted
    assert isinstance(s, jax.Array)
    np.testing.assert_allclose(np.asarray(s), [0.96], rtol=1e-6)


SHARDING_SCRIPT = textwrap.dedent(
    """
    import jax, jax.numpy as jnp, numpy as np
    from jax.sharding import Mesh, NamedSharding, PartitionSpec as P
    from polycos.jax import cosine_similarity
    assert len(jax.devices()) == 2
    mesh = Mesh(np.array(jax.devices()), ("rows",))
    x = jax.random.normal(jax.random.key(0), (64, 32))
    y = jax.random.normal(jax.random.key(1), (64, 32))
    xs = jax.device_put(x, NamedSharding(mesh, P("rows")))
    ys = jax.device_put(y, NamedSharding(mesh, P("rows")))
    loss = jax.jit(lambda a, b: cosine_similarity(a, b).sum())
    g1, g2 = jax.jit(jax.grad(loss, (0, 1)))(xs, ys)
    r1, r2 = jax.grad(loss, (0, 1))(x, y)
    np.testing.assert_allclose(np.asarray(g1), np.asarray(r1), rtol=1e-6, atol=1e-9)
    np.testing.assert_allclose(np.asarray(jax.jit(cosine_similarity)(xs, ys)), np.asarray(cosine_similarity(x, y)))
    print("sharded ok")
    """
)


SHARD_MAP_SCRIPT = textwrap.dedent(
    """
    import jax, jax.numpy as jnp, numpy as np
    from jax.sharding import Mesh, PartitionSpec as P
    import polycos.jax as pj
    assert len(jax.devices()) == 2
    mesh = Mesh(np.array(jax.devices()), ("d",))
    rng = np.random.default_rng(3)
    x = jnp.asarray(rng.standard_normal((8, 6)), jnp.float32)
    y = jnp.asarray(rng.standard_normal((8, 6)), jnp.float32)
    q = jnp.asarray(rng.standard_normal((1, 6)), jnp.float32)
    cs = lambda a, b: pj.cosine_similarity(a, b, dim=-1)
    pw = pj.pairwise_cosine_similarity
    def sm(f, out=P("d")):  # rows of the first input sharded, the second replicated
        return jax.jit(jax.shard_map(f, mesh=mesh, in_specs=(P("d"), P()), out_specs=out))
    close = lambda a, b: np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=2e-6, atol=1e-7)
    # values: a replicated partner broadcast against sharded rows (the rescue's cond saw two types)
    for b in (q, q[0], y[:4]):
        close(sm(cs)(x, b), jnp.concatenate([cs(x[:4], b), cs(x[4:], b)]))
    # gradients of a shard_map with respect to its replicated input: summed over the devices
    for f, b, unsharded in ((cs, y[:4], lambda a, b: jnp.concatenate([cs(a[:4], b), cs(a[4:], b)])),
                            (pw, y, pw)):
        loss = lambda a, b, f=f: sm(f)(a, b).sum()
        got = jax.jit(jax.grad(loss, (0, 1)))(x, b)
        want = jax.grad(lambda a, b: unsharded(a, b).sum(), (0, 1))(x, b)
        for u, v in zip(got, want):
            close(u, v)
    # inside: the gradient of a replicated input is already the sum over the devices
    inner = sm(lambda a, b: jax.grad(lambda u, v: cs(u, v).sum(), 1)(a, b), out=P())(x, y[:4])
    close(inner, jax.grad(lambda a, b: (cs(a[:4], b) + cs(a[4:], b)).sum(), 1)(x, y[:4]))
    with jax.enable_x64(True):
        got = jax.jit(jax.grad(lambda a, b: sm(pw)(a, b).sum(), (0, 1)))(x, y)
        want = jax.grad(lambda a, b: pw(a, b).sum(), (0, 1))(x, y)
        for u, v in zip(got, want):
            close(u, v)
    print("shard_map ok")
    """
)


def test_shard_map_with_a_replicated_input() -> None:
    """``shard_map`` with sharded rows against a replicated partner (a broadcast query, shared
    prototypes): values, and gradients of the replicated input summed over the devices (G10)."""
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=2", JAX_PLATFORMS="cpu")
    res = subprocess.run([sys.executable, "-c", SHARD_MAP_SCRIPT], env=env, capture_output=True, text=True,
                         timeout=300, check=False)
    assert res.returncode == 0, res.stderr[-4000:]
    assert "shard_map ok" in res.stdout


def test_pairwise_under_disable_jit() -> None:
    """Float32 pairwise with x64 off runs its scoped float64 code eagerly (it recursed forever)."""
    x = jnp.asarray(np.random.default_rng(0).standard_normal((4, 5)), jnp.float32)
    want = pj.pairwise_cosine_similarity(x)
    with jax.disable_jit():
        np.testing.assert_array_equal(np.asarray(pj.pairwise_cosine_similarity(x)), np.asarray(want))
        outer = pj.cosine_similarity(x[:, None], x[None], dim=-1)
        g = jax.grad(lambda a: pj.pairwise_cosine_similarity(a, x).sum())(x)
    np.testing.assert_allclose(np.asarray(outer), np.asarray(want), rtol=0, atol=1e-7)
    np.testing.assert_allclose(np.asarray(g), np.asarray(jax.grad(lambda a: pj.pairwise_cosine_similarity(a, x).sum())(x)),
                               rtol=1e-6, atol=1e-7)


def test_sharded_rows_over_two_devices() -> None:
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=2", JAX_PLATFORMS="cpu")
    res = subprocess.run([sys.executable, "-c", SHARDING_SCRIPT], env=env, capture_output=True, text=True, timeout=300,
                         check=False)
    assert res.returncode == 0, res.stderr[-4000:]
    assert "sharded ok" in res.stdout


# --------------------------------------------------------------------------- parity with optax, dtypes, x64


@settings(max_examples=12)  # each drawn shape and eps is a compilation
@given(pair=rows(n_max=3, d_max=4), eps=st.sampled_from([1e-8, 0.5, 3.0]))
def test_matches_optax_where_eps_rules_agree(pair: tuple, eps: float) -> None:
    optax = pytest.importorskip("optax")
    # optax clamps the squared norm: max(n^2, epsilon) = max(n, eps)^2 with epsilon = eps^2.
    # Where a norm is eps to within float32 rounding the rules tie, and jnp.maximum splits
    # optax's gradient half and half between its branches: no common answer to compare.
    for a in pair:
        n = np.linalg.norm(np.asarray(a, np.float64), axis=-1)
        assume(np.all(np.abs(n - eps) > 1e-6 * eps))
    a1, a2 = (jnp.asarray(a) for a in pair)
    ours = pj.cosine_similarity(a1, a2, dim=-1, eps=eps)
    theirs = optax.cosine_similarity(a1, a2, epsilon=eps**2)
    np.testing.assert_allclose(np.asarray(ours), np.clip(np.asarray(theirs), -1, 1), atol=3e-6)

    def loss(f):  # type: ignore[no-untyped-def]
        return lambda a, b: jnp.sum(f(a, b) * jnp.arange(1.0, a.shape[0] + 1))

    ours_g = jax.grad(loss(partial(pj.cosine_similarity, dim=-1, eps=eps)), (0, 1))(a1, a2)
    theirs_g = jax.grad(loss(partial(optax.cosine_similarity, epsilon=eps**2)), (0, 1))(a1, a2)
    for x, y, a in zip(ours_g, theirs_g, (a1, a2), strict=True):
        c = np.maximum(np.linalg.norm(np.asarray(a, np.float64), axis=-1, keepdims=True), eps)
        np.testing.assert_allclose(np.asarray(x), np.asarray(y), rtol=0, atol=float(1e-4 * a.shape[0] / c.min()))


def test_dtype_follows_jax_promotion() -> None:
    i = jnp.asarray([[1, 2], [3, 4]], dtype=jnp.int32)
    h = jnp.asarray([[1, 2], [3, 4]], dtype=jnp.float16)
    assert pj.cosine_similarity(i, i).dtype == jnp.float32
    assert pj.cosine_similarity(h, h).dtype == jnp.float16
    assert pj.cosine_similarity(h, h.astype(jnp.bfloat16)).dtype == jnp.float32
    with jax.enable_x64(True):
        f32 = jnp.asarray([[1.0, 2.0], [3.0, 4.0]], dtype=jnp.float32)
        # an integer with a float: JAX's own promotion (as jnp arithmetic), not int64 -> float64 first
        assert pj.cosine_similarity(jnp.asarray([[1, 2], [3, 4]]), f32).dtype == jnp.float32
        assert pj.cosine_similarity(jnp.asarray([[1, 2], [3, 4]]), jnp.asarray([[1, 2], [3, 4]])).dtype == jnp.float64
        assert pj.cosine_similarity(f32, f32).dtype == jnp.float32
        assert pj.cosine_similarity(f32, f32.astype(jnp.float64)).dtype == jnp.float64
    assert pj.cosine_similarity(i, h).dtype == jnp.result_type(i, h) == jnp.float16


def test_x64_off_and_on_in_subprocesses_agree() -> None:
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
        out[mode] = np.load(io.BytesIO(res.stdout))
    x = np.asarray(jax.random.normal(jax.random.key(0), (64, 300), jnp.float32))
    y = x + 1e-3 * np.asarray(jax.random.normal(jax.random.key(1), (64, 300), jnp.float32))
    for mode in ("off", "on"):
        assert_matches_reference(out[mode][:64].astype(np.float32), x, y)
    np.testing.assert_allclose(out["off"][64:], out["on"][64:], rtol=0, atol=1e-6)


def test_traced_eps_is_refused_clearly() -> None:
    """One message, naming the tracer, under every transform that traces (not only jit)."""
    a = jnp.ones((2, 3))
    traced = {
        "jit": lambda f: jax.jit(f)(0.1),
        "vmap": lambda f: jax.vmap(f)(jnp.full(2, 0.1)),
        "grad": lambda f: jax.grad(lambda e: f(e).sum())(0.1),
    }
    for name, run in traced.items():
        for fn in (pj.cosine_similarity, polycos.cosine_similarity):
            with pytest.raises(TypeError, match=r"eps must be a concrete number, got a traced value .*Tracer.*"
                                                r"jax.jit, vmap or grad .*static_argnames"):
                run(lambda e, fn=fn: fn(a, a, eps=e))
            if name != "grad":  # (under grad alone, e > 0 is a concrete array: no tangent to carry)
                with pytest.raises(TypeError, match=r"dim must be a concrete number, got a traced value .*Tracer"):
                    run(lambda e, fn=fn: fn(a, a, dim=(e > 0).astype(jnp.int32)))


# --------------------------------------------------------------------------- range on XLA (issue 13)


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_rows_near_the_top_of_the_range_on_the_xla_core(dtype: jnp.dtype) -> None:
    """XLA divides by a flushed reciprocal: ``x / max|x|`` near the top would be 0; the core path scales by ldexp."""
    top = 3.3e38 if dtype == jnp.float32 else 3.0e38
    x = np.array([[top, 1e38, -2e38]])
    y = np.array([[1e38, top, 2e38]])
    a, b = jnp.asarray(x, dtype), jnp.asarray(y, dtype)
    exact = reference(np.asarray(a, np.float64), np.asarray(b, np.float64), eps=0.0)
    for fn in (backend._core_primal, backend.cosine):
        s, _ = jax.jit(fn, static_argnums=(2, 3))(a, b, 1, 0.0)
        assert abs(float(s[0]) - float(exact[0])) <= 2.0 ** -(23 if dtype == jnp.float32 else 7)


# --------------------------------------------------------------------------- pairwise (G9, issue 16)


def test_outer_broadcast_is_one_matrix_product_with_exact_gradients() -> None:
    rng = np.random.default_rng(21)
    z = rng.standard_normal((5, 4)).astype(np.float32)
    z[1] = 0.0
    y = rng.standard_normal((3, 4)).astype(np.float32)
    zj, yj = jnp.asarray(z), jnp.asarray(y)
    f = jax.jit(lambda a, b: pj.cosine_similarity(a[:, None], b[None], dim=-1))
    graph = f.lower(zj, yj).as_text()  # float32 pairwise with x64 off is a primitive: its lowering
    assert "dot_general" in graph
    assert "5x3x4" not in graph
    assert_matches_reference(np.asarray(f(zj, yj)), z[:, None], y[None], -1, 1e-8)
    g = rng.standard_normal((5, 3)).astype(np.float32)
    ga, gb = jax.vjp(f, zj, yj)[1](jnp.asarray(g))
    r1, r2 = reference_vjp(g, z[:, None], y[None], -1, 1e-8)
    np.testing.assert_allclose(np.asarray(ga), r1.reshape(5, 4), atol=1e-5, rtol=1e-5)
    np.testing.assert_allclose(np.asarray(gb), r2.reshape(3, 4), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("x64", [False, True], ids=["x64-off", "x64-on"])
@settings(max_examples=15)  # values are random each time; shapes from a small set (one compilation each)
@given(data=st.data())
def test_pairwise_within_one_ulp_whatever_the_cpu(x64: bool, data: st.DataObject) -> None:
    """Issue 16: float32 products run in float64 (scoped when x64 is off), halves in float32."""
    dtype = data.draw(st.sampled_from(["float32", "bfloat16", "float16"]))
    n, m, d = data.draw(st.sampled_from([(1, 1, 3), (5, 7, 16), (7, 2, 128), (3, 6, 300)]))
    seed = data.draw(st.integers(0, 2**32 - 1))
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((n, d))
    y = x[rng.integers(0, n, m)] + data.draw(st.sampled_from([0.0, 1e-4, 1.0])) * rng.standard_normal((m, d))
    with jax.enable_x64(x64):
        a, b = jnp.asarray(x, dtype), jnp.asarray(y, dtype)
        s = jax.jit(polycos.pairwise_cosine_similarity)(a, b)
        assert s.dtype == a.dtype
        s_outer = pj.cosine_similarity(a[:, None], b[None], dim=-1)
    xa, ya = np.asarray(a, np.float64), np.asarray(b, np.float64)
    assert_matches_reference(np.asarray(s), xa[:, None], ya[None], -1)
    assert_matches_reference(np.asarray(s_outer), xa[:, None], ya[None], -1)


def test_pairwise_check_grads_second_order() -> None:
    with jax.enable_x64(True):
        rng = np.random.default_rng(22)
        z = jnp.asarray(rng.standard_normal((4, 3)))
        y = jnp.asarray(rng.standard_normal((2, 3)))
        check_grads(lambda a: polycos.pairwise_cosine_similarity(a), (z,), order=2, modes=["rev"])
        check_grads(lambda a, b: pj.cosine_similarity(a[None], b[:, None], dim=2), (z, y), order=2, modes=["rev"])


def test_second_derivatives_of_float32_pairwise_with_x64_off() -> None:
    """Grad of grad through the scoped float64 (the primitive's JVP and transpose rules), plain, jitted,
    under ``jit(vmap)`` and ``vmap(jit)``, against the float64 computation; no float64 product made
    float32 on the way (JAX warns when it truncates one)."""
    rng = np.random.default_rng(23)
    x, y = rng.standard_normal((2, 5, 4)), rng.standard_normal((2, 6, 4))

    def grad_norm(a: jax.Array, b: jax.Array) -> jax.Array:
        inner = jax.grad(lambda u, v: jnp.sum(polycos.pairwise_cosine_similarity(u, v) ** 2), argnums=(0, 1))
        return sum(jnp.sum(t**2) for t in inner(a, b))

    outer = jax.grad(grad_norm, argnums=(0, 1))
    with jax.enable_x64(True):
        want = jax.vmap(outer)(jnp.asarray(x), jnp.asarray(y))
    a, b = jnp.asarray(x, jnp.float32), jnp.asarray(y, jnp.float32)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        for got in (outer(a[0], b[0]), jax.jit(outer)(a[0], b[0])):
            for u, w in zip(got, want, strict=True):
                np.testing.assert_allclose(np.asarray(u), np.asarray(w[0]), rtol=2e-4, atol=2e-4)
        for batched in (jax.jit(jax.vmap(outer))(a, b), jax.vmap(jax.jit(outer))(a, b)):
            for u, w in zip(batched, want, strict=True):
                np.testing.assert_allclose(np.asarray(u), np.asarray(w), rtol=2e-4, atol=2e-4)


def test_large_float32_product_in_blocks_of_rows_is_the_core_matrix() -> None:
    """A float32 product above 4 MiB of float64 runs as a loop over blocks of rows (one full block and a
    remainder here): each entry the core's float64 dot product rounded once, within 1 ulp(1.0) of exact."""
    from polycos import _core
    from polycos._kernels import product_blocks

    n, m, d = 600, 1100, 8
    rows = product_blocks(n, m)[0]
    assert rows < n, (n, m, rows)
    assert n % rows, (n, m, rows)
    rng = np.random.default_rng(31)
    x = rng.standard_normal((n, d))
    y = np.concatenate([x[:300] + 1e-4 * rng.standard_normal((300, d)), rng.standard_normal((m - 300, d))])
    a, b = jnp.asarray(x, jnp.float32), jnp.asarray(y, jnp.float32)
    value = jax.jit(polycos.pairwise_cosine_similarity)
    assert "while" in value.lower(a, b).as_text()  # the blocked route is the one compiled
    s = np.asarray(value(a, b))
    with jax.enable_x64(True):
        whole = _core.pairwise_forward(backend.xp, a, b, 1e-8, native_normalize=backend._normalize)[0]
    np.testing.assert_array_equal(s, np.asarray(whole))
    assert_matches_reference(s, np.asarray(a, np.float64)[:, None], np.asarray(b, np.float64)[None], -1)
    s_self = np.asarray(value(a))
    assert_matches_reference(s_self, np.asarray(a, np.float64)[:, None], np.asarray(a, np.float64)[None], -1)
    if backend._kernels() is not None:  # the loop starts from the kernel's unwritten (huge-page) buffer, not zeros
        assert 'custom_call_target="polycos_uninitialized"' in value.lower(a, b).compile().as_text()
    batched = np.asarray(jax.vmap(polycos.pairwise_cosine_similarity)(
        jnp.stack([a, a[::-1]]), jnp.stack([b, b])))  # the loop's start broadcast over the batch
    np.testing.assert_array_equal(batched[0], s)
    np.testing.assert_array_equal(batched[1], np.asarray(value(a[::-1], b)))


@pytest.mark.parametrize(("shape_a", "shape_b"), [((7, 5), (7, 3)), ((2, 7, 5), (7, 3)), ((2, 7, 5), (2, 7, 3))])
def test_transposed_product_is_the_plain_one(shape_a: tuple, shape_b: tuple) -> None:
    """``_tmatmul(a, b)`` is ``a^T b`` (the backward's ``G^T X``), also under jit, grad and vmap."""
    rng = np.random.default_rng(5)
    a, b = (jnp.asarray(rng.standard_normal(s), jnp.float32) for s in (shape_a, shape_b))
    want = jnp.matmul(jnp.swapaxes(a, -1, -2), b)
    np.testing.assert_allclose(jax.jit(backend._tmatmul)(a, b), want, rtol=1e-5, atol=1e-5)
    grads = jax.grad(lambda u, v: jnp.sum(backend._tmatmul(u, v) ** 2), argnums=(0, 1))(a, b)
    plain = jax.grad(lambda u, v: jnp.sum(jnp.matmul(jnp.swapaxes(u, -1, -2), v) ** 2), argnums=(0, 1))(a, b)
    for got, exp in zip(grads, plain, strict=True):
        np.testing.assert_allclose(got, exp, rtol=1e-4, atol=1e-4)
    batched = jax.vmap(backend._tmatmul, in_axes=(None, 0))(a, jnp.stack([b, 2 * b]))
    np.testing.assert_allclose(batched[1], 2 * want, rtol=1e-5, atol=1e-5)


def test_blocked_pairwise_gradients_match_numpy() -> None:
    """Reverse mode through the blocked forward and the transposed backward product: NumPy's gradients."""
    rng = np.random.default_rng(8)
    x, y = rng.standard_normal((600, 8)), rng.standard_normal((1100, 8))
    g = rng.standard_normal((600, 1100))
    a, b, ga = (jnp.asarray(v, jnp.float32) for v in (x, y, g))
    d1, d2 = jax.jit(jax.grad(lambda u, v: jnp.sum(polycos.pairwise_cosine_similarity(u, v) * ga),
                              argnums=(0, 1)))(a, b)
    _, vjp = polycos.pairwise_cosine_similarity_with_vjp(np.asarray(a), np.asarray(b))
    e1, e2 = vjp(np.asarray(ga))
    np.testing.assert_allclose(np.asarray(d1), e1, rtol=2e-4, atol=2e-4)
    np.testing.assert_allclose(np.asarray(d2), e2, rtol=2e-4, atol=2e-4)


@pytest.mark.parametrize("n", [9, 600])  # one product; blocks of rows (a loop started from the kernel's buffer)
def test_vmap_of_pairwise_is_a_loop(n: int) -> None:
    """``vmap`` of the pairwise value (with and without ``x2``), of its explicit VJP and of ``grad``, x64
    off: each batch element the unbatched call (float32 pairwise runs in a scoped x64)."""
    m, d = 1100 if n > 100 else 7, 8
    rng = np.random.default_rng(17)
    a = jnp.asarray(rng.standard_normal((2, n, d)), jnp.float32)
    b = jnp.asarray(rng.standard_normal((2, m, d)), jnp.float32)
    g = jnp.asarray(rng.standard_normal((2, n, m)), jnp.float32)
    loss = lambda u, v: jnp.sum(polycos.pairwise_cosine_similarity(u, v) * g[0])  # noqa: E731
    batched = {
        "value": jax.vmap(polycos.pairwise_cosine_similarity)(a, b),
        "self": jax.vmap(polycos.pairwise_cosine_similarity)(a),
        "vjp": jax.vmap(polycos.pairwise_cosine_similarity_vjp)(g, a, b),
        "grad": jax.vmap(jax.grad(loss, argnums=(0, 1)))(a, b),
    }
    for i in range(2):
        loop = {
            "value": polycos.pairwise_cosine_similarity(a[i], b[i]),
            "self": polycos.pairwise_cosine_similarity(a[i]),
            "vjp": polycos.pairwise_cosine_similarity_vjp(g[i], a[i], b[i]),
            "grad": jax.grad(loss, argnums=(0, 1))(a[i], b[i]),
        }
        for key, want in loop.items():  # values bit for bit; gradients' float32 sums may run in another order
            got = jax.tree_util.tree_map(lambda t, i=i: np.asarray(t[i]), batched[key])
            check = np.testing.assert_array_equal if key in ("value", "self") else _close_gradients
            jax.tree_util.tree_map(check, got, jax.tree_util.tree_map(np.asarray, want))
    jitted = jax.jit(jax.vmap(jax.grad(loss, argnums=(0, 1))))(a, b)
    for got, want in zip(jitted, batched["grad"], strict=True):
        _close_gradients(np.asarray(got), np.asarray(want))
    # jit inside vmap and vmap inside jit: JAX batches or re-traces a graph after polycos's scoped
    # float64 has closed, which the primitives' rules must survive (a TypeError before).
    value = polycos.pairwise_cosine_similarity
    np.testing.assert_array_equal(jax.vmap(jax.jit(value))(a, b), batched["value"])
    np.testing.assert_array_equal(jax.jit(jax.vmap(value))(a, b), batched["value"])
    np.testing.assert_array_equal(jax.jit(jax.vmap(value))(a), batched["self"])
    np.testing.assert_array_equal(jax.vmap(jax.jit(value), in_axes=(0, None))(a, b[0]),
                                  jnp.stack([value(a[i], b[0]) for i in range(2)]))
    for spelling in (jax.vmap(jax.jit(polycos.pairwise_cosine_similarity_vjp)),
                     jax.jit(jax.vmap(polycos.pairwise_cosine_similarity_vjp))):
        jax.tree_util.tree_map(_close_gradients, tuple(map(np.asarray, spelling(g, a, b))), batched["vjp"])
    vmapped_jit_grad = jax.vmap(jax.jit(jax.grad(loss, argnums=(0, 1))))(a, b)
    jax.tree_util.tree_map(_close_gradients, tuple(map(np.asarray, vmapped_jit_grad)), batched["grad"])
    if n > 100:  # each matrix of the batch keeps the product in blocks of rows
        assert "while" in jax.jit(jax.vmap(value)).lower(a, b).as_text()


def _close_gradients(got: np.ndarray, want: np.ndarray) -> None:
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6 * max(1.0, float(np.abs(want).max())))


def test_export_with_symbolic_rows_runs_the_kernel_and_matches_jit() -> None:
    """``jax.export`` with ``polycos.jax.export_safety_checks()``: row-wise (value and grad) with a
    symbolic row count; pairwise with concrete shapes (x64 off) and symbolic ones (x64 on); float32
    pairwise with symbolic shapes and x64 off raises a clear error instead of failing to lower."""
    from jax import export

    from polycos.jax import export_safety_checks

    checks = export_safety_checks()
    x = jnp.asarray(np.random.default_rng(0).standard_normal((5, 8)), jnp.float32)
    rows = jax.ShapeDtypeStruct(export.symbolic_shape("n, 8"), jnp.float32)
    fixed = jax.ShapeDtypeStruct((5, 8), jnp.float32)

    def value(a: jax.Array, b: jax.Array) -> jax.Array:
        return polycos.cosine_similarity(a, b)

    def pairwise(a: jax.Array) -> jax.Array:
        return polycos.pairwise_cosine_similarity(a)

    grad = jax.grad(lambda a, b: value(a, b).sum())
    with pytest.raises(ValueError, match="custom call"):  # why the checks are needed
        export.export(jax.jit(value))(rows, rows)
    for f, args in ((value, (rows, rows)), (grad, (rows, rows)), (pairwise, (fixed,))):
        exp = export.export(jax.jit(f), disabled_checks=checks)(*args)
        assert "polycos_" in exp.mlir_module()  # the kernel is in the exported code
        ins = [x, x[::-1]][: len(args)]
        np.testing.assert_array_equal(np.asarray(exp.call(*ins)), np.asarray(jax.jit(f)(*ins)))
    with pytest.raises(NotImplementedError, match="symbolic shapes needs jax_enable_x64"):
        export.export(jax.jit(pairwise), disabled_checks=checks)(rows)
    with jax.enable_x64(True):
        exp = export.export(jax.jit(pairwise), disabled_checks=checks)(rows)
        np.testing.assert_array_equal(np.asarray(exp.call(x)), np.asarray(jax.jit(pairwise)(x)))
    # a symbolic length too, against a broadcast partner: the XLA sums take one broadcast shape
    # (the core's pairwise tree loops over the length in Python)
    n, d = export.symbolic_shape("n, d")
    both = jax.ShapeDtypeStruct((n, d), jnp.float32)
    for partner, q in ((jax.ShapeDtypeStruct((1, d), jnp.float32), x[:1]), (jax.ShapeDtypeStruct((d,), jnp.float32), x[0])):
        for f in (value, grad):
            exp = export.export(jax.jit(f), disabled_checks=checks)(both, partner)
            np.testing.assert_array_equal(np.asarray(exp.call(x, q)), np.asarray(jax.jit(f)(x, q)))


def test_shard_map_value_gradient_and_tangent_match_unsharded() -> None:
    """Inside ``jax.shard_map`` (varying manual axes checked): the kernel's results carry the
    inputs' varying axes, as the core's do, so value, ``grad``, ``jvp`` and pairwise trace and match."""
    from jax.sharding import Mesh
    from jax.sharding import PartitionSpec as P

    mesh = Mesh(np.array(jax.devices()[:1]), ("d",))
    a = jnp.asarray(np.random.default_rng(1).standard_normal((4, 3)), jnp.float32)
    b = a[::-1] + 1

    def rows(f: Any) -> Any:
        return jax.shard_map(f, mesh=mesh, in_specs=(P("d"), P("d")), out_specs=P("d"))

    value = lambda u, v: polycos.cosine_similarity(u, v)  # noqa: E731
    grad = jax.grad(lambda u, v: value(u, v).sum())
    tangent = lambda u, v: jax.jvp(lambda w: value(w, v), (u,), (u,))[1]  # noqa: E731
    pair = lambda u, v: polycos.pairwise_cosine_similarity(u, v)  # noqa: E731
    for f in (value, grad, tangent, pair):
        np.testing.assert_array_equal(np.asarray(jax.jit(rows(f))(a, b)), np.asarray(jax.jit(f)(a, b)))


@pytest.mark.parametrize("x64", [False, True])
def test_pairwise_forward_mode_any_order(x64: bool) -> None:
    """``jvp``, ``jacfwd`` and ``hessian`` of pairwise similarity (both spellings, self and two
    inputs) against plain jnp normalise-then-multiply, ``check_grads`` to order 2 in both modes,
    under ``vmap`` and ``jit``; reverse mode unchanged (the transposed tangent is the VJP)."""
    with jax.enable_x64(x64):
        dt = jnp.float64 if x64 else jnp.float32
        x = jax.random.normal(jax.random.key(0), (4, 3), dt)
        y = jax.random.normal(jax.random.key(1), (5, 3), dt)

        def plain(a: jax.Array, b: jax.Array | None = None) -> jax.Array:
            b = a if b is None else b
            return (a / jnp.linalg.norm(a, axis=-1, keepdims=True)) @ (b / jnp.linalg.norm(b, axis=-1, keepdims=True)).T

        outer = lambda a, b: polycos.cosine_similarity(a[:, None, :], b[None, :, :], dim=-1)  # noqa: E731
        tol = 1e-10 if x64 else 2e-5
        for f, args in ((polycos.pairwise_cosine_similarity, (x,)), (polycos.pairwise_cosine_similarity, (x, y)),
                        (outer, (x, y))):
            ts = tuple(jnp.cos(a) for a in args)
            np.testing.assert_allclose(jax.jvp(f, args, ts)[1], jax.jvp(plain, args, ts)[1], atol=tol)
            np.testing.assert_allclose(jax.jacfwd(f)(*args), jax.jacrev(plain)(*args), atol=tol)
        if x64:  # (float64: the compensated row norms make every second-order graph large and slow to build)
            return
        # second order (one spelling each: every hessian compiles a graph of its own)
        sq = lambda a: (outer(a, y) ** 2).sum()  # noqa: E731
        sq_plain = lambda a: (plain(a, y) ** 2).sum()  # noqa: E731
        np.testing.assert_allclose(jax.hessian(sq)(x), jax.hessian(sq_plain)(x), atol=100 * tol)
        check_grads(polycos.pairwise_cosine_similarity, (x, y), order=2, modes=["fwd", "rev"],
                    atol=tol ** 0.5, rtol=tol ** 0.5)
        batched = (jnp.stack([x, 2 * x]),)
        tangents = lambda a: tuple(jnp.sin(b) for b in a)  # noqa: E731
        got = jax.jit(jax.vmap(lambda *a: jax.jvp(polycos.pairwise_cosine_similarity, a, tangents(a))[1]))(*batched)
        want = jax.vmap(lambda *a: jax.jvp(plain, a, tangents(a))[1])(*batched)
        np.testing.assert_allclose(got, want, atol=tol)
