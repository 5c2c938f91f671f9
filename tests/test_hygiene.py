"""G13, hygiene: thread-safe from the first call, no floating-point warnings, no global state changed.

* (a) **First use from many threads**: a fresh interpreter per backend makes its very
  first polycos calls from 12 threads at once (forward, VJP, pairwise, outer
  product, with-VJP; a NumPy call among them, so two backends are created
  concurrently); every call succeeds and agrees bitwise with the same calls made
  serially afterwards.
* (b) **No floating-point warnings** from valid calls (the sample table of
  ``tests/cases.py``, every dtype, every route) under ``warnings.simplefilter("error")``,
  and results bitwise unaffected by ``np.errstate(all="raise" | "ignore")`` and
  warning filters.
* (c) **No global state changed** by a call: ``np.geterr()``, NumPy print options and
  random state, torch's default dtype, thread count, grad mode and RNG, JAX's
  configuration (``jax_enable_x64`` also from another thread while a scoped
  float64 product runs), ``warnings.filters``; and, in a fresh interpreter, no
  module imported by polycos beyond the standard library, ``array_api_compat``
  and the backend's own library (nor any other backend's library).
* (d) **Thread counts**: results bitwise independent of ``torch.set_num_threads``,
  ``POLYCOS_NUM_THREADS`` (NumPy, dask chunks and JAX's kernel), BLAS threads
  (``threadpoolctl``) and dask's scheduler.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import warnings
from typing import Any

import numpy as np
import pytest
from cases import BACKENDS, SAMPLES, BackendInfo

import polycos
from polycos.testing import to_numpy

NAMES = tuple(b.name for b in BACKENDS)
FRESH = [n for n in ("numpy", "torch", "jax", "dask", "array_api_strict") if n in NAMES]
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

#: Bugs outside the input policy, reported to the lead (strict xfails).

def _run(code: str, env: dict[str, str] | None = None, timeout: int = 180) -> str:
    """``code`` in a fresh interpreter (repository root on the path); its last stdout line."""
    full = {**os.environ, **(env or {})}
    full["PYTHONPATH"] = os.pathsep.join(p for p in (ROOT, full.get("PYTHONPATH", "")) if p)
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=full,
                          timeout=timeout, cwd=ROOT)
    assert done.returncode == 0, f"exit {done.returncode}\n{done.stdout[-2000:]}\n{done.stderr[-4000:]}"
    return done.stdout.strip().splitlines()[-1]


#: ``make(a, name)``: a NumPy array as an array of the backend ``name`` (inside the fresh interpreter).
_MAKERS = r"""
import numpy as np
def make(a, name):
    if name == "numpy":
        return a
    if name == "torch":
        import torch
        return torch.from_numpy(a)
    if name == "jax":
        import jax.numpy as jnp
        return jnp.asarray(a)
    if name == "dask":
        import dask.array as da
        return da.from_array(a, chunks=3)
    if name == "array_api_strict":
        import array_api_strict as xs
        return xs.asarray(a)
    raise KeyError(name)
def bits(out):
    if isinstance(out, tuple):
        return [bits(o) for o in out]
    if hasattr(out, "compute"):
        out = out.compute()
    if hasattr(out, "detach"):
        out = out.detach().numpy()
    return np.asarray(out).tobytes().hex()
"""


# =========================================================================== (a) first use from many threads


#: A fresh interpreter per backend ``NAME``: its very first polycos calls come from 12 threads at
#: once (a NumPy call among them). Around the first, serial, calls of the backends in ``BEFORE``
#: (ahead of the threads) and ``AFTER`` (behind them, backends the threads did not touch), an
#: import spy and snapshots of the global state: each backend's state check rides in another
#: backend's interpreter, so no interpreter is started for it alone.
_FIRST_USE = _MAKERS + r"""
import threading, json, sys, warnings
ROOTS = {"numpy": {"numpy"}, "torch": {"torch"}, "jax": {"jax", "jaxlib"}, "dask": {"dask"},
         "array_api_strict": {"array_api_strict"}}
