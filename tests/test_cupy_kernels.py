"""Checks of the CUDA backend that need no GPU.

* ``polycos/_kernels/cuda.cu`` (with ``rows.h``) compiles with ``nvcc`` for every
  target architecture, every kernel instantiation the host can launch is
  compiled, and ``ptxas`` reports no register spills and no warnings.
* The per-row formulas the kernels call are ``rows.h``'s, which the CPU kernel
  (``polycos._kernels``) compiles for the host: the host emulation of a row is
  that kernel, checked here against the exact reference and the NumPy core
  (G1, G2, G3, G4, G6, gradients). The CUDA-only batch indexing
  (``unravel``/``offset``) is compiled for the host by nvcc and checked past
  2**31 rows.
* The host launch logic (:mod:`polycos._kernels.cuda_launch`): layouts for every
  ``dim`` and broadcast, grid and block sizes, dtype dispatch.

``nvcc`` must be on PATH for the compile and indexing checks (it is in CI);
they are skipped with the reason otherwise. The emulation needs the CPU kernel
(built by ``pip install``).
"""

from __future__ import annotations

import ctypes
import math
import re
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest
from hypothesis import assume, given
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

import polycos
from polycos import _kernels
from polycos._kernels import cuda_launch as _launch
from polycos.testing import (
    assert_matches_reference,
    assert_vjp_matches_reference,
    cosine_inputs,
)

NVCC = shutil.which("nvcc")
needs_nvcc = pytest.mark.skipif(NVCC is None, reason="nvcc is not on PATH: CUDA sources not compiled")
needs_cpu_kernel = pytest.mark.skipif(
    not _kernels.available(), reason=f"CPU kernel not built: {_kernels.unavailable_reason()}"
)


#: The options polycos.cupy passes to NVRTC, as nvcc spells them.
NVCC_FLAGS = ("-std=c++17", "-O3", "--fmad=false")


def _kernels_dir() -> Path:
    """The directory of ``cuda.cu`` and ``rows.h`` (as polycos.cupy passes it to NVRTC with -I)."""
    from polycos._backends.cupy import kernel_source

    return Path(kernel_source()[1])


def _supported_archs() -> set[str]:
    out = subprocess.run([NVCC, "--list-gpu-arch"], capture_output=True, text=True, check=True)
    return {a.replace("compute_", "sm_") for a in out.stdout.split()}


#: Target architectures: Volta (sm_70), Turing (sm_75), Ampere (sm_80), Hopper (sm_90).
#: CUDA 13's nvcc no longer targets Volta; there sm_75 is the oldest and sm_70 is
#: left out of the parametrisation (not skipped: it cannot be compiled at all).
ARCHS = (
    ("sm_70",) if NVCC is not None and "sm_70" in _supported_archs() else ()
) + ("sm_75", "sm_80", "sm_90")


def parse_ptxas(text: str) -> dict[tuple[str, str], dict[str, int]]:
    """``ptxas -v`` output -> {(mangled kernel, arch): {regs, stack, spill_stores, spill_loads}}."""
    out: dict[tuple[str, str], dict[str, int]] = {}
    cur = None
    for line in text.splitlines():
        m = re.search(r"Compiling entry function '(\w+)' for '(sm_\d+)'", line)
        if m:
            cur = (m[1], m[2])
            out[cur] = {}
            continue
        m = re.search(r"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads", line)
        if m and cur:
            out[cur].update(stack=int(m[1]), spill_stores=int(m[2]), spill_loads=int(m[3]))
            continue
        m = re.search(r"Used (\d+) registers", line)
        if m and cur:
            out[cur]["regs"] = int(m[1])
    return out


def test_parse_ptxas_reads_spills() -> None:
    text = (
        "ptxas info    : Compiling entry function '_Z1fv' for 'sm_80'\n"
        "ptxas info    : Function properties for _Z1fv\n"
        "    8 bytes stack frame, 8 bytes spill stores, 12 bytes spill loads\n"
        "ptxas info    : Used 80 registers, used 1 barriers\n"
    )
    assert parse_ptxas(text) == {
        ("_Z1fv", "sm_80"): {"stack": 8, "spill_stores": 8, "spill_loads": 12, "regs": 80}
    }


