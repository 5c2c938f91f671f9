"""What is timed: the byte model, the machine floor, and the subjects and peers of each backend.

One *case* is one ``(device, op, shape, dtype)`` at one thread count. It holds
every selected polycos subject of every installed backend, their native peers
and the parts of the machine floor, all timed interleaved in the same process
(:mod:`polycos.bench._timing`), so every ratio of the case is taken against
the same floor.

Which backends exist comes from the registry (:func:`polycos._backends.installed`,
:func:`polycos._backends.get`): every installed backend gets a polycos subject
through the public API, on arrays made by its own ``from_numpy``. What only a
benchmark needs to know about a framework lives here, keyed by the registry's
names: how autodiff is driven (:data:`DRIVERS`: torch ``.backward()`` eager and
under ``torch.compile``, JAX ``jax.jit`` of the value and of
``jax.value_and_grad``), the native peers (:data:`PEERS`), the floor's stream
operations (:data:`FLOOR`) and timers (:data:`TIMERS`). A
backend the bench has no driver for is still measured: forward through the
public API, forward+backward through :func:`polycos.cosine_similarity_with_vjp`
or :func:`polycos.pairwise_cosine_similarity_with_vjp` (if it is not an
autodiff backend), lazy results materialised by its
``to_numpy``.

Byte model (:func:`model_bytes`; elements, times the itemsize):

=================== ================================================ =========================
op                  reads, in the order an autodiff API must read    writes
=================== ================================================ =========================
forward             ``x1 (N,D)``, ``x2 (N,D)``                       ``s (N)``
forward+backward    forward: ``x1``, ``x2``; backward: ``g (N)``,     ``s``, ``g1 (N,D)``,
                    ``x1``, ``x2`` again                             ``g2 (N,D)``
pairwise            ``x1 (N,D)``, ``x2 (M,D)``                       ``S (N,M)``
pairwise+backward   forward: ``x1``, ``x2``; backward: ``G (N,M)``,   ``S``, ``g1 (N,D)``,
                    ``x1``, ``x2`` again                             ``g2 (M,D)``
=================== ================================================ =========================

The backward reads the inputs a second time because autodiff runs it after the
forward has returned (torch ``.backward()``, ``jax.value_and_grad``, the
closure of :func:`polycos.cosine_similarity_with_vjp`): the upstream gradient
does not exist while the forward streams the rows, and at the sizes measured
the rows are no longer in cache. Residuals kept between the passes (per-row
norms, ``O(N)``) are not counted: an implementation may keep or recompute them.

The machine floor streams exactly those bytes with the fastest plain operation
of any installed library, at the case's thread count: reads by a full ``sum``
of each array read, in the order above (``numpy.sum``, ``torch.sum``, ``jnp.sum``
under ``jax.jit``), writes by filling a newly allocated array of each written
shape (``ndarray.fill``, ``np.copyto``, ``torch.Tensor.fill_``): a new array,
because every implementation must return new arrays, and all of them alive
until the call returns, as an op's outputs are. Whether it is reused
memory or pages first-touched one fault at a time is the C allocator's choice
(``--allocator``, :func:`polycos.bench._run.allocator_env`). Per round, the floor is
the fastest reader plus the fastest writer of that round.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from polycos.bench._timing import Timer, cpu_timer

__all__ = [
    "DEVICES",
    "DRIVERS",
    "DTYPES",
    "FLOOR",
    "ITEMSIZE",
    "JAX_DISPATCH",
    "KINDS",
    "OPS",
    "PAIRWISE",
    "PEERS",
    "ROWWISE",
    "TIMERS",
    "Candidate",
    "Case",
    "Unavailable",
    "build_case",
    "cuda_available",
    "io_shapes",
    "model_bytes",
    "subject_device",
    "subject_names",
]

ROWWISE: tuple[str, ...] = ("forward", "forward+backward")
PAIRWISE: tuple[str, ...] = ("pairwise", "pairwise+backward")
OPS: tuple[str, ...] = ROWWISE + PAIRWISE
DTYPES: tuple[str, ...] = ("float32", "float64", "float16", "bfloat16")
ITEMSIZE: dict[str, int] = {"float16": 2, "bfloat16": 2, "float32": 4, "float64": 8}
DEVICES: tuple[str, ...] = ("cpu", "cuda")
KINDS: tuple[str, ...] = ("polycos", "peer", "floor", "floor-read", "floor-write")
#: ``--allocator``: the measuring processes' C allocator (:func:`polycos.bench._run.allocator_env`).
ALLOCATORS: tuple[str, ...] = ("system", "reuse")
#: ``--jax-dispatch``: XLA:CPU runs a jitted call on a worker thread (``async``, JAX's default) or on
#: the calling thread (``sync``: ``jax_cpu_enable_async_dispatch`` off), which also allocates its outputs.
JAX_DISPATCH: tuple[str, ...] = ("async", "sync")

#: Subjects a registry backend has besides its own name (framework drivers below).
VARIANTS: dict[str, tuple[str, ...]] = {"torch": ("torch", "torch-compile", "torch-cuda")}
#: Subjects that run on a GPU.
CUDA_SUBJECTS: tuple[str, ...] = ("cupy", "torch-cuda")
#: Subjects built with ``torch.compile`` (``compile=False`` leaves them out).
COMPILED_SUBJECTS: tuple[str, ...] = ("torch-compile",)
#: PyTorch's broadcast call materialises N*M*D elements (several times with autograd):
#: 512 x 512 x 128 float32 takes 4 s forward+backward on the 2-core EPYC; it runs up to 32 MiB.
BROADCAST_MAX_BYTES = 1 << 25
EPS = 1e-8


class Unavailable(Exception):
    """A case, subject or peer that cannot run here; the message says why."""


def subject_names() -> tuple[str, ...]:
    """Every subject name ``--backends`` accepts: the registry's backends and their variants."""
    from polycos import _backends

    names: list[str] = []
    for entry in _backends.ENTRIES:
        if entry.requires:  # "array_api" (any other library) has nothing to import or time
            names += VARIANTS.get(entry.name, (entry.name,))
    return tuple(dict.fromkeys(names))