LIBRARIES = ("torch", "jax", "dask", "array_api_strict", "cupy")
import polycos

def created(name):
    return "polycos._backends." + {"array_api_strict": "array_api"}.get(name, name) in sys.modules

records = []
class Spy:
    def find_spec(self, name, path=None, target=None):
        if name not in sys.modules:
            f = sys._getframe(1)
            while f is not None and (f.f_code.co_filename.startswith("<frozen")
                                     or f.f_globals.get("__name__", "").startswith("importlib")):
                f = f.f_back
            records.append([name, None if f is None else f.f_globals.get("__name__")])
        return None

def state():
    s = {"filters": [repr(f) for f in warnings.filters], "geterr": np.geterr(),
         "random": np.random.get_state()[1][:4].tolist()}
    if "torch" in sys.modules:
        import torch
        s.update(dtype=str(torch.get_default_dtype()), threads=torch.get_num_threads(), grad=torch.is_grad_enabled())
    if "jax" in sys.modules:
        import jax
        s.update(x64=jax.config.jax_enable_x64, mm=str(jax.config.jax_default_matmul_precision))
    return s

def first_calls_state(name):
    r = np.random.default_rng(1)
    x, y = r.standard_normal((6, 5)).astype(np.float32), r.standard_normal((6, 5)).astype(np.float32)
    a, b, g = make(x, name), make(y, name), make(np.ones(6, np.float32), name)  # imports the library
    was_created = created(name)
    libraries_before = {n for n in LIBRARIES if n in sys.modules}
    before = state()
    records.clear()
    spy = Spy()
    sys.meta_path.insert(0, spy)
    outs = (polycos.cosine_similarity(a, b), *polycos.cosine_similarity_vjp(g, a, b),
            polycos.pairwise_cosine_similarity(a, b), polycos.cosine_similarity(a[:, None, :], b[None, :, :], dim=-1))
    bits(outs)
    sys.meta_path.remove(spy)
    after = state()
    allowed = {"polycos", "array_api_compat"} | ROOTS[name] | set(sys.stdlib_module_names)
    return {
        "created_before_first_call": was_created,
        "spied": len(records),
        "changed": {k: [before[k], after.get(k)] for k in before if before[k] != after.get(k)},
        "imported_by_polycos": sorted({n for n, who in records
                                       if (who or "").startswith("polycos") and n.split(".")[0] not in allowed}),
        "other_libraries": sorted({n for n in LIBRARIES if n in sys.modules} - libraries_before - ROOTS[name]),
    }

states = {name: first_calls_state(name) for name in BEFORE}

r = np.random.default_rng(0)
x, y = r.standard_normal((7, 5)).astype(np.float32), r.standard_normal((7, 5)).astype(np.float32)
g = np.linspace(-1, 1, 7).astype(np.float32)
a, b, ga, ones = (make(v, NAME) for v in (x, y, g, np.ones((7, 7), np.float32)))  # the library is imported
created_before_threads = created(NAME) or (created("numpy") and not BEFORE)
fns = [
    lambda: polycos.cosine_similarity(a, b),
    lambda: polycos.cosine_similarity_vjp(ga, a, b),
    lambda: polycos.pairwise_cosine_similarity(a, b),
    lambda: polycos.pairwise_cosine_similarity_vjp(ones, a),
    lambda: polycos.cosine_similarity(a[:, None, :], b[None, :, :], dim=-1),
    lambda: polycos.cosine_similarity_with_vjp(a, b)[1](ga),
    lambda: polycos.cosine_similarity(x, y),     # NumPy: a second backend created concurrently
    lambda: polycos.pairwise_cosine_similarity(x),
] * 2
fns = fns[:12]
barrier = threading.Barrier(len(fns))
got, errors = [None] * len(fns), []
def work(i):
    try:
        barrier.wait()
        got[i] = bits(fns[i]())
    except BaseException:
        import traceback
        errors.append(traceback.format_exc())