def _demangle(names: list[str]) -> list[str]:
    filt = shutil.which("c++filt") or shutil.which("cu++filt")
    if filt is None:
        pytest.skip("c++filt not found: cannot demangle kernel names")
    out = subprocess.run([filt], input="\n".join(names), capture_output=True, text=True, check=True)
    return out.stdout.splitlines()


def _instantiation_source() -> str:
    """``cuda.cu`` plus the address of every name expression (forces each instantiation)."""
    names = _launch.all_name_expressions()
    refs = ",\n".join(f"    (void*)&{n}" for n in names)
    return (
        '#include "cuda.cu"\n'
        f"static void* const polycos_instances[] = {{\n{refs}\n}};\n"
        "void* polycos_instance(int i) { return polycos_instances[i]; }\n"
    )


@pytest.fixture(scope="module")
def compiled(tmp_path_factory: pytest.TempPathFactory) -> dict[str, subprocess.CompletedProcess]:
    """One nvcc run per supported architecture (module-scoped: compiled once)."""
    if NVCC is None:
        pytest.skip("nvcc is not on PATH")
    tmp = tmp_path_factory.mktemp("nvcc")
    src = tmp / "instantiate.cu"
    src.write_text(_instantiation_source())
    supported = _supported_archs()
    runs = {}
    for arch in ARCHS:
        if arch not in supported:
            continue
        cc = arch.removeprefix("sm_")
        runs[arch] = subprocess.run(
            [NVCC, *NVCC_FLAGS, "-c", "-I", str(_kernels_dir()),
             "-gencode", f"arch=compute_{cc},code=sm_{cc}", "-Xptxas", "-v",
             str(src), "-o", str(tmp / f"k_{arch}.o")],
            capture_output=True, text=True, timeout=600,
        )
    return runs


@needs_nvcc
@pytest.mark.parametrize("arch", ARCHS)
def test_kernels_compile_without_spills(compiled: dict, arch: str) -> None:
    if arch not in compiled:
        pytest.fail(f"this nvcc does not list {arch}")
    run = compiled[arch]
    log = run.stdout + run.stderr
    assert run.returncode == 0, log[-4000:]
    assert "warning" not in log.lower(), log[-4000:]
    report = {k: v for k, v in parse_ptxas(log).items() if k[1] == arch}
    names = _launch.all_name_expressions()
    assert len(report) == len(names), f"{len(report)} kernels compiled, {len(names)} expected"
    demangled = {re.sub(r"^void |\(.*$", "", d) for d in _demangle([k for k, _ in report])}
    assert demangled == set(names)
    for (kernel, _), info in report.items():
        assert info["spill_stores"] == 0, (kernel, arch, info)
        assert info["spill_loads"] == 0, (kernel, arch, info)
        assert 0 < info["regs"] <= 255, (kernel, arch, info)


# --------------------------------------------------------------------------- host emulation

# The CUDA-only part of the per-row code: the batch indexing, compiled for the host.
_HARNESS = r"""
#include "cuda.cu"
using namespace polycos_detail;

extern "C" long long host_offset(long long row, long long z1, long long z2, long long z3,
                                 long long s0, long long s1, long long s2, long long s3) {
    return offset(unravel(row, z1, z2, z3), s0, s1, s2, s3);
}
"""


@pytest.fixture(scope="module")
def host(tmp_path_factory: pytest.TempPathFactory) -> ctypes.CDLL:
    """cuda.cu's batch indexing compiled for the host by nvcc."""
    if NVCC is None:
        pytest.skip("nvcc is not on PATH")
    tmp = tmp_path_factory.mktemp("host")
    src = tmp / "harness.cu"
    src.write_text(_HARNESS)
    lib = tmp / "libpolycos_host.so"
    run = subprocess.run(
        [NVCC, "-std=c++17", "-O2", "-shared", "-Xcompiler", "-fPIC,-ffp-contract=off",
         "-I", str(_kernels_dir()), str(src), "-o", str(lib)],
        capture_output=True, text=True, timeout=600,
    )
    assert run.returncode == 0, (run.stdout + run.stderr)[-4000:]
    dll = ctypes.CDLL(str(lib))
    dll.host_offset.restype = ctypes.c_longlong
    dll.host_offset.argtypes = [ctypes.c_longlong] * 8
    return dll


