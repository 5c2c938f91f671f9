"""GPU tests of the CUDA kernels (CuPy arrays and torch CUDA tensors): marked ``gpu``, skipped without a GPU.

Values and gradients against the exact reference and the NumPy core, on
Hypothesis inputs, every dtype, every launch shape (a thread, 8 lanes, a warp,
a block per row), broadcasting and strided inputs, more than 2**31 elements,
bitwise repeatability, and ``compute-sanitizer`` memcheck and racecheck.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import textwrap

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

import polycos
from polycos._kernels import cuda_launch as _launch
from polycos.testing import (
    assert_matches_reference,
    assert_vjp_matches_reference,
    cosine_inputs,
)

pytestmark = pytest.mark.gpu

ALL_DTYPES = ("float16", "bfloat16", "float32", "float64")


def _cupy():  # type: ignore[no-untyped-def]
    return pytest.importorskip("cupy")


def _np_dtype(dtype: str):  # type: ignore[no-untyped-def]
    if dtype == "bfloat16":
        return pytest.importorskip("ml_dtypes").bfloat16
    return np.dtype(dtype)


def _to_gpu(a: np.ndarray, dtype: str):  # type: ignore[no-untyped-def]
    return _cupy().asarray(np.asarray(a).astype(_np_dtype(dtype)))


def _check(x1: np.ndarray, x2: np.ndarray, dim: int, eps: float, dtype: str) -> None:
    """cupy forward and VJP against the reference; returns nothing, asserts everything."""
    cp = _cupy()
    a1, a2 = _to_gpu(x1, dtype), _to_gpu(x2, dtype)
    h1, h2 = a1.get(), a2.get()
    s = polycos.cosine_similarity(a1, a2, dim, eps)
    assert isinstance(s, cp.ndarray)
    assert str(s.dtype) == dtype
    assert_matches_reference(s, h1, h2, dim, eps)
    shape = np.shape(s)
    g = np.linspace(-1.5, 1.5, num=max(int(np.prod(shape)), 1))[: int(np.prod(shape))].reshape(shape)
    gg = _to_gpu(g, dtype)
    d1, d2 = polycos.cosine_similarity_vjp(gg, a1, a2, dim, eps)
    assert isinstance(d1, cp.ndarray)
    assert d1.shape == a1.shape
    assert d2.shape == a2.shape
    with np.errstate(all="ignore"):
        assert_vjp_matches_reference((d1, d2), gg.get(), h1, h2, dim, eps)


@pytest.mark.parametrize("dtype", ALL_DTYPES)
@given(data=st.data())
def test_matches_reference_every_dtype(dtype: str, data: st.DataObject) -> None:
    """G1, G2, G4, G6 and the VJP on Hypothesis shapes, dims, broadcasts and hard cases."""
    draw_as = "float32" if dtype == "bfloat16" else dtype
    case = data.draw(cosine_inputs(np, dtypes=(draw_as,), max_side=9))
    _check(np.asarray(case.x1), np.asarray(case.x2), case.dim, case.eps, dtype)


@given(cosine_inputs(np, dtypes=("float64",), max_side=9))
def test_float64_agrees_with_numpy_core(case) -> None:  # type: ignore[no-untyped-def]
    """The CUDA kernels and the NumPy core: the same formulas, the same answers."""
    cp = _cupy()
    s_gpu = polycos.cosine_similarity(cp.asarray(case.x1), cp.asarray(case.x2), case.dim, case.eps)
    s_cpu = polycos.cosine_similarity(case.x1, case.x2, case.dim, case.eps)
    np.testing.assert_allclose(s_gpu.get(), s_cpu, rtol=0, atol=2**-52)
    g = np.ones(np.shape(s_cpu))
    g1, g2 = polycos.cosine_similarity_vjp(cp.asarray(g), cp.asarray(case.x1), cp.asarray(case.x2), case.dim, case.eps)
    r1, r2 = polycos.cosine_similarity_vjp(g, case.x1, case.x2, case.dim, case.eps)
    with np.errstate(all="ignore"):
        for got, want in ((g1.get(), r1), (g2.get(), r2)):
            np.testing.assert_allclose(got, want, rtol=1e-12, atol=1e-12 * np.nanmax(np.abs(want), initial=1))


@pytest.mark.parametrize("dtype", ALL_DTYPES)
@pytest.mark.parametrize(
    ("shape", "dim", "group"),
    [((1000, 4), 1, 8), ((1000, 100), 1, 32), ((10, 5000), 1, 256), ((64, 8192), 0, 1),
     ((3, 70000), 1, 256), ((5000, 3000), 1, 32)],
)
def test_every_launch_shape(dtype: str, shape: tuple, dim: int, group: int) -> None:
    """Each threads-per-row variant, chosen by the heuristic, within 1 ulp(1) (G2 up to D = 70000)."""
    rng = np.random.default_rng(0)
    x1 = rng.standard_normal(shape)
    x2 = x1 + 0.1 * rng.standard_normal(shape)
    lay = _launch.reduce_layout(shape, dim, [_launch.c_strides(shape)] * 2)
    assert lay is not None
    assert _launch.choose_group(lay.length, lay.rows, lay.axis_strides, lay.inner_strides) == group
    _check(x1, x2, dim, 1e-8, dtype)


def test_broadcast_outer_product_and_stride_zero() -> None:
    """x[:, None, :] against x[None, :, :] (the SimCLR matrix) and a stride-0 input."""
    cp = _cupy()
    rng = np.random.default_rng(1)
    x = rng.standard_normal((33, 17))
    _check(x[:, None, :], x[None, :, :], -1, 1e-8, "float32")
    _check(x[:, None, :], x[None, :, :], -1, 0.0, "float64")
    q = cp.asarray(rng.standard_normal(17))
    big = cp.broadcast_to(q, (40, 17))  # stride 0 along the rows
    assert big.strides[0] == 0
    s = polycos.cosine_similarity(big, cp.asarray(x[:1]).repeat(40, 0), dim=1)
    assert_matches_reference(s, big.get(), np.repeat(x[:1], 40, 0), 1)


@pytest.mark.parametrize("dtype", ALL_DTYPES)
def test_non_contiguous_inputs(dtype: str) -> None:
    """Transposed, stepped, reversed views and every dim of a 4-d array."""
    cp = _cupy()
    rng = np.random.default_rng(2)
    a = _to_gpu(rng.standard_normal((6, 7, 8, 9)), dtype)
    b = _to_gpu(rng.standard_normal((9, 8, 7, 6)), dtype).transpose(3, 2, 1, 0)
    for dim in range(-4, 4):
        s = polycos.cosine_similarity(a, b, dim)
        assert_matches_reference(s, a.get(), b.get(), dim)
        d1, d2 = polycos.cosine_similarity_vjp(cp.ones_like(s), a, b, dim)
        assert_vjp_matches_reference((d1, d2), np.ones(s.shape), a.get(), b.get(), dim)
    c, d = a[::-1, ::2, :, 1::3], b[:, ::-2, :, :3]
    _check(c.get(), d.get(), 2, 1e-8, dtype)
    s = polycos.cosine_similarity(c, d, 2)
    assert_matches_reference(s, c.get(), d.get(), 2)


def test_more_than_four_batch_dims_copy() -> None:
    """Layouts the kernels cannot index directly are copied first, and stay correct."""
    rng = np.random.default_rng(3)
    x = rng.standard_normal((2,) * 7 + (5,)).transpose(6, 0, 5, 1, 4, 2, 3, 7)
    y = rng.standard_normal((2,) * 7 + (5,))
    _check(x, y, -1, 1e-8, "float64")


def test_edge_shapes() -> None:
    """0-d inputs, empty rows (D = 0), no rows, a size-1 broadcast along dim."""
    cp = _cupy()
    s = polycos.cosine_similarity(cp.asarray(2.0), cp.asarray(-3.0), dim=0)
    assert s.shape == ()
    assert float(s) == -1.0
    s = polycos.cosine_similarity(cp.ones((3, 0)), cp.ones((3, 0)), dim=1)
    assert s.get().tolist() == [0.0, 0.0, 0.0]
    s = polycos.cosine_similarity(cp.ones((0, 4)), cp.ones((0, 4)), dim=1)
    assert s.shape == (0,)
    _check(np.ones((4, 1)), np.arange(12.0).reshape(4, 3), 1, 1e-8, "float64")


@pytest.mark.parametrize(
    ("dtype", "scale"),
    [("float32", 1e-30), ("float32", 1e36), ("bfloat16", 1e-35), ("bfloat16", 1e36),
     ("float64", 1e-300), ("float64", 1e300), ("float16", 6e4 / 4)],
)
def test_scale_safe(dtype: str, scale: float) -> None:
    """G3: with eps = 0, scaled inputs give the unscaled answer."""
    rng = np.random.default_rng(4)
    x1 = rng.uniform(-4, 4, (300, 40)) * scale
    x2 = rng.uniform(-4, 4, (300, 40)) * scale
    _check(x1, x2, 1, 0.0, dtype)


@pytest.mark.parametrize("dtype", ["bfloat16", "float64"])
def test_rescaled_row_leaves_neighbours_bitwise_untouched(dtype: str) -> None:
    """A row needing the rescaled pass does not change its warp neighbours' bits (G6, G8)."""
    rng = np.random.default_rng(5)
    x1 = rng.standard_normal((64, 12))
    x2 = rng.standard_normal((64, 12))
    huge = x1.copy()
    huge[5] *= 1e30 if dtype == "bfloat16" else 1e200
    a = polycos.cosine_similarity(_to_gpu(x1, dtype), _to_gpu(x2, dtype)).get()
    b = polycos.cosine_similarity(_to_gpu(huge, dtype), _to_gpu(x2, dtype)).get()
    keep = np.arange(64) != 5
    assert a[keep].tobytes() == b[keep].tobytes()
    assert a[5] == pytest.approx(b[5], abs=2**-7)


