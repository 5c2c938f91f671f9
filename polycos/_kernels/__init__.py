r"""The fused native CPU kernel: loader and wrappers (ctypes; no torch, JAX or CuPy import).

``cpu.cpp`` is compiled by ``pip install`` (``setup.py``) into a plain shared
library next to this file, ``_polycos_cpu.so``. It computes cosine similarity,
its VJP and the pairwise row normalisation in one pass over each row (two for
the VJP), mirroring :mod:`polycos._core` operation by operation through the
per-row functions of ``rows.h`` (which the CUDA kernels in ``cuda.cu`` share).
See ``docs/kernels.md`` for the layouts, threads, ISA dispatch and figures.

Three levels:

* :func:`available` / :func:`unavailable_reason`: the library may be missing
  (no compiler at install time); this module then still imports and polycos
  falls back to its array-API core.
* NumPy: :func:`forward`, :func:`backward`, :func:`normalize_rows` take NumPy
  arrays (float16, ``ml_dtypes.bfloat16``, float32, float64; any strides,
  broadcasting) and return new NumPy arrays.
* Pointers (for the torch adapter, which owns its tensors): :func:`forward_ptr`,
  :func:`backward_ptr`, :func:`normalize_rows_ptr` take ``Operand = (ptr,
  shape, strides_in_elements)`` tuples and write into given outputs.
* JAX: :func:`register_jax` and :func:`jax_forward`, :func:`jax_forward_value`, :func:`jax_backward`,
  :func:`jax_normalize_rows` call the XLA FFI handlers of the same library
  (``jax.ffi.ffi_call``), inside ``jax.jit`` and ``jax.vmap``.

Environment variables (read per call unless said):

* ``POLYCOS_NUM_THREADS``: threads when ``nthreads`` is ``None`` (default: the
  CPUs this process may run on).
* ``POLYCOS_CPU_ISA``: ``baseline`` or ``avx2`` forces an instruction-set clone
  (read at load; default: the best this CPU supports). Results are bitwise
  identical across clones; this exists to test that.
* ``POLYCOS_CPU_LIBRARY``: path of a library to load instead of the bundled one.
* ``POLYCOS_CPU_KERNEL=0``: do not load the library (polycos uses its core).

>>> from polycos import _kernels
>>> isinstance(_kernels.available(), bool)
True
"""

from __future__ import annotations

import ctypes
import math
import os
import sys
import threading
from collections.abc import Sequence
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np

__all__ = [
    "NeedContiguous",
    "Operand",
    "address",
    "available",
    "backward",
    "backward_ptr",
    "forward",
    "forward_ptr",
    "isa",
    "jax_backward",
    "jax_forward",
    "jax_forward_value",
    "jax_normalize_rows",
    "normalize_pair",
    "normalize_rows",
    "normalize_rows_ptr",
    "normalize_vjp",
    "num_threads",
    "register_jax",
    "unavailable_reason",
]

#: ``(pointer, shape, strides in elements)`` of one array.
Operand = tuple[int, Sequence[int], Sequence[int]]

#: Dtype codes of the C ABI.
DTYPE_CODES: dict[str, int] = {"float16": 0, "bfloat16": 1, "float32": 2, "float64": 3}
#: Default accumulation dtype per storage dtype (``_core.accumulation_dtype``).
DEFAULT_ACC: dict[str, str] = {
    "float16": "float32",
    "bfloat16": "float32",
    "float32": "float64",
    "float64": "float64",
}
#: Supported (storage, accumulation) pairs; float32/float32 serves JAX without x64 (float32
#: residuals, from float64 sums where float32 would not rescale the row: docs/kernels.md).
PAIRS: frozenset[tuple[str, str]] = frozenset(
    {
        ("float16", "float32"),
        ("bfloat16", "float32"),
        ("float32", "float64"),
        ("float32", "float32"),
        ("float64", "float64"),
    }
)
ISAS: dict[str, int] = {"baseline": 0, "avx2": 1}

_NEED_CONTIGUOUS = 1
_LIB_STEM = "_polycos_cpu"


class NeedContiguous(ValueError):
    """The operands' layout keeps too many unmergeable batch dimensions: pass contiguous copies."""


class KernelError(RuntimeError):
    """The kernel rejected a call (a bug in the caller: shapes and dtypes are checked before)."""


# --------------------------------------------------------------------------- loading


def _library_path() -> Path:
    override = os.environ.get("POLYCOS_CPU_LIBRARY")
    if override:
        return Path(override)
    suffix = ".dll" if sys.platform == "win32" else ".so"
    return Path(__file__).with_name(_LIB_STEM + suffix)


_i64p = ctypes.POINTER(ctypes.c_int64)
_vp, _int, _dbl = ctypes.c_void_p, ctypes.c_int, ctypes.c_double
_SIGNATURES: dict[str, tuple[Any, list[Any]]] = {
    "polycos_abi_version": (_int, []),
    "polycos_forward": (
        _int,
        [_int, _int, _vp, _int, _i64p, _i64p, _vp, _int, _i64p, _i64p, _int, _vp, _i64p, _vp, _dbl, _int],
    ),
    "polycos_backward": (
        _int,
        [_int, _int, _int, _vp, _int, _i64p, _i64p, _vp, _int, _i64p, _i64p, _int,
         _int, _vp, _int, _i64p, _i64p, _vp, _vp, _i64p, _vp, _i64p, _dbl, _int],
    ),
    "polycos_normalize_rows": (
        _int,
        [_int, _int, _vp, _int, _i64p, _i64p, _vp, _i64p, _vp, _vp, _vp, _dbl, _int],
    ),
    "polycos_normalize_pair": (
        _int,
        [_int, _int, _int, _vp, ctypes.c_int64, _vp, ctypes.c_int64, ctypes.c_int64, _vp, _vp, _dbl, _int],
    ),
    "polycos_normalize_vjp": (
        _int,
        [_int, _int, ctypes.c_int64, ctypes.c_int64, _vp, _vp, _vp, _int, _dbl, _vp, _int],
    ),
    "polycos_clamp_round": (_int, [_vp, ctypes.c_int64, _vp]),
    "polycos_clamp_round_rows": (_int, [_vp, ctypes.c_int64, ctypes.c_int64, _vp, ctypes.c_int64]),
    "polycos_advise_huge_pages": (_int, [_vp, ctypes.c_int64]),
    "polycos_status_message": (ctypes.c_char_p, [_int]),
    "polycos_isa": (_int, []),
    "polycos_isa_available": (_int, [_int]),
    "polycos_set_isa": (_int, [_int]),
    "polycos_max_batch_dims": (_int, []),
    "polycos_range_limits": (_int, [_int, ctypes.POINTER(_dbl), ctypes.POINTER(_dbl)]),
    "polycos_set_stream_bytes": (ctypes.c_int64, [ctypes.c_int64]),
    "polycos_stream_calls": (ctypes.c_int64, []),
    "polycos_test_finish": (_int, [_int, _int, ctypes.c_int64, *([_vp] * 8), _dbl, _vp]),
    "polycos_test_grad": (
        _int,
        [_int, _int, ctypes.c_int64, ctypes.c_int64, _vp, _vp, _vp, _vp, _dbl, _vp, _vp],
    ),
    "polycos_test_row_offsets": (_int, [_int, _i64p, _int, _int, _i64p, ctypes.c_int64, _i64p]),
}
_ABI_VERSION = 2


