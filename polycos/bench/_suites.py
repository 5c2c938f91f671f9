"""What is measured: one *suite* per framework, built into one *case* per (op, size, dtype).

A suite groups the polycos *subjects* of one framework (``torch`` and
``torch-compile`` share a suite), the framework's native *peers* and its
*bandwidth floor*, so that all of them are timed interleaved in the same
process (see :mod:`polycos.bench._timing`). Everything heavy (torch, jax,
cupy, dask, sklearn, optax) is imported inside the builders, only when that
suite runs; a subject or peer that cannot be imported, or whose polycos module
does not exist yet, is skipped with a note instead of failing the run.

The byte model (what every implementation must at least read and write once):

================== ============================================ ==========================
op                 reads                                        writes
================== ============================================ ==========================
forward            ``x1 (N,D)``, ``x2 (N,D)``                   ``s (N,)``
forward+backward   ``x1``, ``x2``, ``g (N,)``                   ``s``, ``g1 (N,D)``, ``g2``
pairwise           ``x1 (N,D)``, ``x2 (M,D)``                   ``S (N,M)``
pairwise+backward  ``x1``, ``x2``, ``G (N,M)``                  ``S``, ``g1``, ``g2``
================== ============================================ ==========================

The floor streams exactly those bytes with the framework's plainest fast
operations: a full ``sum`` of every read array and a ``fill`` of every written
one (NumPy ``x.sum()`` / ``np.empty(shape).fill(0)``, torch ``x.sum()`` /
``torch.empty(shape).zero_()``, one ``jax.jit`` of ``jnp.sum`` and
``jnp.full``, cupy ``x.sum()`` / ``out.fill(0)``). Outputs are freshly
allocated on the CPU because every implementation must return new arrays, and
the kernel's page faults on new memory cost about as much as writing it
(2 × 64 MiB: 4.2 ms into touched buffers, 9.8 ms into new ones, on the 2-core
EPYC); the GPU's memory pool reuses blocks, so cupy fills a preallocated one.
"""

from __future__ import annotations

import importlib
import importlib.util
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from polycos.bench._timing import Timer, cpu_timer

__all__ = [
    "BACKENDS",
    "DTYPES",
    "OPS",
    "SUITES",
    "Candidate",
    "Case",
    "Unavailable",
    "build_case",
    "io_shapes",
    "suite_of",
]

ROWWISE = ("forward", "forward+backward")
PAIRWISE = ("pairwise", "pairwise+backward")
OPS: tuple[str, ...] = ROWWISE + PAIRWISE
DTYPES: tuple[str, ...] = ("float32", "float64", "float16", "bfloat16")

#: suite -> its polycos subjects (the names ``--backends`` accepts).
SUITES: dict[str, tuple[str, ...]] = {
    "numpy": ("numpy",),
    "torch": ("torch", "torch-compile"),
    "jax": ("jax",),
    "dask": ("dask",),
    "cupy": ("cupy",),
    "torch-cuda": ("torch-cuda",),
}
BACKENDS: tuple[str, ...] = tuple(b for subs in SUITES.values() for b in subs)
GPU_SUITES = ("cupy", "torch-cuda")

#: dask runs only on small sizes (it is there to show the lazy path works, not to race).
DASK_MAX_ELEMENTS = 1 << 22
#: PyTorch's broadcast call materialises N*M*D elements (several times with autograd).
BROADCAST_MAX_BYTES = 1 << 28


class Unavailable(Exception):
    """A suite, subject or peer that cannot run here; the message says why."""


@dataclass
class Candidate:
    """One timed callable of a case."""

    name: str
    kind: str  #: "polycos", "peer" or "floor"
    fn: Callable[[], Any]


@dataclass
class Case:
    """Everything timed together for one (suite, op, shape, dtype)."""

    suite: str
    op: str
    shape: tuple[int, ...]
    dtype: str
    device: str
    nbytes: int
    timer: Timer
    candidates: list[Candidate] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)


def suite_of(backend: str) -> str:
    """The suite that measures a ``--backends`` name."""
    for suite, subjects in SUITES.items():
        if backend in subjects:
            return suite
    raise KeyError(backend)