@pytest.mark.parametrize("dtype", ALL_DTYPES)
def test_bitwise_repeatable(dtype: str) -> None:
    """G8: same inputs, same device -> same bits, forward and VJP."""
    cp = _cupy()
    rng = np.random.default_rng(6)
    for shape in ((513, 7), (257, 300), (9, 20000)):
        a, b = _to_gpu(rng.standard_normal(shape), dtype), _to_gpu(rng.standard_normal(shape), dtype)
        g = cp.ones(shape[0], dtype=a.dtype)
        runs = [(polycos.cosine_similarity(a, b), *polycos.cosine_similarity_vjp(g, a, b)) for _ in range(3)]
        for run in runs[1:]:
            for x, y in zip(runs[0], run, strict=True):
                assert x.get().tobytes() == y.get().tobytes()


def test_inputs_untouched_and_not_aliased() -> None:
    """G7."""
    cp = _cupy()
    a = cp.arange(12.0).reshape(3, 4)
    b = cp.ones((3, 4))
    before = (a.copy(), b.copy())
    s = polycos.cosine_similarity(a, b)
    d1, d2 = polycos.cosine_similarity_vjp(cp.ones(3), a, b)
    assert cp.array_equal(a, before[0])
    assert cp.array_equal(b, before[1])
    for out in (s, d1, d2):
        assert not cp.shares_memory(out, a)
        assert not cp.shares_memory(out, b)