threads = [threading.Thread(target=work, args=(i,)) for i in range(len(fns))]
for t in threads: t.start()
for t in threads: t.join()
serial = [bits(f()) for f in fns]
states.update({name: first_calls_state(name) for name in AFTER})
print(json.dumps({"created_before_first_call": created_before_threads, "errors": errors[:2], "calls": len(fns),
                  "disagree": [i for i, (u, v) in enumerate(zip(got, serial)) if u != v], "states": states}))
"""

#: Which interpreter checks which backend's first calls (``NAME: (BEFORE, AFTER)``): each
#: backend exactly once, in an interpreter where polycos has not served it yet.
_STATE_PLAN = {"numpy": ((), ("torch",)), "torch": ((), ("dask", "array_api_strict")), "dask": ((), ("jax",)),
               "array_api_strict": (("numpy",), ()), "jax": ((), ())}
_FRESH_RESULTS: dict[str, dict[str, Any]] = {}


def _plan() -> dict[str, tuple[tuple[str, ...], tuple[str, ...]]]:
    plan = {n: tuple(tuple(m for m in side if m in FRESH) for side in _STATE_PLAN[n]) for n in FRESH}
    hosted = {m for before, after in plan.values() for m in before + after}
    for n in FRESH:  # a backend whose planned host is not installed gets an interpreter of its own
        if n not in hosted:
            plan[f"{n}:state"] = ((n,), ())
    return plan


def _fresh(name: str) -> dict[str, Any]:
    """The report of the interpreter ``name`` runs in (``name:state``: a state check alone)."""
    if name not in _FRESH_RESULTS:
        before, after = _plan()[name]
        threads = name.split(":")[0]
        code = f"NAME = {threads!r}\nBEFORE = {list(before)!r}\nAFTER = {list(after)!r}\n" + _FIRST_USE
        if name.endswith(":state"):
            code = code.replace("states = {name: first_calls_state(name) for name in BEFORE}",
                                "states = {name: first_calls_state(name) for name in BEFORE}\n"
                                "print(json.dumps({'states': states}))\nraise SystemExit(0)")
        _FRESH_RESULTS[name] = json.loads(_run(code))
    return _FRESH_RESULTS[name]


def _first_call_report(name: str) -> dict[str, Any]:
    host = next(h for h, (before, after) in _plan().items() if name in before + after)
    return _fresh(host)["states"][name]


@pytest.mark.parametrize("name", FRESH)
def test_first_calls_from_many_threads_in_a_fresh_interpreter(name: str) -> None:
    """Issue 13: 'partially initialized module polycos.torch has no attribute forward' (also JAX, array API)."""
    out = _fresh(name)
    assert out["created_before_first_call"] is False  # the threads' calls really are the first ones
    assert out["errors"] == [], out["errors"][0] if out["errors"] else ""
    assert out["calls"] == 12
    assert out["disagree"] == []


# =========================================================================== (b) no floating-point warnings


#: Nonfinite first: a backend that leaks warnings fails fast.
WARNING_SAMPLES = sorted(
    (s for s in SAMPLES if set(s.tags) & {"nonfinite", "zero", "eps", "outer", "broadcast"}
     or s.name in ("zero_dim", "size_zero_rows")),
    key=lambda s: "nonfinite" not in s.tags,
)


def _routes(info: BackendInfo, dtype: str, s: Any) -> list[bytes]:
    x1, x2 = info.array(s.x1, dtype), info.array(s.x2, dtype)
    v = polycos.cosine_similarity(x1, x2, s.dim, s.eps)
    out = [v, *polycos.cosine_similarity_vjp(info.array(np.ones(tuple(v.shape)), dtype), x1, x2, s.dim, s.eps)]
    if len(s.x1.shape) == 2 and s.x1.shape == s.x2.shape and s.dim in (1, -1):
        p = polycos.pairwise_cosine_similarity(x1, x2, eps=s.eps)
        out += [p, *polycos.pairwise_cosine_similarity_vjp(info.array(np.ones(tuple(p.shape)), dtype), x1, x2, eps=s.eps)]
    return [to_numpy(o).tobytes() for o in out]


@pytest.mark.parametrize(
    "info", [pytest.param(b, id=b.name) for b in BACKENDS],
)
def test_valid_calls_raise_no_floating_point_warnings(info: BackendInfo) -> None:
    """The samples that provoke floating-point exceptions (NaN/inf rows, zero rows, eps = 0 and
    below-eps rows, size 0, 0-d, broadcasts, outer products) on every route and dtype."""
    samples, dtypes = WARNING_SAMPLES, info.dtypes
    if info.examples is not None:  # JAX and dask compile or build a graph per call: NaN, inf and zero rows
        samples = [s for s in WARNING_SAMPLES if "nonfinite" in s.tags or s.name == "zero_rows_eps0"]
        dtypes = ("float32",)
    for s in samples:
        for dtype in dtypes:
            if dtype not in s.dtypes:
                continue
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                with np.errstate(all="ignore"):
                    base = _routes(info, dtype, s)
            for mode in ("raise", "ignore"):
                with warnings.catch_warnings():
                    warnings.simplefilter("error")
                    with np.errstate(all=mode):
                        assert _routes(info, dtype, s) == base, (s.name, dtype, mode)
            with warnings.catch_warnings():
                warnings.simplefilter("always")  # a different filter list: same bits
                assert _routes(info, dtype, s) == base


# =========================================================================== (c) global state


def _legacy_random_state() -> tuple:
    """Where NumPy's global generator stands (the global state is the point here)."""
    st = np.random.get_state(legacy=False)  # noqa: NPY002
    return (st["state"]["key"][:4].tolist(), st["state"]["pos"], st.get("has_gauss"))