def io_shapes(op: str, shape: Sequence[int]) -> tuple[list[tuple[int, ...]], list[tuple[int, ...]]]:
    """Shapes the op must read and write (the byte model of the module docstring).

    Parameters
    ----------
    op : str
        One of :data:`OPS`.
    shape : sequence of int
        ``(N, D)`` for row-wise ops, ``(N, M, D)`` for pairwise ones.

    Returns
    -------
    (list, list)
        Shapes read and shapes written.

    Examples
    --------
    >>> io_shapes("forward", (4, 3))
    ([(4, 3), (4, 3)], [(4,)])
    >>> io_shapes("pairwise+backward", (4, 5, 3))
    ([(4, 3), (5, 3), (4, 5)], [(4, 5), (4, 3), (5, 3)])
    """
    if op in ROWWISE:
        n, d = shape
        reads, writes = [(n, d), (n, d)], [(n,)]
        if op == "forward+backward":
            reads, writes = [*reads, (n,)], [*writes, (n, d), (n, d)]
    else:
        n, m, d = shape
        reads, writes = [(n, d), (m, d)], [(n, m)]
        if op == "pairwise+backward":
            reads, writes = [*reads, (n, m)], [*writes, (n, d), (m, d)]
    return reads, writes


def model_bytes(op: str, shape: Sequence[int], itemsize: int) -> int:
    """Bytes the op must move at least: every read and written element once."""
    reads, writes = io_shapes(op, shape)
    return itemsize * sum(math.prod(s) for s in reads + writes)


_ITEMSIZE = {"float16": 2, "bfloat16": 2, "float32": 4, "float64": 8}


def _numpy_inputs(op: str, shape: Sequence[int], seed: int = 0) -> list[Any]:
    """Random float64 NumPy inputs for the op (cast by each suite): ``x1, x2, g``."""
    import numpy as np

    rng = np.random.default_rng(seed)
    reads, _ = io_shapes(op, shape)
    x1 = rng.standard_normal(reads[0])
    x2 = rng.standard_normal(reads[1])
    g = np.ones(reads[2]) if len(reads) > 2 else np.ones(reads[0][:1])
    return [x1, x2, g]


def _module_attr(module: str, *attrs: str) -> Any:
    """``module.attr`` for the first attr that exists, else :class:`Unavailable` with the reason."""
    try:
        mod = importlib.import_module(module)
    except Exception as exc:  # ImportError, or a half-written module failing at import
        raise Unavailable(f"cannot import {module} ({type(exc).__name__}: {exc})") from None
    for attr in attrs:
        if hasattr(mod, attr):
            return getattr(mod, attr)
    raise Unavailable(f"{module} has no {' or '.join(attrs)} (yet)")


def _require(module: str) -> None:
    if importlib.util.find_spec(module) is None:
        raise Unavailable(f"{module} is not installed")


class _Builder:
    """Collects candidates; a candidate whose construction raises :class:`Unavailable` becomes a note."""

    def __init__(self, case: Case) -> None:
        self.case = case

    def add(self, name: str, kind: str, make: Callable[[], Callable[[], Any]]) -> None:
        try:
            self.case.candidates.append(Candidate(name, kind, make()))
        except Unavailable as exc:
            self.case.notes.append(f"{name}: skipped, {exc}")


# --------------------------------------------------------------------------- numpy


