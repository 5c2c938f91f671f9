"""polycos.testing: the strategies draw what they promise, the reference and asserts can fail."""

from __future__ import annotations

import subprocess
import sys

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
    available_backends,
    cosine_inputs,
    from_numpy,
    reference,
    reference_vjp,
    to_numpy,
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


def test_backends_agree_on_empty_results() -> None:
    """Size-0 results agree trivially; their shapes and dtypes are still checked."""
    assert_backends_agree(np.ones((0, 3)), np.ones((0, 3)), dim=1)
    assert_backends_agree(np.ones((0, 3), np.float32), np.ones((1, 3), np.float32), dim=-1)
    assert_backends_agree(np.ones((2, 0)), np.ones((2, 0)), dim=0)  # two rows of no elements


def test_backends_agree_checks_dtypes_of_empty_results(monkeypatch: pytest.MonkeyPatch) -> None:
    real = polycos.cosine_similarity
    monkeypatch.setattr(polycos, "cosine_similarity", lambda *a, **k: real(*a, **k).astype(np.float32))
    with pytest.raises(AssertionError, match=r"numpy: result has dtype float32, expected float64"):
        assert_backends_agree(np.ones((0, 3)), np.ones((0, 3)), backends=["numpy"])


def test_backends_without_the_dtype_are_skipped_unless_asked_for() -> None:
    import ml_dtypes

    x = np.random.default_rng(3).standard_normal((3, 5))
    assert "array_api_strict" in available_backends()
    assert "array_api_strict" not in available_backends("float16")  # array-api-strict has no float16
    assert "numpy" in available_backends("float16")
    assert_backends_agree(x.astype(np.float16), x[::-1].astype(np.float16))
    assert_backends_agree(x.astype(ml_dtypes.bfloat16), x[::-1].astype(ml_dtypes.bfloat16))
    with pytest.raises(ValueError, match=r"array_api_strict.*float16"):
        assert_backends_agree(x.astype(np.float16), x.astype(np.float16), backends=["array_api_strict"])


def test_bfloat16_cases_on_numpy() -> None:
    """In a fresh interpreter: NumPy knows the name "bfloat16" only once ml_dtypes is imported."""
    code = (
        "import sys, numpy as np\n"
        "from hypothesis import given, settings\n"
        "from polycos.testing import cosine_inputs\n"
        "@settings(max_examples=10, deadline=None, database=None)\n"
        "@given(cosine_inputs(np, dtypes=('bfloat16',)))\n"
        "def check(case):\n"
        "    assert str(case.x1.dtype) == str(case.x2.dtype) == 'bfloat16', case\n"
        "assert 'ml_dtypes' not in sys.modules\n"
        "check()\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]


@pytest.mark.parametrize("module", ["numpy", "torch", "jax.numpy", "dask.array", "array_api_strict"])
def test_from_numpy_takes_a_namespace_or_an_array(module: str) -> None:
    xp = pytest.importorskip(module)
    like = xp.ones(1)
    a = np.array([[1.0, 2.0], [3.0, 4.0]])
    for ref in (xp, like):
        x = from_numpy(ref, a, "float32")
        assert type(x) is type(like), (ref, type(x))
        assert str(x.dtype).rsplit(".", 1)[-1] == "float32"
        np.testing.assert_array_equal(to_numpy(x), a)
    with pytest.raises(TypeError, match="must be an array"):
        from_numpy([1.0], a)


def test_misuse_is_reported_clearly() -> None:
    x = np.ones((2, 3))
    with pytest.raises(AssertionError, match=r"dtype int64.*floating"):
        assert_matches_reference(np.ones(2, np.int64), x, x)
    with pytest.raises(AssertionError, match=r"dtype int64.*floating"):
        assert_vjp_matches_reference((np.ones((2, 3), np.int64),) * 2, np.ones(2), x, x)
    with pytest.raises(AssertionError, match="NaN") as exc:
        assert_matches_reference(np.array(np.nan), np.ones(3), np.ones(3), dim=0)
    assert "[[]]" not in str(exc.value)
    assert "nan" in str(exc.value)  # what it got, and the reference's value
    with pytest.raises(ValueError, match=r"'nonesuch'.*numpy"):
        assert_backends_agree(x, x, backends=["nonesuch"])
    with pytest.raises(ValueError, match=r"'nope'.*random"):
        cosine_inputs(np, kinds=("nope",))
    with pytest.raises(ValueError, match=r"'int32'.*float32"):
        cosine_inputs(np, dtypes=("int32",))
    with pytest.raises(ValueError, match="dtypes"):
        cosine_inputs(np, dtypes=())