def _state() -> dict[str, Any]:
    state: dict[str, Any] = {
        "np.geterr": np.geterr(),
        "np.printoptions": {k: v for k, v in np.get_printoptions().items() if k != "legacy"},
        "np.random": _legacy_random_state(),
        "np.bufsize": np.getbufsize(),
        "warnings.filters": list(warnings.filters),
        "threads": threading.active_count(),
    }
    torch = sys.modules.get("torch")
    if torch is not None:
        state.update({
            "torch.default_dtype": torch.get_default_dtype(),
            "torch.num_threads": torch.get_num_threads(),
            "torch.grad_enabled": torch.is_grad_enabled(),
            "torch.deterministic": torch.are_deterministic_algorithms_enabled(),
            "torch.matmul_precision": torch.get_float32_matmul_precision(),
            "torch.rng": torch.random.get_rng_state()[:16].tolist(),
        })
    jax = sys.modules.get("jax")
    if jax is not None:
        c = jax.config
        state.update({f"jax.{k}": getattr(c, k) for k in (
            "jax_enable_x64", "jax_default_matmul_precision", "jax_numpy_rank_promotion",
            "jax_numpy_dtype_promotion", "jax_debug_nans", "jax_disable_jit", "jax_default_device",
        )})
    dask = sys.modules.get("dask")
    if dask is not None:
        state["dask.config"] = json.dumps(dask.config.config, default=str, sort_keys=True)
    return state


@pytest.mark.parametrize("info", BACKENDS, ids=lambda b: b.name)
def test_calls_change_no_global_state(info: BackendInfo) -> None:
    """Calls of every route and dtype (after a first, warming round): global state is as it was."""
    r = np.random.default_rng(9)
    x, y = r.standard_normal((6, 5)), r.standard_normal((6, 5))

    dtypes = info.dtypes if info.examples is None else ("float32",)  # JAX, dask: a compilation per dtype

    def calls() -> None:
        for dtype in dtypes:
            a, b = info.array(x, dtype), info.array(y, dtype)
            outs = [polycos.cosine_similarity(a, b), *polycos.cosine_similarity_vjp(info.array(np.ones(6), dtype), a, b),
                    polycos.pairwise_cosine_similarity(a, b), polycos.pairwise_cosine_similarity(a),
                    *polycos.pairwise_cosine_similarity_vjp(info.array(np.ones((6, 6)), dtype), a, b),
                    polycos.cosine_similarity(a[:, None, :], b[None, :, :], dim=-1)]
            for o in outs:
                to_numpy(o)

    calls()  # first calls may import and compile (fresh-interpreter state: see below)
    before = _state()
    calls()
    after = _state()
    changed = {k: (before[k], after.get(k)) for k in before if before[k] != after.get(k)}
    assert not changed, changed