def emulate(
    x1: np.ndarray, x2: np.ndarray, eps: float, g: np.ndarray | None = None
) -> tuple[np.ndarray, np.ndarray, np.ndarray | None, np.ndarray | None]:
    """Rows of the ``(rows, D)`` arrays through rows.h's per-row functions (the CPU kernel).

    Returns ``(s, residuals, dx1, dx2)``; residuals are ``(rows, 5)``: ``(s, n1s,
    n2s, m1, m2)``, as the CUDA kernels write them. Gradients only with ``g``.
    """
    s, res = _kernels.forward(np.ascontiguousarray(x1), np.ascontiguousarray(x2), 1, eps)
    if g is None:
        return s, res, None, None
    d1, d2 = _kernels.backward(np.asarray(g, dtype=x1.dtype), x1, x2, 1, eps, res)
    return s, res, d1, d2


def _rows(x1: np.ndarray, x2: np.ndarray, dim: int) -> tuple[np.ndarray, np.ndarray]:
    """Broadcast, move ``dim`` last and flatten to contiguous ``(rows, D)``."""
    shape = np.broadcast_shapes(x1.shape, x2.shape) or (1,)
    a1, a2 = (np.broadcast_to(x.reshape(x.shape or (1,)), shape) for x in (x1, x2))
    d = dim % len(shape)
    rows = math.prod(shape) // shape[d] if shape[d] else math.prod(shape[:d] + shape[d + 1 :])
    a1, a2 = (np.moveaxis(a, d, -1).reshape(rows, shape[d]) for a in (a1, a2))
    return np.ascontiguousarray(a1), np.ascontiguousarray(a2)


ALL_DTYPES = ("float16", "bfloat16", "float32", "float64")


def _bfloat16() -> type:
    ml_dtypes = pytest.importorskip("ml_dtypes")
    return ml_dtypes.bfloat16


@needs_cpu_kernel
@pytest.mark.parametrize("dtype", ALL_DTYPES)
@given(data=st.data())
def test_row_functions_match_reference(dtype: str, data: st.DataObject) -> None:
    """Values within 1 ulp(1) of the exact definition, gradients to the reference (G1-G4, G6)."""
    draw_as = "float32" if dtype == "bfloat16" else dtype  # cosine_inputs cannot build bfloat16 NumPy arrays
    case = data.draw(cosine_inputs(np, dtypes=(draw_as,), min_dims=1, max_side=9))
    x1, x2 = _rows(case.x1, case.x2, case.dim)
    if dtype == "bfloat16":
        x1, x2 = x1.astype(_bfloat16()), x2.astype(_bfloat16())
    rng = np.random.default_rng(x1.size)
    g = rng.uniform(-2, 2, size=x1.shape[0]).astype(x1.dtype)
    s, _, d1, d2 = emulate(x1, x2, case.eps, g)
    w1, w2 = x1.astype(np.float64), x2.astype(np.float64)
    assert_matches_reference(s, w1, w2, 1, case.eps)
    with np.errstate(all="ignore"):
        assert_vjp_matches_reference((d1, d2), g.astype(np.float64), w1, w2, 1, case.eps)


