"""Every guarantee of the spec (G1-G9, section 4), tested once, over every installed backend.

Driven by the table in ``tests/cases.py``: the backends with their capability
flags, the sample inputs and the error inputs. Framework-specific machinery
(torch OpInfo, gradcheck, FakeTensor, compile; JAX transforms) lives in
``test_torch.py`` and ``test_jax.py``.
"""

from __future__ import annotations

import numpy as np
import pytest
from cases import BACKENDS, ERRORS, SAMPLES, BackendInfo, ErrorInput, Sample
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import polycos
from polycos import _backends
from polycos.testing import (
    _finfo,
    _round_to,
    assert_matches_reference,
    assert_vjp_matches_reference,
    cosine_inputs,
    exact_reference,
    reference,
    reference_vjp,
    to_numpy,
)

backends = pytest.mark.parametrize("info", BACKENDS, ids=lambda b: b.name)


def _flushed(info: BackendInfo, a: np.ndarray, dtype: str) -> np.ndarray:
    """What the backend computes with: XLA arithmetic flushes subnormal inputs to zero."""
    if not info.flushes_subnormals:
        return a
    tiny = float(_finfo(dtype).smallest_normal)
    return np.where(np.abs(a) < tiny, 0.0, a)


def _inputs(info: BackendInfo, sample: Sample, dtype: str) -> tuple:
    x1, x2 = info.array(sample.x1, dtype), info.array(sample.x2, dtype)
    r1 = _flushed(info, to_numpy(x1).astype(np.float64), dtype)
    r2 = _flushed(info, to_numpy(x2).astype(np.float64), dtype)
    return x1, x2, r1, r2


def _same_library(info: BackendInfo, out: object) -> None:
    owner = _backends.backend_for((("result", out),))
    assert owner.name == info.name, f"result is {type(out).__name__}, not a {info.name} array"


def _dtype(x: object) -> str:
    return str(x.dtype).rsplit(".", 1)[-1]  # type: ignore[attr-defined]


def _cases(info: BackendInfo, dtypes: tuple[str, ...] | None = None) -> list:
    return [
        pytest.param(info, s, d, id=f"{info.name}-{s.name}-{d}")
        for s in SAMPLES
        for d in (dtypes or info.dtypes)
        if d in s.dtypes and d in info.dtypes
    ]


ALL_CASES = [c for info in BACKENDS for c in _cases(info)]


# --------------------------------------------------------------------------- G1, G2 on the sample table


@pytest.mark.parametrize(("info", "sample", "dtype"), ALL_CASES)
def test_samples_match_the_exact_value(info: BackendInfo, sample: Sample, dtype: str) -> None:
    """G1, G2: |s| <= 1 and within 1 ulp(1.0) of the exact value; type, dtype and shape kept."""
    x1, x2, r1, r2 = _inputs(info, sample, dtype)
    s = polycos.cosine_similarity(x1, x2, sample.dim, sample.eps)
    _same_library(info, s)
    assert _dtype(s) == dtype
    assert_matches_reference(s, r1, r2, sample.dim, sample.eps)
    if info.name != "jax" or dtype != "float64":
        assert _dtype(s) == _dtype(x1)


@pytest.mark.parametrize(("info", "sample", "dtype"), [c for info in BACKENDS for c in _cases(info, ("float32", "float64"))])
def test_sample_gradients_match_the_exact_vjp(info: BackendInfo, sample: Sample, dtype: str) -> None:
    """The VJP (and the library's autodiff) against the exact derivative (spec 2.5)."""
    x1, x2, r1, r2 = _inputs(info, sample, dtype)
    out_shape = np.broadcast_shapes(np.shape(r1), np.shape(r2))
    out_shape = tuple(d for i, d in enumerate(out_shape) if i != sample.dim % max(len(out_shape), 1))
    g = np.linspace(-1.0, 2.0, num=max(int(np.prod(out_shape)), 1))[: int(np.prod(out_shape))].reshape(out_shape)
    grads = polycos.cosine_similarity_vjp(info.array(g, dtype), x1, x2, sample.dim, sample.eps)
    for d, x in zip(grads, (x1, x2), strict=True):
        _same_library(info, d)
        assert tuple(d.shape) == tuple(x.shape)
        assert _dtype(d) == _dtype(x)
    assert_vjp_matches_reference(grads, g, r1, r2, sample.dim, sample.eps, ulps=4)
    if info.autodiff and g.size:
        auto = info.grad_of(lambda a, b: polycos.cosine_similarity(a, b, sample.dim, sample.eps) * info.array(g, dtype), x1, x2)
        assert_vjp_matches_reference(auto, g, r1, r2, sample.dim, sample.eps, ulps=4)