def subject_backend(subject: str) -> str:
    """The registry backend a subject belongs to (``torch-compile`` -> ``torch``)."""
    for backend, variants in VARIANTS.items():
        if subject in variants:
            return backend
    return subject


def cuda_available() -> str | None:
    """``None`` when a CUDA GPU is usable by torch or CuPy, else why not."""
    import importlib.util

    reasons = []
    if importlib.util.find_spec("torch") is not None:
        import torch

        if torch.cuda.is_available():
            return None
        reasons.append("torch sees no CUDA device")
    if importlib.util.find_spec("cupy") is not None:
        try:
            import cupy

            if cupy.cuda.runtime.getDeviceCount() > 0:
                return None
        except Exception:
            pass
        reasons.append("CuPy sees no CUDA device")
    return "; ".join(reasons) or "neither torch nor CuPy is installed"


def subject_device(subject: str) -> str:
    """``"cuda"`` for GPU subjects, ``"cpu"`` otherwise."""
    return "cuda" if subject in CUDA_SUBJECTS else "cpu"


# --------------------------------------------------------------------------- byte model


def io_shapes(op: str, shape: Sequence[int]) -> tuple[list[tuple[int, ...]], list[tuple[int, ...]]]:
    """Shapes the op must read and write, in order (the byte model of the module docstring).

    Parameters
    ----------
    op : str
        One of :data:`OPS`.
    shape : sequence of int
        ``(N, D)`` for row-wise ops, ``(N, M, D)`` for pairwise ones.

    Returns
    -------
    (list, list)
        Shapes read (the backward's second read of the inputs included) and shapes written.

    Examples
    --------
    >>> io_shapes("forward", (4, 3))
    ([(4, 3), (4, 3)], [(4,)])
    >>> io_shapes("forward+backward", (4, 3))
    ([(4, 3), (4, 3), (4,), (4, 3), (4, 3)], [(4,), (4, 3), (4, 3)])
    >>> io_shapes("pairwise+backward", (4, 5, 3))
    ([(4, 3), (5, 3), (4, 5), (4, 3), (5, 3)], [(4, 5), (4, 3), (5, 3)])
    """
    if op in ROWWISE:
        n, d = shape
        a, b, out = (n, d), (n, d), (n,)
    elif op in PAIRWISE:
        n, m, d = shape
        a, b, out = (n, d), (m, d), (n, m)
    else:
        raise ValueError(f"unknown op {op!r}")
    if op.endswith("backward"):
        return [a, b, out, a, b], [out, a, b]
    return [a, b], [out]


def model_bytes(op: str, shape: Sequence[int], itemsize: int) -> int:
    """Bytes the op must move: every element of :func:`io_shapes` once.

    Examples
    --------
    >>> model_bytes("forward", (32768, 256), 4) / 2**20  # two 32 MiB inputs and s
    64.125
    >>> model_bytes("forward+backward", (32768, 256), 4) / 2**20  # 6 N D + 2 N elements
    192.25
    """
    reads, writes = io_shapes(op, shape)
    return itemsize * sum(math.prod(s) for s in reads + writes)


# --------------------------------------------------------------------------- cases


@dataclass
class Candidate:
    """One timed callable of a case."""

    name: str
    kind: str  #: one of :data:`KINDS` except "floor" (the floor is computed from the parts)
    backend: str | None  #: the library it belongs to (subjects: their registry backend)
    fn: Callable[[], Any]
    timer: Timer
    call: str = ""  #: what it calls, in words (stored in the JSON)
    compiles: bool = False  #: its first call compiles (``jax.jit``, ``torch.compile``)