def _load() -> tuple[ctypes.CDLL | None, str | None]:
    if os.environ.get("POLYCOS_CPU_KERNEL", "1").strip() in ("0", "false", "no", "off"):
        return None, "disabled by POLYCOS_CPU_KERNEL=0"
    path = _library_path()
    if not path.exists():
        return None, (
            f"the compiled CPU kernel {path.name} is not in {path.parent} (the build needs a C++17 "
            "compiler such as g++; reinstall with `pip install -e .` to build it)"
        )
    try:
        lib = ctypes.CDLL(str(path))
    except OSError as e:
        return None, f"could not load {path}: {e}"
    try:
        for name, (restype, argtypes) in _SIGNATURES.items():
            fn = getattr(lib, name)
            fn.restype = restype
            fn.argtypes = argtypes
    except AttributeError as e:
        return None, f"{path} lacks a symbol ({e}): rebuild with `pip install -e .`"
    if lib.polycos_abi_version() != _ABI_VERSION:
        return None, f"{path} has ABI version {lib.polycos_abi_version()}, expected {_ABI_VERSION}: rebuild it"
    forced = os.environ.get("POLYCOS_CPU_ISA", "").strip().lower()
    if forced:
        if forced not in ISAS:
            return None, f"POLYCOS_CPU_ISA={forced!r} is not one of {sorted(ISAS)}"
        if lib.polycos_set_isa(ISAS[forced]) < 0:
            return None, f"POLYCOS_CPU_ISA={forced}: this CPU or build does not support it"
    return lib, None


_LIB, _REASON = _load()


def available() -> bool:
    """Whether the compiled CPU kernel is loaded."""
    return _LIB is not None


def unavailable_reason() -> str | None:
    """Why the kernel is not available (``None`` when it is)."""
    return _REASON


def _lib() -> ctypes.CDLL:
    if _LIB is None:
        raise RuntimeError(f"polycos CPU kernel unavailable: {_REASON}")
    return _LIB


def isa() -> str:
    """The instruction-set clone in use: ``"baseline"`` (x86-64 / generic) or ``"avx2"``."""
    code = _lib().polycos_isa()
    return next(name for name, c in ISAS.items() if c == code)


def isa_available(name: str) -> bool:
    """Whether clone ``name`` is built and this CPU can run it."""
    return bool(_lib().polycos_isa_available(ISAS[name]))


def set_isa(name: str | None) -> str:
    """Switch the clone for every later call (``None``: the best); for tests. Returns the previous."""
    prev = isa()
    code = -1 if name is None else ISAS[name]
    if _lib().polycos_set_isa(code) < 0:
        raise ValueError(f"ISA {name!r} is not available here")
    return prev


def set_stream_bytes(nbytes: int | None) -> int:
    """Set the VJP's streaming-store threshold (bytes of both gradients; ``None``: half the L3).

    At or above it, gradient rows that start 64-byte lines, in memory already,
    are written with non-temporal stores (no read for ownership; the same
    values). Returns the previous threshold. For tests and benchmarks.
    """
    return int(_lib().polycos_set_stream_bytes(-1 if nbytes is None else int(nbytes)))


def stream_calls() -> int:
    """How many VJP calls so far wrote their gradients with streaming stores (for tests)."""
    return int(_lib().polycos_stream_calls())


def max_batch_dims() -> int:
    """Batch dimensions the kernel walks after coalescing (beyond: :class:`NeedContiguous`)."""
    return int(_lib().polycos_max_batch_dims())


def num_threads(n: int | None = None) -> int:
    """Threads a call uses: ``n``, else ``POLYCOS_NUM_THREADS``, else the CPUs available to us."""
    if n is not None:
        n = int(n)
        if n < 1:
            raise ValueError(f"nthreads must be >= 1, got {n}")
        return n
    value = _env_threads()
    if value:
        return value
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return os.cpu_count() or 1


#: ``POLYCOS_NUM_THREADS`` as given -> its value (0: unset); a bad value is never stored.
_ENV_THREADS: dict[str, int] = {}


def _env_threads() -> int:
    """``POLYCOS_NUM_THREADS`` (0 when unset), checked on every call: a lookup once a value is seen."""
    raw = os.environ.get("POLYCOS_NUM_THREADS", "")
    value = _ENV_THREADS.get(raw)
    if value is not None:
        return value
    env = raw.strip()
    value = 0
    if env:
        try:
            value = int(env)
        except ValueError:
            value = 0
        if value < 1:
            raise ValueError(f"POLYCOS_NUM_THREADS must be a positive integer, got {env!r}")
    if len(_ENV_THREADS) < 64:  # a process sets a few values; never grow without bound
        _ENV_THREADS[raw] = value
    return value