@pytest.mark.skipif("jax" not in NAMES, reason="JAX is not installed")
def test_jax_scoped_float64_is_invisible_to_other_threads() -> None:
    """Float32 pairwise products run under a scoped jax.enable_x64: other threads keep x64 off meanwhile."""
    import jax
    import jax.numpy as jnp

    if jax.config.jax_enable_x64:
        pytest.skip("x64 is on for the whole process: there is no scope to leak")
    x = jnp.asarray(np.random.default_rng(0).standard_normal((200, 16)), jnp.float32)
    seen: set[str] = set()
    flags: set[bool] = set()
    stop = threading.Event()

    def other() -> None:
        while not stop.is_set():
            seen.add(str(jnp.asarray(1.0).dtype))
            seen.add(str((jnp.ones(3) * 2.0).dtype))
            flags.add(bool(jax.config.jax_enable_x64))

    t = threading.Thread(target=other)
    t.start()
    try:
        for _ in range(20):
            p = polycos.pairwise_cosine_similarity(x)
            polycos.pairwise_cosine_similarity_vjp(jnp.ones((200, 200), jnp.float32), x)
    finally:
        stop.set()
        t.join()
    assert seen == {"float32"}
    assert flags == {False}
    assert p.dtype == jnp.float32
    assert not jax.config.jax_enable_x64


@pytest.mark.parametrize(
    "name", FRESH,
)
def test_first_calls_change_no_global_state_and_import_nothing_foreign(name: str) -> None:
    """In a fresh interpreter (another backend's, see ``_STATE_PLAN``): the first calls leave warning filters,
    errstate, RNG and dtype defaults alone; polycos imports nothing but the standard library,
    array_api_compat and the backend's library (that library's own lazy imports are its business),
    and no other backend's library."""
    out = _first_call_report(name)
    assert out["created_before_first_call"] is False
    assert out["spied"] > 0  # the spy saw the backend's modules being imported
    assert out["imported_by_polycos"] == [], out["imported_by_polycos"]
    assert out["other_libraries"] == [], out["other_libraries"]
    assert out["changed"] == {}, out["changed"]


# =========================================================================== (d) thread counts


def _numeric_cases(dtype: str) -> list[tuple[np.ndarray, np.ndarray]]:
    r = np.random.default_rng(21)
    return [
        (r.standard_normal((3000, 37)).astype(dtype), r.standard_normal((3000, 37)).astype(dtype)),  # many rows
        (r.standard_normal((3, 70000)).astype(dtype), r.standard_normal((3, 70000)).astype(dtype)),  # long rows
        (r.standard_normal((400, 33)).astype(dtype), r.standard_normal((1, 33)).astype(dtype)),  # broadcast
    ]


def _all_routes(info: BackendInfo, x: np.ndarray, y: np.ndarray) -> list[bytes]:
    a, b = info.array(x, x.dtype.name), info.array(y, y.dtype.name)
    n = x.shape[0]
    out = [polycos.cosine_similarity(a, b),
           *polycos.cosine_similarity_vjp(info.array(np.linspace(-1, 1, n), x.dtype.name), a, b)]
    if x.shape[0] <= 400:
        out += [polycos.pairwise_cosine_similarity(a),
                *polycos.pairwise_cosine_similarity_vjp(info.array(np.ones((n, n)), x.dtype.name), a)]
    return [to_numpy(o).tobytes() for o in out]