@dataclass
class Case:
    """Everything timed together for one ``(device, op, shape, dtype)``."""

    device: str
    op: str
    shape: tuple[int, ...]
    dtype: str
    nbytes: int
    candidates: list[Candidate] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)


@dataclass
class Inputs:
    """The case's data as float64 NumPy arrays; each library converts them itself."""

    op: str
    shape: tuple[int, ...]
    dtype: str
    x1: Any
    x2: Any
    g: Any  #: upstream gradient, the output's shape
    cache: dict[str, tuple[Any, Any, Any]] = field(default_factory=dict)

    def arrays(self, key: str, convert: Callable[[Any], Any]) -> tuple[Any, Any, Any]:
        """``x1, x2, g`` converted once per library (``key``), shared by its candidates."""
        if key not in self.cache:
            self.cache[key] = tuple(convert(a) for a in (self.x1, self.x2, self.g))  # type: ignore[assignment]
        return self.cache[key]

    def reads(self, x1: Any, x2: Any, g: Any) -> list[Any]:
        """``x1, x2`` (and ``g, x1, x2`` for a backward) in the byte model's order."""
        return [x1, x2, g, x1, x2] if self.op.endswith("backward") else [x1, x2]

    @property
    def writes(self) -> list[tuple[int, ...]]:
        return io_shapes(self.op, self.shape)[1]


def make_inputs(op: str, shape: Sequence[int], dtype: str, seed: int = 0) -> Inputs:
    import numpy as np

    rng = np.random.default_rng(seed)
    reads, writes = io_shapes(op, shape)
    return Inputs(
        op,
        tuple(shape),
        dtype,
        rng.standard_normal(reads[0]),
        rng.standard_normal(reads[1]),
        rng.standard_normal(writes[0]),
    )


class _Builder:
    """Collects candidates; one whose construction fails becomes a note instead."""

    def __init__(self, case: Case) -> None:
        self.case = case

    def add(
        self,
        name: str,
        kind: str,
        backend: str | None,
        make: Callable[[], Callable[[], Any]],
        timer: Timer,
        call: str = "",
        compiles: bool | None = None,
    ) -> None:
        if compiles is None:
            compiles = backend == "jax"  # everything JAX is timed under jax.jit
        try:
            fn = make()
        except Unavailable as exc:
            self.case.notes.append(f"{name}: skipped, {exc}")
            return
        except Exception as exc:  # a library that cannot build this candidate here
            self.case.notes.append(f"{name}: skipped, {_short(exc)}")
            return
        self.case.candidates.append(Candidate(name, kind, backend, fn, timer, call, compiles))


def _short(exc: BaseException, limit: int = 200) -> str:
    lines = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {lines[0][:limit] if lines else ''}".rstrip(": ")


def _installed() -> list[str]:
    from polycos import _backends

    return _backends.installed()


# --------------------------------------------------------------------------- timers


def _jax_timer() -> Timer:
    import jax

    return cpu_timer(jax.block_until_ready)


def _torch_cuda_timer() -> Timer:
    """CUDA events around ``number`` back-to-back calls on torch's current stream."""
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


def _cupy_timer() -> Timer:
    """CUDA events around ``number`` back-to-back calls on CuPy's current stream."""
    import cupy as cp

    def timer(fn: Callable[[], Any], number: int) -> float:
        cp.cuda.Device().synchronize()
        start, end = cp.cuda.Event(), cp.cuda.Event()
        start.record()
        for _ in range(number):
            fn()
        end.record()
        end.synchronize()
        return cp.cuda.get_elapsed_time(start, end) / 1e3 / number

    return timer


#: Timers of libraries whose calls return before the work is done.
TIMERS: dict[str, Callable[[], Timer]] = {"jax": _jax_timer, "cupy": _cupy_timer}


def _timer(backend: str, device: str = "cpu") -> Timer:
    if backend == "torch" and device == "cuda":
        return _torch_cuda_timer()
    make = TIMERS.get(backend)
    return make() if make is not None else cpu_timer(None)


# --------------------------------------------------------------------------- the floor


def _numpy_arrays(inp: Inputs) -> tuple[Any, Any, Any]:
    import numpy as np

    if inp.dtype == "bfloat16":
        import ml_dtypes

        dt: Any = ml_dtypes.bfloat16
    else:
        dt = np.dtype(inp.dtype)
    return inp.arrays("numpy", lambda a: a.astype(dt))


def _torch_arrays(inp: Inputs, device: str) -> tuple[Any, Any, Any]:
    import torch

    dt = getattr(torch, inp.dtype)
    return inp.arrays(f"torch-{device}", lambda a: torch.from_numpy(a).to(device=device, dtype=dt))