def test_public_functions_and_errors() -> None:
    cp = _cupy()
    from polycos.cupy import cosine_similarity, cosine_similarity_vjp

    a = cp.asarray([[1.0, 0.0]])
    b = cp.asarray([[1.0, 1.0]])
    np.testing.assert_allclose(cosine_similarity(a, b).get(), [2**-0.5])
    g1, _ = cosine_similarity_vjp(cp.ones(1), a, b)
    np.testing.assert_allclose(g1.get(), [[0.0, 2**-0.5]], atol=1e-15)
    with pytest.raises(TypeError, match=r"cupy\.ndarray"):
        cosine_similarity(np.ones(2), np.ones(2), dim=0)
    with pytest.raises(IndexError, match="dim"):
        cosine_similarity(a, b, dim=2)


@pytest.mark.slow
def test_more_than_2_31_elements() -> None:
    """64-bit indexing: an x1 of 2**31 + 1536 float16 elements, x2 a broadcast row."""
    cp = _cupy()
    rows, d = (1 << 22) + 3, 512
    x1 = cp.empty((rows, d), dtype=cp.float16)
    x1[...] = cp.asarray(np.linspace(-1, 1, d), dtype=cp.float16)
    x1[-1] = -x1[-1]
    x1[-2] = 0
    q = cp.asarray(np.cos(np.arange(d)), dtype=cp.float16)
    assert x1.size > 2**31
    s = polycos.cosine_similarity(x1, q, dim=1)
    last = x1[-3:].get()
    assert_matches_reference(s[-3:], last, q.get(), 1)
    assert s[0].item() == s[-3].item()
    assert s[-1].item() == -s[0].item()
    d1, d2 = polycos.cosine_similarity_vjp(cp.ones(rows, dtype=cp.float16), x1, q, dim=1)
    assert d1.shape == x1.shape
    assert d2.shape == q.shape
    assert d1[-1].get().tobytes() == (-d1[0]).get().tobytes()
    assert bool(cp.all(cp.isfinite(d1[-3:])))
    del x1, d1