@pytest.mark.skipif("torch" not in NAMES, reason="torch is not installed")
def test_torch_results_independent_of_thread_count() -> None:
    import torch

    info = next(b for b in BACKENDS if b.name == "torch")
    old = torch.get_num_threads()
    try:
        for dtype in ("float32", "float64"):
            for x, y in _numeric_cases(dtype):
                runs = []
                for n in (1, 3):
                    torch.set_num_threads(n)
                    runs.append(_all_routes(info, x, y))
                assert runs[0] == runs[1], (dtype, x.shape)
    finally:
        torch.set_num_threads(old)
    assert torch.get_num_threads() == old


@pytest.mark.parametrize("name", [n for n in ("numpy", "dask", "jax") if n in NAMES])
def test_kernel_results_independent_of_POLYCOS_NUM_THREADS(name: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """The CPU kernel's thread count (read per call; JAX: per compilation) never changes the bits."""
    info = next(b for b in BACKENDS if b.name == name)
    for dtype in ("float32", "float64") if name == "numpy" else ("float32",):
        for x, y in _numeric_cases(dtype)[: 3 if name == "numpy" else 1]:
            runs = []
            for n in ("1", "3"):
                monkeypatch.setenv("POLYCOS_NUM_THREADS", n)
                if name == "jax":
                    import jax

                    jax.clear_caches()  # the thread count is fixed when a call is lowered
                runs.append(_all_routes(info, x, y))
            assert all(run == runs[0] for run in runs), (dtype, x.shape)


def test_numpy_pairwise_across_blas_threads_differs_by_rounding_only() -> None:
    """G13's one exception, bounded: pairwise products are BLAS calls, whose bits may depend on
    BLAS's thread count (OpenBLAS's AVX2 gemm splits the sums differently at 1 and 2 threads; its
    AVX-512 kernels gave equal bits). Whatever the split, the results stay within their rounding:
    float32 values a rounding of the same float64 product (1 ulp apart at most), float64 values
    within twice the product's bound, (D + 4) ulp(1.0), and the gradients as close, relatively."""
    threadpoolctl = pytest.importorskip("threadpoolctl")
    if max((p.get("num_threads", 1) for p in threadpoolctl.threadpool_info()), default=1) < 2:
        pytest.skip("the BLAS here runs one thread: nothing to vary")
    info = next(b for b in BACKENDS if b.name == "numpy")
    r = np.random.default_rng(3)
    d = 64
    for dtype in ("float32", "float64"):
        x = r.standard_normal((300, d)).astype(dtype)
        y = r.standard_normal((200, d)).astype(dtype)
        runs = []
        for limit in (1, None):
            with threadpoolctl.threadpool_limits(limits=limit):
                runs.append([to_numpy(o) for o in (
                    polycos.pairwise_cosine_similarity(info.array(x, dtype), info.array(y, dtype)),
                    polycos.cosine_similarity(x[:, None, :], y[None, :, :], dim=-1),
                    *polycos.pairwise_cosine_similarity_vjp(np.ones((300, 200), dtype), x, y))])
        eps = float(np.finfo(dtype).eps)
        bound = eps if dtype == "float32" else (d + 4) * eps
        for one, many in zip(runs[0][:2], runs[1][:2], strict=True):
            np.testing.assert_allclose(one, many, rtol=0, atol=bound)
        for one, many in zip(runs[0][2:], runs[1][2:], strict=True):
            np.testing.assert_allclose(one, many, rtol=0, atol=bound * float(np.abs(one).max()))


@pytest.mark.skipif("dask" not in NAMES, reason="dask is not installed")
def test_dask_results_independent_of_scheduler() -> None:
    import dask

    info = next(b for b in BACKENDS if b.name == "dask")
    for x, y in _numeric_cases("float32")[:1] + _numeric_cases("float64")[2:]:
        runs = []
        for kwargs in ({"scheduler": "synchronous"}, {"scheduler": "threads", "num_workers": 4}):
            with dask.config.set(**kwargs):
                runs.append(_all_routes(info, x, y))
        assert runs[0] == runs[1], x.shape