def _jax_arrays(inp: Inputs) -> tuple[Any, Any, Any]:
    import jax.numpy as jnp

    with _x64(inp.dtype):
        dt = getattr(jnp, inp.dtype)
        return inp.arrays("jax", lambda a: jnp.asarray(a, dtype=dt))


def _floor_numpy(b: _Builder, inp: Inputs) -> None:
    import numpy as np

    x1, x2, g = _numpy_arrays(inp)
    reads = inp.reads(x1, x2, g)
    dt, writes = x1.dtype, inp.writes
    timer = cpu_timer(None)
    b.add("numpy.sum", "floor-read", "numpy", lambda: lambda: [r.sum() for r in reads], timer,
          "x.sum() of each array read")

    def fill() -> Any:
        out = [np.empty(s, dt) for s in writes]  # all alive at once, as an op's outputs are
        for a in out:
            a.fill(0)
        return out

    def copyto() -> Any:
        out = [np.empty(s, dt) for s in writes]
        for a in out:
            np.copyto(a, 0)
        return out

    b.add("ndarray.fill", "floor-write", "numpy", lambda: fill, timer,
          "np.empty(shape).fill(0) of each array written")
    b.add("np.copyto", "floor-write", "numpy", lambda: copyto, timer,
          "np.copyto(np.empty(shape), 0) of each array written")


def _floor_torch(b: _Builder, inp: Inputs, device: str) -> None:
    import torch

    if device == "cuda" and not torch.cuda.is_available():
        raise Unavailable("torch sees no CUDA device")
    dt = getattr(torch, inp.dtype)
    x1, x2, g = _torch_arrays(inp, device)
    reads, writes = inp.reads(x1, x2, g), inp.writes
    timer = _timer("torch", device)
    b.add("torch.sum", "floor-read", "torch", lambda: lambda: [r.sum() for r in reads], timer,
          "x.sum() of each tensor read")
    b.add(
        "torch.Tensor.fill_",
        "floor-write",
        "torch",
        lambda: lambda: [torch.empty(s, dtype=dt, device=device).fill_(0) for s in writes],
        timer,
        "torch.empty(shape).fill_(0) of each tensor written",
    )


def _floor_jax(b: _Builder, inp: Inputs) -> None:
    import jax
    import jax.numpy as jnp

    x1, x2, g = _jax_arrays(inp)
    reads = inp.reads(x1, x2, g)
    total = jax.jit(jnp.sum)

    def run() -> Any:
        # One call per array, each finished before the next: one jit over all of them
        # would fuse the sums into one loop that reads x1's two passes from the same
        # addresses at once (the second from L1), undercounting the backward's re-read.
        return [total(r).block_until_ready() for r in reads]

    b.add("jnp.sum (jit)", "floor-read", "jax", lambda: _in_x64(inp.dtype, run), _jax_timer(),
          "jax.jit(jnp.sum) of each array read, one call after the other")


def _floor_cupy(b: _Builder, inp: Inputs) -> None:
    import cupy as cp

    dt = cp.dtype(inp.dtype)
    x1, x2, g = (cp.asarray(a, dtype=dt) for a in (inp.x1, inp.x2, inp.g))
    reads, writes = inp.reads(x1, x2, g), inp.writes
    timer = _cupy_timer()
    b.add("cupy.sum", "floor-read", "cupy", lambda: lambda: [r.sum() for r in reads], timer,
          "x.sum() of each array read")
    b.add("cupy.ndarray.fill", "floor-write", "cupy",
          lambda: lambda: [cp.empty(s, dt).fill(0) for s in writes], timer,
          "cp.empty(shape).fill(0) of each array written (from CuPy's pool)")


#: Libraries whose plain stream operations (reads by ``sum``, writes by filling new
#: arrays) make the machine floor, by registry name: ``(builder, inputs, device)``.
FLOOR: dict[str, Callable[[_Builder, Inputs, str], None]] = {
    "numpy": lambda b, inp, dev: _floor_numpy(b, inp) if dev == "cpu" else None,
    "torch": _floor_torch,
    "jax": lambda b, inp, dev: _floor_jax(b, inp) if dev == "cpu" else None,
    "cupy": lambda b, inp, dev: _floor_cupy(b, inp) if dev == "cuda" else None,
}

def _add_floor(b: _Builder, inp: Inputs, device: str) -> None:
    for name in _installed():
        builder = FLOOR.get(name)
        if builder is None:
            continue
        try:
            builder(b, inp, device)
        except Unavailable as exc:
            b.case.notes.append(f"floor ({name}): skipped, {exc}")
        except Exception as exc:
            b.case.notes.append(f"floor ({name}): skipped, {_short(exc)}")
    kinds = {c.kind for c in b.case.candidates}
    if not {"floor-read", "floor-write"} <= kinds:
        raise Unavailable(f"no library can stream {inp.dtype} on {device} for the floor")