def _numpy_case(case: Case, subjects: Sequence[str]) -> None:
    import numpy as np

    import polycos

    if case.dtype == "bfloat16":
        raise Unavailable("NumPy has no bfloat16")
    dt = np.dtype(case.dtype)
    x1, x2, g = (a.astype(dt) for a in _numpy_inputs(case.op, case.shape))
    _, wshapes = io_shapes(case.op, case.shape)
    reads = [x1, x2, g][: len(io_shapes(case.op, case.shape)[0])]
    eps = 1e-8
    b = _Builder(case)

    def floor() -> Any:
        # Fresh outputs, as every implementation must return: page-faulting new
        # memory in costs about as much as writing it (see the module docstring).
        for s in wshapes:
            np.empty(s, dt).fill(0)
        return [r.sum() for r in reads]

    b.add("floor", "floor", lambda: floor)
    if case.op == "forward":
        b.add("numpy", "polycos", lambda: lambda: polycos.cosine_similarity(x1, x2))
        b.add("numpy naive", "peer", lambda: lambda: _np_naive(x1, x2, eps))
    elif case.op == "forward+backward":

        def run() -> Any:  # forward, then its VJP reusing the forward's sums (like jax.vjp)
            s, vjp = polycos.cosine_similarity_with_vjp(x1, x2)
            return s, vjp(g)

        b.add("numpy", "polycos", lambda: run)
        b.add("numpy naive", "peer", lambda: lambda: _np_naive_vjp(g, x1, x2, eps))
    else:
        backward = case.op == "pairwise+backward"

        def subject() -> Callable[[], Any]:
            pw = _module_attr("polycos", "pairwise_cosine_similarity")
            if not backward:
                return lambda: pw(x1, x2)
            vjp = _module_attr("polycos", "pairwise_cosine_similarity_vjp")
            return lambda: (pw(x1, x2), vjp(g, x1, x2))

        b.add("numpy", "polycos", subject)
        b.add(
            "normalise+matmul",
            "peer",
            lambda: lambda: _np_normmul(x1, x2, g if backward else None, eps),
        )
        if not backward:

            def sk() -> Callable[[], Any]:
                _require("sklearn")
                from sklearn.metrics.pairwise import cosine_similarity as sk_cos

                return lambda: sk_cos(x1, x2)

            b.add("sklearn", "peer", sk)
    if "numpy" not in subjects:
        case.candidates = [c for c in case.candidates if c.kind != "polycos"]


def _np_naive(a: Any, b: Any, eps: float) -> Any:
    """The textbook formula: ``(a*b).sum(1) / max(|a| |b|, eps)``."""
    import numpy as np

    den = np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1)
    return (a * b).sum(1) / np.maximum(den, eps)


def _np_naive_vjp(g: Any, a: Any, b: Any, eps: float) -> Any:
    """The textbook formula and its textbook gradient, in plain NumPy."""
    import numpy as np

    n1 = np.maximum(np.linalg.norm(a, axis=1), eps)
    n2 = np.maximum(np.linalg.norm(b, axis=1), eps)
    s = (a * b).sum(1) / (n1 * n2)
    g1 = (g / (n1 * n2))[:, None] * b - (g * s / n1**2)[:, None] * a
    g2 = (g / (n1 * n2))[:, None] * a - (g * s / n2**2)[:, None] * b
    return s, g1, g2


def _np_normmul(a: Any, b: Any, gs: Any | None, eps: float) -> Any:
    """Plain normalise-then-matmul (and its backward when ``gs`` is given)."""
    import numpy as np

    na = np.maximum(np.linalg.norm(a, axis=1, keepdims=True), eps)
    nb = np.maximum(np.linalg.norm(b, axis=1, keepdims=True), eps)
    an, bn = a / na, b / nb
    s = an @ bn.T
    if gs is None:
        return s
    da, db = gs @ bn, gs.T @ an
    ga = (da - an * (da * an).sum(1, keepdims=True)) / na
    gb = (db - bn * (db * bn).sum(1, keepdims=True)) / nb
    return s, ga, gb


# --------------------------------------------------------------------------- torch