# --------------------------------------------------------------------------- helpers


def _check(status: int) -> None:
    if status == 0:
        return
    if status == _NEED_CONTIGUOUS:
        raise NeedContiguous("too many unmergeable batch dimensions: pass contiguous copies")
    msg = _lib().polycos_status_message(status).decode()
    raise KernelError(f"polycos CPU kernel: {msg} (status {status})")


_ARRAYS: dict[tuple, Any] = {}


def _i64s(values: Sequence[int]) -> Any:
    """A ctypes int64 array of ``values``, cached: shapes and strides repeat call after call."""
    key = tuple(values)
    arr = _ARRAYS.get(key)
    if arr is None:
        if len(_ARRAYS) > 1024:
            _ARRAYS.clear()
        arr = _ARRAYS[key] = (ctypes.c_int64 * len(key))(*key)
    return arr


def _code(name: str) -> int:
    try:
        return DTYPE_CODES[name]
    except KeyError:
        raise TypeError(f"the CPU kernel supports {', '.join(DTYPE_CODES)}; got {name}") from None


def _pair(dtype: str, acc: str) -> tuple[int, int]:
    if (dtype, acc) not in PAIRS:
        raise TypeError(f"unsupported storage/accumulation dtypes ({dtype}, {acc})")
    return DTYPE_CODES[dtype], DTYPE_CODES[acc]


# --------------------------------------------------------------------------- pointer level


def forward_ptr(
    dtype: str,
    acc: str,
    x1: Operand,
    x2: Operand,
    axis: int,
    eps: float,
    out: Operand,
    res_ptr: int,
    nthreads: int,
) -> None:
    """Forward into ``out`` (and ``res``): the C ABI ``polycos_forward`` with little overhead.

    ``x1``, ``x2``: inputs of storage dtype ``dtype``, broadcast together
    (right-aligned); ``axis`` (>= 0) indexes their broadcast shape. ``out``:
    the result (broadcast shape without ``axis``, dtype ``dtype``, any strides;
    its shape entry is ignored). ``res_ptr``: 0, or a C-contiguous ``(*result,
    5)`` array of ``acc`` receiving ``(s, n1s, n2s, m1, m2)`` per row. Raises
    :class:`NeedContiguous` when the layout is too fragmented.
    """
    t, a = _pair(dtype, acc)
    p1, s1, st1 = x1
    p2, s2, st2 = x2
    _check(
        _lib().polycos_forward(
            t, a, p1, len(s1), _i64s(s1), _i64s(st1), p2, len(s2), _i64s(s2), _i64s(st2),
            axis, out[0], _i64s(out[2]), res_ptr or None, eps, nthreads,
        )
    )


def backward_ptr(
    dtype: str,
    acc: str,
    out_dtype: str,
    g: Operand,
    x1: Operand,
    x2: Operand,
    axis: int,
    eps: float,
    res_ptr: int,
    d1: Operand,
    d2: Operand,
    nthreads: int,
    g_dtype: str | None = None,
) -> None:
    """VJP into ``d1``, ``d2``: the C ABI ``polycos_backward``.

    ``g`` (dtype ``g_dtype``: ``dtype`` by default, or ``acc``) broadcasts
    against the result; ``d1``, ``d2`` span the broadcast shape of ``x1``,
    ``x2`` and ``g`` (with a unit axis inserted), in ``out_dtype`` (``dtype``,
    or ``acc`` for callers that sum broadcast rows themselves). ``res_ptr``: 0
    (recompute the row statistics) or forward's residuals for ``x1``, ``x2``.
    """
    t, a = _pair(dtype, acc)
    o = _code(out_dtype)
    gt = _code(g_dtype or dtype)
    pg, sg, stg = g
    p1, s1, st1 = x1
    p2, s2, st2 = x2
    _check(
        _lib().polycos_backward(
            t, a, o, p1, len(s1), _i64s(s1), _i64s(st1), p2, len(s2), _i64s(s2), _i64s(st2), axis,
            gt, pg, len(sg), _i64s(sg), _i64s(stg), res_ptr or None,
            d1[0], _i64s(d1[2]), d2[0], _i64s(d2[2]), eps, nthreads,
        )
    )


def normalize_rows_ptr(
    dtype: str,
    acc: str,
    x: Operand,
    eps: float,
    xhat: Operand,
    cs_ptr: int,
    ns_ptr: int,
    m_ptr: int,
    nthreads: int,
) -> None:
    """Rows along the last axis normalised into ``xhat`` (``acc``, any strides) and per-row ``cs, ns, m``.

    ``cs_ptr``, ``ns_ptr``, ``m_ptr``: 0 or C-contiguous arrays of ``acc`` with
    one value per row (C order over ``x.shape[:-1]``).
    """
    t, a = _pair(dtype, acc)
    px, sx, stx = x
    _check(
        _lib().polycos_normalize_rows(
            t, a, px, len(sx), _i64s(sx), _i64s(stx), xhat[0], _i64s(xhat[2]),
            cs_ptr or None, ns_ptr or None, m_ptr or None, eps, nthreads,
        )
    )


# --------------------------------------------------------------------------- NumPy level


_NAMES: dict[Any, str] = {}  # dtype -> name (``dtype.name`` builds a string each time)


def _name(dtype: Any) -> str:
    name = _NAMES.get(dtype)
    if name is None:
        name = _NAMES.setdefault(dtype, np.dtype(dtype).name)
    return name


def _dtype_name(x: np.ndarray) -> str:
    name = _name(x.dtype)
    if name not in DTYPE_CODES:
        raise TypeError(f"the CPU kernel supports {', '.join(DTYPE_CODES)}; got {name}")
    return name


def _broadcast(*shapes: tuple) -> tuple:
    """Right-aligned broadcast of shapes (as ``np.broadcast_shapes``, without its overhead)."""
    nd = max(len(sh) for sh in shapes)
    out = [1] * nd
    for sh in shapes:
        for i, d in enumerate(sh, nd - len(sh)):
            if d != 1:
                if out[i] not in (1, d):
                    raise ValueError(f"shapes {shapes} do not broadcast")
                out[i] = d
    return tuple(out)