# --------------------------------------------------------------------------- subjects: the public API


def _x64(dtype: str) -> Any:
    """JAX's float64 needs x64 (scoped, so float32 runs as users run it)."""
    import contextlib

    if dtype != "float64":
        return contextlib.nullcontext()
    import jax

    return jax.enable_x64(True)


def _in_x64(dtype: str, fn: Callable[[], Any]) -> Callable[[], Any]:
    if dtype != "float64":
        return fn

    def run() -> Any:
        with _x64(dtype):
            return fn()

    return run


def _public(op: str, broadcast: bool) -> tuple[Callable[..., Any], Callable[..., Any] | None]:
    """``(value(x1, x2), with_vjp(x1, x2) -> (value, vjp))`` through polycos's public API."""
    import polycos

    if op in ROWWISE:
        return polycos.cosine_similarity, polycos.cosine_similarity_with_vjp
    if broadcast:  # the outer-product broadcast of G9 (SimCLR's spelling)

        def value(a: Any, b: Any) -> Any:
            return polycos.cosine_similarity(a[:, None, :], b[None, :, :], dim=2)

        def with_vjp(a: Any, b: Any) -> Any:
            return polycos.cosine_similarity_with_vjp(a[:, None, :], b[None, :, :], dim=2)

        return value, with_vjp

    return polycos.pairwise_cosine_similarity, polycos.pairwise_cosine_similarity_with_vjp


def _generic(
    b: _Builder, name: str, backend: Any, inp: Inputs, broadcast: bool,
    materialise: Callable[..., Any] | None = None,
    convert: Callable[[Any], Any] | None = None,
) -> None:
    """A subject through the public API on the backend's own arrays (no autodiff driver needed)."""
    op = inp.op
    label = f"{name} broadcast" if broadcast else name
    value, with_vjp = _public(op, broadcast)
    if materialise is None and backend.lazy:
        def materialise(*outs: Any) -> Any:
            return [backend.to_numpy(o) for o in outs]

    done = materialise or (lambda *outs: outs)

    def own(a: Any) -> Any:
        try:
            return backend.from_numpy(a, inp.dtype)
        except (AttributeError, TypeError) as exc:  # e.g. array_api_strict has no float16
            raise Unavailable(f"{backend.name} has no {inp.dtype} arrays") from exc

    def make() -> Callable[[], Any]:
        x1, x2, g = inp.arrays(backend.name, convert or own)
        if not op.endswith("backward"):
            return lambda: done(value(x1, x2))
        if backend.autodiff:
            raise Unavailable(f"polycos bench has no autodiff driver for {backend.name}")

        def run() -> Any:
            s, vjp = with_vjp(x1, x2)
            return done(s, *vjp(g))

        return run

    what = "polycos public API" + (", then the returned vjp" if op.endswith("backward") else "")
    b.add(label, "polycos", backend.name, make, _timer(backend.name), what)


# --------------------------------------------------------------------------- torch


def _torch_subjects(b: _Builder, inp: Inputs, subjects: Sequence[str], device: str, compile: bool) -> None:
    import torch

    if device == "cuda" and not torch.cuda.is_available():
        raise Unavailable("torch sees no CUDA device")
    if compile and device == "cpu":
        # Fresh guards per case: a grid of shapes and dtypes would otherwise hit dynamo's
        # recompile limit (FailOnRecompileLimitHit under fullgraph=True).
        torch._dynamo.reset()
    t1, t2, tg = _torch_arrays(inp, device)
    timer = _timer("torch", device)
    eager = "torch-cuda" if device == "cuda" else "torch"
    wanted = [(eager, False)]
    if device == "cpu" and compile:
        wanted.append(("torch-compile", True))
    for name, compiled in wanted:
        if name not in subjects:
            continue
        variants = (False, True) if inp.op in PAIRWISE and not compiled else (False,)
        for broadcast in variants:
            f = _public(inp.op, broadcast)[0]
            label = f"{name} broadcast" if broadcast else name
            fn_make = _torch_timed(inp.op, f, t1, t2, tg, compiled)
            b.add(label, "polycos", "torch", fn_make, timer,
                  ("torch.compile(fullgraph=True, dynamic=False) of " if compiled else "")
                  + "the polycos public API" + (", .backward(g)" if inp.op.endswith("backward") else ""),
                  compiles=compiled)