def _sanitizer_script() -> str:
    return textwrap.dedent(
        """
        import numpy as np, cupy as cp, polycos
        rng = np.random.default_rng(0)
        for dtype in ("float16", "float32", "float64"):
            for shape, dim in (((100, 4), 1), ((70, 100), 1), ((3, 5000), 1), ((64, 5000), 0)):
                a = cp.asarray(rng.standard_normal(shape), dtype=dtype)
                b = cp.asarray(rng.standard_normal(shape), dtype=dtype)
                s = polycos.cosine_similarity(a, b, dim)
                polycos.cosine_similarity_vjp(cp.ones_like(s), a, b, dim)
                polycos.cosine_similarity(a * 1e200 if dtype == "float64" else a, b[:1] if dim == 1 else b, dim)
        cp.cuda.runtime.deviceSynchronize()
        print("done")
        """
    )


@pytest.mark.slow
@pytest.mark.parametrize("tool", ["memcheck", "racecheck"])
def test_compute_sanitizer(tool: str, tmp_path) -> None:  # type: ignore[no-untyped-def]
    """compute-sanitizer finds no memory errors and no shared-memory races."""
    sanitizer = shutil.which("compute-sanitizer")
    if sanitizer is None:
        pytest.skip("compute-sanitizer is not on PATH")
    script = tmp_path / "run.py"
    script.write_text(_sanitizer_script())
    env = dict(os.environ, CUPY_CACHE_DIR=str(tmp_path / "cache"))
    out = subprocess.run(
        [sanitizer, "--tool", tool, "--error-exitcode", "3", sys.executable, str(script)],
        capture_output=True, text=True, timeout=1800, env=env,
    )
    log = out.stdout + out.stderr
    assert out.returncode == 0, log[-4000:]
    assert "done" in out.stdout
    assert "ERROR SUMMARY: 0 errors" in log or "RACECHECK SUMMARY: 0 hazards" in log, log[-4000:]


def test_torch_cuda_tensors_run_the_cuda_kernels(monkeypatch: pytest.MonkeyPatch) -> None:
    """torch CUDA tensors reach the CUDA kernels through the operators, zero-copy, on torch's stream."""
    torch = pytest.importorskip("torch")
    from polycos._backends import cupy as cuda

    calls = []
    original = cuda.launch_forward

    def spy(*a, **k):  # type: ignore[no-untyped-def]
        calls.append(a[0])
        return original(*a, **k)

    monkeypatch.setattr(cuda, "launch_forward", spy)
    for dtype in (torch.float16, torch.bfloat16, torch.float32, torch.float64):
        x1 = torch.randn(300, 130, device="cuda", dtype=dtype, requires_grad=True)
        x2 = torch.randn(130, device="cuda", dtype=dtype)  # broadcast, stride 0 along rows
        s = polycos.cosine_similarity(x1, x2, dim=1)
        assert s.device.type == "cuda"
        assert s.dtype == dtype
        assert_matches_reference(s, x1, x2, 1)
        g = torch.linspace(-1, 1, 300, device="cuda", dtype=dtype)
        (d1,) = torch.autograd.grad(s, x1, g)
        ref = polycos.cosine_similarity_vjp(g.cpu(), x1.detach().cpu(), x2.cpu(), 1)[0]
        torch.testing.assert_close(d1.cpu().float(), ref.float(), rtol=1e-2 if dtype in (torch.float16, torch.bfloat16) else 1e-5,
                                   atol=1e-3 if dtype in (torch.float16, torch.bfloat16) else 1e-6)
    assert calls == ["float16", "bfloat16", "float32", "float64"]