def _torch_case(case: Case, subjects: Sequence[str], device: str = "cpu") -> None:
    _require("torch")
    import torch
    import torch.nn.functional as F

    if device == "cuda" and not torch.cuda.is_available():
        raise Unavailable("torch sees no CUDA device")
    torch._dynamo.reset()  # fresh guards per case: no recompile limit across the grid
    dt = getattr(torch, case.dtype)
    arrays = [
        torch.from_numpy(a).to(device=device, dtype=dt) for a in _numpy_inputs(case.op, case.shape)
    ]
    x1, x2, g = arrays
    rshapes, wshapes = io_shapes(case.op, case.shape)
    reads = arrays[: len(rshapes)]
    writes = [torch.zeros(s, dtype=dt, device=device) for s in wshapes]
    backward = case.op.endswith("backward")
    eps = 1e-8
    b = _Builder(case)

    def floor() -> Any:
        for w in writes:  # fresh outputs, as for NumPy
            torch.empty_like(w).zero_()
        return [r.sum() for r in reads]

    b.add("floor", "floor", lambda: floor)
    a1, a2 = x1.detach().clone().requires_grad_(), x2.detach().clone().requires_grad_()

    def timed(f: Callable[[Any, Any], Any]) -> Callable[[], Any]:
        """Forward on plain tensors, or forward + autograd backward with upstream ``g``."""
        if not backward:
            return lambda: f(x1, x2)

        def run() -> Any:
            s = f(a1, a2)
            return s, torch.autograd.grad(s, (a1, a2), g)

        return run

    def compiled(f: Callable[..., Any]) -> Callable[..., Any]:
        return torch.compile(f, fullgraph=True, dynamic=False)

    eager_name = "torch-cuda" if device == "cuda" else "torch"
    if case.op in ROWWISE:
        if eager_name in subjects:
            b.add(
                eager_name,
                "polycos",
                lambda: timed(_module_attr("polycos.torch", "cosine_similarity")),
            )
        if "torch-compile" in subjects and device == "cpu":
            b.add(
                "torch-compile",
                "polycos",
                lambda: timed(compiled(_module_attr("polycos.torch", "cosine_similarity"))),
            )
        b.add("F.cosine_similarity", "peer", lambda: timed(F.cosine_similarity))
        if device == "cpu":
            b.add(
                "compile(F.cosine_similarity)", "peer", lambda: timed(compiled(F.cosine_similarity))
            )
    else:

        def pairwise() -> Callable[[Any, Any], Any]:
            try:
                return _module_attr("polycos.torch", "pairwise_cosine_similarity")
            except Unavailable:
                return _module_attr("polycos", "pairwise_cosine_similarity")

        if eager_name in subjects:
            b.add(eager_name, "polycos", lambda: timed(pairwise()))
        if "torch-compile" in subjects and device == "cpu":
            b.add("torch-compile", "polycos", lambda: timed(compiled(pairwise())))

        def normmul(u: Any, v: Any) -> Any:
            return F.normalize(u, dim=1, eps=eps) @ F.normalize(v, dim=1, eps=eps).T

        b.add("normalise+matmul", "peer", lambda: timed(normmul))

        def broadcast() -> Callable[[], Any]:
            n, m, d = case.shape
            if n * m * d * _ITEMSIZE[case.dtype] > BROADCAST_MAX_BYTES:
                raise Unavailable(
                    f"it materialises N*M*D = {n * m * d:,} elements (limit {BROADCAST_MAX_BYTES >> 20} MiB)"
                )
            return timed(lambda u, v: F.cosine_similarity(u[:, None, :], v[None, :, :], dim=2))

        b.add("F.cosine_similarity broadcast", "peer", broadcast)


def _torch_cuda_timer() -> Timer:
    import torch

    def timer(fn: Callable[[], Any], number: int) -> float:
        start = torch.cuda.Event(enable_timing=True)
        end = torch.cuda.Event(enable_timing=True)
        torch.cuda.synchronize()
        start.record()
        for _ in range(number):
            fn()
        end.record()
        end.synchronize()
        return start.elapsed_time(end) / 1e3 / number

    return timer


# --------------------------------------------------------------------------- jax


def _jax_case(case: Case, subjects: Sequence[str]) -> None:
    _require("jax")
    import jax
    import jax.numpy as jnp

    if case.dtype == "float64" and not jax.config.jax_enable_x64:
        raise Unavailable("float64 needs JAX_ENABLE_X64=1")
    dt = getattr(jnp, case.dtype)
    arrays = [jnp.asarray(a, dtype=dt) for a in _numpy_inputs(case.op, case.shape)]
    x1, x2, g = arrays
    rshapes, wshapes = io_shapes(case.op, case.shape)
    reads = arrays[: len(rshapes)]
    backward = case.op.endswith("backward")
    eps = 1e-8
    b = _Builder(case)

    @jax.jit
    def floor(v: Any, *rs: Any) -> Any:
        return [jnp.sum(r) for r in rs], [jnp.full(s, v, dtype=dt) for s in wshapes]

    zero = jnp.zeros((), dt)
    b.add("floor", "floor", lambda: lambda: floor(zero, *reads))

    def timed(f: Callable[[Any, Any], Any]) -> Callable[[], Any]:
        """``jit(f)``, or ``jit(grad)`` of the op contracted with the upstream gradient."""
        if not backward:
            jf = jax.jit(f)
            return lambda: jf(x1, x2)
        jg = jax.jit(jax.value_and_grad(lambda u, v, w: jnp.sum(f(u, v) * w), argnums=(0, 1)))
        return lambda: jg(x1, x2, g)

    if case.op in ROWWISE:
        if "jax" in subjects:
            b.add("jax", "polycos", lambda: timed(_module_attr("polycos.jax", "cosine_similarity")))

        def optax_peer() -> Callable[[], Any]:
            _require("optax")
            import optax

            return timed(lambda u, v: optax.cosine_similarity(u, v, epsilon=eps))

        b.add("optax.cosine_similarity", "peer", optax_peer)
    else:

        def pairwise() -> Callable[[Any, Any], Any]:
            try:
                return _module_attr("polycos.jax", "pairwise_cosine_similarity")
            except Unavailable:
                return _module_attr("polycos", "pairwise_cosine_similarity")

        if "jax" in subjects:
            b.add("jax", "polycos", lambda: timed(pairwise()))

        def normmul(u: Any, v: Any) -> Any:
            un = u / jnp.maximum(jnp.linalg.norm(u, axis=1, keepdims=True), eps)
            vn = v / jnp.maximum(jnp.linalg.norm(v, axis=1, keepdims=True), eps)
            return un @ vn.T

        b.add("normalise+matmul", "peer", lambda: timed(normmul))