def _torch_timed(
    op: str, f: Callable[..., Any], t1: Any, t2: Any, tg: Any, compiled: bool
) -> Callable[[], Callable[[], Any]]:
    """Forward on plain tensors, or forward then ``.backward(g)`` on leaves (grads reset first)."""

    def make() -> Callable[[], Any]:
        import torch

        fn = torch.compile(f, fullgraph=True, dynamic=False) if compiled else f
        if not op.endswith("backward"):
            return lambda: fn(t1, t2)
        # Leaves on the inputs' own memory (no copy): every subject, peer and the floor read
        # the same pages. A clone is new memory whose page size (4 KiB or huge) depends on the
        # allocator's history in the process: polycos eager forward + backward took 10.4 ms in
        # one run and 17.8 ms (0 page faults) in the next with clones, torch.compile 10.8 ms.
        a1, a2 = t1.detach().requires_grad_(), t2.detach().requires_grad_()

        def run() -> Any:
            a1.grad = a2.grad = None  # no accumulation into old gradients
            s = fn(a1, a2)
            s.backward(tg)
            return s, a1.grad, a2.grad

        return run

    return make


def _torch_peers(b: _Builder, inp: Inputs, device: str, compile: bool) -> None:
    import torch.nn.functional as F

    t1, t2, tg = _torch_arrays(inp, device)
    timer = _timer("torch", device)
    bwd = ", .backward(g)" if inp.op.endswith("backward") else ""
    if inp.op in ROWWISE:
        if device == "cuda":
            b.add("torch CUDA F.cosine_similarity", "peer", "torch",
                  _torch_timed(inp.op, F.cosine_similarity, t1, t2, tg, False), timer,
                  "torch.nn.functional.cosine_similarity eager" + bwd)
            return
        b.add("F.cosine_similarity", "peer", "torch",
              _torch_timed(inp.op, F.cosine_similarity, t1, t2, tg, False), timer,
              "torch.nn.functional.cosine_similarity eager" + bwd)
        if compile:
            b.add("torch.compile(F.cosine_similarity)", "peer", "torch",
                  _torch_timed(inp.op, F.cosine_similarity, t1, t2, tg, True), timer,
                  "torch.compile(fullgraph=True, dynamic=False) of F.cosine_similarity" + bwd,
                  compiles=True)
        return

    def normmul(u: Any, v: Any) -> Any:
        return F.normalize(u, dim=1, eps=EPS) @ F.normalize(v, dim=1, eps=EPS).T

    name = "torch CUDA normalise+matmul" if device == "cuda" else "normalise+matmul (torch)"
    b.add(name, "peer", "torch", _torch_timed(inp.op, normmul, t1, t2, tg, False), timer,
          "F.normalize(a) @ F.normalize(b).T" + bwd)
    if device == "cpu":
        n, m, d = inp.shape

        def broadcast() -> Callable[[], Any]:
            nbytes = n * m * d * ITEMSIZE[inp.dtype]
            if nbytes > BROADCAST_MAX_BYTES:
                raise Unavailable(
                    f"it materialises N*M*D = {n * m * d:,} elements, {nbytes / 2**20:,.0f} MiB "
                    f"(limit {BROADCAST_MAX_BYTES >> 20} MiB)"
                )
            return _torch_timed(
                inp.op, lambda u, v: F.cosine_similarity(u[:, None, :], v[None, :, :], dim=2),
                t1, t2, tg, False,
            )()

        b.add("F.cosine_similarity broadcast", "peer", "torch", broadcast, timer,
              "F.cosine_similarity(a[:, None], b[None], dim=2)" + bwd)


# --------------------------------------------------------------------------- jax


def _jax_timed(op: str, f: Callable[..., Any], inp: Inputs) -> Callable[[], Callable[[], Any]]:
    """``jax.jit(f)``, or ``jax.jit(jax.value_and_grad)`` of ``sum(f(x1, x2) * g)``."""

    def make() -> Callable[[], Any]:
        import jax
        import jax.numpy as jnp

        x1, x2, g = _jax_arrays(inp)
        with _x64(inp.dtype):
            if not op.endswith("backward"):
                jf = jax.jit(f)
                return _in_x64(inp.dtype, lambda: jf(x1, x2))
            jg = jax.jit(jax.value_and_grad(lambda u, v, w: jnp.sum(f(u, v) * w), argnums=(0, 1)))
            return _in_x64(inp.dtype, lambda: jg(x1, x2, g))

    return make


def _jax_subjects(b: _Builder, inp: Inputs, subjects: Sequence[str]) -> None:
    if "jax" not in subjects:
        return
    timer = _jax_timer()
    bwd = "jax.jit(jax.value_and_grad) of sum(s * g)" if inp.op.endswith("backward") else "jax.jit"
    for broadcast in (False, True) if inp.op in PAIRWISE else (False,):
        f = _public(inp.op, broadcast)[0]
        b.add("jax broadcast" if broadcast else "jax", "polycos", "jax", _jax_timed(inp.op, f, inp),
              timer, f"{bwd} of the polycos public API")


