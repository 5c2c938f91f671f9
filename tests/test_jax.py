"""What is specific to JAX: the kernel inside ``jit`` (``jax.ffi``), the custom JVP rule in
every mode (``jvp``, ``jacfwd``, ``grad``, ``hessian``), ``vmap``, sharding, x64 on and off,
parity with optax, and pairwise accuracy without x64 (issue 16). The guarantees themselves run
for JAX in ``test_guarantees.py``.
"""

from __future__ import annotations

import io
import os
import subprocess
import sys
import textwrap
from functools import partial

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


def test_cpu_kernel_is_called_inside_jit() -> None:
    if not backend.JaxBackend.native.fget(None):  # type: ignore[attr-defined]
        pytest.skip("the CPU kernel is not built here: JAX runs the core in jax.numpy")
    x = jnp.ones((8, 16))
    hlo = jax.jit(lambda a: pj.cosine_similarity(a, a[::-1])).lower(x).as_text()
    assert "custom_call" in hlo
    assert "polycos" in hlo
    # reverse mode is the transposed tangent rule: plain XLA, no host callback
    hlo = jax.jit(jax.grad(lambda a: pj.cosine_similarity(a, a[::-1]).sum())).lower(x).as_text()
    assert "callback" not in hlo


def test_kernel_and_core_primal_agree() -> None:
    a, b = (jax.random.normal(k, (33, 70)) for k in _keys(2))
    out, res = jax.jit(backend.cosine, static_argnums=(2, 3))(a, b, 1, 1e-8)
    core_out, core_res = jax.jit(backend._core_primal, static_argnums=(2, 3))(a, b, 1, 1e-8)
    assert float(jnp.max(jnp.abs(out - core_out))) <= 2.0**-23
    np.testing.assert_allclose(np.asarray(res), np.asarray(core_res), rtol=2e-7, atol=1e-30)


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
        assert pj.cosine_similarity(jnp.asarray([[1, 2], [3, 4]]), f32).dtype == jnp.float64
        assert pj.cosine_similarity(f32, f32).dtype == jnp.float32
        assert pj.cosine_similarity(f32, f32.astype(jnp.float64)).dtype == jnp.float64


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
    with pytest.raises(TypeError, match="eps must be a static Python float"):
        jax.jit(lambda a, e: pj.cosine_similarity(a, a, eps=e))(jnp.ones((2, 3)), 0.1)


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
    jaxpr = str(jax.make_jaxpr(f)(zj, yj))
    assert "dot_general" in jaxpr
    assert "f32[5,3,4]" not in jaxpr
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