@needs_cpu_kernel
@pytest.mark.parametrize("dtype", ALL_DTYPES)
def test_row_functions_agree_with_numpy_core(dtype: str) -> None:
    """Same formulas as polycos._core: residuals and gradients agree with the NumPy backend."""
    rng = np.random.default_rng(7)
    dt = _bfloat16() if dtype == "bfloat16" else dtype
    x1 = rng.standard_normal((64, 37)).astype(dt)
    x2 = rng.standard_normal((64, 37)).astype(dt)
    x1[3] = 0
    x2[5] = x1[5]
    g = rng.uniform(-1, 1, 64).astype(dt)
    s, _, d1, d2 = emulate(x1, x2, 1e-8, g)
    ref = polycos.cosine_similarity(x1, x2, dim=1)
    r1, r2 = polycos.cosine_similarity_vjp(g, x1, x2, dim=1)
    tol = {"float16": 1e-3, "bfloat16": 8e-3, "float32": 1e-6, "float64": 1e-15}[dtype]
    # float64 s: both round the precise quotient once, so they agree to 1 ulp(1.0)
    s_tol = 2.0**-52 if dtype == "float64" else tol
    np.testing.assert_allclose(s.astype(np.float64), np.asarray(ref, dtype=np.float64), atol=s_tol, rtol=0)
    np.testing.assert_allclose(d1.astype(np.float64), r1.astype(np.float64), atol=4 * tol, rtol=tol)
    np.testing.assert_allclose(d2.astype(np.float64), r2.astype(np.float64), atol=4 * tol, rtol=tol)
    assert s[5] == 1.0  # s(x, x) == 1 exactly, as the core
    assert s[3] == 0.0
    assert np.all(d2[3] == 0)


@needs_cpu_kernel
@pytest.mark.parametrize(
    ("dtype", "scale"),
    [("float32", 1e-30), ("float32", 1e36), ("bfloat16", 1e-35), ("bfloat16", 1e36),
     ("float64", 1e-300), ("float64", 1e300), ("float16", 1e-4), ("float16", 2e3)],
)
def test_row_functions_are_scale_safe(dtype: str, scale: float) -> None:
    """G3: scaled inputs with eps = 0 keep the unscaled answer (rescaled pass where needed)."""
    rng = np.random.default_rng(3)
    dt = _bfloat16() if dtype == "bfloat16" else dtype
    a1 = rng.uniform(-4, 4, (16, 300)).astype(dt)
    a2 = rng.uniform(-4, 4, (16, 300)).astype(dt)
    a2[0] = a1[0]
    b1 = (a1.astype(np.float64) * scale).astype(dt)
    b2 = (a2.astype(np.float64) * scale).astype(dt)
    assert np.all(np.isfinite(b1.astype(np.float64)))
    assert np.any(b1 != 0)
    s, res, _, _ = emulate(b1, b2, 0.0)
    assert_matches_reference(s, b1.astype(np.float64), b2.astype(np.float64), 1, 0.0)
    assert s[0] == 1.0
    w = b1.astype(np.float64)
    m = np.max(np.abs(w), axis=1)
    norms = m * np.linalg.norm(w / m[:, None], axis=1)  # scaled: float64 itself under/overflows
    got = res[:, 1].astype(np.float64) * res[:, 3].astype(np.float64)  # n1 = n1s * m1
    np.testing.assert_allclose(got, norms, rtol=1e-6 if dtype != "float64" else 1e-14)


@needs_cpu_kernel
def test_row_functions_long_rows_g2() -> None:
    """G2 at D = 65536: nearly parallel rows within 1 ulp(1)."""
    rng = np.random.default_rng(11)
    for dtype in ("float32", "float64", "bfloat16", "float16"):
        dt = _bfloat16() if dtype == "bfloat16" else dtype
        x1 = rng.standard_normal((4, 65536)).astype(dt)
        x2 = (x1.astype(np.float64) + 1e-3 * rng.standard_normal((4, 65536))).astype(dt)
        s, _, _, _ = emulate(x1, x2, 1e-8)
        assert_matches_reference(s, x1.astype(np.float64), x2.astype(np.float64), 1, 1e-8)


@needs_cpu_kernel
def test_row_functions_nan_rows_stay_local() -> None:
    """G6: a NaN or inf row gives NaN in its own element (and gradient row) only."""
    x1 = np.ones((4, 5), dtype=np.float64)
    x2 = np.arange(20, dtype=np.float64).reshape(4, 5)
    x1[1, 2] = np.nan
    x2[2, 0] = np.inf
    s, _, d1, d2 = emulate(x1, x2, 1e-8, np.ones(4))
    assert np.isnan(s[1])
    assert np.isnan(s[2])
    assert np.all(np.isfinite(s[[0, 3]]))
    assert np.all(np.isfinite(d1[[0, 3]]))
    assert np.all(np.isnan(d2[1]))


