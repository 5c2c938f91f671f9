"""polycos.testing: the strategies draw what they promise, the reference and asserts can fail."""

from __future__ import annotations

import array_api_strict as xs
import numpy as np
import pytest
import scipy.spatial.distance
from hypothesis import given, settings
from hypothesis import strategies as st

import polycos
from polycos.testing import (
    KINDS,
    assert_backends_agree,
    assert_matches_reference,
    assert_vjp_matches_reference,
    cosine_inputs,
    reference,
    reference_vjp,
)


@pytest.mark.parametrize("xp", [np, xs], ids=["numpy", "array_api_strict"])
@given(data=st.data())
def test_cases_are_valid_calls(xp, data):
    case = data.draw(cosine_inputs(xp))
    shape = np.broadcast_shapes(tuple(case.x1.shape), tuple(case.x2.shape))
    nd = max(len(shape), 1)
    assert -nd <= case.dim < nd
    assert case.eps >= 0
    assert case.kind in KINDS
    assert type(case.x1) is type(xp.asarray(0.0))


def test_every_hard_case_is_drawn():
    seen: set[str] = set()
    zero_rows = nonfinite = 0

    @settings(max_examples=300, deadline=None, database=None)
    @given(cosine_inputs(np, min_dims=1, min_side=1))
    def collect(case):
        nonlocal zero_rows, nonfinite
        seen.add(case.kind)
        zero_rows += case.kind == "zero_rows" and bool(np.any(np.all(case.x1 == 0, axis=-1)))
        nonfinite += bool(~np.all(np.isfinite(case.x1)))

    collect()
    assert seen == set(KINDS)
    assert zero_rows > 0
    assert nonfinite > 0


@given(st.integers(1, 6).flatmap(lambda d: st.tuples(*[st.lists(st.floats(-10, 10), min_size=d, max_size=d)] * 2)))
def test_reference_matches_scipy(pair):
    u, v = np.array(pair[0]), np.array(pair[1])
    if np.linalg.norm(u) < 1e-3 or np.linalg.norm(v) < 1e-3:
        return
    assert abs(reference(u, v, 0, 0.0) - (1 - scipy.spatial.distance.cosine(u, v))) < 1e-14


def test_reference_vjp_is_the_derivative():
    rng = np.random.default_rng(0)
    x1, x2 = rng.standard_normal((3, 4)), rng.standard_normal((3, 4))
    g = rng.standard_normal(3)
    g1, _ = reference_vjp(g, x1, x2)
    h = 1e-7
    num = np.zeros_like(x1)
    for idx in np.ndindex(x1.shape):
        e = np.zeros_like(x1)
        e[idx] = h
        num[idx] = g @ (reference(x1 + e, x2) - reference(x1 - e, x2)) / (2 * h)
    np.testing.assert_allclose(g1, num, rtol=1e-6, atol=1e-8)


def test_assert_matches_reference_rejects_two_ulp():
    x1 = np.array([[1.0, 2.0, 3.0]], dtype=np.float32)
    x2 = np.array([[3.0, 1.0, 2.0]], dtype=np.float32)
    s = polycos.cosine_similarity(x1, x2)
    assert_matches_reference(s, x1, x2)
    off = s + np.float32(2 * 2.0**-23)
    with pytest.raises(AssertionError, match="ulp"):
        assert_matches_reference(off, x1, x2)
    with pytest.raises(AssertionError, match="NaN"):
        assert_matches_reference(np.array([np.nan], np.float32), x1, x2)
    with pytest.raises(AssertionError, match=r"\|s\| > 1"):
        assert_matches_reference(np.array([1.0000001], np.float32), np.ones((1, 2), np.float32), np.ones((1, 2), np.float32))


def test_assert_vjp_matches_reference_rejects_a_wrong_gradient():
    rng = np.random.default_rng(1)
    x1, x2 = rng.standard_normal((4, 5)), rng.standard_normal((4, 5))
    g = np.ones(4)
    g1, g2 = polycos.cosine_similarity_vjp(g, x1, x2)
    assert_vjp_matches_reference((g1, g2), g, x1, x2)
    with pytest.raises(AssertionError, match="grad of x2"):
        assert_vjp_matches_reference((g1, g2 * (1 + 1e-9)), g, x1, x2)


def test_backends_agree_on_installed_backends():
    rng = np.random.default_rng(2)
    x1 = rng.standard_normal((5, 7)).astype(np.float32)
    x2 = rng.standard_normal((1, 7)).astype(np.float32)
    x1[3] = 0.0
    assert_backends_agree(x1, x2, dim=-1, eps=1e-8)
    assert_backends_agree(x1.astype(np.float64), x2.astype(np.float64), dim=1, eps=0.0)