def _jax_peers(b: _Builder, inp: Inputs) -> None:
    import jax.numpy as jnp

    timer = _jax_timer()
    how = "jax.jit(jax.value_and_grad) of sum(s * g)" if inp.op.endswith("backward") else "jax.jit"
    if inp.op in ROWWISE:

        def optax_peer() -> Callable[[], Any]:
            import optax

            return _jax_timed(inp.op, lambda u, v: optax.cosine_similarity(u, v, epsilon=EPS), inp)()

        b.add("optax.cosine_similarity", "peer", "jax", optax_peer, timer,
              f"{how} of optax.cosine_similarity")
        return

    def normmul(u: Any, v: Any) -> Any:
        un = u / jnp.maximum(jnp.linalg.norm(u, axis=1, keepdims=True), EPS)
        vn = v / jnp.maximum(jnp.linalg.norm(v, axis=1, keepdims=True), EPS)
        return un @ vn.T

    b.add("normalise+matmul (jax)", "peer", "jax", _jax_timed(inp.op, normmul, inp), timer,
          f"{how} of (a / |a|) @ (b / |b|).T")


# --------------------------------------------------------------------------- numpy, dask peers


def _numpy_peers(b: _Builder, inp: Inputs) -> None:
    if inp.dtype == "bfloat16":
        raise Unavailable("NumPy has no bfloat16 arithmetic")
    x1, x2, g = _numpy_arrays(inp)
    timer = cpu_timer(None)
    if inp.op == "forward":
        b.add("numpy normalise+dot", "peer", "numpy", lambda: lambda: _np_normdot(x1, x2), timer,
              "np.vecdot(a / |a|, b / |b|)")
    elif inp.op == "forward+backward":
        b.add("numpy normalise+dot", "peer", "numpy", lambda: lambda: _np_normdot_vjp(g, x1, x2), timer,
              "np.vecdot(a / |a|, b / |b|) and its textbook gradient")
    else:
        backward = inp.op == "pairwise+backward"
        b.add("normalise+matmul (numpy)", "peer", "numpy",
              lambda: lambda: _np_normmul(x1, x2, g if backward else None), timer,
              "(a / |a|) @ (b / |b|).T" + (" and its gradient by two matmuls" if backward else ""))
        if not backward:

            def sk() -> Callable[[], Any]:
                from sklearn.metrics.pairwise import cosine_similarity as sk_cos

                return lambda: sk_cos(x1, x2)

            b.add("sklearn cosine_similarity", "peer", "numpy", sk, timer,
                  "sklearn.metrics.pairwise.cosine_similarity")


def _np_norms(a: Any) -> Any:
    import numpy as np

    return np.maximum(np.linalg.norm(a, axis=1, keepdims=True), EPS)


def _np_normdot(a: Any, b: Any) -> Any:
    """The plain baseline: normalise the rows, then one dot product per row."""
    import numpy as np

    return np.vecdot(a / _np_norms(a), b / _np_norms(b))


def _np_normdot_vjp(g: Any, a: Any, b: Any) -> Any:
    """The baseline and its textbook gradient, in plain NumPy."""
    import numpy as np

    na, nb = _np_norms(a), _np_norms(b)
    an, bn = a / na, b / nb
    s = np.vecdot(an, bn)
    gc = g[:, None]
    ga = gc * (bn - s[:, None] * an) / na
    gb = gc * (an - s[:, None] * bn) / nb
    return s, ga, gb


def _np_normmul(a: Any, b: Any, gs: Any | None) -> Any:
    """Plain normalise-then-matmul (and its backward when ``gs`` is given)."""
    na, nb = _np_norms(a), _np_norms(b)
    an, bn = a / na, b / nb
    s = an @ bn.T
    if gs is None:
        return s
    da, db = gs @ bn, gs.T @ an
    ga = (da - an * (da * an).sum(1, keepdims=True)) / na
    gb = (db - bn * (db * bn).sum(1, keepdims=True)) / nb
    return s, ga, gb


def _dask_compute(*outs: Any) -> Any:
    import dask

    return dask.compute(*outs)