# --------------------------------------------------------------------------- layouts


@st.composite
def layouts(draw):  # type: ignore[no-untyped-def]
    """A broadcast of two strided views (negative steps, transposes), a dim, the layout."""
    shapes = draw(hnp.mutually_broadcastable_shapes(num_shapes=2, min_dims=1, max_dims=6, max_side=4))
    full = shapes.result_shape
    axis = draw(st.integers(0, len(full) - 1))
    ops = []
    for shape in shapes.input_shapes:
        buf = np.arange(math.prod(shape) * 8)
        base = buf.reshape(*shape, 8)[..., 0]
        if draw(st.booleans()) and base.ndim:  # a reversed view: negative strides
            base = base[::-1]
        strides = _launch.element_strides(base.strides, base.itemsize)
        origin = (base.__array_interface__["data"][0] - buf.ctypes.data) // buf.itemsize
        ops.append((buf, origin, base, _launch.broadcast_strides(base.shape, strides, full)))
    out_shape = tuple(d for i, d in enumerate(full) if i != axis)
    out = list(_launch.c_strides(out_shape))
    out.insert(axis, 0)
    return full, axis, ops, tuple(out)


@given(layouts())
def test_reduce_layout_addresses_every_element(case) -> None:  # type: ignore[no-untyped-def]
    """Row r, element k of every operand is the element of the broadcast C-order array."""
    full, axis, ops, out_strides = case
    lay = _launch.reduce_layout(full, axis, [op[-1] for op in ops] + [out_strides])
    if lay is None:  # only when more batch dims remain than the kernels index
        assert sum(d != 1 for i, d in enumerate(full) if i != axis) > _launch.MAX_BATCH_DIMS
        return
    assert lay.rows == math.prod(d for i, d in enumerate(full) if i != axis)
    assert lay.length == full[axis]
    assert sum(z != 1 for z in lay.sizes) <= _launch.MAX_BATCH_DIMS
    views = [np.moveaxis(np.broadcast_to(base, full), axis, -1).reshape(-1, full[axis]) for _, _, base, _ in ops]
    for r in range(lay.rows):
        offs = _launch.row_offsets(r, lay)
        for i, (buf, origin, _, _) in enumerate(ops):
            got = [buf[origin + offs[i] + k * lay.axis_strides[i]] for k in range(lay.length)]
            assert got == list(views[i][r]), (r, i)
        assert offs[-1] == r  # the C-contiguous result is written in row order


def test_reduce_layout_merges_and_drops_dims() -> None:
    lay = _launch.reduce_layout((2, 3, 4, 5), 3, [(60, 20, 5, 1), (0, 0, 5, 1)])
    assert lay is not None
    assert lay.sizes == (1, 1, 6, 4)
    assert lay.batch_strides == ((0, 0, 20, 5), (0, 0, 0, 5))
    lay = _launch.reduce_layout((2, 3, 4), 2, [(12, 4, 1)])
    assert lay.sizes == (1, 1, 1, 6)
    assert lay.batch_strides == ((0, 0, 0, 4),)
    lay = _launch.reduce_layout((1, 7, 1), 1, [(7, 1, 1), (0, 0, 0)])
    assert lay.rows == 1
    assert lay.sizes == (1, 1, 1, 1)
    assert lay.axis_strides == (1, 0)
    # six batch dims that no operand lets merge: the caller must copy
    shape = (2, 2, 2, 2, 2, 2, 3)
    strides = (243, 1, 81, 3, 27, 9, 729)
    assert _launch.reduce_layout(shape, 6, [strides]) is None


def test_broadcast_strides_rejects_mismatch() -> None:
    assert _launch.broadcast_strides((), (), (2, 3)) == (0, 0)
    with pytest.raises(ValueError, match="does not broadcast"):
        _launch.broadcast_strides((3,), (1,), (2, 4))
    assert _launch.element_strides((8, 4), 4) == (2, 1)
    assert _launch.element_strides((6, 4), 4) is None