@backends
@given(data=st.data())
@settings(suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
def test_random_inputs_match_the_exact_value(info: BackendInfo, data: st.DataObject) -> None:
    """G1, G2, G6 on Hypothesis inputs: every shape, dim, broadcast and hard case."""
    case = data.draw(cosine_inputs(np, dtypes=info.dtypes, max_side=info.max_side))
    x1, x2 = info.array(case.x1, _dtype(case.x1)), info.array(case.x2, _dtype(case.x2))
    dtype = _dtype(case.x1)
    r1 = _flushed(info, case.x1.astype(np.float64), dtype)
    r2 = _flushed(info, case.x2.astype(np.float64), dtype)
    s = polycos.cosine_similarity(x1, x2, case.dim, case.eps)
    assert_matches_reference(s, r1, r2, case.dim, case.eps)
    g = np.ones(np.shape(reference(r1, r2, case.dim, case.eps)))
    grads = polycos.cosine_similarity_vjp(info.array(g, dtype), x1, x2, case.dim, case.eps)
    assert_vjp_matches_reference(grads, g, r1, r2, case.dim, case.eps)


@backends
@pytest.mark.parametrize("dtype", ["float16", "bfloat16", "float32", "float64"])
def test_identical_vectors_never_exceed_one(info: BackendInfo, dtype: str) -> None:
    """G1: s(x, x) == 1 exactly and |s| <= 1 (PyTorch gives 1 + 2e-7 on 20-30 % of rows)."""
    if dtype not in info.dtypes:
        pytest.skip(f"{info.name} does not compute in {dtype} here")
    x = np.random.default_rng(4).standard_normal((512, 37))
    a = info.array(x, dtype)
    s = to_numpy(polycos.cosine_similarity(a, a)).astype(np.float64)
    assert np.all(np.abs(s) <= 1.0)
    np.testing.assert_array_equal(s, 1.0)
    s = to_numpy(polycos.cosine_similarity(a, info.array(-2.0 * to_numpy(a).astype(np.float64), dtype)))
    np.testing.assert_array_equal(s.astype(np.float64), -1.0)


@backends
@pytest.mark.parametrize("d", [1000, 65536])
def test_long_rows_within_one_ulp(info: BackendInfo, d: int) -> None:
    """G2 up to D = 65536, nearly parallel rows (where rounding shows most)."""
    r = np.random.default_rng(d)
    x1 = r.standard_normal((4, d))
    x2 = x1 + 1e-3 * r.standard_normal((4, d)) + 0.5
    for dtype in ("float32", "float64"):
        if dtype in info.dtypes:
            a1, a2 = info.array(x1, dtype), info.array(x2, dtype)
            assert_matches_reference(polycos.cosine_similarity(a1, a2), a1, a2)


# --------------------------------------------------------------------------- G3: the whole finite range


def _exponents(dtype: str) -> list[int]:
    info = _finfo(dtype)
    top = int(np.log2(float(info.max)))
    bottom = int(np.log2(float(info.smallest_subnormal)))
    return [bottom + 3, bottom + 12, int(np.log2(float(info.smallest_normal))) - 1, 0, top // 2, top - 12, top - 1, top]


@backends
@pytest.mark.parametrize("dtype", ["float16", "bfloat16", "float32", "float64"])
def test_scale_safe_over_the_whole_finite_range(info: BackendInfo, dtype: str) -> None:
    """G3: rows scaled to the top and bottom of the range (subnormals too), eps = 0, exact reference."""
    if dtype not in info.dtypes:
        pytest.skip(f"{info.name} does not compute in {dtype} here")
    r = np.random.default_rng(7)
    base1 = r.uniform(0.25, 1.0, (len(_exponents(dtype)), 5)) * r.choice([-1.0, 1.0], (8, 5))
    base2 = r.uniform(0.25, 1.0, base1.shape) * r.choice([-1.0, 1.0], base1.shape)
    e = np.array(_exponents(dtype))[:, None]
    x1 = _round_to(np.ldexp(base1, e - 1), dtype)
    x2 = _round_to(np.ldexp(base2, e - 1), dtype)
    a1, a2 = info.array(x1, dtype), info.array(x2, dtype)
    v1 = _flushed(info, to_numpy(a1).astype(np.float64), dtype)
    v2 = _flushed(info, to_numpy(a2).astype(np.float64), dtype)
    s = to_numpy(polycos.cosine_similarity(a1, a2, eps=0.0)).astype(np.float64)
    exact = exact_reference(v1, v2, eps=0.0)
    ulp = 2.0 ** -{"float16": 10, "bfloat16": 7, "float32": 23, "float64": 52}[dtype]
    np.testing.assert_array_less(np.abs(s - exact), ulp + 1e-300)
    # Gradients: finite where the true gradient is representable, and right.
    g = np.ones(s.shape)
    grads = polycos.cosine_similarity_vjp(info.array(g, dtype), a1, a2, eps=0.0)
    if not info.grad_flushes_subnormals:
        assert_vjp_matches_reference(grads, g, v1, v2, 1, 0.0, ulps=4)


def _assert_close_per_row(got: np.ndarray, ref: np.ndarray, dtype: str, what: str) -> None:
    """Finite, and within 32 ulp(1.0) of each row's largest entry (the tolerance of :func:`assert_vjp_matches_reference`)."""
    assert np.isfinite(got).all(), f"{what}: {got}"
    top = np.max(np.abs(ref), axis=-1, keepdims=True)
    ulp = 2.0 ** -{"float16": 10, "bfloat16": 7, "float32": 23, "float64": 52}[dtype]
    assert (np.abs(got - ref) <= 32 * ulp * top).all(), f"{what}: {got} != {ref}"


@backends
@pytest.mark.parametrize("dtype", ["bfloat16", "float32", "float64"])
def test_pairwise_gradients_of_rows_far_below_eps(info: BackendInfo, dtype: str) -> None:
    """G3/G5: rows far below ``eps`` (both spellings of pairwise) have the gradient ``G x2 / eps**2``.

    For rescaled dtypes the normalisation's VJP once took ``1 / c`` in units of the
    row scale (``m / eps``) and divided by ``m`` after: the product underflowed to 0.
    """
    if dtype not in info.dtypes:
        pytest.skip(f"{info.name} does not compute in {dtype} here")
    tiny = 2.0 ** {"bfloat16": -110, "float32": -110, "float64": -700}[dtype]
    r = np.random.default_rng(11)
    x1 = _round_to(r.uniform(0.5, 1.0, (3, 4)) * tiny, dtype)
    x2 = _round_to(r.uniform(0.5, 1.0, (2, 4)) * tiny, dtype)
    g = _round_to(r.uniform(0.5, 1.0, (3, 2)), dtype)
    a1, a2, ga = info.array(x1, dtype), info.array(x2, dtype), info.array(g, dtype)
    v1, v2, gv = (to_numpy(a).astype(np.float64) for a in (a1, a2, ga))
    eps = 2.0
    want = (gv @ v2 / eps**2, gv.T @ v1 / eps**2)  # c = eps for every row: S = x1 x2^T / eps**2
    got = polycos.pairwise_cosine_similarity_vjp(ga, a1, a2, eps=eps)
    b1, b2 = info.array(x1[:, None, :], dtype), info.array(x2[None, :, :], dtype)
    outer = polycos.cosine_similarity_vjp(ga, b1, b2, dim=-1, eps=eps)
    for spelling, pair in (("pairwise", got), ("outer broadcast", outer)):
        for d, w in zip(pair, want, strict=True):
            _assert_close_per_row(to_numpy(d).astype(np.float64).reshape(w.shape), w, dtype, spelling)


@backends
@pytest.mark.parametrize("dtype", ["bfloat16", "float32", "float64"])
def test_pairwise_gradients_of_rows_near_the_top(info: BackendInfo, dtype: str) -> None:
    """G3: rows near ``max`` and a cotangent near ``max``, both spellings of pairwise.

    float32 rows are not rescaled (their squares fit float64), and ``1 / c`` was
    rounded to float32 before multiplying: subnormal there, 143 ulp off at
    D = 16384 (49 at D = 1024). On JAX the division by the row scale became a
    product with its reciprocal, subnormal and flushed: every gradient was 0.
    """
    if dtype not in info.dtypes:
        pytest.skip(f"{info.name} does not compute in {dtype} here")
    top = float(np.finfo(np.float64 if dtype == "float64" else np.float32).max)
    r = np.random.default_rng(12)
    x1, x2 = (_round_to(r.uniform(0.5, 0.99, (k, 1024)) * r.choice([-1.0, 1.0], (k, 1024)) * top, dtype)
              for k in (3, 2))
    g = _round_to(r.uniform(0.5, 1.0, (3, 2)) * top / 8, dtype)  # (G xhat2 stays finite)
    a1, a2, ga = info.array(x1, dtype), info.array(x2, dtype), info.array(g, dtype)
    x1, x2, g = (v.astype(np.float64) for v in (x1, x2, g))
    # float64 reference: sum over the partner rows of the row-wise VJP
    want = reference_vjp(g, x1[:, None, :], x2[None, :, :], -1, 1e-8)
    want = (want[0].sum(axis=1), want[1].sum(axis=0))
    got = polycos.pairwise_cosine_similarity_vjp(ga, a1, a2, eps=1e-8)
    b1, b2 = info.array(x1[:, None, :], dtype), info.array(x2[None, :, :], dtype)
    outer = polycos.cosine_similarity_vjp(ga, b1, b2, dim=-1, eps=1e-8)
    for spelling, pair in (("pairwise", got), ("outer broadcast", outer)):
        for d, w in zip(pair, want, strict=True):
            _assert_close_per_row(to_numpy(d).astype(np.float64).reshape(w.shape), w, dtype, spelling)


@backends
@pytest.mark.parametrize("dtype", ["bfloat16", "float64"])
def test_gradient_finite_when_the_cotangent_over_the_norm_is_not(info: BackendInfo, dtype: str) -> None:
    """G3 for gradients: a cotangent near the top of the range and a row of small norm (in the
    safe range, so not rescaled): ``g / ||x1||`` overflows, the gradient does not."""
    if dtype not in info.dtypes:
        pytest.skip(f"{info.name} does not compute in {dtype} here")
    small, big = {"bfloat16": (-18, 112), "float64": (-200, 826)}[dtype]
    x1 = _round_to(np.array([[2.0**small, 0.0, 0.0], [1.0, 0.0, 0.0]]), dtype)
    x2 = _round_to(np.array([[1.0, 2.0**-7, 0.0], [1.0, 0.5, 0.25]]), dtype)
    g = _round_to(np.array([2.0**big, 1.0]), dtype)
    a1, a2 = info.array(x1, dtype), info.array(x2, dtype)
    got = polycos.cosine_similarity_vjp(info.array(g, dtype), a1, a2, eps=0.0)
    unit = reference_vjp(np.ones(2), x1.astype(np.float64), x2.astype(np.float64), 1, 0.0)
    for d, u in zip(got, unit, strict=True):
        _assert_close_per_row(to_numpy(d).astype(np.float64), u * g.astype(np.float64)[:, None], dtype, "vjp")


@backends
def test_half_precision_extremes(info: BackendInfo) -> None:
    """G3: float16 values of 60000 (squares overflow float16) give the right answer."""
    if "float16" not in info.dtypes:
        pytest.skip(f"no float16 on {info.name}")
    x = info.array(np.array([[60000.0, 60000.0], [60000.0, -60000.0]]), "float16")
    y = info.array(np.array([[60000.0, 60000.0], [60000.0, 60000.0]]), "float16")
    np.testing.assert_array_equal(to_numpy(polycos.cosine_similarity(x, y)).astype(np.float64), [1.0, 0.0])


_HUGE_EPS = 1e39  # beyond float32's range: the accumulation dtype of bfloat16 inputs holds float32's max


def _bf16_rows(info: BackendInfo, rows: list) -> tuple:
    x = np.array(rows, dtype=np.float64)
    return info.array(x[0:1], "bfloat16"), info.array(x[1:2], "bfloat16")


@backends
def test_eps_beyond_the_accumulation_range_rows_far_below_it(info: BackendInfo) -> None:
    """``eps`` above float32's max with bfloat16 rows far below it: the exact value underflows to 0,
    and so does polycos's (docs/semantics.md, "Known limit"; rows of norm 1e20 already get a wrong
    value: 5.2e-37 where the exact value is 6.0e-38)."""
    if "bfloat16" not in info.dtypes:
        pytest.skip(f"no bfloat16 on {info.name}")
    x1, x2 = _bf16_rows(info, [[3e10, 1e10], [1e10, 3e10]])
    s = to_numpy(polycos.cosine_similarity(x1, x2, eps=_HUGE_EPS)).astype(np.float64)
    np.testing.assert_array_equal(s, [0.0])  # exact: 6e20 / 1e78


@backends
def test_eps_beyond_the_accumulation_range_rows_near_the_top(info: BackendInfo, request: pytest.FixtureRequest) -> None:
    """bfloat16 rows whose norms are near float32's max against ``eps = 1e39``, beyond the float32
    accumulation: value and gradients within a bfloat16 ulp of exact, rowwise and pairwise (computed in
    float64 where it exists; 0.516 for the exact 0.0599 before). Without float64 (JAX with x64 off)
    the known limit of docs/semantics.md stands: a strict xfail, which fails when fixed."""
    if "bfloat16" not in info.dtypes:
        pytest.skip(f"no bfloat16 on {info.name}")
    if "float64" not in info.dtypes:
        request.applymarker(pytest.mark.xfail(strict=True, reason="known limit without float64"))
    x1, x2 = _bf16_rows(info, [[3e38, 1e38], [1e38, 3e38]])
    a, b = to_numpy(x1).astype(np.float64)[0], to_numpy(x2).astype(np.float64)[0]  # the bfloat16 values
    exact = float(a @ b) / _HUGE_EPS**2  # both norms below eps: c1 = c2 = eps
    ulp = 2.0**-8
    for s in (polycos.cosine_similarity(x1, x2, eps=_HUGE_EPS),
              polycos.pairwise_cosine_similarity(x1, x2, eps=_HUGE_EPS)):
        assert _dtype(s) == "bfloat16"
        got = float(to_numpy(s).astype(np.float64).ravel()[0])
        assert abs(got - exact) <= ulp * abs(exact), (got, exact)
    g = info.array(np.ones(1), "bfloat16")
    d1, d2 = (to_numpy(d).astype(np.float64)[0] for d in polycos.cosine_similarity_vjp(g, x1, x2, eps=_HUGE_EPS))
    # below eps the forward is linear in each input: d1 = x2 / eps**2 (bfloat16 subnormals: half a spacing)
    spacing = 2.0**-133
    np.testing.assert_allclose(d1, b / _HUGE_EPS**2, atol=spacing / 2, rtol=0)
    np.testing.assert_allclose(d2, a / _HUGE_EPS**2, atol=spacing / 2, rtol=0)
    s, vjp = polycos.cosine_similarity_with_vjp(x1, x2, eps=_HUGE_EPS)
    assert _dtype(s) == "bfloat16"
    e1, e2 = (to_numpy(d).astype(np.float64)[0] for d in vjp(g))
    np.testing.assert_array_equal(np.stack([e1, e2]), np.stack([d1, d2]))


# --------------------------------------------------------------------------- G4, G6


@backends
@pytest.mark.parametrize("dtype", ["bfloat16", "float32", "float64"])
def test_zero_rows_with_a_subnormal_eps(info: BackendInfo, dtype: str) -> None:
    """G4 with ``eps`` below ``1 / max`` of the accumulation dtype: ``1 / eps`` overflows.

    The zero row's gradient is ``g x2 / (eps ||x2||)`` (finite for a small ``g``;
    beyond float32's range for any float32 ``g``, so ``inf`` there) and its
    partner's is 0; both were NaN (``0 * (1 / eps)``).
    """
    if dtype not in info.dtypes:
        pytest.skip(f"{info.name} does not compute in {dtype} here")
    # below 1 / max of the accumulation dtype: float64 for float32 where the backend has it
    acc64 = dtype == "float64" or (dtype == "float32" and "float64" in info.dtypes)
    eps, g = (1e-310, 1e-300 if dtype == "float64" else 2.0**-126) if acc64 else (1e-40, 2.0**-126)
    x1 = np.zeros((2, 3))
    x2 = np.array([[1.0, 2.0, 2.0], [0.0, -3.0, 4.0]])
    s = polycos.cosine_similarity(info.array(x1, dtype), info.array(x2, dtype), eps=eps)
    np.testing.assert_array_equal(to_numpy(s).astype(np.float64), [0.0, 0.0])
    d1, d2 = (to_numpy(d).astype(np.float64) for d in polycos.cosine_similarity_vjp(
        info.array(np.full(2, g), dtype), info.array(x1, dtype), info.array(x2, dtype), eps=eps))
    np.testing.assert_array_equal(d2, np.zeros((2, 3)))
    with np.errstate(over="ignore", under="ignore"):
        held = float(np.float64(eps) if acc64 else np.float32(eps))  # eps as the accumulation dtype holds it
        want = (g / held) * (x2 / np.linalg.norm(x2, axis=1, keepdims=True))
    top = float(np.finfo(np.float64 if dtype == "float64" else np.float32).max)
    if dtype == "float32" and acc64:  # g / eps is past float32's max
        want = np.where(np.abs(want) > top, np.copysign(np.inf, want), want)
        np.testing.assert_array_equal(d1, want)
    else:
        np.testing.assert_allclose(d1, want, rtol={"bfloat16": 2.0**-7, "float32": 2.0**-23, "float64": 1e-15}[dtype])


@backends
@pytest.mark.parametrize("eps", [0.0, 1e-8])
def test_zero_vectors_give_zero_and_finite_gradients(info: BackendInfo, eps: float) -> None:
    """G4: zero rows give s = 0 and finite gradients, with eps > 0 and eps = 0 (0 there)."""
    x1 = info.array(np.zeros((2, 3)), "float32")
    x2 = info.array(np.array([[1.0, 2.0, 3.0], [0.0, 0.0, 0.0]]), "float32")
    s = to_numpy(polycos.cosine_similarity(x1, x2, eps=eps))
    np.testing.assert_array_equal(s, [0.0, 0.0])
    g1, g2 = (to_numpy(g) for g in polycos.cosine_similarity_vjp(info.array(np.ones(2), "float32"), x1, x2, eps=eps))
    assert np.all(np.isfinite(g1))
    assert np.all(np.isfinite(g2))
    if eps == 0.0:
        np.testing.assert_array_equal(g1, 0.0)
        np.testing.assert_array_equal(g2, 0.0)


@backends
@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_nonfinite_rows_are_isolated(info: BackendInfo, bad: float) -> None:
    """G6: NaN or inf in a row gives NaN in that element only; other elements keep their bits."""
    r = np.random.default_rng(2)
    x1, x2 = r.standard_normal((5, 4)), r.standard_normal((5, 4))
    clean = to_numpy(polycos.cosine_similarity(info.array(x1, "float32"), info.array(x2, "float32")))
    x1[2, 1] = bad
    a1, a2 = info.array(x1, "float32"), info.array(x2, "float32")
    s = to_numpy(polycos.cosine_similarity(a1, a2))
    assert np.isnan(s[2])
    np.testing.assert_array_equal(np.delete(s, 2), np.delete(clean, 2))
    g1, g2 = (to_numpy(g) for g in polycos.cosine_similarity_vjp(info.array(np.ones(5), "float32"), a1, a2))
    assert np.all(np.isfinite(np.delete(g1, 2, axis=0)))
    assert np.all(np.isfinite(np.delete(g2, 2, axis=0)))


# --------------------------------------------------------------------------- G7, G8


@backends
@pytest.mark.parametrize("sample", [s for s in SAMPLES if s.name in ("random_3d_dim1", "broadcast_query", "outer_simclr", "nan_row")], ids=lambda s: s.name)
def test_inputs_unmodified_and_outputs_fresh(info: BackendInfo, sample: Sample) -> None:
    """G7: inputs keep their bits; results share no memory with them."""
    x1, x2 = info.array(sample.x1, "float32"), info.array(sample.x2, "float32")
    before = (to_numpy(x1).tobytes(), to_numpy(x2).tobytes())
    s = polycos.cosine_similarity(x1, x2, sample.dim, sample.eps)
    g = polycos.cosine_similarity_vjp(info.array(np.ones(tuple(s.shape)), "float32"), x1, x2, sample.dim, sample.eps)
    assert (to_numpy(x1).tobytes(), to_numpy(x2).tobytes()) == before
    if info.name in ("numpy", "torch"):
        import torch  # noqa: F401  (the torch case needs it; numpy is always here)

        for out in (s, *g):
            for x in (x1, x2):
                assert not _shares_memory(out, x)


def _shares_memory(a: object, b: object) -> bool:
    if isinstance(a, np.ndarray):
        return bool(np.shares_memory(a, b))
    a_ptr = a.untyped_storage().data_ptr()  # type: ignore[attr-defined]
    return a_ptr == b.untyped_storage().data_ptr() and a.numel() > 0  # type: ignore[attr-defined]


@backends
def test_bitwise_repeatable(info: BackendInfo) -> None:
    """G8: same inputs, same backend: same bits, values and gradients."""
    r = np.random.default_rng(3)
    x1, x2 = info.array(r.standard_normal((600, 70)), "float32"), info.array(r.standard_normal((600, 70)), "float32")
    a, b = (to_numpy(polycos.cosine_similarity(x1, x2)) for _ in range(2))
    assert a.tobytes() == b.tobytes()
    g = info.array(np.linspace(-1, 1, 600), "float32")
    ga, gb = (tuple(to_numpy(t) for t in polycos.cosine_similarity_vjp(g, x1, x2)) for _ in range(2))
    assert all(u.tobytes() == v.tobytes() for u, v in zip(ga, gb, strict=True))


def _bits(*arrays: object) -> list[bytes]:
    return [to_numpy(a).tobytes() for a in arrays]


@backends
@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_with_vjp_equals_the_separate_calls(info: BackendInfo, dtype: str) -> None:
    """G8 across routes: ``*_with_vjp`` (which reuses the forward's residuals) gives the bits of the
    separate value and VJP calls, pairwise (two inputs and self-similarity) and as outer-product
    broadcasts in both axis orders, with zero, below-eps, huge and NaN rows; its VJP can be called
    again with the same result (the residuals are not consumed). G7 on this route: the inputs keep
    their bits and (NumPy, torch) no output shares memory with them."""
    if dtype not in info.dtypes:
        pytest.skip(f"{info.name} does not compute in {dtype} here")
    r = np.random.default_rng(11)
    # 300 x 2000: a float32 product on NumPy and torch is formed in two float64 tiles of rows (262 + 38)
    n, m = (300, 2000) if info.name in ("numpy", "torch") else (7, 5)
    z1, z2 = r.standard_normal((n, 16)), r.standard_normal((m, 16))
    z1[0], z1[1], z1[2], z2[1] = 0.0, 1e-12, 1e30, np.nan
    a, b = info.array(z1, dtype), info.array(z2, dtype)
    g, gs = info.array(r.standard_normal((n, m)), dtype), info.array(r.standard_normal((n, n)), dtype)
    before = _bits(a, b)
    for eps in (1e-8, 0.0):
        s, vjp = polycos.pairwise_cosine_similarity_with_vjp(a, b, eps=eps)
        want = _bits(polycos.pairwise_cosine_similarity(a, b, eps=eps),
                     *polycos.pairwise_cosine_similarity_vjp(g, a, b, eps=eps))
        grads = vjp(g)
        assert _bits(s, *grads) == want
        assert _bits(s, *vjp(g)) == want  # again: the residuals are reusable
        if info.name in ("numpy", "torch"):  # G7: fresh outputs, untouched inputs
            assert not any(_shares_memory(o, x) for o in (s, *grads) for x in (a, b))
        s, vjp = polycos.pairwise_cosine_similarity_with_vjp(a, eps=eps)
        (d,) = vjp(gs)
        assert _bits(s, d) == _bits(polycos.pairwise_cosine_similarity(a, eps=eps),
                                    *polycos.pairwise_cosine_similarity_vjp(gs, a, eps=eps))
    assert _bits(a, b) == before
    z2a = info.array(z2[None, :, :], dtype)
    for x1, x2, dim, grad in ((info.array(z1[:, None, :], dtype), z2a, 2, g),
                              (z2a, info.array(z1[:, None, :], dtype), -1, g)):
        s, vjp = polycos.cosine_similarity_with_vjp(x1, x2, dim=dim)
        want = _bits(polycos.cosine_similarity(x1, x2, dim=dim), *polycos.cosine_similarity_vjp(grad, x1, x2, dim=dim))
        assert _bits(s, *vjp(grad)) == want


# --------------------------------------------------------------------------- G9


@backends
@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_outer_broadcast_takes_the_matrix_path(info: BackendInfo, dtype: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """G9: an outer-product broadcast is one matrix product, equal to the pairwise spelling."""
    if dtype not in info.dtypes:
        pytest.skip(f"{info.name} does not compute in {dtype} here")
    backend = _backends.get(info.name)
    z = np.random.default_rng(5).standard_normal((6, 5))
    a = info.array(z, dtype)
    seen = []
    original = type(backend).pairwise_forward

    def spy(self: object, x1: object, x2: object, eps: float) -> object:
        seen.append(tuple(x1.shape))  # type: ignore[attr-defined]
        return original(self, x1, x2, eps)  # type: ignore[arg-type]

    monkeypatch.setattr(type(backend), "pairwise_forward", spy)
    za = to_numpy(a).astype(np.float64)
    # float64 has no wider product: the documented bound of a float64 GEMM (docs/pairwise.md).
    ulps = 1.0 if dtype != "float64" else (za.shape[-1] + 4) / 2
    for r1, r2, dim in ((za[None], za[:, None], 2), (za[:, None, :], za[None, :, :], -1)):
        s = polycos.cosine_similarity(info.array(r1, dtype), info.array(r2, dtype), dim=dim)
        assert_matches_reference(s, r1, r2, dim, ulps=ulps)
    assert len(seen) == 2
    p = polycos.pairwise_cosine_similarity(a)
    assert_matches_reference(p, za[:, None, :], za[None, :, :], -1, ulps=ulps)


# --------------------------------------------------------------------------- section 4: bad input


@pytest.mark.parametrize(
    ("info", "err"), [pytest.param(i, e, id=f"{i.name}-{e.name}") for i in BACKENDS for e in ERRORS
                      if e.backends is None or i.name in e.backends],
)
def test_bad_input_raises_at_once_naming_the_argument(info: BackendInfo, err: ErrorInput) -> None:
    fn, args, kwargs = err.build(info)
    with pytest.raises(err.exc, match=err.match):
        fn(*args, **kwargs)