def _dask_subjects(b: _Builder, backend: Any, inp: Inputs, subjects: Sequence[str]) -> None:
    if "dask" not in subjects:
        return
    def chunked(a: Any) -> Any:  # rows in 4 chunks: the chunk-wise path, not one block
        x = backend.from_numpy(a, inp.dtype)
        return x.rechunk((max(1, -(-a.shape[0] // 4)), *a.shape[1:])).persist()

    for broadcast in (False, True) if inp.op in PAIRWISE else (False,):
        _generic(b, "dask", backend, inp, broadcast, materialise=_dask_compute, convert=chunked)


def _dask_peers(b: _Builder, inp: Inputs) -> None:
    import dask.array as da

    if inp.op != "forward" or inp.dtype == "bfloat16":
        return
    x1, x2, _ = _numpy_arrays(inp)
    chunks = (max(1, -(-inp.shape[0] // 4)), inp.shape[1])
    d1, d2 = (da.from_array(a, chunks=chunks).persist() for a in (x1, x2))

    def naive() -> Any:
        n1 = da.maximum(da.linalg.norm(d1, axis=1, keepdims=True), EPS)
        n2 = da.maximum(da.linalg.norm(d2, axis=1, keepdims=True), EPS)
        return ((d1 / n1) * (d2 / n2)).sum(1).compute()

    b.add("dask normalise+dot", "peer", "dask", lambda: naive, cpu_timer(None),
          "((a / |a|) * (b / |b|)).sum(1).compute()")


# --------------------------------------------------------------------------- tables


def _default_subjects(b: _Builder, backend: Any, inp: Inputs, subjects: Sequence[str], device: str,
                      compile: bool) -> None:
    if device != subject_device(backend.name) or backend.name not in subjects:
        return
    for broadcast in (False, True) if inp.op in PAIRWISE else (False,):
        _generic(b, backend.name, backend, inp, broadcast)


#: Autodiff and subject drivers by registry name: ``(builder, backend, inputs, subjects, device, compile)``.
DRIVERS: dict[str, Callable[..., None]] = {
    "torch": lambda b, be, inp, subs, dev, comp: _torch_subjects(b, inp, subs, dev, comp),
    "jax": lambda b, be, inp, subs, dev, comp: _jax_subjects(b, inp, subs) if dev == "cpu" else None,
    "dask": lambda b, be, inp, subs, dev, comp: _dask_subjects(b, be, inp, subs) if dev == "cpu" else None,
}
#: Native peers by registry name: ``(builder, inputs, device, compile)``.
PEERS: dict[str, Callable[[_Builder, Inputs, str, bool], None]] = {
    "numpy": lambda b, inp, dev, comp: _numpy_peers(b, inp) if dev == "cpu" else None,
    "torch": lambda b, inp, dev, comp: _torch_peers(b, inp, dev, comp),
    "jax": lambda b, inp, dev, comp: _jax_peers(b, inp) if dev == "cpu" else None,
    "dask": lambda b, inp, dev, comp: _dask_peers(b, inp) if dev == "cpu" else None,
}


def build_case(
    op: str,
    shape: Sequence[int],
    dtype: str,
    subjects: Sequence[str],
    *,
    device: str = "cpu",
    compile: bool = True,
) -> Case:
    """Build the floor parts, subjects and peers of one case.

    Parameters
    ----------
    op : str
        One of :data:`OPS`.
    shape : sequence of int
        ``(N, D)`` for row-wise ops, ``(N, M, D)`` for pairwise ones.
    dtype : str
        One of :data:`DTYPES`.
    subjects : sequence of str
        The polycos subjects to measure (names of :func:`subject_names`); their
        backends' peers come with them.
    device : str, optional
        ``"cpu"`` or ``"cuda"`` (the subjects of that device).
    compile : bool, optional
        Include the ``torch.compile`` subject and peer (each compiles for seconds).

    Returns
    -------
    Case
        With its floor parts, the available subjects and peers, and a note for
        each one skipped.

    Raises
    ------
    Unavailable
        When no subject or no floor can run this case.
    """
    from polycos import _backends

    shape = tuple(shape)
    case = Case(device, op, shape, dtype, model_bytes(op, shape, ITEMSIZE[dtype]))
    b = _Builder(case)
    inp = make_inputs(op, shape, dtype)
    _add_floor(b, inp, device)
    installed = _installed()
    for name in installed:
        wanted = [s for s in subjects if subject_backend(s) == name and subject_device(s) == device]
        if not wanted:
            continue
        try:
            backend = _backends.get(name)
            driver = DRIVERS.get(name, _default_subjects)
            driver(b, backend, inp, wanted, device, compile)
        except Unavailable as exc:
            case.notes.append(f"{name}: skipped, {exc}")
        except Exception as exc:  # a backend that cannot run here (import error, no device)
            case.notes.append(f"{name}: skipped, {_short(exc)}")
    present = {c.backend for c in case.candidates if c.kind == "polycos"}
    if device == "cuda" and "cupy" in present:
        present.add("torch")  # cupy's peer is torch CUDA
    for name in installed:
        peers = PEERS.get(name)
        if peers is None or name not in present:
            continue
        try:
            peers(b, inp, device, compile)
        except Unavailable as exc:
            case.notes.append(f"peers ({name}): skipped, {exc}")
        except Exception as exc:
            case.notes.append(f"peers ({name}): skipped, {_short(exc)}")
    if not any(c.kind == "polycos" for c in case.candidates):
        raise Unavailable("; ".join(case.notes) or "no polycos subject available")
    return case