# --------------------------------------------------------------------------- dask


def _dask_case(case: Case, subjects: Sequence[str]) -> None:
    _require("dask")
    import dask
    import dask.array as da
    import numpy as np

    import polycos

    if case.op not in ROWWISE:
        raise Unavailable("dask runs the row-wise ops only")
    if case.dtype == "bfloat16":
        raise Unavailable("NumPy (dask's chunks) has no bfloat16")
    n, d = case.shape
    if n * d > DASK_MAX_ELEMENTS:
        raise Unavailable(f"dask runs only small sizes (N*D <= {DASK_MAX_ELEMENTS:,})")
    dt = np.dtype(case.dtype)
    chunks = (max(1, -(-n // 4)), d)
    x1n, x2n, gn = (a.astype(dt) for a in _numpy_inputs(case.op, case.shape))
    x1, x2, g = (
        da.from_array(a, chunks=chunks if a.ndim == 2 else chunks[:1]) for a in (x1n, x2n, gn)
    )
    x1, x2, g = (a.persist() for a in (x1, x2, g))
    _, wshapes = io_shapes(case.op, case.shape)
    writes = [np.zeros(s, dt) for s in wshapes]
    backward = case.op == "forward+backward"
    reads = [x1, x2, g] if backward else [x1, x2]
    eps = 1e-8
    b = _Builder(case)

    def floor() -> Any:
        for w in writes:
            w.fill(0)
        return dask.compute(*[r.sum() for r in reads])

    b.add("floor", "floor", lambda: floor)
    if "dask" in subjects:
        if backward:
            b.add(
                "dask",
                "polycos",
                lambda: (
                    lambda: dask.compute(
                        polycos.cosine_similarity(x1, x2), *polycos.cosine_similarity_vjp(g, x1, x2)
                    )
                ),
            )
        else:
            b.add("dask", "polycos", lambda: lambda: polycos.cosine_similarity(x1, x2).compute())

    def naive(u: Any, v: Any) -> Any:
        return (u * v).sum(1) / da.maximum(
            da.linalg.norm(u, axis=1) * da.linalg.norm(v, axis=1), eps
        )

    if not backward:
        b.add("dask naive", "peer", lambda: lambda: naive(x1, x2).compute())


# --------------------------------------------------------------------------- cupy


def _cupy_case(case: Case, subjects: Sequence[str]) -> None:
    _require("cupy")
    import cupy as cp

    try:
        if cp.cuda.runtime.getDeviceCount() < 1:
            raise Unavailable("no CUDA device")
    except Unavailable:
        raise
    except Exception as exc:
        raise Unavailable(f"no CUDA device ({type(exc).__name__})") from None
    if case.dtype == "bfloat16":
        raise Unavailable("cupy has no bfloat16")
    dt = cp.dtype(case.dtype)
    arrays = [cp.asarray(a, dtype=dt) for a in _numpy_inputs(case.op, case.shape)]
    x1, x2, g = arrays
    rshapes, wshapes = io_shapes(case.op, case.shape)
    reads = arrays[: len(rshapes)]
    writes = [cp.zeros(s, dt) for s in wshapes]
    backward = case.op.endswith("backward")
    b = _Builder(case)

    def floor() -> Any:
        for w in writes:
            w.fill(0)
        return [r.sum() for r in reads]

    b.add("floor", "floor", lambda: floor)
    if case.op in ROWWISE and "cupy" in subjects:

        def subject() -> Callable[[], Any]:
            fwd = _module_attr("polycos.cupy", "cosine_similarity")
            if not backward:
                return lambda: fwd(x1, x2)
            vjp = _module_attr("polycos.cupy", "cosine_similarity_vjp")
            return lambda: (fwd(x1, x2), vjp(g, x1, x2))

        b.add("cupy", "polycos", subject)
    elif "cupy" in subjects:
        b.add("cupy", "polycos", lambda: _cupy_pairwise(x1, x2, g, backward))

    def torch_peer() -> Callable[[], Any]:
        _require("torch")
        import torch
        import torch.nn.functional as F

        if not torch.cuda.is_available():
            raise Unavailable("torch sees no CUDA device")
        t1, t2, tg = (torch.as_tensor(a, device="cuda") for a in (x1, x2, g))
        f = (
            F.cosine_similarity
            if case.op in ROWWISE
            else lambda u, v: F.normalize(u, dim=1) @ F.normalize(v, dim=1).T
        )
        if not backward:
            return lambda: f(t1, t2)
        a1, a2 = t1.clone().requires_grad_(), t2.clone().requires_grad_()

        def run() -> Any:
            s = f(a1, a2)
            return s, torch.autograd.grad(s, (a1, a2), tg)

        return run

    b.add(
        "torch CUDA F.cosine_similarity" if case.op in ROWWISE else "torch CUDA normalise+matmul",
        "peer",
        torch_peer,
    )


def _cupy_pairwise(x1: Any, x2: Any, g: Any, backward: bool) -> Callable[[], Any]:
    pw = _module_attr("polycos", "pairwise_cosine_similarity")
    if not backward:
        return lambda: pw(x1, x2)
    vjp = _module_attr("polycos", "pairwise_cosine_similarity_vjp")
    return lambda: (pw(x1, x2), vjp(g, x1, x2))


def _cupy_timer() -> Timer:
    def timer(fn: Callable[[], Any], number: int) -> float:
        from cupyx.profiler import benchmark

        result = benchmark(fn, n_repeat=number, n_warmup=0)
        return float(result.gpu_times.mean())

    return timer


# --------------------------------------------------------------------------- entry point

_BUILDERS: dict[str, Callable[[Case, Sequence[str]], None]] = {
    "numpy": _numpy_case,
    "torch": _torch_case,
    "jax": _jax_case,
    "dask": _dask_case,
    "cupy": _cupy_case,
    "torch-cuda": lambda case, subjects: _torch_case(case, subjects, device="cuda"),
}


def _timer_for(suite: str) -> Timer:
    if suite == "jax":
        import jax

        return cpu_timer(jax.block_until_ready)
    if suite == "cupy":
        return _cupy_timer()
    if suite == "torch-cuda":
        return _torch_cuda_timer()
    return cpu_timer(None)


def build_case(
    suite: str, op: str, shape: tuple[int, ...], dtype: str, subjects: Sequence[str]
) -> Case:
    """Build the candidates of one case.

    Parameters
    ----------
    suite : str
        A key of :data:`SUITES`.
    op : str
        One of :data:`OPS`.
    shape : tuple of int
        ``(N, D)`` for row-wise ops, ``(N, M, D)`` for pairwise ones.
    dtype : str
        One of :data:`DTYPES`.
    subjects : sequence of str
        The polycos subjects of this suite to measure (a subset of ``SUITES[suite]``).

    Returns
    -------
    Case
        With its floor, the available subjects and peers, and a note for each
        candidate skipped.

    Raises
    ------
    Unavailable
        When the whole suite cannot run this case (library missing, no GPU,
        dtype unsupported, size out of the suite's range).
    """
    device = "cuda" if suite in GPU_SUITES else "cpu"
    case = Case(
        suite,
        op,
        tuple(shape),
        dtype,
        device,
        model_bytes(op, shape, _ITEMSIZE[dtype]),
        cpu_timer(),
    )
    _BUILDERS[suite](case, subjects)
    case.timer = _timer_for(suite)
    if not any(c.kind == "polycos" for c in case.candidates):
        raise Unavailable("; ".join(case.notes) or "no polycos subject available")
    return case