def _np_dtype(name: str) -> Any:
    if name == "bfloat16":
        import ml_dtypes

        return ml_dtypes.bfloat16
    return np.dtype(name)


_from_buffer, _addressof = ctypes.c_char.from_buffer, ctypes.addressof


def address(x: np.ndarray) -> int:
    """The address of ``x``'s first element, as ``x.ctypes.data``, with less overhead.

    ``ndarray.ctypes`` builds a helper object on every access (about 1.4 us on
    the benchmark machine, several per pairwise call); a writeable C-contiguous
    array exposes its memory through the buffer protocol, read here by
    ``ctypes.c_char.from_buffer`` (about 0.35 us). Other arrays (read-only,
    strided, empty) take ``ctypes.data``.
    """
    f = x.flags
    if f.writeable and f.c_contiguous and x.size:
        try:
            return _addressof(_from_buffer(x))
        except (TypeError, ValueError, BufferError):  # pragma: no cover - an exporter refusing a plain buffer
            pass
    return x.ctypes.data


def _operand(x: np.ndarray) -> tuple[np.ndarray, Operand]:
    """``x`` (a copy if its strides are not whole elements) and its operand."""
    item = x.itemsize
    if any(s % item for s in x.strides):
        x = np.ascontiguousarray(x)
    return x, (address(x), x.shape, tuple(s // item for s in x.strides))


def _axis(axis: int, ndim: int) -> int:
    n = max(ndim, 1)
    if not -n <= axis < n:
        raise IndexError(f"axis {axis} out of range for {ndim} dimensions")
    return axis % n


def _acc_for(dtype: str, acc_dtype: Any) -> str:
    if acc_dtype is None:
        return DEFAULT_ACC[dtype]
    return _name(acc_dtype)


def forward(
    x1: np.ndarray,
    x2: np.ndarray,
    axis: int,
    eps: float,
    *,
    acc_dtype: Any = None,
    want_res: bool = True,
    nthreads: int | None = None,
) -> tuple[np.ndarray, np.ndarray | None]:
    """Cosine similarity of NumPy arrays along ``axis`` (of their broadcast shape).

    Returns ``(out, res)``: the result (broadcast shape without ``axis``, the
    inputs' dtype) and, with ``want_res``, the residuals ``(*out.shape, 5)`` in
    the accumulation dtype: ``(s, n1s, n2s, m1, m2)`` per row
    (``_core.Residuals``). ``acc_dtype``: float64 (default) or float32 for
    float32 inputs. 0-d inputs give a 0-d result.

    >>> import numpy as np
    >>> out, res = forward(np.array([[1.0, 2.0], [3.0, 4.0]]), np.array([[5.0, 6.0], [7.0, 8.0]]), 0, 1e-8)
    >>> out.round(6).tolist()
    [0.955779, 0.98387]
    """
    dtype = _dtype_name(x1)
    if x2.dtype != x1.dtype:
        raise TypeError(f"x1 and x2 must have one dtype, got {x1.dtype} and {x2.dtype}")
    acc = _acc_for(dtype, acc_dtype)
    shape = _broadcast(x1.shape, x2.shape)
    scalar = shape == ()
    ax = _axis(axis, len(shape))
    if scalar:
        x1, x2, shape = x1.reshape(1), x2.reshape(1), (1,)
    out_shape = shape[:ax] + shape[ax + 1 :]
    out = np.empty(out_shape, dtype=x1.dtype)
    res = np.empty((*out_shape, 5), dtype=_np_dtype(acc)) if want_res else None
    nt = num_threads(nthreads)
    try:
        _forward_arrays(dtype, acc, x1, x2, ax, eps, out, res, nt)
    except NeedContiguous:
        x1 = np.ascontiguousarray(np.broadcast_to(x1, shape))
        x2 = np.ascontiguousarray(np.broadcast_to(x2, shape))
        _forward_arrays(dtype, acc, x1, x2, ax, eps, out, res, nt)
    if scalar:
        out = out.reshape(())
        res = None if res is None else res.reshape(5)
    return out, res


def _forward_arrays(
    dtype: str, acc: str, x1: np.ndarray, x2: np.ndarray, axis: int, eps: float,
    out: np.ndarray, res: np.ndarray | None, nthreads: int,
) -> None:
    x1, o1 = _operand(x1)
    x2, o2 = _operand(x2)
    _, oo = _operand(out)
    forward_ptr(dtype, acc, o1, o2, axis, float(eps), oo, 0 if res is None else address(res), nthreads)


def backward(
    g: Any,
    x1: np.ndarray,
    x2: np.ndarray,
    axis: int,
    eps: float,
    res: np.ndarray | None = None,
    *,
    out_dtype: Any = None,
    acc_dtype: Any = None,
    nthreads: int | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """VJP of :func:`forward` for upstream gradient ``g``: ``(d1, d2)`` over the full broadcast shape.

    ``g`` broadcasts against the result (it is cast to the inputs' dtype unless
    it already has the accumulation dtype). ``res``: :func:`forward`'s
    residuals (recomputed when ``None``; its dtype sets the accumulation dtype).
    ``out_dtype``: the inputs' dtype (default) or the accumulation dtype. The
    caller sums the gradients of broadcast inputs (``_core.sum_to_shape``).
    """
    dtype = _dtype_name(x1)
    if x2.dtype != x1.dtype:
        raise TypeError(f"x1 and x2 must have one dtype, got {x1.dtype} and {x2.dtype}")
    acc = _name(res.dtype) if res is not None else _acc_for(dtype, acc_dtype)
    odt = dtype if out_dtype is None else _name(out_dtype)
    if odt not in (dtype, acc):
        raise TypeError(f"out_dtype must be {dtype} or {acc}, got {odt}")
    g = np.asarray(g)
    if _name(g.dtype) not in (dtype, acc):
        g = g.astype(x1.dtype)
    shape12 = _broadcast(x1.shape, x2.shape)
    ax = _axis(axis, len(shape12))
    if shape12 == ():  # 0-d: one row of one element (res keeps its shape (5,))
        x1, x2, shape12 = x1.reshape(1), x2.reshape(1), (1,)
    result12 = shape12[:ax] + shape12[ax + 1 :]
    if res is not None and (res.shape != (*result12, 5) or not res.flags.c_contiguous):
        raise ValueError(f"res must be a C-contiguous array of shape {(*result12, 5)}, got {res.shape}")
    from_end = len(shape12) - ax
    gfull = (1,) * max(0, from_end - 1 - g.ndim) + g.shape
    gfull = (*gfull[:len(gfull) - (from_end - 1)], 1, *gfull[len(gfull) - (from_end - 1):])
    shape = _broadcast(shape12, gfull)
    d1 = empty_lines(shape, _np_dtype(odt))
    d2 = empty_lines(shape, _np_dtype(odt))
    full_ax = len(shape) - from_end
    nt = num_threads(nthreads)
    try:
        _backward_arrays(dtype, acc, odt, g, x1, x2, ax, eps, res, d1, d2, nt)
    except NeedContiguous:
        x1 = np.ascontiguousarray(np.broadcast_to(x1, shape))
        x2 = np.ascontiguousarray(np.broadcast_to(x2, shape))
        rshape = shape[:full_ax] + shape[full_ax + 1 :]
        g = np.ascontiguousarray(np.broadcast_to(g, rshape))
        if res is not None:
            res = np.ascontiguousarray(np.broadcast_to(res.reshape((1,) * (len(shape) - len(shape12)) + res.shape), (*rshape, 5)))
        _backward_arrays(dtype, acc, odt, g, x1, x2, full_ax, eps, res, d1, d2, nt)
    return d1, d2


def empty_lines(shape: tuple, dtype: Any) -> np.ndarray:
    """``np.empty(shape, dtype)`` starting a 64-byte cache line (a view of a byte buffer when large).

    NumPy's large arrays start 16 bytes into a line; the kernel writes large
    gradients with streaming stores only where every row starts a line.
    """
    dtype = np.dtype(dtype)
    nbytes = math.prod(shape) * dtype.itemsize
    if nbytes < 1 << 20:
        return np.empty(shape, dtype)
    buf = np.empty(nbytes + 64, np.uint8)
    start = -buf.ctypes.data % 64
    return buf[start : start + nbytes].view(dtype).reshape(shape)


def _backward_arrays(
    dtype: str, acc: str, odt: str, g: np.ndarray, x1: np.ndarray, x2: np.ndarray, axis: int,
    eps: float, res: np.ndarray | None, d1: np.ndarray, d2: np.ndarray, nthreads: int,
) -> None:
    g, og = _operand(g)
    x1, o1 = _operand(x1)
    x2, o2 = _operand(x2)
    _, od1 = _operand(d1)
    _, od2 = _operand(d2)
    backward_ptr(
        dtype, acc, odt, og, o1, o2, axis, float(eps), 0 if res is None else address(res),
        od1, od2, nthreads, g_dtype=_name(g.dtype),
    )


class RowNorms(NamedTuple):
    """:func:`normalize_rows`' result (accumulation dtype; ``cs``, ``ns``, ``m`` keepdims)."""

    xhat: np.ndarray
    cs: np.ndarray
    ns: np.ndarray
    m: np.ndarray


def normalize_rows(
    x: np.ndarray, eps: float, *, acc_dtype: Any = None, nthreads: int | None = None
) -> RowNorms:
    """Rows along the last axis normalised, as ``_core.normalize_rows``: ``(xhat, cs, ns, m)``.

    ``xhat = (x / m) / max(ns, eps / m)`` (0 where that is 0) with ``m =
    max|x|`` for rescaling dtypes (else 1) and ``ns = ||x / m||``; all in the
    accumulation dtype; ``cs``, ``ns``, ``m`` have shape ``(..., 1)``.
    """
    dtype = _dtype_name(x)
    acc = _acc_for(dtype, acc_dtype)
    if x.ndim == 0:
        raise ValueError("normalize_rows needs at least one dimension")
    adt = _np_dtype(acc)
    xhat = np.empty(x.shape, dtype=adt)
    # (3, rows), each viewed as (..., 1): not (3, ..., 1), which would need one
    # dimension more than x has (NumPy allows 64)
    stats = np.empty((3, math.prod(x.shape[:-1])), dtype=adt)
    x, ox = _operand(x)
    _, oh = _operand(xhat)
    ptrs = [address(stats[i]) for i in range(3)]
    normalize_rows_ptr(dtype, acc, ox, float(eps), oh, *ptrs, num_threads(nthreads))
    cs, ns, m = (stats[i].reshape(*x.shape[:-1], 1) for i in range(3))
    return RowNorms(xhat, cs, ns, m)


# --------------------------------------------------------------------------- pairwise fast path

#: Work per call (elements touched) below which the kernel runs one thread
#: whatever it is asked (``kMinWorkPerThread`` in ``cpu.cpp``, times two): the
#: thread count need not be looked up for it.
_ONE_THREAD_WORK = 1 << 17
_F32, _F64 = np.dtype(np.float32), np.dtype(np.float64)
#: Storage dtype -> (its code, its accumulation dtype's code, the accumulation dtype).
_PLAIN: dict[Any, tuple[int, int, Any]] = {_F32: (2, 3, _F64), _F64: (3, 3, _F64)}


def _threads_for(work: int, nthreads: int | None, default: int | None = None) -> int:
    """``nthreads`` if given; else one thread for small work, ``default`` (or :func:`num_threads`) above."""
    if nthreads is None and work < _ONE_THREAD_WORK:
        if default is None:
            _env_threads()  # a bad POLYCOS_NUM_THREADS fails here as it does for large work
        return 1
    return num_threads(default if nthreads is None else nthreads)


def normalize_pair_ptr(
    t: int, out: int, x1: int, rows1: int, x2: int | None, rows2: int, d: int, xhat: int, stats: int | None,
    eps: float, nthreads: int | None = None, default_threads: int | None = None,
) -> None:
    """:func:`normalize_pair` on memory addresses: C-contiguous rows of dtype code ``t`` (float32 2, float64 3).

    ``xhat`` ``(rows1 + rows2, d)`` of dtype code ``out`` (3: the float64
    accumulation, or ``t``); ``stats`` ``(3, rows1 + rows2)`` float64 or ``None``.
    Threads: ``nthreads``, else one for small work and ``default_threads`` (or
    :func:`num_threads`) above; torch passes its own count there.
    """
    threads = _threads_for(2 * (rows1 + rows2) * d, nthreads, default_threads)
    _check(_lib().polycos_normalize_pair(t, 3, out, x1, rows1, x2, rows2, d, xhat, stats, eps, threads))


def normalize_vjp_ptr(
    t: int, acc: int, rows: int, d: int, h: int, v: int, stats: int, eps: float, rescaled: bool,
    nthreads: int | None = None, default_threads: int | None = None,
) -> None:
    """:func:`normalize_vjp` on addresses: ``h``, ``v`` C-contiguous ``(rows, d)`` of dtype code ``t``, over ``v``."""
    threads = _threads_for(3 * rows * d, nthreads, default_threads)
    _check(_lib().polycos_normalize_vjp(t, acc, rows, d, h, v, stats, int(rescaled), eps, v, threads))


#: A float32 pairwise product is formed in float64 blocks of at most this many
#: bytes, each clamped and rounded into the result by :func:`clamp_round_rows_ptr`
#: while in cache (NumPy's lean path and the torch ``pairwise_forward`` operator):
#: no float64 copy of the whole matrix. A block spans at most TILE_MAX_COLS
#: columns (each BLAS call packs the slice of ``h2`` it multiplies, not all of
#: it: 4096² measured 6-16 ms faster than with tiles of whole rows) and at least
#: TILE_MIN_ROWS rows (thinner blocks slow the BLAS call down).
PRODUCT_TILE_BYTES = 1 << 22
TILE_MIN_ROWS = 128
TILE_MAX_COLS = 1024


def product_blocks(n: int, m: int) -> tuple[int, int]:
    """``(rows, cols)`` of the float64 blocks of an ``n x m`` product (``(n, m)``: one block)."""
    cols = min(m, TILE_MAX_COLS)
    return min(n, max(TILE_MIN_ROWS, PRODUCT_TILE_BYTES // (8 * max(cols, 1)))), cols


def clamp_round_ptr(p: int, n: int, out: int) -> None:
    """``out[:n] = float32(clip(p[:n], -1, 1))`` on addresses of C-contiguous float64 and float32 memory.

    The clamp and the one rounding of :func:`polycos._core.pairwise_product` for
    a float32 result, in one pass (NaN kept).
    """
    _check(_lib().polycos_clamp_round(p, n, out))


def advise_huge_pages_ptr(p: int, nbytes: int) -> None:
    """Ask Linux for transparent huge pages on ``nbytes`` of new memory at address ``p``
    before it is first written (4 MiB and more; a hint, no data changes; a no-op elsewhere)."""
    _check(_lib().polycos_advise_huge_pages(p, nbytes))


def clamp_round_rows_ptr(p: int, rows: int, cols: int, out: int, out_stride: int) -> None:
    """:func:`clamp_round_ptr` of a C-contiguous ``(rows, cols)`` float64 block into float32 rows
    ``out_stride`` elements apart: a block of the result matrix, written while the block is in cache."""
    _check(_lib().polycos_clamp_round_rows(p, rows, cols, out, out_stride))


def normalize_pair(
    x1: np.ndarray, x2: np.ndarray | None, eps: float, *, work: bool = False, stats: bool = False,
    out: np.ndarray | None = None, nthreads: int | None = None,
) -> tuple[np.ndarray, np.ndarray | None]:
    """:func:`normalize_rows` of the rows of ``x1`` and then of ``x2``, in one call with little overhead.

    ``x1`` ``(N, D)`` and ``x2`` ``(M, D)`` (or ``None``): C-contiguous, aligned,
    one dtype, float32 or float64 (the caller checks; this is the pairwise fast
    path of the NumPy backend). Returns ``(xhat, st)``: ``xhat`` of shape
    ``(N + M, D)``, ``x1``'s rows first, in the accumulation dtype, or with
    ``work`` in the inputs' own dtype (rounded once from it: the pairwise
    VJP's product dtype); with ``stats``, ``st`` of shape ``(3, N + M)`` in the
    accumulation dtype holding ``cs``, ``ns``, ``m`` per row (``m = 1`` for
    float32), else ``None``. ``out``: ``xhat`` preallocated (C-contiguous, of
    that shape and dtype; the caller's scratch memory).
    """
    t, a, adt = _PLAIN[x1.dtype]
    n1, d = x1.shape
    n2 = 0 if x2 is None else x2.shape[0]
    rows = n1 + n2
    xhat = np.empty((rows, d), x1.dtype if work else adt) if out is None else out
    st = np.empty((3, rows), adt) if stats else None
    normalize_pair_ptr(t, t if work else a, address(x1), n1, None if x2 is None else address(x2), n2, d,
                       address(xhat), None if st is None else address(st), eps, nthreads)
    return xhat, st


def normalize_vjp(
    h: np.ndarray, v: np.ndarray, stats: np.ndarray, eps: float, *, rescaled: bool,
    nthreads: int | None = None,
) -> np.ndarray:
    """``_core.row_normalize_vjp`` by the kernel, written over ``v`` (which is returned).

    ``h`` (``xhat``) and ``v`` (the cotangent): C-contiguous ``(R, D)`` arrays
    of one dtype, float32 or float64 (the product dtype); ``stats``:
    :func:`normalize_pair`'s ``(3, R)`` ``cs``, ``ns``, ``m`` (accumulation
    dtype; ``m`` read only when ``rescaled``). Per row,
    ``d = (v - [ns > eps / m] <h, v> h) / cs / m``, ``<h, v>`` summed in the
    accumulation dtype.
    """
    rows, d = h.shape
    normalize_vjp_ptr(2 if h.dtype == _F32 else 3, 3 if stats.dtype == _F64 else 2, rows, d, address(h),
                      address(v), address(stats), eps, rescaled, nthreads)
    return v


# --------------------------------------------------------------------------- test hooks


def _range_limits(acc: str) -> tuple[float, float]:
    """The rescue test's ``(lo_th, hi_th)`` compiled into ``rows.h`` for accumulation dtype ``acc``."""
    lo, hi = ctypes.c_double(), ctypes.c_double()
    _check(_lib().polycos_range_limits(_code(acc), ctypes.byref(lo), ctypes.byref(hi)))
    return lo.value, hi.value


def _test_finish(
    w12: Any, w11: Any, w22: Any, l12: Any, l11: Any, l22: Any, m1: Any, m2: Any, eps: float,
    *, compensated: bool,
) -> tuple[np.ndarray, ...]:
    """``rows.h`` ``finish`` elementwise on arrays of per-row sums: ``(s, n1s, n2s, m1, m2)``.

    Inputs are broadcast together and cast to ``w12``'s dtype (float32 or float64).
    """
    dt = np.asarray(w12).dtype
    arrays = [np.ascontiguousarray(a, dtype=dt).ravel() for a in np.broadcast_arrays(w12, w11, w22, l12, l11, l22, m1, m2)]
    shape = np.broadcast_shapes(*(np.shape(a) for a in (w12, w11, w22, l12, l11, l22, m1, m2)))
    out = np.empty((arrays[0].size, 5), dtype=dt)
    _check(_lib().polycos_test_finish(_code(dt.name), int(compensated), arrays[0].size, *(a.ctypes.data for a in arrays), float(eps), out.ctypes.data))
    return tuple(out[:, i].reshape(shape) for i in range(5))


def _test_grad(
    a1: np.ndarray, a2: np.ndarray, g: np.ndarray, res: np.ndarray, eps: float, *, rescaled: bool
) -> tuple[np.ndarray, np.ndarray]:
    """``rows.h`` ``grad_coefficients`` + ``grad_element`` on ``(rows, D)`` arrays of the accumulation dtype.

    ``g``: ``(rows,)``; ``res``: ``(rows, 5)`` residuals. Returns ``(d1, d2)``.
    """
    dt = a1.dtype
    a1, a2 = np.ascontiguousarray(a1, dtype=dt), np.ascontiguousarray(a2, dtype=dt)
    g = np.ascontiguousarray(g, dtype=dt)
    res = np.ascontiguousarray(res, dtype=dt)
    rows, d = a1.shape
    d1, d2 = np.empty_like(a1), np.empty_like(a2)
    _check(_lib().polycos_test_grad(_code(dt.name), int(rescaled), rows, d, a1.ctypes.data, a2.ctypes.data, g.ctypes.data, res.ctypes.data, float(eps), d1.ctypes.data, d2.ctypes.data))
    return d1, d2


def _test_row_offsets(
    shape: Sequence[int], axis: int, strides: Sequence[Sequence[int]], row: int
) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """The kernel's row iterator on a virtual problem: each operand's offset of rows ``row``, ``row + 1``.

    ``strides``: per operand, element strides over ``shape`` (nothing is read).
    Raises :class:`NeedContiguous` past the kernel's batch-dimension limit.
    """
    nops = len(strides)
    out = (ctypes.c_int64 * (2 * nops))()
    flat = [int(s) for op in strides for s in op]
    _check(_lib().polycos_test_row_offsets(len(shape), _i64s(shape), axis, nops, _i64s(flat), row, out))
    return tuple(out[:nops]), tuple(out[nops:])


# --------------------------------------------------------------------------- JAX (XLA FFI)

_FFI_TARGETS = {
    "polycos_forward": "PolycosXlaForward",
    "polycos_forward_value": "PolycosXlaForwardValue",
    "polycos_backward": "PolycosXlaBackward",
    "polycos_backward_recompute": "PolycosXlaBackwardRecompute",
    "polycos_normalize_rows": "PolycosXlaNormalizeRows",
    "polycos_uninitialized": "PolycosXlaUninitialized",
}
_jax_lock = threading.Lock()
_jax_registered = False


def register_jax() -> None:
    """Register the FFI handlers with JAX for the CPU platform (idempotent, thread-safe)."""
    global _jax_registered
    if _jax_registered:
        return
    with _jax_lock:
        if _jax_registered:
            return
        lib = _lib()
        import jax

        for name, symbol in _FFI_TARGETS.items():
            jax.ffi.register_ffi_target(name, jax.ffi.pycapsule(getattr(lib, symbol)), platform="cpu")
        _jax_registered = True


def jax_uninitialized(shape: Sequence[int], dtype: Any) -> Any:
    """A new CPU array of ``shape`` and ``dtype`` whose values are undefined, advised for huge pages.

    Only for the initial value of a computation that overwrites every element
    (the blocked pairwise product's loop): XLA would otherwise write zeros
    first, a pass over the whole result in 4 KiB page faults.
    """
    import jax

    register_jax()
    return jax.ffi.ffi_call("polycos_uninitialized", jax.ShapeDtypeStruct(tuple(shape), dtype))()


def _jax_acc(dtype: Any) -> Any:
    """The accumulation dtype under JAX: float64 for float32 only when x64 is on."""
    import jax

    name = np.dtype(dtype).name
    if name in ("float16", "bfloat16"):
        return np.dtype("float32")
    if name == "float32":
        x64 = jax.dtypes.canonicalize_dtype(np.float64) == np.dtype(np.float64)
        return np.dtype("float64" if x64 else "float32")
    return np.dtype(name)


def _jax_expand(x: Any, ndim: int) -> Any:
    import jax.numpy as jnp

    return x if x.ndim == ndim else jnp.reshape(x, (1,) * (ndim - x.ndim) + tuple(x.shape))


def _ffi_scalars(eps: float, nthreads: int | None) -> dict[str, Any]:
    return {"eps": np.float64(eps), "nthreads": np.int64(num_threads(nthreads))}


def _jax_operands(x1: Any, x2: Any, axis: int) -> tuple[Any, Any, int, int, tuple, bool]:
    """Both forward operands at one rank (0-d as 1-vectors): ``(x1, x2, ndim, axis, broadcast shape, was 0-d)``."""
    nd = max(x1.ndim, x2.ndim)
    ax = _axis(axis, nd)
    scalar = nd == 0
    if scalar:
        x1, x2, nd = x1.reshape(1), x2.reshape(1), 1
    x1, x2 = _jax_expand(x1, nd), _jax_expand(x2, nd)
    return x1, x2, nd, ax, _broadcast(tuple(x1.shape), tuple(x2.shape)), scalar


def jax_forward(x1: Any, x2: Any, axis: int, eps: float, *, nthreads: int | None = None) -> tuple[Any, Any]:
    """Forward on JAX CPU arrays through the FFI handler: ``(out, res)`` as :func:`forward`.

    Works inside ``jax.jit`` and ``jax.vmap`` (``vmap_method="expand_dims"``:
    unbatched operands get a unit batch dimension, which the handler
    broadcasts with stride 0 rather than JAX materialising it).
    """
    import jax

    register_jax()
    x1, x2, nd, ax, shape, scalar = _jax_operands(x1, x2, axis)
    out_shape = shape[:ax] + shape[ax + 1 :]
    acc = _jax_acc(x1.dtype)
    call = jax.ffi.ffi_call(
        "polycos_forward",
        (jax.ShapeDtypeStruct(out_shape, x1.dtype), jax.ShapeDtypeStruct((*out_shape, 5), acc)),
        vmap_method="expand_dims",
    )
    out, res = call(x1, x2, axis=np.int64(ax - nd), **_ffi_scalars(eps, nthreads))
    if scalar:
        return out.reshape(()), res.reshape(5)
    return out, res


def jax_forward_value(x1: Any, x2: Any, axis: int, eps: float, *, nthreads: int | None = None) -> Any:
    """The value of :func:`jax_forward` without its residuals (nothing to differentiate).

    The same kernel with the residuals' pointer null: 5 accumulation-dtype
    numbers a row fewer written. Float32 accumulates in float64 even where JAX
    has no float64 (x64 off), as NumPy's path and :func:`jax_forward` do (the
    kernel's (float32, float32) pair sums in float64 and rounds its residuals):
    the same bits as NumPy's result.
    """
    import jax

    register_jax()
    x1, x2, nd, ax, shape, scalar = _jax_operands(x1, x2, axis)
    acc = DEFAULT_ACC[np.dtype(x1.dtype).name]  # the widest: float64 for float32
    call = jax.ffi.ffi_call(
        "polycos_forward_value", jax.ShapeDtypeStruct(shape[:ax] + shape[ax + 1 :], x1.dtype),
        vmap_method="expand_dims",
    )
    out = call(x1, x2, axis=np.int64(ax - nd), acc=np.int64(DTYPE_CODES[acc]), **_ffi_scalars(eps, nthreads))
    return out.reshape(()) if scalar else out


def jax_backward(
    g: Any,
    x1: Any,
    x2: Any,
    res: Any,
    axis: int,
    eps: float,
    out_dtype: Any = None,
    *,
    nthreads: int | None = None,
) -> tuple[Any, Any]:
    """VJP on JAX CPU arrays through the FFI handler: ``(d1, d2)`` over the full broadcast shape.

    ``res``: :func:`jax_forward`'s residuals, or ``None`` to recompute them.
    ``out_dtype``: the inputs' dtype (default) or the accumulation dtype.
    """
    import jax

    register_jax()
    nd = max(x1.ndim, x2.ndim)
    ax = _axis(axis, nd)
    if nd == 0:
        x1, x2, nd = x1.reshape(1), x2.reshape(1), 1
        g = g.reshape(())
        res = None if res is None else res.reshape(1, 5)
    x1, x2 = _jax_expand(x1, nd), _jax_expand(x2, nd)
    g = _jax_expand(g, nd - 1)
    shape12 = _broadcast(tuple(x1.shape), tuple(x2.shape))
    gfull = (*tuple(g.shape[:ax]), 1, *tuple(g.shape[ax:]))
    shape = _broadcast(shape12, gfull)
    acc = _jax_acc(x1.dtype) if res is None else np.dtype(res.dtype)
    odt = np.dtype(x1.dtype) if out_dtype is None else np.dtype(out_dtype)
    outs = (jax.ShapeDtypeStruct(shape, odt), jax.ShapeDtypeStruct(shape, odt))
    attrs = {"axis": np.int64(ax - nd), **_ffi_scalars(eps, nthreads)}
    if res is None:
        call = jax.ffi.ffi_call("polycos_backward_recompute", outs, vmap_method="expand_dims")
        return call(g, x1, x2, acc=np.int64(DTYPE_CODES[acc.name]), **attrs)
    call = jax.ffi.ffi_call("polycos_backward", outs, vmap_method="expand_dims")
    return call(g, x1, x2, res, **attrs)


def jax_normalize_rows(x: Any, eps: float, *, nthreads: int | None = None) -> tuple[Any, Any, Any, Any]:
    """:func:`normalize_rows` on a JAX CPU array through the FFI handler: ``(xhat, cs, ns, m)``."""
    import jax

    register_jax()
    if x.ndim == 0:
        raise ValueError("normalize_rows needs at least one dimension")
    acc = _jax_acc(x.dtype)
    keep = (*tuple(x.shape[:-1]), 1)
    call = jax.ffi.ffi_call(
        "polycos_normalize_rows",
        (jax.ShapeDtypeStruct(tuple(x.shape), acc), *(jax.ShapeDtypeStruct(keep, acc) for _ in range(3))),
        vmap_method="expand_dims",
    )
    return tuple(call(x, **_ffi_scalars(eps, nthreads)))  # type: ignore[return-value]