@needs_nvcc
@given(
    sizes=st.lists(st.integers(1, 1 << 20), min_size=4, max_size=4),
    strides=st.lists(st.integers(-(1 << 24), 1 << 24), min_size=4, max_size=4),
    data=st.data(),
)
def test_device_row_offsets_match_model(host: ctypes.CDLL, sizes, strides, data) -> None:  # type: ignore[no-untyped-def]
    """The kernels' unravel/offset (compiled C++) against the Python model, rows past 2**31."""
    sizes[0] = max(sizes[0], (1 << 33) // math.prod(sizes[1:]) + 1)  # > 2**33 rows
    lay = _launch.Layout(math.prod(sizes), 1, tuple(sizes), (tuple(strides),), (1,))
    assert lay.rows > 1 << 32
    assume(lay.rows < 1 << 62)  # row indices are signed 64-bit on the device
    row = data.draw(st.integers(0, lay.rows - 1))
    want = _launch.row_offsets(row, lay)[0]
    assert abs(want) < 1 << 62
    assert host.host_offset(row, *sizes[1:], *strides) == want


# --------------------------------------------------------------------------- launch


@given(st.integers(0, 1 << 40), st.sampled_from(_launch.GROUPS))
def test_launch_config_covers_every_row(rows: int, group: int) -> None:
    grid, block = _launch.launch_config(rows, group)
    assert block == (group if group > 32 else 256)
    assert block % 32 == 0
    assert block % group == 0
    assert block <= 1024
    assert 0 <= grid <= _launch.MAX_GRID < 2**31
    per = block // group
    assert (grid == 0) == (rows == 0)
    # the grid-stride loop visits ceil(rows / per) row groups; every one is reached
    assert grid == min(-(-rows // per), _launch.MAX_GRID)
    if grid:
        iters = -(-rows // (grid * per))
        assert (iters - 1) * grid * per < rows <= iters * grid * per


def test_launch_config_rejects_bad_input() -> None:
    with pytest.raises(ValueError, match="threads per row"):
        _launch.launch_config(10, 64)
    with pytest.raises(ValueError, match="out of range"):
        _launch.launch_config(-1, 32)


def test_choose_group_heuristic() -> None:
    assert _launch.choose_group(1, 10) == 8
    assert _launch.choose_group(16, 10) == 8
    assert _launch.choose_group(17, 10) == 32
    assert _launch.choose_group(1024, 10) == 32
    assert _launch.choose_group(2048, 10) == 256
    assert _launch.choose_group(2048, 10**5) == 32
    assert _launch.choose_group(10**6, 10**5) == 256
    # dim=0 of a C-contiguous (D, N) matrix: a thread per row
    assert _launch.choose_group(64, 10**5, (10**5, 10**5), (1, 1)) == 1
    assert _launch.choose_group(64, 10**5, (10**5, 0), (1, 1)) == 1
    assert _launch.choose_group(64, 100, (100, 100), (1, 1)) == 8 * 4  # few rows: a warp each
    assert _launch.choose_group(64, 10**5, (1, 10**5), (64, 1)) == 32


@pytest.mark.parametrize("dtype", ALL_DTYPES)
def test_dtype_dispatch(dtype: str) -> None:
    ctype = _launch.CTYPES[dtype]
    assert _launch.forward_name(dtype, 32) == f"polycos_forward<{ctype}, 32>"
    assert _launch.backward_name(dtype, dtype, 1) == f"polycos_backward<{ctype}, {ctype}, 1>"
    acc = _launch.accumulation_dtype(dtype)
    assert acc == {"float16": "float32", "bfloat16": "float32"}.get(dtype, "float64")
    names = _launch.all_name_expressions()
    assert len(names) == len(set(names))
    for group in _launch.GROUPS:
        assert _launch.forward_name(dtype, group) in names
        assert _launch.backward_name(dtype, _launch.work_dtype(dtype), group) in names
    with pytest.raises(TypeError, match="written as"):
        _launch.backward_name(dtype, "float16" if dtype != "float16" else "float64", 32)


def test_dtype_dispatch_rejects_others() -> None:
    with pytest.raises(TypeError, match="supports dtypes"):
        _launch.forward_name("int32", 32)
    with pytest.raises(ValueError, match="threads per row"):
        _launch.forward_name("float32", 64)


def test_range_limits_mirror_core() -> None:
    """The same constants as polycos._core._out_of_range, for both accumulation dtypes."""
    lo32, hi32 = _launch.range_limits("float32")
    assert lo32 == 2.0**-40
    assert hi32 == np.finfo(np.float32).max.item() ** 0.5 / 4
    lo64, hi64 = _launch.range_limits("float64")
    assert lo64 == 2.0**-459
    assert hi64 == np.finfo(np.float64).max ** 0.5 / 4
    if _kernels.available():  # the constants rows.h compiles in (both kernels), rounded to A
        for acc in ("float32", "float64"):
            dt = np.dtype(acc).type
            assert _kernels._range_limits(acc) == tuple(float(dt(v)) for v in _launch.range_limits(acc))


def test_import_without_gpu_is_lazy() -> None:
    """``import polycos`` does not import cupy; ``polycos.cupy`` imports without a GPU."""
    code = (
        "import sys, polycos; assert 'cupy' not in sys.modules; "
        "import polycos.cupy; assert 'cupy' not in sys.modules; print('ok')"
    )
    import sys

    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    assert "ok" in out.stdout


def test_call_without_gpu_raises_clear_error() -> None:
    """Without a usable GPU, launching raises RuntimeError saying so (not a CUDA traceback)."""
    cupy = pytest.importorskip("cupy")
    try:
        has_gpu = cupy.cuda.runtime.getDeviceCount() > 0
    except Exception:
        has_gpu = False
    if has_gpu:
        pytest.skip("a GPU is present: the no-GPU error cannot be observed")
    import polycos.cupy
    from polycos._backends import cupy as cupy_backend

    with pytest.raises(RuntimeError, match="needs a working CUDA GPU"):
        cupy_backend._kernel(_launch.forward_name("float32", 32))
    with pytest.raises(TypeError, match=r"cupy\.ndarray"):
        polycos.cupy.cosine_similarity(np.ones(3), np.ones(3), dim=0)


@needs_cpu_kernel
def test_row_functions_clamp_parallel_rows() -> None:
    """G1 on rows where rounding puts s above 1 before the clamp (multiples of one vector)."""
    rng = np.random.default_rng(12)
    x1 = rng.standard_normal((2000, 50))
    x2 = x1 * rng.uniform(0.1, 10, (2000, 1))
    s, res, _, _ = emulate(x1, x2, 1e-8)
    assert np.all(np.abs(s) <= 1)
    assert np.all(res[:, 0] <= 1)
    assert np.all(s >= 1 - 2**-52)


@needs_cpu_kernel
@pytest.mark.parametrize("dtype", ["float64", "bfloat16"])
def test_row_functions_subnormal_rows(dtype: str) -> None:
    """Rows whose largest entry is subnormal (1 / max|x| overflows): found by the thorough profile."""
    dt = _bfloat16() if dtype == "bfloat16" else np.float64
    tiny = 4e-309 if dtype == "float64" else 1.8e-39
    x1 = np.array([[tiny, 0.0], [tiny, tiny], [tiny, -tiny]]).astype(dt)
    x2 = np.array([[0.0, 0.0], [tiny, tiny], [tiny, tiny]]).astype(dt)
    s, _, d1, d2 = emulate(x1, x2, 1e-8, np.ones(3, dtype=dt))
    w1, w2 = x1.astype(np.float64), x2.astype(np.float64)
    assert_matches_reference(s, w1, w2, 1, 1e-8)
    s0, _, _, _ = emulate(x1, x2, 0.0)
    assert_matches_reference(s0, w1, w2, 1, 0.0)
    assert np.all(np.isfinite(d1.astype(np.float64)))
    assert np.all(np.isfinite(d2.astype(np.float64)))
